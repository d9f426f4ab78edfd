//! The host's end of a guest console, the UART's or virtio-console's: where the guest's output
//! goes and where the bytes typed for the guest come from.
//!
//! ```text
//!  stdin / pipe / socket client ──► HostInput ──► PendingInput ──► the guest
//!        (fd the event loop watches)   │            (≤ INPUT_CAPACITY)   (UART FIFO or
//!                                      │                                  receive buffers)
//!                       not watched while PendingInput is full: the host's writes back up
//!                       in the kernel, never in Veil
//! ```
//!
//! An input descriptor is read once per readiness report, so it need not be non-blocking:
//! stdin often shares its open file description with stdout, and making it non-blocking would
//! make writes to the terminal fail with EAGAIN. One that is non-blocking works as well.
//!
//! A UNIX socket console ([`UnixSocketConsole`]) listens on a path; every client that connects
//! gets the output (after what was written before the first one came), and the client that
//! connected last is the input. A client that goes away, or stops reading, costs the guest
//! its output to that client and nothing else.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, Events};
use veil_seccomp::{Confinement, ThreadKind};
use vmm_sys_util::eventfd::EventFd;

/// Host input a console holds for a guest that is not taking it, per device.
pub const INPUT_CAPACITY: usize = 16 << 10;

/// Output kept for a UNIX-socket client that has not connected yet.
const UNIX_BACKLOG_BYTES: usize = 64 << 10;

/// Errors setting up the host's end of a console.
#[derive(Debug, thiserror::Error)]
pub enum HostConsoleError {
    /// Standard input could not be duplicated.
    #[error("Cannot use standard input")]
    Stdin(#[source] io::Error),
    /// The socket could not be bound or its acceptor started.
    #[error("Cannot listen on console socket {path}")]
    BindSocket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The eventfd announcing new clients could not be created.
    #[error("Cannot create the console socket's eventfd")]
    Eventfd(#[source] io::Error),
}

/// A console's two directions as the device takes them.
pub struct ConsoleIo {
    /// Where the guest's output goes.
    pub output: Box<dyn Write + Send>,
    /// Where the guest's input comes from, if anywhere.
    pub input: Option<HostInput>,
}

/// Bytes from the host the guest has not taken yet, at most a fixed capacity.
#[derive(Debug, Clone)]
pub(crate) struct PendingInput {
    bytes: VecDeque<u8>,
    capacity: usize,
}

impl PendingInput {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            bytes: VecDeque::new(),
            capacity,
        }
    }

    pub(crate) fn room(&self) -> usize {
        self.capacity.saturating_sub(self.bytes.len())
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    pub(crate) fn to_vec(&self) -> Vec<u8> {
        self.bytes.iter().copied().collect()
    }

    /// Takes what fits of `bytes`; returns how many.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(self.room());
        self.bytes.extend(&bytes[..n]);
        n
    }

    /// The oldest bytes, in one slice (the deque is made contiguous first).
    pub(crate) fn front(&mut self) -> &[u8] {
        self.bytes.make_contiguous()
    }

    /// Forgets the oldest `n` bytes, delivered.
    pub(crate) fn consume(&mut self, n: usize) {
        self.bytes.drain(..n.min(self.bytes.len()));
    }
}

/// Tokens an input uses in its device's event-loop registrations.
#[derive(Debug, Clone, Copy)]
pub(crate) struct InputTokens {
    /// The input descriptor is readable.
    pub(crate) input: u32,
    /// A new socket client connected.
    pub(crate) client: u32,
}

/// Where a console's input comes from: a readable descriptor, or the clients of a UNIX socket
/// console. The device's event loop watches it; see the module documentation.
pub struct HostInput {
    reader: Option<File>,
    clients: Option<ClientHandoff>,
    watching: bool,
}

impl std::fmt::Debug for HostInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostInput")
            .field("fd", &self.reader.as_ref().map(|r| r.as_raw_fd()))
            .field("socket", &self.clients.is_some())
            .field("watching", &self.watching)
            .finish()
    }
}

impl HostInput {
    /// Standard input, through a duplicate so that dropping the device never closes fd 0.
    /// Give it to one device only: two readers would split what is typed between them.
    pub fn stdin() -> Result<Self, HostConsoleError> {
        let fd = io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(HostConsoleError::Stdin)?;
        Ok(Self::from_fd(fd))
    }

    /// Any readable descriptor the event loop can watch: a pipe, a terminal, a connected
    /// stream socket.
    pub fn from_fd(fd: impl Into<OwnedFd>) -> Self {
        Self {
            reader: Some(File::from(fd.into())),
            clients: None,
            watching: false,
        }
    }

