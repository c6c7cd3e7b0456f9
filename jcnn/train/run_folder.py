"""Run folders that belong to one run: a lock, the full configuration, resume rules.

``fit(..., config.out=...)`` and ``jcnn-train --out`` use these pieces:

- **One owner.** :func:`claim` takes an exclusive OS lock (``flock``) on ``<out>/.lock`` for the
  whole command; the operating system releases it when the process ends, even on ``SIGKILL``. A
  second process on the same folder fails at once with :class:`RunFolderError`, touching nothing.
- **The full configuration.** :func:`run_record` describes the run in plain JSON: every
  ``TrainConfig`` field, the model's class and fields, the training loader (batch size, seed,
  shuffling, number of examples, augmentation, and a SHA-256 of the examples an in-memory
  ``jcnn.data.Loader`` holds, so a resume on other data is refused), the caller's ``settings``
  (``jcnn-train`` adds the dataset, data directory, ``--limit-train``, ``--augment`` and the
  standardization statistics), the jcnn version, and a digest of the code of the researcher's own
  functions and model classes among them and those their code names (``code``: not jcnn's, nor an
  installed package's), so a resume with an edited loss, model or submodule is refused. It is
  saved as ``config.json``.
- **Resume into the same run only.** :func:`check_start` refuses a resume whose record differs
  from the folder's ``config.json`` (naming each differing setting, old and new), a resume of a
  folder without checkpoints, and a new run into a folder that already holds one unless
  ``overwrite`` (which then deletes that run's files, and only those). Every check runs before
  anything in the folder is written, so a refused command leaves it as it was.

Settings that may change on resume (:data:`MAY_CHANGE`): where the folder and the data are
(``out``, ``settings.data_dir``), the bookkeeping (``resume``, ``overwrite``, ``progress``,
``keep_last``, ``checkpoint_every_epochs``, ``checkpoint_every_steps``), ``devices`` (data parallel
over more or fewer devices: the same run up to float32 summation order), the jcnn version, and
``epochs`` when the learning-rate schedule does not depend on the run's length
(:data:`LENGTH_FREE_SCHEDULES`); with ``cosine``, ``linear`` or ``one_cycle`` a new number of
epochs would change the rate of the steps already taken, so it is refused, and so it is with
DP-SGD at a target epsilon (``dp_target_epsilon``), whose noise is calibrated to the run's length.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import re
import shutil
import socket
import sys
import sysconfig
import threading
import types
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import flax.linen as nn

    from jcnn.train.loop import TrainConfig

__all__ = [
    "RunFolderError",
    "RunLock",
    "claim",
    "run_record",
    "describe",
    "read_config",
    "write_config",
    "write_atomically",
    "holds_run",
    "check_start",
    "differences",
    "MAY_CHANGE",
    "LENGTH_FREE_SCHEDULES",
    "RUN_FILES",
    "LOCK_FILE",
    "BEST_FILE",
    "best_directories",
    "record_best_directory",
]

LOCK_FILE = ".lock"
"""The file a run holds locked while it writes its folder (:func:`claim`)."""
CONFIG_FILE = "config.json"
BEST_FILE = "best.json"
"""The run's record of the folders its ``BestCheckpoint`` callbacks write."""
RUN_FILES = (
    CONFIG_FILE,
    "run.json",
    "standardize.npz",
    "history.json",
    "history.csv",
    "evaluations.json",
    "curves.png",
    "summary.json",
    "checkpoints",
    "best",
    BEST_FILE,
    "evaluation.json",
    "confusion_matrix.png",
)
"""What a run writes into its folder (``jcnn-eval``'s results included: they describe the run's
checkpoints); ``overwrite`` deletes these, the folders ``best.json`` lists (see
:func:`best_directories`) and nothing else."""

MAY_CHANGE = frozenset(
    {
        "jcnn_version",
        "train.out",
        "train.resume",
        "train.overwrite",
        "train.progress",
        "train.devices",
        "train.keep_last",
        "train.checkpoint_every_epochs",
        "train.checkpoint_every_steps",
        "train.eval_every_steps",
        "train.eval_batch_size",
        "train.test_every_epoch",
        "train.callbacks",
        "train.steps_per_call",
        "settings.data_dir",
        "settings.command",
    }
)
"""Record entries that may differ between a run and its resumption (``train.epochs`` and
``train.max_steps``: see :data:`LENGTH_FREE_SCHEDULES`). What is evaluated and when, and the
callbacks, may change: they do not enter the training computations (``fit`` checks that a resume
has callbacks of the same classes, to restore their state). So may the number of devices and of
steps per compiled call, which change the results by rounding at most (a record written before
``steps_per_call`` existed lacks it)."""

LENGTH_SETTINGS = ("train.epochs", "train.max_steps")
"""The run's length: may change on resume when the learning rate does not depend on it."""

