//! Completes the identity map the entry stub started.
//!
//! The stub maps 0..4 GiB with 2 MiB pages (the PVH boot data and the LAPIC live there); RAM
//! above 4 GiB, up to `MAPPED_GIB`, is mapped here because the memory map is easier to read
//! in Rust. 2 MiB pages keep this to 512 writes per GiB; 1 GiB pages would be fewer but fail
//! on the project's hosts (HOST-NOTES).

use crate::arch;
use crate::layout::{LOW_MAPPED_GIB, MAPPED_GIB};

extern "C" {
    static mut kit_pdpt: [u64; 512];
    static mut kit_pd: [[u64; 512]; MAPPED_GIB];
}

const PRESENT_WRITABLE: u64 = 0x3;
const HUGE: u64 = 0x80;
const WRITE_THROUGH: u64 = 0x8;
const CACHE_DISABLE: u64 = 0x10;
/// Where the xAPIC registers are (the default APIC base).
pub const LAPIC_BASE: u64 = 0xfee0_0000;

/// Maps RAM frames below `end_gfn` above 4 GiB and marks the LAPIC page uncached.
pub fn map_ram(end_gfn: u64) {
    let gib = (end_gfn.div_ceil(1 << (30 - 12)) as usize).min(MAPPED_GIB);
    // SAFETY: the tables are the kit's own (in .noinit); only this vCPU runs now (APs are
    // started later), and the directories written here are not yet reachable from the PDPT,
    // so no live translation changes until the PDPT entry is written.
    unsafe {
        let pd = core::ptr::addr_of_mut!(kit_pd) as *mut [u64; 512];
        let pdpt = core::ptr::addr_of_mut!(kit_pdpt) as *mut u64;
        for g in LOW_MAPPED_GIB..gib {
            let dir = pd.add(g);
            for i in 0..512u64 {
                let addr = ((g as u64) << 30) | (i << 21);
                (*dir)[i as usize] = addr | HUGE | PRESENT_WRITABLE;
            }
            pdpt.add(g).write(dir as u64 | PRESENT_WRITABLE);
        }
        // The LAPIC is a device: uncached, like every OS maps it.
        let entry = (LAPIC_BASE >> 21) as usize;
        (pd as *mut u64).add(entry).write(
            (LAPIC_BASE & !((1 << 21) - 1))
                | HUGE
                | CACHE_DISABLE
                | WRITE_THROUGH
                | PRESENT_WRITABLE,
        );
    }
    arch::flush_tlb();
}
