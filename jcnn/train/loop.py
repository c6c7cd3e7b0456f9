"""``fit``: epochs of jit-compiled steps with evaluation, callbacks, checkpoints, exact resume.

A run folder (``config.out``) holds::

    config.json         the full configuration (``jcnn.train.run_folder.run_record``)
    .lock               held (flock) while a process owns the folder
    run.json            how to rebuild the model (its class and fields), the input shape, metadata
    standardize.npz     the standardization statistics (when fit knows them), for load_run
    history.json        one record per epoch (train/val loss, accuracy and metrics, lr, time, img/s)
    history.csv         the same table
    evaluations.json    every validation evaluation (each epoch, and every eval_every_steps steps)
    curves.png          loss, accuracy and metric curves, labelled train / val / test
    summary.json        the final metrics, the test set's apart (written when training ends)
    checkpoints/        atomic orbax checkpoints (keep-last-k plus best by ``config.monitor``)

The validation set chooses (best checkpoint, early stopping); the test set (``test_loader``) is
only evaluated and reported, at the end (and each epoch with ``config.test_every_epoch``).

Exact resume: a checkpoint stores the ``TrainState`` (parameters, BatchNorm statistics, optimizer
state, step, key), the position ``(epoch, batch)``, the running sums of the epoch's metrics, the
evaluations so far and every callback's ``state_dict()``. Batches come from
``loader.epoch(epoch, start_step=batch)``, a pure function of ``(seed, epoch, step)`` (see
``jcnn.data.Loader`` and ``jcnn.train.protocol``), and the dropout key of a step is
``fold_in(key, step)``, so a resumed run performs exactly the computations of an uninterrupted one
and ends with bitwise the same parameters and metrics.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import numbers
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import DTypeLike

from jcnn import native
from jcnn.data import Loader, Standardize
from jcnn.data.augment import compose
from jcnn.data.standardize import MODES as STANDARDIZE_MODES
from jcnn.functional._checks import (
    MODEL_STREAM,
    check_array,
    check_bool,
    check_choice,
    check_float32_rate,
    check_int,
    check_positive_int,
    check_real,
    check_seed,
    checked_schedule,
    seed_key,
)
from jcnn.train import parallel, run_folder, runs
from jcnn.train import schedules as S
from jcnn.train.callbacks import HOOKS, BestCheckpoint, Callback, CallbackError, RunContext
from jcnn.train.checkpoint import CheckpointError, CheckpointManager, _check_json_round_trip
from jcnn.train.dp import DPTraining, check_dp_config, dp_enabled
from jcnn.train.optim import _USED_BY, OPTIMIZERS, optimizer
from jcnn.train.param_groups import no_grad_at, no_grad_epochs, split_no_grad
from jcnn.train.protocol import (
    TrainLoader,
    check_batch,
    check_eval_loader,
    check_labels,
    check_train_loader,
    loader_length,
)
from jcnn.train.splits import split_validation, validation_size
from jcnn.train.state import TrainState, check_model
from jcnn.train.steps import check_loss_fn, eval_step, metric_pairs, train_step, train_steps

__all__ = ["TrainConfig", "fit", "evaluate", "build_schedule", "NonFiniteLossError"]

# Fault injection for the kill-and-resume tests: exit the process (no cleanup, like SIGKILL) right
# after this global step has completed and any checkpoint due at it has been written.
CRASH_AFTER_STEP_ENV = "JCNN_TRAIN_CRASH_AFTER_STEP"


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step."""


@dataclasses.dataclass
class TrainConfig:
    """Everything ``fit`` needs besides the model and the data.

    Attributes:
        epochs: passes over the training loader.
        optimizer: a name for ``jcnn.train.optimizer`` (sgd, momentum, nesterov, adam, ...), or any
            ``optax.GradientTransformation`` (or ``optax.MultiSteps``), used as it is: it brings
            its own learning rate, so ``learning_rate`` and ``schedule`` are not used,
            ``warmup_epochs``, ``momentum`` and the schedules' settings are refused away from
            their defaults, a schedule as ``learning_rate`` is refused, and
            ``weight_decay``/``clip_norm``/``clip_value`` must stay off (chain
            ``optax.add_decayed_weights``, ``optax.clip_by_global_norm`` or ``optax.clip`` into
            it instead). Its ``update`` is called as ``update(grads, opt_state, params)``.
        learning_rate: the base rate ``α0`` (the peak for ``one_cycle``): a number (Python or
            NumPy), or a schedule ``step -> rate`` used as it is (then ``schedule`` is not used,
            and ``warmup_epochs``, ``step_epochs``, ``step_factor``, ``decay_rate`` are refused
            away from their defaults).
        schedule: constant, step, exponential, inverse_time, cosine, linear, inverse_sqrt,
            one_cycle (over ``epochs`` epochs, or ``max_steps`` steps if fewer).
        warmup_epochs: linear warmup (in epochs, may be fractional) before the schedule; at most
            ``epochs``. The schedule starts when the warmup ends: its own epochs count from
            there (``step_epochs=(30,)`` after 5 warmup epochs is a drop at epoch 35, and
            cosine/linear/one_cycle span the epochs left).
        step_epochs: for ``schedule="step"``, the epochs at which the rate is multiplied by
            ``step_factor`` (counted from the end of the warmup).
        step_factor: see ``step_epochs``. Like ``step_epochs``, refused with another schedule.
        decay_rate: ``k`` of exponential / inverse_time, per epoch (refused with another
            schedule unless left at its default).
        weight_decay: ``λ`` (coupled or decoupled as ``jcnn.train.optimizer`` chooses).
        momentum: momentum of momentum/nesterov/lars (refused with another optimizer unless
            left at its default).
        clip_norm: global gradient-norm clipping, or ``None``.
        clip_value: clips each gradient entry to ``[-clip_value, clip_value]`` (before
            ``clip_norm``), or ``None``.
        label_smoothing: cross-entropy label smoothing (the default loss only), in training;
            evaluations (``val_loss``, ``test_loss``) report the unsmoothed cross-entropy.
        compute_dtype: ``"float32"`` or ``"bfloat16"`` (parameters stay float32).
        seed: initializes the model and the dropout keys, from ``fold_in(seed_key(seed), 4)``
            (the loader has its own seed; its streams never meet this one, even at the same seed).
        devices: data-parallel over this many devices (``None``: one device, no mesh).
        out: run folder; ``None`` writes nothing (no checkpoints, no history files).
        checkpoint_every_epochs: save at the end of every that many epochs (0: only when training
            ends).
        checkpoint_every_steps: also save every that many steps, mid-epoch (0: never).
        keep_last: checkpoints kept besides the best one.
        resume: continue the run in ``out`` from its latest checkpoint not known bad (the folder
            must hold that run's checkpoints and the same settings: see
            ``jcnn.train.run_folder``).
        overwrite: start over in an ``out`` that holds a run, deleting that run's files.
        progress: show a progress bar (rich).
        val_split: carve a validation set from the training loader's examples: a count (int) or a
            fraction in ``(0, 1)``, drawn with ``val_split_seed`` (see ``split_validation``);
            needs a ``jcnn.data.Loader`` over arrays and no ``val_loader``. ``None``: no split.
        val_split_seed: seed of the validation split (independent of ``seed``); only with
            ``val_split``.
        standardize: a ``jcnn.data.Standardize`` mode (``"per_channel"``...) fit on the training
            examples (after the validation split: never on validation or test examples) and
            applied to the train, validation and test loaders (to the training images after
            the training loader's ``augment``, whose ops work in the raw images' units); saved in
            the run folder. ``None``: the loaders' images are used as they are.
        eval_every_steps: also evaluate the validation set every that many steps (0: each epoch
            only); needs a validation set.
        eval_batch_size: batch size of the validation loader carved by ``val_split`` (only
            with it).
        max_steps: stop after this many optimizer steps in all, even mid-epoch (``None``: no
            limit); training ends at ``epochs`` or ``max_steps``, whichever comes first.
        monitor: the metric ranking checkpoints for keep-best (``val_accuracy``, ``val_loss``,
            ``val_<name>`` of an extra metric, or a ``train_`` one; a ``val_`` one other than
            the default needs a validation set).
        monitor_mode: ``"max"`` or ``"min"``: which direction of ``monitor`` is better.
        test_every_epoch: also evaluate the test loader at each epoch's end (reported as
            ``test_*`` in the history, never used to choose anything); needs a test loader.
        loss: ``(logits, labels) -> per-example (N,) or mean () loss``; ``None``: cross-entropy.
            Accuracy is NaN for labels that are neither classes nor class probabilities.
        metrics: ``{name: fn(logits, labels) -> scalar}`` computed besides loss and accuracy
            (per batch in training, averaged over examples in evaluation).
        callbacks: callbacks (see ``jcnn.train.callbacks``).
        dp_noise_multiplier: train with DP-SGD (``jcnn.train.dp``, docs/privacy.md) at this noise
            multiplier ``sigma`` >= 0: each example's gradient clipped to ``dp_clip_norm``, the
            sum noised with ``N(0, (sigma * dp_clip_norm)^2)``, divided by the (expected) batch
            size, given to the optimizer. ``None``: no DP-SGD (unless ``dp_target_epsilon``).
        dp_target_epsilon: train with DP-SGD at the smallest noise multiplier that ends the run
            (``epochs`` or ``max_steps``) at this epsilon; give this or ``dp_noise_multiplier``.
        dp_clip_norm: DP-SGD's per-example clip norm ``C`` > 0 (``clip_norm`` is the optimizer's
            global clipping, another thing).
        dp_delta: the delta, in (0, 1), of the epsilon reported in each epoch's record
            (``epsilon``) and in the summary; well below 1 / the number of training examples.
        dp_accountant: ``"rdp"`` (as Opacus and TF Privacy report) or ``"pld"`` (tighter).
            The sampling rate is the training loader's ``batch_size / num_examples``: exact for a
            ``Loader(sampling="poisson")``, an approximation for shuffled fixed-size batches.
        steps_per_call: optimizer steps per compiled call. Above 1, that many consecutive
            batches run in one ``train_steps`` call, dispatched once (on CPU 1.2x faster per
            step for LeNet-5 at batch 128, no faster for CIFAR networks at batch 256:
            ``experiments/benchmarks/README.md``). Fewer batches than that (before an
            epoch's end, or a step where ``fit`` evaluates, checkpoints or stops) run one
            ``train_step`` each. ``on_step`` still runs once per step, after the call, with
            ``run.state`` the state after the call's last step; a stop a callback asks for takes
            effect at the end of the call. Not with DP-SGD or ``devices``. May change on resume
            (results agree with one step per call to rounding).
        no_grad: parameters whose gradient is not computed (``train_step``'s ``no_grad``): glob
            patterns on the ``/``-joined parameter paths, or a mapping ``pattern -> epoch`` that
            stops their gradient from that epoch (counted from 0) on; the step compiles again
            when the set changes. Each pattern must match some parameter. The optimizer receives
            zeros for them: to freeze parameters entirely, also give them ``optax.set_to_zero()``
            in the optimizer (``jcnn.train.param_groups``).
    """

    epochs: int = 1
    optimizer: str | optax.GradientTransformation = "adam"
    learning_rate: float | Callable = 1e-3
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    step_epochs: tuple[int, ...] = ()
    step_factor: float = 0.1
    decay_rate: float = 0.1
    weight_decay: float = 0.0
    momentum: float = 0.9
    clip_norm: float | None = None
    clip_value: float | None = None
    label_smoothing: float = 0.0
    compute_dtype: str = "float32"
    seed: int = 0
    devices: int | None = None
    out: str | None = None
    checkpoint_every_epochs: int = 1
    checkpoint_every_steps: int = 0
    keep_last: int = 3
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    val_split: int | float | None = None
    val_split_seed: int = 0
    standardize: str | None = None
    eval_every_steps: int = 0
    eval_batch_size: int = 1000
    max_steps: int | None = None
    monitor: str = "val_accuracy"
    monitor_mode: str = "max"
    test_every_epoch: bool = False
    loss: Callable | None = None
    metrics: Mapping[str, Callable] | None = None
    callbacks: tuple = ()
    dp_noise_multiplier: float | None = None
    dp_target_epsilon: float | None = None
    dp_clip_norm: float = 1.0
    dp_delta: float = 1e-5
    dp_accountant: str = "rdp"
    steps_per_call: int = 1
    no_grad: Sequence[str] | Mapping[str, int] = ()


