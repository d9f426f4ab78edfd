//! Page-state map updates per second against a naive one-bit-per-page map, same workload,
//! same run: single-threaded, and two updater threads plus a reader. Also prints memory per run.
//!
//! `cargo bench -p veil-hypervisor --bench page_state`

use std::ops::Range;
use std::sync::{Arc, RwLock};
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use veil_hypervisor::paravirt::{PageState, PageStateMap};

/// 4 GiB of guest.
const PAGES: u64 = 1 << 20;
const OPS: usize = 10_000;

/// The obvious alternative: one bit per page, a range update touches every page.
struct NaiveBitmap(Vec<u64>);

impl NaiveBitmap {
    fn set(&mut self, gfns: Range<u64>, state: PageState) {
        for g in gfns {
            let (w, b) = ((g / 64) as usize, g % 64);
            match state {
                PageState::Shared => self.0[w] |= 1 << b,
                PageState::Private => self.0[w] &= !(1 << b),
            }
        }
    }
    fn is_private(&self, g: u64) -> bool {
        self.0[(g / 64) as usize] & (1 << (g % 64)) == 0
    }
}

/// What Linux guests do: mostly short-lived shares and unshares of DMA buffers of 1 to 512
/// pages (one 2 MiB mapping), deterministic so both maps see the same sequence.
fn workload(seed: u64) -> Vec<(Range<u64>, PageState)> {
    let mut x = seed | 1;
    (0..OPS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 1 + (x >> 40) % 512;
            let start = (x % (PAGES - len)) & !7;
            let state = if x & 1 == 0 {
                PageState::Shared
            } else {
                PageState::Private
            };
            (start..start + len, state)
        })
        .collect()
}

fn single_threaded(c: &mut Criterion) {
    let ops = workload(7);
    let mut group = c.benchmark_group("map updates, 1 thread");
    group.throughput(Throughput::Elements(OPS as u64));
    group.bench_function("PageStateMap", |b| {
        b.iter(|| {
            let mut map = PageStateMap::all_private(PAGES);
            for (r, s) in &ops {
                map.set(r.clone(), *s);
            }
            map.shared_pages()
        })
    });
    group.bench_function("naive bitmap", |b| {
        b.iter(|| {
            let mut map = NaiveBitmap(vec![0; (PAGES / 64) as usize]);
            for (r, s) in &ops {
                map.set(r.clone(), *s);
            }
            map.is_private(5)
        })
    });
    group.finish();
}

fn contended(c: &mut Criterion) {
    let mut group = c.benchmark_group("map updates, 2 updaters + 1 reader");
    group.throughput(Throughput::Elements(2 * OPS as u64));
    group.sample_size(20);
    group.bench_function("PageStateMap", |b| {
        b.iter(|| {
            let map = Arc::new(RwLock::new(PageStateMap::all_private(PAGES)));
            run_contended(
                &map,
                |m, r, s| m.write().unwrap().set(r, s),
                |m, g| m.read().unwrap().is_private(g),
            )
        })
    });
    group.bench_function("naive bitmap", |b| {
        b.iter(|| {
            let map = Arc::new(RwLock::new(NaiveBitmap(vec![0; (PAGES / 64) as usize])));
            run_contended(
                &map,
                |m, r, s| m.write().unwrap().set(r, s),
                |m, g| m.read().unwrap().is_private(g),
            )
        })
    });
    group.finish();
}

fn run_contended<M: Send + Sync + 'static>(
    map: &Arc<M>,
    update: fn(&M, Range<u64>, PageState),
    query: fn(&M, u64) -> bool,
) -> u64 {
    let updaters: Vec<_> = [1u64, 2]
        .into_iter()
        .map(|seed| {
            let map = Arc::clone(map);
            std::thread::spawn(move || {
                for (r, s) in workload(seed) {
                    update(&map, r, s);
                }
            })
        })
        .collect();
    let reader = {
        let map = Arc::clone(map);
        std::thread::spawn(move || {
            (0..OPS as u64)
                .filter(|g| query(&map, g * 97 % PAGES))
                .count() as u64
        })
    };
    for u in updaters {
        u.join().unwrap();
    }
    reader.join().unwrap()
}

fn memory_per_run(_: &mut Criterion) {
    let mut map = PageStateMap::all_private(PAGES);
    let runs = 10_000u64;
    for i in 0..runs {
        map.set(i * 64..i * 64 + 3, PageState::Shared);
    }
    let start = Instant::now();
    let bytes = map.memory_bytes();
    println!(
        "memory: {runs} shared runs -> {bytes} bytes ({} bytes per run; bound for {PAGES} pages {} bytes; counted in {:?})",
        bytes / runs,
        map.memory_bound(),
        start.elapsed()
    );
}

criterion_group!(benches, single_threaded, contended, memory_per_run);
criterion_main!(benches);
