//! Opening `/dev/kvm` with errors that tell the operator what to do.

use std::io;

use kvm_ioctls::Kvm;

/// The KVM device.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Why KVM cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// No /dev/kvm.
    #[error("{KVM_DEVICE} does not exist: this host has no KVM (load the kvm module, or enable virtualisation in the firmware)")]
    NoKvm(#[source] io::Error),
    /// /dev/kvm exists but may not be opened.
    #[error(
        "Permission denied opening {KVM_DEVICE}: run as root or add this user to the kvm group"
    )]
    KvmPermission(#[source] io::Error),
    /// Any other failure to open it.
    #[error("Cannot open {KVM_DEVICE}")]
    OpenKvm(#[source] io::Error),
    /// A KVM too old for Veil.
    #[error("KVM API version {found} is not supported (Veil needs {KVM_API_VERSION})")]
    ApiVersion { found: i32 },
}

/// The stable KVM API version.
pub const KVM_API_VERSION: i32 = 12;

/// Opens `/dev/kvm` and checks its API version.
pub fn open_kvm() -> Result<Kvm, HostError> {
    let kvm = Kvm::new().map_err(|e| {
        let err = io::Error::from_raw_os_error(e.errno());
        match e.errno() {
            libc::ENOENT | libc::ENXIO | libc::ENODEV => HostError::NoKvm(err),
            libc::EACCES | libc::EPERM => HostError::KvmPermission(err),
            _ => HostError::OpenKvm(err),
        }
    })?;
    match kvm.get_api_version() {
        KVM_API_VERSION => Ok(kvm),
        found => Err(HostError::ApiVersion { found }),
    }
}
