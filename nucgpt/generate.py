"""Sequence generation: `python -m nucgpt.generate --checkpoint DIR --prompt ACGT... --num_bases N --output out.fa`.

Continues a DNA prompt with a pretrained checkpoint's model: the prompt is prefilled into a KV
cache in one pass, then every token is sampled inside one jitted `jax.lax.scan` (no per-token
Python dispatch). Temperature 0 is greedy; top_k 0 keeps the whole vocabulary. PAD is never
sampled, nor N unless `--allow_n`, nor a k-mer model's UNK. Every sample starts from the same
prompt; the FASTA written holds the prompt followed by the generated bases, uppercase.

Tokenizers: `nucleotide` (a base per token) and `kmer6_nonoverlap` (6 bases per token; the prompt is
whole 6-mers). `kmer6_overlap` cannot generate: each new token would have to repeat 5 bases of the
previous one, which nothing in the model enforces.
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from nucgpt import pretrained, sharding
from nucgpt.data.fasta import read_records
from nucgpt.errors import UserError, exits_cleanly_on_user_error, parse_flags, start_main
from nucgpt.files import atomic_file, check_can_create, check_input_file
from nucgpt.model import Transformer
from nucgpt.tokenizers import KMER_UNK_ID, PAD_ID, Tokenizer, get_tokenizer

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "A pretraining workdir (its latest checkpoint) or a step folder.")
_PROMPT = flags.DEFINE_string("prompt", None, "The bases to continue (A, C, G, T, N; either case).")
_PROMPT_FASTA = flags.DEFINE_string(
    "prompt_fasta", None, "A FASTA file (plain or gzip) holding one record: the prompt (IUPAC codes read as N)."
)
_NUM_BASES = flags.DEFINE_integer("num_bases", None, "Bases to generate after the prompt.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 1, "Independent continuations of the prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0, "Softmax temperature; 0 picks the most likely token (greedy).")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens only; 0 keeps them all.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed: the same seed and flags give the same samples.")
_ALLOW_N = flags.DEFINE_bool("allow_n", False, "Let the nucleotide model generate N (unknown base).")
_OUTPUT = flags.DEFINE_string("output", None, "The FASTA file to write (replaced atomically).")

NUCLEOTIDE_N_ID = 5  # nucleotide ids: PAD, A, C, G, T, N = 0..5
LINE_WIDTH = 80


def check_prompt(prompt: str) -> None:
    """A prompt is non-empty A/C/G/T/N text (either case); the first other character is named."""
    if not prompt:
        raise UserError("the prompt is empty")
    bad = re.search(r"[^ACGTNacgtn]", prompt)
    if bad:
        raise UserError(
            f"prompt: invalid character {bad.group()!r} at position {bad.start() + 1} (allowed: A, C, G, T, N, either case)"
        )


def read_prompt_fasta(path: str) -> str:
    """The sequence of the single record in FASTA file `path` (IUPAC codes read as N)."""
    check_input_file(path, "--prompt_fasta")
    records = list(read_records(path))
    if len(records) != 1:
        raise UserError(f"--prompt_fasta {path}: holds {len(records)} records; give a file with one (the prompt)")
    if not records[0][1]:
        raise UserError(f"--prompt_fasta {path}: record {records[0][0]!r} has no bases")
    return records[0][1].decode("ascii")


def generation_tokenizer(config: ConfigDict) -> Tokenizer:
    """The checkpoint's tokenizer, without padding; overlapping k-mers cannot be generated."""
    if config.data.tokenizer == "kmer6_overlap":
        raise UserError(
            "the checkpoint's tokenizer is kmer6_overlap, which cannot generate: consecutive overlapping "
            "6-mers must agree on 5 bases, and sampling each token independently does not ensure it"
        )
    return get_tokenizer(config.data.tokenizer, pad_multiple=1)


