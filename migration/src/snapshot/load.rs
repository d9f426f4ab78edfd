//! Reading a snapshot back: its checked state file, the memory file's size, and for an SEV
//! guest the private pages received through the firmware into the new VM's memory.

use std::path::{Path, PathBuf};

use veil_hypervisor::memory::PAGE_SIZE;
use veil_hypervisor::vm::VmSnapshot;
use veil_hypervisor::GuestMemory;
use veil_sev::firmware::{Firmware, Handle, SendStart};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::diff::{self, DiffFile, MAX_DIFF_CHAIN};
use super::file::{self, FileKind};
use super::{SnapshotError, MEMORY_FILE, PRIVATE_PAGES_FILE, STATE_FILE};
use crate::protocol::{
    FrameReader, MemoryChunkRef, Message, MessageType, ProtocolError, SevStart, VmShape,
};

/// A snapshot directory whose state file has been checked and decoded.
#[derive(Debug)]
pub struct Snapshot {
    dir: PathBuf,
    shape: VmShape,
    sev_start: Option<SevStart>,
    state: Vec<u8>,
    /// The memory file of the full snapshot at the bottom of a chain of diffs (this
    /// snapshot's own if it is full).
    base_memory: PathBuf,
    /// The diffs over it, oldest first: each one's memory file and which pages it holds.
    layers: Vec<(PathBuf, DiffFile)>,
}

impl Snapshot {
    /// Reads and checks `dir`: the state file's format version and checksum, its contents,
    /// and that the memory file has the guest's RAM size. A diff's parents are checked the
    /// same way, back to the full snapshot, and each must be the very snapshot the diff
    /// was taken on top of.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        Self::open_diffs_deep(dir, 0)
    }

    fn open_diffs_deep(dir: &Path, depth: usize) -> Result<Self, SnapshotError> {
        let payload = file::read(&dir.join(STATE_FILE), FileKind::State)?;
        let mut reader = FrameReader::new();
        let mut input = payload.as_slice();
        let mut shape = None;
        let mut sev_start = None;
        let mut state = None;
        while !input.is_empty() {
            let frame = reader.read(&mut input)?.decode()?;
            match frame.message {
                Message::Hello(hello) if shape.is_none() => shape = Some(hello.vm),
                Message::SevStart(start) if shape.is_some() && sev_start.is_none() => {
                    sev_start = Some(start)
                }
                Message::State(s) if shape.is_some() && state.is_none() => state = Some(s.bytes),
                other => return Err(SnapshotError::Unexpected(other.kind())),
            }
        }
        let shape = shape.ok_or(SnapshotError::Missing("the VM's shape"))?;
        let state = state.ok_or(SnapshotError::Missing("the VM's state"))?;
        if shape.sev().is_some() != sev_start.is_some() {
            return Err(SnapshotError::Missing("the SEV receive start"));
        }
        let memory = dir.join(MEMORY_FILE);
        let found = std::fs::metadata(&memory)
            .map_err(|source| SnapshotError::Io {
                path: memory.clone(),
                source,
            })?
            .len();
        if found != shape.ram_bytes() {
            return Err(SnapshotError::MemorySize {
                path: memory,
                found,
                expected: shape.ram_bytes(),
            });
        }
        let (base_memory, layers) = match diff::read(dir, shape.ram_bytes() / PAGE_SIZE)? {
            None => (memory, Vec::new()),
            Some(diff) => {
                if sev_start.is_some() {
                    return Err(SnapshotError::DiffSev);
                }
                if depth >= MAX_DIFF_CHAIN {
                    return Err(SnapshotError::DiffChainTooLong {
                        path: dir.to_owned(),
                    });
                }
                let parent = Self::parent_of(&diff, depth)?;
                if parent.shape.memory() != shape.memory() || parent.sev_start.is_some() {
                    return Err(SnapshotError::ParentShape { path: diff.parent });
                }
                let mut layers = parent.layers;
                layers.push((memory, diff));
                (parent.base_memory, layers)
            }
        };
        Ok(Self {
            dir: dir.to_owned(),
            shape,
            sev_start,
            state,
            base_memory,
            layers,
        })
    }

    /// The snapshot `diff` goes on top of, if it is still the one it was taken against.
    fn parent_of(diff: &DiffFile, depth: usize) -> Result<Self, SnapshotError> {
        let path = diff.parent.clone();
        let parent_error = |source| SnapshotError::Parent {
            path: path.clone(),
            source: Box::new(source),
        };
        let digest = diff::state_digest(&path).map_err(parent_error)?;
        if digest != diff.parent_digest {
            return Err(SnapshotError::ParentChanged { path });
        }
        Self::open_diffs_deep(&path, depth + 1).map_err(|e| match e {
            too_long @ SnapshotError::DiffChainTooLong { .. } => too_long,
            other => parent_error(other),
        })
    }

    /// The guest's memory layout, vCPUs, CPUID and SEV policy: build the VM to match.
    pub fn shape(&self) -> &VmShape {
        &self.shape
    }

    /// The guest's RAM, to be mapped copy-on-write: a diff's is its full snapshot's, which
    /// [`Snapshot::restore_into`] then overlays with the diffs' pages.
    pub fn memory_file(&self) -> PathBuf {
        self.base_memory.clone()
    }

    /// The saved state, decoded, and for an SEV guest its private pages received into
    /// `memory` through `firmware` (RECEIVE_START, RECEIVE_UPDATE_DATA, RECEIVE_FINISH) with
    /// the firmware's handle for the guest. `memory` must already map the memory file.
    pub fn restore_into(
        &self,
        memory: &GuestMemory,
        firmware: Option<&mut dyn Firmware>,
    ) -> Result<(VmSnapshot, Option<Handle>), SnapshotError> {
        let state: VmSnapshot = serde_json::from_slice(&self.state)?;
        for (path, diff) in &self.layers {
            apply_diff(memory, path, diff)?;
        }
        let Some(start) = &self.sev_start else {
            return Ok((state, None));
        };
        let firmware = firmware.ok_or(SnapshotError::Sev)?;
        use sev::parser::Decoder;
        let pdh = sev::certs::sev::sev::Certificate::decode(&mut start.pdh.as_slice(), ())
            .map_err(|_| SnapshotError::Pdh)?;
        let start = SendStart {
            policy: start.policy,
            pdh,
            session: start.session,
        };
        let mut receiver = veil_sev::flow::Receiver::start(firmware, &start)
            .map_err(SnapshotError::ReceiveStart)?;
        let payload = file::read(&self.dir.join(PRIVATE_PAGES_FILE), FileKind::PrivatePages)?;
        let mut input = payload.as_slice();
        let mut reader = FrameReader::new();
        while !input.is_empty() {
            let raw = reader.read(&mut input)?;
            if raw.header.kind != MessageType::MemoryChunk {
                return Err(SnapshotError::Unexpected(raw.header.kind));
            }
            let chunk =
                MemoryChunkRef::parse(raw.payload).map_err(|source| ProtocolError::Payload {
                    kind: MessageType::MemoryChunk,
                    source,
                })?;
            chunk.validate(&self.shape).map_err(Box::new)?;
            for page in chunk.pages() {
                let Some(packet) = page.content.packet() else {
                    return Err(SnapshotError::Unexpected(MessageType::MemoryChunk));
                };
                let at = GuestAddress(page.gfn * PAGE_SIZE);
                let dest = memory.get_slice(at, packet.data.len())?;
                receiver.update_data(packet, &dest)?;
            }
        }
        let handle = receiver.finish()?;
        Ok((state, Some(handle)))
    }
}

