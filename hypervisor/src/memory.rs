//! Guest RAM: anonymous or backed by a shared file, registered with KVM, with dirty tracking.
//!
//! Dirty pages come from two places: KVM's log for guest writes and `vm-memory`'s bitmap for
//! writes the VMM makes through [`GuestMemory`]. Migration needs both.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion,
};

use crate::layout;

/// Guest memory as the VMM sees it, tracking the pages the VMM writes.
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Copies `bytes` into guest memory at `at` without marking the VMM's dirty bitmap: for filling
/// a VM whose guest has not run (a migration or restore arriving), where nothing reads those
/// marks. The locked bit-set per page stalled each copy until its stores drained.
pub fn fill_unlogged(
    memory: &GuestMemory,
    bytes: &[u8],
    at: GuestAddress,
) -> Result<(), vm_memory::GuestMemoryError> {
    let slice = memory.get_slice(at, bytes.len())?;
    let guard = slice.ptr_guard_mut();
    // SAFETY: `guard` points at `slice.len()` bytes of one mapped region, which stays mapped
    // while `memory` is borrowed, longer than the new slice (used for this copy only); every
    // access to guest memory is volatile, as this one is.
    let unlogged = unsafe { vm_memory::VolatileSlice::new(guard.as_ptr(), slice.len()) };
    unlogged.copy_from(bytes);
    Ok(())
}

/// How [`populate`] faults pages in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Populate {
    /// For reading (`MADV_POPULATE_READ`): a memory file's holes are backed as a read fault
    /// would back them.
    Read,
    /// For writing (`MADV_POPULATE_WRITE`).
    Write,
}

/// Faults in `len` bytes of guest memory at the page-aligned `at`, in one call rather than one
/// fault per page as a copy would take them: for a run of pages about to be filled or checked.
/// An error means an access there would fail too, with SIGBUS: the host is out of memory, or a
/// memory file's filesystem is full. A kernel without the call (before 5.14), or a range across
/// two regions, leaves the faults to the access.
pub fn populate(
    memory: &GuestMemory,
    at: GuestAddress,
    len: usize,
    how: Populate,
) -> Result<(), std::io::Error> {
    let Ok(slice) = memory.get_slice(at, len) else {
        return Ok(());
    };
    let guard = slice.ptr_guard_mut();
    let advice = match how {
        Populate::Read => libc::MADV_POPULATE_READ,
        Populate::Write => libc::MADV_POPULATE_WRITE,
    };
    // SAFETY: the range lies inside one mapped region of guest memory (`get_slice` checked
    // it); populating only faults pages in and changes no contents. (madvise refuses, with
    // EINVAL, a start that is not page-aligned: then nothing is populated.)
    let done = unsafe { libc::madvise(guard.as_ptr().cast(), len, advice) };
    if done == 0 {
        return Ok(());
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EINVAL) => Ok(()),
        e => Err(e),
    }
}

/// Smallest guest Veil runs: room for the boot area, a kernel and its page tables.
pub const MIN_MEMORY_BYTES: u64 = 16 << 20;
/// Largest guest Veil accepts.
pub const MAX_MEMORY_BYTES: u64 = 1 << 40;
/// Granularity of guest memory sizes and of dirty tracking.
pub const PAGE_SIZE: u64 = veil_guest_abi::PAGE_SIZE;

