//! Veil as a library: boot a guest in a KVM VM from your own program.
//!
//! ```no_run
//! # fn main() -> Result<(), veil::Error> {
//! let output = veil::CapturedOutput::new();
//! let vm = veil::VmBuilder::new()
//!     .kernel(veil_guests::kit_elf_path())
//!     .cmdline("greet")
//!     .memory_bytes(64 << 20)
//!     .serial_writer(output.clone())
//!     .start()?;
//! let stop = vm.wait();
//! println!("guest said {:?} and stopped: {stop}", output.text());
//! # Ok(()) }
//! ```
//!
//! The handle pauses, resumes and stops the VM and gives access to guest memory; dropping it
//! stops the VM.

pub mod api;
mod builder;
mod capture;
mod incoming;
pub mod migration;
pub mod sev_bench;
pub mod sev_chain;
pub mod sev_launch;
pub mod sev_owner;
mod snapshot;
pub use snapshot::RestoreOptions;

pub use builder::{Error, ReceiveGuest, SerialOutput, SevGuest, Vm, VmBuilder, VsockConnectError};
pub use capture::CapturedOutput;
pub use incoming::{check_incoming, check_incoming_as};
pub use veil_devices::virtio::block::BlockConfig as DiskConfig;
pub use veil_devices::virtio::console::ConsoleBackend;
pub use veil_devices::virtio::vsock::{GuestConnection, VsockConfig};
pub use veil_devices::SerialSink;
pub use veil_hypervisor::{RunState, VmStop};
pub use veil_migration::snapshot::{AfterSnapshot, SnapshotError, SnapshotReport};

pub use veil_migration::error_chain;
/// Per-thread seccomp filters (docs/seccomp.md).
pub use veil_seccomp::{Confinement, SeccompMode, ThreadKind};
