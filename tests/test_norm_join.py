"""Joined sublayer norms (`model.join_norms`): the Pallas kernels, run in Pallas' interpreter on CPU,
against autodiff of the unjoined maths; the model with them (jnp on CPU, the kernels where
monkeypatched in) against the unjoined model; a sharded mesh."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs.pretrain import FSDP_RULES
from nucgpt import sharding
from nucgpt.errors import UserError
from nucgpt.model import Transformer, norm_join, norm_kernel
from nucgpt.model.transformer import _rms_norm_forward
from test_model import loss_and_grads, make_batch, max_relative_error, reference, tiny_cfg
from test_sharding import mesh_cfg

EPS = 1e-6
REPO = Path(__file__).resolve().parents[1]


def _unjoined(x, h, scale_out, scale_next):
    """The unjoined sublayer boundary, differentiated by JAX: x + norm_out(h), then norm_next of that."""
    x_next = x + _rms_norm_forward(h, scale_out, EPS)[0]
    return x_next, _rms_norm_forward(x_next, scale_next, EPS)[0]


def _inputs(rows, d_model, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    x = (3.0 * jax.random.normal(keys[0], (rows, d_model))).astype(dtype)
    h = (0.5 * jax.random.normal(keys[1], (rows, d_model))).astype(dtype)
    scale_out = 1.0 + 0.1 * jax.random.normal(keys[2], (d_model,))
    scale_next = 1.0 + 0.1 * jax.random.normal(keys[3], (d_model,))
    grad_normed = jax.random.normal(keys[4], (rows, d_model)).astype(dtype)
    grad_x_next = jax.random.normal(keys[5], (rows, d_model)).astype(dtype)
    return x, h, scale_out, scale_next, grad_normed, grad_x_next


@pytest.mark.parametrize("rows, d_model, dtype, layout", [
    (64, 32, jnp.float32, "auto"),
    (96, 64, jnp.float32, "auto"),  # 96 rows: bands of 32, three programs
    (2048, 128, jnp.float32, "4x8x4p"),  # each program's next tile loaded one step ahead
    (40, 64, jnp.bfloat16, "auto"),
    (64, 32, jnp.float32, "2x4x4"),  # no gradient through x' (the last join): zero, not read
])
def test_kernels_match_autodiff_of_the_unjoined_norms(rows, d_model, dtype, layout):
    x, h, scale_out, scale_next, grad_normed, grad_x_next = _inputs(rows, d_model, dtype)
    no_residual = layout == "2x4x4"
    layout = norm_kernel.parse_layout(layout)
    forward = norm_join.kernel_forward(x, h, scale_out, scale_next, EPS, interpret=True, layout=layout)
    assert [a.dtype for a in forward] == [dtype, dtype]
    # the forward rounds where the unjoined one does: equal up to float32 reduction order
    assert max_relative_error(forward, _unjoined(x, h, scale_out, scale_next)) < (1e-6 if dtype == jnp.float32 else 1e-2)

    backward = norm_join.kernel_backward(
        forward[0], h, grad_normed, None if no_residual else grad_x_next, scale_out, scale_next, EPS,
        interpret=True, layout=layout,
    )
    if no_residual:
        grad_x_next = jnp.zeros_like(grad_x_next)
    f32 = lambda a: a.astype(jnp.float32)
    _, vjp = jax.vjp(_unjoined, f32(x), f32(h), scale_out, scale_next)
    grad_x, grad_h, grad_scale_out, grad_scale_next = vjp((f32(grad_x_next), f32(grad_normed)))
    assert [a.dtype for a in backward] == [dtype, dtype, jnp.float32, jnp.float32]
    tolerance = 1e-5 if dtype == jnp.float32 else 2e-2
    assert max_relative_error(backward, (grad_x, grad_h, grad_scale_out, grad_scale_next)) < tolerance
    reference_backward = norm_join.reference_backward(
        forward[0], h, grad_normed, None if no_residual else grad_x_next, scale_out, scale_next, EPS
    )
    assert max_relative_error(backward, reference_backward) < (1e-6 if dtype == jnp.float32 else 1e-2)


def test_join_differentiates_like_the_unjoined_norms():
    """The custom VJP: jnp off CUDA, the same gradients as autodiff through the unjoined maths."""
    x, h, scale_out, scale_next, grad_normed, grad_x_next = _inputs(32, 64, jnp.float32)
    joined = jax.vjp(lambda *a: norm_join.join(*a, EPS), x, h, scale_out, scale_next)
    unjoined = jax.vjp(_unjoined, x, h, scale_out, scale_next)
    assert max_relative_error(joined[0], unjoined[0]) < 1e-6
    cotangents = (grad_x_next, grad_normed)
    assert max_relative_error(joined[1](cotangents), unjoined[1](cotangents)) < 1e-5


@pytest.fixture
def interpreted_kernels(monkeypatch):
    """Off CUDA the join is jnp; this makes every platform run its kernels (interpreted) instead, and
    the norm backward's. Yields the traced calls: name, row shape, whether a gradient came through x'
    (the join backward's fourth operand; None for the last join of unrolled layers)."""
    calls = []

    def interpreted(name, function):
        def run(rows_NxD, *args, **kwargs):
            calls.append((name, rows_NxD.shape, name == "join_backward" and args[2] is not None))
            return function(rows_NxD, *args, **kwargs, interpret=True)

        return run

    monkeypatch.setattr(norm_join, "off_cuda_forward", interpreted("join_forward", norm_join.kernel_forward))
    monkeypatch.setattr(norm_join, "off_cuda_backward", interpreted("join_backward", norm_join.kernel_backward))
    monkeypatch.setattr(norm_kernel, "off_cuda_backward", interpreted("norm_backward", norm_kernel.kernel_backward))
    return calls


@pytest.mark.parametrize("scan, kernels, norm_backward, remat", [
    (True, False, "recompute", "none"),
    (True, True, "pallas", "none"),
    (False, True, "pallas", "save_matmuls"),  # the 500M preset's layout, under a remat policy
    (False, False, "saved_rsqrt", "full"),
    (True, False, "pallas", "save_matmuls"),  # scanned under a remat policy
])
def test_model_with_joined_norms_keeps_loss_and_gradients(scan, kernels, norm_backward, remat, request):
    calls = request.getfixturevalue("interpreted_kernels") if kernels else None
    if scan and remat == "none" and norm_backward == "recompute":
        _, _, loss, grads = reference()
    else:
        unjoined = Transformer(tiny_cfg(scan_layers=scan, remat_policy=remat), rngs=nnx.Rngs(0))
        loss, grads = loss_and_grads(*nnx.split(unjoined), *make_batch())
    cfg = tiny_cfg(scan_layers=scan, remat_policy=remat, norm_backward=norm_backward, join_norms=True)
    loss_j, grads_j = loss_and_grads(*nnx.split(Transformer(cfg, rngs=nnx.Rngs(0))), *make_batch())
    if kernels:  # two joins per block (traced once if scanned), and the first block's in-norm alone;
        # the custom VJP traces the forward twice (as the primal and as the VJP's forward)
        joins = 2 if scan else 2 * 2
        names = sorted(name for name, _, _ in calls)
        assert names == sorted(["norm_backward"] + ["join_forward"] * 2 * joins + ["join_backward"] * joins)
        assert {shape for _, shape, _ in calls} == {(8 * 16, 64)}
        # a scan carries x' on, so every join gets its gradient; unrolled, the last one's is zero, unread
        assert sum(residual for *_, residual in calls) == (joins if scan else joins - 1)
    assert abs(float(loss_j - loss)) <= 1e-6 * abs(float(loss))
    assert max_relative_error(grads_j, grads) < 1e-5


def test_joined_norms_read_the_same_residual_stream_and_logits():
    """Joining changes the training path only: logits equal, and interpretability's residual stream
    (read unjoined) is the same model's."""
    model = Transformer(tiny_cfg(join_norms=True), rngs=nnx.Rngs(0))
    unjoined = Transformer(tiny_cfg(), rngs=nnx.Rngs(0))
    tokens, _ = make_batch()
    assert max_relative_error(model(tokens), unjoined(tokens)) < 1e-6
    stream = model.residual_stream(tokens, after_block=1)
    assert max_relative_error(model.logits_from_residual(stream, after_block=1), unjoined(tokens)) < 1e-6


@pytest.mark.parametrize("batch", [8, 2])  # 2 rows over fsdp 4: the features are split, jnp runs
def test_sharded_join_matches_one_device(batch, interpreted_kernels):
    x, h, scale_out, scale_next, grad_normed, grad_x_next = (
        a.reshape(batch, -1, 64) if a.ndim == 2 else a for a in _inputs(batch * 16, 64, jnp.float32)
    )

    def forward_and_backward(x, h, scale_out, scale_next):
        outputs, vjp = jax.vjp(lambda *a: norm_join.join(*a, EPS), x, h, scale_out, scale_next)
        return outputs, vjp((grad_x_next, grad_normed))

    step = jax.jit(forward_and_backward)
    expected = step(x, h, scale_out, scale_next)
    with sharding.use_mesh(sharding.make_mesh(mesh_cfg(2, 4, 1), jax.devices()), FSDP_RULES):
        lowered = step.lower(x, h, scale_out, scale_next).as_text()
        got = step(x, h, scale_out, scale_next)
    assert ("shard_map" in lowered or "sdy.manual_computation" in lowered) == (batch == 8)
    assert max_relative_error(got, expected) < 1e-5


def test_joined_norms_need_sandwich_norms():
    with pytest.raises(UserError, match=r"model.join_norms=True .* needs model.norm_placement='sandwich', got 'pre'"):
        Transformer(tiny_cfg(norm_placement="pre", join_norms=True), rngs=nnx.Rngs(0))


def test_a_bad_join_layout_is_a_user_error_naming_its_field():
    with pytest.raises(UserError, match=r"^model.join_kernel_layout='2x3x8': expected auto or TILE_ROWSxTILESxWARPS"):
        Transformer(tiny_cfg(join_norms=True, join_kernel_layout="2x3x8"), rngs=nnx.Rngs(0))
    x, h, scale_out, scale_next, _, _ = _inputs(96, 64, jnp.float32)
    with pytest.raises(UserError, match=r"^model.join_kernel_layout=4x16x4: programs of 64 rows do not divide the 96 rows"):
        norm_join.kernel_forward(x, h, scale_out, scale_next, EPS, interpret=True, layout=norm_kernel.Layout(4, 16, 4))


def test_norm_check_times_a_boundary_xla_unjoined_and_joined_in_the_interpreter():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.norm_check", "--check", "join", "--rows", "256", "--d_model", "64",
         "--repeats", "2", "--interpret", "--layouts", "auto,2x4x4"],
        cwd=REPO, capture_output=True, text=True, timeout=240, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    names = ["xla", "unjoined", "join_auto", "join_2x4x4"]
    assert record["check"] == "join" and record["shape"] == [256, 64] and record["auto"] == "64x1x8"
    assert sorted(record["ms"]) == sorted(record["gbps"]) == sorted(names) and record["fastest"] in names
    assert all(error < 1e-2 for error in record["max_relative_error"].values())  # bfloat16 against float32
