use std::io::Read;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};

use super::*;
use crate::host_console::tests::SocketDir;
use crate::Bus;

/// Where COM1 sits, and its line status and receive registers.
const COM1: u64 = 0x3f8;
const RBR: u64 = COM1;
const LSR: u64 = COM1 + 5;
/// LSR bit 0, data ready (16550 line status register).
const LSR_DATA_READY: u8 = 0x01;
/// The 16550's receive FIFO.
const FIFO_BYTES: usize = 64;

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
    assert!(
        Serial::with_registers(IrqTrigger::new().unwrap(), Box::new(io::sink()), &too_long)
            .is_err()
    );
}

#[test]
fn unix_socket_client_gets_backlog_and_live_output() {
    let dir = SocketDir::new("serial");
    let path = dir.0.join("s.sock");
    let mut out = SerialSink::UnixSocket(path.clone())
        .open(&veil_seccomp::Confinement::off())
        .unwrap();
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
}

/// COM1 on a port I/O bus, as the vCPU sees it.
fn com1() -> (Arc<Mutex<Serial>>, Bus) {
    let serial = Arc::new(Mutex::new(Serial::new(
        IrqTrigger::new().unwrap(),
        Box::new(io::sink()),
    )));
    let mut bus = Bus::new();
    bus.insert(serial.clone(), COM1, SERIAL_PORT_LEN).unwrap();
    (serial, bus)
}

fn inb(bus: &Bus, port: u64) -> u8 {
    let mut byte = [0u8];
    assert!(bus.read(port, &mut byte));
    byte[0]
}

