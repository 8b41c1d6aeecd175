"""Launch scripts: the local multi-process launcher for real, the TPU and Slurm scripts against fakes."""

import contextlib
import os
import pathlib
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LOCAL = ROOT / "launch" / "local_multihost.sh"
TPU_POD = ROOT / "launch" / "tpu_pod.sh"
SLURM = ROOT / "launch" / "slurm_gpu.sbatch"

ENV = {
    **{k: v for k, v in os.environ.items() if not k.startswith(("NUCGPT_", "SLURM_"))},
    "PYTHON": sys.executable,
    "PYTHONPATH": str(ROOT),
}


def launch(num_processes, program: str, timeout=120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(LOCAL), str(num_processes), "--", sys.executable, "-c", program],
                          capture_output=True, text=True, timeout=timeout, env={**ENV, **env})


def lines_of(process: int, output: str) -> list[str]:
    prefix = f"[{process}] "
    return [line[len(prefix):] for line in output.splitlines() if line.startswith(prefix)]


def test_local_processes_form_one_run_with_gloo_collectives():
    program = textwrap.dedent("""
        from nucgpt import distributed
        index, count = distributed.initialize()
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import NamedSharding, PartitionSpec as P
        mesh = jax.make_mesh((jax.device_count(),), ("data",))
        local = np.full((jax.local_device_count(),), index + 1.0, np.float32)
        x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
        total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
        print("result", index, count, jax.local_device_count(), jax.device_count(), float(total), flush=True)
    """)
    # pytest's XLA_FLAGS asks for 8 devices; the launcher's DEVICES_PER_PROCESS must win.
    result = launch(2, program, DEVICES_PER_PROCESS="2")
    assert result.returncode == 0, result.stdout + result.stderr
    for i in range(2):
        assert [line for line in lines_of(i, result.stdout) if line.startswith("result")] == [
            f"result {i} 2 2 4 6.0"  # 2 devices × 1.0 from process 0 + 2 devices × 2.0 from process 1
        ]


def test_a_failed_process_stops_the_others_and_sets_the_exit_status():
    program = textwrap.dedent("""
        import os, sys, time
        if os.environ["NUCGPT_PROCESS_ID"] == "1":
            sys.exit(3)
        time.sleep(300)
    """)
    result = launch(2, program, KILL_AFTER_S="2", timeout=60)
    assert result.returncode == 3
    assert "process 1 exited with status 3" in result.stderr


def test_sigterm_is_forwarded_to_every_process():
    program = textwrap.dedent("""
        import os, signal, sys, time
        def save_and_exit(*_):
            print("saved", os.environ["NUCGPT_PROCESS_ID"], flush=True)
            sys.exit(0)
        signal.signal(signal.SIGTERM, save_and_exit)
        print("ready", flush=True)
        time.sleep(300)
    """)
    launcher = subprocess.Popen(["bash", str(LOCAL), "2", sys.executable, "-c", program], env=ENV,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready = set()
    deadline = time.monotonic() + 60
    while len(ready) < 2 and time.monotonic() < deadline:
        line = launcher.stdout.readline()
        if line.endswith("ready\n"):
            ready.add(line.split()[0])
    launcher.send_signal(signal.SIGTERM)
    out, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 0, err
    assert sorted(re.findall(r"^\[\d\] saved \d$", out, re.M)) == ["[0] saved 0", "[1] saved 1"]


@pytest.mark.parametrize("args, message", [
    ([], "usage"),
    (["0", "--", "true"], "N must be a positive integer"),
    (["2", "--"], "no command given"),
])
def test_local_launcher_bad_usage_is_one_line(args, message):
    result = subprocess.run(["bash", str(LOCAL), *args], capture_output=True, text=True, env=ENV, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


TRAINER_ARGS = ["--config", "configs/pretrain.py:nucleotide_gpt_500m", "--workdir", "gs://bucket/run 1",
                "--config.train.steps=10"]


def tpu_pod(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TPU_POD), *args], capture_output=True, text=True, timeout=60,
                          env=env or ENV)


