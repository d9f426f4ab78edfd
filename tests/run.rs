//! `veil run` and `veil demo` as an operator uses them.

mod common;

use common::{describe, kit, run_kit, veil, TempDir};

const GREETING: &str = "Hello from the Veil guest kit!";

#[test]
fn demo_greets_and_exits_cleanly() {
    let out = veil().args(["demo", "--memory", "32M"]).output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(GREETING),
        "{}",
        describe(&out)
    );
}

#[test]
fn run_returns_the_guests_exit_status() {
    let out = run_kit("greet exit:code=7", &["--memory", "32M"]);
    assert_eq!(out.status.code(), Some(7), "{}", describe(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains(GREETING));
}

#[test]
fn serial_output_can_go_to_a_file() {
    let dir = TempDir::new("serial-file");
    let log = dir.path("console.log");
    let out = run_kit(
        "greet",
        &[
            "--memory",
            "32M",
            "--serial",
            &format!("file:{}", log.display()),
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!String::from_utf8_lossy(&out.stdout).contains(GREETING));
    assert!(std::fs::read_to_string(&log).unwrap().contains(GREETING));
}

#[test]
fn a_faulting_guest_is_reported_with_vcpu_rip_and_bytes() {
    let out = run_kit("greet fault", &["--memory", "32M"]);
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("vCPU 0 stopped on"), "{}", describe(&out));
    assert!(stderr.contains("at RIP 0x"), "{}", describe(&out));
    // ud2 is 0f 0b, whether KVM reports the bytes or Veil reads them from guest memory.
    assert!(
        stderr.contains("instruction bytes: 0f 0b"),
        "{}",
        describe(&out)
    );
}

fn assert_refused(args: &[&str], expected: &str) {
    let out = veil().args(args).output().unwrap();
    assert!(
        !out.status.success(),
        "{args:?} succeeded\n{}",
        describe(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(expected),
        "{args:?}: expected {expected:?}\n{}",
        describe(&out)
    );
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    let kit = kit().to_str().unwrap();
    assert_refused(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "Cannot read kernel /nonexistent/vmlinux",
    );
    assert_refused(
        &["run", "--kernel", "/nonexistent/vmlinux"],
        "caused by: No such file or directory",
    );
    assert_refused(
        &["run", "--kernel", "Cargo.toml"],
        "neither an ELF nor a bzImage",
    );
    assert_refused(
        &["run", "--kernel", kit, "--memory", "1M"],
        "too small: Veil needs at least 16 MiB",
    );
    assert_refused(&["run", "--kernel", kit, "--memory", "2T"], "too large");
    assert_refused(
        &["run", "--kernel", kit, "--memory", "12Q"],
        "is not a size",
    );
    assert_refused(
        &["run", "--kernel", kit, "--vcpus", "0"],
        "Invalid vCPU count 0",
    );
    assert_refused(
        &["run", "--kernel", kit, "--serial", "tcp:1"],
        "is not a serial sink",
    );
    assert_refused(&["run"], "--kernel <FILE>");
    let host_bytes = veil_hypervisor::memory::host_memory_bytes().unwrap();
    let too_much = format!("{}G", host_bytes / (1 << 30) + 2);
    assert_refused(
        &["run", "--kernel", kit, "--memory", &too_much],
        "more than this host's",
    );
}

#[test]
fn help_explains_every_command() {
    for cmd in [
        &["--help"][..],
        &["run", "--help"],
        &["demo", "--help"],
        &["host-info", "--help"],
    ] {
        let out = veil().args(cmd).output().unwrap();
        assert!(out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: veil"),
            "{cmd:?}"
        );
    }
}

#[test]
fn host_info_reports_capabilities_and_hypercall_delivery() {
    let out = veil().args(["host-info", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["kvm_api_version"], 12);
    assert!(info["hypercall_exits"]["delivered"].is_boolean());
    assert!(info["sev"]["summary"].as_str().unwrap().contains("SEV"));
    let names: Vec<&str> = info["capabilities"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"KVM_CAP_EXIT_HYPERCALL"));
    let text = veil().arg("host-info").output().unwrap();
    assert!(String::from_utf8_lossy(&text.stdout).contains("Hypercall exits"));
}

#[test]
fn ctrl_c_stops_the_vm_cleanly() {
    let mut child = veil()
        .args([
            "run",
            "--memory",
            "32M",
            "--cmdline",
            "greet spin",
            "--kernel",
        ])
        .arg(kit())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    common::read_until(&mut stdout, GREETING);
    // SAFETY: sending SIGINT to our own child process.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let started = std::time::Instant::now();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130));
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}

/// Runs `veil run` on the kit inside `wrapper` (a command line that ends by running veil).
fn run_wrapped(wrapper: &[&str]) -> std::process::Output {
    std::process::Command::new(wrapper[0])
        .args(&wrapper[1..])
        .arg(env!("CARGO_BIN_EXE_veil"))
        .args(["run", "--memory", "32M", "--kernel"])
        .arg(kit())
        .output()
        .unwrap()
}

fn is_root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

#[test]
fn a_host_without_kvm_is_told_so() {
    if !is_root() {
        eprintln!("skipped: hiding /dev/kvm needs root (a private mount namespace)");
        return;
    }
    // A private /dev without kvm, in a mount namespace of its own.
    let out = run_wrapped(&[
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        "mount -t tmpfs none /dev && exec \"$0\" \"$@\"",
    ]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("/dev/kvm does not exist: this host has no KVM"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_user_without_access_to_kvm_is_told_so() {
    if !is_root() {
        eprintln!("skipped: switching to an unprivileged user needs root");
        return;
    }
    let out = run_wrapped(&[
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
    ]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied opening /dev/kvm"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_closed_stdout_ends_a_printing_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let mut child = common::veil()
        .arg("host-info")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Like `veil host-info | head -0`: the reader is gone before anything is written.
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains("panicked"), "{said}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{said}");
}

#[test]
fn a_closed_serial_output_is_reported_once_and_the_guest_runs_on() {
    use std::io::Read;
    let dir = common::TempDir::new("serial-closed");
    let mut vmm = common::veil()
        .args(["run", "--memory", "32M", "--api-socket"])
        .arg(dir.path("a.sock"))
        .args([
            "--cmdline",
            "dirty-loop:seed=3,first=0x800,count=1,check=1",
            "--kernel",
        ])
        .arg(common::kit())
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.path("err")).unwrap())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    let mut out = vmm.0.stdout.take().unwrap();
    let mut first = [0u8; 64];
    out.read_exact(&mut first).unwrap();
    // The reader goes away; the guest keeps printing a line per round.
    drop(out);
    common::wait_for(&dir.path("a.sock"));
    std::thread::sleep(std::time::Duration::from_secs(2));
    let status = common::status(&dir.path("a.sock"));
    assert_eq!(status["state"], "running", "{status}");
    let err = std::fs::read_to_string(dir.path("err")).unwrap();
    assert_eq!(err.matches("serial output failed").count(), 1, "{err}");
    assert!(common::ctl(&dir.path("a.sock"), &["shutdown"])
        .status
        .success());
    vmm.wait();
}
