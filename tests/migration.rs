//! Live migration of a plain guest that keeps dirtying memory, over a socket, in one process:
//! pre-copy, stop-and-copy, the target takes over and the source lets go.

mod common;

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use veil::{CapturedOutput, RunState, VmBuilder, VmStop};
use veil_guest_abi::page_stamp;
use veil_migration::receiver;
use veil_migration::sender::{self, SendError, SendOptions};
use vm_memory::{Bytes, GuestAddress};

const FIRST: u64 = 0x800;
const PAGES: u64 = 256;

fn dirtying_guest(memory: u64) -> (veil::Vm, CapturedOutput) {
    let out = CapturedOutput::new();
    let vm = VmBuilder::new()
        .kernel(common::kit())
        .cmdline(format!(
            "uart-scratch:value=0x5a dirty-loop:seed=3,first={FIRST:#x},count={PAGES}"
        ))
        .memory_bytes(memory)
        .serial_writer(out.clone())
        .start()
        .unwrap();
    assert!(out.wait_for("stamping", Duration::from_secs(20)));
    (vm, out)
}

fn word(memory: &veil_hypervisor::GuestMemory, gfn: u64) -> u64 {
    memory.read_obj(GuestAddress(gfn << 12)).unwrap()
}

/// Every page of the `dirtying_guest` holds its stamp, and the guest, running on, stamps
/// again a page the host wiped.
fn assert_stamped_and_restamping(memory: &veil_hypervisor::GuestMemory) {
    common::assert_guest_restamps(memory, 3, FIRST + 17);
    for gfn in FIRST..FIRST + PAGES {
        assert_eq!(word(memory, gfn), page_stamp(3, gfn), "gfn {gfn:#x}");
    }
}

#[test]
fn a_dirtying_guest_migrates_and_keeps_running_on_the_target() {
    let (source, _) = dirtying_guest(64 << 20);
    // Host data the guest never touches must arrive too.
    source
        .memory()
        .write_obj(0x1234_5678u64, GuestAddress(0x3000 << 12))
        .unwrap();
    let (mut to_target, from_source) = UnixStream::pair().unwrap();

    let report = std::thread::scope(|scope| {
        let sending = scope.spawn(|| {
            sender::send(
                source.inner(),
                &mut to_target,
                &SendOptions::default(),
                None,
            )
        });
        let mut incoming = receiver::accept(
            from_source,
            |shape| {
                (shape.vcpus() == 1)
                    .then_some(())
                    .ok_or_else(|| "one vCPU only here".to_string())
            },
            None,
        )
        .unwrap();
        let target = veil::migration::receive(
            &mut incoming,
            VmBuilder::new().serial_writer(std::io::sink()),
            None,
        )
        .unwrap();
        // The UART the guest set up came along (its scratch register is not a default).
        let serial = target.inner().snapshot().unwrap().serial.unwrap();
        assert_eq!(serial.registers.scratch, 0x5a, "{serial:?}");
        assert_eq!(target.resume(), RunState::Running);
        let report = sending.join().unwrap().expect("migration succeeds");

        // The source has let go; the guest runs on the target: a wiped stamp comes back there.
        assert_eq!(source.wait(), VmStop::Migrated);
        assert_eq!(word(target.memory(), 0x3000), 0x1234_5678);
        assert_stamped_and_restamping(target.memory());
        target.stop();
        target.wait();
        report
    });
    eprintln!("{report:?}");
    // 64 MiB of mostly zero RAM went as zero pages; the guest's pages went more than once.
    assert!(report.zero_pages > 15_000, "{report:?}");
    assert!(
        report.bytes < 8 << 20,
        "zero pages must cost almost nothing: {report:?}"
    );
    assert!(report.downtime < Duration::from_secs(2), "{report:?}");
}

/// Over three connections the pages are dealt out by 2 MiB block: a word the host wrote in
/// every block arrives, and so do the pages the guest keeps re-dirtying (each block always on
/// the same stream, so a later copy never loses to an earlier one).
#[test]
fn a_dirtying_guest_migrates_over_three_connections_with_every_block_intact() {
    use veil_migration::transport::{self, Endpoint, Security};
    let memory = 64u64 << 20;
    let (source, _) = dirtying_guest(memory);
    let blocks = memory >> 21;
    let marked = |block: u64| 0xb10c_0000_0000 | block;
    // The last page of each block: above the guest's own pages in block 0 too.
    let page_of = |block: u64| block * 512 + 511;
    for block in 0..blocks {
        source
            .memory()
            .write_obj(marked(block), GuestAddress(page_of(block) << 12))
            .unwrap();
    }
    let dir = common::TempDir::new("three-streams");
    let endpoint = Endpoint::Unix(dir.path("m.sock"));
    let listener = transport::listen(&endpoint, &Security::default()).unwrap();
    let options = SendOptions {
        connections: 3,
        ..SendOptions::default()
    };

    let report = std::thread::scope(|scope| {
        let sending = scope.spawn(|| {
            sender::send_when_ready(
                source.inner(),
                || transport::connect(&endpoint, &Security::default()),
                &options,
                None,
            )
        });
        let mut incoming =
            receiver::accept_from(&listener, receiver::HELLO_TIMEOUT, |_| Ok(()), None).unwrap();
        assert_eq!(incoming.connections(), 3);
        let target = veil::migration::receive(
            &mut incoming,
            VmBuilder::new().serial_writer(std::io::sink()),
            None,
        )
        .unwrap();
        assert_eq!(target.resume(), RunState::Running);
        let report = sending.join().unwrap().expect("migration succeeds");
        assert_eq!(source.wait(), VmStop::Migrated);
        for block in 0..blocks {
            assert_eq!(
                word(target.memory(), page_of(block)),
                marked(block),
                "block {block}"
            );
        }
        assert_stamped_and_restamping(target.memory());
        target.stop();
        target.wait();
        report
    });
    eprintln!("{report:?}");
    assert_eq!(report.connections, 3, "{report:?}");
    assert_eq!(report.pages_sent - report.pages_resent, memory >> 12);
}

