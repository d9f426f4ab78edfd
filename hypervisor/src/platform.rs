//! VM-wide device state held by KVM: the in-kernel PIC, IOAPIC and PIT, and the kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CAP_ADJUST_CLOCK, KVM_CLOCK_REALTIME,
};
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
    /// The source's wall clock (CLOCK_REALTIME, ns) when `clock` was read: how the target
    /// accounts for the downtime where KVM_GET_CLOCK gave no `KVM_CLOCK_REALTIME`.
    #[serde(default)]
    pub saved_at_ns: Option<u64>,
}

/// Longest downtime added to a restored clock: a migration stops a guest for seconds, so a
/// larger gap between the two hosts' wall clocks says they disagree, not that time passed.
const MAX_DOWNTIME_NS: u64 = 24 * 3600 * 1_000_000_000;

fn wall_clock_ns() -> Option<u64> {
    let since_epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?;
    u64::try_from(since_epoch.as_nanos()).ok()
}

impl PlatformState {
    /// Reads the state of a paused VM.
    pub fn save(vm: &VmFd) -> Result<Self, PlatformError> {
        Ok(Self {
            interrupts: InterruptControllers::save(vm)?,
            clock: vm.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
            saved_at_ns: wall_clock_ns(),
        })
    }

    /// Writes it into a paused VM.
    pub fn restore(&self, vm: &VmFd) -> Result<(), PlatformError> {
        self.interrupts.restore(vm)?;
        let clock = clock_to_set(
            &self.clock,
            vm.check_extension_raw(KVM_CAP_ADJUST_CLOCK.into()),
            self.saved_at_ns.zip(wall_clock_ns()),
        );
        vm.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))
    }
}

/// What to give KVM_SET_CLOCK for a saved clock, where `adjust_clock` is what this host's
/// `KVM_CAP_ADJUST_CLOCK` reports (the flags KVM_SET_CLOCK takes). KVM takes only the clock
/// value and the realtime flag back. With `KVM_CLOCK_REALTIME` on both hosts, KVM adds the
/// wall-clock time elapsed since the source read the clock, so the guest's time covers the
/// downtime (for hosts whose wall clocks agree, e.g. by NTP). Without it (a source whose
/// kvmclock has no master clock gives no realtime), Veil adds the wall-clock time elapsed
/// between `saved_and_now` (the source's wall clock at the save and this host's now) itself,
/// up to [`MAX_DOWNTIME_NS`]; without either the guest's clock resumes where it stopped.
fn clock_to_set(
    saved: &kvm_clock_data,
    adjust_clock: i32,
    saved_and_now: Option<(u64, u64)>,
) -> kvm_clock_data {
    let realtime = saved.flags & KVM_CLOCK_REALTIME != 0
        && u32::try_from(adjust_clock).is_ok_and(|f| f & KVM_CLOCK_REALTIME != 0);
    let downtime = match saved_and_now {
        Some((saved_at, now)) if !realtime => now
            .checked_sub(saved_at)
            .filter(|&d| d <= MAX_DOWNTIME_NS)
            .unwrap_or(0),
        _ => 0,
    };
    kvm_clock_data {
        clock: saved.clock.saturating_add(downtime),
        flags: if realtime { KVM_CLOCK_REALTIME } else { 0 },
        realtime: if realtime { saved.realtime } else { 0 },
        ..Default::default()
    }
}

impl std::fmt::Debug for PlatformState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlatformState")
            .field("clock", &self.clock.clock)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_covers_the_downtime_where_both_hosts_offer_realtime() {
        let saved = kvm_clock_data {
            clock: 5_000,
            flags: KVM_CLOCK_REALTIME | kvm_bindings::KVM_CLOCK_TSC_STABLE,
            realtime: 1_700_000_000_000_000_000,
            host_tsc: 77,
            ..Default::default()
        };
        let set = clock_to_set(&saved, 0xe, Some((10, 20)));
        assert_eq!(
            (set.clock, set.flags, set.realtime, set.host_tsc),
            (5_000, KVM_CLOCK_REALTIME, saved.realtime, 0)
        );
        // A target KVM without it, or a source that could not give it: the value alone.
        for (flags, cap) in [(saved.flags, 0), (0, 0xe)] {
            let set = clock_to_set(&kvm_clock_data { flags, ..saved }, cap, None);
            assert_eq!((set.clock, set.flags, set.realtime), (5_000, 0, 0));
            // Veil adds the downtime itself, from the two wall clocks.
            let set = clock_to_set(&kvm_clock_data { flags, ..saved }, cap, Some((100, 350)));
            assert_eq!((set.clock, set.flags), (5_250, 0));
        }
        // Wall clocks that disagree (the target's behind, or a day apart) add nothing.
        for pair in [(350, 100), (0, MAX_DOWNTIME_NS + 1)] {
            let set = clock_to_set(&kvm_clock_data { flags: 0, ..saved }, 0xe, Some(pair));
            assert_eq!(set.clock, 5_000);
        }
    }
}

#[cfg(test)]
mod host_tests {
    /// What this host's kvmclock offers: where KVM_GET_CLOCK sets KVM_CLOCK_REALTIME, the
    /// target can account for the downtime.
    #[test]
    fn this_hosts_clock() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let clock = vm.get_clock().unwrap();
        println!(
            "this host: KVM_GET_CLOCK flags {:#x}, KVM_CAP_ADJUST_CLOCK {:#x}",
            clock.flags,
            vm.check_extension_raw(super::KVM_CAP_ADJUST_CLOCK.into())
        );
    }
}
