"""Normalization (lectures 001-003): BatchNorm's stable learning rates, and BN / GN / LN / IN
across batch sizes on CIFAR-10 (the trend of Wu & He 2018, Table 2).

Run: ``python experiments/normalization.py [--quick] [--data-dir DIR]`` (full: 39 min measured
on 2 cores shared with other work, 38 training runs; longer than the 10 min of the others).
"""

from __future__ import annotations

import math

import _common
import matplotlib.pyplot as plt

from jcnn import nn

# Wu & He 2018 (Group Normalization), Table 2: ResNet-50 ImageNet validation error (%) by
# images per worker.
PUBLISHED = {"BN": {32: 23.6, 16: 23.7, 8: 24.8, 4: 27.3, 2: 34.7},
             "GN": {32: 24.1, 16: 24.2, 8: 24.0, 4: 24.2, 2: 24.1}}

NORMS = {
    "BN": lambda c: nn.BatchNorm(momentum=0.9),
    "GN (G=8)": lambda c: nn.GroupNorm(num_groups=min(8, c)),
    "LN (GN, G=1)": lambda c: nn.GroupNorm(num_groups=1),
    "IN": lambda c: nn.InstanceNorm(),
}


def stable(history):
    return all(math.isfinite(h["train_loss"]) for h in history) and (
        history[-1]["train_accuracy"] > 0.15)


def largest_stable_findings(results, lrs):
    """The largest stable rate with and without BN beside the notes' claim (Markdown), from
    ``results[(label, lr)] = (stable, history)``."""
    largest = {label: max([lr for lr in lrs if results[(label, lr)][0]], default=None)
               for label in ("no BN", "BN")}
    shown = {label: f"**{lr:g}**" if lr is not None else f"none of {', '.join(map(str, lrs))}"
             for label, lr in largest.items()}
    return (f"Largest stable learning rate: without BN {shown['no BN']}, with BN "
            f"{shown['BN']}. The notes (Ioffe & Szegedy 2015): BatchNorm allows much "
            "higher learning rates and reaches a given accuracy in fewer steps."
            + ("" if (largest["BN"] or 0) > (largest["no BN"] or 0) else
               " **No rate trained stably here, with or without BN: this run cannot compare "
               "them**; see the table." if largest["BN"] is None and largest["no BN"] is None
               else " **Here BN did not allow a larger rate than the plain network**; see the "
               "table."))


def batch_size_findings(errors, batch_sizes, n_train, epochs, n_test):
    """What the BN/GN-by-batch-size table shows beside Wu & He, and where it differs (Markdown).

    ``errors[norm][batch]`` is a test error in %; only the BN and GN columns are compared, each
    difference against the noise of ``n_test`` test images (``_common.noise_level``).
    """
    bn, gn = errors["BN"], errors["GN (G=8)"]
    paper_bn, paper_gn = PUBLISHED["BN"], PUBLISHED["GN"]
    small, large = min(batch_sizes), max(b for b in batch_sizes if b <= 32)

    def noise(*compared):
        """Two standard errors, in points, of a difference of two errors near these."""
        return 100 * _common.noise_level(1 - sum(compared) / len(compared) / 100, n_test)

    bn_growth, gn_growth = bn[small] - bn[large], gn[small] - gn[large]
    # a difference of two differences: twice the variance of one
    trend_noise = math.sqrt(2) * noise(bn[small], bn[large], gn[small], gn[large])
    lines = [
        f"From batch {large} to batch {small}, BN's error changes by {bn_growth:+.1f} points and "
        f"GN's by {gn_growth:+.1f} (Wu & He, batch 32 to 2: BN {paper_bn[2] - paper_bn[32]:+.1f}, "
        f"GN {paper_gn[2] - paper_gn[32]:+.1f}). "
        + ("The direction of the paper's trend shows: BN degrades at the smallest batch, GN "
           f"does not (beyond the noise of ±{trend_noise:.1f} points on {n_test} test images)."
           if bn_growth - gn_growth > trend_noise else
           f"**The paper's trend does not show here**: BN's change exceeds GN's by "
           f"{bn_growth - gn_growth:+.1f} points, not beyond the noise of ±{trend_noise:.1f} "
           f"points on {n_test} test images.")
    ]
    smaller = [b for b in batch_sizes if b < large]
    degraded = [b for b in smaller if bn[b] - bn[large] > noise(bn[b], bn[large])]
    if degraded and len(degraded) < len(smaller):
        lines.append(
            f"BN's error is above its batch-{large} value beyond the noise of {n_test} test "
            f"images only at batch {', '.join(map(str, degraded))}; in the paper it is already "
            f"{paper_bn[4] - paper_bn[32]:.1f} points higher at batch 4 and "
            f"{paper_bn[8] - paper_bn[32]:.1f} at batch 8.")
    gap = gn[large] - bn[large]
    gap_noise = noise(bn[large], gn[large])
    lowest = min(e for column in errors.values() for e in column.values())
    lines.append(
        f"At batch {large} GN's error is {gap:+.1f} points from BN's (Wu & He at 32: "
        f"{paper_gn[32] - paper_bn[32]:+.1f}). "
        + ("**Unlike the paper, GN is clearly worse than BN at the usual batch sizes here** "
           f"(beyond the noise of ±{gap_noise:.1f} points). "
           f"These networks are far from converged ({epochs} epochs on {n_train} images, the "
           f"lowest error in the table {lowest:.1f}%), while the paper compares ResNet-50s "
           "trained to convergence on "
           "ImageNet; that BN gets further in so short a training is the likely cause, not "
           "something this run isolates." if gap > gap_noise else ""))
    above = [b for b in batch_sizes if b > large]
    rising = [
        n for n in errors
        if above and all(errors[n][b] - errors[n][large] > noise(errors[n][b], errors[n][large])
                         for b in above)
    ]
    if rising:
        steps = n_train // max(above)
        lines.append(
            f"Above batch {large} the error of {', '.join(rising)} rises beyond the noise: with "
            f"the same number of epochs, batch {max(above)} takes only {steps} steps per epoch, "
            "too few for these networks; the paper's table stops at 32 images per worker.")
    return "\n\n".join(lines)


