//! A vCPU's complete architectural state as a serializable value, for migration.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
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
    /// More CPUID entries than KVM takes.
    #[error("Too many CPUID entries for KVM")]
    TooManyCpuidEntries,
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
    /// The TSC rate (`KVM_GET_TSC_KHZ`); `None` where KVM could not tell it.
    #[serde(default)]
    pub tsc_khz: Option<u32>,
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
        let tsc_khz = fd.get_tsc_khz().ok();
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
            tsc_khz,
        })
    }

    /// Writes this state into a vCPU that is not running, in [`RESTORE_ORDER`], with what
    /// `with` adds.
    pub fn restore(&self, fd: &VcpuFd, with: RestoreWith<'_>) -> Result<(), VcpuStateError> {
        self.restore_into(fd, with)
    }

    pub(crate) fn restore_into(
        &self,
        target: &impl RestoreTarget,
        with: RestoreWith<'_>,
    ) -> Result<(), VcpuStateError> {
        for part in RESTORE_ORDER {
            self.apply(part, target, with)?;
        }
        Ok(())
    }

    fn apply(
        &self,
        part: StatePart,
        target: &impl RestoreTarget,
        with: RestoreWith<'_>,
    ) -> Result<(), VcpuStateError> {
        let is_deadline = |e: &&kvm_msr_entry| e.index == msrs::MSR_IA32_TSC_DEADLINE;
        match part {
            StatePart::Cpuid => with.cpuid.map_or(Ok(()), |c| target.set_cpuid(c)),
            StatePart::TscKhz => with.tsc_khz.map_or(Ok(()), |khz| target.set_tsc_khz(khz)),
            StatePart::Sregs => target.set_sregs(&self.sregs),
            StatePart::Regs => target.set_regs(&self.regs),
            StatePart::Xsave => target.set_xsave(&self.xsave),
            StatePart::Xcrs => target.set_xcrs(&self.xcrs),
            StatePart::DebugRegs => target.set_debug_regs(&self.debugregs),
            StatePart::Lapic => self.lapic.as_ref().map_or(Ok(()), |l| target.set_lapic(l)),
            StatePart::Msrs => {
                let rest: Vec<_> = self
                    .msrs
                    .iter()
                    .filter(|e| !is_deadline(e))
                    .copied()
                    .collect();
                target.set_msrs(&rest)
            }
            StatePart::TscDeadline => {
                let deadline: Vec<_> = self.msrs.iter().filter(is_deadline).copied().collect();
                if deadline.is_empty() {
                    return Ok(());
                }
                target.set_msrs(&deadline)
            }
            StatePart::MpState => target.set_mp_state(self.mp_state),
            StatePart::Events => target.set_vcpu_events(&self.events),
        }
    }
}

/// What a restore sets besides the saved state.
#[derive(Debug, Clone, Copy, Default)]
pub struct RestoreWith<'a> {
    /// The CPUID table to give the vCPU first; `None` leaves the one it has (KVM refuses to
    /// change the CPUID of a vCPU that has run).
    pub cpuid: Option<&'a [kvm_cpuid_entry2]>,
    /// The TSC rate to scale the vCPU to (see [`super::tsc::plan`]); `None` leaves it.
    pub tsc_khz: Option<u32>,
}

/// One part of a vCPU's state as KVM takes it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatePart {
    Cpuid,
    TscKhz,
    Sregs,
    Regs,
    Xsave,
    Xcrs,
    DebugRegs,
    Lapic,
    /// Every saved MSR but `IA32_TSC_DEADLINE`.
    Msrs,
    /// `IA32_TSC_DEADLINE` alone.
    TscDeadline,
    MpState,
    Events,
}

