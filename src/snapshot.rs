//! Snapshots from the library: [`Vm::snapshot`] saves a running guest into a directory and
//! [`VmBuilder::restore`] starts a VM from one, as many times as wanted (docs/snapshots.md).

use std::path::Path;

use veil_hypervisor::devices::DeviceSnapshot;
use veil_hypervisor::memory::FileMapping;
use veil_hypervisor::vm::VmSnapshot;
use veil_migration::protocol::SevPlatform as ShapePlatform;
use veil_migration::snapshot::{
    self, AfterSnapshot, SavePages, Snapshot, SnapshotError, SnapshotReport,
};

use crate::sev_launch::{SevConfig, SevPlatform};
use crate::{Error, Vm, VmBuilder};

/// Snapshots taken in this process, one at a time (of any of its VMs: simpler than one lock
/// per VM, and saving is disk-bound anyway).
static SNAPSHOTS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Whether a snapshot is being written in this process (a migration would resume the guest
/// under it).
pub(crate) fn snapshot_under_way() -> bool {
    SNAPSHOTS.try_lock().is_err()
}

/// Which pages a snapshot saves: every page with the guest paused ([`Vm::snapshot`]),
/// every page with the guest running and then what it changed ([`Vm::live_snapshot`]), or
/// only what changed since the last snapshot ([`Vm::diff_snapshot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Full,
    Live,
    Diff,
}

/// The platform kind a snapshot records for an SEV platform.
fn kind_of(platform: &SevPlatform) -> ShapePlatform {
    match platform {
        SevPlatform::Hardware { .. } => ShapePlatform::Hardware,
        SevPlatform::Emulated { .. } => ShapePlatform::Emulated,
    }
}

/// What a restored clone changes besides its host-side paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// The guest's vsock CID from now on (3 to 4294967294); the guest reads it again when it
    /// handles the transport reset every restore sends. `None` keeps the snapshot's.
    pub vsock_cid: Option<u64>,
}

/// Gives the saved vsock device the CID `cid`.
fn give_vsock_cid(vm: &mut VmSnapshot, cid: u64) -> Result<(), String> {
    let mut found = false;
    for saved in &mut vm.virtio {
        if let DeviceSnapshot::Vsock { state, .. } = &mut saved.device {
            state.guest_cid = cid;
            found = true;
        }
    }
    if found {
        Ok(())
    } else {
        Err("the saved guest has no vsock device to give a CID".into())
    }
}

impl Vm {
    /// Saves the guest into `dir`: pauses the vCPUs and devices, writes the state and guest
    /// memory, then resumes the guest (or stops the VM, with [`AfterSnapshot::Stop`]). An SEV
    /// guest's private pages go through the firmware, encrypted for the platform whose chain
    /// is `sev_target_chain` (this platform's own by default); none is written in the clear.
    /// On failure the guest runs on and `dir` holds no part of a snapshot. If the guest runs
    /// on, its writes are logged from here (KVM dirty logging, which keeps guest RAM in 4 KiB
    /// host mappings) so that [`Vm::diff_snapshot`] can save only what changed.
    pub fn snapshot(
        &self,
        dir: impl AsRef<Path>,
        after: AfterSnapshot,
        sev_target_chain: Option<sev::certs::sev::Chain>,
    ) -> Result<SnapshotReport, SnapshotError> {
        self.save(dir.as_ref(), after, sev_target_chain, Kind::Full)
    }

    /// [`Vm::snapshot`] with the guest running while its memory is written: then, paused,
    /// only the pages it wrote meanwhile are written again, so the pause is as short as a
    /// diff's while the snapshot is a full one. Costs a second write of those pages. Refused
    /// for SEV guests (their private pages go through the firmware once, paused).
    pub fn live_snapshot(
        &self,
        dir: impl AsRef<Path>,
        after: AfterSnapshot,
    ) -> Result<SnapshotReport, SnapshotError> {
        self.save(dir.as_ref(), after, None, Kind::Live)
    }

    /// Saves into `dir` only what the guest (or a device, into guest memory) wrote since this
    /// VM's last snapshot after which it ran on, on top of that one: `dir` names its parent,
    /// and [`VmBuilder::restore`] of `dir` maps the full snapshot at the bottom and copies
    /// each diff's pages over it. Refused, with nothing written, when there is no such
    /// snapshot, when a migration since has used the dirty log, and for SEV guests.
    pub fn diff_snapshot(
        &self,
        dir: impl AsRef<Path>,
        after: AfterSnapshot,
    ) -> Result<SnapshotReport, SnapshotError> {
        self.save(dir.as_ref(), after, None, Kind::Diff)
    }

