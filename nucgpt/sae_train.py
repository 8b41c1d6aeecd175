"""A sparse autoencoder on a pretrained model's residual stream, and what its latents read in the genome.

    python -m nucgpt.sae_train --checkpoint runs/demo --layer 1 --output runs/demo/sae_layer1

Training windows stream from the prepared genome's train split through the trainer's own pipeline;
the residual stream after block `--layer` is computed on the fly (jitted) and only real bases (not
padding, not N) reach the SAE (nucgpt/sae.py). Every batch is split over the local devices (each
runs the model on its own windows; the model and the SAE are replicated, gradients all-reduced).
No activations are stored. Then, on `--eval_windows` windows spread evenly over the config's
eval split:
- FVU, and the language-model cross-entropy with the stream clean, replaced by the SAE's
  reconstruction, or zeroed (at the same positions): loss recovered = (zero − sae) / (zero − clean);
- per latent: firing frequency, mean activation, the fraction of its firings on repeat (lowercase)
  bases against the repeat base rate, the base it fires on, and its top contexts (±16 bp, case kept).
The output folder (params.npz, sae.json, features.jsonl, summary.txt) is written to a hidden
temporary folder and renamed into place: an error, SIGTERM or Ctrl-C leaves nothing half-written.
Training progress is saved beside it (`<output>.resume/`, every `--save_every` steps, at the end of
training and on SIGTERM), so rerunning an interrupted command continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
import signal
import sys
import time
from typing import Sequence

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags
from etils import epath
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from nucgpt import checkpoint, pretrained, sae, sharding
from nucgpt import loss as lm_loss
from nucgpt.data import records
from nucgpt.data.pipeline import BATCH_KEYS, LmExample, make_lm_iterator, read_manifest
from nucgpt.errors import UserError, exits_cleanly_on_user_error, parse_flags, start_main
from nucgpt.files import check_can_create, check_replaceable, replace_folder, sibling_tmp_folder
from nucgpt.tasks.pretrain import bases_per_token
from nucgpt.tokenizers import BASES, PAD_ID, Tokenizer, base_codes, get_tokenizer

CONTEXT_BP = 16
MIN_FIRINGS = 10  # a latent needs this many eval firings to enter the enrichment tables
TABLE_ROWS = 10


@dataclasses.dataclass(frozen=True)
class Options:
    """Everything a run needs; the CLI flags map one to one."""

    checkpoint: str
    layer: int
    output: str
    data: str = ""  # empty: the checkpoint config's data.path
    latents: int = 4096
    k: int = 32
    aux_k: int = 256
    dead_tokens: int = 1_000_000
    steps: int = 1000
    batch_windows: int = 8
    learning_rate: float = 2e-4
    seed: int = 0
    eval_windows: int = 16
    top_contexts: int = 10
    log_every: int = 100
    save_every: int = 250
    devices: int = 0  # local devices each batch is split over; 0 = all
    overwrite: bool = False

    def sae_config(self) -> sae.SaeConfig:
        return sae.SaeConfig(latents=self.latents, k=self.k, aux_k=min(self.aux_k, self.latents),
                             dead_tokens=self.dead_tokens, learning_rate=self.learning_rate)


def check(options: Options) -> tuple[ConfigDict, epath.Path]:
    """(the pretraining config with data.path set, its step folder); every user error before arrays are read."""
    for name in ("latents", "k", "steps", "batch_windows", "eval_windows", "log_every", "dead_tokens"):
        if getattr(options, name) < 1:
            raise UserError(f"--{name}={getattr(options, name)} must be a positive integer")
    if options.aux_k < 0 or options.top_contexts < 0 or options.save_every < 0:
        raise UserError("--aux_k, --top_contexts and --save_every must be 0 or more")
    if not 0 <= options.devices <= jax.local_device_count():
        raise UserError(f"--devices={options.devices}: choose 1 to {jax.local_device_count()} (the local devices), or 0 for all")
    if options.batch_windows % len(_devices(options)):
        raise UserError(f"--batch_windows={options.batch_windows} must be a multiple of the {len(_devices(options))} "
                        "devices each batch is split over (--devices)")
    if options.k >= options.latents:
        raise UserError(f"--k={options.k} must be smaller than --latents={options.latents}")
    if not (math.isfinite(options.learning_rate) and options.learning_rate > 0):
        raise UserError(f"--learning_rate={options.learning_rate} must be a positive number")
    if options.dead_tokens > np.iinfo(np.int32).max:  # the dead-latent counters are int32
        raise UserError(f"--dead_tokens={options.dead_tokens} must be at most {np.iinfo(np.int32).max:,}")
    check_replaceable(options.output, "--output", overwrite=options.overwrite, marker="sae.json",
                      what="an SAE output folder")
    check_can_create(options.output, "--output", folder=True)
    step_dir, config = pretrained.pretraining_checkpoint(options.checkpoint, "--checkpoint", "a sparse autoencoder")
    num_layers = config.model.num_layers
    if not 0 <= options.layer <= num_layers:
        raise UserError(f"--layer={options.layer}: choose 0 (the embeddings) to {num_layers} (after the last block)")
    config.data.path = options.data or config.data.path
    if not config.data.path:
        raise UserError("--data: the checkpoint's config names no data folder; give a prepared one")
    splits = read_manifest(config.data.path)["splits"]
    for split in ("train", config.data.eval_split):
        if not splits.get(split, {}).get("records"):
            raise UserError(f"--data {config.data.path}: split {split!r} has no records")
    return config, step_dir


def _devices(options: Options) -> list[jax.Device]:
    return jax.local_devices()[: options.devices or None]


def load_model(config: ConfigDict, step_dir: epath.Path) -> tuple[nnx.GraphDef, dict]:
    """The Transformer's graph and its pretrained params on one device (no random init is run);
    `run_sae` replicates them over its devices."""
    graphdef, state = nnx.split(pretrained.load_for_inference(step_dir, config))
    return graphdef, nnx.to_pure_dict(state)


def _unknown_id(tokenizer: Tokenizer) -> int:
    """The id of an N base (nucleotide) or an N-holding k-mer (UNK): not a base the model reads as one."""
    return int(tokenizer.encode(b"N" * tokenizer.k)[0][0])


def token_mask(inputs_BxL: np.ndarray, tokenizer: Tokenizer) -> np.ndarray:
    """Input tokens that go to the SAE: real bases, not padding and not N."""
    return (inputs_BxL != PAD_ID) & (inputs_BxL != _unknown_id(tokenizer))


class Stopped(Exception):
    """Training stopped on SIGTERM after its progress was saved."""


class StopRequest:
    """The SIGTERM handler: while training, a save at the next step boundary (then `Stopped`);
    otherwise an immediate exit that unwinds (no half-written output)."""

    def __init__(self) -> None:
        self.requested = False
        self.training = False

    def __call__(self, signum: int, frame) -> None:
        if not self.training:
            sys.exit(128 + signum)
        self.requested = True


# Options that change what training computes: an unfinished run continues only under the same ones.
RESUME_SETTINGS = ("layer", "data", "latents", "k", "aux_k", "dead_tokens", "batch_windows", "learning_rate", "seed")


class Progress:
    """Training state beside the output, `<output>.resume/` (orbax; one step kept, each save whole):
    the SAE state, the data iterator's position and the console log so far. A finished run deletes it."""

    def __init__(self, options: Options, step_dir: epath.Path):
        self.directory = checkpoint.absolute_path(os.path.abspath(options.output) + ".resume")
        self.settings = {"checkpoint": str(step_dir), **{name: getattr(options, name) for name in RESUME_SETTINGS}}
        self.every = options.save_every
        self._manager: ocp.CheckpointManager | None = None

    def manager(self) -> ocp.CheckpointManager:
        if self._manager is None:
            self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
                max_to_keep=1, create=True, enable_async_checkpointing=False))
        return self._manager

    def saved_step(self) -> int | None:
        return self.manager().latest_step() if self.directory.exists() else None

    def saved_run(self) -> tuple[int, dict] | None:
        """(step, the run's settings and log) of the saved progress; None when there is none."""
        step = self.saved_step()
        if step is None:
            return None
        return step, self.manager().restore(step, args=ocp.args.Composite(run=ocp.args.JsonRestore()))["run"]

    def check(self, steps: int) -> None:
        """A UserError when the saved progress belongs to other settings or is past `--steps`."""
        saved = self.saved_run()
        if saved is None:
            return
        step, run = saved
        for name, value in self.settings.items():
            if run["settings"].get(name) != value:
                raise UserError(
                    f"{self.directory} holds an unfinished run with {'--' + name}={run['settings'].get(name)!r}, "
                    f"not {value!r}: rerun with its settings to continue it, or delete that folder to start over")
        if step > steps:
            raise UserError(f"--steps={steps}: the unfinished run in {self.directory} is already at step {step}")

    def due(self, step: int, last: bool) -> bool:
        return self.every > 0 and (step % self.every == 0 or last)

    def save(self, step: int, state: sae.State, iterator, log: list[dict], tokens: int) -> None:
        run = {"settings": self.settings, "log": log, "tokens": tokens}
        self.manager().save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=checkpoint.IteratorSave(iterator), run=ocp.args.JsonSave(run)))

    def restore(self, abstract_state: sae.State, iterator) -> tuple[sae.State, int, list[dict], int] | None:
        """(state, step, log, tokens trained) of the saved progress, the iterator moved to its position."""
        step = self.saved_step()
        if step is None:
            return None
        restored = self.manager().restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=checkpoint.IteratorRestore(iterator),
            run=ocp.args.JsonRestore()))
        if restored["data"] != "restored":  # the handler's outcome: "missing", or why the state did not apply
            print(f"warning: the data-iterator state saved at step {step} {'is missing' if restored['data'] == 'missing' else restored['data']}; "
                  "the windows restart from the beginning", flush=True)
        print(f"resumed from step {step} saved in {self.directory}", flush=True)
        return restored["state"], step, restored["run"]["log"], restored["run"]["tokens"]

    def delete(self) -> None:
        self.close()
        shutil.rmtree(self.directory, ignore_errors=True)

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None


