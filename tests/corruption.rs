//! A migration stream damaged on the way. One flipped byte in an encrypted page is caught by
//! the frame checksum before anything of its frame reaches the target guest; one in a plain
//! page's body by the page's own CRC, and that page is set aside. A damaged page the source
//! sends again (the guest keeps writing it) heals, and the migration completes; one it never
//! sends again fails the migration when the State arrives. Either way both sides say why, and
//! the guest carries on at the source with its memory intact (an SEV guest's send is
//! cancelled, so it can be migrated again).

mod common;

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use veil::{CapturedOutput, RunState, VmBuilder, VmStop};
use veil_guest_abi::page_stamp;
use veil_migration::protocol::frame::HEADER_BYTES;
use veil_migration::protocol::{
    FrameHeader, MemoryChunkRef, MessageType, PageContentRef, ProtocolError,
};
use veil_migration::receiver::{self, ReceiveError};
use veil_migration::sender::{SendError, SendOptions};
use vm_memory::{Bytes, GuestAddress};

/// Pages the guests keep stamping with seed 3 while they are migrated.
const DIRTY_FIRST: u64 = 0x800;
const DIRTY_PAGES: u64 = 64;

/// Which byte the relay flips: byte `at` of the data of page `gfn`, the first time it goes by.
#[derive(Debug, Clone, Copy)]
struct Damage {
    gfn: u64,
    at: usize,
}

/// What the relay saw.
#[derive(Debug, Default)]
struct Relayed {
    /// MemoryChunk frames that came from the source.
    chunks: usize,
    /// Which of them (counting from 1) carried the damaged page.
    damaged_chunk: Option<usize>,
}

/// Carries the source's frames to the target one at a time, damaging one page on the way; the
/// target's frames go back untouched. Once the target has hung up, so does the relay: the
/// source's next write fails, and it must find the target's reason in what it was sent.
fn relay(source_side: UnixStream, target_side: UnixStream, damage: Damage) -> Relayed {
    let mut from_source = source_side.try_clone().unwrap();
    let mut to_source = source_side;
    let mut from_target = target_side.try_clone().unwrap();
    let mut to_target = target_side;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let _ = std::io::copy(&mut from_target, &mut to_source);
            // The target hung up: the source sees the end once it has read all it was sent.
            let _ = to_source.shutdown(Shutdown::Write);
        });
        let mut seen = Relayed::default();
        let mut header = [0u8; HEADER_BYTES];
        while from_source.read_exact(&mut header).is_ok() {
            let parsed = FrameHeader::decode(&header).expect("the source writes valid headers");
            let mut payload = vec![0; parsed.length as usize];
            if from_source.read_exact(&mut payload).is_err() {
                break;
            }
            if parsed.kind == MessageType::MemoryChunk {
                seen.chunks += 1;
                if seen.damaged_chunk.is_none() {
                    if let Some(offset) = page_data_offset(&payload, damage.gfn) {
                        payload[offset + damage.at] ^= 0x10;
                        seen.damaged_chunk = Some(seen.chunks);
                    }
                }
            }
            let target_gone = to_target
                .write_all(&header)
                .and_then(|()| to_target.write_all(&payload))
                .is_err();
            if target_gone {
                break;
            }
        }
        // Ends the copy back to the source too, if the target is still there.
        let _ = to_target.shutdown(Shutdown::Both);
        seen
    })
}

/// Where the data of page `gfn` (a plain page, or an encrypted page's packet) starts in a
/// MemoryChunk payload.
fn page_data_offset(payload: &[u8], gfn: u64) -> Option<usize> {
    let chunk = MemoryChunkRef::parse(payload).expect("the source writes valid chunks");
    let page = chunk.pages().find(|p| p.gfn == gfn)?;
    let data = match page.content {
        PageContentRef::Plain(bytes) => &bytes[..],
        PageContentRef::Encrypted { data, .. } => data,
        PageContentRef::Zero => return None,
    };
    Some(data.as_ptr() as usize - payload.as_ptr() as usize)
}

