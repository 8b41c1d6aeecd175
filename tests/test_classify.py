"""The classify task through the trainer's step builder: loss falls, metrics, init_from checks."""

import json

import jax
import numpy as np
import pytest

from nucgpt import step
from nucgpt.errors import UserError
from nucgpt.tasks import get_task
from test_classify_model import finetune_config

TASK = get_task("classify")


def _composition_sequences(rng, label: int, n: int) -> list[str]:
    """Class 0 is A/C-rich, class 1 G/T-rich: learnable in a few dozen steps by a tiny model."""
    rich, poor = ("AC", "GT") if label == 0 else ("GT", "AC")
    out = []
    for _ in range(n):
        length = int(rng.integers(40, 61))
        bases = np.where(rng.random(length) < 0.8, rng.choice(list(rich), length), rng.choice(list(poor), length))
        out.append("".join(bases))
    return out


@pytest.fixture(scope="module")
def benchmark_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("gb") / "composition"
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("test", 24)):
        for label, name in enumerate(("ac_rich", "gt_rich")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i, sequence in enumerate(_composition_sequences(rng, label, n)):
                (folder / f"{i}.txt").write_text(sequence + "\n")
    return root


@pytest.fixture(scope="module")
def tsv_table(tmp_path_factory):
    path = tmp_path_factory.mktemp("tsv") / "composition.tsv"
    rng = np.random.default_rng(1)
    rows = [f"{s}\t{label}" for label in (0, 1) for s in _composition_sequences(rng, label, 60)]
    path.write_text("seq\tlabel\n" + "\n".join(rows) + "\n")
    return path


def small_config(data_path, kind: str = "transformer", steps: int = 40):
    c = finetune_config("demo" if kind == "transformer" else "cnn_demo")
    c.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64, attention="xla")
    c.data.path = str(data_path)
    c.classify.update(synthetic_examples=0, min_bucket_len=64)
    c.train.update(steps=steps, global_batch_size=16, seq_len=64, log_every=10, eval_every=steps)
    c.optim.update(learning_rate=3e-3, warmup_steps=5)
    return c


@pytest.fixture(scope="module")
def tsv_trainer(tsv_table):
    """One compiled transformer trainer on the TSV, shared by the tests that train it."""
    config = small_config(tsv_table)
    TASK.validate(config)
    return config, step.build_trainer(config)


def train(config, trainer, steps: int):
    state = trainer.init_state()
    iterator = TASK.train_iterator(config, 0, 1)
    losses = []
    for _ in range(steps):
        state, metrics = trainer.train_step(state, trainer.global_batch(next(iterator)))
        losses.append(TASK.finalize_metrics(jax.device_get(metrics), config)["loss"])
    totals = None
    for batch in TASK.eval_iterator(config, 0, 1):
        stats = jax.device_get(trainer.eval_step(state, trainer.global_batch(batch)))
        totals = stats if totals is None else jax.tree.map(np.add, totals, stats)
    return losses, TASK.finalize_metrics(totals, config)


@pytest.mark.parametrize("layout, kind", [("tsv", "transformer"), ("folder", "cnn")])
def test_loss_falls_and_test_metrics_cover_the_whole_test_split(layout, kind, benchmark_folder, tsv_trainer):
    if kind == "transformer":
        config, trainer = tsv_trainer
    else:
        config = small_config(benchmark_folder, kind)
        TASK.validate(config)
        trainer = step.build_trainer(config)
    losses, metrics = train(config, trainer, 40)
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    assert metrics["examples"] == (24 if layout == "tsv" else 48)  # every test row once, no fillers
    assert metrics["accuracy"] > 0.75 and metrics["mcc"] > 0.5


def _fake_pretraining_checkpoint(tmp_path, **overrides):
    """A step folder as checkpoint.py lays it out, holding only the stored config."""
    pretrained = finetune_config("demo")
    pretrained.model.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64)
    pretrained.task = overrides.pop("task", "pretrain")
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        pretrained[section][key] = value
    step_dir = tmp_path / "pretrain" / "checkpoints" / "100"
    (step_dir / "params").mkdir(parents=True)
    (step_dir / "config").mkdir()
    (step_dir / "config" / "metadata").write_text(pretrained.to_json())
    return tmp_path / "pretrain"


