//! virtio-blk (virtio 1.2 §5.2) on the polled transport: IN, OUT, FLUSH and GET_ID requests,
//! the capacity from the config space.

use core::ptr::addr_of_mut;

use super::mmio::{self, Device};
use super::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use super::{dma, Error, VIRTIO_ID_BLOCK};

/// VIRTIO_BLK_F_RO (§5.2.3): the device is read-only.
pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
/// VIRTIO_BLK_F_FLUSH (§5.2.3): the device takes VIRTIO_BLK_T_FLUSH.
pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

// Request types (§5.2.6).
pub const VIRTIO_BLK_T_IN: u32 = 0;
pub const VIRTIO_BLK_T_OUT: u32 = 1;
pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
pub const VIRTIO_BLK_T_GET_ID: u32 = 8;

// Request statuses (§5.2.6).
pub const VIRTIO_BLK_S_OK: u8 = 0;
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;
/// Written to a slot's status byte before submitting, so a device that completes a request
/// without writing a status is caught.
const STATUS_UNWRITTEN: u8 = 0xff;

/// Length of the GET_ID answer: up to 20 bytes, NUL-padded when shorter (§5.2.6).
pub const VIRTIO_BLK_ID_BYTES: u32 = 20;
/// Sectors are 512 bytes whatever the device's blk_size (§5.2.6).
pub const SECTOR_SIZE: u64 = 512;
/// `struct virtio_blk_config` (§5.2.4): `capacity` (in sectors) is its first field.
const CONFIG_CAPACITY: u64 = 0x00;

/// The name of a request status, for messages.
pub fn status_name(status: u8) -> &'static str {
    match status {
        VIRTIO_BLK_S_OK => "OK",
        VIRTIO_BLK_S_IOERR => "IOERR",
        VIRTIO_BLK_S_UNSUPP => "UNSUPP",
        _ => "unknown",
    }
}

/// A virtio-blk device, reset again when dropped (so its queue is not left pointing into the
/// DMA area the next task reuses).
///
/// Request slot `s` owns descriptors `3s` (the request header, device-readable), `3s + 1`
/// (its data buffer, `dma` buffer `s`) and `3s + 2` (the status byte, device-writable),
/// chained in that order and laid out once: a request only rewrites the data descriptor's
/// length and direction, or skips it for a request without data.
pub struct Blk {
    dev: Device<1>,
    /// Request slots the queue holds (size / 3, at most `dma::SLOTS`).
    slots: usize,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
}

impl Blk {
    /// Brings up the block device in the window `base..base + size`.
    pub fn open(base: u64, size: u64) -> Result<Blk, Error> {
        let wanted = VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH;
        let mut dev = mmio::init(base, size, VIRTIO_ID_BLOCK, wanted, [4])?;
        let capacity = dev.transport.config_read64(CONFIG_CAPACITY);
        let queue = &mut dev.queues[0];
        let slots = (usize::from(queue.size()) / 3).min(dma::SLOTS);
        let area = dma::area();
        for slot in 0..slots {
            let head = (3 * slot) as u16;
            // SAFETY: only addresses in the kit's DMA area are computed, and the header's
            // reserved word is written before the device sees any request.
            let (header, status) = unsafe {
                let rings = core::ptr::addr_of_mut!((*area).rings);
                let header = addr_of_mut!((*rings).headers[slot]);
                addr_of_mut!((*header).reserved).write_volatile(0);
                (header, addr_of_mut!((*rings).status[slot]))
            };
            queue.set_desc(head, dma::gpa(header), 16, VIRTQ_DESC_F_NEXT, head + 1);
            let data = dma::gpa(dma::buffer(slot));
            let len = dma::BUFFER_SIZE as u32;
            queue.set_desc(head + 1, data, len, VIRTQ_DESC_F_NEXT, head + 2);
            queue.set_desc(head + 2, dma::gpa(status), 1, VIRTQ_DESC_F_WRITE, 0);
        }
        Ok(Blk {
            dev,
            slots,
            capacity,
        })
    }

    pub fn read_only(&self) -> bool {
        self.dev.features & VIRTIO_BLK_F_RO != 0
    }

    pub fn can_flush(&self) -> bool {
        self.dev.features & VIRTIO_BLK_F_FLUSH != 0
    }

