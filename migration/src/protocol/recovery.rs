//! Recovering from a lost Complete: the one frame whose loss the order alone cannot survive.
//!
//! With the feature `RECOVERY` agreed, the target answers Complete with Running. A source that
//! sent Complete but never got Running is *in doubt*: the target may or may not run the guest,
//! so the source keeps it stopped. The operator then asks the target, on a new connection
//! authenticated like the migration, about the migration by its [`MigrationId`]:
//!
//! ```text
//!  Source (in doubt, guest stopped)                        Target
//!  Recover { id } ────────────────────────────────────────▶ commit the guest's fate, then answer
//!      ◀──────────────────────────────────────────────── Recovered { Discarded | Running | Unknown }
//!  Discarded: resume the guest here
//!  Running / Unknown: keep it stopped, say why
//!
//!  Adopt { id } ──────────────────────────────────────────▶ commit the guest's fate, then answer
//!      ◀──────────────────────────────────────────────── Recovered { Running | Discarded | Unknown }
//!  Running: the guest runs there; stop it here for good
//!  Discarded / Unknown: it does not run there; say why
//! ```
//!
//! An SEV source cannot resume its guest after SEND_FINISH, so it asks with Adopt instead: a
//! waiting guest then runs on the target, as if Complete had arrived.
//!
//! The target's guest has one [`Fate`], changed only by its two transitions, each atomic:
//! Complete (or Adopt) makes a `Ready` guest `Running`; a Recover query makes it `Discarded`. Whichever comes
//! first wins, and neither undoes the other: a guest that is `Discarded` never runs (a late
//! Complete is refused), and a query about a `Running` guest is answered Running. The source
//! resumes only on Discarded, which the target sends only after the fate is `Discarded`
//! for good. So the guest runs on the target only if it never will on the source, and the
//! other way round, however the query, Complete and the link's failure interleave.

use sha2::{Digest, Sha256};

/// Which migration a query is about: the SHA-256 of the State payload, which both ends hold
/// once the guest has stopped on the source (it carries the vCPUs' registers and TSCs and the
/// wall clock at the save, so no two migrations share one), without a field of its own on
/// the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MigrationId([u8; MigrationId::BYTES]);

impl MigrationId {
    pub const BYTES: usize = 32;

    /// The id of the migration that carried `state` (the State payload).
    pub fn of_state(state: &[u8]) -> Self {
        Self(Sha256::digest(state).into())
    }

    pub fn from_bytes(bytes: [u8; Self::BYTES]) -> Self {
        Self(bytes)
    }

    pub fn as_bytes(&self) -> &[u8; Self::BYTES] {
        &self.0
    }
}

impl std::fmt::Debug for MigrationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for MigrationId {
    /// The first 8 bytes in hex: enough to tell migrations apart in a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// The target's answer to a Recover query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecoveryOutcome {
    /// The target discarded the guest and never runs it: the source may resume it.
    Discarded,
    /// The guest runs on the target: the source must not resume it.
    Running,
    /// The target knows no such migration (another guest's target, or one that has already
    /// gone): it proves nothing, so the source must not resume.
    Unknown,
}

impl RecoveryOutcome {
    pub fn code(self) -> u8 {
        match self {
            RecoveryOutcome::Discarded => 1,
            RecoveryOutcome::Running => 2,
            RecoveryOutcome::Unknown => 3,
        }
    }

    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            1 => Some(RecoveryOutcome::Discarded),
            2 => Some(RecoveryOutcome::Running),
            3 => Some(RecoveryOutcome::Unknown),
            _ => None,
        }
    }
}

/// What has become of an incoming guest on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Arriving: no State yet, so no migration a source could be in doubt about.
    Arriving,
    /// The State arrived (the migration has its id); the guest waits, paused, for Complete.
    Ready(MigrationId),
    /// Complete arrived first: the guest runs here.
    Running(MigrationId),
    /// A query, or the end of the wait, came first: the guest never runs here.
    Discarded(MigrationId),
    /// The migration failed before its State: nothing to discard, nothing will run.
    Failed,
}

