//! Memory chunks: the hot path. Pages are explicit binary records, never serde.
//!
//! ```text
//! chunk   = page_count u32 (1 ..= MAX_CHUNK_PAGES) | index_len u32 | index | bodies
//! index   = entry * page_count                      (index_len bytes)
//! entry   = gfn u64 | kind u8 | rest
//!   kind 0  Zero       (nothing more: 9 bytes)
//!   kind 1  Plain      body_crc u32: the CRC-32 of its 4096 bytes in `bodies`
//!   kind 2  Encrypted  header [52] | data_len u16 | data [data_len]
//!                      (data_len 16 ..= 4096, a multiple of 16: a SEND_UPDATE_DATA packet)
//! bodies  = 4096 bytes per Plain entry, in index order
//! ```
//!
//! The frame checksum covers the header and the index only (see [`frame`](super::frame));
//! each plain page's body has its own CRC in its entry. The split lets the source send a
//! plain page straight from guest memory, which the guest may write while the page is on its
//! way: such a page arrives *damaged* (its body does not match its CRC), the target sets it
//! aside, and since the guest wrote it after the dirty log was read, the source sends it
//! again in a later pass. A page still damaged when the State arrives fails the migration.
//! Encrypted pages, which the firmware seals into a buffer, sit in the index, under the frame
//! checksum.
//!
//! Owned [`MemoryChunk`]s are for tests and small users; the sender fills a [`ChunkEncoder`]
//! and the receiver walks a [`MemoryChunkRef`] over the frame it read. Decoding does not know
//! the VM: the session checks each chunk's [`ChunkIndex`] against the [`VmShape`] before
//! anything is written.

use veil_sev::crypto::{MAX_PACKET_BYTES, PACKET_HEADER_BYTES};
use veil_sev::firmware::{Packet, PacketMut, PacketRef};

use super::frame::{seal_hashed, HEADER_BYTES};
use super::limits::{MAX_CHUNK_BYTES, MAX_CHUNK_PAGES, PAGE_SIZE};
use super::messages::{MessageError, MessageType};
use super::shape::{ShapeError, VmShape};
use super::wire::{put_u16, put_u32, put_u64, put_u8, Cursor};

const KIND_ZERO: u8 = 0;
const KIND_PLAIN: u8 = 1;
const KIND_ENCRYPTED: u8 = 2;

/// Bytes a zero page costs inside a chunk.
pub const ZERO_PAGE_WIRE_BYTES: usize = 8 + 1;
/// Bytes a plain page's index entry costs: gfn, kind, body CRC.
pub const PLAIN_ENTRY_BYTES: usize = 8 + 1 + 4;
/// Bytes a plain page costs inside a chunk: its entry and its body.
pub const PLAIN_PAGE_WIRE_BYTES: usize = PLAIN_ENTRY_BYTES + PAGE_SIZE;
/// An encrypted page's bytes besides its payload: gfn, kind, packet header, payload length.
const ENCRYPTED_PAGE_OVERHEAD: usize = 8 + 1 + PACKET_HEADER_BYTES + 2;
/// Bytes the page count and the index length cost, once per chunk: the payload's bytes
/// before the index.
pub const CHUNK_HEAD_BYTES: usize = 8;

/// The CRC a plain page's entry carries for its body.
pub fn body_crc(body: &[u8]) -> u32 {
    crc32fast::hash(body)
}

/// What a page holds on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageContent {
    /// All zeros (plain guests, and shared pages of SEV guests).
    Zero,
    /// The page in the clear (plain guests, and shared pages of SEV guests).
    Plain(Box<[u8; PAGE_SIZE]>),
    /// A private page as SEND_UPDATE_DATA packed it, for RECEIVE_UPDATE_DATA.
    Encrypted {
        header: [u8; PACKET_HEADER_BYTES],
        data: Vec<u8>,
    },
}

impl From<Packet> for PageContent {
    fn from(packet: Packet) -> Self {
        PageContent::Encrypted {
            header: packet.header,
            data: packet.data,
        }
    }
}

/// One page of a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Guest frame number: the guest-physical address divided by 4096.
    pub gfn: u64,
    pub content: PageContent,
}

impl Page {
    pub fn as_ref(&self) -> PageRef<'_> {
        let content = match &self.content {
            PageContent::Zero => PageContentRef::Zero,
            PageContent::Plain(bytes) => PageContentRef::Plain(bytes),
            PageContent::Encrypted { header, data } => PageContentRef::Encrypted { header, data },
        };
        PageRef {
            gfn: self.gfn,
            content,
        }
    }
}

/// A page's content, borrowed from guest memory or from a received frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageContentRef<'a> {
    Zero,
    Plain(&'a [u8; PAGE_SIZE]),
    Encrypted {
        header: &'a [u8; PACKET_HEADER_BYTES],
        data: &'a [u8],
    },
}

impl<'a> PageContentRef<'a> {
    /// The firmware packet of an encrypted page, where it lies.
    pub fn packet(&self) -> Option<PacketRef<'a>> {
        match *self {
            PageContentRef::Encrypted { header, data } => Some(PacketRef { header, data }),
            _ => None,
        }
    }
}

/// A borrowed page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRef<'a> {
    pub gfn: u64,
    pub content: PageContentRef<'a>,
}

impl PageRef<'_> {
    /// Bytes this page costs inside a chunk (entry and body).
    pub fn wire_len(&self) -> usize {
        match self.content {
            PageContentRef::Zero => ZERO_PAGE_WIRE_BYTES,
            PageContentRef::Plain(_) => PLAIN_PAGE_WIRE_BYTES,
            PageContentRef::Encrypted { data, .. } => ENCRYPTED_PAGE_OVERHEAD + data.len(),
        }
    }

    pub fn to_owned(&self) -> Page {
        let content = match self.content {
            PageContentRef::Zero => PageContent::Zero,
            PageContentRef::Plain(bytes) => PageContent::Plain(Box::new(*bytes)),
            PageContentRef::Encrypted { header, data } => PageContent::Encrypted {
                header: *header,
                data: data.to_vec(),
            },
        };
        Page {
            gfn: self.gfn,
            content,
        }
    }

    /// Appends this page's index entry to `index` (a plain page's body goes elsewhere).
    fn encode_entry(&self, index: &mut Vec<u8>) -> Result<(), MessageError> {
        if let PageContentRef::Encrypted { data, .. } = self.content {
            check_packet_length(data.len())?;
        }
        put_u64(index, self.gfn);
        match self.content {
            PageContentRef::Zero => put_u8(index, KIND_ZERO),
            PageContentRef::Plain(bytes) => {
                put_u8(index, KIND_PLAIN);
                put_u32(index, body_crc(bytes));
            }
            PageContentRef::Encrypted { header, data } => {
                put_u8(index, KIND_ENCRYPTED);
                index.extend_from_slice(header);
                put_u16(index, data.len() as u16);
                index.extend_from_slice(data);
            }
        }
        Ok(())
    }
}

