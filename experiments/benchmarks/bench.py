"""CPU speed of jcnn against a hand-written Flax Linen twin and the same network in PyTorch.

One command, one table (see README.md next to this file):

    /work/venv/bin/python experiments/benchmarks/bench.py            # full run
    /work/venv/bin/python experiments/benchmarks/bench.py --quick    # smoke run, seconds

Every row is measured in the same process, the implementations interleaved round by round after
warm-up; a cell is the median over rounds, and the spread (max/min - 1 over rounds) is printed
so the noise of a shared machine is visible. Columns:

* ``jcnn``: the Flax twin with every convolution through ``jcnn.functional._conv_cpu.conv_general``
  (the custom-VJP CPU convolution behind ``F.conv``); same parameters, same everything else.
* ``flax``: the hand-written Flax Linen twin (``flax.linen.Conv``, i.e. XLA's native convolution).
* ``torch``: the same network in PyTorch CPU (eager), same initial weights.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as TF
from jax import lax

from jcnn.functional._conv_cpu import conv_general

# ----------------------------------------------------------------------------- JAX models


class JcnnConv(nn.Module):
    """``flax.linen.Conv``'s parameters and semantics, computed by jcnn's CPU convolution."""

    features: int
    kernel_size: tuple[int, int]
    padding: int = 0
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel",
            nn.initializers.lecun_normal(),
            (*self.kernel_size, x.shape[-1], self.features),
        )
        pads = ((self.padding, self.padding),) * 2
        y = conv_general(x, kernel, (1, 1), pads, (1, 1), 1)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


def make_conv(impl, features, kernel, padding=0, use_bias=True, name=None):
    if impl == "jcnn":
        return JcnnConv(features, (kernel, kernel), padding, use_bias, name=name)
    return nn.Conv(
        features, (kernel, kernel), padding=((padding, padding),) * 2, use_bias=use_bias, name=name
    )


class LeNet5(nn.Module):
    """LeNet-5 on 28x28 MNIST: conv5(6, pad 2)-relu-maxpool2, conv5(16)-relu-maxpool2, 120-84-10."""

    impl: str = "flax"

    @nn.compact
    def __call__(self, x, train=True):
        x = nn.relu(make_conv(self.impl, 6, 5, padding=2, name="c1")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.relu(make_conv(self.impl, 16, 5, name="c3")(x))
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(120, name="f5")(x))
        x = nn.relu(nn.Dense(84, name="f6")(x))
        return nn.Dense(10, name="f7")(x)


class ConvGroup(nn.Module):
    impl: str
    width: int

    @nn.compact
    def __call__(self, x, train):
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.6, epsilon=1e-12)
        x = make_conv(self.impl, self.width, 3, padding=1, use_bias=False, name="conv1")(x)
        x = nn.max_pool(x, (2, 2), (2, 2))
        x = nn.gelu(norm(name="norm1")(x))
        x = make_conv(self.impl, self.width, 3, padding=1, use_bias=False, name="conv2")(x)
        return nn.gelu(norm(name="norm2")(x))


class AirbenchNet(nn.Module):
    """airbench94's CIFAR-10 network: 2x2 whitening conv, three conv groups (64/256/256)."""

    impl: str = "flax"
    widths: tuple[int, int, int] = (64, 256, 256)

    @nn.compact
    def __call__(self, x, train=True):
        x = nn.gelu(make_conv(self.impl, 24, 2, name="whiten")(x))
        for i, width in enumerate(self.widths):
            x = ConvGroup(self.impl, width, name=f"group{i}")(x, train)
        x = nn.max_pool(x, (3, 3), (3, 3))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(10, use_bias=False, name="head")(x) / 9.0


# ----------------------------------------------------------------------------- torch twins


class TorchLeNet5(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 6, 5, padding=2)
        self.c3 = torch.nn.Conv2d(6, 16, 5)
        self.f5 = torch.nn.Linear(400, 120)
        self.f6 = torch.nn.Linear(120, 84)
        self.f7 = torch.nn.Linear(84, 10)

    def forward(self, x):
        x = TF.max_pool2d(TF.relu(self.c1(x)), 2)
        x = TF.max_pool2d(TF.relu(self.c3(x)), 2)
        x = x.permute(0, 2, 3, 1).flatten(1)  # NHWC flattening order, as in the JAX twin
        return self.f7(TF.relu(self.f6(TF.relu(self.f5(x)))))


