//! Serves the control API for one VM.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::protocol::{MigrationTarget, Request, Response, MAX_REQUEST_BYTES};
use super::status::{state_name, VmStatus};
use crate::snapshot::Kind;
use crate::Vm;
use veil_migration::recovery::RunOn;
use veil_seccomp::ThreadKind;

/// Errors starting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("Cannot listen on API socket {}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("API socket {} is in use by a running VMM", path.display())]
    InUse { path: PathBuf },
}

/// The API server; stops and removes its socket when dropped.
pub struct ApiServer {
    path: PathBuf,
    /// Requests being answered; the server waits for them when dropped, so a VMM that exits
    /// (a migration that just handed the guest over) still sends the answer.
    in_flight: Arc<InFlight>,
    /// A second handle on the listening socket, to shut it down from `drop`.
    listener: UnixListener,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The API socket listening (mode 0600) but not served yet: bound before the VM starts, so
/// that it is there by the time the guest runs, and clients that come early wait in its
/// backlog. Removed if dropped unserved (the VM did not start).
pub struct BoundApi {
    path: PathBuf,
    listener: Option<UnixListener>,
}

impl BoundApi {
    /// Listens on `path`, refusing one a running VMM serves and replacing a stale one.
    pub fn bind(path: &Path) -> Result<Self, ServerError> {
        let bind_error = |source| ServerError::Bind {
            path: path.to_owned(),
            source,
        };
        if path.exists() {
            if UnixStream::connect(path).is_ok() {
                return Err(ServerError::InUse {
                    path: path.to_owned(),
                });
            }
            std::fs::remove_file(path).map_err(bind_error)?;
        }
        let listener = UnixListener::bind(path).map_err(bind_error)?;
        let bound = Self {
            path: path.to_owned(),
            listener: Some(listener),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_error)?;
        Ok(bound)
    }

