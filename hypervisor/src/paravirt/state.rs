//! A VM's paravirtual state, shared by every vCPU (writers) and the migration thread (reader):
//! the page-state map, the migration-control MSR and the blockers.

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::blockers::{BlockReason, Migratability, MigrationBlockers};
use super::map_gpa_range::{self, HC_EINVAL, HC_ENOSYS, HC_SUCCESS, KVM_HC_MAP_GPA_RANGE};
use super::migration_control::{decode_write, encode, MSR_KVM_MIGRATION_CONTROL};
use super::page_state::{InvalidSnapshot, PageStateMap, PageStateSnapshot};
use crate::exits::{HypercallHandler, MsrHandler};
use crate::memory::{GuestRam, PAGE_SIZE};

/// `MSR_AMD64_SEV` (SEV_STATUS, arch/x86/include/asm/msr-index.h; AMD APM vol. 2, 15.34.10):
/// bit 0 says memory encryption is active. Read-only: a write is a #GP.
pub const MSR_AMD64_SEV: u32 = 0xc001_0131;
use serde::{Deserialize, Serialize};

struct Control {
    ready: bool,
    never: Option<u8>,
    blockers: MigrationBlockers,
}

/// The paravirtual state that travels with a migrated VM. Host-side blockers (SEV policy,
/// devices) are not in it: the target derives them from its own configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParavirtSnapshot {
    /// The shared list; `None` for a plain guest.
    pub page_states: Option<PageStateSnapshot>,
    /// `MSR_KVM_MIGRATION_CONTROL` as the guest last set it.
    pub migration_control: u64,
    /// Why the page-state map stopped being trustworthy, if it did: the target cannot trust it
    /// either.
    pub map_untrusted: Option<String>,
}

/// A snapshot that does not fit this VM.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("The page-state map is for {found} pages but this VM has {expected}")]
    MapSize { found: u64, expected: u64 },
    #[error("A page-state map for a plain guest, or none for an encrypted one")]
    MapPresence,
    #[error(transparent)]
    Map(#[from] InvalidSnapshot),
    #[error("Migration control value {0:#x} is not one a guest could have set")]
    Control(u64),
}

/// The paravirtual state of one VM.
pub struct Paravirt {
    ram: Arc<GuestRam>,
    ram_gfns: Vec<Range<u64>>,
    encrypted: bool,
    extension: bool,
    sev_status: Option<u64>,
    map: RwLock<Option<PageStateMap>>,
    control: Mutex<Control>,
}

impl Paravirt {
    /// For a guest whose memory is encrypted (SEV: all private, not ready) or plain (no map,
    /// ready). `extension` says whether Veil's migration-control extension is advertised.
    pub fn new(ram: Arc<GuestRam>, encrypted: bool, extension: bool) -> Self {
        let ram_gfns: Vec<Range<u64>> = ram
            .slots()
            .map(|(_, base, len)| base.0 / PAGE_SIZE..(base.0 + len) / PAGE_SIZE)
            .collect();
        let paravirt = Self {
            encrypted,
            extension,
            sev_status: None,
            map: RwLock::new(None),
            control: Mutex::new(Control {
                ready: false,
                never: None,
                blockers: MigrationBlockers::new(),
            }),
            ram_gfns,
            ram,
        };
        paravirt.reset_guest();
        paravirt
    }

    /// Answers the guest's reads of [`MSR_AMD64_SEV`] with `value` (`None`: they are not
    /// Veil's to answer).
    pub fn with_sev_status(mut self, value: Option<u64>) -> Self {
        self.sev_status = value;
        self
    }

    /// Back to power-on: map all private, control MSR at its initial value, guest-reported
    /// blockers gone (host-side ones stay).
    pub fn reset_guest(&self) {
        let gfn_count = self.ram_gfns.last().map_or(0, |r| r.end);
        *self.map.write().unwrap_or_else(|e| e.into_inner()) =
            self.encrypted.then(|| PageStateMap::all_private(gfn_count));
        let mut control = self.lock_control();
        control.ready = !self.encrypted;
        control.never = None;
        control.blockers.reset_guest();
        if self.encrypted {
            control.blockers.block(BlockReason::GuestNotReady, None);
        }
    }

