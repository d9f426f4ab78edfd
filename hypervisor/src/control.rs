//! Run, pause and stop for a VM's vCPU threads, shared between the threads and the owner.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::exits::FaultReport;
use crate::vcpu::kick_thread;

/// Why a VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmStop {
    /// The guest wrote this status to the exit port.
    GuestExit(u8),
    /// A vCPU hit something it cannot continue from.
    Fault(FaultReport),
    /// A vCPU halted and nothing can wake it (no in-kernel irqchip).
    Halted { vcpu: u32 },
    /// The host asked (Ctrl-C, `shutdown`, the library's `stop`).
    Requested,
    /// The guest migrated away and runs on another host now.
    Migrated,
    /// KVM failed under a vCPU.
    HostError { vcpu: u32, message: String },
}

impl std::fmt::Display for VmStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmStop::GuestExit(code) => write!(f, "the guest exited with status {code}"),
            VmStop::Fault(report) => report.fmt(f),
            VmStop::Halted { vcpu } => write!(f, "vCPU {vcpu} halted with no way to wake it"),
            VmStop::Requested => write!(f, "stopped on request"),
            VmStop::Migrated => write!(f, "the guest migrated to another host"),
            VmStop::HostError { vcpu, message } => write!(f, "vCPU {vcpu}: {message}"),
        }
    }
}

/// What the owner wants the vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    Paused,
    Stopped,
}

struct State {
    target: RunState,
    parked: usize,
    exited: usize,
    stop: Option<VmStop>,
    threads: Vec<libc::pthread_t>,
    /// The guest asked for a reset; vCPUs are being parked for it.
    reset_pending: bool,
}

/// Shared by a VM's vCPU threads and whoever controls the VM.
pub struct VmControl {
    state: Mutex<State>,
    changed: Condvar,
    vcpus: usize,
}

impl VmControl {
    pub(crate) fn new(vcpus: usize) -> Self {
        Self {
            state: Mutex::new(State {
                target: RunState::Running,
                parked: 0,
                exited: 0,
                stop: None,
                threads: Vec::new(),
                reset_pending: false,
            }),
            changed: Condvar::new(),
            vcpus,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn add_thread(&self, thread: libc::pthread_t) {
        self.lock().threads.push(thread);
    }

    fn kick_all(state: &State) {
        // Threads are joined only after every thread has exited, and exited threads keep their
        // pthread_t valid until joined, so every id here is safe to signal.
        for &t in &state.threads {
            kick_thread(t);
        }
    }

    /// Stops the VM for `reason`; the first reason given is the one reported.
    pub fn request_stop(&self, reason: VmStop) {
        let mut state = self.lock();
        if state.stop.is_none() {
            tracing::debug!("VM stopping: {reason}");
            state.stop = Some(reason);
        }
        state.target = RunState::Stopped;
        Self::kick_all(&state);
        self.changed.notify_all();
    }

    /// Parks every vCPU outside `KVM_RUN` and returns once all are parked (or the VM stopped).
    pub fn pause(&self) -> RunState {
        let mut state = self.lock();
        if state.target == RunState::Running {
            state.target = RunState::Paused;
            Self::kick_all(&state);
        }
        loop {
            if state.target == RunState::Stopped {
                return RunState::Stopped;
            }
            if state.parked + state.exited >= self.vcpus {
                return RunState::Paused;
            }
            // Re-kick periodically: a vCPU blocked in an in-kernel HLT needs the signal even
            // if the first one raced with its entry.
            let (s, _) = self
                .changed
                .wait_timeout(state, Duration::from_millis(20))
                .unwrap_or_else(|e| e.into_inner());
            state = s;
            if state.target == RunState::Paused && state.parked + state.exited < self.vcpus {
                Self::kick_all(&state);
            }
        }
    }

    /// Parks the vCPUs so the machine can be reset (the guest asked for it).
    pub fn request_reset(&self) {
        let mut state = self.lock();
        if state.target == RunState::Running {
            state.target = RunState::Paused;
            state.reset_pending = true;
            Self::kick_all(&state);
            self.changed.notify_all();
        }
    }

    /// Blocks until a reset is requested and every vCPU is parked (`true`), or the VM stopped.
    pub(crate) fn wait_for_reset(&self) -> bool {
        let mut state = self.lock();
        loop {
            if state.target == RunState::Stopped {
                return false;
            }
            if state.reset_pending && state.parked + state.exited >= self.vcpus {
                return true;
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The reset is done: run the vCPUs again.
    pub(crate) fn finish_reset(&self) {
        let mut state = self.lock();
        state.reset_pending = false;
        if state.target == RunState::Paused {
            state.target = RunState::Running;
        }
        self.changed.notify_all();
    }

    /// Makes vCPUs park as soon as their threads start: for a VM that must not run until told.
    pub(crate) fn hold(&self) {
        let mut state = self.lock();
        if state.target == RunState::Running {
            state.target = RunState::Paused;
        }
    }

    /// Lets parked vCPUs run again (not while a reset is under way).
    pub fn resume(&self) -> RunState {
        let mut state = self.lock();
        if state.target == RunState::Paused && !state.reset_pending {
            state.target = RunState::Running;
            self.changed.notify_all();
        }
        state.target
    }

    /// What the vCPUs are doing (or asked to do).
    pub fn run_state(&self) -> RunState {
        self.lock().target
    }

    /// The reason the VM stopped, once it has.
    pub fn stop_reason(&self) -> Option<VmStop> {
        self.lock().stop.clone()
    }

    /// Blocks until every vCPU thread has exited; returns why the VM stopped.
    pub fn wait_stopped(&self) -> VmStop {
        let mut state = self.lock();
        while state.exited < self.vcpus {
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        state.stop.clone().unwrap_or(VmStop::Requested)
    }

    /// Called by a vCPU thread before each `KVM_RUN`: parks while paused; `false` means exit.
    pub(crate) fn vcpu_may_run(&self) -> bool {
        let mut state = self.lock();
        let mut parked = false;
        while state.target == RunState::Paused {
            if !parked {
                parked = true;
                state.parked += 1;
                self.changed.notify_all();
            }
            state = self.changed.wait(state).unwrap_or_else(|e| e.into_inner());
        }
        if parked {
            state.parked -= 1;
        }
        state.target == RunState::Running
    }

    pub(crate) fn vcpu_exited(&self) {
        let mut state = self.lock();
        state.exited += 1;
        self.changed.notify_all();
    }
}
