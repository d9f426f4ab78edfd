//! Where file-backed guest RAM has data: a sparse memory file's holes read as zero, so the
//! first pass sends them as zero pages without touching them. Reading a hole through a shared
//! mapping would put a zeroed page in the page cache and in the source's resident memory: a
//! 16 GiB sparse guest would cost 16 GiB of RAM to migrate.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use veil_hypervisor::memory::PAGE_SIZE;

/// One stretch of a region's pages: `pages` (region-relative, page-aligned) either hold data or
/// are known to be zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Stretch {
    pub pages: std::ops::Range<u64>,
    pub zero: bool,
}

/// The next offset at or after `from` of `whence` (`SEEK_DATA` or `SEEK_HOLE`); `None` when
/// there is no more data (ENXIO).
fn seek(file: &File, from: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let from = libc::off_t::try_from(from).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: lseek on a descriptor `file` keeps open only moves its offset, which nothing
    // relies on (the file is used through its mapping).
    let at = unsafe { libc::lseek(file.as_raw_fd(), from, whence) };
    if at < 0 {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(error),
        };
    }
    Ok(Some(at as u64))
}

/// The stretches of a `len`-byte region mapped from `file` at `start`, in order, covering it.
/// A filesystem without SEEK_DATA reports the whole file as data, which is still correct.
pub(crate) fn stretches(file: &File, start: u64, len: u64) -> io::Result<Vec<Stretch>> {
    let pages = len / PAGE_SIZE;
    let mut out = Vec::new();
    let mut page = 0;
    while page < pages {
        let data = seek(file, start + page * PAGE_SIZE, libc::SEEK_DATA)?
            .map(|at| (at.saturating_sub(start) / PAGE_SIZE).min(pages))
            .unwrap_or(pages);
        if data > page {
            out.push(Stretch {
                pages: page..data,
                zero: true,
            });
        }
        if data == pages {
            break;
        }
        let hole = seek(file, start + data * PAGE_SIZE, libc::SEEK_HOLE)?
            .map(|at| (at.saturating_sub(start).div_ceil(PAGE_SIZE)).min(pages))
            .unwrap_or(pages)
            .max(data + 1);
        out.push(Stretch {
            pages: data..hole,
            zero: false,
        });
        page = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    /// The stretches of the `region` bytes from `start` of a sparse file of `len` bytes with a
    /// byte written at each offset in `data`.
    fn stretches_of(name: &str, len: u64, data: &[u64], start: u64, region: u64) -> Vec<Stretch> {
        let path = std::env::temp_dir().join(format!("veil-{name}-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(len).unwrap();
        for &at in data {
            file.write_all_at(&[1], at).unwrap();
        }
        let found = stretches(&file, start, region).unwrap();
        std::fs::remove_file(&path).unwrap();
        found
    }

    #[test]
    fn a_sparse_file_is_holes_and_the_pages_written_into_it() {
        // 64 MiB with data at page 0 and at 32 MiB (one byte in the middle of a page).
        let found = stretches_of("holes", 64 << 20, &[0, (32 << 20) + 100], 0, 64 << 20);
        // Filesystems allocate in blocks of their own size, so holes are found to a page, or
        // coarser; every page written is in a data stretch and the stretches cover the file.
        let pages = (64 << 20) / PAGE_SIZE;
        assert_eq!(found.first().unwrap().pages.start, 0);
        assert_eq!(found.last().unwrap().pages.end, pages);
        for pair in found.windows(2) {
            assert_eq!(pair[0].pages.end, pair[1].pages.start);
        }
        let data = |page: u64| found.iter().any(|s| !s.zero && s.pages.contains(&page));
        assert!(data(0) && data((32 << 20) / PAGE_SIZE));
        let zero: u64 = found
            .iter()
            .filter(|s| s.zero)
            .map(|s| s.pages.end - s.pages.start)
            .sum();
        assert!(zero > pages / 2, "most of it is holes: {found:?}");
    }

    #[test]
    fn a_region_at_an_offset_sees_only_its_part_of_the_file() {
        // The region is the second 8 MiB, all hole: one zero stretch.
        let found = stretches_of("holes-off", 16 << 20, &[0], 8 << 20, 8 << 20);
        assert_eq!(
            found,
            [Stretch {
                pages: 0..(8 << 20) / PAGE_SIZE,
                zero: true
            }]
        );
    }
}
