//! Which MSRs a vCPU's saved state carries: every MSR KVM lists, minus a deny-list.
//!
//! KVM names the MSRs that hold guest state in `KVM_GET_MSR_INDEX_LIST` (the kernel's
//! `msrs_to_save` and `emulated_msrs`, already filtered to what this host and KVM support), and
//! the feature MSRs (what the CPU reports about itself: ARCH_CAPABILITIES, PERF_CAPABILITIES,
//! UCODE_REV...) in `KVM_GET_MSR_FEATURE_INDEX_LIST`. Cloud Hypervisor saves the whole index
//! list; Firecracker an allow-list of ranges within it. Veil saves both lists minus
//! [`DENIED_MSRS`], each entry with its reason, and then keeps only those the vCPU answers
//! (KVM lists some that a vCPU refuses, e.g. PMU counters its CPUID does not offer).

use kvm_bindings::{kvm_msr_entry, KVM_MAX_MSR_ENTRIES};

/// `MSR_IA32_TSC` (Intel SDM vol. 4, table 2-2; Linux `arch/x86/include/asm/msr-index.h`).
pub const MSR_IA32_TSC: u32 = 0x0000_0010;
/// `MSR_IA32_APICBASE`.
pub const MSR_IA32_APICBASE: u32 = 0x0000_001b;
/// `MSR_IA32_TSC_DEADLINE`: KVM drops a write unless the LAPIC timer is in TSC-deadline mode,
/// and reads it against the TSC, so it is restored apart, after the LAPIC and the TSC.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x0000_06e0;
/// `MSR_IA32_VMX_BASIC`, the first nested-VMX capability MSR.
pub const MSR_IA32_VMX_BASIC: u32 = 0x0000_0480;
/// `MSR_IA32_VMX_VMFUNC`, the last.
pub const MSR_IA32_VMX_VMFUNC: u32 = 0x0000_0491;
/// `MSR_AMD64_TSC_RATIO`: the TSC ratio a nested SVM hypervisor gives its guests.
pub const MSR_AMD64_TSC_RATIO: u32 = 0xc000_0104;
/// `MSR_VM_HSAVE_PA`: where a nested SVM hypervisor's host state is saved (AMD APM vol. 2,
/// 15.30.4).
pub const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
/// `HV_X64_MSR_GUEST_OS_ID`, the first of Hyper-V's synthetic MSRs (Hyper-V TLFS, section 2.4).
pub const HV_X64_MSR_FIRST: u32 = 0x4000_0000;
/// The last MSR of the range Hyper-V reserves.
pub const HV_X64_MSR_LAST: u32 = 0x4000_00ff;
/// `MSR_KVM_ASYNC_PF_ACK` (Documentation/virt/kvm/x86/msr.rst).
pub const MSR_KVM_ASYNC_PF_ACK: u32 = 0x4b56_4d07;

/// An MSR range left out of the saved state, and why.
#[derive(Debug, Clone, Copy)]
pub struct DeniedMsrs {
    pub first: u32,
    pub last: u32,
    pub reason: &'static str,
}

/// MSRs KVM may list that Veil does not save.
pub const DENIED_MSRS: &[DeniedMsrs] = &[
    DeniedMsrs {
        first: MSR_IA32_APICBASE,
        last: MSR_IA32_APICBASE,
        reason: "carried in sregs.apic_base and restored before the LAPIC; writing it again \
                 after KVM_SET_LAPIC would reset the LAPIC on a mode change",
    },
    DeniedMsrs {
        first: MSR_IA32_VMX_BASIC,
        last: MSR_IA32_VMX_VMFUNC,
        reason: "nested VMX capabilities: Veil offers guests no VMX and saves no nested state",
    },
    DeniedMsrs {
        first: MSR_AMD64_TSC_RATIO,
        last: MSR_AMD64_TSC_RATIO,
        reason: "a nested SVM guest's TSC ratio: Veil offers guests no SVM; the guest's own \
                 rate travels as KVM_GET_TSC_KHZ",
    },
    DeniedMsrs {
        first: MSR_VM_HSAVE_PA,
        last: MSR_VM_HSAVE_PA,
        reason: "a nested SVM hypervisor's host save area: Veil offers guests no SVM and saves \
                 no nested state",
    },
    DeniedMsrs {
        first: HV_X64_MSR_FIRST,
        last: HV_X64_MSR_LAST,
        reason: "Hyper-V synthetic MSRs: KVM lists them when it could emulate them, but Veil \
                 enables no Hyper-V enlightenment (KVM_CAP_HYPERV_*), so they hold nothing",
    },
    DeniedMsrs {
        first: MSR_KVM_ASYNC_PF_ACK,
        last: MSR_KVM_ASYNC_PF_ACK,
        reason: "an acknowledgement the guest writes, not state: it always reads as 0",
    },
];

