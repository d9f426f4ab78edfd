#!/usr/bin/env python3
"""Boots the Veil guest kit under QEMU (-M microvm, KVM, PVH) and checks what it does.

A peer check for the kit, independent of Veil's own VMM: every scenario boots the kit with a
command line, compares the serial output and the exit status with what docs/guest-kit.md
promises, and, for stamping scenarios, reads guest RAM back from the file that backs it. Disk
scenarios attach QEMU's virtio-blk-device (modern virtio-mmio) on a raw file they pre-fill and
read back.

    python3 guests/kit/qemu-test.py [PATH-TO-veil-kit] [-k SUBSTRING]

Without a path it uses guests/kit/target/x86_64-unknown-linux-gnu/release/veil-kit (run
`cargo build --release` in guests/kit first). Console scenarios attach virtio-serial-device
with a virtconsole on a file or UNIX-socket chardev, and feed COM1 through QEMU's stdin. Vsock
scenarios attach vhost-user-vsock-device, served by vhost_user_vsock.py beside this file, which
is also the host end of the guest's connection.
Needs qemu-system-x86_64 (Debian:
qemu-system-x86) and /dev/kvm; skips everything, saying so, when either is missing. Prints one
line per scenario with its wall time and ends with 'N passed, N failed'.
"""

import argparse
import os
import re
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

import vhost_user_vsock as vu

PAGE = 4096
MASK = (1 << 64) - 1
KIT_DIR = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ELF = os.path.join(KIT_DIR, "target", "x86_64-unknown-linux-gnu", "release", "veil-kit")
# QEMU reports a write of N to the isa-debug-exit port as exit status (N << 1) | 1; a triple
# fault with -no-reboot ends QEMU with status 0.
TRIPLE_FAULT = "triple fault"
KILLED = "killed once its output was complete"


def page_stamp(seed, gfn):
    """veil_guest_abi::page_stamp: SplitMix64 of seed ^ gfn * golden ratio."""
    z = (seed ^ ((gfn * 0x9E3779B97F4A7C15) & MASK)) + 0x9E3779B97F4A7C15 & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def gfns(first, count, stride=1):
    return [first + i * stride for i in range(count)]


SECTOR = 512
# QEMU microvm's virtio-mmio transports are 512 bytes at 0xfeb00000 + 512 * i, transport i on
# GSI 24 + i (its second IOAPIC, with ACPI on); the first -device lands on the last of its 24
# (i = 23). QEMU adds no virtio_mmio.device= entry for a PVH kernel, so the scenarios pass it.
MICROVM_BLK = "virtio_mmio.device=512@0xfeb02e00:47"
DISK_SERIAL = "veil-disk-0"


class Disk:
    """A raw disk file for -device virtio-blk-device: `sectors` long, with `prefill` (seed,
    [sector, ...]) stamped before boot and `written` (seed, [sector, ...]) expected after."""

    def __init__(self, sectors=2048, prefill=(), written=(), untouched=(), legacy=False):
        self.sectors = sectors
        self.legacy = legacy  # QEMU's default virtio-mmio version 1 transport
        self.prefill = prefill
        self.written = written
        self.untouched = untouched  # sectors whose first word must still be 0


class Console:
    """-device virtio-serial-device with a virtconsole (port 0) on a chardev: a file when there
    is no `input` (its contents must end up `output`), else a UNIX socket the scenario writes
    `input` to and reads `output` back from."""

    def __init__(self, output, input=None):
        self.output = output
        self.input = input


class Scenario:
    def __init__(self, name, cmdline, status, output, smp=1, mem="64M", stamped=(), untouched=(),
                 prefill=None, timeout=120, disk=None, console=None, stdin=b"", vsock=None,
                 until=None):
        self.name = name
        self.cmdline = cmdline
        self.status = status  # kit exit status, or TRIPLE_FAULT
        self.output = output  # exact serial output
        self.smp = smp
        self.mem = mem
        self.stamped = stamped  # (seed, [gfn, ...]) pairs expected in RAM afterwards
        self.untouched = untouched  # gfns whose first word must still be 0
        self.prefill = prefill  # {gfn: u64} written into RAM before boot
        self.timeout = timeout
        self.disk = disk
        self.console = console
        self.stdin = stdin  # bytes COM1 receives (QEMU's -serial stdio)
        self.vsock = vsock  # a vhost_user_vsock.Peer: the host side of the guest's connection
        self.until = until  # stop QEMU once the serial output has this (status KILLED)


