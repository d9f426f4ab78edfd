//! One stream connection between a guest port and a host UNIX socket, with the spec's
//! credit-based flow control (virtio 1.2 §5.10.6.3).
//!
//! Each direction is bounded:
//! - guest to host: the device advertises `buf_alloc = CONN_BUF_ALLOC`; what the host socket
//!   does not take at once waits in `to_host`, which credit keeps at most that long. A guest
//!   that sends beyond its credit is reset.
//! - host to guest: the device reads the host socket only into a receive buffer the guest
//!   posted, and never more than the guest's credit (`peer_buf_alloc - (tx_cnt -
//!   peer_fwd_cnt)`): whatever the guest has no room for stays in the host socket.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use super::packet::{
    Header, Op, VIRTIO_VSOCK_SHUTDOWN_F_BOTH, VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE,
    VIRTIO_VSOCK_SHUTDOWN_F_SEND,
};

/// The buffer space the device advertises to the guest per connection: the most guest data
/// it ever holds for one connection.
pub const CONN_BUF_ALLOC: u32 = 64 << 10;
/// Forwarded bytes after which the guest is told of its new credit without being asked.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;

/// Why a connection must be reset.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// The guest sent more than the credit the device gave it.
    #[error("The guest sent {len} bytes with {credit} bytes of credit")]
    CreditExceeded { len: usize, credit: u32 },
    /// The host socket failed.
    #[error("The host socket failed")]
    Host(#[source] io::Error),
    /// The guest broke the protocol.
    #[error("Unexpected {0:?} on this connection")]
    Unexpected(Op),
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// The host asked for it; the guest has been sent a REQUEST and not answered yet.
    AwaitingResponse,
    /// Open both ways (as far as shutdowns allow).
    Established,
    /// The host closed its socket; the guest was told with SHUTDOWN and owes an RST.
    Closing,
}

/// Control packets owed to the guest, sent before any data.
#[derive(Debug, Default, Clone, Copy)]
struct Owed {
    request: bool,
    response: bool,
    credit_update: bool,
}

/// What the device sends the guest next on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outgoing {
    /// A control packet with these flags.
    Control(Op, u32),
    /// `n` bytes of data, already in the bounce buffer.
    Data(usize),
}

/// One connection's state.
pub struct Connection {
    stream: UnixStream,
    /// The connection's token in the backend's epoll set.
    pub token: u64,
    pub state: ConnState,
    /// When the device gives up waiting for the guest (RESPONSE, or RST after SHUTDOWN).
    pub deadline: Option<Instant>,
    /// Whether the connection sits in the backend's list of connections with news.
    pub queued: bool,
    owed: Owed,
    /// Guest data the host socket has not taken yet: at most `CONN_BUF_ALLOC` bytes.
    to_host: VecDeque<u8>,
    /// Bytes received from the guest.
    rx_cnt: Wrapping<u32>,
    /// Bytes of those the host socket took.
    fwd_cnt: Wrapping<u32>,
    /// The `fwd_cnt` last sent to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,
    /// The guest's receive buffer and how much of it it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// The host socket may have data (or EOF) the device has not read yet.
    host_readable: bool,
    /// A CREDIT_REQUEST went to the guest and no credit came back yet.
    credit_requested: bool,
    /// `VIRTIO_VSOCK_SHUTDOWN_F_*` the guest sent.
    guest_shutdown: u32,
    host_write_closed: bool,
}

impl Connection {
    fn new(stream: UnixStream, token: u64, state: ConnState, owed: Owed) -> Self {
        Self {
            stream,
            token,
            state,
            deadline: None,
            queued: false,
            owed,
            to_host: VecDeque::new(),
            rx_cnt: Wrapping(0),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            host_readable: false,
            credit_requested: false,
            guest_shutdown: 0,
            host_write_closed: false,
        }
    }

    /// A connection the host asked for: the guest is owed a REQUEST.
    pub fn host_initiated(stream: UnixStream, token: u64, deadline: Instant) -> Self {
        let mut conn = Self::new(
            stream,
            token,
            ConnState::AwaitingResponse,
            Owed {
                request: true,
                ..Owed::default()
            },
        );
        conn.deadline = Some(deadline);
        conn
    }

