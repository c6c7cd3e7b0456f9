"""jcnn's training recipes against the same recipes written by hand in PyTorch CPU (issue 12).

    python experiments/benchmarks/recipes_bench.py --only airbench94 --rounds 3 --steps 2
    python experiments/benchmarks/recipes_bench.py --only mnist99 --seeds 5
    python experiments/benchmarks/recipes_bench.py --quick        # smoke run of both

``airbench94`` (per-epoch time): jcnn runs the recipe exactly as ``fit`` does, from
``recipes.prepare("airbench94", ...)``: its model, ``TrainState.create`` with the recipe's
optimizer, and ``train_step`` on batches of ``prepared.train_loader`` (alternating flips and
±2 px reflect translations included). PyTorch runs airbench94 written by hand: the same network
(channels_last float32), whitening conv fixed from 5,000 images, dirac-initialized convs, Nesterov
SGD on the summed loss with airbench's two parameter groups and schedule, label smoothing 0.2,
lookahead every 5 steps, the same augmentations on tensors. After a first step each (timed apart:
"first step incl. compile", and apart from it the seconds JAX spent tracing, lowering and
compiling jcnn's ``train_step``, from ``jax.monitoring``), ``--rounds`` rounds of ``--steps``
steps alternate between them. Each side is timed in both phases of the recipe: from epoch 1,
where the whitening bias trains, and from epoch 4, where it is frozen (PyTorch's
``requires_grad=False``, jcnn's ``no_grad``); the per-epoch time is the two medians weighted by
the phases' shares of the run, x the steps of an epoch (48 at batch 1024). In this one process
PyTorch runs on jcnn's allocator setting (``jcnn.native.host_memory``, applied when jcnn is
imported), which speeds it up too; so the same comparison is then made with each side alone in
its own processes, as its users run it: jcnn on its default, PyTorch on glibc's
(``JCNN_HOST_MEMORY=release``), ``--process-rounds`` rounds of one process per side in
alternating order, each timing ``--steps`` steps of each phase after their first.
Checks first: jcnn's initial weights loaded into the PyTorch network give the same logits, and
both recipes start from the same loss on their first batch (within 5%).

``mnist99`` (end to end): one fresh process per seed and side, so that jcnn's compile time counts;
the wall time runs from loading the data to the test accuracy. jcnn calls
``recipes.run_recipe("mnist99", train, test, seed=s)``; PyTorch trains the FastMNISTNet twin with
the widths, batch size, length and label smoothing read from ``recipes.prepare("mnist99", ...)``
and the optimizer constants of ``MNIST99_TORCH``, which are checked first to move the same
parameters as the recipe's optax optimizer over the whole schedule (the check fails, naming the
constants, if the recipe changes).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

_PROCESS_START = time.perf_counter()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as TF  # noqa: E402

import jcnn  # noqa: E402
from jcnn.data import load  # noqa: E402
from jcnn.native import host_memory  # noqa: E402
from jcnn.train import TrainState, recipes, train_step  # noqa: E402
from jcnn.train.param_groups import no_grad_at  # noqa: E402

FULL_CIFAR10_TRAIN = 50_000
QUICK_BATCH = 16  # --quick: the airbench94 steps take the first 16 images of each batch
QUICK_MNIST_IMAGES = 1024  # --quick: mnist99 trains one epoch on 1,024 images

# ----------------------------------------------------------------------------- airbench94, torch

AIRBENCH94 = {  # airbench94 (legacy) in its own parametrization: rates per 1024 examples
    "lr": 11.5,
    "momentum": 0.85,
    "weight_decay": 0.0153,
    "bias_scaler": 64.0,
    "label_smoothing": 0.2,
    "whiten_bias_epochs": 3,
    "translate": 2,
    "widths": (64, 256, 256),
    "bn_momentum": 0.6,  # Flax's convention; PyTorch's is 1 - 0.6
    "bn_eps": 1e-12,
    "scaling_factor": 1 / 9,
}


class TorchConvGroup(torch.nn.Module):
    """conv3x3 - maxpool 2 - BN - GELU - conv3x3 - BN - GELU; convs without bias, BN weight 1."""

    def __init__(self, c_in: int, width: int):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c_in, width, 3, padding=1, bias=False)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1, bias=False)
        for name in ("norm1", "norm2"):
            norm = torch.nn.BatchNorm2d(
                width, eps=AIRBENCH94["bn_eps"], momentum=1 - AIRBENCH94["bn_momentum"]
            )
            norm.weight.requires_grad_(False)
            setattr(self, name, norm)

    def forward(self, x):
        x = TF.gelu(self.norm1(TF.max_pool2d(self.conv1(x), 2)))
        return TF.gelu(self.norm2(self.conv2(x)))


class TorchAirbenchNet(torch.nn.Module):
    """airbench94's network; attribute names are jcnn's parameter paths."""

    def __init__(self):
        super().__init__()
        self.whiten = torch.nn.Conv2d(3, 24, 2)
        self.whiten.weight.requires_grad_(False)
        c_in = 24
        for index, width in enumerate(AIRBENCH94["widths"], start=1):
            setattr(self, f"group{index}", TorchConvGroup(c_in, width))
            c_in = width
        self.head = torch.nn.Linear(c_in, 10, bias=False)

    def forward(self, x):
        x = TF.gelu(self.whiten(x))
        x = self.group3(self.group2(self.group1(x)))
        return self.head(TF.max_pool2d(x, 3).flatten(1)) * AIRBENCH94["scaling_factor"]


def torch_whitening_kernel(images, eps: float = 5e-4):
    """The whitening conv's weight ``(24, 3, 2, 2)`` from standardized NCHW images: eigenvectors
    of the 2x2 patches' second moments over sqrt(eigenvalue + eps), largest first, and their
    negatives."""
    channels = images.shape[1]
    patches = images.unfold(2, 2, 1).unfold(3, 2, 1)  # (N, C, H-1, W-1, 2, 2)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * 4).double()
    moments = patches.T @ patches / len(patches)
    values, vectors = torch.linalg.eigh(moments)
    values, vectors = values.flip(0), vectors.flip(1)
    filters = (vectors.T / torch.sqrt(values + eps)[:, None]).reshape(-1, channels, 2, 2)
    return torch.cat([filters, -filters]).float()


def torch_airbench94_data(images, labels):
    """CIFAR-10 ``(N, 32, 32, 3)`` uint8 images standardized per channel, NCHW in channels_last
    memory, and the labels as int64 tensors: what ``TorchAirbench94`` trains on."""
    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    mean = pixels.mean(dim=(0, 2, 3), keepdim=True)
    std = pixels.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
    standardized = ((pixels - mean) / std).contiguous(memory_format=torch.channels_last)
    return standardized, torch.from_numpy(labels).long()


class TorchAirbench94:
    """airbench94's training loop in PyTorch, one ``step()`` at a time, on the tensors of
    ``torch_airbench94_data``."""

    def __init__(self, images, labels, *, seed: int, total_steps: int, batch_size: int):
        torch.manual_seed(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.images, self.labels = images, labels
        self.flipped = torch.rand(len(labels), generator=self.generator) < 0.5
        self.batch_size, self.total_steps = batch_size, total_steps
        self.steps_per_epoch = len(labels) // batch_size

        self.net = TorchAirbenchNet().to(memory_format=torch.channels_last)
        with torch.no_grad():
            for name, module in self.net.named_modules():
                if isinstance(module, torch.nn.Conv2d) and name != "whiten":
                    torch.nn.init.dirac_(module.weight[: module.weight.shape[1]])
            torch.nn.init.normal_(self.net.head.weight, std=self.net.head.in_features**-0.5)
            self.net.whiten.weight.copy_(torch_whitening_kernel(self.images[:5000]))
            self.net.whiten.bias.zero_()

        hyp = AIRBENCH94
        kilostep = 1024 * (1 + 1 / (1 - hyp["momentum"]))  # rates are per 1024 examples
        lr = hyp["lr"] / kilostep
        decay = hyp["weight_decay"] * batch_size / kilostep
        norm_biases = [p for n, p in self.net.named_parameters() if "norm" in n and p.requires_grad]
        others = [p for n, p in self.net.named_parameters() if "norm" not in n and p.requires_grad]
        bias_lr = lr * hyp["bias_scaler"]
        self.optimizer = torch.optim.SGD(
            [
                {"params": norm_biases, "lr": bias_lr, "weight_decay": decay / bias_lr},
                {"params": others, "lr": lr, "weight_decay": decay / lr},
            ],
            momentum=hyp["momentum"],
            nesterov=True,
        )
        warmup = int(0.23 * total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: float(np.interp(step, [0, warmup, total_steps], [0.2, 1.0, 0.07])),
        )
        self.slow = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
        self.step_count, self.epoch, self.order = 0, -1, None

    def start_at_epoch(self, epoch: int) -> None:
        """Go on from the first step of ``epoch`` with the weights as they are (to time a later
        phase of the recipe: from epoch 3 on the whitening bias is frozen)."""
        self.step_count, self.epoch = epoch * self.steps_per_epoch, epoch - 1

    def _batch(self):
        index = self.step_count % self.steps_per_epoch
        if index == 0:
            self.epoch += 1
            self.order = torch.randperm(len(self.labels), generator=self.generator)
            self.net.whiten.bias.requires_grad_(self.epoch < AIRBENCH94["whiten_bias_epochs"])
        chosen = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        images = self.images[chosen]
        flip = self.flipped[chosen] ^ (self.epoch % 2 == 1)
        images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
        return translate(images, AIRBENCH94["translate"], self.generator), self.labels[chosen]

    def step(self, take: int | None = None) -> float:
        """One training step; returns the mean loss (``take``: use the batch's first images)."""
        self.net.train()
        images, labels = self._batch()
        if take is not None:
            images, labels = images[:take], labels[:take]
        logits = self.net(images)
        loss = TF.cross_entropy(
            logits, labels, label_smoothing=AIRBENCH94["label_smoothing"], reduction="sum"
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        self.step_count += 1
        if self.step_count % 5 == 0 or self.step_count == self.total_steps:
            alpha = 1.0 - 0.95**5 * (self.step_count / self.total_steps) ** 3
            if self.step_count % 5:
                alpha = 0.0  # the last step: the weights become the slow average
            self._lookahead(alpha)
        return loss.item() / len(labels)

    @torch.no_grad()
    def _lookahead(self, alpha: float):
        # as airbench: the average covers the parameters and the BN running statistics
        for key, value in self.net.state_dict().items():
            if value.is_floating_point():
                self.slow[key].lerp_(value, alpha)
                value.copy_(self.slow[key])


def translate(images, shift: int, generator):
    """Each image moved by its own random ``(dy, dx)`` in ``[-shift, shift]``, reflect padding."""
    n, channels, height, width = images.shape
    padded = TF.pad(images, (shift,) * 4, mode="reflect")
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator)
    rows = offsets[:, 0].view(-1, 1, 1, 1) + torch.arange(height).view(1, 1, -1, 1)
    out = padded.gather(2, rows.expand(n, channels, height, width + 2 * shift))
    cols = offsets[:, 1].view(-1, 1, 1, 1) + torch.arange(width).view(1, 1, 1, -1)
    out = out.gather(3, cols.expand(n, channels, height, width))
    return out.contiguous(memory_format=torch.channels_last)


def load_jcnn_params(module: torch.nn.Module, params) -> None:
    """Copy jcnn parameters (``a/b/kernel`` HWIO or (in, out)) into the twin's ``a.b.weight``."""
    state = {}
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = ".".join(k.key for k in path).replace(".kernel", ".weight")
        value = np.array(value)  # a writable copy
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
        state[name.replace(".scale", ".weight")] = torch.from_numpy(np.ascontiguousarray(value))
    missing, unexpected = module.load_state_dict(state, strict=False)
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    left = [m for m in missing if m not in frozen and "running" not in m and "num_batches" not in m]
    if unexpected or left:
        raise RuntimeError(f"twin does not match jcnn's parameters: {unexpected=} missing={left}")


def check_logits(model, variables, twin, images, what: str, tolerance: float = 2e-3) -> float:
    """jcnn's and the twin's training-mode logits on ``images`` (NHWC float32) agree."""
    forward = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
    ours = forward(variables, jnp.asarray(images))  # one compile, not one per operation
    twin.train()
    with torch.no_grad():
        theirs = twin(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2).contiguous())
    ours = np.asarray(ours)
    error = float(np.abs(ours - theirs.numpy()).max() / np.abs(ours).max())
    if not error < tolerance:
        raise RuntimeError(f"{what}: the PyTorch twin's logits differ from jcnn's by {error:.2e}")
    return error


