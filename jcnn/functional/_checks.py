"""Argument normalization, trace-time input checks and the precision rule shared by the
functional ops.

Every check runs on static shapes and dtypes, so it costs nothing under ``jit`` and raises at trace
time with a message naming the argument, what was expected and what came.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

PaddingLike = int | str | Sequence[int] | Sequence[tuple[int, int]]


def plain_ints(value):
    """A concrete 0-d or 1-D integer NumPy or JAX array as an int or a tuple of ints (as the
    Python spellings of a size or a window); anything else as it is."""
    if (
        isinstance(value, (np.ndarray, jax.Array))
        and not isinstance(value, jax.core.Tracer)
        and value.ndim <= 1
        and jnp.issubdtype(value.dtype, jnp.integer)
    ):
        return int(value) if value.ndim == 0 else tuple(np.asarray(value).tolist())
    return value


def as_int_tuple(value, n: int, name: str, *, minimum: int | None = None) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ``n`` ints) as a tuple of ``n`` Python ints.

    >>> as_int_tuple(2, 3, "stride")
    (2, 2, 2)
    >>> as_int_tuple((1, 2), 3, "stride")
    Traceback (most recent call last):
    ...
    ValueError: stride: expected an int or a sequence of 3 ints, got (1, 2)
    """
    value = plain_ints(value)
    if is_int(value):
        values = (int(value),) * n
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n or not all(map(is_int, value)):
            raise ValueError(f"{name}: expected an int or a sequence of {n} ints, got {value!r}")
        values = tuple(int(v) for v in value)
    else:
        raise TypeError(f"{name}: expected an int or a sequence of {n} ints, got {value!r}")
    if minimum is not None and any(v < minimum for v in values):
        raise ValueError(f"{name}: every entry must be >= {minimum}, got {value!r}")
    if any(not -(2**63) <= v < 2**63 for v in values):
        # XLA and NumPy hold sizes as int64: past it an OverflowError or a message from inside
        raise ValueError(f"{name}: every entry must be an int64 (< 2**63), got {value!r}")
    return values


def check_size_sequence(
    value, name: str, *, length: int | None = None, example: str | None = None, minimum: int = 0
) -> tuple[int, ...]:
    """``value``, a sequence of sizes such as a shape, as a tuple of Python ints, each >=
    ``minimum``: exactly ``length`` of them where given, else at least one. Unlike
    :func:`as_int_tuple`, a single int is refused, not broadcast; a 1-D NumPy or JAX array is
    accepted. ``example`` (such as ``"(H, W)"``) shows the expected layout in the message.

    >>> check_size_sequence(np.array([4, 5]), "in_spatial")
    (4, 5)
    >>> check_size_sequence(8, "shape", length=3, example="(H, W, C)")
    Traceback (most recent call last):
    ...
    TypeError: shape: expected a sequence of 3 ints such as (H, W, C), got 8
    """
    if getattr(value, "ndim", None) == 1:
        value = plain_ints(value)
    count = "a non-empty sequence of" if length is None else f"a sequence of {length}"
    expected = f"{count} ints" + (f" such as {example}" if example else "")
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or (len(value) == 0 if length is None else len(value) != length)
        or not all(map(is_int, value))
    ):
        raise TypeError(f"{name}: expected {expected}, got {value!r}")
    if any(s < minimum for s in value):
        raise ValueError(f"{name}: expected sizes >= {minimum}, got {tuple(value)!r}")
    return tuple(int(s) for s in value)


def check_positive_int(value, name: str) -> int:
    """``value`` as a Python int, raising unless it is an int >= 1 (as ``check_int`` takes it).

    >>> check_positive_int(0, "groups")
    Traceback (most recent call last):
    ...
    ValueError: groups: expected a positive int, got 0
    """
    if not is_int(value):
        raise TypeError(f"{name}: expected a positive int, got {value!r}")
    value = int(value)
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    if value >= 2**63:  # as a shape, a TypeError from deep inside JAX that names nothing
        raise ValueError(f"{name}: expected a positive int below 2**63, got {value}")
    return int(value)


