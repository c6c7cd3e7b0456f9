"""Speed of jcnn against a hand-written Flax Linen twin and the same network in PyTorch.

One command, one table (see README.md next to this file):

    /work/venv/bin/python experiments/benchmarks/bench.py            # full run
    /work/venv/bin/python experiments/benchmarks/bench.py --quick    # smoke run, seconds
    python experiments/benchmarks/bench.py --torch-device cuda --scale 4   # on a GPU

Every row is measured in the same process, the implementations interleaved round by round after
warm-up; a cell is the median over rounds, and the spread (max/min - 1 over rounds) is printed
so the noise of a shared machine is visible. Columns:

* ``jcnn``: the library itself, ``jcnn.models.LeNet5()``, ``AirbenchNet()`` and ``resnet20()``,
  trained by ``jcnn.train.train_step`` on a ``jcnn.train.TrainState`` (per-example gradients:
  ``jcnn.analysis.per_example_grads``). Its convolutions run through oneDNN when the native
  library is built (``jcnn-build-native``; the header line says which backend), else through
  jcnn's XLA formulations; ``JCNN_CONV_BACKEND=xla`` forces the latter.
* ``flax``: a hand-written Flax Linen twin of the same architecture (``flax.linen.Conv``,
  ``BatchNorm``, ``max_pool``: XLA's native operations), parameter paths equal to jcnn's.
* ``torch``: the same network in PyTorch (eager; on the CPU unless ``--torch-device``), loaded
  with the same initial weights.

The three networks of a row are checked to have the same trainable parameter count and the same
first-step loss.

``--only layers`` gives the GFLOP/s of each product (forward, input gradient, weight gradient)
of single convolution layers, the three networks' and issue 16's (depthwise, grouped, transposed
1-D/2-D/3-D, 3-D), on XLA's own convolution, jcnn's XLA path, jcnn's oneDNN backend and PyTorch,
every side first checked against PyTorch's products.

``--only steps-per-call`` times ``jcnn.train.train_steps`` (K steps in one compiled call) beside
K calls of ``train_step`` and K PyTorch steps, after checking that both jcnn sides reach the same
parameters.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as TF
from jax import lax

import jcnn
from jcnn import functional as F
from jcnn.analysis import per_example_grads
from jcnn.train import TrainState, train_step, train_steps

# ----------------------------------------------------------------------------- Flax twins
# Parameter paths are jcnn.models' paths, so one variables tree feeds both JAX networks.


class FlaxLeNet5(nn.Module):
    """jcnn.models.LeNet5(): conv 20@5x5 pad 2, relu, maxpool 2, conv 50@5x5 pad 2, relu,
    maxpool 2, dense 500, relu, dense 10."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.relu(nn.Conv(20, (5, 5), padding=((2, 2), (2, 2)), name="conv1")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(nn.Conv(50, (5, 5), padding=((2, 2), (2, 2)), name="conv2")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(500, name="fc1")(x))
        return nn.Dense(10, name="fc2")(x)


class FlaxConvGroup(nn.Module):
    width: int

    @nn.compact
    def __call__(self, x, train):
        norm = partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.6,
            epsilon=1e-12,
            use_scale=False,
        )
        x = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv1")(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.gelu(norm(name="norm1")(x), approximate=False)
        x = nn.Conv(self.width, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv2")(x)
        return nn.gelu(norm(name="norm2")(x), approximate=False)


class FlaxAirbenchNet(nn.Module):
    """jcnn.models.AirbenchNet(): 2x2 whitening conv, three conv groups (64/256/256), exact GELU."""

    widths: tuple[int, int, int] = (64, 256, 256)

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.gelu(nn.Conv(24, (2, 2), padding="VALID", name="whiten")(x), approximate=False)
        for i, width in enumerate(self.widths, start=1):
            x = FlaxConvGroup(width, name=f"group{i}")(x, train)
        x = nn.max_pool(x, (3, 3), (3, 3))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10, use_bias=False, name="head")(x) / 9.0


