"""Reloadable runs: what ``fit`` records of a model and its standardization, and ``load_run``.

``fit`` writes into the run folder ``run.json`` (the model's class and fields, so it can be
rebuilt; the input shape; metadata such as the dataset) and ``standardize.npz`` (the statistics
applied to the images). ``load_run(folder)`` reads them back with a checkpoint's variables::

    run = jcnn.train.load_run("runs/lenet5-mnist", which="best")
    logits = run.predict(raw_test_images)          # standardized as in training
    report = run.evaluate(raw_test_images, labels) # loss, accuracy, per class, confusion matrix

A model whose class cannot be imported again (defined in a script's ``__main__``, or with fields
that are not plain values) is rebuilt by the caller: ``load_run(folder, model=MyNet(...))``.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcnn.data.standardize import MODES as STANDARDIZE_MODES
from jcnn.functional._checks import (
    check_bool,
    check_int,
    check_positive_int,
    float32_or_wider,
    is_int,
)
from jcnn.train.protocol import check_labels
from jcnn.train.run_folder import BEST_FILE, RunFolderError, best_directories
from jcnn.train.steps import _cast_floats, batch_loss, check_loss_fn

__all__ = ["Run", "RunFolderError", "load_run", "describe_model", "STANDARDIZE_FILE"]

RUN_FILE = "run.json"
STANDARDIZE_FILE = "standardize.npz"
"""The run folder's file of the standardization statistics ``fit`` fitted."""


def qualified_name(obj) -> str:
    """``module.QualName`` of a class, a function or an object's class."""
    target = (
        obj
        if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__")
        else type(obj)
    )
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def _resolve(path: str):
    module_name, _, attribute = path.rpartition(".")
    parts = []
    while module_name:
        try:
            obj = importlib.import_module(module_name)
        except ImportError:
            module_name, _, head = module_name.rpartition(".")
            parts.insert(0, head)
            continue
        for name in [*parts, attribute]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(f"cannot import {path}")


class _NotRebuildable(Exception):
    pass


def _encode(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"__dict__": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, nn.Module):
        return {"__module__": describe_model(value, nested=True)}
    if isinstance(value, type) or callable(value):
        path = qualified_name(value)
        try:
            if path.startswith("__main__.") or _resolve(path) is not value:
                raise _NotRebuildable(path)
        except Exception as error:
            raise _NotRebuildable(f"{path} cannot be imported by name") from error
        return {"__ref__": path}
    raise _NotRebuildable(f"a field holds a {type(value).__name__}")


def _decode(value):
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if not isinstance(value, dict):
        return value
    if "__tuple__" in value:
        return tuple(_decode(v) for v in value["__tuple__"])
    if "__dict__" in value:
        return {k: _decode(v) for k, v in value["__dict__"].items()}
    if "__module__" in value:
        return _build(value["__module__"])
    if "__ref__" in value:
        return _resolve(value["__ref__"])
    raise ValueError(f"unknown encoded value {value!r}")


def describe_model(model, *, nested: bool = False) -> dict:
    """The model's class path and constructor fields, as JSON (raises if it cannot be rebuilt).

    An initializer field that cannot be named (a closure such as ``init.from_array(kernel)``) is
    left out and listed under ``init_only``: the rebuilt model takes its default, which changes
    nothing once the parameters are loaded from a checkpoint.
    """
    cls = type(model)
    path = qualified_name(cls)
    if path.startswith("__main__."):
        raise _NotRebuildable(f"{path} is defined in __main__")
    fields, skipped = {}, []
    for field in dataclasses.fields(model):
        if not field.init or field.name == "parent" or (field.name == "name" and not nested):
            continue
        value = getattr(model, field.name)
        if field.name == "name" and value is None:
            continue
        try:
            fields[field.name] = _encode(value)
        except _NotRebuildable:
            if not _init_only(field):
                raise
            skipped.append(field.name)
    description = {"class": path, "fields": fields}
    if skipped:
        description["init_only"] = skipped
    return description


def _init_only(field) -> bool:
    """An initializer field (``kernel_init``, ``whiten_init``...) with a default: it shapes only
    ``init``, so a model rebuilt to load a checkpoint may take the default instead."""
    has_default = field.default is not dataclasses.MISSING
    return field.name.endswith("_init") and has_default


