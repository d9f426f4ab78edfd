//! A driver for the virtio fuzz targets: one device behind the virtio-mmio transport over
//! 64 KiB of guest memory whose every byte (rings, descriptor tables, buffers) the input
//! gives, some pages of which the guest keeps private.
//!
//! Input: an 8-byte header, then the memory image (the rest of memory is zero).
//!
//! ```text
//!  0  flags      bit 0: the disk is read-only (block); bit 1: negotiate EVENT_IDX
//!  1  private    u16: bit i keeps page i private (page 0 holds the rings)
//!  3  rounds     notification rounds, 1 + rounds % 4: each serves every queue in order
//!  4  size       queue size 1 << (size % 5): 1 to 16 entries
//!  5  reserved
//!  8  memory     the image
//! ```
//!
//! Queue `i` has its descriptor table at `0x500 * i`, available ring at `+ 0x100` and used
//! ring at `+ 0x200` (zeroed, as a driver leaves it), all in page 0. After every round the
//! rig checks what must hold whatever the guest wrote: private pages as they were; each queue's
//! used ring well formed (ids below the queue size, lengths within guest memory, no more
//! entries than the driver made available). `Rig::round` returns so the target can add its
//! device's own checks.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use veil_devices::virtio::{
    DeviceMemory, GuestMemoryMmap, MmioTransport, SharedPages, VirtioDevice,
};
use veil_devices::BusDevice;
use vm_memory::{Bytes, GuestAddress};

pub const MEMORY: usize = 64 << 10;
pub const PAGE: usize = 4096;
pub const HEADER: usize = 8;

/// Register offsets (virtio 1.2 §4.2.2).
const STATUS: u64 = 0x70;
const DEVICE_FEATURES: u64 = 0x10;
const DEVICE_FEATURES_SEL: u64 = 0x14;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const QUEUE_DESC_LOW: u64 = 0x80;
const QUEUE_AVAIL_LOW: u64 = 0x90;
const QUEUE_USED_LOW: u64 = 0xa0;
const EVENT_IDX: u64 = 1 << 29;

/// Pages the guest kept private.
struct Private(u16);

impl SharedPages for Private {
    fn is_shared(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        if end > MEMORY as u64 {
            return false;
        }
        let first = gpa / PAGE as u64;
        let last = end.saturating_sub(1).max(gpa) / PAGE as u64;
        (first..=last).all(|p| self.0 & (1 << p) == 0)
    }
}

pub struct Input<'a> {
    pub read_only: bool,
    pub event_idx: bool,
    pub private: u16,
    pub rounds: usize,
    pub size: u16,
    pub image: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn parse(data: &'a [u8]) -> Option<Self> {
        let header = data.get(..HEADER)?;
        Some(Self {
            read_only: header[0] & 1 != 0,
            event_idx: header[0] & 2 != 0,
            private: u16::from_le_bytes([header[1], header[2]]),
            rounds: 1 + usize::from(header[3] % 4),
            size: 1 << (header[4] % 5),
            image: &data[HEADER..data.len().min(HEADER + MEMORY)],
        })
    }
}

pub fn desc_table(queue: usize) -> u64 {
    0x500 * queue as u64
}

pub fn avail_ring(queue: usize) -> u64 {
    desc_table(queue) + 0x100
}

pub fn used_ring(queue: usize) -> u64 {
    desc_table(queue) + 0x200
}

pub struct Rig<D> {
    pub mem: GuestMemoryMmap,
    pub device: Arc<Mutex<D>>,
    transport: MmioTransport,
    private: u16,
    size: u16,
    queues: usize,
    /// The private pages as the guest left them.
    before: Vec<(usize, Vec<u8>)>,
}

