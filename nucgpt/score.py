"""Sequence likelihoods: `python -m nucgpt.score --checkpoint DIR --fasta seqs.fa --output scores.tsv`.

Scores every record of a FASTA file (plain or gzip, softmasked or not) with a pretrained
checkpoint's model: the log-likelihood of each token given the ones before it, summed over the
record, with the same rules as the training loss (the first token has no context and is not scored;
N bases, UNK k-mers and padding are never targets); a record without one target is refused. With
`kmer6_nonoverlap` the last `bases % 6` bases of a record are a short, UNK k-mer: a `note:` line says
how many records lose how many bases that way. Case is kept, so each record also gets its
bits per base on repeats (lowercase) and on unique sequence. Comparing two records' log-likelihoods
(a reference and an alternative allele in the same flanks) is the usual zero-shot variant score.

A record longer than the model's trained context (`train.seq_len` + 1 tokens) is scored in
overlapping windows (`--stride` tokens apart, default half the context): every target exactly once,
with at least `seq_len + 1 - stride` tokens of context. Windows are padded to a few power-of-two
lengths so compilation stays bounded. Batches are spread over all local devices (each scores its own
rows; the weights are replicated). Output: one TSV row per record, written atomically; progress on
stderr every ~10 s.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import os
import sys
import time
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from nucgpt import loss as lm_loss
from nucgpt import pretrained, sharding
from nucgpt.data.classification import assign_buckets, bucket_lengths
from nucgpt.data import fasta as fasta_io
from nucgpt.errors import UserError, exits_cleanly_on_user_error, parse_flags, start_main
from nucgpt.files import atomic_file, check_can_create, check_input_file
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
    check_input_file(path, "--fasta")
    return (Record(name, bases) for name, bases in fasta_io.read_records(path))


def tokenize(record: Record, tokenizer: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, repeat, valid) of one record. It needs a target to score: a token after the first that is
    not N/UNK/padding (the loss's rule, for every tokenizer), else its row would be all `nan`."""
    if not record.sequence:
        raise UserError(f"record {record.name!r}: no bases")
    ids, repeat, valid = tokenizer.encode(record.sequence)
    if not valid[1:].any():
        raise UserError(f"record {record.name!r}: {len(record.sequence)} bp is {len(ids)} token(s) of {tokenizer.name} "
                        "with none to score (a token after the first, not N, UNK or a short last k-mer); "
                        "scoring needs at least one")
    return ids, repeat, valid


def unscored_tail(num_bp: int, tokenizer: Tokenizer) -> int:
    """Bases at a record's end that no token scores: consecutive k-mers leave a short last k-mer, UNK."""
    return num_bp % tokenizer.k if tokenizer.k > 1 and not tokenizer.overlap else 0


def tail_note(records: list[Record], tokenizer: Tokenizer) -> str | None:
    """One line saying how many records end in bases the model never scores (so two records that differ
    only there score the same), or None when every record's bases are all in whole tokens."""
    tails = [(r.name, unscored_tail(len(r.sequence), tokenizer)) for r in records]
    tails = [(name, bp) for name, bp in tails if bp]
    if not tails:
        return None
    name, bp = tails[0]
    k = tokenizer.k
    return (f"{tokenizer.name} reads a short last {k}-mer as UNK, so the last `bases` % {k} bases of {len(tails)} of "
            f"{len(records)} record(s) ({sum(bp for _, bp in tails)} bp in all; first {name!r}, {bp} bp) are not scored: "
            "records that differ only there score the same")


@dataclasses.dataclass(frozen=True)
class Window:
    """A stretch of one record's tokens: inputs `ids[:-1]`, targets `ids[1:]`; `repeat` and `scored`
    are per target, `scored` only where the target is valid and no earlier window scored it."""

    record: int
    start: int  # the record's token index of ids[0]
    ids: np.ndarray
    repeat: np.ndarray
    scored: np.ndarray


def windows(record: int, ids: np.ndarray, repeat: np.ndarray, valid: np.ndarray, max_tokens: int, stride: int) -> list[Window]:
    """The record whole when it fits `max_tokens` (the trained context + 1); else windows of
    `max_tokens` starting every `stride` tokens, the last ending at the record's end. Each target is
    scored once, in the first window that holds it, after at least `max_tokens - stride` tokens of
    context (fewer only at the record's start)."""
    if len(ids) <= max_tokens:
        return [Window(record, 0, ids, repeat[1:], valid[1:])]
    starts = list(range(0, len(ids) - max_tokens, stride)) + [len(ids) - max_tokens]
    out, scored_until = [], 0  # targets up to this token index are scored (index 0 never is a target)
    for start in starts:
        end = start + max_tokens
        new_T = np.arange(start + 1, end) > scored_until
        out.append(Window(record, start, ids[start:end], repeat[start + 1 : end], valid[start + 1 : end] & new_T))
        scored_until = end - 1
    return out