def test_a_tokenizer_that_differs_from_the_checkpoint_is_a_clear_error(tmp_path, tsv_table):
    config = small_config(tsv_table)
    config.init_from = str(_fake_pretraining_checkpoint(tmp_path, data__tokenizer="kmer6_overlap", model__vocab_size=4098))
    with pytest.raises(UserError, match=r"data.tokenizer='nucleotide' but the checkpoint has 'kmer6_overlap'.*model.vocab_size=6"):
        TASK.validate(config)
    config.init_from = str(_fake_pretraining_checkpoint(tmp_path / "same"))
    TASK.validate(config)  # identical settings pass
    config.init_from = str(_fake_pretraining_checkpoint(tmp_path / "finetuned", task="classify"))
    with pytest.raises(UserError, match=r"a 'classify' checkpoint; fine-tuning starts from a pretraining one"):
        TASK.validate(config)
    config.init_from = str(tsv_table)  # a file, not a checkpoint
    with pytest.raises(UserError, match=r"^init_from .*: is a file; give a workdir, its checkpoints/ or a step folder"):
        TASK.validate(config)


def test_num_classes_that_disagree_with_the_data_is_a_user_error(tsv_table):
    config = small_config(tsv_table)
    config.classify.num_classes = 3
    with pytest.raises(UserError, match="classify.num_classes: 3, but .* has 2 classes"):
        TASK.validate(config)


def test_summarize_writes_results_json(tmp_path, tsv_table):
    config = small_config(tsv_table)
    stats = {"ce": np.float32(6.0), "weight": np.float32(24.0), "confusion": np.array([[10.0, 2.0], [3.0, 9.0]])}
    TASK.summarize(str(tmp_path), config, 40, TASK.finalize_metrics(stats, config))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["confusion_matrix"] == [[10, 2], [3, 9]]
    assert results["num_test"] == results["num_test_in_split"] == 24 and results["split_seed"] == 0
    assert results["accuracy"] == pytest.approx(19 / 24)
    assert {"mcc", "f1_macro", "f1_weighted"} <= results.keys()
    assert results["init_from"] is None


def test_an_evaluation_again_names_the_checkpoint_the_run_was_fine_tuned_from(tmp_path, tsv_table):
    """`eval_only` restores the fine-tuned state without `init_from`; results.json still says where it began."""
    from nucgpt.checkpoint import save_config

    config = small_config(tsv_table)
    config.init_from = "/runs/pretrain_500m"
    save_config(str(tmp_path), config)  # as the fine-tuning run wrote it
    config.init_from, config.eval_only = "", True
    stats = {"ce": np.float32(6.0), "weight": np.float32(24.0), "confusion": np.array([[10.0, 2.0], [3.0, 9.0]])}
    TASK.summarize(str(tmp_path), config, 40, TASK.finalize_metrics(stats, config))
    assert json.loads((tmp_path / "results.json").read_text())["init_from"] == "/runs/pretrain_500m"


def test_a_resumed_fine_tune_continues_exactly(tmp_path, tsv_trainer):
    from nucgpt.checkpoint import Checkpoints

    config, trainer = tsv_trainer

    def run_steps(state, iterator, n):
        losses = []
        for _ in range(n):
            state, metrics = trainer.train_step(state, trainer.global_batch(next(iterator)))
            losses.append(float(metrics["ce"]))
        return state, losses

    iterator = TASK.train_iterator(config, 0, 1)
    state, _ = run_steps(trainer.init_state(), iterator, 3)
    checkpoints = Checkpoints(str(tmp_path), keep=1, async_save=False)
    checkpoints.save(state, iterator, config)
    checkpoints.close()
    _, straight = run_steps(state, iterator, 3)

    resumed_iterator = TASK.train_iterator(config, 0, 1)
    checkpoints = Checkpoints(str(tmp_path), keep=1, async_save=False)
    restored = checkpoints.restore_latest(trainer.abstract_state, resumed_iterator)
    checkpoints.close()
    assert int(restored["step"]) == 3 and resumed_iterator.get_state() == {"epoch": 0, "position": 3}
    _, resumed = run_steps(restored, resumed_iterator, 3)
    np.testing.assert_allclose(resumed, straight, rtol=1e-6)


