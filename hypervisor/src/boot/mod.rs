//! Loading a kernel and writing the boot structures it expects.
//!
//! Two protocols, both entered in 32-bit flat protected mode with paging off:
//! - PVH (an ELF with a `XEN_ELFNOTE_PHYS32_ENTRY` note): EBX = `hvm_start_info`.
//! - The Linux boot protocol (a bzImage): ESI = `boot_params`, entry at `code32_start`.
//!
//! What is written where, in order, is recorded in [`BootImage::loaded`], so SEV can measure
//! exactly what was loaded.

mod e820;
mod gdt;
mod linux;
mod pvh;

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::{self, BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

pub use e820::{e820_map, E820Entry, E820_RAM, E820_RESERVED};
pub use gdt::{boot_segments, write_boot_gdt, BootSegments};

use crate::layout::{self, CMDLINE_MAX, CMDLINE_START, KERNEL_START};
use crate::memory::GuestMemory;

/// Errors loading a kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file could not be opened or read.
    #[error("Cannot read kernel {}", path.display())]
    ReadKernel {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The initrd file could not be opened or read.
    #[error("Cannot read initrd {}", path.display())]
    ReadInitrd {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error("{} is not a kernel Veil can boot: it is neither an ELF nor a bzImage", path.display())]
    UnknownFormat { path: PathBuf },
    /// An ELF without the PVH entry note.
    #[error("{} is an ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); build the kernel with CONFIG_PVH or use its bzImage", path.display())]
    NoPvhEntry { path: PathBuf },
    /// linux-loader refused the image.
    #[error("Cannot load kernel {}", path.display())]
    Load {
        path: PathBuf,
        #[source]
        source: loader::Error,
    },
    /// The command line is invalid or too long.
    #[error("Invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// The command line could not be written.
    #[error("Cannot write the kernel command line")]
    WriteCmdline(#[source] loader::Error),
    /// The kernel's segments (their memory size, not only the bytes in the file) reach past
    /// guest RAM.
    #[error("Kernel {} needs guest memory from {start:#x} to {end:#x}, beyond this VM's RAM", path.display())]
    KernelOutsideRam { path: PathBuf, start: u64, end: u64 },
    /// The initrd does not fit in guest memory.
    #[error("The initrd ({size} bytes) does not fit in guest memory below {limit:#x}")]
    InitrdTooLarge { size: u64, limit: u64 },
    /// Writing a boot structure failed.
    #[error("Cannot write boot structures to guest memory")]
    WriteBootParams(#[source] linux_loader::configurator::Error),
    /// Writing to guest memory failed.
    #[error("Cannot write to guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// What to boot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BootConfig {
    /// An ELF with a PVH note, or a bzImage.
    pub kernel: PathBuf,
    /// Optional initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

/// How the boot vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryPoint {
    /// PVH: 32-bit entry with EBX = `hvm_start_info`.
    Pvh {
        entry: GuestAddress,
        start_info: GuestAddress,
    },
    /// Linux 32-bit boot protocol: ESI = `boot_params`.
    Linux {
        entry: GuestAddress,
        boot_params: GuestAddress,
    },
}

/// A range of guest memory the loader wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedRange {
    /// What it holds.
    pub kind: LoadedKind,
    /// Where.
    pub start: GuestAddress,
    /// How many bytes.
    pub len: u64,
}

/// The kinds of [`LoadedRange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadedKind {
    Kernel,
    Initrd,
    Cmdline,
    BootParams,
}

/// The result of loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootImage {
    /// Where the boot vCPU starts.
    pub entry: EntryPoint,
    /// Everything written, in load order.
    pub loaded: Vec<LoadedRange>,
}

enum Format {
    Elf,
    BzImage,
}

