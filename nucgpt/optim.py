"""AdamW with linear warmup + cosine decay and global-norm clipping; no decay on norms/embeddings.

Gradient accumulation lives in the train step (one optimizer update per train step), not here.
"""

from typing import Any, Callable

import jax
import optax
from ml_collections import ConfigDict

EMBEDDING_NAMES = frozenset({"embed", "embedding", "embedder", "token_embed", "tok_embeddings", "wte", "position_embed"})


def learning_rate_schedule(optim: ConfigDict, steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.learning_rate,
        warmup_steps=optim.warmup_steps,
        decay_steps=max(steps, optim.warmup_steps + 1),
        end_value=optim.final_learning_rate,
    )


def decay_mask(params: Any, decay_norms_and_embeddings: bool) -> Any:
    """True where weight decay applies: weight matrices, not norm scales, biases or the input embedding.

    Decided by name (a stacked layer axis makes a norm scale 2-D, so rank alone cannot tell), and
    works on abstract params too. The output projection (`unembedding`) is a matrix and is decayed.
    """
    if decay_norms_and_embeddings:
        return jax.tree.map(lambda _: True, params)

    def is_decayed(path, x) -> bool:
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        exempt = any("norm" in n or "bias" in n or n in EMBEDDING_NAMES for n in names)
        return x.ndim >= 2 and not exempt

    return jax.tree_util.tree_map_with_path(is_decayed, params)


def path_names(path) -> tuple[str, ...]:
    """A tree path as plain names: ('trunk', 'blocks', '0', 'wq')."""
    return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def make_optimizer(
    optim: ConfigDict, steps: int, trainable: Callable[[tuple[str, ...]], bool] | None = None
) -> optax.GradientTransformation:
    """AdamW as configured; with `trainable(path names) -> bool`, parameters it rejects are frozen:
    their update is exactly zero (weight decay included) and they get no Adam moments."""
    schedule = learning_rate_schedule(optim, steps)
    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip_norm) if optim.clip_norm > 0 else optax.identity(),
        optax.adamw(
            learning_rate=schedule,
            b1=optim.b1,
            b2=optim.b2,
            eps=optim.eps,
            weight_decay=optim.weight_decay,
            mask=lambda params: decay_mask(params, optim.decay_norms_and_embeddings),
        ),
    )
    if trainable is None:
        return tx
    # Decided per path, so it also answers for optax's whole-tree placeholder (empty path: trainable).
    trained = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: trainable(path_names(path)), params)
    frozen = lambda params: jax.tree_util.tree_map_with_path(lambda path, _: not trainable(path_names(path)), params)
    return optax.chain(optax.masked(tx, trained), optax.masked(optax.set_to_zero(), frozen))
