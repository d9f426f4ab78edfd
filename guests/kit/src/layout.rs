//! Where the kit keeps its own things in guest-physical memory.
//!
//! Everything the kit owns lies in its image (`__kit_image_start..__kit_image_end`, from the
//! linker script: code, data, page tables, stacks) plus the AP trampoline page below 1 MiB.
//! Tasks refuse page ranges that touch any of it.

use veil_guest_abi::PAGE_SIZE;

/// The identity map covers RAM up to this many GiB (one page-directory page per GiB).
pub const MAPPED_GIB: usize = 128;
/// The BSP's stack.
pub const BSP_STACK_SIZE: usize = 64 * 1024;
/// Each application processor's stack: stamping needs a few hundred bytes.
pub const AP_STACK_SIZE: usize = 16 * 1024;
/// log2 of [`AP_STACK_SIZE`], for the entry stub's shift.
pub const AP_STACK_SHIFT: u32 = 14;
/// Most vCPUs a `stamp` task can use (the BSP plus `MAX_CPUS - 1` APs with their own stacks).
pub const MAX_CPUS: u64 = 32;
/// The page APs start in (SIPI vector 0x08): free per the ABI (boot data is at 0x6000..0x8000
/// and in 0x20000's page).
pub const TRAMPOLINE_BASE: u64 = 0x8000;

const _: () = assert!(1 << AP_STACK_SHIFT == AP_STACK_SIZE);
const _: () = assert!(TRAMPOLINE_BASE.is_multiple_of(PAGE_SIZE) && TRAMPOLINE_BASE < 0x10_0000);

extern "C" {
    static __kit_image_start: u8;
    static __kit_image_end: u8;
}

/// Guest frame numbers `[start, end)` of the kit's image, page tables and stacks.
pub fn image_gfns() -> (u64, u64) {
    // Only the addresses of these linker symbols are used, never their contents.
    let start = core::ptr::addr_of!(__kit_image_start) as u64;
    let end = core::ptr::addr_of!(__kit_image_end) as u64;
    (start / PAGE_SIZE, end.div_ceil(PAGE_SIZE))
}

/// Guest frame number of the AP trampoline page.
pub const fn trampoline_gfn() -> u64 {
    TRAMPOLINE_BASE / PAGE_SIZE
}
