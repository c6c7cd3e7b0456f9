"""``jcnn-train``: train a model of ``jcnn.models`` on a dataset, into a run folder.

Example (the README's main job)::

    jcnn-train --model lenet5 --dataset mnist --epochs 4 --batch-size 128 \\
        --optimizer adam --lr 0.001 --schedule cosine --out runs/lenet5-mnist

A killed run continues exactly where its last checkpoint left it with ``--resume`` (same command,
same ``--out``); the run folder holds ``config.json``, ``history.json``/``.csv``, ``curves.png``,
``summary.json`` (with the test accuracy) and ``checkpoints/``. One process owns a run folder at a
time; ``--resume`` refuses other settings, and a used folder needs ``--resume`` or ``--overwrite``
(see ``jcnn.train.run_folder``).

A mistake in the command is one line on stderr, in the command's own terms, and a non-zero exit
(``SystemExit``, as argparse does): 2 for a bad flag, 1 for a missing or corrupt dataset, 3 for a
refused run folder (the folder is then left as it was). A run that stops on a non-finite loss exits
with 2, one whose checkpoint cannot be restored with 3. Ctrl-C (``KeyboardInterrupt``) exits with
130 after one line saying how to go on: ``--resume`` from the last checkpoint, or ``--overwrite``
when the run wrote its files but no checkpoint yet.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import re
import sys
import time
from pathlib import Path

from jcnn._cli import OneLineParser, quiet_when_the_reader_leaves

__all__ = ["main", "build_parser", "MODELS"]

MODELS = {
    "lenet5": ("LeNet5", {}),
    "lenet5_1998": ("LeNet5", {"original": True}),
    "alexnet_cifar": ("AlexNet", {"variant": "cifar"}),
    "vgg11_bn": ("VGG", {"depth": 11, "batch_norm": True, "small_input": True}),
    "vgg16_bn": ("VGG", {"depth": 16, "batch_norm": True, "small_input": True}),
    "resnet18": ("resnet18", {}),
    "resnet20": ("resnet20", {}),
    "resnet56": ("resnet56", {}),
    "airbench": ("AirbenchNet", {}),
    "jarrett": ("JarrettNet", {}),
}
"""``--model`` names: ``{name: (its class or factory in jcnn.models, keyword arguments)}``."""
DATASETS = ("mnist", "fashion_mnist", "cifar10", "synthetic")

# jcnn.train.recipes.RECIPES, named here to keep --help free of heavy imports.
RECIPE_NAMES = {
    "airbench94": "CIFAR-10 to 94% (Keller Jordan's airbench94, legacy)",
    "mnist99": "MNIST to 99% in seconds on a CPU",
}
# Flags a recipe sets itself: giving one with --recipe contradicts the recipe.
RECIPE_SETS = (
    "model",
    "batch_size",
    "optimizer",
    "lr",
    "schedule",
    "warmup_epochs",
    "step_epochs",
    "step_factor",
    "decay_rate",
    "weight_decay",
    "momentum",
    "clip_norm",
    "clip_value",
    "label_smoothing",
    "compute_dtype",
    "augment",
    "max_steps",
    "val_split",
    "val_split_seed",
    "devices",
    "no_grad",
)

# Models of MODELS with BatchNorm layers: DP-SGD needs them with --group-norm.
BATCH_NORM_MODELS = ("vgg11_bn", "vgg16_bn", "resnet18", "resnet20", "resnet56", "airbench")

# The DP-SGD flags (any of them but the first two needs one of the first two).
DP_FLAGS = (
    "--dp-noise-multiplier",
    "--dp-target-epsilon",
    "--dp-clip-norm",
    "--dp-delta",
    "--dp-sampling",
    "--dp-accountant",
)

# Optimizers that use --momentum (the others would silently ignore it).
USES_MOMENTUM = ("momentum", "nesterov", "lars")

# TrainConfig fields and run settings named as the flags that set them (for refused resumes).
FLAG_NAMES = {
    "train.learning_rate": "--lr",
    "train_loader.batch_size": "--batch-size",
    "train_loader.seed": "--seed",
    "train_loader.num_examples": "the number of training images (--limit-train, --dataset)",
    "train_loader.batches_per_epoch": "the number of batches per epoch",
    "settings.train_images": "the number of training images (--limit-train, --dataset)",
    "settings.num_classes": "the number of classes",
    "settings.train_data.images": "the training images (--dataset, --data-dir)",
    "settings.train_data.labels": "the training labels (--dataset, --data-dir)",
    "train.callbacks": "--early-stopping",
    "settings.recipe.steps": "--epochs (the steps of the recipe, whose schedules depend on them)",
    "train_loader.sampling": "--dp-sampling",
}


class UsageError(SystemExit):
    """A mistake in the command line: ``main`` prints it as one line and returns 2."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.message = message
        self.exit_status = code


def _no_grad_entry(text: str) -> tuple[str, int]:
    """``PATTERN`` or ``PATTERN@EPOCH`` of ``--no-grad``."""
    pattern, _, epoch = text.rpartition("@") if "@" in text else (text, "", "0")
    try:
        first = int(epoch)
    except ValueError:
        first = -1
    if not pattern or first < 0:
        raise argparse.ArgumentTypeError(
            f"expected PATTERN or PATTERN@EPOCH with an epoch >= 0, got {text!r}"
        )
    return pattern, first


