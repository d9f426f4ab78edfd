//! PVH boot: `hvm_start_info`, its memory map and module list
//! (<https://xenbits.xen.org/docs/unstable/misc/pvh.html>).

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};

use super::{BootError, E820Entry, LoadedKind, LoadedRange};
use crate::layout::{MEMMAP_START, PVH_INFO_START, PVH_MODLIST_START};
use crate::memory::GuestMemory;

/// `XEN_HVM_START_MAGIC_VALUE`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

pub(super) fn start_info(
    cmdline: LoadedRange,
    initrd: Option<LoadedRange>,
    e820: &[E820Entry],
) -> (
    hvm_start_info,
    Vec<hvm_memmap_table_entry>,
    Vec<hvm_modlist_entry>,
) {
    let memmap: Vec<_> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let modules: Vec<_> = initrd
        .iter()
        .map(|r| hvm_modlist_entry {
            paddr: r.start.0,
            size: r.len,
            ..Default::default()
        })
        .collect();
    let info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() {
            0
        } else {
            PVH_MODLIST_START.0
        },
        cmdline_paddr: cmdline.start.0,
        memmap_paddr: MEMMAP_START.0,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    (info, memmap, modules)
}

pub(super) fn write_start_info(
    memory: &GuestMemory,
    cmdline: LoadedRange,
    initrd: Option<LoadedRange>,
    e820: &[E820Entry],
) -> Result<Vec<LoadedRange>, BootError> {
    let (info, memmap, modules) = start_info(cmdline, initrd, e820);
    let mut params = BootParams::new(&info, PVH_INFO_START);
    params.set_sections(&memmap, MEMMAP_START);
    let mut loaded = vec![
        range(PVH_INFO_START.0, size_of::<hvm_start_info>()),
        range(
            MEMMAP_START.0,
            memmap.len() * size_of::<hvm_memmap_table_entry>(),
        ),
    ];
    if !modules.is_empty() {
        params.set_modules(&modules, PVH_MODLIST_START);
        loaded.push(range(
            PVH_MODLIST_START.0,
            modules.len() * size_of::<hvm_modlist_entry>(),
        ));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, memory)
        .map_err(BootError::WriteBootParams)?;
    Ok(loaded)
}

fn range(start: u64, len: usize) -> LoadedRange {
    LoadedRange {
        kind: LoadedKind::BootParams,
        start: vm_memory::GuestAddress(start),
        len: len as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::E820_RAM;
    use vm_memory::{ByteValued, GuestAddress};

    fn le_u64(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }
    fn le_u32(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn start_info_has_the_documented_layout() {
        let cmdline = LoadedRange {
            kind: LoadedKind::Cmdline,
            start: GuestAddress(0x20000),
            len: 5,
        };
        let initrd = LoadedRange {
            kind: LoadedKind::Initrd,
            start: GuestAddress(0x100_0000),
            len: 0x1234,
        };
        let e820 = [E820Entry {
            addr: 0x10_0000,
            size: 0x300_0000,
            kind: E820_RAM,
        }];
        let (info, memmap, modules) = start_info(cmdline, Some(initrd), &e820);
        // Offsets from xen/include/public/arch-x86/hvm/start_info.h.
        let b = info.as_slice();
        assert_eq!(b.len(), 56);
        assert_eq!(le_u32(b, 0), 0x336e_c578);
        assert_eq!(le_u32(b, 4), 1);
        assert_eq!(le_u32(b, 12), 1);
        assert_eq!(le_u64(b, 16), PVH_MODLIST_START.0);
        assert_eq!(le_u64(b, 24), 0x20000);
        assert_eq!(le_u64(b, 40), MEMMAP_START.0);
        assert_eq!(le_u32(b, 48), 1);
        let m = memmap[0].as_slice();
        assert_eq!(m.len(), 24);
        assert_eq!(
            (le_u64(m, 0), le_u64(m, 8), le_u32(m, 16)),
            (0x10_0000, 0x300_0000, 1)
        );
        let module = modules[0].as_slice();
        assert_eq!(module.len(), 32);
        assert_eq!((le_u64(module, 0), le_u64(module, 8)), (0x100_0000, 0x1234));
    }
}
