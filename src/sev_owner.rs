//! The guest owner's side of an SEV launch, with the `sev` crate: the LAUNCH_START session for
//! `veil run --sev-owner-session/--sev-owner-cert`, the check of the launch measurement Veil
//! writes with `--sev-measurement-out`, and the secret for `--sev-secret`.
//!
//! The owner recomputes the digest from the image it meant to launch, never from guest RAM:
//! on hardware LAUNCH_UPDATE_DATA has encrypted that RAM in place, and a host that could show
//! the owner plaintext could show it anything. [`ExpectedImage::load`] runs Veil's own loader
//! into scratch memory of the guest's size, so it reproduces the bytes and the ranges the host
//! should have measured (the same kernel, initrd, command line and memory size give the same
//! boot structures). The ranges the host reports must be exactly these.
//!
//! `veil sev owner` and the end-to-end tests both play the owner through this module.

use std::path::PathBuf;

use sev::firmware::host::{Build, Version};
use sev::launch::sev::{HeaderFlags, Measurement};
use sev::parser::Encoder;
use sev::session::{Initialized, Session, Verified};
use veil_hypervisor::boot::BootConfig;
use veil_hypervisor::{GuestRam, MemoryConfig};
use veil_sev::emulated::identity::{verify_chain, IdentityError};
use veil_sev::policy::GuestPolicy;
use vm_memory::{Bytes, GuestAddress};

use crate::sev_launch::{measured_ranges, MeasuredRange, MeasurementFile, SecretFile};

