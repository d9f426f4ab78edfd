//! The machine's virtio devices: where each sits ([`layout`]), how KVM reaches it (an
//! ioeventfd per queue for notifications, an irqfd per device for its interrupt), the thread
//! that serves them ([`event_loop`]), the guard that keeps an encrypted guest's devices to its
//! shared pages ([`shared_pages`]), and their state for a migration.
//!
//! A [`DeviceManager`] collects devices while the VM is built; [`DeviceManager::start`] hands
//! back the MMIO bus for the vCPUs and the running [`MachineDevices`], which the VM pauses,
//! resumes, saves and stops with itself.

pub mod event_loop;
pub mod layout;
pub mod shared_pages;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::{IoEventAddress, VmFd};
use serde::{Deserialize, Serialize};
use veil_devices::host_console::ConsoleIo;
use veil_devices::persist::Persist;
use veil_devices::serial::{Serial, SerialState};
use veil_devices::virtio::block::{Block, BlockError, BlockRestoreArgs, BlockState};
use veil_devices::virtio::console::{Console, ConsoleError, ConsoleState};
use veil_devices::virtio::mmio::{
    MmioError, MmioRestoreArgs, MmioState, MMIO_WINDOW_LEN, QUEUE_NOTIFY_OFFSET,
};
use veil_devices::virtio::vsock::{Vsock, VsockError, VsockRestoreArgs, VsockState};
use veil_devices::virtio::{DeviceMemory, MmioTransport, Refusals, VirtioDevice};
use veil_devices::{Bus, BusError};

use crate::memory::GuestMemory;
use crate::paravirt::Paravirt;
pub use event_loop::{EventLoop, EventLoopError};
pub use layout::DeviceSlot;
use shared_pages::GuestSharedPages;

/// Errors attaching, starting or restoring devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    #[error("Too many virtio devices: at most {}", layout::MAX_VIRTIO_DEVICES)]
    TooMany,
    #[error("Cannot create the transport of {name}")]
    Transport {
        name: String,
        #[source]
        source: MmioError,
    },
    #[error("KVM refused the {what} of {name}")]
    Kvm {
        name: String,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("Cannot place {name} on the MMIO bus")]
    Bus {
        name: String,
        #[source]
        source: BusError,
    },
    #[error(transparent)]
    Loop(#[from] EventLoopError),
    #[error("Cannot restore {name}")]
    RestoreBlock {
        name: String,
        #[source]
        source: BlockError,
    },
    #[error("Cannot restore {name}")]
    RestoreConsole {
        name: String,
        #[source]
        source: ConsoleError,
    },
    #[error("Cannot restore {name}")]
    RestoreVsock {
        name: String,
        #[source]
        source: VsockError,
    },
    #[error("Cannot take {name}'s socket back")]
    TakeBackSocket {
        name: String,
        #[source]
        source: VsockError,
    },
    #[error("The incoming device {name} sat at {saved:#x}, here it would be at {here:#x}")]
    SlotMismatch { name: String, saved: u64, here: u64 },
    #[error("Cannot hand {name}'s disk over")]
    HandOver {
        name: String,
        #[source]
        source: veil_devices::virtio::block::DiskError,
    },
}

/// One kind of device, with what only that kind has.
#[derive(Clone)]
pub enum MachineDevice {
    Block(Arc<Mutex<Block>>),
    Console(Arc<Mutex<Console>>),
    Vsock(Arc<Mutex<Vsock>>),
}

impl From<Block> for MachineDevice {
    fn from(block: Block) -> Self {
        Self::Block(Arc::new(Mutex::new(block)))
    }
}

impl From<Console> for MachineDevice {
    fn from(console: Console) -> Self {
        Self::Console(Arc::new(Mutex::new(console)))
    }
}

impl From<Vsock> for MachineDevice {
    fn from(vsock: Vsock) -> Self {
        Self::Vsock(Arc::new(Mutex::new(vsock)))
    }
}

