"""Checkpoints that never lose work: orbax `CheckpointManager` over params, optimizer, data position.

Layout under `<workdir>/checkpoints/<step>/`:
  params/     the model parameters (a nested dict; fine-tuning restores only this item)
  train/      {"step", "opt_state"}
  data/       each process's input-iterator state, `process_<i>-of-<n>.json`
  config/     the resolved config (JSON), so a checkpoint folder is self-describing
Saves are asynchronous (the next steps run while arrays are written); a step folder appears only
once complete, so a kill mid-save leaves the previous checkpoint as the latest. Restoring takes
target shardings, so a checkpoint written on one mesh restores onto any other. Paths may be
`gs://...` wherever a local path is accepted (orbax and etils handle both).
"""

import contextlib
import dataclasses
import json
import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from ml_collections import ConfigDict

from nucgpt import config as config_checks
from nucgpt.errors import UserError

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def absolute_path(path: str) -> epath.Path:
    """Orbax accepts only absolute paths: a relative local path is made absolute; URLs pass as is."""
    return epath.Path(path if "://" in path else os.path.abspath(path))


class IteratorStateHandler(ocp.CheckpointHandler):
    """Each process writes and reads its own iterator state (Grain `get_state()`, a dict or bytes),
    with the pipeline settings the position depends on (global batch size, data workers).

    Like Grain's own orbax handler, but a state the run cannot use is reported instead of failing the
    restore (the parameters are fine): written by a different process count (no file for this
    process), or by a different pipeline. A changed batch size converts a plain position (records
    consumed are kept); other changes restart the data order. `restore` returns what happened.
    """

    def save(self, directory: epath.Path, args: "IteratorSave") -> None:
        state = args.iterator.get_state()
        payload = {"bytes": state.decode("latin-1")} if isinstance(state, bytes) else {"state": state}
        (directory / _iterator_file()).write_text(json.dumps(payload | {"pipeline": args.pipeline}))

    def restore(self, directory: epath.Path, args: "IteratorRestore") -> str:
        path = directory / _iterator_file()
        if not path.exists():
            return "missing"
        try:
            payload = json.loads(path.read_text())
            state = payload["bytes"].encode("latin-1") if "bytes" in payload else payload["state"]
        except (ValueError, KeyError, TypeError) as e:  # a damaged position file: the parameters are still good
            return f"could not be read ({type(e).__name__}: {_first_line(e)})"
        stored, current = payload.get("pipeline") or {}, args.pipeline
        outcome = "restored"
        if stored and current and any(stored.get(key) != value for key, value in current.items()):
            state, outcome = _converted_position(state, stored, current)
            if state is None:
                return outcome
        try:
            args.iterator.set_state(state)
        except Exception as e:  # noqa: BLE001 — a state from another pipeline; the iterator is still at its start
            return f"could not be applied ({type(e).__name__}: {_first_line(e)})"
        return outcome

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


