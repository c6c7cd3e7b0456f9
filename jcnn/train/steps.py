"""Jit-compiled, pure training and evaluation steps on a ``TrainState``."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.typing import DTypeLike

from jcnn import functional as F
from jcnn.functional._checks import check_array, check_dtype, check_real, float32_or_wider
from jcnn.train.param_groups import split_no_grad
from jcnn.train.state import TrainState

__all__ = [
    "train_step",
    "train_steps",
    "eval_step",
    "loss_and_logits",
    "batch_loss",
    "batch_metrics",
]

RESERVED_METRICS = ("loss", "accuracy", "grad_norm", "count")


def _describe(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def batch_loss(
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array], logits: jax.Array, labels: jax.Array
) -> jax.Array:
    """The mean of ``loss_fn(logits, labels)`` over the batch, its shape checked.

    ``loss_fn`` returns one loss per example ``(N,)`` (averaged here) or their mean, a scalar.
    Anything else (a ``(N, K)`` table, a wrong length) is a ``ValueError`` naming ``loss_fn``.

    >>> import jax.numpy as jnp
    >>> logits, labels = jnp.zeros((4, 3)), jnp.array([0, 1, 2, 0])
    >>> float(batch_loss(lambda z, y: jnp.sum(z, axis=1) + 1.0, logits, labels))
    1.0
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable (logits, labels) -> loss, got {loss_fn!r}")
    what = f"loss {_describe(loss_fn)}"
    value = _as_array(_traced_call(loss_fn, what, logits, labels), what, "a loss")
    n = logits.shape[0]
    if value.shape not in ((), (n,)):
        raise ValueError(
            f"loss {_describe(loss_fn)}: expected one loss per example, shape ({n},), or their "
            f"mean, shape (), got shape {value.shape}"
        )
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(
            f"loss {_describe(loss_fn)}: expected a floating loss, got dtype {value.dtype}"
        )
    value = value.astype(float32_or_wider(value.dtype))  # float64 stays float64
    return jnp.mean(value) if value.ndim else value


def _traced_call(fn, what: str, logits: jax.Array, labels: jax.Array):
    """``fn(logits, labels)``; a ``TypeError`` naming ``what`` if it needs concrete values."""
    try:
        return fn(logits, labels)
    except (jax.errors.JAXTypeError, jax.errors.NonConcreteBooleanIndexError) as error:
        first_line = str(error).splitlines()[0]
        raise TypeError(
            f"{what}: expected a function JAX can trace (it runs inside the jitted step, on "
            f"traced arrays: use jax.numpy, not NumPy, float() or an if on a value); it raised "
            f"{type(error).__name__}: {first_line}"
        ) from error


def _as_array(value, what: str, expected: str) -> jax.Array:
    """``value`` as a JAX array, or a ``TypeError`` naming ``what`` (a None, a dict, a string)."""
    try:
        return jnp.asarray(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"{what}: expected {expected}, got {type(value).__name__}") from error


def batch_accuracy(logits: jax.Array, labels: jax.Array, loss_fn: Callable | None) -> jax.Array:
    """``F.accuracy``; NaN where a custom ``loss_fn`` reads labels that are neither class
    indices nor class probabilities of the logits (a regression target, weights beside the
    class): accuracy is undefined for them, and the loss alone is what the run reports."""
    integer = jnp.issubdtype(labels.dtype, jnp.integer)
    readable = labels.shape == logits.shape[: -1 if integer else None]
    if loss_fn is not None and not readable:
        return jnp.full((), jnp.nan, jnp.float32)
    return F.accuracy(logits, labels)


def batch_metrics(
    metrics: tuple[tuple[str, Callable[[jax.Array, jax.Array], jax.Array]], ...] | None,
    logits: jax.Array,
    labels: jax.Array,
) -> dict[str, jax.Array]:
    """``{name: fn(logits, labels)}`` for the ``(name, fn)`` pairs of ``metrics``, each a scalar.

    A metric that returns anything but a real scalar is an error naming it: a ``ValueError`` for
    another shape, a ``TypeError`` for what is not a real number (``None``, a dict, a complex).
    """
    values = {}
    for name, fn in metrics or ():
        if not callable(fn):
            raise TypeError(f"metrics[{name!r}]: expected a callable, got {fn!r}")
        what = f"metric {name!r} ({_describe(fn)})"
        value = _as_array(
            _traced_call(fn, what, logits, labels), what, "a scalar (the batch's value)"
        )
        real = (jnp.floating, jnp.integer, jnp.bool_)
        if not any(jnp.issubdtype(value.dtype, kind) for kind in real):
            raise TypeError(f"{what}: expected a real number, got dtype {value.dtype}")
        if value.shape != ():
            raise ValueError(
                f"metric {name!r} ({_describe(fn)}): expected a scalar (the batch's value), got "
                f"shape {value.shape}"
            )
        values[name] = value.astype(jnp.float32)
    return values


