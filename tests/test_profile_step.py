"""benchmarks.profile_step: the kernel classifier, the time accounting, the GPU plane reader (on a
synthetic trace) and one real profiled run of a tiny step on CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from ml_collections import ConfigDict

from benchmarks import profile_step
from benchmarks.profile_step import Kernel
from nucgpt import flops

REPO = Path(__file__).resolve().parents[1]
TINY = ["--config.model.num_layers=1", "--config.model.d_model=64", "--config.model.mlp_dim=128",
        "--config.train.seq_len=32", "--config.train.global_batch_size=8"]

GPU_KERNEL_CLASSES = {
    "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_execute_segment_k_off_kernel__5x_cublas":
        "matmul",
    "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT": "matmul",
    "triton_gemm_dot_5": "matmul",
    "gemm_fusion_dot_12": "matmul",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_64x64_64x4_tn_align8>(Params)": "matmul",
    "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x128_4x1x1_kernel0_0": "attention",
    "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x128x128_4x1x1_kernel0_0": "attention",
    "ncclDevKernel_AllReduce_Sum_f32_RING_LL": "collective",
    "MemcpyD2D": "copy",
    "Memset": "copy",
    "loop_transpose_fusion_4": "copy",
    "loop_multiply_fusion_3": "fusion",
    "input_reduce_fusion_12": "fusion",
    "loop_convert_fusion": "fusion",
    "some_unknown_kernel": "other",
}


@pytest.mark.parametrize("name,expected", GPU_KERNEL_CLASSES.items())
def test_classifier_on_real_looking_gpu_kernel_names(name, expected):
    assert profile_step.classify(name) == expected


def test_classifier_falls_back_to_the_xla_op_name():
    assert profile_step.classify("kernel_0x7f", "custom-call.3") == "other"
    assert profile_step.classify("kernel_0x7f", "dot.3") == "matmul"
    assert profile_step.classify("ynn_fusion.19", "ynn_fusion.19") == "matmul"  # CPU: XNNPACK dots


def test_overlapping_kernels_share_their_common_time_so_classes_sum_to_busy():
    kernels = [
        Kernel("sm90_xmma_gemm", 0, 10, ""),
        Kernel("ncclDevKernel_AllReduce", 5, 15, ""),  # overlaps the gemm for 5 ns
        Kernel("loop_add_fusion", 20, 24, ""),  # after a 5 ns gap
    ]
    assert profile_step.union_ns(kernels) == 19
    shares = profile_step.busy_ns_by_class(kernels)
    assert shares["matmul"] == pytest.approx(7.5)
    assert shares["collective"] == pytest.approx(7.5)
    assert shares["fusion"] == pytest.approx(4)
    assert sum(shares.values()) == pytest.approx(19)
    summary = profile_step.summarise(kernels, steps=1, top=2)
    assert summary["busy_ms"] == pytest.approx(19e-6)
    assert summary["window_ms"] == pytest.approx(24e-6)
    assert summary["idle_ms"] == pytest.approx(5e-6)
    assert summary["class_kernel_ms"]["collective"] == pytest.approx(10e-6)  # its own time, overlap included
    assert [k["name"] for k in summary["top_kernels"]] == ["sm90_xmma_gemm", "ncclDevKernel_AllReduce"]


def test_top_kernels_group_the_instances_of_one_fusion():
    assert profile_step.kernel_family("loop_add_fusion.12") == "loop_add_fusion"
    assert profile_step.kernel_family("triton_gemm_dot_5") == "triton_gemm_dot"
    assert profile_step.kernel_family("nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT") == "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_TNT"
    kernels = [Kernel("loop_add_fusion.3", 0, 2, ""), Kernel("loop_add_fusion.7", 2, 4, ""), Kernel("dot.1", 4, 7, "")]
    top = profile_step.summarise(kernels, steps=1, top=5)["top_kernels"]
    assert [(k["name"], k["count"]) for k in top] == [("loop_add_fusion", 2), ("dot", 1)]


def test_an_event_enclosing_the_next_one_on_its_line_counts_only_as_the_inner_ones():
    loop = Kernel("while.1", 0, 100, "while.1")
    body = [Kernel("dot.2", 10, 40, "dot.2"), Kernel("add_fusion", 50, 60, "add_fusion")]
    assert profile_step.innermost([loop, *body]) == body
    early_launch = [Kernel("gemm_a", 0, 10, ""), Kernel("gemm_b", 8, 20, "")]  # overlap, no nesting
    assert profile_step.innermost(early_launch) == early_launch


GPU_TRACE = """
planes {
  id: 1 name: "/device:GPU:0"
  lines { id: 7 name: "Stream #7(Kernel,MemcpyD2D)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 2000000 stats { metadata_id: 1 str_value: "dot.3" } }
    events { metadata_id: 2 offset_ps: 3000000 duration_ps: 1000000 }
    events { metadata_id: 4 offset_ps: 3500000 duration_ps: 500000 } }
  lines { id: 8 name: "CUPTI overhead" timestamp_ns: 1000
    events { metadata_id: 2 offset_ps: 0 duration_ps: 9000000 } }
  lines { id: 9 name: "XLA Ops" timestamp_ns: 1000
    events { metadata_id: 3 offset_ps: 0 duration_ps: 2000000 } }
  event_metadata { key: 1 value { id: 1 name: "sm90_xmma_gemm_bf16" } }
  event_metadata { key: 2 value { id: 2 name: "MemcpyD2D" } }
  event_metadata { key: 3 value { id: 3 name: "dot.3" } }
  event_metadata { key: 4 value { id: 4 name: "MemoryAlloc" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
}
"""


def test_gpu_trace_is_read_from_the_stream_lines_of_the_device_plane():
    profile = jax.profiler.ProfileData.from_text_proto(GPU_TRACE)
    plane, kernels = profile_step.device_kernels(profile, "gpu", "jit_train_step")
    assert plane == "/device:GPU:0"
    assert kernels == [Kernel("sm90_xmma_gemm_bf16", 1000.0, 3000.0, "dot.3"), Kernel("MemcpyD2D", 4000.0, 5000.0, "")]


def test_missing_device_plane_is_a_user_error():
    profile = jax.profiler.ProfileData.from_text_proto('planes { id: 1 name: "/host:CPU" }')
    with pytest.raises(profile_step.UserError, match="no /device:GPU:0 plane"):
        profile_step.device_kernels(profile, "gpu", "jit_train_step")


def test_model_flops_split_adds_up_to_nucgpt_flops():
    model = ConfigDict(dict(kind="transformer", vocab_size=6, d_model=2048, num_layers=12, num_heads=8,
                            num_kv_heads=8, head_dim=128, mlp_dim=8192, mlp_activation="gelu"))
    config = ConfigDict(dict(model=model, train=ConfigDict(dict(global_batch_size=8, seq_len=8192))))
    split = profile_step.model_flops_per_device(config, num_devices=2)
    tokens = 8 * 8192
    assert split["matmul"] + split["attention"] == pytest.approx(split["total"])
    assert split["total"] == pytest.approx(flops.train_flops_per_token(model, 8192) * tokens / 2)
    assert split["attention"] == pytest.approx(6 * 12 * 8192 * 8 * 128 * tokens / 2)


def profiled(device_kind: str, **class_busy_ms: float) -> dict:
    busy = dict.fromkeys(profile_step.CLASS_NAMES, 0.0) | class_busy_ms
    total = 3.62e9 * 65536  # the 500M step at batch 8 x 8192
    return dict(device_kind=device_kind, class_busy_ms=busy, window_ms=sum(busy.values()) + 10.0,
                model_flops_per_device_step=dict(total=total))


def test_an_h200_profile_read_as_an_h100_slows_only_the_memory_bound_classes():
    record = profiled("NVIDIA H200", matmul=250.0, attention=100.0, fusion=50.0, copy=5.0, collective=0.0, other=2.0)
    estimate = profile_step.as_device(record, "NVIDIA H100 80GB HBM3")
    ratio = 4.8 / 3.35
    assert estimate["bandwidth_ratio"] == pytest.approx(ratio)
    # matmul, attention, other and the 10 ms idle unchanged (same tensor cores, same 989 TFLOP/s peak)
    assert estimate["window_ms"] == pytest.approx(362.0 + 55.0 * ratio)
    assert estimate["step_scale"] == pytest.approx(estimate["window_ms"] / 417.0)
    assert estimate["mfu_over_window"] == pytest.approx(3.62e9 * 65536 / (estimate["window_ms"] * 1e-3) / 989e12)
    # the other way round it is faster, and a lower clocked part (H100 PCIe) also slows its arithmetic
    assert profile_step.as_device(profiled("NVIDIA H100 80GB HBM3", fusion=50.0), "NVIDIA H200")["step_scale"] < 1
    pcie = profile_step.as_device(profiled("NVIDIA H200", matmul=100.0), "NVIDIA H100 PCIe")
    assert pcie["window_ms"] == pytest.approx(10.0 + 100.0 * 989 / 756)


def test_no_estimate_for_the_same_device_an_unknown_one_or_none_asked():
    record = profiled("NVIDIA H100 80GB HBM3", matmul=1.0, fusion=1.0)
    assert profile_step.as_device(record, "NVIDIA H100 80GB HBM3") is None
    assert profile_step.as_device(record, "") is None
    assert profile_step.as_device(profiled("cpu", matmul=1.0), "NVIDIA H100 80GB HBM3") is None
    assert profile_step.as_device(profiled("NVIDIA A100-SXM4-80GB", matmul=1.0), "NVIDIA H100 80GB HBM3") is None


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.profile_step", "--config", "configs/pretrain.py:demo", *TINY, *args],
        cwd=REPO, capture_output=True, text=True, timeout=240, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )


def test_profiled_cpu_step_accounts_for_its_time(tmp_path):
    json_out, trace_dir = tmp_path / "profile.jsonl", tmp_path / "trace"
    proc = run_tool("--steps", "2", "--warmup", "0", "--top", "5", "--trace_dir", str(trace_dir),
                    "--json_out", str(json_out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(json_out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == record
    assert record["plane"].startswith("/host:CPU") and record["steps"] == 2
    assert 0 < record["busy_ms"] <= record["window_ms"] <= record["host_wall_ms"] + 1
    assert record["idle_ms"] == pytest.approx(record["window_ms"] - record["busy_ms"])
    assert set(record["class_busy_ms"]) == set(profile_step.CLASS_NAMES)
    assert sum(record["class_busy_ms"].values()) == pytest.approx(record["busy_ms"], rel=1e-6)
    assert record["class_busy_ms"]["matmul"] > 0 and record["matmul_tflops"] > 0
    top = record["top_kernels"]
    assert len(top) == 5 and all(k["total_ms"] > 0 and k["count"] > 0 for k in top)
    assert [k["total_ms"] for k in top] == sorted((k["total_ms"] for k in top), reverse=True)
    assert record["model_flops_per_device_step"]["matmul"] > 0
    assert Path(record["trace_file"]).is_file() and record["trace_dir_bytes"] > 0
    assert "implied TFLOP/s: matmul class" in proc.stdout
    assert record["as_device"] is None  # a CPU is no Hopper GPU: nothing estimated


def test_unknown_estimate_device_is_refused_in_one_line():
    proc = run_tool("--estimate_as", "NVIDIA B200")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --estimate_as='NVIDIA B200' names no Hopper GPU")


def test_mfu_only_flag_is_refused_in_one_line():
    proc = run_tool("--sweep")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --sweep is a benchmarks.mfu flag")
