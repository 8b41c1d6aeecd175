"""Attention backends: splash (Pallas interpret mode on CPU) and xla agree, forward and gradients."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from configs.pretrain import FSDP_RULES
from nucgpt import sharding
from nucgpt.errors import UserError
from nucgpt.model import Transformer, attention
from test_model import max_relative_error, tiny_cfg
from test_sharding import mesh_cfg


def qkv(batch=2, length=256, heads=4, kv_heads=2, head_dim=64, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (batch, length, heads, head_dim)) * head_dim**-0.5
    k = jax.random.normal(kk, (batch, length, kv_heads, head_dim))
    v = jax.random.normal(kv, (batch, length, kv_heads, head_dim))
    return q, k, v


def test_auto_picks_by_platform_and_unknown_is_an_error():
    assert attention.resolve_backend("auto", "tpu") == "splash"
    assert attention.resolve_backend("auto", "gpu") == "cudnn"
    assert attention.resolve_backend("auto", "cpu") == "xla"
    assert attention.resolve_backend("cudnn", "cpu") == "cudnn"
    with pytest.raises(UserError, match="model.attention='flash'"):
        attention.resolve_backend("flash")


@pytest.mark.parametrize(
    "backend, seq_len, head_dim, block, message",
    [
        ("splash", 200, 64, 128, "divides the sequence length 200"),
        ("splash", 256, 64, 64, "multiple of 128"),
        ("cudnn", 256, 12, 128, "head_dim 12 must be a multiple of 8"),
    ],
)
def test_unsupported_shapes_are_user_errors(backend, seq_len, head_dim, block, message):
    with pytest.raises(UserError, match=message):
        attention.check_shapes(backend, seq_len, head_dim, block, block)


def test_short_sequences_shrink_the_splash_block():
    attention.check_shapes("splash", 256, 64, 512, 512)


def test_auto_falls_back_to_xla_where_the_kernel_cannot_run():
    assert attention.select_backend("auto", 1024, 128, 512, 512, "tpu") == "splash"
    assert attention.select_backend("auto", 64, 128, 512, 512, "tpu") == "xla"
    assert attention.select_backend("auto", 1024, 12, 512, 512, "gpu") == "xla"
    assert attention.select_backend("auto", 1024, 128, 512, 512, "gpu", compute_dtype="bfloat16") == "cudnn"
    assert attention.select_backend("auto", 1024, 128, 512, 512, "gpu", compute_dtype="float32") == "xla"  # 16-bit only
    assert attention.select_backend("cudnn", 1024, 128, 512, 512, "gpu", compute_dtype="float32") == "cudnn"
    with pytest.raises(UserError, match="splash attention"):
        attention.select_backend("splash", 64, 128, 512, 512, "tpu")


def test_xla_grouped_query_matches_repeated_kv_heads():
    """GQA convention: query head h reads kv head h // group, as HF `repeat_kv` lays them out."""
    q, k, v = qkv(length=32, heads=4, kv_heads=2)
    xla = jax.jit(lambda q, k, v: attention.attend(q, k, v, None, backend="xla"))
    repeated = xla(q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2))
    np.testing.assert_allclose(xla(q, k, v), repeated, rtol=1e-6, atol=1e-6)


def test_xla_is_causal_and_respects_segments():
    q, k, v = qkv(batch=1, length=16, heads=2, kv_heads=2)
    segment_ids = jnp.array([[1] * 8 + [2] * 8])
    xla = jax.jit(lambda k, v: attention.attend(q, k, v, segment_ids, backend="xla"))
    out = xla(k, v)
    future_changed = xla(k.at[:, 12:].add(1.0), v.at[:, 12:].add(1.0))
    other_segment_changed = xla(k.at[:, :8].add(1.0), v.at[:, :8].add(1.0))
    np.testing.assert_array_equal(out[:, :12], future_changed[:, :12])
    np.testing.assert_array_equal(out[:, 8:], other_segment_changed[:, 8:])
    assert not np.allclose(out[:, 12:], future_changed[:, 12:])


def _loss(backend, q, k, v, segment_ids, real):
    out = attention.attend(q, k, v, segment_ids, backend=backend, block_q=128, block_kv=128)
    return jnp.sum(jnp.where(real[:, :, None, None], out, 0.0) ** 2), out


@pytest.mark.parametrize("kv_heads, mesh_shape", [(4, None), (2, (1, 2, 2))])
def test_splash_matches_xla_forward_and_gradients(kv_heads, mesh_shape):
    """Two packed segments then padding; on a mesh the kernel runs under shard_map per batch/head shard."""
    q, k, v = qkv(kv_heads=kv_heads)
    segment_ids = jnp.array([[1] * 100 + [2] * 100 + [0] * 56, [1] * 256])
    real = segment_ids > 0
    grad = lambda backend: jax.jit(jax.value_and_grad(
        lambda q, k, v: _loss(backend, q, k, v, segment_ids, real), argnums=(0, 1, 2), has_aux=True))
    (_, expected), expected_grads = grad("xla")(q, k, v)
    if mesh_shape is None:
        (_, out), grads = grad("splash")(q, k, v)
    else:
        with sharding.use_mesh(sharding.make_mesh(mesh_cfg(*mesh_shape), jax.devices()[:4]), FSDP_RULES):
            (_, out), grads = grad("splash")(q, k, v)
    np.testing.assert_allclose(np.where(real[:, :, None, None], out, 0), np.where(real[:, :, None, None], expected, 0),
                               rtol=1e-5, atol=1e-5)
    assert max_relative_error(grads, expected_grads) < 1e-4


def test_model_logits_agree_between_splash_and_xla():
    tokens = jax.random.randint(jax.random.key(0), (2, 128), 0, 6)
    logits = {}
    for backend in ("xla", "splash"):
        model = Transformer(tiny_cfg(attention=backend, splash_block_q=128, splash_block_kv=128), rngs=nnx.Rngs(0))
        logits[backend] = nnx.jit(lambda m, t: m(t))(model, tokens)
    assert max_relative_error(logits["splash"], logits["xla"]) < 1e-5


def test_splash_rejects_kv_heads_the_tensor_axis_cannot_split():
    q, k, v = qkv(kv_heads=2)
    splash = jax.jit(lambda q, k, v: attention.attend(q, k, v, None, backend="splash", block_q=128, block_kv=128))
    with sharding.use_mesh(sharding.make_mesh(mesh_cfg(1, 2, 4)), FSDP_RULES):
        with pytest.raises(UserError, match="num_kv_heads is divisible by the tensor parallelism"):
            splash(q, k, v)


@pytest.mark.parametrize("policy, keeps_statistics", [("save_matmuls", True), ("save_projections_and_mlp", False)])
def test_save_matmuls_keeps_the_splash_forward_residuals(policy, keeps_statistics):
    """Only then does the backward pass skip rerunning the kernel's forward: its softmax statistics
    (logsumexp, [layers=1, batch=1, heads=4, length=128]) are among the saved residuals."""
    cfg = tiny_cfg(num_layers=1, attention="splash", splash_block_q=128, splash_block_kv=128, remat_policy=policy)
    graphdef, state = nnx.split(Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens = jnp.zeros((1, 128), jnp.int32)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_saved_residuals(lambda state: jnp.sum(nnx.merge(graphdef, state)(tokens)), state)
    assert ("f32[1,1,4,128] " in printed.getvalue()) == keeps_statistics
