"""RMSNorm's backward pass in one read of its inputs: a Pallas (Triton) kernel for GPUs.

Why: XLA splits the backward of `s·x·r` (r = (mean(x²) + eps)^-½) into a row-reduction kernel and an
elementwise kernel with the column reduction for the scale's gradient, so x and the incoming gradient
are read twice: about 1.3 GiB per norm at the 500M preset's batch 8 (offline H100 compile), against
0.77 GiB for one pass. This kernel makes that one pass: each program walks a band of rows, a few at
a time, computes r and the row term, writes dx and keeps a float32 partial sum of the scale's
gradient that a small XLA reduction adds up. `residual_grad` (the gradient arriving through the
residual stream around a pre-norm) is added in the same pass, as XLA adds it in its second kernel.
JAX 0.11 deprecates Pallas' Triton backend (still shipped); passing its CompilerParams selects it.

The kernel runs where the lowering platform is CUDA; everywhere else (CPU, TPU) the same backward is
written in jnp (`reference_backward`), as it is on GPUs when d_model is not a power of two (Triton's
blocks must be; a warning says so). Under a multi-device mesh each device runs it on its own rows
(`shard_map`); where the mesh rules split a row's features over devices (a batch too small for
the fsdp axis), the jnp backward runs instead and XLA partitions it.
"""

from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging
from jax.experimental import pallas as pl

from nucgpt import sharding
from nucgpt.errors import UserError

# The default tiling, from the H100 compile (ptxas: 126 registers a thread at 2 x 2048 per 8 warps with
# the next tile prefetched, so two programs share an SM, and each has loads in flight while it
# reduces); `benchmarks.norm_check` times others on a GPU, and `model.norm_kernel_layout` picks one.
_TILE_ELEMENTS = 4096  # elements of x per loop step of a program: 2 rows of d_model 2048
_MIN_PROGRAMS = 1024  # about four waves of two programs per SM on an H100 (132 SMs): a short last wave
_MAX_TILES_PER_PROGRAM = 32
_NUM_WARPS = 8


class Layout(NamedTuple):
    """How the kernel tiles the rows: each program loops over `tiles` tiles of `tile_rows` rows, with
    `num_warps` warps; with `prefetch`, it loads the next tile before working on this one (Triton
    does not pipeline these loads itself). Written TILE_ROWSxTILESxWARPS[p], e.g. 2x32x8 or 2x32x8p."""

    tile_rows: int
    tiles: int
    num_warps: int
    prefetch: bool = False

    def __str__(self) -> str:
        return f"{self.tile_rows}x{self.tiles}x{self.num_warps}" + ("p" if self.prefetch else "")


_LAYOUT = re.compile(r"(\d+)x(\d+)x(\d+)(p?)")


def parse_layout(text: str, field: str = "model.norm_kernel_layout") -> Layout | None:
    """`auto` → None (the default for the shape), or a Layout from TILE_ROWSxTILESxWARPS[p] (powers of two)."""
    if text == "auto":
        return None
    match = _LAYOUT.fullmatch(text)
    numbers = [int(v) for v in match.groups()[:3]] if match else []
    if not numbers or any(v < 1 or v & (v - 1) for v in numbers):
        raise UserError(
            f"{field}={text!r}: expected auto or TILE_ROWSxTILESxWARPS in powers of two, p at the end to "
            "prefetch (e.g. 2x32x8, 2x32x8p)"
        )
    return Layout(*numbers, prefetch=bool(match.group(4)))


def row_rsqrt(x_f32: jax.Array, eps: float) -> jax.Array:
    """r = (mean(x²) + eps)^-½ of each row, [..., 1]: what RMSNorm multiplies a float32 row by."""
    return jax.lax.rsqrt(jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True) + eps)


