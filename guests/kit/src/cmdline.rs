//! The kit's command line: space-separated tasks, each `name` or `name:key=value,...`.
//!
//! Numbers are decimal or `0x` hex. Parsing allocates nothing: [`Tasks`] walks the line and
//! yields one [`Task`] (or the first error) per word.
//!
//! Words `virtio_mmio.device=SIZE@BASE:IRQ[:ID]` are not tasks but virtio-mmio transports, in
//! the format Linux's CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES parses (drivers/virtio/virtio_mmio.c,
//! `vm_cmdline_set`): Veil appends one per device, and QEMU microvm's are given with `-append`.
//! [`MmioDevices`] yields them in order; `dev=D` in a task is the D-th of them (0-based).

/// A page range: `count` pages starting at frame `first`, `stride` frames apart, stamped or
/// checked with `seed`.
#[derive(Clone, Copy)]
pub struct PageRange {
    pub seed: u64,
    pub first: u64,
    pub count: u64,
    pub stride: u64,
}

impl PageRange {
    /// The `index`-th frame of the range (`index < count`, validated not to overflow).
    #[inline]
    pub fn gfn(&self, index: u64) -> u64 {
        self.first + index * self.stride
    }

    /// The last frame, or `None` if it does not fit in a 52-bit physical address.
    pub fn last(&self) -> Option<u64> {
        let last = self
            .first
            .checked_add(self.count.checked_sub(1)?.checked_mul(self.stride)?)?;
        (last < 1 << (52 - 12)).then_some(last)
    }

    /// The lowest frame of the range inside `[start, end)`, if any (no page-by-page scan: the
    /// guest runs emulated).
    pub fn first_hit(&self, start: u64, end: u64) -> Option<u64> {
        let last = self.last()?;
        if end <= self.first || start > last {
            return None;
        }
        let index = start.saturating_sub(self.first).div_ceil(self.stride);
        let gfn = self.gfn(index);
        (index < self.count && gfn < end).then_some(gfn)
    }
}

/// One task of the command line.
#[derive(Clone, Copy)]
pub enum Task {
    Greet,
    Stamp {
        range: PageRange,
        cpus: u64,
    },
    Check(PageRange),
    Fault,
    Exit(u8),
    /// Loop forever (until the VMM stops the VM).
    Spin,
    /// `cli; hlt` for good: the vCPU gives its core back to the host (until the VMM stops it).
    Halt,
    /// `KVM_HC_MAP_GPA_RANGE` (or hypercall `nr`) with a result to expect.
    Hypercall {
        nr: u64,
        gpa: u64,
        pages: u64,
        attrs: u64,
        expect: u64,
    },
    /// Write an MSR (`MSR_KVM_MIGRATION_CONTROL` unless `index` is given).
    MsrWrite {
        index: Option<u32>,
        value: u64,
    },
    /// Write the UART's scratch register: device state a migration must carry.
    UartScratch(u8),
    /// Read an MSR (`MSR_KVM_MIGRATION_CONTROL` unless `index` is given) and expect a value.
    MsrRead {
        index: Option<u32>,
        expect: u64,
    },
    /// Hash every CPUID leaf and subleaf the guest can see.
    CpuidHash,
    /// Put the LAPIC timer, masked, in TSC-deadline mode and arm it `ahead` TSC ticks on.
    DeadlineArm {
        ahead: u64,
    },
    /// Check that the LAPIC timer is still in TSC-deadline mode with the armed deadline.
    DeadlineCheck,
    /// Enable kvmclock with its time structure at `gpa` (`on`), or read the time from it.
    Kvmclock {
        gpa: u64,
        on: bool,
    },
    /// Read kvmclock and the TSC over and over, forever, printing both and the pvclock scale
    /// every `every_ms` of guest time, and stopping with an error if either ever goes back.
    KvmclockWatch {
        gpa: u64,
        every_ms: u64,
    },
    /// Wait until the 8-byte word at guest-physical `gpa` holds `value` (the host writes it).
    WaitWord {
        gpa: u64,
        value: u64,
    },
    /// Reset the machine; the tasks after this one run after the reboot.
    Reset,
    /// Time `count` hypercall round trips against as many bare I/O exits.
    HypercallBench(u64),
    /// Print `len` bytes at guest-physical `gpa` in hex (an injected launch secret).
    ReadSecret {
        gpa: u64,
        len: u64,
    },
    /// Stamp the range over and over, forever: a guest that keeps dirtying memory. With
    /// `check_every`, each round first checks the stamps of the last one, and every that many
    /// rounds says so.
    DirtyLoop {
        range: PageRange,
        check_every: Option<u64>,
    },
    /// Write one word per page of the range (seed unused), `rate` pages a second, forever.
    DirtyPaced {
        range: PageRange,
        rate: u64,
    },
    /// Share every other page of `count` pages from `first`: the worst case for a run list.
    ShareAlternate {
        first: u64,
        count: u64,
    },
    /// A virtio-blk task on the `dev`-th `virtio_mmio.device=` transport.
    Blk {
        dev: u64,
        op: BlkOp,
    },
    /// A virtio-console task on the `dev`-th transport.
    Console {
        dev: u64,
        op: ConsoleOp,
    },
    /// Read `count` bytes from COM1 and print them.
    SerialEcho {
        count: u64,
    },
    /// A virtio-vsock task on the `dev`-th transport.
    Vsock {
        dev: u64,
        op: VsockOp,
    },
}

