"""Convolution that XLA:CPU runs near its matmul rate, in all three products.

``conv_general`` is a drop-in replacement for the one ``lax.conv_general_dilated`` call behind
``F.conv``: channels-last input ``(N, *spatial, C)``, kernel ``(*window, C // groups, C_out)``,
explicit padding, 1-, 2- or 3-D. On CPU its three products (forward, input gradient, weight
gradient: primitives of :mod:`jcnn.functional._conv_products`) use formulations that XLA:CPU
turns into large matrix products; on every other platform (``lax.platform_dependent``) it is
exactly ``lax.conv_general_dilated`` and its native gradients, so GPUs and TPUs keep cuDNN and
XLA's own convolutions.

The CPU formulations, chosen per shape at trace time by ``plan`` (rules measured on an AVX-512
machine, see ``experiments/benchmarks/README.md``):

* weight gradient: for kernels of at least ``_GEMM_MIN_WEIGHTS`` weights, im2col in batch chunks
  of about ``_CHUNK_BYTES`` of patches, one GEMM per chunk accumulated by ``lax.scan`` (XLA:CPU's
  own weight gradient ran at 10-40 GFLOP/s on airbench's layers, this at 50-130). Under ``vmap``
  (per-example gradients) it becomes one batched GEMM instead of a grouped convolution. Smaller
  kernels (LeNet) keep XLA's weight gradient, which is as fast there.
* weight gradient of a single image (``N == 1``: what each example of ``vmap`` over examples,
  as in per-example gradients, sees): under ``vmap`` XLA's weight gradient becomes a convolution
  with ``B * C`` feature groups and the im2col GEMM a batched GEMM fed by a ``B``-times larger
  patch matrix; XLA:CPU ran both at 10-20 GFLOP/s for LeNet-5. Instead, for few input channels
  per group (``_TAPS_FIRST_MAX_CHANNELS``) the patches are gathered from a channels-first copy of
  the image into ``(window, C, pixels)`` rows, one GEMM; for more channels, one GEMM per window
  offset (``(pixels, C)^T x (pixels, C_out)``) and no patch matrix at all. Vmapped over 64
  LeNet-5 examples: conv1 (5x5x1x20) 10 ms -> 3 ms, conv2 (5x5x20x50) 31 ms -> 21 ms.
* forward: XLA's convolution. A fused sum of broadcast multiplies, one per window offset and
  input channel (``ConvPlan(forward="shift")``), ran 15x faster than XLA:CPU's convolution on
  single-channel layers measured alone, but inside whole networks XLA materializes its terms:
  the course LeNet-5 ran inference at 16 ms with XLA's forward against 26-30 ms with it, and
  training at the same speed, so the default plan no longer picks it (selectable per call).
* input gradient: XLA's transposed convolution, or for few input channels one GEMM against the
  flattened kernel followed by col2im (a sum of strided pads, which XLA fuses into one loop);
  the latter too where XLA:CPU would abort compiling the former (``transpose_aborts_xla_cpu``)
  or compute it wrongly (``transpose_pads_negative_xla_cpu``).
* depthwise (one input channel per group, ``groups > 1``, any channel multiplier; float32 and
  float64): all three products as shifted multiply-adds over channels-last arrays, which XLA fuses
  into one vectorized loop each. Forward: the sum over window offsets of (strided slice of the
  padded input) x (kernel row). Input gradient: the same sum on the stride-dilated, re-padded
  cotangent with the flipped kernel (``"flipped_shift"``). Weight gradient: per window offset, the
  sum over batch and pixels of slice x cotangent (``"per_tap_sum"``). Forward + both gradients
  on MobileNetV2/ConvNeXt shapes (3x3 and 7x7, stride 1 and 2, 32-512 channels, batch 4, loaded
  2-core machine): 4-25x the plans above (XLA's forward and weight gradient, GEMM + col2im input
  gradient, whose col2im degrades with the window; 450x with a channel multiplier of 2) and
  6-40x XLA's grouped convolution, but 0.35-2.6x PyTorch: the weight gradient's per-offset
  reductions dominate. With the native library built, depthwise runs on oneDNN instead
  (:mod:`jcnn.functional._conv_onednn`).

Every formulation is written with ``lax`` operations and mapped by ``vmap`` over the leading
axes of its operands; values and gradients of any order equal ``lax.conv_general_dilated`` to
floating-point rounding (the sums are reordered).
"""

