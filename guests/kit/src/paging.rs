//! Completes the identity map the boot page tables started.
//!
//! The image carries tables for the first GiB and the LAPIC (entry.rs); RAM above 1 GiB, up to
//! `MAPPED_GIB`, is mapped here, only as far as the memory map says there is RAM: each GiB
//! costs the emulated guest 512 writes. 1 GiB pages would be fewer but fail on the project's
//! hosts (HOST-NOTES). The GiB below 4 GiB that holds the LAPIC is never RAM.

use crate::arch;
use crate::layout::MAPPED_GIB;

extern "C" {
    static mut kit_pdpt: [u64; 512];
    static mut kit_pd: [[u64; 512]; MAPPED_GIB];
    /// The first GiB's 2 MiB pages (entry.rs).
    static mut kit_pd_low: [u64; 512];
    /// 3..4 GiB: the LAPIC's page, and the virtio-mmio windows mapped by [`map_mmio`].
    static mut kit_pd_mmio: [u64; 512];
    /// The C-bit as a mask when SEV is active, else 0 (entry.rs, before paging).
    static kit_c_bit_mask: u64;
}

/// The C-bit mask RAM mappings carry: non-zero only in an SEV guest whose memory is really
/// encrypted (SEV_STATUS bit 0), so its own accesses stay private.
pub fn c_bit_mask() -> u64 {
    // SAFETY: written once by the BSP's 32-bit entry before any Rust code runs, read-only after.
    unsafe { core::ptr::addr_of!(kit_c_bit_mask).read() }
}

const PRESENT_WRITABLE: u64 = 0x3;
const HUGE: u64 = 0x80;
/// PWT | PCD: uncached, for device registers.
const UNCACHED: u64 = 0x18;
const LARGE_PAGE: u64 = 1 << 21;
/// Where the xAPIC registers are (the default APIC base); mapped uncached by the boot tables.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// The GiB the boot tables map statically with the LAPIC (3..4 GiB, the 32-bit MMIO hole).
const MMIO_GIB: usize = 3;

/// Maps RAM frames below `end_gfn` above the first GiB.
pub fn map_ram(end_gfn: u64) {
    let gib = (end_gfn.div_ceil(1 << (30 - 12)) as usize).min(MAPPED_GIB);
    let c_bit = c_bit_mask();
    // SAFETY: the tables are the kit's own (in .noinit); only this vCPU runs now (APs are
    // started later), and the directories written here are not yet reachable from the PDPT,
    // so no live translation changes until the PDPT entry is written.
    unsafe {
        let pd = core::ptr::addr_of_mut!(kit_pd) as *mut [u64; 512];
        let pdpt = core::ptr::addr_of_mut!(kit_pdpt) as *mut u64;
        for g in (1..gib).filter(|&g| g != MMIO_GIB) {
            let dir = pd.add(g);
            for i in 0..512u64 {
                let addr = ((g as u64) << 30) | (i << 21);
                (*dir)[i as usize] = addr | c_bit | HUGE | PRESENT_WRITABLE;
            }
            pdpt.add(g).write(dir as u64 | c_bit | PRESENT_WRITABLE);
        }
    }
    arch::flush_tlb();
}

/// Maps the 2 MiB pages holding the device window `base..base + size` (inside 3..4 GiB, as
/// `cmdline` checks) uncached, as the LAPIC's is.
pub fn map_mmio(base: u64, size: u64) {
    let first = (base - (3 << 30)) / LARGE_PAGE;
    let last = (base + size - 1 - (3 << 30)) / LARGE_PAGE;
    for i in first..=last.min(511) {
        let entry = ((3 << 30) + i * LARGE_PAGE) | UNCACHED | HUGE | PRESENT_WRITABLE;
        // SAFETY: the kit's own table for 3..4 GiB, which holds no RAM: (re)mapping a device
        // page there changes no mapping of memory the kit uses.
        unsafe {
            (core::ptr::addr_of_mut!(kit_pd_mmio) as *mut u64)
                .add(i as usize)
                .write(entry)
        };
    }
    arch::flush_tlb();
}

/// Clears the memory-encryption bit `c_bit` in the 2 MiB pages of the first GiB that hold
/// `start..end`, so the guest's own accesses there are unencrypted, like the device's: the
/// first half of Linux's `set_memory_decrypted` (the second is the hypercall).
///
/// On these hosts a no-op in effect: the kit's tables set the C-bit only when SEV_STATUS says
/// memory is encrypted, which Veil's emulated platform never says. A kit
/// that kept its private memory encrypted on real hardware would have to map the range with
/// 4 KiB pages first (a 2 MiB page here also holds other kit memory) and flush the cache lines
/// of those pages (`clflush`), since they were written while private.
pub fn clear_c_bit(start: u64, end: u64, c_bit: u32) {
    let mask = 1u64.checked_shl(c_bit).unwrap_or(0);
    for i in start / LARGE_PAGE..end.div_ceil(LARGE_PAGE).min(512) {
        // SAFETY: the kit's own table for the first GiB; clearing the C-bit keeps the identity
        // mapping (same address, same permissions).
        unsafe {
            let entry = (core::ptr::addr_of_mut!(kit_pd_low) as *mut u64).add(i as usize);
            entry.write(entry.read() & !mask);
        }
    }
    arch::flush_tlb();
}
