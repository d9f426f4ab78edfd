//! The guest's TSC rate across a migration.
//!
//! KVM passes the host's invariant-TSC bit (CPUID 0x80000007 EDX bit 8) through; a guest
//! given it (Linux, then) trusts the TSC as a clocksource at the rate it measured at boot. On
//! a target whose TSC runs at another rate the guest's clock and delays would run wrong, so
//! the rate travels with the vCPU (`KVM_GET_TSC_KHZ`), and the target either scales its TSC to
//! it (`KVM_SET_TSC_KHZ`, where KVM offers `KVM_CAP_TSC_CONTROL`) or refuses such a guest. A
//! guest without invariant TSC recalibrates through kvmclock and is taken at any rate (as
//! QEMU does).

use kvm_ioctls::{Cap, Kvm};

use crate::cpuid::Cpuid;

/// CPUID leaf holding "advanced power management" flags (AMD APM vol. 3, appendix E.4.6;
/// Intel SDM vol. 2A, CPUID).
pub const CPUID_EXT_APM: u32 = 0x8000_0007;
/// Its EDX bit 8: the TSC runs at a constant rate in every state (invariant TSC).
pub const CPUID_APM_EDX_INVARIANT_TSC: u32 = 1 << 8;

/// KVM's own tolerance: rates within 250 ppm count as equal (the kernel's
/// `tsc_tolerance_ppm`, arch/x86/kvm/x86.c), so they need no scaling.
pub const TSC_TOLERANCE_PPM: u64 = 250;

/// For tests only: a target started with this variable set pretends its TSC runs at that
/// many kHz and that KVM cannot scale TSCs, so the refusal of an invariant-TSC guest can be
/// tested on a host that does not offer scaling.
pub const PRETEND_TSC_KHZ_VAR: &str = "VEIL_TEST_PRETEND_TSC_KHZ";

/// What this host can do about TSC rates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostTsc {
    /// This host's TSC rate for a new vCPU, if KVM tells it.
    pub khz: Option<u32>,
    /// `KVM_CAP_TSC_CONTROL`: KVM_SET_TSC_KHZ works.
    pub can_scale: bool,
}

impl HostTsc {
    /// Asks KVM (or takes [`PRETEND_TSC_KHZ_VAR`]); `vcpu_khz` is what KVM_GET_TSC_KHZ gives a
    /// vCPU of this host that was never scaled.
    pub fn probe(kvm: &Kvm, vcpu_khz: Option<u32>) -> Self {
        if let Some(khz) = std::env::var(PRETEND_TSC_KHZ_VAR)
            .ok()
            .and_then(|v| v.parse().ok())
        {
            return Self {
                khz: Some(khz),
                can_scale: false,
            };
        }
        Self {
            khz: vcpu_khz,
            can_scale: kvm.check_extension(Cap::TscControl),
        }
    }
}

/// What to do with an incoming vCPU's TSC rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscPlan {
    /// Leave the vCPU at this host's rate: the same (within KVM's tolerance), unknown, or
    /// a guest that does not rely on it.
    HostRate,
    /// `KVM_SET_TSC_KHZ` to the guest's rate.
    Scale(u32),
}

/// This host cannot run the guest's TSC at its rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "The guest has an invariant TSC at {guest_khz} kHz, this host's runs at {host_khz} kHz \
     and its KVM cannot scale TSCs (no KVM_CAP_TSC_CONTROL)"
)]
pub struct TscRateError {
    pub guest_khz: u32,
    pub host_khz: u32,
}

/// Decides how a guest whose TSC ran at `guest_khz` (`None`: not known, an older source)
/// continues here.
pub fn plan(
    guest_khz: Option<u32>,
    host: HostTsc,
    invariant: bool,
) -> Result<TscPlan, TscRateError> {
    let (Some(guest_khz), Some(host_khz)) = (guest_khz, host.khz) else {
        return Ok(TscPlan::HostRate);
    };
    let diff = u64::from(guest_khz.abs_diff(host_khz));
    if diff * 1_000_000 <= u64::from(guest_khz) * TSC_TOLERANCE_PPM {
        return Ok(TscPlan::HostRate);
    }
    if host.can_scale {
        return Ok(TscPlan::Scale(guest_khz));
    }
    if invariant {
        return Err(TscRateError {
            guest_khz,
            host_khz,
        });
    }
    Ok(TscPlan::HostRate)
}

/// Whether `cpuid` gives the guest an invariant TSC.
pub fn is_invariant(cpuid: &Cpuid) -> bool {
    cpuid
        .entry(CPUID_EXT_APM, 0)
        .is_some_and(|e| e.edx & CPUID_APM_EDX_INVARIANT_TSC != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCALES: HostTsc = HostTsc {
        khz: Some(2_000_000),
        can_scale: true,
    };
    const FIXED: HostTsc = HostTsc {
        khz: Some(2_000_000),
        can_scale: false,
    };

    #[test]
    fn a_rate_within_kvms_tolerance_needs_nothing() {
        assert_eq!(plan(Some(2_000_400), FIXED, true), Ok(TscPlan::HostRate));
        assert_eq!(plan(Some(2_000_000), SCALES, true), Ok(TscPlan::HostRate));
        assert_eq!(plan(None, FIXED, true), Ok(TscPlan::HostRate));
    }

    #[test]
    fn another_rate_is_scaled_where_kvm_can_and_refused_for_an_invariant_tsc_where_not() {
        assert_eq!(
            plan(Some(2_900_000), SCALES, true),
            Ok(TscPlan::Scale(2_900_000))
        );
        let refused = plan(Some(2_900_000), FIXED, true).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "The guest has an invariant TSC at 2900000 kHz, this host's runs at 2000000 kHz \
             and its KVM cannot scale TSCs (no KVM_CAP_TSC_CONTROL)"
        );
        // Without invariant TSC the guest goes by kvmclock: taken at this host's rate.
        assert_eq!(plan(Some(2_900_000), FIXED, false), Ok(TscPlan::HostRate));
    }

    #[test]
    fn this_host() {
        let Ok(kvm) = Kvm::new() else { return };
        let vm = kvm.create_vm().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let cpuid = Cpuid::supported(&kvm).unwrap();
        println!(
            "this host: {:?}, invariant TSC offered: {}, KVM_CAP_ADJUST_CLOCK {:#x}, \
             leaf 1 ecx {:#x}, 0x80000001 ecx {:#x}",
            HostTsc::probe(&kvm, vcpu.get_tsc_khz().ok()),
            is_invariant(&cpuid),
            kvm.check_extension_raw(kvm_bindings::KVM_CAP_ADJUST_CLOCK.into()),
            cpuid.entry(1, 0).map_or(0, |e| e.ecx),
            cpuid.entry(0x8000_0001, 0).map_or(0, |e| e.ecx),
        );
    }
}
