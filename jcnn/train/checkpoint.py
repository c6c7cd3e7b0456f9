"""Atomic, verified checkpoints of a ``TrainState`` (orbax-checkpoint): keep-last-k plus best.

Layout of a checkpoint directory::

    ckpt/step_00001200/state/...         the TrainState's arrays (orbax StandardSave)
    ckpt/step_00001200/meta/...          JSON: epoch, step in epoch, history, the tracked metric
    ckpt/step_00001200/manifest.json     SHA-256 and size of every file above, and of every array
    ckpt/step_00001200/mark.json         the status recorded after the save (``mark``), if any
    ckpt/index.json                      each checkpoint's metric and status (rewritten atomically)

A save writes orbax's checkpoint into ``step_XXXXXXXX.partial``, hashes every file it wrote, adds
``manifest.json`` and only then renames the folder to ``step_XXXXXXXX``: a crash at any point
leaves at most a stray ``.partial`` folder, never a checkpoint without its manifest, and
``steps()`` never lists a partial one. A checkpoint is deleted (pruned, or replaced by a save at
its step) the same way backwards: renamed to ``step_XXXXXXXX.partial.old`` first, so a crash
while its files are deleted never leaves a half-deleted checkpoint under its name.

A restore first checks every file against the manifest (a missing, extra, truncated or changed
file raises :class:`CheckpointError` naming it), then the state's structure against the arrays
listed there (a mismatch is reported in a few lines, not as a tree dump), then restores and checks
the SHA-256 of every restored array. Opening a manager reads ``index.json`` and every manifest, so
a damaged index is reported before any training starts.

Each checkpoint has a status: ``"good"`` when its arrays are finite and a finite loss was computed
from its parameters (``fit`` evaluates the batch it last trained on before saving), ``"bad"`` when
its state holds NaN or infinity or its parameters produced a non-finite loss (given at save, or
recorded later with :meth:`CheckpointManager.mark`), else ``"unverified"``. The newest good
checkpoint is never pruned. A mark is written into the checkpoint's own folder (``mark.json``,
sealed with its SHA-256) as well as into ``index.json``, so an index that is deleted, or moved
away because it was damaged, is rebuilt from the manifests and marks without forgetting that a
checkpoint is bad.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jcnn.functional._checks import (
    _is_real_scalar,
    check_bool,
    check_choice,
    check_int,
    check_positive_int,
    check_real,
)

__all__ = ["CheckpointManager", "CheckpointError", "STATUSES"]

_STEP_DIR = re.compile(r"^step_(\d{8})$")
_PARTIAL_DIR = re.compile(r"^step_\d{8}\.partial")
_MANIFEST = "manifest.json"
_INDEX = "index.json"
_MARK = "mark.json"
_FORMAT = 1
STATUSES = ("unverified", "good", "bad")
"""A checkpoint's status: see the module docstring."""
_MAX_LISTED = 5  # problems named in one error message


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not match the state it is restored into."""


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    """Every regular file under ``folder`` but the manifest and the mark (written after it), by
    POSIX path relative to it."""
    found = {}
    for path in folder.rglob("*"):
        relative = path.relative_to(folder).as_posix()
        if relative not in (_MANIFEST, _MARK, _MARK + ".tmp") and not path.is_dir():
            found[relative] = path
    return found


def _host_value(leaf) -> np.ndarray:
    """A leaf as a host NumPy array (one replica of an array spread over several processes)."""
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        if not leaf.is_fully_replicated:
            raise CheckpointError(
                "cannot checksum an array sharded over several processes; replicate the state"
            )
        leaf = leaf.addressable_shards[0].data
    return np.asarray(jax.device_get(leaf))


def _is_key(leaf) -> bool:
    """Whether ``leaf`` is a typed PRNG key array (``jax.random.key``), which NumPy cannot hold."""
    return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key)


def _key_data(tree):
    """``tree`` with each typed PRNG key (e.g. in ``optax.add_noise``'s state) as its raw data."""
    return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, tree)


def _leaf_name(path) -> str:
    return jax.tree_util.keystr(path, simple=True, separator="/")


