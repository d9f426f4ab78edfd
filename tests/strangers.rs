//! `veil receive` meets strangers before its source: a port scan that connects and closes,
//! random bytes, a bad header, a peer that never says Hello. Each is logged and dropped, and
//! the real guest that comes next still arrives, over plain TCP, TLS and UNIX sockets alike.
//! With `--keep-listening` one receiver takes guest after guest, after a failed one too.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{Spawned, TempDir};

/// A free loopback port (bound and released: good enough for a test).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `veil receive ARGS...` with a 1 s Hello timeout, its stderr in `log`.
fn receiver(args: &[String], log: &Path) -> Spawned {
    common::veil()
        .arg("receive")
        .args(["--hello-timeout", "1s"])
        .args(args)
        .stderr(File::create(log).unwrap())
        .stdout(Stdio::null())
        .spawn()
        .map(Spawned)
        .unwrap()
}

use std::fs::File;

/// Kills the guest processes a `--keep-listening` receiver logged, should the test end
/// before they have been shut down.
struct GuestProcesses(std::path::PathBuf);

impl Drop for GuestProcesses {
    fn drop(&mut self) {
        for line in log_of(&self.0).lines() {
            if let Some(pid) = line.split("runs in process ").nth(1) {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    // SAFETY: kill has no memory-safety preconditions.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
    }
}

fn log_of(log: &Path) -> String {
    std::fs::read_to_string(log).unwrap_or_default()
}

/// Waits (up to 30 s) until `log` holds `needle` `count` times.
fn wait_log(log: &Path, needle: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while log_of(log).matches(needle).count() < count {
        assert!(
            Instant::now() < deadline,
            "{count} × {needle:?} never appeared in:\n{}",
            log_of(log)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A guest that greets, then spins, controlled on `api`.
fn source(api: &Path) -> Spawned {
    let mut source = common::veil()
        .args(["run", "--memory", "32M", "--api-socket"])
        .arg(api)
        .args(["--cmdline", "greet spin", "--kernel"])
        .arg(common::kit())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(Spawned)
        .unwrap();
    common::read_until(source.0.stdout.as_mut().unwrap(), "Hello");
    // The guest can greet before the API server listens.
    common::wait_for(api);
    source
}

/// Migrates the guest on `source_api` to `to`; asserts it now runs behind `target_api`.
fn migrate(source_api: &Path, to: &str, extra: &[String], target_api: &Path) {
    let mut source = source(source_api);
    let mut args = vec!["migrate".to_string(), "--to".into(), to.into()];
    args.extend_from_slice(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = common::ctl(source_api, &args);
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(source.wait().success());
    common::wait_for(target_api);
    assert_eq!(common::status(target_api)["state"], "running");
}

/// Some bytes no one could mistake for a migration.
fn random_bytes(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A frame header with the right magic and a protocol version no one speaks.
fn bad_header() -> Vec<u8> {
    let mut header = b"VEIL".to_vec();
    header.extend_from_slice(&99u16.to_le_bytes());
    header.extend_from_slice(&1u16.to_le_bytes());
    header.extend_from_slice(&[0; 16]);
    header
}

/// The four strangers, each connected by `connect`: connects and closes, 4 KiB of random
/// bytes, a bad header, and one that says nothing for longer than the Hello timeout. Each
/// must be logged (as `dropped` says) before the next comes.
fn strangers<S: Read + Write>(connect: impl Fn() -> S, log: &Path, dropped: &str) {
    drop(connect());
    wait_log(log, dropped, 1);
    let mut s = connect();
    // The receiver may hang up before all of it is read: that is its right.
    let _ = s.write_all(&random_bytes(4096));
    wait_log(log, dropped, 2);
    drop(s);
    let mut s = connect();
    let _ = s.write_all(&bad_header());
    wait_log(log, dropped, 3);
    drop(s);
    let started = Instant::now();
    let mut silent = connect();
    wait_log(log, dropped, 4);
    assert!(started.elapsed() >= Duration::from_millis(900));
    // The receiver hung up on it without a word: this read ends (a stream still open
    // would hang the test).
    let mut rest = Vec::new();
    let _ = silent.read_to_end(&mut rest);
    assert!(rest.len() < 64, "{} bytes to a stranger", rest.len());
}

fn shutdown(api: &Path, target: &mut Spawned) {
    common::ctl(api, &["shutdown"]);
    target.wait();
}

#[test]
fn strangers_on_plain_tcp_are_dropped_and_the_guest_still_arrives() {
    let dir = TempDir::new("strangers-tcp");
    let (log, target_api) = (dir.path("receive.log"), dir.path("b.sock"));
    let port = free_port();
    let to = format!("tcp:127.0.0.1:{port}");
    let mut target = receiver(
        &[
            "--listen".into(),
            to.clone(),
            "--insecure".into(),
            "--api-socket".into(),
            target_api.display().to_string(),
        ],
        &log,
    );
    wait_log(&log, "waiting for a guest", 1);
    let connect = || TcpStream::connect(("127.0.0.1", port)).unwrap();
    strangers(connect, &log, "Dropped a connection from 127.0.0.1:");
    let said = log_of(&log);
    for why in [
        "The peer closed the migration stream",
        "Not a Veil migration stream",
        "Unsupported protocol version 99",
        "no valid Hello within 1s",
    ] {
        assert!(said.contains(why), "{why:?} not in:\n{said}");
    }
    migrate(
        &dir.path("a.sock"),
        &to,
        &["--insecure".into()],
        &target_api,
    );
    shutdown(&target_api, &mut target);
}

#[test]
fn strangers_on_a_unix_socket_are_dropped_and_the_guest_still_arrives() {
    let dir = TempDir::new("strangers-unix");
    let (log, target_api, socket) = (
        dir.path("receive.log"),
        dir.path("b.sock"),
        dir.path("m.sock"),
    );
    let to = format!("unix:{}", socket.display());
    let mut target = receiver(
        &[
            "--listen".into(),
            to.clone(),
            "--api-socket".into(),
            target_api.display().to_string(),
        ],
        &log,
    );
    common::wait_for(&socket);
    let connect = || UnixStream::connect(&socket).unwrap();
    strangers(
        connect,
        &log,
        "Dropped a connection from a local process on unix:",
    );
    migrate(&dir.path("a.sock"), &to, &[], &target_api);
    shutdown(&target_api, &mut target);
}

#[test]
fn strangers_on_tls_are_rejected_and_the_guest_still_arrives() {
    let dir = TempDir::new("strangers-tls");
    let ca = common::tls::Ca::new(&dir.0, "site");
    let (target_files, source_files) = (
        ca.host(&dir.0, "target", &["127.0.0.1"]),
        ca.host(&dir.0, "source", &["127.0.0.1"]),
    );
    let (log, target_api) = (dir.path("receive.log"), dir.path("b.sock"));
    let port = free_port();
    let to = format!("tcp:127.0.0.1:{port}");
    let mut args = vec![
        "--listen".to_string(),
        to.clone(),
        "--api-socket".into(),
        target_api.display().to_string(),
    ];
    args.extend(common::tls::args(&target_files));
    let mut target = receiver(&args, &log);
    wait_log(&log, "waiting for a guest", 1);
    let connect = || TcpStream::connect(("127.0.0.1", port)).unwrap();
    strangers(connect, &log, "Rejected a connection from 127.0.0.1:");
    let said = log_of(&log);
    assert!(
        said.contains("the handshake did not finish in time"),
        "{said}"
    );
    migrate(
        &dir.path("a.sock"),
        &to,
        &common::tls::args(&source_files),
        &target_api,
    );
    shutdown(&target_api, &mut target);
}

/// `veil receive --keep-listening` with `--memory-file DIR/g{id}/ram`: guest 1's folder does
/// not exist, so its migration fails (and the source keeps it); guests 2 and 3, with strangers
/// before them, arrive and run side by side in processes of their own.
#[test]
fn keep_listening_serves_guest_after_guest_after_a_failure_and_strangers() {
    let dir = TempDir::new("keep-listening");
    let log = dir.path("receive.log");
    let socket = dir.path("m.sock");
    let to = format!("unix:{}", socket.display());
    let api = |n: u32| dir.path(&format!("b{n}.sock"));
    let ram_dir = |n: u32| dir.path(&format!("g{n}"));
    for n in [2, 3] {
        std::fs::create_dir(ram_dir(n)).unwrap();
    }
    let _guests = GuestProcesses(log.clone());
    let mut daemon = receiver(
        &[
            "--keep-listening".into(),
            "--listen".into(),
            to.clone(),
            "--api-socket".into(),
            dir.path("b{id}.sock").display().to_string(),
            "--memory-file".into(),
            dir.path("g{id}/ram").display().to_string(),
        ],
        &log,
    );
    common::wait_for(&socket);

    // Guest 1 cannot be received: the source is told why and keeps it.
    let first_api = dir.path("a1.sock");
    let mut first = source(&first_api);
    let out = common::ctl(&first_api, &["migrate", "--to", &to]);
    assert!(!out.status.success(), "{}", common::describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("as guest memory"),
        "{}",
        common::describe(&out)
    );
    assert_eq!(common::status(&first_api)["state"], "running");
    common::ctl(&first_api, &["shutdown"]);
    first.wait();
    wait_log(&log, "guest 1's process", 1);

    let connect = || UnixStream::connect(&socket).unwrap();
    strangers(connect, &log, "Dropped a connection from a local process");
    migrate(&dir.path("a2.sock"), &to, &[], &api(2));
    wait_log(&log, "guest 2 arrived; it runs in process", 1);
    migrate(&dir.path("a3.sock"), &to, &[], &api(3));
    // Both run at once, each in its own file.
    assert_eq!(common::status(&api(2))["state"], "running");
    assert!(ram_dir(2).join("ram").exists() && ram_dir(3).join("ram").exists());
    for n in [2, 3] {
        common::ctl(&api(n), &["shutdown"]);
    }
    wait_log(&log, "ended (", 3);
    // The service itself is still there for the next guest.
    assert!(daemon.0.try_wait().unwrap().is_none(), "{}", log_of(&log));
    assert!(socket.exists());
}
