//! What a guest tells Veil through the page-encryption hypercall and the migration-control MSR,
//! and what the operator then sees in `status`.

mod common;

use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use common::TempDir;
use serde_json::Value;
use veil::api::{ApiClient, ApiServer, Request};
use veil::{CapturedOutput, VmBuilder, VmStop};

/// A kit guest with encrypted memory (the paravirtual state of an SEV guest) and its API.
struct Guest {
    vm: Arc<veil::Vm>,
    serial: CapturedOutput,
    api: ApiServer,
    socket: std::path::PathBuf,
    _dir: TempDir,
}

impl Guest {
    fn start(name: &str, encrypted: bool, cmdline: &str) -> Self {
        let dir = TempDir::new(name);
        let socket = dir.path("api.sock");
        let serial = CapturedOutput::new();
        let vm = Arc::new(
            VmBuilder::new()
                .kernel(veil_guests::kit_elf_path())
                .cmdline(cmdline)
                .memory_bytes(64 << 20)
                .encrypted_memory(encrypted)
                .serial_writer(serial.clone())
                .start()
                .expect("VM starts"),
        );
        let api = ApiServer::start(&socket, Arc::clone(&vm)).unwrap();
        Self {
            vm,
            serial,
            api,
            socket,
            _dir: dir,
        }
    }

    /// Waits until the guest printed `text` (the guest runs emulated: allow seconds).
    fn wait_for(&self, text: &str) {
        let printed = self.serial.wait_for(text, Duration::from_secs(30));
        assert!(
            printed,
            "guest never printed {text:?} (stop: {:?}); it printed:\n{}",
            self.vm.inner().control().stop_reason(),
            self.serial.text()
        );
    }

    fn status(&self) -> Value {
        let response = ApiClient::connect(&self.socket)
            .unwrap()
            .request(&Request::Status)
            .unwrap();
        assert!(response.ok, "{response:?}");
        response.result.unwrap()
    }

    fn stop(self) {
        self.vm.stop();
        assert_eq!(self.vm.wait(), VmStop::Requested);
        drop(self.api);
    }
}

fn shared_ranges(status: &Value) -> Vec<(u64, u64)> {
    status["page_states"]["shared_ranges"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_u64().unwrap(), r[1].as_u64().unwrap()))
        .collect()
}

#[test]
fn sharing_and_reprivatising_is_what_status_shows() {
    let g = Guest::start(
        "share",
        true,
        "hypercall:gpa=0x400000,pages=16,attrs=0,expect=0 \
         hypercall:gpa=0x404000,pages=4,attrs=0x10,expect=0 \
         hypercall:gpa=0x800000,pages=512,attrs=1,expect=0 \
         hypercall:gpa=0x800000,pages=1,attrs=0x10,expect=0 \
         msr-write:value=1 greet spin",
    );
    g.wait_for("Hello");
    let s = g.status();
    // 0x400..0x410 shared, then 0x404..0x408 back to private; a 2 MiB range, its first page private again.
    assert_eq!(
        shared_ranges(&s),
        vec![(0x400, 0x404), (0x408, 0x410), (0x801, 0xa00)]
    );
    assert_eq!(s["page_states"]["shared_pages"], 4 + 8 + 511);
    assert_eq!(s["migratability"]["state"], "migratable");
    assert_eq!(s["migration_control"], 1);
    g.stop();
}

#[test]
fn every_bad_argument_gets_einval_and_nothing_is_applied() {
    let g = Guest::start(
        "einval",
        true,
        "hypercall:gpa=0x400001,pages=1,expect=-22 \
         hypercall:gpa=0x400000,pages=0,expect=-22 \
         hypercall:gpa=0xfffffffffffff000,pages=2,expect=-22 \
         hypercall:gpa=0x3fff000,pages=2,expect=-22 \
         hypercall:gpa=0x100000000,pages=1,expect=-22 \
         hypercall:nr=99,gpa=0x400000,pages=1,expect=-1000 \
         greet spin",
    );
    g.wait_for("Hello");
    let s = g.status();
    assert_eq!(
        s["page_states"]["shared_pages"], 0,
        "a refused call changes nothing"
    );
    // The range that ran off the end of RAM (64 MiB = gfn 0x4000) was partly RAM: the guest
    // may have changed a page Veil could not record, so the map is no longer trusted.
    assert_eq!(s["migratability"]["state"], "permanently-blocked");
    let reason = &s["migratability"]["reasons"][0];
    assert_eq!(reason["reason"]["kind"], "page-state-untrusted");
    assert_eq!(reason["vcpu"], 0);
    g.stop();
}

#[test]
fn reserved_attribute_bits_are_refused_and_taint_the_map() {
    let g = Guest::start(
        "attrs",
        true,
        "hypercall:gpa=0x400000,pages=1,attrs=0x20,expect=-22 greet spin",
    );
    g.wait_for("Hello");
    let s = g.status();
    assert_eq!(s["page_states"]["shared_pages"], 0);
    assert_eq!(
        s["migratability"]["reasons"][0]["reason"]["kind"],
        "page-state-untrusted"
    );
    g.stop();
}

