//! The target's page writer: memory chunks that the connection's thread has read, checksummed
//! and checked against the VM go into guest memory (or through the SEV firmware) on a thread of
//! their own, while the connection's thread reads the next. Writing is most of a receive's
//! work (the kernel allocates and clears every page on its first touch; RECEIVE_UPDATE_DATA
//! decrypts each private page), so where the host has a core to spare the two halves overlap.
//! A writer that fails stops at once; the connection's thread finds it gone when it next hands
//! it a chunk, a Sync or the State (within one frame of the source's), and reports its error.
//!
//! A plain page whose body fails its CRC (torn by the guest while the source sent it, or
//! damaged on the way) is not written but marked, until it arrives whole. A data stream's
//! thread uses a writer of its own, in line, and reads the bodies straight from its stream
//! ([`PageWriter::write_chunk_from`]).

use std::io::Read;
use std::sync::mpsc::{Receiver, Sender};

use veil_hypervisor::memory::PAGE_SIZE;
use veil_hypervisor::GuestMemory;
use veil_sev::firmware::{Firmware, PacketRef, SendStart};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::page_bits::PageBits;
use crate::protocol::chunk::{EntryRef, IndexEntry};
use crate::protocol::{
    Arrived, ChunkBodies, ChunkIndex, FrameReader, MemoryChunkRef, MessageType, PageContentRef,
    PageRef, ProtocolError,
};
use crate::receiver::ReceiveError;

/// Chunks read ahead of the writer: one being written, one queued, one being read. Each
/// holds at most a chunk's byte limit, so the receiver's buffers stay within three of them.
pub(crate) const FRAME_BUFFERS: usize = 3;

/// What the connection's thread hands the writer, in the order the source sent it.
pub(crate) enum Work {
    /// A frame reader whose last frame is a MemoryChunk the session has accepted (every page
    /// in RAM, none twice). It comes back on the writer's free list once written.
    Chunk(FrameReader),
    /// RECEIVE_START with the source's SEND_START, before the first encrypted page.
    StartSev(Box<SendStart>),
    /// Answered once everything before it is in guest memory (the source's Sync).
    Barrier(Sender<()>),
}

/// Writes chunks into one VM's memory; run it with [`PageWriter::run`].
pub(crate) struct PageWriter<'m, 'f> {
    memory: &'m GuestMemory,
    firmware: Option<&'f mut dyn Firmware>,
    sev: Option<veil_sev::flow::Receiver<'f>>,
    /// Shared with the other streams' writers; `None` for file-backed memory.
    written: Option<&'m PageBits>,
    /// Plain pages that arrived damaged and have not arrived whole since; shared too.
    damaged: &'m PageBits,
    scratch: Vec<u8>,
    /// Bodies read from the stream before they are checked and written.
    staged: Vec<u8>,
}

/// Bodies [`PageWriter::write_chunk_from`] reads at a time: 64 KiB, one read call, in the
/// cache while they are checked and copied.
const STAGED_BODIES: usize = 16;

impl<'m, 'f> PageWriter<'m, 'f> {
    /// A writer into `memory`, with `firmware` for an SEV guest's private pages. Anonymous
    /// `memory` must be fresh (all zero): a page this writer has not written is taken to be
    /// zero, and `written` ([`written_pages_for`]) says which pages it and the other streams'
    /// writers have written. File-backed memory may hold anything. A plain page whose body
    /// fails its CRC is not written but set in `damaged`, until it arrives whole.
    pub(crate) fn new(
        memory: &'m GuestMemory,
        firmware: Option<&'f mut dyn Firmware>,
        written: Option<&'m PageBits>,
        damaged: &'m PageBits,
    ) -> Self {
        Self {
            memory,
            firmware,
            sev: None,
            written,
            damaged,
            scratch: vec![0; PAGE_SIZE as usize],
            staged: vec![0; STAGED_BODIES * PAGE_SIZE as usize],
        }
    }

