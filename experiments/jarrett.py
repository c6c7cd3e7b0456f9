"""Jarrett et al. 2009 (lecture 004): what rectification ``|x|`` and local contrast normalization
contribute to a conv -> tanh -> |x| -> LCN -> pool network; its first-layer filters and feature
maps; and BatchNorm folding (same accuracy, faster inference).

Run: ``python experiments/jarrett.py [--quick] [--data-dir DIR]`` (full: 6.5 min measured on
2 cores).
"""

from __future__ import annotations

import time

import _common
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from jcnn import analysis, nn, train

VARIANTS = {  # (rectify, lcn), named as in the paper: R_abs = |x|, N = local contrast norm.
    "tanh -> P_A": (False, False),
    "tanh -> R_abs -> P_A": (True, False),
    "tanh -> N -> P_A": (False, True),
    "tanh -> R_abs -> N -> P_A (paper's best)": (True, True),
}


def jarrett_net(widths, rectify, lcn, num_classes=10):
    layers = []
    for width in widths:
        layers += [nn.Conv(width, 5, padding=2), nn.Tanh()]
        if rectify:
            layers.append(nn.Rectify())
        if lcn:
            layers.append(nn.LocalContrastNorm(size=9))
        layers.append(nn.AvgPool(2))
    layers += [nn.Flatten(), nn.Dense(num_classes)]
    return nn.Sequential(layers)


def frozen_features_optimizer(model, learning_rate):
    """Adam on the dense classifier only: the conv filters keep their random initial values."""
    classifier = f"layers_{len(model.layers) - 1}"
    labels = train.label_by_path([(f"{classifier}/*", "train")], default="frozen")
    return optax.multi_transform(
        {"train": optax.adam(learning_rate), "frozen": optax.set_to_zero()}, labels)


def compare(test, better, worse, n_test):
    """``better``'s test accuracy minus ``worse``'s, and whether it exceeds the noise of
    ``n_test`` test images (``_common.noise_level``)."""
    noise = _common.noise_level((test[better] + test[worse]) / 2, n_test)
    difference = test[better] - test[worse]
    return (f"{test[better]:.3f} vs {test[worse]:.3f}, {100 * difference:+.1f} points against a "
            f"noise level of ±{100 * noise:.1f}"), difference > noise


def ablation_findings(rows, n_test, n_train):
    """What the ``[variant, train acc, test acc, test acc with random filters]`` rows show beside
    the paper (Markdown)."""
    full, plain = "tanh -> R_abs -> N -> P_A (paper's best)", "tanh -> P_A"
    trained = {r[0]: r[2] for r in rows}
    random = {r[0]: r[3] for r in rows}
    text = (
        "Jarrett et al. (Caltech-101, 30 training images per class) found rectification and "
        "local contrast normalization the single most important ingredient: a two-stage system "
        "with them reached almost 63% with *random* filters and over 65% with unsupervised "
        "pre-training and supervised refinement, far above the same systems without them. "
        "Differences below are judged against two standard errors of the difference of two "
        f"accuracies on {n_test} test images.\n\n")
    figures, holds = compare(random, full, plain, n_test)
    text += (f"- **Random filters** (only the classifier trained): |x| + LCN vs tanh alone "
             f"{figures}: " + ("the paper's direction." if holds else
                               "**the paper's gain does not reproduce here**.") + "\n")
    figures, holds = compare(trained, full, plain, n_test)
    text += (f"- **Trained filters**: |x| + LCN vs tanh alone {figures}: "
             + ("the paper's direction." if holds else
                f"no gain here (every layer trained by supervision on {n_train} images of 10 "
                "classes; the paper's largest gaps were with random or unsupervised filters and "
                "30 training images per class).") + "\n")
    best = max(trained, key=trained.get)
    text += f"- The best variant with trained filters here is {best} ({trained[best]:.3f})."
    train_acc = {r[0]: r[1] for r in rows}
    if train_acc[full] - trained[full] > 2 * max(train_acc[plain] - trained[plain], 0.05):
        text += (f" |x| + LCN fits the {n_train} training images far better "
                 f"({train_acc[full]:.3f} vs {train_acc[plain]:.3f} training accuracy) than it "
                 "generalizes: it overfits.")
    return text


