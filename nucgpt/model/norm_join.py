"""A sandwich block's sublayer boundary in one pass each way: out-norm, residual add, next pre-norm.

Why: between two sublayers the residual stream does  x' = x + s_out·h·r(h)  and the next sublayer
reads  n = s_next·x'·r(x').  XLA runs that forward as two kernels (the add with the first norm, then
the second norm: x' is written and read back) and the backward as two (`norm_kernel`'s passes for
each norm: the gradient of x' is written and read back): about 0.53 GiB per boundary more than one
pass each way at the 500M preset's batch 8, 12 GiB over the step's 24 boundaries (offline H100
compile). `join` is one Pallas kernel each way:
- forward: reads x and h, writes x' and n;
- backward: reads x', h, the gradient of n and the gradient reaching x' through the residual
  stream; writes dx (= dx') and dh, and keeps float32 partials of both scales' gradients.
The maths are the unjoined norms' (`norm_kernel.row_rsqrt`, `backward_from_rsqrt`), rounded to the
compute dtype where the unjoined path rounds, so the values match it. Off CUDA they run in jnp; under
a mesh, per device (`norm_kernel.on_each_device`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from nucgpt.model import norm_kernel
from nucgpt.model.norm_kernel import Layout, backward_from_rsqrt, parse_layout, row_rsqrt, rows


_FIELD = "model.join_kernel_layout"


def reference_forward(x, h, scale_out_D, scale_next_D, eps):
    """(x + s_out·h·r(h), s_next·x'·r(x')) as the unjoined norms compute them: each norm in float32,
    its output and the residual add in x's dtype. The jnp forward, and what a kernel tile computes."""
    h_f32 = h.astype(jnp.float32)
    h_normed = (h_f32 * row_rsqrt(h_f32, eps) * scale_out_D.astype(jnp.float32)).astype(x.dtype)
    x_next = x + h_normed
    x_next_f32 = x_next.astype(jnp.float32)
    normed = (x_next_f32 * row_rsqrt(x_next_f32, eps) * scale_next_D.astype(jnp.float32)).astype(x.dtype)
    return x_next, normed


def reference_backward(x_next, h, grad_normed, grad_x_next, scale_out_D, scale_next_D, eps):
    """(dx, dh, d(s_out), d(s_next)) — the next norm's backward plus the residual gradient (None: zero)
    gives dx' (= dx, rounded to x's dtype as the unjoined path passes it on), then the out-norm's
    backward of dx'. The jnp backward, and what a kernel tile computes."""
    grad_x, grad_scale_next = backward_from_rsqrt(
        x_next, grad_normed, scale_next_D, row_rsqrt(x_next.astype(jnp.float32), eps), grad_x_next
    )
    grad_h, grad_scale_out = backward_from_rsqrt(h, grad_x, scale_out_D, row_rsqrt(h.astype(jnp.float32), eps))
    return grad_x, grad_h, grad_scale_out, grad_scale_next


def kernel_layout(num_rows: int, d_model: int) -> Layout:
    """The default tiling: `norm_kernel`'s bands, without prefetch (the backward holds four tiles)."""
    return norm_kernel.kernel_layout(num_rows, d_model)._replace(prefetch=False)


def kernel_forward(x_NxD, h_NxD, scale_out_D, scale_next_D, eps, *, interpret=False, layout: Layout | None = None):
    """The forward kernel's (x', n); `interpret` runs it in Pallas' interpreter (any platform)."""

    def work(tile, scales):
        return reference_forward(*tile, *scales, eps), ()

    return norm_kernel.row_kernel_call(
        work, [x_NxD, h_NxD], [scale_out_D, scale_next_D], [x_NxD.dtype, x_NxD.dtype], 0,
        layout=layout, interpret=interpret, name="norm_join_forward", default_layout=kernel_layout, field=_FIELD,
    )


def kernel_backward(x_next_NxD, h_NxD, grad_normed_NxD, grad_x_next_NxD, scale_out_D, scale_next_D, eps, *,
                    interpret=False, layout: Layout | None = None):
    """The backward kernel's (dx, dh, d(s_out), d(s_next)); `grad_x_next` None: zero (the last join,
    whose x' nothing else reads), so it is not read."""

    def work(tile, scales):
        x_next, h, grad_normed, *grad_x_next = tile
        grad_x, grad_h, grad_scale_out, grad_scale_next = reference_backward(
            x_next, h, grad_normed, grad_x_next[0] if grad_x_next else None, *scales, eps
        )
        return (grad_x, grad_h), (grad_scale_out, grad_scale_next)

    row_inputs = [x_next_NxD, h_NxD, grad_normed_NxD] + ([] if grad_x_next_NxD is None else [grad_x_next_NxD])
    grad_x, grad_h, grad_scale_out, grad_scale_next = norm_kernel.row_kernel_call(
        work, row_inputs, [scale_out_D, scale_next_D],
        [x_next_NxD.dtype, h_NxD.dtype], 2, layout=layout, interpret=interpret, name="norm_join_backward",
        default_layout=kernel_layout, field=_FIELD,
    )
    return grad_x, grad_h, grad_scale_out.astype(scale_out_D.dtype), grad_scale_next.astype(scale_next_D.dtype)


