"""Checks of the zoo's hyperparameters, run when a model is called: each error names the model's
own attribute (``num_classes``, ``bn_momentum``, ``widths``) and the value given, not the
argument of the layer it would have been passed on to."""

from __future__ import annotations

from collections.abc import Sequence

from jcnn.functional._checks import check_int, check_real


def check_num_classes(value) -> int:
    value = check_int(value, "num_classes", low=1)
    if value >= 2**63:  # as a shape, a TypeError from deep inside JAX that names nothing
        raise ValueError(f"num_classes: expected an int >= 1 below 2**63, got {value}")
    return value


def check_bn_momentum(value) -> float:
    return check_real(value, "bn_momentum", low=0, high=1)


def check_dropout_rate(value) -> float:
    return check_real(value, "dropout_rate", low=0, high=1)


def check_per_stage(value, name: str, *, length: int | None = None) -> tuple[int, ...]:
    """``value`` as a tuple of positive ints, one per stage: a non-empty list or tuple, of
    ``length`` entries where given.

    >>> check_per_stage((16, 0), "widths")
    Traceback (most recent call last):
    ...
    ValueError: widths[1]: expected an int >= 1, got 0
    """
    expected = f"{length} positive ints" if length is not None else "positive ints, one per stage"
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise TypeError(f"{name}: expected a list or tuple of {expected}, got {value!r}")
    if not value or (length is not None and len(value) != length):
        raise ValueError(f"{name}: expected {expected}, got {tuple(value)!r}")
    return tuple(check_int(entry, f"{name}[{index}]", low=1) for index, entry in enumerate(value))


def check_image_size(x, reductions: Sequence[tuple[int, int, int]], model: str) -> None:
    """Raise a ``ValueError`` naming ``x`` where its height or width is below the smallest size
    that ``reductions``, the ``(window, stride, padding)`` of the layers shrinking the map in
    order, take to at least one pixel (a layer deep inside would otherwise fail on an empty map).

    >>> import numpy as np
    >>> check_image_size(np.zeros((1, 16, 16, 3)), [(2, 2, 0)] * 5, "VGG")
    Traceback (most recent call last):
    ...
    ValueError: x: VGG expects images of at least 32x32 pixels, got shape (1, 16, 16, 3)
    """
    needed = 1
    for window, stride, padding in reversed(reductions):
        needed = max(1, (needed - 1) * stride + window - 2 * padding)
    if min(x.shape[1:3]) < needed:
        raise ValueError(
            f"x: {model} expects images of at least {needed}x{needed} pixels, got shape "
            f"{tuple(x.shape)}"
        )


def check_not_empty(x, model: str) -> None:
    """Raise a ``ValueError`` naming ``x`` when a spatial size or the channel count is 0 (the
    first layer would otherwise blame its own kernel or window).

    >>> import numpy as np
    >>> check_not_empty(np.zeros((2, 8, 8, 0)), "UNet")
    Traceback (most recent call last):
    ...
    ValueError: x: UNet expects at least one pixel and one channel, got shape (2, 8, 8, 0)
    """
    if min(x.shape[1:]) < 1:
        raise ValueError(
            f"x: {model} expects at least one pixel and one channel, got shape {tuple(x.shape)}"
        )
