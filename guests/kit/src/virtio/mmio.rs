//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2): its registers and the driver's
//! initialisation sequence (§3.1.1, §4.2.3).

use super::{dma, queue::SplitQueue, Error, DEVICE_TIMEOUT_TSC};
use crate::{arch, paging};

// Register offsets (§4.2.2, "MMIO Device Register Layout"). All 32 bits wide.
const MAGIC_VALUE: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const CONFIG_GENERATION: u64 = 0x0fc;
/// Device-specific configuration space starts here.
const CONFIG: u64 = 0x100;

/// MagicValue: "virt" little-endian.
const MAGIC: u32 = 0x7472_6976;

// Device status bits (§2.1).
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const DEVICE_NEEDS_RESET: u32 = 64;
const FAILED: u32 = 128;

/// VIRTIO_F_VERSION_1 (§6): a modern device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// VIRTIO_F_ACCESS_PLATFORM (§6): the device reaches memory through the platform's rules
/// (for SEV: only shared pages).
pub const VIRTIO_F_ACCESS_PLATFORM: u64 = 1 << 33;

/// One device's register window, mapped uncached.
pub struct Transport {
    base: u64,
}

impl Transport {
    #[inline(always)]
    fn read(&self, reg: u64) -> u32 {
        // SAFETY: `base` is a virtio-mmio window the command line named, inside 3..4 GiB and
        // mapped uncached by `paging::map_mmio`; a 32-bit aligned access is what the transport
        // requires (§4.2.2.2) and touches no memory the compiler knows.
        unsafe { ((self.base + reg) as *const u32).read_volatile() }
    }

    #[inline(always)]
    fn write(&self, reg: u64, value: u32) {
        // SAFETY: as in `read`.
        unsafe { ((self.base + reg) as *mut u32).write_volatile(value) }
    }

    fn write64(&self, low: u64, high: u64, value: u64) {
        self.write(low, value as u32);
        self.write(high, (value >> 32) as u32);
    }

    /// Tells the device queue `queue` has new buffers (§4.2.3.3).
    #[inline(always)]
    pub fn notify(&self, queue: u32) {
        self.write(QUEUE_NOTIFY, queue);
    }

    /// Reads InterruptStatus and acknowledges what it says (§4.2.2): the device lowers its
    /// line. Bit 0 is a used-buffer notification, bit 1 a configuration change.
    pub fn take_interrupt_status(&self) -> u32 {
        let status = self.read(INTERRUPT_STATUS);
        self.write(INTERRUPT_ACK, status);
        status
    }

    /// A 64-bit field of the config space; 64-bit fields are read as two of these under the
    /// same ConfigGeneration (§4.2.2.2, §2.5.1).
    pub fn config_read64(&self, offset: u64) -> u64 {
        // A device that keeps changing its config space gets a few tries, not a hang.
        let mut value = 0;
        for _ in 0..8 {
            let generation = self.read(CONFIG_GENERATION);
            let low = self.read(CONFIG + offset);
            let high = self.read(CONFIG + offset + 4);
            value = u64::from(low) | (u64::from(high) << 32);
            if self.read(CONFIG_GENERATION) == generation {
                break;
            }
        }
        value
    }

    /// Writes 0 to Status and waits for it to read back 0 (§2.4.2): the device forgets the
    /// queue and its addresses, so nothing of a finished task stays live in the DMA area.
    pub fn reset(&self) -> Result<(), Error> {
        self.write(STATUS, 0);
        let deadline = arch::rdtsc() + DEVICE_TIMEOUT_TSC;
        while self.read(STATUS) != 0 {
            if arch::rdtsc() > deadline {
                return Err(Error::ResetTimeout);
            }
            arch::pause();
        }
        Ok(())
    }
}

/// A device after DRIVER_OK: its transport, the features both sides agreed on, and its first
/// `Q` queues.
pub struct Device<const Q: usize> {
    pub transport: Transport,
    pub features: u64,
    pub queues: [SplitQueue; Q],
}

