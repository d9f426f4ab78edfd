//! The virtio-mmio transport, version 2 only (virtio 1.2 §4.2.2).
//!
//! A 4 KiB window of 32-bit registers, then the device's configuration space at 0x100. The
//! guest cannot make it panic: accesses of the wrong size, to unknown offsets, or that the
//! current device status does not allow are logged and ignored.

use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio as reg;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::{
    Activation, DeviceMemory, EventFdInterrupt, Interrupt, InterruptError, VirtioDevice,
    VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use crate::persist::Persist;
use crate::BusDevice;

/// The size of one device's register window.
pub const MMIO_WINDOW_LEN: u64 = 0x1000;
/// Offset of QueueNotify in the window: where a KVM ioeventfd per queue goes, with the queue
/// index as its datamatch.
pub const QUEUE_NOTIFY_OFFSET: u64 = reg::VIRTIO_MMIO_QUEUE_NOTIFY as u64;

/// "virt" in little-endian (virtio 1.2 §4.2.2, MagicValue).
const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The non-legacy interface (virtio 1.2 §4.2.2, Version).
const MMIO_VERSION: u32 = 2;
/// "VEIL" in little-endian, the VendorID drivers may print.
const VEIL_VENDOR_ID: u32 = 0x4c49_4556;
/// Where the configuration space begins (virtio 1.2 §4.2.2, Config).
const CONFIG_OFFSET: u64 = reg::VIRTIO_MMIO_CONFIG as u64;

/// Registers by offset (virtio 1.2 §4.2.2, table "MMIO Device Register Layout").
const MAGIC_VALUE: u64 = reg::VIRTIO_MMIO_MAGIC_VALUE as u64;
const VERSION: u64 = reg::VIRTIO_MMIO_VERSION as u64;
const DEVICE_ID: u64 = reg::VIRTIO_MMIO_DEVICE_ID as u64;
const VENDOR_ID: u64 = reg::VIRTIO_MMIO_VENDOR_ID as u64;
const DEVICE_FEATURES: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES as u64;
const DEVICE_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
const DRIVER_FEATURES: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES as u64;
const DRIVER_FEATURES_SEL: u64 = reg::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
const QUEUE_SEL: u64 = reg::VIRTIO_MMIO_QUEUE_SEL as u64;
const QUEUE_NUM_MAX: u64 = reg::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
const QUEUE_NUM: u64 = reg::VIRTIO_MMIO_QUEUE_NUM as u64;
const QUEUE_READY: u64 = reg::VIRTIO_MMIO_QUEUE_READY as u64;
const QUEUE_NOTIFY: u64 = QUEUE_NOTIFY_OFFSET;
const INTERRUPT_STATUS: u64 = reg::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
const INTERRUPT_ACK: u64 = reg::VIRTIO_MMIO_INTERRUPT_ACK as u64;
const STATUS: u64 = reg::VIRTIO_MMIO_STATUS as u64;
const QUEUE_DESC_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
const QUEUE_DESC_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
const QUEUE_DRIVER_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
const QUEUE_DRIVER_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
const QUEUE_DEVICE_LOW: u64 = reg::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
const QUEUE_DEVICE_HIGH: u64 = reg::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
const SHM_SEL: u64 = reg::VIRTIO_MMIO_SHM_SEL as u64;
const SHM_LEN_LOW: u64 = reg::VIRTIO_MMIO_SHM_LEN_LOW as u64;
const SHM_BASE_HIGH: u64 = reg::VIRTIO_MMIO_SHM_BASE_HIGH as u64;
const CONFIG_GENERATION: u64 = reg::VIRTIO_MMIO_CONFIG_GENERATION as u64;

/// Errors creating or restoring a transport.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// A queue EventFd could not be duplicated for the transport.
    #[error("Cannot duplicate the notification eventfd of queue {queue}")]
    NotifyEventfd {
        queue: usize,
        #[source]
        source: std::io::Error,
    },
    /// The interrupt line could not be created.
    #[error("Cannot create the device's interrupt")]
    Interrupt(#[source] InterruptError),
    /// A saved state for a different device or queue layout.
    #[error("Saved transport state does not fit this device: {0}")]
    StateMismatch(String),
    /// A saved queue the queue implementation rejects.
    #[error("Saved state of queue {queue} is invalid")]
    BadQueue {
        queue: usize,
        #[source]
        source: virtio_queue::Error,
    },
    /// The restored device refused to activate.
    #[error("Cannot reactivate the restored device")]
    Activate(#[source] super::DeviceError),
}

/// One virtio device's register window.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    memory: DeviceMemory,
    interrupt: Arc<EventFdInterrupt>,
    notify: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
}

impl MmioTransport {
    /// A transport for `device`, reaching guest memory through `memory`; whether the guest's
    /// memory is encrypted decides the features it insists on.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        memory: DeviceMemory,
    ) -> Result<Self, MmioError> {
        let notify = lock(&device)
            .queue_events()
            .iter()
            .enumerate()
            .map(|(queue, evt)| {
                evt.try_clone()
                    .map_err(|source| MmioError::NotifyEventfd { queue, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            device,
            memory,
            interrupt: Arc::new(EventFdInterrupt::new().map_err(MmioError::Interrupt)?),
            notify,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
        })
    }

    /// The EventFds a QueueNotify write signals, in queue order: register each as a KVM
    /// ioeventfd at `base + QUEUE_NOTIFY_OFFSET` with its index as datamatch.
    pub fn notify_eventfds(&self) -> &[EventFd] {
        &self.notify
    }

    /// The device's interrupt eventfd, to register as its irqfd.
    pub fn interrupt_eventfd(&self) -> &EventFd {
        self.interrupt.eventfd()
    }

    /// The device status register (virtio 1.2 §2.1).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Accesses the guard refused for this device.
    pub fn refusals(&self) -> u64 {
        self.memory.refusals().get()
    }

    /// The device's configuration changed: drivers re-read it (virtio 1.2 §4.2.2,
    /// ConfigGeneration) and are told by interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Err(e) = self.interrupt.trigger(super::InterruptCause::ConfigChange) {
            tracing::warn!(error = %e, "Cannot signal a configuration change");
        }
    }

    /// All features offered: the device's and the transport's.
    fn offered_features(&self, device: &dyn VirtioDevice) -> u64 {
        let platform = if self.memory.is_encrypted() {
            VIRTIO_F_ACCESS_PLATFORM
        } else {
            0
        };
        device.features() | VIRTIO_F_VERSION_1 | platform
    }

    fn device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        lock(&self.device)
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device().device_type(),
            VENDOR_ID => VEIL_VENDOR_ID,
            DEVICE_FEATURES => {
                let features = self.offered_features(&*self.device());
                match self.device_features_sel {
                    0 => features as u32,
                    1 => (features >> 32) as u32,
                    _ => 0,
                }
            }
            QUEUE_NUM_MAX => self
                .device()
                .queues()
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            QUEUE_READY => self
                .device()
                .queues()
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status,
            // No shared memory regions: their length and base read as -1 (virtio 1.2 §4.2.2).
            SHM_LEN_LOW..=SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!(
                    offset = format_args!("{offset:#x}"),
                    "Read of a write-only or unknown virtio-mmio register"
                );
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH | QUEUE_READY => {
                self.write_queue_register(offset, value)
            }
            QUEUE_NOTIFY => self.notify_queue(value),
            INTERRUPT_ACK => self.interrupt.acknowledge(value),
            STATUS => self.write_status(value),
            SHM_SEL => {}
            _ => {
                tracing::debug!(
                    offset = format_args!("{offset:#x}"),
                    value,
                    "Write to a read-only or unknown virtio-mmio register"
                );
            }
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features are the driver's to choose only between DRIVER and FEATURES_OK
        // (virtio 1.2 §3.1.1).
        if self.status & (VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK)
            != VIRTIO_CONFIG_S_DRIVER
        {
            tracing::warn!(
                status = self.status,
                "DriverFeatures written outside feature negotiation"
            );
            return;
        }
        let value = u64::from(value);
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | value,
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (value << 32),
            sel => tracing::debug!(
                sel,
                "DriverFeatures written for a selector with no features"
            ),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 {
            tracing::warn!(
                offset = format_args!("{offset:#x}"),
                "Queue set up after DRIVER_OK"
            );
            return;
        }
        let sel = self.queue_sel as usize;
        let guarded = self.memory.guarded();
        let mut device = lock(&self.device);
        let Some(queue) = device.queues_mut().get_mut(sel) else {
            tracing::warn!(queue = sel, "Set-up of a queue the device does not have");
            return;
        };
        if queue.ready() && offset != QUEUE_READY {
            tracing::warn!(queue = sel, "Set-up of a queue that is already ready");
            return;
        }
        let result = match offset {
            QUEUE_NUM => u16::try_from(value)
                .map_err(|_| virtio_queue::Error::InvalidSize)
                .and_then(|size| queue.try_set_size(size)),
            QUEUE_DESC_LOW => queue.try_set_desc_table_address(set_low(queue.desc_table(), value)),
            QUEUE_DESC_HIGH => {
                queue.try_set_desc_table_address(set_high(queue.desc_table(), value))
            }
            QUEUE_DRIVER_LOW => {
                queue.try_set_avail_ring_address(set_low(queue.avail_ring(), value))
            }
            QUEUE_DRIVER_HIGH => {
                queue.try_set_avail_ring_address(set_high(queue.avail_ring(), value))
            }
            QUEUE_DEVICE_LOW => queue.try_set_used_ring_address(set_low(queue.used_ring(), value)),
            QUEUE_DEVICE_HIGH => {
                queue.try_set_used_ring_address(set_high(queue.used_ring(), value))
            }
            QUEUE_READY => {
                queue.set_ready(value == 1);
                // Ring areas outside guest memory, or in pages the guest has not shared,
                // leave the queue unready rather than fail later in the device.
                if queue.ready() && !queue.is_valid(&guarded) {
                    queue.set_ready(false);
                    Err(virtio_queue::Error::QueueNotReady)
                } else {
                    Ok(())
                }
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            tracing::warn!(queue = sel, offset = format_args!("{offset:#x}"), value, error = %e, "Refused queue set-up");
        }
    }

    fn notify_queue(&self, index: u32) {
        match self.notify.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    tracing::warn!(queue = index, error = %e, "Cannot signal a queue notification");
                }
            }
            None => tracing::debug!(
                queue = index,
                "Notification for a queue the device does not have"
            ),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if self.status & !value & !VIRTIO_CONFIG_S_NEEDS_RESET != 0 {
            tracing::warn!(
                from = self.status,
                to = value,
                "Driver cleared device status bits without a reset"
            );
            return;
        }
        let added = value & !self.status;
        // Bits in the order of the initialisation sequence (virtio 1.2 §3.1.1): each one only
        // counts once those before it are set.
        if added & VIRTIO_CONFIG_S_ACKNOWLEDGE != 0 {
            self.status |= VIRTIO_CONFIG_S_ACKNOWLEDGE;
        }
        if added & VIRTIO_CONFIG_S_DRIVER != 0 && self.status & VIRTIO_CONFIG_S_ACKNOWLEDGE != 0 {
            self.status |= VIRTIO_CONFIG_S_DRIVER;
        }
        if added & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_DRIVER != 0
            && self.features_acceptable()
        {
            self.status |= VIRTIO_CONFIG_S_FEATURES_OK;
        }
        if added & VIRTIO_CONFIG_S_DRIVER_OK != 0 && self.status & VIRTIO_CONFIG_S_FEATURES_OK != 0
        {
            self.activate();
        }
        if added & VIRTIO_CONFIG_S_FAILED != 0 {
            self.status |= VIRTIO_CONFIG_S_FAILED;
        }
    }

    /// Whether the driver's choice can be served; otherwise FEATURES_OK stays clear and the
    /// driver sees it has to give up (virtio 1.2 §3.1.1 step 6).
    fn features_acceptable(&self) -> bool {
        let offered = self.offered_features(&*self.device());
        let accepted = self.driver_features;
        let refusal = if accepted & !offered != 0 {
            Some("it accepted features the device did not offer")
        } else if accepted & VIRTIO_F_VERSION_1 == 0 {
            Some("a legacy driver (no VIRTIO_F_VERSION_1) on a version 2 transport")
        } else if self.memory.is_encrypted() && accepted & VIRTIO_F_ACCESS_PLATFORM == 0 {
            Some("a guest with encrypted memory must accept VIRTIO_F_ACCESS_PLATFORM")
        } else {
            None
        };
        if let Some(why) = refusal {
            tracing::warn!(
                device = self.memory.device_name(),
                offered = format_args!("{offered:#x}"),
                accepted = format_args!("{accepted:#x}"),
                "Refused FEATURES_OK: {why}"
            );
        }
        refusal.is_none()
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let activation = Activation {
            memory: self.memory.clone(),
            interrupt: self.interrupt.clone() as Arc<dyn Interrupt>,
            features: self.driver_features,
        };
        let mut device = lock(&self.device);
        for queue in device.queues_mut() {
            queue.set_event_idx(event_idx);
        }
        match device.activate(activation) {
            Ok(()) => self.status |= VIRTIO_CONFIG_S_DRIVER_OK,
            Err(e) => {
                tracing::warn!(device = self.memory.device_name(), error = %e, "Cannot activate the device");
                // The driver learns of NEEDS_RESET through a configuration change interrupt
                // (virtio 1.2 §2.1.2).
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                if let Err(e) = self.interrupt.trigger(super::InterruptCause::ConfigChange) {
                    tracing::warn!(error = %e, "Cannot signal NEEDS_RESET");
                }
            }
        }
    }

    fn reset(&mut self) {
        self.device().reset();
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.acknowledge(u32::MAX);
    }
}

