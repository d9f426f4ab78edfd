//! Guest RAM backed by a file, and vCPUs each stamping their own pages.

mod common;

use std::fs::File;

use common::{describe, gfns, run_kit, write_stamps, wrong_stamps, TempDir};

/// Pages kit guests may use freely: above the kit's own image and tables.
const FIRST_FREE_GFN: u64 = 0x800;

fn stamp_on_vcpus(vcpus: u32) {
    let dir = TempDir::new(&format!("smp{vcpus}"));
    let mem = dir.path("ram");
    let count = 256 * u64::from(vcpus);
    let out = run_kit(
        &format!("stamp:seed=5,first={FIRST_FREE_GFN:#x},count={count},cpus={vcpus}"),
        &[
            "--memory",
            "64M",
            "--vcpus",
            &vcpus.to_string(),
            "--memory-file",
            mem.to_str().unwrap(),
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains(&format!("stamped {count} pages on {vcpus} vCPUs")),
        "{}",
        describe(&out)
    );
    let file = File::open(&mem).unwrap();
    assert_eq!(
        wrong_stamps(&file, 5, gfns(FIRST_FREE_GFN, count, 1)),
        Vec::<u64>::new()
    );
    // The page after the range is untouched.
    assert_eq!(
        wrong_stamps(&file, 5, gfns(FIRST_FREE_GFN + count, 1, 1)).len(),
        1
    );
}

#[test]
fn two_vcpus_stamp_their_own_ranges() {
    stamp_on_vcpus(2);
}

#[test]
fn four_vcpus_stamp_their_own_ranges() {
    stamp_on_vcpus(4);
}

#[test]
fn a_1gib_file_backed_guest_sees_host_data_and_the_host_sees_its_writes() {
    let dir = TempDir::new("1g");
    let mem = dir.path("ram");
    let file = File::create(&mem).unwrap();
    file.set_len(1 << 30).unwrap();
    // Spread over the whole GiB: one page in 64.
    let (count, stride) = (4000, 64);
    write_stamps(&file, 11, gfns(FIRST_FREE_GFN, count, stride));
    let out = run_kit(
        &format!(
            "check:seed=11,first={FIRST_FREE_GFN:#x},count={count},stride={stride} \
             stamp:seed=12,first={:#x},count={count},stride={stride}",
            FIRST_FREE_GFN + 1
        ),
        &["--memory", "1G", "--memory-file", mem.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("check ok: {count} pages")));
    let file = File::open(&mem).unwrap();
    assert_eq!(
        wrong_stamps(&file, 12, gfns(FIRST_FREE_GFN + 1, count, stride)),
        Vec::<u64>::new()
    );
    // What the host wrote is still there.
    assert_eq!(
        wrong_stamps(&file, 11, gfns(FIRST_FREE_GFN, count, stride)),
        Vec::<u64>::new()
    );
}

#[test]
fn a_guest_that_finds_wrong_data_says_so() {
    let dir = TempDir::new("badcheck");
    let mem = dir.path("ram");
    let file = File::create(&mem).unwrap();
    file.set_len(64 << 20).unwrap();
    write_stamps(&file, 11, gfns(FIRST_FREE_GFN, 10, 1));
    let out = run_kit(
        &format!("check:seed=99,first={FIRST_FREE_GFN:#x},count=10"),
        &["--memory", "64M", "--memory-file", mem.to_str().unwrap()],
    );
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("check FAILED at gfn 0x800"));
}

#[test]
fn dirty_logging_reports_exactly_the_pages_written_by_guest_and_host() {
    use std::collections::BTreeSet;
    use vm_memory::{Bytes, GuestAddress};

    let serial = veil::CapturedOutput::new();
    let vm = veil::VmBuilder::new()
        .kernel(common::kit())
        .cmdline(format!(
            "dirty-loop:seed=3,first={FIRST_FREE_GFN:#x},count=64,stride=2"
        ))
        .memory_bytes(64 << 20)
        .serial_writer(serial.clone())
        .start()
        .unwrap();
    assert!(serial.wait_for("stamping", std::time::Duration::from_secs(20)));
    let running = vm.inner();
    let (ram, fd) = (running.ram(), running.fd());
    ram.set_dirty_logging(fd, true).unwrap();
    ram.take_dirty_pages(fd).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    // A write by the VMM itself is tracked too.
    let host_gfn = FIRST_FREE_GFN + 0x100;
    running
        .memory()
        .write_obj(1u64, GuestAddress(host_gfn << 12))
        .unwrap();
    let dirty: BTreeSet<u64> = ram
        .take_dirty_pages(fd)
        .unwrap()
        .iter()
        .flat_map(|b| b.dirty_addresses().map(|a| a.0 >> 12).collect::<Vec<_>>())
        .collect();
    let stamped: BTreeSet<u64> = gfns(FIRST_FREE_GFN, 64, 2).collect();
    assert!(
        stamped.is_subset(&dirty),
        "missing: {:?}",
        stamped.difference(&dirty).collect::<Vec<_>>()
    );
    assert!(dirty.contains(&host_gfn));
    // Pages between the stamped ones, and the rest of free RAM, were not written.
    let untouched = gfns(FIRST_FREE_GFN + 1, 64, 2).chain(FIRST_FREE_GFN + 0x101..0x4000);
    let wrongly_dirty: Vec<u64> = untouched.filter(|g| dirty.contains(g)).collect();
    assert_eq!(wrongly_dirty, Vec::<u64>::new());
    // Off again: KVM no longer keeps a log for the slot.
    ram.set_slot_dirty_logging(fd, 0, false).unwrap();
    assert!(ram.take_dirty_pages(fd).is_err());
    vm.stop();
    vm.wait();
}

#[test]
fn a_64gib_guest_reaches_its_highest_pages_through_a_sparse_memory_file() {
    let dir = TempDir::new("64g");
    let mem = dir.path("ram");
    let file = File::create(&mem).unwrap();
    file.set_len(64 << 30).unwrap();
    // The last GiB of a 64 GiB guest sits at 64..65 GiB (RAM skips the 3..4 GiB hole).
    let high = (64u64 << 30) >> 12;
    write_stamps(&file, 7, gfns(high, 4, 0x1000));
    let out = run_kit(
        &format!("check:seed=7,first={high:#x},count=4,stride=0x1000 stamp:seed=8,first={:#x},count=4,stride=0x1000", high + 1),
        &["--memory", "64G", "--memory-file", mem.to_str().unwrap()],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let file = File::open(&mem).unwrap();
    assert_eq!(
        wrong_stamps(&file, 8, gfns(high + 1, 4, 0x1000)),
        Vec::<u64>::new()
    );
}
