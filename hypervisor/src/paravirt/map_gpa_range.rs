//! `KVM_HC_MAP_GPA_RANGE` (hypercall 12): the guest reports pages turning private or shared.
//!
//! Arguments as Documentation/virt/kvm/x86/hypercalls.rst defines them: a0 = GPA (4 KiB
//! aligned), a1 = number of 4 KiB pages (non-zero, no overflow), a2 = attributes (bits 3:0 page
//! size 0/1/2, bit 4 encrypted, the rest reserved). KVM checks alignment, length and overflow
//! before exiting to userspace; the fallback transport does not, so everything is checked here.

use std::ops::Range;

use super::page_state::PageState;

/// `KVM_HC_MAP_GPA_RANGE`.
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;
/// `KVM_MAP_GPA_RANGE_ENCRYPTED`.
pub const KVM_MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;
/// Bits 3:0: `KVM_MAP_GPA_RANGE_PAGE_SZ_4K` = 0, `_2M` = 1, `_1G` = 2.
const PAGE_SIZE_MASK: u64 = 0xf;
const PAGE_SIZE_MAX: u64 = 2;
const RESERVED_ATTRIBUTES: u64 = !(PAGE_SIZE_MASK | KVM_MAP_GPA_RANGE_ENCRYPTED);

/// 0: success.
pub const HC_SUCCESS: u64 = 0;
/// -KVM_EINVAL.
pub const HC_EINVAL: u64 = (-22i64) as u64;
/// -KVM_ENOSYS.
pub const HC_ENOSYS: u64 = (-1000i64) as u64;
/// -KVM_EPERM.
pub const HC_EPERM: u64 = (-1i64) as u64;

/// A validated request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapGpaRange {
    pub gfns: Range<u64>,
    pub state: PageState,
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapGpaRangeError {
    Unaligned,
    ZeroPages,
    Overflow,
    /// Reserved attribute bits or an unknown page size.
    BadAttributes,
    /// Not (entirely) guest RAM; `touches_ram` when part of it is.
    OutsideRam {
        touches_ram: bool,
    },
}

impl MapGpaRangeError {
    /// Whether the guest may have changed pages Veil did not record. KVM refuses alignment,
    /// length and overflow errors itself on real hosts, so userspace never knows of those; it
    /// does see bad attributes and ranges that leave RAM.
    pub fn leaves_map_untrusted(&self) -> bool {
        matches!(
            self,
            MapGpaRangeError::BadAttributes | MapGpaRangeError::OutsideRam { touches_ram: true }
        )
    }
}

impl std::fmt::Display for MapGpaRangeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MapGpaRangeError::Unaligned => "GPA not 4 KiB aligned",
            MapGpaRangeError::ZeroPages => "zero pages",
            MapGpaRangeError::Overflow => "range overflows",
            MapGpaRangeError::BadAttributes => "reserved attribute bits or unknown page size",
            MapGpaRangeError::OutsideRam { .. } => "range is not guest RAM",
        })
    }
}

/// Checks the arguments against the RAM GFN ranges (sorted, disjoint).
pub fn validate(
    a0: u64,
    a1: u64,
    a2: u64,
    ram: &[Range<u64>],
) -> Result<MapGpaRange, MapGpaRangeError> {
    if a0 & 0xfff != 0 {
        return Err(MapGpaRangeError::Unaligned);
    }
    if a1 == 0 {
        return Err(MapGpaRangeError::ZeroPages);
    }
    let start = a0 >> 12;
    let end = start.checked_add(a1).ok_or(MapGpaRangeError::Overflow)?;
    // GPAs are at most 52 bits wide.
    if end > 1 << 40 {
        return Err(MapGpaRangeError::Overflow);
    }
    let inside = ram.iter().any(|r| r.start <= start && end <= r.end);
    if !inside {
        let touches_ram = ram.iter().any(|r| r.start < end && start < r.end);
        return Err(MapGpaRangeError::OutsideRam { touches_ram });
    }
    if a2 & RESERVED_ATTRIBUTES != 0 || a2 & PAGE_SIZE_MASK > PAGE_SIZE_MAX {
        return Err(MapGpaRangeError::BadAttributes);
    }
    let state = if a2 & KVM_MAP_GPA_RANGE_ENCRYPTED != 0 {
        PageState::Private
    } else {
        PageState::Shared
    };
    Ok(MapGpaRange {
        gfns: start..end,
        state,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: [Range<u64>; 2] = [0..0xc0000, 0x100000..0x140000];

    #[test]
    fn valid_requests_become_gfn_ranges() {
        assert_eq!(
            validate(0x20_0000, 512, 1, &RAM),
            Ok(MapGpaRange {
                gfns: 0x200..0x400,
                state: PageState::Shared
            })
        );
        assert_eq!(
            validate(0x1_0000_0000, 1, 0x10, &RAM).unwrap().state,
            PageState::Private
        );
    }

    #[test]
    fn each_bad_argument_is_refused() {
        use MapGpaRangeError::*;
        assert_eq!(validate(0x1001, 1, 0, &RAM), Err(Unaligned));
        assert_eq!(validate(0x1000, 0, 0, &RAM), Err(ZeroPages));
        assert_eq!(validate(0xffff_ffff_ffff_f000, 2, 0, &RAM), Err(Overflow));
        assert_eq!(validate(0x1000, u64::MAX, 0, &RAM), Err(Overflow));
        assert_eq!(validate(0x1000, 1, 1 << 5, &RAM), Err(BadAttributes));
        assert_eq!(validate(0x1000, 1, 3, &RAM), Err(BadAttributes));
        // Straddles the end of low RAM into the MMIO hole: refused whole.
        assert_eq!(
            validate(0xbfff_f000, 2, 0, &RAM),
            Err(OutsideRam { touches_ram: true })
        );
        assert_eq!(
            validate(0xd000_0000, 1, 0, &RAM),
            Err(OutsideRam { touches_ram: false })
        );
        assert_eq!(
            validate(0x1_4000_0000, 1, 0, &RAM),
            Err(OutsideRam { touches_ram: false })
        );
    }

    #[test]
    fn only_errors_the_host_sees_on_real_kvm_taint_the_map() {
        assert!(!MapGpaRangeError::Unaligned.leaves_map_untrusted());
        assert!(MapGpaRangeError::BadAttributes.leaves_map_untrusted());
        assert!(MapGpaRangeError::OutsideRam { touches_ram: true }.leaves_map_untrusted());
        assert!(!MapGpaRangeError::OutsideRam { touches_ram: false }.leaves_map_untrusted());
    }
}