LATE = " late"  # the steps from epoch 4 on, where the whitening bias is frozen


def airbench94_sides(args, sides=("jcnn", "torch")) -> dict:
    """The recipe's data and, for each side asked for, two callables running one training step
    each (the first call compiles): ``side`` from epoch 1, where the whitening bias trains, and
    ``side + LATE`` from epoch 4, where it is frozen (no gradient reaches the whitening layer).
    With both sides, jcnn's initial logits are checked against the twin's."""
    images, labels = load("cifar10", "train", data_dir=args.data_dir)
    if args.quick:
        images, labels = images[:1024], labels[:1024]
    log(f"airbench94: {len(labels)} images loaded")
    prepared = recipes.prepare("airbench94", images, labels, seed=args.seed)
    loader, config = prepared.train_loader, prepared.config
    take = QUICK_BATCH if args.quick else None
    batch_size = take or loader.batch_size
    frozen_from = AIRBENCH94["whiten_bias_epochs"]
    steps, parity = {}, None
    if "jcnn" in sides:
        first = loader.batch(0, 0)
        state = TrainState.create(
            prepared.model, config.optimizer, jax.random.PRNGKey(config.seed), first[0][:1]
        )
        if "torch" in sides:
            twin = TorchAirbenchNet().to(memory_format=torch.channels_last)
            load_jcnn_params(twin, jax.device_get(state.params))
            variables = {"params": state.params, "batch_stats": state.batch_stats}
            parity = check_logits(prepared.model, variables, twin, first[0][:32], "airbench94")
            del twin
            log(f"airbench94: prepared, logits checked ({parity:.1e})")

        def jcnn_steps(first_step):
            done = first_step

            def step():  # as fit runs it: the epoch's batch and the epoch's no_grad
                nonlocal state, done
                epoch, index = divmod(done, len(loader))
                batch = loader.batch(epoch, index)
                if take is not None:
                    batch = tuple(a[:take] for a in batch)
                state, metrics = train_step(
                    state,
                    batch,
                    label_smoothing=config.label_smoothing,
                    no_grad=no_grad_at(config.no_grad, epoch),
                )
                done += 1
                return float(metrics["loss"])  # waits for the step, as fit does

            return step

        steps["jcnn"], steps["jcnn" + LATE] = jcnn_steps(0), jcnn_steps(frozen_from * len(loader))
    if "torch" in sides:
        data = torch_airbench94_data(images, labels)
        early, late = (
            TorchAirbench94(
                *data, seed=args.seed, total_steps=config.max_steps, batch_size=loader.batch_size
            )
            for _ in range(2)
        )
        late.start_at_epoch(frozen_from)
        steps["torch"] = lambda: early.step(take)
        steps["torch" + LATE] = lambda: late.step(take)
        log("airbench94: PyTorch recipe prepared")
    return {
        "steps": steps,
        "batch_size": batch_size,
        "steps_per_epoch": FULL_CIFAR10_TRAIN // batch_size,  # 48 at the recipe's 1024
        "epochs": config.max_steps / len(loader),  # 9.9
        "frozen_from": frozen_from,
        "parity": parity,
    }


