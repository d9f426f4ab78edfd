//! The SEV commands KVM runs for one VM: `KVM_MEMORY_ENCRYPT_OP` with the uapi structs
//! (include/uapi/linux/kvm.h; Documentation/virt/kvm/x86/amd-memory-encryption.rst) and
//! `KVM_MEMORY_ENCRYPT_REG_REGION`.
//!
//! Each command is a thin, safe wrapper: it takes Veil's buffers as slices and guest memory as
//! [`GuestBytes`] (the VMM's mapping of guest RAM, which KVM pins and the PSP works on in place),
//! fills the kernel's struct with their addresses, issues the ioctl and turns a firmware status
//! into [`FirmwareError::Status`]. Checks that would otherwise fail deep in the kernel (a packet
//! crossing a page, a length the firmware never accepts, a blob over KVM's 16 KiB cap) are made
//! here, before the ioctl, with the rules of [`crate::guest_memory`].
//!
//! Why not the `sev` crate's `Launcher`: it is a typestate that consumes itself at each step,
//! owns the VM fd, starts with `KVM_SEV_INIT2` (a VM created as `KVM_X86_SEV_VM`), and cannot
//! launch without an owner session (the trait's `launch_start` may have none). The
//! [`Firmware`](crate::firmware::Firmware) trait is one call per command on a shared VM, so the
//! launch commands are wrapped here the same way as SEND and RECEIVE, which the crate lacks.

use std::io;
use std::os::unix::io::RawFd;
use std::sync::Arc;

use kvm_bindings::{
    kvm_enc_region, kvm_sev_cmd, kvm_sev_launch_measure, kvm_sev_launch_secret,
    kvm_sev_launch_start, kvm_sev_launch_update_data, kvm_sev_receive_start,
    kvm_sev_receive_update_data, kvm_sev_send_start, kvm_sev_send_update_data,
};
use kvm_ioctls::VmFd;

use crate::crypto::{PACKET_HEADER_BYTES, SESSION_BYTES};
use crate::firmware::{Command, FirmwareError, GuestBytes, SevError};
use crate::guest_memory::{check_blob, check_launch_data, check_page_payload, check_secret_dest};

/// KVM's SEV command ids (`enum sev_cmd_id` in include/uapi/linux/kvm.h).
pub(crate) mod id {
    use kvm_bindings as kb;

    pub const INIT: u32 = kb::sev_cmd_id_KVM_SEV_INIT;
    pub const LAUNCH_START: u32 = kb::sev_cmd_id_KVM_SEV_LAUNCH_START;
    pub const LAUNCH_UPDATE_DATA: u32 = kb::sev_cmd_id_KVM_SEV_LAUNCH_UPDATE_DATA;
    pub const LAUNCH_SECRET: u32 = kb::sev_cmd_id_KVM_SEV_LAUNCH_SECRET;
    pub const LAUNCH_MEASURE: u32 = kb::sev_cmd_id_KVM_SEV_LAUNCH_MEASURE;
    pub const LAUNCH_FINISH: u32 = kb::sev_cmd_id_KVM_SEV_LAUNCH_FINISH;
    pub const SEND_START: u32 = kb::sev_cmd_id_KVM_SEV_SEND_START;
    pub const SEND_UPDATE_DATA: u32 = kb::sev_cmd_id_KVM_SEV_SEND_UPDATE_DATA;
    pub const SEND_FINISH: u32 = kb::sev_cmd_id_KVM_SEV_SEND_FINISH;
    pub const RECEIVE_START: u32 = kb::sev_cmd_id_KVM_SEV_RECEIVE_START;
    pub const RECEIVE_UPDATE_DATA: u32 = kb::sev_cmd_id_KVM_SEV_RECEIVE_UPDATE_DATA;
    pub const RECEIVE_FINISH: u32 = kb::sev_cmd_id_KVM_SEV_RECEIVE_FINISH;
    pub const SEND_CANCEL: u32 = kb::sev_cmd_id_KVM_SEV_SEND_CANCEL;
}

/// LAUNCH_MEASURE's blob: `measure[32] | mnonce[16]`.
const MEASUREMENT_BYTES: usize = 48;

/// The VM-fd ioctls the SEV commands use, behind a trait so tests can answer them.
pub(crate) trait EncryptOp: Send {
    /// Issues `KVM_MEMORY_ENCRYPT_OP`; on failure `cmd.error` may hold a firmware status.
    ///
    /// # Safety
    /// `cmd.data` is 0 or the address of the argument struct of `cmd.id`, and every address in
    /// that struct is 0 or the start of a buffer of the length beside it, which the kernel may
    /// read and (for outputs) write until the call returns.
    unsafe fn encrypt_op(&self, cmd: &mut kvm_sev_cmd) -> io::Result<()>;

