//! A lost Complete, end to end: a relay between source and target drops one frame, and
//! `veil ctl migrate-recover` gets the guest running again in exactly one place.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use veil_migration::duplex::Duplex;
use veil_migration::protocol::MessageType;

/// Relays one connection from `listen` to `target`, frame by frame, until a frame of type
/// `drop` comes by in either direction: it is not forwarded, and both connections are cut.
fn relay(listen: &Path, target: PathBuf, drop: MessageType) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
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
        let connect = |source: UnixStream| {
            let target = UnixStream::connect(&target).unwrap();
            [
                pump(source.try_clone().unwrap(), target.try_clone().unwrap()),
                pump(target, source),
            ]
        };
        // The first connection is the migration's control stream; the source's further ones
        // (its data streams) are relayed too, until the control stream is over.
        let (control, _) = listener.accept().unwrap();
        let control = connect(control);
        listener.set_nonblocking(true).unwrap();
        let mut others = Vec::new();
        while !control.iter().all(|p| p.is_finished()) {
            match listener.accept() {
                Ok((source, _)) => {
                    source.set_nonblocking(false).unwrap();
                    others.extend(connect(source));
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(5)),
            }
        }
        for pump in control.into_iter().chain(others) {
            let _ = pump.join();
        }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Guest {
    Plain,
    /// On the emulated SEV platform, its private pages through the firmware.
    Sev,
}

/// What listens on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Receiver {
    /// `veil receive`: one guest, and it answers on its listener.
    Single,
    /// `veil receive --keep-listening`: each guest in a process of its own (its API socket
    /// `b-N.sock`), while another waits on the listener.
    Service,
}

struct Hosts {
    dir: common::TempDir,
    source: common::Spawned,
    target: common::Spawned,
    guest: Guest,
}

impl Hosts {
    fn path(&self, file: &str) -> PathBuf {
        self.dir.path(file)
    }

    fn start(name: &str) -> Self {
        Self::start_with(name, Guest::Plain, Receiver::Single)
    }