#[test]
fn ready_set_and_cleared_is_migratable_then_temporarily_blocked() {
    let g = Guest::start(
        "ready",
        true,
        "msr-read:expect=0 msr-write:value=1 msr-write:value=0 greet spin",
    );
    g.wait_for("Hello");
    let s = g.status();
    assert_eq!(s["migratability"]["state"], "temporarily-blocked");
    let reason = &s["migratability"]["reasons"][0];
    assert_eq!(reason["reason"]["kind"], "guest-not-ready");
    assert_eq!(reason["vcpu"], 0, "the vCPU that cleared READY");
    assert!(reason["since"].as_f64().unwrap() > 1.7e9);
    let changes: Vec<&str> = s["blocker_events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["change"].as_str().unwrap())
        .collect();
    assert_eq!(changes.len(), 3, "{changes:?}");
    assert!(changes[1].starts_with("unblocked"), "{changes:?}");
    assert!(changes[2].starts_with("blocked temporarily"), "{changes:?}");
    g.stop();
}

#[test]
fn a_guest_can_ask_never_to_be_migrated_and_cannot_take_it_back() {
    let g = Guest::start(
        "never",
        true,
        "msr-write:value=1 msr-write:value=0x2a03 msr-write:value=1 msr-read:expect=0x2a03 greet spin",
    );
    g.wait_for("Hello");
    let s = g.status();
    assert_eq!(s["migratability"]["state"], "permanently-blocked");
    let reason = &s["migratability"]["reasons"][0];
    assert_eq!(reason["reason"]["kind"], "guest-requested-never");
    assert_eq!(reason["reason"]["code"], 42);
    assert!(reason["message"]
        .as_str()
        .unwrap()
        .contains("reason code 42"));
    g.stop();
}

#[test]
fn a_reset_guest_comes_back_all_private_and_temporarily_blocked() {
    let g = Guest::start(
        "reset",
        true,
        "hypercall:gpa=0x400000,pages=8,expect=0 msr-write:value=0x0503 reset msr-read:expect=0 greet spin",
    );
    g.wait_for("Hello");
    assert!(g.serial.text().contains("veil-kit: resumed after reset"));
    let s = g.status();
    assert_eq!(s["page_states"]["shared_pages"], 0);
    assert_eq!(s["migratability"]["state"], "temporarily-blocked");
    assert_eq!(s["migration_control"], 0);
    g.stop();
}

#[test]
fn a_hostile_guest_alternating_pages_keeps_the_map_within_one_bit_per_page() {
    let g = Guest::start(
        "hostile",
        true,
        "share-alternate:first=0x800,count=4000 greet spin",
    );
    g.wait_for("Hello");
    let s = g.status();
    let p = &s["page_states"];
    assert_eq!(p["shared_pages"], 2000);
    assert_eq!(p["shared_runs"], 2000);
    let bound = p["gfn_count"].as_u64().unwrap().div_ceil(8) + 64;
    assert!(p["map_bytes"].as_u64().unwrap() <= bound, "{p}");
    assert_eq!(
        p["shared_ranges"].as_array().unwrap().len(),
        64,
        "listing is capped, counts are not"
    );
    g.stop();
}

#[test]
fn a_plain_guest_has_no_map_and_starts_migratable() {
    let g = Guest::start(
        "plain",
        false,
        "msr-read:expect=1 hypercall:gpa=0x400000,pages=1,expect=0 greet spin",
    );
    g.wait_for("Hello");
    let s = g.status();
    assert!(s["page_states"].is_null());
    assert_eq!(s["migratability"]["state"], "migratable");
    g.stop();
}

#[test]
fn a_reserved_control_bit_is_a_fault_that_stops_the_guest_with_its_rip() {
    let capture = CapturedOutput::new();
    let vm = VmBuilder::new()
        .kernel(veil_guests::kit_elf_path())
        .cmdline("msr-write:value=0x4")
        .memory_bytes(64 << 20)
        .encrypted_memory(true)
        .serial_writer(capture)
        .start()
        .unwrap();
    match vm.wait() {
        // #GP with no IDT: an emulation failure or a triple fault, at the wrmsr (0f 30).
        VmStop::Fault(report) => assert!(report.to_string().contains("0f 30"), "{report}"),
        other => panic!("expected a fault, got {other}"),
    }
}

#[test]
fn veil_ctl_reads_status_pauses_resumes_and_shuts_down() {
    let dir = TempDir::new("ctl");
    let socket = dir.path("api.sock");
    let mut child = common::veil()
        .args([
            "run",
            "--memory",
            "32M",
            "--api-socket",
            socket.to_str().unwrap(),
            "--kernel",
        ])
        .arg(common::kit())
        .args(["--cmdline", "msr-write:value=0 greet spin"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    common::read_until(&mut stdout, "Hello");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );

    let out = common::ctl(&socket, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(text.contains("state              running"), "{text}");
    assert!(
        text.contains("temporarily blocked: the guest has not set KVM_MIGRATION_READY since"),
        "{text}"
    );
    assert!(text.contains("vCPU 0"), "{text}");
    assert!(text.contains("page states        none"), "{text}");

    assert_eq!(
        String::from_utf8_lossy(&common::ctl(&socket, &["pause"]).stdout).trim(),
        "paused"
    );
    let json: Value =
        serde_json::from_slice(&common::ctl(&socket, &["--json", "status"]).stdout).unwrap();
    assert_eq!(json["state"], "paused");
    assert_eq!(
        String::from_utf8_lossy(&common::ctl(&socket, &["resume"]).stdout).trim(),
        "running"
    );

    // A malformed request gets an error response and the VM carries on.
    let mut raw = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    raw.write_all(b"{\"command\":\"frobnicate\"}\n").unwrap();
    let mut answer = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&raw), &mut answer).unwrap();
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["ok"], false);
    assert!(answer["error"]
        .as_str()
        .unwrap()
        .starts_with("Malformed request"));

    assert_eq!(
        String::from_utf8_lossy(&common::ctl(&socket, &["shutdown"]).stdout).trim(),
        "stopping"
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "stopped on request");
    let out = common::ctl(&socket, &["status"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Cannot connect to the API socket"));
}
