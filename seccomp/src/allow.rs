//! What each kind of thread may call.
//!
//! The lists are what the threads were seen to call while the whole end-to-end suite ran
//! (plain and SEV guests on the emulated platform, migration over UNIX sockets and TCP with
//! and without TLS, disks, vsock, console and serial sockets, pause, reset, Ctrl-C), plus the
//! SEV hardware ioctl, which these hosts cannot exercise. To regenerate them:
//!
//! ```text
//! VEIL_SECCOMP=log cargo test -j1 -p veil --tests      # nothing is killed
//! dmesg | grep 'type=1326'                              # calls a filter does not allow
//! ```
//!
//! (the kernel rate-limits those lines), and trace the suite with `strace -ff -Y`, sorting each
//! thread's calls after its `seccomp()` by the thread's name: `scripts/seccomp-calls` does it,
//! and docs/seccomp.md has the steps.

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use crate::ioctls::*;
use crate::ThreadKind;

/// What any Rust thread of Veil's does whatever its job: allocate, lock, sleep, take a signal
/// (the vCPU kick, SIGINT and SIGTERM, whose handler writes to a socket), log to stderr,
/// duplicate and close descriptors, end.
const EVERY_THREAD: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_munmap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    // A fault that is not a stack overflow (SIGSEGV, SIGBUS): Rust's handler puts the default
    // action back before the fault repeats, so the process dies of that signal, not SIGSYS.
    libc::SYS_rt_sigaction,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_write,
    libc::SYS_sendto,
    libc::SYS_fcntl,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

fn syscalls(kind: ThreadKind) -> Vec<i64> {
    let own: &[i64] = match kind {
        // Waits for the VM, then stops the API server (shutdown, unlink of its socket) and
        // drops the VM; a failed migration's memory file is unlinked.
        ThreadKind::Main => &[libc::SYS_shutdown, libc::SYS_unlink],
        // KVM_RUN and the exits; COM1 output is a write or a send (in the list above).
        ThreadKind::Vcpu => &[],
        // The kernel is read again from its file.
        ThreadKind::Reset => &[libc::SYS_openat, libc::SYS_read, libc::SYS_lseek],
        ThreadKind::Devices => &[
            libc::SYS_epoll_wait,
            libc::SYS_epoll_ctl,
            // Console and serial input, vsock streams.
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_shutdown,
            // Disks: requests and flushes.
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_fdatasync,
            // vsock: connecting to host listeners, accepting host clients, retry timers.
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_accept4,
            libc::SYS_timerfd_settime,
        ],
        ThreadKind::ConsoleSocket => &[libc::SYS_accept4],
        ThreadKind::Api => &[
            libc::SYS_accept4,
            libc::SYS_recvfrom,
            // A status counts the host's CPUs: glibc reads /sys/devices/system/cpu/online.
            libc::SYS_openat,
            libc::SYS_read,
            // A thread per client, which starts as std and glibc start threads (its name
            // is set with prctl, which the rules below allow for nothing else).
            libc::SYS_clone3,
            libc::SYS_rseq,
            libc::SYS_set_robust_list,
            libc::SYS_prctl,
            // Each client's read and write timeouts.
            libc::SYS_setsockopt,
            libc::SYS_getsockopt,
        ],
        // signal-hook's socket.
        ThreadKind::Signals => &[libc::SYS_recvfrom],
        ThreadKind::MigrationSend => &[
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_setsockopt,
            libc::SYS_read,
            libc::SYS_recvfrom,
            libc::SYS_writev,
            // A chunk's plain pages, gathered from guest memory behind its head.
            libc::SYS_sendmsg,
            // --sev-trust-chain.
            libc::SYS_openat,
            libc::SYS_statx,
            // Disks are flushed and unlocked for the target; vsock connections reset.
            libc::SYS_fdatasync,
            libc::SYS_flock,
            libc::SYS_epoll_ctl,
            libc::SYS_unlink,
            // Writes that hear the peer read their socket's write timeout.
            libc::SYS_getsockopt,
            // A migration over several connections: a thread per data stream, started (and
            // named) as the API thread starts its clients'.
            libc::SYS_clone3,
            libc::SYS_rseq,
            libc::SYS_set_robust_list,
            libc::SYS_prctl,
            // Answering recovery queries (`veil receive`'s listener after the Ack).
            libc::SYS_accept4,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_getsockname,
            libc::SYS_getpeername,
            // Writing a snapshot: files created under temporary names, synced and renamed.
            libc::SYS_mkdir,
            libc::SYS_mkdirat,
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_unlinkat,
            libc::SYS_ftruncate,
            libc::SYS_fallocate,
            libc::SYS_fsync,
            libc::SYS_lseek,
            libc::SYS_pread64,
            libc::SYS_pwrite64,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_getdents64,
            // A diff names its parent by absolute path: a library caller's relative one is
            // made absolute against the working directory.
            libc::SYS_getcwd,
        ],
        // Guest memory is written through its mapping: the socket is all this thread needs,
        // and the thread that writes the pages, which it starts (and names) as the API
        // thread starts its clients' and which inherits this filter.
        ThreadKind::MigrationReceive => &[
            libc::SYS_recvfrom,
            // A failed receive over several connections hangs the data streams up.
            libc::SYS_shutdown,
            libc::SYS_writev,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_clone3,
            libc::SYS_rseq,
            libc::SYS_set_robust_list,
            libc::SYS_prctl,
        ],
    };
    let mut all: Vec<i64> = EVERY_THREAD.iter().chain(own).copied().collect();
    all.sort_unstable();
    all.dedup();
    all
}

