//! How a device tells the driver it has news: the InterruptStatus bits and an eventfd.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vmm_sys_util::eventfd::EventFd;

/// Why a device interrupts (virtio 1.2 §4.2.2, InterruptStatus).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptCause {
    /// The device used a buffer in at least one queue.
    UsedBuffer,
    /// The device's configuration space changed.
    ConfigChange,
}

impl InterruptCause {
    /// The InterruptStatus bit this cause sets.
    pub fn status_bit(self) -> u32 {
        match self {
            Self::UsedBuffer => VIRTIO_MMIO_INT_VRING,
            Self::ConfigChange => VIRTIO_MMIO_INT_CONFIG,
        }
    }
}

/// Errors raising an interrupt.
#[derive(Debug, thiserror::Error)]
pub enum InterruptError {
    /// The eventfd could not be created.
    #[error("Cannot create the interrupt eventfd")]
    Create(#[source] io::Error),
    /// The eventfd could not be signalled.
    #[error("Cannot signal the interrupt eventfd")]
    Signal(#[source] io::Error),
}

/// What a device holds to interrupt the driver.
pub trait Interrupt: Send + Sync {
    /// Records `cause` in the interrupt status and raises the interrupt.
    fn trigger(&self, cause: InterruptCause) -> Result<(), InterruptError>;
}

/// An interrupt line that is an eventfd: today read by whoever polls it, later a KVM irqfd
/// wired to the device's IRQ without any change here.
#[derive(Debug)]
pub struct EventFdInterrupt {
    status: AtomicU32,
    eventfd: EventFd,
}

impl EventFdInterrupt {
    /// A line with a fresh non-blocking eventfd and no cause pending.
    pub fn new() -> Result<Self, InterruptError> {
        Ok(Self {
            status: AtomicU32::new(0),
            eventfd: EventFd::new(libc::EFD_NONBLOCK).map_err(InterruptError::Create)?,
        })
    }

    /// The eventfd to register as the device's irqfd.
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    /// The driver's InterruptACK: clears `bits`.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Puts back a saved InterruptStatus (only the bits the spec defines).
    pub(crate) fn restore_status(&self, bits: u32) {
        self.status.store(
            bits & (VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG),
            Ordering::Release,
        );
    }
}

impl Interrupt for EventFdInterrupt {
    fn trigger(&self, cause: InterruptCause) -> Result<(), InterruptError> {
        // The bit first: a driver woken by the interrupt must find its cause.
        self.status.fetch_or(cause.status_bit(), Ordering::AcqRel);
        self.eventfd.write(1).map_err(InterruptError::Signal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_sets_status_and_signals() {
        let irq = EventFdInterrupt::new().unwrap();
        assert!(irq.eventfd().read().is_err(), "nothing pending yet");
        irq.trigger(InterruptCause::UsedBuffer).unwrap();
        irq.trigger(InterruptCause::ConfigChange).unwrap();
        assert_eq!(irq.status(), 0b11);
        assert_eq!(irq.eventfd().read().unwrap(), 2);
        irq.acknowledge(VIRTIO_MMIO_INT_VRING);
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_CONFIG);
    }
}
