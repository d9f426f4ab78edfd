//! The source's data streams of a migration over several connections (feature `STREAMS`,
//! [`crate::protocol::streams`]): each opens with Join, then carries its share of every pass,
//! written by a thread of its own, and a mark before each of the control stream's barriers.

use std::time::{Duration, Instant};

use crate::duplex::{Duplex, Written};
use crate::monitor::MigrationMonitor;
use crate::protocol::{write_frame, ChunkEncoder, Message, ProtocolError, StreamToken};
use crate::sender::{push_pages, target_reason, ChunkOut, Pages, SendError, Tally};

/// One further connection to the target, and its own chunk buffer.
pub(crate) struct DataStream<S> {
    stream: S,
    encoder: ChunkEncoder,
}

impl<S: Duplex> DataStream<S> {
    /// Joins `stream` to the migration whose Streams carried `token`.
    pub(crate) fn join(mut stream: S, token: StreamToken) -> Result<Self, SendError> {
        write(&mut stream, &Message::Join(token))?;
        Ok(Self {
            stream,
            encoder: ChunkEncoder::new(),
        })
    }

    /// Sends this stream's share of a pass (pages in the clear only).
    pub(crate) fn send(
        &mut self,
        gfns: impl Iterator<Item = u64>,
        known_zero: bool,
        pages: &Pages<'_>,
        monitor: &MigrationMonitor,
        deadline: Option<(Instant, Duration)>,
        tally: &mut Tally,
    ) -> Result<(), SendError> {
        let mut out = ChunkOut::new(
            &mut self.encoder,
            None,
            &mut self.stream,
            pages.memory,
            monitor,
            deadline,
        );
        let result = push_pages(&mut out, gfns, known_zero, pages, None, tally);
        tally.bytes += out.bytes;
        result.map_err(|e| target_reason(&mut self.stream, e))
    }

    /// Everything this stream carried before now has been sent.
    pub(crate) fn mark(&mut self) -> Result<(), SendError> {
        write(&mut self.stream, &Message::Sync)
    }
}

/// Writes one small frame, hearing the target out if it speaks instead of reading.
fn write<S: Duplex>(stream: &mut S, message: &Message) -> Result<(), SendError> {
    let mut frame = Vec::new();
    write_frame(&mut frame, message)?;
    match stream.write_or_hear(&frame).map_err(ProtocolError::Io)? {
        Written::All => Ok(()),
        Written::PeerSpoke => Err(crate::sender::hear(stream, None)),
    }
}
