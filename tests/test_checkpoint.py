"""Checkpoints restore onto another mesh and device count, skip a corrupt latest step, feed fine-tuning."""
import os
import pathlib
import shutil
import sys

import jax
import numpy as np
import pytest

from nucgpt import sharding
from nucgpt.checkpoint import Checkpoints, load_pretrained
from nucgpt.errors import UserError
from nucgpt.step import build_trainer

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "configs"))
import pretrain  # noqa: E402


class CountingIterator:
    """Stands in for the Grain iterator: its state is a position."""

    def __init__(self, position=0):
        self.position = position

    def get_state(self):
        return {"position": self.position}

    def set_state(self, state):
        self.position = state["position"]


def tiny_config():
    c = pretrain.get_config("demo")
    c.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=8, mlp_dim=64, attention="xla")
    c.train.update(seq_len=16, global_batch_size=8)
    return c


def _values(tree):
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Steps 1 and 2 saved from an fsdp=8 mesh (the state's step number is set by hand)."""
    workdir = tmp_path_factory.mktemp("ckpt")
    config = tiny_config()
    trainer = build_trainer(config)
    state = trainer.init_state()
    checkpoints = Checkpoints(str(workdir), keep=3)
    for step in (1, 2):
        state = dict(state, step=jax.device_put(np.int32(step), trainer.state_shardings["step"]))
        checkpoints.save(state, CountingIterator(position=10 * step), config)
    checkpoints.close()
    return workdir, config, state


def test_restores_onto_another_mesh_and_device_count(saved):
    workdir, config, state = saved
    config = config.copy_and_resolve_references()
    config.mesh.update(ici_data_parallelism=2, ici_fsdp_parallelism=1, ici_tensor_parallelism=2)
    mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:4])
    trainer = build_trainer(config, mesh)
    iterator = CountingIterator()
    checkpoints = Checkpoints(str(workdir), keep=3)
    restored = checkpoints.restore_latest(trainer.abstract_state, iterator)
    checkpoints.close()
    assert int(restored["step"]) == 2 and iterator.position == 20
    wq = restored["params"]["blocks"]["wq"]
    assert wq.sharding.mesh.shape == {"data": 2, "fsdp": 1, "tensor": 2} and len(wq.sharding.device_set) == 4
    for a, b in zip(_values(restored["params"]) + _values(restored["opt_state"]), _values(state["params"]) + _values(state["opt_state"])):
        np.testing.assert_array_equal(a, b)


def test_corrupt_latest_falls_back_to_previous(saved, tmp_path, capsys):
    source, config, _ = saved
    workdir = tmp_path / "copy"
    shutil.copytree(source, workdir)
    params_dir = workdir / "checkpoints" / "2" / "params"
    for root, _, files in os.walk(params_dir):  # truncate every data file of step 2's params
        for name in files:
            if name not in ("_METADATA", "_sharding", "commit_success.txt"):
                (pathlib.Path(root) / name).write_bytes(b"")
    shutil.rmtree(params_dir / "d", ignore_errors=True)
    trainer = build_trainer(config)
    iterator = CountingIterator()
    checkpoints = Checkpoints(str(workdir), keep=3)
    restored = checkpoints.restore_latest(trainer.abstract_state, iterator)
    checkpoints.close()
    out = capsys.readouterr().out
    assert "checkpoint step 2" in out and "corrupt or partial" in out and "falling back to step 1" in out
    assert int(restored["step"]) == 1 and iterator.position == 10
    # the damaged step is kept aside, out of the way of step 2 being saved again (and of `keep`)
    assert (workdir / "checkpoints_unreadable" / "2" / "params").is_dir() and not (workdir / "checkpoints" / "2").exists()
    assert "moved the unreadable checkpoint step 2" in out
    checkpoints = Checkpoints(str(workdir), keep=3)
    checkpoints.save(dict(restored, step=jax.device_put(np.int32(2), trainer.state_shardings["step"])), iterator, config)
    checkpoints.close()
    assert Checkpoints(str(workdir), keep=3).all_steps() == [1, 2]


def test_when_no_checkpoint_restores_nothing_starts_over_them(saved, tmp_path):
    """A fresh start would save over the unreadable steps: it is an error, and nothing is moved."""
    source, config, _ = saved
    workdir = tmp_path / "copy"
    shutil.copytree(source, workdir)
    for step in (1, 2):
        (workdir / "checkpoints" / str(step) / "params" / "_METADATA").unlink()
    checkpoints = Checkpoints(str(workdir), keep=3)
    with pytest.raises(UserError, match=r"no checkpoint in .* restores \(steps 2, 1: see the warnings above\); nothing was changed"):
        checkpoints.restore_latest(build_trainer(config).abstract_state, CountingIterator())
    checkpoints.close()
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]


