"""A deterministic synthetic softmasked genome: the demo's default data and the tests' fixture.

Shaped like a RepeatMasked assembly, so every code path (case, N filtering, splits) sees what
hg38 gives it, and so that repeats are *learnable*: a model predicts repeat bases better than
unique ones, as on real genomes.
- background: uppercase bases, GC content varying by 20 kb isochore between 35% and 55%;
- interspersed repeat families (SINE-, LINE-, LTR-, DNA-transposon-like consensus sequences),
  inserted as lowercase copies, 5'-truncated fragments for the long ones, either strand, each family
  mutated at its own divergence;
- lowercase tandem repeats: microsatellites (1-6 bp units), minisatellites and a 171 bp
  alpha-satellite-like unit, with few mutations;
- N gaps: a telomere-like run at each chromosome start and a few internal gaps;
- several chromosomes `chr1..chrK` of decreasing size, 60-column lines.

    python -m nucgpt.data.synthetic --out genome.fa.gz --bp 3000000 --seed 0
"""

from __future__ import annotations

import gzip
import os
from typing import Sequence

import numpy as np
from absl import app, flags

from nucgpt.errors import UserError, exits_cleanly_on_user_error, parse_flags
from nucgpt.files import atomic_file, check_can_create

LINE_WIDTH = 60
_BLOCK_BP = LINE_WIDTH * 16384  # generated at once; a multiple of the line width so lines never split
_ASCII_UPPER = np.frombuffer(b"ACGT", np.uint8)
_COMPLEMENT_CODE = np.array([3, 2, 1, 0], np.uint8)  # A<->T, C<->G on codes 0..3
_REPEAT_DENSITY = 0.6  # expected interspersed-repeat bases placed per base (overlaps make ~45% lowercase)
# (consensus length, copy divergence, relative number of insertions, GC): Alu-, MIR-, L1-, ERV-, DNA-like...
_FAMILIES = (
    (300, 0.08, 10.0, 0.55),
    (260, 0.20, 4.0, 0.45),
    (6000, 0.10, 3.0, 0.38),
    (3500, 0.14, 1.0, 0.42),
    (1400, 0.18, 1.5, 0.40),
    (800, 0.12, 1.5, 0.44),
)
_TANDEM_FRACTION = 0.04
_TANDEM_UNITS = (1, 2, 3, 4, 5, 6, 12, 24, 48, 171)


def _draw_bases(rng: np.random.Generator, gc_N: np.ndarray) -> np.ndarray:
    """Codes 0..3 (A,C,G,T) with per-position GC probability."""
    u_N = rng.random(len(gc_N))
    at_N = 1.0 - gc_N
    return np.where(u_N < at_N / 2, 0, np.where(u_N < at_N, 3, np.where(u_N < at_N + gc_N / 2, 1, 2))).astype(np.uint8)


def _families(rng: np.random.Generator) -> list[tuple[np.ndarray, float]]:
    return [(_draw_bases(rng, np.full(length, gc)), divergence) for length, divergence, _, gc in _FAMILIES]


