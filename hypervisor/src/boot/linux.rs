//! The Linux x86 boot protocol's `boot_params` for bzImage kernels
//! (Documentation/arch/x86/boot.rst, Documentation/arch/x86/zero-page.rst).

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::{BootError, E820Entry, LoadedKind, LoadedRange};
use crate::layout::ZERO_PAGE_START;
use crate::memory::GuestMemory;

/// `type_of_loader` for a boot loader without an assigned id.
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// `loadflags`: the kernel may use the heap up to `heap_end_ptr`.
const CAN_USE_HEAP: u8 = 0x80;
/// `boot_flag` every valid header carries.
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// "HdrS".
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// The real-mode heap ends below the command line, as boot.rst suggests.
const HEAP_END: u16 = 0xfe00;

pub(super) fn boot_params_for(
    header: setup_header,
    cmdline: LoadedRange,
    initrd: Option<LoadedRange>,
    e820: &[E820Entry],
) -> boot_params {
    let mut params = boot_params {
        hdr: header,
        ..Default::default()
    };
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = HEAP_END;
    params.hdr.cmd_line_ptr = cmdline.start.0 as u32;
    params.hdr.cmdline_size = cmdline.len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.start.0 as u32;
        params.hdr.ramdisk_size = initrd.len as u32;
    }
    let count = e820.len().min(params.e820_table.len());
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    params.e820_entries = count as u8;
    params
}

pub(super) fn write_boot_params(
    memory: &GuestMemory,
    header: setup_header,
    cmdline: LoadedRange,
    initrd: Option<LoadedRange>,
    e820: &[E820Entry],
) -> Result<Vec<LoadedRange>, BootError> {
    let params = boot_params_for(header, cmdline, initrd, e820);
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new(&params, ZERO_PAGE_START),
        memory,
    )
    .map_err(BootError::WriteBootParams)?;
    Ok(vec![LoadedRange {
        kind: LoadedKind::BootParams,
        start: ZERO_PAGE_START,
        len: size_of::<boot_params>() as u64,
    }])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::boot::E820_RAM;
    use vm_memory::{ByteValued, GuestAddress};

    fn le_u32(bytes: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap())
    }
    fn le_u64(bytes: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap())
    }

    #[test]
    fn zero_page_fields_sit_where_zero_page_rst_says() {
        let cmdline = LoadedRange {
            kind: LoadedKind::Cmdline,
            start: GuestAddress(0x20000),
            len: 12,
        };
        let initrd = LoadedRange {
            kind: LoadedKind::Initrd,
            start: GuestAddress(0x200_0000),
            len: 0x5000,
        };
        let e820 = [
            E820Entry {
                addr: 0,
                size: 0xa0000,
                kind: E820_RAM,
            },
            E820Entry {
                addr: 0x10_0000,
                size: 0x100_0000,
                kind: E820_RAM,
            },
        ];
        let params = boot_params_for(setup_header::default(), cmdline, Some(initrd), &e820);
        let b = params.as_slice();
        assert_eq!(b.len(), 4096);
        assert_eq!(b[0x1e8], 2, "e820_entries");
        assert_eq!(
            u16::from_le_bytes([b[0x1fe], b[0x1ff]]),
            0xaa55,
            "boot_flag"
        );
        assert_eq!(le_u32(b, 0x202), 0x5372_6448, "header magic");
        assert_eq!(b[0x210], 0xff, "type_of_loader");
        assert_ne!(b[0x211] & 0x80, 0, "loadflags CAN_USE_HEAP");
        assert_eq!(le_u32(b, 0x218), 0x200_0000, "ramdisk_image");
        assert_eq!(le_u32(b, 0x21c), 0x5000, "ramdisk_size");
        assert_eq!(le_u32(b, 0x228), 0x20000, "cmd_line_ptr");
        assert_eq!(le_u32(b, 0x238), 12, "cmdline_size");
        // e820_table at 0x2d0, 20 bytes per entry.
        assert_eq!(le_u64(b, 0x2d0 + 20), 0x10_0000);
        assert_eq!(le_u64(b, 0x2d0 + 28), 0x100_0000);
        assert_eq!(le_u32(b, 0x2d0 + 36), E820_RAM);
    }
}
