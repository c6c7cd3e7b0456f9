"""Augmentation (lecture 000): none vs flip + crop vs + cutout vs mixup vs cutmix (and the notes'
autocontrast, rotate, posterize, PixMix) on CIFAR-10: test accuracy and the train/test gap.

Run: ``python experiments/augmentation.py [--quick] [--data-dir DIR]`` (full: about 10 min on
2 cores).
"""

from __future__ import annotations

import functools

import _common
import jax
import matplotlib.pyplot as plt

from jcnn import data, train
from jcnn.data import augment as A

# Published CIFAR-10 test errors (%), each from a much larger network and 200+ epochs:
# DeVries & Taylor 2017 (ResNet-18): standard flip + crop 4.72, + cutout 3.99;
# Zhang et al. 2018 (PreAct ResNet-18): ERM 5.6, mixup 4.2;
# Yun et al. 2019 (PyramidNet-200): baseline 3.85, CutMix 2.88.
PUBLISHED = {
    "flip + crop": "4.72 (ResNet-18, DeVries & Taylor)",
    "flip + crop + cutout": "3.99 (ResNet-18, DeVries & Taylor)",
    "flip + crop + mixup": "4.2 vs 5.6 ERM (PreAct ResNet-18, Zhang et al.)",
    "flip + crop + cutmix": "2.88 vs 3.85 (PyramidNet-200, Yun et al.)",
}


# (published test error without, with) the addition, over the same paper's flip + crop baseline.
PUBLISHED_CHANGE = {
    "flip + crop + cutout": (4.72, 3.99),
    "flip + crop + mixup": (5.6, 4.2),
    "flip + crop + cutmix": (3.85, 2.88),
}


def findings(accuracy, n_test):
    """What the measured ``{name: (train acc, test acc)}`` shows beside the papers (Markdown),
    each difference judged against the noise of ``n_test`` test images
    (``_common.noise_level``)."""
    gap = {name: train - test for name, (train, test) in accuracy.items()}
    best = max(accuracy, key=lambda k: accuracy[k][1])
    lines = [
        f"Without augmentation the gap is {gap['none']:.3f}; the best test accuracy here is "
        f"{best!r} ({accuracy[best][1]:.3f}). The published numbers come from ResNets trained "
        "for hundreds of epochs on all 50,000 images, so only the direction compares."
    ]

    def noise(name, other):
        return _common.noise_level((accuracy[name][1] + accuracy[other][1]) / 2, n_test)

    others = [name for name in gap if name != "none"]
    narrower = [n for n in others if gap["none"] - gap[n] > noise(n, "none")]
    wider = [n for n in others if gap[n] - gap["none"] > noise(n, "none")]
    unclear = [n for n in others if n not in narrower + wider]
    if narrower == others:
        lines.append(
            "Every augmentation narrows the train/test gap beyond the noise of the test set, "
            "as expected of label-preserving ones."
        )
    else:
        parts = [
            f"{label}: {', '.join(names)}"
            for label, names in (
                ("narrower", narrower),
                ("**wider**", wider),
                ("not told apart from the noise", unclear),
            )
            if names
        ]
        lines.append(
            "**Not every augmentation narrows the gap beyond the noise here** (two standard "
            f"errors of a difference of test accuracies on {n_test} images). Against no "
            "augmentation the gap is " + "; ".join(parts) + "."
        )
    if "flip + crop" in accuracy:
        base_error = 100 * (1 - accuracy["flip + crop"][1])
        compared, opposite = [], False
        for name, (without, with_) in PUBLISHED_CHANGE.items():
            if name not in accuracy:
                continue
            change = 100 * (1 - accuracy[name][1]) - base_error
            level = 100 * noise(name, "flip + crop")
            if abs(change) <= level:
                verdict = f"within the noise of ±{level:.1f}"
            elif (change < 0) == (with_ - without < 0):
                verdict = "same direction"
            else:
                verdict, opposite = "**opposite direction**", True
            compared.append(
                f"{name.removeprefix('flip + crop + ')}: {change:+.1f} points of test error over "
                f"flip + crop (published {with_ - without:+.2f}), {verdict}"
            )
        lines.append("Added to flip + crop: " + "; ".join(compared) + ".")
        if opposite:
            lines.append(
                "Where the direction is opposite, a likely reason is scale: a small CNN trained "
                "for a few epochs on a subset of CIFAR-10 underfits, and mixing or erasing makes "
                "its task harder still, while the papers' large models overfit without them.")
    return "\n\n".join(lines)