/// A further connection that cannot be opened ends the migration before any page has gone:
/// the source says why and its guest runs on; the target, left short of a stream, ends at
/// once with the source's reason, and discards the guest.
#[test]
fn a_connection_that_cannot_be_opened_leaves_the_guest_running_on_the_source() {
    use veil_migration::transport::{self, Endpoint, Security, TransportError};
    let (source, _) = dirtying_guest(64 << 20);
    let dir = common::TempDir::new("stream-refused");
    let endpoint = Endpoint::Unix(dir.path("m.sock"));
    let listener = transport::listen(&endpoint, &Security::default()).unwrap();
    let options = SendOptions {
        connections: 2,
        ..SendOptions::default()
    };
    let mut opened = 0;
    let connect = || {
        opened += 1;
        if opened == 1 {
            transport::connect(&endpoint, &Security::default())
        } else {
            Err(TransportError::Connect(
                endpoint.to_string(),
                std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
            ))
        }
    };
    // Long enough that only the source's own closing can end the target's wait in time.
    let hello_timeout = Duration::from_secs(30);
    let started = std::time::Instant::now();
    let (sent, received) = std::thread::scope(|scope| {
        let sending =
            scope.spawn(|| sender::send_when_ready(source.inner(), connect, &options, None));
        let received = receiver::accept_from(&listener, hello_timeout, |_| Ok(()), None).map(drop);
        (sending.join().unwrap(), received)
    });
    let target_waited = started.elapsed();
    let sent = sent.expect_err("one connection of two cannot make the migration");
    assert!(matches!(sent, SendError::Connect(_)), "{sent:?}");
    assert!(
        veil_migration::error_chain(&sent).contains("connection refused"),
        "{}",
        veil_migration::error_chain(&sent)
    );
    let received = received.expect_err("the target never got its second stream");
    // The target gives up when the source does, with the source's reason, rather than
    // waiting out the time a second connection had to arrive.
    let reason = veil::error_chain(&received);
    assert!(
        reason.contains("The source ended the migration") && reason.contains("connection refused"),
        "{reason}"
    );
    assert!(target_waited < Duration::from_secs(10), "{target_waited:?}");
    // The guest runs on here, as before: a wiped stamp comes back.
    assert_eq!(source.state(), RunState::Running);
    common::assert_guest_restamps(source.memory(), 3, FIRST + 5);
    source.stop();
    source.wait();
}

/// Pages of `path` in the page cache: what reading its holes through a mapping would fill.
fn resident_pages(path: &std::path::Path) -> usize {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: a fresh read-only shared mapping of an open file, unmapped below; nothing reads
    // through it.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    let mut pages = vec![0u8; len.div_ceil(4096)];
    // SAFETY: `map` is a mapping of `len` bytes and `pages` has a byte for each of its pages.
    let ok = unsafe { libc::mincore(map, len, pages.as_mut_ptr()) };
    // SAFETY: `map` was mapped above with this length and is not used after.
    unsafe { libc::munmap(map, len) };
    assert_eq!(ok, 0);
    pages.iter().filter(|&&p| p & 1 != 0).count()
}