/// Why `index` is not saved, if it is denied.
pub fn denied(index: u32) -> Option<&'static str> {
    DENIED_MSRS
        .iter()
        .find(|d| (d.first..=d.last).contains(&index))
        .map(|d| d.reason)
}

/// The MSRs to save, in KVM's order (the index list first, then the feature MSRs): both
/// lists without duplicates and without [`DENIED_MSRS`].
pub fn candidates(index_list: &[u32], feature_list: &[u32]) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::with_capacity(index_list.len() + feature_list.len());
    for &index in index_list.iter().chain(feature_list) {
        if denied(index).is_none() && !out.contains(&index) {
            out.push(index);
        }
    }
    out
}

/// Reads `indices` in chunks KVM takes (`KVM_MAX_MSR_ENTRIES`), returning the entries read and
/// the count read of each chunk. `read` is one `KVM_GET_MSRS` (or `KVM_SET_MSRS`): it
/// returns how many entries from the start of the slice KVM handled.
pub(crate) fn in_chunks<E>(
    entries: &mut [kvm_msr_entry],
    mut call: impl FnMut(&mut [kvm_msr_entry]) -> Result<usize, E>,
) -> Result<usize, E> {
    let mut done = 0;
    for chunk in entries.chunks_mut(KVM_MAX_MSR_ENTRIES) {
        let n = call(chunk)?;
        done += n;
        if n < chunk.len() {
            break;
        }
    }
    Ok(done)
}

/// The subset of `candidates` a vCPU answers. `read` is one `KVM_GET_MSRS` on the entries
/// given; KVM stops at the first MSR it refuses and returns how many it read, so the refused
/// one is dropped and the rest read again (as Cloud Hypervisor does).
pub fn readable<E>(
    candidates: &[u32],
    mut read: impl FnMut(&mut [kvm_msr_entry]) -> Result<usize, E>,
) -> Result<Vec<u32>, E> {
    let mut left: Vec<u32> = candidates.to_vec();
    let mut kept = Vec::with_capacity(left.len());
    while !left.is_empty() {
        let mut entries: Vec<kvm_msr_entry> = left
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let done = in_chunks(&mut entries, &mut read)?;
        kept.extend_from_slice(&left[..done]);
        if done < left.len() {
            tracing::debug!(msr = format_args!("{:#x}", left[done]), "vCPU refuses MSR");
        }
        // Skip the refused one (if any) and carry on after it.
        left.drain(..(done + 1).min(left.len()));
    }
    Ok(kept)
}

