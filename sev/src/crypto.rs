//! The SEV firmware's transport cryptography (AMD SEV API, publication 55766): the key
//! derivation, the wrapped-key session blob, the packet format of SEND/RECEIVE_UPDATE_DATA and
//! the launch measurement. Both the software model of the firmware and the tests that check it
//! against the `sev` crate use these.

use aes::cipher::{KeyIvInit, StreamCipher};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type Aes128Ctr = ctr::Ctr128BE<aes::Aes128>;
type HmacSha256 = Hmac<Sha256>;

/// A 128-bit key (TEK, TIK, KEK, KIK, master secret).
pub type Key = [u8; 16];

/// Errors opening SEV transport data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    /// A MAC did not verify: the data was altered or the keys differ.
    #[error("Integrity check failed")]
    BadMac,
    /// A length the format does not allow.
    #[error("Invalid length {0}")]
    BadLength(usize),
    /// A packet flag Veil does not support (compression).
    #[error("Unsupported packet flags {0:#x}")]
    BadFlags(u32),
}

/// NIST SP 800-108 KDF in counter mode with HMAC-SHA256, one block, truncated to 128 bits.
pub fn kdf(key: &[u8], label: &[u8], context: &[u8]) -> Key {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(&1u32.to_le_bytes());
    mac.update(label);
    mac.update(&[0]);
    mac.update(context);
    mac.update(&128u32.to_le_bytes());
    let out = mac.finalize().into_bytes();
    out[..16].try_into().expect("32-byte HMAC")
}

/// HMAC-SHA256 over the concatenation of `parts`.
pub fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time comparison of MACs.
fn mac_matches(expected: &[u8; 32], got: &[u8]) -> bool {
    bool::from(expected.ct_eq(got))
}

/// AES-128-CTR in place (encryption and decryption are the same).
pub fn aes_ctr(key: &Key, iv: &[u8; 16], data: &mut [u8]) {
    Aes128Ctr::new(key.into(), iv.into()).apply_keystream(data);
}

/// Transport keys of one guest's session.
#[derive(Clone, PartialEq, Eq)]
pub struct TransportKeys {
    pub tek: Key,
    pub tik: Key,
}

impl std::fmt::Debug for TransportKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TransportKeys { .. }")
    }
}

/// Key-encryption and key-integrity keys derived from an ECDH shared secret.
pub struct WrappingKeys {
    pub kek: Key,
    pub kik: Key,
}

impl WrappingKeys {
    /// `master = KDF(Z, "sev-master-secret", nonce)`, then KEK and KIK from the master secret.
    pub fn derive(shared_x: &[u8], nonce: &[u8; 16]) -> Self {
        let master = kdf(shared_x, b"sev-master-secret", nonce);
        Self {
            kek: kdf(&master, b"sev-kek", &[]),
            kik: kdf(&master, b"sev-kik", &[]),
        }
    }
}

/// The 128-byte session blob: `nonce | wrap_tk | wrap_iv | wrap_mac | policy_mac`.
pub const SESSION_BYTES: usize = 128;

/// Wraps transport keys for a peer (the guest owner at launch, the source firmware at send).
pub fn wrap_session(
    wrapping: &WrappingKeys,
    nonce: &[u8; 16],
    wrap_iv: &[u8; 16],
    keys: &TransportKeys,
    policy: u32,
) -> [u8; SESSION_BYTES] {
    let mut wrapped = [0u8; 32];
    wrapped[..16].copy_from_slice(&keys.tek);
    wrapped[16..].copy_from_slice(&keys.tik);
    aes_ctr(&wrapping.kek, wrap_iv, &mut wrapped);
    let wrap_mac = hmac(&wrapping.kik, &[&wrapped]);
    let policy_mac = hmac(&keys.tik, &[&policy.to_le_bytes()]);
    let mut blob = [0u8; SESSION_BYTES];
    blob[..16].copy_from_slice(nonce);
    blob[16..48].copy_from_slice(&wrapped);
    blob[48..64].copy_from_slice(wrap_iv);
    blob[64..96].copy_from_slice(&wrap_mac);
    blob[96..].copy_from_slice(&policy_mac);
    blob
}

/// The nonce of a session blob (needed to derive the wrapping keys).
pub fn session_nonce(blob: &[u8; SESSION_BYTES]) -> [u8; 16] {
    blob[..16].try_into().expect("16 bytes")
}

