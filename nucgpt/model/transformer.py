"""Nucleotide GPT: a LLaMA-style decoder (RoPE, RMSNorm, GQA) with sandwich or pre norms, in Flax NNX.

The published model: 12 layers, d_model 2048, 8 query + 8 KV heads of 128, GeLU MLP 8192, RMSNorm
before and after each sub-block, a final RMSNorm, untied output, vocab 6 → 503,441,408 parameters.
Parameters are float32; matmuls run in `compute_dtype`; norms, softmax and logits in float32.
Layers are stacked on a leading "layers" dimension and run by `jax.lax.scan` (`scan_layers`), or
kept as a list and unrolled; `remat_policy` picks what the backward pass recomputes. Rotary
positions count from the start of each row: padding (segment id 0) sits at the end of a row.

Generation runs the same blocks with a KV cache: `prefill` the prompt, then one `decode_step` per
token; both share the training path's projections, RoPE, norms and MLP, so cached logits are the
full forward pass's. Decoding runs the layers unrolled (scanned weights sliced per layer) over a
per-layer cache that each step updates in place.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.custom_derivatives import SymbolicZero

from nucgpt.errors import UserError
from nucgpt.model import attention, norm_join, norm_kernel
from nucgpt.sharding import constrain

# Named tensors in a block; policies below save some of them instead of recomputing them.
# "attention_residuals" are a flash kernel's own forward outputs (output and softmax statistics):
# splash names them; cuDNN's live inside `jax.nn.dot_product_attention`, matched by primitive.
_SAVE = jax.checkpoint_policies.save_only_these_names
_MATMULS = ("query", "key", "value", "attention_proj", "mlp_hidden", "mlp_out")


def _saves_cudnn_attention(prim, *_, **__) -> bool:
    return prim.name == "dot_product_attention_fwd_wrapper"


REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attention_out": _SAVE("attention_out"),
    "save_qkv_attention_out": _SAVE("query", "key", "value", "attention_out"),
    "save_projections": _SAVE("query", "key", "value", "attention_out", "attention_proj", "mlp_out"),
    "save_projections_and_mlp": _SAVE(*_MATMULS, "attention_out"),
    # Every matmul output plus the flash kernel's residuals: the backward reruns no matmul and no
    # attention forward, only elementwise work.
    "save_matmuls": jax.checkpoint_policies.save_from_both_policies(
        _SAVE(*_MATMULS, attention.RESIDUALS_NAME), _saves_cudnn_attention
    ),
}
MLP_ACTIVATIONS = ("gelu", "swiglu")
EMBEDDING_LOOKUPS = ("auto", "gather", "one_hot")
NORM_BACKWARDS = ("recompute", "saved_rsqrt", "pallas")
ONE_HOT_MAX_VOCAB = 512  # `auto` embeds by one-hot matmul up to this vocabulary (nucleotides: 6)
NORM_PLACEMENTS = ("pre", "sandwich")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """One clear error per bad model field, before any array is built."""
    for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
        if int(cfg[name]) < 1:
            raise UserError(f"model.{name}={cfg[name]} must be a positive integer")
    if cfg.num_heads % cfg.num_kv_heads:
        raise UserError(f"model.num_heads={cfg.num_heads} must be a multiple of model.num_kv_heads={cfg.num_kv_heads}")
    if cfg.get("fused_qkv", False) and cfg.num_kv_heads != cfg.num_heads:
        raise UserError(
            f"model.fused_qkv=True stacks the q, k and v weights: it needs model.num_kv_heads={cfg.num_kv_heads} "
            f"equal to model.num_heads={cfg.num_heads}"
        )
    if cfg.head_dim % 2:
        raise UserError(f"model.head_dim={cfg.head_dim} must be even for rotary embeddings")
    if cfg.mlp_activation not in MLP_ACTIVATIONS:
        raise UserError(f"model.mlp_activation={cfg.mlp_activation!r}; choose one of {', '.join(MLP_ACTIVATIONS)}")
    if cfg.norm_placement not in NORM_PLACEMENTS:
        raise UserError(f"model.norm_placement={cfg.norm_placement!r}; choose one of {', '.join(NORM_PLACEMENTS)}")
    if cfg.get("embedding_lookup", "auto") not in EMBEDDING_LOOKUPS:
        raise UserError(f"model.embedding_lookup={cfg.embedding_lookup!r}; choose one of {', '.join(EMBEDDING_LOOKUPS)}")
    if cfg.get("norm_backward", "recompute") not in NORM_BACKWARDS:
        raise UserError(f"model.norm_backward={cfg.norm_backward!r}; choose one of {', '.join(NORM_BACKWARDS)}")
    norm_kernel.parse_layout(cfg.get("norm_kernel_layout", "auto"))
    norm_kernel.parse_layout(cfg.get("join_kernel_layout", "auto"), field="model.join_kernel_layout")
    if cfg.get("join_norms", False) and cfg.norm_placement != "sandwich":
        raise UserError(
            f"model.join_norms=True joins each out-norm with the next pre-norm: it needs "
            f"model.norm_placement='sandwich', got {cfg.norm_placement!r}"
        )
    if cfg.remat_policy not in REMAT_POLICIES:
        raise UserError(f"model.remat_policy={cfg.remat_policy!r}; choose one of {', '.join(REMAT_POLICIES)}")
    for name in ("param_dtype", "compute_dtype"):
        if cfg[name] not in ("float32", "bfloat16", "float16"):
            raise UserError(f"model.{name}={cfg[name]!r}; choose float32, bfloat16 or float16")
    attention.resolve_backend(cfg.attention)


def _param(
    rngs: nnx.Rngs,
    cfg: ml_collections.ConfigDict,
    shape: tuple[int, ...],
    logical_axes: tuple[str, ...],
    num_stacked: int | None,
    ones: bool = False,
) -> nnx.Param:
    """A parameter with its logical axes; with `num_stacked`, one slice per layer on a leading axis."""
    if num_stacked is not None:
        shape, logical_axes = (num_stacked, *shape), ("layers", *logical_axes)
    dtype = jnp.dtype(cfg.param_dtype)
    value = jnp.ones(shape, dtype) if ones else cfg.init_std * jax.random.normal(rngs.params(), shape, dtype)
    return nnx.Param(value, logical_axes=logical_axes)


# Elementwise functions are rematerialised on their own: their float32 intermediates (4 per norm,
# 5 for GeLU-tanh) would otherwise stay alive for the backward pass, several times the size of
# their compute-dtype input, while recomputing them costs one fused elementwise pass.
@functools.partial(jax.checkpoint, static_argnums=(2,))
def _rms_norm_recomputed(x_BxLxD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    return _rms_norm_forward(x_BxLxD, scale_D, eps)[0]


# The same norm with a hand-written backward that keeps one float32 number per row (the rsqrt):
# the backward reads x and the incoming gradient once, and does not redo the forward's reduction.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _rms_norm_saved_rsqrt(x_BxLxD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    return _rms_norm_forward(x_BxLxD, scale_D, eps)[0]


def _rms_norm_forward(x_BxLxD, scale_D, eps):
    """The norm's output, and what the hand-written backward keeps: x, the scale, the per-row rsqrt."""
    x = x_BxLxD.astype(jnp.float32)
    rsqrt_BxLx1 = norm_kernel.row_rsqrt(x, eps)
    out = (x * rsqrt_BxLx1 * scale_D.astype(jnp.float32)).astype(x_BxLxD.dtype)
    return out, (x_BxLxD, scale_D, rsqrt_BxLx1)


