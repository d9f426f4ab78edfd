//! The COM1 16550 UART (`vm-superio`): where its output goes and where its input comes from.
//!
//! Input from the host (stdin or the UART's UNIX socket, see [`crate::host_console`]) goes
//! into the UART's 64-byte receive FIFO; what does not fit waits in a bounded buffer and
//! follows when the guest has emptied the FIFO (vm-superio's `in_buffer_empty` event, seen
//! on the vCPU's read of the receive register). While that buffer is full the event loop stops
//! reading the input descriptor, and the guest's read that makes room wakes it again.

mod event_handler;
mod persist;

use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use veil_seccomp::Confinement;
use vm_superio::serial::SerialEvents;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::host_console::{
    ConsoleIo, HostConsoleError, HostInput, PendingInput, UnixSocketConsole, INPUT_CAPACITY,
};
use crate::BusDevice;

pub use persist::{SerialRestoreArgs, SerialState};

/// Registers a 16550 occupies on the I/O bus.
pub const SERIAL_PORT_LEN: u64 = 8;

/// Raises the UART's interrupt line through an eventfd the VMM wires to the guest's IRQ.
pub struct IrqTrigger(EventFd);

impl IrqTrigger {
    /// A trigger writing to a fresh non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self(EventFd::new(libc::EFD_NONBLOCK)?))
    }

    /// The eventfd to register as the interrupt source.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SerialSink {
    /// The VMM's standard output.
    Stdout,
    /// A file, created or truncated.
    File(PathBuf),
    /// A UNIX socket Veil listens on; connected clients receive the output.
    UnixSocket(PathBuf),
    /// Discarded.
    Null,
}

/// Errors opening a serial sink.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The output file could not be created.
    #[error("Cannot create serial output file {path}")]
    CreateFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Saved registers that no UART can hold (a peer's bad state).
    #[error("Cannot restore the serial port's state: {0}")]
    BadState(String),
    /// The socket could not be bound.
    #[error("Cannot listen on serial socket {path}")]
    BindSocket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The interrupt eventfd could not be created.
    #[error("Cannot create the serial interrupt eventfd")]
    Eventfd(#[source] io::Error),
    /// The input could not be set up.
    #[error("Cannot set up the serial input")]
    Input(#[source] HostConsoleError),
}

impl SerialSink {
    /// Opens the sink as a writer.
    pub fn open(&self, confinement: &Confinement) -> Result<Box<dyn Write + Send>, SerialError> {
        match self {
            // Not through `open_io`, which would take stdin from whoever else reads it.
            SerialSink::Stdout => Ok(Box::new(io::stdout())),
            _ => Ok(self.open_io(confinement)?.output),
        }
    }

    /// Opens the sink with the input that belongs to it: stdin for [`SerialSink::Stdout`],
    /// the connected client for [`SerialSink::UnixSocket`], none otherwise. Only one device
    /// may read stdin: a UART that shares the terminal with another console uses
    /// [`open`](Self::open). A socket's accepting thread runs under `confinement`.
    pub fn open_io(&self, confinement: &Confinement) -> Result<ConsoleIo, SerialError> {
        Ok(match self {
            SerialSink::Stdout => ConsoleIo {
                output: Box::new(io::stdout()),
                input: Some(HostInput::stdin().map_err(SerialError::Input)?),
            },
            SerialSink::Null => ConsoleIo {
                output: Box::new(io::sink()),
                input: None,
            },
            SerialSink::File(path) => ConsoleIo {
                output: Box::new(create_file(path)?),
                input: None,
            },
            SerialSink::UnixSocket(path) => {
                UnixSocketConsole::bind(path, confinement).map_err(|e| match e {
                    HostConsoleError::BindSocket { path, source } => {
                        SerialError::BindSocket { path, source }
                    }
                    other => SerialError::Input(other),
                })?
            }
        })
    }
}

fn create_file(path: &std::path::Path) -> Result<std::fs::File, SerialError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| SerialError::CreateFile {
            path: path.to_owned(),
            source,
        })
}

/// A UART's registers and receive FIFO, as a migration carries them (vm-superio's
/// `SerialState`, which has no serde).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialRegisters {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<vm_superio::serial::SerialState> for SerialRegisters {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl From<&SerialRegisters> for vm_superio::serial::SerialState {
    fn from(r: &SerialRegisters) -> Self {
        Self {
            baud_divisor_low: r.baud_divisor_low,
            baud_divisor_high: r.baud_divisor_high,
            interrupt_enable: r.interrupt_enable,
            interrupt_identification: r.interrupt_identification,
            line_control: r.line_control,
            line_status: r.line_status,
            modem_control: r.modem_control,
            modem_status: r.modem_status,
            scratch: r.scratch,
            in_buffer: r.in_buffer.clone(),
        }
    }
}

