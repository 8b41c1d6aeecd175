"""The trainer: `python -m nucgpt.train --config configs/pretrain.py:<preset> --workdir DIR`.

One loop for every task (`--config.task`): validate the config, make the data exist (process 0),
build the trainer (`nucgpt.step`), resume from the newest good checkpoint or initialise, then
train with metrics read one step late, evaluation every `train.eval_every` steps, checkpoints
every `checkpoint.every` steps and at the end. SIGTERM saves at the next step boundary and exits
0; a non-finite loss stops the run (exit 1) before anything is saved from it.

The console shows the trainer's own lines (process 0: data, resume, step, eval, save, warnings);
the libraries' INFO logs (orbax, jax) are hidden unless asked for: `--verbosity=0` shows them,
`-v 1` adds debug logs.
"""

import math
import os
import shutil
import signal
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils
from ml_collections import ConfigDict, config_flags

from nucgpt import config as config_lib
from nucgpt import diagnostics, distributed, sharding
from nucgpt.checkpoint import Checkpoints, divergence_report, latest_step_dir, save_config
from nucgpt.errors import UserError, exits_cleanly_on_user_error, parse_flags, start_main
from nucgpt.files import check_can_create
from nucgpt.flops import Throughput, batch_tokens
from nucgpt.metrics_log import MetricsLogger
from nucgpt.model.attention import mesh_platform
from nucgpt.step import Trainer, build_trainer
from nucgpt.tasks import Task, get_task

_CONFIG = config_flags.DEFINE_config_file("config", None, "A config file and preset: configs/pretrain.py:demo.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and the demo's data go (local or gs://).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Build the mesh, abstract state and compiled step; print a summary; do not train.")

EXIT_DIVERGED = 1


class Diverged(Exception):
    """The loss or gradient norm of `step` became NaN/Inf (computed from the parameters of step - 1)."""

    def __init__(self, step: int, message: str):
        super().__init__(message)
        self.step = step


def _add(total: dict | None, stats: Mapping[str, np.ndarray]) -> dict:
    return dict(stats) if total is None else {k: total[k] + stats[k] for k in total}


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class Preemption:
    """SIGTERM → a checkpoint at a step every process agrees on, then exit 0.

    Several processes: JAX's preemption service (on by default with jax.distributed) catches SIGTERM
    on any one of them — a scheduler may warn a single host — tells the others through the
    coordination service, and names the step at which all of them save; asking costs no collective,
    so it is asked at every step. One process: a Python handler sets a flag read at every step.
    """

    def __init__(self, fallback_every: int):
        self.requested = False
        self.fallback_every = fallback_every
        self.service = jax.process_count() > 1 and bool(jax.config.jax_enable_preemption_service)
        if not self.service:
            signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, step: int) -> bool:
        """Call at every step with the step just dispatched (every process from the same start)."""
        if self.service:
            return multihost_utils.reached_preemption_sync_point(step)
        if jax.process_count() == 1:
            return self.requested
        # Several processes without the service: agree by an all-gather, at log steps only.
        return step % self.fallback_every == 0 and bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


def evaluate(trainer: Trainer, state: Any) -> dict[str, float]:
    """The task's metrics over `train.eval_steps` batches of the eval split (0 = one whole pass)."""
    config, task = trainer.config, trainer.task
    total = None
    for i, local_batch in enumerate(task.eval_iterator(config, jax.process_index(), jax.process_count())):
        if config.train.eval_steps and i >= config.train.eval_steps:
            break
        total = _add(total, jax.device_get(trainer.eval_step(state, trainer.global_batch(local_batch))))
    if total is None:
        raise UserError(f"data.eval_split: the {config.data.eval_split!r} split yielded no batches")
    return task.finalize_metrics(total, config)


