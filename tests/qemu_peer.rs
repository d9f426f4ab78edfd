//! The kit's drivers against devices nobody here wrote: `guests/kit/qemu-test.py` boots the
//! same kit ELF under QEMU (`-M microvm`, KVM, PVH) with QEMU's virtio-blk, virtconsole and a
//! vhost-user vsock backend, and checks what the guest does. Veil's devices are tested against
//! the same drivers in the other end-to-end tests, so each side is proven against a peer.
//!
//! Needs python3 and qemu-system-x86_64 (`.ci/run` installs it); without them the test says
//! so and checks nothing.

mod common;

use std::process::Command;

#[test]
fn the_kit_drivers_work_against_qemus_devices() {
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !have("python3") || !have("qemu-system-x86_64") {
        eprintln!("skipped: needs python3 and qemu-system-x86_64 (Debian: qemu-system-x86)");
        return;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/guests/kit/qemu-test.py");
    let out = Command::new("python3")
        .arg(script)
        .arg(common::kit())
        .output()
        .expect("python3 runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", common::describe(&out));
    // Every scenario ran: nothing was skipped and the tally says so.
    assert!(!text.contains("skipped"), "{text}");
    let tally = text
        .lines()
        .rev()
        .find(|l| l.ends_with(" failed"))
        .unwrap_or_default();
    assert!(
        tally.ends_with(" 0 failed") && !tally.starts_with("0 passed"),
        "{text}"
    );
    for scenario in [
        "blk-check",
        "blk-write",
        "blk-irq",
        "con-echo",
        "vsock-echo",
    ] {
        assert!(
            text.contains(scenario),
            "no {scenario} scenario ran:\n{text}"
        );
    }
}
