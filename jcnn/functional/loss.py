"""Classification loss and accuracy over channels-last logits ``(..., K)``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jcnn.functional._checks import (
    check_array,
    check_choice,
    check_real_or_traced,
    float32_or_wider,
)

__all__ = ["accuracy", "cross_entropy"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_labels(logits, labels) -> bool:
    """Check ``labels`` against ``logits``; return True for integer class labels."""
    if not hasattr(labels, "shape") or not hasattr(labels, "dtype"):
        raise TypeError(f"labels: expected an array, got {type(labels).__name__}")
    logits_shape = tuple(logits.shape)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if tuple(labels.shape) != logits_shape[:-1]:
            raise ValueError(
                f"labels: integer class labels must have shape {logits_shape[:-1]} (logits shape "
                f"{logits_shape} without the class axis), got {tuple(labels.shape)}"
            )
        return True
    if jnp.issubdtype(labels.dtype, jnp.floating):
        if tuple(labels.shape) != logits_shape:
            raise ValueError(
                f"labels: class probabilities must have the logits' shape {logits_shape}, "
                f"got {tuple(labels.shape)}"
            )
        return False
    raise TypeError(
        f"labels: expected integer class labels or floating class probabilities, got dtype "
        f"{labels.dtype}"
    )


def _check_logits(logits) -> None:
    check_array(logits, "logits")
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise ValueError(
            f"logits: expected shape (..., K) with K >= 1 classes on the last axis, got "
            f"{tuple(logits.shape)}"
        )


def _check_not_empty(logits, what: str) -> None:
    """A mean over no example is NaN, not a loss or an accuracy: refuse it while it is a shape."""
    if logits.size == 0:
        raise ValueError(
            f"logits: expected at least one example to {what}, got shape {tuple(logits.shape)}"
        )


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    *,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> jax.Array:
    """Softmax cross-entropy of ``logits`` against class labels or class probabilities.

    Computed through ``log_softmax`` (stable for any logits, in at least float32). With smoothing
    ``eps`` the target becomes ``(1 - eps) * target + eps / K`` for both kinds of labels, as in
    PyTorch's ``cross_entropy(..., label_smoothing=eps)``.

    Args:
        logits: floating array ``(..., K)``: class scores on the last axis, e.g. ``(N, K)`` or a
            segmentation map ``(N, H, W, K)``.
        labels: integer classes ``(...)`` in ``[0, K)`` (a label outside that range gives a NaN
            loss for its example), or floating class probabilities ``(..., K)`` (a class of
            probability 0 adds nothing, even with a ``-inf`` logit).
        label_smoothing: ``eps`` in ``[0, 1]``; a traced 0-d value (to sweep it under ``vmap``)
            is applied unchecked.
        reduction: ``"mean"`` over every example (and position), ``"sum"``, or ``"none"`` for
            the per-example losses ``(...)``. ``"mean"`` needs at least one example.

    Returns:
        A scalar, or an array ``logits.shape[:-1]`` for ``reduction="none"``.

    >>> logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> round(float(cross_entropy(logits, jnp.array([0, 1]))), 4)
    0.6691
    >>> round(float(cross_entropy(logits, jnp.array([[1.0, 0, 0], [0, 1.0, 0]]))), 4)
    0.6691
    """
    _check_logits(logits)
    integer_labels = _check_labels(logits, labels)
    label_smoothing = check_real_or_traced(label_smoothing, "label_smoothing", low=0, high=1)
    # a traced value (a sweep under vmap or jit) is applied whatever it is
    smoothing = isinstance(label_smoothing, jax.core.Tracer) or label_smoothing > 0
    check_choice(reduction, "reduction", _REDUCTIONS)
    if reduction == "mean":
        _check_not_empty(logits, 'average (reduction="mean"); "sum" and "none" accept none')

    num_classes = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(float32_or_wider(logits.dtype)))
    if integer_labels:
        picked = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
        in_range = (labels >= 0) & (labels < num_classes)
        losses = -jnp.where(in_range, picked, jnp.nan)
        if smoothing:
            uniform = -jnp.mean(log_probs, axis=-1)
            losses = (1 - label_smoothing) * losses + label_smoothing * uniform
    else:
        target = labels.astype(log_probs.dtype)
        if smoothing:
            target = (1 - label_smoothing) * target + label_smoothing / num_classes
        # a class of probability 0 adds nothing, even where its logit is -inf (0 log 0 = 0, the
        # masked classes of a soft target); elsewhere -target * log_prob as it is, gradients too
        terms = jnp.where((target == 0) & jnp.isneginf(log_probs), 0, target * log_probs)
        losses = -jnp.sum(terms, axis=-1)

    if reduction == "mean":
        return jnp.mean(losses)
    if reduction == "sum":
        return jnp.sum(losses)
    return losses


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of examples whose highest logit is the label (the argmax of probability labels).

    Args:
        logits: floating array ``(..., K)``.
        labels: integer classes ``(...)`` in ``[0, K)`` (a label outside that range makes the
            accuracy NaN, as it makes ``cross_entropy`` NaN, instead of counting as a miss), or
            class probabilities ``(..., K)`` (e.g. mixup or smoothed targets), whose argmax is
            the class. At least one example.

    Returns:
        A float32 scalar in ``[0, 1]``, the mean over every example (and position).

    >>> float(accuracy(jnp.array([[2.0, 1.0], [0.0, 3.0]]), jnp.array([0, 0])))
    0.5
    """
    _check_logits(logits)
    _check_not_empty(logits, "score")
    if not _check_labels(logits, labels):
        labels = jnp.argmax(labels, axis=-1)
    hits = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    return jnp.mean(jnp.where(in_range, hits, jnp.nan))
