"""The three products of a convolution as JAX primitives, for the CPU backends whose products are
not XLA's own convolution (:mod:`jcnn.functional._conv_cpu`, :mod:`jcnn.functional._conv_onednn`).

A convolution ``y = conv(x, w)`` is bilinear, and so are its two gradients; each product's
transpose in one operand is another of the three:

* ``forward(x, w) -> y``: ``x_ct = input_grad(y_ct, w)``, ``w_ct = weight_grad(x, y_ct)``;
* ``input_grad(dy, w) -> dx``: ``dy_ct = forward(dx_ct, w)``, ``w_ct = weight_grad(dx_ct, dy)``;
* ``weight_grad(x, dy) -> dw``: ``x_ct = input_grad(dy, dw_ct)``, ``dy_ct = forward(x, dw_ct)``.

Registered as bilinear primitives with these transposes, a backend's products serve forward mode
(``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``, ``jax.linearize``) as well as reverse mode, to any
order, all on the backend's kernels. (A ``jax.custom_vjp`` serves reverse mode only.)

Under ``jax.vmap`` both operands carry the same number of extra leading axes, of size 1 where an
operand is not mapped, and the output's leading axes are their broadcast: the convention of an
FFI call with ``vmap_method="expand_dims"``, which the oneDNN products receive unchanged. A
transpose sums the axes along which its target was not mapped; a weight gradient summed that way
becomes one product over the concatenated batch.
"""

from __future__ import annotations

import contextvars
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

__all__ = ["ConvProducts", "conv_products", "problems"]

# impl(first, second, config, shape) for operands without leading axes; ``shape`` is the output's.
Product = Callable[..., jax.Array]

_PROBLEMS = contextvars.ContextVar("jcnn_conv_problems", default=1)


def problems() -> int:
    """How many convolutions the product an implementation is tracing maps over: 1 for one
    (a weight gradient summed over a vmapped batch included), the number of examples for
    per-example products. Implementations read it where their fastest kernel differs."""
    return _PROBLEMS.get()


class ConvProducts(NamedTuple):
    """One backend's ``forward(x, w)``, ``input_grad(dy, w)`` and ``weight_grad(x, dy)``, each
    called as ``product(first, second, config, shape)`` with ``shape`` the output's shape."""

    forward: Callable[..., jax.Array]
    input_grad: Callable[..., jax.Array]
    weight_grad: Callable[..., jax.Array]


def conv_products(
    name: str,
    forward: Product,
    input_grad: Product,
    weight_grad: Product,
    platform: str | None = None,
) -> ConvProducts:
    """Register ``name``'s three products as primitives lowered by the given implementations
    (on ``platform`` only, if given), with their transposes, ``vmap`` and eager evaluation.

    Each implementation takes ``(first, second, config, shape)`` for unmapped operands, ``config``
    a hashable options tuple with a ``stride`` field (its length is the spatial rank).
    """
    kinds = ("forward", "input_grad", "weight_grad")
    primitives = {kind: Primitive(f"{name}_{kind}") for kind in kinds}
    for kind, impl in zip(kinds, (forward, input_grad, weight_grad), strict=True):
        primitive = primitives[kind]
        primitive.def_abstract_eval(_abstract_eval)
        evaluate = functools.partial(_over_leading_axes, impl)
        primitive.def_impl(evaluate)  # op by op, as outside jit (and under jax.disable_jit)
        mlir.register_lowering(primitive, mlir.lower_fun(evaluate, False), platform=platform)
        batching.primitive_batchers[primitive] = functools.partial(_batch, primitive)

    def bind(kind):
        def product(first, second, config, shape):
            return primitives[kind].bind(first, second, config=config, shape=tuple(shape))

        return product

    products = ConvProducts(*(bind(kind) for kind in kinds))

    # ad.defbilinear calls rule(cotangent, first, second, **params) for each operand, the one
    # being transposed a placeholder with an ``aval``.
    ad.defbilinear(
        primitives["forward"],
        lambda ct, x, w, *, config, shape: _sum_to(
            products.input_grad(ct, w, config, _base(x, config)), _shape(x)
        ),
        lambda ct, x, w, *, config, shape: _weight_grad_to(products, x, ct, config, _shape(w)),
    )
    ad.defbilinear(
        primitives["input_grad"],
        lambda ct, dy, w, *, config, shape: _sum_to(
            products.forward(ct, w, config, _base(dy, config)), _shape(dy)
        ),
        lambda ct, dy, w, *, config, shape: _weight_grad_to(products, ct, dy, config, _shape(w)),
    )
    ad.defbilinear(
        primitives["weight_grad"],
        lambda ct, x, dy, *, config, shape: _sum_to(
            products.input_grad(dy, ct, config, _base(x, config)), _shape(x)
        ),
        lambda ct, x, dy, *, config, shape: _sum_to(
            products.forward(x, ct, config, _base(dy, config)), _shape(dy)
        ),
    )
    return products


