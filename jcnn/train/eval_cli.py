"""``jcnn-eval``: evaluate a run folder's model on its test set.

Example::

    jcnn-eval runs/lenet5-mnist                 # the latest checkpoint on the run's dataset
    jcnn-eval runs/lenet5-mnist --which best --dataset fashion_mnist --data-dir ../shared/data

Prints the test accuracy and cross-entropy loss (whatever loss ``fit`` was given: a run folder
does not record it) and the accuracy of every class, and writes the confusion matrix
as a PNG (``<folder>/confusion_matrix.png`` unless ``--confusion``) and the numbers as JSON
(``<folder>/evaluation.json`` unless ``--json``). The dataset is the one the run recorded
(``jcnn-train`` records it); a run trained through ``fit`` names it with ``--dataset``.

Writing into the run folder, ``jcnn-eval`` holds the folder's lock as ``jcnn-train`` does: while a
run trains there it refuses at once (exit status 3), touching nothing; with ``--json`` and
``--confusion`` outside the folder it only reads it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from pathlib import Path

from jcnn._cli import OneLineParser, quiet_when_the_reader_leaves

__all__ = ["main", "build_parser", "plot_confusion"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``jcnn-eval``."""
    from jcnn.train.cli import _dataset, _int_at_least

    p = OneLineParser(prog="jcnn-eval", description="Evaluate a jcnn run folder on a test set.")
    p.add_argument("folder", help="the run folder (jcnn-train --out, TrainConfig.out)")
    p.add_argument("--which", default="latest", help="latest, best, or a checkpoint step")
    p.add_argument(
        "--dataset", default=None, type=_dataset, help="default: the dataset the run recorded"
    )
    p.add_argument("--data-dir", default=None, help="folder with the dataset files")
    p.add_argument("--manual-dir", default=None, help="tfds:NAME only: the original downloads")
    p.add_argument("--split", default="test")
    p.add_argument("--batch-size", type=_int_at_least(1, "a positive integer"), default=1000)
    p.add_argument("--confusion", default=None, help="PNG path of the confusion matrix")
    p.add_argument("--json", default=None, help="JSON path of the results")
    return p


def plot_confusion(path, confusion, title: str) -> None:
    """Write the confusion matrix (rows: true class, columns: predicted) as a PNG, atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from jcnn.train import run_folder

    confusion = np.asarray(confusion)
    classes = confusion.shape[0]
    size = max(4.0, 0.5 * classes + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, fraction=0.046)
    if classes <= 20:
        for (row, col), count in np.ndenumerate(confusion):
            light = count > confusion.max() / 2
            ax.text(
                col,
                row,
                str(count),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if light else "black",
            )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    run_folder.write_atomically(path, buffer.getvalue())


def main(argv=None) -> int:
    """Entry point of ``jcnn-eval``; returns the exit status (130 on Ctrl-C)."""
    try:
        with quiet_when_the_reader_leaves():
            return _main(argv)
    except KeyboardInterrupt:  # the results are written atomically: none or whole
        print("jcnn-eval: interrupted", file=sys.stderr)
        return 130


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    from jcnn.train import run_folder
    from jcnn.train.runs import RunFolderError

    folder = Path(args.folder).expanduser()
    confusion = (
        folder / "confusion_matrix.png"
        if args.confusion is None
        else Path(args.confusion).expanduser()
    )
    results = folder / "evaluation.json" if args.json is None else Path(args.json).expanduser()
    lock = contextlib.nullcontext()
    if folder.is_dir() and any(_inside(path, folder) for path in (confusion, results)):
        try:  # as jcnn-train does: a run writing the folder and this command exclude each other
            lock = run_folder.claim(folder)
        except RunFolderError as error:
            print(
                f"jcnn-eval: {error}; or write the results elsewhere with --json and --confusion",
                file=sys.stderr,
            )
            return 3
    with lock:
        return _evaluate(args, folder, confusion, results)


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path`` lies in ``folder`` (through any links)."""
    return path.absolute().resolve().is_relative_to(folder.absolute().resolve())


def _same_path(a: Path, b: Path) -> bool:
    return a.absolute().resolve() == b.absolute().resolve()


def _destination_problem(path: Path, folder: Path, default: str) -> str | None:
    """Why ``path`` cannot take a result, or ``None``. The run's own files (``config.json``,
    ``checkpoints/``...) are never a destination: the result written over one breaks the run."""
    from jcnn.train import run_folder

    if path.is_dir():
        return "is a folder, expected a file"
    if folder.is_dir() and _inside(path, folder):
        top = path.absolute().resolve().relative_to(folder.absolute().resolve()).parts[0]
        own = {run_folder.LOCK_FILE, *run_folder.RUN_FILES, *run_folder.best_directories(folder)}
        if top in own - {default}:
            return f"would overwrite the run's own {top}; expected a path outside the run's files"
    if not path.absolute().parent.is_dir():
        return "its folder does not exist"
    return None


