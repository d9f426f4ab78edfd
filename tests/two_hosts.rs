//! Two hosts on one machine: two network namespaces joined by a veth pair, a `veil` in each,
//! and a guest migrating between them over mutual TLS, there and back, with its RAM in files
//! the test checks after every landing; then what must happen when things go wrong. Needs root
//! (skipped, with the reason, without).

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::tls::Ca;
use veil_guest_abi::page_stamp;
use veil_migration::tls::TlsFiles;

const A_ADDR: &str = "10.77.0.1";
const B_ADDR: &str = "10.77.0.2";
const GUEST_RAM: u64 = 32 << 20;
/// Pages the test fills with its pattern and checks on every landing: above the kit's image.
const CHECKED: std::ops::Range<u64> = 0x1000..0x2000;
/// Pages the guest keeps stamping (seed `SEED`), inside the checked ones.
const STAMPED_FIRST: u64 = 0x1800;
const STAMPED_COUNT: u64 = 256;
const SEED: u64 = 0x5eed;
/// Pages an SEV guest shares (then stamps with `SHARED_SEED`), inside the checked ones.
const SHARED_FIRST: u64 = 0x1100;
const SHARED_COUNT: u64 = 4;
const SHARED_SEED: u64 = 0x5a;

/// Two namespaces, A (10.77.0.1) and B (10.77.0.2), removed when dropped.
struct TwoHosts {
    a: String,
    b: String,
    /// The veth end in A.
    va: String,
    dir: common::TempDir,
    /// Each host's TLS identity, from one CA.
    tls_a: TlsFiles,
    tls_b: TlsFiles,
}

/// Tests in one process each get their own pair of hosts.
static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2) runs");
    assert!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl TwoHosts {
    fn new() -> Self {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let id = format!("{}x{n}", std::process::id());
        let (a, b) = (format!("veil-a-{id}"), format!("veil-b-{id}"));
        // Interface names are at most 15 bytes.
        let (va, vb) = (format!("va{id}"), format!("vb{id}"));
        let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
        ip(&["netns", "add", &a]);
        ip(&["netns", "add", &b]);
        let dir = common::TempDir::new(&format!("two-hosts-{n}"));
        let ca = Ca::new(&dir.0, "site");
        let hosts = Self {
            a: a.clone(),
            b: b.clone(),
            va: va.to_string(),
            tls_a: ca.host(&dir.0, "host-a", &[A_ADDR]),
            tls_b: ca.host(&dir.0, "host-b", &[B_ADDR]),
            dir,
        };
        ip(&["link", "add", va, "type", "veth", "peer", "name", vb]);
        ip(&["link", "set", va, "netns", &a]);
        ip(&["link", "set", vb, "netns", &b]);
        ip(&["-n", &a, "addr", "add", &format!("{A_ADDR}/24"), "dev", va]);
        ip(&["-n", &b, "addr", "add", &format!("{B_ADDR}/24"), "dev", vb]);
        for (ns, dev) in [(&a, va), (&b, vb)] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
        hosts
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path(file)
    }

    /// `veil ARGS` inside namespace `ns`.
    fn veil(&self, ns: &str, args: &[String]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_veil")])
            .args(args)
            .env_remove("VEIL_LOG");
        c
    }

    /// Slows A's side of the link, so a migration lasts long enough to break it mid-way.
    fn throttle(&self, rate: &str) {
        ip(&[
            "netns", "exec", &self.a, "tc", "qdisc", "add", "dev", &self.va, "root", "tbf", "rate",
            rate, "burst", "64kb", "latency", "500ms",
        ]);
    }

    fn link_down(&self) {
        ip(&["-n", &self.a, "link", "set", &self.va, "down"]);
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        // Deleting a namespace removes its end of the veth pair, and with it the pair.
        let _ = Command::new("ip").args(["netns", "del", &self.a]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.b]).status();
    }
}