def mem_bytes(mem):
    units = {"M": 1 << 20, "G": 1 << 30}
    return int(mem[:-1]) * units[mem[-1]]


def file_offset(gfn, mem):
    """Offset of gfn's page in the RAM file: microvm puts RAM above 3 GiB at 4 GiB."""
    addr = gfn * PAGE
    low = min(mem_bytes(mem), 3 << 30)
    if addr < low:
        return addr
    assert addr >= 4 << 30, "gfn in the PCI hole"
    return low + addr - (4 << 30)


def run(elf, sc, workdir):
    ram = os.path.join(workdir, "ram")
    with open(ram, "wb") as f:
        f.truncate(mem_bytes(sc.mem))  # sparse, all zero: QEMU needs zero low RAM
        for gfn, value in (sc.prefill or {}).items():
            f.seek(file_offset(gfn, sc.mem))
            f.write(struct.pack("<Q", value))
    cmd = [
        "qemu-system-x86_64", "-accel", "kvm", "-M", "microvm", "-m", sc.mem, "-smp", str(sc.smp),
        "-nographic", "-no-reboot", "-serial", "stdio", "-monitor", "none",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x01",
        "-object", f"memory-backend-file,id=m,size={sc.mem},mem-path={ram},share=on",
        "-machine", "memory-backend=m",
        "-kernel", elf, "-append", sc.cmdline,
    ]
    disk = os.path.join(workdir, "disk")
    if sc.disk:
        with open(disk, "wb") as f:
            f.truncate(sc.disk.sectors * SECTOR)
            for seed, sectors in sc.disk.prefill:
                for sector in sectors:
                    f.seek(sector * SECTOR)
                    f.write(struct.pack("<Q", page_stamp(seed, sector)))
        cmd += ["-global", f"virtio-mmio.force-legacy={'true' if sc.disk.legacy else 'false'}",
                "-device", f"virtio-blk-device,drive=d0,serial={DISK_SERIAL}",
                "-drive", f"id=d0,file={disk},format=raw,if=none"]
    con_out = os.path.join(workdir, "console")
    con_sock = os.path.join(workdir, "console.sock")
    if sc.console:
        for path in (con_out, con_sock):
            if os.path.exists(path):
                os.unlink(path)
        if sc.console.input is None:
            chardev = f"file,id=con,path={con_out}"
        else:
            # wait=on: QEMU starts the guest only once the scenario is connected.
            chardev = f"socket,id=con,path={con_sock},server=on,wait=on"
        cmd += ["-global", "virtio-mmio.force-legacy=false", "-device", "virtio-serial-device",
                "-chardev", chardev, "-device", "virtconsole,chardev=con"]
    backend = None
    if sc.vsock:
        vu_sock = os.path.join(workdir, "vhost-user.sock")
        backend = vu.Backend(vu_sock, sc.vsock)
        backend.start()
        cmd += ["-global", "virtio-mmio.force-legacy=false",
                "-chardev", f"socket,id=vu,path={vu_sock}",
                "-device", "vhost-user-vsock-device,chardev=vu"]
    start = time.monotonic()
    console_got = b""
    killed = False
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.PIPE)
        if sc.console and sc.console.input is not None:
            console_got = talk_to_console(con_sock, sc.console.input, sc.timeout)
        if sc.until:
            stdout = read_until(proc, sc.until, sc.timeout)
            proc.kill()
            killed = True
            rest, stderr = proc.communicate(timeout=sc.timeout)
            stdout += rest
        else:
            stdout, stderr = proc.communicate(input=sc.stdin, timeout=sc.timeout)
        proc = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return [f"timed out after {sc.timeout} s"], sc.timeout
    elapsed = time.monotonic() - start
    problems = []
    if backend:
        backend.join(10)
        problems += [f"host side: {p}" for p in sc.vsock.verdict()]
        if backend.error:
            problems.append(backend.error)
    if killed:
        status = KILLED
    elif proc.returncode == 0:
        status = TRIPLE_FAULT
    elif proc.returncode & 1:
        status = proc.returncode >> 1
    else:
        status = f"QEMU exit {proc.returncode}"
    if status != sc.status:
        problems.append(f"status {status!r}, expected {sc.status!r}; stderr: {proc.stderr.decode()[-500:]}")
    out = proc.stdout.decode(errors="replace")
    if sc.output is None:
        # Timings: the shape of each line, and the figures in the report.
        lines = out.splitlines()
        if not lines or not all(l.startswith("blk-bench: dev 0, ") and " MB/s (" in l for l in lines):
            problems.append(f"output {out!r}, expected blk-bench lines")
        print("".join(f"       {l}\n" for l in lines), end="")
    elif isinstance(sc.output, re.Pattern):
        if not sc.output.fullmatch(out):
            problems.append(f"output {out!r}, expected to match {sc.output.pattern!r}")
    elif out != sc.output:
        problems.append(f"output {out!r}, expected {sc.output!r}")
    with open(ram, "rb") as f:
        def word(gfn):
            f.seek(file_offset(gfn, sc.mem))
            return struct.unpack("<Q", f.read(8))[0]
        for seed, pages in sc.stamped:
            bad = [g for g in pages if word(g) != page_stamp(seed, g)]
            if bad:
                problems.append(f"{len(bad)} of {len(pages)} pages not stamped, first gfn {bad[0]:#x}")
        bad = [g for g in sc.untouched if word(g) != 0]
        if bad:
            problems.append(f"pages written that should not be: {[hex(g) for g in bad[:8]]}")
    if sc.console:
        if sc.console.input is None:
            with open(con_out, "rb") as f:
                console_got = f.read()
        if console_got != sc.console.output:
            problems.append(f"console {console_got!r}, expected {sc.console.output!r}")
    if sc.disk:
        with open(disk, "rb") as f:
            def first_word(sector):
                f.seek(sector * SECTOR)
                return struct.unpack("<Q", f.read(8))[0]
            for seed, sectors in sc.disk.written:
                bad = [s for s in sectors if first_word(s) != page_stamp(seed, s)]
                if bad:
                    problems.append(f"{len(bad)} of {len(sectors)} sectors not written, first {bad[0]}")
            bad = [s for s in sc.disk.untouched if first_word(s) != 0]
            if bad:
                problems.append(f"sectors written that should not be: {bad[:8]}")
    return problems, elapsed


