//! The Veil guest kit: a tiny PVH kernel for end-to-end tests of the VMM.
//!
//! It boots from a PVH loader into long mode (`entry`), copies its command line and memory map
//! out of the boot area (`boot`), and runs the tasks of its command line (`cmdline`, `tasks`):
//! print a greeting, stamp pages with `veil_guest_abi::page_stamp` (on several vCPUs: `smp`),
//! check stamps, fault, or exit with a status. Output goes to COM1 (`serial`), the status to
//! `veil_guest_abi::EXIT_PORT`. Polled virtio-mmio drivers (`virtio`) serve the `blk-*`, `con-*`
//! and `vsock-*` tasks; COM1 input serves `serial-echo`.
//! See docs/guest-kit.md.
//!
//! The project's hosts run guests in KVM's instruction emulator (~2M instructions/s), which
//! handles no exceptions or interrupts: the kit never enables interrupts, never faults except
//! on purpose, and does a few instructions per page.
#![no_std]
#![no_main]

mod arch;
mod boot;
mod cmdline;
mod entry;
mod ioapic;
mod layout;
mod mem;
mod memmap;
mod paging;
mod paravirt;
mod reset;
mod serial;
mod smp;
mod tasks;
mod virtio;

// Exit statuses, shared with the VMM's tests through the ABI crate.
pub use veil_guest_abi::{
    KIT_EXIT_CHECK_FAILED as EXIT_CHECK_FAILED, KIT_EXIT_ERROR as EXIT_ERROR,
    KIT_EXIT_OK as EXIT_OK, KIT_EXIT_PANIC as EXIT_PANIC,
};

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    // No `core::fmt` here: it would pull in a lot of code for a path that should never run.
    serial::write_str("veil-kit: panic");
    if let Some(location) = info.location() {
        serial::write_str(" at ");
        serial::write_str(location.file());
        serial::write_str(":");
        serial::write_dec(location.line().into());
    }
    serial::write_str("\n");
    arch::exit(EXIT_PANIC)
}
