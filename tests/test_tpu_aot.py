"""Compiling for TPU from a CPU host: splash builds its Mosaic kernel when the mesh is TPU, and the
trainer's step compiles for a TPU topology offline (`benchmarks.mfu --dry_run --topology`, needs libtpu)."""

import importlib.util
import re

import jax
import jax.numpy as jnp
import pytest
from jax._src.mesh import AbstractDevice  # no public constructor for a mesh's abstract device
from jax.sharding import AbstractMesh, AxisType

from benchmarks import mfu
from configs.pretrain import FSDP_RULES, get_config
from nucgpt import sharding
from nucgpt.errors import UserError
from nucgpt.model import attention

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def cpu_mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((1, 2, 1), sharding.AXES, (AxisType.Auto,) * 3, devices=jax.devices()[:2])


def splash_hlo(device_kind: str | None, dtype=jnp.float32) -> str:
    """StableHLO of splash attention traced under a CPU mesh, or (`device_kind`) that mesh seen as TPU chips."""
    q = jax.ShapeDtypeStruct((2, 256, 4, 64), dtype)
    kv = jax.ShapeDtypeStruct((2, 256, 2, 64), dtype)
    attend = jax.jit(lambda q, k, v: attention.attend(q, k, v, None, backend="splash", block_q=128, block_kv=128))
    mesh = cpu_mesh()
    with sharding.use_mesh(mesh, FSDP_RULES):
        if device_kind is None:
            return attend.trace(q, kv, kv).lower().as_text()
        tpu = mesh.abstract_mesh.update(abstract_device=AbstractDevice(device_kind, None, "tpu"))
        with jax.sharding.use_abstract_mesh(tpu):
            assert attention.resolve_backend("auto") == "splash"
            return attend.trace(q, kv, kv).lower(lowering_platforms=("tpu",)).as_text()


def kernel_operand_types(hlo: str) -> list[str]:
    """Element types of the query, key and value operands of each Pallas TPU kernel call."""
    calls = [line for line in hlo.splitlines() if "tpu_custom_call" in line]
    return [re.findall(r"tensor<[\dx]+x(\w+)>", call.split(" : (")[-1])[2:5] for call in calls]


def test_the_platform_is_the_meshs_not_the_hosts():
    assert attention.mesh_platform(cpu_mesh()) == "cpu"
    assert attention.mesh_platform(cpu_mesh().abstract_mesh.update(abstract_device=AbstractDevice("TPU v4", None, "tpu"))) == "tpu"
    assert attention.mesh_platform(None) == jax.default_backend()
    assert attention.mesh_platform(AbstractMesh((2,), ("data",))) == jax.default_backend()  # no devices named
    with sharding.use_mesh(cpu_mesh(), FSDP_RULES):
        assert attention.compile_platform() == "cpu"
        assert attention.resolve_backend("auto") == "xla"


def test_splash_is_interpreted_on_a_cpu_mesh_and_a_mosaic_kernel_on_a_tpu_mesh():
    """Lowering needs no libtpu, so this runs in CI: the kernel follows the mesh, not the host."""
    on_cpu, on_tpu = splash_hlo(None), splash_hlo("TPU v5 lite")
    assert "tpu_custom_call" not in on_cpu and "stablehlo.while" in on_cpu  # Pallas interpret mode
    assert "tpu_custom_call" in on_tpu and "stablehlo.while" not in on_tpu


def test_splash_runs_in_float32_where_mosaic_has_no_bfloat16_matmul():
    assert kernel_operand_types(splash_hlo("TPU v5 lite", jnp.bfloat16)) == [["bf16"] * 3]
    assert kernel_operand_types(splash_hlo("TPU v3", jnp.bfloat16)) == [["f32"] * 3]


@pytest.mark.skipif(HAS_LIBTPU, reason="checks the message shown when libtpu is missing")
def test_topology_without_libtpu_is_a_user_error():
    with pytest.raises(UserError, match="needs the libtpu wheel"):
        mfu.topology_devices("v5e:2x2")


@pytest.mark.skipif(not HAS_LIBTPU, reason="compiling for a TPU topology needs the libtpu wheel")
def test_topology_devices_are_one_per_chip_and_unknown_names_are_user_errors():
    assert [(len(d), d[0].device_kind) for d in map(mfu.topology_devices, ("v4:2x2x1", "v5e:2x2", "v3-8"))] == [
        (4, "TPU v4"), (4, "TPU v5 lite"), (8, "TPU v3")]  # v4 as megacore, like a v4-8 VM; v3 has 2 cores a chip
    with pytest.raises(UserError, match="--topology v5e:2x3"):
        mfu.topology_devices("v5e:2x3")


@pytest.mark.skipif(not HAS_LIBTPU, reason="compiling for a TPU topology needs the libtpu wheel")
@pytest.mark.parametrize("topology, device_kind", [("v5e:2x2", "TPU v5 lite"), ("v3-8", "TPU v3")])
def test_demo_step_compiles_for_a_tpu_slice_with_pallas_kernels(topology, device_kind):
    devices = mfu.topology_devices(topology)
    config = get_config("demo")
    config.model.update(attention="splash", scan_layers=False, num_layers=2, d_model=64, mlp_dim=128, num_heads=4,
                        num_kv_heads=4, compute_dtype="bfloat16")
    config.train.global_batch_size = len(devices)
    trainer = mfu.build_trainer(config, devices)
    assert trainer.mesh.devices.flat[0].device_kind == device_kind
    compiled = trainer.train_step.lower(trainer.abstract_state, trainer.abstract_batch()).compile()
    hlo = mfu.hlo_statistics(compiled.as_text())
    assert hlo["pallas_tpu_kernels"] == 2 * config.model.num_layers  # forward + fused backward per layer
    assert hlo["while_loops"] == 0  # unrolled layers, and no interpreted kernel
    memory = mfu.memory_analysis(compiled)
    assert memory["argument_size_in_bytes"] > 0 and memory["temp_size_in_bytes"] > 0
    assert memory["estimate"] < 2**30