class FlaxBasicBlock(nn.Module):
    features: int
    stride: int

    @nn.compact
    def __call__(self, x, train):
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        conv = partial(nn.Conv, kernel_size=(3, 3), padding=((1, 1), (1, 1)), use_bias=False)
        y = conv(self.features, strides=self.stride, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = norm(name="bn2")(conv(self.features, name="conv2")(y))
        if self.stride != 1 or x.shape[-1] != self.features:  # option A: subsample, zero-pad
            x = x[:, :: self.stride, :: self.stride]
            extra = self.features - x.shape[-1]
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        return nn.relu(y + x)


class FlaxResNet20(nn.Module):
    """jcnn.models.resnet20(): 3x3 conv 16, BN, relu, 3 stages of 3 basic blocks (16/32/64,
    option-A shortcuts), global average pool, dense 10."""

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(16, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name="bn1")(x)
        x = nn.relu(x)
        for stage, width in enumerate((16, 32, 64), start=1):
            for index in range(3):
                stride = 2 if stage > 1 and index == 0 else 1
                x = FlaxBasicBlock(width, stride, name=f"layer{stage}_{index}")(x, train)
        return nn.Dense(10, name="fc")(x.mean(axis=(1, 2)))


# ----------------------------------------------------------------------------- torch twins
# Attribute names are jcnn's, so load_into_torch maps ``a/b/kernel`` to ``a.b.weight``.


class TorchLeNet5(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, 20, 5, padding=2)
        self.conv2 = torch.nn.Conv2d(20, 50, 5, padding=2)
        self.fc1 = torch.nn.Linear(2450, 500)
        self.fc2 = torch.nn.Linear(500, 10)

    def forward(self, x):
        x = TF.max_pool2d(TF.relu(self.conv1(x)), 2)
        x = TF.max_pool2d(TF.relu(self.conv2(x)), 2)
        x = x.permute(0, 2, 3, 1).flatten(1)  # NHWC flattening order, as in jcnn
        return self.fc2(TF.relu(self.fc1(x)))


def frozen_unit_scale_bn(width, **options):
    """BatchNorm without a learned scale (airbench's): the weight stays 1 and is not trained."""
    norm = torch.nn.BatchNorm2d(width, **options)
    norm.weight.requires_grad_(False)
    return norm


class TorchConvGroup(torch.nn.Module):
    def __init__(self, c_in, width):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c_in, width, 3, padding=1, bias=False)
        self.norm1 = frozen_unit_scale_bn(width, momentum=0.4, eps=1e-12)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm2 = frozen_unit_scale_bn(width, momentum=0.4, eps=1e-12)

    def forward(self, x):
        x = TF.gelu(self.norm1(TF.max_pool2d(self.conv1(x), 2)))
        return TF.gelu(self.norm2(self.conv2(x)))


class TorchAirbenchNet(torch.nn.Module):
    def __init__(self, widths=(64, 256, 256)):
        super().__init__()
        self.whiten = torch.nn.Conv2d(3, 24, 2)
        c_in = 24
        for i, width in enumerate(widths, start=1):
            setattr(self, f"group{i}", TorchConvGroup(c_in, width))
            c_in = width
        self.head = torch.nn.Linear(widths[-1], 10, bias=False)

    def forward(self, x):
        x = TF.gelu(self.whiten(x))
        x = self.group3(self.group2(self.group1(x)))
        return self.head(TF.max_pool2d(x, 3).flatten(1)) / 9.0


class TorchBasicBlock(torch.nn.Module):
    def __init__(self, c_in, features, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c_in, features, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(features)
        self.conv2 = torch.nn.Conv2d(features, features, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(features)
        self.stride, self.extra = stride, features - c_in

    def forward(self, x):
        y = self.bn2(self.conv2(TF.relu(self.bn1(self.conv1(x)))))
        if self.stride != 1 or self.extra:
            x = x[:, :, :: self.stride, :: self.stride]
            x = TF.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))
        return TF.relu(y + x)


class TorchResNet20(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.blocks, c_in = [], 16
        for stage, width in enumerate((16, 32, 64), start=1):
            for index in range(3):
                stride = 2 if stage > 1 and index == 0 else 1
                block = TorchBasicBlock(c_in, width, stride)
                setattr(self, f"layer{stage}_{index}", block)
                self.blocks.append(block)
                c_in = width
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, x):
        x = TF.relu(self.bn1(self.conv1(x)))
        for block in self.blocks:
            x = block(x)
        return self.fc(x.mean(dim=(2, 3)))


def load_into_torch(module, params):
    """Copy jcnn-path parameters into the torch twin (HWIO -> OIHW, (in, out) -> (out, in))."""
    state = {}
    for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = ".".join(k.key for k in path)
        name = name.replace(".kernel", ".weight").replace(".scale", ".weight")
        value = np.array(value)
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:
            value = value.T
        state[name] = torch.from_numpy(np.ascontiguousarray(value))
    missing, unexpected = module.load_state_dict(state, strict=False)
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad}
    assert not unexpected and all(
        "running" in m or "num_batches" in m or m in frozen for m in missing
    ), (missing, unexpected)


def count_params(params):
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))


def count_torch_params(module):
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- steps

OPTIMIZER = partial(optax.sgd, 0.01, momentum=0.9, nesterov=True)
# On NVIDIA GPUs XLA and cuDNN multiply float32 in TF32 (10-bit mantissa) by default: the checks
# that the three sides compute the same thing get this much more room there.
TOLERANCE_SCALE = 1.0 if jax.default_backend() == "cpu" else 100.0


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def jcnn_steps(model, params, batch_stats, x, labels):
    """jcnn.train.train_step on a TrainState (the library's own step), and a jitted eval call."""
    tx = OPTIMIZER()
    state = TrainState.create(model, tx, jax.random.key(0), x[:1])
    # train_step donates its state: give it copies, the caller's arrays are used again.
    params_copy, stats_copy = jax.tree.map(jnp.copy, (params, batch_stats))
    state = state.replace(
        params=params_copy, batch_stats=stats_copy, opt_state=tx.init(params_copy)
    )
    start = time.perf_counter()
    state, metrics = train_step(state, (x, labels))
    loss = float(metrics["loss"])
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run_train():
        holder["state"], metrics = train_step(holder["state"], (x, labels))
        return float(metrics["loss"])

    variables = {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}
    evaluate = jax.jit(lambda v, x: model.apply(v, x, train=False))

    def run_eval():
        jax.block_until_ready(evaluate(variables, x))

    run_eval()
    return run_train, run_eval, compile_s, loss


