//! Getting a vCPU thread out of `KVM_RUN` promptly, whatever it is doing.
//!
//! The owner sends the thread a real-time signal. The handler sets `immediate_exit` in that
//! thread's `kvm_run`, so a signal that lands just before `KVM_RUN` is entered is not lost:
//! KVM returns `EINTR` at once instead of running the guest.

use std::cell::Cell;
use std::os::raw::{c_int, c_void};
use std::sync::atomic::{fence, Ordering};
use std::sync::Once;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

thread_local! {
    /// The `kvm_run` of the vCPU this thread runs, or null.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used to kick vCPU threads.
pub fn kick_signal() -> c_int {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: c_int, _: *mut libc::siginfo_t, _: *mut c_void) {
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer was set by `KickTarget::arm` on this very thread and stays valid
        // until `KickTarget` is dropped on this thread, which clears it first.
        unsafe { (*run).immediate_exit = 1 };
        fence(Ordering::Release);
    }
}

/// Installs the process-wide kick handler (idempotent).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static INSTALL: Once = Once::new();
    let mut result = Ok(());
    INSTALL.call_once(|| result = register_signal_handler(kick_signal(), handle_kick));
    result
}

/// While alive, kicks to this thread set `immediate_exit` on `fd`'s `kvm_run`.
pub struct KickTarget(());

impl KickTarget {
    /// Arms the current thread for `fd`; keep the guard alive while running `fd`.
    pub fn arm(fd: &mut VcpuFd) -> Self {
        let run: *mut kvm_run = fd.get_kvm_run();
        KVM_RUN.with(|cell| cell.set(run));
        Self(())
    }

    /// Clears a kick already handled, before checking whether to run again.
    pub fn clear(&self) {
        let run = KVM_RUN.with(Cell::get);
        // SAFETY: set by `arm` on this thread for a `kvm_run` that outlives this guard.
        unsafe { (*run).immediate_exit = 0 };
    }
}

impl Drop for KickTarget {
    fn drop(&mut self) {
        KVM_RUN.with(|cell| cell.set(std::ptr::null_mut()));
    }
}

/// Sends the kick signal to a thread.
pub fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: callers pass the pthread_t of a vCPU thread that has not been joined yet; the
    // signal number is a valid real-time signal with our handler installed.
    let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
    if rc != 0 {
        tracing::debug!(
            "kicking vCPU thread failed: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
}