class Loop:
    """Training steps with one-step-late metrics, periodic eval and checkpoints."""

    def __init__(self, trainer: Trainer, workdir: str, checkpoints: Checkpoints, train_iterator, state):
        self.trainer, self.config, self.task = trainer, trainer.config, trainer.task
        self.workdir, self.checkpoints, self.train_iterator, self.state = workdir, checkpoints, train_iterator, state
        start = int(jax.device_get(state["step"]))
        self.logger = MetricsLogger(workdir, enabled=jax.process_index() == 0, start_step=start,
                                    evaluates_start=bool(self.config.eval_only) or start >= self.config.train.steps)
        self.profiler = diagnostics.StepProfiler(trainer.config.diagnostics, f"{workdir.rstrip('/')}/tensorboard", enabled=jax.process_index() == 0)
        self.window: dict | None = None
        self.last_scalars: dict[str, float] = {}
        self.last_saved = start if start in checkpoints.all_steps() else None  # the step restored, not a newer one

    def absorb(self, step: int, metrics: Mapping[str, jax.Array], tokens: int) -> None:
        """Reads one step's metrics (blocking on that step only), stops on NaN/Inf, logs every log_every."""
        metrics = jax.device_get(metrics)
        self.throughput.count(tokens)
        if not all(np.all(np.isfinite(v)) for v in metrics.values()):
            bad = ", ".join(k for k, v in metrics.items() if not np.all(np.isfinite(v)))
            raise Diverged(step, f"non-finite {bad} at step {step}")
        self.last_scalars = {k: float(metrics.pop(k)) for k in ("grad_norm", "learning_rate")}
        self.window = _add(self.window, metrics)
        if step % self.config.train.log_every == 0 or step == self.config.train.steps:
            self.log_window(step)

    def log_window(self, step: int) -> None:
        """One train line for the steps absorbed since the last one (also cut short by a preemption)."""
        if self.window is not None:
            values = self.task.finalize_metrics(self.window, self.config) | self.last_scalars | self.throughput.measure(step)
            self.logger.log(step, values)
            self.window = None

    def missed_eval(self, step: int) -> bool:
        """Whether the restored step is an eval step without an eval line (process 0 reads the log)."""
        config = self.config
        due = 0 < step < config.train.steps and step % config.train.eval_every == 0
        missing = np.int32(due and jax.process_index() == 0 and not self.logger.has_eval_at(step))
        if due and jax.process_count() > 1:
            missing = multihost_utils.broadcast_one_to_all(missing)
        return bool(missing)

    def save(self, step: int) -> None:
        if self.last_saved != step:
            self.checkpoints.save(self.state, self.train_iterator, self.config)
            self.last_saved = step
            if jax.process_index() == 0:
                print(f"step {step:>7d} | checkpoint saving to {self.checkpoints.directory / str(step)}", flush=True)

    def run_eval(self, step: int) -> dict[str, float]:
        metrics = evaluate(self.trainer, self.state)
        self.logger.log(step, {f"eval_{k}": v for k, v in metrics.items()})
        return metrics

    def run(self) -> tuple[int, dict[str, float] | None, bool]:
        """Trains to `train.steps`; returns (final step, last eval metrics, preempted)."""
        config = self.config
        preemption = Preemption(fallback_every=config.train.log_every)
        step = int(jax.device_get(self.state["step"]))
        self.throughput = Throughput(config, step)
        pending = None
        eval_metrics = None
        run_step = 0  # steps of this process's run: the profiler counts from its start, resumed or not
        if self.missed_eval(step):  # a preemption on an eval step saved without evaluating
            eval_metrics = self.run_eval(step)
        try:
            while step < config.train.steps:
                run_step += 1
                self.profiler.before_step(run_step)
                batch = self.trainer.global_batch(next(self.train_iterator))
                with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                    self.state, metrics = self.trainer.train_step(self.state, batch)
                if run_step == 1:  # the first call compiled before it dispatched: keep that out of tokens/s and MFU
                    self.throughput.restart(step)
                step += 1
                self.profiler.after_step(run_step, metrics)
                if pending is not None:
                    self.absorb(*pending)
                pending = (step, metrics, batch_tokens(batch))
                last = step == config.train.steps
                preempted = preemption.agreed(step)
                do_eval = step % config.train.eval_every == 0 or last
                do_save = step % config.checkpoint.every == 0 or last or preempted
                if do_eval or do_save:
                    self.absorb(*pending)
                    pending = None
                if do_save:
                    self.save(step)
                if do_eval and not preempted:
                    eval_metrics = self.run_eval(step)
                    self.throughput.restart(step)
                if preempted:
                    self.log_window(step)  # the steps since the last line would otherwise be in none
                    return step, eval_metrics, True
        finally:
            self.profiler.stop()
        if pending is not None:
            self.absorb(*pending)
        return step, eval_metrics, False


def dry_run(config: ConfigDict, mesh) -> None:
    """Mesh, parameter count, compiled step and its per-device memory: nothing is allocated for params."""
    start = time.perf_counter()
    trainer = build_trainer(config, mesh)
    compiled = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch()).compile()
    params = trainer.abstract_state["params"]
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    if jax.process_index() != 0:
        return
    devices = mesh.devices.ravel()
    print(f"preset: {config.get('preset', '?')}  task: {config.task}")
    print(f"mesh: {dict(mesh.shape)} over {len(devices)} {devices[0].platform} device(s) ({devices[0].device_kind})")
    print(f"parameters: {num_params:,}")
    print(f"global batch {config.train.global_batch_size} × seq {config.train.seq_len}; grad accumulation {config.train.grad_accum_steps}")
    print(f"train step lowered and compiled in {time.perf_counter() - start:.1f}s")
    memory = compiled.memory_analysis()
    if memory is not None:
        gib = lambda b: f"{b / 2**30:.2f} GiB"
        args, out, temp, alias = (
            memory.argument_size_in_bytes, memory.output_size_in_bytes, memory.temp_size_in_bytes, memory.alias_size_in_bytes,
        )
        print(
            f"per-device memory (compiled.memory_analysis()): arguments {gib(args)}, outputs {gib(out)} "
            f"({gib(alias)} aliased by donation), temporaries {gib(temp)}, code {gib(memory.generated_code_size_in_bytes)}; "
            f"estimated peak {gib(args + out - alias + temp)}"
        )
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    if cost and "flops" in cost:
        print(f"compiled FLOPs per step per device (XLA estimate): {cost['flops']:.3e}")
    print("shardings (params; optimizer moments follow them; batch fields below):")
    for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        print(f"  {name:<28} {str(x.shape):<24} {x.dtype}  {x.sharding.spec}")
    for name, s in trainer.batch_shardings.items():
        print(f"  batch/{name:<22} {s.spec}")


