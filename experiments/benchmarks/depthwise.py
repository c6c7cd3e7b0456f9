"""Depthwise convolution on CPU, every formulation against PyTorch in the same run.

    /work/venv/bin/python experiments/benchmarks/depthwise.py --rounds 3 --batch 4
    ONEDNN_MAX_CPU_ISA=AVX2 /work/venv/bin/python experiments/benchmarks/depthwise.py  # AVX2

A cell times one jitted call computing the forward pass and the gradients of the input and the
kernel (PyTorch: eager, ``torch.autograd``), the implementations interleaved round by round after
warm-up, median over rounds, on MobileNetV2 / ConvNeXt shapes: ``F.conv`` on oneDNN, ``F.conv``
on jcnn's XLA path (shifted multiply-adds), the XLA path's previous plan (XLA's forward and weight
gradient, GEMM + col2im input gradient) and XLA's grouped convolution. Every formulation is first
checked against XLA's. The rule these measurements set is in ``jcnn/functional/_conv_cpu.py``
and ``_conv_onednn.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as TF

from jcnn import functional as F
from jcnn import native
from jcnn.functional import _conv_cpu

# spatial size, channels, channel multiplier, window, stride
SHAPES = [
    (56, 128, 1, 3, 1),
    (28, 256, 1, 7, 1),
    (56, 144, 1, 3, 2),
    (56, 32, 1, 3, 1),
    (14, 384, 1, 3, 1),
    (28, 192, 1, 3, 2),
    (14, 512, 1, 7, 1),
    (7, 512, 1, 7, 1),
    (28, 64, 2, 3, 1),
]
PREVIOUS_PLAN = _conv_cpu.ConvPlan("xla", "shift", "xla", 1)


def products(op):
    def fn(x, w):
        y, vjp = jax.vjp(op, x, w)
        return y, *vjp(jnp.ones_like(y))

    return jax.jit(fn)


def runners(batch, size, channels, multiplier, window, stride):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, size, size, channels)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((window, window, 1, channels * multiplier)), jnp.float32)
    pad = (window - 1) // 2
    options = ((stride, stride), ((pad, pad), (pad, pad)), (1, 1), channels)
    config = _conv_cpu._check(x, w, *options, None)

    def jcnn_conv(x, w):
        return F.conv(x, w, stride=stride, padding=pad, groups=channels)

    fns = {}
    for name, backend in (("oneDNN", "onednn"), ("shifted sums", "xla")):
        if backend == "onednn" and not native.available():
            continue
        with native.conv_backend_scope(backend):  # read when tracing: trace inside the scope
            fns[name] = products(jcnn_conv)
            fns[name](x, w)
    fns["previous XLA path"] = products(
        lambda x, w: _conv_cpu.conv_general(x, w, *options, conv_plan=PREVIOUS_PLAN)
    )
    fns["XLA grouped"] = products(lambda x, w: _conv_cpu.native_conv(x, w, config))
    want = fns["XLA grouped"](x, w)
    for name, fn in fns.items():
        for got, expected in zip(fn(x, w), want, strict=True):
            np.testing.assert_allclose(
                got, expected, rtol=1e-4, atol=1e-3 * window**2, err_msg=name
            )
    xt = torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy()).requires_grad_()
    wt = torch.from_numpy(np.asarray(w).transpose(3, 2, 0, 1).copy()).requires_grad_()

    def torch_products():
        y = TF.conv2d(xt, wt, stride=stride, padding=pad, groups=channels)
        return torch.autograd.grad(y, (xt, wt), torch.ones_like(y))

    timed = {name: (lambda fn=fn: jax.block_until_ready(fn(x, w))) for name, fn in fns.items()}
    timed["PyTorch"] = torch_products
    return timed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    for name in ("rounds", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}: expected an int >= 1, got {getattr(args, name)}")
    print(
        f"torch {torch.__version__} with {torch.get_num_threads()} threads; batch {args.batch}; "
        f"rounds {args.rounds}; ms (speed vs PyTorch)",
        flush=True,
    )
    for size, channels, multiplier, window, stride in SHAPES:
        timed = runners(args.batch, size, channels, multiplier, window, stride)
        for run in timed.values():
            run()
        times = {name: [] for name in timed}
        for _ in range(args.rounds):
            for name, run in timed.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        median = {name: statistics.median(ts) for name, ts in times.items()}
        cells = "  ".join(
            f"{name} {t * 1e3:.1f} ({median['PyTorch'] / t:.2f}x)" for name, t in median.items()
        )
        print(f"{size}x{size}, {channels} ch x{multiplier}, {window}x{window}/{stride}: {cells}")


if __name__ == "__main__":
    main()
