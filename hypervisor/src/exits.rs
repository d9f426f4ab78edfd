//! The one place a vCPU exit is turned into an action.

use std::fmt;
use std::sync::Arc;

use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};
use veil_devices::Bus;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// `KVM_INTERNAL_ERROR_EMULATION`.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
/// `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`.
const KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES: u64 = 1;
/// `-KVM_ENOSYS`: what a guest sees for a hypercall nobody handles.
pub const KVM_ENOSYS_RESULT: u64 = (-1000i64) as u64;
/// `-KVM_EPERM`: a hypercall from CPL > 0.
pub const KVM_EPERM_RESULT: u64 = (-1i64) as u64;
/// EFER.LMA: long mode active.
const EFER_LMA: u64 = 1 << 10;
/// Longest x86 instruction.
const MAX_INSN_BYTES: usize = 15;

/// Serves the MSRs that KVM hands to userspace (`KVM_EXIT_X86_RDMSR/WRMSR`).
pub trait MsrHandler: Send + Sync {
    /// The value of `index` for vCPU `vcpu`, or `None` to inject #GP.
    fn read(&self, vcpu: u32, index: u32) -> Option<u64>;
    /// Applies a write; `false` injects #GP.
    fn write(&self, vcpu: u32, index: u32, value: u64) -> bool;
}

/// Serves hypercalls, whatever transport delivered them.
pub trait HypercallHandler: Send + Sync {
    /// Handles hypercall `nr` with arguments a0..a2 and returns the guest's RAX.
    fn call(&self, vcpu: u32, nr: u64, args: [u64; 3], long_mode: bool) -> u64;
}

/// Where exits go.
#[derive(Clone, Default)]
pub struct ExitHandlers {
    /// Port I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// Userspace MSRs; without one, every such access gets #GP.
    pub msr: Option<Arc<dyn MsrHandler>>,
    /// Hypercalls; without one, every call returns -KVM_ENOSYS.
    pub hypercall: Option<Arc<dyn HypercallHandler>>,
    /// Veil's port transport: an `in eax` from this port is a hypercall with the registers as
    /// `vmmcall` would pass them (see `veil_guest_abi::HYPERCALL_PORT`).
    pub hypercall_port: Option<u16>,
    /// The machine's devices and their thread: paused, saved and stopped with the VM.
    pub devices: Option<Arc<crate::devices::MachineDevices>>,
}

/// Why a vCPU could not go on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FaultKind {
    /// `KVM_EXIT_SHUTDOWN`: a triple fault.
    TripleFault,
    /// `KVM_EXIT_INTERNAL_ERROR` with its suberror.
    InternalError { suberror: u32 },
    /// `KVM_EXIT_FAIL_ENTRY` with the hardware reason.
    FailedEntry { reason: u64 },
    /// An exit Veil does not handle.
    UnexpectedExit(String),
}

impl fmt::Display for FaultKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultKind::TripleFault => write!(f, "a triple fault"),
            FaultKind::InternalError {
                suberror: KVM_INTERNAL_ERROR_EMULATION,
            } => {
                write!(f, "an instruction KVM could not emulate")
            }
            FaultKind::InternalError { suberror } => {
                write!(f, "a KVM internal error (suberror {suberror})")
            }
            FaultKind::FailedEntry { reason } => {
                write!(f, "a failed VM entry (hardware reason {reason:#x})")
            }
            FaultKind::UnexpectedExit(exit) => write!(f, "an unexpected exit ({exit})"),
        }
    }
}

/// A vCPU that stopped the VM: which, where, and the instruction there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultReport {
    pub vcpu: u32,
    pub kind: FaultKind,
    pub rip: u64,
    /// The bytes at RIP, as KVM reported them or as read from guest memory; may be empty.
    pub bytes: Vec<u8>,
}

impl fmt::Display for FaultReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vCPU {} stopped on {} at RIP {:#x}",
            self.vcpu, self.kind, self.rip
        )?;
        if self.bytes.is_empty() {
            write!(f, " (instruction bytes unavailable)")
        } else {
            let hex: Vec<String> = self.bytes.iter().map(|b| format!("{b:02x}")).collect();
            write!(f, " (instruction bytes: {})", hex.join(" "))
        }
    }
}

/// What the vCPU loop does after an exit.
#[derive(Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Run the guest again.
    Resume,
    /// KVM_RUN was interrupted (a kick): check for pause or stop.
    Interrupted,
    /// The vCPU halted with no in-kernel irqchip to wake it.
    Halted,
    /// The guest cannot continue.
    Fault(FaultReport),
}

