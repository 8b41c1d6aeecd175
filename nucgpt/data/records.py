"""The on-disk format: one record per genomic window (softmasked text, case kept, plus where it came
from), ArrayRecord shards, and the manifest that lists them.

Record layout (format_version 1), all integers little-endian:

    uint16 chrom_len | chrom (utf-8, chrom_len bytes) | uint64 start (0-based) | sequence (ascii)

The sequence is exactly the genome slice [start, start + len) as in the FASTA (IUPAC codes already
N, case kept). A `--keep_tail` window is simply shorter than the others; the loader pads it. Decoding
is a slice and a `np.frombuffer`: no parsing library on the hot path of the loader.
Shards are ArrayRecord files written with `group_size:1` (each record its own chunk: cheap random
access for a global shuffle) and zstd level 1.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from nucgpt.errors import UserError

FORMAT_VERSION = 1
WRITER_OPTIONS = "group_size:1,zstd:1"
_START = struct.Struct("<Q")
MAX_CHROM_BYTES = 0xFFFF  # the uint16 length
MAX_START = 2**64 - 1


def encode_record(chrom: str, start: int, sequence: bytes | bytearray) -> bytes:
    name = chrom.encode("utf-8")
    return b"".join((len(name).to_bytes(2, "little"), name, _START.pack(start), sequence))


def decode_record(record: bytes) -> tuple[str, int, bytes]:
    """(chrom, start, sequence) of one record."""
    name_end = 2 + int.from_bytes(record[:2], "little")
    (start,) = _START.unpack_from(record, name_end)
    return record[2:name_end].decode("utf-8"), start, record[name_end + 8 :]


def sequence_u8(record: bytes) -> np.ndarray:
    """The sequence of a record as a uint8 view, without copying (the loader's fast path)."""
    return np.frombuffer(record, np.uint8, offset=2 + int.from_bytes(record[:2], "little") + 8)


def read_manifest(path: str | os.PathLike) -> dict:
    """The manifest of a prepared dataset folder; UserError when `path` is not one."""
    file = os.path.join(os.fspath(path), "manifest.json")
    if not os.path.isfile(file):
        raise UserError(f"{path}: no manifest.json (not a prepared dataset; create one with nucgpt-prepare)")
    try:
        with open(file, "rb") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: damaged manifest, not JSON ({e}); prepare the dataset again") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise UserError(f"{file}: format_version {found!r}, this nucgpt reads {FORMAT_VERSION}; prepare the dataset again")
    missing = [key for key in ("sources", "options", "splits", "chromosomes") if key not in manifest]
    if missing:
        raise UserError(f"{file}: damaged manifest, no {', '.join(missing)}; prepare the dataset again")
    for split in manifest["splits"].values():
        for shard in split.get("shards", ()):
            if not os.path.isfile(os.path.join(os.fspath(path), shard)):
                raise UserError(f"{path}: shard {shard} listed in manifest.json is missing (copy the whole folder)")
    return manifest


class ShardedWriter:
    """Writes records of one split into `<root>/<split>/<split>-NNNNN.array_record` shards."""

    def __init__(self, root: str | os.PathLike, split: str, records_per_shard: int):
        self._root = root
        self._split = split
        self._records_per_shard = records_per_shard
        self._writer = None
        self._in_shard = 0
        self.shards: list[str] = []  # relative to root

    def write(self, record: bytes) -> None:
        if self._writer is None or self._in_shard == self._records_per_shard:
            self._open_next()
        self._writer.write(record)
        self._in_shard += 1

    def _open_next(self) -> None:
        self.close()
        relative = f"{self._split}/{self._split}-{len(self.shards):05d}.array_record"
        os.makedirs(os.path.join(self._root, self._split), exist_ok=True)
        self._writer = ArrayRecordWriter(os.path.join(self._root, relative), WRITER_OPTIONS)
        self._in_shard = 0
        self.shards.append(relative)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