def backward_from_rsqrt(x, grad, scale_D, rsqrt, residual_grad=None):
    """d/dx (plus `residual_grad`) and d/ds of s·x·r, given r:  r·g·s − x·r³·mean(g·s·x).

    Written with x (not the normalised x·r) so that no full-size intermediate is used twice: each
    output is one pass over x and the gradient (plus one row reduction for the first). Float32 math,
    outputs in x's and the scale's dtypes. The jnp backwards and the kernel's tiles all use it.
    """
    x_f32 = x.astype(jnp.float32)
    grad = grad.astype(jnp.float32)
    grad_scaled = grad * scale_D.astype(jnp.float32)
    row = jnp.mean(grad_scaled * x_f32, axis=-1, keepdims=True) * rsqrt**3
    grad_x = rsqrt * grad_scaled - x_f32 * row
    if residual_grad is not None:
        grad_x = grad_x + residual_grad.astype(jnp.float32)
    grad_scale = jnp.sum(grad * x_f32 * rsqrt, axis=tuple(range(x.ndim - 1)))
    return grad_x.astype(x.dtype), grad_scale.astype(scale_D.dtype)


def reference_backward(x, grad, scale_D, residual_grad, eps):
    """The whole backward in jnp: r recomputed from x, then `backward_from_rsqrt`."""
    return backward_from_rsqrt(x, grad, scale_D, row_rsqrt(x.astype(jnp.float32), eps), residual_grad)


def _largest_power_of_two_dividing(n: int, at_most: int) -> int:
    power = 1
    while power * 2 <= at_most and n % (power * 2) == 0:
        power *= 2
    return power


