//! Running the command line: check every task first, then run them in order.

use crate::cmdline::{MmioDevice, MmioDevices, PageRange, ParseError, Task, Tasks};
use crate::layout::{image_gfns, trampoline_gfn, MAX_CPUS};
use crate::memmap::RamMap;
use crate::serial::{begin_error, end_error, write_bytes, write_dec, write_hex, write_str};
use crate::{arch, paravirt, reset, smp, virtio, EXIT_CHECK_FAILED, EXIT_OK};
use veil_guest_abi::{page_stamp, PAGE_SIZE};

mod blk;
mod console;
mod paced;
mod vsock;

/// Most `virtio_mmio.device=` entries the kit takes.
const MAX_MMIO_DEVICES: usize = 16;

/// The command line's virtio-mmio transports, in order: `dev=D` is the D-th.
struct Devices {
    list: [MmioDevice; MAX_MMIO_DEVICES],
    len: usize,
}

impl Devices {
    /// Parses every `virtio_mmio.device=` word; a malformed one is reported like a bad task.
    fn new(cmdline: &[u8]) -> Self {
        let mut devices = Devices {
            list: [MmioDevice {
                base: 0,
                size: 0,
                irq: 0,
            }; MAX_MMIO_DEVICES],
            len: 0,
        };
        for device in MmioDevices::new(cmdline) {
            let device = device.unwrap_or_else(|e| report_parse_error(&e));
            if devices.len == MAX_MMIO_DEVICES {
                begin_error();
                write_str("more than ");
                write_dec(MAX_MMIO_DEVICES as u64);
                write_str(" virtio_mmio.device entries");
                end_error();
            }
            devices.list[devices.len] = device;
            devices.len += 1;
        }
        devices
    }

    fn get(&self, dev: u64) -> Option<&MmioDevice> {
        self.list[..self.len].get(usize::try_from(dev).ok()?)
    }
}

/// Runs the whole command line and exits: 0 when every task ran, 1 when a check failed, 2 on
/// a malformed line or a bad page range (reported before any task runs), or a task's own
/// status (`exit`, `fault`).
pub fn run_all(cmdline: &[u8], ram: &RamMap) -> ! {
    // Validate everything first, so a typo in the last task does not leave half-done work.
    let devices = Devices::new(cmdline);
    let mut tasks = 0;
    for task in Tasks::new(cmdline) {
        validate(
            &task.unwrap_or_else(|e| report_parse_error(&e)),
            ram,
            &devices,
        );
        tasks += 1;
    }
    if tasks == 0 {
        run(&Task::Greet, 0, &devices);
    }
    // After a `reset` task, carry on with the task that followed it.
    let resume_from = reset::take_resume_point();
    if resume_from > 0 {
        write_str("veil-kit: resumed after reset\n");
    }
    for (index, task) in Tasks::new(cmdline).enumerate().skip(resume_from) {
        run(
            &task.unwrap_or_else(|e| report_parse_error(&e)),
            index,
            &devices,
        );
    }
    arch::exit(EXIT_OK)
}

/// A device that cannot be set up: `<task>: dev D at BASE (irq I): <why>` and exit 2.
fn device_error(task: &str, dev: u64, device: &MmioDevice, e: virtio::Error) -> ! {
    begin_error();
    write_str(task);
    write_str(": dev ");
    write_dec(dev);
    write_str(" at ");
    write_hex(device.base);
    write_str(" (irq ");
    write_dec(device.irq);
    write_str("): ");
    e.write();
    end_error()
}

/// A device that failed mid-task: `<task> FAILED: dev D: <why>` and exit 1.
fn device_failed(task: &str, dev: u64, e: virtio::Error) -> ! {
    write_str(task);
    write_str(" FAILED: dev ");
    write_dec(dev);
    write_str(": ");
    e.write();
    write_str("\n");
    arch::exit(EXIT_CHECK_FAILED)
}

fn report_parse_error(e: &ParseError<'_>) -> ! {
    begin_error();
    write_str("bad task `");
    write_bytes(e.word);
    write_str("`: ");
    write_str(e.msg);
    if !e.item.is_empty() {
        write_str(" `");
        write_bytes(e.item);
        write_str("`");
    }
    end_error()
}

