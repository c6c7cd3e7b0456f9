"""Atomic checkpoints of a ``TrainState`` (through orbax-checkpoint) with keep-last-k plus best.

Layout of a checkpoint directory::

    ckpt/step_00001200/state/...      the TrainState's arrays (orbax StandardSave)
    ckpt/step_00001200/meta/...       JSON: epoch, step in epoch, history, the tracked metric
    ckpt/index.json                   finished steps and their metric (rewritten atomically)

Orbax writes each checkpoint into a temporary directory and renames it to ``step_XXXXXXXX`` only
once everything is on disk, so a crash during a save leaves at most a stray temporary directory:
the previous checkpoints stay intact and ``latest_step`` never sees the partial one. A checkpoint
that is nevertheless unreadable (truncated files, disk errors) raises ``CheckpointError`` naming
its path and the steps still available.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jcnn.functional._checks import check_positive_int

__all__ = ["CheckpointManager", "CheckpointError"]

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the state it is restored into."""


class CheckpointManager:
    """Save, list, prune and restore the checkpoints of one run.

    Args:
        directory: where the ``step_XXXXXXXX`` folders live (created if needed).
        keep_last: how many of the most recent checkpoints to keep (>= 1).
        keep_best: also keep the checkpoint with the best ``metric`` (given to ``save``).
        mode: ``"max"`` (e.g. accuracy) or ``"min"`` (e.g. loss): which metric is best.
    """

    def __init__(self, directory, *, keep_last: int = 3, keep_best: bool = True, mode="max"):
        check_positive_int(keep_last, "keep_last")
        if mode not in ("max", "min"):
            raise ValueError(f"mode: expected 'max' or 'min', got {mode!r}")
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.mode = mode
        self._checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())

    def path(self, step: int) -> Path:
        """The folder of the checkpoint at ``step``."""
        return self.directory / f"step_{int(step):08d}"

    def steps(self) -> list[int]:
        """Steps of the finished checkpoints, ascending (temporary, partial folders excluded)."""
        found = []
        for entry in self.directory.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and entry.is_dir():
                found.append(int(match.group(1)))
        return sorted(found)

    def latest_step(self) -> int | None:
        """The most recent finished checkpoint's step, or ``None``."""
        steps = self.steps()
        return steps[-1] if steps else None

    def _metrics(self) -> dict[int, float]:
        index = self.directory / "index.json"
        if not index.exists():
            return {}
        return {int(k): v for k, v in json.loads(index.read_text())["metrics"].items()}

    def best_step(self) -> int | None:
        """The step whose checkpoint has the best metric, among those still on disk."""
        present = set(self.steps())
        metrics = {s: m for s, m in self._metrics().items() if s in present and m is not None}
        if not metrics:
            return None
        pick = max if self.mode == "max" else min
        return pick(metrics, key=lambda s: (metrics[s], s))

    def _write_index(self, metrics: dict[int, float]) -> None:
        tmp = self.directory / "index.json.tmp"
        tmp.write_text(json.dumps({"metrics": {str(k): v for k, v in sorted(metrics.items())}}))
        os.replace(tmp, self.directory / "index.json")

    def save(self, step: int, state, meta: dict | None = None, metric: float | None = None) -> Path:
        """Write a checkpoint atomically, then prune to keep-last-k plus best.

        Args:
            step: the global step (names the folder; an existing one is replaced).
            state: a ``TrainState`` (its arrays are saved) or any pytree of arrays.
            meta: JSON-serializable extras (epoch, history, config...).
            metric: the value ``keep_best`` ranks by (``None``: not a candidate).

        Returns:
            The checkpoint's folder.
        """
        arrays = state.arrays() if hasattr(state, "arrays") else state
        final = self.path(step)
        lead = jax.process_index() == 0  # with several processes, one of them edits the folder
        if final.exists() and lead:
            shutil.rmtree(final)
        payload = {"meta": dict(meta or {}), "metric": metric}
        self._checkpointer.save(
            final,
            ocp.args.Composite(
                state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(payload)
            ),
        )
        if lead:
            metrics = self._metrics()
            metrics[int(step)] = None if metric is None else float(metric)
            self._write_index(metrics)
            self._prune()
        return final

    def _prune(self) -> None:
        steps = self.steps()
        keep = set(steps[-self.keep_last :])
        best = self.best_step() if self.keep_best else None
        if best is not None:
            keep.add(best)
        for step in steps:
            if step not in keep:
                shutil.rmtree(self.path(step), ignore_errors=True)
        metrics = self._metrics()
        self._write_index({s: m for s, m in metrics.items() if s in keep})

    def restore(self, template, step: int | None = None) -> tuple[Any, dict]:
        """Load a checkpoint into the structure of ``template``.

        Args:
            template: a ``TrainState`` (or pytree) with the right structure, shapes and dtypes; the
                restored arrays replace its own (its static fields are kept).
            step: which checkpoint; default the latest.

        Returns:
            ``(state, meta)``.

        Raises:
            CheckpointError: no checkpoint, or the checkpoint is corrupt / does not match.
        """
        steps = self.steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no checkpoint found in {self.directory}")
            step = steps[-1]
        path = self.path(step)
        if not path.is_dir():
            raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; have {steps}")
        arrays = template.arrays() if hasattr(template, "arrays") else template
        try:
            restored = self._checkpointer.restore(
                path,
                ocp.args.Composite(
                    state=ocp.args.StandardRestore(arrays), meta=ocp.args.JsonRestore()
                ),
            )
            leaves = jax.tree.leaves(restored["state"])
            expected = jax.tree.leaves(arrays)
            if len(leaves) != len(expected) or any(
                a.shape != b.shape or a.dtype != b.dtype
                for a, b in zip(leaves, expected, strict=True)
            ):
                raise ValueError("the stored arrays do not match the state's shapes and dtypes")
            loaded = jax.tree.unflatten(jax.tree.structure(arrays), leaves)
            payload = restored["meta"]
        except Exception as error:  # orbax/tensorstore raise many kinds; all mean the same here
            others = [s for s in steps if s != step]
            raise CheckpointError(
                f"checkpoint {path} is corrupt or incompatible and cannot be restored "
                f"({type(error).__name__}: {error}). Other checkpoints available: "
                f"{others or 'none'}"
            ) from error
        state = template.with_arrays(loaded) if hasattr(template, "with_arrays") else loaded
        return state, payload["meta"]