/// Errors creating or registering guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Below [`MIN_MEMORY_BYTES`].
    #[error("Guest memory of {} is too small: Veil needs at least {}", human(*size), human(MIN_MEMORY_BYTES))]
    TooSmall { size: u64 },
    /// Above [`MAX_MEMORY_BYTES`].
    #[error("Guest memory of {} is too large: Veil supports at most {}", human(*size), human(MAX_MEMORY_BYTES))]
    TooLarge { size: u64 },
    /// More anonymous memory than the host has.
    #[error("Guest memory of {} is more than this host's {} of RAM", human(*size), human(*host))]
    ExceedsHost { size: u64, host: u64 },
    /// Not a whole number of pages.
    #[error("Guest memory size {size} is not a multiple of 4 KiB")]
    Unaligned { size: u64 },
    /// The backing file could not be opened or sized.
    #[error("Cannot use {} as guest memory", path.display())]
    File {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A saved RAM file whose size is not the guest's RAM.
    #[error("{} holds {found} bytes, but the guest has {expected} bytes of RAM", path.display())]
    SavedSize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    /// mmap failed.
    #[error("Cannot map guest memory")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    /// The regions could not be assembled.
    #[error("Cannot assemble guest memory regions")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
    /// KVM refused a memory slot.
    #[error("KVM refused guest memory slot {slot}")]
    Register {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM could not report the dirty log.
    #[error("Cannot read KVM's dirty log for slot {slot}")]
    DirtyLog {
        slot: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// How much RAM and where it comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryConfig {
    /// Bytes of guest RAM.
    pub size: u64,
    /// Back guest RAM with this file (shared mapping) instead of anonymous memory.
    pub file: Option<PathBuf>,
}

/// How a RAM file is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileMapping {
    /// The file is the guest's RAM: writes go to it (`MAP_SHARED`).
    #[default]
    Shared,
    /// The file is a saved guest's RAM, read on first touch and never written: the guest's
    /// writes go to pages of this process (`MAP_PRIVATE`), so many VMs restored from one file
    /// share its page cache. The file must already have the RAM's size.
    CopyOnWrite,
}

/// The guest's RAM and its KVM slots.
pub struct GuestRam {
    memory: GuestMemory,
    size: u64,
    file: Option<PathBuf>,
    /// Counts every change to the dirty log (logging turned on or off, bits taken), so that
    /// whoever relies on the log holding every write since their own last look can tell
    /// whether someone else has used it since.
    dirty_log_epoch: std::sync::atomic::AtomicU64,
}

impl GuestRam {
    /// Checks the size and maps the memory, anonymous memory with transparent huge pages.
    pub fn new(config: &MemoryConfig) -> Result<Self, MemoryError> {
        Self::with_huge_pages(config, true)
    }

    /// As [`GuestRam::new`]; `huge_pages` asks the kernel to back anonymous RAM with
    /// transparent huge pages (`MADV_HUGEPAGE`, as QEMU does): on hosts whose THP setting is
    /// `madvise`, the default on most distributions, 1 GiB of fresh RAM otherwise takes
    /// 262,144 page faults instead of 512. File-backed RAM follows the file's filesystem.
    pub fn with_huge_pages(config: &MemoryConfig, huge_pages: bool) -> Result<Self, MemoryError> {
        Self::with_options(config, huge_pages, FileMapping::Shared)
    }

    /// As [`GuestRam::with_huge_pages`], with the file (if any) mapped as `mapping` says.
    pub fn with_options(
        config: &MemoryConfig,
        huge_pages: bool,
        mapping: FileMapping,
    ) -> Result<Self, MemoryError> {
        validate_size(
            config.size,
            config.file.is_none().then(host_memory_bytes).flatten(),
        )?;
        let file = config
            .file
            .as_deref()
            .map(|p| match mapping {
                FileMapping::Shared => open_backing_file(p, config.size),
                FileMapping::CopyOnWrite => open_saved_ram(p, config.size),
            })
            .transpose()?;
        let mut regions = Vec::new();
        let mut file_offset = 0u64;
        for (base, len) in layout::ram_regions(config.size) {
            let len_usize =
                usize::try_from(len).map_err(|_| MemoryError::TooLarge { size: len })?;
            let mapping = match &file {
                Some(f) => {
                    let f = f.try_clone().map_err(|source| MemoryError::File {
                        path: config.file.clone().unwrap_or_default(),
                        source,
                    })?;
                    let at = FileOffset::new(f, file_offset);
                    match mapping {
                        FileMapping::Shared => MmapRegion::from_file(at, len_usize),
                        // Read-only file, writable private mapping: copy-on-write pages, and
                        // nothing this process does can reach the file.
                        FileMapping::CopyOnWrite => MmapRegion::build(
                            Some(at),
                            len_usize,
                            libc::PROT_READ | libc::PROT_WRITE,
                            libc::MAP_NORESERVE | libc::MAP_PRIVATE,
                        ),
                    }
                }
                None => MmapRegion::new(len_usize),
            }
            .map_err(MemoryError::Map)?;
            if file.is_none() && huge_pages {
                advise_huge_pages(mapping.as_ptr(), mapping.size());
            }
            file_offset += len;
            regions.push(
                GuestRegionMmap::new(mapping, base)
                    .ok_or(MemoryError::TooLarge { size: config.size })?,
            );
        }
        let memory = GuestMemory::from_regions(regions).map_err(MemoryError::Regions)?;
        Ok(Self {
            memory,
            size: config.size,
            file: config.file.clone(),
            dirty_log_epoch: Default::default(),
        })
    }

    /// Asks for transparent huge pages now, for RAM created without them: an arriving guest's
    /// RAM is filled with small pages (a huge-page fault on a fragmented host stalls in
    /// compaction, and the receive writes every page) and asks once the guest has arrived, so
    /// later faults and khugepaged use huge pages. File-backed RAM is left as it is.
    pub fn advise_huge_pages(&self) {
        if self.file.is_some() {
            return;
        }
        for region in self.memory.iter() {
            advise_huge_pages(region.as_ptr(), region.len() as usize);
        }
    }

    /// The guest memory, for loading and inspecting.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Total bytes of RAM.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The backing file, if any.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// `(slot, guest address, length)` of each region, in slot order.
    pub fn slots(&self) -> impl Iterator<Item = (u32, GuestAddress, u64)> + '_ {
        self.memory
            .iter()
            .enumerate()
            .map(|(i, r)| (i as u32, r.start_addr(), r.len()))
    }

    /// Registers every region with KVM.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        self.set_slots(vm, 0)
    }

    /// Turns KVM dirty logging on or off for every region.
    pub fn set_dirty_logging(&self, vm: &VmFd, enabled: bool) -> Result<(), MemoryError> {
        self.dirty_log_changed();
        self.set_slots(vm, if enabled { KVM_MEM_LOG_DIRTY_PAGES } else { 0 })
    }

    /// Changes with every use of the dirty log: turned on or off, or its bits taken. The same
    /// value twice means nobody used the log in between.
    pub fn dirty_log_epoch(&self) -> u64 {
        self.dirty_log_epoch
            .load(std::sync::atomic::Ordering::Acquire)
    }

    fn dirty_log_changed(&self) {
        self.dirty_log_epoch
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Turns KVM dirty logging on or off for the region in `slot`.
    pub fn set_slot_dirty_logging(
        &self,
        vm: &VmFd,
        slot: u32,
        enabled: bool,
    ) -> Result<(), MemoryError> {
        let region = self
            .memory
            .iter()
            .nth(slot as usize)
            .ok_or(MemoryError::Register {
                slot,
                source: kvm_ioctls::Error::new(libc::EINVAL),
            })?;
        let flags = if enabled { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
        self.dirty_log_changed();
        register_region(vm, slot, region, flags)
    }

    fn set_slots(&self, vm: &VmFd, flags: u32) -> Result<(), MemoryError> {
        for (slot, region) in self.memory.iter().enumerate() {
            register_region(vm, slot as u32, region, flags)?;
        }
        Ok(())
    }

    /// Pages dirtied since the last call, per slot, by the guest (KVM's log; dirty logging must
    /// be on) or by the VMM (`vm-memory`'s bitmap). Both sources are cleared.
    pub fn take_dirty_pages(&self, vm: &VmFd) -> Result<Vec<DirtyBitmap>, MemoryError> {
        self.dirty_log_changed();
        let mut out = Vec::new();
        for (slot, region) in self.memory.iter().enumerate() {
            let slot = slot as u32;
            let words = vm
                .get_dirty_log(slot, region.len() as usize)
                .map_err(|source| MemoryError::DirtyLog { slot, source })?;
            out.push(DirtyBitmap::merged_with_vmm_writes(region, words));
        }
        Ok(out)
    }

    /// Pages the VMM dirtied since the last call, per slot, without KVM's log; cleared.
    pub fn take_vmm_dirty_pages(&self) -> Vec<DirtyBitmap> {
        self.dirty_log_changed();
        self.memory
            .iter()
            .map(|region| {
                let words = vec![0; pages_in(region).div_ceil(64)];
                DirtyBitmap::merged_with_vmm_writes(region, words)
            })
            .collect()
    }
}

fn pages_in(region: &GuestRegionMmap<AtomicBitmap>) -> usize {
    (region.len() / PAGE_SIZE) as usize
}

/// Dirty pages of one region: bit `n` covers the page at `base + n * PAGE_SIZE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// First guest address of the region.
    pub base: GuestAddress,
    /// 64 pages per word, least significant bit first.
    pub words: Vec<u64>,
    /// Number of pages in the region.
    pub pages: usize,
}

