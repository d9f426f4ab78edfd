//! Recovery queries under `veil receive --keep-listening`, where the process that answers the
//! listener is not the one holding the guest in doubt.
//!
//! Each guest runs in a process of its own, and only the process waiting for the next source
//! accepts connections. A guest's process, once it has its guest, answers queries on a UNIX
//! socket of its own (`<pid>.sock`) in a directory that the service created for its processes
//! alone (mode 0700). The waiting process takes a query off the listener, the source already
//! authenticated there as for a migration, and puts it to each sibling in turn: a sibling
//! whose guest is another migration answers Unknown and changes nothing
//! ([`Fate::query`](crate::protocol::Fate::query) and [`Fate::adopt`](crate::protocol::Fate::adopt)
//! only act on their own id), so the first other answer is the one that counts. A sibling that
//! is gone proves nothing either: its socket is skipped, and with no answer the source hears
//! Unknown and keeps its guest stopped.

use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::protocol::{read_frame, write_frame, Message, RecoveryOutcome};
use crate::transport::{self, Endpoint, Listener, Security, TransportError};

/// How long one sibling has to answer; a sibling busy past this proves nothing.
const SIBLING_TIMEOUT: Duration = Duration::from_secs(5);

/// The directory where a keep-listening service's guest processes answer queries.
#[derive(Debug, Clone)]
pub struct Siblings {
    dir: PathBuf,
}

impl Siblings {
    /// Creates a fresh directory for a service's processes under `parent`, readable by this
    /// user only: a query through it is as trusted as one from the authenticated listener.
    pub fn create(parent: &Path) -> std::io::Result<Self> {
        let pid = std::process::id();
        for n in 0u32.. {
            let dir = parent.join(format!("veil-receive-{pid}-{n}"));
            match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
                Ok(()) => return Ok(Self { dir }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
        unreachable!("an unbounded counter runs out of names")
    }

    /// The directory a parent service created (and passed down by path).
    pub fn at(dir: PathBuf) -> Self {
        Self { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// This process's socket for its guest's queries, removed when the listener is dropped.
    pub fn listen(&self) -> Result<Listener, TransportError> {
        let path = self.dir.join(format!("{}.sock", std::process::id()));
        transport::listen(&Endpoint::Unix(path), &Security::default())
    }

    /// Puts `query` (Recover or Adopt) to every sibling and returns the first answer that is
    /// not Unknown; Unknown when none knows the migration or none answers.
    pub fn ask(&self, query: &Message) -> RecoveryOutcome {
        let sockets = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect::<Vec<_>>(),
            Err(e) => {
                tracing::warn!("cannot list {}: {e}", self.dir.display());
                return RecoveryOutcome::Unknown;
            }
        };
        for socket in sockets {
            match ask_one(&socket, query) {
                Ok(RecoveryOutcome::Unknown) => {}
                Ok(outcome) => return outcome,
                Err(e) => tracing::debug!("no answer from {}: {e}", socket.display()),
            }
        }
        RecoveryOutcome::Unknown
    }
}

fn ask_one(socket: &Path, query: &Message) -> Result<RecoveryOutcome, Box<dyn std::error::Error>> {
    let mut stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(SIBLING_TIMEOUT))?;
    stream.set_write_timeout(Some(SIBLING_TIMEOUT))?;
    write_frame(&mut stream, query)?;
    match read_frame(&mut stream)?.message {
        Message::Recovered(outcome) => Ok(outcome),
        other => Err(format!("answered {}", other.kind()).into()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::*;
    use crate::protocol::MigrationId;
    use crate::recovery::{Responder, SharedFate};

    fn answering(siblings: &Siblings, fate: &Arc<SharedFate>) -> Responder {
        Responder::start(
            siblings.listen().unwrap(),
            Arc::clone(fate),
            Duration::from_secs(2),
            Duration::from_secs(60),
            Box::new(|| Ok(())),
        )
        .unwrap()
    }

    fn scratch() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "veil-siblings-test-{}-{:?}",
            std::process::id(),
            Instant::now()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_query_reaches_the_sibling_holding_its_migration_and_no_other() {
        let parent = scratch();
        let siblings = Siblings::create(&parent).unwrap();
        let mode = std::fs::metadata(siblings.dir()).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
        let (mine, other) = (MigrationId::of_state(b"a"), MigrationId::of_state(b"b"));
        let fate = Arc::new(SharedFate::default());
        fate.state_arrived(mine).unwrap();
        // Only one socket per process: the "other" sibling is a fate with another id, asked
        // through its own responder in a second directory.
        let elsewhere = Siblings::create(&parent).unwrap();
        let other_fate = Arc::new(SharedFate::default());
        other_fate.state_arrived(other).unwrap();
        let _answering = answering(&siblings, &fate);
        let _other = answering(&elsewhere, &other_fate);

        assert_eq!(
            siblings.ask(&Message::Recover(MigrationId::of_state(b"c"))),
            RecoveryOutcome::Unknown
        );
        assert_eq!(fate.get(), crate::protocol::Fate::Ready(mine), "untouched");
        assert_eq!(
            siblings.ask(&Message::Adopt(mine)),
            RecoveryOutcome::Running
        );
        assert!(fate.get().is_running());
        assert_eq!(other_fate.get(), crate::protocol::Fate::Ready(other));
        assert_eq!(
            elsewhere.ask(&Message::Recover(other)),
            RecoveryOutcome::Discarded
        );
        std::fs::remove_dir_all(&parent).unwrap();
    }

    #[test]
    fn a_sibling_that_is_gone_proves_nothing() {
        let parent = scratch();
        let siblings = Siblings::create(&parent).unwrap();
        // A socket file left by a process that was killed: nobody listens on it.
        drop(std::os::unix::net::UnixListener::bind(siblings.dir().join("1.sock")).unwrap());
        assert_eq!(
            siblings.ask(&Message::Recover(MigrationId::of_state(b"a"))),
            RecoveryOutcome::Unknown
        );
        std::fs::remove_dir_all(&parent).unwrap();
    }
}
