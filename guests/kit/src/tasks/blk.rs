//! The virtio-blk tasks: `blk-check`, `blk-write`, `blk-id`, `blk-bad` and `blk-bench`.
//!
//! Each task brings the device up, does its requests and resets the device again, so no task
//! depends on another. Sector contents follow the page stamp: sector `s` starts with the
//! little-endian word `page_stamp(seed, s)` and only that word is written or checked (the
//! guest runs emulated: a word per sector, not 512 bytes). The rest of a written sector is
//! whatever the buffer held.

use crate::cmdline::{BlkOp, MmioDevice};
use crate::serial::{begin_error, end_error, write_bytes, write_dec, write_hex, write_str};
use crate::virtio::blk::{
    self, Blk, SECTOR_SIZE, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use crate::virtio::{dma, Error};
use crate::{arch, ioapic, EXIT_CHECK_FAILED};
use veil_guest_abi::page_stamp;

/// Sectors in one request of `blk-check` and `blk-write`: a whole slot buffer.
const SECTORS_PER_REQUEST: u64 = dma::BUFFER_SIZE as u64 / SECTOR_SIZE;
// `blk-bench` takes sizes up to 64 KiB (cmdline.rs): one slot buffer each.
const _: () = assert!(dma::BUFFER_SIZE >= 65536);

fn name(op: &BlkOp) -> &'static str {
    match op {
        BlkOp::Check { .. } => "blk-check",
        BlkOp::Write { .. } => "blk-write",
        BlkOp::Log { .. } => "blk-log",
        BlkOp::Id => "blk-id",
        BlkOp::Irq => "blk-irq",
        BlkOp::Bad { .. } => "blk-bad",
        BlkOp::Bench { .. } => "blk-bench",
    }
}

/// Runs `op` on the `dev`-th transport, `device`.
pub fn run(op: &BlkOp, dev: u64, device: &MmioDevice) {
    let task = name(op);
    let mut blk = Blk::open(device.base, device.size)
        .unwrap_or_else(|e| super::device_error(task, dev, device, e));
    let result = match *op {
        BlkOp::Check {
            sector,
            count,
            seed,
        } => check(&mut blk, sector, count, seed),
        BlkOp::Write {
            sector,
            count,
            seed,
        } => write(&mut blk, sector, count, seed),
        BlkOp::Log {
            sector,
            count,
            seed,
        } => log(&mut blk, sector, count, seed),
        BlkOp::Id => id(&mut blk, dev),
        BlkOp::Irq => irq(&mut blk, dev, device.irq),
        BlkOp::Bad { sector, write, at } => {
            let sector = sector.unwrap_or(blk.capacity);
            bad(&mut blk, sector, write, at)
        }
        BlkOp::Bench {
            size,
            count,
            depth,
            write,
        } => bench(&mut blk, dev, size, count, depth, write),
    };
    if let Err(e) = result {
        super::device_failed(task, dev, e);
    }
}

/// Exits with status 2 when `sector..sector + count` is not on the disk.
fn on_disk(blk: &Blk, task: &str, sector: u64, count: u64) {
    if sector + count > blk.capacity {
        begin_error();
        write_str(task);
        write_str(": sectors ");
        write_dec(sector);
        write_str("..");
        write_dec(sector + count);
        write_str(" are not on the disk (");
        write_dec(blk.capacity);
        write_str(" sectors)");
        end_error();
    }
}

/// Why a request that should have succeeded did not: `<op> at sector S: status NAME (N)` and
/// exit 1.
fn failed_request(task: &str, op: &str, sector: u64, status: u8) -> ! {
    write_str(task);
    write_str(" FAILED: ");
    write_str(op);
    write_str(" at sector ");
    write_dec(sector);
    write_str(": status ");
    write_str(blk::status_name(status));
    write_str(" (");
    write_dec(status.into());
    write_str(")\n");
    arch::exit(EXIT_CHECK_FAILED)
}

