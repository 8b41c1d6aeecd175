"""MFU of the real train step: `nucgpt.step.build_trainer` on synthetic batches, any devices, any mesh.

    python -m benchmarks.mfu --config configs/pretrain.py:nucleotide_gpt_500m \
        --config.train.global_batch_size=4 --config.model.attention=cudnn --steps 10
    python -m benchmarks.mfu --config configs/pretrain.py:demo --sweep \
        --sweep_batch_sizes=8,16 --sweep_remat=none,full --sweep_attention=xla
    python -m benchmarks.mfu --config configs/pretrain.py:nucleotide_gpt_500m --dry_run

The step timed is the one `nucgpt.train` runs (same mesh, shardings, donation, optimizer): it is
compiled ahead of time from the live state and batch (`.lower().compile()`, so compile time is
measured apart), warmed up, then timed step by step: by default with the next step already queued
when the host waits (`--timing pipelined`, how `nucgpt.train` runs: metrics are read a step late),
or each step dispatched after the last finished (`--timing synchronous`). MFU = model FLOP/s per device
(`nucgpt.flops.train_flops_per_token` × tokens/s ÷ devices) over the device peak from
`nucgpt.flops.peak_flops_per_device`, or `--peak_tflops`; with neither it is null, never guessed.

Output: benchmarks.report's table, then one JSON line (appended to `--json_out` too). A variant
that runs out of device memory prints a JSON line with `"error": "out_of_memory"` and, outside a
sweep, exits 3. `--sweep` tries batch sizes × remat policies × attention backends (a larger batch
is skipped once a smaller one ran out of memory) and reports the fastest that fit; its
`peak_memory_bytes` is the process's running maximum (the runtime has no reset), so run one
variant per process (as benchmarks/gpu_check.sh does) for per-variant peaks.
`--dry_run` compiles for abstract inputs only (nothing allocated): per-device memory, HLO
statistics and the bytes each class of kernel moves (benchmarks.hlo_traffic), e.g. for the 500M step
on a CPU; with `--topology v5p:2x2x1` (libtpu installed, no TPU needed) it compiles for that TPU
slice, with `--topology h100` / `h200` / `h100x8` (the jax[cuda12] plugin installed, no GPU needed)
for one or several GPUs of that kind: XLA's own GPU compiler, without autotuning (its default kernel
choices, e.g. Triton for every GEMM), so memory plans and elementwise traffic are the GPU's, GEMM
choices may differ from a run's.
"""

import copy
import gc
import os
import re
import statistics
import sys
import time
from typing import Any

import jax
from absl import app, flags
from ml_collections import ConfigDict, config_flags

from benchmarks import hlo_traffic, report
from nucgpt import config as config_checks
from nucgpt import flops, sharding, step
from nucgpt.errors import UserError, exits_cleanly_on_user_error, parse_flags
from nucgpt.model.attention import mesh_platform

config_flags.DEFINE_config_file("config", None, "configs/pretrain.py:<preset>", lock_config=True)
flags.DEFINE_integer("steps", 10, "timed steps")
flags.DEFINE_integer("warmup", 2, "untimed steps after compilation (allocator, autotuned kernels)")
flags.DEFINE_enum("timing", "pipelined", ["pipelined", "synchronous"],
                  "pipelined: the next step is queued before the host waits, as the training loop does; "
                  "synchronous: each step dispatched after the previous one finished")
flags.DEFINE_bool("compare_timing", False,
                  "also time --steps steps the other way (--timing) and record their median step time")
flags.DEFINE_float("peak_tflops", None, "device peak in dense bf16 TFLOP/s; default from nucgpt.flops")
flags.DEFINE_string("json_out", "", "append each JSON line to this file")
flags.DEFINE_string("label", "", "a name for this run in the JSON (`variant`); default from the settings")
flags.DEFINE_bool("sweep", False, "try batch sizes x remat policies x attention backends")
flags.DEFINE_list("sweep_batch_sizes", [], "global batch sizes to sweep (default: the config's)")
flags.DEFINE_list("sweep_remat", [], "remat policies to sweep (default: the config's)")
flags.DEFINE_list("sweep_attention", [], "attention backends to sweep (default: the config's)")
flags.DEFINE_bool("dry_run", False, "compile for abstract inputs only: memory and HLO statistics")
flags.DEFINE_string("topology", "", "with --dry_run: compile for this TPU slice offline, e.g. v5e:2x2, v5p:2x2x1, "
                    "v3-8 (needs libtpu; JAX_PLATFORMS=cpu skips probing for a local TPU), or for GPUs: h100, "
                    "h200, h100x8 (needs jax[cuda12])")