def _shape(operand) -> tuple[int, ...]:
    """An operand's shape, or that of the placeholder JAX passes for the one being transposed."""
    if isinstance(operand, (jax.Array, np.ndarray)):
        return tuple(operand.shape)
    return tuple(operand.aval.shape)


def _leading(ndim: int, config) -> int:
    return ndim - len(config.stride) - 2


def _base(operand, config) -> tuple[int, ...]:
    shape = _shape(operand)
    return shape[_leading(len(shape), config) :]


def _abstract_eval(first, second, *, config, shape):
    lead = np.broadcast_shapes(
        first.shape[: _leading(first.ndim, config)], second.shape[: _leading(second.ndim, config)]
    )
    return ShapedArray((*lead, *shape), first.dtype)


def _batch(primitive, operands, axes, *, config, shape):
    """Move the mapped axis to the front; an unmapped operand gets a size-1 axis there."""
    moved = [
        jnp.expand_dims(operand, 0) if axis is None else jnp.moveaxis(operand, axis, 0)
        for operand, axis in zip(operands, axes, strict=True)
    ]
    return primitive.bind(*moved, config=config, shape=shape), 0


def _over_leading_axes(impl, first, second, *, config, shape):
    """``impl`` mapped over the leading axes, a size-1 axis against a longer one unmapped."""
    lead = _leading(first.ndim, config)
    if lead == 0:
        return impl(first, second, config, shape)
    mapped = np.broadcast_shapes(first.shape[:lead], second.shape[:lead])
    if 0 in mapped:  # a vmap over no element: no problem to run (nor to index into)
        return jnp.zeros((*mapped, *shape), first.dtype)
    size = mapped[0]
    axes = tuple(0 if operand.shape[0] == size else None for operand in (first, second))
    first, second = (
        operand if axis == 0 else operand[0]
        for operand, axis in zip((first, second), axes, strict=True)
    )
    inner = functools.partial(_over_leading_axes, impl, config=config, shape=shape)
    token = _PROBLEMS.set(_PROBLEMS.get() * size)
    try:
        return jax.vmap(inner, in_axes=axes)(first, second)
    finally:
        _PROBLEMS.reset(token)


def _sum_to(result, shape):
    """Sum ``result``'s leading axes to ``shape``'s (size 1 where the target was not mapped)."""
    axes = tuple(
        axis
        for axis, (have, want) in enumerate(zip(result.shape, shape, strict=True))
        if have != want
    )
    return jnp.sum(result, axis=axes, keepdims=True) if axes else result


def _weight_grad_to(products, x, dy, config, w_shape):
    """The weight gradient summed to the kernel's leading axes: an axis along which only one of
    ``x``, ``dy`` is mapped is summed in that operand first (the product is linear in each), and
    when the kernel is mapped along no axis the rest fold into the batch, one product in all."""
    lead = _leading(len(w_shape), config)
    for axis in range(lead):
        if w_shape[axis] == 1 and (x.shape[axis] == 1) != (dy.shape[axis] == 1):
            x, dy = (
                v if v.shape[axis] == 1 else jnp.sum(v, axis=axis, keepdims=True) for v in (x, dy)
            )
    if lead and all(size == 1 for size in w_shape[:lead]):
        fold = math.prod(x.shape[: lead + 1])
        x, dy = (v.reshape((1,) * lead + (fold, *v.shape[lead + 1 :])) for v in (x, dy))
    w_base = w_shape[lead:]
    return _sum_to(products.weight_grad(x, dy, config, w_base), w_shape)
