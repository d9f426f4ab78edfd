//! The CPUID a guest sees: what KVM supports, plus bits other crates add.

use kvm_bindings::{kvm_cpuid_entry2, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::Kvm;

/// KVM's hypervisor leaves (Documentation/virt/kvm/x86/cpuid.rst).
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// KVM paravirt feature bits (EAX).
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// "KVMKVMKVM\0\0\0" in EBX, ECX, EDX.
const KVM_SIGNATURE: [u32; 3] = [0x4b4d_564b, 0x564b_4d56, 0x0000_004d];

/// A register of a CPUID leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// The leaves (function, index) and registers whose bits are features a host must have to
/// run a guest given them: the vendor (which must match exactly), leaf 1's flags, thermal and
/// power (6), structured extended features (7.0 to 7.2), the XCR0 and XSS components
/// (0xD.0, 0xD.1), the extended flags (0x80000001), advanced power management with the
/// invariant TSC (0x80000007), 0x80000008's and 0x80000021's feature bits, and KVM's
/// paravirtual features (0x40000001). A migrated guest keeps its whole CPUID (family, model,
/// caches, topology): those are values, not features, and are not compared; the physical and
/// linear address widths are compared as numbers (see [`Cpuid::missing_features`]).
pub const FEATURE_LEAVES: &[(u32, u32, &[Register])] = &[
    (0, 0, &[Register::Ebx, Register::Ecx, Register::Edx]),
    (1, 0, &[Register::Ecx, Register::Edx]),
    (6, 0, &[Register::Eax]),
    (7, 0, &[Register::Ebx, Register::Ecx, Register::Edx]),
    (7, 1, &[Register::Eax, Register::Edx]),
    (7, 2, &[Register::Edx]),
    (0xd, 0, &[Register::Eax, Register::Edx]),
    (0xd, 1, &[Register::Eax, Register::Ecx, Register::Edx]),
    (KVM_CPUID_FEATURES, 0, &[Register::Eax]),
    (0x8000_0001, 0, &[Register::Ecx, Register::Edx]),
    (0x8000_0007, 0, &[Register::Edx]),
    (0x8000_0008, 0, &[Register::Ebx]),
    (0x8000_0021, 0, &[Register::Eax]),
];

/// KVM paravirtual features Veil implements itself, in userspace, whatever KVM reports:
/// `KVM_FEATURE_HC_MAP_GPA_RANGE` and `KVM_FEATURE_MIGRATION_CONTROL` (see
/// [`crate::paravirt::setup::advertise`]).
const VEIL_KVM_FEATURES: u32 = crate::paravirt::setup::KVM_FEATURE_HC_MAP_GPA_RANGE
    | crate::paravirt::setup::KVM_FEATURE_MIGRATION_CONTROL;

/// Leaf 0x80000008 (AMD APM vol. 3, E.4.7): EAX bits 7:0 are the physical address width,
/// bits 15:8 the linear one.
const CPUID_ADDRESS_SIZES: u32 = 0x8000_0008;

/// Leaf 1 ECX bit 5: VMX.
const CPUID_1_ECX_VMX: u32 = 1 << 5;
/// Leaf 0x80000001 ECX bit 2: SVM.
const CPUID_80000001_ECX_SVM: u32 = 1 << 2;

/// A named CPU baseline: for each register of [`FEATURE_LEAVES`] it lists, the feature bits a
/// guest may have (those the host has too); registers it does not list keep none. The vendor
/// and KVM's paravirtual leaf are the host's. A guest started with a baseline can move to any
/// host that has the baseline's features, whatever else either host has.
#[derive(Debug, PartialEq, Eq)]
pub struct CpuBaseline {
    pub name: &'static str,
    pub description: &'static str,
    pub masks: &'static [(u32, u32, Register, u32)],
}

const fn bits(list: &[u32]) -> u32 {
    let mut mask = 0;
    let mut i = 0;
    while i < list.len() {
        mask |= 1 << list[i];
        i += 1;
    }
    mask
}

/// The x86-64-v2 micro-architecture level (the x86-64 psABI, "Micro-Architecture Levels"):
/// the baseline x86-64 flags plus CMPXCHG16B, LAHF/SAHF, POPCNT, SSE3, SSE4.1, SSE4.2 and
/// SSSE3, with the APIC features KVM emulates (x2APIC, TSC-deadline) and the hypervisor bit.
/// No XSAVE (so only x87 and SSE state), no AVX, no invariant TSC (the guest keeps time by
/// kvmclock, so it can move between hosts of different TSC rates).
pub const X86_64_V2: CpuBaseline = CpuBaseline {
    name: "x86-64-v2",
    description: "x86-64 psABI level 2: SSE4.2, POPCNT, CMPXCHG16B; no AVX, no invariant TSC",
    masks: &[
        (
            1,
            0,
            Register::Edx,
            // FPU VME DE PSE TSC MSR PAE MCE CX8 APIC SEP MTRR PGE MCA CMOV PAT PSE36 CLFSH
            // MMX FXSR SSE SSE2
            bits(&[
                0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 19, 23, 24, 25, 26,
            ]),
        ),
        (
            1,
            0,
            Register::Ecx,
            // SSE3 SSSE3 CX16 SSE4.1 SSE4.2 X2APIC POPCNT TSC-DEADLINE HYPERVISOR
            bits(&[0, 9, 13, 19, 20, 21, 23, 24, 31]),
        ),
        // XCR0: x87 and SSE state.
        (0xd, 0, Register::Eax, bits(&[0, 1])),
        // LAHF/SAHF in long mode.
        (0x8000_0001, 0, Register::Ecx, bits(&[0])),
        // SYSCALL, NX, long mode.
        (0x8000_0001, 0, Register::Edx, bits(&[11, 20, 29])),
    ],
};

/// The named CPU models `--cpu-model` takes besides `host`.
pub const CPU_BASELINES: &[&CpuBaseline] = &[&X86_64_V2];

/// What CPU a new guest is given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CpuModel {
    /// Everything this host's KVM supports.
    #[default]
    Host,
    /// A baseline masked from the host's CPUID.
    Baseline(&'static CpuBaseline),
}

/// A `--cpu-model` name that is not `host` or a known baseline.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("Unknown CPU model {name:?}: use host or one of {known}")]
pub struct UnknownCpuModel {
    pub name: String,
    pub known: String,
}

impl std::str::FromStr for CpuModel {
    type Err = UnknownCpuModel;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        if name == "host" {
            return Ok(Self::Host);
        }
        CPU_BASELINES
            .iter()
            .find(|b| b.name == name)
            .map(|b| Self::Baseline(b))
            .ok_or_else(|| UnknownCpuModel {
                name: name.into(),
                known: CPU_BASELINES
                    .iter()
                    .map(|b| b.name)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

/// Errors building the CPUID.
#[derive(Debug, thiserror::Error)]
pub enum CpuidError {
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("Cannot read the CPUID KVM supports")]
    Supported(#[source] kvm_ioctls::Error),
    /// Too many leaves for KVM.
    #[error("CPUID has more than {KVM_MAX_CPUID_ENTRIES} entries")]
    TooManyEntries,
}

/// The XSAVE area KVM_GET_XSAVE and KVM_SET_XSAVE carry. State beyond it (AMX tile data)
/// needs KVM_CAP_XSAVE2, which Veil does not enable, so such components are not offered.
pub const KVM_XSAVE_LEGACY_BYTES: u32 = 4096;
/// CPUID leaf of the XSAVE components: subleaf 0 lists the user ones (EDX:EAX) and the size
/// of them all (ECX); subleaf `i` >= 2 gives component `i`'s size (EAX) and offset (EBX).
const CPUID_XSAVE: u32 = 0xd;

/// A CPUID table to give every vCPU (after [`Cpuid::for_vcpu`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Cpuid {
    entries: Vec<kvm_cpuid_entry2>,
}

/// Every field of an entry is an integer: equality is total.
impl Eq for Cpuid {}

impl Cpuid {
    /// What KVM supports on this host, with KVM's signature leaf present.
    pub fn supported(kvm: &Kvm) -> Result<Self, CpuidError> {
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(CpuidError::Supported)?;
        let mut cpuid = Self {
            entries: supported.as_slice().to_vec(),
        };
        // Nested virtualisation is not offered: Veil saves no nested (VMX/SVM) state, so a
        // guest hypervisor's guests would not survive a migration.
        cpuid.clear_bits(1, 0, Register::Ecx, CPUID_1_ECX_VMX);
        cpuid.clear_bits(0x8000_0001, 0, Register::Ecx, CPUID_80000001_ECX_SVM);
        cpuid.limit_xsave_to(KVM_XSAVE_LEGACY_BYTES);
        let max_leaf = cpuid
            .entry(KVM_CPUID_SIGNATURE, 0)
            .map_or(KVM_CPUID_FEATURES, |e| e.eax.max(KVM_CPUID_FEATURES));
        let signature = cpuid.entry_mut(KVM_CPUID_SIGNATURE, 0);
        signature.eax = max_leaf;
        [signature.ebx, signature.ecx, signature.edx] = KVM_SIGNATURE;
        Ok(cpuid)
    }

    /// Withdraws every user XSAVE component that would end beyond `limit` bytes, so all of a
    /// guest's XSAVE state fits the area Veil saves and restores.
    pub fn limit_xsave_to(&mut self, limit: u32) {
        let Some(&summary) = self.entry(CPUID_XSAVE, 0) else {
            return;
        };
        let mut components = u64::from(summary.edx) << 32 | u64::from(summary.eax);
        // x87 and SSE live in the legacy region: always within the first 512 bytes.
        let mut end = 576u32;
        for component in 2..64 {
            if components & (1 << component) == 0 {
                continue;
            }
            let (size, offset) = self
                .entry(CPUID_XSAVE, component)
                .map_or((0, 0), |e| (e.eax, e.ebx));
            if offset.saturating_add(size) > limit {
                components &= !(1 << component);
                self.entries
                    .retain(|e| !(e.function == CPUID_XSAVE && e.index == component));
            } else {
                end = end.max(offset + size);
            }
        }
        let summary = self.entry_mut(CPUID_XSAVE, 0);
        (summary.eax, summary.edx) = (components as u32, (components >> 32) as u32);
        summary.ecx = summary.ecx.min(end.max(576));
    }

    /// Keeps only the features `model` allows (see [`CpuBaseline`]); `Host` changes nothing.
    pub fn restrict_to(&mut self, model: CpuModel) {
        let CpuModel::Baseline(baseline) = model else {
            return;
        };
        for &(function, index, registers) in FEATURE_LEAVES {
            if function == 0 || function == KVM_CPUID_FEATURES {
                continue;
            }
            let Some(pos) = self
                .entries
                .iter()
                .position(|e| e.function == function && e.index == index)
            else {
                continue;
            };
            for &register in registers {
                let allowed = baseline
                    .masks
                    .iter()
                    .find(|&&(f, i, r, _)| (f, i, r) == (function, index, register))
                    .map_or(0, |&(_, _, _, mask)| mask);
                *register_mut(&mut self.entries[pos], register) &= allowed;
            }
        }
    }

    /// Builds from explicit entries (tests, migration targets).
    pub fn from_entries(entries: Vec<kvm_cpuid_entry2>) -> Self {
        Self { entries }
    }

    /// All entries.
    pub fn entries(&self) -> &[kvm_cpuid_entry2] {
        &self.entries
    }

    /// The entry for `function`/`index`, if present.
    pub fn entry(&self, function: u32, index: u32) -> Option<&kvm_cpuid_entry2> {
        self.entries
            .iter()
            .find(|e| e.function == function && e.index == index)
    }

    /// The entry for `function`/`index`, added (zeroed) when absent.
    pub fn entry_mut(&mut self, function: u32, index: u32) -> &mut kvm_cpuid_entry2 {
        let pos = match self
            .entries
            .iter()
            .position(|e| e.function == function && e.index == index)
        {
            Some(pos) => pos,
            None => {
                self.entries.push(kvm_cpuid_entry2 {
                    function,
                    index,
                    ..Default::default()
                });
                self.entries.len() - 1
            }
        };
        &mut self.entries[pos]
    }

    /// Raises the highest basic (leaf 0) or extended (0x8000_0000) leaf to at least
    /// `function`, so a guest that checks the maximum first (as Linux does before reading
    /// 0x8000_001F) sees a leaf Veil added beyond what the host reports.
    pub fn reach_leaf(&mut self, function: u32) {
        let range = function & 0x8000_0000;
        let max = &mut self.entry_mut(range, 0).eax;
        *max = (*max).max(function);
    }

    /// Sets `mask` in a register of a leaf: how other crates advertise what they implement.
    pub fn set_bits(&mut self, function: u32, index: u32, register: Register, mask: u32) {
        *register_mut(self.entry_mut(function, index), register) |= mask;
    }

    /// Clears `mask` in a register of a leaf.
    pub fn clear_bits(&mut self, function: u32, index: u32, register: Register, mask: u32) {
        *register_mut(self.entry_mut(function, index), register) &= !mask;
    }

    /// Replaces a whole register of a leaf.
    pub fn set_register(&mut self, function: u32, index: u32, register: Register, value: u32) {
        *register_mut(self.entry_mut(function, index), register) = value;
    }

    /// The features in `guest` (a guest's whole CPUID) this host's table lacks, described for
    /// people: a host whose CPUID lacks any cannot take over a guest given them. The bits of
    /// [`FEATURE_LEAVES`] must all be here (KVM's paravirtual ones may also be Veil's own);
    /// the vendor string must match exactly; the guest's address widths must not exceed this
    /// host's.
    pub fn missing_features(&self, guest: &[kvm_cpuid_entry2]) -> Vec<String> {
        let mut missing = Vec::new();
        for given in guest {
            if given.function == CPUID_ADDRESS_SIZES && given.index == 0 {
                let here = self.entry(CPUID_ADDRESS_SIZES, 0).map_or(0, |e| e.eax);
                for (what, shift) in [("physical", 0), ("linear", 8)] {
                    let (want, have) = ((given.eax >> shift) & 0xff, (here >> shift) & 0xff);
                    if want > have {
                        missing.push(format!(
                            "leaf {CPUID_ADDRESS_SIZES:#x}.0 Eax: {want}-bit {what} addresses, \
                             this host has {have}"
                        ));
                    }
                }
            }
            let Some(&(_, _, registers)) = FEATURE_LEAVES
                .iter()
                .find(|&&(f, i, _)| f == given.function && i == given.index)
            else {
                continue;
            };
            let here = self
                .entry(given.function, given.index)
                .copied()
                .unwrap_or_default();
            for &register in registers {
                let mut have = read_register(&here, register);
                if (given.function, register) == (KVM_CPUID_FEATURES, Register::Eax) {
                    have |= VEIL_KVM_FEATURES;
                }
                let want = read_register(given, register);
                let lacking = if given.function == 0 {
                    // The vendor: exactly the same, or the guest's CPU model changes under it.
                    if want == have {
                        0
                    } else {
                        want
                    }
                } else {
                    want & !have
                };
                if lacking != 0 {
                    missing.push(format!(
                        "leaf {:#x}.{} {register:?} bits {lacking:#010x}",
                        given.function, given.index
                    ));
                }
            }
        }
        missing
    }

    /// The table for one vCPU: its APIC id in leaves 0x1, 0xB and 0x1F.
    pub fn for_vcpu(&self, vcpu_id: u32, vcpu_count: u32) -> Result<CpuId, CpuidError> {
        let mut entries = self.entries.clone();
        for e in &mut entries {
            match e.function {
                0x1 => {
                    e.ebx = (e.ebx & 0x0000_ffff) | (vcpu_id << 24) | (vcpu_count.min(255) << 16);
                    // Hyper-threading bit: logical processor count above is meaningful.
                    if vcpu_count > 1 {
                        e.edx |= 1 << 28;
                    }
                }
                0xb | 0x1f => e.edx = vcpu_id,
                _ => {}
            }
        }
        CpuId::from_entries(&entries).map_err(|_| CpuidError::TooManyEntries)
    }
}

fn read_register(entry: &kvm_cpuid_entry2, register: Register) -> u32 {
    match register {
        Register::Eax => entry.eax,
        Register::Ebx => entry.ebx,
        Register::Ecx => entry.ecx,
        Register::Edx => entry.edx,
    }
}

fn register_mut(entry: &mut kvm_cpuid_entry2, register: Register) -> &mut u32 {
    match register {
        Register::Eax => &mut entry.eax,
        Register::Ebx => &mut entry.ebx,
        Register::Ecx => &mut entry.ecx,
        Register::Edx => &mut entry.edx,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn xsave_components_beyond_the_4_kib_area_are_not_offered() {
        use super::*;
        let leaf = |index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function: CPUID_XSAVE,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        // x87, SSE, AVX (256 bytes at 576), XTILECFG (64 at 2752), XTILEDATA (8192 at 2816).
        let components = 0b111 | 1 << 17 | 1 << 18;
        let mut cpuid = Cpuid::from_entries(vec![
            leaf(0, components, 0, 11008, 0),
            leaf(2, 256, 576, 0, 0),
            leaf(17, 64, 2752, 0, 0),
            leaf(18, 8192, 2816, 0, 0),
        ]);
        cpuid.limit_xsave_to(KVM_XSAVE_LEGACY_BYTES);
        let summary = cpuid.entry(CPUID_XSAVE, 0).unwrap();
        assert_eq!(summary.eax, 0b111 | 1 << 17);
        assert_eq!(summary.ecx, 2816);
        assert!(cpuid.entry(CPUID_XSAVE, 18).is_none());
        assert!(cpuid.entry(CPUID_XSAVE, 2).is_some());
    }

    #[test]
    fn a_leaf_added_beyond_the_hosts_maximum_is_made_reachable_and_none_is_lowered() {
        use super::*;
        let mut cpuid = Cpuid::from_entries(vec![kvm_cpuid_entry2 {
            function: 0x8000_0000,
            eax: 0x8000_0008,
            ..Default::default()
        }]);
        cpuid.reach_leaf(0x8000_001f);
        assert_eq!(cpuid.entry(0x8000_0000, 0).unwrap().eax, 0x8000_001f);
        cpuid.reach_leaf(0x8000_0001);
        assert_eq!(cpuid.entry(0x8000_0000, 0).unwrap().eax, 0x8000_001f);
    }

    #[test]
    fn a_host_lacking_a_feature_the_guest_was_given_is_named() {
        use super::*;
        let entry = |function, index, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        let host = Cpuid::from_entries(vec![
            entry(0, 0, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            entry(7, 0, 0b1011, 0, 0),
        ]);
        // Fewer features than the host has: fine.
        let guest = vec![
            entry(0, 0, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            entry(7, 0, 0b0011, 0, 0),
        ];
        assert!(host.missing_features(&guest).is_empty());
        // A feature the host lacks, a leaf it does not have, another vendor.
        let guest = vec![
            entry(0, 0, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(7, 0, 0b0111, 0, 0),
            entry(0x8000_0001, 0, 0, 0x20, 0),
        ];
        assert_eq!(
            host.missing_features(&guest),
            vec![
                "leaf 0x0.0 Ebx bits 0x756e6547",
                "leaf 0x0.0 Ecx bits 0x6c65746e",
                "leaf 0x0.0 Edx bits 0x49656e69",
                "leaf 0x7.0 Ebx bits 0x00000004",
                "leaf 0x80000001.0 Ecx bits 0x00000020",
            ]
        );
        // Leaves outside the compared set are none of its business.
        assert!(host
            .missing_features(&[entry(0xb, 0, 0xffff, 0, 0)])
            .is_empty());
    }

    #[test]
    fn a_baseline_keeps_only_its_features_and_a_host_of_the_baseline_takes_its_guests() {
        use super::*;
        let leaf = |function, index, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            ecx,
            edx,
            ..Default::default()
        };
        let host = Cpuid::from_entries(vec![
            leaf(1, 0, 0xffff_ffff, 0xffff_ffff),
            leaf(7, 0, 0xffff_ffff, 0xffff_ffff),
            leaf(0x8000_0007, 0, 0, 1 << 8),
            leaf(KVM_CPUID_FEATURES, 0, 0, 0),
        ]);
        let mut guest = host.clone();
        let v2: CpuModel = "x86-64-v2".parse().unwrap();
        guest.restrict_to(v2);
        let leaf1 = guest.entry(1, 0).unwrap();
        assert_eq!(leaf1.ecx & (1 << 28), 0, "no AVX");
        assert_ne!(leaf1.ecx & (1 << 20), 0, "SSE4.2");
        assert_eq!(guest.entry(7, 0).unwrap().ecx, 0);
        assert!(!crate::vcpu::tsc::is_invariant(&guest));
        // A host restricted to the same baseline takes the guest; a full-host guest names
        // what the baseline host lacks.
        let mut narrow_host = host.clone();
        narrow_host.restrict_to(v2);
        assert!(narrow_host.missing_features(guest.entries()).is_empty());
        let missing = narrow_host.missing_features(host.entries());
        assert!(
            missing.contains(&"leaf 0x7.0 Ecx bits 0xffffffff".to_string()),
            "{missing:?}"
        );
        assert_eq!(
            "pentium".parse::<CpuModel>().unwrap_err().to_string(),
            "Unknown CPU model \"pentium\": use host or one of x86-64-v2"
        );
        assert_eq!("host".parse::<CpuModel>(), Ok(CpuModel::Host));
    }

    #[test]
    fn wider_addresses_than_the_host_has_are_refused_and_veils_own_kvm_features_allowed() {
        use super::*;
        let leaf = |function, eax| kvm_cpuid_entry2 {
            function,
            eax,
            ..Default::default()
        };
        let host = Cpuid::from_entries(vec![
            leaf(CPUID_ADDRESS_SIZES, 0x3028),
            leaf(KVM_CPUID_FEATURES, 0b1),
        ]);
        assert!(host
            .missing_features(&[leaf(CPUID_ADDRESS_SIZES, 0x3028)])
            .is_empty());
        assert_eq!(
            host.missing_features(&[leaf(CPUID_ADDRESS_SIZES, 0x3930)]),
            [
                "leaf 0x80000008.0 Eax: 48-bit physical addresses, this host has 40",
                "leaf 0x80000008.0 Eax: 57-bit linear addresses, this host has 48",
            ]
        );
        assert!(host
            .missing_features(&[leaf(KVM_CPUID_FEATURES, 0b1 | VEIL_KVM_FEATURES)])
            .is_empty());
        assert_eq!(
            host.missing_features(&[leaf(KVM_CPUID_FEATURES, 0b110)]),
            ["leaf 0x40000001.0 Eax bits 0x00000006"]
        );
    }

    use super::*;

    fn sample() -> Cpuid {
        Cpuid::from_entries(vec![kvm_cpuid_entry2 {
            function: 1,
            ebx: 0x0002_0800,
            ..Default::default()
        }])
    }

    #[test]
    fn bits_can_be_added_to_new_and_existing_leaves() {
        let mut c = sample();
        c.set_bits(KVM_CPUID_FEATURES, 0, Register::Eax, 1 << 16);
        c.set_bits(KVM_CPUID_FEATURES, 0, Register::Eax, 1 << 17);
        c.clear_bits(KVM_CPUID_FEATURES, 0, Register::Eax, 1 << 16);
        assert_eq!(c.entry(KVM_CPUID_FEATURES, 0).unwrap().eax, 1 << 17);
    }

    #[test]
    fn each_vcpu_gets_its_apic_id() {
        let c = sample();
        let v3 = c.for_vcpu(3, 4).unwrap();
        let leaf1 = v3.as_slice().iter().find(|e| e.function == 1).unwrap();
        assert_eq!(leaf1.ebx >> 24, 3);
        assert_eq!((leaf1.ebx >> 16) & 0xff, 4);
        assert_eq!(leaf1.ebx & 0xffff, 0x0800);
    }
}
