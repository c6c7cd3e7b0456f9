"""Convolutions over 1-, 2- and 3-D channels-last inputs: cross-correlation, true convolution and
the transposed convolution.

Inputs are ``(N, *spatial, C)`` and kernels ``(*window, C_in // groups, C_out)``; the spatial rank
comes from the kernel's rank. On GPU and TPU every convolution here is ``lax.conv_general_dilated``.
On CPU, float32 and bfloat16 convolutions call oneDNN when the optional native library is built
(:mod:`jcnn.native`, :mod:`jcnn.functional._conv_onednn`); otherwise, and for other dtypes, they
run :func:`jcnn.functional._conv_cpu.conv_general`, formulations that XLA:CPU runs near its
matmul rate. On both, the three products (forward, input and weight gradient) are primitives
with each other as transposes (:mod:`jcnn.functional._conv_products`): forward and reverse mode to
any order, and ``vmap``, stay on them.

In bfloat16 and float16 each product accumulates in float32 and is rounded to the input's dtype
before the bias is added, as XLA's and Flax's convolutions do: computing a biased half-precision
convolution in float32 to round once would make it several times slower (bfloat16 through
oneDNN on an AVX-512 BF16 CPU: 13 ms against 65 ms for a 64x32x32x64 3x3 step).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from jax import lax

from jcnn import native
from jcnn.functional import _conv_cpu, _conv_onednn
from jcnn.functional._checks import (
    PaddingLike,
    add_bias,
    as_int_tuple,
    check_array,
    check_bool,
    check_choice,
    check_extent,
    check_positive_int,
    normalize_padding,
    window_padding,
)

__all__ = ["conv", "convolve", "conv_transpose"]

# jcnn's padding modes and the jnp.pad mode that builds each. "reflect" mirrors about the edge
# pixel without repeating it (PyTorch's and NumPy's "reflect"), the notes' "mirror padding".
_PAD_MODES = {"zeros": "constant", "reflect": "reflect", "replicate": "edge", "circular": "wrap"}

_LAYOUTS = {1: "(N, L, C)", 2: "(N, H, W, C)", 3: "(N, D, H, W, C)"}
_WINDOW_AXES = {1: "K", 2: "KH, KW", 3: "KD, KH, KW"}


def _conv_general(x, w, stride, padding, dilation, groups):
    """The CPU convolution backend chosen at trace time: oneDNN for float32 and bfloat16 when the
    native library is built (:func:`jcnn.native.conv_backend`) and oneDNN implements the problem on
    this CPU (bfloat16 needs AVX-512 or AVX2-VNNI-2), else jcnn's XLA formulations."""
    if (
        x.dtype in (jnp.float32, jnp.bfloat16)
        and native.conv_backend() == "onednn"
        and _conv_onednn.unsupported_reason(x, w, stride, padding, dilation, groups) is None
    ):
        return _conv_onednn.conv_general(x, w, stride, padding, dilation, groups)
    return _conv_cpu.conv_general(x, w, stride, padding, dilation, groups)


def _transpose_on_onednn(x, w, stride, padding, dilation, groups, out_sizes) -> bool:
    """Whether oneDNN runs this transposed convolution as the input gradient of the convolution
    it transposes (the backend and dtype rules of :func:`_conv_general`), instead of a
    convolution of the zero-interleaved input: 1.5-5x faster on the stride-2 2-D and 3-D cases of
    ``experiments/benchmarks/modern.py`` (loaded machine)."""
    if x.dtype not in (jnp.float32, jnp.bfloat16) or native.conv_backend() != "onednn":
        return False
    problem = _conv_onednn.transposed_problem(x, w, stride, padding, dilation, groups, out_sizes)
    return (
        problem is not None
        and _conv_onednn.unsupported_reason(*problem, stride, padding, dilation, groups) is None
    )


