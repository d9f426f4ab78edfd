//! virtio-blk from the kit guest: Veil against QEMU `-M microvm` with `virtio-blk-device`, on
//! the same ELF and the same kind of disk file, in the same run.
//!
//! Each boot of the kit runs its `blk-bench` task once per case (4 KiB and 64 KiB requests,
//! one in flight and as many as the queue holds, reads then writes) against a 64 MiB raw file
//! whose pages are all allocated and in the page cache. The guest times the requests with its
//! PIT-calibrated TSC and prints requests/s and MB/s (docs/guest-kit.md); the bench parses
//! those lines. The VMMs alternate boot by boot (the first one alternating too), `--runs N`
//! boots each (default 5), and the table gives each case's medians with the Veil/QEMU ratio.
//!
//! The goal: with one request in flight, at least 1.2x QEMU's request rate. A guest this slow
//! (HOST-NOTES: emulated, about 2 million instructions a second) does little besides the
//! request, so that measures each VMM's per-request cost.
//!
//! `cargo bench --bench blk [-- --runs N] [--count N]`. QEMU is skipped, with the reason, when
//! not installed. A VMM that fails is reported and the bench exits non-zero.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Proc, Scratch};

const GUEST_RAM: &str = "64M";
const DISK_BYTES: u64 = 64 << 20;
const SIZES: [u64; 2] = [4 << 10, 64 << 10];
/// Requests per case unless `--count` says otherwise.
const DEFAULT_COUNT: u64 = 5000;
const DEFAULT_RUNS: usize = 5;
/// A boot that has not finished every case by then is killed and counted as failed.
const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
/// Veil's goal against QEMU's request rate with one request in flight.
const DEPTH_1_GOAL: f64 = 1.2;

fn main() {
    let options = options_from_args();
    let scratch = match Scratch::new("veil-bench-blk-") {
        Ok(s) => s,
        Err(e) => fail(&e),
    };
    match bench(&scratch, &options) {
        Ok(true) => {}
        Ok(false) => std::process::exit(1),
        Err(e) => fail(&e),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("blk bench failed: {message}");
    std::process::exit(1)
}

struct Options {
    runs: usize,
    count: u64,
}

/// `--runs N` and `--count N` (cargo passes `--bench` too, which is ignored).
fn options_from_args() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let number = |flag: &str, default: u64| {
        let Some(i) = args.iter().position(|a| a == flag) else {
            return default;
        };
        match args.get(i + 1).map(|n| n.parse::<u64>()) {
            Some(Ok(n)) if n >= 1 => n,
            _ => fail(&format!("{flag} takes a number, 1 or more")),
        }
    };
    Options {
        runs: number("--runs", DEFAULT_RUNS as u64) as usize,
        count: number("--count", DEFAULT_COUNT),
    }
}

// ---------------------------------------------------------------------------------------------
// Cases and the guest's report

#[derive(Clone, Copy, PartialEq)]
enum Depth {
    One,
    /// As many as the queue holds (the kit's `depth=max`: 10 with a queue of 32 or more).
    Max,
}

#[derive(Clone, Copy)]
struct Case {
    size: u64,
    depth: Depth,
    write: bool,
}

impl Case {
    fn all() -> Vec<Case> {
        let mut cases = Vec::new();
        for write in [false, true] {
            for size in SIZES {
                for depth in [Depth::One, Depth::Max] {
                    cases.push(Case { size, depth, write });
                }
            }
        }
        cases
    }

    fn task(&self, count: u64) -> String {
        let depth = match self.depth {
            Depth::One => "1",
            Depth::Max => "max",
        };
        let write = if self.write { ",write=1" } else { "" };
        format!(
            "blk-bench:dev=0,size={},count={count},depth={depth}{write}",
            self.size
        )
    }

    fn label(&self) -> String {
        format!(
            "{} KiB {}",
            self.size >> 10,
            if self.write { "write" } else { "read" }
        )
    }
}

/// One `blk-bench:` line.
#[derive(Clone, Copy)]
struct Measurement {
    depth: u64,
    requests_per_s: f64,
    mb_per_s: f64,
}

/// `blk-bench: dev D, N reads of B bytes, depth K: R requests/s, M.MM MB/s (T ms, TSC F kHz)`,
/// checked against the case it should report.
fn parse_report(line: &str, case: &Case, count: u64) -> Result<Measurement, String> {
    let bad = || format!("unexpected blk-bench report `{line}`");
    let rest = line.strip_prefix("blk-bench: dev 0, ").ok_or_else(bad)?;
    let (head, figures) = rest.split_once(": ").ok_or_else(bad)?;
    let kind = if case.write { "writes" } else { "reads" };
    let (what, depth) = head.split_once(", depth ").ok_or_else(bad)?;
    if what != format!("{count} {kind} of {} bytes", case.size) {
        return Err(format!(
            "expected {count} {kind} of {} bytes, the guest reported `{line}`",
            case.size
        ));
    }
    let depth: u64 = depth.parse().map_err(|_| bad())?;
    if case.depth == Depth::One && depth != 1 {
        return Err(bad());
    }
    let mut words = figures.split_whitespace();
    let mut figure = |unit: &str| -> Result<f64, String> {
        let value = words.next().ok_or_else(bad)?.parse().map_err(|_| bad())?;
        match words.next() {
            Some(u) if u.trim_end_matches(',') == unit => Ok(value),
            _ => Err(bad()),
        }
    };
    Ok(Measurement {
        depth,
        requests_per_s: figure("requests/s")?,
        mb_per_s: figure("MB/s")?,
    })
}

