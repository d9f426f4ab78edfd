//! vsock: host programs and the guest talk through `--vsock cid=N,socket=PATH` (Firecracker's
//! host model), with the kit's polled driver on the guest side.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::TempDir;

/// A repeatable pattern of `len` bytes that no short period would hide.
fn pattern(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Sends `data` and reads as much back at once, on two threads (the guest echoes as it
/// reads, within its credit).
fn echo_through(stream: UnixStream, data: &[u8]) -> Vec<u8> {
    let mut reader = stream.try_clone().unwrap();
    reader
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let len = data.len();
    let reading = std::thread::spawn(move || {
        let mut got = vec![0u8; len];
        reader.read_exact(&mut got).map(|_| got)
    });
    let mut writer = stream;
    writer.write_all(data).unwrap();
    reading.join().unwrap().expect("the echo comes back")
}

#[test]
fn a_sandbox_program_echoes_4_mib_through_a_connection_it_opens_with_the_library() {
    let dir = TempDir::new("vsock-echo");
    let socket = dir.path("v.sock");
    let output = veil::CapturedOutput::new();
    let bytes = 4 << 20;
    let vm = veil::VmBuilder::new()
        .kernel(common::kit())
        .memory_bytes(64 << 20)
        .cmdline(format!("vsock-echo:dev=0,port=52,bytes={bytes}"))
        .vsock(veil::VsockConfig::new(3, &socket))
        .serial_writer(output.clone())
        .start()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !output.text().contains("listening") {
        assert!(Instant::now() < deadline, "{}", output.text());
        std::thread::sleep(Duration::from_millis(5));
    }
    let connection = vm.connect_vsock(52, Duration::from_secs(10)).unwrap();
    assert!(connection.host_port >= 1024);
    let data = pattern(bytes);
    assert!(
        echo_through(connection.stream, &data) == data,
        "the echo differs"
    );
    assert_eq!(vm.wait(), veil::VmStop::GuestExit(0), "{}", output.text());
    assert!(
        output.text().contains(&format!("echoed {bytes} bytes")),
        "{}",
        output.text()
    );
}

#[test]
fn a_guest_connection_reaches_the_listener_beside_the_socket_and_nothing_else() {
    let dir = TempDir::new("vsock-connect");
    let socket = dir.path("v.sock");
    let listener = UnixListener::bind(dir.path("v.sock_7000")).unwrap();
    let echoing = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut echoed = 0usize;
        let mut buf = vec![0u8; 65536];
        loop {
            match stream.read(&mut buf) {
                Ok(0) | Err(_) => break echoed,
                Ok(n) => {
                    stream.write_all(&buf[..n]).unwrap();
                    echoed += n;
                }
            }
        }
    });
    let spec = format!("cid=9,socket={}", socket.display());
    // Port 7001 has no listener: the guest is refused (RST), and says so.
    let out = common::run_kit(
        "vsock-connect:dev=0,port=7000,bytes=1048576",
        &["--memory", "64M", "--vsock", &spec],
    );
    assert!(out.status.success(), "{}", common::describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("sent and received 1048576 bytes, all as sent"),
        "{text}"
    );
    assert_eq!(echoing.join().unwrap(), 1 << 20);
    let out = common::run_kit(
        "vsock-connect:dev=0,port=7001,bytes=16",
        &["--memory", "64M", "--vsock", &spec],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("refused"),
        "{}",
        common::describe(&out)
    );
}

fn resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Connects to the guest's `port` through the device's socket.
fn connect(socket: &Path, port: u32) -> UnixStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match veil_devices::virtio::vsock::connect_to_guest(socket, port, Duration::from_secs(5)) {
            Ok(c) => return c.stream,
            Err(e) => {
                assert!(Instant::now() < deadline, "cannot reach the guest: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn a_guest_that_stops_reading_does_not_make_veil_buffer_what_the_host_sends() {
    let dir = TempDir::new("vsock-slow");
    let socket = dir.path("v.sock");
    let spec = format!("cid=3,socket={}", socket.display());
    let mut vm = common::veil()
        .args(["run", "--memory", "64M", "--vsock", &spec, "--kernel"])
        .arg(common::kit())
        .args(["--cmdline", "vsock-slow:dev=0,port=53"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    let pid = vm.0.id();
    let mut stdout = vm.0.stdout.take().unwrap();
    common::read_until(&mut stdout, "listening");
    let stream = connect(&socket, 53);
    let before = resident_kib(pid);
    // Offer 64 MiB: the guest takes its credit (128 KiB) and no more; what Veil holds for it
    // is bounded, and the rest stays with the host, which cannot write on.
    stream.set_nonblocking(true).unwrap();
    let chunk = vec![0xa5u8; 1 << 20];
    let mut accepted = 0usize;
    // Three seconds of trying is thousands of chances for Veil to take more than its bound.
    let deadline = Instant::now() + Duration::from_secs(3);
    while accepted < 64 << 20 && Instant::now() < deadline {
        match (&stream).write(&chunk) {
            Ok(n) => accepted += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => panic!("the connection broke: {e}"),
        }
    }
    common::read_until(&mut stdout, "stopped at its credit, 131072 bytes");
    let after = resident_kib(pid);
    assert!(
        accepted < 16 << 20,
        "the host could write {accepted} bytes into a connection nobody reads"
    );
    assert!(
        after.saturating_sub(before) < 4 << 10,
        "Veil grew from {before} KiB to {after} KiB"
    );
    let _ = vm.0.kill();
    vm.wait();
}

#[test]
fn an_sev_guests_vsock_runs_through_its_shared_pages() {
    let dir = TempDir::new("vsock-sev");
    let socket = dir.path("v.sock");
    let spec = format!("cid=3,socket={}", socket.display());
    let mut vm = common::veil()
        .args([
            "run",
            "--memory",
            "64M",
            "--sev",
            "--sev-platform",
            "emulated",
        ])
        .arg("--sev-state-dir")
        .arg(dir.path("sev"))
        .args(["--vsock", &spec, "--kernel"])
        .arg(common::kit())
        .args(["--cmdline", "vsock-echo:dev=0,port=52,bytes=262144"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    let mut stdout = vm.0.stdout.take().unwrap();
    common::read_until(&mut stdout, "listening");
    let data = pattern(256 << 10);
    assert!(echo_through(connect(&socket, 52), &data) == data);
    common::read_until(&mut stdout, "echoed 262144 bytes");
    assert!(vm.wait().success());
}

#[test]
fn bad_vsock_options_are_refused_with_the_reason() {
    for (spec, says) in [
        ("cid=2,socket=/tmp/x", "reserved"),
        ("cid=3", "needs cid=N,socket=PATH"),
        ("cid=x,socket=/tmp/x", "must be a number"),
    ] {
        let out = common::run_kit("greet", &["--vsock", spec]);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(says),
            "{spec}: {}",
            common::describe(&out)
        );
    }
}