def _check_kernel_and_input(x, w, channel_axes: str) -> int:
    """Check dtypes and ranks of ``x`` and ``w``; return the spatial rank.

    ``channel_axes`` names ``w``'s last two axes in the messages.
    """
    check_array(w, "w")
    if w.ndim not in (3, 4, 5):
        raise ValueError(
            f"w: expected rank 3, 4 or 5 (*window, {channel_axes}) for a 1-, 2- or 3-D "
            f"kernel, got rank {w.ndim} with shape {tuple(w.shape)}"
        )
    spatial_rank = w.ndim - 2
    _check_nonempty_kernel(w)
    check_array(x, "x")
    if x.ndim != w.ndim:
        raise ValueError(
            f"x: expected rank {w.ndim} {_LAYOUTS[spatial_rank]} for a {spatial_rank}-D kernel "
            f"({_WINDOW_AXES[spatial_rank]}, {channel_axes}) of shape {tuple(w.shape)}, "
            f"got rank {x.ndim} with shape {tuple(x.shape)}"
        )
    return spatial_rank


def _check_nonempty_kernel(w) -> None:
    if w.size == 0:
        raise ValueError(
            f"w: expected a kernel with at least one element (every window extent and channel "
            f"count >= 1), got shape {tuple(w.shape)}"
        )


def _check_bias(b, out_channels: int) -> None:
    if b is None:
        return
    check_array(b, "b")
    if tuple(b.shape) != (out_channels,):
        raise ValueError(
            f"b: expected shape ({out_channels},), one bias per output channel, "
            f"got shape {tuple(b.shape)}"
        )


def _promote(x, w, b):
    """``x``, ``w`` and ``b`` cast to their common floating dtype (lax needs equal dtypes)."""
    operands = (x, w) if b is None else (x, w, b)
    dtype = jnp.result_type(*operands)
    x, w = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
    return x, w, (None if b is None else jnp.asarray(b, dtype))