// ---------------------------------------------------------------------------------------------
// The two VMMs

#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    Veil,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Veil => "veil",
            Vmm::Qemu => "qemu",
        }
    }

    /// The same machine on both: 1 vCPU, 64 MiB, the kit, one virtio-blk disk on `disk`, COM1
    /// on stdout. QEMU's disk has its defaults (cache=writeback, aio=threads).
    fn command(self, disk: &Path, tasks: &str) -> Command {
        let kit = veil_guests::kit_elf_path();
        match self {
            Vmm::Veil => {
                let mut cmd = Command::new(env!("CARGO_BIN_EXE_veil"));
                cmd.env_remove("VEIL_LOG")
                    .args(["run", "--memory", GUEST_RAM, "--serial", "stdio"])
                    .arg("--disk")
                    .arg(format!("path={}", disk.display()))
                    .args(["--cmdline", tasks, "--kernel"])
                    .arg(kit);
                cmd
            }
            Vmm::Qemu => {
                let mut cmd = Command::new("qemu-system-x86_64");
                cmd.args(["-accel", "kvm", "-M", "microvm", "-m", GUEST_RAM])
                    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
                    .args(["-serial", "stdio", "-monitor", "none"])
                    .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x01"])
                    .args(["-global", "virtio-mmio.force-legacy=false"])
                    .args(["-device", "virtio-blk-device,drive=d0", "-drive"])
                    .arg(format!("id=d0,file={},format=raw,if=none", disk.display()))
                    .arg("-append")
                    .arg(format!("{} {tasks}", support::MICROVM_FIRST_TRANSPORT))
                    .arg("-kernel")
                    .arg(kit);
                cmd
            }
        }
    }

    /// Did the kit exit with status 0? QEMU's isa-debug-exit turns status N into (N << 1) | 1.
    fn kit_succeeded(self, code: Option<i32>) -> bool {
        match self {
            Vmm::Veil => code == Some(0),
            Vmm::Qemu => code == Some(1),
        }
    }
}

/// One boot running every case.
fn boot(
    vmm: Vmm,
    scratch: &Scratch,
    disk: &Path,
    cases: &[Case],
    count: u64,
) -> Result<Vec<Measurement>, String> {
    let tasks: Vec<String> = cases.iter().map(|c| c.task(count)).collect();
    let mut proc = Proc::spawn(
        vmm.name(),
        &mut vmm.command(disk, &tasks.join(" ")),
        scratch,
    )?;
    let status = proc.wait_exit(BOOT_TIMEOUT)?;
    let out = proc.stdout();
    if let Some(line) = out
        .lines()
        .find(|l| l.contains("FAILED") || l.contains("error"))
    {
        return Err(format!("the guest reported `{line}`"));
    }
    if !vmm.kit_succeeded(status.code()) {
        return Err(format!(
            "{} exited ({status}) before the kit finished: {}",
            vmm.name(),
            proc.stderr_tail()
        ));
    }
    let reports: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("blk-bench:"))
        .collect();
    if reports.len() != cases.len() {
        // QEMU's own failures exit with 1 too, the status isa-debug-exit gives the kit's 0.
        return Err(format!(
            "the guest printed {} blk-bench reports, expected {} ({} exited: {status}; {})",
            reports.len(),
            cases.len(),
            vmm.name(),
            proc.stderr_tail()
        ));
    }
    reports
        .iter()
        .zip(cases)
        .map(|(line, case)| parse_report(line, case, count))
        .collect()
}

// ---------------------------------------------------------------------------------------------
// The run

