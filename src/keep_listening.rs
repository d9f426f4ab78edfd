//! `veil receive --keep-listening`: a receiver an orchestrator leaves running. This process
//! only owns the listening socket; each guest is taken by a `veil receive` child that inherits
//! it, and runs in that child. While one child waits for a source (dropping strangers), no
//! other does; once it has accepted a guest it says so on a pipe and lets go of the socket,
//! and the next child takes over. A child that ends without a guest (a refused or failed
//! migration) is replaced as well, so a failed attempt never ends the service. Recovery
//! queries about a guest whose Complete was lost come in on the listener like a source, and
//! the waiting child passes them to the guest's process ([`Siblings`]).

use std::error::Error;
use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use veil_migration::recovery::siblings::Siblings;
use veil_migration::transport;

use crate::cli::ReceiveArgs;

/// A child that ends this soon without a guest is probably failing at startup (a missing
/// file, a platform that does not open): its replacement waits this long, not to spin.
const RESPAWN_PAUSE: Duration = Duration::from_secs(1);

/// Serves guests on `args.listen` until killed.
pub fn serve(args: &ReceiveArgs) -> Result<ExitCode, Box<dyn Error>> {
    let endpoint: transport::Endpoint = args.listen.parse()?;
    let security = transport::Security {
        tls: args.tls.files(),
        insecure: args.insecure,
        server_name: None,
    };
    let listener = transport::listen(&endpoint, &security)?;
    // dup() leaves close-on-exec clear: the copy is what every child inherits.
    let shared = inheritable(listener.as_fd().as_raw_fd())?;
    // Where each guest's process answers the recovery queries about its guest.
    let siblings = Siblings::create(&std::env::temp_dir())?;
    remove_on_signal(siblings.dir().to_path_buf())?;
    eprintln!("veil: serving guests on {endpoint}, each in a process of its own");
    let exe = std::env::current_exe()?;
    let template: Vec<OsString> = std::env::args_os()
        .skip(1)
        .filter(|arg| arg != "--keep-listening")
        .collect();
    for n in 1u64.. {
        let (mut accepted, child_end) = accepted_pipe()?;
        // A path that is not UTF-8 has no `{id}` to replace and is passed on as it is.
        let child_args = template.iter().map(|arg| match arg.to_str() {
            Some(text) => OsString::from(text.replace("{id}", &n.to_string())),
            None => arg.clone(),
        });
        let started = Instant::now();
        let mut child = Command::new(&exe)
            .args(child_args)
            .arg("--listen-fd")
            .arg(shared.as_raw_fd().to_string())
            .arg("--accepted-fd")
            .arg(child_end.as_raw_fd().to_string())
            .arg("--siblings-dir")
            .arg(siblings.dir())
            .spawn()?;
        // Only the child may hold the write end: its exit must close the pipe.
        drop(child_end);
        let pid = child.id();
        std::thread::spawn(move || match child.wait() {
            Ok(status) => eprintln!("veil: guest {n}'s process {pid} ended ({status})"),
            Err(e) => eprintln!("veil: cannot wait for guest {n}'s process {pid}: {e}"),
        });
        let mut byte = [0u8; 1];
        if matches!(accepted.read(&mut byte), Ok(1)) {
            eprintln!("veil: guest {n} arrived; it runs in process {pid}");
        } else {
            eprintln!("veil: process {pid} ended without a guest; listening again");
            if started.elapsed() < RESPAWN_PAUSE {
                std::thread::sleep(RESPAWN_PAUSE);
            }
        }
    }
    unreachable!("guests are numbered by an unbounded counter")
}

/// On SIGINT or SIGTERM, removes the service's directory and exits: without the service
/// nobody passes queries to its guests' processes (they run on, and the waiting child ends
/// with this process).
fn remove_on_signal(dir: std::path::PathBuf) -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            let _ = std::fs::remove_dir_all(&dir);
            std::process::exit(128 + signal);
        }
    });
    Ok(())
}

/// A copy of `fd` that a child process inherits.
fn inheritable(fd: RawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: dup has no memory-safety preconditions; `fd` is open for the call.
    let copy = unsafe { libc::dup(fd) };
    if copy < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: dup returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(copy) })
}

/// A pipe whose read end stays here (close-on-exec) and whose write end a child inherits.
fn accepted_pipe() -> std::io::Result<(File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors that nothing else owns.
    let (read, write) = unsafe { (File::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((read, inheritable(write.as_raw_fd())?))
}