impl DirtyBitmap {
    /// `words` (KVM's log of `region`, or zeros) with the pages the VMM wrote in `region`
    /// added; the VMM's bitmap is cleared word by word as it is read, so a page marked while
    /// this runs lands either here or in the next call, never in neither.
    fn merged_with_vmm_writes(region: &GuestRegionMmap<AtomicBitmap>, mut words: Vec<u64>) -> Self {
        let vmm_words = region.get_mmap().bitmap().get_and_reset();
        // vm-memory's bitmap and KVM's log share a layout: bit n of word n / 64 is page n.
        for (word, vmm) in words.iter_mut().zip(vmm_words) {
            *word |= vmm;
        }
        Self {
            base: region.start_addr(),
            words,
            pages: pages_in(region),
        }
    }

    /// How many pages are dirty.
    pub fn count(&self) -> u64 {
        let full = self.pages / 64;
        let whole: u64 = self.words[..full.min(self.words.len())]
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        let tail = match (self.pages % 64, self.words.get(full)) {
            (0, _) | (_, None) => 0,
            (bits, Some(word)) => u64::from((word & ((1u64 << bits) - 1)).count_ones()),
        };
        whole + tail
    }

    /// Frame numbers of the dirty pages, ascending, a word of clean pages skipped at a time.
    pub fn dirty_gfns(&self) -> impl Iterator<Item = u64> + Clone + '_ {
        let first = self.base.0 / PAGE_SIZE;
        let pages = self.pages as u64;
        self.words
            .iter()
            .enumerate()
            .filter(|(_, &word)| word != 0)
            .flat_map(move |(i, &word)| {
                // Each step clears the lowest set bit; the bit's index is the page's.
                std::iter::successors(Some(word), |&w| Some(w & w.wrapping_sub(1)))
                    .take_while(|&w| w != 0)
                    .map(move |w| i as u64 * 64 + u64::from(w.trailing_zeros()))
            })
            .take_while(move |&page| page < pages)
            .map(move |page| first + page)
    }

    /// Guest addresses of the dirty pages, ascending.
    pub fn dirty_addresses(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        (0..self.pages)
            .filter(|p| self.words[p / 64] & (1 << (p % 64)) != 0)
            .map(|p| GuestAddress(self.base.0 + p as u64 * PAGE_SIZE))
    }
}