/// The MSRs this host's KVM lists for saving, before asking a vCPU: [`candidates`] of the
/// index list and the feature-MSR list (either may be absent on an old KVM).
pub fn host_candidates(kvm: &kvm_ioctls::Kvm) -> Vec<u32> {
    let index_list = kvm
        .get_msr_index_list()
        .map(|l| l.as_slice().to_vec())
        .unwrap_or_default();
    let feature_list = kvm
        .get_msr_feature_index_list()
        .map(|l| l.as_slice().to_vec())
        .unwrap_or_default();
    candidates(&index_list, &feature_list)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// KVM's list on a typical AMD host, shortened, with what the deny-list removes.
    const FAKE_INDEX_LIST: &[u32] = &[
        0x174,
        0x175,
        0x176,
        MSR_IA32_TSC,
        0xc000_0081,
        0xc000_0082,
        0xc000_0083,
        0xc000_0084,
        0xc000_0102,
        0xc000_0103,
        0x277,
        0x48,
        0xc001_011f,
        0x3b,
        0xda0,
        MSR_IA32_TSC_DEADLINE,
        0x4b56_4d00,
        0x4b56_4d01,
        0x4b56_4d02,
        0x4b56_4d03,
        0x4b56_4d04,
        0x4b56_4d05,
        0x4b56_4d06,
        MSR_KVM_ASYNC_PF_ACK,
        0x4000_0000,
        0x4000_0001,
        0x4000_0073,
        MSR_IA32_VMX_BASIC,
        0x485,
        MSR_IA32_VMX_VMFUNC,
        MSR_AMD64_TSC_RATIO,
        MSR_VM_HSAVE_PA,
        0x1a0,
    ];
    const FAKE_FEATURE_LIST: &[u32] = &[0x10a, 0x8b, 0xc001_1029, 0x481, 0x174];

    #[test]
    fn every_listed_msr_is_saved_but_the_denied_ones_in_kvms_order() {
        let saved = candidates(FAKE_INDEX_LIST, FAKE_FEATURE_LIST);
        assert_eq!(
            saved,
            [
                0x174,
                0x175,
                0x176,
                0x10,
                0xc000_0081,
                0xc000_0082,
                0xc000_0083,
                0xc000_0084,
                0xc000_0102,
                0xc000_0103,
                0x277,
                0x48,
                0xc001_011f,
                0x3b,
                0xda0,
                0x6e0,
                0x4b56_4d00,
                0x4b56_4d01,
                0x4b56_4d02,
                0x4b56_4d03,
                0x4b56_4d04,
                0x4b56_4d05,
                0x4b56_4d06,
                0x1a0,
                0x10a,
                0x8b,
                0xc001_1029,
            ]
        );
        // MSR_KVM_POLL_CONTROL is 0x4b564d05 (0x4b564d06 is MSR_KVM_ASYNC_PF_INT): both kept.
        assert!(saved.contains(&0x4b56_4d05) && saved.contains(&0x4b56_4d06));
    }

    #[test]
    fn every_denied_range_says_why() {
        for d in DENIED_MSRS {
            assert!(d.first <= d.last, "{d:?}");
            assert!(d.reason.len() > 20, "{d:?}");
        }
        assert!(denied(0x490).unwrap().contains("VMX"));
        assert_eq!(denied(MSR_IA32_TSC), None);
        assert_eq!(denied(0x4b56_4d05), None);
    }

    #[test]
    fn msrs_the_vcpu_refuses_are_dropped_and_the_rest_kept() {
        let refused = [0x176, 0xda0, 0x8b];
        let candidates = candidates(FAKE_INDEX_LIST, FAKE_FEATURE_LIST);
        let mut calls = 0;
        let kept = readable(&candidates, |entries| {
            calls += 1;
            let n = entries
                .iter()
                .position(|e| refused.contains(&e.index))
                .unwrap_or(entries.len());
            Ok::<_, ()>(n)
        })
        .unwrap();
        let expected: Vec<u32> = candidates
            .iter()
            .copied()
            .filter(|i| !refused.contains(i))
            .collect();
        assert_eq!(kept, expected);
        assert_eq!(calls, refused.len() + 1);
        // The last one refused: nothing read after it, no endless loop.
        let kept = readable(&[1, 2], |e| Ok::<_, ()>(usize::from(e[0].index == 1))).unwrap();
        assert_eq!(kept, [1]);
    }

    #[test]
    fn more_msrs_than_one_call_takes_go_in_chunks() {
        let many: Vec<u32> = (0..600).collect();
        let mut sizes = Vec::new();
        let kept = readable(&many, |e| {
            sizes.push(e.len());
            Ok::<_, ()>(e.len())
        })
        .unwrap();
        assert_eq!(kept, many);
        assert_eq!(sizes, [256, 256, 88]);
    }
}

#[cfg(test)]
mod host_tests {
    /// On this host: the MSRs a vCPU with the supported CPUID saves include the ones the
    /// fixed list of old had (where KVM lists them), and none denied.
    #[test]
    fn this_hosts_vcpu_saves_its_listed_msrs() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            return;
        };
        let vm = kvm.create_vm().unwrap();
        let cpuid = crate::cpuid::Cpuid::supported(&kvm).unwrap();
        let vcpu = crate::vcpu::Vcpu::new(&vm, 0, &cpuid, 1).unwrap();
        let candidates = super::host_candidates(&kvm);
        let saved = crate::vcpu::stateful_msrs(&kvm, &vcpu.fd);
        println!(
            "this host: {} MSRs listed, {} saved: {:x?}",
            candidates.len(),
            saved.len(),
            saved
        );
        for msr in [0xc000_0081, 0xc000_0082, 0xc000_0084, 0xc000_0102, 0x277] {
            assert!(saved.contains(&msr), "{msr:#x} not saved: {saved:x?}");
        }
        assert!(saved.iter().all(|&m| super::denied(m).is_none()));
    }
}