/// Copies the pages `diff` holds from its memory file at `path` into `memory`, which maps
/// the older snapshot's memory copy-on-write. The file is guest RAM region after region, as
/// every memory file is, so a run of file pages may span two regions.
fn apply_diff(memory: &GuestMemory, path: &Path, diff: &DiffFile) -> Result<(), SnapshotError> {
    use std::os::unix::fs::FileExt;
    let io = |source| SnapshotError::Io {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    // At most this much is read at once.
    const BATCH_PAGES: u64 = 512;
    let mut buf = Vec::new();
    let mut regions = Vec::new();
    let mut file_page = 0u64;
    for region in memory.iter() {
        let pages = region.len() / PAGE_SIZE;
        regions.push((file_page..file_page + pages, region.start_addr()));
        file_page += pages;
    }
    for (first, end) in diff.runs() {
        for (pages, start) in &regions {
            let (from, to) = (first.max(pages.start), end.min(pages.end));
            let mut at = from;
            while at < to {
                let n = BATCH_PAGES.min(to - at);
                buf.resize((n * PAGE_SIZE) as usize, 0);
                file.read_exact_at(&mut buf, at * PAGE_SIZE).map_err(io)?;
                let guest = GuestAddress(start.0 + (at - pages.start) * PAGE_SIZE);
                vm_memory::Bytes::write_slice(memory, &buf, guest)?;
                at += n;
            }
        }
    }
    Ok(())
}