/// The first word of sector `index` of a buffer.
#[inline]
fn word(buffer: *mut u8, index: u64) -> *mut u64 {
    buffer.wrapping_add((index * SECTOR_SIZE) as usize).cast()
}

fn check(blk: &mut Blk, sector: u64, count: u64, seed: u64) -> Result<(), Error> {
    on_disk(blk, "blk-check", sector, count);
    let buffer = blk.buffer(0);
    let mut s = sector;
    while s < sector + count {
        let n = SECTORS_PER_REQUEST.min(sector + count - s);
        let status = blk.request(blk::VIRTIO_BLK_T_IN, s, (n * SECTOR_SIZE) as u32)?;
        if status != VIRTIO_BLK_S_OK {
            failed_request("blk-check", "read", s, status);
        }
        for i in 0..n {
            // SAFETY: sector `i` of the slot's buffer (`n` sectors fit in it); the device
            // finished writing it (its request completed).
            let found = unsafe { word(buffer, i).read_volatile() };
            let expected = page_stamp(seed, s + i);
            if found != expected {
                write_str("blk-check FAILED at sector ");
                write_dec(s + i);
                write_str(": found ");
                write_hex(found);
                write_str(", expected ");
                write_hex(expected);
                write_str("\n");
                arch::exit(EXIT_CHECK_FAILED);
            }
        }
        s += n;
    }
    write_str("blk-check ok: ");
    write_dec(count);
    write_str(" sectors from sector ");
    write_dec(sector);
    write_str("\n");
    Ok(())
}

fn write(blk: &mut Blk, sector: u64, count: u64, seed: u64) -> Result<(), Error> {
    on_disk(blk, "blk-write", sector, count);
    let buffer = blk.buffer(0);
    let mut s = sector;
    while s < sector + count {
        let n = SECTORS_PER_REQUEST.min(sector + count - s);
        for i in 0..n {
            // SAFETY: sector `i` of the slot's buffer, which the device is not using.
            unsafe { word(buffer, i).write_volatile(page_stamp(seed, s + i)) };
        }
        let status = blk.request(blk::VIRTIO_BLK_T_OUT, s, (n * SECTOR_SIZE) as u32)?;
        if status != VIRTIO_BLK_S_OK {
            failed_request("blk-write", "write", s, status);
        }
        s += n;
    }
    let flushed = blk.can_flush();
    if flushed {
        let status = blk.request(blk::VIRTIO_BLK_T_FLUSH, 0, 0)?;
        if status != VIRTIO_BLK_S_OK {
            failed_request("blk-write", "flush", 0, status);
        }
    }
    write_str("blk-write ok: ");
    write_dec(count);
    write_str(" sectors from sector ");
    write_dec(sector);
    write_str(if flushed {
        ", flushed\n"
    } else {
        ", not flushed (no VIRTIO_BLK_F_FLUSH)\n"
    });
    Ok(())
}

/// Records between two progress lines of `blk-log`.
const LOG_PROGRESS_EVERY: u64 = 256;

fn log(blk: &mut Blk, sector: u64, count: u64, seed: u64) -> Result<(), Error> {
    on_disk(blk, "blk-log", sector, count);
    let buffer = blk.buffer(0);
    for i in 0..count {
        let s = sector + i;
        // SAFETY: the first sector of the slot's buffer, which the device is not using.
        unsafe { word(buffer, 0).write_volatile(page_stamp(seed, s)) };
        let status = blk.request(blk::VIRTIO_BLK_T_OUT, s, SECTOR_SIZE as u32)?;
        if status != VIRTIO_BLK_S_OK {
            failed_request("blk-log", "write", s, status);
        }
        if (i + 1) % LOG_PROGRESS_EVERY == 0 {
            write_str("blk-log: ");
            write_dec(i + 1);
            write_str(" records\n");
        }
    }
    check(blk, sector, count, seed)?;
    write_str("blk-log ok: ");
    write_dec(count);
    write_str(" records written and read back\n");
    Ok(())
}

