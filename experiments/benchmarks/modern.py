"""CPU speed of the modern networks' convolutions and training steps: jcnn against a hand-written
Flax twin and PyTorch.

    /work/venv/bin/python experiments/benchmarks/modern.py                      # full run
    /work/venv/bin/python experiments/benchmarks/modern.py --rounds 3 --steps 1 --scale 0.125
    /work/venv/bin/python experiments/benchmarks/modern.py --quick              # smoke test

Two tables, every row measured in one process with the implementations interleaved round by
round after warm-up (median over rounds; the spread, max/min - 1, shows a shared machine's noise):

* the convolutions of issue 16: depthwise 3x3 and 7x7, transposed 2-D and 3-D. A cell times one
  jitted call computing the forward pass and the gradients of the input and the kernel, for
  ``jcnn.functional.conv`` / ``conv_transpose`` (oneDNN when built, see the header line), XLA's
  native ``lax.conv_general_dilated`` and PyTorch (eager, ``torch.autograd``);
* one SGD-momentum training step (forward, backward, update, BatchNorm statistics) of each new
  network at a small size: ``jcnn.models`` jitted, the same architecture written with
  ``flax.linen``'s own layers (``Conv`` with ``feature_group_count`` for the depthwise convs,
  ``ConvTranspose``, ``BatchNorm``, ``LayerNorm``: XLA's native convolutions) jitted with the same
  step, and the same architecture in PyTorch, their parameter counts checked equal. The Flax twin
  starts from jcnn's initial variables (``flax_variables``) and its training-mode logits and
  BatchNorm statistics are checked equal to jcnn's before timing (``check_twin``). Dropout and
  stochastic depth are off. For both JAX sides the compile time (tracing, lowering and XLA's
  compile, ``jax.jit(step).lower(...).compile()``) and the first call's seconds (one step plus
  what a first run sets up) are reported.

* the activations between two matrix products, as in ConvNeXt's MLPs (``act(x @ w1) @ w2`` at
  the shapes of its four stages, batch 32): one jitted call of forward and gradients for
  ``jcnn.functional``'s activation, the plain ``jax.nn`` expression (what autodiff stores
  without jcnn's recompute-in-backward) and PyTorch's.

``--scale`` multiplies every batch size (at least 1) for smoke runs on a loaded machine;
``--quick`` times tiny versions of the four networks for one round of one step (no convolution
table): a smoke test, not a measurement.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import flax.linen as fnn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import torch.nn.functional as TF
from bench import torch_device
from jax import lax

from jcnn import functional as F
from jcnn import models

# ----------------------------------------------------------------------------- timing


def interleaved(runners, rounds, steps):
    """Median seconds per call of each runner, and its spread, timing them round-robin.

    The order rotates from round to round: a runner timed right after PyTorch shares the cores
    with its OpenMP threads while they still spin, and no side should always be that one.
    """
    times = {name: [] for name in runners}
    names = list(runners)
    for index in range(rounds):
        for name in names[index % len(names) :] + names[: index % len(names)]:
            fn = runners[name]
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            times[name].append((time.perf_counter() - start) / steps)
    return {name: (statistics.median(ts), max(ts) / min(ts) - 1) for name, ts in times.items()}


def markdown(rows):
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def _batch(batch, scale):
    return max(1, int(round(batch * scale)))


# ----------------------------------------------------------------------------- convolutions

# name, kind, batch, spatial, C_in, C_out, window, stride, padding
CONV_CASES = [
    ("depthwise 3x3, 128 ch, 56x56", "depthwise", 32, (56, 56), 128, 128, 3, 1, 1),
    ("depthwise 7x7, 256 ch, 28x28", "depthwise", 32, (28, 28), 256, 256, 7, 1, 3),
    ("transposed 2-D 4x4/2, 64->32, 16x16", "transposed", 32, (16, 16), 64, 32, 4, 2, 1),
    ("transposed 3-D 3x3x3/2, 32->16, 8^3", "transposed", 4, (8, 8, 8), 32, 16, 3, 2, 1),
]


def conv_runners(case, scale):
    name, kind, batch, spatial, c_in, c_out, window, stride, padding = case
    rank = len(spatial)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((_batch(batch, scale), *spatial, c_in)), jnp.float32)
    spec = "NDHWC" if rank == 3 else "NHWC"
    if kind == "depthwise":
        w = jnp.asarray(rng.standard_normal((*(window,) * rank, 1, c_out)), jnp.float32)
        jcnn_op = partial(F.conv, stride=stride, padding=padding, groups=c_in)
        native_op = partial(
            lax.conv_general_dilated,
            window_strides=(stride,) * rank,
            padding=((padding, padding),) * rank,
            dimension_numbers=(spec, spec[1:-1] + "IO", spec),
            feature_group_count=c_in,
        )
        torch_fn = partial(TF.conv2d, stride=stride, padding=padding, groups=c_in)
        torch_w = w.transpose(rank + 1, rank, *range(rank))
    else:
        w = jnp.asarray(rng.standard_normal((*(window,) * rank, c_in, c_out)), jnp.float32)
        output_padding = 1
        jcnn_op = partial(
            F.conv_transpose, stride=stride, padding=padding, output_padding=output_padding
        )

        def native_op(x, w):
            # XLA's transposed conv: an input-dilated conv of the spatially flipped kernel.
            kernel = jnp.flip(w, tuple(range(rank)))
            lo = window - 1 - padding
            return lax.conv_general_dilated(
                x,
                kernel,
                (1,) * rank,
                ((lo, lo + output_padding),) * rank,
                lhs_dilation=(stride,) * rank,
                dimension_numbers=(spec, spec[1:-1] + "IO", spec),
            )

        torch_fn = partial(
            TF.conv_transpose3d if rank == 3 else TF.conv_transpose2d,
            stride=stride,
            padding=padding,
            output_padding=output_padding,
        )
        torch_w = w.transpose(rank, rank + 1, *range(rank))
    reference = jcnn_op(x, w)
    np.testing.assert_allclose(native_op(x, w), reference, rtol=1e-3, atol=1e-3)

    def products(op):
        def fn(x, w):
            y, vjp = jax.vjp(op, x, w)
            return y, *vjp(jnp.ones_like(y))

        compiled = jax.jit(fn)
        jax.block_until_ready(compiled(x, w))
        return lambda: jax.block_until_ready(compiled(x, w))

    xt = torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy()).requires_grad_()
    wt = torch.from_numpy(np.asarray(torch_w).copy()).requires_grad_()

    def torch_products():
        y = torch_fn(xt, wt)
        dx, dw = torch.autograd.grad(y, (xt, wt), torch.ones_like(y))
        return dx, dw

    torch_products()
    return {"jcnn": products(jcnn_op), "xla": products(native_op), "torch": torch_products}


# ----------------------------------------------------------------------------- activations

# name: (jcnn, plain jax.nn, PyTorch)
ACTIVATIONS = {
    "GELU (erf)": (F.gelu, partial(jax.nn.gelu, approximate=False), TF.gelu),
    "GELU (tanh)": (
        partial(F.gelu, approximate=True),
        partial(jax.nn.gelu, approximate=True),
        partial(TF.gelu, approximate="tanh"),
    ),
    "swish": (F.swish, jax.nn.silu, TF.silu),
    "mish": (F.mish, jax.nn.mish, TF.mish),
    "ELU": (F.elu, jax.nn.elu, TF.elu),
    "SELU": (F.selu, jax.nn.selu, TF.selu),
    "softplus": (F.softplus, lambda x: jnp.where(x > 20, x, jnp.logaddexp(x, 0.0)), TF.softplus),
    "ReLU": (F.relu, jax.nn.relu, TF.relu),
}
# (rows, C): ConvNeXt's MLP inputs at batch 32 on 32x32 images, widths 32..256, hidden 4C
ACTIVATION_SHAPES = ((32 * 16 * 16, 32), (32 * 8 * 8, 64), (32 * 4 * 4, 128), (32 * 2 * 2, 256))


def activation_problem(name, scale, seed=0):
    """The three sides' ``grads()`` of ``sum(act(x @ w1) @ w2)`` over the four shapes, as
    ``{side: grads}``; each returns the gradients of every x, w1 and w2 as NumPy-convertible
    arrays, in the same order."""
    rng = np.random.default_rng(seed)
    arrays = []
    for rows, channels in ACTIVATION_SHAPES:
        arrays += [
            rng.standard_normal((_batch(rows, scale), channels)).astype(np.float32),
            (rng.standard_normal((channels, 4 * channels)) / np.sqrt(channels)).astype(np.float32),
            (rng.standard_normal((4 * channels, channels)) / np.sqrt(4 * channels)).astype(
                np.float32
            ),
        ]
    jcnn_act, jax_act, torch_act = ACTIVATIONS[name]
    inputs = [jnp.asarray(a) for a in arrays]

    def jax_side(act):
        def loss(arrays):
            return sum(
                jnp.sum(act(x @ w1) @ w2)
                for x, w1, w2 in zip(arrays[::3], arrays[1::3], arrays[2::3], strict=True)
            )

        grads = jax.jit(jax.grad(loss))
        return lambda: jax.block_until_ready(grads(inputs))

    tensors = [torch.from_numpy(a).requires_grad_() for a in arrays]

    def torch_grads():
        loss = sum(
            (torch_act(x @ w1) @ w2).sum()
            for x, w1, w2 in zip(tensors[::3], tensors[1::3], tensors[2::3], strict=True)
        )
        return torch.autograd.grad(loss, tensors)

    return {"jcnn": jax_side(jcnn_act), "jax.nn": jax_side(jax_act), "torch": torch_grads}


# ----------------------------------------------------------------------------- Flax twins
# What a Flax user writes with flax.linen's own layers (XLA's native convolutions). Parameter
# paths are jcnn.models' paths, so jcnn's initial variables load by name; only the transposed
# conv's kernel needs converting (``flax_variables``).


def _relu6(x):
    return jnp.clip(x, 0.0, 6.0)


class FlaxInvertedResidual(fnn.Module):
    features: int
    stride: int
    expansion: int

    @fnn.compact
    def __call__(self, x, train):
        norm = partial(fnn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        hidden = x.shape[-1] * self.expansion
        y = x
        if self.expansion != 1:
            y = fnn.Conv(hidden, (1, 1), use_bias=False, name="expand_conv")(y)
            y = _relu6(norm(name="expand_bn")(y))
        y = fnn.Conv(
            hidden,
            (3, 3),
            self.stride,
            padding=((1, 1), (1, 1)),
            feature_group_count=hidden,
            use_bias=False,
            name="depthwise_conv",
        )(y)
        y = _relu6(norm(name="depthwise_bn")(y))
        y = norm(name="project_bn")(
            fnn.Conv(self.features, (1, 1), use_bias=False, name="project_conv")(y)
        )
        return x + y if self.stride == 1 and x.shape[-1] == self.features else y


class FlaxMobileNetV2Cifar(fnn.Module):
    """jcnn.models.mobilenet_v2_cifar(num_classes, width, dropout_rate=0.0, stages=stages)."""

    num_classes: int
    width: float
    stages: tuple = models.mobilenet.MOBILENET_V2_STAGES

    @fnn.compact
    def __call__(self, x, train=False):
        divisible = models.mobilenet.make_divisible
        norm = partial(fnn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        x = fnn.Conv(
            divisible(32 * self.width),
            (3, 3),
            padding=((1, 1), (1, 1)),
            use_bias=False,
            name="stem_conv",
        )(x)
        x = _relu6(norm(name="stem_bn")(x))
        index = 1
        for stage, (t, c, n, s) in enumerate(self.stages):
            s = 1 if stage == 1 else s  # the CIFAR stem keeps the second stage at stride 1
            for i in range(n):
                x = FlaxInvertedResidual(
                    divisible(c * self.width), s if i == 0 else 1, t, name=f"block{index}"
                )(x, train)
                index += 1
        x = fnn.Conv(
            divisible(1280 * max(1.0, self.width)), (1, 1), use_bias=False, name="head_conv"
        )(x)
        x = _relu6(norm(name="head_bn")(x))
        return fnn.Dense(self.num_classes, name="classifier")(x.mean(axis=(1, 2)))


class FlaxConvNeXtBlock(fnn.Module):
    @fnn.compact
    def __call__(self, x):
        c = x.shape[-1]
        y = fnn.Conv(c, (7, 7), padding=((3, 3), (3, 3)), feature_group_count=c, name="dwconv")(x)
        y = fnn.LayerNorm(epsilon=1e-6, name="norm")(y)
        y = fnn.gelu(fnn.Dense(4 * c, name="pwconv1")(y), approximate=False)
        y = fnn.Dense(c, name="pwconv2")(y)
        scale = self.param("layer_scale", fnn.initializers.constant(1e-6), (c,))
        return x + y * scale.reshape(1, 1, 1, c)


class FlaxConvNeXt(fnn.Module):
    """jcnn.models.ConvNeXt(depths, widths, num_classes, patch_size=patch)."""

    depths: tuple
    widths: tuple
    num_classes: int
    patch: int

    @fnn.compact
    def __call__(self, x, train=False):
        norm = partial(fnn.LayerNorm, epsilon=1e-6)
        p = self.patch
        x = fnn.Conv(self.widths[0], (p, p), p, padding="VALID", name="stem_conv")(x)
        x = norm(name="stem_norm")(x)
        for stage, (depth, width) in enumerate(zip(self.depths, self.widths, strict=True), start=1):
            if stage > 1:
                x = norm(name=f"downsample{stage}_norm")(x)
                x = fnn.Conv(width, (2, 2), 2, padding="VALID", name=f"downsample{stage}_conv")(x)
            for block in range(depth):
                x = FlaxConvNeXtBlock(name=f"stage{stage}_{block}")(x)
        x = norm(name="head_norm")(x.mean(axis=(1, 2)))
        return fnn.Dense(self.num_classes, name="head")(x)


class FlaxDoubleConv(fnn.Module):
    features: int

    @fnn.compact
    def __call__(self, x, train):
        for i in (1, 2):
            x = fnn.Conv(
                self.features, (3, 3), padding=((1, 1), (1, 1)), use_bias=False, name=f"conv{i}"
            )(x)
            x = fnn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn{i}"
            )(x)
            x = fnn.relu(x)
        return x


class FlaxUNet(fnn.Module):
    """jcnn.models.UNet(out_channels, widths, "same", batch_norm=True)."""

    out_channels: int
    widths: tuple

    @fnn.compact
    def __call__(self, x, train=False):
        skips = []
        for level, width in enumerate(self.widths[:-1], start=1):
            x = FlaxDoubleConv(width, name=f"down{level}")(x, train)
            skips.append(x)
            x = fnn.max_pool(x, (2, 2), (2, 2))
        x = FlaxDoubleConv(self.widths[-1], name="bottom")(x, train)
        for level in range(len(self.widths) - 1, 0, -1):
            width = self.widths[level - 1]
            x = fnn.ConvTranspose(width, (2, 2), (2, 2), padding="VALID", name=f"up{level}")(x)
            x = jnp.concatenate([skips[level - 1], x], axis=-1)
            x = FlaxDoubleConv(width, name=f"up{level}_block")(x, train)
        return fnn.Conv(self.out_channels, (1, 1), name="head")(x)


class FlaxC3D(fnn.Module):
    """jcnn.models.SmallC3D(num_classes, widths)."""

    num_classes: int
    widths: tuple

    @fnn.compact
    def __call__(self, x, train=False):
        for stage, width in enumerate(self.widths, start=1):
            x = fnn.Conv(
                width, (3, 3, 3), padding=((1, 1),) * 3, use_bias=False, name=f"conv{stage}"
            )(x)
            x = fnn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn{stage}"
            )(x)
            window = (1, 2, 2) if stage == 1 else (2, 2, 2)
            x = fnn.max_pool(fnn.relu(x), window, window)
        return fnn.Dense(self.num_classes, name="fc")(x.mean(axis=(1, 2, 3)))


def flax_variables(variables, transposed=()):
    """jcnn's variables in the Flax twin's layout. ``flax.linen.ConvTranspose`` (with its default
    ``transpose_kernel=False``) correlates the dilated input with its kernel where jcnn's (and
    PyTorch's) transposed conv scatters the input through it: the kernels of the ``transposed``
    layers are flipped spatially. Every other layer keeps its layout (HWIO conv kernels,
    ``(in, out)`` dense kernels, BatchNorm and LayerNorm ``scale``/``bias``/``mean``/``var``)."""
    params = dict(variables["params"])
    for name in transposed:
        kernel = params[name]["kernel"]
        params[name] = {**params[name], "kernel": jnp.flip(kernel, tuple(range(kernel.ndim - 2)))}
    return {**variables, "params": params}


def check_twin(name, jcnn_model, flax_model, variables, twin_variables, x):
    """Raise unless the twin's variables have jcnn's shapes and its training-mode logits and
    BatchNorm statistics equal jcnn's to float32 tolerance."""
    shapes = jax.eval_shape(flax_model.init, jax.random.key(0), x[:1])
    if jax.tree.map(np.shape, shapes) != jax.tree.map(np.shape, dict(variables)):
        raise AssertionError(f"{name}: the Flax twin's variables differ from jcnn's in shape")

    def forward(model, variables):
        return model.apply(dict(variables), x, train=True, mutable=["batch_stats"])

    # At full float32 precision: on NVIDIA GPUs XLA multiplies float32 in TF32 by default.
    with jax.default_matmul_precision("highest"):
        ours, ours_stats = jax.jit(partial(forward, jcnn_model))(variables)
        theirs, their_stats = jax.jit(partial(forward, flax_model))(twin_variables)
    scale = float(jnp.abs(ours).max())
    np.testing.assert_allclose(
        theirs, ours, rtol=1e-4, atol=1e-5 * max(1.0, scale), err_msg=f"{name}: training logits"
    )
    for a, b in zip(jax.tree.leaves(their_stats), jax.tree.leaves(ours_stats), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"{name}: BatchNorm stats")
    return float(jnp.abs(theirs - ours).max())


