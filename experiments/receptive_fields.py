"""Receptive fields (lectures 000, 001): measured through the gradient vs ``1 + L(K - 1)``.

For a stack of ``L`` convolutions with a ``K x K`` kernel and stride 1 the notes give a receptive
field of ``1 + L(K - 1)``: linear growth. Pooling or striding multiplies the step of every later
layer, so the field grows geometrically. The measured field of the centre output unit is the
extent of the non-zero gradient of that unit with respect to the input.

Run: ``python experiments/receptive_fields.py [--quick] [--data-dir DIR]`` (full: 11 min measured
on 2 cores shared with other work).
"""

from __future__ import annotations

import _common
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from jcnn import analysis, data, init, nn
from jcnn import functional as F


def stack(depth, kernel, *, pool_after=(), stride_after=()):
    """``depth`` convs (``kernel``, unpadded) with tanh; 2x2 average pools or stride-2 convs after
    the listed layers (1-based)."""
    layers = []
    for i in range(1, depth + 1):
        stride = 2 if i in stride_after else 1
        # std 1/K keeps the pre-activations near unit variance: tanh does not saturate, so
        # the gradient of a deep stack does not underflow to zero inside the field
        layers += [nn.Conv(1, kernel, stride=stride, kernel_init=init.normal(1.0 / kernel)),
                   F.tanh]
        if i in pool_after:
            layers.append(nn.AvgPool(2))
    return nn.Sequential(layers)


def measured_field(model, size, key, channels=1):
    """Side of the input region the centre output unit's gradient touches (rows, cols)."""
    x = jax.random.normal(key, (1, size, size, channels))
    # one compiled program each, not every op compiled eagerly: the same values, in less time
    variables = jax.jit(model.init)(key, x)

    def centre(image):
        out = model.apply(variables, image)
        return out[0, out.shape[1] // 2, out.shape[2] // 2].sum()

    grad = np.abs(np.asarray(jax.jit(jax.grad(centre))(x))[0].sum(-1))
    rows, cols = np.nonzero(grad > 0)
    if rows.size == 0:
        raise FloatingPointError("the centre unit's input gradient is zero everywhere")
    return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1), grad


def main(argv=None):
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    page = _common.Page("receptive_fields", "Receptive fields: measured vs predicted", args)
    # the image is only drawn at the end: a missing dataset must stop the run before its minutes
    images, _ = _common.load(args, "cifar10", "test", 100)
    key = jax.random.key(args.seed)
    # quick mode still stacks two layers: at L = 1 every formula gives about K, testing nothing
    depths = range(1, 3 if args.quick else 11)
    kernels = (3,) if args.quick else (3, 5, 7)

    rows, measured = [], {}
    for kernel in kernels:
        for depth in depths:
            model = stack(depth, kernel)
            size = 1 + depth * (kernel - 1) + 8
            h, w, _ = measured_field(model, size, key)
            predicted = 1 + depth * (kernel - 1)
            theory = analysis.receptive_field(model, (1, size, size, 1)).size[0]
            measured[(kernel, depth)] = h
            rows.append([kernel, depth, predicted, theory, f"{h} x {w}",
                         "yes" if h == w == predicted else "NO"])
    page.text("## Stride-1 stacks: 1 + L(K-1)\n"
              "Unpadded `nn.Conv` layers with N(0, 1/K²) weights and tanh between them; the "
              "field is the bounding box of the non-zero input gradient of the centre output unit. "
              "`analysis.receptive_field` is jcnn's static computation.")
    page.table(["K", "L", "1 + L(K-1)", "analysis.receptive_field", "measured",
                "match"], rows)

    growth_depth = 2 if args.quick else 6
    variants = {
        "stride 1": {},
        "2x2 average pool after every layer": {"pool_after": range(1, growth_depth + 1)},
        "stride 2 in every layer": {"stride_after": range(1, growth_depth + 1)},
    }
    growth = {name: [] for name in variants}
    growth_rows = []
    for name, options in variants.items():
        for depth in range(1, growth_depth + 1):
            limited = {k: [i for i in v if i <= depth] for k, v in options.items()}
            model = stack(depth, 3, **limited)
            theory = analysis.receptive_field(model, (1, 512, 512, 1)).size[0]
            size = theory + 8 + 2 ** (depth + 1)
            h, _, _ = measured_field(model, size, key)
            growth[name].append(h)
            growth_rows.append([name, depth, theory, h, "yes" if theory == h else "NO"])
    page.text("## Growth with pooling and stride (3x3 kernels)\n"
              "With a 2x2 pool or a stride of 2 after each layer the step between neighbouring "
              "units doubles every layer, so the field grows geometrically instead of linearly "
              "(lecture 000: pooling makes the receptive field grow exponentially).")
    page.table(["network", "L", "analysis.receptive_field", "measured", "match"], growth_rows)
    mismatches = sum(r[-1] == "NO" for r in rows + growth_rows)
    page.text(f"**{mismatches} mismatch(es)** between the measured fields and the formulas. "
              "Average pools are used because every input of a window then has a non-zero "
              "gradient; a max pool routes the gradient to one input per window, so its measured "
              "field for one input can be smaller than the geometric field.")

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for kernel in kernels:
        ax.plot(list(depths), [measured[(kernel, d)] for d in depths], "o",
                label=f"measured, K={kernel}")
        ax.plot(list(depths), [1 + d * (kernel - 1) for d in depths], "-", color="gray",
                alpha=0.5)
    for name, sizes in growth.items():
        if name != "stride 1":
            ax.plot(range(1, growth_depth + 1), sizes, "s--", label=f"K=3, {name}")
    ax.set_xlabel("layers L")
    ax.set_ylabel("receptive field (pixels)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    page.figure(fig, "growth", "Measured field (markers) vs 1 + L(K-1) (grey lines); pooling "
                "and stride grow it geometrically")

    stats = data.Standardize.fit(images)
    image = jnp.asarray(stats(images[:1]))
    panels = [("3 convs 3x3", stack(3, 3)), ("3 convs 3x3 + pools", stack(3, 3, pool_after=(1, 2))),
              ("6 convs 3x3", stack(6, 3))][: 1 if args.quick else 3]
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(3 * (len(panels) + 1), 3))
    axes[0].imshow(images[0])
    axes[0].set_title("CIFAR-10 test image 0", fontsize=8)
    for ax, (name, model) in zip(axes[1:], panels, strict=True):
        variables = model.init(key, image)

        def centre(x, model=model, variables=variables):
            out = model.apply(variables, x)
            return out[0, out.shape[1] // 2, out.shape[2] // 2].sum()

        grad = np.abs(np.asarray(jax.grad(centre)(image))[0]).sum(-1)
        ax.imshow(images[0])
        ax.imshow(np.ma.masked_where(grad == 0, grad), cmap="magma", alpha=0.7)
        ax.set_title(f"{name}: {int((grad.sum(1) > 0).sum())} px", fontsize=8)
    for ax in axes:
        ax.axis("off")
    page.figure(fig, "image", "Gradient of the centre unit on a real image: its receptive field")
    page.write()


if __name__ == "__main__":
    main()
