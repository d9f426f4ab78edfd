//! A vCPU's complete architectural state as a serializable value, for migration.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::msrs;

/// Errors saving or restoring vCPU state.
#[derive(Debug, thiserror::Error)]
pub enum VcpuStateError {
    /// A get/set ioctl failed.
    #[error("{what} failed")]
    Ioctl {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM saved or restored fewer MSRs than asked: it stopped at `refused`.
    #[error("KVM handled {done} of {wanted} MSRs, refusing MSR {refused:#x}")]
    PartialMsrs {
        done: usize,
        wanted: usize,
        refused: u32,
    },
    /// Too many MSRs for one KVM call.
    #[error("Too many MSRs for one KVM call")]
    TooManyMsrs,
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuStateError {
    move |source| VcpuStateError::Ioctl { what, source }
}

/// Everything needed to resume a vCPU elsewhere.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// FPU, SSE and extended state (a superset of `KVM_GET_FPU`).
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    /// `None` without an in-kernel irqchip.
    pub lapic: Option<kvm_lapic_state>,
    pub msrs: Vec<kvm_msr_entry>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

impl VcpuState {
    /// Reads the state of a vCPU that is not running. `msr_indices` are the MSRs to save
    /// (see [`stateful_msrs`]); `has_lapic` says whether the VM has an in-kernel irqchip.
    pub fn save(fd: &VcpuFd, msr_indices: &[u32], has_lapic: bool) -> Result<Self, VcpuStateError> {
        // Events first and MP state early: reading registers must not change what is pending.
        let mp_state = fd.get_mp_state().map_err(ioctl("KVM_GET_MP_STATE"))?;
        let events = fd.get_vcpu_events().map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
        let regs = fd.get_regs().map_err(ioctl("KVM_GET_REGS"))?;
        let sregs = fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))?;
        let xsave = fd.get_xsave().map_err(ioctl("KVM_GET_XSAVE"))?;
        let xcrs = fd.get_xcrs().map_err(ioctl("KVM_GET_XCRS"))?;
        let debugregs = fd.get_debug_regs().map_err(ioctl("KVM_GET_DEBUGREGS"))?;
        let lapic = has_lapic
            .then(|| fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC")))
            .transpose()?;
        let mut msrs: Vec<kvm_msr_entry> = msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        get_msrs(fd, &mut msrs)?;
        Ok(Self {
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            events,
            mp_state,
            lapic,
            msrs,
        })
    }

    /// Writes this state into a vCPU that is not running.
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), VcpuStateError> {
        // Special registers before MSRs (EFER, APIC base) and the LAPIC after the APIC base.
        fd.set_sregs(&self.sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        fd.set_regs(&self.regs).map_err(ioctl("KVM_SET_REGS"))?;
        // SAFETY: the xsave area came from KVM_GET_XSAVE of the same size, so KVM reads only
        // memory that belongs to `self.xsave`.
        unsafe { fd.set_xsave(&self.xsave) }.map_err(ioctl("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(ioctl("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs)
            .map_err(ioctl("KVM_SET_DEBUGREGS"))?;
        set_msrs(fd, &self.msrs)?;
        if let Some(lapic) = &self.lapic {
            fd.set_lapic(lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        }
        fd.set_mp_state(self.mp_state)
            .map_err(ioctl("KVM_SET_MP_STATE"))?;
        fd.set_vcpu_events(&self.events)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// Reads `entries` (their indices set) from the vCPU; all or an error naming the one refused.
fn get_msrs(fd: &VcpuFd, entries: &mut [kvm_msr_entry]) -> Result<(), VcpuStateError> {
    let done = msrs::in_chunks(entries, |chunk| {
        let mut msrs = Msrs::from_entries(chunk).map_err(|_| VcpuStateError::TooManyMsrs)?;
        let n = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        chunk.copy_from_slice(msrs.as_slice());
        Ok(n)
    })?;
    all_msrs(done, entries)
}

/// Writes `entries` into the vCPU; all or an error naming the one refused.
fn set_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), VcpuStateError> {
    let mut entries = entries.to_vec();
    let done = msrs::in_chunks(&mut entries, |chunk| {
        let msrs = Msrs::from_entries(chunk).map_err(|_| VcpuStateError::TooManyMsrs)?;
        fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))
    })?;
    all_msrs(done, &entries)
}

fn all_msrs(done: usize, entries: &[kvm_msr_entry]) -> Result<(), VcpuStateError> {
    match entries.get(done) {
        None => Ok(()),
        Some(refused) => Err(VcpuStateError::PartialMsrs {
            done,
            wanted: entries.len(),
            refused: refused.index,
        }),
    }
}

/// The MSRs to save for the vCPUs of one VM: every MSR this host's KVM lists (see
/// [`msrs`](super::msrs)) that `fd`, a vCPU with the VM's CPUID, answers.
pub fn stateful_msrs(kvm: &kvm_ioctls::Kvm, fd: &VcpuFd) -> Vec<u32> {
    let candidates = msrs::host_candidates(kvm);
    msrs::readable(&candidates, |chunk| {
        let mut msrs = Msrs::from_entries(chunk).map_err(|_| VcpuStateError::TooManyMsrs)?;
        fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))
    })
    .unwrap_or_else(|e| {
        tracing::warn!("cannot list the vCPU's MSRs: {e}");
        Vec::new()
    })
}