    fn start_with(name: &str, guest: Guest, receiver: Receiver) -> Self {
        let dir = common::TempDir::new(name);
        let sev_args = |state: &str| match guest {
            Guest::Plain => vec![],
            Guest::Sev => vec![
                "--sev".to_string(),
                "--sev-platform".into(),
                "emulated".into(),
                "--sev-state-dir".into(),
                dir.path(state).display().to_string(),
            ],
        };
        if guest == Guest::Sev {
            common::export_emulated_chain(&dir.path("target-sev"), &dir.path("target.chain"));
        }
        let target = common::veil()
            .arg("receive")
            .arg("--listen")
            .arg(format!("unix:{}", dir.path("m.sock").display()))
            .arg("--serial")
            .arg(format!("file:{}", dir.path("target.log").display()))
            .args(["--recovery-window", "60s", "--api-socket"])
            .arg(dir.path(match receiver {
                Receiver::Single => "b.sock",
                Receiver::Service => "b-{id}.sock",
            }))
            .args(match receiver {
                Receiver::Single => &[][..],
                Receiver::Service => &["--keep-listening"][..],
            })
            .args(sev_args("target-sev"))
            .stderr(std::fs::File::create(dir.path("target.err")).unwrap())
            .spawn()
            .map(common::Spawned)
            .unwrap();
        common::wait_for(&dir.path("m.sock"));
        // An SEV guest may only go once it has said it is ready (the migration-control MSR).
        let cmdline = match guest {
            Guest::Plain => "dirty-loop:seed=7,first=0x800,count=64,check=20",
            Guest::Sev => "msr-write:value=1 dirty-loop:seed=7,first=0x800,count=64,check=20",
        };
        let source = common::veil()
            .args(["run", "--memory", "32M", "--api-socket"])
            .arg(dir.path("a.sock"))
            .arg("--serial")
            .arg(format!("file:{}", dir.path("source.log").display()))
            .args(["--cmdline", cmdline])
            .arg("--kernel")
            .arg(common::kit())
            .args(sev_args("source-sev"))
            .stderr(Stdio::null())
            .spawn()
            .map(common::Spawned)
            .unwrap();
        common::wait_for(&dir.path("a.sock"));
        let hosts = Self {
            dir,
            source,
            target,
            guest,
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
        let chain = self.path("target.chain").display().to_string();
        let mut migrate = vec!["migrate", "--no-progress", "--to", &to];
        if self.guest == Guest::Sev {
            migrate.extend(["--sev-trust-chain", &chain]);
        }
        let out = self.ctl(&migrate);
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

    fn recover(&self, extra: &[&str]) -> std::process::Output {
        let to = format!("unix:{}", self.path("m.sock").display());
        self.ctl(&[&["migrate-recover", "--to", &to], extra].concat())
    }

    /// Neither guest writes anything for 2 s.
    fn assert_stopped_on_both(&self) -> (usize, usize) {
        let before = (
            rounds(&self.path("source.log")),
            rounds(&self.path("target.log")),
        );
        std::thread::sleep(Duration::from_secs(2));
        let after = (
            rounds(&self.path("source.log")),
            rounds(&self.path("target.log")),
        );
        assert_eq!(
            before, after,
            "a guest runs while the migration is in doubt"
        );
        after
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

    let (source_rounds, target_rounds) = hosts.assert_stopped_on_both();
    assert_eq!(target_rounds, 0);

    let out = hosts.recover(&[]);
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
    let again = hosts.recover(&[]);
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
    let out = hosts.recover(&[]);
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

    // Told the guest runs there, the source can finish the migration it began.
    let out = hosts.recover(&["--run-on", "target"]);
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("the target runs the guest"));
    assert!(hosts.source.wait().success(), "the source ends as migrated");
    assert_eq!(rounds(&hosts.path("source.log")), source_rounds);

    common::ctl(&hosts.path("b.sock"), &["shutdown"]);
    hosts.target.wait();
}

/// After `migrate-recover` settled that the target runs the guest: it checks its stamps
/// there, the source VMM has ended as after a migration, and the source guest ran no more.
fn assert_runs_on_the_target_only(hosts: &mut Hosts, source_rounds: usize) {
    wait_for_rounds(&hosts.path("target.log"), 0);
    assert!(hosts.source.wait().success(), "the source ends as migrated");
    assert_eq!(rounds(&hosts.path("source.log")), source_rounds);
    common::wait_for(&hosts.path("b.sock"));
    let status = common::status(&hosts.path("b.sock"));
    assert_eq!(status["state"], "running", "{status}");
    let target_rounds = rounds(&hosts.path("target.log"));
    wait_for_rounds(&hosts.path("target.log"), target_rounds);
    common::ctl(&hosts.path("b.sock"), &["shutdown"]);
    hosts.target.wait();
}

#[test]
fn a_lost_complete_can_be_settled_by_running_the_guest_on_the_target() {
    let mut hosts = Hosts::start("recover-on-target");
    hosts.migrate_losing(MessageType::Complete);
    let (source_rounds, _) = hosts.assert_stopped_on_both();

    let out = hosts.recover(&["--run-on", "target"]);
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("the target runs the guest"));
    assert_runs_on_the_target_only(&mut hosts, source_rounds);
}

#[test]
fn an_sev_guest_whose_complete_is_lost_runs_on_the_target_after_recovery() {
    let mut hosts = Hosts::start_with("recover-sev", Guest::Sev, Receiver::Single);
    hosts.migrate_losing(MessageType::Complete);
    let (source_rounds, target_rounds) = hosts.assert_stopped_on_both();
    assert_eq!(target_rounds, 0);

    // After SEND_FINISH the source cannot run it: asking to resume here is refused before
    // the target is asked (which would have discarded the only runnable copy).
    let out = hosts.recover(&["--run-on", "source"]);
    let text = common::describe(&out);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("cannot resume after SEND_FINISH"), "{text}");
    assert_eq!(
        common::status(&hosts.path("a.sock"))["migration"]["phase"],
        "in-doubt"
    );

