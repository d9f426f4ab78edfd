//! One split virtqueue (virtio 1.2 §2.7) in the DMA area, driven by polling.
//!
//! The descriptor table is laid out once: request slot `s` owns descriptors `3s` (the request
//! header, device-readable), `3s + 1` (the data buffer) and `3s + 2` (the status byte,
//! device-writable), chained in that order. A request only rewrites the data descriptor's
//! length and direction (or skips it, for a request without data), so a submission is a
//! handful of stores: this guest pays ~0.6 us for each.
//!
//! Every access to the area is volatile (the device reads and writes it behind the compiler's
//! back), and the fences order the driver's stores as §2.7.13 requires: the chain before the
//! available ring entry before `avail.idx`, and `used.idx` before the used entry it covers.
//! On x86 the fences only constrain the compiler (stores are not reordered with stores, nor
//! loads with loads), but they say what the protocol needs.

use core::ptr::addr_of_mut;
use core::sync::atomic::{fence, Ordering};

use super::dma::{self, SLOTS};
use super::{Error, DEVICE_TIMEOUT_TSC};
use crate::arch;

/// VIRTQ_DESC_F_NEXT (§2.7.5): the chain continues at `next`.
const VIRTQ_DESC_F_NEXT: u16 = 1;
/// VIRTQ_DESC_F_WRITE (§2.7.5): the device writes this buffer.
const VIRTQ_DESC_F_WRITE: u16 = 2;
/// VIRTQ_AVAIL_F_NO_INTERRUPT (§2.7.6): a polling driver needs no used-buffer notifications.
const VIRTQ_AVAIL_F_NO_INTERRUPT: u16 = 1;

/// The driver's side of queue 0.
pub struct SplitQueue {
    /// Queue size - 1 (the size is a power of 2).
    mask: u16,
    /// Request slots the queue holds (size / 3, at most `dma::SLOTS`).
    slots: usize,
    /// The next `avail.idx` (published by [`SplitQueue::publish`]).
    next_avail: u16,
    /// The `used.idx` consumed so far.
    last_used: u16,
    /// Bit `s`: slot `s` is with the device.
    in_flight: u32,
}

const _: () = assert!(SLOTS <= 32);

impl SplitQueue {
    /// Lays out the rings for a queue of `size` descriptors (a power of 2, 4..=QUEUE_MAX).
    pub fn new(size: u16) -> Self {
        let slots = (usize::from(size) / 3).min(SLOTS);
        let area = dma::area();
        for slot in 0..slots {
            let head = (3 * slot) as u16;
            // SAFETY: `area` is the kit's DMA area and `3 * slot + 2 < QUEUE_MAX`; the device
            // cannot use the queue before the transport gives it the addresses, after this.
            unsafe {
                let rings = addr_of_mut!((*area).rings);
                let header = addr_of_mut!((*rings).headers[slot]);
                addr_of_mut!((*header).reserved).write_volatile(0);
                let data = addr_of_mut!((*area).buffers[slot]);
                let status = addr_of_mut!((*rings).status[slot]);
                let chain = [
                    (dma::gpa(header), 16, VIRTQ_DESC_F_NEXT, head + 1),
                    (
                        dma::gpa(data),
                        dma::BUFFER_SIZE as u32,
                        VIRTQ_DESC_F_NEXT,
                        head + 2,
                    ),
                    (dma::gpa(status), 1, VIRTQ_DESC_F_WRITE, 0),
                ];
                for (i, (addr, len, flags, next)) in chain.into_iter().enumerate() {
                    let desc = addr_of_mut!((*rings).desc[usize::from(head) + i]);
                    addr_of_mut!((*desc).addr).write_volatile(addr);
                    addr_of_mut!((*desc).len).write_volatile(len);
                    addr_of_mut!((*desc).flags).write_volatile(flags);
                    addr_of_mut!((*desc).next).write_volatile(next);
                }
            }
        }
        // SAFETY: as above; the rings start empty (a reset device starts from index 0).
        unsafe {
            let rings = addr_of_mut!((*area).rings);
            addr_of_mut!((*rings).avail.flags).write_volatile(VIRTQ_AVAIL_F_NO_INTERRUPT);
            addr_of_mut!((*rings).avail.idx).write_volatile(0);
            addr_of_mut!((*rings).used.flags).write_volatile(0);
            addr_of_mut!((*rings).used.idx).write_volatile(0);
        }
        SplitQueue {
            mask: size - 1,
            slots,
            next_avail: 0,
            last_used: 0,
            in_flight: 0,
        }
    }