    /// Issues `KVM_MEMORY_ENCRYPT_REG_REGION` (the kernel pins the range; it writes nothing).
    fn register_region(&self, region: &kvm_enc_region) -> io::Result<()>;
}

impl EncryptOp for Arc<VmFd> {
    unsafe fn encrypt_op(&self, cmd: &mut kvm_sev_cmd) -> io::Result<()> {
        self.encrypt_op_sev(cmd).map_err(io::Error::from)
    }

    fn register_region(&self, region: &kvm_enc_region) -> io::Result<()> {
        self.register_enc_memory_region(region)
            .map_err(io::Error::from)
    }
}

fn status(command: Command, status: SevError) -> FirmwareError {
    FirmwareError::Status { command, status }
}

/// A host address as the kernel's `__u64`. Outputs are passed as `*mut` pointers (`&raw mut`,
/// `as_mut_ptr`) so the kernel's writes go through a pointer that may write.
fn addr<T>(p: *const T) -> u64 {
    p as usize as u64
}

/// A buffer length as the kernel's `__u32`; longer buffers are the firmware's INVALID_LEN.
fn len32(command: Command, len: usize) -> Result<u32, FirmwareError> {
    u32::try_from(len).map_err(|_| status(command, SevError::InvalidLen))
}

/// The firmware answered a length query with a length Veil's types cannot hold.
fn unexpected_len(command: Command, what: &str, got: u32, want: usize) -> FirmwareError {
    FirmwareError::Io {
        command,
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the firmware wants a {got}-byte {what}, Veil expects {want}"),
        ),
    }
}

