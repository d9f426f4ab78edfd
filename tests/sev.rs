//! Launching SEV guests on the emulated platform, checked the way a guest owner would check
//! them: with the `sev` crate.

mod common;

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{describe, kit, veil, TempDir};
use serde_json::Value;
use sev::parser::Decoder;
use veil::sev_launch::MeasurementFile;
use veil::sev_owner::{ExpectedImage, Owner};
use veil_hypervisor::BootConfig;
use veil_sev::policy::GuestPolicy;

fn export_chain(state: &Path, out: &Path) -> sev::certs::sev::Chain {
    common::export_emulated_chain(state, out);
    sev::certs::sev::Chain::decode(&mut File::open(out).unwrap(), ()).expect("chain decodes")
}

#[test]
fn the_exported_chain_verifies_with_the_sev_crate_and_persists() {
    let dir = TempDir::new("sev-chain");
    let first = export_chain(&dir.path("state"), &dir.path("a.cert"));
    sev::certs::sev::Verifiable::verify(&first).expect("chain verifies");
    export_chain(&dir.path("state"), &dir.path("b.cert"));
    assert_eq!(
        std::fs::read(dir.path("a.cert")).unwrap(),
        std::fs::read(dir.path("b.cert")).unwrap()
    );
}

#[test]
fn an_owner_verifies_the_launch_measurement_and_the_guest_reads_the_injected_secret() {
    let dir = TempDir::new("sev-owner");
    let state = dir.path("state");
    let chain = export_chain(&state, &dir.path("chain.cert"));

    // The owner's LAUNCH_START data.
    // The owner vouches for this emulated platform's root (AMD's are not its ARK).
    let trusted = [chain.ca.ark];
    let owner = Owner::new(GuestPolicy(0x1), chain, &trusted).unwrap();
    std::fs::write(dir.path("session.bin"), owner.session_blob()).unwrap();
    std::fs::write(dir.path("owner.cert"), owner.certificate().unwrap()).unwrap();

    let ram = dir.path("ram");
    let measurement_path = dir.path("measurement.json");
    let secret_path = dir.path("secret.json");
    let mut child = veil()
        .args([
            "run",
            "--memory",
            "64M",
            "--sev",
            "--sev-platform",
            "emulated",
            "--sev-policy",
            "0x1",
        ])
        .arg("--sev-state-dir")
        .arg(&state)
        .arg("--sev-owner-session")
        .arg(dir.path("session.bin"))
        .arg("--sev-owner-cert")
        .arg(dir.path("owner.cert"))
        .arg("--sev-measurement-out")
        .arg(&measurement_path)
        .arg("--sev-secret")
        .arg(&secret_path)
        .arg("--memory-file")
        .arg(&ram)
        .args([
            "--cmdline",
            "read-secret:gpa=0x400000,len=32 greet",
            "--kernel",
        ])
        .arg(kit())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    // Veil has measured and waits for the secret. The owner recomputes the digest from the
    // image it meant to launch (on hardware guest RAM is ciphertext by now) and lets the sev
    // crate check the HMAC.
    common::wait_for(&measurement_path);
    let m: MeasurementFile =
        serde_json::from_slice(&std::fs::read(&measurement_path).unwrap()).unwrap();
    assert!(!m.confidential);
    assert_eq!(m.measured[0].what, "kernel");
    assert!(m.measured.iter().any(|r| r.what == "cmdline"));
    let image = ExpectedImage::load(
        &BootConfig {
            kernel: kit().into(),
            initrd: None,
            cmdline: "read-secret:gpa=0x400000,len=32 greet".into(),
        },
        64 << 20,
    )
    .unwrap();
    // What the host measured is what lies in its RAM, byte for byte (the emulated platform
    // encrypts nothing, so the file shows it).
    let memory = File::open(&ram).unwrap();
    for (r, expected) in image.contents() {
        let mut bytes = vec![0u8; expected.len()];
        memory.read_exact_at(&mut bytes, r.gpa).unwrap();
        assert!(bytes == expected, "the host's {} differs", r.what);
    }
    let verified = owner
        .verify(&m, &image)
        .expect("the owner accepts the measurement");

    let secret: Vec<u8> = (0..32u8).map(|i| i.wrapping_mul(37) ^ 0x5a).collect();
    let file = verified.secret(0x400000, &secret).unwrap();
    let tmp = dir.path("secret.tmp");
    std::fs::write(&tmp, serde_json::to_vec(&file).unwrap()).unwrap();
    std::fs::rename(&tmp, &secret_path).unwrap();

    let status = child.wait().unwrap();
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{out}\n{err}");
    assert!(
        out.contains(&format!("secret: {}", hex::encode(&secret))),
        "{out}"
    );
    assert!(
        err.contains("NOT encrypted"),
        "the emulated platform says it gives no confidentiality: {err}"
    );
}