from __future__ import annotations

import itertools
import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jcnn.functional._checks import as_int_tuple, check_array, check_choice, check_positive_int
from jcnn.functional._conv_products import conv_products

__all__ = [
    "conv_general",
    "native_conv",
    "plan",
    "ConvPlan",
    "transpose_aborts_xla_cpu",
    "transpose_pads_negative_xla_cpu",
]

# Patches held per GEMM in the weight gradient: a few MB stays within L2/L3 on the measured
# machine; larger chunks ran up to 2x slower, smaller ones pay per-iteration overhead.
_CHUNK_BYTES = 4 * 2**20
# Below this many input channels per group XLA:CPU's transposed convolution (the input gradient)
# runs at 1-3 GFLOP/s (tiny inner products); GEMM + col2im runs far faster.
_FEW_CHANNELS = 2
# Kernels smaller than this (window * C_in/groups * C_out) make the weight-gradient GEMM a long thin
# reduction that XLA:CPU runs no faster than its own convolution (LeNet: equal within noise);
# from airbench's 3x3x24x64 (13,824) up, the chunked GEMM ran 2-4x faster.
_GEMM_MIN_WEIGHTS = 8192

# A single image's weight gradient (N == 1, each example of per-example gradients): up to this many
# input channels per group the channels-first patch matrix is cheap to gather (LeNet's conv1,
# RGB stems: 2-4x faster than XLA's); from LeNet's 20 channels on, XLA:CPU relaid it out with
# extra copies, and one GEMM per window offset ran 1.5x faster than XLA's weight gradient.
_TAPS_FIRST_MAX_CHANNELS = 4

# A depthwise weight gradient with more window offsets than this loops over them (``lax.scan``):
# unrolled, 49 offsets (7x7) compiled in 1.6-2.0 s and ran 1.3-1.7x slower on 8x8 and 14x14
# maps; up to 3x3 the unrolled sums compile as fast and ran up to 1.2x faster (AVX2 EPYC).
_UNROLLED_TAPS = 9

_SPATIAL_LETTERS = {1: "W", 2: "HW", 3: "DHW"}


class ConvPlan(NamedTuple):
    """The formulation of each product: ``forward`` is ``"xla"`` or ``"shift"``, ``input_grad``
    ``"xla"``, ``"shift"`` (GEMM + col2im) or ``"flipped_shift"`` (depthwise only),
    ``weight_grad`` is ``"xla"``, ``"im2col"``, ``"taps_first"`` (patches as
    ``(window, C, pixels)`` rows), ``"per_tap"`` (one GEMM per window offset) or ``"per_tap_sum"``
    (depthwise only); ``chunk`` is images per ``"im2col"`` GEMM."""

    forward: str
    input_grad: str
    weight_grad: str
    chunk: int


class _Config(NamedTuple):
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int
    plan: ConvPlan | None