impl MachineDevice {
    /// The virtio side, for the transport.
    fn virtio(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            MachineDevice::Block(b) => b.clone(),
            MachineDevice::Console(c) => c.clone(),
            MachineDevice::Vsock(v) => v.clone(),
        }
    }

    /// The event side, for the device thread.
    fn subscriber(&self) -> event_loop::Subscriber {
        match self {
            MachineDevice::Block(b) => b.clone(),
            MachineDevice::Console(c) => c.clone(),
            MachineDevice::Vsock(v) => v.clone(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            MachineDevice::Block(_) => "virtio-blk",
            MachineDevice::Console(_) => "virtio-console",
            MachineDevice::Vsock(_) => "virtio-vsock",
        }
    }

    /// What only one host may hold is let go (a disk's lock, a vsock's socket path), or
    /// taken back.
    fn hand_over(&self, name: &str, release: bool) -> Result<(), DeviceManagerError> {
        let disk = |source| DeviceManagerError::HandOver {
            name: name.into(),
            source,
        };
        match self {
            MachineDevice::Block(b) if release => lock(b).release_disk().map_err(disk),
            MachineDevice::Block(b) => lock(b).reacquire_disk().map_err(disk),
            // Connections stay until the guest leaves; host programs reconnect on the
            // target, which listens at the path once it has the guest.
            MachineDevice::Vsock(v) if release => {
                lock(v).release_socket();
                Ok(())
            }
            MachineDevice::Vsock(v) => {
                lock(v)
                    .reacquire_socket()
                    .map_err(|source| DeviceManagerError::TakeBackSocket {
                        name: name.into(),
                        source,
                    })
            }
            MachineDevice::Console(_) => Ok(()),
        }
    }

    /// Fills in what only this kind of device has to show.
    fn describe(&self, status: &mut DeviceStatus) {
        match self {
            MachineDevice::Block(b) => {
                let b = lock(b);
                status.path = Some(b.path().to_owned());
                status.read_only = Some(b.read_only());
            }
            MachineDevice::Console(_) => {}
            MachineDevice::Vsock(v) => {
                let v = lock(v);
                status.path = Some(v.uds_path().to_owned());
                status.guest_cid = Some(v.guest_cid());
                status.connections = Some(v.connections());
            }
        }
    }

    fn snapshot(&self) -> DeviceSnapshot {
        match self {
            MachineDevice::Block(b) => {
                let b = lock(b);
                DeviceSnapshot::Block {
                    path: b.path().to_owned(),
                    state: b.save(),
                }
            }
            MachineDevice::Console(c) => DeviceSnapshot::Console {
                state: lock(c).save(),
            },
            MachineDevice::Vsock(v) => {
                let v = lock(v);
                DeviceSnapshot::Vsock {
                    socket: v.uds_path().to_owned(),
                    state: v.save(),
                }
            }
        }
    }
}

/// A device in the machine.
pub struct AttachedDevice {
    pub name: String,
    pub slot: DeviceSlot,
    pub device: MachineDevice,
    transport: Arc<Mutex<MmioTransport>>,
    refusals: Refusals,
}

/// What the status API shows of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeviceStatus {
    pub name: String,
    pub kind: &'static str,
    pub mmio_base: u64,
    pub irq: u32,
    /// The virtio device status register (virtio 1.2 §2.1): 15 is a driver that is up.
    pub driver_status: u32,
    /// Guest-memory accesses the shared-page guard refused (always 0 for a plain guest).
    pub refused_accesses: u64,
    /// The backing file, for a disk; the UNIX socket, for vsock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_only: Option<bool>,
    /// The guest's CID, for vsock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_cid: Option<u64>,
    /// Open connections, for vsock.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connections: Option<usize>,
}

/// What a migration carries of one device.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VirtioSnapshot {
    pub name: String,
    pub slot: DeviceSlot,
    pub transport: MmioState,
    pub device: DeviceSnapshot,
}

/// A device's own state, by kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum DeviceSnapshot {
    /// A disk: shared storage, so the target opens the same path unless it maps the name to
    /// another.
    Block { path: PathBuf, state: BlockState },
    /// A console: its host end is this host's (`--console`); input the guest had not taken
    /// yet travels.
    Console { state: ConsoleState },
    /// A vsock device: connections do not travel (the guest hears TRANSPORT_RESET); the target
    /// listens at the same socket path unless told another.
    Vsock { socket: PathBuf, state: VsockState },
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Collects the machine's devices while the VM is built.
pub struct DeviceManager {
    memory: GuestMemory,
    /// The guest's paravirtual state when its memory is encrypted: devices keep to its shared
    /// pages.
    encrypted: Option<Arc<Paravirt>>,
    mmio: Bus,
    attached: Vec<AttachedDevice>,
    /// COM1, which the machine saves with the rest and whose input (if any) the device
    /// thread reads.
    serial: Option<(Arc<Mutex<Serial>>, bool)>,
}

impl DeviceManager {
    /// Devices over `memory`; for a guest with encrypted memory, `paravirt` says which pages
    /// are shared.
    pub fn new(memory: GuestMemory, paravirt: &Arc<Paravirt>, encrypted: bool) -> Self {
        Self {
            memory,
            encrypted: encrypted.then(|| Arc::clone(paravirt)),
            mmio: Bus::new(),
            attached: Vec::new(),
            serial: None,
        }
    }

