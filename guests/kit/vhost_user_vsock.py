"""A tiny vhost-user virtio-vsock backend with a scripted host peer, for qemu-test.py.

QEMU's `vhost-vsock-device` needs the host kernel's /dev/vhost-vsock, which the project's hosts
lack; its `vhost-user-vsock-device` hands the rx and tx queues to a backend process over a UNIX
socket instead (the event queue stays in QEMU). This backend is that process, and it is also
the host side of the connection (CID 2), so the kit's vsock driver runs against QEMU's
virtio-mmio transport and a peer that checks the protocol: the header, credit in both
directions, SHUTDOWN then RST.

    peer = Peer("echo", port=1234, nbytes=N, host_buf_alloc=B)   # or "connect", "slow", "refuse"
    backend = Backend(socket_path, peer); backend.start()   # before QEMU connects
    ... QEMU with -chardev socket,id=vu,path=SOCK -device vhost-user-vsock-device,chardev=vu
    backend.join(); peer.problems                            # what the peer saw go wrong

Only what QEMU 7.2 sends for vhost-user-vsock is handled (vhost-user protocol, QEMU's
docs/interop/vhost-user.rst); guest memory must be shared (memory-backend-file,share=on).
"""

import mmap
import os
import select
import socket
import struct
import threading
import time

# vhost-user requests (docs/interop/vhost-user.rst).
GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
GET_CONFIG = 24
VHOST_USER_VERSION, VHOST_USER_REPLY = 0x1, 0x4
VIRTIO_F_VERSION_1 = 1 << 32
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30
VHOST_USER_PROTOCOL_F_CONFIG = 1 << 9
VRING_NOFD = 0x100

VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE = 1, 2
# virtio 1.2 §5.10.6.
HDR = struct.Struct("<QQIIIHHIII")
TYPE_STREAM = 1
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = 1, 2, 3, 4, 5, 6, 7
HOST_CID = 2
GUEST_CID = 3
HOST_PORT = 5000  # the host's port for connections it opens


def pattern(offset, n):
    """vsock-connect's stream: byte i is i % 251."""
    return bytes((offset + i) % 251 for i in range(n))


