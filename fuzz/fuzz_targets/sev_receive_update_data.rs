//! SEV packets from a migration peer into the emulated firmware's RECEIVE_UPDATE_DATA, for a
//! guest in the receiving state: a real packet with any bytes changed, cut or grown, aimed at
//! any page of guest RAM. Only the untouched packet decrypts (the peer cannot forge one), and
//! then to the page that was sent; a packet that is refused leaves guest memory as it was.
#![no_main]

use std::sync::{Mutex, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use veil_sev::emulated::firmware::EmulatedFirmware;
use veil_sev::emulated::identity::PlatformIdentity;
use veil_sev::firmware::{Firmware, Handle, Packet};
use veil_sev::flow::{Launch, Sender};
use veil_sev::guest_memory::test_ram::TestRam;
use veil_sev::policy::GuestPolicy;

const PAGE: usize = 4096;
/// TestRam's default: 16 pages.
const RAM_BYTES: usize = 64 << 10;

struct Target {
    firmware: EmulatedFirmware,
    ram: TestRam,
    guest: Handle,
    packet: Packet,
    plain: Vec<u8>,
}

fn target() -> &'static Mutex<Target> {
    static TARGET: OnceLock<Mutex<Target>> = OnceLock::new();
    TARGET.get_or_init(|| {
        let mut source = EmulatedFirmware::new(PlatformIdentity::generate().unwrap());
        let mut firmware = EmulatedFirmware::new(PlatformIdentity::generate().unwrap());
        let (sent, ram) = (TestRam::new(), TestRam::new());
        let plain: Vec<u8> = (0..PAGE).map(|i| (i * 7) as u8).collect();
        sent.write(0, &plain);
        source.register_ram(&sent.all()).unwrap();
        firmware.register_ram(&ram.all()).unwrap();
        let chain = firmware.certificate_chain().unwrap();
        let mut launch = Launch::start(&mut source, GuestPolicy(GuestPolicy::NODBG), None).unwrap();
        launch.update_data(&sent.at(0, PAGE)).unwrap();
        let launched = launch.measure().unwrap().finish().unwrap();
        let (mut sender, start) = Sender::start(&mut source, launched, &chain).unwrap();
        let packet = sender.update_data(&sent.at(0, PAGE)).unwrap();
        sender.finish().unwrap();
        let guest = firmware.receive_start(&start).unwrap();
        Mutex::new(Target {
            firmware,
            ram,
            guest,
            packet,
            plain,
        })
    })
}

#[derive(Arbitrary, Debug)]
struct Input {
    header_flips: Vec<(u8, u8)>,
    data_flips: Vec<(u16, u8)>,
    /// Cut the data to this many bytes, or grow it by this many.
    resize: Option<(bool, u16)>,
    /// Where in guest RAM the packet goes.
    dest: u16,
    /// A destination length other than the packet's.
    dest_len: Option<u16>,
}

fuzz_target!(|input: Input| {
    let mut target = target().lock().unwrap_or_else(|e| e.into_inner());
    let Target {
        firmware,
        ram,
        guest,
        packet: original,
        plain,
    } = &mut *target;
    let mut packet = original.clone();
    for (i, x) in &input.header_flips {
        let i = usize::from(*i) % packet.header.len();
        packet.header[i] ^= x;
    }
    for (i, x) in &input.data_flips {
        let i = usize::from(*i) % packet.data.len();
        packet.data[i] ^= x;
    }
    match input.resize {
        Some((true, n)) => packet.data.truncate(usize::from(n)),
        Some((false, n)) => packet
            .data
            .extend(std::iter::repeat_n(0, usize::from(n) % 8192)),
        None => {}
    }
    let len = usize::from(input.dest_len.unwrap_or(packet.data.len() as u16)).min(RAM_BYTES);
    let gpa = usize::from(input.dest) % (RAM_BYTES - len + 1);
    let before = ram.read(0, RAM_BYTES);
    let result = firmware.receive_update_data(*guest, packet.as_ref(), &ram.at(gpa as u64, len));
    match result {
        Ok(()) => {
            assert_eq!(&packet, original, "a changed packet was accepted");
            assert_eq!(ram.read(gpa as u64, PAGE), *plain);
            let after = ram.read(0, RAM_BYTES);
            assert_eq!(after[..gpa], before[..gpa], "bytes before the page changed");
            assert_eq!(
                after[gpa + PAGE..],
                before[gpa + PAGE..],
                "bytes after it changed"
            );
        }
        Err(_) => assert!(
            ram.read(0, RAM_BYTES) == before,
            "a refused packet changed memory"
        ),
    }
});
