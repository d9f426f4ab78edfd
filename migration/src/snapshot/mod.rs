//! Snapshots: a paused VM saved into a directory, and VMs restored from it, as many at once as
//! wanted.
//!
//! ```text
//! DIR/state           checked file (file.rs): migration frames, the same serialization a
//!                     migration sends: Hello (the VM's shape: RAM, vCPUs, CPUID, TSC, SEV
//!                     policy), SevStart (SEV guests: what RECEIVE_START needs), State (vCPUs,
//!                     devices, page-state map, migration control and blockers)
//! DIR/memory          guest RAM, raw and sparse (file offset = guest address, RAM above the
//!                     32-bit MMIO hole following at 3 GiB); an SEV guest's private pages are
//!                     holes here
//! DIR/private-pages   SEV guests only: checked file of memory chunks whose pages the firmware
//!                     encrypted for the platform the snapshot is for (SEND_UPDATE_DATA)
//! DIR/diff            diff snapshots only: the snapshot this one goes on top of, and which
//!                     pages `memory` holds (diff.rs); the others are the parent's
//! ```
//!
//! Files are written under temporary names and renamed into place, the state last, so a
//! directory either holds a whole snapshot or none. A restored VM maps `memory`
//! copy-on-write and never writes any of them.

pub mod diff;
pub mod file;
mod load;
mod save;

pub use diff::{DiffBase, DIFF_FILE};
pub use file::{FileError, FORMAT_VERSION};
pub use load::Snapshot;
pub use save::{snapshot, AfterSnapshot, SavePages, SnapshotReport, SnapshotSev};

use std::path::PathBuf;

use crate::protocol::{MessageType, ProtocolError};

/// The state file's name in a snapshot directory.
pub const STATE_FILE: &str = "state";
/// The memory file's name.
pub const MEMORY_FILE: &str = "memory";
/// The SEV private pages' file name.
pub const PRIVATE_PAGES_FILE: &str = "private-pages";

/// Why a snapshot could not be taken or read; a guest being saved runs on as before.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("Cannot use {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} exists: a snapshot directory holds one snapshot, choose another", path.display())]
    Exists { path: PathBuf },
    #[error(transparent)]
    File(#[from] FileError),
    #[error("The snapshot's state does not decode")]
    Frames(#[from] ProtocolError),
    #[error("The snapshot's state holds {0} out of place")]
    Unexpected(MessageType),
    #[error("The snapshot's state lacks {0}")]
    Missing(&'static str),
    #[error("The snapshot's memory file {} holds {found} bytes, but the guest has {expected} bytes of RAM", path.display())]
    MemorySize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("The snapshot's pages do not fit the guest's RAM")]
    Shape(#[from] Box<crate::protocol::ShapeError>),
    #[error("The guest cannot be saved: it is permanently blocked: {0}")]
    PermanentlyBlocked(String),
    #[error("The guest cannot be saved now: {0}")]
    TemporarilyBlocked(String),
    #[error("An SEV guest is saved and restored only with its SEV firmware context, a plain guest without one")]
    Sev,
    #[error("SEV-ES and SEV-SNP guests cannot be saved: upstream KVM cannot send their encrypted register state (VMSA)")]
    SevEs,
    #[error("A migration of this guest is under way: save it once the migration has ended")]
    Migrating,
    #[error("The guest stopped before it could be saved")]
    GuestStopped,
    #[error("An SEV PDH certificate does not encode or decode")]
    Pdh,
    #[error("This SEV platform cannot receive the snapshot (it was made for another platform's certificate chain)")]
    ReceiveStart(#[source] veil_sev::firmware::FirmwareError),
    #[error("SEV firmware error")]
    Firmware(#[from] veil_sev::firmware::FirmwareError),
    #[error("Cannot encode a memory chunk")]
    Chunk(#[from] crate::protocol::MessageError),
    #[error("Cannot read the guest's state")]
    Vm(#[from] veil_hypervisor::VmError),
    #[error("Cannot describe the VM")]
    Describe(#[from] Box<crate::sender::SendError>),
    #[error("Cannot read or write guest memory")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("The guest's state does not encode or decode")]
    State(#[from] serde_json::Error),
    #[error("No earlier snapshot of this VM to save a diff against: take a full snapshot first (one that lets the guest run on)")]
    NoDiffBase,
    #[error("Cannot use the dirty log")]
    DirtyLog(#[from] veil_hypervisor::memory::MemoryError),
    #[error("The dirty log no longer holds every write since the snapshot in {}: something else used it since (a migration, or a diff snapshot that failed); take a full snapshot", base.display())]
    DiffBaseStale { base: PathBuf },
    #[error("An SEV guest's snapshot cannot be live: its private pages go through the firmware once, with the guest paused")]
    LiveSev,
    #[error("An SEV guest's snapshot cannot be a diff: each snapshot has a SEND_START session of its own, and a restore receives one session")]
    DiffSev,
    #[error("The parent path {} is too long for a diff file", path.display())]
    DiffParentPath { path: PathBuf },
    #[error("{} is not a usable diff file: {why}", path.display())]
    DiffFile { path: PathBuf, why: &'static str },
    #[error("The diff snapshot's parent {} cannot be used (moved, deleted or damaged?)", path.display())]
    Parent {
        path: PathBuf,
        #[source]
        source: Box<SnapshotError>,
    },
    #[error("The diff snapshot's parent {} is not the snapshot it was taken on top of (its state file changed)", path.display())]
    ParentChanged { path: PathBuf },
    #[error("The diff snapshot's parent {} is of a VM with other memory, or of an SEV guest", path.display())]
    ParentShape { path: PathBuf },
    #[error("The diff snapshot in {} is more than {} snapshots away from a full one", path.display(), diff::MAX_DIFF_CHAIN)]
    DiffChainTooLong { path: PathBuf },
}