    /// A connection the guest asked for and a host listener took: the guest is owed a
    /// RESPONSE.
    pub fn guest_initiated(stream: UnixStream, token: u64, request: &Header) -> Self {
        let mut conn = Self::new(
            stream,
            token,
            ConnState::Established,
            Owed {
                response: true,
                ..Owed::default()
            },
        );
        conn.update_peer_credit(request);
        // The host may have written before the device watched the socket.
        conn.host_readable = true;
        conn
    }

    /// The host socket.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Every packet from the guest carries its buffer space (virtio 1.2 §5.10.6.3).
    pub fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
        // Fresh credit ends a CREDIT_REQUEST's wait.
        if self.peer_credit() > 0 {
            self.credit_requested = false;
        }
    }

    /// Bytes the guest has room for. A guest claiming to have consumed more than it was
    /// sent gets nothing rather than a wrapped-around credit.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        if in_flight > self.peer_buf_alloc {
            return 0;
        }
        self.peer_buf_alloc - in_flight
    }

    /// Bytes the device can still take from the guest.
    fn own_credit(&self) -> u32 {
        CONN_BUF_ALLOC.saturating_sub((self.rx_cnt - self.fwd_cnt).0)
    }

    /// Fills in what every packet to the guest carries: the device's buffer and how much of
    /// it the host consumed.
    pub fn stamp(&mut self, header: &mut Header) {
        header.buf_alloc = CONN_BUF_ALLOC;
        header.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
        self.owed.credit_update = false;
    }

    /// The guest answered the device's REQUEST.
    pub fn established(&mut self) {
        self.state = ConnState::Established;
        self.deadline = None;
        self.host_readable = true;
    }

    /// The host socket reported readiness.
    pub fn host_ready(&mut self, readable: bool, writable: bool) -> Result<(), ConnectionError> {
        if readable {
            self.host_readable = true;
        }
        if writable {
            self.flush_to_host()?;
        }
        Ok(())
    }

    /// Data from the guest, for the host socket.
    pub fn send_to_host(&mut self, data: &[u8]) -> Result<(), ConnectionError> {
        let credit = self.own_credit();
        if data.len() > credit as usize {
            return Err(ConnectionError::CreditExceeded {
                len: data.len(),
                credit,
            });
        }
        if self.guest_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND != 0 {
            return Err(ConnectionError::Unexpected(Op::Rw));
        }
        // `data.len()` fits the credit, a u32.
        self.rx_cnt += Wrapping(data.len() as u32);
        let mut written = 0;
        if self.to_host.is_empty() {
            written = write_some(&mut self.stream, data)?;
            self.forwarded(written);
        }
        self.to_host.extend(&data[written..]);
        Ok(())
    }

    /// Writes what waits for the host socket, as far as it takes it.
    fn flush_to_host(&mut self) -> Result<(), ConnectionError> {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            let n = write_some(&mut self.stream, front)?;
            if n == 0 {
                break;
            }
            self.to_host.drain(..n);
            self.forwarded(n);
        }
        self.apply_guest_shutdown();
        Ok(())
    }

    fn forwarded(&mut self, n: usize) {
        // At most `CONN_BUF_ALLOC` bytes are ever outstanding, so `n` fits.
        self.fwd_cnt += Wrapping(n as u32);
        let unreported = (self.fwd_cnt - self.last_fwd_cnt_sent).0;
        let guest_view = CONN_BUF_ALLOC.saturating_sub((self.rx_cnt - self.last_fwd_cnt_sent).0);
        // Tell the guest once a good share is free again, or once everything is forwarded
        // while it believes it is short of space; otherwise the next packet carries it.
        if unreported >= CREDIT_UPDATE_THRESHOLD
            || (unreported > 0 && self.to_host.is_empty() && guest_view < CREDIT_UPDATE_THRESHOLD)
        {
            self.owed.credit_update = true;
        }
    }

    /// The guest asked for the device's credit.
    pub fn credit_requested(&mut self) {
        self.owed.credit_update = true;
    }

    /// The guest shut one or both directions down; [`finished`](Self::finished) says whether
    /// that ends the connection.
    pub fn guest_shutdown(&mut self, flags: u32) {
        self.guest_shutdown |= flags & VIRTIO_VSOCK_SHUTDOWN_F_BOTH;
        self.apply_guest_shutdown();
    }

    /// Passes a guest's "no more data" on to the host once its data is delivered.
    fn apply_guest_shutdown(&mut self) {
        if self.guest_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_SEND != 0
            && self.to_host.is_empty()
            && !self.host_write_closed
        {
            self.host_write_closed = true;
            // A host that already closed its end has nothing left to tell.
            if let Err(e) = self.stream.shutdown(Shutdown::Write) {
                tracing::debug!(error = %e, "Cannot shut the host socket's write side");
            }
        }
    }

    /// Whether the guest shut both directions and everything it sent is delivered.
    pub fn finished(&self) -> bool {
        self.guest_shutdown == VIRTIO_VSOCK_SHUTDOWN_F_BOTH && self.to_host.is_empty()
    }

    /// Whether the connection may have something for the guest.
    pub fn has_news(&self) -> bool {
        let o = self.owed;
        o.request || o.response || o.credit_update || self.wants_to_read()
    }

    fn wants_to_read(&self) -> bool {
        self.host_readable
            && self.state == ConnState::Established
            && self.guest_shutdown & VIRTIO_VSOCK_SHUTDOWN_F_RECEIVE == 0
    }

    /// The next packet for the guest, given `room` bytes of data space in its buffer; data
    /// is read from the host into `bounce`. `None`: nothing to send now. A host read error
    /// means the connection must be reset.
    pub fn next_packet(
        &mut self,
        room: usize,
        bounce: &mut [u8],
        now: Instant,
        linger: std::time::Duration,
    ) -> Result<Option<Outgoing>, ConnectionError> {
        let o = &mut self.owed;
        if std::mem::take(&mut o.request) {
            return Ok(Some(Outgoing::Control(Op::Request, 0)));
        }
        if std::mem::take(&mut o.response) {
            return Ok(Some(Outgoing::Control(Op::Response, 0)));
        }
        if self.wants_to_read() {
            let credit = self.peer_credit() as usize;
            let n = room.min(credit).min(bounce.len());
            if credit == 0 {
                // The guest is full: ask once, and read nothing until it answers.
                if !self.credit_requested {
                    self.credit_requested = true;
                    return Ok(Some(Outgoing::Control(Op::CreditRequest, 0)));
                }
            } else if n == 0 {
                // A receive buffer with no room for data: spend it on a credit update
                // rather than leave it at the head of the ring for ever.
                return Ok(Some(Outgoing::Control(Op::CreditUpdate, 0)));
            } else {
                match self.stream.read(&mut bounce[..n]) {
                    Ok(0) => {
                        // The host closed: both ways, as far as the device can tell.
                        self.host_readable = false;
                        self.state = ConnState::Closing;
                        self.deadline = Some(now + linger);
                        return Ok(Some(Outgoing::Control(
                            Op::Shutdown,
                            VIRTIO_VSOCK_SHUTDOWN_F_BOTH,
                        )));
                    }
                    Ok(read) => {
                        self.tx_cnt += Wrapping(read as u32);
                        return Ok(Some(Outgoing::Data(read)));
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.host_readable = false;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(ConnectionError::Host(e)),
                }
            }
        }
        if std::mem::take(&mut self.owed.credit_update) {
            return Ok(Some(Outgoing::Control(Op::CreditUpdate, 0)));
        }
        Ok(None)
    }

    /// Bytes waiting for the host socket.
    #[cfg(test)]
    pub fn buffered(&self) -> usize {
        self.to_host.len()
    }
}

/// Writes what the socket takes now; a full socket takes nothing.
fn write_some(stream: &mut UnixStream, data: &[u8]) -> Result<usize, ConnectionError> {
    loop {
        match stream.write(data) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(0),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ConnectionError::Host(e)),
        }
    }
}
