"""``fit``: epochs of jit-compiled steps with evaluation, checkpoints, exact resume, a run folder.

A run folder (``config.out``) holds::

    config.json       the full configuration (``jcnn.train.run_folder.run_record``)
    .lock             held (flock) while a process owns the folder
    history.json      one record per epoch (train/val loss and accuracy, lr, time, images/s)
    history.csv       the same table
    curves.png        loss and accuracy curves
    summary.json      the final metrics (written when training ends)
    checkpoints/      atomic orbax checkpoints (keep-last-k plus best validation accuracy)

Exact resume: a checkpoint stores the ``TrainState`` (parameters, BatchNorm statistics, optimizer
state, step, key), the position ``(epoch, batch)`` and the running sums of the epoch's metrics.
Batches come from ``loader.epoch(epoch, start_step=batch)``, a pure function of
``(seed, epoch, step)`` (see ``jcnn.data.Loader``), and the dropout key of a step is
``fold_in(key, step)``, so a resumed run performs exactly the computations of an uninterrupted one
and ends with bitwise the same parameters and metrics.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

from jcnn import native
from jcnn.functional._checks import check_positive_int
from jcnn.train import parallel, run_folder
from jcnn.train import schedules as S
from jcnn.train.checkpoint import CheckpointError, CheckpointManager
from jcnn.train.optim import optimizer
from jcnn.train.state import TrainState
from jcnn.train.steps import eval_step, train_step

__all__ = ["TrainConfig", "fit", "evaluate", "build_schedule", "NonFiniteLossError"]

# Fault injection for the kill-and-resume tests: exit the process (no cleanup, like SIGKILL) right
# after this global step has completed and any checkpoint due at it has been written.
CRASH_AFTER_STEP_ENV = "JCNN_TRAIN_CRASH_AFTER_STEP"


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the message names the step."""


@dataclasses.dataclass
class TrainConfig:
    """Everything ``fit`` needs besides the model and the data.

    Attributes:
        epochs: passes over the training loader.
        optimizer: a name for ``jcnn.train.optimizer`` (sgd, momentum, nesterov, adam, ...).
        learning_rate: the base rate ``α0`` (the peak for ``one_cycle``).
        schedule: constant, step, exponential, inverse_time, cosine, linear, inverse_sqrt,
            one_cycle.
        warmup_epochs: linear warmup (in epochs, may be fractional) around the schedule.
        step_epochs: for ``schedule="step"``, the epochs at which the rate is multiplied by
            ``step_factor``.
        step_factor: see ``step_epochs``.
        decay_rate: ``k`` of exponential / inverse_time, per epoch.
        weight_decay: ``λ`` (coupled or decoupled as ``jcnn.train.optimizer`` chooses).
        momentum: momentum of momentum/nesterov/lars.
        clip_norm: global gradient-norm clipping, or ``None``.
        label_smoothing: cross-entropy label smoothing.
        compute_dtype: ``"float32"`` or ``"bfloat16"`` (parameters stay float32).
        seed: initializes the model and the dropout keys (the loader has its own seed).
        devices: data-parallel over this many devices (``None``: one device, no mesh).
        out: run folder; ``None`` writes nothing (no checkpoints, no history files).
        checkpoint_every_epochs: save at the end of every that many epochs (0: never).
        checkpoint_every_steps: also save every that many steps, mid-epoch (0: never).
        keep_last: checkpoints kept besides the best one.
        resume: continue the run in ``out`` from its latest checkpoint not known bad (the folder
            must hold that run's checkpoints and the same settings: see
            ``jcnn.train.run_folder``).
        overwrite: start over in an ``out`` that holds a run, deleting that run's files.
        progress: show a progress bar (rich).
    """

    epochs: int = 1
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    step_epochs: tuple[int, ...] = ()
    step_factor: float = 0.1
    decay_rate: float = 0.1
    weight_decay: float = 0.0
    momentum: float = 0.9
    clip_norm: float | None = None
    label_smoothing: float = 0.0
    compute_dtype: str = "float32"
    seed: int = 0
    devices: int | None = None
    out: str | None = None
    checkpoint_every_epochs: int = 1
    checkpoint_every_steps: int = 0
    keep_last: int = 3
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def to_json(self) -> dict:
        """The config as a JSON-serializable dict."""
        return dataclasses.asdict(self)


