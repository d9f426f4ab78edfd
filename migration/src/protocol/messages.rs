//! The messages and their payload layouts (all integers little-endian).
//!
//! Payloads are explicit binary fields, decoded through a cursor that checks every length
//! and count against [`limits`](super::limits) before allocating, and refuses trailing
//! bytes. Memory chunks have their own module, [`chunk`](super::chunk).

use veil_sev::crypto::SESSION_BYTES;
use veil_sev::policy::GuestPolicy;

use super::chunk::MemoryChunk;
use super::limits::{
    MAX_CHUNK_BYTES, MAX_CPUID_ENTRIES, MAX_HANDSHAKE_BYTES, MAX_REASON_BYTES, MAX_REGIONS,
    MAX_SEV_CHAIN_BYTES, MAX_STATE_BYTES, SEV_CERT_BYTES, SEV_START_BYTES,
};
use super::recovery::{MigrationId, RecoveryOutcome};
use super::shape::{CpuidEntry, MemoryRegion, SevPlatform, SevShape, ShapeError, VmShape};
use super::streams::{StreamToken, Streams};
use super::wire::{self, put_bytes, put_u16, put_u32, put_u64, put_u8, Cursor};

/// A payload that cannot be decoded, or a message that cannot be encoded.
#[derive(Debug, thiserror::Error)]
pub enum MessageError {
    #[error("Payload ends inside {field}")]
    Truncated { field: &'static str },
    #[error("{count} unexpected bytes after the end of the payload")]
    TrailingBytes { count: usize },
    #[error("Invalid {field}: {value}")]
    InvalidValue { field: &'static str, value: u64 },
    #[error("{count} {what}, at most {limit}")]
    TooMany {
        what: &'static str,
        count: u64,
        limit: u64,
    },
    #[error("{what} of {len} bytes, at most {limit}")]
    TooLong {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error("{what} of {len} bytes, must be exactly {expected}")]
    WrongLength {
        what: &'static str,
        len: usize,
        expected: usize,
    },
    #[error("{field} is not UTF-8")]
    NotUtf8 {
        field: &'static str,
        #[source]
        source: std::str::Utf8Error,
    },
    #[error("Invalid VM shape")]
    Shape(#[source] ShapeError),
    #[error("A chunk holds its plain pages' bodies or has them sent after it, not both")]
    MixedBodies,
}

/// The message types, as numbered in the frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum MessageType {
    Hello = 1,
    HelloReply = 2,
    SevStart = 3,
    MemoryChunk = 4,
    State = 5,
    Complete = 6,
    Ack = 7,
    Error = 8,
    Cancel = 9,
    Sync = 10,
    Synced = 11,
    Running = 12,
    Recover = 13,
    Recovered = 14,
    Adopt = 15,
    Streams = 16,
    Join = 17,
}

impl MessageType {
    /// The type with header code `code`, if there is one.
    pub fn from_code(code: u16) -> Option<Self> {
        use MessageType::*;
        [
            Hello,
            HelloReply,
            SevStart,
            MemoryChunk,
            State,
            Complete,
            Ack,
            Error,
            Cancel,
            Sync,
            Synced,
            Running,
            Recover,
            Recovered,
            Adopt,
            Streams,
            Join,
        ]
        .into_iter()
        .find(|t| *t as u16 == code)
    }

    /// The largest payload this type may declare.
    pub fn max_payload(self) -> u64 {
        match self {
            MessageType::Hello | MessageType::HelloReply => MAX_HANDSHAKE_BYTES,
            MessageType::SevStart => SEV_START_BYTES,
            MessageType::MemoryChunk => MAX_CHUNK_BYTES,
            MessageType::State => MAX_STATE_BYTES,
            MessageType::Complete
            | MessageType::Ack
            | MessageType::Sync
            | MessageType::Synced
            | MessageType::Running => 0,
            MessageType::Recover | MessageType::Adopt => MigrationId::BYTES as u64,
            MessageType::Recovered => 1,
            MessageType::Streams => 2 + StreamToken::BYTES as u64,
            MessageType::Join => StreamToken::BYTES as u64,
            MessageType::Error | MessageType::Cancel => MAX_REASON_BYTES as u64,
        }
    }

    /// Error and Cancel keep one layout in every protocol version, so a peer can always
    /// read why the other side stopped.
    pub fn is_version_independent(self) -> bool {
        matches!(self, MessageType::Error | MessageType::Cancel)
    }
}

impl std::fmt::Display for MessageType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

/// Optional protocol capabilities, offered in Hello and agreed in HelloReply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Features(u64);

impl Features {
    pub const NONE: Features = Features(0);
    /// Pages of zeros may travel as [`PageContent::Zero`](super::chunk::PageContent::Zero).
    pub const ZERO_PAGES: Features = Features(1 << 0);
    /// The source may ask the target to confirm it has applied everything sent so far
    /// (Sync, Synced), so pausing the guest does not wait on a backlog.
    pub const SYNC: Features = Features(1 << 1);
    /// The target confirms with Running that it runs the guest after Complete, and answers a
    /// [`Recover`](Message::Recover) query about the migration on a new connection.
    pub const RECOVERY: Features = Features(1 << 2);
    /// The source may spread pages over further connections, declared with
    /// [`Streams`](Message::Streams) and opened with [`Join`](Message::Join); see
    /// [`streams`](super::streams).
    pub const STREAMS: Features = Features(1 << 3);
    /// Every feature this implementation knows.
    pub const KNOWN: Features =
        Features(Self::ZERO_PAGES.0 | Self::SYNC.0 | Self::RECOVERY.0 | Self::STREAMS.0);

    /// Any bits, including ones this side does not know (a newer peer's).
    pub const fn from_bits(bits: u64) -> Self {
        Features(bits)
    }

    pub const fn bits(self) -> u64 {
        self.0
    }

    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn intersection(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }

    pub const fn union(self, other: Features) -> Features {
        Features(self.0 | other.0)
    }
}

/// The source's opening: who it is and what it wants to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    /// The protocol version the source speaks (the frame header's, repeated so the
    /// handshake is self-describing).
    pub protocol_version: u16,
    /// What the source offers.
    pub features: Features,
    pub vm: VmShape,
}

/// The target's answer to Hello.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HelloReply {
    pub accepted: bool,
    /// The features both will use: a subset of those offered.
    pub features: Features,
    /// Why the guest was refused (`None` when accepted).
    pub reason: Option<String>,
    /// The target platform's SEV certificate chain, for an accepted SEV guest only.
    pub sev_chain: Option<Vec<u8>>,
}

