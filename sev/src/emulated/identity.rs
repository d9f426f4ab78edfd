//! The emulated platform's identity: the SEV key hierarchy and its certificate chain, in the
//! formats real hardware exports, so that guest owners and migration peers (through the `sev`
//! crate) accept it as they would a real platform's.
//!
//! ```text
//!   ARK   RSA-2048, AMD format, self-signed  ┐ the emulated "AMD": like AMD's, these private
//!    └─ ASK   RSA-2048, AMD format           ┘ keys never reach the platform (they live only
//!        └─ CEK   ECDSA P-384, SEV format      inside `generate`)
//!            └─ PEK   ECDSA P-384, signed by the CEK and by
//!                │    the OCA  ECDSA P-384, self-signed (the platform owns itself)
//!                └─ PDH   ECDH P-384: the key owners and peers agree session keys with
//! ```
//!
//! The formats are those of the AMD SEV API (publication 55766) as the `sev` crate decodes and
//! verifies them (`certs::sev::ca::cert::v1` and `certs::sev::sev::cert::v1`):
//!
//! - **AMD format** (ARK, ASK): `LE32 version (1) | key_id[16] | certifying_id[16] |
//!   LE32 usage | reserved[16] | LE32 pubexp_bits | LE32 modulus_bits | pubexp | modulus |
//!   signature`, the three numbers little-endian, each `modulus_bits / 8` bytes. The signature is
//!   RSASSA-PSS by the ARK over everything before it; 2048-bit keys use SHA-256 (for digest,
//!   MGF1 and a 32-byte salt), 4096-bit keys SHA-384. A certificate names its signer by
//!   `certifying_id` = the ARK's `key_id`.
//! - **SEV format** (CEK, OCA, PEK, PDH, 0x824 bytes): a body of 0x414 bytes (version, firmware
//!   API version, usage, algorithm, public key) and two signature slots of `LE32 usage |
//!   LE32 algorithm | signature[512]`. The `sev` crate generates and signs these itself, except
//!   the CEK's signature by the ASK, an RSA key it cannot hold: that one is written here.
//!
//! A peer trusts an emulated platform by configuring its ARK as a root ([`verify_chain`]);
//! chains from hardware end in AMD's ARKs ([`amd_arks`]).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use openssl::bn::BigNumRef;
use openssl::derive::Deriver;
use openssl::ec::{EcGroup, EcKey};
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private, Public};
use openssl::rsa::{Padding, Rsa};
use openssl::sign::RsaPssSaltlen;
use sev::certs::sev::sev::{self as sev_certs, Certificate, Usage};
use sev::certs::sev::{ca, Chain, PrivateKey, Signer, Verifiable};
use sev::parser::{Decoder, Encoder};

/// Both certificate formats are version 1.
const CERT_VERSION: u32 = 1;
/// Key usage of the AMD root key (SEV API key usage table; `sev::certs::sev::Usage::ARK`).
const USAGE_ARK: u32 = 0x0000;
/// Key usage of the AMD signing key (`sev::certs::sev::Usage::ASK`).
const USAGE_ASK: u32 = 0x0013;
/// SEV-format algorithm: RSA signature with SHA-256 (`certs::sev::sev::cert::v1::algo`).
const ALGO_RSA_SHA256: u32 = 0x0001;
/// SEV-format algorithms of ECDH keys.
const ALGO_ECDH_SHA256: u32 = 0x0003;
const ALGO_ECDH_SHA384: u32 = 0x0103;
/// SEV-format curve id of NIST P-384.
const CURVE_P384: u32 = 2;

/// The emulated ARK's and ASK's RSA size: 2048 bits, as AMD's Naples ARK and ASK, which the
/// `sev` crate pairs with SHA-256. Generating two such keys takes a fraction of a second.
const AMD_RSA_BITS: u32 = 2048;
const AMD_RSA_BYTES: usize = AMD_RSA_BITS as usize / 8;

