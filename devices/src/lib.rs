//! Device models for Veil guests.
//!
//! Devices sit on a [`Bus`] (one for port I/O, one for MMIO) and see only offsets and bytes;
//! the hypervisor crate routes guest exits to the buses. Virtio devices ([`virtio`]) sit on the
//! MMIO bus behind a virtio-mmio transport and run on an `event-manager` loop. Nothing here
//! knows about KVM.

pub mod bus;
pub mod exit_port;
pub mod host_console;
pub mod persist;
pub mod reset;
pub mod serial;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError};
pub use exit_port::ExitPort;
pub use reset::ResetPort;
pub use serial::{Serial, SerialSink};