def _without_init_only(model, description: dict):
    """``model`` with the initializer fields its description skipped set to their defaults."""
    names = description.get("init_only", ())
    defaults = {f.name: f.default for f in dataclasses.fields(model) if f.name in names}
    return model.clone(**defaults) if defaults else model


def _build(description: dict):
    cls = _resolve(description["class"])
    # run.json names what is called here: anything but a module class would be run with the
    # file's fields as arguments (os.system, a class whose constructor writes files...)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        got = f"the class {cls.__qualname__}" if isinstance(cls, type) else type(cls).__name__
        raise TypeError(
            f"{description['class']}: expected a Flax module class (flax.linen.Module), got {got}"
        )
    return cls(**{k: _decode(v) for k, v in description["fields"].items()})


def run_description(model, sample_images, metadata) -> dict:
    """What ``fit`` writes to ``run.json``: the model (if it can be rebuilt), input, metadata."""
    entry: dict[str, Any] = {"class": qualified_name(model)}
    try:
        entry = describe_model(model)
        if _build(entry) != _without_init_only(model, entry):
            raise _NotRebuildable("rebuilding it from its fields gives a different module")
        entry["rebuildable"] = True
    except Exception as error:  # any field that cannot round-trip: record why
        entry.update(rebuildable=False, reason=str(error) or type(error).__name__)
    return {
        "model": entry,
        "input": {"shape": list(sample_images.shape[1:]), "dtype": str(sample_images.dtype)},
        "metadata": metadata or {},
    }


def save_standardize(path: Path, stats) -> None:
    """Write a ``jcnn.data.Standardize`` to ``path`` (``.npz``) atomically."""
    arrays = {"mean": np.asarray(stats.mean), "scale": np.asarray(stats.scale)}
    if stats.projection is not None:
        arrays["projection"] = np.asarray(stats.projection)
    buffer = io.BytesIO()
    np.savez(buffer, mode=np.asarray(stats.mode), **arrays)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buffer.getvalue())
    os.replace(tmp, path)


def load_standardize(path: Path):
    """The ``jcnn.data.Standardize`` saved by ``save_standardize``."""
    from jcnn.data import Standardize

    try:
        with np.load(path) as stored:
            projection = stored["projection"] if "projection" in stored else None
            for name in ("mean", "scale", "projection"):
                if name in stored and not np.issubdtype(stored[name].dtype, np.floating):
                    raise TypeError(
                        f"{name}: expected floating statistics, got {stored[name].dtype}"
                    )
            return Standardize(
                jnp.asarray(stored["mean"]),
                jnp.asarray(stored["scale"]),
                None if projection is None else jnp.asarray(projection),
                str(stored["mode"]),
            )
    except Exception as error:
        raise RunFolderError(f"{path} is unreadable ({type(error).__name__}: {error})") from error


def _check_images(images) -> None:
    from jcnn.data.standardize import _check_real_images

    _check_real_images(images, "images")
    if len(images.shape) < 1 or images.shape[0] < 1:
        raise ValueError(
            f"images: expected a batch of at least one image (N, ...), got shape "
            f"{tuple(images.shape)}"
        )