/// Exits with status 2 if `task` cannot run: pages outside RAM or inside the kit's own memory,
/// too many vCPUs, or a `dev=D` without its `virtio_mmio.device=` entry.
fn validate(task: &Task, ram: &RamMap, devices: &Devices) {
    let (name, range) = match task {
        Task::Blk { .. } | Task::Console { .. } | Task::Vsock { .. } => {
            let dev = task.dev().unwrap_or(0);
            if devices.get(dev).is_none() {
                begin_error();
                write_str("dev ");
                write_dec(dev);
                write_str(": the command line has ");
                write_dec(devices.len as u64);
                write_str(" virtio_mmio.device entries (dev counts them from 0)");
                end_error();
            }
            return;
        }
        Task::Stamp { range, cpus } => {
            if *cpus == 0 || *cpus > MAX_CPUS {
                begin_error();
                write_str("stamp: cpus must be 1..=");
                write_dec(MAX_CPUS);
                end_error();
            }
            ("stamp: ", range)
        }
        Task::Check(range) => ("check: ", range),
        Task::DirtyLoop { range, .. } => ("dirty-loop: ", range),
        Task::DirtyPaced { range, .. } => ("dirty-paced: ", range),
        Task::Kvmclock { gpa, .. } | Task::KvmclockWatch { gpa, .. } => {
            return validate(&Task::ReadSecret { gpa: *gpa, len: 32 }, ram, devices);
        }
        Task::WaitWord { gpa, .. } => {
            return validate(&Task::ReadSecret { gpa: *gpa, len: 8 }, ram, devices);
        }
        Task::ReadSecret { gpa, len } => {
            let range = PageRange {
                seed: 0,
                first: gpa / PAGE_SIZE,
                count: (gpa + len).div_ceil(PAGE_SIZE) - gpa / PAGE_SIZE,
                stride: 1,
            };
            return validate(&Task::Check(range), ram, devices);
        }
        _ => return,
    };
    if range.count == 0 {
        return;
    }
    if range.last().is_none() {
        begin_error();
        write_str(name);
        write_str("page range runs past the 52-bit physical address space");
        end_error();
    }
    if ram.end_gfn() == 0 {
        begin_error();
        write_str(name);
        write_str("the loader gave no memory map (hvm_start_info version 1 or later needed)");
        end_error();
    }
    if let Some(gfn) = ram
        .holes()
        .find_map(|(start, end)| range.first_hit(start, end))
    {
        begin_error();
        write_str(name);
        write_str("gfn ");
        write_hex(gfn);
        write_str(" is not RAM");
        end_error();
    }
    let (image_start, image_end) = image_gfns();
    let tramp = trampoline_gfn();
    if let Some(gfn) = range
        .first_hit(image_start, image_end)
        .or(range.first_hit(tramp, tramp + 1))
    {
        begin_error();
        write_str(name);
        write_str("gfn ");
        write_hex(gfn);
        write_str(" is the kit's own memory (image, page tables and stacks at gfns ");
        write_hex(image_start);
        write_str("..");
        write_hex(image_end);
        write_str(", AP trampoline at gfn ");
        write_hex(tramp);
        write_str(")");
        end_error();
    }
}