def build_schedule(config: TrainConfig, steps_per_epoch: int) -> S.Schedule:
    """The learning-rate schedule of ``config`` with epochs converted to steps."""
    total = max(1, config.epochs * steps_per_epoch)
    warmup = int(round(config.warmup_epochs * steps_per_epoch))
    horizon = max(1, total - warmup)
    lr = config.learning_rate
    name = config.schedule
    if name == "constant":
        schedule = S.constant(lr)
    elif name == "step":
        bounds = [int(e * steps_per_epoch) for e in config.step_epochs]
        schedule = S.step(lr, bounds, config.step_factor)
    elif name == "exponential":
        schedule = S.exponential(lr, config.decay_rate / steps_per_epoch)
    elif name == "inverse_time":
        schedule = S.inverse_time(lr, config.decay_rate / steps_per_epoch)
    elif name == "cosine":
        schedule = S.cosine(lr, horizon)
    elif name == "linear":
        schedule = S.linear(lr, horizon)
    elif name == "inverse_sqrt":
        schedule = S.inverse_sqrt(lr)
    elif name == "one_cycle":
        schedule = S.one_cycle(lr, horizon)
    else:
        raise ValueError(f"config.schedule: expected one of {', '.join(S.SCHEDULES)}, got {name!r}")
    return S.warmup(schedule, warmup) if warmup > 0 else schedule


def _compute_dtype(config):
    if config.compute_dtype in ("float32", None):
        return None
    if config.compute_dtype == "bfloat16":
        return jnp.bfloat16
    raise ValueError(
        f"config.compute_dtype: expected 'float32' or 'bfloat16', got {config.compute_dtype!r}"
    )


def evaluate(state: TrainState, loader, *, compute_dtype=None, mesh=None) -> dict:
    """Mean loss and accuracy of ``state`` over one pass of ``loader`` (evaluation mode).

    Args:
        state: the ``TrainState``.
        loader: yields ``(images, labels)`` from ``loader.epoch(0)`` (or plain iteration).
        compute_dtype: as for ``eval_step``.
        mesh: shard each batch over this mesh (data parallel), or ``None``.

    Returns:
        ``{"loss", "accuracy", "count"}`` over the whole pass.
    """
    loss_sum = correct = 0.0
    count = 0
    batches = loader.epoch(0) if hasattr(loader, "epoch") else loader
    for batch in batches:
        if mesh is not None:
            batch = _place_batch(batch, mesh)
        metrics = jax.device_get(eval_step(state, tuple(batch), compute_dtype=compute_dtype))
        n = int(metrics["count"])
        loss_sum += float(metrics["loss"]) * n
        correct += float(metrics["accuracy"]) * n
        count += n
    if count == 0:
        raise ValueError("loader: the evaluation loader yielded no batches")
    return {"loss": loss_sum / count, "accuracy": correct / count, "count": count}


def _place_batch(batch, mesh):
    sharding = parallel.data_sharding(mesh)
    if all(getattr(a, "sharding", None) == sharding for a in batch):
        return tuple(batch)
    return tuple(parallel.shard_batch(tuple(batch), mesh))


class _Progress:
    """A rich progress bar with loss, accuracy, learning rate and images/s (or nothing)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._bar = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def start(self, description, total, completed):
        if self._bar is not None:
            self._task = self._bar.add_task(description, total=total, completed=completed, stats="")

    def update(self, completed, stats):
        if self._bar is not None:
            self._bar.update(self._task, completed=completed, stats=stats)

    def print(self, message):
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            print(message, flush=True)


def _all_finite(batch) -> bool:
    """Whether a batch's floating arrays are all finite (a NaN input is the data's fault)."""
    return all(
        bool(jnp.isfinite(x).all())
        for x in jax.tree.leaves(batch)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    )


def _new_running() -> dict:
    """The sums behind an epoch's running train loss and accuracy (saved in checkpoints)."""
    return {"loss": 0.0, "accuracy": 0.0, "batches": 0}