def _int_at_least(low: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


def _number(what: str, *, low=None, high=None, low_open=False, high_open=False):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        bad = not math.isfinite(value)
        bad |= low is not None and (value <= low if low_open else value < low)
        bad |= high is not None and (value >= high if high_open else value > high)
        if bad:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


def _seed(text: str) -> int:
    value = _int_at_least(0, "an integer in [0, 2**32)")(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in [0, 2**32), got {value}")
    return value


def _epoch_list(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    values = []
    for part in parts:
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated positive epochs such as 30,60,90, got {text!r} "
                f"({part!r} is not an integer)"
            ) from None
        if value < 1 or (values and value <= values[-1]):
            raise argparse.ArgumentTypeError(
                f"expected increasing positive epochs such as 30,60,90, got {text!r}"
            )
        values.append(value)
    return tuple(values)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``jcnn-train``."""
    from jcnn.train import schedules
    from jcnn.train.optim import OPTIMIZERS

    positive = _int_at_least(1, "a positive integer")
    p = OneLineParser(prog="jcnn-train", description="Train a jcnn model; writes a run folder.")
    p.add_argument(
        "--recipe",
        default=None,
        choices=sorted(RECIPE_NAMES),
        help="a complete training set-up of jcnn.train.recipes (model, optimizer, schedule, "
        "augmentation, length; --epochs, --seed and the run-folder flags still apply): "
        + "; ".join(f"{name}: {summary}" for name, summary in RECIPE_NAMES.items()).replace(
            "%", "%%"
        ),
    )
    p.add_argument(
        "--recipe-any-dataset",
        action="store_true",
        help="with --recipe: train it on a --dataset other than the one it was built for "
        "(images of the same shape; its published accuracy does not apply there)",
    )
    p.add_argument("--model", default="lenet5", choices=sorted(MODELS))
    p.add_argument(
        "--dataset",
        default="mnist",
        type=_dataset,
        help=f"{', '.join(DATASETS)} ('synthetic': a small random task for smoke tests), or "
        "tfds:NAME for a tensorflow-datasets dataset (e.g. tfds:cifar100)",
    )
    p.add_argument("--epochs", type=positive, default=4)
    p.add_argument("--batch-size", type=positive, default=128)
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    p.add_argument(
        "--lr",
        type=_number("a positive number", low=0, low_open=True),
        default=1e-3,
        help="base (peak) learning rate",
    )
    p.add_argument("--schedule", default="cosine", choices=sorted(schedules.SCHEDULES))
    p.add_argument("--warmup-epochs", type=_number("a number >= 0", low=0), default=0.0)
    p.add_argument(
        "--step-epochs", type=_epoch_list, default=(), help="for --schedule step: e.g. 30,60,90"
    )
    p.add_argument(
        "--step-factor",
        type=_number("a number > 0", low=0, low_open=True),
        help="for --schedule step: the factor at each of --step-epochs (default 0.1)",
    )
    p.add_argument(
        "--decay-rate",
        type=_number("a number >= 0", low=0),
        help="for --schedule exponential or inverse_time: k per epoch (default 0.1)",
    )
    p.add_argument("--weight-decay", type=_number("a number >= 0", low=0), default=0.0)
    p.add_argument(
        "--momentum",
        type=_number("a number in [0, 1)", low=0, high=1, high_open=True),
        default=None,
        help=f"for {', '.join(USES_MOMENTUM)} (default 0.9)",
    )
    p.add_argument(
        "--clip-norm", type=_number("a positive number", low=0, low_open=True), default=None
    )
    p.add_argument(
        "--clip-value",
        type=_number("a positive number", low=0, low_open=True),
        default=None,
        help="clip each gradient entry to [-c, c] (before --clip-norm)",
    )
    p.add_argument(
        "--label-smoothing",
        type=_number("a number in [0, 1)", low=0, high=1, high_open=True),
        default=0.0,
    )
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--augment",
        default="",
        help="comma-separated ops of jcnn.data.augment applied in order, each "
        "name[:key=value...], e.g. random_crop:padding=4,random_hflip; "
        "mixup/cutmix (e.g. mixup:alpha=0.2) act on whole batches",
    )
    p.add_argument("--data-dir", default=None, help="folder with the dataset files")
    p.add_argument(
        "--limit-train", type=positive, default=None, help="use the first N train images"
    )
    p.add_argument("--out", default=None, help="run folder (default runs/<model>-<dataset>)")
    start = p.add_mutually_exclusive_group()
    start.add_argument(
        "--resume", action="store_true", help="continue the run in --out from its last checkpoint"
    )
    start.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out that holds a run (deletes that run's files)",
    )
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--devices", type=positive, default=None, help="data-parallel over N devices")
    p.add_argument("--checkpoint-every-steps", type=_int_at_least(0, "an integer >= 0"), default=0)
    p.add_argument("--keep-last", type=positive, default=3)
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bar")
    p.add_argument(
        "--val-split",
        type=_val_split,
        default=None,
        help="carve a validation set from the training set: a count (5000) or a fraction (0.1); "
        "it chooses the best checkpoint and early stopping, the test set is only reported",
    )
    p.add_argument("--val-split-seed", type=_seed, default=0, help="seed of the validation split")
    p.add_argument(
        "--eval-every-steps",
        type=_int_at_least(0, "an integer >= 0"),
        default=0,
        help="also validate every N steps (needs --val-split)",
    )
    p.add_argument("--max-steps", type=positive, default=None, help="stop after N steps in all")
    p.add_argument(
        "--no-grad",
        type=_no_grad_entry,
        action="append",
        default=None,
        metavar="PATTERN[@EPOCH]",
        help="compute no gradient for the parameters matching PATTERN (a glob on paths such as "
        "conv1/kernel), from epoch EPOCH (counted from 0) on; repeatable. The optimizer gets zeros "
        "for them (weight decay and momentum still apply)",
    )
    p.add_argument(
        "--steps-per-call",
        type=positive,
        default=1,
        help="optimizer steps per compiled call (jcnn.train.train_steps): on CPU 4 runs LeNet-5 "
        "1.2x faster per step (CIFAR networks at batch 256: no change); not with DP-SGD or "
        "--devices",
    )
    p.add_argument(
        "--early-stopping",
        type=positive,
        default=None,
        metavar="PATIENCE",
        help="stop when the validation loss has not improved for PATIENCE evaluations "
        "(needs --val-split)",
    )
    p.add_argument(
        "--group-norm",
        action="store_true",
        help="compute every BatchNorm of the model as a GroupNorm "
        "(jcnn.analysis.replace_batch_norm): what DP-SGD needs for models with BatchNorm",
    )
    dp = p.add_argument_group(
        "DP-SGD", "differentially private training (docs/privacy.md); epsilon is reported per epoch"
    )
    dp.add_argument(
        "--dp-noise-multiplier",
        type=_number("a number >= 0", low=0),
        default=None,
        help="train with DP-SGD at this noise multiplier (noise std / clip norm)",
    )
    dp.add_argument(
        "--dp-target-epsilon",
        type=_number("a positive number", low=0, low_open=True),
        default=None,
        help="train with DP-SGD, the noise calibrated to end the run at this epsilon",
    )
    dp.add_argument(
        "--dp-clip-norm",
        type=_number("a positive number", low=0, low_open=True),
        default=None,
        help="DP-SGD's per-example gradient clip norm (default 1.0)",
    )
    dp.add_argument(
        "--dp-delta",
        type=_number("a number in (0, 1)", low=0, high=1, low_open=True, high_open=True),
        default=None,
        help="delta of the reported epsilon (default 1e-5)",
    )
    dp.add_argument(
        "--dp-sampling",
        choices=("poisson", "shuffle"),
        default=None,
        help="batches by Poisson subsampling, what the accountant assumes (default), or "
        "shuffled fixed-size batches, accounted as if Poisson (an approximation)",
    )
    dp.add_argument(
        "--dp-accountant",
        choices=("rdp", "pld"),
        default=None,
        help="privacy accountant: rdp (default, as Opacus reports) or pld (tighter)",
    )
    p.add_argument(
        "--manual-dir",
        default=None,
        help="tfds:NAME only: folder with the original downloads, used instead of the network",
    )
    return p


def _given_flags(argv) -> set[str]:
    """The destinations of the flags written on the command line (defaults not included)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _check_recipe(args, argv) -> set[str]:
    """``--recipe`` with a flag it sets itself, or with a dataset it is not built for; returns the
    flags written on the command line."""
    from jcnn.train.recipes import RECIPES_BY_NAME

    recipe = RECIPES_BY_NAME[args.recipe]
    given = _given_flags(argv)
    private = [f for f in (*DP_FLAGS, "--group-norm") if f[2:].replace("-", "_") in given]
    if private:
        raise UsageError(
            f"--recipe {args.recipe} trains without DP-SGD and keeps its BatchNorm; drop "
            + ", ".join(private)
        )
    # these need a validation set, which a recipe never splits off (it sets --val-split)
    validating = [
        f for f in ("--early-stopping", "--eval-every-steps") if f[2:].replace("-", "_") in given
    ]
    if validating:
        raise UsageError(
            f"--recipe {args.recipe} trains on all its training images, without a validation set "
            f"(--val-split); drop " + ", ".join(validating)
        )
    clashes = [f"--{name.replace('_', '-')}" for name in RECIPE_SETS if name in given]
    if clashes:
        raise UsageError(
            f"--recipe {args.recipe} sets {', '.join(clashes)} itself; drop "
            f"{'it' if len(clashes) == 1 else 'them'} (--epochs, --seed and the run-folder flags "
            "may be changed)"
        )
    if "dataset" not in given:
        args.dataset = recipe.dataset
    shapes = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
    shape = shapes.get(args.dataset)
    if shape is not None and shape != recipe.image_shape:
        raise UsageError(
            f"--recipe {args.recipe} is built for {recipe.dataset} "
            f"({'x'.join(map(str, recipe.image_shape))} images), not --dataset {args.dataset} "
            f"({'x'.join(map(str, shape))} images)"
        )
    trained_on = args.dataset.removeprefix("tfds:")
    if trained_on not in (recipe.dataset, "synthetic"):
        if not args.recipe_any_dataset:
            raise UsageError(
                f"--recipe {args.recipe} is built for {recipe.dataset} (its settings and "
                f"published accuracy are for it), not --dataset {args.dataset}; add "
                "--recipe-any-dataset to train it there anyway"
            )
        print(
            f"note: --recipe {args.recipe} was built for {recipe.dataset}; training it on "
            f"{args.dataset} (--recipe-any-dataset), where its published accuracy does not apply"
        )
    return given


def _check_combinations(args) -> None:
    """Flags that are fine alone but would be ignored or contradict each other together."""
    if args.step_epochs and args.schedule != "step":
        raise UsageError(f"--step-epochs applies to --schedule step only, not {args.schedule}")
    if args.schedule == "step" and not args.step_epochs:
        raise UsageError("--schedule step needs --step-epochs (e.g. --step-epochs 30,60)")
    if args.step_factor is not None and args.schedule != "step":
        raise UsageError(f"--step-factor applies to --schedule step only, not {args.schedule}")
    if args.decay_rate is not None and args.schedule not in ("exponential", "inverse_time"):
        raise UsageError(
            f"--decay-rate applies to --schedule exponential or inverse_time only, not "
            f"{args.schedule}"
        )
    if args.momentum is not None and args.optimizer not in USES_MOMENTUM:
        raise UsageError(
            f"--momentum applies to --optimizer {', '.join(USES_MOMENTUM)}, not {args.optimizer}"
        )
    if args.warmup_epochs > args.epochs:
        raise UsageError(
            f"--warmup-epochs {args.warmup_epochs:g} is longer than the run (--epochs "
            f"{args.epochs}): the rate would never reach --lr"
        )
    patterns = [pattern for pattern, _ in args.no_grad or ()]
    twice = sorted({p for p in patterns if patterns.count(p) > 1})
    if twice:
        raise UsageError(f"--no-grad {twice[0]}: given twice")
    if args.early_stopping is not None and args.val_split is None:
        raise UsageError("--early-stopping needs a validation set (--val-split N)")
    if args.eval_every_steps and args.val_split is None:
        raise UsageError("--eval-every-steps needs a validation set (--val-split N)")
    if args.val_split_seed and args.val_split is None:
        raise UsageError("--val-split-seed applies to --val-split only (no validation set to draw)")
    if args.data_dir is not None and args.dataset == "synthetic":
        raise UsageError("--data-dir: --dataset synthetic is generated, not read from files")
    if args.manual_dir is not None and not args.dataset.startswith("tfds:"):
        raise UsageError(f"--manual-dir applies to --dataset tfds:NAME only, not {args.dataset}")
    if args.manual_dir is not None and not Path(args.manual_dir).expanduser().is_dir():
        raise UsageError(f"--manual-dir {args.manual_dir}: no such folder")
    if args.group_norm and args.model not in BATCH_NORM_MODELS:
        raise UsageError(f"--group-norm: --model {args.model} has no BatchNorm to replace")
    _check_dp(args)
    if args.steps_per_call > 1 and (_private(args) or args.devices is not None):
        raise UsageError(
            "--steps-per-call: DP-SGD and --devices run one step per call; drop --steps-per-call"
        )


def _private(args) -> bool:
    return args.dp_noise_multiplier is not None or args.dp_target_epsilon is not None


def _check_dp(args) -> None:
    """The DP-SGD flags against each other and the rest of the command."""
    given = [f for f in DP_FLAGS if getattr(args, f[2:].replace("-", "_")) is not None]
    if not _private(args):
        if given:
            raise UsageError(
                f"{given[0]} applies to DP-SGD only: add --dp-target-epsilon or "
                "--dp-noise-multiplier"
            )
        return
    if args.dp_noise_multiplier is not None and args.dp_target_epsilon is not None:
        raise UsageError(
            "--dp-noise-multiplier and --dp-target-epsilon exclude each other: give the noise, "
            "or the epsilon to calibrate it to"
        )
    if args.model in BATCH_NORM_MODELS and not args.group_norm:
        raise UsageError(
            f"DP-SGD needs per-example gradients, and --model {args.model} has BatchNorm (each "
            "example's gradient would depend on the others): add --group-norm (GroupNorm "
            "instead), or choose a model without BatchNorm such as "
            + ", ".join(m for m in MODELS if m not in BATCH_NORM_MODELS)
        )
    if args.devices is not None:
        raise UsageError("--devices: DP-SGD trains on one device; drop --devices")


def _val_split(text: str):
    """``--val-split``: a count (an integer >= 1) or a fraction in (0, 1)."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            value = None
    if value is None or (isinstance(value, int) and value < 1):
        raise argparse.ArgumentTypeError(
            f"expected a count (e.g. 5000) or a fraction (e.g. 0.1), got {text!r}"
        )
    if isinstance(value, float) and not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a count (e.g. 5000) or a fraction in (0, 1) (e.g. 0.1), got {text}"
        )
    return value


def _dataset(text: str) -> str:
    """``--dataset``: one of ``DATASETS`` or ``tfds:NAME``."""
    if text in DATASETS or (text.startswith("tfds:") and text[len("tfds:") :].strip()):
        return text
    raise argparse.ArgumentTypeError(
        f"expected one of {', '.join(DATASETS)} or tfds:NAME, got {text!r}"
    )


def load_dataset(name: str, split: str, *, data_dir=None, manual_dir=None):
    """``(images, labels)`` of a ``--dataset`` name: jcnn's datasets, synthetic, or tfds:NAME."""
    from jcnn import data

    if name == "synthetic":
        if split not in ("train", "test"):
            raise ValueError(f"split: expected 'train' or 'test' for synthetic, got {split!r}")
        return _synthetic(split, 0)
    if name.startswith("tfds:"):
        return data.load_tfds(name[len("tfds:") :], split, data_dir=data_dir, manual_dir=manual_dir)
    if name not in DATASETS:
        raise SystemExit(
            f"--dataset: expected one of {', '.join(DATASETS)} or tfds:NAME, got {name!r}"
        )
    # without --data-dir, missing files are downloaded into the cache (jcnn.data.download)
    return data.load(name, split, data_dir=data_dir, download=data_dir is None)


def _synthetic(split: str, seed: int):
    """10 classes of 28x28 digits-like blobs: class c is a bright square at a fixed place."""
    import numpy as np

    rng = np.random.default_rng(seed + (0 if split == "train" else 1))
    n = 512 if split == "train" else 256
    labels = rng.integers(0, 10, size=n).astype(np.int32)
    images = rng.integers(0, 60, size=(n, 28, 28, 1)).astype(np.uint8)
    for i, c in enumerate(labels):
        row, col = 2 + 8 * (c // 4), 2 + 8 * (c % 4)
        images[i, row : row + 6, col : col + 6, 0] += 150
    return images, labels


def _augmenters(spec: str, num_classes: int, image_shape=None):
    """Per-example and batch augmentation from ``name[:key=value...],name...``.

    Each op must be a random op of ``jcnn.data.augment`` (``(key, image, *, ...)``, or
    ``(key, images, labels, *, ...)`` for mixup/cutmix) given every keyword it needs and no other;
    with ``image_shape`` each is also tried once on a blank image, so that a bad value is reported
    now, naming the op, rather than as a traceback from inside the first training step.
    """
    import ast
    import functools

    import jax
    import jax.numpy as jnp

    from jcnn.data import augment

    per_example, per_batch = [], None
    items = _top_level_split(spec, ",") if spec.strip() else []
    if "" in items:
        raise UsageError(f"--augment {spec}: an empty op between commas; expected name[:k=v],...")
    for item in items:
        name, *settings = item.split(":")
        fn = getattr(augment, name, None) if not name.startswith("_") else None
        if fn is None or not inspect.isfunction(fn):
            raise UsageError(f"--augment: jcnn.data.augment has no op {name!r}")
        try:
            kwargs = {}
            for setting in settings:
                key, value = setting.split("=", 1)
                if not key.strip():
                    raise ValueError("no setting name")
                if key.strip() in kwargs:
                    raise UsageError(f"--augment {name}: {key.strip()} given twice")
                try:
                    kwargs[key.strip()] = ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    # a word for a setting that takes one (pad_mode=reflect): no quotes needed
                    wanted = inspect.signature(fn).parameters.get(key.strip())
                    if not (
                        wanted is not None
                        and isinstance(wanted.default, str)
                        and re.fullmatch(r"[A-Za-z_][\w-]*", value.strip())
                    ):
                        raise
                    kwargs[key.strip()] = value.strip()
        except (ValueError, SyntaxError) as error:
            raise UsageError(f"--augment: cannot parse {item!r} as name:key=value") from error
        params = list(inspect.signature(fn).parameters.values())
        positional = [q.name for q in params if q.kind is q.POSITIONAL_OR_KEYWORD]
        batch_op = positional == ["key", "images", "labels"]
        if positional != ["key", "image"] and not batch_op:
            raise UsageError(
                f"--augment {name}: expected a random op taking (key, image, ...) or (key, images, "
                f"labels, ...), but jcnn.data.augment.{name} takes ({', '.join(positional)})"
                + ("; use random_" + name if hasattr(augment, "random_" + name) else "")
            )
        keywords = {q.name: q for q in params if q.kind is q.KEYWORD_ONLY}
        if batch_op:
            keywords.pop("num_classes", None)  # the dataset's, set here
        unknown = sorted(set(kwargs) - set(keywords))
        if unknown:
            raise UsageError(
                f"--augment {name}: unknown setting {', '.join(unknown)}; it takes "
                f"{', '.join(keywords) or 'no settings'}"
            )
        missing = [k for k, q in keywords.items() if q.default is q.empty and k not in kwargs]
        if missing:
            raise UsageError(
                f"--augment {name}: needs {', '.join(f'{k}=...' for k in missing)} "
                f"(e.g. {name}:{missing[0]}=...)"
            )
        if batch_op:
            op = functools.partial(fn, num_classes=num_classes, **kwargs)
        else:
            op = functools.partial(fn, **kwargs)
        if image_shape is not None:
            try:
                key = jax.random.PRNGKey(0)
                if batch_op:
                    op(key, jnp.zeros((2, *image_shape)), jnp.arange(2) % num_classes)
                else:
                    op(key, jnp.zeros(image_shape))
            except (ValueError, TypeError) as error:
                raise UsageError(f"--augment {item}: {error}") from error
        if batch_op:
            if per_batch is not None:
                raise UsageError("--augment: at most one of mixup and cutmix")
            per_batch = op
        else:
            per_example.append(op)
    return (augment.compose(*per_example) if per_example else None), per_batch


def _check_augmented_size(spec: str, example_aug, image_shape: tuple) -> None:
    """``--augment`` ops that leave the training images another size are refused: the test
    images, which are not augmented, would not fit the model."""
    if example_aug is None:
        return
    import jax
    import jax.numpy as jnp

    shape = jax.eval_shape(example_aug, jax.random.PRNGKey(0), jnp.zeros(image_shape)).shape
    if tuple(shape) != image_shape:
        size = "x".join(map(str, image_shape))
        raise UsageError(
            f"--augment {spec}: turns the {size} training images into "
            f"{'x'.join(map(str, shape))} ones, but the test images stay {size} (--augment "
            "applies to the training images only); choose ops that keep the size, e.g. "
            "random_crop:padding=4"
        )


def _top_level_split(text: str, separator: str) -> list[str]:
    """``text`` split at ``separator`` outside brackets, e.g. ``a:size=(28,28),b`` -> 2 items."""
    items, depth, current = [], 0, ""
    for char in text:
        depth += char in "([{"
        depth -= char in ")]}"
        if char == separator and depth == 0:
            items.append(current)
            current = ""
        else:
            current += char
    items.append(current)
    return [item.strip() for item in items]


def _load_dataset(args):
    """``(train, test)`` pairs of images and labels. Without ``--data-dir`` missing files are
    downloaded into the cache (``jcnn.data.download``); a missing, undownloadable or corrupt dataset
    exits with one line naming the files, the folders searched and where to download them."""
    from jcnn import data

    if args.dataset == "synthetic":
        return _synthetic("train", 0), _synthetic("test", 0)
    tfds = args.dataset.startswith("tfds:")  # tensorflow-datasets prepares its --data-dir
    if not tfds and args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
        raise SystemExit(f"jcnn-train: --data-dir {args.data_dir}: no such folder")
    source = dict(data_dir=args.data_dir, manual_dir=args.manual_dir)
    try:
        train = load_dataset(args.dataset, "train", **source)
        test = load_dataset(args.dataset, "test", **source)
    except (FileNotFoundError, data.DownloadError, data.CorruptFileError) as error:
        raise SystemExit(f"jcnn-train: {error}") from None
    except ValueError as error:
        if str(error).startswith(f"{data.fetch.MIRRORS_ENV}:"):  # a bad mirror list to download
            raise UsageError(str(error)) from None
        if not tfds:  # jcnn's own datasets raise ValueError only for a programming mistake
            raise
        # an unknown name, or a dataset without a train or test split
        message = re.sub(r"^name: ", "", str(error))
        raise SystemExit(f"jcnn-train: --dataset {args.dataset}: {message}") from None
    return train, test


def _flag_names() -> dict:
    names = dict(FLAG_NAMES)
    for field in (
        "epochs",
        "optimizer",
        "schedule",
        "warmup_epochs",
        "step_epochs",
        "step_factor",
        "decay_rate",
        "weight_decay",
        "momentum",
        "clip_norm",
        "clip_value",
        "label_smoothing",
        "compute_dtype",
        "seed",
        "val_split",
        "val_split_seed",
        "max_steps",
        "dp_noise_multiplier",
        "dp_target_epsilon",
        "dp_clip_norm",
        "dp_delta",
        "dp_accountant",
        "steps_per_call",
        "no_grad",
    ):
        names[f"train.{field}"] = "--" + field.replace("_", "-")
    for field in (
        "model",
        "dataset",
        "limit_train",
        "augment",
        "batch_size",
        "manual_dir",
        "group_norm",
    ):
        names[f"settings.{field}"] = "--" + field.replace("_", "-")
    return names


def main(argv=None) -> int:
    """Entry point of ``jcnn-train``: returns 0 when the run completes, 2 when it stops on a
    non-finite loss, 3 when its checkpoint cannot be restored; a mistake in the command prints
    one line and raises ``SystemExit`` (see the module docstring)."""
    try:
        with quiet_when_the_reader_leaves():
            return _main(argv)
    except UsageError as error:
        print(f"jcnn-train: error: {error.message}", file=sys.stderr)
        raise SystemExit(error.exit_status) from None
    except KeyboardInterrupt:  # before the run folder was claimed: nothing to go on from
        print("jcnn-train: interrupted", file=sys.stderr)
        raise SystemExit(130) from None


@contextlib.contextmanager
def _on_interrupt(out: Path):
    """Ctrl-C while the run folder is ours: one line saying how to go on, exit status 130."""
    try:
        yield
    except KeyboardInterrupt:
        from jcnn.train import run_folder
        from jcnn.train.checkpoint import CheckpointError, CheckpointManager

        folder, step, damage = out / "checkpoints", None, None
        if folder.is_dir():
            try:
                step = CheckpointManager(folder).resume_step()
            except CheckpointError as error:
                damage = error
        if damage is not None:
            advice = f"its checkpoints cannot be read ({damage})"
        elif step is not None:
            advice = f"--resume (other flags the same) continues from step {step}"
        elif run_folder.holds_run(out):
            advice = "no checkpoint yet; start again with --overwrite (it deletes the run's files)"
        else:
            advice = "the run had not started"
        print(f"jcnn-train: interrupted; {advice} (--out {out})", file=sys.stderr)
        raise SystemExit(130) from None


def _main(argv) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.recipe_any_dataset and args.recipe is None:
        raise UsageError("--recipe-any-dataset: only with --recipe")
    given = _check_recipe(args, argv) if args.recipe is not None else set()
    _check_combinations(args)
    name = args.recipe or args.model
    if args.out == "":
        raise UsageError("--out: expected a run folder, got ''")
    out = Path(args.out or f"runs/{name}-{args.dataset.replace(':', '-')}").expanduser()
    _, mixes = _augmenters(args.augment, 10)  # the spelling of every op, before any work
    if mixes is not None and _private(args):
        raise UsageError(
            "--augment: mixup and cutmix mix examples, so one example reaches several gradients "
            "and DP-SGD's clipping bounds nothing; use per-example ops with DP-SGD"
        )

    import jax

    from jcnn import data, native
    from jcnn.train import parallel, run_folder
    from jcnn.train.checkpoint import CheckpointError
    from jcnn.train.loop import NonFiniteLossError, evaluate, fit
    from jcnn.train.splits import validation_size
    from jcnn.train.tta import with_tta

    if args.devices is not None and args.devices > jax.device_count():
        raise UsageError(
            f"--devices {args.devices}: only {jax.device_count()} {jax.default_backend()} "
            "device(s) are available"
        )
    if args.devices is not None and args.recipe is None and args.batch_size % args.devices:
        raise UsageError(
            f"--batch-size {args.batch_size}: expected a multiple of --devices {args.devices} "
            "(each batch is split evenly over the devices)"
        )
    try:  # before the lock (which creates the folder), and again once the folder is ours
        run_folder.check_start(out, resume=args.resume, overwrite=args.overwrite)
        lock = run_folder.claim(out)
    except run_folder.RunFolderError as error:
        raise UsageError(f"--out {out}: {_in_flags(str(error))}", code=3) from None
    with lock, _on_interrupt(out):
        try:
            run_folder.check_start(out, resume=args.resume, overwrite=args.overwrite)
        except run_folder.RunFolderError as error:
            raise UsageError(f"--out {out}: {_in_flags(str(error))}", code=3) from None
        (train_x, train_y), (test_x, test_y) = _load_dataset(args)
        if args.limit_train is not None:
            if args.limit_train > train_x.shape[0]:
                raise UsageError(
                    f"--limit-train {args.limit_train}: the {args.dataset} training set has only "
                    f"{train_x.shape[0]} images"
                )
            train_x, train_y = train_x[: args.limit_train], train_y[: args.limit_train]
        if args.val_split is not None:  # before the batch size, which it may explain
            try:
                validation_size(args.val_split, train_x.shape[0], "--val-split")
            except ValueError as error:
                raise UsageError(str(error)) from None
        if args.recipe is None and args.batch_size > train_x.shape[0]:
            raise UsageError(
                f"--batch-size {args.batch_size}: larger than the {train_x.shape[0]} training "
                "images (an epoch would have no batch)"
            )
        num_classes = int(max(train_y.max(), test_y.max())) + 1

        mesh = parallel.make_mesh(args.devices) if args.devices else None
        sharding = parallel.data_sharding(mesh) if mesh is not None else None
        run_options = dict(
            out=str(out),
            checkpoint_every_steps=args.checkpoint_every_steps,
            keep_last=args.keep_last,
            resume=args.resume,
            overwrite=args.overwrite,
            progress=not args.no_progress and sys.stderr.isatty(),
            steps_per_call=args.steps_per_call,
        )
        prepared, standardize = None, None
        if args.recipe is not None:
            from jcnn.train import recipes

            epochs = args.epochs if "epochs" in given else None
            try:
                prepared = recipes.prepare(
                    args.recipe, train_x, train_y, seed=args.seed, epochs=epochs
                )
                test_loader = prepared.test_loader(test_x, test_y)
            except ValueError as error:
                raise UsageError(f"--recipe {args.recipe}: {error}") from None
            model, train_loader, standardize = (
                prepared.model,
                prepared.train_loader,
                prepared.standardize,
            )
            config = dataclasses.replace(prepared.config, test_every_epoch=True, **run_options)
        else:
            model, train_loader, test_loader, config = _plain_run(
                args, train_x, train_y, test_x, test_y, num_classes, sharding, run_options
            )
        command = "jcnn-train " + " ".join(argv)
        settings = {
            # a recipe's schedules depend on its length: another --epochs cannot resume it
            "recipe": None
            if prepared is None
            else {"name": args.recipe, "steps": prepared.config.max_steps},
            # a recipe builds its own network and batches (--model and --batch-size are refused)
            "model": None if prepared is not None else args.model,
            "dataset": args.dataset,
            "data_dir": None
            if args.dataset == "synthetic"
            else args.data_dir
            if args.dataset.startswith("tfds:")
            else str(data.default_data_dir(args.data_dir).absolute()),
            "manual_dir": args.manual_dir,
            "limit_train": args.limit_train,
            "augment": args.augment,
            "batch_size": None if prepared is not None else args.batch_size,
            "group_norm": args.group_norm,
            "train_images": int(train_x.shape[0]),
            "num_classes": num_classes,
            "train_data": {"images": train_x, "labels": train_y},  # described by digest
            "command": command,
        }
        metadata = {
            "recipe": args.recipe,
            "model": None if args.recipe else args.model,  # a recipe builds its own
            "dataset": args.dataset,
            # absolute: jcnn-eval reads it from whatever folder it runs in
            "data_dir": args.data_dir
            if args.data_dir is None or args.dataset.startswith("tfds:")
            else str(Path(args.data_dir).expanduser().absolute()),
            "manual_dir": args.manual_dir,
        }
        started = time.perf_counter()
        try:
            result = fit(
                model,
                train_loader,
                None,
                config,
                test_loader=test_loader,
                standardize=standardize,
                metadata=metadata,
                settings=settings,
            )
        except NonFiniteLossError as error:
            print(f"jcnn-train: {error}", file=sys.stderr)
            return 2
        except CheckpointError as error:
            print(f"jcnn-train: cannot resume: {error}", file=sys.stderr)
            return 3
        except run_folder.RunFolderError as error:
            message = str(error)
            differences = error.differences
            if any(key == "settings.recipe.steps" for key, _, _ in differences):
                # the recipe builds its optimizer for its steps: --epochs is the difference
                differences = [d for d in differences if d[0] != "train.optimizer"]
            if differences:
                message = (
                    f"cannot --resume {out} with other settings: "
                    + run_folder.format_differences(differences, _flag_names())
                )
            raise UsageError(_in_flags(_config_in_flags(message)), code=3) from None
        except ValueError as error:  # a setting fit refuses, e.g. --val-split too large
            raise UsageError(_config_in_flags(str(error))) from None
        summary = dict(result["summary"])
        test = {"loss": summary["test_loss"], "accuracy": summary["test_accuracy"]}
        if prepared is not None and prepared.views is not None:
            state = result["state"]
            apply = with_tta(state.apply_fn, prepared.views, prepared.view_weights)
            tta = evaluate(state.replace(apply_fn=apply), test_loader)
            summary["test_accuracy_tta"] = test["accuracy_tta"] = tta["accuracy"]
        summary.update(
            wall_seconds=time.perf_counter() - started,
            devices=len(mesh.devices.flat) if mesh is not None else 1,
            backend=jax.default_backend(),
            host_memory=native.host_memory(),
            command=command,
        )
        run_folder.write_atomically(out / "summary.json", json.dumps(summary, indent=1))
    with_views = f", {test['accuracy_tta']:.4f} with TTA" if "accuracy_tta" in test else ""
    privacy = ""
    if "epsilon" in summary:
        privacy = f"epsilon {summary['epsilon']:.3f} (delta {summary['dp_delta']:g}); "
    print(
        f"test accuracy {test['accuracy']:.4f}{with_views} (loss {test['loss']:.4f}); {privacy}"
        f"wall {summary['wall_seconds']:.1f}s; run folder {out}"
    )
    return 0


def _config_in_flags(message: str) -> str:
    """A message of ``fit`` in the command's terms (``config.dp_delta`` is ``--dp-delta``)."""
    for setting, label in _flag_names().items():
        if setting.startswith("train.") and label.startswith("--"):
            field = re.escape(setting[len("train.") :])
            message = re.sub(rf"\bconfig\.{field}\b", label, message)
    return message


def _plain_run(args, train_x, train_y, test_x, test_y, num_classes, sharding, run_options):
    """``(model, train_loader, test_loader, TrainConfig)`` from the flags (no ``--recipe``)."""
    from jcnn import data, models
    from jcnn.train.callbacks import EarlyStopping
    from jcnn.train.loop import TrainConfig, eval_batching

    example_aug, batch_aug = _augmenters(args.augment, num_classes, tuple(train_x.shape[1:]))
    _check_augmented_size(args.augment, example_aug, tuple(train_x.shape[1:]))
    train_loader = data.Loader(
        train_x,
        train_y,
        batch_size=args.batch_size,
        shuffle=True,
        seed=args.seed,
        augment=example_aug,
        batch_augment=batch_aug,
        sharding=sharding,
        sampling=(args.dp_sampling or "poisson") if _private(args) else "shuffle",
    )
    test_batch, test_sharding = eval_batching(test_x.shape[0], 1000, sharding)
    test_loader = data.Loader(
        test_x,
        test_y,
        batch_size=test_batch,
        shuffle=False,
        drop_remainder=False,
        sharding=test_sharding,
    )
    callbacks = []
    if args.early_stopping is not None:
        callbacks.append(EarlyStopping("val_loss", mode="min", patience=args.early_stopping))
    attribute, kwargs = MODELS[args.model]
    model = getattr(models, attribute)(num_classes=num_classes, **kwargs)
    if args.group_norm:
        from jcnn.analysis import replace_batch_norm

        model = replace_batch_norm(model)
    dp_settings = {}
    if _private(args):
        dp_settings = dict(
            dp_noise_multiplier=args.dp_noise_multiplier,
            dp_target_epsilon=args.dp_target_epsilon,
            dp_clip_norm=1.0 if args.dp_clip_norm is None else args.dp_clip_norm,
            dp_delta=1e-5 if args.dp_delta is None else args.dp_delta,
            dp_accountant=args.dp_accountant or "rdp",
        )
    config = TrainConfig(
        epochs=args.epochs,
        optimizer=args.optimizer,
        learning_rate=args.lr,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        step_epochs=args.step_epochs,
        step_factor=0.1 if args.step_factor is None else args.step_factor,
        decay_rate=0.1 if args.decay_rate is None else args.decay_rate,
        weight_decay=args.weight_decay,
        momentum=0.9 if args.momentum is None else args.momentum,
        clip_norm=args.clip_norm,
        clip_value=args.clip_value,
        label_smoothing=args.label_smoothing,
        compute_dtype=args.compute_dtype,
        seed=args.seed,
        devices=args.devices,
        val_split=args.val_split,
        val_split_seed=args.val_split_seed,
        standardize="per_channel",  # fit on the training examples, after the validation split
        eval_every_steps=args.eval_every_steps,
        max_steps=args.max_steps,
        test_every_epoch=args.val_split is None,
        callbacks=tuple(callbacks),
        no_grad=dict(args.no_grad or ()),
        **dp_settings,
        **run_options,
    )
    return model, train_loader, test_loader, config


def _in_flags(message: str) -> str:
    """A run-folder message in the command's terms (``resume`` is ``--resume``...)."""
    for word in ("resume", "overwrite"):
        message = message.replace(f"without {word}", f"without --{word}")
        message = message.replace(f"with {word}", f"with --{word}")
        message = message.replace(f"; {word} it", f"; --{word} it")
        message = message.replace(f"{word} and", f"--{word} and")
        message = message.replace(f"and {word} exclude", f"and --{word} exclude")
    return message


if __name__ == "__main__":
    sys.exit(main())