fn run(task: &Task, index: usize, devices: &Devices) {
    match *task {
        Task::Blk { dev, ref op } => {
            // `validate` checked the entry exists.
            if let Some(device) = devices.get(dev) {
                blk::run(op, dev, device);
            }
        }
        Task::Console { dev, ref op } => {
            if let Some(device) = devices.get(dev) {
                console::run(op, dev, device);
            }
        }
        Task::SerialEcho { count } => console::serial_echo(count),
        Task::Vsock { dev, ref op } => {
            if let Some(device) = devices.get(dev) {
                vsock::run(op, dev, device);
            }
        }
        Task::Spin => loop {
            arch::pause();
        },
        Task::Halt => arch::halt_forever(),
        Task::Hypercall {
            nr,
            gpa,
            pages,
            attrs,
            expect,
        } => {
            let result = paravirt::hypercall(paravirt::transport(), nr, gpa, pages, attrs);
            report_value("hypercall", result, expect);
        }
        Task::UartScratch(value) => {
            crate::arch::outb(veil_guest_abi::COM1_PORT + 7, value);
            write_str("uart-scratch ok: ");
            write_hex(u64::from(value));
            write_str("\n");
        }
        Task::MsrWrite { index, value } => {
            paravirt::wrmsr(index.unwrap_or(paravirt::MSR_KVM_MIGRATION_CONTROL), value);
            write_str("msr-write ");
            if let Some(index) = index {
                write_hex(u64::from(index));
                write_str(" ");
            }
            write_str("ok: ");
            write_hex(value);
            write_str("\n");
        }
        Task::MsrRead { index, expect } => {
            if let Some(index) = index {
                write_str("msr ");
                write_hex(u64::from(index));
                write_str(": ");
            }
            report_value(
                "msr-read",
                paravirt::rdmsr(index.unwrap_or(paravirt::MSR_KVM_MIGRATION_CONTROL)),
                expect,
            );
        }
        Task::DeadlineArm { ahead } => deadline_arm(ahead),
        Task::Kvmclock { gpa, on: true } => {
            if core::arch::x86_64::__cpuid(0x4000_0001).eax & KVM_FEATURE_CLOCKSOURCE2 == 0 {
                begin_error();
                write_str("kvmclock-on: CPUID offers no KVM_FEATURE_CLOCKSOURCE2");
                end_error();
            }
            paravirt::wrmsr(MSR_KVM_SYSTEM_TIME_NEW, gpa | 1);
            write_str("kvmclock-on ok: ");
            write_hex(gpa);
            write_str("\n");
        }
        Task::Kvmclock { gpa, on: false } => {
            write_str("kvmclock: ");
            write_dec(kvmclock_ns(gpa));
            write_str(" ns\n");
        }
        Task::KvmclockWatch { gpa, every_ms } => kvmclock_watch(gpa, every_ms),
        Task::DeadlineCheck => deadline_check(),
        Task::CpuidHash => {
            let (hash, leaves) = cpuid_hash();
            write_str("cpuid-hash: ");
            write_hex(hash);
            write_str(" (");
            write_dec(leaves);
            write_str(" leaves)\n");
        }
        Task::WaitWord { gpa, value } => {
            write_str("wait-word: waiting for ");
            write_hex(value);
            write_str(" at ");
            write_hex(gpa);
            write_str("\n");
            // SAFETY: `validate` checked the word is identity-mapped RAM outside the kit, and
            // the gpa is 8-byte aligned.
            while unsafe { (gpa as *const u64).read_volatile() } != value {
                arch::pause();
            }
            write_str("wait-word ok\n");
        }
        Task::Reset => reset::reset_and_resume_at(index + 1),
        Task::HypercallBench(count) => hypercall_bench(count),
        Task::ReadSecret { gpa, len } => {
            write_str("secret: ");
            for i in 0..len {
                // SAFETY: `validate` checked the bytes are identity-mapped RAM outside the kit.
                let byte = unsafe { ((gpa + i) as *const u8).read_volatile() };
                let hex = b"0123456789abcdef";
                write_bytes(&[hex[usize::from(byte >> 4)], hex[usize::from(byte & 0xf)]]);
            }
            write_str("\n");
        }
        Task::DirtyLoop { range, check_every } => {
            write_str("dirty-loop: stamping ");
            write_dec(range.count);
            write_str(" pages forever\n");
            stamp(&range, 0, range.count);
            let Some(every) = check_every else {
                loop {
                    stamp(&range, 0, range.count);
                }
            };
            // Each round checks what the last one wrote, so a page lost or stale after a
            // migration stops the guest wherever it runs.
            let mut round = 1u64;
            loop {
                if let Err(mismatch) = check(&range) {
                    fail_check("dirty-loop check", mismatch);
                }
                stamp(&range, 0, range.count);
                if round.is_multiple_of(every) {
                    write_str("dirty-loop: round ");
                    write_dec(round);
                    write_str(" checked\n");
                }
                round += 1;
            }
        }
        Task::DirtyPaced { range, rate } => paced::dirty_paced(range.first, range.count, rate),
        Task::ShareAlternate { first, count } => {
            let transport = paravirt::transport();
            for gfn in (first..first + count).step_by(2) {
                let result = paravirt::hypercall(transport, 12, gfn * PAGE_SIZE, 1, 0);
                if result != 0 {
                    report_value("share-alternate", result, 0);
                }
            }
            write_str("share-alternate ok: ");
            write_dec(count.div_ceil(2));
            write_str(" pages shared\n");
        }
        Task::Greet => write_str(veil_guest_abi::KIT_GREETING),
        Task::Stamp { range, cpus } => {
            if cpus == 1 {
                stamp(&range, 0, range.count);
            } else {
                smp::stamp_parallel(&range, cpus);
            }
            write_str("stamped ");
            write_dec(range.count);
            write_str(" pages on ");
            write_dec(cpus);
            write_str(" vCPUs\n");
        }
        Task::Check(range) => match check(&range) {
            Ok(()) => {
                write_str("check ok: ");
                write_dec(range.count);
                write_str(" pages\n");
            }
            Err(mismatch) => fail_check("check", mismatch),
        },
        Task::Fault => {
            // SAFETY: `ud2` raises #UD on purpose; there is no IDT, so the VMM sees the fault
            // (or a triple fault) and nothing after it runs.
            unsafe { core::arch::asm!("ud2", options(noreturn, nomem, nostack)) }
        }
        Task::Exit(code) => arch::exit(code),
    }
}

