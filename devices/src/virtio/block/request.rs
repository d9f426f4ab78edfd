//! One virtio-blk request: parsed from its descriptor chain, checked, served (virtio 1.2 §5.2.6).
//!
//! A request is a header (type, reserved, sector) in the chain's readable part, then data,
//! then a status byte, the last byte of its writable part. `virtio-queue`'s `Reader` and
//! `Writer` lay the chain out whatever its descriptor boundaries; both are built before any
//! data moves, so a chain with any buffer the guard refuses is refused whole.

use std::io::{self, Read, Write};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{Bytes, GuestAddress};

use super::disk::{Disk, SECTOR_SIZE};
use crate::virtio::GuardedMemory;

/// Bytes in a request header: `le32 type, le32 reserved, le64 sector` (virtio 1.2 §5.2.6).
const HEADER_LEN: usize = 16;

/// The disk's identity returned by GET_ID.
pub(super) type DiskId = [u8; VIRTIO_BLK_ID_BYTES as usize];

/// Why a request failed; the guest sees only the status byte, the log sees this.
#[derive(Debug, thiserror::Error)]
pub(super) enum RequestError {
    /// The chain does not hold a request.
    #[error("Malformed request: {0}")]
    Malformed(&'static str),
    /// A buffer is outside guest memory or in a page the guard refused.
    #[error("Request buffers are not all reachable")]
    Unreachable(#[source] virtio_queue::Error),
    /// The data runs past the end of the disk.
    #[error("Request for {len} bytes at sector {sector} is beyond the disk's {capacity} sectors")]
    BeyondCapacity {
        sector: u64,
        len: u64,
        capacity: u64,
    },
    /// A write to a read-only disk.
    #[error("Write to a read-only disk")]
    ReadOnly,
    /// A request type the device does not serve.
    #[error("Unsupported request type {0}")]
    Unsupported(u32),
    /// The host's I/O failed.
    #[error("Disk I/O failed")]
    Io(#[source] io::Error),
}

impl RequestError {
    fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A byte range of the disk that a request may touch: checked against the capacity once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DiskRange {
    offset: u64,
    len: u64,
}

impl DiskRange {
    fn new(sector: u64, len: u64, capacity: u64) -> Result<Self, RequestError> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(RequestError::Malformed(
                "data is not a whole number of sectors",
            ));
        }
        match sector.checked_add(len / SECTOR_SIZE) {
            Some(end) if end <= capacity => Ok(Self {
                offset: sector * SECTOR_SIZE,
                len,
            }),
            _ => Err(RequestError::BeyondCapacity {
                sector,
                len,
                capacity,
            }),
        }
    }
}

/// What the device does for one request, once its header is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    Read(DiskRange),
    Write(DiskRange),
    Flush,
    GetId,
}

/// Serves one chain and returns how many bytes it wrote into the chain (the used length).
pub(super) fn serve(
    mem: &GuardedMemory<'_>,
    chain: DescriptorChain<&GuardedMemory<'_>>,
    disk: &Disk,
    id: &DiskId,
    bounce: &mut [u8],
) -> u32 {
    let buffers = Reader::new(mem, chain.clone())
        .and_then(|reader| Writer::new(mem, chain.clone()).map(|writer| (reader, writer)));
    let (mut reader, mut writer) = match buffers {
        Ok(buffers) => buffers,
        Err(e) => {
            let e = RequestError::Unreachable(e);
            tracing::debug!(error = %e, "virtio-blk request refused");
            return report_without_buffers(mem, chain, e.status());
        }
    };
    let Some(data_len) = writer.available_bytes().checked_sub(1) else {
        tracing::debug!("virtio-blk request without a status byte: dropped");
        return 0;
    };
    let Ok(mut status) = writer.split_at(data_len) else {
        return 0;
    };
    let code = match execute(&mut reader, &mut writer, disk, id, bounce) {
        Ok(()) => VIRTIO_BLK_S_OK as u8,
        Err(e) => {
            match &e {
                RequestError::Io(_) => {
                    tracing::warn!(disk = %disk.path().display(), error = %e, "virtio-blk request failed")
                }
                _ => tracing::debug!(error = %e, "virtio-blk request failed"),
            }
            e.status()
        }
    };
    if status.write_all(&[code]).is_err() {
        return 0;
    }
    (writer.bytes_written() + 1) as u32
}

fn execute<B: BitmapSlice>(
    reader: &mut Reader<'_, B>,
    writer: &mut Writer<'_, B>,
    disk: &Disk,
    id: &DiskId,
    bounce: &mut [u8],
) -> Result<(), RequestError> {
    match parse(reader, writer, disk)? {
        Request::Read(range) => {
            let mut done = 0;
            while done < range.len {
                let n = chunk(range.len - done, bounce.len());
                disk.read_at(&mut bounce[..n], range.offset + done)
                    .map_err(RequestError::Io)?;
                writer
                    .write_all(&bounce[..n])
                    .map_err(|_| RequestError::Malformed("data buffers shorter than the read"))?;
                done += n as u64;
            }
            Ok(())
        }
        Request::Write(range) => {
            let mut done = 0;
            while done < range.len {
                let n = chunk(range.len - done, bounce.len());
                reader
                    .read_exact(&mut bounce[..n])
                    .map_err(|_| RequestError::Malformed("data buffers shorter than the write"))?;
                disk.write_at(&bounce[..n], range.offset + done)
                    .map_err(RequestError::Io)?;
                done += n as u64;
            }
            Ok(())
        }
        Request::Flush => disk.flush().map_err(RequestError::Io),
        Request::GetId => {
            // The driver's buffer may be shorter than the id; what fits is what it gets.
            let n = writer.available_bytes().min(id.len());
            writer
                .write_all(&id[..n])
                .map_err(|_| RequestError::Malformed("id buffer vanished"))
        }
    }
}

fn parse<B: BitmapSlice>(
    reader: &mut Reader<'_, B>,
    writer: &Writer<'_, B>,
    disk: &Disk,
) -> Result<Request, RequestError> {
    let mut header = [0u8; HEADER_LEN];
    reader
        .read_exact(&mut header)
        .map_err(|_| RequestError::Malformed("no complete header"))?;
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..]);
    let sector = u64::from_le_bytes(sector);
    match kind {
        VIRTIO_BLK_T_IN => Ok(Request::Read(DiskRange::new(
            sector,
            writer.available_bytes() as u64,
            disk.sectors(),
        )?)),
        VIRTIO_BLK_T_OUT if disk.read_only() => Err(RequestError::ReadOnly),
        VIRTIO_BLK_T_OUT => Ok(Request::Write(DiskRange::new(
            sector,
            reader.available_bytes() as u64,
            disk.sectors(),
        )?)),
        VIRTIO_BLK_T_FLUSH => Ok(Request::Flush),
        VIRTIO_BLK_T_GET_ID => Ok(Request::GetId),
        other => Err(RequestError::Unsupported(other)),
    }
}

fn chunk(left: u64, bounce: usize) -> usize {
    usize::try_from(left).map_or(bounce, |left| left.min(bounce))
}

/// A chain whose buffers cannot all be reached still gets its status if the status byte can
/// be: the last byte of its last writable descriptor, written through the guard.
fn report_without_buffers(
    mem: &GuardedMemory<'_>,
    chain: DescriptorChain<&GuardedMemory<'_>>,
    code: u8,
) -> u32 {
    let Some(last) = chain.writable().last() else {
        return 0;
    };
    let Some(status) = last
        .len()
        .checked_sub(1)
        .and_then(|off| last.addr().0.checked_add(u64::from(off)))
    else {
        return 0;
    };
    match mem.write_obj(code, GuestAddress(status)) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}