LENGTH_FREE_SCHEDULES = frozenset(
    {"constant", "step", "exponential", "inverse_time", "inverse_sqrt"}
)
"""Schedules whose rate at a step does not depend on the number of epochs: with these a resume may
change ``epochs`` or ``max_steps`` (to extend a run). So may a run whose learning rate is a schedule
of its own (a callable ``learning_rate``, or an ``optax`` optimizer bringing its rate)."""

_RUN_FOLDERS = ("checkpoints", "best")
"""The entries of :data:`RUN_FILES` that are folders."""
_MISSING = "(absent)"
_CHECKPOINT_DIR = re.compile(r"step_\d{8}")

ADDED_LATER = {"train.no_grad": ([], {}), "train.clip_value": (None,)}
"""Settings newer than some run folders, with the values that mean what a record without them
meant (``no_grad=()`` records ``[]``, jcnn-train's empty mapping ``{}``; no ``clip_value`` is
``None``): a resume with one of those values is the same run."""

CORRECTED_LATER = {"settings.model": ("lenet5", None), "settings.batch_size": (128, None)}
"""Entries that older ``jcnn-train --recipe`` records held wrongly, ``(old value, value now)``:
the ``--model`` and ``--batch-size`` defaults, which a recipe refuses and does not use (it builds
its own network and batches), now recorded as ``None``. A run without a recipe records a name and
a number there, so only such a record has the old value beside the new: the same run."""

RECORDED_LATER = frozenset(
    {"train_loader.examples", "train_loader.augment", "train_loader.batch_augment"}
)
"""Facts newer than some run folders that a record without them did not state: any value
resumes such a folder (a data.Loader's augmentation went unrecorded while its attributes were
public and the record read the private ones)."""


class RunFolderError(ValueError, RuntimeError):
    """The run folder is in use, holds another run, lacks what a resume needs, its recorded
    configuration differs from the one given, or (``load_run``) it is not a readable run.

    A ``ValueError`` (a folder that does not fit the request) and a ``RuntimeError`` (a folder
    busy with another process), so that either ``except`` catches it.

    Attributes:
        folder: the run folder.
        differences: for a refused resume, ``[(setting, in the run, now), ...]``.
    """

    def __init__(
        self,
        message: str,
        folder: str | os.PathLike | None = None,
        differences: Iterable[tuple[str, Any, Any]] = (),
    ) -> None:
        super().__init__(message)
        self.folder = folder
        self.differences = list(differences)


# ---- ownership ---------------------------------------------------------------------------------

_HELD: dict[str, RunLock] = {}  # the locks this process holds, by real path (claim is reentrant)


class RunLock:
    """An exclusive lock on a run folder, held by this process (see :func:`claim`)."""

    def __init__(self, folder: Path, handle: int, created_folder: Path | None) -> None:
        self.folder = folder
        self._handle = handle
        self._created_folder = created_folder
        self._count = 1
        self._thread = threading.get_ident()

    def release(self) -> None:
        """Give the folder up (the last of nested claims removes the lock file and unlocks)."""
        import fcntl

        self._count -= 1
        if self._count > 0 or self._handle is None:
            return
        _HELD.pop(str(self.folder), None)
        try:
            (self.folder / LOCK_FILE).unlink()  # still locked: nobody can take a stale inode
        except FileNotFoundError:
            pass
        fcntl.flock(self._handle, fcntl.LOCK_UN)
        os.close(self._handle)
        self._handle = None
        if self._created_folder is not None:  # a refused first command leaves no folder
            folder = self.folder
            while True:
                try:
                    folder.rmdir()  # only if empty
                except OSError:
                    break
                if folder == self._created_folder:
                    break
                folder = folder.parent

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def claim(folder: str | os.PathLike) -> RunLock:
    """Lock the run folder ``folder`` for this process (created if needed).

    Reentrant within a thread: ``jcnn-train`` claims the folder for the whole command and
    ``fit`` claims it again; each claim is released once (or used as a context manager).

    Raises:
        RunFolderError: another process, or another thread of this one, holds the folder (the
            message names it), or ``folder`` is not a directory.
    """
    folder = Path(folder).absolute()
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"run folder {folder} exists and is not a directory", folder)
    created = folder
    while not created.parent.exists():
        created = created.parent  # the topmost folder this claim creates
    created = None if folder.exists() else created
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunFolderError(
            f"run folder {folder} cannot be created ({type(error).__name__}: {error.strerror})",
            folder,
        ) from error
    key = str(folder.resolve())
    held = _held_by_this_thread(folder, key)
    if held is not None:
        held._count += 1
        return held
    path = folder / LOCK_FILE
    while True:
        try:
            handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunFolderError(
                f"run folder {folder} cannot be locked: {path} cannot be opened as its lock file "
                f"({type(error).__name__}: {error.strerror})",
                folder,
            ) from error
        _lock_or_refuse(folder, handle)
        try:
            same = os.fstat(handle).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the holder removed the file as we opened it: lock the new one
            break
        os.close(handle)
    os.ftruncate(handle, 0)
    os.write(handle, f"{os.getpid()} {socket.gethostname()}\n".encode())
    lock = RunLock(Path(key), handle, created)
    _HELD[key] = lock
    return lock


