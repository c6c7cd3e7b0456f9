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
* ``DP step, materialized``: the same with ``method="materialize"``;
* ``torch non-private step``: the PyTorch twin of the network (same layers, jcnn's initial
  weights, logits checked equal), ``torch.optim.SGD`` (momentum 0.9), on all cores;
* ``Opacus DP step, <mode>``: Opacus' ``PrivacyEngine.make_private`` on the same twin (fixed
  batches, no Poisson sampling; clip norm 1, noise multiplier 1 as jcnn's), one forward, backward
  and ``optimizer.step()``, per ``grad_sample_mode``: ``hooks`` (per-sample gradients by hooks,
  the default), ``ghost`` (ghost clipping through ``DPLossFastGradientClipping``; Opacus has it
  for linear layers, convolutions fall back to per-sample gradients), ``ew`` (expanded
  weights) and ``functorch``. A mode that fails is reported and left out. The PyTorch rows'
  ratio is to PyTorch's non-private step; they have no peak memory column.

A second table puts jcnn's DP step (ghost) beside Opacus' fastest mode: the speed ratio
Opacus / jcnn (issue 10's goal: at least 2) and each DP step against its own library's
non-private step. Without Opacus (``pip install opacus``, in the ``dev`` extra) the script says
so and prints jcnn's rows only.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcnn import analysis, models, nn
from jcnn import functional as F

try:
    import opacus
    import torch
except ImportError as error:  # a benchmark-only dependency (the ``dev`` extra)
    opacus = torch = None
    MISSING_OPACUS = f"{error}: install it with `pip install opacus` (or `pip install -e .[dev]`)"
else:
    MISSING_OPACUS = None

L2_NORM_CLIP = 1.0
NOISE_MULTIPLIER = 1.0
OPACUS_MODES = ("hooks", "ghost", "ew", "functorch")


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


def torch_twin(network: str):
    """The PyTorch twin of ``network`` (NCHW inputs): jcnn's layers, named as its parameters."""
    from collections import OrderedDict

    tnn = torch.nn

    class FlattenNHWC(tnn.Module):
        def forward(self, x):  # jcnn flattens channels-last
            return x.permute(0, 2, 3, 1).flatten(1)

    if network == "LeNet-5":
        layers = OrderedDict(
            conv1=tnn.Conv2d(1, 20, 5, padding=2), relu1=tnn.ReLU(), pool1=tnn.MaxPool2d(2),
            conv2=tnn.Conv2d(20, 50, 5, padding=2), relu2=tnn.ReLU(), pool2=tnn.MaxPool2d(2),
            flatten=FlattenNHWC(), fc1=tnn.Linear(2450, 500), relu3=tnn.ReLU(),
            fc2=tnn.Linear(500, 10),
        )  # fmt: skip
        return tnn.Sequential(layers)
    if network != "CIFAR-10 CNN":
        raise ValueError(f"network: expected one of {sorted(NETWORKS)}, got {network!r}")
    layers, c_in = [], 3
    for width in (32, 64, 128):  # the order of cifar_cnn's layers: names layers_<index>
        layers += [tnn.Conv2d(c_in, width, 3, padding=1), tnn.Tanh()]
        layers += [tnn.Conv2d(width, width, 3, padding=1), tnn.Tanh(), tnn.MaxPool2d(2)]
        c_in = width
    layers += [FlattenNHWC(), tnn.Linear(2048, 128), tnn.Tanh(), tnn.Linear(128, 10)]
    return tnn.Sequential(OrderedDict((f"layers_{i}", layer) for i, layer in enumerate(layers)))


def nchw(images):
    """NHWC images as a PyTorch NCHW tensor with row-major strides (even where ``C`` is 1: Opacus'
    expanded weights view it flat)."""
    tensor = torch.from_numpy(np.array(images)).permute(0, 3, 1, 2)
    return tensor.clone(memory_format=torch.contiguous_format)


def load_jcnn_params(twin, params) -> None:
    """Copy jcnn's ``name/kernel`` (HWIO or (in, out)) and ``name/bias`` into the twin."""
    state = {}
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = ".".join(k.key for k in path).replace(".kernel", ".weight")
        value = np.array(value)
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        state[name] = torch.from_numpy(np.ascontiguousarray(value))
    twin.load_state_dict(state)  # strict: raises on any missing or extra name


def check_twin(model, params, twin, images, labels, tolerance: float = 1e-4) -> float:
    """jcnn's and the twin's logits and loss agree on ``images`` (NHWC); their relative error."""
    ours = np.asarray(jax.jit(model.apply)({"params": params}, images))
    with torch.no_grad():
        theirs = twin(nchw(images)).numpy()
        their_loss = float(torch.nn.functional.cross_entropy(
            torch.from_numpy(theirs), torch.from_numpy(np.array(labels, np.int64))
        ))  # fmt: skip
    our_loss = float(F.cross_entropy(jnp.asarray(ours), labels))
    error = max(
        float(np.abs(ours - theirs).max() / np.abs(ours).max()),
        abs(our_loss - their_loss) / abs(our_loss),
    )
    if not error < tolerance:
        raise RuntimeError(f"the PyTorch twin's logits or loss differ from jcnn's by {error:.2e}")
    return error


def torch_step(twin, images, labels, *, lr: float = 0.1, momentum: float = 0.9):
    """A closure doing one non-private SGD step of ``twin`` on the (NCHW) batch."""
    optimizer = torch.optim.SGD(twin.parameters(), lr=lr, momentum=momentum)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(twin(images), labels).backward()
        optimizer.step()

    return step


def opacus_step(
    twin, mode: str, images, labels, *, noise_multiplier: float = NOISE_MULTIPLIER,
    lr: float = 0.1, momentum: float = 0.9,
):  # fmt: skip
    """A closure doing one Opacus DP-SGD step of ``twin`` in ``grad_sample_mode=mode``.

    Fixed batches (no Poisson sampling): the loader holds exactly this batch, so Opacus divides
    the noised sum by the batch size, as ``private_grad`` does by default.
    """
    optimizer = torch.optim.SGD(twin.parameters(), lr=lr, momentum=momentum)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=len(labels)
    )
    with warnings.catch_warnings():  # the secure-RNG and accountant notices
        warnings.simplefilter("ignore")
        private = opacus.PrivacyEngine().make_private(
            module=twin,
            optimizer=optimizer,
            criterion=torch.nn.CrossEntropyLoss(),
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=L2_NORM_CLIP,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
    if mode == "ghost":  # the criterion wrapper runs ghost clipping's two backward passes
        model, optimizer, criterion, _ = private
    else:
        (model, optimizer, _), criterion = private, torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        criterion(model(images), labels).backward()
        optimizer.step()

    return step


def _torch_rows(network, model, params, images, labels) -> tuple[dict, dict]:
    """The PyTorch and Opacus rows (closures, warmed up) and the Opacus modes that failed."""
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    twin = torch_twin(network)
    load_jcnn_params(twin, params)
    check_twin(model, params, twin, images, labels)
    x = nchw(images)
    y = torch.from_numpy(np.array(labels, np.int64))
    rows = {"torch non-private step": torch_step(copy.deepcopy(twin), x, y)}
    failed = {}
    for mode in OPACUS_MODES:
        try:
            step = opacus_step(copy.deepcopy(twin), mode, x, y)
            step()
        except Exception as error:  # a mode Opacus cannot run on these layers: reported
            failed[mode] = f"{type(error).__name__}: {error}".splitlines()[0][:120]
        else:
            rows[f"Opacus DP step, {mode}"] = step
    return rows, failed


def _peak_bytes(fn, args) -> int:
    stats = fn.lower(*args).compile().memory_analysis()
    return (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
        - stats.alias_size_in_bytes
    )


def bench(network: str, batch: int, rounds: int, calls: int) -> tuple[list, dict]:
    """Rows ``(name, seconds, peak bytes or None)`` and the Opacus modes that failed."""
    make, shape = NETWORKS[network]
    model = make()
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    # one program, unoptimized (as TrainState.create does): eagerly every operation compiled its
    # own, and XLA's optimizations cost more compile time than they save (outside any timing)
    init = jax.jit(model.init, compiler_options={"xla_backend_optimization_level": 0})
    params = init(jax.random.key(0), images[:1])["params"]
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
                loss_fn,
                params,
                batch,
                key,
                l2_norm_clip=L2_NORM_CLIP,
                noise_multiplier=NOISE_MULTIPLIER,
                method=method,
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
    failed = {}
    if opacus is not None:
        torch_rows, failed = _torch_rows(network, model, params, images, labels)
        rows.update({name: (lambda *_, step=step: step()) for name, step in torch_rows.items()})
    for fn in rows.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in rows}
    for _ in range(rounds):
        for name, fn in rows.items():
            times[name].append(_time(fn, args, calls))
    return [(name, statistics.median(t), peaks.get(name)) for name, t in times.items()], failed