impl<D: VirtioDevice + 'static> Rig<D> {
    /// Loads the image, sets the device up as a driver would (every feature it offers,
    /// EVENT_IDX as asked, every queue at its place) and sets DRIVER_OK.
    pub fn new(device: D, input: &Input<'_>) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEMORY)]).unwrap();
        mem.write_slice(input.image, GuestAddress(0)).unwrap();
        let queues = device.queues().len();
        for q in 0..queues {
            mem.write_slice(&[0u8; 6 + 8 * 16], GuestAddress(used_ring(q)))
                .unwrap();
        }
        let before = (0..MEMORY / PAGE)
            .filter(|p| input.private & (1 << p) != 0)
            .map(|p| {
                let mut page = vec![0u8; PAGE];
                mem.read_slice(&mut page, GuestAddress((p * PAGE) as u64))
                    .unwrap();
                (p, page)
            })
            .collect();
        let device = Arc::new(Mutex::new(device));
        let memory = DeviceMemory::encrypted(mem.clone(), Arc::new(Private(input.private)), "fuzz");
        let transport = MmioTransport::new(device.clone(), memory).unwrap();
        let mut rig = Self {
            mem,
            device,
            transport,
            private: input.private,
            size: input.size,
            queues,
            before,
        };
        rig.start(input.event_idx);
        rig
    }

    fn read(&mut self, offset: u64) -> u32 {
        let mut word = [0u8; 4];
        self.transport.read(offset, &mut word);
        u32::from_le_bytes(word)
    }

    fn write(&mut self, offset: u64, value: u32) {
        self.transport.write(offset, &value.to_le_bytes());
    }

    fn start(&mut self, event_idx: bool) {
        self.write(STATUS, 0);
        self.write(STATUS, 1);
        self.write(STATUS, 1 | 2);
        self.write(DEVICE_FEATURES_SEL, 0);
        let low = self.read(DEVICE_FEATURES);
        self.write(DEVICE_FEATURES_SEL, 1);
        let high = self.read(DEVICE_FEATURES);
        let mut features = u64::from(low) | (u64::from(high) << 32);
        if !event_idx {
            features &= !EVENT_IDX;
        }
        self.write(DRIVER_FEATURES_SEL, 0);
        self.write(DRIVER_FEATURES, features as u32);
        self.write(DRIVER_FEATURES_SEL, 1);
        self.write(DRIVER_FEATURES, (features >> 32) as u32);
        self.write(STATUS, 1 | 2 | 8);
        for q in 0..self.queues {
            self.write(QUEUE_SEL, q as u32);
            self.write(QUEUE_NUM, u32::from(self.size));
            for (low, addr) in [
                (QUEUE_DESC_LOW, desc_table(q)),
                (QUEUE_AVAIL_LOW, avail_ring(q)),
                (QUEUE_USED_LOW, used_ring(q)),
            ] {
                self.write(low, addr as u32);
                self.write(low + 4, 0);
            }
            self.write(QUEUE_READY, 1);
        }
        let status = self.read(STATUS);
        self.write(STATUS, status | 4);
    }

    /// Whether the device came up (it does not when its rings are in a private page).
    pub fn active(&self) -> bool {
        self.device.lock().unwrap().is_active()
    }

    /// Serves every queue once, as after a notification of each, then checks the rig's
    /// invariants.
    pub fn round(&mut self) {
        for q in 0..self.queues {
            self.device.lock().unwrap().process_queue(q);
        }
        self.check();
    }

    fn check(&self) {
        for (p, page) in &self.before {
            let mut now = vec![0u8; PAGE];
            self.mem
                .read_slice(&mut now, GuestAddress((p * PAGE) as u64))
                .unwrap();
            assert!(&now == page, "the device wrote into private page {p}");
        }
        if self.private & 1 != 0 || self.buffers_reach_the_rings() {
            // A driver that hands the device its own rings as buffers gets what it asked for.
            return;
        }
        for q in 0..self.queues {
            let avail_idx: u16 = self.mem.read_obj(GuestAddress(avail_ring(q) + 2)).unwrap();
            let used_idx: u16 = self.mem.read_obj(GuestAddress(used_ring(q) + 2)).unwrap();
            assert!(
                used_idx <= avail_idx,
                "queue {q}: {used_idx} chains used, {avail_idx} made available"
            );
            for i in 0..used_idx.min(self.size) {
                let at = used_ring(q) + 4 + 8 * u64::from(i);
                let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
                assert!(id < u32::from(self.size), "queue {q}: used id {id}");
                assert!(len as usize <= MEMORY, "queue {q}: used len {len}");
            }
        }
    }

    /// Whether any descriptor, direct or in an indirect table, points into page 0.
    fn buffers_reach_the_rings(&self) -> bool {
        let reaches = |addr: u64, len: u32| addr < PAGE as u64 && len > 0;
        (0..self.queues).any(|q| {
            (0..self.size).any(|i| {
                let at = desc_table(q) + 16 * u64::from(i);
                let addr: u64 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at + 8)).unwrap();
                let flags: u16 = self.mem.read_obj(GuestAddress(at + 12)).unwrap();
                if reaches(addr, len) {
                    return true;
                }
                // VRING_DESC_F_INDIRECT: a table of its own, wherever it lies.
                flags & 4 != 0
                    && (0..(len / 16).min((MEMORY / 16) as u32)).any(|j| {
                        let at = addr.wrapping_add(16 * u64::from(j));
                        let a = self.mem.read_obj::<u64>(GuestAddress(at)).unwrap_or(0);
                        let l = self
                            .mem
                            .read_obj::<u32>(GuestAddress(at.wrapping_add(8)))
                            .unwrap_or(0);
                        reaches(a, l)
                    })
            })
        })
    }
}
