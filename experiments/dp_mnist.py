"""DP-SGD on MNIST at several privacy budgets, beside Opacus' published MNIST example.

Public API only: ``jcnn.nn`` for the network, ``jcnn.data.Loader(sampling="poisson")`` for the
batches, ``jcnn.analysis.private_grad`` (ghost clipping) for the private gradient, optax SGD with
momentum, ``jcnn.analysis.dp_noise_multiplier`` / ``dp_epsilon`` (RDP, as Opacus reports) for the
accounting. Writes a results table (markdown) and an accuracy-vs-epsilon figure.

    python experiments/dp_mnist.py                  # full: eps 1.2, 3.0, 7.1 at delta 1e-5
    python experiments/dp_mnist.py --quick --synthetic --out /tmp/dp   # seconds, no data needed

The network is the end-to-end CNN of Tramer and Boneh (2021) with tanh activations (Papernot et
al. 2021): conv 16@8x8 stride 2, max pool 2 (stride 1), conv 32@4x4 stride 2, max pool 2
(stride 1), dense 32, dense 10. No BatchNorm (see docs/privacy.md).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcnn import analysis, data, nn
from jcnn import functional as F

# Opacus' MNIST example (README of examples/mnist.py): test accuracy at each epsilon, delta 1e-5.
OPACUS = {1.2: 94.63, 3.0: 96.78, 7.1: 97.09}
MEAN, STD = 0.1307, 0.3081  # the usual public MNIST constants (as in Opacus' example)


def make_model() -> nn.Sequential:
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


def _prepare(images) -> jnp.ndarray:
    return (jnp.asarray(images, jnp.float32) / 255.0 - MEAN) / STD


def train_private(
    train_set,
    test_set,
    *,
    target_epsilon: float,
    delta: float,
    epochs: int,
    batch_size: int,
    l2_norm_clip: float,
    learning_rate: float,
    momentum: float,
    seed: int,
    log=print,
) -> dict:
    """Train one private model; returns its test accuracy, epsilon per epoch, sigma, seconds."""
    model = make_model()
    images, labels = train_set
    loader = data.Loader(images, labels, batch_size=batch_size, sampling="poisson", seed=seed)
    steps = epochs * len(loader)
    sigma = analysis.dp_noise_multiplier(target_epsilon, loader.sampling_rate, steps, delta)
    params = model.init(jax.random.key(seed), _prepare(images[:1]))["params"]
    tx = optax.sgd(learning_rate, momentum=momentum)
    opt_state = tx.init(params)

    def loss_fn(params, batch):
        x, y = batch
        return F.cross_entropy(model.apply({"params": params}, _prepare(x)), y)

    @jax.jit
    def step(params, opt_state, batch, mask, key):
        grad, _ = analysis.private_grad(
            loss_fn,
            params,
            batch,
            key,
            l2_norm_clip=l2_norm_clip,
            noise_multiplier=sigma,
            weights=mask,
            denominator=batch_size,
        )
        updates, opt_state = tx.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def correct(params, x, y):
        return jnp.sum(jnp.argmax(model.apply({"params": params}, _prepare(x)), -1) == y)

    def accuracy(params) -> float:
        x, y = test_set
        chunk = min(1000, len(y))
        hits = sum(
            int(correct(params, x[i : i + chunk], y[i : i + chunk]))
            for i in range(0, len(y), chunk)
        )
        return 100.0 * hits / len(y)

    noise_key = jax.random.key(seed + 1)
    pad_multiple = max(32, batch_size // 4)  # a few batch shapes, a few compilations
    history = []
    start = time.perf_counter()
    for epoch in range(epochs):
        for i, batch in enumerate(loader.epoch(epoch)):
            padded, mask = analysis.pad_batch(batch, pad_multiple)
            key = jax.random.fold_in(noise_key, epoch * len(loader) + i)
            params, opt_state = step(params, opt_state, padded, mask, key)
        spent = analysis.dp_epsilon(sigma, loader.sampling_rate, (epoch + 1) * len(loader), delta)
        acc = accuracy(params)
        history.append((epoch + 1, spent, acc))
        log(f"  epoch {epoch + 1}/{epochs}: eps {spent:.3f}  test accuracy {acc:.2f}%")
    return {
        "target_epsilon": target_epsilon,
        "epsilon": history[-1][1],
        "accuracy": history[-1][2],
        "sigma": sigma,
        "epochs": epochs,
        "seconds": time.perf_counter() - start,
        "history": history,
    }


def _synthetic(n: int, seed: int):
    """MNIST-shaped data whose label is a fixed linear function of the image (learnable)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    weights = np.random.default_rng(0).normal(size=(28 * 28, 10))
    labels = np.argmax(images.reshape(n, -1).astype(np.float32) @ weights, 1).astype(np.int32)
    return images, labels