/// A transition that the fate refuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FateError {
    #[error("The guest was discarded at the source's request: it will not run here")]
    Discarded,
    #[error("The guest is not waiting for Complete")]
    NotReady,
}

impl Fate {
    /// The State of migration `id` arrived.
    pub fn state_arrived(&mut self, id: MigrationId) -> Result<(), FateError> {
        match self {
            Fate::Arriving => {
                *self = Fate::Ready(id);
                Ok(())
            }
            _ => Err(FateError::NotReady),
        }
    }

    /// Complete arrived: the guest may run here unless a query discarded it first.
    pub fn complete(&mut self) -> Result<(), FateError> {
        match *self {
            Fate::Ready(id) => {
                *self = Fate::Running(id);
                Ok(())
            }
            Fate::Discarded(_) => Err(FateError::Discarded),
            _ => Err(FateError::NotReady),
        }
    }

    /// The guest will never run here: a failure before Complete, or the end of the wait for
    /// a query. A guest already running stays running.
    pub fn discard(&mut self) {
        *self = match *self {
            Fate::Ready(id) | Fate::Discarded(id) => Fate::Discarded(id),
            Fate::Running(id) => Fate::Running(id),
            Fate::Arriving | Fate::Failed => Fate::Failed,
        };
    }

    /// A query about migration `id`: commits the fate first (a guest not yet running is
    /// discarded for good), then says what to answer.
    pub fn query(&mut self, id: MigrationId) -> RecoveryOutcome {
        match *self {
            Fate::Ready(mine) | Fate::Discarded(mine) if mine == id => {
                *self = Fate::Discarded(mine);
                RecoveryOutcome::Discarded
            }
            Fate::Running(mine) if mine == id => RecoveryOutcome::Running,
            _ => RecoveryOutcome::Unknown,
        }
    }

    /// A request to run the guest of migration `id` here after all (the source cannot resume
    /// it, or its operator prefers it here): a waiting guest runs, as on a late Complete;
    /// one already discarded stays discarded. Then says what to answer.
    pub fn adopt(&mut self, id: MigrationId) -> RecoveryOutcome {
        match *self {
            Fate::Ready(mine) | Fate::Running(mine) if mine == id => {
                *self = Fate::Running(mine);
                RecoveryOutcome::Running
            }
            Fate::Discarded(mine) if mine == id => RecoveryOutcome::Discarded,
            _ => RecoveryOutcome::Unknown,
        }
    }

    /// Whether the guest runs here.
    pub fn is_running(&self) -> bool {
        matches!(self, Fate::Running(_))
    }

