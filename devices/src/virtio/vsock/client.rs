//! Opening a connection to a guest port from the host, for programs that embed Veil.
//!
//! The same exchange a shell user has with `socat - UNIX-CONNECT:PATH`: write
//! `CONNECT <port>\n`, read `OK <hostport>\n`, and the socket is a stream to the guest. A
//! guest that refuses (RST) or does not answer in time closes the socket instead.
//!
//! ```no_run
//! # use std::io::Write;
//! # use std::time::Duration;
//! let mut conn = veil_devices::virtio::vsock::connect_to_guest(
//!     "/run/veil/v.sock".as_ref(), 52, Duration::from_secs(5))?;
//! conn.stream.write_all(b"hello")?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The longest answer line read: "OK 4294967295\n" and some slack.
const ANSWER_MAX: usize = 32;

/// Errors opening a connection to the guest.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The device's socket is not there or not listening.
    #[error("Cannot connect to {}", path.display())]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The exchange with the device failed.
    #[error("Vsock handshake with the device failed")]
    Io(#[source] io::Error),
    /// The device closed the socket: nothing listens on the guest port, or it did not answer.
    #[error("The guest refused the connection to port {0}")]
    Refused(u32),
    /// No answer in time.
    #[error("The guest did not answer on port {0} in time")]
    TimedOut(u32),
    /// An answer that is not `OK <port>`.
    #[error("Unexpected answer from the device: {0:?}")]
    BadAnswer(String),
}

/// A stream to a guest port.
#[derive(Debug)]
pub struct GuestConnection {
    /// The stream: bytes written reach the guest, bytes the guest sends arrive here.
    pub stream: UnixStream,
    /// The host-side port the device gave the connection; the guest sees it as the peer port.
    pub host_port: u32,
}

/// Connects to the device's socket at `uds_path` and asks for `guest_port`, waiting at most
/// `timeout` for the guest's answer.
pub fn connect_to_guest(
    uds_path: &Path,
    guest_port: u32,
    timeout: Duration,
) -> Result<GuestConnection, ClientError> {
    let mut stream = UnixStream::connect(uds_path).map_err(|source| ClientError::Connect {
        path: uds_path.to_owned(),
        source,
    })?;
    // A zero timeout would mean none at all.
    stream
        .set_read_timeout(Some(timeout.max(Duration::from_millis(1))))
        .map_err(ClientError::Io)?;
    stream
        .write_all(format!("CONNECT {guest_port}\n").as_bytes())
        .map_err(ClientError::Io)?;
    let line = read_line(&mut stream, guest_port)?;
    let host_port = line
        .strip_prefix("OK ")
        .and_then(|port| port.trim().parse().ok())
        .ok_or_else(|| ClientError::BadAnswer(line.clone()))?;
    stream.set_read_timeout(None).map_err(ClientError::Io)?;
    Ok(GuestConnection { stream, host_port })
}

/// Reads the answer a byte at a time, so the guest's first bytes stay in the stream.
fn read_line(stream: &mut UnixStream, port: u32) -> Result<String, ClientError> {
    let mut line = Vec::new();
    loop {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte) {
            Ok(0) => return Err(ClientError::Refused(port)),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() >= ANSWER_MAX => {
                return Err(ClientError::BadAnswer(
                    String::from_utf8_lossy(&line).into_owned(),
                ))
            }
            Ok(_) => line.push(byte[0]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ClientError::TimedOut(port))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                return Err(ClientError::Refused(port))
            }
            Err(e) => return Err(ClientError::Io(e)),
        }
    }
    Ok(String::from_utf8_lossy(&line).into_owned())
}
