"""``jcnn-train``: train a model of ``jcnn.models`` on a dataset, into a run folder.

Example (the README's main job)::

    jcnn-train --model lenet5 --dataset mnist --epochs 4 --batch-size 128 \\
        --optimizer adam --lr 0.001 --schedule cosine --out runs/lenet5-mnist

A killed run continues exactly where its last checkpoint left it with ``--resume`` (same command,
same ``--out``); the run folder holds ``config.json``, ``history.json``/``.csv``, ``curves.png``,
``summary.json`` (with the test accuracy) and ``checkpoints/``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser", "MODELS"]

# CLI name -> (attribute of jcnn.models, keyword arguments)
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
DATASETS = ("mnist", "fashion_mnist", "cifar10", "synthetic")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``jcnn-train``."""
    from jcnn.train import schedules
    from jcnn.train.optim import OPTIMIZERS

    p = argparse.ArgumentParser(
        prog="jcnn-train", description="Train a jcnn model; writes a run folder."
    )
    p.add_argument("--model", default="lenet5", choices=sorted(MODELS))
    p.add_argument(
        "--dataset",
        default="mnist",
        help=f"{', '.join(DATASETS)} ('synthetic': a small random task for smoke tests), or "
        "tfds:NAME for a tensorflow-datasets dataset (e.g. tfds:cifar100)",
    )
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    p.add_argument("--lr", type=float, default=1e-3, help="base (peak) learning rate")
    p.add_argument("--schedule", default="cosine", choices=sorted(schedules.SCHEDULES))
    p.add_argument("--warmup-epochs", type=float, default=0.0)
    p.add_argument("--step-epochs", default="", help="for --schedule step: e.g. 30,60,90")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--clip-norm", type=float, default=None)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument(
        "--augment",
        default="",
        help="comma-separated ops of jcnn.data.augment applied in order, each "
        "name[:key=value...], e.g. random_crop:padding=4,random_hflip; "
        "mixup/cutmix (e.g. mixup:alpha=0.2) act on whole batches",
    )
    p.add_argument("--data-dir", default=None, help="folder with the dataset files")
    p.add_argument("--limit-train", type=int, default=None, help="use the first N train images")
    p.add_argument("--out", default=None, help="run folder (default runs/<model>-<dataset>)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", type=int, default=None, help="data-parallel over N devices")
    p.add_argument("--checkpoint-every-steps", type=int, default=0)
    p.add_argument("--keep-last", type=int, default=3)
    p.add_argument("--no-progress", action="store_true", help="plain log lines, no progress bar")
    p.add_argument(
        "--val-split",
        type=_val_split,
        default=None,
        help="carve a validation set from the training set: a count (5000) or a fraction (0.1); "
        "it chooses the best checkpoint and early stopping, the test set is only reported",
    )
    p.add_argument("--val-split-seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--eval-every-steps", type=int, default=0, help="also validate every N steps")
    p.add_argument("--max-steps", type=int, default=None, help="stop after N steps in all")
    p.add_argument(
        "--early-stopping",
        type=int,
        default=None,
        metavar="PATIENCE",
        help="stop when the validation loss has not improved for PATIENCE evaluations "
        "(needs --val-split)",
    )
    p.add_argument(
        "--manual-dir",
        default=None,
        help="tfds:NAME only: folder with the original downloads, used instead of the network",
    )
    return p


def _val_split(text: str):
    """``--val-split``: an int count or a float fraction."""
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a count (e.g. 5000) or a fraction (e.g. 0.1), got {text!r}"
            ) from None


def load_dataset(name: str, split: str, *, data_dir=None, manual_dir=None):
    """``(images, labels)`` of a ``--dataset`` name: jcnn's datasets, synthetic, or tfds:NAME."""
    from jcnn import data

    if name == "synthetic":
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


def _augmenters(spec: str, num_classes: int):
    """Per-example and batch augmentation from ``name[:key=value...],name...``."""
    import ast
    import functools

    from jcnn.data import augment

    per_example, per_batch = [], None
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, *settings = item.split(":")
        fn = getattr(augment, name, None)
        if fn is None or not callable(fn):
            raise SystemExit(f"--augment: jcnn.data.augment has no op {name!r}")
        try:
            kwargs = {
                key: ast.literal_eval(value)
                for key, value in (setting.split("=", 1) for setting in settings)
            }
        except (ValueError, SyntaxError) as error:
            raise SystemExit(f"--augment: cannot parse {item!r} as name:key=value") from error
        if name in ("mixup", "cutmix"):
            per_batch = functools.partial(fn, num_classes=num_classes, **kwargs)
        else:
            per_example.append(functools.partial(fn, **kwargs))
    return (augment.compose(*per_example) if per_example else None), per_batch