#[test]
fn a_nosend_policy_makes_the_guest_permanently_unmigratable() {
    let dir = TempDir::new("sev-nosend");
    let socket = dir.path("api.sock");
    let mut child = veil()
        .args([
            "run",
            "--memory",
            "32M",
            "--sev",
            "--sev-platform",
            "emulated",
            "--sev-policy",
            "0x9",
        ])
        .arg("--sev-state-dir")
        .arg(dir.path("state"))
        .arg("--api-socket")
        .arg(&socket)
        .args(["--cmdline", "greet spin", "--kernel"])
        .arg(kit())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    common::read_until(&mut stdout, "Hello");
    let out = veil()
        .arg("ctl")
        .arg("--api-socket")
        .arg(&socket)
        .args(["--json", "status"])
        .output()
        .unwrap();
    let status: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(status["migratability"]["state"], "permanently-blocked");
    let kinds: Vec<&str> = status["migratability"]["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reason"]["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"sev-policy-no-send"), "{kinds:?}");
    assert_eq!(status["sev"]["platform"], "emulated");
    assert_eq!(status["sev"]["confidential"], false);
    assert!(
        status["page_states"].is_object(),
        "an SEV guest has a page-state map"
    );
    assert_eq!(status["migration_control"], 0);
    let text = veil()
        .arg("ctl")
        .arg("--api-socket")
        .arg(&socket)
        .arg("status")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&text.stdout)
        .contains("NOT encrypted (emulated platform: no confidentiality)"));
    veil()
        .arg("ctl")
        .arg("--api-socket")
        .arg(&socket)
        .arg("shutdown")
        .output()
        .unwrap();
    child.wait().unwrap();
}

#[test]
fn sev_on_a_host_without_it_fails_fast_and_says_why() {
    if Path::new("/dev/sev").exists() {
        eprintln!("skipped: this host has SEV");
        return;
    }
    let started = Instant::now();
    let out = veil()
        .args(["run", "--memory", "32M", "--sev", "--kernel"])
        .arg(kit())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("This host has no SEV: /dev/sev does not exist"),
        "{err}"
    );
    assert!(
        err.contains("for testing use --sev-platform emulated"),
        "{err}"
    );
    assert!(started.elapsed() < Duration::from_secs(2));
    let out = veil()
        .args(["run", "--sev-policy", "0x4", "--kernel"])
        .arg(kit())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--sev"),
        "SEV options need --sev"
    );
}

#[test]
fn sev_es_guests_are_refused_with_a_reason() {
    let dir = TempDir::new("sev-es");
    let out = veil()
        .args([
            "run",
            "--memory",
            "32M",
            "--sev",
            "--sev-platform",
            "emulated",
            "--sev-policy",
            "0x4",
        ])
        .arg("--sev-state-dir")
        .arg(dir.path("state"))
        .arg("--kernel")
        .arg(kit())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("SEV-ES and SEV-SNP guests are not supported"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_secret_that_never_comes_ends_the_launch_after_the_timeout_with_the_reason() {
    let dir = TempDir::new("sev-no-secret");
    let secret = dir.path("secret.json");
    let started = std::time::Instant::now();
    let out = veil()
        .args([
            "run",
            "--memory",
            "32M",
            "--sev",
            "--sev-platform",
            "emulated",
        ])
        .arg("--sev-state-dir")
        .arg(dir.path("state"))
        .arg("--sev-secret")
        .arg(&secret)
        .args(["--sev-secret-timeout", "1s", "--kernel"])
        .arg(kit())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", common::describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "No secret appeared in {} within 1s",
            secret.display()
        )),
        "{err}"
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "the launch gave up on time"
    );
}

#[test]
fn an_sev_guest_that_resets_is_stopped_with_the_reason_instead_of_reloaded_in_plaintext() {
    let dir = TempDir::new("sev-reset");
    let out = veil()
        .args([
            "run",
            "--memory",
            "32M",
            "--sev",
            "--sev-platform",
            "emulated",
        ])
        .arg("--sev-state-dir")
        .arg(dir.path("state"))
        .args(["--cmdline", "greet reset greet", "--kernel"])
        .arg(kit())
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("An SEV guest cannot be reset"), "{err}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("resumed after reset"),
        "{}",
        describe(&out)
    );
}

/// `veil sev owner` makes a session only with a platform whose root it trusts: AMD's, or one
/// it was told to trust with `--trust-chain`.
#[test]
fn veil_sev_owner_makes_no_session_with_a_platform_whose_root_it_was_not_told_to_trust() {
    let dir = TempDir::new("sev-owner-untrusted");
    let chain = dir.path("chain.cert");
    export_chain(&dir.path("state"), &chain);
    let (session, cert) = (dir.path("session.bin"), dir.path("owner.cert"));
    let owner = |trust: Option<&Path>| {
        let mut cmd = veil();
        cmd.args(["sev", "owner", "--chain"])
            .arg(&chain)
            .arg("--session-out")
            .arg(&session)
            .arg("--cert-out")
            .arg(&cert)
            .arg("--measurement")
            .arg(dir.path("measurement.json"))
            .arg("--kernel")
            .arg(kit())
            .args(["--memory", "16M", "--timeout", "1s"]);
        if let Some(trust) = trust {
            cmd.arg("--trust-chain").arg(trust);
        }
        cmd.output().unwrap()
    };
    let refused = owner(None);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("does not end in a trusted root"),
        "{}",
        describe(&refused)
    );
    assert!(
        !session.exists() && !cert.exists(),
        "nothing was handed out"
    );

    // Trusted, the session is made; no host launches here, so the wait for it times out.
    let waited = owner(Some(&chain));
    assert!(!waited.status.success());
    assert!(
        String::from_utf8_lossy(&waited.stderr).contains("no measurement appeared"),
        "{}",
        describe(&waited)
    );
    assert_eq!(std::fs::read(&session).unwrap().len(), 128);
}
