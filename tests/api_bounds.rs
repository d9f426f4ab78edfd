//! The control API holds out against clients that pile up, idle or trickle: a bounded number
//! served at once (each on a thread of its own), the rest told so, and none kept forever.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

const MAX_CLIENTS: usize = 16;

fn threads_of(pid: u32) -> usize {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Reads what the server says until it closes the connection (or 20 s pass).
fn until_closed(stream: &mut UnixStream) -> (String, Duration) {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut text = Vec::new();
    let _ = stream.read_to_end(&mut text);
    (
        String::from_utf8_lossy(&text).into_owned(),
        started.elapsed(),
    )
}

/// Waits until `pid` serves no API client: a client that has gone still holds its place until
/// its thread has read the end of its connection, which on a loaded host can take a while.
fn wait_until_no_client_is_served(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let serving = || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
            .any(|name| name.trim() == "api-client")
    };
    while serving() {
        assert!(Instant::now() < deadline, "an API client is never let go");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn the_api_serves_a_bounded_number_of_clients_and_drops_idle_and_trickling_ones() {
    let dir = common::TempDir::new("api-bounds");
    let api = dir.path("a.sock");
    let vmm = common::veil()
        .args(["run", "--memory", "16M", "--serial", "null", "--api-socket"])
        .arg(&api)
        .args(["--cmdline", "spin", "--kernel"])
        .arg(common::kit())
        // Long enough that the idle clients below still hold every place while the extra ones
        // are turned away, even on a host loaded by the rest of the suite (6 s was not).
        .env("VEIL_TEST_API_REQUEST_TIMEOUT_MS", "12000")
        .spawn()
        .map(common::Spawned)
        .unwrap();
    common::wait_for(&api);
    assert!(common::ctl(&api, &["status"]).status.success());
    // Otherwise the status client's place may still be taken when the idle ones come, and
    // one of them be turned away, its place freed for an extra one a moment later.
    wait_until_no_client_is_served(vmm.0.id());
    let idle_threads = threads_of(vmm.0.id());

    // Clients that connect and say nothing fill every place.
    let mut idle: Vec<UnixStream> = (0..MAX_CLIENTS)
        .map(|_| UnixStream::connect(&api).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // More are each told why and closed, and cost no thread. A few: each waits for its
    // answer, and on a loaded host many would outlast the idle clients' time.
    let idle_since = Instant::now();
    for _ in 0..4 {
        let mut extra = UnixStream::connect(&api).unwrap();
        let (said, took) = until_closed(&mut extra);
        assert!(
            said.contains("\"ok\":false") && said.contains("16 API clients already"),
            "{said:?} after {took:?}, {:?} after the idle clients came",
            idle_since.elapsed()
        );
    }
    let busy = common::ctl(&api, &["status"]);
    assert!(!busy.status.success());
    assert!(
        String::from_utf8_lossy(&busy.stderr).contains("API clients already"),
        "{}",
        common::describe(&busy)
    );
    let threads = threads_of(vmm.0.id());
    assert!(
        threads <= idle_threads + MAX_CLIENTS,
        "{threads} threads, {idle_threads} before"
    );

    // The idle ones are dropped once their time for a request is up, and the API serves again.
    for stream in &mut idle {
        let (said, after) = until_closed(stream);
        assert!(said.is_empty(), "{said}");
        assert!(after < Duration::from_secs(20), "{after:?}");
    }
    let mut reader = BufReader::new(UnixStream::connect(&api).unwrap());
    reader
        .get_mut()
        .write_all(b"{\"command\":\"status\"}\n")
        .unwrap();
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");
    // A client that answers within its time keeps its connection for the next request.
    reader
        .get_mut()
        .write_all(b"{\"command\":\"status\"}\n")
        .unwrap();
    line.clear();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("\"ok\":true"), "{line}");

    // A client trickling a byte every 300 ms (each read well within the time) is cut off
    // when the whole line's time is up.
    let mut trickle = UnixStream::connect(&api).unwrap();
    let started = Instant::now();
    for byte in b"{\"command\":\"status\"".iter().cycle() {
        if trickle.write_all(std::slice::from_ref(byte)).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(
            started.elapsed() < Duration::from_secs(24),
            "a trickling client is never cut off"
        );
    }
    assert!(started.elapsed() >= Duration::from_secs(12));
    assert!(common::ctl(&api, &["shutdown"]).status.success());
    let mut vmm = vmm;
    vmm.wait();
}