class GrainLikeIterator:
    """A plain Grain position: batches of this process taken so far."""

    def __init__(self, next_index=0):
        self.next_index = next_index

    def get_state(self):
        return {"next_index": self.next_index}

    def set_state(self, state):
        self.next_index = state["next_index"]


@pytest.fixture(scope="module")
def saved_at_batch_5(tmp_path_factory):
    """Step 1 saved with a plain Grain position: 5 batches of 8 taken (40 records), no data workers."""
    workdir = tmp_path_factory.mktemp("grain_like")
    config = tiny_config()
    trainer = build_trainer(config)
    state = dict(trainer.init_state(), step=jax.device_put(np.int32(1), trainer.state_shardings["step"]))
    checkpoints = Checkpoints(str(workdir), keep=1)
    checkpoints.save(state, GrainLikeIterator(next_index=5), config)
    checkpoints.close()
    return workdir, config, trainer


@pytest.mark.parametrize(
    "change, expected_index, message",
    [
        ({"train.global_batch_size": 8}, 5, None),
        ({"train.global_batch_size": 16}, 2, "note: checkpoint step 1: the data position was converted (global_batch_size 8 → 16): "
                                              "40 records consumed = batch 2 now, 8 records seen again"),
        ({"train.global_batch_size": 4}, 10, "converted (global_batch_size 8 → 4): 40 records consumed = batch 10 now\n"),
        ({"data.num_workers": 2}, 0, "warning: checkpoint step 1: the data-iterator state was written by another data "
                                     "pipeline (num_workers 0 → 2); the data order restarts"),
    ],
)
def test_a_changed_data_pipeline_converts_or_restarts_the_position_never_a_corrupt_step(
    saved_at_batch_5, tmp_path, capsys, change, expected_index, message
):
    """A batch size or worker count changed on resume used to fail the whole restore as 'corrupt'."""
    source, config, trainer = saved_at_batch_5
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    resumed = config.copy_and_resolve_references()
    for key, value in change.items():
        section, field = key.split(".")
        resumed[section][field] = value
    iterator = GrainLikeIterator()
    checkpoints = Checkpoints(str(tmp_path), keep=1)
    restored = checkpoints.restore_latest(trainer.abstract_state, iterator, resumed)  # the state does not depend on them
    checkpoints.close()
    out = capsys.readouterr().out
    assert int(restored["step"]) == 1 and iterator.next_index == expected_index
    assert "corrupt" not in out
    if message:
        assert message in out
    else:
        assert "data" not in out.replace(str(tmp_path), "") and "note" not in out
    for key, value in change.items():  # a changed setting is said, whatever it does to the data
        if value != config[key.split(".")[0]][key.split(".")[1]]:
            assert f"note: settings changed since checkpoint step 1: {key} " in out


def test_changed_run_settings_are_listed_old_to_new():
    from nucgpt import config as config_lib
    from nucgpt.checkpoint import config_to_json

    stored = config_to_json(tiny_config())
    config = tiny_config()
    config.train.steps, config.optim.learning_rate, config.eval_only = 900, 0.01, True
    assert sorted(config_lib.changed_settings(config_to_json(config), stored)) == [  # eval_only is not a run setting
        f"optim.learning_rate {stored['optim']['learning_rate']!r} → 0.01", f"train.steps {stored['train']['steps']!r} → 900"
    ]
    assert config_lib.changed_settings(stored, stored) == []  # tuples read back from JSON as lists are equal


def test_a_data_state_the_iterator_refuses_restarts_the_data_order(saved, capsys):
    """Grain's set_state raising (a state of another pipeline kind) is said, not taken for damage."""
    workdir, config, _ = saved
    checkpoints = Checkpoints(str(workdir), keep=3)
    iterator = GrainLikeIterator()  # the saved states are {"position": ...}: KeyError in set_state
    restored = checkpoints.restore_latest(build_trainer(config).abstract_state, iterator, config)
    checkpoints.close()
    out = capsys.readouterr().out
    assert int(restored["step"]) == 2 and iterator.next_index == 0
    assert "the data-iterator state could not be applied (KeyError" in out and "the data order restarts" in out


def test_load_pretrained_reads_config_and_params(saved):
    workdir, config, state = saved
    pretrained_config, params = load_pretrained(str(workdir))
    assert pretrained_config.model.d_model == 32 and pretrained_config.data.tokenizer == "nucleotide"
    assert pretrained_config.mesh.logical_axis_rules == config.mesh.logical_axis_rules
    for a, b in zip(_values(params), _values(state["params"])):
        np.testing.assert_array_equal(a, b)
    _, step1 = load_pretrained(str(workdir / "checkpoints" / "1"))
    assert jax.tree.structure(step1) == jax.tree.structure(params)