/// A guest whose RAM is a sparse file moves without its holes being read: they go as zero
/// pages, and the source's page cache (its resident memory) does not fill with zeroes.
#[test]
fn a_sparse_memory_file_migrates_without_reading_its_holes() {
    let dir = common::TempDir::new("sparse-source");
    let ram = dir.path("ram");
    std::fs::File::create(&ram)
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    let out = CapturedOutput::new();
    let source = VmBuilder::new()
        .kernel(common::kit())
        .cmdline("greet spin")
        .memory_bytes(1 << 30)
        .memory_file(&ram)
        .serial_writer(out.clone())
        .start()
        .unwrap();
    assert!(out.wait_for("Hello", Duration::from_secs(20)));
    // What booting the guest brought in (its image, tables and boot data: about 16 MiB).
    let resident_before = resident_pages(&ram);
    // Host data in the middle of a hole arrives as data.
    source
        .memory()
        .write_obj(0x1234_5678u64, GuestAddress(0x30000 << 12))
        .unwrap();
    let (mut to_target, from_source) = UnixStream::pair().unwrap();
    let report = std::thread::scope(|scope| {
        let sending = scope.spawn(|| {
            veil::migration::send_over(&source, &mut to_target, &SendOptions::default(), vec![])
        });
        let mut incoming = receiver::accept(from_source, |_| Ok(()), None).unwrap();
        let target = veil::migration::receive(
            &mut incoming,
            VmBuilder::new().serial_writer(std::io::sink()),
            None,
        )
        .unwrap();
        let report = sending.join().unwrap().expect("migration succeeds");
        assert_eq!(word(target.memory(), 0x30000), 0x1234_5678);
        target.stop();
        target.wait();
        report
    });
    assert_eq!(source.wait(), VmStop::Migrated);
    let resident = resident_pages(&ram);
    eprintln!("{report:?}; {resident} pages of the file resident, {resident_before} before");
    assert!(report.zero_pages > 250_000, "{report:?}");
    // Reading the holes would bring in all 262,144 pages; reading the data (with the kernel's
    // readahead around it) brings in a few thousand.
    assert!(
        resident < resident_before + 16384,
        "{resident} pages of the 1 GiB file resident after the migration, {resident_before} \
         before: the holes were read"
    );
}

#[test]
fn a_refused_guest_keeps_running_on_the_source_and_the_reason_comes_back() {
    let (source, _) = dirtying_guest(32 << 20);
    let (mut to_target, from_source) = UnixStream::pair().unwrap();
    let err = std::thread::scope(|scope| {
        let sending = scope.spawn(|| {
            sender::send(
                source.inner(),
                &mut to_target,
                &SendOptions::default(),
                None,
            )
        });
        let refused = receiver::accept(from_source, |_| Err("not enough memory here".into()), None);
        assert!(refused.is_err());
        sending.join().unwrap().unwrap_err()
    });
    assert!(
        matches!(&err, SendError::Refused(r) if r == "not enough memory here"),
        "{err}"
    );
    assert_eq!(source.state(), RunState::Running);
    // Still running: a wiped stamp comes back on the source.
    common::assert_guest_restamps(source.memory(), 3, FIRST + 3);
    source.stop();
    source.wait();
}

#[test]
fn a_target_that_dies_mid_migration_leaves_the_guest_running_on_the_source() {
    let (source, _) = dirtying_guest(32 << 20);
    let (mut to_target, from_source) = UnixStream::pair().unwrap();
    let err = std::thread::scope(|scope| {
        let sending = scope.spawn(|| {
            sender::send(
                source.inner(),
                &mut to_target,
                &SendOptions::default(),
                None,
            )
        });
        let incoming = receiver::accept(from_source, |_| Ok(()), None).unwrap();
        // The target goes away after the handshake, in the middle of the first pass.
        drop(incoming);
        sending.join().unwrap().unwrap_err()
    });
    eprintln!("{err}");
    assert_eq!(source.state(), RunState::Running);
    common::assert_guest_restamps(source.memory(), 3, FIRST + 5);
    source.stop();
    source.wait();
}

/// A target whose memory file lives on a filesystem too small for the guest (a 4 MiB tmpfs,
/// in a mount namespace of its own) fails with the reason, the source is told it and keeps
/// the guest; before, the target died of SIGBUS mid-copy and the source saw the link drop.
#[test]
fn a_target_whose_memory_file_cannot_grow_says_so_and_the_guest_stays() {
    let dir = common::TempDir::new("migration-full-fs");
    let small = dir.path("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounts = std::process::Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=4m tmpfs {}",
            small.display()
        ))
        .output();
    if !mounts.is_ok_and(|out| out.status.success()) {
        println!("skipped: cannot mount a tmpfs in a mount namespace of its own here (needs root)");
        return;
    }
    let socket = dir.path("m.sock");
    let target = std::process::Command::new("unshare")
        .args(["--mount", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=4m tmpfs {small} && exec {veil} receive --listen unix:{socket} --memory-file {small}/ram",
            small = small.display(),
            veil = env!("CARGO_BIN_EXE_veil"),
            socket = socket.display(),
        ))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    common::wait_for(&socket);
    let (source, _) = dirtying_guest(32 << 20);
    let mut to_target = UnixStream::connect(&socket).unwrap();
    let err = sender::send(
        source.inner(),
        &mut to_target,
        &SendOptions::default(),
        None,
    )
    .unwrap_err();
    let said = veil_migration::error_chain(&err);
    let out = target.wait_with_output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("Cannot back guest pages"),
        "{said}; target: {:?} {log}",
        out.status
    );
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(log.contains("memory file's filesystem is full"), "{log}");
    assert_eq!(source.state(), RunState::Running);
    common::assert_guest_restamps(source.memory(), 3, FIRST + 3);
    source.stop();
    source.wait();
}

