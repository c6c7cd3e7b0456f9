"""Callbacks of ``fit``: a small protocol, early stopping and best-checkpoint-by-metric.

A callback is any object with some of these methods (missing ones are skipped; subclassing
``Callback`` gives no-op defaults)::

    on_train_begin(run)              once, before the first step (after a resume: after restoring)
    on_step(run, metrics)            after every optimizer step; metrics: floats of that batch
                                     (loss, accuracy, grad_norm and the extra metrics)
    on_evaluation(run, metrics)      after every evaluation of the validation set; metrics:
                                     {"step", "epoch", "val_loss", "val_accuracy", "val_<name>"...}
    on_epoch_end(run, record)        after each epoch's record (the row of history.json)
    on_train_end(run)                once, when training ends (finished or stopped)
    state_dict() -> dict             JSON-serializable state saved with every checkpoint (lists,
                                     not tuples, and str keys: it must read back as it is)
    load_state_dict(state)           restores it when ``fit`` resumes

``run`` is a ``RunContext``: the configuration, the current ``TrainState`` (read it during the call;
its buffers are reused by the next step, so copy with ``jax.device_get`` to keep anything), the
position (``step``, ``epoch``, ``batch``), the history so far, the run folder, and
``run.request_stop(reason)``, which ends training after the current step (a final record,
evaluation and checkpoint are still written).

Hooks run in the order the callbacks are given. A callback that raises stops ``fit`` with a
``CallbackError`` naming the callback, the hook and the step; nothing is written for that step, so
the run folder holds the last checkpoint and history before it, and ``resume`` continues from there.

Exact resume: ``fit`` saves every callback's ``state_dict()`` in each checkpoint and calls
``load_state_dict`` on resume, so an early-stopping counter or a best value continue as if the run
had never stopped.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jcnn.functional._checks import check_choice, check_int, check_real
from jcnn.train.run_folder import LOCK_FILE, RUN_FILES, best_directories, record_best_directory

if TYPE_CHECKING:
    from jcnn.train.loop import TrainConfig

__all__ = [
    "Callback",
    "CallbackError",
    "RunContext",
    "EarlyStopping",
    "BestCheckpoint",
    "HOOKS",
]

HOOKS = ("on_train_begin", "on_step", "on_evaluation", "on_epoch_end", "on_train_end")
"""The hooks ``fit`` calls on a callback, in the order of a run."""


class CallbackError(RuntimeError):
    """A callback raised; the message names the callback, the hook and the step."""


class RunContext:
    """What a callback sees of the run in progress (see the module docstring).

    Attributes:
        config: the ``TrainConfig``.
        state: the current ``TrainState``.
        step: optimizer steps taken so far.
        epoch: the current epoch, counted from 0.
        batch: batches done in the current epoch.
        steps_per_epoch: batches per epoch.
        history: the per-epoch records so far.
        evaluations: every validation evaluation so far (``on_evaluation``'s dicts).
        out: the run folder (a ``Path``) or ``None``.
        has_validation: whether the run evaluates a validation set.
        validation_metrics: the keys of an evaluation's metrics (``val_loss``, ``val_accuracy``,
            ``val_<name>`` for each extra metric).
        stop_reason: ``None``, or why training was asked to stop.
    """

    def __init__(
        self,
        *,
        config: TrainConfig,
        steps_per_epoch: int,
        out: str | os.PathLike | None,
        has_validation: bool,
        validation_metrics: Iterable[str],
    ) -> None:
        self.config = config
        self.state = None
        self.step = 0
        self.epoch = 0
        self.batch = 0
        self.steps_per_epoch = steps_per_epoch
        self.history: list[dict] = []
        self.evaluations: list[dict] = []
        self.out = None if out is None else Path(out)
        self.has_validation = has_validation
        self.validation_metrics = tuple(validation_metrics)
        self.stop_reason: str | None = None

    def request_stop(self, reason: str = "stopped by a callback") -> None:
        """End training after the current step (its record and checkpoint are still written);
        with ``TrainConfig.steps_per_call`` above 1, after the last step of the current call."""
        if not isinstance(reason, str) or not reason.strip():
            error = TypeError if not isinstance(reason, str) else ValueError
            raise error(
                f"reason: expected a non-empty string (it is logged and saved as the run's stop "
                f"reason), got {type(reason).__name__} {reason!r}"
            )
        if self.stop_reason is None:
            self.stop_reason = reason


class Callback:
    """Base class with no-op hooks and an empty state; override what you need."""

    def on_train_begin(self, run: RunContext) -> None:
        pass

    def on_step(self, run: RunContext, metrics: dict) -> None:
        pass

    def on_evaluation(self, run: RunContext, metrics: dict) -> None:
        pass

    def on_epoch_end(self, run: RunContext, record: dict) -> None:
        pass

    def on_train_end(self, run: RunContext) -> None:
        pass

    def state_dict(self) -> dict:
        """JSON-serializable state saved with each checkpoint (``{}``: nothing to save)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned (called when ``fit`` resumes)."""


def _check_mode(mode):
    check_choice(mode, "mode", ("min", "max"))


def _check_monitor(monitor, run: RunContext, owner: str):
    if not run.has_validation:
        raise ValueError(
            f"{owner}: monitors {monitor!r} but the run has no validation set (give fit a "
            "val_loader or TrainConfig(val_split=...))"
        )
    if monitor not in run.validation_metrics:
        raise ValueError(
            f"{owner}: monitor {monitor!r} is not an evaluation metric; expected one of "
            f"{', '.join(run.validation_metrics)}"
        )


class _Monitor(Callback):
    """The best value of one validation metric (min or max) and the step it was reached at."""

    def __init__(self, monitor: str, mode: str, min_delta: float = 0.0):
        if not isinstance(monitor, str):
            raise TypeError(f"monitor: expected a metric name (str), got {type(monitor).__name__}")
        _check_mode(mode)
        min_delta = check_real(min_delta, "min_delta", low=0)
        self.monitor = monitor
        self.mode = mode
        self.min_delta = min_delta
        self.best: float | None = None
        self.best_step: int | None = None

    def on_train_begin(self, run: RunContext) -> None:
        _check_monitor(self.monitor, run, type(self).__name__)

    def _improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def state_dict(self) -> dict:
        return {
            "monitor": self.monitor,
            "mode": self.mode,
            "best": self.best,
            "best_step": self.best_step,
        }

    def load_state_dict(self, state: dict) -> None:
        # a best value of another metric or direction would be compared as if it were this one's
        # (a checkpoint written before these were saved has neither: trusted)
        saved = (state.get("monitor", self.monitor), state.get("mode", self.mode))
        if saved != (self.monitor, self.mode):
            raise ValueError(
                f"the checkpoint holds the state of {type(self).__name__}(monitor={saved[0]!r}, "
                f"mode={saved[1]!r}), but this one has monitor={self.monitor!r}, "
                f"mode={self.mode!r}; resume with the callbacks in the same order and settings"
            )
        self.best, self.best_step = state["best"], state["best_step"]


class EarlyStopping(_Monitor):
    """Stop when a validation metric has not improved for ``patience`` evaluations in a row.

    Args:
        monitor: an evaluation metric: ``"val_loss"``, ``"val_accuracy"`` or ``"val_<name>"`` of
            an extra metric.
        mode: ``"min"`` (a loss) or ``"max"`` (an accuracy): which direction is better.
        patience: evaluations without improvement tolerated before stopping (>= 1).
        min_delta: an improvement must exceed this much.

    A run it stopped stays stopped when resumed, even with more epochs: the stop is part of the
    checkpointed run (``fit``'s summary keeps its reason); train on in a new run from its weights.

    >>> stopper = EarlyStopping("val_loss", mode="min", patience=2)
    >>> stopper.state_dict()
    {'monitor': 'val_loss', 'mode': 'min', 'best': None, 'best_step': None, 'wait': 0}
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        *,
        mode: str = "min",
        patience: int = 5,
        min_delta: float = 0.0,
    ) -> None:
        super().__init__(monitor, mode, min_delta)
        self.patience = check_int(patience, "patience", low=1)
        self.wait = 0

    def on_evaluation(self, run: RunContext, metrics: dict) -> None:
        value = float(metrics[self.monitor])
        if self._improves(value):
            self.best, self.best_step, self.wait = value, int(metrics["step"]), 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            best = (
                "never a number, only NaN"
                if self.best is None
                else f"best {self.best:.6g} at step {self.best_step}"
            )
            run.request_stop(
                f"early stopping: {self.monitor} did not improve for {self.wait} evaluations "
                f"({best})"
            )

    def state_dict(self) -> dict:
        return {**super().state_dict(), "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.wait = int(state["wait"])


class BestCheckpoint(_Monitor):
    """Save the state whenever a validation metric reaches its best value so far.

    The checkpoint goes to ``<run folder>/<directory>/step_XXXXXXXX`` (only the best one is kept),
    and ``<run folder>/best.json`` records the directory: ``jcnn.train.load_run(folder,
    which="best")`` loads it (``which=directory`` when a run has several), and ``overwrite``
    deletes it with the run.

    Args:
        monitor: an evaluation metric (``"val_accuracy"``, ``"val_loss"``, ``"val_<name>"``).
        mode: ``"max"`` or ``"min"``: which direction is better.
        directory: the folder under the run folder.
        min_delta: an improvement must exceed this much.
    """

    def __init__(
        self,
        monitor: str = "val_accuracy",
        *,
        mode: str = "max",
        directory: str = "best",
        min_delta: float = 0.0,
    ) -> None:
        super().__init__(monitor, mode, min_delta)
        taken = {LOCK_FILE, *RUN_FILES} - {"best"}
        if not isinstance(directory, str):
            raise TypeError(
                f"directory: expected a folder name (str) inside the run folder, got {directory!r}"
            )
        parts = Path(directory).parts if isinstance(directory, str) else ()
        if not parts or Path(directory).is_absolute() or ".." in parts or parts[0] in taken:
            raise ValueError(
                f"directory: expected a folder name inside the run folder, not one of the run's "
                f"own files ({', '.join(sorted(taken))}), got {directory!r}"
            )
        if directory == "latest":  # load_run(which="latest") means the last checkpoint
            raise ValueError(
                "directory: expected a folder name inside the run folder other than 'latest' "
                "(load_run(which='latest') loads the run's last checkpoint), got 'latest'"
            )
        self.directory = directory
        self._manager: Any = None

    def on_train_begin(self, run: RunContext) -> None:
        super().on_train_begin(run)
        if run.out is None:
            raise ValueError("BestCheckpoint: needs a run folder (TrainConfig(out=...))")
        self._manager = None  # a new run's is opened at the first save: fit sets up the folder
        if run.config is not None and run.config.resume:
            # a damaged best.json or best checkpoint index is reported now, before fit writes
            # anything, not at the first improvement after training has rewritten the folder
            best_directories(run.out)
            if (run.out / self.directory).is_dir():  # recorded in best.json by its first save
                self._manager = self._open(run.out)

    def _open(self, out: Path):
        from jcnn.train.checkpoint import CheckpointManager

        return CheckpointManager(out / self.directory, keep_last=1, keep_best=False)

    def on_evaluation(self, run: RunContext, metrics: dict) -> None:
        value = float(metrics[self.monitor])
        if not self._improves(value):
            return
        self.best, self.best_step = value, int(metrics["step"])
        if self._manager is None:
            record_best_directory(run.out, self.directory)
            self._manager = self._open(run.out)
        meta = {"monitor": self.monitor, "mode": self.mode, "value": value, "epoch": run.epoch}
        self._manager.save(run.step, run.state, meta, metric=value)
