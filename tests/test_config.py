"""Bad configs are refused before anything starts, each problem named by its field."""
import pathlib
import subprocess
import sys

import pytest

from nucgpt import config as config_lib
from nucgpt.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "configs"))
import pretrain  # noqa: E402


def demo():
    return pretrain.get_config("demo")


MESH_8 = {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("preset", sorted(pretrain.PRESETS))
def test_every_preset_is_valid(preset):
    assert config_lib.problems(pretrain.get_config(preset), MESH_8) == []
    assert config_lib.notes(pretrain.get_config(preset)) == []


def test_a_warmup_as_long_as_the_run_is_noted_not_refused():
    config = demo()
    config.train.steps = 30  # the demo warms up for 30 steps
    assert config_lib.problems(config, MESH_8) == []
    (note,) = config_lib.notes(config)
    assert note.startswith("optim.warmup_steps 30 >= train.steps 30: the learning rate rises for the whole run")
    config.eval_only = True  # an evaluation trains nothing
    assert config_lib.notes(config) == []


def test_kmer_pad_multiple_is_not_an_architecture_field():
    """The tokenizer's own padding never reaches a row (test_tokenizers), so a checkpoint pretrained
    with another kmer_pad_multiple resumes and fine-tunes; the tokenizer itself must still match."""
    ours, theirs = pretrain.get_config("kmer6_nonoverlap"), pretrain.get_config("kmer6_nonoverlap")
    theirs.data.kmer_pad_multiple = 8
    assert config_lib.architecture_differences(ours, theirs, sections=("data", "model", "classify")) == []
    theirs.data.tokenizer = "kmer6_overlap"
    assert config_lib.architecture_differences(ours, theirs) == [
        "data.tokenizer='kmer6_nonoverlap' but the checkpoint has 'kmer6_overlap'"]


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda c: c.model.update(num_heads=6, num_kv_heads=4), "model.num_heads"),
        (lambda c: (c.model.update(attention="splash"), c.train.update(seq_len=640)), "train.seq_len"),
        (lambda c: c.train.update(global_batch_size=12), "train.global_batch_size"),
        (lambda c: c.train.update(global_batch_size=16, grad_accum_steps=3), "train.global_batch_size"),
        (lambda c: c.model.update(attention="flash"), "model.attention"),
        (lambda c: c.train.update(steps=0), "train.steps"),
        (lambda c: c.train.update(repeat_weight=-1.0), "train.repeat_weight"),
        (lambda c: c.data.update(tokenizer="kmer6_overlap"), "model.vocab_size"),
        (lambda c: c.optim.update(final_learning_rate=1.0), "optim.final_learning_rate"),
        (lambda c: c.model.update(head_dim=31), "model.head_dim"),
        (lambda c: c.optim.update(final_learning_rate=-0.003), "optim.final_learning_rate"),
        (lambda c: c.optim.update(learning_rate=float("nan")), "optim.learning_rate"),
        (lambda c: c.train.update(repeat_weight=float("inf")), "train.repeat_weight"),
        (lambda c: c.optim.update(b2=1.5), "optim.b2"),
        (lambda c: c.optim.update(eps=-1.0), "optim.eps"),
        (lambda c: c.data.update(reverse_complement_prob=1.5), "data.reverse_complement_prob"),
        (lambda c: c.data.update(num_workers=-1), "data.num_workers"),
        (lambda c: c.mesh.update(logical_axis_rules=tuple("foo")), "mesh.logical_axis_rules"),
        (lambda c: c.mesh.update(logical_axis_rules=(("batch", ("data", "pipeline")),)), "mesh.logical_axis_rules"),
    ],
)
def test_bad_field_is_named(change, field):
    c = demo()
    change(c)
    found = config_lib.problems(c, MESH_8)
    assert any(p.startswith(field + ":") for p in found), found


def test_attention_auto_is_checked_for_the_platform_the_step_is_compiled_for():
    """A CPU host compiling for a TPU mesh checks splash's block rule; the host's own xla has none."""
    c = demo()
    c.train.update(seq_len=640)  # not a multiple of splash's 512-token blocks
    assert config_lib.problems(c, MESH_8, platform="cpu") == []
    found = config_lib.problems(c, MESH_8, platform="tpu")
    assert any(p.startswith("train.seq_len:") and "splash" in p for p in found), found


def test_tensor_parallelism_must_divide_heads():
    c = demo()
    c.model.update(num_heads=4, num_kv_heads=4)
    found = config_lib.problems(c, {"data": 1, "fsdp": 1, "tensor": 8})
    assert any(p.startswith("model.num_heads:") for p in found)


def test_all_problems_reported_at_once():
    c = demo()
    c.train.update(global_batch_size=12)
    c.model.update(num_heads=6, num_kv_heads=4)
    with pytest.raises(UserError) as e:
        config_lib.validate(c, MESH_8)
    assert "train.global_batch_size" in str(e.value) and "model.num_heads" in str(e.value)


def _train(*args, tmp_path):
    return subprocess.run(
        [sys.executable, "-m", "nucgpt.train", "--workdir", str(tmp_path / "w"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )


FILES = {"syntax.py": "def get_config(:\n", "no_get.py": "x = 1\n", "a_file": ""}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "configs/pretrain.py:demo", "--config.train.stepz=3"], "error: unknown config key train.stepz (did you mean train.steps?)"),
        (["--config", "configs/pretrain.py:nope"], "error: unknown preset 'nope'"),
        (["--config", "configs/pretrain.py:demo", "--config.train.global_batch_size=12"], "error: train.global_batch_size: 12"),
        (["--config", "configs/pretrain.py:demo", "--config.data.path=/nonexistent"], "error: /nonexistent: no manifest.json"),  # never generated into
        (["--config", "configs/nothere.py:demo"], "error: --config configs/nothere.py: cannot read the config file (No such file or directory)"),
        (["--config", "{tmp}/syntax.py"], "error: --config {tmp}/syntax.py:1: invalid syntax"),
        (["--config", "{tmp}/no_get.py"], "error: --config: the config file defines no get_config() function"),
        (["--config", "configs/pretrain.py:demo", "--workdir", "{tmp}/a_file/w"], "error: --workdir {tmp}/a_file/w: {tmp}/a_file is a file, not a folder"),
        (["--config", "configs/finetune.py:demo", "--config.classify.test_fraction=1.5"], "error: classify.test_fraction: must lie in (0, 1)"),
        # refused only once the generated task's data is there: the data it generated goes with the new workdir
        (["--config", "configs/finetune.py:demo", "--config.classify.num_classes=3"], "error: classify.num_classes: 3, but "),
    ],
    ids=["unknown-key", "unknown-preset", "batch-vs-devices", "no-manifest", "no-config-file", "config-syntax", "no-get-config",
         "workdir-under-a-file", "finetune-fraction", "finetune-classes-vs-data"],
)
def test_command_line_errors_are_one_line_exit_2(args, message, tmp_path):
    for name, text in FILES.items():
        (tmp_path / name).write_text(text)
    result = _train(*[a.format(tmp=tmp_path) for a in args], tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert lines[-1].startswith(message.format(tmp=tmp_path)), result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "w").exists()  # refused before anything is written (not even generated data)
