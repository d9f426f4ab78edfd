//! MemoryChunk payloads, parsed in place as the receiver does. A chunk that parses has as many
//! pages as it says, accounts for every byte, names each plain page whose body fails its CRC,
//! re-encodes to the same bytes when none does, and checks against a VM's shape without
//! panicking.
#![no_main]

use libfuzzer_sys::fuzz_target;
use veil_migration::protocol::chunk::{body_crc, EntryRef};
use veil_migration::protocol::{
    Arrived, ChunkEncoder, MemoryChunkRef, MemoryRegion, PageContentRef, VmShape,
};

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
    assert_eq!(wire + 8, data.len(), "every byte belongs to a page");
    let arrived: Vec<_> = chunk.arrived().collect();
    assert_eq!(arrived.len(), pages.len());
    let mut damaged = 0;
    for ((arrived, page), entry) in arrived.iter().zip(&pages).zip(chunk.index().entries()) {
        assert_eq!(entry.gfn, page.gfn);
        let claimed = match entry.entry {
            EntryRef::Plain { body_crc } => Some(body_crc),
            _ => None,
        };
        let true_crc = match page.content {
            PageContentRef::Plain(body) => Some(body_crc(body)),
            _ => None,
        };
        match *arrived {
            Arrived::Page(intact) => {
                assert_eq!(intact, *page);
                assert_eq!(claimed, true_crc, "an intact page matches its CRC");
            }
            Arrived::Damaged { gfn } => {
                assert_eq!(gfn, page.gfn);
                assert!(claimed.is_some() && claimed != true_crc, "only a mismatch is damage");
                damaged += 1;
            }
        }
    }
    let mut encoder = ChunkEncoder::new();
    for page in &pages {
        assert!(encoder.push(*page).expect("a parsed page encodes"));
    }
    let mut encoded = Vec::new();
    encoder.frame().unwrap().append_to(&mut encoded);
    if damaged == 0 {
        assert_eq!(&encoded[HEADER_BYTES..], data);
    } else {
        // Re-encoding takes each body's true CRC: only the damaged entries differ.
        assert_ne!(&encoded[HEADER_BYTES..], data);
        assert_eq!(encoded.len() - HEADER_BYTES, data.len());
    }
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
