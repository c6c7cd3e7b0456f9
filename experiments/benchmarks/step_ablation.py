"""Which of jcnn's formulations costs its training step against the Flax twin: an ablation.

Each variant swaps some of jcnn's own formulations for the plain one XLA users write, then the
variants, the jcnn model under the Flax twin's step and the twin itself are timed interleaved (as
``bench.py`` does: median over rounds, order rotating) after checking that all compute the same
first-step loss. With ``--profile`` the jcnn and Flax steps are also traced by ``jax.profiler``
and their device time summed per kernel (on a GPU, the CUDA kernels).

    python experiments/benchmarks/step_ablation.py --nets airbench --batch 1024 --profile
    python experiments/benchmarks/step_ablation.py --quick       # smoke run, CPU, seconds

Swaps (``--variants``, ``+`` joins several):

* ``bn1pass``: batch norm's statistics in one pass, shifted by the first example's value (Flax's
  one-pass mean of x and x², made safe against cancellation), instead of jcnn's two passes.
* ``pool``: on CPU, a stride == window max pool differentiated by XLA's window scatter instead of
  jcnn's elementwise selects (elsewhere jcnn already uses the former).
* ``gelu``: ``jax.nn.gelu(approximate=False)`` instead of jcnn's exact GELU.
* ``norm1``: the step's gradient norm as one reduction over the concatenated gradients instead
  of one per parameter.

Each variant is compiled ahead of time after ``jax.clear_caches()`` with its swaps in place, so
it keeps its own executable while the others run. The swaps replace module attributes for the
time of the tracing only: this is a measuring tool, not an API.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import tempfile
import time

import bench
import jax
import jax.numpy as jnp
import modern
import numpy as np
import optax
from jax import lax

import jcnn
from jcnn.functional import activation, norm, pool
from jcnn.train import TrainState, train_step


def shifted_one_pass_moments(x, axes, axis_name=None):
    if axis_name is not None:
        raise ValueError("axis_name: the one-pass variant is for unsharded statistics only")
    first = tuple(slice(0, 1) if axis in axes else slice(None) for axis in range(x.ndim))
    shift = lax.stop_gradient(x[first])
    deviation = x - shift
    mean_deviation = jnp.mean(deviation, axis=axes, keepdims=True)
    mean_square = jnp.mean(jnp.square(deviation), axis=axes, keepdims=True)
    mean = shift + mean_deviation
    return x - mean, mean, jnp.maximum(mean_square - jnp.square(mean_deviation), 0.0)


def window_scatter_pool(x, window, pads, out_sizes):
    return pool._reduce_window_max(x, window, window, pads)


def xla_gelu(x):
    return jax.nn.gelu(x, approximate=False)


def concatenated_norm(tree):
    leaves = [jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)]
    return jnp.sqrt(jnp.sum(jnp.square(jnp.concatenate(leaves))))


SWAPS = {
    "bn1pass": (norm, "_moments", shifted_one_pass_moments),
    "pool": (pool, "_tiled_max_pool", window_scatter_pool),
    "gelu": (activation, "_exact_gelu", xla_gelu),
    "norm1": (optax.tree, "norm", concatenated_norm),
}


def compiled_runner(kind, model, params, batch_stats, x, labels, swaps):
    """``(run, compile s, first loss, kernels)`` of one side: ``kind`` "jcnn" (``train_step``)
    or "flax" (``bench.flax_train_step``), compiled with ``swaps`` in place; ``run()`` steps and
    returns the loss; ``kernels`` counts the fusions and custom calls of the compiled program."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    for module, name, replacement in swaps:
        setattr(module, name, replacement)
    try:
        jax.clear_caches()
        tx = bench.OPTIMIZER()
        params, batch_stats = jax.tree.map(jnp.copy, (params, batch_stats))
        start = time.perf_counter()
        if kind == "jcnn":
            state = TrainState.create(model, tx, jax.random.key(0), x[:1]).replace(
                params=params, batch_stats=batch_stats, opt_state=tx.init(params)
            )
            compiled = train_step.lower(state, (x, labels)).compile()

            def call(state):
                state, metrics = compiled(state, (x, labels))
                return state, metrics["loss"]
        else:
            state = (params, batch_stats, tx.init(params))
            step = jax.jit(bench.flax_train_step(model, tx, bool(batch_stats)), donate_argnums=0)
            compiled = step.lower(state, x, labels).compile()

            def call(state):
                return compiled(state, x, labels)

        compile_s = time.perf_counter() - start
        text = compiled.as_text() or ""
    finally:
        for module, name, original in saved:
            setattr(module, name, original)
    holder = {}
    holder["state"], loss = call(state)

    def run():
        holder["state"], loss = call(holder["state"])
        return float(loss)

    kernels = text.count(" fusion(") + text.count(" custom-call(")
    return run, compile_s, float(loss), kernels


