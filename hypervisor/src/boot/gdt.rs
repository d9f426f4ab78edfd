//! The flat GDT and segment registers of a 32-bit boot entry.
//!
//! Selectors follow the Linux boot protocol (`__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18), which
//! PVH kernels accept as well.

use kvm_bindings::kvm_segment;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::BOOT_GDT_START;
use crate::memory::GuestMemory;

/// Null, null, flat 32-bit code, flat data, a 32-bit TSS (needed for a valid TR on VMX).
const BOOT_GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];
/// Bytes of the boot GDT in guest memory.
pub const BOOT_GDT_BYTES: u64 = BOOT_GDT.len() as u64 * 8;
const CODE_INDEX: u16 = 2;
const DATA_INDEX: u16 = 3;
const TSS_INDEX: u16 = 4;

/// Packs a descriptor from its flags (access byte low, granularity nibble high), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The segment-register view of one descriptor.
fn segment(index: u16) -> kvm_segment {
    let entry = BOOT_GDT[index as usize];
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// Segment registers for a 32-bit flat entry.
#[derive(Debug, Clone, Copy)]
pub struct BootSegments {
    pub code: kvm_segment,
    pub data: kvm_segment,
    pub tss: kvm_segment,
    pub gdt_base: u64,
    pub gdt_limit: u16,
}

/// The segments matching [`write_boot_gdt`].
pub fn boot_segments() -> BootSegments {
    BootSegments {
        code: segment(CODE_INDEX),
        data: segment(DATA_INDEX),
        tss: segment(TSS_INDEX),
        gdt_base: BOOT_GDT_START.0,
        gdt_limit: (BOOT_GDT.len() * 8 - 1) as u16,
    }
}

/// Writes the boot GDT into guest memory.
pub fn write_boot_gdt(memory: &GuestMemory) -> Result<(), vm_memory::GuestMemoryError> {
    for (i, entry) in BOOT_GDT.iter().enumerate() {
        memory.write_obj(*entry, GuestAddress(BOOT_GDT_START.0 + i as u64 * 8))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_well_known_encodings() {
        // The values every x86 boot loader uses for flat 4 GiB segments.
        assert_eq!(BOOT_GDT[2], 0x00cf_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn segments_decode_their_descriptors() {
        let s = boot_segments();
        assert_eq!(s.code.selector, 0x10);
        assert_eq!(s.data.selector, 0x18);
        assert_eq!(s.code.limit, 0xffff_ffff);
        assert_eq!(
            (s.code.type_, s.code.db, s.code.l, s.code.s, s.code.present),
            (0xb, 1, 0, 1, 1)
        );
        assert_eq!((s.data.type_, s.data.db), (0x3, 1));
        assert_eq!((s.tss.type_, s.tss.s, s.tss.limit), (0xb, 0, 0x67));
    }
}
