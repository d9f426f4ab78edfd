//! Launching a guest under SEV: the firmware measures exactly what was loaded, the owner checks
//! the measurement and may send a secret, then the guest runs.
//!
//! Measured, in this order (the order the loader wrote them, `BootImage::loaded`): the kernel
//! image, the command line, the initrd, then the boot structures (PVH start info, module list,
//! memory map or zero page, boot GDT). Each range is widened to 16-byte alignment, as
//! LAUNCH_UPDATE_DATA requires. The list is written with the measurement so an owner can
//! recompute the digest.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use veil_hypervisor::boot::LoadedKind;
use veil_hypervisor::cpuid::{Cpuid, Register};
use veil_hypervisor::paravirt::BlockReason;
use veil_hypervisor::GuestMemory;

use kvm_ioctls::VmFd;
use veil_hypervisor::vm::{SetupHookError, VmSetup};
use veil_hypervisor::GuestRam;
use veil_sev::emulated::firmware::EmulatedFirmware;
use veil_sev::emulated::identity::{IdentityError, PlatformIdentity};
use veil_sev::firmware::{Firmware, FirmwareError, GuestBytes, Handle, Packet};
use veil_sev::flow::{Launch, Measured};
use veil_sev::hardware::{
    sev_cpuid, HardwareFirmware, SevCpuid, CPUID_MEMORY_ENCRYPTION, SEV_DEVICE,
};
use veil_sev::policy::GuestPolicy;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// The C-bit and address reduction the emulated platform reports (those of current EPYC
/// parts). Nominal: the model encrypts nothing, so a guest setting the C-bit gains nothing.
const EMULATED_SEV_CPUID: SevCpuid = SevCpuid {
    c_bit: 51,
    phys_addr_reduction: 1,
};
/// LAUNCH_UPDATE_DATA's alignment for address and length (AMD 55766).
use veil_sev::guest_memory::FIRMWARE_ALIGN as LAUNCH_ALIGN;

/// Which firmware runs the SEV flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SevPlatform {
    /// The AMD Secure Processor through /dev/sev and KVM, with the chip's CEK as AMD signed
    /// it when given (the firmware exports it unsigned).
    Hardware { signed_cek: Option<PathBuf> },
    /// Veil's software model, with its identity kept in `state_dir`. No confidentiality.
    Emulated { state_dir: PathBuf },
}

/// How to launch an SEV guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SevConfig {
    pub platform: SevPlatform,
    pub policy: GuestPolicy,
    /// The guest owner's LAUNCH_START data: the 128-byte session blob and their DH certificate
    /// (SEV format), as files. Without them the firmware makes its own session.
    pub owner_session: Option<(PathBuf, PathBuf)>,
    /// Wait after measuring until this file holds the owner's secret (see [`SecretFile`]).
    pub secret: Option<PathBuf>,
    /// How long to wait for the secret before giving up on the launch.
    pub secret_timeout: Duration,
    /// Where to write the measurement (see [`MeasurementFile`]).
    pub measurement_out: Option<PathBuf>,
}

/// Errors launching under SEV.
#[derive(Debug, thiserror::Error)]
pub enum SevLaunchError {
    #[error(transparent)]
    Firmware(#[from] FirmwareError),
    #[error("Cannot use the emulated SEV platform's state in {}", dir.display())]
    Identity {
        dir: PathBuf,
        #[source]
        source: IdentityError,
    },
    #[error("SEV-ES and SEV-SNP guests are not supported (policy {0}): upstream KVM cannot migrate their encrypted register state")]
    EncryptedState(GuestPolicy),
    #[error("Cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a valid {what}", path.display())]
    Invalid { path: PathBuf, what: &'static str },
    #[error("Cannot write the measurement to {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The secret's destination {gpa:#x}+{len} is not guest RAM")]
    SecretOutsideRam { gpa: u64, len: usize },
    #[error("The loaded image at {gpa:#x}+{len} to be measured is not guest RAM")]
    MeasuredOutsideRam { gpa: u64, len: u64 },
    #[error("The {second} and the {first} share the 16-byte block at {gpa:#x}: LAUNCH_UPDATE_DATA would encrypt it twice")]
    MeasuredTwice {
        first: String,
        second: &'static str,
        gpa: u64,
    },
    #[error("No secret appeared in {} within {}", path.display(), humantime::format_duration(*waited))]
    SecretTimedOut { path: PathBuf, waited: Duration },
}

/// How long `veil run --sev --sev-secret` waits for the owner's secret unless told otherwise.
pub const DEFAULT_SECRET_TIMEOUT: Duration = Duration::from_secs(600);

/// `len` bytes of guest RAM at `gpa` as the firmware works on them, if they lie in one region.
fn guest_bytes(memory: &GuestMemory, gpa: u64, len: usize) -> Option<GuestBytes<'_>> {
    memory.get_slice(GuestAddress(gpa), len).ok()
}

/// What `--sev-measurement-out` holds: the measurement and everything needed to check it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeasurementFile {
    /// HMAC-SHA256 over the launch, hex.
    pub measurement: String,
    /// The firmware's nonce, hex.
    pub mnonce: String,
    pub api_major: u8,
    pub api_minor: u8,
    pub build: u8,
    pub policy: u32,
    /// Whether the platform really encrypts (false for the emulated one).
    pub confidential: bool,
    /// The measured ranges, in order.
    pub measured: Vec<MeasuredRange>,
}

