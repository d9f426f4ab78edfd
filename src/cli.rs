//! Command-line syntax of `veil`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use veil::SerialSink;

/// Veil: a KVM hypervisor that launches and live-migrates AMD SEV guests.
#[derive(Debug, Parser)]
#[command(name = "veil", version, about, long_about = None)]
pub struct Cli {
    /// Log level for Veil's own messages on stderr (error, warn, info, debug, trace);
    /// the VEIL_LOG environment variable overrides it.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a kernel and run it until it exits; veil exits with the guest's status.
    Run(Box<RunArgs>),
    /// Boot the bundled greeting guest: a quick check that this host can run Veil.
    Demo(MachineArgs),
    /// Report what this host's KVM can do for Veil (capabilities, SEV, hypercall exits).
    HostInfo(HostInfoArgs),
    /// Talk to a running VMM through its API socket (see `veil run --api-socket`).
    Ctl(CtlArgs),
    /// Start a VM from a snapshot (`veil ctl snapshot`) and run its guest, as `veil run` would.
    Restore(Box<RestoreArgs>),
    /// Wait for one migrating guest, take it over and run it (as `veil run` would); with
    /// --keep-listening, serve one guest after another, each in its own process.
    Receive(ReceiveArgs),
    /// The SEV platform: its status and certificate chain; the guest owner's side; the PSP's
    /// transport rate.
    #[command(subcommand)]
    Sev(SevCommand),
    /// Write the bundled guest kit (an ELF with a PVH entry) to a file, for `veil run --kernel`
    /// and for guest owners recomputing a measurement.
    Kit {
        /// Where to write it.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum SevCommand {
    /// API version, state and whether the platform really encrypts.
    Status {
        #[command(flatten)]
        platform: SevPlatformArgs,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Write the platform's certificate chain (PDH, PEK, OCA, CEK, ASK, ARK; the layout of
    /// `sevctl export --full`) for guest owners and migration peers.
    ExportChain {
        #[command(flatten)]
        platform: SevPlatformArgs,
        /// Where to write the chain.
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Play the guest owner for one launch: write the LAUNCH_START session and certificate for
    /// `veil run --sev-owner-session/--sev-owner-cert`, wait for the launch measurement
    /// (`--sev-measurement-out`), verify it against the image recomputed here, and only then
    /// write the secret for `--sev-secret`.
    Owner(Box<OwnerArgs>),
    /// Time SEND_UPDATE_DATA and RECEIVE_UPDATE_DATA on this platform: a throwaway SEV guest's
    /// pages are sent one by one to a second guest context and received there.
    BenchTransport {
        #[command(flatten)]
        platform: SevPlatformArgs,
        /// How many 4 KiB pages to send and receive.
        #[arg(long, default_value_t = 4096, value_name = "N")]
        pages: usize,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `veil sev owner`.
#[derive(Debug, Args)]
pub struct OwnerArgs {
    /// The platform's certificate chain (`veil sev export-chain`, or `sevctl export --full`).
    /// It must end in one of AMD's roots, or in one `--trust-chain` names.
    #[arg(long, value_name = "FILE")]
    pub chain: PathBuf,
    /// Trust the root of the chain in FILE besides AMD's: an emulated platform's, whose chain
    /// the owner got from a host they control. Without it only hardware chains are accepted.
    #[arg(long, value_name = "FILE")]
    pub trust_chain: Option<PathBuf>,
    /// The guest policy, hex, as given to `veil run --sev-policy`.
    #[arg(long, default_value = "0x1", value_parser = parse_hex_u32, value_name = "HEX")]
    pub policy: u32,
    /// Where to write the 128-byte session blob.
    #[arg(long, value_name = "FILE")]
    pub session_out: PathBuf,
    /// Where to write the owner's DH certificate.
    #[arg(long, value_name = "FILE")]
    pub cert_out: PathBuf,
    /// The measurement file `veil run --sev-measurement-out` writes; waited for.
    #[arg(long, value_name = "FILE")]
    pub measurement: PathBuf,
    /// The kernel the guest should have been launched with.
    #[arg(long, value_name = "FILE")]
    pub kernel: PathBuf,
    /// Its initrd, if any.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,
    /// The guest's whole command line.
    #[arg(long, default_value = "", value_name = "STR")]
    pub cmdline: String,
    /// The guest's RAM, as given to `veil run --memory`.
    #[arg(long, default_value = "256M", value_parser = parse_size, value_name = "SIZE")]
    pub memory: u64,
    /// The secret, hex (whole 16-byte blocks, at most 256 bytes).
    #[arg(long, requires = "secret_out", value_name = "HEX")]
    pub secret: Option<String>,
    /// Guest-physical address of the secret.
    #[arg(long, default_value = "0x400000", value_parser = parse_hex_u64, value_name = "HEX")]
    pub secret_gpa: u64,
    /// Where to write the secret for `veil run --sev-secret` (atomically).
    #[arg(long, value_name = "FILE")]
    pub secret_out: Option<PathBuf>,
    /// How long to wait for the measurement.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration,
          value_name = "DURATION")]
    pub timeout: std::time::Duration,
}

/// Which SEV firmware to use.
#[derive(Debug, Args)]
pub struct SevPlatformArgs {
    /// `hardware`: the AMD Secure Processor (/dev/sev). `emulated`: Veil's software model of
    /// the firmware, for hosts without SEV: the full SEV flow runs, but guest memory is NOT
    /// encrypted and gets no confidentiality.
    #[arg(long, value_enum, default_value = "hardware", value_name = "WHICH")]
    pub sev_platform: PlatformChoice,

    /// Where the emulated platform keeps its identity (keys and certificate chain).
    #[arg(long, default_value = "/var/lib/veil/sev-emulated", value_name = "DIR")]
    pub sev_state_dir: PathBuf,

    /// Hardware: this chip's CEK certificate as AMD signed it (SEV format; AMD's key server
    /// gives it, `sevctl export --full` includes it). The firmware exports its CEK unsigned, so
    /// without this the platform's chain does not verify to AMD and cannot be exported, given
    /// to a guest owner or checked by a migration source.
    #[arg(long, value_name = "FILE")]
    pub sev_cek: Option<PathBuf>,
}

/// `--sev-platform` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PlatformChoice {
    Hardware,
    Emulated,
}

impl SevPlatformArgs {
    pub fn platform(&self) -> veil::sev_launch::SevPlatform {
        match self.sev_platform {
            PlatformChoice::Hardware => veil::sev_launch::SevPlatform::Hardware {
                signed_cek: self.sev_cek.clone(),
            },
            PlatformChoice::Emulated => veil::sev_launch::SevPlatform::Emulated {
                state_dir: self.sev_state_dir.clone(),
            },
        }
    }
}

/// SEV launch options of `veil run`.
#[derive(Debug, Args)]
pub struct SevLaunchArgs {
    /// Launch the guest under AMD SEV: its image is measured by the firmware and its memory is
    /// private unless the guest shares it.
    #[arg(long)]
    pub sev: bool,

    /// The guest policy, hex (bit 0 NODBG, 1 NOKS, 2 ES, 3 NOSEND, 4 DOMAIN, 5 SEV; bits 23:16
    /// and 31:24 the minimum firmware API version). NOSEND makes the guest permanently
    /// unmigratable; ES is refused. Default 0x1 (NODBG).
    #[arg(long, requires = "sev", value_parser = parse_hex_u32, value_name = "HEX")]
    pub sev_policy: Option<u32>,

    #[command(flatten)]
    pub platform: SevPlatformArgs,

    /// The guest owner's LAUNCH_START session blob (128 bytes), from their `sev` tooling.
    #[arg(long, requires_all = ["sev", "sev_owner_cert"], value_name = "FILE")]
    pub sev_owner_session: Option<PathBuf>,

    /// The guest owner's Diffie-Hellman certificate (SEV format) matching the session.
    #[arg(long, requires_all = ["sev", "sev_owner_session"], value_name = "FILE")]
    pub sev_owner_cert: Option<PathBuf>,

    /// After measuring, wait until this file holds the owner's secret (JSON: gpa, header, data
    /// in hex) and inject it into guest memory. Write the file atomically (write, then rename).
    #[arg(long, requires = "sev", value_name = "FILE")]
    pub sev_secret: Option<PathBuf>,

    /// How long to wait for --sev-secret's file before giving up on the launch (e.g. 90s,
    /// 10m).
    #[arg(long, requires = "sev_secret", value_name = "DURATION", default_value = "10m",
          value_parser = humantime::parse_duration)]
    pub sev_secret_timeout: std::time::Duration,