def check_array(x, name: str, *, ndim: int | Sequence[int] | None = None) -> None:
    """Raise unless ``x`` is a floating array (optionally of one of the ranks ``ndim``)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name}: expected a floating-point array, got dtype {x.dtype}")
    if not getattr(x.dtype, "isnative", True):
        # JAX refuses such arrays deep inside with the whole array in the message
        raise TypeError(
            f"{name}: expected an array in native byte order, got dtype {x.dtype.str} "
            f"(convert with x.astype(x.dtype.newbyteorder('='))"
        )
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if x.ndim not in allowed:
            expected = " or ".join(str(a) for a in allowed)
            raise ValueError(
                f"{name}: expected rank {expected}, got rank {x.ndim} with shape {tuple(x.shape)}"
            )


def check_min_rank(x, name: str, min_rank: int, layout: str) -> None:
    """Raise unless ``x`` is a floating array of rank >= ``min_rank``; ``layout`` names its axes.

    >>> check_min_rank(jnp.ones(3), "x", 2, "(N, ..., C)")
    Traceback (most recent call last):
    ...
    ValueError: x: expected rank >= 2 (N, ..., C), got rank 1 with shape (3,)
    """
    check_array(x, name)
    if x.ndim < min_rank:
        raise ValueError(
            f"{name}: expected rank >= {min_rank} {layout}, got rank {x.ndim} "
            f"with shape {tuple(x.shape)}"
        )


def normalize_padding(
    padding: PaddingLike,
    in_sizes: Sequence[int],
    window: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    name: str = "padding",
) -> tuple[tuple[int, int], ...]:
    """Explicit ``((lo, hi), ...)`` padding for each spatial dim.

    Accepts an int (same on both sides of every dim), one int per dim, one ``(lo, hi)`` pair per
    dim, ``"VALID"`` (no padding) or ``"SAME"`` (output size ``ceil(in / stride)``, the extra pixel
    going to the high side, as in TensorFlow and ``lax``).

    >>> normalize_padding("SAME", (5, 6), (3, 2), (1, 2), (1, 1))
    ((1, 1), (0, 0))
    >>> normalize_padding(((0, 1), (2, 3)), (5, 6), (3, 2), (1, 1), (1, 1))
    ((0, 1), (2, 3))
    """
    n = len(in_sizes)
    if isinstance(padding, str):
        mode = padding.upper()
        if mode == "VALID":
            return ((0, 0),) * n
        if mode == "SAME":
            pads = []
            for size, k, s, d in zip(in_sizes, window, stride, dilation, strict=True):
                effective = (k - 1) * d + 1
                out = -(-size // s)
                total = max((out - 1) * s + effective - size, 0)
                pads.append((total // 2, total - total // 2))
            return tuple(pads)
        raise ValueError(f"{name}: expected 'SAME', 'VALID', or ints, got {padding!r}")
    if (
        isinstance(padding, Sequence)
        and padding
        and all(isinstance(p, Sequence) and not isinstance(p, str) for p in padding)
    ):
        if len(padding) != n or not all(
            len(p) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in p)
            for p in padding
        ):
            raise ValueError(
                f"{name}: expected {n} (lo, hi) pairs of ints, one per spatial dim, got {padding!r}"
            )
        pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
    else:
        pairs = tuple((p, p) for p in as_int_tuple(padding, n, name))
    if any(v < 0 for pair in pairs for v in pair):
        raise ValueError(f"{name}: padding must be non-negative, got {padding!r}")
    return pairs


def window_padding(
    in_sizes: Sequence[int],
    window: Sequence[int],
    padding: PaddingLike,
    stride: int | Sequence[int],
    dilation: int | Sequence[int],
    name: str,
) -> tuple[tuple[int, int], ...]:
    """``normalize_padding``'s ``((lo, hi), ...)`` once every dilated window is checked to fit
    its padded input; a ValueError naming ``name`` (the window's argument as its caller calls it:
    ``w`` for ``F.conv``, ``kernel_size`` for a module) otherwise.

    >>> window_padding((5, 6), (3, 3), "SAME", 1, (1, 2), "w")
    ((1, 1), (2, 2))
    """
    rank = len(window)
    stride = as_int_tuple(stride, rank, "stride", minimum=1)
    dilation = as_int_tuple(dilation, rank, "dilation", minimum=1)
    pads = normalize_padding(padding, in_sizes, window, stride, dilation)
    for dim, (size, k, d, (lo, hi)) in enumerate(
        zip(in_sizes, window, dilation, pads, strict=True)
    ):
        span = d * (k - 1) + 1
        if span > size + lo + hi:
            raise ValueError(
                f"{name}: the dilated window {span} (kernel {k}, dilation {d}) is larger than the "
                f"padded input {size + lo + hi} (size {size} + padding {(lo, hi)}) along spatial "
                f"dim {dim}"
            )
    return pads


def window_count(size: int, span: int, stride: int, lo: int, hi: int, ceil_mode: bool) -> int:
    """The number of windows ``span`` pixels wide, ``stride`` apart, over ``size`` pixels padded
    ``(lo, hi)``, counted as PyTorch does: with ``ceil_mode`` a last partial window is kept,
    overhanging the right edge, when it starts inside the input or the left padding. Below 1
    where no window fits.

    >>> window_count(5, 2, 2, 0, 0, False), window_count(5, 2, 2, 0, 0, True)
    (2, 3)
    """
    room = size + lo + hi - span
    out = (-(-room // stride) if ceil_mode else room // stride) + 1
    if ceil_mode and out > 1 and (out - 1) * stride >= size + lo:
        out -= 1
    return out


# XLA computes an array's size in bytes as a signed 64-bit integer; a larger shape aborts the
# process (a C++ "overflow in static extent product"), where a merely too large one is a
# catchable out-of-memory error.
_MAX_BYTES = 2**63 - 1


def check_extent(shape: Sequence[int], dtype, name: str, what: str) -> None:
    """Raise a ValueError naming ``name`` when an array ``shape`` of ``dtype`` (the ``what`` an op
    would build, e.g. "padded input") has more bytes than XLA can count, instead of XLA aborting
    the process. A symbolic dimension (``jax.export`` shape polymorphism) counts as 1.
    """
    known = [int(n) if isinstance(n, (int, np.integer)) else 1 for n in shape]
    if math.prod(known) * np.dtype(dtype).itemsize > _MAX_BYTES:
        raise ValueError(
            f"{name}: the {what} would have shape {tuple(shape)}, more than 2**63 - 1 bytes of "
            f"{np.dtype(dtype).name}"
        )


def float32_or_wider(dtype):
    """float32 for the half-precision floats, else ``dtype`` itself (float64 stays float64): the
    type jcnn computes and accumulates in, rounding once to the input's type at the end, as
    PyTorch's CPU kernels do; in half precision every intermediate would be rounded. A NumPy
    float64 input is computed in float32 unless ``jax_enable_x64`` is on (JAX holds no float64
    then, and asking for it warns)."""
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(dtype, jnp.float32))


def add_bias(y: jax.Array, bias: jax.Array | None) -> jax.Array:
    """``y + bias``, ``bias`` aligned with the trailing axes of ``y``, added in float32 or wider
    and rounded once to the type the sum promotes to: the same values, but ``bias``'s gradient, a
    sum over every other axis of ``y``, accumulates in float32 (summed in bfloat16 over a
    64x16x16 output it came out 86% short)."""
    if bias is None:
        return y
    dtype = jnp.result_type(y, bias)
    wide = float32_or_wider(dtype)
    aligned = bias.astype(wide).reshape((1,) * (y.ndim - bias.ndim) + bias.shape)
    return (y.astype(wide) + aligned).astype(dtype)


def check_dtype(dtype, name: str = "dtype"):
    """``dtype`` itself if it is None or names a floating dtype (``jnp.float32``, ``"bfloat16"``,
    ``np.dtype("float16")``...), else a ``TypeError`` naming the argument.

    >>> check_dtype(jnp.int32, "dtype")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    TypeError: dtype: expected None or a floating dtype ..., got int32
    """
    if dtype is None:
        return None
    expected = f"{name}: expected None or a floating dtype such as jnp.float32 or jnp.bfloat16"
    try:
        resolved = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"{expected}, got {_describe(dtype)}") from None
    if not jnp.issubdtype(resolved, jnp.floating):
        raise TypeError(f"{expected}, got {resolved}")
    return dtype


def check_key(key, name: str = "key") -> None:
    """Raise unless ``key`` is one ``jax.random`` key: typed (``jax.random.key``) or raw uint32."""
    dtype = getattr(key, "dtype", None)
    expected = (
        f"{name}: expected a jax.random key (jax.random.key(seed) or jax.random.PRNGKey(seed))"
    )
    if dtype is None or not (
        jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or dtype == jnp.uint32
    ):
        described = f"dtype {dtype}" if dtype is not None else type(key).__name__
        raise TypeError(f"{expected}, got {described}")
    shape = tuple(key.shape)
    if dtype == jnp.uint32:
        try:
            shape = tuple(jax.random.wrap_key_data(key).shape)
        except (TypeError, ValueError):
            raise TypeError(f"{expected}, got a uint32 array of shape {shape}") from None
    if shape != ():
        raise ValueError(
            f"{name}: expected a single jax.random key, got a batch of keys of shape {shape} "
            "(map over them with jax.vmap)"
        )


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as a Python int in ``[-2**63, 2**63 - 1]``, the seeds :func:`seed_key` takes."""
    seed = check_int(seed, name)
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"{name}: expected an int in [-2**63, 2**63 - 1], got {seed}")
    return seed


