//! The target side: accept a guest over any byte stream, fill a new VM's memory with it and
//! hand back its state; run it only once the source has let it go.
//!
//! In three steps, so the VM can be built in between: [`accept`] reads the `Hello` and says
//! yes or no (nothing is applied before), [`Incoming::receive_into`] writes memory and returns
//! the saved state, and after the VM has restored it, [`Incoming::acknowledge`] and
//! [`Incoming::wait_complete`] tell when the guest may run.

use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

use veil_hypervisor::vm::VmSnapshot;
use veil_hypervisor::GuestMemory;
use veil_sev::firmware::{Firmware, Handle, SendStart};

use crate::page_bits::PageBits;
use crate::page_writer::{PageWriter, Work, FRAME_BUFFERS};
use crate::protocol::{
    read_frame, write_frame, Features, FrameReader, Hello, HelloReply, MemoryChunkRef, Message,
    MessageType, ProtocolError, ReceiverAction, ReceiverSession, SessionError, VmShape,
};
use crate::protocol::{Fate, FateError, MigrationId, RecoveryOutcome};
use crate::recovery::SharedFate;
use crate::transport::{Accepted, Listener, Stream, TransportError};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};

use crate::data_streams;

/// How long a new connection has to open with a valid `Hello` (the TLS handshake included)
/// before [`accept_from`] drops it and waits for the next.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Why receiving failed; whatever arrived is discarded.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("Refused the incoming guest: {0}")]
    Refused(String),
    #[error("The source ended the migration: {0}")]
    Aborted(String),
    #[error("The source sent {0} out of turn")]
    OutOfTurn(String),
    #[error("Migration protocol error")]
    Protocol(#[from] ProtocolError),
    #[error("Migration out of order")]
    Session(#[from] SessionError),
    #[error(
        "{count} page(s) of guest memory arrived damaged (their checksum failed) and were not \
         sent again, the first at gfn {first:#x}: the stream was corrupted"
    )]
    DamagedPages { count: u64, first: u64 },
    #[error("Cannot write guest memory")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("The guest state cannot be decoded")]
    State(#[from] serde_json::Error),
    #[error("An encrypted page arrived without an SEV session to receive it")]
    Sev,
    #[error("The source's PDH certificate does not decode")]
    BadPdh,
    #[error("SEV firmware error")]
    Firmware(#[from] veil_sev::firmware::FirmwareError),
    #[error("Cannot take a source")]
    Transport(#[from] TransportError),
    #[error("The guest will not run here")]
    Fate(#[source] FateError),
    #[error(
        "Cannot back guest pages {first:#x}..{end:#x} with host memory (out of memory, or the \
         memory file's filesystem is full)"
    )]
    Unbacked {
        first: u64,
        end: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "Only {joined} of the {declared} connections the source declared arrived within {}",
        humantime::format_duration(*within)
    )]
    StreamsMissing {
        joined: usize,
        declared: u16,
        within: Duration,
    },
    #[error(
        "The source closed the migration with {joined} of the {declared} connections it \
         declared open"
    )]
    SourceLeft { joined: usize, declared: u16 },
    #[error("Cannot start the thread that writes guest memory")]
    Thread(#[source] io::Error),
    #[error("The thread that writes guest memory panicked")]
    WriterPanicked,
    #[error("Dropped a connection from {peer}: it did not open with a valid Hello")]
    Stranger {
        peer: String,
        #[source]
        source: Box<ReceiveError>,
    },
}

/// The error that says why a receive failed, of those its threads ended with (the page
/// writer's, the control stream's, the data streams'): the first that is not merely the link
/// failing or the source ending it (which follow from the cause), else the first of those.
fn first_cause(errors: impl Iterator<Item = ReceiveError>) -> ReceiveError {
    let rank = |e: &ReceiveError| match e {
        ReceiveError::Aborted(_) => 1,
        e if lost_link(e) => 2,
        _ => 0,
    };
    errors
        .enumerate()
        .min_by_key(|(order, e)| (rank(e), *order))
        .map(|(_, e)| e)
        .unwrap_or(ReceiveError::WriterPanicked)
}

/// Whether `e` is the link failing (closed, cut, silent), as opposed to the source saying
/// something.
pub(crate) fn lost_link(e: &ReceiveError) -> bool {
    matches!(
        e,
        ReceiveError::Protocol(
            ProtocolError::Io(_)
                | ProtocolError::Closed
                | ProtocolError::TruncatedHeader { .. }
                | ProtocolError::TruncatedPayload { .. }
        )
    )
}

/// Why the connection's thread stopped reading before the State.
enum Stop {
    Failed(ReceiveError),
    /// The writer stopped (its own error says why).
    WriterGone,
    /// A data stream's thread stopped (its own error says why).
    StreamGone,
}

impl From<ReceiveError> for Stop {
    fn from(e: ReceiveError) -> Self {
        Stop::Failed(e)
    }
}