/// Brings up the device at `base..base + size` (§3.1.1): checks the magic, version 2 and
/// `device_id`, resets it, negotiates features (VERSION_1 required; ACCESS_PLATFORM taken
/// when offered, and required with encrypted memory, as Linux does; plus those of `wanted`
/// the device offers), sets up queues `0..Q` in the DMA area (shared with the host first in
/// an SEV guest), each with at least `min_sizes[q]` descriptors, and sets DRIVER_OK. On failure
/// after the reset the device is left FAILED.
pub fn init<const Q: usize>(
    base: u64,
    size: u64,
    device_id: u32,
    wanted: u64,
    min_sizes: [u16; Q],
) -> Result<Device<Q>, Error> {
    paging::map_mmio(base, size);
    let transport = Transport { base };
    let magic = transport.read(MAGIC_VALUE);
    if magic != MAGIC {
        return Err(Error::NotVirtio(magic));
    }
    match transport.read(VERSION) {
        2 => {}
        1 => return Err(Error::Legacy),
        v => return Err(Error::Version(v)),
    }
    match transport.read(DEVICE_ID) {
        id if id == device_id => {}
        0 => return Err(Error::NoDevice),
        found => {
            return Err(Error::WrongDevice {
                found,
                expected: device_id,
            })
        }
    }
    transport.reset()?;
    let result = negotiate(&transport, wanted, min_sizes);
    if result.is_err() {
        transport.write(STATUS, transport.read(STATUS) | FAILED);
    }
    let (features, queues) = result?;
    Ok(Device {
        transport,
        features,
        queues,
    })
}

fn negotiate<const Q: usize>(
    t: &Transport,
    wanted: u64,
    min_sizes: [u16; Q],
) -> Result<(u64, [SplitQueue; Q]), Error> {
    let mut status = ACKNOWLEDGE;
    t.write(STATUS, status);
    status |= DRIVER;
    t.write(STATUS, status);

    t.write(DEVICE_FEATURES_SEL, 0);
    let low = t.read(DEVICE_FEATURES);
    t.write(DEVICE_FEATURES_SEL, 1);
    let offered = u64::from(low) | (u64::from(t.read(DEVICE_FEATURES)) << 32);
    if offered & VIRTIO_F_VERSION_1 == 0 {
        return Err(Error::NoVersion1);
    }
    let encrypted = crate::paravirt::memory_encryption_c_bit().is_some();
    if encrypted && offered & VIRTIO_F_ACCESS_PLATFORM == 0 {
        return Err(Error::NoAccessPlatform);
    }
    let features = offered & (wanted | VIRTIO_F_VERSION_1 | VIRTIO_F_ACCESS_PLATFORM);
    t.write(DRIVER_FEATURES_SEL, 0);
    t.write(DRIVER_FEATURES, features as u32);
    t.write(DRIVER_FEATURES_SEL, 1);
    t.write(DRIVER_FEATURES, (features >> 32) as u32);
    status |= FEATURES_OK;
    t.write(STATUS, status);
    if t.read(STATUS) & FEATURES_OK == 0 {
        return Err(Error::FeaturesRefused);
    }

    dma::share_with_host()?;
    let mut ready = [const { None }; Q];
    for (index, slot) in ready.iter_mut().enumerate() {
        *slot = Some(setup_queue(t, index, min_sizes[index])?);
    }
    let queues = ready.map(|q| q.expect("every queue was set up"));

    status |= DRIVER_OK;
    t.write(STATUS, status);
    if t.read(STATUS) & DEVICE_NEEDS_RESET != 0 {
        return Err(Error::NeedsReset);
    }
    Ok((features, queues))
}

/// Queue `index` (§4.2.3.2): the largest power of 2 both sides can hold (split queues are
/// powers of 2, §2.7), at least `min` descriptors.
fn setup_queue(t: &Transport, index: usize, min: u16) -> Result<SplitQueue, Error> {
    t.write(QUEUE_SEL, index as u32);
    let max = t.read(QUEUE_NUM_MAX);
    if max == 0 || t.read(QUEUE_READY) != 0 {
        return Err(Error::QueueUnavailable(index as u32));
    }
    let limit = max.min(dma::QUEUE_MAX as u32);
    let size = 1u32 << (31 - limit.leading_zeros());
    if size < u32::from(min) {
        return Err(Error::QueueTooSmall {
            queue: index as u32,
            max,
            needed: min.into(),
        });
    }
    let queue = SplitQueue::new(index, size as u16);
    t.write(QUEUE_NUM, size);
    let (desc, avail, used) = queue.addresses();
    t.write64(QUEUE_DESC_LOW, QUEUE_DESC_HIGH, desc);
    t.write64(QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH, avail);
    t.write64(QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH, used);
    t.write(QUEUE_READY, 1);
    Ok(queue)
}
