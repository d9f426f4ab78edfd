//! The vsock tasks: `vsock-echo`, `vsock-connect` and `vsock-slow`, one stream connection
//! each, with virtio-vsock's credit-based flow control (virtio 1.2 §5.10.6.3).
//!
//! ```text
//!   host (CID 2)                                 kit (guest CID from the config space)
//!   vsock-echo / vsock-slow:
//!     REQUEST  ------------------------------->  (listening on port P)
//!              <-------------------------------  RESPONSE
//!     RW ...   ------------------------------->  echo: RW back, as the host's credit allows
//!              <-------------------------------  SHUTDOWN (RCV|SEND) after N bytes
//!     RST      ------------------------------->  (or the kit sends RST after a while)
//!   vsock-connect:
//!              <-------------------------------  REQUEST to port P
//!     RESPONSE ------------------------------->
//!              <-------------------------------  RW: N bytes of the pattern, in credit
//!     RW ...   ------------------------------->  checked against the pattern
//! ```
//!
//! Credit: the kit advertises `BUF_ALLOC` bytes and counts in `fwd_cnt` what it has consumed;
//! every packet it sends carries both, and a CREDIT_UPDATE goes out once it has consumed
//! half its buffer without telling the peer. It never sends more than the peer's credit,
//! `buf_alloc - (tx_cnt - fwd_cnt)` from the peer's last header.
//!
//! The guest runs at ~2M instructions a second, so no byte loops: an echo sends the payload
//! from the receive buffer it landed in (zero copy) when the peer's credit covers it, and
//! copies it (`rep movsb`) into a staging ring only while it waits for credit, so receive
//! buffers always go back to the device (a CREDIT_UPDATE needs one to arrive in).
//! `vsock-connect` sends the pattern from a reference copy and checks replies with
//! `repe cmpsq`.

mod stream;

use stream::{accept, control, next, refuse, shutdown, Next, Stream, Task, BUF_ALLOC};

use crate::cmdline::{MmioDevice, VsockOp};
use crate::mem::first_difference;
use crate::serial::{write_dec, write_hex, write_str};
use crate::virtio::vsock::{
    Header, Vsock, RX_PAYLOAD_MAX, VIRTIO_VSOCK_OP_REQUEST, VIRTIO_VSOCK_OP_RESPONSE,
    VIRTIO_VSOCK_OP_RST, VIRTIO_VSOCK_OP_RW, VIRTIO_VSOCK_TYPE_STREAM, VMADDR_CID_HOST,
};
use crate::virtio::{dma, Error, PEER_TIMEOUT_TSC};
use crate::{arch, EXIT_CHECK_FAILED};

/// DMA buffers 8 and 9 (after the receive buffers): the staging ring of `vsock-echo`, the
/// pattern of `vsock-connect`.
const SPARE_BUFFER: usize = crate::virtio::vsock::RX_BUFFERS;
const _: () = assert!(SPARE_BUFFER + 2 <= dma::BUFFERS && 2 * dma::BUFFER_SIZE >= 128 * 1024);
/// `vsock-connect`'s port (from Linux's ephemeral range).
const LOCAL_PORT: u32 = 49152;
/// Most payload in a packet the kit sends (vhost and Firecracker take up to 64 KiB).
const TX_CHUNK: u32 = 32 * 1024;
/// The pattern `vsock-connect` sends: byte `i` of the stream is `i % PATTERN_PERIOD`. A prime
/// period, so bytes lost or repeated show up unless they are a multiple of 251.
const PATTERN_PERIOD: u32 = 251;
/// The reference copy of the pattern: long enough to send a packet from, or check one
/// against, at any offset into the period.
const PATTERN_LEN: usize = (PATTERN_PERIOD + RX_PAYLOAD_MAX) as usize;
const _: () = assert!(TX_CHUNK <= RX_PAYLOAD_MAX && PATTERN_LEN <= 2 * dma::BUFFER_SIZE);