def _check_non_negative_int(value, name: str) -> int:
    """``value`` as an int >= 0: a ``TypeError`` for a bool or a float (even ``2.0``), as every
    other count of the config, a ``ValueError`` for a negative int."""
    return check_int(value, name, low=0)


def _base_rate(value) -> float:
    """A learning rate given as a number: Python or NumPy scalar, or a 0-d array."""
    is_scalar_array = hasattr(value, "dtype") and np.ndim(value) == 0
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or is_scalar_array):
        raise TypeError(
            "config.learning_rate: expected a number or a schedule (a callable step -> rate), "
            f"got {type(value).__name__}"
        )
    rate = float(value)
    if not (math.isfinite(rate) and rate >= 0):
        raise ValueError(f"config.learning_rate: expected a finite number >= 0, got {value!r}")
    return check_float32_rate(rate, "config.learning_rate")


def _refuse_without_evaluation(config: TrainConfig, val_loader, test_loader) -> None:
    """Refuse the settings of a validation or test set ``fit`` was not given: they would be
    ignored (``jcnn-train`` refuses the same flags without ``--val-split``)."""
    if config.val_split is None:
        _refuse_unused(
            config,
            ("val_split_seed", "eval_batch_size"),
            "config.val_split is None (no validation set is carved)",
        )
    if val_loader is None and config.val_split is None:
        because = "the run has no validation set (no val_loader, no config.val_split)"
        _refuse_unused(config, ("eval_every_steps",), because)
        if config.monitor.startswith("val_"):
            _refuse_unused(config, ("monitor",), because)
    if test_loader is None:
        _refuse_unused(config, ("test_every_epoch",), "fit was given no test_loader")


def _total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    total = config.epochs * steps_per_epoch
    return min(total, config.max_steps) if config.max_steps is not None else total


# Settings only some schedules or optimizers read: set away from its default where it is not
# read, a setting is refused rather than ignored (the user meant something by it).
_SCHEDULE_SETTINGS = {
    "step_epochs": ("step",),
    "step_factor": ("step",),
    "decay_rate": ("exponential", "inverse_time"),
}
_USES_MOMENTUM = _USED_BY["momentum"]


def _refuse_unused(config: TrainConfig, settings: Sequence[str], because: str) -> None:
    for setting in settings:
        value = getattr(config, setting)
        default = TrainConfig.__dataclass_fields__[setting].default
        if setting == "step_epochs":  # a 0-d array has __len__, but len() raises on it
            unchanged = hasattr(value, "__len__") and getattr(value, "ndim", 1) and len(value) == 0
        else:
            # a bool for a number is set, even where it equals the default (False == 0.0)
            flag = isinstance(value, (bool, np.bool_)) and not isinstance(default, bool)
            try:
                unchanged = not flag and bool(value == default)
            except (TypeError, ValueError):  # an array of several values
                unchanged = False
        if not unchanged:
            raise ValueError(
                f"config.{setting}: does not apply when {because} (it would be ignored); "
                f"expected its default {default!r}, got {value!r}"
            )


def build_schedule(config: TrainConfig, steps_per_epoch: int) -> S.Schedule:
    """The learning-rate schedule of ``config`` with epochs converted to steps.

    A callable ``config.learning_rate`` is the schedule itself; a number is the base rate of
    ``config.schedule``, whose horizon is the run's last step (``epochs`` or ``max_steps``).
    """
    if callable(config.learning_rate):
        _refuse_unused(
            config,
            ("warmup_epochs", *_SCHEDULE_SETTINGS),
            "config.learning_rate is a schedule, used as it is",
        )
        return config.learning_rate
    lr = _base_rate(config.learning_rate)
    total = max(1, _total_steps(config, steps_per_epoch))
    warmup_epochs = check_real(config.warmup_epochs, "config.warmup_epochs", low=0)
    if warmup_epochs > config.epochs:
        raise ValueError(
            f"config.warmup_epochs: expected at most config.epochs ({config.epochs}), got "
            f"{warmup_epochs:g}: the rate would never reach config.learning_rate"
        )
    warmup = int(round(warmup_epochs * steps_per_epoch))
    horizon = max(1, total - warmup)
    name = check_choice(config.schedule, "config.schedule", tuple(S.SCHEDULES))
    for setting, used_by in _SCHEDULE_SETTINGS.items():
        if name not in used_by:
            _refuse_unused(config, (setting,), f"config.schedule is {name!r}")
    if name == "constant":
        schedule = S.constant(lr)
    elif name == "step":
        epochs = config.step_epochs
        if (
            isinstance(epochs, (str, bytes))
            or not hasattr(epochs, "__iter__")
            or getattr(epochs, "ndim", 1) == 0  # a 0-d array: iterating it raises
        ):
            raise TypeError(f"config.step_epochs: expected a sequence of epochs, got {epochs!r}")
        epochs = [check_real(e, f"config.step_epochs[{i}]", low=0) for i, e in enumerate(epochs)]
        if any(a >= b for a, b in zip(epochs[:-1], epochs[1:], strict=True)):
            raise ValueError(f"config.step_epochs: expected increasing epochs, got {epochs}")
        factor = check_real(config.step_factor, "config.step_factor", low=0, low_open=True)
        # rounded to 9 decimals first: 0.29 epochs of 100 steps is step 29, not 28.999... -> 28
        boundaries = [math.floor(round(e * steps_per_epoch, 9)) for e in epochs]
        after_warmup = math.floor(round(config.epochs * steps_per_epoch, 9)) - warmup
        late = [e for e, b in zip(epochs, boundaries, strict=True) if b > after_warmup]
        if late:
            raise ValueError(
                f"config.step_epochs: {late[0]:g} is past the end of the run "
                f"(config.epochs {config.epochs:g}, counted after {warmup_epochs:g} warmup "
                f"epochs): the rate would never change there, got {tuple(epochs)}"
            )
        schedule = S.step(lr, boundaries, factor)
    elif name in ("exponential", "inverse_time"):
        rate = check_real(config.decay_rate, "config.decay_rate", low=0)
        decay = S.exponential if name == "exponential" else S.inverse_time
        schedule = decay(lr, rate / steps_per_epoch)
    elif name == "cosine":
        schedule = S.cosine(lr, horizon)
    elif name == "linear":
        schedule = S.linear(lr, horizon)
    elif name == "inverse_sqrt":
        schedule = S.inverse_sqrt(lr)
    elif name == "one_cycle":
        if horizon < 2:
            raise ValueError(
                "config.schedule: expected at least 2 steps after the warmup for one_cycle (a "
                f"rising and a falling step), got {horizon} (config.epochs, config.max_steps, "
                "config.warmup_epochs)"
            )
        schedule = S.one_cycle(lr, horizon)
    return S.warmup(schedule, warmup) if warmup > 0 else schedule


