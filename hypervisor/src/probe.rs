//! What this host's KVM can do for Veil, found by asking it (and, for hypercall exits, by trying).

use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_enable_cap, kvm_regs, kvm_segment, kvm_userspace_memory_region};
use kvm_ioctls::{Cap, Kvm, VcpuExit};
use serde::Serialize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::host::{open_kvm, HostError};
use crate::vcpu::{install_kick_handler, kick_thread, KickTarget};

/// `KVM_CAP_EXIT_HYPERCALL`.
pub const KVM_CAP_EXIT_HYPERCALL: u32 = 201;
/// `KVM_CAP_X86_USER_SPACE_MSR`.
pub const KVM_CAP_X86_USER_SPACE_MSR: u32 = 188;
/// `KVM_CAP_X86_MSR_FILTER`.
pub const KVM_CAP_X86_MSR_FILTER: u32 = 189;
/// `KVM_CAP_DIRTY_LOG_RING`.
pub const KVM_CAP_DIRTY_LOG_RING: u32 = 192;
/// `KVM_CAP_VM_TYPES`.
pub const KVM_CAP_VM_TYPES: u32 = 235;
/// `KVM_HC_MAP_GPA_RANGE`, the hypercall the probe issues.
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;
/// How long the probe guest may take to reach userspace with its hypercall.
pub const HYPERCALL_PROBE_DEADLINE: Duration = Duration::from_millis(60);
/// Where the probe's verdict is kept for the rest of this host's boot.
const PROBE_CACHE_DIR: &str = "/run/veil";

/// One KVM capability and what Veil uses it for.
#[derive(Debug, Clone, Serialize)]
pub struct Capability {
    pub name: &'static str,
    pub id: u32,
    /// `KVM_CHECK_EXTENSION`'s answer (0 = absent; some capabilities return a mask or size).
    pub value: i32,
    pub used_for: &'static str,
}

/// SEV support on this host.
#[derive(Debug, Clone, Serialize)]
pub struct SevSupport {
    /// `/dev/sev` exists.
    pub dev_sev: bool,
    /// CPUID 0x8000001F EAX bit 1.
    pub cpu_sev: bool,
    /// CPUID 0x8000001F EAX bit 3.
    pub cpu_sev_es: bool,
    /// CPUID 0x8000001F EAX bit 4.
    pub cpu_sev_snp: bool,
    /// The C-bit position (CPUID 0x8000001F EBX[5:0]) when SEV is present.
    pub c_bit: Option<u8>,
    /// KVM accepts SEV VMs (`KVM_CAP_VM_TYPES` has `KVM_X86_SEV_VM`).
    pub kvm_sev_vm_type: bool,
    /// In a sentence.
    pub summary: String,
}

/// Whether `KVM_EXIT_HYPERCALL` actually reaches userspace.
#[derive(Debug, Clone, Serialize)]
pub struct HypercallProbe {
    pub delivered: bool,
    pub detail: String,
    pub elapsed_us: u64,
}

/// Everything `veil host-info` reports.
#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    pub kvm_api_version: i32,
    pub max_vcpus: usize,
    pub recommended_vcpus: usize,
    pub capabilities: Vec<Capability>,
    pub vm_types: Vec<&'static str>,
    pub sev: SevSupport,
    pub hypercall_exits: HypercallProbe,
}

/// Probes the host; well under a second, never hangs.
pub fn probe_host() -> Result<HostInfo, HostError> {
    let kvm = open_kvm()?;
    let check = |id: u32| kvm.check_extension_raw(u64::from(id));
    let capabilities = vec![
        Capability {
            name: "KVM_CAP_EXIT_HYPERCALL",
            id: KVM_CAP_EXIT_HYPERCALL,
            value: check(KVM_CAP_EXIT_HYPERCALL),
            used_for: "page-encryption hypercall exits",
        },
        Capability {
            name: "KVM_CAP_X86_USER_SPACE_MSR",
            id: KVM_CAP_X86_USER_SPACE_MSR,
            value: check(KVM_CAP_X86_USER_SPACE_MSR),
            used_for: "migration-control MSR in userspace",
        },
        Capability {
            name: "KVM_CAP_X86_MSR_FILTER",
            id: KVM_CAP_X86_MSR_FILTER,
            value: check(KVM_CAP_X86_MSR_FILTER),
            used_for: "routing the migration-control MSR to Veil",
        },
        Capability {
            name: "KVM_CAP_SYNC_MMU",
            id: Cap::SyncMmu as u32,
            value: check(Cap::SyncMmu as u32),
            used_for: "file-backed guest RAM",
        },
        Capability {
            name: "KVM_CAP_USER_MEMORY",
            id: Cap::UserMemory as u32,
            value: check(Cap::UserMemory as u32),
            used_for: "guest RAM slots and KVM_GET_DIRTY_LOG for migration",
        },
        Capability {
            name: "KVM_CAP_DIRTY_LOG_RING",
            id: KVM_CAP_DIRTY_LOG_RING,
            value: check(KVM_CAP_DIRTY_LOG_RING),
            used_for: "dirty ring (not used yet)",
        },
        Capability {
            name: "KVM_CAP_IRQCHIP",
            id: Cap::Irqchip as u32,
            value: check(Cap::Irqchip as u32),
            used_for: "in-kernel LAPIC, IOAPIC and PIC",
        },
        Capability {
            name: "KVM_CAP_VM_TYPES",
            id: KVM_CAP_VM_TYPES,
            value: check(KVM_CAP_VM_TYPES),
            used_for: "SEV VM types",
        },
    ];
    let vm_types_mask = check(KVM_CAP_VM_TYPES).max(0) as u32;
    let vm_types = [
        (0, "default"),
        (1, "sw-protected"),
        (2, "sev"),
        (3, "sev-es"),
        (4, "sev-snp"),
    ]
    .into_iter()
    .filter(|(bit, _)| vm_types_mask & (1 << bit) != 0 || (*bit == 0 && vm_types_mask == 0))
    .map(|(_, name)| name)
    .collect();
    Ok(HostInfo {
        kvm_api_version: kvm.get_api_version(),
        max_vcpus: kvm.get_max_vcpus(),
        recommended_vcpus: kvm.get_nr_vcpus(),
        capabilities,
        vm_types,
        sev: sev_support(vm_types_mask),
        hypercall_exits: probe_hypercall_exits(&kvm),
    })
}

