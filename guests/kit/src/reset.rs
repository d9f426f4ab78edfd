//! Resetting the machine and carrying on afterwards.
//!
//! A reset reloads the kernel and runs the command line from the start, so before resetting the
//! kit records where to resume in memory the reload does not touch (`.noinit`, beyond the ELF's
//! file contents, and not zeroed by the entry stub).

use crate::arch;
use veil_guest_abi::RESET_CONTROL_PORT;

/// Marks a resume point as the kit's own, not leftover memory contents.
const RESUME_MAGIC: u64 = 0x7665_696c_2d72_7374; // "veil-rst"
/// Reset control register value: full reset (bits 1 and 2, hard reset of the CPU).
const HARD_RESET: u8 = 0x6;

#[link_section = ".noinit"]
static mut RESUME_POINT: [u64; 2] = [0; 2];

/// The task index to resume at after a reset (0 on a first boot); consumes the record.
pub fn take_resume_point() -> usize {
    let slot = core::ptr::addr_of_mut!(RESUME_POINT);
    // SAFETY: only the BSP runs this, before any AP starts; the slot is plain memory in the
    // kit's image. Volatile: a reset put the value there behind the compiler's back.
    unsafe {
        let [magic, index] = slot.read_volatile();
        slot.write_volatile([0, 0]);
        if magic == RESUME_MAGIC {
            index as usize
        } else {
            0
        }
    }
}

/// Records `index` as the resume point and resets the machine.
pub fn reset_and_resume_at(index: usize) -> ! {
    let slot = core::ptr::addr_of_mut!(RESUME_POINT);
    // SAFETY: as in `take_resume_point`; the write completes before the port write below
    // (`outb` is a compiler barrier).
    unsafe { slot.write_volatile([RESUME_MAGIC, index as u64]) };
    arch::outb(RESET_CONTROL_PORT, HARD_RESET);
    arch::halt_forever()
}