    /// Serves requests for `vm` on a background thread.
    pub fn serve(mut self, vm: Arc<Vm>) -> Result<ApiServer, ServerError> {
        let listener = self.listener.take().expect("an unserved socket");
        ApiServer::serve(std::mem::take(&mut self.path), listener, vm)
    }
}

impl Drop for BoundApi {
    fn drop(&mut self) {
        if self.listener.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl ApiServer {
    /// Listens on `path` (mode 0600) and serves requests for `vm` on a background thread.
    pub fn start(path: &Path, vm: Arc<Vm>) -> Result<Self, ServerError> {
        BoundApi::bind(path)?.serve(vm)
    }

    fn serve(path: PathBuf, listener: UnixListener, vm: Arc<Vm>) -> Result<Self, ServerError> {
        let bind_error = |source| ServerError::Bind {
            path: path.clone(),
            source,
        };
        let shutdown_handle = listener.try_clone().map_err(bind_error)?;
        let in_flight = Arc::new(InFlight::default());
        let counter = Arc::clone(&in_flight);
        let stopping = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stopping);
        let clients = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let confinement = vm.confinement().clone();
        let migrations = start_migration_thread(&vm).map_err(bind_error)?;
        let thread = std::thread::Builder::new()
            .name("api".into())
            .spawn(move || {
                // Client threads start from this one and inherit its filter.
                if let Err(e) = confinement.apply(ThreadKind::Api) {
                    tracing::error!(error = %veil_seccomp::chain(&e), "The control API does not start");
                    return;
                }
                for stream in listener.incoming() {
                    if stop_flag.load(Ordering::Acquire) {
                        break;
                    }
                    let Ok(stream) = stream else {
                        // A shut-down listener fails every accept at once: don't spin on it.
                        if stop_flag.load(Ordering::Acquire) {
                            break;
                        }
                        continue;
                    };
                    // One thread per client, so a slow client never blocks another, and at
                    // most MAX_CLIENTS of them: one more is told so and closed.
                    let Some(slot) = ClientSlot::take(&clients) else {
                        refuse_busy(stream);
                        continue;
                    };
                    let vm = Arc::clone(&vm);
                    let counter = Arc::clone(&counter);
                    let migrations = migrations.clone();
                    // One thread per client: a slow client never blocks another.
                    let _ = std::thread::Builder::new()
                        .name("api-client".into())
                        .spawn(move || {
                            let _slot = slot;
                            serve_client(stream, &vm, &migrations, &counter)
                        });
                }
            })
            .map_err(bind_error)?;
        Ok(Self {
            path,
            in_flight,
            listener: shutdown_handle,
            stopping,
            thread: Some(thread),
        })
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        // Wake the accept loop so it sees the flag. Shutting the listening socket down does it
        // even when the socket file is gone (someone removed it), where connecting would not.
        // SAFETY: shutdown on a descriptor this server owns; at worst it fails with an errno.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.in_flight.wait_idle(IN_FLIGHT_GRACE);
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The most clients served at once (each has a thread of its own); one more gets an error line
/// and is closed. `veil ctl migrate` uses three (the request, its progress bar, its cancel).
pub const MAX_CLIENTS: usize = 16;

/// How long a client has to send a whole request line, from the end of its last answer (or
/// from connecting): an idle or trickling client is disconnected then, and its slot freed.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a client may leave an answer unread before it is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// [`REQUEST_TIMEOUT`], or `VEIL_TEST_API_REQUEST_TIMEOUT_MS` for tests only.
fn request_timeout() -> Duration {
    std::env::var("VEIL_TEST_API_REQUEST_TIMEOUT_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(REQUEST_TIMEOUT, Duration::from_millis)
}

/// One of the [`MAX_CLIENTS`] places, given back when dropped.
struct ClientSlot(Arc<AtomicUsize>);

impl ClientSlot {
    fn take(clients: &Arc<AtomicUsize>) -> Option<Self> {
        clients
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_CLIENTS).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(clients)))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Tells a client beyond [`MAX_CLIENTS`] why it is turned away (without blocking the accept
/// loop on it).
fn refuse_busy(stream: UnixStream) {
    let _ = stream.set_nonblocking(true);
    let response = Response::failure(format!(
        "The VMM is serving {MAX_CLIENTS} API clients already: try again once one is done"
    ));
    let mut text = serde_json::to_vec(&response).unwrap_or_default();
    text.push(b'\n');
    let _ = (&stream).write_all(&text);
}

/// A client's socket read against a deadline for the whole request line: each read waits
/// only for what is left of it, so a client sending a byte now and then is cut off too.
struct RequestDeadline {
    stream: UnixStream,
    deadline: Instant,
    timeout: Duration,
}

impl Read for RequestDeadline {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.stream.set_read_timeout(Some(left))?;
        self.stream.read(buf)
    }
}

/// How long a stopping server waits for requests being answered.
const IN_FLIGHT_GRACE: Duration = Duration::from_secs(10);

/// Counts requests being answered.
#[derive(Default)]
struct InFlight {
    count: std::sync::Mutex<usize>,
    idle: std::sync::Condvar,
}

impl InFlight {
    fn begin(&self) {
        *self.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    fn end(&self) {
        let mut count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        *count -= 1;
        self.idle.notify_all();
    }

    fn wait_idle(&self, grace: std::time::Duration) {
        let count = self.count.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .idle
            .wait_timeout_while(count, grace, |c| *c > 0)
            .unwrap_or_else(|e| e.into_inner());
    }
}

/// Starts the thread that sends the guest away when asked: a thread of its own, started
/// before any filter is installed, so that it gets the `migration-send` filter and the API
/// threads need not be allowed what a migration does.
fn start_migration_thread(vm: &Arc<Vm>) -> io::Result<SyncSender<MigrateJob>> {
    // No queue: a request finds the thread waiting, or a migration under way.
    let (jobs, incoming) = mpsc::sync_channel::<MigrateJob>(0);
    let confinement = vm.confinement().clone();
    // Not an owner: the VM is torn down by whoever holds it, never by this idle thread.
    let vm = Arc::downgrade(vm);
    std::thread::Builder::new()
        .name("migrate-send".into())
        .spawn(move || {
            let confined = confinement.apply(ThreadKind::MigrationSend);
            for job in incoming {
                let result = match (&confined, vm.upgrade()) {
                    (Err(e), _) => Err(crate::error_chain(e)),
                    (Ok(()), None) => Err("The VM is gone".into()),
                    (Ok(()), Some(vm)) => (job.work)(&vm).map_err(|e| crate::error_chain(&*e)),
                };
                let _ = job.reply.send(result);
            }
        })?;
    Ok(jobs)
}

/// A migrate request handed to the migration thread, and where its answer goes.
/// Work that moves or saves the guest: it runs on the migration thread, under that thread's
/// filter, one job at a time.
struct MigrateJob {
    work: Box<dyn FnOnce(&Vm) -> JobResult + Send>,
    reply: mpsc::Sender<Result<serde_json::Value, String>>,
}

/// What a job answers: its report, or why it failed.
type JobResult = Result<serde_json::Value, Box<dyn std::error::Error>>;

/// Hands `work` to the migration thread and waits for its answer.
fn on_worker(
    migrations: &SyncSender<MigrateJob>,
    work: impl FnOnce(&Vm) -> JobResult + Send + 'static,
) -> Response {
    let (reply, answer) = mpsc::channel();
    let job = MigrateJob {
        work: Box::new(work),
        reply,
    };
    match migrations.try_send(job) {
        Ok(()) => match answer.recv() {
            Ok(Ok(report)) => Response::success(report),
            Ok(Err(e)) => Response::failure(e),
            Err(_) => Response::failure("The migration thread ended without an answer"),
        },
        Err(TrySendError::Full(_)) => Response::failure(
            "A migration, recovery or snapshot of this guest is already under way",
        ),
        Err(TrySendError::Disconnected(_)) => Response::failure("The migration thread is gone"),
    }
}

fn serve_client(
    stream: UnixStream,
    vm: &Vm,
    migrations: &SyncSender<MigrateJob>,
    in_flight: &InFlight,
) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    if writer.set_write_timeout(Some(WRITE_TIMEOUT)).is_err() {
        return;
    }
    let timeout = request_timeout();
    let mut reader = BufReader::new(RequestDeadline {
        stream,
        deadline: Instant::now() + timeout,
        timeout,
    });
    loop {
        reader.get_mut().deadline = Instant::now() + reader.get_ref().timeout;
        let mut line = Vec::new();
        let read = (&mut reader)
            .take(MAX_REQUEST_BYTES as u64 + 1)
            .read_until(b'\n', &mut line);
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        in_flight.begin();
        let response = if line.len() > MAX_REQUEST_BYTES {
            Response::failure(format!("Request longer than {MAX_REQUEST_BYTES} bytes"))
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(request) => handle(request, vm, migrations),
                Err(e) => Response::failure(format!("Malformed request: {e}")),
            }
        };
        let mut text = serde_json::to_vec(&response).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        text.push(b'\n');
        let written = writer.write_all(&text);
        in_flight.end();
        if written.is_err() {
            return;
        }
        if line.len() > MAX_REQUEST_BYTES {
            // The rest of an oversized line cannot be trusted to be a request boundary.
            return;
        }
    }
}

fn handle(request: Request, vm: &Vm, migrations: &SyncSender<MigrateJob>) -> Response {
    let state = |s| serde_json::json!({ "state": state_name(s) });
    match request {
        Request::Status => match serde_json::to_value(VmStatus::of(vm)) {
            Ok(v) => Response::success(v),
            Err(e) => Response::failure(format!("Cannot encode status: {e}")),
        },
        Request::Pause => Response::success(state(vm.pause())),
        Request::Resume if vm.migration().in_doubt().is_some() => Response::failure(
            "The guest's migration is in doubt (the target may be running it): it cannot resume \
             here until `veil ctl migrate-recover` has asked the target",
        ),
        Request::Resume if vm.migration().holds_the_guest() => Response::failure(
            "The guest is paused for the end of its migration: it resumes here by itself if the \
             migration fails",
        ),
        Request::Resume => Response::success(state(vm.resume())),
        Request::Shutdown => {
            vm.stop();
            Response::success(serde_json::json!({ "state": "stopping" }))
        }
        Request::Migrate {
            target,
            downtime_ms,
            timeout_s,
            wait_ready_ms,
            connections,
            sev_trust_chain,
        } => {
            let limits = MigrateLimits {
                downtime_ms,
                timeout_s,
                wait_ready_ms,
                connections,
            };
            on_worker(migrations, move |vm| {
                migrate(vm, target, limits, sev_trust_chain)
            })
        }
        Request::Snapshot {
            to,
            stop,
            diff,
            live,
            sev_target_chain,
        } => on_worker(migrations, move |vm| {
            let kind = match (diff, live) {
                (true, true) => return Err("a snapshot is either a diff or live, not both".into()),
                (true, false) => Kind::Diff,
                (false, true) => Kind::Live,
                (false, false) => Kind::Full,
            };
            snapshot(vm, &to, stop, kind, sev_target_chain)
        }),
        Request::MigrateRecover { target, run_on } => on_worker(migrations, move |vm| {
            let runs_on = recover(vm, target, run_on)?;
            Ok(serde_json::json!({ "runs_on": runs_on, "state": state_name(vm.state()) }))
        }),
        Request::MigrateCancel => {
            if vm.migration().cancel() {
                Response::success(serde_json::json!({ "cancelling": true }))
            } else {
                Response::failure("No migration is under way")
            }
        }
    }
}

fn snapshot(
    vm: &Vm,
    to: &str,
    stop: bool,
    kind: Kind,
    sev_target_chain: Option<String>,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    if kind != Kind::Full && sev_target_chain.is_some() {
        return Err(
            "diff and live snapshots cannot be of an SEV guest: sev_target_chain is for full snapshots"
                .into(),
        );
    }
    let chain = match sev_target_chain {
        Some(path) => {
            let chain = crate::sev_chain::read_chain_file(Path::new(&path))?;
            // A damaged or mixed-up chain is caught here, not at restore: its own root must
            // sign it through.
            veil_sev::emulated::identity::verify_chain(&chain, std::slice::from_ref(&chain.ca.ark))
                .map_err(|e| format!("{path} does not verify: {e}"))?;
            Some(chain)
        }
        None => None,
    };
    let after = if stop {
        crate::AfterSnapshot::Stop
    } else {
        crate::AfterSnapshot::Resume
    };
    let r = vm.save(Path::new(to), after, chain, kind)?;
    Ok(serde_json::json!({
        "dir": r.dir,
        "live": kind == Kind::Live,
        "diff_of": r.diff_of,
        "dirty_pages": r.dirty_pages,
        "memory_bytes": r.memory_bytes,
        "pages_written": r.pages_written,
        "private_pages": r.private_pages,
        "paused_ms": r.paused.as_secs_f64() * 1e3,
        "total_ms": r.total.as_secs_f64() * 1e3,
        "stopped": stop,
    }))
}

fn recover(
    vm: &Vm,
    target: MigrationTarget,
    run_on: Option<RunOn>,
) -> Result<RunOn, Box<dyn std::error::Error>> {
    let (endpoint, security) = target.endpoint()?;
    let run_on = run_on.unwrap_or_else(|| RunOn::default_for(vm.inner()));
    Ok(veil_migration::recovery::recover(
        vm.inner(),
        vm.migration(),
        run_on,
        || veil_migration::transport::connect(&endpoint, &security),
    )?)
}

/// The time limits of a migrate request.
struct MigrateLimits {
    downtime_ms: Option<u64>,
    timeout_s: Option<u64>,
    wait_ready_ms: Option<u64>,
    connections: Option<usize>,
}

fn migrate(
    vm: &Vm,
    target: MigrationTarget,
    limits: MigrateLimits,
    sev_trust_chain: Option<String>,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let (endpoint, security) = target.endpoint()?;
    if crate::snapshot::snapshot_under_way() {
        return Err(
            "A snapshot of this guest is being written: migrate it once that is done".into(),
        );
    }
    let mut outgoing = crate::migration::Outgoing::new(endpoint, security);
    outgoing.downtime = limits.downtime_ms.map(Duration::from_millis);
    outgoing.timeout = limits.timeout_s.map(Duration::from_secs);
    outgoing.wait_ready = limits.wait_ready_ms.map(Duration::from_millis);
    outgoing.connections = limits.connections;
    outgoing.sev_trust_chain = sev_trust_chain.map(Into::into);
    let sent = crate::migration::send(vm, &outgoing)?;
    let r = &sent.report;
    Ok(serde_json::json!({
        "to": outgoing.to.to_string(),
        "total_ms": r.total.as_secs_f64() * 1e3,
        "downtime_ms": r.downtime.as_secs_f64() * 1e3,
        "bytes": r.bytes,
        "passes": r.passes,
        "pages_sent": r.pages_sent,
        "zero_pages": r.zero_pages,
        "pages_resent": r.pages_resent,
        "private_pages": r.private_pages,
        "clear_pages": r.clear_pages,
        "connections": r.connections,
        "transport": sent.transport,
    }))
}
