//! The source's memory during a migration: its resident set before and at its peak while
//! `veil ctl migrate` runs, for idle guests whose RAM is a sparse file (1 GiB and 16 GiB), so
//! that what the migration itself allocates shows apart from guest RAM. The target's RAM is
//! anonymous. A migration should cost one bit per guest page plus bounded buffers.

use std::fs::{self, File};
use std::path::Path;
use std::time::{Duration, Instant};

use super::{
    file_sink, veil, veil_receive, veil_run_kit, wait_for, wait_guest_ready, wait_listening, Proc,
    Scenario, Scratch, MIGRATION_TIMEOUT, POLL, START_TIMEOUT,
};

/// The guest sizes measured.
pub const GUESTS: [u64; 2] = [1 << 30, 16 << 30];

/// A process's resident memory, in bytes, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Resident {
    pub total: u64,
    pub anon: u64,
    pub file: u64,
}

impl Resident {
    fn of(pid: u32) -> Option<Self> {
        let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .map(|kib| kib << 10)
        };
        Some(Self {
            total: field("VmRSS:")?,
            anon: field("RssAnon:")?,
            file: field("RssFile:").unwrap_or(0) + field("RssShmem:").unwrap_or(0),
        })
    }

    fn max(self, other: Self) -> Self {
        Self {
            total: self.total.max(other.total),
            anon: self.anon.max(other.anon),
            file: self.file.max(other.file),
        }
    }
}

/// One guest's migration and the source's memory around it.
pub struct Growth {
    pub guest: u64,
    pub before: Resident,
    pub peak: Resident,
    pub total: Duration,
    pub bytes: u64,
}

/// Migrates an idle guest of `guest` bytes, its RAM a sparse file, and samples the source's
/// resident memory every poll until `veil ctl migrate` returns.
pub fn measure(scratch: &Scratch, guest: u64) -> Result<Growth, String> {
    let tag = format!("memory-{}g", guest >> 30);
    let ram = scratch.path(&format!("{tag}.ram"));
    File::create(&ram)
        .and_then(|f| f.set_len(guest))
        .map_err(|e| format!("cannot make the sparse file {}: {e}", ram.display()))?;
    let port = super::free_port()?;
    let (src_serial, src_api, dst_api) = (
        scratch.path(&format!("{tag}-src.serial")),
        scratch.path(&format!("{tag}-src.sock")),
        scratch.path(&format!("{tag}-dst.sock")),
    );
    let mut target = Proc::spawn(
        &format!("{tag}-target"),
        veil_receive(Path::new(super::VEIL), port)
            .args(["--insecure", "--serial", "null", "--api-socket"])
            .arg(&dst_api),
        scratch,
    )?;
    let mut source = Proc::spawn(
        &format!("{tag}-source"),
        veil_run_kit(
            Path::new(super::VEIL),
            &format!("{}G", guest >> 30),
            &ram,
            "greet spin",
        )
        .arg("--api-socket")
        .arg(&src_api)
        .arg("--serial")
        .arg(file_sink(&src_serial)),
        scratch,
    )?;
    wait_listening(port, &mut target)?;
    wait_guest_ready(Scenario::Idle, &src_serial, &mut source)?;
    wait_for("the source's API socket", START_TIMEOUT, || {
        src_api.exists().then_some(())
    })?;
    let pid = source.pid();
    let before = Resident::of(pid).ok_or("cannot read the source's /proc status")?;
    let mut ctl = super::ctl_migrate(scratch, &tag, &src_api, port, &["--insecure".into()])?;
    let mut peak = before;
    let deadline = Instant::now() + MIGRATION_TIMEOUT + Duration::from_secs(30);
    let status = loop {
        if let Some(now) = Resident::of(pid) {
            peak = peak.max(now);
        }
        if let Some(status) = ctl.try_exit()? {
            break status;
        }
        if Instant::now() > deadline {
            return Err("veil ctl migrate did not return".into());
        }
        std::thread::sleep(POLL / 4);
    };
    let report = super::migrate_report(&ctl, status)?;
    source.wait_exit(Duration::from_secs(10))?;
    shut_down(&dst_api, &mut target);
    let _ = fs::remove_file(&ram);
    Ok(Growth {
        guest,
        before,
        peak,
        total: Duration::from_secs_f64(report["total_ms"].as_f64().unwrap_or(0.0) / 1e3),
        bytes: report["bytes"].as_u64().unwrap_or(0),
    })
}

fn shut_down(api: &Path, target: &mut Proc) {
    if wait_for("the target's API socket", START_TIMEOUT, || {
        api.exists().then_some(())
    })
    .is_ok()
    {
        let _ = veil()
            .arg("ctl")
            .arg("--api-socket")
            .arg(api)
            .arg("shutdown")
            .output();
    }
    let _ = target.wait_exit(Duration::from_secs(10));
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

pub fn print(rows: &[Result<Growth, String>]) {
    println!();
    println!("memory: the source's resident set while `veil ctl migrate` runs (idle guest, RAM a sparse file; target RAM anonymous)");
    println!(
        "  {:>6}  {:>11}  {:>11}  {:>11}  {:>13}  {:>9}  {:>10}",
        "guest", "RSS before", "RSS peak", "anon growth", "file growth", "budget", "total"
    );
    for row in rows {
        match row {
            Ok(g) => {
                // One bit per guest page for what was sent, twice over for the dirty log
                // (KVM's and the VMM's, merged), plus 4 MiB for a chunk and its frame.
                let budget = 3 * (g.guest / 4096).div_ceil(8) + (8 << 20);
                println!(
                    "  {:>4} G  {:>11}  {:>11}  {:>11}  {:>13}  {:>9}  {:>7.0} ms ({} sent)",
                    g.guest >> 30,
                    mib(g.before.total),
                    mib(g.peak.total),
                    mib(g.peak.anon.saturating_sub(g.before.anon)),
                    mib(g.peak.file.saturating_sub(g.before.file)),
                    mib(budget),
                    g.total.as_secs_f64() * 1e3,
                    mib(g.bytes),
                );
            }
            Err(e) => println!("  failed: {e}"),
        }
    }
}