/// Checks `wrap_mac`, unwraps the transport keys, then checks `policy_mac` against `policy`.
pub fn unwrap_session(
    wrapping: &WrappingKeys,
    blob: &[u8; SESSION_BYTES],
    policy: u32,
) -> Result<TransportKeys, CryptoError> {
    let mut wrapped: [u8; 32] = blob[16..48].try_into().expect("32 bytes");
    let wrap_iv: [u8; 16] = blob[48..64].try_into().expect("16 bytes");
    if !mac_matches(&hmac(&wrapping.kik, &[&wrapped]), &blob[64..96]) {
        return Err(CryptoError::BadMac);
    }
    aes_ctr(&wrapping.kek, &wrap_iv, &mut wrapped);
    let keys = TransportKeys {
        tek: wrapped[..16].try_into().expect("16 bytes"),
        tik: wrapped[16..].try_into().expect("16 bytes"),
    };
    if !mac_matches(&hmac(&keys.tik, &[&policy.to_le_bytes()]), &blob[96..]) {
        return Err(CryptoError::BadMac);
    }
    Ok(keys)
}

/// MAC context bytes of the packet formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PacketContext {
    Secret = 0x01,
    Data = 0x02,
    Vmsa = 0x03,
}

/// The 52-byte packet header: `LE32 flags | iv[16] | mac[32]`.
pub const PACKET_HEADER_BYTES: usize = 52;
/// Packet flag: payload compressed (never produced; refused on receive).
pub const PACKET_FLAG_COMPRESSED: u32 = 1;
/// The most one packet may carry: a page.
pub const MAX_PACKET_BYTES: usize = 4096;

fn check_length(len: usize) -> Result<(), CryptoError> {
    if len == 0 || !len.is_multiple_of(16) || len > MAX_PACKET_BYTES {
        return Err(CryptoError::BadLength(len));
    }
    Ok(())
}

/// The packet MAC. A launch secret also binds the launch measurement (`bound`); data packets
/// bind nothing more.
fn packet_mac(
    tik: &Key,
    context: PacketContext,
    flags: u32,
    iv: &[u8; 16],
    ciphertext: &[u8],
    bound: &[u8],
) -> [u8; 32] {
    let len = (ciphertext.len() as u32).to_le_bytes();
    let flags = flags.to_le_bytes();
    hmac(
        tik,
        &[&[context as u8], &flags, iv, &len, &len, ciphertext, bound],
    )
}

/// Encrypts `data` in place and returns the header. `bound` is extra data the MAC covers (the
/// launch measurement for a secret; empty otherwise).
pub fn seal_packet(
    keys: &TransportKeys,
    context: PacketContext,
    iv: [u8; 16],
    data: &mut [u8],
    bound: &[u8],
) -> Result<[u8; PACKET_HEADER_BYTES], CryptoError> {
    check_length(data.len())?;
    aes_ctr(&keys.tek, &iv, data);
    let mac = packet_mac(&keys.tik, context, 0, &iv, data, bound);
    let mut header = [0u8; PACKET_HEADER_BYTES];
    header[4..20].copy_from_slice(&iv);
    header[20..].copy_from_slice(&mac);
    Ok(header)
}

/// Verifies the MAC and only then decrypts `data` in place.
pub fn open_packet(
    keys: &TransportKeys,
    context: PacketContext,
    header: &[u8; PACKET_HEADER_BYTES],
    data: &mut [u8],
    bound: &[u8],
) -> Result<(), CryptoError> {
    check_length(data.len())?;
    let flags = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    if flags != 0 {
        return Err(CryptoError::BadFlags(flags));
    }
    let iv: [u8; 16] = header[4..20].try_into().expect("16 bytes");
    if !mac_matches(
        &packet_mac(&keys.tik, context, flags, &iv, data, bound),
        &header[20..],
    ) {
        return Err(CryptoError::BadMac);
    }
    aes_ctr(&keys.tek, &iv, data);
    Ok(())
}

/// Verifies the MAC over `ciphertext` and only then decrypts it into `dest` (same length):
/// `dest` is untouched when the packet does not verify.
pub fn open_packet_into(
    keys: &TransportKeys,
    context: PacketContext,
    header: &[u8; PACKET_HEADER_BYTES],
    ciphertext: &[u8],
    dest: &mut [u8],
    bound: &[u8],
) -> Result<(), CryptoError> {
    check_length(ciphertext.len())?;
    if dest.len() != ciphertext.len() {
        return Err(CryptoError::BadLength(dest.len()));
    }
    let flags = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    if flags != 0 {
        return Err(CryptoError::BadFlags(flags));
    }
    let iv: [u8; 16] = header[4..20].try_into().expect("16 bytes");
    if !mac_matches(
        &packet_mac(&keys.tik, context, flags, &iv, ciphertext, bound),
        &header[20..],
    ) {
        return Err(CryptoError::BadMac);
    }
    dest.copy_from_slice(ciphertext);
    aes_ctr(&keys.tek, &iv, dest);
    Ok(())
}

