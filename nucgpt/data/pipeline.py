"""Grain input pipeline for language-model pretraining: prepared shards → per-process numpy batches.

    MapDataset(ArrayRecord shards) ▸ shuffle (reseeded every epoch) ▸ repeat      (train)
                                   ▸ pad to whole global batches                  (eval: one pass)
        ▸ reverse-complement (optional, train only) ▸ tokenize ▸ crop/pad to seq_len ▸ batch(local)
        ▸ take every process_count-th batch from process_index

Element k of the global order is row k % B of global batch k // B, and process p reads the rows
[p·b, (p+1)·b) of every global batch: hosts read disjoint parts and together see every record once
per epoch. Everything before the iterator is index-based, so the iterator's state is one position
and a restored iterator yields exactly the next batch.
"""

from __future__ import annotations

import os

import grain
import jax
import numpy as np
from absl import flags

from nucgpt.data import records
from nucgpt.data.records import read_manifest  # re-exported: part of this module's interface
from nucgpt.errors import UserError
from nucgpt.tokenizers import PAD_ID, Tokenizer, get_tokenizer

BATCH_KEYS = ("inputs", "targets", "target_repeat", "target_valid", "segment_ids")
_COMPLEMENT_U8 = np.arange(256, dtype=np.uint8)
for _a, _b in (b"AT", b"CG", b"at", b"cg"):
    _COMPLEMENT_U8[_a], _COMPLEMENT_U8[_b] = _b, _a


def reverse_complement(seq_u8: np.ndarray) -> np.ndarray:
    """The other strand, read 5'→3'; case (the repeat mask) and N follow their bases."""
    return _COMPLEMENT_U8[seq_u8[::-1]]


class LmExample(grain.transforms.RandomMap):
    """One record → the model's inputs and next-token targets, all [seq_len]; b"" → an all-padding row.

    inputs are the first seq_len tokens; targets[i] is token i+1, so the last position has a target
    only when the record has more than seq_len tokens (prepare windows of seq_len + 1 tokens for that).
    """

    def __init__(self, tokenizer: Tokenizer, seq_len: int, reverse_complement_prob: float):
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.reverse_complement_prob = reverse_complement_prob

    def random_map(self, record: bytes, rng: np.random.Generator) -> dict[str, np.ndarray]:
        L = self.seq_len
        ids_T = np.full(L + 1, PAD_ID, np.int32)
        repeat_T = np.zeros(L + 1, bool)
        valid_T = np.zeros(L + 1, bool)
        if record:
            seq_u8 = records.sequence_u8(record)
            if self.reverse_complement_prob and rng.random() < self.reverse_complement_prob:
                seq_u8 = reverse_complement(seq_u8)
            ids, repeat, valid = self.tokenizer.encode(seq_u8)
            n = min(len(ids), L + 1)  # token L, when the record has it, is the last position's target
            ids_T[:n], repeat_T[:n], valid_T[:n] = ids[:n], repeat[:n], valid[:n]
        return dict(
            inputs=ids_T[:L],
            targets=ids_T[1:],
            target_repeat=repeat_T[1:],
            target_valid=valid_T[1:],
            segment_ids=(ids_T[:L] != PAD_ID).astype(np.int32),
        )


class _PaddedToBatches:
    """A data source whose length is rounded up to whole global batches; the extra items are b""."""

    def __init__(self, source, length: int):
        self._source = source
        self._length = length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> bytes:
        return self._source[index] if index < len(self._source) else b""


def make_lm_iterator(
    data_cfg,
    *,
    split: str,
    seq_len: int,
    global_batch_size: int,
    seed: int,
    train: bool,
    process_index: int,
    process_count: int,
) -> grain.DatasetIterator:
    """This process's batches of `split`: endless and reshuffled (train) or one padded pass (eval)."""
    manifest = read_manifest(data_cfg.path)
    if split not in manifest["splits"] or not manifest["splits"][split]["records"]:
        raise UserError(f"{data_cfg.path}: split {split!r} has no records (splits: "
                        + ", ".join(f"{k}={v['records']}" for k, v in manifest["splits"].items()) + ")")
    if global_batch_size % process_count:
        raise UserError(f"global batch size {global_batch_size} is not divisible by {process_count} processes")
    local_batch_size = global_batch_size // process_count
    tokenizer = get_tokenizer(data_cfg.tokenizer, pad_multiple=data_cfg.kmer_pad_multiple)
    shards = [os.path.join(os.fspath(data_cfg.path), s) for s in manifest["splits"][split]["shards"]]
    source = grain.sources.ArrayRecordDataSource(shards)

    if train:
        ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    else:
        padded = -(-len(source) // global_batch_size) * global_batch_size
        ds = grain.MapDataset.source(_PaddedToBatches(source, padded))
    augment_prob = data_cfg.reverse_complement_prob if train else 0.0  # eval sees the genome as stored
    ds = ds.random_map(LmExample(tokenizer, seq_len, augment_prob), seed=seed)
    ds = ds.batch(local_batch_size)[process_index::process_count]
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=max(data_cfg.prefetch, 0)))
    if data_cfg.num_workers > 0:
        if not flags.FLAGS.is_parsed():  # Grain's workers read its absl flags; outside an absl app (tests, notebooks)
            flags.FLAGS.mark_as_parsed()  # they would be unparsed and the workers would fail
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=data_cfg.num_workers, per_worker_buffer_size=max(data_cfg.prefetch, 1)))
    return iter(iter_ds)


def global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh,
                 spec: jax.sharding.PartitionSpec) -> dict[str, jax.Array]:
    """The global arrays on `mesh` built from every process's local rows (same keys on every process)."""
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