#[test]
fn veil_ctl_migrates_a_guest_from_one_veil_to_another() {
    use std::process::Stdio;
    let dir = common::TempDir::new("cli-migrate");
    let (source_api, target_api, target_socket) =
        (dir.path("a.sock"), dir.path("b.sock"), dir.path("m.sock"));
    let mut target = common::receive_on(
        &target_socket,
        &["--api-socket".as_ref(), target_api.as_ref()],
    );
    let mut source = common::veil()
        .args(["run", "--memory", "32M", "--api-socket"])
        .arg(&source_api)
        .args(["--cmdline", "greet spin", "--kernel"])
        .arg(common::kit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    common::read_until(source.0.stdout.as_mut().unwrap(), "Hello");

    // On a terminal (`script` gives it one) `veil ctl migrate` draws its progress bar.
    let command = format!(
        "{} ctl --api-socket {} migrate --to unix:{}",
        env!("CARGO_BIN_EXE_veil"),
        source_api.display(),
        target_socket.display()
    );
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("script (util-linux) runs");
    assert!(out.status.success(), "{}", common::describe(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("| sent ") && shown.contains("/s | dirtying ") && shown.contains("ETA"),
        "no progress bar: {shown}"
    );
    assert!(
        shown.contains("migrated to unix:") && shown.contains("downtime"),
        "{shown}"
    );

    let status = source.wait();
    assert!(
        status.success(),
        "the source exits 0 once its guest runs elsewhere"
    );
    let mut err = String::new();
    std::io::Read::read_to_string(source.0.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("the guest migrated to another host"), "{err}");

    common::wait_for(&target_api);
    let status: serde_json::Value =
        serde_json::from_slice(&common::ctl(&target_api, &["--json", "status"]).stdout).unwrap();
    assert_eq!(status["state"], "running");
    assert_eq!(status["memory_bytes"], 32 << 20);
    common::ctl(&target_api, &["shutdown"]);
    target.wait();

    // TCP without TLS is refused unless --insecure says otherwise.
    let out = common::veil()
        .args(["receive", "--listen", "tcp:127.0.0.1:45999"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("TCP needs mutual TLS"),
        "{}",
        common::describe(&out)
    );
}

/// A target that fails, says why and then neither reads nor hangs up (a wedged process, a
/// target busy cleaning up) must not hold the source for its 30 s peer timeout: the source
/// hears it within a chunk and its guest runs on.
#[test]
fn a_target_that_fails_but_keeps_the_connection_open_stops_the_source_at_once() {
    use veil_migration::protocol::{read_frame, write_frame, Message};
    let dir = common::TempDir::new("wedged-target");
    let (source_api, target_socket, ram) =
        (dir.path("a.sock"), dir.path("m.sock"), dir.path("ram"));
    // 64 MiB of non-zero RAM (low 4 MiB zero for the kernel): far more than a socket holds.
    let mut bytes = vec![0xa5u8; 64 << 20];
    bytes[..4 << 20].fill(0);
    std::fs::write(&ram, bytes).unwrap();
    let listener = std::os::unix::net::UnixListener::bind(&target_socket).unwrap();
    let mut source = common::greeting_source(
        &source_api,
        &[
            "--memory".as_ref(),
            "64M".as_ref(),
            "--memory-file".as_ref(),
            ram.as_ref(),
        ],
    );
    let (release, held) = std::sync::mpsc::channel::<()>();
    let target = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let incoming = receiver::accept(stream, |_| Ok(()), None).unwrap();
        let mut stream = incoming.stream();
        for _ in 0..3 {
            read_frame(&mut stream).unwrap();
        }
        write_frame(&mut stream, &Message::error("the target's disk is full")).unwrap();
        // Connection open, nothing read, until the test is done.
        let _ = held.recv_timeout(Duration::from_secs(60));
    });
    let started = Instant::now();
    let to = format!("unix:{}", target_socket.display());
    let out = common::ctl(&source_api, &["migrate", "--to", &to]);
    let took = started.elapsed();
    release.send(()).unwrap();
    target.join().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", common::describe(&out));
    assert!(said.contains("the target's disk is full"), "{said}");
    // Without reading while sending, the source waits out its 30 s peer timeout (63 s in
    // all); here it takes under a second on a quiet host, a few on a loaded one.
    assert!(took < Duration::from_secs(15), "took {took:?}: {said}");
    let status: serde_json::Value =
        serde_json::from_slice(&common::ctl(&source_api, &["--json", "status"]).stdout).unwrap();
    assert_eq!(status["state"], "running", "{status}");
    common::ctl(&source_api, &["shutdown"]);
    source.wait();
}

#[test]
fn a_target_that_cannot_build_the_vm_tells_the_source_why_with_every_cause() {
    use std::process::Stdio;
    let dir = common::TempDir::new("target-cause");
    let (source_api, target_socket) = (dir.path("a.sock"), dir.path("m.sock"));
    // The target cannot create guest RAM in a folder that does not exist.
    let missing = dir.path("no-such-folder/ram");
    let mut target = common::receive_on(
        &target_socket,
        &["--memory-file".as_ref(), missing.as_ref()],
    );
    let mut source = common::veil()
        .args(["run", "--memory", "32M", "--api-socket"])
        .arg(&source_api)
        .args(["--cmdline", "greet spin", "--kernel"])
        .arg(common::kit())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    common::read_until(source.0.stdout.as_mut().unwrap(), "Hello");

    let to = format!("unix:{}", target_socket.display());
    let out = common::ctl(&source_api, &["migrate", "--to", &to]);
    assert!(!out.status.success(), "{}", common::describe(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    // The target's error and its causes, down to the operating system's, reach the source.
    assert!(
        said.contains("The target ended the migration")
            && said.contains(&format!("Cannot use {} as guest memory", missing.display()))
            && said.contains("No such file or directory"),
        "{said}"
    );
    assert_eq!(common::status(&source_api)["state"], "running");
    common::ctl(&source_api, &["shutdown"]);
    source.wait();
    target.wait();
}

fn plain_guest(cmdline: &str) -> veil::Vm {
    let out = CapturedOutput::new();
    let vm = VmBuilder::new()
        .kernel(common::kit())
        .cmdline(cmdline)
        .memory_bytes(32 << 20)
        .serial_writer(out.clone())
        .start()
        .unwrap();
    assert!(out.wait_for("Hello", Duration::from_secs(20)));
    vm
}

/// Tries to migrate `vm` to a target that accepts anything.
fn try_migrate(vm: &veil::Vm, options: &SendOptions) -> Result<(), SendError> {
    let (to_target, from_source) = UnixStream::pair().unwrap();
    std::thread::scope(|scope| {
        // A target that accepts and would receive, if the source ever sent.
        scope.spawn(move || {
            if let Ok(mut incoming) = receiver::accept(from_source, |_| Ok(()), None) {
                let memory = common::scratch_ram(incoming.shape().ram_bytes());
                let _ = incoming.receive_into(memory.memory(), None);
            }
        });
        let mut to_target = to_target;
        let result = sender::send(vm.inner(), &mut to_target, options, None).map(drop);
        // Hang up, so the target stops waiting for a Hello that will not come.
        drop(to_target);
        result
    })
}

#[test]
fn a_temporarily_blocked_guest_is_refused_with_since_when_or_waited_for() {
    let vm = plain_guest("msr-write:value=0 greet spin");
    let err = try_migrate(&vm, &SendOptions::default()).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("The guest is temporarily blocked since 20"),
        "{err}"
    );
    assert!(err.to_string().contains("KVM_MIGRATION_READY"), "{err}");
    let started = Instant::now();
    let options = SendOptions {
        wait_ready: Some(Duration::from_millis(300)),
        ..Default::default()
    };
    let err = try_migrate(&vm, &options).unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(300), "it waited");
    assert!(matches!(err, SendError::TemporarilyBlocked { .. }), "{err}");
    assert_eq!(vm.state(), RunState::Running);
    vm.stop();
    vm.wait();
}

#[test]
fn a_permanently_blocked_guest_is_refused_at_once_even_when_waiting() {
    let vm = plain_guest("msr-write:value=0x0703 greet spin");
    let started = Instant::now();
    let options = SendOptions {
        wait_ready: Some(Duration::from_secs(30)),
        ..Default::default()
    };
    let err = try_migrate(&vm, &options).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "no waiting for a permanent block"
    );
    assert!(err.to_string().contains("permanently blocked"), "{err}");
    assert!(err.to_string().contains("reason code 7"), "{err}");
    assert_eq!(vm.state(), RunState::Running);
    vm.stop();
    vm.wait();
}