/// A guest whose source has been accepted.
pub struct Incoming<S> {
    stream: S,
    /// The further connections of a migration over several streams.
    data_streams: Vec<S>,
    session: ReceiverSession,
    shape: VmShape,
    /// Who the source is, when it came through a listener.
    peer: Option<String>,
    /// Whether the guest runs here, never will, or is still waiting for Complete; shared
    /// with whoever answers the source's recovery queries.
    fate: Arc<SharedFate>,
}

/// Reads the source's `Hello` and accepts the guest if `check` (this host's judgement of the
/// VM's shape) agrees; otherwise tells the source why not.
/// `sev_chain` is this host's SEV certificate chain (encoded), when it can receive SEV guests.
pub fn accept<S: Read + Write>(
    mut stream: S,
    check: impl FnOnce(&VmShape) -> Result<(), String>,
    sev_chain: Option<Vec<u8>>,
) -> Result<Incoming<S>, ReceiveError> {
    let (session, hello) = read_hello(&mut stream)?;
    // One stream: further connections need a listener to come through.
    answer_hello(stream, session, hello, check, sev_chain, false)
}

/// Waits on `listener` for a source whose connection opens with a valid `Hello` within
/// `hello_timeout`, and accepts its guest as [`accept`] does. Every other connection (closed
/// at once, random bytes, a bad header, a refused TLS certificate, silence, a trickle too
/// slow) is logged with its peer and what went wrong, dropped, and the wait goes on: a port
/// scan or a health check cannot end it. Connections are taken one at a time, so a real
/// source may wait up to `hello_timeout` behind a stranger (well within its peer timeout).
/// A recovery query is answered Unknown: no migration is under way here yet.
pub fn accept_from(
    listener: &Listener,
    hello_timeout: Duration,
    check: impl FnOnce(&VmShape) -> Result<(), String>,
    sev_chain: Option<Vec<u8>>,
) -> Result<Incoming<Stream>, ReceiveError> {
    accept_answering(
        listener,
        hello_timeout,
        &|_| RecoveryOutcome::Unknown,
        check,
        sev_chain,
    )
}

/// As [`accept_from`], answering each recovery query (Recover or Adopt, about a migration this
/// process does not hold) with `answer`'s outcome: under `--keep-listening` the sibling
/// process that holds the guest decides ([`crate::recovery::siblings`]).
pub fn accept_answering(
    listener: &Listener,
    hello_timeout: Duration,
    answer: &dyn Fn(&Message) -> RecoveryOutcome,
    check: impl FnOnce(&VmShape) -> Result<(), String>,
    sev_chain: Option<Vec<u8>>,
) -> Result<Incoming<Stream>, ReceiveError> {
    loop {
        match opening(listener, hello_timeout, answer) {
            Ok(Some((stream, peer, session, hello))) => {
                let mut incoming = answer_hello(stream, session, hello, check, sev_chain, true)?;
                incoming.peer = Some(peer);
                incoming.join_streams(listener, hello_timeout, answer)?;
                return Ok(incoming);
            }
            Ok(None) => {}
            Err(e @ ReceiveError::Stranger { .. }) => {
                tracing::warn!("{}", crate::error_chain(&e));
            }
            Err(e) => return Err(e),
        }
    }
}

/// A source's connection, by the time its `Hello` has been read.
type Opened = (Stream, String, ReceiverSession, Hello);

/// One connection's opening: the stream and its valid `Hello`; `None` for a recovery query,
/// answered; a [`ReceiveError::Stranger`] for a connection to drop; or a listener that failed.
fn opening(
    listener: &Listener,
    hello_timeout: Duration,
    answer: &dyn Fn(&Message) -> RecoveryOutcome,
) -> Result<Option<Opened>, ReceiveError> {
    let Accepted {
        mut stream,
        peer,
        deadline,
    } = loop {
        match listener.accept_within(hello_timeout) {
            Ok(accepted) => break accepted,
            // The transport's error already names the peer.
            Err(e) if e.is_one_connection() => tracing::warn!("{}", crate::error_chain(&e)),
            Err(e) => return Err(e.into()),
        }
    };
    let stranger = |source| ReceiveError::Stranger {
        peer: peer.clone(),
        source: Box::new(source),
    };
    let mut bounded = ByDeadline {
        stream: &mut stream,
        deadline,
        timeout: hello_timeout,
    };
    let frame = read_frame(&mut bounded).map_err(|e| stranger(ReceiveError::Protocol(e)))?;
    if let Message::Recover(id) | Message::Adopt(id) = frame.message {
        let outcome = answer(&frame.message);
        tracing::warn!(
            "{peer} asked about migration {id} ({}): {outcome:?}",
            frame.message.kind()
        );
        let _ = write_frame(&mut bounded, &Message::Recovered(outcome));
        return Ok(None);
    }
    let (session, hello) = hello_from(&mut bounded, frame.message).map_err(stranger)?;
    stream
        .set_peer_timeouts()
        .map_err(|e| stranger(ReceiveError::Protocol(ProtocolError::Io(e))))?;
    Ok(Some((stream, peer, session, hello)))
}

