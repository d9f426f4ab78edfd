//! Frames: a fixed 16-byte header, then the payload.
//!
//! ```text
//!  0               4       6       8                              16
//!  +---------------+-------+-------+-------------------------------+----------------
//!  | magic "VEIL"  |version| type  | payload length                | payload ...
//!  | u32 LE        | u16 LE| u16 LE| u64 LE                        | (length bytes)
//!  +---------------+-------+-------+-------------------------------+----------------
//! ```
//!
//! The reader checks the magic, the version, the type and the type's length limit before it
//! allocates anything for the payload, then reads exactly that many bytes and decodes them;
//! a stream that ends early is a typed truncation, never a panic.

use std::io::{self, Read, Write};

use super::limits::MAX_PAYLOAD_BYTES;
use super::messages::{Message, MessageError, MessageType};
use super::{MAGIC, PROTOCOL_VERSION};

/// Bytes of the frame header.
pub const HEADER_BYTES: usize = 16;

/// A migration stream that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("The peer closed the migration stream")]
    Closed,
    #[error("Migration stream I/O failed")]
    Io(#[source] io::Error),
    #[error("Not a Veil migration stream (magic {found:#010x})")]
    BadMagic { found: u32 },
    #[error("Unsupported protocol version {version} (this host speaks {PROTOCOL_VERSION})")]
    UnsupportedVersion { version: u16 },
    #[error("Unknown message type {code}")]
    UnknownMessage { code: u16 },
    #[error("{kind} of {length} bytes exceeds the limit of {limit}")]
    TooLarge {
        kind: MessageType,
        length: u64,
        limit: u64,
    },
    #[error("The stream ended inside a frame header ({got} of {HEADER_BYTES} bytes)")]
    TruncatedHeader { got: usize },
    #[error("The stream ended inside a {kind} ({got} of {expected} bytes)")]
    TruncatedPayload {
        kind: MessageType,
        expected: u64,
        got: u64,
    },
    #[error("Invalid {kind}")]
    Payload {
        kind: MessageType,
        #[source]
        source: MessageError,
    },
    #[error("Cannot encode {kind}")]
    Encode {
        kind: MessageType,
        #[source]
        source: MessageError,
    },
}

/// A checked frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    pub version: u16,
    pub kind: MessageType,
    /// Payload bytes, within the type's limit.
    pub length: u64,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0; HEADER_BYTES];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        out[8..16].copy_from_slice(&self.length.to_le_bytes());
        out
    }

    /// Checks magic, version, type and length limit, in that order. Error and Cancel
    /// frames of any version pass: their layout never changes, so a refusal stays readable.
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<Self, ProtocolError> {
        let [m0, m1, m2, m3, v0, v1, t0, t1, l @ ..] = *bytes;
        let magic = u32::from_le_bytes([m0, m1, m2, m3]);
        let version = u16::from_le_bytes([v0, v1]);
        let code = u16::from_le_bytes([t0, t1]);
        let length = u64::from_le_bytes(l);
        if magic != MAGIC {
            return Err(ProtocolError::BadMagic { found: magic });
        }
        let kind = MessageType::from_code(code);
        if version != PROTOCOL_VERSION && !kind.is_some_and(MessageType::is_version_independent) {
            return Err(ProtocolError::UnsupportedVersion { version });
        }
        let kind = kind.ok_or(ProtocolError::UnknownMessage { code })?;
        let limit = kind.max_payload();
        if length > limit {
            return Err(ProtocolError::TooLarge {
                kind,
                length,
                limit,
            });
        }
        Ok(Self {
            version,
            kind,
            length,
        })
    }
}

/// A decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The version the peer wrote it in (not ours only for Error and Cancel).
    pub version: u16,
    pub message: Message,
}

/// A frame whose payload is still raw bytes, borrowed from a [`FrameReader`].
#[derive(Debug, Clone, Copy)]
pub struct RawFrame<'a> {
    pub header: FrameHeader,
    pub payload: &'a [u8],
}

impl RawFrame<'_> {
    /// Decodes the payload into an owned message.
    pub fn decode(&self) -> Result<Frame, ProtocolError> {
        let kind = self.header.kind;
        let message = Message::decode(kind, self.payload)
            .map_err(|source| ProtocolError::Payload { kind, source })?;
        Ok(Frame {
            version: self.header.version,
            message,
        })
    }
}

