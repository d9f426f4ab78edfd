//! A VM: KVM objects, RAM, vCPUs and the threads that run them.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;
use veil_seccomp::ThreadKind;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootConfig, BootError, BootImage};
use crate::control::{RunState, VmControl, VmStop};
use crate::cpuid::{Cpuid, CpuidError};
use crate::exits::{ExitAction, ExitHandlers};
use crate::host::{open_kvm, HostError};
use crate::layout;
use crate::memory::{GuestMemory, GuestRam, MemoryConfig, MemoryError};
use crate::paravirt::{self, Paravirt, ParavirtFeatures, ParavirtSnapshot, TransportChoice};
use crate::platform::{PlatformError, PlatformState};
use crate::power_on::{PowerOnError, PowerOnState};
use crate::vcpu::{
    self, install_kick_handler, KickTarget, RestoreWith, Vcpu, VcpuError, VcpuState, VcpuStateError,
};
use serde::{Deserialize, Serialize};

/// Errors creating or controlling a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error("Cannot create the VM")]
    Create(#[source] kvm_ioctls::Error),
    #[error("Cannot set up the VM: {what} failed")]
    Setup {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Invalid vCPU count {requested}: this host allows 1 to {max}")]
    VcpuCount { requested: u32, max: u32 },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("Cannot install the vCPU kick signal handler")]
    Signal(#[source] vmm_sys_util::errno::Error),
    #[error("Cannot start a vCPU thread")]
    Thread(#[source] std::io::Error),
    #[error("The VM is not paused")]
    NotPaused,
    #[error(transparent)]
    PowerOn(#[from] PowerOnError),
    #[error("VM set-up failed")]
    SetupHook(#[source] SetupHookError),
    #[error("The saved VM has {found} {what}, this one {expected}")]
    SnapshotShape {
        what: &'static str,
        found: u64,
        expected: u64,
    },
    #[error("Cannot restore the paravirtual state")]
    Paravirt(#[from] crate::paravirt::RestoreError),
    #[error("The guest asked for a reset, but its kernel is not on this host (it migrated in)")]
    NoKernelToReset,
    /// Reloading the kernel would write plaintext into memory the guest reads encrypted.
    #[error("An SEV guest cannot be reset: its image was encrypted and measured at launch, a reloaded kernel would be plaintext it reads as garbage, and the launch cannot be measured again")]
    EncryptedReset,
    #[error("Cannot save or restore the VM's device state")]
    Platform(#[from] PlatformError),
    #[error("Cannot take over the guest's TSC")]
    TscRate(#[from] vcpu::tsc::TscRateError),
    #[error("Cannot save the state of vCPU {vcpu}")]
    SaveState {
        vcpu: u32,
        #[source]
        source: VcpuStateError,
    },
}

/// The shape of a VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    pub memory: MemoryConfig,
    pub vcpus: u32,
    /// The kernel to boot; `None` for a VM that takes over a migrated guest
    /// ([`Vm::restore`]) instead of booting.
    pub boot: Option<BootConfig>,
    /// Guest memory is encrypted (SEV): pages start private and migration control at 0.
    pub encrypted_memory: bool,
    /// The image was encrypted and measured by the SEV firmware at launch (or arrived so):
    /// a guest reset cannot reload it, so it stops the VM instead.
    pub measured_image: bool,
    /// What the guest reads from `MSR_AMD64_SEV` (SEV_STATUS) when Veil must answer it: for a
    /// software SEV platform, whose guest has no SEV context in the CPU. `None` leaves the MSR
    /// to the CPU (on an SEV host the guest's RDMSR of it never reaches KVM).
    pub sev_status: Option<u64>,
    /// How hypercalls reach Veil.
    pub hypercall_transport: TransportChoice,
    /// Back anonymous guest RAM with transparent huge pages.
    pub huge_pages: bool,
    /// The CPUID to give the guest exactly (a migrated-in guest's own, checked against this
    /// host); `None` builds it from what this host's KVM supports and Veil adds.
    pub guest_cpuid: Option<Cpuid>,
    /// The CPU a new guest is given (ignored with `guest_cpuid`).
    pub cpu_model: crate::cpuid::CpuModel,
    /// How a RAM file is mapped: shared, or copy-on-write for a guest restored from a
    /// snapshot.
    pub ram_mapping: crate::memory::FileMapping,
    /// The seccomp filters the vCPU and reset threads install when they start.
    pub confinement: veil_seccomp::Confinement,
}

/// A paused VM's state besides its RAM: what a migration sends after the memory.
#[derive(Serialize, Deserialize)]
pub struct VmSnapshot {
    pub vcpus: Vec<VcpuState>,
    pub platform: PlatformState,
    pub paravirt: ParavirtSnapshot,
    /// COM1; absent, the target's UART starts afresh.
    #[serde(default)]
    pub serial: Option<veil_devices::serial::SerialState>,
    /// The virtio devices, in slot order.
    #[serde(default)]
    pub virtio: Vec<crate::devices::VirtioSnapshot>,
}

/// A VM that is set up but not running yet.
pub struct Vm {
    boot_config: Option<BootConfig>,
    measured_image: bool,
    fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    vcpus: Vec<Vcpu>,
    boot: Option<BootImage>,
    control: Arc<VmControl>,
    msr_indices: Vec<u32>,
    paravirt: Arc<Paravirt>,
    features: ParavirtFeatures,
    /// `KVM_CAP_SYNC_REGS`: the register sets KVM can mirror in `kvm_run`.
    sync_regs: u64,
    /// Captured before anything (a restore) can change the vCPUs: what a reset returns to.
    power_on: PowerOnState,
    /// The CPUID every vCPU got (before per-vCPU APIC ids).
    cpuid: Cpuid,
    /// This host's TSC rate and whether KVM can scale it.
    host_tsc: vcpu::tsc::HostTsc,
    /// The guest's TSC rate: this host's, or the one a migrated-in guest was scaled to.
    tsc_khz: Option<u32>,
    confinement: veil_seccomp::Confinement,
}

/// `KVM_CAP_SYNC_REGS`.
const KVM_CAP_SYNC_REGS: u64 = 74;

/// What upper layers add while a VM is built (SEV needs both).
pub trait VmSetup {
    /// Adds what upper layers implement to the CPUID, before any vCPU sees it.
    fn customize_cpuid(&mut self, _cpuid: &mut Cpuid) {}

    /// Runs once the VM and its RAM exist and before any vCPU does (SEV_INIT must).
    fn before_vcpus(&mut self, _vm: &Arc<VmFd>, _ram: &GuestRam) -> Result<(), SetupHookError> {
        Ok(())
    }
}

/// A [`VmSetup`] hook failed.
pub type SetupHookError = Box<dyn std::error::Error + Send + Sync>;

/// No additions.
impl VmSetup for () {}

/// What [`Vm::setup_cpus_and_boot`] made.
struct CpusAndBoot {
    paravirt: Arc<Paravirt>,
    vcpus: Vec<Vcpu>,
    boot: Option<BootImage>,
    cpuid: Cpuid,
}

impl Vm {
    /// Creates the VM, its memory and vCPUs and loads the kernel; `setup` adds what upper
    /// layers implement (paravirt features, SEV).
    pub fn create(config: &VmConfig, setup_hooks: &mut dyn VmSetup) -> Result<Self, VmError> {
        let kvm = open_kvm()?;
        let max = kvm.get_max_vcpus().min(u32::MAX as usize) as u32;
        if config.vcpus == 0 || config.vcpus > max {
            return Err(VmError::VcpuCount {
                requested: config.vcpus,
                max,
            });
        }
        let ram = Arc::new(GuestRam::with_options(
            &config.memory,
            config.huge_pages,
            config.ram_mapping,
        )?);
        let fd = Arc::new(kvm.create_vm().map_err(VmError::Create)?);
        // Order matters for start-up time. Each update below waits for a grace period of the
        // VM's SRCU. The MSR filter's wait is a normal one unless the SRCU is idle, as it is
        // only before any other update: first it takes under 0.1 ms, after the memory slots or
        // the interrupt controllers 4 to 20 ms here. The others wait for expedited ones (well
        // under 1 ms each, one after another), but not when two threads update at once:
        // registering memory beside the interrupt controllers' set-up made both take
        // milliseconds. So: the filter, then the rest in turn.
        let features = paravirt::setup::enable(
            &kvm,
            &fd,
            config.hypercall_transport,
            config.sev_status.is_some(),
        );
        setup_hooks
            .before_vcpus(&fd, &ram)
            .map_err(VmError::SetupHook)?;
        ram.register(&fd)?;
        let CpusAndBoot {
            paravirt,
            vcpus,
            boot,
            cpuid,
        } = Self::setup_cpus_and_boot(&kvm, &fd, &ram, config, features, |cpuid| {
            setup_hooks.customize_cpuid(cpuid)
        })?;
        let msr_indices = vcpu::stateful_msrs(&kvm, &vcpus[0].fd);
        let power_on = PowerOnState::capture(&fd, &vcpus, &msr_indices)?;
        let host_tsc = vcpu::tsc::HostTsc::probe(&kvm, vcpus[0].fd.get_tsc_khz().ok());

        Ok(Self {
            boot_config: config.boot.clone(),
            measured_image: config.measured_image,
            fd,
            ram,
            control: Arc::new(VmControl::new(vcpus.len())),
            vcpus,
            boot,
            msr_indices,
            paravirt,
            features,
            sync_regs: kvm.check_extension_raw(KVM_CAP_SYNC_REGS).max(0) as u64,
            power_on,
            cpuid,
            tsc_khz: host_tsc.khz,
            host_tsc,
            confinement: config.confinement.clone(),
        })
    }

    /// The interrupt controllers, paravirtual state, CPUID, vCPUs and the loaded kernel.
    fn setup_cpus_and_boot(
        kvm: &kvm_ioctls::Kvm,
        fd: &VmFd,
        ram: &Arc<GuestRam>,
        config: &VmConfig,
        features: ParavirtFeatures,
        customize_cpuid: impl FnOnce(&mut Cpuid),
    ) -> Result<CpusAndBoot, VmError> {
        let setup = |what| move |source| VmError::Setup { what, source };
        fd.set_tss_address(layout::KVM_TSS_ADDRESS)
            .map_err(setup("KVM_SET_TSS_ADDR"))?;
        fd.create_irq_chip().map_err(setup("KVM_CREATE_IRQCHIP"))?;
        fd.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(setup("KVM_CREATE_PIT2"))?;
        let paravirt = Arc::new(
            Paravirt::new(
                Arc::clone(ram),
                config.encrypted_memory,
                features.migration_control,
            )
            .with_sev_status(config.sev_status),
        );
        let cpuid = match &config.guest_cpuid {
            // What the guest saw on its first host, including what Veil and upper layers
            // added there: nothing is added again.
            Some(given) => given.clone(),
            None => {
                let mut cpuid = Cpuid::supported(kvm)?;
                cpuid.restrict_to(config.cpu_model);
                paravirt::setup::advertise(&mut cpuid, &features);
                customize_cpuid(&mut cpuid);
                cpuid
            }
        };
        let vcpus = (0..config.vcpus)
            .map(|id| Vcpu::new(fd, id, &cpuid, config.vcpus))
            .collect::<Result<Vec<_>, _>>()?;
        for v in &vcpus {
            v.setup_lapic_lint()?;
        }
        let boot = config
            .boot
            .as_ref()
            .map(|b| boot::load(ram.memory(), b))
            .transpose()?;
        if let Some(boot) = &boot {
            vcpus[0].setup_boot_entry(boot.entry)?;
        }
        Ok(CpusAndBoot {
            paravirt,
            vcpus,
            boot,
            cpuid,
        })
    }

    /// The page-state map, migration control and blockers.
    pub fn paravirt(&self) -> &Arc<Paravirt> {
        &self.paravirt
    }

    /// The paravirtual features enabled and advertised.
    pub fn paravirt_features(&self) -> ParavirtFeatures {
        self.features
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        self.ram.memory()
    }

    /// RAM and its slots.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The KVM VM.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// What was loaded where (`None` for a VM created to take over a migrated guest).
    pub fn boot_image(&self) -> Option<&BootImage> {
        self.boot.as_ref()
    }

    /// Takes over a guest saved with [`RunningVm::snapshot`]; guest memory must already hold
    /// its RAM. Call before [`Vm::start`].
    pub fn restore(&mut self, snapshot: &VmSnapshot) -> Result<(), VmError> {
        if snapshot.vcpus.len() != self.vcpus.len() {
            return Err(VmError::SnapshotShape {
                what: "vCPUs",
                found: snapshot.vcpus.len() as u64,
                expected: self.vcpus.len() as u64,
            });
        }
        let count = self.vcpus.len() as u32;
        let invariant = vcpu::tsc::is_invariant(&self.cpuid);
        for (v, state) in self.vcpus.iter().zip(&snapshot.vcpus) {
            let tsc_khz = match vcpu::tsc::plan(state.tsc_khz, self.host_tsc, invariant)? {
                vcpu::tsc::TscPlan::HostRate => None,
                vcpu::tsc::TscPlan::Scale(khz) => Some(khz),
            };
            self.tsc_khz = tsc_khz.or(self.tsc_khz);
            // The CPUID this VM was built with (the guest's own, for a migrated-in guest),
            // set again first so everything after it is checked against it.
            let cpuid = self.cpuid.for_vcpu(v.id, count).map_err(|e| {
                VmError::Vcpu(VcpuError::Cpuid {
                    id: v.id,
                    source: e,
                })
            })?;
            state
                .restore(
                    &v.fd,
                    RestoreWith {
                        cpuid: Some(cpuid.as_slice()),
                        tsc_khz,
                    },
                )
                .map_err(|source| VmError::SaveState { vcpu: v.id, source })?;
        }
        snapshot.platform.restore(&self.fd)?;
        self.paravirt.restore(&snapshot.paravirt)?;
        Ok(())
    }

    /// The VM's run control, for devices that stop the VM.
    pub fn control(&self) -> Arc<VmControl> {
        Arc::clone(&self.control)
    }

    /// Raises `gsi` whenever `event` is written.
    pub fn register_irqfd(&self, event: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd
            .register_irqfd(event, gsi)
            .map_err(|source| VmError::Setup {
                what: "KVM_IRQFD",
                source,
            })
    }

    /// Starts the vCPU threads parked: the guest runs once [`RunningVm::resume`] is called
    /// (a migrated-in guest, once the source has let it go).
    pub fn start_paused(self, handlers: ExitHandlers) -> Result<RunningVm, VmError> {
        self.control.hold();
        self.start(handlers)
    }

    /// Starts one thread per vCPU. MSR and hypercall exits not claimed in `handlers` go to
    /// the VM's paravirtual state.
    pub fn start(self, mut handlers: ExitHandlers) -> Result<RunningVm, VmError> {
        install_kick_handler().map_err(VmError::Signal)?;
        if handlers.msr.is_none() && self.features.migration_control {
            handlers.msr = Some(self.paravirt.clone());
        }
        if handlers.hypercall.is_none() {
            handlers.hypercall = Some(self.paravirt.clone());
        }
        handlers.hypercall_port = handlers.hypercall_port.or(self.features.hypercall_port);
        let power_on = self.power_on;
        let sync_regs = self.sync_regs;
        let devices = handlers.devices.clone();
        let handlers = Arc::new(handlers);
        let vcpus: Vec<Arc<Mutex<Vcpu>>> = self
            .vcpus
            .into_iter()
            .map(|v| Arc::new(Mutex::new(v)))
            .collect();
        let mut threads = Vec::with_capacity(vcpus.len());
        for vcpu in &vcpus {
            let (vcpu, control, handlers, ram, confinement) = (
                Arc::clone(vcpu),
                Arc::clone(&self.control),
                Arc::clone(&handlers),
                Arc::clone(&self.ram),
                self.confinement.clone(),
            );
            let id = lock(&vcpu).id;
            let spawned = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    if let Err(e) = confinement.apply(ThreadKind::Vcpu) {
                        return control.request_stop(VmStop::HostError {
                            vcpu: id,
                            message: veil_seccomp::chain(&e),
                        });
                    }
                    run_vcpu(&vcpu, &control, &handlers, ram.memory(), sync_regs)
                });
            match spawned {
                Ok(handle) => {
                    self.control
                        .add_thread(std::os::unix::thread::JoinHandleExt::as_pthread_t(&handle));
                    threads.push(handle);
                }
                Err(e) => {
                    self.control.request_stop(VmStop::Requested);
                    return Err(VmError::Thread(e));
                }
            }
        }
        let supervisor = {
            let reset = Reset {
                power_on,
                boot: self.boot_config,
                measured_image: self.measured_image,
                vm: Arc::clone(&self.fd),
                ram: Arc::clone(&self.ram),
                vcpus: vcpus.clone(),
                paravirt: Arc::clone(&self.paravirt),
                control: Arc::clone(&self.control),
            };
            let confinement = self.confinement.clone();
            std::thread::Builder::new()
                .name("vm-reset".into())
                .spawn(move || match confinement.apply(ThreadKind::Reset) {
                    Ok(()) => reset.serve(),
                    Err(e) => reset.control.request_stop(VmStop::HostError {
                        vcpu: 0,
                        message: veil_seccomp::chain(&e),
                    }),
                })
                .map_err(|e| {
                    self.control.request_stop(VmStop::Requested);
                    VmError::Thread(e)
                })?
        };
        Ok(RunningVm {
            supervisor: Mutex::new(Some(supervisor)),
            fd: self.fd,
            ram: self.ram,
            vcpus,
            control: self.control,
            threads: Mutex::new(threads),
            msr_indices: self.msr_indices,
            paravirt: self.paravirt,
            features: self.features,
            devices,
            cpuid: self.cpuid,
            tsc_khz: self.tsc_khz,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn run_vcpu(
    vcpu: &Mutex<Vcpu>,
    control: &VmControl,
    handlers: &ExitHandlers,
    memory: &GuestMemory,
    sync_regs: u64,
) {
    let (id, kick) = {
        let mut v = lock(vcpu);
        handlers.prepare_vcpu(&mut v.fd, sync_regs);
        (v.id, KickTarget::arm(&mut v.fd))
    };
    loop {
        kick.clear();
        if !control.vcpu_may_run() {
            break;
        }
        let mut v = lock(vcpu);
        match handlers.run_once(id, &mut v.fd, memory) {
            Ok(ExitAction::Resume | ExitAction::Interrupted) => {}
            Ok(ExitAction::Halted) => {
                control.request_stop(VmStop::Halted { vcpu: id });
                break;
            }
            Ok(ExitAction::Fault(report)) => {
                control.request_stop(VmStop::Fault(report));
                break;
            }
            Err(e) => {
                control.request_stop(VmStop::HostError {
                    vcpu: id,
                    message: format!("KVM_RUN failed: {e}"),
                });
                break;
            }
        }
    }
    drop(kick);
    control.vcpu_exited();
}

/// A VM whose vCPUs are running (or paused, or stopped).
pub struct RunningVm {
    fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    control: Arc<VmControl>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    msr_indices: Vec<u32>,
    paravirt: Arc<Paravirt>,
    features: ParavirtFeatures,
    devices: Option<Arc<crate::devices::MachineDevices>>,
    cpuid: Cpuid,
    tsc_khz: Option<u32>,
}

/// Performs guest-requested resets: back to power-on state, kernel reloaded, paravirtual state
/// reset; guest RAM otherwise kept, as on a PC.
struct Reset {
    power_on: PowerOnState,
    /// `None` when the kernel is not on this host (the guest migrated in).
    boot: Option<BootConfig>,
    measured_image: bool,
    vm: Arc<VmFd>,
    ram: Arc<GuestRam>,
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    paravirt: Arc<Paravirt>,
    control: Arc<VmControl>,
}

impl Reset {
    fn serve(self) {
        while self.control.wait_for_reset() {
            tracing::info!("guest requested a reset");
            match self.reset() {
                Ok(()) => self.control.finish_reset(),
                Err(e) => self.control.request_stop(VmStop::HostError {
                    vcpu: 0,
                    message: format!("reset failed: {e}"),
                }),
            }
        }
    }

    fn reset(&self) -> Result<(), VmError> {
        if self.measured_image {
            return Err(VmError::EncryptedReset);
        }
        let boot = self.boot.as_ref().ok_or(VmError::NoKernelToReset)?;
        self.power_on.restore_platform(&self.vm)?;
        for v in &self.vcpus {
            self.power_on.restore_vcpu(&lock(v))?;
        }
        boot::load(self.ram.memory(), boot)?;
        self.paravirt.reset_guest();
        Ok(())
    }
}

impl RunningVm {
    /// The CPUID every vCPU got (before per-vCPU APIC ids).
    pub fn cpuid(&self) -> &Cpuid {
        &self.cpuid
    }

    /// Resets the guest as if it had asked (vCPUs to power-on state, kernel reloaded).
    pub fn reset(&self) {
        self.control.request_reset();
    }

    /// The page-state map, migration control and blockers.
    pub fn paravirt(&self) -> &Arc<Paravirt> {
        &self.paravirt
    }

    /// The paravirtual features enabled and advertised.
    pub fn paravirt_features(&self) -> ParavirtFeatures {
        self.features
    }

    /// Pauses the whole machine: parks all vCPUs, then waits until no device serves a
    /// request and the devices' effects are durable. Returns once nothing touches guest
    /// memory, so a dirty scan after it is the last one needed.
    pub fn pause(&self) -> RunState {
        let state = self.control.pause();
        if let Some(devices) = &self.devices {
            devices.pause();
        }
        state
    }

    /// Resumes the devices, then the vCPUs.
    pub fn resume(&self) -> RunState {
        if self.control.run_state() == RunState::Paused {
            self.tell_guest_it_was_paused();
        }
        if let Some(devices) = &self.devices {
            devices.resume();
        }
        self.control.resume()
    }

    /// `KVM_KVMCLOCK_CTRL` on every vCPU (as QEMU does when a stopped VM runs again): KVM sets
    /// `PVCLOCK_GUEST_STOPPED` in the guest's kvmclock, so its soft-lockup watchdog does not
    /// take the time it was paused (or in flight) for a hang. KVM refuses it for a vCPU whose
    /// guest has not enabled kvmclock; nothing is lost then.
    fn tell_guest_it_was_paused(&self) {
        for v in &self.vcpus {
            let _ = lock(v).fd.kvmclock_ctrl();
        }
    }

    /// The virtio devices, if the VM has any.
    pub fn devices(&self) -> Option<&Arc<crate::devices::MachineDevices>> {
        self.devices.as_ref()
    }

    /// Asks the VM to stop; [`RunningVm::wait`] returns once it has.
    pub fn stop(&self) {
        self.control.request_stop(VmStop::Requested);
    }

    /// Stops the VM for good because its guest now runs elsewhere.
    pub fn hand_over(&self) {
        self.control.request_stop(VmStop::Migrated);
    }

    /// Running, paused or stopped.
    pub fn run_state(&self) -> RunState {
        self.control.run_state()
    }

    /// Blocks until the VM stops and its threads are gone.
    pub fn wait(&self) -> VmStop {
        let reason = self.control.wait_stopped();
        for t in lock(&self.threads).drain(..) {
            // A vCPU thread that panicked already stopped the VM; its reason stands.
            let _ = t.join();
        }
        if let Some(t) = lock(&self.supervisor).take() {
            let _ = t.join();
        }
        if let Some(devices) = &self.devices {
            devices.stop();
        }
        reason
    }

    /// The run control shared with devices.
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        self.ram.memory()
    }

    /// RAM and its slots.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The KVM VM.
    pub fn fd(&self) -> &Arc<VmFd> {
        &self.fd
    }

    /// The guest's TSC rate in kHz, if KVM told it (known without stopping a vCPU: a running
    /// one holds its lock inside KVM_RUN).
    pub fn tsc_khz(&self) -> Option<u32> {
        self.tsc_khz
    }

    /// Number of vCPUs.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.len()
    }

    /// Every vCPU's state; the VM must be paused.
    pub fn save_vcpu_states(&self) -> Result<Vec<VcpuState>, VmError> {
        if self.control.run_state() != RunState::Paused {
            return Err(VmError::NotPaused);
        }
        self.vcpus
            .iter()
            .map(|v| {
                let v = lock(v);
                VcpuState::save(&v.fd, &self.msr_indices, true)
                    .map_err(|source| VmError::SaveState { vcpu: v.id, source })
            })
            .collect()
    }

    /// The VM-wide device state KVM holds (interrupt controllers, PIT, clock); the VM must be
    /// paused.
    pub fn save_platform_state(&self) -> Result<PlatformState, VmError> {
        if self.control.run_state() != RunState::Paused {
            return Err(VmError::NotPaused);
        }
        Ok(PlatformState::save(&self.fd)?)
    }

    /// Writes VM-wide device state back; the VM must be paused.
    pub fn restore_platform_state(&self, state: &PlatformState) -> Result<(), VmError> {
        if self.control.run_state() != RunState::Paused {
            return Err(VmError::NotPaused);
        }
        Ok(state.restore(&self.fd)?)
    }

    /// Everything but RAM that a migration carries; the VM must be paused.
    pub fn snapshot(&self) -> Result<VmSnapshot, VmError> {
        Ok(VmSnapshot {
            vcpus: self.save_vcpu_states()?,
            platform: self.save_platform_state()?,
            paravirt: self.paravirt.snapshot(),
            serial: self.devices.as_ref().and_then(|d| d.save_serial()),
            virtio: self.devices.as_ref().map(|d| d.save()).unwrap_or_default(),
        })
    }

    /// Writes saved states back into the vCPUs; the VM must be paused.
    pub fn restore_vcpu_states(&self, states: &[VcpuState]) -> Result<(), VmError> {
        if self.control.run_state() != RunState::Paused {
            return Err(VmError::NotPaused);
        }
        for (v, state) in self.vcpus.iter().zip(states) {
            let v = lock(v);
            // A running VM's vCPUs have run: KVM allows no new CPUID.
            state
                .restore(&v.fd, RestoreWith::default())
                .map_err(|source| VmError::SaveState { vcpu: v.id, source })?;
        }
        Ok(())
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        if !lock(&self.threads).is_empty() {
            self.control.request_stop(VmStop::Requested);
            self.wait();
        }
    }
}