    /// Write the launch measurement, its nonce, the firmware version and the measured ranges
    /// here as JSON (it is also printed on stderr).
    #[arg(long, requires = "sev", value_name = "FILE")]
    pub sev_measurement_out: Option<PathBuf>,
}

impl SevLaunchArgs {
    /// The launch configuration, when `--sev` was given.
    pub fn config(&self) -> Option<veil::sev_launch::SevConfig> {
        self.sev.then(|| veil::sev_launch::SevConfig {
            platform: self.platform.platform(),
            policy: veil_sev::policy::GuestPolicy(self.sev_policy.unwrap_or(DEFAULT_SEV_POLICY)),
            owner_session: self
                .sev_owner_session
                .clone()
                .zip(self.sev_owner_cert.clone()),
            secret: self.sev_secret.clone(),
            secret_timeout: self.sev_secret_timeout,
            measurement_out: self.sev_measurement_out.clone(),
        })
    }
}

/// NODBG, as QEMU defaults to.
const DEFAULT_SEV_POLICY: u32 = 0x1;

/// `0x400000`, `400000`.
pub fn parse_hex_u64(text: &str) -> Result<u64, String> {
    let digits = text.trim_start_matches("0x").trim_start_matches("0X");
    u64::from_str_radix(digits, 16).map_err(|_| format!("'{text}' is not a 64-bit hex number"))
}

