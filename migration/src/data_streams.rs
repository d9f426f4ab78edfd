//! The target's further connections of a migration over several streams (feature `STREAMS`,
//! [`crate::protocol::streams`]): taking them on the listener, and a thread per stream that
//! reads, checks and writes its pages while the control stream's threads do theirs.
//!
//! The control stream's thread meets the data streams at each barrier (the source's Sync, and
//! its State): every stream must have reached its mark, so everything sent before the barrier
//! is in guest memory. A data stream that fails tells the source on that stream and stops; the
//! control stream's thread finds it gone at the next barrier, and the receive reports the data
//! stream's own error.

use std::io::{Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::thread::{Scope, ScopedJoinHandle};
use std::time::{Duration, Instant};

use veil_hypervisor::GuestMemory;

use crate::duplex::{connection_or_hang_up, Woken};
use crate::page_bits::PageBits;
use crate::page_writer::PageWriter;
use crate::protocol::{
    read_frame, write_frame, ChunkIndex, DataAction, DataStreamSession, Features, FrameReader,
    Message, MessageType, ProtocolError, RecoveryOutcome, Streams, VmShape,
};
use crate::receiver::{ByDeadline, ReceiveError};
use crate::transport::{Accepted, Listener, Stream, TransportError};

/// Takes the `streams.count - 1` further connections the source declared, each opening with
/// Join and the declared token, by `deadline`. Connections that open otherwise are logged and
/// dropped (a recovery query is answered with `answer`), as while waiting for a Hello. Gives
/// up at once ([`ReceiveError::SourceLeft`]) if the source stops sending on `control`, as it
/// does when it cannot open a connection: then nothing more will join.
pub(crate) fn take_joins(
    listener: &Listener,
    streams: &Streams,
    deadline: Instant,
    timeout: Duration,
    answer: &dyn Fn(&Message) -> RecoveryOutcome,
    control: BorrowedFd<'_>,
) -> Result<Vec<Stream>, ReceiveError> {
    let wanted = usize::from(streams.count).saturating_sub(1);
    let mut joined = Vec::with_capacity(wanted);
    while joined.len() < wanted {
        let missing = || ReceiveError::StreamsMissing {
            joined: joined.len() + 1,
            declared: streams.count,
            within: timeout,
        };
        let waited = connection_or_hang_up(listener.as_fd(), control, deadline)
            .map_err(|e| TransportError::Listen(listener.to_string(), e))?;
        match waited {
            Woken::Connection => {}
            Woken::TimedOut => return Err(missing()),
            Woken::WatchedHungUp => {
                return Err(ReceiveError::SourceLeft {
                    joined: joined.len() + 1,
                    declared: streams.count,
                })
            }
        }
        let Accepted {
            mut stream,
            peer,
            deadline: own,
        } = match listener.accept_within(timeout) {
            Ok(accepted) => accepted,
            Err(e) if e.is_one_connection() => {
                tracing::warn!("{}", crate::error_chain(&e));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let mut bounded = ByDeadline::new(&mut stream, own.min(deadline), timeout);
        match read_frame(&mut bounded).map(|frame| frame.message) {
            Ok(Message::Join(token)) if token == streams.token => {
                stream.set_peer_timeouts().map_err(ProtocolError::Io)?;
                joined.push(stream);
            }
            Ok(query @ (Message::Recover(_) | Message::Adopt(_))) => {
                let outcome = answer(&query);
                tracing::warn!("{peer} asked about a migration: {outcome:?}");
                let _ = write_frame(&mut bounded, &Message::Recovered(outcome));
            }
            Ok(other) => tracing::warn!(
                "Dropped a connection from {peer}: it opened with {} and not with this \
                 migration's Join",
                other.kind()
            ),
            Err(e) => tracing::warn!(
                "Dropped a connection from {peer}: {}",
                crate::error_chain(&e)
            ),
        }
    }
    Ok(joined)
}

/// A handle on each data stream's socket, to [`hang_up`] from another thread.
pub(crate) fn hang_ups<S: AsFd>(streams: &[S]) -> std::io::Result<Vec<OwnedFd>> {
    streams
        .iter()
        .map(|s| s.as_fd().try_clone_to_owned())
        .collect()
}

/// Shuts the data streams' sockets down: their threads' reads end at once, and the source's
/// writes fail, rather than both waiting out the peer timeout once the receive has failed.
pub(crate) fn hang_up(sockets: &[OwnedFd]) {
    for socket in sockets {
        let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Both);
    }
}

/// A data stream's thread, seen from the control stream's.
pub(crate) struct Running<'scope> {
    /// One `()` per mark the stream reached; closed when the thread has stopped.
    marks: mpsc::Receiver<()>,
    /// After a mark: `true` to read on, `false` to stop (the State has arrived).
    go_on: mpsc::Sender<bool>,
    thread: ScopedJoinHandle<'scope, Result<(), ReceiveError>>,
}

/// What every data stream's thread shares.
pub(crate) struct Shared<'m> {
    pub memory: &'m GuestMemory,
    pub written: Option<&'m PageBits>,
    /// Plain pages that arrived damaged and not whole since.
    pub damaged: &'m PageBits,
    pub vm: VmShape,
    pub features: Features,
    /// Set when the receive has failed elsewhere: the threads stop at their next frame.
    pub stop: &'m AtomicBool,
}

