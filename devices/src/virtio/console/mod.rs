//! virtio-console with one port (virtio 1.2 §5.3), no MULTIPORT, no SIZE.
//!
//! ```text
//!  guest transmitq ──► Reader (guard) ──► output: stdout, a file, socket clients
//!  guest receiveq  ◄── Writer (guard) ◄── PendingInput ◄── HostInput (fd on the event loop)
//! ```
//!
//! Output is written as the guest transmits; a host end that fails (a socket client gone,
//! EPIPE) costs the guest its output, never its progress. Input waits in a bounded buffer
//! until the guest posts receive buffers; while that buffer is full the event loop stops
//! reading the input descriptor (see [`crate::host_console`]). Every buffer goes through the
//! device's guard: a chain with a buffer the guest has not shared is returned with length 0,
//! nothing read from or written to it, and the refusal counted.

mod backend;
mod event_handler;
mod persist;
mod port;

use std::io::Write;

use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub use backend::{BackendError, ConsoleBackend};
pub use persist::ConsoleState;

use super::{
    driver_wants_interrupt, rings_shared, Activation, Active, DeviceError, InterruptCause,
    VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
};
use crate::host_console::{ConsoleIo, HostInput, PendingInput, INPUT_CAPACITY};

/// Port 0's receive queue: host to guest (virtio 1.2 §5.3.2).
pub const RECEIVEQ_PORT0: usize = 0;
/// Port 0's transmit queue: guest to host (virtio 1.2 §5.3.2).
pub const TRANSMITQ_PORT0: usize = 1;
/// Each queue's size, as Cloud Hypervisor's console offers.
pub const QUEUE_SIZE: u16 = 256;
/// `struct virtio_console_config`: `le16 cols, le16 rows, le32 max_nr_ports, le32 emerg_wr`
/// (virtio 1.2 §5.3.4).
const CONFIG_LEN: usize = 12;
/// Output moves through a buffer of this size, whatever the chain's length.
const BOUNCE_LEN: usize = 4096;

/// Errors creating or restoring a console.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// A queue EventFd could not be created.
    #[error("Cannot create a console queue eventfd")]
    Eventfd(#[source] std::io::Error),
    /// A queue could not be created.
    #[error("Cannot create a console queue")]
    Queue(#[source] virtio_queue::Error),
    /// A saved state holding more input than a console buffers (a peer's bad state).
    #[error("Saved console input of {len} bytes exceeds the {INPUT_CAPACITY}-byte buffer")]
    PendingTooLong { len: usize },
}

/// The guest's output as the host end takes it.
struct Output {
    sink: Box<dyn Write + Send>,
    /// Whether the last write failed, so a dead sink is logged once, not per chain.
    failing: bool,
    /// Bytes the guest transmitted that the sink did not take.
    dropped: u64,
}

/// A virtio-console device with one port.
pub struct Console {
    output: Output,
    input: Option<HostInput>,
    pending: PendingInput,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    active: Option<Active>,
    bounce: Vec<u8>,
}

impl Console {
    /// A console writing the guest's output to `io.output` and reading its input from
    /// `io.input`. Add it to the event loop to serve its queues and read the input.
    pub fn new(io: ConsoleIo) -> Result<Self, ConsoleError> {
        let queue = || Queue::new(QUEUE_SIZE).map_err(ConsoleError::Queue);
        let eventfd = || EventFd::new(libc::EFD_NONBLOCK).map_err(ConsoleError::Eventfd);
        Ok(Self {
            output: Output {
                sink: io.output,
                failing: false,
                dropped: 0,
            },
            input: io.input,
            pending: PendingInput::new(INPUT_CAPACITY),
            queues: vec![queue()?, queue()?],
            queue_events: vec![eventfd()?, eventfd()?],
            active: None,
            bounce: vec![0; BOUNCE_LEN],
        })
    }

    /// Host input waiting for the guest's receive buffers.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    /// Bytes of guest output the host end failed to take.
    pub fn dropped_output(&self) -> u64 {
        self.output.dropped
    }

    /// Bytes from the host for the guest, for a caller that reads the input itself; returns
    /// how many were taken (the rest did not fit). Call [`VirtioDevice::process_queue`]
    /// with [`RECEIVEQ_PORT0`] to deliver them.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        self.pending.push(bytes)
    }

    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut config = [0u8; CONFIG_LEN];
        // cols and rows stay 0 without VIRTIO_CONSOLE_F_SIZE; one port.
        config[4..8].copy_from_slice(&1u32.to_le_bytes());
        config
    }

    /// Serves one queue; whether the driver is to be interrupted is decided here.
    fn serve(&mut self, index: usize) {
        let (Some(active), Some(queue)) = (&self.active, self.queues.get_mut(index)) else {
            return;
        };
        if !rings_shared(queue, &active.memory) {
            return;
        }
        let mem = active.memory.guarded();
        let used_any = match index {
            RECEIVEQ_PORT0 => port::drain_queue(
                queue,
                &mem,
                &mut self.pending,
                |pending| !pending.is_empty(),
                |pending, chain| port::receive(&mem, chain, pending),
            ),
            TRANSMITQ_PORT0 => {
                let mut tx = (&mut self.output, &mut self.bounce[..]);
                port::drain_queue(
                    queue,
                    &mem,
                    &mut tx,
                    |_| true,
                    |(output, bounce), chain| port::transmit(&mem, chain, output, bounce),
                )
            }
            _ => false,
        };
        if used_any && driver_wants_interrupt(queue, &mem) {
            if let Err(e) = active.interrupt.trigger(InterruptCause::UsedBuffer) {
                tracing::warn!(error = %e, "Cannot interrupt the virtio-console driver");
            }
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn features(&self) -> u64 {
        VIRTIO_RING_F_EVENT_IDX
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
        let config = self.config_space();
        super::read_config_space(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // emerg_wr is writable only with VIRTIO_CONSOLE_F_EMERG_WRITE, not offered.
        tracing::debug!(
            offset,
            "Write to the read-only virtio-console configuration ignored"
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        self.active = Some(Active::start(&self.active, &self.queues, activation)?);
        Ok(())
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        // Input already typed stays for the driver that comes next.
        self.active = None;
        for queue in &mut self.queues {
            queue.reset();
        }
    }

    fn process_queue(&mut self, index: usize) {
        self.serve(index);
    }

    fn quiesce(&mut self) -> Result<(), DeviceError> {
        // Chains complete before the handler returns; only the sink may hold bytes. A sink
        // that cannot flush loses them, as it loses any output: no reason to stop a pause.
        if let Err(e) = self.output.sink.flush() {
            tracing::warn!(error = %e, "Cannot flush the virtio-console output");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