/// `0x1`, `1`, `0x00050003`.
pub fn parse_hex_u32(text: &str) -> Result<u32, String> {
    let digits = text.trim_start_matches("0x").trim_start_matches("0X");
    u32::from_str_radix(digits, 16).map_err(|_| format!("'{text}' is not a 32-bit hex number"))
}

#[derive(Debug, Args)]
pub struct CtlArgs {
    /// The VMM's API socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: PathBuf,

    /// Print the VMM's JSON answer instead of text.
    #[arg(long)]
    pub json: bool,

    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Clone, Subcommand)]
pub enum CtlCommand {
    /// VM state, vCPUs, memory, migratability (with reasons and since when) and shared pages.
    Status,
    /// Pause every vCPU.
    Pause,
    /// Resume paused vCPUs.
    Resume,
    /// Stop the VM (the `veil run` serving it exits).
    Shutdown,
    /// Live-migrate the guest to a `veil receive` (pre-copy; plain and SEV guests). Shows a
    /// progress bar on a terminal, then a report. On success the guest runs on the target and
    /// this VMM exits; on failure, timeout or cancel (Ctrl-C here, or `migrate-cancel`) it keeps
    /// running here and the reason is printed.
    Migrate {
        #[command(flatten)]
        target: TargetArgs,
        /// The longest the guest may be paused at the end.
        #[arg(long, default_value_t = 300, value_name = "N")]
        downtime_ms: u64,
        /// Give up after N seconds if the migration has not completed (the guest stays
        /// here, the target discards what it received). Default: no limit beyond the pass
        /// limit.
        #[arg(long, value_name = "N")]
        timeout_s: Option<u64>,
        /// If the guest is temporarily unmigratable (it has not set KVM_MIGRATION_READY, e.g.
        /// while rebooting), wait up to this long (e.g. 30s) instead of refusing at once. A
        /// permanently blocked guest is refused at once either way.
        #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
        wait_ready: Option<std::time::Duration>,
        /// Spread the pages over N connections, each with its own TLS session and a thread on
        /// each side (1 to 16). Default: the host's cores, at most 4. A target that takes one
        /// connection only, and an SEV guest (its pages go through the firmware one at a
        /// time), get one.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=16))]
        connections: Option<u16>,
        /// For an SEV guest: trust the platform whose chain (from `veil sev export-chain`) is
        /// in FILE as a target, besides AMD's roots. An emulated target needs this.
        #[arg(long, value_name = "FILE")]
        sev_trust_chain: Option<PathBuf>,
        /// Don't draw the progress bar (it is drawn only on a terminal anyway).
        #[arg(long)]
        no_progress: bool,
    },
    /// Stop the migration under way; the guest keeps running here and the target discards
    /// what it received.
    MigrateCancel,
    /// Save the guest into a directory (`veil restore --from DIR` starts it again, as often
    /// as wanted): vCPUs and devices are paused, state and memory written, then the guest
    /// resumes (or the VM stops, with --stop). On failure the guest runs on and DIR holds no
    /// part of a snapshot. An SEV guest's private pages go through the firmware, encrypted
    /// for the platform that is to restore it: none is written in the clear. After a snapshot
    /// the guest runs on with its writes logged, so the next one can be a --diff.
    Snapshot {
        /// The directory: created if missing; it must not hold a snapshot already.
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Stop the VM once saved (the `veil run` serving it exits).
        #[arg(long)]
        stop: bool,
        /// Save only the pages written since this VM's last snapshot (which must have let the
        /// guest run on), on top of it: DIR records that snapshot's path, which must stay
        /// where it is and as it is for `veil restore --from DIR`. Not for SEV guests.
        #[arg(long, conflicts_with = "sev_target_chain")]
        diff: bool,
        /// Write the memory while the guest runs, then pause it only to write again the pages
        /// it changed meanwhile: a full snapshot with a pause as short as a diff's, for the
        /// cost of writing those pages twice. Not for SEV guests.
        #[arg(long, conflicts_with_all = ["diff", "sev_target_chain"])]
        live: bool,
        /// For an SEV guest: the chain (from `veil sev export-chain`) of the platform that is
        /// to restore the snapshot; by default this platform's own.
        #[arg(long, value_name = "FILE")]
        sev_target_chain: Option<PathBuf>,
    },
    /// After a migration left in doubt (Complete sent, the target never confirmed it runs the
    /// guest; `status` shows phase in-doubt): settle with the target where the guest runs,
    /// never in both places. The target commits its answer before it gives it. If the target
    /// cannot be reached, or the answer does not prove the guest safe to run here, it stays
    /// stopped here and the reason is printed. Same transport options as `migrate`.
    MigrateRecover {
        #[command(flatten)]
        target: TargetArgs,
        /// `source`: the target discards its copy if it has not started it, and the guest
        /// resumes here only then. `target`: the target runs its copy unless it was already
        /// discarded, and this VMM stops as after a migration. By default `source`, or
        /// `target` for an SEV guest, which cannot resume here after SEND_FINISH.
        #[arg(long, value_name = "source|target")]
        run_on: Option<veil_migration::recovery::RunOn>,
    },
}

