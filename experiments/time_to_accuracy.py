"""Time to accuracy: the airbench94 and mnist99 recipes of ``jcnn.train.recipes``, per seed.

airbench94 is Keller Jordan's CIFAR-10 recipe (94.01% mean test accuracy over 1,000 runs with
test-time augmentation, 3.83 s on an A100 in PyTorch); mnist99 is jcnn's MNIST recipe, whose goal
is a mean of at least 99.0% over 5 seeds in at most 20 s on a 2-core CPU, from loading the data to
the test accuracy. Each run is ``recipes.run_recipe`` (``jcnn-train --recipe NAME`` does the same
into a run folder); ``--from-runs`` adds finished ``jcnn-train --recipe`` run folders instead of
training again (a full airbench94 run takes about an hour on 2 cores). The test set is evaluated
after every epoch of a recipe of two epochs or more (the curves) and only at the end of a shorter
one (mnist99's 1.2 epochs): an evaluation in the middle is not part of its time.

Run: ``python experiments/time_to_accuracy.py [--quick] [--recipes airbench94 mnist99]
[--seeds 0 1 2] [--from-runs RUN_FOLDER ...] [--data-dir DIR]``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import _common
import matplotlib.pyplot as plt
import numpy as np

from jcnn import data
from jcnn.train import recipes

PUBLISHED = {
    "airbench94": "94.01% mean with TTA over 1,000 runs, 3.83 s on one A100 (PyTorch; Jordan 2024)",
    "mnist99": "goal: mean >= 99.0% over 5 seeds in <= 20 s on this 2-core CPU; "
    "tuomaso/train_mnist_fast: 99.04% mean in 0.76 s on a laptop GPU",
}
DATASETS = {"airbench94": "cifar10", "mnist99": "mnist"}
# The goals: (mean test accuracy, runs at least, wall seconds per run at most).
GOALS = {"airbench94": (0.94, 3, None), "mnist99": (0.99, 5, 20.0)}


def parse_args(argv=None):
    # One parser, so that --help lists every flag and --seed is not taken as an abbreviation
    # of --seeds
    parser = _common.argument_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--recipes", nargs="+", default=None, help="default: both, or none with --from-runs"
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=int,
        default=None,
        help="one run per seed (default: 0 with --quick, else 0-4 for mnist99 and none for "
        "airbench94)",
    )
    parser.add_argument(
        "--from-runs",
        nargs="*",
        type=Path,
        default=[],
        metavar="RUN_FOLDER",
        help="finished jcnn-train --recipe run folders to add instead of training again",
    )
    parser.set_defaults(seed=None)
    known = parser.parse_args(argv)
    if known.seed is not None:
        raise SystemExit(
            f"--seed: this script runs one recipe run per seed of --seeds (--seeds "
            f"{known.seed}), got --seed {known.seed}"
        )
    # without --seeds a full run trains no airbench94 (about an hour a run): asked for by name
    # and with no run folders either, the page would have nothing to show for it
    if (
        known.recipes is not None
        and "airbench94" in known.recipes
        and known.seeds is None
        and not known.from_runs
        and not known.quick
    ):
        raise SystemExit(
            "--recipes airbench94: no run by default (a full run takes about an hour); give "
            "--seeds, or its jcnn-train run folders with --from-runs"
        )
    if known.seeds is not None and any(seed < 0 for seed in known.seeds):
        raise SystemExit(f"--seeds: expected ints >= 0, got {' '.join(map(str, known.seeds))}")
    if known.seeds is not None and any(seed >= 2**32 for seed in known.seeds):
        raise SystemExit(f"--seeds: expected ints < 2**32, got {' '.join(map(str, known.seeds))}")
    if known.recipes is None:
        known.recipes = [] if known.from_runs else ["airbench94", "mnist99"]
    for name in known.recipes:
        if name not in recipes.RECIPES_BY_NAME:
            raise SystemExit(f"--recipes: expected names of {', '.join(recipes.RECIPES_BY_NAME)}")
    # a repeated seed, recipe or folder would count one run twice towards the goals' run counts
    for flag, values in (
        ("--recipes", known.recipes),
        ("--seeds", known.seeds or []),
        ("--from-runs", [folder.expanduser().resolve() for folder in known.from_runs]),
    ):
        repeated = sorted({str(v) for v in values if values.count(v) > 1})
        if repeated:
            raise SystemExit(f"{flag}: each at most once, got {', '.join(repeated)} twice or more")
    known.from_runs = [folder.expanduser() for folder in known.from_runs]
    for folder in known.from_runs:
        if not (folder / "summary.json").is_file():
            raise SystemExit(f"--from-runs {folder}: not a finished run folder (no summary.json)")
    return known


def train_one(args, name: str, seed: int) -> dict:
    """One run of the recipe, timed from reading the data files to the test accuracy."""
    started = time.perf_counter()
    dataset = DATASETS[name]
    train = data.load(dataset, "train", data_dir=args.data_dir)
    test = data.load(dataset, "test", data_dir=args.data_dir)
    epochs = None
    if args.quick:
        # 16 batches: a run short enough for a smoke test that still learns (one batch left
        # mnist99 at chance: the page timed no learning)
        size = 16 * recipes.RECIPES_BY_NAME[name].batch_size
        train, test = (train[0][:size], train[1][:size]), (test[0][:256], test[1][:256])
        epochs = 1
    every_epoch = recipes.RECIPES_BY_NAME[name].epochs >= 2
    result = recipes.run_recipe(
        name, train, test, seed=seed, epochs=epochs, test_every_epoch=every_epoch
    )
    wall = time.perf_counter() - started
    history = result["history"]
    return {
        "recipe": name,
        "seed": seed,
        "source": "this script",
        "accuracy": result["test_accuracy"],
        "accuracy_tta": result["test_accuracy_tta"],
        "epochs": len(history),
        "epoch_fractions": epoch_fractions(history, len(result["prepared"].train_loader)),
        "epoch_seconds": [h["seconds"] for h in history],
        "curve": [h.get("test_accuracy") for h in history],
        "wall": wall,
    }


def from_run_folder(folder: Path) -> dict:
    """The same record from a finished ``jcnn-train --recipe`` run folder."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        history = json.loads((folder / "history.json").read_text())
        record = json.loads((folder / "config.json").read_text())
        recipe = (record.get("settings") or {}).get("recipe") or {}
        if "name" not in recipe:
            raise SystemExit(f"--from-runs {folder}: not a jcnn-train --recipe run folder")
        if recipe["name"] not in PUBLISHED:
            raise SystemExit(
                f"--from-runs {folder}: a run of recipe {recipe['name']!r}, expected one of "
                f"{', '.join(PUBLISHED)}"
            )
        # a run on another dataset (--recipe-any-dataset, synthetic) or on part of it
        # (--limit-train) was counted towards the recipe's mean beside its published figure
        settings = record.get("settings") or {}
        dataset = settings.get("dataset", DATASETS[recipe["name"]])
        limit = settings.get("limit_train")
        if dataset != DATASETS[recipe["name"]] or limit is not None:
            part = "" if limit is None else f" --limit-train {limit}"
            raise SystemExit(
                f"--from-runs {folder}: a run of {recipe['name']} on --dataset {dataset}{part}, "
                f"expected one on all of {DATASETS[recipe['name']]} (the published figures are "
                "for it)"
            )
        _check_length(folder, recipe, summary, record)
        resumed = "--resume" in str(summary.get("command", "")).split()
        run = {
            "recipe": recipe["name"],
            "seed": record["train"]["seed"],
            "source": f"`{summary.get('command', folder)}`",
            "accuracy": summary["test_accuracy"],
            "accuracy_tta": summary.get("test_accuracy_tta"),
            "epochs": len(history),
            "epoch_fractions": epoch_fractions(
                history, (record.get("train_loader") or {}).get("batches_per_epoch")
            ),
            "epoch_seconds": [h["seconds"] for h in history],
            "curve": [h.get("test_accuracy") for h in history],
            # a resumed run's wall time is its last process's only: not the run's
            "wall": None if resumed else summary.get("wall_seconds"),
        }
        _check_record(run)
        return run
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        reason = f"{type(error).__name__}: {error}"
        raise SystemExit(f"--from-runs {folder}: unreadable run record ({reason})") from None