def bench_airbench94(args) -> dict:
    """Both sides in this process, interleaved (PyTorch under jcnn's ``host_memory`` setting)."""
    sides = airbench94_sides(args)
    log("airbench94: timing both sides in this process")
    timed = interleave(sides.pop("steps"), args.rounds, args.steps)
    return {**sides, **timed, "host_memory": {side: host_memory() for side in ("jcnn", "torch")}}


def airbench94_worker(args) -> dict:
    """One side alone in this process: the first step of each phase, then ``--steps`` timed
    steps of each, alternating."""
    side = args.worker.removeprefix("airbench94-")
    sides = airbench94_sides(args, (side,))
    timed = interleave(sides.pop("steps"), args.steps, 1)
    return {**sides, **timed, "host_memory": host_memory()}


def bench_airbench94_processes(args) -> dict:
    """Each side in its own processes as its users run it: jcnn with its default allocator
    setting, PyTorch with glibc's (``JCNN_HOST_MEMORY=release``: importing jcnn for the data
    leaves ``malloc`` as it is). ``--process-rounds`` rounds of one process per side, the order
    reversed every other round; each process times ``--steps`` steps of each phase."""
    runs = {"jcnn": [], "torch": []}
    for round_index in range(args.process_rounds):
        order = ("jcnn", "torch") if round_index % 2 == 0 else ("torch", "jcnn")
        for side in order:
            env = {"JCNN_HOST_MEMORY": "release"} if side == "torch" else {}
            runs[side].append(run_worker(f"airbench94-{side}", args.seed, args, None, env))
            log(f"airbench94 {side} process: {runs[side][-1]['times']}")
    first_runs = {side: found[0] for side, found in runs.items()}
    merged = {"parity": None, "times": {}, "host_memory": {}}
    for key in ("batch_size", "steps_per_epoch", "epochs", "frozen_from"):
        merged[key] = first_runs["jcnn"][key]
    for key in ("first", "compile", "first_loss"):
        merged[key] = {k: v for run in first_runs.values() for k, v in run[key].items()}
    for side, found in runs.items():
        merged["host_memory"][side] = found[0]["host_memory"]
        for name in found[0]["times"]:
            merged["times"][name] = [t for run in found for t in run["times"][name]]
    return merged


