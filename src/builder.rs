//! Builds a VM from a few choices and wires its devices.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use veil_devices::host_console::ConsoleIo;
use veil_devices::persist::Persist;
use veil_devices::serial::{IrqTrigger, SerialError, SerialRestoreArgs, SERIAL_PORT_LEN};
use veil_devices::virtio::block::{Block, BlockConfig, BlockError};
use veil_devices::virtio::console::{BackendError, Console, ConsoleBackend, ConsoleError};
use veil_devices::virtio::vsock::{self, Vsock, VsockConfig, VsockError};
use veil_devices::{Bus, BusError, ExitPort, ResetPort, Serial, SerialSink};
use veil_guest_abi::{COM1_PORT, EXIT_PORT, RESET_CONTROL_PORT};
use veil_hypervisor::devices::{layout, DeviceManager, DeviceManagerError, DeviceSnapshot};
use veil_hypervisor::paravirt::TransportChoice;
use veil_hypervisor::vm::VmSnapshot;
use veil_hypervisor::VmSetup;
use veil_migration::monitor::MigrationMonitor;
use veil_seccomp::{Confinement, SeccompMode};
use veil_sev::firmware::{Firmware, Handle};

use crate::sev_launch::{self, SevConfig, SevLaunch, SevLaunchError};
use veil_hypervisor::{
    BootConfig, ExitHandlers, GuestMemory, MemoryConfig, RunState, RunningVm, VmConfig, VmError,
    VmStop,
};

/// The legacy IRQ line of COM1.
const COM1_IRQ: u32 = 4;
/// The i8042 keyboard controller's command port.
const I8042_COMMAND_PORT: u64 = 0x64;