#[test]
fn a_guest_that_becomes_unmigratable_mid_way_stays_on_the_source() {
    let (source, _) = dirtying_guest(32 << 20);
    let (mut to_target, from_source) = UnixStream::pair().unwrap();
    let (err, target_saw) = std::thread::scope(|scope| {
        let sending = scope.spawn(|| {
            sender::send(
                source.inner(),
                &mut to_target,
                &SendOptions::default(),
                None,
            )
        });
        let mut incoming = receiver::accept(from_source, |_| Ok(()), None).unwrap();
        // The handshake is done and the first pass under way: now the guest clears READY
        // (as Linux does for a reboot), seen by Veil exactly as a guest write would be.
        source.inner().paravirt().with_blockers(|b| {
            b.block(
                veil_hypervisor::paravirt::BlockReason::GuestNotReady,
                Some(0),
            )
        });
        let memory = common::scratch_ram(32 << 20);
        let target_saw = incoming
            .receive_into(memory.memory(), None)
            .map(drop)
            .unwrap_err()
            .to_string();
        (sending.join().unwrap().unwrap_err(), target_saw)
    });
    assert!(matches!(err, SendError::BlockedDuringMigration(_)), "{err}");
    assert!(
        target_saw.contains("became unmigratable"),
        "the target learns why: {target_saw}"
    );
    assert_eq!(source.state(), RunState::Running);
    common::assert_guest_restamps(source.memory(), 3, FIRST + 9);
    source.stop();
    source.wait();
}

