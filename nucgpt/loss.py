"""Repeat-weighted next-token cross-entropy and its metrics, as sums that add across batches.

Weight per target: 0 where invalid (PAD, N), `repeat_weight` where the target base is softmasked
(lowercase: a repeat element), 1 elsewhere. loss = Σ w·CE / Σ w, in float32 via logsumexp.
Metrics come back as sums (`lm_stats`) and become ratios on the host (`lm_metrics`), so they are
exact across micro-batches, devices and eval batches.
"""

import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

LN2 = math.log(2.0)


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Per-target natural-log cross-entropy in float32."""
    logits_BxLxV = logits_BxLxV.astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits_BxLxV, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits_BxLxV, targets_BxL[..., None], axis=-1)[..., 0]
    return log_z_BxL - target_logit_BxL


def target_weights(target_valid_BxL: jax.Array, target_repeat_BxL: jax.Array, repeat_weight: float) -> jax.Array:
    return target_valid_BxL.astype(jnp.float32) * jnp.where(target_repeat_BxL, repeat_weight, 1.0)


def weight_sum(target_valid_BxL: jax.Array, target_repeat_BxL: jax.Array, repeat_weight: float) -> jax.Array:
    """Σ w: the loss's normaliser, from the batch alone (`lm_stats` returns the same as `weight`)."""
    return jnp.sum(target_weights(target_valid_BxL, target_repeat_BxL, repeat_weight))


def lm_stats(
    logits_BxLxV: jax.Array,
    targets_BxL: jax.Array,
    target_valid_BxL: jax.Array,
    target_repeat_BxL: jax.Array,
    repeat_weight: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(Σ w·CE, sums for every metric); `stats["weight"]` = Σ w normalises the loss."""
    ce_BxL = cross_entropy(logits_BxLxV, targets_BxL)
    w_BxL = target_weights(target_valid_BxL, target_repeat_BxL, repeat_weight)
    correct_BxL = (jnp.argmax(logits_BxLxV, axis=-1) == targets_BxL).astype(jnp.float32)
    valid_BxL = target_valid_BxL.astype(jnp.float32)
    repeat_BxL = valid_BxL * target_repeat_BxL.astype(jnp.float32)
    unique_BxL = valid_BxL - repeat_BxL
    total = jnp.sum(w_BxL * ce_BxL)
    stats = {
        "weighted_ce": total,
        "weight": jnp.sum(w_BxL),
        "ce": jnp.sum(valid_BxL * ce_BxL),
        "ce_repeat": jnp.sum(repeat_BxL * ce_BxL),
        "ce_unique": jnp.sum(unique_BxL * ce_BxL),
        "correct": jnp.sum(valid_BxL * correct_BxL),
        "correct_repeat": jnp.sum(repeat_BxL * correct_BxL),
        "correct_unique": jnp.sum(unique_BxL * correct_BxL),
        "targets": jnp.sum(valid_BxL),
        "targets_repeat": jnp.sum(repeat_BxL),
        "targets_unique": jnp.sum(unique_BxL),
    }
    return total, stats


def _ratio(num: float, den: float) -> float:
    return float(num) / float(den) if den > 0 else float("nan")


def lm_metrics(stats: Mapping[str, np.ndarray], bases_per_token: int) -> dict[str, float]:
    """loss (repeat-weighted), plain CE, accuracy and bits per base overall / on repeats / on unique.

    `loss_repeat` and `loss_unique` are unweighted CE on those targets (the weight is constant
    within each group). Bits per base = nats per token / ln 2 / bases the token advances.
    """
    metrics = {"loss": _ratio(stats["weighted_ce"], stats["weight"])}
    for suffix in ("", "_repeat", "_unique"):
        ce = _ratio(stats["ce" + suffix], stats["targets" + suffix])
        metrics["loss" + suffix if suffix else "ce"] = ce
        metrics["accuracy" + suffix] = _ratio(stats["correct" + suffix], stats["targets" + suffix])
        metrics["bits_per_base" + suffix] = ce / LN2 / bases_per_token
    metrics["weighted_bits_per_base"] = metrics["loss"] / LN2 / bases_per_token
    metrics["targets"] = float(stats["targets"])
    return metrics
