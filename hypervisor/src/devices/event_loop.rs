//! The device thread: one `event-manager` loop serving every device's queue kicks and backend
//! events, which the VM can pause (every device quiet, nothing in flight) and stop.
//!
//! Devices serve a request entirely inside their event handler, so once the loop is between
//! two rounds no request is in flight: pausing waits for exactly that point. A wake eventfd
//! makes a loop blocked in `epoll_wait` notice at once.
//!
//! After serving, the loop polls for a short while before it blocks again ([`POLL_AFTER_WORK`]),
//! as QEMU's iothreads do: a guest doing I/O kicks again within tens of microseconds, and a
//! thread that went to sleep in between pays a wake-up (on a host that halts idle cores, ~40 us
//! per request, most of a request's cost) every time.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use veil_seccomp::{Confinement, ThreadKind};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// How long the loop keeps polling after it last served something before it blocks: longer
/// than a guest's gap between a completion and its next request at queue depth 1 (measured
/// ~57 us for the kit), short enough that an idle guest costs no CPU.
pub const POLL_AFTER_WORK: Duration = Duration::from_micros(100);

/// What the device thread serves.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Errors starting the device thread.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("Cannot create the device loop's epoll instance or eventfd")]
    Create(#[source] std::io::Error),
    #[error("Cannot start the device thread")]
    Thread(#[source] std::io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LoopState {
    Running,
    PauseRequested,
    Paused,
    Stopping,
    Exited,
}

struct LoopControl {
    state: Mutex<LoopState>,
    changed: Condvar,
    wake: EventFd,
}

impl LoopControl {
    fn lock(&self) -> MutexGuard<'_, LoopState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, state: LoopState) {
        *self.lock() = state;
        self.changed.notify_all();
        // A loop blocked in epoll_wait wakes up to look at the new state.
        let _ = self.wake.write(1);
    }
}

/// Drains the wake eventfd; the loop itself looks at the state after each round.
struct Waker(EventFd);

impl MutEventSubscriber for Waker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            tracing::error!(error = ?e, fd = self.0.as_raw_fd(), "Cannot watch the device loop's wake eventfd");
        }
    }
}

/// The running device thread.
pub struct EventLoop {
    control: Arc<LoopControl>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl EventLoop {
    /// Starts the thread serving `subscribers`, under the `devices` seccomp filter of
    /// `confinement`.
    pub fn start(
        subscribers: Vec<Subscriber>,
        confinement: &Confinement,
    ) -> Result<Self, EventLoopError> {
        let mut events: EventManager<Subscriber> =
            EventManager::new().map_err(|e| EventLoopError::Create(std::io::Error::other(e)))?;
        let wake = EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::Create)?;
        let waker = wake.try_clone().map_err(EventLoopError::Create)?;
        events.add_subscriber(Arc::new(Mutex::new(Waker(waker))));
        for subscriber in subscribers {
            events.add_subscriber(subscriber);
        }
        let control = Arc::new(LoopControl {
            state: Mutex::new(LoopState::Running),
            changed: Condvar::new(),
            wake,
        });
        let looping = Arc::clone(&control);
        let confinement = confinement.clone();
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || match confinement.apply(ThreadKind::Devices) {
                Ok(()) => serve(&mut events, &looping),
                Err(e) => {
                    tracing::error!(error = %veil_seccomp::chain(&e), "The device loop does not start");
                    looping.set(LoopState::Exited);
                }
            })
            .map_err(EventLoopError::Thread)?;
        Ok(Self {
            control,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Returns once the loop is between rounds and parked: no device is serving a request.
    pub fn pause(&self) {
        let mut state = self.control.lock();
        if *state != LoopState::Running {
            return;
        }
        *state = LoopState::PauseRequested;
        let _ = self.control.wake.write(1);
        while *state == LoopState::PauseRequested {
            state = self
                .control
                .changed
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Lets a paused loop serve again.
    pub fn resume(&self) {
        let mut state = self.control.lock();
        if matches!(*state, LoopState::Paused | LoopState::PauseRequested) {
            *state = LoopState::Running;
            self.control.changed.notify_all();
        }
    }

    /// Stops the thread and waits for it.
    pub fn stop(&self) {
        {
            let state = *self.control.lock();
            if state != LoopState::Exited {
                self.control.set(LoopState::Stopping);
            }
        }
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for EventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(events: &mut EventManager<Subscriber>, control: &LoopControl) {
    loop {
        {
            let mut state = control.lock();
            loop {
                match *state {
                    LoopState::Running => break,
                    LoopState::PauseRequested => {
                        *state = LoopState::Paused;
                        control.changed.notify_all();
                    }
                    LoopState::Paused => {
                        state = control
                            .changed
                            .wait(state)
                            .unwrap_or_else(|e| e.into_inner())
                    }
                    LoopState::Stopping | LoopState::Exited => {
                        *state = LoopState::Exited;
                        control.changed.notify_all();
                        return;
                    }
                }
            }
        }
        // A signal makes `run` return 0 events, not an error; an error would only repeat.
        if let Err(e) = events.run().and_then(|_| poll_briefly(events, control)) {
            tracing::error!(error = ?e, "The device loop failed; devices stop serving");
            *control.lock() = LoopState::Exited;
            control.changed.notify_all();
            return;
        }
    }
}

/// Serves whatever arrives within [`POLL_AFTER_WORK`] of the last event without sleeping;
/// returns when that long passed quietly or the loop is asked to pause or stop.
fn poll_briefly(
    events: &mut EventManager<Subscriber>,
    control: &LoopControl,
) -> Result<(), event_manager::Error> {
    let mut quiet_until = Instant::now() + POLL_AFTER_WORK;
    while Instant::now() < quiet_until {
        if *control.lock() != LoopState::Running {
            return Ok(());
        }
        if events.run_with_timeout(0)? > 0 {
            quiet_until = Instant::now() + POLL_AFTER_WORK;
        } else {
            std::hint::spin_loop();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    /// Counts the writes to its eventfd.
    struct Counter {
        kick: EventFd,
        served: Arc<AtomicU64>,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            if let Ok(n) = self.kick.read() {
                self.served.fetch_add(n, Ordering::SeqCst);
            }
        }

        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.kick, EventSet::IN)).unwrap();
        }
    }

    fn wait_until(what: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if what() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn a_paused_loop_serves_nothing_until_resumed_and_then_serves_what_waited() {
        let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let counter = Counter {
            kick: kick.try_clone().unwrap(),
            served: Arc::clone(&served),
        };
        let events =
            EventLoop::start(vec![Arc::new(Mutex::new(counter))], &Confinement::off()).unwrap();
        kick.write(1).unwrap();
        assert!(wait_until(|| served.load(Ordering::SeqCst) == 1));

        events.pause();
        kick.write(2).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(
            served.load(Ordering::SeqCst),
            1,
            "nothing served while paused"
        );
        events.resume();
        assert!(wait_until(|| served.load(Ordering::SeqCst) == 3));
        events.stop();
        // Stopping twice, and dropping after, are harmless.
        events.stop();
    }
}
