//! What Veil asks of the SEV firmware, whichever backend provides it.
//!
//! The commands follow the AMD SEV API (publication 55766); firmware status codes arrive as
//! typed [`SevError`]s. Guest memory is passed as [`GuestBytes`], views of the VMM's mapping of
//! guest RAM that was first registered with [`Firmware::register_ram`]: the hardware backend
//! hands their addresses to KVM, which has the PSP work on those pages in place; the emulated
//! one reads and writes the same bytes. Neither accepts bytes outside registered RAM.

use serde::Serialize;
pub use sev::error::SevError;

pub use crate::guest_memory::GuestBytes;
use crate::policy::GuestPolicy;

/// The commands, for error messages (names as in the SEV API).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `KVM_MEMORY_ENCRYPT_REG_REGION`: not a firmware command, but refused like one.
    RegisterRegion,
    PlatformStatus,
    PdhCertExport,
    LaunchStart,
    LaunchUpdateData,
    LaunchMeasure,
    LaunchSecret,
    LaunchFinish,
    SendStart,
    SendUpdateData,
    SendFinish,
    SendCancel,
    ReceiveStart,
    ReceiveUpdateData,
    ReceiveFinish,
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Command::RegisterRegion => "KVM_MEMORY_ENCRYPT_REG_REGION",
            Command::PlatformStatus => "PLATFORM_STATUS",
            Command::PdhCertExport => "PDH_CERT_EXPORT",
            Command::LaunchStart => "LAUNCH_START",
            Command::LaunchUpdateData => "LAUNCH_UPDATE_DATA",
            Command::LaunchMeasure => "LAUNCH_MEASURE",
            Command::LaunchSecret => "LAUNCH_SECRET",
            Command::LaunchFinish => "LAUNCH_FINISH",
            Command::SendStart => "SEND_START",
            Command::SendUpdateData => "SEND_UPDATE_DATA",
            Command::SendFinish => "SEND_FINISH",
            Command::SendCancel => "SEND_CANCEL",
            Command::ReceiveStart => "RECEIVE_START",
            Command::ReceiveUpdateData => "RECEIVE_UPDATE_DATA",
            Command::ReceiveFinish => "RECEIVE_FINISH",
        };
        f.write_str(name)
    }
}

/// A firmware command failed.
#[derive(Debug, thiserror::Error)]
pub enum FirmwareError {
    /// The firmware answered with a status code.
    #[error("The SEV firmware refused {command}: {status}")]
    Status { command: Command, status: SevError },
    /// The platform cannot be used at all.
    #[error("This host has no SEV: {reason}; for testing use --sev-platform emulated")]
    Unavailable { reason: String },
    /// Talking to the firmware failed.
    #[error("SEV {command} failed")]
    Io {
        command: Command,
        #[source]
        source: std::io::Error,
    },
}

impl FirmwareError {
    /// The firmware's status code, when it gave one.
    pub fn status(&self) -> Option<SevError> {
        match self {
            FirmwareError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// Which firmware this is and what it protects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlatformStatus {
    pub api_major: u8,
    pub api_minor: u8,
    pub build: u8,
    /// UNINIT, INIT or WORKING.
    pub state: &'static str,
    pub guests: u32,
    /// `false` for the software model: it encrypts nothing.
    pub confidential: bool,
}

/// The firmware's handle for one guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Handle(pub u32);

/// LAUNCH_MEASURE's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaunchMeasurement {
    pub measure: [u8; 32],
    pub mnonce: [u8; 16],
}

/// A transport packet: the 52-byte header and the encrypted payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    pub header: [u8; crate::crypto::PACKET_HEADER_BYTES],
    pub data: Vec<u8>,
}

impl Packet {
    /// A packet of zeros with room for a `len`-byte payload, for SEND_UPDATE_DATA to fill.
    pub fn zeroed(len: usize) -> Self {
        Self {
            header: [0; crate::crypto::PACKET_HEADER_BYTES],
            data: vec![0; len],
        }
    }

    pub fn as_ref(&self) -> PacketRef<'_> {
        PacketRef {
            header: &self.header,
            data: &self.data,
        }
    }

    pub fn as_mut(&mut self) -> PacketMut<'_> {
        PacketMut {
            header: &mut self.header,
            data: &mut self.data,
        }
    }
}

/// A packet read where it lies (in a received frame, in a snapshot file), not copied out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketRef<'a> {
    pub header: &'a [u8; crate::crypto::PACKET_HEADER_BYTES],
    pub data: &'a [u8],
}

