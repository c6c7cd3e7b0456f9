"""What the Linen modules (``jcnn.nn``) and their NNX twins (``jcnn.nnx``) share: argument checks
with their messages, the convolution kernels' shapes and default initializers, and how a
container calls its layers. Written once here so that the twins cannot drift apart; no Flax.
"""

from __future__ import annotations

import inspect
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jcnn import init
from jcnn.functional._checks import (
    _describe,
    check_dtype,
    check_positive_int,
    float32_or_wider,
    window_padding,
)

Initializer = Callable[..., Any]

LAYOUT = {1: "(N, L, C)", 2: "(N, H, W, C)", 3: "(N, D, H, W, C)"}


def window_rank(window, name: str) -> int | None:
    """The spatial rank (1, 2 or 3) that a sequence ``window`` fixes; ``None`` for an int."""
    if isinstance(window, Sequence) and not isinstance(window, str):
        if len(window) not in LAYOUT:
            raise ValueError(f"{name}: expected 1, 2 or 3 spatial sizes, got {window!r}")
        return len(window)
    return None


def check_kernel_fits(module, in_sizes: Sequence[int], window: Sequence[int]) -> None:
    """A ValueError naming ``kernel_size`` where ``module``'s dilated window spans more than its
    padded input (the functional op would name its own argument, ``w`` or ``window``)."""
    window_padding(in_sizes, window, module.padding, module.stride, module.dilation, "kernel_size")


def check_initializer(value, name: str, default: Initializer | None = None) -> Initializer:
    """``value``, callable as ``init(key, shape, dtype)``, wrapped to check that it returns an
    array of that shape; ``default`` where ``value`` is ``None`` and there is a default; a
    TypeError naming ``name`` otherwise (also for a falsy non-callable such as 0, which
    ``value or default`` would silently replace, and for a factory passed uncalled:
    ``jcnn.init.he_normal`` for ``jcnn.init.he_normal()``)."""
    if value is None and default is not None:
        return default
    if not callable(value):
        raise TypeError(
            f"{name}: expected an initializer init(key, shape, dtype) such as "
            f"jcnn.init.he_normal(), got {_describe(value)}"
        )
    try:
        signature = inspect.signature(value).replace(return_annotation=inspect.Signature.empty)
    except ValueError:  # some builtins publish none
        signature = None
    if signature is not None:
        try:
            signature.bind(None, (), None)
        except TypeError:
            raise TypeError(
                f"{name}: expected an initializer init(key, shape, dtype), got "
                f"{getattr(value, '__qualname__', _describe(value))}{signature}, which cannot "
                "take those three arguments; a factory makes one when called: "
                "jcnn.init.he_normal(), not jcnn.init.he_normal"
            ) from None

    def checked(key, shape, dtype):
        array = value(key, shape, dtype)
        expected = f"{name}: expected init(key, shape={tuple(shape)}, dtype) to return an array"
        if getattr(array, "shape", None) is None:
            hint = " (a factory passed uncalled? call it: he_normal(), not he_normal)"
            raise TypeError(f"{expected}, got {_describe(array)}{hint if callable(array) else ''}")
        if tuple(array.shape) != tuple(shape):
            raise ValueError(f"{expected} of that shape, got shape {tuple(array.shape)}")
        return array

    return checked


def check_spatial_rank(x, rank: int, what: str) -> None:
    """Raise unless ``x`` is ``(N, *spatial, C)`` with ``rank`` spatial axes (for a ``what``)."""
    if x.ndim != rank + 2:
        raise ValueError(
            f"x: expected rank {rank + 2} {LAYOUT[rank]} for a {rank}-D {what}, got rank "
            f"{x.ndim} with shape {tuple(x.shape)}"
        )


def check_channels_divisible(channels: int, groups: int, what: str) -> None:
    """Raise unless ``groups`` is a positive int that divides ``channels``."""
    groups = check_positive_int(groups, "groups")
    if channels % groups:
        raise ValueError(f"groups: {what} ({channels}) must be divisible by groups ({groups})")


def check_conv_channels(in_channels: int, features: int, groups: int, in_what: str) -> None:
    """Raise unless ``features`` is a positive int and ``groups`` divides both channel counts
    (``in_what`` names the input channels in the message)."""
    features = check_positive_int(features, "features")
    check_channels_divisible(in_channels, groups, in_what)
    check_channels_divisible(features, groups, "features")


