//! Guest writes to MSR_KVM_MIGRATION_CONTROL, any values in any order, with and without Veil's
//! extension. A write is taken exactly when `decode_write` accepts it; a refused one (#GP)
//! changes nothing; reads always return the model's value (ready as last written, the
//! never-migrate bit and its first reason code sticky until reset).
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use veil_hypervisor::paravirt::migration_control::{
    decode_write, encode, MSR_KVM_MIGRATION_CONTROL,
};
use veil_hypervisor::paravirt::Paravirt;
use veil_hypervisor::{GuestRam, MemoryConfig, MsrHandler};

fn paravirt(extension: bool) -> &'static Paravirt {
    static PLAIN: OnceLock<Paravirt> = OnceLock::new();
    static EXTENDED: OnceLock<Paravirt> = OnceLock::new();
    let cell = if extension { &EXTENDED } else { &PLAIN };
    cell.get_or_init(|| {
        let ram = GuestRam::new(&MemoryConfig {
            size: 16 << 20,
            file: None,
        })
        .unwrap();
        Paravirt::new(Arc::new(ram), true, extension)
    })
}

fuzz_target!(|input: (bool, Vec<u64>)| {
    let (extension, writes) = input;
    let paravirt = paravirt(extension);
    paravirt.reset_guest();
    let mut ready = false;
    let mut never: Option<u8> = None;
    assert_eq!(
        paravirt.read(0, MSR_KVM_MIGRATION_CONTROL),
        Some(encode(ready, never))
    );
    for value in writes.into_iter().take(64) {
        let decoded = decode_write(value, extension);
        let taken = paravirt.write(0, MSR_KVM_MIGRATION_CONTROL, value);
        assert_eq!(taken, decoded.is_some(), "value {value:#x}");
        if let Some(write) = decoded {
            ready = write.ready;
            if let Some(code) = write.never {
                never.get_or_insert(code);
            }
        }
        assert_eq!(
            paravirt.read(0, MSR_KVM_MIGRATION_CONTROL),
            Some(encode(ready, never)),
            "after {value:#x}"
        );
        if !extension {
            assert_eq!(never, None);
        }
    }
    // Another MSR is not this handler's to take.
    assert!(!paravirt.write(0, MSR_KVM_MIGRATION_CONTROL + 1, 0));
});