/// Sixteen bytes at a time: a byte-wise loop does not vectorise, and a mostly-zero guest
/// has every page scanned.
pub(crate) fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16)
        .all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
}

/// An encrypted payload must be what the firmware produces: 16 to 4096 bytes in 16-byte
/// blocks (AMD SEV API, publication 55766, SEND_UPDATE_DATA).
fn check_packet_length(len: usize) -> Result<(), MessageError> {
    if len == 0 || !len.is_multiple_of(16) || len > MAX_PACKET_BYTES {
        return Err(MessageError::InvalidValue {
            field: "encrypted page length",
            value: len as u64,
        });
    }
    Ok(())
}

/// What an index entry says a page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryRef<'a> {
    Zero,
    /// In the clear: its body is the chunk's next 4096 body bytes, and has this CRC.
    Plain {
        body_crc: u32,
    },
    Encrypted {
        header: &'a [u8; PACKET_HEADER_BYTES],
        data: &'a [u8],
    },
}

/// One entry of a chunk's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry<'a> {
    pub gfn: u64,
    pub entry: EntryRef<'a>,
}

fn decode_entry<'a>(c: &mut Cursor<'a>) -> Result<IndexEntry<'a>, MessageError> {
    let gfn = c.u64("page number")?;
    let entry = match c.u8("page kind")? {
        KIND_ZERO => EntryRef::Zero,
        KIND_PLAIN => EntryRef::Plain {
            body_crc: c.u32("plain page checksum")?,
        },
        KIND_ENCRYPTED => {
            let header = c.array("packet header")?;
            let len = c.u16("encrypted page length")?;
            check_packet_length(len.into())?;
            let data = c.take(len.into(), "encrypted page")?;
            EntryRef::Encrypted { header, data }
        }
        kind => {
            return Err(MessageError::InvalidValue {
                field: "page kind",
                value: kind.into(),
            })
        }
    };
    Ok(IndexEntry { gfn, entry })
}

/// The bytes the frame checksum covers in a chunk's payload: the head and the index, as the
/// payload's first eight bytes say (`None` before they are in). The reader hashes only these.
pub(crate) fn checksummed_len(payload_start: &[u8]) -> Option<usize> {
    let len = payload_start.get(4..8)?;
    let index = u32::from_le_bytes(len.try_into().expect("four bytes"));
    Some(CHUNK_HEAD_BYTES.saturating_add(index as usize))
}

/// A chunk's index, checked in place: the page count, and an entry per page.
#[derive(Debug, Clone, Copy)]
pub struct ChunkIndex<'a> {
    count: usize,
    entries: &'a [u8],
    plain: usize,
}

impl<'a> ChunkIndex<'a> {
    /// Checks `head` (page count, index length, index: a payload's first bytes, up to its
    /// bodies) once; iterating it then cannot fail.
    pub fn parse(head: &'a [u8]) -> Result<Self, MessageError> {
        let mut c = Cursor::new(head);
        let count = match c.count("pages", MAX_CHUNK_PAGES)? {
            0 => {
                return Err(MessageError::InvalidValue {
                    field: "page count",
                    value: 0,
                })
            }
            n => n,
        };
        let index_len = c.u32("index length")? as usize;
        // Every entry costs at least a zero page's bytes: refuse a count the index cannot hold.
        if count * ZERO_PAGE_WIRE_BYTES > index_len {
            return Err(MessageError::InvalidValue {
                field: "index length",
                value: index_len as u64,
            });
        }
        let entries = c.take(index_len, "index")?;
        c.finish()?;
        let mut walk = Cursor::new(entries);
        let mut plain = 0;
        for _ in 0..count {
            if let EntryRef::Plain { .. } = decode_entry(&mut walk)?.entry {
                plain += 1;
            }
        }
        walk.finish()?;
        Ok(Self {
            count,
            entries,
            plain,
        })
    }

    /// As [`parse`](Self::parse), for a head that `body_bytes` of bodies follow in its
    /// frame: they must be a body for every plain entry, no more, no less.
    pub fn parse_followed_by(head: &'a [u8], body_bytes: u64) -> Result<Self, MessageError> {
        let index = Self::parse(head)?;
        let expected = index.body_bytes() as u64;
        match body_bytes.cmp(&expected) {
            std::cmp::Ordering::Less => Err(MessageError::Truncated {
                field: "plain page",
            }),
            std::cmp::Ordering::Greater => Err(MessageError::TrailingBytes {
                count: (body_bytes - expected) as usize,
            }),
            std::cmp::Ordering::Equal => Ok(index),
        }
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Always false: a chunk carries at least one page.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of plain page bodies that follow the index.
    pub fn body_bytes(&self) -> usize {
        self.plain * PAGE_SIZE
    }

    /// The entries, in wire order.
    pub fn entries(&self) -> impl Iterator<Item = IndexEntry<'a>> + Clone + 'a {
        let mut cursor = Cursor::new(self.entries);
        // `parse` checked every entry already.
        (0..self.count).map_while(move |_| decode_entry(&mut cursor).ok())
    }

    /// Checks the chunk against the VM: every page in RAM, none twice.
    pub fn validate(&self, shape: &VmShape) -> Result<(), ShapeError> {
        shape.check_gfns(self.entries().map(|e| e.gfn))
    }
}

/// Pages of guest memory, owned.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryChunk {
    pub pages: Vec<Page>,
}

impl MemoryChunk {
    /// Checks the chunk against the VM: every page in RAM, none twice.
    pub fn validate(&self, shape: &VmShape) -> Result<(), ShapeError> {
        shape.check_gfns(self.pages.iter().map(|p| p.gfn))
    }

    /// Bytes of payload this chunk encodes to.
    pub fn payload_len(&self) -> usize {
        CHUNK_HEAD_BYTES
            + self
                .pages
                .iter()
                .map(|p| p.as_ref().wire_len())
                .sum::<usize>()
    }

