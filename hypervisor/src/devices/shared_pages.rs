//! The page-state map as the devices' guard sees it: for a guest with encrypted memory a device
//! may touch only pages the guest shared (KVM_HC_MAP_GPA_RANGE), as Linux puts every ring and
//! bounce buffer there. On hardware a device reading a private page would see ciphertext; on
//! the emulated platform, plaintext: refusing both makes them behave alike.

use std::sync::Arc;

use veil_devices::virtio::SharedPages;

use crate::memory::PAGE_SIZE;
use crate::paravirt::Paravirt;

/// The guest's shared pages, read from its paravirtual state at each access.
pub struct GuestSharedPages(pub Arc<Paravirt>);

impl SharedPages for GuestSharedPages {
    fn is_shared(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len.max(1)) else {
            return false;
        };
        let states = self.0.page_states();
        match states.as_ref() {
            // A guest without encrypted memory shares everything.
            None => true,
            Some(map) => (gpa / PAGE_SIZE..end.div_ceil(PAGE_SIZE)).all(|gfn| !map.is_private(gfn)),
        }
    }
}