def log(message: str) -> None:
    """Progress on stderr (the tables go to stdout)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


_COMPILE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
    "/jax/core/compile/backend_compile_duration",
)
_compile_seconds: dict[str, float] = {}


def _record_compile(event: str, seconds: float, **kwargs) -> None:
    if event in _COMPILE_EVENTS:  # named "train_step", "jit_train_step", "jit(train_step)"
        name = str(kwargs.get("fun_name", "?")).removeprefix("jit").strip("_()")
        _compile_seconds[name] = _compile_seconds.get(name, 0.0) + seconds


jax.monitoring.register_event_duration_secs_listener(_record_compile)


def interleave(steps: dict, rounds: int, calls: int) -> dict:
    """First call of each (timed apart, with the seconds JAX spent tracing, lowering and compiling
    ``train_step`` in it), then ``rounds`` rounds of ``calls`` timed calls each, the order
    reversed every other round."""
    first, compile_seconds, loss, times = {}, {}, {}, {name: [] for name in steps}
    for name, step in steps.items():
        _compile_seconds.clear()
        start = time.perf_counter()
        loss[name] = step()
        first[name] = time.perf_counter() - start
        compile_seconds[name] = _compile_seconds.get("train_step", float("nan"))
        log(f"{name}: first step {first[name]:.2f} s")
    names = list(steps)
    for round_index in range(rounds):
        for name in names if round_index % 2 == 0 else names[::-1]:
            for _ in range(calls):
                start = time.perf_counter()
                steps[name]()
                times[name].append(time.perf_counter() - start)
    return {"first": first, "compile": compile_seconds, "first_loss": loss, "times": times}


def airbench94_table(result: dict, setting: str) -> str:
    """``setting``: "one process" (interleaved, one allocator setting for both) or "own
    processes" (each side alone, on its own default). The run's time per epoch weighs the
    median step of each phase by its share of the run's steps."""
    first, loss, times = result["first"], result["first_loss"], result["times"]
    median = {k: statistics.median(v) for k, v in times.items()}
    epochs, frozen_from, per_epoch = (
        result["epochs"],
        result["frozen_from"],
        result["steps_per_epoch"],
    )
    run_epoch = {
        side: per_epoch
        * (frozen_from * median[side] + (epochs - frozen_from) * median[side + LATE])
        / epochs
        for side in ("jcnn", "torch")
    }
    spread = {
        side: max(max(v) / min(v) - 1 for k, v in times.items() if k.startswith(side))
        for side in ("jcnn", "torch")
    }
    batch = result["batch_size"]

    def both(values):
        return values["jcnn"], values["torch"]

    rows = [
        ("first step incl. compile (s)", *both(first), "{:.2f}"),
        ("of which train_step's trace + compile (s)", result["compile"]["jcnn"], None, "{:.2f}"),
        (
            f"median step, batch {batch}, epochs 1-{frozen_from} (s)",
            *both(median),
            "{:.3f}",
        ),
        (
            f"median step, epochs {frozen_from + 1}-{math.ceil(epochs)}, whitening frozen (s)",
            median["jcnn" + LATE],
            median["torch" + LATE],
            "{:.3f}",
        ),
        (f"per epoch over the run's {epochs:.3g} epochs (s)", *both(run_epoch), "{:.1f}"),
        (
            "images/s over the run",
            *(per_epoch * batch / run_epoch[k] for k in ("jcnn", "torch")),
            "{:.0f}",
        ),
        ("spread (max/min - 1)", *both(spread), "{:.0%}"),
        ("first-batch loss", *both(loss), "{:.4f}"),
    ]
    memory = result["host_memory"]
    lines = [f"| airbench94, {setting} | jcnn | torch | torch/jcnn |", "|---|---|---|---|"]
    memory_row = f"| {memory['jcnn']} | {memory['torch']} | - |"
    lines.append("| freed host memory (`JCNN_HOST_MEMORY`) " + memory_row)
    for label, ours, theirs, fmt in rows:
        if theirs is None:
            lines.append(f"| {label} | {fmt.format(ours)} | - | - |")
            continue
        if "spread" in label:
            ratio = "-"
        elif "images/s" in label:
            ratio = f"{ours / theirs:.2f}"
        else:
            ratio = f"**{theirs / ours:.2f}x**" if "per epoch" in label else f"{theirs / ours:.2f}"
        lines.append(f"| {label} | {fmt.format(ours)} | {fmt.format(theirs)} | {ratio} |")
    lines.append("")
    note = f"timed steps per side and phase: {len(times['jcnn'])}"
    if result["parity"] is not None:
        note += f"; logits with jcnn's initial weights agree to {result['parity']:.1e} (relative)"
    lines.append(note)
    return "\n".join(lines)


