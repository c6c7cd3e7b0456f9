"""Helpers shared by the modules: spatial rank inference, parameter checks, kernel and bias."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from flax.linen.dtypes import promote_dtype

from jcnn import init
from jcnn.functional._checks import as_int_tuple, check_array, check_bool, check_positive_int

Initializer = Callable[..., Any]

_LAYOUT = {1: "(N, L, C)", 2: "(N, H, W, C)", 3: "(N, D, H, W, C)"}


def window_and_check(window, x, name: str) -> tuple[int, ...]:
    """The window as a tuple of ints, with ``x`` checked to be ``(N, *spatial, C)`` of its rank.

    An int window takes its spatial rank from ``x`` (rank 3, 4 or 5); a sequence fixes it.
    """
    check_array(x, "x")
    if isinstance(window, Sequence) and not isinstance(window, str):
        n = len(window)
        if n not in _LAYOUT:
            raise ValueError(f"{name}: expected 1, 2 or 3 spatial sizes, got {window!r}")
        if x.ndim != n + 2:
            raise ValueError(
                f"x: expected rank {n + 2} {_LAYOUT[n]} for a {n}-D {name}, got rank {x.ndim} "
                f"with shape {tuple(x.shape)}"
            )
    else:
        n = x.ndim - 2
        if n not in _LAYOUT:
            raise ValueError(
                f"x: expected rank 3, 4 or 5 (N, *spatial, C), got rank {x.ndim} "
                f"with shape {tuple(x.shape)}"
            )
    return as_int_tuple(window, n, name, minimum=1)


def check_channels_divisible(channels: int, groups: int, what: str) -> None:
    """Raise unless ``groups`` divides ``channels``."""
    check_positive_int(groups, "groups")
    if channels % groups:
        raise ValueError(f"groups: {what} ({channels}) must be divisible by groups ({groups})")


def kernel_and_bias(
    module,
    x,
    kernel_shape: tuple[int, ...],
    default_kernel_init: Initializer,
    *,
    features: int | None = None,
):
    """``(x, kernel, bias)`` promoted to the module's dtype; ``bias`` is ``None`` without one.

    ``module`` has ``use_bias``, ``kernel_init``, ``bias_init`` (``None``: the defaults,
    ``default_kernel_init`` and zeros), ``dtype``, ``param_dtype`` and ``features`` (the bias
    size), unless ``features`` is given.
    """
    check_bool(module.use_bias, "use_bias")
    kernel = module.param(
        "kernel", module.kernel_init or default_kernel_init, kernel_shape, module.param_dtype
    )
    bias = (
        module.param(
            "bias",
            module.bias_init or init.zeros,
            (module.features if features is None else features,),
            module.param_dtype,
        )
        if module.use_bias
        else None
    )
    return promote_dtype(x, kernel, bias, dtype=module.dtype)