@functools.partial(jax.jit, static_argnames="graphdef")
def _row_sums(graphdef: nnx.GraphDef, params, inputs_BxL, targets_BxL, valid_BxL, repeat_BxL):
    """Per row: Σ log p of the valid targets, over all / repeat / unique ones, and their counts; and
    each target's log p (float32)."""
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
        "log_p": log_p_BxL,
    }


def score_batch(graphdef, params, batch: list[Window], length: int, rows: int,
                rows_sharding: jax.sharding.Sharding) -> dict[str, np.ndarray]:
    """Sums (and `log_p` per target) for up to `rows` windows padded to `length` inputs (missing rows
    are all padding), the rows placed by `rows_sharding`."""
    inputs, targets = np.full((rows, length), PAD_ID, np.int32), np.full((rows, length), PAD_ID, np.int32)
    scored, repeat = np.zeros((rows, length), bool), np.zeros((rows, length), bool)
    for row, window in enumerate(batch):
        n = len(window.ids) - 1
        inputs[row, :n], targets[row, :n] = window.ids[:-1], window.ids[1:]
        scored[row, :n], repeat[row, :n] = window.scored, window.repeat
    arrays = jax.device_put((inputs, targets, scored, repeat), rows_sharding)
    sums = jax.device_get(_row_sums(graphdef, params, *arrays))
    return {k: v[: len(batch)] for k, v in sums.items()}


def _bits_per_base(log_likelihood: float, tokens: float, bp_per_token: int) -> float:
    return -log_likelihood / tokens / LN2 / bp_per_token if tokens else float("nan")


