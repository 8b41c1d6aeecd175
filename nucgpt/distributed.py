"""Multi-process start-up: `jax.distributed.initialize` from flags, environment, Slurm or a TPU VM.

Every process of a multi-host run calls `initialize()` before anything touches devices. Each
setting is taken from the first source that has it:

1. flags `--coordinator_address --num_processes --process_id [--local_device_ids]`;
2. environment `NUCGPT_COORDINATOR_ADDRESS` (host:port), `NUCGPT_NUM_PROCESSES`,
   `NUCGPT_PROCESS_ID`, `NUCGPT_LOCAL_DEVICE_IDS` (comma-separated) — what
   `launch/local_multihost.sh` sets;
3. Slurm, inside an `srun` step: `SLURM_PROCID`, `SLURM_STEP_NUM_TASKS` (else `SLURM_NTASKS`), the
   first host of `SLURM_STEP_NODELIST` on port `NUCGPT_COORDINATOR_PORT`, or one derived from
   `SLURM_JOB_ID` so that jobs sharing a node differ (a batch script outside `srun` is one process);
4. a Cloud TPU VM (libtpu installed and TPU chips attached): plain `jax.distributed.initialize()`,
   which reads the slice's workers from the metadata server.

One process (nothing configured off a TPU VM, or a count of 1) initializes nothing. Several processes on CPU
exchange data with gloo collectives.
"""

import dataclasses
import glob
import importlib.util
import os
import re
from typing import Mapping

import jax
from absl import flags, logging

from nucgpt.errors import UserError

_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 in a multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
_LOCAL_DEVICE_IDS = flags.DEFINE_list(
    "local_device_ids", None, "Accelerator ids this process uses (default: all it sees)."
)

ENV_PREFIX = "NUCGPT_"
_SETTINGS = ("coordinator_address", "num_processes", "process_id", "local_device_ids")
# Slurm runs unrelated jobs on one node; a port from the job id keeps their coordinators apart.
_SLURM_PORT_BASE, _SLURM_PORT_SPAN = 61440, 4096


@dataclasses.dataclass(frozen=True)
class ProcessGroup:
    """Where this process sits in a multi-process run; `source` says where that was read from."""

    coordinator_address: str
    num_processes: int
    process_id: int
    local_device_ids: tuple[int, ...] | None
    source: str


def expand_hostlist(nodelist: str) -> list[str]:
    """Slurm's compact host list to host names: `node[01-03,07],gpu-a` → node01 … node07, gpu-a."""
    hosts: list[str] = []
    for item in re.findall(r"(?:[^,\[]|\[[^\]]*\])+", nodelist):
        group = re.search(r"\[([^\]]*)\]", item)
        if group is None:
            hosts.append(item)
            continue
        head, tail = item[: group.start()], item[group.end() :]
        for part in group.group(1).split(","):
            low, _, high = part.partition("-")
            width = len(low)
            for n in range(int(low), int(high or low) + 1):
                hosts.extend(head + str(n).zfill(width) + rest for rest in expand_hostlist(tail) or [""])
    return hosts


def _integer(value: str | int | None, name: str) -> int | None:
    if value is None or isinstance(value, int):
        return value
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{name} must be an integer, got {value!r}") from None


def _device_ids(value: str | list[str] | None, name: str) -> tuple[int, ...] | None:
    if not value:
        return None
    items = value.split(",") if isinstance(value, str) else value
    return tuple(_integer(item.strip(), name) for item in items)


def _slurm_settings(env: Mapping[str, str]) -> dict[str, str | None]:
    """What an `srun` task knows about its step; empty outside one.

    A batch script itself also sees SLURM_PROCID=0 and the job's task count, but it is no task of a
    run: read as one, it would wait for peers that never come.
    """
    if "SLURM_STEP_NODELIST" not in env or "SLURM_PROCID" not in env:
        return {}
    port = env.get(ENV_PREFIX + "COORDINATOR_PORT")
    if port is None and "SLURM_JOB_ID" in env:
        port = str(_SLURM_PORT_BASE + _integer(env["SLURM_JOB_ID"], "SLURM_JOB_ID") % _SLURM_PORT_SPAN)
    return dict(
        coordinator_address=f"{expand_hostlist(env['SLURM_STEP_NODELIST'])[0]}:{port}" if port else None,
        num_processes=env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS"),
        process_id=env["SLURM_PROCID"],
    )


