//! The whole vCPU travels: MSRs the guest wrote, the CPUID it sees, its TSC rate; and a
//! target that cannot give the guest what it had refuses it, saying what is missing.

mod common;

use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::Duration;

use veil::{CapturedOutput, RunState, VmBuilder, VmStop};
use veil_hypervisor::vcpu::tsc::PRETEND_TSC_KHZ_VAR;
use veil_migration::receiver;
use veil_migration::sender::{self, SendOptions};
use vm_memory::{Bytes, GuestAddress};

#[test]
fn msrs_the_guest_wrote_its_tsc_deadline_and_the_cpuid_it_sees_are_the_same_after_a_migration() {
    let program = common::vcpu::StateProgram::for_this_host();
    let (chosen, deadline) = (program.msrs.clone(), program.deadline);
    let cmdline = program.cmdline.clone();
    let on_source = CapturedOutput::new();
    let source = VmBuilder::new()
        .kernel(common::kit())
        .cmdline(cmdline)
        .memory_bytes(32 << 20)
        .serial_writer(on_source.clone())
        .start()
        .unwrap();
    assert!(
        on_source.wait_for("wait-word: waiting", Duration::from_secs(30)),
        "{}",
        on_source.text()
    );
    let on_target = CapturedOutput::new();
    let (mut to_target, from_source) = UnixStream::pair().unwrap();
    std::thread::scope(|scope| {
        let sending = scope.spawn(|| {
            sender::send(
                source.inner(),
                &mut to_target,
                &SendOptions::default(),
                None,
            )
        });
        let mut incoming = receiver::accept(from_source, veil::check_incoming, None).unwrap();
        let target = veil::migration::receive(
            &mut incoming,
            VmBuilder::new().serial_writer(on_target.clone()),
            None,
        )
        .unwrap();
        sending.join().unwrap().expect("migration succeeds");
        assert_eq!(source.wait(), VmStop::Migrated);
        // The target gives the guest exactly the CPUID it had.
        assert_eq!(target.inner().cpuid(), source.inner().cpuid());
        target
            .memory()
            .write_obj(common::vcpu::GO, GuestAddress(common::vcpu::GO_GPA))
            .unwrap();
        assert_eq!(target.resume(), RunState::Running);
        // Done once it greets, or once a check failed (the kit then exits).
        let done = (0..300).any(|_| {
            on_target.text().contains("FAILED")
                || on_target.wait_for("Hello", Duration::from_millis(100))
        });
        assert!(
            done,
            "source: {}\ntarget: {}",
            on_source.text(),
            on_target.text()
        );
        target.stop();
        target.wait();
    });
    let (before, after) = (on_source.text(), on_target.text());
    program.assert_same_after(&before, &after);
    eprintln!("MSRs checked: {chosen:x?}, TSC deadline: {deadline}");
}

/// A kit guest in a `veil run` (with an API socket) and a `veil receive` waiting for it, over
/// a UNIX socket, each with its serial output in a file.
struct SourceAndTarget {
    dir: common::TempDir,
    source_api: std::path::PathBuf,
    target_socket: std::path::PathBuf,
    _source: common::Spawned,
    target: common::Spawned,
}