fn word(memory: &veil_hypervisor::GuestMemory, gfn: u64) -> u64 {
    memory.read_obj(GuestAddress(gfn << 12)).unwrap()
}

/// The guest still runs on `source` (a wiped stamp comes back), and its memory holds what it
/// wrote: seed 5 over `stamped`, seed 3 over the pages it keeps dirtying.
fn assert_runs_with_its_stamps(source: &veil::Vm, stamped: std::ops::Range<u64>) {
    assert_eq!(source.state(), RunState::Running);
    common::assert_guest_restamps(source.memory(), 3, DIRTY_FIRST + 7);
    let expected = stamped
        .map(|gfn| (gfn, 5))
        .chain((DIRTY_FIRST..DIRTY_FIRST + DIRTY_PAGES).map(|gfn| (gfn, 3)));
    for (gfn, seed) in expected {
        assert_eq!(
            word(source.memory(), gfn),
            page_stamp(seed, gfn),
            "gfn {gfn:#x}"
        );
    }
}

/// The source's and the target's view of a migration through a damaging relay.
struct Outcome {
    sent: Result<(), SendError>,
    received: Result<(), ReceiveError>,
    relayed: Relayed,
    /// What the target had written into guest memory when it gave up.
    target_ram: veil_hypervisor::GuestRam,
}

/// Migrates `vm` (with `sev` for an SEV guest) through a relay that applies `damage`, to a
/// target that receives into scratch RAM (through `target_firmware` for an SEV guest).
fn migrate_through_damage(
    vm: &veil::Vm,
    damage: Damage,
    trusted_arks: Option<Vec<sev::certs::sev::ca::Certificate>>,
    target_chain: Option<Vec<u8>>,
    mut target_firmware: Option<&mut dyn veil_sev::firmware::Firmware>,
) -> Outcome {
    let (mut to_relay, relay_source_side) = UnixStream::pair().unwrap();
    let (relay_target_side, from_relay) = UnixStream::pair().unwrap();
    std::thread::scope(|scope| {
        let relaying = scope.spawn(move || relay(relay_source_side, relay_target_side, damage));
        let sending = scope.spawn(move || {
            let sent = veil::migration::send_over(
                vm,
                &mut to_relay,
                &SendOptions::default(),
                trusted_arks.unwrap_or_default(),
            );
            // Hang up, so the relay stops waiting for more.
            drop(to_relay);
            sent.map(drop)
        });
        let mut incoming = receiver::accept(from_relay, |_| Ok(()), target_chain).unwrap();
        let target_ram = common::scratch_ram(incoming.shape().ram_bytes());
        if let Some(firmware) = target_firmware.as_deref_mut() {
            veil::sev_launch::register_guest_ram(firmware, &target_ram).unwrap();
        }
        let received = incoming
            .receive_into(target_ram.memory(), target_firmware)
            .map(drop);
        // The target gives up and goes, as `veil receive` does.
        drop(incoming);
        Outcome {
            sent: sending.join().unwrap(),
            received,
            relayed: relaying.join().unwrap(),
            target_ram,
        }
    })
}

/// Both sides failed, and said why: the target found the damaged MemoryChunk, the source
/// learnt it from the target.
fn assert_failed_on_the_checksum(outcome: &Outcome) {
    match &outcome.received {
        Err(ReceiveError::Protocol(ProtocolError::Corrupted {
            kind: MessageType::MemoryChunk,
            expected,
            found,
        })) => assert_ne!(expected, found),
        other => panic!("the target must fail on the checksum: {other:?}"),
    }
    let sent = outcome.sent.as_ref().expect_err("the migration must fail");
    let said = veil::error_chain(sent);
    eprintln!("{:?}; the source says: {said}", outcome.relayed);
    assert!(
        said.contains("MemoryChunk frame failed its checksum: the stream was corrupted"),
        "the source learns why: {said}"
    );
    // The damage was done in the first pass, after at least one intact chunk.
    let damaged = outcome
        .relayed
        .damaged_chunk
        .expect("the relay damaged a page");
    assert!(damaged >= 2, "{:?}", outcome.relayed);
}