def test_tpu_pod_dry_run_prints_every_step_in_order():
    result = tpu_pod("--name", "pod", "--type", "v5p-32", "--zone", "us-east5-a", "--project", "proj",
                     "--spot", "--create", "--run", "--delete", "--dry-run", "--", *TRAINER_ARGS)
    assert result.returncode == 0, result.stderr
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    steps = [c[4] if c[0] == "gcloud" else c[0] for c in commands]
    assert steps == ["create", "git", "scp", "ssh", "ssh", "ssh", "delete"]
    create, archive, scp, install, start, stream, delete = commands
    assert create[5:] == ["pod", "--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-32",
                          "--version=v2-alpha-tpuv5", "--spot"]
    assert "archive" in archive and archive[-1] == "HEAD"
    assert scp[-1] == "--worker=all" and scp[6] == "pod:nucgpt.tar.gz"
    assert [c[-2] for c in (install, start, stream)] == ["--worker=all", "--worker=all", "--worker=0"]
    assert all("--zone=us-east5-a" in c and "--project=proj" in c for c in commands[2:])
    assert "uv pip install" in install[-1]
    assert "nucgpt.train " + shlex.join(TRAINER_ARGS).replace("'", "") in start[-1].replace("\\", "")
    assert delete[5:] == ["pod", "--zone=us-east5-a", "--project=proj", "--quiet"]


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--create", "--type", "v4-8"], "--name is required"),
    (["--name", "n", "--create", "--type", "v4-8"], "--zone is required"),
    (["--name", "My_TPU", "--zone", "z", "--delete"], "--name must be lowercase"),
    (["--name", "n", "--zone", "z"], "nothing to do"),
    (["--name", "n", "--zone", "z", "--create"], "--create needs --type"),
    (["--name", "n", "--zone", "z", "--create", "--type", "v9x-8"], "no default runtime"),
    (["--name", "n", "--zone", "z", "--run"], "--run needs trainer arguments"),
    (["--name", "n", "--zone", "z", "--delete", "--bogus"], "unknown option '--bogus'"),
    (["--name", "--zone", "z", "--delete"], "--name needs a value"),
])
def test_tpu_pod_bad_flags_are_one_line_errors(args, message):
    result = tpu_pod(*args, "--dry-run")
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert result.stdout == ""


def _write_executable(path: pathlib.Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)


needs_git_checkout = pytest.mark.skipif(not (ROOT / ".git").exists(), reason="tpu_pod.sh copies git HEAD")


def fake_slice(tmp_path: pathlib.Path, trainer: str) -> tuple[dict, pathlib.Path]:
    """A one-worker "slice" in tmp_path: gcloud runs ssh commands in a local home; `trainer` is its python."""
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    _write_executable(bin_dir / "gcloud", textwrap.dedent(f"""\
        #!/usr/bin/env bash
        echo "$*" >> {tmp_path}/gcloud.log
        case $4 in
          scp) cp "$5" {home}/nucgpt.tar.gz ;;
          ssh) for a in "$@"; do [[ $a == --command=* ]] && HOME={home} exec bash -c "cd; ${{a#--command=}}"; done ;;
        esac
    """))
    _write_executable(bin_dir / "python3", "#!/bin/sh\n")  # the worker's pip, installing uv
    _write_executable(home / ".local/bin/uv", "#!/bin/sh\n")
    _write_executable(home / "nucgpt-venv/bin/python", trainer)
    return {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "TMPDIR": str(tmp_path)}, home


