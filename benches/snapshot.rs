//! Restoring saved guests: `veil restore` against QEMU's `-incoming` from a saved migration
//! stream, same ELF, same run.
//!
//! 1. For 256 MiB and 1 GiB guests: the kit stamps every page from 16 MiB up (so the saved RAM
//!    is all data, nothing a VMM can skip as zero), then loops printing a line per round. Veil
//!    saves it with `veil ctl snapshot --stop`; QEMU with QMP `migrate` to `exec:cat > FILE`
//!    (this host's QEMU 7.2 has no `file:` URI). Then the time from starting `veil restore`
//!    (or `qemu -incoming exec:cat FILE`) to the restored guest's first serial byte.
//! 2. Ten clones of the 256 MiB snapshot started together: the time until all ten have
//!    printed, and their total resident memory (PSS, shared pages divided among the clones,
//!    and RSS), against the goal of 1.2 x (one clone's touched guest memory + ten VMM
//!    overheads).
//!
//! `cargo bench --bench snapshot [-- --runs N] [--mib 256,1024] [--no-qemu] [--no-clones]
//! [--pause-ms N] [--baseline VEIL]` (QEMU is skipped, with a note, when not installed or with
//! `--no-qemu`). `--runs N` restores each Veil snapshot N times, `--pause-ms` apart (default
//! 200: an idle host's restore; 0 keeps the cores awake, as on a busy host), and reports the
//! minimum and median; `--baseline VEIL` restores it as often with another `veil` binary too
//! (one built from an older commit, say), the two alternating, so both are timed on the same
//! host at once. Needs `/dev/kvm`, about 4 GiB of free memory and 2.5 GiB of disk under
//! `target/tmp`.

mod support;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::qmp::Qmp;
use support::Scratch;

const SIZES_MIB: [u64; 2] = [256, 1024];
const CLONES: usize = 10;
const CLONE_MIB: u64 = 256;
/// Stamping 1 GiB one word per page takes a while on the emulating hosts.
const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Each QMP answer gets a minute on these slow, emulating hosts.
const QMP_REPLY_TIMEOUT: Duration = Duration::from_secs(60);
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(60);
const FIRST_BYTE_GOAL: Duration = Duration::from_millis(10);
/// A pause after saving a guest before the restores are timed.
const SAVE_SETTLE: Duration = Duration::from_secs(1);
/// The default pause between two restores (`--pause-ms`).
const RUN_SETTLE: Duration = Duration::from_millis(200);
const FASTER_THAN_QEMU_GOAL: f64 = 10.0;
const CLONE_MEMORY_GOAL: f64 = 1.2;

fn fail(message: &str) -> ! {
    eprintln!("snapshot bench failed: {message}");
    std::process::exit(1)
}

struct Options {
    /// Veil restores per size.
    runs: usize,
    sizes_mib: Vec<u64>,
    qemu: bool,
    clones: bool,
    /// Another `veil` binary to time on the same snapshots.
    baseline: Option<PathBuf>,
    /// Between two restores.
    pause: Duration,
}

/// `--runs N`, `--mib A,B`, `--no-qemu`, `--no-clones`, `--baseline VEIL` and `--pause-ms N`
/// (cargo passes `--bench` too, which is ignored).
fn options_from_args() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .map(|i| args.get(i + 1).map(String::as_str).unwrap_or(""))
    };
    let runs = match value("--runs") {
        None => 1,
        Some(n) => match n.parse() {
            Ok(n) if n >= 1 => n,
            _ => fail("--runs takes a number of runs, 1 or more"),
        },
    };
    let sizes_mib = match value("--mib") {
        None => SIZES_MIB.to_vec(),
        Some(list) => list
            .split(',')
            .map(|m| match m.parse() {
                Ok(m) if m >= 64 => m,
                _ => fail("--mib takes guest sizes in MiB, 64 or more, separated by commas"),
            })
            .collect(),
    };
    let clones = !args.iter().any(|a| a == "--no-clones");
    if clones && !sizes_mib.contains(&CLONE_MIB) {
        fail("the clones restore the 256 MiB snapshot: add 256 to --mib, or --no-clones");
    }
    let pause = match value("--pause-ms") {
        None => RUN_SETTLE,
        Some(n) => match n.parse() {
            Ok(n) => Duration::from_millis(n),
            _ => fail("--pause-ms takes a number of milliseconds"),
        },
    };
    let baseline = value("--baseline").map(PathBuf::from);
    if let Some(path) = &baseline {
        if !path.is_file() {
            fail("--baseline takes the path of a veil binary");
        }
    }
    Options {
        runs,
        sizes_mib,
        qemu: !args.iter().any(|a| a == "--no-qemu"),
        clones,
        baseline,
        pause,
    }
}

