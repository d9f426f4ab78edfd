//! KVM_HC_MAP_GPA_RANGE as an SEV guest makes it, any arguments, in any sequence, against the
//! page-state map. The map always equals a simple model (a set of shared gfns) that applies
//! exactly the requests `map_gpa_range::validate` accepts; a refused request changes nothing
//! and returns -EINVAL.
#![no_main]

use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use veil_hypervisor::paravirt::map_gpa_range::{validate, HC_EINVAL, HC_SUCCESS};
use veil_hypervisor::paravirt::{PageState, Paravirt};
use veil_hypervisor::{GuestRam, MemoryConfig};

/// 16 MiB of guest RAM: 4096 gfns.
const GFNS: u64 = 4096;

#[derive(Arbitrary, Debug)]
struct Call {
    /// GPA: small values land in RAM, the top bits reach far outside it.
    gpa: u64,
    pages: u64,
    attributes: u64,
    /// Keep the call mostly in RAM (the interesting case) unless set.
    wild: bool,
}

fn paravirt() -> &'static Paravirt {
    static PARAVIRT: OnceLock<Paravirt> = OnceLock::new();
    PARAVIRT.get_or_init(|| {
        let ram = GuestRam::new(&MemoryConfig {
            size: GFNS << 12,
            file: None,
        })
        .unwrap();
        Paravirt::new(Arc::new(ram), true, true)
    })
}

fuzz_target!(|calls: Vec<Call>| {
    let paravirt = paravirt();
    paravirt.reset_guest();
    let ram: Vec<std::ops::Range<u64>> = vec![0..GFNS];
    let mut shared = BTreeSet::new();
    for call in calls.iter().take(64) {
        let (a0, a1, a2) = if call.wild {
            (call.gpa, call.pages, call.attributes)
        } else {
            (
                (call.gpa % (GFNS + 8)) << 12 | (call.gpa >> 60),
                call.pages % 300,
                call.attributes & 0x1f,
            )
        };
        let expected = validate(a0, a1, a2, &ram);
        let result = paravirt.map_gpa_range(0, a0, a1, a2);
        match &expected {
            Ok(request) => {
                assert_eq!(result, HC_SUCCESS);
                for gfn in request.gfns.clone() {
                    match request.state {
                        PageState::Shared => shared.insert(gfn),
                        PageState::Private => shared.remove(&gfn),
                    };
                }
            }
            Err(_) => assert_eq!(result, HC_EINVAL),
        }
        let states = paravirt.page_states();
        let map = states.as_ref().expect("an encrypted guest has a map");
        assert_eq!(map.shared_pages(), shared.len() as u64);
        let from_map: BTreeSet<u64> = map.shared_ranges().into_iter().flatten().collect();
        assert_eq!(
            from_map, shared,
            "after {a0:#x} {a1:#x} {a2:#x}: {expected:?}"
        );
        for gfn in [0, GFNS / 2, GFNS - 1] {
            assert_eq!(map.is_private(gfn), !shared.contains(&gfn));
        }
    }
});
