"""Causal self-attention backends: xla (reference), cudnn (GPU), splash (TPU Pallas), auto by platform.

`auto` runs splash on TPU and cudnn on GPU, and xla elsewhere or for shapes the platform's kernel
cannot take; a backend named explicitly with such a shape is a UserError. The platform is the active
mesh's (`sharding.use_mesh`), so compiling on a CPU host for a TPU topology builds the TPU kernels.

Every backend takes q (already scaled by 1/sqrt(head_dim)), k, v in layout [batch, length, heads,
head_dim] and returns [batch, length, heads, head_dim]. Grouped-query attention: query head h reads
key/value head h // (heads / kv_heads), the Hugging Face `repeat_kv` convention.

Segment ids (0 = padding) keep tokens from attending across segments. xla and splash honour any
segment ids. cudnn applies the causal mask only: with padding at the end of each row, which is what
the data pipeline produces, a causal mask already keeps real tokens from seeing padding, so their
outputs are exact; rows packing several segments need xla or splash.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from nucgpt import sharding
from nucgpt.errors import UserError

BACKENDS = ("auto", "xla", "cudnn", "splash")
SPLASH_LANES = 128  # splash block sizes must be multiples of the TPU lane width
# Mosaic has no bfloat16 matmul on these (CompileTimeMosaicUnsupportedRhsType): splash runs in float32 there.
FLOAT32_SPLASH_DEVICES = ("TPU v2", "TPU v3")
RESIDUALS_NAME = "attention_residuals"  # checkpoint name of splash's forward output and statistics
_MASKED = -1e30


def mesh_device(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None) -> tuple[str, str]:
    """(platform, device kind) the code is compiled for: the mesh's devices, else the host's.

    They differ when compiling ahead of time for TPU devices that are not present (a CPU host
    lowering for a `jax.experimental.topologies` mesh): the kernels must be the TPU ones. An
    abstract mesh built without devices names none, so it also means the host's.
    """
    if isinstance(mesh, jax.sharding.Mesh):
        mesh = mesh.abstract_mesh
    device = None if mesh is None else mesh.abstract_device
    if device is None:
        return jax.default_backend(), jax.devices()[0].device_kind
    return device.platform, device.device_kind


def mesh_platform(mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None) -> str:
    """The platform half of `mesh_device`."""
    return mesh_device(mesh)[0]


def compile_platform() -> str:
    """The platform of the active `sharding.use_mesh` mesh, or the host's default backend outside one."""
    return mesh_platform(sharding.active_mesh())


def resolve_backend(backend: str, platform: str | None = None) -> str:
    """`auto` → splash on TPU, cudnn on GPU, xla elsewhere; unknown names are a UserError.

    The platform defaults to the active mesh's (`compile_platform`), not the host's.
    """
    if backend not in BACKENDS:
        raise UserError(f"model.attention={backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "auto":
        return backend
    platform = platform or compile_platform()
    return {"tpu": "splash", "gpu": "cudnn"}.get(platform, "xla")


def check_shapes(backend: str, seq_len: int, head_dim: int, block_q: int, block_kv: int) -> None:
    """Rejects shapes a backend cannot run, before anything is traced."""
    if backend == "splash":
        for name, block in (("splash_block_q", block_q), ("splash_block_kv", block_kv)):
            block = min(block, seq_len)
            if block % SPLASH_LANES or seq_len % block:
                raise UserError(
                    f"splash attention: model.{name} {block} must be a multiple of {SPLASH_LANES} "
                    f"that divides the sequence length {seq_len}"
                )
    if backend == "cudnn" and (head_dim % 8 or head_dim > 256):
        raise UserError(f"cudnn attention: head_dim {head_dim} must be a multiple of 8 and at most 256")


def select_backend(
    name: str, seq_len: int, head_dim: int, block_q: int, block_kv: int, platform: str | None = None,
    compute_dtype: str | None = None,
) -> str:
    """The backend to run. `auto` falls back to xla for shapes its platform's kernel cannot take
    (e.g. a 64-token fine-tuning bucket on TPU) and, on GPU, for float32 compute (cuDNN's fused
    attention takes 16-bit inputs only); a named backend's unsupported shape is a UserError."""
    backend = resolve_backend(name, platform)
    if name == "auto" and backend == "cudnn" and compute_dtype == "float32":
        return "xla"
    try:
        check_shapes(backend, seq_len, head_dim, block_q, block_kv)
    except UserError:
        if name != "auto":
            raise
        return "xla"
    return backend


def attend(
    q_BxLxHxK: jax.Array,
    k_BxLxGxK: jax.Array,
    v_BxLxGxK: jax.Array,
    segment_ids_BxL: jax.Array | None,
    *,
    backend: str,
    block_q: int = 512,
    block_kv: int = 512,
) -> jax.Array:
    """Causal attention by `backend` (resolved: xla | cudnn | splash)."""
    if backend == "xla":
        return _xla(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL)
    if backend == "cudnn":
        return _cudnn(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)
    if backend == "splash":
        return _splash(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, block_q, block_kv)
    raise UserError(f"unresolved attention backend {backend!r}")


def _xla(q_BxLxHxK, k_BxMxGxK, v_BxMxGxK, segment_ids_BxL):
    """Einsums with a float32 softmax; materialises the [L, L] scores, so it is the reference."""
    length = q_BxLxHxK.shape[1]
    mask_BxLxM = jnp.tril(jnp.ones((length, length), dtype=bool))[None]
    if segment_ids_BxL is not None:
        mask_BxLxM = mask_BxLxM & (segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :])
    return masked_attention(q_BxLxHxK, k_BxMxGxK, v_BxMxGxK, mask_BxLxM, kv_layout="BMGK")