fn set_low(addr: u64, low: u32) -> GuestAddress {
    GuestAddress((addr & !0xffff_ffff) | u64::from(low))
}

fn set_high(addr: u64, high: u32) -> GuestAddress {
    GuestAddress((addr & 0xffff_ffff) | (u64::from(high) << 32))
}

/// A device that panicked mid-access still holds the best state there is: keep serving it.
fn lock(device: &Mutex<dyn VirtioDevice>) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
    device
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            data.fill(0);
            self.device().read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset.is_multiple_of(4) => {
                *word = self.read_register(offset).to_le_bytes()
            }
            _ => {
                tracing::debug!(
                    offset = format_args!("{offset:#x}"),
                    len = data.len(),
                    "Misaligned or non-32-bit virtio-mmio read"
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device().write_config(offset - CONFIG_OFFSET, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset.is_multiple_of(4) => {
                self.write_register(offset, u32::from_le_bytes(word))
            }
            _ => {
                tracing::debug!(
                    offset = format_args!("{offset:#x}"),
                    len = data.len(),
                    "Misaligned or non-32-bit virtio-mmio write ignored"
                );
            }
        }
    }
}

/// A queue's configuration and position, as it travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    /// The size the driver chose.
    pub size: u16,
    /// Whether the driver made it ready.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Driver (available) ring address.
    pub avail_ring: u64,
    /// Device (used) ring address.
    pub used_ring: u64,
    /// Next available index the device will read.
    pub next_avail: u16,
    /// Next used index the device will write.
    pub next_used: u16,
    /// Whether EVENT_IDX suppression is on.
    pub event_idx: bool,
}