    fn socket(clients: ClientHandoff) -> Self {
        Self {
            reader: None,
            clients: Some(clients),
            watching: false,
        }
    }

    /// Whether there is a descriptor the device has stopped reading for want of room.
    pub(crate) fn is_paused(&self) -> bool {
        self.reader.is_some() && !self.watching
    }

    /// Registers with the device's event loop; `room` says whether the device can take input.
    pub(crate) fn init(&mut self, ops: &mut EventOps, tokens: InputTokens, room: bool) {
        if let Some(clients) = &self.clients {
            let events = Events::with_data(&clients.connected, tokens.client, EventSet::IN);
            if let Err(e) = ops.add(events) {
                tracing::error!(error = %e, "Cannot watch for console socket clients");
            }
        }
        self.watching = false;
        self.reconcile(ops, tokens, room);
    }

    /// Watches the descriptor while the device has room, and not otherwise.
    pub(crate) fn reconcile(&mut self, ops: &mut EventOps, tokens: InputTokens, room: bool) {
        let Some(reader) = &self.reader else {
            return;
        };
        if room == self.watching {
            return;
        }
        let events = Events::with_data(reader, tokens.input, EventSet::IN);
        if room {
            match ops.add(events) {
                Ok(()) => self.watching = true,
                Err(e) => {
                    // A regular file or /dev/null as stdin cannot be watched (EPERM): no input
                    // then, as the operator meant; anything else is worth a warning.
                    let quiet = matches!(&e, event_manager::Error::Epoll(errno) if errno.errno() == libc::EPERM);
                    if quiet {
                        tracing::debug!(
                            "The console input cannot be watched (a file or /dev/null): no input"
                        );
                    } else {
                        tracing::warn!(error = %e, "Cannot watch the console input: input ignored");
                    }
                    self.reader = None;
                }
            }
        } else {
            if let Err(e) = ops.remove(events) {
                tracing::warn!(error = %e, "Cannot stop watching the console input");
            }
            self.watching = false;
        }
    }

    /// A client connected to the socket: it becomes the input, replacing the one before.
    pub(crate) fn take_new_client(&mut self, ops: &mut EventOps, tokens: InputTokens, room: bool) {
        let Some(clients) = &self.clients else {
            return;
        };
        if let Err(e) = clients.connected.read() {
            if e.kind() != io::ErrorKind::WouldBlock {
                tracing::warn!(error = %e, "Cannot read the console socket's eventfd");
            }
        }
        let Some(stream) = lock(&clients.shared).latest.take() else {
            return;
        };
        self.close(ops, tokens);
        self.reader = Some(File::from(OwnedFd::from(stream)));
        self.reconcile(ops, tokens, room);
    }

    /// Reads once into `pending`; returns how many bytes arrived. End of input or an error
    /// closes the descriptor (a socket console waits for its next client).
    pub(crate) fn read_into(
        &mut self,
        ops: &mut EventOps,
        tokens: InputTokens,
        pending: &mut PendingInput,
    ) -> usize {
        let Some(reader) = &mut self.reader else {
            return 0;
        };
        let mut buf = [0u8; 4096];
        let want = pending.room().min(buf.len());
        if want == 0 {
            return 0;
        }
        match reader.read(&mut buf[..want]) {
            Ok(0) => {
                tracing::debug!("Console input ended");
                self.close(ops, tokens);
                0
            }
            Ok(n) => pending.push(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                0
            }
            Err(e) => {
                tracing::warn!(error = %e, "Cannot read the console input: input closed");
                self.close(ops, tokens);
                0
            }
        }
    }

    fn close(&mut self, ops: &mut EventOps, tokens: InputTokens) {
        if let (Some(reader), true) = (&self.reader, self.watching) {
            let _ = ops.remove(Events::with_data(reader, tokens.input, EventSet::IN));
        }
        self.watching = false;
        self.reader = None;
    }
}

/// How the socket's acceptor hands the newest client to the input side.
struct ClientHandoff {
    shared: Arc<Mutex<SocketClients>>,
    connected: EventFd,
}

#[derive(Default)]
struct SocketClients {
    streams: Vec<UnixStream>,
    /// Output from before the first client connected, so a late `socat` sees the boot.
    backlog: VecDeque<u8>,
    /// The newest client, until the input side takes it.
    latest: Option<UnixStream>,
}

fn lock(shared: &Mutex<SocketClients>) -> MutexGuard<'_, SocketClients> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// A console on a UNIX socket Veil listens on.
pub struct UnixSocketConsole;

