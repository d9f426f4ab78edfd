//! Start-up latency and memory overhead of `veil run` against QEMU `-M microvm`, same guest,
//! same run.
//!
//! For each VMM, `--runs N` times (default 15), alternating: spawn it on the kit's greeting
//! guest (which then spins), time from spawn to the first byte on the guest's serial port, then
//! read `/proc/PID/smaps` and sum the resident memory of every mapping except guest RAM.
//! Reports medians, Veil/QEMU ratios and the goals: first byte within 20 ms and within 1/3 of
//! QEMU's, resident memory beyond guest RAM under 8 MiB. Each VMM's line also says how much CPU
//! the rest of the host used meanwhile: on two shared cores a busy neighbour moves the times.
//!
//! With `--disk`, both VMMs also get a virtio-blk disk (a 64 MiB raw file): Veil
//! `--disk path=FILE`, QEMU `virtio-blk-device` on modern virtio-mmio; Veil also gets a vsock
//! device (QEMU's vhost-vsock needs `/dev/vhost-vsock`, which these hosts lack). The guest uses
//! neither; what counts is what the devices cost at start-up and in memory.
//!
//! With `--seccomp-cost`, Veil also runs with `--seccomp off` in the same alternation, and the
//! bench reports the ratio of its figures with filters (the default) to those without.
//!
//! `cargo bench --bench boot [-- --disk] [--seccomp-cost] [--runs N]` (QEMU is skipped, with a
//! note, when not installed). A VMM that fails is reported and the bench exits non-zero.

mod support;

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::Scratch;

const DEFAULT_RUNS: usize = 15;
const GUEST_RAM_MIB: u64 = 64;
const CMDLINE: &str = "greet spin";
const DISK_BYTES: u64 = 64 << 20;
/// A VMM whose guest has printed nothing by then has failed.
const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(30);
const FIRST_BYTE_GOAL: Duration = Duration::from_millis(20);
/// Veil's first byte at most this fraction of QEMU's.
const FIRST_BYTE_GOAL_OF_QEMU: f64 = 1.0 / 3.0;
const OVERHEAD_GOAL_KIB: u64 = 8 << 10;

struct Sample {
    first_byte: Duration,
    overhead_kib: u64,
    /// Cores' worth of CPU the rest of the host used meanwhile.
    others: f64,
}

struct Options {
    runs: usize,
    disk: bool,
    seccomp_cost: bool,
}

/// `--runs N`, `--disk` and `--seccomp-cost` (cargo passes `--bench` too, which is ignored).
fn options_from_args() -> Options {
    let args: Vec<String> = std::env::args().collect();
    let runs = match args.iter().position(|a| a == "--runs") {
        None => DEFAULT_RUNS,
        Some(i) => match args.get(i + 1).map(|n| n.parse()) {
            Some(Ok(n)) if n >= 1 => n,
            _ => fail("--runs takes a number of runs, 1 or more"),
        },
    };
    Options {
        runs,
        disk: args.iter().any(|a| a == "--disk"),
        seccomp_cost: args.iter().any(|a| a == "--seccomp-cost"),
    }
}

fn fail(message: &str) -> ! {
    eprintln!("boot bench failed: {message}");
    std::process::exit(1)
}