fn sev_support(vm_types_mask: u32) -> SevSupport {
    let dev_sev = std::path::Path::new("/dev/sev").exists();
    let max_ext = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    let leaf = (max_ext >= 0x8000_001f).then(|| std::arch::x86_64::__cpuid(0x8000_001f));
    let eax = leaf.map_or(0, |l| l.eax);
    let cpu_sev = eax & (1 << 1) != 0;
    let kvm_sev_vm_type = vm_types_mask & (1 << 2) != 0;
    let summary = match (cpu_sev, dev_sev, kvm_sev_vm_type) {
        (true, true, true) => "SEV is available".to_string(),
        (false, _, _) => "no SEV: the CPU does not report SEV (CPUID 0x8000001F)".to_string(),
        (true, false, _) => "no SEV: /dev/sev is missing (is the ccp module loaded?)".to_string(),
        (true, true, false) => {
            "no SEV: KVM does not offer the SEV VM type (kvm_amd sev=1?)".to_string()
        }
    };
    SevSupport {
        dev_sev,
        cpu_sev,
        cpu_sev_es: eax & (1 << 3) != 0,
        cpu_sev_snp: eax & (1 << 4) != 0,
        c_bit: cpu_sev.then(|| leaf.map_or(0, |l| (l.ebx & 0x3f) as u8)),
        kvm_sev_vm_type,
        summary,
    }
}

/// Runs a one-instruction long-mode guest (`vmmcall` with `KVM_HC_MAP_GPA_RANGE`) and waits up
/// to [`HYPERCALL_PROBE_DEADLINE`] for the hypercall exit.
pub fn probe_hypercall_exits(kvm: &Kvm) -> HypercallProbe {
    let start = Instant::now();
    let (delivered, detail) = match run_hypercall_guest(kvm) {
        Ok(Some(detail)) => (true, detail),
        Ok(None) => (
            false,
            format!(
                "a vmmcall did not exit within {} ms (the vCPU spins on the instruction)",
                HYPERCALL_PROBE_DEADLINE.as_millis()
            ),
        ),
        Err(detail) => (false, detail),
    };
    HypercallProbe {
        delivered,
        detail,
        elapsed_us: start.elapsed().as_micros() as u64,
    }
}

/// Whether hypercall exits reach userspace on this host, remembered per host boot so a VM
/// start does not pay for the probe's deadline each time.
pub fn hypercall_exits_delivered(kvm: &Kvm) -> bool {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cache = std::path::Path::new(PROBE_CACHE_DIR).join(format!("hypercall-exits-{boot_id}"));
    if !boot_id.is_empty() {
        match std::fs::read(&cache).as_deref() {
            Ok(b"delivered") => return true,
            Ok(b"missing") => return false,
            _ => {}
        }
    }
    let delivered = probe_hypercall_exits(kvm).delivered;
    if !boot_id.is_empty() {
        // Best effort: without a cache the next start probes again.
        let _ = std::fs::create_dir_all(PROBE_CACHE_DIR)
            .and_then(|()| std::fs::write(&cache, if delivered { "delivered" } else { "missing" }));
    }
    delivered
}

/// Code of the probe guest: `vmmcall; hlt`.
const PROBE_CODE: [u8; 4] = [0x0f, 0x01, 0xd9, 0xf4];
const PROBE_PML4: u64 = 0x1000;
const PROBE_CODE_ADDR: u64 = 0x4000;
const PROBE_MEMORY: usize = 2 << 20;

