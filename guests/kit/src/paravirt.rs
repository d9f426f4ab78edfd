//! The paravirtual calls an SEV guest makes: `KVM_HC_MAP_GPA_RANGE` and
//! `MSR_KVM_MIGRATION_CONTROL`, through whichever hypercall transport the VMM advertises.

use core::arch::asm;
use core::arch::x86_64::__cpuid;

use veil_guest_abi::{
    VEIL_CPUID_FEATURES, VEIL_CPUID_SIGNATURE, VEIL_CPUID_SIGNATURE_WORD,
    VEIL_FEATURE_HYPERCALL_PORT,
};

/// `MSR_KVM_MIGRATION_CONTROL` (Documentation/virt/kvm/x86/msr.rst).
pub const MSR_KVM_MIGRATION_CONTROL: u32 = 0x4b56_4d08;

/// CPUID Fn8000_001F, "Encrypted Memory Capabilities" (AMD APM vol. 3, appendix E.4.17):
/// EAX bit 1 is SEV, EBX[5:0] the C-bit's position. Veil's SEV guests see it (docs/sev.md).
const CPUID_MEM_ENCRYPT: u32 = 0x8000_001f;
const CPUID_MEM_ENCRYPT_SEV: u32 = 1 << 1;

/// The C-bit's position when this guest runs with encrypted memory (SEV), else `None`.
///
/// From CPUID alone: it says the host keeps a page-state map, so the kit shares its DMA pages
/// with the hypercall (on Veil's emulated platform too, where nothing is encrypted). Whether
/// the kit's own mappings carry the C-bit is decided once at entry, as Linux decides it, by
/// MSR_AMD64_SEV as well (`paging::c_bit_mask`): Veil answers that MSR for emulated guests
/// with "not active"; on hardware the CPU answers.
pub fn memory_encryption_c_bit() -> Option<u32> {
    if __cpuid(0x8000_0000).eax < CPUID_MEM_ENCRYPT {
        return None;
    }
    let leaf = __cpuid(CPUID_MEM_ENCRYPT);
    (leaf.eax & CPUID_MEM_ENCRYPT_SEV != 0).then_some(leaf.ebx & 0x3f)
}

/// How this guest reaches the hypervisor's hypercall handler.
#[derive(Clone, Copy)]
pub enum Transport {
    /// `vmmcall`: KVM exits to the VMM.
    Vmmcall,
    /// Veil's I/O-port transport at this port (must be below 0x100; see the ABI crate).
    Port(u8),
}

/// What the VMM advertises in Veil's CPUID leaves; `vmmcall` when they are absent.
pub fn transport() -> Transport {
    let sig = __cpuid(VEIL_CPUID_SIGNATURE);
    let is_veil = [sig.ebx, sig.ecx, sig.edx] == [VEIL_CPUID_SIGNATURE_WORD; 3]
        && sig.eax >= VEIL_CPUID_FEATURES;
    if is_veil {
        let features = __cpuid(VEIL_CPUID_FEATURES);
        if features.eax & VEIL_FEATURE_HYPERCALL_PORT != 0 {
            if let Ok(port) = u8::try_from(features.ebx) {
                return Transport::Port(port);
            }
        }
    }
    Transport::Vmmcall
}

/// Issues hypercall `nr` with a0..a2 and returns RAX.
#[inline(never)]
pub fn hypercall(transport: Transport, nr: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    let mut rax = nr;
    match transport {
        // SAFETY: the hypercall only changes RAX (the result); the VMM reads the registers.
        // LLVM reserves RBX, so a0 is swapped in and out around the call.
        Transport::Vmmcall => unsafe {
            asm!("xchg {a0}, rbx", "vmmcall", "xchg {a0}, rbx", a0 = inout(reg) a0 => _,
                 inout("rax") rax, in("rcx") a1, in("rdx") a2, options(nostack))
        },
        // SAFETY: as above. `in eax, imm8` leaves RDX (a2) for the VMM to read and returns the
        // result in EAX, which `movsxd` sign-extends into RAX. The port is an immediate, so each
        // possible port is its own instruction: only Veil's is used.
        Transport::Port(veil_guest_abi::HYPERCALL_PORT_U8) => unsafe {
            asm!("xchg {a0}, rbx", "in eax, {port}", "movsxd rax, eax", "xchg {a0}, rbx",
                 port = const veil_guest_abi::HYPERCALL_PORT_U8, a0 = inout(reg) a0 => _,
                 inout("rax") rax, in("rcx") a1, in("rdx") a2, options(nostack))
        },
        Transport::Port(_) => return u64::MAX,
    }
    rax
}

/// Writes an MSR (a refused write is a #GP, which on these hosts stops the VM).
pub fn wrmsr(index: u32, value: u64) {
    // SAFETY: writes one MSR the VMM emulates; no memory is touched.
    unsafe {
        asm!("wrmsr", in("ecx") index, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, nomem))
    }
}

/// Reads an MSR.
pub fn rdmsr(index: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: reads one MSR the VMM emulates; no memory is touched.
    unsafe { asm!("rdmsr", in("ecx") index, out("eax") lo, out("edx") hi, options(nostack, nomem)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// The same instructions as [`hypercall`], but the `out` goes to a port nobody claims: the bare
/// exit a hypercall round trip is compared with, so the difference is the handler's cost.
/// Never inlined, like [`hypercall`], so both cost the guest the same instructions.
#[inline(never)]
pub fn bare_exit(transport: Transport, nr: u64, a0: u64, a1: u64, a2: u64) -> u64 {
    let mut rax = nr;
    match transport {
        // SAFETY: port 0x80 (the POST diagnostic port) has no device in Veil; the write exits.
        Transport::Vmmcall | Transport::Port(veil_guest_abi::HYPERCALL_PORT_U8) => unsafe {
            asm!("xchg {a0}, rbx", "in eax, 0x80", "movsxd rax, eax", "xchg {a0}, rbx",
                 a0 = inout(reg) a0 => _, inout("rax") rax, in("rcx") a1, in("rdx") a2,
                 options(nostack))
        },
        Transport::Port(_) => return u64::MAX,
    }
    rax
}