fn root() -> bool {
    // SAFETY: getuid has no preconditions.
    unsafe { libc::getuid() == 0 }
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// The test's pattern: the 64-bit word at byte `offset` of guest RAM (below 3 GiB).
fn pattern(offset: u64) -> u64 {
    page_stamp(0x9a77e54, offset / 8)
}

/// A memory file whose checked pages hold the pattern.
fn patterned_memory_file(path: &Path) {
    let file = File::create(path).unwrap();
    file.set_len(GUEST_RAM).unwrap();
    let start = CHECKED.start * 4096;
    let bytes: Vec<u8> = (start..CHECKED.end * 4096)
        .step_by(8)
        .flat_map(|offset| pattern(offset).to_le_bytes())
        .collect();
    file.write_all_at(&bytes, start).unwrap();
}

/// What word 0 of page `gfn` must hold: a stamp where the guest stamps, else the pattern.
fn first_word(gfn: u64, sev: bool) -> u64 {
    if (STAMPED_FIRST..STAMPED_FIRST + STAMPED_COUNT).contains(&gfn) {
        page_stamp(SEED, gfn)
    } else if sev && (SHARED_FIRST..SHARED_FIRST + SHARED_COUNT).contains(&gfn) {
        page_stamp(SHARED_SEED, gfn)
    } else {
        pattern(gfn * 4096)
    }
}

/// Checks every checked page of a memory file; panics naming the first wrong word.
fn assert_memory_file_holds_the_guest(path: &Path, sev: bool) {
    let file = File::open(path).unwrap();
    let mut page = vec![0u8; 4096];
    for gfn in CHECKED {
        file.read_exact_at(&mut page, gfn * 4096).unwrap();
        for (i, word) in page.chunks_exact(8).enumerate() {
            let found = u64::from_le_bytes(word.try_into().unwrap());
            let offset = gfn * 4096 + i as u64 * 8;
            let expected = if i == 0 {
                first_word(gfn, sev)
            } else {
                pattern(offset)
            };
            assert_eq!(
                found,
                expected,
                "{}: wrong word at guest address {offset:#x}",
                path.display()
            );
        }
    }
}

/// Waits for the guest to report another round of checked stamps on the serial output in
/// `serial`: it runs there, and found its memory as it left it.
fn assert_guest_keeps_checking(serial: &Path) {
    let said = || std::fs::read_to_string(serial).unwrap_or_default();
    let before = said().matches(" checked").count();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = said();
        assert!(!now.contains("FAILED"), "{}: {now}", serial.display());
        if now.matches(" checked").count() > before {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no guest is checking its stamps on {}: {now}",
            serial.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn guest_cmdline(sev: bool) -> String {
    let stamping =
        format!("dirty-loop:seed={SEED},first={STAMPED_FIRST:#x},count={STAMPED_COUNT},check=32");
    if sev {
        // Share some pages and stamp them, declare READY (SEV guests start unready), then
        // keep stamping private pages.
        format!(
            "greet hypercall:gpa={:#x},pages={SHARED_COUNT},attrs=0,expect=0 \
             stamp:seed={SHARED_SEED},first={SHARED_FIRST:#x},count={SHARED_COUNT} \
             msr-write:value=1 {stamping}",
            SHARED_FIRST * 4096
        )
    } else {
        format!("greet {stamping}")
    }
}

/// Options for an emulated SEV platform whose identity lives in `dir`.
fn sev_platform(dir: &Path) -> Vec<String> {
    strings(&["--sev-platform", "emulated", "--sev-state-dir"])
        .into_iter()
        .chain([dir.display().to_string()])
        .collect()
}

/// `veil receive` options for an SEV target whose emulated platform lives in `name`.
fn receive_sev_args(hosts: &TwoHosts, name: &str) -> Vec<String> {
    let mut args = vec!["--sev".to_string()];
    args.extend(sev_platform(&hosts.path(name)));
    args
}

/// `veil ctl migrate` options that make the source trust the target platform `name`, through
/// the chain that platform exports.
fn trust_chain_args(hosts: &TwoHosts, name: &str) -> Vec<String> {
    let chain = hosts.path(&format!("{name}.chain"));
    let out = common::veil()
        .args(["sev", "export-chain", "--out"])
        .arg(&chain)
        .args(sev_platform(&hosts.path(name)))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", common::describe(&out));
    vec!["--sev-trust-chain".into(), chain.display().to_string()]
}

/// Starts the guest on host A from a patterned memory file.
/// `veil run` on A with 32 MiB, its API at `api` and its serial output in `serial`; the
/// caller adds the devices, the command line and the kernel.
fn run_args(api: &Path, serial: &Path) -> Vec<String> {
    let mut args = strings(&["run", "--memory", "32M", "--api-socket"]);
    args.push(api.display().to_string());
    args.push("--serial".into());
    args.push(format!("file:{}", serial.display()));
    args
}

fn start_guest(hosts: &TwoHosts, sev: bool, api: &Path) -> common::Spawned {
    let memory = hosts.path("a.mem");
    patterned_memory_file(&memory);
    let serial = hosts.path("a.out");
    let mut args = run_args(api, &serial);
    args.push("--memory-file".into());
    args.push(memory.display().to_string());
    if sev {
        args.push("--sev".into());
        args.extend(sev_platform(&hosts.path("sev-a")));
    }
    args.extend(strings(&["--cmdline", &guest_cmdline(sev), "--kernel"]));
    args.push(common::kit().display().to_string());
    let source = hosts
        .veil(&hosts.a, &args)
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    wait_for_output(&serial, "stamping");
    source
}

fn wait_for_output(file: &Path, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(file)
        .unwrap_or_default()
        .contains(needle)
    {
        assert!(
            Instant::now() < deadline,
            "{} never said {needle:?}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A `veil receive` in namespace `ns` listening on `addr:port`.
struct Receiver {
    process: common::Spawned,
    api: PathBuf,
    memory: PathBuf,
    stderr: PathBuf,
}

fn receive(hosts: &TwoHosts, ns: &str, addr: &str, name: &str, extra: &[String]) -> Receiver {
    let (api, memory, stderr) = (
        hosts.path(&format!("{name}.sock")),
        hosts.path(&format!("{name}.mem")),
        hosts.path(&format!("{name}.err")),
    );
    let mut args = strings(&["receive", "--listen", &format!("tcp:{addr}:47000")]);
    args.push("--serial".into());
    args.push(format!(
        "file:{}",
        hosts.path(&format!("{name}.out")).display()
    ));
    args.push("--api-socket".into());
    args.push(api.display().to_string());
    args.push("--memory-file".into());
    args.push(memory.display().to_string());
    args.extend_from_slice(extra);
    let process = hosts
        .veil(ns, &args)
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    wait_for_output(&stderr, "waiting for a guest");
    Receiver {
        process,
        api,
        memory,
        stderr,
    }
}

/// `veil ctl migrate` from the VMM at `api` to `addr`.
fn migrate(api: &Path, addr: &str, extra: &[String]) -> std::process::Output {
    let mut args = strings(&["migrate", "--to", &format!("tcp:{addr}:47000")]);
    args.extend_from_slice(extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    common::ctl(api, &args)
}

/// Migrates A -> B -> A over mutual TLS, checking the guest's memory file and that it runs
/// after each landing.
fn there_and_back(sev: bool) {
    let hosts = TwoHosts::new();
    let a_api = hosts.path("a.sock");
    let mut source = start_guest(&hosts, sev, &a_api);
    let before = common::status(&a_api);
    let sev_chain = |name: &str| -> Vec<String> {
        if sev {
            trust_chain_args(&hosts, name)
        } else {
            Vec::new()
        }
    };
    let receiver_sev = |name: &str| -> Vec<String> {
        if sev {
            receive_sev_args(&hosts, name)
        } else {
            Vec::new()
        }
    };

    // A -> B.
    let mut b = receive(
        &hosts,
        &hosts.b,
        B_ADDR,
        "b",
        &[common::tls::args(&hosts.tls_b), receiver_sev("sev-b")].concat(),
    );
    // Over three connections, each its own TLS session; an SEV guest's pages go through its
    // firmware context one at a time, so it gets one whatever is asked.
    let out = migrate(
        &a_api,
        B_ADDR,
        &[
            common::tls::args(&hosts.tls_a),
            sev_chain("sev-b"),
            strings(&["--connections", "3"]),
        ]
        .concat(),
    );
    assert!(out.status.success(), "{}", common::describe(&out));
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("over mutual TLS"), "{report}");
    let over = if sev {
        "over 1 connection,"
    } else {
        "over 3 connections,"
    };
    assert!(report.contains(over), "{report}");
    // Not a terminal: no progress bar in the way of logs.
    assert!(!String::from_utf8_lossy(&out.stderr).contains("ETA"));
    if sev {
        assert!(!report.contains(" 0 private through"), "{report}");
    }
    assert!(source.wait().success(), "A's veil lets the guest go");
    common::wait_for(&b.api);
    assert_memory_file_holds_the_guest(&b.memory, sev);
    assert_guest_keeps_checking(&hosts.path("b.out"));
    let landed = common::status(&b.api);
    assert_eq!(landed["state"], "running");
    assert_eq!(landed["migratability"]["state"], "migratable");
    assert_eq!(
        landed["page_states"], before["page_states"],
        "the map travelled"
    );

    // B -> A, into a new memory file on A.
    let mut back = receive(
        &hosts,
        &hosts.a,
        A_ADDR,
        "a2",
        &[common::tls::args(&hosts.tls_a), receiver_sev("sev-a")].concat(),
    );
    let out = migrate(
        &b.api,
        A_ADDR,
        &[common::tls::args(&hosts.tls_b), sev_chain("sev-a")].concat(),
    );
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(b.process.wait().success(), "B's veil lets the guest go");
    common::wait_for(&back.api);
    assert_memory_file_holds_the_guest(&back.memory, sev);
    assert_guest_keeps_checking(&hosts.path("a2.out"));
    assert_eq!(
        common::status(&back.api)["page_states"],
        before["page_states"]
    );
    common::ctl(&back.api, &["shutdown"]);
    back.process.wait();
}

#[test]
fn a_plain_guest_migrates_there_and_back_over_mutual_tls() {
    if !root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    there_and_back(false);
}

#[test]
fn an_sev_guest_migrates_there_and_back_over_mutual_tls() {
    if !root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    there_and_back(true);
}

/// After a failed migration: the guest still runs on A, from intact memory, and B gave up.
fn assert_guest_stayed_on_a(hosts: &TwoHosts, api: &Path) {
    assert_eq!(common::status(api)["state"], "running");
    assert_memory_file_holds_the_guest(&hosts.path("a.mem"), false);
    assert_guest_keeps_checking(&hosts.path("a.out"));
}

#[test]
fn a_source_with_an_untrusted_certificate_gets_nothing_across() {
    if !root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let hosts = TwoHosts::new();
    let a_api = hosts.path("a.sock");
    let _source = start_guest(&hosts, false, &a_api);
    let mut b = receive(
        &hosts,
        &hosts.b,
        B_ADDR,
        "b",
        &common::tls::args(&hosts.tls_b),
    );
    let rogue = Ca::new(&hosts.dir.0, "rogue");
    let rogue_a = rogue.host_trusting(&hosts.dir.0, "rogue-a", &[A_ADDR], &hosts.tls_a.ca);
    let out = migrate(&a_api, B_ADDR, &common::tls::args(&rogue_a));
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("refused this host's TLS certificate"),
        "{}",
        common::describe(&out)
    );
    assert_guest_stayed_on_a(&hosts, &a_api);
    // The target turned the rogue away, and still waits for the real source.
    wait_for_output(&b.stderr, "Rejected a connection from 10.77.0.1");
    assert!(b.process.0.try_wait().unwrap().is_none());
    let out = migrate(&a_api, B_ADDR, &common::tls::args(&hosts.tls_a));
    assert!(out.status.success(), "{}", common::describe(&out));
    common::wait_for(&b.api);
    assert_memory_file_holds_the_guest(&b.memory, false);
    common::ctl(&b.api, &["shutdown"]);
    b.process.wait();
}

/// Polls A's migration phase until it is `phase`.
fn wait_for_phase(api: &Path, phase: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = common::status(api);
        if s["migration"]["phase"] == phase {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the migration never reached {phase}: {}",
            s["migration"]
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Starts a migration A -> B over a throttled link, does `break_it` once the migration is in
/// `phase`, and checks that the guest stayed on A and both sides gave the reason.
fn broken_migration(phase: &str, break_it: impl FnOnce(&TwoHosts, &mut Receiver)) -> String {
    let hosts = TwoHosts::new();
    let a_api = hosts.path("a.sock");
    let _source = start_guest(&hosts, false, &a_api);
    // 16 MiB of patterned pages at 200 Mbit/s: the first pass takes most of a second.
    hosts.throttle("200mbit");
    let mut b = receive(
        &hosts,
        &hosts.b,
        B_ADDR,
        "b",
        &common::tls::args(&hosts.tls_b),
    );
    let migrating = {
        let (api, tls) = (a_api.clone(), common::tls::args(&hosts.tls_a));
        // A large downtime budget sends the stamped pages again with the guest paused.
        std::thread::spawn(move || {
            migrate(
                &api,
                B_ADDR,
                &[tls, strings(&["--downtime-ms", "60000"])].concat(),
            )
        })
    };
    wait_for_phase(&a_api, phase);
    break_it(&hosts, &mut b);
    let out = migrating.join().unwrap();
    assert!(!out.status.success(), "{}", common::describe(&out));
    assert_guest_stayed_on_a(&hosts, &a_api);
    assert_eq!(common::status(&a_api)["migration"]["phase"], "failed");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_target_killed_mid_precopy_leaves_the_guest_on_its_host() {
    if !root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let said = broken_migration("first-pass", |_, b| {
        let _ = b.process.0.kill();
        b.process.wait();
    });
    assert!(said.contains("Migration stream I/O failed"), "{said}");
}

#[test]
fn a_target_killed_mid_stop_and_copy_leaves_the_guest_on_its_host() {
    if !root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let said = broken_migration("stop-and-copy", |_, b| {
        let _ = b.process.0.kill();
        b.process.wait();
    });
    assert!(said.contains("Migration stream I/O failed"), "{said}");
}

#[test]
fn with_the_link_down_mid_migration_the_guest_stays_on_its_host() {
    if !root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    // The source notices when its peer has been silent for the peer timeout (30 s).
    let said = broken_migration("first-pass", |hosts, b| {
        hosts.link_down();
        // The target, too, gives up on a silent source and discards what it received.
        assert!(!b.process.wait().success());
        let why = std::fs::read_to_string(&b.stderr).unwrap();
        assert!(why.contains("Migration stream I/O failed"), "{why}");
        assert!(
            !b.memory.exists(),
            "the memory file of a guest that never arrived is removed"
        );
    });
    assert!(said.contains("Migration stream I/O failed"), "{said}");
}

/// Records the disk-writing guest writes, one sector each: enough that it is still writing
/// when the migration ends.
const DISK_RECORDS: u64 = 60_000;
const DISK_SEED: u64 = 0xd15c;

/// A guest writing numbered records to its disk the whole time migrates from A to B over
/// TLS: every record it wrote on either host is in the file, each in its place, and the guest
/// on B reads them all back. The disk is shared storage: B opens the same file once A has
/// flushed and released it.
fn a_disk_writing_guest_migrates(sev: bool) {
    let hosts = TwoHosts::new();
    let disk = hosts.path("disk.img");
    File::create(&disk)
        .unwrap()
        .set_len(DISK_RECORDS * 512)
        .unwrap();
    let a_api = hosts.path("a.sock");
    let a_out = hosts.path("a.out");
    // It spins when done, so B's status can be read.
    let log = format!("blk-log:dev=0,sector=0,count={DISK_RECORDS},seed={DISK_SEED} spin");
    // An SEV guest starts unmigratable; its driver shares its own rings and buffers.
    let cmdline = if sev {
        format!("greet msr-write:value=1 {log}")
    } else {
        format!("greet {log}")
    };
    let mut args = run_args(&a_api, &a_out);
    args.push("--disk".into());
    args.push(format!("path={},id=log", disk.display()));
    if sev {
        args.push("--sev".into());
        args.extend(sev_platform(&hosts.path("sev-a")));
    }
    args.extend(strings(&["--cmdline", &cmdline, "--kernel"]));
    args.push(common::kit().display().to_string());
    let mut source = hosts
        .veil(&hosts.a, &args)
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    wait_for_output(&a_out, "blk-log: 256 records");

    let mut receiver_args = common::tls::args(&hosts.tls_b);
    let mut migrate_args = common::tls::args(&hosts.tls_a);
    if sev {
        receiver_args.extend(receive_sev_args(&hosts, "sev-b"));
        migrate_args.extend(trust_chain_args(&hosts, "sev-b"));
    }
    let mut b = receive(&hosts, &hosts.b, B_ADDR, "b", &receiver_args);
    let out = migrate(&a_api, B_ADDR, &migrate_args);
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(source.wait().success(), "A's veil lets the guest go");
    let on_a = std::fs::read_to_string(&a_out).unwrap();
    assert!(
        !on_a.contains("blk-log ok"),
        "the guest was still writing when it left A: {on_a}"
    );

    // On B the guest finishes, reads every record back and finds each in its place.
    let b_out = hosts.path("b.out");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(&b_out)
        .unwrap_or_default()
        .contains("blk-log ok")
    {
        let said = std::fs::read_to_string(&b_out).unwrap_or_default();
        assert!(
            !said.contains("FAILED") && Instant::now() < deadline,
            "the guest on B: {said}\n{}",
            std::fs::read_to_string(&b.stderr).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let on_b = std::fs::read_to_string(&b_out).unwrap();
    assert!(
        on_b.contains(&format!(
            "blk-check ok: {DISK_RECORDS} sectors from sector 0"
        )),
        "{on_b}"
    );
    let status = common::status(&b.api);
    assert_eq!(status["devices"][0]["name"], "log");
    assert_eq!(status["devices"][0]["refused_accesses"], 0);
    common::ctl(&b.api, &["shutdown"]);
    b.process.wait();
    // And the host finds every record in the file, each where the guest put it.
    let file = File::open(&disk).unwrap();
    for record in 0..DISK_RECORDS {
        let mut word = [0u8; 8];
        file.read_exact_at(&mut word, record * 512).unwrap();
        assert_eq!(
            u64::from_le_bytes(word),
            page_stamp(DISK_SEED, record),
            "record {record}"
        );
    }
}

#[test]
fn a_plain_guest_writing_its_disk_migrates_without_losing_a_write() {
    if !root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    a_disk_writing_guest_migrates(false);
}

#[test]
fn an_sev_guest_writing_its_disk_migrates_without_losing_a_write() {
    if !root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    a_disk_writing_guest_migrates(true);
}

/// A host program talking to its guest over vsock: the migration resets its connection (the
/// guest hears TRANSPORT_RESET and listens again) and the program reconnects at the same
/// socket path, now served by B, and finishes its exchange there.
#[test]
fn a_vsock_host_program_reconnects_to_its_guest_on_the_target() {
    use std::io::{Read, Write};
    if !root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let hosts = TwoHosts::new();
    let socket = hosts.path("guest.vsock");
    let a_api = hosts.path("a.sock");
    let a_out = hosts.path("a.out");
    let bytes = 64 << 10;
    let mut args = run_args(&a_api, &a_out);
    args.push("--vsock".into());
    args.push(format!("cid=3,socket={}", socket.display()));
    args.extend(strings(&[
        "--cmdline",
        &format!("greet vsock-echo:dev=0,port=52,bytes={bytes} spin"),
        "--kernel",
    ]));
    args.push(common::kit().display().to_string());
    let mut source = hosts
        .veil(&hosts.a, &args)
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    wait_for_output(&a_out, "listening");
    let connect = || {
        veil_devices::virtio::vsock::connect_to_guest(&socket, 52, Duration::from_secs(10))
            .expect("the guest accepts")
            .stream
    };
    // Half the exchange on A.
    let mut on_a = connect();
    on_a.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let half = vec![0x3cu8; bytes / 2];
    on_a.write_all(&half).unwrap();
    let mut back = vec![0u8; half.len()];
    on_a.read_exact(&mut back).unwrap();
    assert_eq!(back, half);

    let mut b = receive(
        &hosts,
        &hosts.b,
        B_ADDR,
        "b",
        &common::tls::args(&hosts.tls_b),
    );
    let out = migrate(&a_api, B_ADDR, &common::tls::args(&hosts.tls_a));
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(source.wait().success());
    // The old connection is gone with A.
    let mut rest = [0u8; 1];
    assert_eq!(
        on_a.read(&mut rest).unwrap_or(0),
        0,
        "the connection to A ended"
    );
    let b_out = hosts.path("b.out");
    wait_for_output(&b_out, "vsock: transport reset");

    // The program reconnects at the same path and does the whole exchange with B.
    let mut on_b = connect();
    on_b.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let mut reader = on_b.try_clone().unwrap();
    let reading = std::thread::spawn(move || {
        let mut got = vec![0u8; bytes];
        reader.read_exact(&mut got).map(|_| got)
    });
    on_b.write_all(&data).unwrap();
    assert!(
        reading.join().unwrap().unwrap() == data,
        "the echo from B differs"
    );
    wait_for_output(&b_out, &format!("echoed {bytes} bytes"));
    let status = common::status(&b.api);
    assert_eq!(status["devices"][0]["kind"], "virtio-vsock");
    assert_eq!(status["devices"][0]["guest_cid"], 3);
    common::ctl(&b.api, &["shutdown"]);
    b.process.wait();
}

#[test]
fn a_guests_msrs_tsc_deadline_and_cpuid_are_the_same_on_the_other_host() {
    if !root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let hosts = TwoHosts::new();
    let program = common::vcpu::StateProgram::for_this_host();
    let (a_api, a_out) = (hosts.path("a.sock"), hosts.path("a.out"));
    let mut args = run_args(&a_api, &a_out);
    args.extend(strings(&["--cmdline", &program.cmdline, "--kernel"]));
    args.push(common::kit().display().to_string());
    let mut source = hosts
        .veil(&hosts.a, &args)
        .stderr(Stdio::null())
        .spawn()
        .map(common::Spawned)
        .unwrap();
    wait_for_output(&a_out, "wait-word: waiting");

    let mut b = receive(
        &hosts,
        &hosts.b,
        B_ADDR,
        "b",
        &common::tls::args(&hosts.tls_b),
    );
    let out = migrate(&a_api, B_ADDR, &common::tls::args(&hosts.tls_a));
    assert!(out.status.success(), "{}", common::describe(&out));
    assert!(source.wait().success(), "A's veil lets the guest go");
    common::wait_for(&b.api);
    // Landed: tell the guest to read its state back, through B's memory file.
    File::options()
        .write(true)
        .open(&b.memory)
        .unwrap()
        .write_all_at(&common::vcpu::GO.to_le_bytes(), common::vcpu::GO_GPA)
        .unwrap();
    let b_out = hosts.path("b.out");
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let text = std::fs::read_to_string(&b_out).unwrap_or_default();
        if text.contains("Hello") || text.contains("FAILED") {
            break text;
        }
        assert!(Instant::now() < deadline, "B's guest said only {text:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    program.assert_same_after(&std::fs::read_to_string(&a_out).unwrap(), &after);
    common::ctl(&b.api, &["shutdown"]);
    b.process.wait();
}
