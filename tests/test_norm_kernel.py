"""The fused RMSNorm backward (`model.norm_backward=pallas`): the Pallas kernel, run in Pallas'
interpreter on CPU, against autodiff; the model and a sharded mesh with it (jnp on CPU, the kernel
where monkeypatched in)."""


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
from nucgpt.model import Transformer, norm_kernel
from nucgpt.model.transformer import _rms_norm_forward
from test_model import loss_and_grads, make_batch, max_relative_error, reference, tiny_cfg
from test_sharding import mesh_cfg

REPO = Path(__file__).resolve().parents[1]


def _autodiff_backward(x, grad, scale, residual_grad, eps):
    _, vjp = jax.vjp(lambda x, scale: _rms_norm_forward(x, scale, eps)[0], x, scale)
    grad_x, grad_scale = vjp(grad)
    return (grad_x if residual_grad is None else grad_x + residual_grad), grad_scale


def _inputs(rows, d_model, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    x = (3.0 * jax.random.normal(keys[0], (rows, d_model))).astype(dtype)
    grad = jax.random.normal(keys[1], (rows, d_model)).astype(dtype)
    scale = 1.0 + 0.1 * jax.random.normal(keys[2], (d_model,))
    residual = jax.random.normal(keys[3], (rows, d_model)).astype(dtype)
    return x, grad, scale, residual


@pytest.mark.parametrize("rows, d_model, dtype, with_residual, layout", [
    (64, 32, jnp.float32, False, "auto"),
    (96, 64, jnp.float32, True, "auto"),  # 96 rows: tiles of 32, three programs
    (2048, 128, jnp.float32, True, "auto"),
    (2048, 128, jnp.float32, True, "4x8x4p"),  # 64 programs of 8 tiles, each loaded one step ahead
    (64, 32, jnp.float32, False, "2x4x4p"),
    (40, 64, jnp.bfloat16, True, "auto"),
])
def test_kernel_matches_autodiff(rows, d_model, dtype, with_residual, layout):
    x, grad, scale, residual = _inputs(rows, d_model, dtype)
    residual = residual if with_residual else None
    kernel = norm_kernel.kernel_backward(
        x, grad, scale, residual, 1e-6, interpret=True, layout=norm_kernel.parse_layout(layout)
    )
    written = norm_kernel.reference_backward(x, grad, scale, residual, 1e-6)
    autodiff = _autodiff_backward(x.astype(jnp.float32), grad.astype(jnp.float32), scale,
                                  None if residual is None else residual.astype(jnp.float32), 1e-6)
    assert kernel[0].dtype == dtype and kernel[1].dtype == jnp.float32
    tolerance = 1e-5 if dtype == jnp.float32 else 1e-2  # bfloat16: one rounding of dx
    assert max_relative_error(kernel, autodiff) < tolerance
    assert max_relative_error(kernel, written) < tolerance


def test_kernel_layout_tiles_divide_the_rows_and_fill_the_gpu():
    assert str(norm_kernel.kernel_layout(8 * 8192, 2048)) == "2x32x8p"  # the 500M preset at batch 8: 1024 programs
    for rows, d_model in [(96, 64), (7, 64), (8 * 8192, 64), (4096, 4096)]:
        tile_rows, tiles, *_ = norm_kernel.kernel_layout(rows, d_model)
        assert rows % (tile_rows * tiles) == 0 and tile_rows * d_model <= max(4096, d_model)


@pytest.mark.parametrize("text", ["2x32", "2x32x0", "3x32x8", "axbxc", "2x32x8q"])
def test_a_bad_kernel_layout_is_a_user_error_naming_the_field(text):
    with pytest.raises(UserError, match=f"model.norm_kernel_layout='{text}': expected auto or TILE_ROWSxTILESxWARPS"):
        Transformer(tiny_cfg(norm_backward="pallas", norm_kernel_layout=text), rngs=nnx.Rngs(0))


def test_layouts_read_and_print_alike():
    assert norm_kernel.parse_layout("auto") is None
    assert norm_kernel.parse_layout("2x32x8p") == norm_kernel.Layout(2, 32, 8, prefetch=True)
    assert [str(norm_kernel.parse_layout(t)) for t in ("2x32x8", "4x16x16p")] == ["2x32x8", "4x16x16p"]


def test_a_layout_that_does_not_divide_the_rows_is_a_user_error():
    x, grad, scale, _ = _inputs(96, 64, jnp.float32)
    with pytest.raises(UserError, match=r"norm_kernel_layout=4x16x4: programs of 64 rows do not divide the 96 rows"):
        norm_kernel.kernel_backward(x, grad, scale, None, 1e-6, interpret=True, layout=norm_kernel.Layout(4, 16, 4))


def test_a_jax_without_the_triton_backend_is_a_user_error_naming_the_fallback(monkeypatch):
    """JAX 0.11 deprecates Pallas' Triton backend: once a JAX drops it, the kernels say what to set instead."""
    import jax.experimental.pallas as pallas

    monkeypatch.setitem(sys.modules, "jax.experimental.pallas.triton", None)  # its import now fails
    monkeypatch.delattr(pallas, "triton", raising=False)  # as if it had never been imported
    x, grad, scale, _ = _inputs(64, 64, jnp.float32)
    with pytest.raises(UserError, match=r"does not ship: use model.norm_backward=recompute and model.join_norms=false"):
        norm_kernel.kernel_backward(x, grad, scale, None, 1e-6, interpret=False)


def test_a_width_that_is_not_a_power_of_two_runs_the_jnp_backward(interpreted_kernel, caplog):
    """Triton's blocks are powers of two: the kernel refuses d_model 48, and the model's backward runs
    in jnp instead (on every platform, with one warning however many norms), with the same gradients."""
    x, grad, scale, residual = _inputs(8, 48, jnp.float32)
    with pytest.raises(UserError, match="model.d_model a power of two, got 48"):
        norm_kernel.kernel_backward(x, grad, scale, None, 1e-6)
    norm_kernel._warn_not_a_power_of_two.cache_clear()
    for _ in range(2):
        got = norm_kernel.backward(x[None], grad[None], scale, residual[None], 1e-6)
    assert [r.getMessage() for r in caplog.records if "not a power of two" in r.getMessage()] == [
        "model.d_model=48 is not a power of two, which the Pallas norm kernels need; their jnp equivalents run on every platform"
    ]
    assert interpreted_kernel == []
    assert max_relative_error(got, _autodiff_backward(x[None], grad[None], scale, residual[None], 1e-6)) < 1e-5


@pytest.fixture
def interpreted_kernel(monkeypatch):
    """Off CUDA the backward is jnp; this makes every platform run the kernel (interpreted) instead.
    Yields the list of the traced calls' row shapes."""
    calls = []

    def kernel(x_NxD, *args, **kwargs):
        calls.append(x_NxD.shape)
        return norm_kernel.kernel_backward(x_NxD, *args, **kwargs, interpret=True)

    monkeypatch.setattr(norm_kernel, "off_cuda_backward", kernel)
    return calls


@pytest.mark.parametrize("placement, kernel", [("sandwich", False), ("sandwich", True), ("pre", True)])
def test_model_with_the_fused_backward_keeps_loss_and_gradients(placement, kernel, request):
    """The pre-norms add the residual stream's gradient inside the backward: the same loss and gradients."""
    calls = request.getfixturevalue("interpreted_kernel") if kernel else None
    if placement == "sandwich":
        _, state, loss, grads = reference()
    else:
        loss, grads = loss_and_grads(*nnx.split(Transformer(tiny_cfg(norm_placement="pre"), rngs=nnx.Rngs(0))), *make_batch())
    model = Transformer(tiny_cfg(norm_placement=placement, norm_backward="pallas"), rngs=nnx.Rngs(0))
    loss_p, grads_p = loss_and_grads(*nnx.split(model), *make_batch())
    if kernel:  # every norm of the scanned block (traced once): 4 (sandwich) or 2 (pre), and the final norm
        assert calls == [(8 * 16, 64)] * ((4 if placement == "sandwich" else 2) + 1)
    assert abs(float(loss_p - loss)) <= 1e-6 * abs(float(loss))
    assert max_relative_error(grads_p, grads) < 1e-5


# 2 rows over fsdp 4: the features are split, jnp runs
@pytest.mark.parametrize("batch, with_residual", [(8, True), (8, False), (2, True)])
def test_sharded_backward_matches_one_device(batch, with_residual, interpreted_kernel):
    x, grad, scale, residual = (a.reshape(batch, -1, 64) if a.ndim == 2 else a for a in _inputs(batch * 16, 64, jnp.float32))
    residual = residual if with_residual else None  # absent: left out of the shard_map's operands
    backward = jax.jit(lambda *a: norm_kernel.backward(*a, 1e-6))
    expected = backward(x, grad, scale, residual)
    with sharding.use_mesh(sharding.make_mesh(mesh_cfg(2, 4, 1), jax.devices()), FSDP_RULES):
        lowered = backward.lower(x, grad, scale, residual)
        got = backward(x, grad, scale, residual)
    assert ("shard_map" in lowered.as_text() or "sdy.manual_computation" in lowered.as_text()) == (batch == 8)
    assert max_relative_error(got, expected) < 1e-5


def test_unrolled_layers_with_remat_keep_loss_and_gradients(interpreted_kernel):
    """The 500M preset's layout (unrolled), under a remat policy that reruns the norms' forward."""
    models = {
        backward: Transformer(tiny_cfg(scan_layers=False, remat_policy="save_matmuls", norm_backward=backward), rngs=nnx.Rngs(0))
        for backward in ("recompute", "pallas")
    }
    (loss, grads), (loss_p, grads_p) = (loss_and_grads(*nnx.split(m), *make_batch()) for m in models.values())
    assert len(interpreted_kernel) == 4 * 2 + 1  # unrolled: every norm traced
    assert abs(float(loss_p - loss)) <= 1e-6 * abs(float(loss))
    assert max_relative_error(grads_p, grads) < 1e-5


def _norm_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.norm_check", "--rows", "256", "--d_model", "64", "--repeats", "2", *args],
        cwd=REPO, capture_output=True, text=True, timeout=240, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


def test_norm_check_times_and_checks_each_tiling_in_the_interpreter():
    proc = _norm_check("--interpret", "--layouts", "auto,2x4x4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    names = ["xla", "pallas_auto", "pallas_2x4x4"]
    assert record["check"] == "norm_backward" and record["shape"] == [256, 64]
    assert sorted(record["ms"]) == sorted(record["gbps"]) == sorted(names) and record["fastest"] in names
    assert all(error < 1e-2 for error in record["max_relative_error"].values())  # bfloat16 against float32


def test_norm_check_without_a_gpu_skips_and_a_bad_tiling_is_one_line():
    skipped = _norm_check()
    assert skipped.returncode == 0 and json.loads(skipped.stdout.strip().splitlines()[-1])["skipped"] == "no GPU (cpu)"
    bad = _norm_check("--interpret", "--layouts", "3x5x4")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: --layouts='3x5x4': expected auto or TILE_ROWSxTILESxWARPS in powers of two, p at the end to prefetch "
        "(e.g. 2x32x8, 2x32x8p)"
    )
    bad = _norm_check("--interpret", "--layouts", "4x128x4")
    assert bad.stderr.strip().splitlines()[-1] == "error: --layouts: 4x128x4: programs of 512 rows do not divide --rows=256"