class TorchConvGroup(torch.nn.Module):
    def __init__(self, c_in, width):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c_in, width, 3, padding=1, bias=False)
        self.norm1 = torch.nn.BatchNorm2d(width, momentum=0.4, eps=1e-12)
        self.conv2 = torch.nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm2 = torch.nn.BatchNorm2d(width, momentum=0.4, eps=1e-12)

    def forward(self, x):
        x = TF.gelu(self.norm1(TF.max_pool2d(self.conv1(x), 2)), approximate="tanh")
        return TF.gelu(self.norm2(self.conv2(x)), approximate="tanh")


class TorchAirbenchNet(torch.nn.Module):
    def __init__(self, widths=(64, 256, 256)):
        super().__init__()
        self.whiten = torch.nn.Conv2d(3, 24, 2)
        groups, c_in = [], 24
        for width in widths:
            groups.append(TorchConvGroup(c_in, width))
            c_in = width
        self.groups = torch.nn.Sequential(*groups)
        self.head = torch.nn.Linear(widths[-1], 10, bias=False)

    def forward(self, x):
        x = TF.gelu(self.whiten(x), approximate="tanh")
        x = TF.max_pool2d(self.groups(x), 3)
        return self.head(x.flatten(1)) / 9.0


def load_into_torch(module, params):
    """Copy the JAX twin's parameters into the torch twin (HWIO -> OIHW, (in, out) -> (out, in))."""
    flat = {
        "/".join(k.key for k in path): np.asarray(v)
        for path, v in jax.tree_util.tree_flatten_with_path(params)[0]
    }
    state = {}
    for key, value in flat.items():
        name = key.replace("/", ".").replace("group", "groups.")
        name = name.replace(".kernel", ".weight").replace(".scale", ".weight")
        if value.ndim == 4:
            value = value.transpose(3, 2, 0, 1)
        elif value.ndim == 2:
            value = value.T
        state[name] = torch.from_numpy(np.ascontiguousarray(value))
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected and all("running" in m or "num_batches" in m for m in missing), (
        missing,
        unexpected,
    )


# ----------------------------------------------------------------------------- steps


def jax_steps(model, params, batch_stats, x, labels, lr=0.01):
    """Jitted train step, eval step and their first-call compile time."""
    tx = optax.sgd(lr, momentum=0.9, nesterov=True)
    opt_state = tx.init(params)
    has_bn = bool(batch_stats)

    def loss_fn(params, batch_stats, x, labels):
        variables = {"params": params, **({"batch_stats": batch_stats} if has_bn else {})}
        if has_bn:
            logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
            new_stats = updates["batch_stats"]
        else:
            logits, new_stats = model.apply(variables, x), batch_stats
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, new_stats

    @jax.jit
    def train_step(state, x, labels):
        params, batch_stats, opt_state = state
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, labels
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), batch_stats, opt_state), loss

    @jax.jit
    def eval_step(params, batch_stats, x):
        variables = {"params": params, **({"batch_stats": batch_stats} if has_bn else {})}
        return model.apply(variables, x, train=False) if has_bn else model.apply(variables, x)

    state = (params, batch_stats, opt_state)
    start = time.perf_counter()
    state, loss = train_step(state, x, labels)
    jax.block_until_ready(loss)
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run_train():
        holder["state"], loss = train_step(holder["state"], x, labels)
        jax.block_until_ready(loss)
        return float(loss)

    def run_eval():
        jax.block_until_ready(eval_step(params, batch_stats, x))

    run_eval()
    return run_train, run_eval, compile_s, float(loss)


def torch_steps(module, x, labels, lr=0.01):
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9, nesterov=True)

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

    start = time.perf_counter()
    loss = run_train()
    compile_s = time.perf_counter() - start
    run_eval()
    return run_train, run_eval, compile_s, loss


def interleaved(runners, rounds, steps):
    """Median seconds per call of each runner, and its spread, timing them round-robin."""
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - start) / steps)
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


def matmul_runners(size=2048):
    """One fp32 ``size``-square matrix product in XLA and in torch, and its FLOP count."""
    a_np = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    a, ta = jnp.asarray(a_np), torch.from_numpy(a_np)
    f = jax.jit(lambda a: a @ a)
    runners = {
        "xla matmul": lambda: jax.block_until_ready(f(a)),
        "torch matmul": lambda: torch.mm(ta, ta),
    }
    for fn in runners.values():
        fn()
    return runners, 2 * size**3


# ----------------------------------------------------------------------------- benchmarks


