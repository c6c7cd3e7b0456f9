"""Batch norm's per-channel reductions through jcnn's native library on CPU
(``jcnn/native/channel_moments.cc``), for :mod:`jcnn.functional.norm`.

Arrays are ``(*outer, *rows, C)``: the reductions run over the row axes, from ``first_axis`` to
the channels (batch norm: ``first_axis=0``; instance norm: 1); per-channel arrays keep those axes
as unit dims. ``mean`` and ``mean_residual`` are the float32 mean and what it misses of the exact
one, so that ``(x - mean) - mean_residual`` is ``x`` centered to float32 rounding.

Batch norm's derivative has two reductions, ``sum(t * (x - mean))`` and ``sum(t)``, of its
tangent (forward mode) or, transposed, of its cotangent (reverse mode): the second arises as the
transpose of broadcasting per-channel terms back over ``x``. Both directions are primitives here,
each the other's transpose: ``centered_sums(t, x, mean, mean_residual)`` (one pass through the
native library on CPU, float64 sums) and ``centered_affine(a, b, x, mean, mean_residual) =
(x - mean - mean_residual) * a + b`` (elementwise, fused by XLA), linear in ``t`` and in
``(a, b)`` respectively. Their JVPs in ``x`` and the mean are written out, so derivatives of any
order and ``vmap`` (a mapped axis becomes one more outer axis) work as for XLA's reductions.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["centered_affine", "centered_sums", "moments_on_cpu"]


def _row_axes(ndim: int, first_axis: int) -> tuple[int, ...]:
    return tuple(range(first_axis, ndim - 1))


def _kept(shape, first_axis: int) -> tuple[int, ...]:
    return (*shape[:first_axis], shape[-1])


def _keepdims(shape, first_axis: int) -> tuple[int, ...]:
    return (*shape[:first_axis], *(1,) * (len(shape) - 1 - first_axis), shape[-1])


def moments_on_cpu(x, first_axis: int):
    """``(mean, mean_residual, var)`` of float32 ``x`` (keepdims), in one pass on CPU."""
    out = jax.ShapeDtypeStruct(_kept(x.shape, first_axis), jnp.float32)
    call = jax.ffi.ffi_call("jcnn_channel_moments", (out,) * 3, vmap_method="expand_dims")
    return tuple(m.reshape(_keepdims(x.shape, first_axis)) for m in call(x))


def centered_sums(t, x, mean, mean_residual, *, first_axis: int):
    """``(sum(t * (x - mean - mean_residual)), sum(t))`` over the row axes, keepdims."""
    return tuple(_CENTERED_SUMS.bind(t, x, mean, mean_residual, first_axis=first_axis))


def centered_affine(a, b, x, mean, mean_residual, *, first_axis: int):
    """``(x - mean - mean_residual) * a + b``, ``a`` and ``b`` per channel (keepdims)."""
    return _CENTERED_AFFINE.bind(a, b, x, mean, mean_residual, first_axis=first_axis)


def _centered(x, mean, mean_residual):
    return (x - mean) - mean_residual


def _sums_formula(t, x, mean, mean_residual, *, first_axis):
    axes = _row_axes(t.ndim, first_axis)
    centered = jnp.sum(t * _centered(x, mean, mean_residual), axis=axes, keepdims=True)
    return [centered, jnp.sum(t, axis=axes, keepdims=True)]


def _sums_on_cpu(t, x, mean, mean_residual, *, first_axis):
    """The native kernel, on operands broadcast to one shape (``vmap`` may leave any of them
    with a unit axis where it is not mapped: ``t`` too, e.g. a zero tangent when only the scale
    is differentiated per example)."""
    shape = jnp.broadcast_shapes(t.shape, x.shape)
    t, x = jnp.broadcast_to(t, shape), jnp.broadcast_to(x, shape)
    kept = _kept(shape, first_axis)
    mean, mean_residual = (
        jnp.broadcast_to(s, _keepdims(shape, first_axis)).reshape(kept)
        for s in (mean, mean_residual)
    )
    out = jax.ShapeDtypeStruct(kept, jnp.float32)
    sums = jax.ffi.ffi_call("jcnn_centered_sums", (out, out))(t, x, mean, mean_residual)
    return [s.reshape(_keepdims(shape, first_axis)) for s in sums]


def _affine_formula(a, b, x, mean, mean_residual, *, first_axis):
    return _centered(x, mean, mean_residual) * a + b


def _sum_to(value, shape):
    """``value`` summed over the axes along which ``shape`` (same rank) has size 1."""
    axes = tuple(
        i for i, (have, want) in enumerate(zip(value.shape, shape, strict=True)) if have != want
    )
    return jnp.sum(value, axis=axes, keepdims=True) if axes else value


def _shape(operand):
    return operand.aval.shape if ad.is_undefined_primal(operand) else operand.shape


def _instantiate(tangent, like):
    return jnp.zeros(_shape(like), jnp.float32) if type(tangent) is ad.Zero else tangent


def _sums_abstract(t, x, mean, mean_residual, *, first_axis):
    shape = _keepdims(jnp.broadcast_shapes(t.shape, x.shape), first_axis)
    return [ShapedArray(shape, jnp.float32)] * 2


def _affine_abstract(a, b, x, mean, mean_residual, *, first_axis):
    shape = jnp.broadcast_shapes(a.shape, b.shape, x.shape, mean.shape, mean_residual.shape)
    return ShapedArray(shape, jnp.float32)


def _sums_transpose(cts, t, x, mean, mean_residual, *, first_axis):
    ct_centered, ct_plain = (_instantiate(ct, mean) for ct in cts)
    t_ct = centered_affine(ct_centered, ct_plain, x, mean, mean_residual, first_axis=first_axis)
    return [_sum_to(t_ct, _shape(t)), None, None, None]


def _affine_transpose(ct, a, b, x, mean, mean_residual, *, first_axis):
    ct = _instantiate(ct, x)
    sum_centered, sum_plain = centered_sums(ct, x, mean, mean_residual, first_axis=first_axis)
    a_ct = _sum_to(sum_centered, _shape(a)) if ad.is_undefined_primal(a) else None
    b_ct = _sum_to(sum_plain, _shape(b)) if ad.is_undefined_primal(b) else None
    return [a_ct, b_ct, None, None, None]


def _sums_jvp(primals, tangents, *, first_axis):
    t, x, mean, mean_residual = primals
    dt, dx, dmean, dresidual = (_instantiate(d, p) for d, p in zip(tangents, primals, strict=True))
    out = centered_sums(t, x, mean, mean_residual, first_axis=first_axis)
    linear = centered_sums(dt, x, mean, mean_residual, first_axis=first_axis)
    axes = _row_axes(t.ndim, first_axis)
    moved = jnp.sum(t * _centered(dx, dmean, dresidual), axis=axes, keepdims=True)
    return out, [linear[0] + moved, linear[1]]


def _affine_jvp(primals, tangents, *, first_axis):
    a, b, x, mean, mean_residual = primals
    da, db, dx, dmean, dresidual = (
        _instantiate(d, p) for d, p in zip(tangents, primals, strict=True)
    )
    out = centered_affine(a, b, x, mean, mean_residual, first_axis=first_axis)
    linear = centered_affine(da, db, x, mean, mean_residual, first_axis=first_axis)
    return out, linear + _centered(dx, dmean, dresidual) * a


def _batch(primitive, operands, axes, *, first_axis):
    """The mapped axis in front of every operand (a unit axis where unmapped): one more outer
    axis."""
    moved = [
        jnp.expand_dims(operand, 0) if axis is None else jnp.moveaxis(operand, axis, 0)
        for operand, axis in zip(operands, axes, strict=True)
    ]
    out = primitive.bind(*moved, first_axis=first_axis + 1)
    return out, [0] * len(out) if primitive.multiple_results else 0


def _primitive(name, abstract, formula, jvp, transpose, *, on_cpu=None, multiple_results=False):
    primitive = Primitive(name)
    primitive.multiple_results = multiple_results
    primitive.def_abstract_eval(abstract)
    primitive.def_impl(functools.partial(_evaluate, formula, on_cpu or formula))  # outside jit
    mlir.register_lowering(primitive, mlir.lower_fun(formula, multiple_results))
    if on_cpu is not None:
        mlir.register_lowering(primitive, mlir.lower_fun(on_cpu, multiple_results), platform="cpu")
    ad.primitive_jvps[primitive] = jvp
    ad.primitive_transposes[primitive] = transpose
    batching.primitive_batchers[primitive] = functools.partial(_batch, primitive)
    return primitive


def _evaluate(formula, on_cpu, *operands, **params):
    operands = [jnp.asarray(operand) for operand in operands]
    platforms = {device.platform for operand in operands for device in operand.devices()}
    return (on_cpu if platforms == {"cpu"} else formula)(*operands, **params)


_CENTERED_SUMS = _primitive(
    "jcnn_centered_sums",
    _sums_abstract,
    _sums_formula,
    _sums_jvp,
    _sums_transpose,
    on_cpu=_sums_on_cpu,
    multiple_results=True,
)
_CENTERED_AFFINE = _primitive(
    "jcnn_centered_affine", _affine_abstract, _affine_formula, _affine_jvp, _affine_transpose
)
