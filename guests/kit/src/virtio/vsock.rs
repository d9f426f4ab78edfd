//! virtio-vsock (virtio 1.2 §5.10): packets on the rx, tx and event queues. Connections,
//! credit and the tasks' protocol are `tasks::vsock`'s business; this is the packet pump.
//!
//! Receive buffers are whole 64 KiB DMA buffers (0..8), one descriptor each, which the device
//! fills with the 44-byte header and the payload after it (as Linux's driver posts them). A
//! transmitted packet is a two-descriptor chain: a header in the ring page, then the data
//! wherever it already is in the DMA area: the payload of a receive buffer being echoed, or
//! a pattern. So an echo copies nothing; the receive buffer goes back to the device when the
//! last packet that points into it has been sent.

use core::ptr::addr_of_mut;

use super::mmio::{self, Device};
use super::queue::{VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE};
use super::{dma, Error, VIRTIO_ID_VSOCK};

/// VIRTIO_VSOCK_F_STREAM (§5.10.3): stream sockets. A device offering no feature bits
/// supports streams too (the spec's compatibility rule).
const VIRTIO_VSOCK_F_STREAM: u64 = 1 << 0;

/// The queues (§5.10.2).
const RXQ: u32 = 0;
const TXQ: u32 = 1;
const EVENTQ: u32 = 2;

/// `struct virtio_vsock_config` (§5.10.4): `guest_cid`, le64, at offset 0.
const CONFIG_GUEST_CID: u64 = 0;

/// VIRTIO_VSOCK_TYPE_STREAM (§5.10.6).
pub const VIRTIO_VSOCK_TYPE_STREAM: u16 = 1;
// Operations (§5.10.6).
pub const VIRTIO_VSOCK_OP_REQUEST: u16 = 1;
pub const VIRTIO_VSOCK_OP_RESPONSE: u16 = 2;
pub const VIRTIO_VSOCK_OP_RST: u16 = 3;
pub const VIRTIO_VSOCK_OP_SHUTDOWN: u16 = 4;
pub const VIRTIO_VSOCK_OP_RW: u16 = 5;
pub const VIRTIO_VSOCK_OP_CREDIT_UPDATE: u16 = 6;
pub const VIRTIO_VSOCK_OP_CREDIT_REQUEST: u16 = 7;
// SHUTDOWN flags (§5.10.6.5).
pub const VIRTIO_VSOCK_SHUTDOWN_RCV: u32 = 1;
pub const VIRTIO_VSOCK_SHUTDOWN_SEND: u32 = 2;
/// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (§5.10.6.7): connections are gone, and the guest CID
/// may have changed (after a migration).
pub const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;
/// The host's CID (VMADDR_CID_HOST, Linux's include/uapi/linux/vm_sockets.h).
pub const VMADDR_CID_HOST: u64 = 2;

/// The header's size on the wire.
pub const HEADER_SIZE: u32 = 44;
/// Receive buffers: DMA buffers `0..RX_BUFFERS`, one each.
pub const RX_BUFFERS: usize = 8;
const _: () = assert!(RX_BUFFERS <= dma::BUFFERS && RX_BUFFERS <= 32);
/// The most payload a receive buffer holds.
pub const RX_PAYLOAD_MAX: u32 = dma::BUFFER_SIZE as u32 - HEADER_SIZE;

/// A packet header, as values (`dma::VsockHeader` is its wire form).
#[derive(Clone, Copy)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

/// A received packet, whose buffer the caller holds until [`Vsock::release`].
pub struct Received {
    pub buffer: u16,
    pub header: Header,
    /// The payload's first byte (`header.len` bytes, checked to lie in the buffer).
    pub payload: *mut u8,
}

/// A virtio-vsock device, reset again when dropped.
pub struct Vsock {
    dev: Device<3>,
    /// From the config space; re-read after a transport reset.
    pub guest_cid: u64,
    tx_slots: u16,
    /// Bit `s`: transmit slot `s` is free.
    tx_free: u32,
    /// The payload transmit slot `s` carries.
    tx_len: [u32; dma::VSOCK_TX_SLOTS],
    /// Payload bytes of packets the device has taken since [`Vsock::take_sent`].
    sent: u32,
    /// The receive buffer transmit slot `s` points into, if any.
    tx_rx_buffer: [Option<u16>; dma::VSOCK_TX_SLOTS],
    /// Per receive buffer: packets in flight that point into it.
    rx_refs: [u8; RX_BUFFERS],
    /// Bit `b`: the task holds receive buffer `b` (received, not yet released).
    rx_held: u32,
    /// Queues with entries not yet published (bit = queue index).
    unpublished: u32,
}

