//! Kernel images (ELF with a PVH note, bzImage) as `veil run --kernel` loads them: any bytes.
//! Loading never panics, and whatever it reports writing lies inside guest RAM.
#![no_main]

use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use veil_hypervisor::boot::{load, BootConfig};
use veil_hypervisor::{GuestRam, MemoryConfig};
use vm_memory::{GuestAddress, GuestMemoryBackend};

fn ram() -> &'static GuestRam {
    static RAM: OnceLock<GuestRam> = OnceLock::new();
    RAM.get_or_init(|| {
        GuestRam::new(&MemoryConfig {
            size: 32 << 20,
            file: None,
        })
        .unwrap()
    })
}

fuzz_target!(|image: &[u8]| {
    // SAFETY: the name is a valid NUL-terminated string; the flags are valid for memfd_create.
    let fd = unsafe { libc::memfd_create(c"kernel".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0);
    // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
    let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.write_all(image).unwrap();
    let config = BootConfig {
        kernel: format!("/proc/self/fd/{}", file.as_raw_fd()).into(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
    };
    let memory = ram().memory();
    if let Ok(boot) = load(memory, &config) {
        for range in &boot.loaded {
            let end = range
                .start
                .0
                .checked_add(range.len)
                .expect("a range that wraps");
            assert!(
                range.len == 0 || memory.address_in_range(GuestAddress(end - 1)),
                "{range:?} leaves guest RAM"
            );
        }
    }
});