    /// Whether nothing can change any more (running, discarded or failed).
    pub fn is_settled(&self) -> bool {
        matches!(self, Fate::Running(_) | Fate::Discarded(_) | Fate::Failed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u8) -> MigrationId {
        MigrationId::from_bytes([n; MigrationId::BYTES])
    }

    #[test]
    fn the_id_is_the_digest_of_the_state() {
        assert_eq!(MigrationId::of_state(b"a"), MigrationId::of_state(b"a"));
        assert_ne!(MigrationId::of_state(b"a"), MigrationId::of_state(b"b"));
        // SHA-256("abc"), FIPS 180-2 appendix B.1.
        assert_eq!(
            MigrationId::of_state(b"abc").to_string(),
            "ba7816bf8f01cfea"
        );
    }

    #[test]
    fn a_query_before_complete_wins_and_complete_is_refused() {
        let mut fate = Fate::Arriving;
        assert_eq!(fate.query(id(1)), RecoveryOutcome::Unknown, "no State yet");
        fate.state_arrived(id(1)).unwrap();
        assert_eq!(
            fate.query(id(2)),
            RecoveryOutcome::Unknown,
            "another migration"
        );
        assert_eq!(fate, Fate::Ready(id(1)), "an unknown id changes nothing");
        assert_eq!(fate.query(id(1)), RecoveryOutcome::Discarded);
        assert_eq!(fate.complete(), Err(FateError::Discarded));
        assert!(!fate.is_running());
        assert_eq!(fate.query(id(1)), RecoveryOutcome::Discarded, "asked again");
    }

    #[test]
    fn complete_before_a_query_wins_and_the_query_is_told() {
        let mut fate = Fate::Arriving;
        fate.state_arrived(id(1)).unwrap();
        fate.complete().unwrap();
        assert_eq!(fate.query(id(1)), RecoveryOutcome::Running);
        fate.discard();
        assert!(fate.is_running(), "a running guest is never discarded");
    }

    #[test]
    fn adopt_runs_a_waiting_guest_but_never_a_discarded_one() {
        let mut fate = Fate::Arriving;
        assert_eq!(fate.adopt(id(1)), RecoveryOutcome::Unknown, "no State yet");
        fate.state_arrived(id(1)).unwrap();
        assert_eq!(fate.adopt(id(2)), RecoveryOutcome::Unknown);
        assert_eq!(fate, Fate::Ready(id(1)), "an unknown id changes nothing");
        assert_eq!(fate.adopt(id(1)), RecoveryOutcome::Running);
        assert!(fate.is_running());
        assert_eq!(fate.adopt(id(1)), RecoveryOutcome::Running, "asked again");
        assert_eq!(fate.query(id(1)), RecoveryOutcome::Running);

        let mut fate = Fate::Ready(id(1));
        assert_eq!(fate.query(id(1)), RecoveryOutcome::Discarded);
        assert_eq!(fate.adopt(id(1)), RecoveryOutcome::Discarded);
        assert!(!fate.is_running());
    }

    #[derive(Debug, Clone)]
    enum Event {
        State(u8),
        Complete,
        Discard,
        Query(u8),
        Adopt(u8),
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            (0u8..2).prop_map(Event::State),
            Just(Event::Complete),
            Just(Event::Discard),
            (0u8..2).prop_map(Event::Query),
            (0u8..2).prop_map(Event::Adopt),
        ]
    }

    proptest! {
        /// Whatever the order of State, Complete, the end of the wait and queries: once a
        /// query has been answered Discarded the guest never runs here, once it runs every
        /// query about it is answered Running, and a running guest stays running.
        #[test]
        fn the_guest_never_runs_on_both_sides(events in proptest::collection::vec(event(), 0..16)) {
            let mut fate = Fate::Arriving;
            let mut told_discarded = false;
            let mut ran = false;
            for e in events {
                match e {
                    Event::State(n) => { let _ = fate.state_arrived(id(n)); }
                    Event::Complete => {
                        if fate.complete().is_ok() {
                            prop_assert!(!told_discarded, "ran after the source was told to resume");
                        }
                    }
                    Event::Discard => fate.discard(),
                    Event::Query(n) => match fate.query(id(n)) {
                        RecoveryOutcome::Discarded => {
                            prop_assert!(!ran, "told to resume while running here");
                            told_discarded = true;
                        }
                        RecoveryOutcome::Running => prop_assert!(ran),
                        RecoveryOutcome::Unknown => {}
                    },
                    Event::Adopt(n) => match fate.adopt(id(n)) {
                        RecoveryOutcome::Running => {
                            prop_assert!(!told_discarded, "adopted after the source was told to resume");
                            prop_assert!(fate.is_running());
                        }
                        RecoveryOutcome::Discarded => {
                            prop_assert!(!fate.is_running());
                            told_discarded = true;
                        }
                        RecoveryOutcome::Unknown => prop_assert_eq!(fate.is_running(), ran),
                    },
                }
                if ran {
                    prop_assert!(fate.is_running());
                }
                ran = fate.is_running();
            }
        }
    }
}
