//! Live migration of the same 1 GiB kit guest by Veil and by QEMU, in one run, against the
//! loopback TCP throughput iperf3 reaches on the same host.
//!
//! The scenarios, each migrated over plain TCP on 127.0.0.1 by `veil ctl migrate` (to a
//! `veil receive`) and, for all but SEV, by QEMU's QMP `migrate` (to a QEMU started with
//! `-incoming`):
//! 1. idle: the guest spins without touching memory (`greet spin`);
//!    halted: the guest halts for good (`greet halt`), so its vCPU frees its core and the
//!    VMMs alone share the host's two; and halted again with the source's RAM file copied to
//!    tmpfs (`halted-tmpfs-source`), and with the target's RAM a tmpfs file
//!    (`halted-file-target`);
//! 2. dirtying: the guest writes one word per 4 KiB page at 12,800 pages/s (50 MiB/s) over
//!    256 MiB (`dirty-paced`), paced by its own PIT-calibrated TSC;
//! 3. SEV: the idle guest as an SEV guest on Veil's emulated SEV platform, Veil only (QEMU
//!    cannot migrate SEV guests), spinning (`sev`) and halted (`sev-halted`, so that the
//!    source's and the target's firmware commands each have a core). Every page is private, so every page goes through the
//!    emulated firmware's SEND_UPDATE_DATA and RECEIVE_UPDATE_DATA; the bench measures those
//!    two commands on one core in its own process, in the same run, to compare.
//!
//! Source RAM is a file of random bytes (no page travels as a zero page); target RAM is
//! anonymous on both. QEMU runs with its own defaults, then again with `max-bandwidth` raised
//! when the default limit capped it. Every number comes from this run; docs/benchmarks.md says
//! what each one means.
//!
//! Then the source's resident-memory growth while migrating 1 GiB and 16 GiB idle guests whose
//! RAM is a sparse file (`memory`, see `migration/memory.rs`).
//!
//! `cargo bench --bench migration [-- --runs N] [--only idle,halted,dirty,sev,memory,...]
//! [--baseline VEIL] [--cold-memory]` (with N runs per migration, the run with the median
//! total time is shown; `--only` runs the scenarios named; `--baseline` migrates with another
//! `veil` binary too, in the clear, interleaved with this one's runs, to compare two builds in
//! one run). Where the host's balloon reports free memory to the hypervisor below, 2 GiB is
//! touched and freed before each migration so that neither VMM's target meets memory handed
//! back to it (`--cold-memory` skips that).
//! QEMU and iperf3 are skipped, with the reason, when absent.

#[path = "migration/memory.rs"]
mod memory;
/// The tests' throwaway PKI, for the mutual-TLS run.
#[path = "../tests/common/tls.rs"]
#[allow(dead_code)]
mod pki;
mod support;

use support::qmp::Qmp;
use support::{host_busy, qemu_version, warm_free_memory, Proc, Scratch};

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};
use veil_guest_abi::PAGE_SIZE;
use veil_sev::emulated::firmware::EmulatedFirmware;
use veil_sev::emulated::identity::PlatformIdentity;
use veil_sev::firmware::{Firmware, FirmwareError};
use veil_sev::guest_memory::test_ram::TestRam;
use veil_sev::policy::GuestPolicy;

const GUEST_RAM: u64 = 1 << 30;
const GUEST_RAM_ARG: &str = "1G";
/// Left zero in the RAM file: QEMU's PVH boot was seen to fail over non-zero low memory
/// (HOST-NOTES), and the kit loads itself there anyway.
const LOW_ZERO: u64 = 4 << 20;
/// The dirtying guest: 65,536 pages (256 MiB) from 16 MiB, well clear of the kit's image.
const DIRTY_FIRST_GFN: u64 = 0x1000;
const DIRTY_PAGES: u64 = 65_536;
/// 12,800 pages of 4 KiB a second: 50 MiB/s.
const DIRTY_RATE: u64 = 12_800;
/// The connections a Veil migration uses by default on this host (`veil ctl migrate` without
/// `--connections`), and so the channels of the multifd QEMU it is compared with.
fn veil_streams() -> usize {
    veil::migration::default_connections()
}
/// QEMU's `max-bandwidth` for the raised runs: far above loopback TCP on any host.
const RAISED_BANDWIDTH: u64 = 100 << 30;
/// Memory touched and freed just before each migration: the target's RAM, twice over.
const WARM_BYTES: usize = 2 * GUEST_RAM as usize;

/// A migration that has not completed by then is cancelled and reported as such.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);
const START_TIMEOUT: Duration = Duration::from_secs(30);
const QMP_REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// The dirtying guest's first full pass over its range: every page mapped before migrating.
const WARM_UP_TIMEOUT: Duration = Duration::from_secs(90);
const IPERF_SECONDS: u64 = 3;
const POLL: Duration = Duration::from_millis(20);
/// The firmware model's raw throughput: 256 pages (1 MiB, as in sev/benches/firmware.rs) over
/// and over, in samples of at least this long; the median sample counts.
const FIRMWARE_PAGES: usize = 256;
const FIRMWARE_SAMPLES: usize = 5;
const FIRMWARE_SAMPLE_TIME: Duration = Duration::from_millis(400);
/// `veil run --sev`'s default policy (NODBG), so the model runs the migrated guest's policy.
const SEV_POLICY: GuestPolicy = GuestPolicy(0x1);
/// Veil's target for its SEV migration rate against the firmware model's series rate.
const SEV_GOAL: f64 = 0.8;

fn main() {
    let options = options_from_args();
    let scratch = match Scratch::new("veil-bench-migration-") {
        Ok(s) => s,
        Err(e) => fail(&e),
    };
    if let Err(e) = bench(&scratch, &options) {
        fail(&e);
    }
}

fn fail(message: &str) -> ! {
    eprintln!("migration bench failed: {message}");
    std::process::exit(1)
}

struct Options {
    runs: usize,
    scenarios: Vec<Scenario>,
    /// The source's memory growth (`memory`), 1 GiB and 16 GiB sparse guests.
    memory: bool,
    /// Another `veil` to migrate with too (`--baseline VEIL`), in every scenario.
    baseline: Option<PathBuf>,
    /// Warm the host's free memory before each migration ([`support::warm_free_memory`]):
    /// where the balloon reports free memory, unless `--cold-memory`.
    warm: bool,
}

/// `--runs N`, `--only NAME[,NAME...]`, `--baseline VEIL` and `--cold-memory` (cargo passes
/// `--bench` too, which is ignored).
fn options_from_args() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        let i = args.iter().position(|a| a == flag)?;
        Some(args.get(i + 1).map_or("", String::as_str))
    };
    let runs = match value("--runs") {
        None => 1,
        Some(n) => match n.parse() {
            Ok(n) if n >= 1 => n,
            _ => fail("--runs takes a number of runs, 1 or more"),
        },
    };
    let mut names: Vec<&str> = Scenario::ALL.iter().map(|s| s.slug()).collect();
    names.push("memory");
    let memory = value("--only").is_none_or(|list| list.split(',').any(|w| w == "memory"));
    let scenarios = match value("--only") {
        None => Scenario::ALL.to_vec(),
        Some(list) => {
            let wanted: Vec<&str> = list.split(',').collect();
            if let Some(bad) = wanted.iter().find(|w| !names.contains(w)) {
                fail(&format!(
                    "--only takes scenarios among {}, joined by commas; not `{bad}`",
                    names.join(", ")
                ));
            }
            // Always in the usual order, each once.
            Scenario::ALL
                .into_iter()
                .filter(|s| wanted.contains(&s.slug()))
                .collect()
        }
    };
    let baseline = value("--baseline").map(PathBuf::from);
    if let Some(binary) = &baseline {
        if !binary.is_file() {
            fail(&format!(
                "--baseline takes a `veil` binary to compare with; {} is not a file",
                binary.display()
            ));
        }
    }
    let cold = args.iter().any(|a| a == "--cold-memory");
    Options {
        runs,
        scenarios,
        memory,
        baseline,
        warm: !cold && support::free_page_reporting() == Some(true),
    }
}