def plan(x_shape, w_shape, stride, padding, dilation, groups, itemsize=4) -> ConvPlan:
    """The CPU formulation ``conv_general`` picks for these static shapes and options.

    >>> plan((128, 28, 28, 1), (5, 5, 1, 6), (1, 1), ((2, 2), (2, 2)), (1, 1), 1)
    ConvPlan(forward='xla', input_grad='shift', weight_grad='xla', chunk=32)
    >>> plan((1, 14, 14, 20), (5, 5, 20, 50), (1, 1), ((2, 2), (2, 2)), (1, 1), 1).weight_grad
    'per_tap'
    >>> plan((32, 28, 28, 256), (7, 7, 1, 256), (1, 1), ((3, 3), (3, 3)), (1, 1), 256)[:3]
    ('shift', 'flipped_shift', 'per_tap_sum')
    """
    window = w_shape[:-2]
    if not all(isinstance(size, int) for size in x_shape):
        # Symbolic sizes (jax.export's shape polymorphism) cannot choose by size: XLA's own
        # products take any, except the input gradient XLA:CPU aborts on, which a symbolic batch
        # (concrete spatial sizes) still reaches.
        spatial = x_shape[1:-1]
        fails = all(isinstance(size, int) for size in spatial) and _transpose_fails_xla_cpu(
            window,
            stride,
            dilation,
            padding,
            spatial,
            _output_sizes(spatial, window, stride, padding, dilation),
            groups,
        )
        return ConvPlan("xla", "shift" if fails else "xla", "xla", 1)
    channels_per_group = w_shape[-2]
    few = channels_per_group < _FEW_CHANNELS
    out_sizes = _output_sizes(x_shape[1:-1], window, stride, padding, dilation)
    patch_bytes = math.prod(out_sizes) * math.prod(window) * x_shape[-1] * itemsize
    chunk = _chunk_size(x_shape[0], patch_bytes)
    if _depthwise(w_shape, groups) and itemsize >= 4:
        # Half-precision sums of many products would round at every term: those keep XLA's.
        return ConvPlan("shift", "flipped_shift", "per_tap_sum", chunk)
    if x_shape[0] == 1:
        weight_grad = "taps_first" if channels_per_group <= _TAPS_FIRST_MAX_CHANNELS else "per_tap"
    elif math.prod(w_shape) >= _GEMM_MIN_WEIGHTS:
        weight_grad = "im2col"
    else:
        weight_grad = "xla"
    fails = _transpose_fails_xla_cpu(
        window, stride, dilation, padding, x_shape[1:-1], out_sizes, groups
    )
    return ConvPlan(
        forward="xla",
        input_grad="shift" if few or fails else "xla",
        weight_grad=weight_grad,
        chunk=chunk,
    )


def transpose_aborts_xla_cpu(
    window, stride, dilation, padding, in_sizes, out_sizes, groups
) -> bool:
    """Whether XLA:CPU (jaxlib 0.10.2) aborts the process compiling this convolution's
    transpose (its input gradient, or ``F.conv_transpose``) written as a convolution.

    Its algebraic simplifier swaps the operands of a convolution whose kernel is larger than its
    input, and copies unchanged any dim it takes for a "group" dim (2 taps, base dilation 2,
    stride 1, no padding), though the swapped kernel there is the input, of another size: the
    check "Window dimensions do not match RHS shape" then fails. The transpose of an ungrouped
    convolution has such a dim where the forward one has 2 undilated taps at stride 2 and its
    transposed window needs no padding (a non-positive amount, which XLA turns into a slice).
    ``in_sizes`` are the spatial sizes of the convolution's input, ``out_sizes`` of its output.
    The swap also needs the kernel to be the larger operand; that is left out, so this may say
    ``True`` where XLA would not abort.
    """
    if groups != 1:
        return False
    for k, s, d, (lo, _), size, n in zip(
        window, stride, dilation, padding, in_sizes, out_sizes, strict=True
    ):
        low = d * (k - 1) - lo
        high = size + d * (k - 1) - (n - 1) * s - 1 - low
        if (k, s, d) == (2, 2, 1) and low <= 0 and high <= 0:
            return True
    return False


def transpose_pads_negative_xla_cpu(window, stride, dilation, padding, in_sizes, out_sizes) -> bool:
    """Whether this convolution's input gradient, written as XLA's transposed convolution, pads
    some dim by a negative amount below and a positive one above, which XLA:CPU (jaxlib 0.10.2)
    computes wrongly from four input channels on: values far off, different from run to run (a
    negative low padding comes from a padding beyond the dilated window's reach, e.g. 2 taps
    padded by 3 below and 0 above). ``in_sizes``/``out_sizes`` as for
    ``transpose_aborts_xla_cpu``."""
    for k, s, d, (lo, _), size, n in zip(
        window, stride, dilation, padding, in_sizes, out_sizes, strict=True
    ):
        low = d * (k - 1) - lo
        high = size + d * (k - 1) - (n - 1) * s - 1 - low
        if low < 0 < high:
            return True
    return False