impl Task {
    /// The `virtio_mmio.device=` entry the task uses, if any.
    pub fn dev(&self) -> Option<u64> {
        match *self {
            Task::Blk { dev, .. } | Task::Console { dev, .. } | Task::Vsock { dev, .. } => {
                Some(dev)
            }
            _ => None,
        }
    }
}

/// Most bytes of `con-write`'s text.
pub const TEXT_MAX: usize = 64;

/// A short text from the command line (no whitespace: words are split on it).
#[derive(Clone, Copy)]
pub struct Text {
    bytes: [u8; TEXT_MAX],
    len: u8,
}

impl Text {
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }
}

/// Most bytes `con-echo` and `serial-echo` read (each is printed, one exit a byte).
pub const ECHO_MAX: u64 = 4096;
/// Most bytes a `vsock-echo` or `vsock-connect` moves (the stream counters are 32-bit).
pub const VSOCK_BYTES_MAX: u64 = 1 << 30;

/// What a virtio-console task does (see docs/guest-kit.md).
#[derive(Clone, Copy)]
pub enum ConsoleOp {
    /// Transmit the text and a newline.
    Write(Text),
    /// Read `count` bytes of input and send them back.
    Echo { count: u64 },
}

/// What a virtio-vsock task does (see docs/guest-kit.md).
#[derive(Clone, Copy)]
pub enum VsockOp {
    /// Accept a connection on `port`, echo `bytes` bytes, shut down.
    Echo { port: u32, bytes: u64 },
    /// Connect to the host's `port`, send `bytes` bytes of the pattern, read them back.
    Connect { port: u32, bytes: u64 },
    /// Accept a connection on `port` and never read from it.
    Slow { port: u32 },
}

/// What a virtio-blk task does (see docs/guest-kit.md).
#[derive(Clone, Copy)]
pub enum BlkOp {
    /// Read `count` sectors from `sector` and check each one's first word against
    /// `page_stamp(seed, sector)`.
    Check { sector: u64, count: u64, seed: u64 },
    /// Write such sectors, then flush.
    Write { sector: u64, count: u64, seed: u64 },
    /// Write such sectors one request at a time (a record per sector, progress every 256),
    /// then read them all back and check them: a guest that migrates meanwhile proves that
    /// no write it saw complete was lost or misplaced.
    Log { sector: u64, count: u64, seed: u64 },
    /// Print the device's id string and capacity.
    Id,
    /// One read with interrupts requested and the device's IRQ routed to this vCPU, interrupts
    /// disabled: the vector must then be pending in the LAPIC's IRR.
    Irq,
    /// A one-sector request that must fail with IOERR: a read (or a write) at `sector`, by
    /// default the first sector past the end of the disk; its data at guest-physical `at`
    /// (page-aligned) instead of the DMA area when given.
    Bad {
        sector: Option<u64>,
        write: bool,
        at: Option<u64>,
    },
    /// Time `count` requests of `size` bytes with `depth` in flight (`None`: as many as the
    /// queue holds).
    Bench {
        size: u64,
        count: u64,
        depth: Option<u64>,
        write: bool,
    },
}

