//! Port 0's two queues: chains popped through the guard, output written, input delivered.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};

use super::Output;
use crate::host_console::PendingInput;
use crate::virtio::GuardedMemory;

type Chain<'a, 'm> = DescriptorChain<&'a GuardedMemory<'m>>;

/// Serves `queue` while `wants_more(state)` and the ring holds chains, with the driver's
/// notifications off meanwhile (virtio 1.2 §2.7.10); `serve` returns each chain's used
/// length. Returns whether any chain was used.
pub(super) fn drain_queue<'a, 'm, S>(
    queue: &mut Queue,
    mem: &'a GuardedMemory<'m>,
    state: &mut S,
    wants_more: impl Fn(&S) -> bool,
    mut serve: impl FnMut(&mut S, Chain<'a, 'm>) -> u32,
) -> bool {
    let mut used_any = false;
    let mut empty_passes = 0;
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            tracing::warn!(error = %e, "Cannot suppress virtio-console notifications");
            break;
        }
        let mut served = 0;
        while wants_more(state) {
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            let len = serve(state, chain);
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!(error = %e, "Cannot return a virtio-console buffer");
                return used_any;
            }
            served += 1;
            used_any = true;
        }
        empty_passes = if served == 0 { empty_passes + 1 } else { 0 };
        // Re-enabling also moves avail_event on under EVENT_IDX, so the driver's next buffer
        // is notified.
        match queue.enable_notification(mem) {
            // More arrived while notifications were off. Twice nothing served although the
            // ring claims more means its index is broken: wait for the next kick.
            Ok(true) if empty_passes < 2 && wants_more(state) => continue,
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "Cannot re-enable virtio-console notifications");
                break;
            }
        }
    }
    used_any
}

/// Writes a transmit chain's readable buffers to the output; its used length is 0, the
/// device writing nothing into it. A refused buffer refuses the whole chain unread.
pub(super) fn transmit(
    mem: &GuardedMemory<'_>,
    chain: Chain<'_, '_>,
    output: &mut Output,
    bounce: &mut [u8],
) -> u32 {
    let mut reader = match Reader::new(mem, chain) {
        Ok(reader) => reader,
        Err(e) => {
            tracing::debug!(error = %e, "virtio-console transmit buffer refused");
            return 0;
        }
    };
    let mut result = Ok(());
    while result.is_ok() {
        let n = match reader.read(bounce) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                tracing::debug!(error = %e, "Cannot read a virtio-console transmit buffer");
                break;
            }
        };
        result = output.sink.write_all(&bounce[..n]).inspect_err(|_| {
            output.dropped += n as u64 + reader.available_bytes() as u64;
        });
    }
    // Stdout buffers lines: a prompt without a newline must show all the same.
    let result = result.and_then(|()| output.sink.flush());
    match (result, output.failing) {
        (Ok(()), true) => {
            tracing::info!("virtio-console output works again");
            output.failing = false;
        }
        (Err(e), false) => {
            tracing::warn!(error = %e, "virtio-console output failed: the guest's output is dropped");
            output.failing = true;
        }
        _ => {}
    }
    0
}

/// Fills a receive chain's writable buffers with waiting input; returns the length written.
/// A refused buffer refuses the whole chain, and the input waits for the next one.
pub(super) fn receive(
    mem: &GuardedMemory<'_>,
    chain: Chain<'_, '_>,
    pending: &mut PendingInput,
) -> u32 {
    let mut writer = match Writer::new(mem, chain) {
        Ok(writer) => writer,
        Err(e) => {
            tracing::debug!(error = %e, "virtio-console receive buffer refused");
            return 0;
        }
    };
    let n = pending.len().min(writer.available_bytes());
    if let Err(e) = writer.write_all(&pending.front()[..n]) {
        tracing::debug!(error = %e, "Cannot fill a virtio-console receive buffer");
    }
    let written = writer.bytes_written();
    pending.consume(written);
    // At most the queue's buffers, themselves u32-sized.
    u32::try_from(written).unwrap_or(u32::MAX)
}
