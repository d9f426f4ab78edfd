//! Mutual TLS between migration peers: each side proves itself with a certificate the other's
//! CA file vouches for, and the target reads no frame before that proof is complete.

use std::io::{self, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, ClientConnection, RootCertStore, ServerConfig, ServerConnection};

/// A host's TLS identity and the CA it trusts for its peers (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TlsFiles {
    /// This host's certificate chain, leaf first.
    pub cert: PathBuf,
    /// The certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The CA certificates a peer's certificate must chain to.
    pub ca: PathBuf,
}

/// Why TLS could not be set up or the peer was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("Cannot read the TLS {what} from {}", path.display())]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("{} holds no certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("The TLS CA file {} holds a certificate that cannot be trusted", path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("The TLS certificate and key cannot be used")]
    Config(#[source] rustls::Error),
    #[error("The TLS client verifier cannot be built")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("'{0}' is not a valid TLS server name (a DNS name or an IP address)")]
    ServerName(String),
    #[error("The TLS handshake with the peer failed")]
    Handshake(#[source] io::Error),
}

/// ring's suites, AES-128-GCM first: both ends are Veil, so it is the one negotiated. It
/// encrypts 1.2x as fast as AES-256-GCM (13 against 10.9 GB/s on one core of a development
/// host with VAES), and a migration pays for every byte on both ends.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite;
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        cipher_suite::TLS13_AES_128_GCM_SHA256,
        cipher_suite::TLS13_AES_256_GCM_SHA384,
        cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        what,
        path: path.to_path_buf(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Pem {
        what: "private key",
        path: path.to_path_buf(),
        source,
    })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(path, "CA certificates")? {
        store.add(cert).map_err(|source| TlsError::BadCa {
            path: path.to_path_buf(),
            source,
        })?;
    }
    Ok(Arc::new(store))
}

/// TLS 1.3 only: both ends are Veil, so nothing older needs to be spoken.
const VERSIONS: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

/// The target's side: it demands a client certificate from the CA and presents its own.
#[derive(Clone)]
pub struct TlsServer(Arc<ServerConfig>);

impl TlsServer {
    pub fn new(files: &TlsFiles) -> Result<Self, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(roots(&files.ca)?, provider())
            .build()
            .map_err(TlsError::Verifier)?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(TlsError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                certificates(&files.cert, "certificate")?,
                private_key(&files.key)?,
            )
            .map_err(TlsError::Config)?;
        // One connection per migration: resumption tickets would only be dead weight.
        config.send_tls13_tickets = 0;
        Ok(Self(Arc::new(config)))
    }

    /// Completes the handshake on `tcp` by `deadline` (a stranger that trickles bytes does not
    /// hold the listener longer): on success the peer is authenticated.
    pub fn accept(
        &self,
        mut tcp: TcpStream,
        deadline: Instant,
    ) -> Result<rustls::StreamOwned<ServerConnection, TlsSocket>, TlsError> {
        let mut conn = ServerConnection::new(Arc::clone(&self.0))
            .map_err(|e| TlsError::Handshake(io::Error::other(e)))?;
        handshake(&mut conn, &mut tcp, Some(deadline))?;
        Ok(rustls::StreamOwned::new(conn, TlsSocket::new(tcp)))
    }
}

/// The source's side: it checks the target's certificate against the CA and the name it
/// dialled, and presents its own.
#[derive(Clone)]
pub struct TlsClient(Arc<ClientConfig>);

impl TlsClient {
    pub fn new(files: &TlsFiles) -> Result<Self, TlsError> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(VERSIONS)
            .map_err(TlsError::Config)?
            .with_root_certificates(roots(&files.ca)?)
            .with_client_auth_cert(
                certificates(&files.cert, "certificate")?,
                private_key(&files.key)?,
            )
            .map_err(TlsError::Config)?;
        Ok(Self(Arc::new(config)))
    }

    /// Completes the handshake with the target named `server_name` (as its certificate must
    /// say: a DNS name or an IP address).
    pub fn connect(
        &self,
        server_name: &str,
        mut tcp: TcpStream,
    ) -> Result<rustls::StreamOwned<ClientConnection, TlsSocket>, TlsError> {
        let name = ServerName::try_from(server_name.to_string())
            .map_err(|_| TlsError::ServerName(server_name.to_string()))?;
        let mut conn = ClientConnection::new(Arc::clone(&self.0), name)
            .map_err(|e| TlsError::Handshake(io::Error::other(e)))?;
        handshake(&mut conn, &mut tcp, None)?;
        Ok(rustls::StreamOwned::new(conn, TlsSocket::new(tcp)))
    }
}

/// The TCP connection under an established TLS session, read in large blocks: rustls asks for
/// at most 4 KiB per read, and a system call per 4 KiB (on loopback, with a wakeup of the
/// sender for each) cost the target a tenth of its CPU in a migration over TLS.
pub struct TlsSocket(BufReader<TcpStream>);

/// Bytes read from the socket at a time: a few TLS records.
const READ_AHEAD: usize = 256 << 10;

impl TlsSocket {
    fn new(tcp: TcpStream) -> Self {
        Self(BufReader::with_capacity(READ_AHEAD, tcp))
    }

    /// The connection.
    pub fn tcp(&self) -> &TcpStream {
        self.0.get_ref()
    }

    /// Whether bytes read from the socket wait here for rustls: then the peer has spoken
    /// although `poll` may say the socket has nothing.
    pub fn has_buffered(&self) -> bool {
        !self.0.buffer().is_empty()
    }
}

impl Read for TlsSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for TlsSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.get_mut().write(buf)
    }

    // rustls writes its queued records as one vectored write; the default would send only
    // the first.
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.0.get_mut().write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.get_mut().flush()
    }
}

impl AsFd for TlsSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.tcp().as_fd()
    }
}

fn handshake<C, D>(
    conn: &mut C,
    tcp: &mut TcpStream,
    deadline: Option<Instant>,
) -> Result<(), TlsError>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
    D: rustls::SideData,
{
    let late = || {
        TlsError::Handshake(io::Error::new(
            io::ErrorKind::TimedOut,
            "the handshake did not finish in time",
        ))
    };
    while conn.is_handshaking() {
        if let Some(deadline) = deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(late());
            }
            tcp.set_read_timeout(Some(left))
                .map_err(TlsError::Handshake)?;
        }
        match conn.complete_io(tcp) {
            Ok(_) => {}
            Err(e)
                if deadline.is_some()
                    && matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
            {
                return Err(late())
            }
            Err(e) => return Err(TlsError::Handshake(e)),
        }
    }
    // Flush what the handshake left to send (the client's Finished, the server's tickets).
    while conn.wants_write() {
        conn.complete_io(tcp).map_err(TlsError::Handshake)?;
    }
    Ok(())
}