def _rms_norm_backward(eps, saved, grad_BxLxD):
    """d/dx and d/ds from the saved rsqrt (`norm_kernel.backward_from_rsqrt`: r·g·s − x·r³·mean(g·s·x))."""
    del eps
    x_BxLxD, scale_D, rsqrt_BxLx1 = saved
    return norm_kernel.backward_from_rsqrt(x_BxLxD, grad_BxLxD, scale_D, rsqrt_BxLx1)


_rms_norm_saved_rsqrt.defvjp(_rms_norm_forward, _rms_norm_backward)


# The backward in one pass over x and the gradient (`norm_kernel`: a Triton kernel on GPUs, tiled by
# `layout`, model.norm_kernel_layout). The output is kept for the backward pass (nothing recomputes
# it). It also returns x itself, so that the gradient reaching x through the residual stream arrives
# in the same backward and the kernel adds it while it writes dx; where nothing reads that x (an
# out-norm, the final norm) its gradient is a symbolic zero and the kernel reads no residual.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm_pallas_and_input(x_BxLxD: jax.Array, scale_D: jax.Array, eps: float, layout: str) -> tuple[jax.Array, jax.Array]:
    return _rms_norm_forward(x_BxLxD, scale_D, eps)[0], x_BxLxD


def _rms_norm_pallas_and_input_forward(x_BxLxD, scale_D, eps, layout):
    x_BxLxD, scale_D = x_BxLxD.value, scale_D.value  # symbolic zeros: the arguments come wrapped
    return (_rms_norm_forward(x_BxLxD, scale_D, eps)[0], x_BxLxD), (x_BxLxD, scale_D)


