"""A TopK sparse autoencoder over residual-stream activations (Gao et al. 2024), in pure JAX + optax.

    x̃ = s·x (one scalar s, so that E‖x̃‖² = d_model at any layer and one learning rate fits all)
    codes = ReLU(TopK_k((x̃ − b_dec) W_enc + b_enc))        x̂ = codes W_dec + b_dec

Keeping the k largest pre-activations fixes L0 = k with no L1 penalty to shrink the codes. Decoder
rows are unit norm (the gradient's radial part is removed, then rows are renormalised after each
update), so a latent's size lives in its code and codes compare across latents. A latent that has
not fired for `dead_tokens` tokens is dead; the AuxK loss (coefficient 1/32) asks the `aux_k`
largest dead latents to reconstruct what the live ones missed, which brings them back.
Losses and statistics take a token mask: padding and N positions carry no weight in them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

Params = dict[str, jax.Array]  # W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D]
State = dict[str, Any]  # params, opt_state, scale, tokens_since_fired_F, step


@dataclasses.dataclass(frozen=True)
class SaeConfig:
    """Hashable, so a jitted step takes it as a static argument."""

    latents: int
    k: int
    aux_k: int = 256  # dead latents the AuxK loss may use; 0 turns AuxK off
    aux_coef: float = 1 / 32
    dead_tokens: int = 1_000_000  # a latent silent for this many tokens is dead
    learning_rate: float = 2e-4


def optimizer(cfg: SaeConfig) -> optax.GradientTransformation:
    return optax.adam(cfg.learning_rate)


def _count(mask_N: jax.Array) -> jax.Array:
    return jnp.maximum(jnp.sum(mask_N), 1.0)


def input_scale(x_NxD: jax.Array, mask_N: jax.Array) -> jax.Array:
    """The scalar s with mean ‖s·x‖² = D over the masked tokens."""
    squared_N = jnp.sum(jnp.square(x_NxD.astype(jnp.float32)), axis=-1)
    return jnp.sqrt(x_NxD.shape[-1] * _count(mask_N) / jnp.maximum(jnp.sum(mask_N * squared_N), 1e-30))


def _unit_rows(w_FxD: jax.Array) -> jax.Array:
    return w_FxD / jnp.maximum(jnp.linalg.norm(w_FxD, axis=-1, keepdims=True), 1e-8)


def init_params(key: jax.Array, x_NxD: jax.Array, mask_N: jax.Array, latents: int) -> Params:
    """Random unit decoder rows, encoder = decoderᵀ, b_dec = the mean (normalised) activation."""
    w_dec_FxD = _unit_rows(jax.random.normal(key, (latents, x_NxD.shape[-1]), jnp.float32))
    b_dec_D = jnp.sum(mask_N[:, None] * x_NxD, axis=0) / _count(mask_N)
    return {"W_enc": w_dec_FxD.T, "b_enc": jnp.zeros(latents, jnp.float32), "W_dec": w_dec_FxD, "b_dec": b_dec_D}


def pre_activations(params: Params, x_NxD: jax.Array) -> jax.Array:
    return (x_NxD - params["b_dec"]) @ params["W_enc"] + params["b_enc"]


def top_k_codes(pre_NxF: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(ReLU'd values, latent indices), each [N, k]: the sparse form of the codes."""
    values_NxK, indices_NxK = jax.lax.top_k(pre_NxF, k)
    return jax.nn.relu(values_NxK), indices_NxK


def dense_codes(values_NxK: jax.Array, indices_NxK: jax.Array, latents: int) -> jax.Array:
    rows_Nx1 = jnp.arange(values_NxK.shape[0])[:, None]
    return jnp.zeros((values_NxK.shape[0], latents), values_NxK.dtype).at[rows_Nx1, indices_NxK].set(values_NxK)


def decode(params: Params, codes_NxF: jax.Array) -> jax.Array:
    return codes_NxF @ params["W_dec"] + params["b_dec"]


