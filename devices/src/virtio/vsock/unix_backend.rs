//! The host side of the vsock device over UNIX sockets, after Firecracker's model.
//!
//! ```text
//!  host program                      UnixBackend                         guest
//!  ────────────                      ───────────                         ─────
//!  connect(PATH)  ─────────────────► accept (pending, CONNECT line)
//!  "CONNECT 52\n" ─────────────────► host port H >= 1024 ──── REQUEST H→52 ──►
//!                                                        ◄─── RESPONSE ───────
//!  "OK H\n"       ◄───────────────── established              (or RST, or 2 s: host socket closed)
//!
//!  listener at PATH_80 ◄──connect─── REQUEST g→80 from the guest ◄────────────
//!                                    RESPONSE ──────────────────────────────►
//!                                    (nothing listens: RST)
//! ```
//!
//! Every host socket is non-blocking and sits in the backend's own epoll set, edge-triggered:
//! a readiness edge only marks a connection as having news, and data moves when the guest has
//! posted a buffer and given credit. The device's event loop watches that one epoll fd, so
//! connections come and go without touching the event manager.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{ConnState, Connection, ConnectionError, Outgoing};
use super::host_socket::{
    connect_nonblocking, file_id, listen, listener_path, parse_connect, Listener,
};
use super::packet::{ConnKey, Header, Op, VIRTIO_VSOCK_TYPE_STREAM, VMADDR_CID_HOST};

/// How long a host-initiated connection waits for the guest's RESPONSE, a host program for
/// its CONNECT line, and a closing connection for the guest's RST (Firecracker's
/// `CONN_REQUEST_TIMEOUT_MS` and `CONN_SHUTDOWN_TIMEOUT_MS`).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Host connections (pending and open) one device serves at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Host ports the device allocates for host-initiated connections start here, above every
/// well-known port, as Firecracker's do.
const FIRST_HOST_PORT: u32 = 1 << 30;
/// The longest CONNECT line accepted: "CONNECT 4294967295\r\n" and some slack.
const CONNECT_LINE_MAX: usize = 32;
/// Resets owed for packets on unknown connections; past this the device stops taking the
/// guest's packets until the guest reads its receive queue.
const REPLY_LIMIT: usize = 256;
/// The largest data part of one packet either way.
pub const MAX_PKT_BUF_SIZE: usize = 64 << 10;

const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;
const FIRST_STREAM_TOKEN: u64 = 2;

/// Errors setting up the host side.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The UNIX socket could not be bound.
    #[error("Cannot listen on {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The backend's epoll set could not be created or added to.
    #[error("Cannot set up the vsock backend's epoll set")]
    Epoll(#[source] io::Error),
    /// The timeout timer could not be created.
    #[error("Cannot create the vsock backend's timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
}

/// A host program that connected and has not sent its CONNECT line yet.
struct PendingHost {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// The host side: the listening socket, the host programs' sockets and the connections.
pub struct UnixBackend {
    path: PathBuf,
    guest_cid: u64,
    /// `None` while the path is handed over to a migration target.
    listener: Option<Listener>,
    epoll: Epoll,
    timer: TimerFd,
    pending: HashMap<u64, PendingHost>,
    conns: BTreeMap<ConnKey, Connection>,
    tokens: HashMap<u64, ConnKey>,
    next_token: u64,
    next_host_port: u32,
    /// Connections that may have a packet for the guest, each at most once.
    news: VecDeque<ConnKey>,
    /// Packets for the guest that belong to no live connection: resets.
    replies: VecDeque<Header>,
    bounce: Vec<u8>,
    timeout: Duration,
    /// When the timer fires next, if it is armed.
    timer_deadline: Option<Instant>,
}

impl AsRawFd for UnixBackend {
    /// The epoll set the device's event loop watches.
    fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }
}