def _check_length(folder: Path, recipe: dict, summary: dict, record: dict) -> None:
    """A ``SystemExit`` for a run shorter or longer than its recipe (``jcnn-train --recipe NAME
    --epochs N``), or one that stopped before its last step: it was counted towards the recipe's
    mean and goals beside the published figures. Records without the step counts pass."""
    name, steps = recipe["name"], recipe.get("steps")
    per_epoch = (record.get("train_loader") or {}).get("batches_per_epoch")
    epochs = recipes.RECIPES_BY_NAME[name].epochs
    if isinstance(steps, int) and isinstance(per_epoch, int) and per_epoch > 0:
        # the recipe's own length, as recipes.prepare counts it
        expected = max(1, math.ceil(round(epochs * per_epoch, 9)))
        if steps != expected:
            raise SystemExit(
                f"--from-runs {folder}: a run of {name} for {steps} steps (--epochs), expected "
                f"its own {epochs:g} epochs ({expected} steps of {per_epoch}; the published "
                "figures are for them)"
            )
    trained = summary.get("steps")
    if isinstance(steps, int) and isinstance(trained, int) and trained < steps:
        raise SystemExit(
            f"--from-runs {folder}: a run of {name} that stopped after {trained} of its {steps} "
            "steps, expected a finished one"
        )