FLAGS = flags.FLAGS

EXIT_OUT_OF_MEMORY = 3
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")


class OutOfMemory(Exception):
    """The variant does not fit in device memory (at compile time or at run time)."""


def is_out_of_memory(error: BaseException) -> bool:
    return any(marker in str(error) for marker in OOM_MARKERS)


def variant_name(config: ConfigDict) -> str:
    m = config.model
    return (
        f"b{config.train.global_batch_size}_remat-{m.remat_policy}_attn-{m.attention}"
        f"_{'scan' if m.scan_layers else 'unrolled'}"
    )


def mesh_shape(mesh: jax.sharding.Mesh) -> dict[str, int]:
    return {name: int(size) for name, size in zip(mesh.axis_names, mesh.devices.shape)}


def peak_memory_bytes() -> int | None:
    """Largest `peak_bytes_in_use` over this process's devices; None where the runtime keeps none (CPU)."""
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in jax.local_devices()]
    peaks = [p for p in peaks if p is not None]
    return max(peaks) if peaks else None


def memory_analysis(compiled) -> dict[str, int] | None:
    """XLA's per-device plan: arguments, outputs, temporaries; `estimate` = what must be live at once."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes", "temp_size_in_bytes",
              "generated_code_size_in_bytes")
    result = {f: int(getattr(analysis, f, 0)) for f in fields}
    result["estimate"] = (
        result["argument_size_in_bytes"] + result["output_size_in_bytes"] - result["alias_size_in_bytes"]
        + result["temp_size_in_bytes"]
    )
    return result


# The TPU backend writes a reduce-scatter as a fusion of an all-reduce and a slice (`calls=%all-reduce-scatter`),
# which it runs as one reduce-scatter: counted as such, and its inner all-reduce not counted.
_TPU_REDUCE_SCATTER_BODY = re.compile(r"^%all-reduce-scatter[\w.\-]* \(.*?^\}", re.M | re.S)


def hlo_statistics(text: str) -> dict[str, int]:
    """Counts in the optimised HLO text that explain speed: kernels launched, casts, loops, library calls.
    Asynchronous collectives (`-start`/`-done`) count once."""
    tpu_reduce_scatters = len(re.findall(r"calls=%all-reduce-scatter", text))
    without_tpu_reduce_scatter_bodies = _TPU_REDUCE_SCATTER_BODY.sub("", text)
    return {
        "fusions": len(re.findall(r"^\s*\S+ = \S+ fusion\(", text, re.M)),
        "converts_to_f32": len(re.findall(r"= f32\[[^\]]*\]\S* convert\(", text)),
        "converts_to_bf16": len(re.findall(r"= bf16\[[^\]]*\]\S* convert\(", text)),
        "while_loops": len(re.findall(r" while\(", text)),
        "custom_calls": len(re.findall(r" custom-call\(", text)),
        "cudnn_attention_calls": len(re.findall(r'custom_call_target="__cudnn\$fmha', text)),
        "pallas_tpu_kernels": len(re.findall(r'custom_call_target="tpu_custom_call"', text)),
        "all_gathers": len(re.findall(r" all-gather(?:-start)?\(", text)),
        "reduce_scatters": len(re.findall(r" reduce-scatter(?:-start)?\(", text)) + tpu_reduce_scatters,
        "all_reduces": len(re.findall(r" all-reduce(?:-start)?\(", without_tpu_reduce_scatter_bodies)),
        "copies": len(re.findall(r" copy\(", text)),
    }


def xla_flops_per_step(compiled) -> float | None:
    costs = compiled.cost_analysis()
    if isinstance(costs, (list, tuple)):
        costs = costs[0] if costs else None
    return float(costs["flops"]) if costs and "flops" in costs else None


def device_peak(device_kind: str) -> float | None:
    return report.device_peak(FLAGS.peak_tflops, flops.peak_flops_per_device, device_kind)


def common_fields(config: ConfigDict) -> dict[str, Any]:
    return dict(
        tool="mfu",
        variant=FLAGS.label or variant_name(config),
        preset=config.get("preset", ""),
        remat_policy=config.model.remat_policy,
        attention=config.model.attention,
        scan_layers=config.model.scan_layers,
        backend=jax.default_backend(),
        jax_version=jax.__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        timing=FLAGS.timing,
    )


def build_trainer(config: ConfigDict, devices: list | None = None) -> step.Trainer:
    """The training run's trainer, after the checks `nucgpt.train` makes (data fields aside: no data is read)."""
    mesh = sharding.make_mesh(config.mesh, devices)
    config_checks.validate(config, mesh_shape(mesh), jax.process_count(), mesh_platform(mesh))
    return step.build_trainer(config, mesh)