    pub(crate) fn save(
        &self,
        dir: &Path,
        after: AfterSnapshot,
        sev_target_chain: Option<sev::certs::sev::Chain>,
        kind: Kind,
    ) -> Result<SnapshotReport, SnapshotError> {
        let diff = kind == Kind::Diff;
        // Two snapshots at once would each resume the guest while the other still copies it.
        let _one_at_a_time = SNAPSHOTS.lock().unwrap_or_else(|e| e.into_inner());
        // Both would pause and resume the guest, and an SEV guest has one send context.
        if self.migration().progress().phase.is_active() {
            return Err(SnapshotError::Migrating);
        }
        if diff && self.sev().is_some() {
            return Err(SnapshotError::DiffSev);
        }
        let mut last = self.last_snapshot.lock().unwrap_or_else(|e| e.into_inner());
        let base = match (diff, last.as_ref()) {
            (false, _) => None,
            (true, None) => return Err(SnapshotError::NoDiffBase),
            (true, Some(base)) => Some(base.clone()),
        };
        let pages = match (kind, &base) {
            (Kind::Live, _) => SavePages::Live,
            (_, Some(base)) => SavePages::DiffOf(base),
            _ => SavePages::All,
        };
        let report = self.save_now(dir, after, sev_target_chain, pages)?;
        *last = report.base.clone();
        Ok(report)
    }

    fn save_now(
        &self,
        dir: &Path,
        after: AfterSnapshot,
        sev_target_chain: Option<sev::certs::sev::Chain>,
        pages: SavePages<'_>,
    ) -> Result<SnapshotReport, SnapshotError> {
        let Some(guest) = self.sev() else {
            return snapshot::snapshot(self.inner(), dir, after, None, pages);
        };
        let mut firmware = guest
            .launch
            .firmware
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let sev = snapshot::SnapshotSev {
            firmware: firmware.as_mut(),
            guest: guest.launch.handle,
            policy: guest.config.policy,
            platform: kind_of(&guest.config.platform),
            target_chain: sev_target_chain,
        };
        snapshot::snapshot(self.inner(), dir, after, Some(sev), pages)
    }
}

impl VmBuilder {
    /// Starts a VM from the snapshot in `dir` and runs its guest: memory, vCPUs and CPUID come
    /// from the snapshot; serial output, disks ([`VmBuilder::disk_path`]), the vsock socket
    /// ([`VmBuilder::vsock_socket`]) and the console are this builder's, so clones of one
    /// snapshot can run side by side. Guest RAM is the snapshot's memory file mapped
    /// copy-on-write: pages load on first touch, clones share the page cache, and the
    /// snapshot's files are never written. vsock connections are reset, as on migration.
    ///
    /// An SEV snapshot needs [`VmBuilder::sev`] naming the platform it was made for (the
    /// policy comes from the snapshot). Refused before anything runs: a snapshot of another
    /// format version, a damaged state file, a memory file of the wrong size, a host lacking
    /// CPU features the guest was given, an SEV snapshot without a platform that can receive
    /// it.
    pub fn restore(self, dir: impl AsRef<Path>) -> Result<Vm, Error> {
        self.restore_with(dir, RestoreOptions::default())
    }

    /// [`VmBuilder::restore`], with what a clone changes besides its host-side paths.
    pub fn restore_with(self, dir: impl AsRef<Path>, options: RestoreOptions) -> Result<Vm, Error> {
        let saved = Snapshot::open(dir.as_ref())?;
        let shape = saved.shape();
        crate::incoming::check_restorable(shape).map_err(Error::Refused)?;
        let mut builder = self
            .memory_bytes(shape.ram_bytes())
            .vcpus(shape.vcpus())
            .guest_cpuid(shape.cpuid().iter().map(Into::into).collect())
            .memory_file(saved.memory_file())
            .ram_mapping(FileMapping::CopyOnWrite);
        builder = match (shape.sev(), builder.sev_config().cloned()) {
            (None, None) => builder,
            (None, Some(_)) => {
                return Err(Error::Refused(
                    "the snapshot is of a guest without SEV; restore it without an SEV platform"
                        .into(),
                ))
            }
            (Some(_), None) => {
                return Err(Error::Refused(
                    "the snapshot is of an SEV guest: name the SEV platform it was made for (veil restore --sev --sev-platform; VmBuilder::sev)"
                        .into(),
                ))
            }
            (Some(sev), Some(config)) => {
                if kind_of(&config.platform) != sev.platform {
                    return Err(Error::Refused(format!(
                        "the SEV snapshot was made for a {} platform",
                        match sev.platform {
                            ShapePlatform::Emulated => "emulated",
                            ShapePlatform::Hardware => "hardware",
                        }
                    )));
                }
                builder.sev(SevConfig {
                    policy: sev.policy,
                    ..config
                })
            }
        };
        let vm = builder.start_incoming(Box::new(|memory, firmware| {
            let (mut state, handle) = saved.restore_into(memory, firmware)?;
            if let Some(cid) = options.vsock_cid {
                give_vsock_cid(&mut state, cid)?;
            }
            Ok((state, handle))
        }))?;
        vm.resume();
        Ok(vm)
    }
}