/// The launch measurement:
/// `HMAC(TIK, 0x04 | api_major | api_minor | build | LE32 policy | digest | mnonce)`.
pub fn launch_measurement(
    tik: &Key,
    api: (u8, u8),
    build: u8,
    policy: u32,
    digest: &[u8; 32],
    mnonce: &[u8; 16],
) -> [u8; 32] {
    hmac(
        tik,
        &[
            &[0x04, api.0, api.1, build],
            &policy.to_le_bytes(),
            digest,
            mnonce,
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Digest;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn kdf_matches_the_reference_vector() {
        assert_eq!(
            kdf(&[0; 16], b"sev-master-secret", &[0; 16]).to_vec(),
            hex("ab4d269fcc62bedb4511d56c386ce706")
        );
    }

    #[test]
    fn hmac_matches_the_reference_vector() {
        assert_eq!(
            hmac(&[0; 16], &[&[0; 4]]).to_vec(),
            hex("aa7855e13839dd767cd5da7c1ff5036540c9264b7a803029315e55375287b4af")
        );
    }

    #[test]
    fn measurement_matches_the_reference_vector() {
        let tik: Key = hex("66320db73158a35a255d051758e95ed4").try_into().unwrap();
        let mnonce: [u8; 16] = hex("4fbe0bedbad6c86ae8f68971d103e554").try_into().unwrap();
        let digest: [u8; 32] = sha2::Sha256::digest(b"").into();
        assert_eq!(
            launch_measurement(&tik, (0, 18), 0x0f, 0, &digest, &mnonce).to_vec(),
            hex("6faab2daae389bcd3405a05d6cafe33c0414f7bedd0bae19ba5f38b7fd1664ea")
        );
    }

    fn keys() -> TransportKeys {
        TransportKeys {
            tek: [7; 16],
            tik: [9; 16],
        }
    }

    #[test]
    fn sessions_unwrap_only_with_the_right_keys_and_policy() {
        let wrapping = WrappingKeys::derive(&[3; 48], &[1; 16]);
        let blob = wrap_session(&wrapping, &[1; 16], &[2; 16], &keys(), 0x5);
        assert_eq!(unwrap_session(&wrapping, &blob, 0x5).unwrap(), keys());
        assert_eq!(
            unwrap_session(&wrapping, &blob, 0x1),
            Err(CryptoError::BadMac)
        );
        let other = WrappingKeys::derive(&[4; 48], &[1; 16]);
        assert_eq!(unwrap_session(&other, &blob, 0x5), Err(CryptoError::BadMac));
        for i in 16..SESSION_BYTES {
            let mut bad = blob;
            bad[i] ^= 1;
            assert!(unwrap_session(&wrapping, &bad, 0x5).is_err(), "byte {i}");
        }
    }

    #[test]
    fn packets_round_trip_and_reject_any_flipped_byte() {
        let plain: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let mut data = plain.clone();
        let header = seal_packet(&keys(), PacketContext::Data, [5; 16], &mut data, &[]).unwrap();
        assert_ne!(data, plain);
        let mut opened = data.clone();
        open_packet(&keys(), PacketContext::Data, &header, &mut opened, &[]).unwrap();
        assert_eq!(opened, plain);
        for i in 0..PACKET_HEADER_BYTES {
            let mut bad = header;
            bad[i] ^= 0x80;
            let mut d = data.clone();
            assert!(
                open_packet(&keys(), PacketContext::Data, &bad, &mut d, &[]).is_err(),
                "header byte {i}"
            );
            assert_eq!(d, data, "nothing decrypted on failure");
        }
        for i in (0..4096).step_by(97) {
            let mut d = data.clone();
            d[i] ^= 1;
            assert_eq!(
                open_packet(&keys(), PacketContext::Data, &header, &mut d, &[]),
                Err(CryptoError::BadMac)
            );
        }
        let mut d = data.clone();
        assert!(
            open_packet(&keys(), PacketContext::Vmsa, &header, &mut d, &[]).is_err(),
            "context is bound"
        );
        let mut d = data.clone();
        assert!(
            open_packet(&keys(), PacketContext::Data, &header, &mut d, b"more").is_err(),
            "bound data counts"
        );
    }

    #[test]
    fn packet_lengths_are_checked() {
        for len in [0, 15, 4112] {
            let mut d = vec![0; len];
            assert_eq!(
                seal_packet(&keys(), PacketContext::Data, [0; 16], &mut d, &[]),
                Err(CryptoError::BadLength(len))
            );
        }
    }
}