impl SourceAndTarget {
    /// Starts both; returns once the guest printed `ready`.
    fn start(
        name: &str,
        (cmdline, ready): (&str, &str),
        source_args: &[&str],
        target_args: &[&str],
        target_env: &[(&str, &str)],
    ) -> Self {
        let dir = common::TempDir::new(name);
        let (source_api, target_socket) = (dir.path("a.sock"), dir.path("m.sock"));
        let serial = |side: &str| format!("file:{}", dir.path(side).display());
        let target = common::veil()
            .arg("receive")
            .arg("--listen")
            .arg(format!("unix:{}", target_socket.display()))
            .args(target_args)
            .args(["--serial", &serial("target.txt")])
            .envs(target_env.iter().copied())
            .stderr(Stdio::null())
            .spawn()
            .map(common::Spawned)
            .unwrap();
        common::wait_for(&target_socket);
        let source = common::veil()
            .args(["run", "--memory", "32M", "--api-socket"])
            .arg(&source_api)
            .args(source_args)
            .args(["--serial", &serial("source.txt"), "--cmdline", cmdline])
            .arg("--kernel")
            .arg(common::kit())
            .stderr(Stdio::null())
            .spawn()
            .map(common::Spawned)
            .unwrap();
        let pair = Self {
            dir,
            source_api,
            target_socket,
            _source: source,
            target,
        };
        assert!(
            pair.wait_for_serial("source.txt", |text| text.contains(ready)),
            "{}",
            pair.serial("source.txt")
        );
        pair
    }

    fn serial(&self, side: &str) -> String {
        std::fs::read_to_string(self.dir.path(side)).unwrap_or_default()
    }

    /// Waits up to 30 s for `side`'s serial output to satisfy `done`.
    fn wait_for_serial(&self, side: &str, done: impl Fn(&str) -> bool) -> bool {
        (0..300).any(|_| {
            let ok = done(&self.serial(side));
            if !ok {
                std::thread::sleep(Duration::from_millis(100));
            }
            ok
        })
    }

    /// `veil ctl migrate`s the guest; returns whether it succeeded, what `migrate` printed, and
    /// the source's state afterwards ("migrated" once it let go; otherwise the source is shut
    /// down and the target waited for).
    fn migrate(&mut self) -> (bool, String, String) {
        let to = format!("unix:{}", self.target_socket.display());
        let out = common::ctl(&self.source_api, &["migrate", "--to", &to]);
        let said = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            return (true, said, "migrated".to_owned());
        }
        let state = common::status(&self.source_api)["state"].to_string();
        common::ctl(&self.source_api, &["shutdown"]);
        self.target.wait();
        (false, said, state)
    }
}

/// Starts a spinning kit guest with `veil run` (plus `source_args`) and `veil ctl migrate`s it to
/// a `veil receive` with `target_args` and `target_env`; see [`SourceAndTarget::migrate`].
fn migrate_between(
    name: &str,
    source_args: &[&str],
    target_args: &[&str],
    target_env: &[(&str, &str)],
) -> (bool, String, String) {
    let guest = ("greet spin", "Hello");
    SourceAndTarget::start(name, guest, source_args, target_args, target_env).migrate()
}

/// One `kvmclock:` line of the kit's `kvmclock-watch`.
#[derive(Debug, Clone, Copy)]
struct KvmclockLine {
    ns: u64,
    tsc: u64,
    mul: u64,
    shift: i64,
}

fn kvmclock_lines(text: &str) -> Vec<KvmclockLine> {
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.strip_prefix("kvmclock: ")?.split(' ').collect();
            let [ns, "ns", "tsc", tsc, "mul", mul, "shift", shift] = words[..] else {
                return None;
            };
            Some(KvmclockLine {
                ns: ns.parse().ok()?,
                tsc: tsc.parse().ok()?,
                mul: u64::from_str_radix(mul.strip_prefix("0x")?, 16).ok()?,
                shift: shift.parse().ok()?,
            })
        })
        .collect()
}

