//! virtio-blk (virtio 1.2 §5.2) on the polled transport: IN, OUT, FLUSH and GET_ID requests,
//! the capacity from the config space.

use core::ptr::addr_of_mut;

use super::mmio::{self, Device};
use super::{dma, Error};

/// Device ID of a block device (§5).
const VIRTIO_ID_BLOCK: u32 = 2;

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
pub struct Blk {
    dev: Device,
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
}

impl Blk {
    /// Brings up the block device in the window `base..base + size`.
    pub fn open(base: u64, size: u64) -> Result<Blk, Error> {
        let wanted = VIRTIO_BLK_F_RO | VIRTIO_BLK_F_FLUSH;
        let dev = mmio::init(base, size, VIRTIO_ID_BLOCK, wanted)?;
        let capacity = dev.transport.config_read64(CONFIG_CAPACITY);
        Ok(Blk { dev, capacity })
    }

    pub fn read_only(&self) -> bool {
        self.dev.features & VIRTIO_BLK_F_RO != 0
    }

    pub fn can_flush(&self) -> bool {
        self.dev.features & VIRTIO_BLK_F_FLUSH != 0
    }

    /// Asks for interrupts on completion (they stay off otherwise: the kit polls).
    pub fn set_interrupts(&mut self, on: bool) {
        self.dev.queue.set_interrupts(on);
    }

    /// Reads and acknowledges the transport's InterruptStatus.
    pub fn take_interrupt_status(&self) -> u32 {
        self.dev.transport.take_interrupt_status()
    }

    /// Requests that can be in flight at once.
    pub fn slots(&self) -> usize {
        self.dev.queue.slots()
    }

    /// Slot `slot`'s data buffer (`dma::BUFFER_SIZE` bytes).
    #[inline]
    pub fn buffer(&self, slot: usize) -> *mut u8 {
        // SAFETY: only the address of a buffer in the kit's DMA area is computed.
        unsafe { addr_of_mut!((*dma::area()).buffers[slot]).cast() }
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
        let device_writes = matches!(kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
        self.dev.queue.submit(slot, len, device_writes);
    }

    /// Publishes the queued requests and notifies the device.
    #[inline]
    pub fn kick(&mut self) {
        self.dev.queue.publish();
        self.dev.transport.notify(0);
    }

    /// Whether a completion is waiting.
    #[inline]
    pub fn has_completion(&self) -> bool {
        self.dev.queue.has_used()
    }

    /// Waits for the next completed request: its slot and status.
    #[inline]
    pub fn complete(&mut self) -> Result<(usize, u8), Error> {
        let slot = self.dev.queue.wait_used()?;
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
        self.dev.queue.redirect_data(0, Some(gpa));
        let status = self.request(kind, sector, len);
        self.dev.queue.redirect_data(0, None);
        status
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        // A device that does not reset is reported by the next task that opens it.
        let _ = self.dev.transport.reset();
    }
}