def _build_optimizer(config: TrainConfig, schedule) -> optax.GradientTransformation:
    chosen = config.optimizer
    if isinstance(chosen, optax.MultiSteps):  # gradient accumulation: a transformation inside
        chosen = chosen.gradient_transformation()
    if isinstance(chosen, optax.GradientTransformation):
        if not callable(config.learning_rate):
            _refuse_unused(
                config,
                ("warmup_epochs", "momentum", *_SCHEDULE_SETTINGS),
                "config.optimizer is an optax.GradientTransformation, used as it is",
            )
        if config.weight_decay or config.clip_norm is not None or config.clip_value is not None:
            raise ValueError(
                "config.optimizer: an optax.GradientTransformation is used as it is; "
                "weight_decay and clip_norm apply to the named optimizers only, as does "
                "clip_value (chain optax.add_decayed_weights / optax.clip_by_global_norm / "
                "optax.clip into yours)"
            )
        if callable(config.learning_rate):
            raise ValueError(
                "config.learning_rate: a schedule applies to the named optimizers only; an "
                "optax.GradientTransformation brings its own learning rate (give the schedule "
                f"to it, e.g. optax.adam(schedule)), got {_describe_fn(config.learning_rate)}"
            )
        return chosen
    if not isinstance(chosen, str):
        raise TypeError(
            f"config.optimizer: expected a name (one of {', '.join(OPTIMIZERS)}) or an "
            f"optax.GradientTransformation, got {type(chosen).__name__}"
        )
    if chosen.lower() not in OPTIMIZERS:
        raise ValueError(
            f"config.optimizer: expected one of {', '.join(OPTIMIZERS)} or an "
            f"optax.GradientTransformation, got {chosen!r}"
        )
    # checked here so that a mistake names the config's field, not optimizer()'s argument
    settings = {}
    if chosen.lower() in _USES_MOMENTUM:
        settings["momentum"] = check_real(
            config.momentum, "config.momentum", low=0, high=1, high_open=True
        )
    else:
        _refuse_unused(config, ("momentum",), f"config.optimizer is {chosen!r}")
    clipping = {}
    for name in ("clip_norm", "clip_value"):
        if getattr(config, name) is not None:
            clipping[name] = check_real(
                getattr(config, name), f"config.{name}", low=0, low_open=True
            )
    if callable(config.learning_rate):
        checked_schedule(config.learning_rate, "config.learning_rate")
    return optimizer(
        chosen,
        schedule,
        weight_decay=check_real(config.weight_decay, "config.weight_decay", low=0),
        **clipping,
        **settings,
    )


def _rate_at(schedule, step: int) -> float:
    """The rate of ``schedule`` at ``step``, asked as Optax asks (an int32 count): a schedule
    written for it (``count.astype(...)``) may not take a Python int."""
    return float(schedule(jnp.asarray(step, jnp.int32)))


def _describe_fn(fn) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _check_optimizer_update(tx, params) -> None:
    """Refuse, with an error naming ``config.optimizer``, an optimizer whose ``update`` cannot be
    called as ``fit`` calls it, ``update(grads, opt_state, params)`` (``optax.lbfgs`` and other
    line-search optimizers also need the loss's value and function)."""
    try:
        jax.eval_shape(lambda p: tx.update(p, tx.init(p), p), params)
    except TypeError as error:
        raise TypeError(
            "config.optimizer: fit calls update(grads, opt_state, params), which this optimizer "
            f"refuses ({error}); optimizers that also need the loss's value or function (such "
            "as optax.lbfgs) are not supported by fit"
        ) from error


def _mesh(devices):
    """The mesh of ``config.devices`` (``None``: no mesh); 0 or ``[]`` is refused, not taken as
    ``None``."""
    if devices is None:
        return None
    try:
        return parallel.make_mesh(devices)
    except (TypeError, ValueError) as error:  # make_mesh names its argument "devices"
        raise type(error)(f"config.{error}") from None


def _compute_dtype(config):
    if config.compute_dtype is None:
        return None
    name = check_choice(config.compute_dtype, "config.compute_dtype", ("float32", "bfloat16"))
    return jnp.bfloat16 if name == "bfloat16" else None


def _either(given, configured, name: str, empty):
    """The value given to ``fit`` or the one in the config; both at once is an error."""
    if given is not None and configured not in (None, empty) and given is not configured:
        raise ValueError(f"{name}: given both to fit and in TrainConfig.{name}; give it once")
    return given if given is not None else configured


def _check_callbacks(callbacks) -> tuple:
    if callbacks is None:
        return ()
    if not isinstance(callbacks, (tuple, list)):
        callbacks = (callbacks,)
    for i, callback in enumerate(callbacks):
        if isinstance(callback, type):
            raise TypeError(
                f"callbacks[{i}]: expected a callback object, got the class {callback.__name__} "
                f"(call it: {callback.__name__}(...))"
            )
        if not any(callable(getattr(callback, hook, None)) for hook in HOOKS):
            raise TypeError(
                f"callbacks[{i}]: expected an object with some of {', '.join(HOOKS)}, got "
                f"{type(callback).__name__}"
            )
        for hook in (*HOOKS, "state_dict", "load_state_dict"):
            method = getattr(callback, hook, None)
            if method is not None and not callable(method):
                raise TypeError(
                    f"callbacks[{i}].{hook}: expected a method, got {method!r} "
                    f"({type(callback).__name__})"
                )
    _check_best_directories(callbacks)
    return tuple(callbacks)


def _check_best_directories(callbacks) -> None:
    """Raise unless every ``BestCheckpoint`` saves into a folder of its own: two in one folder (or
    one inside the other's) would delete each other's checkpoints."""
    folders: dict[int, tuple[str, ...]] = {}
    for i, callback in enumerate(callbacks):
        if not isinstance(callback, BestCheckpoint):
            continue
        parts = Path(callback.directory).parts
        for j, other in folders.items():
            if parts[: len(other)] == other or other[: len(parts)] == parts:
                raise ValueError(
                    f"callbacks[{i}]: BestCheckpoint(directory={callback.directory!r}) saves "
                    f"into the folder of callbacks[{j}] (directory="
                    f"{callbacks[j].directory!r}); give each BestCheckpoint a folder of its own"
                )
        folders[i] = parts


def _call(callbacks, hook: str, run: RunContext, *args) -> None:
    for callback in callbacks:
        method = getattr(callback, hook, None)
        if method is None:
            continue
        try:
            method(run, *args)
        except Exception as error:
            damaged = isinstance(error, (run_folder.RunFolderError, CheckpointError))
            if hook == "on_train_begin" and damaged:
                raise  # a damaged run folder: reported as fit reports one, naming the file
            message = (
                f"callback {type(callback).__name__}.{hook} raised at step {run.step}: "
                f"{type(error).__name__}: {error}"
            )
            if hook == "on_train_begin" and type(error) in (ValueError, TypeError):
                raise type(error)(message) from error  # a configuration mistake
            raise CallbackError(message) from error


def _callback_states(callbacks) -> list[dict]:
    states = []
    for callback in callbacks:
        get = getattr(callback, "state_dict", None)
        try:
            state = get() if callable(get) else {}
            if not isinstance(state, dict):
                raise TypeError(f"it returned a {type(state).__name__}, {state!r}")
            json.dumps(state)
            _check_json_round_trip(state, "state")
        except Exception as error:
            raise CallbackError(
                f"callback {type(callback).__name__}.state_dict: expected a JSON-serializable "
                f"dict, failed with {type(error).__name__}: {error}"
            ) from error
        states.append({"name": type(callback).__name__, "state": state})
    return states