def _transpose_fails_xla_cpu(window, stride, dilation, padding, in_sizes, out_sizes, groups):
    """Whether XLA:CPU would abort on or miscompute this convolution's input gradient."""
    return transpose_aborts_xla_cpu(
        window, stride, dilation, padding, in_sizes, out_sizes, groups
    ) or transpose_pads_negative_xla_cpu(window, stride, dilation, padding, in_sizes, out_sizes)


def _depthwise(w_shape, groups) -> bool:
    """One input channel per group and more than one group (``groups == C_in``)."""
    return w_shape[-2] == 1 and groups > 1


def _chunk_size(batch, patch_bytes_per_image):
    """Images per weight-gradient GEMM: about ``_CHUNK_BYTES`` of patches, dividing ``batch``
    evenly when a divisor is near (one scan, no remainder GEMM to compile)."""
    largest = max(1, min(batch, _CHUNK_BYTES // max(patch_bytes_per_image, 1)))
    for chunk in range(largest, (largest + 1) // 2 - 1, -1):
        if batch % chunk == 0:
            return chunk
    return largest


def conv_general(x, w, stride, padding, dilation, groups, *, conv_plan: ConvPlan | None = None):
    """Cross-correlation equal to ``lax.conv_general_dilated``, fast on CPU in all three products.

    Args:
      x: input ``(N, *spatial, C)`` with 1 to 3 spatial dims.
      w: kernel ``(*window, C // groups, C_out)``, same dtype as ``x``.
      stride: one positive int per spatial dim.
      padding: one ``(lo, hi)`` pair of non-negative ints per spatial dim.
      dilation: one positive int per spatial dim (kernel dilation).
      groups: feature groups; divides ``C`` and ``C_out``.
      conv_plan: force a formulation (tests and benchmarks); by default ``plan`` picks per shape.
        ``"flipped_shift"`` and ``"per_tap_sum"`` need one input channel per group.

    Returns:
      ``(N, *out_spatial, C_out)``, as ``lax.conv_general_dilated`` computes it.

    >>> x = jnp.ones((2, 6, 6, 3)); w = jnp.ones((3, 3, 3, 4))
    >>> conv_general(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1), 1).shape
    (2, 6, 6, 4)
    """
    config = _check(x, w, stride, padding, dilation, groups, conv_plan)
    return lax.platform_dependent(
        x, w, cpu=partial(_cpu_conv, config=config), default=partial(native_conv, config=config)
    )


def native_conv(x, w, config):
    """``lax.conv_general_dilated`` in jcnn's layout (NHWC / HWIO), for ``config``'s options."""
    letters = _SPATIAL_LETTERS[w.ndim - 2]
    return lax.conv_general_dilated(
        x,
        w,
        config.stride,
        config.padding,
        rhs_dilation=config.dilation,
        dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"),
        feature_group_count=config.groups,
    )


def _check(x, w, stride, padding, dilation, groups, conv_plan) -> _Config:
    check_array(w, "w", ndim=(3, 4, 5))
    if w.size == 0:
        raise ValueError(f"w: expected a kernel with at least one element, got shape {w.shape}")
    n = w.ndim - 2
    check_array(x, "x", ndim=n + 2)
    if x.dtype != w.dtype:
        raise TypeError(f"w: expected the dtype of x ({x.dtype}), got {w.dtype}")
    stride = as_int_tuple(stride, n, "stride", minimum=1)
    dilation = as_int_tuple(dilation, n, "dilation", minimum=1)
    if (
        not isinstance(padding, (tuple, list))
        or len(padding) != n
        or not all(isinstance(p, (tuple, list)) and len(p) == 2 for p in padding)
    ):
        raise ValueError(f"padding: expected {n} (lo, hi) pairs, got {padding!r}")
    padding = tuple(as_int_tuple(p, 2, "padding", minimum=0) for p in padding)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups: expected a positive int, got {groups!r}")
    channels, out_channels = x.shape[-1], w.shape[-1]
    if channels % groups or out_channels % groups:
        raise ValueError(
            f"groups: must divide input channels {channels} and output channels {out_channels}, "
            f"got {groups}"
        )
    if w.shape[-2] * groups != channels:
        raise ValueError(
            f"w: expected {channels // groups} input channels per group (x has {channels}, "
            f"groups={groups}), got shape {tuple(w.shape)}"
        )
    out_sizes = _output_sizes(x.shape[1:-1], w.shape[:-2], stride, padding, dilation)
    if any(size < 1 for size in out_sizes):
        raise ValueError(
            f"w: dilated window {tuple(w.shape[:-2])} (dilation {dilation}) is larger than the "
            f"padded input {tuple(x.shape[1:-1])} with padding {padding}"
        )
    if conv_plan is not None:
        _check_plan(conv_plan, w.shape)
    return _Config(stride, padding, dilation, groups, conv_plan)


_FORMULATIONS = {
    "forward": ("xla", "shift"),
    "input_grad": ("xla", "shift", "flipped_shift"),
    "weight_grad": ("xla", "im2col", "taps_first", "per_tap", "per_tap_sum"),
}
# Formulations that spread each group's single input channel over its outputs.
_ONE_CHANNEL_PER_GROUP = ("flipped_shift", "per_tap_sum")


def _check_plan(conv_plan, w_shape) -> None:
    """A forced plan names known formulations that apply to this kernel: an unknown name would
    silently run XLA's product, a depthwise one on a wider kernel failed deep inside."""
    if not isinstance(conv_plan, ConvPlan):
        raise TypeError(f"conv_plan: expected a ConvPlan or None, got {type(conv_plan).__name__}")
    for field, choices in _FORMULATIONS.items():
        value = getattr(conv_plan, field)
        check_choice(value, f"conv_plan.{field}", choices)
        if value in _ONE_CHANNEL_PER_GROUP and w_shape[-2] != 1:
            raise ValueError(
                f"conv_plan.{field}: {value!r} needs one input channel per group "
                f"(w.shape[-2] == 1), got w of shape {tuple(w_shape)}"
            )
    check_positive_int(conv_plan.chunk, "conv_plan.chunk")


def _output_sizes(in_sizes, window, stride, padding, dilation):
    return tuple(
        (size + lo + hi - (k - 1) * d - 1) // s + 1
        for size, k, s, (lo, hi), d in zip(in_sizes, window, stride, padding, dilation, strict=True)
    )


def _resolve_plan(x_shape, w_shape, dtype, config) -> ConvPlan:
    if config.plan is not None:
        return config.plan
    return plan(
        x_shape,
        w_shape,
        config.stride,
        config.padding,
        config.dilation,
        config.groups,
        jnp.dtype(dtype).itemsize,
    )


def _cpu_forward(x, w, config, y_shape):
    if _resolve_plan(x.shape, w.shape, x.dtype, config).forward == "shift":
        return _shift_forward(x, w, config)
    return native_conv(x, w, config)


def _cpu_input_grad(g, w, config, x_shape):
    formulation = _resolve_plan(x_shape, w.shape, g.dtype, config).input_grad
    if formulation == "shift":
        return _shift_input_grad(g, w, x_shape, config)
    if formulation == "flipped_shift":
        return _flipped_shift_input_grad(g, w, x_shape, config)
    zeros = jnp.zeros(x_shape, g.dtype)
    return jax.vjp(lambda x: native_conv(x, w, config), zeros)[1](g)[0]


def _cpu_weight_grad(x, g, config, w_shape):
    conv_plan = _resolve_plan(x.shape, w_shape, x.dtype, config)
    if conv_plan.weight_grad == "im2col":
        return _im2col_weight_grad(x, g, w_shape, config, conv_plan.chunk)
    if conv_plan.weight_grad == "taps_first":
        return _taps_first_weight_grad(x, g, w_shape, config)
    if conv_plan.weight_grad == "per_tap":
        return _per_tap_weight_grad(x, g, w_shape, config)
    if conv_plan.weight_grad == "per_tap_sum":
        return _per_tap_sum_weight_grad(x, g, w_shape, config)
    zeros = jnp.zeros(w_shape, x.dtype)
    return jax.vjp(lambda w: native_conv(x, w, config), zeros)[1](g)[0]


_PRODUCTS = conv_products("jcnn_xla_cpu_conv", _cpu_forward, _cpu_input_grad, _cpu_weight_grad)


def _cpu_conv(x, w, config):
    out_sizes = _output_sizes(
        x.shape[1:-1], w.shape[:-2], config.stride, config.padding, config.dilation
    )
    return _PRODUCTS.forward(x, w, config, (x.shape[0], *out_sizes, w.shape[-1]))


def _pad_input(x, config):
    return lax.pad(
        x,
        jnp.zeros((), x.dtype),
        ((0, 0, 0), *((lo, hi, 0) for lo, hi in config.padding), (0, 0, 0)),
    )


def _window_slices(x_padded, window, out_sizes, config, first_spatial_axis=1):
    """For each window offset (row-major), the input pixels it multiplies: ``(N, *out, C)``, or
    for another layout the slices of the spatial axes that start at ``first_spatial_axis``."""
    before = x_padded.shape[:first_spatial_axis]
    after = x_padded.shape[first_spatial_axis + len(window) :]
    for offset in itertools.product(*(range(k) for k in window)):
        starts = [o * d for o, d in zip(offset, config.dilation, strict=True)]
        limits = [
            a + (n - 1) * s + 1 for a, n, s in zip(starts, out_sizes, config.stride, strict=True)
        ]
        yield lax.slice(
            x_padded,
            (0,) * len(before) + tuple(starts) + (0,) * len(after),
            tuple(before) + tuple(limits) + tuple(after),
            (1,) * len(before) + tuple(config.stride) + (1,) * len(after),
        )


def _grouped(a, groups):
    """``(..., C)`` as ``(..., groups, C // groups)``."""
    return a.reshape(*a.shape[:-1], groups, a.shape[-1] // groups)


def _shift_forward(x, w, config):
    """Sum over window offsets and input channels of (shifted input channel) * (kernel row).

    With few input channels per group every term is a broadcast multiply, and XLA fuses the whole
    sum into one loop over the output: no patch matrix, no matrix product with a tiny inner
    dimension (which XLA:CPU runs at 1-3 GFLOP/s).
    """
    window = w.shape[:-2]
    groups = config.groups
    out_sizes = _output_sizes(x.shape[1:-1], window, config.stride, config.padding, config.dilation)
    channels_per_group, out_per_group = w.shape[-2], w.shape[-1] // groups
    taps = w.reshape(-1, channels_per_group, w.shape[-1])  # (K, Cg, O)
    spatial_ones = (1,) * (x.ndim - 1)
    total = None
    for tap, shifted in zip(
        taps, _window_slices(_pad_input(x, config), window, out_sizes, config), strict=True
    ):
        for channel in range(channels_per_group):
            # Input channel `channel` of every group, repeated over its group's outputs.
            column = shifted[..., channel::channels_per_group]
            if groups > 1:
                column = jnp.repeat(column, out_per_group, axis=-1)
            term = column * tap[channel].reshape(*spatial_ones, w.shape[-1])
            total = term if total is None else total + term
    return total


def _shift_input_grad(g, w, x_shape, config):
    """One GEMM of the output gradient with the flattened kernel, then col2im as strided pads."""
    window = w.shape[:-2]
    groups = config.groups
    taps = w.reshape(-1, w.shape[-2], groups, w.shape[-1] // groups)  # (K, Cg, G, Og)
    columns = jnp.einsum("...go,kcgo->k...gc", _grouped(g, groups), taps)
    out_sizes = g.shape[1:-1]
    zero = jnp.zeros((), g.dtype)
    total = None
    for column, offset in zip(columns, itertools.product(*(range(k) for k in window)), strict=True):
        column = column.reshape(*column.shape[:-2], x_shape[-1])
        # Place tap `offset`'s contribution at padded positions o*d + s*t, then crop the padding
        # (negative edge padding) to land on x's own pixels.
        spec = [(0, 0, 0)]
        for o, d, s, n, size, (lo, hi) in zip(
            offset,
            config.dilation,
            config.stride,
            out_sizes,
            x_shape[1:-1],
            config.padding,
            strict=True,
        ):
            start = o * d
            spec.append((start - lo, size + lo + hi - (start + (n - 1) * s + 1) - hi, s - 1))
        spec.append((0, 0, 0))
        term = lax.pad(column, zero, spec)
        total = term if total is None else total + term
    return total


def _im2col_weight_grad(x, g, w_shape, config, chunk):
    """Patches of ``chunk`` images at a time times the output gradient, one GEMM per chunk."""
    window = w_shape[:-2]
    groups = config.groups
    out_sizes = g.shape[1:-1]

    def chunk_grad(x_chunk, g_chunk):
        slices = list(_window_slices(_pad_input(x_chunk, config), window, out_sizes, config))
        patches = _grouped(jnp.stack(slices, axis=-2), groups)  # (n, *out, K, G, Cg)
        patches = patches.reshape(-1, *patches.shape[-3:])
        grads = _grouped(g_chunk, groups).reshape(-1, groups, w_shape[-1] // groups)
        dw = jnp.einsum("mkgc,mgo->kcgo", patches, grads)
        return dw.reshape(w_shape)

    batch = x.shape[0]
    num_chunks, rest = divmod(batch, chunk)
    if num_chunks <= 1:
        return chunk_grad(x, g)
    whole = num_chunks * chunk

    def step(total, chunk_pair):
        return total + chunk_grad(*chunk_pair), None

    chunks = (
        x[:whole].reshape(num_chunks, chunk, *x.shape[1:]),
        g[:whole].reshape(num_chunks, chunk, *g.shape[1:]),
    )
    total, _ = lax.scan(step, jnp.zeros(w_shape, x.dtype), chunks)
    if rest:
        total = total + chunk_grad(x[whole:], g[whole:])
    return total


def _taps_first_weight_grad(x, g, w_shape, config):
    """One GEMM of ``(window, C, pixels)`` patch rows, gathered from a channels-first copy of
    ``x`` (cheap for few channels), with the output gradient ``(pixels, C_out)``."""
    window = w_shape[:-2]
    groups = config.groups
    channels_first = jnp.moveaxis(_pad_input(x, config), -1, 0)  # (C, N, *spatial)
    slices = _window_slices(channels_first, window, g.shape[1:-1], config, first_spatial_axis=2)
    patches = jnp.stack(list(slices))  # (K, C, N, *out)
    patches = patches.reshape(patches.shape[0], groups, w_shape[-2], -1)  # (K, G, Cg, M)
    grads = _grouped(g, groups).reshape(-1, groups, w_shape[-1] // groups)  # (M, G, Og)
    dw = lax.dot_general(patches, grads, (((3,), (0,)), ((1,), (1,))))  # (G, K, Cg, Og)
    return jnp.moveaxis(dw, 0, 2).reshape(w_shape)


def _per_tap_weight_grad(x, g, w_shape, config):
    """For each window offset, ``(pixels, C)^T x (pixels, C_out)`` per group: the GEMMs read the
    shifted input directly, no patch matrix."""
    window = w_shape[:-2]
    groups = config.groups
    grads = _grouped(g, groups).reshape(-1, groups, w_shape[-1] // groups)  # (M, G, Og)
    taps = [
        lax.dot_general(
            _grouped(shifted, groups).reshape(-1, groups, w_shape[-2]),  # (M, G, Cg)
            grads,
            (((0,), (0,)), ((1,), (1,))),
        )  # (G, Cg, Og)
        for shifted in _window_slices(_pad_input(x, config), window, g.shape[1:-1], config)
    ]
    dw = jnp.stack(taps)  # (K, G, Cg, Og)
    return jnp.swapaxes(dw, 1, 2).reshape(w_shape)


def _flipped_shift_input_grad(g, w, x_shape, config):
    """Depthwise input gradient as a stride-1 shifted multiply-add (``_shift_forward``) of the
    cotangent, spread out by the stride and re-padded, with the flipped kernel; each group's
    ``m`` output channels become the ``m`` input channels of a group of the transposed problem."""
    spatial = w.ndim - 2
    window = w.shape[:-2]
    channels = x_shape[-1]
    spec = [(0, 0, 0)]
    for k, d, s, n_out, size, (lo, _) in zip(
        window,
        config.dilation,
        config.stride,
        g.shape[1:-1],
        x_shape[1:-1],
        config.padding,
        strict=True,
    ):
        span = d * (k - 1)
        # Negative amounts (padding beyond the window's reach, unread trailing rows) crop.
        spread = (n_out - 1) * s + 1
        spec.append((span - lo, size + lo - spread, s - 1))
    spec.append((0, 0, 0))
    g_spread = lax.pad(g, jnp.zeros((), g.dtype), spec)
    flipped = jnp.flip(w, axis=tuple(range(spatial))).reshape(*window, channels, -1)
    transposed = jnp.swapaxes(flipped, -1, -2)  # (*window, m, C)
    unit = _Config((1,) * spatial, ((0, 0),) * spatial, config.dilation, channels, None)
    return _shift_forward(g_spread, transposed, unit)


def _per_tap_sum_weight_grad(x, g, w_shape, config):
    """Depthwise weight gradient: per window offset, the sum over images and pixels of the
    shifted input (each channel repeated for its ``m`` outputs) times the cotangent.

    Beyond ``_UNROLLED_TAPS`` offsets they run as one ``lax.scan``: unrolled, each offset's
    slice compiled a kernel of its own, and a ConvNeXt training step spent about 4 of its 9 s of
    XLA compilation on them. Offsets whose slices hold only padding are zeros without a pass."""
    multiplier = w_shape[-1] // x.shape[-1]
    window = w_shape[:-2]
    out_sizes = g.shape[1:-1]
    ranges = [
        _data_taps(k, d, s, n, lo, size)
        for k, d, s, n, (lo, _), size in zip(
            window,
            config.dilation,
            config.stride,
            out_sizes,
            config.padding,
            x.shape[1:-1],
            strict=True,
        )
    ]
    if any(first >= stop for first, stop in ranges):
        return jnp.zeros(w_shape, jnp.result_type(x, g))
    x_padded = _pad_input(x, config)
    if multiplier > 1:
        x_padded = jnp.repeat(x_padded, multiplier, axis=-1)
    spans = [(n - 1) * s + 1 for n, s in zip(out_sizes, config.stride, strict=True)]
    starts = np.array(
        [
            [o * d for o, d in zip(offset, config.dilation, strict=True)]
            for offset in itertools.product(*(range(first, stop) for first, stop in ranges))
        ],
        np.int32,
    )
    outer_axes = tuple(range(g.ndim - 1))
    strides = (slice(None),) + tuple(slice(None, None, s) for s in config.stride)

    def tap(carry, start):
        zero = jnp.zeros((), jnp.int32)
        shifted = lax.dynamic_slice(
            x_padded, (zero, *start, zero), (x_padded.shape[0], *spans, x_padded.shape[-1])
        )[strides]
        return carry, jnp.sum(shifted * g, axis=outer_axes)

    if len(starts) > _UNROLLED_TAPS:
        _, taps = lax.scan(tap, None, starts)
    else:
        taps = jnp.stack([tap(None, start)[1] for start in starts])
    taps = taps.reshape(*(stop - first for first, stop in ranges), w_shape[-1])
    edges = [(first, k - stop) for (first, stop), k in zip(ranges, window, strict=True)]
    return jnp.pad(taps, (*edges, (0, 0))).reshape(w_shape)


def _data_taps(window, dilation, stride, out_size, pad_lo, size):
    """The window offsets ``[first, stop)`` along one axis whose slices reach the input's own
    pixels (offsets outside see only padding)."""
    reaches = [
        any(pad_lo <= o * dilation + i * stride < pad_lo + size for i in range(out_size))
        for o in range(window)
    ]
    if not any(reaches):
        return 0, 0
    return reaches.index(True), window - reaches[::-1].index(True)