/// One LAUNCH_UPDATE_DATA.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MeasuredRange {
    pub what: String,
    pub gpa: u64,
    pub len: u64,
}

/// What `--sev-secret` must hold: a LAUNCH_SECRET packet from the owner and where to put it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecretFile {
    /// Guest-physical address of the secret.
    pub gpa: u64,
    /// The 52-byte packet header, hex.
    pub header: String,
    /// The encrypted secret, hex.
    pub data: String,
}

/// The SEV part of building a VM: the firmware, opened as early as it can be.
pub struct SevSetup {
    platform: SevPlatform,
    firmware: Option<Box<dyn Firmware>>,
}

/// Checks the policy and opens the firmware, or (hardware) checks it can be opened once the VM
/// exists: a host without SEV fails here, before anything is built.
pub fn prepare(config: &SevConfig) -> Result<SevSetup, SevLaunchError> {
    if config.policy.has(GuestPolicy::ES) {
        return Err(SevLaunchError::EncryptedState(config.policy));
    }
    let firmware: Option<Box<dyn Firmware>> = match &config.platform {
        SevPlatform::Emulated { state_dir } => {
            let identity = PlatformIdentity::load_or_create(state_dir).map_err(|source| {
                SevLaunchError::Identity {
                    dir: state_dir.clone(),
                    source,
                }
            })?;
            tracing::warn!(
                "SEV runs on the emulated platform: the guest's memory is NOT encrypted and gets no confidentiality"
            );
            Some(Box::new(EmulatedFirmware::new(identity)))
        }
        SevPlatform::Hardware { .. } => {
            if !Path::new(SEV_DEVICE).exists() {
                return Err(FirmwareError::Unavailable {
                    reason: format!(
                        "{SEV_DEVICE} does not exist (is the ccp module loaded and SEV enabled in the BIOS?)"
                    ),
                }
                .into());
            }
            // Opened in `before_vcpus`: KVM_SEV_INIT needs the VM and must precede its vCPUs.
            None
        }
    };
    Ok(SevSetup {
        platform: config.platform.clone(),
        firmware,
    })
}

/// What the guest reads from SEV_STATUS when Veil must answer: on the emulated platform the
/// CPU knows nothing of the guest, and its memory is not encrypted, so bit 0 ("encryption
/// active") is honestly 0 and a guest that checks it, as Linux's `sme_enable` and the kit do,
/// keeps the C-bit out of its page tables. On hardware the CPU answers (1).
pub fn sev_status_msr(config: &SevConfig) -> Option<u64> {
    match config.platform {
        SevPlatform::Emulated { .. } => Some(0),
        SevPlatform::Hardware { .. } => None,
    }
}