    /// Adds COM1 (already on the port I/O bus); `reads_input` when it has host input for
    /// the device thread to read.
    pub fn set_serial(&mut self, serial: Arc<Mutex<Serial>>, reads_input: bool) {
        self.serial = Some((serial, reads_input));
    }

    fn device_memory(&self, name: &str) -> DeviceMemory {
        match &self.encrypted {
            None => DeviceMemory::plain(self.memory.clone(), name),
            Some(paravirt) => DeviceMemory::encrypted(
                self.memory.clone(),
                Arc::new(GuestSharedPages(Arc::clone(paravirt))),
                name,
            ),
        }
    }

    /// The slot the next device gets.
    pub fn next_slot(&self) -> Result<DeviceSlot, DeviceManagerError> {
        DeviceSlot::nth(self.attached.len()).ok_or(DeviceManagerError::TooMany)
    }

    /// Adds a fresh device in the next slot.
    pub fn add(
        &mut self,
        vm: &VmFd,
        name: &str,
        device: MachineDevice,
    ) -> Result<DeviceSlot, DeviceManagerError> {
        let memory = self.device_memory(name);
        let transport = MmioTransport::new(device.virtio(), memory.clone()).map_err(|source| {
            DeviceManagerError::Transport {
                name: name.into(),
                source,
            }
        })?;
        self.attach(vm, name, device, transport, memory)
    }

    /// Adds a device that arrives with a migrating guest, in the slot it had, from its saved
    /// state: a disk or a vsock socket at `path_here` on this host (by default the path it
    /// had: shared storage), a console on `console` (this host's end, taken; without one its
    /// output is discarded).
    pub fn restore(
        &mut self,
        vm: &VmFd,
        saved: &VirtioSnapshot,
        path_here: Option<PathBuf>,
        console: &mut Option<ConsoleIo>,
    ) -> Result<DeviceSlot, DeviceManagerError> {
        match &saved.device {
            DeviceSnapshot::Vsock { socket, state } => {
                let uds_path = path_here.unwrap_or_else(|| socket.clone());
                let vsock =
                    Vsock::restore(VsockRestoreArgs { uds_path }, state).map_err(|source| {
                        DeviceManagerError::RestoreVsock {
                            name: saved.name.clone(),
                            source,
                        }
                    })?;
                self.restore_device(vm, saved, vsock.into())
            }
            DeviceSnapshot::Block { path, state } => {
                let path = path_here.unwrap_or_else(|| path.clone());
                self.restore_block(vm, saved, path, state)
            }
            DeviceSnapshot::Console { state } => {
                let name = saved.name.clone();
                let io = console.take().unwrap_or_else(|| ConsoleIo {
                    output: Box::new(std::io::sink()),
                    input: None,
                });
                let console = Console::restore(io, state).map_err(|source| {
                    DeviceManagerError::RestoreConsole {
                        name: name.clone(),
                        source,
                    }
                })?;
                self.restore_device(vm, saved, console.into())
            }
        }
    }

    /// A disk that arrives with a migrating guest, from its saved state; `path` is where
    /// this host finds it.
    fn restore_block(
        &mut self,
        vm: &VmFd,
        saved: &VirtioSnapshot,
        path: PathBuf,
        state: &BlockState,
    ) -> Result<DeviceSlot, DeviceManagerError> {
        let block = Block::restore(BlockRestoreArgs { path }, state).map_err(|source| {
            DeviceManagerError::RestoreBlock {
                name: saved.name.clone(),
                source,
            }
        })?;
        self.restore_device(vm, saved, block.into())
    }

    /// Restores the transport of `device`, rebuilt from `saved`, in the slot it had.
    fn restore_device(
        &mut self,
        vm: &VmFd,
        saved: &VirtioSnapshot,
        device: MachineDevice,
    ) -> Result<DeviceSlot, DeviceManagerError> {
        let name = saved.name.clone();
        let here = self.next_slot()?;
        if here != saved.slot {
            return Err(DeviceManagerError::SlotMismatch {
                name,
                saved: saved.slot.base,
                here: here.base,
            });
        }
        let memory = self.device_memory(&name);
        let transport = MmioTransport::restore(
            MmioRestoreArgs {
                device: device.virtio(),
                memory: memory.clone(),
            },
            &saved.transport,
        )
        .map_err(|source| DeviceManagerError::Transport {
            name: name.clone(),
            source,
        })?;
        self.attach(vm, &name, device, transport, memory)
    }

