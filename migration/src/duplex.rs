//! Writing while listening: the source sends for seconds on end and the target speaks only to
//! end the migration, so every write also watches the return path. A target that fails but
//! keeps its connection open (and stops reading) then stops the source at once, where a plain
//! blocking write would sit in a full socket buffer until the peer timeout.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// What became of a [`Duplex::write_or_hear`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// All of it went out.
    All,
    /// The peer said something (or hung up) first: the write stopped part-way, so the stream
    /// is good only for reading what the peer said.
    PeerSpoke,
}

/// A connection a sender writes to while listening for its peer.
pub trait Duplex: Read + Write {
    /// Writes all of `buf`, unless the peer has something to say first.
    fn write_or_hear(&mut self, buf: &[u8]) -> io::Result<Written>;
}

impl<T: Duplex + ?Sized> Duplex for &mut T {
    fn write_or_hear(&mut self, buf: &[u8]) -> io::Result<Written> {
        (**self).write_or_hear(buf)
    }
}

impl Duplex for UnixStream {
    fn write_or_hear(&mut self, buf: &[u8]) -> io::Result<Written> {
        let timeout = self.write_timeout()?;
        socket_write_or_hear(self.as_fd(), buf, timeout)
    }
}

impl Duplex for TcpStream {
    fn write_or_hear(&mut self, buf: &[u8]) -> io::Result<Written> {
        let timeout = self.write_timeout()?;
        socket_write_or_hear(self.as_fd(), buf, timeout)
    }
}

/// Whether `socket` becomes readable (for a listener: a connection is waiting) before
/// `deadline`.
pub(crate) fn readable_before(socket: BorrowedFd<'_>, deadline: Instant) -> io::Result<bool> {
    match wait(socket, false, Some(deadline)) {
        Ok(ready) => Ok(ready.readable),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Ok(false),
        Err(e) => Err(e),
    }
}

/// What ended a wait on a listener while a connection is watched.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Woken {
    /// A connection is waiting on the listener.
    Connection,
    /// The watched connection's peer has stopped sending (closed, or shut its side down);
    /// what it sent before is still there to read.
    WatchedHungUp,
    TimedOut,
}

/// Waits until `listener` has a connection waiting or the peer of `watched` stops sending,
/// until `deadline`. Data arriving on `watched` does not end the wait: only its end does
/// (`POLLRDHUP`), which through TLS too shows without reading the stream.
pub(crate) fn connection_or_hang_up(
    listener: BorrowedFd<'_>,
    watched: BorrowedFd<'_>,
    deadline: Instant,
) -> io::Result<Woken> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: watched.as_raw_fd(),
                events: libc::POLLRDHUP,
                revents: 0,
            },
        ];
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Woken::TimedOut);
        }
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: `fds` is two valid pollfds for the duration of the call, their descriptors
        // borrowed from live sockets.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        let ended = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
        if fds[1].revents & ended != 0 {
            return Ok(Woken::WatchedHungUp);
        }
        if fds[0].revents != 0 {
            return Ok(Woken::Connection);
        }
    }
}

/// What `poll` found on a socket.
struct Ready {
    readable: bool,
    writable: bool,
}

/// Waits until `socket` is readable (or hung up), or writable if `want_write`; `TimedOut`
/// after `timeout` of neither.
fn wait(socket: BorrowedFd<'_>, want_write: bool, deadline: Option<Instant>) -> io::Result<Ready> {
    loop {
        let mut events = libc::POLLIN;
        if want_write {
            events |= libc::POLLOUT;
        }
        let mut pfd = libc::pollfd {
            fd: socket.as_raw_fd(),
            events,
            revents: 0,
        };
        let ms = match deadline {
            None => -1,
            Some(at) => {
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the peer took nothing for the write timeout",
                    ));
                }
                left.as_millis().clamp(1, i32::MAX as u128) as i32
            }
        };
        // SAFETY: `pfd` is one valid pollfd for the duration of the call, and its descriptor
        // is borrowed from a live socket.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(error);
        }
        if n == 0 {
            continue;
        }
        let hung_up = pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0;
        return Ok(Ready {
            readable: pfd.revents & libc::POLLIN != 0 || hung_up,
            writable: pfd.revents & libc::POLLOUT != 0,
        });
    }
}