/// `--seccomp`, for every command that runs a guest.
#[derive(Debug, Clone, Copy, Args)]
pub struct SeccompArg {
    /// Seccomp filters on every VMM thread (docs/seccomp.md): `on` kills Veil at a system
    /// call that thread is not allowed, `log` lets the call through and has the kernel log it
    /// (dmesg, audit), `off` installs none (to debug, or to find what a new code path calls).
    #[arg(
        long = "seccomp",
        default_value = "on",
        value_name = "on|log|off",
        env = "VEIL_SECCOMP"
    )]
    pub mode: veil::SeccompMode,
}

/// The target of `migrate` and `migrate-recover`, and how it is authenticated.
#[derive(Debug, Clone, Args)]
pub struct TargetArgs {
    /// The target: unix:PATH, or tcp:HOST:PORT with mutual TLS (--tls-*) or --insecure.
    #[arg(long, value_name = "ENDPOINT")]
    pub to: String,
    /// Allow plain TCP: the guest's memory crosses the network unencrypted and the target is
    /// not authenticated.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub insecure: bool,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// The name the target's certificate must carry (DNS name or IP address), when it is not
    /// the host in --to.
    #[arg(long, requires = "tls_cert", value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

impl TargetArgs {
    /// As the API carries it (TLS files made absolute).
    pub fn request(&self) -> veil::api::MigrationTarget {
        veil::api::MigrationTarget {
            to: self.to.clone(),
            insecure: self.insecure,
            tls: self.tls.files(),
            tls_server_name: self.tls_server_name.clone(),
        }
    }
}

/// Mutual TLS between migration peers: all three, or none.
#[derive(Debug, Clone, Args)]
pub struct TlsArgs {
    /// This host's TLS certificate chain (PEM, leaf first): migration peers authenticate each
    /// other with it.
    #[arg(long, requires_all = ["tls_key", "tls_ca"], value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"], value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// The CA certificates (PEM) the peer's certificate must chain to.
    #[arg(long, requires_all = ["tls_cert", "tls_key"], value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The files, made absolute (a VMM may read them from another working directory).
    pub fn files(&self) -> Option<veil_migration::tls::TlsFiles> {
        let absolute = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
        Some(veil_migration::tls::TlsFiles {
            cert: absolute(self.tls_cert.as_ref()?),
            key: absolute(self.tls_key.as_ref()?),
            ca: absolute(self.tls_ca.as_ref()?),
        })
    }
}

#[derive(Debug, Args)]
pub struct ReceiveArgs {
    /// Where to wait for the source: unix:PATH, or tcp:ADDR:PORT with mutual TLS (--tls-*) or
    /// --insecure. Over TLS, a source whose certificate is not trusted is turned away before
    /// it can send anything, and Veil keeps waiting.
    #[arg(long, value_name = "ENDPOINT")]
    pub listen: String,

