//! virtio-vsock (virtio 1.2 §5.10) with Firecracker's host model over UNIX sockets.
//!
//! Three queues: receive (device to guest), transmit (guest to device) and event. The guest's
//! CID is the whole configuration space. Only stream sockets, with the spec's credit-based
//! flow control; see [`UnixBackend`] for the host side and the `connection` module for the
//! bounds on what the device buffers.
//!
//! Every buffer goes through the device's [`GuardedMemory`]: a transmit packet whose header
//! the guard refuses is dropped unread; one whose data it refuses is dropped and its
//! connection reset. A receive buffer the guard refuses is returned empty before the device
//! reads anything from the host for it, so no connection loses data. Nothing is read from or written to a
//! refused page, and each refusal is counted.
//!
//! On migration every connection is reset: the restored device (or
//! [`Vsock::reset_for_migration`]) tells the guest with `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`,
//! and host programs see their socket close and connect again, as with Firecracker's
//! snapshots.
//!
//! A device manager wires it like the block device, with one more fd for the event loop —
//! the backend's epoll set, which the [`MutEventSubscriber`](event_manager::MutEventSubscriber)
//! registers itself:
//!
//! ```no_run
//! # use std::sync::{Arc, Mutex};
//! # use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//! # use veil_devices::virtio::{vsock::{Vsock, VsockConfig}, DeviceMemory, MmioTransport};
//! # fn wire(mem: veil_devices::virtio::GuestMemoryMmap) -> Result<(), Box<dyn std::error::Error>> {
//! let vsock = Arc::new(Mutex::new(Vsock::new(VsockConfig::new(3, "/run/veil/v.sock"))?));
//! let transport = MmioTransport::new(vsock.clone(), DeviceMemory::plain(mem, "virtio-vsock"))?;
//! let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
//!     EventManager::new()?;
//! events.add_subscriber(vsock);
//! # let _ = transport; Ok(()) }
//! ```

pub mod client;
mod connection;
mod event_handler;
mod host_socket;
pub mod packet;
mod persist;
mod unix_backend;

use std::path::{Path, PathBuf};

use virtio_bindings::virtio_ids::VIRTIO_ID_VSOCK;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::VsockPacket;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

pub use client::{connect_to_guest, ClientError, GuestConnection};
pub use connection::CONN_BUF_ALLOC;
pub use host_socket::listener_path;
pub use persist::{VsockRestoreArgs, VsockState};
pub use unix_backend::{BackendError, UnixBackend, CONNECT_TIMEOUT};

use super::{
    driver_wants_interrupt, rings_shared, Activation, Active, DeviceError, GuardedMemory,
    Interrupt, InterruptCause, VirtioDevice,
};
use packet::{Header, HEADER_LEN, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET};
use unix_backend::MAX_PKT_BUF_SIZE;

/// Each queue's size, as Firecracker's.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue's index (virtio 1.2 §5.10.2).
pub const RXQ: usize = 0;
/// The transmit queue's index.
pub const TXQ: usize = 1;
/// The event queue's index.
pub const EVQ: usize = 2;
/// Bytes in `struct virtio_vsock_event` (virtio 1.2 §5.10.6.6): `le32 id`.
const EVENT_LEN: u32 = 4;
/// CIDs 0 to 2 are reserved, and so is `VMADDR_CID_ANY`; the upper 32 bits are reserved and
/// zero (virtio 1.2 §5.10.4).
const MIN_GUEST_CID: u64 = 3;
const MAX_GUEST_CID: u64 = 0xffff_fffe;

