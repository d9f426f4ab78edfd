//! The firmware's state machines and commands, in software.
//!
//! Platform: UNINIT until the first guest, then WORKING while guests exist (INIT between).
//! Guest: LAUNCH (LUPDATE, then LSECRET once measured) -> RUNNING -> SUPDATE (sending) -> SENT,
//! or RUPDATE (receiving) -> RUNNING. A command in the wrong state is the firmware's
//! INVALID_GUEST_STATE; a MAC that does not verify is BAD_MEASUREMENT and writes nothing.
//!
//! Guest memory is worked on where it lies, as on hardware: the commands take [`GuestBytes`]
//! of registered RAM and refuse anything else (INVALID_ADDRESS), lengths and alignments the
//! firmware or KVM refuse (INVALID_LEN), before looking at the guest's state. The model
//! encrypts nothing in RAM: what LAUNCH_UPDATE_DATA measures stays plaintext.

use std::collections::HashMap;

use rand::RngCore;
use sev::certs::sev::Verifiable;
use sha2::{Digest, Sha256};

use super::identity::PlatformIdentity;
use crate::crypto::{self, CryptoError, PacketContext, TransportKeys, WrappingKeys};
use crate::firmware::{
    Command, Firmware, FirmwareError, GuestBytes, Handle, LaunchMeasurement, Packet, PacketMut,
    PacketRef, PlatformStatus, SendStart, SevError,
};
use crate::guest_memory::{self, RegisteredRam};
use crate::policy::GuestPolicy;

/// The API version the model implements (that of current Milan/Genoa firmware).
pub const EMULATED_API: (u8, u8) = (1, 55);
/// The build number it reports.
pub const EMULATED_BUILD: u8 = 0;

enum GuestState {
    /// LUPDATE; `measured` once LAUNCH_MEASURE ran (LSECRET).
    Launching {
        digest: Sha256,
        measured: Option<LaunchMeasurement>,
    },
    Running,
    /// SUPDATE, with the transport keys sent to the target.
    Sending(TransportKeys),
    Sent,
    Receiving,
}

struct Guest {
    policy: GuestPolicy,
    /// The launch or receive transport keys.
    keys: TransportKeys,
    state: GuestState,
}

/// A software SEV firmware with its own platform identity.
pub struct EmulatedFirmware {
    identity: PlatformIdentity,
    guests: HashMap<u32, Guest>,
    next_handle: u32,
    iv_rng: rand::rngs::StdRng,
    ram: RegisteredRam,
    /// RECEIVE_UPDATE_DATA's plaintext before it goes into guest RAM, kept between packets.
    plaintext: Vec<u8>,
}

fn fail(command: Command, status: SevError) -> FirmwareError {
    FirmwareError::Status { command, status }
}

fn crypto_status(e: CryptoError) -> SevError {
    match e {
        CryptoError::BadMac => SevError::BadMeasurement,
        CryptoError::BadLength(_) => SevError::InvalidLen,
        CryptoError::BadFlags(_) => SevError::InvalidParam,
    }
}

/// The 32-bit policy word of the `sev` crate's `Policy` (flags, then minimum API major, minor).
fn policy_bits(policy: &sev::launch::sev::Policy) -> u32 {
    u32::from(policy.flags.bits())
        | (u32::from(policy.minfw.major) << 16)
        | (u32::from(policy.minfw.minor) << 24)
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes
}

fn fresh_keys() -> TransportKeys {
    TransportKeys {
        tek: random(),
        tik: random(),
    }
}

impl EmulatedFirmware {
    /// A firmware with the given platform identity and no guests.
    pub fn new(identity: PlatformIdentity) -> Self {
        Self {
            identity,
            guests: HashMap::new(),
            next_handle: 1,
            iv_rng: rand::SeedableRng::from_entropy(),
            plaintext: Vec::new(),
            ram: RegisteredRam::default(),
        }
    }