def measure(config: ConfigDict, steps: int, warmup: int) -> dict[str, Any]:
    """Builds the trainer, compiles its step for a synthetic batch, times `steps` steps; one record."""
    trainer = build_trainer(config)
    try:
        state = trainer.init_state()
        batch = trainer.dummy_global_batch()
        compile_start = time.perf_counter()
        compiled = trainer.train_step.lower(state, batch).compile()
        compile_time_s = time.perf_counter() - compile_start
        params = flops.count_params(state["params"])

        def run_step():  # returns the metrics only: the state is donated to the next step
            nonlocal state
            state, metrics = compiled(state, batch)
            return metrics

        report.time_steps(run_step, jax.block_until_ready, warmup, FLAGS.timing)
        step_times_s = report.time_steps(run_step, jax.block_until_ready, steps, FLAGS.timing)
        other_timing = {}
        if FLAGS.compare_timing:
            other = next(t for t in report.TIMINGS if t != FLAGS.timing)
            other_times_s = report.time_steps(run_step, jax.block_until_ready, steps, other)
            other_timing = {f"step_time_s_{other}": statistics.median(other_times_s)}
    except Exception as e:
        if is_out_of_memory(e):
            raise OutOfMemory(str(e).splitlines()[0][:300]) from None
        raise
    device_kind = jax.devices()[0].device_kind
    return report.make_record(
        device_kind=device_kind,
        num_devices=jax.device_count(),
        mesh=mesh_shape(trainer.mesh),
        global_batch=config.train.global_batch_size,
        seq_len=config.train.seq_len,
        step_times_s=step_times_s,
        flops_per_token=flops.train_flops_per_token(config.model, config.train.seq_len),
        peak_flops_per_device=device_peak(device_kind),
        peak_memory_bytes=peak_memory_bytes(),
        compile_time_s=compile_time_s,
        params=params,
        **common_fields(config),
        compiled_memory=memory_analysis(compiled),
        **other_timing,
    )


# Deviceless GPU targets for `--topology`: XLA's GpuTargetConfig of each card (NVIDIA datasheets; the
# runtime and cuDNN versions those of the jax[cuda12] wheels). Compiling needs the CUDA plugin, no GPU.
_GPU_TARGETS = {
    "h100": dict(description="NVIDIA H100 80GB HBM3", l2_cache_size=52428800, device_memory_size=84929347584),
    "h200": dict(description="NVIDIA H200", l2_cache_size=62914560, device_memory_size=150754820096),
}
_GPU_TOPOLOGY = re.compile(r"(h100|h200)(?:x([1-9]\d*))?")  # one host: the card, and how many
_HOPPER_TARGET_CONFIG = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {memory_bandwidth} l2_cache_size: {l2_cache_size} clock_rate_ghz: 1.98
  device_memory_size: {device_memory_size} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 }}
runtime_version {{ major: 12 minor: 9 }}
device_description_str: "{description}"
"""


def gpu_topology_devices(name: str) -> list:
    """Compile-only devices of one host's GPUs, e.g. `h100` or `h100x8`: no GPU needed, only the CUDA
    plugin (`pip install 'jax[cuda12]'`). Kernels are not autotuned: XLA's default choices."""
    match = _GPU_TOPOLOGY.fullmatch(name)
    card, count = match.group(1), int(match.group(2) or 1)
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # the check would look for a GPU
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", topology_name="",
            target_config=_HOPPER_TARGET_CONFIG.format(
                **_GPU_TARGETS[card], memory_bandwidth=int(report.hbm_bandwidth(_GPU_TARGETS[card]["description"]))
            ),
            topology=f"1x1x{count}",
        )
    except (RuntimeError, NotImplementedError) as e:
        raise UserError(
            f"--topology {name}: needs JAX's CUDA plugin (pip install 'jax[cuda12]=={jax.__version__}'): "
            f"{str(e).splitlines()[0]}"
        ) from None
    return list(topology.devices)