/// Reads frames into one reusable buffer, which never grows beyond the largest payload
/// limit ([`MAX_PAYLOAD_BYTES`]).
#[derive(Debug, Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads one frame's header and payload; the payload is valid until the next read.
    pub fn read<'a>(&'a mut self, r: &mut impl Read) -> Result<RawFrame<'a>, ProtocolError> {
        let mut header = [0; HEADER_BYTES];
        match read_full(r, &mut header).map_err(ProtocolError::Io)? {
            0 => return Err(ProtocolError::Closed),
            HEADER_BYTES => {}
            got => return Err(ProtocolError::TruncatedHeader { got }),
        }
        let header = FrameHeader::decode(&header)?;
        // The header's type bounded the length: this allocation is at most its limit.
        debug_assert!(header.length <= MAX_PAYLOAD_BYTES);
        let length = usize::try_from(header.length).map_err(|_| ProtocolError::TooLarge {
            kind: header.kind,
            length: header.length,
            limit: header.kind.max_payload(),
        })?;
        self.buf.clear();
        self.buf.resize(length, 0);
        let got = read_full(r, &mut self.buf).map_err(ProtocolError::Io)?;
        if got < length {
            return Err(ProtocolError::TruncatedPayload {
                kind: header.kind,
                expected: header.length,
                got: got as u64,
            });
        }
        Ok(RawFrame {
            header,
            payload: &self.buf,
        })
    }
}

/// Reads one frame and decodes it.
pub fn read_frame(r: &mut impl Read) -> Result<Frame, ProtocolError> {
    FrameReader::new().read(r)?.decode()
}

/// Encodes `message` as one frame (header and payload in one buffer).
pub fn encode_frame(message: &Message) -> Result<Vec<u8>, ProtocolError> {
    let kind = message.kind();
    let mut out = vec![0; HEADER_BYTES];
    message
        .encode_payload(&mut out)
        .map_err(|source| ProtocolError::Encode { kind, source })?;
    let header = FrameHeader {
        version: PROTOCOL_VERSION,
        kind,
        length: (out.len() - HEADER_BYTES) as u64,
    };
    out[..HEADER_BYTES].copy_from_slice(&header.encode());
    Ok(out)
}

/// Writes `message` as one frame with a single `write_all`. Nothing is written for a
/// message a peer would refuse (too large, malformed).
pub fn write_frame(w: &mut impl Write, message: &Message) -> Result<(), ProtocolError> {
    let frame = encode_frame(message)?;
    w.write_all(&frame).map_err(ProtocolError::Io)
}

