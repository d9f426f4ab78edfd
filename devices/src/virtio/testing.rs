//! A driver's side of a transport and of a split queue, for tests.
//!
//! The rings are laid out by hand rather than with `virtio-queue`'s `MockSplitQueue`, whose
//! used ring overlaps the tail of its available ring (it sizes rings in entries, not bytes):
//! harmless for its own tests, wrong for a device that writes `used_event`-adjacent fields.

use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::block::{Block, BlockConfig};
use super::memory::{self, tests::PrivateRanges};
use super::{DeviceMemory, GuestMemoryMmap, MmioTransport, VirtioDevice};
use crate::BusDevice;

/// Register accesses as a driver makes them.
pub(crate) struct TestDriver {
    pub(crate) transport: MmioTransport,
}

impl TestDriver {
    pub(crate) fn read(&mut self, offset: u32) -> u32 {
        let mut word = [0u8; 4];
        self.transport.read(u64::from(offset), &mut word);
        u32::from_le_bytes(word)
    }

    pub(crate) fn write(&mut self, offset: u32, value: u32) {
        self.transport
            .write(u64::from(offset), &value.to_le_bytes());
    }

    pub(crate) fn device_features(&mut self) -> u64 {
        self.write(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        let low = self.read(reg::VIRTIO_MMIO_DEVICE_FEATURES);
        self.write(reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = self.read(reg::VIRTIO_MMIO_DEVICE_FEATURES);
        u64::from(low) | (u64::from(high) << 32)
    }

    /// The initialisation sequence up to FEATURES_OK; whether the device kept it set.
    pub(crate) fn negotiate(&mut self, features: u64) -> bool {
        self.write(reg::VIRTIO_MMIO_STATUS, 0);
        self.write(reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write(
            reg::VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        self.write(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.write(reg::VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        self.write(reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.write(reg::VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        self.write(
            reg::VIRTIO_MMIO_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        self.read(reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK != 0
    }

    pub(crate) fn setup_queue(&mut self, index: u32, queue: &TestQueue) {
        self.write(reg::VIRTIO_MMIO_QUEUE_SEL, index);
        self.write(reg::VIRTIO_MMIO_QUEUE_NUM, u32::from(queue.size));
        for (low, addr) in [
            (reg::VIRTIO_MMIO_QUEUE_DESC_LOW, queue.desc),
            (reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, queue.avail),
            (reg::VIRTIO_MMIO_QUEUE_USED_LOW, queue.used),
        ] {
            self.write(low, addr as u32);
            self.write(low + 4, (addr >> 32) as u32);
        }
        self.write(reg::VIRTIO_MMIO_QUEUE_READY, 1);
    }

    pub(crate) fn driver_ok(&mut self) {
        let status = self.read(reg::VIRTIO_MMIO_STATUS);
        self.write(reg::VIRTIO_MMIO_STATUS, status | VIRTIO_CONFIG_S_DRIVER_OK);
    }
}

/// One buffer of a chain: guest address, length, whether the device writes it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Buf {
    pub(crate) addr: u64,
    pub(crate) len: u32,
    pub(crate) writable: bool,
}

pub(crate) fn readable(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        writable: false,
    }
}

pub(crate) fn writable(addr: u64, len: u32) -> Buf {
    Buf {
        addr,
        len,
        writable: true,
    }
}

/// A split queue as the driver sees it (virtio 1.2 §2.7), at fixed addresses.
pub(crate) struct TestQueue {
    pub(crate) size: u16,
    pub(crate) desc: u64,
    pub(crate) avail: u64,
    pub(crate) used: u64,
    next_desc: u16,
}

impl TestQueue {
    /// Descriptor table at `base`, available ring at `base + 0x1000`, used ring at
    /// `base + 0x2000`.
    pub(crate) fn new(mem: &GuestMemoryMmap, base: u64, size: u16) -> Self {
        let q = Self {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
            next_desc: 0,
        };
        for addr in [q.avail, q.used] {
            mem.write_slice(&[0u8; 0x1000], GuestAddress(addr)).unwrap();
        }
        q
    }

    /// Puts a chain of `bufs` on the available ring; returns its head index.
    pub(crate) fn submit(&mut self, mem: &GuestMemoryMmap, bufs: &[Buf]) -> u16 {
        let head = self.next_desc;
        for (i, buf) in bufs.iter().enumerate() {
            let index = (head + i as u16) % self.size;
            let last = i + 1 == bufs.len();
            let mut flags = 0u16;
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            if buf.writable {
                flags |= VRING_DESC_F_WRITE as u16;
            }
            let next = (index + 1) % self.size;
            let at = self.desc + 16 * u64::from(index);
            mem.write_obj(buf.addr, GuestAddress(at)).unwrap();
            mem.write_obj(buf.len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 12)).unwrap();
            mem.write_obj(next, GuestAddress(at + 14)).unwrap();
        }
        self.next_desc = (head + bufs.len() as u16) % self.size;
        let idx = self.avail_idx(mem);
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        mem.write_obj(head, GuestAddress(slot)).unwrap();
        mem.write_obj(idx.wrapping_add(1), GuestAddress(self.avail + 2))
            .unwrap();
        head
    }

    /// The head index the next [`submit`](Self::submit) will use.
    pub(crate) fn next_head(&self) -> u16 {
        self.next_desc
    }

    fn avail_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
    }

    /// The avail ring's flags (VRING_AVAIL_F_NO_INTERRUPT).
    pub(crate) fn set_avail_flags(&self, mem: &GuestMemoryMmap, flags: u16) {
        mem.write_obj(flags, GuestAddress(self.avail)).unwrap();
    }

    /// `used_event`, after the available ring (virtio 1.2 §2.7.10).
    pub(crate) fn set_used_event(&self, mem: &GuestMemoryMmap, value: u16) {
        let at = self.avail + 4 + 2 * u64::from(self.size);
        mem.write_obj(value, GuestAddress(at)).unwrap();
    }

    pub(crate) fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }

    /// The used element `i`: (descriptor head, length written).
    pub(crate) fn used_elem(&self, mem: &GuestMemoryMmap, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        (
            mem.read_obj(GuestAddress(at)).unwrap(),
            mem.read_obj(GuestAddress(at + 4)).unwrap(),
        )
    }
}

/// A block device on a transport over 1 MiB of guest memory, with its disk file.
pub(crate) struct Rig {
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) pages: Arc<PrivateRanges>,
    pub(crate) block: Arc<Mutex<Block>>,
    pub(crate) driver: TestDriver,
    pub(crate) disk: TempFile,
    pub(crate) queue: TestQueue,
}

/// Guest memory of every rig.
pub(crate) const RIG_MEMORY: usize = 1 << 20;

pub(crate) fn rig(contents: &[u8], read_only: bool, encrypted: bool) -> Rig {
    let disk = TempFile::new().unwrap();
    disk.as_file().write_all_at(contents, 0).unwrap();
    let block = Block::new(BlockConfig {
        path: disk.as_path().to_owned(),
        read_only,
        id: Some("veil-test-disk".into()),
    })
    .unwrap();
    let block = Arc::new(Mutex::new(block));
    let mem = memory::tests::memory(RIG_MEMORY);
    let pages = Arc::new(PrivateRanges::default());
    let device_memory = if encrypted {
        DeviceMemory::encrypted(mem.clone(), pages.clone(), "virtio-blk-test")
    } else {
        DeviceMemory::plain(mem.clone(), "virtio-blk-test")
    };
    let transport = MmioTransport::new(block.clone(), device_memory).unwrap();
    let queue = TestQueue::new(&mem, 0x1000, 16);
    Rig {
        mem,
        pages,
        block,
        driver: TestDriver { transport },
        disk,
        queue,
    }
}

impl Rig {
    /// Negotiates everything offered except `without`, sets up queue 0 and sets DRIVER_OK.
    pub(crate) fn start(&mut self, without: u64) {
        let features = self.driver.device_features() & !without;
        assert!(self.driver.negotiate(features));
        self.driver.setup_queue(0, &self.queue);
        self.driver.driver_ok();
        assert!(self.block.lock().unwrap().is_active());
    }

    /// Serves the queue as the event loop would after a notification.
    pub(crate) fn process(&self) {
        self.block.lock().unwrap().process_queue(0);
    }
}
