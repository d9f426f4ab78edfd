//! Where things sit in guest-physical memory.
//!
//! The boot area and command line match what kit guests are told in `veil_guest_abi`.

use vm_memory::GuestAddress;

pub use veil_guest_abi::{BOOT_INFO_END, CMDLINE_MAX, CMDLINE_START, KERNEL_START};

/// PVH `hvm_start_info`.
pub const PVH_INFO_START: GuestAddress = GuestAddress(veil_guest_abi::BOOT_INFO_START);
/// PVH module list (the initrd), right after the start info.
pub const PVH_MODLIST_START: GuestAddress = GuestAddress(veil_guest_abi::BOOT_INFO_START + 0x100);
/// The flat GDT both 32-bit boot protocols are entered with.
pub const BOOT_GDT_START: GuestAddress = GuestAddress(veil_guest_abi::BOOT_INFO_START + 0x800);
/// PVH memory map, or the Linux boot protocol's zero page: never both.
pub const MEMMAP_START: GuestAddress = GuestAddress(veil_guest_abi::BOOT_INFO_START + 0x1000);
/// Linux `boot_params` ("zero page") for bzImage boots.
pub const ZERO_PAGE_START: GuestAddress = MEMMAP_START;

/// End of the conventional memory below the legacy video/BIOS hole.
pub const EBDA_START: u64 = 0xa_0000;
/// Guest RAM below 4 GiB stops here; the rest is for 32-bit MMIO (LAPIC, IOAPIC, devices).
pub const MMIO32_START: u64 = 0xc000_0000;
/// RAM that does not fit below [`MMIO32_START`] continues here.
pub const HIGH_RAM_START: u64 = 1 << 32;

/// Intel VMX needs three pages for the real-mode TSS; placed just below the BIOS area.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// The IOAPIC's MMIO page.
pub const IOAPIC_START: u64 = 0xfec0_0000;

// The boot structures fit the area kit guests are told about.
const _: () = assert!(MEMMAP_START.0 + 4096 <= BOOT_INFO_END);
const _: () = assert!(BOOT_GDT_START.0 + 64 <= MEMMAP_START.0);

/// Guest RAM regions for `size` bytes of memory: below the 32-bit MMIO hole, then above 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO32_START);
    let mut regions = vec![(GuestAddress(0), low)];
    if size > low {
        regions.push((GuestAddress(HIGH_RAM_START), size - low));
    }
    regions
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_guests_have_one_region() {
        assert_eq!(ram_regions(64 << 20), vec![(GuestAddress(0), 64 << 20)]);
    }

    #[test]
    fn large_guests_skip_the_mmio_hole() {
        let r = ram_regions(8 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO32_START));
        assert_eq!(
            r[1],
            (GuestAddress(HIGH_RAM_START), (8 << 30) - MMIO32_START)
        );
    }
}
