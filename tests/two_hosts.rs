//! Two hosts on one machine: two network namespaces joined by a veth pair, a `veil` in each,
//! and a guest migrating over TCP between them. Needs root (skipped, with the reason, without).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Two namespaces, A (10.77.0.1) and B (10.77.0.2), removed when dropped.
struct TwoHosts {
    a: String,
    b: String,
    /// The veth end in A.
    va: String,
}

/// Tests in one process each get their own pair of hosts.
static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TwoHosts {
    fn new() -> Self {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id());
        let (a, b) = (format!("veil-a-{id}"), format!("veil-b-{id}"));
        // Interface names are at most 15 bytes.
        let (va, vb) = (format!("va{id}"), format!("vb{id}"));
        let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        let hosts = Self {
            a: a.clone(),
            b: b.clone(),
            va: va.to_string(),
        };
        ip(&["link", "add", va, "type", "veth", "peer", "name", vb]);
        ip(&["link", "set", va, "netns", &a]);
        ip(&["link", "set", vb, "netns", &b]);
        ip(&["-n", &a, "addr", "add", "10.77.0.1/24", "dev", va]);
        ip(&["-n", &b, "addr", "add", "10.77.0.2/24", "dev", vb]);
        for (ns, dev) in [(&a, va), (&b, vb)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        hosts
    }

    /// `veil ARGS` inside namespace `ns`.
    fn veil(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_veil")])
            .args(args);
        c
    }

    fn link_down(&self) {
        ip(&["-n", &self.a, "link", "set", &self.va, "down"]);
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth pair, and with it the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

fn root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn spinning_guest(hosts: &TwoHosts, api: &Path) -> common::Spawned {
    let kit = common::kit().to_str().unwrap().to_string();
    let mut source = hosts
        .veil(
            &hosts.a,
            &[
                "run",
                "--memory",
                "32M",
                "--api-socket",
                api.to_str().unwrap(),
                "--cmdline",
                "greet spin",
                "--kernel",
                &kit,
            ],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    common::read_until(source.0.stdout.as_mut().unwrap(), "Hello");
    wait_for(api);
    source
}

#[test]
fn a_guest_migrates_from_one_host_to_another_over_tcp() {
    if !root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let hosts = TwoHosts::new();
    let dir = common::TempDir::new("two-hosts");
    let (source_api, target_api) = (dir.path("a.sock"), dir.path("b.sock"));
    let mut target = hosts
        .veil(
            &hosts.b,
            &[
                "receive",
                "--listen",
                "tcp:10.77.0.2:47000",
                "--insecure",
                "--serial",
                "null",
                "--api-socket",
                target_api.to_str().unwrap(),
            ],
        )
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    let mut source = spinning_guest(&hosts, &source_api);
    // The target needs a moment to listen; retry the first connection briefly.
    let deadline = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = common::ctl(
            &source_api,
            &["migrate", "--to", "tcp:10.77.0.2:47000", "--insecure"],
        );
        if out.status.success() || Instant::now() > deadline {
            break out;
        }
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("Cannot connect"),
            "{}",
            common::describe(&out)
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(source.wait().success(), "the source host's veil lets go");
    wait_for(&target_api);
    let status: serde_json::Value =
        serde_json::from_slice(&common::ctl(&target_api, &["--json", "status"]).stdout).unwrap();
    assert_eq!(status["state"], "running");
    common::ctl(&target_api, &["shutdown"]);
    target.wait();
}

#[test]
fn with_the_link_down_the_guest_stays_on_its_host() {
    if !root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let hosts = TwoHosts::new();
    let dir = common::TempDir::new("two-hosts-down");
    let source_api = dir.path("a.sock");
    let mut source = spinning_guest(&hosts, &source_api);
    hosts.link_down();
    let out = common::ctl(
        &source_api,
        &["migrate", "--to", "tcp:10.77.0.2:47001", "--insecure"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Cannot connect to tcp:10.77.0.2:47001"),
        "{}",
        common::describe(&out)
    );
    let status: serde_json::Value =
        serde_json::from_slice(&common::ctl(&source_api, &["--json", "status"]).stdout).unwrap();
    assert_eq!(status["state"], "running");
    common::ctl(&source_api, &["shutdown"]);
    source.wait();
}