impl QueueConfig {
    fn of(queue: &Queue) -> Self {
        let s = queue.state();
        Self {
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }

    fn to_queue(self, max_size: u16) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// The transport's saved state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MmioState {
    /// The virtio device ID, checked on restore.
    pub device_type: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// The device status.
    pub status: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Each queue in order.
    pub queues: Vec<QueueConfig>,
}

/// What restoring a transport needs from the restoring side.
pub struct MmioRestoreArgs {
    /// The device, already restored from its own state.
    pub device: Arc<Mutex<dyn VirtioDevice>>,
    /// Guest memory behind the device's guard.
    pub memory: DeviceMemory,
}

impl Persist for MmioTransport {
    type State = MmioState;
    type ConstructorArgs = MmioRestoreArgs;
    type Error = MmioError;

    fn save(&self) -> MmioState {
        let device = self.device();
        MmioState {
            device_type: device.device_type(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            status: self.status,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            queues: device.queues().iter().map(QueueConfig::of).collect(),
        }
    }

    fn restore(args: MmioRestoreArgs, state: &MmioState) -> Result<Self, MmioError> {
        let mut transport = Self::new(args.device, args.memory)?;
        {
            let mut device = transport.device();
            if device.device_type() != state.device_type {
                return Err(MmioError::StateMismatch(format!(
                    "state of device type {}, device of type {}",
                    state.device_type,
                    device.device_type()
                )));
            }
            if device.queues().len() != state.queues.len() {
                return Err(MmioError::StateMismatch(format!(
                    "{} saved queues, the device has {}",
                    state.queues.len(),
                    device.queues().len()
                )));
            }
            for (index, (queue, saved)) in device
                .queues_mut()
                .iter_mut()
                .zip(&state.queues)
                .enumerate()
            {
                *queue =
                    saved
                        .to_queue(queue.max_size())
                        .map_err(|source| MmioError::BadQueue {
                            queue: index,
                            source,
                        })?;
            }
        }
        transport.device_features_sel = state.device_features_sel;
        transport.driver_features_sel = state.driver_features_sel;
        transport.driver_features = state.driver_features;
        transport.queue_sel = state.queue_sel;
        transport.config_generation = state.config_generation;
        transport.interrupt.restore_status(state.interrupt_status);
        transport.status = state.status;
        if state.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && state.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0
        {
            let activation = Activation {
                memory: transport.memory.clone(),
                interrupt: transport.interrupt.clone() as Arc<dyn Interrupt>,
                features: state.driver_features,
            };
            transport
                .device()
                .activate(activation)
                .map_err(MmioError::Activate)?;
            // A notification or an interrupt may have been lost in the move: look at every
            // queue again, and raise the line again for a cause the driver has not handled.
            for index in 0..transport.notify.len() {
                transport.notify_queue(index as u32);
            }
            if state.interrupt_status != 0 {
                if let Err(e) = transport.interrupt.eventfd().write(1) {
                    tracing::warn!(error = %e, "Cannot raise the restored device's interrupt");
                }
            }
        }
        Ok(transport)
    }
}

#[cfg(test)]
mod tests;
