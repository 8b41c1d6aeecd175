"""Where the train step's device time goes, by kernel class: one profiled run of the real step.

    python -m benchmarks.profile_step --config configs/pretrain.py:nucleotide_gpt_500m \
        --config.train.seq_len=8192 --config.train.global_batch_size=8 --config.model.remat_policy=none \
        --config.model.attention=cudnn --config.model.scan_layers=false --steps 3 --json_out profile.jsonl
    python -m benchmarks.profile_step --config configs/pretrain.py:demo --steps 2 --top 10   # CPU

The step is built, compiled and warmed up exactly as `benchmarks.mfu` does (its helpers are imported,
and so are its flags: --config, --steps, --warmup, --json_out, --label, --peak_tflops; its other
flags are refused here). Then `--steps` steps are queued inside `jax.profiler.trace`, the host waits
once at the end, and the written `.xplane.pb` is read back with `jax.profiler.ProfileData`:

- GPU: kernels and memcpys on the stream lines of the "/device:GPU:0" plane (one device's view);
- CPU: no device plane, so the XLA op (thunk) events of the step's module on device 0, from the host
  plane; nested events (a loop and its body) count once, as the innermost.

Per step it reports the device busy time (union of kernel intervals), the window (first kernel start
to last kernel end), the idle gap between them, the host wall time, and busy time per kernel class
(`KERNEL_CLASSES`; overlapping kernels share their common time equally, so classes sum to busy),
plus the top `--top` kernels by total time (grouped by name without XLA's instance number, so one
fusion summed over every layer). From the model config it prints the matmul and attention
FLOPs per device and step (`nucgpt.flops`) and the TFLOP/s they imply over each class's own kernel
time: near ~800 for GEMMs and ~500 for cuDNN attention on an H100 means those kernels are not the gap.
On a Hopper GPU other than `--estimate_as` (default the H100 SXM), it also estimates the step on that
device (`as_device`): an H200's profile read as an H100's, since the two share the tensor cores and
differ in memory bandwidth (4.8 vs 3.35 TB/s). An estimate from class times, never a measurement.
Caveat: while a profiler runs, XLA executes its command buffers (CUDA graphs) op by op unless
`--xla_enable_command_buffers_during_profiling=true` is in XLA_FLAGS, so the idle gap can exceed the
unprofiled step's; compare `host_wall_ms` with benchmarks.mfu's step time.
A table, then one JSON line (appended to `--json_out`). The trace dir is a temporary dir removed at
the end unless `--trace_dir` is given (view it with TensorBoard's profile plugin or xprof).
"""

import collections
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, NamedTuple

import jax
from absl import app, flags
from ml_collections import ConfigDict

from benchmarks import mfu, report
from nucgpt import flops
from nucgpt.errors import UserError, exits_cleanly_on_user_error, parse_flags

flags.DEFINE_string("trace_dir", "", "keep the trace here (default: a temporary dir, removed at the end)")
flags.DEFINE_integer("top", 15, "kernels listed, by total time")
flags.DEFINE_string(
    "estimate_as", "NVIDIA H100 80GB HBM3",
    "on another Hopper GPU, also estimate the step on this device kind from the class times ('' = none)",
)
FLAGS = flags.FLAGS
FLAGS.set_default("steps", 3)
MFU_FLAGS_USED_HERE = ("config", "steps", "warmup", "json_out", "label", "peak_tflops")

# First match wins (re.search, case-insensitive, on the kernel name; XLA's op name as a fallback).
# Written from the kernel names cuBLAS/cuDNN/XLA emit on Hopper; correct it after a real trace.
KERNEL_CLASSES = (
    # cuDNN fused attention (cudnn_generated_*sdpa*flash*), any fmha/flash kernel; before matmul, as
    # cuDNN's own names may hold gemm-like words
    ("attention", r"fmha|cudnn|flash|sdpa"),
    # cuBLAS/cublasLt (sm90_xmma_gemm_*, nvjet_*, cutlass), XLA's Triton GEMMs (triton_gemm_*,
    # gemm_fusion), CPU dots (dot.N, XNNPACK's ynn_fusion)
    ("matmul", r"gemm|xmma|cutlass|nvjet|cublas|(^|[_.])dot([_.\d]|$)|convolution|ynn"),
    ("collective", r"nccl|all-?reduce|all-?gather|reduce-?scatter|all-?to-?all|collective-permute"),
    # CUPTI's Memcpy*/Memset events, XLA copies and transposes (data movement only)
    ("copy", r"memcpy|memset|copy|transpose"),
    # XLA's own kernels: elementwise fusions (the optimizer, norms, GeLU), reductions, Triton fusions;
    # our Pallas norm kernels (rms_norm_backward, norm_join_forward/backward, pallas_call.N)
    ("fusion", r"fusion|reduce|triton|rms_norm|norm_join|pallas|^loop_|^input_|^wrapped_|elementwise|broadcast|scatter|gather|select|convert"),
)
# CUPTI puts allocator activity on stream lines too; it is not device work.
NOT_DEVICE_WORK = re.compile(r"^Memory(Alloc|Free|Residency)")
OTHER = "other"
CLASS_NAMES = tuple(name for name, _ in KERNEL_CLASSES) + (OTHER,)
_CLASS_PATTERNS = tuple((name, re.compile(pattern, re.I)) for name, pattern in KERNEL_CLASSES)

