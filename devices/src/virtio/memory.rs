//! The one way a virtio device reaches guest memory, and the guard on it.
//!
//! A device never holds the raw [`GuestMemoryMmap`]: it holds a [`DeviceMemory`] and reaches
//! memory through [`DeviceMemory::guarded`], a [`GuestMemory`] whose every access first asks
//! [`SharedPages`] whether the range is shared with the host. `virtio-queue` reads the rings,
//! descriptor tables (indirect ones included) and buffers through that same view, so no access
//! can slip past the guard. A refused access fails like an access outside guest memory, is
//! logged and counted.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_memory::bitmap::{AtomicBitmap, BS};
use vm_memory::guest_memory::GuestMemorySliceIterator;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryResult, Permissions};

/// Guest memory as the VMM maps it, with the dirty bitmap migration needs: device writes to
/// guest memory are tracked like the VMM's own.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Which guest pages a device may touch.
///
/// For a guest with encrypted memory (SEV) only the pages the guest shared with the host
/// (`KVM_HC_MAP_GPA_RANGE`) hold data a device can use: on real hardware a private page reads
/// as ciphertext, on the emulated platform as plaintext the guest never meant to hand over.
pub trait SharedPages: Send + Sync {
    /// Whether every page of `[gpa, gpa + len)` is shared with the host.
    fn is_shared(&self, gpa: u64, len: u64) -> bool;
}

/// The guard for a guest whose memory is not encrypted: every page is the host's to read.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllShared;

impl SharedPages for AllShared {
    fn is_shared(&self, _gpa: u64, _len: u64) -> bool {
        true
    }
}

/// How many guest-memory accesses a device's guard refused; cheap to clone and read from a
/// status thread while the device runs.
#[derive(Debug, Clone, Default)]
pub struct Refusals(Arc<AtomicU64>);

impl Refusals {
    /// Refusals so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }

    /// Counts a refusal; returns the count it makes.
    fn record(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Refusals logged one by one before the log thins out: a guest that keeps kicking a queue
/// with private rings must not fill the host's log.
const LOGGED_REFUSALS: u64 = 16;

/// Whether the `n`-th refusal (from 1) is logged: the first [`LOGGED_REFUSALS`], then at each
/// power of two, so the log says a device goes on refusing without saying it every time.
fn worth_logging(n: u64) -> bool {
    n <= LOGGED_REFUSALS || n.is_power_of_two()
}

/// One device's access to guest memory: the memory, the guard in front of it and the device's
/// refusal counter. Clones share the counter.
#[derive(Clone)]
pub struct DeviceMemory {
    memory: GuestMemoryMmap,
    pages: Arc<dyn SharedPages>,
    encrypted: bool,
    refusals: Refusals,
    device: Arc<str>,
}

impl fmt::Debug for DeviceMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceMemory")
            .field("device", &self.device)
            .field("encrypted", &self.encrypted)
            .field("refusals", &self.refusals.get())
            .finish_non_exhaustive()
    }
}

impl DeviceMemory {
    /// Memory of a guest that is not encrypted; `device` names the device in logs.
    pub fn plain(memory: GuestMemoryMmap, device: &str) -> Self {
        Self::new(memory, Arc::new(AllShared), false, device)
    }

    /// Memory of a guest with encrypted memory: only pages `pages` calls shared are reachable,
    /// and the transport insists on `VIRTIO_F_ACCESS_PLATFORM`.
    pub fn encrypted(memory: GuestMemoryMmap, pages: Arc<dyn SharedPages>, device: &str) -> Self {
        Self::new(memory, pages, true, device)
    }

    fn new(
        memory: GuestMemoryMmap,
        pages: Arc<dyn SharedPages>,
        encrypted: bool,
        device: &str,
    ) -> Self {
        Self {
            memory,
            pages,
            encrypted,
            refusals: Refusals::default(),
            device: device.into(),
        }
    }