/// Stamps every page from 16 MiB to 16 MiB below the end, then prints a line per round.
fn cmdline(mib: u64) -> String {
    let pages = (mib - 32) << 8;
    format!("stamp:seed=1,first=0x1000,count={pages} dirty-loop:seed=3,first=0x800,count=1,check=1")
}

fn main() {
    let options = options_from_args();
    let scratch = Scratch::new("veil-bench-snapshot-").unwrap_or_else(|e| fail(&e));
    let qemu = if options.qemu {
        support::qemu_version()
    } else {
        Err("--no-qemu".to_string())
    };
    println!(
        "restore of the kit guest from a snapshot, {}; {}; {} Veil restore(s) per size, one of QEMU",
        support::host_line(),
        qemu.as_deref().unwrap_or("no QEMU"),
        options.runs
    );
    if let Err(why) = &qemu {
        println!("QEMU: skipped: {why}");
    }
    let mut failed = false;
    let mut report = |what: &str, result: Result<(), String>| {
        if let Err(e) = result {
            println!("{what}: FAILED: {e}");
            failed = true;
        }
    };
    for &mib in &options.sizes_mib {
        report(
            &format!("{mib} MiB"),
            restore(&scratch, mib, &options, qemu.is_ok()),
        );
    }
    if options.clones {
        report("clones", clones(&scratch, qemu.is_ok()));
    }
    if failed {
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------------------------
// Saving

fn veil() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_veil"));
    c.env_remove("VEIL_LOG");
    c
}

/// Saves the stamped guest of `mib` MiB with Veil into `scratch/veil-MIB`.
fn save_with_veil(scratch: &Scratch, mib: u64) -> Result<PathBuf, String> {
    let (api, serial) = (
        scratch.path(&format!("veil-{mib}.sock")),
        scratch.path(&format!("veil-{mib}.serial")),
    );
    let mut cmd = veil();
    cmd.args([
        "run",
        "--memory",
        &format!("{mib}M"),
        "--cmdline",
        &cmdline(mib),
    ])
    .arg("--api-socket")
    .arg(&api)
    .arg("--serial")
    .arg(format!("file:{}", serial.display()))
    .arg("--kernel")
    .arg(veil_guests::kit_elf_path());
    let mut source = support::Proc::spawn(&format!("veil-source-{mib}"), &mut cmd, scratch)?;
    wait_for_line(&serial, "round 2 checked", READY_TIMEOUT)?;
    let dir = scratch.path(&format!("veil-{mib}"));
    let out = veil()
        .arg("ctl")
        .arg("--api-socket")
        .arg(&api)
        .args(["--json", "snapshot", "--stop", "--to"])
        .arg(&dir)
        .output()
        .map_err(|e| format!("veil ctl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "veil ctl snapshot: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    println!(
        "  veil ctl snapshot, {mib} MiB: {:.0} ms, guest paused {:.0} ms, {} pages written",
        r["total_ms"].as_f64().unwrap_or(0.0),
        r["paused_ms"].as_f64().unwrap_or(0.0),
        r["pages_written"]
    );
    source.wait_exit(Duration::from_secs(30))?;
    Ok(dir)
}

fn qemu(mib: u64) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "kvm", "-M", "microvm", "-m", &format!("{mib}M")])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-monitor", "none"])
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x01"])
        .arg("-kernel")
        .arg(veil_guests::kit_elf_path())
        .args(["-append", &cmdline(mib)]);
    c
}

