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

/// A CPUID table to give every vCPU (after [`Cpuid::for_vcpu`]).
#[derive(Debug, Clone)]
pub struct Cpuid {
    entries: Vec<kvm_cpuid_entry2>,
}

impl Cpuid {
    /// What KVM supports on this host, with KVM's signature leaf present.
    pub fn supported(kvm: &Kvm) -> Result<Self, CpuidError> {
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(CpuidError::Supported)?;
        let mut cpuid = Self {
            entries: supported.as_slice().to_vec(),
        };
        let max_leaf = cpuid
            .entry(KVM_CPUID_SIGNATURE, 0)
            .map_or(KVM_CPUID_FEATURES, |e| e.eax.max(KVM_CPUID_FEATURES));
        let signature = cpuid.entry_mut(KVM_CPUID_SIGNATURE, 0);
        signature.eax = max_leaf;
        [signature.ebx, signature.ecx, signature.edx] = KVM_SIGNATURE;
        Ok(cpuid)
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
