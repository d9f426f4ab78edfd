//! Turning the paravirtual interfaces on in KVM and advertising them to the guest.

use kvm_bindings::{kvm_enable_cap, KVM_MSR_EXIT_REASON_FILTER};
use kvm_ioctls::{Kvm, MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VmFd};
use serde::Serialize;
use veil_guest_abi::{
    HYPERCALL_PORT, VEIL_CPUID_FEATURES, VEIL_CPUID_SIGNATURE, VEIL_CPUID_SIGNATURE_WORD,
    VEIL_FEATURE_HYPERCALL_PORT, VEIL_FEATURE_MIGRATION_NEVER,
};

use super::map_gpa_range::KVM_HC_MAP_GPA_RANGE;
use super::migration_control::MSR_KVM_MIGRATION_CONTROL;
use super::state::MSR_AMD64_SEV;
use crate::cpuid::{Cpuid, Register, KVM_CPUID_FEATURES};
use crate::probe::{
    self, KVM_CAP_EXIT_HYPERCALL, KVM_CAP_X86_MSR_FILTER, KVM_CAP_X86_USER_SPACE_MSR,
};

/// `KVM_FEATURE_HC_MAP_GPA_RANGE` in CPUID 0x40000001 EAX.
pub const KVM_FEATURE_HC_MAP_GPA_RANGE: u32 = 1 << 16;
/// `KVM_FEATURE_MIGRATION_CONTROL` in CPUID 0x40000001 EAX.
pub const KVM_FEATURE_MIGRATION_CONTROL: u32 = 1 << 17;

/// How the guest's hypercalls reach Veil.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TransportChoice {
    /// `KVM_EXIT_HYPERCALL` where the host delivers it, else the port (probed once per boot).
    #[default]
    Auto,
    /// `vmmcall`/`vmcall` through `KVM_EXIT_HYPERCALL`.
    Exit,
    /// Veil's I/O-port transport.
    Port,
}

/// What was enabled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParavirtFeatures {
    /// KVM exits to Veil on `KVM_HC_MAP_GPA_RANGE`.
    pub hypercall_exit: bool,
    /// The port transport is advertised (and preferred by the guest).
    pub hypercall_port: Option<u16>,
    /// `MSR_KVM_MIGRATION_CONTROL` reaches Veil.
    pub migration_control: bool,
}

impl ParavirtFeatures {
    /// Whether the guest has any way to make the hypercall.
    pub fn hypercall(&self) -> bool {
        self.hypercall_exit || self.hypercall_port.is_some()
    }
}

/// Enables hypercall exits, the port transport and the MSR filter as the host allows.
/// With `sev_status`, reads and writes of `MSR_AMD64_SEV` come to Veil too.
pub fn enable(kvm: &Kvm, vm: &VmFd, choice: TransportChoice, sev_status: bool) -> ParavirtFeatures {
    let exit_mask = kvm
        .check_extension_raw(u64::from(KVM_CAP_EXIT_HYPERCALL))
        .max(0) as u64;
    let hypercall_exit = exit_mask & (1 << KVM_HC_MAP_GPA_RANGE) != 0
        && vm
            .enable_cap(&kvm_enable_cap {
                cap: KVM_CAP_EXIT_HYPERCALL,
                args: [1 << KVM_HC_MAP_GPA_RANGE, 0, 0, 0],
                ..Default::default()
            })
            .inspect_err(|e| tracing::warn!("cannot enable hypercall exits: {e}"))
            .is_ok();
    let use_port = match choice {
        TransportChoice::Port => true,
        TransportChoice::Exit => false,
        TransportChoice::Auto => !hypercall_exit || !probe::hypercall_exits_delivered(kvm),
    };
    if use_port {
        tracing::info!("hypercalls use Veil's port transport (port {HYPERCALL_PORT:#x})");
    }
    ParavirtFeatures {
        hypercall_exit,
        hypercall_port: use_port.then_some(HYPERCALL_PORT),
        migration_control: enable_msr_exit(kvm, vm, sev_status),
    }
}

