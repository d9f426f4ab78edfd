//! The physical memory map both boot protocols hand the kernel.

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::{EBDA_START, KERNEL_START};
use crate::memory::GuestMemory;

/// Usable RAM (E820 type 1).
pub const E820_RAM: u32 = 1;
/// Reserved (E820 type 2).
pub const E820_RESERVED: u32 = 2;

/// One memory-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

/// RAM below the legacy hole, the hole itself as reserved, then every RAM region above 1 MiB.
pub fn e820_map(memory: &GuestMemory) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: KERNEL_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for region in memory.iter() {
        let start = region.start_addr().0.max(KERNEL_START);
        let end = region.start_addr().0 + region.len();
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{HIGH_RAM_START, MMIO32_START};
    use crate::memory::{GuestRam, MemoryConfig};

    #[test]
    fn covers_all_ram_and_skips_the_legacy_and_mmio_holes() {
        let ram = GuestRam::new(&MemoryConfig {
            size: MMIO32_START + (16 << 20),
            file: None,
        })
        .unwrap();
        let map = e820_map(ram.memory());
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            E820Entry {
                addr: KERNEL_START,
                size: MMIO32_START - KERNEL_START,
                kind: E820_RAM
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: HIGH_RAM_START,
                size: 16 << 20,
                kind: E820_RAM
            }
        );
        let ram_total: u64 = map
            .iter()
            .filter(|e| e.kind == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(
            ram_total,
            MMIO32_START + (16 << 20) - (KERNEL_START - EBDA_START)
        );
    }
}
