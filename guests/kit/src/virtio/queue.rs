//! One split virtqueue (virtio 1.2 §2.7) in the DMA area, driven by polling.
//!
//! The queue knows rings, not requests: a driver lays out its descriptors once (block request
//! chains, vsock header-and-data pairs, single receive buffers) with [`SplitQueue::set_desc`]
//! and then only puts chain heads on the available ring and takes them back from the used
//! ring. A submission is a handful of stores: this guest pays ~0.6 us for each.
//!
//! Every access to the rings is volatile (the device reads and writes them behind the
//! compiler's back), and the fences order the driver's stores as §2.7.13 requires: the chain
//! before the available ring entry before `avail.idx`, and `used.idx` before the used entry it
//! covers. On x86 the fences only constrain the compiler (stores are not reordered with stores,
//! nor loads with loads), but they say what the protocol needs.

use core::ptr::addr_of_mut;
use core::sync::atomic::{fence, Ordering};

use super::dma::{self, Rings, QUEUE_MAX};
use super::{Error, DEVICE_TIMEOUT_TSC};
use crate::arch;

/// VIRTQ_DESC_F_NEXT (§2.7.5): the chain continues at `next`.
pub const VIRTQ_DESC_F_NEXT: u16 = 1;
/// VIRTQ_DESC_F_WRITE (§2.7.5): the device writes this buffer.
pub const VIRTQ_DESC_F_WRITE: u16 = 2;
/// VIRTQ_AVAIL_F_NO_INTERRUPT (§2.7.6): a polling driver needs no used-buffer notifications.
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

// One bit per descriptor in `in_flight`.
const _: () = assert!(QUEUE_MAX <= 32);

/// The driver's side of one queue.
pub struct SplitQueue {
    /// Which of the DMA area's ring sets (the queue's index on its device).
    index: usize,
    /// Queue size (a power of 2, at most `QUEUE_MAX`).
    size: u16,
    /// The next `avail.idx` (published by [`SplitQueue::publish`]).
    next_avail: u16,
    /// The `used.idx` consumed so far.
    last_used: u16,
    /// Bit `d`: the chain whose head is descriptor `d` is with the device.
    in_flight: u32,
}

impl SplitQueue {
    /// Empty rings for queue `index` of `size` descriptors (a power of 2, 1..=QUEUE_MAX), with
    /// interrupts suppressed. The device must not know the rings yet (it learns their
    /// addresses after this).
    pub fn new(index: usize, size: u16) -> Self {
        let queue = SplitQueue {
            index: index % dma::QUEUES,
            size,
            next_avail: 0,
            last_used: 0,
            in_flight: 0,
        };
        // SAFETY: the rings are in the kit's DMA area; a reset device starts from index 0.
        unsafe {
            let rings = queue.rings();
            addr_of_mut!((*rings).avail.flags).write_volatile(VIRTQ_AVAIL_F_NO_INTERRUPT);
            addr_of_mut!((*rings).avail.idx).write_volatile(0);
            addr_of_mut!((*rings).used.flags).write_volatile(0);
            addr_of_mut!((*rings).used.idx).write_volatile(0);
        }
        queue
    }

    #[inline(always)]
    fn rings(&self) -> *mut Rings {
        // SAFETY: only an address inside the kit's DMA area is computed (`index < QUEUES`).
        unsafe { addr_of_mut!((*dma::area()).rings.queues[self.index]) }
    }

