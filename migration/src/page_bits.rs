//! One bit per guest page, for what a migration has to remember about every page (sent,
//! written) without memory that grows faster than 1/32768 of the guest's.

/// A bit per guest frame number below an end; frames past it read as clear and are never set.
#[derive(Debug)]
pub(crate) struct PageBits {
    words: Vec<u64>,
}

impl PageBits {
    /// Room for frames `0..end_gfn`.
    pub(crate) fn below(end_gfn: u64) -> Self {
        Self {
            words: vec![0; end_gfn.div_ceil(64) as usize],
        }
    }

    /// Room for every frame of `memory`'s RAM.
    pub(crate) fn covering(memory: &veil_hypervisor::GuestMemory) -> Self {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let end = memory
            .iter()
            .map(|r| r.last_addr().0 + 1)
            .max()
            .unwrap_or(0);
        Self::below(end / veil_hypervisor::memory::PAGE_SIZE)
    }

    /// Sets `gfn`'s bit; whether it was set before.
    pub(crate) fn set(&mut self, gfn: u64) -> bool {
        self.update(gfn, |word, bit| *word |= bit)
    }

    /// Clears `gfn`'s bit; whether it was set before.
    pub(crate) fn clear(&mut self, gfn: u64) -> bool {
        self.update(gfn, |word, bit| *word &= !bit)
    }

    fn update(&mut self, gfn: u64, change: impl FnOnce(&mut u64, u64)) -> bool {
        let Some(word) = self.words.get_mut((gfn / 64) as usize) else {
            return false;
        };
        let bit = 1 << (gfn % 64);
        let before = *word & bit != 0;
        change(word, bit);
        before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_set_and_clear_and_stray_gfns_are_ignored() {
        let mut bits = PageBits::below(128);
        assert!(!bits.set(5));
        assert!(bits.set(5));
        assert!(!bits.set(127));
        assert!(bits.set(127));
        // Beyond the bitmap: never a panic, never "set".
        assert!(!bits.set(128));
        assert!(!bits.set(u64::MAX));
        assert_eq!(bits.words, [1 << 5, 1 << 63]);
        assert!(bits.clear(5));
        assert!(!bits.clear(5));
        assert!(!bits.clear(u64::MAX));
        assert_eq!(bits.words, [0, 1 << 63]);
    }
}