fn main() {
    let options = options_from_args();
    let scratch = Scratch::new("veil-bench-boot-").unwrap_or_else(|e| fail(&e));
    let disk = scratch.path("disk.raw");
    if options.disk {
        support::raw_disk(&disk, DISK_BYTES).unwrap_or_else(|e| fail(&e));
    }
    let disk = options.disk.then_some(disk.as_path());
    let qemu = support::qemu_version();
    println!(
        "boot of the kit's greeting guest, {}; {}; {} runs per VMM, alternating; {GUEST_RAM_MIB} MiB \
         of guest RAM{}",
        support::host_line(),
        qemu.as_deref().unwrap_or("no QEMU"),
        options.runs,
        if options.disk {
            format!(
                ", one virtio-blk disk ({} MiB raw file), and a vsock device for Veil",
                DISK_BYTES >> 20
            )
        } else {
            ", no devices".into()
        }
    );
    if let Err(why) = &qemu {
        println!("QEMU: skipped: {why}");
    }

    // Interleave the two so drift in machine load hits both alike.
    let mut veil_samples = Vec::new();
    let mut unfiltered_samples = Vec::new();
    let mut qemu_samples = Vec::new();
    let mut failures = 0;
    for run in 0..options.runs {
        let mut one = |name: &str, cmd: Command, samples: &mut Vec<Sample>| match measure(cmd) {
            Ok(s) => samples.push(s),
            Err(why) => {
                println!("run {}/{}: {name} FAILED: {why}", run + 1, options.runs);
                failures += 1;
            }
        };
        one("veil", veil_cmd(disk, "on"), &mut veil_samples);
        if options.seccomp_cost {
            one(
                "veil --seccomp off",
                veil_cmd(disk, "off"),
                &mut unfiltered_samples,
            );
        }
        if qemu.is_ok() {
            one("qemu", qemu_cmd(disk), &mut qemu_samples);
        }
    }
    let veil = summarize("veil run", &veil_samples);
    if options.seccomp_cost {
        if let (Some(on), Some(off)) = (
            &veil,
            &summarize("veil run --seccomp off", &unfiltered_samples),
        ) {
            println!(
                "ratio seccomp on/off: first byte {:.3}, overhead {:.3}",
                on.0.as_secs_f64() / off.0.as_secs_f64(),
                on.1 as f64 / off.1 as f64
            );
        }
    }
    let qemu = match qemu {
        Ok(_) => summarize("qemu -M microvm", &qemu_samples),
        Err(_) => None,
    };
    if let (Some(veil), Some(qemu)) = (&veil, &qemu) {
        println!(
            "ratio veil/qemu: first byte {:.3}, overhead {:.3}",
            veil.0.as_secs_f64() / qemu.0.as_secs_f64(),
            veil.1 as f64 / qemu.1 as f64
        );
    }
    if let Some(veil) = &veil {
        print_goals(veil, qemu.as_ref());
    }
    if failures > 0 {
        std::process::exit(1);
    }
}

fn veil_cmd(disk: Option<&Path>, seccomp: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_veil"));
    c.env_remove("VEIL_LOG").args([
        "run",
        "--memory",
        &format!("{GUEST_RAM_MIB}M"),
        "--cmdline",
        CMDLINE,
        "--seccomp",
        seccomp,
    ]);
    if let Some(disk) = disk {
        c.arg("--disk").arg(format!("path={}", disk.display()));
        // Beside the disk, in the bench's scratch folder; a stale socket file is replaced.
        let socket = disk.with_file_name("boot.vsock");
        c.arg("--vsock")
            .arg(format!("cid=3,socket={}", socket.display()));
    }
    c.arg("--kernel").arg(veil_guests::kit_elf_path());
    c
}

fn qemu_cmd(disk: Option<&Path>) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-accel",
        "kvm",
        "-M",
        "microvm",
        "-m",
        &format!("{GUEST_RAM_MIB}M"),
    ])
    .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
    .args(["-serial", "stdio", "-monitor", "none"]);
    let mut cmdline = CMDLINE.to_string();
    if let Some(disk) = disk {
        c.args(["-global", "virtio-mmio.force-legacy=false"])
            .args(["-device", "virtio-blk-device,drive=d0", "-drive"])
            .arg(format!("id=d0,file={},format=raw,if=none", disk.display()));
        // What Veil appends for its disk, so both guests parse the same kind of line.
        cmdline = format!("{} {cmdline}", support::MICROVM_FIRST_TRANSPORT);
    }
    c.arg("-append")
        .arg(cmdline)
        .arg("-kernel")
        .arg(veil_guests::kit_elf_path());
    c
}