def _every_process(ok: bool) -> bool:
    """`ok` on every process (an all-gather when there are several): the decision all of them act on."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _iterator_file() -> str:
    return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def data_pipeline(config: ConfigDict | None) -> dict:
    """The settings a saved data position depends on."""
    if config is None:
        return {}
    pipeline = {"global_batch_size": config.train.global_batch_size}
    if config.get("task", "pretrain") == "pretrain":  # Grain's worker processes; the fine-tuning iterator has none
        pipeline["num_workers"] = config.data.get("num_workers", 0)
    return pipeline


def _converted_position(state: Any, stored: Mapping, current: Mapping) -> tuple[Any, str]:
    """(state for the current pipeline, what was done), or (None, why not) when it cannot be converted.

    A plain Grain position counts this process's batches; every process advances in step, so
    `next_index` × global batch is the records consumed, whatever the process count's share.
    """
    changed = ", ".join(f"{key} {stored.get(key)} → {current.get(key)}" for key in current if stored.get(key) != current.get(key))
    plain = isinstance(state, dict) and set(state) == {"next_index"}
    if plain and stored.get("num_workers") == current.get("num_workers") == 0:
        records = int(state["next_index"]) * int(stored["global_batch_size"])
        next_index, repeated = divmod(records, int(current["global_batch_size"]))
        note = f"converted ({changed}): {records:,} records consumed = batch {next_index:,} now"
        return {"next_index": next_index}, note + (f", {repeated} records seen again" if repeated else "")
    return None, f"was written by another data pipeline ({changed})"


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
    iterator: Any
    pipeline: dict = dataclasses.field(default_factory=dict)


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
    iterator: Any
    pipeline: dict = dataclasses.field(default_factory=dict)


def config_to_json(config: ConfigDict) -> dict:
    return json.loads(config.to_json())


def config_from_json(data: Mapping) -> ConfigDict:
    """The inverse of `config_to_json`; the axis-rule table comes back as tuples, as presets write it."""
    data = json.loads(json.dumps(data))
    mesh = data.get("mesh", {})
    if "logical_axis_rules" in mesh:
        mesh["logical_axis_rules"] = tuple(
            (name, tuple(target) if isinstance(target, list) else target) for name, target in mesh["logical_axis_rules"]
        )
    return ConfigDict(data)


def save_config(workdir: str, config: ConfigDict) -> None:
    """`<workdir>/config.json`: what fine-tuning reads to rebuild the pretrained model and tokenizer."""
    path = epath.Path(workdir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{CONFIG_FILE}.tmp")  # a crash mid-write must not leave half a config
    partial.write_text(json.dumps(config_to_json(config), indent=2) + "\n")
    partial.replace(path)


def saved_config(workdir: str) -> dict | None:
    """`<workdir>/config.json` as written by the run (None where there is none or it does not parse)."""
    try:
        return json.loads((epath.Path(workdir) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return None


def _stored_config(step_dir: epath.Path) -> dict | None:
    """The config saved with a checkpoint step; None for an older or partial step (its shapes are still compared)."""
    try:
        return json.loads((step_dir / "config" / "metadata").read_text())
    except (OSError, ValueError):
        return None


def _config_mismatch(config: ConfigDict, stored: Mapping | None) -> str | None:
    """What in `config` differs from the config stored with a checkpoint step (None: nothing, or none stored)."""
    if stored is None:
        return None
    differences = config_checks.architecture_differences(config, stored, sections=("data", "model", "classify"))
    if "task" in stored and stored["task"] != config.task:
        differences.insert(0, f"task={config.task!r} but the checkpoint has {stored['task']!r}")
    return "; ".join(differences) or None


def divergence_report(bad_step: int, saved_steps: list[int], directory) -> str:
    """Which checkpoints are good after `bad_step` went non-finite: step S is known good once step
    S + 1 ran finite from it, so a checkpoint just before the bad step holds the parameters that diverged."""
    good = [s for s in saved_steps if s < bad_step - 1]
    report = f"the last good checkpoint is step {good[-1]} in {directory}" if good else "no good checkpoint is kept"
    if bad_step - 1 in saved_steps:
        report += (f"; checkpoint step {bad_step - 1} holds the parameters step {bad_step} diverged from: "
                   f"delete {directory / str(bad_step - 1)} before resuming")
    return report


class Checkpoints:
    """Save / resume for one workdir. All processes call every method (orbax coordinates them)."""

    def __init__(self, workdir: str, *, keep: int, async_save: bool = True):
        self.directory = absolute_path(workdir) / CHECKPOINT_DIR
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,  # a save killed mid-write leaves a <step>.orbax-checkpoint-tmp folder
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, state: Mapping[str, Any], data_iterator: Any, config: ConfigDict) -> None:
        """Starts an (asynchronous) save of `state` at its own step; returns once the arrays are copied."""
        step = int(jax.device_get(state["step"]))
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            train=ocp.args.StandardSave({"step": state["step"], "opt_state": state["opt_state"]}),
            data=IteratorSave(data_iterator, data_pipeline(config)),
            config=ocp.args.JsonSave(config_to_json(config)),
        )
        with self._save_errors_as_one_line():  # an earlier asynchronous save's failure surfaces here too
            self.manager.save(step, args=args, force=True)

    @contextlib.contextmanager
    def _save_errors_as_one_line(self):
        """A save that fails (a full disk, lost permissions) stops the run with one line naming the
        folder and orbax's reason, not a page of thread tracebacks; its partial step folder is a
        temporary one, removed by the next run."""
        try:
            yield
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 — orbax re-raises a background thread's error as is
            raise UserError(f"saving a checkpoint in {self.directory} failed: {type(e).__name__}: {_first_line(e)}") from None

    def restore_latest(
        self, abstract_state: Mapping[str, Any], data_iterator: Any, config: ConfigDict | None = None
    ) -> Mapping[str, Any] | None:
        """The newest checkpoint that restores, onto `abstract_state`'s shardings; None when there is none.

        Each step's stored shapes, and with `config` its stored task, architecture and tokenizer, are
        compared with the run's first: a checkpoint written by a different model (the config changed,
        same workdir) is a UserError, never skipped, so its work is not overwritten by a fresh run.
        Hyperparameters (learning rate, steps, repeat weight, ...) may change between runs. A
        checkpoint whose files are missing or unreadable (corrupt or partial) is reported, the
        previous one is tried, and once one restores the unreadable newer ones are moved aside (kept,
        out of the way of the steps about to be saved again). When none restores it is a UserError:
        a fresh start would overwrite them. The data iterator's position is restored too (see
        `IteratorStateHandler` for when it is converted or restarts, which is said).
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        unreadable: list[int] = []
        targets = {"params": abstract_state["params"], "train": {"step": abstract_state["step"], "opt_state": abstract_state["opt_state"]}}
        for i, step in enumerate(steps):
            step_dir = self.directory / str(step)
            error = None
            try:
                stored_shapes = {name: _stored_shapes(step_dir / name) for name in targets}
            except Exception as e:  # noqa: BLE001 — unreadable metadata is a corrupt or partial step
                error = e
            if not _every_process(error is None):  # one process alone falling back would deadlock the rest
                self._report_unreadable(step, error, steps[i + 1 :])
                unreadable.append(step)
                continue
            stored_config = _stored_config(step_dir) if config is not None else None
            mismatch = _config_mismatch(config, stored_config)
            mismatch = mismatch or next(
                filter(None, (_shape_mismatch(name, stored_shapes[name], target) for name, target in targets.items())), None
            )
            if mismatch:
                raise UserError(
                    f"checkpoint {step_dir} does not match the config: {mismatch}; "
                    f"use a new --workdir, or the settings in {self.directory.parent / CONFIG_FILE}"
                )
            restored, error = None, None
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(targets["params"]),
                        train=ocp.args.StandardRestore(targets["train"]),
                        data=IteratorRestore(data_iterator, data_pipeline(config)),
                    ),
                )
            except Exception as e:  # noqa: BLE001 — shapes match, so a failure to read means damaged files
                error = e
            if not _every_process(error is None):
                self._report_unreadable(step, error, steps[i + 1 :])
                unreadable.append(step)
                continue
            self._report_data_position(step, restored["data"])
            self._report_changed_settings(step, config, stored_config)
            self._move_aside(unreadable)
            print(f"resumed from checkpoint step {step} in {self.directory}", flush=True)
            return {"step": restored["train"]["step"], "params": restored["params"], "opt_state": restored["train"]["opt_state"]}
        if unreadable:
            raise UserError(
                f"no checkpoint in {self.directory} restores (steps {', '.join(map(str, unreadable))}: see the warnings "
                f"above); nothing was changed. To start afresh in this --workdir, move {self.directory} aside first"
            )
        return None

    def _report_data_position(self, step: int, outcome: str) -> None:
        if jax.process_index() != 0 or outcome == "restored":
            return
        if outcome == "missing":
            print(f"warning: checkpoint step {step} holds no data-iterator state for {jax.process_count()} process(es); "
                  "the data order restarts", flush=True)
        elif outcome.startswith("converted"):
            print(f"note: checkpoint step {step}: the data position was {outcome}", flush=True)
        else:
            print(f"warning: checkpoint step {step}: the data-iterator state {outcome}; the data order restarts "
                  "(set those back to continue the data where it stopped)", flush=True)

    def _report_changed_settings(self, step: int, config: ConfigDict | None, stored: Mapping | None) -> None:
        """Run settings that differ from the checkpoint's (a longer run, another learning rate, ...):
        allowed, and said once, since they change the run from here on (the schedule is rebuilt)."""
        if config is None or stored is None or jax.process_index() != 0:
            return
        changed = config_checks.changed_settings(config_to_json(config), stored)
        if changed:
            shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
            print(f"note: settings changed since checkpoint step {step}: {shown}", flush=True)
        steps = config.get("train", {}).get("steps")
        if steps is not None and not config.get("eval_only") and steps <= step:
            print(f"note: train.steps {steps} is not beyond checkpoint step {step}: nothing left to train", flush=True)

    def _move_aside(self, steps: list[int]) -> None:
        """Unreadable steps newer than the restored one → `<workdir>/checkpoints_unreadable/`: kept for a
        look, and out of the way (orbax would neither save those steps again nor count them as kept)."""
        if not steps:
            return  # every process agreed on the same list (`_every_process`), so all return here together
        aside = self.directory.parent / f"{CHECKPOINT_DIR}_unreadable"
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            # an object store has no empty folders: a file makes the prefix exist before anything is renamed into it
            (aside / "README.txt").write_text("checkpoint steps that failed to restore, moved here by nucgpt.train\n")
            for step in steps:
                target = aside / str(step)
                if target.exists():
                    target = aside / f"{step}.{os.getpid()}"
                try:
                    (self.directory / str(step)).rename(target)
                except Exception as e:  # noqa: BLE001 — a store that cannot rename folders (the save at that step will say so)
                    print(f"warning: could not move the unreadable checkpoint step {step} aside ({e}); delete "
                          f"{self.directory / str(step)} before the run reaches step {step}", flush=True)
                    continue
                print(f"moved the unreadable checkpoint step {step} to {target} (delete it once looked at)", flush=True)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("nucgpt-moved-unreadable-checkpoints")
        self.manager.reload()

    def _report_unreadable(self, step: int, error: Exception | None, older_steps: list[int]) -> None:
        fallback = f"falling back to step {older_steps[0]}" if older_steps else "no older checkpoint"
        reason = f"{type(error).__name__}: {_first_line(error)}" if error is not None else "another process could not read it"
        print(f"warning: checkpoint step {step} in {self.directory} is corrupt or partial ({reason}); {fallback}", flush=True)

    def wait(self) -> None:
        with self._save_errors_as_one_line():
            self.manager.wait_until_finished()

    def close(self) -> None:
        with self._save_errors_as_one_line():
            try:
                self.manager.wait_until_finished()
            finally:
                self.manager.close()