def conv(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: PaddingLike = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
    flip: bool = False,
) -> jax.Array:
    """Cross-correlation of ``x`` with the kernel ``w`` (the "convolution" of deep learning).

    ``y[n, i, o] = b[o] + sum_{a, c} x_padded[n, i * stride + a * dilation, c] w[a, c, o]`` over
    every spatial index, with the input channels split into ``groups`` independent groups
    (``groups = C_in`` with ``C_out = m * C_in`` is a depthwise convolution).

    Args:
        x: input ``(N, *spatial, C_in)`` with 1, 2 or 3 spatial dims.
        w: kernel ``(*window, C_in // groups, C_out)``; its rank sets the spatial rank.
        b: optional bias ``(C_out,)``.
        stride: an int or one int per spatial dim, each >= 1.
        padding: an int (both sides of every dim), one int per dim, one ``(lo, hi)`` pair per dim,
            ``"VALID"`` (none) or ``"SAME"`` (output size ``ceil(size / stride)``, the odd pixel on
            the high side as in TensorFlow and ``lax``).
        dilation: spacing between kernel taps, an int or one per spatial dim, each >= 1.
        groups: number of channel groups; divides both ``C_in`` and ``C_out``.
        padding_mode: what fills the padding: ``"zeros"``, ``"reflect"`` (mirror about the edge
            pixel without repeating it, PyTorch's ``reflect``; each pad must be smaller than the
            size), ``"replicate"`` (repeat the edge pixel) or ``"circular"`` (wrap around; each pad
            at most the size).
        flip: flip the kernel along every spatial axis first (true convolution, see
            :func:`convolve`).

    Returns:
        ``(N, *out_spatial, C_out)`` with
        ``out = (size + lo + hi - dilation * (k - 1) - 1) // stride + 1``, in the common dtype
        of ``x``, ``w`` and ``b``.

    Examples:
        The worked example of the course notes (a 3x3 input and a 2x2 kernel):

        >>> x = jnp.arange(9.0).reshape(1, 3, 3, 1)
        >>> w = jnp.array([[0.0, 1.0], [2.0, 3.0]]).reshape(2, 2, 1, 1)
        >>> conv(x, w)[0, :, :, 0].tolist()
        [[19.0, 25.0], [37.0, 43.0]]

        Ten 5x5 filters, stride 1, pad 2 on a 3x32x32 image keep the 32x32 size:

        >>> conv(jnp.ones((1, 32, 32, 3)), jnp.ones((5, 5, 3, 10)), stride=1, padding=2).shape
        (1, 32, 32, 10)
    """
    spatial_rank = _check_kernel_and_input(x, w, "C_in // groups, C_out")
    groups = check_positive_int(groups, "groups")
    in_channels, out_channels = x.shape[-1], w.shape[-1]
    if in_channels % groups:
        raise ValueError(
            f"groups: the input channels C_in = x.shape[-1] = {in_channels} are not divisible by "
            f"groups = {groups}"
        )
    if out_channels % groups:
        raise ValueError(
            f"groups: the output channels C_out = w.shape[-1] = {out_channels} are not divisible "
            f"by groups = {groups}"
        )
    if w.shape[-2] * groups != in_channels:
        raise ValueError(
            f"x: expected {w.shape[-2] * groups} channels (w.shape[-2] = {w.shape[-2]} per group "
            f"x groups = {groups}), got {in_channels} in shape {tuple(x.shape)}"
        )
    _check_bias(b, out_channels)
    stride = as_int_tuple(stride, spatial_rank, "stride", minimum=1)
    dilation = as_int_tuple(dilation, spatial_rank, "dilation", minimum=1)
    check_choice(padding_mode, "padding_mode", tuple(_PAD_MODES))
    check_bool(flip, "flip")
    sizes = tuple(x.shape[1:-1])
    pads = window_padding(sizes, w.shape[:-2], padding, stride, dilation, "w")
    for dim, (size, (lo, hi)) in enumerate(zip(sizes, pads, strict=True)):
        if not (lo or hi):
            continue
        if padding_mode == "replicate" and size == 0:
            raise ValueError(
                f"padding: 'replicate' padding repeats the edge pixel, so the input must not be "
                f"empty where it pads, got {(lo, hi)} for size 0 along spatial dim {dim}"
            )
        if padding_mode == "reflect" and max(lo, hi) >= size:
            raise ValueError(
                f"padding: 'reflect' padding must be smaller than the input size, got {(lo, hi)} "
                f"for size {size} along spatial dim {dim}"
            )
        if padding_mode == "circular" and max(lo, hi) > size:
            raise ValueError(
                f"padding: 'circular' padding must be at most the input size, got {(lo, hi)} "
                f"for size {size} along spatial dim {dim}"
            )
    padded = [size + lo + hi for size, (lo, hi) in zip(sizes, pads, strict=True)]
    out_sizes = [
        (size - d * (k - 1) - 1) // s + 1
        for size, k, s, d in zip(padded, w.shape[:-2], stride, dilation, strict=True)
    ]
    check_extent((x.shape[0], *padded, in_channels), x.dtype, "padding", "padded input")
    check_extent((x.shape[0], *out_sizes, out_channels), x.dtype, "padding", "output")
    x, w, b = _promote(x, w, b)
    if flip:
        w = jnp.flip(w, axis=tuple(range(spatial_rank)))
    if padding_mode != "zeros" and any(lo or hi for lo, hi in pads):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)), mode=_PAD_MODES[padding_mode])
        pads = ((0, 0),) * spatial_rank
    y = _conv_general(x, w, stride, pads, dilation, groups)
    return add_bias(y, b)


def convolve(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: PaddingLike = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    padding_mode: str = "zeros",
) -> jax.Array:
    """True (signal-processing) convolution: :func:`conv` with ``w`` flipped on every spatial axis.

    ``(x * k)[i, j] = sum_{p, q} x[i + p, j + q] k[r - p, r - q]`` as in the course notes. Takes the
    same arguments as :func:`conv` (without ``flip``) and returns the same shape.

    Args:
        x: input ``(N, *spatial, C_in)``.
        w: kernel ``(*window, C_in // groups, C_out)``.
        b: optional bias ``(C_out,)``.
        stride, padding, dilation, groups, padding_mode: as in :func:`conv`.

    Returns:
        ``(N, *out_spatial, C_out)``.

    Example:
        The notes' example, next to the cross-correlation of the same arrays:

        >>> x = jnp.array([[0.0, 80, 40], [20, 40, 0], [0, 0, 40]]).reshape(1, 3, 3, 1)
        >>> k = jnp.array([[0.0, 0.25], [0.5, 1]]).reshape(2, 2, 1, 1)
        >>> convolve(x, k)[0, :, :, 0].tolist()
        [[45.0, 110.0], [40.0, 40.0]]
        >>> conv(x, k)[0, :, :, 0].tolist()
        [[70.0, 30.0], [10.0, 40.0]]
    """
    return conv(
        x,
        w,
        b,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        padding_mode=padding_mode,
        flip=True,
    )


