//! Writing while listening: the source sends for seconds on end and the target speaks only to
//! end the migration, so every write also watches the return path. A target that fails but
//! keeps its connection open (and stops reading) then stops the source at once, where a plain
//! blocking write would sit in a full socket buffer until the peer timeout.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use veil_hypervisor::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

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

    /// Whether [`write_pages_or_hear`](Self::write_pages_or_hear) sends pages from guest
    /// memory itself; if not, a sender does better to copy them into its chunk once.
    fn sends_from_guest_memory(&self) -> bool {
        false
    }

    /// Writes `head`, then the guest pages at `pages` (a page each, read from `memory` as
    /// they go), unless the peer has something to say first. The pages may change while
    /// they are written: their reader must tell (a memory chunk's bodies have CRCs).
    ///
    /// This default copies the pages through a buffer into
    /// [`write_or_hear`](Self::write_or_hear), as a transport that has to see the bytes
    /// (TLS encrypts them) would anyway; a plain socket sends them from guest memory.
    fn write_pages_or_hear(
        &mut self,
        head: &[u8],
        memory: &GuestMemory,
        pages: &[GuestAddress],
    ) -> io::Result<Written> {
        copy_pages_or_hear(self, head, memory, pages)
    }
}

/// The default [`Duplex::write_pages_or_hear`]: the pages copied through a small buffer.
pub(crate) fn copy_pages_or_hear<D: Duplex + ?Sized>(
    stream: &mut D,
    head: &[u8],
    memory: &GuestMemory,
    pages: &[GuestAddress],
) -> io::Result<Written> {
    if stream.write_or_hear(head)? == Written::PeerSpoke {
        return Ok(Written::PeerSpoke);
    }
    let mut staged = Vec::with_capacity(STAGED_PAGES * PAGE_BYTES);
    for batch in pages.chunks(STAGED_PAGES) {
        staged.resize(batch.len() * PAGE_BYTES, 0);
        for (at, page) in batch.iter().zip(staged.chunks_exact_mut(PAGE_BYTES)) {
            memory.read_slice(page, *at).map_err(guest_memory_error)?;
        }
        if stream.write_or_hear(&staged)? == Written::PeerSpoke {
            return Ok(Written::PeerSpoke);
        }
    }
    Ok(Written::All)
}

/// Pages the default [`Duplex::write_pages_or_hear`] copies at a time: small enough to stay
/// in the cache until the transport has taken them.
const STAGED_PAGES: usize = 16;
const PAGE_BYTES: usize = veil_hypervisor::memory::PAGE_SIZE as usize;
/// The most iovecs one `sendmsg` takes (Linux's `UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

fn guest_memory_error(e: vm_memory::GuestMemoryError) -> io::Error {
    io::Error::other(e)
}

impl<T: Duplex + ?Sized> Duplex for &mut T {
    fn write_or_hear(&mut self, buf: &[u8]) -> io::Result<Written> {
        (**self).write_or_hear(buf)
    }

    fn sends_from_guest_memory(&self) -> bool {
        (**self).sends_from_guest_memory()
    }

    fn write_pages_or_hear(
        &mut self,
        head: &[u8],
        memory: &GuestMemory,
        pages: &[GuestAddress],
    ) -> io::Result<Written> {
        (**self).write_pages_or_hear(head, memory, pages)
    }
}

/// A plain socket: non-blocking sends that watch the return path, pages gathered from guest
/// memory; the same for a UNIX and a TCP stream.
macro_rules! socket_duplex {
    ($socket:ty) => {
        impl Duplex for $socket {
            fn write_or_hear(&mut self, buf: &[u8]) -> io::Result<Written> {
                let timeout = self.write_timeout()?;
                socket_write_or_hear(self.as_fd(), buf, timeout)
            }

            fn sends_from_guest_memory(&self) -> bool {
                true
            }

            fn write_pages_or_hear(
                &mut self,
                head: &[u8],
                memory: &GuestMemory,
                pages: &[GuestAddress],
            ) -> io::Result<Written> {
                let timeout = self.write_timeout()?;
                socket_write_pages_or_hear(self.as_fd(), head, memory, pages, timeout)
            }
        }
    };
}

socket_duplex!(UnixStream);
socket_duplex!(TcpStream);

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