/// A new connection's stream while it owes its `Hello`: every read is bounded by what is
/// left until the deadline, so a peer that trickles a byte at a time is cut off too.
pub(crate) struct ByDeadline<'a> {
    stream: &'a mut Stream,
    deadline: Instant,
    timeout: Duration,
}

impl<'a> ByDeadline<'a> {
    pub(crate) fn new(stream: &'a mut Stream, deadline: Instant, timeout: Duration) -> Self {
        Self {
            stream,
            deadline,
            timeout,
        }
    }

    fn late(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "no valid Hello within {}",
                humantime::format_duration(self.timeout)
            ),
        )
    }
}

impl Read for ByDeadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.late());
        }
        self.stream.set_read_timeout(left)?;
        match self.stream.read(buf) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(self.late())
            }
            other => other,
        }
    }
}

impl Write for ByDeadline<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
    }
}

/// The first frame, which must be a valid `Hello`; a peer that opens with anything else is
/// told why (best effort) before the error comes back.
fn read_hello(stream: &mut (impl Read + Write)) -> Result<(ReceiverSession, Hello), ReceiveError> {
    let frame = read_frame(stream)?;
    hello_from(stream, frame.message)
}

/// A new session, if `first` (the connection's first message) is a Hello it can start with;
/// otherwise the reason is sent back.
fn hello_from(
    stream: &mut (impl Read + Write),
    first: Message,
) -> Result<(ReceiverSession, Hello), ReceiveError> {
    let mut session = ReceiverSession::new();
    match (session.on_message(&first), first) {
        (Ok(ReceiverAction::CheckHello), Message::Hello(hello)) => Ok((session, hello)),
        (Err(e), _) => {
            let _ = write_frame(stream, &Message::error(crate::error_chain(&e)));
            Err(e.into())
        }
        (Ok(other), _) => Err(ReceiveError::OutOfTurn(format!("{other:?}"))),
    }
}

/// Judges the guest a `Hello` describes and answers it; `joins` if further connections of
/// the migration can be taken (feature `STREAMS`).
fn answer_hello<S: Read + Write>(
    mut stream: S,
    mut session: ReceiverSession,
    hello: Hello,
    check: impl FnOnce(&VmShape) -> Result<(), String>,
    sev_chain: Option<Vec<u8>>,
    joins: bool,
) -> Result<Incoming<S>, ReceiveError> {
    let mut known = Features::KNOWN;
    if !joins {
        known = known.intersection(Features::from_bits(!Features::STREAMS.bits()));
    }
    let sev = hello.vm.sev().is_some();
    let es = hello
        .vm
        .sev()
        .is_some_and(|s| s.policy.has(veil_sev::policy::GuestPolicy::ES));
    let verdict = if es {
        Err("SEV-ES and SEV-SNP guests cannot be migrated: upstream KVM cannot receive their encrypted register state (VMSA)".to_string())
    } else if sev && sev_chain.is_none() {
        Err("this host does not receive SEV guests (start veil receive with --sev)".to_string())
    } else {
        check(&hello.vm)
    };
    let reply = match &verdict {
        Ok(()) => HelloReply::accept(
            hello.features.intersection(known),
            if sev { sev_chain } else { None },
        ),
        Err(reason) => HelloReply::refuse(reason.clone()),
    };
    let reply = Message::HelloReply(reply);
    session.send(&reply)?;
    write_frame(&mut stream, &reply)?;
    verdict.map_err(ReceiveError::Refused)?;
    Ok(Incoming {
        stream,
        data_streams: Vec::new(),
        session,
        shape: hello.vm,
        peer: None,
        fate: Arc::default(),
    })
}

impl Incoming<Stream> {
    /// With `STREAMS` agreed: reads the source's Streams and takes the further connections it
    /// declares (within `timeout`, like a Hello). Any failure is reported to the source.
    fn join_streams(
        &mut self,
        listener: &Listener,
        timeout: Duration,
        answer: &dyn Fn(&Message) -> RecoveryOutcome,
    ) -> Result<(), ReceiveError> {
        if !self.session.features().contains(Features::STREAMS) {
            return Ok(());
        }
        let result = self.take_streams(listener, timeout, answer);
        if let Err(e) = &result {
            self.report(e);
        }
        result
    }

    fn take_streams(
        &mut self,
        listener: &Listener,
        timeout: Duration,
        answer: &dyn Fn(&Message) -> RecoveryOutcome,
    ) -> Result<(), ReceiveError> {
        let deadline = Instant::now() + timeout;
        let frame = read_frame(&mut ByDeadline::new(&mut self.stream, deadline, timeout))?;
        self.stream.set_peer_timeouts().map_err(ProtocolError::Io)?;
        let streams = match self.session.on_message(&frame.message)? {
            ReceiverAction::JoinStreams(streams) => streams,
            ReceiverAction::Discard { reason, .. } => return Err(ReceiveError::Aborted(reason)),
            other => return Err(ReceiveError::OutOfTurn(format!("{other:?}"))),
        };
        let joins = crate::data_streams::take_joins(
            listener,
            &streams,
            deadline,
            timeout,
            answer,
            self.stream.as_fd(),
        );
        self.data_streams = match joins {
            Ok(joined) => joined,
            Err(left @ ReceiveError::SourceLeft { .. }) => {
                return Err(self.why_the_source_left(deadline, timeout).unwrap_or(left))
            }
            Err(e) => return Err(e),
        };
        Ok(())
    }