/// Runs `op` on the `dev`-th transport, `device`.
pub fn run(op: &VsockOp, dev: u64, device: &MmioDevice) {
    let (task, port) = match *op {
        VsockOp::Echo { port, .. } => ("vsock-echo", port),
        VsockOp::Connect { port, .. } => ("vsock-connect", port),
        VsockOp::Slow { port } => ("vsock-slow", port),
    };
    let mut vsock = Vsock::open(device.base, device.size)
        .unwrap_or_else(|e| super::device_error(task, dev, device, e));
    let task = Task {
        name: task,
        dev,
        port,
    };
    let result = match *op {
        VsockOp::Echo { bytes, .. } => echo(&mut vsock, &task, bytes as u32),
        VsockOp::Connect { bytes, .. } => connect(&mut vsock, &task, bytes as u32),
        VsockOp::Slow { .. } => slow(&mut vsock, &task),
    };
    if let Err(e) = result {
        super::device_failed(task.name, dev, e);
    }
}

/// The echo's staging ring: stream byte `i` waiting for credit lives at `i % BUF_ALLOC`.
/// The peer may send only `BUF_ALLOC` bytes beyond what the kit has consumed (`fwd_cnt`, which
/// counts bytes once the device has taken their echo), so a byte is never overwritten before
/// its echo is sent.
fn staging() -> *mut u8 {
    dma::buffer(SPARE_BUFFER)
}

fn echo(v: &mut Vsock, task: &Task, bytes: u32) -> Result<(), Error> {
    'listen: loop {
        let mut s = accept(v, task)?;
        // Only this connection's packets count towards `fwd_cnt`.
        v.take_sent();
        // Bytes received (taken into the echo), sent, and the first of them staged.
        let (mut received, mut sent, mut staged_from) = (0u32, 0u32, None::<u32>);
        let mut packets = 0u64;
        let mut deadline = arch::rdtsc() + PEER_TIMEOUT_TSC;
        while sent < bytes {
            s.fwd_cnt = s.fwd_cnt.wrapping_add(v.take_sent());
            match next(v)? {
                Next::Reset => continue 'listen,
                Next::Idle if arch::rdtsc() > deadline => {
                    task.fail("no data (timed out) after ", Some(received.into()))
                }
                Next::Idle => arch::pause(),
                Next::Packet(p) => {
                    deadline = arch::rdtsc() + PEER_TIMEOUT_TSC;
                    let Some(p) = control(v, &mut s, task, p, received.into())? else {
                        continue;
                    };
                    if received.wrapping_sub(s.fwd_cnt).wrapping_add(p.header.len) > BUF_ALLOC {
                        task.fail("the peer sent beyond the credit the kit gave it", None);
                    }
                    let take = p.header.len.min(bytes - received);
                    // Zero copy while nothing waits before it and the peer has room.
                    let direct = if staged_from.is_none() {
                        take.min(s.credit())
                    } else {
                        0
                    };
                    if direct > 0 {
                        s.tx_cnt = s.tx_cnt.wrapping_add(direct);
                        let h = s.header(v.guest_cid, VIRTIO_VSOCK_OP_RW, direct, 0);
                        v.send(&h, p.payload, Some(p.buffer))?;
                        sent += direct;
                        packets += 1;
                    }
                    if take > direct {
                        stage(
                            p.payload.wrapping_add(direct as usize),
                            received + direct,
                            take - direct,
                        );
                        staged_from.get_or_insert(received + direct);
                    }
                    received += take;
                    v.release(p.buffer);
                }
            }
            // Send what waits in the staging ring, as far as the peer's credit goes.
            while let Some(from) = staged_from {
                let offset = from % BUF_ALLOC;
                let n = (received - from)
                    .min(s.credit())
                    .min(TX_CHUNK)
                    .min(BUF_ALLOC - offset);
                if n == 0 || !v.can_send()? {
                    break;
                }
                s.tx_cnt = s.tx_cnt.wrapping_add(n);
                let h = s.header(v.guest_cid, VIRTIO_VSOCK_OP_RW, n, 0);
                v.send(&h, staging().wrapping_add(offset as usize), None)?;
                sent += n;
                packets += 1;
                staged_from = (from + n < received).then_some(from + n);
            }
            s.ask_for_credit(v, staged_from.is_some())?;
            s.update_credit(v, false)?;
        }
        shutdown(v, &mut s)?;
        task.say(false);
        write_str("echoed ");
        write_dec(bytes.into());
        write_str(" bytes in ");
        write_dec(packets);
        write_str(" packets\n");
        return Ok(());
    }
}

