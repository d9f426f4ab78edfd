use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempdir::TempDir;

use super::packet::{ConnKey, Header, Op, VIRTIO_VSOCK_TYPE_STREAM, VMADDR_CID_HOST};
use super::*;
use crate::persist::Persist;
use crate::virtio::memory::{self, tests::PrivateRanges};
use crate::virtio::mmio::MmioRestoreArgs;
use crate::virtio::testing::{readable, writable, TestDriver, TestQueue, RIG_MEMORY};
use crate::virtio::{DeviceMemory, GuestMemoryMmap, MmioTransport};
use crate::BusDevice;

const GUEST_CID: u64 = 3;
/// What the test guest advertises unless a test says otherwise.
const GUEST_BUF: u32 = 256 << 10;
/// Receive buffers: a header descriptor, then this much data.
const RX_DATA: u32 = 4096;
const RX_BASE: u64 = 0x10_0000 / 16;
const TX_BASE: u64 = 0x8_0000;
const EV_BUF: u64 = 0xf_0000;

/// A vsock device on a transport, its socket in a fresh directory, and a guest driver.
struct Rig {
    mem: GuestMemoryMmap,
    pages: Arc<PrivateRanges>,
    vsock: Arc<Mutex<Vsock>>,
    driver: TestDriver,
    rx: TestQueue,
    tx: TestQueue,
    ev: TestQueue,
    rx_seen: u16,
    dir: TempDir,
}

fn rig(encrypted: bool) -> Rig {
    let dir = TempDir::new().unwrap();
    let path = dir.as_path().join("v.sock");
    let vsock = Arc::new(Mutex::new(
        Vsock::new(VsockConfig::new(GUEST_CID, &path)).unwrap(),
    ));
    let mem = memory::tests::memory(RIG_MEMORY);
    let pages = Arc::new(PrivateRanges::default());
    let device_memory = if encrypted {
        DeviceMemory::encrypted(mem.clone(), pages.clone(), "virtio-vsock-test")
    } else {
        DeviceMemory::plain(mem.clone(), "virtio-vsock-test")
    };
    let transport = MmioTransport::new(vsock.clone(), device_memory).unwrap();
    let rx = TestQueue::new(&mem, 0x1000, 16);
    let tx = TestQueue::new(&mem, 0x4000, 16);
    let ev = TestQueue::new(&mem, 0x7000, 16);
    let mut r = Rig {
        mem,
        pages,
        vsock,
        driver: TestDriver { transport },
        rx,
        tx,
        ev,
        rx_seen: 0,
        dir,
    };
    let features = r.driver.device_features();
    assert!(r.driver.negotiate(features));
    for (index, queue) in [(0, &r.rx), (1, &r.tx), (2, &r.ev)] {
        r.driver.setup_queue(index, queue);
    }
    r.driver.driver_ok();
    assert!(r.vsock.lock().unwrap().is_active());
    r
}

/// Where the receive buffer of chain `head` lies: header, then data.
fn rx_addr(head: u16) -> (u64, u64) {
    let base = RX_BASE + u64::from(head) * 0x2000;
    (base, base + 0x100)
}

fn tx_addr(head: u16) -> (u64, u64) {
    let base = TX_BASE + u64::from(head) * 0x2000;
    (base, base + 0x100)
}

/// A packet from the guest to the host.
fn from_guest(op: Op, guest_port: u32, host_port: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: VMADDR_CID_HOST,
        src_port: guest_port,
        dst_port: host_port,
        type_: VIRTIO_VSOCK_TYPE_STREAM,
        op: op.raw(),
        buf_alloc: GUEST_BUF,
        ..Header::default()
    }
}

impl Rig {
    fn path(&self) -> PathBuf {
        self.dir.as_path().join("v.sock")
    }

    /// Posts `n` receive buffers, each filled with 0xee so untouched bytes show.
    fn post_rx(&mut self, n: usize) {
        for _ in 0..n {
            let (hdr, data) = rx_addr(self.rx.next_head());
            self.mem
                .write_slice(&[0xee; 0x100 + RX_DATA as usize], GuestAddress(hdr))
                .unwrap();
            self.rx.submit(
                &self.mem,
                &[writable(hdr, HEADER_LEN as u32), writable(data, RX_DATA)],
            );
        }
        self.vsock.lock().unwrap().process_queue(RXQ);
    }

    /// The packets the device put in receive buffers since the last call.
    fn guest_rx(&mut self) -> Vec<(Header, Vec<u8>)> {
        let mut out = Vec::new();
        while self.rx_seen != self.rx.used_idx(&self.mem) {
            let (head, len) = self.rx.used_elem(&self.mem, self.rx_seen);
            self.rx_seen = self.rx_seen.wrapping_add(1);
            let (hdr, data) = rx_addr(head as u16);
            let mut raw = [0u8; HEADER_LEN];
            self.mem.read_slice(&mut raw, GuestAddress(hdr)).unwrap();
            let header = Header::from_bytes(&raw);
            let mut bytes = vec![0u8; (len as usize).saturating_sub(HEADER_LEN)];
            self.mem.read_slice(&mut bytes, GuestAddress(data)).unwrap();
            if len == 0 {
                out.push((Header::default(), Vec::new()));
            } else {
                assert_eq!(header.len as usize, bytes.len());
                out.push((header, bytes));
            }
        }
        out
    }

