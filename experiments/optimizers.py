"""Optimizers (lecture 003): SGD, momentum, Nesterov, AdaGrad, RMSProp and Adam on one CNN; loss
curves on one figure, and AdaGrad's shrinking step.

Run: ``python experiments/optimizers.py [--quick] [--data-dir DIR]`` (full: 2 min measured on
2 cores).
"""

from __future__ import annotations

import _common
import matplotlib.pyplot as plt
import numpy as np

from jcnn import train

# Learning rates in each method's usual range (the notes' defaults where they give one).
RATES = {"sgd": 0.05, "momentum": 0.01, "nesterov": 0.01, "adagrad": 0.05, "rmsprop": 1e-3,
         "adam": 1e-3}


def smooth(values, width):
    width = max(1, min(width, len(values)))
    return np.convolve(values, np.ones(width) / width, mode="valid")


def main(argv=None):
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    n_train, epochs = (256, 1) if quick else (10000, 3)
    widths = (8, 16) if quick else (32, 64, 64)
    page = _common.Page("optimizers", "Optimizers: loss curves and AdaGrad's step", args)
    x_train, y_train, _, _ = _common.standardized(args, "cifar10", n_train, 10)
    curves = {}
    names = ("sgd", "adagrad", "adam") if quick else tuple(RATES)
    for name in names:
        lr = RATES[name]
        model = _common.conv_net(widths)
        curves[name] = _common.train_curve(model, (x_train, y_train), train.optimizer(name, lr),
                                           epochs=epochs, batch_size=64, seed=args.seed)
    page.text(
        f"The same CNN (convs of widths {widths}, ReLU, 2x2 max pools, global average pooling), "
        f"the same initialization and batches (batch 64, {epochs} epochs over {n_train} CIFAR-10 "
        "images), a constant learning rate per method: "
        + ", ".join(f"{k} {RATES[k]:g}" for k in names) + ".")
    rows = []
    quarter = max(1, len(curves["sgd"][0]) // 4)
    for name, (loss, step, _) in curves.items():
        rows.append([name, RATES[name], loss[:quarter].mean(), loss[-quarter:].mean(),
                     step[:quarter].mean() / RATES[name], step[-quarter:].mean() / RATES[name]])
    page.table(["optimizer", "lr", "mean loss, first quarter", "mean loss, last quarter",
                "step norm / lr, first quarter", "step norm / lr, last quarter"], rows)
    adagrad = curves["adagrad"][1] / (curves["adagrad"][2] + 1e-12)
    early, late = adagrad[:quarter].mean(), adagrad[-quarter:].mean()
    page.text(
        "## AdaGrad's shrinking step\nAdaGrad divides by the square root of the sum of all past "
        "squared gradients, so its step per unit of gradient can only shrink (notes: the "
        "learning rate decays, possibly too fast, which RMSProp's moving average fixes). Here "
        f"||step|| / ||gradient|| goes from {early:.3g} (first quarter) to {late:.3g} (last "
        f"quarter)"
        + (f", a fall by a factor {early / late:.1f}, as the notes say." if late < early
           else " — **it did not shrink here**, against the notes."))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 1 if quick else 20
    for name, (loss, step, grad) in curves.items():
        axes[0].plot(smooth(loss, width), label=name)
        axes[1].semilogy(smooth(step / (grad + 1e-12), width), label=name)
    # AdaGrad's first steps (a large step before its accumulator grows) would set the scale.
    settled = np.concatenate([smooth(loss, width)[len(loss) // 10:] for loss, _, _ in
                              curves.values()])
    settled = settled[np.isfinite(settled)]
    top = 1.15 * float(settled.max()) if settled.size else None
    clipped = top is not None and any(np.nanmax(smooth(loss, width)) > top
                                       for loss, _, _ in curves.values())
    axes[0].set_ylim(top=top)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel(f"training loss (moving average of {width})"
                       + (", first steps clipped" if clipped else ""))
    axes[0].legend(fontsize=8)
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("||parameter step|| / ||gradient||")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    page.figure(fig, "curves", "Loss curves (left) and step size per unit of gradient (right)")
    page.write()


if __name__ == "__main__":
    main()