/// Starts a thread (`migrate-stream`) per data stream.
pub(crate) fn start<'scope, 'env, S: Read + Write + Send + 'scope>(
    scope: &'scope Scope<'scope, 'env>,
    streams: Vec<S>,
    shared: &'scope Shared<'env>,
) -> Result<Vec<Running<'scope>>, ReceiveError> {
    streams
        .into_iter()
        .map(|stream| {
            let (reached, marks) = mpsc::channel();
            let (go_on, told) = mpsc::channel();
            let thread = std::thread::Builder::new()
                .name("migrate-stream".into())
                .spawn_scoped(scope, move || run(stream, shared, reached, told))
                .map_err(ReceiveError::Thread)?;
            Ok(Running {
                marks,
                go_on,
                thread,
            })
        })
        .collect()
}

/// Waits until every data stream has reached its next mark; then tells each to read on, or
/// (`last`, at the State) to stop. `Err` if a stream stopped first: its thread's result says
/// why.
pub(crate) fn barrier(running: &[Running<'_>], last: bool) -> Result<(), StreamGone> {
    for stream in running {
        stream.marks.recv().map_err(|_| StreamGone)?;
    }
    for stream in running {
        // A thread that stopped after its mark is seen at its join.
        let _ = stream.go_on.send(!last);
    }
    Ok(())
}

/// A data stream's thread stopped before a barrier.
#[derive(Debug)]
pub(crate) struct StreamGone;

/// Ends every data stream's thread and returns their results, in stream order.
pub(crate) fn finish(running: Vec<Running<'_>>) -> Vec<Result<(), ReceiveError>> {
    running
        .into_iter()
        .map(|stream| {
            drop(stream.go_on);
            stream
                .thread
                .join()
                .unwrap_or_else(|_| Err(ReceiveError::WriterPanicked))
        })
        .collect()
}

/// One data stream's thread: its frames, checked, and their pages written, until the last mark
/// or an error (which goes to the source on this stream, unless the link is what failed).
fn run<S: Read + Write>(
    mut stream: S,
    shared: &Shared<'_>,
    reached: mpsc::Sender<()>,
    told: mpsc::Receiver<bool>,
) -> Result<(), ReceiveError> {
    let mut session = DataStreamSession::new(shared.vm.clone(), shared.features);
    let mut writer = PageWriter::new(shared.memory, None, shared.written, shared.damaged);
    let mut reader = FrameReader::new();
    let result = (|| loop {
        if shared.stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        // A chunk's bodies stay on the stream until its index has been checked: then they
        // go into guest memory through a small buffer, not through a frame's.
        let (raw, mut bodies) = reader.read_to_bodies(&mut stream)?;
        if raw.header.kind == MessageType::MemoryChunk {
            let index =
                ChunkIndex::parse_followed_by(raw.payload, bodies.len()).map_err(|source| {
                    ProtocolError::Payload {
                        kind: MessageType::MemoryChunk,
                        source,
                    }
                })?;
            session.on_memory_chunk(&index)?;
            writer.write_chunk_from(&index, &mut bodies)?;
            continue;
        }
        let frame = raw.decode()?;
        match session.on_message(&frame.message)? {
            DataAction::Mark => {
                let _ = reached.send(());
                if !told.recv().unwrap_or(false) {
                    return Ok(());
                }
            }
            DataAction::Discard { reason, .. } => return Err(ReceiveError::Aborted(reason)),
            DataAction::WritePages => unreachable!("chunks are handled above"),
        }
    })();
    if let Err(e) = &result {
        if !crate::receiver::lost_link(e) && !matches!(e, ReceiveError::Aborted(_)) {
            let _ = write_frame(&mut stream, &Message::error(crate::error_chain(e)));
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::chunk::{MemoryChunk, Page, PageContent};
    use crate::protocol::messages::tests::hello;
    use crate::protocol::{SessionError, ShapeError, StreamToken};
    use crate::receiver::{accept_from, tests::fresh_ram};
    use crate::transport::{listen, Endpoint, Security};
    use std::os::unix::net::UnixStream;
    use vm_memory::{Bytes, GuestAddress};

    const TOKEN: StreamToken = StreamToken::from_bytes([0x42; StreamToken::BYTES]);

    /// A listener on a fresh UNIX socket, and its path.
    fn listener(name: &str) -> (Listener, std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("veil-streams-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.sock");
        let listener = listen(&Endpoint::Unix(path.clone()), &Security::default()).unwrap();
        (listener, path, dir)
    }

    /// A source's opening over `count` streams: Hello, Streams on the control connection,
    /// and a Join on each further one.
    fn open(path: &std::path::Path, count: u16) -> (UnixStream, Vec<UnixStream>) {
        let mut control = UnixStream::connect(path).unwrap();
        write_frame(&mut control, &Message::Hello(hello(false))).unwrap();
        let Message::HelloReply(reply) = read_frame(&mut control).unwrap().message else {
            panic!("no HelloReply")
        };
        assert!(reply.features.contains(Features::STREAMS), "{reply:?}");
        write_frame(
            &mut control,
            &Message::Streams(Streams {
                count,
                token: TOKEN,
            }),
        )
        .unwrap();
        let data = (1..count)
            .map(|_| {
                let mut data = UnixStream::connect(path).unwrap();
                write_frame(&mut data, &Message::Join(TOKEN)).unwrap();
                data
            })
            .collect();
        (control, data)
    }

    fn page(gfn: u64, fill: u8) -> Message {
        Message::MemoryChunk(MemoryChunk {
            pages: vec![Page {
                gfn,
                content: PageContent::Plain(Box::new([fill; 4096])),
            }],
        })
    }

    /// The target answers Sync only once every stream's pages before its mark are in guest
    /// memory, whichever stream they came on.
    #[test]
    fn synced_means_every_streams_pages_are_written() {
        let (listener, path, dir) = listener("sync");
        let ram = fresh_ram();
        std::thread::scope(|scope| {
            let receiving = scope.spawn(|| {
                let mut incoming =
                    accept_from(&listener, Duration::from_secs(5), |_| Ok(()), None).unwrap();
                assert_eq!(incoming.connections(), 3);
                incoming.receive_into(ram.memory(), None).map(drop)
            });
            let (mut control, mut data) = open(&path, 3);
            // One page per 2 MiB block, each on its block's stream.
            write_frame(&mut control, &page(7, 0xa0)).unwrap();
            write_frame(&mut data[0], &page(520, 0xa1)).unwrap();
            write_frame(&mut data[1], &page(1030, 0xa2)).unwrap();
            for stream in &mut data {
                write_frame(stream, &Message::Sync).unwrap();
            }
            write_frame(&mut control, &Message::Sync).unwrap();
            assert_eq!(read_frame(&mut control).unwrap().message, Message::Synced);
            for (gfn, fill) in [(7u64, 0xa0u8), (520, 0xa1), (1030, 0xa2)] {
                let byte: u8 = ram
                    .memory()
                    .read_obj(GuestAddress(gfn * 4096 + 99))
                    .unwrap();
                assert_eq!(byte, fill, "gfn {gfn}");
            }
            // A second pass after the barrier goes on as before.
            write_frame(&mut data[1], &page(1031, 0xb2)).unwrap();
            write_frame(&mut data[1], &Message::Sync).unwrap();
            write_frame(&mut data[0], &Message::Sync).unwrap();
            write_frame(&mut control, &Message::Sync).unwrap();
            assert_eq!(read_frame(&mut control).unwrap().message, Message::Synced);
            let byte: u8 = ram.memory().read_obj(GuestAddress(1031 * 4096)).unwrap();
            assert_eq!(byte, 0xb2);
            write_frame(&mut control, &Message::cancel("done here")).unwrap();
            let ended = receiving.join().unwrap().unwrap_err();
            assert!(
                matches!(&ended, ReceiveError::Aborted(r) if r == "done here"),
                "{ended:?}"
            );
        });
        drop(listener);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A data stream reads a chunk's bodies straight from the stream, a few at a time, once
    /// its index is checked: the intact pages land, a damaged one is set aside until it
    /// comes again whole.
    #[test]
    fn a_data_stream_writes_the_bodies_it_reads_and_sets_a_damaged_one_aside() {
        let (listener, path, dir) = listener("bodies");
        let ram = fresh_ram();
        let byte =
            |gfn: u64| -> u8 { ram.memory().read_obj(GuestAddress(gfn * 4096 + 9)).unwrap() };
        std::thread::scope(|scope| {
            let receiving = scope.spawn(|| {
                let mut incoming =
                    accept_from(&listener, Duration::from_secs(5), |_| Ok(()), None).unwrap();
                incoming.receive_into(ram.memory(), None).map(drop)
            });
            let (mut control, mut data) = open(&path, 2);
            // 40 plain pages (more than one read's worth) and a zero page among them.
            let pages: Vec<Page> = (520..561u64)
                .map(|gfn| Page {
                    gfn,
                    content: if gfn == 530 {
                        PageContent::Zero
                    } else {
                        PageContent::Plain(Box::new([gfn as u8; 4096]))
                    },
                })
                .collect();
            let mut frame =
                crate::protocol::frame::encode_frame(&Message::MemoryChunk(MemoryChunk { pages }))
                    .unwrap();
            // Page 550's body: the 30th body (page 530 has none).
            let bodies_start = frame.len() - 40 * 4096;
            frame[bodies_start + 29 * 4096 + 9] ^= 0xff;
            data[0].write_all(&frame).unwrap();
            write_frame(&mut data[0], &Message::Sync).unwrap();
            write_frame(&mut control, &Message::Sync).unwrap();
            assert_eq!(read_frame(&mut control).unwrap().message, Message::Synced);
            for gfn in (520..561u64).filter(|&g| g != 530 && g != 550) {
                assert_eq!(byte(gfn), gfn as u8, "gfn {gfn}");
            }
            assert_eq!(byte(530), 0);
            assert_eq!(byte(550), 0, "the damaged page was not written");
            // Sent again, whole.
            write_frame(&mut data[0], &page(550, 0x55)).unwrap();
            write_frame(&mut data[0], &Message::Sync).unwrap();
            write_frame(&mut control, &Message::Sync).unwrap();
            assert_eq!(read_frame(&mut control).unwrap().message, Message::Synced);
            assert_eq!(byte(550), 0x55);
            write_frame(&mut control, &Message::cancel("done here")).unwrap();
            let ended = receiving.join().unwrap().unwrap_err();
            assert!(
                matches!(&ended, ReceiveError::Aborted(r) if r == "done here"),
                "{ended:?}"
            );
        });
        drop(listener);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A chunk a data stream must refuse ends the receive with that reason, which the source
    /// reads on that stream.
    #[test]
    fn a_bad_chunk_on_a_data_stream_fails_the_receive_and_the_source_hears_why() {
        let (listener, path, dir) = listener("bad");
        let ram = fresh_ram();
        std::thread::scope(|scope| {
            let receiving = scope.spawn(|| {
                let mut incoming =
                    accept_from(&listener, Duration::from_secs(5), |_| Ok(()), None).unwrap();
                incoming.receive_into(ram.memory(), None).map(drop)
            });
            let (mut control, mut data) = open(&path, 3);
            write_frame(&mut data[0], &page(520, 1)).unwrap();
            write_frame(&mut data[1], &page(1 << 40, 2)).unwrap();
            let told = read_frame(&mut data[1]).unwrap().message;
            let Message::Error { reason } = &told else {
                panic!("the data stream said {told:?}")
            };
            assert!(reason.contains("does not fit the VM"), "{reason}");
            // As a source does: it stops and says so on the control stream.
            write_frame(&mut control, &Message::error(reason.clone())).unwrap();
            let failed = receiving.join().unwrap().unwrap_err();
            assert!(
                matches!(
                    failed,
                    ReceiveError::Session(SessionError::Chunk(ShapeError::GfnOutsideRam { .. }))
                ),
                "the data stream's own error, not the source's echo: {failed:?}"
            );
        });
        drop(listener);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Connections that do not join with the token are dropped and not counted; a stream that
    /// never comes fails the receive within the timeout, and the source is told.
    #[test]
    fn strangers_do_not_count_as_streams_and_a_missing_one_is_named() {
        let (listener, path, dir) = listener("missing");
        std::thread::scope(|scope| {
            let accepting = scope.spawn(|| {
                accept_from(&listener, Duration::from_millis(700), |_| Ok(()), None).map(drop)
            });
            let mut control = UnixStream::connect(&path).unwrap();
            write_frame(&mut control, &Message::Hello(hello(false))).unwrap();
            read_frame(&mut control).unwrap();
            write_frame(
                &mut control,
                &Message::Streams(Streams {
                    count: 3,
                    token: TOKEN,
                }),
            )
            .unwrap();
            let mut wrong = UnixStream::connect(&path).unwrap();
            write_frame(&mut wrong, &Message::Join(StreamToken::from_bytes([1; 16]))).unwrap();
            let mut hello_again = UnixStream::connect(&path).unwrap();
            write_frame(&mut hello_again, &Message::Hello(hello(false))).unwrap();
            let mut right = UnixStream::connect(&path).unwrap();
            write_frame(&mut right, &Message::Join(TOKEN)).unwrap();
            let started = Instant::now();
            let failed = accepting.join().unwrap().unwrap_err();
            assert!(started.elapsed() < Duration::from_secs(3));
            assert!(
                matches!(
                    failed,
                    ReceiveError::StreamsMissing {
                        joined: 2,
                        declared: 3,
                        ..
                    }
                ),
                "{failed:?}"
            );
            let told = read_frame(&mut control).unwrap().message;
            assert!(
                matches!(&told, Message::Error { reason } if reason.contains("Only 2 of the 3 connections")),
                "{told:?}"
            );
        });
        drop(listener);
        let _ = std::fs::remove_dir_all(dir);
    }
}
