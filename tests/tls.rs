//! Mutual TLS between migration peers: both sides authenticate, and the target reads nothing
//! from a source its CA does not vouch for.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;

use common::tls::Ca;
use veil_migration::transport::{self, Endpoint, Security, TransportError};

/// A free loopback port (bound and released: good enough for a test).
fn free_endpoint() -> Endpoint {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("tcp:127.0.0.1:{port}").parse().unwrap()
}

/// A pair of authenticated streams over loopback: (source's, target's).
fn tls_pair(name: &str) -> (transport::Stream, transport::Stream, common::TempDir) {
    let dir = common::TempDir::new(name);
    let ca = Ca::new(&dir.0, "site");
    let (target, source) = (
        ca.host(&dir.0, "target", &["127.0.0.1"]),
        ca.host(&dir.0, "source", &["source.example"]),
    );
    let endpoint = free_endpoint();
    let listener = transport::listen(&endpoint, &Security::tls(target)).unwrap();
    let accepting = std::thread::spawn(move || listener.accept().unwrap());
    let source = transport::connect(&endpoint, &Security::tls(source)).unwrap();
    (source, accepting.join().unwrap(), dir)
}

fn error_text(error: &dyn std::error::Error) -> String {
    veil::error_chain(error)
}

#[test]
fn peers_with_certificates_from_the_same_ca_talk() {
    let (mut stream, mut server, _dir) = tls_pair("tls-ok");
    let server = std::thread::spawn(move || {
        assert_eq!(server.protection(), "mutual TLS");
        let mut hello = [0u8; 5];
        server.read_exact(&mut hello).unwrap();
        server.write_all(b"world").unwrap();
        server.flush().unwrap();
        hello
    });
    stream.write_all(b"hello").unwrap();
    stream.flush().unwrap();
    let mut reply = [0u8; 5];
    stream.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"world");
    assert_eq!(&server.join().unwrap(), b"hello");
}

#[test]
fn a_source_from_another_ca_is_rejected_before_it_sends_anything() {
    let dir = common::TempDir::new("tls-wrong-client");
    let (site, rogue) = (Ca::new(&dir.0, "site"), Ca::new(&dir.0, "rogue"));
    let target = site.host(&dir.0, "target", &["127.0.0.1"]);
    // The rogue source trusts the real target, but its own certificate is not the site's.
    let source = rogue.host_trusting(&dir.0, "source", &["source.example"], &site.pem);
    let good_source = site.host(&dir.0, "good-source", &["source.example"]);
    let endpoint = free_endpoint();
    let listener = transport::listen(&endpoint, &Security::tls(target)).unwrap();
    let server = std::thread::spawn(move || {
        let first = listener.accept();
        // The listener still takes the real source afterwards.
        let second = listener.accept().map(|mut s| {
            let mut byte = [0u8; 1];
            s.read_exact(&mut byte).unwrap();
            byte[0]
        });
        (first.err(), second.unwrap())
    });
    // The client's half of a TLS 1.3 handshake may complete; the refusal arrives on read.
    let outcome = transport::connect(&endpoint, &Security::tls(source)).and_then(|mut s| {
        let _ = s.write_all(b"x").and_then(|_| s.flush());
        let mut byte = [0u8; 1];
        s.read(&mut byte)
            .map_err(|e| TransportError::Connect("read".into(), e))
    });
    let error = outcome.expect_err("the target must not talk to the rogue source");
    assert!(
        error_text(&error).contains("refused this host's TLS certificate"),
        "{}",
        error_text(&error)
    );
    let mut good = transport::connect(&endpoint, &Security::tls(good_source)).unwrap();
    good.write_all(&[7]).unwrap();
    good.flush().unwrap();
    let (rejected, byte) = server.join().unwrap();
    let rejected = rejected.expect("the rogue source is rejected");
    assert!(
        matches!(rejected, TransportError::Rejected { .. }),
        "{rejected:?}"
    );
    assert!(
        error_text(&rejected).contains("Rejected a connection from 127.0.0.1"),
        "{}",
        error_text(&rejected)
    );
    assert_eq!(byte, 7, "the authenticated source got through");
}