def _refuse_if_held(folder: Path) -> None:
    """Raise :func:`claim`'s "in use" error if another process, or another thread of this one,
    holds ``folder``; reads only (the lock file is probed, never created or written)."""
    if folder.exists() and _held_by_this_thread(folder, str(folder.resolve())) is not None:
        return  # held by this very claim: checked again once the folder is ours
    try:
        handle = os.open(folder / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return  # no lock file: nobody holds the folder
    try:
        _lock_or_refuse(folder, handle)
    except OSError:
        return
    os.close(handle)  # closing drops the lock this probe took


def _held_by_this_thread(folder: Path, key: str) -> RunLock | None:
    """The claim this thread holds on ``folder`` (resolved to ``key``), if any; raises if
    another thread of this process holds it (two runs of one process)."""
    held = _HELD.get(key)
    if held is None or held._handle is None:
        return None
    if held._thread != threading.get_ident():
        raise _in_use(folder, "another thread of this process")
    return held


def _lock_or_refuse(folder: Path, handle: int) -> None:
    """Take the lock on the open lock file ``handle``, or close it and raise "in use" naming
    the process that holds it."""
    import fcntl

    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = _read_holder(handle) if isinstance(error, BlockingIOError) else None
        os.close(handle)
        if holder is None:
            raise
        raise _in_use(folder, f"another process{holder}") from None


def _in_use(folder: Path, holder: str) -> RunFolderError:
    return RunFolderError(
        f"run folder {folder} is in use by {holder}; wait for it to end or choose another folder",
        folder,
    )


def _read_holder(handle: int) -> str:
    try:
        pid, host = os.pread(handle, 256, 0).decode().split()[:2]
        return f" (pid {int(pid)} on {host})"
    except (OSError, ValueError, UnicodeDecodeError):
        return ""


# ---- the record --------------------------------------------------------------------------------


_MAX_DEPTH = 32
"""How deep ``describe`` follows a setting: far enough for nested optax optimizers, whose
learning rates sit 10-20 levels down (``multi_transform`` of ``chain``s inside ``MultiSteps`` or
``lookahead``)."""

_CUT = "..."
"""What ``describe`` writes past ``_MAX_DEPTH``; older versions cut at depth 8."""


def describe(value: Any, depth: int = 0, _within: frozenset = frozenset()) -> Any:
    """A plain-JSON description of a setting: numbers, strings, lists and dicts as they are; sets
    as sorted lists; dtypes and types by name; functions by qualified name (with a
    ``functools.partial``'s arguments and the values a closure captured); a dataclass (a Flax
    module) by class and fields.
    Never a memory address, so the same setting describes the same in every process. A value
    met again inside itself (a recursive closure) is named, not followed.

    >>> import functools
    >>> describe(functools.partial(round, ndigits=2))
    {'function': 'builtins.round', 'args': [], 'keywords': {'ndigits': 2}}
    """
    try:
        return _describe(value, depth, _within)
    except Exception as error:  # e.g. a deleted jax array, an attribute that raises
        return f"<{_qualified(type(value))}: not described, {type(error).__name__}>"


def _describe(value: Any, depth: int, _within: frozenset) -> Any:
    if depth > _MAX_DEPTH:
        return _CUT
    if id(value) in _within:
        named = value if hasattr(value, "__qualname__") else type(value)
        return f"<recursive {_qualified(named)}>"
    if value is None or isinstance(value, (bool, int, str)):
        return value
    _within = _within | {id(value)}  # the objects being described, around this one
    if isinstance(value, os.PathLike):  # the whole path (a Path's .name is its last part)
        return os.fsdecode(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [describe(v, depth + 1, _within) for v in value]
    if isinstance(value, (set, frozenset)):
        # in an order that does not depend on the process (string hashes are salted)
        return sorted((describe(v, depth + 1, _within) for v in value), key=_sort_key)
    if isinstance(value, Mapping):  # a dict, or Flax's FrozenDict (``bridge.to_linen``'s kwargs)
        return {str(k): describe(v, depth + 1, _within) for k, v in value.items()}
    if isinstance(value, functools.partial):
        return {
            "function": describe(value.func, depth + 1, _within),
            "args": [describe(v, depth + 1, _within) for v in value.args],
            "keywords": {k: describe(v, depth + 1, _within) for k, v in value.keywords.items()},
        }
    if isinstance(value, type):
        _note_code(value)
        return _qualified(value)
    if hasattr(value, "dtype") and hasattr(value, "shape"):
        import jax
        import numpy as np

        if jax.dtypes.issubdtype(value.dtype, jax.dtypes.prng_key):  # NumPy cannot hold a key
            data = describe(jax.random.key_data(value), depth + 1, _within)
            return {"key": str(jax.random.key_impl(value)), "data": data}
        array = np.asarray(value)
        if array.size <= 16 and array.ndim <= 1:
            return describe(array.tolist(), depth + 1, _within)
        digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]
        return f"array{array.shape} {array.dtype} sha256:{digest}"
    if hasattr(value, "item") and hasattr(value, "dtype"):  # NumPy scalar
        return describe(value.item(), depth + 1, _within)
    if type(value).__name__ == "MultiSteps" and hasattr(value, "gradient_transformation"):
        # optax.MultiSteps keeps its settings (the inner optimizer, k) as attributes
        fields = {k.lstrip("_"): describe(v, depth + 1, _within) for k, v in vars(value).items()}
        return {"class": _qualified(type(value)), **fields}
    if dataclasses.is_dataclass(value):
        _note_code(type(value))
        fields = {
            f.name: describe(getattr(value, f.name, None), depth + 1, _within)
            for f in dataclasses.fields(value)
            if f.name not in ("parent", "name")
        }
        return {"class": _qualified(type(value)), **fields}
    if callable(value) and hasattr(value, "__qualname__"):
        cells = getattr(value, "__closure__", None) or ()
        captured = [describe(c.cell_contents, depth + 1, _within) for c in cells if _filled(c)]
        name = _qualified(value)
        _note_code(value)
        described = {"function": name, "captured": captured} if captured else name
        if not hasattr(value, "__closure__") and hasattr(value, "__wrapped__"):
            # a wrapper without a closure of its own (``jax.jit``'s): what the function it wraps
            # captured (a recorded key apart, so that older records, without it, still resume)
            cells = getattr(_unwrapped(value), "__closure__", None) or ()
            within = [describe(c.cell_contents, depth + 1, _within) for c in cells if _filled(c)]
            if within:
                described = {"function": name, "wrapped_captured": within}
        owner = getattr(value, "__self__", None)
        if inspect.ismethod(value) and _is_own_object(owner):  # the settings its object holds
            function = described if captured else {"function": name}
            described = {**function, "self": describe(owner, depth + 1, _within)}
        return described
    if hasattr(value, "name") and isinstance(value.name, str):  # e.g. a NumPy dtype
        return value.name
    _note_code(type(value))
    if _is_own_object(value):  # e.g. a loss written as a class: the settings it holds
        fields = {k: describe(v, depth + 1, _within) for k, v in sorted(vars(value).items())}
        return {"class": _qualified(type(value)), **fields}
    return f"<{_qualified(type(value))}>"


def _unwrapped(value):
    try:
        return inspect.unwrap(value)
    except ValueError:  # a cycle of __wrapped__
        return value


def _is_own_object(value) -> bool:
    """Whether ``value`` is an instance of one of the researcher's own classes, with attributes."""
    return (
        not isinstance(value, (type, types.ModuleType))
        and isinstance(getattr(value, "__dict__", None), dict)
        and _is_own(type(value))
    )


def _sort_key(described) -> tuple:
    number = isinstance(described, (int, float)) and not isinstance(described, bool)
    return (not number, described if number else 0, json.dumps(described, sort_keys=True))


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018
        return True
    except ValueError:
        return False


def _qualified(obj) -> str:
    module = getattr(obj, "__module__", None)
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", repr(obj))
    return f"{module}.{name}" if module else name


_CODE = contextvars.ContextVar("jcnn_run_folder_code", default=None)
"""While :func:`run_record` describes a run: the digests of the researcher's own code met so far,
``{qualified name: [digest, ...]}``."""

_LIBRARY_PATHS = tuple(
    {
        os.path.realpath(sysconfig.get_paths()[name]) + os.sep
        for name in ("stdlib", "purelib", "platlib")
    }
)


_NOTING = contextvars.ContextVar("jcnn_run_folder_noting", default=frozenset())
"""The ids of the functions and classes :func:`_note_code` is digesting, around the current one (a
default argument may name its own function, or one whose default names it back)."""


def _note_code(value) -> None:
    """Record the digest of ``value``'s code (a function's, or a class's own methods') when it is
    the researcher's own: not jcnn's, nor the standard library's or an installed package's."""
    codes, noting = _CODE.get(), _NOTING.get()
    if codes is None or id(value) in noting or not _is_own(value):
        return
    token = _NOTING.set(noting | {id(value)})
    try:
        _digest_code(value, codes)
    finally:
        _NOTING.reset(token)


def _digest_code(value, codes: dict) -> None:
    if isinstance(value, type):
        for base in value.__bases__:
            _note_code(base)
        members = []
        for _, member in sorted(vars(value).items()):
            wrapped = getattr(member, "wrapped", None)  # how Flax wraps a Module's descriptors
            if isinstance(wrapped, (property, functools.cached_property)):
                member = wrapped
            if isinstance(member, property):  # its getter, setter and deleter
                members += [f for f in (member.fget, member.fset, member.fdel) if f is not None]
            elif isinstance(member, functools.cached_property):
                members.append(member.func)
            else:
                members.append(getattr(member, "__func__", member))
        functions = [_unwrapped(m) for m in members if callable(m)]
        # its own constants (``SCALE = 2.0`` in the class body), not the dataclass fields (their
        # values are recorded apart) nor private or special names (Flax's bookkeeping)
        fields = getattr(value, "__dataclass_fields__", {})
        attributes = {
            name: describe(member)
            for name, member in sorted(vars(value).items())
            if not name.startswith("_") and name not in fields and _is_constant(member)
        }
        # the methods written in the class, not those dataclasses generate (they change with the
        # Python and Flax versions, not with the researcher)
        prefix = value.__qualname__ + "."
        functions = [
            f
            for f in functions
            if getattr(f, "__qualname__", "").startswith(prefix) and not _generated(f)
        ]
    else:
        functions, attributes = [_unwrapped(value)], {}
    functions = [f for f in functions if isinstance(getattr(f, "__code__", None), types.CodeType)]
    if not functions:
        return
    digest = hashlib.sha256()
    if attributes:
        digest.update(json.dumps(attributes, sort_keys=True).encode())
    named = []  # what each function reads from its module
    for function in functions:
        _feed_code(digest, function.__code__)
        defaults = [function.__defaults__, function.__kwdefaults__]
        digest.update(json.dumps(describe(defaults), sort_keys=True).encode())
        scope = getattr(function, "__globals__", None) or {}
        read = {
            name: scope[name] for name in sorted(_names_read(function.__code__)) if name in scope
        }
        named += read.values()
        # the values of the module's constants it reads (``TEMPERATURE = 2.0``, a tuple, an array)
        constants = {
            name: describe(read[name])
            for name in read
            if not name.startswith("__") and _is_constant(read[name])
        }
        if constants:
            digest.update(json.dumps(constants, sort_keys=True).encode())
    entry = f"{sys.implementation.cache_tag} sha256:{digest.hexdigest()[:16]}"
    digests = codes.setdefault(_qualified(value), [])
    if entry not in digests:
        digests.append(entry)
        digests.sort()
    # the researcher's functions and classes this code names (a model's submodules, a loss's
    # helper): an edit of theirs changes the run as much
    for other in named:
        if isinstance(other, (type, types.FunctionType)) or hasattr(other, "__wrapped__"):
            _note_code(other)


def _generated(function) -> bool:
    """Whether ``function`` is a method ``dataclasses`` generated: ``exec``'d from a "<string>"
    inside its ``__create_fn__`` (a class written in ``python -c`` or ``exec`` has "<string>" code
    too, and is the researcher's)."""
    code = getattr(function, "__code__", None)
    if getattr(code, "co_filename", "<string>") != "<string>":
        return False
    qualified = getattr(code, "co_qualname", None)  # Python 3.11 and newer
    return qualified is None or qualified.startswith("__create_fn__")


_CONSTANT_TYPES = (bool, int, float, complex, str, bytes, tuple, frozenset)


def _is_constant(value) -> bool:
    """Whether a module global is a constant value (a number, a string, a tuple, an array), not a
    module, function, class or other object. Not a list, dict or set: a script's global that a
    function appends to while it trains (a trace counter) would refuse a resume in the same
    process."""
    if isinstance(value, _CONSTANT_TYPES):
        return True
    return hasattr(value, "dtype") and hasattr(value, "shape") and not isinstance(value, type)


def _names_read(code: types.CodeType) -> set[str]:
    """The global (and attribute) names ``code`` and the functions nested in it read."""
    names = set(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names |= _names_read(constant)
    return names


def _is_own(value) -> bool:
    module = sys.modules.get(getattr(value, "__module__", None) or "")
    if module is None or module.__name__.split(".")[0] == "jcnn":
        return False
    path = getattr(module, "__file__", None)
    return path is None or not os.path.realpath(path).startswith(_LIBRARY_PATHS)


def _feed_code(digest, code: types.CodeType) -> None:
    """What a function computes, for :func:`_note_code`: its bytecode, the names it reads and its
    constants (nested functions' too); not its line numbers, local names or docstring."""
    digest.update(code.co_code)
    digest.update(repr(code.co_names).encode())
    constants = code.co_consts
    if not code.co_name.startswith("<") and constants and isinstance(constants[0], str):
        # the docstring, in the slot a function without one fills with None (so adding or
        # removing a docstring changes nothing)
        constants = (None, *constants[1:])
    for constant in constants:
        if isinstance(constant, types.CodeType):
            _feed_code(digest, constant)
        elif isinstance(constant, frozenset):  # in an order that does not depend on the process
            digest.update(repr(sorted(map(repr, constant))).encode())
        else:
            digest.update(repr(constant).encode())


def _describe_loader(loader) -> dict | None:
    if loader is None:
        return None
    record = {"class": _qualified(type(loader))}
    for attribute in (
        "batch_size",
        "seed",
        "shuffle",
        "drop_remainder",
        "num_examples",
        "sampling",
        "alternating_flip",
    ):
        if hasattr(loader, attribute):
            record[attribute] = describe(getattr(loader, attribute))
    if hasattr(loader, "__len__"):
        record["batches_per_epoch"] = len(loader)
    for attribute in ("augment", "batch_augment"):
        if hasattr(loader, attribute):
            record[attribute] = describe(getattr(loader, attribute))
    from jcnn.data import Loader

    if isinstance(loader, Loader) and not loader.streaming:
        record["examples"] = _describe_examples(*loader.examples)
    return record


def _describe_examples(images, labels) -> str:
    """The examples a loader holds: their count and the SHA-256 of their shapes, dtypes and bytes
    (the shapes are in the rest of the record)."""
    import numpy as np

    digest = hashlib.sha256()
    for array in (images, labels):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.shape} {array.dtype};".encode())
        digest.update(array.reshape(-1).view(np.uint8))
    return f"{images.shape[0]} examples, sha256:{digest.hexdigest()[:16]}"


def run_record(
    config: TrainConfig,
    model: nn.Module | None = None,
    train_loader: Any = None,
    settings: dict | None = None,
) -> dict:
    """The plain-JSON record of a run that ``config.json`` holds (see the module docstring)."""
    from jcnn import __version__

    codes = {}
    token = _CODE.set(codes)
    try:
        record = {
            "jcnn_version": __version__,
            "train": {
                f.name: _describe_setting(getattr(config, f.name), f"train.{f.name}")
                for f in dataclasses.fields(config)
            },
            "model": describe(model) if model is not None else None,
            "train_loader": _describe_loader(train_loader),
            "settings": {
                str(k): _describe_setting(v, f"settings.{k}") for k, v in (settings or {}).items()
            },
        }
    finally:
        _CODE.reset(token)
    record["code"] = dict(sorted(codes.items()))
    return json.loads(json.dumps(record))  # exactly what config.json will give back


def _describe_setting(value, key: str):
    """``describe(value)``; the code of a setting that may change on resume (a callback's) is not
    digested."""
    if key not in MAY_CHANGE:
        return describe(value)
    token = _CODE.set(None)
    try:
        return describe(value)
    finally:
        _CODE.reset(token)


# ---- folder state ------------------------------------------------------------------------------


def holds_run(folder: str | os.PathLike) -> list[str]:
    """The files of a run present in ``folder`` (empty: no run there)."""
    folder = Path(folder)
    return [name for name in RUN_FILES if (folder / name).exists()]


def best_directories(folder: str | os.PathLike) -> list[str]:
    """The folders, inside the run folder, where ``BestCheckpoint`` callbacks saved checkpoints,
    as ``best.json`` records them (``[]`` without it).

    Raises:
        RunFolderError: ``best.json`` is unreadable or lists a path outside the run folder.
    """
    path = Path(folder) / BEST_FILE
    if not path.exists():
        return []
    try:
        directories = json.loads(path.read_text())["directories"]
        if not isinstance(directories, list) or not all(
            isinstance(d, str) and _inside(d) for d in directories
        ):
            raise ValueError(f"'directories' holds {directories!r}, expected folder names")
        return directories
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise RunFolderError(
            f"{path} is unreadable ({type(error).__name__}: {str(error)[:200]}); it lists the "
            "folders of the run's best checkpoints",
            folder,
        ) from error


def _inside(directory: str) -> bool:
    """Whether ``directory`` names a folder inside the run folder (relative, no ``..``)."""
    parts = Path(directory).parts
    return bool(parts) and not Path(directory).is_absolute() and ".." not in parts


def record_best_directory(folder: str | os.PathLike, directory: str) -> None:
    """Add ``directory`` to ``best.json`` (before a checkpoint is written there), so that
    ``load_run`` finds it and ``overwrite`` deletes it."""
    directories = best_directories(folder)
    if directory not in directories:
        payload = json.dumps({"directories": [*directories, directory]}, indent=1)
        write_atomically(Path(folder) / BEST_FILE, payload)


def read_config(folder: str | os.PathLike) -> dict:
    """The record in ``<folder>/config.json``.

    Raises:
        RunFolderError: the file is missing or is not a jcnn run record.
    """
    path = Path(folder) / CONFIG_FILE
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("train"), dict):
            raise ValueError("not a jcnn run record (no 'train' table)")
        return record
    except FileNotFoundError:
        raise RunFolderError(
            f"{path} is missing: the run's settings are unknown, so it cannot be resumed "
            "(start over with overwrite)",
            folder,
        ) from None
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise RunFolderError(
            f"{path} is unreadable ({type(error).__name__}: {str(error)[:200]})", folder
        ) from error


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Write ``path`` through a temporary file and a rename: a crash leaves the old file or the
    new one, never half of one. The file is on disk before the rename, so a power loss cannot
    leave the new name on an empty file either."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    with open(tmp, "rb") as handle:  # fsync takes any descriptor of the file
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_config(folder: str | os.PathLike, record: dict) -> None:
    """Write ``config.json`` atomically (a crash leaves the old file or the new one)."""
    write_atomically(Path(folder) / CONFIG_FILE, json.dumps(record, indent=1))