def topology_devices(name: str) -> list:
    """Compile-only devices of a TPU slice, e.g. `v5e:2x2`, `v5p:2x2x1`, `v3-8`: no TPU needed, only libtpu.

    v4 chips are laid out as their VMs run them, one device per chip (megacore); libtpu's default
    would be one per TensorCore. Compiling touches no chip, so libtpu's one-process lock is waived.
    """
    if _GPU_TOPOLOGY.fullmatch(name):
        return gpu_topology_devices(name)
    if name.startswith(("h100", "h200")):
        raise UserError(f"--topology {name}: a GPU topology is h100 or h200, or hNNNxK for K GPUs of one host (h100x8)")
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    chip_config = {"chip_config_name": "megacore"} if name.startswith("v4") else {}
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **chip_config).devices)
    except RuntimeError as e:
        if "TPU support not installed" in str(e):
            raise UserError(f"--topology {name}: needs the libtpu wheel (pip install 'jax[tpu]=={jax.__version__}')") from None
        raise UserError(f"--topology {name}: {str(e).splitlines()[0]}") from None


def dry_run(config: ConfigDict) -> dict[str, Any]:
    """Compiles the step for abstract state and batch: what it would need, without allocating it.

    With `--topology`, for TPU devices that need not exist (JAX's ahead-of-time topologies). A step
    the TPU compiler cannot fit in HBM gives an out-of-memory record (the compiler's message says by
    how much), as a run would.
    """
    devices = topology_devices(FLAGS.topology) if FLAGS.topology else None
    trainer = build_trainer(config, devices)
    device = trainer.mesh.devices.flat[0]
    compile_start = time.perf_counter()
    try:
        compiled = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch()).compile()
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        message = str(e).splitlines()[0][:300]
        return out_of_memory_record(config, OutOfMemory(message)) | dict(
            dry_run=True, device_kind=device.device_kind, num_devices=trainer.mesh.size, topology=FLAGS.topology or None
        )
    tokens = config.train.global_batch_size * config.train.seq_len
    hlo_text = compiled.as_text()  # large for the 500M step: printed once, read by both counts
    return dict(
        dry_run=True,
        device_kind=device.device_kind,
        num_devices=trainer.mesh.size,
        mesh=mesh_shape(trainer.mesh),
        global_batch=config.train.global_batch_size,
        seq_len=config.train.seq_len,
        params=flops.count_params(trainer.abstract_state["params"]),
        compile_time_s=time.perf_counter() - compile_start,
        flops_per_token=flops.train_flops_per_token(config.model, config.train.seq_len),
        xla_flops_per_token=(lambda f: f * trainer.mesh.size / tokens if f else None)(xla_flops_per_step(compiled)),
        compiled_memory=memory_analysis(compiled),
        hlo=hlo_statistics(hlo_text),
        traffic=hlo_traffic.traffic_by_class(hlo_text),
        bandwidth=report.hbm_bandwidth(device.device_kind),
        **common_fields(config) | {"backend": device.platform},
        topology=FLAGS.topology or None,
    )