/// SEV format: the signed body, then the two signature slots.
const SEV_BODY_BYTES: usize = 0x414;
const SEV_SIG_SLOT_BYTES: usize = 0x208;
/// SEV format: offsets in the body of the key's algorithm and, for an ECC key, its curve and
/// its coordinates (little-endian, in 72-byte fields).
const SEV_KEY_ALGO: usize = 0x0c;
const SEV_ECC_CURVE: usize = 0x10;
const SEV_ECC_QX: usize = 0x14;
const SEV_ECC_QY: usize = 0x5c;
const P384_BYTES: usize = 48;

/// The full chain, in the layout of `sevctl export --full` (PDH, PEK, OCA, CEK, ASK, ARK).
const CHAIN_FILE: &str = "chain.cert";
/// The platform's private keys, DER as OpenSSL writes them (the `sev` crate's encoding).
const CEK_FILE: &str = "cek.key";
const OCA_FILE: &str = "oca.key";
const PEK_FILE: &str = "pek.key";
const PDH_FILE: &str = "pdh.key";
/// Everything a state directory holds, in the order it is written: the chain last.
const STATE_FILES: [&str; 5] = [CEK_FILE, OCA_FILE, PEK_FILE, PDH_FILE, CHAIN_FILE];

/// Errors creating, loading or using a platform identity.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Generating a key or signing a certificate failed.
    #[error("Could not issue the {cert} certificate")]
    Issue {
        cert: &'static str,
        #[source]
        source: io::Error,
    },
    /// A chain's signatures do not verify.
    #[error("The certificate chain does not verify")]
    ChainInvalid(#[source] io::Error),
    /// A chain verifies but ends in an ARK the caller does not trust.
    #[error("The certificate chain's ARK is not a trusted root")]
    UntrustedRoot,
    /// A peer's certificate holds no key this platform can agree a secret with.
    #[error("The peer's certificate holds no usable ECDH P-384 key")]
    PeerKey(#[source] io::Error),
    /// ECDH with the peer's key failed.
    #[error("Key agreement with the peer failed")]
    KeyAgreement(#[source] ErrorStack),
    /// The state directory could not be created.
    #[error("Could not create {}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("Could not write {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A state file does not hold what this module wrote.
    #[error("{} is corrupt", path.display())]
    Corrupt {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Some state files exist, this one does not: never silently replaced by a new identity.
    #[error("{} is missing from a partial identity", path.display())]
    Missing { path: PathBuf },
    /// A private key file other users may read.
    #[error("{} is accessible to other users (mode {mode:o})", path.display())]
    Permissions { path: PathBuf, mode: u32 },
    /// One of the `sev` crate's built-in AMD roots did not decode.
    #[error("Could not decode AMD's {generation} ARK")]
    BuiltinArk {
        generation: &'static str,
        #[source]
        source: io::Error,
    },
}

/// A platform's SEV identity: its certificate chain and the private keys the firmware holds
/// (CEK, OCA, PEK, PDH).
pub struct PlatformIdentity {
    chain: Chain,
    chain_bytes: Vec<u8>,
    cek: PrivateKey<Usage>,
    oca: PrivateKey<Usage>,
    pek: PrivateKey<Usage>,
    /// Kept in two forms: the `sev` crate's for saving, OpenSSL's for ECDH (the crate's
    /// `PrivateKey::derive` is private to it).
    pdh: PrivateKey<Usage>,
    pdh_ecdh: PKey<Private>,
}

impl std::fmt::Debug for PlatformIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The PDH's type and fingerprint; never key material.
        write!(f, "PlatformIdentity {{ pdh: {} }}", self.pdh())
    }
}

impl PlatformIdentity {
    /// Fresh keys: ARK (RSA, AMD format, self-signed), ASK (RSA, signed by ARK), CEK (ECDSA
    /// P-384, SEV format, signed by ASK), OCA (self-signed, SEV format), PEK (signed by CEK and
    /// OCA), PDH (ECDH P-384, signed by PEK). The ARK's and ASK's private keys are dropped once
    /// they have signed.
    pub fn generate() -> Result<Self, IdentityError> {
        let ark_key = rsa_key().map_err(issue("ARK"))?;
        let ask_key = rsa_key().map_err(issue("ASK"))?;
        let ark_id = key_id().map_err(issue("ARK"))?;
        let ask_id = key_id().map_err(issue("ASK"))?;
        let ark =
            amd_certificate(USAGE_ARK, ark_id, ark_id, &ark_key, &ark_key).map_err(issue("ARK"))?;
        let ask =
            amd_certificate(USAGE_ASK, ask_id, ark_id, &ask_key, &ark_key).map_err(issue("ASK"))?;

        let (cek, cek_key) = Certificate::generate(Usage::CEK).map_err(issue("CEK"))?;
        let cek = sign_with_ask(&cek, &ask_key).map_err(issue("CEK"))?;

        let (mut oca, oca_key) = Certificate::generate(Usage::OCA).map_err(issue("OCA"))?;
        oca_key.sign(&mut oca).map_err(issue("OCA"))?;

        let (mut pek, pek_key) = Certificate::generate(Usage::PEK).map_err(issue("PEK"))?;
        oca_key.sign(&mut pek).map_err(issue("PEK"))?;
        cek_key.sign(&mut pek).map_err(issue("PEK"))?;

        let (mut pdh, pdh_key) = Certificate::generate(Usage::PDH).map_err(issue("PDH"))?;
        pek_key.sign(&mut pdh).map_err(issue("PDH"))?;

        let chain = Chain {
            ca: ca::Chain { ask, ark },
            sev: sev_certs::Chain { pdh, pek, oca, cek },
        };
        // What is handed out must be what the `sev` crate accepts: check it once here.
        (&chain).verify().map_err(IdentityError::ChainInvalid)?;
        let chain_bytes = encode(&chain).map_err(issue("chain"))?;
        let pdh_ecdh = openssl_key(&pdh_key).map_err(issue("PDH"))?;
        Ok(Self {
            chain,
            chain_bytes,
            cek: cek_key,
            oca: oca_key,
            pek: pek_key,
            pdh: pdh_key,
            pdh_ecdh,
        })
    }

    /// Loads the identity from `dir`, or generates and saves it there (files mode 0600, dir 0700).
    /// A corrupt or partial state dir is an error that names the file, never a silent regenerate.
    ///
    /// The directory holds `chain.cert` (the full chain, the layout of `sevctl export --full`)
    /// and the firmware's private keys `cek.key`, `oca.key`, `pek.key`, `pdh.key` (DER). Loading
    /// checks that the chain verifies, that each key is its certificate's and that no other user
    /// may read a key. The chain is written last, each file through a temporary name, so an
    /// interrupted save leaves a partial directory (reported as [`IdentityError::Missing`]),
    /// never a mix of two identities.
    pub fn load_or_create(dir: &Path) -> Result<Self, IdentityError> {
        let mut missing = Vec::new();
        for name in STATE_FILES {
            let path = dir.join(name);
            let exists = path.try_exists().map_err(|source| IdentityError::Read {
                path: path.clone(),
                source,
            })?;
            if !exists {
                missing.push(path);
            }
        }
        if missing.is_empty() {
            return Self::load(dir);
        }
        if missing.len() < STATE_FILES.len() {
            return Err(IdentityError::Missing {
                path: missing.swap_remove(0),
            });
        }
        let identity = Self::generate()?;
        identity.save(dir)?;
        Ok(identity)
    }

    /// The full chain (as `sevctl export --full` writes it: `sev::certs::sev::Chain` encoding).
    pub fn chain(&self) -> &Chain {
        &self.chain
    }

    /// An owned copy of the chain, as the firmware hands it out (`Chain` is not `Clone`).
    pub fn export_chain(&self) -> Chain {
        Chain {
            ca: ca::Chain {
                ask: self.chain.ca.ask,
                ark: self.chain.ca.ark,
            },
            sev: sev_certs::Chain {
                pdh: self.chain.sev.pdh,
                pek: self.chain.sev.pek,
                oca: self.chain.sev.oca,
                cek: self.chain.sev.cek,
            },
        }
    }

    /// The chain's encoding (the contents of `chain.cert`).
    pub fn chain_bytes(&self) -> Vec<u8> {
        self.chain_bytes.clone()
    }

    /// This platform's PDH certificate.
    pub fn pdh(&self) -> &Certificate {
        &self.chain.sev.pdh
    }

    /// The ARK certificate, which a peer configures as a trusted root for emulated platforms.
    pub fn ark(&self) -> &ca::Certificate {
        &self.chain.ca.ark
    }

    /// ECDH between this platform's PDH private key and `peer`'s public key (a SEV-format
    /// certificate holding an ECDH P-384 key, e.g. the guest owner's or a source platform's
    /// PDH): Z, the 48-byte big-endian x-coordinate, as the firmware uses it in its KDF.
    pub fn shared_secret(&self, peer: &Certificate) -> Result<Vec<u8>, IdentityError> {
        let peer = ecdh_public_key(peer).map_err(IdentityError::PeerKey)?;
        let mut deriver = Deriver::new(&self.pdh_ecdh).map_err(IdentityError::KeyAgreement)?;
        deriver
            .set_peer(&peer)
            .map_err(IdentityError::KeyAgreement)?;
        deriver.derive_to_vec().map_err(IdentityError::KeyAgreement)
    }

    /// Writes the state files into `dir`, creating it.
    fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        let create_error = |source| IdentityError::CreateDir {
            path: dir.to_owned(),
            source,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(create_error)?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(create_error)?;

        let keys = [
            (CEK_FILE, &self.cek),
            (OCA_FILE, &self.oca),
            (PEK_FILE, &self.pek),
            (PDH_FILE, &self.pdh),
        ];
        for (name, key) in keys {
            let path = dir.join(name);
            let der = encode(key).map_err(|source| IdentityError::Write {
                path: path.clone(),
                source,
            })?;
            write_private(&path, &der)?;
        }
        write_private(&dir.join(CHAIN_FILE), &self.chain_bytes)?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| IdentityError::Write {
                path: dir.to_owned(),
                source,
            })
    }

    /// Reads a complete state directory, checking every file against the chain.
    fn load(dir: &Path) -> Result<Self, IdentityError> {
        let chain_path = dir.join(CHAIN_FILE);
        let chain_bytes = read(&chain_path)?;
        let corrupt = |path: &Path| {
            let path = path.to_owned();
            move |source| IdentityError::Corrupt { path, source }
        };
        let chain = decode_chain(&chain_bytes).map_err(corrupt(&chain_path))?;
        (&chain).verify().map_err(corrupt(&chain_path))?;

        let cek = load_key(&dir.join(CEK_FILE), &chain.sev.cek)?;
        let oca = load_key(&dir.join(OCA_FILE), &chain.sev.oca)?;
        let pek = load_key(&dir.join(PEK_FILE), &chain.sev.pek)?;
        let pdh_path = dir.join(PDH_FILE);
        let pdh = load_key(&pdh_path, &chain.sev.pdh)?;
        let pdh_ecdh = openssl_key(&pdh).map_err(corrupt(&pdh_path))?;
        Ok(Self {
            chain,
            chain_bytes,
            cek,
            oca,
            pek,
            pdh,
            pdh_ecdh,
        })
    }
}

