//! The COM1 16550 UART (`vm-superio`) and where its output goes.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Registers a 16550 occupies on the I/O bus.
pub const SERIAL_PORT_LEN: u64 = 8;

/// Output kept for a UNIX-socket client that has not connected yet.
const UNIX_BACKLOG_BYTES: usize = 64 * 1024;

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
}

impl SerialSink {
    /// Opens the sink as a writer.
    pub fn open(&self) -> Result<Box<dyn Write + Send>, SerialError> {
        Ok(match self {
            SerialSink::Stdout => Box::new(io::stdout()),
            SerialSink::Null => Box::new(io::sink()),
            SerialSink::File(path) => Box::new(create_file(path)?),
            SerialSink::UnixSocket(path) => Box::new(UnixSocketOutput::bind(path)?),
        })
    }
}

fn create_file(path: &Path) -> Result<File, SerialError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| SerialError::CreateFile {
            path: path.to_owned(),
            source,
        })
}

/// Fans serial output out to every client of a listening UNIX socket.
struct UnixSocketOutput {
    shared: Arc<Mutex<SocketClients>>,
}

#[derive(Default)]
struct SocketClients {
    streams: Vec<UnixStream>,
    /// Output from before the first client connected, so a late `socat` sees the boot.
    backlog: VecDeque<u8>,
}

impl UnixSocketOutput {
    fn bind(path: &Path) -> Result<Self, SerialError> {
        let bind_error = |source| SerialError::BindSocket {
            path: path.to_owned(),
            source,
        };
        // A stale socket file from an earlier run would make bind fail; a live one is
        // someone else's and bind reports it.
        if path.exists() && UnixStream::connect(path).is_err() {
            std::fs::remove_file(path).map_err(bind_error)?;
        }
        let listener = UnixListener::bind(path).map_err(bind_error)?;
        let shared = Arc::new(Mutex::new(SocketClients::default()));
        let acceptor = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("serial-socket".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let mut clients = acceptor.lock().unwrap_or_else(|e| e.into_inner());
                    let backlog: Vec<u8> = clients.backlog.drain(..).collect();
                    let mut stream = stream;
                    if stream.write_all(&backlog).is_ok() {
                        clients.streams.push(stream);
                    }
                }
            })
            .map_err(bind_error)?;
        Ok(Self { shared })
    }
}

impl Write for UnixSocketOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut clients = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if clients.streams.is_empty() {
            clients.backlog.extend(buf);
            let excess = clients.backlog.len().saturating_sub(UNIX_BACKLOG_BYTES);
            clients.backlog.drain(..excess);
        } else {
            // A client that went away is dropped; the guest never blocks on it.
            clients.streams.retain_mut(|s| s.write_all(buf).is_ok());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
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

/// A 16550 UART on the I/O bus.
pub struct Serial {
    uart: vm_superio::Serial<IrqTrigger, vm_superio::serial::NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    /// A UART writing to `out`, raising its interrupt through `trigger`.
    pub fn new(trigger: IrqTrigger, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: vm_superio::Serial::new(trigger, out),
        }
    }

    /// A UART that carries on from `registers` (saved on another host by [`Self::registers`]).
    pub fn with_registers(
        trigger: IrqTrigger,
        out: Box<dyn Write + Send>,
        registers: &SerialRegisters,
    ) -> Result<Self, SerialError> {
        let uart = vm_superio::Serial::from_state(
            &registers.into(),
            trigger,
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| SerialError::BadState(e.to_string()))?;
        Ok(Self { uart })
    }

    /// The registers and receive FIFO now.
    pub fn registers(&self) -> SerialRegisters {
        self.uart.state().into()
    }

    /// The UART's interrupt eventfd.
    pub fn interrupt(&self) -> &EventFd {
        self.uart.interrupt_evt().eventfd()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            *byte = self.uart.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([byte], Ok(offset)) = (data, u8::try_from(offset)) {
            // The guest cannot act on a host-side write error; keep it running.
            if let Err(e) = self.uart.write(offset, *byte) {
                tracing::warn!("serial output failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmitted_bytes_reach_the_sink() {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let mut serial = Serial::new(IrqTrigger::new().unwrap(), Box::new(Shared(buf.clone())));
        for b in b"hi\n" {
            serial.write(0, &[*b]);
        }
        assert_eq!(&*buf.lock().unwrap(), b"hi\n");
        // Line status: transmitter empty, so a polling driver never stalls.
        let mut lsr = [0u8];
        serial.read(5, &mut lsr);
        assert_ne!(lsr[0] & 0x20, 0);
    }

    #[test]
    fn registers_carry_over_to_a_new_uart() {
        let mut serial = Serial::new(IrqTrigger::new().unwrap(), Box::new(io::sink()));
        // Line control (8N1 with DLAB off), THR-empty interrupts on, a scratch value.
        serial.write(3, &[0x03]);
        serial.write(1, &[0x02]);
        serial.write(7, &[0x5a]);
        let saved = serial.registers();
        let json = serde_json::to_string(&saved).unwrap();
        let restored: SerialRegisters = serde_json::from_str(&json).unwrap();
        let mut again =
            Serial::with_registers(IrqTrigger::new().unwrap(), Box::new(io::sink()), &restored)
                .unwrap();
        for (offset, expected) in [(3u64, 0x03u8), (1, 0x02), (7, 0x5a)] {
            let mut byte = [0u8];
            again.read(offset, &mut byte);
            assert_eq!(byte[0], expected, "register {offset}");
        }
        // A FIFO longer than a UART's is a bad state, not a panic.
        let too_long = SerialRegisters {
            in_buffer: vec![0; 4096],
            ..restored
        };
        assert!(Serial::with_registers(
            IrqTrigger::new().unwrap(),
            Box::new(io::sink()),
            &too_long
        )
        .is_err());
    }

    #[test]
    fn unix_socket_client_gets_backlog_and_live_output() {
        let dir = std::env::temp_dir().join(format!("veil-serial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        let mut out = SerialSink::UnixSocket(path.clone()).open().unwrap();
        out.write_all(b"early ").unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        // The acceptor thread delivers the backlog; wait for it before writing more.
        let mut got = vec![0u8; 6];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, b"early ");
        out.write_all(b"late").unwrap();
        let mut got = vec![0u8; 4];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, b"late");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