    fn lock_control(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The page-state map (`None` for a plain guest).
    pub fn page_states(&self) -> RwLockReadGuard<'_, Option<PageStateMap>> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    /// May the VM be migrated now.
    pub fn migratability(&self) -> Migratability {
        self.lock_control().blockers.migratability()
    }

    /// Runs `f` on the blockers (to add host-side reasons, or read the history).
    pub fn with_blockers<T>(&self, f: impl FnOnce(&mut MigrationBlockers) -> T) -> T {
        f(&mut self.lock_control().blockers)
    }

    /// The migration-control MSR's current value.
    pub fn migration_control(&self) -> u64 {
        let control = self.lock_control();
        encode(control.ready, control.never)
    }

    /// What travels with the VM in a migration.
    pub fn snapshot(&self) -> ParavirtSnapshot {
        let map_untrusted = self.with_blockers(|b| match b.migratability() {
            Migratability::PermanentlyBlocked { reasons } => {
                reasons.iter().find_map(|r| match &r.reason {
                    BlockReason::PageStateUntrusted { detail } => Some(detail.clone()),
                    _ => None,
                })
            }
            _ => None,
        });
        ParavirtSnapshot {
            page_states: self.page_states().as_ref().map(PageStateMap::snapshot),
            migration_control: self.migration_control(),
            map_untrusted,
        }
    }

    /// Takes over a migrated VM's state (its blockers follow from it).
    pub fn restore(&self, snapshot: &ParavirtSnapshot) -> Result<(), RestoreError> {
        let write = decode_write(snapshot.migration_control, true)
            .ok_or(RestoreError::Control(snapshot.migration_control))?;
        let map = match (&snapshot.page_states, self.encrypted) {
            (Some(s), true) => {
                let expected = self.ram_gfns.last().map_or(0, |r| r.end);
                if s.gfn_count != expected {
                    return Err(RestoreError::MapSize {
                        found: s.gfn_count,
                        expected,
                    });
                }
                Some(PageStateMap::from_snapshot(s)?)
            }
            (None, false) => None,
            _ => return Err(RestoreError::MapPresence),
        };
        *self.map.write().unwrap_or_else(|e| e.into_inner()) = map;
        let mut control = self.lock_control();
        control.ready = write.ready;
        control.never = write.never;
        if write.ready {
            control.blockers.unblock(&BlockReason::GuestNotReady, None);
        } else {
            control.blockers.block(BlockReason::GuestNotReady, None);
        }
        if let Some(code) = write.never {
            control
                .blockers
                .block(BlockReason::GuestRequestedNever { code }, None);
        }
        if let Some(detail) = &snapshot.map_untrusted {
            control.blockers.block(
                BlockReason::PageStateUntrusted {
                    detail: detail.clone(),
                },
                None,
            );
        }
        Ok(())
    }

    /// Handles `KVM_HC_MAP_GPA_RANGE`; returns the guest's RAX.
    pub fn map_gpa_range(&self, vcpu: u32, a0: u64, a1: u64, a2: u64) -> u64 {
        let request = match map_gpa_range::validate(a0, a1, a2, &self.ram_gfns) {
            Ok(request) => request,
            Err(error) => {
                tracing::debug!(vcpu, a0, a1, a2, "MAP_GPA_RANGE refused: {error}");
                if self.encrypted && error.leaves_map_untrusted() {
                    let detail = format!(
                        "vCPU {vcpu} reported {a1} pages at GPA {a0:#x} (attributes {a2:#x}) and Veil had to refuse it: {error}"
                    );
                    self.lock_control()
                        .blockers
                        .block(BlockReason::PageStateUntrusted { detail }, Some(vcpu));
                }
                return HC_EINVAL;
            }
        };
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        if let Some(map) = map.as_mut() {
            if map.count_in(&request.gfns, request.state) != request.gfns.end - request.gfns.start {
                map.set(request.gfns.clone(), request.state);
                // A page whose state changed must be sent again under its new state.
                self.mark_dirty(&request.gfns);
            }
        }
        HC_SUCCESS
    }

    fn mark_dirty(&self, gfns: &Range<u64>) {
        let start = GuestAddress(gfns.start * PAGE_SIZE);
        let len = ((gfns.end - gfns.start) * PAGE_SIZE) as usize;
        let memory = self.ram.memory();
        if let Some(region) = memory.find_region(start) {
            let offset = (start.0 - region.start_addr().0) as usize;
            region.bitmap().mark_dirty(offset, len);
        }
    }
}

impl HypercallHandler for Paravirt {
    fn call(&self, vcpu: u32, nr: u64, args: [u64; 3], long_mode: bool) -> u64 {
        // A 32-bit caller sees 32-bit arguments and result, as in KVM.
        let narrow = |v: u64| if long_mode { v } else { v & 0xffff_ffff };
        let [a0, a1, a2] = args.map(narrow);
        let result = match narrow(nr) {
            KVM_HC_MAP_GPA_RANGE => self.map_gpa_range(vcpu, a0, a1, a2),
            _ => HC_ENOSYS,
        };
        narrow(result)
    }
}

impl MsrHandler for Paravirt {
    fn read(&self, _vcpu: u32, index: u32) -> Option<u64> {
        match index {
            MSR_KVM_MIGRATION_CONTROL => Some(self.migration_control()),
            MSR_AMD64_SEV => self.sev_status,
            _ => None,
        }
    }