def _flatten(record, prefix="") -> dict[str, Any]:
    flat = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``[(setting, in old, in new)]`` for every entry of two records that may not differ on
    resume (absent entries show as ``"(absent)"``). The code of the researcher's own functions
    (``code``) is compared where both records hold a digest made by the same Python version."""
    old, new = dict(old), dict(new)
    code = _code_differences(old.pop("code", None) or {}, new.pop("code", None) or {})
    flat_old, flat_new = _flatten(old), _flatten(new)
    tables_old = {name for key in flat_old for name in _parents(key)}
    tables_new = {name for key in flat_new for name in _parents(key)}
    found = []
    for key in sorted(flat_old.keys() | flat_new.keys()):
        before, after = flat_old.get(key, _MISSING), flat_new.get(key, _MISSING)
        parents = _parents(key)
        # a value (an empty table, None) on one side, a table's entries (flattened apart) on the
        # other: one setting, reported with the table's entries
        if before is _MISSING and key in tables_old:
            before = _entries(flat_old, key)
        elif after is _MISSING and key in tables_new:
            after = _entries(flat_new, key)
        elif any(
            (name in flat_old and name in tables_new) or (name in flat_new and name in tables_old)
            for name in parents
        ):
            continue  # an entry of a table that is a value on the other side: reported there
        if _same(before, after) or _may_change(key):
            continue
        later = key in RECORDED_LATER or any(name in RECORDED_LATER for name in parents)
        if before == _MISSING and (later or after in ADDED_LATER.get(key, ())):
            continue
        if CORRECTED_LATER.get(key) == (before, after):
            continue
        if key in LENGTH_SETTINGS and _length_free(new.get("train", {})):
            continue
        found.append((key, before, after))
    return found + code


def _code_differences(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """``[("code of NAME", digests in old, digests in new)]`` for the functions and classes both
    records name whose code differs. A function only one record names differs in a setting
    already; a digest from another Python version (its bytecode differs) tells nothing."""
    found = []
    for name in sorted(old.keys() & new.keys()):
        before, after = old[name], new[name]
        versions = {entry.split(" ")[0] for entry in [*before, *after]}
        if before != after and len(versions) == 1:
            shown = [", ".join(entry.split(" ")[1] for entry in side) for side in (before, after)]
            found.append((f"code of {name}", *shown))
    return found


def _entries(flat: dict, key: str) -> dict:
    """The entries of the table ``key`` of a flattened record, by their names within it."""
    return {
        name[len(key) + 1 :]: value for name, value in flat.items() if name.startswith(key + ".")
    }


def _parents(key: str) -> list[str]:
    """The tables a flattened ``key`` lies in (``a.b.c``: ``a``, ``a.b``)."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


