//! A diff snapshot's `diff` file, as a restore reads it from a directory it was handed. What
//! decodes re-encodes to the same bytes; its runs of pages are in order, apart, within the
//! guest's RAM, and cover exactly the pages it says it holds.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use veil_migration::snapshot::diff::DiffFile;

fuzz_target!(|input: (u16, &[u8])| {
    let (memory_pages, payload) = (u64::from(input.0), input.1);
    let Ok(diff) = DiffFile::decode(payload, memory_pages, Path::new("/fuzz/diff")) else {
        return;
    };
    assert!(diff.parent.is_absolute());
    assert_eq!(diff.encode().expect("a decoded diff encodes"), payload);
    let mut held = 0u64;
    let mut last_end = None;
    for (first, end) in diff.runs() {
        assert!(
            first < end && end <= memory_pages,
            "{first}..{end} of {memory_pages}"
        );
        if let Some(last) = last_end {
            assert!(first > last, "runs touch or overlap: ..{last}, {first}..");
        }
        assert!((first..end).all(|page| diff.holds(page)));
        held += end - first;
        last_end = Some(end);
    }
    let counted: u64 = diff.pages.iter().map(|w| u64::from(w.count_ones())).sum();
    assert_eq!(held, counted, "the runs cover every page the bitmap holds");
});