/// Both sides failed on a plain page that arrived damaged and never came again.
fn assert_failed_on_a_damaged_page(outcome: &Outcome, gfn: u64) {
    match &outcome.received {
        Err(ReceiveError::DamagedPages { count: 1, first }) => assert_eq!(*first, gfn),
        other => panic!("the target must fail on the damaged page: {other:?}"),
    }
    let sent = outcome.sent.as_ref().expect_err("the migration must fail");
    let said = veil::error_chain(sent);
    eprintln!("{:?}; the source says: {said}", outcome.relayed);
    assert!(
        said.contains(&format!(
            "1 page(s) of guest memory arrived damaged (their checksum failed) and were not \
             sent again, the first at gfn {gfn:#x}"
        )),
        "the source learns why: {said}"
    );
    assert!(
        outcome.relayed.damaged_chunk.is_some(),
        "the relay damaged a page"
    );
}

#[test]
fn a_flipped_byte_in_a_plain_page_fails_the_migration_and_the_guest_stays() {
    // 1536 stamped pages (6 MiB of plain pages) make the first pass several chunks long.
    const STAMPED: u64 = 0x1000;
    const STAMPED_PAGES: u64 = 1536;
    let out = CapturedOutput::new();
    let source = VmBuilder::new()
        .kernel(common::kit())
        .cmdline(format!(
            "stamp:seed=5,first={STAMPED:#x},count={STAMPED_PAGES} \
             dirty-loop:seed=3,first={DIRTY_FIRST:#x},count={DIRTY_PAGES}"
        ))
        .memory_bytes(32 << 20)
        .serial_writer(out.clone())
        .start()
        .unwrap();
    assert!(out.wait_for("stamping", Duration::from_secs(20)));

    // The stamp of a page in the middle of the stamped range.
    let damage = Damage {
        gfn: STAMPED + 0x200,
        at: 0,
    };
    let outcome = migrate_through_damage(&source, damage, None, None, None);
    assert_failed_on_a_damaged_page(&outcome, damage.gfn);
    let target = outcome.target_ram.memory();
    // Every page came but the damaged one, its neighbours in its chunk too.
    assert_eq!(word(target, DIRTY_FIRST), page_stamp(3, DIRTY_FIRST));
    assert_eq!(word(target, STAMPED), page_stamp(5, STAMPED));
    assert_eq!(word(target, damage.gfn + 1), page_stamp(5, damage.gfn + 1));
    assert_eq!(
        word(target, damage.gfn),
        0,
        "a damaged page reached the target"
    );

    // The guest runs on at the source, its memory as it wrote it.
    assert_runs_with_its_stamps(&source, STAMPED..STAMPED + STAMPED_PAGES);
    source.stop();
    source.wait();
}

#[test]
fn a_damaged_plain_page_the_guest_writes_again_is_sent_again_and_the_migration_completes() {
    let out = CapturedOutput::new();
    let source = VmBuilder::new()
        .kernel(common::kit())
        .cmdline(format!(
            "stamp:seed=5,first=0x400,count=16 \
             dirty-loop:seed=3,first={DIRTY_FIRST:#x},count={DIRTY_PAGES}"
        ))
        .memory_bytes(16 << 20)
        .serial_writer(out.clone())
        .start()
        .unwrap();
    assert!(out.wait_for("stamping", Duration::from_secs(20)));
    // A page the guest keeps stamping: it is dirty again in every pass.
    let damage = Damage {
        gfn: DIRTY_FIRST + 9,
        at: 0,
    };
    let (mut to_relay, relay_source_side) = UnixStream::pair().unwrap();
    let (relay_target_side, from_relay) = UnixStream::pair().unwrap();
    let (target, relayed) = std::thread::scope(|scope| {
        let relaying = scope.spawn(move || relay(relay_source_side, relay_target_side, damage));
        let sending = scope.spawn(|| {
            let sent =
                veil::migration::send_over(&source, &mut to_relay, &SendOptions::default(), vec![]);
            drop(to_relay);
            sent
        });
        let mut incoming = receiver::accept(from_relay, |_| Ok(()), None).unwrap();
        let target = veil::migration::receive(
            &mut incoming,
            VmBuilder::new().serial_writer(std::io::sink()),
            None,
        )
        .expect("the damaged page came again, whole");
        target.resume();
        let report = sending.join().unwrap().expect("the migration completes");
        assert!(report.pages_resent > 0, "{report:?}");
        (target, relaying.join().unwrap())
    });
    assert!(
        relayed.damaged_chunk.is_some(),
        "the relay damaged the page"
    );
    assert_eq!(source.wait(), VmStop::Migrated);
    common::assert_guest_restamps(target.memory(), 3, damage.gfn);
    assert_eq!(word(target.memory(), 0x400), page_stamp(5, 0x400));
    target.stop();
    target.wait();
}