    // By default an SEV guest is settled on the target.
    let out = hosts.recover(&[]);
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("the target runs the guest"));
    assert_runs_on_the_target_only(&mut hosts, source_rounds);
}

#[test]
fn under_keep_listening_a_lost_complete_is_settled_through_the_service() {
    let mut hosts = Hosts::start_with("recover-service", Guest::Plain, Receiver::Service);
    hosts.migrate_losing(MessageType::Complete);
    let (source_rounds, _) = hosts.assert_stopped_on_both();
    // Guest 1 arrived in a process of its own, which holds it paused (its API not up yet);
    // the process now on the listener knows no migration and passes the query on.
    assert!(!hosts.path("b-1.sock").exists());

    let out = hosts.recover(&["--run-on", "target"]);
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("the target runs the guest"));
    wait_for_rounds(&hosts.path("target.log"), 0);
    assert!(hosts.source.wait().success(), "the source ends as migrated");
    assert_eq!(rounds(&hosts.path("source.log")), source_rounds);
    common::wait_for(&hosts.path("b-1.sock"));
    let status = common::status(&hosts.path("b-1.sock"));
    assert_eq!(status["state"], "running", "{status}");
    assert!(
        eventually_contains(&hosts.path("target.err"), "asked about migration"),
        "{}",
        std::fs::read_to_string(hosts.path("target.err")).unwrap_or_default()
    );
    // The service still takes guests: the query did not end it.
    assert!(hosts.target.0.try_wait().unwrap().is_none());
    common::ctl(&hosts.path("b-1.sock"), &["shutdown"]);
    // The service ends on SIGTERM, its waiting child with it (PR_SET_PDEATHSIG), and leaves
    // no directory behind.
    let service = hosts.target.0.id() as i32;
    let dir = std::env::temp_dir().join(format!("veil-receive-{service}-0"));
    assert!(dir.exists());
    // SAFETY: kill has no memory-safety preconditions.
    unsafe { libc::kill(service, libc::SIGTERM) };
    hosts.target.wait();
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// A TLS link that drops the first Complete the sender writes through it and then cuts
/// itself, as a relay would, but above the TLS layer (a relay cannot read frames in it).
struct LosingComplete {
    inner: Option<veil_migration::transport::Stream>,
    /// Bytes written that do not make a whole frame yet.
    pending: Vec<u8>,
}

impl LosingComplete {
    fn link(&mut self) -> std::io::Result<&mut veil_migration::transport::Stream> {
        self.inner
            .as_mut()
            .ok_or_else(|| std::io::ErrorKind::BrokenPipe.into())
    }

    /// The whole frames in `pending`, taken out; cuts the link at a Complete.
    fn frames(&mut self) -> Vec<Vec<u8>> {
        let mut frames = Vec::new();
        while self.inner.is_some() && self.pending.len() >= 24 {
            let kind = u16::from_le_bytes([self.pending[6], self.pending[7]]);
            let len = u64::from_le_bytes(self.pending[8..16].try_into().unwrap()) as usize;
            if self.pending.len() < 24 + len {
                break;
            }
            let frame: Vec<u8> = self.pending.drain(..24 + len).collect();
            if kind == MessageType::Complete as u16 {
                self.inner = None;
                self.pending.clear();
            } else {
                frames.push(frame);
            }
        }
        frames
    }
}

impl Read for LosingComplete {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.link()?.read(buf)
    }
}

impl Write for LosingComplete {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_or_hear(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.link()?.flush()
    }
}

impl Duplex for LosingComplete {
    fn write_or_hear(&mut self, buf: &[u8]) -> std::io::Result<veil_migration::duplex::Written> {
        use veil_migration::duplex::Written;
        self.link()?;
        self.pending.extend_from_slice(buf);
        for frame in self.frames() {
            if self.link()?.write_or_hear(&frame)? == Written::PeerSpoke {
                return Ok(Written::PeerSpoke);
            }
        }
        Ok(Written::All)
    }
}

