//! Getting out of a lost Complete without ever running the guest twice.
//!
//! With the feature `RECOVERY` agreed (see [`crate::protocol::recovery`] for the messages and
//! the argument), the target answers Complete with Running. When that never arrives, the
//! source is *in doubt*: it keeps the guest stopped, its disks handed over, and refuses to
//! resume it. The target, if it lost the link after its Ack without Complete, is in doubt
//! too: it keeps the guest paused and never runs it, and answers queries on its listener
//! ([`Responder`]) for a while.
//!
//! [`recover`] asks the target, on a new connection authenticated like the migration, about
//! the migration by its id. The target commits the guest's fate under one lock before it
//! answers: a guest waiting for Complete is discarded for good (a Complete arriving later is
//! refused), a guest already running is reported running. Only Discarded resumes the guest on
//! the source. A source that cannot resume its guest (SEV, after SEND_FINISH), or whose
//! operator wants it on the target ([`RunOn::Target`]), asks the target to adopt it instead:
//! a waiting guest runs there as on a late Complete, and the source stops for good. Every
//! interleaving of the query, Complete and the link's failure:
//!
//! - Complete reaches the target before the query: it runs there; the query is told Running
//!   and the source stays stopped.
//! - The query reaches the target before Complete (the link still half-open, or Complete
//!   lost): the guest is discarded; a late Complete is refused; the source resumes.
//! - The answer is lost: the source stays in doubt and may ask again; the answer is the same.
//! - The target is gone or answers about another migration: the source stays stopped.
//!
//! In none of them does the guest run in two places; the price is that an unreachable target
//! leaves the guest stopped on both hosts, as before.

pub mod siblings;

use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use veil_hypervisor::{RunState, RunningVm};

use crate::monitor::MigrationMonitor;
use crate::protocol::{
    read_frame, write_frame, Fate, FateError, HelloReply, Message, MigrationId, ProtocolError,
    RecoveryOutcome,
};
use crate::transport::{Listener, TransportError};

/// How long a target left in doubt keeps the guest and answers queries, by default.
pub const RECOVERY_WINDOW: Duration = Duration::from_secs(600);

/// An incoming guest's [`Fate`], shared by the migration and the thread answering queries.
#[derive(Debug)]
pub struct SharedFate {
    fate: Mutex<Fate>,
    changed: Condvar,
    /// Until when queries are answered; `None` while nobody answers them.
    answered_until: Mutex<Option<Instant>>,
}

impl Default for SharedFate {
    fn default() -> Self {
        Self {
            fate: Mutex::new(Fate::Arriving),
            changed: Condvar::new(),
            answered_until: Mutex::new(None),
        }
    }
}

impl SharedFate {
    fn lock(&self) -> MutexGuard<'_, Fate> {
        self.fate.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The fate now.
    pub fn get(&self) -> Fate {
        *self.lock()
    }

    /// Applies `f` under the lock and wakes whoever waits for a change.
    pub fn update<T>(&self, f: impl FnOnce(&mut Fate) -> T) -> T {
        let result = f(&mut self.lock());
        self.changed.notify_all();
        result
    }

    pub(crate) fn state_arrived(&self, id: MigrationId) -> Result<(), FateError> {
        self.update(|f| f.state_arrived(id))
    }

    pub(crate) fn complete(&self) -> Result<(), FateError> {
        self.update(Fate::complete)
    }

    pub(crate) fn discard(&self) {
        self.update(Fate::discard)
    }

