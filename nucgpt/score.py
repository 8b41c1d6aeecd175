"""Sequence likelihoods: `python -m nucgpt.score --checkpoint DIR --fasta seqs.fa --output scores.tsv`.

Scores every record of a FASTA file (plain or gzip, softmasked or not) with a pretrained
checkpoint's model: the log-likelihood of each token given the ones before it, summed over the
record, with the same rules as the training loss (the first token has no context and is not scored;
N bases, UNK k-mers and padding are never targets). Case is kept, so each record also gets its
bits per base on repeats (lowercase) and on unique sequence. Comparing two records' log-likelihoods
(a reference and an alternative allele in the same flanks) is the usual zero-shot variant score.

A record must fit the model's trained context (`train.seq_len` + 1 tokens); batches are padded to
a few power-of-two lengths so compilation stays bounded. Output: one TSV row per record, written
atomically; progress on stderr every ~10 s.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
import time
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from nucgpt import loss as lm_loss
from nucgpt import pretrained
from nucgpt.data.classification import assign_buckets, bucket_lengths
from nucgpt.data.fasta import SequenceStats, read_fasta
from nucgpt.errors import UserError, check_can_create, exits_cleanly_on_user_error, parse_flags, start_main
from nucgpt.tasks.pretrain import bases_per_token
from nucgpt.tokenizers import PAD_ID, Tokenizer, get_tokenizer

COLUMNS = (
    "name", "bases", "scored_tokens", "log_likelihood", "bits_per_base",
    "repeat_tokens", "bits_per_base_repeat", "unique_tokens", "bits_per_base_unique",
)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Record:
    name: str
    sequence: bytes


def read_records(path: str) -> Iterator[Record]:
    """Each FASTA record, whole, in file order (IUPAC codes read as N)."""
    if not os.path.isfile(path):
        raise UserError(f"--fasta {path}: no such file")
    name, pieces = None, []
    for chrom, bases in read_fasta(path, SequenceStats()):
        if bases:
            pieces.append(bases)
            continue
        if name is not None:
            yield Record(name, b"".join(pieces))
        name, pieces = chrom, []
    if name is not None:
        yield Record(name, b"".join(pieces))


def tokenize(record: Record, tokenizer: Tokenizer, max_tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, repeat, valid) of one record, checked against the model's context of `max_tokens`."""
    if not record.sequence:
        raise UserError(f"record {record.name!r}: no bases")
    ids, repeat, valid = tokenizer.encode(record.sequence)
    if len(ids) < 2:
        raise UserError(f"record {record.name!r}: {len(record.sequence)} bp is one token; scoring needs two (one to predict)")
    if len(ids) > max_tokens:
        raise UserError(
            f"record {record.name!r}: {len(record.sequence)} bp is {len(ids)} tokens, more than the model's trained context "
            f"of {max_tokens} (train.seq_len + 1); split it into windows"
        )
    return ids, repeat, valid


@functools.partial(jax.jit, static_argnames="graphdef")
def _row_sums(graphdef: nnx.GraphDef, params, inputs_BxL, targets_BxL, valid_BxL, repeat_BxL):
    """Per row: Σ log p of the valid targets, over all / repeat / unique ones, and their counts (float32)."""
    logits_BxLxV = nnx.merge(graphdef, params)(inputs_BxL)
    log_p_BxL = -lm_loss.cross_entropy(logits_BxLxV, targets_BxL)
    valid_BxL = valid_BxL.astype(jnp.float32)
    repeat_BxL = valid_BxL * repeat_BxL.astype(jnp.float32)
    unique_BxL = valid_BxL - repeat_BxL
    sums = lambda w_BxL: jnp.sum(w_BxL * log_p_BxL, axis=1)
    counts = lambda w_BxL: jnp.sum(w_BxL, axis=1)
    return {
        "log_likelihood": sums(valid_BxL), "scored_tokens": counts(valid_BxL),
        "log_likelihood_repeat": sums(repeat_BxL), "repeat_tokens": counts(repeat_BxL),
        "log_likelihood_unique": sums(unique_BxL), "unique_tokens": counts(unique_BxL),
    }


def score_batch(graphdef, params, tokenized: list[tuple[np.ndarray, np.ndarray, np.ndarray]], length: int, rows: int) -> dict[str, np.ndarray]:
    """Sums for up to `rows` tokenized records padded to `length` inputs (missing rows are all padding)."""
    inputs, targets = np.full((rows, length), PAD_ID, np.int32), np.full((rows, length), PAD_ID, np.int32)
    valid, repeat = np.zeros((rows, length), bool), np.zeros((rows, length), bool)
    for row, (ids, repeat_T, valid_T) in enumerate(tokenized):
        n = len(ids) - 1
        inputs[row, :n], targets[row, :n] = ids[:-1], ids[1:]
        valid[row, :n], repeat[row, :n] = valid_T[1:], repeat_T[1:]
    sums = jax.device_get(_row_sums(graphdef, params, inputs, targets, valid, repeat))
    return {k: v[: len(tokenized)] for k, v in sums.items()}