/// The order in which a vCPU's state goes back into KVM; each part needs those before it
/// (Cloud Hypervisor's and Firecracker's `set_state` keep the same constraints):
///
/// 1. **CPUID** first: KVM checks XCR0 against leaf 0xD, several MSRs and the LAPIC's timer
///    modes against the guest's CPUID, and recomputes its own state from it when it is set.
/// 2. **TSC rate** before anything that reads the TSC: KVM takes the `IA32_TSC` written below
///    and the LAPIC timer at the vCPU's rate.
/// 3. **sregs**: CR0, CR4 and EFER fix the mode the general registers belong to, and the APIC
///    base (in sregs) decides whether KVM_SET_LAPIC takes an xAPIC or an x2APIC page.
/// 4. **regs**: KVM_SET_REGS also drops any pending exception, so it must precede the events.
/// 5. **xsave, xcrs**: XCR0 and the extended state, allowed by the CPUID set above.
/// 6. **debug registers**.
/// 7. **LAPIC** before the MSRs: KVM ignores a write of `IA32_TSC_DEADLINE` unless the LAPIC
///    timer is already in TSC-deadline mode, so the deadline (and the guest's next tick)
///    would be lost.
/// 8. **MSRs**, `IA32_TSC` and `IA32_TSC_ADJUST` among them;
/// 9. then **TSC_DEADLINE** alone: the deadline is a TSC value, armed against the TSC as
///    restored.
/// 10. **mp_state** before the events: KVM checks a latched INIT and SMM in the events
///     against the MP state.
/// 11. **events** last: pending exceptions, interrupts and NMIs, which the calls above may
///     clear (KVM_SET_REGS, KVM_SET_LAPIC) and which must survive.
pub const RESTORE_ORDER: [StatePart; 12] = [
    StatePart::Cpuid,
    StatePart::TscKhz,
    StatePart::Sregs,
    StatePart::Regs,
    StatePart::Xsave,
    StatePart::Xcrs,
    StatePart::DebugRegs,
    StatePart::Lapic,
    StatePart::Msrs,
    StatePart::TscDeadline,
    StatePart::MpState,
    StatePart::Events,
];

/// The calls a restore makes into KVM: a vCPU, or a recorder in tests.
pub(crate) trait RestoreTarget {
    fn set_cpuid(&self, entries: &[kvm_cpuid_entry2]) -> Result<(), VcpuStateError>;
    fn set_tsc_khz(&self, khz: u32) -> Result<(), VcpuStateError>;
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), VcpuStateError>;
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), VcpuStateError>;
    fn set_xsave(&self, xsave: &kvm_xsave) -> Result<(), VcpuStateError>;
    fn set_xcrs(&self, xcrs: &kvm_xcrs) -> Result<(), VcpuStateError>;
    fn set_debug_regs(&self, debugregs: &kvm_debugregs) -> Result<(), VcpuStateError>;
    fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<(), VcpuStateError>;
    fn set_msrs(&self, entries: &[kvm_msr_entry]) -> Result<(), VcpuStateError>;
    fn set_mp_state(&self, mp_state: kvm_mp_state) -> Result<(), VcpuStateError>;
    fn set_vcpu_events(&self, events: &kvm_vcpu_events) -> Result<(), VcpuStateError>;
}