#[test]
fn a_target_whose_certificate_does_not_name_it_is_refused() {
    let dir = common::TempDir::new("tls-wrong-name");
    let ca = Ca::new(&dir.0, "site");
    let target = ca.host(&dir.0, "target", &["10.9.9.9", "elsewhere.example"]);
    let source = ca.host(&dir.0, "source", &["source.example"]);
    let endpoint = free_endpoint();
    let listener = transport::listen(&endpoint, &Security::tls(target)).unwrap();
    let server = std::thread::spawn(move || listener.accept().err());
    let error = transport::connect(&endpoint, &Security::tls(source.clone()))
        .err()
        .expect("a target with another name is not the one dialled");
    assert!(
        error_text(&error).contains("certificate not valid for name"),
        "{}",
        error_text(&error)
    );
    assert!(server.join().unwrap().is_some());

    // Told the name the target's certificate carries, the source accepts it.
    let listener = transport::listen(
        &endpoint,
        &Security::tls(ca.host(&dir.0, "target2", &["elsewhere.example"])),
    )
    .unwrap();
    let server = std::thread::spawn(move || listener.accept().map(|_| ()).is_ok());
    let named = Security {
        server_name: Some("elsewhere.example".into()),
        ..Security::tls(source)
    };
    transport::connect(&endpoint, &named).unwrap();
    assert!(server.join().unwrap());
}

#[test]
fn unreadable_tls_files_are_named() {
    let dir = common::TempDir::new("tls-missing");
    let files = veil_migration::tls::TlsFiles {
        cert: dir.path("nope.pem"),
        key: dir.path("nope-key.pem"),
        ca: dir.path("nope-ca.pem"),
    };
    let error = transport::listen(&free_endpoint(), &Security::tls(files))
        .err()
        .unwrap();
    assert!(
        error_text(&error).contains("nope"),
        "{}",
        error_text(&error)
    );
}

/// The stream reads the socket many records at a time; what it has read ahead is still the
/// peer's, in order, with nothing lost between reads of every size.
#[test]
fn bytes_read_ahead_of_the_reader_arrive_whole_and_in_order() {
    let (mut source, mut target, _dir) = tls_pair("tls-read-ahead");
    // Bytes that say where they are, in far more than one read-ahead's worth.
    let sent: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    let writing = {
        let sent = sent.clone();
        std::thread::spawn(move || {
            source.write_all(&sent).unwrap();
            source.flush().unwrap();
            source
        })
    };
    let mut received = Vec::with_capacity(sent.len());
    let mut sizes = [1usize, 7, 4096, 16_385, 300_000].into_iter().cycle();
    while received.len() < sent.len() {
        let mut buf = vec![0u8; sizes.next().unwrap().min(sent.len() - received.len())];
        target.read_exact(&mut buf).unwrap();
        received.extend_from_slice(&buf);
    }
    assert!(
        received == sent,
        "the bytes arrived changed or out of order"
    );
    drop(writing.join().unwrap());
}

/// A source writing into a target that has stopped reading learns that the target spoke,
/// even when the target's words were already read off the socket behind an earlier reply,
/// where `poll` no longer shows them: whole (inside rustls) or in part (read ahead).
#[test]
fn a_reply_read_ahead_still_interrupts_a_write_into_a_peer_that_stopped_reading() {
    use veil_migration::duplex::{Duplex, Written};
    for second_len in [8, 20_000] {
        let (mut source, mut target, _dir) = tls_pair("tls-hear-buffered");
        // A first reply longer than rustls reads at once, and a second right behind it.
        let first = vec![1u8; 10_000];
        let second = vec![2u8; second_len];
        target.write_all(&first).unwrap();
        target.write_all(&second).unwrap();
        target.flush().unwrap();
        let mut got = vec![0u8; first.len()];
        source.read_exact(&mut got).unwrap();
        assert_eq!(got, first);
        let started = std::time::Instant::now();
        // Far more than the sockets buffer: without hearing the target this would wait out
        // the peer timeout.
        let written = source.write_or_hear(&vec![7u8; 64 << 20]).unwrap();
        assert_eq!(
            written,
            Written::PeerSpoke,
            "second reply of {second_len} bytes"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        let mut heard = vec![0u8; second_len];
        source.read_exact(&mut heard).unwrap();
        assert_eq!(heard, second);
        drop(target);
    }
}

/// Both ends are Veil, so the suite is the fastest of those offered: AES-128-GCM.
#[test]
fn migration_sessions_use_aes_128_gcm() {
    let (source, target, _dir) = tls_pair("tls-suite");
    let suite = |stream: &transport::Stream| match stream {
        transport::Stream::TlsClient(s) => s.conn.negotiated_cipher_suite(),
        transport::Stream::TlsServer(s) => s.conn.negotiated_cipher_suite(),
        _ => None,
    };
    for stream in [&source, &target] {
        assert_eq!(
            suite(stream).map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
    }
}
