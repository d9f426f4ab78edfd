//! The emulated SEV firmware against code nobody here wrote: the `sev` crate's guest-owner
//! side, and a second emulated platform on the receiving end of a migration.

use rand::RngCore;
use sev::firmware::host::{Build, Version};
use sev::launch::sev::{HeaderFlags, Measurement, Policy};
use sev::session::Session;
use veil_sev::emulated::firmware::{EmulatedFirmware, EMULATED_API, EMULATED_BUILD};
use veil_sev::emulated::identity::PlatformIdentity;
use veil_sev::firmware::{Firmware, Handle, Packet, SevError};
use veil_sev::guest_memory::test_ram::TestRam;
use veil_sev::policy::GuestPolicy;

fn platform() -> EmulatedFirmware {
    EmulatedFirmware::new(PlatformIdentity::generate().expect("identity"))
}

/// A platform and the guest RAM registered with it.
fn platform_with_ram() -> (EmulatedFirmware, TestRam) {
    let mut fw = platform();
    let ram = TestRam::new();
    fw.register_ram(&ram.all()).unwrap();
    (fw, ram)
}

fn random_bytes(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    rand::rngs::OsRng.fill_bytes(&mut v);
    v
}

fn status(e: veil_sev::firmware::FirmwareError) -> SevError {
    e.status()
        .unwrap_or_else(|| panic!("not a firmware status: {e}"))
}

fn emulated_build() -> Build {
    Build {
        version: Version {
            major: EMULATED_API.0,
            minor: EMULATED_API.1,
        },
        build: EMULATED_BUILD,
    }
}

#[test]
fn an_owner_session_launch_measures_as_the_sev_crate_expects_and_injects_a_secret() {
    let (mut fw, ram) = platform_with_ram();
    let session = Session::try_from(Policy::default()).expect("owner session");
    let start = session
        .start(fw.certificate_chain().unwrap())
        .expect("LAUNCH_START data");
    let guest = fw.launch_start(GuestPolicy(0), Some(&start)).unwrap();

    // Pieces of the image where they lie in guest RAM, measured in place.
    let image: Vec<(u64, Vec<u8>)> = [(0, 4096), (0x1000, 112), (0x2000, 8192)]
        .iter()
        .map(|&(gpa, n)| (gpa, random_bytes(n)))
        .collect();
    for (gpa, chunk) in &image {
        ram.write(*gpa, chunk);
        fw.launch_update_data(guest, &ram.at(*gpa, chunk.len()))
            .unwrap();
    }
    let m = fw.launch_measure(guest).unwrap();

    let mut measuring = session.measure().unwrap();
    for (_, chunk) in &image {
        measuring.update_data(chunk).unwrap();
    }
    let verified = measuring
        .verify(
            emulated_build(),
            Measurement {
                measure: m.measure,
                mnonce: m.mnonce,
            },
        )
        .expect("the sev crate accepts the emulated firmware's measurement");

    let secret = random_bytes(64);
    let packaged = verified.secret(HeaderFlags::empty(), &secret).unwrap();
    let mut header = [0u8; 52];
    header[..4].copy_from_slice(&packaged.header.flags.bits().to_le_bytes());
    header[4..20].copy_from_slice(&packaged.header.iv);
    header[20..].copy_from_slice(&packaged.header.mac);
    let packet = Packet {
        header,
        data: packaged.ciphertext,
    };

    // A tampered secret writes nothing.
    let mut bad = packet.clone();
    bad.data[3] ^= 1;
    let dest = ram.at(0x8000, 64);
    assert_eq!(
        status(fw.launch_secret(guest, &bad, &dest).unwrap_err()),
        SevError::BadMeasurement
    );
    assert_eq!(ram.read(0x8000, 64), vec![0u8; 64]);

    fw.launch_secret(guest, &packet, &dest).unwrap();
    assert_eq!(ram.read(0x8000, 64), secret);
    fw.launch_finish(guest).unwrap();
}