impl UnixBackend {
    /// Listens on `path` for a guest with CID `guest_cid`. A socket file left by a VMM that
    /// is gone is replaced; one somebody listens on is not.
    pub fn new(path: &Path, guest_cid: u64) -> Result<Self, BackendError> {
        let epoll = Epoll::new().map_err(BackendError::Epoll)?;
        let timer = TimerFd::new().map_err(BackendError::Timer)?;
        epoll
            .ctl(
                ControlOperation::Add,
                timer.as_raw_fd(),
                EpollEvent::new(EventSet::IN, TIMER_TOKEN),
            )
            .map_err(BackendError::Epoll)?;
        let listener =
            listen(path, &epoll, LISTENER_TOKEN).map_err(|source| BackendError::Bind {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            path: path.to_owned(),
            guest_cid,
            listener: Some(listener),
            epoll,
            timer,
            pending: HashMap::new(),
            conns: BTreeMap::new(),
            tokens: HashMap::new(),
            next_token: FIRST_STREAM_TOKEN,
            next_host_port: FIRST_HOST_PORT,
            news: VecDeque::new(),
            replies: VecDeque::new(),
            bounce: vec![0; MAX_PKT_BUF_SIZE],
            timeout: CONNECT_TIMEOUT,
            timer_deadline: None,
        })
    }

    /// The socket host programs connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Open connections (established or being set up), not counting host programs that
    /// have not sent their CONNECT line.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    #[cfg(test)]
    pub(crate) fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    #[cfg(test)]
    pub(crate) fn connection(&self, key: ConnKey) -> Option<&Connection> {
        self.conns.get(&key)
    }

    /// Whether a packet may be waiting for the guest's receive queue.
    pub fn has_news(&self) -> bool {
        !self.replies.is_empty() || !self.news.is_empty()
    }

    /// Whether the device should stop taking the guest's packets until the guest reads.
    pub fn replies_full(&self) -> bool {
        self.replies.len() >= REPLY_LIMIT
    }