def _path_name(path: tuple) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _shapes(tree: Any) -> dict[str, tuple[int, ...] | None]:
    """Leaf path ("blocks/w_up", "opt_state/0/mu/...") → shape; lists, tuples and named tuples alike."""
    return {_path_name(path): getattr(leaf, "shape", None) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _stored_shapes(item_dir: epath.Path) -> dict[str, tuple[int, ...] | None]:
    """The shapes an item was saved with, from its metadata alone (no array is read)."""
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(item_dir)
    finally:
        handler.close()
    return {name: tuple(shape) if shape is not None else None for name, shape in _shapes(getattr(metadata, "tree", metadata)).items()}


def _shape_mismatch(item: str, stored: Mapping[str, Any], target: Any) -> str | None:
    """The first difference between a checkpoint item's stored shapes and the target's, in words."""
    expected = {name: tuple(shape) if shape is not None else None for name, shape in _shapes(target).items()}
    for name in sorted(stored.keys() | expected.keys()):
        if name not in expected:
            return f"{item}/{name} is in the checkpoint but not in the config"
        if name not in stored:
            return f"{item}/{name} is in the config but not in the checkpoint"
        if stored[name] != expected[name]:
            return f"{item}/{name} has shape {stored[name]} in the checkpoint, {expected[name]} in the config"
    return None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else ""


def latest_step_dir(path: str) -> epath.Path | None:
    """The newest step folder under a workdir or its `checkpoints/` folder; None when there is none.

    Orbax renames a step folder into place only once its save is complete, so a listed step is whole.
    """
    directory = absolute_path(path)
    if (directory / CHECKPOINT_DIR).exists():
        directory = directory / CHECKPOINT_DIR
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []
    return directory / str(steps[-1]) if steps else None


def resolve_step_dir(path: str, name: str = "init_from") -> epath.Path:
    """A workdir (its latest checkpoint), a `checkpoints/` folder, or one step folder → the step folder.
    `name` is the flag or field the path came from, for the error."""
    folder = absolute_path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{name} {path}: is a file; give a workdir, its checkpoints/ or a step folder")
    if (folder / "params").exists():
        return folder
    step_dir = latest_step_dir(path)
    if step_dir is None:
        raise UserError(f"{name}: no checkpoint found in {path} (expected a workdir, its checkpoints/ or a step folder)")
    return step_dir


def load_pretrained_config(init_from: str) -> ConfigDict:
    """The config saved in the checkpoint `init_from` names (a workdir or a step folder); no arrays read."""
    return config_from_json(json.loads((resolve_step_dir(init_from) / "config" / "metadata").read_text()))


def load_pretrained(init_from: str, abstract_params: Any = None) -> tuple[ConfigDict, Any]:
    """(the pretraining config, its params) from a workdir or a checkpoint step folder.

    With `abstract_params` (ShapeDtypeStructs carrying shardings) the params are restored straight
    into those shards (do this on multi-device runs); without, as single-device arrays.
    """
    step_dir = resolve_step_dir(init_from)
    return load_pretrained_config(str(step_dir)), restore_params(step_dir, abstract_params)


def restore_params(step_dir: epath.Path, abstract_params: Any = None) -> Any:
    """The `params` item of one checkpoint step, into `abstract_params`' shardings when given."""
    checkpointer = ocp.StandardCheckpointer()
    if abstract_params is None:
        return checkpointer.restore(step_dir / "params")
    return checkpointer.restore(step_dir / "params", abstract_params)