#[test]
fn a_measurement_over_other_data_is_rejected_by_the_owner() {
    let (mut fw, ram) = platform_with_ram();
    let session = Session::try_from(Policy::default()).unwrap();
    let start = session.start(fw.certificate_chain().unwrap()).unwrap();
    let guest = fw.launch_start(GuestPolicy(0), Some(&start)).unwrap();
    ram.write(0, &[1u8; 64]);
    fw.launch_update_data(guest, &ram.at(0, 64)).unwrap();
    let m = fw.launch_measure(guest).unwrap();
    let mut measuring = session.measure().unwrap();
    measuring.update_data(&[2u8; 64]).unwrap();
    assert!(measuring
        .verify(
            emulated_build(),
            Measurement {
                measure: m.measure,
                mnonce: m.mnonce
            }
        )
        .is_err());
}

#[test]
fn an_owner_session_for_another_platform_is_refused() {
    let mut fw = platform();
    let other = platform().certificate_chain().unwrap();
    let start = Session::try_from(Policy::default())
        .unwrap()
        .start(other)
        .unwrap();
    let err = fw.launch_start(GuestPolicy(0), Some(&start)).unwrap_err();
    assert_eq!(status(err), SevError::BadMeasurement);
}

/// A guest launched and running on `fw`, whose RAM (registered first) is `ram`.
fn running_guest(fw: &mut EmulatedFirmware, ram: &TestRam, policy: u32) -> Handle {
    fw.register_ram(&ram.all()).unwrap();
    let guest = fw.launch_start(GuestPolicy(policy), None).unwrap();
    fw.launch_update_data(guest, &ram.at(0, 16)).unwrap();
    fw.launch_measure(guest).unwrap();
    fw.launch_finish(guest).unwrap();
    guest
}

#[test]
fn thousands_of_random_pages_travel_between_two_platforms_byte_exact() {
    let (mut source, mut target) = (platform(), platform());
    let (source_ram, target_ram) = (TestRam::new(), TestRam::new());
    let guest = running_guest(
        &mut source,
        &source_ram,
        GuestPolicy::NODBG | GuestPolicy::SEV,
    );
    target.register_ram(&target_ram.all()).unwrap();
    let start = source
        .send_start(guest, &target.certificate_chain().unwrap())
        .unwrap();
    let received = target.receive_start(&start).unwrap();
    for i in 0..3000u64 {
        // Whole pages, and now and then a part of one (any multiple of 16 within a page).
        let len = if i % 10 == 9 {
            16 * (1 + i as usize % 255)
        } else {
            4096
        };
        let gpa = (i % 16) * 4096;
        let page = random_bytes(len);
        source_ram.write(gpa, &page);
        let packet = source
            .send_update_data(guest, &source_ram.at(gpa, len))
            .unwrap();
        assert_ne!(packet.data, page, "the payload is encrypted");
        target
            .receive_update_data(received, packet.as_ref(), &target_ram.at(gpa, len))
            .unwrap();
        assert_eq!(target_ram.read(gpa, len), page, "page {i}");
    }
    source.send_finish(guest).unwrap();
    target.receive_finish(received).unwrap();
    // The received guest runs and can be sent on again.
    let back = target
        .send_start(received, &source.certificate_chain().unwrap())
        .unwrap();
    source.receive_start(&back).unwrap();
}