/// Copies `len` bytes of the stream from `at` into the staging ring (`rep movsb`, split at
/// the ring's end).
fn stage(from: *const u8, at: u32, len: u32) {
    let offset = (at % BUF_ALLOC) as usize;
    let first = (len as usize).min(BUF_ALLOC as usize - offset);
    // SAFETY: `from` is the payload of a receive buffer the device has filled (`len` bytes);
    // the staging ring is DMA buffers 8..10, which only packets of bytes before `at` still
    // point into, and those lie outside `at..at + len` modulo the ring (the credit bound).
    unsafe {
        core::ptr::copy_nonoverlapping(from, staging().add(offset), first);
        core::ptr::copy_nonoverlapping(from.add(first), staging(), len as usize - first);
    }
}

/// The reference pattern: `PATTERN_LEN` bytes, byte `i` = `i % 251`, in DMA
/// buffers 8..10. Built with one short loop and doubling copies (`rep movsb`).
fn build_pattern() -> *mut u8 {
    let pattern = dma::buffer(SPARE_BUFFER);
    let period = PATTERN_PERIOD as usize;
    for i in 0..period {
        // SAFETY: inside DMA buffer 8, which no device uses yet.
        unsafe { pattern.add(i).write_volatile(i as u8) };
    }
    let mut have = period;
    while have < PATTERN_LEN {
        let n = have.min(PATTERN_LEN - have);
        // SAFETY: `have + n <= PATTERN_LEN`, inside DMA buffers 8..10 (asserted at the constants);
        // the two ranges do not overlap. A multiple of the period is copied, so the
        // pattern stays `i % 251`.
        unsafe { core::ptr::copy_nonoverlapping(pattern, pattern.add(have), n) };
        have += n;
    }
    pattern
}