    /// The reason in the Error or Cancel a source that closed the control stream sent before
    /// it did, if any: what it sent is all there is, so the reads end.
    fn why_the_source_left(
        &mut self,
        deadline: Instant,
        timeout: Duration,
    ) -> Option<ReceiveError> {
        let mut bounded = ByDeadline::new(&mut self.stream, deadline, timeout);
        loop {
            match read_frame(&mut bounded).ok()?.message {
                Message::Error { reason } | Message::Cancel { reason } => {
                    return Some(ReceiveError::Aborted(reason))
                }
                // Pages of the first pass, sent before the source gave up.
                _ => continue,
            }
        }
    }
}

impl<S: Read + Write> Incoming<S> {
    /// How many connections the guest arrives over (the control stream and the data
    /// streams).
    pub fn connections(&self) -> usize {
        1 + self.data_streams.len()
    }

    /// The connection to the source.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// Who the source is (its address, or the UNIX socket it came through), when it came
    /// through [`accept_from`].
    pub fn peer(&self) -> Option<&str> {
        self.peer.as_deref()
    }

    /// The guest's memory layout and vCPUs: build the VM to match.
    pub fn shape(&self) -> &VmShape {
        &self.shape
    }
}

impl<S: Read + Write + Send + AsFd> Incoming<S> {
    /// Writes arriving memory into `memory` until the state arrives, and returns it. An SEV
    /// guest's private pages go through `firmware` (RECEIVE_START, RECEIVE_UPDATE_DATA,
    /// RECEIVE_FINISH); its handle for the guest is returned with the state. Anonymous
    /// `memory` must be fresh (all zero, as a VM built to receive has): a page this receive
    /// has not written is taken to be zero. File-backed memory may hold anything. The pages
    /// are written on a thread this call starts (`migrate-write`, under the caller's seccomp
    /// filter if it has one) and ends before it returns; so are the data streams' threads
    /// (`migrate-stream`) of a migration over several connections.
    pub fn receive_into(
        &mut self,
        memory: &GuestMemory,
        firmware: Option<&mut dyn Firmware>,
    ) -> Result<(VmSnapshot, Option<Handle>), ReceiveError> {
        let result = self.receive_memory(memory, firmware);
        if let Err(e) = &result {
            self.report(e);
        }
        result
    }

    fn receive_memory(
        &mut self,
        memory: &GuestMemory,
        firmware: Option<&mut dyn Firmware>,
    ) -> Result<(VmSnapshot, Option<Handle>), ReceiveError> {
        let written_bits = crate::page_writer::written_pages_for(memory);
        let damaged = PageBits::covering(memory);
        let stop = AtomicBool::new(false);
        let shared = data_streams::Shared {
            memory,
            written: written_bits.as_ref(),
            damaged: &damaged,
            vm: self.shape.clone(),
            features: self.session.features(),
            stop: &stop,
        };
        let writer = PageWriter::new(memory, firmware, written_bits.as_ref(), &damaged);
        let data = std::mem::take(&mut self.data_streams);
        // To wake the data streams' threads out of their reads should the receive fail.
        let hang_ups = data_streams::hang_ups(&data).map_err(ProtocolError::Io)?;
        std::thread::scope(|scope| {
            let streams = data_streams::start(scope, data, &shared)?;
            let (work, to_write) = mpsc::sync_channel(FRAME_BUFFERS - 1);
            let (give_back, given_back) = mpsc::channel();
            let writing = std::thread::Builder::new()
                .name("migrate-write".into())
                .spawn_scoped(scope, move || writer.run(to_write, give_back))
                .map_err(ReceiveError::Thread)?;
            let read = self.read_until_state(&work, &given_back, &streams);
            if read.is_err() {
                stop.store(true, Ordering::Relaxed);
                data_streams::hang_up(&hang_ups);
            }
            // The writer finishes what it was given, and stops; so do the data streams.
            drop(work);
            let written = writing
                .join()
                .unwrap_or_else(|_| Err(ReceiveError::WriterPanicked));
            let streamed = data_streams::finish(streams);
            let (bytes, sev) = match (read, written) {
                (Ok(bytes), Ok(sev)) => (bytes, sev),
                (read, written) => {
                    let read = match read {
                        Ok(_) => None,
                        Err(Stop::Failed(e)) => Some(e),
                        Err(Stop::WriterGone | Stop::StreamGone) => None,
                    };
                    let errors = written.err().into_iter().chain(read);
                    return Err(first_cause(
                        errors.chain(streamed.into_iter().filter_map(Result::err)),
                    ));
                }
            };
            // Every page the guest tore while it was sent came again, whole, before the State
            // (the last pass sends with the guest stopped): one still damaged was damaged on
            // the way, and never sent again.
            if let (count, Some(first)) = damaged.census() {
                return Err(ReceiveError::DamagedPages { count, first });
            }
            let snapshot = serde_json::from_slice(&bytes)?;
            self.fate
                .state_arrived(MigrationId::of_state(&bytes))
                .map_err(ReceiveError::Fate)?;
            let handle = sev.map(|r| r.finish()).transpose()?;
            Ok((snapshot, handle))
        })
    }

