//! The receiver's session fed any sequence of messages from the source, interleaved with what
//! the target itself sends. The session never panics; it allows memory to be written only
//! for pages inside the VM the Hello described, none twice in a chunk, and only while it may
//! apply; after an error nothing more is applied and the guest may not run; the guest may run
//! only once Complete has been answered with Run.
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use veil_migration::protocol::messages::SevStart;
use veil_migration::protocol::{
    ChunkEncoder, Features, Hello, HelloReply, MemoryChunkRef, MemoryRegion, Message, MigrationId,
    PageContentRef, PageRef, ReceiverAction, ReceiverSession, RecoveryOutcome, SevPlatform,
    SevShape, State, StreamToken, Streams, VmShape,
};
use veil_sev::policy::GuestPolicy;

#[derive(Arbitrary, Debug)]
enum Content {
    Zero,
    Plain,
    Encrypted(u8),
}

#[derive(Arbitrary, Debug)]
enum Step {
    Hello {
        version: u16,
        features: u64,
        sev: bool,
        pages: u8,
    },
    SevStart {
        policy: u32,
    },
    Chunk(Vec<(u8, Content)>),
    State(Vec<u8>),
    Complete,
    Sync,
    Error,
    Cancel,
    /// Target messages arriving from the source: always out of turn.
    Ack,
    Synced,
    Running,
    /// Recovery messages on a migration connection: always refused.
    Recover([u8; 32]),
    Recovered(u8),
    Adopt([u8; 32]),
    /// The source's declaration of its connections, and a Join that never belongs here.
    Streams {
        count: u16,
        token: [u8; 16],
    },
    Join([u8; 16]),
    // What the target sends.
    Accept {
        features: u64,
    },
    Refuse,
    SendAck,
    SendSynced,
    SendRunning,
    SendError,
}

static PLAIN: [u8; 4096] = [0x5a; 4096];
static PACKET_HEADER: [u8; 52] = [0; 52];
static PACKET_DATA: [u8; 4096] = [0xa5; 4096];

fn shape(sev: bool, pages: u8) -> VmShape {
    VmShape::new(
        vec![MemoryRegion {
            gpa: 0,
            len: u64::from(pages.max(1)) << 12,
        }],
        1,
        sev.then_some(SevShape {
            policy: GuestPolicy(GuestPolicy::NODBG),
            platform: SevPlatform::Emulated,
        }),
        Vec::new(),
    )
    .unwrap()
}

fuzz_target!(|steps: Vec<Step>| {
    let mut session = ReceiverSession::new();
    let mut failed = false;
    let mut ran = false;
    for step in steps {
        let incoming = match step {
            Step::Hello {
                version,
                features,
                sev,
                pages,
            } => Some(Message::Hello(Hello {
                protocol_version: version,
                features: Features::from_bits(features),
                vm: shape(sev, pages),
            })),
            Step::SevStart { policy } => Some(Message::SevStart(SevStart {
                policy: GuestPolicy(policy),
                pdh: vec![0; veil_migration::protocol::limits::SEV_CERT_BYTES],
                session: [0; veil_sev::crypto::SESSION_BYTES],
            })),
            Step::State(bytes) => Some(Message::State(State { bytes })),
            Step::Complete => Some(Message::Complete),
            Step::Sync => Some(Message::Sync),
            Step::Error => Some(Message::error("source failed")),
            Step::Cancel => Some(Message::cancel("operator")),
            Step::Ack => Some(Message::Ack),
            Step::Synced => Some(Message::Synced),
            Step::Running => Some(Message::Running),
            Step::Recover(id) => Some(Message::Recover(MigrationId::from_bytes(id))),
            Step::Adopt(id) => Some(Message::Adopt(MigrationId::from_bytes(id))),
            Step::Recovered(code) => RecoveryOutcome::from_code(code).map(Message::Recovered),
            Step::Streams { count, token } => Some(Message::Streams(Streams {
                count,
                token: StreamToken::from_bytes(token),
            })),
            Step::Join(token) => Some(Message::Join(StreamToken::from_bytes(token))),
            Step::Chunk(pages) => {
                let mut encoder = ChunkEncoder::new();
                for (gfn, content) in &pages {
                    let content = match content {
                        Content::Zero => PageContentRef::Zero,
                        Content::Plain => PageContentRef::Plain(&PLAIN),
                        Content::Encrypted(len) => PageContentRef::Encrypted {
                            header: &PACKET_HEADER,
                            data: &PACKET_DATA[..usize::from(*len).max(1) * 16],
                        },
                    };
                    let page = PageRef {
                        gfn: u64::from(*gfn),
                        content,
                    };
                    if !matches!(encoder.push(page), Ok(true)) {
                        break;
                    }
                }
                let Some(frame) = encoder.frame() else {
                    continue;
                };
                let mut payload = Vec::new();
                frame.append_to(&mut payload);
                let payload = payload.split_off(24);
                let chunk = MemoryChunkRef::parse(&payload).expect("an encoded chunk parses");
                let may_apply_before = session.may_apply();
                match session.on_memory_chunk(&chunk) {
                    Ok(ReceiverAction::WritePages) => {
                        assert!(!failed, "pages written after the session failed");
                        assert!(may_apply_before && session.may_apply());
                        let vm = session.vm().expect("pages only after a Hello");
                        chunk
                            .validate(vm)
                            .expect("the session let through a page outside the VM or twice");
                    }
                    Ok(other) => panic!("a chunk gave {other:?}"),
                    Err(_) => failed = true,
                }
                None
            }
            Step::Accept { features } => {
                let reply =
                    Message::HelloReply(HelloReply::accept(Features::from_bits(features), None));
                let _ = session.send(&reply);
                None
            }
            Step::Refuse => {
                let _ = session.send(&Message::HelloReply(HelloReply::refuse("no")));
                None
            }
            Step::SendAck => {
                let _ = session.send(&Message::Ack);
                None
            }
            Step::SendSynced => {
                let _ = session.send(&Message::Synced);
                None
            }
            Step::SendRunning => {
                let sent = session.send(&Message::Running).is_ok();
                assert!(!sent || ran, "Running confirmed without Complete");
                None
            }
            Step::SendError => {
                let _ = session.send(&Message::error("target failed"));
                None
            }
        };
        if let Some(message) = incoming {
            match session.on_message(&message) {
                Ok(ReceiverAction::Run) => {
                    assert!(!failed);
                    assert!(matches!(message, Message::Complete));
                    ran = true;
                }
                Ok(ReceiverAction::WritePages) => panic!("pages from a message that is no chunk"),
                Ok(ReceiverAction::Discard { .. }) => failed = true,
                Ok(_)
                    if matches!(
                        message,
                        Message::Recover(_)
                            | Message::Recovered(_)
                            | Message::Adopt(_)
                            | Message::Join(_)
                    ) =>
                {
                    panic!("a recovery message or a Join accepted in a migration")
                }
                Ok(ReceiverAction::JoinStreams(streams)) => {
                    assert!(!failed);
                    let sev = session.vm().is_some_and(|vm| vm.sev().is_some());
                    assert!((1..=16).contains(&streams.count), "{streams:?}");
                    assert!(!sev || streams.count == 1, "an SEV guest over {streams:?}");
                    assert!(session.features().contains(Features::STREAMS));
                }
                Ok(_) => assert!(!failed, "the session went on after it failed"),
                Err(_) => failed = true,
            }
        }
        if failed {
            assert!(!session.may_apply(), "an ended session still applies");
        }
        if session.may_run() {
            assert!(ran, "the guest may run without Complete");
        }
    }
});
