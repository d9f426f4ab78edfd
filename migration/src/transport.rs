//! Where a migration goes: a UNIX socket (local, guarded by file permissions), TCP with mutual
//! TLS, or plain TCP only with an explicit `insecure`: the receiver must not take state from an
//! unauthenticated peer.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::tls::{TlsClient, TlsError, TlsFiles, TlsServer, TlsSocket};

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
    #[error("TCP needs mutual TLS (--tls-cert, --tls-key and --tls-ca) or, to send the guest unencrypted to an unauthenticated peer, --insecure")]
    Insecure,
    #[error("Use either TLS or --insecure, not both")]
    TlsAndInsecure,
    #[error("TLS applies to tcp: endpoints; a UNIX socket is guarded by its file permissions")]
    TlsOnUnix,
    #[error("TLS is not usable")]
    Tls(#[from] TlsError),
    #[error("Rejected a connection from {peer}")]
    Rejected {
        peer: String,
        #[source]
        source: TlsError,
    },
    #[error("Cannot connect to {0}")]
    Connect(String, #[source] io::Error),
    #[error("Cannot listen on {0}")]
    Listen(String, #[source] io::Error),
    #[error("Lost a connection from {peer} as it was accepted")]
    Dropped {
        peer: String,
        #[source]
        source: io::Error,
    },
}

impl TransportError {
    /// Whether this concerns one incoming connection only, so a listener can wait for the next.
    pub fn is_one_connection(&self) -> bool {
        matches!(
            self,
            TransportError::Rejected { .. } | TransportError::Dropped { .. }
        )
    }
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

/// How a migration's connection is protected.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Security {
    /// Mutual TLS with these files (TCP only).
    pub tls: Option<TlsFiles>,
    /// Allow plain TCP.
    pub insecure: bool,
    /// The name the target's certificate must carry, when not the host in its address.
    pub server_name: Option<String>,
}

impl Security {
    /// Plain TCP, on the caller's explicit say-so.
    pub fn insecure() -> Self {
        Self {
            insecure: true,
            ..Self::default()
        }
    }

    /// Mutual TLS with `files`.
    pub fn tls(files: TlsFiles) -> Self {
        Self {
            tls: Some(files),
            ..Self::default()
        }
    }

    /// The TLS files to use on `endpoint`, or why this combination is refused.
    fn tls_for(&self, endpoint: &Endpoint) -> Result<Option<&TlsFiles>, TransportError> {
        match (endpoint, &self.tls, self.insecure) {
            (Endpoint::Unix(_), Some(_), _) => Err(TransportError::TlsOnUnix),
            (Endpoint::Unix(_), None, _) => Ok(None),
            (Endpoint::Tcp(_), Some(_), true) => Err(TransportError::TlsAndInsecure),
            (Endpoint::Tcp(_), Some(files), false) => Ok(Some(files)),
            (Endpoint::Tcp(_), None, true) => Ok(None),
            (Endpoint::Tcp(_), None, false) => Err(TransportError::Insecure),
        }
    }
}

/// A connected byte stream.
pub enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    TlsClient(Box<rustls::StreamOwned<rustls::ClientConnection, TlsSocket>>),
    TlsServer(Box<rustls::StreamOwned<rustls::ServerConnection, TlsSocket>>),
}

impl Stream {
    /// How the stream is protected, for reports.
    pub fn protection(&self) -> &'static str {
        match self {
            Stream::Unix(_) => "UNIX socket",
            Stream::Tcp(_) => "plain TCP (insecure)",
            Stream::TlsClient(_) | Stream::TlsServer(_) => "mutual TLS",
        }
    }
}

impl Stream {
    /// The socket under any TLS.
    fn socket(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Unix(s) => s.as_fd(),
            Stream::Tcp(s) => s.as_fd(),
            Stream::TlsClient(s) => s.sock.as_fd(),
            Stream::TlsServer(s) => s.sock.as_fd(),
        }
    }

    /// Bounds the next reads: a read that waits longer fails with `WouldBlock` or `TimedOut`.
    pub fn set_read_timeout(&self, timeout: Duration) -> io::Result<()> {
        socket2::SockRef::from(&self.socket()).set_read_timeout(Some(timeout))
    }

    /// Back to the peer timeout for every wait, once a bounded opening is over.
    pub fn set_peer_timeouts(&self) -> io::Result<()> {
        set_timeouts(&self.socket(), PEER_TIMEOUT)
    }
}

