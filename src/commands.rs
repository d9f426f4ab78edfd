//! What each `veil` subcommand does: wiring only, the work is in the library crates.

use std::error::Error;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use veil::{Confinement, ThreadKind, VmBuilder, VmStop};
use veil_hypervisor::probe::{probe_host, HostInfo};
use veil_migration::recovery::siblings::Siblings;

use crate::cli::{
    Command, HostInfoArgs, MachineArgs, PlatformChoice, ReceiveArgs, RestoreArgs, RunArgs,
    SevCommand, SevPlatformArgs,
};

type CommandResult = Result<ExitCode, Box<dyn Error>>;

/// `veil run` exits with this status when stopped by SIGINT or SIGTERM, like a shell would.
const EXIT_INTERRUPTED: u8 = 130;

/// The guest could not go on.
#[derive(Debug, thiserror::Error)]
#[error("The guest stopped: {0}")]
struct GuestFailed(VmStop);

pub fn dispatch(command: Command) -> CommandResult {
    match command {
        Command::Run(args) => run(*args),
        Command::Demo(machine) => demo(machine),
        Command::HostInfo(args) => host_info(args),
        Command::Ctl(args) => crate::ctl::run(args),
        Command::Receive(args) => receive(args),
        Command::Restore(args) => restore(*args),
        Command::Sev(command) => sev(command),
        Command::Kit { out } => {
            std::fs::write(&out, veil_guests::KIT_ELF)
                .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// A builder with the machine options applied, and the API socket to serve (if any).
fn machine(builder: VmBuilder, args: MachineArgs) -> (VmBuilder, Option<PathBuf>) {
    let builder = builder
        .memory_bytes(args.memory)
        .vcpus(args.vcpus)
        .serial(args.serial)
        .hypercall_transport(args.hypercall_transport.into())
        .huge_pages(args.huge_pages)
        .cpu_model(args.cpu_model)
        .seccomp(args.seccomp.mode);
    let mut builder = match args.memory_file {
        Some(path) => builder.memory_file(path),
        None => builder,
    };
    for disk in args.disks {
        builder = builder.disk(disk);
    }
    if let Some(vsock) = args.vsock {
        builder = builder.vsock(vsock);
    }
    if let Some(console) = args.console {
        builder = builder.console(console);
    }
    (builder, args.api_socket)
}

fn run(args: RunArgs) -> CommandResult {
    let mut builder = VmBuilder::new().kernel(args.kernel).cmdline(args.cmdline);
    if let Some(initrd) = args.initrd {
        builder = builder.initrd(initrd);
    }
    if let Some(sev) = args.sev.config() {
        builder = builder.sev(sev);
    }
    run_until_stopped(machine(builder, args.machine))
}

fn demo(args: MachineArgs) -> CommandResult {
    let kernel = bundled_kit()?;
    run_until_stopped(machine(
        VmBuilder::new().kernel(kernel.path).cmdline("greet"),
        args,
    ))
}

/// The bundled kit guest in an anonymous in-memory file, so the binary works from anywhere.
struct BundledKernel {
    path: PathBuf,
    _file: File,
}

fn bundled_kit() -> Result<BundledKernel, Box<dyn Error>> {
    // SAFETY: the name is a valid NUL-terminated string; the flags are valid for memfd_create.
    let fd = unsafe { libc::memfd_create(c"veil-kit".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
    let mut file = unsafe { File::from_raw_fd(fd) };
    file.write_all(veil_guests::KIT_ELF)?;
    Ok(BundledKernel {
        path: PathBuf::from(format!("/proc/self/fd/{fd}")),
        _file: file,
    })
}

fn run_until_stopped((builder, api_socket): (VmBuilder, Option<PathBuf>)) -> CommandResult {
    // Bound before the guest runs: whoever sees it run finds the socket.
    let api = bind_api(api_socket)?;
    serve_until_stopped(builder.start()?, api)
}

fn bind_api(path: Option<PathBuf>) -> Result<Option<veil::api::BoundApi>, veil::api::ServerError> {
    path.as_deref().map(veil::api::BoundApi::bind).transpose()
}

fn receive(args: ReceiveArgs) -> CommandResult {
    use veil_migration::{receiver, transport};
    if args.keep_listening {
        return crate::keep_listening::serve(&args);
    }
    let endpoint: transport::Endpoint = args.listen.parse()?;
    let security = transport::Security {
        tls: args.tls.files(),
        insecure: args.insecure,
        server_name: None,
    };
    let listener = match args.listen_fd {
        Some(fd) => {
            // A child waiting for a source ends with the service that started it; once it has
            // a guest, it runs on its own (below).
            // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and no pointers.
            unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) };
            // SAFETY: the `veil receive --keep-listening` that started this process passed
            // this descriptor, a listening socket, for this process to own from now on.
            let socket = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
            transport::inherit(&endpoint, &security, socket)?
        }
        None => transport::listen(&endpoint, &security)?,
    };
    // An SEV host sends its chain in the handshake so the source can verify it. The platform
    // is opened before anyone is told this host is waiting: a first use creates its identity.
    let sev_chain = if args.sev {
        use sev::parser::Encoder;
        let chain =
            veil::sev_launch::open_platform(&args.sev_platform.platform())?.certificate_chain()?;
        let mut bytes = Vec::new();
        chain.encode(&mut bytes, ())?;
        Some(bytes)
    } else {
        None
    };
    if args.listen_fd.is_none() {
        eprintln!("veil: waiting for a guest on {endpoint}");
    }
    // Strangers are logged and dropped in there; what comes out is a source, or a listener
    // that failed.
    let model = args.cpu_model;
    // Under --keep-listening a query about a guest that arrived earlier goes to its process.
    let siblings = args.siblings_dir.clone().map(Siblings::at);
    let answer = |query: &veil_migration::protocol::Message| match &siblings {
        Some(siblings) => siblings.ask(query),
        None => veil_migration::protocol::RecoveryOutcome::Unknown,
    };
    let mut incoming = receiver::accept_answering(
        &listener,
        args.hello_timeout,
        &answer,
        |shape| veil::check_incoming_as(shape, model),
        sev_chain,
    )?;
    eprintln!(
        "veil: a guest arrives from {} over {}{}",
        incoming.peer().unwrap_or("the source"),
        incoming.stream().protection(),
        match incoming.connections() {
            1 => String::new(),
            n => format!(" ({n} connections)"),
        }
    );
    // Compiled once: for the recovery responder here, and for the VM's threads.
    let confinement = Confinement::new(args.seccomp.mode)?;
    // Should Complete be lost, the source's recovery queries are answered here: on the
    // listener, or under --keep-listening on this process's socket among its siblings' (the
    // service takes the listener back).
    let answering_on = if let Some(fd) = args.accepted_fd {
        // SAFETY: the parent passed this descriptor, a pipe's write end, for this process
        // alone to own.
        let mut accepted = unsafe { File::from_raw_fd(fd) };
        // The parent listens for the next guest from now on; if it is gone, so be it.
        let _ = accepted.write_all(b"1");
        drop(listener);
        // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and no pointers.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0) };
        siblings.as_ref().map(Siblings::listen).transpose()?
    } else {
        Some(listener)
    };
    let responder = answering_on
        .map(|listener| {
            // Under the filter of a migration thread.
            let confinement = confinement.clone();
            veil_migration::recovery::Responder::start(
                listener,
                incoming.fate(),
                args.hello_timeout,
                args.recovery_window,
                Box::new(move || {
                    confinement
                        .apply(ThreadKind::MigrationSend)
                        .map_err(|e| veil_seccomp::chain(&e))
                }),
            )
        })
        .transpose()?;
    let builder = VmBuilder::new()
        .confinement(confinement)
        .serial(args.serial)
        .huge_pages(args.huge_pages);
    let mut builder = with_devices(builder, args.disks, args.vsock_socket, args.console);
    let mut discard = DiscardMemoryFile::new(args.memory_file.clone());
    if let Some(path) = args.memory_file {
        builder = builder.memory_file(path);
    }
    let sev_platform = args.sev.then(|| args.sev_platform.platform());
    let vm = match veil::migration::receive(&mut incoming, builder, sev_platform) {
        Ok(vm) => vm,
        Err(e) => {
            // Discarded for good (the VM is gone): tell a source that asks again the same.
            if let Some(responder) = &responder {
                if matches!(
                    responder.fate().get(),
                    veil_migration::protocol::Fate::Discarded(_)
                ) {
                    eprintln!("veil: the guest was discarded: {}", veil::error_chain(&e));
                    responder.linger();
                }
            }
            return Err(e.into());
        }
    };
    discard.keep();
    let api = bind_api(args.api_socket)?;
    vm.resume();
    eprintln!("veil: the guest arrived from {endpoint} and runs here");
    serve_until_stopped(vm, api)
}

/// The devices a guest arriving (or restored) here is given in place of its source's: the
/// disks by name, the vsock socket and the console.
fn with_devices(
    mut builder: VmBuilder,
    disks: Vec<(String, PathBuf)>,
    vsock_socket: Option<PathBuf>,
    console: Option<veil::ConsoleBackend>,
) -> VmBuilder {
    for (name, path) in disks {
        builder = builder.disk_path(name, path);
    }
    if let Some(path) = vsock_socket {
        builder = builder.vsock_socket(path);
    }
    if let Some(console) = console {
        builder = builder.console(console);
    }
    builder
}

fn restore(args: RestoreArgs) -> CommandResult {
    let builder = VmBuilder::new()
        .serial(args.serial)
        .seccomp(args.seccomp.mode);
    let mut builder = with_devices(builder, args.disks, args.vsock_socket, args.console);
    if args.sev {
        // The policy is the snapshot's; only the platform is chosen here.
        builder = builder.sev(veil::sev_launch::SevConfig {
            platform: args.sev_platform.platform(),
            policy: veil_sev::policy::GuestPolicy(0),
            owner_session: None,
            secret: None,
            secret_timeout: veil::sev_launch::DEFAULT_SECRET_TIMEOUT,
            measurement_out: None,
        });
    }
    let options = veil::RestoreOptions {
        vsock_cid: args.vsock_cid,
    };
    let api = bind_api(args.api_socket)?;
    let vm = builder.restore_with(&args.from, options)?;
    tracing::info!("restored the guest from {}", args.from.display());
    serve_until_stopped(vm, api)
}

/// A `--memory-file` an incoming guest is being written into: removed if the migration fails
/// and Veil created it, so nothing of a guest that never arrived stays behind.
struct DiscardMemoryFile(Option<PathBuf>);

impl DiscardMemoryFile {
    fn new(path: Option<PathBuf>) -> Self {
        match path {
            Some(path) if path.exists() => {
                eprintln!(
                    "veil: {} exists: if the migration fails it keeps what arrived",
                    path.display()
                );
                Self(None)
            }
            path => Self(path),
        }
    }

    /// The guest arrived: the file is its memory now.
    fn keep(&mut self) {
        self.0 = None;
    }
}

impl Drop for DiscardMemoryFile {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

fn serve_until_stopped(vm: veil::Vm, api: Option<veil::api::BoundApi>) -> CommandResult {
    let vm = Arc::new(vm);
    let _api = api.map(|bound| bound.serve(Arc::clone(&vm))).transpose()?;
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    let signal_handle = signals.handle();
    let on_signal = Arc::clone(&vm);
    let confinement = vm.confinement().clone();
    let watcher = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if let Err(e) = confinement.apply(ThreadKind::Signals) {
                // Without its watcher Ctrl-C would go unheard: stop now rather than run deaf.
                eprintln!("veil: error: {}", veil_seccomp::chain(&e));
                return on_signal.stop();
            }
            if signals.forever().next().is_some() {
                on_signal.stop();
            }
        })?;
    // Every thread this one starts is running: from here on it only waits and tears down.
    vm.confinement().apply(ThreadKind::Main)?;
    let stop = vm.wait();
    signal_handle.close();
    let _ = watcher.join();
    match stop {
        VmStop::GuestExit(status) => Ok(ExitCode::from(status)),
        VmStop::Requested => Ok(ExitCode::from(EXIT_INTERRUPTED)),
        VmStop::Migrated => {
            eprintln!("veil: the guest migrated to another host");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(Box::new(GuestFailed(other))),
    }
}

fn sev(command: SevCommand) -> CommandResult {
    match command {
        SevCommand::Status { platform, json } => {
            let status = open_firmware(&platform)?.platform_status()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!("platform      {}", platform_name(&platform));
                println!(
                    "API version   {}.{} (build {})",
                    status.api_major, status.api_minor, status.build
                );
                println!("state         {}", status.state);
                println!("guests        {}", status.guests);
                if status.confidential {
                    println!("memory        encrypted by the AMD Secure Processor");
                } else {
                    println!("memory        NOT encrypted: the emulated platform gives no confidentiality");
                }
            }
        }
        SevCommand::ExportChain { platform, out } => {
            use sev::parser::Encoder;
            let chain = open_firmware(&platform)?.certificate_chain()?;
            let mut bytes = Vec::new();
            chain.encode(&mut bytes, ())?;
            std::fs::write(&out, bytes)
                .map_err(|e| format!("cannot write {}: {e}", out.display()))?;
            eprintln!(
                "veil: wrote the {} platform's certificate chain to {}",
                platform_name(&platform),
                out.display()
            );
        }
        SevCommand::Owner(args) => crate::owner::run(*args)?,
        SevCommand::BenchTransport {
            platform,
            pages,
            json,
        } => {
            let bench = veil::sev_bench::transport(&platform.platform(), pages)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&bench)?);
            } else {
                println!(
                    "platform            {} (API {}.{} build {})",
                    platform_name(&platform),
                    bench.api_major,
                    bench.api_minor,
                    bench.build
                );
                for (name, rate) in [
                    ("SEND_UPDATE_DATA", &bench.send_update_data),
                    ("RECEIVE_UPDATE_DATA", &bench.receive_update_data),
                ] {
                    println!(
                        "{name:<20}{} pages in {:.3} s: {:.0} pages/s ({:.1} MiB/s)",
                        rate.pages, rate.seconds, rate.pages_per_second, rate.mib_per_second
                    );
                }
                if !bench.confidential {
                    println!("(the emulated platform: Veil's software crypto, not a PSP)");
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn platform_name(args: &SevPlatformArgs) -> &'static str {
    match args.sev_platform {
        PlatformChoice::Hardware => "hardware",
        PlatformChoice::Emulated => "emulated",
    }
}

fn open_firmware(
    args: &SevPlatformArgs,
) -> Result<Box<dyn veil_sev::firmware::Firmware>, Box<dyn Error>> {
    Ok(veil::sev_launch::open_platform(&args.platform())?)
}

fn host_info(args: HostInfoArgs) -> CommandResult {
    let info = probe_host()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
    } else {
        print_host_info(&info);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_host_info(info: &HostInfo) {
    println!("KVM API version     {}", info.kvm_api_version);
    println!(
        "vCPUs               up to {} (recommended {})",
        info.max_vcpus, info.recommended_vcpus
    );
    println!("VM types            {}", info.vm_types.join(", "));
    println!("Capabilities");
    for cap in &info.capabilities {
        let state = if cap.value > 0 { "yes" } else { "no " };
        println!("  {state} {:<38} {}", cap.name, cap.used_for);
    }
    println!("SEV                 {}", info.sev.summary);
    if !info.sev.kvm_sev_vm_type || !info.sev.dev_sev {
        println!("                    (--sev-platform emulated runs the SEV flow in software, with no confidentiality)");
    }
    println!(
        "Hypercall exits     {} ({}; probe took {:.1} ms)",
        if info.hypercall_exits.delivered {
            "delivered"
        } else {
            "NOT delivered"
        },
        info.hypercall_exits.detail,
        info.hypercall_exits.elapsed_us as f64 / 1000.0
    );
}