fn bench(scratch: &Scratch, options: &Options) -> Result<(), String> {
    let with_qemu = options.scenarios.iter().any(|s| s.with_qemu());
    let qemu = with_qemu.then(qemu_version);
    print_header(qemu.as_ref(), options);
    let iperf = iperf3(scratch);
    match &iperf {
        Ok(gbit) => {
            println!("loopback TCP limit (iperf3, 1 stream, {IPERF_SECONDS} s): {gbit:.2} Gbit/s")
        }
        Err(why) => println!("loopback TCP limit: skipped: {why}"),
    }
    match &qemu {
        Some(Err(why)) => println!("QEMU: skipped: {why}"),
        None => println!("QEMU: not run: it cannot migrate SEV guests"),
        Some(Ok(_)) => {}
    }
    let ram = scratch.path("guest-ram");
    if !options.scenarios.is_empty() {
        eprintln!(
            "filling a {} MiB RAM file with random bytes...",
            GUEST_RAM >> 20
        );
        fill_random(&ram)?;
    }
    let mut results = Vec::new();
    for &scenario in &options.scenarios {
        let sev = match scenario {
            _ if scenario.sev() => Some(SevPlatforms::new(scratch)?),
            _ => None,
        };
        let have_qemu = matches!(qemu, Some(Ok(_)));
        // The same random bytes, copied to tmpfs for the source, and removed after.
        let tmpfs_ram = (scenario == Scenario::HaltedTmpfsSource)
            .then(|| {
                let dir = Scratch::under(Path::new("/dev/shm"), "veil-bench-source-")?;
                fs::copy(&ram, dir.path("ram"))
                    .map_err(|e| format!("cannot copy the RAM file to /dev/shm: {e}"))?;
                Ok::<_, String>(dir)
            })
            .transpose()?;
        let tmpfs_path = tmpfs_ram.as_ref().map(|dir| dir.path("ram"));
        let table = run_scenario(
            scratch,
            scenario,
            tmpfs_path.as_deref().unwrap_or(&ram),
            have_qemu,
            sev.as_ref(),
            options,
        )?;
        print_table(scenario, &table);
        results.push((scenario, table));
    }
    print_ratios(iperf.ok(), &results);
    if options.memory {
        let rows: Vec<_> = memory::GUESTS
            .iter()
            .map(|&guest| {
                eprintln!("memory: a {} GiB sparse guest ...", guest >> 30);
                memory::measure(scratch, guest)
            })
            .collect();
        memory::print(&rows);
    }
    Ok(())
}

fn print_header(qemu: Option<&Result<String, String>>, options: &Options) {
    let now = humantime::format_rfc3339_seconds(SystemTime::now());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "live migration of a {} MiB kit guest over loopback TCP, {now}",
        GUEST_RAM >> 20
    );
    let qemu = match qemu {
        Some(Ok(version)) => version.as_str(),
        Some(Err(_)) => "no QEMU",
        None => "QEMU not needed",
    };
    let scenarios: Vec<&str> = options.scenarios.iter().map(|s| s.slug()).collect();
    println!(
        "host: {cores} cores, Linux {}, {qemu}; {} run(s) per migration; scenarios: {}",
        kernel.trim(),
        options.runs,
        scenarios.join(", ")
    );
    let reporting = support::free_page_reporting();
    println!(
        "free page reporting (virtio-balloon): {}",
        match (reporting, options.warm) {
            (None, _) => "no balloon".to_string(),
            (Some(false), _) => "off".to_string(),
            (Some(true), true) => format!(
                "on; {} MiB touched and freed before each migration, so that neither VMM \
                 meets memory handed back to the hypervisor below (`--cold-memory`: not)",
                WARM_BYTES >> 20
            ),
            (Some(true), false) => "on; memory not warmed (`--cold-memory`)".to_string(),
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Scenarios and their results

#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    Idle,
    /// The guest halted for good (`cli; hlt`): its vCPU frees its core, so the VMMs alone
    /// share the host's CPU.
    Halted,
    /// Halted, the source's RAM a copy of the file on tmpfs (no disk behind its page cache).
    HaltedTmpfsSource,
    /// Halted, the target's RAM a file on tmpfs (shared memory, as for a later local handoff).
    HaltedFileTarget,
    Dirtying,
    /// The idle guest as an SEV guest on the emulated platform.
    Sev,
    /// The halted guest as an SEV guest: the sender's SEND_UPDATE_DATA and the target's
    /// RECEIVE_UPDATE_DATA each have a core, as on a host with cores to spare.
    SevHalted,
}

impl Scenario {
    const ALL: [Scenario; 7] = [
        Scenario::Idle,
        Scenario::Halted,
        Scenario::HaltedTmpfsSource,
        Scenario::HaltedFileTarget,
        Scenario::Dirtying,
        Scenario::Sev,
        Scenario::SevHalted,
    ];

    fn sev(self) -> bool {
        matches!(self, Scenario::Sev | Scenario::SevHalted)
    }

    fn cmdline(self) -> String {
        match self {
            Scenario::Idle => "greet spin".into(),
            Scenario::Halted | Scenario::HaltedTmpfsSource | Scenario::HaltedFileTarget => {
                "greet halt".into()
            }
            Scenario::Dirtying => format!(
                "dirty-paced:first={DIRTY_FIRST_GFN:#x},count={DIRTY_PAGES},rate={DIRTY_RATE}"
            ),
            // An SEV guest starts with migration control 0 (not migratable) and must allow it.
            Scenario::Sev => "msr-write:value=1 greet spin".into(),
            Scenario::SevHalted => "msr-write:value=1 greet halt".into(),
        }
    }

    fn title(self) -> String {
        match self {
            Scenario::Idle => "scenario 1: idle guest (`greet spin`)".into(),
            Scenario::Halted => {
                "scenario 1b: halted guest (`greet halt`: the vCPU frees its core)".into()
            }
            Scenario::HaltedTmpfsSource => {
                "scenario 1c: halted guest, the source's RAM file on tmpfs".into()
            }
            Scenario::HaltedFileTarget => {
                "scenario 1d: halted guest, the target's RAM a file on tmpfs".into()
            }
            Scenario::Dirtying => format!(
                "scenario 2: guest dirtying {DIRTY_RATE} pages/s ({} MiB/s) over {} MiB (`{}`)",
                (DIRTY_RATE * PAGE_SIZE) >> 20,
                (DIRTY_PAGES * PAGE_SIZE) >> 20,
                self.cmdline()
            ),
            Scenario::Sev => format!(
                "scenario 3: idle SEV guest on the emulated SEV platform, every page private \
                 (`{}`); Veil only",
                self.cmdline()
            ),
            Scenario::SevHalted => format!(
                "scenario 3b: halted SEV guest on the emulated SEV platform, every page \
                 private (`{}`: the vCPU frees its core); Veil only",
                self.cmdline()
            ),
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Scenario::Idle => "idle",
            Scenario::Halted => "halted",
            Scenario::HaltedTmpfsSource => "halted-tmpfs-source",
            Scenario::HaltedFileTarget => "halted-file-target",
            Scenario::Dirtying => "dirty",
            Scenario::Sev => "sev",
            Scenario::SevHalted => "sev-halted",
        }
    }

    /// The guest halts, freeing its vCPU's core: the host's busy time during the migration is
    /// then the migration's own cost. A spinning vCPU takes whatever the migration leaves.
    fn frees_core(self) -> bool {
        matches!(
            self,
            Scenario::Halted
                | Scenario::HaltedTmpfsSource
                | Scenario::HaltedFileTarget
                | Scenario::SevHalted
        )
    }

    /// QEMU cannot migrate SEV guests.
    fn with_qemu(self) -> bool {
        !self.sev()
    }

    /// A folder on tmpfs for the target's RAM file, for the one migration, or `None` for each
    /// VMM's default, anonymous memory.
    fn target_ram_dir(self) -> Result<Option<Scratch>, String> {
        (self == Scenario::HaltedFileTarget)
            .then(|| Scratch::under(Path::new("/dev/shm"), "veil-bench-target-"))
            .transpose()
    }
}

/// Which migration: Veil, or QEMU with its default or a raised bandwidth limit.
#[derive(Clone, Copy, PartialEq)]
enum Migrator {
    Veil,
    /// Veil over mutual TLS (the idle scenario), to compare with the clear.
    VeilTls,
    /// Veil over one connection (`--connections 1`), where the default is more.
    VeilOneStream,
    /// Another `veil` binary (`--baseline`), in the clear, to compare builds in one run.
    VeilBaseline,
    QemuDefault,
    QemuRaised,
    /// QEMU with its limit raised and multifd on, with as many channels as Veil has streams.
    QemuMultifd,
}

impl Migrator {
    fn label(self, qemu_default_bandwidth: Option<u64>) -> String {
        match self {
            Migrator::Veil => format!("veil ({} connections)", veil_streams()),
            Migrator::VeilTls => "veil, mutual TLS".into(),
            Migrator::VeilOneStream => "veil (1 connection)".into(),
            Migrator::VeilBaseline => "veil (--baseline)".into(),
            Migrator::QemuDefault => match qemu_default_bandwidth {
                Some(b) => format!("qemu (defaults: max-bandwidth {})", mib_per_s(b)),
                None => "qemu (defaults)".into(),
            },
            Migrator::QemuRaised => {
                format!(
                    "qemu (max-bandwidth raised to {})",
                    mib_per_s(RAISED_BANDWIDTH)
                )
            }
            Migrator::QemuMultifd => {
                format!("qemu (raised, multifd, {} channels)", veil_streams())
            }
        }
    }

    fn slug(self) -> &'static str {
        match self {
            Migrator::Veil => "veil",
            Migrator::VeilTls => "veil-tls",
            Migrator::VeilOneStream => "veil-1",
            Migrator::VeilBaseline => "veil-baseline",
            Migrator::QemuDefault => "qemu",
            Migrator::QemuRaised => "qemu-raised",
            Migrator::QemuMultifd => "qemu-multifd",
        }
    }
}

