//! Where a migration goes: a UNIX socket, or TCP (only with an explicit `insecure` until the
//! TLS transport exists: the receiver must not take state from an unauthenticated peer).

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

/// A migration endpoint: `unix:PATH` or `tcp:HOST:PORT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

/// Errors reaching or offering an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("'{0}' is not a migration endpoint: use unix:PATH or tcp:HOST:PORT")]
    Syntax(String),
    #[error("Plain TCP carries the guest unencrypted and unauthenticated: pass --insecure to accept that (TLS is not implemented yet)")]
    Insecure,
    #[error("Cannot connect to {0}")]
    Connect(String, #[source] io::Error),
    #[error("Cannot listen on {0}")]
    Listen(String, #[source] io::Error),
}

impl std::str::FromStr for Endpoint {
    type Err = TransportError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once(':') {
            Some(("unix", path)) if !path.is_empty() => Ok(Endpoint::Unix(path.into())),
            Some(("tcp", addr))
                if addr
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) =>
            {
                Ok(Endpoint::Tcp(addr.to_string()))
            }
            _ => Err(TransportError::Syntax(text.to_string())),
        }
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// How long either side waits for its peer before giving up on a silent connection (a peer
/// that died without closing it, a link that went down).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected byte stream.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn with_timeouts(self) -> io::Result<Self> {
        match &self {
            Stream::Unix(s) => {
                s.set_read_timeout(Some(PEER_TIMEOUT))?;
                s.set_write_timeout(Some(PEER_TIMEOUT))?;
            }
            Stream::Tcp(s) => {
                s.set_read_timeout(Some(PEER_TIMEOUT))?;
                s.set_write_timeout(Some(PEER_TIMEOUT))?;
            }
        }
        Ok(self)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

fn check_insecure(endpoint: &Endpoint, insecure: bool) -> Result<(), TransportError> {
    match endpoint {
        Endpoint::Tcp(_) if !insecure => Err(TransportError::Insecure),
        _ => Ok(()),
    }
}

/// Connects to a target.
pub fn connect(endpoint: &Endpoint, insecure: bool) -> Result<Stream, TransportError> {
    check_insecure(endpoint, insecure)?;
    let error = |e| TransportError::Connect(endpoint.to_string(), e);
    let stream = match endpoint {
        Endpoint::Unix(path) => Stream::Unix(UnixStream::connect(path).map_err(error)?),
        Endpoint::Tcp(addr) => {
            let s = TcpStream::connect(addr).map_err(error)?;
            // Chunks are large and the state message small: don't hold the last one back.
            s.set_nodelay(true).map_err(error)?;
            Stream::Tcp(s)
        }
    };
    stream.with_timeouts().map_err(error)
}

/// A listening endpoint that takes one source.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Waits for the source (as long as it takes); once connected, a silent source times out.
    pub fn accept(&self) -> io::Result<Stream> {
        let stream = match self {
            Listener::Unix(l, _) => Stream::Unix(l.accept()?.0),
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        };
        stream.with_timeouts()
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Listens for a source.
pub fn listen(endpoint: &Endpoint, insecure: bool) -> Result<Listener, TransportError> {
    check_insecure(endpoint, insecure)?;
    let error = |e| TransportError::Listen(endpoint.to_string(), e);
    Ok(match endpoint {
        Endpoint::Unix(path) => {
            if path.exists() && UnixStream::connect(path).is_err() {
                std::fs::remove_file(path).map_err(error)?;
            }
            Listener::Unix(UnixListener::bind(path).map_err(error)?, path.clone())
        }
        Endpoint::Tcp(addr) => Listener::Tcp(TcpListener::bind(addr).map_err(error)?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "unix:/run/v.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/v.sock".into())
        );
        assert_eq!(
            "tcp:10.0.0.2:4444".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("10.0.0.2:4444".into())
        );
        assert_eq!(
            "tcp:[::1]:4444".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("[::1]:4444".into())
        );
        for bad in ["", "unix:", "tcp:host", "tcp::1", "tcp:h:99999", "udp:x:1"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }

    #[test]
    fn plain_tcp_needs_insecure() {
        let e: Endpoint = "tcp:127.0.0.1:1".parse().unwrap();
        assert!(matches!(connect(&e, false), Err(TransportError::Insecure)));
        assert!(matches!(listen(&e, false), Err(TransportError::Insecure)));
    }
}
