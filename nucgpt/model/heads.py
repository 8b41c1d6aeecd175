"""Classification on the transformer trunk: pooling over non-pad positions and the published head.

The published head reads the final hidden state of the last non-pad token (the only position a
causal model has seen the whole sequence from), then Dense d→d → GeLU → Dense d→classes. Mean
pooling over non-pad positions is the alternative. Padding (segment id 0) never reaches either.
"""

import jax
import jax.numpy as jnp
from flax import nnx

POOLINGS = ("last", "mean")


def last_token_pool(hidden_BxLxD: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
    """Hidden state at each row's last non-pad position (position 0 for an all-pad filler row)."""
    positions_BxL = jnp.arange(segment_ids_BxL.shape[1])[None, :]
    last_B = jnp.max(jnp.where(segment_ids_BxL > 0, positions_BxL, 0), axis=1)
    return jnp.take_along_axis(hidden_BxLxD, last_B[:, None, None], axis=1)[:, 0, :]


def mean_pool(hidden_BxLxD: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
    """Mean of hidden states over non-pad positions (zeros for an all-pad filler row)."""
    mask_BxLx1 = (segment_ids_BxL > 0)[..., None].astype(jnp.float32)
    total_BxD = jnp.sum(jnp.where(mask_BxLx1 > 0, hidden_BxLxD.astype(jnp.float32), 0.0), axis=1)
    return total_BxD / jnp.maximum(jnp.sum(mask_BxLx1, axis=1), 1.0)


def pool(hidden_BxLxD: jax.Array, segment_ids_BxL: jax.Array, pooling: str) -> jax.Array:
    if pooling == "last":
        return last_token_pool(hidden_BxLxD, segment_ids_BxL)
    if pooling == "mean":
        return mean_pool(hidden_BxLxD, segment_ids_BxL)
    raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")


class ClassificationHead(nnx.Module):
    """Dense d→d → GeLU → Dense d→classes on a pooled hidden state, in float32."""

    def __init__(self, d_model: int, num_classes: int, *, init_std: float, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(init_std)
        self.hidden = nnx.Linear(
            d_model, d_model, kernel_init=init, kernel_metadata={"logical_axes": ("embed", None)}, rngs=rngs
        )
        self.output = nnx.Linear(
            d_model, num_classes, kernel_init=init, kernel_metadata={"logical_axes": ("embed", "classes")}, rngs=rngs
        )

    def __call__(self, pooled_BxD: jax.Array) -> jax.Array:
        return self.output(jax.nn.gelu(self.hidden(pooled_BxD.astype(jnp.float32))))


class TransformerClassifier(nnx.Module):
    """A transformer trunk (pretrained or fresh) with a classification head on its pooled output.

    `freeze_trunk` stops gradients at the trunk's output, so the backward pass skips the trunk; the
    classify task also keeps the optimizer (and its weight decay) off the trunk's parameters.
    """

    def __init__(self, trunk: nnx.Module, d_model: int, num_classes: int, *, pooling: str, freeze_trunk: bool,
                 init_std: float, rngs: nnx.Rngs):
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.trunk = trunk
        self.head = ClassificationHead(d_model, num_classes, init_std=init_std, rngs=rngs)
        self.pooling = pooling
        self.freeze_trunk = freeze_trunk

    def __call__(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
        hidden_BxLxD = self.trunk.trunk(tokens_BxL, segment_ids_BxL)
        if self.freeze_trunk:
            hidden_BxLxD = jax.lax.stop_gradient(hidden_BxLxD)
        return self.head(pool(hidden_BxLxD, segment_ids_BxL, self.pooling))