def check_fits_model(prompt: str, num_bases: int, tokenizer: Tokenizer, seq_len: int, allow_n: bool) -> None:
    """The request suits the model: a prompt of whole k-mers, N only in a nucleotide vocabulary, and
    prompt + generated bases within the trained context (`seq_len` tokens)."""
    if len(prompt) % tokenizer.k:
        raise UserError(
            f"prompt: {len(prompt)} bp is not a multiple of {tokenizer.k}: the {tokenizer.name} model reads whole {tokenizer.k}-mers"
        )
    if allow_n and tokenizer.k > 1:
        raise UserError(f"--allow_n: the {tokenizer.name} vocabulary has no N token (a 6-mer with an N is UNK, never sampled)")
    context_bp = seq_len * tokenizer.k
    if len(prompt) + num_bases > context_bp:
        raise UserError(
            f"prompt ({len(prompt)} bp) + --num_bases ({num_bases}) = {len(prompt) + num_bases} bp exceeds the "
            f"model's trained context of {context_bp} bp (train.seq_len)"
        )


def allowed_tokens(tokenizer: Tokenizer, vocab_size: int, allow_n: bool) -> np.ndarray:
    """bool [vocab_size]: the ids sampling may pick. Never PAD or an id past the tokenizer's
    vocabulary; a k-mer model never UNK; a nucleotide model N only with `allow_n`."""
    allowed_V = np.arange(vocab_size) < tokenizer.vocab_size
    allowed_V[PAD_ID] = False
    if tokenizer.k == 1:
        allowed_V[NUCLEOTIDE_N_ID] = allow_n
    else:
        allowed_V[KMER_UNK_ID] = False
    return allowed_V


