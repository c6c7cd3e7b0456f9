"""Helpers shared by the NNX modules: argument checks, settings, parameter creation, train/eval
resolution."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jcnn import init
from jcnn.functional._checks import (
    _describe,
    as_int_tuple,
    check_array,
    check_bool,
    check_dtype,
)
from jcnn.nn._shared import (
    LAYOUT,
    Initializer,
    KernelSpec,
    check_initializer,
    check_spatial_rank,
    window_rank,
)


def static(value, name: str):
    """The module setting ``value`` (a window, stride, padding, size...) in plain Python: a NumPy
    scalar or a concrete 0-d NumPy/JAX number becomes a Python number, a concrete 1-D integer
    array a tuple of ints, and a list a tuple, at any depth.

    NNX keeps an array attribute as state: ``nnx.jit`` would trace it and the op refuse it (and
    ``nnx.state`` would list it with the parameters); a list would make the graph unhashable.
    Anything else (a string, None, a wrong number) is left to the op's check at the call, which
    names it as for the Linen twin; a traced value or another array cannot be static and raises
    here. (A single real setting such as ``eps`` goes through ``check_real`` instead, which checks
    it here and returns a Python float.)

    >>> static((jnp.array(2), np.int64(1)), "stride"), static(jnp.array(0.5), "rate")
    ((2, 1), 0.5)
    """
    if isinstance(value, (list, tuple)):
        return tuple(static(item, name) for item in value)
    if isinstance(value, np.floating):  # never a valid setting: the op names it as Linen's does
        return value
    if isinstance(value, np.generic):
        return value.item()
    if not isinstance(value, (np.ndarray, jax.Array)):
        return value
    number = jnp.issubdtype(value.dtype, jnp.integer) or (
        jnp.issubdtype(value.dtype, jnp.floating) and value.ndim == 0
    )
    if isinstance(value, jax.core.Tracer) or not number or value.ndim > 1:
        raise TypeError(
            f"{name}: expected a static setting (Python or NumPy numbers, concrete 0-d JAX "
            f"numbers or 1-D integer arrays, not traced ones), got {_describe(value)}"
        )
    return np.asarray(value).tolist() if value.ndim == 0 else tuple(np.asarray(value).tolist())


def _largest(setting, default: int) -> int:
    """The largest int in a setting (an int, or ints nested in sequences), at least ``default``;
    ``default`` for anything else (the op's check names a bad setting)."""
    if isinstance(setting, (int, np.integer)) and not isinstance(setting, bool):
        return max(int(setting), default)
    if isinstance(setting, tuple):
        return max((_largest(item, default) for item in setting), default=default)
    return default


def settings_rank(*settings) -> int:
    """The spatial rank that the first sequence among ``settings`` fixes (its length), else 2:
    int settings apply to every rank alike."""
    for setting in settings:
        if isinstance(setting, tuple) and len(setting) in LAYOUT:
            return len(setting)
    return 2


def check_settings(
    module, owner: type, spatial_rank: int, channels: int, *, window=1, dilation=1, padding=0
) -> None:
    """Run ``owner.__call__`` on ``module`` and an abstract input ``(1, *spatial, channels)``
    whose spatial sizes fit ``window`` with its ``dilation`` and ``padding``: the op's own checks
    of every setting (stride, padding form and mode, dilation, output_padding, dtype...) refuse a
    bad one at construction, under the name the call would give, instead of at the first call.
    Nothing is computed (``jax.eval_shape``).

    ``owner`` is the jcnn class whose ``__init__`` asks: a user's subclass may override
    ``__call__`` with more arguments, or with attributes its own ``__init__`` sets only after
    ``super().__init__()`` returns."""
    size = (_largest(window, 1) - 1) * _largest(dilation, 1) + 2 * _largest(padding, 0) + 2
    probe = jax.ShapeDtypeStruct((1, *(size,) * spatial_rank, channels), jnp.float32)
    jax.eval_shape(lambda x: owner.__call__(module, x), probe)


def check_rngs(rngs, owner: str) -> nnx.Rngs:
    """``rngs`` if it is an ``nnx.Rngs``; a TypeError naming ``owner`` otherwise."""
    if not isinstance(rngs, nnx.Rngs):
        raise TypeError(
            f"rngs: {owner} creates parameters and needs an nnx.Rngs (e.g. rngs=nnx.Rngs(0)), "
            f"got {type(rngs).__name__}"
        )
    return rngs


def param(rngs: nnx.Rngs, initializer: Initializer, shape: tuple[int, ...], dtype) -> nnx.Param:
    """A parameter drawn by ``initializer(key, shape, dtype)`` with a key of the params stream;
    ``dtype`` is the module's ``param_dtype``, checked by that name."""
    check_dtype(dtype, "param_dtype")
    try:
        stream = rngs["params"]  # Flax falls back on the "default" stream
    except KeyError:
        raise ValueError(
            f"rngs: the nnx.Rngs has no 'params' stream (nor a 'default' one) to draw the initial "
            f"{shape} parameter; give one, e.g. nnx.Rngs(seed) or nnx.Rngs(params=0, dropout=1)"
        ) from None
    return nnx.Param(initializer(stream(), shape, dtype))


def kernel_and_bias(
    rngs: nnx.Rngs,
    spec: KernelSpec,
    use_bias: bool,
    kernel_init: Initializer | None,
    bias_init: Initializer | None,
    param_dtype,
) -> tuple[nnx.Param, nnx.Param | None]:
    """The ``kernel`` and ``bias`` parameters that ``spec`` describes (``bias`` is ``None``
    without ``use_bias``); ``None`` initializers take the defaults, ``spec.default_init`` and
    zeros."""
    check_bool(use_bias, "use_bias")
    kernel_init = check_initializer(kernel_init, "kernel_init", spec.default_init)
    bias_init = check_initializer(bias_init, "bias_init", init.zeros)
    kernel = param(rngs, kernel_init, spec.shape, param_dtype)
    bias = param(rngs, bias_init, (spec.features,), param_dtype) if use_bias else None
    return kernel, bias


def spatial_window(kernel_size, spatial_dims: int | None, owner: str) -> tuple[int, ...]:
    """The kernel window as a tuple of ints.

    A sequence fixes the spatial rank; an int needs ``spatial_dims`` (default 2, images), since an
    NNX module creates its kernel before it sees an input.
    """
    spatial_dims = static(spatial_dims, "spatial_dims")
    if spatial_dims is not None and (
        isinstance(spatial_dims, (bool, np.bool_))
        or not isinstance(spatial_dims, (int, np.integer))
    ):
        raise TypeError(f"spatial_dims: expected 1, 2 or 3, got {spatial_dims!r}")
    if spatial_dims is not None and spatial_dims not in LAYOUT:
        raise ValueError(f"spatial_dims: expected 1, 2 or 3, got {spatial_dims!r}")
    n = window_rank(kernel_size, "kernel_size")
    if n is None:
        n = 2 if spatial_dims is None else spatial_dims
    elif spatial_dims is not None and spatial_dims != n:
        raise ValueError(
            f"spatial_dims: {spatial_dims} disagrees with kernel_size {kernel_size!r} "
            f"({n} spatial sizes) of {owner}"
        )
    return as_int_tuple(kernel_size, n, "kernel_size", minimum=1)


def check_input(x, spatial_rank: int | None, channels: int, owner: str) -> None:
    """Raise unless ``x`` is ``(N, *spatial, channels)`` with ``spatial_rank`` spatial axes
    (``None``: any rank >= 1 of the form ``(..., channels)``)."""
    check_array(x, "x")
    if spatial_rank is not None:
        check_spatial_rank(x, spatial_rank, owner)
    if x.ndim < 1:
        raise ValueError(f"x: expected rank >= 1 (..., {channels}) for {owner}, got a scalar")
    if x.shape[-1] != channels:
        raise ValueError(
            f"x: {owner} was built for {channels} features on the last axis, got shape "
            f"{tuple(x.shape)}"
        )


def check_flag(value, name: str) -> None:
    """Raise unless ``value`` is a bool (``None`` passes: the attribute decides).

    A traced array is refused too: train and evaluation are different programs, chosen in Python.
    """
    if value is not None and not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name}: expected True, False or None, got {value!r}")


def training(train: bool | None, attribute_says_train: bool) -> bool:
    """Whether this call trains: ``train`` when given, else the module's attribute."""
    check_flag(train, "train")
    return bool(attribute_says_train if train is None else train)


def value(variable):
    """The array of ``variable`` (``None`` stays ``None``)."""
    return None if variable is None else variable[...]
