//! Disks: `veil run --disk` gives the guest virtio-blk devices, and the kit's polled driver
//! reads, writes, flushes and is refused exactly where a disk must refuse.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::{describe, run_kit, TempDir};
use veil_guest_abi::page_stamp;

const SECTOR: u64 = 512;

/// A disk of `sectors` sectors whose sector `s` starts with `page_stamp(seed, s)`, as the
/// kit's `blk-check` expects.
fn stamped_disk(path: &Path, sectors: u64, seed: u64) {
    let file = File::create(path).unwrap();
    file.set_len(sectors * SECTOR).unwrap();
    for s in 0..sectors {
        file.write_all_at(&page_stamp(seed, s).to_le_bytes(), s * SECTOR)
            .unwrap();
    }
}

fn first_word(path: &Path, sector: u64) -> u64 {
    let mut word = [0u8; 8];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut word, sector * SECTOR)
        .unwrap();
    u64::from_le_bytes(word)
}

#[test]
fn the_guest_reads_what_the_host_wrote_and_the_host_reads_what_the_guest_flushed() {
    let dir = TempDir::new("disk-rw");
    let disk = dir.path("disk.img");
    stamped_disk(&disk, 2048, 7);
    let spec = format!("path={},id=data", disk.display());
    let out = run_kit(
        "blk-id:dev=0 blk-check:dev=0,sector=0,count=256,seed=7 \
         blk-write:dev=0,sector=1000,count=40,seed=11",
        &["--memory", "64M", "--disk", &spec],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("blk-id: dev 0: \"data\", 2048 sectors"),
        "{text}"
    );
    assert!(
        text.contains("blk-check ok: 256 sectors from sector 0"),
        "{text}"
    );
    assert!(
        text.contains("blk-write ok: 40 sectors from sector 1000, flushed"),
        "{text}"
    );
    // The guest's writes are in the file, and nothing around them changed.
    for s in 1000..1040 {
        assert_eq!(first_word(&disk, s), page_stamp(11, s), "sector {s}");
    }
    assert_eq!(first_word(&disk, 999), page_stamp(7, 999));
    assert_eq!(first_word(&disk, 1040), page_stamp(7, 1040));
}

#[test]
fn a_read_only_disk_refuses_writes_and_stays_as_it_was_beside_a_writable_one() {
    let dir = TempDir::new("disk-ro");
    let (writable, read_only) = (dir.path("w.img"), dir.path("r.img"));
    stamped_disk(&writable, 1024, 3);
    stamped_disk(&read_only, 512, 5);
    let before = std::fs::read(&read_only).unwrap();
    let w = format!("path={}", writable.display());
    let r = format!("path={},readonly=on,id=ro", read_only.display());
    let out = run_kit(
        "blk-id:dev=1 blk-check:dev=1,sector=0,count=512,seed=5 blk-bad:dev=1,sector=0,write=1 \
         blk-check:dev=0,sector=0,count=64,seed=3 blk-write:dev=0,sector=10,count=1,seed=9",
        &["--memory", "64M", "--disk", &w, "--disk", &r],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"ro\", 512 sectors, read-only"), "{text}");
    assert!(
        text.contains("blk-bad ok: write at sector 0: status IOERR"),
        "{text}"
    );
    assert_eq!(
        std::fs::read(&read_only).unwrap(),
        before,
        "the read-only disk is untouched"
    );
    assert_eq!(first_word(&writable, 10), page_stamp(9, 10));
}

#[test]
fn a_request_beyond_the_end_of_the_disk_is_refused() {
    let dir = TempDir::new("disk-end");
    let disk = dir.path("disk.img");
    stamped_disk(&disk, 100, 1);
    let before = std::fs::read(&disk).unwrap();
    let spec = format!("path={}", disk.display());
    let out = run_kit(
        "blk-bad:dev=0 blk-bad:dev=0,sector=100,write=1 blk-check:dev=0,sector=99,count=1,seed=1",
        &["--memory", "64M", "--disk", &spec],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("blk-bad ok: read at sector 100: status IOERR"),
        "{text}"
    );
    assert!(
        text.contains("blk-bad ok: write at sector 100: status IOERR"),
        "{text}"
    );
    assert_eq!(std::fs::read(&disk).unwrap(), before);
}