def network_rows(name, make_jax, make_torch, input_shape, batch, rounds, steps, matmul):
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((batch, *input_shape)).astype(np.float32)
    labels_np = rng.integers(0, 10, batch)
    x, labels = jnp.asarray(x_np), jnp.asarray(labels_np, jnp.int32)
    variables = make_jax("flax").init(jax.random.key(0), x)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})
    train, infer, compile_s, losses = {}, {}, {}, {}
    for impl in ("jcnn", "flax"):
        train[impl], infer[impl], compile_s[impl], losses[impl] = jax_steps(
            make_jax(impl), params, batch_stats, x, labels
        )
    module = make_torch()
    load_into_torch(module, params)
    x_torch = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    labels_torch = torch.from_numpy(labels_np)
    train["torch"], infer["torch"], compile_s["torch"], losses["torch"] = torch_steps(
        module, x_torch, labels_torch
    )
    assert abs(losses["jcnn"] - losses["flax"]) < 1e-4 * max(1, abs(losses["flax"])), losses
    assert abs(losses["torch"] - losses["flax"]) < 1e-3 * max(1, abs(losses["flax"])), losses
    for runner in train.values():  # warm-up
        runner()
    flops = conv_flops(make_jax("flax"), x)
    rows = []
    matmul_fns, matmul_flops = matmul
    for kind, runners, flop_factor in (("train", train, 3), ("infer", infer, 1)):
        # The matmul peak is re-measured inside the same rounds: the machine's load changes.
        result = interleaved({**runners, **matmul_fns}, rounds, steps)
        peak = matmul_flops / result.pop("xla matmul")[0] / 1e9
        torch_peak = matmul_flops / result.pop("torch matmul")[0] / 1e9
        rows.append(
            row(
                f"{name} {kind} b{batch}",
                batch,
                result,
                compile_s if kind == "train" else None,
                flop_factor * flops,
                peak,
                torch_peak,
            )
        )
    return rows