fn register_region(
    vm: &VmFd,
    slot: u32,
    region: &GuestRegionMmap<AtomicBitmap>,
    flags: u32,
) -> Result<(), MemoryError> {
    let mem_region = kvm_userspace_memory_region {
        slot,
        flags,
        guest_phys_addr: region.start_addr().0,
        memory_size: region.len(),
        userspace_addr: region.as_ptr() as u64,
    };
    // SAFETY: the mapping lives as long as `GuestRam`, which the VM owns and drops only after
    // the VM fd; the guest range does not overlap another slot (regions are disjoint).
    unsafe { vm.set_user_memory_region(mem_region) }
        .map_err(|source| MemoryError::Register { slot, source })
}

/// Best effort: a kernel without THP (or with it `never`) refuses, and RAM works all the same.
fn advise_huge_pages(addr: *mut u8, len: usize) {
    // SAFETY: `addr..addr + len` is a mapping this process created and owns (guest RAM);
    // MADV_HUGEPAGE changes only how the kernel backs it, never its contents or its validity.
    let advised = unsafe { libc::madvise(addr.cast(), len, libc::MADV_HUGEPAGE) };
    if advised != 0 {
        tracing::debug!(
            error = %io::Error::last_os_error(),
            "transparent huge pages not available for guest RAM"
        );
    }
}

