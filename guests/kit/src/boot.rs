//! From the PVH start info to the tasks: copy the boot data out, finish the page tables, run.

use core::mem::MaybeUninit;

use crate::memmap::{MemmapEntry, RamMap, MAX_MEMMAP_ENTRIES};
use crate::{paging, serial, tasks};
use veil_guest_abi::CMDLINE_MAX;

/// `hvm_start_info.magic`.
const HVM_START_MAGIC: u32 = 0x336e_c578;

/// The PVH `hvm_start_info` structure (xen/include/public/arch-x86/hvm/start_info.h).
/// Version 0 ends at `rsdp_paddr`; version 1 added the memory map.
#[repr(C)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

/// Called by the entry stub on the BSP stack, in long mode, with the first 4 GiB mapped.
pub extern "C" fn kit_main(start_info: u64) -> ! {
    // Locals on the BSP stack (inside the kit image): the boot area below 1 MiB may be reused
    // afterwards (the AP trampoline, or stamped pages), so nothing keeps pointing into it.
    // Left uninitialised: zeroing 4 KiB costs the emulated guest milliseconds, and only the
    // copied prefix is ever read.
    let mut cmdline = [MaybeUninit::<u8>::uninit(); CMDLINE_MAX];
    let mut memmap = [MaybeUninit::<MemmapEntry>::uninit(); MAX_MEMMAP_ENTRIES];

    // SAFETY: the PVH contract: EBX held the address of a valid hvm_start_info, below 4 GiB
    // (a 32-bit register), so it is identity-mapped; it is only read.
    let info = unsafe { core::ptr::read_unaligned(start_info as *const HvmStartInfo) };
    if info.magic != HVM_START_MAGIC {
        serial::begin_error();
        serial::write_str("bad hvm_start_info magic ");
        serial::write_hex(info.magic.into());
        serial::write_str(" at ");
        serial::write_hex(start_info);
        serial::end_error();
    }
    let cmdline = copy_cmdline(info.cmdline_paddr, &mut cmdline);
    let memmap = copy_memmap(&info, &mut memmap);

    let ram = RamMap::new(memmap);
    paging::map_ram(ram.end_gfn());
    tasks::run_all(cmdline, &ram)
}

/// Copies the NUL-terminated command line into `buf`; returns the copy (empty when there is
/// none).
fn copy_cmdline(paddr: u64, buf: &mut [MaybeUninit<u8>; CMDLINE_MAX]) -> &[u8] {
    let mut len = 0;
    if paddr != 0 && paddr < 1 << 32 {
        while len < CMDLINE_MAX - 1 {
            // SAFETY: the loader put a NUL-terminated string of at most CMDLINE_MAX bytes at
            // `paddr` (below 4 GiB, so mapped); reading stops at the NUL.
            let byte = unsafe { core::ptr::read_volatile((paddr + len as u64) as *const u8) };
            if byte == 0 {
                break;
            }
            buf[len].write(byte);
            len += 1;
        }
    }
    // SAFETY: the first `len` bytes were written just above.
    unsafe { core::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), len) }
}

/// Copies the memory map (start info version 1 and later) into `buf`; returns the copy.
fn copy_memmap<'a>(
    info: &HvmStartInfo,
    buf: &'a mut [MaybeUninit<MemmapEntry>; MAX_MEMMAP_ENTRIES],
) -> &'a [MemmapEntry] {
    if info.version < 1 || info.memmap_paddr == 0 || info.memmap_paddr >= 1 << 32 {
        return &[];
    }
    let count = info.memmap_entries as usize;
    if count > MAX_MEMMAP_ENTRIES {
        serial::begin_error();
        serial::write_str("memory map has too many entries: ");
        serial::write_dec(count as u64);
        serial::end_error();
    }
    let table = info.memmap_paddr as *const MemmapEntry;
    for (i, slot) in buf.iter_mut().enumerate().take(count) {
        // SAFETY: the loader's table has `count` entries at `memmap_paddr` (below 4 GiB, so
        // mapped); read_unaligned because nothing promises its alignment.
        slot.write(unsafe { core::ptr::read_unaligned(table.add(i)) });
    }
    // SAFETY: the first `count` entries were written just above.
    unsafe { core::slice::from_raw_parts(buf.as_ptr().cast::<MemmapEntry>(), count) }
}
