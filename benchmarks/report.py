"""The record both speed tools print (benchmarks.mfu for our trainer, benchmarks.compare_hf for the
peer), so their JSON lines and tables compare field for field. Pure Python: no jax, no torch."""

import json
import math
import statistics
import time
from typing import Callable, Sequence

from nucgpt.errors import UserError

# The JSON keys the issue names, in print order; tools add their own keys after these.
RECORD_KEYS = (
    "device_kind", "num_devices", "mesh", "global_batch", "seq_len", "step_time_s",
    "tokens_per_sec", "tokens_per_sec_per_device", "tflops_per_device", "mfu",
    "peak_memory_bytes", "compile_time_s", "params",
)


TIMINGS = ("pipelined", "synchronous")

# HBM bandwidth in bytes/s by device kind (vendor sheets), matched like nucgpt.flops' peaks: most
# specific first. Hopper GPUs only: the kinds the offline GPU compile and the H200 → H100 estimate know.
_HBM_BYTES_PER_S = (
    ("h200", 4.8e12),
    ("h100 pcie", 2.0e12),
    ("h100 nvl", 3.9e12),
    ("h100", 3.35e12),
)


def hbm_bandwidth(device_kind: str) -> float | None:
    """Memory bandwidth of one device in bytes/s, or None where the kind is not in the table."""
    kind = device_kind.lower()
    return next((bandwidth for key, bandwidth in _HBM_BYTES_PER_S if key in kind), None)


def hbm_kinds() -> str:
    return ", ".join(key for key, _ in _HBM_BYTES_PER_S)


def check_timing_flags(steps: int, warmup: int, peak_tflops: float | None) -> None:
    """The flags every timing tool shares, checked before anything is built: one line each."""
    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be at least 1 and --warmup at least 0, got --steps={steps} --warmup={warmup}")
    if peak_tflops is not None and not (math.isfinite(peak_tflops) and peak_tflops > 0):
        raise UserError(f"--peak_tflops must be a positive number of TFLOP/s (an H100's dense bf16 is 989), got {peak_tflops}")


def device_peak(peak_tflops: float | None, table_peak: Callable[[str], float | None], device_kind: str) -> float | None:
    """FLOP/s of one device: `--peak_tflops` where given, else the table's (None where unknown)."""
    return peak_tflops * 1e12 if peak_tflops is not None else table_peak(device_kind)


def time_steps(
    run_step: Callable[[], object], wait: Callable[[object], None], steps: int, timing: str = "pipelined"
) -> list[float]:
    """Wall time of each of `steps` steps.

    `pipelined` (the default) times steps the way the training loop runs them: step i+1 is already
    queued when the host waits for step i, so the device never idles between steps, and each step's
    time is the gap between two completions. `wait` must then wait for its own step only (a JAX
    result, a CUDA event), not for the whole device queue. One more step runs than is timed.
    `synchronous` dispatches each step only after the previous one finished: each time also holds
    the host's dispatch of that step, which the training loop hides.
    """
    if timing not in TIMINGS:
        raise ValueError(f"timing={timing!r}; choose one of {', '.join(TIMINGS)}")
    times = []
    if timing == "synchronous":
        for _ in range(steps):
            start = time.perf_counter()
            wait(run_step())
            times.append(time.perf_counter() - start)
        return times
    last = time.perf_counter()
    pending = run_step()
    for _ in range(steps):
        queued = run_step()
        wait(pending)
        now = time.perf_counter()
        times.append(now - last)
        last, pending = now, queued
    wait(pending)
    return times


def make_record(
    *,
    device_kind: str,
    num_devices: int,
    mesh: dict | None,
    global_batch: int,
    seq_len: int,
    step_times_s: Sequence[float],
    flops_per_token: float,
    peak_flops_per_device: float | None,
    peak_memory_bytes: int | None,
    compile_time_s: float | None,
    params: int,
    **extra,
) -> dict:
    """One measurement: throughput from the median step; MFU only from a known peak, never guessed."""
    median_s = statistics.median(step_times_s)
    tokens_per_sec = global_batch * seq_len / median_s
    flops_per_sec_per_device = tokens_per_sec * flops_per_token / num_devices
    mfu = flops_per_sec_per_device / peak_flops_per_device if peak_flops_per_device else None
    record = dict(
        device_kind=device_kind,
        num_devices=num_devices,
        mesh=mesh,
        global_batch=global_batch,
        seq_len=seq_len,
        step_time_s=dict(median=median_s, min=min(step_times_s), max=max(step_times_s)),
        tokens_per_sec=tokens_per_sec,
        tokens_per_sec_per_device=tokens_per_sec / num_devices,
        tflops_per_device=flops_per_sec_per_device / 1e12,
        mfu=mfu,
        peak_memory_bytes=peak_memory_bytes,
        compile_time_s=compile_time_s,
        params=params,
    )
    record.update(flops_per_token=flops_per_token, peak_flops_per_device=peak_flops_per_device, **extra)
    return record


def format_table(record: dict) -> str:
    """A human-readable block for one record (the JSON line follows it for machines)."""
    step = record["step_time_s"]
    mfu = record["mfu"]
    memory = record["peak_memory_bytes"]
    rows = [
        ("device", f"{record['num_devices']} x {record['device_kind']}"),
        ("mesh", record["mesh"]),
        ("global batch x seq", f"{record['global_batch']} x {record['seq_len']}"),
        ("params", f"{record['params'] / 1e6:.1f}M"),
        ("step time (s)", f"median {step['median']:.4f}  min {step['min']:.4f}  max {step['max']:.4f}"),
        ("tokens/s", f"{record['tokens_per_sec']:,.0f} ({record['tokens_per_sec_per_device']:,.0f} per device)"),
        ("TFLOP/s per device", f"{record['tflops_per_device']:.4g}"),
        ("MFU", "unknown (no peak for this device; pass --peak_tflops)" if mfu is None else f"{mfu:.1%}"),
        ("peak memory", "unknown" if memory is None else f"{memory / 2**30:.2f} GiB"),
        ("compile time (s)", "n/a" if record["compile_time_s"] is None else f"{record['compile_time_s']:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def write_json(record: dict, json_out: str = "") -> None:
    """Prints the record as one JSON line (last, so `tail -1` gets it); appends it to `json_out`."""
    line = json.dumps(record)
    print(line, flush=True)
    if json_out:
        with open(json_out, "a") as f:
            f.write(line + "\n")


def emit(record: dict, json_out: str = "") -> None:
    """A measurement: the table for people, then the JSON line for machines."""
    print(format_table(record), flush=True)
    write_json(record, json_out)