/// Prints `<what> FAILED at gfn G: found X, expected Y` and stops the guest with status 1.
fn fail_check(
    what: &str,
    Mismatch {
        gfn,
        found,
        expected,
    }: Mismatch,
) -> ! {
    write_str(what);
    write_str(" FAILED at gfn ");
    write_hex(gfn);
    write_str(": found ");
    write_hex(found);
    write_str(", expected ");
    write_hex(expected);
    write_str("\n");
    arch::exit(EXIT_CHECK_FAILED)
}

/// Prints `<what> ok: <value>`, or a failure and exits with status 1.
fn report_value(what: &str, value: u64, expect: u64) {
    write_str(what);
    if value == expect {
        write_str(" ok: ");
        write_hex(value);
        write_str("\n");
    } else {
        write_str(" FAILED: got ");
        write_hex(value);
        write_str(", expected ");
        write_hex(expect);
        write_str("\n");
        arch::exit(EXIT_CHECK_FAILED);
    }
}

/// `MSR_KVM_SYSTEM_TIME_NEW` (Documentation/virt/kvm/x86/msr.rst): the guest-physical
/// address of this vCPU's `pvclock_vcpu_time_info`, bit 0 enabling it.
const MSR_KVM_SYSTEM_TIME_NEW: u32 = 0x4b56_4d01;
/// `KVM_FEATURE_CLOCKSOURCE2` in CPUID 0x40000001 EAX (Documentation/virt/kvm/x86/cpuid.rst).
const KVM_FEATURE_CLOCKSOURCE2: u32 = 1 << 3;

/// One consistent reading of kvmclock: the guest's time, the TSC it was scaled from, and the
/// scale the host published.
struct KvmclockReading {
    ns: u64,
    tsc: u64,
    mul: u32,
    shift: i8,
}

/// The guest's time in ns by kvmclock.
fn kvmclock_ns(gpa: u64) -> u64 {
    kvmclock_read(gpa).ns
}