/// `depth=max` in `blk-bench`: as many requests in flight as the queue holds.
const DEPTH_MAX: u64 = u64::MAX;

/// A virtio-mmio transport from a `virtio_mmio.device=SIZE@BASE:IRQ[:ID]` word.
#[derive(Clone, Copy)]
pub struct MmioDevice {
    pub base: u64,
    pub size: u64,
    pub irq: u64,
}

/// The prefix of a transport word.
const MMIO_DEVICE_PREFIX: &[u8] = b"virtio_mmio.device=";

/// Iterator over the `virtio_mmio.device=` words of a command line.
pub struct MmioDevices<'a> {
    words: Words<'a>,
}

impl<'a> MmioDevices<'a> {
    pub fn new(cmdline: &'a [u8]) -> Self {
        MmioDevices {
            words: Words { rest: cmdline },
        }
    }
}

impl<'a> Iterator for MmioDevices<'a> {
    type Item = Result<MmioDevice, ParseError<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let word = self.words.find(|w| w.starts_with(MMIO_DEVICE_PREFIX))?;
        Some(parse_mmio_device(word))
    }
}

/// `SIZE@BASE:IRQ[:ID]`: SIZE with an optional K/M/G suffix (Linux's `memparse`), BASE and IRQ
/// numbers; ID (Linux's platform-device id) is accepted and ignored. The window must lie in the
/// 32-bit MMIO hole (3..4 GiB), which the kit maps uncached, and hold the registers (0x100
/// bytes) and some config space.
fn parse_mmio_device(word: &[u8]) -> Result<MmioDevice, ParseError<'_>> {
    let err = |msg, item| ParseError { word, msg, item };
    let spec = &word[MMIO_DEVICE_PREFIX.len()..];
    let at = spec
        .iter()
        .position(|&b| b == b'@')
        .ok_or(err("expected SIZE@BASE:IRQ", b""))?;
    let (size, rest) = (&spec[..at], &spec[at + 1..]);
    let colon = rest
        .iter()
        .position(|&b| b == b':')
        .ok_or(err("expected SIZE@BASE:IRQ", b""))?;
    let (base, rest) = (&rest[..colon], &rest[colon + 1..]);
    let irq = match rest.iter().position(|&b| b == b':') {
        Some(i) => &rest[..i],
        None => rest,
    };
    let (digits, shift) = match size {
        [d @ .., b'K' | b'k'] => (d, 10),
        [d @ .., b'M' | b'm'] => (d, 20),
        [d @ .., b'G' | b'g'] => (d, 30),
        _ => (size, 0),
    };
    let size = parse_number(digits)
        .and_then(|n| n.checked_mul(1 << shift))
        .ok_or(err("bad number", size))?;
    let base_value = parse_number(base).ok_or(err("bad number", base))?;
    let irq = parse_number(irq).ok_or(err("bad number", irq))?;
    if size < 0x200 {
        return Err(err("the window must be at least 0x200 bytes", b""));
    }
    let in_hole =
        base_value >= 3 << 30 && base_value.checked_add(size).is_some_and(|e| e <= 4 << 30);
    if !in_hole || base_value % 4 != 0 {
        return Err(err(
            "the window must be 4-byte aligned inside 0xc0000000..0x100000000",
            base,
        ));
    }
    Ok(MmioDevice {
        base: base_value,
        size,
        irq,
    })
}

/// The whitespace-separated words of a command line.
struct Words<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for Words<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let start = self.rest.iter().position(|b| !b.is_ascii_whitespace())?;
        let rest = &self.rest[start..];
        let len = rest
            .iter()
            .position(|b| b.is_ascii_whitespace())
            .unwrap_or(rest.len());
        self.rest = &rest[len..];
        Some(&rest[..len])
    }
}