    /// Whether the guest's memory is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.encrypted
    }

    /// The device's refusal counter.
    pub fn refusals(&self) -> Refusals {
        self.refusals.clone()
    }

    /// The device's name in logs.
    pub fn device_name(&self) -> &str {
        &self.device
    }

    /// Guest memory as the device may see it.
    pub fn guarded(&self) -> GuardedMemory<'_> {
        GuardedMemory { memory: self }
    }

    /// Asks the guard about `[gpa, gpa + len)`; a refusal is counted and logged, `what` says
    /// what the device was about to touch.
    pub fn allows(&self, gpa: u64, len: u64, what: &str) -> bool {
        if len == 0 || self.pages.is_shared(gpa, len) {
            return true;
        }
        let refused = self.refusals.record();
        if worth_logging(refused) {
            tracing::warn!(
                device = %self.device,
                gpa = format_args!("{gpa:#x}"),
                len,
                refused,
                "Refused {what} in a page the guest has not shared"
            );
        }
        false
    }
}

/// Guest memory seen through a device's guard; see the module documentation.
#[derive(Clone, Copy)]
pub struct GuardedMemory<'a> {
    memory: &'a DeviceMemory,
}

impl GuardedMemory<'_> {
    /// The guard this view asks.
    pub fn device_memory(&self) -> &DeviceMemory {
        self.memory
    }
}

fn describe(access: Permissions) -> &'static str {
    match access {
        Permissions::Write => "a write",
        Permissions::ReadWrite => "a read-write access",
        _ => "a read",
    }
}

impl GuestMemory for GuardedMemory<'_> {
    type PhysicalMemory = GuestMemoryMmap;
    type Bitmap = AtomicBitmap;

    fn check_range(&self, addr: GuestAddress, count: usize, access: Permissions) -> bool {
        self.memory.allows(addr.0, count as u64, describe(access))
            && GuestMemory::check_range(&self.memory.memory, addr, count, access)
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        access: Permissions,
    ) -> GuestMemoryResult<impl GuestMemorySliceIterator<'a, BS<'a, Self::Bitmap>>> {
        if !self.memory.allows(addr.0, count as u64, describe(access)) {
            return Err(GuestMemoryError::InvalidGuestAddress(addr));
        }
        GuestMemory::get_slices(&self.memory.memory, addr, count, access)
    }

    // `physical_memory` keeps its default of `None`: handing out the unguarded memory would
    // let a caller go around the guard.
}

#[cfg(test)]
pub(crate) mod tests {
    use std::ops::Range;
    use std::sync::Mutex;

    use vm_memory::Bytes;

    use super::*;

    /// A guard with a list of private ranges, changeable while the device runs.
    #[derive(Default)]
    pub(crate) struct PrivateRanges(pub(crate) Mutex<Vec<Range<u64>>>);

    impl SharedPages for PrivateRanges {
        fn is_shared(&self, gpa: u64, len: u64) -> bool {
            let end = gpa.saturating_add(len);
            !self
                .0
                .lock()
                .unwrap()
                .iter()
                .any(|r| gpa < r.end && r.start < end)
        }
    }

    pub(crate) fn memory(size: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    #[test]
    fn the_log_thins_out_for_a_device_that_goes_on_refusing() {
        let logged: Vec<u64> = (1..=1000).filter(|&n| worth_logging(n)).collect();
        assert_eq!(
            logged,
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 32, 64, 128, 256, 512]
        );
    }

    #[test]
    fn refuses_private_ranges_and_counts() {
        let pages = Arc::new(PrivateRanges::default());
        pages.0.lock().unwrap().push(0x2000..0x3000);
        let mem = DeviceMemory::encrypted(memory(0x10000), pages, "test");
        let guarded = mem.guarded();

        guarded.write_obj(0xabu8, GuestAddress(0x1fff)).unwrap();
        assert!(guarded.write_obj(0xabu8, GuestAddress(0x2000)).is_err());
        assert!(guarded.read_obj::<u32>(GuestAddress(0x1ffe)).is_err());
        assert_eq!(mem.refusals().get(), 2);
        // The refused write never reached memory.
        assert_eq!(mem.memory.read_obj::<u8>(GuestAddress(0x2000)).unwrap(), 0);
        assert!(mem.is_encrypted());
    }

    #[test]
    fn plain_memory_allows_everything_in_range() {
        let mem = DeviceMemory::plain(memory(0x10000), "test");
        let guarded = mem.guarded();
        guarded.write_obj(7u64, GuestAddress(0x8000)).unwrap();
        assert_eq!(guarded.read_obj::<u64>(GuestAddress(0x8000)).unwrap(), 7);
        assert!(guarded.read_obj::<u64>(GuestAddress(0x10000)).is_err());
        assert_eq!(mem.refusals().get(), 0);
        assert!(!mem.is_encrypted());
    }
}
