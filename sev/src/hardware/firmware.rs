//! [`Firmware`] on a real AMD host: the platform through `/dev/sev` (the `sev` crate), the guest
//! commands through KVM on the VM's fd ([`super::kvm`]).
//!
//! One `HardwareFirmware` serves one VM: KVM binds a single firmware guest context (handle and
//! ASID) to a VM, so a second LAUNCH_START or RECEIVE_START is refused here, and a handle that
//! is not this VM's is the firmware's INVALID_GUEST, as in the emulated model. The guest's state
//! machine is the firmware's own; only the launch measurement is remembered, so asking twice
//! gives the same answer on both backends.

use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::Arc;

use kvm_ioctls::VmFd;
use sev::certs::sev::sev::Certificate;
use sev::certs::sev::{ca, Chain, Verifiable};
use sev::error::{FirmwareError as SevCrateError, UserApiError};
use sev::firmware::host::{State, Status};
use sev::parser::Encoder;
use sev::Generation;

use super::kvm::{EncryptOp, InitFailure, SevVm};
use crate::crypto::SESSION_BYTES;
use crate::firmware::{
    Command, Firmware, FirmwareError, GuestBytes, Handle, LaunchMeasurement, Packet, PacketMut,
    PacketRef, PlatformStatus, SendStart, SevError,
};
use crate::guest_memory::{self, RegisteredRam};
use crate::policy::GuestPolicy;

/// The SEV firmware's device node (drivers/crypto/ccp).
pub const SEV_DEVICE: &str = "/dev/sev";

/// The `/dev/sev` commands Veil uses, behind a trait so tests can answer them.
pub(crate) trait PlatformDevice: Send {
    fn platform_status(&mut self) -> Result<Status, UserApiError>;
    fn pdh_cert_export(&mut self) -> Result<sev::certs::sev::sev::Chain, UserApiError>;
}

impl PlatformDevice for sev::firmware::host::Firmware {
    fn platform_status(&mut self) -> Result<Status, UserApiError> {
        sev::firmware::host::Firmware::platform_status(self)
    }

    fn pdh_cert_export(&mut self) -> Result<sev::certs::sev::sev::Chain, UserApiError> {
        sev::firmware::host::Firmware::pdh_cert_export(self)
    }
}

/// The guest context bound to this VM.
struct Guest {
    handle: Handle,
    measurement: Option<LaunchMeasurement>,
}

/// The AMD Secure Processor's SEV firmware, driving one VM.
pub struct HardwareFirmware {
    /// Owns `/dev/sev`, whose fd `vm` hands to KVM with each command.
    device: Box<dyn PlatformDevice>,
    vm: SevVm,
    guest: Option<Guest>,
    /// The CEK certificate as AMD signed it, which the firmware itself cannot export.
    signed_cek: Option<Certificate>,
    /// Guest RAM registered with KVM: guest bytes outside it are refused before any ioctl.
    ram: RegisteredRam,
}

impl std::fmt::Debug for HardwareFirmware {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HardwareFirmware")
            .field("guest", &self.guest.as_ref().map(|g| g.handle))
            .finish_non_exhaustive()
    }
}

/// Why `/dev/sev` cannot be used, in words an operator can act on.
fn device_unavailable(e: &io::Error) -> FirmwareError {
    let reason = match e.kind() {
        io::ErrorKind::NotFound => format!(
            "{SEV_DEVICE} does not exist (is the ccp module loaded and SEV enabled in the BIOS?)"
        ),
        io::ErrorKind::PermissionDenied => {
            format!("{SEV_DEVICE} cannot be opened by this user (it needs read and write access)")
        }
        _ => format!("{SEV_DEVICE} cannot be opened ({e})"),
    };
    FirmwareError::Unavailable { reason }
}