/// Verifies a peer's chain (for migration: the source verifies the target's chain against the
/// roots it trusts): its signatures verify and its ARK is byte-identical to one of
/// `trusted_arks`. Returns the chain's PDH.
pub fn verify_chain<'a>(
    chain: &'a Chain,
    trusted_arks: &[ca::Certificate],
) -> Result<&'a Certificate, IdentityError> {
    let ark = encode(&chain.ca.ark).map_err(IdentityError::ChainInvalid)?;
    let trusted = trusted_arks
        .iter()
        .any(|root| encode(root).is_ok_and(|root| root == ark));
    if !trusted {
        return Err(IdentityError::UntrustedRoot);
    }
    chain.verify().map_err(IdentityError::ChainInvalid)
}

/// AMD's ARKs of the generations that run SEV guests (Naples, Rome, Milan, Genoa), as the `sev`
/// crate ships them: the roots of hardware chains, to pass to [`verify_chain`] together with the
/// ARKs of the emulated platforms a host trusts.
pub fn amd_arks() -> Result<Vec<ca::Certificate>, IdentityError> {
    use sev::certs::sev::builtin::{genoa, milan, naples, rome};
    [
        ("Naples", naples::ARK),
        ("Rome", rome::ARK),
        ("Milan", milan::ARK),
        ("Genoa", genoa::ARK),
    ]
    .into_iter()
    .map(|(generation, mut bytes)| {
        ca::Certificate::decode(&mut bytes, ())
            .map_err(|source| IdentityError::BuiltinArk { generation, source })
    })
    .collect()
}

