//! The vsock device on the event loop: its three queue EventFds and the host side's epoll set,
//! which holds the listening socket, the timer and every host connection.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Vsock;
use crate::virtio::VirtioDevice;

/// The data of the backend's event; queues use their index.
const BACKEND_EVENT: u32 = 3;

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        // Registered before activation too: kicks are drained and ignored, and host programs
        // may connect (their requests wait for the driver, or time out).
        for (index, evt) in self.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, index as u32, EventSet::IN)) {
                tracing::error!(queue = index, error = %e, "Cannot watch a virtio-vsock queue");
            }
        }
        if let Err(e) = ops.add(Events::with_data(
            &self.backend,
            BACKEND_EVENT,
            EventSet::IN,
        )) {
            tracing::error!(error = %e, "Cannot watch the virtio-vsock host side");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let data = events.data();
        if !events.event_set().contains(EventSet::IN) {
            tracing::warn!(data, set = ?events.event_set(), "virtio-vsock event source failed: no longer watched");
            let _ = ops.remove(events);
            return;
        }
        if data == BACKEND_EVENT {
            self.handle_backend_events();
            return;
        }
        let index = data as usize;
        let Some(evt) = self.queue_events.get(index) else {
            tracing::warn!(queue = index, "Event for an unknown virtio-vsock queue");
            return;
        };
        // Non-blocking: WouldBlock only means another wake-up drained it first.
        if let Err(e) = evt.read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                tracing::warn!(queue = index, error = %e, "Cannot read a virtio-vsock queue eventfd");
            }
        }
        self.process_queue(index);
    }
}
