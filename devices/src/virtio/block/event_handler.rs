//! The block device on the event loop: one EventFd per queue, nothing else.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Block;
use crate::virtio::VirtioDevice;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        // Registered whether or not the driver has activated the device yet: a kick before
        // activation is drained and ignored, and activation needs no event of its own.
        for (index, evt) in self.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, index as u32, EventSet::IN)) {
                tracing::error!(queue = index, error = %e, "Cannot watch a virtio-blk queue");
            }
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let index = events.data() as usize;
        let Some(evt) = self.queue_events.get(index) else {
            tracing::warn!(queue = index, "Event for an unknown virtio-blk queue");
            return;
        };
        if !events.event_set().contains(EventSet::IN) {
            tracing::warn!(queue = index, set = ?events.event_set(), "virtio-blk queue eventfd failed: no longer watched");
            let _ = ops.remove(events);
            return;
        }
        // Non-blocking: WouldBlock only means another wake-up drained it first.
        if let Err(e) = evt.read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                tracing::warn!(queue = index, error = %e, "Cannot read a virtio-blk queue eventfd");
            }
        }
        self.process_queue(index);
    }
}
