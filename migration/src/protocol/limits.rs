//! The most a peer may make this side read, hold or believe.
//!
//! Every length and count that arrives is compared with these numbers before anything is
//! allocated or used. They are part of the protocol: a sender that exceeds one is broken.

use veil_sev::crypto::SESSION_BYTES;

/// The guest page size: migration moves 4 KiB pages.
pub const PAGE_SIZE: usize = 4096;

/// Bytes of an SEV-format certificate such as the PDH (AMD SEV API, publication 55766,
/// appendix C.1: 0x824 bytes).
pub const SEV_CERT_BYTES: usize = 0x824;

/// The largest Hello or HelloReply payload.
pub const MAX_HANDSHAKE_BYTES: u64 = 64 * 1024;
/// The most RAM regions a VM shape may list.
pub const MAX_REGIONS: usize = 64;
/// The most vCPUs a VM shape may declare (Veil's own bound).
pub const MAX_VCPUS: u32 = 1024;
/// The most CPUID entries a VM shape may list (`KVM_MAX_CPUID_ENTRIES` in Linux's
/// `arch/x86/include/asm/kvm_host.h`).
pub const MAX_CPUID_ENTRIES: usize = 256;
/// The end of the guest-physical address space: 52 bits, the architectural MAXPHYADDR limit
/// (AMD64 Architecture Programmer's Manual vol. 2, 5.3.3).
pub const GPA_LIMIT: u64 = 1 << 52;

/// The longest reason an Error, Cancel or refused HelloReply may carry.
pub const MAX_REASON_BYTES: usize = 4096;
/// The longest SEV certificate chain a HelloReply may carry (PDH, PEK, OCA, CEK are
/// 0x824 bytes each; ASK and ARK under 2 KiB each).
pub const MAX_SEV_CHAIN_BYTES: usize = 32 * 1024;

/// The exact SevStart payload: policy, PDH certificate, session blob.
pub const SEV_START_BYTES: u64 = (4 + SEV_CERT_BYTES + SESSION_BYTES) as u64;

/// The largest memory-chunk payload.
pub const MAX_CHUNK_BYTES: u64 = 4 * 1024 * 1024;
/// The most pages one chunk may carry (bounds the decoded form of a chunk of zero pages).
pub const MAX_CHUNK_PAGES: usize = 4096;

/// The most connections one migration may use (feature `STREAMS`).
pub const MAX_STREAMS: usize = 16;

/// The largest final-state payload.
pub const MAX_STATE_BYTES: u64 = 64 * 1024 * 1024;

/// The largest payload of any message: what a reader may ever have to hold.
pub const MAX_PAYLOAD_BYTES: u64 = MAX_STATE_BYTES;
