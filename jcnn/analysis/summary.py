"""Layer table of a model: shapes, parameters, multiply-adds, receptive field and effective stride.

``summary(model, input_shape)`` runs the model abstractly (``jax.eval_shape``, nothing is computed)
and records every layer, i.e. every module call that calls no other module (the ``jcnn.nn``
modules, or ``flax.linen`` layers), with its attributes and its input and output shapes. Parameters
that a composite module holds itself (a block's ``layer_scale`` vector) get a row of their own,
named after that module and placed after its layers; a module called again (shared weights) shows
its parameters on its first row only, so the rows add up to ``total_params``. Shapes are jcnn's
channels-last ones: an output ``(1, 28, 28, 20)`` is the course's ``20 x 28 x 28`` and a conv
kernel ``(5, 5, 1, 20)`` (HWIO) is the course's weight ``20 x 1 x 5 x 5`` (OIHW).

Multiply-adds count the products of convolutions and dense layers for the whole ``input_shape``
batch (bias additions, normalizations, activations and pools count 0; an eval-mode BatchNorm folds
into the conv before it), for ``jcnn.nn`` layers and ``flax.linen``'s ``Conv``, ``ConvLocal``,
``ConvTranspose`` and ``Dense``; a layer of another type with parameters shows ``?`` and is left
out of the total, which names it, and so does a composite's own parameter of rank 2 or more (its
own vectors scale or shift elementwise and count 0). The receptive field of a unit is the side of
the input window it depends on, unclipped by the image border:
``r_out = r_in + (k_eff - 1) * j_in`` with ``k_eff = d (k - 1) + 1`` and the effective stride
(jump) ``j_out = j_in * s``, composed from the input (``r = j = 1``). After a flatten, a global
pool or a normalization with statistics over all positions (layer, group and instance
normalization, the latter unless it uses its running statistics, and local contrast
normalization, whose divisor involves the image's mean deviation) every unit sees the
whole input window of the layer before it; after such a normalization the units of the map all see
that same window (effective stride 0), and so do the units of the layers after it. Where tensors
are combined outside the layers (a residual ``f(x) + x``) the combined tensor sees the union of
the windows of the layer outputs of the same spatial size inside the enclosing module (unknown
where something other than per-position operations made it, e.g. a pool function such as
``flax.linen.avg_pool`` between two layers, or where their effective strides differ);
a module that returns an array as is (its input, or a layer's output) gives it that array's field.
A layer inside ``nn.scan`` or ``nn.vmap`` shows ``?`` for its multiply-adds (the abstract run
traces its body once, not once per step or slice), as does one inside ``nn.cond``, ``nn.switch``
or ``nn.while_loop`` (every branch is traced, one runs; a loop's body runs any number of times)
or ``nn.map_variables`` (e.g. weight standardization: run twice by the initializing run), and so
do the receptive fields from the first such layer on and of the modules holding it; its
parameters (stacked) are counted.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import flax.linen as nn
import flax.linen.linear as flax_linear
import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jcnn import nn as jnn
from jcnn.analysis._trace import LayerCall, subtree, trace_layers
from jcnn.functional._checks import (
    as_int_tuple,
    check_bool,
    is_int,
    normalize_padding,
    window_count,
)

__all__ = [
    "conv_output_size",
    "pool_output_size",
    "ReceptiveField",
    "LayerRow",
    "Summary",
    "summary",
    "receptive_field",
]


def _check_sizes(size, kernel, stride, dilation, padding, kernel_name="kernel"):
    """The five lengths as Python ints (a NumPy integer or a 0-d integer array is one)."""
    checked = []
    for value, name, minimum in (
        (size, "size", 1),
        (kernel, kernel_name, 1),
        (stride, "stride", 1),
        (dilation, "dilation", 1),
        (padding, "padding", 0),
    ):
        if not is_int(value):
            raise TypeError(f"{name}: expected an int, got {value!r}")
        if int(value) < minimum:
            raise ValueError(f"{name}: expected an int >= {minimum}, got {int(value)}")
        checked.append(int(value))
    return checked


def conv_output_size(
    size: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    dilation: int = 1,
    ceil_mode: bool = False,
) -> int:
    """Output length of a convolution along one axis.

    ``floor((W + 2P - D (K - 1) - 1) / S) + 1``, the course's ``(W - K + 2P) / S + 1`` with
    dilation; with ``ceil_mode`` the division rounds up, as in PyTorch (see ``pool_output_size``
    for the rule that keeps the last window from starting in the padding).

    Args:
      size: input length ``W``.
      kernel: window ``K``.
      stride: step ``S``.
      padding: zeros ``P`` added on each side.
      dilation: spacing ``D`` between window taps.
      ceil_mode: round the division up instead of down.

    Returns:
      The output length, an int >= 1.

    >>> conv_output_size(32, 5, stride=1, padding=2)
    32
    >>> conv_output_size(224, 7, stride=2, padding=3), conv_output_size(28, 2, stride=2)
    (112, 14)
    >>> conv_output_size(10, 3, dilation=2), conv_output_size(7, 2, stride=2, ceil_mode=True)
    (6, 4)
    """
    size, kernel, stride, dilation, padding = _check_sizes(size, kernel, stride, dilation, padding)
    return _output_size(size, kernel, stride, padding, dilation, ceil_mode, "kernel")


def _output_size(size, kernel, stride, padding, dilation, ceil_mode, kernel_name):
    """``conv_output_size`` of checked ints; errors name the window ``kernel_name``."""
    ceil_mode = check_bool(ceil_mode, "ceil_mode")
    span = dilation * (kernel - 1) + 1
    out = window_count(size, span, stride, padding, padding, ceil_mode)
    if out < 1:  # in ceil_mode a window may overhang the right edge by less than the stride
        excess = span - (size + 2 * padding)
        raise ValueError(
            f"{kernel_name}: the dilated window {span} is larger than the padded input "
            f"{size + 2 * padding}"
            + (f" by {excess}, not less than the stride {stride}" if ceil_mode else "")
        )
    return out


def pool_output_size(
    size: int,
    window: int,
    stride: int | None = None,
    padding: int = 0,
    dilation: int = 1,
    ceil_mode: bool = False,
) -> int:
    """Output length of a pooling layer along one axis (the stride defaults to the window).

    Same formula as ``conv_output_size``; with ``ceil_mode`` a last partial window is kept unless
    it would start inside the right padding (PyTorch's rule).

    >>> pool_output_size(28, 2), pool_output_size(112, 3, 2, padding=1)
    (14, 56)
    >>> pool_output_size(5, 2, ceil_mode=True), pool_output_size(6, 3, 2, padding=1, ceil_mode=True)
    (3, 4)
    """
    stride = window if stride is None else stride
    # the types first: the padding rule below would compare a string or None raw
    size, window, stride, dilation, padding = _check_sizes(
        size, window, stride, dilation, padding, "window"
    )
    if padding * 2 > window:
        raise ValueError(f"padding: expected at most half the window ({window}), got {padding}")
    return _output_size(size, window, stride, padding, dilation, ceil_mode, "window")


@dataclasses.dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of the units of a layer, per spatial axis.

    Attributes:
      size: side of the input window one unit depends on (unclipped by the border).
      stride: input pixels between the windows of neighbouring units (the effective stride).
      start: input coordinate of the first pixel of unit 0's window (negative in the padding);
        unit ``i`` sees ``[start + i * stride, start + i * stride + size - 1]``.
    """

    size: tuple[int, ...]
    stride: tuple[int, ...]
    start: tuple[int, ...]

    def grow(
        self,
        kernel: Sequence[int],
        stride: Sequence[int],
        dilation: Sequence[int],
        padding_low: Sequence[int],
    ) -> ReceptiveField:
        """The field after a window ``kernel`` with ``stride``, ``dilation`` and left padding."""
        return ReceptiveField(
            tuple(
                r + (d * (k - 1)) * j
                for r, k, d, j in zip(self.size, kernel, dilation, self.stride, strict=True)
            ),
            tuple(j * s for j, s in zip(self.stride, stride, strict=True)),
            tuple(a - p * j for a, p, j in zip(self.start, padding_low, self.stride, strict=True)),
        )

    def whole(self, spatial: Sequence[int]) -> ReceptiveField:
        """The field of a unit that sees every position of a ``spatial`` map."""
        return ReceptiveField(
            tuple(r + (n - 1) * j for r, n, j in zip(self.size, spatial, self.stride, strict=True)),
            tuple(j * n for j, n in zip(self.stride, spatial, strict=True)),
            self.start,
        )


@dataclasses.dataclass(frozen=True)
class LayerRow:
    """One layer of a ``Summary``.

    Attributes:
      name: the module's path (``layer1_0/conv1``).
      layer: its type and main attributes (``Conv(20, k=5, s=1, p=2)``); for the parameters a
        composite module holds itself, its type and their names (``ConvNeXtBlock(layer_scale)``),
        and for the products its own code computes between its layers, its type and their kinds
        (``NonLocal(matmul)``).
      input_shape, output_shape: channels-last shapes with the batch axis.
      weight_shape: shape of ``kernel`` (conv HWIO, dense ``(in, out)``) or of the first parameter,
        ``None`` for parameter-free layers.
      params: number of parameters of the layer (0 on the later calls of a shared layer).
      macs: multiply-adds for the whole batch, ``None`` for a layer with parameters whose type
        ``summary`` does not know, for products computed inside a loop or branch, and for a
        layer inside ``nn.scan`` or ``nn.vmap`` (run once in the trace, not once per step or
        slice), ``nn.cond``/``nn.switch``/``nn.while_loop`` (every branch traced, one run) or
        ``nn.map_variables`` (run twice by the initializing run): not counted, rather than
        counted wrong.
      receptive_field: the field of the output units, ``None`` where unknown.
    """

    name: str
    layer: str
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None
    weight_shape: tuple[int, ...] | None
    params: int
    macs: int | None
    receptive_field: ReceptiveField | None


@dataclasses.dataclass(frozen=True)
class Summary:
    """The table returned by ``summary``: ``rows`` plus totals; ``str()`` formats it.

    Attributes:
      rows: one ``LayerRow`` per layer, in call order.
      input_shape: the input the model was run on.
      total_params: every parameter of the model (shared layers counted once).
      total_macs: the sum of the rows' multiply-adds, leaving out the layers in ``uncounted``.
      uncounted: names of the layers whose multiply-adds are unknown (``macs`` is ``None``).
    """

    rows: tuple[LayerRow, ...]
    input_shape: tuple[int, ...]
    total_params: int
    total_macs: int
    uncounted: tuple[str, ...] = ()

    def __str__(self) -> str:
        header = ("Layer", "Type", "Output shape", "Weight shape", "Params", "MACs", "RF", "Stride")
        lines = [("input", "", _fmt_shape(self.input_shape), "", "", "", "1", "1")]
        for row in self.rows:
            field = row.receptive_field
            lines.append(
                (
                    row.name,
                    row.layer,
                    _fmt_shape(row.output_shape),
                    _fmt_shape(row.weight_shape),
                    f"{row.params:,}",
                    "?" if row.macs is None else f"{row.macs:,}",
                    _fmt_axes(field.size) if field else "?",
                    _fmt_axes(field.stride) if field else "?",
                )
            )
        widths = [max(len(line[i]) for line in (header, *lines)) for i in range(len(header))]
        numeric = {4, 5, 6, 7}

        def render(cells):
            return "  ".join(
                cell.rjust(w) if i in numeric else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        rule = "-" * len(render(header))
        total = f"Total params: {self.total_params:,}    Total MACs: {self.total_macs:,}"
        if self.uncounted:
            total += f" + ? (not counted: {', '.join(self.uncounted)})"
        return "\n".join([render(header), rule, *map(render, lines), rule, total])

    def __repr__(self) -> str:
        return str(self)


def _fmt_shape(shape) -> str:
    return "" if shape is None else str(tuple(shape))


def _fmt_axes(values) -> str:
    return str(values[0]) if len(set(values)) == 1 else "x".join(str(v) for v in values)


def _count(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


# Layers that act on each position separately (any mode), so they keep the receptive field.
_POINTWISE = (
    jnn.BatchNorm,
    jnn.Dropout,
    jnn.SpatialDropout,
    jnn.LocalResponseNorm,
    jnn.PReLU,
    jnn.Maxout,
    jnn.Dense,
    nn.Dense,
    nn.BatchNorm,
    nn.Dropout,
)
# Flax layers whose multiply-adds count 0 by the rule above (normalizations, lookups).
_FLAX_NO_MACS = (
    nn.BatchNorm,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.GroupNorm,
    nn.InstanceNorm,
    nn.Dropout,
    nn.Embed,
)
# Layers whose every output depends on every position of their input (LocalContrastNorm too: its
# divisor is at least the image's mean local deviation).
_GLOBAL = (
    jnn.GlobalAvgPool,
    jnn.GlobalMaxPool,
    jnn.Flatten,
    jnn.LayerNorm,
    jnn.GroupNorm,
    jnn.InstanceNorm,
    jnn.LocalContrastNorm,
)


def _flax_reduced_axes(module, ndim: int) -> set[int] | None:
    """The axes a ``flax.linen`` normalization or ``DenseGeneral`` reduces over (its statistics,
    or the contracted axes), counted from 0; None for other layers."""
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm)):
        axes = module.reduction_axes
        if axes is None:  # GroupNorm's default: every axis but the batch
            return set(range(1, ndim))
    elif isinstance(module, nn.InstanceNorm):
        features = {a % ndim for a in _as_tuple(module.feature_axes)}
        return set(range(1, ndim)) - features
    elif isinstance(module, nn.DenseGeneral):
        axes = module.axis
    else:
        return None
    return {a % ndim for a in _as_tuple(axes)}


def _spatial(shape) -> tuple[int, ...] | None:
    return None if shape is None or len(shape) < 3 else tuple(shape[1:-1])


def _window_field(module, field: ReceptiveField, spatial_in) -> ReceptiveField | None:
    """The field after a windowed layer (conv, pools); None if unknown."""
    n = len(spatial_in)
    if isinstance(module, (jnn.Conv, jnn.DepthwiseConv, jnn.LocallyConnected)):
        window = as_int_tuple(module.kernel_size, n, "kernel_size")
        stride = as_int_tuple(module.stride, n, "stride")
        dilation = as_int_tuple(module.dilation, n, "dilation")
        padding = normalize_padding(module.padding, spatial_in, window, stride, dilation)
    elif isinstance(module, (jnn.MaxPool, jnn.AvgPool, jnn.LPPool)):
        window = as_int_tuple(module.window, n, "window")
        stride = window if module.stride is None else as_int_tuple(module.stride, n, "stride")
        dilation = as_int_tuple(getattr(module, "dilation", 1), n, "dilation")
        padding = normalize_padding(
            getattr(module, "padding", 0), spatial_in, window, stride, dilation
        )
    elif isinstance(module, (jnn.AdaptiveAvgPool, jnn.AdaptiveMaxPool)):
        out = module.output_size
        if isinstance(out, Sequence):  # None keeps that axis's size
            out = tuple(size if o is None else o for size, o in zip(spatial_in, out, strict=True))
        out = as_int_tuple(out, n, "output_size")
        if any(size % o for size, o in zip(spatial_in, out, strict=True)):
            return None
        window = stride = tuple(size // o for size, o in zip(spatial_in, out, strict=True))
        dilation = (1,) * n
        padding = ((0, 0),) * n
    elif isinstance(module, (nn.Conv, nn.ConvLocal)):
        geometry = _flax_conv_geometry(module, spatial_in)
        if geometry is None:
            return None
        window, stride, dilation, padding = geometry
    else:
        return None
    return field.grow(window, stride, dilation, tuple(lo for lo, _ in padding))


def _flax_tuple(value, n: int) -> tuple | None:
    """A ``flax.linen`` conv attribute (None, an int or n ints) as n values, None if malformed."""
    if value is None:
        return (1,) * n
    value = _as_tuple(value)
    value = value * n if len(value) == 1 else value
    return value if len(value) == n else None


def _flax_conv_geometry(module, spatial_in):
    """``(window, stride, dilation, padding pairs)`` of a ``flax.linen`` Conv, None where the
    field is not a window of the input (input dilation, wrapped or reflected padding)."""
    window = _flax_tuple(module.kernel_size, len(_as_tuple(module.kernel_size)))
    n = len(window)
    stride = _flax_tuple(module.strides, n)
    dilation = _flax_tuple(module.kernel_dilation, n)
    if (
        n != len(spatial_in)
        or stride is None
        or dilation is None
        or _flax_tuple(module.input_dilation, n) != (1,) * n
    ):
        return None
    padding = flax_linear.canonicalize_padding(module.padding, n)
    if isinstance(padding, str) and padding.upper() == "CAUSAL":
        padding = ((dilation[0] * (window[0] - 1), 0),)
    elif isinstance(padding, str) and padding.upper() not in ("SAME", "VALID"):
        return None
    padding = normalize_padding(
        padding if isinstance(padding, str) else tuple(tuple(p) for p in padding),
        spatial_in,
        window,
        stride,
        dilation,
    )
    return window, stride, dilation, padding


def _macs(module, call: LayerCall) -> int | None:
    """The layer's multiply-adds; None for a layer type whose products are not known here."""
    if call.output_shape is None or call.input_shape is None:
        # a tuple or dict in or out: products unknown (0 for a parameter-free layer, by the caller)
        return None
    if isinstance(module, (jnn.Conv, jnn.LocallyConnected)):  # the latter: unshared weights
        window = _kernel_volume(module, call)
        groups = getattr(module, "groups", 1)
        return math.prod(call.output_shape) * window * call.input_shape[-1] // groups
    if isinstance(module, jnn.DepthwiseConv):  # one input channel per output channel
        return math.prod(call.output_shape) * _kernel_volume(module, call)
    if isinstance(module, jnn.ConvTranspose):
        window = _kernel_volume(module, call)
        return math.prod(call.input_shape) * window * module.features // module.groups
    if isinstance(module, (jnn.Dense, nn.Dense)):
        return math.prod(call.output_shape) * call.input_shape[-1]
    if isinstance(module, nn.DenseGeneral):  # each output sums over the contracted axes
        contracted = _flax_reduced_axes(module, len(call.input_shape))
        return math.prod(call.output_shape) * math.prod(call.input_shape[a] for a in contracted)
    if isinstance(module, (nn.Conv, nn.ConvLocal)):
        # the window covers kernel_size whatever the batch axes; input dilation multiplies by
        # the inserted zeros, which a count of products would have to leave out
        n = len(_as_tuple(module.kernel_size))
        if _flax_tuple(module.input_dilation, n) != (1,) * n:
            return None
        window = math.prod(_flax_tuple(module.kernel_size, n))
        groups = module.feature_group_count
        return math.prod(call.output_shape) * window * call.input_shape[-1] // groups
    if isinstance(module, nn.ConvTranspose):
        window = math.prod(_as_tuple(module.kernel_size))
        return math.prod(call.input_shape) * window * module.features
    if type(module).__module__.startswith("jcnn.nn.") or isinstance(module, _FLAX_NO_MACS):
        return 0
    return None


def _kernel_volume(module, call: LayerCall) -> int:
    n = len(call.input_shape) - 2
    return math.prod(as_int_tuple(module.kernel_size, n, "kernel_size"))


def _describe(module) -> str:
    name = type(module).__name__
    if isinstance(module, (jnn.Conv, jnn.ConvTranspose, jnn.LocallyConnected)):
        parts = [str(module.features), f"k={_fmt_axes(_as_tuple(module.kernel_size))}"]
        parts.append(f"s={_fmt_axes(_as_tuple(module.stride))}")
        parts.append(f"p={_fmt_pad(module.padding)}")
        if _as_tuple(module.dilation) != (1,) * len(_as_tuple(module.dilation)):
            parts.append(f"d={_fmt_axes(_as_tuple(module.dilation))}")
        if getattr(module, "groups", 1) != 1:
            parts.append(f"g={module.groups}")
        return f"{name}({', '.join(parts)})"
    if isinstance(module, jnn.DepthwiseConv):
        parts = [f"x{module.depth_multiplier}", f"k={_fmt_axes(_as_tuple(module.kernel_size))}"]
        parts.append(f"s={_fmt_axes(_as_tuple(module.stride))}")
        parts.append(f"p={_fmt_pad(module.padding)}")
        if _as_tuple(module.dilation) != (1,) * len(_as_tuple(module.dilation)):
            parts.append(f"d={_fmt_axes(_as_tuple(module.dilation))}")
        return f"{name}({', '.join(parts)})"
    if isinstance(module, (jnn.MaxPool, jnn.AvgPool, jnn.LPPool)):
        window = _as_tuple(module.window)
        stride = window if module.stride is None else _as_tuple(module.stride)
        text = f"{name}(k={_fmt_axes(window)}, s={_fmt_axes(stride)}"
        padding = getattr(module, "padding", 0)
        if padding not in (0, "VALID"):
            text += f", p={_fmt_pad(padding)}"
        return text + ")"
    if isinstance(module, (nn.Conv, nn.ConvLocal, nn.ConvTranspose)):
        parts = [str(module.features), f"k={_fmt_axes(_as_tuple(module.kernel_size))}"]
        parts.append(f"s={_fmt_axes(_as_tuple(module.strides or 1))}")
        parts.append(f"p={_fmt_pad(module.padding)}")
        dilation = _as_tuple(module.kernel_dilation or 1)
        if set(dilation) != {1}:
            parts.append(f"d={_fmt_axes(dilation)}")
        if getattr(module, "feature_group_count", 1) != 1:
            parts.append(f"g={module.feature_group_count}")
        return f"{name}({', '.join(parts)})"
    if isinstance(module, (jnn.Dense, nn.Dense)):
        return f"{name}({module.features})"
    if isinstance(module, jnn.AdaptiveAvgPool):
        return f"{name}({_fmt_axes(_as_tuple(module.output_size))})"
    return name


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, Sequence) and not isinstance(value, str) else (value,)


def _fmt_pad(padding) -> str:
    """``padding`` as written, or its one value where every entry is the same (strings as is)."""
    values = _as_tuple(padding)
    flat = [v for p in values for v in _as_tuple(p)]
    return str(flat[0]) if len(set(flat)) == 1 else str(padding)


def _weight_shape(params) -> tuple[int, ...] | None:
    if not params:
        return None
    if "kernel" in params:
        return tuple(params["kernel"].shape)
    first = jax.tree.leaves(params)[0]
    return tuple(first.shape)


def _fields(calls: list[LayerCall]) -> dict[int, ReceptiveField | None]:
    """The receptive field of each call's output, by call index (calls come in call order)."""
    fields: dict[int, ReceptiveField | None] = {}
    input_fields: dict[int, ReceptiveField | None] = {}

    def output_field(index: int) -> ReceptiveField | None:
        if index not in fields:
            call = calls[index]
            if call.returns_input:
                fields[index] = input_fields[index]
                return fields[index]
            if call.returns is not None:  # a layer's very output: that layer's field
                fields[index] = output_field(call.returns)
                return fields[index]
            # A container's own result (f(x) + x): the widest field among its calls' outputs
            # of that shape; unknown where it was made by more than per-position operations.
            if not call.pointwise:
                fields[index] = None
                return None
            fields[index] = _widest(
                output_field(c.index)
                for c in calls[index + 1 :]
                if _descends(calls, c, index) and c.output_shape == call.output_shape
            )
        return fields[index]

    def input_field(call: LayerCall) -> ReceptiveField | None:
        if call.source is not None:
            return output_field(call.source)
        if call.input_of is not None:
            return input_fields[call.input_of]
        if call.parent is None:
            n = len(call.input_shape) - 2 if call.input_shape and len(call.input_shape) > 2 else 0
            return ReceptiveField((1,) * n, (1,) * n, (0,) * n)
        # Combined outside the layers (e.g. f(x) + x): the widest candidate of the same size;
        # unknown where an operation that mixes positions (a pool function) made it.
        if not call.pointwise:
            return None
        ancestor = call.parent
        while ancestor is not None:
            candidates = [
                output_field(c.index)
                for c in calls[ancestor + 1 : call.index]
                if _descends(calls, c, ancestor) and _same_grid(c.output_shape, call.input_shape)
            ]
            if _same_grid(calls[ancestor].input_shape, call.input_shape):
                candidates.append(input_fields[ancestor])
            if candidates:
                return _widest(candidates)
            ancestor = calls[ancestor].parent
        return None

    for call in calls:
        input_fields[call.index] = input_field(call)
        if call.is_leaf and not call.returns_input:
            fields[call.index] = _layer_field(call, input_fields[call.index])
    for call in calls:
        output_field(call.index)
    lifted = [call.index for call in calls if call.lifted]
    if lifted:  # a scan's or vmap's body was traced once: what follows or holds it is unknown
        unknown = set(range(lifted[0], len(calls)))
        for index in lifted:
            while index is not None:
                unknown.add(index)
                index = calls[index].parent
        fields.update(dict.fromkeys(unknown))
    return fields


def _same_grid(shape, other) -> bool:
    return shape is not None and other is not None and shape[:-1] == other[:-1]


def _widest(fields) -> ReceptiveField | None:
    """The union of ``fields``' windows, per axis (branches padded differently, e.g. a causal
    and a centred conv summed, see windows that do not hold one another); None if there are
    none, if one is unknown (the combined tensor may come from that one: a transposed conv's
    output of an earlier map's shape, and an earlier field would then be reported for it), or
    if their effective strides differ (neighbouring units' unions are then not one window
    shifted)."""
    fields = list(fields)
    if not fields or any(f is None for f in fields):
        return None
    if len({f.stride for f in fields}) > 1:
        return None
    start = [min(f.start[axis] for f in fields) for axis in range(len(fields[0].start))]
    end = [max(f.start[axis] + f.size[axis] for f in fields) for axis in range(len(start))]
    size = tuple(e - a for a, e in zip(start, end, strict=True))
    return ReceptiveField(size, fields[0].stride, tuple(start))


def _descends(calls, call: LayerCall, ancestor: int) -> bool:
    parent = call.parent
    while parent is not None:
        if parent == ancestor:
            return True
        parent = calls[parent].parent
    return False


def _layer_field(call: LayerCall, field: ReceptiveField | None) -> ReceptiveField | None:
    if field is None:
        return None
    module = call.module
    spatial_in = _spatial(call.input_shape)
    if isinstance(module, jnn.InstanceNorm) and module.track_running_stats and call.train is False:
        return field  # normalized with its running statistics: per position, as a BatchNorm
    if isinstance(module, _GLOBAL):
        return _seen_whole(field, spatial_in, call.output_shape) if spatial_in else field
    reduced = _flax_reduced_axes(module, len(call.input_shape)) if call.input_shape else None
    if reduced is not None:
        if reduced & set(range(1, len(call.input_shape) - 1)):  # mixes spatial positions
            return _seen_whole(field, spatial_in, call.output_shape)
        return (
            field if call.output_shape == call.input_shape[:-1] + call.output_shape[-1:] else None
        )
    if isinstance(module, _POINTWISE) or type(module).__module__ == "jcnn.nn.activation":
        return field
    if spatial_in is None or len(spatial_in) != len(field.size):
        return None
    return _window_field(module, field, spatial_in)


def _seen_whole(field: ReceptiveField, spatial_in, output_shape) -> ReceptiveField:
    """The field of a layer whose every output sees all of its ``spatial_in`` input. Where the
    output is still a map (a normalization), neighbouring units see the same window: their
    stride is 0, so later windows add nothing to it."""
    whole = field.whole(spatial_in)
    if _spatial(output_shape) is None:  # flatten, global pool: no neighbouring positions
        return whole
    return dataclasses.replace(whole, stride=(0,) * len(whole.stride))


def _own_params(calls: list[LayerCall], call: LayerCall, variables) -> dict:
    """The parameters of a composite module that sit in none of the modules it calls (e.g. a
    block's ``layer_scale`` vector)."""
    # descendants, not only children: a child sharing this module's scope (``nn.share_scope``)
    # has its path, and its own children hold the variables
    children = {
        c.path[len(call.path)]
        for c in calls[call.index + 1 :]
        if len(c.path) > len(call.path) and _descends(calls, c, call.index)
    }
    params = subtree(variables, "params", call.path)
    return {name: value for name, value in params.items() if name not in children}


def summary(
    model: nn.Module, input_shape: Sequence[int], dtype: DTypeLike = jnp.float32
) -> Summary:
    """Table of the layers of ``model`` run on an input of ``input_shape``.

    Args:
      model: a Flax module (a ``jcnn.models`` network, a ``jcnn.nn.Sequential``, your own).
      input_shape: the input's shape with the batch axis, channels-last, e.g. ``(1, 28, 28, 1)``.
      dtype: the input's dtype.

    Returns:
      A ``Summary``: ``print`` it for the table, or read ``.rows`` (``LayerRow``), ``.total_params``
      and ``.total_macs``.

    >>> import jcnn
    >>> table = summary(jcnn.nn.Conv(10, 5, padding=2), (1, 32, 32, 3))
    >>> table.total_params, table.total_macs
    (760, 768000)
    >>> print(table)  # doctest: +NORMALIZE_WHITESPACE
    Layer  Type                       Output shape     Weight shape  Params     MACs  RF  Stride
    -------------------------------------------------------------------------------------------
    input                             (1, 32, 32, 3)                                   1       1
           Conv(10, k=5, s=1, p=2)    (1, 32, 32, 10)  (5, 5, 3, 10)    760  768,000   5       1
    -------------------------------------------------------------------------------------------
    Total params: 760    Total MACs: 768,000
    """
    calls, variables = trace_layers(model, input_shape, dtype)
    fields = _fields(calls)
    placed = []  # (position, row): a composite's own row goes after its last layer
    counted: set[tuple[str, ...]] = set()
    for call in calls:
        if call.is_leaf:
            params = subtree(variables, "params", call.path)
            if call.lifted:  # traced once, not once per step or slice
                macs = None
            else:
                macs = _macs(call.module, call)
                if macs is None and not params:  # a parameter-free layer of its own
                    macs = call.products
            layer = _describe(call.module)
            position = (call.index, 0, 0)
        else:
            params = _own_params(calls, call, variables)
            if (not params or call.path in counted) and call.products == 0:
                continue
            # per-channel scales or shifts act elementwise (no products, as a bias), beside the
            # products of its own code (an attention's QK^T); a matrix used outside the layers
            # has products this table does not attribute
            per_channel = all(len(p.shape) <= 1 for p in jax.tree.leaves(params))
            macs = call.products if per_channel else None
            own = list(params) or sorted(call.product_kinds)
            layer = f"{type(call.module).__name__}({', '.join(own)})"
            descendants = [
                c.index for c in calls[call.index + 1 :] if _descends(calls, c, call.index)
            ]
            position = (max(descendants), 1, -len(call.path))
        placed.append(
            (
                position,
                LayerRow(
                    name="/".join(call.path),
                    layer=layer,
                    input_shape=call.input_shape,
                    output_shape=call.output_shape,
                    weight_shape=_weight_shape(params),
                    # a module called again (shared weights) adds its products, not its parameters
                    params=0 if call.path in counted else _count(params),
                    macs=macs,
                    receptive_field=fields.get(call.index),
                ),
            )
        )
        counted.add(call.path)
    rows = [row for _, row in sorted(placed, key=lambda item: item[0])]
    return Summary(
        rows=tuple(rows),
        input_shape=tuple(input_shape),
        total_params=_count(variables.get("params", {})),
        total_macs=sum(row.macs for row in rows if row.macs is not None),
        uncounted=tuple(row.name or row.layer for row in rows if row.macs is None),
    )


def receptive_field(model: nn.Module, input_shape: Sequence[int]) -> ReceptiveField | None:
    """Receptive field of the units of ``model``'s output, composed from its layers.

    Args:
      model: a Flax module built from ``jcnn.nn`` layers (``flax.linen`` convs and dense layers
        are known too).
      input_shape: the input's shape with the batch axis, channels-last.

    Returns:
      A ``ReceptiveField`` (size, effective stride and start per spatial axis), or ``None`` when
      a layer of unknown geometry (e.g. a transposed convolution) sits on the way.

    Three stacked 3x3 convs see ``1 + 3 * 2 = 7`` pixels; after a 2x2 pool a 3x3 conv adds 2 * 2:

    >>> import jcnn
    >>> from jcnn import nn
    >>> convs = nn.Sequential([nn.Conv(4, 3), nn.Conv(4, 3), nn.Conv(4, 3)])
    >>> receptive_field(convs, (1, 16, 16, 1))
    ReceptiveField(size=(7, 7), stride=(1, 1), start=(0, 0))
    >>> pooled = nn.Sequential([nn.Conv(4, 3), nn.MaxPool(2), nn.Conv(4, 3)])
    >>> receptive_field(pooled, (1, 16, 16, 1)).size
    (8, 8)
    """
    calls, _ = trace_layers(model, input_shape)
    fields = _fields(calls)
    return fields.get(0)