def seed_key(seed, name: str = "seed") -> jax.Array:
    """The ``jax.random`` key of an int ``seed`` in ``[-2**63, 2**63 - 1]``, distinct for each.

    ``jax.random.key`` keeps only a seed's low 32 bits unless 64-bit types are on, so seed
    ``2**32 + s`` (or ``-1``, wrapping to ``2**32 - 1``) would silently repeat another seed's run.
    A seed in ``[0, 2**32)`` gets ``jax.random.key(seed)`` itself; any other folds its high 32
    bits into the key of its low ones, with 64-bit types on or off.

    >>> bool((jax.random.key_data(seed_key(7)) == jax.random.key_data(jax.random.key(7))).all())
    True
    >>> bool((jax.random.key_data(seed_key(2**32 + 7)) == jax.random.key_data(seed_key(7))).all())
    False
    """
    seed = check_seed(seed, name)
    key = jax.random.key(seed % 2**32)
    high = (seed >> 32) % 2**32
    return key if high == 0 else jax.random.fold_in(key, high)


# One seed's independent streams, ``fold_in(seed_key(seed), stream)``: ``jcnn.data.Loader`` draws
# from 0-3 (order, augmentation, Poisson membership, alternating flips), ``fit``'s model (its
# initialization and dropout) from MODEL_STREAM, ``dp_aggregate``'s noise from NOISE_STREAM, so
# a loader, a model and DP noise given the same seed (as jcnn-train gives them) share no key.
MODEL_STREAM = 4
NOISE_STREAM = 5