impl UnixSocketConsole {
    /// Listens on `path` (replacing a stale socket file) and starts accepting clients on a
    /// thread under `confinement`'s `console-socket` filter.
    pub fn bind(path: &Path, confinement: &Confinement) -> Result<ConsoleIo, HostConsoleError> {
        let bind_error = |source| HostConsoleError::BindSocket {
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
        let connected = EventFd::new(libc::EFD_NONBLOCK).map_err(HostConsoleError::Eventfd)?;
        let announce = connected.try_clone().map_err(HostConsoleError::Eventfd)?;
        let acceptor = Arc::clone(&shared);
        let confinement = confinement.clone();
        std::thread::Builder::new()
            .name("console-socket".into())
            .spawn(move || match confinement.apply(ThreadKind::ConsoleSocket) {
                Ok(()) => accept_clients(&listener, &acceptor, &announce),
                // Without its thread the socket takes no clients; the guest runs on.
                Err(e) => tracing::error!(error = %veil_seccomp::chain(&e), "The console socket takes no clients"),
            })
            .map_err(bind_error)?;
        Ok(ConsoleIo {
            output: Box::new(UnixSocketOutput {
                shared: Arc::clone(&shared),
            }),
            input: Some(HostInput::socket(ClientHandoff { shared, connected })),
        })
    }
}

fn accept_clients(listener: &UnixListener, shared: &Mutex<SocketClients>, announce: &EventFd) {
    for stream in listener.incoming().flatten() {
        let mut clients = lock(shared);
        let backlog: Vec<u8> = clients.backlog.drain(..).collect();
        if send_all(&stream, &backlog).is_err() {
            continue;
        }
        match stream.try_clone() {
            Ok(input) => {
                clients.latest = Some(input);
                if let Err(e) = announce.write(1) {
                    tracing::warn!(error = %e, "Cannot announce a console socket client");
                }
            }
            Err(e) => tracing::warn!(error = %e, "Console socket client gets output only"),
        }
        clients.streams.push(stream);
    }
}

/// Writes what the socket takes now: without blocking (a client that stops reading must not
/// stall the guest; it misses output instead) and without SIGPIPE (a client that went away is
/// an error to handle, not a signal that ends the VMM).
fn send_all(stream: &UnixStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: `buf` is a live slice of `buf.len()` readable bytes and the descriptor is
        // the stream's own for the whole call; send(2) only reads the buffer.
        let sent = unsafe {
            libc::send(
                stream.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        match usize::try_from(sent) {
            Ok(n) => buf = &buf[n.min(buf.len())..],
            Err(_) => {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => return Ok(()),
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// Fans output out to every client of a console socket.
struct UnixSocketOutput {
    shared: Arc<Mutex<SocketClients>>,
}

impl Write for UnixSocketOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut clients = lock(&self.shared);
        if clients.streams.is_empty() {
            clients.backlog.extend(buf);
            let excess = clients.backlog.len().saturating_sub(UNIX_BACKLOG_BYTES);
            clients.backlog.drain(..excess);
        } else {
            // A client that went away is dropped; the guest never blocks on it.
            clients.streams.retain(|s| send_all(s, buf).is_ok());
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A fresh directory for socket files, removed with the value.
    pub(crate) struct SocketDir(pub(crate) PathBuf);

    impl SocketDir {
        pub(crate) fn new(name: &str) -> Self {
            static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = std::env::temp_dir().join(format!("veil-{name}-{}-{n}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for SocketDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn pending_input_is_bounded_and_ordered() {
        let mut p = PendingInput::new(4);
        assert_eq!(p.push(b"abc"), 3);
        assert_eq!(p.push(b"def"), 1);
        assert_eq!(p.room(), 0);
        assert_eq!(p.front(), b"abcd");
        p.consume(2);
        assert_eq!(p.push(b"xyz"), 2);
        assert_eq!(p.front(), b"cdxy");
        p.consume(10);
        assert_eq!(p.len(), 0);
    }

    #[test]
    fn socket_clients_get_backlog_and_live_output_and_a_gone_client_costs_nothing() {
        let dir = SocketDir::new("console");
        let path = dir.0.join("c.sock");
        let mut io = UnixSocketConsole::bind(&path, &Confinement::off()).unwrap();
        io.output.write_all(b"early ").unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        let mut got = vec![0u8; 6];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, b"early ");
        io.output.write_all(b"late").unwrap();
        let mut got = vec![0u8; 4];
        client.read_exact(&mut got).unwrap();
        assert_eq!(got, b"late");
        drop(client);
        // EPIPE or ECONNRESET from the gone client: dropped, the writer carries on.
        io.output.write_all(b"nobody").unwrap();
        io.output.write_all(b"listens").unwrap();
    }
}
