//! What a block device carries through a migration, and how the target takes the disk over.
//!
//! The disk itself is shared storage: the target opens the same file (or the path it maps the
//! disk id to) and checks it is the same size. Its lock is taken at restore, which succeeds
//! once the source has flushed and released it ([`Block::release_disk`]).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{disk_id, Block, BlockError, Disk, DiskId};
use crate::persist::Persist;

/// A block device's saved state; the queues travel with the transport's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// What GET_ID returns.
    pub id: String,
    /// The guest may only read.
    pub read_only: bool,
    /// Capacity in sectors, checked against the disk the target opens.
    pub capacity: u64,
}

/// Where the restoring side finds the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockRestoreArgs {
    /// The disk's path on this host.
    pub path: PathBuf,
}

impl Persist for Block {
    type State = BlockState;
    type ConstructorArgs = BlockRestoreArgs;
    type Error = BlockError;

    fn save(&self) -> BlockState {
        BlockState {
            id: String::from_utf8_lossy(self.id()).into_owned(),
            read_only: self.read_only(),
            capacity: self.capacity(),
        }
    }

    fn restore(args: BlockRestoreArgs, state: &BlockState) -> Result<Self, BlockError> {
        let id: DiskId = disk_id(&state.id)?;
        let disk = Disk::open(&args.path, state.read_only).map_err(BlockError::Disk)?;
        if disk.sectors() != state.capacity {
            return Err(BlockError::CapacityMismatch {
                path: args.path,
                saved: state.capacity,
                found: disk.sectors(),
            });
        }
        Self::with_disk(disk, id)
    }
}