    /// Handles whatever the epoll set reports, then the timeouts that are due.
    pub fn handle_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        loop {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot poll the vsock backend");
                    return;
                }
            };
            for event in &events[..n] {
                self.handle_event(event.data(), event.event_set());
            }
            if n < events.len() {
                break;
            }
        }
        self.expire(Instant::now());
    }

    fn handle_event(&mut self, token: u64, set: EventSet) {
        match token {
            LISTENER_TOKEN => self.accept_all(),
            TIMER_TOKEN => {
                // Readable only once expired, so this read does not block.
                if let Err(e) = self.timer.wait() {
                    tracing::debug!(error = %e, "Cannot read the vsock timer");
                }
                self.timer_deadline = None;
            }
            token if self.pending.contains_key(&token) => self.read_connect_line(token),
            token => {
                let Some(&key) = self.tokens.get(&token) else {
                    return;
                };
                let readable = set.intersects(
                    EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP | EventSet::ERROR,
                );
                let writable = set.contains(EventSet::OUT);
                let Some(conn) = self.conns.get_mut(&key) else {
                    return;
                };
                match conn.host_ready(readable, writable) {
                    Ok(()) if conn.finished() => self.kill(key),
                    Ok(()) => self.announce(key),
                    Err(e) => {
                        tracing::debug!(?key, error = %e, "vsock host socket failed");
                        self.kill(key);
                    }
                }
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            let stream = match listener.socket.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot accept a vsock host connection");
                    return;
                }
            };
            if self.pending.len() + self.conns.len() >= MAX_CONNECTIONS {
                tracing::warn!("vsock host connection refused: {MAX_CONNECTIONS} already open");
                continue;
            }
            if let Err(e) = stream.set_nonblocking(true) {
                tracing::warn!(error = %e, "Cannot make a vsock host socket non-blocking");
                continue;
            }
            let token = self.token();
            if let Err(e) = self.watch(&stream, token, ControlOperation::Add) {
                tracing::warn!(error = %e, "Cannot watch a vsock host socket");
                continue;
            }
            let deadline = Instant::now() + self.timeout;
            self.pending.insert(
                token,
                PendingHost {
                    stream,
                    line: Vec::new(),
                    deadline,
                },
            );
            self.arm_timer(deadline);
            // Its line may be there already.
            self.read_connect_line(token);
        }
    }

    /// Reads the CONNECT line a byte at a time, so that nothing after it is consumed.
    fn read_connect_line(&mut self, token: u64) {
        let Some(pending) = self.pending.get_mut(&token) else {
            return;
        };
        let port = loop {
            let mut byte = [0u8; 1];
            match pending.stream.read(&mut byte) {
                Ok(0) => break None,
                Ok(_) if byte[0] == b'\n' => break parse_connect(&pending.line),
                Ok(_) if pending.line.len() >= CONNECT_LINE_MAX => break None,
                Ok(_) => pending.line.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break None,
            }
        };
        let Some(pending) = self.pending.remove(&token) else {
            return;
        };
        let Some(guest_port) = port else {
            tracing::debug!(line = ?String::from_utf8_lossy(&pending.line), "vsock host connection without a valid CONNECT line: closed");
            self.unwatch(&pending.stream);
            return;
        };
        let Some(host_port) = self.allocate_host_port() else {
            self.unwatch(&pending.stream);
            return;
        };
        let key = ConnKey {
            host_port,
            guest_port,
        };
        let deadline = Instant::now() + self.timeout;
        let conn = Connection::host_initiated(pending.stream, token, deadline);
        self.tokens.insert(token, key);
        self.conns.insert(key, conn);
        self.arm_timer(deadline);
        self.announce(key);
    }

    fn allocate_host_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_host_port;
            self.next_host_port = port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            if !self.conns.keys().any(|k| k.host_port == port) {
                return Some(port);
            }
        }
        None
    }

    fn token(&mut self) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        token
    }

    /// Edge-triggered: an edge marks news; the device reads until the socket is empty.
    fn watch(&self, stream: &UnixStream, token: u64, op: ControlOperation) -> io::Result<()> {
        let set = EventSet::IN | EventSet::OUT | EventSet::READ_HANG_UP | EventSet::EDGE_TRIGGERED;
        self.epoll
            .ctl(op, stream.as_raw_fd(), EpollEvent::new(set, token))
    }

    fn unwatch(&self, stream: &UnixStream) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            stream.as_raw_fd(),
            EpollEvent::default(),
        );
    }

    /// Puts a connection in the list of those with news for the guest.
    fn announce(&mut self, key: ConnKey) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.queued && conn.has_news() {
                conn.queued = true;
                self.news.push_back(key);
            }
        }
    }

    /// Ends a connection: the host socket is closed and the guest owed an RST.
    fn kill(&mut self, key: ConnKey) {
        if self.forget(key) {
            self.replies
                .push_back(Header::to_guest(self.guest_cid, key, Op::Rst));
        }
    }

    /// Ends a connection the guest already knows is gone. Whether there was one.
    fn forget(&mut self, key: ConnKey) -> bool {
        let Some(conn) = self.conns.remove(&key) else {
            return false;
        };
        self.tokens.remove(&conn.token);
        self.unwatch(conn.stream());
        true
    }

    /// Answers a packet that has no connection with an RST.
    fn reply_rst(&mut self, header: &Header) {
        let mut rst = Header::to_guest(self.guest_cid, header.guest_key(), Op::Rst);
        rst.dst_cid = header.src_cid;
        self.replies.push_back(rst);
    }

    /// A packet from the guest (virtio 1.2 §5.10.6.4), with its data.
    pub fn on_guest_packet(&mut self, header: &Header, data: &[u8]) {
        if header.src_cid != self.guest_cid {
            tracing::debug!(
                src_cid = header.src_cid,
                "vsock packet with another source CID dropped"
            );
            return;
        }
        let key = header.guest_key();
        let op = Op::from_raw(header.op);
        let Some(op) = op.filter(|_| {
            header.dst_cid == VMADDR_CID_HOST && header.type_ == VIRTIO_VSOCK_TYPE_STREAM
        }) else {
            tracing::debug!(?header, "vsock packet the device does not serve: reset");
            // A live connection that sends such a packet is reset; an RST is never answered.
            self.forget(key);
            if op != Some(Op::Rst) {
                self.reply_rst(header);
            }
            return;
        };
        let Some(conn) = self.conns.get_mut(&key) else {
            match op {
                Op::Request => self.guest_connect(header),
                Op::Rst => {}
                _ => self.reply_rst(header),
            }
            return;
        };
        conn.update_peer_credit(header);
        let result = match (conn.state, op) {
            (_, Op::Rst) => {
                self.forget(key);
                return;
            }
            (ConnState::AwaitingResponse, Op::Response) => {
                conn.established();
                let line = format!("OK {}\n", key.host_port);
                conn.stream()
                    .write_all(line.as_bytes())
                    .map_err(ConnectionError::Host)
            }
            (ConnState::AwaitingResponse, _) | (_, Op::Request | Op::Response) => {
                Err(ConnectionError::Unexpected(op))
            }
            (_, Op::Rw) => conn.send_to_host(data),
            (_, Op::CreditUpdate) => Ok(()),
            (_, Op::CreditRequest) => {
                conn.credit_requested();
                Ok(())
            }
            (_, Op::Shutdown) => {
                conn.guest_shutdown(header.flags);
                Ok(())
            }
        };
        match result {
            Err(e) => {
                tracing::debug!(?key, error = %e, "vsock connection reset");
                self.kill(key);
            }
            Ok(()) if conn.finished() => self.kill(key),
            Ok(()) => self.announce(key),
        }
    }

    /// The device could not take a packet from the guest (its data lies where the device may
    /// not read): the connection it names is reset.
    pub fn reset_connection_of(&mut self, header: &Header) {
        if header.src_cid != self.guest_cid || Op::from_raw(header.op) == Some(Op::Rst) {
            return;
        }
        // Known or not, the guest learns the connection is gone.
        self.forget(header.guest_key());
        self.reply_rst(header);
    }

    /// The guest asked for host port P: connect to the listener at `PATH_P`.
    fn guest_connect(&mut self, header: &Header) {
        let key = header.guest_key();
        if self.pending.len() + self.conns.len() >= MAX_CONNECTIONS {
            tracing::warn!(
                "vsock connection from the guest refused: {MAX_CONNECTIONS} already open"
            );
            self.reply_rst(header);
            return;
        }
        let path = listener_path(&self.path, key.host_port);
        let stream = match connect_nonblocking(&path) {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(path = %path.display(), error = %e, "Nothing accepts the guest's vsock connection");
                self.reply_rst(header);
                return;
            }
        };
        let token = self.token();
        if let Err(e) = self.watch(&stream, token, ControlOperation::Add) {
            tracing::warn!(error = %e, "Cannot watch a vsock host socket");
            self.reply_rst(header);
            return;
        }
        self.tokens.insert(token, key);
        self.conns
            .insert(key, Connection::guest_initiated(stream, token, header));
        self.announce(key);
    }

    /// The next packet for the guest, with `room` bytes for data in the guest's buffer:
    /// the header, and the data (in the backend's bounce buffer).
    pub fn next_for_guest(&mut self, room: usize) -> Option<(Header, &[u8])> {
        if let Some(reply) = self.replies.pop_front() {
            return Some((reply, &[]));
        }
        let now = Instant::now();
        while let Some(key) = self.news.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.queued = false;
            let out = match conn.next_packet(room, &mut self.bounce, now, self.timeout) {
                Ok(Some(out)) => out,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(?key, error = %e, "vsock connection reset");
                    self.kill(key);
                    return self.replies.pop_front().map(|h| (h, &[][..]));
                }
            };
            let (op, flags, len) = match out {
                Outgoing::Control(op, flags) => (op, flags, 0),
                Outgoing::Data(n) => (Op::Rw, 0, n),
            };
            let mut header = Header::to_guest(self.guest_cid, key, op);
            header.flags = flags;
            // `len` is at most the bounce buffer, 64 KiB.
            header.len = len as u32;
            conn.stamp(&mut header);
            let deadline = conn.deadline;
            if conn.has_news() {
                conn.queued = true;
                self.news.push_back(key);
            }
            if let Some(deadline) = deadline {
                self.arm_timer(deadline);
            }
            return Some((header, &self.bounce[..len]));
        }
        None
    }

    /// A packet for the guest could not be delivered (its buffer lies where the device may
    /// not write, or is malformed): its connection, whose stream now has a hole, is reset.
    pub fn lost_packet(&mut self, header: &Header) {
        if Op::from_raw(header.op) == Some(Op::Rst) {
            return;
        }
        self.kill(ConnKey {
            host_port: header.src_port,
            guest_port: header.dst_port,
        });
    }

    /// Drops every connection and every host program's socket: they see the socket close.
    pub fn reset_all(&mut self) {
        for (_, pending) in self.pending.drain() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                pending.stream.as_raw_fd(),
                EpollEvent::default(),
            );
        }
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for key in keys {
            self.forget(key);
        }
        self.news.clear();
        self.replies.clear();
    }

    /// Stops listening and removes the socket file, so that a migration target on the same
    /// filesystem can listen at the path. Open connections are not touched.
    pub fn release_socket(&mut self) {
        let Some(listener) = self.listener.take() else {
            return;
        };
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            listener.socket.as_raw_fd(),
            EpollEvent::default(),
        );
        // Only the file this device made: somebody may have bound the path since.
        if file_id(&self.path).is_ok_and(|id| id == listener.file) {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "Cannot remove the vsock socket");
            }
        }
    }

    /// Listens at the path again, after a migration that failed.
    pub fn reacquire_socket(&mut self) -> Result<(), BackendError> {
        if self.listener.is_none() {
            let listener = listen(&self.path, &self.epoll, LISTENER_TOKEN).map_err(|source| {
                BackendError::Bind {
                    path: self.path.clone(),
                    source,
                }
            })?;
            self.listener = Some(listener);
        }
        Ok(())
    }

    /// Whether host programs can connect now.
    pub fn is_listening(&self) -> bool {
        self.listener.is_some()
    }

    /// Closes what waited too long.
    fn expire(&mut self, now: Instant) {
        self.pending.retain(|_, p| {
            let keep = p.deadline > now;
            if !keep {
                tracing::debug!("vsock host connection sent no CONNECT line in time: closed");
            }
            keep
        });
        let late: Vec<_> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            tracing::debug!(?key, "vsock connection timed out");
            self.kill(key);
        }
        // The closed pending sockets were removed from epoll by closing them.
        let next = self
            .pending
            .values()
            .map(|p| p.deadline)
            .chain(self.conns.values().filter_map(|c| c.deadline))
            .min();
        if let Some(next) = next {
            self.arm_timer(next);
        }
    }

    /// Makes sure the timer fires by `deadline`; an earlier one already armed stays.
    fn arm_timer(&mut self, deadline: Instant) {
        let now = Instant::now();
        if self
            .timer_deadline
            .is_some_and(|armed| armed <= deadline && armed > now)
        {
            return;
        }
        // The timer only wakes the loop; `expire` decides. A zero duration would disarm it.
        let wait = deadline
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        match self.timer.reset(wait, None) {
            Ok(()) => self.timer_deadline = Some(deadline),
            Err(e) => tracing::warn!(error = %e, "Cannot arm the vsock timer"),
        }
    }
}