impl AsFd for Stream {
    /// The socket under any TLS.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.socket()
    }
}

/// Bounds every wait on a silent peer, the TLS handshake included.
fn set_timeouts(socket: &impl AsFd, timeout: Duration) -> io::Result<()> {
    let socket = socket2::SockRef::from(socket);
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(timeout))
}

/// A TCP connection's timeouts: besides the socket's, the kernel drops the connection once
/// sent data has gone unacknowledged for the peer timeout (a link that went down), where a
/// send timeout alone could be restarted by every partial write.
fn set_tcp_timeouts(socket: &TcpStream, timeout: Duration) -> io::Result<()> {
    set_timeouts(socket, timeout)?;
    socket.set_nodelay(true)?;
    socket2::SockRef::from(socket).set_tcp_user_timeout(Some(PEER_TIMEOUT))
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
            Stream::TlsClient(s) => s.read(buf).map_err(peer_refusal),
            Stream::TlsServer(s) => s.read(buf).map_err(peer_refusal),
        }
    }
}

/// In TLS 1.3 the client's handshake ends before the server has judged its certificate, so a
/// refusal arrives as an alert on the first read (or on a write that hears it): say what it
/// means.
fn peer_refusal(error: io::Error) -> io::Error {
    use rustls::AlertDescription as A;
    let alert = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
        .and_then(|e| match e {
            rustls::Error::AlertReceived(alert) => Some(*alert),
            _ => None,
        });
    match alert {
        Some(
            alert @ (A::BadCertificate
            | A::UnknownCA
            | A::CertificateRequired
            | A::CertificateExpired
            | A::CertificateRevoked
            | A::CertificateUnknown
            | A::UnsupportedCertificate
            | A::AccessDenied),
        ) => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("the peer refused this host's TLS certificate ({alert:?})"),
        ),
        _ => error,
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
            Stream::TlsClient(s) => tls_write(&mut s.conn, &mut s.sock, buf),
            Stream::TlsServer(s) => tls_write(&mut s.conn, &mut s.sock, buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
            Stream::TlsClient(s) => tls_flush(&mut s.conn, &mut s.sock),
            Stream::TlsServer(s) => tls_flush(&mut s.conn, &mut s.sock),
        }
    }
}

impl crate::duplex::Duplex for Stream {
    fn write_or_hear(&mut self, buf: &[u8]) -> io::Result<crate::duplex::Written> {
        use crate::duplex::tls_write_or_hear;
        match self {
            Stream::Unix(s) => s.write_or_hear(buf),
            Stream::Tcp(s) => s.write_or_hear(buf),
            Stream::TlsClient(s) => {
                tls_write_or_hear(&mut s.conn, &mut s.sock, buf).map_err(peer_refusal)
            }
            Stream::TlsServer(s) => {
                tls_write_or_hear(&mut s.conn, &mut s.sock, buf).map_err(peer_refusal)
            }
        }
    }

    fn sends_from_guest_memory(&self) -> bool {
        matches!(self, Stream::Unix(_) | Stream::Tcp(_))
    }

    fn write_pages_or_hear(
        &mut self,
        head: &[u8],
        memory: &veil_hypervisor::GuestMemory,
        pages: &[vm_memory::GuestAddress],
    ) -> io::Result<crate::duplex::Written> {
        use crate::duplex::copy_pages_or_hear;
        match self {
            Stream::Unix(s) => s.write_pages_or_hear(head, memory, pages),
            Stream::Tcp(s) => s.write_pages_or_hear(head, memory, pages),
            // The cipher needs the bytes: they are copied into rustls's records anyway.
            Stream::TlsClient(_) | Stream::TlsServer(_) => {
                copy_pages_or_hear(self, head, memory, pages)
            }
        }
    }
}

/// Writes through TLS, failing on the first socket error. (`rustls::StreamOwned::write`
/// ignores errors after buffering, so a dead peer would cost one peer timeout per write.)
fn tls_write<D>(
    conn: &mut rustls::ConnectionCommon<D>,
    sock: &mut TlsSocket,
    buf: &[u8],
) -> io::Result<usize> {
    tls_flush(conn, sock)?;
    let written = conn.writer().write(buf)?;
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    Ok(written)
}