    fn attach(
        &mut self,
        vm: &VmFd,
        name: &str,
        device: MachineDevice,
        transport: MmioTransport,
        memory: DeviceMemory,
    ) -> Result<DeviceSlot, DeviceManagerError> {
        let slot = self.next_slot()?;
        let kvm = |what| {
            move |source| DeviceManagerError::Kvm {
                name: name.into(),
                what,
                source,
            }
        };
        // Queue notifications go straight to the device thread: the vCPU does not exit.
        let notify = IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY_OFFSET);
        for (queue, event) in transport.notify_eventfds().iter().enumerate() {
            vm.register_ioevent(event, &notify, queue as u32)
                .map_err(kvm("ioeventfd"))?;
        }
        vm.register_irqfd(transport.interrupt_eventfd(), slot.irq)
            .map_err(kvm("irqfd"))?;
        let transport = Arc::new(Mutex::new(transport));
        self.mmio
            .insert(transport.clone(), slot.base, MMIO_WINDOW_LEN)
            .map_err(|source| DeviceManagerError::Bus {
                name: name.into(),
                source,
            })?;
        self.attached.push(AttachedDevice {
            name: name.into(),
            slot,
            device,
            transport,
            refusals: memory.refusals(),
        });
        Ok(slot)
    }

    /// Starts the device thread (under `confinement`'s `devices` filter); returns the MMIO bus
    /// for the vCPUs and the devices.
    pub fn start(
        self,
        confinement: &veil_seccomp::Confinement,
    ) -> Result<(Bus, Arc<MachineDevices>), DeviceManagerError> {
        let subscribers = self
            .attached
            .iter()
            .map(|a| a.device.subscriber())
            .chain(
                self.serial
                    .iter()
                    .filter(|(_, input)| *input)
                    .map(|(s, _)| {
                        let serial: event_loop::Subscriber = s.clone();
                        serial
                    }),
            )
            .collect();
        let events = EventLoop::start(subscribers, confinement)?;
        Ok((
            self.mmio,
            Arc::new(MachineDevices {
                attached: self.attached,
                serial: self.serial.map(|(s, _)| s),
                events,
            }),
        ))
    }
}

/// The machine's devices, served by their thread.
pub struct MachineDevices {
    attached: Vec<AttachedDevice>,
    serial: Option<Arc<Mutex<Serial>>>,
    events: EventLoop,
}

impl MachineDevices {
    /// Waits until no device serves a request, then makes every device's effects durable
    /// (a disk's writes flushed). Nothing runs until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.events.pause();
        for a in &self.attached {
            if let Err(e) = lock(&a.device.virtio()).quiesce() {
                tracing::warn!(device = %a.name, error = %e, "Cannot quiesce the device");
            }
        }
    }

    /// Lets the devices serve again.
    pub fn resume(&self) {
        self.events.resume();
    }

    /// Stops the device thread for good.
    pub fn stop(&self) {
        self.events.stop();
    }

    /// COM1's state; the devices must be paused.
    pub fn save_serial(&self) -> Option<SerialState> {
        self.serial.as_ref().map(|s| lock(s).save())
    }

    /// Every virtio device's state, in slot order; the devices must be paused.
    pub fn save(&self) -> Vec<VirtioSnapshot> {
        self.attached
            .iter()
            .map(|a| VirtioSnapshot {
                name: a.name.clone(),
                slot: a.slot,
                transport: lock(&a.transport).save(),
                device: a.device.snapshot(),
            })
            .collect()
    }

    /// Lets a migration target take over what only one host may hold: every disk flushed and
    /// unlocked. The devices must be paused; [`take_back`](Self::take_back) undoes it.
    pub fn hand_over(&self) -> Result<(), DeviceManagerError> {
        self.release_all(true)
    }

    fn release_all(&self, release: bool) -> Result<(), DeviceManagerError> {
        for a in &self.attached {
            a.device.hand_over(&a.name, release)?;
        }
        Ok(())
    }

    /// Takes back what [`hand_over`](Self::hand_over) let go, when the guest stays here.
    pub fn take_back(&self) -> Result<(), DeviceManagerError> {
        self.release_all(false)
    }

    /// The socket host programs reach the guest's vsock device through, if it has one.
    pub fn vsock_socket(&self) -> Option<PathBuf> {
        self.attached.iter().find_map(|a| match &a.device {
            MachineDevice::Vsock(v) => Some(lock(v).uds_path().to_owned()),
            _ => None,
        })
    }

    /// What each device shows the status API.
    pub fn status(&self) -> Vec<DeviceStatus> {
        self.attached
            .iter()
            .map(|a| {
                let mut status = DeviceStatus {
                    name: a.name.clone(),
                    kind: a.device.kind(),
                    mmio_base: a.slot.base,
                    irq: a.slot.irq,
                    driver_status: lock(&a.transport).status(),
                    refused_accesses: a.refusals.get(),
                    path: None,
                    read_only: None,
                    guest_cid: None,
                    connections: None,
                };
                a.device.describe(&mut status);
                status
            })
            .collect()
    }
}
