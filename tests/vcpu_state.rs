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

/// Starts a kit guest with `veil run` (plus `source_args`) and `veil ctl migrate`s it to a
/// `veil receive` with `target_args` and `target_env`; returns what `migrate` printed and
/// whether it succeeded, and the source's state afterwards ("migrated" once it let go).
fn migrate_between(
    name: &str,
    source_args: &[&str],
    target_args: &[&str],
    target_env: &[(&str, &str)],
) -> (bool, String, String) {
    let dir = common::TempDir::new(name);
    let (source_api, target_socket) = (dir.path("a.sock"), dir.path("m.sock"));
    let mut target = common::veil()
        .arg("receive")
        .arg("--listen")
        .arg(format!("unix:{}", target_socket.display()))
        .args(target_args)
        .args(["--serial", "null"])
        .envs(target_env.iter().copied())
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    common::wait_for(&target_socket);
    let mut source = common::veil()
        .args(["run", "--memory", "32M", "--api-socket"])
        .arg(&source_api)
        .args(source_args)
        .args(["--cmdline", "greet spin", "--kernel"])
        .arg(common::kit())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    common::read_until(source.0.stdout.as_mut().unwrap(), "Hello");
    let to = format!("unix:{}", target_socket.display());
    let out = common::ctl(&source_api, &["migrate", "--to", &to]);
    let said = String::from_utf8_lossy(&out.stderr).into_owned();
    let state = if out.status.success() {
        // The source let the guest go and exits; the guest runs on the target, which is
        // ended with the test.
        "migrated".to_owned()
    } else {
        let state = common::status(&source_api)["state"].to_string();
        common::ctl(&source_api, &["shutdown"]);
        target.wait();
        state
    };
    (out.status.success(), said, state)
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
