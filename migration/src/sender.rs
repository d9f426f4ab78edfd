//! The source side: pre-copy a running plain guest to a target over any byte stream.
//!
//! A first pass sends all RAM (zero pages as a few bytes each), then passes send what the
//! guest dirtied meanwhile, until what is left would take no longer than the downtime budget at
//! the rate measured so far (or the pass limit is hit). Then the guest is paused, the last
//! dirty pages and the state go out, and only once the target acknowledges is the guest stopped
//! here and `Complete` sent. Any failure before that resumes the guest here, as it was.

use std::io::Read;
use std::time::{Duration, Instant};

use std::sync::Arc;

use crate::duplex::{Duplex, Written};
use crate::holes;
use crate::monitor::{MigrationMonitor, Phase};
use crate::page_bits::PageBits;
use veil_hypervisor::memory::{DirtyBitmap, PAGE_SIZE};
use veil_hypervisor::paravirt::{Blocker, Migratability};
use veil_hypervisor::{RunState, RunningVm};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::protocol::MigrationId;
use crate::protocol::{
    read_frame, write_frame, ChunkEncoder, Features, Hello, MemoryRegion, Message, PageContentRef,
    PageRef, ProtocolError, SenderAction, SenderSession, SessionError, SevPlatform, SevShape,
    SevStart, State, VmShape, PROTOCOL_VERSION,
};
use crate::protocol::{stream_of, StreamToken, Streams};
use veil_sev::firmware::{Firmware, Handle};
use veil_sev::policy::GuestPolicy;

/// How to migrate.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// The longest the guest may be paused at the end (QEMU's and Cloud Hypervisor's default:
    /// 300 ms).
    pub downtime: Duration,
    /// Passes over dirty memory before stopping anyway.
    pub max_passes: u32,
    /// If the guest is temporarily unmigratable (it has not set `KVM_MIGRATION_READY`), wait
    /// this long for it before giving up; `None` refuses at once.
    pub wait_ready: Option<Duration>,
    /// Give up (the guest stays here) if the migration has not completed this long after it
    /// started; `None` lets pre-copy run until `max_passes`.
    pub timeout: Option<Duration>,
    /// Where progress is published and cancel requests come from.
    pub monitor: Arc<MigrationMonitor>,
    /// Connections to spread the pages over, each with its own TLS session, where the target
    /// takes more than one (feature `STREAMS`); an SEV guest, and [`send`] over a stream
    /// already connected, use one.
    pub connections: usize,
}

impl Default for SendOptions {
    fn default() -> Self {
        Self {
            downtime: Duration::from_millis(300),
            max_passes: 30,
            wait_ready: None,
            timeout: None,
            monitor: Arc::new(MigrationMonitor::new()),
            connections: 1,
        }
    }
}

/// An SEV guest's firmware context on the source, and whom it may be sent to.
pub struct SevSource<'f> {
    pub firmware: &'f mut dyn Firmware,
    pub guest: Handle,
    pub policy: GuestPolicy,
    pub platform: SevPlatform,
    /// The ARKs a target's certificate chain must end in: AMD's for hardware targets, the
    /// configured ones for emulated platforms.
    pub trusted_arks: Vec<sev::certs::sev::ca::Certificate>,
}

/// What a completed migration did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SendReport {
    /// Dirty-page passes after the first full one.
    pub passes: u32,
    /// Pages sent, including re-sent ones.
    pub pages_sent: u64,
    /// Pages that went as zero pages.
    pub zero_pages: u64,
    /// Pages sent more than once (dirtied after being sent).
    pub pages_resent: u64,
    /// Pages that went through the SEV firmware (private pages of an SEV guest).
    pub private_pages: u64,
    /// Pages that went in the clear (all of a plain guest's; an SEV guest's shared ones),
    /// zero pages included.
    pub clear_pages: u64,
    /// Bytes written to the streams.
    pub bytes: u64,
    /// Connections the pages went over (the control stream included).
    pub connections: usize,
    /// From the handshake to `Complete`.
    pub total: Duration,
    /// How long the guest was paused.
    pub downtime: Duration,
}

