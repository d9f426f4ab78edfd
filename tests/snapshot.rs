//! Snapshots: a running guest saved into a directory with `veil ctl snapshot`, its VMM killed,
//! and the guest started again from the directory (`veil restore`, `VmBuilder::restore`), once
//! or as several clones at once; each refusal says why and starts nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{veil, Spawned, TempDir};
use veil::{AfterSnapshot, CapturedOutput, VmBuilder, VmStop};
use veil_guest_abi::page_stamp;
use vm_memory::{Bytes, GuestAddress};

const FIRST: u64 = 0x800;
/// Stamps 64 pages forever, checking every round the stamps of the round before.
const CHECKING_GUEST: &str = "dirty-loop:seed=3,first=0x800,count=64,check=1";

fn wait_for_output(file: &Path, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never said {needle:?}: {text}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The round numbers of `dirty-loop: round N checked` lines.
fn rounds_checked(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| {
            l.strip_prefix("dirty-loop: round ")?
                .strip_suffix(" checked")
        })
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// `veil run` of the kit with `cmdline`, its COM1 in `serial`, its API on `api`.
fn run_kit(cmdline: &str, api: &Path, serial: &Path, extra: &[&str]) -> Spawned {
    let child = veil()
        .args(["run", "--memory", "32M", "--cmdline", cmdline])
        .arg("--kernel")
        .arg(common::kit())
        .arg("--api-socket")
        .arg(api)
        .arg("--serial")
        .arg(format!("file:{}", serial.display()))
        .args(extra)
        .stderr(Stdio::null())
        .spawn()
        .map(Spawned)
        .unwrap();
    common::wait_for(api);
    child
}

fn restore(from: &Path, serial: &Path) -> Command {
    let mut cmd = veil();
    cmd.arg("restore")
        .arg("--from")
        .arg(from)
        .arg("--serial")
        .arg(format!("file:{}", serial.display()));
    cmd
}

/// Waits until the guest in `serial` has checked its stamps in a round after `after`.
fn checks_after(serial: &Path, after: u64) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(serial).unwrap_or_default();
        assert!(!text.contains("FAILED"), "{text}");
        let rounds = rounds_checked(&text);
        if rounds.iter().any(|&r| r > after + 1) {
            return rounds;
        }
        assert!(
            Instant::now() < deadline,
            "no check after round {after}: {text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill(child: &mut Spawned) {
    child.0.kill().unwrap();
    child.0.wait().unwrap();
}

/// Saves the checking guest (RAM as `extra` says), kills its VMM, restores it, and checks that
/// it goes on checking the stamps it wrote before the snapshot.
fn saved_guest_continues(name: &str, extra: &[&str]) {
    let dir = TempDir::new(name);
    let (api, serial) = (dir.path("api.sock"), dir.path("source.out"));
    let mut source = run_kit(CHECKING_GUEST, &api, &serial, extra);
    wait_for_output(&serial, "round 4 checked");
    let snap = dir.path("snap");
    let out = common::ctl(&api, &["snapshot", "--to", snap.to_str().unwrap()]);
    assert!(out.status.success(), "{}", common::describe(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains("saved to"), "{said}");
    // Without --stop the guest runs on here until its VMM is killed.
    let before = rounds_checked(&std::fs::read_to_string(&serial).unwrap());
    checks_after(&serial, *before.last().unwrap());
    kill(&mut source);
    let mut names: Vec<String> = std::fs::read_dir(&snap)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["memory", "state"], "no temporary file is left");
    assert_eq!(
        std::fs::metadata(snap.join("memory")).unwrap().len(),
        32 << 20
    );

    let restored_out = dir.path("restored.out");
    let mut restored = restore(&snap, &restored_out)
        .stderr(Stdio::null())
        .spawn()
        .map(Spawned)
        .unwrap();
    // Its first round here checks the stamps of its last round before the snapshot.
    let rounds = checks_after(&restored_out, 0);
    assert!(
        rounds[0] > 4,
        "the restored guest carries on where it was, not from the start: {rounds:?}"
    );
    kill(&mut restored);
}

#[test]
fn a_saved_guest_with_anonymous_ram_continues_after_its_vmm_is_killed() {
    saved_guest_continues("snap-anon", &[]);
}

#[test]
fn a_saved_guest_with_file_backed_ram_continues_after_its_vmm_is_killed() {
    let dir = TempDir::new("snap-file-ram");
    let ram = dir.path("ram");
    saved_guest_continues("snap-file", &["--memory-file", ram.to_str().unwrap()]);
}

/// Saves the checking guest into `dir/snap` and stops it.
fn saved_guest(dir: &TempDir) -> PathBuf {
    let (api, serial) = (dir.path("api.sock"), dir.path("source.out"));
    let mut source = run_kit(CHECKING_GUEST, &api, &serial, &[]);
    wait_for_output(&serial, "round 2 checked");
    let snap = dir.path("snap");
    let out = common::ctl(
        &api,
        &["snapshot", "--to", snap.to_str().unwrap(), "--stop"],
    );
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("the VM stopped"),
        "{}",
        common::describe(&out)
    );
    // --stop ends the VM: `veil run` exits as if shut down.
    let status = source.wait();
    assert_eq!(status.code(), Some(130), "{status:?}");
    snap
}