def flax_train_step(model, tx, has_bn):
    """The twin's training step ``(state, x, labels) -> (state, loss)``, not jitted:
    ``state = (params, batch_stats, opt_state)``, optax's cross-entropy, no metrics."""

    def loss_fn(params, batch_stats, x, labels):
        variables = {"params": params, **({"batch_stats": batch_stats} if has_bn else {})}
        if has_bn:
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
            new_stats = updates["batch_stats"]
        else:
            logits, new_stats = model.apply(variables, x), batch_stats
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, new_stats

    def step(state, x, labels):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, labels
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    return step


def flax_steps(model, params, batch_stats, x, labels):
    """The twin's jitted train step (same optimizer, optax's loss), eval step, compile s."""
    tx = OPTIMIZER()
    opt_state = tx.init(params)
    has_bn = bool(batch_stats)
    step = jax.jit(flax_train_step(model, tx, has_bn))

    @jax.jit
    def eval_step(params, batch_stats, x):
        variables = {"params": params, **({"batch_stats": batch_stats} if has_bn else {})}
        return model.apply(variables, x, train=False)

    state = (params, batch_stats, opt_state)
    start = time.perf_counter()
    state, loss = step(state, x, labels)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run_train():
        holder["state"], loss = step(holder["state"], x, labels)
        return float(loss)

    def run_eval():
        jax.block_until_ready(eval_step(params, batch_stats, x))

    run_eval()
    return run_train, run_eval, compile_s, float(loss)


def torch_steps(module, x, labels, device):
    module.to(device)
    x, labels = x.to(device), labels.to(device)
    opt = torch.optim.SGD(
        [p for p in module.parameters() if p.requires_grad], lr=0.01, momentum=0.9, nesterov=True
    )

    def run_train():
        module.train()
        opt.zero_grad(set_to_none=True)
        loss = TF.cross_entropy(module(x), labels)
        loss.backward()
        opt.step()
        return loss.item()

    def run_eval():
        module.eval()
        with torch.no_grad():
            module(x)
        synchronize(device)

    start = time.perf_counter()
    loss = run_train()
    compile_s = time.perf_counter() - start
    run_eval()
    return run_train, run_eval, compile_s, loss


def interleaved(runners, rounds, steps, min_block=0.0):
    """Median seconds per call of each runner, and its spread, timing them round-robin.

    The order rotates from round to round: a runner timed right after PyTorch shares the cores
    with its OpenMP threads while they still spin, and no side should always be that one. With
    ``min_block`` (seconds), a runner faster than that makes as many calls per round as fill it
    (one call timed first to know): sub-millisecond calls would otherwise be timed mostly in the
    previous runner's wake.
    """
    calls = dict.fromkeys(runners, steps)
    if min_block > 0:
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            calls[name] = max(steps, math.ceil(min_block / (time.perf_counter() - start)))
    times = {name: [] for name in runners}
    names = list(runners)
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            fn = runners[name]
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            times[name].append((time.perf_counter() - start) / calls[name])
    return {name: (statistics.median(ts), max(ts) / min(ts) - 1) for name, ts in times.items()}


# ----------------------------------------------------------------------------- flops


