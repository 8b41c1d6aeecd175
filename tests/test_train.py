"""End-to-end trainer runs (subprocesses, tiny model): training, exact resume after kill -9,
SIGTERM, NaN, TensorBoard; and the in-process step (gradient accumulation, restore onto a new mesh)."""
import json
import os
import signal
import subprocess
import sys
import time
import pathlib
import re

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = [
    "--config.model.d_model=32", "--config.model.num_layers=2", "--config.model.num_heads=2",
    "--config.model.num_kv_heads=2", "--config.model.head_dim=16", "--config.model.mlp_dim=64",
    "--config.model.attention=xla", "--config.train.seq_len=64", "--config.train.global_batch_size=8",
    "--config.train.eval_steps=2", "--config.optim.learning_rate=0.01", "--config.optim.warmup_steps=2",
    "--config.checkpoint.async_save=True", "--config.data.synthetic_bp=0",
]


@pytest.fixture(scope="session")
def genome(tmp_path_factory) -> str:
    """A small prepared synthetic genome shared by every run (windows of seq_len + 1 bases)."""
    from nucgpt.data import prepare, synthetic

    root = tmp_path_factory.mktemp("genome")
    synthetic.write_genome(root / "g.fa", bp=120_000, seed=1)
    prepare.prepare([str(root / "g.fa")], root / "data", window=65, valid_chroms=("chr4",), progress=False)
    return str(root / "data")


def train_command(workdir, genome, *extra) -> list[str]:
    return [sys.executable, "-m", "nucgpt.train", "--config", "configs/pretrain.py:demo", "--workdir", str(workdir),
            f"--config.data.path={genome}", *TINY, *extra]


def run_train(workdir, genome, *extra, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(train_command(workdir, genome, *extra), cwd=REPO, capture_output=True, text=True, timeout=timeout)


def metrics_lines(workdir) -> list[dict]:
    return [json.loads(l) for l in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def final_params(workdir) -> dict:
    from nucgpt.checkpoint import load_pretrained

    return jax.device_get(load_pretrained(str(workdir))[1])


def assert_trees_equal(a, b) -> None:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, genome):
    """12 uninterrupted steps, logging every step, eval at 4, 8, 12, checkpoint every 4."""
    workdir = tmp_path_factory.mktemp("reference")
    result = run_train(workdir, genome, "--config.train.steps=12", "--config.train.log_every=1",
                       "--config.train.eval_every=4", "--config.checkpoint.every=4")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_training_lowers_eval_loss_and_writes_logs(reference_run):
    workdir, result = reference_run
    lines = metrics_lines(workdir)
    train = [l for l in lines if "loss" in l]
    evals = [l for l in lines if "eval_loss" in l]
    assert [l["step"] for l in train] == list(range(1, 13))
    assert all(l["mfu"] is None and l["tokens_per_sec"] > 0 for l in train)  # CPU peak is unknown
    assert [l["step"] for l in evals] == [4, 8, 12]
    assert {"eval_loss_repeat", "eval_loss_unique", "eval_bits_per_base"} <= set(evals[0])
    # From the untrained model's ln 6 ≈ 1.79 to below the first eval, ending well under the start.
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < train[0]["loss"] - 0.2, [e["eval_loss"] for e in evals]
    assert "done: step 12" in result.stdout and "step      12 | checkpoint saving to" in result.stdout
    assert not re.search(r"^I\d{4} ", result.stderr, re.M), result.stderr[:2000]  # library INFO logs hidden by default
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["seq_len"] == 64 and config["task"] == "pretrain"
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "8"]  # keep=2 of the demo preset

    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    assert {"loss", "tokens_per_sec", "eval_loss", "eval_loss_repeat", "eval_loss_unique"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("eval_loss")] == [4, 8, 12]
    np.testing.assert_allclose(events.Scalars("loss")[-1].value, train[-1]["loss"], rtol=1e-6)


