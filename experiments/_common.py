"""Plumbing shared by the experiment scripts: arguments, data, short training runs, result pages.

Every script is ``python experiments/<name>.py [--quick] [--out DIR] [--data-dir DIR]``; it writes
``<out>/<name>.md`` and its figures ``<out>/<name>_*.png`` (``--out`` defaults to
``docs/experiments``). ``--quick`` runs a smoke-sized version in seconds (CI runs every script this
way); its page says in its first lines that its numbers are not the results.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import io
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from jcnn import data, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "experiments"


def parse_args(description: str, argv=None) -> argparse.Namespace:
    """The arguments every experiment takes."""
    return argument_parser(description).parse_args(argv)


class _Parser(argparse.ArgumentParser):
    """Keeps the arguments it parsed as ``argv`` in the namespace, for the page's command line:
    ``main(argv)`` called from Python is not what ``sys.argv`` holds."""

    def parse_known_args(self, args=None, namespace=None):
        known, extras = super().parse_known_args(args, namespace)
        known.argv = list(sys.argv[1:] if args is None else args)
        return known, extras


def argument_parser(description: str) -> argparse.ArgumentParser:
    """A parser of the arguments every experiment takes, for a script to add its own."""
    parser = _Parser(description=description)
    parser.add_argument(
        "--quick", action="store_true", help="smoke-sized run (seconds); the page says so"
    )
    parser.add_argument(
        "--out", type=_out_folder, default=DEFAULT_OUT, help="folder for the page and its figures"
    )
    parser.add_argument(
        "--data-dir",
        type=_data_folder,
        default=None,
        help="datasets folder (default: $JCNN_DATA_DIR, then jcnn's per-user cache)",
    )
    parser.add_argument("--seed", type=seed, default=0, help="an int in [0, 2**32)")
    return parser


def seed(text: str) -> int:
    """``--seed``: an int in [0, 2**32), as ``jcnn-train --seed`` (NumPy's generators refuse a
    negative seed and JAX's keys one past 64 bits, each with a traceback from inside the run)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an int in [0, 2**32), got {text!r}")
    return value


def _out_folder(text: str) -> Path:
    """``--out``: a folder, or a path where one can be made (checked before any work: the page
    is written at the end)."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder, got ''")
    path = Path(text).expanduser()
    for existing in (path, *path.parents):
        if existing.exists():
            if not existing.is_dir():
                where = "" if existing == path else f" ({existing} is a file)"
                raise argparse.ArgumentTypeError(f"{text}: expected a folder, got a file{where}")
            break
    return path


def figure_path(text: str) -> Path:
    """``--out`` of a script that draws one figure: a file path whose folder exists or can be
    made (checked before any work: the figure is written at the end)."""
    path = Path(text).expanduser()
    if not text or path.is_dir():
        raise argparse.ArgumentTypeError(f"expected a file path for the figure, got {text!r}")
    for existing in path.parents:
        if existing.exists():
            if not existing.is_dir():
                raise argparse.ArgumentTypeError(
                    f"expected a file path for the figure, got {text!r} ({existing} is a file)"
                )
            break
    return path


def _data_folder(text: str) -> str:
    """``--data-dir``: an existing folder."""
    if not text:  # Path("") is the current folder
        raise argparse.ArgumentTypeError("expected a datasets folder, got ''")
    path = Path(text).expanduser()
    if not path.is_dir():
        got = "a file" if path.exists() else "no such folder"
        raise argparse.ArgumentTypeError(f"{text}: expected a datasets folder, got {got}")
    return text


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, split: str, data_dir):
    images, labels = data.load(name, split, data_dir=data_dir)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load(args, name: str, split: str, limit: int | None = None):
    """``jcnn.data.load`` from ``--data-dir`` (or ``JCNN_DATA_DIR``), the first ``limit`` if given.

    Cached per process (read-only arrays), so that running several experiments in one process
    (the smoke test) reads each file once. A dataset that is not there ends the run with
    ``load``'s message (where it looked, how to download it), not a traceback.
    """
    try:
        images, labels = _load_cached(name, split, args.data_dir)
    except FileNotFoundError as error:
        raise SystemExit(str(error)) from None
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images, labels


def standardized(args, name: str, train_limit: int, test_limit: int):
    """Float32 train and test arrays standardized with the training subset's per-channel stats."""
    x_train, y_train = load(args, name, "train", train_limit)
    x_test, y_test = load(args, name, "test", test_limit)
    stats = data.Standardize.fit(x_train)
    return np.asarray(stats(x_train)), y_train, np.asarray(stats(x_test)), y_test


def run_fit(model, train_xy, test_xy, *, epochs, batch_size, seed=0, augment=None,
            batch_augment=None, **config) -> list[dict]:
    """``jcnn.train.fit`` on arrays, quietly; returns ``(per-epoch history, final TrainState)``.

    A run whose loss becomes non-finite is a result, not a crash: it returns a one-record history
    of NaNs and ``None`` for the state.
    """
    loader = data.Loader(*train_xy, batch_size=batch_size, seed=seed, augment=augment,
                         batch_augment=batch_augment)
    val = data.Loader(*test_xy, batch_size=min(500, len(test_xy[1])), shuffle=False,
                      drop_remainder=False)
    try:
        result = train.fit(model, loader, val, train.TrainConfig(
            epochs=epochs, seed=seed, progress=False, **config))
    except train.NonFiniteLossError:
        nan = float("nan")
        return [{"epoch": 1, "train_loss": nan, "train_accuracy": nan, "val_loss": nan,
                 "val_accuracy": nan}], None
    return result["history"], result["state"]


def train_curve(model, train_xy, tx, *, epochs, batch_size, seed=0):
    """Per-step loss and parameter-step norm of ``model`` trained with optimizer ``tx``.

    Returns ``(losses, step_norms, grad_norms)``, NumPy arrays of one value per step
    (``step_norms`` is ``||theta_{t+1} - theta_t||``); a non-finite loss ends the run early.
    """
    loader = data.Loader(*train_xy, batch_size=batch_size, seed=seed)
    sample, _ = loader.batch(0, 0)
    state = train.TrainState.create(model, tx, jax.random.key(seed), sample[:1])
    losses, steps, grads = [], [], []
    flat = jax.jit(lambda p: jnp.concatenate([a.ravel() for a in jax.tree.leaves(p)]))
    before = np.asarray(flat(state.params))
    for epoch in range(epochs):
        for batch in loader.epoch(epoch):
            state, metrics = train.train_step(state, batch)
            loss = float(metrics["loss"])
            after = np.asarray(flat(state.params))
            losses.append(loss)
            steps.append(float(np.linalg.norm(after - before)))
            grads.append(float(metrics["grad_norm"]))
            before = after
            if not np.isfinite(loss):
                return np.array(losses), np.array(steps), np.array(grads)
    return np.array(losses), np.array(steps), np.array(grads)


def noise_level(accuracy: float, n_test: int) -> float:
    """Two standard errors of the difference of two accuracies near ``accuracy``, each measured
    on ``n_test`` images: smaller differences are not told apart."""
    return 2 * np.sqrt(2 * accuracy * (1 - accuracy) / n_test)


def commit() -> str:
    """The checked-out commit (with ``+dirty`` when the code differs from it), or ``unknown``.

    The pages other experiments have just written (``docs/experiments/``) do not make it dirty.
    """
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                             capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ".", ":(exclude)docs/experiments"],
                               cwd=ROOT, text=True, capture_output=True).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