def _restore_callbacks(callbacks, saved: list[dict]) -> None:
    names = [type(c).__name__ for c in callbacks]
    if [s["name"] for s in saved] != names:
        raise ValueError(
            f"callbacks: the checkpoint holds the state of [{', '.join(s['name'] for s in saved)}]"
            f" but fit was given [{', '.join(names)}]; resume with the same callbacks"
        )
    for callback, entry in zip(callbacks, saved, strict=True):
        load = getattr(callback, "load_state_dict", None)
        if callable(load):
            try:
                load(entry["state"])
            except Exception as error:
                raise CallbackError(
                    f"callback {type(callback).__name__}.load_state_dict raised: "
                    f"{type(error).__name__}: {error}"
                ) from error


def evaluate(
    state: TrainState,
    loader: Iterable,
    *,
    compute_dtype: DTypeLike | None = None,
    mesh: jax.sharding.Mesh | None = None,
    loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    metrics: Mapping[str, Callable[[jax.Array, jax.Array], jax.Array]] | None = None,
) -> dict:
    """Mean loss, accuracy and extra metrics of ``state`` over one pass of ``loader`` (eval mode).

    Args:
        state: the ``TrainState``.
        loader: yields ``(images, labels)`` from ``loader.epoch(0)`` (or plain iteration).
        compute_dtype: as for ``eval_step``.
        mesh: shard each batch over this mesh (data parallel), or ``None``.
        loss: the loss ``(logits, labels) -> (N,) or ()``; ``None``: cross-entropy.
        metrics: ``{name: fn(logits, labels) -> scalar}``.

    Returns:
        ``{"loss", "accuracy", <metric names>..., "count"}``: means over the examples (each batch's
        value weighted by its size) and the number of examples.
    """
    check_eval_loader(loader, "loader")
    check_loss_fn(loss, "loss")
    pairs = metric_pairs(metrics)
    return _evaluate(state, loader, "loader", compute_dtype, mesh, loss, pairs)


def _evaluate(state, loader, name: str, compute_dtype, mesh, loss, pairs, classes=None) -> dict:
    """``evaluate`` with its options checked, errors naming the loader ``name``; ``classes``: the
    model's output width if known.

    With the default cross-entropy (``loss`` None), labels are checked against the classes where
    it costs no device round trip: a ``jcnn.data.Loader``'s once, NumPy labels per batch, others
    only when a batch's loss is not finite (a label ``classes`` makes it NaN). A custom loss may
    read integer labels its own way (one logit and labels 0/1), so its labels are not checked.
    """

    def check(labels, images):
        nonlocal classes
        if loss is not None:
            return
        classes = _output_width(state, images) if classes is None else classes
        check_labels(labels, classes, f"{name} labels")

    # a Loader's examples are raw (its augment may make them the model's input): checked once
    # the first batch has shown the model's width
    held = _held_labels(loader)
    sums: dict[str, float] = {}
    count = 0
    batches = loader.epoch(0) if hasattr(loader, "epoch") else loader
    for batch in batches:
        batch = check_batch(batch, name)
        check_array(batch[0], f"{name} images")
        if _batch_size(batch) == 0:  # its means are NaN, and NaN * 0 would poison every sum
            continue
        on_host = isinstance(batch[1], np.ndarray)
        if mesh is not None:
            batch = _place_eval_batch(batch, mesh)
        values = jax.device_get(
            eval_step(state, batch, compute_dtype=compute_dtype, loss_fn=loss, metrics=pairs)
        )
        if held is not None:
            check(held, batch[0])
            held = None
        if on_host or not math.isfinite(values["loss"]):
            check(batch[1], batch[0])
        n = int(values.pop("count"))
        for key, value in values.items():
            total = float(value) * n
            if key == "accuracy":
                total = _correct(total, batch[1])
            sums[key] = sums.get(key, 0.0) + total
        count += n
    if count == 0:
        raise ValueError(f"{name}: expected at least one example, the loader yielded none")
    return {**{key: total / count for key, total in sums.items()}, "count": count}


def _first_batch(loader):
    """The first batch of an evaluation loader where taking it consumes nothing (a
    ``jcnn.data.Loader``, a list of batches); ``None`` otherwise."""
    if isinstance(loader, Loader):
        return loader.batch(0, 0)
    if isinstance(loader, (list, tuple)) and loader:
        return loader[0]
    return None