    fn write(&self, vcpu: u32, index: u32, value: u64) -> bool {
        if index != MSR_KVM_MIGRATION_CONTROL {
            return false;
        }
        let Some(write) = decode_write(value, self.extension) else {
            tracing::debug!(
                vcpu,
                value,
                "migration-control write with reserved bits: #GP"
            );
            return false;
        };
        let mut control = self.lock_control();
        control.ready = write.ready;
        if write.ready {
            control
                .blockers
                .unblock(&BlockReason::GuestNotReady, Some(vcpu));
        } else {
            control
                .blockers
                .block(BlockReason::GuestNotReady, Some(vcpu));
        }
        if let Some(code) = write.never {
            control.never.get_or_insert(code);
            control
                .blockers
                .block(BlockReason::GuestRequestedNever { code }, Some(vcpu));
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryConfig;
    use crate::paravirt::page_state::PageState;

    fn paravirt(encrypted: bool) -> Paravirt {
        let ram = GuestRam::new(&MemoryConfig {
            size: 64 << 20,
            file: None,
        })
        .unwrap();
        Paravirt::new(Arc::new(ram), encrypted, true)
    }

    #[test]
    fn sev_guests_start_private_and_not_ready() {
        let p = paravirt(true);
        assert_eq!(p.migration_control(), 0);
        assert!(matches!(
            p.migratability(),
            Migratability::TemporarilyBlocked { .. }
        ));
        assert!(p.page_states().as_ref().unwrap().is_private(0x100));
        let plain = paravirt(false);
        assert_eq!(plain.migration_control(), 1);
        assert_eq!(plain.migratability(), Migratability::Migratable);
        assert!(plain.page_states().is_none());
    }

    #[test]
    fn sharing_updates_the_map_and_dirties_the_pages() {
        let p = paravirt(true);
        let ram = Arc::clone(&p.ram);
        ram.memory()
            .iter()
            .next()
            .unwrap()
            .get_mmap()
            .bitmap()
            .reset_addr_range(0, 64 << 20);
        assert_eq!(p.call(0, 12, [0x40_0000, 4, 0], true), 0);
        let map = p.page_states();
        let map = map.as_ref().unwrap();
        assert_eq!(map.shared_ranges(), vec![0x400..0x404]);
        assert_eq!(map.count_in(&(0x400..0x404), PageState::Shared), 4);
        let bitmap = ram.memory().iter().next().unwrap().get_mmap();
        assert!(bitmap.bitmap().is_bit_set(0x403));
        assert!(!bitmap.bitmap().is_bit_set(0x404));
    }

    #[test]
    fn thirty_two_bit_callers_get_truncated_results() {
        let p = paravirt(true);
        assert_eq!(p.call(0, 12, [0x1001, 1, 0], false), 0xffff_ffea);
        assert_eq!(p.call(0, 12, [0x1001, 1, 0], true), HC_EINVAL);
        assert_eq!(p.call(0, 99, [0, 0, 0], true), HC_ENOSYS);
        // Upper halves of arguments are ignored in 32-bit mode.
        assert_eq!(
            p.call(0, (1 << 32) | 12, [(1 << 40) | 0x40_0000, 1, 0], false),
            0
        );
    }

    #[test]
    fn refused_ram_updates_make_the_block_permanent() {
        let p = paravirt(true);
        assert_eq!(p.call(2, 12, [0x40_0000, 1, 1 << 6], true), HC_EINVAL);
        match p.migratability() {
            Migratability::PermanentlyBlocked { reasons } => {
                assert!(matches!(
                    reasons[0].reason,
                    BlockReason::PageStateUntrusted { .. }
                ));
                assert_eq!(reasons[0].vcpu, Some(2));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn snapshots_carry_the_map_control_and_distrust_to_another_vm() {
        let source = paravirt(true);
        source.call(0, 12, [0x40_0000, 4, 0], true);
        source.write(0, MSR_KVM_MIGRATION_CONTROL, 1);
        source.call(0, 12, [0x40_0000, 1, 1 << 6], true);
        let snap = source.snapshot();
        let target = paravirt(true);
        target.restore(&snap).unwrap();
        assert_eq!(target.snapshot(), snap);
        assert_eq!(
            target.page_states().as_ref().unwrap().shared_ranges(),
            vec![0x400..0x404]
        );
        assert!(matches!(
            target.migratability(),
            Migratability::PermanentlyBlocked { .. }
        ));
        assert!(
            paravirt(false).restore(&snap).is_err(),
            "a map for a plain guest"
        );
        let bad = ParavirtSnapshot {
            migration_control: 1 << 7,
            ..snap
        };
        assert!(target.restore(&bad).is_err());
    }

    #[test]
    fn ready_and_never_follow_the_msr() {
        let p = paravirt(true);
        assert!(p.write(1, MSR_KVM_MIGRATION_CONTROL, 1));
        assert_eq!(p.migratability(), Migratability::Migratable);
        assert!(p.write(1, MSR_KVM_MIGRATION_CONTROL, 0));
        assert!(matches!(
            p.migratability(),
            Migratability::TemporarilyBlocked { .. }
        ));
        assert!(
            !p.write(1, MSR_KVM_MIGRATION_CONTROL, 1 << 5),
            "reserved bit: #GP"
        );
        assert!(p.write(1, MSR_KVM_MIGRATION_CONTROL, 0x0703));
        assert!(p.write(1, MSR_KVM_MIGRATION_CONTROL, 1));
        assert_eq!(p.read(0, MSR_KVM_MIGRATION_CONTROL), Some(0x0703));
        assert!(matches!(
            p.migratability(),
            Migratability::PermanentlyBlocked { .. }
        ));
        p.reset_guest();
        assert_eq!(p.read(0, MSR_KVM_MIGRATION_CONTROL), Some(0));
        assert!(matches!(
            p.migratability(),
            Migratability::TemporarilyBlocked { .. }
        ));
    }
}