def _write_history(out: Path, history: list[dict]) -> None:
    (out / "history.json").write_text(json.dumps(history, indent=1))
    if history:
        with open(out / "history.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)
    _plot_curves(out / "curves.png", history)


def _plot_curves(path: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, ax in (("loss", ax_loss), ("accuracy", ax_acc)):
        ax.plot(epochs, [h[f"train_{key}"] for h in history], "o-", label="train")
        if history and history[0].get(f"val_{key}") is not None:
            ax.plot(epochs, [h[f"val_{key}"] for h in history], "s-", label="validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _summary(history: list[dict], wall: float, progress: _Progress) -> dict:
    last = history[-1]
    vals = [h["val_accuracy"] for h in history if h.get("val_accuracy") is not None]
    summary = {
        "epochs": last["epoch"],
        "final_train_loss": last["train_loss"],
        "final_train_accuracy": last["train_accuracy"],
        "final_val_loss": last.get("val_loss"),
        "final_val_accuracy": last.get("val_accuracy"),
        "best_val_accuracy": max(vals) if vals else None,
        "wall_seconds_this_process": wall,
    }
    lines = ["summary"] + [
        f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}" for k, v in summary.items()
    ]
    progress.print("\n".join(lines))
    return summary


def fit(model, train_loader, val_loader, config: TrainConfig, *, settings=None) -> dict:
    """Train ``model`` for ``config.epochs`` epochs; evaluate, checkpoint and log each epoch.

    With ``config.out`` the run folder belongs to this call (``jcnn.train.run_folder``): it is
    locked against other processes, ``config.json`` records the full configuration, a resume with
    other settings or without checkpoints is refused, and so is a new run into a folder holding
    one unless ``config.overwrite``. A refused call raises before writing anything there.

    Args:
        model: a Flax module ``__call__(x, train: bool)`` returning logits.
        train_loader: a ``jcnn.data.Loader`` (``len``, ``epoch(e, start_step=s)``, ``batch(e, s)``)
            yielding floating images and integer or soft labels.
        val_loader: a loader for evaluation each epoch, or ``None``.
        config: a ``TrainConfig``.
        settings: what else defines the run and ``fit`` cannot see (dataset, data directory,
            standardization statistics...): plain JSON values recorded in ``config.json`` and
            compared on resume (``data_dir`` and ``command`` may change).

    Returns:
        ``{"history": [per-epoch records], "summary": {...}, "state": final TrainState}``.

    Raises:
        NonFiniteLossError: a step's loss was NaN or infinite (the message names the step and
            the newest checkpoint known good: finite, and a finite loss from its parameters).
        RunFolderError: the folder is in use, or the start was refused (see above).
        CheckpointError: the checkpoint to resume from is corrupt or does not match.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config: expected a jcnn.train.TrainConfig, got {type(config).__name__}")
    if config.out is None or jax.process_index() != 0:
        return _fit(model, train_loader, val_loader, config, settings)
    run_folder.check_start(config.out, resume=config.resume, overwrite=config.overwrite)
    with run_folder.claim(config.out):
        return _fit(model, train_loader, val_loader, config, settings)


def _fit(model, train_loader, val_loader, config: TrainConfig, settings) -> dict:
    if not hasattr(train_loader, "epoch") or not hasattr(train_loader, "__len__"):
        raise TypeError(
            "train_loader: expected a loader with len() and epoch(epoch, start_step=...), "
            f"got {type(train_loader).__name__}"
        )
    check_positive_int(config.epochs, "config.epochs")
    if (config.resume or config.overwrite) and config.out is None:
        raise ValueError(
            "config.resume, config.overwrite: expected with a run folder (config.out), got out=None"
        )
    steps_per_epoch = len(train_loader)
    if steps_per_epoch < 1:
        raise ValueError("train_loader: expected at least one batch per epoch, got 0")
    compute_dtype = _compute_dtype(config)
    schedule = build_schedule(config, steps_per_epoch)
    tx = optimizer(
        config.optimizer,
        schedule,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        clip_norm=config.clip_norm,
    )
    sample_images, _ = train_loader.batch(0, 0)
    state = TrainState.create(
        model, tx, jax.random.PRNGKey(config.seed), jnp.asarray(sample_images[:1])
    )
    mesh = parallel.make_mesh(config.devices) if config.devices else None

    out = Path(config.out) if config.out else None
    manager = None
    if out is not None:
        record = run_folder.run_record(config, model, train_loader, settings)
        run_folder.check_start(out, resume=config.resume, overwrite=config.overwrite, record=record)
        if config.overwrite and jax.process_index() == 0:
            run_folder.clear(out)
        if jax.process_count() > 1:  # nobody opens the checkpoints while process 0 clears them
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jcnn_run_folder_ready")
        manager = CheckpointManager(out / "checkpoints", keep_last=config.keep_last)

    history: list[dict] = []
    epoch, start_batch = 0, 0
    running = _new_running()
    progress = _Progress(config.progress)
    pending = None  # a checkpoint whose parameters the next step's loss will judge
    if config.resume and manager is not None:
        usable = [s for s in manager.steps() if manager.status(s) != "bad"]
        if not usable:
            raise CheckpointError(
                f"nothing to resume in {manager.directory}: every checkpoint holds non-finite "
                "values or produced a non-finite loss"
            )
        state, meta = manager.restore(state, usable[-1])
        epoch, start_batch = meta["epoch"], meta["batch"]
        running, history = meta["running"], meta["history"]
        if epoch > config.epochs:
            raise run_folder.RunFolderError(
                f"cannot resume {out}: it has already trained {epoch} epochs, more than the "
                f"{config.epochs} asked for",
                out,
            )
        pending = usable[-1]
        progress.print(
            f"resumed from {manager.path(usable[-1])} (epoch {epoch + 1}, batch {start_batch})"
        )
    if out is not None and jax.process_index() == 0:
        run_folder.write_config(out, record)  # only now: a refused start leaves the folder as is
    if mesh is not None:
        state = parallel.replicate(state, mesh)

    def save(metric=None):
        nonlocal pending
        meta = {"epoch": epoch, "batch": batch_index, "running": running, "history": history}
        # the parameters' loss on the batch they last trained on: finite or not
        check = jax.device_get(eval_step(state, tuple(batch), compute_dtype=compute_dtype))
        status = "good" if math.isfinite(float(check["loss"])) else "bad"
        manager.save(int(state.step), state, meta, metric=metric, status=status)
        pending = int(state.step)

    crash_after = int(os.environ.get(CRASH_AFTER_STEP_ENV, "-1"))
    started = time.perf_counter()
    # XLA's SPMD partitioner cannot split the oneDNN custom calls over the batch: it would gather
    # the whole batch onto every device for each convolution.
    several_devices = mesh is not None and mesh.size > 1
    with progress, native.conv_backend_scope("xla" if several_devices else None):
        while epoch < config.epochs:
            progress.start(f"epoch {epoch + 1}/{config.epochs}", steps_per_epoch, start_batch)
            epoch_start = time.perf_counter()
            images_this_process = 0
            batch_index = start_batch
            for batch in train_loader.epoch(epoch, start_step=start_batch):
                if mesh is not None:
                    batch = _place_batch(batch, mesh)
                state, metrics = train_step(
                    state,
                    tuple(batch),
                    compute_dtype=compute_dtype,
                    label_smoothing=config.label_smoothing,
                )
                loss = float(metrics["loss"])
                step = int(state.step)
                if not math.isfinite(loss):
                    kept = ""
                    if manager is not None:
                        if pending == step - 1 and _all_finite(batch):
                            manager.mark(pending, "bad")  # its parameters gave this loss
                        last = manager.last_good_step()
                        kept = (
                            f"; last good checkpoint: step {last} ({manager.path(last)})"
                            if last is not None
                            else "; no checkpoint is known good"
                        )
                    raise NonFiniteLossError(
                        f"non-finite loss ({loss}) at step {step} (epoch {epoch + 1}, batch "
                        f"{batch_index + 1}); training stopped{kept}"
                    )
                if pending is not None:
                    if pending == step - 1:
                        manager.mark(pending, "good")
                    pending = None
                batch_index += 1
                n = int(batch[0].shape[0])
                running["loss"] += loss
                running["accuracy"] += float(metrics["accuracy"])
                running["batches"] += 1
                images_this_process += n
                if batch_index % 10 == 0 or batch_index == steps_per_epoch:
                    rate = images_this_process / max(time.perf_counter() - epoch_start, 1e-9)
                    progress.update(
                        batch_index,
                        f"loss {running['loss'] / running['batches']:.4f} "
                        f"acc {running['accuracy'] / running['batches']:.4f} "
                        f"lr {float(schedule(step)):.3g} {rate:,.0f} img/s",
                    )
                if (
                    manager is not None
                    and config.checkpoint_every_steps
                    and step % config.checkpoint_every_steps == 0
                    and batch_index < steps_per_epoch
                ):
                    save()
                if step == crash_after and batch_index < steps_per_epoch:
                    os._exit(17)
            seconds = time.perf_counter() - epoch_start
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": int(state.step),
                "train_loss": running["loss"] / running["batches"],
                "train_accuracy": running["accuracy"] / running["batches"],
                "val_loss": None,
                "val_accuracy": None,
                "learning_rate": float(schedule(int(state.step))),
                "seconds": seconds,
                "images_per_second": images_this_process / max(seconds, 1e-9),
            }
            if val_loader is not None:
                val = evaluate(state, val_loader, compute_dtype=compute_dtype, mesh=mesh)
                record["val_loss"], record["val_accuracy"] = val["loss"], val["accuracy"]
            history.append(record)
            progress.print(
                f"epoch {epoch + 1}: train loss {record['train_loss']:.4f} "
                f"acc {record['train_accuracy']:.4f}"
                + (
                    f" | val loss {record['val_loss']:.4f} acc {record['val_accuracy']:.4f}"
                    if record["val_loss"] is not None
                    else ""
                )
                + f" | {record['images_per_second']:,.0f} img/s, {seconds:.1f}s"
            )
            epoch, start_batch = epoch + 1, 0
            batch_index = 0
            running = _new_running()
            if out is not None:
                if jax.process_index() == 0:
                    _write_history(out, history)
                every = config.checkpoint_every_epochs
                if every and (epoch % every == 0 or epoch == config.epochs):
                    save(metric=record["val_accuracy"])
                if int(state.step) == crash_after:
                    os._exit(17)
    summary = _summary(history, time.perf_counter() - started, progress) if history else {}
    if out is not None and jax.process_index() == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return {"history": history, "summary": summary, "state": state}