fn mib_per_s(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{} GiB/s", bytes >> 30)
    } else {
        format!("{} MiB/s", bytes >> 20)
    }
}

/// One completed migration, as its VMM reported it, plus what the bench saw.
#[derive(Clone)]
struct Migration {
    /// From the start of the migration to its completion, by the VMM's own clock.
    total: Duration,
    /// How long the guest was stopped, by the VMM's own clock.
    downtime: Duration,
    /// QEMU's `setup-time`.
    setup: Option<Duration>,
    /// Veil: every byte written to the stream; QEMU: `ram.transferred`.
    bytes: u64,
    /// From the bench's request to the bench seeing the migration completed.
    wall: Duration,
    /// The host's busy time over `wall`: both ends' CPU, and a spinning vCPU's.
    host_cpu: Duration,
    /// Veil's dirty passes after the first full one, or QEMU's `dirty-sync-count`.
    passes: String,
    /// QEMU's `max-bandwidth` during the run.
    bandwidth_limit: Option<u64>,
    guest: Option<GuestRates>,
}

/// The dirtying guest's own measure of its rate.
#[derive(Clone, Copy)]
struct GuestRates {
    before: Option<Rate>,
    during: Option<Rate>,
    after: Option<Rate>,
}

#[derive(Clone, Copy)]
struct Rate {
    pages_per_s: f64,
    /// How much of the guest's time the figure covers.
    seconds: f64,
}

type Outcome = Result<Migration, String>;

/// Each migrator's outcome in a scenario (the median run of several).
struct Table {
    rows: Vec<(Migrator, Outcome, String)>,
    qemu_default_bandwidth: Option<u64>,
    /// SEV: the firmware model's raw throughput, measured before each run.
    firmware: Vec<FirmwareRates>,
}

fn run_scenario(
    scratch: &Scratch,
    scenario: Scenario,
    ram: &Path,
    have_qemu: bool,
    sev: Option<&SevPlatforms>,
    options: &Options,
) -> Result<Table, String> {
    let (runs, baseline, here) = (options.runs, options.baseline.as_deref(), Path::new(VEIL));
    let mut outcomes: Vec<(Migrator, Vec<Outcome>)> = Vec::new();
    let mut qemu_default_bandwidth = None;
    let mut firmware = Vec::new();
    // Interleave the migrators so drift in the host's load hits them alike.
    for run in 0..runs {
        if let Some(platforms) = sev {
            // Just before each migration it is compared with, with no VM running, so that load
            // from elsewhere on the host shows in both alike.
            eprintln!(
                "{}: the emulated firmware's raw throughput on one core ...",
                scenario.slug()
            );
            firmware.push(firmware_rates(platforms)?);
        }
        let mut migrators = vec![Migrator::Veil];
        if baseline.is_some() {
            migrators.push(Migrator::VeilBaseline);
        }
        if matches!(scenario, Scenario::Idle | Scenario::Halted) {
            migrators.push(Migrator::VeilTls);
        }
        if veil_streams() > 1 && !scenario.sev() {
            migrators.push(Migrator::VeilOneStream);
        }
        if have_qemu && scenario.with_qemu() {
            migrators.push(Migrator::QemuDefault);
        }
        let mut i = 0;
        while let Some(&migrator) = migrators.get(i) {
            i += 1;
            let tag = format!("{}-{}-{run}", scenario.slug(), migrator.slug());
            eprintln!(
                "{}: {} ...",
                scenario.slug(),
                migrator.label(qemu_default_bandwidth)
            );
            let outcome = match migrator {
                Migrator::Veil | Migrator::VeilTls | Migrator::VeilOneStream => {
                    let how = VeilRun {
                        binary: here,
                        tls: migrator == Migrator::VeilTls,
                        connections: (migrator == Migrator::VeilOneStream).then_some(1),
                        warm: options.warm,
                    };
                    migrate_veil(scratch, &tag, scenario, ram, sev, how)
                }
                Migrator::VeilBaseline => {
                    let how = VeilRun {
                        binary: baseline.ok_or("no --baseline")?,
                        tls: false,
                        connections: None,
                        warm: options.warm,
                    };
                    migrate_veil(scratch, &tag, scenario, ram, sev, how)
                }
                _ => migrate_qemu(scratch, &tag, scenario, ram, migrator, options.warm),
            };
            if migrator == Migrator::QemuDefault {
                if let Ok(m) = &outcome {
                    qemu_default_bandwidth = m.bandwidth_limit;
                }
                // QEMU with its limit lifted is the bar, whether or not the default held it.
                migrators.extend([Migrator::QemuRaised, Migrator::QemuMultifd]);
            }
            match outcomes.iter_mut().find(|(m, _)| *m == migrator) {
                Some((_, list)) => list.push(outcome),
                None => outcomes.push((migrator, vec![outcome])),
            }
        }
    }
    let rows = outcomes
        .into_iter()
        .map(|(migrator, list)| {
            let (outcome, spread) = median_run(list);
            (migrator, outcome, spread)
        })
        .collect();
    Ok(Table {
        rows,
        qemu_default_bandwidth,
        firmware,
    })
}

