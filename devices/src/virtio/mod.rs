//! Virtio devices over virtio-mmio, for plain and SEV guests.
//!
//! ```text
//!  vCPU thread                                   device thread (event-manager loop)
//!  ───────────                                   ──────────────────────────────────
//!  MMIO exit ─► Bus ─► MmioTransport             EventManager
//!                      │ registers, features,      │
//!                      │ status, queue setup       │ queue EventFd readable
//!                      │                           ▼
//!                      │ QueueNotify ─► EventFd ─► Block (MutEventSubscriber)
//!                      │   (later a KVM ioeventfd    │ virtio-queue pops chains through
//!                      │    writes it directly)      │ GuardedMemory ─► SharedPages
//!                      ▼                             ▼
//!               InterruptStatus ◄──── EventFdInterrupt::trigger ─► eventfd (later an irqfd)
//! ```
//!
//! - [`MmioTransport`] is the virtio-mmio version 2 register window (virtio 1.2 §4.2.2). It
//!   negotiates features, always offering `VIRTIO_F_VERSION_1` and, for an encrypted guest,
//!   `VIRTIO_F_ACCESS_PLATFORM`, without which it refuses FEATURES_OK. When the driver sets
//!   DRIVER_OK it activates the device with its [`DeviceMemory`] and interrupt.
//! - A [`VirtioDevice`] owns its queues (configured by the transport) and the per-queue
//!   EventFds. Its event loop works from those EventFds alone, so they can become KVM
//!   ioeventfds and the transport never sees a notification.
//! - Every guest-memory access a device makes, rings and indirect tables included, goes through
//!   [`GuardedMemory`], which asks [`SharedPages`] first. `virtio-queue` does all ring handling
//!   through that view; refusals are counted per device ([`Refusals`]) and logged.
//! - State is saved and restored through [`Persist`](crate::persist::Persist): the transport
//!   carries features, status and queue positions; each device its own state. A restored
//!   transport signals every queue's EventFd, since a kick may have been lost in the move.
//!
//! A device manager wires one device like this:
//!
//! ```no_run
//! # use std::sync::{Arc, Mutex};
//! # use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
//! # use veil_devices::virtio::{block::{Block, BlockConfig}, DeviceMemory, MmioTransport};
//! # use veil_devices::virtio::mmio::MMIO_WINDOW_LEN;
//! # fn wire(mem: veil_devices::virtio::GuestMemoryMmap, bus: &mut veil_devices::Bus)
//! # -> Result<(), Box<dyn std::error::Error>> {
//! let block = Arc::new(Mutex::new(Block::new(BlockConfig::new("disk.img"))?));
//! let memory = DeviceMemory::plain(mem, "virtio-blk0");
//! let refusals = memory.refusals(); // for status
//! let transport = MmioTransport::new(block.clone(), memory)?;
//! // KVM: an ioeventfd per queue at base + QUEUE_NOTIFY_OFFSET with datamatch = index, and
//! // an irqfd on the device's IRQ.
//! let notify = transport.notify_eventfds();
//! let irq = transport.interrupt_eventfd();
//! # let _ = (notify, irq, refusals);
//! bus.insert(Arc::new(Mutex::new(transport)), 0xd000_0000, MMIO_WINDOW_LEN)?;
//! let mut events: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
//!     EventManager::new()?;
//! events.add_subscriber(block);
//! # Ok(()) }
//! ```
//!
//! A console ([`console::Console`]) is wired the same way, from
//! `ConsoleBackend::open` (`--console stdio|file:PATH|unix:PATH`); as a subscriber it also
//! watches its input descriptor, reading it only while it has room for what it reads.

pub mod block;
pub mod console;
pub mod interrupt;
pub mod memory;
pub mod mmio;
#[cfg(test)]
pub(crate) mod testing;
pub mod vsock;

use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

pub use interrupt::{EventFdInterrupt, Interrupt, InterruptCause, InterruptError};
pub use memory::{AllShared, DeviceMemory, GuardedMemory, GuestMemoryMmap, Refusals, SharedPages};
pub use mmio::MmioTransport;

/// What an active device holds: guest memory behind its guard, and its interrupt line.
pub(crate) struct Active {
    pub(crate) memory: DeviceMemory,
    pub(crate) interrupt: Arc<dyn Interrupt>,
}

