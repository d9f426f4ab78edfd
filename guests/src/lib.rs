//! Veil's test guests, built from source together with the workspace.
//!
//! For now there is one: the **guest kit** (`guests/kit`), a tiny x86-64 PVH kernel that runs
//! the tasks named on its command line (greet, stamp pages, check stamps, fault, exit with a
//! status) and reports on COM1 and the exit port. `docs/guest-kit.md` describes its command
//! line; `veil_guest_abi` holds the ports, boot layout, stamp formula and exit statuses it
//! shares with the VMM.
//!
//! This crate's build script builds the kit with a nested `cargo build --release`; no binary
//! is checked in.

use std::path::Path;

/// The guest kit: a static x86-64 ELF linked at 1 MiB (`veil_guest_abi::KERNEL_START`) with a
/// Xen `PHYS32_ENTRY` note, i.e. a PVH kernel. Load it like any PVH kernel: its segments at
/// their physical addresses, then enter the note's address in 32-bit flat protected mode,
/// paging off, with EBX pointing at an `hvm_start_info` (version 1, with a memory map).
pub const KIT_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/veil-kit"));

/// The file [`KIT_ELF`] was read from, in this crate's build output directory (under the
/// target directory of the build that compiled this crate).
///
/// For tools that want a path, such as `qemu-system-x86_64 -kernel` or `veil run`. The file
/// is there as long as that target directory is; [`KIT_ELF`] is always available.
pub fn kit_elf_path() -> &'static Path {
    Path::new(concat!(env!("OUT_DIR"), "/veil-kit"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u16_at(b: &[u8], at: usize) -> u16 {
        u16::from_le_bytes(b[at..at + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// Program headers as (type, file offset, physical address, file size, memory size).
    fn program_headers(elf: &[u8]) -> Vec<(u32, usize, u64, usize, u64)> {
        let phoff = u64_at(elf, 0x20) as usize;
        let (size, count) = (u16_at(elf, 0x36) as usize, u16_at(elf, 0x38) as usize);
        (0..count)
            .map(|i| {
                let p = phoff + i * size;
                (
                    u32_at(elf, p),
                    u64_at(elf, p + 8) as usize,
                    u64_at(elf, p + 24),
                    u64_at(elf, p + 32) as usize,
                    u64_at(elf, p + 40),
                )
            })
            .collect()
    }

    #[test]
    fn kit_is_a_static_x86_64_elf_at_one_mib() {
        assert_eq!(&KIT_ELF[..4], b"\x7fELF");
        assert_eq!(KIT_ELF[4], 2, "64-bit ELF");
        assert_eq!(u16_at(KIT_ELF, 0x10), 2, "ET_EXEC");
        assert_eq!(u16_at(KIT_ELF, 0x12), 0x3e, "x86-64");
        let loads: Vec<_> = program_headers(KIT_ELF)
            .into_iter()
            .filter(|p| p.0 == 1)
            .collect();
        assert_eq!(loads.len(), 1);
        assert_eq!(loads[0].2, veil_guest_abi::KERNEL_START);
    }

    #[test]
    fn kit_has_a_pvh_entry_note_inside_its_image() {
        let headers = program_headers(KIT_ELF);
        let (_, offset, _, size, _) = *headers
            .iter()
            .find(|p| p.0 == 4)
            .expect("a PT_NOTE segment");
        let (_, _, load_addr, _, load_size) = *headers.iter().find(|p| p.0 == 1).unwrap();
        let notes = &KIT_ELF[offset..offset + size];
        let mut at = 0;
        let mut entry = None;
        while at + 12 <= notes.len() {
            let (namesz, descsz, kind) = (
                u32_at(notes, at) as usize,
                u32_at(notes, at + 4) as usize,
                u32_at(notes, at + 8),
            );
            let name = at + 12;
            let desc = name + namesz.next_multiple_of(4);
            if kind == 18 && &notes[name..name + namesz] == b"Xen\0" {
                assert!(descsz == 4 || descsz == 8);
                entry = Some(u32_at(notes, desc) as u64);
            }
            at = desc + descsz.next_multiple_of(4);
        }
        let entry = entry.expect("a Xen PHYS32_ENTRY note");
        assert!((load_addr..load_addr + load_size).contains(&entry));
    }

    #[test]
    fn kit_elf_path_holds_the_embedded_kit() {
        assert_eq!(std::fs::read(kit_elf_path()).unwrap(), KIT_ELF);
    }
}