def _dtype(leaf):
    return leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf)  # a Python number


def _storable(tree, name: str):
    """``tree`` with NumPy scalars as 0-d arrays (orbax stores arrays and Python numbers only);
    ``TypeError``/``ValueError`` naming a leaf orbax cannot store, before anything is written."""
    leaves, structure = jax.tree_util.tree_flatten_with_path(tree)
    if not leaves:
        raise ValueError(f"{name}: expected a pytree holding at least one array, got {tree!r}")
    stored = []
    for path, leaf in leaves:
        if isinstance(leaf, np.generic):
            leaf = np.asarray(leaf)
        if not isinstance(leaf, (jax.Array, np.ndarray, bool, int, float)):
            raise TypeError(
                f"{name}: expected a pytree of arrays and numbers, got a "
                f"{type(leaf).__name__} at {_leaf_name(path) or '(root)'}"
            )
        if isinstance(leaf, (jax.Array, np.ndarray)) and leaf.dtype == object:
            raise TypeError(
                f"{name}: expected arrays of numbers, got dtype object at {_leaf_name(path)}"
            )
        if np.size(leaf) == 0:  # orbax refuses them
            raise ValueError(
                f"{name}: cannot checkpoint an array without elements, got shape "
                f"{tuple(np.shape(leaf))} at {_leaf_name(path)}"
            )
        stored.append(leaf)
    return jax.tree_util.tree_unflatten(structure, stored)


def _describe_arrays(arrays) -> tuple[list[dict], list[str]]:
    """``([{path, shape, dtype, sha256}], names of the floating arrays holding NaN or inf)``."""
    described, non_finite = [], []
    for path, leaf in jax.tree_util.tree_flatten_with_path(arrays)[0]:
        value = _host_value(leaf)
        name = _leaf_name(path)
        described.append(
            {
                "path": name,
                "shape": list(value.shape),
                "dtype": str(value.dtype),
                "sha256": hashlib.sha256(value.tobytes()).hexdigest(),
            }
        )
        if jnp.issubdtype(value.dtype, jnp.inexact) and not np.isfinite(value).all():
            non_finite.append(name)
    return described, non_finite