/// Why KVM refused to make the VM an SEV VM.
fn init_unavailable(failure: InitFailure) -> FirmwareError {
    let reason = match (failure.status, failure.source.raw_os_error()) {
        (Some(status), _) => format!("KVM_SEV_INIT failed in the firmware ({status})"),
        (None, Some(libc::ENOTTY)) => {
            "KVM cannot run SEV guests (is kvm_amd loaded with sev=1?)".to_string()
        }
        (None, Some(libc::EINVAL)) => {
            "KVM_SEV_INIT was refused (the VM must be of the default type \
                                 and have no vCPUs yet)"
                .to_string()
        }
        (None, _) => format!("KVM_SEV_INIT failed ({})", failure.source),
    };
    FirmwareError::Unavailable { reason }
}

/// A `sev` crate error as the firmware error of `command`.
fn platform_error(command: Command, e: UserApiError) -> FirmwareError {
    match e {
        UserApiError::FirmwareError(SevCrateError::KnownSevError(status)) => {
            FirmwareError::Status { command, status }
        }
        UserApiError::FirmwareError(SevCrateError::UnknownSevError(code)) => {
            FirmwareError::Status {
                command,
                status: SevError::from(code),
            }
        }
        UserApiError::FirmwareError(SevCrateError::IoError(source))
        | UserApiError::IOError(source) => FirmwareError::Io { command, source },
        other => FirmwareError::Io {
            command,
            source: io::Error::other(other),
        },
    }
}

fn state_name(state: State) -> &'static str {
    match state {
        State::Uninitialized => "UNINIT",
        State::Initialized => "INIT",
        State::Working => "WORKING",
    }
}

/// The 32-bit policy word of the `sev` crate's `Policy` (flags, then minimum API major, minor).
fn policy_bits(policy: &sev::launch::sev::Policy) -> u32 {
    u32::from(policy.flags.bits())
        | (u32::from(policy.minfw.major) << 16)
        | (u32::from(policy.minfw.minor) << 24)
}

/// Certificates in the firmware's binary format, concatenated.
fn encode<T: Encoder<()>>(command: Command, parts: &[&T]) -> Result<Vec<u8>, FirmwareError> {
    let mut bytes = Vec::new();
    for part in parts {
        part.encode(&mut bytes, ())
            .map_err(|source| FirmwareError::Io { command, source })?;
    }
    Ok(bytes)
}

/// AMD's ASK/ARK pairs of every generation the `sev` crate carries.
fn amd_ca_chains() -> Vec<ca::Chain> {
    [
        Generation::Naples,
        Generation::Rome,
        Generation::Milan,
        Generation::Genoa,
        Generation::Turin,
    ]
    .into_iter()
    .map(ca::Chain::from)
    .collect()
}

/// Completes the platform chain with the CA chain whose ASK signed its CEK.
fn full_chain(platform: sev::certs::sev::sev::Chain, cas: Vec<ca::Chain>) -> Option<Chain> {
    let ca = cas
        .into_iter()
        .find(|ca| (&ca.ask, &platform.cek).verify().is_ok())?;
    Some(Chain { ca, sev: platform })
}

impl HardwareFirmware {
    /// Opens `/dev/sev` and makes `vm` an SEV VM (KVM_SEV_INIT). Call it before creating
    /// vCPUs, on a VM of the default type. Without SEV this is
    /// [`FirmwareError::Unavailable`], saying what is missing.
    pub fn open(vm: Arc<VmFd>) -> Result<Self, FirmwareError> {
        let device = sev::firmware::host::Firmware::open().map_err(|e| device_unavailable(&e))?;
        let sev_fd = device.as_raw_fd();
        Self::from_parts(Box::new(device), sev_fd, Box::new(vm))
    }

    /// The firmware over any device and VM (tests answer both).
    pub(crate) fn from_parts(
        device: Box<dyn PlatformDevice>,
        sev_fd: RawFd,
        vm: Box<dyn EncryptOp>,
    ) -> Result<Self, FirmwareError> {
        let vm = SevVm::new(vm, sev_fd);
        vm.init().map_err(init_unavailable)?;
        Ok(Self {
            device,
            vm,
            guest: None,
            signed_cek: None,
            ram: RegisteredRam::default(),
        })
    }