def _block(rng: np.random.Generator, size: int, families, at_chrom_start: bool) -> bytes:
    """`size` bases of softmasked ascii text."""
    isochores = -(-size // 20_000)
    gc_N = np.repeat(rng.uniform(0.35, 0.55, isochores), 20_000)[:size]
    code_N = _draw_bases(rng, gc_N)
    lower_N = np.zeros(size, bool)
    divergence_N = np.zeros(size, np.float32)

    weights = np.array([f[2] for f in _FAMILIES])
    mean_len = float(np.dot(weights, [min(f[0], 1000) for f in _FAMILIES]) / weights.sum())
    num_inserts = rng.poisson(size * _REPEAT_DENSITY / mean_len)
    for family in rng.choice(len(families), num_inserts, p=weights / weights.sum()):
        consensus, divergence = families[family]
        length = len(consensus) if len(consensus) <= 400 else int(rng.integers(150, min(len(consensus), 2000)))
        copy = consensus[len(consensus) - length :]  # long elements keep their 3' end (5'-truncated)
        if rng.random() < 0.5:
            copy = _COMPLEMENT_CODE[copy[::-1]]
        at = int(rng.integers(0, max(size - length, 1)))
        copy = copy[: size - at]
        code_N[at : at + len(copy)] = copy
        lower_N[at : at + len(copy)] = True
        divergence_N[at : at + len(copy)] = divergence

    num_tandems = rng.poisson(size * _TANDEM_FRACTION / 400)
    for _ in range(num_tandems):
        unit = _draw_bases(rng, np.full(int(rng.choice(_TANDEM_UNITS)), rng.uniform(0.2, 0.7)))
        length = int(rng.integers(30, 1200))
        at = int(rng.integers(0, max(size - length, 1)))
        run = np.resize(unit, min(length, size - at))
        code_N[at : at + len(run)] = run
        lower_N[at : at + len(run)] = True
        divergence_N[at : at + len(run)] = 0.02

    mutate_N = rng.random(size) < divergence_N
    code_N[mutate_N] = rng.integers(0, 4, int(mutate_N.sum()), dtype=np.uint8)
    text_N = _ASCII_UPPER[code_N] + lower_N.astype(np.uint8) * 32

    gaps = [(0, min(10_000, size // 50))] if at_chrom_start else []
    for _ in range(rng.poisson(0.5)):
        length = int(rng.integers(100, max(size // 50, 101)))
        gaps.append((int(rng.integers(0, max(size - length, 1))), length))
    for at, length in gaps:
        text_N[at : at + length] = ord("N")
    return text_N.tobytes()


def chromosome_sizes(bp: int, num_chroms: int) -> list[int]:
    """Decreasing sizes (like real karyotypes) that sum to bp."""
    weights = 1.0 / (1.0 + 0.3 * np.arange(num_chroms))
    sizes = np.maximum(np.floor(bp * weights / weights.sum()).astype(int), 1)  # no empty chromosome
    sizes[0] += bp - sizes.sum()
    return sizes.tolist()


def write_genome(path: str | os.PathLike, *, bp: int, seed: int, num_chroms: int = 4, overwrite: bool = False) -> None:
    """Writes the genome as FASTA, gzip-compressed when `path` ends in .gz; same arguments, same bytes.
    Written beside `path` and renamed over it, so an interrupted run leaves no partial genome; an
    existing file is replaced only with `overwrite` (it may be a real genome)."""
    if bp < num_chroms or num_chroms <= 0:
        raise UserError(f"synthetic genome: need bp >= num_chroms > 0, got bp={bp}, num_chroms={num_chroms}")
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise UserError(f"--out {path} already exists; choose a new file or pass --overwrite")
    check_can_create(path, "--out", folder=False)
    rng = np.random.default_rng(seed)
    families = _families(rng)
    with atomic_file(path, "wb") as raw:
        # No file name and no time in the gzip header: the same arguments give the same bytes.
        out = gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=6, mtime=0) if path.endswith(".gz") else raw
        for index, size in enumerate(chromosome_sizes(bp, num_chroms)):
            out.write(f">chr{index + 1} synthetic softmasked chromosome\n".encode())
            for start in range(0, size, _BLOCK_BP):
                text = _block(rng, min(_BLOCK_BP, size - start), families, at_chrom_start=start == 0)
                out.write(_wrap_lines(text))
        if out is not raw:
            out.close()


def _wrap_lines(text: bytes) -> bytes:
    full = len(text) // LINE_WIDTH * LINE_WIDTH
    lines_LxW = np.frombuffer(text, np.uint8, count=full).reshape(-1, LINE_WIDTH)
    newline_Lx1 = np.full((len(lines_LxW), 1), ord("\n"), np.uint8)
    wrapped = np.concatenate([lines_LxW, newline_Lx1], axis=1).tobytes()
    return wrapped + (text[full:] + b"\n" if full < len(text) else b"")


FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Flags exist only when this module is the program, so importing it never clashes with others."""
    flags.DEFINE_string("out", None, "Output FASTA path (.fa or .fa.gz).")
    flags.DEFINE_integer("bp", 3_000_000, "Genome size in bp.")
    flags.DEFINE_integer("seed", 0, "Random seed.")
    flags.DEFINE_integer("num_chroms", 4, "Number of chromosomes.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out file.")


@exits_cleanly_on_user_error
def main(argv: Sequence[str]) -> None:
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not FLAGS.out:
        raise UserError("--out is required")
    write_genome(FLAGS.out, bp=FLAGS.bp, seed=FLAGS.seed, num_chroms=FLAGS.num_chroms, overwrite=FLAGS.overwrite)


def run() -> None:
    _define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