def train(options: Options, config: ConfigDict, graphdef: nnx.GraphDef, params: dict, progress: Progress,
          stop: StopRequest, mesh: Mesh) -> tuple[sae.State, list[dict], int]:
    """(the SAE trained to `options.steps` batches of train windows, its console lines as dicts, tokens seen),
    continuing from `progress` when it holds a saved run. Batches are split over `mesh`'s data axis."""
    cfg, layer = options.sae_config(), options.layer
    tokenizer = get_tokenizer(config.data.tokenizer, pad_multiple=config.data.kmer_pad_multiple)
    iterator = make_lm_iterator(
        config.data, split="train", seq_len=config.train.seq_len, global_batch_size=options.batch_windows,
        seed=options.seed, train=True, process_index=0, process_count=1,
    )

    def residual_NxD(model_params, inputs_BxL, segment_ids_BxL):
        x_BxLxD = nnx.merge(graphdef, model_params).residual_stream(inputs_BxL, segment_ids_BxL, after_block=layer)
        return x_BxLxD.reshape(-1, x_BxLxD.shape[-1])

    def step_fn(state, model_params, inputs_BxL, segment_ids_BxL, mask_BxL):
        return sae.train_step(cfg, state, residual_NxD(model_params, inputs_BxL, segment_ids_BxL), mask_BxL.reshape(-1))

    replicated, split_rows = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))

    def model_inputs(batch):
        """(inputs, segment ids, the SAE's token mask), each device given its own rows; the mask's count."""
        mask_BxL = token_mask(batch["inputs"], tokenizer)
        return jax.device_put((batch["inputs"], batch["segment_ids"], mask_BxL), split_rows), int(mask_BxL.sum())

    def fresh_state(batch):
        (inputs_BxL, segment_ids_BxL, mask_BxL), _ = model_inputs(batch)
        x_NxD = jax.jit(residual_NxD)(params, inputs_BxL, segment_ids_BxL)
        return jax.device_put(sae.init_state(cfg, jax.random.key(options.seed), x_NxD, mask_BxL.reshape(-1)), replicated)

    step = jax.jit(step_fn, donate_argnums=0, out_shardings=replicated)
    rows = options.batch_windows * config.train.seq_len
    x_shape = jax.ShapeDtypeStruct((rows, config.model.d_model), jnp.float32)
    abstract_state = jax.eval_shape(lambda x, m: sae.init_state(cfg, jax.random.key(0), x, m), x_shape,
                                    jax.ShapeDtypeStruct((rows,), jnp.bool_))
    resumed = progress.restore(jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
                                            abstract_state), iterator)
    if resumed is None:
        first = next(iterator)
        state, done, log, total, batches = fresh_state(first), 0, [], 0, itertools.chain([first], iterator)
    else:
        (state, done, log, total), batches = resumed, iterator
    tokens, start = 0, time.perf_counter()
    stop.training = True
    try:
        for i, batch in zip(range(done + 1, options.steps + 1), batches):
            (inputs_BxL, segment_ids_BxL, mask_BxL), count = model_inputs(batch)
            state, metrics = step(state, params, inputs_BxL, segment_ids_BxL, mask_BxL)
            tokens += count
            if i % options.log_every == 0 or i == options.steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                rate = tokens / (time.perf_counter() - start)
                print(f"step {i:>7d} | fvu {metrics['fvu']:.4f} | dead {metrics['dead_fraction']:.1%} | "
                      f"aux {metrics['aux_loss']:.3f} | {rate:,.0f} tok/s", flush=True)
                log.append({"step": i, **metrics, "tokens_per_sec": rate})
                total, tokens, start = total + tokens, 0, time.perf_counter()
            if progress.due(i, last=i == options.steps) or stop.requested:
                progress.save(i, state, iterator, log, total + tokens)
            if stop.requested:
                raise Stopped(f"stopped by SIGTERM at step {i}; progress saved in {progress.directory}: "
                              "rerun the same command to continue")
    finally:
        stop.training = False
    return state, log, total


