//! Per-thread seccomp filters: each kind of thread Veil runs may make only the system calls
//! (and, for `ioctl`, only the requests) that it was seen to make, as Firecracker and Cloud
//! Hypervisor do. A guest that takes over a vCPU thread, or a peer that takes over a migration
//! thread, then cannot open files, start programs or reach new hosts from it.
//!
//! A thread installs its own filter when it starts ([`Confinement::apply`]); threads it spawns
//! afterwards inherit the filter, so every thread that spawns others (the main thread, the
//! API server) installs its filter only after it has spawned the long-lived ones.
//!
//! The lists are in `allow.rs`, with how to regenerate them (docs/seccomp.md too).

mod allow;
mod ioctls;

use std::collections::BTreeMap;
use std::sync::Arc;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter};

/// What a filter does with a call it does not allow.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// The kernel kills the whole process (`SECCOMP_RET_KILL_PROCESS`).
    On,
    /// The call goes ahead and the kernel logs it (`SECCOMP_RET_LOG`): for finding what a
    /// new code path calls without stopping the VM.
    Log,
    /// No filter at all.
    #[default]
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(Self::On),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            other => Err(format!("unknown seccomp mode {other:?}: on, log or off")),
        }
    }
}

impl std::fmt::Display for SeccompMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::On => "on",
            Self::Log => "log",
            Self::Off => "off",
        })
    }
}

/// The kinds of thread Veil runs, each with its own allow-list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ThreadKind {
    /// The process's main thread once the VM runs: waits for it to stop, then tears it down.
    Main,
    /// A vCPU thread (and the hypercall probe's one-vCPU thread): `KVM_RUN` and the exits.
    Vcpu,
    /// The thread that resets the guest when it asks: vCPU state and the kernel reloaded.
    Reset,
    /// The virtio device event loop: queues, disks, vsock and console sockets.
    Devices,
    /// Accepts clients of a console or serial port on a UNIX socket.
    ConsoleSocket,
    /// The control API server and its clients.
    Api,
    /// Turns SIGINT and SIGTERM into a stop request.
    Signals,
    /// Sends the guest to another host (the source side of a migration).
    MigrationSend,
    /// Takes over an incoming guest (the target side of a migration).
    MigrationReceive,
}

impl ThreadKind {
    /// Every kind, in order.
    pub const ALL: [ThreadKind; 9] = [
        Self::Main,
        Self::Vcpu,
        Self::Reset,
        Self::Devices,
        Self::ConsoleSocket,
        Self::Api,
        Self::Signals,
        Self::MigrationSend,
        Self::MigrationReceive,
    ];

    /// The kind's name in `VEIL_SECCOMP_PROBE` and in docs/seccomp.md.
    pub fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Vcpu => "vcpu",
            Self::Reset => "reset",
            Self::Devices => "devices",
            Self::ConsoleSocket => "console-socket",
            Self::Api => "api",
            Self::Signals => "signals",
            Self::MigrationSend => "migration-send",
            Self::MigrationReceive => "migration-receive",
        }
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("Cannot build the seccomp filter of the {} thread", kind.name())]
    Build {
        kind: ThreadKind,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("Cannot compile the seccomp filter of the {} thread", kind.name())]
    Compile {
        kind: ThreadKind,
        #[source]
        source: seccompiler::BackendError,
    },
    #[error("Cannot install the seccomp filter of the {} thread", kind.name())]
    Install {
        kind: ThreadKind,
        #[source]
        source: seccompiler::Error,
    },
}

/// The environment variable that makes one kind of thread, right after installing its filter,
/// make a call no filter allows (`personality(0xffffffff)`, which only reads the persona): the
/// end-to-end tests use it to show that `on` kills the process and `log` only logs.
pub const PROBE_VARIABLE: &str = "VEIL_SECCOMP_PROBE";

/// The compiled filters of one VMM, cheap to clone into every thread it starts; `off` installs
/// nothing.
#[derive(Clone, Default)]
pub struct Confinement {
    compiled: Option<Arc<Compiled>>,
}