/// What a polling driver reads: RBR while LSR says data is ready, up to `max` bytes.
fn drain(bus: &Bus, max: usize) -> Vec<u8> {
    let mut got = Vec::new();
    while got.len() < max && inb(bus, LSR) & LSR_DATA_READY != 0 {
        got.push(inb(bus, RBR));
    }
    got
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

#[test]
fn input_reaches_the_receive_register() {
    let (serial, bus) = com1();
    assert_eq!(inb(&bus, LSR) & LSR_DATA_READY, 0);
    assert_eq!(serial.lock().unwrap().receive(b"ok"), 2);
    assert_ne!(inb(&bus, LSR) & LSR_DATA_READY, 0);
    assert_eq!(inb(&bus, RBR), b'o');
    assert_eq!(inb(&bus, RBR), b'k');
    assert_eq!(inb(&bus, LSR) & LSR_DATA_READY, 0);
}

#[test]
fn input_beyond_the_fifo_follows_in_order() {
    let (serial, bus) = com1();
    let sent = pattern(3 * FIFO_BYTES + 5);
    assert_eq!(serial.lock().unwrap().receive(&sent), sent.len());
    assert_eq!(
        serial.lock().unwrap().pending_input(),
        sent.len() - FIFO_BYTES
    );
    assert_same(&drain(&bus, usize::MAX), &sent);
}

#[test]
fn input_raises_the_receive_interrupt() {
    let (serial, bus) = com1();
    // IER: received-data-available interrupt on.
    assert!(bus.write(COM1 + 1, &[0x01]));
    let irq = serial.lock().unwrap().interrupt().try_clone().unwrap();
    while irq.read().is_ok() {}
    serial.lock().unwrap().receive(b"x");
    assert_eq!(irq.read().unwrap(), 1);
}

#[test]
fn the_event_loop_reads_the_input_and_pauses_when_full() {
    let (serial, bus) = com1();
    let (mut host, guest_side) = UnixStream::pair().unwrap();
    serial
        .lock()
        .unwrap()
        .set_input(HostInput::from_fd(guest_side))
        .unwrap();
    let mut events = EventManager::<Arc<Mutex<Serial>>>::new().unwrap();
    events.add_subscriber(serial.clone());

    let sent = pattern(INPUT_CAPACITY + FIFO_BYTES + 1000);
    host.write_all(&sent).unwrap();
    // The loop reads until the FIFO and the buffer are full, then stops watching.
    while events.run_with_timeout(0).unwrap() > 0 {}
    assert_eq!(serial.lock().unwrap().pending_input(), INPUT_CAPACITY);
    assert_eq!(
        events.run_with_timeout(0).unwrap(),
        0,
        "input left unread while full"
    );

    // The guest empties the FIFO; its read wakes the loop, which reads what now fits.
    let mut got = drain(&bus, FIFO_BYTES);
    assert_eq!(got.len(), FIFO_BYTES);
    assert_eq!(events.run_with_timeout(0).unwrap(), 1, "woken by the read");
    assert_eq!(events.run_with_timeout(0).unwrap(), 1, "input read again");
    assert_eq!(serial.lock().unwrap().pending_input(), INPUT_CAPACITY);
    // A guest that keeps reading gets everything, in order.
    for _ in 0..sent.len() {
        if got.len() == sent.len() {
            break;
        }
        got.extend(drain(&bus, usize::MAX));
        while events.run_with_timeout(0).unwrap() > 0 {}
    }
    assert_same(&got, &sent);
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
fn input_comes_from_the_socket_client_that_connected_last() {
    let dir = SocketDir::new("serial-in");
    let path = dir.0.join("s.sock");
    let io = SerialSink::UnixSocket(path.clone())
        .open_io(&veil_seccomp::Confinement::off())
        .unwrap();
    let (serial, bus) = com1();
    serial.lock().unwrap().set_input(io.input.unwrap()).unwrap();
    let mut events = EventManager::<Arc<Mutex<Serial>>>::new().unwrap();
    events.add_subscriber(serial.clone());

    let mut first = UnixStream::connect(&path).unwrap();
    assert_eq!(
        events.run_with_timeout(5000).unwrap(),
        1,
        "client connected"
    );
    first.write_all(b"one ").unwrap();
    events.run_with_timeout(5000).unwrap();
    assert_eq!(drain(&bus, usize::MAX), b"one ");

    let mut second = UnixStream::connect(&path).unwrap();
    assert_eq!(
        events.run_with_timeout(5000).unwrap(),
        1,
        "client connected"
    );
    second.write_all(b"two").unwrap();
    events.run_with_timeout(5000).unwrap();
    assert_eq!(drain(&bus, usize::MAX), b"two");
    drop(second);
    // The client's end of input closes the input; the UART carries on.
    events.run_with_timeout(5000).unwrap();
    assert_eq!(serial.lock().unwrap().receive(b"!"), 1);
    assert_eq!(drain(&bus, usize::MAX), b"!");
    drop(first);
}

mod guest_cannot_panic {
    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Clone)]
    enum Step {
        /// A port write of any size in and around the UART's ports (loopback, DLAB and all).
        Write { offset: u8, bytes: Vec<u8> },
        /// A port read.
        Read { offset: u8, len: u8 },
        /// Input from the host.
        Input(Vec<u8>),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (0u8..8, proptest::collection::vec(any::<u8>(), 1..3))
                .prop_map(|(offset, bytes)| Step::Write { offset, bytes }),
            (0u8..8, 1u8..3).prop_map(|(offset, len)| Step::Read { offset, len }),
            proptest::collection::vec(any::<u8>(), 0..200).prop_map(Step::Input),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_guest_and_host_behaviour_is_survived(steps in proptest::collection::vec(step(), 1..100)) {
            let (serial, bus) = com1();
            for step in steps {
                match step {
                    Step::Write { offset, bytes } => {
                        bus.write(COM1 + u64::from(offset), &bytes);
                    }
                    Step::Read { offset, len } => {
                        let mut bytes = [0u8; 2];
                        bus.read(COM1 + u64::from(offset), &mut bytes[..usize::from(len)]);
                    }
                    Step::Input(bytes) => {
                        serial.lock().unwrap().receive(&bytes);
                    }
                }
            }
            prop_assert!(serial.lock().unwrap().pending_input() <= INPUT_CAPACITY);
        }
    }
}