    /// Whether a target in doubt is worth waiting in: someone answers queries.
    pub(crate) fn answered_until(&self) -> Option<Instant> {
        *self
            .answered_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until the fate is settled (a query discarded the guest) or `deadline`; then the
    /// guest is discarded if it was not already. Returns the fate.
    pub(crate) fn settle_by(&self, deadline: Instant) -> Fate {
        let mut fate = self.lock();
        while !fate.is_settled() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            fate = self
                .changed
                .wait_timeout(fate, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        fate.discard();
        *fate
    }
}

/// Answers recovery queries on a target's listener until dropped: a `Recover` query about
/// this target's guest, by the [`SharedFate`]; a `Hello` (another source) with a refusal, as
/// this target already has its guest; anything else is dropped. Connections are
/// authenticated as the listener's migrations are (mutual TLS, or a UNIX socket).
pub struct Responder {
    fate: Arc<SharedFate>,
    until: Instant,
    thread: Option<JoinHandle<()>>,
    listener: Arc<Listener>,
    stopping: Arc<std::sync::atomic::AtomicBool>,
}

impl Responder {
    /// Serves `listener` on a thread; each connection has `opening` to send its query. A
    /// target that falls in doubt keeps answering until `window` from then.
    pub fn start(
        listener: Listener,
        fate: Arc<SharedFate>,
        opening: Duration,
        window: Duration,
        // Run first on the answering thread (a seccomp filter, say); if it fails the thread
        // answers nothing and the source stays in doubt.
        confine: Box<dyn FnOnce() -> Result<(), String> + Send>,
    ) -> std::io::Result<Self> {
        let listener = Arc::new(listener);
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (l, f, s) = (
            Arc::clone(&listener),
            Arc::clone(&fate),
            Arc::clone(&stopping),
        );
        let thread = std::thread::Builder::new()
            .name("recovery".into())
            .spawn(move || match confine() {
                Ok(()) => serve(&l, &f, opening, &s),
                Err(e) => tracing::error!("Recovery queries go unanswered: {e}"),
            })?;
        let until = Instant::now() + window;
        *fate
            .answered_until
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(until);
        Ok(Self {
            fate,
            until,
            thread: Some(thread),
            listener,
            stopping,
        })
    }

    /// Keeps answering (the same answer to a repeated query) until the window ends.
    pub fn linger(&self) {
        let left = self.until.saturating_duration_since(Instant::now());
        if !left.is_zero() {
            tracing::info!(
                "answering recovery queries for another {}",
                humantime::format_duration(Duration::from_secs(left.as_secs()))
            );
            std::thread::sleep(left);
        }
    }

    /// The fate the answers come from.
    pub fn fate(&self) -> &Arc<SharedFate> {
        &self.fate
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::Release);
        // Wakes the blocked accept: it fails at once on a shut-down listening socket.
        let _ = socket2::SockRef::from(&self.listener.as_fd()).shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(
    listener: &Listener,
    fate: &SharedFate,
    opening: Duration,
    stopping: &std::sync::atomic::AtomicBool,
) {
    while !stopping.load(std::sync::atomic::Ordering::Acquire) {
        let mut accepted = match listener.accept_within(opening) {
            Ok(a) => a,
            Err(e) if e.is_one_connection() => {
                tracing::warn!("{}", crate::error_chain(&e));
                continue;
            }
            Err(_) => return,
        };
        let peer = accepted.peer.clone();
        let mut stream =
            crate::receiver::ByDeadline::new(&mut accepted.stream, accepted.deadline, opening);
        match read_frame(&mut stream).map(|f| f.message) {
            Ok(Message::Recover(id)) => {
                let outcome = fate.update(|f| f.query(id));
                tracing::warn!("{peer} asked about migration {id}: {outcome:?}");
                let _ = write_frame(&mut stream, &Message::Recovered(outcome));
            }
            Ok(Message::Adopt(id)) => {
                let outcome = fate.update(|f| f.adopt(id));
                tracing::warn!(
                    "{peer} asked this host to run the guest of migration {id}: {outcome:?}"
                );
                let _ = write_frame(&mut stream, &Message::Recovered(outcome));
            }
            Ok(Message::Hello(_)) => {
                let _ = write_frame(
                    &mut stream,
                    &Message::HelloReply(HelloReply::refuse(
                        "this veil receive already has its guest",
                    )),
                );
            }
            Ok(other) => tracing::warn!(
                "Dropped a connection from {peer}: {} is neither a query nor a Hello",
                other.kind()
            ),
            Err(e) => tracing::warn!(
                "Dropped a connection from {peer}: {}",
                crate::error_chain(&e)
            ),
        }
    }
}

/// Where a recovered guest is to run: the host that asks decides, the target's fate settles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunOn {
    /// Here, if the target discards the guest (a Recover query).
    Source,
    /// On the target, if it still holds the guest (an Adopt request). The only way out for an
    /// SEV guest, which cannot resume here after SEND_FINISH.
    Target,
}

impl RunOn {
    /// Where `vm`'s guest runs when the operator does not say: here if it can.
    pub fn default_for(vm: &RunningVm) -> Self {
        if is_sev(vm) {
            RunOn::Target
        } else {
            RunOn::Source
        }
    }
}

impl std::str::FromStr for RunOn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "source" => Ok(RunOn::Source),
            "target" => Ok(RunOn::Target),
            other => Err(format!("{other:?} is neither source nor target")),
        }
    }
}