def _bits_per_base(log_likelihood: float, tokens: float, bp_per_token: int) -> float:
    return -log_likelihood / tokens / LN2 / bp_per_token if tokens else float("nan")


def score_records(records: list[Record], tokenized: list, graphdef, params, seq_len: int, bp_per_token: int,
                  batch_size: int, progress_every_s: float = 10.0) -> list[dict]:
    """One row of COLUMNS per record (`tokenized`: their `tokenize` results), in input order. Records
    go to the smallest padded length that holds them and are batched within it, so a short record
    never pays for a long one."""
    lengths = bucket_lengths(seq_len)
    bucket_N = assign_buckets(np.asarray([len(t[0]) - 1 for t in tokenized]), lengths)
    results: list[dict | None] = [None] * len(records)
    done, start, last_report = 0, time.perf_counter(), time.perf_counter()
    for bucket in np.unique(bucket_N):
        members = np.flatnonzero(bucket_N == bucket)
        for first in range(0, len(members), batch_size):
            chunk = members[first : first + batch_size]
            sums = score_batch(graphdef, params, [tokenized[i] for i in chunk], lengths[bucket], batch_size)
            for j, i in enumerate(chunk):
                s = {k: float(v[j]) for k, v in sums.items()}
                results[i] = {
                    "name": records[i].name, "bases": len(records[i].sequence), "scored_tokens": int(s["scored_tokens"]),
                    "log_likelihood": s["log_likelihood"],
                    "bits_per_base": _bits_per_base(s["log_likelihood"], s["scored_tokens"], bp_per_token),
                    "repeat_tokens": int(s["repeat_tokens"]),
                    "bits_per_base_repeat": _bits_per_base(s["log_likelihood_repeat"], s["repeat_tokens"], bp_per_token),
                    "unique_tokens": int(s["unique_tokens"]),
                    "bits_per_base_unique": _bits_per_base(s["log_likelihood_unique"], s["unique_tokens"], bp_per_token),
                }
            done += len(chunk)
            if time.perf_counter() - last_report > progress_every_s:
                last_report = time.perf_counter()
                print(f"scored {done}/{len(records)} records ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    return results


def write_tsv(path: str, rows: list[dict]) -> None:
    """COLUMNS as a header, then one line per row (floats to 6 decimals), written beside `path` and renamed."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fmt = lambda v: f"{v:.6f}" if isinstance(v, float) else str(v)
    try:
        with open(tmp, "x") as f:
            f.write("\t".join(COLUMNS) + "\n")
            f.writelines("\t".join(fmt(row[c]) for c in COLUMNS) + "\n" for row in rows)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def score_fasta(checkpoint: str, fasta: str, output: str, batch_size: int = 8) -> list[dict]:
    """Scores every record of `fasta` with the checkpoint's model and writes the TSV `output`;
    every input is checked before the model loads, and nothing is written unless all went well."""
    if batch_size < 1:
        raise UserError(f"--batch_size must be a positive integer, got {batch_size}")
    check_can_create(output, "--output", folder=False)
    step_dir, config = pretrained.pretraining_checkpoint(checkpoint, "--checkpoint", "scoring")
    tokenizer = get_tokenizer(config.data.tokenizer, pad_multiple=1)
    records = list(read_records(fasta))
    if not records:
        raise UserError(f"--fasta {fasta}: no records")
    tokenized = [tokenize(r, tokenizer, config.train.seq_len + 1) for r in records]
    graphdef, state = nnx.split(pretrained.load_for_inference(step_dir, config))
    start = time.perf_counter()
    rows = score_records(records, tokenized, graphdef, nnx.to_pure_dict(state), config.train.seq_len,
                         bases_per_token(config), batch_size)
    seconds = time.perf_counter() - start
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    write_tsv(output, rows)
    total_bp = sum(len(r.sequence) for r in records)
    print(f"scored {len(records)} record(s), {total_bp} bp, in {seconds:.1f} s (compilation included) → {output}", flush=True)
    return rows


def _define_flags() -> None:
    """Flags exist only when this module is the program, so importing it never clashes with others."""
    flags.DEFINE_string("checkpoint", None, "A pretraining workdir (its latest checkpoint) or a step folder.")
    flags.DEFINE_string("fasta", None, "The records to score (FASTA, plain or gzip; case kept).")
    flags.DEFINE_string("output", None, "The TSV file to write (replaced atomically).")
    flags.DEFINE_integer("batch_size", 8, "Records per forward pass.")


@exits_cleanly_on_user_error
def main(argv) -> None:
    start_main(argv)
    for name in ("checkpoint", "fasta", "output"):
        if not flags.FLAGS[name].value:
            raise UserError(f"--{name} is required")
    score_fasta(flags.FLAGS.checkpoint, flags.FLAGS.fasta, flags.FLAGS.output, flags.FLAGS.batch_size)


def run() -> None:
    _define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