def kernel_profile(runners, steps=5, top=25):
    """Device time per kernel of each runner over ``steps`` calls (``jax.profiler``), as text."""
    lines = []
    on_cpu = jax.default_backend() == "cpu"
    for name, run in runners.items():
        run()
        with tempfile.TemporaryDirectory() as trace_dir:
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for _ in range(steps):
                    run()
            (trace,) = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
            events = json.load(gzip.open(trace))
        events = events["traceEvents"] if isinstance(events, dict) else events
        processes = {
            e["pid"]: e.get("args", {}).get("name", "")
            for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"
        }
        total, calls = collections.Counter(), collections.Counter()
        for e in events:
            device = "/device:" in processes.get(e.get("pid"), "")
            python = e.get("name", "").startswith("$")
            if e.get("ph") == "X" and "dur" in e and (device or (on_cpu and not python)):
                total[e["name"]] += e["dur"]
                calls[e["name"]] += 1
        busy = sum(total.values()) / steps / 1e3
        lines.append(f"## {name}: {busy:.2f} ms/step in {len(total)} distinct events")
        for kernel, us in total.most_common(top):
            lines.append(f"{us / steps / 1e3:8.3f} ms {calls[kernel] // steps:4d}x  {kernel[:110]}")
    return "\n".join(lines)


NETWORKS = {  # name: (title, jcnn model, Flax twin, image shape, batch relative to --batch)
    "lenet": ("LeNet-5", jcnn.models.LeNet5, bench.FlaxLeNet5, (28, 28, 1), 1 / 2),
    "airbench": ("AirbenchNet", jcnn.models.AirbenchNet, bench.FlaxAirbenchNet, (32, 32, 3), 1),
    "resnet20": ("ResNet-20", jcnn.models.resnet20, bench.FlaxResNet20, (32, 32, 3), 1),
    "mobilenet": (
        "MobileNetV2-CIFAR x0.5",
        lambda: jcnn.models.mobilenet_v2_cifar(10, 0.5, dropout_rate=0.0),
        lambda: modern.FlaxMobileNetV2Cifar(10, 0.5),
        (32, 32, 3),
        1 / 8,
    ),
}


def ablation_rows(net, variants, batch, rounds, steps):
    """Markdown rows of one network's variants (``""`` is jcnn as it is), the jcnn model under
    the Flax step, and the Flax twin; and the runners by label."""
    title, make_model, make_twin, image_shape, relative = NETWORKS[net]
    batch = max(2, int(batch * relative))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *image_shape)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    model = make_model()
    # one program, unoptimized (as TrainState.create does): eagerly every operation compiled its
    # own, and XLA's optimizations cost more compile time than they save (outside any timing)
    init = jax.jit(
        model.init,
        static_argnames="train",
        compiler_options={"xla_backend_optimization_level": 0},
    )
    variables = init(jax.random.key(0), x[:2], train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    sides = {}
    for variant in variants:
        names = [name for name in variant.split("+") if name]
        label = "jcnn" + "".join(f" +{name}" for name in names)
        swaps = [SWAPS[name] for name in names]
        sides[label] = compiled_runner("jcnn", model, params, batch_stats, x, labels, swaps)
    sides["jcnn model, flax step"] = compiled_runner(
        "flax", model, params, batch_stats, x, labels, []
    )
    sides["flax"] = compiled_runner("flax", make_twin(), params, batch_stats, x, labels, [])
    tolerance = 1e-4 * bench.TOLERANCE_SCALE
    for label, (_, _, loss, _) in sides.items():
        assert abs(loss - sides["flax"][2]) < tolerance * max(1, abs(loss)), (label, loss)
    runners = {label: side[0] for label, side in sides.items()}
    for run in runners.values():
        run()
    result = bench.interleaved(runners, rounds, steps)
    flax_s = result["flax"][0]
    lines = [
        f"## {title} training step, batch {batch}, median of {rounds} rounds x {steps} steps",
        "",
        "| variant | ms/step | spread | flax / variant | compile s | first loss | kernels |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, (seconds, spread) in result.items():
        _, compile_s, loss, kernels = sides[label]
        lines.append(
            f"| {label} | {seconds * 1e3:.2f} | {spread:.0%} | {flax_s / seconds:.2f}x "
            f"| {compile_s:.1f} | {loss:.5f} | {kernels} |"
        )
    return "\n".join(lines), runners


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nets", nargs="+", choices=sorted(NETWORKS), default=["airbench"])
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["", "bn1pass", "pool", "gelu", "norm1", "bn1pass+pool+gelu+norm1"],
        help=f"swaps to time, '+'-joined; '' is jcnn as it is (swaps: {', '.join(SWAPS)})",
    )
    parser.add_argument(
        "--batch", type=int, default=256, help="LeNet-5 takes half of it, MobileNetV2 1/8"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="kernel times of jcnn and flax")
    parser.add_argument("--quick", action="store_true", help="tiny batch, one round: smoke run")
    args = parser.parse_args(argv)
    for variant in args.variants:
        unknown = [name for name in variant.split("+") if name and name not in SWAPS]
        if unknown:
            parser.error(f"--variants: unknown swap {unknown[0]!r} in {variant!r}")
    for name in ("batch", "rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    batch, rounds, steps = (8, 1, 1) if args.quick else (args.batch, args.rounds, args.steps)
    print(
        f"# jax {jax.__version__} on {jax.devices()[0].device_kind}, jcnn conv backend on CPU: "
        f"{jcnn.native.conv_backend()}"
        + (", QUICK MODE (smoke run: not a measurement)" if args.quick else ""),
        flush=True,
    )
    for net in args.nets:
        table, runners = ablation_rows(net, args.variants, batch, rounds, steps)
        print("\n" + table, flush=True)
        if args.profile:
            profiled = {name: runners[name] for name in ("jcnn", "flax") if name in runners}
            print("\n```\n" + kernel_profile(profiled) + "\n```", flush=True)


if __name__ == "__main__":
    main()
