//! Typing into a guest: standard input or a socket client reaches COM1, or the virtio console
//! when there is one on stdio, and the kit echoes what arrived.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::TempDir;

/// `veil run` on the kit with `input` on its standard input.
fn run_with_stdin(cmdline: &str, extra: &[&str], input: &[u8]) -> Output {
    let mut child = common::veil()
        .args(["run", "--memory", "32M", "--kernel"])
        .arg(common::kit())
        .args(["--cmdline", cmdline])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn bytes_on_stdin_reach_com1() {
    // More than the UART's 64-byte FIFO: the rest waits in Veil and follows in order.
    let input: Vec<u8> = (0..200u32).map(|i| b'a' + (i % 26) as u8).collect();
    let out = run_with_stdin("serial-echo:count=200", &[], &input);
    assert!(out.status.success(), "{}", common::describe(&out));
    let echoed = format!("serial-echo: {}", String::from_utf8_lossy(&input));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&echoed),
        "{}",
        common::describe(&out)
    );
}

#[test]
fn with_a_console_on_stdio_the_console_reads_stdin() {
    let out = run_with_stdin("con-echo:dev=0,count=5", &["--console", "stdio"], b"hello");
    assert!(out.status.success(), "{}", common::describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    // The kit reports on COM1 and echoes on the console; both are on stdout.
    assert!(text.contains("con-echo: hello"), "{text}");
    assert_eq!(text.matches("hello").count(), 2, "{text}");
}

/// Connects to a socket Veil is about to create (its file appears at bind, a moment before
/// it listens).
fn connect(path: &std::path::Path) -> UnixStream {
    common::wait_for(path);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match UnixStream::connect(path) {
            Ok(stream) => break stream,
            Err(e) if std::time::Instant::now() < deadline => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("cannot connect to {}: {e}", path.display()),
        }
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// Reads from `stream` until `needle` has arrived; returns everything read.
fn read_until(stream: &mut UnixStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = stream.read(&mut buf).expect("output arrives");
        assert!(
            n > 0,
            "closed before {needle:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[test]
fn a_client_of_the_console_socket_types_and_sees_the_echo() {
    let dir = TempDir::new("console-socket");
    let socket = dir.path("console.sock");
    let mut vm = common::veil()
        .args(["run", "--memory", "32M", "--console"])
        .arg(format!("unix:{}", socket.display()))
        .arg("--kernel")
        .arg(common::kit())
        .args([
            "--cmdline",
            "con-echo:dev=0,count=4 con-write:dev=0,text=done",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    let mut client = connect(&socket);
    // Typed before the guest is listening: Veil keeps it until the driver takes it (one
    // task: a driver reset between tasks would drop what it had been given).
    client.write_all(b"ping").unwrap();
    let seen = read_until(&mut client, "done\n");
    assert!(seen.contains("pingdone"), "{seen}");
    assert!(vm.wait().success());
    let mut serial = String::new();
    vm.0.stdout
        .take()
        .unwrap()
        .read_to_string(&mut serial)
        .unwrap();
    assert!(serial.contains("con-echo: ping"), "{serial}");
}

#[test]
fn a_client_of_the_serial_socket_types_into_com1() {
    let dir = TempDir::new("serial-socket");
    let socket = dir.path("serial.sock");
    let mut vm = common::veil()
        .args(["run", "--memory", "32M", "--serial"])
        .arg(format!("unix:{}", socket.display()))
        .arg("--kernel")
        .arg(common::kit())
        .args(["--cmdline", "greet serial-echo:count=3"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    let mut client = connect(&socket);
    let mut seen = read_until(&mut client, "Hello");
    client.write_all(b"xyz").unwrap();
    seen += &read_until(&mut client, "xyz\n");
    assert!(seen.contains("serial-echo: xyz"), "{seen}");
    assert!(vm.wait().success());
}

#[test]
fn a_bad_console_is_refused_with_the_reason() {
    let out = common::run_kit("greet", &["--console", "tty"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not a console"),
        "{}",
        common::describe(&out)
    );
}

#[test]
fn an_sev_guests_console_runs_through_its_shared_pages() {
    let dir = TempDir::new("console-sev");
    let state = dir.path("sev");
    let out = run_with_stdin(
        "con-echo:dev=0,count=6 con-write:dev=0,text=private-ok",
        &[
            "--console",
            "stdio",
            "--sev",
            "--sev-platform",
            "emulated",
            "--sev-state-dir",
            state.to_str().unwrap(),
        ],
        b"secret",
    );
    assert!(out.status.success(), "{}", common::describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("con-echo: secret"), "{text}");
    assert!(text.contains("private-ok"), "{text}");
}