impl HelloReply {
    /// Accepts with `features`; `sev_chain` for an SEV guest.
    pub fn accept(features: Features, sev_chain: Option<Vec<u8>>) -> Self {
        Self {
            accepted: true,
            features,
            reason: None,
            sev_chain,
        }
    }

    /// Refuses with a reason (cut to [`MAX_REASON_BYTES`]).
    pub fn refuse(reason: impl Into<String>) -> Self {
        Self {
            accepted: false,
            features: Features::NONE,
            reason: Some(bounded_reason(reason.into())),
            sev_chain: None,
        }
    }
}

/// What the target needs for RECEIVE_START: the output of the source's SEND_START.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SevStart {
    pub policy: GuestPolicy,
    /// The source platform's PDH certificate, [`SEV_CERT_BYTES`] in SEV format.
    pub pdh: Vec<u8>,
    /// The wrapped transport keys.
    pub session: [u8; SESSION_BYTES],
}

/// The final state (vCPUs, devices, page-state map, migration control): opaque here, the
/// VM layer defines its content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub bytes: Vec<u8>,
}

/// One protocol message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Hello(Hello),
    HelloReply(HelloReply),
    SevStart(SevStart),
    MemoryChunk(MemoryChunk),
    State(State),
    /// Source: the guest has stopped here for good; run it.
    Complete,
    /// Target: everything is applied and the guest is ready, paused.
    Ack,
    /// Either side failed; the reason travels to the other.
    Error {
        reason: String,
    },
    /// Either side gave up deliberately (operator, timeout, the guest's migration control).
    Cancel {
        reason: String,
    },
    /// Source: confirm when everything sent before this has been applied.
    Sync,
    /// Target: everything before the Sync has been applied.
    Synced,
    /// Target, after Complete (feature `RECOVERY`): the guest runs here now.
    Running,
    /// Source, alone on a new connection: what became of the migration `id`? Sent only by
    /// a source left in doubt (Complete sent, Running never came); see [`super::recovery`].
    Recover(MigrationId),
    /// Target, in answer to Recover or Adopt.
    Recovered(RecoveryOutcome),
    /// Source, alone on a new connection, in doubt about migration `id` and unable or unwilling
    /// to resume the guest itself (an SEV guest after SEND_FINISH): run it there, as a late
    /// Complete would, unless it was discarded. See [`super::recovery`].
    Adopt(MigrationId),
    /// Source, first after an accepted HelloReply with `STREAMS`: how many connections the
    /// migration uses, and the token the others open with.
    Streams(Streams),
    /// Source, alone on a new connection: a data stream of the migration whose Streams
    /// carried this token.
    Join(StreamToken),
}