fn id(blk: &mut Blk, dev: u64) -> Result<(), Error> {
    let status = blk.request(blk::VIRTIO_BLK_T_GET_ID, 0, VIRTIO_BLK_ID_BYTES)?;
    if status != VIRTIO_BLK_S_OK {
        failed_request("blk-id", "GET_ID", 0, status);
    }
    let buffer = blk.buffer(0);
    write_str("blk-id: dev ");
    write_dec(dev);
    write_str(": \"");
    for i in 0..VIRTIO_BLK_ID_BYTES as usize {
        // SAFETY: within the slot's buffer, which the device finished writing.
        let byte = unsafe { buffer.add(i).read_volatile() };
        if byte == 0 {
            break;
        }
        write_bytes(&[if byte.is_ascii_graphic() || byte == b' ' {
            byte
        } else {
            b'?'
        }]);
    }
    write_str("\", ");
    write_dec(blk.capacity);
    write_str(" sectors");
    write_str(if blk.read_only() {
        ", read-only\n"
    } else {
        "\n"
    });
    Ok(())
}

/// The vector `blk-irq` routes GSI `gsi` to: distinct per GSI (an IRR bit, never acknowledged,
/// stays set), above the 32 exception vectors.
fn irq_vector(gsi: u64) -> u8 {
    0x40 + gsi as u8
}

/// How long `blk-irq` waits for the vector after the request completed, in TSC ticks (well
/// under a second): the device raises its line right after it updates the used ring.
const IRQ_WAIT_TSC: u64 = 1_000_000_000;

fn irq(blk: &mut Blk, dev: u64, gsi: u64) -> Result<(), Error> {
    let Some(line) = ioapic::Line::for_gsi(gsi) else {
        begin_error();
        write_str("blk-irq: no IOAPIC input for irq ");
        write_dec(gsi);
        write_str(" (the kit knows GSIs 0..=47: IOAPICs at 0xfec00000 and 0xfec10000)");
        end_error()
    };
    let vector = irq_vector(gsi);
    if ioapic::irr_pending(vector) {
        begin_error();
        write_str("blk-irq: vector ");
        write_hex(vector.into());
        write_str(" is already pending (one blk-irq per device and boot)");
        end_error();
    }
    line.route(vector, arch::apic_id());
    blk.set_interrupts(true);
    let status = blk.request(blk::VIRTIO_BLK_T_IN, 0, SECTOR_SIZE as u32);
    let deadline = arch::rdtsc() + IRQ_WAIT_TSC;
    while !ioapic::irr_pending(vector) && arch::rdtsc() < deadline {
        arch::pause();
    }
    let pending = ioapic::irr_pending(vector);
    let interrupt_status = blk.take_interrupt_status();
    line.mask();
    let status = status?;
    if status != VIRTIO_BLK_S_OK {
        failed_request("blk-irq", "read", 0, status);
    }
    write_str(if pending {
        "blk-irq ok: dev "
    } else {
        "blk-irq FAILED: dev "
    });
    write_dec(dev);
    write_str(": irq ");
    write_dec(gsi);
    write_str(", vector ");
    write_hex(vector.into());
    write_str(if pending {
        " pending in the local APIC's IRR"
    } else {
        " not pending in the local APIC's IRR"
    });
    write_str(" (InterruptStatus ");
    write_hex(interrupt_status.into());
    write_str(")\n");
    if !pending {
        arch::exit(EXIT_CHECK_FAILED);
    }
    Ok(())
}