    /// Reads frames, hands the memory chunks to the writer through `work` once the session
    /// has accepted them, and answers Sync once the writer has caught up; returns the State's
    /// bytes. `given_back` returns the frame readers the writer is done with.
    fn read_until_state(
        &mut self,
        work: &mpsc::SyncSender<Work>,
        given_back: &mpsc::Receiver<FrameReader>,
        streams: &[data_streams::Running<'_>],
    ) -> Result<Vec<u8>, Stop> {
        let mut spare: Vec<FrameReader> = (0..FRAME_BUFFERS).map(|_| FrameReader::new()).collect();
        loop {
            let mut reader = match spare.pop() {
                Some(reader) => reader,
                None => given_back.recv().map_err(|_| Stop::WriterGone)?,
            };
            let raw = reader.read(&mut self.stream).map_err(ReceiveError::from)?;
            if raw.header.kind == MessageType::MemoryChunk {
                let chunk = MemoryChunkRef::parse(raw.payload).map_err(|source| {
                    ReceiveError::Protocol(ProtocolError::Payload {
                        kind: MessageType::MemoryChunk,
                        source,
                    })
                })?;
                match self
                    .session
                    .on_memory_chunk(&chunk)
                    .map_err(ReceiveError::from)?
                {
                    ReceiverAction::WritePages => {}
                    other => return Err(ReceiveError::OutOfTurn(format!("{other:?}")).into()),
                }
                work.send(Work::Chunk(reader))
                    .map_err(|_| Stop::WriterGone)?;
                continue;
            }
            let frame = raw.decode().map_err(ReceiveError::from)?;
            spare.push(reader);
            match self
                .session
                .on_message(&frame.message)
                .map_err(ReceiveError::from)?
            {
                ReceiverAction::StartSev => {
                    use sev::parser::Decoder;
                    let Message::SevStart(start) = frame.message else {
                        unreachable!("the session said StartSev")
                    };
                    let pdh =
                        sev::certs::sev::sev::Certificate::decode(&mut start.pdh.as_slice(), ())
                            .map_err(|_| ReceiveError::BadPdh)?;
                    let start = SendStart {
                        policy: start.policy,
                        pdh,
                        session: start.session,
                    };
                    work.send(Work::StartSev(Box::new(start)))
                        .map_err(|_| Stop::WriterGone)?;
                }
                ReceiverAction::Finish => {
                    let Message::State(state) = frame.message else {
                        unreachable!("the session said Finish")
                    };
                    // The last pages on every data stream come before the state applies.
                    data_streams::barrier(streams, true).map_err(|_| Stop::StreamGone)?;
                    return Ok(state.bytes);
                }
                ReceiverAction::ReplySynced => {
                    // Everything before the Sync must be in guest memory (or the firmware),
                    // on every stream.
                    let (done, caught_up) = mpsc::channel();
                    work.send(Work::Barrier(done))
                        .map_err(|_| Stop::WriterGone)?;
                    caught_up.recv().map_err(|_| Stop::WriterGone)?;
                    data_streams::barrier(streams, false).map_err(|_| Stop::StreamGone)?;
                    self.session
                        .send(&Message::Synced)
                        .map_err(ReceiveError::from)?;
                    write_frame(&mut self.stream, &Message::Synced).map_err(ReceiveError::from)?;
                }
                ReceiverAction::Discard { reason, .. } => {
                    return Err(ReceiveError::Aborted(reason).into())
                }
                other => return Err(ReceiveError::OutOfTurn(format!("{other:?}")).into()),
            }
        }
    }
}

impl<S: Read + Write> Incoming<S> {
    /// The guest is ready here (restored, paused): tell the source, which then stops it.
    pub fn acknowledge(&mut self) -> Result<(), ReceiveError> {
        // A query may already have discarded the guest: then the source must not let it go.
        if !matches!(self.fate.get(), Fate::Ready(_)) {
            return Err(ReceiveError::Fate(FateError::Discarded));
        }
        self.session.send(&Message::Ack)?;
        write_frame(&mut self.stream, &Message::Ack)?;
        Ok(())
    }

    /// The guest's fate, for a [`Responder`](crate::recovery::Responder) to answer the
    /// source's queries from.
    pub fn fate(&self) -> Arc<SharedFate> {
        Arc::clone(&self.fate)
    }

