"""benchmarks.hlo_traffic: bytes per kernel class read from optimised HLO text (a synthetic GPU module
with the shapes of the 500M step's q/k/v, and a real CPU-compiled function)."""

import jax
import jax.numpy as jnp
import pytest

from benchmarks import hlo_traffic

# Trimmed from the H100 step compiled offline (benchmarks.mfu --dry_run --topology h100, fused_qkv):
# one GEMM fusion, a fusion that reads a third of its operand (v), cuDNN attention, a copy, and the
# Pallas (Triton) norm backward (model.norm_backward=pallas).
GPU_HLO = """HloModule jit_train_step, is_scheduled=true

%gemm_fusion_dot_computation (parameter_0: bf16[65536,2048], parameter_1: bf16[2048,3072]) -> bf16[65536,3072] {
  %parameter_0 = bf16[65536,2048]{1,0} parameter(0)
  %parameter_1 = bf16[2048,3072]{1,0} parameter(1)
  ROOT %dot.1 = bf16[65536,3072]{1,0} dot(%parameter_0, %parameter_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_slice (param_0.1: bf16[65536,3072]) -> bf16[8,8192,8,128] {
  %param_0.1 = bf16[65536,3072]{1,0} parameter(0)
  %bitcast.1 = bf16[8,8192,24,128]{3,2,1,0} bitcast(%param_0.1)
  ROOT %slice.1 = bf16[8,8192,8,128]{3,2,1,0} slice(%bitcast.1), slice={[0:8], [0:8192], [16:24], [0:128]}
}

%fused_add (param_0.2: bf16[65536,3072], param_1.2: bf16[65536,3072]) -> bf16[65536,3072] {
  %param_0.2 = bf16[65536,3072]{1,0} parameter(0)
  %param_1.2 = bf16[65536,3072]{1,0} parameter(1)
  ROOT %add.1 = bf16[65536,3072]{1,0} add(%param_0.2, %param_1.2)
}

ENTRY %main (p0: bf16[65536,2048], p1: bf16[2048,3072]) -> (bf16[8,8192,8,128], bf16[65536,3072]) {
  %p0 = bf16[65536,2048]{1,0} parameter(0)
  %p1 = bf16[2048,3072]{1,0} parameter(1)
  %gemm_fusion_dot = bf16[65536,3072]{1,0} fusion(%p0, %p1), kind=kCustom, calls=%gemm_fusion_dot_computation, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %loop_slice_fusion = bf16[8,8192,8,128]{3,2,1,0} fusion(%gemm_fusion_dot), kind=kLoop, calls=%fused_slice
  %loop_add_fusion = bf16[65536,3072]{1,0} fusion(%gemm_fusion_dot, %gemm_fusion_dot), kind=kLoop, calls=%fused_add
  %custom-call.1 = (bf16[8,8192,8,128]{3,2,1,0}, f32[8,8,8192]{2,1,0}) custom-call(%loop_slice_fusion, %loop_slice_fusion, %loop_slice_fusion), custom_call_target="__cudnn$fmhaSoftmax"
  %get-tuple-element.1 = bf16[8,8192,8,128]{3,2,1,0} get-tuple-element(%custom-call.1), index=0
  %copy.1 = bf16[8,8192,8,128]{3,2,1,0} copy(%get-tuple-element.1)
  %pallas_call.1 = (bf16[65536,2048]{1,0}, f32[512,2048]{1,0}) custom-call(%p0, %p0), custom_call_target="__gpu$xla.gpu.triton", api_version=API_VERSION_TYPED_FFI
  ROOT %tuple.1 = (bf16[8,8192,8,128]{3,2,1,0}, bf16[65536,3072]{1,0}) tuple(%copy.1, %loop_add_fusion)
}
"""
MIB = 2**20


def test_shape_bytes_of_arrays_and_tuples():
    assert hlo_traffic.shape_bytes("bf16[8,8192,8,128]{3,2,1,0}") == 128 * MIB
    assert hlo_traffic.shape_bytes("(bf16[4]{0}, f32[2,3]{1,0}, pred[])") == 8 + 24 + 1


def test_each_entry_kernel_counts_once_and_a_sliced_operand_counts_its_slice():
    traffic = hlo_traffic.traffic_by_class(GPU_HLO)
    qkv = 384 * MIB  # bf16[65536, 3072]
    assert traffic["gemm"] == dict(kernels=1, read_bytes=256 * MIB + 12 * MIB, written_bytes=qkv)
    # the slice fusion reads v (a third of qkv), the add reads qkv twice
    assert traffic["elementwise"] == dict(kernels=2, read_bytes=128 * MIB + 2 * qkv, written_bytes=128 * MIB + qkv)
    assert traffic["attention"] == dict(kernels=1, read_bytes=3 * 128 * MIB, written_bytes=128 * MIB + 2 * MIB)
    assert traffic["copy"] == dict(kernels=1, read_bytes=128 * MIB, written_bytes=128 * MIB)
    assert traffic["pallas"] == dict(kernels=1, read_bytes=2 * 256 * MIB, written_bytes=256 * MIB + 4 * MIB)
    assert traffic["collective"]["kernels"] == traffic["other"]["kernels"] == 0
    text = hlo_traffic.format_traffic(traffic, 3.35e12)
    assert text.splitlines()[0].split()[:3] == ["gemm", "1", "kernels"]
    assert "collective" not in text and "TB/s" in text


def test_a_compiled_cpu_function_moves_its_operands_and_result():
    x = jax.ShapeDtypeStruct((1024, 1024), jnp.float32)
    text = jax.jit(lambda a, b: jnp.tanh(a) * b + 1.0).lower(x, x).compile().as_text()
    traffic = hlo_traffic.traffic_by_class(text)
    moved = sum(c["read_bytes"] + c["written_bytes"] for c in traffic.values())
    assert moved == pytest.approx(3 * 4 * MIB, rel=0.01)  # two inputs read, one output written: one fused kernel
