//! A lost Complete, end to end: a relay between source and target drops one frame, and
//! `veil ctl migrate-recover` gets the guest running again in exactly one place.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use veil_migration::protocol::MessageType;

/// Relays one connection from `listen` to `target`, frame by frame, until a frame of type
/// `drop` comes by in either direction: it is not forwarded, and both connections are cut.
fn relay(listen: &Path, target: PathBuf, drop: MessageType) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        let (source, _) = listener.accept().unwrap();
        let target = UnixStream::connect(&target).unwrap();
        let pump = |mut from: UnixStream, mut to: UnixStream| {
            let (a, b) = (from.try_clone().unwrap(), to.try_clone().unwrap());
            std::thread::spawn(move || {
                let mut header = [0u8; 24];
                while from.read_exact(&mut header).is_ok() {
                    let kind = u16::from_le_bytes([header[6], header[7]]);
                    let len = u64::from_le_bytes(header[8..16].try_into().unwrap());
                    let mut payload = vec![0u8; len as usize];
                    if from.read_exact(&mut payload).is_err() {
                        break;
                    }
                    if kind == drop as u16 {
                        break;
                    }
                    if to.write_all(&header).is_err() || to.write_all(&payload).is_err() {
                        break;
                    }
                }
                let _ = a.shutdown(std::net::Shutdown::Both);
                let _ = b.shutdown(std::net::Shutdown::Both);
            })
        };
        let up = pump(source.try_clone().unwrap(), target.try_clone().unwrap());
        let down = pump(target, source);
        let _ = up.join();
        let _ = down.join();
    })
}

/// Lines of `path` that say the guest checked a round of its stamps.
fn rounds(path: &Path) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .matches("round")
        .count()
}

