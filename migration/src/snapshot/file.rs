//! A snapshot's checked files: a fixed header saying what the file is, in which format
//! version, how long its payload is and the payload's CRC-32, then the payload.
//!
//! ```text
//!  0              8         12     16               24           28         32
//!  +--------------+---------+------+----------------+------------+----------+---------
//!  | "VEILSNAP"   | version | kind | payload length | CRC-32     | reserved | payload
//!  | 8 bytes      | u32     | u32  | u64            | of payload | u32, 0   |
//!  +--------------+---------+------+----------------+------------+----------+---------
//! ```
//!
//! Integers are little-endian. A reader refuses another format version, a truncated file and
//! a payload whose checksum does not match before anything is decoded.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The snapshot format this version of Veil writes and reads. Its payloads are migration
/// frames: a change of the migration protocol version changes this too.
pub const FORMAT_VERSION: u32 = 2;

const MAGIC: [u8; 8] = *b"VEILSNAP";
const HEADER_BYTES: usize = 32;

/// What a checked file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// The VM's shape, SEV receive start and state (migration frames).
    State = 1,
    /// An SEV guest's private pages, encrypted by the firmware (migration memory chunks).
    PrivatePages = 2,
    /// A diff snapshot's parent and the pages it holds (diff.rs).
    Diff = 3,
}

/// A checked file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("Cannot read or write {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a Veil snapshot file", path.display())]
    NotASnapshot { path: PathBuf },
    #[error("{} is in snapshot format version {found}; this version of Veil reads version {FORMAT_VERSION} only", path.display())]
    Version { path: PathBuf, found: u32 },
    #[error("{} holds {found:?} data where {expected:?} was expected", path.display())]
    Kind {
        path: PathBuf,
        found: u32,
        expected: FileKind,
    },
    #[error("{} is truncated: its header announces {expected} bytes of payload, {found} are there", path.display())]
    Truncated {
        path: PathBuf,
        expected: u64,
        found: u64,
    },
    #[error("{} is corrupted: its checksum is {expected:#010x}, its contents give {found:#010x}", path.display())]
    Corrupted {
        path: PathBuf,
        expected: u32,
        found: u32,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> FileError + '_ {
    move |source| FileError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `payload` under a header to `path` and makes it durable.
pub fn write(path: &Path, kind: FileKind, payload: &[u8]) -> Result<(), FileError> {
    let mut header = [0u8; HEADER_BYTES];
    header[..8].copy_from_slice(&MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(kind as u32).to_le_bytes());
    header[16..24].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    header[24..28].copy_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let mut file = File::create(path).map_err(io_error(path))?;
    file.write_all(&header).map_err(io_error(path))?;
    file.write_all(payload).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

/// Reads the payload of the file at `path`, checking its header and checksum.
pub fn read(path: &Path, kind: FileKind) -> Result<Vec<u8>, FileError> {
    let mut bytes = Vec::new();
    File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(io_error(path))?;
    let path = path.to_owned();
    if bytes.len() < HEADER_BYTES || bytes[..8] != MAGIC {
        return Err(FileError::NotASnapshot { path });
    }
    let word = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap());
    let version = word(8);
    if version != FORMAT_VERSION {
        return Err(FileError::Version {
            path,
            found: version,
        });
    }
    if word(12) != kind as u32 {
        return Err(FileError::Kind {
            path,
            found: word(12),
            expected: kind,
        });
    }
    let length = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
    let found = (bytes.len() - HEADER_BYTES) as u64;
    if found != length {
        return Err(FileError::Truncated {
            path,
            expected: length,
            found,
        });
    }
    let expected = word(24);
    let payload = bytes.split_off(HEADER_BYTES);
    let actual = crc32fast::hash(&payload);
    if actual != expected {
        return Err(FileError::Corrupted {
            path,
            expected,
            found: actual,
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("veil-snapfile-{name}-{}", std::process::id()))
    }

    #[test]
    fn a_payload_round_trips_and_every_damage_is_named() {
        let path = temp("round");
        write(&path, FileKind::State, b"the state").unwrap();
        assert_eq!(read(&path, FileKind::State).unwrap(), b"the state");
        assert!(matches!(
            read(&path, FileKind::PrivatePages),
            Err(FileError::Kind { found: 1, .. })
        ));

        let good = std::fs::read(&path).unwrap();
        let damaged = |f: &dyn Fn(&mut Vec<u8>)| {
            let mut bytes = good.clone();
            f(&mut bytes);
            std::fs::write(&path, bytes).unwrap();
            read(&path, FileKind::State).unwrap_err()
        };
        assert!(matches!(
            damaged(&|b| b.truncate(b.len() - 2)),
            FileError::Truncated {
                expected: 9,
                found: 7,
                ..
            }
        ));
        assert!(matches!(
            damaged(&|b| b[HEADER_BYTES + 3] ^= 1),
            FileError::Corrupted { .. }
        ));
        assert!(matches!(
            // A snapshot of the format before protocol version 3's chunks.
            damaged(&|b| b[8] = 1),
            FileError::Version { found: 1, .. }
        ));
        assert!(matches!(
            damaged(&|b| b[0] = b'X'),
            FileError::NotASnapshot { .. }
        ));
        assert!(matches!(
            damaged(&|b| b.truncate(5)),
            FileError::NotASnapshot { .. }
        ));
        let message = damaged(&|b| b[8] = 7).to_string();
        assert!(
            message.contains("format version 7") && message.contains("version 2 only"),
            "{message}"
        );
        std::fs::remove_file(&path).unwrap();
    }
}
