"""GPU check of the RMSNorm backward: XLA's (what `model.norm_backward=recompute` compiles to) against
the Pallas kernel (`=pallas`, `nucgpt.model.norm_kernel`) in several tilings, at the step's shape.

    python -m benchmarks.norm_check                       # 8 x 8192 rows of 2048, bfloat16
    python -m benchmarks.norm_check --layouts 4x32x8,2x64x4   # TILE_ROWSxTILESxWARPS[p], as model.norm_kernel_layout
    python -m benchmarks.norm_check --rows 256 --d_model 64 --interpret   # anywhere: Pallas' interpreter

Each implementation computes dx (plus the residual stream's gradient, as for a pre-norm) and d(scale)
`--repeats` times inside one jitted loop whose every call takes the previous dx as its gradient, so
the time is device time per call without dispatch. GB/s counts the bytes one pass must move (read x,
the gradient, the residual gradient; write dx). The error is the largest |a−b|/max|b| against float32
autodiff of the norm. Prints one JSON line. Needs a GPU, or `--interpret` (small shapes: slow).
"""

import functools
import json
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from nucgpt.errors import UserError, exits_cleanly_on_user_error, parse_flags, start_main
from nucgpt.model import norm_kernel
from nucgpt.model.transformer import _rms_norm_forward

flags.DEFINE_integer("rows", 8 * 8192, "rows (batch x sequence)", lower_bound=1)
flags.DEFINE_integer("d_model", 2048, "features per row", lower_bound=1)
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "activation dtype")
flags.DEFINE_list("layouts", ["auto", "2x32x8", "4x32x8", "4x32x16", "4x32x16p", "1x64x4", "1x16x4"],
                  "Pallas tilings (model.norm_kernel_layout): TILE_ROWSxTILESxWARPS[p], or auto (the default)")
flags.DEFINE_integer("repeats", 20, "calls per timed loop", lower_bound=1)
flags.DEFINE_bool("interpret", False, "run the kernel in Pallas' interpreter (any platform; for tests)")
FLAGS = flags.FLAGS
EPS = 1e-6


def xla_backward(x, grad, scale, residual):
    """The default model's norm backward: autodiff through the rematerialised forward, plus the residual."""
    forward = jax.checkpoint(lambda x, scale: _rms_norm_forward(x, scale, EPS)[0])
    _, vjp = jax.vjp(forward, x, scale)
    grad_x, grad_scale = vjp(grad)
    return grad_x + residual, grad_scale


def parse_layout(text: str) -> norm_kernel.Layout | None:
    layout = norm_kernel.parse_layout(text, field="--layouts")
    if layout is not None and FLAGS.rows % (layout.tile_rows * layout.tiles):
        raise UserError(f"--layouts: {text}: programs of {layout.tile_rows * layout.tiles} rows do not divide --rows={FLAGS.rows}")
    return layout


def timed_loop(backward, x, grad, scale, residual) -> float:
    """Seconds per call, from one jitted loop of --repeats calls chained through dx."""

    @jax.jit
    def loop(x, grad, scale, residual):
        def body(_, carry):
            grad, total = carry
            grad_x, grad_scale = backward(x, grad, scale, residual)
            return grad_x, total + grad_scale

        return jax.lax.fori_loop(0, FLAGS.repeats, body, (grad, jnp.zeros_like(scale)))

    jax.block_until_ready(loop(x, grad, scale, residual))
    start = time.perf_counter()
    jax.block_until_ready(loop(x, grad, scale, residual))
    return (time.perf_counter() - start) / FLAGS.repeats


@exits_cleanly_on_user_error
def main(argv):
    start_main(argv)
    on_gpu = jax.default_backend() == "gpu"
    if not on_gpu and not FLAGS.interpret:
        print(json.dumps({"check": "norm_backward", "skipped": f"no GPU ({jax.default_backend()})"}))
        return
    implementations = {"xla": xla_backward}
    for text in FLAGS.layouts:
        layout = parse_layout(text) or norm_kernel.kernel_layout(FLAGS.rows, FLAGS.d_model)
        implementations[f"pallas_{text}"] = functools.partial(
            norm_kernel.kernel_backward, eps=EPS, interpret=FLAGS.interpret, layout=layout
        )
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (FLAGS.rows, FLAGS.d_model)
    x, grad, residual = (jax.random.normal(key, shape).astype(FLAGS.dtype) for key in keys[:3])
    scale = 1.0 + 0.1 * jax.random.normal(keys[3], (FLAGS.d_model,))
    f32 = lambda a: a.astype(jnp.float32)
    expected = jax.jit(xla_backward)(f32(x), f32(grad), scale, f32(residual))
    bytes_moved = 4 * x.size * x.dtype.itemsize
    ms, gbps, errors = {}, {}, {}
    for name, backward in implementations.items():
        got = jax.jit(backward)(x, grad, scale, residual)
        errors[name] = max(
            float(jnp.max(jnp.abs(f32(a) - b)) / jnp.max(jnp.abs(b))) for a, b in zip(got, expected)
        )
        seconds = timed_loop(backward, x, grad, scale, residual)
        ms[name], gbps[name] = round(seconds * 1e3, 3), round(bytes_moved / seconds / 1e9)
    print(json.dumps({
        "check": "norm_backward",
        "device_kind": jax.devices()[0].device_kind,
        "shape": shape,
        "dtype": FLAGS.dtype,
        "ms": ms,
        "gbps": gbps,
        "max_relative_error": {name: float(f"{e:.1e}") for name, e in errors.items()},
        "auto": str(norm_kernel.kernel_layout(FLAGS.rows, FLAGS.d_model)),
        "fastest": min(ms, key=ms.get),
    }))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
