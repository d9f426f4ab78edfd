//! Frames: a fixed 24-byte header, then the payload.
//!
//! ```text
//!  0            4         6      8        16           20         24
//!  +------------+---------+------+--------+------------+----------+---------
//!  | magic      | version | type | length | checksum   | reserved | payload
//!  | "VEIL" u32 | u16     | u16  | u64    | u32 CRC-32 | u32, 0   | (length bytes)
//!  +------------+---------+------+--------+------------+----------+---------
//! ```
//!
//! Integers are little-endian. The reader checks the magic, the version, the type, the type's
//! length limit and the reserved field before it allocates anything for the payload, then
//! reads exactly that many bytes, checks the checksum and only then decodes them; a stream that
//! ends early is a typed truncation, never a panic.
//!
//! The checksum is the CRC-32 (IEEE, as zlib's `crc32`) of the whole frame with the checksum
//! field zeroed; of a MemoryChunk frame, of the header and the chunk's index, whose entries
//! carry a CRC-32 for each plain page's body (see [`chunk`](super::chunk): a torn page there
//! is one page to send again, not a broken stream). A UNIX socket or `--insecure` TCP has no integrity check of its own, and a
//! flipped byte in a page would otherwise land silently in the target guest. It covers the
//! header too: one flipped bit turns Complete into Ack or Error into Cancel without changing
//! the payload. CRC-32 detects every error burst of up to 32 bits, so any one corrupted byte is
//! caught. It detects accidents, not tampering: authenticating the peer is the transport's job.

use std::io::{self, Read, Write};

use super::chunk::{checksummed_len, CHUNK_HEAD_BYTES};
use super::limits::MAX_PAYLOAD_BYTES;
use super::messages::{Message, MessageError, MessageType};
use super::{MAGIC, PROTOCOL_VERSION};

/// Bytes of the frame header.
pub const HEADER_BYTES: usize = 24;
/// Where the checksum sits in the header.
pub const CHECKSUM_OFFSET: usize = 16;

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
    #[error("{kind} frame header has {found:#010x} in its reserved field, not 0")]
    Reserved { kind: MessageType, found: u32 },
    #[error(
        "{kind} frame failed its checksum: the stream was corrupted (the header says \
         {expected:#010x}, the bytes that arrived give {found:#010x})"
    )]
    Corrupted {
        kind: MessageType,
        /// The checksum the frame header carries.
        expected: u32,
        /// The checksum of the frame as it arrived.
        found: u32,
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
    /// The CRC-32 of the frame with this field zeroed; checked by [`verify`](Self::verify)
    /// once the payload is in.
    pub checksum: u32,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_BYTES] {
        let mut out = [0; HEADER_BYTES];
        out[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&self.version.to_le_bytes());
        out[6..8].copy_from_slice(&(self.kind as u16).to_le_bytes());
        out[8..16].copy_from_slice(&self.length.to_le_bytes());
        out[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&self.checksum.to_le_bytes());
        // Bytes 20..24 are reserved: always written as 0.
        out
    }

    /// Checks magic, version, type, length limit and reserved field, in that order. Error
    /// and Cancel frames of any version pass: their layout never changes, so a refusal stays
    /// readable. The checksum needs the payload: see [`verify`](Self::verify).
    pub fn decode(bytes: &[u8; HEADER_BYTES]) -> Result<Self, ProtocolError> {
        let [m0, m1, m2, m3, v0, v1, t0, t1, rest @ ..] = *bytes;
        let [l @ .., c0, c1, c2, c3, r0, r1, r2, r3] = rest;
        let magic = u32::from_le_bytes([m0, m1, m2, m3]);
        let version = u16::from_le_bytes([v0, v1]);
        let code = u16::from_le_bytes([t0, t1]);
        let length = u64::from_le_bytes(l);
        let checksum = u32::from_le_bytes([c0, c1, c2, c3]);
        let reserved = u32::from_le_bytes([r0, r1, r2, r3]);
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
        if reserved != 0 {
            return Err(ProtocolError::Reserved {
                kind,
                found: reserved,
            });
        }
        Ok(Self {
            version,
            kind,
            length,
            checksum,
        })
    }

    /// Checks that the payload whose CRC state is `payload` (hashed as it arrived) is what
    /// this header's frame carried, before anything decodes it.
    pub(crate) fn verify(&self, payload: &crc32fast::Hasher) -> Result<(), ProtocolError> {
        // A decoded header re-encodes to the bytes that arrived (the reserved field was 0).
        let zeroed = Self {
            checksum: 0,
            ..*self
        };
        let mut crc = crc32fast::Hasher::new();
        crc.update(&zeroed.encode());
        crc.combine(payload);
        let found = crc.finalize();
        if found != self.checksum {
            return Err(ProtocolError::Corrupted {
                kind: self.kind,
                expected: self.checksum,
                found,
            });
        }
        Ok(())
    }
}