# ----------------------------------------------------------------------------- networks


def torch_mobilenet_v2_cifar(width, num_classes, stages=models.mobilenet.MOBILENET_V2_STAGES):
    nn = torch.nn

    def divisible(v, d=8):
        new = max(d, int(v + d / 2) // d * d)
        return new + d if new < 0.9 * v else new

    def cbr(cin, cout, stride=1, groups=1, k=3):
        return [
            nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(),
        ]

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, t):
            super().__init__()
            hidden = cin * t
            layers = cbr(cin, hidden, k=1) if t != 1 else []
            layers += cbr(hidden, hidden, stride, hidden)
            layers += [nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.conv = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    cin = divisible(32 * width)
    layers = cbr(3, cin)
    for stage, (t, c, n, s) in enumerate(stages):
        s = 1 if stage == 1 else s
        for i in range(n):
            cout = divisible(c * width)
            layers.append(Block(cin, cout, s if i == 0 else 1, t))
            cin = cout
    last = divisible(1280 * max(1.0, width))
    layers += cbr(cin, last, k=1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(last, num_classes)]
    return nn.Sequential(*layers)


def torch_convnext(depths, widths, patch, num_classes):
    nn = torch.nn

    class ChannelNorm(nn.LayerNorm):
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class Block(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.dwconv = nn.Conv2d(c, c, 7, padding=3, groups=c)
            self.norm = nn.LayerNorm(c, eps=1e-6)
            self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(), nn.Linear(4 * c, c))
            self.layer_scale = nn.Parameter(torch.full((c,), 1e-6))

        def forward(self, x):
            y = self.norm(self.dwconv(x).permute(0, 2, 3, 1))
            return x + (self.mlp(y) * self.layer_scale).permute(0, 3, 1, 2)

    layers = [nn.Conv2d(3, widths[0], patch, patch), ChannelNorm(widths[0], eps=1e-6)]
    for i, (depth, c) in enumerate(zip(depths, widths, strict=True)):
        if i:
            layers += [ChannelNorm(widths[i - 1], eps=1e-6), nn.Conv2d(widths[i - 1], c, 2, 2)]
        layers += [Block(c) for _ in range(depth)]
    layers += [
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(1),
        nn.LayerNorm(widths[-1], eps=1e-6),
        nn.Linear(widths[-1], num_classes),
    ]
    return nn.Sequential(*layers)


def torch_unet(widths, out_channels):
    nn = torch.nn

    def double(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )

    class UNet(nn.Module):
        def __init__(self):
            super().__init__()
            chans = [3, *widths]
            self.down = nn.ModuleList(
                double(a, b) for a, b in zip(chans[:-2], chans[1:-1], strict=True)
            )
            self.bottom = double(widths[-2], widths[-1])
            pairs = list(zip(widths[:0:-1], widths[-2::-1], strict=True))
            self.up = nn.ModuleList(nn.ConvTranspose2d(a, b, 2, 2) for a, b in pairs)
            self.blocks = nn.ModuleList(double(2 * b, b) for _, b in pairs)
            self.head = nn.Conv2d(widths[0], out_channels, 1)

        def forward(self, x):
            skips = []
            for block in self.down:
                x = block(x)
                skips.append(x)
                x = TF.max_pool2d(x, 2)
            x = self.bottom(x)
            for up, block, skip in zip(self.up, self.blocks, skips[::-1], strict=True):
                x = block(torch.cat([skip, up(x)], 1))
            return self.head(x)

    return UNet()


def torch_c3d(widths, num_classes):
    nn = torch.nn
    layers, cin = [], 3
    for i, width in enumerate(widths):
        layers += [
            nn.Conv3d(cin, width, 3, padding=1, bias=False),
            nn.BatchNorm3d(width),
            nn.ReLU(),
            nn.MaxPool3d((1, 2, 2) if i == 0 else 2),
        ]
        cin = width
    layers += [nn.AdaptiveAvgPool3d(1), nn.Flatten(1), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def network(name, jcnn, flax, torch_twin, batch, shape, transposed=()):
    """One row: builders of the jcnn model, its Flax twin and its PyTorch twin, the batch size,
    the input shape without the batch (channels-last) and the Flax twin's transposed convs."""
    return {
        "name": name,
        "jcnn": jcnn,
        "flax": flax,
        "torch": torch_twin,
        "batch": batch,
        "shape": shape,
        "transposed": transposed,
    }


def networks(quick=False):
    """The benchmarked networks; ``quick``: tiny versions of each (a smoke test's sizes)."""
    if quick:
        stages = models.mobilenet.MOBILENET_V2_STAGES[:3]
        depths, widths, unet, c3d = (1, 1), (8, 16), (4, 8, 16), (4, 8)
        return [
            network(
                "MobileNetV2-CIFAR x0.25, 3 stages",
                lambda: models.MobileNetV2(10, 0.25, "cifar", stages, dropout_rate=0.0),
                lambda: FlaxMobileNetV2Cifar(10, 0.25, stages),
                lambda: torch_mobilenet_v2_cifar(0.25, 10, stages),
                3,
                (12, 12, 3),
            ),
            network(
                "ConvNeXt (1,1)x(8,16), 2x2 stem",
                lambda: models.ConvNeXt(depths, widths, 5, patch_size=2),
                lambda: FlaxConvNeXt(depths, widths, 5, 2),
                lambda: torch_convnext(depths, widths, 2, 5),
                3,
                (12, 12, 3),
            ),
            network(
                "U-Net (4,8,16) same+BN",
                lambda: models.UNet(2, unet, "same", batch_norm=True),
                lambda: FlaxUNet(2, unet),
                lambda: torch_unet(unet, 2),
                2,
                (12, 8, 3),
                ("up1", "up2"),
            ),
            network(
                "SmallC3D (4,8)",
                lambda: models.SmallC3D(5, c3d),
                lambda: FlaxC3D(5, c3d),
                lambda: torch_c3d(c3d, 5),
                3,
                (3, 8, 12, 3),
            ),
        ]
    depths, widths, unet, c3d = (
        (2, 2, 2, 2),
        (32, 64, 128, 256),
        (16, 32, 64, 128),
        (32, 64, 128, 256),
    )
    return [
        network(
            "MobileNetV2-CIFAR x0.5",
            lambda: models.mobilenet_v2_cifar(10, 0.5, dropout_rate=0.0),
            lambda: FlaxMobileNetV2Cifar(10, 0.5),
            lambda: torch_mobilenet_v2_cifar(0.5, 10),
            32,
            (32, 32, 3),
        ),
        network(
            "ConvNeXt (2,2,2,2)x(32..256), 2x2 stem",
            lambda: models.ConvNeXt(depths, widths, 10, patch_size=2),
            lambda: FlaxConvNeXt(depths, widths, 10, 2),
            lambda: torch_convnext(depths, widths, 2, 10),
            32,
            (32, 32, 3),
        ),
        network(
            "U-Net (16,32,64,128) same+BN",
            lambda: models.UNet(2, unet, "same", batch_norm=True),
            lambda: FlaxUNet(2, unet),
            lambda: torch_unet(unet, 2),
            8,
            (64, 64, 3),
            ("up1", "up2", "up3"),
        ),
        network(
            "SmallC3D (32..256)",
            lambda: models.SmallC3D(10, c3d),
            lambda: FlaxC3D(10, c3d),
            lambda: torch_c3d(c3d, 10),
            8,
            (8, 32, 32, 3),
        ),
    ]


def train_step_runner(model, variables, x, labels):
    """A jitted SGD-momentum training step of a Flax-API model (jcnn's or its twin) on ``x``, as a
    runner returning the loss, the seconds of its compilation (tracing, lowering and XLA's
    compile) and those of its first call (one step, plus what a first run sets up: oneDNN's
    buffers, memory touched for the first time)."""
    tx = optax.sgd(0.01, momentum=0.9)

    def loss_fn(params, batch_stats):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates.get("batch_stats", {})

    def train_step(params, batch_stats, opt_state):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params = variables["params"]
    state = {"value": (params, variables.get("batch_stats", {}), tx.init(params))}
    start = time.perf_counter()
    step = jax.jit(train_step).lower(*state["value"]).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    state["value"] = step(*state["value"])[:3]
    jax.block_until_ready(state["value"])
    first_call_s = time.perf_counter() - start

    def run():
        *state["value"], loss = step(*state["value"])
        return float(loss)

    return run, (compile_s, first_call_s)


def network_runners(spec, batch, device):
    """Training-step runners of jcnn, its Flax twin (checked equal first) and PyTorch, the compile
    and first-call seconds of the two JAX sides, the parameter count and the twin's largest logit
    error."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, *spec["shape"])), jnp.float32)
    model, twin = spec["jcnn"](), spec["flax"]()
    # one program, unoptimized (as TrainState.create does): eagerly every operation compiled its
    # own, and XLA's optimizations cost more compile time than they save (outside any timing)
    init = jax.jit(model.init, compiler_options={"xla_backend_optimization_level": 0})
    variables = init(jax.random.key(0), x[:1])
    twin_variables = flax_variables(variables, spec["transposed"])
    twin_error = check_twin(spec["name"], model, twin, variables, twin_variables, x)
    out_shape = jax.eval_shape(lambda v, x: model.apply(v, x), variables, x).shape
    labels = jnp.asarray(rng.integers(0, out_shape[-1], out_shape[:-1]))
    run_jcnn, jcnn_startup_s = train_step_runner(model, variables, x, labels)
    run_flax, flax_startup_s = train_step_runner(twin, twin_variables, x, labels)

    module = spec["torch"]()
    n_torch = sum(p.numel() for p in module.parameters())
    n_jcnn = sum(p.size for p in jax.tree.leaves(variables["params"]))
    if n_torch != n_jcnn:
        raise AssertionError(f"parameter counts differ: jcnn {n_jcnn}, PyTorch {n_torch}")
    module.to(device)
    xt = torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy()).to(device)
    lt = torch.from_numpy(np.array(labels)).long().to(device)
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)

    def run_torch():
        module.train()
        opt.zero_grad(set_to_none=True)
        loss = TF.cross_entropy(module(xt), lt)
        loss.backward()
        opt.step()
        return loss.item()

    runners = {"jcnn": run_jcnn, "flax": run_flax, "torch": run_torch}
    for run in runners.values():  # warm-up
        run()
    startup_s = {"jcnn": jcnn_startup_s, "flax": flax_startup_s}
    return runners, startup_s, n_jcnn, twin_error


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--steps", type=int, default=2, help="calls per round and implementation")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies every batch size")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["convs", "networks", "activations"],
        default=["convs", "networks", "activations"],
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: tiny versions of the networks, one round of one step (no convs table)",
    )
    parser.add_argument(
        "--torch-device",
        type=torch_device,
        default="cpu",
        help="where PyTorch runs, e.g. cuda (JAX runs on its default backend, printed first)",
    )
    args = parser.parse_args(argv)
    for name in ("rounds", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    if not 0 < args.scale < float("inf"):
        parser.error(f"--scale: expected a finite number > 0, got {args.scale}")
    if args.quick:
        args.rounds, args.steps, args.only = 1, 1, ["networks"]
    from jcnn import native

    backend = "oneDNN" if native.available() else "XLA formulations (native library not built)"
    print(
        f"jcnn backend on CPU: {backend}; torch {torch.__version__} on {args.torch_device} "
        f"({torch.get_num_threads()} CPU threads); jax {jax.__version__} on "
        f"{jax.devices()[0].device_kind}; rounds {args.rounds}, steps {args.steps}, "
        f"batch scale {args.scale}"
        + (", QUICK MODE (smoke run: not a measurement)" if args.quick else ""),
        flush=True,
    )
    if "convs" in args.only:
        rows = []
        for case in CONV_CASES:
            result = interleaved(conv_runners(case, args.scale), args.rounds, args.steps)
            (jcnn_s, jcnn_spread), (xla_s, _), (torch_s, _) = (
                result["jcnn"],
                result["xla"],
                result["torch"],
            )
            rows.append(
                {
                    "case (fwd + dx + dw)": case[0],
                    "batch": _batch(case[2], args.scale),
                    "jcnn ms": f"{jcnn_s * 1e3:.1f}",
                    "XLA native ms": f"{xla_s * 1e3:.1f}",
                    "PyTorch ms": f"{torch_s * 1e3:.1f}",
                    "jcnn vs PyTorch": f"{torch_s / jcnn_s:.2f}x",
                    "jcnn vs XLA": f"{xla_s / jcnn_s:.2f}x",
                    "jcnn spread": f"{jcnn_spread:.0%}",
                }
            )
            print(markdown(rows[-1:]), flush=True)
        print("\n" + markdown(rows), flush=True)
    if "networks" in args.only:
        rows = []
        for spec in networks(args.quick):
            batch = _batch(spec["batch"], args.scale)
            runners, startup_s, n_params, twin_error = network_runners(
                spec, batch, args.torch_device
            )
            print(
                f"{spec['name']}: the Flax twin's training logits equal jcnn's "
                f"(largest difference {twin_error:.1e})",
                flush=True,
            )
            ms = {
                side: median * 1e3
                for side, (median, _) in interleaved(runners, args.rounds, args.steps).items()
            }
            rows.append(
                {
                    "network (training step)": spec["name"],
                    "params": f"{n_params:,}",
                    "input": f"{batch}x{'x'.join(map(str, spec['shape']))}",
                    "jcnn ms": f"{ms['jcnn']:.1f}",
                    "Flax ms": f"{ms['flax']:.1f}",
                    "PyTorch ms": f"{ms['torch']:.1f}",
                    "jcnn vs Flax": f"{ms['flax'] / ms['jcnn']:.2f}x",
                    "jcnn vs PyTorch": f"{ms['torch'] / ms['jcnn']:.2f}x",
                    "compile s jcnn / Flax": "{:.1f} / {:.1f}".format(
                        startup_s["jcnn"][0], startup_s["flax"][0]
                    ),
                    "first call s jcnn / Flax": "{:.2f} / {:.2f}".format(
                        startup_s["jcnn"][1], startup_s["flax"][1]
                    ),
                }
            )
            print(markdown(rows[-1:]), flush=True)
        print("\n" + markdown(rows), flush=True)

    if "activations" in args.only:
        rows = []
        for name in ACTIVATIONS:
            runners = activation_problem(name, args.scale)
            for run in runners.values():  # warm-up
                run()
            ms = {
                side: median * 1e3
                for side, (median, _) in interleaved(runners, args.rounds, 2 * args.steps).items()
            }
            rows.append(
                {
                    "activation (fwd + grads, between matmuls)": name,
                    "jcnn ms": f"{ms['jcnn']:.1f}",
                    "jax.nn ms": f"{ms['jax.nn']:.1f}",
                    "PyTorch ms": f"{ms['torch']:.1f}",
                    "jcnn vs jax.nn": f"{ms['jax.nn'] / ms['jcnn']:.2f}x",
                    "jcnn vs PyTorch": f"{ms['torch'] / ms['jcnn']:.2f}x",
                }
            )
            print(markdown(rows[-1:]), flush=True)
        print("\n" + markdown(rows), flush=True)


if __name__ == "__main__":
    main()