/// vm-superio's events the UART acts on: the guest emptied the receive FIFO.
#[derive(Debug, Default)]
struct FifoDrained(AtomicBool);

impl FifoDrained {
    fn take(&self) -> bool {
        self.0.swap(false, Ordering::AcqRel)
    }
}

impl SerialEvents for FifoDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        self.0.store(true, Ordering::Release);
    }
}

type Uart = vm_superio::Serial<IrqTrigger, FifoDrained, Box<dyn Write + Send>>;

/// The UART's receive side beyond its FIFO.
struct Input {
    host: HostInput,
    /// Signalled by the guest's read that makes room while the event loop is not reading.
    room: EventFd,
}

/// A 16550 UART on the I/O bus.
pub struct Serial {
    uart: Uart,
    /// Host bytes that did not fit in the FIFO, in order.
    pending: PendingInput,
    input: Option<Input>,
    /// The host side stopped taking output (a closed pipe, a full disk): said once, not for
    /// every byte the guest goes on writing.
    output_failed: bool,
}

impl Serial {
    /// A UART writing to `out`, raising its interrupt through `trigger`.
    pub fn new(trigger: IrqTrigger, out: Box<dyn Write + Send>) -> Self {
        Self::with_uart(vm_superio::Serial::with_events(
            trigger,
            FifoDrained::default(),
            out,
        ))
    }

    /// A UART that carries on from `registers` (saved on another host by [`Self::registers`]).
    pub fn with_registers(
        trigger: IrqTrigger,
        out: Box<dyn Write + Send>,
        registers: &SerialRegisters,
    ) -> Result<Self, SerialError> {
        let uart =
            vm_superio::Serial::from_state(&registers.into(), trigger, FifoDrained::default(), out)
                .map_err(|e| SerialError::BadState(e.to_string()))?;
        Ok(Self::with_uart(uart))
    }

    fn with_uart(uart: Uart) -> Self {
        Self {
            uart,
            pending: PendingInput::new(INPUT_CAPACITY),
            input: None,
            output_failed: false,
        }
    }

    /// Takes the UART's input from `input`. Add the UART to the event loop afterwards: the
    /// loop reads the input while the UART has room.
    pub fn set_input(&mut self, input: HostInput) -> Result<(), SerialError> {
        let room = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::Eventfd)?;
        self.input = Some(Input { host: input, room });
        Ok(())
    }

    /// Bytes from the host for the guest, for a caller that reads the input itself: what
    /// fits in the FIFO goes there, the rest waits (bounded). Returns how many were taken;
    /// the rest is the caller's to offer again.
    pub fn receive(&mut self, bytes: &[u8]) -> usize {
        let taken = self.pending.push(bytes);
        self.fill_fifo();
        taken
    }

    /// Host bytes waiting beyond the FIFO.
    pub fn pending_input(&self) -> usize {
        self.pending.len()
    }

    /// The registers and receive FIFO now.
    pub fn registers(&self) -> SerialRegisters {
        self.uart.state().into()
    }

    /// The UART's interrupt eventfd.
    pub fn interrupt(&self) -> &EventFd {
        self.uart.interrupt_evt().eventfd()
    }

    /// Moves waiting bytes into the FIFO as far as it has room.
    fn fill_fifo(&mut self) {
        let n = self.pending.len().min(self.uart.fifo_capacity());
        if n == 0 {
            return;
        }
        match self.uart.enqueue_raw_bytes(&self.pending.front()[..n]) {
            Ok(taken) => self.pending.consume(taken),
            // vm-superio queues the bytes before raising the interrupt: they are in.
            Err(vm_superio::serial::Error::Trigger(e)) => {
                tracing::warn!(error = %e, "Cannot raise the serial receive interrupt");
                self.pending.consume(n);
            }
            Err(e) => tracing::debug!(error = %e, "Serial FIFO took no input"),
        }
    }

    /// After a guest read: refills an emptied FIFO and wakes a paused input.
    fn after_guest_read(&mut self) {
        if !self.uart.events().take() {
            return;
        }
        self.fill_fifo();
        if let Some(input) = &self.input {
            if input.host.is_paused() && self.pending.room() > 0 {
                if let Err(e) = input.room.write(1) {
                    tracing::warn!(error = %e, "Cannot wake the serial input");
                }
            }
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            *byte = self.uart.read(offset);
            self.after_guest_read();
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            // The guest cannot act on a host-side write error; keep it running.
            if let Err(e) = self.uart.write(offset, *byte) {
                if !self.output_failed {
                    tracing::warn!(
                        "serial output failed: {e}; further failures are not logged (the guest's \
                         output is lost while they last)"
                    );
                    self.output_failed = true;
                } else {
                    tracing::trace!("serial output failed: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
