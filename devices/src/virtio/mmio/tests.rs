use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_mmio as reg;

use super::*;
use crate::virtio::testing::{rig, TestQueue, RIG_MEMORY};

const DISK: &[u8] = &[0u8; 8 * 512];

#[test]
fn identifies_as_a_version_2_block_device() {
    let mut r = rig(DISK, false, false);
    let d = &mut r.driver;
    assert_eq!(d.read(reg::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    assert_eq!(d.read(reg::VIRTIO_MMIO_VERSION), 2);
    assert_eq!(d.read(reg::VIRTIO_MMIO_DEVICE_ID), 2);
    assert_eq!(d.read(reg::VIRTIO_MMIO_VENDOR_ID), VEIL_VENDOR_ID);
    assert_eq!(d.read(reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 256);
    d.write(reg::VIRTIO_MMIO_QUEUE_SEL, 1);
    assert_eq!(d.read(reg::VIRTIO_MMIO_QUEUE_NUM_MAX), 0, "no second queue");
    assert_eq!(d.read(reg::VIRTIO_MMIO_SHM_LEN_LOW), u32::MAX);
    assert_eq!(d.read(reg::VIRTIO_MMIO_CONFIG_GENERATION), 0);

    let features = d.device_features();
    assert_ne!(features & VIRTIO_F_VERSION_1, 0);
    assert_eq!(features & VIRTIO_F_ACCESS_PLATFORM, 0, "plain guest");

    // Config space: capacity (8 sectors) as one 64-bit or two 32-bit reads, blk_size at 20.
    let mut capacity = [0u8; 8];
    d.transport.read(0x100, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), 8);
    assert_eq!(d.read(0x100), 8);
    assert_eq!(d.read(0x104), 0);
    assert_eq!(d.read(0x100 + 20), 512);
    assert_eq!(d.read(0x100 + 12), 254, "seg_max");
    assert_eq!(d.read(0x200), 0, "beyond the config space");
}

#[test]
fn malformed_accesses_are_ignored() {
    let mut r = rig(DISK, false, false);
    let d = &mut r.driver;
    let mut byte = [0xffu8; 1];
    d.transport
        .read(u64::from(reg::VIRTIO_MMIO_MAGIC_VALUE), &mut byte);
    assert_eq!(byte, [0]);
    let mut word = [0xffu8; 4];
    d.transport.read(2, &mut word);
    assert_eq!(word, [0; 4], "misaligned");
    d.transport
        .write(u64::from(reg::VIRTIO_MMIO_STATUS), &[1, 0]);
    assert_eq!(
        d.read(reg::VIRTIO_MMIO_STATUS),
        0,
        "16-bit status write ignored"
    );
    // Legacy registers do not exist on a version 2 transport.
    d.write(reg::VIRTIO_MMIO_QUEUE_PFN, 0x1234);
    assert_eq!(d.read(reg::VIRTIO_MMIO_QUEUE_PFN), 0);
    d.write(0xffc, 1);
    d.write(reg::VIRTIO_MMIO_MAGIC_VALUE, 0);
    assert_eq!(d.read(reg::VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
    // Features outside negotiation are not taken.
    d.write(reg::VIRTIO_MMIO_DRIVER_FEATURES, 0xffff_ffff);
    assert_eq!(d.transport.save().driver_features, 0);
}

#[test]
fn encrypted_guests_must_accept_access_platform() {
    let mut r = rig(DISK, false, true);
    let d = &mut r.driver;
    let offered = d.device_features();
    assert_ne!(offered & VIRTIO_F_ACCESS_PLATFORM, 0);
    assert!(!d.negotiate(offered & !VIRTIO_F_ACCESS_PLATFORM));
    assert_eq!(
        d.read(reg::VIRTIO_MMIO_STATUS),
        VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER
    );
    // DRIVER_OK without FEATURES_OK does not start the device.
    d.driver_ok();
    assert_eq!(
        d.read(reg::VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_DRIVER_OK,
        0
    );
    assert!(d.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM));
}

#[test]
fn refuses_legacy_drivers_and_unoffered_features() {
    let mut r = rig(DISK, false, false);
    let d = &mut r.driver;
    assert!(!d.negotiate(0), "no VERSION_1");
    assert!(!d.negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM));
    assert!(!d.negotiate(VIRTIO_F_VERSION_1 | 1 << 50));
    assert!(d.negotiate(VIRTIO_F_VERSION_1));
}

#[test]
fn queue_setup_is_checked() {
    let mut r = rig(DISK, false, false);
    assert!(r.driver.negotiate(VIRTIO_F_VERSION_1));
    let d = &mut r.driver;
    d.write(reg::VIRTIO_MMIO_QUEUE_SEL, 0);
    for bad in [0, 3, 100, 512, 1 << 16] {
        d.write(reg::VIRTIO_MMIO_QUEUE_NUM, bad);
        assert_eq!(d.transport.save().queues[0].size, 256, "size {bad}");
    }
    d.write(reg::VIRTIO_MMIO_QUEUE_NUM, 16);
    assert_eq!(d.transport.save().queues[0].size, 16);
    // A misaligned descriptor table is refused.
    d.write(reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1001);
    assert_eq!(d.transport.save().queues[0].desc_table, 0);
    // Rings outside guest memory: the queue does not become ready.
    d.write(reg::VIRTIO_MMIO_QUEUE_DESC_LOW, RIG_MEMORY as u32);
    d.write(reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
    d.write(reg::VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
    d.write(reg::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(d.read(reg::VIRTIO_MMIO_QUEUE_READY), 0);
    d.write(reg::VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
    d.write(reg::VIRTIO_MMIO_QUEUE_READY, 1);
    assert_eq!(d.read(reg::VIRTIO_MMIO_QUEUE_READY), 1);
    // A ready queue keeps its configuration.
    d.write(reg::VIRTIO_MMIO_QUEUE_NUM, 32);
    assert_eq!(d.transport.save().queues[0].size, 16);
    // A device whose queue is not ready refuses to start.
    d.write(reg::VIRTIO_MMIO_QUEUE_READY, 0);
    d.driver_ok();
    let status = d.read(reg::VIRTIO_MMIO_STATUS);
    assert_eq!(status & VIRTIO_CONFIG_S_DRIVER_OK, 0);
    assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    assert_eq!(
        d.read(reg::VIRTIO_MMIO_INTERRUPT_STATUS),
        reg::VIRTIO_MMIO_INT_CONFIG
    );
    assert_eq!(
        d.read(reg::VIRTIO_MMIO_CONFIG_GENERATION),
        0,
        "the config itself is unchanged"
    );
}

#[test]
fn rings_in_private_pages_keep_the_queue_unready() {
    let mut r = rig(DISK, false, true);
    r.pages.0.lock().unwrap().push(0x3000..0x4000);
    assert!(r
        .driver
        .negotiate(VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM));
    r.driver.setup_queue(0, &TestQueue::new(&r.mem, 0x1000, 16));
    assert_eq!(r.driver.read(reg::VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(r.driver.transport.refusals(), 1);
}

#[test]
fn queue_notify_signals_the_queue_eventfd() {
    let mut r = rig(DISK, false, false);
    let evt = r.driver.transport.notify_eventfds()[0].try_clone().unwrap();
    assert!(evt.read().is_err(), "nothing yet");
    r.driver.write(reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(evt.read().unwrap(), 1);
    r.driver.write(reg::VIRTIO_MMIO_QUEUE_NOTIFY, 7);
    assert!(evt.read().is_err(), "unknown queue: nothing signalled");
    // The device's own EventFd is the same object: the event loop sees the kick.
    r.driver.write(reg::VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    assert_eq!(r.block.lock().unwrap().queue_events()[0].read().unwrap(), 1);
}

#[test]
fn status_zero_resets_the_device() {
    let mut r = rig(DISK, false, false);
    r.start(0);
    r.driver.write(reg::VIRTIO_MMIO_STATUS, 0);
    assert_eq!(r.driver.read(reg::VIRTIO_MMIO_STATUS), 0);
    assert!(!r.block.lock().unwrap().is_active());
    assert_eq!(r.driver.read(reg::VIRTIO_MMIO_QUEUE_READY), 0);
    assert_eq!(r.driver.transport.save().driver_features, 0);
    // And it can be brought up again.
    r.start(0);
}

#[test]
fn clearing_status_bits_without_reset_is_ignored() {
    let mut r = rig(DISK, false, false);
    r.start(0);
    r.driver
        .write(reg::VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    let status = r.driver.read(reg::VIRTIO_MMIO_STATUS);
    assert_eq!(
        status,
        VIRTIO_CONFIG_S_ACKNOWLEDGE
            | VIRTIO_CONFIG_S_DRIVER
            | VIRTIO_CONFIG_S_FEATURES_OK
            | VIRTIO_CONFIG_S_DRIVER_OK
    );
}

#[test]
fn interrupt_ack_clears_status_bits() {
    let r = rig(DISK, false, false);
    let mut d = r.driver;
    d.transport
        .interrupt
        .trigger(crate::virtio::InterruptCause::UsedBuffer)
        .unwrap();
    assert_eq!(d.read(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 1);
    assert_eq!(d.transport.interrupt_eventfd().read().unwrap(), 1);
    d.write(reg::VIRTIO_MMIO_INTERRUPT_ACK, 1);
    assert_eq!(d.read(reg::VIRTIO_MMIO_INTERRUPT_STATUS), 0);
}

#[test]
fn restore_refuses_a_state_for_another_device() {
    let r = rig(DISK, false, false);
    let mut state = r.driver.transport.save();
    state.device_type = 3;
    let memory = DeviceMemory::plain(r.mem.clone(), "other");
    let err = MmioTransport::restore(
        MmioRestoreArgs {
            device: r.block.clone(),
            memory: memory.clone(),
        },
        &state,
    )
    .err()
    .unwrap();
    assert!(matches!(err, MmioError::StateMismatch(_)), "{err}");
    let mut state = r.driver.transport.save();
    state.queues[0].size = 3;
    assert!(matches!(
        MmioTransport::restore(
            MmioRestoreArgs {
                device: r.block.clone(),
                memory
            },
            &state
        ),
        Err(MmioError::BadQueue { queue: 0, .. })
    ));
}
