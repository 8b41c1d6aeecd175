"""Tasks: everything that differs between pretraining and fine-tuning, behind one small interface.

The trainer (`nucgpt.step`, `nucgpt.train`) knows nothing about heads, losses or data formats; a
task supplies them. A new task is a new module `nucgpt/tasks/<name>.py` defining `TASK = <Task
subclass>()`; `get_task(name)` imports it lazily, so `--config.task=<name>` finds it without edits
anywhere else.

The contract, in the order the trainer uses it:

- `resolve_config(config, workdir)`: fill in derived settings on every process (e.g. the demo's
  data folder under the workdir). Pure; no I/O.
- `prepare_data(config)`: make the data exist (generate + prepare the demo genome). Called on
  process 0 only; the others wait at a barrier.
- `validate(config)`: checks of what the config points at (a data folder without a manifest,
  ...); raise `UserError` naming the field. Not called by `--dry_run`, which needs no data.
- `build_model(config, rngs)`: the Flax NNX module (trunk + head).
- `initial_params(config, params, shardings)`: a hook on fresh (not resumed) runs, e.g. to load a
  pretrained trunk from `config.init_from`. Default: unchanged.
- `loss(model, batch, config) -> (total, stats)`: pure, runs inside jit. `total` is a *sum* over the
  batch (e.g. Σ w·CE) and `stats["weight"]` its normaliser (Σ w); the trainer minimises
  Σ total / Σ weight, which keeps gradient accumulation and data parallelism exact. Every entry
  of `stats` is a sum (scalar or array, e.g. a confusion matrix) so it adds across micro-batches
  and eval batches.
- `loss_weight(batch, config)`: the same Σ w from the batch alone, before any forward pass: the
  train step divides each micro-batch's `total` by the whole batch's Σ w before differentiating,
  so gradients come out normalised (no extra pass over them). Must equal `stats["weight"]`.
- `finalize_metrics(stats, config) -> dict[str, float]`: host-side ratios from summed stats
  (loss, accuracy, bits per base, ...); the same function serves train and eval.
- `batch_axes(config)`: logical axes of every batch field (mapped to the mesh by the rules).
- `dummy_batch(config, local_batch_size)`: numpy arrays of the right shapes and dtypes, for
  `--dry_run` and for synthetic-batch benchmarks.
- `train_iterator(...)` / `eval_iterator(...)`: per-process numpy batches; the train iterator has
  `get_state()` / `set_state()` so it lives in the checkpoint; the eval iterator makes one pass.
- `summarize(workdir, config, step, eval_metrics)`: end-of-run hook on process 0 (classify writes
  results.json there). Default: nothing.
"""

import abc
import importlib
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from nucgpt.errors import UserError

Batch = Mapping[str, np.ndarray]
Stats = dict[str, jax.Array]


class Task(abc.ABC):
    """What a training task supplies to the trainer (see the module docstring for the contract)."""

    def resolve_config(self, config: ConfigDict, workdir: str) -> ConfigDict:
        return config

    def prepare_data(self, config: ConfigDict) -> None:
        pass

    def validate(self, config: ConfigDict) -> None:
        pass

    @abc.abstractmethod
    def build_model(self, config: ConfigDict, rngs: nnx.Rngs) -> nnx.Module: ...

    def initial_params(self, config: ConfigDict, params: Any, shardings: Any) -> Any:
        return params

    def trainable(self, config: ConfigDict) -> Callable[[tuple[str, ...]], bool] | None:
        """A parameter's path names → whether it trains (False: never updated, no optimizer state); None: all train."""
        return None

    @abc.abstractmethod
    def loss(self, model: nnx.Module, batch: Mapping[str, jax.Array], config: ConfigDict) -> tuple[jax.Array, Stats]: ...

    @abc.abstractmethod
    def loss_weight(self, batch: Mapping[str, jax.Array], config: ConfigDict) -> jax.Array: ...

    @abc.abstractmethod
    def finalize_metrics(self, stats: Mapping[str, np.ndarray], config: ConfigDict) -> dict[str, float]: ...

    @abc.abstractmethod
    def batch_axes(self, config: ConfigDict) -> dict[str, tuple[str, ...]]: ...

    @abc.abstractmethod
    def dummy_batch(self, config: ConfigDict, local_batch_size: int) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def train_iterator(self, config: ConfigDict, process_index: int, process_count: int) -> Iterator[Batch]: ...

    @abc.abstractmethod
    def eval_iterator(self, config: ConfigDict, process_index: int, process_count: int) -> Iterator[Batch]: ...

    def summarize(self, workdir: str, config: ConfigDict, step: int, eval_metrics: Mapping[str, float]) -> None:
        pass


def get_task(name: str) -> Task:
    """The task of `nucgpt/tasks/<name>.py` (its module-level `TASK`), imported on first use."""
    if not name.isidentifier():
        raise UserError(f"task: {name!r} is not a task name")
    try:
        module = importlib.import_module(f"nucgpt.tasks.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"nucgpt.tasks.{name}":
            raise
        raise UserError(f"task: unknown task {name!r} (no module nucgpt/tasks/{name}.py)") from None
    return module.TASK
