//! Memory chunks: the hot path. Pages are explicit binary records, never serde.
//!
//! ```text
//! chunk   = page_count u32 (1 ..= MAX_CHUNK_PAGES) | page * page_count
//! page    = gfn u64 | kind u8 | body
//!   kind 0  Zero       (no body: 9 bytes on the wire)
//!   kind 1  Plain      4096 bytes
//!   kind 2  Encrypted  header [52] | data_len u16 | data [data_len]
//!                      (data_len 16 ..= 4096, a multiple of 16: a SEND_UPDATE_DATA packet)
//! ```
//!
//! Owned [`MemoryChunk`]s are for tests and small users; the sender fills a [`ChunkEncoder`]
//! straight from guest memory and the receiver walks a [`MemoryChunkRef`] over the frame it
//! read, so pages are copied once on each side. Decoding does not know the VM: the session
//! checks each chunk against the [`VmShape`] before anything is written.

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
/// Bytes a plain page costs inside a chunk.
pub const PLAIN_PAGE_WIRE_BYTES: usize = 8 + 1 + PAGE_SIZE;
/// An encrypted page's bytes besides its payload: gfn, kind, packet header, payload length.
const ENCRYPTED_PAGE_OVERHEAD: usize = 8 + 1 + PACKET_HEADER_BYTES + 2;
/// Bytes the page count costs, once per chunk.
const COUNT_BYTES: usize = 4;

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
    /// Bytes this page costs inside a chunk.
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

    fn encode(&self, out: &mut Vec<u8>) -> Result<(), MessageError> {
        if let PageContentRef::Encrypted { data, .. } = self.content {
            check_packet_length(data.len())?;
        }
        put_u64(out, self.gfn);
        match self.content {
            PageContentRef::Zero => put_u8(out, KIND_ZERO),
            PageContentRef::Plain(bytes) => {
                put_u8(out, KIND_PLAIN);
                out.extend_from_slice(bytes);
            }
            PageContentRef::Encrypted { header, data } => {
                put_u8(out, KIND_ENCRYPTED);
                out.extend_from_slice(header);
                put_u16(out, data.len() as u16);
                out.extend_from_slice(data);
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

fn decode_page<'a>(c: &mut Cursor<'a>) -> Result<PageRef<'a>, MessageError> {
    let gfn = c.u64("page number")?;
    let content = match c.u8("page kind")? {
        KIND_ZERO => PageContentRef::Zero,
        KIND_PLAIN => PageContentRef::Plain(c.array("plain page")?),
        KIND_ENCRYPTED => {
            let header = c.array("packet header")?;
            let len = c.u16("encrypted page length")?;
            check_packet_length(len.into())?;
            let data = c.take(len.into(), "encrypted page")?;
            PageContentRef::Encrypted { header, data }
        }
        kind => {
            return Err(MessageError::InvalidValue {
                field: "page kind",
                value: kind.into(),
            })
        }
    };
    Ok(PageRef { gfn, content })
}

fn decode_count(c: &mut Cursor<'_>) -> Result<usize, MessageError> {
    match c.count("pages", MAX_CHUNK_PAGES)? {
        0 => Err(MessageError::InvalidValue {
            field: "page count",
            value: 0,
        }),
        n => Ok(n),
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
        COUNT_BYTES
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
        for page in &self.pages {
            page.as_ref().encode(out)?;
        }
        Ok(())
    }

    pub(crate) fn decode(payload: &[u8]) -> Result<Self, MessageError> {
        let chunk = MemoryChunkRef::parse(payload)?;
        Ok(MemoryChunk {
            pages: chunk.pages().map(|p| p.to_owned()).collect(),
        })
    }
}

/// A chunk checked in place inside a received payload; its pages borrow from it.
#[derive(Debug, Clone, Copy)]
pub struct MemoryChunkRef<'a> {
    count: usize,
    pages: &'a [u8],
}

