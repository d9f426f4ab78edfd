//! The console on the event loop: its two queue EventFds, the input descriptor and, for a
//! socket, the announcement of a new client.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::{Console, RECEIVEQ_PORT0};
use crate::host_console::InputTokens;

/// Tokens 0 and 1 are the queues' indices, RECEIVEQ_PORT0 and TRANSMITQ_PORT0.
const TOKENS: InputTokens = InputTokens {
    input: 2,
    client: 3,
};

impl Console {
    fn has_room(&self) -> bool {
        self.pending.room() > 0
    }
}

impl MutEventSubscriber for Console {
    fn init(&mut self, ops: &mut EventOps) {
        // Registered whether or not the driver has activated the device yet: a kick before
        // activation is drained and ignored, and input waits in the bounded buffer.
        for (index, evt) in self.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, index as u32, EventSet::IN)) {
                tracing::error!(queue = index, error = %e, "Cannot watch a virtio-console queue");
            }
        }
        let room = self.has_room();
        if let Some(input) = &mut self.input {
            input.init(ops, TOKENS, room);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            token @ (0 | 1) => {
                let index = token as usize;
                if !events.event_set().contains(EventSet::IN) {
                    tracing::warn!(queue = index, set = ?events.event_set(), "virtio-console queue eventfd failed: no longer watched");
                    let _ = ops.remove(events);
                    return;
                }
                // Non-blocking: WouldBlock only means another wake-up drained it first.
                if let Err(e) = self.queue_events[index].read() {
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        tracing::warn!(queue = index, error = %e, "Cannot read a virtio-console queue eventfd");
                    }
                }
                self.serve(index);
            }
            t if t == TOKENS.input => {
                if let Some(input) = &mut self.input {
                    input.read_into(ops, TOKENS, &mut self.pending);
                }
                self.serve(RECEIVEQ_PORT0);
            }
            t if t == TOKENS.client => {
                let room = self.has_room();
                if let Some(input) = &mut self.input {
                    input.take_new_client(ops, TOKENS, room);
                }
            }
            other => tracing::warn!(token = other, "Event for an unknown virtio-console source"),
        }
        // Read the input only while there is room for it: a guest that posts no receive
        // buffers backs the host up in the kernel.
        let room = self.has_room();
        if let Some(input) = &mut self.input {
            input.reconcile(ops, TOKENS, room);
        }
    }
}