/// Opens the firmware on its own, for `veil sev` commands (no VM).
pub fn open_platform(platform: &SevPlatform) -> Result<Box<dyn Firmware>, SevLaunchError> {
    match platform {
        SevPlatform::Emulated { .. } => Ok(prepare(&SevConfig {
            platform: platform.clone(),
            policy: GuestPolicy(0),
            owner_session: None,
            secret: None,
            secret_timeout: DEFAULT_SECRET_TIMEOUT,
            measurement_out: None,
        })?
        .firmware
        .expect("the emulated firmware opens without a VM")),
        SevPlatform::Hardware { signed_cek } => {
            prepare(&SevConfig {
                platform: platform.clone(),
                policy: GuestPolicy(0),
                owner_session: None,
                secret: None,
                secret_timeout: DEFAULT_SECRET_TIMEOUT,
                measurement_out: None,
            })?;
            // The backend speaks to the platform through a VM; a scratch one serves.
            let unavailable = |e: &dyn std::fmt::Display| FirmwareError::Unavailable {
                reason: format!("cannot create a VM to reach the SEV firmware: {e}"),
            };
            let kvm = veil_hypervisor::host::open_kvm().map_err(|e| unavailable(&e))?;
            let vm = kvm.create_vm().map_err(|e| unavailable(&e))?;
            Ok(Box::new(open_hardware(
                Arc::new(vm),
                signed_cek.as_deref(),
            )?))
        }
    }
}

impl SevSetup {
    /// The firmware, for receiving a migrating guest.
    pub fn firmware_mut(&mut self) -> Option<&mut dyn Firmware> {
        match &mut self.firmware {
            Some(firmware) => Some(firmware.as_mut()),
            None => None,
        }
    }

    /// The firmware context of a guest received with RECEIVE_*.
    pub fn received(self, handle: Handle) -> Result<SevLaunch, SevLaunchError> {
        let firmware = self.firmware.ok_or(FirmwareError::Unavailable {
            reason: "the SEV firmware was not opened while the VM was built".into(),
        })?;
        Ok(SevLaunch {
            firmware: std::sync::Mutex::new(firmware),
            handle,
            measurement: None,
        })
    }
}

impl VmSetup for SevSetup {
    fn customize_cpuid(&mut self, cpuid: &mut Cpuid) {
        let sev = match self.platform {
            SevPlatform::Emulated { .. } => EMULATED_SEV_CPUID,
            // A host without SEV fails before the guest runs; C-bit 0 is never used.
            SevPlatform::Hardware { .. } => sev_cpuid().unwrap_or(SevCpuid {
                c_bit: 0,
                phys_addr_reduction: 0,
            }),
        };
        let (eax, ebx) = sev.guest_leaf();
        // A host whose CPU tops out below this leaf (no SEV) would hide it from the guest.
        cpuid.reach_leaf(CPUID_MEMORY_ENCRYPTION);
        cpuid.set_register(CPUID_MEMORY_ENCRYPTION, 0, Register::Eax, eax);
        cpuid.set_register(CPUID_MEMORY_ENCRYPTION, 0, Register::Ebx, ebx);
    }

    fn before_vcpus(&mut self, vm: &Arc<VmFd>, ram: &GuestRam) -> Result<(), SetupHookError> {
        if let SevPlatform::Hardware { signed_cek } = &self.platform {
            self.firmware = Some(Box::new(open_hardware(
                Arc::clone(vm),
                signed_cek.as_deref(),
            )?));
        }
        let firmware = self
            .firmware
            .as_mut()
            .ok_or("the SEV firmware is not open")?;
        register_guest_ram(firmware.as_mut(), ram)?;
        Ok(())
    }
}

/// The hardware firmware on `vm`, completing its chain with the AMD-signed CEK in
/// `signed_cek` if given.
fn open_hardware(
    vm: Arc<VmFd>,
    signed_cek: Option<&Path>,
) -> Result<HardwareFirmware, FirmwareError> {
    let mut firmware = HardwareFirmware::open(vm)?;
    if let Some(path) = signed_cek {
        use sev::parser::Decoder;
        let unreadable = |e: &dyn std::fmt::Display| FirmwareError::Io {
            command: veil_sev::firmware::Command::PdhCertExport,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("cannot read the AMD-signed CEK {}: {e}", path.display()),
            ),
        };
        let bytes = fs::read(path).map_err(|e| unreadable(&e))?;
        let cek = sev::certs::sev::sev::Certificate::decode(&mut bytes.as_slice(), ())
            .map_err(|e| unreadable(&e))?;
        firmware.use_signed_cek(cek)?;
    }
    Ok(firmware)
}

