//! Veil's KVM core: guest memory, vCPUs, boot, exit dispatch, and the host probe.
//!
//! Upper layers (the `veil` crate, migration, SEV) build a [`Vm`] from a [`VmConfig`], hand it
//! the devices and handlers of an [`ExitHandlers`], and get back a [`RunningVm`] to pause,
//! resume, inspect and stop.

pub mod boot;
pub mod control;
pub mod cpuid;
pub mod devices;
pub mod exits;
pub mod host;
pub mod layout;
pub mod memory;
pub mod paravirt;
pub mod platform;
pub mod power_on;
pub mod probe;
pub mod vcpu;
pub mod vm;

pub use boot::BootConfig;
pub use control::{RunState, VmControl, VmStop};
pub use exits::{ExitHandlers, FaultReport, HypercallHandler, MsrHandler};
pub use memory::{GuestMemory, GuestRam, MemoryConfig};
pub use vm::{RunningVm, Vm, VmConfig, VmError, VmSetup};
