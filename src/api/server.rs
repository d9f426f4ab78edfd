//! Serves the control API for one VM.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::protocol::{Request, Response, MAX_REQUEST_BYTES};
use super::status::{state_name, VmStatus};
use crate::Vm;
use veil_migration::sender::SendOptions;
use veil_migration::transport::{Endpoint, Security};
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

impl ApiServer {
    /// Listens on `path` (mode 0600) and serves requests for `vm` on a background thread.
    pub fn start(path: &Path, vm: Arc<Vm>) -> Result<Self, ServerError> {
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
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(bind_error)?;
        let shutdown_handle = listener.try_clone().map_err(bind_error)?;
        let in_flight = Arc::new(InFlight::default());
        let counter = Arc::clone(&in_flight);
        let stopping = Arc::new(AtomicBool::new(false));
        let stop_flag = Arc::clone(&stopping);
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
                    let vm = Arc::clone(&vm);
                    let counter = Arc::clone(&counter);
                    let migrations = migrations.clone();
                    // One thread per client: a slow client never blocks another.
                    let _ = std::thread::Builder::new()
                        .name("api-client".into())
                        .spawn(move || serve_client(stream, &vm, &migrations, &counter));
                }
            })
            .map_err(bind_error)?;
        Ok(Self {
            path: path.to_owned(),
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

/// How long a stopping server waits for requests being answered.
const IN_FLIGHT_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

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
                    (Ok(()), Some(vm)) => {
                        migrate(&vm, &job.to, job.security, job.limits, job.sev_trust_chain)
                            .map_err(|e| crate::error_chain(&*e))
                    }
                };
                let _ = job.reply.send(result);
            }
        })?;
    Ok(jobs)
}

/// A migrate request handed to the migration thread, and where its answer goes.
struct MigrateJob {
    to: String,
    security: Security,
    limits: MigrateLimits,
    sev_trust_chain: Option<String>,
    reply: mpsc::Sender<Result<serde_json::Value, String>>,
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
    let mut reader = BufReader::new(stream);
    loop {
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
        Request::Resume => Response::success(state(vm.resume())),
        Request::Shutdown => {
            vm.stop();
            Response::success(serde_json::json!({ "state": "stopping" }))
        }
        Request::Migrate {
            to,
            downtime_ms,
            timeout_s,
            insecure,
            tls,
            tls_server_name,
            wait_ready_ms,
            sev_trust_chain,
        } => {
            let (reply, answer) = mpsc::channel();
            let job = MigrateJob {
                to,
                security: Security {
                    tls,
                    insecure,
                    server_name: tls_server_name,
                },
                limits: MigrateLimits {
                    downtime_ms,
                    timeout_s,
                    wait_ready_ms,
                },
                sev_trust_chain,
                reply,
            };
            match migrations.try_send(job) {
                Ok(()) => match answer.recv() {
                    Ok(Ok(report)) => Response::success(report),
                    Ok(Err(e)) => Response::failure(e),
                    Err(_) => Response::failure("The migration thread ended without an answer"),
                },
                Err(TrySendError::Full(_)) => {
                    Response::failure("A migration of this guest is already under way")
                }
                Err(TrySendError::Disconnected(_)) => {
                    Response::failure("The migration thread is gone")
                }
            }
        }
        Request::MigrateCancel => {
            if vm.migration().cancel() {
                Response::success(serde_json::json!({ "cancelling": true }))
            } else {
                Response::failure("No migration is under way")
            }
        }
    }
}

/// The time limits of a migrate request.
struct MigrateLimits {
    downtime_ms: Option<u64>,
    timeout_s: Option<u64>,
    wait_ready_ms: Option<u64>,
}

fn migrate(
    vm: &Vm,
    to: &str,
    security: Security,
    limits: MigrateLimits,
    sev_trust_chain: Option<String>,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let endpoint: Endpoint = to.parse()?;
    // Connected only once the guest may go: the target drops a connection silent for long.
    let mut protection = "";
    let connect = || {
        let stream = veil_migration::transport::connect(&endpoint, &security)?;
        protection = stream.protection();
        Ok::<_, veil_migration::transport::TransportError>(stream)
    };
    let mut options = SendOptions::default();
    if let Some(ms) = limits.downtime_ms {
        options.downtime = std::time::Duration::from_millis(ms);
    }
    options.timeout = limits.timeout_s.map(std::time::Duration::from_secs);
    options.wait_ready = limits.wait_ready_ms.map(std::time::Duration::from_millis);
    options.monitor = std::sync::Arc::clone(vm.migration());
    let r = match vm.sev() {
        None => veil_migration::sender::send_when_ready(vm.inner(), connect, &options, None)?,
        Some(guest) => {
            let mut trusted_arks = veil_sev::emulated::identity::amd_arks()?;
            if let Some(path) = sev_trust_chain {
                use sev::parser::Decoder;
                let bytes = std::fs::read(&path).map_err(|e| format!("cannot read {path}: {e}"))?;
                let chain = sev::certs::sev::Chain::decode(&mut bytes.as_slice(), ())
                    .map_err(|e| format!("{path} is not an SEV certificate chain: {e}"))?;
                trusted_arks.push(chain.ca.ark);
            }
            let mut firmware = guest
                .launch
                .firmware
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let source = veil_migration::sender::SevSource {
                firmware: firmware.as_mut(),
                guest: guest.launch.handle,
                policy: guest.config.policy,
                platform: match guest.config.platform {
                    crate::sev_launch::SevPlatform::Hardware { .. } => {
                        veil_migration::protocol::SevPlatform::Hardware
                    }
                    crate::sev_launch::SevPlatform::Emulated { .. } => {
                        veil_migration::protocol::SevPlatform::Emulated
                    }
                },
                trusted_arks,
            };
            veil_migration::sender::send_when_ready(vm.inner(), connect, &options, Some(source))?
        }
    };
    Ok(serde_json::json!({
        "to": endpoint.to_string(),
        "total_ms": r.total.as_secs_f64() * 1e3,
        "downtime_ms": r.downtime.as_secs_f64() * 1e3,
        "bytes": r.bytes,
        "passes": r.passes,
        "pages_sent": r.pages_sent,
        "zero_pages": r.zero_pages,
        "pages_resent": r.pages_resent,
        "private_pages": r.private_pages,
        "clear_pages": r.clear_pages,
        "transport": protection,
    }))
}