/// Registers every region of `ram` with `firmware` as the guest's memory: every command on
/// guest memory names bytes of these regions, on either platform.
pub fn register_guest_ram(
    firmware: &mut dyn Firmware,
    ram: &GuestRam,
) -> Result<(), FirmwareError> {
    for region in ram.memory().iter() {
        let bytes = usize::try_from(region.len())
            .ok()
            .and_then(|len| guest_bytes(ram.memory(), region.start_addr().0, len))
            .ok_or(FirmwareError::Status {
                command: veil_sev::firmware::Command::RegisterRegion,
                status: veil_sev::firmware::SevError::InvalidAddress,
            })?;
        firmware.register_ram(&bytes)?;
    }
    Ok(())
}

/// A launched (or received) SEV guest: its firmware context and launch measurement.
pub struct SevLaunch {
    /// Locked by whoever drives the firmware next (migration's SEND_*).
    pub firmware: std::sync::Mutex<Box<dyn Firmware>>,
    pub handle: Handle,
    /// `None` for a guest that migrated in: it was measured where it was launched.
    pub measurement: Option<MeasurementFile>,
}

/// LAUNCH_START, LAUNCH_UPDATE_DATA over what was loaded, LAUNCH_MEASURE, the owner's secret,
/// LAUNCH_FINISH. The VM must not have run.
pub fn launch(
    config: &SevConfig,
    setup: SevSetup,
    memory: &GuestMemory,
    loaded: &[veil_hypervisor::boot::LoadedRange],
) -> Result<SevLaunch, SevLaunchError> {
    let mut firmware = setup.firmware.ok_or(FirmwareError::Unavailable {
        reason: "the SEV firmware was not opened while the VM was built".into(),
    })?;
    let owner = config
        .owner_session
        .as_ref()
        .map(|(session, cert)| read_owner_start(config.policy, session, cert))
        .transpose()?;
    let status = firmware.platform_status()?;
    let mut launch = Launch::start(firmware.as_mut(), config.policy, owner.as_ref())?;
    let measured = measured_ranges(loaded)?;
    for range in &measured {
        let data = usize::try_from(range.len)
            .ok()
            .and_then(|len| guest_bytes(memory, range.gpa, len))
            .ok_or(SevLaunchError::MeasuredOutsideRam {
                gpa: range.gpa,
                len: range.len,
            })?;
        launch.update_data(&data)?;
    }
    let mut launch = launch.measure()?;
    let m = launch.measurement();
    let measurement = MeasurementFile {
        measurement: hex::encode(m.measure),
        mnonce: hex::encode(m.mnonce),
        api_major: status.api_major,
        api_minor: status.api_minor,
        build: status.build,
        policy: config.policy.0,
        confidential: status.confidential,
        measured,
    };
    if let Some(path) = &config.measurement_out {
        write_atomically(
            path,
            &serde_json::to_vec_pretty(&measurement).unwrap_or_default(),
        )?;
    }
    eprintln!(
        "veil: SEV launch measurement {} mnonce {} (policy {})",
        measurement.measurement, measurement.mnonce, config.policy
    );
    if let Some(path) = &config.secret {
        inject_secret(&mut launch, memory, path, config.secret_timeout)?;
    }
    let handle = launch.finish()?;
    Ok(SevLaunch {
        firmware: std::sync::Mutex::new(firmware),
        handle,
        measurement: Some(measurement),
    })
}

/// Blocks the migration of a guest whose policy forbids sending it.
pub fn block_if_nosend(policy: GuestPolicy, paravirt: &veil_hypervisor::paravirt::Paravirt) {
    if policy.has(GuestPolicy::NOSEND) {
        paravirt.with_blockers(|b| b.block(BlockReason::SevPolicyNoSend, None));
    }
}