/// Where SEND_UPDATE_DATA writes its packet: the caller's buffers (a chunk being built), so
/// the packet is not copied again; `data` is as long as the page sent.
#[derive(Debug)]
pub struct PacketMut<'a> {
    pub header: &'a mut [u8; crate::crypto::PACKET_HEADER_BYTES],
    pub data: &'a mut [u8],
}

/// What SEND_START gives the target for RECEIVE_START.
#[derive(Debug, Clone)]
pub struct SendStart {
    pub policy: GuestPolicy,
    /// The source platform's PDH certificate.
    pub pdh: sev::certs::sev::sev::Certificate,
    /// The wrapped transport keys (`crypto::SESSION_BYTES`).
    pub session: [u8; crate::crypto::SESSION_BYTES],
}

/// The SEV firmware as Veil uses it.
pub trait Firmware: Send {
    /// API version, state and whether memory is really encrypted.
    fn platform_status(&mut self) -> Result<PlatformStatus, FirmwareError>;
    /// The platform's certificate chain (PDH, PEK, OCA, CEK, ASK, ARK).
    fn certificate_chain(&mut self) -> Result<sev::certs::sev::Chain, FirmwareError>;

    /// Registers guest RAM (one region of the VMM's mapping) as this VM's memory: on hardware
    /// KVM pins it (`KVM_MEMORY_ENCRYPT_REG_REGION`), as encrypted pages must not move. The
    /// commands below refuse guest bytes outside registered RAM (INVALID_ADDRESS). One firmware
    /// object serves one VM, so registered RAM is that VM's.
    fn register_ram(&mut self, ram: &GuestBytes<'_>) -> Result<(), FirmwareError>;

    /// Starts launching a guest, with the owner's session or (without one) fresh keys.
    fn launch_start(
        &mut self,
        policy: GuestPolicy,
        owner: Option<&sev::launch::sev::Start>,
    ) -> Result<Handle, FirmwareError>;
    /// Measures (and on hardware encrypts in place) one piece of the initial image, in guest
    /// RAM: whole 16-byte blocks at a 16-byte aligned address.
    fn launch_update_data(
        &mut self,
        guest: Handle,
        data: &GuestBytes<'_>,
    ) -> Result<(), FirmwareError>;
    /// The launch measurement, for the owner to verify.
    fn launch_measure(&mut self, guest: Handle) -> Result<LaunchMeasurement, FirmwareError>;
    /// Decrypts an owner's secret into guest memory (`dest`, the size of the payload, within
    /// one page).
    fn launch_secret(
        &mut self,
        guest: Handle,
        secret: &Packet,
        dest: &GuestBytes<'_>,
    ) -> Result<(), FirmwareError>;
    /// Ends the launch: the guest may run.
    fn launch_finish(&mut self, guest: Handle) -> Result<(), FirmwareError>;

    /// Starts sending a running guest to the platform whose chain is `target`.
    fn send_start(
        &mut self,
        guest: Handle,
        target: &sev::certs::sev::Chain,
    ) -> Result<SendStart, FirmwareError>;
    /// Encrypts one guest page (or whole blocks of one), read in place in guest RAM, for the
    /// target, into `out`, whose payload must be as long as `page` (else INVALID_LEN, with
    /// nothing done).
    fn send_update_data_into(
        &mut self,
        guest: Handle,
        page: &GuestBytes<'_>,
        out: PacketMut<'_>,
    ) -> Result<(), FirmwareError>;
    /// As [`send_update_data_into`](Self::send_update_data_into), into a new packet.
    fn send_update_data(
        &mut self,
        guest: Handle,
        page: &GuestBytes<'_>,
    ) -> Result<Packet, FirmwareError> {
        let mut packet = Packet::zeroed(page.len());
        self.send_update_data_into(guest, page, packet.as_mut())?;
        Ok(packet)
    }
    /// The guest has been sent.
    fn send_finish(&mut self, guest: Handle) -> Result<(), FirmwareError>;
    /// Abandons a send; the guest keeps running here.
    fn send_cancel(&mut self, guest: Handle) -> Result<(), FirmwareError>;

    /// Starts receiving a guest from the source that produced `start`.
    fn receive_start(&mut self, start: &SendStart) -> Result<Handle, FirmwareError>;
    /// Verifies and decrypts one packet into guest memory in place (`dest`, the payload's
    /// size, within one page); nothing is written when it does not verify.
    fn receive_update_data(
        &mut self,
        guest: Handle,
        packet: PacketRef<'_>,
        dest: &GuestBytes<'_>,
    ) -> Result<(), FirmwareError>;
    /// The guest has been received and may run.
    fn receive_finish(&mut self, guest: Handle) -> Result<(), FirmwareError>;
}