    pub(crate) fn encode(&self, out: &mut Vec<u8>) -> Result<(), MessageError> {
        let count = self.pages.len();
        if count == 0 || count > MAX_CHUNK_PAGES {
            return Err(MessageError::TooMany {
                what: "pages",
                count: count as u64,
                limit: MAX_CHUNK_PAGES as u64,
            });
        }
        put_u32(out, count as u32);
        let index_len_at = out.len();
        put_u32(out, 0);
        for page in &self.pages {
            page.as_ref().encode_entry(out)?;
        }
        let index_len = (out.len() - index_len_at - 4) as u32;
        out[index_len_at..index_len_at + 4].copy_from_slice(&index_len.to_le_bytes());
        for page in &self.pages {
            if let PageContent::Plain(bytes) = &page.content {
                out.extend_from_slice(&bytes[..]);
            }
        }
        Ok(())
    }

    /// Decodes a chunk whose every plain page arrived intact: an owned chunk has no use for
    /// a damaged one.
    pub(crate) fn decode(payload: &[u8]) -> Result<Self, MessageError> {
        let chunk = MemoryChunkRef::parse(payload)?;
        let pages = chunk
            .arrived()
            .map(|arrived| match arrived {
                Arrived::Page(page) => Ok(page.to_owned()),
                Arrived::Damaged { gfn } => Err(MessageError::InvalidValue {
                    field: "plain page checksum, page",
                    value: gfn,
                }),
            })
            .collect::<Result<_, _>>()?;
        Ok(MemoryChunk { pages })
    }
}

/// A chunk checked in place inside a received payload; its pages borrow from it.
#[derive(Debug, Clone, Copy)]
pub struct MemoryChunkRef<'a> {
    index: ChunkIndex<'a>,
    bodies: &'a [u8],
}

impl<'a> MemoryChunkRef<'a> {
    /// Checks the whole payload's layout once (the index, and a body for every plain page);
    /// iterating the pages then cannot fail. Bodies are checked against their CRCs only by
    /// [`arrived`](Self::arrived).
    pub fn parse(payload: &'a [u8]) -> Result<Self, MessageError> {
        let head_len = checksummed_len(payload).ok_or(MessageError::Truncated {
            field: "page count",
        })?;
        if head_len > payload.len() {
            // Lets ChunkIndex name what is missing.
            ChunkIndex::parse(payload)?;
            return Err(MessageError::Truncated { field: "index" });
        }
        let (head, bodies) = payload.split_at(head_len);
        let index = ChunkIndex::parse_followed_by(head, bodies.len() as u64)?;
        Ok(Self { index, bodies })
    }

    /// The index: what the session checks.
    pub fn index(&self) -> &ChunkIndex<'a> {
        &self.index
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Always false: a chunk carries at least one page.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The pages as they arrived, in wire order, bodies unchecked.
    pub fn pages(&self) -> impl Iterator<Item = PageRef<'a>> + Clone + 'a {
        self.with_bodies().map(|(page, _)| page)
    }

    /// The pages in wire order, each plain page checked against its CRC: what the target may
    /// write, and which pages it must see again.
    pub fn arrived(&self) -> impl Iterator<Item = Arrived<'a>> + 'a {
        self.with_bodies()
            .map(|(page, crc)| match (page.content, crc) {
                (PageContentRef::Plain(body), Some(crc)) if body_crc(body) != crc => {
                    Arrived::Damaged { gfn: page.gfn }
                }
                _ => Arrived::Page(page),
            })
    }

    /// Each page with its body, and the CRC its entry gives a plain page.
    fn with_bodies(&self) -> impl Iterator<Item = (PageRef<'a>, Option<u32>)> + Clone + 'a {
        let mut bodies = self.bodies.chunks_exact(PAGE_SIZE);
        self.index
            .entries()
            .map_while(move |IndexEntry { gfn, entry }| {
                let (content, crc) = match entry {
                    EntryRef::Zero => (PageContentRef::Zero, None),
                    EntryRef::Encrypted { header, data } => {
                        (PageContentRef::Encrypted { header, data }, None)
                    }
                    EntryRef::Plain { body_crc } => {
                        // `parse` checked there is a body for every plain entry.
                        let body = bodies.next()?.try_into().ok()?;
                        (PageContentRef::Plain(body), Some(body_crc))
                    }
                };
                Some((PageRef { gfn, content }, crc))
            })
    }

    /// Checks the chunk against the VM: every page in RAM, none twice.
    pub fn validate(&self, shape: &VmShape) -> Result<(), ShapeError> {
        self.index.validate(shape)
    }
}

/// A page of a received chunk, as the target takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrived<'a> {
    /// Zero, encrypted (under the frame checksum), or plain with a body that matches its CRC.
    Page(PageRef<'a>),
    /// A plain page whose body does not match its CRC: the guest wrote it while it was being
    /// sent (the source sends it again), or the stream damaged it.
    Damaged { gfn: u64 },
}

/// Builds one MemoryChunk frame at a time in reusable buffers, stopping at the limits a
/// receiver enforces. Plain pages' bodies are either held here ([`push`](Self::push)) or
/// sent by the caller after the frame's head ([`push_plain_elsewhere`](Self::push_plain_elsewhere),
/// straight from guest memory); one chunk does not mix the two.
///
/// ```
/// use veil_migration::protocol::chunk::{ChunkEncoder, PageContentRef, PageRef};
/// let mut encoder = ChunkEncoder::new();
/// let mut wire = Vec::new();
/// for gfn in 0..10_000 {
///     let page = PageRef { gfn, content: PageContentRef::Zero };
///     if !encoder.push(page).unwrap() {
///         let frame = encoder.frame().unwrap();
///         wire.extend_from_slice(frame.head);
///         wire.extend_from_slice(frame.bodies);
///         encoder.clear();
///         assert!(encoder.push(page).unwrap());
///     }
/// }
/// wire.extend_from_slice(encoder.frame().unwrap().head);
/// ```
#[derive(Debug, Default)]
pub struct ChunkEncoder {
    /// Frame header, page count, index length, index, up to `end`. Bytes past it, from
    /// earlier chunks, stay as they are, so a packet sealed in place is not zeroed first.
    buf: Vec<u8>,
    /// The end of the index being built.
    end: usize,
    pages: usize,
    /// Bodies of the plain pages [`push`](Self::push) took, in index order.
    bodies: Vec<u8>,
    /// Plain pages whose bodies the caller sends.
    bodies_elsewhere: usize,
    /// CRC state of the entries so far, each hashed as it was added: right after its
    /// writing, it is in the cache, where a pass over a chunk of packets at the end reads
    /// megabytes back.
    index_crc: crc32fast::Hasher,
    /// Where the entries not yet hashed start.
    hashed_to: usize,
}

/// A chunk's frame, ready to go: `head`, then `bodies`, then the bodies of the pages added
/// with [`ChunkEncoder::push_plain_elsewhere`], in the order they were added.
#[derive(Debug, Clone, Copy)]
pub struct ChunkFrame<'a> {
    /// The frame header, the page count, the index length and the index.
    pub head: &'a [u8],
    /// The bodies the encoder holds.
    pub bodies: &'a [u8],
    /// Plain pages whose bodies the caller sends.
    pub bodies_elsewhere: usize,
}