@dataclasses.dataclass
class Run:
    """A trained model loaded from its run folder, ready for inference.

    Attributes:
        folder: the run folder.
        model: the Flax module.
        variables: ``{"params": ..., "batch_stats": ...}`` of the chosen checkpoint.
        standardize: the ``jcnn.data.Standardize`` applied in training, or ``None``.
        config: the ``TrainConfig`` as recorded (a dict: the ``train`` table of ``config.json``).
        metadata: what the run recorded (e.g. ``{"dataset": "mnist"}`` for ``jcnn-train``).
        step: the checkpoint's step.
        which: ``"latest"``, ``"best"`` or the step asked for.
        input_shape: the shape of one input of the model as the run recorded it: a training
            image ``(H, W, C)``, or ``(K,)`` for a ``"pca"`` run (its principal components).
    """

    folder: Path
    model: Any
    variables: dict
    standardize: Any
    config: dict
    metadata: dict
    step: int
    which: str | int
    input_shape: tuple[int, ...] | None = None

    def predict(
        self, images: np.ndarray | jax.Array, *, batch_size: int = 1000, standardized: bool = False
    ) -> np.ndarray:
        """Logits ``(N, K)`` of ``images`` (raw, standardized here unless ``standardized``),
        computed in the run's ``compute_dtype`` as its evaluations were: float32, or float64 for a
        float64 model (``jax_enable_x64``)."""
        _check_images(images)
        if hasattr(batch_size, "dtype") and getattr(batch_size, "shape", None) == ():
            batch_size = check_int(batch_size, "batch_size")  # a 0-d integer array: its int
        batch_size = check_positive_int(batch_size, "batch_size")
        standardized = check_bool(standardized, "standardized")
        standardize = self.standardize is not None and not standardized
        shape = tuple(images.shape)
        if standardize:  # its shape check, on the whole array rather than on its first batch
            raw = jax.ShapeDtypeStruct(images.shape, images.dtype)
            shape = tuple(jax.eval_shape(self.standardize, raw).shape)
        # the model's input is the standardized images: "pca" flattens (N, H, W, C) to (N, K)
        if self.input_shape is not None and len(shape) != len(self.input_shape) + 1:
            became = f" (standardized to {shape})" if standardize else ""
            raise ValueError(
                f"images: expected a batch (N, {', '.join(map(str, self.input_shape))}) like the "
                f"run's training images, got shape {tuple(images.shape)}{became}"
            )
        compute_dtype = jnp.bfloat16 if self.config["compute_dtype"] == "bfloat16" else None

        @jax.jit
        def apply(variables, x):  # in one call, as eval_step casts (XLA may keep excess precision)
            if compute_dtype is not None:  # the parameters only: not the BatchNorm statistics
                variables = {
                    **variables,
                    "params": _cast_floats(variables["params"], compute_dtype),
                }
                x = x.astype(compute_dtype)
            logits = self.model.apply(variables, x, train=False)
            return logits.astype(float32_or_wider(logits.dtype))

        outputs = []
        for start in range(0, images.shape[0], batch_size):
            x = jnp.asarray(images[start : start + batch_size])
            if standardize:
                x = self.standardize(x)
            try:
                logits = apply(self.variables, x)
            except flax.errors.ScopeParamShapeError as error:  # images the weights cannot take
                trained = "" if self.input_shape is None else f" on {tuple(self.input_shape)}"
                raise ValueError(
                    f"images: expected images the model trained{trained} can take, got shape "
                    f"{tuple(images.shape)} ({str(error).split(' (https')[0]})"
                ) from None
            outputs.append(np.asarray(logits))
        return np.concatenate(outputs)

    def evaluate(
        self,
        images: np.ndarray | jax.Array,
        labels: np.ndarray | jax.Array,
        *,
        batch_size: int = 1000,
        standardized: bool = False,
        loss: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    ) -> dict[str, Any]:
        """Loss, accuracy, per-class accuracy and the confusion matrix on ``(images, labels)``.

        ``loss``: ``(logits, labels) -> per-example (N,) or mean () loss``, as ``fit`` takes it;
        ``None``: cross-entropy. A run folder does not record ``fit``'s ``loss``: pass the same
        one to report the loss ``fit`` reported.

        Returns:
            ``{"loss", "accuracy", "count", "per_class_accuracy": [K] (None for a class with no
            example), "confusion_matrix": [[K x K]]}`` (rows: true class, columns: predicted).
        """
        from jcnn import functional as F

        _check_images(images)
        loss = check_loss_fn(loss, "loss")  # before the predictions it would waste
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise ValueError(
                f"labels: expected integer classes ({images.shape[0]},), got {labels.shape}"
            )
        if not (np.issubdtype(labels.dtype, np.integer) or labels.size == 0):
            raise TypeError(f"labels: expected integer classes, got dtype {labels.dtype}")
        logits = self.predict(images, batch_size=batch_size, standardized=standardized)
        classes = logits.shape[-1]
        check_labels(labels, classes, "labels")
        predicted = logits.argmax(-1)
        confusion = np.zeros((classes, classes), np.int64)
        np.add.at(confusion, (labels, predicted), 1)
        totals = confusion.sum(1)
        per_class = [
            None if totals[c] == 0 else float(confusion[c, c] / totals[c]) for c in range(classes)
        ]
        logits, labels_array = jnp.asarray(logits), jnp.asarray(labels, jnp.int32)
        if loss is None:
            value = F.cross_entropy(logits, labels_array)
        else:
            value = batch_loss(loss, logits, labels_array)
        return {
            "loss": float(value),
            "accuracy": float(np.mean(predicted == labels)),
            "count": int(labels.shape[0]),
            "per_class_accuracy": per_class,
            "confusion_matrix": confusion.tolist(),
        }