struct Compiled {
    mode: SeccompMode,
    /// Each kind's filters, in the order they are installed: its own, after the refusal of
    /// `openat` for a kind that opens no files.
    programs: BTreeMap<ThreadKind, Vec<BpfProgram>>,
    /// The kind that makes the forbidden probe call (`VEIL_SECCOMP_PROBE`).
    probe: Option<ThreadKind>,
}

impl std::fmt::Debug for Confinement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Confinement({})", self.mode())
    }
}

/// Two confinements are alike when they act alike: the lists are fixed, the mode says the rest.
impl PartialEq for Confinement {
    fn eq(&self, other: &Self) -> bool {
        self.mode() == other.mode()
    }
}

impl Eq for Confinement {}

impl Confinement {
    /// No filters.
    pub fn off() -> Self {
        Self::default()
    }

    /// Compiles every kind's filter for `mode` (nothing for `off`).
    pub fn new(mode: SeccompMode) -> Result<Self, SeccompError> {
        let on_forbidden = match mode {
            SeccompMode::Off => return Ok(Self::off()),
            SeccompMode::On => SeccompAction::KillProcess,
            SeccompMode::Log => SeccompAction::Log,
        };
        // The kernel runs every filter a thread has and takes the strictest answer: `openat`,
        // which the first filter of every kind lets through, fails here with EACCES.
        let on_open = match mode {
            SeccompMode::Log => SeccompAction::Log,
            _ => SeccompAction::Errno(libc::EACCES as u32),
        };
        let refuse_opens = SeccompFilter::new(
            allow::refused_opens(),
            SeccompAction::Allow,
            on_open,
            seccompiler::TargetArch::x86_64,
        )
        .and_then(BpfProgram::try_from)
        .map_err(|source| SeccompError::Compile {
            kind: ThreadKind::Main,
            source,
        })?;
        let mut programs = BTreeMap::new();
        for kind in ThreadKind::ALL {
            let filter = SeccompFilter::new(
                allow::rules(kind).map_err(|source| SeccompError::Build { kind, source })?,
                on_forbidden.clone(),
                SeccompAction::Allow,
                seccompiler::TargetArch::x86_64,
            )
            .map_err(|source| SeccompError::Build { kind, source })?;
            let own = BpfProgram::try_from(filter)
                .map_err(|source| SeccompError::Compile { kind, source })?;
            // The refusal first: installing a filter sets no_new_privs with a prctl the
            // kind's own filter may forbid.
            let in_order = if allow::opens_files(kind) {
                vec![own]
            } else {
                vec![refuse_opens.clone(), own]
            };
            programs.insert(kind, in_order);
        }
        let probe = std::env::var(PROBE_VARIABLE)
            .ok()
            .and_then(|name| ThreadKind::ALL.into_iter().find(|k| k.name() == name));
        Ok(Self {
            compiled: Some(Arc::new(Compiled {
                mode,
                programs,
                probe,
            })),
        })
    }

    /// `on`, `log` or `off`.
    pub fn mode(&self) -> SeccompMode {
        self.compiled.as_ref().map_or(SeccompMode::Off, |c| c.mode)
    }

    /// Installs `kind`'s filter on the calling thread, for good (it also sets no_new_privs).
    pub fn apply(&self, kind: ThreadKind) -> Result<(), SeccompError> {
        let Some(compiled) = &self.compiled else {
            return Ok(());
        };
        for program in compiled.programs.get(&kind).into_iter().flatten() {
            seccompiler::apply_filter(program)
                .map_err(|source| SeccompError::Install { kind, source })?;
        }
        if compiled.probe == Some(kind) {
            // SAFETY: personality(0xffffffff) only reads the calling process's persona.
            unsafe { libc::syscall(libc::SYS_personality, 0xffff_ffff_u64) };
        }
        Ok(())
    }
}

