"""Look inside a prepared dataset: `python -m nucgpt.data.inspect DIR [--dump N --split S]`.

Without --dump: the manifest summary (sources, options, per-split table). With --dump N: the first N
records of a split, one per line as `chrom<TAB>start<TAB>sequence` (sequence as stored, case kept);
tools outside the package rely on exactly this format.
"""

from __future__ import annotations

import os
import sys
from typing import Iterator, Sequence

from absl import app, flags
from array_record.python.array_record_module import ArrayRecordReader

from nucgpt.data import records
from nucgpt.data.prepare import summary_table
from nucgpt.errors import UserError, exits_cleanly_on_user_error, parse_flags


def iter_records(path: str | os.PathLike, split: str) -> Iterator[tuple[str, int, bytes]]:
    """(chrom, start, sequence) of a split's records in stored order."""
    manifest = records.read_manifest(path)
    if split not in manifest["splits"]:
        raise UserError(f"{path}: no split {split!r} (splits: {', '.join(manifest['splits'])})")
    for shard in manifest["splits"][split]["shards"]:
        reader = ArrayRecordReader(os.path.join(os.fspath(path), shard))
        try:
            for index in range(reader.num_records()):
                yield records.decode_record(reader.read([index])[0])
        finally:
            reader.close()


def describe(manifest: dict) -> str:
    lines = [f"format_version {manifest['format_version']}"]
    for source in manifest["sources"]:
        lines.append(f"source {source['path']}  {source['size']:,} bytes  sha256 {source['sha256'][:16]}…")
    lines.append("options " + " ".join(f"{k}={v}" for k, v in manifest["options"].items()))
    lines.append(summary_table(manifest))
    return "\n".join(lines)


FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Flags exist only when this module is the program, so importing it never clashes with others."""
    flags.DEFINE_integer("dump", 0, "Print the first N records of --split as chrom<TAB>start<TAB>sequence.")
    flags.DEFINE_string("split", "train", "The split to dump.")


@exits_cleanly_on_user_error
def main(argv: Sequence[str]) -> None:
    if len(argv) != 2:
        raise UserError("usage: python -m nucgpt.data.inspect DIR [--dump N --split S]")
    path = argv[1]
    if FLAGS.dump < 0:
        raise UserError(f"--dump must be 0 (describe the dataset) or a number of records, got {FLAGS.dump}")
    if FLAGS.dump == 0:
        print(describe(records.read_manifest(path)))
        return
    for count, (chrom, start, sequence) in enumerate(iter_records(path, FLAGS.split)):
        if count == FLAGS.dump:
            break
        sys.stdout.write(f"{chrom}\t{start}\t{sequence.decode('ascii')}\n")


def run() -> None:
    _define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