fn enable_msr_exit(kvm: &Kvm, vm: &VmFd, sev_status: bool) -> bool {
    let supported = kvm.check_extension_raw(u64::from(KVM_CAP_X86_USER_SPACE_MSR)) > 0
        && kvm.check_extension_raw(u64::from(KVM_CAP_X86_MSR_FILTER)) > 0;
    if !supported {
        tracing::warn!("KVM cannot hand MSRs to userspace: migration control is not offered");
        return false;
    }
    let enabled = vm.enable_cap(&kvm_enable_cap {
        cap: KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    });
    // A clear bit denies the access in KVM, which then exits to userspace.
    let deny = [0u8];
    let denied = |base| MsrFilterRange {
        flags: MsrFilterRangeFlags::READ | MsrFilterRangeFlags::WRITE,
        base,
        msr_count: 1,
        bitmap: &deny,
    };
    let mut ranges = vec![denied(MSR_KVM_MIGRATION_CONTROL)];
    if sev_status {
        ranges.push(denied(MSR_AMD64_SEV));
    }
    let filtered = enabled.and_then(|()| vm.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges));
    filtered
        .inspect_err(|e| tracing::warn!("cannot route the migration-control MSR to Veil: {e}"))
        .is_ok()
}

/// Advertises exactly what is handled.
pub fn advertise(cpuid: &mut Cpuid, features: &ParavirtFeatures) {
    if features.hypercall() {
        cpuid.set_bits(
            KVM_CPUID_FEATURES,
            0,
            Register::Eax,
            KVM_FEATURE_HC_MAP_GPA_RANGE,
        );
    }
    if features.migration_control {
        cpuid.set_bits(
            KVM_CPUID_FEATURES,
            0,
            Register::Eax,
            KVM_FEATURE_MIGRATION_CONTROL,
        );
    }
    cpuid.set_register(VEIL_CPUID_SIGNATURE, 0, Register::Eax, VEIL_CPUID_FEATURES);
    for reg in [Register::Ebx, Register::Ecx, Register::Edx] {
        cpuid.set_register(VEIL_CPUID_SIGNATURE, 0, reg, VEIL_CPUID_SIGNATURE_WORD);
    }
    let mut veil_features = 0;
    if let Some(port) = features.hypercall_port {
        veil_features |= VEIL_FEATURE_HYPERCALL_PORT;
        cpuid.set_register(VEIL_CPUID_FEATURES, 0, Register::Ebx, u32::from(port));
    }
    if features.migration_control {
        veil_features |= VEIL_FEATURE_MIGRATION_NEVER;
    }
    cpuid.set_register(VEIL_CPUID_FEATURES, 0, Register::Eax, veil_features);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertises_only_what_is_handled() {
        let mut cpuid = Cpuid::from_entries(vec![]);
        advertise(
            &mut cpuid,
            &ParavirtFeatures {
                hypercall_exit: false,
                hypercall_port: None,
                migration_control: false,
            },
        );
        assert_eq!(cpuid.entry(KVM_CPUID_FEATURES, 0).map_or(0, |e| e.eax), 0);
        assert_eq!(cpuid.entry(VEIL_CPUID_FEATURES, 0).unwrap().eax, 0);

        let mut cpuid = Cpuid::from_entries(vec![]);
        advertise(
            &mut cpuid,
            &ParavirtFeatures {
                hypercall_exit: true,
                hypercall_port: Some(0xf5),
                migration_control: true,
            },
        );
        assert_eq!(
            cpuid.entry(KVM_CPUID_FEATURES, 0).unwrap().eax,
            (1 << 16) | (1 << 17)
        );
        let veil = cpuid.entry(VEIL_CPUID_FEATURES, 0).unwrap();
        assert_eq!((veil.eax, veil.ebx), (0b11, 0xf5));
        let sig = cpuid.entry(VEIL_CPUID_SIGNATURE, 0).unwrap();
        let text: Vec<u8> = [sig.ebx, sig.ecx, sig.edx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        assert_eq!(text, b"VeilVeilVeil");
        assert_eq!(sig.eax, VEIL_CPUID_FEATURES);
    }
}