def _pick(logits_SxV: jax.Array, key: jax.Array, allowed_V: jax.Array, temperature: jax.Array, top_k: jax.Array) -> jax.Array:
    """Greedy at temperature 0, else a draw from softmax(logits / temperature) over the top_k (0: all)
    allowed tokens. Both are traced: one compiled loop serves every setting."""
    logits_SxV = jnp.where(allowed_V, logits_SxV, -jnp.inf)
    descending_SxV = -jnp.sort(-logits_SxV, axis=-1)
    kth_Sx1 = jnp.where(top_k > 0, jnp.take(descending_SxV, jnp.maximum(top_k, 1) - 1, axis=-1)[:, None], -jnp.inf)
    logits_SxV = jnp.where(logits_SxV >= kth_Sx1, logits_SxV, -jnp.inf)
    drawn_S = jax.random.categorical(key, logits_SxV / jnp.where(temperature > 0, temperature, 1.0), axis=-1)
    return jnp.where(temperature > 0, drawn_S, jnp.argmax(logits_SxV, axis=-1)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens"))
def _sample(graphdef, state, prompt_SxP, allowed_V, key, temperature, top_k, *, num_tokens: int):
    """Prefill, then a scan of (pick a token, decode it) steps; the last pick needs no decode. The draws
    do not depend on how the samples are spread over devices (JAX's partitionable threefry)."""
    model = nnx.merge(graphdef, state)
    num_samples, prompt_len = prompt_SxP.shape
    pick = functools.partial(_pick, allowed_V=allowed_V, temperature=temperature, top_k=top_k)
    logits_SxV, cache = model.prefill(prompt_SxP, model.init_cache(num_samples, prompt_len + num_tokens - 1))

    def step(carry, key_and_position):
        logits_SxV, cache = carry
        key, position = key_and_position
        token_S = pick(logits_SxV, key)
        logits_SxV, cache = model.decode_step(token_S[:, None], position, cache)
        return (logits_SxV, cache), token_S

    keys = jax.random.split(key, num_tokens)
    positions = prompt_len + jnp.arange(num_tokens - 1, dtype=jnp.int32)
    (logits_SxV, _), tokens_TxS = jax.lax.scan(step, (logits_SxV, cache), (keys[:-1], positions))
    return jnp.concatenate([tokens_TxS.T, pick(logits_SxV, keys[-1])[:, None]], axis=1)


def sample(
    model: Transformer,
    prompt_P: np.ndarray,
    num_tokens: int,
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int = 0,
    allowed_V: np.ndarray,
    seed: int = 0,
    rules: sharding.Rules | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> np.ndarray:
    """int32 [num_samples, num_tokens]: continuations of the prompt's token ids `prompt_P`.

    The samples are split over as many of `devices` (default: the local ones) as divide their
    number, the weights replicated; `rules` (the checkpoint's `mesh.logical_axis_rules`) let the
    model's own sharding annotations and kernels see that mesh. The output is the same on any number.
    """
    devices = list(devices or jax.local_devices())
    mesh = sharding.data_parallel_mesh(devices[: max(d for d in range(1, len(devices) + 1) if num_samples % d == 0)])
    graphdef, state = nnx.split(model)
    with sharding.use_mesh(mesh, rules) if rules is not None else contextlib.nullcontext():
        state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
        prompt_SxP = jax.device_put(np.broadcast_to(np.asarray(prompt_P, np.int32), (num_samples, len(prompt_P))),
                                    NamedSharding(mesh, PartitionSpec("data")))
        tokens_SxT = _sample(
            graphdef, state, prompt_SxP, jnp.asarray(allowed_V), jax.random.key(seed),
            jnp.float32(temperature), jnp.int32(min(top_k, len(allowed_V))), num_tokens=num_tokens,
        )
        return np.asarray(tokens_SxT)


def write_fasta(path: str, records: list[tuple[str, str]]) -> None:
    """(header, bases) records, 80 bases a line, written beside `path` then renamed over it."""
    with atomic_file(path) as f:
        for header, bases in records:
            f.write(f">{header}\n")
            f.writelines(bases[i : i + LINE_WIDTH] + "\n" for i in range(0, len(bases), LINE_WIDTH))


def _check_flags() -> None:
    if _CHECKPOINT.value is None:
        raise UserError("--checkpoint is required (a pretraining workdir or checkpoint step folder)")
    if (_PROMPT.value is None) == (_PROMPT_FASTA.value is None):
        raise UserError("give exactly one of --prompt and --prompt_fasta")
    if _NUM_BASES.value is None or _NUM_BASES.value < 1:
        raise UserError(f"--num_bases must be a positive integer, got {_NUM_BASES.value}")
    if _NUM_SAMPLES.value < 1:
        raise UserError(f"--num_samples must be a positive integer, got {_NUM_SAMPLES.value}")
    if not (math.isfinite(_TEMPERATURE.value) and _TEMPERATURE.value >= 0):
        raise UserError(f"--temperature must be 0 (greedy) or a positive number, got {_TEMPERATURE.value}")
    if not -(2**63) <= _SEED.value < 2**63:
        raise UserError(f"--seed must fit in 64 bits (-2^63 to 2^63 - 1), got {_SEED.value}")
    if _TOP_K.value < 0:
        raise UserError(f"--top_k must be 0 (no truncation) or positive, got {_TOP_K.value}")
    if not _OUTPUT.value:
        raise UserError("--output is required (a FASTA file to write)")
    check_can_create(_OUTPUT.value, "--output", folder=False)


@exits_cleanly_on_user_error
def main(argv) -> None:
    start_main(argv)
    _check_flags()
    prompt = _PROMPT.value if _PROMPT.value is not None else read_prompt_fasta(_PROMPT_FASTA.value)
    check_prompt(prompt)
    num_bases, num_samples = _NUM_BASES.value, _NUM_SAMPLES.value
    step_dir, config = pretrained.pretraining_checkpoint(_CHECKPOINT.value, "--checkpoint", "generation")
    tokenizer = generation_tokenizer(config)
    check_fits_model(prompt, num_bases, tokenizer, config.train.seq_len, _ALLOW_N.value)
    model = pretrained.load_for_inference(step_dir, config)
    start = time.perf_counter()
    tokens_SxT = sample(
        model, tokenizer.encode(prompt)[0], -(-num_bases // tokenizer.k),
        num_samples=num_samples, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
        allowed_V=allowed_tokens(tokenizer, config.model.vocab_size, _ALLOW_N.value), seed=_SEED.value,
        rules=config.mesh.logical_axis_rules,
    )
    seconds = time.perf_counter() - start
    generated_SxN = tokenizer.decode(tokens_SxT)[:, :num_bases]
    settings = f"prompt_bp={len(prompt)} generated_bp={num_bases} temperature={_TEMPERATURE.value} top_k={_TOP_K.value} seed={_SEED.value}"
    records = [(f"sample_{i} {settings}", prompt.upper() + bases.tobytes().decode("ascii")) for i, bases in enumerate(generated_SxN)]
    write_fasta(_OUTPUT.value, records)
    print(
        f"generated {num_samples} sample(s) × {num_bases} bp = {num_samples * num_bases} bases in {seconds:.1f}s "
        f"({num_samples * num_bases / seconds:.0f} bases/s, compilation included) → {_OUTPUT.value}",
        flush=True,
    )


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
