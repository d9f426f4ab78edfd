//! A running guest moves from one VM to another in the same process: RAM copied, state saved
//! and restored, the source stopped, and the guest carries on in the target. This is the core
//! every migration transport builds on.

mod common;

use std::time::{Duration, Instant};

use veil::{CapturedOutput, RunState, VmBuilder, VmStop};
use veil_guest_abi::page_stamp;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const FIRST: u64 = 0x800;

fn stamp_at(memory: &veil_hypervisor::GuestMemory, gfn: u64) -> u64 {
    memory.read_obj(GuestAddress(gfn << 12)).unwrap()
}

/// Copies all guest RAM from one VM's memory to another's.
fn copy_ram(from: &veil_hypervisor::GuestMemory, to: &veil_hypervisor::GuestMemory) {
    for region in from.iter() {
        let mut bytes = vec![0u8; region.len() as usize];
        from.read_slice(&mut bytes, region.start_addr()).unwrap();
        to.write_slice(&bytes, region.start_addr()).unwrap();
    }
}

#[test]
fn a_running_guest_continues_in_another_vm() {
    let source_out = CapturedOutput::new();
    let source = VmBuilder::new()
        .kernel(common::kit())
        .cmdline(format!("dirty-loop:seed=3,first={FIRST:#x},count=64"))
        .memory_bytes(64 << 20)
        .serial_writer(source_out.clone())
        .start()
        .unwrap();
    // The whole line: paused mid-line, the guest would finish it on the target.
    assert!(source_out.wait_for("forever\n", Duration::from_secs(20)));
    assert_eq!(source.pause(), RunState::Paused);
    let snapshot = source.inner().snapshot().unwrap();

    let target_out = CapturedOutput::new();
    let target = VmBuilder::new()
        .memory_bytes(64 << 20)
        .serial_writer(target_out.clone())
        .start_incoming(Box::new(|memory, _| {
            copy_ram(source.memory(), memory);
            Ok((snapshot, None))
        }))
        .unwrap();
    source.stop();
    assert_eq!(source.wait(), VmStop::Requested);
    assert_eq!(
        target.state(),
        RunState::Paused,
        "an incoming guest waits to be told to run"
    );
    assert_eq!(target.resume(), RunState::Running);

    // Wipe a stamp in each VM: only the one where the guest now runs writes it again.
    let wiped = FIRST + 10;
    target
        .memory()
        .write_obj(0u64, GuestAddress(wiped << 12))
        .unwrap();
    source
        .memory()
        .write_obj(0u64, GuestAddress(wiped << 12))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while stamp_at(target.memory(), wiped) != page_stamp(3, wiped) {
        assert!(
            Instant::now() < deadline,
            "the guest did not continue in the target"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        stamp_at(source.memory(), wiped),
        0,
        "the source guest stays stopped"
    );
    assert_eq!(target.state(), RunState::Running);
    // The guest printed its banner once, on the source; the target carried on silently.
    assert_eq!(target_out.text(), "");

    target.stop();
    assert_eq!(target.wait(), VmStop::Requested);
}

#[test]
fn a_saved_guest_does_not_fit_a_vm_of_another_shape() {
    let out = CapturedOutput::new();
    let source = VmBuilder::new()
        .kernel(common::kit())
        .cmdline("greet spin")
        .memory_bytes(32 << 20)
        .vcpus(2)
        .serial_writer(out.clone())
        .start()
        .unwrap();
    assert!(out.wait_for("Hello", Duration::from_secs(20)));
    source.pause();
    let snapshot = source.inner().snapshot().unwrap();
    let err = VmBuilder::new()
        .memory_bytes(32 << 20)
        .serial_writer(std::io::sink())
        .start_incoming(Box::new(|_, _| Ok((snapshot, None))))
        .err()
        .expect("one vCPU cannot take two vCPUs' state");
    assert!(
        err.to_string()
            .contains("The saved VM has 2 vCPUs, this one 1"),
        "{err}"
    );
    source.stop();
    source.wait();
}

/// The guest's kvmclock as the kit printed it (`kvmclock: N ns`), in order.
fn kvmclock_reads(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| {
            l.strip_prefix("kvmclock: ")?
                .strip_suffix(" ns")?
                .parse()
                .ok()
        })
        .collect()
}

#[test]
fn the_guests_kvmclock_covers_the_time_it_was_stopped_between_two_vms() {
    const CLOCK_GPA: u64 = 0x81_0000;
    const GO_GPA: u64 = 0x80_0000;
    const STOPPED: Duration = Duration::from_secs(2);
    let source_out = CapturedOutput::new();
    let source = VmBuilder::new()
        .kernel(common::kit())
        .cmdline(format!(
            "kvmclock-on:gpa={CLOCK_GPA:#x} kvmclock-read:gpa={CLOCK_GPA:#x} \
             wait-word:gpa={GO_GPA:#x},value=1 kvmclock-read:gpa={CLOCK_GPA:#x} greet spin"
        ))
        .memory_bytes(32 << 20)
        .serial_writer(source_out.clone())
        .start()
        .unwrap();
    assert!(
        source_out.wait_for("wait-word: waiting", Duration::from_secs(20)),
        "{}",
        source_out.text()
    );
    assert_eq!(source.pause(), RunState::Paused);
    let snapshot = source.inner().snapshot().unwrap();
    // The guest is stopped for this long, as during a migration's stop-and-copy.
    std::thread::sleep(STOPPED);
    let target_out = CapturedOutput::new();
    let target = VmBuilder::new()
        .memory_bytes(32 << 20)
        .serial_writer(target_out.clone())
        .start_incoming(Box::new(|memory, _| {
            copy_ram(source.memory(), memory);
            Ok((snapshot, None))
        }))
        .unwrap();
    source.stop();
    source.wait();
    target
        .memory()
        .write_obj(1u64, GuestAddress(GO_GPA))
        .unwrap();
    assert_eq!(target.resume(), RunState::Running);
    assert!(
        target_out.wait_for("Hello", Duration::from_secs(20)),
        "{}",
        target_out.text()
    );
    target.stop();
    target.wait();
    let (before, after) = (
        kvmclock_reads(&source_out.text()),
        kvmclock_reads(&target_out.text()),
    );
    let (&[before], &[after]) = (before.as_slice(), after.as_slice()) else {
        panic!("{}\n{}", source_out.text(), target_out.text());
    };
    // Monotonic, and the stopped time is in it (wall clocks of one host agree).
    assert!(
        after >= before + STOPPED.as_nanos() as u64,
        "kvmclock {before} ns before, {after} ns after being stopped {STOPPED:?}"
    );
    eprintln!("kvmclock advanced {} ms", (after - before) / 1_000_000);
}