fn run_hypercall_guest(kvm: &Kvm) -> Result<Option<String>, String> {
    let supported = kvm.check_extension_raw(u64::from(KVM_CAP_EXIT_HYPERCALL));
    if supported & (1 << KVM_HC_MAP_GPA_RANGE) == 0 {
        return Err("KVM cannot exit to userspace on KVM_HC_MAP_GPA_RANGE".into());
    }
    let vm = kvm
        .create_vm()
        .map_err(|e| format!("cannot create a VM: {e}"))?;
    vm.enable_cap(&kvm_enable_cap {
        cap: KVM_CAP_EXIT_HYPERCALL,
        args: [1 << KVM_HC_MAP_GPA_RANGE, 0, 0, 0],
        ..Default::default()
    })
    .map_err(|e| format!("cannot enable hypercall exits: {e}"))?;
    let memory: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), PROBE_MEMORY)])
        .map_err(|e| format!("cannot map probe memory: {e}"))?;
    let region = memory.iter().next().ok_or("no probe memory")?;
    // Identity-map the first 2 MiB with one large page.
    let tables = [(PROBE_PML4, 0x2003u64), (0x2000, 0x3003), (0x3000, 0x83)];
    for (addr, entry) in tables {
        memory
            .write_obj(entry, GuestAddress(addr))
            .map_err(|e| e.to_string())?;
    }
    memory
        .write_slice(&PROBE_CODE, GuestAddress(PROBE_CODE_ADDR))
        .map_err(|e| e.to_string())?;
    // SAFETY: `memory` outlives the VM (both are dropped at the end of this function, the VM
    // first since the vCPU thread that holds it is joined or leaked before `memory` drops).
    unsafe {
        vm.set_user_memory_region(kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: PROBE_MEMORY as u64,
            userspace_addr: region.as_ptr() as u64,
        })
    }
    .map_err(|e| format!("cannot register probe memory: {e}"))?;
    let mut vcpu = vm
        .create_vcpu(0)
        .map_err(|e| format!("cannot create a vCPU: {e}"))?;
    enter_long_mode(&vcpu).map_err(|e| format!("cannot set up long mode: {e}"))?;
    vcpu.set_regs(&kvm_regs {
        rip: PROBE_CODE_ADDR,
        rax: KVM_HC_MAP_GPA_RANGE,
        rbx: 0,
        rcx: 1,
        rdx: 1 << 4,
        rflags: 2,
        ..Default::default()
    })
    .map_err(|e| format!("cannot set registers: {e}"))?;
    install_kick_handler().map_err(|e| format!("cannot install the kick handler: {e}"))?;

    let (tx, rx) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("hypercall-probe".into())
        .spawn(move || {
            let kick = KickTarget::arm(&mut vcpu);
            let outcome = match vcpu.run() {
                Ok(VcpuExit::Hypercall(call)) => Ok(Some(format!(
                    "KVM_EXIT_HYPERCALL arrived (nr {}, long mode {})",
                    call.nr, call.longmode
                ))),
                Ok(VcpuExit::InternalError) => Err("vmmcall caused an emulation failure".into()),
                Ok(other) => Err(format!(
                    "vmmcall gave {other:?} instead of a hypercall exit"
                )),
                Err(e) if e.errno() == libc::EINTR => Ok(None),
                Err(e) => Err(format!("KVM_RUN failed: {e}")),
            };
            drop(kick);
            let _ = tx.send(outcome.clone());
            outcome
        })
        .map_err(|e| format!("cannot start the probe thread: {e}"))?;
    let handle = std::os::unix::thread::JoinHandleExt::as_pthread_t(&thread);
    let result = match rx.recv_timeout(HYPERCALL_PROBE_DEADLINE) {
        Ok(outcome) => outcome,
        Err(_) => {
            kick_thread(handle);
            rx.recv_timeout(Duration::from_millis(500))
                .unwrap_or(Ok(None))
        }
    };
    if thread.is_finished() {
        let _ = thread.join();
    } else {
        // The vCPU would not leave the guest even when kicked; leak the thread and its memory
        // rather than hang the probe.
        std::mem::forget(memory);
        std::mem::forget(vm);
    }
    result
}

fn enter_long_mode(vcpu: &kvm_ioctls::VcpuFd) -> Result<(), kvm_ioctls::Error> {
    let mut sregs = vcpu.get_sregs()?;
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        l: 0,
        db: 1,
        ..code
    };
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.cr3 = PROBE_PML4;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 0x8000_0033; // PG | NE | ET | MP | PE
    sregs.efer = 0x500; // LMA | LME
    vcpu.set_sregs(&sregs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_answers_quickly_and_names_the_hypercall_outcome() {
        if !std::path::Path::new(crate::host::KVM_DEVICE).exists() {
            eprintln!("skipped: no /dev/kvm on this host");
            return;
        }
        let start = Instant::now();
        let info = probe_host().unwrap();
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(info.kvm_api_version, 12);
        assert!(!info.hypercall_exits.detail.is_empty());
        println!("{}", serde_json::to_string_pretty(&info).unwrap());
    }
}