fn issue(cert: &'static str) -> impl FnOnce(io::Error) -> IdentityError {
    move |source| IdentityError::Issue { cert, source }
}

fn encode<T: Encoder<()>>(value: &T) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    value.encode(&mut bytes, ())?;
    Ok(bytes)
}

fn rsa_key() -> io::Result<PKey<Private>> {
    Ok(PKey::from_rsa(Rsa::generate(AMD_RSA_BITS)?)?)
}

/// A fresh random key id (AMD's are random 128-bit ids too).
fn key_id() -> io::Result<[u8; 16]> {
    let mut id = [0; 16];
    openssl::rand::rand_bytes(&mut id)?;
    Ok(id)
}

/// `n` as `len` little-endian bytes.
fn little_endian(n: &BigNumRef, len: usize) -> io::Result<Vec<u8>> {
    let len = i32::try_from(len).map_err(io::Error::other)?;
    let mut bytes = n.to_vec_padded(len)?;
    bytes.reverse();
    Ok(bytes)
}

/// RSASSA-PSS with SHA-256 (digest and MGF1) and a 32-byte salt: what the `sev` crate verifies
/// for 2048-bit AMD keys. Big-endian, the key's size.
fn rsa_pss_sign(key: &PKey<Private>, message: &[u8]) -> io::Result<Vec<u8>> {
    let mut signer = openssl::sign::Signer::new(MessageDigest::sha256(), key)?;
    signer.set_rsa_padding(Padding::PKCS1_PSS)?;
    signer.set_rsa_pss_saltlen(RsaPssSaltlen::DIGEST_LENGTH)?;
    signer.set_rsa_mgf1_md(MessageDigest::sha256())?;
    signer.update(message)?;
    Ok(signer.sign_to_vec()?)
}