_OLD_SETS = ("<builtins.set>", "<builtins.frozenset>")
"""How records written before ``describe`` listed a set's members showed any set."""


_OLD_MAPPING = re.compile(r"<[\w.]+>")
"""How records written before ``describe`` listed a mapping that is not a dict (a FrozenDict)
showed it: by its class, as any object it does not know."""


def _same(before, after) -> bool:
    """``before == after``, where a set recorded by an older version (which did not say what it
    held) is the same as any set described now (a list), and what an older version cut short
    (``_CUT``, below depth 8) is the same as anything."""
    if before == after or before == _CUT:
        return True
    if isinstance(before, str) and before in _OLD_SETS:
        return isinstance(after, list)
    if isinstance(before, str) and _OLD_MAPPING.fullmatch(before) and isinstance(after, dict):
        # a mapping or an object of the researcher's class, which an older version named only
        return "class" not in after or before == f"<{after['class']}>"
    if isinstance(after, dict) and after.keys() == {"function", "wrapped_captured"}:
        return before == after["function"]  # an older version did not look inside a wrapper
    own = [k for k in after if k.split(".")[0] == "self"] if isinstance(after, dict) else []
    if own and isinstance(before, (str, dict)) and "function" in after:
        # a bound method, whose object an older version did not describe (its entries flattened)
        function = {k: v for k, v in after.items() if k not in own}
        return _same(before, function["function"] if len(function) == 1 else function)
    if isinstance(before, list) and isinstance(after, list):
        return len(before) == len(after) and all(map(_same, before, after))
    if isinstance(before, dict) and isinstance(after, dict):
        return before.keys() == after.keys() and all(_same(before[k], after[k]) for k in before)
    return False


