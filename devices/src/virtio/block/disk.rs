//! The file (or block device) behind a virtio-blk device, and its lock.
//!
//! Like QEMU, Veil locks the disk so two VMMs cannot both write it: an exclusive lock for a
//! writable disk, a shared one for a read-only disk. Migration hands the lock over: the source
//! flushes and releases it after its last write, the target takes it before its first.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes per sector: the unit of capacity and of request offsets (virtio 1.2 §5.2.6).
pub const SECTOR_SIZE: u64 = 512;

/// Errors opening or locking a disk.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// The file could not be opened.
    #[error("Cannot open disk {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Its size could not be found.
    #[error("Cannot find the size of disk {}", path.display())]
    Size {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another process holds a conflicting lock.
    #[error("Disk {} is in use by another process (it holds the disk's lock)", path.display())]
    Locked { path: PathBuf },
    /// Locking or unlocking failed for another reason.
    #[error("Cannot lock disk {}", path.display())]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The last flush before releasing the lock failed.
    #[error("Cannot flush disk {}", path.display())]
    Flush {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An open, locked disk.
#[derive(Debug)]
pub struct Disk {
    file: File,
    path: PathBuf,
    read_only: bool,
    sectors: u64,
    locked: bool,
}

impl Disk {
    /// Opens and locks `path`; a read-only disk is opened read-only and locked shared.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, DiskError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| DiskError::Open {
                path: path.to_owned(),
                source,
            })?;
        // Seeking to the end sizes block devices too, where metadata says 0.
        let bytes = file
            .seek(SeekFrom::End(0))
            .map_err(|source| DiskError::Size {
                path: path.to_owned(),
                source,
            })?;
        let mut disk = Self {
            file,
            path: path.to_owned(),
            read_only,
            sectors: bytes / SECTOR_SIZE,
            locked: false,
        };
        disk.lock()?;
        Ok(disk)
    }

    /// The disk's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the guest may only read.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Capacity in 512-byte sectors; a partial last sector is not part of the disk.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether this process holds the disk's lock, and so may do I/O.
    pub fn is_locked(&self) -> bool {
        self.locked
    }

    /// Takes the lock (again), failing at once if another process holds it.
    pub fn lock(&mut self) -> Result<(), DiskError> {
        let mode = if self.read_only {
            libc::LOCK_SH
        } else {
            libc::LOCK_EX
        };
        self.flock(mode | libc::LOCK_NB).map_err(|source| {
            if source.kind() == io::ErrorKind::WouldBlock {
                DiskError::Locked {
                    path: self.path.clone(),
                }
            } else {
                DiskError::Lock {
                    path: self.path.clone(),
                    source,
                }
            }
        })?;
        self.locked = true;
        Ok(())
    }

    /// Flushes and releases the lock, so another VMM (a migration target) may take it. The
    /// disk refuses I/O until [`lock`](Self::lock) succeeds again.
    pub fn unlock(&mut self) -> Result<(), DiskError> {
        if !self.locked {
            return Ok(());
        }
        self.flush().map_err(|source| DiskError::Flush {
            path: self.path.clone(),
            source,
        })?;
        self.flock(libc::LOCK_UN)
            .map_err(|source| DiskError::Lock {
                path: self.path.clone(),
                source,
            })?;
        self.locked = false;
        Ok(())
    }

    fn flock(&self, operation: libc::c_int) -> io::Result<()> {
        // SAFETY: flock takes a file descriptor we own for the whole call and an operation
        // code; it touches no memory of ours.
        let rc = unsafe { libc::flock(self.file.as_raw_fd(), operation) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn held(&self) -> io::Result<()> {
        if self.locked {
            Ok(())
        } else {
            Err(io::Error::other("the disk's lock has been handed over"))
        }
    }

    /// Reads exactly `buf.len()` bytes at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.held()?;
        self.file.read_exact_at(buf, offset)
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.held()?;
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.file.write_all_at(buf, offset)
    }

    /// Makes written data durable (fdatasync).
    pub fn flush(&self) -> io::Result<()> {
        self.held()?;
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::tempfile::TempFile;

    use super::*;

    fn disk_file(len: u64) -> TempFile {
        let f = TempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        f
    }

    #[test]
    fn sizes_in_whole_sectors() {
        let f = disk_file(3 * SECTOR_SIZE + 100);
        let disk = Disk::open(f.as_path(), false).unwrap();
        assert_eq!(disk.sectors(), 3);
        assert!(!disk.read_only());
    }

    #[test]
    fn a_writable_disk_is_exclusive() {
        let f = disk_file(4096);
        let _first = Disk::open(f.as_path(), false).unwrap();
        let err = Disk::open(f.as_path(), false).unwrap_err();
        assert!(matches!(err, DiskError::Locked { .. }), "{err:?}");
        assert!(err.to_string().contains(&f.as_path().display().to_string()));
        // A reader cannot share a disk someone writes either.
        assert!(matches!(
            Disk::open(f.as_path(), true),
            Err(DiskError::Locked { .. })
        ));
    }

    #[test]
    fn read_only_disks_share_but_keep_writers_out() {
        let f = disk_file(4096);
        let _a = Disk::open(f.as_path(), true).unwrap();
        let _b = Disk::open(f.as_path(), true).unwrap();
        assert!(matches!(
            Disk::open(f.as_path(), false),
            Err(DiskError::Locked { .. })
        ));
    }

    #[test]
    fn the_lock_is_handed_over() {
        let f = disk_file(4096);
        let mut source = Disk::open(f.as_path(), false).unwrap();
        source.write_at(b"last write", 0).unwrap();
        source.unlock().unwrap();
        assert!(source.write_at(b"too late", 0).is_err());
        let target = Disk::open(f.as_path(), false).unwrap();
        let mut buf = [0u8; 10];
        target.read_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"last write");
        assert!(matches!(source.lock(), Err(DiskError::Locked { .. })));
    }
}