def test_init_from_loads_the_pretrained_trunk_and_keeps_the_fresh_head(tmp_path, tsv_table):
    from flax import nnx

    from nucgpt.checkpoint import Checkpoints
    from nucgpt.model import Transformer

    config = small_config(tsv_table)
    pretrained_params = nnx.to_pure_dict(nnx.state(Transformer(config.model, rngs=nnx.Rngs(7))))

    class NoData:
        def get_state(self):
            return {}

    checkpoints = Checkpoints(str(tmp_path / "pretrain"), keep=1, async_save=False)
    pretraining_config = config.copy_and_resolve_references()
    pretraining_config.task = "pretrain"
    checkpoints.save({"step": np.int32(5), "params": pretrained_params, "opt_state": {}}, NoData(), pretraining_config)
    checkpoints.close()
    config.init_from = str(tmp_path / "pretrain")
    TASK.validate(config)

    fresh = nnx.to_pure_dict(nnx.state(TASK.build_model(config, nnx.Rngs(0))))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    loaded = TASK.initial_params(config, fresh, jax.tree.map(lambda _: device, fresh))
    jax.tree.map(np.testing.assert_array_equal, loaded["trunk"], pretrained_params)
    jax.tree.map(np.testing.assert_array_equal, loaded["head"], fresh["head"])


def test_freeze_trunk_with_weight_decay_updates_the_head_only(tsv_table):
    """Weight decay would shrink a frozen trunk through zero gradients; the optimizer must skip it instead."""
    config = small_config(tsv_table, steps=3)
    config.classify.freeze_trunk = True
    config.optim.update(weight_decay=0.1, warmup_steps=0)
    TASK.validate(config)
    trainer = step.build_trainer(config)
    state = trainer.init_state()
    before = jax.device_get(state["params"])
    iterator = TASK.train_iterator(config, 0, 1)
    for _ in range(3):
        state, _ = trainer.train_step(state, trainer.global_batch(next(iterator)))
    after = jax.device_get(state["params"])
    for a, b in zip(jax.tree.leaves(before["trunk"]), jax.tree.leaves(after["trunk"])):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before["head"]), jax.tree.leaves(after["head"])))
    # No Adam moments are kept for the frozen trunk: the optimizer state holds the head's only.
    moments = sum(x.size for x in jax.tree.leaves(state["opt_state"]) if x.ndim > 0)
    head = sum(x.size for x in jax.tree.leaves(after["head"]))
    assert moments == 2 * head


def test_loss_weight_is_the_weight_the_loss_reports(tsv_trainer):
    """The train step normalises by `loss_weight` before the forward pass: it must match the loss's own Σ w."""
    config, trainer = tsv_trainer
    batch = next(TASK.train_iterator(config, 0, 1))
    batch["weights"][: len(batch["weights"]) // 4] = 0.0  # rows that only pad the batch
    global_batch = trainer.global_batch(batch)
    stats = jax.device_get(trainer.eval_step(trainer.init_state(), global_batch))
    weight = float(TASK.loss_weight(global_batch, config))
    assert weight == float(stats["weight"]) == float(np.sum(batch["weights"])) > 0


@pytest.mark.parametrize("tokenizer", ["kmer6_overlap", "kmer6_nonoverlap"])
def test_a_sequence_shorter_than_one_kmer_is_refused_before_training(tmp_path, tokenizer):
    """It would be a row of padding (overlapping: no token) or one UNK (consecutive): trained on nothing."""
    rows = [f"{'ACGTAC' * 5}\t{i % 2}" for i in range(10)]
    rows[3] = "ACGTA\t1"  # line 5 of the file
    (tmp_path / "t.tsv").write_text("seq\tlabel\n" + "\n".join(rows) + "\n")
    config = small_config(tmp_path / "t.tsv")
    config.data.tokenizer, config.model.vocab_size = tokenizer, 4098
    with pytest.raises(UserError, match=rf"^\S*t.tsv:5: a 5 bp sequence is shorter than one {tokenizer} token \(6 bp\)"):
        TASK.validate(config)
    for split in ("train", "test"):
        folder = tmp_path / "gb" / split / "a"
        folder.mkdir(parents=True)
        (folder / "0.txt").write_text("ACGTACGT\n")
        (tmp_path / "gb" / split / "b").mkdir()
        (tmp_path / "gb" / split / "b" / "0.txt").write_text("ACGTACGT\n" if split == "train" else "ACG\n")
    config.data.path = str(tmp_path / "gb")
    with pytest.raises(UserError, match=r"^\S*gb/test/b/0.txt: a 3 bp sequence .*at least 6 bp$"):
        TASK.validate(config)


def test_a_checkpoint_with_another_kmer_pad_multiple_fine_tunes(tmp_path, tsv_table):
    """The tokenizer's own padding never reaches a row, so it is no reason to refuse a checkpoint."""
    config = small_config(tsv_table)
    config.init_from = str(_fake_pretraining_checkpoint(tmp_path, data__kmer_pad_multiple=8))
    assert config.data.kmer_pad_multiple != 8
    TASK.validate(config)
