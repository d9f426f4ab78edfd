//! VM-wide device state held by KVM: the in-kernel PIC, IOAPIC and PIT, and the kvmclock.

use kvm_bindings::{kvm_clock_data, kvm_irqchip, kvm_pit_state2};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// `KVM_IRQCHIP_PIC_MASTER`, `KVM_IRQCHIP_PIC_SLAVE`, `KVM_IRQCHIP_IOAPIC`.
const IRQCHIPS: [u32; 3] = [0, 1, 2];

/// A KVM call on VM-wide state failed.
#[derive(Debug, thiserror::Error)]
#[error("{what} failed")]
pub struct PlatformError {
    what: &'static str,
    #[source]
    source: kvm_ioctls::Error,
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> PlatformError {
    move |source| PlatformError { what, source }
}

/// The in-kernel interrupt controllers and timer.
#[derive(Clone, Serialize, Deserialize)]
pub struct InterruptControllers {
    pub irqchips: Vec<kvm_irqchip>,
    pub pit: kvm_pit_state2,
}

impl InterruptControllers {
    /// Reads them from KVM.
    pub fn save(vm: &VmFd) -> Result<Self, PlatformError> {
        let irqchips = IRQCHIPS
            .iter()
            .map(|&chip_id| {
                let mut chip = kvm_irqchip {
                    chip_id,
                    ..Default::default()
                };
                vm.get_irqchip(&mut chip)
                    .map_err(ioctl("KVM_GET_IRQCHIP"))?;
                Ok(chip)
            })
            .collect::<Result<_, _>>()?;
        let pit = vm.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?;
        Ok(Self { irqchips, pit })
    }

    /// Writes them back into KVM.
    pub fn restore(&self, vm: &VmFd) -> Result<(), PlatformError> {
        for chip in &self.irqchips {
            vm.set_irqchip(chip).map_err(ioctl("KVM_SET_IRQCHIP"))?;
        }
        vm.set_pit2(&self.pit).map_err(ioctl("KVM_SET_PIT2"))
    }
}

/// Everything VM-wide a migration carries besides memory and vCPUs.
#[derive(Clone, Serialize, Deserialize)]
pub struct PlatformState {
    pub interrupts: InterruptControllers,
    /// kvmclock, so guest time continues instead of jumping.
    pub clock: kvm_clock_data,
}

impl PlatformState {
    /// Reads the state of a paused VM.
    pub fn save(vm: &VmFd) -> Result<Self, PlatformError> {
        Ok(Self {
            interrupts: InterruptControllers::save(vm)?,
            clock: vm.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
        })
    }

    /// Writes it into a paused VM.
    pub fn restore(&self, vm: &VmFd) -> Result<(), PlatformError> {
        self.interrupts.restore(vm)?;
        // KVM accepts only the clock value and the realtime flag back.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            flags: 0,
            ..Default::default()
        };
        vm.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))
    }
}

impl std::fmt::Debug for PlatformState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}