def test_a_checkpoint_of_another_model_is_a_user_error_not_a_fallback(saved):
    """The config changed in the same workdir: stop, naming the differing shape; never start fresh over it."""
    workdir, config, _ = saved
    config = config.copy_and_resolve_references()
    config.model.mlp_dim = 128
    trainer = build_trainer(config)
    checkpoints = Checkpoints(str(workdir), keep=3)
    with pytest.raises(UserError, match=r"checkpoint .*checkpoints/2 does not match the config: params/blocks/w_down has shape "
                                        r"\(2, 64, 32\) in the checkpoint, \(2, 128, 32\) in the config; use a new --workdir"):
        checkpoints.restore_latest(trainer.abstract_state, CountingIterator())
    checkpoints.close()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]


def test_a_same_shaped_architecture_change_is_a_user_error(saved):
    """rope_base or the tokenizer change no shape, but the parameters would mean something else."""
    workdir, config, _ = saved
    config = config.copy_and_resolve_references()
    config.model.rope_base = 500000.0
    config.optim.learning_rate = 1e-4  # hyperparameters may change between runs; only the first is named
    trainer = build_trainer(config)
    checkpoints = Checkpoints(str(workdir), keep=3)
    with pytest.raises(UserError, match=r"checkpoints/2 does not match the config: model.rope_base=500000.0 but the "
                                        r"checkpoint has 10000.0; use a new --workdir"):
        checkpoints.restore_latest(trainer.abstract_state, CountingIterator(), config)
    config.model.rope_base = 10000.0
    assert checkpoints.restore_latest(trainer.abstract_state, CountingIterator(), config) is not None
    checkpoints.close()


def test_a_file_given_as_a_checkpoint_is_named(tmp_path):
    from nucgpt.checkpoint import resolve_step_dir

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"^--checkpoint .*config.json: is a file; give a workdir"):
        resolve_step_dir(str(tmp_path / "config.json"), "--checkpoint")


def test_a_fine_tune_resumed_with_another_pooling_is_named(tmp_path):
    """A head reads the trunk by its pooling (no shape changes): resuming with another one is refused."""
    import finetune
    from etils import epath

    from nucgpt import checkpoint

    stored = finetune.get_config("demo")
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "metadata").write_text(stored.to_json())
    config = stored.copy_and_resolve_references()
    assert checkpoint._config_mismatch(config, checkpoint._stored_config(epath.Path(tmp_path))) is None
    config.classify.pooling = "mean" if stored.classify.pooling == "last" else "last"
    assert checkpoint._config_mismatch(config, checkpoint._stored_config(epath.Path(tmp_path))).startswith(
        f"classify.pooling={config.classify.pooling!r} but the checkpoint has {stored.classify.pooling!r}")


def test_unreadable_metadata_falls_back_to_previous(saved, tmp_path, capsys):
    source, config, _ = saved
    workdir = tmp_path / "copy"
    shutil.copytree(source, workdir)
    (workdir / "checkpoints" / "2" / "params" / "_METADATA").unlink()
    checkpoints = Checkpoints(str(workdir), keep=3)
    restored = checkpoints.restore_latest(build_trainer(config).abstract_state, CountingIterator())
    checkpoints.close()
    assert "checkpoint step 2" in capsys.readouterr().out and int(restored["step"]) == 1


def test_a_relative_workdir_saves_and_restores(saved, tmp_path, monkeypatch):
    """Orbax wants absolute paths; `--workdir workdirs/demo` (README's command) is relative."""
    _, config, state = saved
    monkeypatch.chdir(tmp_path)
    trainer = build_trainer(config)
    checkpoints = Checkpoints("workdirs/run", keep=1)
    checkpoints.save(state, CountingIterator(position=7), config)
    checkpoints.close()
    iterator = CountingIterator()
    checkpoints = Checkpoints("workdirs/run", keep=1)
    restored = checkpoints.restore_latest(trainer.abstract_state, iterator)
    checkpoints.close()
    assert int(restored["step"]) == int(state["step"]) and iterator.position == 7
    assert (tmp_path / "workdirs/run/checkpoints" / str(int(state["step"])) / "params").is_dir()


def test_a_save_that_fails_in_the_background_is_one_line(tmp_path):
    """Orbax re-raises a background write's error (a full disk) at the next save or wait: one line."""
    checkpoints = Checkpoints(str(tmp_path), keep=1)

    def disk_full():
        raise ValueError("RESOURCE_EXHAUSTED: Error writing to file\n[many lines of tensorstore context]")

    checkpoints.manager.wait_until_finished = disk_full
    with pytest.raises(UserError, match=r"^saving a checkpoint in .*checkpoints failed: ValueError: RESOURCE_EXHAUSTED: Error writing to file$"):
        checkpoints.wait()
    with pytest.raises(UserError, match="saving a checkpoint"):
        checkpoints.close()