/// Loads kernel, initrd and command line into `memory` and writes the boot structures.
pub fn load(memory: &GuestMemory, config: &BootConfig) -> Result<BootImage, BootError> {
    let path = &config.kernel;
    let read_error = |source| BootError::ReadKernel {
        path: path.clone(),
        source,
    };
    let mut kernel = File::open(path).map_err(read_error)?;
    let format = detect_format(&mut kernel)
        .map_err(read_error)?
        .ok_or_else(|| BootError::UnknownFormat { path: path.clone() })?;
    let load_error = |source| BootError::Load {
        path: path.clone(),
        source,
    };
    let highmem = Some(GuestAddress(KERNEL_START));
    let result = match format {
        Format::Elf => Elf::load(memory, None, &mut kernel, highmem).map_err(load_error)?,
        Format::BzImage => BzImage::load(memory, None, &mut kernel, highmem).map_err(load_error)?,
    };
    // linux-loader writes the bytes the file holds but reports the end of the segments' memory
    // size (their bss) unchecked: a range beyond RAM would reach the measurement and the
    // initrd's placement.
    let (start, end) = (result.kernel_load.0, result.kernel_end);
    let inside = end >= start
        && (end == start || memory.check_range(result.kernel_load, (end - start) as usize));
    if !inside {
        return Err(BootError::KernelOutsideRam {
            path: path.clone(),
            start,
            end,
        });
    }
    let mut loaded = vec![LoadedRange {
        kind: LoadedKind::Kernel,
        start: result.kernel_load,
        len: end - start,
    }];

    let cmdline = write_cmdline(memory, &config.cmdline)?;
    loaded.push(cmdline);

    let initrd = config
        .initrd
        .as_deref()
        .map(|p| load_initrd(memory, p, result.kernel_end, result.setup_header.as_ref()))
        .transpose()?;
    loaded.extend(initrd);

    write_boot_gdt(memory).map_err(BootError::GuestMemory)?;
    loaded.push(LoadedRange {
        kind: LoadedKind::BootParams,
        start: layout::BOOT_GDT_START,
        len: gdt::BOOT_GDT_BYTES,
    });
    let e820 = e820_map(memory);
    let (entry, params) = match format {
        Format::Elf => match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(entry) => {
                let params = pvh::write_start_info(memory, cmdline, initrd, &e820)?;
                (
                    EntryPoint::Pvh {
                        entry,
                        start_info: layout::PVH_INFO_START,
                    },
                    params,
                )
            }
            _ => return Err(BootError::NoPvhEntry { path: path.clone() }),
        },
        Format::BzImage => {
            let header = result.setup_header.unwrap_or_default();
            let params = linux::write_boot_params(memory, header, cmdline, initrd, &e820)?;
            (
                EntryPoint::Linux {
                    entry: GuestAddress(u64::from(header.code32_start).max(KERNEL_START)),
                    boot_params: layout::ZERO_PAGE_START,
                },
                params,
            )
        }
    };
    loaded.extend(params);
    Ok(BootImage { entry, loaded })
}

fn detect_format(file: &mut File) -> io::Result<Option<Format>> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))?;
    let n = read_up_to(file, &mut head)?;
    file.seek(SeekFrom::Start(0))?;
    Ok(if n >= 4 && head[..4] == *b"\x7fELF" {
        Some(Format::Elf)
    } else if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        Some(Format::BzImage)
    } else {
        None
    })
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn write_cmdline(memory: &GuestMemory, text: &str) -> Result<LoadedRange, BootError> {
    let mut cmdline =
        linux_loader::cmdline::Cmdline::new(CMDLINE_MAX).map_err(BootError::Cmdline)?;
    if !text.is_empty() {
        cmdline.insert_str(text).map_err(BootError::Cmdline)?;
    }
    let start = GuestAddress(CMDLINE_START);
    loader::load_cmdline(memory, start, &cmdline).map_err(BootError::WriteCmdline)?;
    Ok(LoadedRange {
        kind: LoadedKind::Cmdline,
        start,
        len: text.len() as u64 + 1,
    })
}