#[test]
fn two_clones_of_one_snapshot_run_at_once_and_leave_its_files_as_they_were() {
    let dir = TempDir::new("snap-clones");
    let snap = saved_guest(&dir);
    let files = ["memory", "state"].map(|f| std::fs::read(snap.join(f)).unwrap());
    let outs = [dir.path("clone1.out"), dir.path("clone2.out")];
    let mut clones: Vec<Spawned> = outs
        .iter()
        .map(|out| {
            restore(&snap, out)
                .stderr(Stdio::null())
                .spawn()
                .map(Spawned)
                .unwrap()
        })
        .collect();
    for out in &outs {
        checks_after(out, 0);
    }
    for clone in &mut clones {
        assert!(clone.0.try_wait().unwrap().is_none(), "both clones run");
    }
    for clone in &mut clones {
        kill(clone);
    }
    for (name, before) in ["memory", "state"].iter().zip(&files) {
        assert!(
            std::fs::read(snap.join(name)).unwrap() == *before,
            "the clones wrote {name}"
        );
    }
}

#[test]
fn a_guest_with_a_disk_and_vsock_restores_with_its_own_disk_and_socket() {
    use std::io::{Read, Write};
    let dir = TempDir::new("snap-devices");
    let (api, serial) = (dir.path("api.sock"), dir.path("source.out"));
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.path("source.vsock");
    let bytes = 64 << 10;
    let cmdline = format!(
        "blk-write:dev=0,sector=0,count=16,seed=5 vsock-echo:dev=1,port=52,bytes={bytes} \
         blk-check:dev=0,sector=0,count=16,seed=5"
    );
    let mut source = run_kit(
        &cmdline,
        &api,
        &serial,
        &[
            "--disk",
            &format!("path={}", disk.display()),
            "--vsock",
            &format!("cid=3,socket={}", socket.display()),
        ],
    );
    wait_for_output(&serial, "listening");
    let snap = dir.path("snap");
    let out = common::ctl(
        &api,
        &["snapshot", "--to", snap.to_str().unwrap(), "--stop"],
    );
    assert!(out.status.success(), "{}", common::describe(&out));
    source.wait();
    // The clone's disk is a copy; the original is gone, so only the copy can serve it.
    let clone_disk = dir.path("clone.img");
    std::fs::rename(&disk, &clone_disk).unwrap();
    let clone_socket = dir.path("clone.vsock");
    let clone_out = dir.path("clone.out");
    let clone_api = dir.path("clone.sock");
    let mut clone = restore(&snap, &clone_out)
        .arg("--disk")
        .arg(format!("id=disk0,path={}", clone_disk.display()))
        .arg("--vsock-socket")
        .arg(&clone_socket)
        .args(["--vsock-cid", "7"])
        .arg("--api-socket")
        .arg(&clone_api)
        .stderr(Stdio::piped())
        .spawn()
        .map(Spawned)
        .unwrap();
    wait_for_output(&clone_out, "vsock: transport reset");
    common::wait_for(&clone_api);
    let status = common::status(&clone_api);
    assert_eq!(status["devices"][0]["path"], clone_disk.to_str().unwrap());
    assert_eq!(status["devices"][1]["guest_cid"], 7, "{status}");
    // The device refuses packets from any other CID: the echo below shows the guest took 7.
    let mut stream =
        veil_devices::virtio::vsock::connect_to_guest(&clone_socket, 52, Duration::from_secs(10))
            .expect("the clone's guest accepts on the clone's socket")
            .stream;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let mut reader = stream.try_clone().unwrap();
    let reading = std::thread::spawn(move || {
        let mut got = vec![0u8; bytes];
        reader.read_exact(&mut got).map(|_| got)
    });
    stream.write_all(&data).unwrap();
    assert!(reading.join().unwrap().unwrap() == data, "the echo differs");
    let status = clone.wait();
    let text = std::fs::read_to_string(&clone_out).unwrap();
    assert_eq!(status.code(), Some(0), "{text}");
    assert!(text.contains("blk-check ok: 16 sectors"), "{text}");
}

/// `veil restore` of `snap` fails, says `reason`, and starts no guest (its serial file is never
/// even created).
fn refused(snap: &Path, reason: &str) {
    let dir = TempDir::new("snap-refused-out");
    let out_file = dir.path("out");
    let out = restore(snap, &out_file).output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{}", common::describe(&out));
    assert!(said.contains(reason), "{}", common::describe(&out));
    assert!(!out_file.exists(), "a guest started");
}