def metric_pairs(metrics) -> tuple:
    """``{name: fn}`` (or ``(name, fn)`` pairs) checked, as the hashable tuple the steps take."""
    if metrics is None:
        return ()
    if isinstance(metrics, Mapping):
        items = tuple(metrics.items())
    elif isinstance(metrics, (tuple, list)) and all(
        isinstance(p, (tuple, list)) and len(p) == 2 for p in metrics
    ):
        items = tuple(tuple(p) for p in metrics)
    else:
        raise TypeError(
            f"metrics: expected a dict {{name: fn(logits, labels) -> scalar}} or (name, fn) "
            f"pairs, got {metrics!r}"
        )
    for name, fn in items:
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"metrics: expected names that are identifiers, got {name!r}")
        if name in RESERVED_METRICS:
            raise ValueError(
                f"metrics: {name!r} is computed already; reserved names are "
                f"{', '.join(RESERVED_METRICS)}"
            )
        if not callable(fn):
            raise TypeError(f"metrics[{name!r}]: expected a callable, got {type(fn).__name__}")
        _takes_logits_and_labels(fn, f"metrics[{name!r}]")
        _hashable_fn(fn, f"metrics[{name!r}]")
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"metrics: each name must appear once, got {names}")
    return _hashable(items, "metrics")


def _hashable(value, name: str):
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"{name}: expected a hashable value (the step is compiled for it), got {value!r}"
        ) from None
    return value