/// Errors building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No kernel was given.
    #[error("No kernel given: set one with VmBuilder::kernel (or --kernel)")]
    NoKernel,
    /// The serial output could not be opened.
    #[error(transparent)]
    Serial(#[from] SerialError),
    /// A device could not be placed.
    #[error("Cannot place a device on the bus")]
    Bus(#[from] BusError),
    /// The VM could not be created or started.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The SEV launch failed.
    #[error("SEV launch failed")]
    Sev(#[from] SevLaunchError),
    /// Taking over a saved guest failed before it could run here.
    #[error("Cannot take over the incoming guest")]
    Receive(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An SEV guest must arrive into an SEV VM through the firmware, and a plain one into a
    /// plain VM.
    #[error("The incoming guest's SEV-ness does not match this VM's (--sev-platform)")]
    IncomingSev,
    /// The snapshot could not be read.
    #[error("Cannot restore the snapshot")]
    Snapshot(#[from] veil_migration::snapshot::SnapshotError),
    /// This host cannot run the saved guest.
    #[error("Cannot restore the snapshot: {0}")]
    Refused(String),
    /// A disk could not be opened.
    #[error("Cannot use {} as a disk", path.display())]
    Disk {
        path: PathBuf,
        #[source]
        source: BlockError,
    },
    /// The virtio devices could not be set up.
    #[error(transparent)]
    Devices(#[from] DeviceManagerError),
    /// Two disks were given the same id.
    #[error("Two disks have the id {0}: ids name disks and must differ")]
    DuplicateDiskId(String),
    /// The console's host end could not be opened.
    #[error("Cannot open the console")]
    ConsoleBackend(#[from] BackendError),
    /// The console could not be created.
    #[error("Cannot create the console")]
    Console(#[from] ConsoleError),
    /// The vsock device could not be created.
    #[error("Cannot create the vsock device")]
    Vsock(#[from] VsockError),
    /// The seccomp filters could not be built.
    #[error("Cannot build the seccomp filters")]
    Seccomp(#[from] veil_seccomp::SeccompError),
}

/// The name of the console device.
const CONSOLE_NAME: &str = "console0";
/// The name of the vsock device.
const VSOCK_NAME: &str = "vsock0";

/// Opens and names every disk, in order.
fn open_disks(disks: &[BlockConfig]) -> Result<Vec<(String, Block)>, Error> {
    let mut opened: Vec<(String, Block)> = Vec::new();
    for (index, config) in disks.iter().enumerate() {
        let name = config.id.clone().unwrap_or_else(|| format!("disk{index}"));
        if opened.iter().any(|(other, _)| *other == name) {
            return Err(Error::DuplicateDiskId(name));
        }
        let block = Block::new(config.clone()).map_err(|source| Error::Disk {
            path: config.path.clone(),
            source,
        })?;
        opened.push((name, block));
    }
    Ok(opened)
}

/// Where guest serial output goes.
pub enum SerialOutput {
    /// A standard sink: stdout, a file, a UNIX socket, or nowhere.
    Sink(SerialSink),
    /// Any writer (a buffer, a pipe, a logger).
    Writer(Box<dyn Write + Send>),
}

/// Fills a new VM's memory with a saved guest's RAM and returns the rest of its state; for an
/// SEV guest it receives private pages through the firmware it is given and returns the
/// firmware's handle for the guest.
pub type ReceiveGuest<'a> = Box<
    dyn FnOnce(
            &GuestMemory,
            Option<&mut dyn Firmware>,
        )
            -> Result<(VmSnapshot, Option<Handle>), Box<dyn std::error::Error + Send + Sync>>
        + 'a,
>;

/// Chooses memory, vCPUs, kernel and serial output, then starts the VM.
pub struct VmBuilder {
    memory: MemoryConfig,
    vcpus: u32,
    boot: BootConfig,
    kernel_set: bool,
    serial: SerialOutput,
    hypercall_transport: TransportChoice,
    guest_cpuid: Option<veil_hypervisor::cpuid::Cpuid>,
    cpu_model: veil_hypervisor::cpuid::CpuModel,
    encrypted_memory: bool,
    sev: Option<SevConfig>,
    disks: Vec<BlockConfig>,
    /// For an incoming guest: where this host finds a disk (or the vsock socket), by the
    /// device's name.
    disk_paths: HashMap<String, PathBuf>,
    console: Option<ConsoleBackend>,
    vsock: Option<VsockConfig>,
    huge_pages: bool,
    ram_mapping: veil_hypervisor::memory::FileMapping,
    seccomp: SeccompMode,
    /// The filters for [`VmBuilder::seccomp`]'s mode, once compiled (or given).
    confinement: Option<Confinement>,
}

impl Default for VmBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl VmBuilder {
    /// 256 MiB, one vCPU, serial to stdout; a kernel must still be chosen.
    pub fn new() -> Self {
        Self {
            memory: MemoryConfig {
                size: 256 << 20,
                file: None,
            },
            vcpus: 1,
            boot: BootConfig::default(),
            kernel_set: false,
            serial: SerialOutput::Sink(SerialSink::Stdout),
            hypercall_transport: TransportChoice::Auto,
            guest_cpuid: None,
            cpu_model: veil_hypervisor::cpuid::CpuModel::Host,
            encrypted_memory: false,
            sev: None,
            disks: Vec::new(),
            disk_paths: HashMap::new(),
            console: None,
            vsock: None,
            huge_pages: true,
            ram_mapping: Default::default(),
            seccomp: SeccompMode::Off,
            confinement: None,
        }
    }

    /// Seccomp filters for the VM's own threads (vCPUs, reset, device loop, console socket,
    /// and the API server and migration threads of [`crate::api::ApiServer`]): `Off` by
    /// default for a library, whose calling threads are its own; the `veil` command turns
    /// them `On` and confines its main thread too ([`Vm::confinement`]). docs/seccomp.md has
    /// what each thread may call.
    pub fn seccomp(mut self, mode: SeccompMode) -> Self {
        self.seccomp = mode;
        self.confinement = None;
        self
    }

    /// As [`VmBuilder::seccomp`], with filters the caller compiled already (and may use on
    /// threads of its own).
    pub fn confinement(mut self, confinement: Confinement) -> Self {
        self.seccomp = confinement.mode();
        self.confinement = Some(confinement);
        self
    }

    /// The filters the VM will install, compiled now if they were not given, and kept for
    /// the build.
    pub fn compiled_confinement(&mut self) -> Result<Confinement, Error> {
        if let Some(confinement) = &self.confinement {
            return Ok(confinement.clone());
        }
        let confinement = Confinement::new(self.seccomp)?;
        self.confinement = Some(confinement.clone());
        Ok(confinement)
    }

    /// Whether anonymous guest RAM asks for transparent huge pages (default: yes, as QEMU
    /// does; fewer page faults and TLB misses, and memory is then given back in 2 MiB units).
    pub fn huge_pages(mut self, on: bool) -> Self {
        self.huge_pages = on;
        self
    }

    /// What [`huge_pages`](Self::huge_pages) was set to.
    pub(crate) fn wants_huge_pages(&self) -> bool {
        self.huge_pages
    }

    /// Adds a virtio-vsock device for CID `config.guest_cid` whose host side is UNIX sockets:
    /// host programs connect to `config.uds_path` and write `CONNECT <port>`; the guest
    /// reaches listeners at `<uds_path>_<port>` (see docs/devices.md). It comes after the
    /// disks and before the console.
    pub fn vsock(mut self, config: VsockConfig) -> Self {
        self.vsock = Some(config);
        self
    }

    /// For a guest arriving by migration: its vsock device listens at `path` on this host
    /// (by default at the path it had on the source).
    pub fn vsock_socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.disk_paths.insert(VSOCK_NAME.into(), path.into());
        self
    }

    /// Adds a virtio console (one port) after the disks, with its host end on `backend`;
    /// with `stdio` the console, not COM1, reads standard input. For a guest arriving by
    /// migration: where an arriving console's host end is (by default its output goes to
    /// stdout and it gets no input).
    pub fn console(mut self, backend: ConsoleBackend) -> Self {
        self.console = Some(backend);
        self
    }

    /// Adds a virtio-blk disk (a raw file or block device), locked against other writers.
    /// Disks are named by their `id`, or `disk0`, `disk1`... in the order added.
    pub fn disk(mut self, disk: BlockConfig) -> Self {
        self.disks.push(disk);
        self
    }

    /// For a guest arriving by migration: its disk named `name` is at `path` on this host
    /// (by default, at the path it had on the source: shared storage).
    pub fn disk_path(mut self, name: impl Into<String>, path: impl Into<PathBuf>) -> Self {
        self.disk_paths.insert(name.into(), path.into());
        self
    }

    /// Launches the guest under SEV: measured by the firmware, memory private by default.
    pub fn sev(mut self, config: SevConfig) -> Self {
        self.sev = Some(config);
        self
    }

    /// The SEV launch chosen, if any.
    pub(crate) fn sev_config(&self) -> Option<&SevConfig> {
        self.sev.as_ref()
    }

    /// How a RAM file is mapped (shared unless restoring a snapshot).
    pub(crate) fn ram_mapping(mut self, mapping: veil_hypervisor::memory::FileMapping) -> Self {
        self.ram_mapping = mapping;
        self
    }

    /// Gives the guest the paravirtual state of an SEV guest: a page-state map starting
    /// all-private and migration control starting at 0 (not ready). SEV launch sets this; on
    /// its own it encrypts nothing.
    pub fn encrypted_memory(mut self, encrypted: bool) -> Self {
        self.encrypted_memory = encrypted;
        self
    }

    /// How the guest's hypercalls reach Veil (default: probe the host once per boot).
    pub fn hypercall_transport(mut self, transport: TransportChoice) -> Self {
        self.hypercall_transport = transport;
        self
    }

    /// Gives the guest exactly this CPUID instead of building one from the host's: a
    /// migrated-in guest's own, from its source's Hello, once checked against this host
    /// (`check_incoming`).
    pub fn guest_cpuid(mut self, entries: Vec<kvm_bindings::kvm_cpuid_entry2>) -> Self {
        self.guest_cpuid = Some(veil_hypervisor::cpuid::Cpuid::from_entries(entries));
        self
    }

    /// The CPU a booted guest is given: everything this host offers (the default) or a named
    /// baseline, so that it can move to any host that has the baseline.
    pub fn cpu_model(mut self, model: veil_hypervisor::cpuid::CpuModel) -> Self {
        self.cpu_model = model;
        self
    }

    /// Bytes of guest RAM (16 MiB to 1 TiB, a multiple of 4 KiB).
    pub fn memory_bytes(mut self, bytes: u64) -> Self {
        self.memory.size = bytes;
        self
    }

    /// Backs guest RAM with this file (created or grown as needed; shared mapping).
    pub fn memory_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.memory.file = Some(path.into());
        self
    }

    /// Number of vCPUs.
    pub fn vcpus(mut self, count: u32) -> Self {
        self.vcpus = count;
        self
    }

    /// The kernel: an ELF with a PVH note, or a bzImage.
    pub fn kernel(mut self, path: impl Into<PathBuf>) -> Self {
        self.boot.kernel = path.into();
        self.kernel_set = true;
        self
    }

    /// An initial ramdisk.
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.boot.initrd = Some(path.into());
        self
    }

    /// The kernel command line.
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.boot.cmdline = cmdline.into();
        self
    }

    /// Sends serial output to a standard sink.
    pub fn serial(mut self, sink: SerialSink) -> Self {
        self.serial = SerialOutput::Sink(sink);
        self
    }

    /// Sends serial output to any writer.
    pub fn serial_writer(mut self, writer: impl Write + Send + 'static) -> Self {
        self.serial = SerialOutput::Writer(Box::new(writer));
        self
    }

    /// Creates the VM, loads the kernel and starts the vCPUs.
    pub fn start(self) -> Result<Vm, Error> {
        if !self.kernel_set {
            return Err(Error::NoKernel);
        }
        self.build(None)
    }

    /// Creates the VM and, instead of booting a kernel, takes over a guest saved elsewhere
    /// (the receiving end of a migration): `receive` fills guest memory and returns the saved
    /// state, which is restored before the vCPUs start. The shape (memory, vCPUs) must match.
    /// The VM comes back paused: [`Vm::resume`] runs the guest.
    pub fn start_incoming(self, receive: ReceiveGuest<'_>) -> Result<Vm, Error> {
        self.build(Some(receive))
    }

    fn build(mut self, receive: Option<ReceiveGuest<'_>>) -> Result<Vm, Error> {
        let confinement = self.compiled_confinement()?;
        // Standard input goes to one device: the console when it is on stdio, else COM1.
        let console_reads_stdin = self.console == Some(ConsoleBackend::Stdio);
        let (out, serial_input) = match self.serial {
            SerialOutput::Sink(SerialSink::Stdout) if console_reads_stdin => {
                (SerialSink::Stdout.open(&confinement)?, None)
            }
            SerialOutput::Sink(sink) => {
                let io = sink.open_io(&confinement)?;
                (io.output, io.input)
            }
            SerialOutput::Writer(w) => (w, None),
        };
        // Open the firmware first: a host without SEV should fail before anything is built.
        let mut sev_setup = self.sev.as_ref().map(sev_launch::prepare).transpose()?;
        // Disks next: a locked or missing one fails before the VM exists.
        let disks = open_disks(&self.disks)?;
        let vsock = match (&receive, &self.vsock) {
            (None, Some(config)) => Some(Vsock::new(config.clone())?),
            _ => None,
        };
        let console = match (&receive, &self.console) {
            (None, Some(backend)) => Some(Console::new(backend.open(&confinement)?)?),
            _ => None,
        };
        let mut boot = self.boot;
        let entries = layout::cmdline_entries(
            disks.len() + usize::from(vsock.is_some()) + usize::from(console.is_some()),
        );
        if !entries.is_empty() {
            boot.cmdline = [boot.cmdline.as_str(), entries.as_str()]
                .iter()
                .filter(|s| !s.is_empty())
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
        }
        let config = VmConfig {
            memory: self.memory,
            vcpus: self.vcpus,
            boot: receive.is_none().then_some(boot),
            encrypted_memory: self.encrypted_memory || self.sev.is_some(),
            measured_image: self.sev.is_some(),
            huge_pages: self.huge_pages,
            sev_status: self.sev.as_ref().and_then(sev_launch::sev_status_msr),
            hypercall_transport: self.hypercall_transport,
            guest_cpuid: self.guest_cpuid,
            cpu_model: self.cpu_model,
            ram_mapping: self.ram_mapping,
            confinement: confinement.clone(),
        };
        let setup_hooks: &mut dyn VmSetup = match &mut sev_setup {
            Some(sev) => sev,
            None => &mut (),
        };
        let mut vm = veil_hypervisor::Vm::create(&config, setup_hooks)?;
        let incoming = receive.is_some();
        let mut arrived_serial = None;
        let mut arrived_virtio = Vec::new();
        let sev = match (receive, self.sev, sev_setup) {
            (Some(receive), sev, mut setup) => {
                let firmware = setup.as_mut().and_then(|s| s.firmware_mut());
                let (snapshot, handle) = receive(vm.memory(), firmware).map_err(Error::Receive)?;
                vm.restore(&snapshot)?;
                arrived_serial = snapshot.serial;
                arrived_virtio = snapshot.virtio;
                match (sev, setup, handle) {
                    (Some(config), Some(setup), Some(handle)) => {
                        sev_launch::block_if_nosend(config.policy, vm.paravirt());
                        Some(SevGuest {
                            config,
                            launch: setup.received(handle)?,
                        })
                    }
                    (None, None, None) => None,
                    _ => return Err(Error::IncomingSev),
                }
            }
            (None, Some(sev), Some(setup)) => {
                let loaded = vm.boot_image().map_or(&[][..], |b| &b.loaded);
                let launched = sev_launch::launch(&sev, setup, vm.memory(), loaded)?;
                sev_launch::block_if_nosend(sev.policy, vm.paravirt());
                Some(SevGuest {
                    config: sev,
                    launch: launched,
                })
            }
            (None, _, _) => None,
        };

        let trigger = IrqTrigger::new().map_err(SerialError::Eventfd)?;
        let serial = match &arrived_serial {
            Some(state) => Serial::restore(
                SerialRestoreArgs {
                    trigger,
                    output: out,
                },
                state,
            )?,
            None => Serial::new(trigger, out),
        };
        vm.register_irqfd(serial.interrupt(), COM1_IRQ)?;
        let has_input = serial_input.is_some();
        let mut serial = serial;
        if let Some(input) = serial_input {
            serial.set_input(input)?;
        }
        let serial = Arc::new(Mutex::new(serial));
        let control = vm.control();
        let exit_port =
            ExitPort::new(move |status| control.request_stop(VmStop::GuestExit(status)));
        let control = vm.control();
        let reset_register = ResetPort::control_register(move || control.request_reset());
        let control = vm.control();
        let keyboard_reset = ResetPort::keyboard_controller(move || control.request_reset());
        let mut pio = Bus::new();
        pio.insert(serial.clone(), u64::from(COM1_PORT), SERIAL_PORT_LEN)?;
        pio.insert(
            Arc::new(Mutex::new(exit_port)),
            u64::from(EXIT_PORT),
            ExitPort::LEN,
        )?;
        pio.insert(
            Arc::new(Mutex::new(reset_register)),
            u64::from(RESET_CONTROL_PORT),
            1,
        )?;
        pio.insert(Arc::new(Mutex::new(keyboard_reset)), I8042_COMMAND_PORT, 1)?;

        let mut devices =
            DeviceManager::new(vm.memory().clone(), vm.paravirt(), config.encrypted_memory);
        for (name, block) in disks {
            devices.add(vm.fd(), &name, block.into())?;
        }
        if let Some(vsock) = vsock {
            devices.add(vm.fd(), VSOCK_NAME, vsock.into())?;
        }
        if let Some(console) = console {
            devices.add(vm.fd(), CONSOLE_NAME, console.into())?;
        }
        let console_arrives = arrived_virtio
            .iter()
            .any(|saved| matches!(saved.device, DeviceSnapshot::Console { .. }));
        let mut arriving_console = match (&self.console, console_arrives) {
            (_, false) => None,
            (Some(backend), true) => Some(backend.open(&confinement)?),
            // Output where COM1's would go by default; the input stays COM1's.
            (None, true) => Some(ConsoleIo {
                output: Box::new(std::io::stdout()),
                input: None,
            }),
        };
        for saved in &arrived_virtio {
            let disk_path = self.disk_paths.get(&saved.name).cloned();
            devices.restore(vm.fd(), saved, disk_path, &mut arriving_console)?;
        }
        devices.set_serial(serial.clone(), has_input);
        let (mmio, devices) = devices.start(&confinement)?;

        let handlers = ExitHandlers {
            pio,
            mmio,
            devices: Some(devices),
            ..Default::default()
        };
        let running = if incoming {
            vm.start_paused(handlers)?
        } else {
            vm.start(handlers)?
        };
        Ok(Vm {
            running,
            sev,
            migration: Arc::new(MigrationMonitor::new()),
            confinement,
            last_snapshot: Default::default(),
        })
    }
}

/// Why [`Vm::connect_vsock`] failed.
#[derive(Debug, thiserror::Error)]
pub enum VsockConnectError {
    #[error("The VM has no vsock device (VmBuilder::vsock, --vsock)")]
    NoVsock,
    #[error("Cannot connect to the guest over vsock")]
    Connect(#[source] vsock::ClientError),
}

/// An SEV guest's firmware context.
pub struct SevGuest {
    pub config: SevConfig,
    pub launch: SevLaunch,
}

/// A running VM.
pub struct Vm {
    running: RunningVm,
    sev: Option<SevGuest>,
    migration: Arc<MigrationMonitor>,
    confinement: Confinement,
    /// The last snapshot after which the guest ran on: what a diff snapshot goes on top of.
    pub(crate) last_snapshot: std::sync::Mutex<Option<veil_migration::snapshot::DiffBase>>,
}

impl Vm {
    /// Parks every vCPU; returns the state reached (`Stopped` if the VM ended meanwhile).
    pub fn pause(&self) -> RunState {
        self.running.pause()
    }

    /// Lets the vCPUs run again, unless a migration holds the guest (its stop-and-copy, or
    /// one in doubt: the target may be running it, see `veil_migration::recovery`); the
    /// state is returned either way.
    pub fn resume(&self) -> RunState {
        if self.migration.holds_the_guest() {
            return self.running.run_state();
        }
        self.running.resume()
    }

    /// Asks the VM to stop; [`Vm::wait`] then returns [`VmStop::Requested`].
    pub fn stop(&self) {
        self.running.stop()
    }

    /// Running, paused or stopped.
    pub fn state(&self) -> RunState {
        self.running.run_state()
    }

    /// Waits for the VM to stop and says why it did.
    pub fn wait(&self) -> VmStop {
        self.running.wait()
    }

    /// Guest memory, readable and writable from the host at any time.
    pub fn memory(&self) -> &GuestMemory {
        self.running.memory()
    }

    /// The outgoing migration's progress and cancel switch.
    pub fn migration(&self) -> &Arc<MigrationMonitor> {
        &self.migration
    }

    /// The SEV launch, for an SEV guest.
    pub fn sev(&self) -> Option<&SevGuest> {
        self.sev.as_ref()
    }

    /// Opens a stream to the guest's vsock port `port` (the guest must be listening), for
    /// programs that talk to a sandbox: returns the stream and the host port the guest sees.
    pub fn connect_vsock(
        &self,
        port: u32,
        timeout: std::time::Duration,
    ) -> Result<vsock::GuestConnection, VsockConnectError> {
        let path = self
            .running
            .devices()
            .and_then(|d| d.vsock_socket())
            .ok_or(VsockConnectError::NoVsock)?;
        vsock::connect_to_guest(&path, port, timeout).map_err(VsockConnectError::Connect)
    }

    /// The seccomp filters this VM's threads installed ([`VmBuilder::seccomp`]), for the
    /// program's own threads to install theirs: [`Confinement::apply`] with
    /// [`crate::ThreadKind::Main`] once the main thread has started the threads it will start.
    pub fn confinement(&self) -> &Confinement {
        &self.confinement
    }

    /// The hypervisor-level handle, for what this facade does not cover.
    pub fn inner(&self) -> &RunningVm {
        &self.running
    }
}