fn bad(blk: &mut Blk, sector: u64, write: bool, at: Option<u64>) -> Result<(), Error> {
    let (kind, op) = if write {
        (blk::VIRTIO_BLK_T_OUT, "write")
    } else {
        (blk::VIRTIO_BLK_T_IN, "read")
    };
    let len = SECTOR_SIZE as u32;
    let status = match at {
        Some(gpa) => blk.request_at(kind, sector, len, gpa)?,
        None => blk.request(kind, sector, len)?,
    };
    if status != VIRTIO_BLK_S_IOERR {
        write_str("blk-bad FAILED: ");
        write_str(op);
        write_str(" at sector ");
        write_dec(sector);
        write_str(": status ");
        write_str(blk::status_name(status));
        write_str(" (");
        write_dec(status.into());
        write_str("), expected IOERR\n");
        arch::exit(EXIT_CHECK_FAILED);
    }
    write_str("blk-bad ok: ");
    write_str(op);
    write_str(" at sector ");
    write_dec(sector);
    write_str(": status IOERR (1)\n");
    Ok(())
}

/// Times `count` requests of `size` bytes with up to `depth` in flight (all slots for
/// `None`), over the disk from sector 0 (wrapping), against the TSC timed by the PIT.
///
/// With several in flight, completions are reaped as long as the device has more, and the
/// refilled slots are published with one notification: the exit is the costly part here.
fn bench(
    blk: &mut Blk,
    dev: u64,
    size: u64,
    count: u64,
    depth: Option<u64>,
    write: bool,
) -> Result<(), Error> {
    let sectors = size / SECTOR_SIZE;
    let span = blk.capacity / sectors;
    if span == 0 {
        on_disk(blk, "blk-bench", 0, sectors);
    }
    let Some(tsc_hz) = super::paced::tsc_hz_by_pit() else {
        begin_error();
        write_str("blk-bench: cannot time the TSC: PIT channel 0 does not count");
        end_error()
    };
    let depth = depth.unwrap_or(u64::MAX).min(blk.slots() as u64).min(count);
    let kind = if write {
        blk::VIRTIO_BLK_T_OUT
    } else {
        blk::VIRTIO_BLK_T_IN
    };
    let len = size as u32;
    let (mut submitted, mut completed) = (0u64, 0u64);
    let mut sector = 0u64;
    let mut next_sector = || {
        let s = sector;
        sector = if sector + 2 * sectors > span * sectors {
            0
        } else {
            sector + sectors
        };
        s
    };

    let start = arch::rdtsc();
    while submitted < depth {
        blk.submit(submitted as usize, kind, next_sector(), len);
        submitted += 1;
    }
    blk.kick();
    while completed < count {
        let mut refilled = false;
        loop {
            let (slot, status) = blk.complete()?;
            if status != VIRTIO_BLK_S_OK {
                failed_request("blk-bench", if write { "write" } else { "read" }, 0, status);
            }
            completed += 1;
            if submitted < count {
                blk.submit(slot, kind, next_sector(), len);
                submitted += 1;
                refilled = true;
            }
            if !blk.has_completion() {
                break;
            }
        }
        if refilled {
            blk.kick();
        }
    }
    let ticks = (arch::rdtsc() - start).max(1);

    let micros = (ticks * 1_000_000 / tsc_hz).max(1);
    let bytes_per_s = count * size * 1_000_000 / micros;
    write_str("blk-bench: dev ");
    write_dec(dev);
    write_str(", ");
    write_dec(count);
    write_str(if write { " writes of " } else { " reads of " });
    write_dec(size);
    write_str(" bytes, depth ");
    write_dec(depth);
    write_str(": ");
    write_dec(count * 1_000_000 / micros);
    write_str(" requests/s, ");
    write_dec(bytes_per_s / 1_000_000);
    write_str(".");
    let hundredths = bytes_per_s / 10_000 % 100;
    if hundredths < 10 {
        write_str("0");
    }
    write_dec(hundredths);
    write_str(" MB/s (");
    write_dec(micros / 1000);
    write_str(" ms, TSC ");
    write_dec(tsc_hz / 1000);
    write_str(" kHz)\n");
    Ok(())
}