def _rms_norm_pallas_and_input_backward(eps, layout, saved, grads):
    grad_out_BxLxD, grad_input_BxLxD = grads
    x_BxLxD, scale_D = saved
    if isinstance(grad_out_BxLxD, SymbolicZero):
        grad_out_BxLxD = jnp.zeros_like(x_BxLxD)
    residual_grad_BxLxD = None if isinstance(grad_input_BxLxD, SymbolicZero) else grad_input_BxLxD.astype(x_BxLxD.dtype)
    return norm_kernel.backward(x_BxLxD, grad_out_BxLxD, scale_D, residual_grad_BxLxD, eps, layout)


_rms_norm_pallas_and_input.defvjp(_rms_norm_pallas_and_input_forward, _rms_norm_pallas_and_input_backward, symbolic_zeros=True)


def _rms_norm_pallas(x_BxLxD: jax.Array, scale_D: jax.Array, eps: float, layout: str) -> jax.Array:
    return _rms_norm_pallas_and_input(x_BxLxD, scale_D, eps, layout)[0]


def rms_norm(
    x_BxLxD: jax.Array, scale_D: jax.Array, eps: float, backward: str = "recompute", kernel_layout: str = "auto"
) -> jax.Array:
    """RMSNorm in float32, returned in the input dtype. `backward` (model.norm_backward): how the
    gradient gets the forward's float32 values back — `recompute` them from x (jax.checkpoint),
    `saved_rsqrt`: keep the per-row rsqrt and differentiate by hand, or `pallas`: one fused pass
    (`norm_kernel`, tiled by `kernel_layout`; the output is kept, not recomputed). Same values;
    speed and memory only."""
    if backward == "pallas":
        return _rms_norm_pallas(x_BxLxD, scale_D, eps, kernel_layout)
    return {"recompute": _rms_norm_recomputed, "saved_rsqrt": _rms_norm_saved_rsqrt}[backward](x_BxLxD, scale_D, eps)


def configured_norm(cfg, x_BxLxD: jax.Array, scale_D: jax.Array) -> jax.Array:
    """`rms_norm` as the model config asks (model.norm_eps, norm_backward, norm_kernel_layout)."""
    return rms_norm(
        x_BxLxD, scale_D, cfg.norm_eps, cfg.get("norm_backward", "recompute"), cfg.get("norm_kernel_layout", "auto")
    )