    /// How long a new connection has to open with a valid migration Hello (TLS handshake
    /// included); one that does not (a port scan, a health check, random bytes) is logged and
    /// dropped, and Veil keeps waiting. Sources are served one at a time; a source that
    /// migrates over several connections (`veil ctl migrate --connections`) must open the
    /// others within this long of declaring them.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration,
          value_name = "DURATION")]
    pub hello_timeout: std::time::Duration,

    /// If the link to the source is lost after this host acknowledged the guest and before
    /// Complete, hold the guest (paused, never run) and answer the source's
    /// `veil ctl migrate-recover` for this long; then discard it and exit 1. With
    /// --keep-listening the queries come in on the same listener and reach the guest's
    /// process.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration,
          value_name = "DURATION")]
    pub recovery_window: std::time::Duration,

    /// Stay up and serve one incoming guest after another, also after a failed attempt: each
    /// guest that arrives runs in a `veil receive` process of its own while this one listens
    /// for the next. `{id}` in any other option becomes the guest's number (1, 2, ...), so
    /// --api-socket api-{id}.sock gives each guest its own socket.
    #[arg(long)]
    pub keep_listening: bool,

    /// (Internal, for --keep-listening) Take this inherited descriptor as the listening socket.
    #[arg(long, hide = true, value_name = "FD", requires = "accepted_fd")]
    pub listen_fd: Option<i32>,

    /// (Internal, for --keep-listening) Write a byte here once a guest has been accepted.
    #[arg(long, hide = true, value_name = "FD", requires = "listen_fd")]
    pub accepted_fd: Option<i32>,

    /// (Internal, for --keep-listening) The service's directory where each guest's process
    /// answers recovery queries for its guest.
    #[arg(long, hide = true, value_name = "DIR", requires = "listen_fd")]
    pub siblings_dir: Option<PathBuf>,

    /// Accept plain TCP: the guest's memory arrives unencrypted from an unauthenticated peer.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    pub insecure: bool,

    #[command(flatten)]
    pub tls: TlsArgs,

    /// Back the arriving guest's RAM with this file (as `run --memory-file`). If the migration
    /// fails, a file Veil created is removed; an existing one keeps what arrived.
    #[arg(long, value_name = "PATH")]
    pub memory_file: Option<PathBuf>,

    /// Where the guest's COM1 output goes once it runs here (as for `run`).
    #[arg(long, default_value = "stdio", value_parser = parse_serial, value_name = "SINK")]
    pub serial: SerialSink,

    /// Serve the control API on this UNIX socket once the guest runs here.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Accept SEV guests: their private pages arrive through this host's SEV firmware.
    #[arg(long)]
    pub sev: bool,

    /// Where an arriving guest's virtio console goes (as for `run`); by default its output
    /// goes to stdout and COM1 keeps standard input.
    #[arg(long, value_parser = parse_console, value_name = "BACKEND")]
    pub console: Option<veil::ConsoleBackend>,

    /// Back the arriving guest's anonymous RAM with transparent huge pages: on or off. The
    /// RAM is filled with small pages (a huge-page fault on a fragmented host stalls in
    /// compaction) and asks for huge ones once the guest has arrived, for its later faults and
    /// for khugepaged to merge what arrived.
    #[arg(long, default_value = "on", value_parser = parse_on_off, value_name = "on|off",
          action = clap::ArgAction::Set)]
    pub huge_pages: bool,

    /// Where an arriving guest's vsock device listens on this host (by default at the socket
    /// path it had on the source).
    #[arg(long, value_name = "PATH")]
    pub vsock_socket: Option<PathBuf>,

    /// Where this host finds the incoming guest's disk NAME: id=NAME,path=FILE. Repeatable.
    /// Without it a disk is opened at the path it had on the source (shared storage); it is
    /// locked once the source has flushed and released it.
    #[arg(long = "disk", value_parser = parse_disk_mapping, value_name = "id=NAME,path=FILE")]
    pub disks: Vec<(String, PathBuf)>,

    #[command(flatten)]
    pub sev_platform: SevPlatformArgs,

    /// Take only guests whose CPU features this model has (`host`, or a baseline such as
    /// `x86-64-v2`): a host that is to run baseline guests only refuses others.
    #[arg(long, default_value = "host", value_name = "MODEL")]
    pub cpu_model: veil_hypervisor::cpuid::CpuModel,

    #[command(flatten)]
    pub seccomp: SeccompArg,
}

