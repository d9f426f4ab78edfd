//! Guest memory as the SEV commands see it.
//!
//! KVM names guest memory by its address in the VMM's mapping (`uaddr`, `guest_uaddr` in
//! `struct kvm_sev_*`), pins those pages and hands the PSP their physical address with the
//! C-bit set: the firmware encrypts, decrypts or measures the guest's page **in place**, with
//! the guest's key, tweaked by that physical address. A copy of guest memory elsewhere does not
//! decrypt. So the commands that touch guest memory take [`GuestBytes`], a view of the VMM's
//! mapping of guest RAM, never a buffer of their own; and the bytes must lie in RAM the VMM
//! registered for this VM ([`RegisteredRam`], `KVM_MEMORY_ENCRYPT_REG_REGION`), which both
//! backends check before anything else, so that misuse fails on the software model exactly as
//! it would corrupt (or be refused) on hardware.

use vm_memory::bitmap::{AtomicBitmap, BS};
use vm_memory::VolatileSlice;

use crate::firmware::{Command, FirmwareError, SevError};

/// Bytes of guest RAM in the VMM's mapping (from `GuestMemoryMmap::get_slice`): what
/// LAUNCH_UPDATE_DATA, LAUNCH_SECRET, SEND_UPDATE_DATA and RECEIVE_UPDATE_DATA work on.
pub type GuestBytes<'a> = VolatileSlice<'a, BS<'a, AtomicBitmap>>;

/// The x86 page the SEND/RECEIVE_UPDATE_DATA payload may not leave (`sev_send_update_data`,
/// `sev_receive_update_data` in arch/x86/kvm/svm/sev.c refuse with EINVAL).
pub const PAGE_SIZE: u64 = 4096;

/// SEV API (publication 55766): guest addresses and lengths of LAUNCH_UPDATE_DATA,
/// LAUNCH_SECRET and the UPDATE_DATA transport payloads are in 16-byte AES blocks.
pub const FIRMWARE_ALIGN: u64 = 16;

/// `SEV_FW_BLOB_MAX_SIZE` (include/linux/psp-sev.h): KVM copies no blob (certificate, session,
/// packet header or payload) longer than this to the firmware (`psp_copy_user_blob`).
pub const SEV_FW_BLOB_MAX_SIZE: usize = 0x4000;

/// Where guest bytes are in the VMM's address space: `(host address, length)`.
pub fn host_range(bytes: &GuestBytes<'_>) -> (u64, u64) {
    (
        bytes.ptr_guard().as_ptr() as usize as u64,
        bytes.len() as u64,
    )
}

/// The host address ranges registered as this VM's RAM.
#[derive(Debug, Default, Clone)]
pub struct RegisteredRam {
    regions: Vec<(u64, u64)>,
}

impl RegisteredRam {
    /// Records `len` bytes at host address `start`; an empty or wrapping range is the
    /// firmware's INVALID_ADDRESS (KVM's EINVAL in `sev_mem_enc_register_region`).
    pub fn add(&mut self, start: u64, len: u64) -> Result<(), FirmwareError> {
        if len == 0 || start.checked_add(len).is_none() {
            return Err(invalid_address(Command::RegisterRegion));
        }
        self.regions.push((start, len));
        Ok(())
    }

    /// Whether any RAM is registered.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// `bytes`' host address if they lie inside one registered region, else INVALID_ADDRESS:
    /// the firmware would work on memory that is not this guest's.
    pub fn check(&self, command: Command, bytes: &GuestBytes<'_>) -> Result<u64, FirmwareError> {
        let (addr, len) = host_range(bytes);
        let inside = self
            .regions
            .iter()
            .any(|&(start, size)| addr >= start && addr + len <= start + size);
        if !inside {
            return Err(invalid_address(command));
        }
        Ok(addr)
    }
}

fn invalid_address(command: Command) -> FirmwareError {
    FirmwareError::Status {
        command,
        status: SevError::InvalidAddress,
    }
}

fn invalid_len(command: Command) -> FirmwareError {
    FirmwareError::Status {
        command,
        status: SevError::InvalidLen,
    }
}

/// SEND_UPDATE_DATA's and RECEIVE_UPDATE_DATA's guest bytes: non-empty whole AES blocks at a
/// block-aligned address, inside one 4 KiB page.
pub fn check_page_payload(command: Command, addr: u64, len: u64) -> Result<(), FirmwareError> {
    let offset = addr % PAGE_SIZE;
    if len == 0
        || !len.is_multiple_of(FIRMWARE_ALIGN)
        || !addr.is_multiple_of(FIRMWARE_ALIGN)
        || offset + len > PAGE_SIZE
    {
        return Err(invalid_len(command));
    }
    Ok(())
}