/// Why a migration failed; the guest is running here again unless said otherwise.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("The target refused the guest: {0}")]
    Refused(String),
    #[error("The target ended the migration: {0}")]
    Aborted(String),
    #[error("The target answered out of turn: {0}")]
    UnexpectedAnswer(String),
    #[error("An SEV guest needs its firmware context to be migrated")]
    Sev,
    #[error("The target's SEV platform is not trusted")]
    UntrustedTarget(#[source] veil_sev::emulated::identity::IdentityError),
    #[error("The target did not send its SEV certificate chain, or sent one that does not decode")]
    NoTargetChain,
    #[error("SEV firmware error")]
    Firmware(#[from] veil_sev::firmware::FirmwareError),
    #[error("Migration protocol error")]
    Protocol(#[from] ProtocolError),
    #[error("This VM cannot be described to a target")]
    Shape(#[from] crate::protocol::ShapeError),
    #[error("Cannot encode a memory chunk")]
    Chunk(#[from] crate::protocol::MessageError),
    #[error("Migration out of order")]
    Session(#[from] SessionError),
    #[error("Cannot read guest state")]
    Vm(#[from] veil_hypervisor::VmError),
    #[error("Cannot track dirty pages")]
    Memory(#[from] veil_hypervisor::memory::MemoryError),
    #[error("Cannot read guest memory")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("Cannot encode the guest state")]
    Encode(#[from] serde_json::Error),
    #[error("The guest stopped during migration")]
    GuestStopped,
    #[error("The guest cannot be migrated: it is permanently blocked: {0}")]
    PermanentlyBlocked(String),
    #[error("The guest is temporarily blocked since {since}: {reasons}")]
    TemporarilyBlocked { since: String, reasons: String },
    #[error("The guest became unmigratable during migration: {0}")]
    BlockedDuringMigration(String),
    #[error("The migration was cancelled")]
    Cancelled,
    #[error("The migration did not complete within {0:?}")]
    TimedOut(Duration),
    #[error("SEV-ES and SEV-SNP guests cannot be migrated: upstream KVM cannot send their encrypted register state (VMSA)")]
    SevEs,
    #[error("A migration of this guest is already under way")]
    AlreadyMigrating,
    #[error(
        "The last migration of this guest ({0}) is in doubt: run veil ctl migrate-recover first"
    )]
    StillInDoubt(MigrationId),
    #[error("Cannot reach the target")]
    Connect(#[from] crate::transport::TransportError),
    #[error("Cannot find the holes in the guest's memory file")]
    MemoryFile(#[source] std::io::Error),
    #[error("Cannot draw the token that ties the migration's connections together")]
    Token(#[source] std::io::Error),
    #[error("Cannot start a thread to send a stream's pages")]
    Thread(#[source] std::io::Error),
    #[error("A migration over a stream already connected cannot open another")]
    OneStream,
    #[error("The thread sending a stream's pages panicked")]
    StreamPanicked,
    #[error("Cannot hand the guest's devices over")]
    Devices(#[from] veil_hypervisor::devices::DeviceManagerError),
    #[error("Complete was sent but the target never confirmed that it runs the guest (migration {id}): the guest stays stopped here; `veil ctl migrate-recover` asks the target and resumes it here only if the target has discarded it")]
    InDoubt {
        id: MigrationId,
        #[source]
        cause: Box<SendError>,
    },
}

/// The target spoke while this side was sending: it does so only to end the migration, so
/// its message (read through the session, which then knows the migration is over) is the
/// error.
/// On a data stream (no session) the target speaks only to give its reason.
pub(crate) fn hear<S: Read>(stream: &mut S, session: Option<&mut SenderSession>) -> SendError {
    let frame = match read_frame(stream) {
        Ok(frame) => frame,
        Err(e) => return e.into(),
    };
    let Some(session) = session else {
        return match frame.message {
            Message::Error { reason } | Message::Cancel { reason } => SendError::Aborted(reason),
            other => SendError::UnexpectedAnswer(format!("{} on a data stream", other.kind())),
        };
    };
    match session.on_message(&frame.message) {
        Ok(SenderAction::Abort { reason, .. }) => SendError::Aborted(reason),
        Ok(other) => unexpected(other),
        Err(e) => e.into(),
    }
}

/// A target that fails mid-pass sends its reason and hangs up, so the source's next write
/// fails; the reason is still in the source's receive buffer. Returns it in place of the
/// write error when it is there.
pub(crate) fn target_reason<S: Read>(stream: &mut S, error: SendError) -> SendError {
    let hung_up = matches!(
        &error,
        SendError::Protocol(ProtocolError::Io(io))
            if matches!(io.kind(), std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset)
    );
    if !hung_up {
        return error;
    }
    match read_frame(stream).map(|frame| frame.message) {
        Ok(Message::Error { reason }) | Ok(Message::Cancel { reason }) => {
            SendError::Aborted(reason)
        }
        _ => error,
    }
}

impl SendError {
    /// Whether the stream itself failed, so nothing more can be said to the target.
    fn is_broken_stream(&self) -> bool {
        matches!(
            self,
            SendError::Protocol(
                ProtocolError::Io(_)
                    | ProtocolError::Closed
                    | ProtocolError::TruncatedHeader { .. }
                    | ProtocolError::TruncatedPayload { .. }
            )
        )
    }
}

/// How often to look again while waiting for a temporarily blocked guest.
const READY_POLL: Duration = Duration::from_millis(10);

/// `Ok` if the guest may be migrated now, or why not.
fn check_migratable(vm: &RunningVm) -> Result<(), SendError> {
    match vm.paravirt().migratability() {
        Migratability::Migratable => Ok(()),
        Migratability::PermanentlyBlocked { reasons } => {
            Err(SendError::PermanentlyBlocked(describe(&reasons)))
        }
        Migratability::TemporarilyBlocked { reasons } => Err(SendError::TemporarilyBlocked {
            since: reasons
                .iter()
                .map(|r| r.since)
                .min()
                .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                .unwrap_or_default(),
            reasons: describe(&reasons),
        }),
    }
}

fn describe(reasons: &[Blocker]) -> String {
    let parts: Vec<String> = reasons.iter().map(|r| r.reason.to_string()).collect();
    parts.join("; ")
}

/// Waits up to `wait` for a temporarily blocked guest; a permanent block ends the wait at once,
/// and so does a cancel.
fn wait_until_migratable(
    vm: &RunningVm,
    wait: Option<Duration>,
    monitor: &MigrationMonitor,
) -> Result<(), SendError> {
    let deadline = Instant::now() + wait.unwrap_or_default();
    loop {
        match check_migratable(vm) {
            Err(SendError::TemporarilyBlocked { .. }) if Instant::now() < deadline => {
                if monitor.cancelled() {
                    return Err(SendError::Cancelled);
                }
                monitor.update(|p| p.phase = Phase::WaitingForReady);
                std::thread::sleep(READY_POLL)
            }
            other => {
                monitor.update(|p| p.phase = Phase::Handshake);
                return other;
            }
        }
    }
}

/// The shape a target must match.
pub fn shape_of(vm: &RunningVm, sev: Option<SevShape>) -> Result<VmShape, SendError> {
    let memory = vm
        .ram()
        .slots()
        .map(|(_, base, len)| MemoryRegion { gpa: base.0, len })
        .collect();
    // The whole CPUID: the target gives the guest exactly this one, once it has checked that
    // its host has every feature in it.
    let cpuid = vm.cpuid().entries().iter().map(Into::into).collect();
    Ok(VmShape::new(memory, vm.vcpu_count() as u32, sev, cpuid)?.with_tsc_khz(vm.tsc_khz()))
}

struct Sender<'a, 's, S> {
    /// More connections to the target, for a migration over several.
    connect: &'s mut (dyn FnMut() -> Result<S, SendError> + 's),
    /// How many connections to ask for: 1 when `connect` gives no more.
    connections: usize,
    /// The data streams, once the target has taken them.
    data: Vec<crate::sender_streams::DataStream<S>>,
    vm: &'a RunningVm,
    /// The SEV context until SEND_START, then the send in progress (cancelled if dropped).
    sev_source: Option<SevSource<'a>>,
    sev_send: Option<veil_sev::flow::Sender<'a>>,
    monitor: &'a MigrationMonitor,
    stream: &'s mut S,
    session: SenderSession,
    encoder: ChunkEncoder,
    /// Shared with the data streams' threads.
    sent: Arc<PageBits>,
    report: SendReport,
    /// When to give up, from `SendOptions::timeout`.
    deadline: Option<(Instant, Duration)>,
    /// The disks were released for the target: take them back if the guest stays here.
    devices_handed_over: bool,
}

/// Migrates `vm` over `stream`. On success the guest has stopped here and runs on the target;
/// on failure it runs here as before (unless the failure came after `Complete` was sent).
/// `stream` is the only connection: the migration uses one whatever `options.connections`
/// says.
pub fn send<'f, S: Duplex + Send>(
    vm: &'f RunningVm,
    stream: &'f mut S,
    options: &'f SendOptions,
    sev: Option<SevSource<'f>>,
) -> Result<SendReport, SendError> {
    let mut stream = Some(stream);
    let mut connect = || stream.take().ok_or(SendError::OneStream);
    begin(vm, &mut connect, 1, options, sev)
}

/// As [`send`], but opens the stream with `connect` only once the guest may go (after
/// [`SendOptions::wait_ready`]): a target owes nothing to a connection that stays silent, and
/// drops it after its Hello timeout. Where the target takes them, `connect` opens the
/// further connections too, up to [`SendOptions::connections`].
pub fn send_when_ready<'f, S: Duplex + Send, E>(
    vm: &'f RunningVm,
    mut connect: impl FnMut() -> Result<S, E>,
    options: &'f SendOptions,
    sev: Option<SevSource<'f>>,
) -> Result<SendReport, SendError>
where
    SendError: From<E>,
{
    let mut connect = || connect().map_err(SendError::from);
    begin(vm, &mut connect, options.connections, options, sev)
}

fn begin<'f, S: Duplex + Send>(
    vm: &'f RunningVm,
    connect: &mut dyn FnMut() -> Result<S, SendError>,
    connections: usize,
    options: &'f SendOptions,
    sev: Option<SevSource<'f>>,
) -> Result<SendReport, SendError> {
    if vm.paravirt().page_states().is_some() != sev.is_some() {
        return Err(SendError::Sev);
    }
    if sev.as_ref().is_some_and(|s| s.policy.has(GuestPolicy::ES)) {
        return Err(SendError::SevEs);
    }
    if let Some(id) = options.monitor.in_doubt() {
        return Err(SendError::StillInDoubt(id));
    }
    if !options.monitor.begin() {
        return Err(SendError::AlreadyMigrating);
    }
    // Refuse before touching the target or the guest: nothing to undo.
    let result = wait_until_migratable(vm, options.wait_ready, &options.monitor).and_then(|()| {
        let mut stream = connect()?;
        send_claimed(vm, &mut stream, connect, connections, options, sev)
    });
    if let Err(e @ SendError::InDoubt { id, .. }) = &result {
        options.monitor.set_in_doubt(*id, crate::error_chain(e));
        return result;
    }
    options.monitor.update(|p| match &result {
        Ok(_) => p.phase = Phase::Completed,
        Err(e) => {
            p.phase = Phase::Failed;
            p.error = Some(crate::error_chain(e));
        }
    });
    result
}

fn send_claimed<'f, S: Duplex + Send>(
    vm: &'f RunningVm,
    stream: &mut S,
    connect: &mut dyn FnMut() -> Result<S, SendError>,
    connections: usize,
    options: &'f SendOptions,
    sev: Option<SevSource<'f>>,
) -> Result<SendReport, SendError> {
    let started = Instant::now();
    let mut sender = Sender {
        connect,
        connections,
        data: Vec::new(),
        vm,
        sev_source: sev,
        sev_send: None,
        monitor: &options.monitor,
        stream,
        session: SenderSession::new(),
        encoder: ChunkEncoder::new(),
        // Which pages have gone at least once: one bit per page, so a migration's own memory
        // grows with the guest by 1/32768 of it (32 MiB for 1 TiB), not with a list of gfns.
        sent: Arc::new(PageBits::covering(vm.memory())),
        report: SendReport::default(),
        deadline: options.timeout.map(|t| (started + t, t)),
        devices_handed_over: false,
    };
    let result = sender.run(options, started);
    // Whatever happened, stop tracking; resume the guest unless it may now run elsewhere.
    let _ = vm.ram().set_dirty_logging(vm.fd(), false);
    match result {
        Ok(()) => {
            vm.hand_over();
            sender.report.total = started.elapsed();
            Ok(sender.report)
        }
        Err(e) => {
            if matches!(e, SendError::InDoubt { .. }) {
                // Stopped, disks handed over: nothing may touch the guest until recovery.
                return Err(e);
            }
            let e = target_reason(sender.stream, e);
            // A broken stream would only hold the guest paused for another peer timeout.
            if sender.session.ending().is_none() && !e.is_broken_stream() {
                let message = match e {
                    SendError::Cancelled => Message::cancel("cancelled by the operator"),
                    SendError::TimedOut(_) => Message::cancel(e.to_string()),
                    // The whole chain: "SEV firmware error" alone would leave the target
                    // guessing.
                    _ => Message::error(crate::error_chain(&e)),
                };
                // Best effort, and never stuck behind a target that stopped reading.
                let mut frame = Vec::new();
                if write_frame(&mut frame, &message).is_ok() {
                    let _ = sender.stream.write_or_hear(&frame);
                }
            }
            if sender.session.guest_may_resume_here() && vm.run_state() == RunState::Paused {
                if sender.devices_handed_over {
                    if let Some(devices) = vm.devices() {
                        // Another VMM may have opened a disk meanwhile: then the guest runs
                        // on, and its disk requests fail, rather than two writers sharing it.
                        if let Err(e) = devices.take_back() {
                            tracing::error!(
                                "cannot take the disks back after the failed migration: {}",
                                crate::error_chain(&e)
                            );
                        }
                    }
                }
                vm.resume();
            }
            Err(e)
        }
    }
}

impl<'a, S: Duplex + Send> Sender<'a, '_, S> {
    fn run(&mut self, options: &SendOptions, started: Instant) -> Result<(), SendError> {
        let sev_shape = self.sev_source.as_ref().map(|s| SevShape {
            policy: s.policy,
            platform: s.platform,
        });
        let hello = Message::Hello(Hello {
            protocol_version: PROTOCOL_VERSION,
            features: Features::ZERO_PAGES
                .union(Features::SYNC)
                .union(Features::RECOVERY)
                .union(Features::STREAMS),
            vm: shape_of(self.vm, sev_shape)?,
        });
        self.send(&hello)?;
        let frame = read_frame(self.stream)?;
        let chain = match &frame.message {
            Message::HelloReply(reply) => reply.sev_chain.clone(),
            _ => None,
        };
        match self.session.on_message(&frame.message)? {
            SenderAction::Accepted => {}
            SenderAction::Refused { reason } => return Err(SendError::Refused(reason)),
            SenderAction::Abort { reason, .. } => return Err(SendError::Aborted(reason)),
            other => return Err(unexpected(other)),
        }
        if self.session.features().contains(Features::STREAMS) {
            self.open_streams()?;
        }
        self.report.connections = 1 + self.data.len();
        if let Some(source) = self.sev_source.take() {
            self.start_sev(source, chain)?;
        }
        let (ram, fd) = (self.vm.ram(), self.vm.fd());
        ram.set_dirty_logging(fd, true)?;
        ram.take_dirty_pages(fd)?;
        let pages: u64 = ram.slots().map(|(_, _, len)| len / PAGE_SIZE).sum();
        self.phase(Phase::FirstPass, pages as usize);
        let mut pass_start = Instant::now();
        // Region by region, as ranges: nothing here grows with the guest. A memory file's
        // holes go as zero pages unread (an SEV guest's private pages always go encrypted).
        let skip_holes = self.session.features().contains(Features::ZERO_PAGES)
            && self.vm.paravirt().page_states().is_none();
        for region in self.vm.memory().iter() {
            let first = region.start_addr().0 / PAGE_SIZE;
            let pages = region.len() / PAGE_SIZE;
            let stretches = match region.file_offset() {
                Some(file) if skip_holes => {
                    holes::stretches(file.file(), file.start(), region.len())
                        .map_err(SendError::MemoryFile)?
                }
                _ => vec![holes::Stretch {
                    pages: 0..pages,
                    zero: false,
                }],
            };
            for stretch in stretches {
                let gfns = first + stretch.pages.start..first + stretch.pages.end;
                self.send_pages(gfns, stretch.zero)?;
            }
        }
        let mut rate = self.report.bytes as f64 / started.elapsed().as_secs_f64().max(1e-6);
        loop {
            // A guest that clears READY (reboot, kexec, suspend) or blocks itself for good
            // mid-way must not be moved: give up and let it run here.
            during_migration(self.vm)?;
            check_deadline(self.deadline)?;
            let dirty = self.dirty_pages()?;
            let count = dirty.iter().map(DirtyBitmap::count).sum::<u64>();
            // What the guest dirtied while the last pass was sent: if it outpaces the link,
            // more passes will not converge.
            let dirty_rate =
                (count * PAGE_SIZE) as f64 / pass_start.elapsed().as_secs_f64().max(1e-6);
            self.phase(Phase::DirtyPasses, count as usize);
            self.monitor.update(|p| {
                p.rate = rate;
                p.dirty_rate = dirty_rate;
            });
            // No rate yet (nothing measurable went): assume the worst, not a panic.
            let left = Duration::try_from_secs_f64(count as f64 * PAGE_SIZE as f64 / rate)
                .unwrap_or(Duration::MAX);
            if left <= options.downtime || self.report.passes >= options.max_passes {
                self.send_pages(dirty.iter().flat_map(DirtyBitmap::dirty_gfns), false)?;
                break;
            }
            pass_start = Instant::now();
            let bytes_before = self.report.bytes;
            self.send_pages(dirty.iter().flat_map(DirtyBitmap::dirty_gfns), false)?;
            self.report.passes += 1;
            let passes = self.report.passes;
            self.monitor.update(|p| p.passes = passes);
            let elapsed = pass_start.elapsed().as_secs_f64().max(1e-6);
            rate = (self.report.bytes - bytes_before) as f64 / elapsed;
        }
        // Let the target work through what is still queued for it before the guest stops,
        // so the downtime is only the last pages and the state.
        if self.session.features().contains(Features::SYNC) {
            self.mark_streams()?;
            self.send(&Message::Sync)?;
            match self.receive()? {
                SenderAction::Synced => {}
                other => return Err(unexpected(other)),
            }
        }
        let paused = Instant::now();
        // vCPUs and devices: once this returns no device has a request in flight, so the
        // dirty scan below is the last one, device writes included.
        if self.vm.pause() != RunState::Paused {
            return Err(SendError::GuestStopped);
        }
        let mut stage = Stages::new(paused);
        stage.done("pause the vCPUs and devices");
        if let Some(devices) = self.vm.devices() {
            // Disks flushed and unlocked: the target opens them when it restores the state.
            self.devices_handed_over = true;
            devices.hand_over()?;
            stage.done("hand the disks over");
        }
        // With every vCPU parked nothing can change it any more: the last word.
        during_migration(self.vm)?;
        check_deadline(self.deadline)?;
        let dirty = self.dirty_pages()?;
        stage.done("collect dirty pages");
        let count = dirty.iter().map(DirtyBitmap::count).sum::<u64>();
        self.phase(Phase::StopAndCopy, count as usize);
        self.send_pages(dirty.iter().flat_map(DirtyBitmap::dirty_gfns), false)?;
        stage.done("send the last dirty pages");
        let snapshot = self.vm.snapshot()?;
        let state = serde_json::to_vec(&snapshot)?;
        stage.done("save the state");
        let id = MigrationId::of_state(&state);
        self.mark_streams()?;
        self.send(&Message::State(State { bytes: state }))?;
        match self.receive()? {
            SenderAction::Commit => {}
            other => return Err(unexpected(other)),
        }
        stage.done("the target restores and acknowledges");
        // The target holds the guest: from here on it must never run here again.
        if let Some(send) = self.sev_send.take() {
            send.finish()?;
        }
        let sent = self.send(&Message::Complete);
        if self.session.in_doubt() {
            // Until the target says Running, it may run the guest or not: only a query can
            // tell which (crate::recovery).
            match sent.and_then(|()| self.receive()) {
                Ok(SenderAction::Running) => {}
                Ok(other) => return in_doubt(id, unexpected(other)),
                Err(cause) => return in_doubt(id, cause),
            }
        } else {
            sent?;
        }
        stage.done("commit");
        self.report.downtime = paused.elapsed();
        Ok(())
    }

    /// Declares the streams (one for an SEV guest, whose pages go through its firmware
    /// context one at a time) and opens the further ones.
    fn open_streams(&mut self) -> Result<(), SendError> {
        let wanted = if self.sev_source.is_some() {
            1
        } else {
            self.connections
                .clamp(1, crate::protocol::limits::MAX_STREAMS)
        };
        let token = StreamToken::random().map_err(SendError::Token)?;
        self.send(&Message::Streams(Streams {
            count: wanted as u16,
            token,
        }))?;
        for _ in 1..wanted {
            let stream = (self.connect)()?;
            self.data
                .push(crate::sender_streams::DataStream::join(stream, token)?);
        }
        Ok(())
    }

    /// Verifies the target's chain against the trusted roots, SEND_START, and sends the
    /// target what it needs for RECEIVE_START.
    fn start_sev(
        &mut self,
        source: SevSource<'a>,
        chain: Option<Vec<u8>>,
    ) -> Result<(), SendError> {
        use sev::parser::{Decoder, Encoder};
        let chain = chain
            .and_then(|bytes| sev::certs::sev::Chain::decode(&mut bytes.as_slice(), ()).ok())
            .ok_or(SendError::NoTargetChain)?;
        veil_sev::emulated::identity::verify_chain(&chain, &source.trusted_arks)
            .map_err(SendError::UntrustedTarget)?;
        let (send, start) = veil_sev::flow::Sender::start(source.firmware, source.guest, &chain)?;
        self.sev_send = Some(send);
        let mut pdh = Vec::new();
        start
            .pdh
            .encode(&mut pdh, ())
            .map_err(|_| SendError::NoTargetChain)?;
        self.send(&Message::SevStart(SevStart {
            policy: start.policy,
            pdh,
            session: start.session,
        }))
    }

    fn phase(&self, phase: Phase, pages_left: usize) {
        self.monitor.update(|p| {
            p.phase = phase;
            p.pages_left = pages_left as u64;
        });
    }

    fn send(&mut self, message: &Message) -> Result<(), SendError> {
        self.session.send(message)?;
        let mut frame = Vec::new();
        write_frame(&mut frame, message)?;
        match self
            .stream
            .write_or_hear(&frame)
            .map_err(ProtocolError::Io)?
        {
            Written::All => Ok(()),
            Written::PeerSpoke => Err(hear(self.stream, Some(&mut self.session))),
        }
    }

    fn receive(&mut self) -> Result<SenderAction, SendError> {
        let frame = read_frame(self.stream)?;
        match self.session.on_message(&frame.message)? {
            SenderAction::Abort { reason, .. } => Err(SendError::Aborted(reason)),
            action => Ok(action),
        }
    }

    /// What was dirtied since the last look: a bit per page, never a list of them.
    fn dirty_pages(&self) -> Result<Vec<DirtyBitmap>, SendError> {
        Ok(self.vm.ram().take_dirty_pages(self.vm.fd())?)
    }

    /// Sends `gfns`; `known_zero` when they are known to be zero without reading them (a
    /// memory file's holes). Over several streams each carries its share, on a thread of its
    /// own, while this one sends the control stream's.
    fn send_pages<I>(&mut self, gfns: I, known_zero: bool) -> Result<(), SendError>
    where
        I: Iterator<Item = u64> + Clone + Send,
    {
        let mut tally = Tally::default();
        let result = if self.data.is_empty() {
            self.send_share(gfns, known_zero, &mut tally)
        } else {
            self.send_spread(gfns, known_zero, &mut tally)
        };
        tally.add_to(&mut self.report);
        result
    }

    /// The control stream's share of the pages (all of them over one stream).
    fn send_share(
        &mut self,
        gfns: impl Iterator<Item = u64>,
        known_zero: bool,
        tally: &mut Tally,
    ) -> Result<(), SendError> {
        // Page states as they are when each page goes: a page that changes state afterwards is
        // dirty again and goes again under its new state.
        let states = self.vm.paravirt().page_states();
        let pages = Pages {
            memory: self.vm.memory(),
            states: states.as_ref(),
            zero_pages: self.session.features().contains(Features::ZERO_PAGES),
            sent: &self.sent,
        };
        let mut out = ChunkOut::new(
            &mut self.encoder,
            Some(&mut self.session),
            &mut *self.stream,
            pages.memory,
            self.monitor,
            self.deadline,
        );
        let result = push_pages(
            &mut out,
            gfns,
            known_zero,
            &pages,
            self.sev_send.as_mut(),
            tally,
        );
        tally.bytes += out.bytes;
        result
    }

    /// Pages dealt out by 2 MiB block over the control stream and the data streams.
    fn send_spread<I>(
        &mut self,
        gfns: I,
        known_zero: bool,
        tally: &mut Tally,
    ) -> Result<(), SendError>
    where
        I: Iterator<Item = u64> + Clone + Send,
    {
        let count = self.data.len() + 1;
        let mut data = std::mem::take(&mut self.data);
        let (vm, monitor, deadline) = (self.vm, self.monitor, self.deadline);
        let zero_pages = self.session.features().contains(Features::ZERO_PAGES);
        let sent = Arc::clone(&self.sent);
        let results = std::thread::scope(|scope| {
            let threads: Vec<_> = data
                .iter_mut()
                .enumerate()
                .map(|(at, stream)| {
                    let share = gfns
                        .clone()
                        .filter(move |&gfn| stream_of(gfn, count) == at + 1);
                    let sent = Arc::clone(&sent);
                    std::thread::Builder::new()
                        .name("migrate-stream".into())
                        .spawn_scoped(scope, move || {
                            let pages = Pages {
                                memory: vm.memory(),
                                states: None,
                                zero_pages,
                                sent: &sent,
                            };
                            let mut tally = Tally::default();
                            let result = stream
                                .send(share, known_zero, &pages, monitor, deadline, &mut tally);
                            (result, tally)
                        })
                })
                .collect();
            let own = gfns.clone().filter(|&gfn| stream_of(gfn, count) == 0);
            let own = self.send_share(own, known_zero, tally);
            let streams: Vec<_> = threads
                .into_iter()
                .map(|thread| match thread.map(|t| t.join()) {
                    Ok(Ok(done)) => done,
                    Ok(Err(_)) => (Err(SendError::StreamPanicked), Tally::default()),
                    Err(e) => (Err(SendError::Thread(e)), Tally::default()),
                })
                .collect();
            (own, streams)
        });
        self.data = data;
        let (own, streams) = results;
        let own_went = own.is_ok();
        let mut results = vec![own];
        for (result, share) in streams {
            share.add_to(&mut self.report);
            results.push(result);
        }
        match first_failure(results) {
            // A data stream found the target gone while the control stream's share went
            // out whole: a target that fails says why on the control stream, then hangs up
            // every stream, so its reason is there to read.
            Err(e) if own_went && e.is_broken_stream() => {
                Err(match hear(&mut *self.stream, Some(&mut self.session)) {
                    reason @ SendError::Aborted(_) => reason,
                    _ => e,
                })
            }
            other => other,
        }
    }

    /// Marks every data stream: all its pages before the control stream's next Sync or
    /// State have been sent.
    fn mark_streams(&mut self) -> Result<(), SendError> {
        for stream in &mut self.data {
            stream.mark()?;
        }
        Ok(())
    }
}

/// What a pass sent, added to the report once it is over.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub pages_sent: u64,
    pub zero_pages: u64,
    pub pages_resent: u64,
    pub private_pages: u64,
    pub clear_pages: u64,
    pub bytes: u64,
}

impl Tally {
    fn add_to(&self, report: &mut SendReport) {
        report.pages_sent += self.pages_sent;
        report.zero_pages += self.zero_pages;
        report.pages_resent += self.pages_resent;
        report.private_pages += self.private_pages;
        report.clear_pages += self.clear_pages;
        report.bytes += self.bytes;
    }
}

/// The first error of a spread pass: a stream's own failure before one that only followed
/// from the target ending the migration.
fn first_failure(results: Vec<Result<(), SendError>>) -> Result<(), SendError> {
    let mut errors: Vec<SendError> = results.into_iter().filter_map(Result::err).collect();
    match errors
        .iter()
        .position(|e| matches!(e, SendError::Aborted(_)))
    {
        Some(at) => Err(errors.swap_remove(at)),
        None => errors.into_iter().next().map_or(Ok(()), Err),
    }
}

/// What every stream's page loop reads from.
pub(crate) struct Pages<'p> {
    pub memory: &'p veil_hypervisor::GuestMemory,
    /// An SEV guest's page-state map: its private pages go through the firmware.
    pub states: Option<&'p veil_hypervisor::paravirt::PageStateMap>,
    pub zero_pages: bool,
    /// Which pages have gone at least once.
    pub sent: &'p PageBits,
}

/// Sends `gfns` on `out`: in the clear, or, for an SEV guest's private pages, through `sev`.
pub(crate) fn push_pages<S: Duplex>(
    out: &mut ChunkOut<'_, S>,
    gfns: impl Iterator<Item = u64>,
    known_zero: bool,
    pages: &Pages<'_>,
    mut sev: Option<&mut veil_sev::flow::Sender<'_>>,
    tally: &mut Tally,
) -> Result<(), SendError> {
    for gfn in gfns {
        let at = GuestAddress(gfn * PAGE_SIZE);
        if known_zero {
            out.push(PageRef {
                gfn,
                content: PageContentRef::Zero,
            })?;
            tally.zero_pages += 1;
            tally.clear_pages += 1;
        } else if pages.states.is_some_and(|map| map.is_private(gfn)) {
            // A private page's plaintext never reaches the stream, and the firmware
            // encrypts it where it lies: on hardware the PSP decrypts guest memory with
            // the guest's key and its physical address, so a copy would not do.
            let page = pages.memory.get_slice(at, PAGE_SIZE as usize)?;
            let send = sev.as_deref_mut().ok_or(SendError::Sev)?;
            out.push_encrypted(gfn, &page, send)?;
            tally.private_pages += 1;
        } else {
            if out.push_clear(gfn, pages.zero_pages)? {
                tally.zero_pages += 1;
            }
            tally.clear_pages += 1;
        }
        tally.pages_sent += 1;
        if pages.sent.set(gfn) {
            tally.pages_resent += 1;
        }
    }
    out.flush()
}

/// Where memory chunks go: the encoder, the session that checks them (none on a data
/// stream), the stream.
pub(crate) struct ChunkOut<'a, S> {
    encoder: &'a mut ChunkEncoder,
    session: Option<&'a mut SenderSession>,
    stream: &'a mut S,
    /// Where the plain pages' bodies are read from as the chunk goes out.
    memory: &'a veil_hypervisor::GuestMemory,
    /// Whether the stream sends bodies from guest memory itself (a plain socket), or the
    /// chunk holds them (TLS).
    from_guest: bool,
    /// The plain pages of the chunk being built, whose bodies follow its head.
    bodies: Vec<GuestAddress>,
    /// A page read to check it and hash it, small enough to stay in the cache.
    scratch: Box<[u8; PAGE_SIZE as usize]>,
    /// Bytes written.
    pub bytes: u64,
    monitor: &'a MigrationMonitor,
    /// Pages in the chunk being built, published to the monitor when it goes out.
    pending: u64,
    deadline: Option<(Instant, Duration)>,
}

impl<'a, S: Duplex> ChunkOut<'a, S> {
    pub(crate) fn new(
        encoder: &'a mut ChunkEncoder,
        session: Option<&'a mut SenderSession>,
        stream: &'a mut S,
        memory: &'a veil_hypervisor::GuestMemory,
        monitor: &'a MigrationMonitor,
        deadline: Option<(Instant, Duration)>,
    ) -> Self {
        Self {
            encoder,
            session,
            from_guest: stream.sends_from_guest_memory(),
            stream,
            memory,
            bodies: Vec::new(),
            scratch: Box::new([0; PAGE_SIZE as usize]),
            bytes: 0,
            monitor,
            pending: 0,
            deadline,
        }
    }

    /// A page in the clear; `true` if it went as a zero page. Over a plain socket the page
    /// is read once here, to check for zeros and to take its CRC, and its body goes out from
    /// guest memory with the chunk: if the guest writes it in between, it arrives damaged, and
    /// it is dirty again. A transport that must see the bytes anyway (TLS) gets them copied
    /// into the chunk once, hashed there.
    fn push_clear(&mut self, gfn: u64, zero_pages: bool) -> Result<bool, SendError> {
        let at = GuestAddress(gfn * PAGE_SIZE);
        if !self.from_guest {
            let memory = self.memory;
            let read = |dst: &mut [u8]| memory.read_slice(dst, at).map_err(SendError::from);
            return self.add_page(crate::protocol::chunk::PLAIN_PAGE_WIRE_BYTES, |encoder| {
                encoder.push_plain_filled(gfn, zero_pages, read)
            });
        }
        self.memory.read_slice(&mut self.scratch[..], at)?;
        if zero_pages && crate::protocol::chunk::is_zero(&self.scratch[..]) {
            self.push(PageRef {
                gfn,
                content: PageContentRef::Zero,
            })?;
            return Ok(true);
        }
        let crc = crate::protocol::chunk::body_crc(&self.scratch[..]);
        self.add_page(crate::protocol::chunk::PLAIN_PAGE_WIRE_BYTES, |encoder| {
            Ok(encoder.push_plain_elsewhere(gfn, crc)?.then_some(()))
        })?;
        self.bodies.push(at);
        Ok(false)
    }

    /// A private page, SEND_UPDATE_DATA writing its packet straight into the chunk.
    fn push_encrypted(
        &mut self,
        gfn: u64,
        page: &veil_sev::firmware::GuestBytes<'_>,
        send: &mut veil_sev::flow::Sender<'_>,
    ) -> Result<(), SendError> {
        let mut seal = |out: veil_sev::firmware::PacketMut<'_>| {
            send.update_data_into(page, out).map_err(SendError::from)
        };
        self.add_page(page.len(), |encoder| {
            encoder.push_encrypted_page(gfn, page.len(), &mut seal)
        })
    }

    /// Adds a page with `add`, sending the chunk first when it is full (`add` gives `None`);
    /// a page of `wire_len` bytes that an empty chunk cannot take is an error.
    fn add_page<T>(
        &mut self,
        wire_len: usize,
        mut add: impl FnMut(&mut ChunkEncoder) -> Result<Option<T>, SendError>,
    ) -> Result<T, SendError> {
        let added = match add(self.encoder)? {
            Some(added) => added,
            None => {
                self.flush()?;
                add(self.encoder)?.ok_or(SendError::Chunk(
                    crate::protocol::MessageError::TooMany {
                        what: "bytes in an empty chunk",
                        count: wire_len as u64,
                        limit: crate::protocol::limits::MAX_CHUNK_BYTES,
                    },
                ))?
            }
        };
        self.pending += 1;
        Ok(added)
    }

    fn push(&mut self, page: PageRef<'_>) -> Result<(), SendError> {
        if !self.encoder.push(page)? {
            self.flush()?;
            self.encoder.push(page)?;
        }
        self.pending += 1;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SendError> {
        if let Some(frame) = self.encoder.frame() {
            if let Some(session) = self.session.as_deref_mut() {
                session.send_memory_chunk(&frame.index()?)?;
            }
            debug_assert_eq!(frame.bodies_elsewhere, self.bodies.len());
            let written = if frame.bodies.is_empty() {
                self.stream
                    .write_pages_or_hear(frame.head, self.memory, &self.bodies)
            } else {
                self.stream.write_or_hear(frame.head).and_then(|w| match w {
                    Written::All => self.stream.write_or_hear(frame.bodies),
                    spoke => Ok(spoke),
                })
            }
            .map_err(ProtocolError::Io)?;
            if written == Written::PeerSpoke {
                return Err(hear(self.stream, self.session.as_deref_mut()));
            }
            let bytes = frame.len() as u64;
            self.bytes += bytes;
            // Once per chunk, not per page: the monitor's lock stays off the page loop.
            let pages = self.pending;
            self.monitor.update(|p| {
                p.bytes_sent += bytes;
                p.pages_sent += pages;
                p.pages_left = p.pages_left.saturating_sub(pages);
            });
            self.pending = 0;
        }
        self.encoder.clear();
        self.bodies.clear();
        // Between chunks: the earliest a cancel can take effect without a torn frame.
        if self.monitor.cancelled() {
            return Err(SendError::Cancelled);
        }
        check_deadline(self.deadline)
    }
}

/// Where the downtime goes, in the debug log.
struct Stages(Instant);

impl Stages {
    fn new(start: Instant) -> Self {
        Self(start)
    }

    fn done(&mut self, what: &str) {
        tracing::debug!(
            "stop-and-copy: {what}: {:.2} ms",
            self.0.elapsed().as_secs_f64() * 1e3
        );
        self.0 = Instant::now();
    }
}

fn check_deadline(deadline: Option<(Instant, Duration)>) -> Result<(), SendError> {
    match deadline {
        Some((at, timeout)) if Instant::now() >= at => Err(SendError::TimedOut(timeout)),
        _ => Ok(()),
    }
}

fn during_migration(vm: &RunningVm) -> Result<(), SendError> {
    check_migratable(vm).map_err(|e| SendError::BlockedDuringMigration(e.to_string()))
}

fn in_doubt(id: MigrationId, cause: SendError) -> Result<(), SendError> {
    Err(SendError::InDoubt {
        id,
        cause: Box::new(cause),
    })
}

fn unexpected(action: SenderAction) -> SendError {
    SendError::UnexpectedAnswer(format!("{action:?}"))
}
