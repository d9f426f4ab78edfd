//! Live migration as library calls: [`send`] a running [`Vm`] to a target, [`receive`] an
//! accepted guest into a new one. `veil ctl migrate` (through the API server) and
//! `veil receive` are these calls and argument parsing; embedders and tests call them too.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use veil_migration::{receiver, transport};
//! // The target: wait for a source, build the VM it describes, run the guest once it is ours.
//! let endpoint: transport::Endpoint = "unix:/tmp/veil-m.sock".parse()?;
//! let listener = transport::listen(&endpoint, &transport::Security::default())?;
//! let mut incoming = receiver::accept_from(
//!     &listener,
//!     receiver::HELLO_TIMEOUT,
//!     veil::check_incoming,
//!     None,
//! )?;
//! let vm = veil::migration::receive(&mut incoming, veil::VmBuilder::new(), None)?;
//! vm.resume();
//! # Ok(()) }
//! ```

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use veil_migration::duplex::Duplex;
use veil_migration::receiver::Incoming;
use veil_migration::sender::{self, SendError, SendOptions, SendReport, SevSource};
use veil_migration::transport::{self, Endpoint, Security};
use veil_seccomp::{Confinement, ThreadKind};

use crate::sev_launch::{SevConfig, SevPlatform, DEFAULT_SECRET_TIMEOUT};
use crate::{Error, Vm, VmBuilder};

/// Where and how to send a guest, as `veil ctl migrate` asks for it.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub to: Endpoint,
    pub security: Security,
    /// The longest the guest may be paused at the end; `None` keeps the sender's default.
    pub downtime: Option<Duration>,
    /// Give up (the guest stays here) after this long.
    pub timeout: Option<Duration>,
    /// Wait this long for a temporarily blocked guest instead of refusing at once.
    pub wait_ready: Option<Duration>,
    /// Connections to spread the pages over; `None`: [`default_connections`].
    pub connections: Option<usize>,
    /// For an SEV guest: a certificate chain file (as `veil sev export-chain` writes) whose
    /// ARK is trusted as a target root, besides AMD's.
    pub sev_trust_chain: Option<PathBuf>,
}

impl Outgoing {
    /// To `to`, protected by `security`, with the sender's defaults otherwise.
    pub fn new(to: Endpoint, security: Security) -> Self {
        Self {
            to,
            security,
            downtime: None,
            timeout: None,
            wait_ready: None,
            connections: None,
            sev_trust_chain: None,
        }
    }
}

/// What a completed [`send`] did.
#[derive(Debug, Clone)]
pub struct Sent {
    pub report: SendReport,
    /// How the connection was protected ("mutual TLS", "UNIX socket", ...).
    pub transport: &'static str,
}

/// Why [`send`] failed before or during the migration; the guest runs here.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Send(#[from] SendError),
    #[error("Cannot use the SEV trust chain")]
    TrustChain(#[from] crate::sev_chain::ChainFileError),
    #[error("Cannot load AMD's root keys")]
    AmdRoots(#[source] veil_sev::emulated::identity::IdentityError),
}

/// How many connections a migration uses unless told: one per core of this host, at most 4
/// (each stream's thread encrypts and copies on a core of its own; the target's too).
pub fn default_connections() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4))
}

/// Live-migrates `vm` to `outgoing.to`: connects once the guest may go, pre-copies and hands
/// it over. On success the guest runs on the target; on failure it runs here, as before.
/// Progress and cancel go through [`Vm::migration`].
pub fn send(vm: &Vm, outgoing: &Outgoing) -> Result<Sent, MigrateError> {
    let mut options = SendOptions {
        monitor: Arc::clone(vm.migration()),
        timeout: outgoing.timeout,
        wait_ready: outgoing.wait_ready,
        connections: outgoing.connections.unwrap_or_else(default_connections),
        ..SendOptions::default()
    };
    if let Some(downtime) = outgoing.downtime {
        options.downtime = downtime;
    }
    let mut arks = Vec::new();
    if vm.sev().is_some() {
        arks = veil_sev::emulated::identity::amd_arks().map_err(MigrateError::AmdRoots)?;
        if let Some(path) = &outgoing.sev_trust_chain {
            arks.push(crate::sev_chain::read_chain_file(path)?.ca.ark);
        }
    }
    // Connected only once the guest may go: the target drops a connection silent for long.
    let mut protection = "";
    let connect = || {
        let stream = transport::connect(&outgoing.to, &outgoing.security)?;
        protection = stream.protection();
        Ok::<_, transport::TransportError>(stream)
    };
    let mut locked = lock_sev(vm);
    let sev = locked.as_mut().map(|l| sev_source(l, arks));
    let report = sender::send_when_ready(vm.inner(), connect, &options, sev)?;
    Ok(Sent {
        report,
        transport: protection,
    })
}

