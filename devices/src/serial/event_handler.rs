//! The UART on the event loop: its input descriptor, the socket's new clients, and the
//! eventfd the guest's reads signal when they make room.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Serial;
use crate::host_console::InputTokens;

const TOKENS: InputTokens = InputTokens {
    input: 0,
    client: 1,
};
/// The guest made room while the input was not read.
const ROOM: u32 = 2;

impl Serial {
    fn has_room(&self) -> bool {
        self.pending.room() > 0
    }
}

impl MutEventSubscriber for Serial {
    fn init(&mut self, ops: &mut EventOps) {
        let room = self.has_room();
        let Some(input) = &mut self.input else {
            return;
        };
        if let Err(e) = ops.add(Events::with_data(&input.room, ROOM, EventSet::IN)) {
            tracing::error!(error = %e, "Cannot watch the serial input's room");
        }
        input.host.init(ops, TOKENS, room);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let room = self.has_room();
        let Some(input) = &mut self.input else {
            return;
        };
        match events.data() {
            t if t == TOKENS.input => {
                input.host.read_into(ops, TOKENS, &mut self.pending);
                self.fill_fifo();
            }
            t if t == TOKENS.client => input.host.take_new_client(ops, TOKENS, room),
            ROOM => {
                if let Err(e) = input.room.read() {
                    if e.kind() != std::io::ErrorKind::WouldBlock {
                        tracing::warn!(error = %e, "Cannot read the serial input's room eventfd");
                    }
                }
            }
            other => tracing::warn!(token = other, "Event for an unknown serial source"),
        }
        let room = self.has_room();
        if let Some(input) = &mut self.input {
            input.host.reconcile(ops, TOKENS, room);
        }
    }
}