@dataclasses.dataclass
class Window:
    chrom: str
    start: int
    sequence: bytes  # softmasked, as in the genome


def eval_windows(config: ConfigDict, count: int) -> tuple[list[bytes], list[Window]]:
    """Up to `count` records spread evenly over the eval split (raw, and decoded), in genome order."""
    manifest = read_manifest(config.data.path)
    shards = [os.path.join(config.data.path, s) for s in manifest["splits"][config.data.eval_split]["shards"]]
    source = grain.sources.ArrayRecordDataSource(shards)
    indices = np.unique(np.linspace(0, len(source) - 1, min(count, len(source))).round().astype(int))
    raw = [source[int(i)] for i in indices]
    return raw, [Window(*records.decode_record(r)) for r in raw]


class FeatureStats:
    """Per-latent sums over eval tokens: firings, activation, repeat firings, bases, top activations."""

    def __init__(self, latents: int, top: int):
        self.tokens = self.repeat_tokens = 0
        self.firings_F = np.zeros(latents, np.int64)
        self.activation_F = np.zeros(latents)
        self.repeat_firings_F = np.zeros(latents, np.int64)
        self.bases_Fx4 = np.zeros((latents, len(BASES)), np.int64)
        self.top_values_FxM = np.zeros((latents, top), np.float32)
        self.top_tokens_FxM = np.full((latents, top), -1, np.int64)

    def add(self, values_NxK, indices_NxK, mask_N, repeat_N, base_N, top_values_FxM, top_tokens_FxM) -> None:
        """One batch; token ids in `top_tokens_FxM` are already global (window · L + position)."""
        latents = len(self.firings_F)
        self.tokens += int(mask_N.sum())
        self.repeat_tokens += int((mask_N & repeat_N).sum())
        fired = values_NxK > 0  # masked tokens carry zero values
        token_T, latent_T = np.nonzero(fired)[0], indices_NxK[fired]
        self.firings_F += np.bincount(latent_T, minlength=latents)
        self.activation_F += np.bincount(latent_T, weights=values_NxK[fired], minlength=latents)
        self.repeat_firings_F += np.bincount(latent_T, weights=repeat_N[token_T], minlength=latents).astype(np.int64)
        self.bases_Fx4 += np.bincount(latent_T * len(BASES) + base_N[token_T], minlength=latents * len(BASES)).reshape(latents, -1)
        values = np.concatenate([self.top_values_FxM, top_values_FxM], axis=1)
        tokens = np.concatenate([self.top_tokens_FxM, top_tokens_FxM], axis=1)
        order = np.argsort(-values, axis=1, kind="stable")[:, : self.top_values_FxM.shape[1]]
        self.top_values_FxM = np.take_along_axis(values, order, axis=1)
        self.top_tokens_FxM = np.take_along_axis(tokens, order, axis=1)