def _check_evaluation_input(state, loader, name: str, train_images, **options) -> None:
    """Raise, naming the loader, if the model (with the loss and metrics) cannot evaluate its
    first batch: found before training, not at the first evaluation (a ``val_split`` loader gets
    no ``augment``, so images the training loader's augment made floating arrive as they are)."""
    first = _first_batch(loader)
    if first is None:
        return
    images, labels = check_batch(first, name)
    check_array(images, f"{name} images")
    try:
        jax.eval_shape(lambda s, b: eval_step(s, b, **options), state, (images, labels))
    except Exception as error:
        kind = type(error) if type(error) in (TypeError, ValueError) else ValueError
        raise kind(
            f"{name}: expected batches the model evaluates like the training images "
            f"{tuple(np.shape(train_images))}, got images {tuple(images.shape)} and labels "
            f"{tuple(labels.shape)} ({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error


def _place_batch(batch, mesh):
    sharding = parallel.data_sharding(mesh)
    if all(getattr(a, "sharding", None) == sharding for a in batch):
        return tuple(batch)
    return tuple(parallel.shard_batch(tuple(batch), mesh))


def _place_eval_batch(batch, mesh):
    """An evaluation batch on the mesh: sharded where it divides over the devices, else (the last
    batch of a set whose size the device count does not divide) replicated, every device
    evaluating all of it, so that no example is left out of the means."""
    if _batch_size(batch) % mesh.devices.size and jax.process_count() == 1:
        return tuple(parallel.replicate(tuple(batch), mesh))
    return _place_batch(batch, mesh)


def eval_batching(num_examples: int, batch_size: int, sharding) -> tuple[int, Any]:
    """``(batch_size, sharding)`` for an evaluation ``Loader`` over ``num_examples`` (every
    example, ``drop_remainder=False``): batches of at most ``batch_size``, a multiple of the devices
    of ``sharding`` where there are several, and the sharding dropped where the last batch would
    not divide over them (``evaluate`` replicates that batch instead)."""
    batch = min(batch_size, num_examples)
    if sharding is None:
        return batch, None
    pieces = len(sharding.device_set)
    if batch >= pieces:
        batch -= batch % pieces
    if batch % pieces or num_examples % batch % pieces:
        return batch, None
    return batch, sharding


class _Progress:
    """A rich progress bar with loss, accuracy, learning rate and images/s (or nothing)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, description, total, completed):
        if self._bar is not None:
            self._task = self._bar.add_task(description, total=total, completed=completed, stats="")

    def update(self, completed, stats):
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, stats=stats)

    def print(self, message):
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            print(message, flush=True)


def _held_labels(loader):
    """The labels an in-memory ``jcnn.data.Loader`` holds, if its batches carry them as they are
    (a ``batch_augment`` may mix or remap them); ``None`` otherwise."""
    if isinstance(loader, Loader) and not loader.streaming and loader.batch_augment is None:
        return loader.examples[1]
    return None


def _output_width(state, images) -> int:
    """The number of classes: the width of the model's logits (traced, not run)."""
    logits = jax.eval_shape(
        lambda variables, x: state.apply_fn(variables, x, train=False),
        state.variables(),
        images[:1],
    )
    return logits.shape[-1]


def _correct(total: float, labels) -> float:
    """A batch's float32 accuracy times its size as the number of correct predictions it counts
    (per label position: ``F.accuracy`` averages over positions too), an exact integer per
    position, so that a dataset's accuracy is ``correct / count`` to the last digit (15 of 37 is
    0.4054054054054054, where float32 batch means weighted by size gave 0.40540540822); left as
    it is where it is NaN or not within rounding of a count."""
    shape = np.shape(labels)  # (N, ...) of class indices, (N, ..., K) of class probabilities
    positions = math.prod(shape[1:] if np.issubdtype(labels.dtype, np.integer) else shape[1:-1])
    hits = total * positions
    if not (math.isfinite(hits) and positions and abs(hits - round(hits)) < 1e-2):
        return total
    return round(hits) / positions


def _running_weight(running: dict) -> str:
    """The key of ``running`` counting what its sums are sums over: ``examples`` (each batch's
    means weighted by its size), or ``batches`` in a checkpoint written before that, whose epoch
    stays a mean over batches to its end."""
    return "batches" if "batches" in running else "examples"


def _add_batch(running: dict, values: dict, names, size: int, correct: float) -> None:
    """Add a batch of ``size`` examples, ``correct`` of them classified right, and its means
    ``values`` of ``names`` (accuracy aside) to the epoch's ``running`` sums."""
    weight_key = _running_weight(running)
    weight = size if weight_key == "examples" else 1
    for name in names:
        running[name] += values[name] * weight
    running["accuracy"] += correct if weight_key == "examples" else correct / size
    running[weight_key] += weight


def _epoch_means(running: dict, names) -> dict:
    """``train_<name>``: the epoch's mean over its examples (``None`` if every batch was an empty
    Poisson draw)."""
    total = running[_running_weight(running)]
    return {f"train_{n}": running[n] / total if total else None for n in names}


def _batch_size(batch) -> int:
    """The number of examples in a batch (0 for an empty Poisson-sampled batch)."""
    return int(np.shape(batch[0])[0])


def _all_finite(batch) -> bool:
    """Whether a batch's floating arrays are all finite (a NaN input is the data's fault)."""
    return all(
        bool(jnp.isfinite(x).all())
        for x in jax.tree.leaves(batch)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    )


def _new_running(names=()) -> dict:
    """The sums behind an epoch's running train loss, accuracy, metrics (saved in checkpoints):
    each batch's means times its size, and the number of examples."""
    return {"loss": 0.0, "accuracy": 0.0, **{name: 0.0 for name in names}, "examples": 0}


def _loader_kind(loader) -> str:
    if isinstance(loader, Loader) and loader.streaming:
        return "a streaming Loader (Loader.from_source)"
    return type(loader).__name__


def _restandardize(loader, transform, name: str):
    if not isinstance(loader, Loader) or loader.streaming:
        raise TypeError(
            f"{name}: config.standardize needs a jcnn.data.Loader over arrays, got "
            f"{_loader_kind(loader)}"
        )
    images, labels = loader.examples
    return loader.with_examples(transform(images), labels)


def _prepare_data(config, train_loader, val_loader, test_loader, stats):
    """Carve config.val_split, fit and apply config.standardize; the loaders to train on."""
    if config.val_split is None and config.standardize is None:
        return train_loader, val_loader, test_loader, stats
    if config.standardize is not None:
        check_choice(config.standardize, "config.standardize", STANDARDIZE_MODES)
    option = "config.val_split" if config.val_split is not None else "config.standardize"
    if stats is not None and config.standardize is not None:
        raise ValueError(
            "standardize: fit was given fitted statistics and config.standardize asks to fit "
            "them; give one or the other"
        )
    if config.val_split is not None and val_loader is not None:
        raise ValueError("config.val_split: fit was also given a val_loader; give one or the other")
    if not isinstance(train_loader, Loader) or train_loader.streaming:
        raise TypeError(
            f"train_loader: {option} needs a jcnn.data.Loader over arrays (carve the split "
            f"yourself with jcnn.train.split_validation otherwise), got "
            f"{_loader_kind(train_loader)}"
        )
    images, labels = (np.asarray(a) for a in train_loader.examples)
    if config.val_split is not None:
        validation_size(config.val_split, images.shape[0], "config.val_split")  # named as config's
        (images, labels), (val_images, val_labels) = split_validation(
            images, labels, config.val_split, seed=config.val_split_seed
        )
        if images.shape[0] < train_loader.batch_size:
            raise ValueError(
                f"config.val_split: {config.val_split!r} leaves {images.shape[0]} training "
                f"examples, fewer than the batch size {train_loader.batch_size}"
            )

    def transform(x):
        return x

    if config.standardize is not None:
        stats = Standardize.fit(images, mode=config.standardize)
        transform = stats
    if config.standardize is not None and train_loader.augment is not None:
        # the ops work in the images' own units (uint8 0..255, float [0, 1]: color_jitter,
        # trivial_augment... clip there): they augment the raw examples, then the statistics
        # standardize what they made, as the validation and test images are
        augment = compose(train_loader.augment, stats)
        train_loader = train_loader.with_examples(images, labels, augment=augment)
    else:
        train_loader = train_loader.with_examples(transform(images), labels)
    if config.val_split is not None:
        batch_size, sharding = eval_batching(
            val_images.shape[0], config.eval_batch_size, train_loader.sharding
        )
        val_loader = Loader(
            transform(val_images),
            val_labels,
            batch_size=batch_size,
            shuffle=False,
            drop_remainder=False,
            sharding=sharding,
        )
    elif val_loader is not None and config.standardize is not None:
        val_loader = _restandardize(val_loader, transform, "val_loader")
    if test_loader is not None and config.standardize is not None:
        test_loader = _restandardize(test_loader, transform, "test_loader")
    return train_loader, val_loader, test_loader, stats


def _epoch_length_checked(
    batches, epoch: int, start: int, total: int, classes: int | None
) -> Iterator:
    """The batches of ``train_loader.epoch(epoch, start_step=start)``, checked against ``len()``:
    an epoch that yields more or fewer batches than ``len(train_loader)`` is a ``ValueError`` (it
    would never end, or never be counted as complete). NumPy labels are checked against the
    ``classes`` here (unless ``None``), on the host; device arrays are not (that would wait for
    each batch)."""
    try:
        batches = iter(batches)
    except TypeError:
        raise TypeError(
            f"train_loader: expected epoch({epoch}, start_step={start}) to return an iterable of "
            f"(images, labels) batches, got {type(batches).__name__}"
        ) from None
    count = start
    for batch in batches:
        if count == total:
            raise ValueError(
                f"train_loader: len() says {total} batches per epoch, but epoch({epoch}, "
                f"start_step={start}) yields more (expected {total - start} batches)"
            )
        count += 1
        batch = check_batch(batch, f"train_loader.epoch({epoch})")
        if isinstance(batch[1], np.ndarray):
            check_labels(batch[1], classes, f"train_loader.epoch({epoch}) labels")
        yield batch
    if count < total:
        raise ValueError(
            f"train_loader: len() says {total} batches per epoch, but epoch({epoch}, "
            f"start_step={start}) yielded {count - start} (expected {total - start} batches)"
        )


def _calls(batches, step: int, size: int, ends_after) -> Iterator[list]:
    """The batches grouped one compiled call each: ``size`` consecutive batches of one shape, or
    single batches where fewer than ``size`` come before the end or before a step after which
    ``ends_after(step)`` says a call must end (``step``: the global step before the first), and
    where the batches differ in shape (a short last batch)."""
    group = []
    for batch in batches:
        group.append(batch)
        step += 1
        if len(group) == size:
            shapes = {tuple(np.shape(part) for part in each) for each in group}
            yield from [group] if len(shapes) == 1 else ([single] for single in group)
            group = []
        elif ends_after(step):
            yield from ([single] for single in group)
            group = []
    yield from ([single] for single in group)


def _write_history(out: Path, history: list[dict], evaluations: list[dict]) -> None:
    run_folder.write_atomically(out / "history.json", json.dumps(history, indent=1))
    run_folder.write_atomically(out / "evaluations.json", json.dumps(evaluations, indent=1))
    if history:
        fields = list(dict.fromkeys(key for record in history for key in record))
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=fields)
        writer.writeheader()
        writer.writerows(history)
        run_folder.write_atomically(out / "history.csv", table.getvalue())
    _plot_curves(out / "curves.png", history)


_CURVES = (("train", "train", "o-"), ("val", "validation", "s-"), ("test", "test", "^-"))