def _nothing_to_evaluate(workdir: str, why: str) -> UserError:
    return UserError(f"eval_only: {why} in {workdir}; train first, or point --workdir at a trained run")


def check_workdir(workdir: str) -> None:
    """An unusable local --workdir is one error line before anything runs; nothing is created here
    (the first write creates it), so a run refused later leaves no empty folder behind."""
    if "://" not in workdir:
        check_can_create(workdir, "--workdir", folder=True)


def train(config: ConfigDict, workdir: str, mesh, task: Task) -> int:
    process_index, process_count = jax.process_index(), jax.process_count()
    check_workdir(workdir)
    if config.eval_only and latest_step_dir(workdir) is None:
        raise _nothing_to_evaluate(workdir, "no checkpoint")
    new_workdir = "://" not in workdir and not os.path.exists(workdir)
    try:
        if process_index == 0:
            task.prepare_data(config)
        _barrier("nucgpt-prepared")
        task.validate(config)
    except UserError:
        if new_workdir and process_index == 0:  # a refused run leaves no folder behind, not even its generated data
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    trainer = build_trainer(config, mesh)
    checkpoints = Checkpoints(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    train_iterator = task.train_iterator(config, process_index, process_count)
    loop = None
    try:
        state = checkpoints.restore_latest(trainer.abstract_state, train_iterator, config)
        if state is None and config.eval_only:
            raise _nothing_to_evaluate(workdir, "no checkpoint restored (see the warnings above)")
        if state is None:
            state = trainer.init_state()
            if process_index == 0:
                fine_tune = config.task == "classify" and config.get("init_from")
                start = f"the trunk loaded from {config.init_from}, a fresh head" if fine_tune else "a fresh initialisation"
                print(f"no checkpoint in {checkpoints.directory}: training from {start}", flush=True)
        if process_index == 0 and not config.eval_only:  # after the restore: a config that does not match the
            save_config(workdir, config)  # checkpoints never replaces theirs; an evaluation leaves the run's as it is
        loop = Loop(trainer, workdir, checkpoints, train_iterator, state)
        if config.eval_only:
            step, eval_metrics, preempted = int(jax.device_get(state["step"])), loop.run_eval(int(jax.device_get(state["step"]))), False
        else:
            try:
                step, eval_metrics, preempted = loop.run()
            except Diverged as e:
                checkpoints.wait()
                kept = divergence_report(e.step, checkpoints.all_steps(), checkpoints.directory)
                print(f"error: training diverged: {e}; stopped without saving; {kept}", file=sys.stderr, flush=True)
                return EXIT_DIVERGED
        if preempted:
            if process_index == 0:
                print(f"preempted (SIGTERM): saved checkpoint step {step}; exiting", flush=True)
            return 0
        if eval_metrics is None:
            eval_metrics = loop.run_eval(step)
        if process_index == 0:
            task.summarize(workdir, config, step, eval_metrics)
            headline = ("loss", "loss_repeat", "loss_unique", "bits_per_base", "accuracy", "mcc", "f1_macro")
            summary = ", ".join(f"{k} {eval_metrics[k]:.4f}" for k in headline if k in eval_metrics)
            print(f"done: step {step}; eval {summary}", flush=True)
        return 0
    finally:
        if loop is not None:
            loop.logger.close()
        checkpoints.close()


@exits_cleanly_on_user_error
def main(argv) -> None:
    start_main(argv)
    if _CONFIG.value is None:
        raise UserError("--config is required, e.g. --config configs/pretrain.py:demo")
    distributed.use_cpu_cores(_CONFIG.value.mesh.cpu_devices, _CONFIG.value.train.global_batch_size)
    distributed.initialize()
    if not _WORKDIR.value:
        raise UserError("--workdir is required")
    config, workdir = _CONFIG.value, _WORKDIR.value
    task = get_task(config.task)
    config = task.resolve_config(config, workdir)
    mesh = sharding.make_mesh(config.mesh)
    config_lib.validate(config, dict(mesh.shape), jax.process_count(), mesh_platform(mesh))
    if jax.process_index() == 0:
        for note in config_lib.notes(config):
            print(f"note: {note}", flush=True)
    if _DRY_RUN.value:
        dry_run(config, mesh)
        return
    with diagnostics.stack_traces(config.diagnostics):
        code = train(config, workdir, mesh, task)
    sys.exit(code)


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    run()
