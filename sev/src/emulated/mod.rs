//! A software model of the AMD SEV firmware, for hosts without SEV.
//!
//! It implements the platform and guest state machines, the key hierarchy and every command
//! Veil uses with the firmware's exact crypto and formats, so the whole SEV flow (launch,
//! measurement, secret injection, send, receive) can run and be tested anywhere. It gives no
//! confidentiality: the guest's memory is not encrypted.

pub mod firmware;
pub mod identity;