/// `veil restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The snapshot's directory. Its memory file is mapped copy-on-write (pages load on first
    /// touch, clones share the page cache); nothing in it is ever written.
    #[arg(long, value_name = "DIR")]
    pub from: PathBuf,

    #[command(flatten)]
    pub seccomp: SeccompArg,

    /// Where the guest's COM1 output goes (as for `run`).
    #[arg(long, default_value = "stdio", value_parser = parse_serial, value_name = "SINK")]
    pub serial: SerialSink,

    /// Serve the control API on this UNIX socket.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// Where the guest's disk NAME is for this VM: id=NAME,path=FILE. Repeatable. Without it
    /// a disk is opened at the path it had when saved (and locked: two clones need two disks).
    #[arg(long = "disk", value_parser = parse_disk_mapping, value_name = "id=NAME,path=FILE")]
    pub disks: Vec<(String, PathBuf)>,

    /// Where the guest's vsock device listens (by default its path when saved); its
    /// connections are reset, as on migration.
    #[arg(long, value_name = "PATH")]
    pub vsock_socket: Option<PathBuf>,

    /// Give the guest this vsock CID (3 to 4294967294) instead of the saved one: the guest
    /// reads it again on the transport reset.
    #[arg(long, value_name = "N")]
    pub vsock_cid: Option<u64>,

    /// Where the guest's virtio console goes (as for `run`); by default its output goes to
    /// stdout and COM1 keeps standard input.
    #[arg(long, value_parser = parse_console, value_name = "BACKEND")]
    pub console: Option<veil::ConsoleBackend>,

    /// The snapshot is of an SEV guest: receive its private pages through --sev-platform
    /// (the platform it was made for).
    #[arg(long)]
    pub sev: bool,

    #[command(flatten)]
    pub sev_platform: SevPlatformArgs,
}

/// The machine's shape, shared by every command that boots a guest.
#[derive(Debug, Args)]
pub struct MachineArgs {
    /// Guest RAM, in bytes or with a K, M, G or T suffix (binary units): 16M to 1T.
    #[arg(long, default_value = "256M", value_parser = parse_size, value_name = "SIZE")]
    pub memory: u64,

    /// Back guest RAM with this file (shared mapping, created or grown to SIZE): the file
    /// holds the guest's memory, so it can be pre-filled and inspected. Offsets are guest
    /// addresses below 3 GiB; RAM above the 3-4 GiB MMIO hole follows on at offset 3 GiB.
    #[arg(long, value_name = "PATH")]
    pub memory_file: Option<PathBuf>,

    /// Number of vCPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub vcpus: u32,

    /// Where the guest's COM1 output goes: stdio, file:PATH, unix:PATH (Veil listens; clients
    /// see output, including what came before they connected), or null.
    #[arg(long, default_value = "stdio", value_parser = parse_serial, value_name = "SINK")]
    pub serial: SerialSink,

    /// Serve the control API (JSON lines, mode 0600) on this UNIX socket; `veil ctl` speaks it.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,

    /// A virtio-blk disk: path=FILE (a raw image or a block device)[,readonly=on][,id=NAME].
    /// Repeatable; the guest finds disks in the order given (virtio_mmio.device= entries are
    /// appended to its command line). The file is locked: two VMMs cannot write one disk. The
    /// id (at most 20 bytes) is what the guest reads with GET_ID and names the disk for
    /// migration; without one a disk is disk0, disk1, ...
    #[arg(long = "disk", value_parser = parse_disk, value_name = "path=FILE,...")]
    pub disks: Vec<veil::DiskConfig>,

