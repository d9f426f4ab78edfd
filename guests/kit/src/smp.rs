//! `stamp:...,cpus=C`: start C-1 application processors with INIT-SIPI-SIPI and let every vCPU
//! stamp its own contiguous chunk of the pages.
//!
//! APs are woken by APIC id (1, 2, ... skipping the BSP's), so the VM must have at least C
//! vCPUs with consecutive APIC ids from 0, as QEMU and Veil create them. Each AP takes an
//! arrival ticket (0-based) in the entry stub and stamps chunk `ticket + 1`; the BSP stamps
//! chunk 0. Finished APs `hlt` with interrupts off; the next parallel stamp wakes them with a
//! fresh INIT-SIPI-SIPI.

use crate::cmdline::PageRange;
use crate::entry::{kit_trampoline_end, kit_trampoline_start};
use crate::layout::TRAMPOLINE_BASE;
use crate::paging::LAPIC_BASE;
use crate::serial::{begin_error, end_error, write_dec, write_str};
use crate::{arch, tasks};
use core::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

/// Incremented with `lock xadd` by each AP in the entry stub: its arrival ticket.
pub static AP_ARRIVALS: AtomicU32 = AtomicU32::new(0);
/// Incremented by each AP when its chunk is stamped.
static AP_DONE: AtomicU32 = AtomicU32::new(0);

/// The job, published before the SIPIs (the APs read it after their `lock xadd`).
static JOB_SEED: AtomicU64 = AtomicU64::new(0);
static JOB_FIRST: AtomicU64 = AtomicU64::new(0);
static JOB_COUNT: AtomicU64 = AtomicU64::new(0);
static JOB_STRIDE: AtomicU64 = AtomicU64::new(1);
static JOB_CPUS: AtomicU64 = AtomicU64::new(1);

/// How long the BSP waits for the APs to arrive, in TSC ticks: a few seconds on the project's
/// hosts (the TSC runs at host speed even when the guest is emulated); an AP takes
/// microseconds on hardware and milliseconds emulated.
const AP_START_TIMEOUT_TSC: u64 = 10_000_000_000;

// xAPIC registers (offsets from LAPIC_BASE).
pub const LAPIC_SVR: u64 = 0xf0;
const LAPIC_ICR_LOW: u64 = 0x300;
const LAPIC_ICR_HIGH: u64 = 0x310;
pub const SVR_APIC_ENABLE: u32 = 1 << 8;
const ICR_DELIVERY_PENDING: u32 = 1 << 12;
/// INIT, level assert.
const ICR_INIT: u32 = 0x4500;
/// Start-up IPI; the low byte is the vector (the trampoline's page number).
const ICR_STARTUP: u32 = 0x4600;

pub fn lapic_read(reg: u64) -> u32 {
    // SAFETY: LAPIC_BASE is identity-mapped (uncached); reading a register has no side effect.
    unsafe { ((LAPIC_BASE + reg) as *const u32).read_volatile() }
}

pub fn lapic_write(reg: u64, value: u32) {
    // SAFETY: as for `lapic_read`; the registers written here only send IPIs or enable the
    // APIC, and interrupts stay disabled on every vCPU.
    unsafe { ((LAPIC_BASE + reg) as *mut u32).write_volatile(value) }
}

/// Sends one IPI to `apic_id` and waits until the LAPIC has accepted it.
fn send_ipi(apic_id: u8, icr_low: u32) {
    lapic_write(LAPIC_ICR_HIGH, u32::from(apic_id) << 24);
    lapic_write(LAPIC_ICR_LOW, icr_low);
    while lapic_read(LAPIC_ICR_LOW) & ICR_DELIVERY_PENDING != 0 {
        arch::pause();
    }
}

/// The first `index` of `range` that chunk `chunk` of `chunks` starts at.
fn chunk_start(range: &PageRange, chunk: u64, chunks: u64) -> u64 {
    // count < 2^52 and chunks <= MAX_CPUS, so the product cannot overflow.
    range.count * chunk / chunks
}

/// Stamps `range` on `cpus` vCPUs (BSP included); exits with status 2 if the APs do not start.
pub fn stamp_parallel(range: &PageRange, cpus: u64) {
    // The trampoline must be at its page before any SIPI names it.
    // SAFETY: the linker symbols delimit the trampoline bytes in the image; TRAMPOLINE_BASE
    // is a free RAM page reserved for it (tasks refuse to stamp it); the boot data that lived
    // in low memory has been copied out already.
    unsafe {
        let start = core::ptr::addr_of!(kit_trampoline_start);
        let len = core::ptr::addr_of!(kit_trampoline_end) as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE_BASE as *mut u8, len);
    }
    JOB_SEED.store(range.seed, Ordering::Relaxed);
    JOB_FIRST.store(range.first, Ordering::Relaxed);
    JOB_COUNT.store(range.count, Ordering::Relaxed);
    JOB_STRIDE.store(range.stride, Ordering::Relaxed);
    JOB_CPUS.store(cpus, Ordering::Relaxed);
    AP_ARRIVALS.store(0, Ordering::Relaxed);
    AP_DONE.store(0, Ordering::Relaxed);
    // Everything above is visible before the APs run (they start from our IPI writes).
    fence(Ordering::SeqCst);

    // Software-enable the LAPIC (spurious vector 0xff); interrupts stay off (no `sti`).
    lapic_write(LAPIC_SVR, lapic_read(LAPIC_SVR) | SVR_APIC_ENABLE | 0xff);
    let bsp = arch::apic_id();
    let vector = (TRAMPOLINE_BASE >> 12) as u32;
    let aps = (cpus - 1) as u32;
    for apic_id in (0..=u8::MAX).filter(|&id| id != bsp).take(aps as usize) {
        // INIT puts the AP in wait-for-SIPI (also if it halted after an earlier stamp); the
        // second SIPI is the one the MP spec prescribes, ignored by an AP that already started.
        send_ipi(apic_id, ICR_INIT);
        send_ipi(apic_id, ICR_STARTUP | vector);
        send_ipi(apic_id, ICR_STARTUP | vector);
    }

    tasks::stamp(range, 0, chunk_start(range, 1, cpus));

    let deadline = arch::rdtsc().wrapping_add(AP_START_TIMEOUT_TSC);
    while AP_ARRIVALS.load(Ordering::Acquire) < aps {
        if arch::rdtsc() > deadline {
            begin_error();
            write_str("stamp: only ");
            write_dec(AP_ARRIVALS.load(Ordering::Acquire).into());
            write_str(" of ");
            write_dec(aps.into());
            write_str(" application processors started (does the VM have ");
            write_dec(cpus);
            write_str(" vCPUs?)");
            end_error();
        }
        arch::pause();
    }
    while AP_DONE.load(Ordering::Acquire) < aps {
        arch::pause();
    }
}

/// Called by the entry stub on an AP, on its own stack, with its arrival ticket.
pub extern "C" fn ap_main(ticket: u32) -> ! {
    let cpus = JOB_CPUS.load(Ordering::Acquire);
    let chunk = u64::from(ticket) + 1;
    if chunk < cpus {
        let range = PageRange {
            seed: JOB_SEED.load(Ordering::Relaxed),
            first: JOB_FIRST.load(Ordering::Relaxed),
            count: JOB_COUNT.load(Ordering::Relaxed),
            stride: JOB_STRIDE.load(Ordering::Relaxed),
        };
        tasks::stamp(
            &range,
            chunk_start(&range, chunk, cpus),
            chunk_start(&range, chunk + 1, cpus),
        );
        AP_DONE.fetch_add(1, Ordering::Release);
    }
    arch::halt_forever()
}