#[test]
fn kvmclock_and_the_tsc_run_on_across_a_migration_between_two_veils() {
    const CLOCK_GPA: u64 = 0x81_0000;
    let cmdline =
        format!("kvmclock-on:gpa={CLOCK_GPA:#x} kvmclock-watch:gpa={CLOCK_GPA:#x},every_ms=20");
    let mut pair = SourceAndTarget::start("kvmclock", (&cmdline, "kvmclock: "), &[], &[], &[]);
    // A few readings on the source first.
    assert!(pair.wait_for_serial("source.txt", |t| kvmclock_lines(t).len() >= 3));
    let (migrated, said, _) = pair.migrate();
    assert!(migrated, "{said}");
    assert!(
        pair.wait_for_serial("target.txt", |t| kvmclock_lines(t).len() >= 3
            || t.contains("error")),
        "{}",
        pair.serial("target.txt")
    );
    let (source_text, target_text) = (pair.serial("source.txt"), pair.serial("target.txt"));
    assert!(!target_text.contains("error"), "{target_text}");
    let (before, after) = (kvmclock_lines(&source_text), kvmclock_lines(&target_text));
    let (last, first) = (before[before.len() - 1], after[0]);
    // The guest's watch saw nothing go back on either host; across the move too:
    assert!(
        first.ns > last.ns && first.tsc > last.tsc,
        "last on the source {last:?}, first on the target {first:?}"
    );
    // One host, one TSC rate: the target publishes the scale the source did.
    assert_eq!((first.mul, first.shift), (last.mul, last.shift));
    // Time goes on at the same rate after the move.
    let (a, b) = (after[0], after[after.len() - 1]);
    let ns_per_tick = (b.ns - a.ns) as f64 / (b.tsc - a.tsc) as f64;
    let (c, d) = (before[0], last);
    let ns_per_tick_before = (d.ns - c.ns) as f64 / (d.tsc - c.tsc) as f64;
    assert!(
        (ns_per_tick / ns_per_tick_before - 1.0).abs() < 0.01,
        "{ns_per_tick_before} ns a tick before, {ns_per_tick} after"
    );
    eprintln!(
        "kvmclock {} -> {} ns across the move ({} ms), mul {:#x} shift {}",
        last.ns,
        first.ns,
        (first.ns - last.ns) / 1_000_000,
        first.mul,
        first.shift
    );
}

#[test]
fn a_target_with_another_tsc_rate_refuses_an_invariant_tsc_guest_naming_both_rates() {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let cpuid = veil_hypervisor::cpuid::Cpuid::supported(&kvm).unwrap();
    if !veil_hypervisor::vcpu::tsc::is_invariant(&cpuid) {
        eprintln!("skipped: this host offers guests no invariant TSC");
        return;
    }
    let host_khz = kvm
        .create_vm()
        .and_then(|vm| vm.create_vcpu(0))
        .and_then(|vcpu| vcpu.get_tsc_khz())
        .unwrap();
    // A target whose TSC runs, it says, at 1 GHz, and that cannot scale.
    let pretend = [(PRETEND_TSC_KHZ_VAR, "1000000")];
    let (migrated, said, state) = migrate_between("tsc-rate", &[], &[], &pretend);
    assert!(!migrated, "{said}");
    assert!(
        // Refused at the Hello, before any memory was sent.
        said.contains(&format!(
            "The target refused the guest: The guest has an invariant TSC at {host_khz} kHz, this host's runs at 1000000 kHz \
             and its KVM cannot scale TSCs"
        )),
        "{said}"
    );
    assert_eq!(state, "\"running\"");
    // A baseline guest has no invariant TSC: it keeps time by kvmclock and is taken.
    let (migrated, said, _) =
        migrate_between("tsc-rate-v2", &["--cpu-model", "x86-64-v2"], &[], &pretend);
    assert!(migrated, "{said}");
}

#[test]
fn a_baseline_target_refuses_a_guest_given_more_and_takes_a_baseline_guest() {
    let baseline = ["--cpu-model", "x86-64-v2"];
    let (migrated, said, state) = migrate_between("cpu-model", &[], &baseline, &[]);
    assert!(!migrated, "{said}");
    assert!(
        said.contains(
            "The target refused the guest: this host's CPU (as x86-64-v2) lacks features the \
             guest was given: leaf 0x"
        ) && said.contains(" bits 0x"),
        "{said}"
    );
    assert_eq!(state, "\"running\"");
    let (migrated, said, _) = migrate_between("cpu-model-v2", &baseline, &baseline, &[]);
    assert!(migrated, "{said}");
}