    /// Sends one packet from the guest and lets the device serve the transmit queue.
    fn guest_send(&mut self, mut header: Header, data: &[u8]) {
        header.len = data.len() as u32;
        self.guest_send_raw(header, data);
    }

    /// Sends a packet whose header says what it likes about its length.
    fn guest_send_raw(&mut self, header: Header, data: &[u8]) {
        let (hdr, at) = tx_addr(self.tx.next_head());
        self.mem
            .write_slice(&header.to_bytes(), GuestAddress(hdr))
            .unwrap();
        self.mem.write_slice(data, GuestAddress(at)).unwrap();
        let mut chain = vec![readable(hdr, HEADER_LEN as u32)];
        if !data.is_empty() {
            chain.push(readable(at, data.len() as u32));
        }
        self.tx.submit(&self.mem, &chain);
        self.vsock.lock().unwrap().process_queue(TXQ);
    }

    /// What the event loop does when the host side has news.
    fn host_events(&self) {
        self.vsock.lock().unwrap().handle_backend_events();
    }

    /// Polls the host side until the guest has received something, or a second passed.
    fn wait_rx(&mut self) -> Vec<(Header, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(1);
        loop {
            self.host_events();
            let got = self.guest_rx();
            if !got.is_empty() || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A host-initiated connection to guest port 52, accepted by the guest with `buf_alloc`:
    /// the host's stream (past `OK`) and the connection.
    fn host_connection(&mut self, buf_alloc: u32) -> (UnixStream, ConnKey) {
        let path = self.path();
        let client = std::thread::spawn(move || {
            connect_to_guest(&path, 52, Duration::from_secs(5)).unwrap()
        });
        self.post_rx(4);
        let got = self.wait_rx();
        assert_eq!(got.len(), 1, "{got:?}");
        let request = got[0].0;
        assert_eq!(Op::from_raw(request.op), Some(Op::Request));
        let key = ConnKey {
            host_port: request.src_port,
            guest_port: request.dst_port,
        };
        let mut response = from_guest(Op::Response, 52, key.host_port);
        response.buf_alloc = buf_alloc;
        self.guest_send(response, &[]);
        let conn = client.join().unwrap();
        assert_eq!(conn.host_port, key.host_port);
        (conn.stream, key)
    }

    fn refusals(&self) -> u64 {
        self.driver.transport.refusals()
    }
}

fn op(header: &Header) -> Option<Op> {
    Op::from_raw(header.op)
}

fn read_exact_within(stream: &mut UnixStream, len: usize) -> Vec<u8> {
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).unwrap();
    buf
}

fn assert_closed(stream: &mut UnixStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut byte = [0u8; 1];
    assert_eq!(stream.read(&mut byte).unwrap(), 0, "the device closed it");
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn config_space_holds_the_guest_cid() {
    let r = rig(false);
    let vsock = r.vsock.lock().unwrap();
    assert_eq!(vsock.device_type(), 19);
    let mut cid = [0u8; 8];
    vsock.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    let mut beyond = [0xffu8; 4];
    vsock.read_config(8, &mut beyond);
    assert_eq!(beyond, [0; 4]);
}

#[test]
fn reserved_cids_are_refused() {
    let dir = TempDir::new().unwrap();
    for cid in [0, 1, 2, u64::from(u32::MAX), 1 << 32] {
        let err = Vsock::new(VsockConfig::new(cid, dir.as_path().join("v")))
            .err()
            .unwrap();
        assert!(
            matches!(err, VsockError::ReservedCid(c) if c == cid),
            "{err}"
        );
    }
}

#[test]
fn host_connect_becomes_a_request_and_the_response_an_ok() {
    let mut r = rig(false);
    let mut host = UnixStream::connect(r.path()).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    r.post_rx(2);
    let got = r.wait_rx();
    assert_eq!(got.len(), 1);
    let request = got[0].0;
    assert_eq!(op(&request), Some(Op::Request));
    assert_eq!(
        (request.src_cid, request.dst_cid, request.dst_port),
        (VMADDR_CID_HOST, GUEST_CID, 52)
    );
    assert!(request.src_port >= 1024);
    assert_eq!(request.type_, VIRTIO_VSOCK_TYPE_STREAM);
    assert_eq!(request.buf_alloc, CONN_BUF_ALLOC);

    r.guest_send(from_guest(Op::Response, 52, request.src_port), &[]);
    let answer = read_exact_within(&mut host, format!("OK {}\n", request.src_port).len());
    assert_eq!(answer, format!("OK {}\n", request.src_port).as_bytes());
    assert_eq!(r.vsock.lock().unwrap().connections(), 1);
}

#[test]
fn data_moves_both_ways_byte_exact() {
    let mut r = rig(false);
    let (mut host, key) = r.host_connection(GUEST_BUF);

    // Host to guest: 10000 bytes arrive in 4 KiB receive buffers, in order.
    let sent = pattern(10_000, 1);
    host.write_all(&sent).unwrap();
    r.post_rx(4);
    let mut received = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while received.len() < sent.len() && Instant::now() < deadline {
        for (header, data) in r.wait_rx() {
            assert_eq!(op(&header), Some(Op::Rw), "{header:?}");
            assert_eq!((header.src_port, header.dst_port), (key.host_port, 52));
            received.extend(data);
        }
        r.post_rx(1);
    }
    assert_eq!(received, sent);

    // Guest to host: two packets, one of them a full receive buffer's worth.
    let first = pattern(4096, 2);
    let second = pattern(904, 3);
    r.guest_send(from_guest(Op::Rw, 52, key.host_port), &first);
    r.guest_send(from_guest(Op::Rw, 52, key.host_port), &second);
    let got = read_exact_within(&mut host, 5000);
    assert_eq!(got[..4096], first[..]);
    assert_eq!(got[4096..], second[..]);
}

#[test]
fn a_megabyte_echoes_through_both_credit_windows() {
    const TOTAL: usize = 1 << 20;
    const GUEST_WINDOW: u32 = 64 << 10;
    let mut r = rig(false);
    let (host, key) = r.host_connection(GUEST_WINDOW);
    let sent = pattern(TOTAL, 5);
    let mut writer = host.try_clone().unwrap();
    let to_write = sent.clone();
    let writer = std::thread::spawn(move || writer.write_all(&to_write).unwrap());
    let mut reader = host;
    let reader = std::thread::spawn(move || read_exact_within(&mut reader, TOTAL));

    // The guest: consumes what it receives, returns credit, echoes within the device's.
    let (mut consumed, mut echoed, mut reported) = (0u32, 0u32, 0u32);
    let (mut dev_buf_alloc, mut dev_fwd_cnt) = (0u32, 0u32);
    let mut received = Vec::new();
    let mut backlog = std::collections::VecDeque::new();
    let mut outstanding = 3; // host_connection posted 4; the REQUEST used one.
    let deadline = Instant::now() + Duration::from_secs(30);
    while (received.len() < TOTAL || !backlog.is_empty()) && Instant::now() < deadline {
        r.host_events();
        let got = r.guest_rx();
        outstanding -= got.len();
        let progressed = !got.is_empty();
        for (header, data) in got {
            dev_buf_alloc = header.buf_alloc;
            dev_fwd_cnt = header.fwd_cnt;
            if op(&header) == Some(Op::Rw) {
                consumed = consumed.wrapping_add(data.len() as u32);
                // The device never has more in flight than the window the guest gave.
                assert!(consumed.wrapping_sub(reported) <= GUEST_WINDOW);
                backlog.extend(&data);
                received.extend(data);
            }
        }
        if progressed {
            let mut update = from_guest(Op::CreditUpdate, 52, key.host_port);
            update.buf_alloc = GUEST_WINDOW;
            update.fwd_cnt = consumed;
            r.guest_send(update, &[]);
            reported = consumed;
        }
        loop {
            let credit = dev_buf_alloc.saturating_sub(echoed.wrapping_sub(dev_fwd_cnt));
            let n = backlog.len().min(credit as usize).min(4096);
            if n == 0 {
                break;
            }
            let chunk: Vec<u8> = backlog.drain(..n).collect();
            let mut rw = from_guest(Op::Rw, 52, key.host_port);
            rw.buf_alloc = GUEST_WINDOW;
            rw.fwd_cnt = consumed;
            r.guest_send(rw, &chunk);
            echoed = echoed.wrapping_add(n as u32);
        }
        if outstanding < 6 {
            r.post_rx(6 - outstanding);
            outstanding = 6;
        }
        if !progressed {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    writer.join().unwrap();
    assert!(received == sent, "host to guest differs");
    assert!(reader.join().unwrap() == sent, "the echo differs");
}

#[test]
fn a_guest_without_credit_gets_nothing_and_the_rest_stays_in_the_socket() {
    let mut r = rig(false);
    let (mut host, key) = r.host_connection(0);
    host.write_all(&pattern(100, 7)).unwrap();
    r.post_rx(4);
    // The device asks for credit once, and sends no data.
    let got = r.wait_rx();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(op(&got[0].0), Some(Op::CreditRequest));
    r.host_events();
    assert!(r.guest_rx().is_empty());

    // 64 bytes of credit: exactly 64 bytes, the other 36 stay in the host socket.
    let mut update = from_guest(Op::CreditUpdate, 52, key.host_port);
    update.buf_alloc = 64;
    r.guest_send(update, &[]);
    let got = r.wait_rx();
    let data: Vec<u8> = got.iter().flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(data, pattern(100, 7)[..64]);
    r.host_events();
    assert!(r
        .guest_rx()
        .iter()
        .all(|(h, _)| op(h) == Some(Op::CreditRequest)));

    // The guest consumed them: the remaining 36 come.
    let mut update = from_guest(Op::CreditUpdate, 52, key.host_port);
    update.buf_alloc = 64;
    update.fwd_cnt = 64;
    r.guest_send(update, &[]);
    let data: Vec<u8> = r.wait_rx().iter().flat_map(|(_, d)| d.clone()).collect();
    assert_eq!(data, pattern(100, 7)[64..]);
}

#[test]
fn the_device_advertises_and_returns_credit() {
    let mut r = rig(false);
    let (mut host, key) = r.host_connection(GUEST_BUF);
    r.post_rx(4);
    // The guest sends a quarter of the device's buffer; the host reads it; the device tells
    // the guest its credit is back.
    let chunk = pattern(4096, 9);
    for _ in 0..(CONN_BUF_ALLOC / 4 / 4096) {
        r.guest_send(from_guest(Op::Rw, 52, key.host_port), &chunk);
    }
    let got = r.guest_rx();
    let update = got
        .iter()
        .find(|(h, _)| op(h) == Some(Op::CreditUpdate))
        .map(|(h, _)| *h)
        .expect("a credit update");
    assert_eq!(update.buf_alloc, CONN_BUF_ALLOC);
    assert_eq!(update.fwd_cnt, CONN_BUF_ALLOC / 4);
    read_exact_within(&mut host, (CONN_BUF_ALLOC / 4) as usize);

    // Asked, it answers.
    r.guest_send(from_guest(Op::CreditRequest, 52, key.host_port), &[]);
    let got = r.guest_rx();
    assert_eq!(got.len(), 1);
    assert_eq!(op(&got[0].0), Some(Op::CreditUpdate));
    assert_eq!(got[0].0.fwd_cnt, CONN_BUF_ALLOC / 4);
}

#[test]
fn malformed_receive_buffers_come_back_empty_and_cost_nothing() {
    let mut r = rig(false);
    let (mut host, key) = r.host_connection(GUEST_BUF);
    // Spend what host_connection posted.
    for _ in 0..3 {
        host.write_all(b"x").unwrap();
        assert_eq!(r.wait_rx().len(), 1);
    }
    host.write_all(b"data").unwrap();
    // A header-only buffer, a read-only one, and one whose data part has no room.
    let (hdr, data) = rx_addr(r.rx.next_head());
    r.rx.submit(&r.mem, &[writable(hdr, HEADER_LEN as u32)]);
    let (hdr, data2) = rx_addr(r.rx.next_head());
    r.rx.submit(
        &r.mem,
        &[readable(hdr, HEADER_LEN as u32), readable(data2, 64)],
    );
    let (hdr, _) = rx_addr(r.rx.next_head());
    r.rx.submit(
        &r.mem,
        &[writable(hdr, HEADER_LEN as u32), writable(data, 0)],
    );
    r.host_events();
    let got = r.guest_rx();
    assert_eq!(got.len(), 3, "{got:?}");
    assert_eq!(got[0].1.len() + got[1].1.len(), 0);
    // The buffer without room carried a credit update rather than sitting in the ring.
    assert_eq!(op(&got[2].0), Some(Op::CreditUpdate));
    assert_eq!(got[2].0.dst_port, key.guest_port);
    r.post_rx(1);
    assert_eq!(r.guest_rx()[0].1, b"data");
    assert_eq!(r.vsock.lock().unwrap().connections(), 1);
}

#[test]
fn a_guest_beyond_its_credit_is_reset() {
    let mut r = rig(false);
    let (mut host, key) = r.host_connection(GUEST_BUF);
    r.post_rx(2);
    // The host reads nothing, so what its socket does not take waits in the device: credit
    // keeps that under CONN_BUF_ALLOC, and a guest ignoring it loses the connection.
    let chunk = pattern(32 << 10, 4);
    let mut reset = false;
    for _ in 0..64 {
        r.guest_send(from_guest(Op::Rw, 52, key.host_port), &chunk);
        if let Some(conn) = r.vsock.lock().unwrap().backend_mut().connection(key) {
            assert!(conn.buffered() <= CONN_BUF_ALLOC as usize);
            continue;
        }
        reset = true;
        break;
    }
    assert!(reset, "the connection survived a guest ignoring credit");
    // Credit updates may have taken every buffer: read them, then give the RST room.
    let mut seen = r.guest_rx();
    r.post_rx(4);
    seen.extend(r.guest_rx());
    assert!(seen.iter().any(|(h, _)| op(h) == Some(Op::Rst)));
    host.set_nonblocking(true).unwrap();
    let mut sink = vec![0u8; 1 << 20];
    let mut total = 0;
    loop {
        match host.read(&mut sink) {
            Ok(0) => break,
            Ok(n) => total += n,
            Err(e) => panic!("expected EOF after the reset: {e}"),
        }
    }
    assert!(total > 0);
}

#[test]
fn a_guest_reaches_the_listener_at_path_port() {
    let mut r = rig(false);
    let listener = UnixListener::bind(listener_path(&r.path(), 80)).unwrap();
    r.post_rx(4);
    r.guest_send(from_guest(Op::Request, 1000, 80), &[]);
    let got = r.guest_rx();
    assert_eq!(got.len(), 1);
    let response = got[0].0;
    assert_eq!(op(&response), Some(Op::Response));
    assert_eq!((response.src_port, response.dst_port), (80, 1000));
    let (mut host, _) = listener.accept().unwrap();

    r.guest_send(from_guest(Op::Rw, 1000, 80), b"ping");
    assert_eq!(read_exact_within(&mut host, 4), b"ping");
    host.write_all(b"pong").unwrap();
    let got = r.wait_rx();
    assert_eq!(got.len(), 1);
    assert_eq!(op(&got[0].0), Some(Op::Rw));
    assert_eq!(got[0].1, b"pong");

    // The host closes: the guest is told both directions are shut, and its RST ends it.
    drop(host);
    let got = r.wait_rx();
    assert_eq!(op(&got[0].0), Some(Op::Shutdown));
    assert_eq!(got[0].0.flags, packet::VIRTIO_VSOCK_SHUTDOWN_F_BOTH);
    r.guest_send(from_guest(Op::Rst, 1000, 80), &[]);
    assert_eq!(r.vsock.lock().unwrap().connections(), 0);
}

#[test]
fn a_guest_shutdown_closes_the_host_side() {
    let mut r = rig(false);
    let listener = UnixListener::bind(listener_path(&r.path(), 81)).unwrap();
    r.post_rx(4);
    r.guest_send(from_guest(Op::Request, 1001, 81), &[]);
    let (mut host, _) = listener.accept().unwrap();
    r.guest_rx();
    r.guest_send(from_guest(Op::Rw, 1001, 81), b"last words");
    let mut shutdown = from_guest(Op::Shutdown, 1001, 81);
    shutdown.flags = packet::VIRTIO_VSOCK_SHUTDOWN_F_BOTH;
    r.guest_send(shutdown, &[]);
    let mut all = Vec::new();
    host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    host.read_to_end(&mut all).unwrap();
    assert_eq!(all, b"last words");
    let got = r.guest_rx();
    assert_eq!(op(&got[0].0), Some(Op::Rst));
    assert_eq!(r.vsock.lock().unwrap().connections(), 0);
}

#[test]
fn a_guest_connecting_where_nothing_listens_is_reset() {
    let mut r = rig(false);
    r.post_rx(2);
    r.guest_send(from_guest(Op::Request, 1000, 81), &[]);
    let got = r.guest_rx();
    assert_eq!(got.len(), 1);
    let rst = got[0].0;
    assert_eq!(op(&rst), Some(Op::Rst));
    assert_eq!(
        (rst.src_port, rst.dst_port, rst.dst_cid),
        (81, 1000, GUEST_CID)
    );
    assert_eq!(r.vsock.lock().unwrap().connections(), 0);
}

#[test]
fn unknown_connections_are_reset_and_resets_are_not_answered() {
    let mut r = rig(false);
    r.post_rx(4);
    r.guest_send(from_guest(Op::Rw, 6, 5), b"who?");
    r.guest_send(from_guest(Op::Rst, 6, 5), &[]);
    let mut wrong_type = from_guest(Op::Rw, 7, 5);
    wrong_type.type_ = 2;
    r.guest_send(wrong_type, b"seq");
    let mut bad_op = from_guest(Op::Rw, 8, 5);
    bad_op.op = 99;
    r.guest_send(bad_op, &[]);
    let got = r.guest_rx();
    let ports: Vec<_> = got
        .iter()
        .map(|(h, _)| {
            assert_eq!(op(h), Some(Op::Rst));
            h.dst_port
        })
        .collect();
    assert_eq!(ports, [6, 7, 8]);
}

#[test]
fn a_guest_that_does_not_read_its_resets_stops_being_served() {
    let mut r = rig(false);
    // No receive buffers: every RST for an unknown connection waits in the device, up to a
    // bound; then the device leaves the guest's packets in its ring.
    for port in 0..256 {
        r.guest_send(from_guest(Op::Rw, port, 5), b"?");
    }
    assert_eq!(r.tx.used_idx(&r.mem), 256);
    r.guest_send(from_guest(Op::Rw, 999, 5), b"?");
    assert_eq!(r.tx.used_idx(&r.mem), 256, "the packet waits in the ring");
    // Reading makes room, and the waiting packet is taken.
    r.post_rx(8);
    assert_eq!(r.tx.used_idx(&r.mem), 257);
    let got = r.guest_rx();
    assert_eq!(got.len(), 8);
    assert!(got.iter().all(|(h, _)| op(h) == Some(Op::Rst)));
}

#[test]
fn a_guest_reset_or_silence_closes_the_host_socket() {
    let mut r = rig(false);
    r.post_rx(4);
    let mut refused = UnixStream::connect(r.path()).unwrap();
    refused.write_all(b"CONNECT 53\n").unwrap();
    let got = r.wait_rx();
    r.guest_send(from_guest(Op::Rst, 53, got[0].0.src_port), &[]);
    assert_closed(&mut refused);

    r.vsock
        .lock()
        .unwrap()
        .backend_mut()
        .set_timeout(Duration::from_millis(20));
    let mut ignored = UnixStream::connect(r.path()).unwrap();
    ignored.write_all(b"CONNECT 54\n").unwrap();
    let got = r.wait_rx();
    assert_eq!(op(&got[0].0), Some(Op::Request));
    std::thread::sleep(Duration::from_millis(30));
    let got = r.wait_rx();
    assert_eq!(
        op(&got[0].0),
        Some(Op::Rst),
        "the guest hears it is gone too"
    );
    assert_closed(&mut ignored);

    // A host program that never says what it wants is closed as well.
    let mut mute = UnixStream::connect(r.path()).unwrap();
    r.host_events();
    std::thread::sleep(Duration::from_millis(30));
    r.host_events();
    assert_closed(&mut mute);
    let mut garbage = UnixStream::connect(r.path()).unwrap();
    garbage.write_all(b"HELLO\n").unwrap();
    r.host_events();
    assert_closed(&mut garbage);
    assert_eq!(r.vsock.lock().unwrap().connections(), 0);
}

#[test]
fn the_library_reports_a_refusal() {
    let mut r = rig(false);
    let path = r.path();
    let client = std::thread::spawn(move || connect_to_guest(&path, 60, Duration::from_secs(5)));
    r.post_rx(2);
    let got = r.wait_rx();
    r.guest_send(from_guest(Op::Rst, 60, got[0].0.src_port), &[]);
    let err = client.join().unwrap().unwrap_err();
    assert!(matches!(err, ClientError::Refused(60)), "{err}");
}

#[test]
fn private_pages_are_refused_counted_and_reset_the_connection() {
    let mut r = rig(true);
    let listener = UnixListener::bind(listener_path(&r.path(), 80)).unwrap();
    // Exactly the buffers the first part uses: the private one comes last.
    r.post_rx(3);
    r.guest_send(from_guest(Op::Request, 1000, 80), &[]);
    assert_eq!(op(&r.guest_rx()[0].0), Some(Op::Response));
    let (mut host, _) = listener.accept().unwrap();
    assert_eq!(r.refusals(), 0);

    // Transmit data in a private page: not read, counted, the connection reset.
    let (_, data) = tx_addr(r.tx.next_head());
    r.pages.0.lock().unwrap().push(data..data + 0x1000);
    r.guest_send(from_guest(Op::Rw, 1000, 80), b"secret");
    assert_eq!(r.refusals(), 1);
    assert_closed(&mut host);
    let got = r.guest_rx();
    assert_eq!(got.len(), 1);
    assert_eq!(op(&got[0].0), Some(Op::Rst));
    r.pages.0.lock().unwrap().clear();

    // A private header: the packet is dropped unread and nothing answers it.
    let (hdr, _) = tx_addr(r.tx.next_head());
    r.pages.0.lock().unwrap().push(hdr..hdr + 1);
    r.guest_send(from_guest(Op::Request, 1001, 80), &[]);
    assert_eq!(r.refusals(), 2);
    assert!(r.guest_rx().is_empty());
    assert_eq!(r.vsock.lock().unwrap().connections(), 0);
    r.pages.0.lock().unwrap().clear();

    // A private receive buffer: nothing written into it, counted, returned empty; the host's
    // data was not read for it and goes into the next buffer.
    r.guest_send(from_guest(Op::Request, 1002, 80), &[]);
    assert_eq!(op(&r.guest_rx()[0].0), Some(Op::Response));
    let (mut host, _) = listener.accept().unwrap();
    let (rx_hdr, rx_data) = rx_addr(r.rx.next_head());
    r.pages.0.lock().unwrap().push(rx_data..rx_data + 0x1000);
    host.write_all(b"for the guest").unwrap();
    r.post_rx(1);
    let got = r.wait_rx();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1.len(), 0, "the buffer came back empty");
    let mut untouched = vec![0u8; 0x100 + RX_DATA as usize];
    r.mem
        .read_slice(&mut untouched, GuestAddress(rx_hdr))
        .unwrap();
    assert!(untouched.iter().all(|&b| b == 0xee));
    assert_eq!(r.refusals(), 3);
    r.pages.0.lock().unwrap().clear();
    r.post_rx(1);
    let got = r.guest_rx();
    assert_eq!(op(&got[0].0), Some(Op::Rw));
    assert_eq!(got[0].1, b"for the guest");
}

/// Posts an event buffer; the event id the device wrote, if any.
fn post_event_buffer(r: &mut Rig) {
    r.mem
        .write_obj(0xffff_ffffu32, GuestAddress(EV_BUF))
        .unwrap();
    r.ev.submit(&r.mem, &[writable(EV_BUF, 4)]);
}

fn event_written(r: &Rig) -> Option<u32> {
    (r.ev.used_idx(&r.mem) > 0).then(|| {
        assert_eq!(r.ev.used_elem(&r.mem, 0).1, 4);
        r.mem.read_obj(GuestAddress(EV_BUF)).unwrap()
    })
}

#[test]
fn reset_for_migration_drops_connections_and_tells_the_guest() {
    let mut r = rig(false);
    let (mut host, _) = r.host_connection(GUEST_BUF);
    r.vsock.lock().unwrap().reset_for_migration();
    assert_closed(&mut host);
    assert_eq!(r.vsock.lock().unwrap().connections(), 0);
    // No event buffer yet: the event waits for one.
    assert!(r.vsock.lock().unwrap().transport_reset_pending());
    post_event_buffer(&mut r);
    r.vsock.lock().unwrap().process_queue(EVQ);
    assert_eq!(
        event_written(&r),
        Some(packet::VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
    );
    assert!(!r.vsock.lock().unwrap().transport_reset_pending());
}

#[test]
fn save_and_restore_sends_transport_reset() {
    let mut r = rig(false);
    let (_host, _) = r.host_connection(GUEST_BUF);
    post_event_buffer(&mut r);

    r.vsock.lock().unwrap().quiesce().unwrap();
    let transport_state = serde_json::to_string(&Persist::save(&r.driver.transport)).unwrap();
    let vsock_state = serde_json::to_string(&r.vsock.lock().unwrap().save()).unwrap();
    let vsock_state: VsockState = serde_json::from_str(&vsock_state).unwrap();
    assert_eq!(vsock_state.guest_cid, GUEST_CID);

    // The source still listens at its path: the target listens at its own.
    let target_path = r.dir.as_path().join("target.sock");
    let restored = Vsock::restore(
        VsockRestoreArgs {
            uds_path: target_path.clone(),
        },
        &vsock_state,
    )
    .unwrap();
    assert_eq!(restored.guest_cid(), GUEST_CID);
    assert_eq!(restored.save(), vsock_state);
    let restored = Arc::new(Mutex::new(restored));
    let transport = MmioTransport::restore(
        MmioRestoreArgs {
            device: restored.clone(),
            memory: DeviceMemory::plain(r.mem.clone(), "restored"),
        },
        &serde_json::from_str(&transport_state).unwrap(),
    )
    .unwrap();
    assert!(restored.lock().unwrap().is_active());
    // The same state, but for the event queue, whose buffer took the TRANSPORT_RESET.
    let mut expected: crate::virtio::mmio::MmioState =
        serde_json::from_str(&transport_state).unwrap();
    expected.queues[EVQ].next_avail += 1;
    expected.queues[EVQ].next_used += 1;
    assert_eq!(transport.save(), expected);
    let mut cid = [0u8; 8];
    let mut t = transport;
    t.read(0x100, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);

    // The event went out at activation; a restored device has no connections.
    assert_eq!(
        event_written(&r),
        Some(packet::VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)
    );
    assert_eq!(restored.lock().unwrap().connections(), 0);

    // And host programs connect again on the target.
    let mut events = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
    events.add_subscriber(restored.clone());
    let mut again = UnixStream::connect(&target_path).unwrap();
    again.write_all(b"CONNECT 52\n").unwrap();
    while events.run_with_timeout(100).unwrap() > 0 {}
    // The receive buffers left from the source's guest take the new REQUEST.
    let got = r.guest_rx();
    assert_eq!(got.len(), 1);
    assert_eq!(op(&got[0].0), Some(Op::Request));

    // The restored transport's notifications reach the restored device.
    post_event_buffer(&mut r);
    t.write(
        u64::from(virtio_bindings::virtio_mmio::VIRTIO_MMIO_QUEUE_NOTIFY),
        &(EVQ as u32).to_le_bytes(),
    );
    assert_eq!(events.run_with_timeout(1000).unwrap(), 1);
}

#[test]
fn the_socket_path_is_handed_over_and_taken_back() {
    let r = rig(false);
    r.vsock.lock().unwrap().release_socket();
    assert!(!r.path().exists());
    assert!(UnixStream::connect(r.path()).is_err());
    // A target on the same filesystem can listen there now.
    let target = Vsock::restore(
        VsockRestoreArgs { uds_path: r.path() },
        &r.vsock.lock().unwrap().save(),
    )
    .unwrap();
    assert!(UnixStream::connect(r.path()).is_ok());
    // While it does, the source cannot take the path back; once it is gone, it can.
    let err = r.vsock.lock().unwrap().reacquire_socket().unwrap_err();
    assert!(
        matches!(err, VsockError::Backend(BackendError::Bind { .. })),
        "{err}"
    );
    drop(target);
    r.vsock.lock().unwrap().reacquire_socket().unwrap();
    let mut host = UnixStream::connect(r.path()).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    r.host_events();
    assert_eq!(r.vsock.lock().unwrap().connections(), 1);
}

#[test]
fn a_stale_socket_file_is_replaced_but_a_live_one_is_not() {
    let r = rig(false);
    let err = Vsock::new(VsockConfig::new(GUEST_CID, r.path()))
        .err()
        .unwrap();
    assert!(
        matches!(err, VsockError::Backend(BackendError::Bind { .. })),
        "{err}"
    );
    let stale = r.dir.as_path().join("stale.sock");
    drop(UnixListener::bind(&stale).unwrap());
    assert!(stale.exists());
    Vsock::new(VsockConfig::new(GUEST_CID, &stale)).unwrap();
}

#[test]
fn the_event_loop_serves_host_connections() {
    let mut r = rig(false);
    let mut events = EventManager::<Arc<Mutex<Vsock>>>::new().unwrap();
    events.add_subscriber(r.vsock.clone());
    r.post_rx(2);
    let mut host = UnixStream::connect(r.path()).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    assert!(events.run_with_timeout(1000).unwrap() >= 1);
    let got = r.guest_rx();
    assert_eq!(got.len(), 1);
    assert_eq!(op(&got[0].0), Some(Op::Request));
    // Nothing left to do: after the new socket's first readiness the loop goes quiet
    // rather than spinning on the listener or the socket.
    let mut rounds = 0;
    while events.run_with_timeout(50).unwrap() > 0 {
        rounds += 1;
        assert!(rounds < 3, "the event loop keeps waking");
    }
}

mod guest_cannot_panic {
    use proptest::prelude::*;

    use super::*;
    use crate::virtio::testing::Buf;

    /// One thing a hostile driver (or a host program) can do.
    #[derive(Debug, Clone)]
    enum Step {
        /// A packet with any header; ports from a few values so connections are hit.
        Send {
            header: (u16, u16, u8, u8, u32, u32, u32, bool),
            len: Option<u32>,
            data: Vec<u8>,
        },
        /// Receive buffers.
        Rx(u8),
        /// The event loop's view of the host side.
        Host,
        /// Garbage anywhere in the rings and buffers.
        Scribble { at: u32, bytes: Vec<u8> },
        /// Arbitrary descriptors on a queue.
        Chain {
            queue: u8,
            bufs: Vec<(u32, u16, bool)>,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (
                (
                    0u16..9,
                    0u16..4,
                    0u8..4,
                    0u8..4,
                    any::<u32>(),
                    any::<u32>(),
                    any::<u32>(),
                    any::<bool>()
                ),
                proptest::option::of(0u32..0x2_0000),
                proptest::collection::vec(any::<u8>(), 0..300),
            )
                .prop_map(|(header, len, data)| Step::Send { header, len, data }),
            (1u8..4).prop_map(Step::Rx),
            Just(Step::Host),
            (
                0u32..0x4_0000,
                proptest::collection::vec(any::<u8>(), 1..32)
            )
                .prop_map(|(at, bytes)| Step::Scribble { at, bytes }),
            (
                0u8..3,
                proptest::collection::vec((0u32..0x4_0000, any::<u16>(), any::<bool>()), 1..4)
            )
                .prop_map(|(queue, bufs)| Step::Chain { queue, bufs }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        #[test]
        fn any_guest_behaviour_is_survived(steps in proptest::collection::vec(step(), 1..40)) {
            let mut r = rig(true);
            r.pages.0.lock().unwrap().push(0x2_8000..0x2_a000);
            let _listener = UnixListener::bind(listener_path(&r.path(), 80)).unwrap();
            let mut host = UnixStream::connect(r.path()).unwrap();
            host.write_all(b"CONNECT 1\n").unwrap();
            host.write_all(&[0x42; 5000]).unwrap();
            let host_port = |sel: u8| [80, 5, 1 << 30, (1 << 30) + 1][usize::from(sel)];
            for step in steps {
                match step {
                    Step::Send { header: (op, kind, guest_port, host, flags, buf_alloc, fwd_cnt, foreign), len, data } => {
                        let mut header = from_guest(Op::Rw, u32::from(guest_port), host_port(host));
                        header.op = op;
                        header.type_ = kind;
                        header.flags = flags;
                        header.buf_alloc = buf_alloc;
                        header.fwd_cnt = fwd_cnt;
                        if foreign {
                            header.dst_cid = 7;
                        }
                        header.len = len.unwrap_or(data.len() as u32);
                        r.guest_send_raw(header, &data);
                    }
                    // What lands in the buffers is not checked: the guest scribbles there.
                    Step::Rx(n) => r.post_rx(usize::from(n)),
                    Step::Host => r.host_events(),
                    Step::Scribble { at, bytes } => {
                        r.mem.write_slice(&bytes, GuestAddress(u64::from(at))).unwrap();
                    }
                    Step::Chain { queue, bufs } => {
                        let bufs: Vec<Buf> = bufs
                            .into_iter()
                            .map(|(addr, len, w)| Buf { addr: u64::from(addr), len: u32::from(len), writable: w })
                            .collect();
                        let q = match queue { 0 => &mut r.rx, 1 => &mut r.tx, _ => &mut r.ev };
                        q.submit(&r.mem, &bufs);
                        r.vsock.lock().unwrap().process_queue(usize::from(queue));
                    }
                }
            }
            r.host_events();
        }
    }
}