def main(argv=None) -> int:
    """Entry point of ``jcnn-train``; returns the exit status."""
    args = build_parser().parse_args(argv)

    import jax

    from jcnn import data, models
    from jcnn.train import parallel
    from jcnn.train.callbacks import EarlyStopping
    from jcnn.train.checkpoint import CheckpointError
    from jcnn.train.loop import NonFiniteLossError, TrainConfig, fit

    if args.dataset not in DATASETS and not args.dataset.startswith("tfds:"):
        raise SystemExit(
            f"--dataset: expected one of {', '.join(DATASETS)} or tfds:NAME, got {args.dataset!r}"
        )
    if args.early_stopping is not None and args.val_split is None:
        raise SystemExit("--early-stopping: needs a validation set (--val-split N)")
    out = Path(args.out or f"runs/{args.model}-{args.dataset.replace(':', '-')}")
    source = dict(data_dir=args.data_dir, manual_dir=args.manual_dir)
    try:
        train_x, train_y = load_dataset(args.dataset, "train", **source)
        test_x, test_y = load_dataset(args.dataset, "test", **source)
    except (FileNotFoundError, data.DownloadError, data.CorruptFileError) as error:
        raise SystemExit(f"jcnn-train: {error}") from None
    if args.limit_train:
        train_x, train_y = train_x[: args.limit_train], train_y[: args.limit_train]
    num_classes = int(max(train_y.max(), test_y.max())) + 1

    mesh = parallel.make_mesh(args.devices) if args.devices else None
    sharding = parallel.data_sharding(mesh) if mesh is not None else None
    example_aug, batch_aug = _augmenters(args.augment, num_classes)
    train_loader = data.Loader(
        train_x,
        train_y,
        batch_size=args.batch_size,
        shuffle=True,
        seed=args.seed,
        augment=example_aug,
        batch_augment=batch_aug,
        sharding=sharding,
    )
    test_loader = data.Loader(
        test_x,
        test_y,
        batch_size=min(1000, test_x.shape[0]),
        shuffle=False,
        drop_remainder=False,
        sharding=sharding,
    )
    callbacks = []
    if args.early_stopping is not None:
        callbacks.append(EarlyStopping("val_loss", mode="min", patience=args.early_stopping))
    attribute, kwargs = MODELS[args.model]
    model = getattr(models, attribute)(num_classes=num_classes, **kwargs)
    config = TrainConfig(
        epochs=args.epochs,
        optimizer=args.optimizer,
        learning_rate=args.lr,
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        step_epochs=tuple(int(e) for e in args.step_epochs.split(",") if e.strip()),
        weight_decay=args.weight_decay,
        momentum=args.momentum,
        clip_norm=args.clip_norm,
        label_smoothing=args.label_smoothing,
        compute_dtype=args.compute_dtype,
        seed=args.seed,
        devices=args.devices,
        out=str(out),
        checkpoint_every_steps=args.checkpoint_every_steps,
        keep_last=args.keep_last,
        resume=args.resume,
        progress=not args.no_progress and sys.stderr.isatty(),
        val_split=args.val_split,
        val_split_seed=args.val_split_seed,
        standardize="per_channel",
        eval_every_steps=args.eval_every_steps,
        max_steps=args.max_steps,
        test_every_epoch=args.val_split is None,
        callbacks=tuple(callbacks),
    )
    metadata = {"model": args.model, "dataset": args.dataset, **source}
    started = time.perf_counter()
    try:
        result = fit(model, train_loader, None, config, test_loader=test_loader, metadata=metadata)
    except NonFiniteLossError as error:
        print(f"jcnn-train: {error}", file=sys.stderr)
        return 2
    except CheckpointError as error:
        print(f"jcnn-train: cannot resume: {error}", file=sys.stderr)
        return 3
    except ValueError as error:
        print(f"jcnn-train: {error}", file=sys.stderr)
        return 2
    summary = dict(result["summary"])
    test = {"loss": summary["test_loss"], "accuracy": summary["test_accuracy"]}
    summary.update(
        wall_seconds=time.perf_counter() - started,
        devices=len(mesh.devices.flat) if mesh is not None else 1,
        backend=jax.default_backend(),
        command="jcnn-train " + " ".join(sys.argv[1:] if argv is None else argv),
    )
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(
        f"test accuracy {test['accuracy']:.4f} (loss {test['loss']:.4f}); "
        f"wall {summary['wall_seconds']:.1f}s; run folder {out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