/// An AMD-format certificate for `key`, signed by `signer` (the ARK's key).
fn amd_certificate(
    usage: u32,
    key_id: [u8; 16],
    certifying_id: [u8; 16],
    key: &PKey<Private>,
    signer: &PKey<Private>,
) -> io::Result<ca::Certificate> {
    let rsa = key.rsa()?;
    let mut cert = Vec::with_capacity(0x40 + 3 * AMD_RSA_BYTES);
    cert.extend_from_slice(&CERT_VERSION.to_le_bytes());
    cert.extend_from_slice(&key_id);
    cert.extend_from_slice(&certifying_id);
    cert.extend_from_slice(&usage.to_le_bytes());
    cert.extend_from_slice(&[0; 16]);
    cert.extend_from_slice(&AMD_RSA_BITS.to_le_bytes()); // public exponent size
    cert.extend_from_slice(&AMD_RSA_BITS.to_le_bytes()); // modulus size
    cert.extend_from_slice(&little_endian(rsa.e(), AMD_RSA_BYTES)?);
    cert.extend_from_slice(&little_endian(rsa.n(), AMD_RSA_BYTES)?);
    let signature = rsa_pss_sign(signer, &cert)?;
    cert.extend(signature.iter().rev());
    let mut rest = cert.as_slice();
    let decoded = ca::Certificate::decode(&mut rest, ())?;
    if !rest.is_empty() {
        return Err(io::Error::other("AMD certificate longer than its format"));
    }
    Ok(decoded)
}