def _listing(problems: list[str]) -> str:
    shown = "; ".join(problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    return shown + (f"; and {more} more" if more > 0 else "")


def _short(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _seal(payload: dict) -> dict:
    """``payload`` plus the SHA-256 of its canonical JSON, so that a changed byte is detected."""
    body = json.dumps(payload, sort_keys=True).encode()
    return {**payload, "sha256": hashlib.sha256(body).hexdigest()}


def _unseal(payload) -> dict:
    """``payload`` without its seal; ``ValueError`` if the seal is missing or does not match."""
    if not isinstance(payload, dict) or not isinstance(payload.get("sha256"), str):
        raise ValueError("no checksum of its own")
    body = {k: v for k, v in payload.items() if k != "sha256"}
    if _seal(body)["sha256"] != payload["sha256"]:
        raise ValueError("its content does not match its own checksum")
    return body


def _check_json_round_trip(value, path: str) -> None:
    """Raise unless ``value`` reads back from JSON as it is: a tuple would come back a list and a
    key that is not a str would come back a str, so what is restored (a checkpoint's ``meta``, a
    callback's state) would differ from what was saved."""
    if isinstance(value, tuple):
        raise TypeError(f"{path} is a tuple, {value!r}, which JSON reads back as a list")
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_round_trip(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(
                    f"{path} has the key {key!r} ({type(key).__name__}), which JSON reads back "
                    f"as the str {json.dumps({key: 0})[1:-4]}"
                )
            _check_json_round_trip(item, f"{path}[{key!r}]")


def _check_format_and_step(record: dict, step: int) -> None:
    """A ``ValueError`` unless ``record`` is of this format and names ``step``, the step of the
    folder it was read from (a checkpoint folder copied or renamed to another step names its
    own)."""
    if record.get("format") != _FORMAT:
        raise ValueError(f"expected format {_FORMAT}, got {record.get('format')!r}")
    if record.get("step") != step:
        raise ValueError(
            f"it records step {record.get('step')!r}, not the step {step} its folder's name "
            "says (copied or renamed from another step?)"
        )


def _write_json_atomically(path: Path, payload) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class CheckpointManager:
    """Save, list, verify, prune and restore the checkpoints of one run.

    Args:
        directory: where the ``step_XXXXXXXX`` folders live (created if needed).
        keep_last: how many of the most recent checkpoints to keep (>= 1).
        keep_best: also keep the checkpoint with the best ``metric`` (given to ``save``).
        mode: ``"max"`` (e.g. accuracy) or ``"min"`` (e.g. loss): which metric is best.

    Raises:
        CheckpointError: ``index.json`` or a checkpoint's ``manifest.json`` is unreadable.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep_last: int = 3,
        keep_best: bool = True,
        mode: str = "max",
    ) -> None:
        keep_last = check_positive_int(keep_last, "keep_last")
        keep_best = check_bool(keep_best, "keep_best")
        check_choice(mode, "mode", ("max", "min"))
        if not isinstance(directory, (str, os.PathLike)):
            raise TypeError(
                f"directory: expected a folder path (str or os.PathLike), got {directory!r}"
            )
        self.directory = Path(directory).expanduser().absolute()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise CheckpointError(
                f"directory: expected a folder for the checkpoints, got {self.directory}, which "
                "exists and is a file (or lies under one)"
            ) from None
        self.keep_last = keep_last
        self.keep_best = keep_best
        self.mode = mode
        self._checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
        self._statuses = self._read_index()
        for step in self.steps():
            self.manifest(step)
            marks = {self._statuses.get(step), self._read_mark(step)}
            if "bad" in marks or "good" in marks:
                self._statuses[step] = "bad" if "bad" in marks else "good"

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

    # ---- metadata --------------------------------------------------------------------------

    def _read_index(self) -> dict[int, str]:
        index = self.directory / _INDEX
        if not index.exists():
            return {}
        try:
            payload = _unseal(json.loads(index.read_text()))
            if payload.get("format") != _FORMAT or not isinstance(payload["checkpoints"], dict):
                raise ValueError(f"expected format {_FORMAT} with a 'checkpoints' table")
            statuses = {}
            for key, entry in payload["checkpoints"].items():
                if entry.get("status") not in STATUSES:
                    raise ValueError(f"step {key}: unknown status {entry.get('status')!r}")
                statuses[int(key)] = entry["status"]
            return statuses
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(
                f"{index} is unreadable ({type(error).__name__}: {_short(error)}); the checkpoint "
                "index is damaged. Move it away to rebuild it from the checkpoints' manifests and "
                "marks."
            ) from error

    def manifest(self, step: int) -> dict:
        """The manifest of the checkpoint at ``step`` (checksums, metric, finiteness).

        Raises:
            CheckpointError: the manifest is missing or unreadable.
        """
        step = check_int(step, "step", low=0)
        if not self.path(step).is_dir():
            raise CheckpointError(
                f"no checkpoint at step {step} in {self.directory}; have {self.steps()}"
            )
        path = self.path(step) / _MANIFEST
        try:
            manifest = _unseal(json.loads(path.read_text()))
            _check_format_and_step(manifest, step)
            for key in ("files", "arrays", "non_finite"):
                if not isinstance(manifest[key], (dict if key == "files" else list)):
                    raise ValueError(f"{key!r} has the wrong type")
            if manifest["status"] not in STATUSES:
                raise ValueError(f"unknown status {manifest['status']!r}")
            metric = manifest["metric"]
            if metric is not None and not isinstance(metric, (int, float)):
                raise ValueError("'metric' is not a number")
        except FileNotFoundError as error:
            raise CheckpointError(
                f"checkpoint {self.path(step)} has no {_MANIFEST}: it cannot be verified "
                "(damaged, or not written by jcnn's CheckpointManager)"
            ) from error
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise CheckpointError(
                f"checkpoint {self.path(step)}: {_MANIFEST} is unreadable "
                f"({type(error).__name__}: {_short(error)})"
            ) from error
        return manifest

    def _read_mark(self, step: int) -> str | None:
        """The status ``mark`` recorded in the checkpoint's folder, or ``None``."""
        path = self.path(step) / _MARK
        try:
            mark = _unseal(json.loads(path.read_text()))
            _check_format_and_step(mark, step)
            if mark.get("status") not in ("good", "bad"):
                raise ValueError(f"unknown status {mark.get('status')!r}")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, AttributeError) as error:
            raise CheckpointError(
                f"checkpoint {self.path(step)}: {_MARK} is unreadable "
                f"({type(error).__name__}: {_short(error)}); it records whether the checkpoint "
                "is good or bad"
            ) from error
        return mark["status"]

    def status(self, step: int) -> str:
        """``"unverified"``, ``"good"`` or ``"bad"`` (see the module docstring)."""
        manifest, marked = self.manifest(step), self._statuses.get(int(step))
        if manifest["status"] == "bad" or marked == "bad":
            return "bad"
        return "good" if "good" in (manifest["status"], marked) else "unverified"

    def mark(self, step: int, status: str) -> None:
        """Record (in the checkpoint's ``mark.json`` and in ``index.json``) that the checkpoint at
        ``step`` is ``"good"`` or ``"bad"``.

        ``"good"``: a finite loss was computed from its parameters; ``"bad"``: a non-finite one.
        A ``"bad"`` checkpoint stays bad.
        """
        if status not in ("good", "bad"):
            raise ValueError(f"status: expected 'good' or 'bad', got {status!r}")
        if self.status(step) in ("bad", status):
            return
        self._statuses[int(step)] = status
        if jax.process_index() == 0:
            mark = {"format": _FORMAT, "step": int(step), "status": status}
            _write_json_atomically(self.path(step) / _MARK, _seal(mark))
            self._write_index()

    def last_good_step(self) -> int | None:
        """The newest checkpoint whose status is ``"good"``, or ``None``."""
        good = [s for s in self.steps() if self.status(s) == "good"]
        return good[-1] if good else None

    def resume_step(self) -> int | None:
        """The newest checkpoint not marked ``"bad"`` (the one a resume restores), or ``None``."""
        usable = [s for s in self.steps() if self.status(s) != "bad"]
        return usable[-1] if usable else None

    def metric(self, step: int) -> float | None:
        """The metric the checkpoint at ``step`` was saved with."""
        return self.manifest(step)["metric"]

    def best_step(self) -> int | None:
        """The step whose checkpoint has the best metric (``"bad"`` ones excluded)."""
        metrics = {
            s: self.metric(s)
            for s in self.steps()
            if self.metric(s) is not None and self.status(s) != "bad"
        }
        if not metrics:
            return None
        pick = max if self.mode == "max" else min
        return pick(metrics, key=lambda s: (metrics[s], s))

    def _write_index(self) -> None:
        table = {str(s): {"metric": self.metric(s), "status": self.status(s)} for s in self.steps()}
        payload = _seal({"format": _FORMAT, "checkpoints": table})
        _write_json_atomically(self.directory / _INDEX, payload)

    # ---- save ------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: Any,
        meta: dict | None = None,
        metric: float | None = None,
        *,
        status: str = "unverified",
    ) -> Path:
        """Write a checkpoint atomically with its manifest, then prune to keep-last-k plus best.

        Args:
            step: the global step (names the folder; an existing one is replaced).
            state: a ``TrainState`` (its arrays are saved) or any pytree of arrays.
            meta: JSON-serializable extras (epoch, history, config...), restored as given: str
                keys and lists (a tuple or a key of another type is a ``TypeError``).
            metric: the value ``keep_best`` ranks by (``None``, NaN or infinity: not a candidate).
            status: ``"good"`` if the caller computed a finite loss from these parameters,
                ``"bad"`` if a non-finite one, else ``"unverified"``. Arrays holding NaN or
                infinity make it ``"bad"`` whatever is given.

        Returns:
            The checkpoint's folder.
        """
        step = check_int(step, "step", low=0, high=99_999_999)
        if status not in STATUSES:
            raise ValueError(f"status: expected one of {', '.join(STATUSES)}, got {status!r}")
        if metric is not None:
            if _is_real_scalar(metric) and math.isnan(float(metric)):
                metric = None  # a NaN (a diverged validation loss) ranks nowhere, like infinity
            else:
                metric = check_real(metric, "metric", finite=False)
                if not math.isfinite(metric):
                    metric = None
        try:
            json.dumps(dict(meta or {}))
        except (TypeError, ValueError) as error:
            raise TypeError(f"meta: expected a JSON-serializable dict ({error})") from error
        _check_json_round_trip(dict(meta or {}), "meta")  # restore gives back what was saved
        arrays = _storable(
            _key_data(state.arrays() if hasattr(state, "arrays") else state), "state"
        )
        final = self.path(step)
        staging = final.with_name(final.name + ".partial")
        lead = jax.process_index() == 0  # with several processes, one of them edits the folder
        if lead:
            self._remove_partials(final.name)
        _sync("jcnn_checkpoint_save_start")
        described, non_finite = _describe_arrays(arrays)
        payload = {"meta": dict(meta or {}), "metric": metric}
        self._checkpointer.save(
            staging,
            ocp.args.Composite(
                state=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(payload)
            ),
        )
        if lead:
            files = {
                name: {"size": path.stat().st_size, "sha256": _sha256_file(path)}
                for name, path in sorted(_files(staging).items())
            }
            manifest = {
                "format": _FORMAT,
                "step": step,
                "metric": metric,
                "non_finite": non_finite,
                "status": "bad" if non_finite else status,
                "arrays": described,
                "files": files,
            }
            _write_json_atomically(staging / _MANIFEST, _seal(manifest))
            if final.exists():
                self._discard(final)
            os.rename(staging, final)
            _fsync_dir(self.directory)
            self._statuses.pop(step, None)
            self._prune()
            self._write_index()
        _sync("jcnn_checkpoint_save_end")
        return final

    def _remove_partials(self, prefix: str | None = None) -> None:
        for entry in self.directory.iterdir():
            if _PARTIAL_DIR.match(entry.name) and (prefix is None or entry.name.startswith(prefix)):
                shutil.rmtree(entry, ignore_errors=True)

    def _discard(self, folder: Path) -> None:
        """Delete a checkpoint's folder: renamed out of ``steps()`` first (one atomic step), so
        that a crash while its files go leaves a stray partial folder, not a checkpoint without
        its manifest, which would stop every later open of the manager."""
        trash = folder.with_name(folder.name + ".partial.old")
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(folder, trash)
        _fsync_dir(self.directory)
        shutil.rmtree(trash, ignore_errors=True)

    def _prune(self) -> None:
        steps = self.steps()
        keep = set(steps[-self.keep_last :])
        best = self.best_step() if self.keep_best else None
        good = self.last_good_step()
        keep |= {s for s in (best, good) if s is not None}
        for step in steps:
            if step not in keep:
                self._discard(self.path(step))
                self._statuses.pop(step, None)
        self._remove_partials()

    # ---- verify and restore ----------------------------------------------------------------

    def _error(self, step: int, what: str) -> CheckpointError:
        others = [s for s in self.steps() if s != step]
        return CheckpointError(
            f"checkpoint {self.path(step)} is corrupt or incompatible and cannot be restored: "
            f"{what}. Other checkpoints available: {others or 'none'}"
        )

    def verify(self, step: int | None = None) -> dict:
        """Check every file of a checkpoint against its manifest; return the manifest.

        Args:
            step: which checkpoint; default the latest.

        Raises:
            CheckpointError: naming each file that is missing, unexpected, truncated or changed.
        """
        step = self._resolve(step)
        folder = self.path(step)
        try:
            manifest = self.manifest(step)
        except CheckpointError as error:
            raise self._error(step, str(error)) from error
        expected = manifest["files"]
        found = _files(folder)
        problems = [f"{name} is missing" for name in sorted(expected.keys() - found.keys())]
        problems += [f"{name} is not in the manifest" for name in sorted(found.keys() - expected)]
        for name in sorted(expected.keys() & found.keys()):
            size, want = found[name].stat().st_size, expected[name]
            if size != want["size"]:
                problems.append(f"{name} has {size} bytes, expected {want['size']}")
            elif _sha256_file(found[name]) != want["sha256"]:
                problems.append(f"{name} differs from its SHA-256 in the manifest")
        if problems:
            raise self._error(step, "failed its integrity check: " + _listing(problems))
        return manifest

    def _resolve(self, step: int | None) -> int:
        steps = self.steps()
        if step is None:
            if not steps:
                raise CheckpointError(f"no checkpoint found in {self.directory}")
            return steps[-1]
        step = check_int(step, "step", low=0)
        if not self.path(step).is_dir():
            raise CheckpointError(f"no checkpoint at step {step} in {self.directory}; have {steps}")
        return step

    def restore(self, template: Any, step: int | None = None) -> tuple[Any, dict]:
        """Load a verified checkpoint into the structure of ``template``.

        Args:
            template: a ``TrainState`` (or pytree) with the right structure, shapes and dtypes; the
                restored arrays replace its own (its static fields are kept).
            step: which checkpoint; default the latest.

        Returns:
            ``(state, meta)``.

        Raises:
            CheckpointError: no checkpoint; a file fails its checksum; the checkpoint holds other
                arrays than ``template``; a restored array differs from the one saved.
        """
        step = self._resolve(step)
        manifest = self.verify(step)
        typed = template.arrays() if hasattr(template, "arrays") else template
        arrays = _storable(_key_data(typed), "template")
        flat, structure = jax.tree_util.tree_flatten_with_path(arrays)
        stored = {entry["path"]: entry for entry in manifest["arrays"]}
        wanted = {
            _leaf_name(path): (list(np.shape(leaf)), str(np.dtype(_dtype(leaf))))
            for path, leaf in flat
        }
        problems = [f"{name} is only in the checkpoint" for name in stored if name not in wanted]
        problems += [f"{name} is not in the checkpoint" for name in wanted if name not in stored]
        for name, (shape, dtype) in wanted.items():
            entry = stored.get(name)
            if entry is not None and (entry["shape"], entry["dtype"]) != (shape, dtype):
                problems.append(
                    f"{name} is {entry['dtype']}{tuple(entry['shape'])} in the checkpoint, "
                    f"{dtype}{tuple(shape)} in the state"
                )
        if problems:
            raise self._error(
                step, "it holds other arrays than the state restored into: " + _listing(problems)
            )
        try:
            restored = self._checkpointer.restore(
                self.path(step),
                ocp.args.Composite(
                    state=ocp.args.StandardRestore(arrays), meta=ocp.args.JsonRestore()
                ),
            )
            leaves = jax.tree.leaves(restored["state"])
            payload = restored["meta"]
        except Exception as error:  # orbax/tensorstore raise many kinds; all mean the same here
            raise self._error(step, f"{type(error).__name__}: {_short(error)}") from error
        changed = []
        for (path, _), leaf in zip(flat, leaves, strict=True):
            name = _leaf_name(path)
            digest = hashlib.sha256(_host_value(leaf).tobytes()).hexdigest()
            if digest != stored[name]["sha256"]:
                changed.append(f"{name} differs from the array saved")
        if changed:
            raise self._error(step, "restored arrays fail their checksums: " + _listing(changed))
        leaves = [  # the keys saved as their data are keys again, of the template's kind
            jax.random.wrap_key_data(leaf, impl=jax.random.key_impl(like))
            if _is_key(like)
            else leaf
            for leaf, like in zip(leaves, jax.tree.leaves(typed), strict=True)
        ]
        loaded = jax.tree.unflatten(structure, leaves)
        state = template.with_arrays(loaded) if hasattr(template, "with_arrays") else loaded
        return state, payload["meta"]


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _fsync_dir(path: Path) -> None:
    try:
        handle = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)
