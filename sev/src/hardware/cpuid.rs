//! What the host CPU says about SEV (CPUID Fn8000_001F, AMD APM volume 3, appendix E.4.17),
//! for the guest's CPUID: an SEV guest needs the C-bit position to build its page tables.

/// The leaf of AMD's memory-encryption features.
pub const CPUID_MEMORY_ENCRYPTION: u32 = 0x8000_001f;
/// EAX bit 1: SEV is supported.
const EAX_SEV: u32 = 1 << 1;
/// The highest extended leaf, in EAX of Fn8000_0000.
const CPUID_MAX_EXTENDED: u32 = 0x8000_0000;

/// The C-bit and the physical-address reduction of this CPU's SEV.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SevCpuid {
    /// Page-table bit that marks a page encrypted (EBX[5:0]).
    pub c_bit: u8,
    /// Physical-address bits lost when memory encryption is on (EBX[11:6]).
    pub phys_addr_reduction: u8,
}

impl SevCpuid {
    /// Decodes Fn8000_001F; `None` when EAX does not report SEV.
    pub fn from_leaf(eax: u32, ebx: u32) -> Option<Self> {
        if eax & EAX_SEV == 0 {
            return None;
        }
        Some(Self {
            c_bit: (ebx & 0x3f) as u8,
            phys_addr_reduction: ((ebx >> 6) & 0x3f) as u8,
        })
    }

    /// EBX as the guest should see it (the same two fields, nothing else).
    pub fn ebx(self) -> u32 {
        u32::from(self.c_bit) | (u32::from(self.phys_addr_reduction) << 6)
    }

    /// Fn8000_001F's `(EAX, EBX)` for a plain-SEV guest: SEV alone (no SME, SEV-ES or SNP,
    /// which Veil does not offer) and this C-bit and reduction.
    pub fn guest_leaf(self) -> (u32, u32) {
        (EAX_SEV, self.ebx())
    }
}

/// This CPU's SEV C-bit and address reduction, or `None` when it has no SEV. A CPU reporting
/// SEV does not mean the firmware has it enabled: that is for `/dev/sev` to say.
pub fn sev_cpuid() -> Option<SevCpuid> {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::__cpuid;
        // Reading a leaf past the maximum returns another leaf's data on Intel, so check first.
        if __cpuid(CPUID_MAX_EXTENDED).eax < CPUID_MEMORY_ENCRYPTION {
            return None;
        }
        let leaf = __cpuid(CPUID_MEMORY_ENCRYPTION);
        SevCpuid::from_leaf(leaf.eax, leaf.ebx)
    }
    #[cfg(not(target_arch = "x86_64"))]
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_c_bit_and_reduction_of_an_epyc() {
        // Milan: SME|SEV|..., C-bit 51, 1 bit of reduction.
        let cpu = SevCpuid::from_leaf(0x0001_fffb, 0x0000_0073).unwrap();
        assert_eq!(
            cpu,
            SevCpuid {
                c_bit: 51,
                phys_addr_reduction: 1
            }
        );
        assert_eq!(cpu.ebx(), 0x73);
    }

    #[test]
    fn ignores_other_ebx_bits_and_needs_the_sev_bit() {
        let cpu = SevCpuid::from_leaf(EAX_SEV, 0xffff_f000 | (5 << 6) | 47).unwrap();
        assert_eq!((cpu.c_bit, cpu.phys_addr_reduction), (47, 5));
        // SME alone (bit 0) is not SEV.
        assert_eq!(SevCpuid::from_leaf(1, 0x73), None);
    }

    #[test]
    fn the_host_answers_without_panicking() {
        // This host has no SEV in the hypervisor sense; what its CPUID says is informational.
        println!("host SEV CPUID: {:?}", sev_cpuid());
    }
}
