"""Multi-process start-up: where the process group comes from, and stack-trace collection."""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import pytest
from ml_collections import ConfigDict

from nucgpt import distributed
from nucgpt.diagnostics import stack_traces
from nucgpt.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("node[01-04,07]", ["node01", "node02", "node03", "node04", "node07"]),
        ("gpu-a,gpu-b", ["gpu-a", "gpu-b"]),
        ("solo", ["solo"]),
        ("n[9-11]", ["n9", "n10", "n11"]),
        ("node[001,007-008],host2", ["node001", "node007", "node008", "host2"]),
        ("rack[1-2]-gpu[3-4],login", ["rack1-gpu3", "rack1-gpu4", "rack2-gpu3", "rack2-gpu4", "login"]),
    ],
)
def test_expand_hostlist(nodelist, hosts):
    assert distributed.expand_hostlist(nodelist) == hosts


SLURM = {
    "SLURM_PROCID": "2",
    "SLURM_NTASKS": "8",
    "SLURM_STEP_NUM_TASKS": "4",
    "SLURM_STEP_NODELIST": "gpu[07-10]",
    "SLURM_JOB_NODELIST": "gpu[01-10]",
    "SLURM_JOB_ID": "4097",
}


def test_slurm_step_gives_rank_count_and_first_host():
    group = distributed.resolve(SLURM, {})
    assert (group.process_id, group.num_processes, group.source) == (2, 4, "Slurm")
    assert group.coordinator_address == f"gpu07:{61440 + 4097 % 4096}"
    assert group.local_device_ids is None  # a task owns every GPU of its node


def test_slurm_task_count_falls_back_to_the_job_and_the_port_can_be_set():
    env = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_NUM_TASKS"}
    group = distributed.resolve({**env, "NUCGPT_COORDINATOR_PORT": "1234"}, {})
    assert (group.num_processes, group.coordinator_address) == (8, "gpu07:1234")


def test_a_batch_script_outside_srun_is_one_process():
    """sbatch's own shell sees SLURM_PROCID=0 and the job's task count, but no step."""
    env = {k: v for k, v in SLURM.items() if not k.startswith("SLURM_STEP")}
    assert distributed.resolve({**env, "SLURM_PROCID": "0"}, {}) is None


def test_flags_beat_environment_beat_slurm():
    env = {**SLURM, "NUCGPT_PROCESS_ID": "1", "NUCGPT_COORDINATOR_ADDRESS": "10.0.0.1:99",
           "NUCGPT_LOCAL_DEVICE_IDS": "0,1"}
    group = distributed.resolve(env, {"process_id": 3})
    assert (group.process_id, group.num_processes) == (3, 4)
    assert group.coordinator_address == "10.0.0.1:99"
    assert group.local_device_ids == (0, 1)


@pytest.fixture
def clean_env(monkeypatch):
    """No launcher or Slurm settings leak in from the machine running the tests."""
    for key in list(os.environ):
        if key.startswith(("NUCGPT_", "SLURM_")):
            monkeypatch.delenv(key)


