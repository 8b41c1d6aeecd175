"""The Genomic Benchmarks CNN baseline (`--config.model.kind=cnn`), so every fine-tuning result has a
same-protocol comparison.

Architecture of genomic_benchmarks/models/torch.py: embedding 100 → Conv1d(16, k=8) → BatchNorm →
ReLU → MaxPool(2) → Conv1d(8, k=8) → BatchNorm → MaxPool(2) → Conv1d(4, k=8) → BatchNorm →
MaxPool(2) → flatten → Dense 512 → Dense classes. It reads a fixed length (the flatten fixes the
Dense input), so shorter batches are right-padded with the pad token up to `input_len` here, as
the original pads every sequence to the dataset's longest. One difference: two classes use a
two-logit softmax instead of one sigmoid logit, so one loss serves every class count.
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


class GenomicBenchmarksCNN(nnx.Module):
    def __init__(self, vocab_size: int, num_classes: int, input_len: int, pad_id: int, *, rngs: nnx.Rngs):
        self.input_len = input_len
        self.pad_id = pad_id
        self.embed = nnx.Embed(vocab_size, EMBEDDING_DIM, rngs=rngs)
        in_channels = (EMBEDDING_DIM,) + CONV_CHANNELS[:-1]
        self.convs = nnx.List(
            [nnx.Conv(c_in, c_out, KERNEL_SIZE, padding="VALID", rngs=rngs) for c_in, c_out in zip(in_channels, CONV_CHANNELS)]
        )
        # PyTorch's BatchNorm1d defaults: running-average momentum 0.1, eps 1e-5.
        self.norms = nnx.List([nnx.BatchNorm(c, momentum=0.9, epsilon=1e-5, rngs=rngs) for c in CONV_CHANNELS])
        self.dense = nnx.Linear(flattened_size(input_len), DENSE_DIM, rngs=rngs)
        self.output = nnx.Linear(DENSE_DIM, num_classes, rngs=rngs)

    def __call__(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
        del segment_ids_BxL  # the baseline sees padding, as in the original
        if tokens_BxL.shape[1] > self.input_len:
            raise ValueError(f"batch length {tokens_BxL.shape[1]} exceeds the CNN's input_len {self.input_len}")
        tokens_BxL = jnp.pad(tokens_BxL, ((0, 0), (0, self.input_len - tokens_BxL.shape[1])), constant_values=self.pad_id)
        x_BxLxC = self.embed(tokens_BxL)
        for layer, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            x_BxLxC = norm(conv(x_BxLxC))
            if layer == 0:
                x_BxLxC = jax.nn.relu(x_BxLxC)
            x_BxLxC = nnx.max_pool(x_BxLxC, window_shape=(2,), strides=(2,))
        # Flatten channel-major like torch's [B, C, L] flatten, so a ported checkpoint would line up.
        x_BxF = jnp.swapaxes(x_BxLxC, 1, 2).reshape(x_BxLxC.shape[0], -1)
        return self.output(self.dense(x_BxF))
