//! The memory the device touches: one split virtqueue, the request slots' headers and status
//! bytes, and a data buffer per slot, all in one area inside the kit's image.
//!
//! In a guest with encrypted memory (SEV), a device can only read and write pages the guest has
//! shared with the host, so the area is shared before a driver uses it, the way Linux does it
//! for its swiotlb bounce buffers and `dma_alloc_coherent` rings (`set_memory_decrypted`:
//! clear the C-bit in the page tables, then `KVM_HC_MAP_GPA_RANGE` with the "decrypted"
//! attribute). The kit's data for the device lives in the buffers themselves, so no bouncing
//! copy is needed: a read lands in a buffer and is checked there.
//!
//! The area ends the kit's image (below 4 MiB, link.ld checks it), page-aligned, so the share
//! is exact at 4 KiB granularity for the host's page-state map. What these hosts cannot show:
//! there is no SEV here (HOST-NOTES), so under Veil's emulated SEV platform nothing is
//! encrypted, the kit's page tables carry no C-bit (SEV_STATUS says encryption is not active;
//! on hardware they do carry it), so only the host's page-state map sees the share. The split
//! of the 2 MiB page the area shares with the kit's stacks (`paging::clear_c_bit`) does run
//! here, and every virtio test runs on the 4 KiB mapping it leaves.

use core::mem::MaybeUninit;

use crate::{paging, paravirt};
use veil_guest_abi::PAGE_SIZE;

/// Most descriptors a queue of the kit has (virtio 1.2 §2.7: a power of 2); the device may
/// offer fewer.
pub const QUEUE_MAX: usize = 32;
/// Most queues a device has here: virtio-vsock's rx, tx and event queues (§5.10.2).
pub const QUEUES: usize = 3;
/// Block request slots: one fixed three-descriptor chain each (header, data, status).
pub const SLOTS: usize = QUEUE_MAX / 3;
/// Data buffers, one per block request slot; the console and vsock drivers divide them up
/// their own way.
pub const BUFFERS: usize = SLOTS;
/// Each data buffer: the largest block request the kit makes.
pub const BUFFER_SIZE: usize = 64 * 1024;
/// vsock transmit slots: a two-descriptor chain each (header, data), half the tx queue.
pub const VSOCK_TX_SLOTS: usize = QUEUE_MAX / 2;
/// vsock event buffers (§5.10.6.7: the driver keeps the event queue populated).
pub const VSOCK_EVENTS: usize = 4;

/// `struct virtq_desc` (virtio 1.2 §2.7.5).
#[repr(C, align(16))]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
    pub next: u16,
}

/// `struct virtq_used_elem` (§2.7.8).
#[repr(C)]
pub struct UsedElem {
    pub id: u32,
    pub len: u32,
}

/// `struct virtio_blk_req`'s header (§5.2.6): type, reserved, sector.
#[repr(C)]
pub struct BlkHeader {
    pub kind: u32,
    pub reserved: u32,
    pub sector: u64,
}