/// LAUNCH_UPDATE_DATA's bytes: non-empty whole AES blocks at a block-aligned address. KVM
/// splits a range into physically contiguous runs itself, so it may cross pages.
pub fn check_launch_data(command: Command, addr: u64, len: u64) -> Result<(), FirmwareError> {
    if len == 0 || !len.is_multiple_of(FIRMWARE_ALIGN) || !addr.is_multiple_of(FIRMWARE_ALIGN) {
        return Err(invalid_len(command));
    }
    Ok(())
}

/// LAUNCH_SECRET's destination: whole AES blocks, block-aligned, and inside one page (KVM
/// refuses a secret whose pages are not physically contiguous, `sev_launch_secret`; one page
/// always is).
pub fn check_secret_dest(command: Command, addr: u64, len: u64) -> Result<(), FirmwareError> {
    check_page_payload(command, addr, len)
}

/// A blob KVM copies to the firmware: non-empty and at most [`SEV_FW_BLOB_MAX_SIZE`].
pub fn check_blob(command: Command, len: usize) -> Result<(), FirmwareError> {
    if len == 0 || len > SEV_FW_BLOB_MAX_SIZE {
        return Err(invalid_len(command));
    }
    Ok(())
}

pub mod test_ram {
    //! A standalone guest RAM, mapped as the VMM maps it, for tests and benchmarks of the
    //! firmware without a VM. Its methods panic on ranges outside it.
    use super::GuestBytes;
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

    /// Guest RAM at guest address 0 (64 KiB unless made [`TestRam::with_size`]).
    pub struct TestRam(pub GuestMemoryMmap<AtomicBitmap>, usize);

    impl Default for TestRam {
        fn default() -> Self {
            Self::new()
        }
    }

    impl TestRam {
        pub fn new() -> Self {
            Self::with_size(64 << 10)
        }

        /// `size` bytes, a whole number of pages.
        pub fn with_size(size: usize) -> Self {
            Self(
                GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap(),
                size,
            )
        }

        /// `len` bytes at guest address `gpa`.
        pub fn at(&self, gpa: u64, len: usize) -> GuestBytes<'_> {
            self.0.get_slice(GuestAddress(gpa), len).unwrap()
        }

        /// All of it, for registering.
        pub fn all(&self) -> GuestBytes<'_> {
            self.at(0, self.1)
        }

        pub fn read(&self, gpa: u64, len: usize) -> Vec<u8> {
            let mut bytes = vec![0; len];
            self.0.read_slice(&mut bytes, GuestAddress(gpa)).unwrap();
            bytes
        }

        pub fn write(&self, gpa: u64, bytes: &[u8]) {
            self.0.write_slice(bytes, GuestAddress(gpa)).unwrap();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn bytes_must_lie_inside_one_registered_region() {
        let test_ram = test_ram::TestRam::new();
        let ram = &test_ram.0;
        let region = ram.find_region(GuestAddress(0)).unwrap();
        let mut registered = RegisteredRam::default();
        let page = test_ram.at(0x2000, 4096);
        assert_eq!(
            registered
                .check(Command::SendUpdateData, &page)
                .unwrap_err()
                .status(),
            Some(SevError::InvalidAddress),
            "nothing registered"
        );
        let (start, _) = host_range(&test_ram.at(0, 1));
        // Only the first half of RAM.
        registered.add(start, region.len() / 2).unwrap();
        assert_eq!(
            registered.check(Command::SendUpdateData, &page).unwrap(),
            start + 0x2000
        );
        let tail = test_ram.at(region.len() / 2 - 16, 32);
        assert_eq!(
            registered
                .check(Command::ReceiveUpdateData, &tail)
                .unwrap_err()
                .status(),
            Some(SevError::InvalidAddress),
            "crossing the region's end"
        );
        assert!(registered.add(start, 0).is_err());
        assert!(registered.add(u64::MAX - 1, 2).is_err());
    }

    #[test]
    fn payloads_are_whole_blocks_within_one_page() {
        let c = Command::SendUpdateData;
        check_page_payload(c, 0x1000, 4096).unwrap();
        check_page_payload(c, 0x1ff0, 16).unwrap();
        for (addr, len) in [(0x1000, 0), (0x1000, 40), (0x1008, 16), (0x1ff0, 32)] {
            assert_eq!(
                check_page_payload(c, addr, len).unwrap_err().status(),
                Some(SevError::InvalidLen),
                "{addr:#x}+{len}"
            );
        }
        check_launch_data(Command::LaunchUpdateData, 0x1ff0, 8192).unwrap();
        assert!(check_launch_data(Command::LaunchUpdateData, 0x1ff8, 16).is_err());
        assert!(check_blob(Command::SendStart, SEV_FW_BLOB_MAX_SIZE + 1).is_err());
        check_blob(Command::SendStart, SEV_FW_BLOB_MAX_SIZE).unwrap();
    }
}
