//! Which guest pages are private (encrypted) and which are shared, as the guest reported them.
//!
//! Everything starts private; shared pages are kept as sorted, merged runs of GFNs. A hostile
//! guest that alternates every page would make runs cost far more than a bitmap, so past a
//! threshold the map switches to one bit per page (and back when runs become few again): memory
//! is proportional to the number of runs, never worse than one bit per page plus a constant.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// What a page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PageState {
    /// Encrypted with the guest's key: migrated through the SEV firmware.
    Private,
    /// Plain data the guest shares with the host (DMA buffers): migrated in the clear.
    Shared,
}

/// A maximal run of pages in one state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    pub gfns: Range<u64>,
    pub state: PageState,
}

/// Bytes a run costs in the B-tree (key, value and node overhead, measured on x86-64).
const RUN_BYTES: u64 = 40;
/// Leave bitmap mode only when runs would cost a quarter of the bitmap: no flapping.
const SHRINK_FACTOR: u64 = 4;

#[derive(Debug, Clone)]
enum Repr {
    /// start -> end of each shared run; disjoint, non-adjacent.
    Runs(BTreeMap<u64, u64>),
    /// Bit set = shared; `runs` counts shared runs.
    Bitmap { words: Vec<u64>, runs: u64 },
}

/// The page-state map of a guest with `gfn_count` pages of GFN space.
#[derive(Debug, Clone)]
pub struct PageStateMap {
    gfn_count: u64,
    repr: Repr,
    shared_pages: u64,
}

/// The serialized form: the shared list, as migrated between hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageStateSnapshot {
    pub gfn_count: u64,
    pub shared: Vec<Range<u64>>,
}

