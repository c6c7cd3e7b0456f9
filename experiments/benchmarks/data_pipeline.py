"""Throughput of the jcnn.data pipeline on CIFAR-10 against the training step that consumes it.

Usage: python experiments/benchmarks/data_pipeline.py [--batch-size 512] [--steps 20]
       [--data-dir DIR] [--widths 64 256 256]

Measures, on the default JAX device, in images per second:

1. pipeline: ``Loader`` batches of CIFAR-10 train with random crop (pad 4, reflect), horizontal
   flip and cutout 12 (gather + augment in one jitted function, nothing on the host);
2. step: one jitted SGD step of ``jcnn.models.AirbenchNet`` (forward, backward, update, with the
   per-channel standardization inside the step) on a batch already on the device;
3. loop: the step fed by the loader, as in training.

The pipeline should be far faster than the step, so that the loop runs at the step's rate.
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

from jcnn import data, models
from jcnn.data import augment as A


def _rate(fn, steps, batch_size):
    """Images per second of ``fn()`` (returns arrays to wait on), after two warm-up calls."""
    for _ in range(2):
        jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(steps):
        out = fn()
    jax.block_until_ready(out)
    return steps * batch_size / (time.perf_counter() - start)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--widths", type=int, nargs=3, default=(64, 256, 256))
    args = parser.parse_args(argv)
    for flag, values in (
        ("--batch-size", [args.batch_size]),
        ("--steps", [args.steps]),
        ("--widths", args.widths),
    ):
        if min(values) < 1:
            parser.error(f"{flag}: expected ints >= 1, got {' '.join(map(str, values))}")
    data_dir = args.data_dir
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        parser.error(f"--data-dir {data_dir}: no such folder")
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    if data_dir is None and shared.is_dir():
        data_dir = shared

    try:
        images, labels = data.load("cifar10", "train", data_dir=data_dir)
    except (FileNotFoundError, data.CorruptFileError) as error:
        parser.exit(1, f"{parser.prog}: {error}\n")
    stats = data.Standardize.fit(images)
    augment = A.compose(
        functools.partial(A.random_crop, padding=4, pad_mode="reflect"),
        A.random_hflip,
        functools.partial(A.cutout, size=12),
    )
    loader = data.Loader(images, labels, batch_size=args.batch_size, seed=0, augment=augment)
    steps = min(args.steps, len(loader) - 2)

    batches = iter(())
    epoch = [0]

    def next_batch():
        nonlocal batches
        try:
            return next(batches)
        except StopIteration:
            batches = loader.epoch(epoch[0])
            epoch[0] += 1
            return next(batches)

    pipeline = _rate(next_batch, steps, args.batch_size)

    model = models.AirbenchNet(widths=tuple(args.widths))
    variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    optimizer = optax.sgd(0.05, momentum=0.9, nesterov=True)
    state = (
        variables["params"],
        variables.get("batch_stats", {}),
        optimizer.init(variables["params"]),
    )

    @jax.jit
    def train_step(state, batch):
        params, batch_stats, opt_state = state
        x, y = batch

        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                stats(x),
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, updates["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), new_stats, opt_state), loss

    fixed = loader.batch(0, 0)
    holder = {"state": state}

    def step_only():
        holder["state"], loss = train_step(holder["state"], fixed)
        return loss

    def loop():
        holder["state"], loss = train_step(holder["state"], next_batch())
        return loss

    step = _rate(step_only, steps, args.batch_size)
    combined = _rate(loop, steps, args.batch_size)

    device = jax.devices()[0]
    print(
        f"device: {device.platform} ({device.device_kind}), batch {args.batch_size}, "
        f"{steps} timed steps, AirbenchNet widths {tuple(args.widths)}"
    )
    print()
    print("| measurement | images/s |")
    print("| --- | ---: |")
    print(f"| pipeline: gather + crop + flip + cutout (Loader) | {pipeline:,.0f} |")
    print(f"| training step alone (AirbenchNet, SGD) | {step:,.0f} |")
    print(f"| training loop fed by the Loader | {combined:,.0f} |")
    print()
    print(
        f"pipeline / step = {pipeline / step:.1f}x; the loop runs at "
        f"{100 * combined / step:.0f}% of the step's rate"
    )


if __name__ == "__main__":
    main()