/// Reads `pvclock_vcpu_time_info` at `gpa` (version u32, pad, tsc_timestamp u64, system_time
/// u64, tsc_to_system_mul u32, tsc_shift i8, flags u8) until its version is even and unchanged,
/// scaled from the TSC as Linux's `pvclock_scale_delta`.
fn kvmclock_read(gpa: u64) -> KvmclockReading {
    let read = |offset: u64| {
        // SAFETY: `validate` checked the 32 bytes are identity-mapped RAM outside the kit, and
        // `gpa` is 32-byte aligned, so every field is aligned.
        unsafe { ((gpa + offset) as *const u64).read_volatile() }
    };
    loop {
        let version = read(0) as u32;
        if version & 1 != 0 {
            continue;
        }
        let (tsc_timestamp, system_time, scale) = (read(8), read(16), read(24));
        let tsc = arch::rdtsc();
        if read(0) as u32 != version {
            continue;
        }
        let (mul, shift) = (scale as u32, (scale >> 32) as u8 as i8);
        let mut delta = tsc.wrapping_sub(tsc_timestamp);
        if shift < 0 {
            delta >>= -shift;
        } else {
            delta <<= shift;
        }
        let ns = system_time.wrapping_add(((u128::from(delta) * u128::from(mul)) >> 32) as u64);
        return KvmclockReading {
            ns,
            tsc,
            mul,
            shift,
        };
    }
}

/// Watches kvmclock and the TSC forever: a migration in between must keep both monotonic.
fn kvmclock_watch(gpa: u64, every_ms: u64) -> ! {
    let every_ns = every_ms * 1_000_000;
    let mut last = kvmclock_read(gpa);
    let mut next_report = last.ns;
    loop {
        let now = kvmclock_read(gpa);
        if now.ns < last.ns || now.tsc < last.tsc {
            begin_error();
            write_str("kvmclock-watch: went back: ");
            write_dec(last.ns);
            write_str(" ns tsc ");
            write_dec(last.tsc);
            write_str(" -> ");
            write_dec(now.ns);
            write_str(" ns tsc ");
            write_dec(now.tsc);
            end_error();
        }
        if now.ns >= next_report {
            write_str("kvmclock: ");
            write_dec(now.ns);
            write_str(" ns tsc ");
            write_dec(now.tsc);
            write_str(" mul ");
            write_hex(u64::from(now.mul));
            write_str(if now.shift < 0 { " shift -" } else { " shift " });
            write_dec(u64::from(now.shift.unsigned_abs()));
            write_str("\n");
            next_report = now.ns.saturating_add(every_ns);
        }
        last = now;
    }
}

/// `MSR_IA32_TSC_DEADLINE` (Intel SDM vol. 3A, 11.5.4.1).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// The LAPIC's LVT timer register.
const LAPIC_LVT_TIMER: u64 = 0x320;
/// LVT timer bits: masked (16), TSC-deadline mode (bits 18:17 = 0b10).
const LVT_MASKED: u32 = 1 << 16;
const LVT_TIMER_MODE_MASK: u32 = 0b11 << 17;
const LVT_TIMER_TSC_DEADLINE: u32 = 0b10 << 17;
/// The vector it would raise (never: it is masked and interrupts stay off).
const DEADLINE_VECTOR: u32 = 0x40;
/// CPUID leaf 1 ECX bit 24: TSC-deadline timer.
const CPUID_1_ECX_TSC_DEADLINE: u32 = 1 << 24;

/// The deadline `deadline-arm` set, for `deadline-check` (kit data migrates with the guest).
static ARMED_DEADLINE: core::sync::atomic::AtomicU64 = core::sync::atomic::AtomicU64::new(0);

fn deadline_arm(ahead: u64) {
    if core::arch::x86_64::__cpuid(1).ecx & CPUID_1_ECX_TSC_DEADLINE == 0 {
        begin_error();
        write_str("deadline-arm: CPUID offers no TSC-deadline timer");
        end_error();
    }
    smp::lapic_write(
        LAPIC_LVT_TIMER,
        LVT_MASKED | LVT_TIMER_TSC_DEADLINE | DEADLINE_VECTOR,
    );
    let deadline = arch::rdtsc() + ahead;
    paravirt::wrmsr(MSR_IA32_TSC_DEADLINE, deadline);
    ARMED_DEADLINE.store(deadline, core::sync::atomic::Ordering::Relaxed);
    write_str("deadline-arm ok: ");
    write_hex(deadline);
    write_str("\n");
}

fn deadline_check() {
    let lvt = smp::lapic_read(LAPIC_LVT_TIMER);
    if lvt & LVT_TIMER_MODE_MASK != LVT_TIMER_TSC_DEADLINE {
        write_str("deadline-check FAILED: LVT timer ");
        write_hex(u64::from(lvt));
        write_str(" is not in TSC-deadline mode\n");
        arch::exit(EXIT_CHECK_FAILED);
    }
    report_value(
        "deadline-check",
        paravirt::rdmsr(MSR_IA32_TSC_DEADLINE),
        ARMED_DEADLINE.load(core::sync::atomic::Ordering::Relaxed),
    );
}

