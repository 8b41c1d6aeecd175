import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from configs.pretrain import get_config
from nucgpt.data import pipeline, synthetic
from nucgpt.data.inspect import iter_records
from nucgpt.data.prepare import prepare
from nucgpt.errors import UserError
from nucgpt.tokenizers import get_tokenizer

WINDOW = 64


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """~110 train records of 64 bp (a few short tails) and ~20 valid ones."""
    d = tmp_path_factory.mktemp("lm")
    synthetic.write_genome(d / "g.fa", bp=9_000, seed=5, num_chroms=3)
    prepare([d / "g.fa"], d / "ds", window=WINDOW, max_n=WINDOW, keep_tail=True, valid_chroms=["chr3"],
            records_per_shard=25, progress=False)
    return d / "ds"


def data_cfg(path, **overrides) -> ConfigDict:
    cfg = get_config("demo").data
    cfg.path = str(path)
    cfg.update(overrides)
    return cfg


def make(path, *, split="train", seq_len=WINDOW, batch=12, train=True, index=0, count=1, seed=0, **cfg):
    return pipeline.make_lm_iterator(data_cfg(path, **cfg), split=split, seq_len=seq_len, global_batch_size=batch,
                                     seed=seed, train=train, process_index=index, process_count=count)


def stored(path, split="train") -> list[bytes]:
    return [seq for _, _, seq in iter_records(path, split)]


def row_sequences(batch) -> list[bytes]:
    """The bases each row was made from: nucleotide ids → ACGTN, case from the repeat mask of the targets
    (so the first base, never a target, is uppercase; compare with `as_seen`)."""
    out = []
    for ids, rep, seg in zip(batch["inputs"], np.c_[np.zeros(len(batch["inputs"]), bool), batch["target_repeat"]],
                             batch["segment_ids"]):
        text = np.frombuffer(b"?ACGTN", np.uint8)[ids[seg == 1]] + 32 * rep[: seg.sum()].astype(np.uint8)
        out.append(text.tobytes())
    return out


def as_seen(seq: bytes) -> bytes:
    return seq[:1].upper() + seq[1:]


def test_batch_layout_and_targets(dataset):
    batch = next(make(dataset, seq_len=80, batch=4))
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        "inputs": ((4, 80), np.int32), "targets": ((4, 80), np.int32), "target_repeat": ((4, 80), bool),
        "target_valid": ((4, 80), bool), "segment_ids": ((4, 80), np.int32)}
    for row in range(4):
        inputs, targets, seg = batch["inputs"][row], batch["targets"][row], batch["segment_ids"][row]
        n = seg.sum()
        assert n <= WINDOW and (seg[:n] == 1).all() and (seg[n:] == 0).all() and (inputs[n:] == 0).all()
        assert (targets[:-1] == inputs[1:]).all() and targets[-1] == 0
        assert not batch["target_valid"][row, n - 1 :].any()  # the last real token has no target
        assert (batch["target_valid"][row, : n - 1] == (inputs[1:n] < 5)).all()


def test_records_cropped_to_seq_len(dataset):
    batch = next(make(dataset, seq_len=16, batch=4, train=False, split="valid"))
    first = stored(dataset, "valid")[0]
    ids, repeat, _ = get_tokenizer("nucleotide").encode(first[:17])
    assert (batch["inputs"][0] == ids[:16]).all() and (batch["targets"][0] == ids[1:17]).all()
    assert (batch["target_repeat"][0] == repeat[1:17]).all() and batch["target_valid"][0, 15] == (ids[16] < 5)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_train_shards_cover_every_record_once_per_epoch(dataset, count):
    records = [as_seen(seq) for seq in stored(dataset)]
    batch = 12
    steps = 2 * len(records) // batch + 1
    per_process = [make(dataset, batch=batch, index=i, count=count) for i in range(count)]
    global_rows = []
    for _ in range(steps):
        local = [row_sequences(next(it)) for it in per_process]
        assert all(len(rows) == batch // count for rows in local)
        global_rows += [row for rows in local for row in rows]
    epoch1, epoch2 = global_rows[: len(records)], global_rows[len(records) : 2 * len(records)]
    assert sorted(epoch1) == sorted(records) == sorted(epoch2)
    assert epoch1 != epoch2 and epoch1 != records  # shuffled, and differently every epoch


@pytest.mark.parametrize("count", [1, 3])
def test_eval_one_pass_pads_last_batch_with_invalid_rows(dataset, count):
    records = [as_seen(seq) for seq in stored(dataset, "valid")]
    batch = 6
    seen, padding_rows = [], 0
    iterators = [make(dataset, split="valid", batch=batch, train=False, index=i, count=count) for i in range(count)]
    for locals_ in zip(*iterators):
        for local in locals_:
            for row, seg, valid in zip(row_sequences(local), local["segment_ids"], local["target_valid"]):
                if seg.any():
                    seen.append(row)
                else:
                    padding_rows += 1
                    assert not valid.any()
    assert seen == records  # fixed order, every record exactly once
    assert padding_rows == -len(records) % batch
    assert all(next(it, None) is None for it in iterators)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_restored_iterator_yields_identical_next_batch(dataset, num_workers):
    it = make(dataset, batch=4, num_workers=num_workers, reverse_complement_prob=0.5)
    for _ in range(15):  # past the end of the first epoch
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    resumed = make(dataset, batch=4, num_workers=num_workers, reverse_complement_prob=0.5)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert all((got[k] == want[k]).all() for k in pipeline.BATCH_KEYS)
    for iterator in (it, resumed):
        iterator.close()


def test_seed_changes_order(dataset):
    a, b = next(make(dataset, seed=0)), next(make(dataset, seed=1))
    assert not (a["inputs"] == b["inputs"]).all()


def test_reverse_complement_case_follows_bases_and_only_in_training(dataset):
    complement = bytes.maketrans(b"ACGTNacgtn", b"TGCANtgcan")
    reverse_complements = {as_seen(seq[::-1].translate(complement)) for seq in stored(dataset)}
    rows = row_sequences(next(make(dataset, batch=12, reverse_complement_prob=1.0)))
    assert all(row in reverse_complements for row in rows)
    eval_rows = row_sequences(next(make(dataset, split="valid", train=False, batch=4, reverse_complement_prob=1.0)))
    assert eval_rows == [as_seen(seq) for seq in stored(dataset, "valid")[:4]]


def test_kmer_tokenizer_in_pipeline(dataset):
    batch = next(make(dataset, split="valid", train=False, batch=2, seq_len=16, tokenizer="kmer6_nonoverlap"))
    first = stored(dataset, "valid")[0]
    ids, _, _ = get_tokenizer("kmer6_nonoverlap").encode(first)
    assert (batch["inputs"][0, :11] == ids[:11]).all() and batch["inputs"].max() < 4098
    assert (batch["segment_ids"][0] == (np.arange(16) < 11)).all()  # 64 bp → 11 six-mers


def test_missing_manifest_and_empty_split_are_user_errors(dataset, tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path}: no manifest.json"):
        make(tmp_path)
    with pytest.raises(UserError, match="split 'test' has no records"):
        make(dataset, split="test")


def test_global_batch_on_a_mesh(dataset):
    mesh = jax.make_mesh((8,), ("data",))
    local = next(make(dataset, batch=8))
    arrays = pipeline.global_batch(local, mesh, jax.sharding.PartitionSpec("data"))
    assert arrays["inputs"].shape == (8, WINDOW) and len(arrays["inputs"].addressable_shards) == 8
    np.testing.assert_array_equal(np.asarray(arrays["targets"]), local["targets"])
