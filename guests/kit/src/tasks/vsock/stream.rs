//! One stream connection of a vsock task: its addresses and credit (`Stream`), and the steps
//! every task shares: waiting for the device, accepting, refusing, closing.

use crate::serial::{write_dec, write_str};
use crate::virtio::vsock::{
    Header, Received, Vsock, VIRTIO_VSOCK_EVENT_TRANSPORT_RESET, VIRTIO_VSOCK_OP_CREDIT_REQUEST,
    VIRTIO_VSOCK_OP_CREDIT_UPDATE, VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_OP_SHUTDOWN, VIRTIO_VSOCK_SHUTDOWN_RCV,
    VIRTIO_VSOCK_SHUTDOWN_SEND, VIRTIO_VSOCK_TYPE_STREAM,
};
use crate::virtio::{Error, PEER_TIMEOUT_TSC};
use crate::{arch, EXIT_CHECK_FAILED};

/// The receive buffer the kit advertises (`buf_alloc`): what a peer may send beyond what the
/// kit has consumed. It is also the echo's staging ring, so the peer's credit bounds it.
pub const BUF_ALLOC: u32 = 128 * 1024;
/// While data waits for the peer's credit, a CREDIT_REQUEST this often (TSC ticks, ~1 s).
const CREDIT_REQUEST_EVERY_TSC: u64 = 2_500_000_000;
/// How long to wait for the peer's RST after the kit's SHUTDOWN before sending RST itself
/// (§5.10.6.6 leaves it to the implementation), in TSC ticks (~2 s).
const SHUTDOWN_WAIT_TSC: u64 = 5_000_000_000;
/// The task's name, device and port, for its messages.
pub struct Task {
    pub name: &'static str,
    pub dev: u64,
    pub port: u32,
}

impl Task {
    /// Starts a line: `<task>: dev D port P: ` (or `<task> FAILED: ...`).
    pub fn say(&self, failed: bool) {
        write_str(self.name);
        write_str(if failed { " FAILED: dev " } else { ": dev " });
        write_dec(self.dev);
        write_str(" port ");
        write_dec(self.port.into());
        write_str(": ");
    }

    /// `<task> FAILED: dev D port P: <what>` and exit 1.
    pub fn fail(&self, what: &str, bytes: Option<u64>) -> ! {
        self.say(true);
        write_str(what);
        if let Some(bytes) = bytes {
            write_dec(bytes);
            write_str(" bytes");
        }
        write_str("\n");
        arch::exit(EXIT_CHECK_FAILED)
    }
}

/// One stream connection's addresses and credit.
pub struct Stream {
    pub local_port: u32,
    pub peer_cid: u64,
    pub peer_port: u32,
    /// From the peer's last header.
    pub peer_buf_alloc: u32,
    pub peer_fwd_cnt: u32,
    /// Payload bytes the kit has sent.
    pub tx_cnt: u32,
    /// Payload bytes the kit has consumed, and what the peer last heard of it.
    pub fwd_cnt: u32,
    pub fwd_cnt_told: u32,
    /// When the kit may next send a CREDIT_REQUEST (TSC).
    credit_request_at: u64,
}

impl Stream {
    pub fn new(local_port: u32, peer: &Header) -> Stream {
        Stream {
            local_port,
            peer_cid: peer.src_cid,
            peer_port: peer.src_port,
            peer_buf_alloc: peer.buf_alloc,
            peer_fwd_cnt: peer.fwd_cnt,
            tx_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_told: 0,
            credit_request_at: 0,
        }
    }

    /// Whether a packet belongs to this connection.
    pub fn owns(&self, h: &Header) -> bool {
        h.src_cid == self.peer_cid && h.src_port == self.peer_port && h.dst_port == self.local_port
    }