impl Active {
    /// Starts a device whose state is `current` with `queues`: refused if it is active
    /// already or a queue is not ready.
    pub(crate) fn start(
        current: &Option<Active>,
        queues: &[Queue],
        activation: Activation,
    ) -> Result<Active, DeviceError> {
        if current.is_some() {
            return Err(DeviceError::AlreadyActive);
        }
        use virtio_queue::QueueT;
        if let Some(index) = queues.iter().position(|q| !q.ready()) {
            return Err(DeviceError::QueueNotReady(index));
        }
        Ok(Active {
            memory: activation.memory,
            interrupt: activation.interrupt,
        })
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    /// Guest memory behind the device's guard.
    pub memory: DeviceMemory,
    /// The device's interrupt line.
    pub interrupt: Arc<dyn Interrupt>,
    /// The features the driver accepted.
    pub features: u64,
}

/// Errors activating, quiescing or resetting a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The driver activated a device that is already active.
    #[error("The device is already active")]
    AlreadyActive,
    /// A queue the device needs was not made ready.
    #[error("Queue {0} is not ready")]
    QueueNotReady(usize),
    /// The device's backend failed.
    #[error("The device's backend failed")]
    Backend(#[source] std::io::Error),
}

/// A virtio device behind a transport.
///
/// The transport configures the queues through [`queues_mut`](Self::queues_mut) while the
/// driver sets them up; from activation on, the device alone moves them.
pub trait VirtioDevice: Send {
    /// The virtio device ID (virtio 1.2 §5).
    fn device_type(&self) -> u32;

    /// The device-specific features it offers; the transport adds the transport features.
    fn features(&self) -> u64;

    /// The device's queues, each created with its maximum size.
    fn queues(&self) -> &[Queue];

    /// The queues, for the transport to configure.
    fn queues_mut(&mut self) -> &mut [Queue];

    /// One EventFd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &[EventFd];

    /// Reads the device's configuration space at `offset`; bytes beyond it read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes the device's configuration space; a device with a read-only one ignores this.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device: from now on it serves its queues.
    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError>;

    /// Whether the device is active.
    fn is_active(&self) -> bool;

    /// Back to the state before the driver found it: inactive, queues reset.
    fn reset(&mut self);

    /// Serves the queue `index` after a notification (or a restore).
    fn process_queue(&mut self, index: usize);

    /// Completes what is in flight and makes the device's effects durable, before its state
    /// is saved or the machine paused.
    fn quiesce(&mut self) -> Result<(), DeviceError>;
}

/// The transport features every device offers: `VIRTIO_F_VERSION_1` (virtio 1.2 §6.1).
pub(crate) const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
/// Device access goes through the platform's restrictions, here the shared pages
/// (virtio 1.2 §6.1); Linux SEV guests refuse devices that do not offer it.
pub(crate) const VIRTIO_F_ACCESS_PLATFORM: u64 =
    1 << virtio_bindings::virtio_config::VIRTIO_F_ACCESS_PLATFORM;
/// `used_event`/`avail_event` suppression (virtio 1.2 §2.7.10).
pub(crate) const VIRTIO_RING_F_EVENT_IDX: u64 =
    1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Copies the configuration space `config` from `offset` into `data`; bytes beyond it read as
/// zero (virtio 1.2 §4.2.2: the driver may read any width at any offset in the window).
pub(crate) fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, byte) in data.iter_mut().enumerate() {
        *byte = usize::try_from(offset)
            .ok()
            .and_then(|start| start.checked_add(i))
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

/// Checks a queue's three ring areas before touching any: a ring the device could read but
/// not complete into would leave chains served and never reported.
pub(crate) fn rings_shared(queue: &Queue, memory: &DeviceMemory) -> bool {
    use virtio_queue::QueueT;

    let size = u64::from(queue.size());
    memory.allows(queue.desc_table(), 16 * size, "the descriptor table")
        && memory.allows(queue.avail_ring(), 6 + 2 * size, "the available ring")
        && memory.allows(queue.used_ring(), 6 + 8 * size, "the used ring")
}

/// Whether the driver wants an interrupt for the buffers just used: `used_event` with
/// EVENT_IDX, else the available ring's `VRING_AVAIL_F_NO_INTERRUPT` flag (virtio 1.2
/// §2.7.7), which `virtio-queue` does not look at. When the ring cannot be read, interrupt:
/// a spurious interrupt costs less than a lost one.
pub(crate) fn driver_wants_interrupt(queue: &mut Queue, mem: &GuardedMemory<'_>) -> bool {
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    let wanted = queue.needs_notification(mem).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "Cannot read the driver's used_event");
        true
    });
    if !wanted || queue.event_idx_enabled() {
        return wanted;
    }
    // `flags` is the available ring's first field.
    match mem.read_obj::<u16>(GuestAddress(queue.avail_ring())) {
        Ok(flags) => {
            u16::from_le(flags) & virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT as u16
                == 0
        }
        Err(e) => {
            tracing::warn!(error = %e, "Cannot read the available ring's flags");
            true
        }
    }
}