def conv_transpose(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: PaddingLike = 0,
    output_padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
) -> jax.Array:
    """Transposed convolution (the gradient of :func:`conv` with respect to its input).

    Equals PyTorch's ``conv_transpose1d/2d/3d`` with the same weights and arguments: each input
    pixel scatters ``w``, scaled, into the output at ``stride`` spacing; ``padding`` then crops
    the full output and ``output_padding`` adds rows at the high end.

    Args:
        x: input ``(N, *spatial, C_in)``.
        w: kernel ``(*window, C_in, C_out // groups)``, PyTorch's ``(C_in, C_out // groups,
            *window)`` with the axes moved; not flipped.
        b: optional bias ``(C_out,)``.
        stride: an int or one per spatial dim, each >= 1.
        padding: cropped from the full output: an int, one int per dim or one ``(lo, hi)`` pair
            per dim, all >= 0 (``"VALID"`` means 0).
        output_padding: extra size at the high end of each dim (an int or one per dim); each must
            be smaller than the stride or the dilation of its dim.
        dilation: spacing between kernel taps, an int or one per spatial dim, each >= 1.
        groups: number of channel groups; divides ``C_in``.

    Returns:
        ``(N, *out_spatial, C_out)`` with
        ``out = (size - 1) * stride - lo - hi + dilation * (k - 1) + output_padding + 1``.

    Example:
        A 4x4 kernel with stride 2 and padding 1 doubles the size:

        >>> x, w = jnp.ones((1, 5, 5, 8)), jnp.ones((4, 4, 8, 3))
        >>> conv_transpose(x, w, stride=2, padding=1).shape
        (1, 10, 10, 3)
    """
    spatial_rank = _check_kernel_and_input(x, w, "C_in, C_out // groups")
    groups = check_positive_int(groups, "groups")
    in_channels = w.shape[-2]
    if x.shape[-1] != in_channels:
        raise ValueError(
            f"x: expected C_in = w.shape[-2] = {in_channels} channels, got {x.shape[-1]} in "
            f"shape {tuple(x.shape)}"
        )
    if in_channels % groups:
        raise ValueError(
            f"groups: the input channels C_in = w.shape[-2] = {in_channels} are not divisible by "
            f"groups = {groups}"
        )
    out_channels = w.shape[-1] * groups
    _check_bias(b, out_channels)
    stride = as_int_tuple(stride, spatial_rank, "stride", minimum=1)
    dilation = as_int_tuple(dilation, spatial_rank, "dilation", minimum=1)
    output_padding = as_int_tuple(output_padding, spatial_rank, "output_padding", minimum=0)
    if isinstance(padding, str) and padding.upper() != "VALID":
        raise ValueError(
            f"padding: conv_transpose takes an int, one int per dim, (lo, hi) pairs or 'VALID', "
            f"got {padding!r}"
        )
    sizes = tuple(x.shape[1:-1])
    window = tuple(w.shape[:-2])
    pads = normalize_padding(padding, sizes, window, stride, dilation)
    if any(p >= s and p >= d for p, s, d in zip(output_padding, stride, dilation, strict=True)):
        raise ValueError(
            f"output_padding: each entry must be smaller than the stride or the dilation of its "
            f"dim, got output_padding={output_padding} with stride={stride}, dilation={dilation}"
        )
    out_sizes = []
    for dim, (size, k, s, d, (lo, hi), extra) in enumerate(
        zip(sizes, window, stride, dilation, pads, output_padding, strict=True)
    ):
        out = (size - 1) * s - lo - hi + d * (k - 1) + extra + 1
        out_sizes.append(out)
        if out < 1:
            raise ValueError(
                f"padding: {(lo, hi)} leaves an output size of {out} along spatial dim {dim} "
                f"(size {size}, kernel {k}, stride {s}, dilation {d}, output_padding {extra})"
            )

    dilated = [(size - 1) * s + 1 for size, s in zip(sizes, stride, strict=True)]
    check_extent((x.shape[0], *dilated, x.shape[-1]), x.dtype, "stride", "input spread by stride")
    check_extent((x.shape[0], *out_sizes, out_channels), x.dtype, "dilation", "output")
    x, w, b = _promote(x, w, b)
    options = (stride, pads, dilation, groups, tuple(out_sizes))
    if 0 in sizes:
        # Nothing scatters. The interleaving below would give an empty dim no (size - 1) * stride
        # term, stride - 1 longer than the formula above.
        return add_bias(jnp.zeros((x.shape[0], *out_sizes, out_channels), x.dtype), b)
    if _transpose_on_onednn(x, w, *options):
        return add_bias(_conv_onednn.conv_transpose(x, w, *options), b)
    interleaved = partial(
        _interleaved_transpose,
        stride=stride,
        pads=pads,
        output_padding=output_padding,
        dilation=dilation,
        groups=groups,
    )
    if not _conv_cpu.transpose_aborts_xla_cpu(
        window, stride, dilation, pads, out_sizes, sizes, groups
    ):
        return add_bias(interleaved(x, w), b)
    # XLA:CPU would abort compiling that convolution. On CPU, scatter instead: the GEMM + col2im
    # input gradient of the convolution this one transposes (kernel (*window, C_out, C_in), as
    # groups == 1 here).
    config = _conv_cpu._Config(stride, pads, dilation, groups, None)
    out_shape = (x.shape[0], *out_sizes, out_channels)
    y = lax.platform_dependent(
        x,
        w,
        cpu=lambda x, w: _conv_cpu._shift_input_grad(x, jnp.swapaxes(w, -1, -2), out_shape, config),
        default=interleaved,
    )
    return add_bias(y, b)


