//! The machine as it was at power-on, kept so a guest-requested reset can return to it.

use kvm_bindings::{kvm_irqchip, kvm_pit_state2};
use kvm_ioctls::VmFd;

use crate::vcpu::{Vcpu, VcpuState, VcpuStateError};

/// `KVM_IRQCHIP_PIC_MASTER`, `KVM_IRQCHIP_PIC_SLAVE`, `KVM_IRQCHIP_IOAPIC`.
const IRQCHIPS: [u32; 3] = [0, 1, 2];

/// Errors capturing or restoring power-on state.
#[derive(Debug, thiserror::Error)]
pub enum PowerOnError {
    #[error("Cannot save or restore vCPU {vcpu}")]
    Vcpu {
        vcpu: u32,
        #[source]
        source: VcpuStateError,
    },
    #[error("Cannot save or restore the interrupt controllers: {what} failed")]
    Irqchip {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// vCPU, interrupt-controller and timer state at power-on.
pub struct PowerOnState {
    vcpus: Vec<VcpuState>,
    irqchips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
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
        let irqchips = IRQCHIPS
            .iter()
            .map(|&chip_id| {
                let mut chip = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                vm.get_irqchip(&mut chip)
                    .map_err(|source| PowerOnError::Irqchip {
                        what: "KVM_GET_IRQCHIP",
                        source,
                    })?;
                Ok(chip)
            })
            .collect::<Result<_, _>>()?;
        let pit = vm.get_pit2().map_err(|source| PowerOnError::Irqchip {
            what: "KVM_GET_PIT2",
            source,
        })?;
        Ok(Self {
            vcpus,
            irqchips,
            pit,
        })
    }

    /// Puts the interrupt controllers and timer back.
    pub fn restore_platform(&self, vm: &VmFd) -> Result<(), PowerOnError> {
        for chip in &self.irqchips {
            vm.set_irqchip(chip)
                .map_err(|source| PowerOnError::Irqchip {
                    what: "KVM_SET_IRQCHIP",
                    source,
                })?;
        }
        vm.set_pit2(&self.pit)
            .map_err(|source| PowerOnError::Irqchip {
                what: "KVM_SET_PIT2",
                source,
            })
    }

    /// Puts one vCPU back (it must not be running).
    pub fn restore_vcpu(&self, vcpu: &Vcpu) -> Result<(), PowerOnError> {
        self.vcpus[vcpu.id as usize]
            .restore(&vcpu.fd)
            .map_err(|source| PowerOnError::Vcpu {
                vcpu: vcpu.id,
                source,
            })
    }
}