/// One non-blocking `send`: the socket itself stays blocking for everyone else's reads.
fn send_now(socket: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes, the descriptor is a live socket
    // borrowed for the call; MSG_DONTWAIT makes it return rather than block.
    let n = unsafe {
        libc::send(
            socket.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn deadline(timeout: Option<Duration>) -> Option<Instant> {
    timeout.map(|t| Instant::now() + t)
}

/// [`Duplex::write_or_hear`] on a plain socket. The deadline restarts with every byte taken.
pub(crate) fn socket_write_or_hear(
    socket: BorrowedFd<'_>,
    mut buf: &[u8],
    timeout: Option<Duration>,
) -> io::Result<Written> {
    let mut until = deadline(timeout);
    while !buf.is_empty() {
        let ready = wait(socket, true, until)?;
        if ready.readable {
            return Ok(Written::PeerSpoke);
        }
        if ready.writable {
            match send_now(socket, buf) {
                Ok(n) => {
                    buf = &buf[n..];
                    until = deadline(timeout);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(Written::All)
}

/// A socket seen through non-blocking sends, for rustls to write its records to.
struct SendNow<'a>(BorrowedFd<'a>);

impl Write for SendNow<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        send_now(self.0, buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// [`Duplex::write_or_hear`] through TLS: records go out as the socket takes them, and
/// whatever arrives is decrypted; only application data (or the peer closing) counts as the
/// peer speaking, not the session tickets a TLS 1.3 server sends after the handshake. Bytes an
/// earlier read took off the socket beyond what it returned (the socket is read ahead, and
/// rustls takes whole records) count too: `poll` no longer shows them.
pub(crate) fn tls_write_or_hear<D>(
    conn: &mut rustls::ConnectionCommon<D>,
    sock: &mut crate::tls::TlsSocket,
    mut buf: &[u8],
) -> io::Result<Written> {
    let timeout = sock.tcp().write_timeout()?;
    let mut until = deadline(timeout);
    if tls_peer_spoke(conn)? {
        return Ok(Written::PeerSpoke);
    }
    loop {
        if !buf.is_empty() {
            // rustls takes as much as its buffer limit allows.
            let n = conn.writer().write(buf)?;
            buf = &buf[n..];
        }
        if buf.is_empty() && !conn.wants_write() {
            return Ok(Written::All);
        }
        let ready = if sock.has_buffered() {
            Ready {
                readable: true,
                writable: false,
            }
        } else {
            wait(sock.as_fd(), conn.wants_write(), until)?
        };
        // The peer's close reads as 0.
        if ready.readable && (conn.read_tls(sock)? == 0 || tls_peer_spoke(conn)?) {
            return Ok(Written::PeerSpoke);
        }
        if ready.writable {
            match conn.write_tls(&mut SendNow(sock.as_fd())) {
                Ok(_) => until = deadline(timeout),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Whether rustls holds application data not yet read, or the peer's close.
fn tls_peer_spoke<D>(conn: &mut rustls::ConnectionCommon<D>) -> io::Result<bool> {
    let state = conn
        .process_new_packets()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    Ok(state.plaintext_bytes_to_read() > 0 || state.peer_has_closed())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_into_a_peer_that_stopped_reading_ends_when_the_peer_speaks() {
        let (mut source, mut target) = UnixStream::pair().unwrap();
        let speaker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            target.write_all(b"no more, thanks").unwrap();
            // Keeps the connection open, and never reads.
            std::thread::sleep(Duration::from_secs(3));
            drop(target);
        });
        let started = Instant::now();
        // Far more than any socket buffer: a blocking write_all would wait for ever.
        let written = source.write_or_hear(&vec![7u8; 64 << 20]).unwrap();
        assert_eq!(written, Written::PeerSpoke);
        assert!(started.elapsed() < Duration::from_secs(2));
        let mut heard = [0u8; 15];
        source.read_exact(&mut heard).unwrap();
        assert_eq!(&heard, b"no more, thanks");
        speaker.join().unwrap();
    }

    #[test]
    fn a_write_a_reading_peer_takes_goes_out_whole() {
        let (mut source, mut target) = UnixStream::pair().unwrap();
        let data: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            target.read_to_end(&mut got).unwrap();
            got
        });
        assert_eq!(source.write_or_hear(&data).unwrap(), Written::All);
        drop(source);
        assert_eq!(reader.join().unwrap(), data);
    }

    #[test]
    fn a_wait_for_a_connection_ends_when_the_watched_peer_closes_not_when_it_sends() {
        let dir = std::env::temp_dir().join(format!("veil-hang-up-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("l.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let (watched, mut peer) = UnixStream::pair().unwrap();
        let soon = || Instant::now() + Duration::from_millis(300);

        peer.write_all(b"pages of the first pass").unwrap();
        let woken = connection_or_hang_up(listener.as_fd(), watched.as_fd(), soon()).unwrap();
        assert_eq!(woken, Woken::TimedOut, "data alone does not end the wait");

        let _client = UnixStream::connect(&path).unwrap();
        let woken = connection_or_hang_up(listener.as_fd(), watched.as_fd(), soon()).unwrap();
        assert_eq!(woken, Woken::Connection);
        let _ = listener.accept().unwrap();

        peer.shutdown(std::net::Shutdown::Write).unwrap();
        let woken = connection_or_hang_up(listener.as_fd(), watched.as_fd(), soon()).unwrap();
        assert_eq!(woken, Woken::WatchedHungUp);
        // What came before the end is still there.
        let mut sent = String::new();
        (&watched).read_to_string(&mut sent).unwrap();
        assert_eq!(sent, "pages of the first pass");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stalled_peer_ends_the_write_at_the_write_timeout() {
        let (mut source, _target) = UnixStream::pair().unwrap();
        source
            .set_write_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let started = Instant::now();
        let error = source.write_or_hear(&vec![0u8; 64 << 20]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
