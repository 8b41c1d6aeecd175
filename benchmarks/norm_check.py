"""GPU check of the Pallas norm kernels against XLA, at the step's shape, in several tilings.

    python -m benchmarks.norm_check                       # the RMSNorm backward: 8 x 8192 rows of 2048, bfloat16
    python -m benchmarks.norm_check --layouts 4x32x8,2x64x4   # TILE_ROWSxTILESxWARPS[p], as model.norm_kernel_layout
    python -m benchmarks.norm_check --check join          # a sublayer boundary, forward and backward
    python -m benchmarks.norm_check --rows 256 --d_model 64 --interpret   # anywhere: Pallas' interpreter

`--check norm_backward` (`model.norm_backward=pallas`, `nucgpt.model.norm_kernel`): dx (plus the residual
stream's gradient, as for a pre-norm) and d(scale); XLA's is autodiff through the rematerialised
forward (what `recompute` compiles to). One pass reads x, the gradient and the residual gradient and
writes dx.

`--check join` (`model.join_norms`, `nucgpt.model.norm_join`): a sandwich sublayer boundary, x' = x +
norm_out(h) and n = norm_next(x'), forward then backward (dx, dh and both scales' gradients), as the
step runs it: `xla` (autodiff, norms rematerialised: the default model), `unjoined` (the Pallas norm
backwards with XLA's forward: `norm_backward=pallas` alone) and the joined kernels. One pass each way
reads x and h, writes x' and n; then reads x', h and both gradients, writes dx and dh.

Each runs `--repeats` times inside one jitted loop whose every call takes the previous call's outputs
as inputs, so the time is device time per call without dispatch. GB/s counts the bytes of one pass.
The error is the largest |a−b|/max|b| against float32 autodiff. Prints one JSON line. Needs a GPU, or
`--interpret` (small shapes: slow).
"""

import functools
import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from nucgpt.errors import UserError, exits_cleanly_on_user_error, parse_flags, start_main
from nucgpt.model import norm_join, norm_kernel
from nucgpt.model.transformer import _rms_norm_forward, _rms_norm_pallas, _rms_norm_pallas_and_input

DEFAULT_LAYOUTS = {
    "norm_backward": ["auto", "2x32x8", "4x32x8", "4x32x16", "4x32x16p", "1x64x4", "1x16x4"],
    "join": ["auto", "2x32x16", "4x32x16", "1x64x8", "1x64x4"],
}
flags.DEFINE_enum("check", "norm_backward", sorted(DEFAULT_LAYOUTS), "which kernels: the norm backward, or the join")
flags.DEFINE_integer("rows", 8 * 8192, "rows (batch x sequence)", lower_bound=1)
flags.DEFINE_integer("d_model", 2048, "features per row", lower_bound=1)
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "activation dtype")
flags.DEFINE_list("layouts", [], "Pallas tilings (model.norm_kernel_layout / join_kernel_layout): "
                  "TILE_ROWSxTILESxWARPS[p], or auto (the default); default: a few per check")
flags.DEFINE_integer("repeats", 20, "calls per timed loop", lower_bound=1)
flags.DEFINE_bool("interpret", False, "run the kernels in Pallas' interpreter (any platform; for tests)")
FLAGS = flags.FLAGS
EPS = 1e-6


def parse_layout(text: str) -> norm_kernel.Layout | None:
    layout = norm_kernel.parse_layout(text, field="--layouts")
    if layout is not None and FLAGS.rows % (layout.tile_rows * layout.tiles):
        raise UserError(f"--layouts: {text}: programs of {layout.tile_rows * layout.tiles} rows do not divide --rows={FLAGS.rows}")
    return layout


# --- the norm backward: (x, grad, scale, residual) -> (dx, d(scale)); the loop feeds dx back as grad ---

def xla_backward(x, grad, scale, residual):
    """The default model's norm backward: autodiff through the rematerialised forward, plus the residual."""
    forward = jax.checkpoint(lambda x, scale: _rms_norm_forward(x, scale, EPS)[0])
    _, vjp = jax.vjp(forward, x, scale)
    grad_x, grad_scale = vjp(grad)
    return grad_x + residual, grad_scale


def norm_backward_check(x, grad, scale, residual, layouts):
    """Each implementation as a function of the gradient (each call's dx is the next call's gradient)."""
    runs = {"xla": functools.partial(xla_backward, x, scale=scale, residual=residual)}
    for text, layout in layouts.items():  # layout None: the kernel's default
        runs[f"pallas_{text}"] = functools.partial(
            norm_kernel.kernel_backward, x, scale_D=scale, residual_grad_NxD=residual, eps=EPS,
            interpret=FLAGS.interpret, layout=layout,
        )
    f32 = lambda a: a.astype(jnp.float32)
    expected = jax.jit(xla_backward)(f32(x), f32(grad), scale, f32(residual))
    return runs, (grad,), expected, 4 * x.size * x.dtype.itemsize, str(norm_kernel.kernel_layout(FLAGS.rows, FLAGS.d_model))


# --- the join: (x, h) -> (dx, dh, d(s_out), d(s_next)); the loop feeds dx, dh back as x, h ---

