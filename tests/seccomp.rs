//! Every thread of a running `veil` is under a seccomp filter, a call its filter forbids
//! kills Veil (or is only logged with `--seccomp log`), and `--seccomp off` installs none.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Each thread of process `pid`: its name and its `Seccomp:` mode (0 none, 2 filter).
fn threads(pid: u32) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let (Ok(name), Ok(status)) = (
            std::fs::read_to_string(dir.join("comm")),
            std::fs::read_to_string(dir.join("status")),
        ) else {
            continue; // the thread ended meanwhile
        };
        let mode = status
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp:"))
            .unwrap_or("?")
            .trim()
            .to_string();
        found.push((name.trim().to_string(), mode));
    }
    found.sort();
    found
}

/// Waits until process `pid` has a thread named each of `names` and, when `confined`, each
/// of those has installed its filter: threads start a little after the guest's first output,
/// and each installs its own filter as its first step, so a thread is briefly named but not
/// yet confined. Gives up after 20 s and returns what it saw, for the caller's assertions.
fn wait_for_threads(pid: u32, names: &[&str], confined: bool) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = threads(pid);
        let settled = names.iter().all(|n| {
            found
                .iter()
                .any(|(thread, mode)| thread == n && (mode == "2" || !confined))
        });
        if settled || Instant::now() >= deadline {
            let missing: Vec<_> = names
                .iter()
                .filter(|n| !found.iter().any(|(t, _)| t == *n))
                .collect();
            assert!(missing.is_empty(), "threads {found:?}, missing {missing:?}");
            return found;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_all_confined(what: &str, found: &[(String, String)]) {
    let loose: Vec<_> = found.iter().filter(|(_, mode)| mode != "2").collect();
    assert!(
        loose.is_empty(),
        "{what}: threads without a filter: {loose:?} of {found:?}"
    );
}

/// A `veil run` with every kind of device and the control API, spinning after its greeting.
fn run_with_everything(dir: &common::TempDir, extra: &[&str]) -> common::Spawned {
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut source = common::veil()
        .args(["run", "--memory", "32M", "--vcpus", "2", "--api-socket"])
        .arg(dir.path("a.sock"))
        .arg("--disk")
        .arg(format!("path={},id=data", disk.display()))
        .arg("--vsock")
        .arg(format!("cid=3,socket={}", dir.path("v.sock").display()))
        .arg("--console")
        .arg(format!("unix:{}", dir.path("c.sock").display()))
        .args(extra)
        .args(["--cmdline", "greet spin", "--kernel"])
        .arg(common::kit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    common::read_until(source.0.stdout.as_mut().unwrap(), "Hello");
    common::wait_for(&dir.path("a.sock"));
    source
}

/// The threads a `veil run` with the API, a console socket and devices has.
const RUN_THREADS: &[&str] = &[
    "veil",
    "vcpu0",
    "vcpu1",
    "vm-reset",
    "devices",
    "console-socket",
    "api",
    "migrate-send",
    "signals",
];

#[test]
fn every_thread_of_a_running_vm_and_of_its_migration_target_is_confined() {
    let dir = common::TempDir::new("seccomp-threads");
    let mut source = run_with_everything(&dir, &[]);
    let found = wait_for_threads(source.0.id(), RUN_THREADS, true);
    assert_all_confined("veil run", &found);

    // The API's client threads start from its (confined) thread: so does a status request's.
    assert_eq!(common::status(&dir.path("a.sock"))["state"], "running");

    let (target_api, target_socket) = (dir.path("b.sock"), dir.path("m.sock"));
    let target_console = dir.path("c2.sock");
    let target_vsock = dir.path("v2.sock");
    let mut target = common::receive_on(
        &target_socket,
        &[
            "--api-socket".as_ref(),
            target_api.as_ref(),
            "--console".as_ref(),
            format!("unix:{}", target_console.display()).as_ref(),
            "--vsock-socket".as_ref(),
            target_vsock.as_ref(),
        ],
    );
    let to = format!("unix:{}", target_socket.display());
    let out = common::ctl(&dir.path("a.sock"), &["migrate", "--to", &to]);
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(source.wait().success());
    common::wait_for(&target_api);
    let found = wait_for_threads(target.0.id(), RUN_THREADS, true);
    assert_all_confined("veil receive", &found);
    assert_eq!(common::status(&target_api)["state"], "running");
    common::ctl(&target_api, &["shutdown"]);
    assert_eq!(target.wait().code(), Some(130));
}

#[test]
fn with_seccomp_off_no_thread_has_a_filter() {
    let dir = common::TempDir::new("seccomp-off");
    let source = run_with_everything(&dir, &["--seccomp", "off"]);
    let found = wait_for_threads(source.0.id(), RUN_THREADS, false);
    assert!(found.iter().all(|(_, mode)| mode == "0"), "{found:?}");
    common::ctl(&dir.path("a.sock"), &["shutdown"]);
}

/// `veil run` of the greeting guest with a disk (so the device thread exists), whose `kind`
/// thread makes a forbidden call right after installing its filter.
fn probe(kind: &str, mode: &str, dir: &Path) -> (u32, std::process::Output) {
    let disk = dir.join(format!("{kind}-{mode}.img"));
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let child = common::veil()
        .env("VEIL_SECCOMP_PROBE", kind)
        .args(["run", "--memory", "32M", "--seccomp", mode, "--disk"])
        .arg(format!("path={}", disk.display()))
        .args(["--cmdline", "greet", "--kernel"])
        .arg(common::kit())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    (pid, child.wait_with_output().unwrap())
}

/// The kernel log's lines about a call a filter only logged, for process `pid`; `None` if
/// the kernel log cannot be read here.
fn logged_calls(pid: u32) -> Option<Vec<String>> {
    let out = Command::new("dmesg").output().ok()?;
    if !out.status.success() {
        return None;
    }
    let needle = format!(" pid={pid} ");
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("type=1326") && l.contains(&needle))
            .map(str::to_string)
            .collect(),
    )
}