    /// A virtio-vsock device: cid=N (the guest's address, 3 or more) and socket=PATH. Host
    /// programs connect to PATH and write "CONNECT <port>\n" (answered "OK <hostport>\n")
    /// to reach a guest listening on <port>; a guest connecting to CID 2 port P reaches a
    /// listener at PATH_P. It comes after the disks.
    #[arg(long, value_parser = parse_vsock, value_name = "cid=N,socket=PATH")]
    pub vsock: Option<veil::VsockConfig>,

    /// A virtio console (hvc0 in Linux), after the disks and vsock: stdio (it then reads standard input
    /// instead of COM1), file:PATH (output only), or unix:PATH (Veil listens; every client
    /// sees the output, the newest one types).
    #[arg(long, value_parser = parse_console, value_name = "BACKEND")]
    pub console: Option<veil::ConsoleBackend>,

    /// Back anonymous guest RAM with transparent huge pages (MADV_HUGEPAGE): on or off.
    #[arg(long, default_value = "on", value_parser = parse_on_off, value_name = "on|off",
          action = clap::ArgAction::Set)]
    pub huge_pages: bool,

    /// How guest hypercalls reach Veil: `exit` (vmmcall, KVM_EXIT_HYPERCALL), `port` (Veil's
    /// I/O-port transport, for hosts that cannot deliver hypercall exits), or `auto` (probe the
    /// host once per boot and choose).
    #[arg(long, default_value = "auto", value_enum, value_name = "HOW")]
    pub hypercall_transport: Transport,
    /// The CPU the guest is given: `host` (everything this host's KVM offers) or a named
    /// baseline (`x86-64-v2`) masked from it, so that the guest can move to any host that
    /// has the baseline.
    #[arg(long, default_value = "host", value_name = "MODEL")]
    pub cpu_model: veil_hypervisor::cpuid::CpuModel,

    #[command(flatten)]
    pub seccomp: SeccompArg,
}

/// `--hypercall-transport` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Transport {
    Auto,
    Exit,
    Port,
}

impl From<Transport> for veil_hypervisor::paravirt::TransportChoice {
    fn from(t: Transport) -> Self {
        match t {
            Transport::Auto => Self::Auto,
            Transport::Exit => Self::Exit,
            Transport::Port => Self::Port,
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel to boot: an ELF with a PVH entry note, or a bzImage.
    #[arg(long, value_name = "FILE")]
    pub kernel: PathBuf,

    /// Initial ramdisk.
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line.
    #[arg(long, default_value = "", value_name = "STR")]
    pub cmdline: String,

    #[command(flatten)]
    pub machine: MachineArgs,

    #[command(flatten)]
    pub sev: SevLaunchArgs,
}

#[derive(Debug, Args)]
pub struct HostInfoArgs {
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `512M`, `1G`, `1GiB`, `65536`: binary units.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = || {
        format!("'{text}' is not a size: use a number of bytes, optionally with K, M, G or T (e.g. 512M)")
    };
    let trimmed = text.trim();
    let digits_end = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (number, suffix) = trimmed.split_at(digits_end);
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(invalid()),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// `key=value` pairs separated by commas, each key at most once.
fn parse_options<'a>(text: &'a str, known: &[&str]) -> Result<Vec<(&'a str, &'a str)>, String> {
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for item in text.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("'{item}' is not key=value"))?;
        if !known.contains(&key) {
            return Err(format!(
                "unknown option '{key}' (known: {})",
                known.join(", ")
            ));
        }
        if pairs.iter().any(|(k, _)| *k == key) {
            return Err(format!("'{key}' is given twice"));
        }
        if value.is_empty() {
            return Err(format!("'{key}' needs a value"));
        }
        pairs.push((key, value));
    }
    Ok(pairs)
}

/// `path=FILE[,readonly=on|off][,id=NAME]`.
pub fn parse_disk(text: &str) -> Result<veil::DiskConfig, String> {
    let mut disk = veil::DiskConfig::new("");
    let mut has_path = false;
    for (key, value) in parse_options(text, &["path", "readonly", "id"])? {
        match key {
            "path" => {
                disk.path = value.into();
                has_path = true;
            }
            "readonly" => {
                disk.read_only = match value {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(format!("readonly is on or off, not '{value}'")),
                }
            }
            _ => {
                if value.len() > 20 {
                    return Err(format!("the id '{value}' is longer than 20 bytes"));
                }
                disk.id = Some(value.into())
            }
        }
    }
    if !has_path {
        return Err("a disk needs path=FILE".into());
    }
    Ok(disk)
}