def _is_real_scalar(value) -> bool:
    """A Python or NumPy real scalar, or a concrete 0-d real NumPy/JAX array; never a bool."""
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, (int, float, np.integer, np.floating)):
        return True
    dtype = getattr(value, "dtype", None)
    return (
        getattr(value, "shape", None) == ()
        and dtype is not None
        and (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
        and not isinstance(value, jax.core.Tracer)
    )


def _describe(value) -> str:
    if isinstance(value, (str, type(None), bool, np.bool_, int, float, np.number)):
        return repr(value)
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} of shape {tuple(shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"


def _range_text(low, high, low_open: bool, high_open: bool, finite: bool) -> str:
    if low is not None and high is not None:
        return f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    prefix = "a finite number" if finite else "a number"
    if low is not None:
        return f"{prefix} {'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{prefix} {'<' if high_open else '<='} {high}"
    return prefix


def check_real(
    value,
    name: str,
    *,
    low=None,
    high=None,
    low_open: bool = False,
    high_open: bool = False,
    finite: bool = True,
) -> float:
    """``value`` as a Python float, checked to be a real number within the given bounds.

    Accepts Python ints and floats, NumPy scalars and concrete 0-d real arrays; refuses bools,
    strings, ``None`` and arrays of other shapes with a ``TypeError``, and values outside
    ``[low, high]`` (open where ``low_open``/``high_open``) or non-finite ones (unless ``finite``
    is False) with a ``ValueError``, both naming the argument.

    >>> check_real(np.float32(0.5), "p", low=0, high=1)
    0.5
    >>> check_real(2.0, "p", low=0, high=1)
    Traceback (most recent call last):
    ...
    ValueError: p: expected a number in [0, 1], got 2.0
    >>> check_real(float("inf"), "eps", low=0, low_open=True)
    Traceback (most recent call last):
    ...
    ValueError: eps: expected a finite number > 0, got inf
    >>> check_real("0.1", "eps")
    Traceback (most recent call last):
    ...
    TypeError: eps: expected a finite number, got '0.1'
    """
    expected = _range_text(low, high, low_open, high_open, finite)
    if not _is_real_scalar(value):
        raise TypeError(f"{name}: expected {expected}, got {_describe(value)}")
    try:
        number = float(value)
    except OverflowError:  # a Python int beyond float's range: infinite as a float
        number = math.inf if value > 0 else -math.inf
    shown = value if isinstance(value, (int, float)) else number
    if math.isnan(number) or (finite and math.isinf(number)):
        raise ValueError(f"{name}: expected {expected}, got {shown!r}")
    if low is not None and (number < low or (low_open and number == low)):
        raise ValueError(f"{name}: expected {expected}, got {shown!r}")
    if high is not None and (number > high or (high_open and number == high)):
        raise ValueError(f"{name}: expected {expected}, got {shown!r}")
    return number


def check_real_or_traced(value, name: str, **bounds):
    """``check_real`` for a concrete value; a traced 0-d real array passes unchecked (its value is
    unknown at trace time) and comes back as it is."""
    if isinstance(value, jax.core.Tracer):
        if value.shape != () or not (
            jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
        ):
            raise TypeError(
                f"{name}: expected a real number or a 0-d real array, got {_describe(value)}"
            )
        return value
    return check_real(value, name, **bounds)


def checked_schedule(schedule: Callable, name: str) -> Callable:
    """``schedule`` with each rate it returns checked to be a real scalar (Optax would scale each
    parameter by a rate vector silently, or fail inside its update on a string)."""
    label = getattr(schedule, "__qualname__", None) or repr(schedule)
    try:
        inspect.signature(schedule).bind(0)
    except TypeError:
        raise TypeError(
            f"{name}: expected a number or a schedule taking the step, step -> rate, got "
            f"{label}{inspect.signature(schedule)}"
        ) from None
    except ValueError:  # a builtin or C callable: its signature is unknown, trust it
        pass

    def checked(step):
        try:
            rate = schedule(step)
        except jax.errors.ConcretizationTypeError as error:
            raise TypeError(
                f"{name}: the schedule {label} reads the step's value in Python (an if, int() or "
                f"float() of the step), which a jitted update cannot give it: write it with jnp "
                f"operations, e.g. jnp.where(step < 100, 0.1, 0.01), or an optax schedule"
            ) from error
        try:
            dtype = jnp.result_type(rate)
        except TypeError:
            dtype = None
        real = dtype is not None and any(
            jnp.issubdtype(dtype, kind) for kind in (jnp.floating, jnp.integer)
        )
        if rate is None or not real:
            raise TypeError(
                f"{name}: expected a schedule returning a real rate, got "
                f"{type(rate).__name__} {rate!r} from {label}"
            )
        if jnp.shape(rate) != ():
            raise ValueError(
                f"{name}: expected a schedule returning a scalar rate, got shape "
                f"{jnp.shape(rate)} from {label}"
            )
        if not isinstance(rate, jax.core.Tracer) and not 0 <= float(rate) < math.inf:
            at = "" if isinstance(step, jax.core.Tracer) else f" at step {int(step)}"
            raise ValueError(
                f"{name}: expected a schedule returning finite rates >= 0 (a negative rate "
                f"ascends the loss), got {float(rate):g}{at} from {label}"
            )
        return rate

    # the first rate now, as Optax will ask for it (an int32 count), so that a schedule that
    # starts negative is refused before training; later rates where they are concrete (eager)
    checked(jnp.zeros((), jnp.int32))
    return checked


def check_rate(value, name: str):
    """A schedule (a callable of the step, its rates checked to be real scalars), else a finite
    number >= 0 as a Python float (a NumPy scalar or 0-d array is accepted; NaN, infinity,
    strings and ``None`` are not), or a traced 0-d real array as it is."""
    if callable(value):
        return checked_schedule(value, name)
    try:
        rate = check_real_or_traced(value, name, low=0)
    except TypeError:
        raise TypeError(
            f"{name}: expected a finite number >= 0 or a schedule step -> rate, got {value!r}"
        ) from None
    return check_float32_rate(rate, name) if isinstance(rate, float) else rate


FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_float32_rate(rate: float, name: str) -> float:
    """``rate``, a float >= 0, if float32 holds it: the update computes in float32, where a
    larger rate (``1e308``) is infinite."""
    if rate > FLOAT32_MAX:
        raise ValueError(
            f"{name}: expected a finite number >= 0 within float32's range (the update computes "
            f"in float32), got {rate!r}"
        )
    return rate


def is_int(value) -> bool:
    """Whether ``check_int`` takes ``value`` as an int: a Python or NumPy integer or a concrete
    0-d integer array, never a bool."""
    if isinstance(value, (int, np.integer)):
        return not isinstance(value, (bool, np.bool_))
    return (
        getattr(value, "shape", None) == ()
        and hasattr(value, "dtype")
        and jnp.issubdtype(value.dtype, jnp.integer)
        and not isinstance(value, jax.core.Tracer)
    )


def check_count(value, name: str) -> int:
    """A positive int (``num_groups``, ``size``) as a Python int. Unlike a window, never a
    sequence: ``(3,)`` is refused, as ``jcnn.nn``'s modules refuse it."""
    if not is_int(value):
        raise TypeError(f"{name}: expected an int >= 1, got {value!r}")
    (value,) = as_int_tuple(value, 1, name, minimum=1)
    return value


def check_int(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as a Python int within ``[low, high]``: a Python or NumPy integer or a concrete
    0-d integer array, never a bool or a float (even an integral one).

    >>> check_int(np.int64(3), "bits", low=1, high=8)
    3
    >>> check_int(9, "bits", low=1, high=8)
    Traceback (most recent call last):
    ...
    ValueError: bits: expected an int in [1, 8], got 9
    >>> check_int(1.5, "step")
    Traceback (most recent call last):
    ...
    TypeError: step: expected an int, got 1.5
    """
    if low is not None and high is not None:
        expected = f"an int in [{low}, {high}]"
    elif low is not None:
        expected = f"an int >= {low}"
    elif high is not None:
        expected = f"an int <= {high}"
    else:
        expected = "an int"
    if not is_int(value):
        raise TypeError(f"{name}: expected {expected}, got {_describe(value)}")
    number = int(value)
    if (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{name}: expected {expected}, got {number}")
    return number


def check_bool(value, name: str) -> bool:
    """``value`` as a Python bool: a Python or NumPy bool only (it selects the computation).

    >>> check_bool(1, "train")
    Traceback (most recent call last):
    ...
    TypeError: train: expected a Python bool, got 1
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected a Python bool, got {_describe(value)}")
    return bool(value)


def check_choice(value, name: str, choices) -> str:
    """``value`` if it is one of the strings ``choices``, else a clear error.

    >>> check_choice("max", "reduction", ("mean", "sum"))
    Traceback (most recent call last):
    ...
    ValueError: reduction: expected one of 'mean', 'sum', got 'max'
    """
    listed = ", ".join(map(repr, choices))
    if not isinstance(value, str):
        raise TypeError(f"{name}: expected one of {listed}, got {_describe(value)}")
    if value not in choices:
        raise ValueError(f"{name}: expected one of {listed}, got {value!r}")
    return value
