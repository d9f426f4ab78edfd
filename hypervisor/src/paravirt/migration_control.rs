//! `MSR_KVM_MIGRATION_CONTROL` (0x4b564d08) and Veil's extension to it.
//!
//! Upstream defines bit 0, `KVM_MIGRATION_READY`; Linux clears it for reboot, kexec, crash,
//! suspend and CPU offline and sets it again once it reports page states. Veil adds, only when
//! advertised in its CPUID leaf ([`super::VEIL_FEATURE_MIGRATION_NEVER`]):
//! - bit 1, `VEIL_MIGRATION_NEVER`: this guest must never be migrated; sticky until the guest is
//!   reset, and writing 0 later does not clear it;
//! - bits 15:8, the guest's reason code (when bit 1 is written), shown to the operator.
//!
//! Any other bit, or Veil's bits when not advertised, raises #GP as upstream.

/// `MSR_KVM_MIGRATION_CONTROL`.
pub const MSR_KVM_MIGRATION_CONTROL: u32 = 0x4b56_4d08;
/// `KVM_MIGRATION_READY`.
pub const KVM_MIGRATION_READY: u64 = 1 << 0;
/// Veil: never migrate this guest.
pub const VEIL_MIGRATION_NEVER: u64 = 1 << 1;
/// Veil: the reason code field.
pub const VEIL_MIGRATION_REASON_SHIFT: u32 = 8;
const VEIL_MIGRATION_REASON_MASK: u64 = 0xff << VEIL_MIGRATION_REASON_SHIFT;

/// A validated write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlWrite {
    pub ready: bool,
    /// `Some(code)` when the guest asks never to be migrated.
    pub never: Option<u8>,
}

/// Decodes a guest write; `None` means #GP.
pub fn decode_write(value: u64, extension_enabled: bool) -> Option<ControlWrite> {
    let allowed = if extension_enabled {
        KVM_MIGRATION_READY | VEIL_MIGRATION_NEVER | VEIL_MIGRATION_REASON_MASK
    } else {
        KVM_MIGRATION_READY
    };
    if value & !allowed != 0 {
        return None;
    }
    // A reason code without the never bit means nothing: refuse it rather than guess.
    if value & VEIL_MIGRATION_REASON_MASK != 0 && value & VEIL_MIGRATION_NEVER == 0 {
        return None;
    }
    Some(ControlWrite {
        ready: value & KVM_MIGRATION_READY != 0,
        never: (value & VEIL_MIGRATION_NEVER != 0)
            .then_some(((value & VEIL_MIGRATION_REASON_MASK) >> VEIL_MIGRATION_REASON_SHIFT) as u8),
    })
}

/// The value a read returns.
pub fn encode(ready: bool, never: Option<u8>) -> u64 {
    let mut value = if ready { KVM_MIGRATION_READY } else { 0 };
    if let Some(code) = never {
        value |= VEIL_MIGRATION_NEVER | (u64::from(code) << VEIL_MIGRATION_REASON_SHIFT);
    }
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_bits_only_without_the_extension() {
        assert_eq!(
            decode_write(1, false),
            Some(ControlWrite {
                ready: true,
                never: None
            })
        );
        assert_eq!(
            decode_write(0, false),
            Some(ControlWrite {
                ready: false,
                never: None
            })
        );
        assert_eq!(decode_write(2, false), None);
        assert_eq!(decode_write(1 << 63, true), None);
    }

    #[test]
    fn the_extension_carries_a_reason_code() {
        let w = decode_write(0x2a02, true).unwrap();
        assert_eq!(
            w,
            ControlWrite {
                ready: false,
                never: Some(0x2a)
            }
        );
        assert_eq!(encode(false, Some(0x2a)), 0x2a02);
        assert_eq!(
            decode_write(0x2a00, true),
            None,
            "code without the never bit"
        );
    }
}