# For `as_device`: Hopper GPUs share the SM design and clocks and differ in memory (benchmarks.report's
# bandwidths), and in the NVL/PCIe parts' lower clocks (their peaks in nucgpt.flops).
ARITHMETIC_CLASSES = ("matmul", "attention")  # bound by the tensor cores: scale with peak FLOP/s
MEMORY_CLASSES = ("fusion", "copy")  # elementwise and data movement: scale with memory bandwidth at most

GPU_PLANE = "/device:GPU:0"
TPU_PLANE = "/device:TPU:0"
HOST_PLANE = "/host:CPU"


class Kernel(NamedTuple):
    name: str
    start_ns: float
    end_ns: float
    op: str  # XLA's op name (`hlo_op` stat) where the profiler records one


def classify(name: str, op: str = "") -> str:
    """The class of one kernel: by its name, else by its XLA op name, else `other`."""
    for text in (name, op):
        for class_name, pattern in _CLASS_PATTERNS:
            if text and pattern.search(text):
                return class_name
    return OTHER


def _stats(event) -> dict[str, Any]:
    try:
        return dict(event.stats)
    except Exception:  # a stat the bindings cannot convert: the name and times still count
        return {}


def innermost(events: list[Kernel]) -> list[Kernel]:
    """Events of one timeline line without those that enclose the next one (a loop around its body).

    Events that merely overlap (a kernel launched early on its stream, as Hopper's programmatic
    dependent launch allows) both stay.
    """
    ordered = sorted(events, key=lambda k: (k.start_ns, -k.end_ns))
    encloses = lambda k, after: after is not None and after.start_ns < k.end_ns and after.end_ns <= k.end_ns
    return [k for k, after in zip(ordered, ordered[1:] + [None]) if not encloses(k, after)]


def _kernels_of_line(line, keep=lambda stats: True) -> list[Kernel]:
    kernels = []
    for event in line.events:
        if event.duration_ns <= 0 or NOT_DEVICE_WORK.match(event.name):
            continue
        stats = _stats(event)
        if keep(stats):
            start = float(event.start_ns)
            kernels.append(Kernel(event.name, start, start + float(event.duration_ns), str(stats.get("hlo_op", ""))))
    return innermost(kernels)


def device_kernels(profile, backend: str, module_name: str) -> tuple[str, list[Kernel]]:
    """The profiled device's kernels and the plane they came from."""
    if backend == "cpu":
        plane = profile.find_plane_with_name(HOST_PLANE)
        keep = lambda s: s.get("hlo_module") == module_name and s.get("hlo_op") and s.get("device_ordinal", 0) == 0
        kernels = [k for line in plane.lines for k in _kernels_of_line(line, keep)] if plane else []
        return HOST_PLANE + " (XLA op events of device 0)", kernels
    name = GPU_PLANE if backend == "gpu" else TPU_PLANE
    plane = profile.find_plane_with_name(name)
    if plane is None:
        found = ", ".join(p.name for p in profile.planes)
        raise UserError(f"the trace has no {name} plane (planes: {found}); is CUPTI/the device tracer available?")
    lines = list(plane.lines)
    # GPU: one line per CUDA stream; TPU: the "XLA Ops" line. The derived lines (XLA Modules, Steps) repeat them.
    chosen = [ln for ln in lines if ln.name.startswith("Stream")] or [ln for ln in lines if ln.name == "XLA Ops"]
    return name, [k for line in chosen for k in _kernels_of_line(line)]


def kernel_family(name: str) -> str:
    """The name without XLA's instance number, so the same fusion in every layer adds up (`loop_add_fusion.3`)."""
    return re.sub(r"([._]\d+)+$", "", name)