/// A copy of the snapshot `snap` in `to`, with `change` applied to its state file's bytes.
fn damaged_copy(snap: &Path, to: &Path, change: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    std::fs::create_dir_all(to).unwrap();
    std::fs::copy(snap.join("memory"), to.join("memory")).unwrap();
    let mut state = std::fs::read(snap.join("state")).unwrap();
    change(&mut state);
    std::fs::write(to.join("state"), state).unwrap();
    to.to_owned()
}

#[test]
fn damaged_foreign_or_mismatched_snapshots_are_refused_with_the_reason() {
    use veil_migration::protocol::frame::encode_frame;
    use veil_migration::protocol::{FrameReader, Message, VmShape};
    use veil_migration::snapshot::file::{self, FileKind};
    let dir = TempDir::new("snap-refusals");
    let snap = saved_guest(&dir);

    let version = damaged_copy(&snap, &dir.path("version"), |s| s[8] = 9);
    refused(
        &version,
        "is in snapshot format version 9; this version of Veil reads version 2 only",
    );
    let truncated = damaged_copy(&snap, &dir.path("truncated"), |s| s.truncate(s.len() - 100));
    refused(&truncated, "is truncated");
    let corrupted = damaged_copy(&snap, &dir.path("corrupted"), |s| {
        let middle = s.len() / 2;
        s[middle] ^= 0x40;
    });
    refused(&corrupted, "is corrupted: its checksum is");
    let short = damaged_copy(&snap, &dir.path("short"), |_| {});
    std::fs::File::options()
        .write(true)
        .open(short.join("memory"))
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    refused(
        &short,
        "holds 16777216 bytes, but the guest has 33554432 bytes of RAM",
    );

    // The same guest, as if saved on a host whose CPU has a leaf-7 feature this one lacks.
    let foreign = damaged_copy(&snap, &dir.path("foreign"), |_| {});
    let payload = file::read(&foreign.join("state"), FileKind::State).unwrap();
    let mut input = payload.as_slice();
    let mut reader = FrameReader::new();
    let mut rewritten = Vec::new();
    while !input.is_empty() {
        let mut message = reader.read(&mut input).unwrap().decode().unwrap().message;
        if let Message::Hello(hello) = &mut message {
            let mut cpuid = hello.vm.cpuid().to_vec();
            let leaf7 = cpuid
                .iter_mut()
                .find(|e| e.function == 7 && e.index == 0)
                .unwrap();
            let absent = !leaf7.ebx & leaf7.ebx.wrapping_add(1);
            assert_ne!(absent, 0, "this host offers every leaf-7 EBX feature");
            leaf7.ebx |= absent;
            hello.vm = VmShape::new(hello.vm.memory().to_vec(), hello.vm.vcpus(), None, cpuid)
                .unwrap()
                .with_tsc_khz(hello.vm.tsc_khz());
        }
        rewritten.extend(encode_frame(&message).unwrap());
    }
    file::write(&foreign.join("state"), FileKind::State, &rewritten).unwrap();
    refused(
        &foreign,
        "this host's CPU lacks features the guest was given: leaf 0x7.0 Ebx",
    );

    // A plain snapshot asked to restore through SEV.
    let out = restore(&snap, &dir.path("sev.out"))
        .args(["--sev", "--sev-platform", "emulated", "--sev-state-dir"])
        .arg(dir.path("sev-state"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a guest without SEV"),
        "{}",
        common::describe(&out)
    );
}

#[test]
fn a_snapshot_never_goes_into_a_directory_that_holds_one_and_the_guest_runs_on() {
    let dir = TempDir::new("snap-exists");
    let (api, serial) = (dir.path("api.sock"), dir.path("source.out"));
    let mut source = run_kit(CHECKING_GUEST, &api, &serial, &[]);
    wait_for_output(&serial, "round 2 checked");
    let snap = dir.path("snap");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::write(snap.join("state"), b"someone else's").unwrap();
    let out = common::ctl(&api, &["snapshot", "--to", snap.to_str().unwrap()]);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("exists: a snapshot directory holds one snapshot"),
        "{said}"
    );
    assert_eq!(
        std::fs::read(snap.join("state")).unwrap(),
        b"someone else's"
    );
    assert_eq!(
        std::fs::read_dir(&snap).unwrap().count(),
        1,
        "nothing was added"
    );
    let status = common::status(&api);
    assert_eq!(status["state"], "running");
    let before = rounds_checked(&std::fs::read_to_string(&serial).unwrap());
    checks_after(&serial, *before.last().unwrap());
    kill(&mut source);
}