    /// Asks for interrupts on completion (they stay off otherwise: the kit polls).
    pub fn set_interrupts(&mut self, on: bool) {
        self.dev.queues[0].set_interrupts(on);
    }

    /// Reads and acknowledges the transport's InterruptStatus.
    pub fn take_interrupt_status(&self) -> u32 {
        self.dev.transport.take_interrupt_status()
    }

    /// Requests that can be in flight at once.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Slot `slot`'s data buffer (`dma::BUFFER_SIZE` bytes).
    #[inline]
    pub fn buffer(&self, slot: usize) -> *mut u8 {
        dma::buffer(slot)
    }

    /// Queues a request of `kind` at `sector` with `len` bytes of slot `slot`'s buffer (at
    /// most `dma::BUFFER_SIZE`; 0 for FLUSH); the device sees it after [`Blk::kick`].
    #[inline]
    pub fn submit(&mut self, slot: usize, kind: u32, sector: u64, len: u32) {
        // SAFETY: the slot's header and status are in the kit's DMA area; the slot is not in
        // flight (`submit` below checks it before the device can see the chain).
        unsafe {
            let rings = addr_of_mut!((*dma::area()).rings);
            let header = addr_of_mut!((*rings).headers[slot]);
            addr_of_mut!((*header).kind).write_volatile(kind);
            addr_of_mut!((*header).sector).write_volatile(sector);
            addr_of_mut!((*rings).status[slot]).write_volatile(STATUS_UNWRITTEN);
        }
        assert!(slot < self.slots);
        let queue = &mut self.dev.queues[0];
        let head = (3 * slot) as u16;
        if len == 0 {
            queue.set_flags_next(head, VIRTQ_DESC_F_NEXT, head + 2);
        } else {
            let flags = match kind {
                VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE,
                _ => VIRTQ_DESC_F_NEXT,
            };
            queue.set_flags_next(head, VIRTQ_DESC_F_NEXT, head + 1);
            queue.set_len_flags(head + 1, len, flags);
        }
        queue.push(head);
    }

    /// Publishes the queued requests and notifies the device.
    #[inline]
    pub fn kick(&mut self) {
        self.dev.queues[0].publish();
        self.dev.transport.notify(0);
    }

    /// Whether a completion is waiting.
    #[inline]
    pub fn has_completion(&self) -> bool {
        self.dev.queues[0].has_used()
    }

    /// Waits for the next completed request: its slot and status.
    #[inline]
    pub fn complete(&mut self) -> Result<(usize, u8), Error> {
        let (head, _) = self.dev.queues[0].wait_used()?;
        if head % 3 != 0 {
            return Err(Error::BadUsedId(head.into()));
        }
        let slot = usize::from(head / 3);
        // SAFETY: the status byte is in the kit's DMA area; the device is done with it.
        let status = unsafe { addr_of_mut!((*dma::area()).rings.status[slot]).read_volatile() };
        if status == STATUS_UNWRITTEN {
            return Err(Error::NoStatus);
        }
        Ok((slot, status))
    }

    /// One request on slot 0, waited for: its status.
    pub fn request(&mut self, kind: u32, sector: u64, len: u32) -> Result<u8, Error> {
        self.submit(0, kind, sector, len);
        self.kick();
        Ok(self.complete()?.1)
    }

    /// One request on slot 0 whose data is at guest-physical `gpa` rather than in the DMA
    /// area (for an SEV guest, a page it never shared: the device must refuse it).
    pub fn request_at(&mut self, kind: u32, sector: u64, len: u32, gpa: u64) -> Result<u8, Error> {
        let buffer = (dma::gpa(dma::buffer(0)), dma::BUFFER_SIZE as u32);
        let queue = &mut self.dev.queues[0];
        // Slot 0's data descriptor, pointed elsewhere for this request and back after it.
        queue.set_desc(1, gpa, len, VIRTQ_DESC_F_NEXT, 2);
        let status = self.request(kind, sector, len);
        self.dev.queues[0].set_desc(1, buffer.0, buffer.1, VIRTQ_DESC_F_NEXT, 2);
        status
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        // A device that does not reset is reported by the next task that opens it.
        let _ = self.dev.transport.reset();
    }
}
