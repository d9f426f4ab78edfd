//! # The Veil migration protocol
//!
//! One stream from the source host to the target host, over a transport that has already
//! authenticated the peer (mutual TLS, or a UNIX socket): frames of a fixed 24-byte header
//! (`magic "VEIL" | version u16 | type u16 | length u64 | checksum u32 | reserved u32`,
//! little-endian, see [`frame`]) and a payload whose length is checked against the type's
//! limit ([`limits`]) before anything is allocated. The checksum, a CRC-32 of the whole frame,
//! is checked before a payload is decoded. `docs/migration.md` is the written specification.
//!
//! ## The exchange
//!
//! ```text
//!  Source (sends the guest)                                 Target (receives it)
//!  ========================                                 ====================
//!        ─ ─ ─ transport connected, peer authenticated (mutual TLS / UNIX) ─ ─ ─
//!
//!  Hello { version, features, VmShape } ──────────────────▶ check version, features, RAM,
//!                                                            vCPUs, CPUID, SEV policy;
//!                                                            nothing applied yet
//!      ◀──────────────── HelloReply { accepted, features, reason, sev_chain }
//!  refused: the guest stays here;                            refused: the session ends
//!  both sides print the reason
//!
//!  [SEV] verify sev_chain against trusted roots; SEND_START
//!  [SEV] SevStart { policy, pdh, session } ───────────────▶ RECEIVE_START
//!
//!  pre-copy: all RAM, then dirty passes
//!  MemoryChunk { gfn, Zero | Plain | Encrypted } ... ─────▶ check every gfn against the
//!                                                            VmShape, then write Zero and
//!                                                            Plain pages; Encrypted ones go
//!                                                            through RECEIVE_UPDATE_DATA
//!  stop-and-copy: pause vCPUs, check migration control
//!  MemoryChunk ... (last dirty pages) ────────────────────▶
//!  State { vCPUs, devices, page-state map, control } ─────▶ apply it; RECEIVE_FINISH;
//!                                                            the guest is ready, paused
//!      ◀──────────────────────────────────────────────── Ack
//!  SEND_FINISH; the guest stops here for good
//!  Complete ──────────────────────────────────────────────▶ run the guest
//!      ◀──────────────────────────────────────────────── Running (feature RECOVERY)
//! ```
//!
//! ## Failures
//!
//! ```text
//!  at any point before Complete (source) or before Ack (target), either side may end it:
//!
//!  Error { reason } | Cancel { reason } ──────────────────▶ discard everything received;
//!                                                            print the reason
//!  SEND_CANCEL, resume the guest,  ◀──── Error { reason } | Cancel { reason }
//!  print the reason
//!
//!  the source watches the return path while it writes: a target's Error ends the
//!  migration within the chunk being written, even if the target keeps the link open.
//!  a message out of order, undecodable or over a limit: the reading side sends
//!  Error { what was wrong } and ends as above.
//!  link lost or peer silent: the target discards; the source resumes the guest unless it
//!  has already sent Complete (then the target may be running it: never in two places).
//!  after Ack the target sends nothing more but Running (feature RECOVERY) in answer to
//!  Complete; after that nobody does. A source that sent Complete and never got Running is
//!  in doubt: it keeps the guest stopped and may ask the target ([`recovery`]).
//! ```
//!
//! Error and Cancel keep the same frame layout in every version, so even a peer speaking
//! another version can read why it was turned away.
//!
//! ## Modules
//!
//! - [`frame`]: the header, [`read_frame`] / [`write_frame`] and a buffer-reusing
//!   [`FrameReader`].
//! - [`messages`]: [`Message`] and the small messages' payloads.
//! - [`chunk`]: memory chunks, the hot path: [`ChunkEncoder`] and [`MemoryChunkRef`] work on
//!   borrowed bytes.
//! - [`shape`]: the [`VmShape`] the handshake carries and chunks are checked against.
//! - [`session`]: the order, as pure state machines for each side.
//! - [`recovery`]: what a source left in doubt by a lost Complete may ask the target, and
//!   why the answer can be trusted.
//! - [`streams`]: a migration over several connections (feature `STREAMS`).
//! - [`limits`]: every bound a peer's numbers are held to.

pub mod chunk;
pub mod frame;
pub mod limits;
pub mod messages;
pub mod recovery;
pub mod session;
pub mod shape;
pub mod streams;
mod wire;

pub use chunk::{
    Arrived, ChunkEncoder, ChunkFrame, ChunkIndex, MemoryChunk, MemoryChunkRef, Page, PageContent,
    PageContentRef, PageRef,
};
pub use frame::{
    read_frame, write_frame, ChunkBodies, Frame, FrameHeader, FrameReader, ProtocolError, RawFrame,
};
pub use messages::{
    Features, Hello, HelloReply, Message, MessageError, MessageType, SevStart, State,
};
pub use recovery::{Fate, FateError, MigrationId, RecoveryOutcome};
pub use session::{
    Ending, ReceiverAction, ReceiverSession, SenderAction, SenderSession, SessionError, Side,
};
pub use shape::{CpuidEntry, MemoryRegion, SevPlatform, SevShape, ShapeError, VmShape};
pub use streams::{stream_of, DataAction, DataStreamSession, StreamToken, Streams};

/// The first four bytes of every frame: "VEIL" read as a little-endian `u32`.
pub const MAGIC: u32 = u32::from_le_bytes(*b"VEIL");

/// The protocol version this implementation speaks. Bumped for any change a peer of the
/// previous version would misread; additive capabilities are [`Features`] instead.
pub const PROTOCOL_VERSION: u16 = 3;