def resolve(env: Mapping[str, str], flag_values: Mapping[str, object]) -> ProcessGroup | None:
    """The process group from flags, then NUCGPT_* variables, then Slurm; None when none says.

    A TPU VM's group is not resolved here: JAX reads it from the metadata server.
    """
    environment = {key: env.get(ENV_PREFIX + key.upper()) for key in _SETTINGS}
    sources = (("flags", flag_values), ("environment", environment), ("Slurm", _slurm_settings(env)))

    def first(key: str) -> tuple[object, str]:
        for source, values in sources:
            if values.get(key) is not None:
                return values[key], source
        return None, ""

    count, source = first("num_processes")
    index, address, device_ids = (first(key)[0] for key in ("process_id", "coordinator_address",
                                                             "local_device_ids"))
    num_processes = _integer(count, "num_processes")
    if num_processes is None:
        return None
    if num_processes < 1:
        raise UserError(f"num_processes must be positive, got {num_processes}")
    if num_processes == 1:  # said outright: not even a TPU VM's slice is joined
        return ProcessGroup(coordinator_address="", num_processes=1, process_id=0, local_device_ids=None,
                            source=source)
    process_id = _integer(index, "process_id")
    if process_id is None:
        raise UserError(f"{num_processes} processes configured but no process_id "
                        f"(flag --process_id or {ENV_PREFIX}PROCESS_ID)")
    if not 0 <= process_id < num_processes:
        raise UserError(f"process_id must be in [0, {num_processes}), got {process_id}")
    if not address or ":" not in str(address):
        raise UserError(f"{num_processes} processes configured but no coordinator host:port "
                        f"(flag --coordinator_address or {ENV_PREFIX}COORDINATOR_ADDRESS), got {address!r}")
    return ProcessGroup(
        coordinator_address=str(address),
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=_device_ids(device_ids, "local_device_ids"),
        source=source,
    )


def on_cloud_tpu_vm() -> bool:
    """libtpu installed and TPU chips attached (v2–v4 as /dev/accel*, v5e and later through vfio)."""
    has_chips = bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))
    return has_chips and importlib.util.find_spec("libtpu") is not None


def _flag_values() -> dict[str, object]:
    """Parsed flag values; none when no absl app parsed them (a library call, a test)."""
    if not flags.FLAGS.is_parsed():
        return {}
    return dict(
        coordinator_address=_COORDINATOR_ADDRESS.value,
        num_processes=_NUM_PROCESSES.value,
        process_id=_PROCESS_ID.value,
        local_device_ids=_LOCAL_DEVICE_IDS.value,
    )


def initialize() -> tuple[int, int]:
    """Joins the multi-process run if there is one; returns (process_index, process_count).

    Must run before any other JAX call touches devices.
    """
    if jax.distributed.is_initialized():
        return jax.process_index(), jax.process_count()
    group = resolve(os.environ, _flag_values())
    if group is None and on_cloud_tpu_vm():
        jax.distributed.initialize()
        logging.info("distributed: TPU VM process %d of %d", jax.process_index(), jax.process_count())
        return jax.process_index(), jax.process_count()
    if group is None or group.num_processes == 1:
        return 0, 1
    # Only the CPU backend reads this; accelerators bring their own collectives.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=group.coordinator_address,
        num_processes=group.num_processes,
        process_id=group.process_id,
        local_device_ids=list(group.local_device_ids) if group.local_device_ids else None,
        # JAX's own Slurm detection would otherwise pin one GPU per task (SLURM_LOCALID); a task
        # here owns all of its node's accelerators unless local_device_ids says otherwise.
        cluster_detection_method="deactivate",
    )
    logging.info("distributed: process %d of %d, coordinator %s (from %s)", group.process_id,
                 group.num_processes, group.coordinator_address, group.source)
    return group.process_id, group.num_processes


_HOST_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_device_count(cpu_devices: int, global_batch_size: int, cores: int | None = None) -> int:
    """How many virtual CPU devices `mesh.cpu_devices` asks for: -1 = one per core, rounded down
    to a power of two that divides the global batch (XLA runs each CPU device on its own thread,
    one device keeps one core busy)."""
    if cpu_devices >= 0:
        return cpu_devices
    cores = cores or os.cpu_count() or 1
    count = 1
    while count * 2 <= cores and global_batch_size % (count * 2) == 0:
        count *= 2
    return count


def use_cpu_cores(cpu_devices: int, global_batch_size: int) -> None:
    """Sets XLA's host device count before JAX starts its backends, unless XLA_FLAGS already sets
    it (a launcher or test did) or `cpu_devices` is 0. Only the CPU platform reads the flag, so it
    changes nothing on a GPU or TPU host."""
    xla_flags = os.environ.get("XLA_FLAGS", "")
    count = cpu_device_count(cpu_devices, global_batch_size)
    if count < 1 or _HOST_DEVICE_COUNT_FLAG in xla_flags:
        return
    os.environ["XLA_FLAGS"] = f"{xla_flags} {_HOST_DEVICE_COUNT_FLAG}={count}".strip()