    /// The platform identity (for exporting the chain or its ARK as a trust root).
    pub fn identity(&self) -> &PlatformIdentity {
        &self.identity
    }

    fn guest(&mut self, command: Command, handle: Handle) -> Result<&mut Guest, FirmwareError> {
        self.guests
            .get_mut(&handle.0)
            .ok_or(fail(command, SevError::InvalidGuest))
    }

    fn add_guest(&mut self, guest: Guest) -> Handle {
        let handle = Handle(self.next_handle);
        self.next_handle += 1;
        self.guests.insert(handle.0, guest);
        handle
    }

    /// The rules every command on guest memory obeys, before any state is looked at.
    fn check_bytes(
        &self,
        command: Command,
        bytes: &GuestBytes<'_>,
        rule: fn(Command, u64, u64) -> Result<(), FirmwareError>,
    ) -> Result<(), FirmwareError> {
        let addr = self.ram.check(command, bytes)?;
        rule(command, addr, bytes.len() as u64)
    }

    fn check_policy(command: Command, policy: GuestPolicy) -> Result<(), FirmwareError> {
        let (major, minor) = policy.min_api();
        if !policy.is_valid() || (major, minor) > EMULATED_API {
            return Err(fail(command, SevError::PolicyFailure));
        }
        Ok(())
    }
}

impl Firmware for EmulatedFirmware {
    fn platform_status(&mut self) -> Result<PlatformStatus, FirmwareError> {
        Ok(PlatformStatus {
            api_major: EMULATED_API.0,
            api_minor: EMULATED_API.1,
            build: EMULATED_BUILD,
            state: if self.guests.is_empty() {
                "INIT"
            } else {
                "WORKING"
            },
            guests: self.guests.len() as u32,
            confidential: false,
        })
    }

    fn certificate_chain(&mut self) -> Result<sev::certs::sev::Chain, FirmwareError> {
        Ok(self.identity.export_chain())
    }

    fn register_ram(&mut self, ram: &GuestBytes<'_>) -> Result<(), FirmwareError> {
        let (start, len) = guest_memory::host_range(ram);
        self.ram.add(start, len)
    }

    fn launch_start(
        &mut self,
        policy: GuestPolicy,
        owner: Option<&sev::launch::sev::Start>,
    ) -> Result<Handle, FirmwareError> {
        const C: Command = Command::LaunchStart;
        Self::check_policy(C, policy)?;
        let keys = match owner {
            None => fresh_keys(),
            Some(start) => {
                if policy_bits(&start.policy) != policy.0 {
                    return Err(fail(C, SevError::InvalidParam));
                }
                let z = self
                    .identity
                    .shared_secret(&start.cert)
                    .map_err(|_| fail(C, SevError::InvalidCertificate))?;
                let s = &start.session;
                let mut blob = [0u8; crypto::SESSION_BYTES];
                blob[..16].copy_from_slice(&s.nonce);
                blob[16..48].copy_from_slice(&s.wrap_tk);
                blob[48..64].copy_from_slice(&s.wrap_iv);
                blob[64..96].copy_from_slice(&s.wrap_mac);
                blob[96..].copy_from_slice(&s.policy_mac);
                let wrapping = WrappingKeys::derive(&z, &s.nonce);
                crypto::unwrap_session(&wrapping, &blob, policy.0)
                    .map_err(|e| fail(C, crypto_status(e)))?
            }
        };
        Ok(self.add_guest(Guest {
            policy,
            keys,
            state: GuestState::Launching {
                digest: Sha256::new(),
                measured: None,
            },
        }))
    }

    fn launch_update_data(
        &mut self,
        guest: Handle,
        data: &GuestBytes<'_>,
    ) -> Result<(), FirmwareError> {
        const C: Command = Command::LaunchUpdateData;
        self.check_bytes(C, data, guest_memory::check_launch_data)?;
        match &mut self.guest(C, guest)?.state {
            GuestState::Launching {
                digest,
                measured: None,
            } => {
                let mut bytes = vec![0u8; data.len()];
                data.copy_to(&mut bytes);
                digest.update(&bytes);
                Ok(())
            }
            _ => Err(fail(C, SevError::InvalidGuestState)),
        }
    }