    /// Waits for the source's `Complete`: from then on the guest runs only here. An error
    /// means it never will. When the link is lost before Complete and someone answers the
    /// source's recovery queries, the guest is held (paused) until a query discards it, an
    /// Adopt request has it run here after all (then this returns `Ok`), or the window ends;
    /// with no one answering, it is discarded at once.
    pub fn wait_complete(&mut self) -> Result<(), ReceiveError> {
        let result = self.read_complete();
        match &result {
            Ok(()) => {}
            Err(e) if self.session.features().contains(Features::RECOVERY) && lost_link(e) => {
                if let Some(until) = self.fate.answered_until() {
                    tracing::warn!(
                        "the link to the source was lost after the Ack and before Complete: \
                         the guest is held, paused, and will not run here; waiting for the \
                         source's recovery query"
                    );
                    let fate = self.fate.settle_by(until);
                    if fate.is_running() {
                        tracing::warn!("the source asked this host to run the guest: it runs here");
                        return Ok(());
                    }
                    tracing::warn!("the guest will not run here ({fate:?})");
                }
                self.fate.discard();
            }
            Err(_) => self.fate.discard(),
        }
        result
    }

    fn read_complete(&mut self) -> Result<(), ReceiveError> {
        let frame = read_frame(&mut self.stream)?;
        match self.session.on_message(&frame.message)? {
            ReceiverAction::Run => {}
            ReceiverAction::Discard { reason, .. } => return Err(ReceiveError::Aborted(reason)),
            other => return Err(ReceiveError::OutOfTurn(format!("{other:?}"))),
        }
        // A query that came first has discarded the guest for good.
        self.fate.complete().map_err(ReceiveError::Fate)?;
        if self.session.features().contains(Features::RECOVERY) {
            // The guest runs here whether or not this arrives: a source that misses it asks.
            let sent = self
                .session
                .send(&Message::Running)
                .map_err(ReceiveError::from)
                .and_then(|()| Ok(write_frame(&mut self.stream, &Message::Running)?));
            if let Err(e) = sent {
                tracing::warn!(
                    "cannot confirm to the source that the guest runs here: {}",
                    crate::error_chain(&e)
                );
            }
        }
        Ok(())
    }