def check_first_losses(result: dict) -> None:
    ours, theirs = result["first_loss"]["jcnn"], result["first_loss"]["torch"]
    if not abs(theirs / ours - 1) < 0.05:
        raise RuntimeError(
            f"airbench94: first-batch losses differ by more than 5%: jcnn {ours:.4f}, "
            f"torch {theirs:.4f}"
        )


# ----------------------------------------------------------------------------- mnist99, torch

MNIST99_TORCH = {  # the optimizer of recipes' mnist99 (checked against it by check_optimizer)
    "peak_lr": 0.15,
    "momentum": 0.9,
    "weight_decay": 5e-4,  # on the kernels (ndim > 1) only
    "warmup_fraction": 0.1,
    "lr_points": (0.1, 1.0, 0.0),  # x peak at step 0, at the end of the warm-up, at the end
}


class ParameterLookahead:
    """airbench's lookahead on a list of parameters: every 5 steps the slow copy moves by
    ``1 - 0.95**5 (t/T)**3`` towards them and they take its value; the last step ends on it."""

    def __init__(self, parameters, total_steps: int):
        self.parameters = list(parameters)
        self.slow = [p.detach().clone() for p in self.parameters]
        self.total, self.count = total_steps, 0

    @torch.no_grad()
    def step(self):
        self.count += 1
        if self.count % 5 == 0:
            alpha = 1.0 - 0.95**5 * (self.count / self.total) ** 3
        elif self.count == self.total:
            alpha = 0.0
        else:
            return
        for slow, parameter in zip(self.slow, self.parameters, strict=True):
            slow.lerp_(parameter, alpha)
            parameter.copy_(slow)


