"""Helpers shared by the modules: spatial rank inference and parameter checks."""

from __future__ import annotations

from collections.abc import Sequence

from jcnn.functional._checks import as_int_tuple, check_array

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


def check_positive_int(value, name: str) -> None:
    """Raise unless ``value`` is a positive Python int."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")


def check_channels_divisible(channels: int, groups: int, what: str) -> None:
    """Raise unless ``groups`` divides ``channels``."""
    check_positive_int(groups, "groups")
    if channels % groups:
        raise ValueError(f"groups: {what} ({channels}) must be divisible by groups ({groups})")
