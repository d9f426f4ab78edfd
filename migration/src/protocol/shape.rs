//! What the migrating VM looks like: RAM layout, vCPUs, SEV, CPUID. The target builds its VM
//! from this and checks every page the source sends against it.
//!
//! A [`VmShape`] can only be built valid (sorted, aligned, disjoint RAM regions inside the
//! 52-bit address space; bounded counts), so code holding one never re-checks it.

use std::ops::Range;

use veil_sev::policy::GuestPolicy;

use super::limits::{GPA_LIMIT, MAX_CPUID_ENTRIES, MAX_REGIONS, MAX_VCPUS, PAGE_SIZE};

const PAGE: u64 = PAGE_SIZE as u64;

/// A shape or a page list that cannot be.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShapeError {
    #[error("The VM has no RAM")]
    NoMemory,
    #[error("{count} RAM regions, at most {MAX_REGIONS}")]
    TooManyRegions { count: usize },
    #[error("RAM region {gpa:#x}+{len:#x} is empty or not page-aligned")]
    BadRegion { gpa: u64, len: u64 },
    #[error("RAM region {gpa:#x}+{len:#x} ends beyond the 52-bit address space")]
    RegionBeyondAddressSpace { gpa: u64, len: u64 },
    #[error("RAM region at {gpa:#x} overlaps or precedes the previous one")]
    RegionsOutOfOrder { gpa: u64 },
    #[error("{count} vCPUs: must be 1 to {MAX_VCPUS}")]
    BadVcpuCount { count: u32 },
    #[error("{count} CPUID entries, at most {MAX_CPUID_ENTRIES}")]
    TooManyCpuidEntries { count: usize },
    #[error("CPUID leaf {function:#x} index {index} listed twice")]
    RepeatedCpuidEntry { function: u32, index: u32 },
    #[error("Page {gfn:#x} is outside the VM's RAM")]
    GfnOutsideRam { gfn: u64 },
    #[error("Page {gfn:#x} appears twice in one chunk")]
    RepeatedGfn { gfn: u64 },
}

/// One range of guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryRegion {
    /// Guest-physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

impl MemoryRegion {
    /// The guest frame numbers it covers (only meaningful for a region of a valid shape).
    pub fn gfns(&self) -> Range<u64> {
        self.gpa / PAGE..self.gpa.saturating_add(self.len) / PAGE
    }
}

/// Which SEV firmware runs the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SevPlatform {
    /// Veil's software model of the firmware: no confidentiality.
    Emulated,
    /// The AMD Secure Processor.
    Hardware,
}

impl SevPlatform {
    pub(crate) fn code(self) -> u8 {
        match self {
            SevPlatform::Emulated => 1,
            SevPlatform::Hardware => 2,
        }
    }

    pub(crate) fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(SevPlatform::Emulated),
            2 => Some(SevPlatform::Hardware),
            _ => None,
        }
    }
}

/// An SEV guest's migration-relevant facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SevShape {
    /// The policy the guest was launched with.
    pub policy: GuestPolicy,
    pub platform: SevPlatform,
}

/// One CPUID entry the guest sees, as in `kvm_cpuid_entry2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    /// `KVM_CPUID_FLAG_*`.
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

impl From<&kvm_bindings::kvm_cpuid_entry2> for CpuidEntry {
    fn from(e: &kvm_bindings::kvm_cpuid_entry2) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        }
    }
}

impl From<&CpuidEntry> for kvm_bindings::kvm_cpuid_entry2 {
    fn from(e: &CpuidEntry) -> Self {
        Self {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        }
    }
}

/// The VM being migrated, as the source describes it in Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmShape {
    memory: Vec<MemoryRegion>,
    vcpus: u32,
    sev: Option<SevShape>,
    cpuid: Vec<CpuidEntry>,
    /// The guest's TSC rate in kHz, if the source knows it.
    tsc_khz: Option<u32>,
}

