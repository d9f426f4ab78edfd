//! The machine as it was at power-on, kept so a guest-requested reset can return to it.

use kvm_ioctls::VmFd;

use crate::platform::{InterruptControllers, PlatformError};
use crate::vcpu::{RestoreWith, Vcpu, VcpuState, VcpuStateError};

/// Errors capturing or restoring power-on state.
#[derive(Debug, thiserror::Error)]
pub enum PowerOnError {
    #[error("Cannot save or restore vCPU {vcpu}")]
    Vcpu {
        vcpu: u32,
        #[source]
        source: VcpuStateError,
    },
    #[error("Cannot save or restore the interrupt controllers")]
    Platform(#[from] PlatformError),
}

/// vCPU, interrupt-controller and timer state at power-on.
pub struct PowerOnState {
    vcpus: Vec<VcpuState>,
    interrupts: InterruptControllers,
}

impl PowerOnState {
    /// Captures the state of a VM that has not run yet.
    pub fn capture(vm: &VmFd, vcpus: &[Vcpu], msr_indices: &[u32]) -> Result<Self, PowerOnError> {
        let vcpus = vcpus
            .iter()
            .map(|v| {
                VcpuState::save(&v.fd, msr_indices, true)
                    .map_err(|source| PowerOnError::Vcpu { vcpu: v.id, source })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            vcpus,
            interrupts: InterruptControllers::save(vm)?,
        })
    }

    /// Puts the interrupt controllers and timer back.
    pub fn restore_platform(&self, vm: &VmFd) -> Result<(), PowerOnError> {
        Ok(self.interrupts.restore(vm)?)
    }

    /// Puts one vCPU back (it must not be running).
    pub fn restore_vcpu(&self, vcpu: &Vcpu) -> Result<(), PowerOnError> {
        self.vcpus[vcpu.id as usize]
            .restore(&vcpu.fd, RestoreWith::default())
            .map_err(|source| PowerOnError::Vcpu {
                vcpu: vcpu.id,
                source,
            })
    }
}
