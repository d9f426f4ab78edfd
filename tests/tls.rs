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

fn error_text(error: &dyn std::error::Error) -> String {
    veil::error_chain(error)
}

#[test]
fn peers_with_certificates_from_the_same_ca_talk() {
    let dir = common::TempDir::new("tls-ok");
    let ca = Ca::new(&dir.0, "site");
    let (target, source) = (
        ca.host(&dir.0, "target", &["127.0.0.1"]),
        ca.host(&dir.0, "source", &["source.example"]),
    );
    let endpoint = free_endpoint();
    let listener = transport::listen(&endpoint, &Security::tls(target)).unwrap();
    let server = std::thread::spawn(move || {
        let mut stream = listener.accept().unwrap();
        assert_eq!(stream.protection(), "mutual TLS");
        let mut hello = [0u8; 5];
        stream.read_exact(&mut hello).unwrap();
        stream.write_all(b"world").unwrap();
        stream.flush().unwrap();
        hello
    });
    let mut stream = transport::connect(&endpoint, &Security::tls(source)).unwrap();
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