impl Message {
    /// An Error, the reason cut to [`MAX_REASON_BYTES`].
    pub fn error(reason: impl Into<String>) -> Self {
        Message::Error {
            reason: bounded_reason(reason.into()),
        }
    }

    /// A Cancel, the reason cut to [`MAX_REASON_BYTES`].
    pub fn cancel(reason: impl Into<String>) -> Self {
        Message::Cancel {
            reason: bounded_reason(reason.into()),
        }
    }

    pub fn kind(&self) -> MessageType {
        match self {
            Message::Hello(_) => MessageType::Hello,
            Message::HelloReply(_) => MessageType::HelloReply,
            Message::SevStart(_) => MessageType::SevStart,
            Message::MemoryChunk(_) => MessageType::MemoryChunk,
            Message::State(_) => MessageType::State,
            Message::Complete => MessageType::Complete,
            Message::Ack => MessageType::Ack,
            Message::Sync => MessageType::Sync,
            Message::Synced => MessageType::Synced,
            Message::Running => MessageType::Running,
            Message::Recover(_) => MessageType::Recover,
            Message::Recovered(_) => MessageType::Recovered,
            Message::Adopt(_) => MessageType::Adopt,
            Message::Streams(_) => MessageType::Streams,
            Message::Join(_) => MessageType::Join,
            Message::Error { .. } => MessageType::Error,
            Message::Cancel { .. } => MessageType::Cancel,
        }
    }

    /// Appends the payload to `out`, refusing what a peer would refuse.
    pub fn encode_payload(&self, out: &mut Vec<u8>) -> Result<(), MessageError> {
        let start = out.len();
        match self {
            Message::Hello(hello) => encode_hello(hello, out),
            Message::HelloReply(reply) => encode_reply(reply, out)?,
            Message::SevStart(start) => {
                check_length("PDH certificate", start.pdh.len(), SEV_CERT_BYTES)?;
                put_u32(out, start.policy.0);
                out.extend_from_slice(&start.pdh);
                out.extend_from_slice(&start.session);
            }
            Message::MemoryChunk(chunk) => chunk.encode(out)?,
            Message::State(state) => out.extend_from_slice(&state.bytes),
            Message::Complete
            | Message::Ack
            | Message::Sync
            | Message::Synced
            | Message::Running => {}
            Message::Recover(id) | Message::Adopt(id) => out.extend_from_slice(id.as_bytes()),
            Message::Recovered(outcome) => put_u8(out, outcome.code()),
            Message::Streams(streams) => {
                put_u16(out, streams.count);
                out.extend_from_slice(streams.token.as_bytes());
            }
            Message::Join(token) => out.extend_from_slice(token.as_bytes()),
            Message::Error { reason } | Message::Cancel { reason } => {
                out.extend_from_slice(reason.as_bytes())
            }
        }
        let len = (out.len() - start) as u64;
        let limit = self.kind().max_payload();
        if len > limit {
            out.truncate(start);
            return Err(MessageError::TooLong {
                what: "payload",
                len,
                limit,
            });
        }
        Ok(())
    }

