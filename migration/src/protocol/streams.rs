//! Parallel streams (feature `STREAMS`): a migration's pages spread over several connections,
//! each with its own TLS session, so that encryption, checksums and copies run on as many
//! cores as there are streams.
//!
//! ```text
//!  control connection (the one that said Hello)            each further connection
//!  HelloReply { features ∋ STREAMS } ◀────
//!  Streams { count, token } ────▶                          Join { token } ────▶
//!  MemoryChunk ... (stream 0's pages)                      MemoryChunk ... (its pages)
//!  Sync ────▶ (once every stream has marked)               Sync ────▶ (a mark: all before
//!                                                                      it was sent)
//!  State ────▶ (once every stream has marked)              Sync ────▶ (its last frame)
//! ```
//!
//! Pages are dealt out by 2 MiB block ([`stream_of`]), so a page always travels on the same
//! stream and a later copy can never overtake an earlier one. The control stream carries its
//! share of the pages too. A data stream carries only memory chunks of clear pages, marks,
//! and a reason to stop; the target says nothing on it but an Error. An SEV guest's pages go
//! through its firmware context one at a time, so it migrates over one stream.

use super::chunk::{ChunkIndex, EntryRef};
use super::limits::MAX_STREAMS;
use super::messages::{Features, Message};
use super::session::SessionError;
use super::shape::VmShape;

/// What ties a further connection to its migration: 128 random bits the source sends on the
/// control connection (confidential under TLS) and repeats in each Join.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StreamToken([u8; StreamToken::BYTES]);

impl StreamToken {
    pub const BYTES: usize = 16;

    /// A new token from the kernel's random source.
    pub fn random() -> std::io::Result<Self> {
        let mut bytes = [0; Self::BYTES];
        getrandom::getrandom(&mut bytes).map_err(std::io::Error::from)?;
        Ok(Self(bytes))
    }

    pub const fn from_bytes(bytes: [u8; Self::BYTES]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; Self::BYTES] {
        &self.0
    }
}

impl std::fmt::Debug for StreamToken {
    /// Never the bits: whoever holds them may join the migration.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamToken(..)")
    }
}

/// The source's declaration, first on the control connection after an accepted HelloReply
/// with `STREAMS`: the migration uses `count` connections, this one included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Streams {
    pub count: u16,
    pub token: StreamToken,
}

impl Streams {
    /// Checks `count` against the limit and the guest: an SEV guest has one stream.
    pub(crate) fn check(count: u16, sev: bool) -> Result<(), SessionError> {
        if count == 0 || usize::from(count) > MAX_STREAMS {
            return Err(SessionError::BadStreamCount { count });
        }
        if sev && count > 1 {
            return Err(SessionError::StreamsForSev { count });
        }
        Ok(())
    }
}

/// Guest pages per block dealt to one stream: 2 MiB, a huge page.
pub const BLOCK_PAGES: u64 = 512;

/// The stream (of `count`) that carries page `gfn`.
pub fn stream_of(gfn: u64, count: usize) -> usize {
    ((gfn / BLOCK_PAGES) % count.max(1) as u64) as usize
}

/// What the target does with a frame from a data stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DataAction {
    /// Write the chunk (checked against the VM).
    WritePages,
    /// Everything before this was sent on this stream: report it to the control stream.
    Mark,
    /// The source ended the migration.
    Discard { cancelled: bool, reason: String },
}

/// The order on one data stream, at the target: chunks of clear pages that fit the VM, marks,
/// and an end.
#[derive(Debug, Clone)]
pub struct DataStreamSession {
    vm: VmShape,
    agreed: Features,
    over: bool,
}

impl DataStreamSession {
    /// For a migration of `vm` with `agreed` features.
    pub fn new(vm: VmShape, agreed: Features) -> Self {
        Self {
            vm,
            agreed,
            over: false,
        }
    }

    /// A memory chunk's index, borrowed from the frame it was read into (the bodies of its
    /// plain pages may still be on the stream).
    pub fn on_memory_chunk(&mut self, chunk: &ChunkIndex<'_>) -> Result<DataAction, SessionError> {
        self.open(super::MessageType::MemoryChunk)?;
        let checked = self.check_chunk(chunk);
        self.over |= checked.is_err();
        checked.map(|()| DataAction::WritePages)
    }

