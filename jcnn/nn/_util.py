"""Helpers of the Linen modules: the window and spatial rank from the input, kernel and bias.

What the NNX twins share with them is in ``jcnn.nn._shared``.
"""

from __future__ import annotations

from flax.linen.dtypes import promote_dtype

from jcnn import init
from jcnn.functional._checks import as_int_tuple, check_array, check_bool, check_dtype
from jcnn.nn._shared import (
    LAYOUT,
    KernelSpec,
    check_initializer,
    check_spatial_rank,
    window_rank,
)


def window_and_check(window, x, name: str) -> tuple[int, ...]:
    """The window as a tuple of ints, with ``x`` checked to be ``(N, *spatial, C)`` of its rank,
    ``C >= 1`` (a kernel over no input channels cannot be built).

    An int window takes its spatial rank from ``x`` (rank 3, 4 or 5); a sequence fixes it.
    """
    check_array(x, "x")
    n = window_rank(window, name)
    if n is not None:
        check_spatial_rank(x, n, name)
    else:
        n = x.ndim - 2
        if n not in LAYOUT:
            raise ValueError(
                f"x: expected rank 3, 4 or 5 (N, *spatial, C), got rank {x.ndim} "
                f"with shape {tuple(x.shape)}"
            )
    if x.shape[-1] < 1:
        raise ValueError(
            f"x: expected at least one channel on the last axis, got shape {tuple(x.shape)}"
        )
    return as_int_tuple(window, n, name, minimum=1)


def param(module, name: str, initializer, shape: tuple[int, ...], dtype, x):
    """``module.param(name, initializer, shape, dtype)``, with a ValueError naming ``x`` when the
    given variables hold ``name`` with another shape (built for an input of another size or
    channel count), instead of Flax's ``ScopeParamShapeError``. ``dtype`` is the module's
    ``param_dtype``, checked by that name."""
    check_dtype(dtype, "param_dtype")
    shape = tuple(shape)
    if module.has_variable("params", name):
        held = tuple(module.get_variable("params", name).shape)
        if held != shape:
            where = "/".join(module.scope.path) or type(module).__name__
            raise ValueError(
                f"x: shape {tuple(x.shape)} does not fit {where} ({type(module).__name__}): its "
                f"{name} has shape {held}, but this x needs {shape} (the variables were built "
                "for an input of another size or channel count)"
            )
    return module.param(name, initializer, shape, dtype)


def kernel_and_bias(module, x, spec: KernelSpec):
    """``(x, kernel, bias)`` promoted to the module's dtype; ``bias`` is ``None`` without one.

    ``module`` has ``use_bias``, ``kernel_init``, ``bias_init`` (``None``: the defaults,
    ``spec.default_init`` and zeros), ``dtype`` and ``param_dtype``; ``spec`` gives the shapes.
    """
    check_bool(module.use_bias, "use_bias")
    kernel_init = check_initializer(module.kernel_init, "kernel_init", spec.default_init)
    bias_init = check_initializer(module.bias_init, "bias_init", init.zeros)
    kernel = param(module, "kernel", kernel_init, spec.shape, module.param_dtype, x)
    bias = (
        param(module, "bias", bias_init, (spec.features,), module.param_dtype, x)
        if module.use_bias
        else None
    )
    return promote_dtype(x, kernel, bias, dtype=check_dtype(module.dtype))