    /// Uses `cek`, this chip's CEK certificate as AMD signed it (from AMD's key server, e.g.
    /// `sevctl export --full`), in the chain this firmware hands out: the firmware exports its
    /// CEK unsigned by the ASK, and without the signature no peer can verify the chain to AMD.
    /// Refused when `cek` did not sign this platform's PEK (another chip's).
    pub fn use_signed_cek(&mut self, cek: Certificate) -> Result<(), FirmwareError> {
        const C: Command = Command::PdhCertExport;
        let platform = self
            .device
            .pdh_cert_export()
            .map_err(|e| platform_error(C, e))?;
        (&cek, &platform.pek)
            .verify()
            .map_err(|_| FirmwareError::Io {
                command: C,
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "the given CEK did not sign this platform's PEK (is it another chip's?)",
                ),
            })?;
        self.signed_cek = Some(cek);
        Ok(())
    }

    /// Checks that `handle` is this VM's guest.
    fn guest(&mut self, command: Command, handle: Handle) -> Result<&mut Guest, FirmwareError> {
        match &mut self.guest {
            Some(g) if g.handle == handle => Ok(g),
            _ => Err(FirmwareError::Status {
                command,
                status: SevError::InvalidGuest,
            }),
        }
    }

    /// Refuses a second guest context on this VM.
    fn check_no_guest(&self, command: Command) -> Result<(), FirmwareError> {
        match &self.guest {
            None => Ok(()),
            Some(g) => Err(FirmwareError::Io {
                command,
                source: io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "this VM already has SEV guest {}; one guest per VM",
                        g.handle.0
                    ),
                ),
            }),
        }
    }

    fn platform_pdh(&mut self, command: Command) -> Result<Certificate, FirmwareError> {
        Ok(self
            .device
            .pdh_cert_export()
            .map_err(|e| platform_error(command, e))?
            .pdh)
    }
}

/// Refuses a packet with header flags (bit 0, compressed, is the only one defined): Veil never
/// makes one and the emulated model refuses them, so both backends answer INVALID_PARAM.
fn check_flags(
    command: Command,
    header: &[u8; crate::crypto::PACKET_HEADER_BYTES],
) -> Result<(), FirmwareError> {
    let flags = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if flags != 0 {
        return Err(FirmwareError::Status {
            command,
            status: SevError::InvalidParam,
        });
    }
    Ok(())
}

impl Firmware for HardwareFirmware {
    fn platform_status(&mut self) -> Result<PlatformStatus, FirmwareError> {
        let status = self
            .device
            .platform_status()
            .map_err(|e| platform_error(Command::PlatformStatus, e))?;
        Ok(PlatformStatus {
            api_major: status.build.version.major,
            api_minor: status.build.version.minor,
            build: status.build.build,
            state: state_name(status.state),
            guests: status.guests,
            confidential: true,
        })
    }