    /// Tells the source why this side gave up (best effort: the link may be gone), causes
    /// included: "Migration protocol error" alone would leave the source guessing. Any error
    /// will do: building the VM for the guest can fail as well as receiving it.
    /// The session decides whether an Error is still owed: yes while it runs and after the
    /// source broke the protocol, no once either side has ended it.
    pub fn report(&mut self, error: &dyn std::error::Error) {
        let message = Message::error(crate::error_chain(error));
        if self.session.send(&message).is_ok() {
            let _ = write_frame(&mut self.stream, &message);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::page_writer::write_zero_page;
    use crate::protocol::messages::tests::hello;
    use crate::transport::{listen, Endpoint, Security};
    use std::os::unix::net::UnixStream;
    use veil_hypervisor::memory::PAGE_SIZE;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    /// A peer that sends a byte of a real Hello every 150 ms never finishes within 500 ms,
    /// though no single read waits that long: it is dropped, and the source behind it is
    /// accepted.
    #[test]
    fn a_trickling_peer_is_cut_off_at_the_deadline_and_the_next_source_accepted() {
        let dir = std::env::temp_dir().join(format!("veil-receiver-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.sock");
        let endpoint = Endpoint::Unix(path.clone());
        let listener = listen(&endpoint, &Security::default()).unwrap();
        let mut frame = Vec::new();
        write_frame(&mut frame, &Message::Hello(hello(false))).unwrap();
        std::thread::scope(|scope| {
            let peers = scope.spawn(|| {
                let started = Instant::now();
                let mut trickle = UnixStream::connect(&path).unwrap();
                for byte in &frame {
                    if trickle.write_all(std::slice::from_ref(byte)).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(150));
                }
                let cut_off = started.elapsed();
                let mut source = UnixStream::connect(&path).unwrap();
                source.write_all(&frame).unwrap();
                let reply = read_frame(&mut source).unwrap();
                // Offered and agreed: one stream.
                let streams = Message::Streams(crate::protocol::Streams {
                    count: 1,
                    token: crate::protocol::StreamToken::from_bytes([0; 16]),
                });
                write_frame(&mut source, &streams).unwrap();
                (cut_off, reply.message)
            });
            let incoming = accept_from(&listener, Duration::from_millis(500), |_| Ok(()), None)
                .expect("the source behind the stranger is accepted");
            assert_eq!(incoming.shape(), &hello(false).vm);
            assert!(incoming.peer().unwrap().contains("m.sock"));
            let (cut_off, reply) = peers.join().unwrap();
            assert!(cut_off < Duration::from_secs(2), "{cut_off:?}");
            assert!(matches!(reply, Message::HelloReply(r) if r.accepted));
        });
        drop(listener);
        let _ = std::fs::remove_dir_all(&dir);
    }

    use veil_hypervisor::memory::{GuestRam, MemoryConfig};

    /// Whether the host page behind `at` is resident (mapped at all, the zero page included).
    fn resident(memory: &GuestMemory, at: GuestAddress) -> bool {
        let host = memory.get_host_address(at).unwrap();
        let mut vec = [0u8; 1];
        // SAFETY: `host` is page-aligned and inside a mapping of guest RAM that `memory` keeps
        // alive; mincore writes one byte per page into `vec`, which has room for the one page.
        let r = unsafe { libc::mincore(host.cast(), PAGE_SIZE as usize, vec.as_mut_ptr()) };
        assert_eq!(r, 0, "{}", std::io::Error::last_os_error());
        vec[0] & 1 != 0
    }

    #[test]
    fn fresh_ram_is_never_read_for_a_zero_page_and_earlier_data_is_cleared() {
        let ram = GuestRam::with_huge_pages(
            &MemoryConfig {
                size: 16 << 20,
                file: None,
            },
            false,
        )
        .unwrap();
        let (mut source, target) = UnixStream::pair().unwrap();
        let chunk = |pages: Vec<crate::protocol::chunk::Page>| {
            Message::MemoryChunk(crate::protocol::chunk::MemoryChunk { pages })
        };
        let plain = |gfn| crate::protocol::chunk::Page {
            gfn,
            content: crate::protocol::chunk::PageContent::Plain(Box::new([0xab; 4096])),
        };
        let zero = |gfn| crate::protocol::chunk::Page {
            gfn,
            content: crate::protocol::chunk::PageContent::Zero,
        };
        let failed = std::thread::scope(|scope| {
            scope.spawn(move || {
                write_frame(&mut source, &Message::Hello(hello(false))).unwrap();
                read_frame(&mut source).unwrap();
                // A first pass with data in page 5, then a pass that finds it zero, and
                // page 6 zero all along.
                write_frame(&mut source, &chunk(vec![plain(5), zero(6)])).unwrap();
                write_frame(&mut source, &chunk(vec![zero(5), zero(6)])).unwrap();
                write_frame(&mut source, &Message::cancel("end of the test")).unwrap();
                let _ = read_frame(&mut source);
            });
            let mut incoming = accept(target, |_| Ok(()), None).unwrap();
            incoming
                .receive_into(ram.memory(), None)
                .map(drop)
                .unwrap_err()
        });
        assert!(failed.to_string().contains("end of the test"), "{failed}");
        let memory = ram.memory();
        let byte: u8 = memory.read_obj(GuestAddress(5 * PAGE_SIZE + 100)).unwrap();
        assert_eq!(byte, 0, "the data of the first pass is cleared");
        assert!(
            !resident(memory, GuestAddress(6 * PAGE_SIZE)),
            "a zero page over fresh RAM is neither written nor read"
        );
    }

    /// 16 MiB of anonymous RAM no page of which has been touched.
    pub(crate) fn fresh_ram() -> GuestRam {
        GuestRam::with_huge_pages(
            &MemoryConfig {
                size: 16 << 20,
                file: None,
            },
            false,
        )
        .unwrap()
    }

    fn one_page_chunk(content: crate::protocol::chunk::PageContent) -> Message {
        Message::MemoryChunk(crate::protocol::chunk::MemoryChunk {
            pages: vec![crate::protocol::chunk::Page { gfn: 7, content }],
        })
    }

    /// A receive into `ram` (with `sev_chain` for an SEV guest) that the source feeds its
    /// Hello and then `frames`, and that must fail: its error, and what the source was told.
    fn failed_receive(
        ram: &GuestRam,
        sev_chain: Option<Vec<u8>>,
        frames: &[Message],
    ) -> (ReceiveError, Message) {
        let sev = sev_chain.is_some();
        let (mut source, target) = UnixStream::pair().unwrap();
        std::thread::scope(|scope| {
            let receiving = scope.spawn(|| {
                let mut incoming = accept(target, |_| Ok(()), sev_chain).unwrap();
                incoming.receive_into(ram.memory(), None).map(drop)
            });
            write_frame(&mut source, &Message::Hello(hello(sev))).unwrap();
            read_frame(&mut source).unwrap();
            for frame in frames {
                write_frame(&mut source, frame).unwrap();
            }
            let told = read_frame(&mut source);
            let failed = receiving.join().unwrap().unwrap_err();
            let told = told.unwrap_or_else(|e| panic!("{e:?}, {failed:?}")).message;
            (failed, told)
        })
    }

    /// The page writer runs behind the connection's thread; a Sync is answered only once
    /// what came before it is in guest memory.
    #[test]
    fn synced_means_every_page_before_the_sync_is_in_guest_memory() {
        let ram = fresh_ram();
        let memory = ram.memory();
        let (mut source, target) = UnixStream::pair().unwrap();
        std::thread::scope(|scope| {
            let receiving = scope.spawn(move || {
                let mut incoming = accept(target, |_| Ok(()), None).unwrap();
                incoming.receive_into(memory, None).map(drop)
            });
            write_frame(&mut source, &Message::Hello(hello(false))).unwrap();
            read_frame(&mut source).unwrap();
            for fill in 1..=20u8 {
                let page = crate::protocol::chunk::PageContent::Plain(Box::new([fill; 4096]));
                write_frame(&mut source, &one_page_chunk(page)).unwrap();
            }
            write_frame(&mut source, &Message::Sync).unwrap();
            assert_eq!(read_frame(&mut source).unwrap().message, Message::Synced);
            let byte: u8 = memory.read_obj(GuestAddress(7 * PAGE_SIZE + 9)).unwrap();
            assert_eq!(byte, 20, "the last chunk before the Sync is written");
            write_frame(&mut source, &Message::cancel("end of the test")).unwrap();
            let failed = receiving.join().unwrap().unwrap_err();
            assert!(failed.to_string().contains("end of the test"), "{failed}");
        });
    }

    /// A chunk the session refuses (here an encrypted page for a guest without SEV) ends the
    /// receive before the page writer sees it, and the source is told why.
    #[test]
    fn a_refused_chunk_ends_the_receive_and_the_source_is_told_why() {
        let encrypted = crate::protocol::chunk::PageContent::Encrypted {
            header: [0; veil_sev::crypto::PACKET_HEADER_BYTES],
            data: vec![0; 4096],
        };
        let failed = failed_receive(&fresh_ram(), None, &[one_page_chunk(encrypted)]);
        assert!(
            matches!(
                failed.0,
                ReceiveError::Session(SessionError::EncryptedForPlainGuest)
            ),
            "{:?}",
            failed.0
        );
        let Message::Error { reason } = failed.1 else {
            panic!("the source was told {:?}", failed.1)
        };
        assert!(
            reason.contains("Encrypted page for a guest without SEV"),
            "{reason}"
        );
    }

    /// An error in the page writer (here: an SEV guest, and no firmware to receive it with)
    /// ends the receive with that error, and the source is told it.
    #[test]
    fn the_page_writers_error_ends_the_receive_and_reaches_the_source() {
        use sev::parser::Encoder;
        let ram = fresh_ram();
        let identity = veil_sev::emulated::identity::PlatformIdentity::generate().unwrap();
        let mut pdh = Vec::new();
        identity.pdh().encode(&mut pdh, ()).unwrap();
        let start = crate::protocol::SevStart {
            pdh,
            ..crate::protocol::messages::tests::sev_start()
        };
        // The connection's thread sees the writer gone when it next hands it something.
        let (failed, told) = failed_receive(
            &ram,
            Some(identity.chain_bytes()),
            &[Message::SevStart(start), Message::Sync],
        );
        assert!(matches!(failed, ReceiveError::Sev), "{failed:?}");
        let Message::Error { reason } = told else {
            panic!("the source was told {told:?}")
        };
        assert!(reason.contains("without an SEV session"), "{reason}");
    }

    /// Pages that cannot be backed (here: a memory file cut short under the mapping, as a
    /// full filesystem would leave it) fail the receive with a reason, and the source hears
    /// it; the copy into them would have killed the process with SIGBUS.
    #[test]
    fn pages_the_host_cannot_back_fail_the_receive_instead_of_killing_it() {
        let path = std::env::temp_dir().join(format!("veil-unbacked-{}", std::process::id()));
        let ram = GuestRam::new(&MemoryConfig {
            size: 16 << 20,
            file: Some(path.clone()),
        })
        .unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        let page = crate::protocol::chunk::PageContent::Plain(Box::new([3; 4096]));
        let (failed, told) = failed_receive(&ram, None, &[one_page_chunk(page), Message::Sync]);
        drop(ram);
        let _ = std::fs::remove_file(&path);
        assert!(
            matches!(
                failed,
                ReceiveError::Unbacked {
                    first: 7,
                    end: 8,
                    ..
                }
            ),
            "{failed:?}"
        );
        let Message::Error { reason } = told else {
            panic!("the source was told {told:?}")
        };
        assert!(
            reason.contains("Cannot back guest pages 0x7..0x8"),
            "{reason}"
        );
    }

    #[test]
    fn a_zero_page_is_written_only_where_the_page_is_not_zero_already() {
        // File-backed, so the file's holes show which pages were ever written.
        let path = std::env::temp_dir().join(format!("veil-zero-page-{}", std::process::id()));
        let ram = GuestRam::new(&MemoryConfig {
            size: 16 << 20,
            file: Some(path.clone()),
        })
        .unwrap();
        let memory = ram.memory();
        memory
            .write_obj(0xabu8, GuestAddress(5 * PAGE_SIZE + 100))
            .unwrap();
        let mut scratch = vec![0u8; PAGE_SIZE as usize];
        write_zero_page(memory, GuestAddress(4 * PAGE_SIZE), &mut scratch).unwrap();
        write_zero_page(memory, GuestAddress(5 * PAGE_SIZE), &mut scratch).unwrap();
        let byte: u8 = memory.read_obj(GuestAddress(5 * PAGE_SIZE + 100)).unwrap();
        assert_eq!(byte, 0, "the page that held data is zero now");
        // The fresh page was left alone: never written, so still a hole in the file.
        let file = std::fs::File::open(&path).unwrap();
        let data: Vec<(u64, u64)> = crate::holes::stretches(&file, 0, 16 << 20)
            .unwrap()
            .into_iter()
            .filter(|s| !s.zero)
            .map(|s| (s.pages.start, s.pages.end))
            .collect();
        assert_eq!(data, [(5, 6)], "only the page that held data was written");
        drop(ram);
        let _ = std::fs::remove_file(&path);
    }
}
