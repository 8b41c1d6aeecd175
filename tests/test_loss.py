"""The repeat-weighted loss: weight 0 ignores repeat targets, weight 1 is plain cross-entropy."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nucgpt import loss


def _batch(seed=0, B=3, L=17, V=6):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(B, L, V)), jnp.float32)
    targets = jnp.asarray(rng.integers(1, 5, size=(B, L)), jnp.int32)
    repeat = jnp.asarray(rng.random((B, L)) < 0.4)
    valid = jnp.asarray(rng.random((B, L)) < 0.9)
    return logits, targets, repeat, valid


def _mean_loss(logits, targets, valid, repeat, repeat_weight):
    total, stats = loss.lm_stats(logits, targets, valid, repeat, repeat_weight)
    return total / stats["weight"]


def test_weight_zero_ignores_repeat_targets_in_loss_and_gradients():
    logits, targets, repeat, valid = _batch()
    changed = jnp.where(repeat, (targets % 4) + 1, targets)  # a different base on every repeat target
    assert bool(jnp.any(changed != targets))
    value, grad = jax.value_and_grad(_mean_loss)(logits, targets, valid, repeat, 0.0)
    value2, grad2 = jax.value_and_grad(_mean_loss)(logits, changed, valid, repeat, 0.0)
    assert float(value) == float(value2)
    np.testing.assert_array_equal(np.asarray(grad), np.asarray(grad2))
    # ... while with weight 0.5 the change is seen.
    assert float(_mean_loss(logits, targets, valid, repeat, 0.5)) != float(_mean_loss(logits, changed, valid, repeat, 0.5))


def test_weight_one_is_plain_cross_entropy_over_valid_targets():
    logits, targets, repeat, valid = _batch(1)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    expected = jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.sum(valid)
    np.testing.assert_allclose(float(_mean_loss(logits, targets, valid, repeat, 1.0)), float(expected), rtol=1e-6)


def test_invalid_targets_do_not_count():
    logits, targets, repeat, valid = _batch(2)
    garbage = jnp.where(valid, targets, 0)
    np.testing.assert_allclose(
        float(_mean_loss(logits, targets, valid, repeat, 0.5)), float(_mean_loss(logits, garbage, valid, repeat, 0.5))
    )


def test_metrics_split_repeat_and_unique_and_report_bits_per_base():
    logits, targets, repeat, valid = _batch(3)
    _, stats = loss.lm_stats(logits, targets, valid, repeat, 0.5)
    m = loss.lm_metrics(jax.device_get(stats), bases_per_token=1)
    ce = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
    r, u = np.asarray(valid & repeat), np.asarray(valid & ~repeat)
    np.testing.assert_allclose(m["loss_repeat"], ce[r].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["loss_unique"], ce[u].mean(), rtol=1e-5)
    w = 0.5 * r + 1.0 * u
    np.testing.assert_allclose(m["loss"], (w * ce).sum() / w.sum(), rtol=1e-5)
    np.testing.assert_allclose(m["bits_per_base"], m["ce"] / math.log(2), rtol=1e-6)
    pred = np.asarray(jnp.argmax(logits, -1)) == np.asarray(targets)
    np.testing.assert_allclose(m["accuracy_repeat"], pred[r].mean(), rtol=1e-6)
    # Non-overlapping 6-mers: a token carries six bases.
    m6 = loss.lm_metrics(jax.device_get(stats), bases_per_token=6)
    np.testing.assert_allclose(m6["bits_per_base"], m["bits_per_base"] / 6, rtol=1e-6)


def test_stats_add_across_batches():
    """Metrics are sums, so two half batches give the same loss as the whole."""
    logits, targets, repeat, valid = _batch(4, B=4)
    _, whole = loss.lm_stats(logits, targets, valid, repeat, 0.5)
    _, a = loss.lm_stats(logits[:2], targets[:2], valid[:2], repeat[:2], 0.5)
    _, b = loss.lm_stats(logits[2:], targets[2:], valid[2:], repeat[2:], 0.5)
    summed = jax.tree.map(lambda x, y: np.asarray(x) + np.asarray(y), a, b)
    assert loss.lm_metrics(summed, 1)["loss"] == pytest.approx(loss.lm_metrics(jax.device_get(whole), 1)["loss"], rel=1e-6)