/// `cek` with the ASK's signature in its first slot (usage ASK, RSA with SHA-256, the
/// signature little-endian).
fn sign_with_ask(cek: &Certificate, ask: &PKey<Private>) -> io::Result<Certificate> {
    let mut bytes = encode(cek)?;
    let signature = rsa_pss_sign(ask, &bytes[..SEV_BODY_BYTES])?;
    let slot = &mut bytes[SEV_BODY_BYTES..SEV_BODY_BYTES + SEV_SIG_SLOT_BYTES];
    slot.fill(0);
    slot[..4].copy_from_slice(&USAGE_ASK.to_le_bytes());
    slot[4..8].copy_from_slice(&ALGO_RSA_SHA256.to_le_bytes());
    for (dst, src) in slot[8..].iter_mut().zip(signature.iter().rev()) {
        *dst = *src;
    }
    Certificate::decode(&mut bytes.as_slice(), ())
}

/// The ECDH P-384 public key of a SEV-format certificate.
fn ecdh_public_key(cert: &Certificate) -> io::Result<PKey<Public>> {
    let bytes = encode(cert)?;
    let field = |offset: usize| u32::from_le_bytes(bytes[offset..offset + 4].try_into().unwrap());
    let (algorithm, curve) = (field(SEV_KEY_ALGO), field(SEV_ECC_CURVE));
    if !matches!(algorithm, ALGO_ECDH_SHA256 | ALGO_ECDH_SHA384) || curve != CURVE_P384 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("algorithm {algorithm:#x}, curve {curve}"),
        ));
    }
    let coordinate = |offset: usize| {
        let mut be = bytes[offset..offset + P384_BYTES].to_vec();
        be.reverse();
        openssl::bn::BigNum::from_slice(&be)
    };
    let group = EcGroup::from_curve_name(Nid::SECP384R1)?;
    // Checks that the point is on the curve.
    let key = EcKey::from_public_key_affine_coordinates(
        &group,
        &*coordinate(SEV_ECC_QX)?,
        &*coordinate(SEV_ECC_QY)?,
    )?;
    Ok(PKey::from_ec_key(key)?)
}

/// The OpenSSL key inside one of the `sev` crate's private keys.
fn openssl_key(key: &PrivateKey<Usage>) -> io::Result<PKey<Private>> {
    Ok(PKey::private_key_from_der(&encode(key)?)?)
}

/// Decodes a chain file, which must hold exactly one chain.
fn decode_chain(bytes: &[u8]) -> io::Result<Chain> {
    let chain = Chain::decode(&mut &bytes[..], ())?;
    // Re-encoding catches trailing bytes, and a truncated ARK signature, which the `sev` crate's
    // decoder replaces with the Naples ARK's (its workaround for AMD's malformed Naples file).
    let encoded = encode(&chain)?;
    if encoded != bytes {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} bytes where the certificates take {}",
                bytes.len(),
                encoded.len()
            ),
        ));
    }
    Ok(chain)
}