def _interleaved_transpose(x, w, *, stride, pads, output_padding, dilation, groups):
    """``conv_transpose`` as a stride-1 convolution of the zero-interleaved input."""
    spatial_rank = w.ndim - 2
    window, in_channels = tuple(w.shape[:-2]), w.shape[-2]
    out_channels = w.shape[-1] * groups
    # A stride-1 cross-correlation of the zero-interleaved input with the flipped kernel, whose
    # groups' (C_in // groups, C_out // groups) blocks are laid side by side along C_out.
    window_axes = tuple(range(spatial_rank))
    forward_w = jnp.flip(w, axis=window_axes)
    forward_w = forward_w.reshape(*window, groups, in_channels // groups, w.shape[-1])
    forward_w = jnp.swapaxes(forward_w, spatial_rank, spatial_rank + 1)
    forward_w = forward_w.reshape(*window, in_channels // groups, out_channels)
    # Edge padding of the interleaved input; a negative amount (padding beyond the kernel's
    # reach) crops, which lax.pad does and the conv's padding does not.
    edges = [
        (d * (k - 1) - lo, d * (k - 1) - hi + extra)
        for k, d, (lo, hi), extra in zip(window, dilation, pads, output_padding, strict=True)
    ]
    interleave, conv_pads = [], []
    for size, (lo, hi), s in zip(x.shape[1:-1], edges, stride, strict=True):
        if (size - 1) * s + 1 + min(lo, 0) + min(hi, 0) < 0:
            # The crop reaches past the input into the other side's padding (a large padding
            # beside an output_padding): lax.pad applies both edges at once.
            interleave.append((lo, hi, s - 1))
            conv_pads.append((0, 0))
        else:
            interleave.append((min(lo, 0), min(hi, 0), s - 1))
            conv_pads.append((max(lo, 0), max(hi, 0)))
    x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0), *interleave, (0, 0, 0)])
    conv_pads = tuple(conv_pads)
    return _conv_general(x, forward_w, (1,) * spatial_rank, conv_pads, dilation, groups)
