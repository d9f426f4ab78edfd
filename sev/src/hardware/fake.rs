//! A fake VM fd and `/dev/sev` for tests: they answer the SEV commands the way KVM and the
//! firmware do (length queries, handles, status codes) and check every buffer they are given.
//! "Encryption" is XOR with 0xff, enough to see data go through the firmware.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_bindings::{
    kvm_enc_region, kvm_sev_cmd, kvm_sev_launch_measure, kvm_sev_launch_secret,
    kvm_sev_launch_start, kvm_sev_launch_update_data, kvm_sev_receive_start,
    kvm_sev_receive_update_data, kvm_sev_send_start, kvm_sev_send_update_data,
};
use sev::error::UserApiError;
use sev::firmware::host::{Build, PlatformStatusFlags, State, Status, Version};

use super::firmware::PlatformDevice;
use super::kvm::{id, EncryptOp};
use crate::crypto::{PACKET_HEADER_BYTES, SESSION_BYTES};

/// SEV status INVALID_LEN, the answer to a length query.
const INVALID_LEN: u32 = 4;

/// What the fake saw and how it answers.
#[derive(Debug)]
pub struct FakeState {
    /// Command ids, in the order issued.
    pub calls: Vec<u32>,
    /// Answer command `.0` with status `.1` (0: ENOTTY without a status).
    pub fail: Option<(u32, u32)>,
    /// The handle LAUNCH_START and RECEIVE_START hand out.
    pub handle: u32,
    /// The guest policy SEND_START reports.
    pub policy: u32,
    /// What the length queries answer.
    pub session_len: u32,
    pub header_len: u32,
    /// Buffer lengths seen by the last SEND_START: PDH, platform certs, AMD certs.
    pub send_start_lens: Option<(u32, u32, u32)>,
    /// The owner's DH certificate and session lengths seen by LAUNCH_START.
    pub launch_owner_lens: Option<(u32, u32)>,
    /// RECEIVE_START's policy, PDH and session lengths.
    pub receive_start: Option<(u32, u32, u32)>,
    /// Registered regions.
    pub regions: Vec<(u64, u64)>,
}

impl Default for FakeState {
    fn default() -> Self {
        Self {
            calls: Vec::new(),
            fail: None,
            handle: 7,
            policy: 0,
            session_len: SESSION_BYTES as u32,
            header_len: PACKET_HEADER_BYTES as u32,
            send_start_lens: None,
            launch_owner_lens: None,
            receive_start: None,
            regions: Vec::new(),
        }
    }
}

/// The VM fd. Clones share their state.
#[derive(Clone, Default)]
pub struct FakeVm(pub Arc<Mutex<FakeState>>);

impl FakeVm {
    pub fn state(&self) -> MutexGuard<'_, FakeState> {
        self.0.lock().unwrap()
    }
}

/// A refused command: the firmware's status in `cmd.error`, EIO from the ioctl.
fn refuse(cmd: &mut kvm_sev_cmd, status: u32) -> io::Result<()> {
    cmd.error = status;
    Err(io::Error::from_raw_os_error(libc::EIO))
}

/// KVM's EINVAL, its answer to arguments it checks itself (arch/x86/kvm/svm/sev.c).
fn einval() -> io::Result<()> {
    Err(io::Error::from_raw_os_error(libc::EINVAL))
}

/// Whether `len` bytes at `uaddr` stay inside one 4 KiB page, as SEND_UPDATE_DATA and
/// RECEIVE_UPDATE_DATA require; and whether `blob` fits KVM's `SEV_FW_BLOB_MAX_SIZE`.
fn within_page(uaddr: u64, len: u32) -> bool {
    len != 0 && uaddr % 4096 + u64::from(len) <= 4096
}

fn blob_fits(len: u32) -> bool {
    len != 0 && len as usize <= crate::guest_memory::SEV_FW_BLOB_MAX_SIZE
}

/// The bytes at `uaddr`.
///
/// # Safety
/// `uaddr` names `len` readable bytes (the `EncryptOp` contract).
unsafe fn bytes<'a>(uaddr: u64, len: u32) -> &'a [u8] {
    // SAFETY: the caller's promise.
    unsafe { std::slice::from_raw_parts(uaddr as usize as *const u8, len as usize) }
}