/// `struct virtio_vsock_hdr` (§5.10.6): 44 bytes, little-endian, packed. Written and read
/// field by field with volatile accesses (`core::ptr::addr_of_mut!` on a packed field gives
/// an unaligned pointer, which `write_unaligned` handles).
#[repr(C, packed)]
pub struct VsockHeader {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub kind: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

const _: () = assert!(core::mem::size_of::<VsockHeader>() == 44);

/// `struct virtq_avail` (§2.7.6), aligned to 2.
#[repr(C)]
pub struct AvailRing {
    pub flags: u16,
    pub idx: u16,
    pub ring: [u16; QUEUE_MAX],
    pub used_event: u16,
}

/// `struct virtq_used` (§2.7.8), aligned to 4 as the device expects.
#[repr(C, align(4))]
pub struct UsedRing {
    pub flags: u16,
    pub idx: u16,
    pub ring: [UsedElem; QUEUE_MAX],
    pub avail_event: u16,
}

/// One split virtqueue's three parts (§2.7: the descriptor table aligned to 16, the available
/// ring to 2, the used ring to 4).
#[repr(C)]
pub struct Rings {
    pub desc: [Desc; QUEUE_MAX],
    pub avail: AvailRing,
    pub used: UsedRing,
}

/// The first page: every queue's rings, and the small things devices read or write beside the
/// data buffers (block request headers and status bytes, vsock transmit headers and events).
#[repr(C)]
pub struct RingPage {
    pub queues: [Rings; QUEUES],
    pub headers: [BlkHeader; SLOTS],
    pub status: [u8; SLOTS],
    pub vsock_tx: [VsockHeader; VSOCK_TX_SLOTS],
    pub vsock_events: [u32; VSOCK_EVENTS],
}

/// The whole area: the ring page, then the data buffers, page-aligned and contiguous.
#[repr(C, align(4096))]
pub struct DmaArea {
    pub rings: RingPage,
    _pad: [u8; PAGE_SIZE as usize - core::mem::size_of::<RingPage>()],
    pub buffers: [[u8; BUFFER_SIZE]; BUFFERS],
}

const _: () = assert!(core::mem::size_of::<RingPage>() <= PAGE_SIZE as usize);

/// Never zeroed (link.ld puts `.dma` in the image without loading it): the driver writes what
/// the device reads before the device may read it.
#[link_section = ".dma"]
static mut DMA: MaybeUninit<DmaArea> = MaybeUninit::uninit();

/// The area, for the driver's volatile accesses (the device reads and writes it too, so no
/// reference to it is ever made).
#[inline(always)]
pub fn area() -> *mut DmaArea {
    // Only the address is taken (no reference to the static is made).
    core::ptr::addr_of_mut!(DMA).cast()
}

/// Data buffer `index`'s first byte (the buffers are contiguous: `index * BUFFER_SIZE` bytes
/// from buffer 0).
#[inline(always)]
pub fn buffer(index: usize) -> *mut u8 {
    // SAFETY: only an address inside the kit's DMA area is computed (`index` is bounds-checked
    // by the array index).
    unsafe { core::ptr::addr_of_mut!((*area()).buffers[index]).cast() }
}

/// Guest-physical address of `ptr` in the area (the kit is identity-mapped).
#[inline(always)]
pub fn gpa<T>(ptr: *const T) -> u64 {
    ptr as u64
}

/// `KVM_HC_MAP_GPA_RANGE` (Documentation/virt/kvm/x86/hypercalls.rst).
const KVM_HC_MAP_GPA_RANGE: u64 = 12;
/// Its attributes (include/uapi/linux/kvm_para.h): 4 KiB pages, decrypted (shared).
const KVM_MAP_GPA_RANGE_PAGE_SZ_4K: u64 = 0;
const KVM_MAP_GPA_RANGE_DECRYPTED: u64 = 0;

/// Shares the area with the host when memory is encrypted; nothing to do otherwise.
///
/// Done on every device set-up: the hypercall is idempotent and costs one exit, and no state
/// has to survive a `reset` task.
pub fn share_with_host() -> Result<(), super::Error> {
    let Some(c_bit) = paravirt::memory_encryption_c_bit() else {
        return Ok(());
    };
    let start = area() as u64;
    let pages = (core::mem::size_of::<DmaArea>() as u64).div_ceil(PAGE_SIZE);
    paging::clear_c_bit(start, start + pages * PAGE_SIZE, c_bit)
        .map_err(|_| super::Error::Split)?;
    let result = paravirt::hypercall(
        paravirt::transport(),
        KVM_HC_MAP_GPA_RANGE,
        start,
        pages,
        KVM_MAP_GPA_RANGE_PAGE_SZ_4K | KVM_MAP_GPA_RANGE_DECRYPTED,
    );
    if result != 0 {
        return Err(super::Error::Share(result));
    }
    Ok(())
}