impl Vsock {
    /// Brings up the socket device in `base..base + size`, fills the receive and event
    /// queues and tells the device.
    pub fn open(base: u64, size: u64) -> Result<Vsock, Error> {
        let dev = mmio::init(
            base,
            size,
            VIRTIO_ID_VSOCK,
            VIRTIO_VSOCK_F_STREAM,
            [1, 2, 1],
        )?;
        let guest_cid = dev.transport.config_read64(CONFIG_GUEST_CID);
        let rx_buffers = dev.queues[0].size().min(RX_BUFFERS as u16);
        let tx_slots = (dev.queues[1].size() / 2).min(dma::VSOCK_TX_SLOTS as u16);
        let mut vsock = Vsock {
            dev,
            guest_cid,
            tx_slots,
            tx_free: (1 << tx_slots) - 1,
            tx_len: [0; dma::VSOCK_TX_SLOTS],
            sent: 0,
            tx_rx_buffer: [None; dma::VSOCK_TX_SLOTS],
            rx_refs: [0; RX_BUFFERS],
            rx_held: 0,
            unpublished: 0,
        };
        let [rx, tx, events] = &mut vsock.dev.queues;
        for id in 0..rx_buffers {
            let addr = dma::gpa(dma::buffer(id.into()));
            rx.set_desc(id, addr, dma::BUFFER_SIZE as u32, VIRTQ_DESC_F_WRITE, 0);
            rx.push(id);
        }
        for slot in 0..tx_slots {
            let header = dma::gpa(tx_header(slot));
            tx.set_desc(2 * slot, header, HEADER_SIZE, 0, 0);
        }
        let event_buffers = events.size().min(dma::VSOCK_EVENTS as u16);
        for id in 0..event_buffers {
            events.set_desc(id, dma::gpa(event_buffer(id)), 4, VIRTQ_DESC_F_WRITE, 0);
            events.push(id);
        }
        vsock.unpublished = 1 << RXQ | 1 << EVENTQ;
        vsock.flush();
        Ok(vsock)
    }

    /// Re-reads the guest CID (after a transport reset).
    pub fn reread_cid(&mut self) {
        self.guest_cid = self.dev.transport.config_read64(CONFIG_GUEST_CID);
    }

    /// Publishes and notifies every queue given new entries since the last flush: one exit per
    /// queue and batch, not per packet.
    pub fn flush(&mut self) {
        for queue in [RXQ, TXQ, EVENTQ] {
            if self.unpublished & (1 << queue) != 0 {
                self.dev.queues[queue as usize].publish();
                self.dev.transport.notify(queue);
            }
        }
        self.unpublished = 0;
    }

    /// The next packet the device delivered, if any. Its buffer is the caller's until
    /// [`Vsock::release`].
    pub fn receive(&mut self) -> Result<Option<Received>, Error> {
        let Some(used) = self.dev.queues[0].take_used() else {
            return Ok(None);
        };
        let (buffer, written) = used?;
        let base = dma::buffer(buffer.into());
        if !(HEADER_SIZE..=dma::BUFFER_SIZE as u32).contains(&written) {
            return Err(Error::BadPacket(written));
        }
        // SAFETY: the device wrote at least the header at the start of this buffer (it
        // completed the chain); `VsockHeader` is packed, so the read is unaligned.
        let wire = unsafe { base.cast::<dma::VsockHeader>().read_unaligned() };
        let header = Header {
            src_cid: wire.src_cid,
            dst_cid: wire.dst_cid,
            src_port: wire.src_port,
            dst_port: wire.dst_port,
            len: wire.len,
            kind: wire.kind,
            op: wire.op,
            flags: wire.flags,
            buf_alloc: wire.buf_alloc,
            fwd_cnt: wire.fwd_cnt,
        };
        let payload_max = written - HEADER_SIZE;
        if header.len > payload_max || (header.op != VIRTIO_VSOCK_OP_RW && header.len != 0) {
            return Err(Error::BadPacket(written));
        }
        self.rx_held |= 1 << buffer;
        Ok(Some(Received {
            buffer,
            header,
            payload: base.wrapping_add(HEADER_SIZE as usize),
        }))
    }

    /// The task is done with receive buffer `buffer`: it goes back to the device once no
    /// packet in flight points into it.
    pub fn release(&mut self, buffer: u16) {
        self.rx_held &= !(1 << buffer);
        self.repost_if_free(buffer);
    }

    fn repost_if_free(&mut self, buffer: u16) {
        let b = usize::from(buffer) % RX_BUFFERS;
        if self.rx_refs[b] == 0 && self.rx_held & (1 << buffer) == 0 {
            self.dev.queues[0].push(buffer);
            self.unpublished |= 1 << RXQ;
        }
    }

    /// Whether a transmit slot is free (after taking the device's completions).
    pub fn can_send(&mut self) -> Result<bool, Error> {
        self.reap_tx()?;
        Ok(self.tx_free != 0)
    }