/// Leaves with subleaves get this many hashed (indices 0..8); the others repeat leaf 0's
/// answer, which changes nothing between two runs.
const CPUID_SUBLEAVES: u32 = 8;

/// An FNV-1a hash of every CPUID leaf and subleaf the guest can see: the basic range up to
/// leaf 0's maximum, KVM's hypervisor leaves (0x40000000 up to its maximum) and Veil's
/// (0x40000100 up), the extended range up to 0x80000000's maximum (each range capped at 64
/// leaves), subleaves 0..8 of each. Returns it and the number of leaves.
fn cpuid_hash() -> (u64, u64) {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET;
    let mut leaves = 0;
    for base in [0, 0x4000_0000, 0x4000_0100, 0x8000_0000u32] {
        let max = core::arch::x86_64::__cpuid(base).eax;
        if max < base || max - base > 0x40 {
            // No such range (an unrelated answer), or an implausible one.
            continue;
        }
        for leaf in base..=max {
            for sub in 0..CPUID_SUBLEAVES {
                let r = core::arch::x86_64::__cpuid_count(leaf, sub);
                for word in [leaf, sub, r.eax, r.ebx, r.ecx, r.edx] {
                    for byte in word.to_le_bytes() {
                        hash = (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME);
                    }
                }
            }
            leaves += 1;
        }
    }
    (hash, leaves)
}

/// Average TSC cycles of a hypercall round trip (a valid MAP_GPA_RANGE of the kit's first RAM
/// page above its image... any page: it is marked shared then private again) and of a bare I/O
/// exit, measured alternately so both see the same host conditions.
fn hypercall_bench(count: u64) {
    let transport = paravirt::transport();
    let (image_start, _) = image_gfns();
    let gpa = (image_start - 1) * PAGE_SIZE;
    let (mut hypercall_cycles, mut exit_cycles) = (0u64, 0u64);
    for i in 0..count {
        let t0 = arch::rdtsc();
        let attrs = if i % 2 == 0 { 0 } else { 0x10 };
        paravirt::hypercall(transport, 12, gpa, 1, attrs);
        let t1 = arch::rdtsc();
        paravirt::bare_exit(transport, 12, gpa, 1, attrs);
        let t2 = arch::rdtsc();
        hypercall_cycles += t1 - t0;
        exit_cycles += t2 - t1;
    }
    write_str("hcbench: ");
    write_dec(count);
    write_str(" round trips, hypercall ");
    write_dec(hypercall_cycles / count);
    write_str(" cycles, bare exit ");
    write_dec(exit_cycles / count);
    write_str(" cycles\n");
}

/// Stamps pages `from..to` of `range`: one 8-byte store per page, the first word.
///
/// This is the kit's hot loop (a dozen instructions per page; see `page_stamp`).
pub fn stamp(range: &PageRange, from: u64, to: u64) {
    let mut gfn = range.gfn(from);
    for _ in from..to {
        // SAFETY: `validate` checked that every frame of the range is identity-mapped RAM
        // outside the kit's own memory.
        unsafe { ((gfn * PAGE_SIZE) as *mut u64).write_volatile(page_stamp(range.seed, gfn)) };
        gfn += range.stride;
    }
}

struct Mismatch {
    gfn: u64,
    found: u64,
    expected: u64,
}

fn check(range: &PageRange) -> Result<(), Mismatch> {
    let mut gfn = range.first;
    for _ in 0..range.count {
        // SAFETY: `validate` checked that every frame of the range is identity-mapped RAM.
        let found = unsafe { ((gfn * PAGE_SIZE) as *const u64).read_volatile() };
        let expected = page_stamp(range.seed, gfn);
        if found != expected {
            return Err(Mismatch {
                gfn,
                found,
                expected,
            });
        }
        gfn += range.stride;
    }
    Ok(())
}
