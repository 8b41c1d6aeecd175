"""benchmarks.mfu on CPU: the real trainer step on the demo preset, its JSON fields, and an MFU that
is null without a known peak and computed from an explicit --peak_tflops, never invented."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import report
from configs.pretrain import get_config
from nucgpt.errors import UserError

REPO = Path(__file__).resolve().parents[1]
# The demo preset, shrunk further so each run compiles and steps in seconds on 8 virtual CPU devices.
TINY = ["--config.model.num_layers=1", "--config.model.d_model=64", "--config.model.mlp_dim=128",
        "--config.train.seq_len=32", "--config.train.global_batch_size=8"]


def run_mfu(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    json_out = tmp_path / "results.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.mfu", "--config", "configs/pretrain.py:demo", *TINY,
         "--steps", "2", "--warmup", "1", "--json_out", str(json_out), *extra],
        cwd=REPO, capture_output=True, text=True, timeout=240,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    records = [json.loads(line) for line in json_out.read_text().splitlines()] if json_out.exists() else []
    return proc, records


def test_demo_without_peak_reports_every_field_and_no_mfu(tmp_path):
    proc, records = run_mfu(tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(records) == 1
    record = records[0]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == record  # the JSON line is printed last
    for key in report.RECORD_KEYS:
        assert key in record, key
    assert record["device_kind"] == "cpu"
    assert record["num_devices"] == 8
    assert record["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert (record["global_batch"], record["seq_len"]) == (8, 32)
    step = record["step_time_s"]
    assert 0 < step["min"] <= step["median"] <= step["max"]
    assert record["tokens_per_sec"] == pytest.approx(8 * 32 / step["median"])
    assert record["tokens_per_sec_per_device"] == pytest.approx(record["tokens_per_sec"] / 8)
    assert record["tflops_per_device"] == pytest.approx(
        record["tokens_per_sec_per_device"] * record["flops_per_token"] / 1e12
    )
    assert record["mfu"] is None
    assert record["peak_memory_bytes"] is None  # the CPU runtime keeps no allocator statistics
    assert record["compile_time_s"] > 0
    assert record["params"] > 0
    assert record["timing"] == "pipelined"
    assert "MFU                 unknown" in proc.stdout


def test_explicit_peak_gives_mfu_from_measured_flops(tmp_path):
    proc, records = run_mfu(tmp_path, "--peak_tflops=0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = records[0]
    assert record["peak_flops_per_device"] == 0.5e12
    assert record["mfu"] == pytest.approx(record["tflops_per_device"] / 0.5)
    assert 0 < record["mfu"] < 1


@pytest.mark.parametrize("flag", ["--steps=0", "--peak_tflops=-1"])
def test_bad_input_is_one_line_error(tmp_path, flag):
    proc, records = run_mfu(tmp_path, flag)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {flag.split('=')[0]} must be")
    assert records == []


@pytest.mark.parametrize("peak", [0.0, -989.0, float("nan"), float("inf")])
def test_a_peak_that_is_not_a_positive_number_is_refused(peak):
    """An MFU from a zero, negative or non-finite peak would be invented (it printed -1.9% before)."""
    with pytest.raises(UserError, match="--peak_tflops must be a positive number"):
        report.check_timing_flags(10, 2, peak)
    report.check_timing_flags(10, 2, 989.0)
    report.check_timing_flags(10, 2, None)


def test_pipelined_timing_queues_the_next_step_before_waiting():
    """As the training loop: step i+1 is dispatched before the host waits for step i."""
    events = []
    counter = iter(range(100))

    def run_step():
        i = next(counter)
        events.append(("run", i))
        return i

    times = report.time_steps(run_step, lambda i: events.append(("wait", i)), 3)
    assert len(times) == 3 and all(t >= 0 for t in times)
    assert events == [("run", 0), ("run", 1), ("wait", 0), ("run", 2), ("wait", 1), ("run", 3), ("wait", 2),
                      ("wait", 3)]


def test_synchronous_timing_waits_for_each_step_before_the_next():
    events = []
    counter = iter(range(100))

    def run_step():
        i = next(counter)
        events.append(("run", i))
        return i

    report.time_steps(run_step, lambda i: events.append(("wait", i)), 2, "synchronous")
    assert events == [("run", 0), ("wait", 0), ("run", 1), ("wait", 1)]
    with pytest.raises(ValueError, match="timing"):
        report.time_steps(run_step, lambda i: None, 1, "eventually")


def test_dry_run_reports_memory_and_the_bytes_each_kernel_class_moves(tmp_path):
    proc, records = run_mfu(tmp_path, "--dry_run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = records[0]
    assert record["dry_run"] and record["compiled_memory"]["estimate"] > 0
    traffic = record["traffic"]
    assert traffic["gemm"]["kernels"] > 0 and traffic["elementwise"]["read_bytes"] > 0
    assert record["bandwidth"] is None  # a CPU: no memory time is printed
    assert "memory traffic of the top-level kernels" in proc.stdout


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # its parent package is missing
        return False


HAS_CUDA_PLUGIN = has_module("jax_plugins.xla_cuda12")


@pytest.mark.skipif(HAS_CUDA_PLUGIN, reason="the CUDA plugin is installed: the GPU compile runs instead")
def test_gpu_topology_without_the_cuda_plugin_is_one_line(tmp_path):
    proc, records = run_mfu(tmp_path, "--dry_run", "--topology", "h100")
    assert proc.returncode == 2 and records == []
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --topology h100: needs JAX's CUDA plugin")


@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs jax[cuda12] (no GPU): pip install 'jax[cuda12]'")
def test_the_step_compiles_for_an_h100_on_a_host_without_one(tmp_path):
    """With the fused norm backward too: its Triton kernels compile for the card (one per norm); and
    with joined norms, which move fewer bytes."""
    proc, records = run_mfu(
        tmp_path, "--dry_run", "--topology", "h100", "--config.model.compute_dtype=bfloat16",
        "--config.model.norm_backward=pallas", "--config.model.scan_layers=false",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = records[0]
    assert (record["device_kind"], record["num_devices"], record["backend"]) == ("NVIDIA H100 80GB HBM3", 1, "gpu")
    assert record["hlo"]["cudnn_attention_calls"] > 0  # bf16 compute: auto attention is cuDNN on a GPU
    assert get_config("demo").model.norm_placement == "sandwich"
    assert record["traffic"]["pallas"]["kernels"] == 4 + 1  # TINY's one layer: 4 norms, and the final one
    assert record["bandwidth"] == report.hbm_bandwidth("NVIDIA H100 80GB HBM3")
    assert "ms at 3.35 TB/s" in proc.stdout

    # joined norms: the first norm's backward, and a forward and a backward kernel per join (2 per layer)
    joined, joined_records = run_mfu(
        tmp_path, "--dry_run", "--topology", "h100", "--config.model.compute_dtype=bfloat16",
        "--config.model.norm_backward=pallas", "--config.model.scan_layers=false", "--config.model.join_norms=true",
    )
    assert joined.returncode == 0, joined.stderr[-2000:]
    moved = lambda traffic, kind: traffic[kind]["read_bytes"] + traffic[kind]["written_bytes"]
    norms = lambda traffic: moved(traffic, "pallas") + moved(traffic, "elementwise")
    assert joined_records[-1]["traffic"]["pallas"]["kernels"] == 1 + 2 * 2
    assert norms(joined_records[-1]["traffic"]) < norms(record["traffic"])


def test_hlo_statistics_count_collectives_sync_or_async_once():
    """GPU programs start collectives asynchronously (`-start`/`-done` pairs): each counts once; a TPU
    reduce-scatter is a fusion of an all-reduce and a slice: one reduce-scatter."""
    from benchmarks import mfu

    text = "\n".join([
        "  %rs = (bf16[256,8192]{1,0}) reduce-scatter-start(%g), dimensions={0}",
        "  %rsd = (bf16[256,8192]{1,0}) reduce-scatter-done(%rs)",
        "  %rs2 = f32[256]{0} reduce-scatter(%h), dimensions={0}",
        "  %ar = f32[] all-reduce-start(%l), to_apply=%sum",
        "  %ard = f32[] all-reduce-done(%ar)",
        "  %ag = (bf16[2048,8192]{1,0}) all-gather-start(%w), dimensions={0}",
        "  %agd = bf16[2048,8192]{1,0} all-gather-done(%ag)",
    ])
    hlo = mfu.hlo_statistics(text)
    assert (hlo["reduce_scatters"], hlo["all_reduces"], hlo["all_gathers"]) == (2, 1, 1)
    # TPU: a fusion of an all-reduce and a slice that the backend runs as one reduce-scatter (v5e:2x2, libtpu 0.0.42)
    tpu = "\n".join([
        "%all-reduce-scatter (input: bf16[2048,8192]) -> bf16[528,8192] {",
        "  %all-reduce.2 = bf16[2112,8192]{1,0} all-reduce(%pad), channel_id=4, replica_groups={{0,1,2,3}}",
        "  ROOT %dynamic-slice.3 = bf16[528,8192]{1,0} dynamic-slice(%all-reduce.2, %multiply.2, %constant.14)",
        "}",
        "",
        "ENTRY %main {",
        "  %fusion = bf16[528,8192]{1,0} fusion(%fusion.1), kind=kCustom, calls=%all-reduce-scatter",
        "  %all-reduce.7 = f32[] all-reduce(%loss), to_apply=%add",
        "}",
    ])
    assert (mfu.hlo_statistics(tpu)["reduce_scatters"], mfu.hlo_statistics(tpu)["all_reduces"]) == (1, 1)


def test_a_gpu_topology_name_out_of_pattern_is_one_line(tmp_path):
    proc, _ = run_mfu(tmp_path, "--dry_run", "--topology", "h100x0")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: --topology h100x0: a GPU topology is h100 or h200, or hNNNxK for K GPUs of one host (h100x8)"
    )
