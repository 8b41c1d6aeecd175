"""Softmasked genome → ArrayRecord shards + manifest.json, once, offline: `python -m nucgpt.data.prepare`.

Streams the input (memory stays flat whatever the genome size), cuts each chromosome into windows,
drops windows with too many N, routes whole chromosomes to train/valid/test, and writes into a
hidden temporary folder that is renamed to `--out` only when everything succeeded: a failed or
interrupted run leaves nothing that looks like a dataset. Record layout: see nucgpt/data/records.py.

    python -m nucgpt.data.prepare --fasta hg38.fa.gz --out data/hg38 \\
        --valid_chroms chr20 --test_chroms chr21,chr22
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import shutil
import signal
import sys
import time
from typing import Iterator, Sequence

from absl import app, flags

from nucgpt.data import fasta, records
from nucgpt.errors import UserError, exits_cleanly_on_user_error, parse_flags
from nucgpt.files import check_can_create, check_replaceable, replace_folder, sibling_tmp_folder

SPLITS = ("train", "valid", "test")
DEFAULT_INCLUDE = r".*"
# UCSC alternate haplotypes, unplaced/unlocalised contigs and the mitochondrion: not nuclear reference.
DEFAULT_EXCLUDE = r".*_alt|.*_random|chrUn_.*|chrM"
_LOWERCASE = b"acgtn"


@dataclasses.dataclass
class _SplitStats:
    records: int = 0
    bp: int = 0
    lowercase: int = 0
    n: int = 0
    dropped_windows: int = 0
    chroms: dict = dataclasses.field(default_factory=dict)

    def add(self, chrom: str, window: bytes | bytearray, n: int) -> None:
        self.records += 1
        self.bp += len(window)
        self.lowercase += len(window) - len(window.translate(None, _LOWERCASE))
        self.n += n
        self.chroms[chrom] = self.chroms.get(chrom, 0) + 1

    def to_json(self, shards: list[str]) -> dict:
        return dict(
            records=self.records,
            bp=self.bp,
            lowercase_fraction=self.lowercase / self.bp if self.bp else 0.0,
            n_fraction=self.n / self.bp if self.bp else 0.0,
            dropped_windows=self.dropped_windows,
            shards=shards,
            chroms=self.chroms,
        )


class Windower:
    """Cuts one chromosome, fed as pieces, into (start, bases) windows without holding it whole."""

    def __init__(self, window: int, stride: int, keep_tail: bool):
        self._window, self._stride, self._keep_tail = window, stride, keep_tail
        self.reset()

    def reset(self) -> None:
        """Start a new chromosome."""
        self._buf = bytearray()
        self._start = 0  # genome position of buf[0], which is where the next window starts
        self._to_skip = 0  # bases still to skip when stride > window
        self._covered_end = 0

    def feed(self, piece: bytes) -> Iterator[tuple[int, bytearray]]:
        if self._to_skip:
            skipped = min(self._to_skip, len(piece))
            piece, self._to_skip = piece[skipped:], self._to_skip - skipped
        buf = self._buf
        buf += piece
        i = 0
        while len(buf) - i >= self._window:
            yield self._start, buf[i : i + self._window]
            self._covered_end = self._start + self._window
            i += self._stride
            self._start += self._stride
        if i:
            self._to_skip += max(i - len(buf), 0)
            del buf[:i]

    def finish(self) -> Iterator[tuple[int, bytearray]]:
        """The last partial window, with keep_tail, when it holds bases no window covered."""
        if self._keep_tail and self._buf and self._start + len(self._buf) > self._covered_end:
            yield self._start, self._buf


class _Progress:
    """A one-line bp/s progress bar on stderr, redrawn at most twice a second; where stderr is a
    file (a Slurm log, say) a plain line every 30 s instead of carriage returns."""

    def __init__(self, enabled: bool):
        self._enabled = enabled
        self._terminal = sys.stderr.isatty()
        self._drawn = False  # a bar line is on screen without its newline
        self._t0 = self._last = time.monotonic()

    def update(self, bp: int, num_records: int, force: bool = False) -> None:
        now = time.monotonic()
        if self._enabled and (force or now - self._last > (0.5 if self._terminal else 30.0)):
            self._last = now
            rate = bp / max(now - self._t0, 1e-9) / 1e6
            line = f"  {bp / 1e6:10.1f} Mbp read  {rate:7.1f} Mbp/s  {num_records:>10,} records"
            sys.stderr.write(f"\r{line}" if self._terminal else f"{line}\n")
            sys.stderr.flush()
            self._drawn = self._terminal

    def done(self, bp: int, num_records: int) -> None:
        self.update(bp, num_records, force=True)
        self.end_line()

    def end_line(self) -> None:
        """Ends the bar's line, so what follows (an error message too) starts on a line of its own."""
        if self._drawn:
            sys.stderr.write("\n")
            self._drawn = False

    def seconds(self) -> float:
        return time.monotonic() - self._t0