def epoch_fractions(history: list, steps_per_epoch) -> list | None:
    """The share of an epoch each entry of ``history`` trained (its steps over an epoch's): a
    recipe's last epoch may end mid-way (mnist99's 1.2 epochs end 0.2 into the second), and its
    time is not an epoch's. ``None`` where the record lacks the steps to tell."""
    steps = [entry.get("step") for entry in history]
    if not steps or steps_per_epoch is None or not all(isinstance(s, int) for s in steps):
        return None
    trained = np.diff([0, *steps])
    if steps_per_epoch <= 0 or (trained <= 0).any():
        return None
    return [float(count) / steps_per_epoch for count in trained]


def _check_record(run: dict) -> None:
    """A ``ValueError`` for a value of a read run record that the page cannot show or count (a
    missing accuracy was shown as "None" and left out of nothing; a missing time stopped the
    page with a raw NumPy error)."""

    def number(value, low=0.0, high=math.inf):
        return (
            isinstance(value, (int, float))
            and not isinstance(value, bool)
            and low <= value <= high  # False for NaN
        )

    for key, field, optional in (
        ("accuracy", "test_accuracy", False),
        ("accuracy_tta", "test_accuracy_tta", True),
    ):
        if not (optional and run[key] is None) and not number(run[key], high=1.0):
            raise ValueError(f"summary.json {field}: expected a number in [0, 1], got {run[key]!r}")
    if run["wall"] is not None and not number(run["wall"]):
        raise ValueError(f"summary.json wall_seconds: expected seconds, got {run['wall']!r}")
    for i, seconds in enumerate(run["epoch_seconds"]):
        if not number(seconds):
            raise ValueError(f"history.json [{i}] seconds: expected seconds, got {seconds!r}")
    if not isinstance(run["seed"], int) or isinstance(run["seed"], bool):
        raise ValueError(f"config.json train.seed: expected an int, got {run['seed']!r}")


def tta_label(runs: list) -> str:
    """How the accuracies of ``runs`` were taken: runs of one recipe may differ in TTA."""
    with_tta = sum(run["accuracy_tta"] is not None for run in runs)
    if with_tta == len(runs):
        return "with TTA"
    if with_tta == 0:
        return "no TTA"
    return f"with TTA in {with_tta} of {len(runs)} runs, without in the others"


def goal_verdict(name: str, accuracies: list, walls: list) -> str:
    """Whether the runs of recipe ``name`` meet the issue's goals (Markdown); ``walls`` holds
    each run's wall seconds, ``None`` where unknown (a resumed run)."""
    target, runs_needed, seconds = GOALS[name]
    mean = float(np.mean(accuracies))
    reached = mean >= target and len(accuracies) >= runs_needed
    parts = [
        f"mean test accuracy >= {target:.1%} over at least {runs_needed} runs: "
        + ("**met**" if reached else "**not met**")
        + f" ({mean:.2%} over {len(accuracies)} run(s))"
    ]
    unknown = sum(wall is None for wall in walls)
    if seconds is not None:
        if unknown:
            parts.append(
                f"at most {seconds:g} s per run: not measured ({unknown} of {len(walls)} run(s) "
                "without a wall time: resumed, or recorded without one)"
            )
        else:
            slowest = max(walls)
            parts.append(
                f"at most {seconds:g} s per run from reading the files to the test accuracy: "
                + ("**met**" if slowest <= seconds else "**not met**")
                + f" (slowest run {slowest:.1f} s)"
            )
    return "Goals: " + "; ".join(parts) + "."


