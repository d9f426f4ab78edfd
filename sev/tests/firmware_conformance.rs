//! The emulated SEV firmware against code nobody here wrote: the `sev` crate's guest-owner
//! side, and a second emulated platform on the receiving end of a migration.

use rand::RngCore;
use sev::firmware::host::{Build, Version};
use sev::launch::sev::{HeaderFlags, Measurement, Policy};
use sev::session::Session;
use veil_sev::emulated::firmware::{EmulatedFirmware, EMULATED_API, EMULATED_BUILD};
use veil_sev::emulated::identity::PlatformIdentity;
use veil_sev::firmware::{Firmware, Handle, Packet, SevError};
use veil_sev::policy::GuestPolicy;

fn platform() -> EmulatedFirmware {
    EmulatedFirmware::new(PlatformIdentity::generate().expect("identity"))
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
    let mut fw = platform();
    let session = Session::try_from(Policy::default()).expect("owner session");
    let start = session
        .start(fw.certificate_chain().unwrap())
        .expect("LAUNCH_START data");
    let guest = fw.launch_start(GuestPolicy(0), Some(&start)).unwrap();

    let mut image: Vec<Vec<u8>> = [4096, 100, 8192].iter().map(|&n| random_bytes(n)).collect();
    for chunk in &mut image {
        fw.launch_update_data(guest, chunk).unwrap();
    }
    let m = fw.launch_measure(guest).unwrap();

    let mut measuring = session.measure().unwrap();
    for chunk in &image {
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
    let mut dest = vec![0u8; 64];
    assert_eq!(
        status(fw.launch_secret(guest, &bad, &mut dest).unwrap_err()),
        SevError::BadMeasurement
    );
    assert_eq!(dest, vec![0u8; 64]);

    fw.launch_secret(guest, &packet, &mut dest).unwrap();
    assert_eq!(dest, secret);
    fw.launch_finish(guest).unwrap();
}

#[test]
fn a_measurement_over_other_data_is_rejected_by_the_owner() {
    let mut fw = platform();
    let session = Session::try_from(Policy::default()).unwrap();
    let start = session.start(fw.certificate_chain().unwrap()).unwrap();
    let guest = fw.launch_start(GuestPolicy(0), Some(&start)).unwrap();
    fw.launch_update_data(guest, &mut [1u8; 64]).unwrap();
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

/// A guest launched and running on `fw`.
fn running_guest(fw: &mut EmulatedFirmware, policy: u32) -> Handle {
    let guest = fw.launch_start(GuestPolicy(policy), None).unwrap();
    fw.launch_update_data(guest, &mut [0u8; 16]).unwrap();
    fw.launch_measure(guest).unwrap();
    fw.launch_finish(guest).unwrap();
    guest
}

#[test]
fn thousands_of_random_pages_travel_between_two_platforms_byte_exact() {
    let (mut source, mut target) = (platform(), platform());
    let guest = running_guest(&mut source, GuestPolicy::NODBG | GuestPolicy::SEV);
    let start = source
        .send_start(guest, &target.certificate_chain().unwrap())
        .unwrap();
    let received = target.receive_start(&start).unwrap();
    for i in 0..3000 {
        // Whole pages, and now and then a part of one (any multiple of 16 within a page).
        let len = if i % 10 == 9 {
            16 * (1 + i % 255)
        } else {
            4096
        };
        let page = random_bytes(len);
        let packet = source.send_update_data(guest, &page).unwrap();
        assert_ne!(packet.data, page, "the payload is encrypted");
        let mut dest = vec![0u8; len];
        target
            .receive_update_data(received, &packet, &mut dest)
            .unwrap();
        assert_eq!(dest, page, "page {i}");
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
    let guest = running_guest(&mut source, 0);
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
    let packet = source.send_update_data(guest, &page).unwrap();
    let untouched = vec![0xa5u8; 4096];
    for i in 0..packet.header.len() {
        let mut bad = packet.clone();
        bad.header[i] ^= 0x01;
        let mut dest = untouched.clone();
        assert!(
            target
                .receive_update_data(received, &bad, &mut dest)
                .is_err(),
            "header byte {i}"
        );
        assert_eq!(dest, untouched);
    }
    for i in 0..packet.data.len() {
        let mut bad = packet.clone();
        bad.data[i] ^= 0x80;
        let mut dest = untouched.clone();
        let err = target
            .receive_update_data(received, &bad, &mut dest)
            .unwrap_err();
        assert_eq!(status(err), SevError::BadMeasurement, "payload byte {i}");
        assert_eq!(dest, untouched);
    }
    let mut dest = vec![0u8; 4096];
    target
        .receive_update_data(received, &packet, &mut dest)
        .unwrap();
    assert_eq!(dest, page);
}

#[test]
fn commands_in_the_wrong_state_fail_with_the_firmwares_errors() {
    let (mut source, mut target) = (platform(), platform());
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
                .launch_update_data(launching, &mut [0; 16])
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
        status(source.send_update_data(launching, &[0; 4096]).unwrap_err()),
        SevError::InvalidGuestState
    );
    assert_eq!(
        status(source.launch_measure(Handle(999)).unwrap_err()),
        SevError::InvalidGuest
    );

    // SEND_CANCEL returns the guest to RUNNING, and it can be sent later.
    source.send_start(launching, &target_chain).unwrap();
    assert_eq!(
        status(source.send_update_data(launching, &[0; 4095]).unwrap_err()),
        SevError::InvalidLen
    );
    source.send_cancel(launching).unwrap();
    assert_eq!(
        status(source.send_cancel(launching).unwrap_err()),
        SevError::InvalidGuestState
    );
    let start = source.send_start(launching, &target_chain).unwrap();
    let received = target.receive_start(&start).unwrap();
    let packet = source.send_update_data(launching, &[7; 4096]).unwrap();
    assert_eq!(
        status(
            target
                .receive_update_data(received, &packet, &mut [0; 16])
                .unwrap_err()
        ),
        SevError::InvalidLen
    );
    target.receive_finish(received).unwrap();
    assert_eq!(
        status(
            target
                .receive_update_data(received, &packet, &mut [0; 4096])
                .unwrap_err()
        ),
        SevError::InvalidGuestState
    );
}

#[test]
fn nosend_guests_cannot_be_sent() {
    let (mut source, target) = (platform(), platform());
    let guest = running_guest(&mut source, GuestPolicy::NOSEND);
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
    running_guest(&mut fw, 0);
    assert_eq!(fw.platform_status().unwrap().state, "WORKING");
}