def _compile(flag: str, pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise UserError(f"--{flag}: invalid regular expression {pattern!r} ({e})") from None


def _check_options(inputs: Sequence[str], window: int, stride: int, max_n: int, records_per_shard: int,
                   valid_chroms: Sequence[str], test_chroms: Sequence[str]) -> None:
    if not inputs:
        raise UserError("no input: give --fasta and/or --csv files")
    for path in inputs:
        if not path:
            raise UserError("--fasta/--csv: an empty file name in the list (a stray comma?)")
        if os.path.isdir(path):
            raise UserError(f"{path}: is a folder; give the FASTA or CSV files in it")
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such file")
    if window <= 0:
        raise UserError(f"--window must be positive, got {window}")
    if stride <= 0:
        raise UserError(f"--stride must be positive, got {stride}")
    if max_n < 0:
        raise UserError(f"--max_n must be >= 0, got {max_n}")
    if records_per_shard <= 0:
        raise UserError(f"--records_per_shard must be positive, got {records_per_shard}")
    both = sorted(set(valid_chroms) & set(test_chroms))
    if both:
        raise UserError(f"chromosome(s) {', '.join(both)} in both --valid_chroms and --test_chroms")


def prepare(
    fasta_paths: Sequence[str],
    out_dir: str | os.PathLike,
    *,
    csv_paths: Sequence[str] = (),
    window: int = 8192,
    stride: int | None = None,
    max_n: int = 100,
    keep_tail: bool = False,
    valid_chroms: Sequence[str] = (),
    test_chroms: Sequence[str] = (),
    include: str = DEFAULT_INCLUDE,
    exclude: str = DEFAULT_EXCLUDE,
    records_per_shard: int = 8192,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Writes the dataset to `out_dir` and returns its manifest; raises UserError on bad input."""
    stride = window if stride is None else stride
    fasta_paths, csv_paths = [os.fspath(p) for p in fasta_paths], [os.fspath(p) for p in csv_paths]
    valid_chroms, test_chroms = tuple(valid_chroms), tuple(test_chroms)
    _check_options(fasta_paths + csv_paths, window, stride, max_n, records_per_shard, valid_chroms, test_chroms)
    include_re, exclude_re = _compile("include", include), _compile("exclude", exclude)
    out_dir = os.path.abspath(os.fspath(out_dir))
    check_replaceable(out_dir, "--out", overwrite=overwrite, marker="manifest.json", what="a prepared dataset")
    check_can_create(out_dir, "--out", folder=True)
    for path in fasta_paths + csv_paths:
        if os.path.abspath(path).startswith(out_dir + os.sep):
            raise UserError(f"{path}: an input inside --out {out_dir}, which would be replaced; move it out first")
    options = dict(window=window, stride=stride, max_n=max_n, keep_tail=keep_tail, valid_chroms=list(valid_chroms),
                   test_chroms=list(test_chroms), include=include, exclude=exclude,
                   records_per_shard=records_per_shard)

    created = _first_missing(os.path.dirname(out_dir))  # folders this run makes: removed again if it fails
    tmp_dir = sibling_tmp_folder(out_dir)
    split_of = {**{c: "valid" for c in valid_chroms}, **{c: "test" for c in test_chroms}}
    sink = _Sink(tmp_dir, records_per_shard, max_n, lambda c: _split(c, split_of, include_re, exclude_re))
    bar = _Progress(progress)
    sources = []
    try:
        for path in fasta_paths:
            sources.append(_read_fasta(path, sink, Windower(window, stride, keep_tail), bar))
        for path in csv_paths:
            sources.append(_read_csv(path, sink))
        bar.done(sink.bp_read, sink.num_records)
        for flag, names in (("valid_chroms", valid_chroms), ("test_chroms", test_chroms)):
            for chrom in names:
                if sink.chromosomes.get(chrom, {}).get("split", "excluded") == "excluded":
                    why = "excluded by --include/--exclude" if chrom in sink.chromosomes else "not in the input"
                    raise UserError(f"--{flag}: chromosome {chrom!r} is {why}")
        if not sink.num_records:
            raise UserError(f"no records: every window of {', '.join(fasta_paths + csv_paths)} was dropped or excluded")
        sink.close()
        manifest = dict(
            format_version=records.FORMAT_VERSION,
            record_layout="uint16 chrom_len | chrom utf-8 | uint64 start | ascii sequence (little-endian)",
            sources=sources,
            options=options,
            splits=sink.splits(),
            chromosomes=sink.chromosomes,
            seconds=round(bar.seconds(), 3),
        )
        with open(os.path.join(tmp_dir, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        replace_folder(tmp_dir, out_dir)
    except BaseException:
        bar.end_line()
        sink.close()
        shutil.rmtree(created or tmp_dir, ignore_errors=True)
        raise
    return manifest


def _first_missing(path: str) -> str | None:
    """The outermost folder of `path` that does not exist yet (None when it all exists)."""
    missing = None
    while not os.path.exists(path):
        missing, path = path, os.path.dirname(path)
    return missing


def _split(chrom: str, split_of: dict[str, str], include_re: re.Pattern, exclude_re: re.Pattern) -> str | None:
    """train, valid or test; None when --include/--exclude drop the chromosome."""
    if include_re.fullmatch(chrom) and not exclude_re.fullmatch(chrom):
        return split_of.get(chrom, "train")
    return None


class _Sink:
    """Routes windows to their split's shards, drops those with too many N, and keeps the manifest's counts."""

    def __init__(self, root: str, records_per_shard: int, max_n: int, split_of_chrom):
        self._writers = {s: records.ShardedWriter(root, s, records_per_shard) for s in SPLITS}
        self._stats = {s: _SplitStats() for s in SPLITS}
        self._max_n = max_n
        self._split_of_chrom = split_of_chrom
        self.chromosomes: dict[str, dict] = {}
        self.num_records = 0
        self.bp_read = 0

    def add_chromosome(self, chrom: str, path: str) -> str | None:
        """The chromosome's split (None = excluded); a name may appear once in all inputs."""
        if chrom in self.chromosomes:
            raise UserError(f"{path}: chromosome {chrom!r} appears twice in the input")
        if len(chrom.encode("utf-8")) > records.MAX_CHROM_BYTES:
            raise UserError(f"{path}: chromosome name {chrom[:40]!r}… is {len(chrom.encode('utf-8')):,} bytes long; "
                            f"names up to {records.MAX_CHROM_BYTES:,} bytes are supported")
        split = self._split_of_chrom(chrom)
        self.chromosomes[chrom] = dict(bp=0, split=split or "excluded", file=path)
        return split

    def add_bases(self, chrom: str, bp: int) -> None:
        self.chromosomes[chrom]["bp"] += bp
        self.bp_read += bp

    def write(self, split: str | None, chrom: str, start: int, bases: bytes | bytearray) -> None:
        if split is None:
            return
        n = bases.count(b"N") + bases.count(b"n")
        if n > self._max_n:
            self._stats[split].dropped_windows += 1
            return
        self._stats[split].add(chrom, bases, n)
        self._writers[split].write(records.encode_record(chrom, start, bases))
        self.num_records += 1

    def splits(self) -> dict:
        return {s: self._stats[s].to_json(self._writers[s].shards) for s in SPLITS}

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()


def _read_fasta(path: str, sink: _Sink, windower: Windower, bar: _Progress) -> dict:
    """Streams one FASTA file into the sink, chromosome by chromosome; returns its manifest source entry."""
    seen = fasta.SequenceStats()
    chrom, split = None, None
    for name, bases in itertools.chain(fasta.read_fasta(path, seen), [(None, b"")]):
        if bases:
            sink.add_bases(chrom, len(bases))
            for start, window_bases in windower.feed(bases):
                sink.write(split, chrom, start, window_bases)
            bar.update(sink.bp_read, sink.num_records)
            continue
        if chrom is not None:  # a header or the end of the file closes the previous chromosome
            for start, window_bases in windower.finish():
                sink.write(split, chrom, start, window_bases)
        if name is not None:
            chrom, split = name, sink.add_chromosome(name, path)
            windower.reset()
    return _source(path, "fasta", seen)


def _read_csv(path: str, sink: _Sink) -> dict:
    """Streams one CSV of bins into the sink, one record per row; returns its manifest source entry."""
    seen = fasta.SequenceStats()
    split_of = {}
    for chrom, start, bases in fasta.read_csv_bins(path, seen):
        if chrom not in split_of:
            split_of[chrom] = sink.add_chromosome(chrom, path)
        sink.add_bases(chrom, len(bases))
        sink.write(split_of[chrom], chrom, start, bases)
    return _source(path, "csv", seen)


def _source(path: str, kind: str, seen: fasta.SequenceStats) -> dict:
    return dict(path=os.path.abspath(path), kind=kind, size=os.path.getsize(path), sha256=seen.sha256.hexdigest(),
                iupac_bases=seen.iupac_bases)


def summary_table(manifest: dict) -> str:
    """Per-split records, bp, lowercase and N fractions, chromosomes and shards, as aligned text."""
    rows = [("split", "records", "Mbp", "lowercase", "N", "chroms", "shards", "dropped")]
    for name, split in manifest["splits"].items():
        rows.append((name, f"{split['records']:,}", f"{split['bp'] / 1e6:,.2f}", f"{split['lowercase_fraction']:.1%}",
                     f"{split['n_fraction']:.2%}", str(len(split["chroms"])), str(len(split["shards"])),
                     f"{split['dropped_windows']:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    excluded = sorted(c for c, info in manifest["chromosomes"].items() if info["split"] == "excluded")
    iupac = sum(s["iupac_bases"] for s in manifest["sources"])
    lines.append(f"excluded chromosomes: {len(excluded)}; IUPAC codes mapped to N: {iupac:,}")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Flags exist only when this module is the program, so importing it never clashes with others."""
    flags.DEFINE_list("fasta", [], "Softmasked FASTA file(s), plain or gzip (detected by content).")
    flags.DEFINE_list("csv", [], "CSV file(s) of the original project: Chrom,Start,End,Sequence, one bin per row.")
    flags.DEFINE_string("out", None, "Output folder: <split>/*.array_record and manifest.json.")
    flags.DEFINE_integer("window", 8192, "Window length in bp.")
    flags.DEFINE_integer("stride", None, "Distance between window starts in bp (default: the window).")
    flags.DEFINE_integer("max_n", 100, "Drop windows with more N bases than this.")
    flags.DEFINE_bool("keep_tail", False, "Keep the last partial window of each chromosome (shorter; padded at load).")
    flags.DEFINE_list("valid_chroms", [], "Chromosomes of the valid split (comma list).")
    flags.DEFINE_list("test_chroms", [], "Chromosomes of the test split (comma list).")
    flags.DEFINE_string("include", DEFAULT_INCLUDE, "Keep chromosomes whose whole name matches this regex.")
    flags.DEFINE_string("exclude", DEFAULT_EXCLUDE, "Drop chromosomes whose whole name matches this regex.")
    flags.DEFINE_integer("records_per_shard", 8192, "Records per ArrayRecord shard.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out folder.")
    flags.DEFINE_bool("progress", True, "Show a progress bar on stderr.")


@exits_cleanly_on_user_error
def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.out:
        raise UserError("--out is required")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # unwinds, so the temp folder goes
    manifest = prepare(
        FLAGS.fasta, FLAGS.out, csv_paths=FLAGS.csv, window=FLAGS.window, stride=FLAGS.stride, max_n=FLAGS.max_n,
        keep_tail=FLAGS.keep_tail, valid_chroms=FLAGS.valid_chroms, test_chroms=FLAGS.test_chroms,
        include=FLAGS.include, exclude=FLAGS.exclude, records_per_shard=FLAGS.records_per_shard,
        overwrite=FLAGS.overwrite, progress=FLAGS.progress,
    )
    bp = sum(c["bp"] for c in manifest["chromosomes"].values())
    print(summary_table(manifest))
    print(f"read {bp / 1e6:,.1f} Mbp in {manifest['seconds']:.1f} s ({bp / 1e6 / max(manifest['seconds'], 1e-9):.1f} "
          f"Mbp/s); wrote {FLAGS.out}")


def run() -> None:
    _define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