/// What the classification of an exit needs from the vCPU afterwards.
enum Classified {
    Action(ExitAction),
    Fault(FaultKind),
    PortHypercall,
}

impl ExitHandlers {
    /// Runs `fd` once and handles the exit.
    pub fn run_once(
        &self,
        vcpu_id: u32,
        fd: &mut VcpuFd,
        memory: &GuestMemory,
    ) -> Result<ExitAction, kvm_ioctls::Error> {
        let classified = match fd.run() {
            Ok(exit) => self.classify(vcpu_id, exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Classified::Action(ExitAction::Interrupted)
            }
            Err(e) => return Err(e),
        };
        Ok(match classified {
            Classified::Action(action) => action,
            Classified::Fault(kind) => ExitAction::Fault(fault_report(vcpu_id, kind, fd, memory)),
            Classified::PortHypercall => {
                self.port_hypercall(vcpu_id, fd)?;
                ExitAction::Resume
            }
        })
    }

    /// Asks KVM to copy the registers the port transport reads into `kvm_run` on every exit,
    /// saving two ioctls per hypercall, when the host supports it (`supported_sync_regs` is
    /// `KVM_CHECK_EXTENSION(KVM_CAP_SYNC_REGS)`).
    pub fn prepare_vcpu(&self, fd: &mut VcpuFd, supported_sync_regs: u64) {
        let wanted = (SyncReg::Register as u64) | (SyncReg::SystemRegister as u64);
        if self.hypercall_port.is_some() && supported_sync_regs & wanted == wanted {
            fd.set_sync_valid_reg(SyncReg::Register);
            fd.set_sync_valid_reg(SyncReg::SystemRegister);
        }
    }

    /// The port transport (`in eax, port`): the same registers and result as
    /// `KVM_EXIT_HYPERCALL`, and the checks KVM makes before that exit (CPL 0, 32-bit
    /// truncation) made here instead. The result travels as the `in`'s data, so no register is
    /// written: the guest sign-extends EAX into RAX (every hypercall result fits 32 bits).
    fn port_hypercall(&self, vcpu_id: u32, fd: &mut VcpuFd) -> Result<(), kvm_ioctls::Error> {
        let synced = fd.get_kvm_run().kvm_valid_regs & (SyncReg::SystemRegister as u64) != 0;
        let (regs, sregs) = if synced {
            let sync = fd.sync_regs();
            (sync.regs, sync.sregs)
        } else {
            (fd.get_regs()?, fd.get_sregs()?)
        };
        let long_mode = sregs.efer & EFER_LMA != 0 && sregs.cs.l == 1;
        let cpl = sregs.cs.selector & 3;
        let result = if cpl != 0 {
            KVM_EPERM_RESULT
        } else {
            match &self.hypercall {
                Some(h) => h.call(vcpu_id, regs.rax, [regs.rbx, regs.rcx, regs.rdx], long_mode),
                None => KVM_ENOSYS_RESULT,
            }
        };
        io_in_data(fd).copy_from_slice(&(result as u32).to_le_bytes());
        Ok(())
    }

    fn classify(&self, vcpu_id: u32, exit: VcpuExit<'_>) -> Classified {
        let resume = Classified::Action(ExitAction::Resume);
        match exit {
            VcpuExit::IoIn(port, data) if Some(port) == self.hypercall_port && data.len() == 4 => {
                Classified::PortHypercall
            }
            VcpuExit::IoOut(port, data) => {
                if !self.pio.write(u64::from(port), data) {
                    tracing::trace!(port, "write to unclaimed port");
                }
                resume
            }
            VcpuExit::IoIn(port, data) => {
                if !self.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
                resume
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !self.mmio.write(addr, data) {
                    tracing::trace!(addr, "write to unclaimed MMIO");
                }
                resume
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio.read(addr, data) {
                    data.fill(0xff);
                }
                resume
            }
            VcpuExit::X86Rdmsr(msr) => {
                match self.msr.as_ref().and_then(|h| h.read(vcpu_id, msr.index)) {
                    Some(value) => *msr.data = value,
                    None => *msr.error = 1,
                }
                resume
            }
            VcpuExit::X86Wrmsr(msr) => {
                let ok = self
                    .msr
                    .as_ref()
                    .is_some_and(|h| h.write(vcpu_id, msr.index, msr.data));
                if !ok {
                    *msr.error = 1;
                }
                resume
            }
            VcpuExit::Hypercall(call) => {
                let args = [call.args[0], call.args[1], call.args[2]];
                *call.ret = match &self.hypercall {
                    Some(h) => h.call(vcpu_id, call.nr, args, call.longmode != 0),
                    None => KVM_ENOSYS_RESULT,
                };
                resume
            }
            VcpuExit::Intr => Classified::Action(ExitAction::Interrupted),
            VcpuExit::Hlt => Classified::Action(ExitAction::Halted),
            VcpuExit::Shutdown => Classified::Fault(FaultKind::TripleFault),
            VcpuExit::InternalError => Classified::Fault(FaultKind::InternalError { suberror: 0 }),
            VcpuExit::FailEntry(reason, _) => Classified::Fault(FaultKind::FailedEntry { reason }),
            other => Classified::Fault(FaultKind::UnexpectedExit(format!("{other:?}"))),
        }
    }
}