/// Saves the same guest with QEMU: QMP `migrate` to `exec:cat > FILE`, the stream QEMU's
/// `-incoming` reads back.
fn save_with_qemu(scratch: &Scratch, mib: u64) -> Result<PathBuf, String> {
    let (qmp_path, serial) = (
        scratch.path(&format!("qemu-{mib}.qmp")),
        scratch.path(&format!("qemu-{mib}.serial")),
    );
    let mut cmd = qemu(mib);
    cmd.arg("-serial")
        .arg(format!("file:{}", serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
    let mut source = support::Proc::spawn(&format!("qemu-source-{mib}"), &mut cmd, scratch)?;
    wait_for_line(&serial, "round 2 checked", READY_TIMEOUT)?;
    let file = scratch.path(&format!("qemu-{mib}.migration"));
    let mut qmp = Qmp::connect(&qmp_path, &mut source, QMP_REPLY_TIMEOUT)?;
    // Live, as QEMU saves a running guest: a guest stopped first would arrive stopped.
    let started = Instant::now();
    qmp.execute(
        "migrate",
        serde_json::json!({ "uri": format!("exec:cat > {}", file.display()) }),
    )?;
    loop {
        let info = qmp.execute("query-migrate", serde_json::json!({}))?;
        match info["status"].as_str() {
            Some("completed") => break,
            Some("failed" | "cancelled") => return Err(format!("QEMU's migrate: {info}")),
            _ if started.elapsed() > READY_TIMEOUT => return Err("QEMU's migrate hangs".into()),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    println!(
        "  qemu migrate to exec:cat, {mib} MiB: {:.0} ms, {} MiB file",
        started.elapsed().as_secs_f64() * 1e3,
        std::fs::metadata(&file).map_or(0, |m| m.len() >> 20)
    );
    Ok(file)
}

// ---------------------------------------------------------------------------------------------
// Restoring

fn veil_restore(dir: &Path) -> Command {
    let mut c = veil();
    c.arg("restore").arg("--from").arg(dir);
    c
}

fn baseline_restore(baseline: &Path, dir: &Path) -> Command {
    let mut c = Command::new(baseline);
    c.env_remove("VEIL_LOG")
        .arg("restore")
        .arg("--from")
        .arg(dir);
    c
}

/// "min X ms, median Y ms (each run's)".
fn min_median(times: &[Duration]) -> String {
    let list: Vec<String> = times.iter().map(|t| format!("{:.1}", ms(*t))).collect();
    format!(
        "min {:.2} ms, median {:.2} ms ({} ms)",
        ms(times.iter().copied().min().unwrap_or_default()),
        ms(support::median(times)),
        list.join(" ")
    )
}

fn qemu_restore(mib: u64, file: &Path) -> Command {
    let mut c = qemu(mib);
    c.args(["-serial", "stdio", "-incoming"])
        .arg(format!("exec:cat {}", file.display()));
    c
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Restores the Veil snapshot of `mib` MiB `runs` times (one at a time, alternating with the
/// baseline binary if given) and QEMU's once.
fn restore(scratch: &Scratch, mib: u64, options: &Options, with_qemu: bool) -> Result<(), String> {
    let (runs, baseline) = (options.runs, options.baseline.as_deref());
    let dir = save_with_veil(scratch, mib)?;
    // Each restore starts on a settled host: not while the kernel still frees (and reports to
    // its hypervisor) the saved source's RAM or tears down the previous clone.
    std::thread::sleep(SAVE_SETTLE);
    let (mut times, mut baseline_times) = (Vec::with_capacity(runs), Vec::new());
    for run in 0..runs {
        if run > 0 {
            std::thread::sleep(options.pause);
        }
        times.push(Started::spawn(veil_restore(&dir))?.first_byte()?);
        if let Some(baseline) = baseline {
            std::thread::sleep(options.pause);
            baseline_times.push(Started::spawn(baseline_restore(baseline, &dir))?.first_byte()?);
        }
    }
    let veil = support::median(&times);
    if runs == 1 {
        println!(
            "{mib:>5} MiB  veil restore: start to the restored guest's first serial byte {:.2} ms",
            ms(veil)
        );
    } else {
        println!(
            "{mib:>5} MiB  veil restore: start to the restored guest's first serial byte, {runs} runs: {}",
            min_median(&times)
        );
    }
    if let Some(baseline) = baseline {
        println!(
            "{mib:>5} MiB  baseline {} restore, alternating with the above: {}",
            baseline.display(),
            min_median(&baseline_times)
        );
    }
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    if mib == 1024 {
        println!(
            "goal: 1 GiB restored to first byte within {} ms: {:.2} ms{}, {}",
            FIRST_BYTE_GOAL.as_millis(),
            ms(veil),
            if runs == 1 { "" } else { " (median)" },
            verdict(veil <= FIRST_BYTE_GOAL)
        );
    }
    if with_qemu {
        let file = save_with_qemu(scratch, mib)?;
        std::thread::sleep(SAVE_SETTLE);
        let qemu = Started::spawn(qemu_restore(mib, &file))?.first_byte()?;
        let speedup = qemu.as_secs_f64() / veil.as_secs_f64();
        println!(
            "{mib:>5} MiB  qemu -incoming exec:cat: {:.2} ms; ratio veil/qemu {:.4} (QEMU takes {speedup:.1}x as long)",
            ms(qemu),
            veil.as_secs_f64() / qemu.as_secs_f64()
        );
        println!(
            "goal: {mib} MiB restore at least {FASTER_THAN_QEMU_GOAL}x faster than QEMU: {speedup:.1}x, {}",
            verdict(speedup >= FASTER_THAN_QEMU_GOAL)
        );
        // The clones reuse the 256 MiB one.
        if mib != CLONE_MIB {
            let _ = std::fs::remove_file(&file);
        }
    }
    Ok(())
}

fn clones(scratch: &Scratch, with_qemu: bool) -> Result<(), String> {
    let dir = scratch.path(&format!("veil-{CLONE_MIB}"));
    // One clone alone: what its guest touches and what the VMM costs beside it.
    let mut one = Started::spawn(veil_restore(&dir))?;
    one.first_byte()?;
    std::thread::sleep(Duration::from_millis(300));
    let alone = Memory::of(one.child.id(), CLONE_MIB << 10)?;
    drop(one);
    let veil = start_clones(|| veil_restore(&dir))?;
    let goal_kib =
        CLONE_MEMORY_GOAL * (alone.guest_rss_kib + CLONES as u64 * alone.other_rss_kib) as f64;
    println!(
        "{CLONES} veil clones of the {CLONE_MIB} MiB snapshot: all running (first byte) after {:.2} ms; \
         total PSS {:.1} MiB, total RSS {:.1} MiB (one clone alone: {:.2} MiB of guest RAM touched, \
         {:.2} MiB beside it)",
        ms(veil.all_running),
        veil.pss_kib as f64 / 1024.0,
        veil.rss_kib as f64 / 1024.0,
        alone.guest_rss_kib as f64 / 1024.0,
        alone.other_rss_kib as f64 / 1024.0,
    );
    println!(
        "goal: ten clones' PSS within {CLONE_MEMORY_GOAL} x (touched guest memory + ten VMM overheads) = {:.1} MiB: {:.1} MiB, {}",
        goal_kib / 1024.0,
        veil.pss_kib as f64 / 1024.0,
        if (veil.pss_kib as f64) <= goal_kib { "met" } else { "MISSED" }
    );
    if with_qemu {
        let file = scratch.path(&format!("qemu-{CLONE_MIB}.migration"));
        let file = if file.exists() {
            file
        } else {
            save_with_qemu(scratch, CLONE_MIB)?
        };
        let qemu = start_clones(|| qemu_restore(CLONE_MIB, &file))?;
        println!(
            "{CLONES} qemu clones (-incoming exec:cat): all running after {:.2} ms; total PSS {:.1} MiB, \
             total RSS {:.1} MiB",
            ms(qemu.all_running),
            qemu.pss_kib as f64 / 1024.0,
            qemu.rss_kib as f64 / 1024.0
        );
        println!(
            "ratio veil/qemu for ten clones: time until all run {:.4}, total PSS {:.4}",
            veil.all_running.as_secs_f64() / qemu.all_running.as_secs_f64(),
            veil.pss_kib as f64 / qemu.pss_kib as f64
        );
    }
    Ok(())
}

struct Clones {
    all_running: Duration,
    pss_kib: u64,
    rss_kib: u64,
}

/// Starts `CLONES` VMMs together; returns when all have printed, and their memory then.
fn start_clones(command: impl Fn() -> Command) -> Result<Clones, String> {
    let start = Instant::now();
    let mut started: Vec<Started> = (0..CLONES)
        .map(|_| Started::spawn_at(command(), start))
        .collect::<Result<_, _>>()?;
    let mut all_running = Duration::ZERO;
    for clone in &mut started {
        all_running = all_running.max(clone.first_byte()?);
    }
    std::thread::sleep(Duration::from_millis(300));
    let (mut pss_kib, mut rss_kib) = (0, 0);
    for clone in &started {
        let (pss, rss) = rollup(clone.child.id())?;
        pss_kib += pss;
        rss_kib += rss;
    }
    Ok(Clones {
        all_running,
        pss_kib,
        rss_kib,
    })
}

/// A VMM whose stdout (the guest's serial port) a thread reads: it notes when the first byte
/// came and then drains the rest, so a guest that prints on never blocks on a full pipe.
struct Started {
    child: Child,
    start: Instant,
    first: mpsc::Receiver<std::io::Result<Instant>>,
}

impl Started {
    fn spawn(cmd: Command) -> Result<Self, String> {
        Self::spawn_at(cmd, Instant::now())
    }

    fn spawn_at(mut cmd: Command, start: Instant) -> Result<Self, String> {
        let mut child = support::die_with_the_bench(&mut cmd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
        let mut stdout = child.stdout.take().ok_or("no stdout pipe")?;
        let (tx, first) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let read = stdout.read(&mut buf);
            let _ = tx.send(match read {
                Ok(0) => Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(_) => Ok(Instant::now()),
                Err(e) => Err(e),
            });
            while matches!(stdout.read(&mut buf), Ok(n) if n > 0) {}
        });
        Ok(Self {
            child,
            start,
            first,
        })
    }

    fn first_byte(&mut self) -> Result<Duration, String> {
        match self.first.recv_timeout(FIRST_BYTE_TIMEOUT) {
            Ok(Ok(at)) => Ok(at - self.start),
            Ok(Err(e)) => {
                let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                Err(format!("no serial output: {e} (exited: {status})"))
            }
            Err(_) => Err(format!(
                "no serial output after {} s",
                FIRST_BYTE_TIMEOUT.as_secs()
            )),
        }
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---------------------------------------------------------------------------------------------
// Memory and files

/// One VMM's resident memory: in its guest RAM mapping and beside it.
struct Memory {
    guest_rss_kib: u64,
    other_rss_kib: u64,
}

impl Memory {
    /// From `/proc/PID/smaps`: guest RAM is the mapping of exactly `guest_kib`.
    fn of(pid: u32, guest_kib: u64) -> Result<Self, String> {
        let mappings = support::smaps::mappings(pid)?;
        let guest: u64 = mappings
            .iter()
            .filter(|m| m.size_kib == guest_kib)
            .map(|m| m.rss_kib)
            .sum();
        let all: u64 = mappings.iter().map(|m| m.rss_kib).sum();
        Ok(Self {
            guest_rss_kib: guest,
            other_rss_kib: all - guest,
        })
    }
}

/// (PSS, RSS) in KiB from `/proc/PID/smaps_rollup`.
fn rollup(pid: u32) -> Result<(u64, u64), String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map_err(|e| format!("cannot read /proc/{pid}/smaps_rollup: {e}"))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    Ok((field("Pss:"), field("Rss:")))
}

fn wait_for_line(file: &Path, needle: &str, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        if text.contains("FAILED") || text.contains("veil-kit: error") {
            return Err(format!("the guest failed: {text}"));
        }
        if Instant::now() > deadline {
            return Err(format!("{} never said {needle:?}", file.display()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