/// `id=NAME,path=FILE`.
pub fn parse_disk_mapping(text: &str) -> Result<(String, PathBuf), String> {
    let pairs = parse_options(text, &["id", "path"])?;
    let get = |key| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    match (get("id"), get("path")) {
        (Some(id), Some(path)) => Ok((id.into(), path.into())),
        _ => Err("a disk mapping needs id=NAME,path=FILE".into()),
    }
}

/// `cid=N,socket=PATH`.
pub fn parse_vsock(text: &str) -> Result<veil::VsockConfig, String> {
    let pairs = parse_options(text, &["cid", "socket"])?;
    let get = |key| pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
    match (get("cid"), get("socket")) {
        (Some(cid), Some(socket)) => {
            let cid: u64 = cid
                .parse()
                .map_err(|_| format!("cid must be a number, not '{cid}'"))?;
            if !(3..u64::from(u32::MAX)).contains(&cid) {
                return Err(format!(
                    "cid {cid} is reserved: guests have 3 to 4294967294"
                ));
            }
            Ok(veil::VsockConfig::new(cid, socket))
        }
        _ => Err("a vsock device needs cid=N,socket=PATH".into()),
    }
}

/// `on` or `off`.
pub fn parse_on_off(text: &str) -> Result<bool, String> {
    match text {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("'{text}' is neither on nor off")),
    }
}

/// `stdio`, `file:PATH`, `unix:PATH`.
pub fn parse_console(text: &str) -> Result<veil::ConsoleBackend, String> {
    text.parse()
        .map_err(|_| format!("'{text}' is not a console: use stdio, file:PATH or unix:PATH"))
}

/// `stdio`, `file:PATH`, `unix:PATH`, `null`.
pub fn parse_serial(text: &str) -> Result<SerialSink, String> {
    let (kind, path) = text.split_once(':').unwrap_or((text, ""));
    match (kind, path) {
        ("stdio", "") => Ok(SerialSink::Stdout),
        ("null", "") => Ok(SerialSink::Null),
        ("file", p) if !p.is_empty() => Ok(SerialSink::File(p.into())),
        ("unix", p) if !p.is_empty() => Ok(SerialSink::UnixSocket(p.into())),
        _ => Err(format!(
            "'{text}' is not a serial sink: use stdio, file:PATH, unix:PATH or null"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_parse_with_their_options_and_say_what_is_wrong() {
        let disk = parse_disk("path=/d.img,readonly=on,id=root").unwrap();
        assert_eq!(disk.path, PathBuf::from("/d.img"));
        assert!(disk.read_only);
        assert_eq!(disk.id.as_deref(), Some("root"));
        let plain = parse_disk("path=/d.img").unwrap();
        assert!(!plain.read_only && plain.id.is_none());
        assert!(parse_disk("readonly=on").unwrap_err().contains("path=FILE"));
        assert!(parse_disk("path=/a,size=1")
            .unwrap_err()
            .contains("unknown option"));
        assert!(parse_disk("path=/a,path=/b").unwrap_err().contains("twice"));
        assert!(parse_disk("path=/a,readonly=maybe")
            .unwrap_err()
            .contains("on or off"));
        assert!(parse_disk("/d.img").unwrap_err().contains("key=value"));
        assert!(parse_disk("path=/a,id=an-id-of-more-than-20-bytes")
            .unwrap_err()
            .contains("20 bytes"));
        assert_eq!(
            parse_disk_mapping("id=root,path=/b.img"),
            Ok(("root".into(), PathBuf::from("/b.img")))
        );
        assert!(parse_disk_mapping("id=root").is_err());
    }

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64g"), Ok(64 << 30));
        assert_eq!(parse_size("65536"), Ok(65536));
        assert!(parse_size("12X").unwrap_err().contains("not a size"));
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn serial_sinks_parse() {
        assert_eq!(parse_serial("stdio"), Ok(SerialSink::Stdout));
        assert_eq!(
            parse_serial("file:/tmp/x"),
            Ok(SerialSink::File("/tmp/x".into()))
        );
        assert_eq!(
            parse_serial("unix:/run/s"),
            Ok(SerialSink::UnixSocket("/run/s".into()))
        );
        assert!(parse_serial("file:").is_err());
        assert!(parse_serial("tcp:1234").is_err());
    }
}
