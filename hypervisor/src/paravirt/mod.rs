//! Paravirtual interfaces for SEV guests: the page-encryption hypercall, the migration-control
//! MSR, the page-state map they feed, and the migration blockers. See `docs/paravirt.md`.

pub mod blockers;
pub mod map_gpa_range;
pub mod migration_control;
pub mod page_state;
pub mod setup;
mod state;

pub use blockers::{BlockReason, Blocker, BlockerEvent, Migratability, MigrationBlockers};
pub use page_state::{PageRun, PageState, PageStateMap, PageStateSnapshot};
pub use setup::{ParavirtFeatures, TransportChoice};
pub use state::{Paravirt, ParavirtSnapshot, RestoreError};