    fn certificate_chain(&mut self) -> Result<Chain, FirmwareError> {
        const C: Command = Command::PdhCertExport;
        let mut platform = self
            .device
            .pdh_cert_export()
            .map_err(|e| platform_error(C, e))?;
        if let Some(cek) = self.signed_cek {
            platform.cek = cek;
        }
        full_chain(platform, amd_ca_chains()).ok_or_else(|| FirmwareError::Io {
            command: C,
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                "the CEK is not signed by the ASK of any AMD generation Veil knows (the firmware \
                 exports it unsigned: give Veil the CEK AMD signed, e.g. from `sevctl export \
                 --full`)",
            ),
        })
    }

    fn register_ram(&mut self, ram: &GuestBytes<'_>) -> Result<(), FirmwareError> {
        const C: Command = Command::RegisterRegion;
        let (start, len) = guest_memory::host_range(ram);
        let mut registered = self.ram.clone();
        registered.add(start, len)?;
        self.vm
            .register_region(start, len)
            .map_err(|source| FirmwareError::Io { command: C, source })?;
        self.ram = registered;
        Ok(())
    }

    fn launch_start(
        &mut self,
        policy: GuestPolicy,
        owner: Option<&sev::launch::sev::Start>,
    ) -> Result<Handle, FirmwareError> {
        const C: Command = Command::LaunchStart;
        self.check_no_guest(C)?;
        let handle = match owner {
            None => self.vm.launch_start(policy.0, None)?,
            Some(start) => {
                // The session's MAC covers the policy; a different one could only fail later.
                if policy_bits(&start.policy) != policy.0 {
                    return Err(FirmwareError::Status {
                        command: C,
                        status: SevError::InvalidParam,
                    });
                }
                let dh = encode(C, &[&start.cert])?;
                let s = &start.session;
                let mut session = [0u8; SESSION_BYTES];
                session[..16].copy_from_slice(&s.nonce);
                session[16..48].copy_from_slice(&s.wrap_tk);
                session[48..64].copy_from_slice(&s.wrap_iv);
                session[64..96].copy_from_slice(&s.wrap_mac);
                session[96..].copy_from_slice(&s.policy_mac);
                self.vm.launch_start(policy.0, Some((&dh, &session)))?
            }
        };
        let handle = Handle(handle);
        self.guest = Some(Guest {
            handle,
            measurement: None,
        });
        Ok(handle)
    }

    fn launch_update_data(
        &mut self,
        guest: Handle,
        data: &GuestBytes<'_>,
    ) -> Result<(), FirmwareError> {
        const C: Command = Command::LaunchUpdateData;
        self.ram.check(C, data)?;
        self.guest(C, guest)?;
        self.vm.launch_update_data(data)
    }

    fn launch_measure(&mut self, guest: Handle) -> Result<LaunchMeasurement, FirmwareError> {
        if let Some(m) = self.guest(Command::LaunchMeasure, guest)?.measurement {
            return Ok(m);
        }
        let (measure, mnonce) = self.vm.launch_measure()?;
        let m = LaunchMeasurement { measure, mnonce };
        self.guest(Command::LaunchMeasure, guest)?.measurement = Some(m);
        Ok(m)
    }

    fn launch_secret(
        &mut self,
        guest: Handle,
        secret: &Packet,
        dest: &GuestBytes<'_>,
    ) -> Result<(), FirmwareError> {
        const C: Command = Command::LaunchSecret;
        self.ram.check(C, dest)?;
        self.guest(C, guest)?;
        self.vm.launch_secret(&secret.header, &secret.data, dest)
    }

    fn launch_finish(&mut self, guest: Handle) -> Result<(), FirmwareError> {
        self.guest(Command::LaunchFinish, guest)?;
        self.vm.launch_finish()?;
        // A running guest has no measurement to give: let the firmware say so.
        self.guest(Command::LaunchFinish, guest)?.measurement = None;
        Ok(())
    }

    fn send_start(&mut self, guest: Handle, target: &Chain) -> Result<SendStart, FirmwareError> {
        const C: Command = Command::SendStart;
        self.guest(C, guest)?;
        // Before SEND_START: once it succeeds the guest is in SUPDATE.
        let pdh = self.platform_pdh(C)?;
        let target_pdh = encode(C, &[&target.sev.pdh])?;
        let platform = encode(C, &[&target.sev.pek, &target.sev.oca, &target.sev.cek])?;
        let amd = encode(C, &[&target.ca.ask, &target.ca.ark])?;
        let (policy, session) = self.vm.send_start(&target_pdh, &platform, &amd)?;
        Ok(SendStart {
            policy: GuestPolicy(policy),
            pdh,
            session,
        })
    }

    fn send_update_data_into(
        &mut self,
        guest: Handle,
        page: &GuestBytes<'_>,
        out: PacketMut<'_>,
    ) -> Result<(), FirmwareError> {
        const C: Command = Command::SendUpdateData;
        self.ram.check(C, page)?;
        self.guest(C, guest)?;
        self.vm.send_update_data(page, out.header, out.data)
    }

    fn send_finish(&mut self, guest: Handle) -> Result<(), FirmwareError> {
        self.guest(Command::SendFinish, guest)?;
        self.vm.send_finish()
    }

    fn send_cancel(&mut self, guest: Handle) -> Result<(), FirmwareError> {
        self.guest(Command::SendCancel, guest)?;
        self.vm.send_cancel()
    }

    fn receive_start(&mut self, start: &SendStart) -> Result<Handle, FirmwareError> {
        const C: Command = Command::ReceiveStart;
        self.check_no_guest(C)?;
        let pdh = encode(C, &[&start.pdh])?;
        let handle = Handle(
            self.vm
                .receive_start(start.policy.0, &pdh, &start.session)?,
        );
        self.guest = Some(Guest {
            handle,
            measurement: None,
        });
        Ok(handle)
    }

    fn receive_update_data(
        &mut self,
        guest: Handle,
        packet: PacketRef<'_>,
        dest: &GuestBytes<'_>,
    ) -> Result<(), FirmwareError> {
        const C: Command = Command::ReceiveUpdateData;
        self.ram.check(C, dest)?;
        self.guest(C, guest)?;
        check_flags(C, packet.header)?;
        self.vm
            .receive_update_data(packet.header, packet.data, dest)
    }

    fn receive_finish(&mut self, guest: Handle) -> Result<(), FirmwareError> {
        self.guest(Command::ReceiveFinish, guest)?;
        self.vm.receive_finish()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::OnceLock;

    use super::*;
    use crate::emulated::identity::PlatformIdentity;
    use crate::guest_memory::test_ram::TestRam;
    use crate::hardware::fake::{FakeDevice, FakeVm};
    use crate::hardware::kvm::id;

    /// One generated identity for all tests (RSA key generation is slow in debug builds).
    fn identity() -> &'static PlatformIdentity {
        static IDENTITY: OnceLock<PlatformIdentity> = OnceLock::new();
        IDENTITY.get_or_init(|| PlatformIdentity::generate().expect("identity"))
    }

    fn device() -> FakeDevice {
        FakeDevice {
            chain: identity().export_chain().sev,
        }
    }

    fn firmware() -> (HardwareFirmware, FakeVm) {
        let fake = FakeVm::default();
        let fw = HardwareFirmware::from_parts(Box::new(device()), 3, Box::new(fake.clone()))
            .expect("open");
        (fw, fake)
    }

    #[test]
    fn open_on_a_host_without_sev_says_what_is_missing() {
        if std::path::Path::new(SEV_DEVICE).exists() {
            println!("skipped: this host has SEV");
            return;
        }
        let vm = match kvm_ioctls::Kvm::new().and_then(|kvm| kvm.create_vm()) {
            Ok(vm) => Arc::new(vm),
            Err(e) => {
                println!("skipped: no KVM VM here ({e})");
                return;
            }
        };
        let err = HardwareFirmware::open(vm).unwrap_err();
        let FirmwareError::Unavailable { reason } = &err else {
            panic!("not Unavailable: {err:?}");
        };
        assert_eq!(
            reason,
            "/dev/sev does not exist (is the ccp module loaded and SEV enabled in the BIOS?)"
        );
        assert!(
            err.to_string()
                .ends_with("; for testing use --sev-platform emulated"),
            "{err}"
        );
    }

    #[test]
    fn open_initialises_the_vm_and_a_kvm_without_sev_is_unavailable() {
        let (_, fake) = firmware();
        assert_eq!(fake.state().calls, [id::INIT]);

        let fake = FakeVm::default();
        fake.state().fail = Some((id::INIT, 0));
        let err = HardwareFirmware::from_parts(Box::new(device()), 3, Box::new(fake)).unwrap_err();
        assert!(
            err.to_string().contains("KVM cannot run SEV guests"),
            "{err}"
        );
    }

    #[test]
    fn platform_status_reports_the_firmware_and_confidentiality() {
        let (mut fw, _) = firmware();
        assert_eq!(
            fw.platform_status().unwrap(),
            PlatformStatus {
                api_major: 1,
                api_minor: 55,
                build: 21,
                state: "WORKING",
                guests: 1,
                confidential: true,
            }
        );
    }

    #[test]
    fn the_chain_is_completed_with_the_ask_that_signed_the_cek() {
        let id = identity();
        // AMD's ASKs did not sign this (emulated) CEK: a clear error, not a chain that fails
        // to verify later.
        let (mut fw, _) = firmware();
        let err = fw.certificate_chain().unwrap_err();
        assert!(err.to_string().contains("PDH_CERT_EXPORT"), "{err}");
        assert!(
            std::error::Error::source(&err)
                .unwrap()
                .to_string()
                .contains("sevctl export --full"),
            "{err:?}"
        );

        // Among several CA chains the one whose ASK signed the CEK is chosen.
        let mut cas = amd_ca_chains();
        cas.insert(2, id.export_chain().ca);
        let chain = full_chain(id.export_chain().sev, cas).expect("the identity's own ASK");
        assert_eq!(chain, id.export_chain());
        (&chain).verify().expect("a chain that verifies");
        assert!(full_chain(id.export_chain().sev, amd_ca_chains()).is_none());
    }

    #[test]
    fn a_cek_that_did_not_sign_the_pek_is_refused() {
        let (mut fw, _) = firmware();
        let other = PlatformIdentity::generate().unwrap();
        assert!(fw.use_signed_cek(other.export_chain().sev.cek).is_err());
        fw.use_signed_cek(identity().export_chain().sev.cek)
            .expect("this platform's CEK");
    }

    #[test]
    fn a_launch_goes_through_kvm_and_the_measurement_is_asked_once() {
        let (mut fw, fake) = firmware();
        let guest = fw
            .launch_start(GuestPolicy(GuestPolicy::NODBG), None)
            .unwrap();
        assert_eq!(guest, Handle(7));
        let ram = TestRam::new();
        fw.register_ram(&ram.all()).unwrap();
        fw.launch_update_data(guest, &ram.at(0, 4096)).unwrap();
        let m = fw.launch_measure(guest).unwrap();
        assert_eq!(fw.launch_measure(guest).unwrap(), m);
        fw.launch_finish(guest).unwrap();
        assert_eq!(
            fake.state().calls,
            [
                id::INIT,
                id::LAUNCH_START,
                id::LAUNCH_UPDATE_DATA,
                id::LAUNCH_MEASURE,
                id::LAUNCH_FINISH
            ]
        );
        // Running: the firmware answers for the state (here the fake measures again).
        fw.launch_measure(guest).unwrap();
        assert_eq!(fake.state().calls.last(), Some(&id::LAUNCH_MEASURE));
    }

    #[test]
    fn other_handles_and_a_second_guest_are_refused_without_an_ioctl() {
        let (mut fw, fake) = firmware();
        let ram = TestRam::new();
        fw.register_ram(&ram.all()).unwrap();
        assert_eq!(
            fw.launch_update_data(Handle(7), &ram.at(0, 16))
                .unwrap_err()
                .status(),
            Some(SevError::InvalidGuest)
        );
        let guest = fw.launch_start(GuestPolicy(0), None).unwrap();
        assert_eq!(
            fw.send_finish(Handle(guest.0 + 1)).unwrap_err().status(),
            Some(SevError::InvalidGuest)
        );
        let err = fw.launch_start(GuestPolicy(0), None).unwrap_err();
        assert!(
            matches!(&err, FirmwareError::Io { source, .. }
                if source.kind() == io::ErrorKind::AlreadyExists),
            "{err:?}"
        );
        assert_eq!(fake.state().calls, [id::INIT, id::LAUNCH_START]);
    }

    #[test]
    fn an_owner_session_is_passed_as_certificate_and_blob_under_its_own_policy() {
        let start = sev::session::Session::try_from(sev::launch::sev::Policy::default())
            .unwrap()
            .start(identity().export_chain())
            .unwrap();
        let (mut fw, fake) = firmware();
        let err = fw
            .launch_start(GuestPolicy(GuestPolicy::NOSEND), Some(&start))
            .unwrap_err();
        assert_eq!(err.status(), Some(SevError::InvalidParam));
        assert_eq!(fake.state().calls, [id::INIT], "refused before KVM");
        fw.launch_start(GuestPolicy(0), Some(&start)).unwrap();
        assert_eq!(
            fake.state().launch_owner_lens,
            Some((0x824, SESSION_BYTES as u32))
        );
    }

    #[test]
    fn send_start_hands_kvm_the_targets_chain_and_returns_this_platforms_pdh() {
        let (mut fw, fake) = firmware();
        fake.state().policy = GuestPolicy::SEV;
        let guest = fw
            .launch_start(GuestPolicy(GuestPolicy::SEV), None)
            .unwrap();
        let target = PlatformIdentity::generate().unwrap().export_chain();
        let start = fw.send_start(guest, &target).unwrap();
        assert_eq!(start.policy, GuestPolicy(GuestPolicy::SEV));
        assert_eq!(start.pdh, identity().export_chain().sev.pdh);
        assert_eq!(start.session, [0x5a; SESSION_BYTES]);

        let amd_len = encode(Command::SendStart, &[&target.ca.ask, &target.ca.ark])
            .unwrap()
            .len() as u32;
        assert_eq!(
            fake.state().send_start_lens,
            Some((0x824, 3 * 0x824, amd_len))
        );

        let ram = TestRam::new();
        let calls = fake.state().calls.len();
        // Before its RAM is registered, no guest memory reaches KVM.
        let err = fw.send_update_data(guest, &ram.at(0, 4096)).unwrap_err();
        assert_eq!(err.status(), Some(SevError::InvalidAddress));
        assert_eq!(fake.state().calls.len(), calls);
        fw.register_ram(&ram.all()).unwrap();
        ram.write(0, &[0x42; 4096]);
        let packet = fw.send_update_data(guest, &ram.at(0, 4096)).unwrap();
        assert_eq!(packet.data, vec![0x42 ^ 0xff; 4096]);
        // A page-crossing range never reaches KVM.
        let calls = fake.state().calls.len();
        let err = fw.send_update_data(guest, &ram.at(2048, 4096)).unwrap_err();
        assert_eq!(err.status(), Some(SevError::InvalidLen));
        assert_eq!(fake.state().calls.len(), calls);
        fw.send_cancel(guest).unwrap();
    }

    #[test]
    fn a_receive_passes_the_sources_pdh_and_session_and_refuses_flagged_packets() {
        let (mut fw, fake) = firmware();
        let start = SendStart {
            policy: GuestPolicy(GuestPolicy::NODBG),
            pdh: identity().export_chain().sev.pdh,
            session: [9; SESSION_BYTES],
        };
        let guest = fw.receive_start(&start).unwrap();
        assert_eq!(
            fake.state().receive_start,
            Some((GuestPolicy::NODBG, 0x824, SESSION_BYTES as u32))
        );
        let ram = TestRam::new();
        fw.register_ram(&ram.all()).unwrap();
        ram.write(4096, &[0x11; 4096]);
        let mut packet = Packet {
            header: [0; 52],
            data: vec![0xff; 4096],
        };
        fw.receive_update_data(guest, packet.as_ref(), &ram.at(4096, 4096))
            .unwrap();
        assert!(ram.read(4096, 4096).iter().all(|b| *b == 0));
        packet.header[0] = 1;
        let err = fw
            .receive_update_data(guest, packet.as_ref(), &ram.at(0, 4096))
            .unwrap_err();
        assert_eq!(err.status(), Some(SevError::InvalidParam));
        fw.receive_finish(guest).unwrap();
        assert_eq!(
            fake.state().calls,
            [
                id::INIT,
                id::RECEIVE_START,
                id::RECEIVE_UPDATE_DATA,
                id::RECEIVE_FINISH
            ]
        );
    }

    #[test]
    fn guest_ram_is_registered_by_host_address() {
        let (mut fw, fake) = firmware();
        let ram = TestRam::new();
        fw.register_ram(&ram.all()).unwrap();
        let (addr, len) = crate::guest_memory::host_range(&ram.all());
        assert_eq!(fake.state().regions, [(addr, len)]);
    }
}