def union_ns(kernels: Iterable[Kernel]) -> float:
    total, covered_to = 0.0, float("-inf")
    for k in sorted(kernels, key=lambda k: k.start_ns):
        if k.end_ns > covered_to:
            total += k.end_ns - max(k.start_ns, covered_to)
            covered_to = k.end_ns
    return total


def busy_ns_by_class(kernels: list[Kernel]) -> dict[str, float]:
    """Busy time per class; time where kernels overlap is shared equally among them, so the sum is the union."""
    boundaries = sorted(
        [(k.start_ns, 1, classify(k.name, k.op)) for k in kernels] + [(k.end_ns, -1, classify(k.name, k.op)) for k in kernels],
        key=lambda b: (b[0], b[1]),
    )
    active: collections.Counter = collections.Counter()
    shares = dict.fromkeys(CLASS_NAMES, 0.0)
    previous = None
    for time_ns, delta, class_name in boundaries:
        running = sum(active.values())
        if running and previous is not None and time_ns > previous:
            for name, count in active.items():
                shares[name] += (time_ns - previous) * count / running
        active[class_name] += delta
        previous = time_ns
    return shares


def summarise(kernels: list[Kernel], steps: int, top: int) -> dict[str, Any]:
    """Per-step figures in milliseconds: busy, window, idle, time per class, the top kernels."""
    if not kernels:
        raise UserError("no kernel events in the profiled window; nothing to summarise")
    ms = lambda ns: ns / 1e6 / steps
    busy = union_ns(kernels)
    window = max(k.end_ns for k in kernels) - min(k.start_ns for k in kernels)
    kernel_time = dict.fromkeys(CLASS_NAMES, 0.0)
    by_name: dict[str, list] = {}
    for k in kernels:
        class_name = classify(k.name, k.op)
        kernel_time[class_name] += k.end_ns - k.start_ns
        entry = by_name.setdefault(kernel_family(k.name), [class_name, 0, 0.0])
        entry[1] += 1
        entry[2] += k.end_ns - k.start_ns
    ranked = sorted(by_name.items(), key=lambda item: -item[1][2])[:top]
    return dict(
        kernels_per_step=len(kernels) / steps,
        busy_ms=ms(busy),
        window_ms=ms(window),
        idle_ms=ms(window - busy),
        class_busy_ms={name: ms(t) for name, t in busy_ns_by_class(kernels).items()},
        class_kernel_ms={name: ms(t) for name, t in kernel_time.items()},
        top_kernels=[
            dict(name=name[:100], kernel_class=c, count=count / steps, total_ms=ms(t), pct_of_busy=100 * t / busy)
            for name, (c, count, t) in ranked
        ],
    )


def model_flops_per_device(config: ConfigDict, num_devices: int) -> dict[str, float] | None:
    """Matmul and attention FLOPs of one step on one device, split from `nucgpt.flops` (transformers only)."""
    model = config.model
    if model.get("kind", "transformer") != "transformer":
        return None
    tokens = config.train.global_batch_size * config.train.seq_len
    matmul_per_token = 6 * flops.matmul_params(model) + 6 * model.d_model * model.vocab_size  # + unembedding
    total_per_token = flops.train_flops_per_token(model, config.train.seq_len)
    return dict(
        matmul=matmul_per_token * tokens / num_devices,
        attention=(total_per_token - matmul_per_token) * tokens / num_devices,
        total=total_per_token * tokens / num_devices,
    )


def throughput(model_flops: dict[str, float] | None, summary: dict[str, Any], peak: float | None) -> dict[str, Any]:
    """TFLOP/s each class implies over its own kernel time, and the whole step's over busy and window."""
    if model_flops is None:
        return {}
    tflops = lambda f, ms: f / (ms * 1e-3) / 1e12 if ms > 0 else None
    result = dict(
        matmul_tflops=tflops(model_flops["matmul"], summary["class_kernel_ms"]["matmul"]),
        attention_tflops=tflops(model_flops["attention"], summary["class_kernel_ms"]["attention"]),
        model_tflops_over_busy=tflops(model_flops["total"], summary["busy_ms"]),
        model_tflops_over_window=tflops(model_flops["total"], summary["window_ms"]),
    )
    if peak:
        result["peak_tflops"] = peak / 1e12
    return result