def read_until(proc, text, timeout):
    """Reads the guest's serial output until it contains `text` (or `timeout` passes)."""
    out = b""
    deadline = time.monotonic() + timeout
    while text.encode() not in out and time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
    return out


def talk_to_console(path, data, timeout):
    """Connects to QEMU's console socket, sends `data` and returns what comes back until QEMU
    closes it (the guest exited)."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return b""
        time.sleep(0.02)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.sendall(data)
        s.settimeout(max(1.0, deadline - time.monotonic()))
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except (socket.timeout, ConnectionResetError):
            pass
        return got


def scenarios():
    kit_mem = "gfns 0x100..0x1d3"  # filled in by main() from the ELF
    yield Scenario("greet", "greet", 0, "Hello from the Veil guest kit!\n")
    yield Scenario("empty command line greets", "", 0, "Hello from the Veil guest kit!\n")
    yield Scenario(
        "stamp and check 256 pages",
        "greet stamp:seed=1,first=0x800,count=256 check:seed=1,first=0x800,count=256",
        0, "Hello from the Veil guest kit!\nstamped 256 pages on 1 vCPUs\ncheck ok: 256 pages\n",
        stamped=[(1, gfns(0x800, 256))], untouched=[0x7ff, 0x900])
    yield Scenario(
        "stride leaves the pages in between alone",
        "stamp:seed=0x77,first=0x1000,count=100,stride=7 check:seed=0x77,first=0x1000,count=100,stride=7",
        0, "stamped 100 pages on 1 vCPUs\ncheck ok: 100 pages\n",
        stamped=[(0x77, gfns(0x1000, 100, 7))], untouched=[0x1001, 0x1006, 0x1000 + 700])
    wrong = page_stamp(9, 0x805)
    yield Scenario(
        "check finds a wrong stamp",
        "stamp:seed=1,first=0x800,count=16 check:seed=1,first=0x800,count=5 check:seed=9,first=0x805,count=3",
        1, "stamped 16 pages on 1 vCPUs\ncheck ok: 5 pages\n"
        f"check FAILED at gfn 0x805: found {page_stamp(1, 0x805):#x}, expected {wrong:#x}\n")
    yield Scenario(
        "check reads what the host wrote",
        "check:seed=42,first=0x2000,count=64",
        0, "check ok: 64 pages\n",
        prefill={g: page_stamp(42, g) for g in gfns(0x2000, 64)})
    yield Scenario("exit status", "greet exit:code=7 greet", 7, "Hello from the Veil guest kit!\n")
    # QEMU can only report statuses up to 127: (status << 1) | 1 must fit in a byte.
    yield Scenario("exit 0x-hex status", "exit:code=0x7f", 127, "")
    yield Scenario("fault stops the guest", "greet fault greet", TRIPLE_FAULT,
                   "Hello from the Veil guest kit!\n")
    yield Scenario("unknown task", "greet bogus", 2,
                   "veil-kit: error: bad task `bogus`: unknown task `bogus`\n")
    yield Scenario("missing parameter", "stamp:seed=1,count=3", 2,
                   "veil-kit: error: bad task `stamp:seed=1,count=3`: missing parameter `first`\n")
    yield Scenario("bad number", "check:seed=1,first=0x,count=3", 2,
                   "veil-kit: error: bad task `check:seed=1,first=0x,count=3`: bad number `0x`\n")
    yield Scenario("unknown parameter", "exit:code=1,why=2", 2,
                   "veil-kit: error: bad task `exit:code=1,why=2`: unknown parameter `why`\n")
    yield Scenario("repeated parameter", "stamp:seed=1,seed=2,first=0x800,count=1", 2,
                   "veil-kit: error: bad task `stamp:seed=1,seed=2,first=0x800,count=1`: "
                   "repeated parameter `seed`\n")
    yield Scenario("empty parameter list", "greet stamp:", 2,
                   "veil-kit: error: bad task `stamp:`: empty parameter (stray `,` or `:`)\n")
    yield Scenario("any whitespace separates tasks", "  greet \t  exit:code=3  ", 3,
                   "Hello from the Veil guest kit!\n")
    yield Scenario("exit code too big", "exit:code=256", 2,
                   "veil-kit: error: bad task `exit:code=256`: exit code must be 0..=255\n")
    yield Scenario("parameters on greet", "greet:x=1", 2,
                   "veil-kit: error: bad task `greet:x=1`: takes no parameters\n")
    yield Scenario("stride 0", "stamp:seed=1,first=0x800,count=2,stride=0", 2,
                   "veil-kit: error: bad task `stamp:seed=1,first=0x800,count=2,stride=0`: "
                   "stride must be at least 1\n")
    yield Scenario("whole line checked before any task runs",
                   "greet stamp:seed=1,first=0x800,count=4 stamp:seed=1,first=0x3fff,count=2", 2,
                   "veil-kit: error: stamp: gfn 0x4000 is not RAM\n", untouched=[0x800])
    yield Scenario("stamp into the kit image", "stamp:seed=1,first=0x80,count=3,stride=0x100", 2,
                   f"veil-kit: error: stamp: gfn 0x180 is the kit's own memory (image, page tables "
                   f"and stacks at {kit_mem}, AP trampoline at gfn 0x8)\n")
    yield Scenario("check the AP trampoline page", "check:seed=1,first=0x4,count=3,stride=2", 2,
                   f"veil-kit: error: check: gfn 0x8 is the kit's own memory (image, page tables "
                   f"and stacks at {kit_mem}, AP trampoline at gfn 0x8)\n")
    yield Scenario("stride jumps over the kit image", "stamp:seed=3,first=0x80,count=2,stride=0x380", 0,
                   "stamped 2 pages on 1 vCPUs\n", stamped=[(3, [0x80, 0x400])])
    yield Scenario("range past the address space", "stamp:seed=1,first=0x800,count=2,stride=0xffffffffffff",
                   2, "veil-kit: error: stamp: page range runs past the 52-bit physical address space\n")
    yield Scenario("too many cpus", "stamp:seed=1,first=0x800,count=2,cpus=33", 2,
                   "veil-kit: error: stamp: cpus must be 1..=32\n")
    yield Scenario(
        # microvm with 5 GiB: 3 GiB at 0, 2 GiB at 4 GiB (up to gfn 0x180000).
        "RAM above 4 GiB",
        "stamp:seed=4,first=0x100000,count=0x100 check:seed=4,first=0x100000,count=0x100 "
        "stamp:seed=4,first=0x17ff00,count=0x100",
        0, "stamped 256 pages on 1 vCPUs\ncheck ok: 256 pages\nstamped 256 pages on 1 vCPUs\n",
        mem="5G", stamped=[(4, gfns(0x100000, 256) + gfns(0x17FF00, 256))])
    yield Scenario("PCI hole is not RAM", "stamp:seed=4,first=0xbffff,count=2", 2,
                   "veil-kit: error: stamp: gfn 0xc0000 is not RAM\n", mem="5G")
    yield Scenario("beyond the top of RAM", "check:seed=4,first=0x17ffff,count=2", 2,
                   "veil-kit: error: check: gfn 0x180000 is not RAM\n", mem="5G")
    yield Scenario(
        "stamp on 2 vCPUs",
        "stamp:seed=5,first=0x800,count=1024,cpus=2 check:seed=5,first=0x800,count=1024",
        0, "stamped 1024 pages on 2 vCPUs\ncheck ok: 1024 pages\n", smp=2,
        stamped=[(5, gfns(0x800, 1024))], untouched=[0x7ff, 0xc00])
    yield Scenario(
        "stamp on 4 vCPUs twice (APs restarted)",
        "stamp:seed=6,first=0x800,count=1000,stride=3,cpus=4 check:seed=6,first=0x800,count=1000,stride=3 "
        "stamp:seed=7,first=0x2000,count=3,cpus=4 check:seed=7,first=0x2000,count=3",
        0, "stamped 1000 pages on 4 vCPUs\ncheck ok: 1000 pages\nstamped 3 pages on 4 vCPUs\n"
        "check ok: 3 pages\n", smp=4,
        stamped=[(6, gfns(0x800, 1000, 3)), (7, gfns(0x2000, 3))], untouched=[0x801, 0x2003])
    yield Scenario(
        "cpus above the VM's vCPUs", "stamp:seed=8,first=0x800,count=4,cpus=3", 2,
        "veil-kit: error: stamp: only 1 of 2 application processors started (does the VM have 3 "
        "vCPUs?)\n", smp=2)
    yield Scenario(
        "stamp 15360 pages (60 MiB) on 1 vCPU",
        "stamp:seed=10,first=0x400,count=15360 check:seed=10,first=0x400,count=15360",
        0, "stamped 15360 pages on 1 vCPUs\ncheck ok: 15360 pages\n",
        stamped=[(10, gfns(0x400, 15360))])
    yield Scenario(
        "stamp 15360 pages (60 MiB) on 2 vCPUs",
        "stamp:seed=11,first=0x400,count=15360,cpus=2",
        0, "stamped 15360 pages on 2 vCPUs\n", smp=2, stamped=[(11, gfns(0x400, 15360))])

    yield from blk_scenarios()
    yield from console_scenarios()
    yield from vsock_scenarios()


def blk_scenarios():
    """The virtio-blk tasks against QEMU's virtio-blk-device (modern virtio-mmio)."""
    dev = MICROVM_BLK
    yield Scenario(
        "blk-id reads the serial and capacity", f"{dev} blk-id:dev=0", 0,
        f'blk-id: dev 0: "{DISK_SERIAL}", 2048 sectors\n', disk=Disk())
    yield Scenario(
        "blk-check reads what the host wrote",
        f"{dev} blk-check:dev=0,sector=0,count=300,seed=7 blk-check:dev=0,sector=2000,count=48,seed=7",
        0, "blk-check ok: 300 sectors from sector 0\nblk-check ok: 48 sectors from sector 2000\n",
        disk=Disk(prefill=[(7, range(0, 2048))]))
    yield Scenario(
        "blk-check finds a wrong sector", f"{dev} blk-check:dev=0,sector=10,count=10,seed=7", 1,
        f"blk-check FAILED at sector 15: found 0x0, expected {page_stamp(7, 15):#x}\n",
        disk=Disk(prefill=[(7, range(10, 15))]))
    yield Scenario(
        "blk-write then blk-check, and the host sees the sectors",
        f"{dev} blk-write:dev=0,sector=1000,count=200,seed=9 blk-check:dev=0,sector=1000,count=200,seed=9",
        0, "blk-write ok: 200 sectors from sector 1000, flushed\nblk-check ok: 200 sectors from sector 1000\n",
        disk=Disk(written=[(9, range(1000, 1200))], untouched=[999, 1200]))
    yield Scenario(
        "blk-bad: a read past the end is IOERR", f"{dev} blk-bad:dev=0 blk-bad:dev=0,sector=5000,write=1",
        0, "blk-bad ok: read at sector 2048: status IOERR (1)\nblk-bad ok: write at sector 5000: status IOERR (1)\n",
        disk=Disk())
    yield Scenario(
        "blk-bad fails on a request that succeeds", f"{dev} blk-bad:dev=0,sector=0", 1,
        "blk-bad FAILED: read at sector 0: status OK (0), expected IOERR\n", disk=Disk())
    yield Scenario(
        "blk-check past the end of the disk", f"{dev} blk-check:dev=0,sector=2040,count=10,seed=1", 2,
        "veil-kit: error: blk-check: sectors 2040..2050 are not on the disk (2048 sectors)\n", disk=Disk())
    yield Scenario(
        "blk-bench runs at depth 1 and max",
        f"{dev} blk-bench:dev=0,size=4096,count=200,depth=1 blk-bench:dev=0,size=65536,count=100,depth=max",
        0, None, disk=Disk(sectors=16384))
    yield Scenario(
        "blk-irq sees the device's interrupt pending in the IRR", f"{dev} blk-irq:dev=0", 0,
        "blk-irq ok: dev 0: irq 47, vector 0x6f pending in the local APIC's IRR "
        "(InterruptStatus 0x1)\n", disk=Disk())
    yield Scenario(
        "blk-irq on the wrong IRQ sees nothing", "virtio_mmio.device=512@0xfeb02e00:46 blk-irq:dev=0", 1,
        "blk-irq FAILED: dev 0: irq 46, vector 0x6e not pending in the local APIC's IRR "
        "(InterruptStatus 0x1)\n", disk=Disk())
    yield Scenario(
        "no device behind the transport", "virtio_mmio.device=512@0xfeb00000:5 blk-id:dev=0", 2,
        "veil-kit: error: blk-id: dev 0 at 0xfeb00000 (irq 5): no device behind this transport "
        "(device id 0)\n", disk=Disk())
    yield Scenario(
        "legacy transport is refused", f"{dev} blk-id:dev=0", 2,
        "veil-kit: error: blk-id: dev 0 at 0xfeb02e00 (irq 47): legacy virtio-mmio (version 1) "
        "transport; the kit needs version 2 (QEMU: -global virtio-mmio.force-legacy=false)\n",
        disk=Disk(legacy=True))
    yield Scenario(
        "dev without its transport", f"{dev} greet blk-id:dev=1", 2,
        "veil-kit: error: dev 1: the command line has 1 virtio_mmio.device entries (dev counts "
        "them from 0)\n")
    yield Scenario(
        "malformed transport", "virtio_mmio.device=4K@0x1000:5 greet", 2,
        "veil-kit: error: bad task `virtio_mmio.device=4K@0x1000:5`: the window must be 4-byte "
        "aligned inside 0xc0000000..0x100000000 `0x1000`\n")
    yield Scenario(
        "blk-bench depth 0", "blk-bench:dev=0,size=4096,count=1,depth=0", 2,
        "veil-kit: error: bad task `blk-bench:dev=0,size=4096,count=1,depth=0`: depth must be at "
        "least 1 (or max)\n")