#[test]
fn a_cancelled_migration_leaves_the_guest_on_the_source_and_tells_the_target() {
    use veil_migration::monitor::{MigrationMonitor, Phase};
    let (source, _) = dirtying_guest(64 << 20);
    let monitor = std::sync::Arc::new(MigrationMonitor::new());
    let options = SendOptions {
        monitor: monitor.clone(),
        ..Default::default()
    };
    let (mut to_target, from_source) = UnixStream::pair().unwrap();
    let (err, target_saw) = std::thread::scope(|scope| {
        let sending = scope.spawn(|| sender::send(source.inner(), &mut to_target, &options, None));
        let mut incoming = receiver::accept(from_source, |_| Ok(()), None).unwrap();
        // Cancel as soon as the first pass is under way.
        let deadline = Instant::now() + Duration::from_secs(20);
        while monitor.progress().phase != Phase::FirstPass {
            assert!(Instant::now() < deadline);
            std::thread::yield_now();
        }
        assert!(monitor.cancel());
        let memory = common::scratch_ram(64 << 20);
        let target_saw = incoming
            .receive_into(memory.memory(), None)
            .map(drop)
            .unwrap_err()
            .to_string();
        (sending.join().unwrap().unwrap_err(), target_saw)
    });
    assert!(matches!(err, SendError::Cancelled), "{err}");
    assert!(
        target_saw.contains("cancelled by the operator"),
        "{target_saw}"
    );
    let progress = monitor.progress();
    assert_eq!(progress.phase, Phase::Failed);
    assert_eq!(
        progress.error.as_deref(),
        Some("The migration was cancelled")
    );
    assert!(!monitor.cancel(), "nothing left to cancel");
    assert_eq!(source.state(), RunState::Running);
    source.stop();
    source.wait();
}

/// A stream that keeps a copy of everything written through it.
struct Tee<'a> {
    inner: &'a mut UnixStream,
    copy: Vec<u8>,
}

impl std::io::Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

impl std::io::Write for Tee<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.copy.extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl veil_migration::duplex::Duplex for Tee<'_> {
    fn write_or_hear(&mut self, buf: &[u8]) -> std::io::Result<veil_migration::duplex::Written> {
        use veil_migration::duplex::Written;
        let written = self.inner.write_or_hear(buf)?;
        if written == Written::All {
            self.copy.extend_from_slice(buf);
        }
        Ok(written)
    }
}

/// Whether `word` (little-endian) appears anywhere in `bytes`.
fn contains(bytes: &[u8], word: u64) -> bool {
    memchr::memmem::find(bytes, &word.to_le_bytes()).is_some()
}

#[test]
fn an_sev_guest_migrates_between_emulated_platforms_without_leaking_private_pages() {
    use sev::parser::Encoder;
    use veil::sev_launch::open_platform;
    let dir = common::TempDir::new("sev-migrate");
    let (source_platform, target_platform) = common::emulated_platforms(&dir);
    let sev = common::emulated_sev;
    // Shares four pages and stamps them (seed 9), sets READY, then keeps stamping 64 private
    // pages (seed 3).
    let out = CapturedOutput::new();
    let source = VmBuilder::new()
        .kernel(common::kit())
        .cmdline(format!(
            "hypercall:gpa=0x900000,pages=4,attrs=0,expect=0 stamp:seed=9,first=0x900,count=4 \
             msr-write:value=1 dirty-loop:seed=3,first={FIRST:#x},count=64"
        ))
        .memory_bytes(16 << 20)
        .sev(sev(&source_platform))
        .serial_writer(out.clone())
        .start()
        .unwrap();
    assert!(out.wait_for("stamping", Duration::from_secs(20)));

    let target_chain = open_platform(&target_platform)
        .unwrap()
        .certificate_chain()
        .unwrap();
    let mut chain_bytes = Vec::new();
    target_chain.encode(&mut chain_bytes, ()).unwrap();
    let (mut to_target, from_source) = UnixStream::pair().unwrap();
    let mut tee = Tee {
        inner: &mut to_target,
        copy: Vec::new(),
    };
    let (target, report) = common::migrate_sev_here(
        &source,
        &mut tee,
        from_source,
        vec![target_chain.ca.ark],
        chain_bytes,
        &target_platform,
    );
    eprintln!("{report:?}");
    assert_eq!(source.wait(), VmStop::Migrated);
    // The guest carries on, its private pages intact, on the target.
    common::assert_guest_restamps(target.memory(), 3, FIRST + 17);
    for gfn in FIRST..FIRST + 64 {
        assert_eq!(word(target.memory(), gfn), page_stamp(3, gfn));
    }
    // The page-state map came along.
    let map = target.inner().paravirt().page_states();
    assert_eq!(map.as_ref().unwrap().shared_ranges(), vec![0x900..0x904]);
    drop(map);
    // No private page's plaintext crossed the wire; the shared pages did, in the clear.
    let wire = tee.copy;
    for gfn in FIRST..FIRST + 64 {
        assert!(
            !contains(&wire, page_stamp(3, gfn)),
            "private gfn {gfn:#x} leaked"
        );
    }
    for gfn in 0x900..0x904 {
        assert!(
            contains(&wire, page_stamp(9, gfn)),
            "shared gfn {gfn:#x} missing"
        );
    }
    target.stop();
    target.wait();
}