def _not_a_run(folder: Path, why: str) -> RunFolderError:
    return RunFolderError(
        f"{folder} is not a jcnn run folder ({why}); expected the folder fit or jcnn-train wrote "
        "(config.json, run.json, checkpoints/)"
    )


def _manager(directory: Path, mode: str = "max"):
    from jcnn.train.checkpoint import CheckpointError, CheckpointManager

    try:
        return CheckpointManager(directory, mode=mode)
    except CheckpointError as error:
        raise RunFolderError(f"{directory} is unreadable ({error})") from error


def _pick_step(folder: Path, which, mode: str):
    """``(manager, step)`` of the checkpoint ``which`` names; ``mode``: ``config.monitor_mode``,
    which direction of the checkpoints' metric is best."""
    manager = _manager(folder / "checkpoints", mode)
    if isinstance(which, (int, np.integer)) and not isinstance(which, bool):
        if int(which) not in manager.steps():
            raise RunFolderError(f"which: no checkpoint at step {which}; have {manager.steps()}")
        return manager, int(which)
    if which == "latest":
        if not manager.steps():
            raise _not_a_run(folder, "no checkpoint in checkpoints/")
        usable = [s for s in manager.steps() if manager.status(s) != "bad"]
        if not usable:
            raise RunFolderError(
                f"{folder}: every checkpoint holds non-finite values or produced a non-finite "
                "loss; load one by its step to inspect it"
            )
        return manager, usable[-1]
    directories = best_directories(folder)
    if which == "best" and len(directories) > 1 and "best" not in directories:
        raise RunFolderError(
            f"which='best': {folder} holds the best checkpoints of several BestCheckpoint "
            f"callbacks ({', '.join(directories)}); name one, e.g. which={directories[0]!r}"
        )
    if which in directories or (which == "best" and directories):
        directory = folder / (which if which in directories else directories[0])
        best = _manager(directory) if directory.is_dir() else None
        if best is None or best.latest_step() is None:
            raise RunFolderError(
                f"which={which!r}: the best checkpoint's folder {directory} (recorded in "
                f"{BEST_FILE}) is missing or holds no checkpoint"
            )
        return best, best.latest_step()
    if which == "best":  # a run without best.json: a BestCheckpoint saved into best/ if any
        best_dir = folder / "best"
        if best_dir.is_dir():
            best = _manager(best_dir)
            if best.latest_step() is not None:
                return best, best.latest_step()
        step = manager.best_step()
        if step is None:
            raise RunFolderError(
                f"which='best': {folder} has no best checkpoint (no checkpoint has a validation "
                "metric to rank by: the run had no validation set, or stopped before its first "
                "validation); use which='latest'"
            )
        return manager, step
    named = "".join(f", {d!r}" for d in directories if d != "best")  # "best" is listed already
    raise ValueError(f"which: expected 'latest', 'best'{named} or a step (int), got {which!r}")


def _verify(manager, step: int) -> Path:
    """The checkpoint's folder, once every file matches its manifest (never half-read)."""
    from jcnn.train.checkpoint import CheckpointError

    path = manager.path(step)
    try:
        manager.verify(step)
    except CheckpointError as error:
        raise RunFolderError(f"checkpoint {path} is corrupt or unreadable ({error})") from error
    return path


