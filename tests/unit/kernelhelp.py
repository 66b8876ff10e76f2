"""A synthetic x86 kernel image for the rekernel unit tests: just the boot header parts the code reads."""

from __future__ import annotations

import struct


def bzimage(version: str) -> bytes:
    """The parts of an x86 boot header that read_bzimage_header looks at (a 64-bit kernel of ``version``)."""
    data = bytearray(0x4000)
    data[0x1FE:0x200] = b"\x55\xaa"
    data[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", data, 0x206, 0x020F)
    struct.pack_into("<H", data, 0x20E, 0x1000)
    banner = f"{version} (builder@example) #1 SMP".encode() + b"\0"
    data[0x1200 : 0x1200 + len(banner)] = banner
    struct.pack_into("<H", data, 0x236, 1)  # XLF_KERNEL_64
    return bytes(data)