def summary(network: str, batch: int, results: list) -> dict | None:
    """jcnn's DP step beside Opacus' fastest mode, or None without an Opacus row."""
    seconds = {name: value for name, value, _ in results}
    modes = {n.rsplit(", ", 1)[1]: t for n, t in seconds.items() if n.startswith("Opacus DP step")}
    if not modes:
        return None
    fastest = min(modes, key=modes.get)
    return {
        "network": network,
        "batch": batch,
        "opacus_mode": fastest,
        "opacus_ms": 1e3 * modes[fastest],
        "opacus_x_torch_step": modes[fastest] / seconds["torch non-private step"],
        "jcnn_ms": 1e3 * seconds["DP step, ghost"],
        "jcnn_x_jcnn_step": seconds["DP step, ghost"] / seconds["non-private step"],
        "speedup": modes[fastest] / seconds["DP step, ghost"],
    }


def main(argv=None) -> list[dict]:
    """Print both tables; return one summary per network and batch (empty without Opacus)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256], help="LeNet-5's")
    parser.add_argument(
        "--cifar-batches", type=int, nargs="*", default=[64], help="the CIFAR-10 CNN's (none: skip)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    for name in ("rounds", "calls"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    for name in ("batches", "cifar_batches"):
        if any(size < 1 for size in getattr(args, name)):
            option = name.replace("_", "-")
            parser.error(f"--{option}: expected ints >= 1, got {getattr(args, name)}")
    if args.quick:
        args.batches, args.cifar_batches, args.rounds, args.calls = [16], [4], 1, 1
    quick = ", QUICK MODE (smoke run: not a measurement)" if args.quick else ""
    print(f"jax {jax.__version__} on {jax.devices()[0].platform}{quick}")
    if opacus is None:
        print(f"Opacus is not installed, its rows are left out ({MISSING_OPACUS})")
    else:
        print(
            f"opacus {opacus.__version__}, torch {torch.__version__} on "
            f"{len(os.sched_getaffinity(0))} threads"
        )
    print(
        f"{'network':<13}{'batch':>5}  {'row':<28}{'ms':>10}{'x non-private':>15}"
        f"{'peak MiB':>10}{'x':>7}"
    )
    runs = [("LeNet-5", b) for b in args.batches] + [
        ("CIFAR-10 CNN", b) for b in args.cifar_batches
    ]
    summaries = []
    for network, batch in runs:
        with warnings.catch_warnings():  # hooks on a network whose input needs no gradient
            warnings.filterwarnings("ignore", "Full backward hook is firing")
            results, failed = bench(network, batch, args.rounds, args.calls)
        bases = {name: (seconds, peak) for name, seconds, peak in results}
        base, base_peak = bases["non-private step"]
        for name, seconds, peak in results:
            if peak is None:  # a PyTorch row: against PyTorch's non-private step
                ratio = seconds / bases["torch non-private step"][0]
                memory = f"{'-':>10}{'-':>7}"
            else:
                ratio = seconds / base
                memory = f"{peak / 2**20:>10.1f}{peak / base_peak:>7.2f}"
            print(
                f"{network:<13}{batch:>5}  {name:<28}{1e3 * seconds:>10.1f}{ratio:>15.2f}{memory}",
                flush=True,
            )
        for mode, reason in failed.items():
            print(f"{network:<13}{batch:>5}  Opacus DP step, {mode} fails: {reason}", flush=True)
        if (row := summary(network, batch, results)) is not None:
            summaries.append(row)
    if summaries:
        print(
            "\njcnn's DP step (ghost, Book-Keeping) against Opacus' fastest mode (goal: >= 2x)\n"
            f"{'network':<13}{'batch':>5}  {'Opacus mode':<12}{'Opacus ms':>10}"
            f"{'x torch step':>13}{'jcnn ms':>10}{'x jcnn step':>12}{'Opacus/jcnn':>12}"
        )
        for row in summaries:
            print(
                f"{row['network']:<13}{row['batch']:>5}  {row['opacus_mode']:<12}"
                f"{row['opacus_ms']:>10.1f}{row['opacus_x_torch_step']:>13.2f}"
                f"{row['jcnn_ms']:>10.1f}{row['jcnn_x_jcnn_step']:>12.2f}{row['speedup']:>12.2f}"
            )
    return summaries


if __name__ == "__main__":
    main()
