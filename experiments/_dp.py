"""DP-SGD studies (``dp_mnist.py``, ``dp_fashion_mnist.py``, ``dp_cifar10.py``: end-to-end CNNs;
``dp_*_scatternet.py``: CNNs on fixed scattering features): one private run per target epsilon,
its table beside the published numbers and an accuracy-vs-epsilon figure.

Public API only: ``jcnn.nn`` for the network, ``jcnn.data.Loader(sampling="poisson")`` for the
batches (what the accountant assumes), ``jcnn.analysis.private_grad`` (ghost clipping,
Book-Keeping) for the private gradient, optax SGD, ``jcnn.analysis.dp_noise_multiplier`` /
``dp_epsilon`` (RDP, as Opacus and the papers report) for the accounting. Images are standardized
with the datasets' usual published constants, not statistics of the private training set.

A full run keeps its rows in ``<out>/<name>.json``; a later run with other target epsilons and the
same settings adds its rows to them, so the budgets of one study can run one at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import _common
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from jcnn import analysis, data, nn, train
from jcnn import functional as F


@dataclasses.dataclass(frozen=True)
class Published:
    epsilon: float
    accuracy: float  # percent
    source: str


@dataclasses.dataclass(frozen=True)
class Study:
    """One dataset's private-training study: its network, data constants, defaults and the
    published numbers it is measured against."""

    name: str
    title: str
    dataset: str
    network: str
    make_model: Callable[[], nn.Module]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    published: tuple[Published, ...]
    epsilons: tuple[float, ...]
    epochs: int
    batch_size: int
    clip: float
    lr: float
    momentum: float
    ema: float = 0.0
    # A fixed transform of the standardized images (no parameters, nothing learned from the
    # data, so no privacy cost), computed once before training: the network takes its output.
    features: Callable[[jax.Array], jax.Array] | None = None


def tanh_cnn_28() -> nn.Sequential:
    """Tramer and Boneh's (2021) end-to-end CNN for 28x28 images, with tanh (Papernot et al.)."""
    return nn.Sequential(
        [
            nn.Conv(16, 8, stride=2, padding=3),
            nn.Tanh(),
            nn.MaxPool(2, stride=1),
            nn.Conv(32, 4, stride=2),
            nn.Tanh(),
            nn.MaxPool(2, stride=1),
            nn.Flatten(),
            nn.Dense(32),
            nn.Tanh(),
            nn.Dense(10),
        ]
    )


def tanh_cnn_32() -> nn.Sequential:
    """Papernot et al.'s (2021) CIFAR-10 CNN with tanh: three stages of two 3x3 convs (32, 64,
    128 channels) and a 2x2 max pool, then dense 128 and dense 10."""
    layers = []
    for width in (32, 64, 128):
        layers += [nn.Conv(width, 3, padding=1), nn.Tanh(), nn.Conv(width, 3, padding=1)]
        layers += [nn.Tanh(), nn.MaxPool(2)]
    return nn.Sequential([*layers, nn.Flatten(), nn.Dense(128), nn.Tanh(), nn.Dense(10)])


