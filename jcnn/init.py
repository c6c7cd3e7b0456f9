"""Weight initializers with the jax.nn.initializers signature ``(key, shape, dtype) -> array``.

Every fan-based initializer understands dense kernels ``(C_in, C_out)`` and conv kernels
``(*window, C_in // groups, C_out)`` (HWIO): with ``receptive = prod(window)``,

- ``fan_in = receptive * shape[-2]``: the inputs one output unit sees. The stored ``shape[-2]`` is
  already ``C_in // groups``, so this is right for grouped and depthwise convs with no extra
  argument.
- ``fan_out = receptive * shape[-1] // groups``: the outputs one input unit feeds. A grouped conv
  connects each input channel to only ``C_out // groups`` output channels, which the kernel shape
  cannot tell, so the initializers that use ``fan_out`` take ``groups``. PyTorch ignores groups
  (its ``fan_out`` is ``receptive * C_out``); that is jcnn's ``groups=1``, the default.

Formulas follow the course notes (a unit's pre-activation ``Y = sum_i W_i X_i`` keeps the variance
of its inputs when ``Var(W) = 1 / n``; ReLU halves it, hence ``2 / n``), with plain (not truncated)
normal draws as in the notes and PyTorch. Where the notes and libraries differ:

- ``xavier_*``: the notes define Xavier by ``Var(W) = 1 / fan_in`` (forward pass only); that is the
  default here (``mode="fan_in"``), the same as ``lecun_normal``. Glorot and Bengio's paper, PyTorch
  and ``jax.nn.initializers.glorot_*`` average both directions, ``Var(W) = 2 / (fan_in + fan_out)``:
  pass ``mode="fan_avg"`` for that.
- ``lecun_normal`` and ``he_normal`` draw a plain normal; ``jax.nn.initializers`` truncates it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jcnn.functional._checks import _describe, _is_real_scalar, check_key, check_positive_int

__all__ = [
    "compute_fans",
    "dirac",
    "from_array",
    "he_normal",
    "he_normal_per_position",
    "he_uniform",
    "lecun_normal",
    "normal",
    "ones",
    "orthogonal",
    "xavier_normal",
    "xavier_uniform",
    "with_dirac",
    "zeros",
]

_MODES = ("fan_in", "fan_out", "fan_avg")


def _scaled_draw(key, shape, dtype, distribution, scale):
    # drawn in float32 (or wider) and rounded to ``dtype``, as PyTorch does: JAX's own bfloat16
    # normal takes 128 values cut off at 2.9 standard deviations (float16: 1024, at 3.5)
    wide = jnp.promote_types(dtype, jnp.float32)
    if distribution == "normal":
        return (scale * jax.random.normal(key, shape, wide)).astype(dtype)
    return jax.random.uniform(key, shape, wide, -scale, scale).astype(dtype)


# An eager ``model.init`` compiles one sampling program per parameter shape. XLA's optimized
# compile of the normal sampler takes 0.5-2.5 s of CPU, the unoptimized one 0.25 s, and below this
# many elements either program samples in about a millisecond; above it, sampling time dominates
# (5x slower unoptimized). Under an outer ``jit`` both are inlined into the caller's program.
_FAST_COMPILE_ELEMENTS = 1 << 18
_draw_fast_compile = jax.jit(
    _scaled_draw,
    static_argnums=(1, 2, 3),
    compiler_options={"xla_backend_optimization_level": 0},
)
_draw_optimized = jax.jit(_scaled_draw, static_argnums=(1, 2, 3))


def _draw(key, shape: tuple[int, ...], dtype, distribution: str, scale: float) -> jax.Array:
    """``scale * N(0, 1)`` (``distribution="normal"``) or ``U(-scale, scale)`` of ``shape``."""
    if math.prod(shape) <= _FAST_COMPILE_ELEMENTS and not isinstance(key, jax.core.Tracer):
        try:
            return _draw_fast_compile(key, shape, dtype, distribution, scale)
        except ValueError as error:  # a concrete key inside an outer jit: no options there
            if "compiler_options" not in str(error):
                raise
    return _draw_optimized(key, shape, dtype, distribution, scale)


def _check_dims(shape) -> tuple[int, ...]:
    if not isinstance(shape, Sequence) or not all(
        isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise TypeError(f"shape: expected a sequence of non-negative ints, got {shape!r}")
    return tuple(int(d) for d in shape)


def _check_shape_dtype(key, shape, dtype, *, min_rank: int = 0):
    """Checked ``(shape, dtype)``: a tuple of ints and a floating dtype (``None``: float32)."""
    check_key(key)
    shape = _check_dims(shape)
    if len(shape) < min_rank:
        raise ValueError(
            f"shape: expected rank >= {min_rank} (a dense (C_in, C_out) or conv (*window, "
            f"C_in // groups, C_out) kernel), got {shape}"
        )
    dtype = jnp.float32 if dtype is None else dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"dtype: expected a floating dtype, got {jnp.dtype(dtype)}")
    return shape, dtype


def _check_positive(value, name: str) -> float:
    """``value`` as a Python float: a finite number > 0 (a 0-d array too)."""
    if not _is_real_scalar(value):
        raise TypeError(f"{name}: expected a positive number, got {_describe(value)}")
    number = float(value)
    if not (number > 0 and math.isfinite(number)):
        raise ValueError(f"{name}: expected a positive number, got {number}")
    return number


def compute_fans(shape: Sequence[int], groups: int = 1) -> tuple[int, int]:
    """``(fan_in, fan_out)`` of a dense or conv kernel ``(*window, C_in // groups, C_out)``.

    Args:
        shape: the kernel's shape, rank >= 2.
        groups: the conv's groups; ``C_out`` must divide by it.

    Returns:
        ``(prod(window) * shape[-2], prod(window) * shape[-1] // groups)``.

    >>> compute_fans((3, 3, 16, 32))
    (144, 288)
    >>> compute_fans((3, 3, 4, 32), groups=4)
    (36, 72)
    """
    if not isinstance(shape, Sequence) or len(shape) < 2:
        raise ValueError(
            f"shape: expected a dense (C_in, C_out) or conv (*window, C_in // groups, C_out) "
            f"kernel shape of rank >= 2, got {shape!r}"
        )
    shape = _check_dims(shape)
    groups = int(check_positive_int(groups, "groups"))
    if shape[-1] % groups:
        raise ValueError(
            f"groups: the kernel's {shape[-1]} output channels (shape {tuple(shape)}) must divide "
            f"by groups, got {groups}"
        )
    receptive = math.prod(shape[:-2])
    return receptive * shape[-2], receptive * shape[-1] // groups


def _fan(shape, mode: str, groups: int) -> float:
    fan_in, fan_out = compute_fans(shape, groups)
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2}[mode]
    if fan == 0:
        raise ValueError(f"shape: a kernel with no inputs or outputs has {mode} 0, got {shape}")
    return fan


def zeros(key: jax.Array, shape: Sequence[int], dtype: DTypeLike | None = jnp.float32) -> jax.Array:
    """All zeros (biases; the last BatchNorm scale of a residual block).

    >>> zeros(jax.random.key(0), (2,)).tolist()
    [0.0, 0.0]
    """
    shape, dtype = _check_shape_dtype(key, shape, dtype)
    return jnp.zeros(shape, dtype)


def ones(key: jax.Array, shape: Sequence[int], dtype: DTypeLike | None = jnp.float32) -> jax.Array:
    """All ones (BatchNorm and LayerNorm scales).

    >>> ones(jax.random.key(0), (2,)).tolist()
    [1.0, 1.0]
    """
    shape, dtype = _check_shape_dtype(key, shape, dtype)
    return jnp.ones(shape, dtype)


def normal(stddev: float = 0.01) -> Callable[..., jax.Array]:
    """Zero-mean normal with a fixed ``stddev`` (the notes' "small random numbers", ``0.01``).

    Args:
        stddev: standard deviation, positive.

    Returns:
        An initializer ``(key, shape, dtype=float32) -> array``.

    >>> normal(0.5)(jax.random.key(0), (3, 2)).shape
    (3, 2)
    """
    stddev = _check_positive(stddev, "stddev")

    def init(
        key: jax.Array, shape: Sequence[int], dtype: DTypeLike | None = jnp.float32
    ) -> jax.Array:
        shape, dtype = _check_shape_dtype(key, shape, dtype)
        return _draw(key, shape, dtype, "normal", stddev)

    return init


def _scaled_normal(variance_numerator: float, mode: str, groups: int):
    def init(
        key: jax.Array, shape: Sequence[int], dtype: DTypeLike | None = jnp.float32
    ) -> jax.Array:
        shape, dtype = _check_shape_dtype(key, shape, dtype, min_rank=2)
        std = math.sqrt(variance_numerator / _fan(shape, mode, groups))
        return _draw(key, shape, dtype, "normal", std)

    return init


def _scaled_uniform(variance_numerator: float, mode: str, groups: int):
    def init(
        key: jax.Array, shape: Sequence[int], dtype: DTypeLike | None = jnp.float32
    ) -> jax.Array:
        shape, dtype = _check_shape_dtype(key, shape, dtype, min_rank=2)
        # U(-a, a) has variance a**2 / 3.
        limit = math.sqrt(3 * variance_numerator / _fan(shape, mode, groups))
        return _draw(key, shape, dtype, "uniform", limit)

    return init


def _check_mode_and_groups(mode, groups) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode: expected one of {_MODES}, got {mode!r}")
    check_positive_int(groups, "groups")


def xavier_normal(
    gain: float = 1.0, *, mode: str = "fan_in", groups: int = 1
) -> Callable[..., jax.Array]:
    """Xavier/Glorot normal: ``N(0, gain**2 / fan)``; the notes' ``fan = fan_in`` by default.

    Args:
        gain: multiplies the standard deviation (PyTorch's ``calculate_gain``).
        mode: ``"fan_in"`` (the course notes), ``"fan_avg"`` (``(fan_in + fan_out) / 2``: Glorot
            and Bengio 2010, PyTorch's ``xavier_normal_``) or ``"fan_out"``.
        groups: the conv's groups, for ``fan_out`` (see the module docstring).

    Returns:
        An initializer ``(key, shape, dtype=float32) -> array``; shape rank >= 2.
    """
    gain = _check_positive(gain, "gain")
    _check_mode_and_groups(mode, groups)
    return _scaled_normal(gain**2, mode, groups)


def xavier_uniform(
    gain: float = 1.0, *, mode: str = "fan_in", groups: int = 1
) -> Callable[..., jax.Array]:
    """Xavier/Glorot uniform: ``U(-a, a)``, ``a = gain * sqrt(3 / fan)`` (variance ``gain**2/fan``).

    Args:
        gain: multiplies the limit.
        mode: ``"fan_in"`` (the course notes), ``"fan_avg"`` (Glorot and Bengio 2010, PyTorch's
            ``xavier_uniform_``: ``a = gain * sqrt(6 / (fan_in + fan_out))``) or ``"fan_out"``.
        groups: the conv's groups, for ``fan_out``.

    Returns:
        An initializer ``(key, shape, dtype=float32) -> array``; shape rank >= 2.
    """
    gain = _check_positive(gain, "gain")
    _check_mode_and_groups(mode, groups)
    return _scaled_uniform(gain**2, mode, groups)


def he_normal(*, mode: str = "fan_in", groups: int = 1) -> Callable[..., jax.Array]:
    """He/Kaiming normal for ReLU nets (He et al. 2015): ``N(0, 2 / fan)``, ``fan = fan_in``.

    The notes' ``randn(fan_in, fan_out) / sqrt(fan_in / 2)``; PyTorch's
    ``kaiming_normal_(w, mode="fan_in", nonlinearity="relu")``.

    Args:
        mode: ``"fan_in"`` keeps forward activations' variance; ``"fan_out"`` the backward
            gradients'.
        groups: the conv's groups, for ``fan_out``.

    Returns:
        An initializer ``(key, shape, dtype=float32) -> array``; shape rank >= 2.

    >>> w = he_normal()(jax.random.key(0), (3, 3, 64, 64))
    >>> round(float(w.std() * (2 / (3 * 3 * 64)) ** -0.5), 1)
    1.0
    """
    _check_mode_and_groups(mode, groups)
    return _scaled_normal(2.0, mode, groups)


def he_normal_per_position() -> Callable[..., jax.Array]:
    """He normal for an unshared (locally connected) kernel
    ``(*out_spatial, *window, C_in, C_out)``: ``N(0, 2 / fan_in)`` with
    ``fan_in = prod(window) * C_in``, drawn independently per output position.

    >>> w = he_normal_per_position()(jax.random.key(0), (4, 4, 3, 3, 8, 16))
    >>> round(float(w.std() * (2 / (3 * 3 * 8)) ** -0.5), 1)
    1.0
    """

    def initializer(
        key: jax.Array, shape: Sequence[int], dtype: DTypeLike | None = jnp.float32
    ) -> jax.Array:
        shape, dtype = _check_shape_dtype(key, shape, dtype, min_rank=4)
        if len(shape) % 2:
            raise ValueError(
                f"shape: expected (*out_spatial, *window, C_in, C_out) with as many window as "
                f"output axes, got {shape}"
            )
        rank = (len(shape) - 2) // 2
        out, window, (c_in, c_out) = shape[:rank], shape[rank : 2 * rank], shape[-2:]
        positions = math.prod(out)
        draws = he_normal()(key, (*window, c_in, positions * c_out), dtype)
        draws = draws.reshape(*window, c_in, positions, c_out)
        return jnp.moveaxis(draws, -2, 0).reshape(shape)

    return initializer


def he_uniform(*, mode: str = "fan_in", groups: int = 1) -> Callable[..., jax.Array]:
    """He/Kaiming uniform: ``U(-a, a)``, ``a = sqrt(6 / fan)``, variance ``2 / fan``.

    PyTorch's ``kaiming_uniform_(w, mode="fan_in", nonlinearity="relu")``.

    Args:
        mode: ``"fan_in"`` or ``"fan_out"``.
        groups: the conv's groups, for ``fan_out``.

    Returns:
        An initializer ``(key, shape, dtype=float32) -> array``; shape rank >= 2.
    """
    _check_mode_and_groups(mode, groups)
    return _scaled_uniform(2.0, mode, groups)


def lecun_normal() -> Callable[..., jax.Array]:
    """LeCun normal: ``N(0, 1 / fan_in)`` (LeCun et al. 1998; the notes' Xavier), for tanh/SELU.

    Returns:
        An initializer ``(key, shape, dtype=float32) -> array``; shape rank >= 2.
    """
    return _scaled_normal(1.0, "fan_in", 1)


def orthogonal(gain: float = 1.0) -> Callable[..., jax.Array]:
    """A (semi-)orthogonal kernel (Saxe et al. 2013), orthogonal as a ``(rows, C_out)`` matrix.

    With ``rows = prod(shape[:-1])`` (``prod(window) * C_in // groups`` for a conv kernel) and
    ``cols = shape[-1]``: the columns are orthonormal (``W^T W = gain**2 I``) when ``rows >= cols``,
    else the rows are. Drawn uniformly (Haar) via the QR of a normal matrix with the signs of
    ``R``'s diagonal folded into ``Q``.

    Args:
        gain: multiplies the matrix.

    Returns:
        An initializer ``(key, shape, dtype=float32) -> array``; shape rank >= 2.

    >>> w = orthogonal()(jax.random.key(0), (3, 3, 8, 16)).reshape(72, 16)
    >>> bool(jnp.allclose(w.T @ w, jnp.eye(16), atol=1e-5))
    True
    """
    gain = _check_positive(gain, "gain")

    def init(
        key: jax.Array, shape: Sequence[int], dtype: DTypeLike | None = jnp.float32
    ) -> jax.Array:
        shape, dtype = _check_shape_dtype(key, shape, dtype, min_rank=2)
        rows, cols = math.prod(shape[:-1]), shape[-1]
        tall = (max(rows, cols), min(rows, cols))
        a = jax.random.normal(key, tall, jnp.promote_types(dtype, jnp.float32))
        q, r = jnp.linalg.qr(a)
        q = q * jnp.where(jnp.diagonal(r) < 0, -1.0, 1.0).astype(q.dtype)[None, :]
        if rows < cols:
            q = q.T
        return (gain * q).astype(dtype).reshape(shape)

    return init


def dirac(groups: int = 1) -> Callable[..., jax.Array]:
    """The identity conv kernel: with padding ``(k - 1) // 2`` and odd windows, ``conv(x, w) == x``.

    For a kernel ``(*window, C_in // groups, C_out)``, output channel ``g * (C_out // groups) + d``
    of group ``g`` copies that group's input channel ``d`` at the window's centre
    (``window // 2``), for ``d < min(C_in // groups, C_out // groups)``; the other outputs are
    zero. This is PyTorch's ``dirac_(w, groups)`` in jcnn's layout. For an even window the centre
    is the upper middle tap, so the identity comes with a one-pixel shift.

    Args:
        groups: the conv's groups; ``C_out`` must divide by it.

    Returns:
        An initializer ``(key, shape, dtype=float32) -> array``; shape rank >= 3 (a conv kernel).

    >>> w = dirac()(jax.random.key(0), (3, 3, 2, 2))
    >>> w[1, 1].tolist(), float(w.sum())
    ([[1.0, 0.0], [0.0, 1.0]], 2.0)
    """
    check_positive_int(groups, "groups")

    def init(
        key: jax.Array, shape: Sequence[int], dtype: DTypeLike | None = jnp.float32
    ) -> jax.Array:
        shape, dtype = _check_shape_dtype(key, shape, dtype)
        if len(shape) < 3:
            raise ValueError(
                f"shape: expected a conv kernel (*window, C_in // groups, C_out) of rank >= 3, "
                f"got {shape}"
            )
        *window, in_per_group, out_channels = shape
        if out_channels % groups:
            raise ValueError(
                f"groups: the kernel's {out_channels} output channels (shape {shape}) must divide "
                f"by groups, got {groups}"
            )
        out_per_group = out_channels // groups
        kernel = np.zeros(shape, dtype=np.float32)
        centre = tuple(k // 2 for k in window)
        for g in range(groups):
            for d in range(min(in_per_group, out_per_group)):
                kernel[(*centre, d, g * out_per_group + d)] = 1.0
        return jnp.asarray(kernel, dtype)

    return init


def with_dirac(base: Callable[..., jax.Array], groups: int = 1) -> Callable[..., jax.Array]:
    """``base``'s kernel with its first output channels replaced by the identity (airbench94).

    Output channel ``d < C_in // groups`` of each group copies input channel ``d`` (the kernel of
    ``dirac(groups)`` there); the remaining output channels keep ``base``'s draw. A conv so
    initialized starts as a residual-like layer that passes its input through on those channels.

    Args:
        base: the initializer of the other output channels.
        groups: the conv's groups, as for ``dirac``.

    Returns:
        An initializer ``(key, shape, dtype=float32) -> array``; shape rank >= 3 (a conv kernel).

    >>> w = with_dirac(normal(1.0))(jax.random.key(0), (3, 3, 2, 5))
    >>> w[1, 1, :, :2].tolist(), float(jnp.abs(w[..., 2:]).sum()) > 0
    ([[1.0, 0.0], [0.0, 1.0]], True)
    """
    if not callable(base):
        raise TypeError(f"base: expected an initializer (key, shape, dtype) -> array, got {base!r}")
    identity = dirac(groups)

    def init(key, shape, dtype=jnp.float32):
        eye = identity(key, shape, dtype)
        *_, in_per_group, out_channels = eye.shape
        out_per_group = out_channels // groups
        copied = (jnp.arange(out_channels) % out_per_group) < min(in_per_group, out_per_group)
        return jnp.where(copied, eye, base(key, shape, dtype))

    return init


def from_array(array: jax.typing.ArrayLike) -> Callable[..., jax.Array]:
    """An initializer returning ``array`` itself: a kernel computed beforehand, e.g. from data.

    It checks that the parameter asks for exactly ``array``'s shape (nothing is broadcast or
    reshaped) and casts to the requested dtype.

    Args:
        array: the parameter's value (finite: a NaN or infinity is refused).

    Returns:
        An initializer ``(key, shape, dtype=float32) -> array``.

    >>> from_array(jnp.eye(2))(jax.random.key(0), (2, 2)).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    if not hasattr(array, "shape") or not hasattr(array, "dtype"):
        raise TypeError(f"array: expected an array, got {type(array).__name__}")
    value = jnp.asarray(array)
    if not isinstance(value, jax.core.Tracer):
        finite = np.isfinite(np.asarray(value, np.float64))
        if not finite.all():
            raise ValueError(
                f"array: expected finite values, got {int((~finite).sum())} NaN or infinite "
                f"value(s) of {value.size}"
            )

    def init(key, shape, dtype=jnp.float32):
        shape, dtype = _check_shape_dtype(key, shape, dtype)
        if shape != value.shape:
            raise ValueError(
                f"shape: the parameter has shape {shape}, but the given array has shape "
                f"{value.shape}"
            )
        return value.astype(dtype)

    return init
