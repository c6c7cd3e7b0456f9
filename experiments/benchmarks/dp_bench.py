"""Cost of per-example norms and of a DP-SGD step against the non-private training step.

    python experiments/benchmarks/dp_bench.py     # LeNet-5 at batch 64 and 256, CIFAR-10 CNN at 64
    python experiments/benchmarks/dp_bench.py --quick         # seconds

Networks: LeNet-5 (``models.LeNet5``, 28x28x1) and the CIFAR-10 CNN of Papernot et al. (2021)
without BatchNorm (32x32x3; conv 3x3 32-32, max pool 2, 64-64, max pool, 128-128, max pool, dense
128, dense 10, tanh). Rows, all jitted and timed in the same process, interleaved round by round
after a warm-up call (a cell is the median over rounds; the ratio is to the non-private step of the
same network and batch); ``peak MiB`` is XLA's buffer assignment for the compiled function
(arguments + outputs + temporaries), its ratio in the last column:

* ``non-private step``: ``jax.grad`` of the batch loss, then ``optax.sgd`` (momentum 0.9);
* ``norms, materialized``: ``analysis.per_example_grad_norms`` (per-example gradients written);
* ``norms, ghost``: ``analysis.ghost_norms`` (mixed ghost norms, nothing materialized);
* ``DP step, ghost``: ``analysis.private_grad`` (norms, clipped sum, noise) then the same SGD;
* ``DP step, materialized``: the same with ``method="materialize"``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcnn import analysis, models, nn
from jcnn import functional as F


def _time(fn, args, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def cifar_cnn() -> nn.Sequential:
    """The CIFAR-10 CNN of Papernot et al. (2021), tanh activations, no BatchNorm."""
    layers = []
    for width in (32, 64, 128):
        layers += [nn.Conv(width, 3, padding=1), nn.Tanh(), nn.Conv(width, 3, padding=1)]
        layers += [nn.Tanh(), nn.MaxPool(2)]
    return nn.Sequential([*layers, nn.Flatten(), nn.Dense(128), nn.Tanh(), nn.Dense(10)])


NETWORKS = {
    "LeNet-5": (models.LeNet5, (28, 28, 1)),
    "CIFAR-10 CNN": (cifar_cnn, (32, 32, 3)),
}


def _peak_bytes(fn, args) -> int:
    stats = fn.lower(*args).compile().memory_analysis()
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def bench(network: str, batch: int, rounds: int, calls: int) -> list[tuple[str, float, int]]:
    make, shape = NETWORKS[network]
    model = make()
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    params = model.init(jax.random.key(0), images[:1])["params"]
    tx = optax.sgd(0.1, momentum=0.9)
    opt_state = tx.init(params)
    key = jax.random.key(1)

    def loss_fn(params, batch):
        return F.cross_entropy(model.apply({"params": params}, batch[0]), batch[1])

    @jax.jit
    def step(params, opt_state, batch, key):
        grad = jax.grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    def dp_step(method):
        @jax.jit
        def run(params, opt_state, batch, key):
            grad, _ = analysis.private_grad(
                loss_fn, params, batch, key, l2_norm_clip=1.0, noise_multiplier=1.0, method=method
            )
            updates, opt_state = tx.update(grad, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        return run

    rows = {
        "non-private step": step,
        "norms, materialized": jax.jit(
            lambda p, o, b, k: analysis.per_example_grad_norms(loss_fn, p, b)
        ),
        "norms, ghost": jax.jit(lambda p, o, b, k: analysis.ghost_norms(loss_fn, p, b)),
        "DP step, ghost": dp_step("ghost"),
        "DP step, materialized": dp_step("materialize"),
    }
    args = (params, opt_state, (images, labels), key)
    peaks = {name: _peak_bytes(fn, args) for name, fn in rows.items()}
    for fn in rows.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            times[name].append(_time(fn, args, calls))
    return [(name, statistics.median(t), peaks[name]) for name, t in times.items()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256], help="LeNet-5's")
    parser.add_argument(
        "--cifar-batches", type=int, nargs="*", default=[64], help="the CIFAR-10 CNN's (none: skip)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.cifar_batches, args.rounds, args.calls = [16], [4], 1, 1
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}")
    print(
        f"{'network':<13}{'batch':>5}  {'row':<24}{'ms':>10}{'x non-private':>15}"
        f"{'peak MiB':>10}{'x':>7}"
    )
    runs = [("LeNet-5", b) for b in args.batches] + [
        ("CIFAR-10 CNN", b) for b in args.cifar_batches
    ]
    for network, batch in runs:
        results = bench(network, batch, args.rounds, args.calls)
        _, base, base_peak = results[0]
        for name, seconds, peak in results:
            print(
                f"{network:<13}{batch:>5}  {name:<24}{1e3 * seconds:>10.1f}{seconds / base:>15.2f}"
                f"{peak / 2**20:>10.1f}{peak / base_peak:>7.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
