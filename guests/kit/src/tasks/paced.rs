//! `dirty-paced`: dirty memory at a set rate, one write per page, paced against the TSC, whose
//! frequency the guest measures itself against the PIT.
//!
//! The PIT is the one clock of known frequency that both Veil and QEMU `-M microvm` give a
//! guest; CPUID's TSC frequency leaves are absent on the project's hosts.

use core::arch::asm;

use crate::arch::{self, outb};
use crate::serial::{begin_error, end_error, write_dec, write_hex, write_str};
use veil_guest_abi::PAGE_SIZE;

/// The PIT's input clock, Hz.
const PIT_HZ: u64 = 1_193_182;
const PIT_CHANNEL0: u16 = 0x40;
const PIT_COMMAND: u16 = 0x43;
/// Channel 0, low then high byte, mode 0 (one interrupt at terminal count, which the kit never
/// takes: interrupts stay off), binary.
const PIT_CH0_MODE0: u8 = 0x30;
/// Latch channel 0's count for reading.
const PIT_CH0_LATCH: u8 = 0x00;
/// The calibration window in PIT ticks: 100 ms, long enough that the ~10 us an emulated poll
/// takes here is a 0.01% error.
const CALIBRATION_TICKS: u64 = 119_318;
/// Give up on a counter that does not move after this many TSC ticks (seconds at any clock).
const CALIBRATION_TIMEOUT_TSC: u64 = 20_000_000_000;
/// Pages written between two looks at the TSC: the pacing granularity.
const BATCH: u64 = 16;

/// Reads I/O port `port`.
#[inline]
fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: reading a PIT register has no effect on memory.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nostack, preserves_flags)) }
    value
}

/// PIT channel 0's current count, latched so both bytes belong to the same instant.
fn pit_count() -> u16 {
    outb(PIT_COMMAND, PIT_CH0_LATCH);
    let low = inb(PIT_CHANNEL0);
    u16::from_le_bytes([low, inb(PIT_CHANNEL0)])
}

/// TSC ticks per second, timed against PIT channel 0's count read back over 100 ms, or `None`
/// if the count does not move.
///
/// Not Linux's way (channel 2 gated and read through port 0x61): QEMU's microvm has no port
/// 0x61, while both Veil and microvm serve channel 0 (KVM's in-kernel i8254, or QEMU's own).
/// Polls come far closer than the counter's 55 ms wrap, so 16-bit differences add up.
pub fn tsc_hz_by_pit() -> Option<u64> {
    outb(PIT_COMMAND, PIT_CH0_MODE0);
    outb(PIT_CHANNEL0, 0xff);
    outb(PIT_CHANNEL0, 0xff);
    let mut last = pit_count();
    let start = arch::rdtsc();
    let mut ticks = 0u64;
    loop {
        let count = pit_count();
        let now = arch::rdtsc();
        // The count runs down.
        ticks += u64::from(last.wrapping_sub(count));
        last = count;
        if ticks >= CALIBRATION_TICKS {
            return Some((now - start) * PIT_HZ / ticks).filter(|&hz| hz > 0);
        }
        if now - start > CALIBRATION_TIMEOUT_TSC {
            return None;
        }
    }
}

/// Writes one word to each page of `first..first + count` in turn, `rate` pages a second,
/// forever; prints the TSC frequency once and the rate achieved about every second.
///
/// Each page gets `pass << 40 | gfn` (`pass` counts from 1), so no write leaves a page as it
/// was and none is a zero page.
pub fn dirty_paced(first: u64, count: u64, rate: u64) -> ! {
    let Some(tsc_hz) = tsc_hz_by_pit() else {
        begin_error();
        write_str("dirty-paced: cannot time the TSC: PIT channel 0 does not count");
        end_error()
    };
    write_str("dirty-paced: TSC ");
    write_dec(tsc_hz / 1000);
    write_str(" kHz (by PIT channel 0); ");
    write_dec(rate);
    write_str(" pages/s over ");
    write_dec(count);
    write_str(" pages from gfn ");
    write_hex(first);
    write_str("\n");

    // Integer ticks per batch: at 3 GHz and 12,800 pages/s the rounding is below 1e-6.
    let batch_ticks = tsc_hz * BATCH / rate;
    let (start, end) = (first * PAGE_SIZE, (first + count) * PAGE_SIZE);
    let mut addr = start;
    let mut pass = 1u64;
    let mut deadline = arch::rdtsc();
    let mut report = Report::new(deadline, tsc_hz);
    loop {
        for _ in 0..BATCH {
            // SAFETY: `validate` checked that every frame of the range is identity-mapped RAM
            // outside the kit's own memory.
            unsafe { (addr as *mut u64).write_volatile((pass << 40) | (addr / PAGE_SIZE)) };
            addr += PAGE_SIZE;
            if addr == end {
                addr = start;
                pass += 1;
            }
        }
        let mut now = arch::rdtsc();
        // Never more than a batch ahead: keeps pacing sane should the TSC jump back (a VMM
        // that does not carry it over on migration).
        deadline = (deadline + batch_ticks).min(now + batch_ticks);
        while now < deadline {
            arch::pause();
            now = arch::rdtsc();
        }
        // A guest held up (paused for a migration, or too slow) does not burst to catch up:
        // it owes at most one batch.
        deadline = deadline.max(now.saturating_sub(batch_ticks));
        report.pages(BATCH, now);
    }
}

/// Prints the pages written per second about once a second.
struct Report {
    since: u64,
    pages: u64,
    tsc_hz: u64,
}

impl Report {
    fn new(now: u64, tsc_hz: u64) -> Self {
        Report {
            since: now,
            pages: 0,
            tsc_hz,
        }
    }

    fn pages(&mut self, pages: u64, now: u64) {
        if now < self.since {
            // The TSC went back: start counting again.
            *self = Report::new(now, self.tsc_hz);
            return;
        }
        self.pages += pages;
        let ticks = now - self.since;
        if ticks < self.tsc_hz {
            return;
        }
        write_str("dirty-paced: ");
        write_dec(self.pages * self.tsc_hz / ticks);
        write_str(" pages/s (");
        write_dec(self.pages);
        write_str(" pages in ");
        write_dec(ticks * 1000 / self.tsc_hz);
        write_str(" ms)\n");
        // The line itself took time: start the next second after it.
        self.since = arch::rdtsc();
        self.pages = 0;
    }
}