def _unjoined(x, h, scale_out, scale_next, pallas: bool):
    """A sandwich boundary as the unjoined model computes it: (x', n)."""
    if pallas:
        x_next = x + _rms_norm_pallas(h, scale_out, EPS, "auto")
        normed, x_next = _rms_norm_pallas_and_input(x_next, scale_next, EPS, "auto")
        return x_next, normed
    norm = jax.checkpoint(lambda a, s: _rms_norm_forward(a, s, EPS)[0])
    x_next = x + norm(h, scale_out)
    return x_next, norm(x_next, scale_next)


def _boundary(forward, scales, cotangents):
    """Forward then backward of one boundary, from `forward(x, h, s_out, s_next) -> (x', n)`, as a
    function of (x, h)."""

    def run(x, h):
        _, vjp = jax.vjp(forward, x, h, *scales)
        return vjp(cotangents)

    return run


def _joined_kernels(layout, scales, cotangents):
    """The join's two kernels in sequence, as its VJP runs them (layout None: their default)."""
    grad_x_next, grad_normed = cotangents

    def run(x, h):
        x_next, _ = norm_join.kernel_forward(x, h, *scales, EPS, interpret=FLAGS.interpret, layout=layout)
        return norm_join.kernel_backward(
            x_next, h, grad_normed, grad_x_next, *scales, EPS, interpret=FLAGS.interpret, layout=layout
        )

    return run


def join_check(x, h, scale_out, scale_next, grad_x_next, grad_normed, layouts):
    """Each implementation as a function of (x, h) (each call's dx and dh are the next call's x and h)."""
    scales, cotangents = (scale_out, scale_next), (grad_x_next, grad_normed)
    runs = {
        "xla": _boundary(functools.partial(_unjoined, pallas=False), scales, cotangents),
        "unjoined": _boundary(functools.partial(_unjoined, pallas=True), scales, cotangents),
    }
    for text, layout in layouts.items():
        runs[f"join_{text}"] = _joined_kernels(layout, scales, cotangents)
    f32 = lambda a: a.astype(jnp.float32)
    expected = jax.jit(_boundary(functools.partial(_unjoined, pallas=False), scales, (f32(grad_x_next), f32(grad_normed))))(
        f32(x), f32(h)
    )
    return runs, (x, h), expected, 10 * x.size * x.dtype.itemsize, str(norm_join.kernel_layout(FLAGS.rows, FLAGS.d_model))


def timed_loop(run, carry) -> float:
    """Seconds per call, from one jitted loop of --repeats calls, each fed the previous call's outputs."""

    @jax.jit
    def loop(carry):
        def body(_, state):
            carry, total = state
            outputs = run(*carry)  # the row outputs become the next call's inputs; the scales' gradients are summed
            return tuple(o.astype(c.dtype) for o, c in zip(outputs, carry)), total + sum(outputs[len(carry):])

        return jax.lax.fori_loop(0, FLAGS.repeats, body, (carry, jnp.zeros(FLAGS.d_model, jnp.float32)))

    jax.block_until_ready(loop(carry))
    start = time.perf_counter()
    jax.block_until_ready(loop(carry))
    return (time.perf_counter() - start) / FLAGS.repeats


@exits_cleanly_on_user_error
def main(argv):
    start_main(argv)
    if jax.default_backend() != "gpu" and not FLAGS.interpret:
        print(json.dumps({"check": FLAGS.check, "skipped": f"no GPU ({jax.default_backend()})"}))
        return
    layouts = {text: parse_layout(text) for text in (FLAGS.layouts or DEFAULT_LAYOUTS[FLAGS.check])}
    if FLAGS.interpret:  # the unjoined row's Pallas norm backwards too (they dispatch by platform)
        norm_kernel.off_cuda_backward = functools.partial(norm_kernel.kernel_backward, interpret=True)
    shape = (FLAGS.rows, FLAGS.d_model)
    keys = jax.random.split(jax.random.key(0), 6)
    rows = [jax.random.normal(key, shape).astype(FLAGS.dtype) for key in keys[:4]]
    scales = [1.0 + 0.1 * jax.random.normal(key, (FLAGS.d_model,)) for key in keys[4:]]
    if FLAGS.check == "norm_backward":
        x, grad, residual, _ = rows
        runs, carry, expected, bytes_moved, auto = norm_backward_check(x, grad, scales[0], residual, layouts)
    else:
        x, h, grad_x_next, grad_normed = rows
        runs, carry, expected, bytes_moved, auto = join_check(x, h, *scales, grad_x_next, grad_normed, layouts)
    f32 = lambda a: a.astype(jnp.float32)
    ms, gbps, errors = {}, {}, {}
    for name, run in runs.items():
        got = jax.jit(run)(*carry)
        errors[name] = max(float(jnp.max(jnp.abs(f32(a) - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, expected))
        seconds = timed_loop(run, carry)
        ms[name], gbps[name] = round(seconds * 1e3, 3), round(bytes_moved / seconds / 1e9)
    print(json.dumps({
        "check": FLAGS.check,
        "device_kind": jax.devices()[0].device_kind,
        "shape": shape,
        "dtype": FLAGS.dtype,
        "ms": ms,
        "gbps": gbps,
        "max_relative_error": {name: float(f"{e:.1e}") for name, e in errors.items()},
        "auto": auto,
        "fastest": min(ms, key=ms.get),
    }))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