def pre_norm(cfg, x_BxLxD: jax.Array, scale_D: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x normed, x) for a sublayer's input; with `pallas` the norm also passes x on, so that its
    backward adds the gradient coming down the residual stream in the same pass."""
    if cfg.get("norm_backward", "recompute") == "pallas":
        return _rms_norm_pallas_and_input(x_BxLxD, scale_D, cfg.norm_eps, cfg.get("norm_kernel_layout", "auto"))
    return configured_norm(cfg, x_BxLxD, scale_D), x_BxLxD


@jax.checkpoint
def _gelu(x: jax.Array) -> jax.Array:
    """GeLU with the tanh approximation, as the original JAX model (`jax.nn.gelu`'s default)."""
    return jax.nn.gelu(x, approximate=True)


def embed(table_VxD: jax.Array, tokens_BxL: jax.Array, lookup: str, compute_dtype) -> jax.Array:
    """Token rows of the table in `compute_dtype`, by gather or by a one-hot matmul.

    Same values either way (one non-zero term per output). They differ in the backward pass: the
    gather's transpose is a scatter-add of every token's gradient row into `vocab` rows — with a
    6-token vocabulary, millions of colliding atomic adds on a GPU — while the one-hot's is one
    small matmul [V, B·L] x [B·L, D]. Both run in the table's dtype at full precision, so the rows
    and the gradient's sums are the gather's. `auto`: one-hot up to ONE_HOT_MAX_VOCAB tokens, where
    its 2·B·L·V·D FLOPs are negligible.
    """
    vocab = table_VxD.shape[0]
    if lookup == "one_hot" or (lookup == "auto" and vocab <= ONE_HOT_MAX_VOCAB):
        one_hot_BxLxV = jax.nn.one_hot(tokens_BxL, vocab, dtype=table_VxD.dtype)
        rows_BxLxD = jnp.einsum("BLV,VD->BLD", one_hot_BxLxV, table_VxD, precision=jax.lax.Precision.HIGHEST)
        return rows_BxLxD.astype(compute_dtype)
    return jnp.take(table_VxD, tokens_BxL, axis=0).astype(compute_dtype)


def rope_tables(seq_len: int, head_dim: int, base: float, start: int | jax.Array = 0) -> tuple[jax.Array, jax.Array]:
    """sin and cos [L, head_dim/2] in float32 for positions start..start+L-1 (`start` may be traced:
    a decoding step's position), frequencies base^(-2i/head_dim) (LLaMA / HF)."""
    inv_freq_K = 1.0 / (base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    positions_L = jnp.arange(seq_len, dtype=jnp.float32) + jnp.asarray(start, jnp.float32)
    angles_LxK = positions_L[:, None] * inv_freq_K[None, :]
    return jnp.sin(angles_LxK), jnp.cos(angles_LxK)


def apply_rope(x_BxLxHxK: jax.Array, sin_LxK: jax.Array, cos_LxK: jax.Array) -> jax.Array:
    """Rotates the two halves of each head (HF `rotate_half`), so HF LLaMA checkpoints load as is."""
    x1, x2 = jnp.split(x_BxLxHxK.astype(jnp.float32), 2, axis=-1)
    sin, cos = sin_LxK[None, :, None, :], cos_LxK[None, :, None, :]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxHxK.dtype)


class LayerCache(NamedTuple):
    """One layer's rotated keys and values, [B, kv_heads, max_len, head_dim] in compute dtype: the
    layout the attention matmuls read without a transpose."""

    k: jax.Array
    v: jax.Array


Cache = list[LayerCache]  # one per layer, scanned or not: decoding runs the layers unrolled


def _attention_backend(cfg: ml_collections.ConfigDict, seq_len: int) -> str:
    """The backend `model.attention` runs at this length (`auto` falls back where its kernel cannot)."""
    return attention.select_backend(
        cfg.attention, seq_len, cfg.head_dim, cfg.get("splash_block_q", 512), cfg.get("splash_block_kv", 512),
        compute_dtype=cfg.get("compute_dtype"),
    )


class Block(nnx.Module):
    """Attention then MLP, each with RMSNorm before (and, for `sandwich`, after) and a residual add."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, num_stacked: int | None = None):
        self.cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: it is static graph data
        p = functools.partial(_param, rngs, cfg, num_stacked=num_stacked)
        d, h, g, k, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.mlp_dim
        self.attn_in_norm = p((d,), ("embed",), ones=True)
        self.wq = p((d, h, k), ("embed", "heads", "head_dim"))
        self.wk = p((d, g, k), ("embed", "kv_heads", "head_dim"))
        self.wv = p((d, g, k), ("embed", "kv_heads", "head_dim"))
        self.wo = p((h, k, d), ("heads", "head_dim", "embed"))
        self.mlp_in_norm = p((d,), ("embed",), ones=True)
        if cfg.mlp_activation == "swiglu":
            self.w_gate = p((d, f), ("embed", "mlp"))
        self.w_up = p((d, f), ("embed", "mlp"))
        self.w_down = p((f, d), ("mlp", "embed"))
        if cfg.norm_placement == "sandwich":
            self.attn_out_norm = p((d,), ("embed",), ones=True)
            self.mlp_out_norm = p((d,), ("embed",), ones=True)

    def _weight(self, param: nnx.Param) -> jax.Array:
        return param[...].astype(self.cfg.compute_dtype)

    def _sublayer(self, x_BxLxD, in_norm, out_norm, fn, has_aux: bool = False):
        """x + fn(norm(x)) (normed again for `sandwich`); with `has_aux`, fn returns (h, aux) and so
        does this (decoding's updated cache)."""
        normed_BxLxD, x_BxLxD = pre_norm(self.cfg, x_BxLxD, in_norm[...])
        out = fn(normed_BxLxD)
        h_BxLxD, aux = out if has_aux else (out, None)
        if self.cfg.norm_placement == "sandwich":
            h_BxLxD = configured_norm(self.cfg, h_BxLxD, out_norm[...])
        x_BxLxD = constrain(x_BxLxD + h_BxLxD, ("batch", "length", "embed"))
        return (x_BxLxD, aux) if has_aux else x_BxLxD

    def _qkv(self, x_BxLxD, sin_LxK, cos_LxK) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Rotated q scaled by 1/sqrt(head_dim), rotated k, and v: what training attends over is
        exactly what decoding caches."""
        cfg = self.cfg
        if cfg.get("fused_qkv", False):
            # One matmul over the three weights stacked on a new axis (heads keep their sharding): x is
            # read once, and the backward pass makes dx in one matmul instead of adding three.
            w_Dx3xHxK = jnp.stack([self._weight(self.wq), self._weight(self.wk), self._weight(self.wv)], axis=1)
            qkv_BxLx3xHxK = jnp.einsum("BLD,DTHK->BLTHK", x_BxLxD, w_Dx3xHxK)
            q_BxLxHxK = checkpoint_name(qkv_BxLx3xHxK[:, :, 0], "query")
            k_BxLxGxK = checkpoint_name(qkv_BxLx3xHxK[:, :, 1], "key")
            v_BxLxGxK = checkpoint_name(qkv_BxLx3xHxK[:, :, 2], "value")
        else:
            q_BxLxHxK = checkpoint_name(jnp.einsum("BLD,DHK->BLHK", x_BxLxD, self._weight(self.wq)), "query")
            k_BxLxGxK = checkpoint_name(jnp.einsum("BLD,DGK->BLGK", x_BxLxD, self._weight(self.wk)), "key")
            v_BxLxGxK = checkpoint_name(jnp.einsum("BLD,DGK->BLGK", x_BxLxD, self._weight(self.wv)), "value")
        q_BxLxHxK = apply_rope(q_BxLxHxK, sin_LxK, cos_LxK) * jnp.asarray(cfg.head_dim**-0.5, x_BxLxD.dtype)
        k_BxLxGxK = apply_rope(k_BxLxGxK, sin_LxK, cos_LxK)
        q_BxLxHxK = constrain(q_BxLxHxK, ("batch", "length", "heads", "head_dim"))
        k_BxLxGxK = constrain(k_BxLxGxK, ("batch", "length", "kv_heads", "head_dim"))
        v_BxLxGxK = constrain(v_BxLxGxK, ("batch", "length", "kv_heads", "head_dim"))
        return q_BxLxHxK, k_BxLxGxK, v_BxLxGxK

    def _attend(self, q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, backend: str) -> jax.Array:
        return attention.attend(
            q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL,
            backend=backend,
            block_q=self.cfg.get("splash_block_q", 512),
            block_kv=self.cfg.get("splash_block_kv", 512),
        )

    def _project_out(self, out_BxLxHxK, dtype) -> jax.Array:
        out_BxLxHxK = checkpoint_name(out_BxLxHxK.astype(dtype), "attention_out")
        out_BxLxD = jnp.einsum("BLHK,HKD->BLD", out_BxLxHxK, self._weight(self.wo))
        return checkpoint_name(out_BxLxD, "attention_proj")

    def attention(self, x_BxLxD, segment_ids_BxL, sin_LxK, cos_LxK, backend: str) -> jax.Array:
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self._qkv(x_BxLxD, sin_LxK, cos_LxK)
        out_BxLxHxK = self._attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, backend)
        return self._project_out(out_BxLxHxK, x_BxLxD.dtype)

    def _cached_attention(self, x_BxLxD, sin_LxK, cos_LxK, position, cache: LayerCache, backend: str | None):
        """Attention for tokens at `position`..: their k and v are written into the cache first.
        `backend` None attends to the cache (decoding); a backend means the tokens are the whole
        prefix (prefill, position 0) and attend to themselves, as in training."""
        q_BxLxHxK, k_BxLxGxK, v_BxLxGxK = self._qkv(x_BxLxD, sin_LxK, cos_LxK)
        write = lambda full_BxGxMxK, new_BxLxGxK: jax.lax.dynamic_update_slice(
            full_BxGxMxK, new_BxLxGxK.transpose(0, 2, 1, 3).astype(full_BxGxMxK.dtype), (0, 0, position, 0)
        )
        cache = LayerCache(write(cache.k, k_BxLxGxK), write(cache.v, v_BxLxGxK))
        if backend is None:
            out_BxLxHxK = attention.attend_cache(q_BxLxHxK, cache.k, cache.v, position)
        else:
            out_BxLxHxK = self._attend(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, None, backend)
        return self._project_out(out_BxLxHxK, x_BxLxD.dtype), cache

    def cached(self, x_BxLxD, sin_LxK, cos_LxK, position, cache: LayerCache, backend: str | None) -> tuple[jax.Array, LayerCache]:
        """The block for tokens at `position`.. with this layer's KV cache (see `_cached_attention`)."""
        attend = functools.partial(
            self._cached_attention, sin_LxK=sin_LxK, cos_LxK=cos_LxK, position=position, cache=cache, backend=backend
        )
        x_BxLxD, cache = self._sublayer(x_BxLxD, self.attn_in_norm, getattr(self, "attn_out_norm", None), attend, has_aux=True)
        return self._sublayer(x_BxLxD, self.mlp_in_norm, getattr(self, "mlp_out_norm", None), self.mlp), cache

    def mlp(self, x_BxLxD) -> jax.Array:
        up_BxLxF = checkpoint_name(jnp.einsum("BLD,DF->BLF", x_BxLxD, self._weight(self.w_up)), "mlp_hidden")
        if self.cfg.mlp_activation == "swiglu":
            gate_BxLxF = jnp.einsum("BLD,DF->BLF", x_BxLxD, self._weight(self.w_gate))
            hidden_BxLxF = jax.nn.silu(checkpoint_name(gate_BxLxF, "mlp_hidden")) * up_BxLxF
        else:
            hidden_BxLxF = _gelu(up_BxLxF)
        hidden_BxLxF = constrain(hidden_BxLxF, ("batch", "length", "mlp"))
        return checkpoint_name(jnp.einsum("BLF,FD->BLD", hidden_BxLxF, self._weight(self.w_down)), "mlp_out")

    def __call__(self, x_BxLxD, segment_ids_BxL, sin_LxK, cos_LxK, backend: str) -> jax.Array:
        attend = functools.partial(
            self.attention, segment_ids_BxL=segment_ids_BxL, sin_LxK=sin_LxK, cos_LxK=cos_LxK, backend=backend
        )
        x_BxLxD = self._sublayer(x_BxLxD, self.attn_in_norm, getattr(self, "attn_out_norm", None), attend)
        return self._sublayer(x_BxLxD, self.mlp_in_norm, getattr(self, "mlp_out_norm", None), self.mlp)

    def joined(self, x_BxLxD, normed_BxLxD, next_scale_D, segment_ids_BxL, sin_LxK, cos_LxK, backend: str):
        """The block with joined norms (model.join_norms): takes x and its attention input (x normed),
        returns the next x and its norm by `next_scale_D` (the next block's attention in-norm, or the
        final norm): each out-norm, residual add and following norm is one `norm_join.join`."""
        cfg = self.cfg
        layout = cfg.get("join_kernel_layout", "auto")

        def join(x_BxLxD, h_BxLxD, scale_out_D, scale_next_D):
            x_BxLxD, normed_BxLxD = norm_join.join(x_BxLxD, h_BxLxD, scale_out_D, scale_next_D, cfg.norm_eps, layout)
            return constrain(x_BxLxD, ("batch", "length", "embed")), constrain(normed_BxLxD, ("batch", "length", "embed"))

        h_BxLxD = self.attention(normed_BxLxD, segment_ids_BxL, sin_LxK, cos_LxK, backend)
        x_BxLxD, normed_BxLxD = join(x_BxLxD, h_BxLxD, self.attn_out_norm[...], self.mlp_in_norm[...])
        return join(x_BxLxD, self.mlp(normed_BxLxD), self.mlp_out_norm[...], next_scale_D)


class Transformer(nnx.Module):
    """Token embedding → blocks → final RMSNorm (`trunk`) → output projection (`unembed`)."""

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        validate(cfg)
        self.cfg = cfg = ml_collections.FrozenConfigDict(cfg)
        p = functools.partial(_param, rngs, cfg, num_stacked=None)
        self.embedding = p((cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        if cfg.scan_layers:
            self.blocks = Block(cfg, rngs=rngs, num_stacked=cfg.num_layers)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.final_norm = p((cfg.d_model,), ("embed",), ones=True)
        if not cfg.tie_embeddings:
            self.unembedding = p((cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

    def _run_blocks(self, x_BxLxD, segment_ids_BxL, blocks: slice, next_scales=None):
        """Blocks `blocks` (all of them in training; a part to read or patch the residual stream). With
        `next_scales` (joined norms: `_joined_trunk`), x is the pair (x, x normed) and each block also
        takes the scale of the norm that follows it: a [layers, D] array if scanned, else a list."""
        cfg = self.cfg
        seq_len = jax.tree.leaves(x_BxLxD)[0].shape[1]  # x, or the pair (x, x normed)
        backend = _attention_backend(cfg, seq_len)
        sin_LxK, cos_LxK = rope_tables(seq_len, cfg.head_dim, cfg.rope_base)

        def layer_fn(graphdef: nnx.GraphDef) -> Callable:
            def apply(carry, block_state, next_scale_D):
                block = nnx.merge(graphdef, block_state)
                if next_scale_D is None:
                    return block(carry, segment_ids_BxL, sin_LxK, cos_LxK, backend)
                return block.joined(*carry, next_scale_D, segment_ids_BxL, sin_LxK, cos_LxK, backend)

            if cfg.remat_policy == "none":
                return apply
            return jax.checkpoint(apply, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)

        if cfg.scan_layers:
            graphdef, stacked_state = nnx.split(self.blocks)
            if blocks != slice(0, cfg.num_layers):
                stacked_state = jax.tree.map(lambda a: a[blocks], stacked_state)
            apply = layer_fn(graphdef)
            x_BxLxD, _ = jax.lax.scan(lambda x, layer: (apply(x, *layer), None), x_BxLxD, (stacked_state, next_scales))
            return x_BxLxD
        for i, block in enumerate(list(self.blocks)[blocks]):
            graphdef, block_state = nnx.split(block)
            x_BxLxD = layer_fn(graphdef)(x_BxLxD, block_state, None if next_scales is None else next_scales[i])
        return x_BxLxD

    def _joined_trunk(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array | None) -> jax.Array:
        """`trunk` with joined norms (model.join_norms): the first block's attention in-norm alone, then
        every out-norm joined with the norm after it (the last with the final norm)."""
        cfg, final_D = self.cfg, self.final_norm[...]
        if cfg.scan_layers:
            in_norms_NxD = self.blocks.attn_in_norm[...]
            first_D, next_scales = in_norms_NxD[0], jnp.concatenate([in_norms_NxD[1:], final_D[None]])
        else:
            in_norms = [block.attn_in_norm[...] for block in self.blocks]
            first_D, next_scales = in_norms[0], in_norms[1:] + [final_D]
        normed_BxLxD, x_BxLxD = pre_norm(cfg, x_BxLxD, first_D)
        _, normed_BxLxD = self._run_blocks((x_BxLxD, normed_BxLxD), segment_ids_BxL, slice(0, cfg.num_layers), next_scales)
        return normed_BxLxD

    def _check_block(self, after_block: int) -> None:
        if not 0 <= after_block <= self.cfg.num_layers:
            raise UserError(f"after_block={after_block}: choose 0 (the embeddings) to {self.cfg.num_layers} (the last block)")

    def residual_stream(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None, *, after_block: int) -> jax.Array:
        """The residual stream after the first `after_block` blocks (0: the embeddings), [B, L, d_model]
        in compute dtype: what interpretability reads (and `logits_from_residual` continues from)."""
        self._check_block(after_block)
        return self._run_blocks(self._embed(tokens_BxL), segment_ids_BxL, slice(0, after_block))

    def _embed(self, tokens_BxL: jax.Array) -> jax.Array:
        cfg = self.cfg
        # The lookup reads a whole table (small: vocab ≤ 4098), gathered like every FSDP weight.
        table_VxD = constrain(self.embedding[...], (None, None))
        x_BxLxD = embed(table_VxD, tokens_BxL, cfg.get("embedding_lookup", "auto"), cfg.compute_dtype)
        return constrain(x_BxLxD, ("batch", "length", "embed"))

    def logits_from_residual(self, x_BxLxD: jax.Array, segment_ids_BxL: jax.Array | None = None, *, after_block: int) -> jax.Array:
        """The rest of the forward pass from the residual stream after `after_block` blocks: float32
        logits. With an edited stream (e.g. a sparse autoencoder's reconstruction) it measures the edit."""
        self._check_block(after_block)
        x_BxLxD = self._run_blocks(x_BxLxD.astype(self.cfg.compute_dtype), segment_ids_BxL, slice(after_block, self.cfg.num_layers))
        return self.unembed(self._final_norm(x_BxLxD))

    def _final_norm(self, x_BxLxD: jax.Array) -> jax.Array:
        return configured_norm(self.cfg, x_BxLxD, self.final_norm[...])

    def trunk(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None) -> jax.Array:
        """Hidden states after the final norm, [B, L, d_model] in compute dtype; segment id 0 = padding."""
        if self.cfg.get("join_norms", False):
            return self._joined_trunk(self._embed(tokens_BxL), segment_ids_BxL)
        return self._final_norm(self.residual_stream(tokens_BxL, segment_ids_BxL, after_block=self.cfg.num_layers))

    def unembed(self, hidden_BxLxD: jax.Array) -> jax.Array:
        """float32 logits [B, L, vocab]: compute-dtype matmul with float32 accumulation."""
        weight_DxV = self.embedding[...].T if self.cfg.tie_embeddings else self.unembedding[...]
        logits_BxLxV = jnp.einsum(
            "BLD,DV->BLV", hidden_BxLxD, weight_DxV.astype(self.cfg.compute_dtype), preferred_element_type=jnp.float32
        )
        return constrain(logits_BxLxV, ("batch", "length", "vocab"))

    def __call__(self, tokens_BxL: jax.Array, segment_ids_BxL: jax.Array | None = None) -> jax.Array:
        return self.unembed(self.trunk(tokens_BxL, segment_ids_BxL))

    def init_cache(self, batch: int, max_len: int) -> Cache:
        """An empty KV cache for `max_len` positions (prompt and generated tokens) of `batch` rows."""
        cfg = self.cfg
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        return [LayerCache(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype)) for _ in range(cfg.num_layers)]

    def prefill(self, tokens_BxP: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """(float32 logits [B, vocab] of the prompt's last position, the cache holding the prompt):
        the prompt runs through the training attention backend in one pass."""
        return self._cached_forward(tokens_BxP, jnp.int32(0), cache, _attention_backend(self.cfg, tokens_BxP.shape[1]))

    def decode_step(self, token_Bx1: jax.Array, position: jax.Array, cache: Cache) -> tuple[jax.Array, Cache]:
        """(float32 logits [B, vocab] of the next token, the cache with `token_Bx1` at `position`): one
        token attends to the cache's positions up to its own."""
        return self._cached_forward(token_Bx1, position, cache, None)

    def _cached_forward(self, tokens_BxL, position, cache: Cache, backend: str | None) -> tuple[jax.Array, Cache]:
        cfg = self.cfg
        sin_LxK, cos_LxK = rope_tables(tokens_BxL.shape[1], cfg.head_dim, cfg.rope_base, start=position)
        x_BxLxD = self._embed(tokens_BxL)
        updated = []
        for block, layer_cache in zip(self._unstacked_blocks(), cache):
            x_BxLxD, layer_cache = block.cached(x_BxLxD, sin_LxK, cos_LxK, position, layer_cache, backend)
            updated.append(layer_cache)
        logits_Bx1xV = self.unembed(self._final_norm(x_BxLxD[:, -1:]))
        return logits_Bx1xV[:, 0], updated

    def _unstacked_blocks(self) -> list[Block]:
        """The blocks one by one; scanned ones sliced out of their stacked weights (static slices, so
        a decoding step reads each layer's weights and cache in place, with nothing copied)."""
        if not self.cfg.scan_layers:
            return list(self.blocks)
        graphdef, stacked_state = nnx.split(self.blocks)
        return [nnx.merge(graphdef, jax.tree.map(lambda a: a[i], stacked_state)) for i in range(self.cfg.num_layers)]