def attend_cache(q_BxLxHxK: jax.Array, k_BxGxMxK: jax.Array, v_BxGxMxK: jax.Array, position: jax.Array) -> jax.Array:
    """Queries at positions position..position+L-1 against a KV cache of M slots: each sees the slots
    up to its own position (later slots are unwritten). For decoding, where L is 1. The cache is
    batch-major ([B, G, M, K]), the layout both matmuls read as is, so it is never transposed."""
    length, max_len = q_BxLxHxK.shape[1], k_BxGxMxK.shape[2]
    visible_LxM = (position + jnp.arange(length))[:, None] >= jnp.arange(max_len)[None, :]
    return masked_attention(q_BxLxHxK, k_BxGxMxK, v_BxGxMxK, visible_LxM[None], kv_layout="BGMK")


def masked_attention(q_BxLxHxK, k, v, mask_BxLxM: jax.Array, *, kv_layout: str) -> jax.Array:
    """softmax(q kᵀ) v in float32 where `mask` (broadcast over batch) allows; GQA by grouping the
    query heads of each KV head. `kv_layout` names the axes of k and v: "BMGK" or "BGMK"."""
    batch, length, heads, head_dim = q_BxLxHxK.shape
    kv_heads = k.shape[kv_layout.index("G")]
    q_BxLxGxRxK = q_BxLxHxK.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
    scores_BxGxRxLxM = jnp.einsum(f"BLGRK,{kv_layout}->BGRLM", q_BxLxGxRxK, k, preferred_element_type=jnp.float32)
    scores_BxGxRxLxM = jnp.where(mask_BxLxM[:, None, None], scores_BxGxRxLxM, _MASKED)
    probs_BxGxRxLxM = jax.nn.softmax(scores_BxGxRxLxM, axis=-1).astype(v.dtype)
    out_BxLxGxRxK = jnp.einsum(f"BGRLM,{kv_layout}->BLGRK", probs_BxGxRxLxM, v)
    return out_BxLxGxRxK.reshape(batch, length, heads, head_dim)


def _cudnn(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK):
    """cuDNN fused attention, causal; q is pre-scaled so scale=1. It takes bfloat16 or float16 as
    they are; float32 (only with model.attention=cudnn named: `auto` runs xla there) goes in as bfloat16."""
    dtype = q_BxLxHxK.dtype if q_BxLxHxK.dtype in (jnp.bfloat16, jnp.float16) else jnp.bfloat16
    out_BxLxHxK = jax.nn.dot_product_attention(
        q_BxLxHxK.astype(dtype),
        k_BxLxGxK.astype(dtype),
        v_BxLxGxK.astype(dtype),
        scale=1.0,
        is_causal=True,
        implementation="cudnn",
    )
    return out_BxLxHxK.astype(q_BxLxHxK.dtype)