def console_scenarios():
    """virtio-console against QEMU's virtio-serial-device and virtconsole, COM1 input on stdin.
    The vsock tasks' refusals of a wrong or absent device are here too."""
    dev = MICROVM_BLK  # the first -device's transport, whichever device it is
    yield Scenario(
        "con-write: the text reaches the console's chardev",
        f"{dev} con-write:dev=0,text=hello con-write:dev=0,text=a,b=c", 0,
        "con-write ok: dev 0: 6 bytes\ncon-write ok: dev 0: 6 bytes\n",
        console=Console(b"hello\na,b=c\n"))
    yield Scenario(
        "con-echo: console input comes back on the console and on COM1",
        f"{dev} con-echo:dev=0,count=7", 0, "con-echo: ping\\x01\\n\\\\\n",
        console=Console(b"ping\x01\n\\", input=b"ping\x01\n\\"))
    text = bytes(i % 95 + 32 for i in range(3000))
    yield Scenario(
        "con-echo: 3000 bytes, then con-write on the same device",
        f"{dev} con-echo:dev=0,count=3000 con-write:dev=0,text=done", 0,
        "con-echo: " + text.decode().replace("\\", "\\\\") + "\ncon-write ok: dev 0: 5 bytes\n",
        console=Console(text + b"done\n", input=text))
    yield Scenario(
        "serial-echo reads what COM1 received", "serial-echo:count=9 greet", 0,
        "serial-echo: hi\\tthere\\n\nHello from the Veil guest kit!\n", stdin=b"hi\tthere\nleft over")
    yield Scenario(
        "con-write on a block device is refused", f"{dev} con-write:dev=0,text=x", 2,
        "veil-kit: error: con-write: dev 0 at 0xfeb02e00 (irq 47): device id 2, not a console (3)\n",
        disk=Disk())
    yield Scenario(
        "vsock-echo on a console is refused", f"{dev} vsock-echo:dev=0,port=1234,bytes=10", 2,
        "veil-kit: error: vsock-echo: dev 0 at 0xfeb02e00 (irq 47): device id 3, not a socket "
        "device (19)\n", console=Console(b""))
    yield Scenario(
        "vsock-connect with no device behind the transport",
        "virtio_mmio.device=512@0xfeb00000:24 vsock-connect:dev=0,port=1234,bytes=10", 2,
        "veil-kit: error: vsock-connect: dev 0 at 0xfeb00000 (irq 24): no device behind this "
        "transport (device id 0)\n", console=Console(b""))
    yield Scenario(
        "con-write text too long", "con-write:dev=0,text=" + "x" * 65, 2,
        f"veil-kit: error: bad task `con-write:dev=0,text={'x' * 65}`: text must be at most 64 "
        "bytes\n")
    yield Scenario(
        "vsock-echo bytes 0", "vsock-echo:dev=0,port=1,bytes=0", 2,
        "veil-kit: error: bad task `vsock-echo:dev=0,port=1,bytes=0`: bytes must be "
        "1..=0x40000000\n")


