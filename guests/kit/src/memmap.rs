//! Which guest frames are RAM, from the PVH memory map.

use crate::layout::MAPPED_GIB;

/// Most memory-map entries the kit reads.
pub const MAX_MEMMAP_ENTRIES: usize = 128;
/// `hvm_memmap_table_entry.type` of usable RAM.
const TYPE_RAM: u32 = 1;
/// Frames the identity map can reach.
const MAPPED_GFNS: u64 = (MAPPED_GIB as u64) << (30 - 12);

/// One PVH memory-map entry.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub struct MemmapEntry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
    pub reserved: u32,
}

/// RAM as sorted, disjoint, non-adjacent frame ranges `[start, end)` of whole pages, clipped
/// to what the kit maps.
pub struct RamMap {
    regions: [(u64, u64); MAX_MEMMAP_ENTRIES],
    len: usize,
}

impl RamMap {
    /// Builds the map from the loader's entries (any order, possibly overlapping).
    pub fn new(entries: &[MemmapEntry]) -> Self {
        let mut map = RamMap {
            regions: [(0, 0); MAX_MEMMAP_ENTRIES],
            len: 0,
        };
        for e in entries.iter().filter(|e| e.kind == TYPE_RAM) {
            // Only whole pages count: a partial page at either end is not usable.
            let start = e.addr.div_ceil(veil_guest_abi::PAGE_SIZE);
            let end = (e.addr.saturating_add(e.size) / veil_guest_abi::PAGE_SIZE).min(MAPPED_GFNS);
            if start < end {
                map.insert(start, end);
            }
        }
        map
    }

    /// Inserts `[start, end)`, keeping the list sorted (insertion sort: a handful of entries),
    /// then merges overlapping or touching ranges.
    fn insert(&mut self, start: u64, end: u64) {
        let mut i = self.len;
        while i > 0 && self.regions[i - 1].0 > start {
            self.regions[i] = self.regions[i - 1];
            i -= 1;
        }
        self.regions[i] = (start, end);
        self.len += 1;
        let mut merged = 0;
        for j in 1..self.len {
            let (s, e) = self.regions[j];
            if s <= self.regions[merged].1 {
                self.regions[merged].1 = self.regions[merged].1.max(e);
            } else {
                merged += 1;
                self.regions[merged] = (s, e);
            }
        }
        self.len = merged + 1;
    }

    /// One past the highest RAM frame (0 without RAM).
    pub fn end_gfn(&self) -> u64 {
        if self.len == 0 {
            0
        } else {
            self.regions[self.len - 1].1
        }
    }

    /// The frame ranges `[start, end)` that are not RAM, up to `u64::MAX`.
    pub fn holes(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let starts = core::iter::once(0).chain(self.regions[..self.len].iter().map(|r| r.1));
        let ends = self.regions[..self.len]
            .iter()
            .map(|r| r.0)
            .chain(core::iter::once(u64::MAX));
        starts.zip(ends).filter(|(s, e)| s < e)
    }
}