#[test]
fn any_flipped_byte_of_session_header_or_payload_is_rejected_and_writes_nothing() {
    let (mut source, mut target) = (platform(), platform());
    let (source_ram, target_ram) = (TestRam::new(), TestRam::new());
    let guest = running_guest(&mut source, &source_ram, 0);
    target.register_ram(&target_ram.all()).unwrap();
    let start = source
        .send_start(guest, &target.certificate_chain().unwrap())
        .unwrap();
    for i in 0..start.session.len() {
        let mut bad = start.clone();
        bad.session[i] ^= 0x01;
        assert!(target.receive_start(&bad).is_err(), "session byte {i}");
    }
    let mut bad_policy = start.clone();
    bad_policy.policy = GuestPolicy(GuestPolicy::NODBG);
    assert!(target.receive_start(&bad_policy).is_err(), "policy MAC");

    let received = target.receive_start(&start).unwrap();
    let page = random_bytes(4096);
    source_ram.write(0, &page);
    let packet = source
        .send_update_data(guest, &source_ram.at(0, 4096))
        .unwrap();
    let untouched = vec![0xa5u8; 4096];
    target_ram.write(0, &untouched);
    let dest = target_ram.at(0, 4096);
    for i in 0..packet.header.len() {
        let mut bad = packet.clone();
        bad.header[i] ^= 0x01;
        assert!(
            target
                .receive_update_data(received, bad.as_ref(), &dest)
                .is_err(),
            "header byte {i}"
        );
        assert_eq!(target_ram.read(0, 4096), untouched);
    }
    for i in 0..packet.data.len() {
        let mut bad = packet.clone();
        bad.data[i] ^= 0x80;
        let err = target
            .receive_update_data(received, bad.as_ref(), &dest)
            .unwrap_err();
        assert_eq!(status(err), SevError::BadMeasurement, "payload byte {i}");
        assert_eq!(target_ram.read(0, 4096), untouched);
    }
    target
        .receive_update_data(received, packet.as_ref(), &dest)
        .unwrap();
    assert_eq!(target_ram.read(0, 4096), page);
}

#[test]
fn commands_in_the_wrong_state_fail_with_the_firmwares_errors() {
    let (mut source, source_ram) = platform_with_ram();
    let (mut target, target_ram) = platform_with_ram();
    let target_chain = target.certificate_chain().unwrap();
    let launching = source.launch_start(GuestPolicy(0), None).unwrap();
    assert_eq!(
        status(source.send_start(launching, &target_chain).unwrap_err()),
        SevError::InvalidGuestState
    );
    source.launch_measure(launching).unwrap();
    assert_eq!(
        status(
            source
                .launch_update_data(launching, &source_ram.at(0, 16))
                .unwrap_err()
        ),
        SevError::InvalidGuestState
    );
    source.launch_finish(launching).unwrap();
    assert_eq!(
        status(source.launch_finish(launching).unwrap_err()),
        SevError::InvalidGuestState
    );
    assert_eq!(
        status(
            source
                .send_update_data(launching, &source_ram.at(0, 4096))
                .unwrap_err()
        ),
        SevError::InvalidGuestState
    );
    assert_eq!(
        status(source.launch_measure(Handle(999)).unwrap_err()),
        SevError::InvalidGuest
    );

    // SEND_CANCEL returns the guest to RUNNING, and it can be sent later.
    source.send_start(launching, &target_chain).unwrap();
    assert_eq!(
        status(
            source
                .send_update_data(launching, &source_ram.at(0, 4095))
                .unwrap_err()
        ),
        SevError::InvalidLen
    );
    // A transport buffer must be as long as the page: the hardware backend hands the
    // firmware exactly this buffer.
    let mut short = Packet::zeroed(4080);
    assert_eq!(
        status(
            source
                .send_update_data_into(launching, &source_ram.at(0, 4096), short.as_mut())
                .unwrap_err()
        ),
        SevError::InvalidLen
    );
    assert_eq!(short, Packet::zeroed(4080), "nothing written");
    source.send_cancel(launching).unwrap();
    assert_eq!(
        status(source.send_cancel(launching).unwrap_err()),
        SevError::InvalidGuestState
    );
    let start = source.send_start(launching, &target_chain).unwrap();
    let received = target.receive_start(&start).unwrap();
    let packet = source
        .send_update_data(launching, &source_ram.at(0, 4096))
        .unwrap();
    assert_eq!(
        status(
            target
                .receive_update_data(received, packet.as_ref(), &target_ram.at(0, 16))
                .unwrap_err()
        ),
        SevError::InvalidLen
    );
    target.receive_finish(received).unwrap();
    assert_eq!(
        status(
            target
                .receive_update_data(received, packet.as_ref(), &target_ram.at(0, 4096))
                .unwrap_err()
        ),
        SevError::InvalidGuestState
    );
}

