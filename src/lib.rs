//! Veil as a library: boot a guest in a KVM VM from your own program.
//!
//! ```no_run
//! use std::sync::{Arc, Mutex};
//! # fn main() -> Result<(), veil::Error> {
//! let vm = veil::VmBuilder::new()
//!     .kernel(veil_guests::kit_elf_path())
//!     .cmdline("greet")
//!     .memory_bytes(64 << 20)
//!     .serial_writer(std::io::sink())
//!     .start()?;
//! let stop = vm.wait();
//! println!("guest stopped: {stop}");
//! # Ok(()) }
//! ```
//!
//! The handle pauses, resumes and stops the VM and gives access to guest memory; dropping it
//! stops the VM.

pub mod api;
mod builder;

pub use builder::{Error, SerialOutput, Vm, VmBuilder};
pub use veil_devices::SerialSink;
pub use veil_hypervisor::{RunState, VmStop};