def _eval_fn(options: Options, graphdef: nnx.GraphDef, top: int):
    """The jitted eval of one batch: variance sums, LM stats of the clean / SAE / zeroed stream, the
    sparse codes, and each latent's `top` largest activations (as flat token indices of the batch)."""
    cfg, layer = options.sae_config(), options.layer

    @jax.jit
    def eval_fn(model_params, sae_state, batch, mask_BxL):
        model = nnx.merge(graphdef, model_params)
        segment_ids_BxL = batch["segment_ids"]
        x_BxLxD = model.residual_stream(batch["inputs"], segment_ids_BxL, after_block=layer)
        mask_N, scale, sae_params = mask_BxL.reshape(-1).astype(jnp.float32), sae_state["scale"], sae_state["params"]
        x_NxD = x_BxLxD.reshape(-1, x_BxLxD.shape[-1]).astype(jnp.float32) * scale
        values_NxK, indices_NxK = sae.encode(sae_params, x_NxD, cfg.k)
        values_NxK = values_NxK * mask_N[:, None]
        codes_NxF = sae.dense_codes(values_NxK, indices_NxK, cfg.latents)
        x_hat_NxD = sae.decode(sae_params, codes_NxF)
        x_hat_BxLxD = (x_hat_NxD / scale).reshape(x_BxLxD.shape).astype(x_BxLxD.dtype)
        streams = {
            "clean": x_BxLxD,
            "sae": jnp.where(mask_BxL[..., None], x_hat_BxLxD, x_BxLxD),
            "zero": jnp.where(mask_BxL[..., None], jnp.zeros_like(x_BxLxD), x_BxLxD),
        }
        lm_stats = {
            name: lm_loss.lm_stats(model.logits_from_residual(stream, segment_ids_BxL, after_block=layer),
                                   batch["targets"], batch["target_valid"], batch["target_repeat"], 1.0)[1]
            for name, stream in streams.items()
        }
        top_values_FxM, top_tokens_FxM = jax.lax.top_k(codes_NxF.T, top)
        variance = sae.variance_sums(sae_params, x_NxD, x_hat_NxD, mask_N)
        return variance, lm_stats, values_NxK, indices_NxK, top_values_FxM, top_tokens_FxM

    return eval_fn