    /// Works through `work` until the connection's thread drops its end, handing each frame
    /// reader back on `free`. Returns the SEV session for RECEIVE_FINISH, which only the
    /// connection's thread may call (once the State has arrived); on an error the writer
    /// stops at once and the connection's thread sees its end of `work` closed.
    pub(crate) fn run(
        mut self,
        work: Receiver<Work>,
        free: Sender<FrameReader>,
    ) -> Result<Option<veil_sev::flow::Receiver<'f>>, ReceiveError> {
        for item in work {
            match item {
                Work::Chunk(reader) => {
                    self.write_chunk(reader.payload())?;
                    // The connection's thread may have stopped reading: then nothing is lost.
                    let _ = free.send(reader);
                }
                Work::StartSev(start) => {
                    let firmware = self.firmware.take().ok_or(ReceiveError::Sev)?;
                    self.sev = Some(veil_sev::flow::Receiver::start(firmware, &start)?);
                }
                Work::Barrier(done) => {
                    let _ = done.send(());
                }
            }
        }
        Ok(self.sev)
    }

    pub(crate) fn write_chunk(&mut self, payload: &[u8]) -> Result<(), ReceiveError> {
        let chunk = MemoryChunkRef::parse(payload).map_err(|source| ProtocolError::Payload {
            kind: MessageType::MemoryChunk,
            source,
        })?;
        self.populate_runs(chunk.index())?;
        for arrived in chunk.arrived() {
            match arrived {
                Arrived::Page(page) => self.write_page(page)?,
                Arrived::Damaged { gfn } => self.set_aside(gfn),
            }
        }
        Ok(())
    }

    /// Writes one intact page: zero, plain, or decrypted by RECEIVE_UPDATE_DATA.
    fn write_page(&mut self, page: PageRef<'_>) -> Result<(), ReceiveError> {
        self.damaged.clear(page.gfn);
        let at = GuestAddress(page.gfn * PAGE_SIZE);
        match page.content {
            PageContentRef::Zero => self.write_zero(page.gfn, at)?,
            PageContentRef::Plain(bytes) => {
                veil_hypervisor::memory::fill_unlogged(self.memory, bytes, at)?;
                self.mark_written(page.gfn);
            }
            PageContentRef::Encrypted { header, data } => {
                let receiver = self.sev.as_mut().ok_or(ReceiveError::Sev)?;
                // Read where it lies in the frame and decrypted in place in guest RAM, as the
                // PSP does on hardware.
                let dest = self.memory.get_slice(at, data.len())?;
                receiver.update_data(PacketRef { header, data }, &dest)?;
                self.mark_written(page.gfn);
            }
        }
        Ok(())
    }

    /// A plain page whose body failed its CRC, torn while the source sent it or damaged on
    /// the way: not written, and remembered until it comes again whole (the guest's write put
    /// it in the dirty log, so it does).
    fn set_aside(&self, gfn: u64) {
        self.damaged.set(gfn);
    }

    /// Writes a chunk of which only the index has been read (checked by the session): its
    /// plain pages' bodies are read from `bodies` a few at a time into a buffer that stays in
    /// the cache, checked against their CRCs there and copied into guest memory, where a
    /// whole frame read first would have gone through memory once more. For a data stream,
    /// whose thread writes its own pages.
    pub(crate) fn write_chunk_from<R: Read>(
        &mut self,
        index: &ChunkIndex<'_>,
        bodies: &mut ChunkBodies<'_, R>,
    ) -> Result<(), ReceiveError> {
        self.populate_runs(index)?;
        let mut pending = [(0u64, 0u32); STAGED_BODIES];
        let mut queued = 0;
        for IndexEntry { gfn, entry } in index.entries() {
            match entry {
                EntryRef::Plain { body_crc } => {
                    pending[queued] = (gfn, body_crc);
                    queued += 1;
                    if queued == STAGED_BODIES {
                        self.write_bodies(&pending[..queued], bodies)?;
                        queued = 0;
                    }
                }
                EntryRef::Zero => self.write_page(PageRef {
                    gfn,
                    content: PageContentRef::Zero,
                })?,
                EntryRef::Encrypted { header, data } => self.write_page(PageRef {
                    gfn,
                    content: PageContentRef::Encrypted { header, data },
                })?,
            }
        }
        self.write_bodies(&pending[..queued], bodies)
    }

    /// Reads the bodies of `pages` (number and CRC each), in order, and writes the intact ones.
    fn write_bodies<R: Read>(
        &mut self,
        pages: &[(u64, u32)],
        bodies: &mut ChunkBodies<'_, R>,
    ) -> Result<(), ReceiveError> {
        let page_bytes = PAGE_SIZE as usize;
        bodies.read_exact(&mut self.staged[..pages.len() * page_bytes])?;
        let staged = std::mem::take(&mut self.staged);
        let written = pages
            .iter()
            .zip(staged.chunks_exact(page_bytes))
            .try_for_each(|(&(gfn, crc), body)| {
                if crate::protocol::chunk::body_crc(body) != crc {
                    self.set_aside(gfn);
                    return Ok(());
                }
                let body = body.try_into().expect("a page's bytes");
                self.write_page(PageRef {
                    gfn,
                    content: PageContentRef::Plain(body),
                })
            });
        self.staged = staged;
        written
    }

    /// Faults in, in one call per run of consecutive pages, those this chunk will write
    /// (plain, or decrypted by RECEIVE_UPDATE_DATA) and, in file-backed memory, the zero pages
    /// it will read to check. A run that cannot be backed fails the receive here, where the
    /// access would have died of SIGBUS.
    fn populate_runs(&self, chunk: &ChunkIndex<'_>) -> Result<(), ReceiveError> {
        use veil_hypervisor::memory::{populate, Populate};
        let reads_zero_pages = self.written.is_none();
        let fault_in = |(first, count, how): (u64, u64, Populate)| {
            populate(
                self.memory,
                GuestAddress(first * PAGE_SIZE),
                (count * PAGE_SIZE) as usize,
                how,
            )
            .map_err(|source| ReceiveError::Unbacked {
                first,
                end: first + count,
                source,
            })
        };
        let mut run: Option<(u64, u64, Populate)> = None;
        for page in chunk.entries() {
            let how = match page.entry {
                EntryRef::Zero if reads_zero_pages => Populate::Read,
                EntryRef::Zero => continue,
                _ => Populate::Write,
            };
            run = match run {
                Some((first, count, same)) if same == how && first + count == page.gfn => {
                    Some((first, count + 1, how))
                }
                Some(done) => {
                    fault_in(done)?;
                    Some((page.gfn, 1, how))
                }
                None => Some((page.gfn, 1, how)),
            };
        }
        run.map_or(Ok(()), fault_in)
    }

    /// Untouched fresh RAM is zero already: only data an earlier pass brought is cleared.
    fn write_zero(&mut self, gfn: u64, at: GuestAddress) -> Result<(), ReceiveError> {
        match self.written.map(|w| w.clear(gfn)) {
            Some(false) => {}
            Some(true) => {
                self.scratch.fill(0);
                veil_hypervisor::memory::fill_unlogged(self.memory, &self.scratch, at)?;
            }
            None => write_zero_page(self.memory, at, &mut self.scratch)?,
        }
        Ok(())
    }

    fn mark_written(&self, gfn: u64) {
        if let Some(written) = self.written {
            written.set(gfn);
        }
    }
}

/// The pages a receive will have written, when the VM's RAM is fresh anonymous memory (as a
/// VM built to receive has): every other page is still zero, so a zero page is written only
/// over data an earlier pass brought, and never read to check (a read faults in the zero page:
/// 262,144 faults per GiB with small pages). `None` for file-backed RAM, whose pages hold what
/// the file held: there a zero page is read to check.
pub(crate) fn written_pages_for(memory: &GuestMemory) -> Option<PageBits> {
    use vm_memory::GuestMemoryRegion;
    let file_backed = memory.iter().any(|r| r.file_offset().is_some());
    (!file_backed).then(|| PageBits::covering(memory))
}

/// Makes the page at `at` zero, writing it only if it is not zero already: fresh target RAM
/// is, and a write would make the kernel allocate (and clear) a page the guest may never touch,
/// where a read maps the shared zero page. Most of an idle guest's RAM arrives as zero pages.
pub(crate) fn write_zero_page(
    memory: &GuestMemory,
    at: GuestAddress,
    scratch: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    memory.read_slice(scratch, at)?;
    if !crate::protocol::chunk::is_zero(scratch) {
        scratch.fill(0);
        veil_hypervisor::memory::fill_unlogged(memory, scratch, at)?;
    }
    Ok(())
}