def settings(quick):
    crop = functools.partial(A.random_crop, padding=4, pad_mode="reflect")
    flip_crop = [crop, A.random_hflip]
    mixup = functools.partial(A.mixup, alpha=1.0, num_classes=10)
    cutmix = functools.partial(A.cutmix, alpha=1.0, num_classes=10)
    out = {
        "none": ([], None),
        "flip + crop": (flip_crop, None),
        "flip + crop + cutout": (flip_crop + [functools.partial(A.cutout, size=16)], None),
        "flip + crop + mixup": (flip_crop, mixup),
        "flip + crop + cutmix": (flip_crop, cutmix),
        "autocontrast (p=0.5)": ([A.random_apply(lambda _, x: A.autocontrast(x), 0.5)], None),
        "rotate (±15°)": ([functools.partial(A.random_rotate, degrees=15.0)], None),
        "posterize (4 bits, p=0.5)": ([A.random_apply(lambda _, x: A.posterize(x, 4), 0.5)],
                                      None),
        "pixmix": ([functools.partial(A.pixmix, augment=A.random_hflip)], None),
    }
    if quick:
        out = {k: out[k] for k in ("none", "flip + crop + cutout", "flip + crop + mixup")}
    return out


def main(argv=None):
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    n_train, n_test, epochs = (256, 128, 1) if quick else (5000, 2000, 10)
    widths = (8, 16) if quick else (32, 64, 128)
    page = _common.Page("augmentation", "Data augmentation: test accuracy and generalization gap",
                        args)
    x_train, y_train = _common.load(args, "cifar10", "train", n_train)
    x_test, y_test = _common.load(args, "cifar10", "test", n_test)
    stats = data.Standardize.fit(x_train)
    clean_train = data.Loader(x_train, y_train, batch_size=250 if not quick else 128,
                              shuffle=False, augment=stats, drop_remainder=False)
    rows, accuracy = [], {}
    for name, (ops, batch_op) in settings(quick).items():
        model = _common.conv_net(widths)
        history, state = _common.run_fit(
            model, (x_train, y_train), (stats(x_test), y_test),
            epochs=epochs, batch_size=64, seed=args.seed, augment=A.compose(*ops, stats),
            batch_augment=batch_op, optimizer="momentum", learning_rate=0.05,
            schedule="cosine", weight_decay=5e-4)
        train_acc = (train.evaluate(state, clean_train)["accuracy"] if state is not None
                     else float("nan"))  # diverged
        test_acc = history[-1]["val_accuracy"]
        accuracy[name] = (train_acc, test_acc)
        rows.append([name, train_acc, test_acc, train_acc - test_acc,
                     PUBLISHED.get(name, "")])
    page.text(
        f"A CNN (widths {widths}, ReLU, max pools, global average pooling) trained {epochs} "
        f"epochs on the first {n_train} CIFAR-10 training images (SGD + momentum, lr 0.05 cosine, "
        "weight decay 5e-4, batch 64); every augmentation is written in JAX (`jcnn.data.augment`) "
        "and runs inside the loader's jitted batch function; the training images are "
        "standardized by the last op of the pipeline. Train accuracy is measured on the clean "
        "training images after training; gap = train - test.")
    page.table(["augmentation", "train acc", "test acc", "gap", "published test error (%)"],
               rows)
    page.text(findings(accuracy, n_test))

    names = list(accuracy)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    positions = range(len(names))
    ax.bar([p - 0.2 for p in positions], [accuracy[n][0] for n in names], 0.4, label="train")
    ax.bar([p + 0.2 for p in positions], [accuracy[n][1] for n in names], 0.4, label="test")
    ax.set_xticks(list(positions), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("accuracy")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    page.figure(fig, "accuracy", "Train (clean) and test accuracy per augmentation")

    key = jax.random.key(args.seed)
    fig, axes = plt.subplots(1, len(names), figsize=(1.6 * len(names), 2))
    for ax, name in zip(axes, names, strict=True):
        ops, _ = settings(quick)[name]
        image = A.compose(*ops)(key, x_train[1]) if ops else x_train[1]
        ax.imshow(image)
        ax.set_title(name, fontsize=6)
        ax.axis("off")
    page.figure(fig, "examples", "One training image through each per-example pipeline")
    page.write()


if __name__ == "__main__":
    main()