/// A length query is answered with INVALID_LEN (or success) and the lengths filled in; any
/// other failure (wrong guest state, NOSEND policy, ...) is the command's real answer.
fn answered_query(asked: Result<(), FirmwareError>) -> Result<(), FirmwareError> {
    match asked {
        Ok(())
        | Err(FirmwareError::Status {
            status: SevError::InvalidLen,
            ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The host address of guest bytes, as the kernel's `__u64`; writable, since the firmware may
/// rewrite guest memory in place.
fn guest_addr(bytes: &GuestBytes<'_>) -> u64 {
    addr(bytes.ptr_guard_mut().as_ptr())
}

/// KVM_SEV_INIT failed (kept apart from [`FirmwareError`]: its [`Command`] has no INIT).
#[derive(Debug)]
pub(crate) struct InitFailure {
    pub status: Option<SevError>,
    pub source: io::Error,
}

/// One VM's SEV context in KVM.
pub(crate) struct SevVm {
    vm: Box<dyn EncryptOp>,
    /// `/dev/sev`, which KVM wants with each command to prove access to the firmware.
    sev_fd: RawFd,
    /// SEND_UPDATE_DATA's header length, asked once.
    send_header_len: Option<u32>,
}

impl SevVm {
    pub fn new(vm: Box<dyn EncryptOp>, sev_fd: RawFd) -> Self {
        Self {
            vm,
            sev_fd,
            send_header_len: None,
        }
    }

    /// Issues command `id` with argument `data` (0 for none).
    ///
    /// # Safety
    /// As [`EncryptOp::encrypt_op`]: `data` is 0 or points to `id`'s struct, whose buffers are
    /// valid for the whole call.
    unsafe fn issue(&self, command: Command, id: u32, data: u64) -> Result<(), FirmwareError> {
        let mut cmd = kvm_sev_cmd {
            id,
            data,
            sev_fd: self.sev_fd as u32,
            ..Default::default()
        };
        // SAFETY: the caller vouches for `data` and its buffers.
        match unsafe { self.vm.encrypt_op(&mut cmd) } {
            Ok(()) => Ok(()),
            // `SevError::from` maps codes it does not know to `UnknownError`.
            Err(_) if cmd.error != 0 => Err(status(command, SevError::from(cmd.error))),
            Err(source) => Err(FirmwareError::Io { command, source }),
        }
    }

    /// KVM_SEV_INIT: makes this VM an SEV VM (before any vCPU exists).
    pub fn init(&self) -> Result<(), InitFailure> {
        let mut cmd = kvm_sev_cmd {
            id: id::INIT,
            sev_fd: self.sev_fd as u32,
            ..Default::default()
        };
        // SAFETY: KVM_SEV_INIT reads no argument (`data` is 0).
        unsafe { self.vm.encrypt_op(&mut cmd) }.map_err(|source| InitFailure {
            status: (cmd.error != 0).then(|| SevError::from(cmd.error)),
            source,
        })
    }

    /// KVM_MEMORY_ENCRYPT_REG_REGION over `len` bytes of guest RAM mapped at `host_addr`.
    pub fn register_region(&self, host_addr: u64, len: u64) -> io::Result<()> {
        self.vm.register_region(&kvm_enc_region {
            addr: host_addr,
            size: len,
        })
    }

    /// LAUNCH_START; `owner` is the owner's DH certificate and session blob (both encoded).
    /// Returns the firmware's handle.
    pub fn launch_start(
        &self,
        policy: u32,
        owner: Option<(&[u8], &[u8; SESSION_BYTES])>,
    ) -> Result<u32, FirmwareError> {
        const C: Command = Command::LaunchStart;
        let mut start = kvm_sev_launch_start {
            policy,
            ..Default::default()
        };
        if let Some((dh, session)) = owner {
            check_blob(C, dh.len())?;
            start.dh_uaddr = addr(dh.as_ptr());
            start.dh_len = len32(C, dh.len())?;
            start.session_uaddr = addr(session.as_ptr());
            start.session_len = SESSION_BYTES as u32;
        }
        // SAFETY: `start` and the owner's buffers outlive the call; the kernel only reads them
        // and writes `start.handle`.
        unsafe { self.issue(C, id::LAUNCH_START, addr(&raw mut start))? };
        Ok(start.handle)
    }

    /// LAUNCH_UPDATE_DATA: measures `data` and encrypts it in place.
    pub fn launch_update_data(&self, data: &GuestBytes<'_>) -> Result<(), FirmwareError> {
        const C: Command = Command::LaunchUpdateData;
        let uaddr = guest_addr(data);
        check_launch_data(C, uaddr, data.len() as u64)?;
        let update = kvm_sev_launch_update_data {
            uaddr,
            len: len32(C, data.len())?,
            ..Default::default()
        };
        // SAFETY: `data` is a live view of guest RAM for the call, which the firmware may
        // rewrite (guest memory is shared with the guest by design; no vCPU runs at launch).
        unsafe { self.issue(C, id::LAUNCH_UPDATE_DATA, addr(&update)) }
    }

    /// LAUNCH_MEASURE: `measure[32] | mnonce[16]`.
    pub fn launch_measure(&self) -> Result<([u8; 32], [u8; 16]), FirmwareError> {
        const C: Command = Command::LaunchMeasure;
        let mut blob = [0u8; MEASUREMENT_BYTES];
        let mut measure = kvm_sev_launch_measure {
            uaddr: addr(blob.as_mut_ptr()),
            len: MEASUREMENT_BYTES as u32,
            ..Default::default()
        };
        // SAFETY: `blob` is as long as `measure.len` says; it and `measure` (whose `len` the
        // kernel rewrites) live until the call returns.
        unsafe { self.issue(C, id::LAUNCH_MEASURE, addr(&raw mut measure))? };
        let mut m = [0u8; 32];
        let mut mnonce = [0u8; 16];
        m.copy_from_slice(&blob[..32]);
        mnonce.copy_from_slice(&blob[32..]);
        Ok((m, mnonce))
    }

    /// LAUNCH_SECRET: decrypts the owner's packet into `dest` (guest RAM).
    pub fn launch_secret(
        &self,
        header: &[u8; PACKET_HEADER_BYTES],
        data: &[u8],
        dest: &GuestBytes<'_>,
    ) -> Result<(), FirmwareError> {
        const C: Command = Command::LaunchSecret;
        let guest_uaddr = guest_addr(dest);
        if dest.len() != data.len() {
            return Err(status(C, SevError::InvalidLen));
        }
        check_secret_dest(C, guest_uaddr, dest.len() as u64)?;
        check_blob(C, data.len())?;
        let secret = kvm_sev_launch_secret {
            hdr_uaddr: addr(header.as_ptr()),
            hdr_len: PACKET_HEADER_BYTES as u32,
            guest_uaddr,
            guest_len: len32(C, dest.len())?,
            trans_uaddr: addr(data.as_ptr()),
            trans_len: len32(C, data.len())?,
            ..Default::default()
        };
        // SAFETY: the three buffers are live for the call, with the lengths given; only `dest`,
        // a view of guest RAM, is written.
        unsafe { self.issue(C, id::LAUNCH_SECRET, addr(&secret)) }
    }

    /// LAUNCH_FINISH.
    pub fn launch_finish(&self) -> Result<(), FirmwareError> {
        // SAFETY: LAUNCH_FINISH takes no argument.
        unsafe { self.issue(Command::LaunchFinish, id::LAUNCH_FINISH, 0) }
    }

    /// SEND_START to the platform whose PDH is `pdh`, with its PEK|OCA|CEK (`platform`) and
    /// ASK|ARK (`amd`), all encoded. Returns the guest's policy and the session blob.
    pub fn send_start(
        &self,
        pdh: &[u8],
        platform: &[u8],
        amd: &[u8],
    ) -> Result<(u32, [u8; SESSION_BYTES]), FirmwareError> {
        const C: Command = Command::SendStart;
        for cert in [pdh, platform, amd] {
            check_blob(C, cert.len())?;
        }
        // A zero session_len asks the firmware how long the session blob is.
        let mut query = kvm_sev_send_start::default();
        // SAFETY: `query` lives for the call and names no buffer.
        let asked = unsafe { self.issue(C, id::SEND_START, addr(&raw mut query)) };
        answered_query(asked)?;
        if query.session_len as usize != SESSION_BYTES {
            return Err(unexpected_len(
                C,
                "session",
                query.session_len,
                SESSION_BYTES,
            ));
        }

        let mut session = [0u8; SESSION_BYTES];
        let mut start = kvm_sev_send_start {
            pdh_cert_uaddr: addr(pdh.as_ptr()),
            pdh_cert_len: len32(C, pdh.len())?,
            plat_certs_uaddr: addr(platform.as_ptr()),
            plat_certs_len: len32(C, platform.len())?,
            amd_certs_uaddr: addr(amd.as_ptr()),
            amd_certs_len: len32(C, amd.len())?,
            session_uaddr: addr(session.as_mut_ptr()),
            session_len: SESSION_BYTES as u32,
            ..Default::default()
        };
        // SAFETY: the certificates are read, `session` (as long as `session_len`) is written,
        // and `start` gets the policy; all live until the call returns.
        unsafe { self.issue(C, id::SEND_START, addr(&raw mut start))? };
        Ok((start.policy, session))
    }

    /// SEND_UPDATE_DATA: encrypts `page` (part of one guest page, in guest RAM, read in place)
    /// for the target, into `header` and `data` (the transport buffer, as long as `page`:
    /// the payload is AES-CTR).
    pub fn send_update_data(
        &mut self,
        page: &GuestBytes<'_>,
        header: &mut [u8; PACKET_HEADER_BYTES],
        data: &mut [u8],
    ) -> Result<(), FirmwareError> {
        const C: Command = Command::SendUpdateData;
        let guest_uaddr = addr(page.ptr_guard().as_ptr());
        check_page_payload(C, guest_uaddr, page.len() as u64)?;
        if data.len() != page.len() {
            return Err(status(C, SevError::InvalidLen));
        }
        let hdr_len = self.send_header_len()?;
        let update = kvm_sev_send_update_data {
            hdr_uaddr: addr(header.as_mut_ptr()),
            hdr_len,
            guest_uaddr,
            guest_len: len32(C, page.len())?,
            trans_uaddr: addr(data.as_mut_ptr()),
            trans_len: len32(C, data.len())?,
            ..Default::default()
        };
        // SAFETY: `page` (a live view of guest RAM) is read, `header` (hdr_len == its size,
        // checked by send_header_len) and `data` (trans_len, its length) are written; all
        // are borrowed for the call.
        unsafe { self.issue(C, id::SEND_UPDATE_DATA, addr(&update))? };
        Ok(())
    }

    /// Asks the firmware (once) how long SEND_UPDATE_DATA's packet header is: zero lengths
    /// make it report them.
    fn send_header_len(&mut self) -> Result<u32, FirmwareError> {
        const C: Command = Command::SendUpdateData;
        if let Some(len) = self.send_header_len {
            return Ok(len);
        }
        let mut query = kvm_sev_send_update_data::default();
        // SAFETY: `query` lives for the call and names no buffer.
        let asked = unsafe { self.issue(C, id::SEND_UPDATE_DATA, addr(&raw mut query)) };
        answered_query(asked)?;
        if query.hdr_len as usize != PACKET_HEADER_BYTES {
            return Err(unexpected_len(
                C,
                "packet header",
                query.hdr_len,
                PACKET_HEADER_BYTES,
            ));
        }
        self.send_header_len = Some(query.hdr_len);
        Ok(query.hdr_len)
    }

    /// SEND_FINISH.
    pub fn send_finish(&self) -> Result<(), FirmwareError> {
        // SAFETY: SEND_FINISH takes no argument.
        unsafe { self.issue(Command::SendFinish, id::SEND_FINISH, 0) }
    }

    /// SEND_CANCEL.
    pub fn send_cancel(&self) -> Result<(), FirmwareError> {
        // SAFETY: SEND_CANCEL takes no argument.
        unsafe { self.issue(Command::SendCancel, id::SEND_CANCEL, 0) }
    }

    /// RECEIVE_START with the source's PDH (encoded) and session blob. Returns the handle.
    pub fn receive_start(
        &self,
        policy: u32,
        pdh: &[u8],
        session: &[u8; SESSION_BYTES],
    ) -> Result<u32, FirmwareError> {
        const C: Command = Command::ReceiveStart;
        check_blob(C, pdh.len())?;
        let mut start = kvm_sev_receive_start {
            policy,
            pdh_uaddr: addr(pdh.as_ptr()),
            pdh_len: len32(C, pdh.len())?,
            session_uaddr: addr(session.as_ptr()),
            session_len: SESSION_BYTES as u32,
            ..Default::default()
        };
        // SAFETY: `pdh` and `session` are read, `start.handle` is written; all live for the
        // call.
        unsafe { self.issue(C, id::RECEIVE_START, addr(&raw mut start))? };
        Ok(start.handle)
    }

    /// RECEIVE_UPDATE_DATA: verifies the packet and decrypts it into `dest` (guest RAM).
    pub fn receive_update_data(
        &self,
        header: &[u8; PACKET_HEADER_BYTES],
        data: &[u8],
        dest: &GuestBytes<'_>,
    ) -> Result<(), FirmwareError> {
        const C: Command = Command::ReceiveUpdateData;
        let guest_uaddr = guest_addr(dest);
        if dest.len() != data.len() {
            return Err(status(C, SevError::InvalidLen));
        }
        check_page_payload(C, guest_uaddr, dest.len() as u64)?;
        let update = kvm_sev_receive_update_data {
            hdr_uaddr: addr(header.as_ptr()),
            hdr_len: PACKET_HEADER_BYTES as u32,
            guest_uaddr,
            guest_len: len32(C, dest.len())?,
            trans_uaddr: addr(data.as_ptr()),
            trans_len: len32(C, data.len())?,
            ..Default::default()
        };
        // SAFETY: `header` and `data` are read, `dest` (a live view of guest RAM) is written;
        // all live for the call, with the lengths given.
        unsafe { self.issue(C, id::RECEIVE_UPDATE_DATA, addr(&update)) }
    }

    /// RECEIVE_FINISH.
    pub fn receive_finish(&self) -> Result<(), FirmwareError> {
        // SAFETY: RECEIVE_FINISH takes no argument.
        unsafe { self.issue(Command::ReceiveFinish, id::RECEIVE_FINISH, 0) }
    }
}

#[cfg(test)]
mod tests {
    use std::mem::{offset_of, size_of};

    use super::*;
    use crate::guest_memory::test_ram::TestRam;
    use crate::hardware::fake::FakeVm;

    /// SEND_UPDATE_DATA into a new header and transport buffer.
    fn send_update_data(
        vm: &mut SevVm,
        page: &GuestBytes<'_>,
    ) -> Result<([u8; PACKET_HEADER_BYTES], Vec<u8>), FirmwareError> {
        let mut header = [0; PACKET_HEADER_BYTES];
        let mut data = vec![0; page.len()];
        vm.send_update_data(page, &mut header, &mut data)?;
        Ok((header, data))
    }

    fn sev_vm() -> (SevVm, FakeVm) {
        let fake = FakeVm::default();
        (SevVm::new(Box::new(fake.clone()), 3), fake)
    }

    /// The kernel's layout (include/uapi/linux/kvm.h, measured with offsetof on x86-64):
    /// the structs handed to KVM must match it byte for byte.
    #[test]
    fn the_structs_have_the_uapi_layout() {
        assert_eq!(size_of::<kvm_sev_cmd>(), 24);
        assert_eq!(offset_of!(kvm_sev_cmd, id), 0);
        assert_eq!(offset_of!(kvm_sev_cmd, data), 8);
        assert_eq!(offset_of!(kvm_sev_cmd, error), 16);
        assert_eq!(offset_of!(kvm_sev_cmd, sev_fd), 20);

        assert_eq!(size_of::<kvm_sev_launch_start>(), 40);
        assert_eq!(offset_of!(kvm_sev_launch_start, handle), 0);
        assert_eq!(offset_of!(kvm_sev_launch_start, policy), 4);
        assert_eq!(offset_of!(kvm_sev_launch_start, dh_uaddr), 8);
        assert_eq!(offset_of!(kvm_sev_launch_start, dh_len), 16);
        assert_eq!(offset_of!(kvm_sev_launch_start, session_uaddr), 24);
        assert_eq!(offset_of!(kvm_sev_launch_start, session_len), 32);

        assert_eq!(size_of::<kvm_sev_launch_update_data>(), 16);
        assert_eq!(offset_of!(kvm_sev_launch_update_data, uaddr), 0);
        assert_eq!(offset_of!(kvm_sev_launch_update_data, len), 8);
        assert_eq!(size_of::<kvm_sev_launch_measure>(), 16);
        assert_eq!(offset_of!(kvm_sev_launch_measure, uaddr), 0);
        assert_eq!(offset_of!(kvm_sev_launch_measure, len), 8);

        assert_eq!(size_of::<kvm_sev_send_start>(), 72);
        assert_eq!(offset_of!(kvm_sev_send_start, policy), 0);
        assert_eq!(offset_of!(kvm_sev_send_start, pdh_cert_uaddr), 8);
        assert_eq!(offset_of!(kvm_sev_send_start, pdh_cert_len), 16);
        assert_eq!(offset_of!(kvm_sev_send_start, plat_certs_uaddr), 24);
        assert_eq!(offset_of!(kvm_sev_send_start, plat_certs_len), 32);
        assert_eq!(offset_of!(kvm_sev_send_start, amd_certs_uaddr), 40);
        assert_eq!(offset_of!(kvm_sev_send_start, amd_certs_len), 48);
        assert_eq!(offset_of!(kvm_sev_send_start, session_uaddr), 56);
        assert_eq!(offset_of!(kvm_sev_send_start, session_len), 64);

        assert_eq!(size_of::<kvm_sev_receive_start>(), 40);
        assert_eq!(offset_of!(kvm_sev_receive_start, handle), 0);
        assert_eq!(offset_of!(kvm_sev_receive_start, policy), 4);
        assert_eq!(offset_of!(kvm_sev_receive_start, pdh_uaddr), 8);
        assert_eq!(offset_of!(kvm_sev_receive_start, pdh_len), 16);
        assert_eq!(offset_of!(kvm_sev_receive_start, session_uaddr), 24);
        assert_eq!(offset_of!(kvm_sev_receive_start, session_len), 32);

        // SEND_UPDATE_DATA, RECEIVE_UPDATE_DATA and LAUNCH_SECRET share one layout.
        macro_rules! packet_layout {
            ($t:ty) => {
                assert_eq!(size_of::<$t>(), 48);
                assert_eq!(offset_of!($t, hdr_uaddr), 0);
                assert_eq!(offset_of!($t, hdr_len), 8);
                assert_eq!(offset_of!($t, guest_uaddr), 16);
                assert_eq!(offset_of!($t, guest_len), 24);
                assert_eq!(offset_of!($t, trans_uaddr), 32);
                assert_eq!(offset_of!($t, trans_len), 40);
            };
        }
        packet_layout!(kvm_sev_send_update_data);
        packet_layout!(kvm_sev_receive_update_data);
        packet_layout!(kvm_sev_launch_secret);

        assert_eq!(size_of::<kvm_enc_region>(), 16);
        assert_eq!(offset_of!(kvm_enc_region, addr), 0);
        assert_eq!(offset_of!(kvm_enc_region, size), 8);
    }

    #[test]
    fn the_command_ids_are_the_kernels() {
        let ids = [
            (id::INIT, 0),
            (id::LAUNCH_START, 2),
            (id::LAUNCH_UPDATE_DATA, 3),
            (id::LAUNCH_SECRET, 5),
            (id::LAUNCH_MEASURE, 6),
            (id::LAUNCH_FINISH, 7),
            (id::SEND_START, 8),
            (id::SEND_UPDATE_DATA, 9),
            (id::SEND_FINISH, 11),
            (id::RECEIVE_START, 12),
            (id::RECEIVE_UPDATE_DATA, 13),
            (id::RECEIVE_FINISH, 15),
            (id::SEND_CANCEL, 21),
        ];
        for (got, want) in ids {
            assert_eq!(got, want);
        }
    }

    #[test]
    fn send_start_asks_the_session_length_then_passes_every_buffer() {
        let (vm, fake) = sev_vm();
        fake.state().policy = 0x21;
        let (pdh, platform, amd) = (vec![1u8; 2084], vec![2u8; 3 * 2084], vec![3u8; 1600]);
        let (policy, session) = vm.send_start(&pdh, &platform, &amd).unwrap();
        assert_eq!(policy, 0x21);
        assert_eq!(session, [0x5a; SESSION_BYTES]);
        let st = fake.state();
        assert_eq!(st.calls, [id::SEND_START, id::SEND_START]);
        assert_eq!(st.send_start_lens, Some((2084, 3 * 2084, 1600)));
    }

    #[test]
    fn a_session_length_veil_cannot_hold_is_an_error_before_sending() {
        let (vm, fake) = sev_vm();
        fake.state().session_len = 256;
        let err = vm.send_start(&[1; 16], &[2; 16], &[3; 16]).unwrap_err();
        assert!(
            matches!(&err, FirmwareError::Io { command: Command::SendStart, source }
                if source.kind() == io::ErrorKind::InvalidData),
            "{err:?}"
        );
        assert_eq!(fake.state().calls, [id::SEND_START], "only the query");
    }

    #[test]
    fn send_update_data_asks_the_header_length_once_and_encrypts_whole_and_part_pages() {
        let (mut vm, fake) = sev_vm();
        let ram = TestRam::new();
        ram.write(0, &(0..8192).map(|i| i as u8).collect::<Vec<_>>());
        let (header, data) = send_update_data(&mut vm, &ram.at(0, 4096)).unwrap();
        assert_eq!(header[..4], [0; 4]);
        assert_eq!(header[4..], [0x33; 48]);
        assert!(data
            .iter()
            .zip(ram.read(0, 4096))
            .all(|(c, p)| *c == p ^ 0xff));
        // Part of a page: the last 64 bytes of the second.
        let (_, data) = send_update_data(&mut vm, &ram.at(8192 - 64, 64)).unwrap();
        assert_eq!(data.len(), 64);
        assert_eq!(
            fake.state().calls,
            [
                id::SEND_UPDATE_DATA,
                id::SEND_UPDATE_DATA,
                id::SEND_UPDATE_DATA
            ],
            "one query, then one command per packet"
        );
    }

    #[test]
    fn a_transport_buffer_not_as_long_as_the_page_is_refused_before_any_call() {
        let (mut vm, fake) = sev_vm();
        let ram = TestRam::new();
        let mut header = [0; PACKET_HEADER_BYTES];
        let err = vm
            .send_update_data(&ram.at(0, 4096), &mut header, &mut [0; 4080])
            .unwrap_err();
        assert!(
            matches!(
                err,
                FirmwareError::Status {
                    command: Command::SendUpdateData,
                    status: SevError::InvalidLen
                }
            ),
            "{err:?}"
        );
        assert!(fake.state().calls.is_empty(), "{:?}", fake.state().calls);
    }

    #[test]
    fn a_header_length_other_than_52_is_an_error() {
        let (mut vm, fake) = sev_vm();
        fake.state().header_len = 64;
        let ram = TestRam::new();
        let err = send_update_data(&mut vm, &ram.at(0, 4096)).unwrap_err();
        assert!(matches!(
            err,
            FirmwareError::Io {
                command: Command::SendUpdateData,
                ..
            }
        ));
        assert_eq!(fake.state().calls, [id::SEND_UPDATE_DATA], "only the query");
    }

    #[test]
    fn a_payload_crossing_a_page_or_not_in_blocks_is_refused_before_any_ioctl() {
        let (mut vm, fake) = sev_vm();
        let ram = TestRam::new();
        let header = [0u8; PACKET_HEADER_BYTES];
        for range in [
            4096 - 16..4096 + 16,
            16..16 + 4096,
            0..8192,
            0..0,
            0..40,
            8..24,
        ] {
            let len = (range.end - range.start) as usize;
            let bytes = ram.at(range.start, len);
            let err = send_update_data(&mut vm, &bytes).unwrap_err();
            assert_eq!(err.status(), Some(SevError::InvalidLen), "send {range:?}");
            let err = vm
                .receive_update_data(&header, &vec![0u8; len], &bytes)
                .unwrap_err();
            assert_eq!(
                err.status(),
                Some(SevError::InvalidLen),
                "receive {range:?}"
            );
        }
        assert!(fake.state().calls.is_empty());
    }

    #[test]
    fn blobs_over_kvms_16_kib_cap_are_refused_before_any_ioctl() {
        let (vm, fake) = sev_vm();
        let big = vec![1u8; crate::guest_memory::SEV_FW_BLOB_MAX_SIZE + 1];
        let err = vm.send_start(&[1; 16], &big, &[3; 16]).unwrap_err();
        assert_eq!(err.status(), Some(SevError::InvalidLen));
        let err = vm.receive_start(0, &big, &[0; SESSION_BYTES]).unwrap_err();
        assert_eq!(err.status(), Some(SevError::InvalidLen));
        let err = vm
            .launch_start(0, Some((&big, &[0; SESSION_BYTES])))
            .unwrap_err();
        assert_eq!(err.status(), Some(SevError::InvalidLen));
        assert!(fake.state().calls.is_empty());
    }

    #[test]
    fn a_secret_must_stay_in_one_page_in_whole_blocks() {
        let (vm, fake) = sev_vm();
        let ram = TestRam::new();
        let header = [0u8; PACKET_HEADER_BYTES];
        // Two pages need not be physically contiguous, which KVM refuses; nor half a block.
        for (gpa, len) in [(4096 - 32, 64), (8, 16), (0, 24)] {
            let err = vm
                .launch_secret(&header, &vec![0; len], &ram.at(gpa, len))
                .unwrap_err();
            assert_eq!(err.status(), Some(SevError::InvalidLen), "{gpa:#x}+{len}");
        }
        assert!(fake.state().calls.is_empty());
    }

    #[test]
    fn receive_update_data_passes_header_payload_and_guest_page() {
        let (vm, fake) = sev_vm();
        let ram = TestRam::new();
        let payload: Vec<u8> = (0..256).map(|i| i as u8).collect();
        vm.receive_update_data(&[0; PACKET_HEADER_BYTES], &payload, &ram.at(4096, 256))
            .unwrap();
        assert!(ram
            .read(4096, 256)
            .iter()
            .zip(&payload)
            .all(|(g, p)| *g == p ^ 0xff));
        assert!(
            ram.read(0, 4096).iter().all(|b| *b == 0),
            "nothing outside the page"
        );
        // The payload and the destination must be as long as each other.
        let err = vm
            .receive_update_data(&[0; PACKET_HEADER_BYTES], &payload, &ram.at(0, 512))
            .unwrap_err();
        assert_eq!(err.status(), Some(SevError::InvalidLen));
        assert_eq!(fake.state().calls, [id::RECEIVE_UPDATE_DATA]);
    }

    #[test]
    fn firmware_status_codes_become_typed_statuses() {
        let (vm, fake) = sev_vm();
        fake.state().fail = Some((id::SEND_START, 7));
        let err = vm.send_start(&[1; 16], &[2; 16], &[3; 16]).unwrap_err();
        assert!(matches!(
            err,
            FirmwareError::Status {
                command: Command::SendStart,
                status: SevError::PolicyFailure
            }
        ));
        assert_eq!(
            err.to_string(),
            "The SEV firmware refused SEND_START: Status Code: 0x7: Policy failure."
        );
        // The length query's answer already was the refusal: nothing more is sent.
        assert_eq!(fake.state().calls, [id::SEND_START]);

        // A code the `sev` crate does not know is UnknownError, not a panic.
        fake.state().fail = Some((id::RECEIVE_FINISH, 0x99));
        let err = vm.receive_finish().unwrap_err();
        assert_eq!(err.status(), Some(SevError::UnknownError));
    }

    #[test]
    fn an_ioctl_failure_without_a_status_is_io() {
        let (vm, fake) = sev_vm();
        fake.state().fail = Some((id::LAUNCH_FINISH, 0));
        match vm.launch_finish().unwrap_err() {
            FirmwareError::Io { command, source } => {
                assert_eq!(command, Command::LaunchFinish);
                assert_eq!(source.raw_os_error(), Some(libc::ENOTTY));
            }
            other => panic!("not Io: {other:?}"),
        }
        // With a status the errno (EIO) is not what the caller sees.
        fake.state().fail = Some((id::LAUNCH_FINISH, 2));
        assert_eq!(
            vm.launch_finish().unwrap_err().status(),
            Some(SevError::InvalidGuestState)
        );
    }

    #[test]
    fn launch_commands_pass_their_buffers() {
        let (vm, fake) = sev_vm();
        assert_eq!(vm.launch_start(0x1, None).unwrap(), 7);
        let ram = TestRam::new();
        ram.write(0, &[0x0f; 32]);
        vm.launch_update_data(&ram.at(0, 32)).unwrap();
        assert_eq!(ram.read(0, 32), [0xf0; 32], "encrypted in place");
        assert_eq!(vm.launch_measure().unwrap(), ([0x11; 32], [0x22; 16]));
        let secret = [0xaau8; 64];
        vm.launch_secret(&[0; PACKET_HEADER_BYTES], &secret, &ram.at(112, 64))
            .unwrap();
        assert_eq!(ram.read(112, 64), [0x55; 64]);
        let err = vm
            .launch_secret(&[0; PACKET_HEADER_BYTES], &secret, &ram.at(0, 32))
            .unwrap_err();
        assert_eq!(err.status(), Some(SevError::InvalidLen));
        vm.launch_finish().unwrap();
        vm.register_region(0x7f00_0000_0000, 1 << 30).unwrap();
        let st = fake.state();
        assert_eq!(
            st.calls,
            [
                id::LAUNCH_START,
                id::LAUNCH_UPDATE_DATA,
                id::LAUNCH_MEASURE,
                id::LAUNCH_SECRET,
                id::LAUNCH_FINISH
            ]
        );
        assert_eq!(st.regions, [(0x7f00_0000_0000, 1 << 30)]);
    }
}