    /// Decodes a payload of type `kind` (whose length the frame already bounded).
    pub fn decode(kind: MessageType, payload: &[u8]) -> Result<Self, MessageError> {
        let mut c = Cursor::new(payload);
        let message = match kind {
            MessageType::Hello => Message::Hello(decode_hello(&mut c)?),
            MessageType::HelloReply => Message::HelloReply(decode_reply(&mut c)?),
            MessageType::SevStart => {
                let policy = GuestPolicy(c.u32("policy")?);
                let pdh = c.take(SEV_CERT_BYTES, "PDH certificate")?.to_vec();
                let session = *c.array::<SESSION_BYTES>("session")?;
                Message::SevStart(SevStart {
                    policy,
                    pdh,
                    session,
                })
            }
            MessageType::MemoryChunk => {
                return MemoryChunk::decode(payload).map(Message::MemoryChunk)
            }
            MessageType::State => {
                let bytes = c.take(payload.len(), "state")?.to_vec();
                Message::State(State { bytes })
            }
            MessageType::Complete => Message::Complete,
            MessageType::Ack => Message::Ack,
            MessageType::Sync => Message::Sync,
            MessageType::Synced => Message::Synced,
            MessageType::Running => Message::Running,
            MessageType::Recover => {
                Message::Recover(MigrationId::from_bytes(*c.array("migration id")?))
            }
            MessageType::Adopt => {
                Message::Adopt(MigrationId::from_bytes(*c.array("migration id")?))
            }
            MessageType::Streams => Message::Streams(Streams {
                count: c.u16("stream count")?,
                token: StreamToken::from_bytes(*c.array("stream token")?),
            }),
            MessageType::Join => Message::Join(StreamToken::from_bytes(*c.array("stream token")?)),
            MessageType::Recovered => {
                let code = c.u8("outcome")?;
                Message::Recovered(RecoveryOutcome::from_code(code).ok_or(
                    MessageError::InvalidValue {
                        field: "outcome",
                        value: code.into(),
                    },
                )?)
            }
            MessageType::Error | MessageType::Cancel => {
                if payload.len() > MAX_REASON_BYTES {
                    return Err(MessageError::TooLong {
                        what: "reason",
                        len: payload.len() as u64,
                        limit: MAX_REASON_BYTES as u64,
                    });
                }
                let reason = wire::utf8(c.take(payload.len(), "reason")?, "reason")?;
                if kind == MessageType::Error {
                    Message::Error { reason }
                } else {
                    Message::Cancel { reason }
                }
            }
        };
        c.finish()?;
        Ok(message)
    }
}

