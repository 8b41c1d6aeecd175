"""Training FLOPs per token and peak FLOP/s per device (the two halves of MFU), and the trainer's
throughput meter that divides them.

Counted: every matmul, times 6 for training (2 forward, 4 backward: gradients of activations and
of weights). Not counted: norms, softmax, activations, rotary embeddings, the embedding lookup
(a gather, or a one-hot matmul of 6·V·D per token where `embedding_lookup` picks it: 74k of 3.62G
for the 500M preset) and the optimizer — together a few percent at the published shape.
"""

from __future__ import annotations

import math
import time
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np


def matmul_params(model_cfg: ml_collections.ConfigDict) -> int:
    """Weights of the per-layer projections (q, k, v, o and the MLP); excludes (un)embedding and norms."""
    d, k = model_cfg.d_model, model_cfg.head_dim
    attention = d * k * (2 * model_cfg.num_heads + 2 * model_cfg.num_kv_heads)
    mlp = (3 if model_cfg.mlp_activation == "swiglu" else 2) * d * model_cfg.mlp_dim
    return model_cfg.num_layers * (attention + mlp)


def attention_train_flops_per_token(seq_len: int, num_heads: int, head_dim: int) -> float:
    """One layer's causal attention, forward + backward: 6·S·H_q·head_dim.

    QKᵀ and AV cost 2·S·H_q·head_dim each per token with the full [S, S] square; the causal half is
    what a flash kernel computes, and ×3 covers the backward pass.
    """
    return 6.0 * seq_len * num_heads * head_dim


def train_flops_per_token(model_cfg: ml_collections.ConfigDict, seq_len: int) -> float:
    """6 × matmul params + causal attention 6·layers·S·H_q·head_dim + unembedding 6·d_model·vocab."""
    attention = model_cfg.num_layers * attention_train_flops_per_token(seq_len, model_cfg.num_heads, model_cfg.head_dim)
    unembedding = 6 * model_cfg.d_model * model_cfg.vocab_size
    return float(6 * matmul_params(model_cfg) + attention + unembedding)


# Dense bfloat16 peak FLOP/s per JAX device, matched against `device.device_kind` (lower case,
# most specific first). TPU v2/v3 expose each TensorCore as a device (half a chip); v4 and v5p
# expose a megacore chip; v5e/v6e chips have one core.
_PEAK_BF16 = (
    ("v6 lite", 918e12),
    ("v6e", 918e12),
    ("v5 lite", 197e12),
    ("v5e", 197e12),
    ("v5p", 459e12),
    ("v5", 459e12),
    ("v4", 275e12),
    ("v3", 61.5e12),
    ("h200 nvl", 835e12),  # as the H100 NVL: 1,671 TFLOP/s with 2:4 sparsity
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),  # NVIDIA's sheet: 1,671 TFLOP/s with 2:4 sparsity
    ("h100", 989e12),
    ("a100", 312e12),
)


def peak_flops_per_device(device_kind: str) -> float | None:
    """Dense bf16 peak of one device, or None when the kind is not in the table (e.g. CPU)."""
    kind = device_kind.lower()
    return next((peak for key, peak in _PEAK_BF16 if key in kind), None)


def count_params(abstract_state: Any) -> int:
    """Total elements over a (possibly abstract) state; nothing is allocated."""
    return int(sum(np.prod(x.shape, dtype=np.int64) for x in jax.tree.leaves(abstract_state)))


class Throughput:
    """tokens/s and MFU over a window of steps (MFU is None where the device's peak is unknown).

    Tokens are counted from each batch's real shape, so length-bucketed fine-tuning batches shorter
    than train.seq_len are not counted at full length.
    """

    def __init__(self, config: ml_collections.ConfigDict, start_step: int):
        flops_per_token = train_flops_per_token(config.model, config.train.seq_len) if config.task == "pretrain" else None
        peak = peak_flops_per_device(jax.devices()[0].device_kind)
        self.peak_total = peak * jax.device_count() if peak and flops_per_token else None
        self.flops_per_token = flops_per_token
        self.restart(start_step)

    def restart(self, step: int) -> None:
        self.step, self.time, self.tokens = step, time.perf_counter(), 0

    def count(self, tokens: int) -> None:
        self.tokens += tokens

    def measure(self, step: int) -> dict[str, float | None]:
        now = time.perf_counter()
        tokens_per_sec = self.tokens / max(now - self.time, 1e-9)
        self.restart(step)
        mfu = tokens_per_sec * self.flops_per_token / self.peak_total if self.peak_total else None
        return {"tokens_per_sec": tokens_per_sec, "mfu": mfu}


def batch_tokens(batch: Mapping[str, jax.Array]) -> int:
    """Token positions the step computes: global rows × the batch's sequence length."""
    return max(math.prod(v.shape[:2]) for v in batch.values())
