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
}

const PRESENT_WRITABLE: u64 = 0x3;
const HUGE: u64 = 0x80;
/// Where the xAPIC registers are (the default APIC base); mapped uncached by the boot tables.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// The GiB the boot tables map statically with the LAPIC (3..4 GiB, the 32-bit MMIO hole).
const MMIO_GIB: usize = 3;

/// Maps RAM frames below `end_gfn` above the first GiB.
pub fn map_ram(end_gfn: u64) {
    let gib = (end_gfn.div_ceil(1 << (30 - 12)) as usize).min(MAPPED_GIB);
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
                (*dir)[i as usize] = addr | HUGE | PRESENT_WRITABLE;
            }
            pdpt.add(g).write(dir as u64 | PRESENT_WRITABLE);
        }
    }
    arch::flush_tlb();
}