def _takes_logits_and_labels(fn, name: str) -> None:
    """Raise a ``TypeError`` naming ``name`` unless ``fn`` can be called as ``fn(logits,
    labels)`` (else the mistake surfaces inside the traced step as a bare ``TypeError``)."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: cannot tell, trust it
        return
    try:
        signature.bind(None, None)
    except TypeError:
        raise TypeError(
            f"{name}: expected a callable taking (logits, labels), got {_describe(fn)}{signature}"
        ) from None


def _hashable_fn(fn, name: str):
    try:
        hash(fn)
    except TypeError as error:
        raise TypeError(
            f"{name}: expected a hashable callable (it is a static argument of the jit-compiled "
            f"step), got an unhashable {type(fn).__name__} ({error}); use a plain function, a "
            "functools.partial or a frozen dataclass (@dataclasses.dataclass(frozen=True))"
        ) from None
    return fn


def check_loss_fn(loss_fn, name: str = "loss_fn"):
    """``loss_fn`` if ``None`` or a hashable callable, else a ``TypeError`` naming ``name``."""
    if loss_fn is None:
        return None
    if not callable(loss_fn):
        raise TypeError(f"{name}: expected a callable (logits, labels) -> loss, got {loss_fn!r}")
    _takes_logits_and_labels(loss_fn, name)
    return _hashable_fn(loss_fn, name)


def _patterns(no_grad) -> tuple[str, ...]:
    if isinstance(no_grad, (str, bytes)) or not isinstance(no_grad, (tuple, list)):
        raise TypeError(f"no_grad: expected a sequence of glob patterns (str), got {no_grad!r}")
    return tuple(no_grad)


def _label_smoothing(value) -> float:
    return check_real(value, "label_smoothing", low=0, high=1)


STEP_OPTIONS = {
    "compute_dtype": lambda dtype: _hashable(check_dtype(dtype, "compute_dtype"), "compute_dtype"),
    "label_smoothing": _label_smoothing,
    "loss_fn": check_loss_fn,
    "metrics": metric_pairs,
    "no_grad": _patterns,
}


def jit_with_options(
    options: Mapping[str, Callable],
    donate_argnums=(),
    check_values: Callable[[Mapping[str, Any]], None] | None = None,
):
    """``jax.jit`` with the keyword ``options`` static, each passed through its checker first.

    The checker turns what a user naturally writes (a list of patterns, a dict of metrics, a
    NumPy float) into the hashable value the program is compiled for, or raises an error naming
    the option, where JAX would refuse an unhashable static argument from deep inside ``jit``.
    ``check_values``, if given, receives the call's arguments by name before the jit, while they
    are concrete values (inside it they are traced, and only their shapes can be checked).
    The result also has ``lower``, as a jitted function does, and ``unchecked``, which skips
    ``check_values`` for callers whose values are right by construction (checking them would
    wait for each call's values).
    """

    def decorate(fun):
        jitted = jax.jit(fun, donate_argnums=donate_argnums, static_argnames=tuple(options))
        signature = inspect.signature(fun)

        def checked(kwargs):
            return {k: options[k](v) if k in options else v for k, v in kwargs.items()}

        def unchecked(*args, **kwargs):
            return jitted(*args, **checked(kwargs))

        @functools.wraps(fun)
        def call(*args, **kwargs):
            if check_values is not None:
                check_values(signature.bind(*args, **kwargs).arguments)
            return unchecked(*args, **kwargs)

        call.lower = lambda *args, **kwargs: jitted.lower(*args, **checked(kwargs))
        call.unchecked = unchecked
        return call

    return decorate


def _check_batch(state, batch):
    if not isinstance(state, TrainState):
        raise TypeError(f"state: expected a jcnn.train.TrainState, got {type(state).__name__}")
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"batch: expected a pair (images, labels), got {type(batch).__name__}")
    images, labels = batch
    check_array(images, "batch images")
    if not hasattr(labels, "shape") or labels.shape[:1] != images.shape[:1]:
        raise ValueError(
            f"batch labels: expected one label per image ({images.shape[0]}), got "
            f"{getattr(labels, 'shape', type(labels).__name__)}"
        )
    return images, labels


def _check_not_empty(images, name: str) -> None:
    # the mean of no example is NaN: a train step would write it into the parameters (DP-SGD's
    # empty Poisson batches are the exception, and go through dp_train_step)
    if images.shape[:1] == (0,):
        raise ValueError(
            f"{name}: expected a batch (N, ...) of N >= 1 images, got shape {images.shape}"
        )


def _cast_floats(tree, dtype):
    return jax.tree.map(
        lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def loss_and_logits(
    params: Any,
    state: TrainState,
    images: jax.Array,
    labels: jax.Array,
    *,
    train: bool,
    dropout_key: jax.Array | None = None,
    compute_dtype: DTypeLike | None = None,
    label_smoothing: float = 0.0,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> tuple[jax.Array, tuple[jax.Array, Any]]:
    """Mean loss of the model on a batch, with the logits and the new BatchNorm statistics.

    Args:
        params: the parameters to differentiate with respect to (float32).
        state: supplies ``apply_fn`` and ``batch_stats``.
        images: a floating batch ``(N, ...)``.
        labels: integer classes ``(N,)`` or class probabilities ``(N, K)``.
        train: training mode (batch statistics, dropout) or evaluation mode (running statistics).
        dropout_key: the key of the ``dropout`` RNG stream (training only).
        compute_dtype: e.g. ``jnp.bfloat16`` to run the model in that dtype; parameters stay float32
            (they are cast inside, so gradients come back in float32) and the loss is float32
            (float64 for a float64 model under ``jax_enable_x64``: its logits are not rounded).
        label_smoothing: passed to ``F.cross_entropy``; with ``loss_fn`` it must be 0.
        loss_fn: ``(logits, labels) -> per-example (N,) or mean loss`` (see ``batch_loss``); the
            default ``None`` is ``F.cross_entropy`` with ``label_smoothing``.

    Returns:
        ``(loss, (logits, new_batch_stats))``.
    """
    if (
        loss_fn is not None
        and not isinstance(label_smoothing, jax.core.Tracer)
        and label_smoothing != 0
    ):
        raise ValueError(
            "label_smoothing: applies to the default cross-entropy only, not to a custom loss_fn "
            f"(smooth inside your loss), got {label_smoothing!r}"
        )
    if compute_dtype is not None:
        # only the parameters: BatchNorm statistics cast to bfloat16 each step would lose every
        # running-average update below half a bfloat16 step (0.01 * (1.3 - 1.0) at momentum 0.99)
        params = _cast_floats(params, compute_dtype)
        images = images.astype(compute_dtype)
    variables = {**state.variables(), "params": params}
    if train:
        logits, updates = state.apply_fn(
            variables,
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_key},
        )
        new_stats = updates.get("batch_stats", state.batch_stats)
    else:
        logits = state.apply_fn(variables, images, train=False)
        new_stats = state.batch_stats
    # BN statistics keep the dtype they are stored in whatever the compute dtype.
    new_stats = jax.tree.map(lambda new, old: new.astype(old.dtype), new_stats, state.batch_stats)
    logits = logits.astype(float32_or_wider(logits.dtype))
    if loss_fn is None:
        loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    else:
        loss = batch_loss(loss_fn, logits, labels)
    return loss, (logits, new_stats)


@jit_with_options(STEP_OPTIONS, donate_argnums=(0,))
def train_step(
    state: TrainState,
    batch: tuple[jax.Array, jax.Array],
    *,
    compute_dtype: DTypeLike | None = None,
    label_smoothing: float = 0.0,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    metrics: tuple[tuple[str, Callable[[jax.Array, jax.Array], jax.Array]], ...] | None = None,
    no_grad: tuple[str, ...] = (),
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a batch; the old state's buffers are donated.

    The dropout key of step ``t`` is ``fold_in(state.key, t)``, so a run is a pure function of its
    initial state and its batches (what exact resume relies on).

    Args:
        state: the ``TrainState`` (invalid after the call: its buffers are reused).
        batch: ``(images, labels)``: floating images ``(N, ...)``; integer labels ``(N,)`` or
            soft labels ``(N, K)`` (mixup, cutmix, smoothing).
        compute_dtype: ``None`` (the parameters' float32) or ``jnp.bfloat16``.
        label_smoothing: cross-entropy label smoothing (default loss only).
        loss_fn: a loss ``(logits, labels) -> (N,) or ()`` instead of cross-entropy (hashable:
            it is a static argument).
        metrics: ``{name: fn}`` or ``(name, fn)`` pairs, ``fn(logits, labels) -> scalar``,
            computed on the batch besides the loss and accuracy (hashable: a static argument).
        no_grad: glob patterns on the ``/``-joined parameter paths (``"whiten/*"``, each must
            match some parameter) whose gradient is not computed, as PyTorch's
            ``requires_grad=False``: no backward work is done for them, the optimizer receives
            zeros for them (give them ``optax.set_to_zero()`` through ``optax.multi_transform``
            to keep weight decay and momentum off them too) and ``grad_norm`` leaves them out.

    Returns:
        ``(new_state, metrics)`` with scalar ``metrics["loss"]``, ``metrics["accuracy"]`` (on the
        batch, before the update; NaN for labels of a ``loss_fn``'s own form, see
        ``batch_accuracy``), ``metrics["grad_norm"]`` and one entry per extra metric.
    """
    images, labels = _check_batch(state, batch)
    _check_not_empty(images, "batch images")
    return _step(state, images, labels, compute_dtype, label_smoothing, loss_fn, metrics, no_grad)


@jit_with_options(STEP_OPTIONS, donate_argnums=(0,))
def train_steps(
    state: TrainState,
    batches: tuple[jax.Array, jax.Array],
    *,
    compute_dtype: DTypeLike | None = None,
    label_smoothing: float = 0.0,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    metrics: tuple[tuple[str, Callable[[jax.Array, jax.Array], jax.Array]], ...] | None = None,
    no_grad: tuple[str, ...] = (),
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``K`` optimizer steps in one call: ``train_step`` on each of ``K`` stacked batches in turn.

    The steps run inside one compiled program (a ``lax.scan``), so the host dispatches once for
    all ``K``: where a step takes milliseconds that is markedly faster (LeNet-5 at batch 128 on a
    2-core CPU: 1.2x per step with ``K = 4``; CIFAR networks at batch 256: no change). XLA's working
    memory is also set up once per call, which matters on CPU with ``JCNN_HOST_MEMORY=release``
    (``jcnn.native.memory``). See ``experiments/benchmarks/README.md``.
    Each step is the one ``train_step`` takes (same dropout keys ``fold_in(state.key, step)``,
    same BatchNorm statistics threading); XLA may order the floating-point work differently
    inside the loop, so results agree with ``K`` calls of ``train_step`` to rounding, not bitwise.

    Args:
        state: the ``TrainState`` (invalid after the call: its buffers are reused).
        batches: ``(images, labels)`` with a leading axis of ``K >= 1`` batches: images
            ``(K, N, ...)``, labels ``(K, N)`` or soft labels ``(K, N, C)``.
        compute_dtype: as for ``train_step``.
        label_smoothing: as for ``train_step``.
        loss_fn: as for ``train_step``.
        metrics: as for ``train_step``.
        no_grad: as for ``train_step``.

    Returns:
        ``(new_state, metrics)``: each entry of ``train_step``'s metrics with a leading axis of
        ``K``, one value per step.
    """
    images, labels = _check_batches(state, batches)
    _check_not_empty(images[0], "batches images[0]")

    def one(state, batch):
        return _step(state, *batch, compute_dtype, label_smoothing, loss_fn, metrics, no_grad)

    return jax.lax.scan(one, state, (images, labels))


def _check_batches(state, batches):
    if not isinstance(batches, (tuple, list)) or len(batches) != 2:
        raise TypeError(
            f"batches: expected a pair (images, labels) of stacked batches, got "
            f"{type(batches).__name__}"
        )
    images, labels = batches
    check_array(images, "batches images")
    if images.ndim < 2 or images.shape[0] < 1:
        raise ValueError(
            f"batches images: expected a leading axis of K >= 1 batches, (K, N, ...), got shape "
            f"{images.shape}"
        )
    if not hasattr(labels, "shape") or labels.shape[:2] != images.shape[:2]:
        raise ValueError(
            f"batches labels: expected (K, N) = {images.shape[:2]} leading axes like the images, "
            f"got {getattr(labels, 'shape', type(labels).__name__)}"
        )
    _check_batch(state, (images[0], labels[0]))
    return images, labels


def _step(state, images, labels, compute_dtype, label_smoothing, loss_fn, metrics, no_grad):
    dropout_key = jax.random.fold_in(state.key, state.step)
    leaves, merge, fill = split_no_grad(state.params, no_grad)

    def loss_of_leaves(leaves, *args, **kwargs):
        return loss_and_logits(merge(leaves), *args, **kwargs)

    grad_fn = jax.value_and_grad(loss_of_leaves, has_aux=True)
    (loss, (logits, new_stats)), leaf_grads = grad_fn(
        leaves,
        state,
        images,
        labels,
        train=True,
        dropout_key=dropout_key,
        compute_dtype=compute_dtype,
        label_smoothing=label_smoothing,
        loss_fn=loss_fn,
    )
    grads = fill(leaf_grads)
    updates, new_opt_state = state.tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        params=optax.apply_updates(state.params, updates),
        batch_stats=new_stats,
        opt_state=new_opt_state,
        step=state.step + 1,
    )
    values = {
        "loss": loss,
        "accuracy": batch_accuracy(logits, labels, loss_fn),
        "grad_norm": optax.tree.norm(grads),
        **batch_metrics(metrics, logits, labels),
    }
    return new_state, values


@jit_with_options({k: STEP_OPTIONS[k] for k in ("compute_dtype", "loss_fn", "metrics")})
def eval_step(
    state: TrainState,
    batch: tuple[jax.Array, jax.Array],
    *,
    compute_dtype: DTypeLike | None = None,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    metrics: tuple[tuple[str, Callable[[jax.Array, jax.Array], jax.Array]], ...] | None = None,
) -> dict[str, jax.Array]:
    """Loss and accuracy of the model in evaluation mode (running BatchNorm statistics).

    Args:
        state: the ``TrainState`` (not modified, not donated).
        batch: ``(images, labels)`` as for ``train_step``.
        compute_dtype: as for ``train_step``.
        loss_fn: as for ``train_step``.
        metrics: as for ``train_step``.

    Returns:
        ``{"loss", "accuracy", "count"}`` and the extra metrics: batch means and the number of
        examples, so that means over a dataset are ``sum(count * value) / sum(count)``.
    """
    images, labels = _check_batch(state, batch)
    _check_not_empty(images, "batch images")
    loss, (logits, _) = loss_and_logits(
        state.params,
        state,
        images,
        labels,
        train=False,
        compute_dtype=compute_dtype,
        loss_fn=loss_fn,
    )
    return {
        "loss": loss,
        "accuracy": batch_accuracy(logits, labels, loss_fn),
        **batch_metrics(metrics, logits, labels),
        "count": jnp.asarray(images.shape[0], jnp.int32),
    }
