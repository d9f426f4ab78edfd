//! A kit program that leaves vCPU state behind and checks it after a move: MSRs written with
//! chosen values, a TSC deadline armed, the CPUID hashed; then it waits for the host's word
//! (set once the guest has landed) and reads it all back.

use veil_hypervisor::cpuid::Cpuid;

/// The word the guest waits on after leaving its state: the test sets it once the guest has
/// landed on the target.
pub const GO_GPA: u64 = 0x80_0000;
pub const GO: u64 = 0x6c61_6e64_6564;

/// MSRs and values the guest writes before the move and reads back after it. Canonical
/// addresses where the MSR holds one; a PAT whose every byte is a valid memory type and whose
/// entries 0 (WB) and 3 (UC) stay what the kit's page tables rely on. Only MSRs in `listed`
/// (KVM's own index list, not Veil's choice from it: an MSR Veil failed to save must fail the
/// test) and, where CPUID decides, only those it offers (a write would fault otherwise).
fn chosen_msrs(cpuid: &Cpuid, listed: &[u32]) -> Vec<(u32, u64)> {
    let mut chosen = vec![
        (0xc000_0081, 0x0023_0010_0000_0000), // MSR_STAR
        (0xc000_0082, 0xffff_ffff_8160_0000), // MSR_LSTAR
        (0xc000_0083, 0xffff_ffff_8160_1000), // MSR_CSTAR
        (0xc000_0084, 0x0004_7700),           // MSR_SYSCALL_MASK
        (0xc000_0102, 0xffff_8880_1234_5000), // MSR_KERNEL_GS_BASE
        (0x0000_0277, 0x0007_0506_0007_0106), // MSR_IA32_CR_PAT
    ];
    let has = |function, index, register: fn(&kvm_bindings::kvm_cpuid_entry2) -> u32, bit: u32| {
        cpuid
            .entry(function, index)
            .is_some_and(|e| register(e) & (1 << bit) != 0)
    };
    // MSR_TSC_AUX with RDTSCP (0x80000001 EDX 27) or RDPID (7.0 ECX 22).
    if has(0x8000_0001, 0, |e| e.edx, 27) || has(7, 0, |e| e.ecx, 22) {
        chosen.push((0xc000_0103, 0x2a));
    }
    // MSR_IA32_TSC_ADJUST with CPUID 7.0 EBX bit 1.
    if has(7, 0, |e| e.ebx, 1) {
        chosen.push((0x3b, 0x1_0000));
    }
    // MSR_KVM_POLL_CONTROL with KVM_FEATURE_POLL_CONTROL (0x40000001 EAX bit 12); 1 at reset.
    if has(0x4000_0001, 0, |e| e.eax, 12) {
        chosen.push((0x4b56_4d05, 0));
    }
    chosen.retain(|(index, _)| listed.contains(index));
    chosen
}

/// The program for a guest of this host, and what it checks.
pub struct StateProgram {
    pub cmdline: String,
    pub msrs: Vec<(u32, u64)>,
    /// Whether it arms a TSC deadline (CPUID offers the TSC-deadline timer).
    pub deadline: bool,
}

impl StateProgram {
    pub fn for_this_host() -> Self {
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let cpuid = Cpuid::supported(&kvm).unwrap();
        let listed = kvm.get_msr_index_list().unwrap().as_slice().to_vec();
        let msrs = chosen_msrs(&cpuid, &listed);
        let writes: Vec<String> = msrs
            .iter()
            .map(|(i, v)| format!("msr-write:index={i:#x},value={v:#x}"))
            .collect();
        let reads: Vec<String> = msrs
            .iter()
            .map(|(i, v)| format!("msr-read:index={i:#x},expect={v:#x}"))
            .collect();
        // A masked LAPIC timer in TSC-deadline mode, due in about an hour: KVM drops the
        // deadline unless the LAPIC is restored before it.
        let deadline = cpuid.entry(1, 0).is_some_and(|e| e.ecx & (1 << 24) != 0);
        let (arm, check) = if deadline {
            ("deadline-arm:ahead=0x80000000000", "deadline-check")
        } else {
            ("", "")
        };
        let cmdline = format!(
            "{} {arm} cpuid-hash wait-word:gpa={GO_GPA:#x},value={GO:#x} {} {check} cpuid-hash \
             greet spin",
            writes.join(" "),
            reads.join(" ")
        );
        Self {
            cmdline,
            msrs,
            deadline,
        }
    }

    /// Checks what the guest printed before (`before`) and after (`after`) the move.
    pub fn assert_same_after(&self, before: &str, after: &str) {
        for (index, value) in &self.msrs {
            let read = format!("msr {index:#x}: msr-read ok: {value:#x}");
            assert!(after.contains(&read), "{read} not in\n{after}");
        }
        if self.deadline {
            assert!(before.contains("deadline-arm ok"), "{before}");
            assert!(after.contains("deadline-check ok"), "{after}");
        }
        let hash = |text: &str| {
            text.lines()
                .find(|l| l.starts_with("cpuid-hash: "))
                .map(str::to_owned)
        };
        assert!(hash(before).is_some(), "{before}");
        assert_eq!(
            hash(before),
            hash(after),
            "before:\n{before}\nafter:\n{after}"
        );
    }
}