    /// Every header of the peer's carries its current credit.
    pub fn learn(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    /// How many more payload bytes the peer can take (§5.10.6.3).
    pub fn credit(&self) -> u32 {
        let unread = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(unread)
    }

    /// A header to the peer, carrying the kit's credit (which the peer then knows).
    pub fn header(&mut self, guest_cid: u64, op: u16, len: u32, flags: u32) -> Header {
        self.fwd_cnt_told = self.fwd_cnt;
        Header {
            src_cid: guest_cid,
            dst_cid: self.peer_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            kind: VIRTIO_VSOCK_TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// While the kit has data `waiting` and the peer has no room, asks for its credit
    /// (CREDIT_REQUEST) every `CREDIT_REQUEST_EVERY_TSC`: a peer may not volunteer it.
    pub fn ask_for_credit(&mut self, v: &mut Vsock, waiting: bool) -> Result<(), Error> {
        if waiting && self.credit() == 0 && arch::rdtsc() > self.credit_request_at {
            let h = self.header(v.guest_cid, VIRTIO_VSOCK_OP_CREDIT_REQUEST, 0, 0);
            v.send(&h, core::ptr::null(), None)?;
            self.credit_request_at = arch::rdtsc() + CREDIT_REQUEST_EVERY_TSC;
        }
        Ok(())
    }

    /// Sends a CREDIT_UPDATE once the kit has consumed half its buffer unannounced.
    pub fn update_credit(&mut self, v: &mut Vsock, force: bool) -> Result<(), Error> {
        if force || self.fwd_cnt.wrapping_sub(self.fwd_cnt_told) >= BUF_ALLOC / 2 {
            let h = self.header(v.guest_cid, VIRTIO_VSOCK_OP_CREDIT_UPDATE, 0, 0);
            v.send(&h, core::ptr::null(), None)?;
        }
        Ok(())
    }
}

/// What the device had for the task.
pub enum Next {
    Packet(Received),
    /// VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: every connection is gone.
    Reset,
    Idle,
}

/// Takes transmit completions, then the next event or packet; publishes what is pending
/// before reporting nothing.
pub fn next(v: &mut Vsock) -> Result<Next, Error> {
    v.reap_tx()?;
    while let Some(event) = v.event()? {
        // Other event ids are not defined (§5.10.6.7); they are ignored.
        if event == VIRTIO_VSOCK_EVENT_TRANSPORT_RESET {
            write_str("vsock: transport reset\n");
            v.reread_cid();
            return Ok(Next::Reset);
        }
    }
    if let Some(packet) = v.receive()? {
        return Ok(Next::Packet(packet));
    }
    v.flush();
    Ok(Next::Idle)
}

/// Answers a packet for no connection of the kit's with RST (§5.10.6.4), unless it is one.
pub fn refuse(v: &mut Vsock, h: &Header) -> Result<(), Error> {
    if h.op == VIRTIO_VSOCK_OP_RST {
        return Ok(());
    }
    let rst = Header {
        src_cid: v.guest_cid,
        dst_cid: h.src_cid,
        src_port: h.dst_port,
        dst_port: h.src_port,
        len: 0,
        kind: h.kind,
        op: VIRTIO_VSOCK_OP_RST,
        flags: 0,
        buf_alloc: 0,
        fwd_cnt: 0,
    };
    v.send(&rst, core::ptr::null(), None)
}

/// Waits for a connection request on the task's port and accepts it (RESPONSE). Refuses
/// everything else; fails after `PEER_TIMEOUT_TSC` without one.
pub fn accept(v: &mut Vsock, task: &Task) -> Result<Stream, Error> {
    task.say(false);
    write_str("listening (cid ");
    write_dec(v.guest_cid);
    write_str(")\n");
    let deadline = arch::rdtsc() + PEER_TIMEOUT_TSC;
    loop {
        match next(v)? {
            Next::Packet(p) => {
                let h = p.header;
                v.release(p.buffer);
                if h.op == VIRTIO_VSOCK_OP_REQUEST
                    && h.dst_port == task.port
                    && h.kind == VIRTIO_VSOCK_TYPE_STREAM
                {
                    let mut s = Stream::new(task.port, &h);
                    let response = s.header(v.guest_cid, VIRTIO_VSOCK_OP_RESPONSE, 0, 0);
                    v.send(&response, core::ptr::null(), None)?;
                    v.flush();
                    return Ok(s);
                }
                refuse(v, &h)?;
            }
            Next::Reset => {}
            Next::Idle if arch::rdtsc() > deadline => {
                task.fail("no connection request (timed out)", None)
            }
            Next::Idle => arch::pause(),
        }
    }
}

/// Ends a connection cleanly (§5.10.6.6): SHUTDOWN both ways, then the peer's RST, or the
/// kit's own after `SHUTDOWN_WAIT_TSC`; and waits until the device has sent everything.
pub fn shutdown(v: &mut Vsock, s: &mut Stream) -> Result<(), Error> {
    let flags = VIRTIO_VSOCK_SHUTDOWN_RCV | VIRTIO_VSOCK_SHUTDOWN_SEND;
    let h = s.header(v.guest_cid, VIRTIO_VSOCK_OP_SHUTDOWN, 0, flags);
    v.send(&h, core::ptr::null(), None)?;
    let deadline = arch::rdtsc() + SHUTDOWN_WAIT_TSC;
    loop {
        match next(v)? {
            Next::Packet(p) => {
                let h = p.header;
                v.release(p.buffer);
                if s.owns(&h) && h.op == VIRTIO_VSOCK_OP_RST {
                    break;
                }
                if !s.owns(&h) {
                    refuse(v, &h)?;
                }
            }
            Next::Reset => break,
            Next::Idle if arch::rdtsc() > deadline => {
                let rst = s.header(v.guest_cid, VIRTIO_VSOCK_OP_RST, 0, 0);
                v.send(&rst, core::ptr::null(), None)?;
                break;
            }
            Next::Idle => arch::pause(),
        }
    }
    v.drain()
}

/// Handles a packet of the connection that carries no data: credit, and the peer closing
/// (which ends the task: it wanted more). Returns the packet when it is data (RW).
pub fn control(
    v: &mut Vsock,
    s: &mut Stream,
    task: &Task,
    p: Received,
    got: u64,
) -> Result<Option<Received>, Error> {
    let h = p.header;
    if !s.owns(&h) {
        v.release(p.buffer);
        refuse(v, &h)?;
        return Ok(None);
    }
    s.learn(&h);
    match h.op {
        VIRTIO_VSOCK_OP_RW => return Ok(Some(p)),
        VIRTIO_VSOCK_OP_CREDIT_REQUEST => s.update_credit(v, true)?,
        VIRTIO_VSOCK_OP_SHUTDOWN | VIRTIO_VSOCK_OP_RST => {
            task.fail("the peer closed the connection after ", Some(got))
        }
        _ => {}
    }
    v.release(p.buffer);
    Ok(None)
}