/// Waits until the guest behind `out` has checked its stamps twice more, and none failed.
fn keeps_checking(out: &CapturedOutput) {
    let seen = rounds_checked(&out.text()).len();
    let deadline = Instant::now() + Duration::from_secs(30);
    while rounds_checked(&out.text()).len() < seen + 2 {
        assert!(
            Instant::now() < deadline,
            "the guest stopped checking: {}",
            out.text()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!out.text().contains("FAILED"), "{}", out.text());
}

fn word(memory: &veil_hypervisor::GuestMemory, gfn: u64) -> u64 {
    memory.read_obj(GuestAddress(gfn << 12)).unwrap()
}

#[test]
fn a_library_restores_a_saved_guest_and_the_host_writes_stay_out_of_the_snapshot() {
    let dir = TempDir::new("snap-library");
    let out = CapturedOutput::new();
    let source = VmBuilder::new()
        .kernel(common::kit())
        .cmdline(CHECKING_GUEST)
        .memory_bytes(32 << 20)
        .serial_writer(out.clone())
        .start()
        .unwrap();
    assert!(out.wait_for("round 2 checked", Duration::from_secs(30)));
    let snap = dir.path("snap");
    let report = source.snapshot(&snap, AfterSnapshot::Stop, None).unwrap();
    assert_eq!(report.memory_bytes, 32 << 20);
    assert!(report.pages_written >= 64, "{report:?}");
    assert_eq!(source.wait(), VmStop::Requested);
    let memory_before = std::fs::read(snap.join("memory")).unwrap();

    let restored_out = CapturedOutput::new();
    let restored = VmBuilder::new()
        .serial_writer(restored_out.clone())
        .restore(&snap)
        .unwrap();
    for gfn in FIRST..FIRST + 64 {
        let stamp = word(restored.memory(), gfn);
        assert_eq!(stamp, page_stamp(3, gfn), "gfn {gfn:#x}");
    }
    // Host and guest writes land in the restored VM's own pages.
    restored
        .memory()
        .write_obj(0xfeed_u64, GuestAddress(0x1000 << 12))
        .unwrap();
    keeps_checking(&restored_out);
    restored.stop();
    restored.wait();
    assert!(
        std::fs::read(snap.join("memory")).unwrap() == memory_before,
        "the restored VM wrote the snapshot's memory file"
    );
}

/// No file of the snapshot in `snap` holds a private page's stamp (seed 3, 64 pages from
/// FIRST) in the clear; every shared page's stamp (seed 9, gfns 0x900..0x904) is there.
fn assert_no_private_plaintext(snap: &Path) {
    let mut everything = Vec::new();
    for entry in std::fs::read_dir(snap).unwrap() {
        everything.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    let contains = |word: u64| memchr::memmem::find(&everything, &word.to_le_bytes()).is_some();
    for gfn in FIRST..FIRST + 64 {
        assert!(!contains(page_stamp(3, gfn)), "private gfn {gfn:#x} leaked");
    }
    for gfn in 0x900..0x904 {
        assert!(contains(page_stamp(9, gfn)), "shared gfn {gfn:#x} missing");
    }
}

#[test]
fn an_sev_guest_is_saved_for_a_named_platform_without_private_plaintext_and_restored_there() {
    use veil::sev_launch::open_platform;
    let dir = TempDir::new("snap-sev");
    let (source_platform, target_platform) = common::emulated_platforms(&dir);
    let out = CapturedOutput::new();
    // Shares four pages and stamps them (seed 9), sets READY, then keeps stamping 64 private
    // pages (seed 3), checking them.
    let source = VmBuilder::new()
        .kernel(common::kit())
        .cmdline(format!(
            "hypercall:gpa=0x900000,pages=4,attrs=0,expect=0 stamp:seed=9,first=0x900,count=4 \
             msr-write:value=1 {CHECKING_GUEST}"
        ))
        .memory_bytes(16 << 20)
        .sev(common::emulated_sev(&source_platform))
        .serial_writer(out.clone())
        .start()
        .unwrap();
    assert!(out.wait_for("round 2 checked", Duration::from_secs(30)));
    let target_chain = open_platform(&target_platform)
        .unwrap()
        .certificate_chain()
        .unwrap();

    // For the target platform; the guest runs on here (SEND_CANCEL gave its context back).
    let snap = dir.path("snap");
    let report = source
        .snapshot(&snap, AfterSnapshot::Resume, Some(target_chain))
        .unwrap();
    assert!(report.private_pages >= 64, "{report:?}");
    keeps_checking(&out);
    let no_diff = source
        .diff_snapshot(dir.path("diff"), AfterSnapshot::Resume)
        .expect_err("an SEV guest's snapshot is never a diff");
    assert!(
        no_diff.to_string().contains("cannot be a diff"),
        "{no_diff}"
    );
    let not_live = source
        .live_snapshot(dir.path("live"), AfterSnapshot::Resume)
        .expect_err("an SEV guest's snapshot is never live");
    assert!(
        not_live.to_string().contains("cannot be live"),
        "{not_live}"
    );

    // No private page's plaintext is in the directory; the shared pages are, in the clear.
    assert_no_private_plaintext(&snap);

    // The source's own platform cannot receive what was encrypted for the target's.
    let err = VmBuilder::new()
        .serial_writer(std::io::sink())
        .sev(common::emulated_sev(&source_platform))
        .restore(&snap)
        .err()
        .expect("the wrong platform refuses");
    let said = veil::error_chain(&err);
    assert!(
        said.contains("This SEV platform cannot receive the snapshot"),
        "{said}"
    );
    // Without any platform named, neither.
    let err = VmBuilder::new()
        .serial_writer(std::io::sink())
        .restore(&snap)
        .err()
        .unwrap();
    assert!(veil::error_chain(&err).contains("name the SEV platform"));

    let restored_out = CapturedOutput::new();
    let restored = VmBuilder::new()
        .serial_writer(restored_out.clone())
        .sev(common::emulated_sev(&target_platform))
        .restore(&snap)
        .unwrap();
    for gfn in FIRST..FIRST + 64 {
        assert_eq!(
            word(restored.memory(), gfn),
            page_stamp(3, gfn),
            "gfn {gfn:#x}"
        );
    }
    keeps_checking(&restored_out);
    let map = restored.inner().paravirt().page_states();
    assert_eq!(map.as_ref().unwrap().shared_ranges(), vec![0x900..0x904]);
    drop(map);
    restored.stop();
    restored.wait();
    source.stop();
    source.wait();
}

#[test]
fn an_sev_guest_whose_policy_forbids_sending_is_not_saved() {
    use veil_sev::policy::GuestPolicy;
    let dir = TempDir::new("snap-nosend");
    let (platform, _) = common::emulated_platforms(&dir);
    let mut config = common::emulated_sev(&platform);
    config.policy = GuestPolicy(GuestPolicy::NODBG | GuestPolicy::NOSEND);
    let out = CapturedOutput::new();
    let vm = VmBuilder::new()
        .kernel(common::kit())
        .cmdline("msr-write:value=1 greet spin")
        .memory_bytes(16 << 20)
        .sev(config)
        .serial_writer(out.clone())
        .start()
        .unwrap();
    assert!(out.wait_for("Hello", Duration::from_secs(30)));
    let snap = dir.path("snap");
    let err = vm
        .snapshot(&snap, AfterSnapshot::Stop, None)
        .expect_err("NOSEND refuses");
    let said = veil::error_chain(&err);
    assert!(said.contains("permanently blocked"), "{said}");
    assert!(said.to_lowercase().contains("nosend"), "{said}");
    assert!(!snap.join("state").exists() && !snap.join("memory").exists());
    assert_eq!(vm.state(), veil::RunState::Running, "the guest runs on");
    vm.stop();
    vm.wait();
}

/// The operator's path for an SEV guest: `veil ctl snapshot --stop --sev-target-chain` for
/// another platform, then `veil restore --sev` on that platform (the source's own refuses).
#[test]
fn veil_ctl_snapshots_an_sev_guest_for_another_platform_and_veil_restore_runs_it_there() {
    let dir = TempDir::new("snap-sev-cli");
    let (source_state, target_state, chain) = (
        dir.path("source-sev"),
        dir.path("target-sev"),
        dir.path("target.chain"),
    );
    common::export_emulated_chain(&target_state, &chain);
    let (api, serial) = (dir.path("api.sock"), dir.path("source.out"));
    let cmdline = format!(
        "hypercall:gpa=0x900000,pages=4,attrs=0,expect=0 stamp:seed=9,first=0x900,count=4 \
         msr-write:value=1 {CHECKING_GUEST}"
    );
    let sev_on = |state: &Path| {
        [
            "--sev".to_string(),
            "--sev-platform".into(),
            "emulated".into(),
            "--sev-state-dir".into(),
            state.display().to_string(),
        ]
    };
    let source_sev = sev_on(&source_state);
    let source_args: Vec<&str> = source_sev.iter().map(String::as_str).collect();
    let mut source = run_kit(&cmdline, &api, &serial, &source_args);
    wait_for_output(&serial, "round 2 checked");
    let snap = dir.path("snap");
    let out = common::ctl(
        &api,
        &[
            "snapshot",
            "--to",
            snap.to_str().unwrap(),
            "--stop",
            "--sev-target-chain",
            chain.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", common::describe(&out));
    assert_eq!(source.wait().code(), Some(130));

    assert_no_private_plaintext(&snap);

    let wrong = restore(&snap, &dir.path("wrong.out"))
        .args(&source_sev)
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("cannot receive the snapshot"),
        "{}",
        common::describe(&wrong)
    );
    assert!(
        std::fs::read_to_string(dir.path("wrong.out"))
            .unwrap_or_default()
            .is_empty(),
        "a refused restore runs no guest"
    );

    let restored_out = dir.path("restored.out");
    let mut restored = restore(&snap, &restored_out)
        .args(sev_on(&target_state))
        .stderr(Stdio::null())
        .spawn()
        .map(Spawned)
        .unwrap();
    let rounds = checks_after(&restored_out, 0);
    assert!(rounds[0] > 2, "the guest carries on: {rounds:?}");
    kill(&mut restored);
}

/// The last round the guest in `serial` has checked so far.
fn last_round(serial: &Path) -> u64 {
    *rounds_checked(&std::fs::read_to_string(serial).unwrap())
        .last()
        .unwrap()
}

fn ctl_snapshot(api: &Path, to: &Path, extra: &[&str]) -> String {
    let mut args = vec!["snapshot", "--to", to.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = common::ctl(api, &args);
    assert!(out.status.success(), "{}", common::describe(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Bytes the file's blocks take on disk (its holes take none).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// 4 MiB the guest stamps once (seed 9, from gfn 0x1000), then the checking guest: most of
/// its RAM stays as the first snapshot saved it.
fn stamped_once_then_checking() -> String {
    format!("stamp:seed=9,first=0x1000,count=1024 {CHECKING_GUEST}")
}

/// The snapshot in `snap` restored by the library: the `stamped` pages the guest stamped
/// once (seed 9, from gfn 0x1000) are there, and the guest keeps checking its own.
fn restored_with_stamps(snap: &Path, stamped: u64) -> (veil::Vm, CapturedOutput) {
    let out = CapturedOutput::new();
    let restored = VmBuilder::new()
        .serial_writer(out.clone())
        .restore(snap)
        .unwrap();
    for gfn in 0x1000..0x1000 + stamped {
        assert_eq!(
            word(restored.memory(), gfn),
            page_stamp(9, gfn),
            "gfn {gfn:#x}"
        );
    }
    keeps_checking(&out);
    (restored, out)
}

/// A full snapshot, then two diffs of what the guest wrote since the one before; each diff
/// restores the guest as it was when that diff was taken (its first check there passes only
/// if every page it wrote since the full snapshot came back), and no snapshot file changes.
#[test]
fn a_chain_of_diff_snapshots_restores_the_guest_as_it_was_at_each_diff() {
    let dir = TempDir::new("snap-diff");
    let (api, serial) = (dir.path("api.sock"), dir.path("source.out"));
    let mut source = run_kit(&stamped_once_then_checking(), &api, &serial, &[]);
    wait_for_output(&serial, "round 2 checked");
    let (base, first, second) = (dir.path("base"), dir.path("diff1"), dir.path("diff2"));
    ctl_snapshot(&api, &base, &[]);
    checks_after(&serial, last_round(&serial));
    // The rounds the guest had checked just before and just after each diff: the guest
    // restored from it goes on from a round in between (its first whole line may be one
    // later: a line the source was printing at the snapshot ends on the clone's serial).
    let before_first = last_round(&serial);
    let said = ctl_snapshot(&api, &first, &["--diff"]);
    assert!(
        said.contains(&format!("a diff on top of {}", base.display())),
        "{said}"
    );
    let at_first = last_round(&serial);
    checks_after(&serial, at_first);
    let before_second = last_round(&serial);
    let said = ctl_snapshot(&api, &second, &["--diff", "--stop"]);
    assert!(
        said.contains("diff1"),
        "the second diff is of the first: {said}"
    );
    assert_eq!(source.wait().code(), Some(130));
    let at_second = last_round(&serial);

    // A diff holds the few pages the guest wrote, not its RAM.
    for diff in [&first, &second] {
        assert_eq!(
            std::fs::metadata(diff.join("memory")).unwrap().len(),
            32 << 20
        );
        assert!(
            allocated(&diff.join("memory")) * 4 < allocated(&base.join("memory")),
            "{} holds {} bytes, the full snapshot {}",
            diff.display(),
            allocated(&diff.join("memory")),
            allocated(&base.join("memory"))
        );
    }
    let every_file = || {
        [&base, &first, &second].map(|d| {
            let mut files: Vec<(std::ffi::OsString, Vec<u8>)> = std::fs::read_dir(d)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    (e.file_name(), std::fs::read(e.path()).unwrap())
                })
                .collect();
            files.sort();
            files
        })
    };
    let before = every_file();

    let (from_first, from_second) = (dir.path("first.out"), dir.path("second.out"));
    let mut clones = [(&first, &from_first), (&second, &from_second)].map(|(snap, out)| {
        restore(snap, out)
            .stderr(Stdio::null())
            .spawn()
            .map(Spawned)
            .unwrap()
    });
    let first_rounds = checks_after(&from_first, 0);
    let second_rounds = checks_after(&from_second, 0);
    assert!(
        first_rounds[0] > before_first && first_rounds[0] <= at_first + 2,
        "restored from the first diff, taken between rounds {before_first} and {at_first}: \
         {first_rounds:?}"
    );
    assert!(
        second_rounds[0] > before_second && second_rounds[0] <= at_second + 2,
        "restored from the second diff, taken between rounds {before_second} and \
         {at_second}: {second_rounds:?}"
    );
    for clone in &mut clones {
        kill(clone);
    }
    assert!(before == every_file(), "a restore wrote a snapshot file");
}

/// A diff needs a snapshot of the same VM that let the guest run on, still where it was and
/// as it was; otherwise it is refused with the reason and nothing is saved or started.
#[test]
fn a_diff_without_its_parent_as_it_was_is_refused_with_the_reason() {
    let dir = TempDir::new("snap-diff-refused");
    let (api, serial) = (dir.path("api.sock"), dir.path("source.out"));
    let mut source = run_kit(CHECKING_GUEST, &api, &serial, &[]);
    wait_for_output(&serial, "round 2 checked");
    let orphan = dir.path("orphan");
    let out = common::ctl(
        &api,
        &["snapshot", "--to", orphan.to_str().unwrap(), "--diff"],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("No earlier snapshot of this VM"),
        "{}",
        common::describe(&out)
    );
    assert!(!orphan.join("state").exists());

    let (base, diff) = (dir.path("base"), dir.path("diff"));
    ctl_snapshot(&api, &base, &[]);
    checks_after(&serial, last_round(&serial));
    ctl_snapshot(&api, &diff, &["--diff", "--stop"]);
    source.wait();

    let moved = dir.path("moved");
    std::fs::rename(&base, &moved).unwrap();
    refused(&diff, "The diff snapshot's parent");
    std::fs::rename(&moved, &base).unwrap();

    // The parent saved again, or replaced: its state file is not the one the diff was on.
    let state = base.join("state");
    let mut bytes = std::fs::read(&state).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&state, &bytes).unwrap();
    refused(&diff, "is not the snapshot it was taken on top of");

    // A diff made to name itself as its parent (a loop a file can hold) ends in a refusal,
    // not a restore that never ends.
    use veil_migration::snapshot::diff::state_digest;
    use veil_migration::snapshot::file::{self, FileKind};
    let diff_file = diff.join("diff");
    let payload = file::read(&diff_file, FileKind::Diff).unwrap();
    let old_path_len = usize::from(u16::from_le_bytes([payload[32], payload[33]]));
    let own = diff.to_str().unwrap().as_bytes();
    let mut looped = state_digest(&diff).unwrap().to_vec();
    looped.extend_from_slice(&(own.len() as u16).to_le_bytes());
    looped.extend_from_slice(own);
    looped.extend_from_slice(&payload[34 + old_path_len..]);
    std::fs::remove_file(&diff_file).unwrap();
    file::write(&diff_file, FileKind::Diff, &looped).unwrap();
    refused(&diff, "snapshots away from a full one");
}

/// The diff's record of where it stands is the dirty log: once anything else has taken the
/// log's bits (a migration does), a diff would miss the writes it took, so it is refused.
#[test]
fn a_diff_is_refused_once_something_else_has_used_the_dirty_log() {
    let dir = TempDir::new("snap-diff-stale");
    let out = CapturedOutput::new();
    let vm = VmBuilder::new()
        .kernel(common::kit())
        .cmdline(stamped_once_then_checking())
        .memory_bytes(32 << 20)
        .serial_writer(out.clone())
        .start()
        .unwrap();
    assert!(out.wait_for("round 2 checked", Duration::from_secs(30)));
    let report = vm
        .snapshot(dir.path("base"), AfterSnapshot::Resume, None)
        .unwrap();
    assert!(report.base.is_some(), "{report:?}");
    keeps_checking(&out);
    let before_diff = *rounds_checked(&out.text()).last().unwrap();
    let diff = vm
        .diff_snapshot(dir.path("diff"), AfterSnapshot::Resume)
        .unwrap();
    assert!(
        diff.dirty_pages >= 64 && diff.dirty_pages < report.pages_written / 4,
        "{diff:?} after {report:?}"
    );
    keeps_checking(&out);

    // Restored: the pages stamped once come from the full snapshot, the checked ones (and
    // every other page written since) from the diff.
    let (restored, restored_out) = restored_with_stamps(&dir.path("diff"), 1024);
    let rounds = rounds_checked(&restored_out.text());
    assert!(
        rounds[0] > before_diff,
        "the guest goes on from the diff, not from the full snapshot: {rounds:?}"
    );
    restored.stop();
    restored.wait();

    // As a migration's first pass does.
    vm.inner().ram().take_dirty_pages(vm.inner().fd()).unwrap();
    let err = vm
        .diff_snapshot(dir.path("stale"), AfterSnapshot::Resume)
        .expect_err("the log lost writes");
    assert!(
        err.to_string().contains("no longer holds every write"),
        "{err}"
    );
    assert!(!dir.path("stale").join("state").exists());
    keeps_checking(&out);
    // A full snapshot starts a new base.
    vm.snapshot(dir.path("again"), AfterSnapshot::Resume, None)
        .unwrap();
    vm.diff_snapshot(dir.path("diff2"), AfterSnapshot::Stop)
        .unwrap();
    vm.wait();
}

/// A live snapshot writes the memory while the guest runs and only what it wrote meanwhile
/// in the pause: restored, the guest goes on from the pause, every page as it was then.
#[test]
fn a_live_snapshot_restores_the_guest_as_it_was_at_the_pause() {
    let dir = TempDir::new("snap-live");
    let (api, serial) = (dir.path("api.sock"), dir.path("source.out"));
    let mut source = run_kit(&stamped_once_then_checking(), &api, &serial, &[]);
    wait_for_output(&serial, "round 2 checked");
    let snap = dir.path("snap");
    let before = last_round(&serial);
    let said = ctl_snapshot(&api, &snap, &["--live", "--stop"]);
    assert!(said.contains("written live"), "{said}");
    assert_eq!(source.wait().code(), Some(130));
    let at = last_round(&serial);

    let restored_out = dir.path("restored.out");
    let mut restored = restore(&snap, &restored_out)
        .stderr(Stdio::null())
        .spawn()
        .map(Spawned)
        .unwrap();
    let rounds = checks_after(&restored_out, 0);
    assert!(
        rounds[0] > before && rounds[0] <= at + 2,
        "saved between rounds {before} and {at}: {rounds:?}"
    );
    kill(&mut restored);
}

/// 64 MiB stamped once (seed 9, from gfn 0x1000), then the checking guest: a live
/// snapshot's first pass takes long enough for the guest to go through many rounds.
const LIVE_STAMPED: u64 = 16384;

/// From a program: the pages the guest stamped before the live snapshot are in it, and the
/// guest restored from it goes on from the pause, not from the first pass (its round counter
/// lives in a page it writes all the time: without the pass in the pause, the counter comes
/// back hundreds of rounds old).
#[test]
fn a_library_live_snapshot_holds_the_guest_as_it_was_at_the_pause() {
    let dir = TempDir::new("snap-live-lib");
    let out = CapturedOutput::new();
    let vm = VmBuilder::new()
        .kernel(common::kit())
        .cmdline(format!(
            "stamp:seed=9,first=0x1000,count={LIVE_STAMPED} {CHECKING_GUEST}"
        ))
        .memory_bytes(128 << 20)
        .serial_writer(out.clone())
        .start()
        .unwrap();
    assert!(out.wait_for("round 2 checked", Duration::from_secs(60)));
    let before = *rounds_checked(&out.text()).last().unwrap();
    let report = vm
        .live_snapshot(dir.path("live"), AfterSnapshot::Stop)
        .unwrap();
    vm.wait();
    let at = *rounds_checked(&out.text()).last().unwrap();
    eprintln!("{report:?}; the guest checked rounds {before} to {at} meanwhile");
    assert!(report.pages_written >= LIVE_STAMPED + 64, "{report:?}");
    assert!(report.dirty_pages >= 64, "{report:?}");
    assert!(
        report.diff_of.is_none() && report.base.is_none(),
        "{report:?}"
    );
    // The memory file is the guest's RAM as it was at the pause (the stopped VM's RAM has not
    // changed since): the pages the guest wrote during the first pass, its stack among them,
    // were written again.
    let file = std::fs::read(dir.path("live").join("memory")).unwrap();
    let mut page = vec![0u8; 4096];
    for (gfn, saved) in file.chunks(4096).enumerate() {
        vm.memory()
            .read_slice(&mut page, GuestAddress(gfn as u64 * 4096))
            .unwrap();
        assert!(
            page == saved,
            "gfn {gfn:#x} differs from the guest's at the pause"
        );
    }

    let (restored, restored_out) = restored_with_stamps(&dir.path("live"), LIVE_STAMPED);
    let rounds = rounds_checked(&restored_out.text());
    assert!(
        rounds[0] >= at && rounds[0] <= at + 2,
        "paused after round {at} (the snapshot began after round {before}): {rounds:?}"
    );
    restored.stop();
    restored.wait();
}