fn tls_flush<D>(conn: &mut rustls::ConnectionCommon<D>, sock: &mut TlsSocket) -> io::Result<()> {
    conn.writer().flush()?;
    while conn.wants_write() {
        conn.write_tls(sock)?;
    }
    sock.flush()
}

/// `host` of `host:port`, without an IPv6 address's brackets.
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
}

/// Connects to a target; over TLS, returns once the target has been authenticated.
pub fn connect(endpoint: &Endpoint, security: &Security) -> Result<Stream, TransportError> {
    let tls = security
        .tls_for(endpoint)?
        .map(TlsClient::new)
        .transpose()?;
    let error = |e| TransportError::Connect(endpoint.to_string(), e);
    match endpoint {
        Endpoint::Unix(path) => {
            let s = UnixStream::connect(path).map_err(error)?;
            set_timeouts(&s, PEER_TIMEOUT).map_err(error)?;
            Ok(Stream::Unix(s))
        }
        Endpoint::Tcp(addr) => {
            let s = TcpStream::connect(addr).map_err(error)?;
            // Chunks are large and the state message small: don't hold the last one back.
            set_tcp_timeouts(&s, PEER_TIMEOUT).map_err(error)?;
            match tls {
                None => Ok(Stream::Tcp(s)),
                Some(client) => {
                    let name = security.server_name.as_deref().unwrap_or(host_of(addr));
                    Ok(Stream::TlsClient(Box::new(client.connect(name, s)?)))
                }
            }
        }
    }
}

/// A connection just accepted, which owes its opening by `deadline`.
pub struct Accepted {
    pub stream: Stream,
    /// Who connected, for the log: an address, or the UNIX socket it came through.
    pub peer: String,
    /// When the opening's time runs out.
    pub deadline: Instant,
}

/// A listening endpoint that takes one source at a time.
pub struct Listener {
    socket: ListeningSocket,
    tls: Option<TlsServer>,
    /// The UNIX socket's file, removed with the listener that created it (not with one
    /// inherited from another process).
    owned_path: Option<PathBuf>,
    endpoint: Endpoint,
}

enum ListeningSocket {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    /// Waits for a source (as long as it takes); once connected, a silent source times out.
    /// Over TLS the source is authenticated before this returns; one that fails is
    /// [`TransportError::Rejected`], and the caller may wait for another.
    pub fn accept(&self) -> Result<Stream, TransportError> {
        Ok(self.accept_within(PEER_TIMEOUT)?.stream)
    }

    /// Waits for a connection (as long as it takes) and returns it with the peer's address;
    /// every wait on the peer (the TLS handshake as a whole, then each read and write) is
    /// bounded by `timeout` until [`Stream::set_peer_timeouts`]. A connection that fails
    /// before it is a usable stream is an error for which
    /// [`TransportError::is_one_connection`] holds: the caller may wait for the next.
    pub fn accept_within(&self, timeout: Duration) -> Result<Accepted, TransportError> {
        // A connection reset before it was taken is that connection's failure, not the
        // listener's.
        let error = |e: io::Error| match e.kind() {
            io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::Interrupted => TransportError::Dropped {
                peer: "a peer that left before it was accepted".into(),
                source: e,
            },
            _ => TransportError::Listen(self.to_string(), e),
        };
        match &self.socket {
            ListeningSocket::Unix(l) => {
                let s = l.accept().map_err(error)?.0;
                // A UNIX peer has no address of its own: name the socket it came through.
                let peer = format!("a local process on {}", self.endpoint);
                let dropped = |source| TransportError::Dropped {
                    peer: peer.clone(),
                    source,
                };
                let deadline = Instant::now() + timeout;
                set_timeouts(&s, timeout).map_err(dropped)?;
                Ok(Accepted {
                    stream: Stream::Unix(s),
                    peer,
                    deadline,
                })
            }
            ListeningSocket::Tcp(l) => {
                let (s, peer) = l.accept().map_err(error)?;
                let peer = peer.to_string();
                let deadline = Instant::now() + timeout;
                set_tcp_timeouts(&s, timeout).map_err(|source| TransportError::Dropped {
                    peer: peer.clone(),
                    source,
                })?;
                let stream = match &self.tls {
                    None => Stream::Tcp(s),
                    Some(server) => match server.accept(s, deadline) {
                        Ok(s) => Stream::TlsServer(Box::new(s)),
                        Err(source) => return Err(TransportError::Rejected { peer, source }),
                    },
                };
                Ok(Accepted {
                    stream,
                    peer,
                    deadline,
                })
            }
        }
    }