def as_device(record: dict[str, Any], target_kind: str) -> dict[str, Any] | None:
    """The profiled step estimated on another Hopper GPU (an H200's profile read as an H100's).

    Each class's busy time is scaled by what limits it: matmul and attention kernels by the ratio of
    peak FLOP/s, fusions and copies by the ratio of memory bandwidths, as if every one of them were
    bandwidth-bound (where one is not, it slows less: moving to a slower memory, the estimate is an
    upper bound on the step's time); collectives, unclassified kernels and idle gaps stay as they
    are. None where either device is not in both tables, or the target is the profiled device.
    An estimate, never a measurement: `step_scale` multiplies a step time measured on this device.
    """
    here, target = record["device_kind"], target_kind
    rates = [(flops.peak_flops_per_device(kind), report.hbm_bandwidth(kind)) for kind in (here, target)]
    if not target or here.lower() == target.lower() or None in rates[0] + rates[1]:
        return None
    (peak_here, bandwidth_here), (peak_target, bandwidth_target) = rates
    busy = record["class_busy_ms"]
    added_ms = sum(busy[name] for name in ARITHMETIC_CLASSES) * (peak_here / peak_target - 1) + sum(
        busy[name] for name in MEMORY_CLASSES
    ) * (bandwidth_here / bandwidth_target - 1)
    window_ms = record["window_ms"] + added_ms
    model_flops = record["model_flops_per_device_step"]
    return dict(
        device_kind=target,
        window_ms=window_ms,
        step_scale=window_ms / record["window_ms"],
        peak_tflops=peak_target / 1e12,
        bandwidth_ratio=bandwidth_here / bandwidth_target,
        mfu_over_window=model_flops["total"] / (window_ms * 1e-3) / peak_target if model_flops else None,
    )


