//! Whether this host can take over an incoming guest, judged from the shape its source sent.

use veil_hypervisor::cpuid::{CpuModel, Cpuid};
use veil_hypervisor::vcpu::tsc;
use veil_migration::protocol::VmShape;

/// `Ok` if a VM of `shape` can be built here and run the guest; otherwise the reason, for the
/// source to print: more RAM than this host has, a memory layout this version does not build,
/// or CPU features the guest was given that this host's KVM lacks.
pub fn check_incoming(shape: &VmShape) -> Result<(), String> {
    check_incoming_as(shape, CpuModel::Host)
}

/// [`check_incoming`] for a target that offers guests only the features of `model`.
pub fn check_incoming_as(shape: &VmShape, model: CpuModel) -> Result<(), String> {
    check_memory(shape)?;
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("this host cannot open KVM: {e}"))?;
    let mut host = Cpuid::supported(&kvm).map_err(|e| format!("this host's CPUID: {e}"))?;
    host.restrict_to(model);
    let guest: Vec<kvm_bindings::kvm_cpuid_entry2> = shape.cpuid().iter().map(Into::into).collect();
    check_tsc_rate(&kvm, shape.tsc_khz(), &Cpuid::from_entries(guest.clone()))?;
    check_features(&host, &guest, model)
}

/// RAM this host has, in a layout this version builds.
fn check_memory(shape: &VmShape) -> Result<(), String> {
    let size = shape.ram_bytes();
    let host_memory = veil_hypervisor::memory::host_memory_bytes().unwrap_or(u64::MAX);
    if size > host_memory {
        return Err(format!(
            "the guest's {} of RAM is more than this host has",
            veil_hypervisor::memory::human(size)
        ));
    }
    let regions: Vec<(u64, u64)> = shape.memory().iter().map(|r| (r.gpa, r.len)).collect();
    let ours: Vec<(u64, u64)> = veil_hypervisor::layout::ram_regions(size)
        .into_iter()
        .map(|(gpa, len)| (gpa.0, len))
        .collect();
    if regions != ours {
        return Err("the guest's memory layout is not one this version of Veil builds".into());
    }
    Ok(())
}

/// [`check_incoming`] without the TSC check, for a VM that applies it itself before the guest
/// runs (`Vm::restore` does): it needs a throwaway VM and vCPU, milliseconds a restore saves.
pub(crate) fn check_restorable(shape: &VmShape) -> Result<(), String> {
    check_memory(shape)?;
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("this host cannot open KVM: {e}"))?;
    let host = Cpuid::supported(&kvm).map_err(|e| format!("this host's CPUID: {e}"))?;
    let guest: Vec<kvm_bindings::kvm_cpuid_entry2> = shape.cpuid().iter().map(Into::into).collect();
    check_features(&host, &guest, CpuModel::Host)
}

fn check_features(
    host: &Cpuid,
    guest: &[kvm_bindings::kvm_cpuid_entry2],
    model: CpuModel,
) -> Result<(), String> {
    let missing = host.missing_features(guest);
    if !missing.is_empty() {
        return Err(format!(
            "this host's CPU{} lacks features the guest was given: {}",
            match model {
                CpuModel::Host => String::new(),
                CpuModel::Baseline(b) => format!(" (as {})", b.name),
            },
            missing.join(", ")
        ));
    }
    Ok(())
}

/// Refuses, before any memory is sent, an invariant-TSC guest whose rate this host can neither
/// match nor scale to (the same decision `Vm::restore` applies).
fn check_tsc_rate(
    kvm: &kvm_ioctls::Kvm,
    guest_khz: Option<u32>,
    guest_cpuid: &Cpuid,
) -> Result<(), String> {
    let host_khz = kvm
        .create_vm()
        .and_then(|vm| vm.create_vcpu(0))
        .and_then(|vcpu| vcpu.get_tsc_khz())
        .ok();
    let host = tsc::HostTsc::probe(kvm, host_khz);
    tsc::plan(guest_khz, host, tsc::is_invariant(guest_cpuid))
        .map(drop)
        .map_err(|e| e.to_string())
}