/// Fills in the header of a frame built in place: `frame` is [`HEADER_BYTES`] of room, then
/// the payload. The checksum is computed once, over the whole frame.
pub(crate) fn seal(frame: &mut [u8], kind: MessageType) {
    let whole = frame.len();
    let covered = HEADER_BYTES + covered_len(kind, &frame[HEADER_BYTES..]);
    let (head, _) = frame.split_at_mut(covered);
    seal_hashed(
        head,
        kind,
        whole - covered,
        covered,
        &crc32fast::Hasher::new(),
    );
}

/// The payload bytes a frame's checksum covers: all of them, but for a memory chunk only its
/// head and index (each plain page's body has a CRC of its own there).
fn covered_len(kind: MessageType, payload: &[u8]) -> usize {
    match kind {
        MessageType::MemoryChunk => {
            checksummed_len(payload).map_or(payload.len(), |covered| covered.min(payload.len()))
        }
        _ => payload.len(),
    }
}

/// Hashes a payload's bytes as they arrive, up to what the checksum covers ([`covered_len`]):
/// for a memory chunk that is known once its first eight bytes are in.
struct CoveredHash {
    /// `None` until a chunk's index length has arrived.
    covered: Option<usize>,
    head: [u8; CHUNK_HEAD_BYTES],
    at: usize,
    crc: crc32fast::Hasher,
}

impl CoveredHash {
    fn new(kind: MessageType, length: usize) -> Self {
        Self {
            covered: (kind != MessageType::MemoryChunk).then_some(length),
            head: [0; CHUNK_HEAD_BYTES],
            at: 0,
            crc: crc32fast::Hasher::new(),
        }
    }

    fn arrived(&mut self, bytes: &[u8]) {
        let start = self.at;
        self.at += bytes.len();
        if self.covered.is_none() {
            for (i, byte) in bytes.iter().enumerate() {
                match self.head.get_mut(start + i) {
                    Some(slot) => *slot = *byte,
                    None => break,
                }
            }
            if self.at >= CHUNK_HEAD_BYTES {
                self.covered = checksummed_len(&self.head);
            }
        }
        // A chunk's covered bytes are at least its head: before they are known, all are in.
        let end = self.covered.unwrap_or(usize::MAX);
        if start < end {
            let n = (end - start).min(bytes.len());
            self.crc.update(&bytes[..n]);
        }
    }
}

/// As [`seal`], for a frame whose bytes from `hashed_from` on were hashed into `tail` as they
/// were written (while still in the cache, where a pass over a whole chunk afterwards reads
/// megabytes back), and which `unhashed` more payload bytes follow: a memory chunk's page
/// bodies, which the checksum does not cover (each has its own).
pub(crate) fn seal_hashed(
    frame: &mut [u8],
    kind: MessageType,
    unhashed: usize,
    hashed_from: usize,
    tail: &crc32fast::Hasher,
) {
    let header = FrameHeader {
        version: PROTOCOL_VERSION,
        kind,
        length: (frame.len() - HEADER_BYTES + unhashed) as u64,
        checksum: 0,
    };
    frame[..HEADER_BYTES].copy_from_slice(&header.encode());
    let mut crc = crc32fast::Hasher::new();
    crc.update(&frame[..hashed_from]);
    crc.combine(tail);
    let checksum = crc.finalize();
    frame[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&checksum.to_le_bytes());
}

/// The payload bytes [`FrameReader::read_to_bodies`] left on the stream: a MemoryChunk's
/// plain pages' bodies, for the caller to read where they belong.
#[derive(Debug)]
pub struct ChunkBodies<'r, R> {
    r: &'r mut R,
    header: FrameHeader,
    /// Payload bytes read so far.
    read: u64,
}