class TorchFastMNISTNet(torch.nn.Module):
    """jcnn.models.FastMNISTNet: two (conv 5x5 valid no bias - maxpool 2 - BN - ReLU), linear."""

    def __init__(self, widths, bn_momentum: float, bn_eps: float, num_classes: int = 10):
        super().__init__()
        c_in, size = 1, 28
        for index, width in enumerate(widths, start=1):
            setattr(self, f"conv{index}", torch.nn.Conv2d(c_in, width, 5, bias=False))
            norm = torch.nn.BatchNorm2d(width, eps=bn_eps, momentum=1 - bn_momentum)
            setattr(self, f"norm{index}", norm)
            c_in, size = width, (size - 4) // 2
        self.head = torch.nn.Linear(c_in * size * size, num_classes)
        for module in self.modules():  # jcnn's defaults: He normal (fan in), zero biases
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                if module.bias is not None:
                    torch.nn.init.zeros_(module.bias)

    def forward(self, x):
        for index in (1, 2):
            conv, norm = getattr(self, f"conv{index}"), getattr(self, f"norm{index}")
            x = TF.relu(norm(TF.max_pool2d(conv(x), 2)))
        return self.head(x.permute(0, 2, 3, 1).flatten(1))  # NHWC flattening order, as jcnn


def mnist99_optimizer(parameters, total_steps: int):
    """PyTorch's form of the recipe's optimizer: Nesterov SGD, decay on the kernels, warm-up and
    linear decay of the rate."""
    hyp = MNIST99_TORCH
    parameters = list(parameters)
    groups = [
        {"params": [p for p in parameters if p.ndim > 1], "weight_decay": hyp["weight_decay"]},
        {"params": [p for p in parameters if p.ndim <= 1], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.SGD(groups, lr=hyp["peak_lr"], momentum=hyp["momentum"], nesterov=True)
    warmup = max(1, int(hyp["warmup_fraction"] * total_steps))
    points = [0, warmup, total_steps]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: float(np.interp(step, points, hyp["lr_points"]))
    )
    return optimizer, scheduler


def mnist99_spec(prepared) -> dict:
    """What the PyTorch side reads from jcnn's prepared recipe."""
    return {
        "widths": list(prepared.model.widths),
        "bn_momentum": prepared.model.bn_momentum,
        "bn_eps": jcnn.nn.BatchNorm.eps,
        "batch_size": prepared.train_loader.batch_size,
        "max_steps": prepared.config.max_steps,
        "label_smoothing": prepared.config.label_smoothing,
    }


def check_optimizer(prepared, spec: dict, seed: int = 0) -> float:
    """MNIST99_TORCH moves the same parameters as the recipe's optimizer, every step of the
    schedule, under the same random gradients."""
    params = prepared.model.init(jax.random.key(seed), jnp.zeros((1, 28, 28, 1)))["params"]
    tx = prepared.config.optimizer
    opt_state = tx.init(params)

    @jax.jit
    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), opt_state

    leaves, treedef = jax.tree.flatten(params)
    tensors = [torch.nn.Parameter(torch.from_numpy(np.array(leaf))) for leaf in leaves]
    optimizer, scheduler = mnist99_optimizer(tensors, spec["max_steps"])
    averaging = ParameterLookahead(tensors, spec["max_steps"])
    rng = np.random.default_rng(seed)
    for _ in range(spec["max_steps"]):
        grads = [rng.standard_normal(leaf.shape).astype(np.float32) for leaf in leaves]
        params, opt_state = update(params, opt_state, jax.tree.unflatten(treedef, grads))
        for tensor, grad in zip(tensors, grads, strict=True):
            tensor.grad = torch.from_numpy(grad)
        optimizer.step()
        scheduler.step()
        averaging.step()
    error = max(
        float(np.abs(np.asarray(p) - t.detach().numpy()).max() / (np.abs(np.asarray(p)).max()))
        for p, t in zip(jax.tree.leaves(params), tensors, strict=True)
    )
    if not error < 1e-4:
        raise RuntimeError(
            f"mnist99: the recipe's optimizer and MNIST99_TORCH ({MNIST99_TORCH}) moved the "
            f"parameters apart by {error:.1e} (relative): the recipe changed; update MNIST99_TORCH"
        )
    return error