/// The `ioctl` requests a kind may make (`ioctl` is in its list only with these).
fn ioctls(kind: ThreadKind) -> Vec<u64> {
    // c_ulong is u64 on x86-64, the only target these lists are for.
    match kind {
        ThreadKind::Vcpu => vec![
            KVM_RUN(),
            // A fault report reads the registers and translates RIP to read the instruction.
            KVM_GET_REGS(),
            KVM_SET_REGS(),
            KVM_GET_SREGS(),
            KVM_TRANSLATE(),
        ],
        ThreadKind::Reset => vec![
            KVM_SET_REGS(),
            KVM_SET_SREGS(),
            KVM_SET_MSRS(),
            KVM_SET_FPU(),
            KVM_SET_LAPIC(),
            KVM_SET_CPUID2(),
            KVM_SET_MP_STATE(),
            KVM_SET_VCPU_EVENTS(),
            KVM_SET_DEBUGREGS(),
            KVM_SET_XSAVE(),
            KVM_SET_XCRS(),
            KVM_SET_TSC_KHZ(),
            KVM_SET_IRQCHIP(),
            KVM_SET_PIT2(),
            KVM_SET_CLOCK(),
        ],
        ThreadKind::Devices => vec![FIONBIO()],
        ThreadKind::MigrationSend => vec![
            KVM_SET_USER_MEMORY_REGION(),
            KVM_GET_DIRTY_LOG(),
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_MSRS(),
            KVM_GET_FPU(),
            KVM_GET_LAPIC(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_XSAVE(),
            KVM_GET_XSAVE2(),
            KVM_GET_XCRS(),
            KVM_GET_TSC_KHZ(),
            KVM_GET_IRQCHIP(),
            KVM_GET_PIT2(),
            KVM_GET_CLOCK(),
            KVM_KVMCLOCK_CTRL(),
            KVM_MEMORY_ENCRYPT_OP(),
            FIONBIO(),
        ],
        ThreadKind::MigrationReceive => vec![KVM_MEMORY_ENCRYPT_OP(), FIONBIO()],

        // Pausing tells the guest's kvmclock (the vCPUs are paused from the API thread).
        ThreadKind::Api => vec![KVM_KVMCLOCK_CTRL(), FIONBIO()],
        ThreadKind::Main | ThreadKind::ConsoleSocket | ThreadKind::Signals => vec![],
    }
}

/// Whether `kind` opens files itself; a kind that does not is still let through `openat` by
/// its allow-list, and refused it (EACCES) by a second filter ([`refused_opens`]).
pub(crate) fn opens_files(kind: ThreadKind) -> bool {
    syscalls(kind).contains(&libc::SYS_openat)
}

/// The rules of the second filter that a kind which opens no files carries: `openat` matches
/// (and fails with EACCES, or is logged under `log`), everything else is left to the first.
///
/// glibc opens files behind a thread's back: the first time `free` shrinks a thread's own
/// heap it reads `/proc/sys/vm/overcommit_memory`, and goes on without it if it cannot.
/// Killing the VMM for that would make any thread that frees memory a risk.
pub(crate) fn refused_opens() -> BTreeMap<i64, Vec<SeccompRule>> {
    BTreeMap::from([(libc::SYS_openat, Vec::new())])
}

/// The seccompiler rules of `kind`: each allowed call unconditionally, `ioctl` only with the
/// listed requests (compared as 32 bits: the kernel's `cmd` is an `unsigned int`).
pub(crate) fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = syscalls(kind)
        .into_iter()
        .chain([libc::SYS_openat])
        .map(|call| (call, Vec::new()))
        .collect();
    let requests = ioctls(kind);
    if !requests.is_empty() {
        let per_request = requests
            .into_iter()
            .map(|request| {
                SeccompRule::new(vec![SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    request,
                )?])
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_ioctl, per_request);
    }
    if let Some(prctl) = rules.get_mut(&libc::SYS_prctl) {
        *prctl = vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            libc::PR_SET_NAME as u64,
        )?])?];
    }
    Ok(rules)
}