#[test]
fn a_flipped_byte_in_an_encrypted_page_fails_the_migration_and_the_guest_can_go_again() {
    use sev::parser::Encoder;
    use veil::sev_launch::open_platform;
    // Private pages stamped once (seed 5) early in RAM, so in the first chunk.
    const STAMPED: u64 = 0x300;
    const STAMPED_PAGES: u64 = 16;
    let dir = common::TempDir::new("sev-corruption");
    let (source_platform, target_platform) = common::emulated_platforms(&dir);
    let sev = common::emulated_sev;
    let out = CapturedOutput::new();
    let source = VmBuilder::new()
        .kernel(common::kit())
        .cmdline(format!(
            "msr-write:value=1 stamp:seed=5,first={STAMPED:#x},count={STAMPED_PAGES} \
             dirty-loop:seed=3,first={DIRTY_FIRST:#x},count={DIRTY_PAGES}"
        ))
        .memory_bytes(16 << 20)
        .sev(sev(&source_platform))
        .serial_writer(out.clone())
        .start()
        .unwrap();
    assert!(out.wait_for("stamping", Duration::from_secs(20)));

    let mut target_firmware = open_platform(&target_platform).unwrap();
    let target_chain = target_firmware.certificate_chain().unwrap();
    let mut chain_bytes = Vec::new();
    target_chain.encode(&mut chain_bytes, ()).unwrap();
    let trusted = || Some(vec![target_chain.ca.ark]);

    // Every page of this guest is private: the damage hits a packet's ciphertext.
    let damage = Damage {
        gfn: DIRTY_FIRST + 0x10,
        at: 100,
    };
    let outcome = migrate_through_damage(
        &source,
        damage,
        trusted(),
        Some(chain_bytes.clone()),
        Some(target_firmware.as_mut()),
    );
    drop(target_firmware);
    assert_failed_on_the_checksum(&outcome);
    let target = outcome.target_ram.memory();
    assert_eq!(word(target, STAMPED), page_stamp(5, STAMPED));
    assert_eq!(
        word(target, damage.gfn),
        0,
        "a damaged page reached the target"
    );

    assert_runs_with_its_stamps(&source, STAMPED..STAMPED + STAMPED_PAGES);

    // The failed send was cancelled in the firmware (SEND_START again would be refused
    // otherwise): the same guest now migrates to a fresh target.
    let (mut to_target, from_source) = UnixStream::pair().unwrap();
    let (target, _) = common::migrate_sev_here(
        &source,
        &mut to_target,
        from_source,
        trusted().unwrap(),
        chain_bytes,
        &target_platform,
    );
    assert_eq!(source.wait(), VmStop::Migrated);
    common::assert_guest_restamps(target.memory(), 3, DIRTY_FIRST + 9);
    for gfn in STAMPED..STAMPED + STAMPED_PAGES {
        assert_eq!(
            word(target.memory(), gfn),
            page_stamp(5, gfn),
            "gfn {gfn:#x}"
        );
    }
    target.stop();
    target.wait();
}