def vsock_scenarios():
    """The vsock tasks against QEMU's vhost-user-vsock-device (modern virtio-mmio) and a
    vhost-user backend in Python that is also the host side of the connection
    (vhost_user_vsock.py): QEMU's own vhost-vsock-device would need /dev/vhost-vsock."""
    dev = MICROVM_BLK
    mib4 = 4 << 20
    yield Scenario(
        "vsock-echo: 4 MiB through a host-initiated connection",
        f"{dev} vsock-echo:dev=0,port=1234,bytes={mib4}", 0,
        # Packets: as the host's sends and the guest's polling happen to meet.
        re.compile("vsock-echo: dev 0 port 1234: listening \\(cid 3\\)\n"
                   f"vsock-echo: dev 0 port 1234: echoed {mib4} bytes in \\d+ packets\n"),
        vsock=vu.Peer("echo", 1234, mib4))
    yield Scenario(
        "vsock-echo within a small host credit (staged, then sent as credit comes)",
        f"{dev} vsock-echo:dev=0,port=7,bytes=300000", 0,
        re.compile("vsock-echo: dev 0 port 7: listening \\(cid 3\\)\n"
                   "vsock-echo: dev 0 port 7: echoed 300000 bytes in \\d+ packets\n"),
        vsock=vu.Peer("echo", 7, 300000, host_buf_alloc=20000, host_credit_every=15000,
                      chunk=7000))
    yield Scenario(
        "vsock-echo asks a silent host for credit (CREDIT_REQUEST)",
        f"{dev} vsock-echo:dev=0,port=7,bytes=50000", 0,
        "vsock-echo: dev 0 port 7: listening (cid 3)\n"
        "vsock-echo: dev 0 port 7: echoed 50000 bytes in 3 packets\n",
        vsock=vu.Peer("echo", 7, 50000, host_buf_alloc=20000, host_credit_every=1 << 30))
    yield Scenario(
        "vsock-connect: 4 MiB of the pattern there and back, within the host's credit",
        f"{dev} vsock-connect:dev=0,port=1234,bytes={mib4}", 0,
        f"vsock-connect: dev 0 port 1234: sent and received {mib4} bytes, all as sent\n",
        vsock=vu.Peer("connect", 1234, mib4, host_buf_alloc=50000, host_credit_every=40000))
    yield Scenario(
        "vsock-connect with a host that never volunteers a CREDIT_UPDATE",
        f"{dev} vsock-connect:dev=0,port=1234,bytes=50000", 0,
        "vsock-connect: dev 0 port 1234: sent and received 50000 bytes, all as sent\n",
        vsock=vu.Peer("connect", 1234, 50000, host_buf_alloc=20000, host_credit_every=1 << 30))
    yield Scenario(
        "vsock-connect to a port nobody listens on is refused",
        f"{dev} vsock-connect:dev=0,port=99,bytes=10", 1,
        "vsock-connect FAILED: dev 0 port 99: connection refused by the host (RST)\n",
        vsock=vu.Peer("refuse", 99))
    yield Scenario(
        "vsock-echo: a host that closes early fails the task",
        f"{dev} vsock-echo:dev=0,port=7,bytes=100000", 1,
        "vsock-echo: dev 0 port 7: listening (cid 3)\n"
        "vsock-echo FAILED: dev 0 port 7: the peer closed the connection after 30000 bytes\n",
        vsock=vu.Peer("echo", 7, 100000, close_after=30000, chunk=10000))
    yield Scenario(
        "vsock-connect: a wrong byte coming back is found",
        f"{dev} vsock-connect:dev=0,port=1234,bytes=200000", 1,
        "vsock-connect FAILED: dev 0 port 1234: byte 123457 is "
        f"{(123457 % 251) ^ 0xff:#x}, expected {123457 % 251:#x}\n",
        vsock=vu.Peer("connect", 1234, 200000, corrupt_at=123457))
    yield Scenario(
        "vsock-slow: a host that sends past the guest's credit is caught",
        f"{dev} vsock-slow:dev=0,port=5", 1,
        re.compile("vsock-slow: dev 0 port 5: listening \\(cid 3\\)\n"
                   "vsock-slow: dev 0 port 5: connected; not reading \\(buf_alloc 131072\\)\n"
                   "(vsock-slow: dev 0 port 5: the peer stopped at its credit, 131072 bytes\n)?"
                   "vsock-slow FAILED: dev 0 port 5: the peer sent beyond its credit: \\d+ bytes\n"),
        vsock=vu.Peer("slow", 5, 131072, ignore_credit=True, chunk=4096))
    yield Scenario(
        "vsock-slow: the host stops at the guest's credit",
        f"{dev} vsock-slow:dev=0,port=5", KILLED,
        "vsock-slow: dev 0 port 5: listening (cid 3)\n"
        "vsock-slow: dev 0 port 5: connected; not reading (buf_alloc 131072)\n"
        "vsock-slow: dev 0 port 5: the peer stopped at its credit, 131072 bytes\n",
        vsock=vu.Peer("slow", 5, 131072), until="stopped at its credit, 131072 bytes\n")