def encode(params: Params, x_NxD: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """Sparse codes (values, indices) of normalised activations."""
    return top_k_codes(pre_activations(params, x_NxD), k)


def reconstruct(params: Params, x_NxD: jax.Array, k: int) -> jax.Array:
    """x̂ of normalised activations."""
    values_NxK, indices_NxK = encode(params, x_NxD, k)
    return decode(params, dense_codes(values_NxK, indices_NxK, params["W_dec"].shape[0]))


def variance_sums(params: Params, x_NxD: jax.Array, x_hat_NxD: jax.Array, mask_N: jax.Array) -> dict[str, jax.Array]:
    """Sums that add across batches into the fraction of variance unexplained (`fvu`).

    Deviations are taken from b_dec, a point near the mean, so Σ‖x−c‖² − n‖x̄−c‖² loses no precision.
    """
    deviation_NxD = (x_NxD - params["b_dec"]) * mask_N[:, None]
    return {
        "squared_error": jnp.sum(mask_N * jnp.sum(jnp.square(x_NxD - x_hat_NxD), axis=-1)),
        "deviation_sum_D": jnp.sum(deviation_NxD, axis=0),
        "deviation_squares": jnp.sum(jnp.square(deviation_NxD)),
        "tokens": jnp.sum(mask_N),
    }


def fvu(sums: dict[str, Any]) -> Any:
    """‖x − x̂‖² / ‖x − x̄‖² summed over tokens: 0 is perfect, 1 is no better than the mean."""
    total = sums["deviation_squares"] - jnp.sum(jnp.square(sums["deviation_sum_D"])) / jnp.maximum(sums["tokens"], 1.0)
    return sums["squared_error"] / total


def _loss(params: Params, x_NxD: jax.Array, mask_N: jax.Array, dead_F: jax.Array, cfg: SaeConfig):
    pre_NxF = pre_activations(params, x_NxD)
    values_NxK, indices_NxK = top_k_codes(pre_NxF, cfg.k)
    x_hat_NxD = decode(params, dense_codes(values_NxK, indices_NxK, cfg.latents))
    error_NxD = x_NxD - x_hat_NxD
    mse = jnp.sum(mask_N * jnp.sum(jnp.square(error_NxD), axis=-1)) / (_count(mask_N) * x_NxD.shape[-1])
    loss, aux = mse, jnp.zeros(())
    if cfg.aux_k:
        # The largest dead latents reconstruct the residual error; decoder without bias (Gao et al. §A.2).
        dead_pre_NxF = jnp.where(dead_F[None, :], pre_NxF, -jnp.inf)
        aux_values_NxA, aux_indices_NxA = jax.lax.top_k(dead_pre_NxF, min(cfg.aux_k, cfg.latents))
        aux_values_NxA = jnp.where(jnp.isfinite(aux_values_NxA), jax.nn.relu(aux_values_NxA), 0.0)
        error_hat_NxD = dense_codes(aux_values_NxA, aux_indices_NxA, cfg.latents) @ params["W_dec"]
        target_NxD = jax.lax.stop_gradient(error_NxD)
        aux = jnp.sum(mask_N * jnp.sum(jnp.square(target_NxD - error_hat_NxD), axis=-1)) / jnp.maximum(
            jnp.sum(mask_N * jnp.sum(jnp.square(target_NxD), axis=-1)), 1e-30
        )
        aux = jnp.where(jnp.any(dead_F), aux, 0.0)  # no dead latent: no AuxK term (reported as 0)
        loss = loss + cfg.aux_coef * aux
    fired_F = jnp.zeros(cfg.latents, bool).at[indices_NxK].max((values_NxK > 0) & (mask_N[:, None] > 0))
    stats = variance_sums(params, x_NxD, jax.lax.stop_gradient(x_hat_NxD), mask_N)
    return loss, {"mse": mse, "aux_loss": aux, "fired_F": fired_F, "sums": stats}


@functools.partial(jax.jit, static_argnums=0)
def init_state(cfg: SaeConfig, key: jax.Array, x_NxD: jax.Array, mask_N: jax.Array) -> State:
    """The input scale and b_dec from a first batch of raw activations, fresh optimizer state.

    Jitted: its arrays come out placed like a train step's, so the step compiles once, not twice."""
    mask_N = mask_N.astype(jnp.float32)
    scale = input_scale(x_NxD, mask_N)
    params = init_params(key, x_NxD.astype(jnp.float32) * scale, mask_N, cfg.latents)
    return {
        "params": params,
        "opt_state": optimizer(cfg).init(params),
        "scale": scale,
        "tokens_since_fired_F": jnp.zeros(cfg.latents, jnp.int32),
        "step": jnp.zeros((), jnp.int32),
    }


def train_step(cfg: SaeConfig, state: State, x_NxD: jax.Array, mask_N: jax.Array) -> tuple[State, dict[str, jax.Array]]:
    """One Adam step on raw activations (normalised here); jit with `cfg` static and `state` donated."""
    mask_N = mask_N.astype(jnp.float32)
    x_NxD = x_NxD.astype(jnp.float32) * state["scale"]
    params = state["params"]
    dead_F = state["tokens_since_fired_F"] >= cfg.dead_tokens
    grads, aux = jax.grad(_loss, has_aux=True)(params, x_NxD, mask_N, dead_F, cfg)
    w_dec_FxD = params["W_dec"]
    grads["W_dec"] = grads["W_dec"] - jnp.sum(grads["W_dec"] * w_dec_FxD, axis=-1, keepdims=True) * w_dec_FxD
    updates, opt_state = optimizer(cfg).update(grads, state["opt_state"], params)
    params = optax.apply_updates(params, updates)
    params["W_dec"] = _unit_rows(params["W_dec"])
    tokens = jnp.sum(mask_N).astype(jnp.int32)
    since_F = jnp.where(aux["fired_F"], 0, jnp.minimum(state["tokens_since_fired_F"] + tokens, cfg.dead_tokens))
    metrics = {
        "mse": aux["mse"],
        "aux_loss": aux["aux_loss"],
        "fvu": fvu(aux["sums"]),
        "dead_fraction": jnp.mean(since_F >= cfg.dead_tokens),
    }
    new_state = {"params": params, "opt_state": opt_state, "scale": state["scale"], "tokens_since_fired_F": since_F,
                 "step": state["step"] + 1}
    return new_state, metrics
