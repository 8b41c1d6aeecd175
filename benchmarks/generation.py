"""Sampling speed of `nucgpt.generate.sample` (prefill + KV-cached decoding): a table line and one JSON line.

    python -m benchmarks.generation --config configs/pretrain.py:demo --samples 16 --tokens 1024
    python -m benchmarks.generation --config configs/pretrain.py:demo --config.model.scan_layers=False

The model is the config's shape, randomly initialised (speed does not depend on the weights). The
first call compiles and runs (`first_call_s`); then `--runs` calls are timed, each to its last token
on the host, and the median is reported. tokens/s counts generated tokens over all samples.
"""

import json
import statistics
import time

import jax
import numpy as np
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from nucgpt import generate
from nucgpt.errors import exits_cleanly_on_user_error, parse_flags
from nucgpt.model import Transformer

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Flags exist only when this module is the program, so importing it never clashes with others."""
    config_flags.DEFINE_config_file("config", None, "configs/pretrain.py:<preset>", lock_config=True)
    flags.DEFINE_integer("samples", 16, "sequences sampled together (the batch)", lower_bound=1)
    flags.DEFINE_integer("prompt_tokens", 16, "prompt length in tokens", lower_bound=1)
    flags.DEFINE_integer("tokens", 1024, "tokens generated per sample", lower_bound=1)
    flags.DEFINE_integer("runs", 3, "timed calls; the median is reported", lower_bound=1)
    flags.mark_flag_as_required("config")


def measure(config, samples: int, prompt_tokens: int, tokens: int, runs: int) -> dict:
    """first_call_s, and seconds (median, min, max) and tokens/s of `runs` timed calls."""
    model = Transformer(config.model, rngs=nnx.Rngs(0))
    allowed_V = generate.allowed_tokens(generate.generation_tokenizer(config), config.model.vocab_size, allow_n=False)
    prompt_P = np.random.default_rng(0).choice(np.flatnonzero(allowed_V), prompt_tokens).astype(np.int32)
    sample = lambda seed: generate.sample(model, prompt_P, tokens, num_samples=samples, allowed_V=allowed_V, seed=seed,
                                          rules=config.mesh.logical_axis_rules)  # as `nucgpt.generate` runs it
    start = time.perf_counter()
    sample(0)
    first_call_s = time.perf_counter() - start
    seconds = []
    for seed in range(1, runs + 1):
        start = time.perf_counter()
        sample(seed)  # returns numpy: the host has every token
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    return {
        "device_kind": jax.devices()[0].device_kind,
        "preset": config.get("preset", ""),
        "scan_layers": bool(config.model.scan_layers),
        "compute_dtype": str(config.model.compute_dtype),
        "samples": samples,
        "prompt_tokens": prompt_tokens,
        "new_tokens": tokens,
        "first_call_s": round(first_call_s, 3),
        "seconds": {"median": round(median, 6), "min": round(min(seconds), 6), "max": round(max(seconds), 6)},
        "tokens_per_sec": round(samples * tokens / median, 1),
        "ms_per_step": round(1000 * median / tokens, 3),
    }


@exits_cleanly_on_user_error
def main(argv) -> None:
    del argv
    result = measure(FLAGS.config, FLAGS.samples, FLAGS.prompt_tokens, FLAGS.tokens, FLAGS.runs)
    print(f"{result['preset']} scan_layers={result['scan_layers']} on {result['device_kind']}: "
          f"{result['samples']} × {result['new_tokens']} tokens in {result['seconds']['median']:.2f} s (median of "
          f"{FLAGS.runs}) = {result['tokens_per_sec']:,.0f} tokens/s, {result['ms_per_step']:.2f} ms per decoding step; "
          f"first call {result['first_call_s']:.1f} s")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main, flags_parser=parse_flags)
