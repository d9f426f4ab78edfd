//! The whole vCPU travels: MSRs the guest wrote, the CPUID it sees, its TSC rate; and a
//! target that cannot give the guest what it had refuses it, saying what is missing.

mod common;

use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::Duration;

use veil::{CapturedOutput, RunState, VmBuilder, VmStop};
use veil_hypervisor::cpuid::Cpuid;
use veil_hypervisor::vcpu::tsc::PRETEND_TSC_KHZ_VAR;
use veil_migration::receiver;
use veil_migration::sender::{self, SendOptions};
use vm_memory::{Bytes, GuestAddress};

/// The word the guest waits on after writing its MSRs: the test sets it once the guest has
/// landed on the target.
const GO_GPA: u64 = 0x80_0000;
const GO: u64 = 0x6c61_6e64_6564;

/// MSRs and values the guest writes before the move and reads back after it. Canonical
/// addresses where the MSR holds one; a PAT whose every byte is a valid memory type and whose
/// entries 0 (WB) and 3 (UC) stay what the kit's page tables rely on.
fn chosen_msrs(cpuid: &Cpuid, listed: &[u32]) -> Vec<(u32, u64)> {
    let mut chosen = vec![
        (0xc000_0081, 0x0023_0010_0000_0000), // MSR_STAR
        (0xc000_0082, 0xffff_ffff_8160_0000), // MSR_LSTAR
        (0xc000_0083, 0xffff_ffff_8160_1000), // MSR_CSTAR
        (0xc000_0084, 0x0004_7700),           // MSR_SYSCALL_MASK
        (0xc000_0102, 0xffff_8880_1234_5000), // MSR_KERNEL_GS_BASE
        (0x0000_0277, 0x0007_0506_0007_0106), // MSR_IA32_CR_PAT
    ];
    let has = |function, index, register: fn(&kvm_bindings::kvm_cpuid_entry2) -> u32, bit: u32| {
        cpuid
            .entry(function, index)
            .is_some_and(|e| register(e) & (1 << bit) != 0)
    };
    // MSR_TSC_AUX with RDTSCP (0x80000001 EDX 27) or RDPID (7.0 ECX 22).
    if has(0x8000_0001, 0, |e| e.edx, 27) || has(7, 0, |e| e.ecx, 22) {
        chosen.push((0xc000_0103, 0x2a));
    }
    // MSR_IA32_TSC_ADJUST with CPUID 7.0 EBX bit 1.
    if has(7, 0, |e| e.ebx, 1) {
        chosen.push((0x3b, 0x1_0000));
    }
    // MSR_KVM_POLL_CONTROL with KVM_FEATURE_POLL_CONTROL (0x40000001 EAX bit 12); 1 at reset.
    if has(0x4000_0001, 0, |e| e.eax, 12) {
        chosen.push((0x4b56_4d05, 0));
    }
    // Only what this host's KVM knows (a guest write of an MSR it does not know faults).
    chosen.retain(|(index, _)| listed.contains(index));
    chosen
}

#[test]
fn msrs_the_guest_wrote_its_tsc_deadline_and_the_cpuid_it_sees_are_the_same_after_a_migration() {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let cpuid = Cpuid::supported(&kvm).unwrap();
    // KVM's own list, not Veil's choice from it: an MSR Veil failed to save must fail here.
    let listed = kvm.get_msr_index_list().unwrap().as_slice().to_vec();
    let chosen = chosen_msrs(&cpuid, &listed);
    let writes: Vec<String> = chosen
        .iter()
        .map(|(i, v)| format!("msr-write:index={i:#x},value={v:#x}"))
        .collect();
    let reads: Vec<String> = chosen
        .iter()
        .map(|(i, v)| format!("msr-read:index={i:#x},expect={v:#x}"))
        .collect();
    // A masked LAPIC timer in TSC-deadline mode, due in about an hour: KVM drops the deadline
    // unless the LAPIC is restored before it.
    let deadline = cpuid.entry(1, 0).is_some_and(|e| e.ecx & (1 << 24) != 0);
    let (arm, check) = if deadline {
        ("deadline-arm:ahead=0x80000000000", "deadline-check")
    } else {
        ("", "")
    };
    let cmdline = format!(
        "{} {arm} cpuid-hash wait-word:gpa={GO_GPA:#x},value={GO:#x} {} {check} cpuid-hash \
         greet spin",
        writes.join(" "),
        reads.join(" ")
    );
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
        let shape = incoming.shape().clone();
        let target = VmBuilder::new()
            .memory_bytes(shape.ram_bytes())
            .guest_cpuid(shape.cpuid().iter().map(Into::into).collect())
            .serial_writer(on_target.clone())
            .start_incoming(Box::new(|mem, fw| Ok(incoming.receive_into(mem, fw)?)))
            .unwrap();
        incoming.acknowledge().unwrap();
        incoming.wait_complete().unwrap();
        sending.join().unwrap().expect("migration succeeds");
        assert_eq!(source.wait(), VmStop::Migrated);
        // The target gives the guest exactly the CPUID it had.
        assert_eq!(target.inner().cpuid(), source.inner().cpuid());
        target.memory().write_obj(GO, GuestAddress(GO_GPA)).unwrap();
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
    for (index, value) in &chosen {
        let read = format!("msr {index:#x}: msr-read ok: {value:#x}");
        assert!(after.contains(&read), "{read} not in\n{after}");
    }
    if deadline {
        assert!(before.contains("deadline-arm ok"), "{before}");
        assert!(after.contains("deadline-check ok"), "{after}");
    }
    let hash = |text: &str| {
        text.lines()
            .find(|l| l.starts_with("cpuid-hash: "))
            .map(str::to_owned)
    };
    assert!(hash(&before).is_some(), "{before}");
    assert_eq!(
        hash(&before),
        hash(&after),
        "source:\n{before}\ntarget:\n{after}"
    );
    eprintln!(
        "MSRs checked: {chosen:x?}, TSC deadline: {deadline}; {}",
        hash(&after).unwrap()
    );
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
        said.contains(&format!(
            "The guest has an invariant TSC at {host_khz} kHz, this host's runs at 1000000 kHz \
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