impl VmShape {
    /// Checks and builds a shape: RAM regions non-empty, page-aligned, sorted, disjoint and
    /// below 2^52; 1 to [`MAX_VCPUS`] vCPUs; CPUID entries bounded and unique.
    pub fn new(
        memory: Vec<MemoryRegion>,
        vcpus: u32,
        sev: Option<SevShape>,
        cpuid: Vec<CpuidEntry>,
    ) -> Result<Self, ShapeError> {
        if memory.is_empty() {
            return Err(ShapeError::NoMemory);
        }
        if memory.len() > MAX_REGIONS {
            return Err(ShapeError::TooManyRegions {
                count: memory.len(),
            });
        }
        let mut previous_end = 0;
        for &MemoryRegion { gpa, len } in &memory {
            if len == 0 || !gpa.is_multiple_of(PAGE) || !len.is_multiple_of(PAGE) {
                return Err(ShapeError::BadRegion { gpa, len });
            }
            if gpa.checked_add(len).is_none_or(|end| end > GPA_LIMIT) {
                return Err(ShapeError::RegionBeyondAddressSpace { gpa, len });
            }
            if gpa < previous_end {
                return Err(ShapeError::RegionsOutOfOrder { gpa });
            }
            previous_end = gpa + len;
        }
        if vcpus == 0 || vcpus > MAX_VCPUS {
            return Err(ShapeError::BadVcpuCount { count: vcpus });
        }
        if cpuid.len() > MAX_CPUID_ENTRIES {
            return Err(ShapeError::TooManyCpuidEntries { count: cpuid.len() });
        }
        let mut leaves: Vec<(u32, u32)> = cpuid.iter().map(|e| (e.function, e.index)).collect();
        leaves.sort_unstable();
        if let Some(w) = leaves.windows(2).find(|w| w[0] == w[1]) {
            return Err(ShapeError::RepeatedCpuidEntry {
                function: w[0].0,
                index: w[0].1,
            });
        }
        Ok(Self {
            memory,
            vcpus,
            sev,
            cpuid,
            tsc_khz: None,
        })
    }

    /// The same shape, with the guest's TSC rate (kHz; `None` or 0: unknown).
    pub fn with_tsc_khz(mut self, khz: Option<u32>) -> Self {
        self.tsc_khz = khz.filter(|&k| k != 0);
        self
    }

