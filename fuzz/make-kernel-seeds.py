#!/usr/bin/env python3
"""Writes the kernel_load target's seeds: the smallest PVH ELF and bzImage headers Veil loads.

Generated rather than committed, since they are executables in form: a 212-byte ELF with one
PT_LOAD of 16 bytes at 1 MiB and a PT_NOTE holding XEN_ELFNOTE_PHYS32_ENTRY, and a one-page
bzImage with a Linux boot protocol 2.15 header (one setup sector, loaded high).

    python3 fuzz/make-kernel-seeds.py [DIR]   (default: fuzz/seeds/kernel_load)
"""

import os
import struct
import sys

ENTRY = 0x100000  # 1 MiB, where kit guests load


def pvh_elf():
    ehdr = struct.pack(
        "<4sBBBBB7xHHIQQQIHHHHHH",
        b"\x7fELF", 2, 1, 1, 0, 0,  # 64-bit, little-endian, version 1, System V
        2, 0x3E, 1,  # ET_EXEC, x86-64, version 1
        ENTRY, 0x40, 0,  # entry, program headers right after this header, no sections
        0, 0x40, 0x38, 2, 0, 0, 0,  # flags, sizes, two program headers, no sections
    )
    code = b"\xf4" * 16  # hlt
    note = struct.pack("<III4sI", 4, 4, 18, b"Xen\x00", ENTRY)  # XEN_ELFNOTE_PHYS32_ENTRY
    code_at = 0x40 + 2 * 0x38
    note_at = code_at + len(code)
    load = struct.pack("<IIQQQQQQ", 1, 5, code_at, ENTRY, ENTRY, len(code), len(code), 0x1000)
    pnote = struct.pack("<IIQQQQQQ", 4, 4, note_at, 0, 0, len(note), len(note), 4)
    return ehdr + load + pnote + code + note


def bzimage():
    image = bytearray(4096)
    image[0x1F1] = 1  # setup_sects
    image[0x1FE:0x200] = b"\x55\xaa"  # boot_flag
    image[0x202:0x206] = b"HdrS"  # header
    image[0x206:0x208] = struct.pack("<H", 0x020F)  # protocol version 2.15
    image[0x211] = 1  # loadflags: LOADED_HIGH
    image[0x216] = 0x10  # code32_start = 0x100000
    return bytes(image)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "seeds", "kernel_load")
    os.makedirs(out, exist_ok=True)
    for name, data in (("pvh-elf", pvh_elf()), ("bzimage", bzimage())):
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