/// Cuts a reason to [`MAX_REASON_BYTES`] at a character boundary.
pub fn bounded_reason(mut reason: String) -> String {
    if reason.len() > MAX_REASON_BYTES {
        let mut end = MAX_REASON_BYTES;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

fn check_length(what: &'static str, len: usize, expected: usize) -> Result<(), MessageError> {
    if len != expected {
        return Err(MessageError::WrongLength {
            what,
            len,
            expected,
        });
    }
    Ok(())
}

fn check_max(what: &'static str, len: usize, limit: usize) -> Result<(), MessageError> {
    if len > limit {
        return Err(MessageError::TooLong {
            what,
            len: len as u64,
            limit: limit as u64,
        });
    }
    Ok(())
}

// Hello: protocol_version u16 | features u64 | vcpus u32
//        | region_count u32 | (gpa u64, len u64) * region_count
//        | sev u8 (0 or 1) | [policy u32 | platform u8]
//        | cpuid_count u32 | (function, index, flags, eax, ebx, ecx, edx: u32) * cpuid_count
//        | tsc_khz u32 (0: unknown)

fn encode_hello(hello: &Hello, out: &mut Vec<u8>) {
    let vm = &hello.vm;
    put_u16(out, hello.protocol_version);
    put_u64(out, hello.features.bits());
    put_u32(out, vm.vcpus());
    // A VmShape is valid by construction: its counts are within the limits.
    put_u32(out, vm.memory().len() as u32);
    for region in vm.memory() {
        put_u64(out, region.gpa);
        put_u64(out, region.len);
    }
    match vm.sev() {
        None => put_u8(out, 0),
        Some(sev) => {
            put_u8(out, 1);
            put_u32(out, sev.policy.0);
            put_u8(out, sev.platform.code());
        }
    }
    put_u32(out, vm.cpuid().len() as u32);
    for e in vm.cpuid() {
        for v in [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] {
            put_u32(out, v);
        }
    }
    put_u32(out, vm.tsc_khz().unwrap_or(0));
}

fn decode_hello(c: &mut Cursor<'_>) -> Result<Hello, MessageError> {
    let protocol_version = c.u16("protocol version")?;
    let features = Features::from_bits(c.u64("features")?);
    let vcpus = c.u32("vCPU count")?;
    let regions = c.count("RAM regions", MAX_REGIONS)?;
    let mut memory = Vec::with_capacity(regions);
    for _ in 0..regions {
        memory.push(MemoryRegion {
            gpa: c.u64("region address")?,
            len: c.u64("region length")?,
        });
    }
    let sev = if c.bool("SEV flag")? {
        let policy = GuestPolicy(c.u32("SEV policy")?);
        let code = c.u8("SEV platform")?;
        let platform = SevPlatform::from_code(code).ok_or(MessageError::InvalidValue {
            field: "SEV platform",
            value: code.into(),
        })?;
        Some(SevShape { policy, platform })
    } else {
        None
    };
    let entries = c.count("CPUID entries", MAX_CPUID_ENTRIES)?;
    let mut cpuid = Vec::with_capacity(entries);
    for _ in 0..entries {
        cpuid.push(CpuidEntry {
            function: c.u32("CPUID function")?,
            index: c.u32("CPUID index")?,
            flags: c.u32("CPUID flags")?,
            eax: c.u32("CPUID eax")?,
            ebx: c.u32("CPUID ebx")?,
            ecx: c.u32("CPUID ecx")?,
            edx: c.u32("CPUID edx")?,
        });
    }
    let tsc_khz = c.u32("TSC rate")?;
    let vm = VmShape::new(memory, vcpus, sev, cpuid)
        .map_err(MessageError::Shape)?
        .with_tsc_khz(Some(tsc_khz));
    Ok(Hello {
        protocol_version,
        features,
        vm,
    })
}

// HelloReply: accepted u8 | features u64
//             | has_reason u8 | [len u32 | UTF-8]
//             | has_chain u8 | [len u32 | bytes]

fn encode_reply(reply: &HelloReply, out: &mut Vec<u8>) -> Result<(), MessageError> {
    put_u8(out, reply.accepted.into());
    put_u64(out, reply.features.bits());
    match &reply.reason {
        None => put_u8(out, 0),
        Some(reason) => {
            check_max("reason", reason.len(), MAX_REASON_BYTES)?;
            put_u8(out, 1);
            put_bytes(out, reason.as_bytes());
        }
    }
    match &reply.sev_chain {
        None => put_u8(out, 0),
        Some(chain) => {
            check_max("SEV certificate chain", chain.len(), MAX_SEV_CHAIN_BYTES)?;
            put_u8(out, 1);
            put_bytes(out, chain);
        }
    }
    Ok(())
}

fn decode_reply(c: &mut Cursor<'_>) -> Result<HelloReply, MessageError> {
    let accepted = c.bool("accepted")?;
    let features = Features::from_bits(c.u64("features")?);
    let reason = if c.bool("reason flag")? {
        Some(c.text("reason", MAX_REASON_BYTES)?)
    } else {
        None
    };
    let sev_chain = if c.bool("chain flag")? {
        Some(
            c.bytes("SEV certificate chain", MAX_SEV_CHAIN_BYTES)?
                .to_vec(),
        )
    } else {
        None
    };
    Ok(HelloReply {
        accepted,
        features,
        reason,
        sev_chain,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::protocol::shape::tests::two_region_shape;
    use crate::protocol::PROTOCOL_VERSION;

    pub(crate) fn sev_shape() -> SevShape {
        SevShape {
            policy: GuestPolicy(GuestPolicy::NODBG),
            platform: SevPlatform::Emulated,
        }
    }

    pub(crate) fn hello(sev: bool) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            features: Features::KNOWN,
            // The TSC rate travels only in the SEV fixture: both encodings are round-tripped.
            vm: two_region_shape(sev.then(sev_shape)).with_tsc_khz(sev.then_some(2_600_000)),
        }
    }

    pub(crate) fn sev_start() -> SevStart {
        SevStart {
            policy: sev_shape().policy,
            pdh: (0..SEV_CERT_BYTES).map(|i| i as u8).collect(),
            session: [0x5a; SESSION_BYTES],
        }
    }

    fn round_trip(message: &Message) -> Message {
        let mut payload = Vec::new();
        message.encode_payload(&mut payload).unwrap();
        assert!(payload.len() as u64 <= message.kind().max_payload());
        Message::decode(message.kind(), &payload).unwrap()
    }

    #[test]
    fn every_small_message_round_trips() {
        let messages = [
            Message::Hello(hello(false)),
            Message::Hello(hello(true)),
            Message::HelloReply(HelloReply::accept(Features::ZERO_PAGES, None)),
            Message::HelloReply(HelloReply::accept(Features::NONE, Some(vec![7; 12_000]))),
            Message::HelloReply(HelloReply::refuse("No SEV on this host")),
            Message::SevStart(sev_start()),
            Message::State(State {
                bytes: b"{\"vcpus\":[]}".to_vec(),
            }),
            Message::State(State { bytes: vec![] }),
            Message::Complete,
            Message::Ack,
            Message::Sync,
            Message::Synced,
            Message::Running,
            Message::Recover(MigrationId::of_state(b"{}")),
            Message::Adopt(MigrationId::of_state(b"{}")),
            Message::Recovered(RecoveryOutcome::Discarded),
            Message::Recovered(RecoveryOutcome::Running),
            Message::Recovered(RecoveryOutcome::Unknown),
            Message::Streams(Streams {
                count: 4,
                token: StreamToken::from_bytes([0xa5; StreamToken::BYTES]),
            }),
            Message::Join(StreamToken::from_bytes([0x3c; StreamToken::BYTES])),
            Message::error("RECEIVE_UPDATE_DATA: bad MAC on page 0x1234"),
            Message::cancel("Cancelled by the operator"),
            Message::error(""),
        ];
        for m in messages {
            assert_eq!(round_trip(&m), m, "{}", m.kind());
        }
    }

    #[test]
    fn the_largest_state_and_reasons_round_trip() {
        let state = Message::State(State {
            bytes: vec![0xee; MAX_STATE_BYTES as usize],
        });
        assert_eq!(round_trip(&state), state);
        let reason = Message::error("é".repeat(MAX_REASON_BYTES));
        let Message::Error { reason: cut } = &reason else {
            unreachable!()
        };
        assert_eq!(cut.len(), MAX_REASON_BYTES);
        assert_eq!(round_trip(&reason), reason);
        let odd = Message::cancel(format!("x{}", "é".repeat(MAX_REASON_BYTES)));
        let Message::Cancel { reason: cut } = &odd else {
            unreachable!()
        };
        assert_eq!(
            cut.len(),
            MAX_REASON_BYTES - 1,
            "cut at a character boundary"
        );
    }

    #[test]
    fn oversized_messages_are_not_encoded() {
        let mut out = vec![1, 2, 3];
        let state = Message::State(State {
            bytes: vec![0; MAX_STATE_BYTES as usize + 1],
        });
        assert!(matches!(
            state.encode_payload(&mut out),
            Err(MessageError::TooLong { .. })
        ));
        assert_eq!(out, [1, 2, 3], "nothing half-written");
        let long = Message::Error {
            reason: "x".repeat(MAX_REASON_BYTES + 1),
        };
        assert!(long.encode_payload(&mut out).is_err());
        let mut bad = sev_start();
        bad.pdh.pop();
        assert!(matches!(
            Message::SevStart(bad).encode_payload(&mut out),
            Err(MessageError::WrongLength { .. })
        ));
        let chain = HelloReply::accept(Features::NONE, Some(vec![0; MAX_SEV_CHAIN_BYTES + 1]));
        assert!(Message::HelloReply(chain).encode_payload(&mut out).is_err());
    }

    #[test]
    fn malformed_payloads_are_typed_errors() {
        let payload = |m: &Message| {
            let mut out = Vec::new();
            m.encode_payload(&mut out).unwrap();
            out
        };
        // Every strict prefix of a Hello is truncated.
        let bytes = payload(&Message::Hello(hello(true)));
        for n in 0..bytes.len() {
            assert!(
                matches!(
                    Message::decode(MessageType::Hello, &bytes[..n]),
                    Err(MessageError::Truncated { .. })
                ),
                "prefix {n}"
            );
        }
        // One byte more is trailing.
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            Message::decode(MessageType::Hello, &long),
            Err(MessageError::TrailingBytes { count: 1 })
        ));
        // A flag byte other than 0 or 1.
        let mut reply = payload(&Message::HelloReply(HelloReply::refuse("no")));
        reply[0] = 2;
        assert!(matches!(
            Message::decode(MessageType::HelloReply, &reply),
            Err(MessageError::InvalidValue {
                field: "accepted",
                ..
            })
        ));
        // An unknown SEV platform (the byte after the SEV flag and policy).
        let mut sev = bytes.clone();
        let platform_at = 2 + 8 + 4 + 4 + 2 * 16 + 1 + 4;
        assert_eq!(sev[platform_at], SevPlatform::Emulated.code());
        sev[platform_at] = 9;
        assert!(matches!(
            Message::decode(MessageType::Hello, &sev),
            Err(MessageError::InvalidValue {
                field: "SEV platform",
                value: 9
            })
        ));
        // A shape that cannot be: zero vCPUs.
        let mut zero = bytes.clone();
        zero[10..14].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(
            Message::decode(MessageType::Hello, &zero),
            Err(MessageError::Shape(ShapeError::BadVcpuCount { count: 0 }))
        ));
        // A region count far beyond the limit is refused before anything is allocated.
        let mut many = bytes;
        many[14..18].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Message::decode(MessageType::Hello, &many),
            Err(MessageError::TooMany {
                what: "RAM regions",
                ..
            })
        ));
        // Reasons must be UTF-8; Complete and Ack carry nothing.
        assert!(matches!(
            Message::decode(MessageType::Error, &[0xff, 0xfe]),
            Err(MessageError::NotUtf8 { .. })
        ));
        assert!(matches!(
            Message::decode(MessageType::Ack, &[0]),
            Err(MessageError::TrailingBytes { count: 1 })
        ));
        assert!(matches!(
            Message::decode(MessageType::SevStart, &[0; SEV_START_BYTES as usize - 1]),
            Err(MessageError::Truncated { .. })
        ));
    }

    #[test]
    fn message_types_map_to_codes_and_back() {
        for code in 0..=u16::MAX {
            if let Some(t) = MessageType::from_code(code) {
                assert_eq!(t as u16, code);
            }
        }
        assert_eq!(MessageType::from_code(0), None);
        assert_eq!(MessageType::from_code(18), None);
        assert_eq!(MessageType::from_code(17), Some(MessageType::Join));
        assert_eq!(MessageType::from_code(16), Some(MessageType::Streams));
        assert_eq!(MessageType::from_code(15), Some(MessageType::Adopt));
        assert_eq!(MessageType::from_code(14), Some(MessageType::Recovered));
        assert_eq!(MessageType::from_code(11), Some(MessageType::Synced));
        assert_eq!(MessageType::from_code(9), Some(MessageType::Cancel));
    }

    #[test]
    fn features_combine_as_sets() {
        let offered = Features::from_bits(Features::ZERO_PAGES.bits() | 1 << 40);
        assert!(offered.contains(Features::ZERO_PAGES));
        assert_eq!(offered.intersection(Features::KNOWN), Features::ZERO_PAGES);
        assert!(!Features::NONE.contains(Features::ZERO_PAGES));
        assert_eq!(
            Features::NONE.union(Features::ZERO_PAGES),
            Features::ZERO_PAGES
        );
    }
}