    /// The guest's TSC rate in kHz, if the source told it: a target that can neither match
    /// nor scale it refuses an invariant-TSC guest before any memory is sent.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.tsc_khz
    }

    /// The RAM regions, sorted and disjoint.
    pub fn memory(&self) -> &[MemoryRegion] {
        &self.memory
    }

    pub fn vcpus(&self) -> u32 {
        self.vcpus
    }

    /// `Some` for an SEV guest.
    pub fn sev(&self) -> Option<&SevShape> {
        self.sev.as_ref()
    }

    /// The CPUID entries the guest sees, in the source's order.
    pub fn cpuid(&self) -> &[CpuidEntry] {
        &self.cpuid
    }

    /// Bytes of RAM.
    pub fn ram_bytes(&self) -> u64 {
        self.memory.iter().map(|r| r.len).sum()
    }

    /// Whether `gfn` is a page of RAM.
    pub fn contains_gfn(&self, gfn: u64) -> bool {
        // The last region starting at or below the page's address.
        let gpa = gfn.saturating_mul(PAGE);
        let after = self.memory.partition_point(|r| r.gpa <= gpa);
        after > 0 && self.memory[after - 1].gfns().contains(&gfn)
    }

    /// Checks one chunk's page numbers: every one in RAM, none twice.
    pub fn check_gfns(&self, gfns: impl Iterator<Item = u64>) -> Result<(), ShapeError> {
        let mut seen = Vec::with_capacity(gfns.size_hint().0);
        for gfn in gfns {
            if !self.contains_gfn(gfn) {
                return Err(ShapeError::GfnOutsideRam { gfn });
            }
            seen.push(gfn);
        }
        seen.sort_unstable();
        match seen.windows(2).find(|w| w[0] == w[1]) {
            Some(w) => Err(ShapeError::RepeatedGfn { gfn: w[0] }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// 1 GiB below the 32-bit hole and 1 GiB above 4 GiB, 2 vCPUs.
    pub(crate) fn two_region_shape(sev: Option<SevShape>) -> VmShape {
        VmShape::new(
            vec![
                MemoryRegion {
                    gpa: 0,
                    len: 1 << 30,
                },
                MemoryRegion {
                    gpa: 1 << 32,
                    len: 1 << 30,
                },
            ],
            2,
            sev,
            vec![CpuidEntry {
                function: 0,
                index: 0,
                flags: 0,
                eax: 0xd,
                ebx: 0x6874_7541,
                ecx: 0x444d_4163,
                edx: 0x6974_6e65,
            }],
        )
        .unwrap()
    }

    fn region(gpa: u64, len: u64) -> MemoryRegion {
        MemoryRegion { gpa, len }
    }

    #[test]
    fn shapes_are_checked_when_built() {
        let shape = |memory: Vec<MemoryRegion>| VmShape::new(memory, 1, None, vec![]);
        assert_eq!(shape(vec![]), Err(ShapeError::NoMemory));
        assert!(matches!(
            shape(vec![region(0, 0)]),
            Err(ShapeError::BadRegion { .. })
        ));
        assert!(matches!(
            shape(vec![region(0x800, 0x1000)]),
            Err(ShapeError::BadRegion { .. })
        ));
        assert!(matches!(
            shape(vec![region(GPA_LIMIT - 0x1000, 0x2000)]),
            Err(ShapeError::RegionBeyondAddressSpace { .. })
        ));
        assert!(matches!(
            shape(vec![region(!0xfff, 0x1000)]),
            Err(ShapeError::RegionBeyondAddressSpace { .. })
        ));
        assert!(matches!(
            shape(vec![region(0x10000, 0x2000), region(0x11000, 0x1000)]),
            Err(ShapeError::RegionsOutOfOrder { gpa: 0x11000 })
        ));
        assert!(matches!(
            shape(vec![region(0x10000, 0x1000), region(0, 0x1000)]),
            Err(ShapeError::RegionsOutOfOrder { gpa: 0 })
        ));
        assert!(shape(vec![region(0, 0x1000), region(0x1000, 0x1000)]).is_ok());
        assert!(matches!(
            shape(vec![region(0, 0x1000); MAX_REGIONS + 1]),
            Err(ShapeError::TooManyRegions { .. })
        ));
        let one = vec![region(0, 0x1000)];
        assert!(matches!(
            VmShape::new(one.clone(), 0, None, vec![]),
            Err(ShapeError::BadVcpuCount { count: 0 })
        ));
        assert!(VmShape::new(one.clone(), MAX_VCPUS + 1, None, vec![]).is_err());
        let leaf = two_region_shape(None).cpuid()[0];
        assert!(matches!(
            VmShape::new(one.clone(), 1, None, vec![leaf, leaf]),
            Err(ShapeError::RepeatedCpuidEntry { .. })
        ));
        assert!(VmShape::new(one, 1, None, vec![leaf; MAX_CPUID_ENTRIES + 1]).is_err());
    }

    #[test]
    fn pages_are_found_in_the_right_region() {
        let shape = two_region_shape(None);
        let first_end = (1 << 30) / PAGE;
        let second = (1 << 32) / PAGE;
        assert!(shape.contains_gfn(0));
        assert!(shape.contains_gfn(first_end - 1));
        assert!(!shape.contains_gfn(first_end));
        assert!(!shape.contains_gfn(second - 1));
        assert!(shape.contains_gfn(second));
        assert!(shape.contains_gfn(second + first_end - 1));
        assert!(!shape.contains_gfn(second + first_end));
        assert!(!shape.contains_gfn(u64::MAX));
        assert_eq!(shape.ram_bytes(), 2 << 30);
    }

    #[test]
    fn a_chunk_may_not_leave_ram_or_repeat_a_page() {
        let shape = two_region_shape(None);
        assert_eq!(shape.check_gfns([3, 1, 2].into_iter()), Ok(()));
        assert_eq!(
            shape.check_gfns([1, 2, 1].into_iter()),
            Err(ShapeError::RepeatedGfn { gfn: 1 })
        );
        assert_eq!(
            shape.check_gfns([1, 1 << 18].into_iter()),
            Err(ShapeError::GfnOutsideRam { gfn: 1 << 18 })
        );
    }
}
