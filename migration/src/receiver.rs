//! The target side: accept a guest over any byte stream, fill a new VM's memory with it and
//! hand back its state; run it only once the source has let it go.
//!
//! In three steps, so the VM can be built in between: [`accept`] reads the `Hello` and says
//! yes or no (nothing is applied before), [`Incoming::receive_into`] writes memory and returns
//! the saved state, and after the VM has restored it, [`Incoming::acknowledge`] and
//! [`Incoming::wait_complete`] tell when the guest may run.

use std::io::{Read, Write};

use veil_hypervisor::memory::PAGE_SIZE;
use veil_hypervisor::vm::VmSnapshot;
use veil_hypervisor::GuestMemory;
use veil_sev::firmware::{Firmware, Handle, Packet, SendStart};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::protocol::{
    read_frame, write_frame, Features, FrameReader, HelloReply, MemoryChunkRef, Message,
    MessageType, PageContentRef, ProtocolError, ReceiverAction, ReceiverSession, SessionError,
    VmShape,
};

/// Why receiving failed; whatever arrived is discarded.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("Refused the incoming guest: {0}")]
    Refused(String),
    #[error("The source ended the migration: {0}")]
    Aborted(String),
    #[error("The source sent {0} out of turn")]
    OutOfTurn(String),
    #[error("Migration protocol error")]
    Protocol(#[from] ProtocolError),
    #[error("Migration out of order")]
    Session(#[from] SessionError),
    #[error("Cannot write guest memory")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("The guest state cannot be decoded")]
    State(#[from] serde_json::Error),
    #[error("An encrypted page arrived without an SEV session to receive it")]
    Sev,
    #[error("The source's PDH certificate does not decode")]
    BadPdh,
    #[error("SEV firmware error")]
    Firmware(#[from] veil_sev::firmware::FirmwareError),
}

/// Makes the page at `at` zero, writing it only if it is not zero already: fresh target RAM
/// is, and a write would make the kernel allocate (and clear) a page the guest may never touch,
/// where a read maps the shared zero page. Most of an idle guest's RAM arrives as zero pages.
fn write_zero_page(
    memory: &GuestMemory,
    at: GuestAddress,
    scratch: &mut [u8],
) -> Result<(), vm_memory::GuestMemoryError> {
    memory.read_slice(scratch, at)?;
    if scratch.iter().any(|&b| b != 0) {
        scratch.fill(0);
        memory.write_slice(scratch, at)?;
    }
    Ok(())
}

/// A guest whose source has been accepted.
pub struct Incoming<S> {
    stream: S,
    session: ReceiverSession,
    shape: VmShape,
}

/// Reads the source's `Hello` and accepts the guest if `check` (this host's judgement of the
/// VM's shape) agrees; otherwise tells the source why not.
/// `sev_chain` is this host's SEV certificate chain (encoded), when it can receive SEV guests.
pub fn accept<S: Read + Write>(
    mut stream: S,
    check: impl FnOnce(&VmShape) -> Result<(), String>,
    sev_chain: Option<Vec<u8>>,
) -> Result<Incoming<S>, ReceiveError> {
    let mut session = ReceiverSession::new();
    let frame = read_frame(&mut stream)?;
    let action = session.on_message(&frame.message);
    let hello = match (action, frame.message) {
        (Ok(ReceiverAction::CheckHello), Message::Hello(hello)) => hello,
        (Err(e), _) => {
            let _ = write_frame(&mut stream, &Message::error(crate::error_chain(&e)));
            return Err(e.into());
        }
        (Ok(other), _) => return Err(ReceiveError::OutOfTurn(format!("{other:?}"))),
    };
    let sev = hello.vm.sev().is_some();
    let es = hello
        .vm
        .sev()
        .is_some_and(|s| s.policy.has(veil_sev::policy::GuestPolicy::ES));
    let verdict = if es {
        Err("SEV-ES and SEV-SNP guests cannot be migrated: upstream KVM cannot receive their encrypted register state (VMSA)".to_string())
    } else if sev && sev_chain.is_none() {
        Err("this host does not receive SEV guests (start veil receive with --sev)".to_string())
    } else {
        check(&hello.vm)
    };
    let reply = match &verdict {
        Ok(()) => HelloReply::accept(
            hello.features.intersection(Features::KNOWN),
            if sev { sev_chain } else { None },
        ),
        Err(reason) => HelloReply::refuse(reason.clone()),
    };
    let reply = Message::HelloReply(reply);
    session.send(&reply)?;
    write_frame(&mut stream, &reply)?;
    verdict.map_err(ReceiveError::Refused)?;
    Ok(Incoming {
        stream,
        session,
        shape: hello.vm,
    })
}

impl<S: Read + Write> Incoming<S> {
    /// The guest's memory layout and vCPUs: build the VM to match.
    pub fn shape(&self) -> &VmShape {
        &self.shape
    }

    /// Writes arriving memory into `memory` until the state arrives, and returns it. An SEV
    /// guest's private pages go through `firmware` (RECEIVE_START, RECEIVE_UPDATE_DATA,
    /// RECEIVE_FINISH); its handle for the guest is returned with the state.
    pub fn receive_into(
        &mut self,
        memory: &GuestMemory,
        firmware: Option<&mut dyn Firmware>,
    ) -> Result<(VmSnapshot, Option<Handle>), ReceiveError> {
        let result = self.receive_memory(memory, firmware);
        if let Err(e) = &result {
            self.report(e);
        }
        result
    }

    fn receive_memory(
        &mut self,
        memory: &GuestMemory,
        mut firmware: Option<&mut dyn Firmware>,
    ) -> Result<(VmSnapshot, Option<Handle>), ReceiveError> {
        let mut scratch = vec![0u8; PAGE_SIZE as usize];
        let mut sev: Option<veil_sev::flow::Receiver<'_>> = None;
        // One buffer for every frame, and chunks applied straight from it: no copy per page.
        let mut reader = FrameReader::new();
        loop {
            let raw = reader.read(&mut self.stream)?;
            if raw.header.kind == MessageType::MemoryChunk {
                let chunk = MemoryChunkRef::parse(raw.payload).map_err(|source| {
                    ProtocolError::Payload {
                        kind: MessageType::MemoryChunk,
                        source,
                    }
                })?;
                match self.session.on_memory_chunk(&chunk)? {
                    ReceiverAction::WritePages => {}
                    other => return Err(ReceiveError::OutOfTurn(format!("{other:?}"))),
                }
                // The session has checked every gfn against the VM's RAM, none twice.
                for page in chunk.pages() {
                    let at = GuestAddress(page.gfn * PAGE_SIZE);
                    match page.content {
                        PageContentRef::Zero => write_zero_page(memory, at, &mut scratch)?,
                        PageContentRef::Plain(bytes) => memory.write_slice(bytes, at)?,
                        PageContentRef::Encrypted { header, data } => {
                            let receiver = sev.as_mut().ok_or(ReceiveError::Sev)?;
                            let packet = Packet {
                                header: *header,
                                data: data.to_vec(),
                            };
                            // Decrypted in place in guest RAM, as the PSP does on hardware.
                            let dest = memory.get_slice(at, data.len())?;
                            receiver.update_data(&packet, &dest)?;
                        }
                    }
                }
                continue;
            }
            let frame = raw.decode()?;
            match self.session.on_message(&frame.message)? {
                ReceiverAction::StartSev => {
                    use sev::parser::Decoder;
                    let Message::SevStart(start) = &frame.message else {
                        unreachable!("the session said StartSev")
                    };
                    let firmware = firmware.take().ok_or(ReceiveError::Sev)?;
                    let pdh =
                        sev::certs::sev::sev::Certificate::decode(&mut start.pdh.as_slice(), ())
                            .map_err(|_| ReceiveError::BadPdh)?;
                    let start = SendStart {
                        policy: start.policy,
                        pdh,
                        session: start.session,
                    };
                    sev = Some(veil_sev::flow::Receiver::start(firmware, &start)?);
                }
                ReceiverAction::Finish => {
                    let Message::State(state) = &frame.message else {
                        unreachable!("the session said Finish")
                    };
                    let snapshot = serde_json::from_slice(&state.bytes)?;
                    let handle = sev.take().map(|r| r.finish()).transpose()?;
                    return Ok((snapshot, handle));
                }
                ReceiverAction::ReplySynced => {
                    // Everything before the Sync is in guest memory (or the firmware).
                    self.session.send(&Message::Synced)?;
                    write_frame(&mut self.stream, &Message::Synced)?;
                }
                ReceiverAction::Discard { reason, .. } => {
                    return Err(ReceiveError::Aborted(reason))
                }
                other => return Err(ReceiveError::OutOfTurn(format!("{other:?}"))),
            }
        }
    }

    /// The guest is ready here (restored, paused): tell the source, which then stops it.
    pub fn acknowledge(&mut self) -> Result<(), ReceiveError> {
        self.session.send(&Message::Ack)?;
        write_frame(&mut self.stream, &Message::Ack)?;
        Ok(())
    }

    /// Waits for the source's `Complete`: from then on the guest runs only here.
    pub fn wait_complete(&mut self) -> Result<(), ReceiveError> {
        let frame = read_frame(&mut self.stream)?;
        match self.session.on_message(&frame.message)? {
            ReceiverAction::Run => Ok(()),
            ReceiverAction::Discard { reason, .. } => Err(ReceiveError::Aborted(reason)),
            other => Err(ReceiveError::OutOfTurn(format!("{other:?}"))),
        }
    }

    /// Tells the source why this side gave up (best effort: the link may be gone), causes
    /// included: "Migration protocol error" alone would leave the source guessing. Any error
    /// will do: building the VM for the guest can fail as well as receiving it.
    pub fn report(&mut self, error: &dyn std::error::Error) {
        if self.session.ending().is_none() {
            let _ = write_frame(&mut self.stream, &Message::error(crate::error_chain(error)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_hypervisor::memory::{GuestRam, MemoryConfig};

    #[test]
    fn a_zero_page_is_written_only_where_the_page_is_not_zero_already() {
        let ram = GuestRam::new(&MemoryConfig {
            size: 16 << 20,
            file: None,
        })
        .unwrap();
        let memory = ram.memory();
        memory
            .write_obj(0xabu8, GuestAddress(5 * PAGE_SIZE + 100))
            .unwrap();
        ram.take_vmm_dirty_pages();
        let mut scratch = vec![0u8; PAGE_SIZE as usize];
        write_zero_page(memory, GuestAddress(4 * PAGE_SIZE), &mut scratch).unwrap();
        write_zero_page(memory, GuestAddress(5 * PAGE_SIZE), &mut scratch).unwrap();
        let byte: u8 = memory.read_obj(GuestAddress(5 * PAGE_SIZE + 100)).unwrap();
        assert_eq!(byte, 0, "the page that held data is zero now");
        // Only that page was written: the fresh one was left alone (never allocated).
        let dirty: Vec<u64> = ram
            .take_vmm_dirty_pages()
            .iter()
            .flat_map(|b| {
                b.dirty_addresses()
                    .map(|a| a.0 / PAGE_SIZE)
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(dirty, [5]);
    }
}
