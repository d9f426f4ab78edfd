//! Whether the VM may be migrated now, and if not, why and since when.
//!
//! Two kinds of reason. Temporary: the guest has not (yet, or again) set
//! `KVM_MIGRATION_READY`, as Linux does during boot, reboot, kexec and suspend; waiting helps.
//! Permanent: nothing the guest does later will make migration safe (it said so, its SEV policy
//! forbids sending, a device cannot migrate, or the page-state map can no longer be trusted);
//! waiting never helps, so it is reported as such at once. Permanent wins over temporary.

use std::collections::VecDeque;
use std::time::SystemTime;

use serde::Serialize;

/// Events kept for `status`; older ones are only in the log.
const EVENT_HISTORY: usize = 64;

/// Why migration is blocked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum BlockReason {
    /// Temporary: the guest has not set `KVM_MIGRATION_READY` in `MSR_KVM_MIGRATION_CONTROL`.
    GuestNotReady,
    /// Permanent: the guest asked never to be migrated (Veil extension), with its reason code.
    GuestRequestedNever { code: u8 },
    /// Permanent: the SEV policy has NOSEND, so the firmware refuses SEND_START.
    SevPolicyNoSend,
    /// Permanent: a device that cannot be migrated is attached.
    DeviceWithoutMigration { device: String },
    /// Permanent: the guest changed page encryption in a way Veil could not record, so sending
    /// pages by the map could corrupt the guest.
    PageStateUntrusted { detail: String },
}

impl BlockReason {
    /// Whether waiting can clear it.
    pub fn is_permanent(&self) -> bool {
        !matches!(self, BlockReason::GuestNotReady)
    }
}

impl std::fmt::Display for BlockReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockReason::GuestNotReady => write!(f, "the guest has not set KVM_MIGRATION_READY"),
            BlockReason::GuestRequestedNever { code } => {
                write!(
                    f,
                    "the guest asked never to be migrated (reason code {code})"
                )
            }
            BlockReason::SevPolicyNoSend => {
                write!(f, "the SEV policy forbids sending the guest (NOSEND)")
            }
            BlockReason::DeviceWithoutMigration { device } => {
                write!(f, "device {device} cannot be migrated")
            }
            BlockReason::PageStateUntrusted { detail } => {
                write!(f, "the page-state map can no longer be trusted: {detail}")
            }
        }
    }
}

/// A reason and when (and from which vCPU) it arose.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blocker {
    pub reason: BlockReason,
    pub since: SystemTime,
    pub vcpu: Option<u32>,
}

/// Serialized with the reason's sentence beside its fields, so clients need not word it.
impl Serialize for Blocker {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Blocker", 4)?;
        st.serialize_field("reason", &self.reason)?;
        st.serialize_field("message", &self.reason.to_string())?;
        st.serialize_field("since", &seconds(&self.since))?;
        st.serialize_field("vcpu", &self.vcpu)?;
        st.end()
    }
}

/// A change in migratability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockerEvent {
    #[serde(serialize_with = "unix_seconds")]
    pub at: SystemTime,
    pub vcpu: Option<u32>,
    pub change: String,
}

fn unix_seconds<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(seconds(t))
}

