//! Shared by the benches: the scratch folder, child processes that die with the bench, QEMU's
//! version and its QMP client, mappings from smaps, the disk file both VMMs get, and medians.
//!
//! Not every bench uses every item.
#![allow(dead_code)]

pub mod qmp;
pub mod smaps;

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// QEMU microvm's virtio-mmio transport the first `-device` lands on: the last of its 24, at
/// 0xfeb00000 + 512 * 23, GSI 24 + 23 (QEMU's hw/i386/microvm.c). QEMU adds no
/// `virtio_mmio.device=` entry for a PVH kernel, so the bench passes it (docs/guest-kit.md).
pub const MICROVM_FIRST_TRANSPORT: &str = "virtio_mmio.device=512@0xfeb02e00:47";

/// The bench's own folder under cargo's target/tmp, removed when dropped; folders that runs
/// which were killed left behind are removed at the start.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new(prefix: &str) -> Result<Scratch, String> {
        Self::under(Path::new(env!("CARGO_TARGET_TMPDIR")), prefix)
    }

    /// As [`Scratch::new`], in `parent` (`/dev/shm`, say, for files on tmpfs).
    pub fn under(parent: &Path, prefix: &str) -> Result<Scratch, String> {
        remove_stale(parent, prefix);
        let dir = parent.join(format!("{prefix}{}", std::process::id()));
        fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        Ok(Scratch(dir))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Removes `parent/PREFIX<pid>` folders whose process is gone.
fn remove_stale(parent: &Path, prefix: &str) {
    let Ok(entries) = fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(prefix)) else {
            continue;
        };
        if !Path::new("/proc").join(pid).exists() {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// Has the child get SIGKILL should the bench die before it has killed the child itself.
pub fn die_with_the_bench(cmd: &mut Command) -> &mut Command {
    // SAFETY: the closure runs in the child between fork and exec and only calls prctl,
    // which is async-signal-safe and touches no memory.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

/// A VMM run to completion with its stdout and stderr in files, killed and reaped when
/// dropped (every exit path), and with SIGKILL should the bench die.
pub struct Proc {
    pub name: String,
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, scratch: &Scratch) -> Result<Proc, String> {
        let (stdout, stderr) = (
            scratch.path(&format!("{name}.out")),
            scratch.path(&format!("{name}.err")),
        );
        let file =
            |p: &Path| File::create(p).map_err(|e| format!("cannot create {}: {e}", p.display()));
        cmd.stdin(Stdio::null())
            .stdout(file(&stdout)?)
            .stderr(file(&stderr)?);
        let child = die_with_the_bench(cmd)
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        Ok(Proc {
            name: name.into(),
            child,
            stdout,
            stderr,
        })
    }

    /// Waits for the process to exit; after `timeout` it is killed and that is the error.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, String> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return Ok(status),
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err(format!(
                        "{} still running after {} s: killed",
                        self.name,
                        timeout.as_secs()
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("{}: {e}", self.name)),
            }
        }
    }

    /// An error naming the exit status, if the process has exited.
    pub fn check_alive(&mut self) -> Result<(), String> {
        match self.try_exit()? {
            None => Ok(()),
            Some(status) => Err(format!(
                "{} exited ({status}): {}",
                self.name,
                self.stderr_tail()
            )),
        }
    }

    /// Its exit status if it has exited, without waiting.
    pub fn try_exit(&mut self) -> Result<Option<ExitStatus>, String> {
        self.child
            .try_wait()
            .map_err(|e| format!("{}: {e}", self.name))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stdout(&self) -> String {
        fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// The last lines of stderr, for error messages.
    pub fn stderr_tail(&self) -> String {
        let text = fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(5)..].join(" | ");
        if tail.is_empty() {
            format!("({} printed nothing on stderr)", self.name)
        } else {
            tail
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `QEMU 7.2.22 (Debian ...)`, or why there is no QEMU to compare against.
pub fn qemu_version() -> Result<String, String> {
    let output = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stderr(Stdio::null())
        .output()
        .map_err(|e| {
            format!("qemu-system-x86_64 not found ({e}); Debian: apt-get install qemu-system-x86")
        })?;
    if !output.status.success() {
        return Err(format!(
            "`qemu-system-x86_64 --version` failed ({})",
            output.status
        ));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .next()
        .unwrap_or("QEMU")
        .replace("QEMU emulator version", "QEMU"))
}

/// When and where: the date, the host's cores and kernel.
pub fn host_line() -> String {
    let now = humantime::format_rfc3339_seconds(SystemTime::now());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{now}, {cores} cores, Linux {}", kernel.trim())
}

/// A raw disk of `bytes` (a multiple of 8), every block allocated and none of it zero (so no
/// layer can skip reading it), left in the page cache: both VMMs read memory, not the device.
pub fn raw_disk(path: &Path, bytes: u64) -> Result<(), String> {
    let io_err = |e: io::Error| format!("cannot write {}: {e}", path.display());
    let mut file = File::create(path).map_err(io_err)?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut word = 0x5eed_u64;
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        for w in chunk[..n].chunks_exact_mut(8) {
            // SplitMix64's increment: distinct, non-zero words; cheap to produce.
            word = word.wrapping_add(0x9E37_79B9_7F4A_7C15);
            w.copy_from_slice(&(word | 1).to_le_bytes());
        }
        file.write_all(&chunk[..n]).map_err(io_err)?;
        left -= n as u64;
    }
    // On disk, so that writeback does not run during the measurements; the pages stay cached.
    file.sync_all().map_err(io_err)
}

/// The median of `values` (the upper one of the middle two for an even count).
pub fn median<T: Copy + PartialOrd>(values: &[T]) -> T {
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    sorted[sorted.len() / 2]
}

/// CPU time the rest of the host used while a child ran: the host's busy time (`/proc/stat`)
/// less what the bench's reaped children used (`RUSAGE_CHILDREN`). These hosts have 2 cores
/// that other work shares; a VMM measured beside a busy neighbour is measured on less.
pub struct OthersLoad {
    started: Instant,
    host_busy: Duration,
    children: Duration,
}

impl OthersLoad {
    pub fn start() -> Self {
        Self {
            started: Instant::now(),
            host_busy: host_busy(),
            children: children_cpu(),
        }
    }

    /// Cores' worth of CPU the rest of the host used since `start` (once the child is reaped).
    pub fn cores(&self) -> f64 {
        let wall = self.started.elapsed().as_secs_f64();
        let busy = host_busy().saturating_sub(self.host_busy);
        let ours = children_cpu().saturating_sub(self.children);
        (busy.saturating_sub(ours).as_secs_f64() / wall).max(0.0)
    }
}

/// Busy time of all cores since boot: user, nice, system, irq, softirq and steal. Its growth
/// over a migration of a halted guest is the CPU both ends spent (the bench's own polling
/// aside): the figure the two cores' scheduling does not blur.
pub fn host_busy() -> Duration {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .enumerate()
        .filter(|(i, _)| matches!(i, 0 | 1 | 2 | 5 | 6 | 7))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_micros(ticks * 1_000_000 / hz)
}

/// User and system time of every child the bench has reaped.
fn children_cpu() -> Duration {
    // SAFETY: getrusage writes only into the struct it is given, which is zeroed and ours.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Whether a virtio balloon here reports free memory to the hypervisor below
/// (`VIRTIO_BALLOON_F_REPORTING`, feature bit 5): `None` without a balloon.
pub fn free_page_reporting() -> Option<bool> {
    const REPORTING: usize = 5;
    let devices = fs::read_dir("/sys/bus/virtio/drivers/virtio_balloon").ok()?;
    let mut any = None;
    for device in devices.flatten() {
        // One character per feature bit, lowest first.
        let Ok(bits) = fs::read_to_string(device.path().join("features")) else {
            continue;
        };
        let on = bits.as_bytes().get(REPORTING) == Some(&b'1');
        any = Some(any.unwrap_or(false) || on);
    }
    any
}

/// Touches `bytes` of fresh anonymous memory and frees it, so that the next process's first
/// touches find pages this host holds. Where the balloon reports free memory to the
/// hypervisor below ([`free_page_reporting`]), memory left free for about two seconds goes
/// back to it, and the first touch of each such page then faults in that hypervisor: filling
/// 1 GiB took 0.26 to 1.53 s here, by how long ago the memory was last used. Without this,
/// whichever VMM migrates first after a pause gets the slow memory.
pub fn warm_free_memory(bytes: usize) -> Result<(), String> {
    // SAFETY: a new private anonymous mapping, no address asked for: it overlaps nothing.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(format!(
            "cannot map {bytes} bytes to warm: {}",
            io::Error::last_os_error()
        ));
    }
    // SAFETY: `at` is the start of the `bytes`-long mapping made above, which nothing else
    // uses; populating it only faults its pages in.
    let populated = unsafe { libc::madvise(at, bytes, libc::MADV_POPULATE_WRITE) } == 0;
    if !populated {
        for offset in (0..bytes).step_by(4096) {
            // SAFETY: `offset` is inside the mapping, which is writable and ours alone.
            unsafe { at.cast::<u8>().add(offset).write_volatile(1) };
        }
    }
    // SAFETY: unmaps exactly the mapping made above; no reference into it outlives this.
    unsafe { libc::munmap(at, bytes) };
    Ok(())
}