/// The data buffer of the `KVM_EXIT_IO` in progress (4 bytes for `in eax`).
fn io_in_data(fd: &mut VcpuFd) -> &mut [u8] {
    let run = fd.get_kvm_run();
    // SAFETY: the last exit was KVM_EXIT_IO, so `io` is the active member; KVM places
    // `size * count` bytes of data at `data_offset` inside the mapped kvm_run area, and the
    // caller checked this is one 4-byte `in`.
    unsafe {
        let io = run.__bindgen_anon_1.io;
        let base = (run as *mut kvm_bindings::kvm_run).cast::<u8>();
        std::slice::from_raw_parts_mut(base.add(io.data_offset as usize), 4)
    }
}

/// Builds the report after the exit's borrow of the vCPU has ended.
fn fault_report(vcpu: u32, kind: FaultKind, fd: &mut VcpuFd, memory: &GuestMemory) -> FaultReport {
    let (kind, reported_bytes) = match kind {
        FaultKind::InternalError { .. } => internal_error_details(fd),
        other => (other, Vec::new()),
    };
    let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
    let bytes = if reported_bytes.is_empty() {
        read_instruction(fd, memory, rip)
    } else {
        reported_bytes
    };
    FaultReport {
        vcpu,
        kind,
        rip,
        bytes,
    }
}

fn internal_error_details(fd: &mut VcpuFd) -> (FaultKind, Vec<u8>) {
    let run = fd.get_kvm_run();
    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let kind = FaultKind::InternalError {
        suberror: internal.suberror,
    };
    let data = internal.data;
    let has_bytes = internal.suberror == KVM_INTERNAL_ERROR_EMULATION
        && internal.ndata >= 4
        && data[0] & KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES != 0;
    if !has_bytes {
        return (kind, Vec::new());
    }
    let len = (data[1] as usize).min(MAX_INSN_BYTES);
    let bytes: Vec<u8> = data[2..4]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .take(len)
        .collect();
    (kind, bytes)
}

/// The instruction bytes at RIP, through the guest's page tables when paging is on.
fn read_instruction(fd: &VcpuFd, memory: &GuestMemory, rip: u64) -> Vec<u8> {
    let linear = fd
        .get_sregs()
        .map(|s| s.cs.base.wrapping_add(rip))
        .unwrap_or(rip);
    let physical = match fd.translate_gva(linear) {
        Ok(t) if t.valid != 0 => t.physical_address,
        _ => linear,
    };
    let mut bytes = vec![0u8; MAX_INSN_BYTES];
    // Stop at the end of the page: the next one may not be mapped contiguously.
    let in_page = (0x1000 - (physical & 0xfff)) as usize;
    bytes.truncate(in_page.min(MAX_INSN_BYTES));
    match memory.read_slice(&mut bytes, GuestAddress(physical)) {
        Ok(()) => bytes,
        Err(_) => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_reports_read_like_sentences() {
        let r = FaultReport {
            vcpu: 1,
            kind: FaultKind::InternalError { suberror: 1 },
            rip: 0x100a3c,
            bytes: vec![0x0f, 0x0b],
        };
        assert_eq!(
            r.to_string(),
            "vCPU 1 stopped on an instruction KVM could not emulate at RIP 0x100a3c (instruction bytes: 0f 0b)"
        );
        let r = FaultReport {
            bytes: vec![],
            kind: FaultKind::TripleFault,
            ..r
        };
        assert_eq!(
            r.to_string(),
            "vCPU 1 stopped on a triple fault at RIP 0x100a3c (instruction bytes unavailable)"
        );
    }
}
