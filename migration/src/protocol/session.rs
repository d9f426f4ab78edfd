//! The order of the exchange, for each side, as pure state machines (no I/O): feed them
//! every message read and every message about to be written, and they say what to do or why
//! the message is out of place.
//!
//! ```text
//!            Hello          HelloReply(accepted)        State           Ack          Complete
//!   [Hello] ───────▶ [Handshake] ──────────▶ [Transfer] ──────▶ [StateSent] ───▶ [Ready] ───────▶ [Completed]
//!                                                                                   │  Complete        ▲
//!                                                                                   │  (RECOVERY)      │ Running
//!                                                                                   └──────────▶ [Confirming]
//!                         │                  │  ▲  SevStart (SEV, once, policy as in Hello)
//!                         │ HelloReply       │  │  MemoryChunk (pages in RAM, none twice;
//!                         ▼ (refused)        └──┘   Encrypted only after SevStart)
//!                     [Refused]
//!
//!   Error or Cancel, from either side, ends any phase before [Ready]; in [Ready] only the
//!   source may still end it (the target promised to run the guest when Complete arrives).
//!   In [Confirming] only Running may come. Recover and Recovered never belong to a migration
//!   connection (they open one of their own, see `recovery`).
//!   A message out of place ends the session; this side then sends Error.
//! ```
//!
//! A refused incoming message ends the session as [`Ending::Violation`], after which this
//! side may send exactly one Error (or Cancel) carrying the reason. A refused outgoing
//! message is a bug on this side and changes nothing.

use super::chunk::{ChunkIndex, EntryRef, MemoryChunkRef, PageContentRef};
use super::messages::{Features, Hello, HelloReply, Message, MessageType, SevStart};
use super::shape::{ShapeError, VmShape};
use super::streams::Streams;
use super::PROTOCOL_VERSION;

/// A message that may not be sent or received now.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SessionError {
    #[error("{kind} out of order: {why}")]
    OutOfOrder {
        kind: MessageType,
        why: &'static str,
    },
    #[error("{kind} may not come from the {from}")]
    WrongSender { kind: MessageType, from: Side },
    #[error("The migration has completed: no {kind} may follow")]
    Completed { kind: MessageType },
    #[error("The session has ended: no {kind} may follow")]
    Ended { kind: MessageType },
    #[error("Protocol version {version} is not supported (this host speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { version: u16 },
    #[error("HelloReply is inconsistent: {0}")]
    BadReply(&'static str),
    #[error("SevStart for a guest without SEV")]
    SevStartForPlainGuest,
    #[error("Second SevStart")]
    RepeatedSevStart,
    #[error("SevStart policy {got:#x} differs from the policy {expected:#x} in Hello")]
    PolicyMismatch { got: u32, expected: u32 },
    #[error("Memory chunk does not fit the VM")]
    Chunk(#[source] ShapeError),
    #[error("Encrypted page for a guest without SEV")]
    EncryptedForPlainGuest,
    #[error("Encrypted page before SevStart")]
    EncryptedBeforeSevStart,
    #[error("Zero page although the zero-pages feature was not agreed")]
    ZeroPagesNotAgreed,
    #[error("State of an SEV guest before SevStart")]
    StateBeforeSevStart,
    #[error("Sync although the sync feature was not agreed")]
    SyncNotAgreed,
    #[error("Sync while another Sync is unanswered")]
    RepeatedSync,
    #[error("Synced without a Sync")]
    UnaskedSynced,
    #[error("{kind} belongs on a recovery connection of its own, not in a migration")]
    RecoveryInMigration { kind: MessageType },
    #[error("Join opens a further connection of a migration; it has no place in one")]
    JoinInMigration,
    #[error(
        "A migration over {count} streams: at least 1, at most {}",
        super::limits::MAX_STREAMS
    )]
    BadStreamCount { count: u16 },
    #[error("An SEV guest migrates over one stream (its pages go through the firmware one at a time), not {count}")]
    StreamsForSev { count: u16 },
    #[error("Encrypted page on a data stream: an SEV guest's pages travel on the control stream")]
    EncryptedOnDataStream,
    #[error("{kind} may not travel on a data stream")]
    OnDataStream { kind: MessageType },
}

/// An end of the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Target,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Target => "target",
        })
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Complete went from source to target: the guest runs on the target.
    Completed,
    /// The target refused the guest in its HelloReply.
    Refused { reason: String },
    /// One side sent Error (`cancelled: false`) or Cancel.
    Ended {
        by: Side,
        cancelled: bool,
        reason: String,
    },
    /// The peer broke the protocol; this side sends (or sent) Error with the reason.
    Violation { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Hello,
    Handshake,
    /// Accepted with `STREAMS`: the source declares its streams before anything else.
    Streams,
    Transfer,
    StateSent,
    Ready,
    /// Complete sent with `RECOVERY` agreed: the source waits for Running.
    Confirming,
    Over(Ending),
}

impl Phase {
    fn why(&self) -> &'static str {
        match self {
            Phase::Hello => "the migration starts with Hello",
            Phase::Handshake => "the target has not answered Hello",
            Phase::Streams => "the source has not declared its streams",
            Phase::Transfer => "memory is being transferred",
            Phase::StateSent => "the target has not acknowledged the state",
            Phase::Ready => "only Complete may follow the Ack",
            Phase::Confirming => "only Running may follow Complete",
            Phase::Over(_) => "the session is over",
        }
    }
}

/// What the handshake settled.
#[derive(Debug, Clone)]
struct Handshake {
    vm: VmShape,
    offered: Features,
    agreed: Features,
}

/// What a chunk holds that the order depends on.
#[derive(Debug, Clone, Copy, Default)]
struct ChunkFacts {
    zero: bool,
    encrypted: bool,
}

fn chunk_facts(
    vm: &VmShape,
    pages: impl Iterator<Item = (u64, ChunkPageKind)> + Clone,
) -> Result<ChunkFacts, ShapeError> {
    vm.check_gfns(pages.clone().map(|(gfn, _)| gfn))?;
    let mut facts = ChunkFacts::default();
    for (_, kind) in pages {
        match kind {
            ChunkPageKind::Zero => facts.zero = true,
            ChunkPageKind::Encrypted => facts.encrypted = true,
            ChunkPageKind::Plain => {}
        }
    }
    Ok(facts)
}

/// What the order needs to know of a page of a chunk.
#[derive(Clone, Copy)]
enum ChunkPageKind {
    Zero,
    Plain,
    Encrypted,
}

impl From<PageContentRef<'_>> for ChunkPageKind {
    fn from(content: PageContentRef<'_>) -> Self {
        match content {
            PageContentRef::Zero => ChunkPageKind::Zero,
            PageContentRef::Plain(_) => ChunkPageKind::Plain,
            PageContentRef::Encrypted { .. } => ChunkPageKind::Encrypted,
        }
    }
}

