"""Convolution through oneDNN on CPU (the optional native backend of :mod:`jcnn.native`).

``conv_general`` has the contract of :func:`jcnn.functional._conv_cpu.conv_general`: channels-last
input ``(N, *spatial, C)``, kernel ``(*window, C // groups, C_out)``, explicit non-negative padding,
1-, 2- or 3-D, float32 or bfloat16 (oneDNN accumulates bfloat16 in float32 and rounds once). On
CPU its three products (forward, input gradient, weight gradient) are XLA FFI calls into oneDNN;
on other platforms it is ``lax.conv_general_dilated``. One exception,
measured on the benchmark machine: with a single input channel (``C_in == 1``, LeNet-5's first
layer), oneDNN's channels-last forward and input gradient ran at a third to half of XLA's, so
those two products keep jcnn's XLA formulations there (XLA's forward, GEMM + col2im input
gradient); the weight gradient stays on oneDNN (1.5-2x XLA's). Depthwise convolutions
(``groups == C_in > 1``) run all three products on oneDNN, whose depthwise kernels
(``brdgmm_dw``/``jit_dw``) take channels-last directly: forward + both gradients measured 1.2-5x
PyTorch CPU and 1-5x jcnn's XLA shifted multiply-adds on MobileNetV2/ConvNeXt shapes, on
AVX-512 and with oneDNN capped at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``); see
``experiments/benchmarks/README.md``.

Each product is itself a ``jax.custom_vjp`` whose derivative is written with the other two (the
three are bilinear and each one's transpose is another), so derivatives of any order stay on
oneDNN. The FFI calls batch with ``vmap_method="expand_dims"``: the native side folds a vmapped
input into the batch axis when the kernel is shared, and loops otherwise (per-example weight
gradients).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jcnn import native
from jcnn.functional._conv_cpu import (
    _check,
    _Config,
    _output_sizes,
    _shift_input_grad,
    native_conv,
)

__all__ = ["config", "conv_general", "unsupported_reason"]

_PRODUCTS = {0: "forward", 1: "input gradient", 2: "weight gradient"}


def config(x, w, stride, padding, dilation, groups) -> _Config:
    """Check the operands and options as ``_conv_cpu.conv_general`` does; the static config."""
    return _check(x, w, stride, padding, dilation, groups, None)


def unsupported_reason(x, w, stride, padding, dilation, groups) -> str | None:
    """Why oneDNN cannot run this convolution on this CPU (one of its three products has no
    implementation for the dtype and shape, e.g. bfloat16 without AVX-512), or ``None``.

    Asked at trace time with the traced shapes; the batch size is irrelevant to oneDNN's choice
    (a ``vmap`` folds into it), so one answer covers the derivatives too.
    """
    static = config(x, w, stride, padding, dilation, groups)
    spatial = w.ndim - 2
    out_sizes = _output_sizes(
        x.shape[1:-1], w.shape[:-2], static.stride, static.padding, static.dilation
    )
    dims = (
        max(x.shape[0], 1),
        x.shape[-1],
        w.shape[-1],
        static.groups,
        *x.shape[1:-1],
        *out_sizes,
        *w.shape[:-2],
        *static.stride,
        *static.dilation,
        *(lo for lo, _ in static.padding),
        *(hi for _, hi in static.padding),
    )
    bfloat16 = x.dtype == jnp.bfloat16
    for op, product in _PRODUCTS.items():
        if op < 2 and _single_input_channel(w, static):
            continue  # kept on XLA (see the module docstring)
        reason = native.unsupported_reason(op, bfloat16, tuple(int(d) for d in dims), spatial)
        if reason is not None:
            return f"oneDNN has no {x.dtype} {product} for this convolution on this CPU ({reason})"
    return None


def conv_general(x, w, stride, padding, dilation, groups):
    """Cross-correlation equal to ``lax.conv_general_dilated``, through oneDNN on CPU.

    Needs the native library (:func:`jcnn.native.available`); a ``RuntimeError`` says why when it
    is missing, a ``ValueError`` when oneDNN has no implementation of the problem on this CPU
    (:func:`unsupported_reason`).

    >>> from jcnn import native
    >>> if native.available():
    ...     y = conv_general(jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4)), (1, 1),
    ...                      ((1, 1), (1, 1)), (1, 1), 1)
    ...     print(y.shape, float(y[0, 2, 2, 0]))
    ... else:
    ...     print((2, 6, 6, 4), 27.0)
    (2, 6, 6, 4) 27.0
    """
    static = config(x, w, stride, padding, dilation, groups)
    reason = unsupported_reason(x, w, stride, padding, dilation, groups)
    if reason is not None:
        raise ValueError(f"{reason}; jcnn.functional.conv routes such convolutions to XLA")
    return lax.platform_dependent(
        x, w, cpu=partial(_forward, config=static), default=partial(native_conv, config=static)
    )


def _call(target, out_shape, first, second, config):
    return jax.ffi.ffi_call(
        target, jax.ShapeDtypeStruct(out_shape, first.dtype), vmap_method="expand_dims"
    )(
        first,
        second,
        stride=np.asarray(config.stride, np.int64),
        pad_lo=np.asarray([lo for lo, _ in config.padding], np.int64),
        pad_hi=np.asarray([hi for _, hi in config.padding], np.int64),
        dilation=np.asarray(config.dilation, np.int64),
        groups=np.int64(config.groups),
    )


def _single_input_channel(w, config):
    return w.shape[-2] == 1 and config.groups == 1


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _forward(x, w, config):
    if _single_input_channel(w, config):
        return native_conv(x, w, config)
    out_sizes = _output_sizes(
        x.shape[1:-1], w.shape[:-2], config.stride, config.padding, config.dilation
    )
    return _call("jcnn_conv_forward", (x.shape[0], *out_sizes, w.shape[-1]), x, w, config)


def _forward_fwd(x, w, config):
    return _forward(x, w, config), (x, w)


def _forward_bwd(config, residuals, g):
    x, w = residuals
    return _backward_data(g, w, config, x.shape), _backward_weights(x, g, config, w.shape)


_forward.defvjp(_forward_fwd, _forward_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _backward_data(dy, w, config, x_shape):
    if _single_input_channel(w, config):
        return _shift_input_grad(dy, w, x_shape, config)
    return _call("jcnn_conv_backward_data", x_shape, dy, w, config)


def _backward_data_fwd(dy, w, config, x_shape):
    return _backward_data(dy, w, config, x_shape), (dy, w)


def _backward_data_bwd(config, x_shape, residuals, g):
    dy, w = residuals
    return _forward(g, w, config), _backward_weights(g, dy, config, w.shape)


_backward_data.defvjp(_backward_data_fwd, _backward_data_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _backward_weights(x, dy, config, w_shape):
    return _call("jcnn_conv_backward_weights", w_shape, x, dy, config)


def _backward_weights_fwd(x, dy, config, w_shape):
    return _backward_weights(x, dy, config, w_shape), (x, dy)


def _backward_weights_bwd(config, w_shape, residuals, g):
    x, dy = residuals
    return _backward_data(dy, g, config, x.shape), _forward(x, g, config)


_backward_weights.defvjp(_backward_weights_fwd, _backward_weights_bwd)