#[test]
fn an_sev_guest_is_not_sent_to_an_untrusted_platform() {
    use veil::sev_launch::{open_platform, SevConfig, SevPlatform};
    use veil_sev::policy::GuestPolicy;
    let dir = common::TempDir::new("sev-untrusted");
    let config = SevConfig {
        platform: SevPlatform::Emulated {
            state_dir: dir.path("source"),
        },
        policy: GuestPolicy(GuestPolicy::NODBG),
        owner_session: None,
        secret: None,
        secret_timeout: veil::sev_launch::DEFAULT_SECRET_TIMEOUT,
        measurement_out: None,
    };
    let out = CapturedOutput::new();
    let source = VmBuilder::new()
        .kernel(common::kit())
        .cmdline("msr-write:value=1 greet spin")
        .memory_bytes(32 << 20)
        .sev(config)
        .serial_writer(out.clone())
        .start()
        .unwrap();
    assert!(out.wait_for("Hello", Duration::from_secs(20)));
    let target = SevPlatform::Emulated {
        state_dir: dir.path("target"),
    };
    let mut chain = Vec::new();
    sev::parser::Encoder::encode(
        &open_platform(&target).unwrap().certificate_chain().unwrap(),
        &mut chain,
        (),
    )
    .unwrap();
    let (mut to_target, from_source) = UnixStream::pair().unwrap();
    let err = std::thread::scope(|scope| {
        let sending = scope.spawn(|| {
            // Only AMD's roots: an emulated platform is not among them.
            veil::migration::send_over(
                &source,
                &mut to_target,
                &SendOptions::default(),
                veil_sev::emulated::identity::amd_arks().unwrap(),
            )
        });
        let mut incoming = receiver::accept(from_source, |_| Ok(()), Some(chain)).unwrap();
        let memory = common::scratch_ram(32 << 20);
        let _ = incoming.receive_into(memory.memory(), None);
        sending.join().unwrap().unwrap_err()
    });
    assert!(matches!(err, SendError::UntrustedTarget(_)), "{err}");
    assert_eq!(source.state(), RunState::Running);
    source.stop();
    source.wait();
}