/// Seconds since the UNIX epoch.
fn seconds(t: &SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The answer to "may this VM be migrated now?".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum Migratability {
    Migratable,
    TemporarilyBlocked { reasons: Vec<Blocker> },
    PermanentlyBlocked { reasons: Vec<Blocker> },
}

/// The VM's blockers and their history.
#[derive(Debug, Clone, Default)]
pub struct MigrationBlockers {
    temporary: Vec<Blocker>,
    permanent: Vec<Blocker>,
    events: VecDeque<BlockerEvent>,
}

impl MigrationBlockers {
    /// No blockers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a reason (no-op if the same reason is already present).
    pub fn block(&mut self, reason: BlockReason, vcpu: Option<u32>) {
        let list = if reason.is_permanent() {
            &mut self.permanent
        } else {
            &mut self.temporary
        };
        if list.iter().any(|b| b.reason == reason) {
            return;
        }
        let kind = if reason.is_permanent() {
            "permanently"
        } else {
            "temporarily"
        };
        let change = format!("blocked {kind}: {reason}");
        list.push(Blocker {
            reason,
            since: SystemTime::now(),
            vcpu,
        });
        self.record(vcpu, change);
    }

    /// Removes a temporary reason. Permanent ones stay until [`MigrationBlockers::reset_guest`].
    pub fn unblock(&mut self, reason: &BlockReason, vcpu: Option<u32>) {
        if reason.is_permanent() {
            return;
        }
        let before = self.temporary.len();
        self.temporary.retain(|b| &b.reason != reason);
        if self.temporary.len() != before {
            self.record(vcpu, format!("unblocked: no longer {reason}"));
        }
    }

    /// A guest reset: reasons that came from the guest's own state go (a new kernel reports
    /// afresh); the SEV policy and attached devices stay.
    pub fn reset_guest(&mut self) {
        let before = self.permanent.len() + self.temporary.len();
        self.temporary.clear();
        self.permanent.retain(|b| {
            matches!(
                b.reason,
                BlockReason::SevPolicyNoSend | BlockReason::DeviceWithoutMigration { .. }
            )
        });
        if self.permanent.len() + self.temporary.len() != before {
            self.record(None, "guest reset: guest-reported blockers cleared".into());
        }
    }

    fn record(&mut self, vcpu: Option<u32>, change: String) {
        match vcpu {
            Some(v) => tracing::info!(vcpu = v, "migration {change}"),
            None => tracing::info!("migration {change}"),
        }
        if self.events.len() == EVENT_HISTORY {
            self.events.pop_front();
        }
        self.events.push_back(BlockerEvent {
            at: SystemTime::now(),
            vcpu,
            change,
        });
    }

    /// Migratable, or blocked and why; permanent reasons hide temporary ones.
    pub fn migratability(&self) -> Migratability {
        if !self.permanent.is_empty() {
            Migratability::PermanentlyBlocked {
                reasons: self.permanent.clone(),
            }
        } else if !self.temporary.is_empty() {
            Migratability::TemporarilyBlocked {
                reasons: self.temporary.clone(),
            }
        } else {
            Migratability::Migratable
        }
    }

    /// Recent changes, oldest first.
    pub fn events(&self) -> impl Iterator<Item = &BlockerEvent> {
        self.events.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_wins_and_survives_readiness() {
        let mut b = MigrationBlockers::new();
        assert_eq!(b.migratability(), Migratability::Migratable);
        b.block(BlockReason::GuestNotReady, Some(0));
        assert!(matches!(
            b.migratability(),
            Migratability::TemporarilyBlocked { .. }
        ));
        b.block(BlockReason::GuestRequestedNever { code: 7 }, Some(1));
        b.unblock(&BlockReason::GuestNotReady, Some(0));
        match b.migratability() {
            Migratability::PermanentlyBlocked { reasons } => {
                assert_eq!(
                    reasons[0].reason,
                    BlockReason::GuestRequestedNever { code: 7 }
                );
                assert_eq!(reasons[0].vcpu, Some(1));
            }
            other => panic!("{other:?}"),
        }
        b.unblock(&BlockReason::GuestRequestedNever { code: 7 }, None);
        assert!(matches!(
            b.migratability(),
            Migratability::PermanentlyBlocked { .. }
        ));
    }

    #[test]
    fn a_guest_reset_keeps_only_host_side_reasons() {
        let mut b = MigrationBlockers::new();
        b.block(BlockReason::GuestRequestedNever { code: 1 }, Some(0));
        b.block(
            BlockReason::DeviceWithoutMigration {
                device: "vfio0".into(),
            },
            None,
        );
        b.reset_guest();
        match b.migratability() {
            Migratability::PermanentlyBlocked { reasons } => assert_eq!(reasons.len(), 1),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_change_is_an_event_and_history_is_bounded() {
        let mut b = MigrationBlockers::new();
        for _ in 0..100 {
            b.block(BlockReason::GuestNotReady, Some(2));
            b.unblock(&BlockReason::GuestNotReady, Some(2));
        }
        assert_eq!(b.events().count(), EVENT_HISTORY);
        assert!(b.events().last().unwrap().change.starts_with("unblocked"));
    }
}
