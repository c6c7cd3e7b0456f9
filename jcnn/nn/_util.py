"""Helpers of the Linen modules: the window and spatial rank from the input, kernel and bias.

What the NNX twins share with them is in ``jcnn.nn._shared``.
"""

from __future__ import annotations

from flax.linen.dtypes import promote_dtype

from jcnn import init
from jcnn.functional._checks import as_int_tuple, check_array, check_bool
from jcnn.nn._shared import LAYOUT, KernelSpec, check_spatial_rank, window_rank


def window_and_check(window, x, name: str) -> tuple[int, ...]:
    """The window as a tuple of ints, with ``x`` checked to be ``(N, *spatial, C)`` of its rank.

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
    return as_int_tuple(window, n, name, minimum=1)


def kernel_and_bias(module, x, spec: KernelSpec):
    """``(x, kernel, bias)`` promoted to the module's dtype; ``bias`` is ``None`` without one.

    ``module`` has ``use_bias``, ``kernel_init``, ``bias_init`` (``None``: the defaults,
    ``spec.default_init`` and zeros), ``dtype`` and ``param_dtype``; ``spec`` gives the shapes.
    """
    check_bool(module.use_bias, "use_bias")
    kernel = module.param(
        "kernel", module.kernel_init or spec.default_init, spec.shape, module.param_dtype
    )
    bias = (
        module.param("bias", module.bias_init or init.zeros, (spec.features,), module.param_dtype)
        if module.use_bias
        else None
    )
    return promote_dtype(x, kernel, bias, dtype=module.dtype)