def _may_change(key: str) -> bool:
    return any(key == name or key.startswith(name + ".") for name in MAY_CHANGE)


def _length_free(train: dict) -> bool:
    """Whether the learning rate and DP-SGD's noise at a step are the same whatever the run's
    length (a target epsilon calibrates the noise to the run's length)."""
    if train.get("dp_target_epsilon") is not None:
        return False
    own_rate = "learning_rate" in train and not isinstance(train["learning_rate"], (int, float))
    own_optimizer = "optimizer" in train and not isinstance(train["optimizer"], str)
    if own_rate or own_optimizer:
        return True  # the rate is the user's own schedule (or the optax optimizer's)
    return train.get("schedule") in LENGTH_FREE_SCHEDULES


def _shown_apart(before, after) -> tuple[str, str]:
    """Both values as text; a long one (a described optimizer...) from just before the first
    character where the two differ, so that the message shows the difference."""
    # a string as it is, unless empty (quoted, to be seen)
    texts = [v if isinstance(v, str) and v else json.dumps(v) for v in (before, after)]
    if max(map(len, texts)) <= 80:
        return texts[0], texts[1]
    common = next(
        (i for i, (a, b) in enumerate(zip(*texts, strict=False)) if a != b), min(map(len, texts))
    )
    start = max(common - 20, 0)
    return tuple(
        ("..." if start else "")
        + text[start : start + 60]
        + ("..." if len(text) > start + 60 else "")
        for text in texts
    )