    /// As [`accept_within`](Self::accept_within), but waits for a connection only until
    /// `deadline`: `None` if none came by then.
    pub fn accept_before(
        &self,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Option<Accepted>, TransportError> {
        let waiting = crate::duplex::readable_before(self.as_fd(), deadline)
            .map_err(|e| TransportError::Listen(self.to_string(), e))?;
        if !waiting {
            return Ok(None);
        }
        self.accept_within(timeout).map(Some)
    }

    /// The listening socket, for a child process to inherit ([`inherit`]).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        match &self.socket {
            ListeningSocket::Unix(l) => l.as_fd(),
            ListeningSocket::Tcp(l) => l.as_fd(),
        }
    }
}

impl std::fmt::Display for Listener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.socket {
            ListeningSocket::Unix(_) => write!(f, "{}", self.endpoint),
            ListeningSocket::Tcp(l) => match l.local_addr() {
                Ok(addr) => write!(f, "tcp:{addr}"),
                Err(_) => write!(f, "{}", self.endpoint),
            },
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some(path) = &self.owned_path {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// Takes over `socket`, already listening on `endpoint` (passed down by the process that
/// called [`listen`]), with `security` as there. The socket's file stays when it is dropped.
pub fn inherit(
    endpoint: &Endpoint,
    security: &Security,
    socket: OwnedFd,
) -> Result<Listener, TransportError> {
    let tls = security
        .tls_for(endpoint)?
        .map(TlsServer::new)
        .transpose()?;
    let socket = match endpoint {
        Endpoint::Unix(_) => ListeningSocket::Unix(UnixListener::from(socket)),
        Endpoint::Tcp(_) => ListeningSocket::Tcp(TcpListener::from(socket)),
    };
    Ok(Listener {
        socket,
        tls,
        owned_path: None,
        endpoint: endpoint.clone(),
    })
}

/// Listens for a source.
pub fn listen(endpoint: &Endpoint, security: &Security) -> Result<Listener, TransportError> {
    let tls = security
        .tls_for(endpoint)?
        .map(TlsServer::new)
        .transpose()?;
    let error = |e| TransportError::Listen(endpoint.to_string(), e);
    let (socket, owned_path) = match endpoint {
        Endpoint::Unix(path) => {
            if path.exists() && UnixStream::connect(path).is_err() {
                std::fs::remove_file(path).map_err(error)?;
            }
            let socket = UnixListener::bind(path).map_err(error)?;
            (ListeningSocket::Unix(socket), Some(path.clone()))
        }
        Endpoint::Tcp(addr) => (
            ListeningSocket::Tcp(TcpListener::bind(addr).map_err(error)?),
            None,
        ),
    };
    Ok(Listener {
        socket,
        tls,
        owned_path,
        endpoint: endpoint.clone(),
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
        let none = Security::default();
        assert!(matches!(connect(&e, &none), Err(TransportError::Insecure)));
        assert!(matches!(listen(&e, &none), Err(TransportError::Insecure)));
    }

    #[test]
    fn tls_is_for_tcp_and_excludes_insecure() {
        let files = TlsFiles {
            cert: "c".into(),
            key: "k".into(),
            ca: "a".into(),
        };
        let unix: Endpoint = "unix:/nonexistent/x".parse().unwrap();
        let tcp: Endpoint = "tcp:127.0.0.1:1".parse().unwrap();
        let tls = Security::tls(files);
        assert!(matches!(
            connect(&unix, &tls),
            Err(TransportError::TlsOnUnix)
        ));
        let both = Security {
            insecure: true,
            ..tls.clone()
        };
        assert!(matches!(
            connect(&tcp, &both),
            Err(TransportError::TlsAndInsecure)
        ));
        // Missing files are reported before any connection is tried.
        assert!(matches!(
            connect(&tcp, &tls),
            Err(TransportError::Tls(TlsError::Pem { .. }))
        ));
    }

    #[test]
    fn hosts_come_out_of_addresses() {
        assert_eq!(host_of("10.0.0.2:4444"), "10.0.0.2");
        assert_eq!(host_of("[::1]:4444"), "::1");
        assert_eq!(host_of("target.example:1"), "target.example");
    }
}