impl<'r, R: Read> ChunkBodies<'r, R> {
    fn after(r: &'r mut R, header: FrameHeader, read: usize) -> Self {
        Self {
            r,
            header,
            read: read as u64,
        }
    }

    /// Bytes still to read.
    pub fn len(&self) -> u64 {
        self.header.length - self.read
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` (at most [`len`](Self::len) bytes) with the next bodies; a stream that
    /// ends first is a truncation of the frame, as [`FrameReader::read`] reports it.
    pub fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ProtocolError> {
        let kind = self.header.kind;
        if buf.len() as u64 > self.len() {
            return Err(ProtocolError::Payload {
                kind,
                source: MessageError::Truncated {
                    field: "plain page",
                },
            });
        }
        let got = read_full(self.r, buf, |_| {}).map_err(ProtocolError::Io)?;
        self.read += got as u64;
        if got < buf.len() {
            return Err(ProtocolError::TruncatedPayload {
                kind,
                expected: self.header.length,
                got: self.read,
            });
        }
        Ok(())
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
/// limit ([`MAX_PAYLOAD_BYTES`]), nor much beyond what the peer has really sent.
#[derive(Debug, Default)]
pub struct FrameReader {
    /// Bytes past the current payload, from earlier frames, stay as they are: zeroing a
    /// megabyte per chunk again and again cost the receiver a tenth of its time.
    buf: Vec<u8>,
    /// The length of the last payload read.
    len: usize,
}

impl FrameReader {
    pub fn new() -> Self {
        Self::default()
    }

    /// The payload of the last frame [`read`](Self::read) returned (checksum verified), or
    /// nothing if that read failed: a reader can then be handed on without its borrow.
    pub fn payload(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Reads one frame's header and payload; the payload is valid until the next read.
    pub fn read<'a>(&'a mut self, r: &mut impl Read) -> Result<RawFrame<'a>, ProtocolError> {
        let header = self.read_header(r)?;
        self.read_rest(r, header, header.length as usize)
    }

    /// Reads the first `to` payload bytes of the frame `header` begins, which the checksum
    /// covers, and checks them.
    fn read_rest<'a>(
        &'a mut self,
        r: &mut impl Read,
        header: FrameHeader,
        to: usize,
    ) -> Result<RawFrame<'a>, ProtocolError> {
        let mut hashed = CoveredHash::new(header.kind, header.length as usize);
        let got = self.read_payload(r, to, &mut hashed)?;
        if got < to {
            return Err(ProtocolError::TruncatedPayload {
                kind: header.kind,
                expected: header.length,
                got: got as u64,
            });
        }
        // Nothing decodes a payload that is not what the peer sent.
        header.verify(&hashed.crc)?;
        self.len = to;
        Ok(RawFrame {
            header,
            payload: &self.buf[..to],
        })
    }

    /// As [`read`](Self::read), but of a MemoryChunk only up to its plain pages' bodies: the
    /// payload returned is the chunk's head and index, checksum verified, and the bodies are
    /// left on `r` ([`ChunkBodies`]), to go straight where they belong. Any other frame is
    /// read whole.
    pub fn read_to_bodies<'a, 'r, R: Read>(
        &'a mut self,
        r: &'r mut R,
    ) -> Result<(RawFrame<'a>, ChunkBodies<'r, R>), ProtocolError> {
        let header = self.read_header(r)?;
        let length = header.length as usize;
        if header.kind != MessageType::MemoryChunk {
            let frame = self.read_rest(r, header, length)?;
            return Ok((frame, ChunkBodies::after(r, header, length)));
        }
        // The chunk's first bytes say how long its head and index are.
        let start = CHUNK_HEAD_BYTES.min(length);
        let mut prefix = [0; CHUNK_HEAD_BYTES];
        let got = read_full(r, &mut prefix[..start], |_| {}).map_err(ProtocolError::Io)?;
        if got < start {
            return Err(ProtocolError::TruncatedPayload {
                kind: header.kind,
                expected: header.length,
                got: got as u64,
            });
        }
        let covered = checksummed_len(&prefix[..start])
            .unwrap_or(start)
            .clamp(start, length);
        let frame = self.read_rest(&mut prefix[..start].chain(&mut *r), header, covered)?;
        Ok((frame, ChunkBodies::after(r, header, covered)))
    }

    fn read_header(&mut self, r: &mut impl Read) -> Result<FrameHeader, ProtocolError> {
        self.len = 0;
        let mut header = [0; HEADER_BYTES];
        match read_full(r, &mut header, |_| {}).map_err(ProtocolError::Io)? {
            0 => return Err(ProtocolError::Closed),
            HEADER_BYTES => {}
            got => return Err(ProtocolError::TruncatedHeader { got }),
        }
        let header = FrameHeader::decode(&header)?;
        // The header's type bounded the length: this allocation is at most its limit.
        debug_assert!(header.length <= MAX_PAYLOAD_BYTES);
        if usize::try_from(header.length).is_err() {
            return Err(ProtocolError::TooLarge {
                kind: header.kind,
                length: header.length,
                limit: header.kind.max_payload(),
            });
        }
        Ok(header)
    }
}

impl FrameReader {
    /// Reads up to `length` payload bytes into the buffer, growing it only as bytes arrive
    /// (doubling from [`FIRST_READ_BYTES`]): a header that claims 64 MiB and then a trickle
    /// makes this side hold at most about twice what the peer really sent, not the claim.
    /// Each read's bytes go into `hashed` at once, while the kernel's copy has them in the
    /// cache.
    fn read_payload(
        &mut self,
        r: &mut impl Read,
        length: usize,
        hashed: &mut CoveredHash,
    ) -> Result<usize, ProtocolError> {
        let mut got = 0;
        while got < length {
            let step = (length - got).min(got.max(FIRST_READ_BYTES));
            if self.buf.len() < got + step {
                self.buf.resize(got + step, 0);
            }
            let into = &mut self.buf[got..got + step];
            let n = read_full(r, into, |bytes| hashed.arrived(bytes)).map_err(ProtocolError::Io)?;
            got += n;
            if n < step {
                break;
            }
        }
        Ok(got)
    }

    /// The bytes the reader holds for payloads (for tests of its memory bound).
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

/// The first slice of a payload read before more is allocated: every payload but a memory
/// chunk or a State fits.
pub const FIRST_READ_BYTES: usize = 64 * 1024;

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
    seal(&mut out, kind);
    Ok(out)
}

/// Writes `message` as one frame with a single `write_all`. Nothing is written for a
/// message a peer would refuse (too large, malformed).
pub fn write_frame(w: &mut impl Write, message: &Message) -> Result<(), ProtocolError> {
    let frame = encode_frame(message)?;
    w.write_all(&frame).map_err(ProtocolError::Io)
}

/// Fills `buf` unless the stream ends first, handing each read's bytes to `arrived` as they
/// land; returns the bytes read.
fn read_full(
    r: &mut impl Read,
    buf: &mut [u8],
    mut arrived: impl FnMut(&[u8]),
) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => {
                arrived(&buf[got..got + n]);
                got += n;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_that_claims_more_than_it_sends_costs_only_what_it_sent() {
        let mut frame = Vec::new();
        write_frame(
            &mut frame,
            &Message::State(crate::protocol::State {
                bytes: vec![7; 300_000],
            }),
        )
        .unwrap();
        // The header claims 300,000 bytes; 1,000 arrive, then the peer hangs up.
        let mut reader = FrameReader::new();
        let cut = &frame[..HEADER_BYTES + 1000];
        assert!(matches!(
            reader.read(&mut &cut[..]),
            Err(ProtocolError::TruncatedPayload { got: 1000, .. })
        ));
        assert!(
            reader.capacity() <= FIRST_READ_BYTES,
            "{}",
            reader.capacity()
        );
        // The whole frame still reads, through a buffer about its size.
        let raw = reader.read(&mut frame.as_slice()).unwrap();
        assert_eq!(raw.payload.len(), 300_000);
        assert!(reader.capacity() <= 2 * 300_000, "{}", reader.capacity());
    }
    use crate::protocol::chunk::tests::{encrypted, plain, zero};
    use crate::protocol::chunk::MemoryChunk;
    use crate::protocol::limits::{MAX_CHUNK_BYTES, MAX_STATE_BYTES};
    use crate::protocol::messages::tests::{hello, sev_start};
    use crate::protocol::messages::{Features, HelloReply, State};
    use proptest::prelude::*;

    /// A hand-made header with a zero checksum (for refusals that come before the checksum).
    fn header(magic: u32, version: u16, code: u16, length: u64) -> Vec<u8> {
        let mut out = magic.to_le_bytes().to_vec();
        out.extend_from_slice(&version.to_le_bytes());
        out.extend_from_slice(&code.to_le_bytes());
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(&[0; 8]);
        out
    }

    /// Sets the checksum of a hand-made frame as the specification defines it: the CRC-32 of
    /// the frame with the checksum field zeroed.
    fn sealed(mut frame: Vec<u8>) -> Vec<u8> {
        frame[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].fill(0);
        let crc = crc32fast::hash(&frame);
        frame[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 4].copy_from_slice(&crc.to_le_bytes());
        frame
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
    fn the_header_is_24_little_endian_bytes() {
        let h = FrameHeader {
            version: PROTOCOL_VERSION,
            kind: MessageType::MemoryChunk,
            length: 0x03_0201,
            checksum: 0x0807_0605,
        };
        let bytes = h.encode();
        assert_eq!(&bytes[..4], b"VEIL");
        assert_eq!(
            bytes[4..],
            [3, 0, 4, 0, 1, 2, 3, 0, 0, 0, 0, 0, 5, 6, 7, 8, 0, 0, 0, 0]
        );
        assert_eq!(FrameHeader::decode(&bytes).unwrap(), h);
        // The checksum is zlib's CRC-32 of the frame with the field zeroed (these values
        // come from zlib, not from this code).
        let ack = encode_frame(&Message::Ack).unwrap();
        assert_eq!(ack.len(), HEADER_BYTES);
        assert_eq!(ack[16..20], 0x3de6_291au32.to_le_bytes());
        let error = encode_frame(&Message::error("bad MAC")).unwrap();
        assert_eq!(error[16..20], 0x22a2_22cfu32.to_le_bytes());
        assert_eq!(&error[HEADER_BYTES..], b"bad MAC");
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

    /// Whether a damaged frame of `kind` was caught: by the frame checksum, or, in a plain
    /// page's body, by the page's own (an owned decode takes no damaged page).
    fn caught(err: &ProtocolError, kind: MessageType) -> bool {
        match err {
            ProtocolError::Corrupted { kind: found, .. } => *found == kind,
            ProtocolError::Payload {
                kind: MessageType::MemoryChunk,
                source: MessageError::InvalidValue { field, .. },
            } => *field == "plain page checksum, page",
            _ => false,
        }
    }

    #[test]
    fn every_flipped_payload_byte_is_detected_before_decoding() {
        for m in all_messages() {
            let frame = encode_frame(&m).unwrap();
            for i in HEADER_BYTES..frame.len() {
                for flip in [1u8 << (i % 8), 0xff] {
                    let mut bad = frame.clone();
                    bad[i] ^= flip;
                    let err = read_frame(&mut bad.as_slice()).unwrap_err();
                    assert!(
                        caught(&err, m.kind()),
                        "{} with byte {i} ^ {flip:#x}: {err:?}",
                        m.kind()
                    );
                }
            }
        }
        let mut chunk = encode_frame(&all_messages()[5]).unwrap();
        chunk[HEADER_BYTES + 100] ^= 4;
        let text = read_frame(&mut chunk.as_slice()).unwrap_err().to_string();
        assert!(
            text.starts_with(
                "MemoryChunk frame failed its checksum: the stream was corrupted (the header \
                 says 0x"
            ),
            "{text}"
        );
    }

    #[test]
    fn every_corrupted_header_byte_is_refused() {
        // Followed by another frame, so a longer length reads into it rather than running out.
        let next = encode_frame(&Message::error("the next frame")).unwrap();
        for m in all_messages() {
            let frame = encode_frame(&m).unwrap();
            for i in 0..HEADER_BYTES {
                for value in (0..=255u8).filter(|&v| v != frame[i]) {
                    let mut bad = [frame.as_slice(), &next].concat();
                    bad[i] = value;
                    let result = read_frame(&mut bad.as_slice());
                    assert!(
                        result.is_err(),
                        "{} with header byte {i} = {value:#x}: {result:?}",
                        m.kind()
                    );
                }
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
            read_frame(&mut sealed(hello).as_slice()),
            Err(ProtocolError::Payload {
                kind: MessageType::Hello,
                source: MessageError::TrailingBytes { count: 1 }
            })
        ));
        // SevStart has an exact size: one more is over its limit.
        frame.push(0);
        frame[8..16].copy_from_slice(&(SEV_START_BYTES_PLUS_ONE).to_le_bytes());
        assert!(matches!(
            read_frame(&mut sealed(frame).as_slice()),
            Err(ProtocolError::TooLarge {
                kind: MessageType::SevStart,
                ..
            })
        ));
        // Complete and Ack carry nothing.
        let ack = header(MAGIC, PROTOCOL_VERSION, MessageType::Ack as u16, 1);
        assert!(matches!(
            read_frame(&mut sealed([ack, vec![0]].concat()).as_slice()),
            Err(ProtocolError::TooLarge {
                kind: MessageType::Ack,
                ..
            })
        ));
    }

    const SEV_START_BYTES_PLUS_ONE: u64 = crate::protocol::limits::SEV_START_BYTES + 1;

    #[test]
    fn wrong_magic_version_type_and_reserved_field_are_refused() {
        let bad = |bytes: Vec<u8>| read_frame(&mut sealed(bytes).as_slice()).unwrap_err();
        assert!(matches!(
            bad(header(u32::from_le_bytes(*b"QEVM"), 1, 1, 0)),
            ProtocolError::BadMagic { .. }
        ));
        assert!(matches!(
            bad(header(
                MAGIC,
                PROTOCOL_VERSION + 1,
                MessageType::Hello as u16,
                0
            )),
            ProtocolError::UnsupportedVersion { version } if version == PROTOCOL_VERSION + 1
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
            bad(header(MAGIC, PROTOCOL_VERSION, 18, 0)),
            ProtocolError::UnknownMessage { code: 18 }
        ));
        let mut reserved = header(MAGIC, PROTOCOL_VERSION, MessageType::Ack as u16, 0);
        reserved[23] = 0x80;
        assert!(matches!(
            bad(reserved),
            ProtocolError::Reserved {
                kind: MessageType::Ack,
                found: 0x8000_0000
            }
        ));
    }

    #[test]
    fn a_newer_peers_error_is_still_readable() {
        let reason = b"Protocol version 2 is too old; this host speaks 3";
        let mut frame = header(MAGIC, 3, MessageType::Error as u16, reason.len() as u64);
        frame.extend_from_slice(reason);
        let frame = sealed(frame);
        // As zlib computes it: the test's sealing is the specification's.
        assert_eq!(frame[16..20], 0xa075_35deu32.to_le_bytes());
        let got = read_frame(&mut frame.as_slice()).unwrap();
        assert_eq!(got.version, 3);
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
        // Within the limit but never sent: the first read asks for a first slice only.
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
        assert_eq!(spy.largest_read, FIRST_READ_BYTES);
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
            // A correct checksum lets arbitrary payloads through to the decoder.
            seal in any::<bool>(),
        ) {
            let mut bytes = header(MAGIC, version, code, length);
            bytes.extend_from_slice(&body);
            if seal {
                bytes = sealed(bytes);
            }
            let mut spy = Spy { data: &bytes, largest_read: 0 };
            if let Ok(frame) = read_frame(&mut spy) {
                prop_assert!(encode_frame(&frame.message).is_ok());
            }
            let limit = MessageType::from_code(code).map_or(0, |k| k.max_payload());
            prop_assert!(spy.largest_read as u64 <= limit.max(HEADER_BYTES as u64));
        }

        #[test]
        fn corrupting_one_byte_is_always_detected(
            message in 0..11usize,
            index in any::<prop::sample::Index>(),
            flip in 1..=255u8,
        ) {
            let frame = encode_frame(&all_messages()[message]).unwrap();
            let next = encode_frame(&Message::Complete).unwrap();
            let mut bytes = [frame.as_slice(), &next].concat();
            let i = index.index(frame.len());
            bytes[i] ^= flip;
            let result = read_frame(&mut bytes.as_slice());
            if i >= HEADER_BYTES {
                let kind = all_messages()[message].kind();
                prop_assert!(
                    result.as_ref().is_err_and(|e| caught(e, kind)),
                    "byte {} ^ {:#x}: {:?}", i, flip, result
                );
            } else {
                prop_assert!(result.is_err(), "header byte {} ^ {:#x}: {:?}", i, flip, result);
            }
        }
    }
}