def test_kill_9_then_resume_is_bit_identical(reference_run, genome, tmp_path):
    """A run killed mid-way and resumed ends with the reference's exact params and per-step losses."""
    workdir = tmp_path / "killed"
    args = ("--config.train.steps=12", "--config.train.log_every=1", "--config.train.eval_every=4",
            "--config.checkpoint.every=4", "--config.checkpoint.keep=5")
    proc = subprocess.Popen(train_command(workdir, genome, *args, "--config.checkpoint.async_save=False"), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 150
    while not (workdir / "checkpoints" / "4").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert saved and saved[-1] < 12, f"the run was not interrupted mid-way (checkpoints {saved})"
    with open(workdir / "metrics.jsonl", "a") as f:  # what the killed run logged after its checkpoint
        f.write(json.dumps({"step": 11, "loss": 99.0}) + "\n" + '{"step": 12, "lo')

    result = run_train(workdir, genome, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from checkpoint step {saved[-1]}" in result.stdout

    reference_dir, _ = reference_run
    assert_trees_equal(final_params(workdir), final_params(reference_dir))
    # The data order continued exactly: every step after the resume saw the reference's batch.
    reference = {l["step"]: l["loss"] for l in metrics_lines(reference_dir) if "loss" in l}
    resumed = [l for l in metrics_lines(workdir) if "loss" in l and l["step"] > saved[-1]]
    assert [l["step"] for l in resumed] == list(range(saved[-1] + 1, 13))
    assert all(l["loss"] == reference[l["step"]] for l in resumed)
    events = EventAccumulator(str(workdir / "tensorboard"))
    events.Reload()
    logged = [e.step for e in events.Scalars("loss")]
    assert sorted(logged) == sorted(set(logged)) and max(logged) == 12  # no step twice in TensorBoard either


def test_a_changed_model_in_the_same_workdir_stops_without_touching_it(reference_run, genome):
    """The checkpoints hold another model: exit 2 with one line naming the field; checkpoints and config.json stay."""
    workdir, _ = reference_run
    config_before = (workdir / "config.json").read_text()
    result = run_train(workdir, genome, "--config.train.steps=16", "--config.model.mlp_dim=128")
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines() == [
        f"error: checkpoint {workdir}/checkpoints/12 does not match the config: model.mlp_dim=128 but the checkpoint "
        f"has 64; use a new --workdir, or the settings in {workdir}/config.json"
    ]
    assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "8"]
    assert (workdir / "config.json").read_text() == config_before


def test_eval_only_without_a_checkpoint_is_a_user_error(genome, tmp_path):
    workdir = tmp_path / "untrained"
    result = run_train(workdir, genome, "--config.eval_only=true")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: eval_only: no checkpoint in {workdir}; train first, or point --workdir at a trained run"
    ]
    assert not workdir.exists()


def test_the_dataset_is_checked_against_the_run_before_training(genome, capsys):
    """A missing eval split fails before the first step, naming the field; windows that do not fit
    the rows get a note (a row one token short, as 8,192 bp windows at seq_len 8192, gets none)."""
    sys.path.insert(0, str(REPO / "configs"))
    import pretrain as presets

    from nucgpt.errors import UserError
    from nucgpt.tasks import get_task

    task, config = get_task("pretrain"), presets.get_config("demo")
    config = task.resolve_config(config.copy_and_resolve_references(), "/unused")
    config.data.path = genome
    config = task.resolve_config(config, "/unused")
    assert config.data.synthetic_bp == 0  # a given path never gets a genome generated into it
    config.model.kind = "cnn"
    with pytest.raises(UserError, match=r"^model.kind: 'cnn'; pretraining trains a transformer"):
        task.validate(config)
    config.model.kind = "transformer"
    config.data.eval_split = "test"
    with pytest.raises(UserError, match=r"^data.eval_split: .* has no 'test' records \(splits: train=\d+, valid=\d+, test=0\)"):
        task.validate(config)
    config.data.eval_split = "valid"
    notes = {}
    for seq_len in (64, 65, 128, 32):  # the fixture's windows are 65 bp
        config.train.seq_len = seq_len
        capsys.readouterr()
        task.validate(config)
        notes[seq_len] = capsys.readouterr().out
    assert notes[64] == notes[65] == ""
    assert "65 bp windows give 65 of a row's 129 tokens (50% padding); windows of 129 bp fill a row" in notes[128]
    assert "65 bp windows; a row of train.seq_len 32 tokens reads the first 33 bp of each" in notes[32]
    kmer = presets.get_config("kmer6_nonoverlap")  # the preset's 8,192 bp windows: 1,366 of 1,537 tokens
    assert task.window_note(kmer, 8192).startswith("8192 bp windows give 1366 of a row's 1537 tokens (11% padding)")
    assert task.window_note(presets.get_config("nucleotide_gpt_500m"), 8192) is None