class Peer:
    """The host side of one connection. `mode`:
    - echo: connect to the guest's `port`, send `nbytes` bytes, expect them back;
    - connect: accept the guest's connection to `port`, echo what it sends;
    - slow: connect, send until the guest's credit is used up, never more (`nbytes`: the
      credit the guest must have given);
    - refuse: answer the guest's connection request with RST.
    `host_buf_alloc` is the credit the host gives the guest; `host_credit_every` how many
    consumed bytes it waits for before telling the guest (small values make the guest wait).
    A misbehaving host, for the guest to catch: `ignore_credit` sends past the guest's credit,
    `close_after` sends RST after that many bytes, `corrupt_at` flips that byte of what it
    echoes (connect mode)."""

    def __init__(self, mode, port, nbytes=0, host_buf_alloc=256 * 1024, host_credit_every=None,
                 chunk=65536 - 44, ignore_credit=False, close_after=None, corrupt_at=None):
        self.mode, self.port, self.nbytes = mode, port, nbytes
        self.buf_alloc = host_buf_alloc
        self.credit_every = host_credit_every or host_buf_alloc // 2
        self.chunk = chunk
        self.ignore_credit, self.close_after, self.corrupt_at = ignore_credit, close_after, corrupt_at
        self.data = os.urandom(nbytes) if mode == "echo" else b""
        self.problems = []
        self.out = []  # packets (header tuple, payload) for the guest
        self.connected = False
        self.tx_cnt = 0  # payload bytes the host sent
        self.fwd_cnt = 0  # payload bytes the host consumed
        self.fwd_told = 0
        self.guest_buf_alloc = 0
        self.guest_fwd_cnt = 0
        self.got = bytearray()  # what the guest sent
        self.pending = bytearray()  # connect mode: bytes to echo
        self.done = False
        self.rst_sent = False
        self.guest_port = None
        self.slow_stalled_at = None
        if mode in ("echo", "slow"):
            self.send(OP_REQUEST, 0, HOST_PORT, port)

    def header(self, op, length, src_port, dst_port, flags=0):
        return (HOST_CID, GUEST_CID, src_port, dst_port, length, TYPE_STREAM, op, flags,
                self.buf_alloc, self.fwd_cnt)

    def send(self, op, length, src_port, dst_port, flags=0, payload=b""):
        self.fwd_told = self.fwd_cnt
        self.out.append((self.header(op, length, src_port, dst_port, flags), payload))

    def local(self):
        return (HOST_PORT, self.port) if self.mode in ("echo", "slow") else (self.port, self.guest_port)

    def guest_credit(self):
        return self.guest_buf_alloc - (self.tx_cnt - self.guest_fwd_cnt)

    def problem(self, text):
        if text not in self.problems:
            self.problems.append(text)

    def from_guest(self, hdr, payload):
        src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf_alloc, fwd_cnt = hdr
        if src_cid != GUEST_CID or dst_cid != HOST_CID or kind != TYPE_STREAM:
            self.problem(f"bad header from the guest: {hdr}")
            return
        if length != len(payload):
            self.problem(f"header len {length} but {len(payload)} payload bytes")
        self.guest_buf_alloc, self.guest_fwd_cnt = buf_alloc, fwd_cnt
        if op == OP_REQUEST:
            if self.mode == "refuse":
                self.send(OP_RST, 0, dst_port, src_port)
                return
            if self.mode != "connect" or dst_port != self.port:
                self.problem(f"unexpected REQUEST {hdr}")
                return
            self.guest_port = src_port
            self.connected = True
            self.send(OP_RESPONSE, 0, self.port, src_port)
            return
        if op == OP_RESPONSE:
            if self.mode not in ("echo", "slow") or dst_port != HOST_PORT:
                self.problem(f"unexpected RESPONSE {hdr}")
            self.connected = True
            return
        if op == OP_RW:
            if self.mode == "slow":
                self.problem("the slow guest sent data")
            unread = len(self.got) + len(payload) - self.fwd_cnt
            if unread > self.buf_alloc:
                self.problem(f"the guest sent beyond the host's credit ({unread} > {self.buf_alloc})")
            self.got += payload
            self.fwd_cnt += len(payload)  # the host reads at once ...
            if self.mode == "connect":
                self.pending += payload
            if self.fwd_cnt - self.fwd_told >= self.credit_every:  # ... but says so lazily
                self.send(OP_CREDIT_UPDATE, 0, *self.local())
            return
        if op == OP_CREDIT_REQUEST:
            self.send(OP_CREDIT_UPDATE, 0, *self.local())
            return
        if op == OP_CREDIT_UPDATE:
            return
        if op == OP_SHUTDOWN:
            self.send(OP_RST, 0, *self.local())
            self.rst_sent = True
            self.done = True
            return
        if op == OP_RST:
            self.done = True
            return
        self.problem(f"unknown op {op}")

    def pump(self):
        """Queues data for the guest as far as its credit goes."""
        if not self.connected or self.done:
            return
        if self.mode == "echo":
            source, offset = self.data, self.tx_cnt
        elif self.mode == "connect":
            source, offset = self.pending, 0
        elif self.mode == "slow":
            source, offset = None, self.tx_cnt
        else:
            return
        while True:
            if self.close_after is not None and self.tx_cnt >= self.close_after:
                self.send(OP_RST, 0, *self.local())
                self.done = True
                return
            credit = self.guest_credit()
            if self.ignore_credit:
                credit = max(credit, 0) + self.chunk if self.tx_cnt < 4 * self.guest_buf_alloc else 0
            if credit < 0:
                self.problem(f"the guest's credit went negative ({credit})")
                return
            if source is None:
                n = min(self.chunk, credit)
                payload = bytes(n)
            else:
                n = min(self.chunk, credit, len(source) - offset)
                if self.close_after is not None:
                    n = min(n, self.close_after - self.tx_cnt)
                payload = bytes(source[offset:offset + n])
                if self.corrupt_at is not None and self.tx_cnt <= self.corrupt_at < self.tx_cnt + n:
                    i = self.corrupt_at - self.tx_cnt
                    payload = payload[:i] + bytes([payload[i] ^ 0xFF]) + payload[i + 1:]
            if n <= 0:
                if self.mode == "slow" and credit == 0 and self.slow_stalled_at is None:
                    self.slow_stalled_at = self.tx_cnt
                return
            self.tx_cnt += n
            self.send(OP_RW, n, *self.local(), payload=payload)
            if self.mode == "connect":
                del self.pending[:n]
            else:
                offset += n

    def verdict(self):
        """What went wrong, seen from the host, once the guest has exited."""
        problems = list(self.problems)
        if self.ignore_credit or self.close_after is not None or self.corrupt_at is not None:
            return problems  # the guest's own report is what the scenario checks
        if self.mode == "echo" and bytes(self.got) != self.data:
            problems.append(f"echo differs: sent {len(self.data)} bytes, got {len(self.got)} back"
                            + ("" if len(self.got) != len(self.data) else ", not the same"))
        if self.mode == "connect" and bytes(self.got) != pattern(0, len(self.got)):
            problems.append("the guest's bytes are not the pattern")
        if self.mode == "connect" and len(self.got) != self.nbytes:
            problems.append(f"the guest sent {len(self.got)} bytes, expected {self.nbytes}")
        if self.mode == "slow" and self.slow_stalled_at != self.nbytes:
            problems.append(f"the host ran out of credit after {self.slow_stalled_at} bytes, "
                            f"expected {self.nbytes}")
        if self.mode in ("echo", "connect") and not self.done:
            problems.append("the connection was not shut down")
        return problems