    fn launch_measure(&mut self, guest: Handle) -> Result<LaunchMeasurement, FirmwareError> {
        const C: Command = Command::LaunchMeasure;
        let g = self.guest(C, guest)?;
        let (policy, tik) = (g.policy, g.keys.tik);
        match &mut g.state {
            GuestState::Launching { digest, measured } => {
                if let Some(m) = measured {
                    return Ok(*m);
                }
                let digest: [u8; 32] = digest.clone().finalize().into();
                let mnonce = random();
                let measure = crypto::launch_measurement(
                    &tik,
                    EMULATED_API,
                    EMULATED_BUILD,
                    policy.0,
                    &digest,
                    &mnonce,
                );
                let m = LaunchMeasurement { measure, mnonce };
                *measured = Some(m);
                Ok(m)
            }
            _ => Err(fail(C, SevError::InvalidGuestState)),
        }
    }

    fn launch_secret(
        &mut self,
        guest: Handle,
        secret: &Packet,
        dest: &GuestBytes<'_>,
    ) -> Result<(), FirmwareError> {
        const C: Command = Command::LaunchSecret;
        self.check_bytes(C, dest, guest_memory::check_secret_dest)?;
        let g = self.guest(C, guest)?;
        let GuestState::Launching {
            measured: Some(m), ..
        } = &g.state
        else {
            return Err(fail(C, SevError::InvalidGuestState));
        };
        if dest.len() != secret.data.len() {
            return Err(fail(C, SevError::InvalidLen));
        }
        let mut plain = secret.data.clone();
        crypto::open_packet(
            &g.keys,
            PacketContext::Secret,
            &secret.header,
            &mut plain,
            &m.measure,
        )
        .map_err(|e| fail(C, crypto_status(e)))?;
        dest.copy_from(&plain);
        Ok(())
    }

    fn launch_finish(&mut self, guest: Handle) -> Result<(), FirmwareError> {
        const C: Command = Command::LaunchFinish;
        let g = self.guest(C, guest)?;
        match g.state {
            GuestState::Launching { .. } => {
                g.state = GuestState::Running;
                Ok(())
            }
            _ => Err(fail(C, SevError::InvalidGuestState)),
        }
    }