def scatternet_cnn_32() -> nn.Sequential:
    """Tramer and Boneh's (2021) CNN on the scattering features of 32x32 colour images (8x8,
    243 channels): GroupNorm in 27 groups without parameters, conv 64, 2x2 max pool, conv 64,
    dense 10, with tanh."""
    return nn.Sequential(
        [
            nn.GroupNorm(27, use_scale=False, use_bias=False),
            nn.Conv(64, 3, padding=1),
            nn.Tanh(),
            nn.MaxPool(2),
            nn.Conv(64, 3, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Dense(10),
        ]
    )


def scatternet_cnn_28() -> nn.Sequential:
    """Tramer and Boneh's (2021) CNN on the scattering features of 28x28 grey images (7x7, 81
    channels): GroupNorm in 27 groups without parameters, conv 16 with stride 2, conv 32, dense
    32, dense 10, with tanh."""
    return nn.Sequential(
        [
            nn.GroupNorm(27, use_scale=False, use_bias=False),
            nn.Conv(16, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv(32, 3, padding=1),
            nn.Tanh(),
            nn.Flatten(),
            nn.Dense(32),
            nn.Tanh(),
            nn.Dense(10),
        ]
    )


@functools.cache
def _scattering_transform(height: int, width: int):
    """The jitted transform of ``(N, C, height, width)`` images; its filter bank built once."""
    # kymatio.jax would also import kymatio's 3-D transform, which needs an older SciPy
    from kymatio.scattering2d.frontend.jax_frontend import ScatteringJax2D

    return jax.jit(ScatteringJax2D(J=2, shape=(height, width), L=8).scattering)


def scattering(images: jax.Array) -> jax.Array:
    """Kymatio's 2-D scattering transform of NHWC images (scale J=2, 8 angles): a fixed filter
    bank of Morlet wavelets and moduli, ``(N, H, W, C)`` to ``(N, H/4, W/4, 81 C)``, channels
    ordered by input channel, then coefficient."""
    n, height, width, channels = images.shape
    transform = _scattering_transform(height, width)
    with jax.numpy_rank_promotion("allow"):  # kymatio broadcasts its filters implicitly
        out = jnp.concatenate(
            [
                transform(jnp.moveaxis(images[i : i + 500], -1, 1))
                for i in range(0, n, 500)  # (N, C, 81, H/4, W/4)
            ]
        )
    return jnp.moveaxis(out.reshape(n, channels * 81, height // 4, width // 4), 1, -1)


def standardize(study: Study, images) -> jax.Array:
    """uint8 images to float32 standardized with the study's published constants."""
    mean, std = (jnp.asarray(v, jnp.float32).reshape(1, 1, 1, -1) for v in (study.mean, study.std))
    return (jnp.asarray(images, jnp.float32) / 255.0 - mean) / std


def train_private(study: Study, train_set, test_set, *, target_epsilon: float, args) -> dict:
    """Train one private model; returns its test accuracy, epsilon per epoch, sigma, seconds.

    The images are uint8 or, with ``study.features``, the features already computed."""
    model = study.make_model()

    def prepare(images):
        return jnp.asarray(images) if study.features else standardize(study, images)

    images, labels = train_set
    loader = data.Loader(
        images, labels, batch_size=args.batch_size, sampling="poisson", seed=args.seed
    )
    steps = args.epochs * len(loader)
    sigma = analysis.dp_noise_multiplier(target_epsilon, loader.sampling_rate, steps, args.delta)
    params = model.init(jax.random.key(args.seed), prepare(images[:1]))["params"]
    tx = optax.sgd(args.lr, momentum=args.momentum or None)
    opt_state = tx.init(params)
    average = params

    def loss_fn(params, batch):
        x, y = batch
        return F.cross_entropy(model.apply({"params": params}, prepare(x)), y)

    @jax.jit
    def step(params, opt_state, average, batch, mask, key):
        grad, _ = analysis.private_grad(
            loss_fn,
            params,
            batch,
            key,
            l2_norm_clip=args.clip,
            noise_multiplier=sigma,
            weights=mask,
            denominator=args.batch_size,
        )
        updates, opt_state = tx.update(grad, opt_state, params)
        params = optax.apply_updates(params, updates)
        # the moving average of the private iterates is post-processing: no privacy cost
        average = optax.incremental_update(params, average, 1.0 - args.ema)
        return params, opt_state, average

    @jax.jit
    def correct(params, x, y):
        return jnp.sum(jnp.argmax(model.apply({"params": params}, prepare(x)), -1) == y)

    def accuracy(params) -> float:
        x, y = test_set
        chunk = min(1000, len(y))
        hits = sum(
            int(correct(params, x[i : i + chunk], y[i : i + chunk]))
            for i in range(0, len(y), chunk)
        )
        return 100.0 * hits / len(y)

    noise_key = jax.random.key(args.seed + 1)
    history = []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        for i, batch in enumerate(loader.epoch(epoch)):
            padded, mask = analysis.pad_batch(batch, args.pad_multiple)
            key = jax.random.fold_in(noise_key, epoch * len(loader) + i)
            params, opt_state, average = step(params, opt_state, average, padded, mask, key)
        spent = analysis.dp_epsilon(
            sigma, loader.sampling_rate, (epoch + 1) * len(loader), args.delta
        )
        acc = accuracy(average)
        history.append((epoch + 1, spent, acc))
        print(f"  epoch {epoch + 1}/{args.epochs}: eps {spent:.3f}  test accuracy {acc:.2f}%")
    return {
        "target_epsilon": target_epsilon,
        "epsilon": history[-1][1],
        "accuracy": history[-1][2],
        "sigma": sigma,
        "epochs": args.epochs,
        "seconds": time.perf_counter() - start,
        "history": history,
    }


def synthetic(shape: tuple[int, ...], n: int, seed: int):
    """Images of ``shape`` whose label is a fixed linear function of the pixels (learnable)."""
    images = np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)
    weights = np.random.default_rng(0).normal(size=(int(np.prod(shape)), 10))
    labels = np.argmax(images.reshape(n, -1).astype(np.float32) @ weights, 1).astype(np.int32)
    return images, labels


def parse_args(study: Study, argv=None) -> argparse.Namespace:
    parser = _common.argument_parser(study.title)
    parser.add_argument("--synthetic", action="store_true", help="random data, no files needed")
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(study.epsilons))
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=study.epochs)
    parser.add_argument("--batch-size", type=int, default=study.batch_size)
    parser.add_argument("--clip", type=float, default=study.clip)
    parser.add_argument("--lr", type=float, default=study.lr)
    parser.add_argument("--momentum", type=float, default=study.momentum)
    parser.add_argument(
        "--ema",
        type=float,
        default=study.ema,
        help="evaluate an exponential moving average of the iterates with this decay (0: none)",
    )
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive int")
    if not all(0 < eps < math.inf for eps in args.epsilons):
        parser.error(f"--epsilons: expected finite positive numbers, got {args.epsilons}")
    repeated = sorted({eps for eps in args.epsilons if args.epsilons.count(eps) > 1})
    if repeated:
        parser.error(
            f"--epsilons: expected distinct budgets, got {' '.join(map(str, repeated))} twice"
        )
    if not 0 < args.clip < math.inf:
        parser.error(f"--clip: expected a finite number > 0, got {args.clip}")
    if not 0 <= args.lr < math.inf:
        parser.error(f"--lr: expected a finite number >= 0, got {args.lr}")
    if not 0 <= args.momentum < 1:
        parser.error(f"--momentum: expected a number in [0, 1), got {args.momentum}")
    if not 0 < args.delta < 1:
        parser.error(f"--delta: expected a number in (0, 1), got {args.delta}")
    if not 0 <= args.ema < 1:
        parser.error(f"--ema: expected a decay in [0, 1), got {args.ema}")
    return args


def _settings(args) -> dict:
    names = ("synthetic", "seed", "delta", "epochs", "batch_size", "clip", "lr", "momentum")
    settings = {name: getattr(args, name) for name in names}
    if args.ema:  # records from before the option have no "ema": theirs was 0
        settings["ema"] = args.ema
    return settings


def _previous_runs(path: Path, settings: dict, epsilons) -> list[dict]:
    """The rows an earlier full run with the same settings left, except the epsilons rerun now."""
    if not path.exists():
        return []
    try:
        record = json.loads(path.read_text())
        before, runs = record["settings"], record["runs"]
    except (ValueError, TypeError, KeyError) as error:
        raise SystemExit(
            f"{path}: not a record of this study ({error}); move it away to start a new one"
        ) from None
    if before != settings:
        print(f"{path}: other settings, its rows are replaced")
        return []
    return [run for run in runs if run["target_epsilon"] not in epsilons]


def _figure(study: Study, runs: list[dict], quick: bool):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for run in runs:
        _, spent, acc = zip(*run["history"], strict=True)
        ax.plot(spent, acc, "-", alpha=0.5, label=f"jcnn, target eps {run['target_epsilon']:g}")
    ax.plot([r["epsilon"] for r in runs], [r["accuracy"] for r in runs], "ko", label="jcnn, end")
    for source in dict.fromkeys(p.source for p in study.published):
        points = [p for p in study.published if p.source == source]
        ax.plot([p.epsilon for p in points], [p.accuracy for p in points], "s--", label=source)
    ax.set_xlabel("epsilon spent (RDP)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(study.title + (" (quick run)" if quick else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def write_page(study: Study, runs: list[dict], args, page: _common.Page) -> Path:
    page.text(
        f"Data: {args.data_description}. Network: {study.network}, no BatchNorm "
        f"(docs/privacy.md). Poisson sampling with an expected batch of {args.batch_size}, clip "
        f"norm {args.clip:g}, SGD learning rate {args.lr:g}, momentum {args.momentum:g}, "
        f"{args.epochs} epoch(s), noise multiplier calibrated to each target epsilon with the RDP "
        f"accountant, delta {args.delta:g}, seed {args.seed}. Every row is one run."
        + (
            f" Accuracy is that of an exponential moving average of the iterates (decay "
            f"{args.ema:g}), updated after every step: post-processing of the private iterates, "
            "it costs no privacy."
            if args.ema
            else ""
        )
        + (
            f" The features of every training and test image were computed once, before the "
            f"runs, in {args.feature_seconds:.0f} s (not in the training times)."
            if study.features
            else ""
        )
    )
    rows = []
    for run in sorted(runs, key=lambda r: r["target_epsilon"]):
        published = [p for p in study.published if p.epsilon == run["target_epsilon"]]
        rows.append(
            [
                f"{run['target_epsilon']:g}",
                f"{run['epsilon']:.2f}",
                f"{run['sigma']:.3f}",
                f"{run['accuracy']:.2f}%",
                "; ".join(f"{p.accuracy:.2f}% ({p.source})" for p in published) or "-",
                f"{run['seconds']:.0f} s",
                f"`{run['commit']}`, {run['date']}",
            ]
        )
    page.table(
        [
            "target eps",
            "eps spent",
            "noise multiplier",
            "test accuracy",
            "published",
            "training time",
            "run",
        ],
        rows,
    )
    verdicts = []
    for p in study.published:
        run = next((r for r in runs if r["target_epsilon"] == p.epsilon), None)
        if run is None:
            verdicts.append(f"eps {p.epsilon:g} against {p.source} ({p.accuracy:.2f}%): not run")
        else:
            word = "above" if run["accuracy"] > p.accuracy else "**not above**"
            verdicts.append(
                f"eps {p.epsilon:g}: {run['accuracy']:.2f}%, {word} {p.source} ({p.accuracy:.2f}%)"
            )
    page.text("Against the published numbers: " + "; ".join(verdicts) + ".")
    page.figure(
        _figure(study, runs, args.quick),
        "accuracy",
        "Test accuracy against the epsilon spent, after each epoch of each run",
    )
    return page.write()


def main(study: Study, argv=None) -> list[dict]:
    """Runs ``study`` for each ``--epsilons`` and writes its page; returns every row on it."""
    args = parse_args(study, argv)
    page = _common.Page(study.name, study.title, args)
    if args.synthetic:
        shape = data.DATASETS[study.dataset].shape
        train_set, test_set = synthetic(shape, 4000, 0), synthetic(shape, 1000, 1)
        args.data_description = f"synthetic {study.dataset}-shaped data (a smoke test)"
    else:
        train_set = data.load(study.dataset, "train", data_dir=args.data_dir)
        test_set = data.load(study.dataset, "test", data_dir=args.data_dir)
        args.data_description = (
            f"{study.dataset} ({len(train_set[1]):,} training, {len(test_set[1]):,} test images)"
        )
    # Poisson batches vary in size (standard deviation about the square root of the batch):
    # padded to a multiple of a sixteenth of the batch, the step compiles for three or four sizes
    # and wastes a few percent on padding; the quick run pads every batch to one size.
    args.pad_multiple = max(32, args.batch_size // 16)
    if args.quick:
        train_set = tuple(a[:256] for a in train_set)
        test_set = tuple(a[:256] for a in test_set)
        args.epochs, args.batch_size, args.pad_multiple = 1, 32, 64
        args.data_description += ", quick run: 256 training and 256 test images, 1 epoch"
    if study.features:
        start = time.perf_counter()
        train_set, test_set = (
            (np.asarray(study.features(standardize(study, x))), y) for x, y in (train_set, test_set)
        )
        args.feature_seconds = time.perf_counter() - start
        print(f"features of every image computed in {args.feature_seconds:.0f} s")

    record = args.out / f"{study.name}.json"
    settings = _settings(args)
    runs = [] if args.quick else _previous_runs(record, settings, args.epsilons)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    for epsilon in args.epsilons:
        print(f"target epsilon {epsilon:g}:")
        run = train_private(study, train_set, test_set, target_epsilon=epsilon, args=args)
        runs.append({**run, "commit": page.commit, "date": date})
    if not args.quick:
        args.out.mkdir(parents=True, exist_ok=True)
        record_text = json.dumps({"settings": settings, "runs": runs}, indent=1) + "\n"
        train.run_folder.write_atomically(record, record_text)
    write_page(study, runs, args, page)
    return runs