fn validate_size(size: u64, host: Option<u64>) -> Result<(), MemoryError> {
    if size < MIN_MEMORY_BYTES {
        return Err(MemoryError::TooSmall { size });
    }
    if size > MAX_MEMORY_BYTES {
        return Err(MemoryError::TooLarge { size });
    }
    if !size.is_multiple_of(PAGE_SIZE) {
        return Err(MemoryError::Unaligned { size });
    }
    match host {
        Some(host) if size > host => Err(MemoryError::ExceedsHost { size, host }),
        _ => Ok(()),
    }
}

fn open_backing_file(path: &Path, size: u64) -> Result<File, MemoryError> {
    let error = |source| MemoryError::File {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(error)?;
    // A shorter file is grown (the new part reads as zero); a longer one keeps its tail.
    if file.metadata().map_err(error)?.len() < size {
        file.set_len(size).map_err(error)?;
    }
    Ok(file)
}

/// A saved guest's RAM, opened read-only; its size must be the RAM's exactly (a shorter file
/// would fault the guest past its end, a longer one is not this guest's).
fn open_saved_ram(path: &Path, size: u64) -> Result<File, MemoryError> {
    let error = |source| MemoryError::File {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(error)?;
    let len = file.metadata().map_err(error)?.len();
    if len != size {
        return Err(MemoryError::SavedSize {
            path: path.to_owned(),
            found: len,
            expected: size,
        });
    }
    Ok(file)
}

/// Total RAM of this host, from /proc/meminfo.
pub fn host_memory_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `1536 MiB`, `2 GiB`: sizes as operators write them.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes;
    let mut unit = 0;
    while unit < UNITS.len() - 1 && value >= 1024 && value.is_multiple_of(1024) {
        value /= 1024;
        unit += 1;
    }
    format!("{value} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn a_fill_lands_in_guest_memory_without_a_dirty_mark() {
        let ram = GuestRam::new(&MemoryConfig {
            size: MIN_MEMORY_BYTES,
            file: None,
        })
        .unwrap();
        let page = [0x5au8; PAGE_SIZE as usize];
        fill_unlogged(ram.memory(), &page, GuestAddress(7 * PAGE_SIZE)).unwrap();
        let mut back = [0u8; PAGE_SIZE as usize];
        ram.memory()
            .read_slice(&mut back, GuestAddress(7 * PAGE_SIZE))
            .unwrap();
        assert_eq!(back, page);
        let marked: u64 = ram
            .take_vmm_dirty_pages()
            .iter()
            .map(DirtyBitmap::count)
            .sum();
        assert_eq!(marked, 0);
        // Past the end of RAM is an error, as for any write.
        assert!(fill_unlogged(ram.memory(), &page, GuestAddress(MIN_MEMORY_BYTES)).is_err());
    }

    #[test]
    fn every_look_at_the_dirty_log_changes_its_epoch_and_nothing_else_does() {
        let ram = GuestRam::new(&MemoryConfig {
            size: MIN_MEMORY_BYTES,
            file: None,
        })
        .unwrap();
        let epoch = ram.dirty_log_epoch();
        ram.memory().write_obj(1u64, GuestAddress(0)).unwrap();
        assert_eq!(ram.dirty_log_epoch(), epoch, "a write is not a look");
        let taken: u64 = ram
            .take_vmm_dirty_pages()
            .iter()
            .map(DirtyBitmap::count)
            .sum();
        assert_eq!(taken, 1);
        assert_ne!(ram.dirty_log_epoch(), epoch);
    }

    #[test]
    fn dirty_gfns_are_the_set_bits_in_order_and_stop_at_the_region_end() {
        let bitmap = DirtyBitmap {
            base: GuestAddress(0x10 * PAGE_SIZE),
            words: vec![1 | 1 << 63, 0, 1 << 5 | 1 << 6, u64::MAX],
            pages: 64 * 3,
        };
        let gfns: Vec<u64> = bitmap.dirty_gfns().collect();
        assert_eq!(gfns, [0x10, 0x10 + 63, 0x10 + 133, 0x10 + 134]);
        let slow: Vec<u64> = bitmap.dirty_addresses().map(|a| a.0 / PAGE_SIZE).collect();
        assert_eq!(gfns, slow);
        assert_eq!(
            bitmap.count(),
            4,
            "pages past the region's end do not count"
        );
    }

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(
            validate_size(8 << 20, None),
            Err(MemoryError::TooSmall { .. })
        ));
        assert!(matches!(
            validate_size(2 << 40, None),
            Err(MemoryError::TooLarge { .. })
        ));
        assert!(matches!(
            validate_size((16 << 20) + 1, None),
            Err(MemoryError::Unaligned { .. })
        ));
        assert!(matches!(
            validate_size(64 << 30, Some(24 << 30)),
            Err(MemoryError::ExceedsHost { .. })
        ));
        validate_size(64 << 30, None).unwrap();
        validate_size(16 << 20, Some(24 << 30)).unwrap();
    }

    #[test]
    fn errors_name_the_sizes() {
        let e = validate_size(1 << 20, None).unwrap_err().to_string();
        assert_eq!(
            e,
            "Guest memory of 1 MiB is too small: Veil needs at least 16 MiB"
        );
    }

    #[test]
    fn file_backed_memory_is_the_file() {
        let path = std::env::temp_dir().join(format!("veil-mem-{}", std::process::id()));
        std::fs::write(&path, b"hello").unwrap();
        let ram = GuestRam::new(&MemoryConfig {
            size: 16 << 20,
            file: Some(path.clone()),
        })
        .unwrap();
        let mut buf = [0u8; 5];
        ram.memory().read_slice(&mut buf, GuestAddress(0)).unwrap();
        assert_eq!(&buf, b"hello");
        ram.memory()
            .write_slice(b"bye", GuestAddress(0x1000))
            .unwrap();
        let contents = std::fs::read(&path).unwrap();
        assert_eq!(contents.len(), 16 << 20);
        assert_eq!(&contents[0x1000..0x1003], b"bye");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_copy_on_write_file_is_read_but_never_written() {
        let path = std::env::temp_dir().join(format!("veil-cow-{}", std::process::id()));
        let mut saved = vec![0u8; 16 << 20];
        saved[0x2000..0x2005].copy_from_slice(b"saved");
        std::fs::write(&path, &saved).unwrap();
        let config = MemoryConfig {
            size: 16 << 20,
            file: Some(path.clone()),
        };
        let ram = GuestRam::with_options(&config, true, FileMapping::CopyOnWrite).unwrap();
        let mut buf = [0u8; 5];
        ram.memory()
            .read_slice(&mut buf, GuestAddress(0x2000))
            .unwrap();
        assert_eq!(&buf, b"saved");
        ram.memory()
            .write_slice(b"mine!", GuestAddress(0x2000))
            .unwrap();
        ram.memory()
            .read_slice(&mut buf, GuestAddress(0x2000))
            .unwrap();
        assert_eq!(&buf, b"mine!");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            saved,
            "the file is untouched"
        );

        let short = MemoryConfig {
            size: 32 << 20,
            ..config
        };
        let e = GuestRam::with_options(&short, true, FileMapping::CopyOnWrite)
            .err()
            .unwrap();
        assert!(matches!(e, MemoryError::SavedSize { found, expected, .. }
            if found == 16 << 20 && expected == 32 << 20));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn no_dirty_page_is_lost_while_pages_are_taken() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let ram = GuestRam::new(&MemoryConfig {
            size: 64 << 20,
            file: None,
        })
        .unwrap();
        let pages = (64 << 20) / PAGE_SIZE;
        const WRITERS: u64 = 3;
        let writers_done = AtomicUsize::new(0);
        let mut reported = vec![0u32; pages as usize];
        let (ram, writers_done) = (&ram, &writers_done);
        std::thread::scope(|s| {
            for writer in 0..WRITERS {
                s.spawn(move || {
                    // Each page is written once, by one writer: a page whose only mark is
                    // lost is never reported.
                    for page in (writer..pages).step_by(WRITERS as usize) {
                        ram.memory()
                            .write_obj(page, GuestAddress(page * PAGE_SIZE))
                            .unwrap();
                    }
                    writers_done.fetch_add(1, Ordering::SeqCst);
                });
            }
            let reported = &mut reported;
            s.spawn(move || loop {
                let finished = writers_done.load(Ordering::SeqCst) == WRITERS as usize;
                for bitmap in ram.take_vmm_dirty_pages() {
                    for addr in bitmap.dirty_addresses() {
                        reported[(addr.0 / PAGE_SIZE) as usize] += 1;
                    }
                }
                if finished {
                    break;
                }
            });
        });
        let lost: Vec<usize> = (0..reported.len()).filter(|&p| reported[p] == 0).collect();
        assert!(
            lost.is_empty(),
            "{} pages were never reported dirty",
            lost.len()
        );
        let twice = reported.iter().filter(|&&n| n > 1).count();
        assert_eq!(twice, 0, "pages written once were reported more than once");
    }

    /// The `VmFlags` line of the mapping that contains `addr`, from /proc/self/smaps.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((start, end)) = range.split_once('-') {
                    if let (Ok(start), Ok(end)) = (
                        usize::from_str_radix(start, 16),
                        usize::from_str_radix(end, 16),
                    ) {
                        inside = (start..end).contains(&addr);
                        continue;
                    }
                }
            }
            if inside && line.starts_with("VmFlags:") {
                return line.to_string();
            }
        }
        panic!("no mapping at {addr:#x}");
    }

    #[test]
    fn anonymous_ram_asks_for_huge_pages_unless_told_not_to() {
        let config = MemoryConfig {
            size: 16 << 20,
            file: None,
        };
        let host_addr = |ram: &GuestRam| ram.memory().iter().next().unwrap().as_ptr() as usize;
        let with = GuestRam::with_huge_pages(&config, true).unwrap();
        // `hg`: the mapping was madvised MADV_HUGEPAGE (fs/proc/task_mmu.c).
        assert!(
            vm_flags(host_addr(&with)).contains(" hg"),
            "{}",
            vm_flags(host_addr(&with))
        );
        let without = GuestRam::with_huge_pages(&config, false).unwrap();
        assert!(!vm_flags(host_addr(&without)).contains(" hg"));
        // Asked for later, as an arriving guest's RAM is once it has arrived.
        without.advise_huge_pages();
        assert!(vm_flags(host_addr(&without)).contains(" hg"));
    }

    #[test]
    fn vmm_writes_are_tracked_per_page() {
        let ram = GuestRam::new(&MemoryConfig {
            size: 16 << 20,
            file: None,
        })
        .unwrap();
        ram.memory()
            .write_obj(7u64, GuestAddress(3 * PAGE_SIZE + 8))
            .unwrap();
        let region = ram.memory().iter().next().unwrap();
        let bitmap = region.get_mmap();
        assert!(bitmap.bitmap().is_bit_set(3));
        assert!(!bitmap.bitmap().is_bit_set(4));
    }
}