/// Waits until `path` shows more than `after` checked rounds: the guest runs (and found its
/// memory as it left it: a wrong stamp would have stopped it).
fn wait_for_rounds(path: &Path, after: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while rounds(path) <= after {
        assert!(
            Instant::now() < deadline,
            "the guest writing {} does not run",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct Hosts {
    dir: common::TempDir,
    source: common::Spawned,
    target: common::Spawned,
}

impl Hosts {
    fn path(&self, file: &str) -> PathBuf {
        self.dir.path(file)
    }

    fn start(name: &str) -> Self {
        let dir = common::TempDir::new(name);
        let target = common::veil()
            .arg("receive")
            .arg("--listen")
            .arg(format!("unix:{}", dir.path("m.sock").display()))
            .arg("--serial")
            .arg(format!("file:{}", dir.path("target.log").display()))
            .args(["--recovery-window", "60s", "--api-socket"])
            .arg(dir.path("b.sock"))
            .stderr(std::fs::File::create(dir.path("target.err")).unwrap())
            .spawn()
            .map(common::Spawned)
            .unwrap();
        common::wait_for(&dir.path("m.sock"));
        let source = common::veil()
            .args(["run", "--memory", "32M", "--api-socket"])
            .arg(dir.path("a.sock"))
            .arg("--serial")
            .arg(format!("file:{}", dir.path("source.log").display()))
            .args([
                "--cmdline",
                "dirty-loop:seed=7,first=0x800,count=64,check=20",
            ])
            .arg("--kernel")
            .arg(common::kit())
            .stderr(Stdio::null())
            .spawn()
            .map(common::Spawned)
            .unwrap();
        common::wait_for(&dir.path("a.sock"));
        let hosts = Self {
            dir,
            source,
            target,
        };
        wait_for_rounds(&hosts.path("source.log"), 0);
        hosts
    }

    fn ctl(&self, args: &[&str]) -> std::process::Output {
        common::ctl(&self.path("a.sock"), args)
    }

    /// Migrates through a relay that drops `drop`; the source is left in doubt.
    fn migrate_losing(&self, drop: MessageType) {
        let relay = relay(&self.path("relay.sock"), self.path("m.sock"), drop);
        let to = format!("unix:{}", self.path("relay.sock").display());
        let out = self.ctl(&["migrate", "--no-progress", "--to", &to]);
        relay.join().unwrap();
        let text = common::describe(&out);
        assert!(!out.status.success(), "{text}");
        assert!(
            text.contains("never confirmed that it runs the guest")
                && text.contains("migrate-recover"),
            "{text}"
        );
        let status = common::status(&self.path("a.sock"));
        assert_eq!(status["state"], "paused", "{status}");
        assert_eq!(status["migration"]["phase"], "in-doubt", "{status}");
        // Nobody can resume it by hand meanwhile, nor send it elsewhere.
        let out = self.ctl(&["resume"]);
        assert!(!out.status.success(), "{}", common::describe(&out));
        assert!(String::from_utf8_lossy(&out.stderr).contains("in doubt"));
        let out = self.ctl(&["migrate", "--no-progress", "--to", &to]);
        assert!(
            String::from_utf8_lossy(&out.stderr)
                .contains("is in doubt: run veil ctl migrate-recover"),
            "{}",
            common::describe(&out)
        );
    }

    fn recover(&self) -> std::process::Output {
        let to = format!("unix:{}", self.path("m.sock").display());
        self.ctl(&["migrate-recover", "--to", &to])
    }
}

/// Whether `path` holds `needle`, waiting up to 20 s for it.
fn eventually_contains(path: &Path, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if std::fs::read_to_string(path)
            .unwrap_or_default()
            .contains(needle)
        {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_lost_complete_is_recovered_and_the_guest_runs_again_only_on_the_source() {
    let mut hosts = Hosts::start("recover-lost-complete");
    hosts.migrate_losing(MessageType::Complete);

    // Stopped on both hosts: neither guest writes anything.
    let (source_rounds, target_rounds) = (
        rounds(&hosts.path("source.log")),
        rounds(&hosts.path("target.log")),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rounds(&hosts.path("source.log")), source_rounds);
    assert_eq!(rounds(&hosts.path("target.log")), 0);
    assert_eq!(target_rounds, 0);

    let out = hosts.recover();
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("runs here again"));
    // The guest runs on the source, checking its stamps every round: memory intact.
    wait_for_rounds(&hosts.path("source.log"), source_rounds);
    let status = common::status(&hosts.path("a.sock"));
    assert_eq!(status["state"], "running", "{status}");
    assert!(
        eventually_contains(&hosts.path("target.err"), "discarded"),
        "{}",
        std::fs::read_to_string(hosts.path("target.err")).unwrap_or_default()
    );
    // Asked again, the target gives the same answer; the guest still runs only here.
    let again = hosts.recover();
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("No migration of this guest is in doubt"),
        "{}",
        common::describe(&again)
    );
    assert_eq!(rounds(&hosts.path("target.log")), 0);
    assert!(
        !hosts.path("b.sock").exists(),
        "the target never served its guest"
    );
    assert!(
        hosts.source.0.try_wait().unwrap().is_none(),
        "the source runs on"
    );
    hosts.ctl(&["shutdown"]);
    hosts.source.wait();
    // The discarded target ends with an error once its window is over; no need to wait.
    let _ = hosts.target.0.kill();
}

#[test]
fn a_lost_running_leaves_the_guest_on_the_target_and_recovery_refuses() {
    let mut hosts = Hosts::start("recover-lost-running");
    hosts.migrate_losing(MessageType::Running);

    // The target got Complete and runs the guest.
    wait_for_rounds(&hosts.path("target.log"), 0);
    let source_rounds = rounds(&hosts.path("source.log"));
    let out = hosts.recover();
    let text = common::describe(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("The target runs the guest"), "{text}");
    let status = common::status(&hosts.path("a.sock"));
    assert_eq!(status["state"], "paused", "{status}");
    assert_eq!(status["migration"]["phase"], "in-doubt", "{status}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(rounds(&hosts.path("source.log")), source_rounds, "stopped");
    let target_rounds = rounds(&hosts.path("target.log"));
    wait_for_rounds(&hosts.path("target.log"), target_rounds);

    hosts.ctl(&["shutdown"]);
    hosts.source.wait();
    common::ctl(&hosts.path("b.sock"), &["shutdown"]);
    hosts.target.wait();
}
