//! What `status` reports.

use serde::Serialize;
use veil_hypervisor::paravirt::{BlockerEvent, Migratability, ParavirtFeatures};
use veil_hypervisor::RunState;

/// Shared ranges listed in full up to this many; the counts are always exact.
pub const MAX_LISTED_RANGES: usize = 64;

/// The page-state map in brief.
#[derive(Debug, Clone, Serialize)]
pub struct PageStateSummary {
    pub gfn_count: u64,
    pub shared_pages: u64,
    pub shared_runs: u64,
    /// The first [`MAX_LISTED_RANGES`] shared GFN ranges, `[start, end)`.
    pub shared_ranges: Vec<[u64; 2]>,
    pub map_bytes: u64,
}

/// The answer to `status`.
#[derive(Debug, Clone, Serialize)]
pub struct VmStatus {
    pub state: &'static str,
    pub vcpus: usize,
    pub memory_bytes: u64,
    pub memory_file: Option<String>,
    pub migratability: Migratability,
    pub migration_control: u64,
    pub blocker_events: Vec<BlockerEvent>,
    /// `None` for a guest without encrypted memory: every page is plain data.
    pub page_states: Option<PageStateSummary>,
    pub paravirt: ParavirtFeatures,
    /// `None` for a guest launched without SEV.
    pub sev: Option<SevStatus>,
    /// The outgoing migration, under way or last.
    pub migration: veil_migration::monitor::Progress,
    /// The virtio devices, in slot order.
    pub devices: Vec<veil_hypervisor::devices::DeviceStatus>,
}

/// An SEV guest's launch.
#[derive(Debug, Clone, Serialize)]
pub struct SevStatus {
    /// `hardware` or `emulated`.
    pub platform: &'static str,
    /// `false` on the emulated platform: the guest's memory is not encrypted.
    pub confidential: bool,
    pub policy: u32,
    /// `None` for a guest that migrated in (it was measured where it was launched).
    pub measurement: Option<String>,
    pub mnonce: Option<String>,
}

pub fn state_name(state: RunState) -> &'static str {
    match state {
        RunState::Running => "running",
        RunState::Paused => "paused",
        RunState::Stopped => "stopped",
    }
}

impl VmStatus {
    pub fn of(vm: &crate::Vm) -> Self {
        let sev = vm.sev().map(|guest| SevStatus {
            platform: match guest.config.platform {
                crate::sev_launch::SevPlatform::Hardware { .. } => "hardware",
                crate::sev_launch::SevPlatform::Emulated { .. } => "emulated",
            },
            confidential: matches!(
                guest.config.platform,
                crate::sev_launch::SevPlatform::Hardware { .. }
            ),
            policy: guest.config.policy.0,
            measurement: guest
                .launch
                .measurement
                .as_ref()
                .map(|m| m.measurement.clone()),
            mnonce: guest.launch.measurement.as_ref().map(|m| m.mnonce.clone()),
        });
        let migration = vm.migration().progress();
        let vm = vm.inner();
        let paravirt = vm.paravirt();
        let page_states = paravirt.page_states().as_ref().map(|map| {
            let ranges = map.shared_ranges();
            PageStateSummary {
                gfn_count: map.gfn_count(),
                shared_pages: map.shared_pages(),
                shared_runs: map.shared_run_count(),
                shared_ranges: ranges
                    .iter()
                    .take(MAX_LISTED_RANGES)
                    .map(|r| [r.start, r.end])
                    .collect(),
                map_bytes: map.memory_bytes(),
            }
        });
        Self {
            state: state_name(vm.run_state()),
            vcpus: vm.vcpu_count(),
            memory_bytes: vm.ram().size(),
            memory_file: vm.ram().file().map(|p| p.display().to_string()),
            migratability: paravirt.migratability(),
            migration_control: paravirt.migration_control(),
            blocker_events: paravirt.with_blockers(|b| b.events().cloned().collect()),
            page_states,
            paravirt: vm.paravirt_features(),
            sev,
            migration,
            devices: vm.devices().map(|d| d.status()).unwrap_or_default(),
        }
    }
}
