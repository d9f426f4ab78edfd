use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_mmio as reg;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::host_console::tests::SocketDir;
use crate::persist::Persist;
use crate::virtio::memory::{self, tests::PrivateRanges};
use crate::virtio::mmio::MmioRestoreArgs;
use crate::virtio::testing::{readable, writable, TestDriver, TestQueue};
use crate::virtio::DeviceMemory;
use crate::virtio::{GuestMemoryMmap, MmioTransport};

/// Feature bits the device must not offer (virtio 1.2 §5.3.3).
const VIRTIO_CONSOLE_F_SIZE: u64 = 1 << 0;
const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;

/// Where the rings are laid and where buffers go.
const RX_RING: u64 = 0x1000;
const TX_RING: u64 = 0x4000;
const BUFS: u64 = 0x10000;

/// A writer the test reads back.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Sink {
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    pages: Arc<PrivateRanges>,
    console: Arc<Mutex<Console>>,
    driver: TestDriver,
    rx: TestQueue,
    tx: TestQueue,
    sink: Sink,
    /// The host's end of the console's input.
    host: UnixStream,
}

fn rig(encrypted: bool) -> Rig {
    let sink = Sink::default();
    let (host, device_end) = UnixStream::pair().unwrap();
    let console = Console::new(ConsoleIo {
        output: Box::new(sink.clone()),
        input: Some(HostInput::from_fd(device_end)),
    })
    .unwrap();
    let console = Arc::new(Mutex::new(console));
    let mem = memory::tests::memory(1 << 20);
    let pages = Arc::new(PrivateRanges::default());
    let device_memory = if encrypted {
        DeviceMemory::encrypted(mem.clone(), pages.clone(), "virtio-console-test")
    } else {
        DeviceMemory::plain(mem.clone(), "virtio-console-test")
    };
    let transport = MmioTransport::new(console.clone(), device_memory).unwrap();
    Rig {
        rx: TestQueue::new(&mem, RX_RING, 16),
        tx: TestQueue::new(&mem, TX_RING, 16),
        mem,
        pages,
        console,
        driver: TestDriver { transport },
        sink,
        host,
    }
}

impl Rig {
    fn start(&mut self) {
        let features = self.driver.device_features();
        assert!(self.driver.negotiate(features));
        self.driver.setup_queue(RECEIVEQ_PORT0 as u32, &self.rx);
        self.driver.setup_queue(TRANSMITQ_PORT0 as u32, &self.tx);
        self.driver.driver_ok();
        assert!(self.console.lock().unwrap().is_active());
    }

    fn events(&self) -> EventManager<Arc<Mutex<Console>>> {
        let mut events = EventManager::new().unwrap();
        events.add_subscriber(self.console.clone());
        events
    }

    fn kick(&mut self, queue: usize) {
        self.driver
            .write(reg::VIRTIO_MMIO_QUEUE_NOTIFY, queue as u32);
    }

    fn put(&self, at: u64, bytes: &[u8]) {
        self.mem.write_slice(bytes, GuestAddress(at)).unwrap();
    }

    fn guest_bytes(&self, at: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        self.mem.read_slice(&mut buf, GuestAddress(at)).unwrap();
        buf
    }

    fn process(&self, queue: usize) {
        self.console.lock().unwrap().process_queue(queue);
    }
}