/// Errors creating or restoring a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// A CID the spec reserves.
    #[error("Guest CID {0} is reserved; use 3 to 4294967294")]
    ReservedCid(u64),
    /// The host side could not be set up.
    #[error("Cannot set up the vsock host side")]
    Backend(#[source] BackendError),
    /// A queue EventFd could not be created.
    #[error("Cannot create a vsock queue eventfd")]
    Eventfd(#[source] std::io::Error),
    /// A queue could not be created.
    #[error("Cannot create a vsock queue")]
    Queue(#[source] virtio_queue::Error),
}

/// What a vsock device needs: `--vsock cid=N,socket=PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID.
    pub guest_cid: u64,
    /// The UNIX socket host programs connect to; guests reach listeners at `PATH_<port>`.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// A device for CID `guest_cid` listening at `uds_path`.
    pub fn new(guest_cid: u64, uds_path: impl Into<PathBuf>) -> Self {
        Self {
            guest_cid,
            uds_path: uds_path.into(),
        }
    }
}

/// A virtio-vsock device.
pub struct Vsock {
    guest_cid: u64,
    backend: UnixBackend,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    active: Option<Active>,
    /// The guest has yet to hear that its connections are gone.
    transport_reset_pending: bool,
    /// Transmit packets wait in the ring until the guest reads the resets owed to it.
    tx_stalled: bool,
    /// Guest data on its way to a host socket.
    scratch: Vec<u8>,
}

impl Vsock {
    /// Listens at the configured path for a guest with the configured CID.
    pub fn new(config: VsockConfig) -> Result<Self, VsockError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&config.guest_cid) {
            return Err(VsockError::ReservedCid(config.guest_cid));
        }
        let backend =
            UnixBackend::new(&config.uds_path, config.guest_cid).map_err(VsockError::Backend)?;
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for _ in [RXQ, TXQ, EVQ] {
            queues.push(Queue::new(QUEUE_SIZE).map_err(VsockError::Queue)?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::Eventfd)?);
        }
        Ok(Self {
            guest_cid: config.guest_cid,
            backend,
            queues,
            queue_events,
            active: None,
            transport_reset_pending: false,
            tx_stalled: false,
            scratch: vec![0; MAX_PKT_BUF_SIZE],
        })
    }

    /// The guest's CID.
    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// The socket host programs connect to.
    pub fn uds_path(&self) -> &Path {
        self.backend.path()
    }

    /// Open connections.
    pub fn connections(&self) -> usize {
        self.backend.connections()
    }

    /// Drops every host connection and tells the guest with a TRANSPORT_RESET event, so
    /// that it drops its side too: what a migration does to vsock.
    pub fn reset_for_migration(&mut self) {
        self.backend.reset_all();
        self.transport_reset_pending = true;
        self.process_event_queue();
    }

    /// Hands the socket path over to a migration target on the same filesystem (as
    /// [`Block::release_disk`](crate::virtio::block::Block::release_disk) does the disk): the
    /// device stops listening and removes its socket file. Open connections stay until
    /// [`reset_for_migration`](Self::reset_for_migration).
    pub fn release_socket(&mut self) {
        self.backend.release_socket();
    }

    /// Listens again, when a migration failed and the guest runs on here.
    pub fn reacquire_socket(&mut self) -> Result<(), VsockError> {
        self.backend.reacquire_socket().map_err(VsockError::Backend)
    }

    /// Handles the host side's events, then moves what they made possible.
    pub(crate) fn handle_backend_events(&mut self) {
        self.backend.handle_events();
        self.serve();
    }

    /// Transmit then receive, until neither can go on: a receive makes room for the resets
    /// a stalled transmit queue waits on.
    fn serve(&mut self) {
        for _ in 0..4 {
            self.process_tx();
            self.process_rx();
            if !self.tx_stalled || self.backend.replies_full() {
                break;
            }
        }
    }

    fn process_tx(&mut self) {
        let (Some(active), queue) = (&self.active, &mut self.queues[TXQ]) else {
            return;
        };
        if !rings_shared(queue, &active.memory) {
            return;
        }
        let mem = active.memory.guarded();
        let mut used_any = false;
        loop {
            if self.backend.replies_full() {
                self.tx_stalled = true;
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                self.tx_stalled = false;
                break;
            };
            let head = chain.head_index();
            transmit(&mem, chain, &mut self.backend, &mut self.scratch);
            if let Err(e) = queue.add_used(&mem, head, 0) {
                tracing::warn!(error = %e, "Cannot return a vsock transmit buffer");
                break;
            }
            used_any = true;
        }
        if used_any && driver_wants_interrupt(queue, &mem) {
            interrupt(&*active.interrupt);
        }
    }

    fn process_rx(&mut self) {
        let (Some(active), queue) = (&self.active, &mut self.queues[RXQ]) else {
            return;
        };
        if !self.backend.has_news() || !rings_shared(queue, &active.memory) {
            return;
        }
        let mem = active.memory.guarded();
        let mut used_any = false;
        while self.backend.has_news() {
            let Some(mut chain) = queue.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            // The buffer passes the guard before any host data is read for it: a refused or
            // malformed buffer comes back empty and costs no connection its data. Any size
            // is fine, what is written is bounded by the bounce buffer.
            let used = match VsockPacket::from_rx_virtq_chain(&mem, &mut chain, u32::MAX) {
                Ok(mut packet) => {
                    let room = packet.data_slice().map_or(0, |s| s.len());
                    let Some((header, data)) = self.backend.next_for_guest(room) else {
                        // Nothing after all: the buffer goes back for the next packet.
                        queue.go_to_previous_position();
                        break;
                    };
                    let used = fill_rx(&mut packet, &header, data);
                    if used == 0 {
                        self.backend.lost_packet(&header);
                    }
                    used
                }
                Err(e) => {
                    tracing::debug!(error = %e, "vsock receive buffer unusable: returned empty");
                    0
                }
            };
            if let Err(e) = queue.add_used(&mem, head, used) {
                tracing::warn!(error = %e, "Cannot return a vsock receive buffer");
                break;
            }
            used_any = true;
        }
        if used_any && driver_wants_interrupt(queue, &mem) {
            interrupt(&*active.interrupt);
        }
    }

    /// Sends TRANSPORT_RESET if it is owed and the driver gave a buffer for it.
    fn process_event_queue(&mut self) {
        let (Some(active), queue) = (&self.active, &mut self.queues[EVQ]) else {
            return;
        };
        if !self.transport_reset_pending || !rings_shared(queue, &active.memory) {
            return;
        }
        let mem = active.memory.guarded();
        let mut used_any = false;
        while self.transport_reset_pending {
            let Some(chain) = queue.pop_descriptor_chain(&mem) else {
                break;
            };
            let head = chain.head_index();
            let written = write_event(&mem, &chain, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET);
            if written {
                self.transport_reset_pending = false;
            }
            let len = if written { EVENT_LEN } else { 0 };
            if let Err(e) = queue.add_used(&mem, head, len) {
                tracing::warn!(error = %e, "Cannot return a vsock event buffer");
                break;
            }
            used_any = true;
        }
        if used_any && driver_wants_interrupt(queue, &mem) {
            interrupt(&*active.interrupt);
        }
    }

    /// Whether the guest has yet to be told of a transport reset.
    pub fn transport_reset_pending(&self) -> bool {
        self.transport_reset_pending
    }

    #[cfg(test)]
    pub(crate) fn backend_mut(&mut self) -> &mut UnixBackend {
        &mut self.backend
    }
}