/// A snapshot that cannot be a page-state map.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Invalid page-state map: {0}")]
pub struct InvalidSnapshot(&'static str);

impl PageStateMap {
    /// Every page private.
    pub fn all_private(gfn_count: u64) -> Self {
        Self {
            gfn_count,
            repr: Repr::Runs(BTreeMap::new()),
            shared_pages: 0,
        }
    }

    /// Number of GFNs covered.
    pub fn gfn_count(&self) -> u64 {
        self.gfn_count
    }

    /// Pages currently shared.
    pub fn shared_pages(&self) -> u64 {
        self.shared_pages
    }

    /// Number of shared runs.
    pub fn shared_run_count(&self) -> u64 {
        match &self.repr {
            Repr::Runs(runs) => runs.len() as u64,
            Repr::Bitmap { runs, .. } => *runs,
        }
    }

    /// Bytes of memory the map holds (excluding the struct itself).
    pub fn memory_bytes(&self) -> u64 {
        match &self.repr {
            Repr::Runs(runs) => runs.len() as u64 * RUN_BYTES,
            Repr::Bitmap { words, .. } => words.len() as u64 * 8,
        }
    }

    /// The most memory the map may ever hold: one bit per page, plus one run's worth.
    pub fn memory_bound(&self) -> u64 {
        self.gfn_count.div_ceil(64) * 8 + RUN_BYTES
    }

    /// Whether `gfn` is private. GFNs outside the map are private.
    pub fn is_private(&self, gfn: u64) -> bool {
        match &self.repr {
            Repr::Runs(runs) => runs
                .range(..=gfn)
                .next_back()
                .is_none_or(|(_, &end)| gfn >= end),
            Repr::Bitmap { words, .. } => !bit(words, gfn),
        }
    }

    /// Sets `gfns` (which must lie within the map) to `state`.
    ///
    /// # Panics
    /// If the range is outside the map: callers validate guest input first.
    pub fn set(&mut self, gfns: Range<u64>, state: PageState) {
        assert!(
            gfns.start <= gfns.end && gfns.end <= self.gfn_count,
            "range checked by caller"
        );
        if gfns.is_empty() {
            return;
        }
        let before = self.count_in(&gfns, PageState::Shared);
        match &mut self.repr {
            Repr::Runs(runs) => set_runs(runs, gfns.clone(), state),
            Repr::Bitmap { words, runs } => {
                let window = gfns.start.saturating_sub(1)..(gfns.end + 1).min(self.gfn_count);
                let old = count_run_starts(words, window.clone());
                set_bits(words, gfns.clone(), state == PageState::Shared);
                *runs = *runs - old + count_run_starts(words, window);
            }
        }
        let after = match state {
            PageState::Shared => gfns.end - gfns.start,
            PageState::Private => 0,
        };
        self.shared_pages = self.shared_pages - before + after;
        self.rebalance();
    }

    /// Switches representation when the other one is much smaller.
    fn rebalance(&mut self) {
        let bitmap_bytes = self.gfn_count.div_ceil(64) * 8;
        match &self.repr {
            Repr::Runs(runs) if runs.len() as u64 * RUN_BYTES > bitmap_bytes => {
                let mut words = vec![0u64; self.gfn_count.div_ceil(64) as usize];
                for (&start, &end) in runs {
                    set_bits(&mut words, start..end, true);
                }
                self.repr = Repr::Bitmap {
                    words,
                    runs: runs.len() as u64,
                };
            }
            Repr::Bitmap { runs, .. } if runs * RUN_BYTES * SHRINK_FACTOR < bitmap_bytes => {
                let runs = self
                    .shared_ranges()
                    .into_iter()
                    .map(|r| (r.start, r.end))
                    .collect();
                self.repr = Repr::Runs(runs);
            }
            _ => {}
        }
    }

    /// Pages of `state` within `gfns`.
    pub fn count_in(&self, gfns: &Range<u64>, state: PageState) -> u64 {
        let shared = match &self.repr {
            Repr::Runs(runs) => shared_runs_within(runs, gfns)
                .map(|r| r.end - r.start)
                .sum(),
            Repr::Bitmap { words, .. } => count_set(words, gfns.clone()),
        };
        match state {
            PageState::Shared => shared,
            PageState::Private => gfns.end.saturating_sub(gfns.start) - shared,
        }
    }

    /// The maximal runs of each state within `gfns`, in order.
    pub fn runs_in(&self, gfns: Range<u64>) -> impl Iterator<Item = PageRun> + '_ {
        let shared: Vec<Range<u64>> = match &self.repr {
            Repr::Runs(runs) => shared_runs_within(runs, &gfns).collect(),
            Repr::Bitmap { words, .. } => bitmap_runs(words, gfns.clone()),
        };
        let mut out = Vec::with_capacity(shared.len() * 2 + 1);
        let mut cursor = gfns.start;
        for r in shared {
            if r.start > cursor {
                out.push(PageRun {
                    gfns: cursor..r.start,
                    state: PageState::Private,
                });
            }
            cursor = r.end;
            out.push(PageRun {
                gfns: r,
                state: PageState::Shared,
            });
        }
        if cursor < gfns.end {
            out.push(PageRun {
                gfns: cursor..gfns.end,
                state: PageState::Private,
            });
        }
        out.into_iter()
    }

    /// Every shared range, sorted and merged.
    pub fn shared_ranges(&self) -> Vec<Range<u64>> {
        match &self.repr {
            Repr::Runs(runs) => runs.iter().map(|(&s, &e)| s..e).collect(),
            Repr::Bitmap { words, .. } => bitmap_runs(words, 0..self.gfn_count),
        }
    }

    /// The shared list, for migration.
    pub fn snapshot(&self) -> PageStateSnapshot {
        PageStateSnapshot {
            gfn_count: self.gfn_count,
            shared: self.shared_ranges(),
        }
    }

    /// Rebuilds a map from a snapshot sent by a peer, checking every range.
    pub fn from_snapshot(snapshot: &PageStateSnapshot) -> Result<Self, InvalidSnapshot> {
        let mut map = Self::all_private(snapshot.gfn_count);
        let mut previous_end = None;
        for r in &snapshot.shared {
            if r.start >= r.end {
                return Err(InvalidSnapshot("empty or reversed range"));
            }
            if r.end > snapshot.gfn_count {
                return Err(InvalidSnapshot("range beyond guest memory"));
            }
            if previous_end.is_some_and(|end| r.start <= end) {
                return Err(InvalidSnapshot("ranges not sorted and merged"));
            }
            previous_end = Some(r.end);
            map.set(r.clone(), PageState::Shared);
        }
        Ok(map)
    }
}

/// The shared runs overlapping `gfns`, clipped to it, in order.
fn shared_runs_within<'a>(
    runs: &'a BTreeMap<u64, u64>,
    gfns: &'a Range<u64>,
) -> impl Iterator<Item = Range<u64>> + 'a {
    // The run starting at or before `gfns.start` may reach into it.
    let first = runs
        .range(..=gfns.start)
        .next_back()
        .map_or(gfns.start, |(&s, _)| s);
    runs.range(first..gfns.end)
        .map(|(&s, &e)| s.max(gfns.start)..e.min(gfns.end))
        .filter(|r| !r.is_empty())
}