/// Runs the loop until nothing is ready.
fn settle(events: &mut EventManager<Arc<Mutex<Console>>>) {
    while events.run_with_timeout(0).unwrap() > 0 {}
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Equal byte strings, reported without printing kilobytes.
fn assert_same(got: &[u8], want: &[u8]) {
    let first_difference = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(
        got.len() == want.len() && first_difference.is_none(),
        "got {} bytes, want {}; first difference at {first_difference:?}",
        got.len(),
        want.len()
    );
}

#[test]
fn identifies_as_a_one_port_console_without_size() {
    let mut r = rig(false);
    let d = &mut r.driver;
    assert_eq!(d.read(reg::VIRTIO_MMIO_DEVICE_ID), 3);
    for queue in [0, 1] {
        d.write(reg::VIRTIO_MMIO_QUEUE_SEL, queue);
        assert_eq!(d.read(reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
    }
    d.write(reg::VIRTIO_MMIO_QUEUE_SEL, 2);
    assert_eq!(
        d.read(reg::VIRTIO_MMIO_QUEUE_NUM_MAX),
        0,
        "no control queues"
    );
    let features = d.device_features();
    assert_eq!(
        features & (VIRTIO_CONSOLE_F_SIZE | VIRTIO_CONSOLE_F_MULTIPORT),
        0
    );
    // cols and rows read 0; max_nr_ports says one port.
    assert_eq!(d.read(0x100), 0);
    assert_eq!(d.read(0x104), 1);
    d.write(0x108, u32::from(b'x'));
    assert_eq!(d.read(0x108), 0, "emerg_wr is not offered");
    assert!(r.sink.take().is_empty());
}

#[test]
fn transmitted_bytes_reach_the_sink_exactly() {
    let mut r = rig(false);
    r.start();
    let all_bytes: Vec<u8> = (0..=255).collect();
    r.put(BUFS, b"hello, ");
    r.put(BUFS + 0x1000, b"world\n");
    r.put(BUFS + 0x2000, &all_bytes);
    let first =
        r.tx.submit(&r.mem, &[readable(BUFS, 7), readable(BUFS + 0x1000, 6)]);
    let second = r.tx.submit(&r.mem, &[readable(BUFS + 0x2000, 256)]);
    let mut events = r.events();
    r.kick(TRANSMITQ_PORT0);
    settle(&mut events);
    let mut want = b"hello, world\n".to_vec();
    want.extend_from_slice(&all_bytes);
    assert_eq!(r.sink.take(), want);
    assert_eq!(r.tx.used_idx(&r.mem), 2);
    assert_eq!(r.tx.used_elem(&r.mem, 0), (u32::from(first), 0));
    assert_eq!(r.tx.used_elem(&r.mem, 1), (u32::from(second), 0));
    assert_eq!(r.driver.read(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    assert!(r.driver.transport.interrupt_eventfd().read().is_ok());
}

#[test]
fn input_fills_the_posted_receive_buffers() {
    let mut r = rig(false);
    r.start();
    let first = r.rx.submit(&r.mem, &[writable(BUFS, 4)]);
    let second = r.rx.submit(&r.mem, &[writable(BUFS + 0x1000, 4)]);
    let mut events = r.events();
    r.kick(RECEIVEQ_PORT0);
    settle(&mut events);
    assert_eq!(r.rx.used_idx(&r.mem), 0, "buffers kept until input comes");

    r.host.write_all(b"abcdef").unwrap();
    settle(&mut events);
    assert_eq!(r.rx.used_idx(&r.mem), 2);
    assert_eq!(r.rx.used_elem(&r.mem, 0), (u32::from(first), 4));
    assert_eq!(r.rx.used_elem(&r.mem, 1), (u32::from(second), 2));
    assert_eq!(r.guest_bytes(BUFS, 4), b"abcd");
    assert_eq!(r.guest_bytes(BUFS + 0x1000, 2), b"ef");
    assert_eq!(r.driver.read(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 1);
}

#[test]
fn input_waits_bounded_until_the_guest_posts_buffers() {
    let mut r = rig(false);
    let mut events = r.events();
    let sent = pattern(INPUT_CAPACITY + 1000);
    r.host.write_all(&sent).unwrap();
    // Before the driver is even there: the buffer fills, then the input is left unread.
    settle(&mut events);
    assert_eq!(r.console.lock().unwrap().pending_input(), INPUT_CAPACITY);
    assert_eq!(events.run_with_timeout(0).unwrap(), 0, "input not watched");

    r.start();
    const BUF: u32 = 0x1000;
    for i in 0..8 {
        r.rx.submit(&r.mem, &[writable(BUFS + u64::from(i * BUF), BUF)]);
    }
    r.kick(RECEIVEQ_PORT0);
    settle(&mut events);
    assert_eq!(r.console.lock().unwrap().pending_input(), 0);

    let mut got = Vec::new();
    for i in 0..r.rx.used_idx(&r.mem) {
        let (head, len) = r.rx.used_elem(&r.mem, i);
        got.extend(r.guest_bytes(BUFS + u64::from(head) * u64::from(BUF), len as usize));
    }
    assert_same(&got, &sent);
}

#[test]
fn private_buffers_are_refused_untouched() {
    let mut r = rig(true);
    r.start();
    r.pages.0.lock().unwrap().push(BUFS..BUFS + 0x1000);

    // Receive: the private buffer comes back empty and keeps what it had; the input waits.
    r.put(BUFS, b"....");
    let refused = r.rx.submit(&r.mem, &[writable(BUFS, 4)]);
    assert_eq!(r.console.lock().unwrap().receive(b"hi"), 2);
    r.process(RECEIVEQ_PORT0);
    assert_eq!(r.rx.used_elem(&r.mem, 0), (u32::from(refused), 0));
    assert_eq!(r.guest_bytes(BUFS, 4), b"....");
    assert_eq!(r.driver.transport.refusals(), 1);
    assert_eq!(r.console.lock().unwrap().pending_input(), 2);
    let shared = r.rx.submit(&r.mem, &[writable(BUFS + 0x1000, 4)]);
    r.process(RECEIVEQ_PORT0);
    assert_eq!(r.rx.used_elem(&r.mem, 1), (u32::from(shared), 2));
    assert_eq!(r.guest_bytes(BUFS + 0x1000, 2), b"hi");

    // Transmit: a chain with one private buffer is not read at all.
    r.put(BUFS + 0x2000, b"shared ");
    r.put(BUFS, b"secret");
    let refused =
        r.tx.submit(&r.mem, &[readable(BUFS + 0x2000, 7), readable(BUFS, 6)]);
    r.process(TRANSMITQ_PORT0);
    assert_eq!(r.tx.used_elem(&r.mem, 0), (u32::from(refused), 0));
    assert!(r.sink.take().is_empty());
    assert_eq!(r.driver.transport.refusals(), 2);
}

#[test]
fn a_gone_socket_client_costs_output_not_the_guest() {
    let (peer, device_end) = UnixStream::pair().unwrap();
    drop(peer);
    let mut r = rig(false);
    // The same rig, its sink a socket whose client has gone (EPIPE).
    *r.console.lock().unwrap() = Console::new(ConsoleIo {
        output: Box::new(device_end),
        input: None,
    })
    .unwrap();
    r.driver = TestDriver {
        transport: MmioTransport::new(
            r.console.clone(),
            DeviceMemory::plain(r.mem.clone(), "virtio-console-test"),
        )
        .unwrap(),
    };
    r.start();
    for _ in 0..2 {
        r.put(BUFS, b"lost");
        r.tx.submit(&r.mem, &[readable(BUFS, 4)]);
        r.process(TRANSMITQ_PORT0);
    }
    assert_eq!(r.tx.used_idx(&r.mem), 2, "chains returned all the same");
    assert_eq!(r.console.lock().unwrap().dropped_output(), 8);
    // And the console still takes input.
    r.console.lock().unwrap().receive(b"ok");
    r.rx.submit(&r.mem, &[writable(BUFS + 0x1000, 8)]);
    r.process(RECEIVEQ_PORT0);
    assert_eq!(r.guest_bytes(BUFS + 0x1000, 2), b"ok");
}

#[test]
fn save_and_restore_keep_input_and_rescan_the_queues() {
    let mut r = rig(false);
    r.start();
    r.put(BUFS, b"before ");
    r.tx.submit(&r.mem, &[readable(BUFS, 7)]);
    r.process(TRANSMITQ_PORT0);
    assert_eq!(r.sink.take(), b"before ");
    assert_eq!(r.console.lock().unwrap().receive(b"typed"), 5);

    // Pause and save; the states travel as JSON.
    r.console.lock().unwrap().quiesce().unwrap();
    let transport_state = serde_json::to_string(&Persist::save(&r.driver.transport)).unwrap();
    let console_state = serde_json::to_string(&r.console.lock().unwrap().save()).unwrap();
    // The guest queued output and posted a receive buffer just before; the kicks are lost.
    r.put(BUFS + 0x1000, b"after");
    r.tx.submit(&r.mem, &[readable(BUFS + 0x1000, 5)]);
    let posted = r.rx.submit(&r.mem, &[writable(BUFS + 0x2000, 16)]);

    let sink = Sink::default();
    let state: ConsoleState = serde_json::from_str(&console_state).unwrap();
    assert_eq!(state.pending_input, b"typed");
    let console = Console::restore(
        ConsoleIo {
            output: Box::new(sink.clone()),
            input: None,
        },
        &state,
    )
    .unwrap();
    let console = Arc::new(Mutex::new(console));
    let transport = MmioTransport::restore(
        MmioRestoreArgs {
            device: console.clone(),
            memory: DeviceMemory::plain(r.mem.clone(), "restored"),
        },
        &serde_json::from_str(&transport_state).unwrap(),
    )
    .unwrap();
    assert!(console.lock().unwrap().is_active());
    assert_eq!(
        transport.save(),
        serde_json::from_str(&transport_state).unwrap()
    );

    // The restore looks at both queues again.
    let mut events = EventManager::<Arc<Mutex<Console>>>::new().unwrap();
    events.add_subscriber(console.clone());
    settle(&mut events);
    assert_eq!(sink.take(), b"after");
    assert_eq!(r.tx.used_idx(&r.mem), 2);
    assert_eq!(r.rx.used_elem(&r.mem, 0), (u32::from(posted), 5));
    assert_eq!(r.guest_bytes(BUFS + 0x2000, 5), b"typed");

    // A peer's state with more input than a console holds is refused.
    let too_long = ConsoleState {
        pending_input: vec![0; INPUT_CAPACITY + 1],
    };
    let io = ConsoleIo {
        output: Box::new(io::sink()),
        input: None,
    };
    assert!(matches!(
        Console::restore(io, &too_long),
        Err(ConsoleError::PendingTooLong { .. })
    ));
}

#[test]
fn a_unix_socket_console_talks_to_its_client() {
    let dir = SocketDir::new("virtio-console");
    let path = dir.0.join("c.sock");
    let mut r = rig(false);
    let io = ConsoleBackend::UnixSocket(path.clone())
        .open(&veil_seccomp::Confinement::off())
        .unwrap();
    *r.console.lock().unwrap() = Console::new(io).unwrap();
    r.driver = TestDriver {
        transport: MmioTransport::new(
            r.console.clone(),
            DeviceMemory::plain(r.mem.clone(), "virtio-console-test"),
        )
        .unwrap(),
    };
    r.start();
    let mut events = r.events();
    let mut client = UnixStream::connect(&path).unwrap();
    assert_eq!(
        events.run_with_timeout(5000).unwrap(),
        1,
        "client connected"
    );

    r.rx.submit(&r.mem, &[writable(BUFS, 16)]);
    client.write_all(b"ls\n").unwrap();
    events.run_with_timeout(5000).unwrap();
    assert_eq!(r.rx.used_elem(&r.mem, 0).1, 3);
    assert_eq!(r.guest_bytes(BUFS, 3), b"ls\n");

    r.put(BUFS + 0x1000, b"bin\n");
    r.tx.submit(&r.mem, &[readable(BUFS + 0x1000, 4)]);
    r.kick(TRANSMITQ_PORT0);
    events.run_with_timeout(5000).unwrap();
    let mut got = [0u8; 4];
    client.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"bin\n");
}

mod guest_cannot_panic {
    use proptest::prelude::*;

    use crate::virtio::testing::Buf;
    use crate::BusDevice;

    use super::*;

    /// One thing a hostile driver, or the host, can do.
    #[derive(Debug, Clone)]
    enum Step {
        /// A register or config write of any size at any offset in the window.
        Write { offset: u16, value: u32, len: u8 },
        /// A register or config read.
        Read { offset: u16, len: u8 },
        /// Garbage in guest memory (rings and buffers live in the first 128 KiB).
        Scribble { at: u32, bytes: Vec<u8> },
        /// A chain of arbitrary descriptors on either queue.
        Chain {
            transmit: bool,
            bufs: Vec<(u32, u16, bool)>,
        },
        /// Input from the host.
        Input(Vec<u8>),
        /// The device thread serving a queue.
        Process { transmit: bool },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u16..0x1000, any::<u32>(), 1u8..=8).prop_map(|(offset, value, len)| Step::Write {
                offset,
                value,
                len
            }),
            (0u16..0x1000, 1u8..=8).prop_map(|(offset, len)| Step::Read { offset, len }),
            (
                0u32..0x2_0000,
                proptest::collection::vec(any::<u8>(), 1..64)
            )
                .prop_map(|(at, bytes)| Step::Scribble { at, bytes }),
            (
                any::<bool>(),
                proptest::collection::vec((0u32..0x2_0000, any::<u16>(), any::<bool>()), 1..6)
            )
                .prop_map(|(transmit, bufs)| Step::Chain { transmit, bufs }),
            proptest::collection::vec(any::<u8>(), 0..300).prop_map(Step::Input),
            any::<bool>().prop_map(|transmit| Step::Process { transmit }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_driver_behaviour_is_survived(steps in proptest::collection::vec(step(), 1..40)) {
            let mut r = rig(true);
            r.pages.0.lock().unwrap().push(0x18000..0x1a000);
            r.start();
            for step in steps {
                match step {
                    Step::Write { offset, value, len } => {
                        let bytes = u64::from(value).to_le_bytes();
                        r.driver.transport.write(u64::from(offset), &bytes[..usize::from(len)]);
                    }
                    Step::Read { offset, len } => {
                        let mut bytes = [0u8; 8];
                        r.driver.transport.read(u64::from(offset), &mut bytes[..usize::from(len)]);
                    }
                    Step::Scribble { at, bytes } => {
                        r.mem.write_slice(&bytes, GuestAddress(u64::from(at))).unwrap();
                    }
                    Step::Chain { transmit, bufs } => {
                        let bufs: Vec<Buf> = bufs
                            .into_iter()
                            .map(|(addr, len, w)| Buf { addr: u64::from(addr), len: u32::from(len), writable: w })
                            .collect();
                        let queue = if transmit { &mut r.tx } else { &mut r.rx };
                        queue.submit(&r.mem, &bufs);
                    }
                    Step::Input(bytes) => {
                        r.console.lock().unwrap().receive(&bytes);
                    }
                    Step::Process { transmit } => {
                        r.process(if transmit { TRANSMITQ_PORT0 } else { RECEIVEQ_PORT0 });
                    }
                }
            }
            r.process(RECEIVEQ_PORT0);
            r.process(TRANSMITQ_PORT0);
            prop_assert!(r.console.lock().unwrap().pending_input() <= INPUT_CAPACITY);
        }
    }
}