    /// Queue size: descriptors `0..size` are the driver's to lay out.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        let rings = self.rings();
        // SAFETY: only addresses inside the kit's DMA area are computed.
        unsafe {
            (
                dma::gpa(addr_of_mut!((*rings).desc)),
                dma::gpa(addr_of_mut!((*rings).avail.flags)),
                dma::gpa(addr_of_mut!((*rings).used.flags)),
            )
        }
    }

    /// Writes descriptor `id` (`id < size`), which must not be part of a chain in flight.
    #[inline]
    pub fn set_desc(&mut self, id: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let i = usize::from(id) % QUEUE_MAX;
        // SAFETY: the descriptor is in the kit's DMA area (index masked); the caller gives
        // the device no chain through it until it is written.
        unsafe {
            let desc = addr_of_mut!((*self.rings()).desc[i]);
            addr_of_mut!((*desc).addr).write_volatile(addr);
            addr_of_mut!((*desc).len).write_volatile(len);
            addr_of_mut!((*desc).flags).write_volatile(flags);
            addr_of_mut!((*desc).next).write_volatile(next);
        }
    }

    /// Rewrites only descriptor `id`'s length and flags (a request's data buffer).
    #[inline]
    pub fn set_len_flags(&mut self, id: u16, len: u32, flags: u16) {
        let i = usize::from(id) % QUEUE_MAX;
        // SAFETY: as in `set_desc`.
        unsafe {
            let desc = addr_of_mut!((*self.rings()).desc[i]);
            addr_of_mut!((*desc).len).write_volatile(len);
            addr_of_mut!((*desc).flags).write_volatile(flags);
        }
    }

    /// Rewrites only descriptor `id`'s flags and `next` (where a chain ends).
    #[inline]
    pub fn set_flags_next(&mut self, id: u16, flags: u16, next: u16) {
        let i = usize::from(id) % QUEUE_MAX;
        // SAFETY: as in `set_desc`.
        unsafe {
            let desc = addr_of_mut!((*self.rings()).desc[i]);
            addr_of_mut!((*desc).flags).write_volatile(flags);
            addr_of_mut!((*desc).next).write_volatile(next);
        }
    }

    /// Asks the device for used-buffer notifications (interrupts), or not (the default).
    pub fn set_interrupts(&mut self, on: bool) {
        let flags = if on { 0 } else { VIRTQ_AVAIL_F_NO_INTERRUPT };
        // SAFETY: `avail.flags` is in the kit's DMA area.
        unsafe { addr_of_mut!((*self.rings()).avail.flags).write_volatile(flags) };
    }

    /// Whether the chain at `head` is with the device.
    #[inline]
    pub fn in_flight(&self, head: u16) -> bool {
        self.in_flight & (1 << (head % 32)) != 0
    }

    /// Puts the chain starting at descriptor `head` (already written, not in flight) on the
    /// available ring; the device sees it after [`SplitQueue::publish`].
    #[inline]
    pub fn push(&mut self, head: u16) {
        assert!(head < self.size && !self.in_flight(head));
        let entry = usize::from(self.next_avail & (self.size - 1)) % QUEUE_MAX;
        // The chain is written before its ring entry.
        fence(Ordering::Release);
        // SAFETY: the ring entry is in the kit's DMA area (index masked to the queue size).
        unsafe { addr_of_mut!((*self.rings()).avail.ring[entry]).write_volatile(head) };
        self.next_avail = self.next_avail.wrapping_add(1);
        self.in_flight |= 1 << head;
    }

    /// Makes every pushed chain visible to the device (`avail.idx`); the caller notifies.
    #[inline]
    pub fn publish(&mut self) {
        // Ring entries before the index that covers them (§2.7.13).
        fence(Ordering::Release);
        // SAFETY: `avail.idx` is in the kit's DMA area.
        unsafe { addr_of_mut!((*self.rings()).avail.idx).write_volatile(self.next_avail) };
        // No full barrier before the notification: the driver never reads the device's
        // suppression flags (it always notifies), and x86 does not let the uncached MMIO store
        // of QueueNotify pass this store; a `fence(SeqCst)` would cost a locked instruction
        // (~1 us emulated) per kick.
    }

    /// Whether the device has completed a chain not yet taken.
    #[inline]
    pub fn has_used(&self) -> bool {
        // SAFETY: `used.idx` is in the kit's DMA area; the device writes it, hence volatile.
        unsafe { addr_of_mut!((*self.rings()).used.idx).read_volatile() != self.last_used }
    }

    /// The next completed chain, if any: its head and the length the device wrote. Fails on a
    /// used entry that names no chain in flight.
    #[inline]
    pub fn take_used(&mut self) -> Option<Result<(u16, u32), Error>> {
        if !self.has_used() {
            return None;
        }
        // The used entry is read after the index that covers it.
        fence(Ordering::Acquire);
        let entry = usize::from(self.last_used & (self.size - 1)) % QUEUE_MAX;
        // SAFETY: the used ring is in the kit's DMA area; the entry index is masked.
        let (id, len) = unsafe {
            let elem = addr_of_mut!((*self.rings()).used.ring[entry]);
            (
                addr_of_mut!((*elem).id).read_volatile(),
                addr_of_mut!((*elem).len).read_volatile(),
            )
        };
        self.last_used = self.last_used.wrapping_add(1);
        if id >= u32::from(self.size) || !self.in_flight(id as u16) {
            return Some(Err(Error::BadUsedId(id)));
        }
        self.in_flight &= !(1 << id);
        Some(Ok((id as u16, len)))
    }

    /// Waits for the next completed chain (see [`SplitQueue::take_used`]), or fails after
    /// `DEVICE_TIMEOUT_TSC`.
    #[inline]
    pub fn wait_used(&mut self) -> Result<(u16, u32), Error> {
        if !self.has_used() {
            let deadline = arch::rdtsc() + DEVICE_TIMEOUT_TSC;
            while !self.has_used() {
                if arch::rdtsc() > deadline {
                    return Err(Error::Timeout);
                }
                arch::pause();
            }
        }
        self.take_used().unwrap_or(Err(Error::Timeout))
    }
}
