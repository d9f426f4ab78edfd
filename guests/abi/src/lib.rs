//! The contract between Veil and its kit guests.
//!
//! Both sides compile this crate (the guests as `no_std`), so a port number or a stamp pattern
//! can never drift apart. Documented for guest authors in `docs/guest-abi.md`.
#![no_std]

/// Size of the page the kit stamps and checks, and the granularity of dirty tracking.
pub const PAGE_SIZE: u64 = 4096;

/// The 16550 UART on COM1, as on every PC.
pub const COM1_PORT: u16 = 0x3f8;

/// Writing a byte here stops the VM; the byte is the exit status `veil run` returns.
///
/// Same port as QEMU's `isa-debug-exit` device (`iobase=0xf4`), so a kit guest also stops
/// under QEMU (which reports `(code << 1) | 1` instead of `code`).
pub const EXIT_PORT: u16 = 0xf4;

/// How to reset the machine, as on every PC: write 0x6 (or 0xe) to the reset control register.
pub const RESET_CONTROL_PORT: u16 = 0xcf9;

/// Veil's fallback hypercall transport: `in eax, HYPERCALL_PORT` with the hypercall's registers
/// loaded (RAX = number, RBX/RCX/RDX = a0/a1/a2); the result comes back in EAX, to be
/// sign-extended into RAX in 64-bit mode (`movsxd rax, eax`; every result fits 32 bits). Used
/// where the host cannot deliver `vmmcall` exits; advertised in [`VEIL_CPUID_FEATURES`]. A port
/// below 0x100 so the `in eax, imm8` form leaves RDX (a2) alone.
pub const HYPERCALL_PORT: u16 = HYPERCALL_PORT_U8 as u16;
/// [`HYPERCALL_PORT`] as the 8-bit immediate `out` takes.
pub const HYPERCALL_PORT_U8: u8 = 0xf5;

/// Veil's CPUID signature leaf: EAX = highest Veil leaf, EBX:ECX:EDX = "VeilVeilVeil".
pub const VEIL_CPUID_SIGNATURE: u32 = 0x4000_0100;
/// "Veil" as CPUID returns it in a register.
pub const VEIL_CPUID_SIGNATURE_WORD: u32 = u32::from_le_bytes(*b"Veil");
/// Veil's feature leaf: EAX = feature bits below, EBX = the hypercall port.
pub const VEIL_CPUID_FEATURES: u32 = 0x4000_0101;
/// EAX bit: hypercalls go through [`HYPERCALL_PORT`] (the host cannot deliver `vmmcall`).
pub const VEIL_FEATURE_HYPERCALL_PORT: u32 = 1 << 0;
/// EAX bit: `MSR_KVM_MIGRATION_CONTROL` accepts Veil's "never migrate" bit and reason code.
pub const VEIL_FEATURE_MIGRATION_NEVER: u32 = 1 << 1;

/// Where Veil's PVH boot structures live; a guest must copy what it needs from them before
/// reusing this memory. Everything else below 1 MiB, except [`CMDLINE_START`]'s page, is free.
pub const BOOT_INFO_START: u64 = 0x6000;
/// End (exclusive) of the boot-structure area.
pub const BOOT_INFO_END: u64 = 0x8000;
/// Where Veil writes the kernel command line (at most [`CMDLINE_MAX`] bytes, NUL-terminated).
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line Veil accepts, including the NUL.
pub const CMDLINE_MAX: usize = 4096;

/// Physical address kit kernels are linked to run at.
pub const KERNEL_START: u64 = 0x10_0000;

/// What the kit guest (`guests/kit`) prints for its `greet` task (and an empty command line).
pub const KIT_GREETING: &str = "Hello from the Veil guest kit!\n";
/// Kit exit status: every task ran.
pub const KIT_EXIT_OK: u8 = 0;
/// Kit exit status: a `check` task found a page without its expected stamp.
pub const KIT_EXIT_CHECK_FAILED: u8 = 1;
/// Kit exit status: malformed command line, page range outside RAM or inside the kit's own
/// memory, unusable boot data, or application processors that did not start.
pub const KIT_EXIT_ERROR: u8 = 2;
/// Kit exit status: a bug in the kit (a Rust panic).
pub const KIT_EXIT_PANIC: u8 = 3;

/// The 64-bit word a kit guest stamps at the start of page `gfn` for `seed`.
///
/// SplitMix64 of `seed ^ gfn`: cheap enough for an emulated guest (a dozen instructions per
/// page), and no two pages or seeds collide in practice, so a misplaced or stale page shows.
#[inline]
pub const fn page_stamp(seed: u64, gfn: u64) -> u64 {
    let mut z =
        (seed ^ gfn.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_differ_across_pages_and_seeds() {
        assert_ne!(page_stamp(1, 0), page_stamp(1, 1));
        assert_ne!(page_stamp(1, 5), page_stamp(2, 5));
        assert_ne!(page_stamp(0, 0), 0);
    }
}