# What runs where the platform is not CUDA (tests swap in the kernels, interpreted).
off_cuda_forward = reference_forward
off_cuda_backward = reference_backward


def _forward(x_BxLxD, h_BxLxD, scale_out_D, scale_next_D, eps, layout):
    def local(x_BxLxD, h_BxLxD, scale_out_D, scale_next_D):
        outputs = norm_kernel.on_this_platform(
            lambda *a: kernel_forward(*a, eps=eps, layout=parse_layout(layout, _FIELD)),
            lambda *a: off_cuda_forward(*a, eps=eps),
            lambda *a: reference_forward(*a, eps=eps),
            rows(x_BxLxD), rows(h_BxLxD), scale_out_D, scale_next_D,
        )
        return tuple(o.reshape(x_BxLxD.shape) for o in outputs)

    return norm_kernel.on_each_device(
        local, functools.partial(reference_forward, eps=eps), [x_BxLxD, h_BxLxD], [scale_out_D, scale_next_D],
        num_row_outputs=2, num_sums=0,
    )


def _backward(x_next_BxLxD, h_BxLxD, grad_normed_BxLxD, grad_x_next_BxLxD, scale_out_D, scale_next_D, eps, layout):
    def local(x_next_BxLxD, h_BxLxD, grad_normed_BxLxD, grad_x_next_BxLxD, scale_out_D, scale_next_D):
        grad_x, grad_h, grad_scale_out, grad_scale_next = norm_kernel.on_this_platform(
            lambda *a: kernel_backward(*a, eps=eps, layout=parse_layout(layout, _FIELD)),
            lambda *a: off_cuda_backward(*a, eps=eps),
            lambda *a: reference_backward(*a, eps=eps),
            rows(x_next_BxLxD), rows(h_BxLxD), rows(grad_normed_BxLxD),
            None if grad_x_next_BxLxD is None else rows(grad_x_next_BxLxD), scale_out_D, scale_next_D,
        )
        shape = x_next_BxLxD.shape
        return grad_x.reshape(shape), grad_h.reshape(shape), grad_scale_out, grad_scale_next

    return norm_kernel.on_each_device(
        local, functools.partial(reference_backward, eps=eps),
        [x_next_BxLxD, h_BxLxD, grad_normed_BxLxD, grad_x_next_BxLxD], [scale_out_D, scale_next_D],
        num_row_outputs=2, num_sums=2,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def join(x_BxLxD, h_BxLxD, scale_out_D, scale_next_D, eps: float, layout: str = "auto"):
    """(x + RMSNorm_out(h), RMSNorm_next(that)): the residual stream after a sandwich sublayer and the
    next sublayer's normed input. `layout`: the kernels' tiling (model.join_kernel_layout)."""
    return _forward(x_BxLxD, h_BxLxD, scale_out_D, scale_next_D, eps, layout)


def _join_forward(x_BxLxD, h_BxLxD, scale_out_D, scale_next_D, eps, layout):
    # symbolic zeros: the arguments come wrapped (CustomVJPPrimal), and a cotangent nothing produced
    # comes as a SymbolicZero, so the last join's backward neither writes nor reads zeros for x'
    x_BxLxD, h_BxLxD, scale_out_D, scale_next_D = (a.value for a in (x_BxLxD, h_BxLxD, scale_out_D, scale_next_D))
    x_next, normed = _forward(x_BxLxD, h_BxLxD, scale_out_D, scale_next_D, eps, layout)
    return (x_next, normed), (x_next, h_BxLxD, scale_out_D, scale_next_D)


def _join_backward(eps, layout, saved, grads):
    x_next, h_BxLxD, scale_out_D, scale_next_D = saved
    grad_x_next, grad_normed = grads
    if isinstance(grad_normed, SymbolicZero):
        grad_normed = jnp.zeros_like(x_next)
    grad_x_next = None if isinstance(grad_x_next, SymbolicZero) else grad_x_next.astype(x_next.dtype)
    return _backward(x_next, h_BxLxD, grad_normed.astype(x_next.dtype), grad_x_next, scale_out_D, scale_next_D, eps, layout)


join.defvjp(_join_forward, _join_backward, symbolic_zeros=True)