def _seeds(args, name: str) -> list:
    """The seeds this script trains recipe ``name`` with."""
    if args.seeds is not None:
        return args.seeds
    return [0] if args.quick else ([0, 1, 2, 3, 4] if name == "mnist99" else [])


def _check_distinct_seeds(runs: list, planned: dict) -> None:
    """A ``SystemExit`` where a recipe would have two runs of one seed (two ``--from-runs`` folders,
    or a folder and ``--seeds``): the goals count runs with different seeds, and the same seed
    twice is one run counted twice."""
    for name in dict.fromkeys([*(run["recipe"] for run in runs), *planned]):
        seeds = [run["seed"] for run in runs if run["recipe"] == name] + planned.get(name, [])
        repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
        if repeated:
            raise SystemExit(
                f"--from-runs/--seeds: {name} seed(s) {', '.join(map(str, repeated))} twice or "
                "more (the goals count runs with different seeds); give each seed once"
            )


def main(argv=None):
    args = parse_args(argv)
    page = _common.Page("time_to_accuracy", "Time to accuracy: airbench94 and mnist99", args)
    page.text(__doc__.split("\n\n")[1])
    runs = [from_run_folder(folder) for folder in args.from_runs]
    # a quick airbench94 step alone is a batch of 1024 CIFAR-10 images: too slow for a smoke run
    names = (
        ["mnist99"] if args.quick and args.recipes == ["airbench94", "mnist99"] else args.recipes
    )
    planned = {name: _seeds(args, name) for name in names}
    _check_distinct_seeds(runs, planned)
    # a dataset missing for a later recipe failed after the earlier ones had trained (an hour a
    # run of airbench94), with a traceback: every one is read once before the first run
    for name in names:
        for split in ("train", "test"):
            _common.load(args, DATASETS[name], split, 1)
    for name in names:
        for seed in planned[name]:
            runs.append(train_one(args, name, seed))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "curve"}), flush=True)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name in dict.fromkeys(run["recipe"] for run in runs):
        mine = [run for run in runs if run["recipe"] == name]
        page.text(f"## {name}\n\nPublished: {PUBLISHED[name]}.")
        rows = []
        for run in mine:
            seconds, fractions = run["epoch_seconds"], run.get("epoch_fractions")
            epochs = run["epochs"]
            if fractions is not None and len(fractions) == len(seconds):
                # a partial last epoch counts as its share, its seconds scaled to a whole epoch
                epochs = round(float(np.sum(fractions)), 2)
                seconds = [t / f for t, f in zip(seconds, fractions, strict=True)]
            rows.append(
                [
                    run["seed"],
                    run["accuracy"],
                    run["accuracy_tta"] if run["accuracy_tta"] is not None else "-",
                    epochs,
                    float(np.median(seconds)) if seconds else "-",
                    float(np.sum(run["epoch_seconds"])) if seconds else "-",
                    run["wall"] if run["wall"] is not None else "-",
                    run["source"],
                ]
            )
            if any(v is not None for v in run["curve"]):
                ax.plot(
                    range(1, len(run["curve"]) + 1),
                    [np.nan if v is None else v for v in run["curve"]],
                    marker="o",
                    label=f"{name} seed {run['seed']}",
                )
        page.table(
            [
                "seed",
                "test acc",
                "test acc (TTA)",
                "epochs",
                "s / epoch (median)",
                "training s",
                "wall s",
                "run",
            ],
            rows,
        )
        accuracies = [
            run["accuracy"] if run["accuracy_tta"] is None else run["accuracy_tta"] for run in mine
        ]
        walls = [run["wall"] for run in mine if run["wall"] is not None]
        page.text(
            f"Mean over {len(mine)} run(s): test accuracy {np.mean(accuracies):.4f} "
            f"({tta_label(mine)}), "
            f"min {np.min(accuracies):.4f}"
            + (
                f"; wall time {np.mean(walls):.1f} s (mean), {np.max(walls):.1f} s (max)."
                if walls
                else "."
            )
        )
        page.text(goal_verdict(name, accuracies, [run["wall"] for run in mine]))
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (no TTA)")
    ax.grid(alpha=0.3)
    if ax.lines:  # runs recorded without per-epoch curves draw nothing
        ax.legend(fontsize=7)
    page.figure(fig, "curves", "Test accuracy after each epoch, per run")
    page.write()


if __name__ == "__main__":
    main()
