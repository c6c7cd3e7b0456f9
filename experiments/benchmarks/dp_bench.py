"""Cost of per-example norms and of a DP-SGD step against the non-private training step.

    python experiments/benchmarks/dp_bench.py                 # LeNet-5, batch 64 and 256
    python experiments/benchmarks/dp_bench.py --quick         # seconds

Rows, all jitted and timed in the same process, interleaved round by round after a warm-up call
(a cell is the median over rounds; the ratio is to the non-private step of the same batch):

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

from jcnn import analysis, models
from jcnn import functional as F


def _time(fn, args, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / calls


def bench(batch: int, rounds: int, calls: int) -> list[tuple[str, float]]:
    model = models.LeNet5()
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, 28, 28, 1)), jnp.float32)
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
    for fn in rows.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            times[name].append(_time(fn, args, calls))
    return [(name, statistics.median(t)) for name, t in times.items()]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.rounds, args.calls = [16], 1, 1
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, LeNet-5")
    print(f"{'batch':>5}  {'row':<24}{'ms':>10}{'x non-private':>15}")
    for batch in args.batches:
        results = bench(batch, args.rounds, args.calls)
        base = results[0][1]
        for name, seconds in results:
            print(f"{batch:>5}  {name:<24}{1e3 * seconds:>10.1f}{seconds / base:>15.2f}")


if __name__ == "__main__":
    main()