def _plot_curves(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(k[len("train_") :] for r in history for k in r if k[:6] == "train_"))
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    for name, ax in zip(names, axes[0], strict=True):
        for prefix, label, style in _CURVES:
            values = [h.get(f"{prefix}_{name}") for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, [np.nan if v is None else v for v in values], style, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # none: no value of this metric yet
            ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    run_folder.write_atomically(path, buffer.getvalue())


def _summary(history, evaluations, test, stop_reason, wall, progress, private=None) -> dict:
    # no record: a callback stopped the run before its first step
    last = history[-1] if history else {"epoch": 0, "step": 0, "epsilon": 0.0}
    val_acc = [e["val_accuracy"] for e in evaluations]
    if not val_acc:  # a run resumed from a checkpoint of an older version has no evaluations
        val_acc = [h["val_accuracy"] for h in history if h.get("val_accuracy") is not None]
    # NaN: a diverged loss ranks worst; an accuracy undefined for a custom loss's labels, nowhere
    val_acc = [a for a in val_acc if not math.isnan(a)]
    val_loss = [e["val_loss"] for e in evaluations if not math.isnan(e["val_loss"])]
    summary = {
        "epochs": last["epoch"],
        "steps": last["step"],
        "final_train_loss": last.get("train_loss"),
        "final_train_accuracy": last.get("train_accuracy"),
        "final_val_loss": last.get("val_loss"),
        "final_val_accuracy": last.get("val_accuracy"),
        "best_val_accuracy": max(val_acc) if val_acc else None,
        "best_val_loss": min(val_loss) if val_loss else None,
        "stopped": stop_reason,
        **({f"test_{k}": v for k, v in test.items()} if test is not None else {}),
        **({"epsilon": last["epsilon"], **private.describe()} if private is not None else {}),
        "wall_seconds_this_process": wall,
    }
    lines = ["summary"] + [f"  {k}: {_show(v)}" for k, v in summary.items()]
    progress.print("\n".join(lines))
    return summary


def _show(value) -> str:
    """A summary value: floats to 4 decimals, tiny ones (a DP delta) to 3 significant digits."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.3g}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"


def _prefixed(prefix: str, values: dict) -> dict:
    return {f"{prefix}_{k}": v for k, v in values.items() if k != "count"}


def _format(values: dict, prefix: str) -> str:
    parts = [
        f"{k[len(prefix) + 1 :]} {v:.4f}"
        for k, v in values.items()
        if k[: len(prefix) + 1] == prefix + "_" and v is not None
    ]
    return f"{prefix} " + " ".join(parts)


def fit(
    model: nn.Module,
    train_loader: TrainLoader,
    val_loader: Iterable | None = None,
    config: TrainConfig | None = None,
    *,
    test_loader: Iterable | None = None,
    loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    metrics: Mapping[str, Callable[[jax.Array, jax.Array], jax.Array]] | None = None,
    callbacks: Sequence[Callback] | None = None,
    standardize: Standardize | None = None,
    metadata: dict | None = None,
    settings: dict | None = None,
) -> dict:
    """Train ``model``; evaluate, call back, checkpoint and log as ``config`` says.

    With ``config.out`` the run folder belongs to this call (``jcnn.train.run_folder``): it is
    locked against other processes, ``config.json`` records the full configuration, a resume with
    other settings or without checkpoints is refused, and so is a new run into a folder holding
    one unless ``config.overwrite``. A refused call raises before writing anything there.

    Args:
        model: a Flax module ``__call__(x, train: bool)`` returning logits.
        train_loader: a loader with ``len()``, ``epoch(e, start_step=s)`` and ``batch(e, s)``
            (``jcnn.data.Loader``; see ``jcnn.train.protocol``) yielding floating images and
            integer or soft labels.
        val_loader: the validation set, evaluated each epoch (and every
            ``config.eval_every_steps``); it chooses the best checkpoint and drives early stopping.
            ``None``: none, or the one ``config.val_split`` carves from ``train_loader``.
        config: a ``TrainConfig`` (default ``TrainConfig()``).
        test_loader: the test set, evaluated at the end (``test_*`` in the summary), never used
            to choose anything.
        loss: ``(logits, labels) -> per-example (N,) or mean () loss`` (or ``config.loss``).
        metrics: ``{name: fn(logits, labels) -> scalar}`` (or ``config.metrics``).
        callbacks: a list of callbacks (or ``config.callbacks``; see ``jcnn.train.callbacks``).
        standardize: the fitted ``jcnn.data.Standardize`` already applied to the loaders' images,
            saved in the run folder so that ``load_run`` can apply it to new images (with
            ``config.standardize`` fit computes and saves it itself).
        metadata: JSON-serializable facts saved in ``run.json`` (e.g. the dataset's name): a dict
            with str keys and lists (not tuples), which ``load_run`` gives back as it is.
        settings: what else defines the run and ``fit`` cannot see (dataset, data directory...):
            plain JSON values recorded in ``config.json`` and compared on resume (``data_dir``
            and ``command`` may change).

    Returns:
        ``{"history": [per-epoch records], "evaluations": [...], "summary": {...},
        "state": final TrainState, "standardize": the statistics or None}``.

    Raises:
        NonFiniteLossError: a step's loss was NaN or infinite (the message names the step and
            the newest checkpoint known good: finite, and a finite loss from its parameters).
        CallbackError: a callback raised (the message names it; nothing of that step is saved).
        RunFolderError: the folder is in use, or the start was refused (see above).
        CheckpointError: the checkpoint to resume from is corrupt or does not match.
    """
    config = TrainConfig() if config is None else config
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a jcnn.train.TrainConfig, got {type(config).__name__}")
    for name in ("resume", "overwrite", "progress", "test_every_epoch"):
        check_bool(getattr(config, name), f"config.{name}")
    if config.out is not None and not isinstance(config.out, (str, os.PathLike)):
        raise TypeError(f"config.out: expected a folder path or None, got {config.out!r}")
    if isinstance(config.out, str) and not config.out:  # was silently taken as out=None
        raise ValueError(
            "config.out: expected a folder path, or None to write no run folder, got ''"
        )
    if config.out is not None:  # "~/runs/x" is the user's folder, not a folder named "~"
        config = dataclasses.replace(config, out=os.path.expanduser(config.out))
    arguments = dict(
        test_loader=test_loader,
        loss=loss,
        metrics=metrics,
        callbacks=callbacks,
        standardize=standardize,
        metadata=metadata,
        settings=settings,
    )
    if config.out is None or jax.process_index() != 0:
        return _fit(model, train_loader, val_loader, config, **arguments)
    run_folder.check_start(config.out, resume=config.resume, overwrite=config.overwrite)
    with run_folder.claim(config.out):
        return _fit(model, train_loader, val_loader, config, **arguments)


def _fit(
    model,
    train_loader,
    val_loader,
    config: TrainConfig,
    *,
    test_loader,
    loss,
    metrics,
    callbacks,
    standardize,
    metadata,
    settings,
) -> dict:
    check_model(model)  # first, as the first argument: an NNX model's loader may be none of fit's
    check_train_loader(train_loader)
    check_positive_int(config.epochs, "config.epochs")
    _check_non_negative_int(config.eval_every_steps, "config.eval_every_steps")
    evaluated_again = {
        "val_loader": config.epochs > 1 or config.eval_every_steps > 0,
        "test_loader": config.epochs > 1 and config.test_every_epoch,
    }
    for name, loader in (("val_loader", val_loader), ("test_loader", test_loader)):
        if loader is not None:
            check_eval_loader(loader, name, repeated=evaluated_again[name])
    if (config.resume or config.overwrite) and config.out is None:
        raise ValueError(
            "config.resume, config.overwrite: expected with a run folder (config.out), got out=None"
        )
    if config.max_steps is not None:
        check_positive_int(config.max_steps, "config.max_steps")
    check_positive_int(config.eval_batch_size, "config.eval_batch_size")
    _check_non_negative_int(config.checkpoint_every_epochs, "config.checkpoint_every_epochs")
    _check_non_negative_int(config.checkpoint_every_steps, "config.checkpoint_every_steps")
    check_positive_int(config.keep_last, "config.keep_last")
    check_seed(config.seed, "config.seed")
    check_int(config.val_split_seed, "config.val_split_seed", low=0)
    check_real(config.label_smoothing, "config.label_smoothing", low=0, high=1)
    if not isinstance(config.monitor, str):
        raise TypeError(
            f"config.monitor: expected a metric name such as 'val_accuracy', got {config.monitor!r}"
        )
    check_choice(config.monitor_mode, "config.monitor_mode", ("max", "min"))
    _refuse_without_evaluation(config, val_loader, test_loader)
    check_dp_config(config)
    no_grad_from = no_grad_epochs(config.no_grad, "config.no_grad")
    check_positive_int(config.steps_per_call, "config.steps_per_call")
    if config.steps_per_call > 1 and (dp_enabled(config) or config.devices is not None):
        raise ValueError(
            f"config.steps_per_call: expected 1 with DP-SGD or devices (their steps run one per "
            f"call), got {config.steps_per_call}"
        )
    mesh = _mesh(config.devices)
    loss_fn = check_loss_fn(_either(loss, config.loss, "loss", None), "loss")
    if loss_fn is not None and config.label_smoothing:
        raise ValueError(
            "config.label_smoothing: applies to the default cross-entropy only, not to a custom "
            "loss (smooth inside your loss)"
        )
    pairs = metric_pairs(_either(metrics, config.metrics, "metrics", {}))
    extra_names = [name for name, _ in pairs]
    # what the running sums of a training epoch hold besides loss and accuracy
    running_names = [*extra_names, *(["clipped_fraction"] if dp_enabled(config) else [])]
    callbacks = _check_callbacks(_either(callbacks, config.callbacks, "callbacks", ()))
    if standardize is not None and not isinstance(standardize, Standardize):
        raise TypeError(
            "standardize: expected a fitted jcnn.data.Standardize, got "
            f"{type(standardize).__name__}"
        )
    if metadata is not None:  # load_run refuses a run.json whose metadata is not a dict
        if not isinstance(metadata, dict):
            raise TypeError(
                f"metadata: expected a JSON-serializable dict, got {type(metadata).__name__}"
            )
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as error:
            raise TypeError(f"metadata: expected a JSON-serializable dict ({error})") from error
        _check_json_round_trip(metadata, "metadata")  # load_run gives back what was given
    given_train_loader = train_loader
    train_loader, val_loader, test_loader, stats = _prepare_data(
        config, train_loader, val_loader, test_loader, standardize
    )
    has_val = val_loader is not None
    val_names = ["val_loss", "val_accuracy", *[f"val_{n}" for n in extra_names]]
    monitorable = val_names + ["train_loss", "train_accuracy", *[f"train_{n}" for n in extra_names]]
    if config.monitor not in monitorable:
        raise ValueError(
            f"config.monitor: expected one of {', '.join(monitorable)}, got {config.monitor!r}"
        )
    steps_per_epoch = loader_length(train_loader)
    if steps_per_epoch < 1:
        raise ValueError("train_loader: expected at least one batch per epoch, got 0")
    compute_dtype = _compute_dtype(config)
    private = None
    if dp_enabled(config):
        private = DPTraining.create(config, train_loader, _total_steps(config, steps_per_epoch))
    schedule = build_schedule(config, steps_per_epoch)
    tx = _build_optimizer(config, schedule)
    if isinstance(config.optimizer, (optax.GradientTransformation, optax.MultiSteps)):
        schedule = None  # the optimizer's own rate: not known here
    sample_images, sample_labels = check_batch(train_loader.batch(0, 0), "train_loader.batch(0, 0)")
    if _batch_size((sample_images, sample_labels)) == 0:
        # an empty Poisson draw: the model is built and traced on a zero example of its shapes
        sample_images = np.zeros((1, *np.shape(sample_images)[1:]), sample_images.dtype)
        sample_labels = np.zeros((1, *np.shape(sample_labels)[1:]), sample_labels.dtype)
    try:
        state = TrainState.create(
            model,
            tx,
            jax.random.key_data(jax.random.fold_in(seed_key(config.seed), MODEL_STREAM)),
            jnp.asarray(sample_images[:1]),
        )
    except (TypeError, ValueError) as error:
        if config.standardize is None and np.issubdtype(sample_images.dtype, np.integer):
            raise type(error)(
                f"train_loader: its images are {sample_images.dtype}, which the model refused; "
                "set config.standardize (e.g. 'per_channel') or give the loader float images "
                f"(e.g. images / 255): {error}"
            ) from error
        if config.standardize != "pca":
            raise
        raise type(error)(
            f"config.standardize: 'pca' gives the model each image as a vector of its "
            f"{np.shape(sample_images)[-1]} principal components, shape "
            f"{tuple(np.shape(sample_images))}, which the model refused (a convolution needs "
            f"images: 'zca' whitens them and keeps their shape): {error}"
        ) from error
    split_no_grad(state.params, tuple(no_grad_from), "config.no_grad")  # each names a parameter
    # a custom loss may read integer labels its own way (one logit and labels 0/1): unchecked
    classes = _output_width(state, sample_images) if loss_fn is None else None
    for name, loader in (
        ("train_loader", train_loader),
        ("val_loader", val_loader),
        ("test_loader", test_loader),
    ):
        labels = _held_labels(loader)
        if labels is not None:
            check_labels(labels, classes, f"{name} labels")
    check_labels(sample_labels, classes, "train_loader.batch(0, 0) labels")
    _check_optimizer_update(tx, state.params)
    if private is not None:
        private.check_model(
            state, (sample_images, sample_labels), compute_dtype=compute_dtype, loss_fn=loss_fn
        )

    out = Path(config.out) if config.out else None
    manager = None
    if out is not None:
        # what defines the run, as fit uses it (loss, metrics, callbacks given here or in config)
        effective = dataclasses.replace(
            config, loss=loss_fn, metrics=dict(pairs) or None, callbacks=callbacks
        )
        config_record = run_folder.run_record(effective, model, given_train_loader, settings)
        if standardize is not None:
            config_record["standardize"] = run_folder.describe(standardize)
        run_folder.check_start(
            out, resume=config.resume, overwrite=config.overwrite, record=config_record
        )
        if config.resume:
            manager = CheckpointManager(
                out / "checkpoints", keep_last=config.keep_last, mode=config.monitor_mode
            )

    if private is None:
        # Traced once here (the compiled step reuses the trace): a loss or metric that does not
        # fit the model is refused before the run folder is written.
        jax.eval_shape(
            lambda state, batch: train_step(
                state,
                batch,
                compute_dtype=compute_dtype,
                label_smoothing=config.label_smoothing,
                loss_fn=loss_fn,
                metrics=pairs,
                no_grad=no_grad_at(no_grad_from, 0),
            ),
            state,
            (sample_images, sample_labels),
        )
    for name, loader in (("val_loader", val_loader), ("test_loader", test_loader)):
        _check_evaluation_input(
            state,
            loader,
            name,
            sample_images,
            compute_dtype=compute_dtype,
            loss_fn=loss_fn,
            metrics=pairs,
        )

    history: list[dict] = []
    evaluations: list[dict] = []
    epoch, start_batch = 0, 0
    running = _new_running(running_names)
    stop_reason = None
    progress = _Progress(config.progress)
    pending = None  # a checkpoint whose parameters the next step's loss will judge
    if config.resume and manager is not None:
        resume_step = manager.resume_step()
        if resume_step is None:
            raise CheckpointError(
                f"nothing to resume in {manager.directory}: every checkpoint holds non-finite "
                "values or produced a non-finite loss"
            )
        state, meta = manager.restore(state, resume_step)
        epoch, start_batch = meta["epoch"], meta["batch"]
        running, history = meta["running"], meta["history"]
        evaluations = meta.get("evaluations", [])
        stop_reason = meta.get("stopped")
        if epoch > config.epochs:
            raise run_folder.RunFolderError(
                f"cannot resume {out}: it has already trained {epoch} epochs, more than the "
                f"{config.epochs} asked for (config.epochs); a resume may extend a run, not "
                "shorten it",
                out,
            )
        if config.max_steps is not None and int(state.step) > config.max_steps:
            raise run_folder.RunFolderError(
                f"cannot resume {out}: it has already trained {int(state.step)} steps, more than "
                f"max_steps={config.max_steps} (config.max_steps); a resume may extend a run, "
                "not shorten it",
                out,
            )
        if "callbacks" in meta:
            _restore_callbacks(callbacks, meta["callbacks"])
        pending = resume_step
        progress.print(
            f"resumed from {manager.path(resume_step)} (epoch {epoch + 1}, batch {start_batch})"
        )
    if mesh is not None:
        state = parallel.replicate(state, mesh)

    run = RunContext(
        config=config,
        steps_per_epoch=steps_per_epoch,
        out=out,
        has_validation=has_val,
        validation_metrics=val_names if has_val else (),
    )
    run.history, run.evaluations, run.stop_reason = history, evaluations, stop_reason
    run.state, run.step, run.epoch, run.batch = state, int(state.step), epoch, start_batch

    def save(metric=None):
        nonlocal pending
        meta = {
            "epoch": epoch,
            "batch": batch_index,
            "running": running,
            "history": history,
            "evaluations": evaluations,
            "callbacks": _callback_states(callbacks),
            "stopped": run.stop_reason,
        }
        # the parameters' loss on the batch they last trained on: finite or not; an empty batch
        # (Poisson sampling) gives no loss to judge by (its mean would be NaN, not the params')
        status = "unverified"
        if _batch_size(batch) > 0:
            check = jax.device_get(
                eval_step(state, tuple(batch), compute_dtype=compute_dtype, loss_fn=loss_fn)
            )
            status = "good" if math.isfinite(float(check["loss"])) else "bad"
        manager.save(int(state.step), state, meta, metric=metric, status=status)
        pending = int(state.step)

    def validate():
        values = _evaluate(
            state, val_loader, "val_loader", compute_dtype, mesh, loss_fn, pairs, classes
        )
        entry = {"step": int(state.step), "epoch": epoch + 1, **_prefixed("val", values)}
        evaluations.append(entry)
        _call(callbacks, "on_evaluation", run, dict(entry))
        return entry

    def finished():
        return (
            run.stop_reason is not None
            or epoch >= config.epochs
            or (config.max_steps is not None and int(state.step) >= config.max_steps)
        )

    crash_after = int(os.environ.get(CRASH_AFTER_STEP_ENV, "-1"))

    options = dict(
        compute_dtype=compute_dtype,
        label_smoothing=config.label_smoothing,
        loss_fn=loss_fn,
        metrics=pairs,
    )

    def call_ends_after(step):
        """Whether a compiled call must end after this step: fit needs the state there."""
        every = (config.eval_every_steps, config.checkpoint_every_steps)
        return any(n and step % n == 0 for n in every) or step in (config.max_steps, crash_after)

    def run_calls(epoch, start_batch):
        """Trains on the epoch's batches from ``start_batch``, one compiled call per group of
        ``_calls``, and yields ``(batch, metrics, step, whether the call ended there)`` per step."""
        nonlocal state
        batches = _epoch_length_checked(
            train_loader.epoch(epoch, start_step=start_batch),
            epoch,
            start_batch,
            steps_per_epoch,
            classes,
        )
        options["no_grad"] = no_grad_at(no_grad_from, epoch)
        for group in _calls(batches, int(state.step), config.steps_per_call, call_ends_after):
            try:
                if len(group) > 1:
                    stacked = tuple(jnp.stack(parts) for parts in zip(*group, strict=True))
                    state, step_metrics = train_steps(state, stacked, **options)
                    columns = jax.device_get(step_metrics)
                    per_step = [
                        {k: float(v[i]) for k, v in columns.items()} for i in range(len(group))
                    ]
                else:
                    if mesh is not None:
                        group = [_place_batch(group[0], mesh)]
                    if private is not None:
                        state, step_metrics = private.step(state, group[0], **options)
                    else:
                        state, step_metrics = train_step(state, tuple(group[0]), **options)
                    per_step = [{k: float(v) for k, v in jax.device_get(step_metrics).items()}]
            except flax.errors.ScopeParamShapeError as error:  # images the weights cannot take
                raise ValueError(
                    f"train_loader.epoch({epoch}): expected batches the model trains on like "
                    f"its first, images {tuple(np.shape(sample_images))}, got images "
                    f"{tuple(np.shape(group[0][0]))}, which its parameters cannot take "
                    f"({str(error).split(' (https')[0]})"
                ) from None
            first_step = int(state.step) - len(group)
            for offset, (batch, values) in enumerate(zip(group, per_step, strict=True)):
                yield batch, values, first_step + offset + 1, offset == len(group) - 1

    started = time.perf_counter()
    # XLA's SPMD partitioner cannot split the oneDNN custom calls over the batch: it would gather
    # the whole batch onto every device for each convolution.
    several_devices = mesh is not None and mesh.size > 1
    batch_index = start_batch
    with progress, native.conv_backend_scope("xla" if several_devices else None):
        _call(callbacks, "on_train_begin", run)
        if out is not None:
            _callback_states(callbacks)  # saved with each checkpoint: refused before any write
            # only now: a refused start (a callback's configuration mistake included) or a failed
            # restore leaves the folder as it was
            if config.overwrite and jax.process_index() == 0:
                run_folder.clear(out)
            if jax.process_count() > 1:  # nobody opens the checkpoints while process 0 clears
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("jcnn_run_folder_ready")
            if manager is None:
                manager = CheckpointManager(
                    out / "checkpoints", keep_last=config.keep_last, mode=config.monitor_mode
                )
            if jax.process_index() == 0:
                run_folder.write_config(out, config_record)
                description = runs.run_description(model, sample_images, metadata)
                run_folder.write_atomically(out / runs.RUN_FILE, json.dumps(description, indent=1))
                if stats is not None:
                    runs.save_standardize(out / runs.STANDARDIZE_FILE, stats)
        while not finished():
            progress.start(f"epoch {epoch + 1}/{config.epochs}", steps_per_epoch, start_batch)
            epoch_start = time.perf_counter()
            images_this_process = 0
            batch_index = start_batch
            last_evaluation = None
            for batch, values, step, call_ended in run_calls(epoch, start_batch):
                loss_value = values["loss"]
                if not math.isfinite(loss_value):
                    check_labels(batch[1], classes, f"train_loader.epoch({epoch}) labels")
                    kept = ""
                    finite_inputs = _all_finite(batch)
                    if manager is not None:
                        if pending == step - 1 and finite_inputs:
                            manager.mark(pending, "bad")  # its parameters gave this loss
                        last = manager.last_good_step()
                        kept = (
                            f"; last good checkpoint: step {last} ({manager.path(last)})"
                            if last is not None
                            else "; no checkpoint is known good"
                        )
                    cause = (
                        ""
                        if finite_inputs
                        else (
                            "; the batch itself holds NaN or infinite values (the training data's "
                            "fault, not the learning rate's)"
                        )
                    )
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss_value}) at step {step} (epoch {epoch + 1}, batch "
                        f"{batch_index + 1}); training stopped{kept}{cause}"
                    )
                if pending is not None:
                    if pending == step - 1 and _batch_size(batch) > 0:  # a loss of examples
                        manager.mark(pending, "good")
                    pending = None
                batch_index += 1
                if _batch_size(batch) > 0:  # an empty (Poisson) batch has no mean to count
                    # the batch's fraction correct as its count makes it (float32's k/n is not)
                    n = _batch_size(batch)
                    correct = _correct(values["accuracy"] * n, batch[1])
                    values["accuracy"] = correct / n
                    _add_batch(running, values, ("loss", *running_names), n, correct)
                images_this_process += int(batch[0].shape[0])
                if batch_index % 10 == 0 or batch_index == steps_per_epoch:
                    rate = images_this_process / max(time.perf_counter() - epoch_start, 1e-9)
                    lr = f"lr {_rate_at(schedule, step):.3g} " if schedule is not None else ""
                    total = running[_running_weight(running)]
                    means = (
                        f"loss {running['loss'] / total:.4f} acc {running['accuracy'] / total:.4f} "
                        if total
                        else "no examples yet "
                    )
                    progress.update(batch_index, f"{means}{lr}{rate:,.0f} img/s")
                run.state, run.step, run.epoch, run.batch = state, step, epoch, batch_index
                _call(callbacks, "on_step", run, values)
                if (
                    has_val
                    and config.eval_every_steps
                    and step % config.eval_every_steps == 0
                    and batch_index < steps_per_epoch
                ):
                    last_evaluation = validate()
                if not call_ended:
                    continue
                if finished():
                    break
                if (
                    manager is not None
                    and config.checkpoint_every_steps
                    and step % config.checkpoint_every_steps == 0
                    and batch_index < steps_per_epoch
                ):
                    save()
                if step == crash_after and batch_index < steps_per_epoch:
                    os._exit(17)
            seconds = time.perf_counter() - epoch_start
            step = int(state.step)
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": step,
                **_epoch_means(running, ("loss", "accuracy", *running_names)),
                **dict.fromkeys(val_names),
                "learning_rate": _rate_at(schedule, step) if schedule is not None else None,
                "seconds": seconds,
                "images_per_second": images_this_process / max(seconds, 1e-9),
            }
            if private is not None:  # the privacy spent by the steps taken so far
                record["epsilon"] = private.epsilon(step)
            if has_val:
                reuse = last_evaluation is not None and last_evaluation["step"] == step
                entry = last_evaluation if reuse else validate()
                record.update({k: entry[k] for k in val_names})
            if test_loader is not None and config.test_every_epoch:
                test = _evaluate(
                    state, test_loader, "test_loader", compute_dtype, mesh, loss_fn, pairs, classes
                )
                record.update(_prefixed("test", test))
            if history and history[-1]["epoch"] == record["epoch"]:
                history.pop()  # the record of this epoch stopped part-way (max_steps) and resumed
            history.append(record)
            progress.print(
                f"epoch {epoch + 1}: {_format(record, 'train')}"
                + (f" | {_format(record, 'val')}" if has_val else "")
                + (f" | {_format(record, 'test')}" if "test_loss" in record else "")
                + (f" | epsilon {record['epsilon']:.3f}" if "epsilon" in record else "")
                + f" | {record['images_per_second']:,.0f} img/s, {seconds:.1f}s"
                + (" (stopped mid-epoch)" if batch_index < steps_per_epoch else "")
            )
            _call(callbacks, "on_epoch_end", run, dict(record))
            completed = batch_index == steps_per_epoch
            if completed:
                epoch, start_batch, batch_index = epoch + 1, 0, 0
                running = _new_running(running_names)
            run.epoch, run.batch = epoch, batch_index
            if out is not None:
                if jax.process_index() == 0:
                    _write_history(out, history, evaluations)
                every = config.checkpoint_every_epochs
                every_steps = config.checkpoint_every_steps
                if (
                    finished()
                    or (every and completed and epoch % every == 0)
                    # a step save due at an epoch's end happens here, after its record
                    or (every_steps and step % every_steps == 0)
                ):
                    save(metric=record.get(config.monitor))
                if int(state.step) == crash_after:
                    os._exit(17)
        if run.stop_reason is not None:
            progress.print(f"stopped: {run.stop_reason}")
        _call(callbacks, "on_train_end", run)
    test = None
    if test_loader is not None:
        last = history[-1] if history else {}
        if "test_loss" in last and last["step"] == int(state.step):
            test = {k[len("test_") :]: v for k, v in last.items() if k.startswith("test_")}
        else:
            test = _evaluate(
                state, test_loader, "test_loader", compute_dtype, mesh, loss_fn, pairs, classes
            )
            test.pop("count")
    wall = time.perf_counter() - started
    summary = _summary(history, evaluations, test, run.stop_reason, wall, progress, private)
    if out is not None and jax.process_index() == 0:
        run_folder.write_atomically(out / "summary.json", json.dumps(summary, indent=1))
    return {
        "history": history,
        "evaluations": evaluations,
        "summary": summary,
        "state": state,
        "standardize": stats,
    }