/// Fills `buf` unless the stream ends first; returns the bytes read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::chunk::tests::{encrypted, plain, zero};
    use crate::protocol::chunk::MemoryChunk;
    use crate::protocol::limits::{MAX_CHUNK_BYTES, MAX_STATE_BYTES};
    use crate::protocol::messages::tests::{hello, sev_start};
    use crate::protocol::messages::{Features, HelloReply, State};
    use proptest::prelude::*;

    fn header(magic: u32, version: u16, code: u16, length: u64) -> Vec<u8> {
        let mut out = magic.to_le_bytes().to_vec();
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&code.to_le_bytes());
        out.extend_from_slice(&length.to_le_bytes());
        out
    }

    /// Records the largest buffer it was asked to fill: what the reader allocated for.
    struct Spy<'a> {
        data: &'a [u8],
        largest_read: usize,
    }

    impl Read for Spy<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.largest_read = self.largest_read.max(buf.len());
            self.data.read(buf)
        }
    }

    fn all_messages() -> Vec<Message> {
        vec![
            Message::Hello(hello(false)),
            Message::Hello(hello(true)),
            Message::HelloReply(HelloReply::accept(Features::ZERO_PAGES, Some(vec![1; 100]))),
            Message::HelloReply(HelloReply::refuse("CPUID leaf 7 differs")),
            Message::SevStart(sev_start()),
            Message::MemoryChunk(MemoryChunk {
                pages: vec![zero(1), plain(2, 2), encrypted(3, 4096)],
            }),
            Message::State(State {
                bytes: b"state".to_vec(),
            }),
            Message::Complete,
            Message::Ack,
            Message::error("bad MAC"),
            Message::cancel("operator"),
        ]
    }

    #[test]
    fn the_header_is_16_little_endian_bytes() {
        let h = FrameHeader {
            version: 1,
            kind: MessageType::MemoryChunk,
            length: 0x03_0201,
        };
        let bytes = h.encode();
        assert_eq!(&bytes[..4], b"VEIL");
        assert_eq!(bytes[4..], [1, 0, 4, 0, 1, 2, 3, 0, 0, 0, 0, 0]);
        assert_eq!(FrameHeader::decode(&bytes).unwrap(), h);
    }

    #[test]
    fn every_message_round_trips_through_a_stream() {
        let mut stream = Vec::new();
        for m in all_messages() {
            write_frame(&mut stream, &m).unwrap();
        }
        let mut r = stream.as_slice();
        for m in all_messages() {
            let frame = read_frame(&mut r).unwrap();
            assert_eq!(frame.version, PROTOCOL_VERSION);
            assert_eq!(frame.message, m);
        }
        assert!(matches!(read_frame(&mut r), Err(ProtocolError::Closed)));
    }

    #[test]
    fn truncated_frames_are_typed_errors() {
        for m in all_messages() {
            let frame = encode_frame(&m).unwrap();
            for n in 1..frame.len() {
                let err = read_frame(&mut &frame[..n]).unwrap_err();
                let ok = if n < HEADER_BYTES {
                    matches!(err, ProtocolError::TruncatedHeader { got } if got == n)
                } else {
                    matches!(err, ProtocolError::TruncatedPayload { got, .. } if got as usize == n - HEADER_BYTES)
                };
                assert!(ok, "{} cut at {n}: {err:?}", m.kind());
            }
        }
    }

    #[test]
    fn bytes_beyond_a_payload_are_refused() {
        // The header's length says one byte more than the message needs.
        let mut frame = encode_frame(&Message::SevStart(sev_start())).unwrap();
        let mut hello = encode_frame(&Message::Hello(hello(false))).unwrap();
        hello.push(0);
        let len = (hello.len() - HEADER_BYTES) as u64;
        hello[8..16].copy_from_slice(&len.to_le_bytes());
        assert!(matches!(
            read_frame(&mut hello.as_slice()),
            Err(ProtocolError::Payload {
                kind: MessageType::Hello,
                source: MessageError::TrailingBytes { count: 1 }
            })
        ));
        // SevStart has an exact size: one more is over its limit.
        frame.push(0);
        frame[8..16].copy_from_slice(&(SEV_START_BYTES_PLUS_ONE).to_le_bytes());
        assert!(matches!(
            read_frame(&mut frame.as_slice()),
            Err(ProtocolError::TooLarge {
                kind: MessageType::SevStart,
                ..
            })
        ));
        // Complete and Ack carry nothing.
        let ack = header(MAGIC, PROTOCOL_VERSION, MessageType::Ack as u16, 1);
        assert!(matches!(
            read_frame(&mut [ack, vec![0]].concat().as_slice()),
            Err(ProtocolError::TooLarge {
                kind: MessageType::Ack,
                ..
            })
        ));
    }

    const SEV_START_BYTES_PLUS_ONE: u64 = crate::protocol::limits::SEV_START_BYTES + 1;

    #[test]
    fn wrong_magic_version_and_type_are_refused() {
        let bad = |bytes: Vec<u8>| read_frame(&mut bytes.as_slice()).unwrap_err();
        assert!(matches!(
            bad(header(u32::from_le_bytes(*b"QEVM"), 1, 1, 0)),
            ProtocolError::BadMagic { .. }
        ));
        assert!(matches!(
            bad(header(MAGIC, 2, MessageType::Hello as u16, 0)),
            ProtocolError::UnsupportedVersion { version: 2 }
        ));
        assert!(matches!(
            bad(header(MAGIC, 0, 77, 0)),
            ProtocolError::UnsupportedVersion { version: 0 }
        ));
        assert!(matches!(
            bad(header(MAGIC, PROTOCOL_VERSION, 0, 0)),
            ProtocolError::UnknownMessage { code: 0 }
        ));
        assert!(matches!(
            bad(header(MAGIC, PROTOCOL_VERSION, 10, 0)),
            ProtocolError::UnknownMessage { code: 10 }
        ));
    }

    #[test]
    fn a_newer_peers_error_is_still_readable() {
        let reason = b"Protocol version 1 is too old; this host speaks 2";
        let mut frame = header(MAGIC, 2, MessageType::Error as u16, reason.len() as u64);
        frame.extend_from_slice(reason);
        let got = read_frame(&mut frame.as_slice()).unwrap();
        assert_eq!(got.version, 2);
        assert_eq!(
            got.message,
            Message::Error {
                reason: String::from_utf8(reason.to_vec()).unwrap()
            }
        );
    }

    #[test]
    fn huge_declared_lengths_are_refused_before_allocating() {
        for code in 1..=9u16 {
            let kind = MessageType::from_code(code).unwrap();
            for length in [kind.max_payload() + 1, u64::MAX / 2, u64::MAX] {
                let bytes = header(MAGIC, PROTOCOL_VERSION, code, length);
                let mut spy = Spy {
                    data: &bytes,
                    largest_read: 0,
                };
                let err = read_frame(&mut spy).unwrap_err();
                assert!(
                    matches!(err, ProtocolError::TooLarge { length: l, .. } if l == length),
                    "{kind}: {err:?}"
                );
                assert_eq!(
                    spy.largest_read, HEADER_BYTES,
                    "read nothing past the header"
                );
            }
        }
        // Within the limit but never sent: the buffer is the declared length, no more.
        let bytes = header(
            MAGIC,
            PROTOCOL_VERSION,
            MessageType::State as u16,
            MAX_STATE_BYTES,
        );
        let mut spy = Spy {
            data: &bytes,
            largest_read: 0,
        };
        assert!(matches!(
            read_frame(&mut spy),
            Err(ProtocolError::TruncatedPayload { got: 0, .. })
        ));
        assert_eq!(spy.largest_read as u64, MAX_STATE_BYTES);
    }

    #[test]
    fn the_frame_reader_reuses_its_buffer() {
        let mut stream = Vec::new();
        let chunk = Message::MemoryChunk(MemoryChunk {
            pages: (0..100).map(|g| plain(g, 9)).collect(),
        });
        write_frame(&mut stream, &chunk).unwrap();
        write_frame(&mut stream, &Message::Ack).unwrap();
        let mut reader = FrameReader::new();
        let mut r = stream.as_slice();
        let raw = reader.read(&mut r).unwrap();
        assert_eq!(raw.header.kind, MessageType::MemoryChunk);
        assert!(raw.payload.len() as u64 <= MAX_CHUNK_BYTES);
        assert_eq!(raw.decode().unwrap().message, chunk);
        let raw = reader.read(&mut r).unwrap();
        assert_eq!(raw.decode().unwrap().message, Message::Ack);
    }

    #[test]
    fn interrupted_reads_are_retried() {
        struct Stutter<'a>(&'a [u8], bool);
        impl Read for Stutter<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                self.1 = !self.1;
                if self.1 {
                    return Err(io::ErrorKind::Interrupted.into());
                }
                let n = buf.len().min(3);
                self.0.read(&mut buf[..n])
            }
        }
        let frame = encode_frame(&Message::cancel("timeout")).unwrap();
        let got = read_frame(&mut Stutter(&frame, false)).unwrap();
        assert_eq!(got.message, Message::cancel("timeout"));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn any_bytes_give_a_frame_or_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut spy = Spy { data: &bytes, largest_read: 0 };
            let _ = read_frame(&mut spy);
            prop_assert!(spy.largest_read as u64 <= MAX_PAYLOAD_BYTES);
        }

        #[test]
        fn any_header_with_any_body_is_handled(
            version in prop_oneof![Just(PROTOCOL_VERSION), any::<u16>()],
            code in 0..12u16,
            length in prop_oneof![0..5000u64, any::<u64>()],
            body in proptest::collection::vec(any::<u8>(), 0..5000),
        ) {
            let mut bytes = header(MAGIC, version, code, length);
            bytes.extend_from_slice(&body);
            let mut spy = Spy { data: &bytes, largest_read: 0 };
            if let Ok(frame) = read_frame(&mut spy) {
                prop_assert!(encode_frame(&frame.message).is_ok());
            }
            let limit = MessageType::from_code(code).map_or(0, |k| k.max_payload());
            prop_assert!(spy.largest_read as u64 <= limit.max(HEADER_BYTES as u64));
        }

        #[test]
        fn corrupting_one_byte_never_panics(index in 0usize..10_000, value in any::<u8>()) {
            let mut frame = encode_frame(&all_messages()[5]).unwrap();
            let i = index % frame.len();
            frame[i] = value;
            let _ = read_frame(&mut frame.as_slice());
        }
    }
}
