//! The few x86 instructions the kit needs, wrapped so the rest of the code stays safe Rust.

use core::arch::asm;
use veil_guest_abi::EXIT_PORT;

/// Writes `value` to I/O port `port`.
///
/// Not marked `nomem`: the asm is also a compiler barrier, so every store made before (page
/// stamps) is in memory before the VMM sees the exit.
#[inline]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port writes go to the VMM's devices (serial, exit port); they touch no memory
    // the compiler knows about.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nostack, preserves_flags)) }
}

/// Reads a byte from I/O port `port`.
#[inline]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port reads go to the VMM's devices (the UART); they touch no memory the compiler
    // knows about.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nostack, preserves_flags)) }
    value
}

/// Stops the VM with `status` (the byte `veil run` returns; QEMU's isa-debug-exit reports
/// `(status << 1) | 1`), and halts forever should the VMM not stop it.
pub fn exit(status: u8) -> ! {
    outb(EXIT_PORT, status);
    halt_forever()
}

/// Halts this vCPU for good. Interrupts stay off (the kit never enables them), so `hlt` is
/// final; only an INIT from another vCPU restarts an AP.
pub fn halt_forever() -> ! {
    loop {
        // SAFETY: `cli; hlt` only stops this vCPU; it has no memory effects.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Spin-loop hint for busy waits.
#[inline]
pub fn pause() {
    core::hint::spin_loop();
}

/// The time-stamp counter: runs at host speed even when the guest is emulated, so it bounds
/// waits in real time.
#[inline]
pub fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` only reads the counter (CR4.TSD is clear, so it is allowed at CPL 0).
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// This vCPU's initial APIC id (CPUID leaf 1, bits 31:24 of EBX).
pub fn apic_id() -> u8 {
    // CPUID leaf 1 exists on every x86-64 CPU.
    let leaf1 = core::arch::x86_64::__cpuid(1);
    (leaf1.ebx >> 24) as u8
}

/// Reloads CR3 with its own value, flushing the TLB after the page tables changed.
/// Writes back and invalidates every cache line of `start..end` (`clflush`, then a fence so
/// the flushes are done before what follows).
pub fn flush_cache_lines(start: u64, end: u64) {
    for line in (start & !63..end).step_by(64) {
        // SAFETY: `clflush` of a mapped address only writes back and evicts its cache line.
        unsafe { core::arch::x86_64::_mm_clflush(line as *const u8) };
    }
    // SAFETY: a fence has no memory effect of its own.
    unsafe { core::arch::x86_64::_mm_mfence() };
}

pub fn flush_tlb() {
    // SAFETY: rewriting CR3 with the value it holds keeps the same (identity) mapping.
    unsafe {
        asm!(
            "mov {tmp}, cr3",
            "mov cr3, {tmp}",
            tmp = out(reg) _,
            options(nostack, preserves_flags)
        )
    }
}