/// Returns whether every boot of every VMM succeeded.
fn bench(scratch: &Scratch, options: &Options) -> Result<bool, String> {
    let qemu = support::qemu_version();
    println!("virtio-blk from the kit guest, {}", support::host_line());
    println!(
        "{}; {} boot(s) per VMM, alternating; {} requests per case; a {} MiB raw disk file, \
         page cache warm; 1 vCPU, {GUEST_RAM} of guest RAM",
        qemu.as_deref().unwrap_or("no QEMU"),
        options.runs,
        options.count,
        DISK_BYTES >> 20
    );
    let mut vmms = vec![Vmm::Veil];
    match &qemu {
        Ok(_) => vmms.push(Vmm::Qemu),
        Err(why) => println!("QEMU: skipped: {why}"),
    }

    let disk = scratch.path("disk.raw");
    support::raw_disk(&disk, DISK_BYTES)?;
    let cases = Case::all();
    let mut samples: Vec<Vec<Vec<Measurement>>> = vec![Vec::new(); vmms.len()];
    let mut loads: Vec<Vec<f64>> = vec![Vec::new(); vmms.len()];
    let mut failures = 0;
    for run in 0..options.runs {
        // Alternate who goes first too, so neither always follows the other.
        let order: Vec<usize> = if run % 2 == 0 {
            (0..vmms.len()).collect()
        } else {
            (0..vmms.len()).rev().collect()
        };
        for i in order {
            let vmm = vmms[i];
            let started = Instant::now();
            let others = support::OthersLoad::start();
            match boot(vmm, scratch, &disk, &cases, options.count) {
                Ok(m) => {
                    let load = others.cores();
                    println!(
                        "run {}/{}: {} done in {:.1} s; the rest of the host used {load:.2} cores",
                        run + 1,
                        options.runs,
                        vmm.name(),
                        started.elapsed().as_secs_f64()
                    );
                    samples[i].push(m);
                    loads[i].push(load);
                }
                Err(why) => {
                    println!(
                        "run {}/{}: {} FAILED: {why}",
                        run + 1,
                        options.runs,
                        vmm.name()
                    );
                    failures += 1;
                }
            }
        }
    }
    print_table(&cases, &vmms, &samples);
    for (vmm, loads) in vmms.iter().zip(&loads) {
        if !loads.is_empty() {
            println!(
                "the rest of the host during {}'s boots: median {:.2} cores, at most {:.2} \
                 (figures from boots beside a busy neighbour are lower and noisier)",
                vmm.name(),
                support::median(loads),
                loads.iter().copied().fold(0.0, f64::max)
            );
        }
    }
    Ok(failures == 0)
}

/// One case's medians over the boots that succeeded, the range of requests/s, and the depth
/// the guest reported.
struct Summary {
    requests_per_s: f64,
    mb_per_s: f64,
    range: (f64, f64),
    depth: u64,
}

fn summarize(boots: &[Vec<Measurement>], case: usize) -> Option<Summary> {
    if boots.is_empty() {
        return None;
    }
    let of =
        |f: fn(&Measurement) -> f64| -> Vec<f64> { boots.iter().map(|b| f(&b[case])).collect() };
    let rates = of(|m| m.requests_per_s);
    Some(Summary {
        requests_per_s: support::median(&rates),
        mb_per_s: support::median(&of(|m| m.mb_per_s)),
        range: (
            rates.iter().copied().fold(f64::INFINITY, f64::min),
            rates.iter().copied().fold(0.0, f64::max),
        ),
        depth: boots[0][case].depth,
    })
}

fn print_table(cases: &[Case], vmms: &[Vmm], samples: &[Vec<Vec<Measurement>>]) {
    let runs: Vec<String> = vmms
        .iter()
        .zip(samples)
        .map(|(v, s)| format!("{} {}", v.name(), s.len()))
        .collect();
    println!();
    println!(
        "medians over the boots that succeeded ({}); requests/s range in brackets; MB = 10^6 bytes",
        runs.join(", ")
    );
    println!();
    println!(
        "| request | depth | veil requests/s | veil MB/s | qemu requests/s | qemu MB/s | veil/qemu requests/s |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut goal_rows = Vec::new();
    for (c, case) in cases.iter().enumerate() {
        let veil = summarize(&samples[0], c);
        let qemu = samples.get(1).and_then(|s| summarize(s, c));
        let depth = veil
            .as_ref()
            .or(qemu.as_ref())
            .map_or("?".to_string(), |s| s.depth.to_string());
        let cells = |s: &Option<Summary>| match s {
            Some(s) => (
                format!(
                    "{:.0} ({:.0}-{:.0})",
                    s.requests_per_s, s.range.0, s.range.1
                ),
                format!("{:.2}", s.mb_per_s),
            ),
            None => ("-".into(), "-".into()),
        };
        let (veil_rate, veil_mb) = cells(&veil);
        let (qemu_rate, qemu_mb) = cells(&qemu);
        let ratio = match (&veil, &qemu) {
            (Some(v), Some(q)) if q.requests_per_s > 0.0 => {
                let r = v.requests_per_s / q.requests_per_s;
                if case.depth == Depth::One {
                    goal_rows.push((case.label(), r));
                }
                format!("{r:.2}x")
            }
            _ => "-".into(),
        };
        println!(
            "| {} | {depth} | {veil_rate} | {veil_mb} | {qemu_rate} | {qemu_mb} | {ratio} |",
            case.label()
        );
    }
    println!();
    if goal_rows.is_empty() {
        println!("goal (Veil >= {DEPTH_1_GOAL}x QEMU's requests/s at depth 1): not checked, no QEMU figures");
        return;
    }
    for (label, ratio) in goal_rows {
        let verdict = if ratio >= DEPTH_1_GOAL {
            "met"
        } else {
            "MISSED"
        };
        println!(
            "goal: Veil >= {DEPTH_1_GOAL}x QEMU's requests/s at depth 1, {label}: {ratio:.2}x, {verdict}"
        );
    }
}