/// The bench's clock over one migration, Veil's or QEMU's alike.
struct MigrationClock {
    started: Instant,
    host_busy: Duration,
}

impl MigrationClock {
    /// Warms the host's free memory first if `warm` ([`Options::warm`]), then starts.
    fn start(warm: bool) -> Result<Self, String> {
        if warm {
            warm_free_memory(WARM_BYTES)?;
        }
        Ok(Self {
            started: Instant::now(),
            host_busy: host_busy(),
        })
    }

    /// The wall time since the start, and the host's busy time over it.
    fn stop(&self) -> (Duration, Duration) {
        (
            self.started.elapsed(),
            host_busy().saturating_sub(self.host_busy),
        )
    }
}

/// The run with the median total time, and the range of totals when there were several.
fn median_run(mut list: Vec<Outcome>) -> (Outcome, String) {
    let runs = list.len();
    let mut done: Vec<Migration> = list
        .iter()
        .filter_map(|o| o.as_ref().ok().cloned())
        .collect();
    if done.is_empty() {
        return (list.swap_remove(0), String::new());
    }
    done.sort_by_key(|m| m.total);
    let spread = if runs > 1 {
        format!(
            "median of {} completed out of {runs}; totals {:.0}..{:.0} ms",
            done.len(),
            ms(done[0].total),
            ms(done[done.len() - 1].total)
        )
    } else {
        String::new()
    };
    (Ok(done.swap_remove(done.len() / 2)), spread)
}

// ---------------------------------------------------------------------------------------------
// Veil

/// The `veil` this bench was built with.
const VEIL: &str = env!("CARGO_BIN_EXE_veil");

fn veil() -> Command {
    veil_from(Path::new(VEIL))
}

/// `binary` (this bench's `veil`, or `--baseline`'s).
fn veil_from(binary: &Path) -> Command {
    let mut cmd = Command::new(binary);
    cmd.env_remove("VEIL_LOG");
    cmd
}

/// `binary`'s `veil receive` listening on 127.0.0.1:`port`; the caller adds security, serial
/// and sockets.
fn veil_receive(binary: &Path, port: u16) -> Command {
    let mut cmd = veil_from(binary);
    cmd.args(["receive", "--listen", &format!("tcp:127.0.0.1:{port}")]);
    cmd
}

/// `binary`'s `veil run` of the kit with `cmdline`, its `memory` of RAM backed by the file
/// `ram`.
fn veil_run_kit(binary: &Path, memory: &str, ram: &Path, cmdline: &str) -> Command {
    let mut cmd = veil_from(binary);
    cmd.args(["run", "--memory", memory, "--memory-file"])
        .arg(ram)
        .arg("--kernel")
        .arg(veil_guests::kit_elf_path())
        .args(["--cmdline", cmdline]);
    cmd
}

/// Which `veil` migrates, and how.
struct VeilRun<'a> {
    binary: &'a Path,
    /// Mutual TLS, or plain TCP.
    tls: bool,
    /// `--connections`; `None` leaves the binary's default.
    connections: Option<u32>,
    /// Warm the host's free memory just before migrating ([`Options::warm`]).
    warm: bool,
}

fn migrate_veil(
    scratch: &Scratch,
    tag: &str,
    scenario: Scenario,
    ram: &Path,
    sev: Option<&SevPlatforms>,
    how: VeilRun<'_>,
) -> Outcome {
    let VeilRun {
        binary,
        tls,
        connections,
        warm,
    } = how;
    // Mutual TLS with throwaway certificates for 127.0.0.1, or plain TCP.
    let (target_security, source_security) = if tls {
        let dir = scratch.path("");
        let ca = pki::Ca::new(&dir, &format!("{tag}-pki"));
        (
            pki::args(&ca.host(&dir, &format!("{tag}-target"), &["127.0.0.1"])),
            pki::args(&ca.host(&dir, &format!("{tag}-source"), &["127.0.0.1"])),
        )
    } else {
        (
            vec!["--insecure".to_string()],
            vec!["--insecure".to_string()],
        )
    };
    let sev = match scenario {
        _ if scenario.sev() => Some(sev.ok_or("the SEV scenario needs its platforms")?),
        _ => None,
    };
    let port = free_port()?;
    let (src_serial, dst_serial) = (
        scratch.path(&format!("{tag}-src.serial")),
        scratch.path(&format!("{tag}-dst.serial")),
    );
    let (src_api, dst_api) = (
        scratch.path(&format!("{tag}-src.sock")),
        scratch.path(&format!("{tag}-dst.sock")),
    );
    let target_dir = scenario.target_ram_dir()?;
    let target_ram = target_dir.as_ref().map(|dir| dir.path("ram"));
    let mut target = Proc::spawn(
        &format!("{tag}-target"),
        veil_receive(binary, port)
            .args(
                target_ram
                    .iter()
                    .flat_map(|p| [OsStr::new("--memory-file"), p.as_os_str()]),
            )
            .args(&target_security)
            .arg("--serial")
            .arg(file_sink(&dst_serial))
            .arg("--api-socket")
            .arg(&dst_api)
            .args(sev.map_or(Vec::new(), |p| sev_args(&p.target))),
        scratch,
    )?;
    let mut source = Proc::spawn(
        &format!("{tag}-source"),
        veil_run_kit(binary, GUEST_RAM_ARG, ram, &scenario.cmdline())
            .arg("--api-socket")
            .arg(&src_api)
            .arg("--serial")
            .arg(file_sink(&src_serial))
            .args(sev.map_or(Vec::new(), |p| sev_args(&p.source))),
        scratch,
    )?;
    wait_listening(port, &mut target)?;
    let mark = wait_guest_ready(scenario, &src_serial, &mut source)?;
    wait_for("the source's API socket", START_TIMEOUT, || {
        src_api.exists().then_some(())
    })?;
    // The SEV guest allows migration only once its `msr-write` ran; check Veil agrees.
    wait_for(
        "the source to report the guest migratable",
        START_TIMEOUT,
        || {
            let status = veil_status(&src_api)?;
            (status["migratability"]["state"] == "migratable").then_some(())
        },
    )
    .map_err(|e| format!("{e}; source log: {}", source.stderr_tail()))?;

    let clock = MigrationClock::start(warm)?;
    let mut extra: Vec<std::ffi::OsString> = source_security.iter().map(Into::into).collect();
    if let Some(p) = sev {
        extra.push("--sev-trust-chain".into());
        extra.push(p.chain.clone().into_os_string());
    }
    if let Some(n) = connections {
        extra.push("--connections".into());
        extra.push(n.to_string().into());
    }
    let mut ctl = ctl_migrate(scratch, tag, &src_api, port, &extra)?;
    let status = ctl.wait_exit(MIGRATION_TIMEOUT + Duration::from_secs(30))?;
    let (wall, host_cpu) = clock.stop();
    let report = migrate_report(&ctl, status)?;
    let number = |key: &str| {
        report[key]
            .as_f64()
            .ok_or_else(|| format!("veil's migration report has no `{key}`: {report}"))
    };
    let (total, downtime, bytes) = (
        number("total_ms")?,
        number("downtime_ms")?,
        number("bytes")?,
    );
    let passes = report["passes"].as_u64().unwrap_or(0);
    let mut passes = format!("{passes} dirty passes");
    if sev.is_some() {
        // The comparison with the firmware model assumes every page went through it.
        let count = |key: &str| report[key].as_u64().unwrap_or(0);
        let (private, clear) = (count("private_pages"), count("clear_pages"));
        if clear > 0 || private < GUEST_RAM / PAGE_SIZE {
            return Err(format!(
                "expected every page private: {private} went through the firmware, \
                 {clear} in the clear; report: {report}"
            ));
        }
        passes += &format!(", {private} pages via firmware");
    }

    // The source exits once the target holds the guest.
    source.wait_exit(Duration::from_secs(10))?;
    wait_for("the target's API socket", START_TIMEOUT, || {
        dst_api.exists().then_some(())
    })?;
    let state = wait_for("the guest to run on the target", START_TIMEOUT, || {
        (veil_status(&dst_api)?["state"] == "running").then_some(())
    });
    state.map_err(|e| format!("{e}; target log: {}", target.stderr_tail()))?;
    let guest = guest_rates(scenario, &src_serial, mark, &dst_serial)?;
    Ok(Migration {
        total: Duration::from_secs_f64(total / 1e3),
        downtime: Duration::from_secs_f64(downtime / 1e3),
        setup: None,
        bytes: bytes as u64,
        wall,
        host_cpu,
        passes,
        bandwidth_limit: None,
        guest,
    })
}