/// An error and its causes on one line, for a thread that can only report a string.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_in_both_modes() {
        for mode in [SeccompMode::On, SeccompMode::Log] {
            let confinement = Confinement::new(mode).unwrap();
            assert_eq!(confinement.mode(), mode);
            let compiled = confinement.compiled.as_ref().unwrap();
            assert_eq!(compiled.programs.len(), ThreadKind::ALL.len());
        }
        assert_eq!(
            Confinement::new(SeccompMode::Off).unwrap().mode(),
            SeccompMode::Off
        );
    }

    #[test]
    fn the_probe_call_is_forbidden_to_every_kind() {
        for kind in ThreadKind::ALL {
            assert!(
                !allow::rules(kind)
                    .unwrap()
                    .contains_key(&libc::SYS_personality),
                "{}",
                kind.name()
            );
        }
    }

    #[test]
    fn modes_parse_and_print() {
        for mode in [SeccompMode::On, SeccompMode::Log, SeccompMode::Off] {
            assert_eq!(mode.to_string().parse::<SeccompMode>(), Ok(mode));
        }
        assert!("yes".parse::<SeccompMode>().is_err());
    }

    /// A thread under a log-mode filter shows it in its status, and what it may not call (open
    /// and read that status) is only logged.
    #[test]
    fn a_thread_under_a_log_filter_runs_on_and_shows_its_filter() {
        let confinement = Confinement::new(SeccompMode::Log).unwrap();
        let status = std::thread::spawn(move || {
            confinement.apply(ThreadKind::Vcpu).unwrap();
            std::fs::read_to_string("/proc/thread-self/status").unwrap()
        })
        .join()
        .unwrap();
        assert!(status.contains("Seccomp:\t2"), "{status}");
    }

    /// Under `on`, a kind that opens no files is refused `openat` (EACCES) and lives on, as
    /// glibc expects when it probes `/proc/sys/vm/overcommit_memory`; a kind that opens files
    /// opens them.
    #[test]
    fn under_on_a_thread_that_opens_no_files_is_refused_an_open_and_lives() {
        let confinement = Confinement::new(SeccompMode::On).unwrap();
        let open = |kind| {
            let confinement = confinement.clone();
            std::thread::spawn(move || {
                confinement.apply(kind).unwrap();
                std::fs::File::open("/proc/sys/vm/overcommit_memory")
                    .map(drop)
                    .map_err(|e| e.raw_os_error())
            })
            .join()
            .unwrap()
        };
        for kind in [
            ThreadKind::MigrationReceive,
            ThreadKind::Vcpu,
            ThreadKind::Devices,
        ] {
            assert_eq!(open(kind), Err(Some(libc::EACCES)), "{}", kind.name());
        }
        assert_eq!(open(ThreadKind::Reset), Ok(()));
    }

    /// A confined thread that faults (here: SIGBUS, a read past the end of a mapped file)
    /// kills the process with that signal, which says what happened, not with SIGSYS. Run in a
    /// child process, as this test binary run again.
    #[test]
    fn a_fault_under_on_kills_with_its_own_signal_not_seccomps() {
        const CHILD: &str = "VEIL_SECCOMP_TEST_FAULT";
        if let Some(path) = std::env::var_os(CHILD) {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)
                .unwrap();
            file.set_len(4096).unwrap();
            // SAFETY: a fresh shared mapping of one page of `file`, which outlives it here.
            let page = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    std::os::fd::AsRawFd::as_raw_fd(&file),
                    0,
                )
            };
            assert_ne!(page, libc::MAP_FAILED);
            file.set_len(0).unwrap();
            Confinement::new(SeccompMode::On)
                .unwrap()
                .apply(ThreadKind::Vcpu)
                .unwrap();
            // SAFETY: `page` is mapped (above) and readable; the file behind it is now empty,
            // so the read faults with SIGBUS, which is the point.
            let byte = unsafe { std::ptr::read_volatile(page.cast::<u8>()) };
            unreachable!("read {byte} past the end of the file");
        }
        use std::os::unix::process::ExitStatusExt;
        let path = std::env::temp_dir().join(format!("veil-seccomp-fault-{}", std::process::id()));
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::a_fault_under_on_kills_with_its_own_signal_not_seccomps",
                "--test-threads=1",
            ])
            .env(CHILD, &path)
            .output()
            .unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGBUS),
            "{out:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