def format_differences(found, names=None) -> str:
    """``"setting: A in the run, B now; ..."`` with ``names`` mapping a setting to its label."""
    names = names or {}
    seen, parts = set(), []
    for key, before, after in found:
        label = names.get(key, key.split(".", 1)[1] if key.startswith("train.") else key)
        if label in seen:
            continue
        seen.add(label)
        note = ""
        if key in LENGTH_SETTINGS:
            note = " (the schedule or the DP noise depends on the run's length)"
        before, after = _shown_apart(before, after)
        parts.append(f"{label}: {before} in the run, {after} now{note}")
    return "; ".join(parts)


def check_start(
    folder: str | os.PathLike, *, resume: bool, overwrite: bool, record: dict | None = None
) -> None:
    """Refuse a start that would mix two runs in ``folder``; reads only, writes nothing.

    Args:
        folder: the run folder.
        resume: the start continues the run in the folder.
        overwrite: the start replaces whatever run the folder holds.
        record: the new run's :func:`run_record`, compared with ``config.json`` on resume
            (``None``: only the checks that need no record).

    Raises:
        RunFolderError: both ``resume`` and ``overwrite``; a resume with nothing to resume or with
            other settings (``differences`` lists them); a new run into a folder holding one.
    """
    folder = Path(folder).absolute()
    if resume and overwrite:
        raise RunFolderError("resume and overwrite exclude each other", folder)
    _refuse_if_held(folder)  # a busy folder is named as such, whatever it holds so far
    present = holds_run(folder)
    if resume:
        checkpoints = folder / "checkpoints"
        # the folders CheckpointManager.steps() lists: step_ and 8 digits
        has_checkpoint = checkpoints.is_dir() and any(
            _CHECKPOINT_DIR.fullmatch(entry.name) and entry.is_dir()
            for entry in checkpoints.iterdir()
        )
        if not has_checkpoint:
            if present:  # a new run there is refused too: only overwrite starts one
                raise RunFolderError(
                    f"nothing to resume in {folder}: its checkpoints are gone (or the run "
                    f"stopped before its first one); start over with overwrite (which deletes "
                    f"{', '.join(present)})",
                    folder,
                )
            what = "it holds no run" if folder.is_dir() else "it does not exist"
            raise RunFolderError(
                f"nothing to resume in {folder}: {what} (start a new run without resume)",
                folder,
            )
        # a file the resumed run rewrites, found as a folder (or anything but a file), would
        # stop it with a raw error once training started and config.json was rewritten
        not_files = [
            name
            for name in RUN_FILES
            if name not in _RUN_FOLDERS
            and (folder / name).exists()
            and not (folder / name).is_file()
        ]
        if not_files:
            raise RunFolderError(
                f"cannot resume {folder}: expected files, got a folder (or another kind of "
                f"entry) at {', '.join(not_files)}; the run rewrites them: move them away",
                folder,
            )
        if record is not None:
            found = differences(read_config(folder), record)
            if found:
                raise RunFolderError(
                    f"cannot resume {folder} with other settings: {format_differences(found)}",
                    folder,
                    found,
                )
    elif present and not overwrite:
        raise RunFolderError(
            f"{folder} already holds a run ({', '.join(present)}); resume it, or start over "
            "with overwrite (which deletes those files)",
            folder,
        )
    elif present:
        best_directories(folder)  # overwrite must know every folder of the run it deletes


def clear(folder) -> None:
    """Delete the files of the run in ``folder`` (:data:`RUN_FILES` and the folders of its best
    checkpoints), nothing else."""
    folder = Path(folder)
    for name in [*best_directories(folder), *RUN_FILES]:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        parent = path.parent  # a nested best directory's parents, if the run left them empty
        while parent != folder and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