impl<'a> MemoryChunkRef<'a> {
    /// Checks the whole payload's layout once; iterating the pages then cannot fail.
    pub fn parse(payload: &'a [u8]) -> Result<Self, MessageError> {
        let mut c = Cursor::new(payload);
        let count = decode_count(&mut c)?;
        // Every page costs at least a zero page's bytes: refuse a count the payload cannot hold.
        if count * ZERO_PAGE_WIRE_BYTES > c.remaining() {
            return Err(MessageError::Truncated { field: "pages" });
        }
        let pages = &payload[COUNT_BYTES..];
        for _ in 0..count {
            decode_page(&mut c)?;
        }
        c.finish()?;
        Ok(Self { count, pages })
    }

    /// Number of pages.
    pub fn len(&self) -> usize {
        self.count
    }

    /// Always false: a chunk carries at least one page.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn pages(&self) -> ChunkPages<'a> {
        ChunkPages {
            cursor: Cursor::new(self.pages),
            left: self.count,
        }
    }

    /// Checks the chunk against the VM: every page in RAM, none twice.
    pub fn validate(&self, shape: &VmShape) -> Result<(), ShapeError> {
        shape.check_gfns(self.pages().map(|p| p.gfn))
    }
}

/// The pages of a [`MemoryChunkRef`], in wire order.
#[derive(Clone)]
pub struct ChunkPages<'a> {
    cursor: Cursor<'a>,
    left: usize,
}

impl<'a> Iterator for ChunkPages<'a> {
    type Item = PageRef<'a>;

    fn next(&mut self) -> Option<PageRef<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        // `parse` checked every page already.
        decode_page(&mut self.cursor).ok()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

/// Builds one MemoryChunk frame at a time in a reusable buffer, straight from borrowed
/// pages, stopping at the limits a receiver enforces.
///
/// ```
/// use veil_migration::protocol::chunk::{ChunkEncoder, PageContentRef, PageRef};
/// let mut encoder = ChunkEncoder::new();
/// let mut wire = Vec::new();
/// for gfn in 0..10_000 {
///     let page = PageRef { gfn, content: PageContentRef::Zero };
///     if !encoder.push(page).unwrap() {
///         wire.extend_from_slice(encoder.frame().unwrap());
///         encoder.clear();
///         assert!(encoder.push(page).unwrap());
///     }
/// }
/// wire.extend_from_slice(encoder.frame().unwrap());
/// ```
#[derive(Debug, Default)]
pub struct ChunkEncoder {
    /// Frame header, page count, pages, up to `end`. Bytes past it, from earlier chunks, stay
    /// as they are, so a page copied in from guest memory is not zeroed first.
    buf: Vec<u8>,
    /// The end of the chunk being built.
    end: usize,
    pages: usize,
    /// CRC state of the pages so far, each hashed as it was added: right after its copy, it
    /// is in the cache, where a pass over the whole chunk at the end reads megabytes back.
    pages_crc: crc32fast::Hasher,
    /// Where the pages not yet hashed start.
    hashed_to: usize,
}

impl ChunkEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The payload bytes so far (the page count included, even before the first page).
    fn payload_len(&self) -> usize {
        self.end.saturating_sub(HEADER_BYTES).max(COUNT_BYTES)
    }

    /// Before the first page: room for the header and the page count.
    fn start_if_empty(&mut self) {
        if self.pages == 0 {
            self.end = HEADER_BYTES + COUNT_BYTES;
            if self.buf.len() < self.end {
                self.buf.resize(self.end, 0);
            }
            self.pages_crc.reset();
            self.hashed_to = self.end;
        }
    }

    /// Counts the page just written (up to `end`), and hashes it.
    fn added_page(&mut self) {
        self.pages_crc.update(&self.buf[self.hashed_to..self.end]);
        self.hashed_to = self.end;
        self.pages += 1;
    }

    /// Adds a page; `Ok(false)` when it would not fit (send the frame, clear, push again).
    pub fn push(&mut self, page: PageRef<'_>) -> Result<bool, MessageError> {
        if self.pages == MAX_CHUNK_PAGES
            || (self.payload_len() + page.wire_len()) as u64 > MAX_CHUNK_BYTES
        {
            return Ok(false);
        }
        let rollback = self.end;
        self.start_if_empty();
        self.buf.truncate(self.end);
        let encoded = page.encode(&mut self.buf);
        if let Err(e) = encoded {
            self.end = rollback;
            return Err(e);
        }
        self.end = self.buf.len();
        self.added_page();
        Ok(true)
    }

