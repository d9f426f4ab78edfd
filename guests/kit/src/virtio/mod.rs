//! A polled virtio-mmio (version 2) driver core, and virtio-blk on top of it.
//!
//! The kit cannot take interrupts on the project's hosts (HOST-NOTES), so every driver here
//! polls: it submits a request, writes QueueNotify, and spins on the used ring with a TSC
//! deadline. Everything is tiny on purpose: the guest runs emulated, ~0.5 us an instruction
//! and ~0.6 us a memory access, so a request costs a few dozen of each.
//!
//! - `mmio`: the transport registers and the initialisation sequence (virtio 1.2 §3.1, §4.2.3).
//! - `queue`: one split virtqueue (§2.7), fixed three-descriptor chains, one per request slot.
//! - `dma`: the memory the device reads and writes (rings, request headers, data buffers),
//!   shared with the host first in an SEV guest, as Linux's swiotlb does.
//! - `blk`: virtio-blk requests (§5.2) and its config space.

pub mod blk;
pub mod dma;
pub mod mmio;
pub mod queue;

use crate::serial::{write_dec, write_hex, write_str};

/// How long a driver waits for the device (a reset to read back, a request to complete), in
/// TSC ticks: several seconds at any clock (the TSC runs at host speed even when the guest is
/// emulated), far above the milliseconds a request takes here.
const DEVICE_TIMEOUT_TSC: u64 = 20_000_000_000;

/// Why a device cannot be used or a request did not complete.
#[derive(Clone, Copy)]
pub enum Error {
    /// MagicValue is not "virt".
    NotVirtio(u32),
    /// Version 1: a legacy transport (QEMU: `-global virtio-mmio.force-legacy=false`).
    Legacy,
    /// A Version other than 1 or 2.
    Version(u32),
    /// DeviceID 0: the transport has no device behind it.
    NoDevice,
    /// Another kind of device (DeviceID).
    WrongDevice(u32),
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// An SEV guest's device must offer VIRTIO_F_ACCESS_PLATFORM (Linux refuses it otherwise).
    NoAccessPlatform,
    /// FEATURES_OK did not stick.
    FeaturesRefused,
    /// Status did not read back 0 after a reset.
    ResetTimeout,
    /// Queue 0 is absent (QueueNumMax 0) or already live (QueueReady 1).
    QueueUnavailable,
    /// QueueNumMax too small for one three-descriptor request.
    QueueTooSmall(u32),
    /// DEVICE_NEEDS_RESET after DRIVER_OK.
    NeedsReset,
    /// `KVM_HC_MAP_GPA_RANGE` refused to share the DMA area (its result).
    Share(u64),
    /// No used-ring entry before the deadline.
    Timeout,
    /// A used-ring entry naming a descriptor that is no request in flight.
    BadUsedId(u32),
    /// The device completed a request without writing its status byte.
    NoStatus,
}

impl Error {
    /// Writes a one-line description (no newline).
    pub fn write(self) {
        match self {
            Error::NotVirtio(magic) => {
                write_str("not a virtio-mmio device (magic ");
                write_hex(magic.into());
                write_str(")");
            }
            Error::Legacy => write_str(
                "legacy virtio-mmio (version 1) transport; the kit needs version 2 \
                 (QEMU: -global virtio-mmio.force-legacy=false)",
            ),
            Error::Version(v) => {
                write_str("unknown virtio-mmio version ");
                write_dec(v.into());
            }
            Error::NoDevice => write_str("no device behind this transport (device id 0)"),
            Error::WrongDevice(id) => {
                write_str("device id ");
                write_dec(id.into());
                write_str(", not a block device (2)");
            }
            Error::NoVersion1 => write_str("the device does not offer VIRTIO_F_VERSION_1"),
            Error::NoAccessPlatform => write_str(
                "the device does not offer VIRTIO_F_ACCESS_PLATFORM, which a guest with \
                 encrypted memory requires",
            ),
            Error::FeaturesRefused => write_str("the device refused the features (FEATURES_OK)"),
            Error::ResetTimeout => write_str("the device did not reset (status stays nonzero)"),
            Error::QueueUnavailable => write_str("queue 0 is absent or already in use"),
            Error::QueueTooSmall(n) => {
                write_str("queue 0 holds ");
                write_dec(n.into());
                write_str(" descriptors, fewer than one request needs (3)");
            }
            Error::NeedsReset => write_str("the device set DEVICE_NEEDS_RESET"),
            Error::Share(result) => {
                write_str("sharing the DMA area with KVM_HC_MAP_GPA_RANGE failed: ");
                write_hex(result);
            }
            Error::Timeout => write_str("no answer from the device (timed out)"),
            Error::BadUsedId(id) => {
                write_str("the device completed descriptor ");
                write_dec(id.into());
                write_str(", which is no request in flight");
            }
            Error::NoStatus => write_str("the device completed a request without a status"),
        }
    }
}
