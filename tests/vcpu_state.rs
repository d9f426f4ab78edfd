//! The whole vCPU travels: MSRs the guest wrote, the CPUID it sees, its TSC rate; and a
//! target that cannot give the guest what it had refuses it, saying what is missing.

mod common;

use std::process::Stdio;

use veil_hypervisor::vcpu::tsc::PRETEND_TSC_KHZ_VAR;

#[test]
fn a_target_with_another_tsc_rate_refuses_an_invariant_tsc_guest_naming_both_rates() {
    let kvm = kvm_ioctls::Kvm::new().unwrap();
    let cpuid = veil_hypervisor::cpuid::Cpuid::supported(&kvm).unwrap();
    if !veil_hypervisor::vcpu::tsc::is_invariant(&cpuid) {
        eprintln!("skipped: this host offers guests no invariant TSC");
        return;
    }
    let dir = common::TempDir::new("tsc-rate");
    let (source_api, target_socket) = (dir.path("a.sock"), dir.path("m.sock"));
    // A target whose TSC runs, it says, at 1 GHz, and that cannot scale.
    let mut target = common::veil()
        .arg("receive")
        .arg("--listen")
        .arg(format!("unix:{}", target_socket.display()))
        .env(PRETEND_TSC_KHZ_VAR, "1000000")
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    common::wait_for(&target_socket);
    let mut source = common::veil()
        .args(["run", "--memory", "32M", "--api-socket"])
        .arg(&source_api)
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
    assert!(!out.status.success(), "{}", common::describe(&out));
    let said = String::from_utf8_lossy(&out.stderr);
    let host_khz = kvm
        .create_vm()
        .and_then(|vm| vm.create_vcpu(0))
        .and_then(|vcpu| vcpu.get_tsc_khz())
        .unwrap();
    assert!(
        said.contains(&format!(
            "The guest has an invariant TSC at {host_khz} kHz, this host's runs at 1000000 kHz \
             and its KVM cannot scale TSCs"
        )),
        "{said}"
    );
    assert_eq!(common::status(&source_api)["state"], "running");
    common::ctl(&source_api, &["shutdown"]);
    source.wait();
    target.wait();
}
