"""Disk damage inside one member of a cache shard (.npz), leaving the zip directory intact."""

from __future__ import annotations

import struct
import zipfile
from pathlib import Path


def flip_byte_in_member(shard: Path, member: str) -> None:
    """Flip the last byte of ``member``'s stored data (inside the array, past the .npy
    header), as a bad sector would: the ids and hashes still read, this member's CRC fails."""
    with zipfile.ZipFile(shard) as z:
        info = z.getinfo(member)
    data = bytearray(shard.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.compress_size - 1] ^= 0xFF
    shard.write_bytes(bytes(data))
