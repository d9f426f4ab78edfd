//! Where a virtio-console's port reads and writes on the host: `--console stdio|file:PATH|unix:PATH`.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use veil_seccomp::Confinement;

use crate::host_console::{ConsoleIo, HostConsoleError, HostInput, UnixSocketConsole};

/// Errors naming or opening a console backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Not one of the forms the option takes.
    #[error("Console backend {0:?} is not stdio, file:PATH or unix:PATH")]
    Unknown(String),
    /// The output file could not be created.
    #[error("Cannot create console output file {path}")]
    CreateFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Standard input or the socket could not be set up.
    #[error("Cannot set up the console's host end")]
    Host(#[source] HostConsoleError),
}

/// The host end of a console port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleBackend {
    /// Output to stdout, input from stdin. Only one device may take stdin.
    Stdio,
    /// Output to a file, created or truncated; no input.
    File(PathBuf),
    /// A UNIX socket Veil listens on: every client gets the output, the client that
    /// connected last is the input.
    UnixSocket(PathBuf),
}

impl FromStr for ConsoleBackend {
    type Err = BackendError;

    fn from_str(s: &str) -> Result<Self, BackendError> {
        let path = |p: &str| {
            if p.is_empty() {
                Err(BackendError::Unknown(s.to_owned()))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        match s.split_once(':') {
            None if s == "stdio" => Ok(Self::Stdio),
            Some(("file", p)) => Ok(Self::File(path(p)?)),
            Some(("unix", p)) => Ok(Self::UnixSocket(path(p)?)),
            _ => Err(BackendError::Unknown(s.to_owned())),
        }
    }
}

impl ConsoleBackend {
    /// Opens the output and, where there is one, the input; a socket's accepting thread runs
    /// under `confinement`.
    pub fn open(&self, confinement: &Confinement) -> Result<ConsoleIo, BackendError> {
        match self {
            Self::Stdio => Ok(ConsoleIo {
                output: Box::new(io::stdout()),
                input: Some(HostInput::stdin().map_err(BackendError::Host)?),
            }),
            Self::File(path) => Ok(ConsoleIo {
                output: Box::new(create_file(path)?),
                input: None,
            }),
            Self::UnixSocket(path) => {
                UnixSocketConsole::bind(path, confinement).map_err(BackendError::Host)
            }
        }
    }
}

fn create_file(path: &Path) -> Result<std::fs::File, BackendError> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|source| BackendError::CreateFile {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms_and_refuses_others() {
        assert_eq!(
            "stdio".parse::<ConsoleBackend>().unwrap(),
            ConsoleBackend::Stdio
        );
        assert_eq!(
            "file:/tmp/c.log".parse::<ConsoleBackend>().unwrap(),
            ConsoleBackend::File("/tmp/c.log".into())
        );
        assert_eq!(
            "unix:/run/c.sock".parse::<ConsoleBackend>().unwrap(),
            ConsoleBackend::UnixSocket("/run/c.sock".into())
        );
        for bad in ["", "stdout", "file:", "unix:", "tcp:1234", "stdio:x"] {
            assert!(bad.parse::<ConsoleBackend>().is_err(), "{bad:?}");
        }
    }
}
