//! One virtual CPU: creation, boot register state, and its saved state.

mod kick;
pub mod msrs;
mod state;
pub mod tsc;

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuFd, VmFd};

pub use kick::{install_kick_handler, kick_thread, KickTarget};
pub use state::{stateful_msrs, RestoreWith, StatePart, VcpuState, VcpuStateError, RESTORE_ORDER};

use crate::boot::{boot_segments, EntryPoint};
use crate::cpuid::{Cpuid, CpuidError};

/// CR0.PE: protected mode.
const X86_CR0_PE: u64 = 1 << 0;
/// CR0.ET: always set on anything newer than a 386.
const X86_CR0_ET: u64 = 1 << 4;
/// RFLAGS bit 1 is reserved and reads as one.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// LAPIC register offsets and delivery modes used to wire LINT0/LINT1 like a PC BIOS does.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_EXTINT: u32 = 0x7;
const APIC_MODE_NMI: u32 = 0x4;

/// Errors setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("Cannot create vCPU {id}")]
    Create {
        id: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The CPUID table could not be built.
    #[error("Cannot build the CPUID of vCPU {id}")]
    Cpuid {
        id: u32,
        #[source]
        source: CpuidError,
    },
    /// A register ioctl failed.
    #[error("Cannot set up vCPU {id}: {what} failed")]
    Setup {
        id: u32,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// A vCPU and its id (which is also its APIC id).
pub struct Vcpu {
    pub id: u32,
    pub fd: VcpuFd,
}

impl Vcpu {
    /// Creates vCPU `id` with its CPUID.
    pub fn new(vm: &VmFd, id: u32, cpuid: &Cpuid, vcpu_count: u32) -> Result<Self, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Create { id, source })?;
        let table = cpuid
            .for_vcpu(id, vcpu_count)
            .map_err(|source| VcpuError::Cpuid { id, source })?;
        let vcpu = Self { id, fd };
        vcpu.fd
            .set_cpuid2(&table)
            .map_err(|e| vcpu.setup_error("KVM_SET_CPUID2", e))?;
        Ok(vcpu)
    }

    fn setup_error(&self, what: &'static str, source: kvm_ioctls::Error) -> VcpuError {
        VcpuError::Setup {
            id: self.id,
            what,
            source,
        }
    }

    /// Routes LINT0 to the PIC (ExtINT) and LINT1 to NMI, as firmware does before an OS runs.
    pub fn setup_lapic_lint(&self) -> Result<(), VcpuError> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| self.setup_error("KVM_GET_LAPIC", e))?;
        for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
            let bytes: &mut [u8] = bytemuck_regs(&mut lapic.regs[offset..offset + 4]);
            let value = u32::from_le_bytes(bytes.try_into().expect("four bytes"));
            let value = (value & !0x700) | (mode << 8);
            bytes.copy_from_slice(&value.to_le_bytes());
        }
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| self.setup_error("KVM_SET_LAPIC", e))
    }

    /// Puts the boot vCPU at the kernel's 32-bit entry point.
    pub fn setup_boot_entry(&self, entry: EntryPoint) -> Result<(), VcpuError> {
        let mut sregs = self
            .fd
            .get_sregs()
            .map_err(|e| self.setup_error("KVM_GET_SREGS", e))?;
        flat_protected_mode(&mut sregs);
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| self.setup_error("KVM_SET_SREGS", e))?;
        let mut regs = kvm_regs {
            rflags: RFLAGS_RESERVED,
            ..Default::default()
        };
        match entry {
            EntryPoint::Pvh { entry, start_info } => {
                regs.rip = entry.0;
                regs.rbx = start_info.0;
            }
            EntryPoint::Linux { entry, boot_params } => {
                regs.rip = entry.0;
                regs.rsi = boot_params.0;
            }
        }
        self.fd
            .set_regs(&regs)
            .map_err(|e| self.setup_error("KVM_SET_REGS", e))
    }
}

/// The LAPIC register file is `[c_char]`; view it as bytes.
fn bytemuck_regs(regs: &mut [std::os::raw::c_char]) -> &mut [u8] {
    // SAFETY: c_char and u8 have the same size and alignment; every bit pattern is valid for both.
    unsafe { std::slice::from_raw_parts_mut(regs.as_mut_ptr().cast::<u8>(), regs.len()) }
}

/// 32-bit flat protected mode, paging off: the state both PVH and the Linux 32-bit boot
/// protocol require.
fn flat_protected_mode(sregs: &mut kvm_sregs) {
    let seg = boot_segments();
    sregs.gdt.base = seg.gdt_base;
    sregs.gdt.limit = seg.gdt_limit;
    sregs.cs = seg.code;
    sregs.ds = seg.data;
    sregs.es = seg.data;
    sregs.fs = seg.data;
    sregs.gs = seg.data;
    sregs.ss = seg.data;
    sregs.tr = seg.tss;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_state_is_flat_32_bit_without_paging() {
        let mut sregs = kvm_sregs {
            cr0: 0x8000_0011,
            efer: 0x500,
            ..Default::default()
        };
        flat_protected_mode(&mut sregs);
        assert_eq!(sregs.cr0 & (1 << 31), 0);
        assert_eq!(sregs.cr0 & 1, 1);
        assert_eq!(sregs.efer, 0);
        assert_eq!(
            (sregs.cs.base, sregs.cs.limit, sregs.cs.db),
            (0, 0xffff_ffff, 1)
        );
        assert_eq!(sregs.ss.selector, 0x18);
    }
}