fn set_runs(runs: &mut BTreeMap<u64, u64>, gfns: Range<u64>, state: PageState) {
    // Runs touching [start, end] (adjacent ones too, so shared runs merge).
    let first = runs
        .range(..=gfns.start)
        .next_back()
        .filter(|(_, &e)| e >= gfns.start)
        .map_or(gfns.start, |(&s, _)| s);
    // Almost always zero to two runs: keep them off the heap.
    let touching: SmallVec<[(u64, u64); 4]> = runs
        .range(first..=gfns.end)
        .map(|(&s, &e)| (s, e))
        .collect();
    for (s, _) in &touching {
        runs.remove(s);
    }
    match state {
        PageState::Shared => {
            let start = touching
                .first()
                .map_or(gfns.start, |&(s, _)| s.min(gfns.start));
            let end = touching.last().map_or(gfns.end, |&(_, e)| e.max(gfns.end));
            runs.insert(start, end);
        }
        PageState::Private => {
            for (s, e) in touching {
                if s < gfns.start {
                    runs.insert(s, e.min(gfns.start));
                }
                if e > gfns.end {
                    runs.insert(gfns.end.max(s), e);
                }
            }
        }
    }
}

fn bit(words: &[u64], gfn: u64) -> bool {
    words
        .get((gfn / 64) as usize)
        .is_some_and(|w| w & (1 << (gfn % 64)) != 0)
}

fn set_bits(words: &mut [u64], gfns: Range<u64>, value: bool) {
    for_each_word(gfns, |w, mask| {
        if value {
            words[w] |= mask;
        } else {
            words[w] &= !mask;
        }
    });
}

/// Calls `f(word index, mask)` for each word overlapping `gfns`, with the bits inside `gfns`.
fn for_each_word(gfns: Range<u64>, mut f: impl FnMut(usize, u64)) {
    let mut gfn = gfns.start;
    while gfn < gfns.end {
        let lo = gfn % 64;
        let hi = (gfns.end - (gfn - lo)).min(64);
        let mask = if hi - lo == 64 {
            u64::MAX
        } else {
            ((1u64 << (hi - lo)) - 1) << lo
        };
        f((gfn / 64) as usize, mask);
        gfn = gfn - lo + hi;
    }
}

/// Set bits within `gfns`.
fn count_set(words: &[u64], gfns: Range<u64>) -> u64 {
    let mut n = 0;
    for_each_word(gfns, |w, mask| {
        n += u64::from((words[w] & mask).count_ones())
    });
    n
}

/// Shared runs that start within `window` (a run starts where a set bit follows a clear one).
fn count_run_starts(words: &[u64], window: Range<u64>) -> u64 {
    let mut n = 0;
    for_each_word(window, |w, mask| {
        let carry = if w == 0 { 0 } else { words[w - 1] >> 63 };
        let starts = words[w] & !((words[w] << 1) | carry);
        n += u64::from((starts & mask).count_ones());
    });
    n
}