def _restore_variables(path: Path, template: dict) -> dict:
    import orbax.checkpoint as ocp

    try:
        checkpointer = ocp.StandardCheckpointer()
        # onto this process's first device: restored as saved, a checkpoint of a data-parallel run
        # asks for the devices it was sharded over, and a machine with fewer cannot load it
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        saved = ocp.StandardCheckpointHandler().metadata(path / "state").tree
        target = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), saved
        )
        arrays = checkpointer.restore(path / "state", target)
        restored = {"params": arrays["params"]}
        if template.get("batch_stats"):
            restored["batch_stats"] = arrays["batch_stats"]
    except Exception as error:
        raise RunFolderError(
            f"checkpoint {path} is corrupt or unreadable ({type(error).__name__}: {error})"
        ) from error
    # a float64 run's variables without jax_enable_x64 would come back rounded to float32
    too_wide = [
        f"{jax.tree_util.keystr(k)} ({np.dtype(leaf.dtype)})"
        for k, leaf in jax.tree_util.tree_flatten_with_path({k: saved[k] for k in restored})[0]
        if jax.dtypes.canonicalize_dtype(leaf.dtype) != np.dtype(leaf.dtype)
    ]
    if too_wide:
        raise RunFolderError(
            f"checkpoint {path} holds 64-bit variables, which JAX would round to 32 bits without "
            f"jax_enable_x64: {', '.join(too_wide[:3])}{', ...' if len(too_wide) > 3 else ''}; "
            "load it with jax.config.update('jax_enable_x64', True) (or jax.enable_x64(True))"
        )
    want = jax.tree_util.tree_flatten_with_path({k: template[k] for k in restored})[0]
    got = jax.tree_util.tree_flatten_with_path(restored)[0]
    describe = lambda leaves: {jax.tree_util.keystr(k): tuple(v.shape) for k, v in leaves}  # noqa: E731
    if describe(want) != describe(got):
        raise RunFolderError(
            f"checkpoint {path} does not match the model: its variables are {describe(got)}, the "
            f"model's are {describe(want)}"
        )
    return jax.tree.map(jnp.asarray, restored)