class Page:
    """A results page: Markdown text, tables and figures, written by :meth:`write`."""

    def __init__(self, name: str, title: str, args: argparse.Namespace):
        self.name, self.title, self.args = name, title, args
        self.parts: list[str] = []
        self.figures: list[tuple[str, object]] = []
        self.started = time.perf_counter()
        # The code that runs is the tree as it is now; at write time the page's own figures
        # (tracked files) would make any tree look modified.
        self.commit = commit()

    def text(self, markdown: str) -> None:
        self.parts.append(markdown.strip() + "\n")

    def table(self, headers, rows) -> None:
        lines = ["| " + " | ".join(headers) + " |", "|" + " --- |" * len(headers)]
        lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
        self.parts.append("\n".join(lines) + "\n")

    def figure(self, fig, stem: str, caption: str) -> None:
        filename = f"{self.name}_{stem}.png"
        self.figures.append((filename, fig))
        self.parts.append(f"![{caption}]({filename})\n\n*{caption}*\n")

    def write(self) -> Path:
        """Write the page and its figures into ``--out``.

        Everything is rendered in memory first and each file then replaces its old version
        through a rename: a run that fails here (a figure that cannot be drawn, a full disk)
        leaves the earlier page and figures whole.
        """
        out = Path(self.args.out)
        rendered = []
        try:
            for filename, fig in self.figures:
                png = io.BytesIO()
                fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
                rendered.append((out / filename, png.getvalue()))
        finally:
            for _, fig in self.figures:
                plt.close(fig)
        wall = time.perf_counter() - self.started
        script = f"experiments/{self.name}.py"
        argv = getattr(self.args, "argv", sys.argv[1:])
        command = " ".join(["python", script, *map(shlex.quote, argv)])
        full = f"python {script} --data-dir /path/to/data"
        head = [f"# {self.title}\n"]
        if self.args.quick:
            head.append(
                "!!! warning \"Quick mode\"\n    This page was written by a `--quick` smoke run "
                "(tiny data, few steps): its numbers and figures are NOT the experiment's "
                f"results. Run `{full}` for them.\n"
            )
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        head.append(
            f"Command: `{command}` · commit `{self.commit}` · {date} · "
            f"wall time {wall:.0f} s on {os.cpu_count()} CPU core(s), "
            f"{jax.devices()[0].platform} backend · full mode: `{full}`\n"
        )
        path = out / f"{self.name}.md"
        out.mkdir(parents=True, exist_ok=True)
        for figure_path, png in rendered:
            train.run_folder.write_atomically(figure_path, png)
        train.run_folder.write_atomically(path, "\n".join(head + self.parts))
        print(f"wrote {path}")
        return path