    /// Queues a packet: `header`, then `header.len` bytes at `data` (in the DMA area; inside
    /// receive buffer `rx_buffer` if given, which then stays off the device until the packet
    /// is sent). Waits for a free transmit slot if there is none. Seen by the device after
    /// [`Vsock::flush`].
    pub fn send(
        &mut self,
        header: &Header,
        data: *const u8,
        rx_buffer: Option<u16>,
    ) -> Result<(), Error> {
        while self.tx_free == 0 {
            // The device must see what it is to complete.
            self.flush();
            let (head, _) = self.dev.queues[1].wait_used()?;
            self.tx_done(head);
        }
        let slot = self.tx_free.trailing_zeros() as u16;
        self.tx_free &= !(1 << slot);
        let wire = dma::VsockHeader {
            src_cid: header.src_cid,
            dst_cid: header.dst_cid,
            src_port: header.src_port,
            dst_port: header.dst_port,
            len: header.len,
            kind: header.kind,
            op: header.op,
            flags: header.flags,
            buf_alloc: header.buf_alloc,
            fwd_cnt: header.fwd_cnt,
        };
        // SAFETY: the slot's header is in the kit's DMA area and not with the device (the
        // slot is free); it is packed, so the write is unaligned. `push` fences it before the
        // ring entry.
        unsafe { tx_header(slot).write_unaligned(wire) };
        let tx = &mut self.dev.queues[1];
        let head = 2 * slot;
        if header.len == 0 {
            tx.set_flags_next(head, 0, 0);
        } else {
            tx.set_flags_next(head, VIRTQ_DESC_F_NEXT, head + 1);
            tx.set_desc(head + 1, dma::gpa(data), header.len, 0, 0);
        }
        tx.push(head);
        self.unpublished |= 1 << TXQ;
        self.tx_rx_buffer[usize::from(slot) % dma::VSOCK_TX_SLOTS] = rx_buffer;
        self.tx_len[usize::from(slot) % dma::VSOCK_TX_SLOTS] = header.len;
        if let Some(b) = rx_buffer {
            self.rx_refs[usize::from(b) % RX_BUFFERS] += 1;
        }
        Ok(())
    }

    /// Takes the device's transmit completions: frees their slots and reposts the receive
    /// buffers they held.
    pub fn reap_tx(&mut self) -> Result<(), Error> {
        while let Some(used) = self.dev.queues[1].take_used() {
            let (head, _) = used?;
            self.tx_done(head);
        }
        Ok(())
    }

    fn tx_done(&mut self, head: u16) {
        let slot = head / 2;
        self.tx_free |= 1 << slot;
        self.sent = self
            .sent
            .wrapping_add(self.tx_len[usize::from(slot) % dma::VSOCK_TX_SLOTS]);
        if let Some(b) = self.tx_rx_buffer[usize::from(slot) % dma::VSOCK_TX_SLOTS].take() {
            self.rx_refs[usize::from(b) % RX_BUFFERS] -= 1;
            self.repost_if_free(b);
        }
    }

    /// Payload bytes the device has taken (sent packets completed) since the last call.
    pub fn take_sent(&mut self) -> u32 {
        core::mem::take(&mut self.sent)
    }

    /// Whether every queued packet has been sent.
    pub fn tx_idle(&self) -> bool {
        self.tx_free == (1 << self.tx_slots) - 1
    }

    /// Waits until every queued packet has been sent (so resetting the device loses none).
    pub fn drain(&mut self) -> Result<(), Error> {
        self.flush();
        while !self.tx_idle() {
            let (head, _) = self.dev.queues[1].wait_used()?;
            self.tx_done(head);
        }
        Ok(())
    }

    /// The next event the device reported (its id), if any; the event buffer goes straight
    /// back to the device.
    pub fn event(&mut self) -> Result<Option<u32>, Error> {
        let Some(used) = self.dev.queues[2].take_used() else {
            return Ok(None);
        };
        let (id, _) = used?;
        // SAFETY: the device completed this event buffer, in the kit's DMA area.
        let event = unsafe { event_buffer(id).read_volatile() };
        self.dev.queues[2].push(id);
        self.unpublished |= 1 << EVENTQ;
        Ok(Some(event))
    }
}

fn tx_header(slot: u16) -> *mut dma::VsockHeader {
    let s = usize::from(slot) % dma::VSOCK_TX_SLOTS;
    // SAFETY: only an address inside the kit's DMA area is computed.
    unsafe { addr_of_mut!((*dma::area()).rings.vsock_tx[s]) }
}

fn event_buffer(id: u16) -> *mut u32 {
    let i = usize::from(id) % dma::VSOCK_EVENTS;
    // SAFETY: only an address inside the kit's DMA area is computed.
    unsafe { addr_of_mut!((*dma::area()).rings.vsock_events[i]) }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        // A device that does not reset is reported by the next task that opens it.
        let _ = self.dev.transport.reset();
    }
}