/// Why a word of the command line is not a task.
pub struct ParseError<'a> {
    /// The whole word.
    pub word: &'a [u8],
    pub msg: &'static str,
    /// The part `msg` is about (may be empty).
    pub item: &'a [u8],
}

/// Iterator over the tasks of a command line (skipping `virtio_mmio.device=` words).
pub struct Tasks<'a> {
    words: Words<'a>,
}

impl<'a> Tasks<'a> {
    pub fn new(cmdline: &'a [u8]) -> Self {
        Tasks {
            words: Words { rest: cmdline },
        }
    }
}

impl<'a> Iterator for Tasks<'a> {
    type Item = Result<Task, ParseError<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        let word = self.words.find(|w| !w.starts_with(MMIO_DEVICE_PREFIX))?;
        Some(parse_task(word))
    }
}

fn parse_task(word: &[u8]) -> Result<Task, ParseError<'_>> {
    let err = |msg, item| ParseError { word, msg, item };
    let (name, params) = match word.iter().position(|&b| b == b':') {
        Some(i) => (&word[..i], Some(&word[i + 1..])),
        None => (word, None),
    };
    let range = |p: [Option<u64>; 4]| -> Result<PageRange, ParseError<'_>> {
        let stride = p[3].unwrap_or(1);
        if stride == 0 {
            return Err(err("stride must be at least 1", b""));
        }
        Ok(PageRange {
            seed: p[0].ok_or(err("missing parameter", b"seed"))?,
            first: p[1].ok_or(err("missing parameter", b"first"))?,
            count: p[2].ok_or(err("missing parameter", b"count"))?,
            stride,
        })
    };
    match name {
        b"greet" | b"fault" | b"spin" | b"halt" | b"reset" => {
            if params.is_some() {
                return Err(err("takes no parameters", b""));
            }
            Ok(match name {
                b"greet" => Task::Greet,
                b"fault" => Task::Fault,
                b"spin" => Task::Spin,
                b"halt" => Task::Halt,
                _ => Task::Reset,
            })
        }
        b"hypercall" => {
            let [nr, gpa, pages, attrs, expect] =
                parse_params(word, params, ["nr", "gpa", "pages", "attrs", "expect"])?;
            Ok(Task::Hypercall {
                nr: nr.unwrap_or(12),
                gpa: gpa.ok_or(err("missing parameter", b"gpa"))?,
                pages: pages.ok_or(err("missing parameter", b"pages"))?,
                attrs: attrs.unwrap_or(0),
                expect: expect.ok_or(err("missing parameter", b"expect"))?,
            })
        }
        b"msr-write" => {
            let [index, value] = parse_params(word, params, ["index", "value"])?;
            Ok(Task::MsrWrite {
                index: msr_index(index).ok_or(err("index must be a 32-bit MSR number", b""))?,
                value: value.ok_or(err("missing parameter", b"value"))?,
            })
        }
        b"cpuid-hash" | b"deadline-check" => {
            if params.is_some() {
                return Err(err("takes no parameters", b""));
            }
            Ok(if name == b"cpuid-hash" {
                Task::CpuidHash
            } else {
                Task::DeadlineCheck
            })
        }
        b"kvmclock-on" | b"kvmclock-read" => {
            let [gpa] = parse_params(word, params, ["gpa"])?;
            let gpa = gpa.ok_or(err("missing parameter", b"gpa"))?;
            if gpa % 32 != 0 {
                return Err(err("gpa must be 32-byte aligned", b""));
            }
            Ok(Task::Kvmclock {
                gpa,
                on: name == b"kvmclock-on",
            })
        }
        b"kvmclock-watch" => {
            let [gpa, every_ms] = parse_params(word, params, ["gpa", "every_ms"])?;
            let gpa = gpa.ok_or(err("missing parameter", b"gpa"))?;
            if gpa % 32 != 0 {
                return Err(err("gpa must be 32-byte aligned", b""));
            }
            let every_ms = every_ms.unwrap_or(100);
            if every_ms == 0 || every_ms > 3_600_000 {
                return Err(err("every_ms must be 1..=3600000", b""));
            }
            Ok(Task::KvmclockWatch { gpa, every_ms })
        }
        b"deadline-arm" => {
            let [ahead] = parse_params(word, params, ["ahead"])?;
            let ahead = ahead.ok_or(err("missing parameter", b"ahead"))?;
            if ahead == 0 || ahead > 1 << 48 {
                return Err(err("ahead must be 1..=2^48 TSC ticks", b""));
            }
            Ok(Task::DeadlineArm { ahead })
        }
        b"wait-word" => {
            let [gpa, value] = parse_params(word, params, ["gpa", "value"])?;
            let gpa = gpa.ok_or(err("missing parameter", b"gpa"))?;
            if gpa % 8 != 0 {
                return Err(err("gpa must be 8-byte aligned", b""));
            }
            Ok(Task::WaitWord {
                gpa,
                value: value.ok_or(err("missing parameter", b"value"))?,
            })
        }
        b"uart-scratch" => {
            let [value] = parse_params(word, params, ["value"])?;
            let value = value.ok_or(err("missing parameter", b"value"))?;
            let value = u8::try_from(value).map_err(|_| err("value must be 0..=255", b""))?;
            Ok(Task::UartScratch(value))
        }
        b"msr-read" => {
            let [index, expect] = parse_params(word, params, ["index", "expect"])?;
            Ok(Task::MsrRead {
                index: msr_index(index).ok_or(err("index must be a 32-bit MSR number", b""))?,
                expect: expect.ok_or(err("missing parameter", b"expect"))?,
            })
        }
        b"share-alternate" => {
            let [first, count] = parse_params(word, params, ["first", "count"])?;
            Ok(Task::ShareAlternate {
                first: first.ok_or(err("missing parameter", b"first"))?,
                count: count.ok_or(err("missing parameter", b"count"))?,
            })
        }
        b"hcbench" => {
            let [count] = parse_params(word, params, ["count"])?;
            Ok(Task::HypercallBench(count.unwrap_or(1000).max(1)))
        }
        b"stamp" => {
            let [seed, first, count, stride, cpus] =
                parse_params(word, params, ["seed", "first", "count", "stride", "cpus"])?;
            let cpus = cpus.unwrap_or(1);
            Ok(Task::Stamp {
                range: range([seed, first, count, stride])?,
                cpus,
            })
        }
        b"read-secret" => {
            let [gpa, len] = parse_params(word, params, ["gpa", "len"])?;
            let len = len.ok_or(err("missing parameter", b"len"))?;
            if len > 256 {
                return Err(err("len must be at most 256", b""));
            }
            Ok(Task::ReadSecret {
                gpa: gpa.ok_or(err("missing parameter", b"gpa"))?,
                len,
            })
        }
        b"dirty-loop" => {
            let [seed, first, count, stride, check] =
                parse_params(word, params, ["seed", "first", "count", "stride", "check"])?;
            if check == Some(0) {
                return Err(err("check must be at least 1", b""));
            }
            Ok(Task::DirtyLoop {
                range: range([seed, first, count, stride])?,
                check_every: check,
            })
        }
        b"dirty-paced" => {
            let [first, count, rate] = parse_params(word, params, ["first", "count", "rate"])?;
            let rate = rate.ok_or(err("missing parameter", b"rate"))?;
            if rate == 0 {
                return Err(err("rate must be at least 1", b""));
            }
            let range = range([Some(0), first, count, None])?;
            if range.count == 0 {
                return Err(err("count must be at least 1", b""));
            }
            Ok(Task::DirtyPaced { range, rate })
        }
        b"check" => {
            let p = parse_params(word, params, ["seed", "first", "count", "stride"])?;
            Ok(Task::Check(range(p)?))
        }
        b"blk-check" | b"blk-write" | b"blk-log" => {
            let [dev, sector, count, seed] =
                parse_params(word, params, ["dev", "sector", "count", "seed"])?;
            let sector = sector.ok_or(err("missing parameter", b"sector"))?;
            let count = count.ok_or(err("missing parameter", b"count"))?;
            let seed = seed.ok_or(err("missing parameter", b"seed"))?;
            if count == 0 {
                return Err(err("count must be at least 1", b""));
            }
            if sector.checked_add(count).is_none() {
                return Err(err("sector + count overflows", b""));
            }
            let op = match name {
                b"blk-check" => BlkOp::Check {
                    sector,
                    count,
                    seed,
                },
                b"blk-write" => BlkOp::Write {
                    sector,
                    count,
                    seed,
                },
                _ => BlkOp::Log {
                    sector,
                    count,
                    seed,
                },
            };
            Ok(Task::Blk {
                dev: dev.ok_or(err("missing parameter", b"dev"))?,
                op,
            })
        }
        b"blk-id" | b"blk-irq" => {
            let [dev] = parse_params(word, params, ["dev"])?;
            let op = if name == b"blk-id" {
                BlkOp::Id
            } else {
                BlkOp::Irq
            };
            Ok(Task::Blk {
                dev: dev.ok_or(err("missing parameter", b"dev"))?,
                op,
            })
        }
        b"blk-bad" => {
            let [dev, sector, write, at] =
                parse_params(word, params, ["dev", "sector", "write", "at"])?;
            let write = flag(write).ok_or(err("write must be 0 or 1", b""))?;
            if at.is_some_and(|gpa| gpa % veil_guest_abi::PAGE_SIZE != 0) {
                return Err(err("at must be page-aligned", b""));
            }
            let op = BlkOp::Bad { sector, write, at };
            Ok(Task::Blk {
                dev: dev.ok_or(err("missing parameter", b"dev"))?,
                op,
            })
        }
        b"blk-bench" => {
            let [dev, size, count, depth, write] =
                parse_params(word, params, ["dev", "size", "count", "depth", "write"])?;
            let size = size.ok_or(err("missing parameter", b"size"))?;
            if size == 0 || size % 512 != 0 || size > 65536 {
                return Err(err("size must be a multiple of 512, at most 65536", b""));
            }
            let count = count.ok_or(err("missing parameter", b"count"))?;
            if count == 0 {
                return Err(err("count must be at least 1", b""));
            }
            let depth = match depth.unwrap_or(1) {
                0 => return Err(err("depth must be at least 1 (or max)", b"")),
                DEPTH_MAX => None,
                d => Some(d),
            };
            let write = flag(write).ok_or(err("write must be 0 or 1", b""))?;
            let op = BlkOp::Bench {
                size,
                count,
                depth,
                write,
            };
            Ok(Task::Blk {
                dev: dev.ok_or(err("missing parameter", b"dev"))?,
                op,
            })
        }
        b"con-write" => {
            // `text=` comes last and takes the rest of the word, commas included.
            let (params, text) = split_text(params);
            let [dev] = parse_params(word, params, ["dev"])?;
            let text = text.ok_or(err("missing parameter", b"text"))?;
            if text.len() > TEXT_MAX {
                return Err(err("text must be at most 64 bytes", b""));
            }
            let mut bytes = [0; TEXT_MAX];
            bytes[..text.len()].copy_from_slice(text);
            let text = Text {
                bytes,
                len: text.len() as u8,
            };
            Ok(Task::Console {
                dev: dev.ok_or(err("missing parameter", b"dev"))?,
                op: ConsoleOp::Write(text),
            })
        }
        b"con-echo" | b"serial-echo" => {
            let (dev, count) = if name == b"con-echo" {
                let [dev, count] = parse_params(word, params, ["dev", "count"])?;
                (Some(dev.ok_or(err("missing parameter", b"dev"))?), count)
            } else {
                let [count] = parse_params(word, params, ["count"])?;
                (None, count)
            };
            let count = count.ok_or(err("missing parameter", b"count"))?;
            if count == 0 || count > ECHO_MAX {
                return Err(err("count must be 1..=4096", b""));
            }
            Ok(match dev {
                Some(dev) => Task::Console {
                    dev,
                    op: ConsoleOp::Echo { count },
                },
                None => Task::SerialEcho { count },
            })
        }
        b"vsock-echo" | b"vsock-connect" | b"vsock-slow" => {
            let slow = name == b"vsock-slow";
            let [dev, port, bytes] = if slow {
                let [dev, port] = parse_params(word, params, ["dev", "port"])?;
                [dev, port, Some(1)]
            } else {
                parse_params(word, params, ["dev", "port", "bytes"])?
            };
            let dev = dev.ok_or(err("missing parameter", b"dev"))?;
            let port = port.ok_or(err("missing parameter", b"port"))?;
            let port = u32::try_from(port).map_err(|_| err("port must be 0..=0xffffffff", b""))?;
            let bytes = bytes.ok_or(err("missing parameter", b"bytes"))?;
            if bytes == 0 || bytes > VSOCK_BYTES_MAX {
                return Err(err("bytes must be 1..=0x40000000", b""));
            }
            let op = match name {
                b"vsock-echo" => VsockOp::Echo { port, bytes },
                b"vsock-connect" => VsockOp::Connect { port, bytes },
                _ => VsockOp::Slow { port },
            };
            Ok(Task::Vsock { dev, op })
        }
        b"exit" => {
            let [code] = parse_params(word, params, ["code"])?;
            let code = code.ok_or(err("missing parameter", b"code"))?;
            let code = u8::try_from(code).map_err(|_| err("exit code must be 0..=255", b""))?;
            Ok(Task::Exit(code))
        }
        _ => Err(err("unknown task", name)),
    }
}

