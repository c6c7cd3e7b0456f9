"""Learning-rate schedules and warmup (lecture 003), and the linear scaling rule of Goyal et al.
(2017) across batch sizes.

Run: ``python experiments/schedules.py [--quick] [--data-dir DIR]`` (full: 9 min measured on
2 cores).
"""

from __future__ import annotations

import _common
import matplotlib.pyplot as plt

SCHEDULES = ("constant", "step", "exponential", "inverse_time", "cosine", "linear",
             "inverse_sqrt")


def schedule_settings(schedule, epochs):
    """The settings ``schedule`` reads besides the rate (fit refuses them for other schedules):
    step decays x0.1 at half and three quarters of the run, exponential and 1/t use k = 0.5."""
    if schedule == "step":
        return {"step_epochs": (epochs // 2, 3 * epochs // 4)}
    if schedule in ("exponential", "inverse_time"):
        return {"decay_rate": 0.5}
    return {}


def schedule_findings(rows, peak_lr, n_test):
    """What the ``[schedule, warmup, final train loss, test accuracy]`` rows show (Markdown),
    each difference judged against the noise of ``n_test`` test images near the two accuracies
    (near the lower one alone, 0.0625 to 0.125 on 64 images was "beyond the noise")."""
    accuracy = {(r[0], r[1]): r[3] for r in rows}
    best = max(rows, key=lambda r: r[3])
    warmup = "no" if best[1] == "none" else best[1]
    text = (f"Best here: {best[0]} ({warmup} warmup), test accuracy {best[3]:.3f}. The notes "
            "recommend step or cosine decay, with warmup for large learning rates or batches. "
            f"Differences are judged against two standard errors on {n_test} test images "
            f"(±{100 * _common.noise_level(best[3], n_test):.1f} points near the best).")
    for setting in dict.fromkeys(w for _, w in accuracy):
        constant = accuracy.get(("constant", setting))
        decaying = {n: a for (n, w), a in accuracy.items() if w == setting and n != "constant"}
        if constant is None or not decaying:
            continue
        name = max(decaying, key=decaying.get)
        gain = decaying[name] - constant
        beyond_noise = gain > _common.noise_level((decaying[name] + constant) / 2, n_test)
        verdict = ("decay helps, as the notes say" if beyond_noise else
                   "**no decaying schedule beats a constant rate beyond the noise here**")
        text += (f" With {'no' if setting == 'none' else setting} warmup, the best decaying "
                 f"schedule ({name}, {decaying[name]:.3f}) vs a constant rate ({constant:.3f}): "
                 f"{100 * gain:+.1f} points, {verdict}.")
    pairs = [(a, accuracy[(name, "none")]) for (name, w), a in accuracy.items()
             if w != "none" and (name, "none") in accuracy]
    if pairs:
        raised = sum(a - b > _common.noise_level((a + b) / 2, n_test) for a, b in pairs)
        text += (f" One epoch of warmup raises the test accuracy beyond the noise for {raised} of "
                 f"{len(pairs)} schedules (peak lr {peak_lr} with momentum 0.9, batch 64).")
    return text


def main(argv=None):
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    n_train, n_test, epochs = (256, 128, 2) if quick else (5000, 1000, 6)
    widths = (8, 16) if quick else (32, 64, 64)
    page = _common.Page("schedules", "Learning-rate schedules, warmup and the linear scaling rule",
                        args)
    x_train, y_train, x_test, y_test = _common.standardized(args, "cifar10", n_train, n_test)
    train_xy, test_xy = (x_train, y_train), (x_test, y_test)
    schedules = ("constant", "cosine") if quick else SCHEDULES
    base_lr = 0.05
    rows, histories = [], {}
    for schedule in schedules:
        for warmup in (0.0, 1.0):
            model = _common.conv_net(widths)
            history, _ = _common.run_fit(
                model, train_xy, test_xy, epochs=epochs, batch_size=64, seed=args.seed,
                optimizer="momentum", learning_rate=base_lr, schedule=schedule,
                warmup_epochs=warmup, **schedule_settings(schedule, epochs))
            histories[(schedule, warmup)] = history
            rows.append([schedule, "1 epoch" if warmup else "none",
                         history[-1]["train_loss"], history[-1]["val_accuracy"]])
    page.text(
        f"A CNN (widths {widths}) trained {epochs} epochs on {n_train} CIFAR-10 images with SGD + "
        f"momentum 0.9, peak lr {base_lr}, batch 64"
        + (f"; step decays x0.1 at epochs {epochs // 2} and {3 * epochs // 4}; exponential and "
           "1/t use k = 0.5 per epoch. " if "step" in schedules else ". ")
        + "Warmup is linear from 0 over the first epoch.")
    page.table(["schedule", "warmup", "final train loss", "test accuracy"], rows)
    page.text(schedule_findings(rows, base_lr, len(y_test)))

    # Linear scaling rule: lr proportional to batch size, with warmup (Goyal et al. 2017).
    # two sizes even in quick mode: the spread of one batch size is 0 whatever the rule does
    batch_sizes = (64, 128) if quick else (32, 64, 128, 256, 512)
    reference_batch, reference_lr = 64, base_lr
    scaling_rows, scaled, fixed = [], [], []
    for batch in batch_sizes:
        results = []
        for rule in ("scaled", "fixed"):
            lr = reference_lr * batch / reference_batch if rule == "scaled" else reference_lr
            model = _common.conv_net(widths)
            history, _ = _common.run_fit(
                model, train_xy, test_xy, epochs=epochs, batch_size=batch, seed=args.seed,
                optimizer="momentum", learning_rate=lr, schedule="cosine",
                warmup_epochs=1.0 if rule == "scaled" else 0.0)
            results.append(history[-1]["val_accuracy"])
        scaled.append(results[0])
        fixed.append(results[1])
        scaling_rows.append([batch, reference_lr * batch / reference_batch, results[0],
                             reference_lr, results[1]])
    page.text(
        "## Linear scaling rule\nGoyal et al. (2017): when the batch grows by k, multiply the "
        "learning rate by k (with a gradual warmup) and the accuracy stays the same; their "
        "ResNet-50 kept 23.6% ImageNet top-1 error from batch 256 to 8k (23.74% at 8k vs 23.60%). "
        f"Here: same epochs, lr = {reference_lr} x batch / {reference_batch} with 1 epoch of "
        f"warmup vs a fixed lr {reference_lr} without warmup.")
    page.table(["batch", "scaled lr", "test acc (scaled + warmup)", "fixed lr",
                "test acc (fixed)"], scaling_rows)
    spread_scaled = max(scaled) - min(scaled)
    spread_fixed = max(fixed) - min(fixed)
    page.text(f"Spread of test accuracy across batch sizes: {spread_scaled:.3f} with the scaling "
              f"rule, {spread_fixed:.3f} with a fixed lr. "
              + ("The rule keeps accuracy closer to constant, as Goyal et al. report."
                 if spread_scaled < spread_fixed else
                 "**The rule did not reduce the spread here** (small data, few epochs: with a "
                 "large batch there are very few steps, which the paper's 90 epochs on ImageNet "
                 "do not suffer from)."))

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (schedule, warmup), history in histories.items():
        axes[0].plot([h["epoch"] for h in history], [h["val_accuracy"] for h in history],
                     ls="--" if warmup else "-", marker="o", ms=3,
                     label=f"{schedule}{' + warmup' if warmup else ''}")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=6, ncol=2)
    axes[1].plot(batch_sizes, scaled, marker="o", label="lr scaled with batch + warmup")
    axes[1].plot(batch_sizes, fixed, marker="s", label="fixed lr")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("batch size")
    axes[1].set_ylabel("test accuracy")
    axes[1].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    page.figure(fig, "curves", "Test accuracy per epoch by schedule (left); linear scaling rule "
                "(right)")
    page.write()


if __name__ == "__main__":
    main()