#[test]
fn nosend_guests_cannot_be_sent() {
    let (mut source, target) = (platform(), platform());
    let guest = running_guest(&mut source, &TestRam::new(), GuestPolicy::NOSEND);
    let err = source
        .send_start(guest, &target.identity().export_chain())
        .unwrap_err();
    assert_eq!(status(err), SevError::PolicyFailure);
    assert!(err_text(&mut source, guest).contains("SEND_START"));
}

fn err_text(fw: &mut EmulatedFirmware, guest: Handle) -> String {
    let other = platform().certificate_chain().unwrap();
    fw.send_start(guest, &other).unwrap_err().to_string()
}

#[test]
fn the_platform_says_it_gives_no_confidentiality() {
    let mut fw = platform();
    let status = fw.platform_status().unwrap();
    assert!(!status.confidential);
    assert_eq!((status.api_major, status.api_minor), EMULATED_API);
    assert_eq!(status.state, "INIT");
    running_guest(&mut fw, &TestRam::new(), 0);
    assert_eq!(fw.platform_status().unwrap().state, "WORKING");
}

#[test]
fn guest_memory_outside_registered_ram_is_refused_before_the_guest_is_looked_at() {
    // What the hardware would get wrong: a buffer that is not this guest's memory (a heap copy,
    // another VM's RAM) would not decrypt on the PSP; the model refuses it outright.
    let (mut source, source_ram) = platform_with_ram();
    let elsewhere = TestRam::new();
    let guest = source.launch_start(GuestPolicy(0), None).unwrap();
    let outside = elsewhere.at(0, 4096);
    assert_eq!(
        status(source.launch_update_data(guest, &outside).unwrap_err()),
        SevError::InvalidAddress
    );
    source
        .launch_update_data(guest, &source_ram.at(0, 16))
        .unwrap();
    source.launch_measure(guest).unwrap();
    source.launch_finish(guest).unwrap();
    let (mut target, target_ram) = platform_with_ram();
    source
        .send_start(guest, &target.certificate_chain().unwrap())
        .unwrap();
    assert_eq!(
        status(source.send_update_data(guest, &outside).unwrap_err()),
        SevError::InvalidAddress
    );
    // A page-crossing or misaligned range is refused as KVM refuses it.
    for (gpa, len) in [(2048, 4096), (8, 16), (0, 0)] {
        assert_eq!(
            status(
                source
                    .send_update_data(guest, &source_ram.at(gpa, len))
                    .unwrap_err()
            ),
            SevError::InvalidLen,
            "{gpa:#x}+{len}"
        );
    }
    let packet = source
        .send_update_data(guest, &source_ram.at(0, 4096))
        .unwrap();
    let start = source
        .send_start(guest, &target.certificate_chain().unwrap())
        .unwrap_err();
    assert_eq!(
        status(start),
        SevError::InvalidGuestState,
        "already sending"
    );
    source.send_cancel(guest).unwrap();
    let start = source
        .send_start(guest, &target.certificate_chain().unwrap())
        .unwrap();
    let received = target.receive_start(&start).unwrap();
    elsewhere.write(0, &[0x5a; 4096]);
    let packet_now = source
        .send_update_data(guest, &source_ram.at(0, 4096))
        .unwrap();
    assert_eq!(
        status(
            target
                .receive_update_data(received, packet_now.as_ref(), &outside)
                .unwrap_err()
        ),
        SevError::InvalidAddress
    );
    assert_eq!(elsewhere.read(0, 4096), vec![0x5a; 4096], "untouched");
    // The packet from the cancelled send does not verify under the new keys.
    assert!(target
        .receive_update_data(received, packet.as_ref(), &target_ram.at(0, 4096))
        .is_err());
}
