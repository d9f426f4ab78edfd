//! Diff snapshots: only the pages the guest (or the VMM, for it) wrote since the snapshot
//! before, on top of that one.
//!
//! A snapshot that lets its guest run on turns KVM's dirty log on, so the next snapshot of the
//! same VM can be a diff. The diff's directory holds the usual `state` and a sparse `memory`
//! file, but `memory` holds only the dirtied pages; `diff` says which, and which snapshot they
//! go on top of:
//!
//! ```text
//! DIR/diff   checked file (file.rs), kind Diff:
//!  0            32          34                 34+n
//!  +------------+-----------+------------------+------------------------------------------
//!  | SHA-256 of | n: parent | parent directory | one bit per page of the memory file (u64
//!  | the parent | path      | (absolute path,  | words, little-endian, bit i of word i/64
//!  | state file | length u16| its bytes)       | is page i): set where this diff holds it
//!  +------------+-----------+------------------+------------------------------------------
//! ```
//!
//! A restore maps the oldest snapshot's memory copy-on-write and copies each diff's pages over
//! it, oldest first. The parent is named by its absolute path and pinned by its state file's
//! digest: a parent moved, replaced or saved again is refused, not silently mixed in. Whether
//! the dirty log still holds every write since the parent is the hypervisor's dirty-log epoch:
//! a migration since (which uses the log and turns it off) makes the next diff impossible, and
//! says so.

use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::file::{self, FileKind};
use super::{SnapshotError, STATE_FILE};

/// The diff file's name in a snapshot directory.
pub const DIFF_FILE: &str = "diff";

/// How many snapshots a restore follows back to the full one, at most.
pub const MAX_DIFF_CHAIN: usize = 64;

/// A snapshot a later one of the same VM can be a diff of: where it is, what its state file
/// was, and the dirty log's epoch right after it (the log held nothing then).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffBase {
    pub dir: PathBuf,
    pub state_digest: [u8; 32],
    pub dirty_log_epoch: u64,
}

/// The SHA-256 of the state file in `dir`, as a diff of it records.
pub fn state_digest(dir: &Path) -> Result<[u8; 32], SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(|source| SnapshotError::Io { path, source })?;
    Ok(Sha256::digest(bytes).into())
}

/// A diff file, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiffFile {
    pub parent: PathBuf,
    pub parent_digest: [u8; 32],
    /// One bit per page of the memory file: set where the diff holds the page.
    pub pages: Vec<u64>,
}

impl DiffFile {
    /// Whether page `index` of the memory file is in this diff.
    pub fn holds(&self, index: u64) -> bool {
        self.pages
            .get((index / 64) as usize)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    /// Runs `[first, end)` of consecutive pages the diff holds, in order.
    pub fn runs(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        let total = self.pages.len() as u64 * 64;
        let mut at = 0u64;
        std::iter::from_fn(move || {
            while at < total && !self.holds(at) {
                // Whole empty words at once: most of a diff is pages it does not hold.
                if at.is_multiple_of(64) && self.pages[(at / 64) as usize] == 0 {
                    at += 64;
                } else {
                    at += 1;
                }
            }
            if at >= total {
                return None;
            }
            let first = at;
            while at < total && self.holds(at) {
                at += 1;
            }
            Some((first, at))
        })
    }

    /// The diff file's payload.
    pub fn encode(&self) -> Result<Vec<u8>, SnapshotError> {
        let path = self.parent.as_os_str().as_bytes();
        let length = u16::try_from(path.len()).map_err(|_| SnapshotError::DiffParentPath {
            path: self.parent.clone(),
        })?;
        let mut out = Vec::with_capacity(34 + path.len() + self.pages.len() * 8);
        out.extend_from_slice(&self.parent_digest);
        out.extend_from_slice(&length.to_le_bytes());
        out.extend_from_slice(path);
        for word in &self.pages {
            out.extend_from_slice(&word.to_le_bytes());
        }
        Ok(out)
    }

    /// Decodes a diff file's payload (read from `at`) for a memory file of `memory_pages`
    /// pages: anything but a whole, absolute-parented bitmap of exactly that many pages is
    /// refused with the reason.
    pub fn decode(payload: &[u8], memory_pages: u64, at: &Path) -> Result<Self, SnapshotError> {
        let bad = |why: &'static str| SnapshotError::DiffFile {
            path: at.to_owned(),
            why,
        };
        let (digest, rest) = payload
            .split_first_chunk::<32>()
            .ok_or(bad("it ends before the parent's digest"))?;
        let (length, rest) = rest
            .split_first_chunk::<2>()
            .ok_or(bad("it ends before the parent's path"))?;
        let length = usize::from(u16::from_le_bytes(*length));
        if rest.len() < length {
            return Err(bad("it ends inside the parent's path"));
        }
        let (path, words) = rest.split_at(length);
        let parent = PathBuf::from(std::ffi::OsString::from_vec(path.to_vec()));
        if !parent.is_absolute() {
            return Err(bad("its parent's path is not absolute"));
        }
        if words.len() as u64 != memory_pages.div_ceil(64) * 8 {
            return Err(bad("its page bitmap does not cover the guest's RAM"));
        }
        let pages: Vec<u64> = words
            .chunks_exact(8)
            .map(|w| u64::from_le_bytes(w.try_into().expect("chunks of 8")))
            .collect();
        let file = Self {
            parent,
            parent_digest: *digest,
            pages,
        };
        if !memory_pages.is_multiple_of(64) {
            let last = file.pages.last().copied().unwrap_or(0);
            if last >> (memory_pages % 64) != 0 {
                return Err(bad("its page bitmap marks pages past the guest's RAM"));
            }
        }
        Ok(file)
    }
}