def image_gfns(elf):
    """[start, end) frames of the kit image, from its PT_LOAD segment."""
    with open(elf, "rb") as f:
        data = f.read()
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        p_type, _, _, _, p_paddr, _, p_memsz = struct.unpack_from("<IIQQQQQ", data, phoff + i * phentsize)
        if p_type == 1:
            return p_paddr // PAGE, (p_paddr + p_memsz + PAGE - 1) // PAGE
    raise ValueError("no PT_LOAD segment")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("elf", nargs="?", default=DEFAULT_ELF)
    parser.add_argument("-k", dest="filter", default="", help="run scenarios whose name contains this")
    args = parser.parse_args()
    if not shutil.which("qemu-system-x86_64") or not os.access("/dev/kvm", os.R_OK | os.W_OK):
        print("skipped: needs qemu-system-x86_64 and /dev/kvm")
        return 0
    if not os.path.exists(args.elf):
        print(f"no kit at {args.elf}: run `cargo build --release` in guests/kit", file=sys.stderr)
        return 1
    start, end = image_gfns(args.elf)
    passed = failed = 0
    with tempfile.TemporaryDirectory() as workdir:
        for sc in scenarios():
            if args.filter not in sc.name:
                continue
            if isinstance(sc.output, str):
                sc.output = sc.output.replace("gfns 0x100..0x1d3", f"gfns {start:#x}..{end:#x}")
            problems, elapsed = run(args.elf, sc, workdir)
            verdict = "ok  " if not problems else "FAIL"
            print(f"{verdict} {elapsed:6.2f}s  {sc.name}", flush=True)
            for p in problems:
                print(f"       {p}")
            passed += not problems
            failed += bool(problems)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
