use std::sync::{Arc, Mutex};

use event_manager::{EventManager, SubscriberOps};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::persist::Persist;
use crate::virtio::mmio::MmioRestoreArgs;
use crate::virtio::testing::{readable, rig, writable, Buf, Rig};
use crate::virtio::{DeviceMemory, MmioTransport, VIRTIO_F_ACCESS_PLATFORM};

const HEADER: u64 = 0x10000;
const DATA: u64 = 0x20000;
const STATUS: u64 = 0x30000;
const SECTORS: u64 = 8;

fn blank_disk() -> Vec<u8> {
    vec![0u8; (SECTORS * SECTOR_SIZE) as usize]
}

/// A disk whose sector `n` is filled with byte `n + 1`.
fn numbered_disk() -> Vec<u8> {
    (0..SECTORS * SECTOR_SIZE)
        .map(|i| (i / SECTOR_SIZE + 1) as u8)
        .collect()
}

/// Submits header, `data` and a status byte; returns the chain's head.
fn submit(r: &mut Rig, kind: u32, sector: u64, data: &[Buf]) -> u16 {
    r.mem.write_obj(kind, GuestAddress(HEADER)).unwrap();
    r.mem.write_obj(0u32, GuestAddress(HEADER + 4)).unwrap();
    r.mem.write_obj(sector, GuestAddress(HEADER + 8)).unwrap();
    r.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    let mut chain = vec![readable(HEADER, 16)];
    chain.extend_from_slice(data);
    chain.push(writable(STATUS, 1));
    r.queue.submit(&r.mem, &chain)
}

fn status(r: &Rig) -> u32 {
    u32::from(r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap())
}

fn fill(r: &Rig, at: u64, len: usize, byte: u8) {
    r.mem
        .write_slice(&vec![byte; len], GuestAddress(at))
        .unwrap();
}

fn guest_bytes(r: &Rig, at: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    r.mem.read_slice(&mut buf, GuestAddress(at)).unwrap();
    buf
}

fn file_bytes(r: &Rig) -> Vec<u8> {
    std::fs::read(r.disk.as_path()).unwrap()
}

#[test]
fn writes_then_reads_back_across_descriptors() {
    let mut r = rig(&blank_disk(), false, false);
    r.start(0);
    fill(&r, DATA, 1024, 0x5a);
    let head = submit(&mut r, VIRTIO_BLK_T_OUT, 1, &[readable(DATA, 1024)]);
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_OK);
    assert_eq!(r.queue.used_elem(&r.mem, 0), (u32::from(head), 1));
    let file = file_bytes(&r);
    assert!(file[..512].iter().all(|&b| b == 0));
    assert!(file[512..1536].iter().all(|&b| b == 0x5a));
    assert!(file[1536..].iter().all(|&b| b == 0));

    // Read sectors 0..3 into two buffers of different sizes.
    let head = submit(
        &mut r,
        VIRTIO_BLK_T_IN,
        0,
        &[writable(DATA + 0x1000, 512), writable(DATA + 0x3000, 1024)],
    );
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_OK);
    assert_eq!(r.queue.used_elem(&r.mem, 1), (u32::from(head), 1536 + 1));
    assert_eq!(guest_bytes(&r, DATA + 0x1000, 512), vec![0; 512]);
    assert_eq!(guest_bytes(&r, DATA + 0x3000, 1024), vec![0x5a; 1024]);
    assert_eq!(r.queue.used_idx(&r.mem), 2);
}

#[test]
fn reads_what_the_host_put_on_the_disk() {
    let mut r = rig(&numbered_disk(), false, false);
    r.start(0);
    submit(&mut r, VIRTIO_BLK_T_IN, 6, &[writable(DATA, 1024)]);
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_OK);
    let data = guest_bytes(&r, DATA, 1024);
    assert_eq!(&data[..512], &[7u8; 512][..]);
    assert_eq!(&data[512..], &[8u8; 512][..]);
}

#[test]
fn flush_and_get_id() {
    let mut r = rig(&blank_disk(), false, false);
    r.start(0);
    submit(&mut r, VIRTIO_BLK_T_FLUSH, 0, &[]);
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_OK);

    fill(&r, DATA, 20, 0xee);
    submit(&mut r, VIRTIO_BLK_T_GET_ID, 0, &[writable(DATA, 20)]);
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_OK);
    let mut id = b"veil-test-disk".to_vec();
    id.resize(20, 0);
    assert_eq!(guest_bytes(&r, DATA, 20), id);
    assert_eq!(r.queue.used_elem(&r.mem, 1).1, 21);
}

