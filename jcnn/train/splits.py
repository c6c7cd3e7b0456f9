"""A validation set carved from the training set, deterministically."""

from __future__ import annotations

import numpy as np

from jcnn.functional._checks import _describe, _is_real_scalar, check_int, is_int

__all__ = ["validation_size", "split_validation"]


def validation_size(val_split: int | float, num_examples: int, name: str = "val_split") -> int:
    """The number of validation examples ``val_split`` asks for out of ``num_examples``.

    ``val_split`` is a count (an int ``1 <= n < num_examples``) or a fraction (a float in
    ``(0, 1)``, rounded to the nearest count as Python's ``round`` does, a tie to the even count,
    and at least 1). A split that leaves no training example is an error.

    >>> validation_size(0.1, 512), validation_size(100, 512), validation_size(0.5, 5)
    (51, 100, 2)
    """
    if not _is_real_scalar(val_split):
        raise TypeError(
            f"{name}: expected a count (int) or a fraction in (0, 1), got "
            f"{type(val_split).__name__}"
        )
    if is_int(val_split):
        count = int(val_split)
        if count < 1:
            raise ValueError(f"{name}: expected a count >= 1 or a fraction in (0, 1), got {count}")
    else:
        fraction = float(val_split)
        if not 0.0 < fraction < 1.0:
            raise ValueError(
                f"{name}: expected a fraction in (0, 1) or an integer count, got {val_split!r}"
            )
        count = max(1, int(round(fraction * num_examples)))
    if count >= num_examples:
        raise ValueError(
            f"{name}: {val_split!r} asks for {count} validation examples, but the training set "
            f"has only {num_examples}; expected fewer than {num_examples} so that some remain "
            "for training"
        )
    return count


def split_validation(
    images: np.ndarray, labels: np.ndarray, val_split: int | float, *, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Split ``(images, labels)`` into a training part and a validation part.

    The validation examples are a uniformly random subset drawn with ``seed`` (the same seed gives
    the same split on every machine); both parts keep the original order of their examples.

    Args:
        images: ``(N, ...)`` array.
        labels: ``(N, ...)`` array.
        val_split: a count or a fraction in ``(0, 1)`` (see ``validation_size``).
        seed: seeds NumPy's ``default_rng`` that draws the subset.

    Returns:
        ``((train_images, train_labels), (val_images, val_labels))``.

    >>> x, y = np.arange(10).reshape(10, 1), np.arange(10)
    >>> (tx, ty), (vx, vy) = split_validation(x, y, 3, seed=0)
    >>> len(ty), len(vy), sorted(ty.tolist() + vy.tolist()) == list(range(10))
    (7, 3, True)
    """
    for name, value in (("images", images), ("labels", labels)):
        if not hasattr(value, "shape") or not hasattr(value, "dtype") or len(value.shape) < 1:
            raise TypeError(
                f"{name}: expected an array with a leading example axis (N, ...), got "
                f"{_describe(value)}"
            )
    n = int(images.shape[0])
    if int(labels.shape[0]) != n:
        raise ValueError(f"labels: expected {n} labels (one per image), got {labels.shape[0]}")
    count = validation_size(val_split, n)
    seed = check_int(seed, "seed", low=0)
    chosen = np.zeros(n, bool)
    chosen[np.random.default_rng(seed).permutation(n)[:count]] = True
    train_index, val_index = np.flatnonzero(~chosen), np.flatnonzero(chosen)
    return (images[train_index], labels[train_index]), (images[val_index], labels[val_index])