def format_dry_run(record: dict[str, Any]) -> str:
    if record.get("error") == "out_of_memory":
        return (f"dry run: {record['variant']} on {record['num_devices']} x {record['device_kind']} does not fit "
                f"in device memory: {record['message']}")
    gib = lambda n: f"{n / 2**30:.2f} GiB"
    memory = record["compiled_memory"] or {}
    lines = [
        f"dry run: {record['variant']} on {record['num_devices']} x {record['device_kind']}"
        + (f" (topology {record['topology']}, compile only)" if record["topology"] else "")
        + f", mesh {record['mesh']}",
        f"params {record['params'] / 1e6:.1f}M; compile {record['compile_time_s']:.1f} s",
        f"FLOPs per token: model {record['flops_per_token'] / 1e9:.3f} G, XLA counts "
        + ("n/a" if record["xla_flops_per_token"] is None else f"{record['xla_flops_per_token'] / 1e9:.3f} G")
        + (" (XLA counts a loop body once: scanned layers are under-counted)" if record["hlo"]["while_loops"] else ""),
        "per-device memory: " + ", ".join(f"{k.replace('_size_in_bytes', '')} {gib(v)}" for k, v in memory.items()),
        "HLO: " + ", ".join(f"{k} {v}" for k, v in record["hlo"].items()),
        "memory traffic of the top-level kernels (benchmarks.hlo_traffic: static bytes, not a timing"
        + ("; loop bodies not counted" if record["hlo"]["while_loops"] else "") + "):",
        hlo_traffic.format_traffic(record["traffic"], record["bandwidth"]),
    ]
    return "\n".join(lines)


def with_settings(config: ConfigDict, batch_size: int, remat: str, attention: str) -> ConfigDict:
    variant = copy.deepcopy(config)
    variant.train.global_batch_size = batch_size
    variant.model.remat_policy = remat
    variant.model.attention = attention
    return variant


def out_of_memory_record(config: ConfigDict, error: OutOfMemory) -> dict[str, Any]:
    return dict(
        tool="mfu", variant=FLAGS.label or variant_name(config), error="out_of_memory", message=str(error),
        global_batch=config.train.global_batch_size, seq_len=config.train.seq_len,
        remat_policy=config.model.remat_policy, attention=config.model.attention,
        device_kind=jax.devices()[0].device_kind, xla_flags=os.environ.get("XLA_FLAGS", ""),
    )


def release_device_memory() -> None:
    """Drops compiled executables and dead buffers so the next variant starts from an empty device."""
    gc.collect()
    jax.clear_caches()
    gc.collect()


def sweep(config: ConfigDict) -> list[dict[str, Any]]:
    """Every combination that fits, smallest batch first; returns the records that ran."""
    batch_sizes = sorted(int(b) for b in FLAGS.sweep_batch_sizes or [config.train.global_batch_size])
    remats = FLAGS.sweep_remat or [config.model.remat_policy]
    attentions = FLAGS.sweep_attention or [config.model.attention]
    records = []
    for attention in attentions:
        for remat in remats:
            for batch_size in batch_sizes:
                variant = with_settings(config, batch_size, remat, attention)
                try:
                    record = measure(variant, FLAGS.steps, FLAGS.warmup)
                except OutOfMemory as e:
                    print(f"{variant_name(variant)}: out of memory; larger batches skipped", flush=True)
                    report.write_json(out_of_memory_record(variant, e), FLAGS.json_out)
                    break
                finally:
                    release_device_memory()
                report.emit(record, FLAGS.json_out)
                records.append(record)
    return records


@exits_cleanly_on_user_error
def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    if config is None:
        raise UserError("--config is required, e.g. --config configs/pretrain.py:demo")
    report.check_timing_flags(FLAGS.steps, FLAGS.warmup, FLAGS.peak_tflops)
    if FLAGS.topology and not FLAGS.dry_run:
        raise UserError("--topology compiles for devices that are not here: it needs --dry_run")
    if FLAGS.dry_run:
        record = dry_run(config)
        print(format_dry_run(record), flush=True)
        report.write_json(record, FLAGS.json_out)
        if record.get("error") == "out_of_memory":
            sys.exit(EXIT_OUT_OF_MEMORY)
        return
    if FLAGS.sweep:
        records = sweep(config)
        if not records:
            raise UserError("no variant of the sweep fits in device memory")
        print("fastest that fits:", flush=True)
        report.emit(max(records, key=lambda r: r["tokens_per_sec"]) | {"fastest_of_sweep": True})
        return
    try:
        record = measure(config, FLAGS.steps, FLAGS.warmup)
    except OutOfMemory as e:
        print(f"{variant_name(config)}: out of memory", file=sys.stderr, flush=True)
        report.write_json(out_of_memory_record(config, e), FLAGS.json_out)
        sys.exit(EXIT_OUT_OF_MEMORY)
    report.emit(record, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