def row(label, batch, result, compile_s, flops, peak, torch_peak):
    speed = {impl: batch / t for impl, (t, _) in result.items()}
    cells = {
        "benchmark": label,
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


def per_example_rows(batch, rounds, steps):
    """LeNet-5 per-example gradients: vmap(grad) against the batch gradient and torch.func."""
    rng = np.random.default_rng(1)
    x_np = rng.standard_normal((batch, 28, 28, 1)).astype(np.float32)
    labels_np = rng.integers(0, 10, batch)
    x, labels = jnp.asarray(x_np), jnp.asarray(labels_np, jnp.int32)
    params = LeNet5().init(jax.random.key(0), x)["params"]
    runners = {}
    for impl in ("jcnn", "flax"):
        model = LeNet5(impl)

        def loss(params, x, labels, model=model):
            logits = model.apply({"params": params}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        per_example = jax.jit(
            jax.vmap(lambda p, x, y, loss=loss: jax.grad(loss)(p, x[None], y[None]), (None, 0, 0))
        )
        batch_grad = jax.jit(jax.grad(loss))
        per = per_example(params, x, labels)
        whole = batch_grad(params, x, labels)
        np.testing.assert_allclose(
            np.asarray(per["c1"]["kernel"].mean(0)), np.asarray(whole["c1"]["kernel"]), atol=1e-5
        )
        runners[f"{impl} vmap"] = partial(
            lambda f: jax.block_until_ready(f(params, x, labels)), per_example
        )
        runners[f"{impl} batch"] = partial(
            lambda f: jax.block_until_ready(f(params, x, labels)), batch_grad
        )
    module = TorchLeNet5()
    load_into_torch(module, params)
    torch_params = {k: v.detach() for k, v in module.named_parameters()}
    x_torch = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
    labels_torch = torch.from_numpy(labels_np)

    def torch_loss(p, x, y):
        logits = torch.func.functional_call(module, p, (x[None],))
        return TF.cross_entropy(logits, y[None])

    torch_per_example = torch.func.vmap(torch.func.grad(torch_loss), in_dims=(None, 0, 0))
    torch_per_example(torch_params, x_torch, labels_torch)
    runners["torch vmap"] = lambda: torch_per_example(torch_params, x_torch, labels_torch)
    for fn in runners.values():
        fn()
    result = interleaved(runners, rounds, steps)
    t = {name: value[0] for name, value in result.items()}
    return {
        "benchmark": f"LeNet-5 per-example grads b{batch}",
        "jcnn vmap ms": f"{1e3 * t['jcnn vmap']:.1f}",
        "flax vmap ms": f"{1e3 * t['flax vmap']:.1f}",
        "torch.func ms": f"{1e3 * t['torch vmap']:.1f}",
        "jcnn vmap/batch": f"{t['jcnn vmap'] / t['jcnn batch']:.2f}x",
        "flax vmap/batch": f"{t['flax vmap'] / t['flax batch']:.2f}x",
        "jcnn speed vs torch.func": f"{t['torch vmap'] / t['jcnn vmap']:.2f}x",
        "flax speed vs torch.func": f"{t['torch vmap'] / t['flax vmap']:.2f}x",
        "spread": "/".join(f"{100 * v[1]:.0f}%" for v in result.values()),
    }


LAYERS = [  # name, input (N, H, W, C), kernel (k, k, C, O), padding
    ("LeNet c1", (128, 28, 28, 1), (5, 5, 1, 6), 2),
    ("LeNet c3", (128, 14, 14, 6), (5, 5, 6, 16), 0),
    ("Airbench whiten", (256, 32, 32, 3), (2, 2, 3, 24), 0),
    ("Airbench g1.conv1", (256, 31, 31, 24), (3, 3, 24, 64), 1),
    ("Airbench g1.conv2", (256, 15, 15, 64), (3, 3, 64, 64), 1),
    ("Airbench g2.conv1", (256, 15, 15, 64), (3, 3, 64, 256), 1),
    ("Airbench g2.conv2", (256, 7, 7, 256), (3, 3, 256, 256), 1),
    ("Airbench g3.conv2", (256, 3, 3, 256), (3, 3, 256, 256), 1),
]


def layer_rows(rounds, steps):
    """GFLOP/s of each product of each conv layer: XLA's native conv against conv_general's."""
    rows = []
    for name, x_shape, w_shape, pad in LAYERS:
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
        options = ((1, 1), ((pad, pad),) * 2, (1, 1), 1)
        native = partial(
            lax.conv_general_dilated,
            window_strides=(1, 1),
            padding=options[1],
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        convs = {"xla": native, "jcnn": lambda x, w, o=options: conv_general(x, w, *o)}
        g = jnp.ones(jax.eval_shape(native, x, w).shape, jnp.float32)
        flops = 2 * np.prod(g.shape) * np.prod(w_shape[:-1])
        runners = {}
        for impl, conv in convs.items():
            fns = {
                "fwd": jax.jit(conv),
                "dx": jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda x: conv(x, w), x)[1](g)),
                "dw": jax.jit(lambda x, w, g, conv=conv: jax.vjp(lambda w: conv(x, w), w)[1](g)),
            }
            for product, fn in fns.items():
                args = (x, w) if product == "fwd" else (x, w, g)
                jax.block_until_ready(fn(*args))
                runners[f"{impl} {product}"] = partial(
                    lambda fn, args: jax.block_until_ready(fn(*args)), fn, args
                )
        result = interleaved(runners, rounds, steps)
        cells = {"layer": name, "GFLOP": f"{flops / 1e9:.2f}"}
        for product in ("fwd", "dx", "dw"):
            cells[f"{product} GFLOP/s xla/jcnn"] = "/".join(
                f"{flops / result[f'{impl} {product}'][0] / 1e9:.0f}" for impl in convs
            )
        rows.append(cells)
        print(markdown(rows[-1:]), flush=True)
    return rows


def markdown(rows):
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny batches, one round: smoke run")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--steps", type=int, default=3, help="calls per round and implementation")
    parser.add_argument(
        "--only",
        choices=["lenet", "airbench", "per-example", "layers"],
        nargs="*",
        help="sections to run (default: all but layers, the per-layer conv GFLOP/s)",
    )
    args = parser.parse_args()
    rounds, steps = (1, 1) if args.quick else (args.rounds, args.steps)
    only = set(args.only or ["lenet", "airbench", "per-example"])
    lenet_batch, air_batch, pe_batch = (8, 8, 4) if args.quick else (128, 256, 64)

    matmul = matmul_runners(256 if args.quick else 2048)
    print(f"# jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    rows = []
    if "lenet" in only:
        rows += network_rows(
            "LeNet-5",
            lambda impl: LeNet5(impl),
            TorchLeNet5,
            (28, 28, 1),
            lenet_batch,
            rounds,
            steps,
            matmul,
        )
        print(markdown(rows[-2:]), flush=True)
    if "airbench" in only:
        rows += network_rows(
            "AirbenchNet",
            lambda impl: AirbenchNet(impl),
            TorchAirbenchNet,
            (32, 32, 3),
            air_batch,
            rounds,
            max(1, steps // 2),
            matmul,
        )
        print(markdown(rows[-2:]), flush=True)
    if rows:
        print()
        print(markdown(rows))
    if "per-example" in only:
        print()
        print(markdown([per_example_rows(pe_batch, rounds, steps)]))
    if "layers" in only:
        print()
        print(markdown(layer_rows(rounds, steps)))


if __name__ == "__main__":
    main()