/// Writes the diff file at `path`.
pub(super) fn write(path: &Path, diff: &DiffFile) -> Result<(), SnapshotError> {
    Ok(file::write(path, FileKind::Diff, &diff.encode()?)?)
}

/// Reads the diff file in `dir`, if there is one (a full snapshot has none), for a memory
/// file of `memory_pages` pages.
pub(super) fn read(dir: &Path, memory_pages: u64) -> Result<Option<DiffFile>, SnapshotError> {
    let path = dir.join(DIFF_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let payload = file::read(&path, FileKind::Diff)?;
    DiffFile::decode(&payload, memory_pages, &path).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn diff(pages: Vec<u64>) -> DiffFile {
        DiffFile {
            parent: PathBuf::from("/snapshots/base"),
            parent_digest: [7; 32],
            pages,
        }
    }

    #[test]
    fn a_diff_file_round_trips_and_lists_its_runs_of_pages() {
        let d = diff(vec![0b1110_0001, 0, 1 << 63, 0b11]);
        let bytes = d.encode().unwrap();
        assert_eq!(DiffFile::decode(&bytes, 256, Path::new("/d")).unwrap(), d);
        let runs: Vec<_> = d.runs().collect();
        assert_eq!(runs, [(0, 1), (5, 8), (191, 194)]);
        assert!(d.holds(192) && !d.holds(194) && !d.holds(100_000));
    }

    #[test]
    fn a_damaged_or_foreign_diff_file_is_refused_with_the_reason() {
        let why = |bytes: &[u8], pages: u64| match DiffFile::decode(bytes, pages, Path::new("/d")) {
            Err(SnapshotError::DiffFile { why, .. }) => why,
            other => panic!("{other:?}"),
        };
        let good = diff(vec![1, 0]).encode().unwrap();
        assert_eq!(why(&good[..20], 128), "it ends before the parent's digest");
        assert_eq!(why(&good[..33], 128), "it ends before the parent's path");
        assert_eq!(why(&good[..40], 128), "it ends inside the parent's path");
        assert_eq!(
            why(&good, 192),
            "its page bitmap does not cover the guest's RAM"
        );
        // 100 pages: bits 100..128 of the last word must be clear.
        let past = diff(vec![0, 1 << 40]).encode().unwrap();
        assert_eq!(
            why(&past, 100),
            "its page bitmap marks pages past the guest's RAM"
        );
        let relative = DiffFile {
            parent: PathBuf::from("base"),
            ..diff(vec![0, 0])
        };
        assert_eq!(
            why(&relative.encode().unwrap(), 128),
            "its parent's path is not absolute"
        );
    }
}
