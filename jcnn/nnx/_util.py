"""Helpers shared by the NNX modules: argument checks, parameter creation, train/eval resolution."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from flax import nnx

from jcnn.functional._checks import as_int_tuple, check_array, check_positive_int

Initializer = Callable[..., Any]

LAYOUT = {1: "(N, L, C)", 2: "(N, H, W, C)", 3: "(N, D, H, W, C)"}


def check_rngs(rngs, owner: str) -> nnx.Rngs:
    """``rngs`` if it is an ``nnx.Rngs``; a TypeError naming ``owner`` otherwise."""
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(
            f"rngs: {owner} creates parameters and needs an nnx.Rngs (e.g. rngs=nnx.Rngs(0)), "
            f"got {type(rngs).__name__}"
        )
    return rngs


def param(rngs: nnx.Rngs, initializer: Initializer, shape: tuple[int, ...], dtype) -> nnx.Param:
    """A parameter drawn by ``initializer(key, shape, dtype)`` with a key of the params stream."""
    return nnx.Param(initializer(rngs.params(), shape, dtype))


def spatial_window(kernel_size, spatial_dims: int | None, owner: str) -> tuple[int, ...]:
    """The kernel window as a tuple of ints.

    A sequence fixes the spatial rank; an int needs ``spatial_dims`` (default 2, images), since an
    NNX module creates its kernel before it sees an input.
    """
    if spatial_dims is not None and spatial_dims not in LAYOUT:
        raise ValueError(f"spatial_dims: expected 1, 2 or 3, got {spatial_dims!r}")
    if isinstance(kernel_size, Sequence) and not isinstance(kernel_size, str):
        n = len(kernel_size)
        if n not in LAYOUT:
            raise ValueError(f"kernel_size: expected 1, 2 or 3 spatial sizes, got {kernel_size!r}")
        if spatial_dims is not None and spatial_dims != n:
            raise ValueError(
                f"spatial_dims: {spatial_dims} disagrees with kernel_size {kernel_size!r} "
                f"({n} spatial sizes) of {owner}"
            )
    else:
        n = 2 if spatial_dims is None else spatial_dims
    return as_int_tuple(kernel_size, n, "kernel_size", minimum=1)


def check_input(x, spatial_rank: int | None, channels: int, owner: str) -> None:
    """Raise unless ``x`` is ``(N, *spatial, channels)`` with ``spatial_rank`` spatial axes
    (``None``: any rank >= 1 of the form ``(..., channels)``)."""
    check_array(x, "x")
    if spatial_rank is not None and x.ndim != spatial_rank + 2:
        raise ValueError(
            f"x: expected rank {spatial_rank + 2} {LAYOUT[spatial_rank]} for a {spatial_rank}-D "
            f"{owner}, got rank {x.ndim} with shape {tuple(x.shape)}"
        )
    if x.ndim < 1:
        raise ValueError(f"x: expected rank >= 1 (..., {channels}) for {owner}, got a scalar")
    if x.shape[-1] != channels:
        raise ValueError(
            f"x: {owner} was built for {channels} features on the last axis, got shape "
            f"{tuple(x.shape)}"
        )


def check_divisible(channels: int, groups: int, what: str) -> None:
    """Raise unless ``groups`` divides ``channels``."""
    check_positive_int(groups, "groups")
    if channels % groups:
        raise ValueError(f"groups: {what} ({channels}) must be divisible by groups ({groups})")


def check_flag(value, name: str) -> None:
    """Raise unless ``value`` is a bool (``None`` passes: the attribute decides).

    A traced array is refused too: train and evaluation are different programs, chosen in Python.
    """
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True, False or None, got {value!r}")


def training(train: bool | None, attribute_says_train: bool) -> bool:
    """Whether this call trains: ``train`` when given, else the module's attribute."""
    check_flag(train, "train")
    return bool(attribute_says_train if train is None else train)


def value(variable):
    """The array of ``variable`` (``None`` stays ``None``)."""
    return None if variable is None else variable[...]
