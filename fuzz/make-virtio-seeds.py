#!/usr/bin/env python3
"""Writes the seed corpora of the virtio fuzz targets (virtio_blk, virtio_console,
vsock_packets) into fuzz/seeds/: a header and a guest-memory image as
fuzz/fuzz_targets/common/virtio_rig.rs lays them out, each holding well-formed chains the
fuzzer can start from. The outputs are committed; rerun this after changing the layout."""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
NEXT, WRITE, INDIRECT = 1, 2, 4


def desc_table(q):
    return 0x500 * q


def avail_ring(q):
    return desc_table(q) + 0x100


class Image:
    def __init__(self, flags=0, private=0, rounds=1, size_log2=4):
        self.header = struct.pack("<BHBB3x", flags, private, rounds, size_log2)
        self.mem = bytearray(0x2000)
        self.next_desc = {}
        self.avail = {}

    def put(self, at, data):
        end = at + len(data)
        if end > len(self.mem):
            self.mem.extend(bytes(end - len(self.mem)))
        self.mem[at:end] = data

    def desc(self, at, addr, length, flags, nxt):
        self.put(at, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, q, bufs):
        """bufs: (addr, len, writable); returns the head."""
        head = self.next_desc.get(q, 0)
        for i, (addr, length, writable) in enumerate(bufs):
            last = i + 1 == len(bufs)
            flags = (0 if last else NEXT) | (WRITE if writable else 0)
            self.desc(desc_table(q) + 16 * (head + i), addr, length, flags, head + i + 1)
        self.next_desc[q] = head + len(bufs)
        self.make_available(q, head)
        return head

    def indirect_chain(self, q, table, bufs):
        head = self.next_desc.get(q, 0)
        for i, (addr, length, writable) in enumerate(bufs):
            last = i + 1 == len(bufs)
            flags = (0 if last else NEXT) | (WRITE if writable else 0)
            self.desc(table + 16 * i, addr, length, flags, i + 1)
        self.desc(desc_table(q) + 16 * head, table, 16 * len(bufs), INDIRECT, 0)
        self.next_desc[q] = head + 1
        self.make_available(q, head)

    def make_available(self, q, head):
        idx = self.avail.get(q, 0)
        self.put(avail_ring(q) + 4 + 2 * idx, struct.pack("<H", head))
        self.avail[q] = idx + 1
        self.put(avail_ring(q) + 2, struct.pack("<H", idx + 1))

    def write(self, target, name):
        directory = os.path.join(HERE, "seeds", target)
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, name), "wb") as f:
            f.write(self.header + bytes(self.mem).rstrip(b"\0"))


# virtio-blk: header (type, reserved, sector) at 0x1000, data at 0x1200, status at 0x1400.
BLK_IN, BLK_OUT, BLK_FLUSH, BLK_GET_ID = 0, 1, 4, 8


def blk(kind, sector, data_len, data_writable, **kw):
    img = Image(**kw)
    img.put(0x1000, struct.pack("<IIQ", kind, 0, sector))
    img.put(0x1200, bytes([0x5A]) * data_len)
    bufs = [(0x1000, 16, False)]
    if data_len:
        bufs.append((0x1200, data_len, data_writable))
    bufs.append((0x1400, 1, True))
    return img, bufs


img, bufs = blk(BLK_IN, 1, 1024, True)
img.chain(0, bufs)
img.write("virtio_blk", "read")
img, bufs = blk(BLK_OUT, 2, 512, False)
img.chain(0, bufs)
img.write("virtio_blk", "write")
img, bufs = blk(BLK_OUT, 2, 512, False, flags=1)
img.chain(0, bufs)
img.write("virtio_blk", "write-read-only")
img, bufs = blk(BLK_IN, 0, 512, True)
img.indirect_chain(0, 0x1800, bufs)
img.write("virtio_blk", "indirect")
img, bufs = blk(BLK_IN, 0, 512, True, private=1 << 1)
img.chain(0, bufs)
img.write("virtio_blk", "private-buffers")
img, bufs = blk(BLK_FLUSH, 0, 0, False, flags=2, rounds=2)
img.chain(0, bufs)
img.put(0x1600, struct.pack("<IIQ", BLK_GET_ID, 0, 0))
img.chain(0, [(0x1600, 16, False), (0x1700, 20, True), (0x1720, 1, True)])
img.write("virtio_blk", "flush-get-id")
img, bufs = blk(BLK_IN, 1000, 512, True)
img.chain(0, bufs)
img.write("virtio_blk", "past-the-end")

# virtio-console: queue 0 receives, queue 1 transmits.
img = Image()
img.put(0x1000, b"hello from the guest\n")
img.chain(1, [(0x1000, 21, False)])
img.chain(0, [(0x1100, 64, True)])
img.write("virtio_console", "transmit")
img = Image(flags=2, rounds=2)
img.put(0x1000, b"two ")
img.put(0x1010, b"buffers\n")
img.chain(1, [(0x1000, 4, False), (0x1010, 8, False)])
img.indirect_chain(1, 0x1800, [(0x1000, 4, False)])
img.write("virtio_console", "chained-and-indirect")
img = Image(private=1 << 1)
img.put(0x1000, b"private\n")
img.chain(1, [(0x1000, 8, False)])
img.write("virtio_console", "private-buffer")

# vsock: queue 0 receives, 1 transmits, 2 events; the host listens on port 1024.
OP_REQUEST, OP_SHUTDOWN, OP_RW, OP_CREDIT_REQUEST = 1, 4, 5, 7


def vsock_header(op, length=0, dst_port=1024, flags=0):
    return struct.pack("<QQIIIHHIII", 3, 2, 5000, dst_port, length, 1, op, flags, 65536, 0)


def vsock(packets, **kw):
    img = Image(**kw)
    at = 0x1000
    for header, data in packets:
        img.put(at, header + data)
        if data:
            img.chain(1, [(at, 44, False), (at + 44, len(data), False)])
        else:
            img.chain(1, [(at, 44, False)])
        at += 0x100
    for i in range(4):
        img.chain(0, [(0x1800 + 0x100 * i, 0x100, True)])
    img.chain(2, [(0x1c00, 8, True)])
    return img


vsock([(vsock_header(OP_REQUEST), b"")]).write("vsock_packets", "request")
vsock(
    [
        (vsock_header(OP_REQUEST), b""),
        (vsock_header(OP_RW, 5), b"hello"),
        (vsock_header(OP_CREDIT_REQUEST), b""),
        (vsock_header(OP_SHUTDOWN, flags=3), b""),
    ],
    rounds=3,
).write("vsock_packets", "connect-send-shutdown")
vsock([(vsock_header(OP_REQUEST, dst_port=7), b"")]).write("vsock_packets", "nobody-listens")
vsock([(vsock_header(OP_RW, 5), b"stray")], flags=2).write("vsock_packets", "data-without-connection")