    fn check_chunk(&self, index: &ChunkIndex<'_>) -> Result<(), SessionError> {
        index.validate(&self.vm).map_err(SessionError::Chunk)?;
        for entry in index.entries() {
            match entry.entry {
                EntryRef::Encrypted { .. } => return Err(SessionError::EncryptedOnDataStream),
                EntryRef::Zero if !self.agreed.contains(Features::ZERO_PAGES) => {
                    return Err(SessionError::ZeroPagesNotAgreed)
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Any other message: a mark (Sync) or the source's reason to stop.
    pub fn on_message(&mut self, m: &Message) -> Result<DataAction, SessionError> {
        self.open(m.kind())?;
        let action = match m {
            Message::Sync => DataAction::Mark,
            Message::Error { reason } => DataAction::Discard {
                cancelled: false,
                reason: reason.clone(),
            },
            Message::Cancel { reason } => DataAction::Discard {
                cancelled: true,
                reason: reason.clone(),
            },
            other => {
                self.over = true;
                return Err(SessionError::OnDataStream { kind: other.kind() });
            }
        };
        self.over |= matches!(action, DataAction::Discard { .. });
        Ok(action)
    }

    fn open(&self, kind: super::MessageType) -> Result<(), SessionError> {
        if self.over {
            return Err(SessionError::Ended { kind });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::chunk::tests::{encrypted, plain, zero};
    use crate::protocol::chunk::MemoryChunk;
    use crate::protocol::messages::tests::hello;

    fn parse_and<T>(pages: Vec<crate::protocol::Page>, f: impl FnOnce(&ChunkIndex) -> T) -> T {
        let mut payload = Vec::new();
        MemoryChunk { pages }.encode(&mut payload).unwrap();
        f(crate::protocol::MemoryChunkRef::parse(&payload)
            .unwrap()
            .index())
    }

    #[test]
    fn blocks_of_2_mib_take_turns() {
        assert_eq!(stream_of(0, 3), 0);
        assert_eq!(stream_of(511, 3), 0);
        assert_eq!(stream_of(512, 3), 1);
        assert_eq!(stream_of(1024, 3), 2);
        assert_eq!(stream_of(1536, 3), 0);
        assert_eq!(stream_of(u64::MAX, 1), 0);
        assert_eq!(stream_of(7, 0), 0, "no streams means the control stream");
    }

    #[test]
    fn counts_are_bounded_and_sev_has_one_stream() {
        assert!(Streams::check(1, false).is_ok());
        assert!(Streams::check(MAX_STREAMS as u16, false).is_ok());
        assert_eq!(
            Streams::check(0, false),
            Err(SessionError::BadStreamCount { count: 0 })
        );
        assert_eq!(
            Streams::check(MAX_STREAMS as u16 + 1, false),
            Err(SessionError::BadStreamCount {
                count: MAX_STREAMS as u16 + 1
            })
        );
        assert!(Streams::check(1, true).is_ok());
        assert_eq!(
            Streams::check(2, true),
            Err(SessionError::StreamsForSev { count: 2 })
        );
    }

    #[test]
    fn a_data_stream_takes_clear_chunks_marks_and_an_end() {
        let vm = hello(false).vm;
        let mut session = DataStreamSession::new(vm.clone(), Features::ZERO_PAGES);
        let ok = parse_and(vec![plain(1, 7), zero(2)], |c| session.on_memory_chunk(c));
        assert_eq!(ok, Ok(DataAction::WritePages));
        assert_eq!(session.on_message(&Message::Sync), Ok(DataAction::Mark));
        assert_eq!(
            session.on_message(&Message::cancel("operator")),
            Ok(DataAction::Discard {
                cancelled: true,
                reason: "operator".into()
            })
        );
        assert_eq!(
            session.on_message(&Message::Sync),
            Err(SessionError::Ended {
                kind: crate::protocol::MessageType::Sync
            }),
            "nothing after the end"
        );

        // Zero pages only when agreed; never an encrypted page; nothing outside RAM.
        let mut bare = DataStreamSession::new(vm.clone(), Features::NONE);
        let refused = parse_and(vec![zero(2)], |c| bare.on_memory_chunk(c));
        assert_eq!(refused, Err(SessionError::ZeroPagesNotAgreed));
        let mut sev = DataStreamSession::new(vm.clone(), Features::KNOWN);
        let refused = parse_and(vec![encrypted(3, 64)], |c| sev.on_memory_chunk(c));
        assert_eq!(refused, Err(SessionError::EncryptedOnDataStream));
        let mut outside = DataStreamSession::new(vm.clone(), Features::KNOWN);
        let refused = parse_and(vec![plain(1 << 40, 0)], |c| outside.on_memory_chunk(c));
        assert!(matches!(refused, Err(SessionError::Chunk(_))));
        let after = parse_and(vec![plain(1, 0)], |c| outside.on_memory_chunk(c));
        assert!(
            matches!(after, Err(SessionError::Ended { .. })),
            "a refused chunk ends the stream"
        );

        // The control stream's messages do not belong here.
        let mut session = DataStreamSession::new(vm, Features::KNOWN);
        assert_eq!(
            session.on_message(&Message::Complete),
            Err(SessionError::OnDataStream {
                kind: crate::protocol::MessageType::Complete
            })
        );
    }
}