def score_records(records: list[Record], tokenized: list, graphdef, params, seq_len: int, bp_per_token: int,
                  batch_size: int, stride: int | None = None, progress_every_s: float = 10.0, *,
                  rules: sharding.Rules, devices: Sequence[jax.Device] | None = None) -> list[dict]:
    """One row of COLUMNS per record (`tokenized`: their `tokenize` results), in input order, plus
    `target_log_p`: each target token's log p (tokens 1.., NaN where not scored).

    Records longer than the context are cut into `windows` (`stride` tokens apart, default half the
    context). Windows go to the smallest padded length that holds them and are batched within it,
    so a short record never pays for a long one. Each batch is split over `devices` (default: all
    local ones; `batch_size` rounds up to a multiple of their count) under the model's logical-axis
    `rules`, with the weights replicated.
    """
    stride = stride or max(seq_len // 2, 1)
    pieces = [w for i, (ids, repeat, valid) in enumerate(tokenized) for w in windows(i, ids, repeat, valid, seq_len + 1, stride)]
    lengths = bucket_lengths(seq_len)
    bucket_W = assign_buckets(np.asarray([len(w.ids) - 1 for w in pieces]), lengths)
    totals = collections.defaultdict(lambda: np.zeros(len(records)))
    target_log_p = [np.full(len(ids) - 1, np.nan) for ids, _, _ in tokenized]
    mesh = sharding.data_parallel_mesh(list(devices or jax.local_devices()))
    batch_size = -(-batch_size // mesh.size) * mesh.size
    done, start, last_report = 0, time.perf_counter(), time.perf_counter()
    with sharding.use_mesh(mesh, rules):
        params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
        for bucket in np.unique(bucket_W):
            members = np.flatnonzero(bucket_W == bucket)
            for first in range(0, len(members), batch_size):
                batch = [pieces[i] for i in members[first : first + batch_size]]
                sums = score_batch(graphdef, params, batch, lengths[bucket], batch_size,
                                   NamedSharding(mesh, PartitionSpec("data")))
                for row, w in enumerate(batch):
                    where = w.start + np.flatnonzero(w.scored)  # index into the record's targets (token index - 1)
                    target_log_p[w.record][where] = sums["log_p"][row][np.flatnonzero(w.scored)]
                for key in sums.keys() - {"log_p"}:
                    np.add.at(totals[key], [w.record for w in batch], sums[key])
                done += len(batch)
                if time.perf_counter() - last_report > progress_every_s:
                    last_report = time.perf_counter()
                    print(f"scored {done}/{len(pieces)} windows ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    rows = []
    for i, record in enumerate(records):
        t = {k: float(v[i]) for k, v in totals.items()}
        rows.append({
            "name": record.name, "bases": len(record.sequence), "scored_tokens": int(t["scored_tokens"]),
            "log_likelihood": t["log_likelihood"],
            "bits_per_base": _bits_per_base(t["log_likelihood"], t["scored_tokens"], bp_per_token),
            "repeat_tokens": int(t["repeat_tokens"]),
            "bits_per_base_repeat": _bits_per_base(t["log_likelihood_repeat"], t["repeat_tokens"], bp_per_token),
            "unique_tokens": int(t["unique_tokens"]),
            "bits_per_base_unique": _bits_per_base(t["log_likelihood_unique"], t["unique_tokens"], bp_per_token),
            "target_log_p": target_log_p[i],
        })
    return rows


def write_tsv(path: str, rows: list[dict]) -> None:
    """COLUMNS as a header, then one line per record (floats to 6 decimals)."""
    fmt = lambda v: f"{v:.6f}" if isinstance(v, float) else str(v)
    with atomic_file(path) as f:
        f.write("\t".join(COLUMNS) + "\n")
        f.writelines("\t".join(fmt(row[c]) for c in COLUMNS) + "\n" for row in rows)


def write_per_token(path: str, records: list[Record], rows: list[dict], tokenizer: Tokenizer) -> None:
    """One line per scored target: record name, 0-based position of the token's first base, the
    token's bases as in the record (case kept), its log p (natural log)."""
    bp_step = tokenizer.k if tokenizer.k > 1 and not tokenizer.overlap else 1
    with atomic_file(path) as f:
        f.write("name\tposition\tbases\tlog_p\n")
        for record, row in zip(records, rows):
            for target in np.flatnonzero(~np.isnan(row["target_log_p"])):
                position = (target + 1) * bp_step
                bases = record.sequence[position : position + tokenizer.k].decode("ascii")
                f.write(f"{record.name}\t{position}\t{bases}\t{row['target_log_p'][target]:.6f}\n")


def score_fasta(checkpoint: str, fasta: str, output: str, batch_size: int = 8, stride: int = 0, per_token: str = "") -> list[dict]:
    """Scores every record of `fasta` with the checkpoint's model and writes the TSV `output` (and
    each target's log p to `per_token`, when given); every input is checked before the model loads,
    and nothing is written unless all went well."""
    if batch_size < 1:
        raise UserError(f"--batch_size must be a positive integer, got {batch_size}")
    if stride < 0:
        raise UserError(f"--stride must be 0 (half the context) or positive, got {stride}")
    check_can_create(output, "--output", folder=False)
    if per_token:
        check_can_create(per_token, "--per_token", folder=False)
        if os.path.abspath(per_token) == os.path.abspath(output):
            raise UserError(f"--per_token {per_token} is also --output; give two files")
    step_dir, config = pretrained.pretraining_checkpoint(checkpoint, "--checkpoint", "scoring")
    tokenizer = get_tokenizer(config.data.tokenizer, pad_multiple=1)
    records = list(read_records(fasta))
    if not records:
        raise UserError(f"--fasta {fasta}: no records")
    if stride > config.train.seq_len:
        raise UserError(f"--stride {stride}: at most the context, train.seq_len = {config.train.seq_len} tokens")
    try:
        tokenized = [tokenize(r, tokenizer) for r in records]  # all checked before the model loads
    except UserError as e:
        raise UserError(f"--fasta {fasta}: {e}") from None
    note = tail_note(records, tokenizer)
    if note:
        print(f"note: --fasta {fasta}: {note}", flush=True)
    graphdef, state = nnx.split(pretrained.load_for_inference(step_dir, config))
    start = time.perf_counter()
    rows = score_records(records, tokenized, graphdef, nnx.to_pure_dict(state), config.train.seq_len,
                         bases_per_token(config), batch_size, stride, rules=config.mesh.logical_axis_rules)
    seconds = time.perf_counter() - start
    if per_token:
        write_per_token(per_token, records, rows, tokenizer)
    write_tsv(output, rows)
    total_bp = sum(len(r.sequence) for r in records)
    print(f"scored {len(records)} record(s), {total_bp} bp, in {seconds:.1f} s on {jax.local_device_count()} device(s) "
          f"(compilation included) → {output}", flush=True)
    return rows


def _define_flags() -> None:
    """Flags exist only when this module is the program, so importing it never clashes with others."""
    flags.DEFINE_string("checkpoint", None, "A pretraining workdir (its latest checkpoint) or a step folder.")
    flags.DEFINE_string("fasta", None, "The records to score (FASTA, plain or gzip; case kept).")
    flags.DEFINE_string("output", None, "The TSV file to write (replaced atomically).")
    flags.DEFINE_integer("batch_size", 8, "Windows per forward pass, over all local devices (rounded up to a multiple of their count).")
    flags.DEFINE_string("per_token", "", "Also write each scored token's log p here (TSV: name, position, bases, log_p).")
    flags.DEFINE_integer("stride", 0, "Tokens between the windows of a record longer than the context (0: half the context).")


@exits_cleanly_on_user_error
def main(argv) -> None:
    start_main(argv)
    for name in ("checkpoint", "fasta", "output"):
        if not flags.FLAGS[name].value:
            raise UserError(f"--{name} is required")
    score_fasta(flags.FLAGS.checkpoint, flags.FLAGS.fasta, flags.FLAGS.output, flags.FLAGS.batch_size, flags.FLAGS.stride,
                flags.FLAGS.per_token)


def run() -> None:
    _define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
