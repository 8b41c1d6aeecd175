"""Throughput of the Grain LM pipeline in one process: tokens/s of per-process numpy batches, one JSON line.

    python -m benchmarks.data_loader                        # nucleotide, 8,192-token records, 3 runs
    python -m benchmarks.data_loader --tokenizer kmer6_overlap --num_workers 2

Reads a prepared dataset (default: one made once from a 40 Mbp synthetic genome with 8,192 bp
windows, in the temp folder, not timed), builds `make_lm_iterator` exactly as training does
(shuffle, repeat, tokenize, batch), skips --warmup batches, then times --batches batches.
tokens/s counts every position of every row (global batch × seq_len per batch).
"""

import json
import os
import statistics
import tempfile
import time
from typing import Sequence

from absl import app, flags

from configs.pretrain import get_config
from nucgpt.data import pipeline, synthetic
from nucgpt.data.prepare import prepare
from nucgpt.errors import parse_flags

flags.DEFINE_string("data", "", "a prepared dataset (default: a generated one in the temp folder)")
flags.DEFINE_integer("bp", 40_000_000, "size of the generated genome", lower_bound=1)
flags.DEFINE_string("tokenizer", "nucleotide", "nucleotide | kmer6_overlap | kmer6_nonoverlap")
flags.DEFINE_integer("seq_len", 8192, "tokens per row", lower_bound=1)
flags.DEFINE_integer("batch", 16, "global batch size (one process)", lower_bound=1)
flags.DEFINE_integer("batches", 200, "timed batches per run", lower_bound=1)
flags.DEFINE_integer("warmup", 5, "untimed batches per run", lower_bound=0)
flags.DEFINE_integer("runs", 3, "timed runs; the median is reported", lower_bound=1)
flags.DEFINE_integer("num_workers", 0, "Grain worker processes", lower_bound=0)
flags.DEFINE_integer("prefetch", 2, "Grain prefetch buffer", lower_bound=0)
flags.DEFINE_float("reverse_complement_prob", 0.5, "augmentation probability", lower_bound=0.0, upper_bound=1.0)
FLAGS = flags.FLAGS


def _dataset() -> str:
    if FLAGS.data:
        return FLAGS.data
    root = os.path.join(tempfile.gettempdir(), f"nucgpt_bench_loader_{FLAGS.bp}")
    if not os.path.exists(os.path.join(root, "ds", "manifest.json")):
        os.makedirs(root, exist_ok=True)
        synthetic.write_genome(os.path.join(root, "g.fa.gz"), bp=FLAGS.bp, seed=0, num_chroms=4, overwrite=True)
        prepare([os.path.join(root, "g.fa.gz")], os.path.join(root, "ds"), window=8192, overwrite=True, progress=False)
    return os.path.join(root, "ds")


def _tokens_per_second(data_cfg, seed: int) -> float:
    iterator = pipeline.make_lm_iterator(data_cfg, split="train", seq_len=FLAGS.seq_len, global_batch_size=FLAGS.batch,
                                         seed=seed, train=True, process_index=0, process_count=1)
    for _ in range(FLAGS.warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
        next(iterator)
    seconds = time.perf_counter() - start
    iterator.close()
    return FLAGS.batches * FLAGS.batch * FLAGS.seq_len / seconds


def main(argv: Sequence[str]) -> None:
    del argv
    data_cfg = get_config("nucleotide_gpt_500m").data
    data_cfg.update(path=_dataset(), tokenizer=FLAGS.tokenizer, num_workers=FLAGS.num_workers,
                    prefetch=FLAGS.prefetch, reverse_complement_prob=FLAGS.reverse_complement_prob)
    rates = [_tokens_per_second(data_cfg, seed) for seed in range(FLAGS.runs)]
    print(json.dumps(dict(
        benchmark="data_loader", tokenizer=FLAGS.tokenizer, seq_len=FLAGS.seq_len, batch=FLAGS.batch,
        num_workers=FLAGS.num_workers, tokens_per_s=round(statistics.median(rates)),
        tokens_per_s_runs=[round(r) for r in rates], cpus=os.cpu_count(), load_average_1min=os.getloadavg()[0],
    )))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
