//! Start-up latency and memory overhead of `veil run` against QEMU `-M microvm`, same guest,
//! same run.
//!
//! For each VMM, `RUNS` times: spawn it on the kit's greeting guest (which then spins), time
//! from spawn to the first byte on the guest's serial port, then read `/proc/PID/smaps` and sum
//! the resident memory of every mapping except guest RAM. Reports medians and Veil/QEMU ratios.
//!
//! `cargo bench --bench boot` (QEMU is skipped, with a note, when not installed).

use std::io::Read;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 15;
const GUEST_RAM_MIB: u64 = 64;
const CMDLINE: &str = "greet spin";

struct Sample {
    first_byte: Duration,
    overhead_kib: u64,
}

fn main() {
    let kit = veil_guests::kit_elf_path();
    let veil = env!("CARGO_BIN_EXE_veil");
    let veil_cmd = || {
        let mut c = Command::new(veil);
        c.args([
            "run",
            "--memory",
            &format!("{GUEST_RAM_MIB}M"),
            "--cmdline",
            CMDLINE,
            "--kernel",
        ])
        .arg(kit);
        c
    };
    let qemu_cmd = || {
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
        .args([
            "-serial", "stdio", "-monitor", "none", "-append", CMDLINE, "-kernel",
        ])
        .arg(kit);
        c
    };
    let have_qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());

    // Interleave the two so drift in machine load hits both alike.
    let mut veil_samples = Vec::new();
    let mut qemu_samples = Vec::new();
    for _ in 0..RUNS {
        veil_samples.push(measure(veil_cmd()));
        if have_qemu {
            qemu_samples.push(measure(qemu_cmd()));
        }
    }
    let veil = summarize("veil run", &veil_samples);
    if have_qemu {
        let qemu = summarize("qemu -M microvm", &qemu_samples);
        println!(
            "ratio veil/qemu: first byte {:.3}, overhead {:.3}",
            veil.0.as_secs_f64() / qemu.0.as_secs_f64(),
            veil.1 as f64 / qemu.1 as f64
        );
    } else {
        println!("qemu-system-x86_64 not installed: QEMU comparison skipped");
    }
}

fn measure(mut cmd: Command) -> Sample {
    let start = Instant::now();
    let mut child: Child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("VMM starts");
    let mut byte = [0u8; 1];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut byte)
        .expect("guest prints");
    let first_byte = start.elapsed();
    // Let the rest of the greeting through, so the VMM is in its steady state.
    std::thread::sleep(Duration::from_millis(100));
    let overhead_kib = resident_beyond_guest_ram(child.id(), GUEST_RAM_MIB << 10);
    let _ = child.kill();
    let _ = child.wait();
    Sample {
        first_byte,
        overhead_kib,
    }
}

/// Resident KiB of every mapping except the one holding guest RAM (the mapping of exactly the
/// guest's size, or failing that the largest mapping at least that big).
fn resident_beyond_guest_ram(pid: u32, guest_kib: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).expect("smaps readable");
    let mut mappings: Vec<(u64, u64)> = Vec::new(); // (size KiB, rss KiB)
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        match (fields.next(), fields.next()) {
            (Some("Size:"), Some(kib)) => mappings.push((kib.parse().unwrap(), 0)),
            (Some("Rss:"), Some(kib)) => mappings.last_mut().unwrap().1 = kib.parse().unwrap(),
            _ => {}
        }
    }
    let guest = mappings.iter().position(|m| m.0 == guest_kib).or_else(|| {
        mappings
            .iter()
            .enumerate()
            .filter(|(_, m)| m.0 >= guest_kib)
            .max_by_key(|(_, m)| m.0)
            .map(|(i, _)| i)
    });
    mappings
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != guest)
        .map(|(_, m)| m.1)
        .sum()
}

fn summarize(name: &str, samples: &[Sample]) -> (Duration, u64) {
    let mut times: Vec<Duration> = samples.iter().map(|s| s.first_byte).collect();
    let mut rss: Vec<u64> = samples.iter().map(|s| s.overhead_kib).collect();
    times.sort();
    rss.sort();
    let (t, r) = (times[times.len() / 2], rss[rss.len() / 2]);
    println!(
        "{name:<16} start to first serial byte: median {:.2} ms (min {:.2}, max {:.2}); \
         resident beyond guest RAM: median {:.2} MiB",
        t.as_secs_f64() * 1e3,
        times[0].as_secs_f64() * 1e3,
        times[times.len() - 1].as_secs_f64() * 1e3,
        r as f64 / 1024.0
    );
    (t, r)
}