fn bitmap_runs(words: &[u64], gfns: Range<u64>) -> Vec<Range<u64>> {
    let mut out = Vec::new();
    let mut gfn = gfns.start;
    while gfn < gfns.end {
        // Skip whole clear words quickly.
        if gfn.is_multiple_of(64) && words[(gfn / 64) as usize] == 0 {
            gfn += 64;
            continue;
        }
        if bit(words, gfn) {
            let start = gfn;
            while gfn < gfns.end && bit(words, gfn) {
                gfn += 1;
            }
            out.push(start..gfn);
        } else {
            gfn += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One bit per page: obviously right, used as the model.
    struct NaiveMap(Vec<bool>);

    impl NaiveMap {
        fn set(&mut self, gfns: Range<u64>, state: PageState) {
            for g in gfns {
                self.0[g as usize] = state == PageState::Shared;
            }
        }
        fn shared_ranges(&self) -> Vec<Range<u64>> {
            let mut out: Vec<Range<u64>> = Vec::new();
            for (g, &shared) in self.0.iter().enumerate() {
                let g = g as u64;
                if shared {
                    match out.last_mut() {
                        Some(r) if r.end == g => r.end += 1,
                        _ => out.push(g..g + 1),
                    }
                }
            }
            out
        }
    }

    fn op(gfn_count: u64) -> impl Strategy<Value = (Range<u64>, PageState)> {
        (0..gfn_count, 1..=64u64, any::<bool>()).prop_map(move |(start, len, shared)| {
            let end = (start + len).min(gfn_count);
            let state = if shared {
                PageState::Shared
            } else {
                PageState::Private
            };
            (start..end, state)
        })
    }

    fn check_against_model(map: &PageStateMap, model: &NaiveMap) {
        assert_eq!(map.shared_ranges(), model.shared_ranges());
        let shared = model.0.iter().filter(|&&s| s).count() as u64;
        assert_eq!(map.shared_pages(), shared);
        assert_eq!(map.shared_run_count(), model.shared_ranges().len() as u64);
        for g in 0..map.gfn_count() {
            assert_eq!(map.is_private(g), !model.0[g as usize], "gfn {g}");
        }
        assert!(map.memory_bytes() <= map.memory_bound());
    }

    proptest! {
        #[test]
        fn matches_a_one_bit_per_page_model(ops in proptest::collection::vec(op(512), 1..200)) {
            let mut map = PageStateMap::all_private(512);
            let mut model = NaiveMap(vec![false; 512]);
            for (gfns, state) in ops {
                map.set(gfns.clone(), state);
                model.set(gfns, state);
            }
            check_against_model(&map, &model);
        }

        #[test]
        fn runs_in_a_window_tile_it(ops in proptest::collection::vec(op(300), 1..60), a in 0..300u64, b in 0..300u64) {
            let mut map = PageStateMap::all_private(300);
            let mut model = NaiveMap(vec![false; 300]);
            for (gfns, state) in ops {
                map.set(gfns.clone(), state);
                model.set(gfns, state);
            }
            let window = a.min(b)..a.max(b);
            let runs: Vec<PageRun> = map.runs_in(window.clone()).collect();
            let mut cursor = window.start;
            for (i, run) in runs.iter().enumerate() {
                prop_assert_eq!(run.gfns.start, cursor);
                prop_assert!(!run.gfns.is_empty());
                if i > 0 { prop_assert_ne!(runs[i - 1].state, run.state); }
                for g in run.gfns.clone() {
                    prop_assert_eq!(model.0[g as usize], run.state == PageState::Shared);
                }
                cursor = run.gfns.end;
            }
            prop_assert_eq!(cursor, window.end);
        }

        #[test]
        fn snapshots_round_trip(ops in proptest::collection::vec(op(256), 0..50)) {
            let mut map = PageStateMap::all_private(256);
            for (gfns, state) in ops { map.set(gfns, state); }
            let back = PageStateMap::from_snapshot(&map.snapshot()).unwrap();
            prop_assert_eq!(back.shared_ranges(), map.shared_ranges());
        }
    }

    #[test]
    fn hostile_alternating_guest_stays_within_one_bit_per_page() {
        let pages = 1 << 20; // 4 GiB of guest
        let mut map = PageStateMap::all_private(pages);
        for g in (0..pages).step_by(2) {
            map.set(g..g + 1, PageState::Shared);
            assert!(map.memory_bytes() <= map.memory_bound());
        }
        assert_eq!(map.shared_run_count(), pages / 2);
        assert_eq!(map.memory_bytes(), pages / 8);
        // Healing the map brings it back to runs.
        map.set(0..pages, PageState::Private);
        assert_eq!(map.memory_bytes(), 0);
        assert!(map.is_private(12345));
    }

    #[test]
    fn invalid_snapshots_are_refused() {
        let bad = |shared: Vec<Range<u64>>| {
            PageStateMap::from_snapshot(&PageStateSnapshot {
                gfn_count: 100,
                shared,
            })
        };
        assert!(bad(vec![Range { start: 5, end: 5 }]).is_err());
        assert!(bad(vec![Range {
            start: 90,
            end: 101
        }])
        .is_err());
        assert!(bad(vec![10..20, 20..30]).is_err());
        assert!(bad(vec![30..40, 10..20]).is_err());
        assert!(bad(vec![10..20, 21..30]).is_ok());
    }

    #[test]
    fn concurrent_updaters_and_a_reader_agree_with_the_model() {
        use std::sync::{Arc, RwLock};
        let pages = 4096u64;
        let map = Arc::new(RwLock::new(PageStateMap::all_private(pages)));
        let updaters: Vec<_> = (0..2u64)
            .map(|t| {
                let map = Arc::clone(&map);
                std::thread::spawn(move || {
                    // Each updater owns half the GFN space, so the final state is determined.
                    let base = t * pages / 2;
                    let mut model = vec![false; (pages / 2) as usize];
                    let mut x = 0x9e37_79b9u64 + t;
                    for _ in 0..5000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let start = x % (pages / 2);
                        let end = (start + 1 + (x >> 32) % 40).min(pages / 2);
                        let shared = x & 1 == 0;
                        let state = if shared {
                            PageState::Shared
                        } else {
                            PageState::Private
                        };
                        map.write().unwrap().set(base + start..base + end, state);
                        for g in start..end {
                            model[g as usize] = shared;
                        }
                    }
                    model
                })
            })
            .collect();
        let reader = {
            let map = Arc::clone(&map);
            std::thread::spawn(move || {
                for _ in 0..2000 {
                    let m = map.read().unwrap();
                    let ranges = m.shared_ranges();
                    assert!(
                        ranges.windows(2).all(|w| w[0].end < w[1].start),
                        "sorted and merged"
                    );
                    assert_eq!(
                        ranges.iter().map(|r| r.end - r.start).sum::<u64>(),
                        m.shared_pages()
                    );
                }
            })
        };
        let mut model = Vec::new();
        for u in updaters {
            model.extend(u.join().unwrap());
        }
        reader.join().unwrap();
        check_against_model(&map.read().unwrap(), &NaiveMap(model));
    }
}