fn connect(v: &mut Vsock, task: &Task, bytes: u32) -> Result<(), Error> {
    let pattern = build_pattern();
    'connect: loop {
        let request = Header {
            src_cid: v.guest_cid,
            dst_cid: VMADDR_CID_HOST,
            src_port: LOCAL_PORT,
            dst_port: task.port,
            len: 0,
            kind: VIRTIO_VSOCK_TYPE_STREAM,
            op: VIRTIO_VSOCK_OP_REQUEST,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
        };
        v.send(&request, core::ptr::null(), None)?;
        let mut deadline = arch::rdtsc() + PEER_TIMEOUT_TSC;
        let mut s = loop {
            match next(v)? {
                Next::Reset => continue 'connect,
                Next::Idle if arch::rdtsc() > deadline => {
                    task.fail("no answer to the connection request (timed out)", None)
                }
                Next::Idle => arch::pause(),
                Next::Packet(p) => {
                    let h = p.header;
                    v.release(p.buffer);
                    let ours = h.src_cid == VMADDR_CID_HOST
                        && h.src_port == task.port
                        && h.dst_port == LOCAL_PORT;
                    match h.op {
                        VIRTIO_VSOCK_OP_RESPONSE if ours => break Stream::new(LOCAL_PORT, &h),
                        VIRTIO_VSOCK_OP_RST if ours => {
                            task.fail("connection refused by the host (RST)", None)
                        }
                        _ => refuse(v, &h)?,
                    }
                }
            }
        };
        let (mut sent, mut received) = (0u32, 0u32);
        while received < bytes {
            s.ask_for_credit(v, sent < bytes)?;
            // Send the pattern as far as the peer's credit goes.
            while sent < bytes {
                let n = (bytes - sent).min(s.credit()).min(TX_CHUNK);
                if n == 0 || !v.can_send()? {
                    break;
                }
                s.tx_cnt = s.tx_cnt.wrapping_add(n);
                let h = s.header(v.guest_cid, VIRTIO_VSOCK_OP_RW, n, 0);
                let data = pattern.wrapping_add((sent % PATTERN_PERIOD) as usize);
                v.send(&h, data, None)?;
                sent += n;
            }
            match next(v)? {
                Next::Reset => continue 'connect,
                Next::Idle if arch::rdtsc() > deadline => {
                    task.fail("no data (timed out) after ", Some(received.into()))
                }
                Next::Idle => arch::pause(),
                Next::Packet(p) => {
                    deadline = arch::rdtsc() + PEER_TIMEOUT_TSC;
                    let Some(p) = control(v, &mut s, task, p, received.into())? else {
                        continue;
                    };
                    let len = p.header.len;
                    if len > bytes - received {
                        task.fail("the host sent more than it was sent", None);
                    }
                    let expected = pattern.wrapping_add((received % PATTERN_PERIOD) as usize);
                    // SAFETY: the payload is `len` bytes the device wrote; the pattern holds
                    // `PATTERN_PERIOD + RX_PAYLOAD_MAX >= offset + len` bytes.
                    let bad = unsafe { first_difference(p.payload, expected, len as usize) };
                    if let Some(i) = bad {
                        // SAFETY: `i < len`, inside the payload.
                        let found = unsafe { p.payload.add(i).read_volatile() };
                        task.say(true);
                        write_str("byte ");
                        write_dec(u64::from(received) + i as u64);
                        write_str(" is ");
                        write_hex(found.into());
                        write_str(", expected ");
                        write_hex(((received as usize + i) % PATTERN_PERIOD as usize) as u64);
                        write_str("\n");
                        arch::exit(EXIT_CHECK_FAILED);
                    }
                    v.release(p.buffer);
                    received += len;
                    s.fwd_cnt = s.fwd_cnt.wrapping_add(len);
                    s.update_credit(v, false)?;
                }
            }
        }
        shutdown(v, &mut s)?;
        task.say(false);
        write_str("sent and received ");
        write_dec(bytes.into());
        write_str(" bytes, all as sent\n");
        return Ok(());
    }
}

/// Accepts a connection and never consumes a byte (`fwd_cnt` stays 0, no credit update):
/// the peer must stop after `BUF_ALLOC` bytes. Says so when the credit is used up, then waits
/// forever; a byte beyond the credit fails the task.
fn slow(v: &mut Vsock, task: &Task) -> Result<(), Error> {
    'listen: loop {
        let mut s = accept(v, task)?;
        task.say(false);
        write_str("connected; not reading (buf_alloc ");
        write_dec(BUF_ALLOC.into());
        write_str(")\n");
        let mut received = 0u64;
        loop {
            match next(v)? {
                Next::Reset => continue 'listen,
                Next::Idle => arch::pause(),
                Next::Packet(p) => {
                    let Some(p) = control(v, &mut s, task, p, received)? else {
                        continue;
                    };
                    let before = received;
                    received += u64::from(p.header.len);
                    // The buffer goes back to the device, but the bytes count as unread.
                    v.release(p.buffer);
                    if received > BUF_ALLOC.into() {
                        task.fail("the peer sent beyond its credit: ", Some(received));
                    }
                    if before < BUF_ALLOC.into() && received == BUF_ALLOC.into() {
                        task.say(false);
                        write_str("the peer stopped at its credit, ");
                        write_dec(received);
                        write_str(" bytes\n");
                    }
                }
            }
        }
    }
}
