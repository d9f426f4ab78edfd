//! An emulated platform's identity, as its users meet it: a guest owner who receives the
//! platform's certificate chain and starts a launch session with the `sev` crate, an operator
//! whose platform keeps its identity across restarts, and a migration source that trusts only
//! the roots it was configured with.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use sev::certs::sev::{Chain, Verifiable};
use sev::firmware::host::Version;
use sev::launch::sev::{Policy, PolicyFlags};
use sev::parser::{Decoder, Encoder};
use sev::session::Session;
use veil_sev::crypto::{unwrap_session, WrappingKeys, SESSION_BYTES};
use veil_sev::emulated::identity::{amd_arks, verify_chain, IdentityError, PlatformIdentity};

/// A state directory under the system's temporary directory, not yet created, removed on drop.
struct StateDir(PathBuf);

impl StateDir {
    fn new(name: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let parent = std::env::temp_dir().join(format!(
            "veil-identity-{name}-{}-{nanos}",
            std::process::id()
        ));
        Self(parent)
    }

    /// The identity's own directory, one level down, so `load_or_create` creates it.
    fn path(&self) -> PathBuf {
        self.0.join("identity")
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn decode(bytes: &[u8]) -> Chain {
    let mut rest = bytes;
    let chain = Chain::decode(&mut rest, ()).expect("the chain decodes");
    assert!(rest.is_empty(), "the chain is all there is");
    chain
}

fn encoded<T: Encoder<()>>(value: &T) -> Vec<u8> {
    let mut bytes = Vec::new();
    value.encode(&mut bytes, ()).unwrap();
    bytes
}

/// The `sev` crate's session struct as the firmware receives it: the 128-byte blob.
fn session_blob(session: &sev::launch::sev::Session) -> [u8; SESSION_BYTES] {
    let mut blob = [0u8; SESSION_BYTES];
    blob[..16].copy_from_slice(&session.nonce);
    blob[16..48].copy_from_slice(&session.wrap_tk);
    blob[48..64].copy_from_slice(&session.wrap_iv);
    blob[64..96].copy_from_slice(&session.wrap_mac);
    blob[96..].copy_from_slice(&session.policy_mac);
    blob
}

#[test]
fn a_fresh_platform_chain_is_accepted_by_the_sev_crate() {
    let identity = PlatformIdentity::generate().unwrap();
    let bytes = identity.chain_bytes();
    // PDH, PEK, OCA, CEK (0x824 bytes each), then the 2048-bit ASK and ARK (832 bytes each).
    assert_eq!(bytes.len(), 4 * 0x824 + 2 * 832);

    let chain = decode(&bytes);
    assert_eq!(&chain, identity.chain());
    let pdh = (&chain).verify().expect("the chain verifies");
    assert_eq!(pdh, identity.pdh());
}

#[test]
fn a_guest_owner_can_start_a_launch_session_with_the_platform() {
    let identity = PlatformIdentity::generate().unwrap();
    let policy = Policy {
        flags: PolicyFlags::NO_DEBUG | PolicyFlags::NO_KEY_SHARING,
        minfw: Version {
            major: 0,
            minor: 17,
        },
    };
    let policy_bits = 0x3 | 17 << 24;

    for (policy, bits) in [(Policy::default(), 0), (policy, policy_bits)] {
        // The owner receives the exported chain and starts a session (the `sev` crate verifies
        // the chain, generates its own DH key and wraps fresh TEK/TIK for the PDH).
        let owner = Session::try_from(policy).unwrap();
        let start = owner.start(decode(&identity.chain_bytes())).unwrap();

        // The firmware side: ECDH with the owner's key, then unwrap the blob.
        let z = identity.shared_secret(&start.cert).unwrap();
        let blob = session_blob(&start.session);
        let wrapping = WrappingKeys::derive(&z, &start.session.nonce);
        let keys = unwrap_session(&wrapping, &blob, bits).expect("the policy MAC matches");
        assert_eq!(keys.tek[..], owner.tek[..]);
        assert_eq!(keys.tik[..], owner.tik[..]);

        // A different policy, or another platform's key, does not unwrap.
        assert!(unwrap_session(&wrapping, &blob, bits ^ 1).is_err());
        let other = PlatformIdentity::generate().unwrap();
        let z = other.shared_secret(&start.cert).unwrap();
        let wrapping = WrappingKeys::derive(&z, &start.session.nonce);
        assert!(unwrap_session(&wrapping, &blob, bits).is_err());
    }
}

#[test]
fn the_identity_survives_a_restart() {
    let state = StateDir::new("restart");
    let dir = state.path();
    let first = PlatformIdentity::load_or_create(&dir).unwrap();
    assert_eq!(mode(&dir), 0o700);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["cek.key", "chain.cert", "oca.key", "pdh.key", "pek.key"]
    );
    for name in &names {
        assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
    }
    assert_eq!(
        std::fs::read(dir.join("chain.cert")).unwrap(),
        first.chain_bytes()
    );

    let second = PlatformIdentity::load_or_create(&dir).unwrap();
    assert_eq!(second.chain_bytes(), first.chain_bytes());
    // The same PDH private key: a peer agrees the same secret with both.
    let peer = PlatformIdentity::generate().unwrap();
    assert_eq!(
        second.shared_secret(peer.pdh()).unwrap(),
        first.shared_secret(peer.pdh()).unwrap()
    );
}

#[test]
fn a_truncated_state_file_is_reported_by_name() {
    for name in ["chain.cert", "pdh.key", "cek.key"] {
        let state = StateDir::new("truncated");
        let dir = state.path();
        let created = PlatformIdentity::load_or_create(&dir).unwrap();
        let path = dir.join(name);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();

        let err = PlatformIdentity::load_or_create(&dir).unwrap_err();
        assert!(
            matches!(&err, IdentityError::Corrupt { path: p, .. } if *p == path),
            "{name}: {err:?}"
        );
        assert!(err.to_string().contains(name), "{err}");
        // Nothing was regenerated behind the operator's back.
        assert_eq!(std::fs::read(&path).unwrap(), bytes[..bytes.len() / 2]);
        if name != "chain.cert" {
            assert_eq!(
                std::fs::read(dir.join("chain.cert")).unwrap(),
                created.chain_bytes()
            );
        }
    }
}

#[test]
fn a_partial_state_dir_is_an_error_not_a_new_identity() {
    let state = StateDir::new("partial");
    let dir = state.path();
    PlatformIdentity::load_or_create(&dir).unwrap();
    std::fs::remove_file(dir.join("pek.key")).unwrap();
    let err = PlatformIdentity::load_or_create(&dir).unwrap_err();
    assert!(
        matches!(&err, IdentityError::Missing { path } if *path == dir.join("pek.key")),
        "{err:?}"
    );
    assert!(!dir.join("pek.key").exists());
}

#[test]
fn a_key_from_another_identity_is_corrupt() {
    let (a, b) = (StateDir::new("mix-a"), StateDir::new("mix-b"));
    PlatformIdentity::load_or_create(&a.path()).unwrap();
    PlatformIdentity::load_or_create(&b.path()).unwrap();
    std::fs::copy(b.path().join("pdh.key"), a.path().join("pdh.key")).unwrap();
    let err = PlatformIdentity::load_or_create(&a.path()).unwrap_err();
    assert!(
        matches!(&err, IdentityError::Corrupt { path, .. } if *path == a.path().join("pdh.key")),
        "{err:?}"
    );
}

#[test]
fn a_key_readable_by_others_is_refused() {
    let state = StateDir::new("mode");
    let dir = state.path();
    PlatformIdentity::load_or_create(&dir).unwrap();
    let key = dir.join("oca.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = PlatformIdentity::load_or_create(&dir).unwrap_err();
    assert!(
        matches!(&err, IdentityError::Permissions { path, mode: 0o644 } if *path == key),
        "{err:?}"
    );
}

#[test]
fn tampered_signatures_are_rejected() {
    let identity = PlatformIdentity::generate().unwrap();
    let bytes = identity.chain_bytes();
    let sev_cert = 0x824;
    let (pek, cek, ask) = (sev_cert, 3 * sev_cert, 4 * sev_cert);
    // The ASK's signature starts after its 64-byte preamble, exponent and modulus; a SEV
    // certificate's first signature after its body and the slot's usage and algorithm.
    for (what, offset) in [
        ("ASK signature", ask + 64 + 2 * 256),
        ("ASK signature, last byte", ask + 64 + 3 * 256 - 1),
        ("PEK signature (first slot)", pek + 0x414 + 8),
        ("PEK signature (second slot)", pek + 0x414 + 0x208 + 8),
        ("PEK body", pek + 0x20),
        ("CEK signature (by the ASK)", cek + 0x414 + 8),
    ] {
        let mut bad = bytes.clone();
        bad[offset] ^= 0x01;
        let chain = decode(&bad);
        assert!((&chain).verify().is_err(), "{what}");
        assert!(
            verify_chain(&chain, &[*identity.ark()]).is_err(),
            "{what} (against the trusted ARK)"
        );
    }
}

#[test]
fn a_migration_source_trusts_only_the_roots_it_was_given() {
    let source = PlatformIdentity::generate().unwrap();
    let target = PlatformIdentity::generate().unwrap();
    let chain = decode(&target.chain_bytes());

    // Configured with the target's ARK (and AMD's), the source accepts the target and agrees
    // the same secret with its PDH as the target does with the source's.
    let mut roots = amd_arks().unwrap();
    roots.push(*target.ark());
    let pdh = verify_chain(&chain, &roots).unwrap();
    assert_eq!(encoded(pdh), encoded(target.pdh()));
    assert_eq!(
        source.shared_secret(pdh).unwrap(),
        target.shared_secret(source.pdh()).unwrap()
    );

    // Another platform's ARK, or only AMD's, is not a root of this chain.
    for roots in [vec![*source.ark()], amd_arks().unwrap(), vec![]] {
        let err = verify_chain(&chain, &roots).unwrap_err();
        assert!(matches!(err, IdentityError::UntrustedRoot), "{err:?}");
    }

    // A chain that swaps in a trusted ARK without re-signing does not verify.
    let mut forged = decode(&target.chain_bytes());
    forged.ca.ark = *source.ark();
    let err = verify_chain(&forged, &[*source.ark()]).unwrap_err();
    assert!(matches!(err, IdentityError::ChainInvalid(_)), "{err:?}");
}