def find_xplane(trace_dir: Path, before: set[Path]) -> Path:
    written = sorted(set(trace_dir.rglob("*.xplane.pb")) - before, key=lambda p: p.stat().st_mtime)
    if not written:
        raise UserError(f"the profiler wrote no .xplane.pb under {trace_dir}")
    return written[-1]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def profile(config: ConfigDict, trace_dir: Path) -> dict[str, Any]:
    """Builds and warms up the step as benchmarks.mfu does, traces `--steps` queued steps, summarises them."""
    trainer = mfu.build_trainer(config)
    state = trainer.init_state()
    batch = trainer.dummy_global_batch()
    compiled = trainer.train_step.lower(state, batch).compile()
    module_name = re.match(r"HloModule (\S+?),?\s", compiled.as_text()).group(1)
    for _ in range(FLAGS.warmup):
        state, metrics = compiled(state, batch)  # the state is donated: each call returns the next one
    jax.block_until_ready(state)
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # Python frames: large, and they slow the host's dispatch
    options.enable_hlo_proto = False  # the HLO of a 500M step would dominate the trace's size
    before = set(trace_dir.rglob("*.xplane.pb"))
    with jax.profiler.trace(str(trace_dir), profiler_options=options):
        start = time.perf_counter()
        for _ in range(FLAGS.steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        host_wall_s = time.perf_counter() - start
    xplane = find_xplane(trace_dir, before)
    backend = jax.default_backend()
    plane, kernels = device_kernels(jax.profiler.ProfileData.from_file(str(xplane)), backend, module_name)
    summary = summarise(kernels, FLAGS.steps, FLAGS.top)
    device_kind = jax.devices()[0].device_kind
    model_flops = model_flops_per_device(config, jax.device_count())
    return dict(
        tool="profile_step",
        variant=FLAGS.label or mfu.variant_name(config),
        preset=config.get("preset", ""),
        backend=backend,
        device_kind=device_kind,
        num_devices=jax.device_count(),
        mesh=mfu.mesh_shape(trainer.mesh),
        global_batch=config.train.global_batch_size,
        seq_len=config.train.seq_len,
        steps=FLAGS.steps,
        plane=plane,
        module=module_name,
        host_wall_ms=host_wall_s * 1e3 / FLAGS.steps,
        **summary,
        model_flops_per_device_step=model_flops,
        **throughput(model_flops, summary, mfu.device_peak(device_kind)),
        xla_flags=os.environ.get("XLA_FLAGS", ""),
        trace_file=str(xplane),
        trace_dir_bytes=dir_bytes(trace_dir),
    )


def format_table(record: dict[str, Any]) -> str:
    busy = record["busy_ms"]
    fmt = lambda x, spec: "n/a" if x is None else format(x, spec)
    lines = [
        f"profile: {record['variant']} on {record['num_devices']} x {record['device_kind']}, "
        f"{record['steps']} steps, plane {record['plane']}, trace {record['trace_dir_bytes'] / 2**20:.1f} MiB",
        f"per step: window {record['window_ms']:.2f} ms = busy {busy:.2f} ms + idle {record['idle_ms']:.2f} ms; "
        f"host wall {record['host_wall_ms']:.2f} ms; {record['kernels_per_step']:.0f} kernels",
        f"{'class':<12}{'busy ms':>10}{'% busy':>8}{'kernel ms':>11}",
    ]
    for name in CLASS_NAMES:
        share = record["class_busy_ms"][name]
        lines.append(f"{name:<12}{share:>10.2f}{100 * share / busy:>7.1f}%{record['class_kernel_ms'][name]:>11.2f}")
    lines.append(f"top {len(record['top_kernels'])} kernels (per step):")
    lines.append(f"  {'kernel':<70}{'class':>11}{'count':>7}{'ms':>9}{'% busy':>8}")
    for k in record["top_kernels"]:
        lines.append(f"  {k['name'][:70]:<70}{k['kernel_class']:>11}{k['count']:>7.0f}{k['total_ms']:>9.2f}"
                     f"{k['pct_of_busy']:>7.1f}%")
    model_flops = record["model_flops_per_device_step"]
    if model_flops:
        lines.append(
            f"model FLOPs per device and step: matmul {model_flops['matmul'] / 1e12:.4g} T, "
            f"attention {model_flops['attention'] / 1e12:.4g} T"
        )
        lines.append(
            f"implied TFLOP/s: matmul class {fmt(record['matmul_tflops'], '.4g')}, "
            f"attention class {fmt(record['attention_tflops'], '.4g')}, "
            f"whole step over busy {fmt(record['model_tflops_over_busy'], '.4g')}, "
            f"over window {fmt(record['model_tflops_over_window'], '.4g')}"
            + (f" (device peak {record['peak_tflops']:.0f})" if record.get("peak_tflops") else "")
        )
    estimate = record.get("as_device")
    if estimate:
        mfu = "" if estimate["mfu_over_window"] is None else f", MFU over the window {estimate['mfu_over_window']:.1%}"
        lines.append(
            f"as {estimate['device_kind']} (an estimate, not a measurement: fusions and copies x "
            f"{estimate['bandwidth_ratio']:.2f} for its memory): window {estimate['window_ms']:.2f} ms, "
            f"step x {estimate['step_scale']:.3f}{mfu}"
        )
    return "\n".join(lines)


def refuse_mfu_only_flags() -> None:
    """benchmarks.mfu's flags come with its import; those this tool ignores must not look as if they worked."""
    given = [f.name for f in FLAGS.get_flags_for_module(mfu) if f.present and f.name not in MFU_FLAGS_USED_HERE]
    if given:
        raise UserError(f"--{given[0]} is a benchmarks.mfu flag; profile_step takes {', '.join(MFU_FLAGS_USED_HERE)}")


@exits_cleanly_on_user_error
def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    refuse_mfu_only_flags()
    config = FLAGS.config
    if config is None:
        raise UserError("--config is required, e.g. --config configs/pretrain.py:demo")
    report.check_timing_flags(FLAGS.steps, FLAGS.warmup, FLAGS.peak_tflops)
    if FLAGS.top < 0:
        raise UserError(f"--top must be at least 0, got {FLAGS.top}")
    if FLAGS.estimate_as and None in (report.hbm_bandwidth(FLAGS.estimate_as), flops.peak_flops_per_device(FLAGS.estimate_as)):
        raise UserError(
            f"--estimate_as={FLAGS.estimate_as!r} names no Hopper GPU this tool knows ({report.hbm_kinds()}); '' for none"
        )
    trace_dir = Path(FLAGS.trace_dir or tempfile.mkdtemp(prefix="profile_step_"))
    trace_dir.mkdir(parents=True, exist_ok=True)
    try:
        record = profile(config, trace_dir)
    except Exception as e:
        if mfu.is_out_of_memory(e):
            print(f"{mfu.variant_name(config)}: out of memory", file=sys.stderr, flush=True)
            sys.exit(mfu.EXIT_OUT_OF_MEMORY)
        raise
    finally:
        if not FLAGS.trace_dir:
            shutil.rmtree(trace_dir, ignore_errors=True)
    if not FLAGS.trace_dir:
        record["trace_file"] = None  # removed with its temporary dir
    record["as_device"] = as_device(record, FLAGS.estimate_as)
    print(format_table(record), flush=True)
    report.write_json(record, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