def conv_flops(model, x):
    """Forward multiply-add FLOPs (x2) of every conv and dense layer, from the jaxpr."""
    params = model.init(jax.random.key(0), x)
    jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(params, x)
    total = 0

    def visit(jaxpr):
        nonlocal total
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                out = eqn.outvars[0].aval.shape
                w = eqn.invars[1].aval.shape
                total += 2 * np.prod(out) * np.prod(w[:-1])
            elif eqn.primitive.name == "dot_general":
                lhs, out = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
                (contract, _), _ = eqn.params["dimension_numbers"]
                total += 2 * np.prod(out) * np.prod([lhs[d] for d in contract])
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if hasattr(sub, "eqns"):
                        visit(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        visit(sub.jaxpr)

    visit(jaxpr.jaxpr)
    return int(total)


def matmul_runners(device, size=2048):
    """One fp32 ``size``-square matrix product in XLA and in torch, and its FLOP count."""
    a_np = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    a, ta = jnp.asarray(a_np), torch.from_numpy(a_np).to(device)
    f = jax.jit(lambda a: a @ a)

    def torch_matmul():
        torch.mm(ta, ta)
        synchronize(device)

    runners = {"xla matmul": lambda: jax.block_until_ready(f(a)), "torch matmul": torch_matmul}
    for fn in runners.values():
        fn()
    return runners, 2 * size**3


# ----------------------------------------------------------------------------- benchmarks


def network_rows(
    name, jcnn_model, flax_model, torch_module, input_shape, batch, rounds, steps, matmul, device
):
    """Train and inference rows of one network: jcnn, its Flax twin and its torch twin."""
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((batch, *input_shape)).astype(np.float32)
    labels_np = rng.integers(0, 10, batch)
    x, labels = jnp.asarray(x_np), jnp.asarray(labels_np, jnp.int32)
    variables = jcnn_model.init(jax.random.key(0), x, train=False)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    twin_shapes = jax.eval_shape(flax_model.init, jax.random.key(0), x)
    assert jax.tree.map(np.shape, twin_shapes) == jax.tree.map(np.shape, dict(variables)), (
        f"{name}: the Flax twin's variables differ from jcnn's"
    )
    load_into_torch(torch_module, params)
    counts = (count_params(params), count_params(twin_shapes["params"]))
    counts += (count_torch_params(torch_module),)
    assert len(set(counts)) == 1, f"{name}: parameter counts jcnn/flax/torch {counts}"
    train, infer, compile_s, losses = {}, {}, {}, {}
    train["jcnn"], infer["jcnn"], compile_s["jcnn"], losses["jcnn"] = jcnn_steps(
        jcnn_model, params, batch_stats, x, labels
    )
    train["flax"], infer["flax"], compile_s["flax"], losses["flax"] = flax_steps(
        flax_model, params, batch_stats, x, labels
    )
    x_torch = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    labels_torch = torch.from_numpy(labels_np)
    train["torch"], infer["torch"], compile_s["torch"], losses["torch"] = torch_steps(
        torch_module, x_torch, labels_torch, device
    )
    scale = TOLERANCE_SCALE * max(1, abs(losses["flax"]))
    assert abs(losses["jcnn"] - losses["flax"]) < 1e-4 * scale, losses
    assert abs(losses["torch"] - losses["flax"]) < 1e-3 * scale, losses
    for runner in train.values():  # warm-up
        runner()
    flops = conv_flops(flax_model, x)
    rows = []
    matmul_fns, matmul_flops = matmul
    for kind, runners, flop_factor in (("train", train, 3), ("infer", infer, 1)):
        # The matmul peak is re-measured inside the same rounds: the machine's load changes.
        # An inference call is ~3x shorter than a step: 4x the calls keep a round long enough.
        calls = steps if kind == "train" else 4 * steps
        result = interleaved({**runners, **matmul_fns}, rounds, calls)
        peak = matmul_flops / result.pop("xla matmul")[0] / 1e9
        torch_peak = matmul_flops / result.pop("torch matmul")[0] / 1e9
        rows.append(
            row(
                f"{name} {kind} b{batch}",
                batch,
                counts[0],
                result,
                compile_s if kind == "train" else None,
                flop_factor * flops,
                peak,
                torch_peak,
            )
        )
    return rows


def steps_per_call_row(name, model, torch_module, input_shape, batch, per_call, rounds, device):
    """ms per step of ``train_steps`` (``per_call`` steps in one call), of as many calls of
    ``train_step`` and of as many PyTorch steps, interleaved; both jcnn sides start from the same
    state and must agree on the parameters after one call's worth of steps."""
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((batch, *input_shape)).astype(np.float32)
    labels_np = rng.integers(0, 10, batch)
    x, labels = jnp.asarray(x_np), jnp.asarray(labels_np, jnp.int32)
    stacked = (jnp.stack([x] * per_call), jnp.stack([labels] * per_call))
    start = TrainState.create(model, OPTIMIZER(), jax.random.key(0), x[:1])
    load_into_torch(torch_module, start.params)
    holder = {"one": jax.tree.map(jnp.copy, start), "many": jax.tree.map(jnp.copy, start)}

    def one_at_a_time():
        for _ in range(per_call):
            holder["one"], metrics = train_step(holder["one"], (x, labels))
        return float(metrics["loss"])

    def all_in_one_call():
        holder["many"], metrics = train_steps(holder["many"], stacked)
        return float(metrics["loss"][-1])

    run_torch = torch_steps(
        torch_module,
        torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(labels_np),
        device,
    )[0]

    def torch_calls():
        for _ in range(per_call):
            run_torch()

    one_at_a_time()
    all_in_one_call()
    pairs = zip(
        jax.tree.leaves(holder["one"].params), jax.tree.leaves(holder["many"].params), strict=True
    )
    for a, b in pairs:
        np.testing.assert_allclose(
            a,
            b,
            rtol=1e-4 * TOLERANCE_SCALE,
            atol=1e-5 * TOLERANCE_SCALE,
            err_msg=f"{name}: train_steps",
        )
    runners = {"train_step": one_at_a_time, "train_steps": all_in_one_call, "torch": torch_calls}
    result = interleaved(runners, rounds, 1)
    ms = {side: 1e3 * median / per_call for side, (median, _) in result.items()}
    return {
        "benchmark": f"{name} train b{batch}, {per_call} steps per call",
        "train_step ms/step": f"{ms['train_step']:.1f}",
        "train_steps ms/step": f"{ms['train_steps']:.1f}",
        "torch ms/step": f"{ms['torch']:.1f}",
        "train_steps/train_step": f"{ms['train_step'] / ms['train_steps']:.2f}x",
        "train_step/torch": f"{ms['torch'] / ms['train_step']:.2f}x",
        "train_steps/torch": f"{ms['torch'] / ms['train_steps']:.2f}x",
        "spread s/S/t": "/".join(f"{100 * result[i][1]:.0f}%" for i in result),
    }


def row(label, batch, n_params, result, compile_s, flops, peak, torch_peak):
    speed = {impl: batch / t for impl, (t, _) in result.items()}
    cells = {
        "benchmark": label,
        "params": f"{n_params:,}",
        "jcnn img/s": f"{speed['jcnn']:.0f}",
        "flax img/s": f"{speed['flax']:.0f}",
        "torch img/s": f"{speed['torch']:.0f}",
        "jcnn/torch": f"{speed['jcnn'] / speed['torch']:.2f}x",
        "jcnn/flax": f"{speed['jcnn'] / speed['flax']:.2f}x",
        "flax/torch": f"{speed['flax'] / speed['torch']:.2f}x",
        "GFLOP/s j/f/t": "/".join(f"{flops / result[i][0] / 1e9:.0f}" for i in result),
        "matmul GFLOP/s xla/torch": f"{peak:.0f}/{torch_peak:.0f}",
        "jcnn % xla peak": f"{100 * flops / result['jcnn'][0] / 1e9 / peak:.0f}%",
        "compile s j/f": (f"{compile_s['jcnn']:.1f}/{compile_s['flax']:.1f}" if compile_s else "-"),
        "spread j/f/t": "/".join(f"{100 * result[i][1]:.0f}%" for i in result),
    }
    return cells


def per_example_rows(batch, rounds, steps, device):
    """LeNet-5 per-example gradients: vmap(grad) against the batch gradient and torch.func."""
    rng = np.random.default_rng(1)
    x_np = rng.standard_normal((batch, 28, 28, 1)).astype(np.float32)
    labels_np = rng.integers(0, 10, batch)
    x, labels = jnp.asarray(x_np), jnp.asarray(labels_np, jnp.int32)
    jcnn_model = jcnn.models.LeNet5()
    params = jcnn_model.init(jax.random.key(0), x)["params"]
    runners = {}
    for impl, model in (("jcnn", jcnn_model), ("flax", FlaxLeNet5())):

        def loss(params, batch, model=model, impl=impl):
            images, labels = batch
            logits = model.apply({"params": params}, images)
            if impl == "jcnn":
                return F.cross_entropy(logits, labels)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        if impl == "jcnn":
            per_example = jax.jit(partial(per_example_grads, loss))
        else:
            per_example = jax.jit(
                jax.vmap(
                    lambda p, x, y, loss=loss: jax.grad(loss)(p, (x[None], y[None])), (None, 0, 0)
                )
            )
            per_example = partial(lambda f, p, batch: f(p, *batch), per_example)
        batch_grad = jax.jit(jax.grad(loss))
        per = per_example(params, (x, labels))
        whole = batch_grad(params, (x, labels))
        np.testing.assert_allclose(
            np.asarray(per["conv1"]["kernel"].mean(0)),
            np.asarray(whole["conv1"]["kernel"]),
            atol=1e-5 * TOLERANCE_SCALE,
        )
        runners[f"{impl} vmap"] = partial(
            lambda f: jax.block_until_ready(f(params, (x, labels))), per_example
        )
        runners[f"{impl} batch"] = partial(
            lambda f: jax.block_until_ready(f(params, (x, labels))), batch_grad
        )
    module = TorchLeNet5()
    load_into_torch(module, params)
    module.to(device)
    torch_params = {k: v.detach() for k, v in module.named_parameters()}
    x_torch = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(device)
    labels_torch = torch.from_numpy(labels_np).to(device)

    def torch_loss(p, x, y):
        logits = torch.func.functional_call(module, p, (x[None],))
        return TF.cross_entropy(logits, y[None])

    torch_per_example = torch.func.vmap(torch.func.grad(torch_loss), in_dims=(None, 0, 0))
    torch_grads = torch_per_example(torch_params, x_torch, labels_torch)
    np.testing.assert_allclose(
        torch_grads["conv1.weight"].cpu().numpy().transpose(0, 3, 4, 2, 1),
        np.asarray(per_example(params, (x, labels))["conv1"]["kernel"]),
        atol=1e-4 * TOLERANCE_SCALE,
    )

    def torch_vmap():
        torch_per_example(torch_params, x_torch, labels_torch)
        synchronize(device)

    runners["torch vmap"] = torch_vmap
    for fn in runners.values():
        fn()
    result = interleaved(runners, rounds, steps)
    t = {name: value[0] for name, value in result.items()}
    return {
        "benchmark": f"LeNet-5 per-example grads b{batch} ({count_params(params):,} params)",
        "jcnn vmap ms": f"{1e3 * t['jcnn vmap']:.1f}",
        "flax vmap ms": f"{1e3 * t['flax vmap']:.1f}",
        "torch.func ms": f"{1e3 * t['torch vmap']:.1f}",
        "jcnn batch ms": f"{1e3 * t['jcnn batch']:.1f}",
        "jcnn vmap/batch": f"{t['jcnn vmap'] / t['jcnn batch']:.2f}x",
        "flax vmap/batch": f"{t['flax vmap'] / t['flax batch']:.2f}x",
        "jcnn speed vs torch.func": f"{t['torch vmap'] / t['jcnn vmap']:.2f}x",
        "flax speed vs torch.func": f"{t['torch vmap'] / t['flax vmap']:.2f}x",
        "spread": "/".join(f"{100 * v[1]:.0f}%" for v in result.values()),
    }


class Layer(NamedTuple):
    """One convolution layer of the per-layer table: input ``(N, *spatial, C_in)``, a square
    window, and the options of ``F.conv`` (``transposed``: ``F.conv_transpose``)."""

    name: str
    x_shape: tuple[int, ...]
    window: int
    out_channels: int
    stride: int = 1
    padding: int = 0
    groups: int = 1
    transposed: bool = False
    output_padding: int = 0

    def kernel_shape(self) -> tuple[int, ...]:
        window = (self.window,) * (len(self.x_shape) - 2)
        c_in = self.x_shape[-1]
        if self.transposed:
            return (*window, c_in, self.out_channels // self.groups)
        return (*window, c_in // self.groups, self.out_channels)


LAYERS = [
    Layer("LeNet conv1 (5x5, 1->20)", (128, 28, 28, 1), 5, 20, padding=2),
    Layer("LeNet conv2 (5x5, 20->50)", (128, 14, 14, 20), 5, 50, padding=2),
    Layer("Airbench whiten (2x2, 3->24)", (256, 32, 32, 3), 2, 24),
    Layer("Airbench g1.conv1 (24->64, 31x31)", (256, 31, 31, 24), 3, 64, padding=1),
    Layer("Airbench g1.conv2 (64->64, 15x15)", (256, 15, 15, 64), 3, 64, padding=1),
    Layer("Airbench g2.conv1 (64->256, 15x15)", (256, 15, 15, 64), 3, 256, padding=1),
    Layer("Airbench g2.conv2 (256->256, 7x7)", (256, 7, 7, 256), 3, 256, padding=1),
    Layer("Airbench g3.conv2 (256->256, 3x3)", (256, 3, 3, 256), 3, 256, padding=1),
    Layer("ResNet-20 conv1 (3->16, 32x32)", (256, 32, 32, 3), 3, 16, padding=1),
    Layer("ResNet-20 layer1 (16->16, 32x32)", (256, 32, 32, 16), 3, 16, padding=1),
    Layer("ResNet-20 layer3 (64->64, 8x8)", (256, 8, 8, 64), 3, 64, padding=1),
    # Wide layers on small images (run AD): CIFAR-stem ResNet-18's last stage, VGG-11's last block
    Layer("ResNet-18 CIFAR layer4 (512->512, 4x4)", (128, 4, 4, 512), 3, 512, padding=1),
    Layer("VGG-11 CIFAR conv8 (512->512, 2x2)", (128, 2, 2, 512), 3, 512, padding=1),
]
# Issue 16's layers: its four cases and the modern networks' (modern.py's batch sizes).
MODERN_LAYERS = [
    Layer("depthwise 3x3, 128 ch, 56x56 (case)", (32, 56, 56, 128), 3, 128, 1, 1, 128),
    Layer("MobileNetV2 depthwise 3x3/2, 144 ch, 56x56", (32, 56, 56, 144), 3, 144, 2, 1, 144),
    Layer("MobileNetV2-CIFAR depthwise 3x3, 96 ch, 32x32", (32, 32, 32, 96), 3, 96, 1, 1, 96),
    Layer("MobileNetV2-CIFAR depthwise 3x3, 288 ch, 8x8", (32, 8, 8, 288), 3, 288, 1, 1, 288),
    Layer("depthwise 7x7, 256 ch, 28x28 (case)", (32, 28, 28, 256), 7, 256, 1, 3, 256),
    Layer("ConvNeXt-CIFAR depthwise 7x7, 32 ch, 16x16", (32, 16, 16, 32), 7, 32, 1, 3, 32),
    Layer("ConvNeXt-CIFAR depthwise 7x7, 128 ch, 4x4", (32, 4, 4, 128), 7, 128, 1, 3, 128),
    Layer("grouped 3x3, 128->128, 8 groups, 28x28", (32, 28, 28, 128), 3, 128, 1, 1, 8),
    Layer("transposed 1-D 4/2, 64->32, length 256", (32, 256, 64), 4, 32, 2, 1, transposed=True),
    Layer(
        "transposed 2-D 4x4/2, 64->32, 16x16 (case)",
        (32, 16, 16, 64),
        4,
        32,
        2,
        1,
        transposed=True,
        output_padding=1,
    ),
    Layer("U-Net up-conv 2x2/2, 128->64, 8x8", (8, 8, 8, 128), 2, 64, 2, transposed=True),
    Layer("U-Net up-conv 2x2/2, 32->16, 32x32", (8, 32, 32, 32), 2, 16, 2, transposed=True),
    Layer(
        "transposed 3-D 3x3x3/2, 32->16, 8^3 (case)",
        (4, 8, 8, 8, 32),
        3,
        16,
        2,
        1,
        transposed=True,
        output_padding=1,
    ),
    Layer("SmallC3D conv1 3x3x3, 3->32, 8x32x32", (8, 8, 32, 32, 3), 3, 32, padding=1),
    Layer("SmallC3D conv2 3x3x3, 32->64, 8x16x16", (8, 8, 16, 16, 32), 3, 64, padding=1),
]


def jcnn_conv(layer):
    """``F.conv`` / ``F.conv_transpose`` with the layer's options."""
    if layer.transposed:
        return partial(
            F.conv_transpose,
            stride=layer.stride,
            padding=layer.padding,
            output_padding=layer.output_padding,
            groups=layer.groups,
        )
    return partial(F.conv, stride=layer.stride, padding=layer.padding, groups=layer.groups)


def native_conv(layer):
    """The layer on XLA's own convolution, ``lax.conv_general_dilated`` (a transposed one as the
    input-dilated convolution of the flipped kernel, as ``jax.lax.conv_transpose`` writes it)."""
    rank = len(layer.x_shape) - 2
    spec = "N" + "DHW"[3 - rank :] + "C"
    numbers = (spec, spec[1:-1] + "IO", spec)
    if not layer.transposed:
        return partial(
            lax.conv_general_dilated,
            window_strides=(layer.stride,) * rank,
            padding=((layer.padding, layer.padding),) * rank,
            dimension_numbers=numbers,
            feature_group_count=layer.groups,
        )
    low = layer.window - 1 - layer.padding

    def transposed(x, w):
        # (*window, C_in, C_out // groups) -> (*window, C_in // groups, C_out), group-major outputs
        *window, c_in, c_out = w.shape
        per_group = w.reshape(*window, layer.groups, c_in // layer.groups, c_out)
        kernel = jnp.moveaxis(per_group, rank, rank + 1).reshape(*window, -1, layer.groups * c_out)
        return lax.conv_general_dilated(
            x,
            jnp.flip(kernel, tuple(range(rank))),
            (1,) * rank,
            ((low, low + layer.output_padding),) * rank,
            lhs_dilation=(layer.stride,) * rank,
            dimension_numbers=numbers,
            feature_group_count=layer.groups,
        )

    return transposed


def torch_kernel_axes(layer):
    """jcnn's kernel axes in PyTorch's order: ``(*window, I, O)`` -> ``(O, I, *window)``;
    transposed ``(*window, C_in, C_out // groups)`` -> ``(C_in, C_out // groups, *window)``."""
    rank = len(layer.x_shape) - 2
    channels = (rank, rank + 1) if layer.transposed else (rank + 1, rank)
    return (*channels, *range(rank))


def torch_conv_products(layer, x, w, g):
    """PyTorch's forward, input gradient and weight gradient of one layer (channels-first,
    eager), as ``aten.convolution`` and ``aten.convolution_backward`` run them."""
    rank = x.ndim - 2
    xt = torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())
    gt = torch.from_numpy(np.moveaxis(np.asarray(g), -1, 1).copy())
    wt = torch.from_numpy(np.asarray(w).transpose(torch_kernel_axes(layer)).copy())
    options = (
        [layer.stride] * rank,
        [layer.padding] * rank,
        [1] * rank,
        layer.transposed,
        [layer.output_padding] * rank,
        layer.groups,
    )

    def backward(mask):
        return torch.ops.aten.convolution_backward(gt, xt, wt, None, *options, mask)

    return {
        "fwd": lambda: torch.ops.aten.convolution(xt, wt, None, *options),
        "dx": partial(backward, [True, False, False]),
        "dw": partial(backward, [False, True, False]),
    }


def conv_layer_flops(layer, y_shape):
    """2 x the multiply-adds of one product: every output of the convolution (for a transposed
    one, of the convolution it transposes: its input) sums window x channels-per-group terms."""
    window = layer.window ** (len(layer.x_shape) - 2)
    if layer.transposed:
        return 2 * math.prod(layer.x_shape) * window * (layer.out_channels // layer.groups)
    return 2 * math.prod(y_shape) * window * (layer.x_shape[-1] // layer.groups)


def layer_rows(rounds, steps, layers=LAYERS, batch=None, min_block=0.05):
    """GFLOP/s of each product of each conv layer: XLA's native convolution, ``F.conv`` on jcnn's
    XLA formulations, ``F.conv`` on the oneDNN backend (when built; its per-shape rules
    included) and PyTorch, and the last two's ratio. ``batch`` overrides the layers' batch
    sizes (smoke runs); ``min_block``: see :func:`interleaved`. Before timing, every side's
    three products are checked against PyTorch's."""
    from jcnn import native

    backends = ["xla", *(["onednn"] if native.available() else [])]
    rows = []
    for layer in layers:
        if batch is not None:
            layer = layer._replace(x_shape=(batch, *layer.x_shape[1:]))
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal(layer.x_shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal(layer.kernel_shape()), jnp.float32)
        g_shape = jax.eval_shape(jcnn_conv(layer), x, w).shape
        g = jnp.asarray(rng.standard_normal(g_shape), jnp.float32)
        torch_products = torch_conv_products(layer, x, w, g)
        expected = {
            "fwd": torch_products["fwd"]().numpy(),
            "dx": torch_products["dx"]()[0].numpy(),
            "dw": torch_products["dw"]()[1].numpy(),
        }
        expected["fwd"] = np.moveaxis(expected["fwd"], 1, -1)
        expected["dx"] = np.moveaxis(expected["dx"], 1, -1)
        expected["dw"] = expected["dw"].transpose(np.argsort(torch_kernel_axes(layer)))
        convs = {"xla": native_conv(layer)}
        for backend in backends:
            convs[f"jcnn-{backend}" if backend == "xla" else backend] = (backend, jcnn_conv(layer))
        runners = {}
        for impl, conv in convs.items():
            backend, conv = conv if isinstance(conv, tuple) else (None, conv)
            fns = {
                "fwd": conv,
                "dx": lambda x, w, g, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
                "dw": lambda x, w, g, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](g)[0],
            }
            for product, fn in fns.items():
                args = (x, w) if product == "fwd" else (x, w, g)
                with native.conv_backend_scope(backend):
                    compiled = jax.jit(fn).lower(*args).compile()
                scale = np.abs(expected[product]).max()
                np.testing.assert_allclose(
                    compiled(*args),
                    expected[product],
                    rtol=1e-4,
                    atol=1e-4 * scale,
                    err_msg=f"{layer.name}: {impl} {product} differs from PyTorch's",
                )
                runners[f"{impl} {product}"] = partial(
                    lambda fn, args: jax.block_until_ready(fn(*args)), compiled, args
                )
        for product, fn in torch_products.items():
            runners[f"torch {product}"] = fn
        result = interleaved(runners, rounds, steps, min_block)
        impls = [*convs, "torch"]
        flops = conv_layer_flops(layer, g_shape)
        cells = {"layer": f"{layer.name}, batch {layer.x_shape[0]}", "GFLOP": f"{flops / 1e9:.3g}"}
        for product in ("fwd", "dx", "dw"):
            cells[f"{product} GFLOP/s {'/'.join(impls)}"] = "/".join(
                f"{flops / result[f'{impl} {product}'][0] / 1e9:.3g}" for impl in impls
            )
        jcnn_impl = impls[-2]
        cells[f"{jcnn_impl} vs torch fwd/dx/dw"] = "/".join(
            f"{result[f'torch {p}'][0] / result[f'{jcnn_impl} {p}'][0]:.2f}x"
            for p in ("fwd", "dx", "dw")
        )
        rows.append(cells)
        print(markdown(rows[-1:]), flush=True)
    return rows


def torch_device(text):
    """``--torch-device``: a device this PyTorch build can allocate on, checked while parsing,
    before any work (a bad one failed with a raw traceback once PyTorch first ran)."""
    try:
        device = torch.device(text)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as error:
        raise argparse.ArgumentTypeError(
            f"expected a device this PyTorch build can use (cpu, cuda, ...), got {text!r}: {error}"
        ) from None
    return device


def markdown(rows):
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny batches, one round: smoke run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--steps", type=int, default=3, help="calls per round and implementation")
    parser.add_argument(
        "--only",
        choices=["lenet", "airbench", "resnet20", "per-example", "layers", "steps-per-call"],
        nargs="+",
        help="sections to run (default: all but layers, the per-layer conv GFLOP/s, and "
        "steps-per-call, train_steps against train_step)",
    )
    parser.add_argument(
        "--per-call", type=int, default=4, help="steps per train_steps call (steps-per-call)"
    )
    parser.add_argument(
        "--torch-device",
        type=torch_device,
        default="cpu",
        help="where PyTorch runs, e.g. cuda (JAX runs on its default backend, printed first)",
    )
    parser.add_argument(
        "--scale", type=int, default=1, help="multiplies every batch size (a GPU wants larger)"
    )
    args = parser.parse_args(argv)
    for name in ("rounds", "steps", "per_call", "scale"):
        if getattr(args, name) < 1:
            flag = "--" + name.replace("_", "-")
            parser.error(f"{flag}: expected an int >= 1, got {getattr(args, name)}")
    rounds, steps = (1, 1) if args.quick else (args.rounds, args.steps)
    only = set(args.only or ["lenet", "airbench", "resnet20", "per-example"])
    batches = (8, 8, 4) if args.quick else (128, 256, 64)
    lenet_batch, cifar_batch, pe_batch = (args.scale * batch for batch in batches)
    device = args.torch_device

    matmul = matmul_runners(device, 256 if args.quick else 2048)
    print(
        f"# jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__} "
        f"on {args.torch_device} ({torch.get_num_threads()} CPU threads), "
        f"jcnn conv backend on CPU: {jcnn.native.conv_backend()}, "
        f"freed host memory: {jcnn.native.host_memory()}"
        + (", QUICK MODE (smoke run: not a measurement)" if args.quick else "")
    )
    rows = []
    networks = {  # section: (name, jcnn model, Flax twin, torch twin, input, batch, steps)
        "lenet": (
            "LeNet-5",
            jcnn.models.LeNet5(),
            FlaxLeNet5(),
            TorchLeNet5,
            (28, 28, 1),
            lenet_batch,
            steps,
        ),
        "airbench": (
            "AirbenchNet",
            jcnn.models.AirbenchNet(),
            FlaxAirbenchNet(),
            TorchAirbenchNet,
            (32, 32, 3),
            cifar_batch,
            max(1, steps // 2),
        ),
        "resnet20": (
            "ResNet-20",
            jcnn.models.resnet20(),
            FlaxResNet20(),
            TorchResNet20,
            (32, 32, 3),
            cifar_batch,
            steps,
        ),
    }
    for section, (name, model, twin, make_torch, shape, batch, n_steps) in networks.items():
        if section in only:
            rows += network_rows(
                name, model, twin, make_torch(), shape, batch, rounds, n_steps, matmul, device
            )
            print(markdown(rows[-2:]), flush=True)
    if rows:
        print()
        print(markdown(rows))
    if "per-example" in only:
        print()
        print(markdown([per_example_rows(pe_batch, rounds, steps, device)]))
    if "layers" in only:
        print()
        print(
            markdown(layer_rows(rounds, steps, LAYERS + MODERN_LAYERS, 2 if args.quick else None))
        )
    if "steps-per-call" in only:
        per_call_rows = []
        for name, model, _, make_torch, shape, batch, _ in networks.values():
            per_call_rows.append(
                steps_per_call_row(
                    name, model, make_torch(), shape, batch, args.per_call, rounds, device
                )
            )
            print(markdown(per_call_rows[-1:]), flush=True)
        print()
        print(markdown(per_call_rows))


if __name__ == "__main__":
    main()
