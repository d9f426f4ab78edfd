//! Veil embedded as a library: build, run, capture, pause, resume, stop.

use std::time::Duration;

use veil::{CapturedOutput, RunState, VmBuilder, VmStop};

fn kit_vm(cmdline: &str, capture: &CapturedOutput) -> veil::Vm {
    VmBuilder::new()
        .kernel(veil_guests::kit_elf_path())
        .cmdline(cmdline)
        .memory_bytes(32 << 20)
        .serial_writer(capture.clone())
        .start()
        .expect("VM starts")
}

#[test]
fn captures_the_greeting_and_the_exit_status() {
    let capture = CapturedOutput::new();
    let vm = kit_vm("greet exit:code=3", &capture);
    assert_eq!(vm.wait(), VmStop::GuestExit(3));
    assert_eq!(capture.text(), "Hello from the Veil guest kit!\n");
    assert_eq!(vm.state(), RunState::Stopped);
}

#[test]
fn a_missing_kernel_is_an_error_not_a_panic() {
    let err = VmBuilder::new().start().err().expect("no kernel");
    assert!(err.to_string().contains("No kernel given"));
    let err = VmBuilder::new()
        .kernel("/nonexistent")
        .start()
        .err()
        .expect("missing kernel");
    assert!(err.to_string().contains("Cannot read kernel /nonexistent"));
}

#[test]
fn a_running_guest_pauses_resumes_and_stops() {
    let capture = CapturedOutput::new();
    let vm = kit_vm("greet spin", &capture);
    // Wait for the guest to be past its greeting, so it is spinning in the guest.
    let greeted = capture.wait_for("Hello", Duration::from_secs(20));
    assert!(greeted, "no greeting: {:?}", capture.text());
    assert_eq!(vm.pause(), RunState::Paused);
    let states = vm
        .inner()
        .save_vcpu_states()
        .expect("paused vCPUs can be saved");
    let rip = states[0].regs.rip;
    // The kit runs above 1 MiB in long mode.
    assert!(rip >= 0x10_0000, "rip {rip:#x}");
    assert_ne!(states[0].sregs.efer & (1 << 10), 0, "long mode active");
    // Saved state round-trips through serde, as migration will use it.
    let json = serde_json::to_string(&states[0]).unwrap();
    let back: veil_hypervisor::vcpu::VcpuState = serde_json::from_str(&json).unwrap();
    assert_eq!(back.regs.rip, rip);
    vm.inner().restore_vcpu_states(&[back]).unwrap();
    let platform = vm.inner().save_platform_state().unwrap();
    let platform: veil_hypervisor::platform::PlatformState =
        serde_json::from_str(&serde_json::to_string(&platform).unwrap()).unwrap();
    vm.inner().restore_platform_state(&platform).unwrap();
    assert_eq!(vm.resume(), RunState::Running);
    // Saving needs a paused VM: a running one is refused, not read mid-flight.
    assert!(vm.inner().save_vcpu_states().is_err());
    vm.stop();
    assert_eq!(vm.wait(), VmStop::Requested);
}

#[test]
fn the_api_server_shuts_down_even_if_its_socket_file_was_removed() {
    let capture = CapturedOutput::new();
    let vm = std::sync::Arc::new(kit_vm("greet spin", &capture));
    let path = std::env::temp_dir().join(format!("veil-api-gone-{}.sock", std::process::id()));
    let server = veil::api::ApiServer::start(&path, vm.clone()).unwrap();
    std::fs::remove_file(&path).unwrap();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        drop(server);
        let _ = done.send(());
    });
    assert!(
        finished.recv_timeout(Duration::from_secs(5)).is_ok(),
        "dropping the server hung"
    );
    vm.stop();
    vm.wait();
}
