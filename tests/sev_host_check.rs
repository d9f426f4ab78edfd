//! `scripts/sev-host-check`, the operator's check of an SEV host: on a host without SEV it
//! says what is missing and stops at once; its steps all pass when rehearsed on the emulated
//! platform.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::describe;

fn sev_host_check(args: &[&str]) -> (Output, Duration) {
    let started = Instant::now();
    let out = Command::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/scripts/sev-host-check"
    ))
    .arg("--veil")
    .arg(env!("CARGO_BIN_EXE_veil"))
    .args(args)
    .env_remove("VEIL_LOG")
    .output()
    .unwrap();
    (out, started.elapsed())
}

#[test]
fn on_a_host_without_sev_the_check_says_what_is_missing_and_exits_0_at_once() {
    if Path::new("/dev/sev").exists() {
        eprintln!("skipped: this host has SEV, so the check would run for real");
        return;
    }
    let (out, took) = sev_host_check(&[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        text.contains("SKIPPED: this host has no usable AMD SEV"),
        "{text}"
    );
    assert!(text.contains("/dev/sev does not exist"), "{text}");
    assert!(text.contains("nothing was run or changed"), "{text}");
    assert!(
        text.contains("veil host-info says: no SEV"),
        "the check quotes the VMM's own probe: {text}"
    );
    assert!(!text.contains("PASS"), "no step ran: {text}");
}

#[test]
fn rehearsed_on_the_emulated_platform_every_step_of_the_check_passes() {
    let (out, _) = sev_host_check(&[
        "--platform",
        "emulated",
        "--memory",
        "64M",
        "--pages",
        "64",
        "--timeout",
        "300",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    for step in [
        "PASS  the platform's certificate chain exports",
        "PASS  the owner verified the launch measurement",
        "PASS  the guest read the injected secret",
        "PASS  the guest runs, stamping and checking 64 private pages",
        "PASS  live migration to a second veil",
        "PASS  live migration back to a third veil",
        "PASS  SEND_UPDATE_DATA and RECEIVE_UPDATE_DATA timed over 64 pages",
        "all checks passed",
    ] {
        assert!(text.contains(step), "missing '{step}' in:\n{text}");
    }
    assert!(text.contains("a rehearsal, no confidentiality"), "{text}");
}
