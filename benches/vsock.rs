//! virtio-vsock throughput: a host program echoes data through the kit guest (`vsock-echo`) and
//! measures host to guest and back, one connection, over the device's UNIX socket.
//!
//! There is no peer on these hosts to compare with in the same run: QEMU's vhost-vsock needs
//! the host kernel's `/dev/vhost-vsock` (absent here), and its vhost-user vsock needs a backend
//! process that would be the thing measured. So the bench reports Veil's rate alone, with the
//! spread over `--runs N` boots (default 5) of `--mib M` MiB each (default 16).
//!
//! `cargo bench --bench vsock [-- --runs N --mib M]`

mod support;

use std::io::{Read, Write};
use std::process::Command;
use std::time::{Duration, Instant};

use support::{Proc, Scratch};

fn option(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One boot: the guest echoes `bytes`; returns the round trip's MB/s (10^6 bytes per second of
/// data through the guest and back).
fn one_run(scratch: &Scratch, run: usize, bytes: usize) -> Result<f64, String> {
    let socket = scratch.path(&format!("v{run}.sock"));
    let kit = veil_guests::kit_elf_path();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_veil"));
    cmd.args(["run", "--memory", "64M", "--vsock"])
        .arg(format!("cid=3,socket={}", socket.display()))
        .args([
            "--cmdline",
            &format!("vsock-echo:dev=0,port=52,bytes={bytes}"),
            "--kernel",
        ])
        .arg(kit);
    let mut veil = Proc::spawn("veil", &mut cmd, scratch)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let stream = loop {
        match veil_devices::virtio::vsock::connect_to_guest(&socket, 52, Duration::from_secs(5)) {
            Ok(c) => break c.stream,
            Err(e) if Instant::now() > deadline => return Err(format!("cannot connect: {e}")),
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    let data: Vec<u8> = (0..bytes).map(|i| (i % 251) as u8).collect();
    let mut reader = stream.try_clone().map_err(|e| e.to_string())?;
    let started = Instant::now();
    let reading = std::thread::spawn(move || {
        let mut got = vec![0u8; bytes];
        reader.read_exact(&mut got).map(|_| got)
    });
    let mut writer = stream;
    writer.write_all(&data).map_err(|e| e.to_string())?;
    let got = reading
        .join()
        .map_err(|_| "the reader panicked".to_string())?
        .map_err(|e| format!("the echo broke off: {e}"))?;
    let elapsed = started.elapsed().as_secs_f64();
    if got != data {
        return Err("the echo differs from what was sent".into());
    }
    let status = veil.wait_exit(Duration::from_secs(60))?;
    if !status.success() {
        return Err(format!("veil exited with {status}: {}", veil.stderr_tail()));
    }
    Ok(bytes as f64 / elapsed / 1e6)
}

fn main() {
    let runs = option("--runs", 5);
    let bytes = option("--mib", 16) << 20;
    let scratch = match Scratch::new("veil-bench-vsock-") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vsock bench: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", support::host_line());
    let mut rates = Vec::new();
    for run in 0..runs {
        match one_run(&scratch, run, bytes) {
            Ok(rate) => {
                println!("run {}/{runs}: {rate:.1} MB/s", run + 1);
                rates.push(rate);
            }
            Err(e) => {
                println!("run {}/{runs}: FAILED: {e}", run + 1);
            }
        }
    }
    if rates.is_empty() {
        std::process::exit(1);
    }
    let (low, high) = rates
        .iter()
        .fold((f64::MAX, 0f64), |(l, h), &r| (l.min(r), h.max(r)));
    println!(
        "vsock echo, {} MiB host -> guest -> host, one connection: median {:.1} MB/s ({low:.1}-{high:.1}), {} of {runs} boots",
        bytes >> 20,
        support::median(&rates),
        rates.len()
    );
    if rates.len() < runs {
        std::process::exit(1);
    }
}
