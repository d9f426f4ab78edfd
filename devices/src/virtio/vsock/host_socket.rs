//! The host's UNIX sockets: the listener at PATH (replacing a stale socket file, removing
//! only its own), the listeners at `PATH_<port>` guests connect to, and the CONNECT line.

use std::ffi::OsString;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use socket2::{Domain, SockAddr, Socket, Type};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// The listening socket and the identity of the file it made, so that only that file is
/// ever removed.
pub(super) struct Listener {
    pub(super) socket: UnixListener,
    pub(super) file: (u64, u64),
}

/// Listens at `path`, non-blocking, in `epoll` with `token`.
pub(super) fn listen(path: &Path, epoll: &Epoll, token: u64) -> io::Result<Listener> {
    let socket = bind(path)?;
    socket.set_nonblocking(true)?;
    let file = file_id(path)?;
    epoll.ctl(
        ControlOperation::Add,
        socket.as_raw_fd(),
        EpollEvent::new(EventSet::IN, token),
    )?;
    Ok(Listener { socket, file })
}

/// The device and inode of a file.
pub(super) fn file_id(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;

    let meta = std::fs::symlink_metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// Binds `path`, replacing a socket file nobody listens on any more.
fn bind(path: &Path) -> io::Result<UnixListener> {
    match UnixListener::bind(path) {
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => match UnixStream::connect(path) {
            Err(refused) if refused.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path)?;
                UnixListener::bind(path)
            }
            // Somebody listens there: not ours to take.
            _ => Err(e),
        },
        bound => bound,
    }
}

/// Where a guest's connection to host port `port` goes: `PATH_port`.
pub fn listener_path(path: &Path, port: u32) -> PathBuf {
    let mut name = OsString::from(path.as_os_str());
    name.push(format!("_{port}"));
    PathBuf::from(name)
}

/// Connects without ever blocking the device thread: a listener whose backlog is full
/// refuses like one that is not there.
pub(super) fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
    socket.set_nonblocking(true)?;
    socket.connect(&SockAddr::unix(path)?)?;
    Ok(socket.into())
}

/// `CONNECT <port>` with an optional `\r`.
pub(super) fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?;
    let port = line.trim_end_matches('\r').strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
        assert_eq!(parse_connect(b"CONNECT 4294967295\r"), Some(u32::MAX));
        assert_eq!(parse_connect(b"CONNECT"), None);
        assert_eq!(parse_connect(b"CONNECT -1"), None);
        assert_eq!(parse_connect(b"connect 52"), None);
        assert_eq!(parse_connect(&[0xff, 0xfe]), None);
    }

    #[test]
    fn listener_paths_append_the_port() {
        assert_eq!(
            listener_path(Path::new("/run/v.sock"), 80),
            PathBuf::from("/run/v.sock_80")
        );
    }
}