/// `veil ctl --api-socket SOURCE --json migrate --to tcp:127.0.0.1:PORT EXTRA... --timeout-s`,
/// started.
fn ctl_migrate(
    scratch: &Scratch,
    tag: &str,
    source_api: &Path,
    port: u16,
    extra: &[std::ffi::OsString],
) -> Result<Proc, String> {
    Proc::spawn(
        &format!("{tag}-ctl"),
        veil()
            .arg("ctl")
            .arg("--api-socket")
            .arg(source_api)
            .args(["--json", "migrate", "--to"])
            .arg(format!("tcp:127.0.0.1:{port}"))
            .args(extra)
            .args(["--timeout-s", &MIGRATION_TIMEOUT.as_secs().to_string()]),
        scratch,
    )
}

/// The JSON report of a `veil ctl --json migrate` that exited with `status`, or why not.
fn migrate_report(ctl: &Proc, status: ExitStatus) -> Result<Value, String> {
    if !status.success() {
        return Err(format!(
            "veil ctl migrate failed ({status}): {}",
            ctl.stderr_tail()
        ));
    }
    serde_json::from_str(&ctl.stdout())
        .map_err(|e| format!("veil ctl --json migrate printed no JSON report: {e}"))
}

/// `veil ctl --json status` on `socket`, if it answers.
fn veil_status(socket: &Path) -> Option<Value> {
    let output = veil()
        .arg("ctl")
        .arg("--api-socket")
        .arg(socket)
        .args(["--json", "status"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    serde_json::from_slice(&output.stdout).ok()
}

fn file_sink(path: &Path) -> String {
    format!("file:{}", path.display())
}

// ---------------------------------------------------------------------------------------------
// SEV: the two emulated platforms, and the firmware model's raw throughput

/// The source's and the target's emulated SEV platforms (their state folders) and the target's
/// exported chain, which the source must trust to send it the guest.
struct SevPlatforms {
    source: PathBuf,
    target: PathBuf,
    chain: PathBuf,
}

impl SevPlatforms {
    fn new(scratch: &Scratch) -> Result<SevPlatforms, String> {
        let platforms = SevPlatforms {
            source: scratch.path("sev-source"),
            target: scratch.path("sev-target"),
            chain: scratch.path("sev-target.chain"),
        };
        let out = veil()
            .args(["sev", "export-chain"])
            .args(sev_platform_args(&platforms.target))
            .arg("--out")
            .arg(&platforms.chain)
            .output()
            .map_err(|e| format!("cannot run veil sev export-chain: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "veil sev export-chain failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(platforms)
    }
}

fn sev_platform_args(state_dir: &Path) -> Vec<std::ffi::OsString> {
    vec![
        "--sev-platform".into(),
        "emulated".into(),
        "--sev-state-dir".into(),
        state_dir.into(),
    ]
}

/// `--sev` on the emulated platform whose state is in `state_dir`.
fn sev_args(state_dir: &Path) -> Vec<std::ffi::OsString> {
    let mut args = vec!["--sev".into()];
    args.extend(sev_platform_args(state_dir));
    args
}

/// The emulated firmware's throughput for 4 KiB pages on one core, in bytes per second.
struct FirmwareRates {
    send: f64,
    receive: f64,
}

impl FirmwareRates {
    /// Both commands one after the other on the same core, as each page needs both.
    fn serial(&self) -> f64 {
        1.0 / (1.0 / self.send + 1.0 / self.receive)
    }
}

/// SEND_UPDATE_DATA and RECEIVE_UPDATE_DATA through the `Firmware` interface Veil's sender and
/// receiver call, on the migration's own two platform identities (as sev/benches/firmware.rs
/// does, over random pages like the guest's).
fn firmware_rates(platforms: &SevPlatforms) -> Result<FirmwareRates, String> {
    let load = |dir: &Path| {
        PlatformIdentity::load_or_create(dir)
            .map(EmulatedFirmware::new)
            .map_err(|e| format!("emulated SEV platform in {}: {e}", dir.display()))
    };
    let (mut source, mut target) = (load(&platforms.source)?, load(&platforms.target)?);
    let fw = |e: FirmwareError| format!("emulated SEV firmware: {e}");
    let page_bytes = PAGE_SIZE as usize;
    let (source_ram, target_ram) = (
        TestRam::with_size(FIRMWARE_PAGES * page_bytes),
        TestRam::with_size(page_bytes),
    );
    source.register_ram(&source_ram.all()).map_err(fw)?;
    target.register_ram(&target_ram.all()).map_err(fw)?;
    let guest = source.launch_start(SEV_POLICY, None).map_err(fw)?;
    source.launch_measure(guest).map_err(fw)?;
    source.launch_finish(guest).map_err(fw)?;
    let chain = target.certificate_chain().map_err(fw)?;
    let start = source.send_start(guest, &chain).map_err(fw)?;
    let received = target.receive_start(&start).map_err(fw)?;

    let mut seed = 1;
    let random: Vec<u8> = (0..FIRMWARE_PAGES * page_bytes / 8)
        .flat_map(|_| splitmix64(&mut seed).to_le_bytes())
        .collect();
    source_ram.write(0, &random);
    let page = |i: usize| source_ram.at((i * page_bytes) as u64, page_bytes);
    let packets = (0..FIRMWARE_PAGES)
        .map(|i| source.send_update_data(guest, &page(i)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(fw)?;
    let send = pages_per_second(|i| {
        std::hint::black_box(source.send_update_data(guest, &page(i))?);
        Ok(())
    })
    .map_err(fw)?;
    let dest = target_ram.at(0, page_bytes);
    let receive =
        pages_per_second(|i| target.receive_update_data(received, packets[i].as_ref(), &dest))
            .map_err(fw)?;
    let bytes = PAGE_SIZE as f64;
    Ok(FirmwareRates {
        send: send * bytes,
        receive: receive * bytes,
    })
}

/// Runs `page(i)` over `FIRMWARE_PAGES` pages, round after round, and gives the median of
/// `FIRMWARE_SAMPLES` samples in pages per second (after one round to warm up).
fn pages_per_second(
    mut page: impl FnMut(usize) -> Result<(), FirmwareError>,
) -> Result<f64, FirmwareError> {
    (0..FIRMWARE_PAGES).try_for_each(&mut page)?;
    let mut samples = Vec::new();
    for _ in 0..FIRMWARE_SAMPLES {
        let started = Instant::now();
        let mut done = 0;
        while started.elapsed() < FIRMWARE_SAMPLE_TIME {
            (0..FIRMWARE_PAGES).try_for_each(&mut page)?;
            done += FIRMWARE_PAGES;
        }
        samples.push(done as f64 / started.elapsed().as_secs_f64());
    }
    samples.sort_by(f64::total_cmp);
    Ok(samples[FIRMWARE_SAMPLES / 2])
}

// ---------------------------------------------------------------------------------------------
// QEMU

/// The same machine on both sides; only RAM's backing, the serial file, the QMP socket and
/// `-incoming` differ.
fn qemu(scenario: Scenario, memory_backend: &str, serial: &Path, qmp: &Path) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "kvm", "-M", "microvm", "-m", GUEST_RAM_ARG])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args([
            "-monitor",
            "none",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x01",
        ])
        .args(["-object", memory_backend, "-machine", "memory-backend=ram"])
        .arg("-serial")
        .arg(file_sink(serial))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .arg("-kernel")
        .arg(veil_guests::kit_elf_path())
        .args(["-append", &scenario.cmdline()]);
    cmd
}

fn migrate_qemu(
    scratch: &Scratch,
    tag: &str,
    scenario: Scenario,
    ram: &Path,
    migrator: Migrator,
    warm: bool,
) -> Outcome {
    let port = free_port()?;
    let (src_serial, dst_serial) = (
        scratch.path(&format!("{tag}-src.serial")),
        scratch.path(&format!("{tag}-dst.serial")),
    );
    let (src_qmp, dst_qmp) = (
        scratch.path(&format!("{tag}-src.qmp")),
        scratch.path(&format!("{tag}-dst.qmp")),
    );
    let target_dir = scenario.target_ram_dir()?;
    let target_file = target_dir.as_ref().map(|dir| dir.path("ram"));
    let target_ram = match &target_file {
        None => format!("memory-backend-ram,id=ram,size={GUEST_RAM_ARG}"),
        Some(path) => format!(
            "memory-backend-file,id=ram,size={GUEST_RAM_ARG},mem-path={},share=on",
            path.display()
        ),
    };
    let uri = format!("tcp:127.0.0.1:{port}");
    let multifd = migrator == Migrator::QemuMultifd;
    // multifd must be on at both ends before the target listens.
    let incoming = if multifd { "defer" } else { uri.as_str() };
    let mut target = Proc::spawn(
        &format!("{tag}-target"),
        qemu(scenario, &target_ram, &dst_serial, &dst_qmp).args(["-incoming", incoming]),
        scratch,
    )?;
    let source_ram = format!(
        "memory-backend-file,id=ram,size={GUEST_RAM_ARG},mem-path={},share=on",
        ram.display()
    );
    let mut source = Proc::spawn(
        &format!("{tag}-source"),
        &mut qemu(scenario, &source_ram, &src_serial, &src_qmp),
        scratch,
    )?;
    let mut qmp = Qmp::connect(&src_qmp, &mut source, QMP_REPLY_TIMEOUT)?;
    let mut target_qmp = Qmp::connect(&dst_qmp, &mut target, QMP_REPLY_TIMEOUT)?;
    if multifd {
        for end in [&mut qmp, &mut target_qmp] {
            end.execute(
                "migrate-set-capabilities",
                json!({ "capabilities": [{ "capability": "multifd", "state": true }] }),
            )?;
            end.execute(
                "migrate-set-parameters",
                json!({ "multifd-channels": veil_streams() }),
            )?;
        }
        target_qmp.execute("migrate-incoming", json!({ "uri": uri }))?;
    }
    wait_listening(port, &mut target)?;
    let mark = wait_guest_ready(scenario, &src_serial, &mut source)?;

    if matches!(migrator, Migrator::QemuRaised | Migrator::QemuMultifd) {
        qmp.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": RAISED_BANDWIDTH }),
        )?;
    }
    let params = qmp.execute("query-migrate-parameters", json!({}))?;
    let clock = MigrationClock::start(warm)?;
    qmp.execute("migrate", json!({ "uri": uri }))?;
    let info = poll_qemu_migration(&mut qmp, clock.started)?;
    let (wall, host_cpu) = clock.stop();
    wait_for("the guest to run on the target", START_TIMEOUT, || {
        let status = target_qmp.execute("query-status", json!({})).ok()?;
        (status["status"] == "running").then_some(())
    })
    .map_err(|e| format!("{e}; target log: {}", target.stderr_tail()))?;

    let field = |v: &Value, key: &str| {
        v[key]
            .as_u64()
            .ok_or_else(|| format!("QEMU's query-migrate has no `{key}`: {info}"))
    };
    let guest = guest_rates(scenario, &src_serial, mark, &dst_serial)?;
    Ok(Migration {
        total: Duration::from_millis(field(&info, "total-time")?),
        downtime: Duration::from_millis(field(&info, "downtime")?),
        setup: Some(Duration::from_millis(field(&info, "setup-time")?)),
        bytes: field(&info["ram"], "transferred")?,
        wall,
        host_cpu,
        passes: format!("{} dirty syncs", info["ram"]["dirty-sync-count"]),
        bandwidth_limit: params["max-bandwidth"].as_u64(),
        guest,
    })
}

/// Polls `query-migrate` until the migration ends; cancels it at the timeout.
fn poll_qemu_migration(qmp: &mut Qmp, started: Instant) -> Result<Value, String> {
    loop {
        let info = qmp.execute("query-migrate", json!({}))?;
        match info["status"].as_str().unwrap_or("none") {
            "completed" => return Ok(info),
            "failed" | "cancelled" => {
                return Err(format!(
                    "QEMU's migration {}: {}",
                    info["status"].as_str().unwrap_or("?"),
                    info["error-desc"].as_str().unwrap_or("no reason given")
                ))
            }
            _ if started.elapsed() > MIGRATION_TIMEOUT => {
                let _ = qmp.execute("migrate_cancel", json!({}));
                return Err(format!(
                    "did not complete within {} s ({} MiB sent, {} dirty syncs, \
                     {} pages/s dirtied); cancelled",
                    MIGRATION_TIMEOUT.as_secs(),
                    info["ram"]["transferred"].as_u64().unwrap_or(0) >> 20,
                    info["ram"]["dirty-sync-count"],
                    info["ram"]["dirty-pages-rate"]
                ));
            }
            _ => std::thread::sleep(POLL),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The guest's side: readiness and the dirtying rate it reports on its serial port

/// Waits until the guest runs its task: greeted (idle), or steadily dirtying (`warmed_up`).
/// Returns the serial file's length at that point.
fn wait_guest_ready(scenario: Scenario, serial: &Path, vmm: &mut Proc) -> Result<usize, String> {
    let timeout = match scenario {
        Scenario::Idle
        | Scenario::Halted
        | Scenario::HaltedTmpfsSource
        | Scenario::HaltedFileTarget
        | Scenario::Sev
        | Scenario::SevHalted => START_TIMEOUT,
        Scenario::Dirtying => WARM_UP_TIMEOUT,
    };
    let ready = wait_for("the guest to be ready", timeout, || {
        let text = fs::read_to_string(serial).unwrap_or_default();
        if text.contains("veil-kit: error") || vmm.check_alive().is_err() {
            return Some(Err(format!(
                "the guest stopped; serial: {text:?}; log: {}",
                vmm.stderr_tail()
            )));
        }
        let ready = match scenario {
            Scenario::Idle
            | Scenario::Halted
            | Scenario::HaltedTmpfsSource
            | Scenario::HaltedFileTarget
            | Scenario::Sev
            | Scenario::SevHalted => text.contains(veil_guest_abi::KIT_GREETING),
            Scenario::Dirtying => warmed_up(&rate_lines(&text)),
        };
        ready.then_some(Ok(text.len()))
    });
    ready.map_err(|e| format!("{e}; VMM log: {}", vmm.stderr_tail()))?
}

/// Seconds of steady dirtying measured before migrating.
const STEADY_LINES: usize = 3;

/// One full pass over the range is done (every page mapped), then `STEADY_LINES` more lines.
fn warmed_up(lines: &[RateLine]) -> bool {
    let mut pages = 0;
    let full_pass = lines.iter().position(|l| {
        pages += l.pages;
        pages >= DIRTY_PAGES
    });
    full_pass.is_some_and(|i| lines.len() > i + STEADY_LINES)
}

/// One `dirty-paced: R pages/s (P pages in M ms)` line.
struct RateLine {
    /// Where the line starts in the serial output.
    at: usize,
    pages: u64,
    ms: u64,
}

fn rate_lines(text: &str) -> Vec<RateLine> {
    let mut lines = Vec::new();
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let start = at;
        at += line.len();
        let Some(rest) = line
            .strip_suffix('\n')
            .and_then(|l| l.split_once(" pages/s ("))
        else {
            continue;
        };
        let mut words = rest.1.split_whitespace();
        let pages = words.next().and_then(|w| w.parse().ok());
        let ms = words.nth(2).and_then(|w| w.parse().ok());
        if let (Some(pages), Some(ms)) = (pages, ms) {
            lines.push(RateLine {
                at: start,
                pages,
                ms,
            });
        }
    }
    lines
}

/// Pages per second over `lines`.
fn mean_rate<'a>(lines: impl Iterator<Item = &'a RateLine>) -> Option<Rate> {
    let (pages, ms) = lines.fold((0, 0), |(p, m), l| (p + l.pages, m + l.ms));
    (ms > 0).then(|| Rate {
        pages_per_s: pages as f64 * 1e3 / ms as f64,
        seconds: ms as f64 / 1e3,
    })
}

/// The dirtying guest's rate in the `STEADY_LINES` seconds before the migration, during it
/// (lines that began after it started, bar the first, which partly covers the time before), and
/// on the target (after its first line, which spans the switch-over).
fn guest_rates(
    scenario: Scenario,
    source_serial: &Path,
    mark: usize,
    target_serial: &Path,
) -> Result<Option<GuestRates>, String> {
    if scenario != Scenario::Dirtying {
        return Ok(None);
    }
    let source = rate_lines(&fs::read_to_string(source_serial).unwrap_or_default());
    let before: Vec<&RateLine> = source.iter().filter(|l| l.at < mark).collect();
    let during = source.iter().filter(|l| l.at >= mark).skip(1);
    let after = wait_for("the guest's rate on the target", START_TIMEOUT, || {
        let lines = rate_lines(&fs::read_to_string(target_serial).unwrap_or_default());
        (lines.len() >= 3).then(|| mean_rate(lines.iter().skip(1)))
    })?;
    Ok(Some(GuestRates {
        before: mean_rate(before.iter().rev().take(STEADY_LINES).copied()),
        during: mean_rate(during),
        after,
    }))
}

// ---------------------------------------------------------------------------------------------
// iperf3

/// Loopback TCP throughput in Gbit/s, one stream for `IPERF_SECONDS`, or why it was skipped.
fn iperf3(scratch: &Scratch) -> Result<f64, String> {
    let installed = Command::new("iperf3")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if installed.is_err() {
        return Err("iperf3 not installed".into());
    }
    let port = free_port()?;
    let mut server = Proc::spawn(
        "iperf3-server",
        Command::new("iperf3").args(["-s", "-1", "-B", "127.0.0.1", "-p", &port.to_string()]),
        scratch,
    )?;
    wait_listening(port, &mut server)?;
    let mut client = Proc::spawn(
        "iperf3-client",
        Command::new("iperf3")
            .args(["-c", "127.0.0.1", "-p", &port.to_string(), "-J"])
            .args(["-t", &IPERF_SECONDS.to_string()]),
        scratch,
    )?;
    let status = client.wait_exit(Duration::from_secs(IPERF_SECONDS + 30))?;
    let report: Value = serde_json::from_str(&client.stdout())
        .map_err(|e| format!("iperf3 -J printed no JSON ({status}): {e}"))?;
    report["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bits| bits / 1e9)
        .ok_or_else(|| format!("iperf3 failed ({status}): {}", report["error"]))
}

// ---------------------------------------------------------------------------------------------
// Output

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn gbit_per_s(bytes: u64, time: Duration) -> f64 {
    bytes as f64 * 8.0 / time.as_secs_f64().max(1e-9) / 1e9
}

fn print_table(scenario: Scenario, table: &Table) {
    println!();
    println!("{}", scenario.title());
    println!(
        "{:<44} {:>9} {:>9} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}  passes",
        "",
        "total ms",
        "downtime",
        "setup",
        "wire MiB",
        "RAM/tot",
        "wire/tot",
        "wall ms",
        "host CPU"
    );
    println!(
        "{:<44} {:>9} {:>9} {:>6} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "", "", "ms", "ms", "", "Gbit/s", "Gbit/s", "", "ms"
    );
    for (migrator, outcome, spread) in &table.rows {
        let label = migrator.label(table.qemu_default_bandwidth);
        match outcome {
            Err(why) => println!("{label:<44} FAILED: {why}"),
            Ok(m) => {
                println!(
                    "{label:<44} {:>9.1} {:>9.1} {:>6} {:>9.1} {:>9.2} {:>9.2} {:>9.0} {:>9.0}  {}",
                    ms(m.total),
                    ms(m.downtime),
                    m.setup.map_or("-".into(), |s| format!("{:.0}", ms(s))),
                    m.bytes as f64 / (1 << 20) as f64,
                    gbit_per_s(GUEST_RAM, m.total),
                    gbit_per_s(m.bytes, m.total),
                    ms(m.wall),
                    ms(m.host_cpu),
                    m.passes
                );
                if !spread.is_empty() {
                    println!("{:<44} ({spread})", "");
                }
            }
        }
    }
    print_firmware_rates(&table.firmware);
    let rates: Vec<_> = table
        .rows
        .iter()
        .filter_map(|(mi, o, _)| Some((mi, o.as_ref().ok()?.guest?)))
        .collect();
    if !rates.is_empty() {
        println!("guest's own dirtying rate, pages/s (asked: {DIRTY_RATE}):");
    }
    for (migrator, g) in rates {
        let show = |r: Option<Rate>| {
            r.map_or("n/a".into(), |r| {
                format!("{:.0} ({:.0} s)", r.pages_per_s, r.seconds)
            })
        };
        println!(
            "  {:<42} before {:>12}, during {:>12}, after (on the target) {:>12}",
            migrator.label(table.qemu_default_bandwidth),
            show(g.before),
            show(g.during),
            show(g.after)
        );
    }
}

/// The firmware model's rates before each run, and their medians.
fn print_firmware_rates(list: &[FirmwareRates]) {
    let Some(median) = median_rates(list) else {
        return;
    };
    let show = |bytes_per_s: f64| {
        format!(
            "{:.2} Gbit/s ({:.0} MiB/s)",
            bytes_per_s * 8.0 / 1e9,
            bytes_per_s / (1 << 20) as f64
        )
    };
    let runs = if list.len() > 1 {
        format!(", median of {} runs", list.len())
    } else {
        String::new()
    };
    println!(
        "emulated SEV firmware, 4 KiB pages on 1 core (median of {FIRMWARE_SAMPLES} samples{runs}): \
         SEND_UPDATE_DATA {}, RECEIVE_UPDATE_DATA {}",
        show(median.send),
        show(median.receive)
    );
    if list.len() > 1 {
        let range = |rate: fn(&FirmwareRates) -> f64| {
            let rates: Vec<f64> = list.iter().map(rate).collect();
            let gbit = |r: f64| r * 8.0 / 1e9;
            format!(
                "{:.2}..{:.2}",
                gbit(rates.iter().copied().fold(f64::INFINITY, f64::min)),
                gbit(rates.iter().copied().fold(0.0, f64::max))
            )
        };
        println!(
            "  (runs: SEND_UPDATE_DATA {}, RECEIVE_UPDATE_DATA {} Gbit/s)",
            range(|r| r.send),
            range(|r| r.receive)
        );
    }
}

/// Each command's median over the runs.
fn median_rates(list: &[FirmwareRates]) -> Option<FirmwareRates> {
    let median = |rate: fn(&FirmwareRates) -> f64| {
        let mut rates: Vec<f64> = list.iter().map(rate).collect();
        rates.sort_by(f64::total_cmp);
        rates.get(rates.len() / 2).copied()
    };
    Some(FirmwareRates {
        send: median(|r| r.send)?,
        receive: median(|r| r.receive)?,
    })
}

fn print_ratios(iperf: Option<f64>, results: &[(Scenario, Table)]) {
    println!();
    println!("ratios (effective rate = guest RAM / total time):");
    for (scenario, table) in results {
        let find = |which: Migrator| {
            table
                .rows
                .iter()
                .find(|(m, _, _)| *m == which)
                .and_then(|(_, o, _)| o.as_ref().ok())
        };
        let Some(veil) = find(Migrator::Veil) else {
            println!("  {}: veil failed, no ratios", scenario.slug());
            continue;
        };
        let veil_rate = gbit_per_s(GUEST_RAM, veil.total);
        let cpu_against = |other: &Migration| {
            if !scenario.frees_core() {
                return String::new();
            }
            format!(
                "; host CPU {:.0} ms vs {:.0} ms",
                ms(other.host_cpu),
                ms(veil.host_cpu)
            )
        };
        if iperf.is_none() && table.rows.len() == 1 && !scenario.sev() {
            println!(
                "  {}: nothing to compare with (no iperf3, no QEMU)",
                scenario.slug()
            );
        }
        if let Some(limit) = iperf {
            println!(
                "  {:<5} veil / iperf3 limit: {:.3} (RAM), {:.3} (wire bytes){}",
                scenario.slug(),
                veil_rate / limit,
                gbit_per_s(veil.bytes, veil.total) / limit,
                if *scenario == Scenario::Halted {
                    " (goal 0.6)"
                } else {
                    ""
                }
            );
        }
        if let Some(tls) = find(Migrator::VeilTls) {
            println!(
                "  {:<5} veil mutual TLS / clear: rate {:.3} (goal 0.8); downtime {:.1} ms{}",
                scenario.slug(),
                gbit_per_s(GUEST_RAM, tls.total) / veil_rate,
                ms(tls.downtime),
                cpu_against(tls)
            );
        }
        if let Some(one) = find(Migrator::VeilOneStream) {
            println!(
                "  {:<5} veil {} connections / 1 connection: rate {:.3}x; downtime {:.1} ms vs \
                 {:.1} ms",
                scenario.slug(),
                veil_streams(),
                veil_rate / gbit_per_s(GUEST_RAM, one.total),
                ms(veil.downtime),
                ms(one.downtime)
            );
        }
        if let Some(baseline) = find(Migrator::VeilBaseline) {
            println!(
                "  {:<5} veil / veil (--baseline): rate {:.3}x; downtime {:.1} ms vs {:.1} ms; \
                 host CPU {:.0} ms vs {:.0} ms",
                scenario.slug(),
                veil_rate / gbit_per_s(GUEST_RAM, baseline.total),
                ms(veil.downtime),
                ms(baseline.downtime),
                ms(veil.host_cpu),
                ms(baseline.host_cpu)
            );
        }
        for which in [
            Migrator::QemuDefault,
            Migrator::QemuRaised,
            Migrator::QemuMultifd,
        ] {
            if let Some(qemu) = find(which) {
                let goal = match which {
                    Migrator::QemuRaised => " (goal 1.5x)",
                    Migrator::QemuMultifd => " (goal 1.0x)",
                    _ => "",
                };
                println!(
                    "  {:<5} veil / {}: rate {:.2}x{goal}; downtime {:.1} ms vs {:.1} ms ({:.2}x)",
                    scenario.slug(),
                    which.label(table.qemu_default_bandwidth),
                    veil_rate / gbit_per_s(GUEST_RAM, qemu.total),
                    ms(veil.downtime),
                    ms(qemu.downtime),
                    veil.downtime.as_secs_f64() / qemu.downtime.as_secs_f64().max(1e-6)
                );
                if scenario.frees_core() {
                    println!(
                        "  {:<5} veil / {}: host CPU {:.0} ms vs {:.0} ms ({:.2}x the CPU)",
                        scenario.slug(),
                        which.label(table.qemu_default_bandwidth),
                        ms(veil.host_cpu),
                        ms(qemu.host_cpu),
                        veil.host_cpu.as_secs_f64() / qemu.host_cpu.as_secs_f64().max(1e-6)
                    );
                }
            }
        }
        if let Some(fw) = median_rates(&table.firmware) {
            let gbit = |bytes_per_s: f64| bytes_per_s * 8.0 / 1e9;
            let slower = fw.send.min(fw.receive);
            println!(
                "  {:<5} veil / emulated firmware's raw rate, 1 core, min(SEND, RECEIVE) = \
                 {:.2} Gbit/s: {:.3}",
                scenario.slug(),
                gbit(slower),
                veil_rate / gbit(slower)
            );
            println!(
                "  {:<5} veil / both commands in series on 1 core, 1/(1/SEND + 1/RECEIVE) = \
                 {:.2} Gbit/s: {:.3} (goal {SEV_GOAL})",
                scenario.slug(),
                gbit(fw.serial()),
                veil_rate / gbit(fw.serial())
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Files, ports and waiting

/// Writes `GUEST_RAM` bytes: `LOW_ZERO` zeros, then random bytes (SplitMix64, seeded from the
/// clock), and flushes them to disk so writeback does not run during the migrations.
fn fill_random(path: &Path) -> Result<(), String> {
    let io_err = |e: io::Error| format!("cannot write {}: {e}", path.display());
    let mut file = File::create(path).map_err(io_err)?;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..LOW_ZERO / chunk.len() as u64 {
        file.write_all(&chunk).map_err(io_err)?;
    }
    let mut state = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64);
    for _ in 0..(GUEST_RAM - LOW_ZERO) / chunk.len() as u64 {
        for word in chunk.chunks_exact_mut(8) {
            word.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
        }
        file.write_all(&chunk).map_err(io_err)?;
    }
    file.sync_all().map_err(io_err)
}

/// The next SplitMix64 output: fast, and random enough that no page is zero or compresses.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A TCP port free on 127.0.0.1 right now (the kernel's choice, so concurrent runs differ).
fn free_port() -> Result<u16, String> {
    let listener =
        TcpListener::bind("127.0.0.1:0").map_err(|e| format!("no free TCP port: {e}"))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| format!("no free TCP port: {e}"))
}

/// Waits until something listens on 127.0.0.1:`port`, without connecting (a `veil receive`
/// would take a probe for its source).
fn wait_listening(port: u16, vmm: &mut Proc) -> Result<(), String> {
    let needle = format!("0100007F:{port:04X}");
    wait_for(&format!("a listener on port {port}"), START_TIMEOUT, || {
        if let Err(e) = vmm.check_alive() {
            return Some(Err(e));
        }
        let table = fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let listening = table.lines().any(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.get(1) == Some(&needle.as_str()) && fields.get(3) == Some(&"0A")
        });
        listening.then_some(Ok(()))
    })?
}

/// Polls `poll` until it gives a value, or fails after `timeout` naming `what`.
fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut poll: impl FnMut() -> Option<T>,
) -> Result<T, String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = poll() {
            return Ok(value);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "timed out after {} s waiting for {what}",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(POLL);
    }
}