def _cell(value) -> str:
    if isinstance(value, float):
        if not np.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    return str(value)


def first_epoch_reaching(history, key: str, target: float, *, below: bool = False):
    """The first epoch (1-based) where ``history[key]`` reaches ``target``, or ``None``."""
    for record in history:
        value = record[key]
        if value is not None and (value <= target if below else value >= target):
            return record["epoch"]
    return None


def conv_net(widths, *, activation=None, norm=None, pool_every=1, num_classes=10,
             kernel_size=3, kernel_init=None):
    """A plain CNN: ``[conv 3x3 -> norm -> activation (-> max pool 2)] * len(widths)``, then
    global average pooling and a dense layer, as a ``jcnn.nn.Sequential``.

    ``norm`` is a callable ``features -> module`` (or ``None``); ``activation`` a zero-argument
    factory of the activation layer (default ``lambda: F.relu``), called once per layer so that
    learned activations get their own parameters; a 2x2 max pool follows every ``pool_every``-th
    conv.
    """
    from jcnn import functional as F
    from jcnn import nn

    layers = []
    for i, width in enumerate(widths):
        layers.append(nn.Conv(width, kernel_size, padding=kernel_size // 2,
                              use_bias=norm is None, kernel_init=kernel_init))
        if norm is not None:
            layers.append(norm(width))
        layers.append(F.relu if activation is None else activation())
        if (i + 1) % pool_every == 0:
            layers.append(nn.MaxPool(2))
    layers += [nn.GlobalAvgPool(), nn.Dense(num_classes)]
    return nn.Sequential(layers)