def main(argv=None):
    args = _common.parse_args(__doc__.splitlines()[0], argv)
    quick = args.quick
    n_train, n_test = (256, 128) if quick else (5000, 1000)
    page = _common.Page("normalization", "Normalization: BatchNorm, and BN/GN/LN/IN by batch size",
                        args)
    x_train, y_train, x_test, y_test = _common.standardized(args, "cifar10", n_train, n_test)
    train_xy, test_xy = (x_train, y_train), (x_test, y_test)

    # Part 1: a deeper plain CNN with and without BatchNorm over a learning-rate sweep.
    deep = (8, 8, 16) if quick else (16, 16, 32, 32, 64, 64)
    # quick mode keeps two of everything it compares: one value has no largest, no trend
    lrs = (0.01, 0.1) if quick else (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    epochs1, target = (1, 0.2) if quick else (6, 0.40)
    rows, results = [], {}
    for label, norm in (("no BN", None), ("BN", NORMS["BN"])):
        for lr in lrs:
            model = _common.conv_net(deep, norm=norm, pool_every=2)
            history, _ = _common.run_fit(model, train_xy, test_xy, epochs=epochs1,
                                         batch_size=64, seed=args.seed, optimizer="momentum",
                                         learning_rate=lr, schedule="constant")
            ok = stable(history)
            reached = _common.first_epoch_reaching(history, "val_accuracy", target)
            results[(label, lr)] = (ok, history)
            rows.append([label, lr, "yes" if ok else "no (diverged or stuck)",
                         f"{history[-1]['val_accuracy']:.3f}",
                         reached or f"> {epochs1}"])
    page.text(
        f"## A deeper CNN with and without BatchNorm\n{len(deep)} convs 3x3 (widths {deep}, a "
        "2x2 max pool after every second), SGD + momentum 0.9 at a constant learning rate, "
        f"batch 64, {epochs1} epochs on {n_train} CIFAR-10 images. Stable: the loss stayed finite "
        "and the training accuracy ended above 15%.")
    page.table(["network", "lr", "stable", "test accuracy", f"epochs to {target:.0%} test acc"],
               rows)
    page.text(largest_stable_findings(results, lrs))

    # Part 2: BN / GN / LN / IN by batch size, learning rate scaled linearly with the batch.
    batch_sizes = (4, 32) if quick else (2, 4, 8, 16, 32, 64, 128)
    widths = (8, 8) if quick else (32, 64, 64)
    epochs2 = 1 if quick else 3
    norms = ("BN", "GN (G=8)") if quick else tuple(NORMS)
    errors = {name: {} for name in norms}
    for name in norms:
        norm = NORMS[name]
        for batch in batch_sizes:
            model = _common.conv_net(widths, norm=norm)
            history, _ = _common.run_fit(model, train_xy, test_xy, epochs=epochs2,
                                         batch_size=batch, seed=args.seed, optimizer="momentum",
                                         learning_rate=0.02 * batch / 32, schedule="cosine")
            errors[name][batch] = 100 * (1 - history[-1]["val_accuracy"])
    page.text(
        f"## BN, GN, LN and IN by batch size\nA CNN of {len(widths)} convs (widths {widths}), "
        f"norm after each conv, {epochs2} epochs on {n_train} CIFAR-10 images, SGD + momentum, "
        "lr 0.02 x batch / 32 with cosine decay (the same number of epochs, hence fewer steps "
        "for larger batches). BN momentum 0.9. Test error (%), published values from Wu & He "
        "2018 Table 2 (ResNet-50 on ImageNet, so only the trend compares).")
    headers = ["batch"] + list(norms) + ["Wu & He BN", "Wu & He GN"]
    page.table(headers, [[b, *(errors[n][b] for n in norms), PUBLISHED["BN"].get(b, ""),
                          PUBLISHED["GN"].get(b, "")] for b in batch_sizes])
    page.text(batch_size_findings(errors, batch_sizes, n_train, epochs2, n_test))

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for name in norms:
        ax.plot(batch_sizes, [errors[name][b] for b in batch_sizes], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("test error (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    page.figure(fig, "batch_size", "Test error by batch size for each normalization")
    page.write()


if __name__ == "__main__":
    main()