def kernel_layout(num_rows: int, d_model: int) -> Layout:
    """The default: tiles of about `_TILE_ELEMENTS` (whole rows), enough programs to fill the GPU."""
    tile_rows = _largest_power_of_two_dividing(num_rows, max(1, _TILE_ELEMENTS // d_model))
    tiles = _largest_power_of_two_dividing(num_rows // tile_rows, _MAX_TILES_PER_PROGRAM)
    while tiles > 1 and num_rows // (tile_rows * tiles) < _MIN_PROGRAMS:
        tiles //= 2
    return Layout(tile_rows, tiles, _NUM_WARPS if tile_rows * d_model >= 4096 else 4, prefetch=tiles > 1)


def _row_kernel(*refs, work, num_row_inputs: int, num_scales: int, num_row_outputs: int, tile_rows: int,
                num_tiles: int, prefetch: bool):
    """One program: `num_tiles` tiles of `tile_rows` rows. `work(tile, scales)` maps a tile of the row
    inputs to (row outputs, float32 [d_model] partial sums); the band's sums go to the last outputs."""
    row_input_refs = refs[:num_row_inputs]
    scales = tuple(ref[...].astype(jnp.float32) for ref in refs[num_row_inputs:num_row_inputs + num_scales])
    row_output_refs = refs[num_row_inputs + num_scales:num_row_inputs + num_scales + num_row_outputs]
    partial_refs = refs[num_row_inputs + num_scales + num_row_outputs:]

    def load(i):
        return tuple(ref[pl.ds(i * tile_rows, tile_rows), :] for ref in row_input_refs)

    def step(i, tile, partials):
        outputs, tile_partials = work(tile, scales)
        for ref, value in zip(row_output_refs, outputs):
            ref[pl.ds(i * tile_rows, tile_rows), :] = value
        return tuple(p + t for p, t in zip(partials, tile_partials))

    zeros = tuple(jnp.zeros(ref.shape[-1:], jnp.float32) for ref in partial_refs)
    if prefetch:  # the next tile's loads are in flight while this one is reduced (the last loads itself again)

        def prefetched_step(i, carry):
            partials, tile = carry
            following = load(jnp.minimum(i + 1, num_tiles - 1))
            return step(i, tile, partials), following

        partials, _ = jax.lax.fori_loop(0, num_tiles, prefetched_step, (zeros, load(0)))
    else:
        partials = jax.lax.fori_loop(0, num_tiles, lambda i, partials: step(i, load(i), partials), zeros)
    for ref, partial in zip(partial_refs, partials):
        ref[...] = partial[None, :]


def row_kernel_call(work, row_inputs, scales, row_output_dtypes, num_partials: int, *, layout: Layout | None,
                    interpret: bool, name: str, default_layout=None, field: str = "model.norm_kernel_layout"):
    """A Pallas call of `work` over bands of rows ([N, D] inputs, [D] scales): its row outputs ([N, D],
    of `row_output_dtypes`) and its `num_partials` [D] sums over all rows, in float32. `layout` None:
    `default_layout(N, D)` (`kernel_layout`'s if not given). Triton on GPUs, or Pallas' interpreter."""
    num_rows, d_model = row_inputs[0].shape
    if not interpret and d_model & (d_model - 1):
        raise UserError(f"the Pallas norm kernels need model.d_model a power of two, got {d_model}")
    layout = layout or (default_layout or kernel_layout)(num_rows, d_model)
    tile_rows, tiles, num_warps, prefetch = layout
    band = tile_rows * tiles
    if num_rows % band:
        raise UserError(
            f"{field}={layout}: programs of {band} rows do not divide "
            f"the {num_rows} rows (batch x length) of this norm"
        )
    num_programs = num_rows // band
    rows_spec = pl.BlockSpec((band, d_model), lambda p: (p, 0))
    compiler_params = None
    if not interpret:
        try:  # deprecated since JAX 0.11; a later JAX may no longer ship it
            from jax.experimental.pallas import triton as pallas_triton
        except ImportError:
            raise UserError(
                f"model.norm_backward=pallas and model.join_norms need Pallas' Triton backend, which JAX "
                f"{jax.__version__} does not ship: use model.norm_backward=recompute and model.join_norms=false"
            ) from None
        compiler_params = pallas_triton.CompilerParams(num_warps=num_warps, num_stages=2)
    kernel = functools.partial(
        _row_kernel, work=work, num_row_inputs=len(row_inputs), num_scales=len(scales),
        num_row_outputs=len(row_output_dtypes), tile_rows=tile_rows, num_tiles=tiles, prefetch=prefetch,
    )
    outputs = pl.pallas_call(
        kernel,
        grid=(num_programs,),
        in_specs=[rows_spec] * len(row_inputs) + [pl.BlockSpec((d_model,), lambda p: (0,))] * len(scales),
        out_specs=[rows_spec] * len(row_output_dtypes) + [pl.BlockSpec((1, d_model), lambda p: (p, 0))] * num_partials,
        out_shape=[jax.ShapeDtypeStruct((num_rows, d_model), dtype) for dtype in row_output_dtypes]
        + [jax.ShapeDtypeStruct((num_programs, d_model), jnp.float32)] * num_partials,
        compiler_params=compiler_params,
        interpret=interpret,
        name=name,
    )(*row_inputs, *scales)
    num_row_outputs = len(row_output_dtypes)
    return (*outputs[:num_row_outputs], *(jnp.sum(p, axis=0) for p in outputs[num_row_outputs:]))


def kernel_backward(
    x_NxD, grad_NxD, scale_D, residual_grad_NxD, eps, *, interpret: bool = False, layout: Layout | None = None
):
    """The Pallas kernel's (dx, d(scale)); `interpret` runs it in Pallas' interpreter (any platform).
    `layout` None: `kernel_layout`'s default for the shape."""
    has_residual = residual_grad_NxD is not None

    def work(tile, scales):
        x, grad, *residual = tile
        grad_x, grad_scale = backward_from_rsqrt(
            x, grad, scales[0], row_rsqrt(x.astype(jnp.float32), eps), residual[0] if has_residual else None
        )
        return (grad_x,), (grad_scale,)

    row_inputs = [x_NxD, grad_NxD] + ([residual_grad_NxD] if has_residual else [])
    grad_x_NxD, grad_scale_D = row_kernel_call(
        work, row_inputs, [scale_D], [x_NxD.dtype], 1, layout=layout, interpret=interpret, name="rms_norm_backward"
    )
    return grad_x_NxD, grad_scale_D.astype(scale_D.dtype)


off_cuda_backward = reference_backward  # what runs where the platform is not CUDA (tests swap in the kernel)


@functools.cache
def _warn_not_a_power_of_two(d_model: int) -> None:
    """Once per width and process, not once per norm traced (49 at the 500M shape)."""
    logging.warning(
        "model.d_model=%d is not a power of two, which the Pallas norm kernels need; their jnp "
        "equivalents run on every platform", d_model,
    )


def on_this_platform(kernel, off_cuda, reference, *operands_NxD):
    """`kernel(*operands)` where the lowering platform is CUDA, `off_cuda` elsewhere (decided at lowering);
    `reference` on every platform where d_model is not a power of two (Triton's blocks must be)."""
    d_model = operands_NxD[0].shape[-1]
    if d_model & (d_model - 1):
        _warn_not_a_power_of_two(d_model)
        return reference(*operands_NxD)
    return jax.lax.platform_dependent(*operands_NxD, cuda=kernel, default=off_cuda)


def on_each_device(local, reference, row_operands, scales, num_row_outputs: int, num_sums: int):
    """`local(*row_operands, *scales)` → (row outputs, [D] sums over rows) on each device's rows under
    the active mesh (`shard_map`; the sums added over the devices holding other rows). Where the
    mesh rules split a row's features over devices, `reference` (jnp) runs and XLA partitions it. A
    row operand after the first may be None (an absent gradient): both functions get None there."""
    mesh, rules = sharding.active_mesh(), sharding.active_rules()
    if mesh is None or math.prod(mesh.shape.values()) == 1:
        return local(*row_operands, *scales)
    x_BxLxD = row_operands[0]
    spec = sharding.logical_to_mesh_spec(("batch", "length", "embed"), rules, shape=x_BxLxD.shape, mesh=mesh)
    if spec[2] is not None:
        return reference(*row_operands, *scales)
    row_axes = tuple(a for part in spec[:2] if part is not None for a in ((part,) if isinstance(part, str) else part))
    activations = jax.sharding.PartitionSpec(spec[0], spec[1], None)
    replicated = jax.sharding.PartitionSpec()
    given = [a for a in row_operands if a is not None]  # shard_map takes arrays only

    def per_device(*operands):
        shards = iter(operands[:len(given)])
        outputs = local(*(None if a is None else next(shards) for a in row_operands), *operands[len(given):])
        sums = tuple(jax.lax.psum(s, row_axes) if row_axes else s for s in outputs[num_row_outputs:])
        return (*outputs[:num_row_outputs], *sums)

    return jax.shard_map(
        per_device, mesh=mesh,
        in_specs=(activations,) * len(given) + (replicated,) * len(scales),
        out_specs=(activations,) * num_row_outputs + (replicated,) * num_sums,
        check_vma=False,
    )(*given, *scales)


def rows(a_BxLxD: jax.Array) -> jax.Array:
    return a_BxLxD.reshape(-1, a_BxLxD.shape[-1])


def backward(x_BxLxD, grad_BxLxD, scale_D, residual_grad_BxLxD, eps, layout: str = "auto"):
    """dx (+ `residual_grad`, when given) and d(scale) of RMSNorm, per device under the active mesh;
    `layout`: the kernel's tiling (`parse_layout`)."""

    def local(x_BxLxD, grad_BxLxD, residual_grad_BxLxD, scale_D):
        grad_x_NxD, grad_scale_D = on_this_platform(
            lambda *a: kernel_backward(*a, eps=eps, layout=parse_layout(layout)),
            lambda *a: off_cuda_backward(*a, eps=eps),
            lambda *a: reference_backward(*a, eps=eps),
            rows(x_BxLxD), rows(grad_BxLxD), scale_D, None if residual_grad_BxLxD is None else rows(residual_grad_BxLxD),
        )
        return grad_x_NxD.reshape(x_BxLxD.shape), grad_scale_D

    def reference(x_BxLxD, grad_BxLxD, residual_grad_BxLxD, scale_D):
        return reference_backward(x_BxLxD, grad_BxLxD, scale_D, residual_grad_BxLxD, eps)

    return on_each_device(
        local, reference, [x_BxLxD, grad_BxLxD, residual_grad_BxLxD], [scale_D], num_row_outputs=1, num_sums=1
    )
