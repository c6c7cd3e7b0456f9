"""The loader protocol ``fit`` relies on, written down and checked.

A training loader is any object with::

    len(loader)                          -> batches per epoch (>= 1)
    loader.epoch(epoch, start_step=s)    -> iterable of (images, labels), batches s, s+1, ...
    loader.batch(epoch, step)            -> (images, labels), batch ``step`` of ``epoch``

``epoch(e, start_step=s)`` must yield exactly the batches ``s, s + 1, ...`` an uninterrupted pass
would (a pure function of ``(e, step)``): exact resume depends on it. ``fit`` calls
``batch(0, 0)`` once to build the model's variables from a sample. ``jcnn.data.Loader`` is the
reference implementation.

An evaluation loader (validation, test) needs only ``epoch(0)`` or plain iteration, yielding
``(images, labels)`` batches that cover the set once.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

import numpy as np

from jcnn.data import Loader

__all__ = [
    "TrainLoader",
    "check_train_loader",
    "check_eval_loader",
    "check_batch",
    "check_labels",
    "loader_length",
]


@runtime_checkable
class TrainLoader(Protocol):
    """What ``fit`` needs of its training loader (see the module docstring)."""

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, *, start_step: int = 0) -> Iterable[tuple[Any, Any]]: ...

    def batch(self, epoch: int, step: int) -> tuple[Any, Any]: ...


def _accepts_start_step(method) -> bool:
    try:
        parameters = inspect.signature(method).parameters
    except (TypeError, ValueError):  # a builtin or C method: cannot tell, trust it
        return True
    return "start_step" in parameters or any(
        p.kind == inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def check_train_loader(loader, name: str = "train_loader") -> None:
    """Raise a ``TypeError`` listing every piece of the protocol ``loader`` lacks."""
    missing = []
    if not hasattr(type(loader), "__len__"):
        missing.append("len() (__len__)")
    epoch = getattr(loader, "epoch", None)
    if not callable(epoch):
        missing.append("epoch(epoch, start_step=...)")
    elif not _accepts_start_step(epoch):
        missing.append("the start_step keyword of epoch(epoch, start_step=...)")
    if not callable(getattr(loader, "batch", None)):
        missing.append("batch(epoch, step)")
    if missing:
        raise TypeError(
            f"{name}: expected a loader with len(), epoch(epoch, start_step=...) and "
            f"batch(epoch, step) (see jcnn.train.protocol); {type(loader).__name__} lacks "
            f"{', '.join(missing)}"
        )
    loader_length(loader, name)


def loader_length(loader, name: str = "train_loader") -> int:
    """``len(loader)`` checked: a ``TypeError`` or ``ValueError`` naming ``name`` unless it is an
    int >= 0 (Python's ``len`` says only "'float' object cannot be interpreted as an integer")."""
    length = type(loader).__len__(loader)
    if isinstance(length, bool) or not isinstance(length, numbers.Integral):
        raise TypeError(
            f"{name}: expected len() to be the number of batches per epoch, an int, got "
            f"{length!r} ({type(length).__name__})"
        )
    if length < 0:
        raise ValueError(
            f"{name}: expected len() to be the number of batches per epoch, an int >= 0, got "
            f"{length}"
        )
    return int(length)


def check_eval_loader(loader, name: str, *, repeated: bool = False) -> None:
    """Raise a ``TypeError`` unless ``loader`` has ``epoch(0)`` or can be iterated, and a
    ``ValueError`` if it has a length and it is 0.

    A pair of arrays ``(images, labels)`` (not batches) is a ``TypeError``, and so, with
    ``repeated`` (the loader is evaluated more than once), is a one-shot iterator such as a
    generator, which would yield nothing from its second evaluation on. A ``jcnn.data.Loader``
    that does not yield each of its examples once (``drop_remainder=True`` with a short last
    batch, ``sampling="poisson"``) is a ``ValueError``.
    """
    has_epoch = callable(getattr(loader, "epoch", None))
    if not has_epoch and not hasattr(type(loader), "__iter__"):
        raise TypeError(
            f"{name}: expected a loader with epoch(0) or iteration yielding (images, labels) "
            f"batches, got {type(loader).__name__}"
        )
    if (
        isinstance(loader, (tuple, list))
        and len(loader) == 2
        and all(hasattr(part, "shape") and len(part.shape) >= 1 for part in loader)
        and loader[0].shape[:1] == loader[1].shape[:1]
        and len(loader[0].shape) > 1
    ):
        raise TypeError(
            f"{name}: expected a loader yielding (images, labels) batches, got a pair of arrays "
            f"{tuple(loader[0].shape)}, {tuple(loader[1].shape)}; wrap them: "
            "jcnn.data.Loader(images, labels, batch_size=..., shuffle=False, "
            "drop_remainder=False)"
        )
    if repeated and not has_epoch and iter(loader) is loader:
        raise TypeError(
            f"{name}: expected a loader that can be iterated once per evaluation (a list of "
            f"batches, or an object with epoch(0)), got a one-shot {type(loader).__name__}, "
            "which would yield nothing from its second evaluation on"
        )
    if hasattr(type(loader), "__len__") and loader_length(loader, name) == 0:
        raise ValueError(f"{name}: expected at least one (images, labels) batch, got none")
    if isinstance(loader, Loader):
        _check_covers_every_example(loader, name)


def _check_covers_every_example(loader: Loader, name: str) -> None:
    """Raise unless the ``Loader`` yields each of its examples once per pass: the means of an
    evaluation are over the examples, and a dropped last batch or a Poisson draw would silently
    leave some out (or count some twice)."""
    advice = "build it with shuffle=False, drop_remainder=False"
    if loader.sampling == "poisson":
        raise ValueError(
            f"{name}: expected a loader yielding each example once, got a Loader with "
            f"sampling='poisson' (batches of randomly drawn examples); {advice}"
        )
    rest = loader.num_examples % loader.batch_size
    if loader.drop_remainder and rest:
        raise ValueError(
            f"{name}: expected a loader yielding each example once, got a Loader with "
            f"drop_remainder=True that leaves out {rest} of its {loader.num_examples} examples "
            f"(batch_size {loader.batch_size}); {advice}"
        )


def check_batch(batch, name: str) -> tuple[Any, Any]:
    """``batch`` as the tuple ``(images, labels)``; a ``TypeError`` naming ``name`` for anything
    else (a dict such as ``{"image": x, "label": y}``, a triple, arrays not paired)."""
    if isinstance(batch, Mapping):
        raise TypeError(
            f"{name}: expected each batch to be a pair (images, labels) of arrays, got a "
            f"{type(batch).__name__} with keys {list(batch)}; yield tuples, e.g. "
            "(batch['image'], batch['label'])"
        )
    if (
        isinstance(batch, (tuple, list))
        and len(batch) == 2
        and all(hasattr(part, "shape") for part in batch)
    ):
        images, labels = batch
        if len(images.shape) < 1 or tuple(images.shape[:1]) != tuple(labels.shape[:1]):
            raise ValueError(
                f"{name}: expected a batch of images (N, ...) with one label each, labels "
                f"(N, ...), got images {tuple(images.shape)} and labels {tuple(labels.shape)}"
            )
        return tuple(batch)
    if isinstance(batch, (tuple, list)):
        parts = ", ".join(type(part).__name__ for part in batch)
        got = f"a {type(batch).__name__} of {len(batch)} ({parts})"
    else:
        got = f"a {type(batch).__name__}"
    raise TypeError(
        f"{name}: expected each batch to be a pair (images, labels) of arrays, got {got}"
    )


def check_labels(labels, classes: int | None, name: str) -> None:
    """Raise a ``ValueError`` naming ``name`` if integer ``labels`` fall outside ``0..classes-1``
    (the cross-entropy of a label ``classes`` is NaN, and a ``-1`` silently counts as the last
    class); soft (floating) labels, and any labels where ``classes`` is ``None``, are not checked.
    ``labels`` on a device are copied to the host.
    """
    if classes is None or not np.issubdtype(labels.dtype, np.integer) or labels.size == 0:
        return
    low, high = int(np.min(labels)), int(np.max(labels))
    if low < 0 or high >= classes:
        raise ValueError(
            f"{name}: expected class labels in 0..{classes - 1} (the model has {classes} "
            f"outputs), got labels from {low} to {high}"
        )