impl ChunkFrame<'_> {
    /// The frame's bytes in all.
    pub fn len(&self) -> usize {
        self.head.len() + self.bodies.len() + self.bodies_elsewhere * PAGE_SIZE
    }

    /// Never true: a frame has its head.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The index, for the session to check.
    pub fn index(&self) -> Result<ChunkIndex<'_>, MessageError> {
        ChunkIndex::parse(&self.head[HEADER_BYTES..])
    }

    /// Appends the frame to `out`, where the encoder holds all of it (no page was added with
    /// [`ChunkEncoder::push_plain_elsewhere`]).
    pub fn append_to(&self, out: &mut Vec<u8>) {
        debug_assert_eq!(self.bodies_elsewhere, 0, "the caller sends those bodies");
        out.extend_from_slice(self.head);
        out.extend_from_slice(self.bodies);
    }
}

impl ChunkEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The payload bytes so far, bodies included (the head too, even before the first page).
    fn payload_len(&self) -> usize {
        self.end.saturating_sub(HEADER_BYTES).max(CHUNK_HEAD_BYTES)
            + self.bodies.len()
            + self.bodies_elsewhere * PAGE_SIZE
    }

    /// Before the first page: room for the header, the page count and the index length.
    fn start_if_empty(&mut self) {
        if self.pages == 0 {
            self.end = HEADER_BYTES + CHUNK_HEAD_BYTES;
            if self.buf.len() < self.end {
                self.buf.resize(self.end, 0);
            }
            self.index_crc.reset();
            self.hashed_to = self.end;
            self.bodies.clear();
            self.bodies_elsewhere = 0;
        }
    }

    /// Whether a page of `wire_len` bytes fits.
    fn fits(&self, wire_len: usize) -> bool {
        self.pages < MAX_CHUNK_PAGES && (self.payload_len() + wire_len) as u64 <= MAX_CHUNK_BYTES
    }

    /// Counts the entry just written (up to `end`), and hashes it.
    fn added_entry(&mut self) {
        self.index_crc.update(&self.buf[self.hashed_to..self.end]);
        self.hashed_to = self.end;
        self.pages += 1;
    }

    /// Adds a page, a plain one's body copied in; `Ok(false)` when it would not fit (send the
    /// frame, clear, push again).
    pub fn push(&mut self, page: PageRef<'_>) -> Result<bool, MessageError> {
        if let PageContentRef::Plain(_) = page.content {
            if self.pages > 0 && self.bodies_elsewhere > 0 {
                return Err(mixed_bodies());
            }
        }
        if !self.fits(page.wire_len()) {
            return Ok(false);
        }
        self.start_if_empty();
        self.buf.truncate(self.end);
        page.encode_entry(&mut self.buf)?;
        self.end = self.buf.len();
        if let PageContentRef::Plain(body) = page.content {
            self.bodies.extend_from_slice(body);
        }
        self.added_entry();
        Ok(true)
    }

    /// Adds a page in the clear whose body `fill` writes straight into the chunk (one copy
    /// from guest memory, hashed while it is in the cache); with `zero_pages`, an all-zero
    /// page goes as a zero page instead. `Ok(None)` when it would not fit (send the frame,
    /// clear, push again); otherwise whether it went as a zero page. On an error nothing is
    /// added.
    pub fn push_plain_filled<E: From<MessageError>>(
        &mut self,
        gfn: u64,
        zero_pages: bool,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Option<bool>, E> {
        if self.pages > 0 && self.bodies_elsewhere > 0 {
            return Err(mixed_bodies().into());
        }
        if !self.fits(PLAIN_PAGE_WIRE_BYTES) {
            return Ok(None);
        }
        self.start_if_empty();
        let start = self.bodies.len();
        self.bodies.resize(start + PAGE_SIZE, 0);
        if let Err(e) = fill(&mut self.bodies[start..]) {
            self.bodies.truncate(start);
            return Err(e);
        }
        let body = &self.bodies[start..];
        let zero = zero_pages && is_zero(body);
        let crc = (!zero).then(|| body_crc(body));
        self.buf.truncate(self.end);
        put_u64(&mut self.buf, gfn);
        match crc {
            None => {
                self.bodies.truncate(start);
                put_u8(&mut self.buf, KIND_ZERO);
            }
            Some(crc) => {
                put_u8(&mut self.buf, KIND_PLAIN);
                put_u32(&mut self.buf, crc);
            }
        }
        self.end = self.buf.len();
        self.added_entry();
        Ok(Some(zero))
    }

    /// Adds a plain page whose body (with CRC `body_crc`) the caller sends after the frame's
    /// head, as [`ChunkFrame`] says; `Ok(false)` when it would not fit.
    pub fn push_plain_elsewhere(&mut self, gfn: u64, body_crc: u32) -> Result<bool, MessageError> {
        if self.pages > 0 && !self.bodies.is_empty() {
            return Err(mixed_bodies());
        }
        if !self.fits(PLAIN_PAGE_WIRE_BYTES) {
            return Ok(false);
        }
        self.start_if_empty();
        self.buf.truncate(self.end);
        put_u64(&mut self.buf, gfn);
        put_u8(&mut self.buf, KIND_PLAIN);
        put_u32(&mut self.buf, body_crc);
        self.end = self.buf.len();
        self.bodies_elsewhere += 1;
        self.added_entry();
        Ok(true)
    }

    /// Adds a private page of `len` bytes whose packet `seal` (SEND_UPDATE_DATA) writes
    /// straight into the chunk, so the packet is not copied again. `Ok(None)` when it would
    /// not fit (send the frame, clear, push again); on an error nothing is added.
    pub fn push_encrypted_page<E: From<MessageError>>(
        &mut self,
        gfn: u64,
        len: usize,
        seal: impl FnOnce(PacketMut<'_>) -> Result<(), E>,
    ) -> Result<Option<()>, E> {
        check_packet_length(len)?;
        let wire_len = ENCRYPTED_PAGE_OVERHEAD + len;
        if !self.fits(wire_len) {
            return Ok(None);
        }
        self.start_if_empty();
        let (start, end) = (self.end, self.end + wire_len);
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        let page = &mut self.buf[start..end];
        page[..8].copy_from_slice(&gfn.to_le_bytes());
        page[8] = KIND_ENCRYPTED;
        let (header, rest) = page[9..].split_at_mut(PACKET_HEADER_BYTES);
        rest[..2].copy_from_slice(&(len as u16).to_le_bytes());
        let header: &mut [u8; PACKET_HEADER_BYTES] =
            header.try_into().expect("split at the header's length");
        seal(PacketMut {
            header,
            data: &mut rest[2..],
        })?;
        self.end = end;
        self.added_entry();
        Ok(Some(()))
    }

    /// Pages added since the last [`clear`](Self::clear).
    pub fn len(&self) -> usize {
        self.pages
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// The complete frame to write, or `None` when no page was added.
    pub fn frame(&mut self) -> Option<ChunkFrame<'_>> {
        if self.pages == 0 {
            return None;
        }
        let index_len = (self.end - HEADER_BYTES - CHUNK_HEAD_BYTES) as u32;
        let body_bytes = self.bodies.len() + self.bodies_elsewhere * PAGE_SIZE;
        let head = &mut self.buf[..self.end];
        head[HEADER_BYTES..HEADER_BYTES + 4].copy_from_slice(&(self.pages as u32).to_le_bytes());
        head[HEADER_BYTES + 4..HEADER_BYTES + 8].copy_from_slice(&index_len.to_le_bytes());
        // Last: the checksum covers the header, the page count and the index length, then
        // the entries hashed already.
        seal_hashed(
            head,
            MessageType::MemoryChunk,
            body_bytes,
            HEADER_BYTES + CHUNK_HEAD_BYTES,
            &self.index_crc,
        );
        Some(ChunkFrame {
            head: &self.buf[..self.end],
            bodies: &self.bodies,
            bodies_elsewhere: self.bodies_elsewhere,
        })
    }

    /// Starts the next chunk, keeping the buffers.
    pub fn clear(&mut self) {
        self.end = 0;
        self.pages = 0;
    }
}

fn mixed_bodies() -> MessageError {
    MessageError::MixedBodies
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::protocol::frame::{encode_frame, read_frame};

    /// The frame's bytes, where the encoder holds them all.
    fn whole(encoder: &mut ChunkEncoder) -> Vec<u8> {
        let mut out = Vec::new();
        encoder.frame().unwrap().append_to(&mut out);
        out
    }

    #[test]
    fn plain_pages_sent_after_the_head_make_the_frame_pushed_pages_do() {
        let pages = [[7u8; PAGE_SIZE], [0; PAGE_SIZE], [9; PAGE_SIZE]];
        let (mut elsewhere, mut pushed) = (ChunkEncoder::new(), ChunkEncoder::new());
        for (gfn, bytes) in (1u64..).zip(&pages) {
            assert!(elsewhere
                .push_plain_elsewhere(gfn, body_crc(bytes))
                .unwrap());
            let content = PageContentRef::Plain(bytes);
            assert!(pushed.push(PageRef { gfn, content }).unwrap());
        }
        let frame = elsewhere.frame().unwrap();
        assert_eq!((frame.bodies.len(), frame.bodies_elsewhere), (0, 3));
        let mut wire = frame.head.to_vec();
        for bytes in &pages {
            wire.extend_from_slice(bytes);
        }
        assert_eq!(frame.len(), wire.len());
        assert_eq!(wire, whole(&mut pushed));
        let index = frame.index().unwrap();
        let gfns: Vec<u64> = index.entries().map(|e| e.gfn).collect();
        assert_eq!(gfns, [1, 2, 3]);

        // One chunk does not mix bodies held and bodies sent after it.
        let plain = PageRef {
            gfn: 9,
            content: PageContentRef::Plain(&pages[0]),
        };
        assert!(matches!(
            elsewhere.push(plain),
            Err(MessageError::MixedBodies)
        ));
        assert!(matches!(
            pushed.push_plain_elsewhere(9, 0),
            Err(MessageError::MixedBodies)
        ));
        // A cleared encoder takes either again.
        pushed.clear();
        assert!(pushed.push_plain_elsewhere(9, 0).unwrap());
    }

    #[test]
    fn plain_pages_filled_in_place_encode_as_pushed_pages_do() {
        let (page, zero_page) = ([7u8; PAGE_SIZE], [0u8; PAGE_SIZE]);
        let (mut filled, mut pushed) = (ChunkEncoder::new(), ChunkEncoder::new());
        for (gfn, bytes) in [(1u64, &page), (2, &zero_page), (3, &page)] {
            let went_zero = filled
                .push_plain_filled(gfn, true, |dst| {
                    dst.copy_from_slice(bytes);
                    Ok::<(), MessageError>(())
                })
                .unwrap()
                .unwrap();
            assert_eq!(went_zero, bytes == &zero_page);
            let content = if went_zero {
                PageContentRef::Zero
            } else {
                PageContentRef::Plain(bytes)
            };
            assert!(pushed.push(PageRef { gfn, content }).unwrap());
        }
        // Without the zero-page feature a zero page goes in full.
        let full = filled.push_plain_filled(4, false, |dst| {
            dst.fill(0);
            Ok::<(), MessageError>(())
        });
        assert_eq!(full.unwrap(), Some(false));
        let content = PageContentRef::Plain(&zero_page);
        assert!(pushed.push(PageRef { gfn: 4, content }).unwrap());
        assert_eq!(whole(&mut filled), whole(&mut pushed));
        // A failing read leaves the chunk as it was.
        let before = filled.len();
        let failed =
            filled.push_plain_filled(5, true, |_| Err(MessageError::Truncated { field: "gone" }));
        assert!(failed.is_err());
        assert_eq!(filled.len(), before);
        assert_eq!(whole(&mut filled), whole(&mut pushed));
    }

    #[test]
    fn a_plain_page_damaged_on_the_way_is_named_and_the_rest_of_its_chunk_is_whole() {
        use crate::protocol::frame::FrameReader;
        let chunk = MemoryChunk {
            pages: vec![plain(1, 0x11), zero(2), plain(3, 0x33), encrypted(4, 32)],
        };
        let frame = encode_frame(&Message::MemoryChunk(chunk.clone())).unwrap();
        // The last byte of page 3's body: the bodies end the frame.
        let mut torn = frame.clone();
        *torn.last_mut().unwrap() ^= 0x40;
        let mut reader = FrameReader::new();
        let raw = reader
            .read(&mut torn.as_slice())
            .expect("the index is intact");
        let parsed = MemoryChunkRef::parse(raw.payload).unwrap();
        let arrived: Vec<_> = parsed
            .arrived()
            .map(|a| match a {
                Arrived::Page(page) => Ok(page.gfn),
                Arrived::Damaged { gfn } => Err(gfn),
            })
            .collect();
        assert_eq!(arrived, [Ok(1), Ok(2), Err(3), Ok(4)]);
        // An owned decode has no use for a damaged page.
        assert!(read_frame(&mut torn.as_slice()).is_err());
        assert_eq!(
            read_frame(&mut frame.as_slice()).unwrap().message,
            Message::MemoryChunk(chunk)
        );

        // A flipped bit in the index (page 1's number) fails the frame checksum.
        let mut index = frame.clone();
        index[HEADER_BYTES + CHUNK_HEAD_BYTES] ^= 0x01;
        assert!(matches!(
            FrameReader::new().read(&mut index.as_slice()),
            Err(crate::protocol::ProtocolError::Corrupted { .. })
        ));
    }

    #[test]
    fn bodies_left_on_the_stream_are_read_after_the_index_and_an_early_end_is_a_truncation() {
        use crate::protocol::frame::FrameReader;
        use crate::protocol::ProtocolError;
        let chunk = MemoryChunk {
            pages: vec![plain(1, 1), zero(2), plain(3, 3)],
        };
        let frame = encode_frame(&Message::MemoryChunk(chunk)).unwrap();
        let mut reader = FrameReader::new();
        let mut stream = frame.as_slice();
        let (raw, mut bodies) = reader.read_to_bodies(&mut stream).unwrap();
        let index = ChunkIndex::parse_followed_by(raw.payload, bodies.len()).unwrap();
        assert_eq!(index.len(), 3);
        let mut got = vec![0; 2 * PAGE_SIZE];
        bodies.read_exact(&mut got).unwrap();
        assert!(bodies.is_empty());
        assert!(got[..PAGE_SIZE].iter().all(|&b| b == 1));
        assert!(got[PAGE_SIZE..].iter().all(|&b| b == 3));

        // The stream ends 100 bytes into the second body: the link, not the chunk, failed.
        let cut = &frame[..frame.len() - PAGE_SIZE + 100];
        let mut stream = cut;
        let (_, mut bodies) = reader.read_to_bodies(&mut stream).unwrap();
        bodies.read_exact(&mut got[..PAGE_SIZE]).unwrap();
        let short = bodies.read_exact(&mut got[PAGE_SIZE..]).unwrap_err();
        assert!(
            matches!(
                short,
                ProtocolError::TruncatedPayload { kind: MessageType::MemoryChunk, got, .. }
                    if got == (cut.len() - HEADER_BYTES) as u64
            ),
            "{short:?}"
        );
        // Other frames are read whole, nothing left.
        let ack = encode_frame(&Message::Ack).unwrap();
        let mut stream = ack.as_slice();
        let (raw, bodies) = reader.read_to_bodies(&mut stream).unwrap();
        assert_eq!((raw.header.kind, bodies.len()), (MessageType::Ack, 0));
        // Bodies that do not match the index are refused.
        let head_len = frame.len() - 2 * PAGE_SIZE - HEADER_BYTES;
        let head = &frame[HEADER_BYTES..HEADER_BYTES + head_len];
        assert!(ChunkIndex::parse_followed_by(head, PAGE_SIZE as u64).is_err());
        assert!(ChunkIndex::parse_followed_by(head, 3 * PAGE_SIZE as u64).is_err());
    }

    /// Hands out at most `step` bytes a read.
    struct Trickle<'a> {
        bytes: &'a [u8],
        step: usize,
    }

    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.step).min(self.bytes.len());
            buf[..n].copy_from_slice(&self.bytes[..n]);
            self.bytes = &self.bytes[n..];
            Ok(n)
        }
    }

    #[test]
    fn the_checksum_covers_the_index_however_the_bytes_arrive() {
        use crate::protocol::frame::FrameReader;
        let chunk = MemoryChunk {
            pages: vec![plain(1, 1), encrypted(2, 64), zero(3), plain(4, 4)],
        };
        let frame = encode_frame(&Message::MemoryChunk(chunk)).unwrap();
        let body_start = frame.len() - 2 * PAGE_SIZE;
        for step in [1, 3, 5, 7, 4096] {
            let read = |bytes: &[u8]| {
                let mut trickle = Trickle { bytes, step };
                FrameReader::new()
                    .read(&mut trickle)
                    .map(|raw| raw.payload.len())
            };
            assert_eq!(read(&frame).unwrap(), frame.len() - HEADER_BYTES, "{step}");
            for at in [HEADER_BYTES + 3, HEADER_BYTES + 6, body_start - 1] {
                let mut bad = frame.clone();
                bad[at] ^= 0x80;
                assert!(read(&bad).is_err(), "step {step}, byte {at}");
            }
            let mut body = frame.clone();
            body[body_start] ^= 0x80;
            assert!(read(&body).is_ok(), "a body is not the frame's to check");
        }
    }

    #[derive(Debug, PartialEq)]
    enum SealFailed {
        Firmware,
        Chunk,
    }

    impl From<MessageError> for SealFailed {
        fn from(_: MessageError) -> Self {
            SealFailed::Chunk
        }
    }

    #[test]
    fn encrypted_pages_sealed_in_place_encode_as_pushed_packets_do() {
        let header = [0x5au8; PACKET_HEADER_BYTES];
        let (mut in_place, mut pushed) = (ChunkEncoder::new(), ChunkEncoder::new());
        for (gfn, len, fill) in [(1u64, PAGE_SIZE, 3u8), (9, 16, 4), (2, 4080, 5)] {
            let data = vec![fill; len];
            let sealed = in_place.push_encrypted_page(gfn, len, |out| {
                assert_eq!(out.data.len(), len, "room for the payload only");
                *out.header = header;
                out.data.copy_from_slice(&data);
                Ok::<(), SealFailed>(())
            });
            assert_eq!(sealed, Ok(Some(())));
            let content = PageContentRef::Encrypted {
                header: &header,
                data: &data,
            };
            assert!(pushed.push(PageRef { gfn, content }).unwrap());
        }
        assert_eq!(whole(&mut in_place), whole(&mut pushed));
        let frame = whole(&mut in_place);
        let decoded = MemoryChunkRef::parse(&frame[HEADER_BYTES..]).unwrap();
        let packet = decoded.pages().nth(1).unwrap().content.packet().unwrap();
        assert_eq!((packet.header, packet.data), (&header, &[4u8; 16][..]));

        // A firmware error, or a length no packet has, adds nothing.
        let before = in_place.len();
        let failed = in_place.push_encrypted_page(5, PAGE_SIZE, |_| Err(SealFailed::Firmware));
        assert_eq!(failed, Err(SealFailed::Firmware));
        let odd = in_place.push_encrypted_page(6, 100, |_| -> Result<(), SealFailed> {
            panic!("not sealed: 100 is not a multiple of 16")
        });
        assert_eq!(odd, Err(SealFailed::Chunk));
        assert_eq!(in_place.len(), before);
        assert_eq!(whole(&mut in_place), whole(&mut pushed));
    }

    #[test]
    fn an_encrypted_page_that_does_not_fit_is_left_for_the_next_chunk() {
        let mut encoder = ChunkEncoder::new();
        let seal = |out: PacketMut<'_>| {
            out.data.fill(1);
            Ok::<(), SealFailed>(())
        };
        let mut pushed = 0;
        while encoder
            .push_encrypted_page(pushed, PAGE_SIZE, seal)
            .unwrap()
            .is_some()
        {
            pushed += 1;
        }
        assert_eq!(encoder.len() as u64, pushed);
        let frame = encoder.frame().unwrap();
        assert!(frame.len() as u64 <= HEADER_BYTES as u64 + MAX_CHUNK_BYTES);
        assert!(
            frame.len() + ENCRYPTED_PAGE_OVERHEAD + PAGE_SIZE
                > HEADER_BYTES + MAX_CHUNK_BYTES as usize
        );
    }
    use crate::protocol::messages::Message;
    use crate::protocol::shape::tests::two_region_shape;

    pub(crate) fn plain(gfn: u64, fill: u8) -> Page {
        Page {
            gfn,
            content: PageContent::Plain(Box::new([fill; PAGE_SIZE])),
        }
    }

    pub(crate) fn zero(gfn: u64) -> Page {
        Page {
            gfn,
            content: PageContent::Zero,
        }
    }

    pub(crate) fn encrypted(gfn: u64, len: usize) -> Page {
        Page {
            gfn,
            content: PageContent::from(Packet {
                header: [0xa5; PACKET_HEADER_BYTES],
                data: vec![0xc3; len],
            }),
        }
    }

    fn round_trip(chunk: &MemoryChunk) {
        let message = Message::MemoryChunk(chunk.clone());
        let frame = encode_frame(&message).unwrap();
        assert_eq!(frame.len(), HEADER_BYTES + chunk.payload_len());
        let back = read_frame(&mut frame.as_slice()).unwrap();
        assert_eq!(back.message, message);
    }

    #[test]
    fn chunks_of_every_kind_round_trip() {
        round_trip(&MemoryChunk {
            pages: vec![
                zero(0),
                plain(1, 0x11),
                encrypted(2, 16),
                encrypted(3, PAGE_SIZE),
                zero(u64::MAX),
            ],
        });
    }

    #[test]
    fn the_largest_chunks_round_trip() {
        // As many plain pages as fit the byte limit.
        let fit = (MAX_CHUNK_BYTES as usize - CHUNK_HEAD_BYTES) / PLAIN_PAGE_WIRE_BYTES;
        let pages = (0..fit as u64).map(|g| plain(g, g as u8)).collect();
        let chunk = MemoryChunk { pages };
        assert!(chunk.payload_len() as u64 <= MAX_CHUNK_BYTES);
        assert!((chunk.payload_len() + PLAIN_PAGE_WIRE_BYTES) as u64 > MAX_CHUNK_BYTES);
        round_trip(&chunk);
        // The most pages a chunk may have.
        let pages = (0..MAX_CHUNK_PAGES as u64).map(zero).collect();
        round_trip(&MemoryChunk { pages });
        // Full-size encrypted pages.
        let fit = (MAX_CHUNK_BYTES as usize - CHUNK_HEAD_BYTES) / (8 + 1 + 52 + 2 + PAGE_SIZE);
        let pages = (0..fit as u64).map(|g| encrypted(g, PAGE_SIZE)).collect();
        round_trip(&MemoryChunk { pages });
    }

    #[test]
    fn a_zero_page_costs_nine_bytes_and_a_plain_page_4109() {
        let cost = |pages: Vec<Page>| {
            encode_frame(&Message::MemoryChunk(MemoryChunk { pages }))
                .unwrap()
                .len()
        };
        // Alone in its frame, a zero page costs header + count and index length + 9 bytes.
        assert_eq!(cost(vec![zero(0)]), HEADER_BYTES + 8 + 9);
        // In a full chunk, the frame overhead vanishes: about 9 bytes a page.
        let full = cost((0..MAX_CHUNK_PAGES as u64).map(zero).collect());
        assert!(full <= MAX_CHUNK_PAGES * 10, "{full}");
        assert!(full.div_ceil(MAX_CHUNK_PAGES) <= 16);
        // A plain page: the page plus 13 bytes (its CRC among them), and the frame's 32 once.
        assert_eq!(cost(vec![plain(0, 1)]), PAGE_SIZE + 13 + HEADER_BYTES + 8);
        let many = cost((0..1000).map(|g| plain(g, 1)).collect());
        assert!(many <= 1000 * (PAGE_SIZE + 14), "{many}");
    }

    #[test]
    fn bad_encrypted_lengths_are_refused_both_ways() {
        for len in [0, 15, 17, PAGE_SIZE + 16] {
            let chunk = MemoryChunk {
                pages: vec![encrypted(1, len)],
            };
            assert!(encode_frame(&Message::MemoryChunk(chunk)).is_err(), "{len}");
        }
        // Hand-made: an encrypted page claiming 17 bytes.
        let mut payload = 1u32.to_le_bytes().to_vec();
        payload.extend_from_slice(&(8 + 1 + PACKET_HEADER_BYTES as u32 + 2 + 17).to_le_bytes());
        payload.extend_from_slice(&5u64.to_le_bytes());
        payload.push(KIND_ENCRYPTED);
        payload.extend_from_slice(&[0; PACKET_HEADER_BYTES]);
        payload.extend_from_slice(&17u16.to_le_bytes());
        payload.extend_from_slice(&[0; 17]);
        assert!(matches!(
            MemoryChunkRef::parse(&payload),
            Err(MessageError::InvalidValue {
                field: "encrypted page length",
                value: 17
            })
        ));
    }

    #[test]
    fn malformed_chunks_are_typed_errors() {
        let mut payload = Vec::new();
        MemoryChunk {
            pages: vec![plain(7, 7), zero(8)],
        }
        .encode(&mut payload)
        .unwrap();
        for n in 0..payload.len() {
            assert!(MemoryChunkRef::parse(&payload[..n]).is_err(), "prefix {n}");
        }
        let mut trailing = payload.clone();
        trailing.push(0);
        assert!(matches!(
            MemoryChunkRef::parse(&trailing),
            Err(MessageError::TrailingBytes { count: 1 })
        ));
        let mut kind = payload.clone();
        kind[CHUNK_HEAD_BYTES + 8] = 3;
        assert!(matches!(
            MemoryChunkRef::parse(&kind),
            Err(MessageError::InvalidValue {
                field: "page kind",
                value: 3
            })
        ));
        let head = |count: u32, index_len: u32| {
            let mut head = count.to_le_bytes().to_vec();
            head.extend_from_slice(&index_len.to_le_bytes());
            head
        };
        assert!(matches!(
            MemoryChunkRef::parse(&head(0, 0)),
            Err(MessageError::InvalidValue {
                field: "page count",
                ..
            })
        ));
        assert!(matches!(
            MemoryChunkRef::parse(&head(MAX_CHUNK_PAGES as u32 + 1, 0)),
            Err(MessageError::TooMany { .. })
        ));
        // An index too short for its page count, or longer than the payload.
        assert!(MemoryChunkRef::parse(&head(2, 9)).is_err());
        let mut long = head(1, u32::MAX);
        long.extend_from_slice(&[0; 9]);
        assert!(MemoryChunkRef::parse(&long).is_err());
        // A plain page without its body.
        let mut bodiless = Vec::new();
        MemoryChunk {
            pages: vec![plain(7, 7)],
        }
        .encode(&mut bodiless)
        .unwrap();
        bodiless.truncate(bodiless.len() - PAGE_SIZE);
        assert!(matches!(
            MemoryChunkRef::parse(&bodiless),
            Err(MessageError::Truncated {
                field: "plain page"
            })
        ));
        assert!(MemoryChunk::default().encode(&mut Vec::new()).is_err());
    }

    #[test]
    fn chunks_are_validated_against_the_shape() {
        let shape = two_region_shape(None);
        let inside = MemoryChunk {
            pages: vec![zero(0), plain(1 << 20, 0)],
        };
        assert_eq!(inside.validate(&shape), Ok(()));
        let outside = MemoryChunk {
            pages: vec![zero(0), zero(1 << 19)],
        };
        assert_eq!(
            outside.validate(&shape),
            Err(ShapeError::GfnOutsideRam { gfn: 1 << 19 })
        );
        let twice = MemoryChunk {
            pages: vec![zero(5), plain(5, 1)],
        };
        assert_eq!(
            twice.validate(&shape),
            Err(ShapeError::RepeatedGfn { gfn: 5 })
        );
        let mut payload = Vec::new();
        twice.encode(&mut payload).unwrap();
        assert_eq!(
            MemoryChunkRef::parse(&payload).unwrap().validate(&shape),
            Err(ShapeError::RepeatedGfn { gfn: 5 })
        );
    }

    #[test]
    fn the_encoder_builds_the_same_frames_and_stops_at_the_limits() {
        let pages: Vec<Page> = (0..4000u64)
            .map(|g| match g % 3 {
                0 => zero(g),
                1 => plain(g, g as u8),
                _ => encrypted(g, 16 * (1 + g as usize % 256)),
            })
            .collect();
        let mut encoder = ChunkEncoder::new();
        let mut wire = Vec::new();
        let mut frames = 0;
        for page in &pages {
            if !encoder.push(page.as_ref()).unwrap() {
                encoder.frame().unwrap().append_to(&mut wire);
                frames += 1;
                encoder.clear();
                assert!(encoder.push(page.as_ref()).unwrap());
            }
        }
        encoder.frame().unwrap().append_to(&mut wire);
        frames += 1;
        assert!(frames > 1);
        let mut stream = wire.as_slice();
        let mut back = Vec::new();
        for _ in 0..frames {
            let frame = read_frame(&mut stream).unwrap();
            let Message::MemoryChunk(chunk) = frame.message else {
                panic!("not a chunk")
            };
            assert!(chunk.payload_len() as u64 <= MAX_CHUNK_BYTES);
            back.extend(chunk.pages);
        }
        assert!(stream.is_empty());
        assert_eq!(back, pages);

        // Byte for byte what `encode_frame` makes, checksum included, also when the buffer is
        // reused for the next chunk.
        for chunk in [&pages[..3], &pages[10..12]] {
            encoder.clear();
            for page in chunk {
                assert!(encoder.push(page.as_ref()).unwrap());
            }
            let owned = Message::MemoryChunk(MemoryChunk {
                pages: chunk.to_vec(),
            });
            assert_eq!(whole(&mut encoder), encode_frame(&owned).unwrap());
        }

        // The page-count limit holds too.
        let mut encoder = ChunkEncoder::new();
        for g in 0..MAX_CHUNK_PAGES as u64 {
            assert!(encoder.push(zero(g).as_ref()).unwrap());
        }
        assert!(!encoder.push(zero(0).as_ref()).unwrap());
        assert_eq!(encoder.len(), MAX_CHUNK_PAGES);
        // A bad page is refused and leaves the chunk as it was.
        let mut encoder = ChunkEncoder::new();
        assert!(encoder.push(zero(1).as_ref()).unwrap());
        assert!(encoder.push(encrypted(2, 3).as_ref()).is_err());
        let frame = whole(&mut encoder);
        assert_eq!(frame.len(), HEADER_BYTES + 8 + 9);
        let Message::MemoryChunk(left) = read_frame(&mut frame.as_slice()).unwrap().message else {
            panic!("not a chunk")
        };
        assert_eq!(
            left.pages,
            vec![zero(1)],
            "checksummed as the page it holds"
        );
        assert!(ChunkEncoder::new().frame().is_none());
    }
}
