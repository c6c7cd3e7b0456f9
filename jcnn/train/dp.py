"""DP-SGD in ``fit``: the private training step and the privacy spent so far.

``fit`` trains with DP-SGD when ``TrainConfig.dp_noise_multiplier`` or ``dp_target_epsilon`` is
set. Each step takes ``jcnn.analysis.private_grad`` (per-example gradients clipped to
``dp_clip_norm`` with ghost norms, summed, Gaussian noise of standard deviation
``noise_multiplier * dp_clip_norm``, divided by the expected batch size) as the gradient of the
configured optimizer, and each epoch's record gets ``epsilon`` at ``dp_delta`` from
``jcnn.analysis.dp_epsilon`` at the state's step count. See docs/privacy.md for what the reported
epsilon assumes.

Sampling is the training loader's: with ``jcnn.data.Loader(sampling="poisson")`` the batches are
what the accountant assumes (padded here to a few sizes, the padding weighted 0); with shuffled
fixed-size batches (``sampling="shuffle"``) the reported epsilon treats them as Poisson batches of
the same rate, the approximation most DP papers (and Opacus' examples) make.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcnn.analysis import dp_epsilon, dp_noise_multiplier, pad_batch, private_grad
from jcnn.analysis.dp import _check_denominator, _check_weight_values
from jcnn.analysis.per_example import _batch_norm_message, per_example_trace
from jcnn.data.loader import poisson_pad_multiple
from jcnn.functional._checks import _is_real_scalar, check_real, is_int
from jcnn.train.param_groups import split_no_grad
from jcnn.train.state import TrainState
from jcnn.train.steps import (
    STEP_OPTIONS,
    _check_batch,
    batch_accuracy,
    batch_metrics,
    jit_with_options,
    loss_and_logits,
)

__all__ = ["dp_train_step", "DPTraining", "dp_enabled", "check_dp_config"]

_ACCOUNTANTS = ("rdp", "pld")
_DEFAULT_CLIP_NORM = 1.0
_DEFAULT_DELTA = 1e-5

_FIT_BATCH_NORM_MESSAGE = (
    "model: DP-SGD (config.dp_noise_multiplier / config.dp_target_epsilon) needs per-example "
    "gradients, but the model computes BatchNorm statistics in training mode: an example's "
    "gradient would depend on every other example of its batch, so clipping it bounds nobody's "
    "influence (and computed per example, each would be normalized by its own statistics). "
    "Ways out: (1) GroupNorm instead of BatchNorm: fit(jcnn.analysis.replace_batch_norm(model), "
    "...), the usual choice for DP-SGD; (2) frozen statistics: a model whose BatchNorm layers run "
    "with train=False (running statistics from public data); (3) a model without BatchNorm"
)


def _running_statistics_message(who: str, paths: list[str]) -> str:
    return (
        f"{who} keeps no running statistics, but the model updates running statistics in "
        f"training mode ({', '.join(paths)}; e.g. InstanceNorm(track_running_stats=True)): "
        "computed from the private examples they would be released without noise, and left at "
        "their initial values they would be what evaluation normalizes with. Ways out: "
        "InstanceNorm(track_running_stats=False), or those layers run with train=False"
    )


def _updated_statistics(state, images, labels, dropout_key, *, compute_dtype, loss_fn):
    """The ``batch_stats`` paths that a training-mode pass updates: those whose traced new value
    is not the old one passed through (the DP step keeps none of them)."""

    def new_statistics(statistics):
        return loss_and_logits(
            state.params,
            state.replace(batch_stats=statistics),
            images,
            labels,
            train=True,
            dropout_key=dropout_key,
            compute_dtype=compute_dtype,
            loss_fn=loss_fn,
        )[1][1]

    jaxpr = jax.make_jaxpr(new_statistics)(state.batch_stats).jaxpr
    paths = jax.tree_util.tree_flatten_with_path(state.batch_stats)[0]
    return [
        jax.tree_util.keystr(path, simple=True, separator="/")
        for (path, _), new, old in zip(paths, jaxpr.outvars, jaxpr.invars, strict=True)
        if new is not old
    ]


def dp_enabled(config) -> bool:
    """Whether ``config`` asks for DP-SGD (a noise multiplier or a target epsilon)."""
    return config.dp_noise_multiplier is not None or config.dp_target_epsilon is not None


def _as_number(value):
    """A concrete 0-d real NumPy/JAX array as a float (as ``check_real`` takes it), else
    ``value`` as it is."""
    return float(value) if _is_real_scalar(value) else value


def _finite_number(value, name: str, *, allow_zero: bool = False) -> float:
    value = _as_number(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")
    return float(value)


def check_dp_config(config) -> None:
    """Raise ``ValueError`` naming the ``TrainConfig`` field for a bad or contradictory DP setting.

    The numbers alone: a non-positive clip norm, a negative noise multiplier, delta outside
    (0, 1), a non-positive target epsilon, both a noise multiplier and a target, DP settings
    without DP, DP over several devices. What needs the data (a target that no noise level
    reaches, BatchNorm in the model, the loader) is checked by ``DPTraining.create``.
    """
    if not dp_enabled(config):
        for name, default in (("dp_clip_norm", _DEFAULT_CLIP_NORM), ("dp_delta", _DEFAULT_DELTA)):
            value = getattr(config, name)
            # True equals the default clip norm 1.0, but is no clip norm: set, and refused
            if isinstance(value, (bool, np.bool_)) or value != default:
                raise ValueError(
                    f"config.{name}: applies to DP-SGD only (set config.dp_noise_multiplier or "
                    f"config.dp_target_epsilon), got {value!r}"
                )
        if config.dp_accountant != "rdp":
            raise ValueError(
                "config.dp_accountant: applies to DP-SGD only (set config.dp_noise_multiplier or "
                f"config.dp_target_epsilon), got {config.dp_accountant!r}"
            )
        return
    if config.dp_noise_multiplier is not None and config.dp_target_epsilon is not None:
        raise ValueError(
            "config.dp_noise_multiplier, config.dp_target_epsilon: give one, not both (got "
            f"{config.dp_noise_multiplier!r} and {config.dp_target_epsilon!r})"
        )
    if config.dp_noise_multiplier is not None:
        _finite_number(config.dp_noise_multiplier, "config.dp_noise_multiplier", allow_zero=True)
    else:
        _finite_number(config.dp_target_epsilon, "config.dp_target_epsilon")
    _finite_number(config.dp_clip_norm, "config.dp_clip_norm")
    delta = _as_number(config.dp_delta)
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ValueError(f"config.dp_delta: expected a number in (0, 1), got {delta!r}")
    if config.dp_accountant not in _ACCOUNTANTS:
        raise ValueError(
            f"config.dp_accountant: expected one of {', '.join(_ACCOUNTANTS)}, got "
            f"{config.dp_accountant!r}"
        )
    devices = config.devices  # its type is make_mesh's to check
    if _is_real_scalar(devices) and devices > 1:
        raise ValueError(
            f"config.devices: DP-SGD in fit runs on one device, got devices={config.devices!r}"
        )


def _example_keys(state: TrainState, size: int):
    """Each example's dropout key and the step's noise key, both from ``fold_in(key, step)``."""
    step_key = jax.random.fold_in(state.key, state.step)
    examples = jax.random.split(jax.random.fold_in(step_key, 0), size)
    return examples, jax.random.fold_in(step_key, 1)


_DP_STEP_OPTIONS = {
    "l2_norm_clip": lambda c: check_real(c, "l2_norm_clip", low=0, low_open=True),
    "noise_multiplier": lambda s: check_real(s, "noise_multiplier", low=0),
    **{k: STEP_OPTIONS[k] for k in ("compute_dtype", "label_smoothing", "loss_fn", "no_grad")},
}


def _check_values(arguments) -> None:
    if arguments.get("weights") is not None:
        _check_weight_values(arguments["weights"])
    if arguments.get("denominator") is not None:
        _check_denominator(arguments["denominator"])


@jit_with_options(_DP_STEP_OPTIONS, donate_argnums=(0,), check_values=_check_values)
def dp_train_step(
    state: TrainState,
    batch,
    weights=None,
    denominator=None,
    *,
    l2_norm_clip: float,
    noise_multiplier: float,
    compute_dtype=None,
    label_smoothing: float = 0.0,
    loss_fn=None,
    no_grad: tuple[str, ...] = (),
):
    """One DP-SGD step: per-example clipping (ghost norms), summed, noised, averaged, applied.

    The gradient is ``jcnn.analysis.private_grad`` of the training loss, each example computed
    alone (its own dropout key), then ``state.tx`` updates the parameters as in ``train_step``.
    The keys of step ``t`` derive from ``k = fold_in(state.key, t)``: example ``i``'s dropout key
    is ``split(fold_in(k, 0), N)[i]`` and the noise key is ``fold_in(k, 1)``, so a run is a pure
    function of its seeds and batches (exact resume).

    Args:
        state: the ``TrainState`` (invalid after the call: its buffers are donated). Its model
            must not compute BatchNorm statistics in training mode (see
            ``jcnn.analysis.replace_batch_norm``).
        batch: ``(images, labels)`` as for ``train_step``.
        weights: ``(N,)`` 1 for a real example, 0 for padding (``jcnn.analysis.pad_batch``), or
            ``None``: every example is real.
        denominator: what the noised sum is divided by: the expected batch size under Poisson
            sampling (required with ``weights``); ``None``: ``N``.
        l2_norm_clip: the per-example clip norm ``C`` > 0.
        noise_multiplier: ``sigma`` >= 0; the noise's standard deviation is ``sigma * C``.
        compute_dtype, label_smoothing, loss_fn: as for ``train_step``.
        no_grad: as for ``train_step``: the named parameters are neither differentiated nor
            noised (they are public constants of the step; their private gradient is zero).

    Raises:
        ValueError: the model updates running statistics in training mode (BatchNorm, or
            ``InstanceNorm(track_running_stats=True)``): the step keeps none. Also weights
            outside ``[0, 1]`` and a denominator that is not a finite number > 0 (when given
            as concrete values: traced inside another ``jit``, only their shapes are checked).

    Returns:
        ``(new_state, metrics, logits)``: ``metrics`` has ``loss`` and ``accuracy`` (means over
        the real examples, before the update, in training mode), ``clipped_fraction`` (the share
        of real examples whose gradient norm exceeded ``C``) and ``grad_norm`` (of the private
        gradient); ``logits`` are the ``(N, K)`` training-mode logits. Only the update is
        private: these values come from the raw data.
    """
    images, labels = _check_batch(state, batch)
    size = images.shape[0]
    example_keys, noise_key = _example_keys(state, size)
    if weights is not None:  # a list of weights reaches here as a list of traced scalars
        weights = jnp.asarray(weights)

    def example_loss_and_logits(params, example):
        x, y, key = example
        loss, (logits, _) = loss_and_logits(
            params,
            state,
            x,
            y,
            train=True,
            dropout_key=key[0],
            compute_dtype=compute_dtype,
            label_smoothing=label_smoothing,
            loss_fn=loss_fn,
        )
        return loss, logits

    if size:  # the labels checked against the batch's logits (per example: a batch of one's)
        jax.eval_shape(
            lambda: loss_and_logits(
                state.params,
                state,
                images,
                labels,
                train=True,
                dropout_key=noise_key,
                compute_dtype=compute_dtype,
                label_smoothing=label_smoothing,
                loss_fn=loss_fn,
            )
        )
    examples = (images, labels, example_keys)
    leaves, merge, fill = split_no_grad(state.params, no_grad)
    leaf_grads, norms = private_grad(
        lambda leaves, example: example_loss_and_logits(merge(leaves), example)[0],
        leaves,
        examples,
        noise_key,
        l2_norm_clip=l2_norm_clip,
        noise_multiplier=noise_multiplier,
        weights=weights,
        denominator=denominator,
    )
    # after private_grad, whose trace names the ways out of train-mode BatchNorm; traced only, so
    # an empty batch (Poisson sampling draws them) is traced on a stand-in example and any key
    first = jax.tree.map(lambda a: a[:1] if size else jnp.zeros((1, *a.shape[1:]), a.dtype), batch)
    updated = _updated_statistics(
        state,
        *first,
        noise_key,
        compute_dtype=compute_dtype,
        loss_fn=loss_fn,
    )
    if updated:
        raise ValueError(_running_statistics_message("state: dp_train_step", updated))
    grad = fill(leaf_grads)
    updates, new_opt_state = state.tx.update(grad, state.opt_state, state.params)

    def one(example):
        loss, logits = example_loss_and_logits(
            state.params, jax.tree.map(lambda leaf: leaf[None], example)
        )
        hit = batch_accuracy(logits, jax.tree.map(lambda leaf: leaf[None], example[1]), loss_fn)
        return loss, hit, logits[0]

    losses, hits, logits = jax.vmap(one)(examples)
    w = jnp.ones((size,), jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
    count = jnp.maximum(jnp.sum(w), 1.0)
    metrics = {
        "loss": jnp.sum(w * losses) / count,
        "accuracy": jnp.sum(w * hits) / count,
        "clipped_fraction": jnp.sum(w * (norms > l2_norm_clip)) / count,
        "grad_norm": optax.tree.norm(grad),
    }
    new_state = state.replace(
        params=optax.apply_updates(state.params, updates),
        opt_state=new_opt_state,
        step=state.step + 1,
    )
    return new_state, metrics, logits


_jit_batch_metrics = jax.jit(batch_metrics, static_argnums=0)


class DPTraining:
    """DP-SGD inside ``fit``: the noise multiplier, the step on each batch, epsilon so far.

    Built by ``DPTraining.create`` from a checked ``TrainConfig`` and the training loader.

    Attributes:
        noise_multiplier: ``sigma``, given or calibrated to ``dp_target_epsilon`` over the run's
            steps (``epochs`` or ``max_steps``).
        sampling_rate: ``batch_size / num_examples`` of the loader.
        sampling: the loader's sampling, ``"poisson"`` (what the accountant assumes) or
            ``"shuffle"`` (fixed-size batches, accounted as if Poisson).
        clip_norm, delta, accountant: from the config.
    """

    def __init__(
        self, noise_multiplier, sampling_rate, *, sampling, batch_size, clip_norm, delta, accountant
    ):
        self.noise_multiplier = float(noise_multiplier)
        self.sampling_rate = float(sampling_rate)
        self.sampling = sampling
        self.batch_size = int(batch_size)
        self.clip_norm = float(clip_norm)
        self.delta = float(delta)
        self.accountant = accountant
        self.pad_multiple = poisson_pad_multiple(self.batch_size)

    @classmethod
    def create(cls, config, loader, total_steps: int) -> DPTraining:
        """The DP-SGD of ``config`` (checked by ``check_dp_config``) on ``loader``'s batches.

        Raises:
            TypeError: the loader does not say its batch size and number of examples.
            ValueError: the loader mixes examples (``batch_augment``: mixup, cutmix), or no noise
                multiplier reaches ``config.dp_target_epsilon`` in ``total_steps`` steps.
        """
        batch_size = getattr(loader, "batch_size", None)
        num_examples = getattr(loader, "num_examples", None)
        if not (is_int(batch_size) and is_int(num_examples)):
            raise TypeError(
                "train_loader: DP-SGD's accounting needs the loader's batch_size and num_examples "
                f"(the sampling rate) as ints; {type(loader).__name__} has batch_size="
                f"{batch_size!r}, num_examples={num_examples!r}; use jcnn.data.Loader"
            )
        batch_size, num_examples = int(batch_size), int(num_examples)
        if getattr(loader, "batch_augment", None) is not None:
            raise ValueError(
                "train_loader: its batch_augment mixes examples (mixup, cutmix), so one example "
                "reaches several gradients and DP-SGD's clipping bounds nothing; use per-example "
                "augmentation (augment=...) with DP-SGD"
            )
        sampling = getattr(loader, "sampling", "shuffle")
        rate = batch_size / num_examples
        sigma = config.dp_noise_multiplier
        if sigma is None:
            try:
                sigma = dp_noise_multiplier(
                    config.dp_target_epsilon,
                    rate,
                    total_steps,
                    config.dp_delta,
                    accountant=config.dp_accountant,
                )
            except ValueError as error:  # "target_epsilon: 0.1 is not reached by ..."
                reason = str(error).removeprefix("target_epsilon: ")
                raise ValueError(f"config.dp_target_epsilon: {reason}") from None
        return cls(
            sigma,
            rate,
            sampling=sampling,
            batch_size=batch_size,
            clip_norm=config.dp_clip_norm,
            delta=config.dp_delta,
            accountant=config.dp_accountant,
        )

    @staticmethod
    def check_model(state: TrainState, sample, *, compute_dtype=None, loss_fn=None) -> None:
        """Raise ``ValueError`` (naming the ways out) if the model computes BatchNorm statistics
        or updates any running statistics in training mode; traces one example, computes
        nothing."""
        example = tuple(a[:1] for a in sample)
        keys, _ = _example_keys(state, 1)

        def loss(params):
            return loss_and_logits(
                params,
                state,
                *example,
                train=True,
                dropout_key=keys[0],
                compute_dtype=compute_dtype,
                loss_fn=loss_fn,
            )[0]

        try:
            with per_example_trace("fit"):
                jax.eval_shape(loss, state.params)
        except ValueError as error:
            if str(error) == _batch_norm_message("fit"):
                raise ValueError(_FIT_BATCH_NORM_MESSAGE) from None
            raise
        updated = _updated_statistics(
            state, *example, keys[0], compute_dtype=compute_dtype, loss_fn=loss_fn
        )
        if updated:
            who = "model: DP-SGD (config.dp_noise_multiplier / config.dp_target_epsilon)"
            raise ValueError(_running_statistics_message(who, updated))

    def step(
        self,
        state,
        batch,
        *,
        compute_dtype=None,
        label_smoothing=0.0,
        loss_fn=None,
        metrics=(),
        no_grad=(),
    ):
        """``dp_train_step`` on ``batch`` (padded under Poisson sampling); ``(state, metrics)``
        with the extra ``metrics`` computed on the real examples' logits."""
        images, labels = tuple(batch)
        size = images.shape[0]
        weights = denominator = None
        if self.sampling == "poisson":
            (images, labels), weights = pad_batch((images, labels), self.pad_multiple)
            denominator = jnp.float32(self.batch_size)
        # these weights and denominator are right by construction, and checking their values
        # would wait for them each step
        state, values, logits = dp_train_step.unchecked(
            state,
            (images, labels),
            weights,
            denominator,
            l2_norm_clip=self.clip_norm,
            noise_multiplier=self.noise_multiplier,
            compute_dtype=compute_dtype,
            label_smoothing=label_smoothing,
            loss_fn=loss_fn,
            no_grad=no_grad,
        )
        if metrics:
            values.update(_jit_batch_metrics(metrics, logits[:size], labels[:size]))
        return state, values

    def epsilon(self, steps: int) -> float:
        """Epsilon (at ``delta``, with the configured accountant) after ``steps`` steps."""
        return dp_epsilon(
            self.noise_multiplier,
            self.sampling_rate,
            int(steps),
            self.delta,
            accountant=self.accountant,
        )

    def describe(self) -> dict:
        """What the summary reports besides epsilon."""
        return {
            "dp_delta": self.delta,
            "dp_noise_multiplier": self.noise_multiplier,
            "dp_clip_norm": self.clip_norm,
            "dp_sampling_rate": self.sampling_rate,
            "dp_sampling": self.sampling,
            "dp_accountant": self.accountant,
        }