/// As [`send`], over a stream already connected to a target (a socket pair, an embedder's
/// own transport). `trusted_arks` are the roots an SEV target's chain must end in.
pub fn send_over<S: Duplex + Send>(
    vm: &Vm,
    stream: &mut S,
    options: &SendOptions,
    trusted_arks: Vec<sev::certs::sev::ca::Certificate>,
) -> Result<SendReport, SendError> {
    let mut locked = lock_sev(vm);
    let sev = locked.as_mut().map(|l| sev_source(l, trusted_arks));
    sender::send(vm.inner(), stream, options, sev)
}

/// The guest's SEV firmware context, when it has one, locked for the whole migration.
fn lock_sev(vm: &Vm) -> Option<(&crate::SevGuest, FirmwareGuard<'_>)> {
    vm.sev().map(|guest| {
        let firmware = guest
            .launch
            .firmware
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        (guest, firmware)
    })
}

type FirmwareGuard<'a> = std::sync::MutexGuard<'a, Box<dyn veil_sev::firmware::Firmware>>;

/// What the sender needs of a locked SEV guest.
fn sev_source<'g>(
    (guest, firmware): &'g mut (&crate::SevGuest, FirmwareGuard<'_>),
    trusted_arks: Vec<sev::certs::sev::ca::Certificate>,
) -> SevSource<'g> {
    SevSource {
        firmware: firmware.as_mut(),
        guest: guest.launch.handle,
        policy: guest.config.policy,
        platform: match guest.config.platform {
            SevPlatform::Hardware { .. } => veil_migration::protocol::SevPlatform::Hardware,
            SevPlatform::Emulated { .. } => veil_migration::protocol::SevPlatform::Emulated,
        },
        trusted_arks,
    }
}

/// Takes over an accepted guest: builds the VM its source described (memory, vCPUs, CPUID,
/// SEV on `sev_platform` for an SEV guest) from `builder` (serial, disks, devices, memory
/// file), fills it, acknowledges and waits for the source's `Complete`. The VM comes back
/// paused and the guest is this host's: [`Vm::resume`] runs it. On failure the source is told
/// why and keeps the guest.
pub fn receive<S: Read + Write + Send + std::os::fd::AsFd>(
    incoming: &mut Incoming<S>,
    builder: VmBuilder,
    sev_platform: Option<SevPlatform>,
) -> Result<Vm, Error> {
    let shape = incoming.shape().clone();
    // Filled with small pages, huge ones asked for once the guest is here: every page is
    // written now, and a huge-page fault on a fragmented host stalls in compaction (7x slower
    // to fill 1 GiB here, docs/benchmarks.md).
    let huge_pages = builder.wants_huge_pages();
    let mut builder = builder
        .huge_pages(false)
        .memory_bytes(shape.ram_bytes())
        .vcpus(shape.vcpus())
        .guest_cpuid(shape.cpuid().iter().map(Into::into).collect());
    if let (Some(sev), Some(platform)) = (shape.sev(), sev_platform) {
        builder = builder.sev(SevConfig {
            platform,
            policy: sev.policy,
            owner_session: None,
            secret: None,
            secret_timeout: DEFAULT_SECRET_TIMEOUT,
            measurement_out: None,
        });
    }
    // The guest arrives on a thread of its own under the migration-receive filter (the VM's
    // other threads have theirs; this one still has the VM to build).
    let confinement = builder.compiled_confinement()?;
    let vm = builder.start_incoming(Box::new(|memory, firmware| {
        confined(&confinement, ThreadKind::MigrationReceive, || {
            Ok(incoming.receive_into(memory, firmware)?)
        })
    }));
    let vm = match vm {
        Ok(vm) => vm,
        Err(e) => {
            incoming.report(&e);
            return Err(e);
        }
    };
    confined(&confinement, ThreadKind::MigrationReceive, || {
        incoming.acknowledge()?;
        Ok(incoming.wait_complete()?)
    })
    .map_err(Error::Receive)?;
    if huge_pages {
        vm.inner().ram().advise_huge_pages();
    }
    Ok(vm)
}

/// Runs `work` on a thread of its own (named `migrate-recv`) under `kind`'s filter, and
/// waits for it.
fn confined<T: Send>(
    confinement: &Confinement,
    kind: ThreadKind,
    work: impl FnOnce() -> Result<T, Box<dyn std::error::Error + Send + Sync>> + Send,
) -> Result<T, Box<dyn std::error::Error + Send + Sync>> {
    std::thread::scope(|scope| {
        let thread = std::thread::Builder::new()
            .name("migrate-recv".into())
            .spawn_scoped(scope, || {
                confinement.apply(kind)?;
                work()
            })?;
        thread
            .join()
            .unwrap_or_else(|_| Err("the migration thread panicked".into()))
    })
}