def _eval_batch(config: ConfigDict, raw: list[bytes], windows: list[Window], rows: int) -> dict[str, np.ndarray]:
    """The pipeline's example transform over `raw` (padded to `rows` with all-padding rows, so one compiled
    shape serves every batch), plus what the report needs per input token: mask, repeat flag, base index."""
    seq_len, bp_per_token = config.train.seq_len, bases_per_token(config)
    tokenizer = get_tokenizer(config.data.tokenizer, pad_multiple=config.data.kmer_pad_multiple)
    example = LmExample(tokenizer, seq_len, reverse_complement_prob=0.0)  # deterministic: the rng is unused
    examples = [example.random_map(r, None) for r in raw + [b""] * (rows - len(raw))]
    batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
    batch["mask"] = token_mask(batch["inputs"], tokenizer)
    batch["repeat"], batch["base"] = np.zeros((rows, seq_len), bool), np.zeros((rows, seq_len), np.int64)
    for row, window in enumerate(windows):
        repeat_T = tokenizer.encode(window.sequence)[1][:seq_len]
        batch["repeat"][row, : len(repeat_T)] = repeat_T
        bases_T = base_codes(window.sequence[::bp_per_token][:seq_len])
        batch["base"][row, : len(bases_T)] = np.where(bases_T < len(BASES), bases_T, 0)  # N only where the mask is off
    return batch