def _splash_kernel(num_heads: int, seq_len: int, block_q: int, block_kv: int, interpret: bool):
    """A splash kernel for one device's heads; `interpret` runs it in Pallas interpret mode (off TPU)."""
    block_q, block_kv = min(block_q, seq_len), min(block_kv, seq_len)
    block_sizes = splash.BlockSizes(
        block_q=block_q,
        block_kv=block_kv,
        block_kv_compute=block_kv,
        block_q_dkv=block_q,
        block_kv_dkv=block_kv,
        block_kv_dkv_compute=block_kv,
        use_fused_bwd_kernel=True,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((seq_len, seq_len)) for _ in range(num_heads)])
    return splash.make_splash_mha(
        mask,
        block_sizes=block_sizes,
        head_shards=1,
        q_seq_shards=1,
        residual_checkpoint_name=RESIDUALS_NAME,
        interpret=interpret,
    )


def _splash_local(block_q, block_kv, interpret, q_BxHxLxK, k_BxGxLxK, v_BxGxLxK, segment_ids_BxL=None):
    """Splash on the arrays one device holds: vmapped over its batch rows."""
    kernel = _splash_kernel(q_BxHxLxK.shape[1], q_BxHxLxK.shape[2], block_q, block_kv, interpret)
    if segment_ids_BxL is None:
        return jax.vmap(kernel)(q_BxHxLxK, k_BxGxLxK, v_BxGxLxK)
    segments = splash.SegmentIds(q=segment_ids_BxL, kv=segment_ids_BxL)
    return jax.vmap(kernel)(q_BxHxLxK, k_BxGxLxK, v_BxGxLxK, segments)


def _splash(q_BxLxHxK, k_BxLxGxK, v_BxLxGxK, segment_ids_BxL, block_q, block_kv):
    """Splash under `jax.shard_map`: each device runs the kernel on its batch rows and heads."""
    mesh = sharding.active_mesh()
    platform, device_kind = mesh_device(mesh)
    kernel_dtype = jnp.float32 if device_kind in FLOAT32_SPLASH_DEVICES else q_BxLxHxK.dtype
    q_BxHxLxK, k_BxGxLxK, v_BxGxLxK = (
        x.astype(kernel_dtype).transpose(0, 2, 1, 3) for x in (q_BxLxHxK, k_BxLxGxK, v_BxLxGxK)
    )
    args = (q_BxHxLxK, k_BxGxLxK, v_BxGxLxK) + (() if segment_ids_BxL is None else (segment_ids_BxL,))
    local = functools.partial(_splash_local, block_q, block_kv, platform != "tpu")
    if mesh is None:
        out_BxHxLxK = local(*args)
    else:
        rules = sharding.active_rules()
        q_spec = sharding.logical_to_mesh_spec(("batch", "heads", "length", "head_dim"), rules,
                                               shape=q_BxHxLxK.shape, mesh=mesh)
        kv_spec = sharding.logical_to_mesh_spec(("batch", "kv_heads", "length", "head_dim"), rules,
                                                shape=k_BxGxLxK.shape, mesh=mesh)
        if q_spec[2:] != (None, None) or kv_spec[2:] != (None, None):
            raise UserError("splash attention needs the length and head_dim axes unsharded by the mesh rules")
        if q_spec[1] != kv_spec[1] or q_spec[0] != kv_spec[0]:
            raise UserError(
                f"splash attention needs heads and kv_heads sharded alike, got {q_spec} and {kv_spec}: "
                "check that num_kv_heads is divisible by the tensor parallelism"
            )
        segment_spec = jax.sharding.PartitionSpec(q_spec[0], None)
        in_specs = (q_spec, kv_spec, kv_spec) + (() if segment_ids_BxL is None else (segment_spec,))
        out_BxHxLxK = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec, check_vma=False)(*args)
    return out_BxHxLxK.transpose(0, 2, 1, 3).astype(q_BxLxHxK.dtype)
