//! One bit per guest page, for what a migration has to remember about every page (sent,
//! written) without memory that grows faster than 1/32768 of the guest's.
//!
//! The bits are atomic so that the threads of a migration over several streams share one
//! map: a stream's pages come in 2 MiB blocks ([`crate::protocol::stream_of`]), so no two
//! streams ever touch the same word, and the atomics cost what plain stores do.

use std::sync::atomic::{AtomicU64, Ordering};

/// A bit per guest frame number below an end; frames past it read as clear and are never set.
#[derive(Debug)]
pub(crate) struct PageBits {
    words: Vec<AtomicU64>,
}

impl PageBits {
    /// Room for frames `0..end_gfn`.
    pub(crate) fn below(end_gfn: u64) -> Self {
        Self {
            words: (0..end_gfn.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
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
    pub(crate) fn set(&self, gfn: u64) -> bool {
        self.word(gfn)
            .is_some_and(|(word, bit)| word.fetch_or(bit, Ordering::Relaxed) & bit != 0)
    }

    /// Clears `gfn`'s bit; whether it was set before.
    pub(crate) fn clear(&self, gfn: u64) -> bool {
        self.word(gfn)
            .is_some_and(|(word, bit)| word.fetch_and(!bit, Ordering::Relaxed) & bit != 0)
    }

    /// How many bits are set, and the lowest one.
    pub(crate) fn census(&self) -> (u64, Option<u64>) {
        let mut count = 0;
        let mut first = None;
        for (i, word) in self.words.iter().enumerate() {
            let bits = word.load(Ordering::Relaxed);
            if bits != 0 {
                count += u64::from(bits.count_ones());
                first = first.or(Some(i as u64 * 64 + u64::from(bits.trailing_zeros())));
            }
        }
        (count, first)
    }

    fn word(&self, gfn: u64) -> Option<(&AtomicU64, u64)> {
        let word = self.words.get(usize::try_from(gfn / 64).ok()?)?;
        Some((word, 1 << (gfn % 64)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_set_and_clear_and_stray_gfns_are_ignored() {
        let bits = PageBits::below(128);
        let words = |bits: &PageBits| -> Vec<u64> {
            bits.words
                .iter()
                .map(|w| w.load(Ordering::Relaxed))
                .collect()
        };
        assert!(!bits.set(5));
        assert!(bits.set(5));
        assert!(!bits.set(127));
        assert!(bits.set(127));
        // Beyond the bitmap: never a panic, never "set".
        assert!(!bits.set(128));
        assert!(!bits.set(u64::MAX));
        assert_eq!(words(&bits), [1 << 5, 1 << 63]);
        assert!(bits.clear(5));
        assert!(!bits.clear(5));
        assert!(!bits.clear(u64::MAX));
        assert_eq!(words(&bits), [0, 1 << 63]);
        assert_eq!(bits.census(), (1, Some(127)));
        bits.set(70);
        assert_eq!(bits.census(), (2, Some(70)));
        assert_eq!(PageBits::below(10).census(), (0, None));
    }
}
