//! Reading a snapshot back: its checked state file, the memory file's size, and for an SEV
//! guest the private pages received through the firmware into the new VM's memory.

use std::path::{Path, PathBuf};

use veil_hypervisor::memory::PAGE_SIZE;
use veil_hypervisor::vm::VmSnapshot;
use veil_hypervisor::GuestMemory;
use veil_sev::firmware::{Firmware, Handle, Packet, SendStart};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::file::{self, FileKind};
use super::{SnapshotError, MEMORY_FILE, PRIVATE_PAGES_FILE, STATE_FILE};
use crate::protocol::{
    FrameReader, MemoryChunkRef, Message, MessageType, PageContentRef, ProtocolError, SevStart,
    VmShape,
};

/// A snapshot directory whose state file has been checked and decoded.
#[derive(Debug)]
pub struct Snapshot {
    dir: PathBuf,
    shape: VmShape,
    sev_start: Option<SevStart>,
    state: Vec<u8>,
}

impl Snapshot {
    /// Reads and checks `dir`: the state file's format version and checksum, its contents,
    /// and that the memory file has the guest's RAM size.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
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
        Ok(Self {
            dir: dir.to_owned(),
            shape,
            sev_start,
            state,
        })
    }

    /// The guest's memory layout, vCPUs, CPUID and SEV policy: build the VM to match.
    pub fn shape(&self) -> &VmShape {
        &self.shape
    }

    /// The guest's RAM, to be mapped copy-on-write.
    pub fn memory_file(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
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
                let PageContentRef::Encrypted { header, data } = page.content else {
                    return Err(SnapshotError::Unexpected(MessageType::MemoryChunk));
                };
                let packet = Packet {
                    header: *header,
                    data: data.to_vec(),
                };
                let dest = memory.get_slice(GuestAddress(page.gfn * PAGE_SIZE), data.len())?;
                receiver.update_data(&packet, &dest)?;
            }
        }
        let handle = receiver.finish()?;
        Ok((state, Some(handle)))
    }
}