def evaluate(options: Options, config: ConfigDict, graphdef: nnx.GraphDef, params: dict,
             state: sae.State, mesh: Mesh) -> tuple[dict, FeatureStats, list[Window]]:
    """(metrics, per-latent statistics, the windows they index) on held-out windows, each batch split
    over `mesh`'s data axis."""
    seq_len, bp_per_token, rows = config.train.seq_len, bases_per_token(config), options.batch_windows
    top = max(min(options.top_contexts, rows * seq_len), 1)
    eval_fn = _eval_fn(options, graphdef, top)
    raw, windows = eval_windows(config, options.eval_windows)
    stats = FeatureStats(options.latents, top)
    variance_total, lm_total = None, None
    for first in range(0, len(raw), rows):
        batch = _eval_batch(config, raw[first : first + rows], windows[first : first + rows], rows)
        model_batch, mask_BxL = jax.device_put(({k: batch[k] for k in BATCH_KEYS}, batch["mask"]),
                                               NamedSharding(mesh, PartitionSpec("data")))
        variance, lm_stats, *codes = jax.device_get(eval_fn(params, state, model_batch, mask_BxL))
        values_NxK, indices_NxK, top_values_FxM, top_tokens_FxM = codes
        stats.add(values_NxK, indices_NxK, batch["mask"].reshape(-1), batch["repeat"].reshape(-1),
                  batch["base"].reshape(-1), top_values_FxM, top_tokens_FxM + first * seq_len)
        variance_total, lm_total = _add(variance_total, variance), _add(lm_total, lm_stats)
    lm = {name: lm_loss.lm_metrics(s, bp_per_token) for name, s in lm_total.items()}
    nats = {name: m["ce"] / bp_per_token for name, m in lm.items()}
    metrics = {
        "fvu": float(sae.fvu(variance_total)),
        "l0": float(stats.firings_F.sum() / max(stats.tokens, 1)),
        "tokens": stats.tokens,
        "windows": len(windows),
        "repeat_base_rate": stats.repeat_tokens / max(stats.tokens, 1),
        "never_fired_fraction": float(np.mean(stats.firings_F == 0)),
        **{f"nats_per_base_{name}": value for name, value in nats.items()},
        **{f"nats_per_base_{name}_{kind}": lm[name][f"loss_{kind}"] / bp_per_token
           for name in lm for kind in ("repeat", "unique")},
        "loss_recovered": (nats["zero"] - nats["sae"]) / (nats["zero"] - nats["clean"])
        if nats["zero"] != nats["clean"] else float("nan"),
    }
    return metrics, stats, windows


def _add(total: dict | None, part: dict) -> dict:
    return part if total is None else jax.tree.map(np.add, total, part)


def _context(window: Window, token: int, bp_per_token: int, span: int) -> dict:
    offset = token * bp_per_token
    text = window.sequence.decode("ascii")
    left, middle = text[max(offset - CONTEXT_BP, 0) : offset], text[offset : offset + span]
    right = text[offset + span : offset + span + CONTEXT_BP]
    return {"chrom": window.chrom, "position": window.start + offset, "context": f"{left}[{middle}]{right}"}