def mnist99_worker(side: str, seed: int, data_dir, limit, epochs, spec: dict | None) -> dict:
    """One end-to-end run (in its own process): data loading to test accuracy."""
    start = time.perf_counter()
    train = load("mnist", "train", data_dir=data_dir)
    test = load("mnist", "test", data_dir=data_dir)
    if limit:
        train, test = tuple(a[:limit] for a in train), tuple(a[: limit // 2] for a in test)
    if side == "jcnn":
        result = recipes.run_recipe("mnist99", train, test, seed=seed, epochs=epochs)
        accuracy = float(result["test_accuracy"])
    else:
        accuracy = torch_mnist99(train, test, seed, spec)
    return {
        "accuracy": accuracy,
        "seconds": time.perf_counter() - start,
        "startup": start - _PROCESS_START,
    }


def torch_mnist99(train, test, seed: int, spec: dict) -> float:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.from_numpy(train[0]).permute(0, 3, 1, 2).float()
    mean, std = pixels.mean(), pixels.std(unbiased=False)  # one channel

    def standardized(images):
        return (torch.from_numpy(images).permute(0, 3, 1, 2).float() - mean) / std

    images, labels = standardized(train[0]), torch.from_numpy(train[1]).long()
    net = TorchFastMNISTNet(spec["widths"], spec["bn_momentum"], spec["bn_eps"])
    optimizer, scheduler = mnist99_optimizer(net.parameters(), spec["max_steps"])
    averaging = ParameterLookahead(net.parameters(), spec["max_steps"])
    batch, steps = spec["batch_size"], 0
    net.train()
    while steps < spec["max_steps"]:
        order = torch.randperm(len(labels), generator=generator)
        for index in range(min(len(labels) // batch, spec["max_steps"] - steps)):
            chosen = order[index * batch : (index + 1) * batch]
            loss = TF.cross_entropy(
                net(images[chosen]), labels[chosen], label_smoothing=spec["label_smoothing"]
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            averaging.step()
            steps += 1
    net.eval()
    test_images, test_labels = standardized(test[0]), torch.from_numpy(test[1]).long()
    with torch.no_grad():
        correct = sum(
            int((net(x).argmax(1) == y).sum())
            for x, y in zip(test_images.split(1000), test_labels.split(1000), strict=True)
        )
    return correct / len(test_labels)


def run_worker(worker: str, seed: int, args, spec: dict | None, env: dict | None = None) -> dict:
    """A ``--worker`` run in a fresh Python process (same interpreter, same jcnn; ``env`` added
    to this process's environment); its result is the JSON on its last line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker]
    command += ["--seed", str(seed), "--threads", str(args.threads), "--steps", str(args.steps)]
    if spec is not None:
        command += ["--spec", json.dumps(spec)]
    if args.data_dir:
        command += ["--data-dir", str(args.data_dir)]
    if args.quick:
        command += ["--quick"]
    env = {**os.environ, **(env or {})}
    root = str(Path(jcnn.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    total = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{worker} (seed {seed}) failed:\n{done.stderr[-3000:]}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process": total}


def quick_epochs(args):
    """mnist99's length: the recipe's, or one epoch in quick mode."""
    return 1 if args.quick else None


def bench_mnist99(args) -> dict:
    train = load("mnist", "train", data_dir=args.data_dir)
    if args.quick:
        train = tuple(a[:QUICK_MNIST_IMAGES] for a in train)
    prepared = recipes.prepare("mnist99", *train, seed=0, epochs=quick_epochs(args))
    spec = mnist99_spec(prepared)
    variables = prepared.model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    twin = TorchFastMNISTNet(spec["widths"], spec["bn_momentum"], spec["bn_eps"])
    load_jcnn_params(twin, variables["params"])
    sample = np.asarray(prepared.standardize(train[0][:64]))
    parity = check_logits(prepared.model, variables, twin, sample, "mnist99")
    optimizer_error = check_optimizer(prepared, spec)
    log(f"mnist99: twin logits ({parity:.1e}) and optimizer ({optimizer_error:.1e}) checked")
    runs = []
    for seed in range(args.seeds):
        sides = ("jcnn", "torch") if seed % 2 == 0 else ("torch", "jcnn")
        runs.append({})
        for side in sides:
            runs[-1][side] = run = run_worker(f"mnist99-{side}", seed, args, spec)
            accuracy, seconds = 100 * run["accuracy"], run["seconds"]
            log(f"mnist99 seed {seed} {side}: {accuracy:.2f}% in {seconds:.1f} s")
    return {"runs": runs, "spec": spec, "parity": parity, "optimizer_error": optimizer_error}


def mnist99_table(result: dict) -> str:
    lines = [
        "| seed | jcnn test acc | jcnn s | torch test acc | torch s | torch/jcnn time |"
        " jcnn process s | torch process s |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(label, ours, theirs, bold=""):
        ratio = f"{bold}{theirs['seconds'] / ours['seconds']:.2f}x{bold}"
        return (
            f"| {label} | {100 * ours['accuracy']:.2f}% | {ours['seconds']:.1f} | "
            f"{100 * theirs['accuracy']:.2f}% | {theirs['seconds']:.1f} | {ratio} | "
            f"{ours['process']:.1f} | {theirs['process']:.1f} |"
        )

    runs = result["runs"]
    for seed, run in enumerate(runs):
        lines.append(row(seed, run["jcnn"], run["torch"]))
    if len(runs) > 1:
        mean = {
            side: {key: statistics.mean(run[side][key] for run in runs) for key in runs[0][side]}
            for side in ("jcnn", "torch")
        }
        lines.append(row("**mean**", mean["jcnn"], mean["torch"], bold="**"))
    spec = result["spec"]
    lines.append("")
    lines.append(
        f"recipe as prepared: widths {tuple(spec['widths'])}, batch {spec['batch_size']}, "
        f"{spec['max_steps']} steps, label smoothing {spec['label_smoothing']}; twin logits "
        f"agree to {result['parity']:.1e}, optimizer trajectories to "
        f"{result['optimizer_error']:.1e} (relative)"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def header(args) -> str:
    load = os.getloadavg()[0]
    return (
        f"jax {jax.__version__}, torch {torch.__version__} ({args.threads} threads), "
        f"conv backend: {'oneDNN' if jcnn.native.available() else 'XLA'}, "
        f"load average {load:.1f} on {os.cpu_count()} cores"
        + (", QUICK MODE (smoke run: not a measurement)" if args.quick else "")
    )


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", nargs="+", choices=("airbench94", "mnist99"))
    parser.add_argument("--rounds", type=int, default=3, help="airbench94: interleaved rounds")
    parser.add_argument("--steps", type=int, default=2, help="airbench94: timed steps per round")
    parser.add_argument(
        "--process-rounds",
        type=int,
        default=2,
        help="airbench94: rounds of one process per side, each on its own allocator default",
    )
    parser.add_argument("--seeds", type=int, default=5, help="mnist99: runs per side")
    parser.add_argument("--seed", type=int, default=0, help="airbench94's seed")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads")
    parser.add_argument("--data-dir", default=None, help="default: $JCNN_DATA_DIR")
    parser.add_argument("--quick", action="store_true", help="smoke run: seconds, no measurement")
    parser.add_argument(
        "--worker",
        choices=("mnist99-jcnn", "mnist99-torch", "airbench94-jcnn", "airbench94-torch"),
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.steps, args.seeds, args.process_rounds = 1, 1, 1, 1
    for name in ("rounds", "steps", "seeds", "threads", "process_rounds"):
        if getattr(args, name) < 1:
            option = name.replace("_", "-")
            parser.error(f"--{option}: expected an int >= 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.worker and args.worker.startswith("airbench94-"):
        result = airbench94_worker(args)
        print(json.dumps(result))
        return result
    if args.worker:
        spec = json.loads(args.spec) if args.spec else None
        limit = QUICK_MNIST_IMAGES if args.quick else None
        side = args.worker.removeprefix("mnist99-")
        result = mnist99_worker(side, args.seed, args.data_dir, limit, quick_epochs(args), spec)
        print(json.dumps(result))
        return result
    print(header(args), flush=True)
    results = {}
    only = args.only or ("airbench94", "mnist99")
    if "airbench94" in only:
        results["airbench94"] = bench_airbench94(args)
        print("\n" + airbench94_table(results["airbench94"], "one process"), flush=True)
        check_first_losses(results["airbench94"])
        results["airbench94_processes"] = bench_airbench94_processes(args)
        table = airbench94_table(results["airbench94_processes"], "own processes")
        print("\n" + table, flush=True)
        check_first_losses(results["airbench94_processes"])
    if "mnist99" in only:
        results["mnist99"] = bench_mnist99(args)
        print("\n" + mnist99_table(results["mnist99"]), flush=True)
    return results


if __name__ == "__main__":
    main()