@needs_git_checkout
def test_tpu_pod_runs_its_remote_scripts_on_a_fake_one_worker_slice(tmp_path):
    """Every command really runs, through gcloud's --command quoting, on a fake worker."""
    env, home = fake_slice(tmp_path, textwrap.dedent("""\
        #!/usr/bin/env bash
        printf 'trainer in %s got:' "$(basename "$PWD")"; printf ' <%s>' "$@"; echo
        exit 3
    """))
    result = tpu_pod("--name", "pod", "--zone", "z", "--create", "--type", "v4-8", "--run", "--delete", "--",
                     *TRAINER_ARGS, env=env)
    assert result.returncode == 3, result.stderr  # the trainer's status, after the slice is deleted
    assert "trainer in nucgpt got: <-m> <nucgpt.train> " + " ".join(f"<{a}>" for a in TRAINER_ARGS) in result.stdout
    assert (home / "nucgpt" / "pyproject.toml").is_file()  # the git HEAD tree, unpacked
    calls = (tmp_path / "gcloud.log").read_text().splitlines()
    assert [c.split()[3] for c in calls] == ["create", "scp", "ssh", "ssh", "ssh", "delete"]


@needs_git_checkout
def test_tpu_pod_deletes_the_slice_when_a_setup_step_fails(tmp_path):
    """--run --delete: a failed install must not leave a paid slice idling."""
    env, home = fake_slice(tmp_path, "#!/bin/sh\n")
    (home / ".local/bin/uv").write_text("#!/bin/sh\necho 'simulated install failure' >&2; exit 1\n")
    result = tpu_pod("--name", "pod", "--zone", "z", "--run", "--delete", "--", *TRAINER_ARGS, env=env)
    assert result.returncode == 1 and "simulated install failure" in result.stderr
    assert "deleting the slice as --delete asks" in result.stderr
    calls = (tmp_path / "gcloud.log").read_text().splitlines()
    assert [c.split()[3] for c in calls] == ["scp", "ssh", "delete"]


@needs_git_checkout
def test_tpu_pod_stop_reaches_the_detached_trainer_and_logs_reattach(tmp_path):
    env, home = fake_slice(tmp_path, textwrap.dedent("""\
        #!/usr/bin/env bash
        trap 'echo checkpoint saved; exit 0' TERM
        echo training
        while true; do sleep 0.1; done
    """))
    running = subprocess.Popen(["bash", str(TPU_POD), "--name", "pod", "--zone", "z", "--run", "--", *TRAINER_ARGS],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert running.stdout.readline() == "training\n"
        stopped = tpu_pod("--name", "pod", "--zone", "z", "--stop", "--logs", env=env)
        out, err = running.communicate(timeout=60)
    finally:
        running.kill()
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):  # a detached leftover
            os.kill(int((home / "nucgpt_train.pid").read_text()), signal.SIGKILL)
    assert running.returncode == 0, err
    assert out == "checkpoint saved\n"
    assert stopped.returncode == 0, stopped.stderr
    assert "SIGTERM sent" in stopped.stdout and stopped.stdout.endswith("training\ncheckpoint saved\n")


def test_slurm_script_runs_one_task_per_node_with_all_its_gpus(tmp_path):
    directives = re.findall(r"^#SBATCH (\S+)", SLURM.read_text(), re.M)
    assert "--ntasks-per-node=1" in directives
    assert any(d.startswith("--gpus-per-node=") for d in directives)
    _write_executable(tmp_path / "srun", '#!/bin/sh\necho "srun $*"\n')
    env = {**ENV, "PATH": f"{tmp_path}:{ENV['PATH']}", "PYTHON": "python3"}
    result = subprocess.run(["bash", str(SLURM), "--config", "configs/pretrain.py:demo", "--workdir", "/w"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", "python3", "-m",
                                     "nucgpt.train", "--config", "configs/pretrain.py:demo", "--workdir", "/w"]
    no_args = subprocess.run(["bash", str(SLURM)], capture_output=True, text=True, env=env, timeout=30)
    assert no_args.returncode == 2 and no_args.stderr.startswith("error: ")
