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

/// 4 KiB page tables for 2 MiB pages of the first GiB that [`clear_c_bit`] splits: the DMA
/// area (under 1 MiB) spans at most two 2 MiB pages.
const SPLIT_TABLES: usize = 2;
const SMALL_PAGE: u64 = 1 << 12;
/// The physical-address bits of a page-table entry (bits 51:12).
const ADDRESS_BITS: u64 = 0x000f_ffff_ffff_f000;

#[repr(C, align(4096))]
struct PageTable([u64; 512]);

/// Never zeroed: a table is written whole before a directory entry points at it.
#[link_section = ".noinit"]
static mut SPLIT: core::mem::MaybeUninit<[PageTable; SPLIT_TABLES]> =
    core::mem::MaybeUninit::uninit();
/// How many of [`SPLIT`] are in use; zeroed at every boot, as the tables in `.data` are
/// reloaded with the image.
static mut SPLIT_USED: usize = 0;

/// There are more 2 MiB pages to split than [`SPLIT_TABLES`].
#[derive(Debug, Clone, Copy)]
pub struct NoTableLeft;

/// Clears the memory-encryption bit `c_bit` for `start..end` (4 KiB-aligned, inside the first
/// GiB), so the guest's own accesses there are unencrypted, like the device's: the first half of
/// Linux's `set_memory_decrypted` (the second is the hypercall).
///
/// A 2 MiB page the range covers only in part (it also holds other kit memory, such as the
/// stacks next to the DMA area) is first split into 4 KiB pages with the same mapping, so only
/// the range loses the C-bit. When memory is really encrypted, the range's cache lines are
/// flushed first: they were written while private, and must not be written back over what the
/// host puts there (AMD APM vol. 2, 15.34.7).
///
/// On the project's hosts the C-bit is never set in the kit's tables (SEV_STATUS says memory
/// is not encrypted under Veil's emulated platform, HOST-NOTES): the split runs there and the
/// mapping it leaves is what every virtio test uses, but that clearing the bit is what real SEV
/// needs can only be shown on SEV hardware. Other vCPUs' TLBs are not flushed: they never touch
/// the range.
pub fn clear_c_bit(start: u64, end: u64, c_bit: u32) -> Result<(), NoTableLeft> {
    let mask = 1u64.checked_shl(c_bit).unwrap_or(0);
    if c_bit_mask() != 0 {
        arch::flush_cache_lines(start, end);
    }
    for region in start / LARGE_PAGE..end.div_ceil(LARGE_PAGE).min(512) {
        let (low, high) = (region * LARGE_PAGE, (region + 1) * LARGE_PAGE);
        // SAFETY: the kit's own directory for the first GiB; `region` < 512.
        let directory =
            unsafe { (core::ptr::addr_of_mut!(kit_pd_low) as *mut u64).add(region as usize) };
        // SAFETY: as above.
        let entry = unsafe { directory.read() };
        if entry & HUGE != 0 && start <= low && high <= end {
            // SAFETY: clearing the C-bit keeps the identity mapping (same address and rights).
            unsafe { directory.write(entry & !mask) };
            continue;
        }
        let table = if entry & HUGE != 0 {
            split(directory, entry)?
        } else {
            (entry & ADDRESS_BITS & !c_bit_mask()) as *mut u64
        };
        for page in start.max(low) / SMALL_PAGE..end.min(high).div_ceil(SMALL_PAGE) {
            // SAFETY: `table` is one of the kit's split tables (identity-mapped), and `page`
            // lies in this 2 MiB region, so the index is below 512; the identity mapping is kept.
            unsafe {
                let pte = table.add((page - low / SMALL_PAGE) as usize);
                pte.write(pte.read() & !mask);
            }
        }
    }
    arch::flush_tlb();
    Ok(())
}

/// Replaces the 2 MiB mapping `entry` at `directory` with a table of 4 KiB pages mapping the
/// same memory the same way; returns the table.
fn split(directory: *mut u64, entry: u64) -> Result<*mut u64, NoTableLeft> {
    let used = core::ptr::addr_of_mut!(SPLIT_USED);
    // SAFETY: only the BSP sets up devices, so nothing else reads or writes the counter.
    let index = unsafe { used.read() };
    if index == SPLIT_TABLES {
        return Err(NoTableLeft);
    }
    // SAFETY: as above.
    unsafe { used.write(index + 1) };
    // SAFETY: `index` < SPLIT_TABLES; only the address of the kit's own table is computed.
    let table =
        unsafe { (core::ptr::addr_of_mut!(SPLIT) as *mut PageTable).add(index) } as *mut u64;
    // A 2 MiB entry's bit 7 is the page size, a 4 KiB one's is PAT: the kit uses no PAT.
    let (base, flags) = (
        entry & ADDRESS_BITS & !(LARGE_PAGE - 1),
        entry & !ADDRESS_BITS & !HUGE,
    );
    for i in 0..512 {
        // SAFETY: `table` is 512 entries, the kit's own and unreachable until `directory` is
        // written below.
        unsafe { table.add(i).write((base + i as u64 * SMALL_PAGE) | flags) };
    }
    // SAFETY: the kit's own directory entry; the table maps exactly what the 2 MiB page did.
    unsafe { directory.write(table as u64 | c_bit_mask() | PRESENT_WRITABLE) };
    Ok(table)
}