@pytest.mark.parametrize("env", [{"NUCGPT_NUM_PROCESSES": "1"},
                                 {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NODELIST": "n1"}])
def test_a_count_of_one_needs_no_coordinator(env):
    assert distributed.resolve(env, {}).num_processes == 1


@pytest.mark.parametrize("env, on_tpu", [({}, False), ({"NUCGPT_NUM_PROCESSES": "1"}, False),
                                         ({"NUCGPT_NUM_PROCESSES": "1"}, True)])
def test_initialize_one_process_touches_nothing(monkeypatch, clean_env, env, on_tpu):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(jax.distributed, "initialize", pytest.fail)
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: on_tpu)
    assert distributed.initialize() == (0, 1)


def test_initialize_joins_a_tpu_slice_when_nothing_is_configured(monkeypatch, clean_env):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(distributed, "on_cloud_tpu_vm", lambda: True)
    assert distributed.initialize() == (jax.process_index(), jax.process_count())
    assert calls == [{}]  # JAX's own TPU detection fills in everything


@pytest.mark.parametrize(
    "env, message",
    [
        ({"NUCGPT_NUM_PROCESSES": "two"}, "num_processes must be an integer"),
        ({"NUCGPT_NUM_PROCESSES": "0"}, "num_processes must be positive"),
        ({"NUCGPT_NUM_PROCESSES": "2", "NUCGPT_COORDINATOR_ADDRESS": "h:1"}, "no process_id"),
        ({"NUCGPT_NUM_PROCESSES": "2", "NUCGPT_PROCESS_ID": "2", "NUCGPT_COORDINATOR_ADDRESS": "h:1"},
         r"process_id must be in \[0, 2\)"),
        ({"NUCGPT_NUM_PROCESSES": "2", "NUCGPT_PROCESS_ID": "0"}, "no coordinator host:port"),
        ({"NUCGPT_NUM_PROCESSES": "2", "NUCGPT_PROCESS_ID": "0", "NUCGPT_COORDINATOR_ADDRESS": "h"},
         "no coordinator host:port"),
    ],
)
def test_incomplete_or_bad_settings_are_user_errors(env, message):
    with pytest.raises(UserError, match=message):
        distributed.resolve(env, {})


def test_initialize_passes_the_group_and_keeps_all_local_devices(monkeypatch, clean_env):
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setenv("NUCGPT_NUM_PROCESSES", "3")
    monkeypatch.setenv("NUCGPT_PROCESS_ID", "2")
    monkeypatch.setenv("NUCGPT_COORDINATOR_ADDRESS", "10.1.2.3:5555")
    assert distributed.initialize() == (2, 3)
    assert calls == [dict(coordinator_address="10.1.2.3:5555", num_processes=3, process_id=2,
                          local_device_ids=None, cluster_detection_method="deactivate")]
    assert jax.config.jax_cpu_collectives_implementation == "gloo"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_slurm_tasks_form_one_run_on_cpu():
    """The Slurm path for real: two tasks on localhost meet at the coordinator and all-gather."""
    program = textwrap.dedent("""
        from nucgpt import distributed
        index, count = distributed.initialize()
        import jax, numpy as np
        from jax.experimental import multihost_utils
        gathered = multihost_utils.process_allgather(np.array([index + 1]))
        print("result", index, count, jax.device_count(), gathered.ravel().tolist(), flush=True)
    """)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NUCGPT_", "SLURM_"))}
    base.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
                SLURM_NTASKS="2", SLURM_STEP_NODELIST="localhost", SLURM_JOB_ID="77",
                NUCGPT_COORDINATOR_PORT=str(_free_port()), PYTHONPATH=str(ROOT))
    tasks = [subprocess.Popen([sys.executable, "-c", program], env={**base, "SLURM_PROCID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [task.communicate(timeout=120) for task in tasks]
    finally:
        for task in tasks:
            task.kill()
    for i, (task, (out, err)) in enumerate(zip(tasks, outputs)):
        assert task.returncode == 0, err
        result = [line for line in out.splitlines() if line.startswith("result")]
        assert result == [f"result {i} 2 2 [1, 2]"]


def _diagnostics(mode: str, interval_s: int = 600) -> ConfigDict:
    return ConfigDict(dict(stack_traces=mode, stack_trace_interval_s=interval_s))


def test_stack_traces_auto_and_off_do_nothing_on_cpu():
    before = signal.getsignal(signal.SIGUSR1)
    for mode in ("auto", "off"):
        with stack_traces(_diagnostics(mode)):
            assert signal.getsignal(signal.SIGUSR1) is before


@pytest.mark.parametrize("cfg, message", [(_diagnostics("always"), "stack_traces must be one of"),
                                          (_diagnostics("on", 0), "positive integer")])
def test_stack_traces_rejects_bad_settings(cfg, message):
    with pytest.raises(UserError, match=message):
        with stack_traces(cfg):
            pass


def test_stack_traces_on_snapshots_periodically_and_exits_without_waiting_an_interval():
    program = textwrap.dedent("""
        import signal, time
        from ml_collections import ConfigDict
        from nucgpt.diagnostics import stack_traces
        def training_loop():
            time.sleep(2.5)
        with stack_traces(ConfigDict(dict(stack_traces="on", stack_trace_interval_s=1))):
            training_loop()
        with stack_traces(ConfigDict(dict(stack_traces="on", stack_trace_interval_s=3600))):
            pass
        print("restored", signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL)
    """)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "restored True"
    assert "stack trace snapshot every 1 seconds" in result.stderr
    assert "in training_loop" in result.stderr


def test_cpu_device_count_is_a_power_of_two_that_divides_the_batch():
    assert distributed.cpu_device_count(0, 32) == 0
    assert distributed.cpu_device_count(3, 32) == 3
    assert distributed.cpu_device_count(-1, 32, cores=2) == 2
    assert distributed.cpu_device_count(-1, 32, cores=6) == 4
    assert distributed.cpu_device_count(-1, 12, cores=16) == 4
    assert distributed.cpu_device_count(-1, 7, cores=16) == 1


def test_use_cpu_cores_leaves_an_explicit_device_count_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    distributed.use_cpu_cores(-1, 32)
    assert os.environ["XLA_FLAGS"] == "--xla_force_host_platform_device_count=8"
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    distributed.use_cpu_cores(2, 32)
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=2"