/// One transmit chain into the backend. The header is read through the guard first, so a
/// packet whose data the guard refuses can still be traced to its connection.
fn transmit(
    mem: &GuardedMemory<'_>,
    mut chain: DescriptorChain<&GuardedMemory<'_>>,
    backend: &mut UnixBackend,
    scratch: &mut [u8],
) {
    let Some(first) = chain.clone().next() else {
        return;
    };
    if first.is_write_only() || (first.len() as usize) < HEADER_LEN {
        tracing::debug!("vsock transmit chain without a header: dropped");
        return;
    }
    let mut raw = [0u8; HEADER_LEN];
    if let Err(e) = mem.read_slice(&mut raw, first.addr()) {
        tracing::debug!(error = %e, "vsock packet header unreadable: dropped");
        return;
    }
    let identified = Header::from_bytes(&raw);
    let packet = match VsockPacket::from_tx_virtq_chain(mem, &mut chain, MAX_PKT_BUF_SIZE as u32) {
        Ok(packet) => packet,
        Err(e) => {
            tracing::debug!(error = %e, "vsock packet unusable: dropped, its connection reset");
            backend.reset_connection_of(&identified);
            return;
        }
    };
    // From here on the header `virtio-vsock` read is the one that counts.
    let header = Header::of(&packet);
    let len = match packet.data_slice() {
        Some(data) => data.copy_to(scratch),
        None => 0,
    };
    backend.on_guest_packet(&header, &scratch[..len]);
}

/// Writes one packet into a receive buffer; the used length, zero if it could not be written.
fn fill_rx<B: vm_memory::bitmap::BitmapSlice>(
    packet: &mut VsockPacket<'_, B>,
    header: &Header,
    data: &[u8],
) -> u32 {
    if !data.is_empty() {
        let written = packet
            .data_slice()
            .is_some_and(|slice| slice.write_slice(data, 0).is_ok());
        if !written {
            return 0;
        }
    }
    if packet.set_header_from_raw(&header.to_bytes()).is_err() {
        return 0;
    }
    // Both fit a descriptor.
    (HEADER_LEN + data.len()) as u32
}

/// Writes an event into the chain's first writable buffer, through the guard.
fn write_event(
    mem: &GuardedMemory<'_>,
    chain: &DescriptorChain<&GuardedMemory<'_>>,
    id: u32,
) -> bool {
    let Some(desc) = chain.clone().find(|d| d.is_write_only()) else {
        return false;
    };
    desc.len() >= EVENT_LEN
        && mem
            .write_obj(id.to_le(), GuestAddress(desc.addr().0))
            .is_ok()
}

fn interrupt(line: &dyn Interrupt) {
    if let Err(e) = line.trigger(InterruptCause::UsedBuffer) {
        tracing::warn!(error = %e, "Cannot interrupt the virtio-vsock driver");
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn features(&self) -> u64 {
        // Stream sockets need no feature bit: a device without VIRTIO_VSOCK_F_SEQPACKET
        // serves streams (virtio 1.2 §5.10.3).
        0
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // `le64 guest_cid` (virtio 1.2 §5.10.4).
        let config = self.guest_cid.to_le_bytes();
        super::read_config_space(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!(
            offset,
            "Write to the read-only virtio-vsock configuration ignored"
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        self.active = Some(Active::start(&self.active, &self.queues, activation)?);
        self.process_event_queue();
        Ok(())
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        for queue in &mut self.queues {
            queue.reset();
        }
        // A driver that starts over has no connections to be told about.
        self.backend.reset_all();
        self.transport_reset_pending = false;
        self.tx_stalled = false;
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RXQ | TXQ => self.serve(),
            EVQ => self.process_event_queue(),
            _ => {}
        }
    }

    fn quiesce(&mut self) -> Result<(), DeviceError> {
        // Packets are handled before the handler returns; what the host sockets have not
        // taken is dropped with the connections on migration.
        Ok(())
    }
}

#[cfg(test)]
mod tests;