/// [`Duplex::write_pages_or_hear`] on a plain socket: `sendmsg` gathers the head and the
/// pages, the kernel copying the pages from guest memory into the socket (one copy, where a
/// chunk buffer cost two). Pages next to each other in host memory go as one iovec.
pub(crate) fn socket_write_pages_or_hear(
    socket: BorrowedFd<'_>,
    head: &[u8],
    memory: &GuestMemory,
    pages: &[GuestAddress],
    timeout: Option<Duration>,
) -> io::Result<Written> {
    let mut guards = Vec::with_capacity(pages.len());
    let mut iovecs = vec![libc::iovec {
        iov_base: head.as_ptr() as *mut libc::c_void,
        iov_len: head.len(),
    }];
    for &at in pages {
        let slice = memory
            .get_slice(at, PAGE_BYTES)
            .map_err(guest_memory_error)?;
        let guard = slice.ptr_guard();
        let base = guard.as_ptr();
        let last = iovecs.last_mut().expect("the head's iovec");
        if last.iov_base as usize + last.iov_len == base as usize {
            last.iov_len += PAGE_BYTES;
        } else {
            iovecs.push(libc::iovec {
                iov_base: base as *mut libc::c_void,
                iov_len: PAGE_BYTES,
            });
        }
        // Keeps each page's mapping pinned (a no-op for an mmap region) until it is sent.
        guards.push(guard);
    }
    let mut until = deadline(timeout);
    let mut next = 0;
    while next < iovecs.len() {
        let ready = wait(socket, true, until)?;
        if ready.readable {
            return Ok(Written::PeerSpoke);
        }
        if !ready.writable {
            continue;
        }
        let window_end = (next + MAX_IOVECS).min(iovecs.len());
        let window = &mut iovecs[next..window_end];
        match sendmsg_now(socket, window) {
            Ok(mut n) => {
                until = deadline(timeout);
                while n > 0 && next < iovecs.len() {
                    let iov = &mut iovecs[next];
                    let took = n.min(iov.iov_len);
                    // SAFETY: `took` is at most the iovec's length, so the base stays
                    // within (or one past) the buffer it points into.
                    iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(took) }.cast();
                    iov.iov_len -= took;
                    n -= took;
                    if iov.iov_len == 0 {
                        next += 1;
                    }
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    drop(guards);
    Ok(Written::All)
}

/// One non-blocking `sendmsg` of `iovecs`.
fn sendmsg_now(socket: BorrowedFd<'_>, iovecs: &mut [libc::iovec]) -> io::Result<usize> {
    // SAFETY: an all-zero msghdr is a valid empty message (no address, no control data).
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = iovecs.as_mut_ptr();
    msg.msg_iovlen = iovecs.len() as _;
    // SAFETY: every iovec points into the frame's head or into guest memory whose mapping
    // the caller holds (its PtrGuards) for at least the call, each valid for reads of its
    // length; the kernel only reads them. The descriptor is a live socket borrowed for the
    // call, and MSG_DONTWAIT makes it return rather than block.
    let n = unsafe {
        libc::sendmsg(
            socket.as_raw_fd(),
            &msg,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
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

    /// What a reading peer got of `write`, which must have gone out whole.
    fn received(write: impl FnOnce(&mut UnixStream) -> io::Result<Written>) -> Vec<u8> {
        let (mut source, mut target) = UnixStream::pair().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            target.read_to_end(&mut got).unwrap();
            got
        });
        assert_eq!(write(&mut source).unwrap(), Written::All);
        drop(source);
        reader.join().unwrap()
    }

    #[test]
    fn a_write_a_reading_peer_takes_goes_out_whole() {
        let data: Vec<u8> = (0..4 << 20).map(|i| (i % 251) as u8).collect();
        assert_eq!(received(|source| source.write_or_hear(&data)), data);
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
    fn pages_gathered_from_guest_memory_arrive_in_order_after_the_head() {
        use vm_memory::Bytes;
        let ram = crate::receiver::tests::fresh_ram();
        let memory = ram.memory();
        // Runs of neighbours (one iovec each) and strays, more iovecs than one sendmsg takes.
        let gfns: Vec<u64> = (0..64)
            .chain((100..3000).step_by(2))
            .chain([70, 65])
            .collect();
        for &gfn in &gfns {
            memory
                .write_obj(gfn * 0x1_0000 + 7, GuestAddress(gfn * PAGE_BYTES as u64))
                .unwrap();
        }
        let pages: Vec<GuestAddress> = gfns
            .iter()
            .map(|&gfn| GuestAddress(gfn * PAGE_BYTES as u64))
            .collect();
        let head = b"a chunk's head";
        let mut expected = head.to_vec();
        for at in &pages {
            let mut page = vec![0; PAGE_BYTES];
            memory.read_slice(&mut page, *at).unwrap();
            expected.extend_from_slice(&page);
        }
        let copied = received(|source| copy_pages_or_hear(source, head, memory, &pages));
        assert_eq!(copied, expected, "the copying default");
        let gathered = received(|source| source.write_pages_or_hear(head, memory, &pages));
        assert_eq!(gathered, expected, "gathered from guest memory");
    }

    #[test]
    fn a_gathered_write_ends_when_the_peer_speaks() {
        let ram = crate::receiver::tests::fresh_ram();
        let pages: Vec<GuestAddress> = (0..4000)
            .map(|gfn| GuestAddress(gfn * PAGE_BYTES as u64))
            .collect();
        let (mut source, mut target) = UnixStream::pair().unwrap();
        target.write_all(b"refused").unwrap();
        // The peer never reads: 16 MiB could never go out.
        let written = source
            .write_pages_or_hear(b"head", ram.memory(), &pages)
            .unwrap();
        assert_eq!(written, Written::PeerSpoke);
        let mut heard = [0u8; 7];
        source.read_exact(&mut heard).unwrap();
        assert_eq!(&heard, b"refused");
        // Outside guest memory: an error, not a panic.
        let beyond = [GuestAddress(1 << 40)];
        assert!(source
            .write_pages_or_hear(b"", ram.memory(), &beyond)
            .is_err());
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
