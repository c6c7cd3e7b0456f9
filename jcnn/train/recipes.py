"""Training recipes: complete training set-ups assembled from jcnn's reusable pieces.

A recipe turns a training set into everything ``fit`` needs. ``prepare(name, images, labels)``
returns a ``Prepared`` (model, standardization, training loader, ``TrainConfig``, test-time views);
``run_recipe`` trains it and reports the test accuracy with and without test-time augmentation;
``jcnn-train --recipe NAME`` does the same from the command line. Every piece is a public jcnn
feature, so a recipe is also a worked example of how to assemble one's own.

``airbench94``
    Keller Jordan's airbench94 (legacy version: 94.01% mean CIFAR-10 test accuracy over 1,000
    runs, 3.83 s on an A100): ``models.AirbenchNet`` with its first conv fixed to the patch
    whitening of 5,000 training images (``init.from_array(whitening_kernel(...))``) and the other
    convs identity-initialized on their first channels (``init.with_dirac``); Nesterov SGD
    (momentum 0.85, batch 1024, 9.9 epochs), the BatchNorm biases at 64x the learning rate
    (``label_by_path``), the whitening bias trained for 3 epochs only (``active_for``; neither
    its gradient then nor the fixed kernel's is computed: ``TrainConfig.no_grad``), the
    warm-up/decay schedule 0.2 -> 1 -> 0.07, label smoothing 0.2, lookahead every 5 steps
    (``lookahead``), alternating flips (``Loader(alternating_flip=True)``), ±2 px translations
    with reflect padding (``augment.random_crop``) and six-view test-time augmentation
    (``with_tta``).

    airbench sums the loss over the batch and scales its learning rate and weight decay to
    match. With the summed loss ``L = B * mean``, Nesterov SGD at rate ``η`` with coupled decay
    ``λ`` (``g + λ w``) takes exactly the steps of the mean loss at rate ``B η`` with decay
    ``λ / B``; airbench's "decoupled" choice ``λ = wd / η`` makes the decay per step
    ``η λ = wd`` whatever the rate, which is why the BatchNorm biases (rate x64) get ``λ / 64``.
    jcnn trains on the mean loss with these equivalent values, so the reported losses are means.
    Three differences remain: airbench's lookahead also averages the BatchNorm running
    statistics, ``lookahead`` the parameters only; airbench's linear head starts from PyTorch's
    default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, ``AirbenchNet``'s from ``lecun_normal``
    (``sqrt(3)`` times the spread); and its BatchNorm keeps the unbiased running variance,
    the recipe the biased one (a factor ``n / (n - 1)``, ``n`` the thousands of values per
    channel in a batch).

``mnist99``
    MNIST to 99% in seconds on a CPU: ``models.FastMNISTNet(widths=(16, 64))`` (two stages of a
    5x5 conv, max pool, BatchNorm and ReLU, and a linear head; 36k parameters; the first stage's
    16 channels instead of the model's default 32 make the step about a quarter cheaper for the
    same accuracy, within a few hundredths of a percent), Nesterov SGD (momentum 0.9, peak rate
    0.15, warm-up over the first 10% of the steps from 0.1x, then linear decay to 0), weight
    decay 5e-4 on the kernels, label smoothing 0.1 and airbench's lookahead, for 1.2 epochs of
    batches of 128 (562 steps).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcnn import init, models
from jcnn.data import Loader, Standardize
from jcnn.data import augment as A
from jcnn.functional._checks import _describe, check_int, check_real
from jcnn.train.lookahead import lookahead
from jcnn.train.loop import TrainConfig, evaluate, fit
from jcnn.train.param_groups import active_for, label_by_path
from jcnn.train.schedules import _MAX_STEP
from jcnn.train.tta import flip_translate_views, with_tta

__all__ = ["RECIPES", "Recipe", "Prepared", "prepare", "run_recipe"]


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a recipe is built for and how it builds a run.

    Attributes:
        name: its name (``jcnn-train --recipe NAME``).
        summary: one line.
        dataset: the ``jcnn-train --dataset`` it is built for.
        image_shape: ``(H, W, C)`` of the images it takes.
        num_classes: the number of classes it takes.
        epochs: its training length (fractional epochs end mid-epoch).
        batch_size: its batch size (the training set must hold at least one batch).
        build: ``(images, labels, seed, epochs) -> Prepared``, given the checked training set.
    """

    name: str
    summary: str
    dataset: str
    image_shape: tuple[int, int, int]
    num_classes: int
    epochs: float
    batch_size: int
    build: Callable


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A recipe applied to a training set: pass ``model, train_loader, config`` to ``fit``.

    Attributes:
        recipe: the recipe.
        model: the Flax module, its data-dependent initialization included.
        standardize: the statistics applied to the training images; apply them to test images
            (``test_loader`` does).
        train_loader: the training batches (standardized, augmented).
        config: the ``TrainConfig`` (optimizer, schedule, length, label smoothing...).
        views: the test-time augmentation views, or ``None``.
        view_weights: their weights (``None``: equal).
    """

    recipe: Recipe
    model: object
    standardize: Standardize
    train_loader: Loader
    config: TrainConfig
    views: tuple | None = None
    view_weights: tuple | None = None

    def test_loader(self, images, labels, *, batch_size: int = 1000) -> Loader:
        """An evaluation loader over test images, standardized as the training images were."""
        _check_images(self.recipe, images, labels, "test_images", "test_labels")
        batch_size = check_int(batch_size, "batch_size", low=1)
        return Loader(
            self.standardize(images),
            jnp.asarray(labels),
            batch_size=min(batch_size, len(labels)),
            shuffle=False,
            drop_remainder=False,
        )


def _length(epochs, steps_per_epoch: int) -> tuple[dict, int]:
    """``TrainConfig`` fields for a possibly fractional number of epochs, and the step count.

    The product is rounded to 9 decimals before ``ceil``: ``1.1 * 50`` is ``55.00000000000001``
    in floating point, and 1.1 epochs of 50 steps are 55 steps, not 56. Any positive length is
    at least one step (the rounding alone would make a tiny one none).
    """
    total = max(1, math.ceil(round(epochs * steps_per_epoch, 9)))
    if total > _MAX_STEP:
        raise ValueError(
            f"epochs: expected at most {_MAX_STEP} steps in all (the step counter is int32), got "
            f"{epochs!r} epochs of {steps_per_epoch} steps"
        )
    return {"epochs": math.ceil(epochs), "max_steps": total}, total


def _nesterov_group(rate, decay: float, momentum: float) -> optax.GradientTransformation:
    """Nesterov SGD with coupled weight decay ``g + decay * w`` at ``rate(step)``."""
    return optax.chain(
        optax.add_decayed_weights(decay),
        optax.trace(decay=momentum, nesterov=True),
        optax.scale_by_learning_rate(rate),
    )


def _airbench_lookahead(inner, total: int) -> optax.GradientTransformation:
    """airbench's lookahead: every 5 steps the slow weights move by ``1 - 0.95**5 (t/T)**3``
    towards the fast ones (nearly all the way early on, a slow average at the end), and the run
    ends on the average."""

    def slow_step_size(count):
        return 1.0 - 0.95**5 * (count / total) ** 3

    return lookahead(inner, 5, slow_step_size, final_step=total)


def _per_channel_statistics(images) -> Standardize:
    """``Standardize.fit(images)``, its refusal of a constant channel in the recipe's words (it
    named ``train_images`` and advised a mode the recipe does not take)."""
    try:
        return Standardize.fit(images)
    except ValueError as error:
        reason = str(error).removeprefix("train_images: ").split(";")[0]
        raise ValueError(
            f"images: {reason}, and the recipe divides each channel by its standard deviation"
        ) from None


def _airbench94(images, labels, seed: int, epochs: float) -> Prepared:
    batch_size = RECIPES_BY_NAME["airbench94"].batch_size
    momentum, lr, weight_decay, bias_scaler = 0.85, 11.5, 0.0153, 64.0
    stats = _per_channel_statistics(images)
    standardized = stats(images)
    kernel = models.whitening_kernel(standardized[:5000])
    pytorch_default = jax.nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
    model = models.AirbenchNet(
        num_classes=10,
        conv_init=init.with_dirac(pytorch_default),
        whiten_init=init.from_array(kernel),
    )
    loader = Loader(
        standardized,
        jnp.asarray(labels),
        batch_size=batch_size,
        seed=seed,
        alternating_flip=True,
        augment=functools.partial(A.random_crop, padding=2, pad_mode="reflect"),
    )
    length, total = _length(epochs, len(loader))
    warmup = int(0.23 * total)
    # the mean-loss equivalent of airbench's rate per 1024 examples (see the module docstring)
    peak = lr / (1 + 1 / (1 - momentum))

    def rate(step):
        return peak * jnp.interp(step, jnp.array([0, warmup, total]), jnp.array([0.2, 1.0, 0.07]))

    def scaled(step):
        return bias_scaler * rate(step)

    groups = {
        "frozen": optax.set_to_zero(),
        "whiten_bias": active_for(
            _nesterov_group(rate, weight_decay / lr, momentum), 3 * len(loader)
        ),
        "norm_bias": _nesterov_group(scaled, weight_decay / (lr * bias_scaler), momentum),
        "other": _nesterov_group(rate, weight_decay / lr, momentum),
    }
    labeller = label_by_path(
        [("whiten/kernel", "frozen"), ("whiten/bias", "whiten_bias"), ("*norm*/bias", "norm_bias")],
        default="other",
    )

    optimizer = _airbench_lookahead(optax.multi_transform(groups, labeller), total)
    config = TrainConfig(
        optimizer=optimizer,
        label_smoothing=0.2,
        seed=seed,
        progress=False,
        # the whitening kernel is never trained and its bias is frozen after 3 epochs: their
        # gradients (a weight-gradient convolution, and the input gradient of the first group's
        # 3x3 convolution) are not computed (PyTorch's requires_grad=False in airbench)
        no_grad={"whiten/kernel": 0, "whiten/bias": 3},
        **length,
    )
    views = tuple(flip_translate_views(shifts=((0, 0), (-1, -1), (1, 1))))
    return Prepared(
        RECIPES_BY_NAME["airbench94"], model, stats, loader, config, views, (2, 1, 1, 2, 1, 1)
    )


def _mnist99(images, labels, seed: int, epochs: float) -> Prepared:
    batch_size, momentum, peak = RECIPES_BY_NAME["mnist99"].batch_size, 0.9, 0.15
    stats = _per_channel_statistics(images)
    loader = Loader(stats(images), jnp.asarray(labels), batch_size=batch_size, seed=seed)
    length, total = _length(epochs, len(loader))
    warmup = max(1, int(0.1 * total))

    def rate(step):
        return peak * jnp.interp(step, jnp.array([0, warmup, total]), jnp.array([0.1, 1.0, 0.0]))

    sgd = optax.chain(
        optax.add_decayed_weights(5e-4, mask=lambda p: jax.tree.map(lambda a: a.ndim > 1, p)),
        optax.sgd(rate, momentum=momentum, nesterov=True),
    )
    optimizer = _airbench_lookahead(sgd, total)
    config = TrainConfig(
        optimizer=optimizer, label_smoothing=0.1, seed=seed, progress=False, **length
    )
    return Prepared(
        RECIPES_BY_NAME["mnist99"], models.FastMNISTNet(widths=(16, 64)), stats, loader, config
    )


RECIPES = (
    Recipe(
        "airbench94",
        "CIFAR-10 to 94% (Keller Jordan's airbench94, legacy)",
        "cifar10",
        (32, 32, 3),
        10,
        9.9,
        1024,
        _airbench94,
    ),
    Recipe(
        "mnist99", "MNIST to 99% in seconds on a CPU", "mnist", (28, 28, 1), 10, 1.2, 128, _mnist99
    ),
)
"""The recipes ``run_recipe`` and ``jcnn-train --recipe`` know."""
RECIPES_BY_NAME = {recipe.name: recipe for recipe in RECIPES}


def _recipe(name) -> Recipe:
    expected = f"name: expected one of {', '.join(RECIPES_BY_NAME)}, got {name!r}"
    if not isinstance(name, str):
        raise TypeError(expected)
    if name not in RECIPES_BY_NAME:
        raise ValueError(expected)
    return RECIPES_BY_NAME[name]


def _check_images(recipe: Recipe, images, labels, name: str, labels_name: str) -> None:
    expected = f"{recipe.dataset} images (N, {', '.join(map(str, recipe.image_shape))})"
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        raise TypeError(
            f"{name}: {recipe.name} expected an array of {expected}, got {type(images).__name__}"
        )
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[1:] != recipe.image_shape:
        raise ValueError(f"{name}: {recipe.name} is built for {expected}, got shape {shape}")
    try:
        dtype = np.dtype(images.dtype)
    except TypeError:  # e.g. a torch tensor: "Cannot interpret 'torch.uint8' as a data type"
        raise TypeError(
            f"{name}: {recipe.name} expected a NumPy or JAX array of {expected}, got "
            f"{type(images).__name__} of dtype {images.dtype}"
        ) from None
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise TypeError(f"{name}: expected integer or floating images, got dtype {dtype}")
    if not shape[0]:
        raise ValueError(f"{name}: expected at least one image, got shape {shape}")
    if jnp.issubdtype(dtype, jnp.floating):
        # NaN test images would be scored silently (their logits' argmax); float32 is what
        # the standardized images become
        values = np.asarray(images)
        finite = np.isfinite(values) & (np.abs(values) <= np.finfo(np.float32).max)
        if not finite.all():
            raise ValueError(
                f"{name}: expected finite values within float32's range, got "
                f"{int((~finite).sum())} NaN, infinite or larger value(s)"
            )
    labels = np.asarray(labels)
    if labels.shape != shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{labels_name}: expected {shape[0]} integer labels, got {labels.dtype} labels of "
            f"shape {labels.shape}"
        )
    if labels.size and not 0 <= labels.min() <= labels.max() < recipe.num_classes:
        raise ValueError(
            f"{labels_name}: {recipe.name} is built for {recipe.num_classes} classes, got labels "
            f"in [{labels.min()}, {labels.max()}]"
        )


def prepare(name: str, images, labels, *, seed: int = 0, epochs: float | None = None) -> Prepared:
    """The run of recipe ``name`` on a training set.

    Args:
        name: one of ``RECIPES``' names (``"airbench94"``, ``"mnist99"``).
        images: the training images ``(N, H, W, C)`` of the recipe's shape (e.g. uint8).
        labels: their integer labels ``(N,)``.
        seed: the run's seed (initialization, order, augmentations).
        epochs: the training length (default: the recipe's); fractional values end mid-epoch,
            and the schedules stretch to it.

    Returns:
        A ``Prepared`` run.
    """
    recipe = _recipe(name)
    _check_images(recipe, images, labels, "images", "labels")
    seed = check_int(seed, "seed", low=0)
    if epochs is None:
        epochs = recipe.epochs
    epochs = check_real(epochs, "epochs", low=0, low_open=True)
    if images.shape[0] < recipe.batch_size:
        raise ValueError(
            f"images: {name} trains on batches of {recipe.batch_size}, got {images.shape[0]} images"
        )
    return recipe.build(images, labels, seed, epochs)


def run_recipe(
    name: str,
    train: tuple,
    test: tuple,
    *,
    seed: int = 0,
    epochs: float | None = None,
    **config_changes,
) -> dict:
    """Train recipe ``name`` on ``train`` and evaluate on ``test``, with and without TTA.

    Args:
        name: the recipe.
        train: ``(images, labels)`` of the training set.
        test: ``(images, labels)`` of the test set.
        seed: as for ``prepare``.
        epochs: as for ``prepare``.
        **config_changes: ``TrainConfig`` fields to set besides the recipe's (e.g. ``out``,
            ``progress``, ``test_every_epoch``); a field the recipe sets cannot be changed (its
            optimizer's settings and schedule, its length, standardization and validation split).

    Returns:
        ``fit``'s result with ``"test_accuracy"`` and ``"test_accuracy_tta"`` added (the latter
        ``None`` for a recipe without test-time views) and the ``"prepared"`` run.
    """
    recipe = _recipe(name)
    # the recipe's optimizer brings its schedule, momentum and weight decay (fit would ignore
    # ``schedule`` silently), its standardization is fit on all its training images, and its
    # length counts their batches (a validation split would end the run before its schedule)
    owned = {
        "optimizer",
        "label_smoothing",
        "seed",
        "epochs",
        "max_steps",
        "learning_rate",
        "no_grad",
        "schedule",
        "warmup_epochs",
        "step_epochs",
        "step_factor",
        "decay_rate",
        "weight_decay",
        "momentum",
        "clip_norm",
        "clip_value",
        "val_split",
        "val_split_seed",
        "standardize",
    }
    for part, value in (("train", train), ("test", test)):
        if not isinstance(value, (tuple, list)) or len(value) != 2:
            got = (
                f"{type(value).__name__} of length {len(value)}"
                if isinstance(value, (tuple, list))
                else _describe(value)
            )
            raise TypeError(f"{part}: expected a pair (images, labels), got {got}")
    clashes = sorted(owned & set(config_changes))
    if clashes:
        raise ValueError(
            f"config_changes: {recipe.name} sets {', '.join(clashes)} itself (choose seed and "
            "epochs with the arguments of the same name)"
        )
    fields = {field.name for field in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(config_changes) - fields)
    if unknown:
        raise TypeError(
            f"config_changes: expected TrainConfig fields the recipe leaves open "
            f"({', '.join(sorted(fields - owned))}), got {', '.join(map(repr, unknown))}"
        )
    prepared = prepare(name, *train, seed=seed, epochs=epochs)
    config = dataclasses.replace(prepared.config, **config_changes)
    test_loader = prepared.test_loader(*test)
    result = fit(
        prepared.model,
        prepared.train_loader,
        None,
        config,
        test_loader=test_loader,
        standardize=prepared.standardize,
        metadata={"recipe": name},
    )
    state = result["state"]
    accuracy = result["summary"].get("test_accuracy")
    if accuracy is None:  # fit trained no step (a finished run resumed): nothing evaluated yet
        accuracy = evaluate(state, test_loader)["accuracy"]
    tta = None
    if prepared.views is not None:
        apply = with_tta(state.apply_fn, prepared.views, prepared.view_weights)
        tta = evaluate(state.replace(apply_fn=apply), test_loader)["accuracy"]
    return {**result, "test_accuracy": accuracy, "test_accuracy_tta": tta, "prepared": prepared}