#[test]
fn over_mutual_tls_a_lost_complete_is_recovered_and_a_stranger_cannot_settle_it() {
    use common::tls::Ca;
    use veil_migration::recovery::{recover, RunOn};
    use veil_migration::transport::{self, Security};
    let dir = common::TempDir::new("recover-tls");
    let (site, rogue) = (Ca::new(&dir.0, "site"), Ca::new(&dir.0, "rogue"));
    let target_files = site.host(&dir.0, "target", &["127.0.0.1"]);
    let source_files = site.host(&dir.0, "source", &["source.example"]);
    let rogue_files = rogue.host_trusting(&dir.0, "rogue", &["rogue.example"], &site.pem);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint: transport::Endpoint = format!("tcp:127.0.0.1:{port}").parse().unwrap();
    let mut target = common::veil()
        .args(["receive", "--listen", &endpoint.to_string()])
        .arg("--tls-cert")
        .arg(&target_files.cert)
        .arg("--tls-key")
        .arg(&target_files.key)
        .arg("--tls-ca")
        .arg(&target_files.ca)
        .arg("--serial")
        .arg(format!("file:{}", dir.path("target.log").display()))
        .args(["--recovery-window", "60s"])
        .stderr(std::fs::File::create(dir.path("target.err")).unwrap())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    let capture = veil::CapturedOutput::new();
    let vm = veil::VmBuilder::new()
        .kernel(veil_guests::kit_elf_path())
        .cmdline("dirty-loop:seed=7,first=0x800,count=64,check=20")
        .memory_bytes(32 << 20)
        .serial_writer(capture.clone())
        .start()
        .unwrap();
    assert!(capture.wait_for("round", Duration::from_secs(60)));
    let connect = |files: &veil_migration::tls::TlsFiles| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match transport::connect(&endpoint, &Security::tls(files.clone())) {
                Ok(stream) => return Ok(stream),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    };
    let mut link = LosingComplete {
        inner: Some(connect(&source_files).unwrap()),
        pending: Vec::new(),
    };
    let options = veil_migration::sender::SendOptions {
        monitor: std::sync::Arc::clone(vm.migration()),
        ..Default::default()
    };
    let sent = veil::migration::send_over(&vm, &mut link, &options, vec![]);
    assert!(
        matches!(sent, Err(veil_migration::sender::SendError::InDoubt { .. })),
        "{sent:?}"
    );
    let text = capture.text();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(capture.text(), text, "stopped here");
    assert_eq!(rounds(&dir.path("target.log")), 0, "and there");

    // A peer with a certificate from another CA is turned away before it can ask.
    let stranger = recover(vm.inner(), vm.migration(), RunOn::Source, || {
        connect(&rogue_files)
    });
    // (Under TLS 1.3 the client hears of it at its first read.)
    let refused = veil::error_chain(&stranger.unwrap_err());
    assert!(
        refused.contains("refused this host's TLS certificate"),
        "{refused}"
    );
    assert!(vm.migration().in_doubt().is_some(), "still in doubt");

    let settled = recover(vm.inner(), vm.migration(), RunOn::Source, || {
        connect(&source_files)
    });
    assert_eq!(settled.unwrap(), RunOn::Source);
    // The guest runs here again, checking its stamps; the target discarded its copy.
    let rounds_before = capture.text().matches("round").count();
    let deadline = Instant::now() + Duration::from_secs(60);
    while capture.text().matches("round").count() <= rounds_before {
        assert!(Instant::now() < deadline, "the guest does not run again");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(eventually_contains(&dir.path("target.err"), "discarded"));
    assert_eq!(rounds(&dir.path("target.log")), 0);
    vm.stop();
    vm.wait();
    let _ = target.0.kill();
    target.wait();
}