/// Splits `key=value,...,text=TEXT` into the parameters before `text=` and TEXT (which may
/// hold `,` and `=`).
fn split_text(params: Option<&[u8]>) -> (Option<&[u8]>, Option<&[u8]>) {
    const KEY: &[u8] = b"text=";
    let Some(params) = params else {
        return (None, None);
    };
    let at = (0..params.len())
        .find(|&i| (i == 0 || params[i - 1] == b',') && params[i..].starts_with(KEY));
    match at {
        None => (Some(params), None),
        Some(0) => (None, Some(&params[KEY.len()..])),
        Some(i) => (Some(&params[..i - 1]), Some(&params[i + KEY.len()..])),
    }
}

/// Parses `key=value,...` against `keys`; returns each key's value, `None` when absent.
/// An optional `index=` as an MSR number: `Some(None)` when absent, `None` when too large.
fn msr_index(index: Option<u64>) -> Option<Option<u32>> {
    match index {
        None => Some(None),
        Some(i) => u32::try_from(i).ok().map(Some),
    }
}

fn parse_params<'a, const N: usize>(
    word: &'a [u8],
    params: Option<&'a [u8]>,
    keys: [&str; N],
) -> Result<[Option<u64>; N], ParseError<'a>> {
    let err = |msg, item| ParseError { word, msg, item };
    let mut values = [None; N];
    let Some(params) = params else {
        return Ok(values);
    };
    for param in params.split(|&b| b == b',') {
        if param.is_empty() {
            return Err(err("empty parameter (stray `,` or `:`)", b""));
        }
        let eq = param
            .iter()
            .position(|&b| b == b'=')
            .ok_or(err("expected key=value, got", param))?;
        let (key, value) = (&param[..eq], &param[eq + 1..]);
        let slot = keys
            .iter()
            .position(|k| k.as_bytes() == key)
            .ok_or(err("unknown parameter", key))?;
        if values[slot].is_some() {
            return Err(err("repeated parameter", key));
        }
        // `depth=max` (blk-bench) is the one word a number may be.
        let number = match (key, value) {
            (b"depth", b"max") => Some(DEPTH_MAX),
            _ => parse_number(value),
        };
        values[slot] = Some(number.ok_or(err("bad number", value))?);
    }
    Ok(values)
}

/// An optional 0/1 parameter: `None` for any other value.
fn flag(value: Option<u64>) -> Option<bool> {
    match value {
        None | Some(0) => Some(false),
        Some(1) => Some(true),
        _ => None,
    }
}

/// Decimal or `0x`/`0X` hex, no overflow; a leading `-` gives the two's complement (hypercall
/// results such as `-22`).
fn parse_number(s: &[u8]) -> Option<u64> {
    if let [b'-', rest @ ..] = s {
        return parse_number(rest).map(u64::wrapping_neg);
    }
    let (digits, radix) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (s, 10),
    };
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |acc, &b| {
        let digit = (b as char).to_digit(radix)?;
        acc.checked_mul(radix.into())?.checked_add(digit.into())
    })
}