/// Errors playing the guest owner.
#[derive(Debug, thiserror::Error)]
pub enum OwnerError {
    #[error("The platform's certificate chain does not end in a trusted root (AMD's, or one named with --trust-chain): a host can make up a chain, so no session is made with it")]
    UntrustedRoot,
    #[error("The platform's certificate chain is not valid")]
    Chain(#[source] IdentityError),
    #[error("Cannot start a launch session with this platform")]
    Session(#[source] SevCrateError),
    #[error("Cannot encode the owner's certificate")]
    Certificate(#[source] std::io::Error),
    #[error("Cannot load the expected image {} the way Veil would", kernel.display())]
    Load {
        kernel: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("The host measured {found} but the image to launch has {expected}")]
    RangesDiffer { found: String, expected: String },
    #[error("The measurement file's {0} is not valid hex of the right length")]
    BadField(&'static str),
    #[error("The launch measurement does not verify: the host did not launch this image with this session")]
    Mismatch(#[source] std::io::Error),
    #[error("Cannot package the secret")]
    Secret(#[source] SevCrateError),
    #[error("A secret must be 1 to 256 bytes in whole 16-byte blocks within one page, not {len} bytes at {gpa:#x}")]
    SecretShape { gpa: u64, len: usize },
}

/// An error of the `sev` crate's session code, whose error type is not a `std::error::Error`.
#[derive(Debug)]
pub struct SevCrateError(String);

impl SevCrateError {
    fn from(e: impl std::fmt::Debug) -> Self {
        Self(format!("{e:?}"))
    }
}

impl std::fmt::Display for SevCrateError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SevCrateError {}

/// The image the owner means to launch: every range the host should measure, with its bytes.
pub struct ExpectedImage {
    ranges: Vec<(MeasuredRange, Vec<u8>)>,
}

impl ExpectedImage {
    /// Loads `boot` into scratch RAM of `memory_bytes`, as `veil run --memory` would, and takes
    /// the ranges LAUNCH_UPDATE_DATA covers. `boot.cmdline` must be the guest's whole command
    /// line (with the `virtio_mmio.device=` entries Veil appends for disks and consoles).
    pub fn load(boot: &BootConfig, memory_bytes: u64) -> Result<Self, OwnerError> {
        let load_error = |source: Box<dyn std::error::Error + Send + Sync>| OwnerError::Load {
            kernel: boot.kernel.clone(),
            source,
        };
        let ram = GuestRam::new(&MemoryConfig {
            size: memory_bytes,
            file: None,
        })
        .map_err(|e| load_error(Box::new(e)))?;
        let image =
            veil_hypervisor::boot::load(ram.memory(), boot).map_err(|e| load_error(Box::new(e)))?;
        let measured = measured_ranges(&image.loaded).map_err(|e| load_error(Box::new(e)))?;
        let ranges = measured
            .into_iter()
            .map(|range| {
                let mut bytes = vec![0; range.len as usize];
                ram.memory()
                    .read_slice(&mut bytes, GuestAddress(range.gpa))
                    .map(|()| (range, bytes))
                    .map_err(|e| load_error(Box::new(e)))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { ranges })
    }

    /// The ranges, in measurement order.
    pub fn ranges(&self) -> impl Iterator<Item = &MeasuredRange> {
        self.ranges.iter().map(|(range, _)| range)
    }

    /// The ranges with the bytes the firmware should have measured in each.
    pub fn contents(&self) -> impl Iterator<Item = (&MeasuredRange, &[u8])> {
        self.ranges
            .iter()
            .map(|(range, bytes)| (range, bytes.as_slice()))
    }
}

/// A guest owner before the launch: their session with the platform.
pub struct Owner {
    session: Session<Initialized>,
    start: sev::launch::sev::Start,
}

impl Owner {
    /// A session for a guest with `policy` on the platform whose chain is `chain`, which must
    /// end in one of `trusted_arks` (AMD's, [`veil_sev::emulated::identity::amd_arks`], and any
    /// the owner vouches for) and verify from that ARK down to the PDH the session is made
    /// with. A chain that merely verifies proves nothing: a host can make up a whole one.
    pub fn new(
        policy: GuestPolicy,
        chain: sev::certs::sev::Chain,
        trusted_arks: &[sev::certs::sev::ca::Certificate],
    ) -> Result<Self, OwnerError> {
        verify_chain(&chain, trusted_arks).map_err(|e| match e {
            IdentityError::UntrustedRoot => OwnerError::UntrustedRoot,
            other => OwnerError::Chain(other),
        })?;
        let session = Session::try_from(crate::sev_launch::owner_policy(policy))
            .map_err(|e| OwnerError::Session(SevCrateError::from(e)))?;
        let start = session
            .start(chain)
            .map_err(|e| OwnerError::Session(SevCrateError::from(e)))?;
        Ok(Self { session, start })
    }

    /// The 128-byte session blob for `--sev-owner-session`:
    /// `nonce | wrap_tk | wrap_iv | wrap_mac | policy_mac`.
    pub fn session_blob(&self) -> Vec<u8> {
        let s = &self.start.session;
        [
            &s.nonce[..],
            &s.wrap_tk,
            &s.wrap_iv,
            &s.wrap_mac,
            &s.policy_mac,
        ]
        .concat()
    }

    /// The owner's DH certificate (SEV format) for `--sev-owner-cert`.
    pub fn certificate(&self) -> Result<Vec<u8>, OwnerError> {
        let mut cert = Vec::new();
        self.start
            .cert
            .encode(&mut cert, ())
            .map_err(OwnerError::Certificate)?;
        Ok(cert)
    }

    /// Checks the host's measurement: the ranges it measured are those of `image`, and the
    /// HMAC over their digest, the firmware version and the policy verifies with this
    /// session's TIK. Only then may a secret be sent.
    pub fn verify(
        self,
        measurement: &MeasurementFile,
        image: &ExpectedImage,
    ) -> Result<VerifiedLaunch, OwnerError> {
        let describe = |ranges: &mut dyn Iterator<Item = &MeasuredRange>| {
            ranges
                .map(|r| format!("{} {:#x}+{:#x}", r.what, r.gpa, r.len))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let (found, expected) = (
            describe(&mut measurement.measured.iter()),
            describe(&mut image.ranges()),
        );
        if found != expected {
            return Err(OwnerError::RangesDiffer { found, expected });
        }
        let mut measuring = self
            .session
            .measure()
            .map_err(|e| OwnerError::Session(SevCrateError::from(e)))?;
        for (_, bytes) in &image.ranges {
            measuring
                .update_data(bytes)
                .map_err(|e| OwnerError::Session(SevCrateError::from(e)))?;
        }
        let build = Build {
            version: Version {
                major: measurement.api_major,
                minor: measurement.api_minor,
            },
            build: measurement.build,
        };
        let measure =
            hex_array(&measurement.measurement).ok_or(OwnerError::BadField("measurement"))?;
        let mnonce = hex_array(&measurement.mnonce).ok_or(OwnerError::BadField("mnonce"))?;
        let verified = measuring
            .verify(build, Measurement { measure, mnonce })
            .map_err(OwnerError::Mismatch)?;
        Ok(VerifiedLaunch(verified))
    }
}

/// A launch whose measurement the owner accepted.
pub struct VerifiedLaunch(Session<Verified>);

impl VerifiedLaunch {
    /// `data` for LAUNCH_SECRET at guest-physical `gpa`, as `--sev-secret` reads it.
    pub fn secret(&self, gpa: u64, data: &[u8]) -> Result<SecretFile, OwnerError> {
        let len = data.len();
        if len == 0
            || len > 256
            || !len.is_multiple_of(16)
            || !gpa.is_multiple_of(16)
            || gpa % 4096 + len as u64 > 4096
        {
            return Err(OwnerError::SecretShape { gpa, len });
        }
        let packaged = self
            .0
            .secret(HeaderFlags::empty(), data)
            .map_err(|e| OwnerError::Secret(SevCrateError::from(e)))?;
        let header = [
            &packaged.header.flags.bits().to_le_bytes()[..],
            &packaged.header.iv,
            &packaged.header.mac,
        ]
        .concat();
        Ok(SecretFile {
            gpa,
            header: hex::encode(header),
            data: hex::encode(&packaged.ciphertext),
        })
    }
}

fn hex_array<const N: usize>(text: &str) -> Option<[u8; N]> {
    hex::decode(text).ok()?.try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_sev::emulated::identity::PlatformIdentity;

    fn kit(cmdline: &str) -> BootConfig {
        BootConfig {
            kernel: veil_guests::kit_elf_path().into(),
            initrd: None,
            cmdline: cmdline.into(),
        }
    }

    #[test]
    fn the_expected_image_is_what_the_loader_wrote_in_whole_blocks() {
        let image = ExpectedImage::load(&kit("greet"), 32 << 20).unwrap();
        let whats: Vec<&str> = image.ranges().map(|r| r.what.as_str()).collect();
        assert_eq!(whats[..2], ["kernel", "cmdline"]);
        assert!(whats[2..].iter().all(|w| *w == "boot-params"));
        for (range, bytes) in &image.ranges {
            assert_eq!(range.gpa % 16, 0);
            assert_eq!(range.len % 16, 0);
            assert_eq!(bytes.len() as u64, range.len);
        }
        let (_, cmdline) = &image.ranges[1];
        assert_eq!(&cmdline[..6], b"greet\0");
    }

    /// AMD's roots and the emulated platform's own, as an owner who vouches for it has them.
    fn trusted(identity: &PlatformIdentity) -> Vec<sev::certs::sev::ca::Certificate> {
        let mut arks = veil_sev::emulated::identity::amd_arks().unwrap();
        arks.push(*identity.ark());
        arks
    }

    #[test]
    fn no_session_is_made_with_a_platform_whose_root_nobody_vouches_for() {
        let identity = PlatformIdentity::generate().unwrap();
        let amd_only = veil_sev::emulated::identity::amd_arks().unwrap();
        let refused = Owner::new(GuestPolicy(1), identity.export_chain(), &amd_only);
        assert!(matches!(refused, Err(OwnerError::UntrustedRoot)));
        // Its own ARK trusted, a chain whose PDH another root signed still fails.
        let other = PlatformIdentity::generate().unwrap();
        let mut forged = identity.export_chain();
        forged.sev.pdh = other.export_chain().sev.pdh;
        let refused = Owner::new(GuestPolicy(1), forged, &trusted(&identity));
        assert!(matches!(refused, Err(OwnerError::Chain(_))));
        assert!(Owner::new(GuestPolicy(1), identity.export_chain(), &trusted(&identity)).is_ok());
    }

    #[test]
    fn a_host_that_measured_other_ranges_or_bytes_is_not_believed() {
        let identity = PlatformIdentity::generate().unwrap();
        let owner =
            Owner::new(GuestPolicy(1), identity.export_chain(), &trusted(&identity)).unwrap();
        assert_eq!(owner.session_blob().len(), 128);
        let image = ExpectedImage::load(&kit("greet"), 32 << 20).unwrap();
        let mut file = MeasurementFile {
            measurement: hex::encode([0u8; 32]),
            mnonce: hex::encode([0u8; 16]),
            api_major: 0,
            api_minor: 24,
            build: 0,
            policy: 1,
            confidential: false,
            measured: image.ranges().cloned().collect(),
        };
        file.measured.pop();
        assert!(matches!(
            Owner::new(GuestPolicy(1), identity.export_chain(), &trusted(&identity))
                .unwrap()
                .verify(&file, &image),
            Err(OwnerError::RangesDiffer { .. })
        ));
        file.measured = image.ranges().cloned().collect();
        assert!(matches!(
            owner.verify(&file, &image),
            Err(OwnerError::Mismatch(_))
        ));
    }
}