def _evaluate(args, folder: Path, confusion: Path, results: Path) -> int:
    from jcnn import data
    from jcnn.train import run_folder
    from jcnn.train.cli import DATASETS, load_dataset
    from jcnn.train.runs import RunFolderError, load_run

    which = int(args.which) if args.which.isdecimal() else args.which
    try:
        run = load_run(args.folder, which)
    except (RunFolderError, ValueError) as error:
        print(f"jcnn-eval: {_in_flags(str(error))}", file=sys.stderr)
        return 2
    dataset = args.dataset or run.metadata.get("dataset")
    if dataset is None:
        print(
            f"jcnn-eval: {args.folder} does not record its dataset (trained through fit); name "
            "it with --dataset",
            file=sys.stderr,
        )
        return 2
    if not isinstance(dataset, str) or (
        dataset not in DATASETS and not dataset.startswith("tfds:")
    ):
        print(
            f"jcnn-eval: {args.folder} records the dataset {dataset!r}, which jcnn-eval cannot "
            f"load; name one with --dataset ({', '.join(DATASETS)} or tfds:NAME)",
            file=sys.stderr,
        )
        return 2
    problem = None
    if args.manual_dir is not None and not dataset.startswith("tfds:"):
        problem = f"--manual-dir applies to --dataset tfds:NAME only, not {dataset}"
    elif args.data_dir is not None and dataset == "synthetic":
        problem = "--data-dir: --dataset synthetic is generated, not read from files"
    if problem is not None:
        print(f"jcnn-eval: {problem}", file=sys.stderr)
        return 2
    for flag, path, default in (
        ("--confusion", confusion, "confusion_matrix.png"),
        ("--json", results, "evaluation.json"),
    ):  # before any work
        problem = _destination_problem(path, folder, default)
        if problem is None and flag == "--json" and _same_path(path, confusion):
            problem = "is the path of the other result (--json and --confusion must differ)"
        if problem is not None:
            print(f"jcnn-eval: {flag} {path}: {problem}", file=sys.stderr)
            return 2
    data_dir = args.data_dir if args.data_dir is not None else run.metadata.get("data_dir")
    manual_dir = args.manual_dir if args.manual_dir is not None else run.metadata.get("manual_dir")
    try:
        images, labels = load_dataset(dataset, args.split, data_dir=data_dir, manual_dir=manual_dir)
    except (FileNotFoundError, data.DownloadError, data.CorruptFileError) as error:
        print(f"jcnn-eval: {error}", file=sys.stderr)
        return 1
    except ValueError as error:  # e.g. a split the dataset does not have
        print(f"jcnn-eval: {_in_flags(str(error))}", file=sys.stderr)
        return 2
    try:
        report = run.evaluate(images, labels, batch_size=args.batch_size)
    except (ValueError, TypeError) as error:  # e.g. a dataset of other images than the run's
        print(f"jcnn-eval: {dataset} {args.split}: {error}", file=sys.stderr)
        return 2
    print(
        f"{dataset} {args.split}: accuracy {report['accuracy']:.4f} (loss {report['loss']:.4f}) "
        f"on {report['count']} images; checkpoint step {run.step} ({run.which})"
    )
    for label, accuracy in enumerate(report["per_class_accuracy"]):
        total = sum(report["confusion_matrix"][label])
        shown = "no example" if accuracy is None else f"{accuracy:.4f}"
        print(f"  class {label}: {shown} ({report['confusion_matrix'][label][label]}/{total})")
    plot_confusion(
        confusion, report["confusion_matrix"], f"{dataset} {args.split}, step {run.step}"
    )
    record = {
        "dataset": dataset,
        "split": args.split,
        "step": run.step,
        "which": run.which,
        **report,
    }
    run_folder.write_atomically(results, json.dumps(record, indent=1))
    print(f"confusion matrix: {confusion}; results: {results}")
    return 0


def _in_flags(message: str) -> str:
    """A message of ``load_run`` or ``data.load`` in the command's terms: ``which='best'`` is
    ``--which best``, a leading ``which:``/``split:`` is ``--which:``/``--split:``, and a leading
    ``name:`` (``data.load_tfds``'s dataset name) is ``--dataset:``."""
    message = re.sub(r"\bwhich=(['\"]?)([^'\"\s;,)]+)\1", r"--which \2", message)
    message = re.sub(r"^name:", "--dataset:", message)
    return re.sub(r"^(which|split):", r"--\1:", message)


if __name__ == "__main__":
    sys.exit(main())