#[test]
fn requests_beyond_capacity_fail_untouched() {
    let mut r = rig(&numbered_disk(), false, false);
    r.start(0);
    for sector in [SECTORS - 1, SECTORS, u64::MAX] {
        fill(&r, DATA, 1024, 0xaa);
        submit(&mut r, VIRTIO_BLK_T_IN, sector, &[writable(DATA, 1024)]);
        r.process();
        assert_eq!(status(&r), VIRTIO_BLK_S_IOERR, "read at sector {sector}");
        assert_eq!(guest_bytes(&r, DATA, 1024), vec![0xaa; 1024]);

        submit(&mut r, VIRTIO_BLK_T_OUT, sector, &[readable(DATA, 1024)]);
        r.process();
        assert_eq!(status(&r), VIRTIO_BLK_S_IOERR, "write at sector {sector}");
    }
    assert_eq!(file_bytes(&r), numbered_disk());
}

#[test]
fn read_only_disks_refuse_writes() {
    let mut r = rig(&numbered_disk(), true, false);
    assert_ne!(r.driver.device_features() & (1 << VIRTIO_BLK_F_RO), 0);
    r.start(0);
    fill(&r, DATA, 512, 0xaa);
    submit(&mut r, VIRTIO_BLK_T_OUT, 0, &[readable(DATA, 512)]);
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_IOERR);
    assert_eq!(file_bytes(&r), numbered_disk());
    // Reads still work.
    submit(&mut r, VIRTIO_BLK_T_IN, 0, &[writable(DATA, 512)]);
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_OK);
    assert_eq!(guest_bytes(&r, DATA, 512), vec![1; 512]);
}

#[test]
fn malformed_chains_fail_without_stopping_the_device() {
    let mut r = rig(&numbered_disk(), false, false);
    r.start(0);

    // A header cut short.
    r.mem
        .write_obj(VIRTIO_BLK_T_IN, GuestAddress(HEADER))
        .unwrap();
    r.queue.submit(
        &r.mem,
        &[
            readable(HEADER, 8),
            writable(DATA, 512),
            writable(STATUS, 1),
        ],
    );
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_IOERR);

    // Data that is not a whole number of sectors.
    submit(&mut r, VIRTIO_BLK_T_IN, 0, &[writable(DATA, 100)]);
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_IOERR);

    // No writable byte at all: nothing to report into, the chain is only returned.
    r.queue.submit(&r.mem, &[readable(HEADER, 16)]);
    r.process();
    assert_eq!(r.queue.used_elem(&r.mem, 2).1, 0);

    // A buffer outside guest memory.
    submit(&mut r, VIRTIO_BLK_T_IN, 0, &[writable(1 << 40, 512)]);
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_IOERR);

    // An unknown request type.
    submit(&mut r, 99, 0, &[]);
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_UNSUPP);

    // And the device still serves a good request.
    submit(&mut r, VIRTIO_BLK_T_IN, 1, &[writable(DATA, 512)]);
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_OK);
    assert_eq!(guest_bytes(&r, DATA, 512), vec![2; 512]);
    assert_eq!(r.queue.used_idx(&r.mem), 6);
    assert_eq!(file_bytes(&r), numbered_disk());
}

#[test]
fn private_buffers_are_refused_and_counted() {
    let mut r = rig(&numbered_disk(), false, true);
    r.start(0);
    r.pages.0.lock().unwrap().push(DATA..DATA + 0x1000);

    // A read into a private page: IOERR, the page keeps what it had.
    fill(&r, DATA, 512, 0xaa);
    submit(&mut r, VIRTIO_BLK_T_IN, 0, &[writable(DATA, 512)]);
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_IOERR);
    assert_eq!(guest_bytes(&r, DATA, 512), vec![0xaa; 512]);
    assert_eq!(r.driver.transport.refusals(), 1);

    // A write from a private page: IOERR, the disk untouched.
    submit(
        &mut r,
        VIRTIO_BLK_T_OUT,
        0,
        &[readable(DATA - 512, 512), readable(DATA, 512)],
    );
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_IOERR);
    assert_eq!(file_bytes(&r), numbered_disk());
    assert_eq!(r.driver.transport.refusals(), 2);

    // A private status byte: nothing is written anywhere, the chain is returned empty.
    r.pages.0.lock().unwrap().push(STATUS..STATUS + 1);
    submit(&mut r, VIRTIO_BLK_T_FLUSH, 0, &[]);
    r.process();
    assert_eq!(status(&r), 0xff);
    assert_eq!(r.queue.used_elem(&r.mem, 2).1, 0);
    assert!(r.driver.transport.refusals() >= 3);
}