    /// Guest-physical addresses of the descriptor table, available ring and used ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        let area = dma::area();
        // SAFETY: only addresses inside the kit's DMA area are computed.
        unsafe {
            let rings = addr_of_mut!((*area).rings);
            (
                dma::gpa(addr_of_mut!((*rings).desc)),
                dma::gpa(addr_of_mut!((*rings).avail.flags)),
                dma::gpa(addr_of_mut!((*rings).used.flags)),
            )
        }
    }

    /// Asks the device for used-buffer notifications (interrupts), or not (the default).
    pub fn set_interrupts(&mut self, on: bool) {
        let flags = if on { 0 } else { VIRTQ_AVAIL_F_NO_INTERRUPT };
        // SAFETY: `avail.flags` is in the kit's DMA area.
        unsafe { addr_of_mut!((*dma::area()).rings.avail.flags).write_volatile(flags) };
    }

    /// How many requests can be in flight at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Puts slot `slot`'s chain on the available ring, with `data_len` bytes of data the device
    /// writes (`device_writes`) or reads, or no data descriptor when `data_len` is 0. The
    /// caller has filled the slot's header; the device sees the request after [`publish`].
    ///
    /// [`publish`]: SplitQueue::publish
    #[inline]
    pub fn submit(&mut self, slot: usize, data_len: u32, device_writes: bool) {
        assert!(slot < self.slots && self.in_flight & (1 << slot) == 0);
        let head = 3 * slot;
        let flags = if device_writes {
            VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE
        } else {
            VIRTQ_DESC_F_NEXT
        };
        let next = if data_len == 0 { head + 2 } else { head + 1 };
        // SAFETY: the slot's descriptors are in the kit's DMA area (`slot < SLOTS`) and not
        // with the device (it is not in flight); the ring index is masked to the queue size.
        unsafe {
            let rings = addr_of_mut!((*dma::area()).rings);
            addr_of_mut!((*rings).desc[head].next).write_volatile(next as u16);
            if data_len != 0 {
                addr_of_mut!((*rings).desc[head + 1].len).write_volatile(data_len);
                addr_of_mut!((*rings).desc[head + 1].flags).write_volatile(flags);
            }
            let entry = usize::from(self.next_avail & self.mask) % dma::QUEUE_MAX;
            // The chain is written before its ring entry.
            fence(Ordering::Release);
            addr_of_mut!((*rings).avail.ring[entry]).write_volatile(head as u16);
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        self.in_flight |= 1 << slot;
    }

    /// Points slot `slot`'s data descriptor at guest-physical `gpa` instead of its buffer
    /// (`None`: back to the buffer); the slot must not be in flight.
    pub fn redirect_data(&mut self, slot: usize, gpa: Option<u64>) {
        assert!(slot < self.slots && self.in_flight & (1 << slot) == 0);
        // SAFETY: the slot's descriptors are in the kit's DMA area and not with the device.
        unsafe {
            let area = dma::area();
            let addr = gpa.unwrap_or_else(|| dma::gpa(addr_of_mut!((*area).buffers[slot])));
            addr_of_mut!((*area).rings.desc[3 * slot + 1].addr).write_volatile(addr);
        }
    }

    /// Makes every submitted chain visible to the device (`avail.idx`); the caller notifies.
    #[inline]
    pub fn publish(&mut self) {
        // Ring entries before the index that covers them (§2.7.13).
        fence(Ordering::Release);
        // SAFETY: `avail_idx` is in the kit's DMA area.
        unsafe { addr_of_mut!((*dma::area()).rings.avail.idx).write_volatile(self.next_avail) };
        // No full barrier before the notification: the driver never reads the device's
        // suppression flags (it always notifies), and x86 does not let the uncached MMIO store
        // of QueueNotify pass this store; a `fence(SeqCst)` would cost a locked instruction
        // (~1 us emulated) per kick.
    }

    /// Whether the device has completed a request not yet taken with [`wait_used`].
    ///
    /// [`wait_used`]: SplitQueue::wait_used
    #[inline]
    pub fn has_used(&self) -> bool {
        // SAFETY: `used_idx` is in the kit's DMA area; the device writes it, hence volatile.
        unsafe { addr_of_mut!((*dma::area()).rings.used.idx).read_volatile() != self.last_used }
    }

    /// Waits for the next completed request and returns its slot, or fails after
    /// `DEVICE_TIMEOUT_TSC` or on a used entry that names no chain in flight.
    #[inline]
    pub fn wait_used(&mut self) -> Result<usize, Error> {
        if !self.has_used() {
            let deadline = arch::rdtsc() + DEVICE_TIMEOUT_TSC;
            while !self.has_used() {
                if arch::rdtsc() > deadline {
                    return Err(Error::Timeout);
                }
                arch::pause();
            }
        }
        // The used entry is read after the index that covers it.
        fence(Ordering::Acquire);
        let entry = usize::from(self.last_used & self.mask) % dma::QUEUE_MAX;
        // SAFETY: the used ring is in the kit's DMA area; the entry index is masked.
        let id = unsafe { addr_of_mut!((*dma::area()).rings.used.ring[entry].id).read_volatile() };
        self.last_used = self.last_used.wrapping_add(1);
        let slot = (id / 3) as usize;
        if id % 3 != 0 || slot >= self.slots || self.in_flight & (1 << slot) == 0 {
            return Err(Error::BadUsedId(id));
        }
        self.in_flight &= !(1 << slot);
        Ok(slot)
    }
}