#[test]
fn veil_ctl_migrates_an_sev_guest_to_a_trusted_emulated_platform() {
    use std::process::Stdio;
    let dir = common::TempDir::new("cli-sev-migrate");
    let (source_api, target_api, target_socket) =
        (dir.path("a.sock"), dir.path("b.sock"), dir.path("m.sock"));
    let (source_state, target_state, chain) = (
        dir.path("source"),
        dir.path("target"),
        dir.path("target.chain"),
    );
    common::export_emulated_chain(&target_state, &chain);
    let mut target = common::receive_on(
        &target_socket,
        &[
            "--sev".as_ref(),
            "--sev-platform".as_ref(),
            "emulated".as_ref(),
            "--sev-state-dir".as_ref(),
            target_state.as_ref(),
            "--api-socket".as_ref(),
            target_api.as_ref(),
        ],
    );
    let mut source = common::veil()
        .args([
            "run",
            "--memory",
            "16M",
            "--sev",
            "--sev-platform",
            "emulated",
            "--sev-state-dir",
        ])
        .arg(&source_state)
        .arg("--api-socket")
        .arg(&source_api)
        .args(["--cmdline", "msr-write:value=1 greet spin", "--kernel"])
        .arg(common::kit())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    common::read_until(source.0.stdout.as_mut().unwrap(), "Hello");
    // The guest can greet before the API server has bound its socket.
    common::wait_for(&source_api);
    let to = format!("unix:{}", target_socket.display());
    // Without trusting the emulated target's root, the guest is not sent.
    let refused = common::ctl(&source_api, &["migrate", "--to", &to]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("not trusted"),
        "{}",
        common::describe(&refused)
    );
    // The target gave up on that attempt; start another one.
    target.wait();
    let mut target = common::receive_on(
        &target_socket,
        &[
            "--sev".as_ref(),
            "--sev-platform".as_ref(),
            "emulated".as_ref(),
            "--sev-state-dir".as_ref(),
            target_state.as_ref(),
            "--api-socket".as_ref(),
            target_api.as_ref(),
        ],
    );
    let out = common::ctl(
        &source_api,
        &[
            "migrate",
            "--to",
            &to,
            "--sev-trust-chain",
            chain.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(source.wait().success());
    common::wait_for(&target_api);
    let status: serde_json::Value =
        serde_json::from_slice(&common::ctl(&target_api, &["--json", "status"]).stdout).unwrap();
    assert_eq!(status["state"], "running");
    assert_eq!(status["sev"]["platform"], "emulated");
    assert!(
        status["sev"]["measurement"].is_null(),
        "measured where it was launched"
    );
    assert_eq!(
        status["migratability"]["state"], "migratable",
        "READY travelled with it"
    );
    common::ctl(&target_api, &["shutdown"]);
    target.wait();
}

#[test]
fn ctrl_c_on_veil_ctl_migrate_cancels_and_the_guest_stays() {
    use std::process::Stdio;
    let dir = common::TempDir::new("cli-cancel");
    let (source_api, target_socket) = (dir.path("a.sock"), dir.path("m.sock"));
    let mut target = common::receive_on(&target_socket, &[]);
    // The guest clears READY: a migration with --wait-ready waits for it, and is cancelled.
    let mut source = common::veil()
        .args(["run", "--memory", "16M", "--api-socket"])
        .arg(&source_api)
        .args(["--cmdline", "msr-write:value=0 greet spin", "--kernel"])
        .arg(common::kit())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    common::read_until(source.0.stdout.as_mut().unwrap(), "Hello");
    let migrating = common::veil()
        .arg("ctl")
        .arg("--api-socket")
        .arg(&source_api)
        .args(["migrate", "--wait-ready", "60s", "--to"])
        .arg(format!("unix:{}", target_socket.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let phase = || common::status(&source_api)["migration"]["phase"].clone();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while phase() != "waiting-for-ready" {
        assert!(std::time::Instant::now() < deadline, "{}", phase());
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill has no memory-safety preconditions; the pid is our own child's.
    unsafe { libc::kill(migrating.id() as i32, libc::SIGINT) };
    let out = migrating.wait_with_output().unwrap();
    assert!(!out.status.success(), "{}", common::describe(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("The migration was cancelled"), "{said}");
    let status = common::status(&source_api);
    assert_eq!(status["state"], "running");
    assert_eq!(status["migration"]["phase"], "failed");
    common::ctl(&source_api, &["shutdown"]);
    source.wait();
    // The source never connected while it waited: the target still waits for a guest.
    assert!(target.0.try_wait().unwrap().is_none());
}

#[test]
fn a_target_lacking_a_cpu_feature_the_guest_was_given_refuses_it() {
    use veil_migration::protocol::VmShape;
    let (source, _) = dirtying_guest(16 << 20);
    let shape = sender::shape_of(source.inner(), None).unwrap();
    // Sent from this very host: compatible.
    assert_eq!(veil::check_incoming(&shape), Ok(()));
    // The same guest, given one leaf-7 feature this host's KVM does not offer.
    let mut cpuid = shape.cpuid().to_vec();
    let leaf7 = cpuid
        .iter_mut()
        .find(|e| e.function == 7 && e.index == 0)
        .expect("the shape carries leaf 7");
    // The lowest bit this host leaves clear.
    let absent = !leaf7.ebx & leaf7.ebx.wrapping_add(1);
    assert_ne!(absent, 0, "this host offers every leaf-7 EBX feature");
    leaf7.ebx |= absent;
    let foreign = VmShape::new(shape.memory().to_vec(), shape.vcpus(), None, cpuid).unwrap();
    let refused = veil::check_incoming(&foreign).unwrap_err();
    assert!(
        refused.contains("this host's CPU lacks features the guest was given: leaf 0x7.0 Ebx"),
        "{refused}"
    );
    source.stop();
    source.wait();
}

/// The VmFlags of `pid`'s anonymous mappings of exactly `kib` KiB (guest RAM).
fn ram_vm_flags(pid: u32, kib: u64) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut flags = Vec::new();
    let (mut anonymous, mut size) = (false, 0);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's first line: address range, perms, offset, dev, inode, [path].
            anonymous = line.split_whitespace().count() == 5;
            size = 0;
        } else if let Some(kb) = line.strip_prefix("Size:") {
            size = kb.trim().trim_end_matches(" kB").parse().unwrap_or(0);
        } else if let Some(f) = line.strip_prefix("VmFlags:") {
            if anonymous && size == kib {
                flags.push(f.trim().to_string());
            }
        }
    }
    flags
}

#[test]
fn an_arriving_guest_asks_for_huge_pages_once_it_has_arrived_unless_told_not_to() {
    for (huge_pages, advised) in [("on", true), ("off", false)] {
        let dir = common::TempDir::new(&format!("arrival-thp-{huge_pages}"));
        let (source_api, target_api, socket) =
            (dir.path("a.sock"), dir.path("b.sock"), dir.path("m.sock"));
        let mut target = common::receive_on(
            &socket,
            &[
                "--huge-pages".as_ref(),
                huge_pages.as_ref(),
                "--api-socket".as_ref(),
                target_api.as_ref(),
            ],
        );
        let mut source =
            common::greeting_source(&source_api, &["--memory".as_ref(), "64M".as_ref()]);
        let to = format!("unix:{}", socket.display());
        let out = common::ctl(&source_api, &["migrate", "--no-progress", "--to", &to]);
        assert!(out.status.success(), "{}", common::describe(&out));
        assert!(source.wait().success());
        common::wait_for(&target_api);
        let flags = ram_vm_flags(target.0.id(), 64 << 10);
        assert_eq!(flags.len(), 1, "one 64 MiB RAM mapping: {flags:?}");
        // `hg`: madvised MADV_HUGEPAGE (fs/proc/task_mmu.c).
        assert_eq!(flags[0].split(' ').any(|f| f == "hg"), advised, "{flags:?}");
        common::ctl(&target_api, &["shutdown"]);
        target.wait();
    }
}