fn read(path: &Path) -> Result<Vec<u8>, IdentityError> {
    fs::read(path).map_err(|source| IdentityError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads the private key for `cert` from `path`, which only its owner may access.
fn load_key(path: &Path, cert: &Certificate) -> Result<PrivateKey<Usage>, IdentityError> {
    let metadata = fs::metadata(path).map_err(|source| IdentityError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions {
            path: path.to_owned(),
            mode,
        });
    }
    let der = read(path)?;
    // The `sev` crate checks that the key is the certificate's.
    PrivateKey::<Usage>::decode(&mut der.as_slice(), cert).map_err(|source| {
        IdentityError::Corrupt {
            path: path.to_owned(),
            source,
        }
    })
}

/// Writes `data` to `path` (mode 0600) through a temporary file, so `path` is whole or absent.
fn write_private(path: &Path, data: &[u8]) -> Result<(), IdentityError> {
    let error = |source| IdentityError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(error(e)),
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(error)?;
    file.write_all(data)
        .and_then(|()| file.sync_all())
        .map_err(error)?;
    fs::rename(&tmp, path).map_err(error)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> PlatformIdentity {
        PlatformIdentity::generate().unwrap()
    }

    #[test]
    fn the_amd_certificates_have_the_layout_of_amds_naples_ark() {
        let id = identity();
        let ours = encode(id.ark()).unwrap();
        let naples = sev::certs::sev::builtin::naples::ARK;
        assert_eq!(ours.len(), naples.len());
        // Version, then (after the ids and usage) the reserved bytes and the two sizes.
        assert_eq!(ours[..4], naples[..4]);
        assert_eq!(ours[0x24..0x40], naples[0x24..0x40]);
        // Self-signed: certifying id = key id.
        assert_eq!(ours[0x04..0x14], ours[0x14..0x24]);
        let ask = encode(&id.chain().ca.ask).unwrap();
        assert_eq!(ask[0x14..0x24], ours[0x04..0x14], "the ASK names the ARK");
        assert_eq!(ask[0x24..0x28], USAGE_ASK.to_le_bytes());
    }

    #[test]
    fn each_link_of_the_chain_verifies_on_its_own() {
        let id = identity();
        let chain = id.chain();
        (&chain.ca.ark, &chain.ca.ark).verify().unwrap();
        (&chain.ca.ark, &chain.ca.ask).verify().unwrap();
        (&chain.ca.ask, &chain.sev.cek).verify().unwrap();
        (&chain.sev.oca, &chain.sev.pek).verify().unwrap();
        (&chain.sev.cek, &chain.sev.pek).verify().unwrap();
        (&chain.sev.pek, &chain.sev.pdh).verify().unwrap();
        // And only with the right signer.
        assert!((&chain.ca.ask, &chain.ca.ask).verify().is_err());
        assert!((&chain.sev.oca, &chain.sev.pdh).verify().is_err());
    }

    #[test]
    fn the_secret_is_the_48_byte_x_coordinate_and_symmetric() {
        let (a, b) = (identity(), identity());
        let z = a.shared_secret(b.pdh()).unwrap();
        assert_eq!(z.len(), P384_BYTES);
        assert_eq!(z, b.shared_secret(a.pdh()).unwrap());
        assert_ne!(z, a.shared_secret(a.pdh()).unwrap());
    }

    #[test]
    fn signing_keys_are_no_ecdh_peers() {
        let id = identity();
        let err = id.shared_secret(&id.chain().sev.pek).unwrap_err();
        assert!(matches!(err, IdentityError::PeerKey(_)), "{err:?}");
    }

    #[test]
    fn a_point_off_the_curve_is_refused() {
        let id = identity();
        let mut bytes = encode(id.pdh()).unwrap();
        bytes[SEV_ECC_QY] ^= 1;
        let bad = Certificate::decode(&mut bytes.as_slice(), ()).unwrap();
        let err = id.shared_secret(&bad).unwrap_err();
        assert!(matches!(err, IdentityError::PeerKey(_)), "{err:?}");
    }

    #[test]
    fn chain_files_hold_exactly_one_chain() {
        let id = identity();
        let bytes = id.chain_bytes();
        assert!(decode_chain(&bytes).is_ok());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_chain(&longer).is_err());
        // Cut inside the ARK's signature: the `sev` crate would fill in Naples'.
        assert!(decode_chain(&bytes[..bytes.len() - 10]).is_err());
    }

    #[test]
    fn debug_shows_no_key_material() {
        let text = format!("{:?}", identity());
        assert!(
            text.starts_with("PlatformIdentity { pdh: PDH EP384 D256 "),
            "{text}"
        );
    }

    #[test]
    fn identities_can_move_to_the_firmware_thread() {
        fn send<T: Send>() {}
        send::<PlatformIdentity>();
    }

    #[test]
    fn amds_roots_decode() {
        assert_eq!(amd_arks().unwrap().len(), 4);
    }
}