#[test]
fn private_rings_stop_the_queue_before_any_io() {
    let mut r = rig(&numbered_disk(), false, true);
    r.start(0);
    fill(&r, DATA, 512, 0xaa);
    submit(&mut r, VIRTIO_BLK_T_OUT, 0, &[readable(DATA, 512)]);
    // The guest made its used ring private after setting the queue up.
    r.pages
        .0
        .lock()
        .unwrap()
        .push(r.queue.used..r.queue.used + 1);
    r.process();
    assert_eq!(file_bytes(&r), numbered_disk());
    assert_eq!(r.driver.transport.refusals(), 1);
    r.pages.0.lock().unwrap().clear();
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_OK);
    assert_eq!(file_bytes(&r)[..512], [0xaa; 512]);
}

#[test]
fn completion_raises_the_interrupt() {
    let mut r = rig(&numbered_disk(), false, false);
    r.start(0);
    submit(&mut r, VIRTIO_BLK_T_FLUSH, 0, &[]);
    r.process();
    assert_eq!(r.driver.read(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    assert_eq!(r.driver.transport.interrupt_eventfd().read().unwrap(), 1);
}

#[test]
fn no_interrupt_flag_is_honoured() {
    let mut r = rig(&numbered_disk(), false, false);
    r.start(VIRTIO_RING_F_EVENT_IDX);
    r.queue
        .set_avail_flags(&r.mem, VRING_AVAIL_F_NO_INTERRUPT as u16);
    submit(&mut r, VIRTIO_BLK_T_FLUSH, 0, &[]);
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_OK);
    assert_eq!(r.driver.read(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
    assert!(r.driver.transport.interrupt_eventfd().read().is_err());
}

#[test]
fn used_event_is_honoured() {
    let mut r = rig(&numbered_disk(), false, false);
    r.start(0);
    // The driver wants to hear once the used index passes 1: not after the first request.
    r.queue.set_used_event(&r.mem, 1);
    submit(&mut r, VIRTIO_BLK_T_FLUSH, 0, &[]);
    r.process();
    assert!(r.driver.transport.interrupt_eventfd().read().is_err());
    submit(&mut r, VIRTIO_BLK_T_FLUSH, 0, &[]);
    r.process();
    assert_eq!(r.driver.transport.interrupt_eventfd().read().unwrap(), 1);
}

#[test]
fn the_event_loop_serves_a_notified_queue() {
    let mut r = rig(&numbered_disk(), false, false);
    let mut events = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
    events.add_subscriber(r.block.clone());
    r.start(0);
    submit(&mut r, VIRTIO_BLK_T_IN, 2, &[writable(DATA, 512)]);
    assert_eq!(events.run_with_timeout(0).unwrap(), 0, "no kick yet");
    r.driver.write(reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(events.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(status(&r), VIRTIO_BLK_S_OK);
    assert_eq!(guest_bytes(&r, DATA, 512), vec![3; 512]);
}

#[test]
fn a_disk_in_use_is_refused_by_name() {
    let r = rig(&blank_disk(), false, false);
    let err = Block::new(BlockConfig::new(r.disk.as_path()))
        .err()
        .unwrap();
    assert!(
        matches!(err, BlockError::Disk(DiskError::Locked { .. })),
        "{err:?}"
    );
    let chain = format!("{err}: {}", std::error::Error::source(&err).unwrap());
    assert!(chain.contains(&r.disk.as_path().display().to_string()));
}

#[test]
fn ids_longer_than_get_id_are_refused() {
    let r = rig(&blank_disk(), false, false);
    let config = BlockConfig {
        path: r.disk.as_path().to_owned(),
        read_only: true,
        id: Some("x".repeat(21)),
    };
    assert!(matches!(
        Block::new(config),
        Err(BlockError::IdTooLong { .. })
    ));
}

#[test]
fn save_and_restore_mid_use() {
    let mut r = rig(&blank_disk(), false, false);
    r.start(0);
    fill(&r, DATA, 512, 0x5a);
    submit(&mut r, VIRTIO_BLK_T_OUT, 3, &[readable(DATA, 512)]);
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_OK);

    // Pause: the source quiesces and saves; the states travel as JSON.
    r.block.lock().unwrap().quiesce().unwrap();
    let transport_state = serde_json::to_string(&Persist::save(&r.driver.transport)).unwrap();
    let block_state = serde_json::to_string(&r.block.lock().unwrap().save()).unwrap();
    // The guest queued a read just before the pause; its kick is lost with the source.
    let head = submit(&mut r, VIRTIO_BLK_T_IN, 3, &[writable(DATA + 0x1000, 512)]);
    let args = BlockRestoreArgs {
        path: r.disk.as_path().to_owned(),
    };
    let block_state: BlockState = serde_json::from_str(&block_state).unwrap();
    assert!(
        matches!(
            Block::restore(args.clone(), &block_state),
            Err(BlockError::Disk(DiskError::Locked { .. }))
        ),
        "the target waits for the source to let go of the disk"
    );
    r.block.lock().unwrap().release_disk().unwrap();

    let block = Arc::new(Mutex::new(Block::restore(args, &block_state).unwrap()));
    let transport = MmioTransport::restore(
        MmioRestoreArgs {
            device: block.clone(),
            memory: DeviceMemory::plain(r.mem.clone(), "restored"),
        },
        &serde_json::from_str(&transport_state).unwrap(),
    )
    .unwrap();
    assert!(block.lock().unwrap().is_active());
    assert_eq!(
        transport.save(),
        serde_json::from_str(&transport_state).unwrap()
    );
    assert_eq!(block.lock().unwrap().id(), b"veil-test-disk");

    // The restore looks at the queue again: the event loop finds the queued read.
    let mut events = EventManager::<Arc<Mutex<Block>>>::new().unwrap();
    events.add_subscriber(block.clone());
    assert_eq!(events.run_with_timeout(1000).unwrap(), 1);
    assert_eq!(status(&r), VIRTIO_BLK_S_OK);
    assert_eq!(r.queue.used_idx(&r.mem), 2);
    assert_eq!(r.queue.used_elem(&r.mem, 1), (u32::from(head), 513));
    assert_eq!(guest_bytes(&r, DATA + 0x1000, 512), vec![0x5a; 512]);

    // And the restored device goes on writing.
    fill(&r, DATA, 512, 0x77);
    submit(&mut r, VIRTIO_BLK_T_OUT, 4, &[readable(DATA, 512)]);
    block.lock().unwrap().process_queue(0);
    assert_eq!(status(&r), VIRTIO_BLK_S_OK);
    let file = file_bytes(&r);
    assert_eq!(file[3 * 512..4 * 512], [0x5a; 512]);
    assert_eq!(file[4 * 512..5 * 512], [0x77; 512]);

    // The source, having handed the disk over, can no longer write to it.
    submit(&mut r, VIRTIO_BLK_T_OUT, 0, &[readable(DATA, 512)]);
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_IOERR);
    assert_eq!(file_bytes(&r)[..512], [0; 512]);
}

#[test]
fn restore_refuses_a_different_disk() {
    let r = rig(&blank_disk(), false, false);
    let mut state = r.block.lock().unwrap().save();
    r.block.lock().unwrap().release_disk().unwrap();
    state.capacity += 1;
    let err = Block::restore(
        BlockRestoreArgs {
            path: r.disk.as_path().to_owned(),
        },
        &state,
    )
    .err()
    .unwrap();
    assert!(matches!(err, BlockError::CapacityMismatch { .. }), "{err}");
}

#[test]
fn encrypted_rig_negotiates_access_platform() {
    let mut r = rig(&blank_disk(), false, true);
    assert_ne!(r.driver.device_features() & VIRTIO_F_ACCESS_PLATFORM, 0);
    r.start(0);
    submit(&mut r, VIRTIO_BLK_T_FLUSH, 0, &[]);
    r.process();
    assert_eq!(status(&r), VIRTIO_BLK_S_OK);
    assert_eq!(r.driver.transport.refusals(), 0);
}

mod guest_cannot_panic {
    use proptest::prelude::*;

    use crate::BusDevice;

    use super::*;

    /// One thing a hostile driver can do.
    #[derive(Debug, Clone)]
    enum Step {
        /// A register write of any size at any offset in the window.
        Write { offset: u16, value: u32, len: u8 },
        /// A register read.
        Read { offset: u16, len: u8 },
        /// Garbage in guest memory (the rings and the buffers live in the first 256 KiB).
        Scribble { at: u32, bytes: Vec<u8> },
        /// A chain of arbitrary descriptors.
        Chain { bufs: Vec<(u32, u16, bool)> },
        /// The device thread serving the queue.
        Process,
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
                0u32..0x4_0000,
                proptest::collection::vec(any::<u8>(), 1..64)
            )
                .prop_map(|(at, bytes)| Step::Scribble { at, bytes }),
            proptest::collection::vec((0u32..0x4_0000, any::<u16>(), any::<bool>()), 0..6)
                .prop_map(|bufs| Step::Chain { bufs }),
            Just(Step::Process),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn any_driver_behaviour_is_survived(steps in proptest::collection::vec(step(), 1..40)) {
            let mut r = rig(&numbered_disk(), false, true);
            r.pages.0.lock().unwrap().push(0x38000..0x3a000);
            r.start(0);
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
                    Step::Chain { bufs } => {
                        let bufs: Vec<Buf> = bufs
                            .into_iter()
                            .map(|(addr, len, w)| Buf { addr: u64::from(addr), len: u32::from(len), writable: w })
                            .collect();
                        if !bufs.is_empty() {
                            r.queue.submit(&r.mem, &bufs);
                        }
                    }
                    Step::Process => r.process(),
                }
            }
            r.process();
        }
    }
}