class KernelSpec(NamedTuple):
    """A layer's ``kernel`` shape, its output channels (the ``bias`` size) and the default
    initializer of its kernel."""

    shape: tuple[int, ...]
    features: int
    default_init: Initializer


def _plain(*counts) -> tuple[int, ...]:
    """Checked counts as Python ints (a concrete 0-d JAX or NumPy integer is accepted as a setting,
    but a parameter shape must hold ints)."""
    return tuple(operator.index(count) for count in counts)


def conv_kernel(
    window: tuple[int, ...], in_channels: int, features: int, groups: int
) -> KernelSpec:
    """``Conv``'s kernel ``(*window, C_in // groups, features)``, He normal with ``groups``."""
    in_channels, features, groups = _plain(in_channels, features, groups)
    return KernelSpec(
        (*window, in_channels // groups, features), features, init.he_normal(groups=groups)
    )


def depthwise_kernel(
    window: tuple[int, ...], in_channels: int, depth_multiplier: int
) -> KernelSpec:
    """``DepthwiseConv``'s kernel ``(*window, 1, C_in * depth_multiplier)``, He normal with
    ``groups = C_in``."""
    in_channels, depth_multiplier = _plain(in_channels, depth_multiplier)
    features = in_channels * depth_multiplier
    return KernelSpec((*window, 1, features), features, init.he_normal(groups=in_channels))


def conv_transpose_kernel(
    window: tuple[int, ...], in_channels: int, features: int, groups: int
) -> KernelSpec:
    """``ConvTranspose``'s kernel ``(*window, C_in, features // groups)``, He normal with
    ``fan_in = prod(window) * C_in // groups``: an output channel sees its group's inputs only."""
    in_channels, features, groups = _plain(in_channels, features, groups)
    he = init.he_normal()  # fan_in = prod(window) * C_in, from the kernel's shape

    def he_per_group(key, shape, dtype=jnp.float32):
        return he(key, shape, dtype) * math.sqrt(groups)

    return KernelSpec((*window, in_channels, features // groups), features, he_per_group)


def dense_kernel(in_features: int, features: int) -> KernelSpec:
    """``Dense``'s kernel ``(in_features, features)``, He normal."""
    in_features, features = _plain(in_features, features)
    return KernelSpec((in_features, features), features, init.he_normal())


def running_stats_dtype(param_dtype):
    """The dtype of a norm layer's running ``mean`` and ``var``: ``param_dtype`` widened to at
    least float32, so float64 parameters keep float64 statistics (float32 ones would round the
    evaluation-mode output to float32 precision) and half-precision ones get float32 as in Flax;
    float32 for ``None``."""
    if check_dtype(param_dtype, "param_dtype") is None:
        return jnp.dtype(jnp.float32)
    return jax.dtypes.canonicalize_dtype(float32_or_wider(param_dtype))


def check_layers(layers) -> None:
    """Raise unless ``layers`` is a sequence (not a string) of callables (a container's)."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Sequence):
        raise TypeError(
            f"layers: expected a sequence of modules or functions, got {type(layers).__name__}"
        )
    for index, layer in enumerate(layers):
        if not callable(layer):
            raise TypeError(f"layers: entry {index} is not callable: {layer!r}")


def check_branches(body, projection) -> None:
    """Raise unless a residual block's ``body`` is callable and ``projection`` callable or None."""
    if not callable(body):
        raise TypeError(f"body: expected a module or function, got {body!r}")
    if projection is not None and not callable(projection):
        raise TypeError(f"projection: expected a module, function or None, got {projection!r}")


def call_layer(layer: Callable, x, train: bool | None, where: str):
    """``layer(x, train=train)`` when ``layer`` takes ``train`` and one is given, else ``layer(x)``;
    a ValueError naming ``where`` when ``layer`` requires ``train`` and none is given."""
    try:
        parameter = inspect.signature(layer).parameters.get("train")
    except (TypeError, ValueError):
        parameter = None
    if parameter is None:
        return layer(x)
    if train is None:
        if parameter.default is inspect.Parameter.empty:
            raise ValueError(
                f"train: {where} ({type(layer).__name__}) needs train=True or False; "
                "pass train to the container"
            )
        return layer(x)
    return layer(x, train=train)


def add_shortcut(y, shortcut):
    """``y + shortcut`` for a residual block, once their shapes are checked to agree."""
    if y.shape != shortcut.shape:
        raise ValueError(
            f"body: output shape {tuple(y.shape)} differs from the shortcut's "
            f"{tuple(shortcut.shape)}; give a projection that maps x to the body's shape"
        )
    return y + shortcut