impl RestoreTarget for VcpuFd {
    fn set_cpuid(&self, entries: &[kvm_cpuid_entry2]) -> Result<(), VcpuStateError> {
        let cpuid =
            CpuId::from_entries(entries).map_err(|_| VcpuStateError::TooManyCpuidEntries)?;
        self.set_cpuid2(&cpuid).map_err(ioctl("KVM_SET_CPUID2"))
    }
    fn set_tsc_khz(&self, khz: u32) -> Result<(), VcpuStateError> {
        VcpuFd::set_tsc_khz(self, khz).map_err(ioctl("KVM_SET_TSC_KHZ"))
    }
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), VcpuStateError> {
        VcpuFd::set_sregs(self, sregs).map_err(ioctl("KVM_SET_SREGS"))
    }
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), VcpuStateError> {
        VcpuFd::set_regs(self, regs).map_err(ioctl("KVM_SET_REGS"))
    }
    fn set_xsave(&self, xsave: &kvm_xsave) -> Result<(), VcpuStateError> {
        // SAFETY: `kvm_xsave` is the fixed 4 KiB area KVM_SET_XSAVE reads (KVM_GET_XSAVE
        // filled it; Veil never enables KVM_CAP_XSAVE2's larger one), so KVM reads only
        // memory that belongs to `xsave`.
        unsafe { VcpuFd::set_xsave(self, xsave) }.map_err(ioctl("KVM_SET_XSAVE"))
    }
    fn set_xcrs(&self, xcrs: &kvm_xcrs) -> Result<(), VcpuStateError> {
        VcpuFd::set_xcrs(self, xcrs).map_err(ioctl("KVM_SET_XCRS"))
    }
    fn set_debug_regs(&self, debugregs: &kvm_debugregs) -> Result<(), VcpuStateError> {
        VcpuFd::set_debug_regs(self, debugregs).map_err(ioctl("KVM_SET_DEBUGREGS"))
    }
    fn set_lapic(&self, lapic: &kvm_lapic_state) -> Result<(), VcpuStateError> {
        VcpuFd::set_lapic(self, lapic).map_err(ioctl("KVM_SET_LAPIC"))
    }
    fn set_msrs(&self, entries: &[kvm_msr_entry]) -> Result<(), VcpuStateError> {
        set_msrs(self, entries)
    }
    fn set_mp_state(&self, mp_state: kvm_mp_state) -> Result<(), VcpuStateError> {
        VcpuFd::set_mp_state(self, mp_state).map_err(ioctl("KVM_SET_MP_STATE"))
    }
    fn set_vcpu_events(&self, events: &kvm_vcpu_events) -> Result<(), VcpuStateError> {
        VcpuFd::set_vcpu_events(self, events).map_err(ioctl("KVM_SET_VCPU_EVENTS"))
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

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// Records the calls a restore makes, MSR writes with their indices.
    #[derive(Default)]
    struct Recorder(RefCell<Vec<String>>);

    impl Recorder {
        fn note(&self, call: impl Into<String>) -> Result<(), VcpuStateError> {
            self.0.borrow_mut().push(call.into());
            Ok(())
        }
    }

    impl RestoreTarget for Recorder {
        fn set_cpuid(&self, _: &[kvm_cpuid_entry2]) -> Result<(), VcpuStateError> {
            self.note("cpuid")
        }
        fn set_tsc_khz(&self, khz: u32) -> Result<(), VcpuStateError> {
            self.note(format!("tsc_khz {khz}"))
        }
        fn set_sregs(&self, _: &kvm_sregs) -> Result<(), VcpuStateError> {
            self.note("sregs")
        }
        fn set_regs(&self, _: &kvm_regs) -> Result<(), VcpuStateError> {
            self.note("regs")
        }
        fn set_xsave(&self, _: &kvm_xsave) -> Result<(), VcpuStateError> {
            self.note("xsave")
        }
        fn set_xcrs(&self, _: &kvm_xcrs) -> Result<(), VcpuStateError> {
            self.note("xcrs")
        }
        fn set_debug_regs(&self, _: &kvm_debugregs) -> Result<(), VcpuStateError> {
            self.note("debugregs")
        }
        fn set_lapic(&self, _: &kvm_lapic_state) -> Result<(), VcpuStateError> {
            self.note("lapic")
        }
        fn set_msrs(&self, entries: &[kvm_msr_entry]) -> Result<(), VcpuStateError> {
            let indices: Vec<String> = entries.iter().map(|e| format!("{:#x}", e.index)).collect();
            self.note(format!("msrs {}", indices.join(" ")))
        }
        fn set_mp_state(&self, _: kvm_mp_state) -> Result<(), VcpuStateError> {
            self.note("mp_state")
        }
        fn set_vcpu_events(&self, _: &kvm_vcpu_events) -> Result<(), VcpuStateError> {
            self.note("events")
        }
    }

    fn state(msrs: &[u32]) -> VcpuState {
        VcpuState {
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debugregs: Default::default(),
            events: Default::default(),
            mp_state: Default::default(),
            lapic: Some(Default::default()),
            msrs: msrs
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect(),
            tsc_khz: Some(2_000_000),
        }
    }

    #[test]
    fn state_goes_back_in_the_order_kvm_needs_with_the_tsc_deadline_last_of_the_msrs() {
        let saved = state(&[
            0x174,
            msrs::MSR_IA32_TSC_DEADLINE,
            msrs::MSR_IA32_TSC,
            0x277,
        ]);
        let kvm = Recorder::default();
        let with = RestoreWith {
            cpuid: Some(&[]),
            tsc_khz: Some(2_900_000),
        };
        saved.restore_into(&kvm, with).unwrap();
        assert_eq!(
            kvm.0.into_inner(),
            [
                "cpuid",
                "tsc_khz 2900000",
                "sregs",
                "regs",
                "xsave",
                "xcrs",
                "debugregs",
                "lapic",
                "msrs 0x174 0x10 0x277",
                "msrs 0x6e0",
                "mp_state",
                "events",
            ]
        );
    }

    #[test]
    fn a_vcpu_keeps_its_cpuid_and_rate_when_none_is_given_and_no_deadline_is_written_unsaved() {
        let kvm = Recorder::default();
        state(&[msrs::MSR_IA32_TSC])
            .restore_into(&kvm, RestoreWith::default())
            .unwrap();
        let calls = kvm.0.into_inner();
        assert_eq!(calls.first().map(String::as_str), Some("sregs"));
        assert_eq!(calls.iter().filter(|c| c.starts_with("msrs")).count(), 1);
    }
}
