//! The guest policy the owner sets at launch (AMD SEV API, publication 55766, section 3).

use serde::{Deserialize, Serialize};

/// A guest policy: bits 0-5 flags, 23:16 minimum API major, 31:24 minimum API minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GuestPolicy(pub u32);

impl GuestPolicy {
    /// Debugging the guest is forbidden.
    pub const NODBG: u32 = 1 << 0;
    /// Sharing keys with other guests is forbidden.
    pub const NOKS: u32 = 1 << 1;
    /// SEV-ES is required.
    pub const ES: u32 = 1 << 2;
    /// The guest may not be sent to another platform.
    pub const NOSEND: u32 = 1 << 3;
    /// The guest may not be sent outside the domain.
    pub const DOMAIN: u32 = 1 << 4;
    /// The guest may only be sent to SEV platforms (whose chain is then verified).
    pub const SEV: u32 = 1 << 5;
    /// Bits with no meaning in this API version.
    const RESERVED: u32 = 0x0000_ffc0;

    /// Whether `bit` (one of the constants) is set.
    pub fn has(self, bit: u32) -> bool {
        self.0 & bit != 0
    }

    /// The minimum firmware API version the policy demands.
    pub fn min_api(self) -> (u8, u8) {
        ((self.0 >> 16) as u8, (self.0 >> 24) as u8)
    }

    /// Whether a firmware can accept this policy at all.
    pub fn is_valid(self) -> bool {
        self.0 & Self::RESERVED == 0
    }
}

impl std::fmt::Display for GuestPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#x}", self.0)?;
        let names = [
            (Self::NODBG, "NODBG"),
            (Self::NOKS, "NOKS"),
            (Self::ES, "ES"),
            (Self::NOSEND, "NOSEND"),
            (Self::DOMAIN, "DOMAIN"),
            (Self::SEV, "SEV"),
        ];
        let set: Vec<&str> = names
            .iter()
            .filter(|(b, _)| self.has(*b))
            .map(|(_, n)| *n)
            .collect();
        if !set.is_empty() {
            write!(f, " ({})", set.join(", "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_and_versions_decode() {
        let p = GuestPolicy(0x1200_0009);
        assert!(p.has(GuestPolicy::NODBG) && p.has(GuestPolicy::NOSEND));
        assert!(!p.has(GuestPolicy::ES));
        assert_eq!(p.min_api(), (0, 0x12));
        assert_eq!(p.to_string(), "0x12000009 (NODBG, NOSEND)");
        assert!(!GuestPolicy(1 << 6).is_valid());
    }
}