    fn send_start(
        &mut self,
        guest: Handle,
        target: &sev::certs::sev::Chain,
    ) -> Result<SendStart, FirmwareError> {
        const C: Command = Command::SendStart;
        let g = self
            .guests
            .get(&guest.0)
            .ok_or(fail(C, SevError::InvalidGuest))?;
        if !matches!(g.state, GuestState::Running) {
            return Err(fail(C, SevError::InvalidGuestState));
        }
        let policy = g.policy;
        if policy.has(GuestPolicy::NOSEND) {
            return Err(fail(C, SevError::PolicyFailure));
        }
        // The target's PDH must chain to its PEK and CEK (and, with the SEV policy bit, on to
        // the ASK and ARK); whether that ARK is trusted is the caller's decision.
        let target_pdh = if policy.has(GuestPolicy::SEV) {
            Verifiable::verify(target).map_err(|_| fail(C, SevError::InvalidCertificate))?
        } else {
            Verifiable::verify(&target.sev).map_err(|_| fail(C, SevError::InvalidCertificate))?
        };
        let z = self
            .identity
            .shared_secret(target_pdh)
            .map_err(|_| fail(C, SevError::InvalidCertificate))?;
        let keys = fresh_keys();
        let (nonce, iv) = (random(), random());
        let session = crypto::wrap_session(
            &WrappingKeys::derive(&z, &nonce),
            &nonce,
            &iv,
            &keys,
            policy.0,
        );
        let pdh = *self.identity.pdh();
        self.guest(C, guest)?.state = GuestState::Sending(keys);
        Ok(SendStart {
            policy,
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
        self.check_bytes(C, page, guest_memory::check_page_payload)?;
        // The hardware backend gives the firmware `out.data` as the transport buffer, of
        // exactly the page's length.
        if out.data.len() != page.len() {
            return Err(fail(C, SevError::InvalidLen));
        }
        let mut iv = [0u8; 16];
        // A userspace CSPRNG (seeded from the OS): a system call per packet would cost more
        // than its crypto.
        self.iv_rng.fill_bytes(&mut iv);
        let GuestState::Sending(keys) = &self.guest(C, guest)?.state else {
            return Err(fail(C, SevError::InvalidGuestState));
        };
        page.copy_to(out.data);
        *out.header = crypto::seal_packet(keys, PacketContext::Data, iv, out.data, &[])
            .map_err(|e| fail(C, crypto_status(e)))?;
        Ok(())
    }

    fn send_finish(&mut self, guest: Handle) -> Result<(), FirmwareError> {
        const C: Command = Command::SendFinish;
        let g = self.guest(C, guest)?;
        match g.state {
            GuestState::Sending(_) => {
                g.state = GuestState::Sent;
                Ok(())
            }
            _ => Err(fail(C, SevError::InvalidGuestState)),
        }
    }

    fn send_cancel(&mut self, guest: Handle) -> Result<(), FirmwareError> {
        const C: Command = Command::SendCancel;
        let g = self.guest(C, guest)?;
        match g.state {
            GuestState::Sending(_) => {
                g.state = GuestState::Running;
                Ok(())
            }
            _ => Err(fail(C, SevError::InvalidGuestState)),
        }
    }

    fn receive_start(&mut self, start: &SendStart) -> Result<Handle, FirmwareError> {
        const C: Command = Command::ReceiveStart;
        Self::check_policy(C, start.policy)?;
        let z = self
            .identity
            .shared_secret(&start.pdh)
            .map_err(|_| fail(C, SevError::InvalidCertificate))?;
        let nonce = crypto::session_nonce(&start.session);
        let keys = crypto::unwrap_session(
            &WrappingKeys::derive(&z, &nonce),
            &start.session,
            start.policy.0,
        )
        .map_err(|e| fail(C, crypto_status(e)))?;
        Ok(self.add_guest(Guest {
            policy: start.policy,
            keys,
            state: GuestState::Receiving,
        }))
    }

    fn receive_update_data(
        &mut self,
        guest: Handle,
        packet: PacketRef<'_>,
        dest: &GuestBytes<'_>,
    ) -> Result<(), FirmwareError> {
        const C: Command = Command::ReceiveUpdateData;
        self.check_bytes(C, dest, guest_memory::check_page_payload)?;
        let Self {
            guests, plaintext, ..
        } = self;
        let g = guests
            .get(&guest.0)
            .ok_or(fail(C, SevError::InvalidGuest))?;
        if !matches!(g.state, GuestState::Receiving) {
            return Err(fail(C, SevError::InvalidGuestState));
        }
        if dest.len() != packet.data.len() {
            return Err(fail(C, SevError::InvalidLen));
        }
        plaintext.resize(packet.data.len(), 0);
        crypto::open_packet_into(
            &g.keys,
            PacketContext::Data,
            packet.header,
            packet.data,
            plaintext,
            &[],
        )
        .map_err(|e| fail(C, crypto_status(e)))?;
        dest.copy_from(plaintext);
        Ok(())
    }

    fn receive_finish(&mut self, guest: Handle) -> Result<(), FirmwareError> {
        const C: Command = Command::ReceiveFinish;
        let g = self.guest(C, guest)?;
        match g.state {
            GuestState::Receiving => {
                g.state = GuestState::Running;
                Ok(())
            }
            _ => Err(fail(C, SevError::InvalidGuestState)),
        }
    }
}
