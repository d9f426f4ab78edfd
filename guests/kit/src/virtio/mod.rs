//! A polled virtio-mmio (version 2) driver core, and virtio-blk, virtio-console and
//! virtio-vsock on top of it.
//!
//! The kit cannot take interrupts on the project's hosts (HOST-NOTES), so every driver here
//! polls: it submits a request, writes QueueNotify, and spins on the used ring with a TSC
//! deadline. Everything is tiny on purpose: the guest runs emulated, ~0.5 us an instruction
//! and ~0.6 us a memory access, so a request costs a few dozen of each.
//!
//! - `mmio`: the transport registers and the initialisation sequence (virtio 1.2 §3.1, §4.2.3).
//! - `queue`: one split virtqueue (§2.7); the drivers lay out their own chains.
//! - `dma`: the memory the devices read and write (rings, request headers, data buffers),
//!   shared with the host first in an SEV guest, as Linux's swiotlb does.
//! - `blk`: virtio-blk requests (§5.2) and its config space.
//! - `console`: virtio-console's port 0 (§5.3), without multiport.
//! - `vsock`: virtio-vsock packets (§5.10); the connections are the tasks' business.

pub mod blk;
pub mod console;
pub mod dma;
pub mod mmio;
pub mod queue;
pub mod vsock;

use crate::serial::{write_dec, write_hex, write_str};

/// How long a driver waits for the device (a reset to read back, a request to complete), in
/// TSC ticks: several seconds at any clock (the TSC runs at host speed even when the guest is
/// emulated), far above the milliseconds a request takes here.
const DEVICE_TIMEOUT_TSC: u64 = 20_000_000_000;

/// How long a task waits for the other side (console input, a vsock peer's connection, data or
/// credit), in TSC ticks: about a minute, so a host test has time to start its side, but a
/// guest nobody talks to still stops with an error instead of spinning forever.
pub const PEER_TIMEOUT_TSC: u64 = 150_000_000_000;

// Device IDs (virtio 1.2 §5).
/// A block device (§5.2).
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// A console (§5.3).
pub const VIRTIO_ID_CONSOLE: u32 = 3;
/// A socket device, virtio-vsock (§5.10).
pub const VIRTIO_ID_VSOCK: u32 = 19;

/// What a device ID names, for messages.
fn device_name(id: u32) -> &'static str {
    match id {
        VIRTIO_ID_BLOCK => "block device",
        VIRTIO_ID_CONSOLE => "console",
        VIRTIO_ID_VSOCK => "socket device",
        _ => "known device",
    }
}

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
    /// Another kind of device (DeviceID) than the driver's.
    WrongDevice { found: u32, expected: u32 },
    /// The device does not offer VIRTIO_F_VERSION_1.
    NoVersion1,
    /// An SEV guest's device must offer VIRTIO_F_ACCESS_PLATFORM (Linux refuses it otherwise).
    NoAccessPlatform,
    /// FEATURES_OK did not stick.
    FeaturesRefused,
    /// Status did not read back 0 after a reset.
    ResetTimeout,
    /// The queue is absent (QueueNumMax 0) or already live (QueueReady 1).
    QueueUnavailable(u32),
    /// QueueNumMax too small for what the driver lays out in the queue.
    QueueTooSmall { queue: u32, max: u32, needed: u32 },
    /// DEVICE_NEEDS_RESET after DRIVER_OK.
    NeedsReset,
    /// `KVM_HC_MAP_GPA_RANGE` refused to share the DMA area (its result).
    Share(u64),
    /// No page table was left to map the DMA area with 4 KiB pages.
    Split,
    /// No used-ring entry before the deadline.
    Timeout,
    /// A used-ring entry naming a descriptor that is no request in flight.
    BadUsedId(u32),
    /// The device completed a request without writing its status byte.
    NoStatus,
    /// A vsock packet shorter than its header or longer than its buffer, or with a payload
    /// longer than what the device wrote (the bytes it says it wrote).
    BadPacket(u32),
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
            Error::WrongDevice { found, expected } => {
                write_str("device id ");
                write_dec(found.into());
                write_str(", not a ");
                write_str(device_name(expected));
                write_str(" (");
                write_dec(expected.into());
                write_str(")");
            }
            Error::NoVersion1 => write_str("the device does not offer VIRTIO_F_VERSION_1"),
            Error::NoAccessPlatform => write_str(
                "the device does not offer VIRTIO_F_ACCESS_PLATFORM, which a guest with \
                 encrypted memory requires",
            ),
            Error::FeaturesRefused => write_str("the device refused the features (FEATURES_OK)"),
            Error::ResetTimeout => write_str("the device did not reset (status stays nonzero)"),
            Error::QueueUnavailable(queue) => {
                write_str("queue ");
                write_dec(queue.into());
                write_str(" is absent or already in use");
            }
            Error::QueueTooSmall { queue, max, needed } => {
                write_str("queue ");
                write_dec(queue.into());
                write_str(" holds ");
                write_dec(max.into());
                write_str(" descriptors, fewer than the driver needs (");
                write_dec(needed.into());
                write_str(")");
            }
            Error::NeedsReset => write_str("the device set DEVICE_NEEDS_RESET"),
            Error::Share(result) => {
                write_str("sharing the DMA area with KVM_HC_MAP_GPA_RANGE failed: ");
                write_hex(result);
            }
            Error::Split => write_str("no page table left to map the DMA area with 4 KiB pages"),
            Error::Timeout => write_str("no answer from the device (timed out)"),
            Error::BadUsedId(id) => {
                write_str("the device completed descriptor ");
                write_dec(id.into());
                write_str(", which is no request in flight");
            }
            Error::NoStatus => write_str("the device completed a request without a status"),
            Error::BadPacket(written) => {
                write_str("the device delivered a malformed packet (");
                write_dec(written.into());
                write_str(" bytes written)");
            }
        }
    }
}
