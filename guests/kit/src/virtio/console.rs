//! virtio-console (virtio 1.2 §5.3), port 0 only: receiveq 0 and transmitq 0 (queues 0 and
//! 1). The kit does not negotiate VIRTIO_CONSOLE_F_MULTIPORT, so there are no control queues
//! and the device treats port 0 as open once the driver is up (QEMU's virtio-serial does).
//!
//! Receive buffers are 4 KiB pieces of DMA buffer 0; transmitted bytes go straight from where
//! they are in the DMA area (a receive buffer being echoed, or DMA buffer 1), so nothing is
//! copied byte by byte.

use super::mmio::{self, Device};
use super::queue::VIRTQ_DESC_F_WRITE;
use super::{dma, Error, VIRTIO_ID_CONSOLE};
use crate::arch;

/// receiveq 0 and transmitq 0 (§5.3.2): queues 0 and 1 without multiport.
const RECEIVEQ: u32 = 0;
const TRANSMITQ: u32 = 1;
/// Receive buffers posted at once (at most the queue size).
const RX_BUFFERS: u16 = 8;
/// Each receive buffer: 4 KiB of DMA buffer 0.
pub const RX_BUFFER_SIZE: usize = 4096;
const _: () = assert!(RX_BUFFERS as usize * RX_BUFFER_SIZE <= dma::BUFFER_SIZE);
/// The bytes `transmit_buffer` returns: DMA buffer 1, for text the kit writes.
pub const TX_BUFFER_SIZE: usize = dma::BUFFER_SIZE;

/// The console's port 0, reset again when dropped.
pub struct Console {
    dev: Device<2>,
    /// Receive buffers in use (at most `RX_BUFFERS`, at most the receive queue's size).
    rx_buffers: u16,
}

impl Console {
    /// Brings up the console in `base..base + size` and posts its receive buffers (the device
    /// then delivers input as it comes).
    pub fn open(base: u64, size: u64) -> Result<Console, Error> {
        let dev = mmio::init(base, size, VIRTIO_ID_CONSOLE, 0, [1, 1])?;
        let rx_buffers = dev.queues[0].size().min(RX_BUFFERS);
        let mut console = Console { dev, rx_buffers };
        let rx = &mut console.dev.queues[0];
        for id in 0..rx_buffers {
            let addr = dma::gpa(rx_buffer(id));
            rx.set_desc(id, addr, RX_BUFFER_SIZE as u32, VIRTQ_DESC_F_WRITE, 0);
            rx.push(id);
        }
        rx.publish();
        console.dev.transport.notify(RECEIVEQ);
        Ok(console)
    }

    /// DMA buffer 1, which [`Console::transmit`] may send from.
    pub fn transmit_buffer(&self) -> *mut u8 {
        dma::buffer(1)
    }

    /// Sends `len` bytes at `addr` (in the DMA area) on transmitq 0 and waits until the
    /// device has taken them.
    pub fn transmit(&mut self, addr: *const u8, len: u32) -> Result<(), Error> {
        let tx = &mut self.dev.queues[1];
        tx.set_desc(0, dma::gpa(addr), len, 0, 0);
        tx.push(0);
        tx.publish();
        self.dev.transport.notify(TRANSMITQ);
        tx.wait_used().map(|_| ())
    }

    /// The next receive buffer the device filled: its index and the bytes it wrote, or `None`
    /// if nothing came before TSC `deadline`.
    pub fn receive(&mut self, deadline: u64) -> Result<Option<(u16, u32)>, Error> {
        let rx = &mut self.dev.queues[0];
        loop {
            if let Some(used) = rx.take_used() {
                let (id, len) = used?;
                return Ok(Some((id, len.min(RX_BUFFER_SIZE as u32))));
            }
            if arch::rdtsc() > deadline {
                return Ok(None);
            }
            arch::pause();
        }
    }

    /// Receive buffer `id`'s bytes (valid once [`Console::receive`] returned it).
    pub fn rx_buffer(&self, id: u16) -> *mut u8 {
        rx_buffer(id % self.rx_buffers)
    }

    /// Gives receive buffer `id` back to the device.
    pub fn repost(&mut self, id: u16) {
        let rx = &mut self.dev.queues[0];
        rx.push(id);
        rx.publish();
        self.dev.transport.notify(RECEIVEQ);
    }
}

fn rx_buffer(id: u16) -> *mut u8 {
    dma::buffer(0).wrapping_add(usize::from(id) * RX_BUFFER_SIZE)
}

impl Drop for Console {
    fn drop(&mut self) {
        // A device that does not reset is reported by the next task that opens it.
        let _ = self.dev.transport.reset();
    }
}