def _read_json(path: Path):
    """The JSON in ``path``; a ``ValueError`` naming the file if it is unreadable or not JSON."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path.name}: {type(error).__name__}: {error}") from error


_CONFIG_KEYS = {
    "epochs": "a positive int",
    "seed": "an int",
    "monitor": "a metric's name",
    "monitor_mode": "'max' or 'min'",
    "standardize": f"null or one of {', '.join(map(repr, STANDARDIZE_MODES))}",
    "compute_dtype": "'float32' or 'bfloat16'",
}
"""The ``TrainConfig`` fields every ``config.json`` fit wrote holds, that ``load_run`` reads."""


def _config_key_ok(key: str, value) -> bool:
    if key == "epochs":
        return is_int(value) and value >= 1
    if key == "seed":
        return is_int(value)
    if key == "monitor":
        return isinstance(value, str) and bool(value)
    if key == "monitor_mode":
        return value in ("max", "min")
    if key == "compute_dtype":
        return value in ("float32", "bfloat16")
    return value is None or value in STANDARDIZE_MODES


def _check_config(record) -> dict:
    """The ``TrainConfig`` table of a ``config.json`` record; ``ValueError`` naming the file and
    the entry when it is not one fit wrote (no silent defaults for what a damaged file lacks)."""
    if not isinstance(record, dict):
        raise ValueError(f"config.json holds a {type(record).__name__}, expected an object")
    config = record.get("train", record)  # a run_folder record; older runs: the TrainConfig
    where = "config.json's 'train'" if "train" in record else "config.json"
    if not isinstance(config, dict):
        raise ValueError(f"{where} holds a {type(config).__name__}, expected an object")
    absent = [key for key in _CONFIG_KEYS if key not in config]
    if absent:
        raise ValueError(
            f"{where} has no {', '.join(map(repr, absent))}: not the record of a run fit wrote"
        )
    for key, expected in _CONFIG_KEYS.items():
        if not _config_key_ok(key, config[key]):
            raise ValueError(f"{where}[{key!r}]: expected {expected}, got {config[key]!r}")
    return config


def _check_description(description) -> tuple[dict, dict, dict, jax.ShapeDtypeStruct]:
    """``(model entry, input, metadata, sample)`` of ``run.json``; ``ValueError`` naming the entry
    that is missing or of the wrong type."""
    if not isinstance(description, dict):
        raise ValueError(f"{RUN_FILE} holds a {type(description).__name__}, expected an object")
    absent = [key for key in ("model", "input") if key not in description]
    if absent:
        raise ValueError(f"{RUN_FILE} has no {' or '.join(map(repr, absent))}")
    entry, input_spec = description["model"], description["input"]
    metadata = description.get("metadata", {})
    for name, value in (("model", entry), ("input", input_spec), ("metadata", metadata)):
        if not isinstance(value, dict):
            raise ValueError(
                f"{RUN_FILE}'s {name!r} holds a {type(value).__name__}, expected an object"
            )
    if not isinstance(entry.get("class"), str):
        raise ValueError(
            f"{RUN_FILE}'s model 'class': expected a class path, got {entry.get('class')!r}"
        )
    if not isinstance(entry.get("rebuildable"), bool):
        raise ValueError(
            f"{RUN_FILE}'s model 'rebuildable': expected true or false, got "
            f"{entry.get('rebuildable')!r}"
        )
    if entry["rebuildable"] and not isinstance(entry.get("fields"), dict):
        raise ValueError(
            f"{RUN_FILE}'s model 'fields': expected an object, got {entry.get('fields')!r}"
        )
    shape = input_spec.get("shape")
    if not (isinstance(shape, list) and shape and all(is_int(d) and d >= 1 for d in shape)):
        raise ValueError(
            f"{RUN_FILE}'s 'input' shape: expected a list of positive ints, got {shape!r}"
        )
    try:
        if not isinstance(input_spec.get("dtype"), str):  # jnp.dtype(None) is float32
            raise TypeError("not a string")
        dtype = jnp.dtype(input_spec["dtype"])
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"{RUN_FILE}'s 'input' dtype: expected a dtype's name, got "
            f"{input_spec.get('dtype')!r} ({error})"
        ) from error
    return entry, input_spec, metadata, jax.ShapeDtypeStruct((1, *shape), dtype)


def _standardize_expected(record: dict, config: dict) -> bool:
    """Whether the run standardized its images (``config.standardize``, or fitted statistics
    given to ``fit``, which the record describes)."""
    return config["standardize"] is not None or record.get("standardize") is not None


def _check_standardize(stats, record: dict, config: dict, shape: tuple[int, ...], path: Path):
    """``RunFolderError`` when ``standardize.npz`` does not hold the statistics the run applied
    to images of ``shape`` (its mode, its description in ``config.json``, its shapes)."""
    from jcnn.train.run_folder import describe

    problem = None
    if config["standardize"] is not None and stats.mode != config["standardize"]:
        problem = f"mode {stats.mode!r}, but config.json records {config['standardize']!r}"
    elif record.get("standardize") is not None and describe(stats) != record["standardize"]:
        problem = "other statistics than config.json records"
    else:
        raw = tuple(stats.mean.shape) if stats.mode == "pca" else shape
        try:
            out = jax.eval_shape(stats, jax.ShapeDtypeStruct((1, *raw), jnp.float32)).shape[1:]
        except (ValueError, TypeError):
            out = None
        if out != shape:
            problem = (
                f"statistics of mode {stats.mode!r} with mean {tuple(stats.mean.shape)}, which "
                f"do not give the run's input {shape}"
            )
    if problem is not None:
        raise RunFolderError(f"{path} is corrupt or of another run: it holds {problem}")


def load_run(
    folder: str | os.PathLike, which: str | int = "latest", *, model: nn.Module | None = None
) -> Run:
    """Load a run folder written by ``fit`` or ``jcnn-train`` for inference.

    Args:
        folder: the run folder (``TrainConfig.out`` / ``--out``).
        which: ``"latest"`` (the last checkpoint: the final state of a finished run; one that
            holds non-finite values or produced a non-finite loss is passed over), ``"best"``
            (a ``BestCheckpoint`` callback's checkpoint if the run had one, else the checkpoint
            ranked best by ``config.monitor``), the ``directory`` of one of the run's
            ``BestCheckpoint`` callbacks (as ``best.json`` records them), or a step.
        model: the Flax module, required only if the run could not record how to rebuild it
            (``run.json`` says why).

    Returns:
        A ``Run``.

    Raises:
        RunFolderError: the folder is not a run: ``config.json`` or ``run.json`` is unreadable,
            truncated, lacks an entry fit writes or holds one of the wrong type;
            ``standardize.npz`` is missing although the run standardized its images, unreadable
            (its arrays carry CRC-32 checksums) or does not fit the run's record and input; or
            its checkpoint fails its manifest (SHA-256 of every file), is unreadable or does not
            fit the model. The message names the file.
    """
    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder: expected a run folder (str or os.PathLike), got {folder!r}")
    if (
        hasattr(which, "dtype")
        and getattr(which, "shape", None) == ()
        and not isinstance(which, str)
    ):
        which = check_int(which, "which")  # a NumPy or 0-d JAX integer: a step
    if isinstance(which, bool) or not isinstance(which, (str, int)):
        # before the run is read: a float step or None was a ValueError once the model was built
        raise TypeError(f"which: expected 'latest', 'best' or a step (int), got {which!r}")
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(
            f"model: expected None or a Flax module instance such as MyNet(...), got {model!r}"
        )
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise _not_a_run(folder, "a file, not a folder" if folder.exists() else "no such folder")
    missing = [n for n in ("config.json", RUN_FILE, "checkpoints") if not (folder / n).exists()]
    if missing:
        raise _not_a_run(folder, f"missing {', '.join(missing)}")
    try:
        record = _read_json(folder / "config.json")
        config = _check_config(record)
        entry, input_spec, metadata, sample = _check_description(_read_json(folder / RUN_FILE))
    except (OSError, ValueError) as error:
        raise _not_a_run(folder, f"unreadable config.json or {RUN_FILE}: {error}") from error
    given_model = model is not None
    if model is None:
        if not entry.get("rebuildable"):
            raise RunFolderError(
                f"{folder}: the run's model {entry.get('class')} cannot be rebuilt from "
                f"{RUN_FILE} ({entry.get('reason')}); pass it: load_run(folder, model=...)"
            )
        try:
            model = _build(entry)
        except Exception as error:  # a class gone or renamed, fields it no longer takes...
            raise RunFolderError(
                f"{folder}: the run's model {entry.get('class')} cannot be rebuilt from "
                f"{RUN_FILE} ({type(error).__name__}: {error}); pass it: "
                "load_run(folder, model=...)"
            ) from error
    path = _verify(*_pick_step(folder, which, config["monitor_mode"]))
    stats_path = folder / STANDARDIZE_FILE
    if _standardize_expected(record, config) and not stats_path.is_file():
        raise RunFolderError(
            f"{stats_path} is missing: the run standardized its images (config.json records it), "
            "so its model cannot be applied without the statistics"
        )
    key = jax.random.PRNGKey(0)
    try:
        template = jax.eval_shape(
            lambda x: model.init({"params": key, "dropout": key}, x, train=False), sample
        )
    except Exception as error:  # e.g. no train argument, or fields that no longer build it
        problem = (
            f"cannot be initialized on the run's input {sample.shape} {sample.dtype} with "
            f"train=False ({type(error).__name__}: {str(error)[:300]})"
        )
        if given_model:
            raise TypeError(f"model: {type(model).__name__} {problem}") from error
        raise RunFolderError(
            f"{folder}: the run's model {entry.get('class')}, rebuilt from {RUN_FILE}, {problem}; "
            "pass it: load_run(folder, model=...)"
        ) from error
    variables = _restore_variables(path, dict(template))
    stats = None
    if stats_path.exists():
        stats = load_standardize(stats_path)
        _check_standardize(stats, record, config, tuple(sample.shape[1:]), stats_path)
    return Run(
        folder=folder,
        model=model,
        variables=variables,
        standardize=stats,
        config=config,
        metadata=metadata,
        step=int(path.name.split("_")[-1]),
        which=which,
        input_shape=tuple(int(d) for d in input_spec["shape"]),
    )