    /// Room for one more page of `wire_len` bytes, as `start..end` in the buffer, or `None`
    /// when it would not fit. The page counts only once its writer moves `end` and `pages`.
    fn reserve(&mut self, wire_len: usize) -> Option<(usize, usize)> {
        if self.pages == MAX_CHUNK_PAGES || (self.payload_len() + wire_len) as u64 > MAX_CHUNK_BYTES
        {
            return None;
        }
        self.start_if_empty();
        let (start, end) = (self.end, self.end + wire_len);
        if self.buf.len() < end {
            self.buf.resize(end, 0);
        }
        Some((start, end))
    }

    /// Adds a page in the clear whose bytes `fill` writes straight into the chunk (one copy
    /// from guest memory, not two); with `zero_pages`, an all-zero page is sent as a zero page
    /// instead. `Ok(None)` when it would not fit (send the frame, clear, push again);
    /// otherwise whether it went as a zero page.
    pub fn push_clear_page<E>(
        &mut self,
        gfn: u64,
        zero_pages: bool,
        fill: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<Option<bool>, E> {
        let Some((start, end)) = self.reserve(PLAIN_PAGE_WIRE_BYTES) else {
            return Ok(None);
        };
        self.buf[start..start + 8].copy_from_slice(&gfn.to_le_bytes());
        self.buf[start + 8] = KIND_PLAIN;
        let data = &mut self.buf[start + 9..end];
        fill(data)?;
        let zero = zero_pages && is_zero(data);
        if zero {
            self.buf[start + 8] = KIND_ZERO;
            self.end = start + ZERO_PAGE_WIRE_BYTES;
        } else {
            self.end = end;
        }
        self.added_page();
        Ok(Some(zero))
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
        let Some((start, end)) = self.reserve(ENCRYPTED_PAGE_OVERHEAD + len) else {
            return Ok(None);
        };
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
        self.added_page();
        Ok(Some(()))
    }

    /// Pages added since the last [`clear`](Self::clear).
    pub fn len(&self) -> usize {
        self.pages
    }

    pub fn is_empty(&self) -> bool {
        self.pages == 0
    }

    /// The complete frame (header included) to write, or `None` when no page was added.
    pub fn frame(&mut self) -> Option<&[u8]> {
        if self.pages == 0 {
            return None;
        }
        let frame = &mut self.buf[..self.end];
        frame[HEADER_BYTES..HEADER_BYTES + COUNT_BYTES]
            .copy_from_slice(&(self.pages as u32).to_le_bytes());
        // Last: the checksum covers the count and the header, then the pages hashed already.
        seal_hashed(
            frame,
            MessageType::MemoryChunk,
            HEADER_BYTES + COUNT_BYTES,
            &self.pages_crc,
        );
        Some(frame)
    }

    /// Starts the next chunk, keeping the buffer.
    pub fn clear(&mut self) {
        self.end = 0;
        self.pages = 0;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::protocol::frame::{encode_frame, read_frame};

    #[test]
    fn clear_pages_filled_in_place_encode_as_pushed_pages_do() {
        let page = [7u8; PAGE_SIZE];
        let zero = [0u8; PAGE_SIZE];
        let (mut in_place, mut pushed) = (ChunkEncoder::new(), ChunkEncoder::new());
        for (gfn, bytes) in [(1u64, &page), (2, &zero), (3, &page)] {
            let went_zero = in_place
                .push_clear_page(gfn, true, |dst| {
                    dst.copy_from_slice(bytes);
                    Ok::<(), ()>(())
                })
                .unwrap()
                .unwrap();
            assert_eq!(went_zero, bytes == &zero);
            let content = if went_zero {
                PageContentRef::Zero
            } else {
                PageContentRef::Plain(bytes)
            };
            assert!(pushed.push(PageRef { gfn, content }).unwrap());
        }
        // Without the zero-page feature a zero page goes in full.
        assert_eq!(
            in_place
                .push_clear_page(4, false, |dst| {
                    dst.fill(0);
                    Ok::<(), ()>(())
                })
                .unwrap(),
            Some(false)
        );
        assert!(pushed
            .push(PageRef {
                gfn: 4,
                content: PageContentRef::Plain(&zero)
            })
            .unwrap());
        assert_eq!(in_place.frame().unwrap(), pushed.frame().unwrap());
        // A failing read leaves the chunk as it was.
        let before = in_place.len();
        assert_eq!(
            in_place.push_clear_page(5, true, |_| Err("gone")),
            Err("gone")
        );
        assert_eq!(in_place.len(), before);
        assert_eq!(in_place.frame().unwrap(), pushed.frame().unwrap());
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
        assert_eq!(in_place.frame().unwrap(), pushed.frame().unwrap());
        let decoded = MemoryChunkRef::parse(&in_place.frame().unwrap()[HEADER_BYTES..]).unwrap();
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
        assert_eq!(in_place.frame().unwrap(), pushed.frame().unwrap());
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
        let fit = (MAX_CHUNK_BYTES as usize - COUNT_BYTES) / PLAIN_PAGE_WIRE_BYTES;
        let pages = (0..fit as u64).map(|g| plain(g, g as u8)).collect();
        let chunk = MemoryChunk { pages };
        assert!(chunk.payload_len() as u64 <= MAX_CHUNK_BYTES);
        assert!((chunk.payload_len() + PLAIN_PAGE_WIRE_BYTES) as u64 > MAX_CHUNK_BYTES);
        round_trip(&chunk);
        // The most pages a chunk may have.
        let pages = (0..MAX_CHUNK_PAGES as u64).map(zero).collect();
        round_trip(&MemoryChunk { pages });
        // Full-size encrypted pages.
        let fit = (MAX_CHUNK_BYTES as usize - COUNT_BYTES) / (8 + 1 + 52 + 2 + PAGE_SIZE);
        let pages = (0..fit as u64).map(|g| encrypted(g, PAGE_SIZE)).collect();
        round_trip(&MemoryChunk { pages });
    }

    #[test]
    fn a_zero_page_costs_nine_bytes_and_a_plain_page_4105() {
        let cost = |pages: Vec<Page>| {
            encode_frame(&Message::MemoryChunk(MemoryChunk { pages }))
                .unwrap()
                .len()
        };
        // Alone in its frame, a zero page costs header + count + 9 bytes.
        assert_eq!(cost(vec![zero(0)]), HEADER_BYTES + 4 + 9);
        // In a full chunk, the frame overhead vanishes: about 9 bytes a page.
        let full = cost((0..MAX_CHUNK_PAGES as u64).map(zero).collect());
        assert!(full <= MAX_CHUNK_PAGES * 10, "{full}");
        assert!(full.div_ceil(MAX_CHUNK_PAGES) <= 16);
        // A plain page: the page plus 9 bytes, and the frame's 28 once.
        assert_eq!(cost(vec![plain(0, 1)]), PAGE_SIZE + 9 + HEADER_BYTES + 4);
        let many = cost((0..1000).map(|g| plain(g, 1)).collect());
        assert!(many <= 1000 * (PAGE_SIZE + 10), "{many}");
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
        kind[4 + 8] = 3;
        assert!(matches!(
            MemoryChunkRef::parse(&kind),
            Err(MessageError::InvalidValue {
                field: "page kind",
                value: 3
            })
        ));
        assert!(matches!(
            MemoryChunkRef::parse(&0u32.to_le_bytes()),
            Err(MessageError::InvalidValue {
                field: "page count",
                ..
            })
        ));
        assert!(matches!(
            MemoryChunkRef::parse(&(MAX_CHUNK_PAGES as u32 + 1).to_le_bytes()),
            Err(MessageError::TooMany { .. })
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
                wire.extend_from_slice(encoder.frame().unwrap());
                frames += 1;
                encoder.clear();
                assert!(encoder.push(page.as_ref()).unwrap());
            }
        }
        wire.extend_from_slice(encoder.frame().unwrap());
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
            assert_eq!(encoder.frame().unwrap(), encode_frame(&owned).unwrap());
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
        let frame = encoder.frame().unwrap().to_vec();
        assert_eq!(frame.len(), HEADER_BYTES + 4 + 9);
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