fn is_sev(vm: &RunningVm) -> bool {
    vm.paravirt().page_states().is_some()
}

/// Why the recovery did not end with the guest running; it stays stopped here.
#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("No migration of this guest is in doubt: nothing to recover")]
    NotInDoubt,
    #[error("An SEV guest cannot resume after SEND_FINISH: only the target can run it (--run-on target); the target was not asked")]
    Sev,
    #[error(
        "The target runs the guest: it must not resume here (stop this VMM with veil ctl shutdown)"
    )]
    TargetRuns,
    #[error("The target discarded the guest (its recovery window had ended, or another query came first) and this SEV guest cannot resume after SEND_FINISH: it is lost, stop this VMM with veil ctl shutdown")]
    Lost,
    #[error(
        "The target knows no migration {0}: it proves nothing, so the guest stays stopped here"
    )]
    Unknown(MigrationId),
    #[error("The target answered the query with an error: {0}")]
    Refused(String),
    #[error("The target answered out of turn: {0}")]
    OutOfTurn(String),
    #[error("Cannot reach the target: the guest stays stopped here")]
    Connect(#[from] TransportError),
    #[error("Recovery query failed: the guest stays stopped here")]
    Protocol(#[from] ProtocolError),
}

/// Asks the target that `connect` reaches about the migration this source is in doubt about,
/// and settles where the guest runs: with [`RunOn::Source`] it resumes here only if the target
/// has discarded it for good; with [`RunOn::Target`] the target runs it unless it was
/// discarded, and this VM then stops for good as after a completed migration (or, for a guest
/// that can resume here, resumes it here if the target had discarded it). Returns where the
/// guest runs.
pub fn recover<S: Read + Write>(
    vm: &RunningVm,
    monitor: &MigrationMonitor,
    run_on: RunOn,
    connect: impl FnOnce() -> Result<S, TransportError>,
) -> Result<RunOn, RecoverError> {
    let id = monitor.in_doubt().ok_or(RecoverError::NotInDoubt)?;
    // Recover commits the target to discard: only ask if this side can then resume.
    if run_on == RunOn::Source && is_sev(vm) {
        return Err(RecoverError::Sev);
    }
    let mut stream = connect()?;
    let query = match run_on {
        RunOn::Source => Message::Recover(id),
        RunOn::Target => Message::Adopt(id),
    };
    write_frame(&mut stream, &query)?;
    let outcome = match read_frame(&mut stream)?.message {
        Message::Recovered(outcome) => outcome,
        Message::Error { reason } | Message::Cancel { reason } => {
            return Err(RecoverError::Refused(reason))
        }
        other => return Err(RecoverError::OutOfTurn(other.kind().to_string())),
    };
    match outcome {
        RecoveryOutcome::Discarded if is_sev(vm) => {
            monitor.update(|p| p.error = Some(RecoverError::Lost.to_string()));
            Err(RecoverError::Lost)
        }
        RecoveryOutcome::Discarded => {
            resume_here(vm, monitor, id);
            Ok(RunOn::Source)
        }
        RecoveryOutcome::Running if run_on == RunOn::Target => {
            monitor.adopted();
            vm.hand_over();
            tracing::warn!("migration {id}: the target runs the guest; this VMM stops");
            Ok(RunOn::Target)
        }
        RecoveryOutcome::Running => {
            monitor.update(|p| p.error = Some(RecoverError::TargetRuns.to_string()));
            Err(RecoverError::TargetRuns)
        }
        RecoveryOutcome::Unknown => Err(RecoverError::Unknown(id)),
    }
}

/// The target has discarded the guest for good: it runs here again, with its disks.
fn resume_here(vm: &RunningVm, monitor: &MigrationMonitor, id: MigrationId) {
    if let Some(devices) = vm.devices() {
        // As after any failed migration: if another VMM opened a disk meanwhile, the guest
        // runs on and its disk requests fail, rather than two writers sharing it.
        if let Err(e) = devices.take_back() {
            tracing::error!(
                "cannot take the disks back after the recovery: {}",
                crate::error_chain(&e)
            );
        }
    }
    monitor.recovered();
    if vm.run_state() == RunState::Paused {
        vm.resume();
    }
    tracing::warn!("migration {id}: the target discarded the guest; it runs here again");
}