impl From<EntryRef<'_>> for ChunkPageKind {
    fn from(entry: EntryRef<'_>) -> Self {
        match entry {
            EntryRef::Zero => ChunkPageKind::Zero,
            EntryRef::Plain { .. } => ChunkPageKind::Plain,
            EntryRef::Encrypted { .. } => ChunkPageKind::Encrypted,
        }
    }
}

/// A message as the order sees it.
enum View<'a> {
    Hello(&'a Hello),
    HelloReply(&'a HelloReply),
    SevStart(&'a SevStart),
    Streams(&'a Streams),
    Join,
    Chunk(&'a dyn Fn(&VmShape) -> Result<ChunkFacts, ShapeError>),
    State,
    Ack,
    Complete,
    Sync,
    Synced,
    Running,
    /// Recover, Adopt or Recovered.
    Recovery(MessageType),
    End {
        cancelled: bool,
        reason: &'a str,
    },
}

impl View<'_> {
    fn kind(&self) -> MessageType {
        match self {
            View::Hello(_) => MessageType::Hello,
            View::HelloReply(_) => MessageType::HelloReply,
            View::SevStart(_) => MessageType::SevStart,
            View::Streams(_) => MessageType::Streams,
            View::Join => MessageType::Join,
            View::Chunk(_) => MessageType::MemoryChunk,
            View::State => MessageType::State,
            View::Ack => MessageType::Ack,
            View::Complete => MessageType::Complete,
            View::Sync => MessageType::Sync,
            View::Synced => MessageType::Synced,
            View::Running => MessageType::Running,
            View::Recovery(kind) => *kind,
            View::End {
                cancelled: false, ..
            } => MessageType::Error,
            View::End {
                cancelled: true, ..
            } => MessageType::Cancel,
        }
    }

    /// Who may send it; `None`: either side.
    fn sender(&self) -> Option<Side> {
        match self {
            View::Hello(_)
            | View::SevStart(_)
            | View::Streams(_)
            | View::Join
            | View::Chunk(_)
            | View::State
            | View::Complete
            | View::Sync => Some(Side::Source),
            View::HelloReply(_) | View::Ack | View::Synced | View::Running => Some(Side::Target),
            View::Recovery(MessageType::Recover | MessageType::Adopt) => Some(Side::Source),
            View::Recovery(_) => Some(Side::Target),
            View::End { .. } => None,
        }
    }
}

/// What a step did, for the side-specific actions.
enum Event {
    Hello,
    Accepted,
    Refused(String),
    SevStart,
    Streams(Streams),
    Memory,
    State,
    Ack,
    Complete,
    Sync,
    Synced,
    Running,
    End { cancelled: bool, reason: String },
}

impl Event {
    fn kind(&self) -> MessageType {
        match self {
            Event::Hello => MessageType::Hello,
            Event::Accepted | Event::Refused(_) => MessageType::HelloReply,
            Event::SevStart => MessageType::SevStart,
            Event::Streams(_) => MessageType::Streams,
            Event::Memory => MessageType::MemoryChunk,
            Event::State => MessageType::State,
            Event::Ack => MessageType::Ack,
            Event::Complete => MessageType::Complete,
            Event::Sync => MessageType::Sync,
            Event::Synced => MessageType::Synced,
            Event::Running => MessageType::Running,
            Event::End {
                cancelled: false, ..
            } => MessageType::Error,
            Event::End {
                cancelled: true, ..
            } => MessageType::Cancel,
        }
    }
}

/// The order both sides share.
#[derive(Debug, Clone)]
struct Order {
    phase: Phase,
    handshake: Option<Handshake>,
    sev_started: bool,
    /// A Sync is waiting for its Synced.
    sync_outstanding: bool,
    /// The peer broke the protocol and this side has not yet sent its Error.
    owes_error: bool,
}

impl Order {
    fn new() -> Self {
        Self {
            phase: Phase::Hello,
            handshake: None,
            sev_started: false,
            sync_outstanding: false,
            owes_error: false,
        }
    }

    fn step(&mut self, from: Side, local: Side, msg: View<'_>) -> Result<Event, SessionError> {
        let kind = msg.kind();
        if let Phase::Over(ending) = &self.phase {
            // After a violation this side still owes the peer its Error (or Cancel).
            if let (true, View::End { cancelled, reason }) =
                (self.owes_error && from == local, &msg)
            {
                self.owes_error = false;
                return Ok(Event::End {
                    cancelled: *cancelled,
                    reason: reason.to_string(),
                });
            }
            return Err(match ending {
                Ending::Completed => SessionError::Completed { kind },
                _ => SessionError::Ended { kind },
            });
        }
        if msg.sender().is_some_and(|s| s != from) {
            return Err(SessionError::WrongSender { kind, from });
        }
        let out_of_order = SessionError::OutOfOrder {
            kind,
            why: self.phase.why(),
        };
        let event = match (&self.phase, msg) {
            (_, View::Recovery(kind)) => return Err(SessionError::RecoveryInMigration { kind }),
            (_, View::Join) => return Err(SessionError::JoinInMigration),
            (Phase::Ready, View::End { .. }) if from == Side::Target => return Err(out_of_order),
            (Phase::Confirming, View::End { .. }) => return Err(out_of_order),
            (_, View::End { cancelled, reason }) => {
                self.phase = Phase::Over(Ending::Ended {
                    by: from,
                    cancelled,
                    reason: reason.to_owned(),
                });
                Event::End {
                    cancelled,
                    reason: reason.to_owned(),
                }
            }
            (Phase::Hello, View::Hello(hello)) => {
                if hello.protocol_version != PROTOCOL_VERSION {
                    return Err(SessionError::UnsupportedVersion {
                        version: hello.protocol_version,
                    });
                }
                self.handshake = Some(Handshake {
                    vm: hello.vm.clone(),
                    offered: hello.features,
                    agreed: Features::NONE,
                });
                self.phase = Phase::Handshake;
                Event::Hello
            }
            (Phase::Handshake, View::HelloReply(reply)) => {
                let handshake = self.handshake.as_mut().ok_or(out_of_order)?;
                let sev = handshake.vm.sev().is_some();
                if !reply.accepted {
                    if reply.sev_chain.is_some() {
                        return Err(SessionError::BadReply(
                            "a refusal carries a certificate chain",
                        ));
                    }
                    let reason = reply
                        .reason
                        .clone()
                        .ok_or(SessionError::BadReply("a refusal without a reason"))?;
                    self.phase = Phase::Over(Ending::Refused {
                        reason: reason.clone(),
                    });
                    return Ok(Event::Refused(reason));
                }
                if reply.reason.is_some() {
                    return Err(SessionError::BadReply("an acceptance with a reason"));
                }
                if !handshake
                    .offered
                    .intersection(Features::KNOWN)
                    .contains(reply.features)
                {
                    return Err(SessionError::BadReply("features the source did not offer"));
                }
                match (&reply.sev_chain, sev) {
                    (Some(chain), true) if !chain.is_empty() => {}
                    (_, true) => {
                        return Err(SessionError::BadReply(
                            "no certificate chain for an SEV guest",
                        ))
                    }
                    (Some(_), false) => {
                        return Err(SessionError::BadReply(
                            "a certificate chain for a guest without SEV",
                        ))
                    }
                    (None, false) => {}
                }
                handshake.agreed = reply.features;
                self.phase = if reply.features.contains(Features::STREAMS) {
                    Phase::Streams
                } else {
                    Phase::Transfer
                };
                Event::Accepted
            }
            (Phase::Streams, View::Streams(streams)) => {
                let handshake = self.handshake.as_ref().ok_or(out_of_order)?;
                Streams::check(streams.count, handshake.vm.sev().is_some())?;
                self.phase = Phase::Transfer;
                Event::Streams(*streams)
            }
            (Phase::Transfer, View::SevStart(start)) => {
                let handshake = self.handshake.as_ref().ok_or(out_of_order)?;
                let sev = handshake
                    .vm
                    .sev()
                    .ok_or(SessionError::SevStartForPlainGuest)?;
                if self.sev_started {
                    return Err(SessionError::RepeatedSevStart);
                }
                if start.policy != sev.policy {
                    return Err(SessionError::PolicyMismatch {
                        got: start.policy.0,
                        expected: sev.policy.0,
                    });
                }
                self.sev_started = true;
                Event::SevStart
            }
            (Phase::Transfer, View::Chunk(inspect)) => {
                let handshake = self.handshake.as_ref().ok_or(out_of_order)?;
                let facts = inspect(&handshake.vm).map_err(SessionError::Chunk)?;
                if facts.encrypted {
                    if handshake.vm.sev().is_none() {
                        return Err(SessionError::EncryptedForPlainGuest);
                    }
                    if !self.sev_started {
                        return Err(SessionError::EncryptedBeforeSevStart);
                    }
                }
                if facts.zero && !handshake.agreed.contains(Features::ZERO_PAGES) {
                    return Err(SessionError::ZeroPagesNotAgreed);
                }
                Event::Memory
            }
            (Phase::Transfer, View::Sync) => {
                let handshake = self.handshake.as_ref().ok_or(out_of_order)?;
                if !handshake.agreed.contains(Features::SYNC) {
                    return Err(SessionError::SyncNotAgreed);
                }
                if self.sync_outstanding {
                    return Err(SessionError::RepeatedSync);
                }
                self.sync_outstanding = true;
                Event::Sync
            }
            (Phase::Transfer, View::Synced) => {
                if !self.sync_outstanding {
                    return Err(SessionError::UnaskedSynced);
                }
                self.sync_outstanding = false;
                Event::Synced
            }
            (Phase::Transfer, View::State) => {
                let handshake = self.handshake.as_ref().ok_or(out_of_order)?;
                if handshake.vm.sev().is_some() && !self.sev_started {
                    return Err(SessionError::StateBeforeSevStart);
                }
                self.phase = Phase::StateSent;
                Event::State
            }
            (Phase::StateSent, View::Ack) => {
                self.phase = Phase::Ready;
                Event::Ack
            }
            (Phase::Ready, View::Complete) => {
                let confirmed = self
                    .handshake
                    .as_ref()
                    .is_some_and(|h| h.agreed.contains(Features::RECOVERY));
                self.phase = if confirmed {
                    Phase::Confirming
                } else {
                    Phase::Over(Ending::Completed)
                };
                Event::Complete
            }
            (Phase::Confirming, View::Running) => {
                self.phase = Phase::Over(Ending::Completed);
                Event::Running
            }
            _ => return Err(out_of_order),
        };
        Ok(event)
    }

    /// A message from the peer (`step` changes nothing when it refuses): a violation ends the session, and this side owes an Error.
    fn incoming(&mut self, local: Side, msg: View<'_>) -> Result<Event, SessionError> {
        let peer = match local {
            Side::Source => Side::Target,
            Side::Target => Side::Source,
        };
        let result = self.step(peer, local, msg);
        if let Err(e) = &result {
            if !matches!(self.phase, Phase::Over(_)) {
                self.phase = Phase::Over(Ending::Violation {
                    reason: e.to_string(),
                });
                self.owes_error = true;
            }
        }
        result
    }

    /// A message this side is about to send: refused without changing anything when it is
    /// out of place (a bug on this side, not the peer's).
    fn outgoing(&mut self, local: Side, msg: View<'_>) -> Result<Event, SessionError> {
        // `step` changes nothing when it refuses.
        self.step(local, local, msg)
    }

    fn ending(&self) -> Option<&Ending> {
        match &self.phase {
            Phase::Over(ending) => Some(ending),
            _ => None,
        }
    }
}

/// Runs `f` with the order's view of `m`.
fn with_view<T>(m: &Message, f: impl FnOnce(View<'_>) -> T) -> T {
    match m {
        Message::Hello(h) => f(View::Hello(h)),
        Message::HelloReply(r) => f(View::HelloReply(r)),
        Message::SevStart(s) => f(View::SevStart(s)),
        Message::Streams(s) => f(View::Streams(s)),
        Message::Join(_) => f(View::Join),
        Message::MemoryChunk(c) => f(View::Chunk(&|vm: &VmShape| {
            chunk_facts(
                vm,
                c.pages.iter().map(|p| (p.gfn, p.as_ref().content.into())),
            )
        })),
        Message::State(_) => f(View::State),
        Message::Complete => f(View::Complete),
        Message::Ack => f(View::Ack),
        Message::Sync => f(View::Sync),
        Message::Synced => f(View::Synced),
        Message::Running => f(View::Running),
        Message::Recover(_) | Message::Recovered(_) | Message::Adopt(_) => {
            f(View::Recovery(m.kind()))
        }
        Message::Error { reason } => f(View::End {
            cancelled: false,
            reason,
        }),
        Message::Cancel { reason } => f(View::End {
            cancelled: true,
            reason,
        }),
    }
}

fn with_chunk_view<T>(c: &ChunkIndex<'_>, f: impl FnOnce(View<'_>) -> T) -> T {
    f(View::Chunk(&|vm: &VmShape| {
        chunk_facts(vm, c.entries().map(|e| (e.gfn, e.entry.into())))
    }))
}

/// What the target does with a message it received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiverAction {
    /// Check the Hello against this host (versions, features, memory, CPUID, SEV), then send
    /// a HelloReply accepting or refusing with a reason. Nothing is applied yet.
    CheckHello,
    /// RECEIVE_START with the SevStart.
    StartSev,
    /// Take the source's further connections: each opens with Join and this token.
    JoinStreams(Streams),
    /// Write the chunk (checked against the VM): Zero and Plain pages directly, Encrypted
    /// ones through RECEIVE_UPDATE_DATA.
    WritePages,
    /// Apply the state and RECEIVE_FINISH, then send Ack (guest ready, paused) or Error.
    Finish,
    /// Everything before has been applied: send Synced.
    ReplySynced,
    /// The source has stopped the guest for good: run it.
    Run,
    /// The source ended the migration: discard everything received and print the reason.
    Discard { cancelled: bool, reason: String },
}

/// The target's side of one migration.
#[derive(Debug, Clone)]
pub struct ReceiverSession {
    order: Order,
}

impl Default for ReceiverSession {
    fn default() -> Self {
        Self::new()
    }
}

impl ReceiverSession {
    pub fn new() -> Self {
        Self {
            order: Order::new(),
        }
    }

    /// A message from the source. An error ends the session: send the peer
    /// `Message::error(error.to_string())` and discard everything.
    pub fn on_message(&mut self, m: &Message) -> Result<ReceiverAction, SessionError> {
        let event = with_view(m, |v| self.order.incoming(Side::Target, v))?;
        Self::action(event)
    }

    /// A memory chunk from the source, borrowed from the frame it was read into.
    pub fn on_memory_chunk(
        &mut self,
        chunk: &MemoryChunkRef<'_>,
    ) -> Result<ReceiverAction, SessionError> {
        let event = with_chunk_view(chunk.index(), |v| self.order.incoming(Side::Target, v))?;
        Self::action(event)
    }

    /// A message this side is about to send (HelloReply, Ack, Error, Cancel).
    pub fn send(&mut self, m: &Message) -> Result<(), SessionError> {
        with_view(m, |v| self.order.outgoing(Side::Target, v)).map(drop)
    }

    fn action(event: Event) -> Result<ReceiverAction, SessionError> {
        let event_kind = event.kind();
        Ok(match event {
            Event::Hello => ReceiverAction::CheckHello,
            Event::SevStart => ReceiverAction::StartSev,
            Event::Streams(streams) => ReceiverAction::JoinStreams(streams),
            Event::Memory => ReceiverAction::WritePages,
            Event::State => ReceiverAction::Finish,
            Event::Complete => ReceiverAction::Run,
            Event::Sync => ReceiverAction::ReplySynced,
            Event::End { cancelled, reason } => ReceiverAction::Discard { cancelled, reason },
            // Target messages: `step` refused them from the source already.
            Event::Accepted | Event::Refused(_) | Event::Ack | Event::Synced | Event::Running => {
                return Err(SessionError::WrongSender {
                    kind: event_kind,
                    from: Side::Source,
                })
            }
        })
    }

    /// The VM the source described, once Hello arrived.
    pub fn vm(&self) -> Option<&VmShape> {
        self.order.handshake.as_ref().map(|h| &h.vm)
    }

    /// The features both use (none before the HelloReply).
    pub fn features(&self) -> Features {
        self.order
            .handshake
            .as_ref()
            .map_or(Features::NONE, |h| h.agreed)
    }

    /// Whether received memory may be applied: the handshake was accepted and the session
    /// has not ended.
    pub fn may_apply(&self) -> bool {
        matches!(
            self.order.phase,
            Phase::Transfer | Phase::StateSent | Phase::Ready
        )
    }

    /// Whether the guest may run here: Complete arrived (with `RECOVERY`, this side then
    /// owes the source Running).
    pub fn may_run(&self) -> bool {
        matches!(
            self.order.phase,
            Phase::Confirming | Phase::Over(Ending::Completed)
        )
    }

    /// How the session ended, once it has.
    pub fn ending(&self) -> Option<&Ending> {
        self.order.ending()
    }
}

/// What the source does with a message it received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SenderAction {
    /// The target accepted: for an SEV guest verify the chain, SEND_START and send SevStart;
    /// then send memory.
    Accepted,
    /// The target refused the guest: it stays here; report the reason.
    Refused { reason: String },
    /// The target has applied everything sent before the Sync.
    Synced,
    /// The target holds the guest ready: stop it here for good (SEND_FINISH), then send
    /// Complete.
    Commit,
    /// The target runs the guest (feature `RECOVERY`): the migration is over.
    Running,
    /// The target ended the migration: SEND_CANCEL, resume the guest, report the reason.
    Abort { cancelled: bool, reason: String },
}

/// The source's side of one migration.
#[derive(Debug, Clone)]
pub struct SenderSession {
    order: Order,
    complete_sent: bool,
}

impl Default for SenderSession {
    fn default() -> Self {
        Self::new()
    }
}

impl SenderSession {
    pub fn new() -> Self {
        Self {
            order: Order::new(),
            complete_sent: false,
        }
    }

    /// A message from the target. An error ends the session: send the peer
    /// `Message::error(error.to_string())`, and resume the guest if
    /// [`guest_may_resume_here`](Self::guest_may_resume_here).
    pub fn on_message(&mut self, m: &Message) -> Result<SenderAction, SessionError> {
        let event = with_view(m, |v| self.order.incoming(Side::Source, v))?;
        Ok(match event {
            Event::Accepted => SenderAction::Accepted,
            Event::Refused(reason) => SenderAction::Refused { reason },
            Event::Ack => SenderAction::Commit,
            Event::Synced => SenderAction::Synced,
            Event::Running => SenderAction::Running,
            Event::End { cancelled, reason } => SenderAction::Abort { cancelled, reason },
            // Source messages: `step` refused them from the target already.
            other => {
                return Err(SessionError::WrongSender {
                    kind: other.kind(),
                    from: Side::Target,
                })
            }
        })
    }

    /// A message this side is about to send.
    pub fn send(&mut self, m: &Message) -> Result<(), SessionError> {
        with_view(m, |v| self.order.outgoing(Side::Source, v))?;
        self.complete_sent |= matches!(m, Message::Complete);
        Ok(())
    }

    /// A chunk this side is about to send, e.g. from a
    /// [`ChunkEncoder`](super::chunk::ChunkEncoder)'s frame ([`ChunkFrame::index`]).
    ///
    /// [`ChunkFrame::index`]: super::chunk::ChunkFrame::index
    pub fn send_memory_chunk(&mut self, chunk: &ChunkIndex<'_>) -> Result<(), SessionError> {
        with_chunk_view(chunk, |v| self.order.outgoing(Side::Source, v)).map(drop)
    }

    /// Whether this side is in doubt: Complete was sent with `RECOVERY` agreed and Running
    /// never came. The guest may be running on the target or not; only a Recover query can
    /// tell (see [`recovery`](super::recovery)).
    pub fn in_doubt(&self) -> bool {
        self.complete_sent && self.order.phase != Phase::Over(Ending::Completed)
    }

    /// Whether the guest may resume here after a failure. False once Complete has been
    /// sent (even if writing it failed): the target may be running the guest, and it must
    /// never run in two places.
    pub fn guest_may_resume_here(&self) -> bool {
        !self.complete_sent
    }

    /// The agreed features (none before the HelloReply).
    pub fn features(&self) -> Features {
        self.order
            .handshake
            .as_ref()
            .map_or(Features::NONE, |h| h.agreed)
    }

    /// How the session ended, once it has.
    pub fn ending(&self) -> Option<&Ending> {
        self.order.ending()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::chunk::tests::{encrypted, plain, zero};
    use crate::protocol::chunk::MemoryChunk;
    use crate::protocol::messages::tests::{hello, sev_start};
    use crate::protocol::messages::State;
    use crate::protocol::recovery::{MigrationId, RecoveryOutcome};
    use proptest::prelude::*;
    use veil_sev::policy::GuestPolicy;

    /// Both sides of one migration, passing messages in memory.
    struct Pair {
        source: SenderSession,
        target: ReceiverSession,
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Action {
        Source(SenderAction),
        Target(ReceiverAction),
    }

    impl Pair {
        fn new() -> Self {
            Self {
                source: SenderSession::new(),
                target: ReceiverSession::new(),
            }
        }

        /// The source sends `m`; the target takes it.
        fn send_to_target(&mut self, m: Message) -> Result<ReceiverAction, SessionError> {
            self.source.send(&m).expect("the source may send it");
            self.target.on_message(&m)
        }

        /// The target sends `m`; the source takes it.
        fn send_to_source(&mut self, m: Message) -> Result<SenderAction, SessionError> {
            self.target.send(&m).expect("the target may send it");
            self.source.on_message(&m)
        }
    }

    fn chunk(pages: Vec<crate::protocol::chunk::Page>) -> Message {
        Message::MemoryChunk(MemoryChunk { pages })
    }

    fn state() -> Message {
        Message::State(State {
            bytes: b"{}".to_vec(),
        })
    }

    fn chain() -> Option<Vec<u8>> {
        Some(vec![0xce; 6 * 2084])
    }

    #[test]
    fn sync_is_one_question_one_answer_and_only_when_agreed() {
        let accept = |features| {
            let mut pair = Pair::new();
            pair.send_to_target(Message::Hello(hello(false))).unwrap();
            pair.send_to_source(Message::HelloReply(HelloReply::accept(features, None)))
                .unwrap();
            pair
        };
        let mut pair = accept(Features::ZERO_PAGES.union(Features::SYNC));
        assert_eq!(
            pair.send_to_target(Message::Sync),
            Ok(ReceiverAction::ReplySynced)
        );
        // A second question before the answer is a violation on the target's side.
        assert_eq!(
            pair.target.on_message(&Message::Sync),
            Err(SessionError::RepeatedSync)
        );
        let mut pair = accept(Features::ZERO_PAGES.union(Features::SYNC));
        pair.send_to_target(Message::Sync).unwrap();
        assert_eq!(
            pair.send_to_source(Message::Synced),
            Ok(SenderAction::Synced)
        );
        // An answer nobody asked for.
        assert_eq!(
            pair.source.on_message(&Message::Synced),
            Err(SessionError::UnaskedSynced)
        );
        // Not agreed: the target does not take it.
        let mut pair = accept(Features::ZERO_PAGES);
        assert_eq!(
            pair.target.on_message(&Message::Sync),
            Err(SessionError::SyncNotAgreed)
        );
        // Only the source asks, only the target answers.
        let mut pair = accept(Features::SYNC);
        assert!(matches!(
            pair.source.on_message(&Message::Sync),
            Err(SessionError::WrongSender { .. })
        ));
    }

    /// The happy path as (message, from) steps, plain or SEV.
    fn happy_path(sev: bool) -> Vec<(Message, Side)> {
        let mut steps = vec![
            (Message::Hello(hello(sev)), Side::Source),
            (
                Message::HelloReply(HelloReply::accept(
                    Features::ZERO_PAGES,
                    if sev { chain() } else { None },
                )),
                Side::Target,
            ),
        ];
        if sev {
            steps.push((Message::SevStart(sev_start()), Side::Source));
            steps.push((
                chunk(vec![encrypted(0, 4096), plain(1, 1), zero(2)]),
                Side::Source,
            ));
        } else {
            steps.push((chunk(vec![zero(0), plain(1, 1)]), Side::Source));
        }
        steps.push((chunk(vec![plain(0, 2)]), Side::Source));
        steps.push((state(), Side::Source));
        steps.push((Message::Ack, Side::Target));
        steps.push((Message::Complete, Side::Source));
        steps
    }

    fn run(pair: &mut Pair, steps: &[(Message, Side)]) -> Vec<Action> {
        steps
            .iter()
            .map(|(m, from)| match from {
                Side::Source => Action::Target(pair.send_to_target(m.clone()).unwrap()),
                Side::Target => Action::Source(pair.send_to_source(m.clone()).unwrap()),
            })
            .collect()
    }

    #[test]
    fn happy_path_of_a_plain_guest() {
        let mut pair = Pair::new();
        assert!(!pair.target.may_apply());
        let actions = run(&mut pair, &happy_path(false));
        use Action::*;
        assert_eq!(
            actions,
            [
                Target(ReceiverAction::CheckHello),
                Source(SenderAction::Accepted),
                Target(ReceiverAction::WritePages),
                Target(ReceiverAction::WritePages),
                Target(ReceiverAction::Finish),
                Source(SenderAction::Commit),
                Target(ReceiverAction::Run),
            ]
        );
        assert!(pair.target.may_run());
        assert_eq!(pair.target.ending(), Some(&Ending::Completed));
        assert_eq!(pair.source.ending(), Some(&Ending::Completed));
        assert_eq!(pair.target.features(), Features::ZERO_PAGES);
        assert_eq!(pair.source.features(), Features::ZERO_PAGES);
        assert!(!pair.source.guest_may_resume_here());
    }

    #[test]
    fn happy_path_of_an_sev_guest() {
        let mut pair = Pair::new();
        let actions = run(&mut pair, &happy_path(true));
        use Action::*;
        assert_eq!(
            actions,
            [
                Target(ReceiverAction::CheckHello),
                Source(SenderAction::Accepted),
                Target(ReceiverAction::StartSev),
                Target(ReceiverAction::WritePages),
                Target(ReceiverAction::WritePages),
                Target(ReceiverAction::Finish),
                Source(SenderAction::Commit),
                Target(ReceiverAction::Run),
            ]
        );
        assert!(pair.target.vm().unwrap().sev().is_some());
        assert!(pair.target.may_run());
    }

    #[test]
    fn the_target_applies_nothing_before_accepting() {
        let mut pair = Pair::new();
        pair.send_to_target(Message::Hello(hello(false))).unwrap();
        assert!(!pair.target.may_apply(), "Hello alone applies nothing");
        pair.send_to_source(Message::HelloReply(HelloReply::accept(
            Features::ZERO_PAGES,
            None,
        )))
        .unwrap();
        assert!(pair.target.may_apply());
    }

    #[test]
    fn memory_before_hello_is_rejected() {
        let mut target = ReceiverSession::new();
        let err = target.on_message(&chunk(vec![zero(0)])).unwrap_err();
        assert_eq!(
            err,
            SessionError::OutOfOrder {
                kind: MessageType::MemoryChunk,
                why: "the migration starts with Hello"
            }
        );
        assert_eq!(
            err.to_string(),
            "MemoryChunk out of order: the migration starts with Hello"
        );
        assert!(matches!(target.ending(), Some(Ending::Violation { .. })));
        // The target owes the source one Error with the reason, and nothing else.
        target.send(&Message::error(err.to_string())).unwrap();
        assert!(target.send(&Message::error("again")).is_err());
        assert!(target.on_message(&Message::Hello(hello(false))).is_err());
    }

    #[test]
    fn memory_before_an_accepted_reply_is_rejected() {
        let mut pair = Pair::new();
        pair.send_to_target(Message::Hello(hello(false))).unwrap();
        let m = chunk(vec![zero(0)]);
        assert!(
            pair.source.send(&m).is_err(),
            "the source may not send it either"
        );
        assert!(matches!(
            pair.target.on_message(&m),
            Err(SessionError::OutOfOrder {
                why: "the target has not answered Hello",
                ..
            })
        ));

        // After a refusal nothing more flows, and the reason reaches the source.
        let mut pair = Pair::new();
        pair.send_to_target(Message::Hello(hello(false))).unwrap();
        let action = pair
            .send_to_source(Message::HelloReply(HelloReply::refuse(
                "CPUID leaf 7 lacks AVX2",
            )))
            .unwrap();
        assert_eq!(
            action,
            SenderAction::Refused {
                reason: "CPUID leaf 7 lacks AVX2".into()
            }
        );
        assert!(pair.source.send(&m).is_err());
        assert!(matches!(
            pair.target.on_message(&m),
            Err(SessionError::Ended { .. })
        ));
        assert!(!pair.target.may_apply());
        assert!(pair.source.guest_may_resume_here());
    }

    /// A pair past the handshake.
    fn accepted(sev: bool, features: Features) -> Pair {
        let mut pair = Pair::new();
        pair.send_to_target(Message::Hello(hello(sev))).unwrap();
        pair.send_to_source(Message::HelloReply(HelloReply::accept(
            features,
            if sev { chain() } else { None },
        )))
        .unwrap();
        pair
    }

    #[test]
    fn encrypted_pages_need_sev_and_a_sev_start_first() {
        let m = chunk(vec![plain(1, 1), encrypted(2, 16)]);
        let mut pair = accepted(true, Features::ZERO_PAGES);
        assert_eq!(
            pair.target.on_message(&m),
            Err(SessionError::EncryptedBeforeSevStart)
        );
        assert!(pair.source.send(&m).is_err());

        let mut pair = accepted(false, Features::ZERO_PAGES);
        assert_eq!(
            pair.target.on_message(&m),
            Err(SessionError::EncryptedForPlainGuest)
        );
        let mut pair = accepted(false, Features::ZERO_PAGES);
        assert_eq!(
            pair.target.on_message(&Message::SevStart(sev_start())),
            Err(SessionError::SevStartForPlainGuest)
        );
    }

    #[test]
    fn sev_start_comes_once_with_the_hellos_policy_and_before_state() {
        let mut pair = accepted(true, Features::ZERO_PAGES);
        assert_eq!(
            pair.target.on_message(&state()),
            Err(SessionError::StateBeforeSevStart)
        );
        let mut pair = accepted(true, Features::ZERO_PAGES);
        let mut other = sev_start();
        other.policy = GuestPolicy(GuestPolicy::NODBG | GuestPolicy::NOKS);
        assert!(matches!(
            pair.target.on_message(&Message::SevStart(other)),
            Err(SessionError::PolicyMismatch {
                got: 3,
                expected: 1
            })
        ));
        let mut pair = accepted(true, Features::ZERO_PAGES);
        pair.send_to_target(Message::SevStart(sev_start())).unwrap();
        assert!(pair.source.send(&Message::SevStart(sev_start())).is_err());
        assert_eq!(
            pair.target.on_message(&Message::SevStart(sev_start())),
            Err(SessionError::RepeatedSevStart)
        );
    }

    #[test]
    fn chunks_are_checked_against_the_vm_and_the_agreed_features() {
        let mut pair = accepted(false, Features::ZERO_PAGES);
        assert!(matches!(
            pair.target.on_message(&chunk(vec![plain(1 << 19, 0)])),
            Err(SessionError::Chunk(ShapeError::GfnOutsideRam { gfn })) if gfn == 1 << 19
        ));
        let mut pair = accepted(false, Features::ZERO_PAGES);
        assert!(matches!(
            pair.target.on_message(&chunk(vec![plain(3, 0), zero(3)])),
            Err(SessionError::Chunk(ShapeError::RepeatedGfn { gfn: 3 }))
        ));
        let mut pair = accepted(false, Features::NONE);
        assert_eq!(
            pair.target.on_message(&chunk(vec![zero(3)])),
            Err(SessionError::ZeroPagesNotAgreed)
        );
        let mut pair = accepted(false, Features::NONE);
        assert_eq!(
            pair.send_to_target(chunk(vec![plain(3, 0)])),
            Ok(ReceiverAction::WritePages)
        );
    }

    #[test]
    fn borrowed_chunks_follow_the_same_order() {
        let mut payload = Vec::new();
        Message::MemoryChunk(MemoryChunk {
            pages: vec![encrypted(4, 32), zero(5)],
        })
        .encode_payload(&mut payload)
        .unwrap();
        let borrowed = MemoryChunkRef::parse(&payload).unwrap();
        let mut pair = accepted(true, Features::ZERO_PAGES);
        assert!(pair.source.send_memory_chunk(borrowed.index()).is_err());
        assert_eq!(
            pair.clone_target().on_memory_chunk(&borrowed),
            Err(SessionError::EncryptedBeforeSevStart)
        );
        pair.send_to_target(Message::SevStart(sev_start())).unwrap();
        pair.source.send_memory_chunk(borrowed.index()).unwrap();
        assert_eq!(
            pair.target.on_memory_chunk(&borrowed),
            Ok(ReceiverAction::WritePages)
        );
    }

    impl Pair {
        fn clone_target(&self) -> ReceiverSession {
            self.target.clone()
        }
    }

    #[test]
    fn nothing_follows_complete() {
        let mut pair = Pair::new();
        run(&mut pair, &happy_path(false));
        for m in [
            chunk(vec![zero(0)]),
            Message::Complete,
            Message::error("late"),
            Message::cancel("late"),
        ] {
            assert_eq!(
                pair.target.on_message(&m),
                Err(SessionError::Completed { kind: m.kind() })
            );
            assert!(pair.source.send(&m).is_err());
        }
        assert!(pair.source.on_message(&Message::error("late")).is_err());
        assert!(pair.target.send(&Message::Ack).is_err());
        // A late error changes nothing: the guest now lives on the target only.
        assert!(pair.target.may_run());
        assert!(!pair.source.guest_may_resume_here());
    }

    #[test]
    fn error_or_cancel_at_any_point_ends_the_session_with_the_reason() {
        for sev in [false, true] {
            let steps = happy_path(sev);
            // Stop before each step (the last is Complete).
            for k in 0..steps.len() {
                for cancelled in [false, true] {
                    let end = |reason: &str| {
                        if cancelled {
                            Message::cancel(reason)
                        } else {
                            Message::error(reason)
                        }
                    };
                    // The source ends it.
                    let mut pair = Pair::new();
                    run(&mut pair, &steps[..k]);
                    let reason = format!("source gave up before step {k}");
                    assert_eq!(
                        pair.send_to_target(end(&reason)),
                        Ok(ReceiverAction::Discard {
                            cancelled,
                            reason: reason.clone()
                        })
                    );
                    let ending = Ending::Ended {
                        by: Side::Source,
                        cancelled,
                        reason,
                    };
                    assert_eq!(pair.target.ending(), Some(&ending));
                    assert_eq!(pair.source.ending(), Some(&ending));
                    assert!(pair.source.guest_may_resume_here());
                    assert!(!pair.target.may_apply() && !pair.target.may_run());
                    assert!(pair.target.on_message(&steps[k].0).is_err());

                    // The target ends it, except once it has acknowledged the state.
                    let mut pair = Pair::new();
                    run(&mut pair, &steps[..k]);
                    let reason = format!("target gave up before step {k}");
                    let ready = k == steps.len() - 1;
                    if ready {
                        assert!(pair.target.send(&end(&reason)).is_err());
                        assert!(matches!(
                            pair.source.on_message(&end(&reason)),
                            Err(SessionError::OutOfOrder {
                                why: "only Complete may follow the Ack",
                                ..
                            })
                        ));
                        // The source, not having sent Complete, may still resume.
                        assert!(pair.source.guest_may_resume_here());
                        continue;
                    }
                    assert_eq!(
                        pair.send_to_source(end(&reason)),
                        Ok(SenderAction::Abort {
                            cancelled,
                            reason: reason.clone()
                        })
                    );
                    assert_eq!(
                        pair.source.ending(),
                        Some(&Ending::Ended {
                            by: Side::Target,
                            cancelled,
                            reason
                        })
                    );
                    assert!(pair.source.guest_may_resume_here());
                    assert!(pair.source.send(&steps[k].0).is_err());
                }
            }
        }
    }

    #[test]
    fn with_recovery_complete_is_confirmed_by_running_and_nothing_else() {
        let mut steps = happy_path(false);
        steps[1].0 = Message::HelloReply(HelloReply::accept(
            Features::RECOVERY.union(Features::ZERO_PAGES),
            None,
        ));
        let mut pair = Pair::new();
        run(&mut pair, &steps);
        assert!(pair.target.may_run(), "Complete arrived: the guest may run");
        assert_eq!(pair.target.ending(), None, "the target owes Running");
        assert!(pair.source.in_doubt());
        assert!(!pair.source.guest_may_resume_here());
        // The target may not take it back with an Error, nor may the source.
        let mut late = pair.clone_target();
        assert!(late.send(&Message::error("no")).is_err());
        assert!(pair
            .source
            .clone()
            .on_message(&Message::error("no"))
            .is_err());
        assert_eq!(
            pair.send_to_source(Message::Running),
            Ok(SenderAction::Running)
        );
        assert!(!pair.source.in_doubt());
        assert_eq!(pair.source.ending(), Some(&Ending::Completed));
        assert_eq!(pair.target.ending(), Some(&Ending::Completed));
        assert!(pair.target.send(&Message::Running).is_err(), "once");

        // Without the feature Running is out of place.
        let mut pair = Pair::new();
        run(&mut pair, &happy_path(false));
        assert!(!pair.source.in_doubt());
        assert!(pair.target.send(&Message::Running).is_err());
    }

    #[test]
    fn recovery_messages_are_refused_in_a_migration_whatever_its_phase() {
        let steps = happy_path(false);
        for k in 0..=steps.len() {
            for m in [
                Message::Recover(MigrationId::of_state(b"x")),
                Message::Adopt(MigrationId::of_state(b"x")),
                Message::Recovered(RecoveryOutcome::Discarded),
            ] {
                let mut pair = Pair::new();
                run(&mut pair, &steps[..k]);
                assert!(pair.target.on_message(&m).is_err(), "{k}");
                assert!(!pair.target.may_run() || k == steps.len());
                assert!(pair.source.on_message(&m).is_err(), "{k}");
            }
        }
    }

    #[test]
    fn messages_from_the_wrong_side_are_rejected() {
        let mut target = ReceiverSession::new();
        assert_eq!(
            target.on_message(&Message::Ack),
            Err(SessionError::WrongSender {
                kind: MessageType::Ack,
                from: Side::Source
            })
        );
        let mut source = SenderSession::new();
        assert!(source.send(&Message::Ack).is_err());
        source.send(&Message::Hello(hello(false))).unwrap();
        assert!(matches!(
            source.on_message(&Message::Hello(hello(false))),
            Err(SessionError::WrongSender {
                from: Side::Target,
                ..
            })
        ));
        assert!(source.guest_may_resume_here());
    }

    #[test]
    fn inconsistent_replies_are_rejected() {
        let reply = |sev: bool, r: HelloReply| {
            let mut source = SenderSession::new();
            source.send(&Message::Hello(hello(sev))).unwrap();
            source.on_message(&Message::HelloReply(r))
        };
        let unoffered = Features::from_bits(1 << 63);
        assert!(matches!(
            reply(false, HelloReply::accept(unoffered, None)),
            Err(SessionError::BadReply(_))
        ));
        assert!(reply(true, HelloReply::accept(Features::NONE, None)).is_err());
        assert!(reply(true, HelloReply::accept(Features::NONE, Some(vec![]))).is_err());
        assert!(reply(false, HelloReply::accept(Features::NONE, chain())).is_err());
        let mut no_reason = HelloReply::refuse("x");
        no_reason.reason = None;
        assert!(reply(false, no_reason).is_err());
        let mut noted = HelloReply::accept(Features::NONE, None);
        noted.reason = Some("note".into());
        assert!(reply(false, noted).is_err());
        assert_eq!(
            reply(true, HelloReply::accept(Features::NONE, chain())),
            Ok(SenderAction::Accepted)
        );
        // The target's own session refuses to send such a reply.
        let mut target = ReceiverSession::new();
        target.on_message(&Message::Hello(hello(false))).unwrap();
        assert!(target
            .send(&Message::HelloReply(HelloReply::accept(unoffered, None)))
            .is_err());
        assert!(target
            .send(&Message::HelloReply(HelloReply::accept(
                Features::ZERO_PAGES,
                None
            )))
            .is_ok());
    }

    #[test]
    fn streams_are_declared_first_once_and_joins_never_belong_in_a_migration() {
        use crate::protocol::streams::{StreamToken, Streams};
        let streams = |count| {
            Message::Streams(Streams {
                count,
                token: StreamToken::from_bytes([1; StreamToken::BYTES]),
            })
        };
        // Agreed: nothing but the declaration comes first.
        let mut pair = accepted(false, Features::ZERO_PAGES.union(Features::STREAMS));
        let early = chunk(vec![plain(1, 0)]);
        assert!(
            pair.source.send(&early).is_err(),
            "the source refuses itself"
        );
        assert!(matches!(
            pair.target.clone().on_message(&early),
            Err(SessionError::OutOfOrder {
                kind: MessageType::MemoryChunk,
                ..
            })
        ));
        let action = pair.send_to_target(streams(4)).unwrap();
        assert!(matches!(action, ReceiverAction::JoinStreams(s) if s.count == 4));
        assert_eq!(
            pair.send_to_target(chunk(vec![plain(1, 0)])),
            Ok(ReceiverAction::WritePages)
        );
        assert!(pair.source.send(&streams(4)).is_err(), "declared once");
        let join = Message::Join(StreamToken::from_bytes([1; StreamToken::BYTES]));
        assert_eq!(
            pair.target.on_message(&join),
            Err(SessionError::JoinInMigration)
        );

        // Not agreed: no declaration at all.
        let mut pair = accepted(false, Features::ZERO_PAGES);
        assert!(pair.source.send(&streams(1)).is_err());
        assert!(pair.target.on_message(&streams(1)).is_err());

        // Counts the target would refuse, and more than one stream for an SEV guest.
        for (sev, count, error) in [
            (false, 0, SessionError::BadStreamCount { count: 0 }),
            (false, 17, SessionError::BadStreamCount { count: 17 }),
            (true, 2, SessionError::StreamsForSev { count: 2 }),
        ] {
            let mut pair = accepted(sev, Features::STREAMS);
            assert_eq!(pair.target.on_message(&streams(count)), Err(error));
            assert!(pair.target.ending().is_some(), "a bad count ends it");
        }
        let mut pair = accepted(true, Features::STREAMS);
        assert!(matches!(
            pair.send_to_target(streams(1)),
            Ok(ReceiverAction::JoinStreams(_))
        ));
    }

    #[test]
    fn another_protocol_version_in_hello_is_rejected() {
        let mut h = hello(false);
        h.protocol_version = PROTOCOL_VERSION + 1;
        let mut target = ReceiverSession::new();
        let err = target.on_message(&Message::Hello(h)).unwrap_err();
        assert_eq!(
            err,
            SessionError::UnsupportedVersion {
                version: PROTOCOL_VERSION + 1
            }
        );
    }

    #[test]
    fn a_refused_local_send_changes_nothing() {
        let mut source = SenderSession::new();
        assert!(source.send(&state()).is_err());
        assert!(source.send(&Message::Complete).is_err());
        assert!(source.guest_may_resume_here());
        source.send(&Message::Hello(hello(false))).unwrap();
        assert_eq!(source.ending(), None);
    }

    fn any_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            any::<bool>().prop_map(|sev| Message::Hello(hello(sev))),
            Just(Message::HelloReply(HelloReply::accept(
                Features::ZERO_PAGES,
                None
            ))),
            Just(Message::HelloReply(HelloReply::accept(
                Features::NONE,
                chain()
            ))),
            Just(Message::HelloReply(HelloReply::refuse("no"))),
            Just(Message::SevStart(sev_start())),
            (0u64..4, 0u8..3).prop_map(|(gfn, kind)| chunk(vec![match kind {
                0 => zero(gfn),
                1 => plain(gfn, 0),
                _ => encrypted(gfn, 64),
            }])),
            Just(state()),
            Just(Message::HelloReply(HelloReply::accept(
                Features::RECOVERY.union(Features::ZERO_PAGES),
                None
            ))),
            Just(Message::HelloReply(HelloReply::accept(
                Features::STREAMS.union(Features::ZERO_PAGES),
                None
            ))),
            (0u16..3).prop_map(|count| Message::Streams(crate::protocol::Streams {
                count,
                token: crate::protocol::StreamToken::from_bytes([9; 16]),
            })),
            Just(Message::Join(crate::protocol::StreamToken::from_bytes(
                [9; 16]
            ))),
            Just(Message::Ack),
            Just(Message::Complete),
            Just(Message::Running),
            Just(Message::Recover(MigrationId::of_state(b"s"))),
            Just(Message::Adopt(MigrationId::of_state(b"s"))),
            Just(Message::Recovered(RecoveryOutcome::Discarded)),
            Just(Message::error("e")),
            Just(Message::cancel("c")),
        ]
    }

    proptest! {
        #[test]
        fn any_sequence_is_followed_or_refused_never_a_panic(
            messages in proptest::collection::vec((any_message(), any::<bool>()), 0..24)
        ) {
            let mut target = ReceiverSession::new();
            let mut source = SenderSession::new();
            let mut complete_received = false;
            for (m, incoming) in messages {
                let before = target.ending().cloned();
                if incoming {
                    let action = target.on_message(&m);
                    complete_received |= action == Ok(ReceiverAction::Run);
                    if action.is_err() {
                        prop_assert!(target.ending().is_some(), "a refused message ends it");
                    }
                } else {
                    let _ = target.send(&m);
                }
                // Once over, it stays over.
                if before.is_some() {
                    prop_assert!(target.ending().is_some());
                }
                // The guest may run on the target only after Complete; the source knows it is
                // no longer in doubt only once the target has said Running.
                prop_assert!(!target.may_run() || complete_received);
                let may_resume = source.guest_may_resume_here();
                let _ = source.on_message(&m);
                let _ = source.send(&m);
                prop_assert!(may_resume || !source.guest_may_resume_here(), "Complete is never taken back");
                if source.in_doubt() {
                    prop_assert!(!source.guest_may_resume_here());
                }
                // Recovery messages never belong to a migration connection.
                if matches!(
                    m,
                    Message::Recover(_) | Message::Recovered(_) | Message::Adopt(_)
                ) {
                    prop_assert!(ReceiverSession::new().on_message(&m).is_err());
                }
            }
        }
    }
}
