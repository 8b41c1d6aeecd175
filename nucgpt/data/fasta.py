"""Streaming readers for softmasked sequence input: FASTA (plain or gzip) and the original CSV bins.

Both stream in big blocks (memory stays flat whatever the genome size) and normalise bases with one
`bytes.translate` per block: ACGTN/acgtn are kept as they are (case = RepeatMasker softmask), the
IUPAC ambiguity codes RYKMSWBDHV map to N keeping their case and are counted, line ends (LF or
CRLF), spaces and tabs are dropped, and any other byte is a UserError naming the file and line.
Gzip is detected by its magic bytes, not by the file name; multi-member (bgzip) files work.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import os
import queue
import threading
import zlib
from typing import Iterator

from nucgpt.data.records import MAX_START
from nucgpt.errors import UserError

IUPAC_CODES = b"RYKMSWBDHV"
_BLOCK_BYTES = 1 << 22  # compressed bytes per read: big blocks keep zlib and translate efficient
_GZIP_MAGIC = b"\x1f\x8b"
_DROPPED = b"\r\n \t"
_OTHER_COMPRESSION = ((b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"PK\x03\x04", "zip"))


def _normalising_table() -> bytes:
    table = bytearray(256)  # 0 marks a byte that is not allowed
    for base in b"ACGTN":
        table[base] = base
        table[base + 32] = base + 32
    for code in IUPAC_CODES:  # marked first: rare, so found by a fast `in` before they are counted
        table[code] = 1
        table[code + 32] = 2
    return bytes(table)


NORMALISE = _normalising_table()
_MARKS_TO_N = bytes.maketrans(b"\x01\x02", b"Nn")
_FIND_INVALID = bytes(value or (byte in _DROPPED) for byte, value in enumerate(NORMALISE))  # 0 = not allowed


def _read_blocks(f, size: int, digest) -> Iterator[bytes]:
    while block := f.read(size):
        if digest is not None:
            digest.update(block)
        yield block


def decompressed_blocks(path: str | os.PathLike, digest=None) -> Iterator[bytes]:
    """The file's bytes in large blocks, gunzipped when it starts with the gzip magic.

    `digest` (a hashlib object) is fed the file's raw bytes, so hashing costs no second read.
    """
    with open(path, "rb") as f:
        head = f.read(6)
        is_gzip = head.startswith(_GZIP_MAGIC)
        for magic, name in _OTHER_COMPRESSION:
            if head.startswith(magic):
                raise UserError(f"{path}: {name}-compressed; only gzip (or bgzip) is read: decompress it first")
        f.seek(0)
        if not is_gzip:
            yield from _read_blocks(f, _BLOCK_BYTES * 4, digest)
            return
        inflater = zlib.decompressobj(wbits=31)  # None between two gzip members
        try:
            for raw in _read_blocks(f, _BLOCK_BYTES, digest):
                while raw:
                    if inflater is None and not raw.strip(b"\0"):
                        break  # zero padding after the last member (tape/block-device copies); gzip ignores it too
                    inflater = inflater or zlib.decompressobj(wbits=31)
                    if out := inflater.decompress(raw):
                        yield out
                    raw = b""
                    if inflater.eof:  # the next member (bgzip) starts in the unused bytes
                        raw, inflater = inflater.unused_data, None
        except zlib.error as e:
            raise UserError(f"{path}: corrupt gzip data ({e})") from None
        if inflater is not None:
            raise UserError(f"{path}: truncated gzip file (the compressed stream ends early)")


_END = object()


def read_ahead(blocks: Iterator[bytes], depth: int = 2) -> Iterator[bytes]:
    """`blocks`, produced in a thread: zlib and sha256 release the GIL, so gunzip overlaps the consumer.

    At most `depth` blocks wait in the queue, so memory stays bounded; errors reach the consumer.
    """
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for block in blocks:
                if not put(block):
                    return
            put(_END)
        except BaseException as e:  # handed over and raised in the consumer
            put(e)

    threading.Thread(target=produce, daemon=True, name="read_ahead").start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


@dataclasses.dataclass
class SequenceStats:
    """What a reader saw, for the manifest: IUPAC codes turned into N, the sha256 of the raw file."""

    iupac_bases: int = 0
    sha256: "hashlib._Hash" = dataclasses.field(default_factory=hashlib.sha256)


def _line_at(path, offset: int) -> int:
    """The line number of byte `offset` of the decompressed file: counted again only to report an error."""
    newlines = 0
    for block in decompressed_blocks(path):
        if offset < len(block):
            return newlines + block.count(b"\n", 0, offset) + 1
        newlines += block.count(b"\n")
        offset -= len(block)
    return newlines + 1


class _InvalidByte(Exception):
    def __init__(self, index: int, char: str):
        super().__init__(index, char)
        self.index, self.char = index, char


def _invalid_message(path, line: int, char: str) -> str:
    return (f"{path}:{line}: invalid character {char!r} in sequence "
            f"(allowed: ACGTN, IUPAC codes {IUPAC_CODES.decode()} which become N; either case)")


def _normalise(data: bytes, stats: SequenceStats) -> bytes:
    """Normalised bases of sequence text `data`; raises _InvalidByte at the first byte not allowed."""
    bases = data.translate(NORMALISE, _DROPPED)
    if b"\0" in bases:
        bad = data.translate(_FIND_INVALID).index(b"\0")
        raise _InvalidByte(bad, chr(data[bad]))
    if b"\x01" in bases or b"\x02" in bases:
        stats.iupac_bases += bases.count(b"\x01") + bases.count(b"\x02")
        bases = bases.translate(_MARKS_TO_N)
    return bases


def read_fasta(path: str | os.PathLike, stats: SequenceStats) -> Iterator[tuple[str, bytes]]:
    """Yields (chrom, bases) pieces in file order: (chrom, b"") at each header, then its sequence.

    The chromosome name is the header up to the first whitespace; descriptions are ignored.
    """
    block_offset = 0  # file offset of block[0]
    carry = b""
    at_line_start = True
    seen_header = False
    seen_any = False
    chrom = ""
    for raw in read_ahead(decompressed_blocks(path, stats.sha256)):
        seen_any = True
        block = carry + raw if carry else raw
        carry = b""
        pos = 0
        while pos < len(block):
            if block[pos] == 0x3E:  # '>'
                if not (at_line_start if pos == 0 else block[pos - 1] == 0x0A):
                    raise UserError(f"{path}:{_line_at(path, block_offset + pos)}: invalid character '>' "
                                    "inside a sequence line")
                end = block.find(b"\n", pos)
                if end < 0:
                    carry = block[pos:]
                    break
                name = block[pos + 1 : end].split(None, 1)
                if not name:
                    raise UserError(f"{path}:{_line_at(path, block_offset + pos)}: FASTA header without a name")
                seen_header = True
                chrom = name[0].decode("ascii", "replace")
                yield chrom, b""
                pos = end + 1
                continue
            end = block.find(b">", pos)
            end = len(block) if end < 0 else end
            if not seen_header and (text := block[pos:end].lstrip()):
                line = _line_at(path, block_offset + end - len(text))
                raise UserError(f"{path}:{line}: text before the first '>' header (not a FASTA file?)")
            try:
                bases = _normalise(block[pos:end], stats)
            except _InvalidByte as e:
                raise UserError(_invalid_message(path, _line_at(path, block_offset + pos + e.index), e.char)) from None
            if bases:
                yield chrom, bases
            pos = end
        at_line_start = block.endswith(b"\n") or bool(carry)
        block_offset += len(block) - len(carry)
    if carry:  # a last header line without a newline
        name = carry[1:].split(None, 1)
        if not name:
            raise UserError(f"{path}:{_line_at(path, block_offset)}: FASTA header without a name")
        seen_header = True
        yield name[0].decode("ascii", "replace"), b""
    if not seen_any:
        raise UserError(f"{path}: empty file")
    if not seen_header:
        raise UserError(f"{path}: no '>' header line (not a FASTA file?)")


def read_csv_bins(path: str | os.PathLike, stats: SequenceStats) -> Iterator[tuple[str, int, bytes]]:
    """Yields (chrom, start, bases) per row of the original project's `Chrom,Start,End,Sequence` CSV."""
    blocks = _BlockStream(decompressed_blocks(path, stats.sha256))
    # latin-1 maps every byte to one character, so a bad byte reaches _normalise and is reported with its line.
    text = io.TextIOWrapper(io.BufferedReader(blocks), encoding="latin-1", newline="")
    csv.field_size_limit(2**31 - 1)  # one row holds a whole bin's sequence
    rows = csv.reader(text)
    header = next(rows, None)
    if header is None:
        raise UserError(f"{path}: empty file")
    columns = [c.strip().lower() for c in header]
    if columns:
        columns[0] = columns[0].removeprefix("\xef\xbb\xbf")  # a UTF-8 byte-order mark, seen through latin-1
    missing = [c for c in ("chrom", "start", "sequence") if c not in columns]
    if missing:
        raise UserError(f"{path}:1: CSV header lacks column(s) {', '.join(missing)} (want Chrom,Start,End,Sequence)")
    chrom_col, start_col, seq_col = (columns.index(c) for c in ("chrom", "start", "sequence"))
    for row in rows:
        if not row:
            continue
        line = rows.line_num
        try:
            chrom, start, seq = row[chrom_col], int(row[start_col]), row[seq_col]
        except (IndexError, ValueError):
            raise UserError(f"{path}:{line}: malformed CSV row (want Chrom,Start,End,Sequence)") from None
        if not 0 <= start <= MAX_START:
            raise UserError(f"{path}:{line}: Start {start} is outside 0..2^64-1")
        try:
            bases = _normalise(seq.encode("latin-1"), stats)
        except _InvalidByte as e:
            raise UserError(_invalid_message(path, line, e.char)) from None
        if not bases:
            raise UserError(f"{path}:{line}: empty Sequence")
        yield chrom, start, bases


class _BlockStream(io.RawIOBase):
    """A readable stream over an iterator of byte blocks (to put the csv module on decompressed data)."""

    def __init__(self, blocks: Iterator[bytes]):
        self._blocks = blocks
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            block = next(self._blocks, b"")
            if not block:
                return 0
            self._pending = memoryview(block)
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        return n


def read_records(path: str | os.PathLike) -> Iterator[tuple[str, bytes]]:
    """(name, bases) of each record, whole, in file order (IUPAC codes read as N): for files of many
    short records (prompts, sequences to score), not genomes."""
    name, pieces = None, []
    for chrom, bases in read_fasta(path, SequenceStats()):
        if bases:
            pieces.append(bases)
            continue
        if name is not None:
            yield name, b"".join(pieces)
        name, pieces = chrom, []
    if name is not None:
        yield name, b"".join(pieces)
