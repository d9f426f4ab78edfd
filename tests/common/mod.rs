//! Shared by the end-to-end tests: running `veil`, temporary files, and page-stamp checks.
#![allow(dead_code)]

pub mod tls;
pub mod vcpu;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use veil_guest_abi::{page_stamp, PAGE_SIZE};

/// The `veil` binary under test.
pub fn veil() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_veil"));
    cmd.env_remove("VEIL_LOG");
    cmd
}

/// The kit guest built by this workspace.
pub fn kit() -> &'static Path {
    veil_guests::kit_elf_path()
}

/// Runs `veil run` on the kit with `cmdline` and extra arguments.
pub fn run_kit(cmdline: &str, extra: &[&str]) -> Output {
    veil()
        .arg("run")
        .arg("--kernel")
        .arg(kit())
        .args(["--cmdline", cmdline])
        .args(extra)
        .output()
        .expect("veil runs")
}

/// Text of stdout and stderr, for assertion messages.
pub fn describe(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("veil-test-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The gfns `first, first + stride, ...` (`count` of them).
pub fn gfns(first: u64, count: u64, stride: u64) -> impl Iterator<Item = u64> {
    (0..count).map(move |i| first + i * stride)
}

/// Where guest page `gfn` lives in a `--memory-file`: RAM in address order, without the
/// 32-bit MMIO hole (3 to 4 GiB).
pub fn file_offset(gfn: u64) -> u64 {
    let gpa = gfn * PAGE_SIZE;
    let hole = veil_hypervisor::layout::HIGH_RAM_START - veil_hypervisor::layout::MMIO32_START;
    if gpa >= veil_hypervisor::layout::HIGH_RAM_START {
        gpa - hole
    } else {
        gpa
    }
}

/// Writes the stamp of `seed` into the first word of each page of a memory file.
pub fn write_stamps(file: &File, seed: u64, pages: impl Iterator<Item = u64>) {
    for gfn in pages {
        file.write_all_at(&page_stamp(seed, gfn).to_le_bytes(), file_offset(gfn))
            .unwrap();
    }
}

/// The pages of a memory file whose first word is not the stamp of `seed`.
pub fn wrong_stamps(file: &File, seed: u64, pages: impl Iterator<Item = u64>) -> Vec<u64> {
    pages
        .filter(|&gfn| {
            let mut word = [0u8; 8];
            file.read_exact_at(&mut word, file_offset(gfn)).unwrap();
            u64::from_le_bytes(word) != page_stamp(seed, gfn)
        })
        .collect()
}

/// Reads a child's output until `needle` appears; panics if it ends first.
pub fn read_until(stream: &mut impl std::io::Read, needle: &str) {
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let mut buf = [0u8; 256];
        let n = stream.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "output ended before {needle:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
}

/// `veil ctl --api-socket SOCKET ARGS...`.
pub fn ctl(socket: &Path, args: &[&str]) -> Output {
    veil()
        .arg("ctl")
        .arg("--api-socket")
        .arg(socket)
        .args(args)
        .output()
        .unwrap()
}

/// Wipes the stamp of page `gfn` and waits until a guest stamping with `seed` writes it again:
/// proof that the guest runs on this memory.
pub fn assert_guest_restamps(memory: &veil_hypervisor::GuestMemory, seed: u64, gfn: u64) {
    use vm_memory::{Bytes, GuestAddress};
    let at = GuestAddress(gfn * PAGE_SIZE);
    memory.write_obj(0u64, at).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while memory.read_obj::<u64>(at).unwrap() != page_stamp(seed, gfn) {
        assert!(
            std::time::Instant::now() < deadline,
            "no guest is stamping gfn {gfn:#x} here"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A child process that is killed if the test ends (or fails) before waiting for it, so a
/// failing test does not leave a VMM running.
pub struct Spawned(pub std::process::Child);

impl Spawned {
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.0.wait().unwrap()
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Guest RAM with no VM: where a target that only receives puts what arrives.
pub fn scratch_ram(size: u64) -> veil_hypervisor::GuestRam {
    veil_hypervisor::GuestRam::new(&veil_hypervisor::MemoryConfig { size, file: None }).unwrap()
}

/// `veil ctl --json status` of the VMM at `socket`.
pub fn status(socket: &Path) -> serde_json::Value {
    serde_json::from_slice(&ctl(socket, &["--json", "status"]).stdout).unwrap()
}

/// `veil sev export-chain` of the emulated platform whose identity is in `state` (made if
/// missing), into `out`.
pub fn export_emulated_chain(state: &Path, out: &Path) {
    let exported = veil()
        .args(["sev", "export-chain", "--sev-platform", "emulated"])
        .arg("--sev-state-dir")
        .arg(state)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(exported.status.success(), "{}", describe(&exported));
}

/// Two emulated SEV platforms, a source's and a target's, with their identities in `dir`.
pub fn emulated_platforms(
    dir: &TempDir,
) -> (veil::sev_launch::SevPlatform, veil::sev_launch::SevPlatform) {
    let platform = |name| veil::sev_launch::SevPlatform::Emulated {
        state_dir: dir.path(name),
    };
    (platform("source"), platform("target"))
}

/// An SEV launch on `platform` with the default policy (NODBG) and no guest owner.
pub fn emulated_sev(platform: &veil::sev_launch::SevPlatform) -> veil::sev_launch::SevConfig {
    use veil_sev::policy::GuestPolicy;
    veil::sev_launch::SevConfig {
        platform: platform.clone(),
        policy: GuestPolicy(GuestPolicy::NODBG),
        owner_session: None,
        secret: None,
        secret_timeout: veil::sev_launch::DEFAULT_SECRET_TIMEOUT,
        measurement_out: None,
    }
}

/// Waits (up to 30 s) for `path` to appear: a socket or file a spawned `veil` creates.
pub fn wait_for(path: &Path) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !path.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// `veil run --api-socket API ARGS... --cmdline "greet spin" --kernel KIT`, its stderr
/// discarded; returns once the guest has greeted and the API socket is there.
pub fn greeting_source(api: &Path, args: &[&std::ffi::OsStr]) -> Spawned {
    let mut source = veil()
        .arg("run")
        .arg("--api-socket")
        .arg(api)
        .args(args)
        .args(["--cmdline", "greet spin", "--kernel"])
        .arg(kit())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(Spawned)
        .unwrap();
    read_until(source.0.stdout.as_mut().unwrap(), "Hello");
    // The guest can greet before the API server listens.
    wait_for(api);
    source
}

/// `veil receive --listen unix:SOCKET ARGS...`, its stderr discarded; returns once it listens.
pub fn receive_on(socket: &Path, args: &[&std::ffi::OsStr]) -> Spawned {
    let target = veil()
        .arg("receive")
        .arg("--listen")
        .arg(format!("unix:{}", socket.display()))
        .args(args)
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(Spawned)
        .unwrap();
    wait_for(socket);
    target
}

/// Migrates the SEV guest `source` in this process: it sends over `to_target`, and a target
/// VM on `target_platform` (whose encoded chain is `target_chain`) receives from
/// `from_source`, trusting `trusted_arks` as the target's roots. Returns the target, running,
/// and the sender's report; panics if the migration fails.
pub fn migrate_sev_here<S: veil_migration::duplex::Duplex + Send>(
    source: &veil::Vm,
    to_target: &mut S,
    from_source: std::os::unix::net::UnixStream,
    trusted_arks: Vec<sev::certs::sev::ca::Certificate>,
    target_chain: Vec<u8>,
    target_platform: &veil::sev_launch::SevPlatform,
) -> (veil::Vm, veil_migration::sender::SendReport) {
    use veil_migration::{receiver, sender};
    std::thread::scope(|scope| {
        let sending = scope.spawn(|| {
            veil::migration::send_over(
                source,
                to_target,
                &sender::SendOptions::default(),
                trusted_arks,
            )
        });
        let mut incoming = receiver::accept(from_source, |_| Ok(()), Some(target_chain)).unwrap();
        let target = veil::migration::receive(
            &mut incoming,
            veil::VmBuilder::new().serial_writer(std::io::sink()),
            Some(target_platform.clone()),
        )
        .unwrap();
        target.resume();
        let report = sending.join().unwrap().expect("the SEV migration succeeds");
        (target, report)
    })
}