/// What LAUNCH_UPDATE_DATA covers for what the loader wrote: each range widened to whole
/// 16-byte blocks, in load order. Widened ranges must not share a block: the firmware encrypts
/// in place, so a block measured twice would be encrypted twice and read back as garbage by
/// the guest on hardware (the emulated platform, which encrypts nothing, would not show it).
pub fn measured_ranges(
    loaded: &[veil_hypervisor::boot::LoadedRange],
) -> Result<Vec<MeasuredRange>, SevLaunchError> {
    let mut measured: Vec<MeasuredRange> = Vec::with_capacity(loaded.len());
    for range in loaded {
        let outside = SevLaunchError::MeasuredOutsideRam {
            gpa: range.start.0,
            len: range.len,
        };
        let start = range.start.0 & !(LAUNCH_ALIGN - 1);
        let end = range
            .start
            .0
            .checked_add(range.len)
            .and_then(|end| end.checked_next_multiple_of(LAUNCH_ALIGN))
            .filter(|_| range.len > 0)
            .ok_or(outside)?;
        if let Some(other) = measured
            .iter()
            .find(|m| start < m.gpa + m.len && m.gpa < end)
        {
            return Err(SevLaunchError::MeasuredTwice {
                first: other.what.clone(),
                second: kind_name(range.kind),
                gpa: start.max(other.gpa),
            });
        }
        measured.push(MeasuredRange {
            what: kind_name(range.kind).into(),
            gpa: start,
            len: end - start,
        });
    }
    Ok(measured)
}

fn kind_name(kind: LoadedKind) -> &'static str {
    match kind {
        LoadedKind::Kernel => "kernel",
        LoadedKind::Initrd => "initrd",
        LoadedKind::Cmdline => "cmdline",
        LoadedKind::BootParams => "boot-params",
    }
}

