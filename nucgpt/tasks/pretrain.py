"""Pretraining: next-token prediction on a prepared genome with the repeat-weighted loss."""

import os
import time
from typing import Mapping

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from nucgpt import loss as lm_loss
from nucgpt.errors import UserError
from nucgpt.tasks import Task
from nucgpt.tokenizers import get_tokenizer

LM_FIELDS = {
    "inputs": np.int32,
    "targets": np.int32,
    "target_repeat": np.bool_,
    "target_valid": np.bool_,
    "segment_ids": np.int32,
}
SYNTHETIC_HOLDOUT = {"valid_chroms": ("chr4",)}  # the smallest of the generated chr1..chr4


def bases_per_token(config: ConfigDict) -> int:
    """Bases one token advances: 1 for nucleotides and overlapping k-mers, k for consecutive k-mers."""
    tokenizer = get_tokenizer(config.data.tokenizer, pad_multiple=config.data.kmer_pad_multiple)
    return 1 if tokenizer.overlap or tokenizer.k == 1 else tokenizer.k


class PretrainTask(Task):
    def resolve_config(self, config: ConfigDict, workdir: str) -> ConfigDict:
        """An empty data.path with synthetic_bp > 0 means the generated genome in the workdir; a
        given path never has a genome generated into it (it must hold a prepared dataset)."""
        with config.unlocked():
            if config.data.path:
                config.data.synthetic_bp = 0
            elif config.data.synthetic_bp > 0:
                config.data.path = os.path.join(workdir, "data")
        return config

    def prepare_data(self, config: ConfigDict) -> None:
        """Generate and prepare the seeded synthetic genome once, when the data folder has no manifest."""
        if config.data.synthetic_bp <= 0 or os.path.exists(os.path.join(config.data.path, "manifest.json")):
            return
        from nucgpt.data import prepare, synthetic

        genome_dir = os.path.join(os.path.dirname(config.data.path.rstrip("/")) or ".", "genome")
        os.makedirs(genome_dir, exist_ok=True)
        fasta = os.path.join(genome_dir, f"synthetic_{config.data.synthetic_bp}bp_seed{config.data.synthetic_seed}.fa")
        start = time.perf_counter()
        print(f"generating a synthetic genome of {config.data.synthetic_bp / 1e6:.1f} Mbp → {config.data.path}", flush=True)
        synthetic.write_genome(fasta, bp=config.data.synthetic_bp, seed=config.data.synthetic_seed, overwrite=True)
        prepare.prepare(
            [fasta],
            config.data.path,
            window=config.data.synthetic_window or self.window_bp(config),
            overwrite=True,
            progress=False,
            **SYNTHETIC_HOLDOUT,
        )
        print(f"synthetic genome generated and prepared in {time.perf_counter() - start:.1f} s", flush=True)

    @staticmethod
    def window_bp(config: ConfigDict) -> int:
        """Bases a record needs for `seq_len` input tokens plus the last target (seq_len + 1 tokens)."""
        tokenizer = get_tokenizer(config.data.tokenizer, pad_multiple=config.data.kmer_pad_multiple)
        tokens = config.train.seq_len + 1
        if tokenizer.k == 1:
            return tokens
        return tokens + tokenizer.k - 1 if tokenizer.overlap else tokens * tokenizer.k

    def validate(self, config: ConfigDict) -> None:
        """Runs after `prepare_data`: the dataset exists and holds both splits the run reads; a note
        says when its windows and the rows do not match."""
        if config.model.get("kind", "transformer") != "transformer":
            raise UserError(f"model.kind: {config.model.kind!r}; pretraining trains a transformer (the CNN is a "
                            "fine-tuning baseline: configs/finetune.py)")
        if not config.data.path:
            raise UserError("data.path: empty; give a prepared folder (nucgpt-prepare) or set data.synthetic_bp")
        from nucgpt.data.pipeline import read_manifest

        manifest = read_manifest(config.data.path)
        counts = ", ".join(f"{name}={split['records']}" for name, split in manifest["splits"].items())
        for split, field in (("train", "data.path"), (config.data.eval_split, "data.eval_split")):
            if not manifest["splits"].get(split, {}).get("records"):
                raise UserError(f"{field}: {config.data.path} has no {split!r} records (splits: {counts})")
        if all(source["kind"] == "fasta" for source in manifest["sources"]) and jax.process_index() == 0:
            note = self.window_note(config, manifest["options"]["window"])
            if note:
                print(f"note: {config.data.path}: {note}", flush=True)

    def window_note(self, config: ConfigDict, window: int) -> str | None:
        """What a row makes of the dataset's windows, when it is more than the last target missing:
        windows much shorter than a row are part padding; longer ones are read only at their start."""
        needed = self.window_bp(config)
        tokenizer = get_tokenizer(config.data.tokenizer, pad_multiple=1)
        tokens = len(tokenizer.encode(b"A" * window)[0])  # a full window's tokens, unpadded
        row = config.train.seq_len + 1
        if tokens < row - 1:
            return (f"{window} bp windows give {tokens} of a row's {row} tokens ({1 - tokens / row:.0%} padding); "
                    f"windows of {needed} bp fill a row")
        if window > needed:
            return f"{window} bp windows; a row of train.seq_len {config.train.seq_len} tokens reads the first {needed} bp of each"
        return None

    def build_model(self, config: ConfigDict, rngs: nnx.Rngs) -> nnx.Module:
        from nucgpt.model import Transformer

        return Transformer(config.model, rngs=rngs)

    def loss(self, model, batch, config):
        logits_BxLxV = model(batch["inputs"], batch["segment_ids"])
        return lm_loss.lm_stats(
            logits_BxLxV, batch["targets"], batch["target_valid"], batch["target_repeat"], config.train.repeat_weight
        )

    def loss_weight(self, batch, config):
        return lm_loss.weight_sum(batch["target_valid"], batch["target_repeat"], config.train.repeat_weight)

    def finalize_metrics(self, stats: Mapping[str, np.ndarray], config: ConfigDict) -> dict[str, float]:
        return lm_loss.lm_metrics(stats, bases_per_token(config))

    def batch_axes(self, config: ConfigDict) -> dict[str, tuple[str, ...]]:
        return {k: ("batch", "length") for k in LM_FIELDS}

    def dummy_batch(self, config: ConfigDict, local_batch_size: int) -> dict[str, np.ndarray]:
        shape = (local_batch_size, config.train.seq_len)
        rng = np.random.default_rng(0)
        tokens = rng.integers(1, 5, size=shape, dtype=np.int32)
        return {
            "inputs": tokens,
            "targets": np.roll(tokens, -1, axis=1),
            "target_repeat": rng.random(shape) < 0.5,
            "target_valid": np.ones(shape, bool),
            "segment_ids": np.ones(shape, np.int32),
        }

    def _iterator(self, config: ConfigDict, *, split: str, train: bool, process_index: int, process_count: int):
        from nucgpt.data.pipeline import make_lm_iterator

        return make_lm_iterator(
            config.data,
            split=split,
            seq_len=config.train.seq_len,
            global_batch_size=config.train.global_batch_size,
            seed=config.train.seed,
            train=train,
            process_index=process_index,
            process_count=process_count,
        )

    def train_iterator(self, config, process_index, process_count):
        return self._iterator(config, split="train", train=True, process_index=process_index, process_count=process_count)

    def eval_iterator(self, config, process_index, process_count):
        return self._iterator(
            config, split=config.data.eval_split, train=False, process_index=process_index, process_count=process_count
        )


TASK = PretrainTask()