/// The writable bytes at `uaddr`.
///
/// # Safety
/// `uaddr` names `len` writable bytes, aliased by nothing else during the call.
unsafe fn bytes_mut<'a>(uaddr: u64, len: u32) -> &'a mut [u8] {
    // SAFETY: the caller's promise.
    unsafe { std::slice::from_raw_parts_mut(uaddr as usize as *mut u8, len as usize) }
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = s ^ 0xff;
    }
}

impl EncryptOp for FakeVm {
    unsafe fn encrypt_op(&self, cmd: &mut kvm_sev_cmd) -> io::Result<()> {
        let mut st = self.state();
        st.calls.push(cmd.id);
        match st.fail {
            Some((id, 0)) if id == cmd.id => {
                return Err(io::Error::from_raw_os_error(libc::ENOTTY))
            }
            Some((id, status)) if id == cmd.id => return refuse(cmd, status),
            _ => {}
        }
        let data = cmd.data as usize;
        // SAFETY (every block below): the caller promised that `data` points to the struct of
        // `cmd.id` and that the addresses in it name buffers of the lengths beside them, which
        // the kernel, played here, may read and write for the call.
        match cmd.id {
            id::INIT
            | id::LAUNCH_FINISH
            | id::SEND_FINISH
            | id::SEND_CANCEL
            | id::RECEIVE_FINISH => {
                assert_eq!(data, 0, "command {} takes no argument", cmd.id);
                Ok(())
            }
            id::LAUNCH_START => {
                // SAFETY: see above.
                let p = unsafe { &mut *(data as *mut kvm_sev_launch_start) };
                assert_eq!(p.handle, 0, "a new guest");
                if p.dh_uaddr != 0 {
                    // SAFETY: see above.
                    let (dh, session) = unsafe {
                        (
                            bytes(p.dh_uaddr, p.dh_len),
                            bytes(p.session_uaddr, p.session_len),
                        )
                    };
                    assert_eq!(
                        u32::from_le_bytes(dh[..4].try_into().unwrap()),
                        1,
                        "cert v1"
                    );
                    assert_eq!(session.len(), SESSION_BYTES);
                    st.launch_owner_lens = Some((p.dh_len, p.session_len));
                }
                p.handle = st.handle;
                Ok(())
            }
            id::LAUNCH_UPDATE_DATA => {
                // SAFETY: see above.
                let p = unsafe { &*(data as *const kvm_sev_launch_update_data) };
                // SAFETY: see above.
                let d = unsafe { bytes_mut(p.uaddr, p.len) };
                d.iter_mut().for_each(|b| *b ^= 0xff);
                Ok(())
            }
            id::LAUNCH_MEASURE => {
                // SAFETY: see above.
                let p = unsafe { &mut *(data as *mut kvm_sev_launch_measure) };
                assert_eq!(p.len, 48);
                // SAFETY: see above.
                let blob = unsafe { bytes_mut(p.uaddr, p.len) };
                blob[..32].fill(0x11);
                blob[32..].fill(0x22);
                Ok(())
            }
            id::LAUNCH_SECRET => {
                // SAFETY: see above.
                let p = unsafe { &*(data as *const kvm_sev_launch_secret) };
                assert_eq!(p.hdr_len as usize, PACKET_HEADER_BYTES);
                assert_eq!(p.guest_len, p.trans_len);
                // SAFETY: see above.
                let (trans, guest) = unsafe {
                    (
                        bytes(p.trans_uaddr, p.trans_len),
                        bytes_mut(p.guest_uaddr, p.guest_len),
                    )
                };
                xor_into(guest, trans);
                Ok(())
            }
            id::SEND_START => {
                // SAFETY: see above.
                let p = unsafe { &mut *(data as *mut kvm_sev_send_start) };
                if p.session_len == 0 {
                    // A length query: every address is 0, the firmware only reports.
                    assert_eq!(
                        (
                            p.pdh_cert_uaddr,
                            p.plat_certs_uaddr,
                            p.amd_certs_uaddr,
                            p.session_uaddr
                        ),
                        (0, 0, 0, 0)
                    );
                    p.session_len = st.session_len;
                    return refuse(cmd, INVALID_LEN);
                }
                assert_eq!(p.session_len, st.session_len, "the queried length");
                for (uaddr, len) in [
                    (p.pdh_cert_uaddr, p.pdh_cert_len),
                    (p.plat_certs_uaddr, p.plat_certs_len),
                    (p.amd_certs_uaddr, p.amd_certs_len),
                ] {
                    if uaddr == 0 || !blob_fits(len) {
                        return einval();
                    }
                    // SAFETY: see above.
                    let cert = unsafe { bytes(uaddr, len) };
                    assert!(cert.len() >= 4);
                }
                st.send_start_lens = Some((p.pdh_cert_len, p.plat_certs_len, p.amd_certs_len));
                // SAFETY: see above.
                unsafe { bytes_mut(p.session_uaddr, p.session_len) }.fill(0x5a);
                p.policy = st.policy;
                Ok(())
            }
            id::SEND_UPDATE_DATA => {
                // SAFETY: see above.
                let p = unsafe { &mut *(data as *mut kvm_sev_send_update_data) };
                if p.hdr_len == 0 || p.trans_len == 0 {
                    p.hdr_len = st.header_len;
                    return refuse(cmd, INVALID_LEN);
                }
                assert_eq!(p.hdr_len, st.header_len, "the queried header length");
                assert_eq!(p.trans_len, p.guest_len, "ciphertext as long as the page");
                if !within_page(p.guest_uaddr, p.guest_len) {
                    return einval();
                }
                // SAFETY: see above.
                let (guest, header, trans) = unsafe {
                    (
                        bytes(p.guest_uaddr, p.guest_len),
                        bytes_mut(p.hdr_uaddr, p.hdr_len),
                        bytes_mut(p.trans_uaddr, p.trans_len),
                    )
                };
                header.fill(0);
                header[4..].fill(0x33);
                xor_into(trans, guest);
                Ok(())
            }
            id::RECEIVE_START => {
                // SAFETY: see above.
                let p = unsafe { &mut *(data as *mut kvm_sev_receive_start) };
                assert_eq!(p.handle, 0, "a new guest");
                // SAFETY: see above.
                let pdh = unsafe { bytes(p.pdh_uaddr, p.pdh_len) };
                assert_eq!(
                    u32::from_le_bytes(pdh[..4].try_into().unwrap()),
                    1,
                    "cert v1"
                );
                st.receive_start = Some((p.policy, p.pdh_len, p.session_len));
                p.handle = st.handle;
                Ok(())
            }
            id::RECEIVE_UPDATE_DATA => {
                // SAFETY: see above.
                let p = unsafe { &*(data as *const kvm_sev_receive_update_data) };
                assert_eq!(p.hdr_len as usize, PACKET_HEADER_BYTES);
                assert_eq!(p.trans_len, p.guest_len);
                if !within_page(p.guest_uaddr, p.guest_len) || !blob_fits(p.trans_len) {
                    return einval();
                }
                // SAFETY: see above.
                let (trans, guest) = unsafe {
                    (
                        bytes(p.trans_uaddr, p.trans_len),
                        bytes_mut(p.guest_uaddr, p.guest_len),
                    )
                };
                xor_into(guest, trans);
                Ok(())
            }
            other => panic!("unexpected SEV command {other}"),
        }
    }

    fn register_region(&self, region: &kvm_enc_region) -> io::Result<()> {
        self.state().regions.push((region.addr, region.size));
        Ok(())
    }
}

/// `/dev/sev`: a platform status and an exported chain.
pub struct FakeDevice {
    pub chain: sev::certs::sev::sev::Chain,
}

impl PlatformDevice for FakeDevice {
    fn platform_status(&mut self) -> Result<Status, UserApiError> {
        Ok(Status {
            build: Build {
                version: Version {
                    major: 1,
                    minor: 55,
                },
                build: 21,
            },
            state: State::Working,
            flags: PlatformStatusFlags::empty(),
            guests: 1,
        })
    }

    fn pdh_cert_export(&mut self) -> Result<sev::certs::sev::sev::Chain, UserApiError> {
        Ok(sev::certs::sev::sev::Chain {
            pdh: self.chain.pdh,
            pek: self.chain.pek,
            oca: self.chain.oca,
            cek: self.chain.cek,
        })
    }
}