fn measure(mut cmd: Command) -> Result<Sample, String> {
    let others = support::OthersLoad::start();
    let start = Instant::now();
    let child = support::die_with_the_bench(&mut cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", cmd.get_program()))?;
    let mut child = Killed(child);
    let mut stdout = child.0.stdout.take().ok_or("no stdout pipe")?;
    // The read blocks, so a thread does it and notes the time; this one keeps the timeout.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut byte = [0u8; 1];
        let read = stdout.read_exact(&mut byte);
        let _ = tx.send(read.map(|()| (Instant::now(), stdout)));
    });
    let (first_byte, stdout) = match rx.recv_timeout(FIRST_BYTE_TIMEOUT) {
        Ok(Ok((at, stdout))) => (at - start, stdout),
        Ok(Err(e)) => {
            let status = child.0.wait().map(|s| s.to_string()).unwrap_or_default();
            return Err(format!("no serial output: {e} (exited: {status})"));
        }
        Err(_) => {
            return Err(format!(
                "no serial output after {} s",
                FIRST_BYTE_TIMEOUT.as_secs()
            ))
        }
    };
    // Let the rest of the greeting through, so the VMM is in its steady state.
    std::thread::sleep(Duration::from_millis(100));
    let overhead_kib = resident_beyond_guest_ram(child.0.id(), GUEST_RAM_MIB << 10)?;
    drop(stdout);
    drop(child);
    Ok(Sample {
        first_byte,
        overhead_kib,
        others: others.cores(),
    })
}

/// A child killed and reaped when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Resident KiB of every mapping except the one holding guest RAM (the mapping of exactly the
/// guest's size, or failing that the largest mapping at least that big).
fn resident_beyond_guest_ram(pid: u32, guest_kib: u64) -> Result<u64, String> {
    let mappings = support::smaps::mappings(pid)?;
    let guest = mappings
        .iter()
        .position(|m| m.size_kib == guest_kib)
        .or_else(|| {
            mappings
                .iter()
                .enumerate()
                .filter(|(_, m)| m.size_kib >= guest_kib)
                .max_by_key(|(_, m)| m.size_kib)
                .map(|(i, _)| i)
        });
    Ok(mappings
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != guest)
        .map(|(_, m)| m.rss_kib)
        .sum())
}

fn summarize(name: &str, samples: &[Sample]) -> Option<(Duration, u64)> {
    if samples.is_empty() {
        println!("{name:<16} no successful runs");
        return None;
    }
    let mut times: Vec<Duration> = samples.iter().map(|s| s.first_byte).collect();
    let mut rss: Vec<u64> = samples.iter().map(|s| s.overhead_kib).collect();
    times.sort();
    rss.sort();
    let (t, r) = (times[times.len() / 2], rss[rss.len() / 2]);
    let others: Vec<f64> = samples.iter().map(|s| s.others).collect();
    println!(
        "{name:<16} start to first serial byte: median {:.2} ms (min {:.2}, max {:.2}); \
         resident beyond guest RAM: median {:.2} MiB (min {:.2}, max {:.2}); {} runs; the rest \
         of the host used a median {:.2} cores (at most {:.2})",
        t.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        r as f64 / 1024.0,
        rss[0] as f64 / 1024.0,
        rss[rss.len() - 1] as f64 / 1024.0,
        samples.len(),
        support::median(&others),
        others.iter().copied().fold(0.0, f64::max)
    );
    Some((t, r))
}

fn print_goals(veil: &(Duration, u64), qemu: Option<&(Duration, u64)>) {
    let verdict = |met: bool| if met { "met" } else { "MISSED" };
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "goal: first byte within {} ms: {:.2} ms, {}",
        FIRST_BYTE_GOAL.as_millis(),
        ms(veil.0),
        verdict(veil.0 <= FIRST_BYTE_GOAL)
    );
    match qemu {
        Some(qemu) => {
            let ratio = veil.0.as_secs_f64() / qemu.0.as_secs_f64();
            println!(
                "goal: first byte within 1/3 of QEMU's: {ratio:.3} of QEMU's {:.2} ms, {}",
                ms(qemu.0),
                verdict(ratio <= FIRST_BYTE_GOAL_OF_QEMU)
            );
        }
        None => println!("goal: first byte within 1/3 of QEMU's: not checked, no QEMU figures"),
    }
    println!(
        "goal: resident beyond guest RAM under {} MiB: {:.2} MiB, {}",
        OVERHEAD_GOAL_KIB >> 10,
        veil.1 as f64 / 1024.0,
        verdict(veil.1 < OVERHEAD_GOAL_KIB)
    );
}