class Vring:
    def __init__(self):
        self.num = 0
        self.desc = self.avail = self.used = None
        self.last_avail = 0
        self.kick = self.call = None


class Backend(threading.Thread):
    def __init__(self, path, peer):
        super().__init__(daemon=True)
        self.path, self.peer = path, peer
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):
            os.unlink(path)
        self.listener.bind(path)
        self.listener.listen(1)
        self.regions = []  # (gpa, size, uva, mmap, offset)
        self.vrings = [Vring(), Vring()]
        self.error = None

    # Guest memory.
    def _find(self, addr, by_uva):
        for gpa, size, uva, mm, off in self.regions:
            base = uva if by_uva else gpa
            if base <= addr < base + size:
                return mm, off + addr - base
        raise ValueError(f"address {addr:#x} not in guest memory")

    def read(self, addr, n, by_uva=False):
        mm, off = self._find(addr, by_uva)
        return mm[off:off + n]

    def write(self, addr, data, by_uva=False):
        mm, off = self._find(addr, by_uva)
        mm[off:off + len(data)] = data

    def u16(self, uva):
        return struct.unpack("<H", self.read(uva, 2, True))[0]

    # Rings (virtio 1.2 §2.7).
    def chains(self, q):
        """Yields (head, [(addr, len, flags)]) for each new available chain."""
        vr = self.vrings[q]
        if vr.avail is None:
            return
        avail_idx = self.u16(vr.avail + 2)
        while vr.last_avail != avail_idx:
            head = self.u16(vr.avail + 4 + 2 * (vr.last_avail % vr.num))
            vr.last_avail = (vr.last_avail + 1) & 0xFFFF
            descs, i = [], head
            for _ in range(vr.num):
                addr, length, flags, nxt = struct.unpack("<QIHH", self.read(vr.desc + 16 * i, 16, True))
                descs.append((addr, length, flags))
                if not flags & VIRTQ_DESC_F_NEXT:
                    break
                i = nxt
            yield head, descs

    def put_used(self, q, head, length):
        vr = self.vrings[q]
        idx = self.u16(vr.used + 2)
        self.write(vr.used + 4 + 8 * (idx % vr.num), struct.pack("<II", head, length), True)
        self.write(vr.used + 2, struct.pack("<H", (idx + 1) & 0xFFFF), True)
        if vr.call is not None:
            os.write(vr.call, struct.pack("<Q", 1))

    def process(self):
        peer = self.peer
        for head, descs in self.chains(1):  # tx: the guest's packets
            data = b"".join(self.read(a, n) for a, n, f in descs if not f & VIRTQ_DESC_F_WRITE)
            if any(f & VIRTQ_DESC_F_WRITE for _, _, f in descs):
                peer.problem("a tx descriptor is device-writable")
            self.put_used(1, head, 0)
            if len(data) < HDR.size:
                peer.problem(f"a tx packet of {len(data)} bytes")
                continue
            hdr = HDR.unpack_from(data)
            peer.from_guest(hdr, data[HDR.size:HDR.size + hdr[4]])
        peer.pump()
        while peer.out and self.vrings[0].avail is not None:
            chain = next(self.chains(0), None)
            if chain is None:
                break
            head, descs = chain
            hdr, payload = peer.out[0]
            room = sum(n for _, n, f in descs if f & VIRTQ_DESC_F_WRITE)
            if room < HDR.size + len(payload):
                peer.problem(f"an rx buffer of {room} bytes, too small for {len(payload)}")
                room_payload = max(0, room - HDR.size)
                hdr = hdr[:4] + (room_payload,) + hdr[5:]
                payload = payload[:room_payload]
            peer.out.pop(0)
            data = HDR.pack(*hdr) + payload
            written = 0
            for addr, n, f in descs:
                if not f & VIRTQ_DESC_F_WRITE or written == len(data):
                    continue
                piece = data[written:written + n]
                self.write(addr, piece)
                written += len(piece)
            self.put_used(0, head, written)

    # The vhost-user conversation.
    def run(self):
        try:
            self.listener.settimeout(60)
            conn, _ = self.listener.accept()
            self.serve(conn)
        except Exception as e:  # reported by the scenario
            self.error = f"vhost-user backend: {type(e).__name__}: {e}"
        finally:
            self.listener.close()

    def serve(self, conn):
        conn.setblocking(True)
        while True:
            fds = [conn] + [vr.kick for vr in self.vrings if vr.kick is not None]
            ready, _, _ = select.select(fds, [], [], 0.002)
            for vr in self.vrings:
                if vr.kick is not None and vr.kick in ready:
                    os.read(vr.kick, 8)
            if conn in ready and not self.message(conn):
                return
            if self.regions:
                self.process()

    def message(self, conn):
        msg, anc, _, _ = conn.recvmsg(12, socket.CMSG_SPACE(8 * 4))
        if len(msg) < 12:
            return False
        fds = []
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += list(struct.unpack(f"<{len(data) // 4}i", data[:len(data) // 4 * 4]))
        request, flags, size = struct.unpack("<III", msg)
        payload = b""
        while len(payload) < size:
            chunk = conn.recv(size - len(payload))
            if not chunk:
                return False
            payload += chunk

        def reply(body):
            conn.sendall(struct.pack("<III", request, VHOST_USER_VERSION | VHOST_USER_REPLY, len(body)) + body)

        if request == GET_FEATURES:
            reply(struct.pack("<Q", VIRTIO_F_VERSION_1 | VHOST_USER_F_PROTOCOL_FEATURES))
        elif request == GET_PROTOCOL_FEATURES:
            reply(struct.pack("<Q", VHOST_USER_PROTOCOL_F_CONFIG))
        elif request == GET_QUEUE_NUM:
            reply(struct.pack("<Q", 2))
        elif request == GET_CONFIG:
            offset, length, cflags = struct.unpack_from("<III", payload)
            config = struct.pack("<Q", GUEST_CID)[offset:offset + length]
            reply(struct.pack("<III", offset, length, cflags) + config.ljust(length, b"\0"))
        elif request == SET_MEM_TABLE:
            nregions, = struct.unpack_from("<I", payload)
            for m in self.regions:
                m[3].close()
            self.regions = []
            for i in range(nregions):
                gpa, size, uva, off = struct.unpack_from("<QQQQ", payload, 8 + 32 * i)
                mm = mmap.mmap(fds[i], size + off, mmap.MAP_SHARED)
                os.close(fds[i])
                self.regions.append((gpa, size, uva, mm, off))
        elif request == SET_VRING_NUM:
            index, num = struct.unpack_from("<II", payload)
            self.vrings[index].num = num
        elif request == SET_VRING_ADDR:
            index, _, desc, used, avail, _ = struct.unpack_from("<IIQQQQ", payload)
            vr = self.vrings[index]
            vr.desc, vr.used, vr.avail = desc, used, avail
        elif request == SET_VRING_BASE:
            index, num = struct.unpack_from("<II", payload)
            self.vrings[index].last_avail = num
        elif request == GET_VRING_BASE:
            index, _ = struct.unpack_from("<II", payload)
            vr = self.vrings[index]
            reply(struct.pack("<II", index, vr.last_avail))
            vr.avail = None
        elif request in (SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR):
            value, = struct.unpack_from("<Q", payload)
            vr = self.vrings[value & 0xFF]
            fd = None if value & VRING_NOFD or not fds else fds[0]
            if request == SET_VRING_KICK:
                vr.kick = fd
            elif request == SET_VRING_CALL:
                vr.call = fd
            elif fd is not None:
                os.close(fd)
        else:
            for fd in fds:
                os.close(fd)
        return True
