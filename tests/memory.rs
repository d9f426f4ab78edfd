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