/// Places the initrd page-aligned at the top of low RAM (below the kernel's limit).
fn load_initrd(
    memory: &GuestMemory,
    path: &Path,
    kernel_end: u64,
    header: Option<&loader::bootparam::setup_header>,
) -> Result<LoadedRange, BootError> {
    let read_error = |source| BootError::ReadInitrd {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_error)?;
    let size = file.metadata().map_err(read_error)?.len();
    // Linux's own limit is in its header; PVH kernels use the same default.
    let addr_max = header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(0x37ff_ffff);
    let low_ram_end = memory
        .iter()
        .next()
        .map_or(0, |r| r.start_addr().0 + r.len());
    let limit = low_ram_end.min(addr_max + 1);
    let start = limit
        .checked_sub(size)
        .map(|s| s & !(crate::memory::PAGE_SIZE - 1))
        .filter(|&s| s >= kernel_end && size > 0)
        .ok_or(BootError::InitrdTooLarge { size, limit })?;
    let start = GuestAddress(start);
    memory
        .read_exact_volatile_from(start, &mut file, size as usize)
        .map_err(BootError::GuestMemory)?;
    debug_assert!(start.checked_add(size).is_some());
    Ok(LoadedRange {
        kind: LoadedKind::Initrd,
        start,
        len: size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestRam, MemoryConfig};
    use std::io::Write;

    fn ram() -> GuestRam {
        GuestRam::new(&MemoryConfig {
            size: 32 << 20,
            file: None,
        })
        .unwrap()
    }

    fn temp(name: &str, contents: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("veil-boot-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(contents).unwrap();
        path
    }

    /// Found by the kernel_load fuzz target: a PVH ELF whose one segment holds 16 bytes but
    /// claims 0x0d00_0000_0000_0010 of memory. It was loaded, and reported as a kernel range
    /// of that length.
    #[test]
    fn a_kernel_whose_segments_reach_past_ram_is_refused() {
        let mut elf = Vec::new();
        elf.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        for v in [2u16, 0x3e] {
            elf.extend_from_slice(&v.to_le_bytes());
        }
        elf.extend_from_slice(&1u32.to_le_bytes());
        for v in [0x10_0000u64, 64, 0] {
            elf.extend_from_slice(&v.to_le_bytes());
        }
        elf.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, 2, 0, 0, 0] {
            elf.extend_from_slice(&v.to_le_bytes());
        }
        let segment = |kind: u32, flags: u32, words: [u64; 6]| {
            let mut header = Vec::new();
            header.extend_from_slice(&kind.to_le_bytes());
            header.extend_from_slice(&flags.to_le_bytes());
            for w in words {
                header.extend_from_slice(&w.to_le_bytes());
            }
            header
        };
        // PT_LOAD: offset 0xb0, at 1 MiB, 16 bytes in the file, an absurd memory size.
        elf.extend(segment(
            1,
            5,
            [
                0xb0,
                0x10_0000,
                0x10_0000,
                16,
                0x0d00_0000_0000_0010,
                0x1000,
            ],
        ));
        // PT_NOTE: the Xen PVH entry note after the code.
        elf.extend(segment(4, 4, [0xc0, 0, 0, 20, 20, 4]));
        elf.extend_from_slice(&[0xf4; 16]);
        for v in [4u32, 4, 18] {
            elf.extend_from_slice(&v.to_le_bytes());
        }
        elf.extend_from_slice(b"Xen\0");
        elf.extend_from_slice(&0x10_0000u32.to_le_bytes());
        let path = temp("huge-bss", &elf);
        let err = load(
            ram().memory(),
            &BootConfig {
                kernel: path.clone(),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                BootError::KernelOutsideRam {
                    start: 0x10_0000,
                    end: 0x0d00_0000_0010_0010,
                    ..
                }
            ),
            "{err}"
        );
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let path = temp("text", b"#!/bin/sh\necho not a kernel\n");
        let err = load(
            ram().memory(),
            &BootConfig {
                kernel: path.clone(),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert!(matches!(err, BootError::UnknownFormat { .. }), "{err}");
        assert!(err.to_string().contains("neither an ELF nor a bzImage"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn reports_missing_kernels_with_the_path() {
        let err = load(
            ram().memory(),
            &BootConfig {
                kernel: "/nonexistent/vmlinux".into(),
                ..Default::default()
            },
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "Cannot read kernel /nonexistent/vmlinux");
    }

    #[test]
    fn command_line_lands_nul_terminated() {
        let ram = ram();
        let range = write_cmdline(ram.memory(), "console=ttyS0 quiet").unwrap();
        let mut buf = [0u8; 20];
        vm_memory::Bytes::read_slice(ram.memory(), &mut buf, range.start).unwrap();
        assert_eq!(&buf, b"console=ttyS0 quiet\0");
        assert_eq!(range.len, 20);
    }

    #[test]
    fn overlong_command_lines_are_refused() {
        let ram = ram();
        assert!(write_cmdline(ram.memory(), &"x".repeat(CMDLINE_MAX)).is_err());
    }

    #[test]
    fn initrd_goes_page_aligned_to_the_top_of_low_ram() {
        let ram = ram();
        let path = temp("initrd", &[0xab; 5000]);
        let r = load_initrd(ram.memory(), &path, 2 << 20, None).unwrap();
        assert_eq!(r.start.0 % 4096, 0);
        assert!(r.start.0 + 5000 <= 32 << 20);
        assert!(r.start.0 + 5000 + 4096 > 32 << 20);
        let mut byte = [0u8];
        vm_memory::Bytes::read_slice(ram.memory(), &mut byte, r.start.unchecked_add(4999)).unwrap();
        assert_eq!(byte, [0xab]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn initrd_larger_than_memory_is_refused() {
        let ram = ram();
        let path = temp("big-initrd", &[]);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(40 << 20)
            .unwrap();
        assert!(matches!(
            load_initrd(ram.memory(), &path, 2 << 20, None),
            Err(BootError::InitrdTooLarge { .. })
        ));
        std::fs::remove_file(path).unwrap();
    }
}
