"""Test-time augmentation: predictions averaged over transformed views of each image.

``flip_translate_views`` gives the views airbench94 evaluates with (the image shifted by a pixel
with reflect padding or not, and the mirror of each); ``tta_logits`` averages a prediction
function's outputs over any list of views; ``with_tta`` makes a model's ``apply`` do so in
evaluation, so that ``jcnn.train.evaluate`` (and its loss and metrics) report the TTA accuracy:
``evaluate(state.replace(apply_fn=with_tta(state.apply_fn, views)), test_loader)``.

>>> images = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
>>> views = flip_translate_views(shifts=((0, 0),))
>>> len(views)
2
>>> predict = lambda x: x.mean(axis=(1, 2))          # invariant to a mirror
>>> bool(jnp.allclose(tta_logits(predict, images, views), predict(images)))
True
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence, Set

import jax
import jax.numpy as jnp

from jcnn.functional._checks import (
    _describe,
    check_bool,
    check_choice,
    check_real,
    float32_or_wider,
    is_int,
)

__all__ = ["tta_logits", "flip_translate_views", "translate_batch", "with_tta"]

View = Callable[[jax.Array], jax.Array]


def translate_batch(
    images: jax.Array, shift_y: int, shift_x: int, *, pad_mode: str = "reflect"
) -> jax.Array:
    """``images`` ``(N, H, W, C)`` shifted by whole pixels (content moves down/right for positive
    shifts), the uncovered border filled by ``pad_mode`` (``"reflect"``, ``"edge"`` or ``"zeros"``).

    ``images`` may be floating or ``uint8`` (raw pixels), as for ``jcnn.data.augment``'s ops.
    """
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise TypeError(f"images: expected an array, got {type(images).__name__}")
    if not (jnp.issubdtype(images.dtype, jnp.floating) or images.dtype == jnp.uint8):
        raise TypeError(f"images: expected a floating or uint8 array, got dtype {images.dtype}")
    if images.ndim != 4:
        raise ValueError(
            f"images: expected rank 4, got rank {images.ndim} with shape {tuple(images.shape)}"
        )
    _check_pad_mode(pad_mode)
    height, width = images.shape[1:3]
    for name, shift, size in (("shift_y", shift_y, height), ("shift_x", shift_x, width)):
        if not is_int(shift) or abs(shift) >= size:
            raise ValueError(f"{name}: expected an int with |{name}| < {size}, got {shift!r}")
    shift_y, shift_x = int(shift_y), int(shift_x)
    py, px = abs(shift_y), abs(shift_x)
    padded = jnp.pad(images, ((0, 0), (py, py), (px, px), (0, 0)), mode=_PAD_MODES[pad_mode])
    top, left = py - shift_y, px - shift_x
    return padded[:, top : top + height, left : left + width, :]


_PAD_MODES = {"reflect": "reflect", "edge": "edge", "zeros": "constant"}


def _check_pad_mode(pad_mode) -> None:
    check_choice(pad_mode, "pad_mode", tuple(_PAD_MODES))


def flip_translate_views(
    shifts: Sequence[tuple[int, int]] = ((0, 0), (-1, -1), (1, 1)),
    *,
    flip: bool = True,
    pad_mode: str = "reflect",
) -> list[View]:
    """Views ``{identity, horizontal mirror} x shifts`` (6 with the defaults, as airbench94).

    A mirrored view is the mirror of the shifted image, as airbench94 mirrors its translated
    batches: ``flip(translate(x, dy, dx))``, which is ``translate(flip(x), dy, -dx)``.
    """
    if isinstance(shifts, (str, bytes)) or not hasattr(shifts, "__iter__"):
        raise TypeError(f"shifts: expected a sequence of (shift_y, shift_x) pairs, got {shifts!r}")
    shifts = tuple(shifts)
    if not shifts:
        raise ValueError("shifts: expected at least one (shift_y, shift_x) pair, got none")
    for i, pair in enumerate(shifts):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and all(map(is_int, pair))):
            raise ValueError(
                f"shifts[{i}]: expected a pair of ints (shift_y, shift_x), got {pair!r}"
            )
    _check_pad_mode(pad_mode)
    flip = check_bool(flip, "flip")
    views = []
    for mirror in (False, True) if flip else (False,):
        for shift_y, shift_x in shifts:

            def view(images, mirror=mirror, shift_y=shift_y, shift_x=shift_x):
                if shift_y or shift_x:
                    images = translate_batch(images, shift_y, shift_x, pad_mode=pad_mode)
                return images[:, :, ::-1, :] if mirror else images

            views.append(view)
    return views


def tta_logits(
    predict: Callable[[jax.Array], jax.Array],
    images: jax.Array,
    views: Sequence[View],
    weights: Sequence[float] | None = None,
) -> jax.Array:
    """The mean of ``predict(view(images))`` over ``views`` (logits averaged, as airbench94), in
    float32 (float64 predictions stay float64).

    Args:
        predict: images ``(N, ...)`` -> outputs ``(N, ...)``, e.g. ``lambda x: model.apply(v, x)``.
        images: the batch.
        views: functions ``images -> images`` of the same shape.
        weights: one positive weight per view for a weighted mean (they are normalized to sum to
            1); ``None``: equal weights.
    """
    if not callable(predict):
        raise TypeError(f"predict: expected a function images -> outputs, got {predict!r}")
    views = _check_views(views)
    weights = _check_weights(weights, len(views))
    total = None
    for view, weight in zip(views, weights, strict=True):
        transformed = view(images)
        if getattr(transformed, "shape", None) != images.shape:
            got = getattr(transformed, "shape", None) or _describe(transformed)
            raise ValueError(f"views: each view must keep the shape {images.shape}, got {got}")
        out = predict(transformed)
        if not hasattr(out, "shape") or not hasattr(out, "dtype"):
            # e.g. apply(..., mutable=[...]), which returns (outputs, updated collections)
            raise TypeError(f"predict: expected it to return an array, got {_describe(out)}")
        out = weight * out.astype(float32_or_wider(out.dtype))
        total = out if total is None else total + out
    return total


def _check_views(views) -> tuple[View, ...]:
    if isinstance(views, (str, bytes)) or not hasattr(views, "__iter__"):
        raise TypeError(f"views: expected a sequence of functions images -> images, got {views!r}")
    views = tuple(views)
    if not views:
        raise ValueError("views: expected at least one view, got none")
    for i, view in enumerate(views):
        if not callable(view):
            raise TypeError(f"views[{i}]: expected a function images -> images, got {view!r}")
    return views


def _check_weights(weights, count: int) -> tuple[float, ...]:
    if weights is None:
        return (1.0 / count,) * count
    if (
        isinstance(weights, (str, bytes, Mapping, Set))  # a mapping's keys, a set's hash order
        or not isinstance(weights, Iterable)
        or getattr(weights, "ndim", None) == 0
    ):
        raise TypeError(
            f"weights: expected one positive weight per view ({count}), got {_describe(weights)}"
        )
    values = tuple(check_real(w, "weights", low=0, low_open=True) for w in weights)
    if len(values) != count:
        raise ValueError(f"weights: expected one per view ({count}), got {len(values)}")
    # scaled by the largest first: the sum of weights near float's maximum is inf
    largest = max(values)
    total = sum(v / largest for v in values)
    return tuple(v / largest / total for v in values)


def with_tta(
    apply_fn: Callable, views: Sequence[View], weights: Sequence[float] | None = None
) -> Callable:
    """A Flax ``apply`` that averages the logits over ``views`` in evaluation mode.

    Calls with ``train=False`` (the default; ``train`` is the third argument, as in jcnn's
    models' ``__call__(x, train)``) return ``tta_logits`` of the model over the views; calls with
    ``train=True``, or that pass ``mutable`` (anything but ``False``, ``[]`` included) or ask for
    captured intermediates (which make ``apply`` return a pair), are passed through unchanged, so
    training is never augmented by it.

    Args:
        apply_fn: the model's ``apply`` (``TrainState.apply_fn``).
        views: functions ``images -> images`` of the same shape, e.g. ``flip_translate_views()``.
        weights: as for ``tta_logits``.
    """
    if not callable(apply_fn):
        raise TypeError(f"apply_fn: expected a model's apply function, got {apply_fn!r}")
    views = _check_views(views)
    weights = _check_weights(weights, len(views))

    def apply(variables, images, train: bool = False, *args, **kwargs):
        train = check_bool(train, "train")
        # Flax returns a pair for any ``mutable`` but False, an empty list included
        pair = kwargs.get("mutable", False) is not False or kwargs.get("capture_intermediates")
        if train or pair:
            return apply_fn(variables, images, *args, train=train, **kwargs)
        return tta_logits(
            lambda x: apply_fn(variables, x, *args, train=False, **kwargs), images, views, weights
        )

    return apply
