//! The SEV firmware of a real AMD host.
//!
//! [`HardwareFirmware`] implements [`Firmware`](crate::firmware::Firmware) for one VM: platform
//! commands go to `/dev/sev` through the `sev` crate, guest commands to KVM as
//! `KVM_MEMORY_ENCRYPT_OP` on the VM's fd. At the trait level it answers as the emulated model
//! does (same status codes for unknown handles, bad lengths, flagged packets; the measurement
//! repeats), and its guest's memory really is encrypted. Where it differs, it is because the
//! hardware does: one guest per VM, a SEND/RECEIVE_UPDATE_DATA slice may not cross a 4 KiB page
//! of host memory, LAUNCH_UPDATE_DATA wants 16-byte alignment, and the certificate chain needs
//! the CEK as AMD signed it ([`HardwareFirmware::use_signed_cek`]).
//!
//! [`sev_cpuid`] gives the C-bit and address reduction the guest's CPUID must report.
//!
//! Nothing here can run on the development hosts (no SEV): the ioctl layer is tested against a
//! fake VM fd that answers like KVM and the firmware would.

mod cpuid;
mod firmware;
mod kvm;

#[cfg(test)]
mod fake;

pub use cpuid::{sev_cpuid, SevCpuid, CPUID_MEMORY_ENCRYPTION};
pub use firmware::{HardwareFirmware, SEV_DEVICE};
