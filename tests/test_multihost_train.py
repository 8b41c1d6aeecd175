"""Two processes (launch/local_multihost.sh, gloo) train like one process with the same global batch,
and their checkpoint restores in a single process."""
import os
import pathlib
import signal
import subprocess
import time

import numpy as np
import pytest

from test_train import REPO, genome, metrics_lines, train_command  # noqa: F401 (genome is a fixture)

STEPS = ("--config.train.steps=6", "--config.train.log_every=1", "--config.train.eval_every=6", "--config.checkpoint.every=6")
# Sums over rows are reduced across processes in a different order than within one process.
LOSS_RTOL = 1e-5


def env_with_devices(count: int) -> dict:
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
    return dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={count}", JAX_PLATFORMS="cpu")


def run(command, env, timeout=240):
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def train_losses(workdir) -> dict[int, float]:
    return {l["step"]: l["loss"] for l in metrics_lines(workdir) if "loss" in l}


@pytest.mark.slow
def test_two_processes_match_one_and_their_checkpoint_restores_in_one(genome, tmp_path):
    one = tmp_path / "one"
    run(train_command(one, genome, *STEPS), env_with_devices(4))

    two = tmp_path / "two"
    env = dict(env_with_devices(2), DEVICES_PER_PROCESS="2", PYTHON="python3")
    result = run(["bash", "launch/local_multihost.sh", "2", "--", *train_command(two, genome, *STEPS)], env)
    assert "[1] " in result.stdout  # both processes ran
    assert len(list((two / "tensorboard").glob("events.out.tfevents.*"))) == 1  # process 0 alone logs
    assert len((two / "metrics.jsonl").read_text().splitlines()) == len((one / "metrics.jsonl").read_text().splitlines())

    losses_one, losses_two = train_losses(one), train_losses(two)
    assert sorted(losses_two) == list(range(1, 7))
    np.testing.assert_allclose([losses_two[s] for s in sorted(losses_two)], [losses_one[s] for s in sorted(losses_one)], rtol=LOSS_RTOL)
    eval_one = [l for l in metrics_lines(one) if "eval_loss" in l][-1]["eval_loss"]
    eval_two = [l for l in metrics_lines(two) if "eval_loss" in l][-1]["eval_loss"]
    np.testing.assert_allclose(eval_two, eval_one, rtol=LOSS_RTOL)
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(two / "checkpoints" / "6" / "data"))

    # One process, four devices, continues the two-process run for two more steps.
    result = run(train_command(two, genome, "--config.train.steps=8", "--config.train.log_every=1",
                               "--config.train.eval_every=8", "--config.checkpoint.every=8"), env_with_devices(4))
    assert "resumed from checkpoint step 6" in result.stdout
    assert "data order restarts" in result.stdout
    assert sorted(train_losses(two))[-2:] == [7, 8]


def _python_pid_of_process(index: int, workdir: pathlib.Path) -> int | None:
    """The trainer process launched with NUCGPT_PROCESS_ID=index for this workdir (a grandchild of the launcher)."""
    for proc in pathlib.Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"nucgpt.train" in cmdline and str(workdir).encode() in cmdline and f"NUCGPT_PROCESS_ID={index}".encode() in environ:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_sigterm_to_one_process_saves_on_every_process_at_the_next_steps(genome, tmp_path):
    """A scheduler may warn one host only: JAX's preemption service tells the others, and all save
    at the same step within a few steps — not at the next log step (1000 here)."""
    workdir = tmp_path / "preempted"
    env = dict(env_with_devices(1), DEVICES_PER_PROCESS="1", PYTHON="python3")
    command = train_command(workdir, genome, "--config.train.steps=100000", "--config.train.log_every=1000",
                            "--config.train.eval_every=100000", "--config.checkpoint.every=100000")
    launcher = subprocess.Popen(["bash", "launch/local_multihost.sh", "2", "--", *command], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while not (workdir / "config.json").exists() and launcher.poll() is None and time.time() < deadline:
            time.sleep(0.1)  # config.json is written just before the first step
        time.sleep(3)
        target = _python_pid_of_process(1, workdir)
        assert target is not None and launcher.poll() is None
        os.kill(target, signal.SIGTERM)
        out, _ = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    assert launcher.returncode == 0, out[-4000:]
    saved = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
    assert len(saved) == 1 and 0 < saved[0] < 1000, saved
    assert f"preempted (SIGTERM): saved checkpoint step {saved[0]}" in out
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(os.listdir(workdir / "checkpoints" / str(saved[0]) / "data"))
