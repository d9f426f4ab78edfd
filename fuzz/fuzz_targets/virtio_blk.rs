//! A virtio-blk device behind the virtio-mmio transport, fed any guest memory: descriptor
//! chains, indirect tables, request headers and buffers as the input writes them (the layout
//! is in `common/virtio_rig.rs`). Besides the rig's checks (private pages untouched, used
//! rings well formed), the disk never changes size, and a read-only disk never changes at all.
#![no_main]

#[path = "common/virtio_rig.rs"]
mod virtio_rig;

use libfuzzer_sys::fuzz_target;
use veil_devices::virtio::block::{Block, BlockConfig};
use virtio_rig::{Input, Rig};

/// Sectors of the disk: 16 KiB, sector `n` filled with byte `n + 1`.
const DISK: usize = 16 << 10;

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let disk = tempfile();
    let contents: Vec<u8> = (0..DISK).map(|i| (i / 512 + 1) as u8).collect();
    std::fs::write(&disk, &contents).unwrap();
    let block = Block::new(BlockConfig {
        path: disk.clone(),
        read_only: input.read_only,
        id: Some("fuzz".into()),
    })
    .unwrap();
    let mut rig = Rig::new(block, &input);
    for _ in 0..input.rounds {
        rig.round();
    }
    drop(rig);
    let after = std::fs::read(&disk).unwrap();
    let _ = std::fs::remove_file(&disk);
    assert_eq!(after.len(), DISK, "the disk changed size");
    if input.read_only {
        assert!(after == contents, "a read-only disk was written");
    }
});

fn tempfile() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    std::env::temp_dir().join(format!(
        "veil-fuzz-blk-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}