#[test]
fn the_disk_raises_its_interrupt_on_its_own_irq() {
    let dir = TempDir::new("disk-irq");
    let (a, b) = (dir.path("a.img"), dir.path("b.img"));
    stamped_disk(&a, 64, 1);
    stamped_disk(&b, 64, 1);
    let (a, b) = (
        format!("path={}", a.display()),
        format!("path={}", b.display()),
    );
    // The second disk is on IRQ 6: its completion shows as vector 0x46 in the local APIC.
    let out = run_kit(
        "blk-irq:dev=1",
        &["--memory", "64M", "--disk", &a, "--disk", &b],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("blk-irq ok: dev 1: irq 6, vector 0x46 pending"),
        "{text}"
    );
}

#[test]
fn a_disk_another_veil_is_writing_is_refused_with_the_reason() {
    use std::process::Stdio;
    let dir = TempDir::new("disk-lock");
    let disk = dir.path("disk.img");
    stamped_disk(&disk, 64, 1);
    let spec = format!("path={}", disk.display());
    let mut first = common::veil()
        .args(["run", "--memory", "32M", "--disk", &spec, "--kernel"])
        .arg(common::kit())
        .args(["--cmdline", "greet spin"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    common::read_until(first.0.stdout.as_mut().unwrap(), "Hello");
    let out = run_kit("greet", &["--memory", "32M", "--disk", &spec]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("Cannot use {} as a disk", disk.display())) && err.contains("lock"),
        "{err}"
    );
    // Read-only users share the lock with each other, not with a writer.
    let ro = format!("path={},readonly=on", disk.display());
    let out = run_kit("greet", &["--memory", "32M", "--disk", &ro]);
    assert!(!out.status.success(), "{}", describe(&out));
    let _ = first.0.kill();
    first.wait();
}

#[test]
fn bad_disk_options_are_refused_before_anything_runs() {
    let dir = TempDir::new("disk-args");
    let missing = dir.path("missing.img");
    let spec = format!("path={}", missing.display());
    let out = run_kit("greet", &["--disk", &spec]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("Cannot use {} as a disk", missing.display()))
            && err.contains("No such file"),
        "{err}"
    );
    let out = run_kit("greet", &["--disk", "readonly=on"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("a disk needs path=FILE"));
    let disk = dir.path("d.img");
    stamped_disk(&disk, 8, 0);
    let twice = format!("path={},id=same", disk.display());
    let copy = dir.path("e.img");
    stamped_disk(&copy, 8, 0);
    let other = format!("path={},id=same", copy.display());
    let out = run_kit("greet", &["--disk", &twice, "--disk", &other]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Two disks have the id same"),
        "{}",
        describe(&out)
    );
}

#[test]
fn veil_ctl_status_lists_the_disks() {
    use std::process::Stdio;
    let dir = TempDir::new("disk-status");
    let disk = dir.path("disk.img");
    stamped_disk(&disk, 64, 1);
    let socket = dir.path("api.sock");
    let spec = format!("path={},readonly=on,id=boot", disk.display());
    let mut vm = common::veil()
        .args(["run", "--memory", "32M", "--disk", &spec, "--api-socket"])
        .arg(&socket)
        .arg("--kernel")
        .arg(common::kit())
        .args(["--cmdline", "blk-id:dev=0 spin"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    common::read_until(vm.0.stdout.as_mut().unwrap(), "blk-id");
    let status = common::status(&socket);
    let devices = status["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "{status}");
    assert_eq!(devices[0]["kind"], "virtio-blk");
    assert_eq!(devices[0]["name"], "boot");
    assert_eq!(devices[0]["mmio_base"], 0xd000_0000u64);
    assert_eq!(devices[0]["irq"], 5);
    assert_eq!(devices[0]["read_only"], true);
    assert_eq!(devices[0]["refused_accesses"], 0);
    let text = common::ctl(&socket, &["status"]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("device             virtio-blk boot at 0xd0000000 irq 5"),
        "{text}"
    );
    common::ctl(&socket, &["shutdown"]);
    vm.wait();
}

#[test]
fn an_sev_guests_disk_works_through_shared_pages_and_refuses_a_private_one() {
    use std::process::Stdio;
    let dir = TempDir::new("disk-sev");
    let disk = dir.path("disk.img");
    stamped_disk(&disk, 256, 7);
    let disk_before = std::fs::read(&disk).unwrap();
    // Guest RAM is a file, so the host can see that the private page stays untouched.
    let memory = dir.path("ram");
    let private_page: u64 = 0x80_0000;
    let marker = [0x5au8; 4096];
    {
        let file = File::create(&memory).unwrap();
        file.set_len(64 << 20).unwrap();
        file.write_all_at(&marker, private_page).unwrap();
    }
    let socket = dir.path("api.sock");
    let spec = format!("path={}", disk.display());
    let mut vm = common::veil()
        .args(["run", "--memory", "64M", "--sev", "--sev-platform", "emulated"])
        .arg("--sev-state-dir")
        .arg(dir.path("sev"))
        .arg("--memory-file")
        .arg(&memory)
        .args(["--disk", &spec, "--api-socket"])
        .arg(&socket)
        .arg("--kernel")
        .arg(common::kit())
        .args([
            "--cmdline",
            &format!(
                "blk-check:dev=0,sector=0,count=64,seed=7 blk-write:dev=0,sector=200,count=8,seed=3 \
                 blk-bad:dev=0,sector=0,at={private_page:#x} \
                 blk-bad:dev=0,sector=10,write=1,at={private_page:#x} greet spin"
            ),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    let mut stdout = vm.0.stdout.take().unwrap();
    common::read_until(&mut stdout, "Hello");
    let status = common::status(&socket);
    assert_eq!(status["devices"][0]["refused_accesses"], 2, "{status}");
    assert!(
        status["page_states"]["shared_pages"].as_u64().unwrap() > 0,
        "the driver shared its rings and buffers: {status}"
    );
    common::ctl(&socket, &["shutdown"]);
    vm.wait();
    // The refused read wrote nothing into the private page, the refused write took nothing
    // from it, and the shared-page requests did their work.
    let mut page = vec![0u8; 4096];
    File::open(&memory)
        .unwrap()
        .read_exact_at(&mut page, private_page)
        .unwrap();
    assert_eq!(page, marker);
    let disk_after = std::fs::read(&disk).unwrap();
    for s in 200..208 {
        assert_eq!(first_word(&disk, s), page_stamp(3, s));
    }
    let unwritten = |d: &[u8]| [&d[..200 * 512], &d[208 * 512..]].concat();
    assert_eq!(unwritten(&disk_after), unwritten(&disk_before));
}

#[test]
fn without_encrypted_memory_the_same_request_is_served() {
    // The control for the test above: the refusal comes from the guard, not the request.
    let dir = TempDir::new("disk-plain-at");
    let disk = dir.path("disk.img");
    stamped_disk(&disk, 64, 7);
    let spec = format!("path={}", disk.display());
    let out = run_kit(
        "blk-bad:dev=0,sector=0,at=0x800000",
        &["--memory", "64M", "--disk", &spec],
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("status OK (0), expected IOERR"));
}

/// Whether another process holds a lock on `path` (flock, as Veil takes it).
fn locked(path: &Path) -> bool {
    use std::os::fd::AsRawFd;
    let file = File::open(path).unwrap();
    // SAFETY: flock on a descriptor this function owns; LOCK_NB never blocks. A writer's
    // exclusive lock refuses even a shared one; the lock goes with `file`.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
}

#[test]
fn a_migrating_guest_takes_its_disk_to_the_path_the_target_maps_it_to() {
    use std::process::Stdio;
    let dir = TempDir::new("disk-map");
    let (here, there) = (dir.path("here.img"), dir.path("there.img"));
    stamped_disk(&here, 128, 4);
    let (source_api, target_api, target_socket) =
        (dir.path("a.sock"), dir.path("b.sock"), dir.path("m.sock"));
    let spec = format!("path={},id=data", here.display());
    let mut source = common::veil()
        .args(["run", "--memory", "32M", "--disk", &spec, "--api-socket"])
        .arg(&source_api)
        .args([
            "--cmdline",
            "blk-check:dev=0,sector=0,count=128,seed=4 spin",
            "--kernel",
        ])
        .arg(common::kit())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    common::read_until(source.0.stdout.as_mut().unwrap(), "blk-check ok");
    assert!(locked(&here), "the source holds its disk");
    // The target's storage has its own copy of the disk, at another path.
    std::fs::copy(&here, &there).unwrap();
    let mapping = format!("id=data,path={}", there.display());
    let mut target = common::receive_on(
        &target_socket,
        &[
            "--api-socket".as_ref(),
            target_api.as_ref(),
            "--disk".as_ref(),
            mapping.as_ref(),
        ],
    );
    let to = format!("unix:{}", target_socket.display());
    let out = common::ctl(&source_api, &["migrate", "--to", &to]);
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(source.wait().success());
    common::wait_for(&target_api);
    let status = common::status(&target_api);
    assert_eq!(status["devices"][0]["name"], "data");
    assert_eq!(status["devices"][0]["path"], there.display().to_string());
    assert!(locked(&there), "the target holds the mapped disk");
    assert!(!locked(&here), "the source let its disk go");
    common::ctl(&target_api, &["shutdown"]);
    target.wait();
}