#[test]
fn a_forbidden_call_kills_veil_with_seccomp_on_and_is_only_logged_with_log() {
    let dir = common::TempDir::new("seccomp-probe");
    for kind in ["vcpu", "devices", "reset", "main", "signals"] {
        let (_, out) = probe(kind, "on", &dir.0);
        assert_eq!(
            out.status.signal(),
            Some(libc::SIGSYS),
            "{kind}: {}",
            common::describe(&out)
        );

        // The kernel rate-limits these lines (ten per five seconds): a run whose line was
        // suppressed is tried again once the window has passed.
        let mut logged = false;
        for attempt in 0..3 {
            if attempt > 0 {
                std::thread::sleep(Duration::from_secs(6));
            }
            let (pid, out) = probe(kind, "log", &dir.0);
            assert!(out.status.success(), "{kind}: {}", common::describe(&out));
            let greeting = String::from_utf8_lossy(&out.stdout);
            assert!(
                greeting.contains("Hello from the Veil guest kit!"),
                "{greeting}"
            );
            // personality(2) is system call 135 on x86-64.
            match logged_calls(pid) {
                Some(lines) => logged = lines.iter().any(|l| l.contains("syscall=135")),
                None => {
                    println!("skipped: cannot read the kernel log to see the {kind} call logged");
                    logged = true;
                }
            }
            if logged {
                break;
            }
        }
        assert!(
            logged,
            "{kind}: the forbidden call never showed in the kernel log"
        );
    }
}

#[test]
fn a_guest_that_resets_itself_runs_on_under_the_filters() {
    // The reset thread reloads the kernel from its file and puts every vCPU back.
    let out = common::run_kit("reset greet", &["--memory", "32M"]);
    assert!(out.status.success(), "{}", common::describe(&out));
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("resumed after reset") && said.contains("Hello"),
        "{said}"
    );
}

#[test]
fn a_library_vm_confines_its_own_threads_and_not_its_callers() {
    let output = veil::CapturedOutput::new();
    let vm = veil::VmBuilder::new()
        .kernel(common::kit())
        .cmdline("greet spin")
        .memory_bytes(32 << 20)
        .serial_writer(output.clone())
        .seccomp(veil::SeccompMode::On)
        .start()
        .unwrap();
    let own = ["vcpu0", "vm-reset", "devices"];
    let found = wait_for_threads(std::process::id(), &own, true);
    for (name, mode) in &found {
        if own.contains(&name.as_str()) {
            assert_eq!(mode, "2", "{name}: {found:?}");
        }
    }
    let mine = std::fs::read_to_string("/proc/thread-self/status").unwrap();
    assert!(mine.contains("Seccomp:\t0"), "{mine}");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !output.text().contains("Hello") {
        assert!(Instant::now() < deadline, "{:?}", output.text());
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.stop();
    assert_eq!(vm.wait(), veil::VmStop::Requested);
}
