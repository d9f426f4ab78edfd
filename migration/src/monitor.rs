//! Watching and cancelling a migration in progress.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

use crate::protocol::MigrationId;

/// Where a migration is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// No migration has run.
    #[default]
    Idle,
    /// Agreeing with the target.
    Handshake,
    /// Waiting for a temporarily blocked guest to become migratable (`--wait-ready`).
    WaitingForReady,
    /// Sending all of memory once.
    FirstPass,
    /// Sending what the guest dirtied meanwhile.
    DirtyPasses,
    /// The guest is paused: last pages and state.
    StopAndCopy,
    /// The guest runs on the target.
    Completed,
    /// The migration failed or was cancelled; the guest runs here.
    Failed,
    /// Complete was sent and the target never said Running: the guest may run there or not,
    /// so it stays stopped here until `recovery::recover` learns which.
    InDoubt,
}

impl Phase {
    /// Whether a migration is under way.
    pub fn is_active(self) -> bool {
        !matches!(self, Phase::Idle | Phase::Completed | Phase::Failed)
    }
}

/// A migration's progress, for `status` and progress displays.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Progress {
    pub phase: Phase,
    /// Dirty passes so far (after the first full one).
    pub passes: u32,
    pub bytes_sent: u64,
    pub pages_sent: u64,
    /// Pages dirty at the start of the current pass.
    pub pages_left: u64,
    /// Bytes per second over the last pass.
    pub rate: f64,
    /// Bytes per second the guest dirtied while the last pass was sent.
    pub dirty_rate: f64,
    /// Why the last migration failed, if it did.
    pub error: Option<String>,
}

/// Shared by a migration and whoever watches or cancels it.
#[derive(Debug, Default)]
pub struct MigrationMonitor {
    cancel: AtomicBool,
    progress: Mutex<Progress>,
    /// The migration this source is in doubt about: the guest must not resume here.
    in_doubt: Mutex<Option<MigrationId>>,
}

impl MigrationMonitor {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The progress now.
    pub fn progress(&self) -> Progress {
        self.lock().clone()
    }

    /// Asks the migration under way to stop; `false` when none is (one in doubt cannot be
    /// cancelled: Complete has been sent).
    pub fn cancel(&self) -> bool {
        let phase = self.lock().phase;
        let active = phase.is_active() && phase != Phase::InDoubt;
        if active {
            self.cancel.store(true, Ordering::Release);
        }
        active
    }

    /// Claims the monitor for a new migration; `false` if one is already under way.
    pub(crate) fn begin(&self) -> bool {
        let mut p = self.lock();
        if p.phase.is_active() {
            return false;
        }
        *p = Progress {
            phase: Phase::Handshake,
            ..Default::default()
        };
        self.cancel.store(false, Ordering::Release);
        true
    }

    /// Whether the guest must stay stopped here: the migration has paused it for the last
    /// pages, state and commit (from Complete on the target may run it), or is in doubt.
    pub fn holds_the_guest(&self) -> bool {
        self.lock().phase == Phase::StopAndCopy || self.in_doubt().is_some()
    }

    /// The migration this source is in doubt about, if any: while there is one, the guest
    /// must not resume here.
    pub fn in_doubt(&self) -> Option<MigrationId> {
        *self.in_doubt.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_in_doubt(&self, id: MigrationId, why: String) {
        *self.in_doubt.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
        self.update(|p| {
            p.phase = Phase::InDoubt;
            p.error = Some(why);
        });
    }

    /// The target discarded the guest: it may resume here.
    pub(crate) fn recovered(&self) {
        *self.in_doubt.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.update(|p| {
            p.phase = Phase::Failed;
            p.error = Some(
                "Complete was lost; the target discarded the guest and it runs here again".into(),
            );
        });
    }

    /// The target took the guest after all (Adopt): the migration completed, late.
    pub(crate) fn adopted(&self) {
        *self.in_doubt.lock().unwrap_or_else(|e| e.into_inner()) = None;
        self.update(|p| {
            p.phase = Phase::Completed;
            p.error = None;
        });
    }

    pub(crate) fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Acquire)
    }

    pub(crate) fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.lock());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_only_applies_to_a_migration_under_way() {
        let m = MigrationMonitor::new();
        assert!(!m.cancel());
        assert!(m.begin());
        assert!(!m.begin(), "one migration at a time");
        assert!(m.cancel());
        assert!(m.cancelled());
        m.update(|p| p.phase = Phase::Failed);
        assert!(m.begin(), "a new migration after a failed one");
        assert!(!m.cancelled(), "a new migration starts uncancelled");
    }

    #[test]
    fn a_migration_in_doubt_blocks_the_next_and_cannot_be_cancelled() {
        let m = MigrationMonitor::new();
        assert!(m.begin());
        let id = MigrationId::of_state(b"state");
        m.set_in_doubt(id, "no Running".into());
        assert_eq!(m.in_doubt(), Some(id));
        assert!(!m.cancel());
        assert!(m.holds_the_guest());
        assert!(!m.begin(), "no second migration of a guest in doubt");
        m.recovered();
        assert_eq!(m.in_doubt(), None);
        assert!(!m.holds_the_guest());
        assert!(m.begin());
        m.update(|p| p.phase = Phase::StopAndCopy);
        assert!(m.holds_the_guest(), "paused for the end of the migration");
    }
}