fn read_owner_start(
    policy: GuestPolicy,
    session_path: &Path,
    cert_path: &Path,
) -> Result<sev::launch::sev::Start, SevLaunchError> {
    use sev::parser::Decoder;
    let read = |path: &Path| {
        fs::read(path).map_err(|source| SevLaunchError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let session = read(session_path)?;
    let session: [u8; 128] = session.try_into().map_err(|_| SevLaunchError::Invalid {
        path: session_path.to_owned(),
        what: "128-byte SEV session blob",
    })?;
    let cert = sev::certs::sev::sev::Certificate::decode(&mut read(cert_path)?.as_slice(), ())
        .map_err(|_| SevLaunchError::Invalid {
            path: cert_path.to_owned(),
            what: "SEV certificate",
        })?;
    let field = |range: std::ops::Range<usize>| session[range].to_vec();
    Ok(sev::launch::sev::Start {
        policy: owner_policy(policy),
        cert,
        session: sev::launch::sev::Session {
            nonce: field(0..16).try_into().unwrap_or_default(),
            wrap_tk: field(16..48).try_into().unwrap_or_default(),
            wrap_iv: field(48..64).try_into().unwrap_or_default(),
            wrap_mac: field(64..96).try_into().unwrap_or_default(),
            policy_mac: field(96..128).try_into().unwrap_or_default(),
        },
    })
}

/// The `sev` crate's policy struct for a policy word (its `From<u32>` misreads the version).
pub(crate) fn owner_policy(policy: GuestPolicy) -> sev::launch::sev::Policy {
    let (major, minor) = policy.min_api();
    sev::launch::sev::Policy {
        flags: sev::launch::sev::PolicyFlags::from_bits_truncate(policy.0 as u16),
        minfw: sev::firmware::host::Version { major, minor },
    }
}

fn inject_secret(
    launch: &mut Launch<'_, Measured>,
    memory: &GuestMemory,
    path: &Path,
    timeout: Duration,
) -> Result<(), SevLaunchError> {
    tracing::warn!(
        "waiting up to {} for the guest owner's secret in {}",
        humantime::format_duration(timeout),
        path.display()
    );
    // The owner writes the file once it has checked the measurement (atomically: write then
    // rename), so its existence means it is complete.
    let deadline = std::time::Instant::now() + timeout;
    while !path.exists() {
        if std::time::Instant::now() >= deadline {
            return Err(SevLaunchError::SecretTimedOut {
                path: path.to_owned(),
                waited: timeout,
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let invalid = || SevLaunchError::Invalid {
        path: path.to_owned(),
        what: "SEV secret file (JSON with gpa, header, data)",
    };
    let text = fs::read(path).map_err(|source| SevLaunchError::Read {
        path: path.to_owned(),
        source,
    })?;
    let file: SecretFile = serde_json::from_slice(&text).map_err(|_| invalid())?;
    let header: [u8; 52] = hex::decode(&file.header)
        .ok()
        .and_then(|h| h.try_into().ok())
        .ok_or_else(invalid)?;
    let data = hex::decode(&file.data).map_err(|_| invalid())?;
    let outside = SevLaunchError::SecretOutsideRam {
        gpa: file.gpa,
        len: data.len(),
    };
    let dest = guest_bytes(memory, file.gpa, data.len()).ok_or(outside)?;
    launch.inject_secret(&Packet { header, data }, &dest)?;
    Ok(())
}

fn write_atomically(path: &Path, contents: &[u8]) -> Result<(), SevLaunchError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, contents)
        .and_then(|()| fs::rename(&tmp, path))
        .map_err(|source| SevLaunchError::Write {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_hypervisor::boot::{LoadedKind, LoadedRange};
    use veil_hypervisor::layout::{BOOT_GDT_START, MEMMAP_START, PVH_INFO_START, ZERO_PAGE_START};

    fn range(kind: LoadedKind, start: u64, len: u64) -> LoadedRange {
        LoadedRange {
            kind,
            start: GuestAddress(start),
            len,
        }
    }

    /// Everything a PVH kernel reads before its own page tables (the kit, loaded as Veil
    /// loads it) is measured, in whole blocks, once.
    #[test]
    fn a_pvh_launch_measures_the_kernel_cmdline_start_info_memmap_and_gdt() {
        let ram = GuestRam::new(&veil_hypervisor::MemoryConfig {
            size: 32 << 20,
            file: None,
        })
        .unwrap();
        let image = veil_hypervisor::boot::load(
            ram.memory(),
            &veil_hypervisor::BootConfig {
                kernel: veil_guests::kit_elf_path().into(),
                initrd: None,
                cmdline: "greet".into(),
            },
        )
        .unwrap();
        let measured = measured_ranges(&image.loaded).unwrap();
        let covers = |gpa: u64, len: u64| {
            measured
                .iter()
                .any(|m| m.gpa <= gpa && gpa + len <= m.gpa + m.len)
        };
        assert!(
            covers(veil_hypervisor::layout::KERNEL_START, 4096),
            "kernel"
        );
        assert!(
            covers(veil_guest_abi::CMDLINE_START, 6),
            "cmdline with its NUL"
        );
        // hvm_start_info is 56 bytes; the memory map 24 bytes per entry; the GDT 5 entries.
        assert!(covers(PVH_INFO_START.0, 56), "hvm_start_info");
        assert!(covers(MEMMAP_START.0, 24), "memory map");
        assert!(covers(BOOT_GDT_START.0, 40), "boot GDT");
        assert!(measured.iter().all(|m| m.gpa % 16 == 0 && m.len % 16 == 0));
    }

    /// The Linux boot protocol's structures: the whole 4 KiB zero page (boot.rst: the kernel
    /// reads boot_params with paging off, all private), the command line and the GDT, apart.
    #[test]
    fn a_linux_launch_measures_the_whole_zero_page_apart_from_the_gdt() {
        let loaded = [
            range(LoadedKind::Kernel, 0x10_0000, 0x5_1234),
            range(LoadedKind::Cmdline, veil_guest_abi::CMDLINE_START, 13),
            range(LoadedKind::Initrd, 0x1f0_0000, 0x3_0001),
            range(LoadedKind::BootParams, BOOT_GDT_START.0, 40),
            range(LoadedKind::BootParams, ZERO_PAGE_START.0, 4096),
        ];
        let measured = measured_ranges(&loaded).unwrap();
        assert_eq!(measured[0].len, 0x5_1240, "the kernel's tail block");
        assert_eq!(measured[1].len, 16);
        assert_eq!(measured[2].len, 0x3_0010);
        assert_eq!((measured[3].gpa, measured[3].len), (BOOT_GDT_START.0, 48));
        assert_eq!(
            (measured[4].gpa, measured[4].len),
            (ZERO_PAGE_START.0, 4096)
        );
    }

    #[test]
    fn ranges_that_would_be_encrypted_twice_or_are_empty_are_refused() {
        let loaded = [
            range(LoadedKind::Cmdline, 0x2_0000, 13),
            range(LoadedKind::BootParams, 0x2_0008, 8),
        ];
        let err = measured_ranges(&loaded).unwrap_err();
        assert!(
            matches!(err, SevLaunchError::MeasuredTwice { gpa: 0x2_0000, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("encrypt it twice"));
        assert!(measured_ranges(&[range(LoadedKind::Initrd, 0x1000, 0)]).is_err());
        assert!(measured_ranges(&[range(LoadedKind::Initrd, u64::MAX - 4, 8)]).is_err());
    }
}
