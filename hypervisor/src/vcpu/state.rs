//! A vCPU's complete architectural state as a serializable value, for migration.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

/// MSRs that carry guest state beyond the registers (the set Firecracker and Cloud Hypervisor
/// save). Only those KVM reports in `KVM_GET_MSR_INDEX_LIST` are used.
pub const STATEFUL_MSRS: &[u32] = &[
    0x0000_0010, // IA32_TSC
    0x0000_001b, // IA32_APIC_BASE
    0x0000_003a, // IA32_FEATURE_CONTROL
    0x0000_0174, // IA32_SYSENTER_CS
    0x0000_0175, // IA32_SYSENTER_ESP
    0x0000_0176, // IA32_SYSENTER_EIP
    0x0000_01a0, // IA32_MISC_ENABLE
    0x0000_0277, // IA32_PAT
    0x0000_06e0, // IA32_TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x4b56_4d00, // MSR_KVM_WALL_CLOCK_NEW
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
    0x4b56_4d02, // MSR_KVM_ASYNC_PF_EN
    0x4b56_4d03, // MSR_KVM_STEAL_TIME
    0x4b56_4d04, // MSR_KVM_PV_EOI_EN
    0x4b56_4d06, // MSR_KVM_POLL_CONTROL
];

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
    /// KVM saved or restored fewer MSRs than asked.
    #[error("KVM handled {done} of {wanted} MSRs")]
    PartialMsrs { done: usize, wanted: usize },
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
    /// (see [`STATEFUL_MSRS`]); `has_lapic` says whether the VM has an in-kernel irqchip.
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
        let entries: Vec<_> = msr_indices
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuStateError::TooManyMsrs)?;
        let done = fd.get_msrs(&mut msrs).map_err(ioctl("KVM_GET_MSRS"))?;
        if done != entries.len() {
            return Err(VcpuStateError::PartialMsrs {
                done,
                wanted: entries.len(),
            });
        }
        Ok(Self {
            regs,
            sregs,
            xsave,
            xcrs,
            debugregs,
            events,
            mp_state,
            lapic,
            msrs: msrs.as_slice().to_vec(),
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
        let msrs = Msrs::from_entries(&self.msrs).map_err(|_| VcpuStateError::TooManyMsrs)?;
        let done = fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if done != self.msrs.len() {
            return Err(VcpuStateError::PartialMsrs {
                done,
                wanted: self.msrs.len(),
            });
        }
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

/// The subset of [`STATEFUL_MSRS`] this host's KVM can save.
pub fn stateful_msrs(kvm: &kvm_ioctls::Kvm) -> Vec<u32> {
    let supported = kvm
        .get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .unwrap_or_default();
    STATEFUL_MSRS
        .iter()
        .copied()
        .filter(|m| supported.contains(m))
        .collect()
}