def test_sigterm_saves_and_exits_zero(genome, tmp_path):
    workdir = tmp_path / "preempted"
    proc = subprocess.Popen(train_command(workdir, genome, "--config.train.steps=100000", "--config.checkpoint.every=100000",
                                          "--config.train.eval_every=100000"),
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 150
    while not (workdir / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    saved = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
    assert len(saved) == 1 and 0 < saved[0] < 100000
    assert f"preempted (SIGTERM): saved checkpoint step {saved[0]}" in out
    last = metrics_lines(workdir)[-1]  # the steps since the last log line are logged, not lost with the run
    assert last["step"] == saved[0] and "loss" in last


def test_a_resume_on_an_eval_step_without_its_eval_evaluates_first(reference_run, genome, tmp_path):
    """A preemption on an eval step saves without evaluating; the resumed run evaluates that step first."""
    import shutil

    reference_dir, _ = reference_run
    workdir = tmp_path / "preempted_on_eval"
    shutil.copytree(reference_dir, workdir)
    shutil.rmtree(workdir / "checkpoints" / "12")  # resume from 8 ...
    kept = [l for l in metrics_lines(workdir) if l["step"] <= 8 and not (l["step"] == 8 and "eval_loss" in l)]
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(l) + "\n" for l in kept))  # ... whose eval never ran
    result = run_train(workdir, genome, "--config.train.steps=12", "--config.train.log_every=1",
                       "--config.train.eval_every=4", "--config.checkpoint.every=4")
    assert result.returncode == 0, result.stderr[-3000:]
    evals = [l for l in metrics_lines(workdir) if "eval_loss" in l]
    reference = [l for l in metrics_lines(reference_dir) if "eval_loss" in l]
    assert [l["step"] for l in evals] == [4, 8, 12]
    assert evals[1]["eval_loss"] == reference[1]["eval_loss"]  # step 8's parameters, evaluated as the reference did


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(genome, tmp_path):
    """An absurd learning rate blows the weights up; the run stops with exit 1, saving nothing after."""
    workdir = tmp_path / "nan"
    result = run_train(workdir, genome, "--config.train.steps=50", "--config.checkpoint.every=2",
                       "--config.optim.learning_rate=1e30", "--config.optim.final_learning_rate=1e29",
                       "--config.optim.warmup_steps=0", "--config.optim.clip_norm=0")
    assert result.returncode == 1, result.stderr[-3000:]
    line = [l for l in result.stderr.splitlines() if l.startswith("error: training diverged")]
    assert line, result.stderr[-3000:]
    bad_step = int(line[0].split(" at step ")[1].split(";")[0])
    saved = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
    assert all(s < bad_step for s in saved)
    good = [s for s in saved if s < bad_step - 1]  # the step before the bad one holds the diverging parameters
    assert (f"last good checkpoint is step {good[-1]}" if good else "no good checkpoint is kept") in line[0]


def test_the_checkpoint_a_divergence_started_from_is_not_called_good():
    from nucgpt.checkpoint import divergence_report

    where = pathlib.Path("/w/checkpoints")
    report = divergence_report(7, [2, 4, 6], where)
    assert report == ("the last good checkpoint is step 4 in /w/checkpoints; checkpoint step 6 holds the parameters "
                      "step 7 diverged from: delete /w/checkpoints/6 before resuming")
    assert divergence_report(9, [2, 4, 6], where) == "the last good checkpoint is step 6 in /w/checkpoints"
    assert divergence_report(3, [2], where).startswith("no good checkpoint is kept; checkpoint step 2 holds")


def test_dry_run_of_the_500m_preset_compiles_without_allocating(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "nucgpt.train", "--config", "configs/pretrain.py:nucleotide_gpt_500m",
         "--workdir", str(tmp_path / "w"), "--dry_run"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "parameters: 503,441,408" in out
    assert "mesh: {'data': 1, 'fsdp': 8, 'tensor': 1}" in out
    assert "per-device memory" in out
    # wq is sharded fsdp × tensor, whether the blocks are stacked (a leading layer axis) or unrolled (blocks/<i>/).
    assert re.search(r"^  blocks/(0/)?wq .* P\((None, )?'fsdp', 'tensor', None\)$", out, re.M), out[:3000]
    assert not (tmp_path / "w").exists()


def test_throughput_counts_each_batch_at_its_own_length():
    """Length-bucketed fine-tuning batches count their bucket's length, not train.seq_len."""
    from configs.pretrain import get_config
    from nucgpt.flops import Throughput, batch_tokens

    assert batch_tokens({"inputs": np.zeros((8, 64)), "labels": np.zeros(8)}) == 8 * 64
    config = get_config("demo")
    throughput = Throughput(config, start_step=0)
    throughput.count(batch_tokens({"inputs": np.zeros((32, 16))}))
    throughput.count(batch_tokens({"inputs": np.zeros((32, 64))}))
    throughput.time -= 2.0  # two seconds ago
    measured = throughput.measure(2)
    assert measured["tokens_per_sec"] == pytest.approx(32 * (16 + 64) / 2.0, rel=1e-3)
    assert throughput.tokens == 0 and throughput.step == 2


def test_profile_steps_writes_a_trace_tensorboard_reads(genome, tmp_path):
    """diagnostics.profile_steps traces whole steps of the real loop into DIR/tensorboard/plugins/profile."""
    workdir = tmp_path / "profiled"
    result = run_train(workdir, genome, "--config.train.steps=4", "--config.diagnostics.profile_steps=2",
                       "--config.diagnostics.profile_skip_steps=1")
    assert result.returncode == 0, result.stderr[-3000:]
    traces = list((workdir / "tensorboard" / "plugins" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and f"profile of 2 step(s) written: {traces[0]}" in result.stdout
    profile = jax.profiler.ProfileData.from_file(str(traces[0]))
    host_events = [e.name for plane in profile.planes for line in plane.lines for e in line.events]
    assert sum(name == "train" for name in host_events) == 2, sorted(set(host_events))[:50]  # the two steps' annotations
