"""The Genomic Benchmarks CNN baseline (`--config.model.kind=cnn`), so every fine-tuning result has a
same-protocol comparison.

Architecture of genomic_benchmarks/models/torch.py: embedding 100 → Conv1d(16, k=8) → BatchNorm →
ReLU → MaxPool(2) → Conv1d(8, k=8) → BatchNorm → MaxPool(2) → Conv1d(4, k=8) → BatchNorm →
MaxPool(2) → flatten → Dense 512 → Dense classes. It reads a fixed length (the flatten fixes the
Dense input), so shorter batches are right-padded with the pad token up to `input_len` here, as
the original pads every sequence to the dataset's longest. Two differences: two classes use a
two-logit softmax instead of one sigmoid logit, so one loss serves every class count; and batch
norm keeps no running averages — it normalises with the statistics of the rows `norm_rows_B`
marks: the real rows of a training batch (as the original), and at evaluation a fixed sample of
training sequences carried in every batch. A test prediction then depends on neither the other
test sequences nor padding, and the trainer's state stays parameters only.
"""

import jax
import jax.numpy as jnp
from flax import nnx

EMBEDDING_DIM = 100
KERNEL_SIZE = 8
CONV_CHANNELS = (16, 8, 4)
DENSE_DIM = 512


def flattened_size(input_len: int) -> int:
    length = input_len
    for _ in CONV_CHANNELS:
        length = (length - KERNEL_SIZE + 1) // 2
    if length < 1:
        raise ValueError(f"the CNN baseline needs input_len ≥ {_min_input_len()}; got {input_len}")
    return length * CONV_CHANNELS[-1]


def _min_input_len() -> int:
    length = 1
    for _ in CONV_CHANNELS:
        length = 2 * length + KERNEL_SIZE - 1
    return length


class MaskedBatchNorm(nnx.Module):
    """BatchNorm over (rows, length) with statistics from the marked rows only (biased variance, as torch)."""

    def __init__(self, channels: int, epsilon: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.epsilon = epsilon

    def __call__(self, x_BxLxC: jax.Array, norm_rows_B: jax.Array) -> jax.Array:
        weight_Bx1x1 = norm_rows_B.astype(jnp.float32)[:, None, None]
        count = jnp.maximum(jnp.sum(weight_Bx1x1) * x_BxLxC.shape[1], 1.0)
        mean_C = jnp.sum(weight_Bx1x1 * x_BxLxC, axis=(0, 1)) / count
        var_C = jnp.sum(weight_Bx1x1 * jnp.square(x_BxLxC - mean_C), axis=(0, 1)) / count
        return (x_BxLxC - mean_C) * jax.lax.rsqrt(var_C + self.epsilon) * self.scale[...] + self.bias[...]


class GenomicBenchmarksCNN(nnx.Module):
    def __init__(self, vocab_size: int, num_classes: int, input_len: int, pad_id: int, *, rngs: nnx.Rngs):
        self.input_len = input_len
        self.pad_id = pad_id
        self.embed = nnx.Embed(vocab_size, EMBEDDING_DIM, rngs=rngs)
        in_channels = (EMBEDDING_DIM,) + CONV_CHANNELS[:-1]
        self.convs = nnx.List(
            [nnx.Conv(c_in, c_out, KERNEL_SIZE, padding="VALID", rngs=rngs) for c_in, c_out in zip(in_channels, CONV_CHANNELS)]
        )
        self.norms = nnx.List([MaskedBatchNorm(c) for c in CONV_CHANNELS])
        self.dense = nnx.Linear(flattened_size(input_len), DENSE_DIM, rngs=rngs)
        self.output = nnx.Linear(DENSE_DIM, num_classes, rngs=rngs)

    def __call__(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array, norm_rows_B: jax.Array | None = None) -> jax.Array:
        """Logits [B, classes]; batch-norm statistics come from the rows `norm_rows_B` marks (default: all)."""
        del segment_ids_BxL  # the baseline sees padding, as in the original
        if tokens_BxL.shape[1] > self.input_len:
            raise ValueError(f"batch length {tokens_BxL.shape[1]} exceeds the CNN's input_len {self.input_len}")
        if norm_rows_B is None:
            norm_rows_B = jnp.ones(tokens_BxL.shape[:1], jnp.float32)
        tokens_BxL = jnp.pad(tokens_BxL, ((0, 0), (0, self.input_len - tokens_BxL.shape[1])), constant_values=self.pad_id)
        x_BxLxC = self.embed(tokens_BxL)
        for layer, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x_BxLxC = norm(conv(x_BxLxC), norm_rows_B)
            if layer == 0:
                x_BxLxC = jax.nn.relu(x_BxLxC)
            x_BxLxC = nnx.max_pool(x_BxLxC, window_shape=(2,), strides=(2,))
        # Flatten channel-major like torch's [B, C, L] flatten, so a ported checkpoint would line up.
        x_BxF = jnp.swapaxes(x_BxLxC, 1, 2).reshape(x_BxLxC.shape[0], -1)
        return self.output(self.dense(x_BxF))