def timed(fn, x, repeats):
    jax.block_until_ready(fn(x))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(x))
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None):
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    n_train, n_test, epochs = (256, 128, 1) if quick else (5000, 1000, 6)
    widths = (8, 16) if quick else (32, 64)
    page = _common.Page("jarrett", "Jarrett et al. 2009: rectification, contrast normalization, "
                        "BatchNorm folding", args)
    x_train, y_train, x_test, y_test = _common.standardized(args, "cifar10", n_train, n_test)
    rows, states = [], {}
    names = list(VARIANTS)[:: 3] if quick else list(VARIANTS)
    for name in names:
        rectify, lcn = VARIANTS[name]
        model = jarrett_net(widths, rectify, lcn)
        history, state = _common.run_fit(
            model, (x_train, y_train), (x_test, y_test), epochs=epochs, batch_size=64,
            seed=args.seed, optimizer="adam", learning_rate=1e-3, schedule="cosine")
        states[name] = (model, state)
        random_filters, _ = _common.run_fit(
            model, (x_train, y_train), (x_test, y_test), epochs=epochs, batch_size=64,
            seed=args.seed, optimizer=frozen_features_optimizer(model, 1e-3))
        rows.append([name, history[-1]["train_accuracy"], history[-1]["val_accuracy"],
                     random_filters[-1]["val_accuracy"]])
    page.text(
        f"Two stages of 5x5 convs (widths {widths}) -> tanh -> [|x|] -> [local contrast "
        "normalization, 9x9 Gaussian] -> 2x2 average pool (P_A), then a dense layer, trained "
        f"with Adam for {epochs} epochs on {n_train} CIFAR-10 images (Jarrett et al. used "
        "Caltech-101, which we do not have offline); with random filters the convs keep their "
        "initial values and only the dense layer is trained, the same way.")
    page.table(["stage", "train acc", "test acc", "test acc, random filters"], rows)
    page.text("## Beside the paper\n" + ablation_findings(rows, len(y_test), n_train))

    model, state = states["tanh -> R_abs -> N -> P_A (paper's best)"]
    kernel = np.asarray(state.params["layers_0"]["kernel"])
    count = kernel.shape[-1]
    fig, axes = plt.subplots(2, count // 2, figsize=(count * 0.6, 1.6))
    for i, ax in enumerate(axes.flat):
        k = kernel[..., i]
        ax.imshow((k - k.min()) / (k.max() - k.min() + 1e-12))
        ax.axis("off")
    page.figure(fig, "filters", "First-layer filters of the trained |x| + LCN network (RGB)")

    variables = {"params": state.params}
    _, captured = model.apply(variables, jnp.asarray(x_test[:1]), train=False,
                              capture_intermediates=True, mutable=["intermediates"])
    stage1 = np.asarray(captured["intermediates"]["layers_3"]["__call__"][0][0])
    shown = min(8, stage1.shape[-1])
    fig, axes = plt.subplots(1, shown + 1, figsize=(1.6 * (shown + 1), 1.8))
    picture = x_test[0] - x_test[0].min()
    axes[0].imshow(picture / picture.max())
    axes[0].set_title("input", fontsize=7)
    for i in range(shown):
        axes[i + 1].imshow(stage1[..., i], cmap="gray")
        axes[i + 1].set_title(f"map {i}", fontsize=7)
    for ax in axes:
        ax.axis("off")
    page.figure(fig, "feature_maps", "Stage-1 feature maps (after |x| and LCN) for one test image")

    # BatchNorm folding: a conv + BN network, trained, then folded into plain convs.
    bn_widths = (8, 16) if quick else (32, 64, 128)
    model = _common.conv_net(bn_widths, norm=lambda c: nn.BatchNorm(momentum=0.9))
    history, state = _common.run_fit(
        model, (x_train, y_train), (x_test, y_test), epochs=epochs, batch_size=64,
        seed=args.seed, optimizer="momentum", learning_rate=0.05, schedule="cosine")
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    batch = jnp.asarray(x_test[: 128 if quick else 1000])
    folded, folded_variables = analysis.fold_batch_norms(model, variables, batch.shape)
    original = jax.jit(lambda x: model.apply(variables, x, train=False))
    fast = jax.jit(lambda x: folded.apply(folded_variables, x))
    logits, folded_logits = original(batch), fast(batch)
    labels = jnp.asarray(y_test[: batch.shape[0]])
    acc = float(jnp.mean(jnp.argmax(logits, -1) == labels))
    folded_acc = float(jnp.mean(jnp.argmax(folded_logits, -1) == labels))
    repeats = 3 if quick else 20
    t_bn, t_folded = timed(original, batch, repeats), timed(fast, batch, repeats)
    page.text(
        "## BatchNorm folding\n`jcnn.analysis.fold_batch_norms` merges each BatchNorm into the "
        f"conv before it. A CNN (widths {bn_widths}, conv -> BN -> ReLU) trained {epochs} "
        f"epochs, evaluated on {batch.shape[0]} test images (jit, best of {repeats} runs):")
    page.table(["network", "test acc", "max abs logit difference", "inference time (ms)"],
               [["conv + BN", acc, 0.0, 1e3 * t_bn],
                ["folded", folded_acc, float(jnp.max(jnp.abs(logits - folded_logits))),
                 1e3 * t_folded]])
    speedup = t_bn / t_folded
    page.text(f"Speed-up {speedup:.2f}x, "
              + ("the same test accuracy." if acc == folded_acc else
                 "**the accuracies differ**, see the table.")
              + (" No measurable gain: XLA already fuses the BatchNorm arithmetic of inference "
                 "into the ops next to it, so folding saves about one multiply-add per output, "
                 "less than the run-to-run spread of the timings."
                 if speedup < 1.1 else ""))
    page.write()


if __name__ == "__main__":
    main()
