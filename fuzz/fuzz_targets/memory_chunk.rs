//! MemoryChunk payloads, parsed in place as the receiver does. A chunk that parses has as many
//! pages as it says, accounts for every byte, re-encodes to the same bytes, and checks against
//! a VM's shape without panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_migration::protocol::{ChunkEncoder, MemoryChunkRef, MemoryRegion, VmShape};

/// The frame header ahead of an encoded chunk's payload.
const HEADER_BYTES: usize = 24;

fuzz_target!(|data: &[u8]| {
    let Ok(chunk) = MemoryChunkRef::parse(data) else {
        return;
    };
    let pages: Vec<_> = chunk.pages().collect();
    assert_eq!(pages.len(), chunk.len());
    assert!(!chunk.is_empty());
    let wire: usize = pages.iter().map(|p| p.wire_len()).sum();
    assert_eq!(wire + 4, data.len(), "every byte belongs to a page");
    let mut encoder = ChunkEncoder::new();
    for page in &pages {
        assert!(encoder.push(*page).expect("a parsed page encodes"));
    }
    assert_eq!(&encoder.frame().unwrap()[HEADER_BYTES..], data);
    let shape = VmShape::new(
        vec![MemoryRegion {
            gpa: 0,
            len: 64 << 12,
        }],
        1,
        None,
        Vec::new(),
    )
    .unwrap();
    if chunk.validate(&shape).is_ok() {
        let mut gfns: Vec<u64> = pages.iter().map(|p| p.gfn).collect();
        assert!(gfns.iter().all(|&g| g < 64));
        gfns.sort_unstable();
        gfns.dedup();
        assert_eq!(gfns.len(), pages.len(), "no page twice");
    }
});
