"""Heads and the CNN baseline: padding never changes a sequence's prediction."""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nucgpt.data import classification as cd
from nucgpt.model import Transformer
from nucgpt.model.cnn import GenomicBenchmarksCNN
from nucgpt.model.heads import TransformerClassifier, last_token_pool, mean_pool

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def finetune_config(preset: str = "demo"):
    spec = importlib.util.spec_from_file_location("finetune_config", CONFIGS / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def tiny_model_config():
    c = finetune_config().model
    c.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64, attention="xla")
    return c


def test_pooling_reads_only_non_pad_positions():
    hidden = jnp.arange(2 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 3)
    segment_ids = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1]])
    np.testing.assert_array_equal(last_token_pool(hidden, segment_ids), hidden[jnp.arange(2), jnp.array([1, 3])])
    np.testing.assert_allclose(mean_pool(hidden, segment_ids), jnp.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_padding_does_not_change_a_prediction(pooling):
    model = TransformerClassifier(
        Transformer(tiny_model_config(), rngs=nnx.Rngs(0)), 32, 3, pooling=pooling, freeze_trunk=False,
        init_std=0.5, rngs=nnx.Rngs(1),
    )
    rng = np.random.default_rng(0)
    split = cd.TokenizedSplit(
        tuple(rng.integers(1, 5, size=n).astype(np.int32) for n in (40, 64, 17, 100)), np.zeros(4, np.int32)
    )
    buckets = cd.bucket_lengths(128, smallest=64)
    alone = {i: cd.pad_batch(split, np.array([i]), buckets, pad_id=0) for i in range(4)}
    together = cd.pad_batch(split, np.array([0, 1, 2, 3, -1]), buckets, pad_id=0)
    logits_together = model(jnp.asarray(together["tokens"]), jnp.asarray(together["segment_ids"]))
    for i in range(4):
        exact = split.tokens[i][None, :]  # no padding at all
        logits_exact = model(jnp.asarray(exact), jnp.ones_like(jnp.asarray(exact)))
        logits_alone = model(jnp.asarray(alone[i]["tokens"]), jnp.asarray(alone[i]["segment_ids"]))
        np.testing.assert_allclose(logits_alone[0], logits_exact[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(logits_together[i], logits_exact[0], rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(logits_together)).all()  # the all-pad filler row too


def test_frozen_trunk_gets_no_gradient():
    model = TransformerClassifier(
        Transformer(tiny_model_config(), rngs=nnx.Rngs(0)), 32, 2, pooling="last", freeze_trunk=True,
        init_std=0.02, rngs=nnx.Rngs(1),
    )
    tokens = jnp.ones((2, 16), jnp.int32)

    def loss(m):
        return jnp.sum(m(tokens, jnp.ones_like(tokens)) ** 2)

    grads = nnx.grad(loss)(model)
    trunk_norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads["trunk"]))
    head_norm = sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads["head"]))
    assert trunk_norm == 0.0 and head_norm > 0.0


def test_cnn_baseline_pads_short_batches_to_its_input_length():
    model = GenomicBenchmarksCNN(6, 2, input_len=128, pad_id=0, rngs=nnx.Rngs(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 5, size=(3, 64)), jnp.int32)
    padded = jnp.pad(tokens, ((0, 0), (0, 64)))
    logits = model(tokens, jnp.ones_like(tokens))
    assert logits.shape == (3, 2)
    np.testing.assert_allclose(logits, model(padded, jnp.ones_like(padded)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exceeds the CNN's input_len"):
        model(jnp.ones((1, 200), jnp.int32), jnp.ones((1, 200), jnp.int32))


def test_cnn_prediction_depends_only_on_the_batch_norm_reference_rows():
    """At eval the batch-norm statistics come from fixed reference rows, not from the other test rows."""
    model = GenomicBenchmarksCNN(6, 2, input_len=64, pad_id=0, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    reference = jnp.asarray(rng.integers(1, 5, size=(4, 64)), jnp.int32)
    test_rows = jnp.asarray(rng.integers(1, 5, size=(3, 64)), jnp.int32)

    def logits_of(rows):
        tokens = jnp.concatenate([rows, reference])
        norm_rows = jnp.concatenate([jnp.zeros(len(rows)), jnp.ones(len(reference))])
        return model(tokens, jnp.ones_like(tokens), norm_rows)[: len(rows)]

    together = logits_of(test_rows)
    for i in range(3):
        np.testing.assert_allclose(logits_of(test_rows[i : i + 1])[0], together[i], rtol=1e-5, atol=1e-6)
    assert not np.allclose(model(test_rows, jnp.ones_like(test_rows)), together, atol=1e-4)
