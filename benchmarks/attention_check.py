"""GPU check of the cuDNN attention backend against the xla reference, through `nucgpt.model.attention`.

    python -m benchmarks.attention_check                 # published shape: 8 heads of 128, seq 8192
    python -m benchmarks.attention_check --seq_len 2048 --kv_heads 2 --batch 2
    python -m benchmarks.attention_check --batch 8 --nocompare   # cuDNN's speed at the step's batch only

Runs the forward and the gradients (q, k, v) of both backends in bfloat16 at the same inputs and
prints one JSON line: relative errors (‖a−b‖/‖b‖ over each tensor; bf16 flash kernels differ from a
materialised softmax at ~1e-2), the verdict, and each backend's forward+backward time (median of
`--repeats` calls) with the TFLOP/s it implies, counted as MFU counts attention (`nucgpt.flops`: the
causal half of QKᵀ and AV, ×3 for the backward): 6·B·S²·H·D_head. At the published shape
6·8192²·8·128 = 412 GFLOP per sequence.
Needs a GPU (cuDNN runs nowhere else); on other platforms it prints a skip line and exits 0.
"""

import json
import statistics
import time

import jax
import jax.numpy as jnp
from absl import app, flags

from nucgpt import flops
from nucgpt.model import attention
from nucgpt.errors import parse_flags

flags.DEFINE_integer("batch", 1, "batch rows", lower_bound=1)
flags.DEFINE_integer("seq_len", 8192, "sequence length", lower_bound=1)
flags.DEFINE_integer("heads", 8, "query heads", lower_bound=1)
flags.DEFINE_integer("kv_heads", 8, "key/value heads (GQA when fewer than heads)", lower_bound=1)
flags.DEFINE_integer("head_dim", 128, "head dimension", lower_bound=1)
flags.DEFINE_float("tolerance", 2e-2, "largest relative error that passes")
flags.DEFINE_integer("repeats", 5, "timed calls per backend (the median is reported)", lower_bound=1)
flags.DEFINE_bool("compare", True, "also run the xla reference and compare (it materialises the [S, S] scores: "
                  "~17 GB of float32 per 8 sequences of 8192 with 8 heads)")
FLAGS = flags.FLAGS


def relative_error(a: jax.Array, b: jax.Array) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def forward_and_grads(backend: str):
    """Jitted (output, (dq, dk, dv)) of a fixed random projection of the attention output."""

    def loss(q, k, v, probe):
        out = attention.attend(q, k, v, None, backend=backend)
        return jnp.sum(out.astype(jnp.float32) * probe), out

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of one call, after a warm-up call."""
    jax.block_until_ready(fn(*args))
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(_):
    if jax.default_backend() != "gpu":
        print(json.dumps({"check": "attention_cudnn_vs_xla", "skipped": f"no GPU ({jax.default_backend()})"}))
        return
    shape_q = (FLAGS.batch, FLAGS.seq_len, FLAGS.heads, FLAGS.head_dim)
    shape_kv = (FLAGS.batch, FLAGS.seq_len, FLAGS.kv_heads, FLAGS.head_dim)
    attention.check_shapes("cudnn", FLAGS.seq_len, FLAGS.head_dim, 0, 0)
    kq, kk, kv, kp = jax.random.split(jax.random.key(0), 4)
    q = (jax.random.normal(kq, shape_q) * FLAGS.head_dim**-0.5).astype(jnp.bfloat16)
    k, v = (jax.random.normal(key, shape_kv).astype(jnp.bfloat16) for key in (kk, kv))
    probe = jax.random.normal(kp, shape_q)
    results = {}
    for backend in ("cudnn", "xla") if FLAGS.compare else ("cudnn",):
        fn = forward_and_grads(backend)
        (grads, out) = fn(q, k, v, probe)
        results[backend] = dict(out=out, grads=grads, seconds=timed(fn, q, k, v, probe, repeats=FLAGS.repeats))
    tokens = FLAGS.batch * FLAGS.seq_len
    train_flops = tokens * flops.attention_train_flops_per_token(FLAGS.seq_len, FLAGS.heads, FLAGS.head_dim)
    errors = {}
    if FLAGS.compare:
        errors["out"] = relative_error(results["cudnn"]["out"], results["xla"]["out"])
        for name, a, b in zip(("dq", "dk", "dv"), results["cudnn"]["grads"], results["xla"]["grads"]):
            errors[name] = relative_error(a, b)
    print(json.dumps({
        "check": "attention_cudnn_vs_xla",
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "q_shape": shape_q,
        "kv_shape": shape_kv,
        "relative_error": {name: float(f"{e:.2e}") for name, e in errors.items()},
        "ok": max(errors.values()) < FLAGS.tolerance if errors else None,
        "fwd_bwd_ms": {b: round(r["seconds"] * 1e3, 2) for b, r in results.items()},
        "fwd_bwd_tflops": {b: round(train_flops / r["seconds"] / 1e12, 1) for b, r in results.items()},
    }))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
