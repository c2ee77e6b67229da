"""Disk damage inside one member of a cache shard (.npz), leaving the zip directory intact."""

from __future__ import annotations

import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

# A .npy file (format 1.0) starts with 6 magic bytes, 2 version bytes and a 2-byte header
# length; its header, a Python dict literal, starts here.
NPY_HEADER_START = 10


def _flip_byte(shard: Path, member: str, offset_in_member: Callable[[zipfile.ZipInfo], int]) -> None:
    """Flip one byte of ``member``'s stored (uncompressed: np.savez) data, as a bad sector would."""
    with zipfile.ZipFile(shard) as z:
        info = z.getinfo(member)
    data = bytearray(shard.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + offset_in_member(info)] ^= 0xFF
    shard.write_bytes(bytes(data))


def flip_byte_in_member(shard: Path, member: str) -> None:
    """Flip the last byte of ``member``'s stored data (inside the array, past the .npy
    header), as a bad sector would: the ids and hashes still read, this member's CRC fails."""
    _flip_byte(shard, member, lambda info: info.compress_size - 1)


def flip_header_byte_in_member(shard: Path, member: str) -> None:
    """Flip the first byte of ``member``'s .npy header. In a member larger than zipfile's first
    read (4096 bytes) np.load parses the damaged header before the CRC check can fail."""
    _flip_byte(shard, member, lambda info: NPY_HEADER_START)
