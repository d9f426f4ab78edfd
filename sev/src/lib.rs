//! The AMD SEV platform as Veil uses it: launch, send and receive through either the hardware
//! firmware or a software model of it.
//!
//! So far: the firmware's transport cryptography ([`crypto`]), the firmware interface
//! ([`firmware::Firmware`]) and its software model ([`emulated`]). The hardware backend and the
//! launch flow in the VMM are still to come.

pub mod crypto;
pub mod emulated;
pub mod firmware;
pub mod flow;
pub mod guest_memory;
pub mod hardware;
pub mod policy;