def feature_records(options: Options, config: ConfigDict, stats: FeatureStats, windows: list[Window],
                    dead_F: np.ndarray) -> list[dict]:
    """One dict per latent, most frequent first. Positions are 0-based genome coordinates of the token's
    first base; the context brackets the token's bases, lowercase = repeat."""
    seq_len, bp_per_token = config.train.seq_len, bases_per_token(config)
    span = get_tokenizer(config.data.tokenizer, pad_multiple=config.data.kmer_pad_multiple).k
    base_rate = stats.repeat_tokens / stats.tokens if stats.tokens else float("nan")
    features = []
    for latent in range(len(stats.firings_F)):
        firings = int(stats.firings_F[latent])
        repeat_fraction = stats.repeat_firings_F[latent] / firings if firings else None
        contexts = []
        for value, token in zip(stats.top_values_FxM[latent][: options.top_contexts], stats.top_tokens_FxM[latent]):
            if value > 0:
                window = windows[token // seq_len]
                contexts.append({"activation": float(value), **_context(window, int(token % seq_len), bp_per_token, span)})
        features.append({
            "latent": latent,
            "frequency": firings / stats.tokens if stats.tokens else 0.0,
            "firings": firings,
            "mean_activation": float(stats.activation_F[latent] / firings) if firings else None,
            "repeat_fraction": float(repeat_fraction) if firings else None,
            "repeat_enrichment": float(repeat_fraction / base_rate) if firings and base_rate > 0 else None,
            "bases": {b: float(stats.bases_Fx4[latent, i] / firings) for i, b in enumerate(BASES)} if firings else None,
            "dead_in_training": bool(dead_F[latent]),
            "top_contexts": contexts,
        })
    return sorted(features, key=lambda f: (-f["firings"], f["latent"]))


def summary(meta: dict, features: list[dict]) -> str:
    """The headline metrics and the most repeat-enriched and -depleted latents (≥ MIN_FIRINGS firings)."""
    e = meta["eval"]
    lines = [
        f"SAE on layer {meta['layer']} of {meta['checkpoint']}: {meta['latents']} latents, k={meta['k']}, "
        f"{meta['steps']} steps ({meta['train_tokens']:,} tokens)",
        f"eval on {e['windows']} windows ({e['tokens']:,} tokens): FVU {e['fvu']:.4f}, L0 {e['l0']:.1f}, "
        f"dead in training {meta['train']['dead_fraction']:.1%}, never fired in eval {e['never_fired_fraction']:.1%}",
        f"LM loss (nats/base): clean {e['nats_per_base_clean']:.4f}, SAE spliced in {e['nats_per_base_sae']:.4f}, "
        f"zero-ablated {e['nats_per_base_zero']:.4f}; loss recovered {e['loss_recovered']:.1%}",
        f"repeat (lowercase) base rate: {e['repeat_base_rate']:.1%}",
    ]
    live = [f for f in features if f["firings"] >= MIN_FIRINGS and f["repeat_enrichment"] is not None]
    for title, chosen in (
        ("most repeat-enriched", sorted(live, key=lambda f: -f["repeat_enrichment"])[:TABLE_ROWS]),
        ("most repeat-depleted", sorted(live, key=lambda f: f["repeat_enrichment"])[:TABLE_ROWS]),
    ):
        lines += ["", f"{title} live latents (≥ {MIN_FIRINGS} firings):",
                  f"{'latent':>7} {'freq':>8} {'repeat':>7} {'enrich':>7}  top context"]
        for f in chosen:
            top = f["top_contexts"][0]["context"] if f["top_contexts"] else ""
            lines.append(f"{f['latent']:>7d} {f['frequency']:>8.2%} {f['repeat_fraction']:>7.1%} "
                         f"{f['repeat_enrichment']:>7.2f}  {top}")
        if not chosen:
            lines.append("  (none)")
    return "\n".join(lines) + "\n"


def _strict_json(value):
    """NaN/Inf (an FVU of a dead SAE, say) as null: bare NaN is not JSON, and strict readers reject it."""
    if isinstance(value, dict):
        return {k: _strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict_json(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def write_output(output: str, params: dict, meta: dict, features: list[dict], text: str) -> None:
    """Writes into a hidden sibling folder, then renames it to `output` (an old one goes only after that)."""
    output = os.path.abspath(output)
    tmp = sibling_tmp_folder(output)
    try:
        np.savez(os.path.join(tmp, "params.npz"), **{k: np.asarray(v) for k, v in params.items()})
        with open(os.path.join(tmp, "sae.json"), "w") as f:
            json.dump(_strict_json(meta), f, indent=2, allow_nan=False)
        with open(os.path.join(tmp, "features.jsonl"), "w") as f:
            f.writelines(json.dumps(_strict_json(feature), allow_nan=False) + "\n" for feature in features)
        with open(os.path.join(tmp, "summary.txt"), "w") as f:
            f.write(text)
        replace_folder(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_sae(directory: str) -> tuple[sae.Params, dict]:
    """(params, sae.json) of a finished run; `meta["scale"]` normalises activations before `sae.encode`."""
    with np.load(os.path.join(directory, "params.npz")) as arrays:
        params = {k: jnp.asarray(arrays[k]) for k in arrays.files}
    with open(os.path.join(directory, "sae.json")) as f:
        return params, json.load(f)


def run_sae(options: Options, stop: StopRequest | None = None) -> dict:
    """Check, train (or continue), evaluate, report, write; returns the sae.json contents."""
    config, step_dir = check(options)
    progress = Progress(options, step_dir)
    mesh = sharding.data_parallel_mesh(_devices(options))
    with sharding.use_mesh(mesh, config.mesh.logical_axis_rules):
        try:
            progress.check(options.steps)
            graphdef, params = load_model(config, step_dir)
            params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
            print(f"layer {options.layer} of {step_dir} (d_model {config.model.d_model}); {options.latents} latents, "
                  f"k={options.k}; {mesh.size} device(s); data {config.data.path}", flush=True)
            state, log, train_tokens = train(options, config, graphdef, params, progress, stop or StopRequest(), mesh)
        finally:
            progress.close()
        metrics, stats, windows = evaluate(options, config, graphdef, params, state, mesh)
    dead_F = np.asarray(state["tokens_since_fired_F"]) >= options.dead_tokens
    features = feature_records(options, config, stats, windows, dead_F)
    meta = {
        "checkpoint": str(step_dir),
        "checkpoint_step": int(step_dir.name) if step_dir.name.isdigit() else None,
        "data": config.data.path,
        "eval_split": config.data.eval_split,
        "layer": options.layer,
        "d_model": config.model.d_model,
        "latents": options.latents,
        "k": options.k,
        "aux_k": options.sae_config().aux_k,
        "dead_tokens": options.dead_tokens,
        "scale": float(state["scale"]),
        "steps": options.steps,
        "batch_windows": options.batch_windows,
        "learning_rate": options.learning_rate,
        "seed": options.seed,
        "train_tokens": train_tokens,
        "train": {k: v for k, v in log[-1].items() if k != "step"},
        "train_log": log,
        "eval": metrics,
    }
    text = summary(meta, features)
    write_output(options.output, jax.device_get(state["params"]), meta, features, text)
    progress.delete()
    print(text, end="")
    print(f"wrote {options.output}", flush=True)
    return meta


def _define_flags() -> None:
    """Flags exist only when this module is the program, so importing it never clashes with others."""
    defaults = Options(checkpoint="", layer=0, output="")
    flags.DEFINE_string("checkpoint", None, "A pretraining workdir (its newest checkpoint) or one step folder.")
    flags.DEFINE_integer("layer", None, "Read the residual stream after this many blocks (0 = the embeddings).")
    flags.DEFINE_string("output", None, "A new folder for params.npz, sae.json, features.jsonl, summary.txt.")
    flags.DEFINE_string("data", defaults.data, "A prepared genome folder (default: the checkpoint config's data.path).")
    flags.DEFINE_integer("latents", defaults.latents, "SAE dictionary size.")
    flags.DEFINE_integer("k", defaults.k, "Latents kept per token (TopK): the L0.")
    flags.DEFINE_integer("aux_k", defaults.aux_k, "Dead latents used by the AuxK loss (0 = no AuxK).")
    flags.DEFINE_integer("dead_tokens", defaults.dead_tokens, "A latent silent for this many tokens is dead.")
    flags.DEFINE_integer("steps", defaults.steps, "Training steps.")
    flags.DEFINE_integer("batch_windows", defaults.batch_windows, "Genome windows per step (and per eval batch).")
    flags.DEFINE_float("learning_rate", defaults.learning_rate, "Adam learning rate.")
    flags.DEFINE_integer("seed", defaults.seed, "Seed of the SAE init and the training window order.")
    flags.DEFINE_integer("eval_windows", defaults.eval_windows, "Held-out windows for the metrics and the feature report.")
    flags.DEFINE_integer("top_contexts", defaults.top_contexts, "Top activating contexts kept per latent.")
    flags.DEFINE_integer("log_every", defaults.log_every, "Steps between console lines.")
    flags.DEFINE_integer("save_every", defaults.save_every,
                         "Steps between saves of the training progress to <output>.resume/ (0 = never).")
    flags.DEFINE_integer("devices", defaults.devices, "Local devices each batch is split over (0 = all).")
    flags.DEFINE_bool("overwrite", defaults.overwrite, "Replace an existing --output folder.")


@exits_cleanly_on_user_error
def main(argv: Sequence[str]) -> None:
    start_main(argv)
    for name in ("checkpoint", "layer", "output"):
        if flags.FLAGS[name].value is None:
            raise UserError(f"--{name} is required")
    stop = StopRequest()
    signal.signal(signal.SIGTERM, stop)
    try:
        run_sae(Options(**{f.name: flags.FLAGS[f.name].value for f in dataclasses.fields(Options)}), stop)
    except Stopped as e:
        print(e, file=sys.stderr, flush=True)
        sys.exit(128 + signal.SIGTERM)


def run() -> None:
    _define_flags()
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
