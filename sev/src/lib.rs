//! The AMD SEV platform as Veil uses it: launch, send and receive through either the hardware
//! firmware or a software model of it.
//!
//! So far: the firmware's transport cryptography ([`crypto`]), checked against the reference
//! vectors. The firmware interface, both backends and the launch flow are still to come.

pub mod crypto;
