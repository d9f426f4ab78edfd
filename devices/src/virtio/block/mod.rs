//! virtio-blk over a raw file or block device (virtio 1.2 §5.2).
//!
//! One request queue, served synchronously on the device thread: IN, OUT, FLUSH (fdatasync)
//! and GET_ID. A request the device cannot serve completes with `VIRTIO_BLK_S_IOERR` (or
//! `UNSUPP` for an unknown type); nothing a guest puts in a chain stops the device.

mod disk;
mod event_handler;
mod persist;
mod request;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

pub use disk::{Disk, DiskError, SECTOR_SIZE};
pub use persist::{BlockRestoreArgs, BlockState};

use super::{
    driver_wants_interrupt, rings_shared, Activation, Active, DeviceError, InterruptCause,
    VirtioDevice, VIRTIO_RING_F_EVENT_IDX,
};
use request::DiskId;

/// The request queue's size: what Linux and Firecracker use.
pub const QUEUE_SIZE: u16 = 256;
/// Segments per request: the queue minus the header and status descriptors, as QEMU offers.
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The data a request moves goes through a buffer of this size, whatever the request's size.
const BOUNCE_LEN: usize = 128 << 10;

/// Errors creating or restoring a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk could not be opened or locked.
    #[error("Cannot use the disk")]
    Disk(#[source] DiskError),
    /// An id longer than GET_ID can return.
    #[error("Disk id {id:?} is longer than {VIRTIO_BLK_ID_BYTES} bytes")]
    IdTooLong { id: String },
    /// A queue EventFd could not be created.
    #[error("Cannot create the queue eventfd")]
    Eventfd(#[source] std::io::Error),
    /// A queue could not be created.
    #[error("Cannot create the request queue")]
    Queue(#[source] virtio_queue::Error),
    /// The disk found at restore is not the one that was saved.
    #[error("Disk {} has {found} sectors, the migrated guest's disk had {saved}", path.display())]
    CapacityMismatch {
        path: PathBuf,
        saved: u64,
        found: u64,
    },
}

/// How to open a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// File or block device.
    pub path: PathBuf,
    /// The guest may only read.
    pub read_only: bool,
    /// What GET_ID returns (at most 20 bytes); by default one derived from the file.
    pub id: Option<String>,
}

impl BlockConfig {
    /// A writable disk at `path` with the default id.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            read_only: false,
            id: None,
        }
    }
}

/// A virtio-blk device.
pub struct Block {
    disk: Disk,
    id: DiskId,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    active: Option<Active>,
    bounce: Vec<u8>,
}

impl Block {
    /// Opens and locks the disk.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let id = match &config.id {
            Some(id) => disk_id(id)?,
            None => default_id(&config.path),
        };
        let disk = Disk::open(&config.path, config.read_only).map_err(BlockError::Disk)?;
        Self::with_disk(disk, id)
    }

    fn with_disk(disk: Disk, id: DiskId) -> Result<Self, BlockError> {
        Ok(Self {
            disk,
            id,
            queues: vec![Queue::new(QUEUE_SIZE).map_err(BlockError::Queue)?],
            queue_events: vec![EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::Eventfd)?],
            active: None,
            bounce: vec![0; BOUNCE_LEN],
        })
    }

    /// The disk's path.
    pub fn path(&self) -> &Path {
        self.disk.path()
    }

    /// Capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.sectors()
    }

    /// Whether the guest may only read.
    pub fn read_only(&self) -> bool {
        self.disk.read_only()
    }

    /// The id GET_ID returns, without its zero padding.
    pub fn id(&self) -> &[u8] {
        let len = self
            .id
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(self.id.len());
        &self.id[..len]
    }

    /// Hands the disk over to a migration target: flushes, then releases the lock. The device
    /// refuses I/O (IOERR) until [`reacquire_disk`](Self::reacquire_disk).
    pub fn release_disk(&mut self) -> Result<(), DiskError> {
        self.disk.unlock()
    }

    /// Takes the disk back, when a migration failed and the guest runs on here.
    pub fn reacquire_disk(&mut self) -> Result<(), DiskError> {
        self.disk.lock()
    }

    /// `virtio_blk_config` up to `blk_size` (virtio 1.2 §5.2.4): capacity, size_max
    /// (not offered), seg_max, geometry (not offered), blk_size.
    fn config_space(&self) -> [u8; 24] {
        let mut config = [0u8; 24];
        config[0..8].copy_from_slice(&self.disk.sectors().to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        config
    }
}

fn disk_id(id: &str) -> Result<DiskId, BlockError> {
    let mut out = DiskId::default();
    if id.len() > out.len() {
        return Err(BlockError::IdTooLong { id: id.to_owned() });
    }
    out[..id.len()].copy_from_slice(id.as_bytes());
    Ok(out)
}

/// The file's device and inode: stable for the file, different for different files.
fn default_id(path: &Path) -> DiskId {
    let text = match std::fs::metadata(path) {
        Ok(meta) => format!("{:x}-{:x}", meta.dev(), meta.ino()),
        Err(_) => String::new(),
    };
    let mut id = DiskId::default();
    let n = text.len().min(id.len());
    id[..n].copy_from_slice(&text.as_bytes()[..n]);
    id
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let ro = if self.disk.read_only() {
            1 << VIRTIO_BLK_F_RO
        } else {
            0
        };
        (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | ro
            | VIRTIO_RING_F_EVENT_IDX
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config_space();
        super::read_config_space(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        // Without VIRTIO_BLK_F_CONFIG_WCE nothing in the config space is writable.
        tracing::debug!(
            offset,
            "Write to the read-only virtio-blk configuration ignored"
        );
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        self.active = Some(Active::start(&self.active, &self.queues, activation)?);
        Ok(())
    }

    fn is_active(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        for queue in &mut self.queues {
            queue.reset();
        }
    }

    fn process_queue(&mut self, index: usize) {
        let (Some(active), Some(queue)) = (&self.active, self.queues.get_mut(index)) else {
            return;
        };
        if !rings_shared(queue, &active.memory) {
            return;
        }
        let mem = active.memory.guarded();
        let mut used_any = false;
        let mut empty_passes = 0;
        loop {
            if let Err(e) = queue.disable_notification(&mem) {
                tracing::warn!(error = %e, "Cannot suppress virtio-blk notifications");
                break;
            }
            let mut served = 0;
            while let Some(chain) = queue.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                let len = request::serve(&mem, chain, &self.disk, &self.id, &mut self.bounce);
                if let Err(e) = queue.add_used(&mem, head, len) {
                    tracing::warn!(error = %e, "Cannot complete a virtio-blk request");
                    break;
                }
                served += 1;
                used_any = true;
            }
            empty_passes = if served == 0 { empty_passes + 1 } else { 0 };
            match queue.enable_notification(&mem) {
                // More arrived while notifications were off. Twice nothing served although
                // the ring claims more means its index is broken: wait for the next kick.
                Ok(true) if empty_passes < 2 => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot re-enable virtio-blk notifications");
                    break;
                }
            }
        }
        if !used_any {
            return;
        }
        if driver_wants_interrupt(queue, &mem) {
            if let Err(e) = active.interrupt.trigger(InterruptCause::UsedBuffer) {
                tracing::warn!(error = %e, "Cannot interrupt the virtio-blk driver");
            }
        }
    }

    fn quiesce(&mut self) -> Result<(), DeviceError> {
        // Requests complete before the handler returns, so only durability is left.
        if self.disk.is_locked() && !self.disk.read_only() {
            self.disk.flush().map_err(DeviceError::Backend)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