def write_report(results, args, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    figure = out / "dp_mnist.png"
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["epsilon"] for r in results], [r["accuracy"] for r in results], "o-", label="jcnn")
    ax.plot(list(OPACUS), list(OPACUS.values()), "s--", label="Opacus example (published)")
    ax.set_xlabel(f"epsilon (delta = {args.delta:g}, RDP)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("DP-SGD on MNIST" + (" (quick run)" if args.quick else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    plt.close(fig)

    lines = [
        "# DP-SGD on MNIST",
        "",
        f"Command: `python experiments/dp_mnist.py {' '.join(args.argv)}`".rstrip(),
        "",
        f"Data: {args.data_description}. Network: experiments/dp_mnist.py (Tramer and Boneh's "
        "end-to-end CNN, tanh). Poisson sampling, batch size "
        f"{args.batch_size} (expected), clip norm {args.clip}, SGD lr {args.lr} momentum "
        f"{args.momentum}, noise multiplier calibrated to the target epsilon with the RDP "
        f"accountant, delta {args.delta}.",
        "",
        "| target eps | eps reached (RDP) | noise multiplier | epochs | test accuracy | "
        "Opacus example (published) | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        published = OPACUS.get(r["target_epsilon"])
        published = f"{published:.2f}%" if published else "-"
        lines.append(
            f"| {r['target_epsilon']:g} | {r['epsilon']:.2f} | {r['sigma']:.3f} | {r['epochs']} | "
            f"{r['accuracy']:.2f}% | {published} | "
            f"{r['seconds']:.0f} s |"
        )
    asked = [r["target_epsilon"] for r in results]
    missing = [f"{eps:g}" for eps in OPACUS if eps not in asked]
    if missing:
        lines += [
            "",
            f"Not run here: epsilon {', '.join(missing)} (this run asked for "
            f"{', '.join(f'{eps:g}' for eps in asked)} only).",
        ]
    lines += ["", f"![accuracy vs epsilon]({figure.name})", ""]
    (out / "dp_mnist.md").write_text("\n".join(lines))


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    parser.add_argument("--synthetic", action="store_true", help="random data, no files needed")
    parser.add_argument("--data-dir", default=os.environ.get("JCNN_DATA_DIR"))
    parser.add_argument("--epsilons", type=float, nargs="+", default=list(OPACUS))
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--clip", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=4.0)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/experiments"))
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else __import__("sys").argv[1:]

    if args.synthetic:
        train_set, test_set = _synthetic(4000, 0), _synthetic(1000, 1)
        args.data_description = "synthetic MNIST-shaped data (a smoke test, not MNIST)"
    else:
        train_set = data.load("mnist", "train", data_dir=args.data_dir)
        test_set = data.load("mnist", "test", data_dir=args.data_dir)
        args.data_description = "MNIST (60,000 training, 10,000 test images)"
    if args.quick:
        train_set = tuple(a[:512] for a in train_set)
        test_set = tuple(a[:500] for a in test_set)
        args.epochs, args.batch_size = 1, 128
        args.data_description += ", quick run: 512 training and 500 test images, 1 epoch"

    results = []
    for epsilon in args.epsilons:
        print(f"target epsilon {epsilon:g}:")
        results.append(
            train_private(
                train_set,
                test_set,
                target_epsilon=epsilon,
                delta=args.delta,
                epochs=args.epochs,
                batch_size=args.batch_size,
                l2_norm_clip=args.clip,
                learning_rate=args.lr,
                momentum=args.momentum,
                seed=args.seed,
            )
        )
    write_report(results, args, args.out)
    print(f"wrote {args.out / 'dp_mnist.md'}")
    return results


if __name__ == "__main__":
    main()
