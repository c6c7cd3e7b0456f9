"""Tests of jcnn.functional.conv against PyTorch CPU and NumPy loops.

The parity suites draw hundreds of random configurations (spatial rank, odd sizes, channels, groups
including depthwise, stride, dilation, every padding form and mode, bias or not) from seeded
generators and compare the forward values and the gradients with respect to x, w and b with
PyTorch computing in float64, by the norm-wise relative error ``||jcnn - torch|| / ||torch||``.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn.functional._conv_cpu import _Config, native_conv
from jcnn.functional.conv import conv, conv_transpose, convolve

RELATIVE_TOLERANCE = 1e-5
CONV_CHUNKS, CONV_CASES_PER_CHUNK = 4, 45
TRANSPOSE_CHUNKS, TRANSPOSE_CASES_PER_CHUNK = 2, 45
# The parity chunks compile their many small programs as one. XLA:CPU's older elemental fusion
# emitters without LLVM optimizations compile that about six times faster than the defaults; the
# operations, and so the numerics, are the same.
FAST_COMPILE = (
    {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
    if jax.default_backend() == "cpu"
    else {}
)


def fast_jit(function):
    return jax.jit(function, compiler_options=FAST_COMPILE)


@pytest.fixture(autouse=True)
def _full_float32_precision():
    """Full float32 convolutions on accelerators too (no TF32), as the tolerances assume."""
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(params=["xla", "onednn"])
def conv_backend(request, monkeypatch):
    """Both CPU backends of F.conv: jcnn's XLA formulations and oneDNN (where it is built)."""
    if request.param == "onednn":
        request.getfixturevalue("onednn")
    monkeypatch.setenv("JCNN_CONV_BACKEND", request.param)
    return request.param


def relative_error(actual, expected) -> float:
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.linalg.norm(actual - expected) / max(np.linalg.norm(expected), 1e-30))


def torch_tensor(array, torch, *, grad: bool = False):
    return torch.tensor(np.ascontiguousarray(array), dtype=torch.float64, requires_grad=grad)


def to_torch_layout(array: np.ndarray, torch, *, grad: bool = False):
    """``(N, *spatial, C)`` -> torch ``(N, C, *spatial)`` in float64."""
    return torch_tensor(np.moveaxis(array, -1, 1), torch, grad=grad)


def from_torch_layout(tensor) -> np.ndarray:
    return np.moveaxis(tensor.detach().numpy(), 1, -1)


def kernel_to_torch(w: np.ndarray, torch, *, transposed: bool = False, grad: bool = False):
    """jcnn's ``(*window, A, B)`` -> torch's ``(B, A, *window)`` (conv) or ``(A, B, *window)``."""
    order = (-2, -1) if transposed else (-1, -2)
    return torch_tensor(np.moveaxis(w, order, (0, 1)), torch, grad=grad)


def kernel_from_torch(w: np.ndarray, *, transposed: bool = False) -> np.ndarray:
    """The inverse of :func:`kernel_to_torch` (for gradients)."""
    order = (-2, -1) if transposed else (-1, -2)
    return np.moveaxis(w, (0, 1), order)


def torch_pad_widths(pairs) -> tuple[int, ...]:
    """``((lo, hi), ...)`` in spatial order -> torch.nn.functional.pad's last-dim-first list."""
    return tuple(v for lo, hi in reversed(pairs) for v in (lo, hi))


def same_padding_reference(sizes, window, stride, dilation):
    """TensorFlow's "SAME": output ceil(n / s); of an odd total, the extra pixel goes last."""
    pairs = []
    for n, k, s, d in zip(sizes, window, stride, dilation, strict=True):
        out = (n + s - 1) // s
        total = max(0, (out - 1) * s + d * (k - 1) + 1 - n)
        pairs.append((total // 2, total - total // 2))
    return tuple(pairs)


def per_dim(value, rank: int) -> tuple[int, ...]:
    return (value,) * rank if isinstance(value, int) else tuple(value)


def torch_conv_nd(torch, rank: int, *, transposed: bool = False):
    functional = torch.nn.functional
    if transposed:
        return (
            functional.conv_transpose1d,
            functional.conv_transpose2d,
            functional.conv_transpose3d,
        )[rank - 1]
    return (functional.conv1d, functional.conv2d, functional.conv3d)[rank - 1]


# ----------------------------------------------------------------------------------------------
# Random configurations


def draw_channels(rng):
    """(C_in, C_out, groups) of a plain, grouped or depthwise convolution."""
    kind = rng.choice(["plain", "grouped", "depthwise"], p=[0.4, 0.35, 0.25])
    if kind == "plain":
        return int(rng.integers(1, 5)), int(rng.integers(1, 5)), 1
    if kind == "grouped":
        groups = int(rng.integers(2, 4))
        return groups * int(rng.integers(1, 3)), groups * int(rng.integers(1, 3)), groups
    groups = int(rng.integers(2, 5))
    return groups, groups * int(rng.integers(1, 3)), groups


def draw_int_or_per_dim(rng, rank: int, low: int, high: int):
    """An int or a per-dim tuple, as passed to jcnn."""
    values = tuple(int(v) for v in rng.integers(low, high + 1, size=rank))
    return values[0] if rng.random() < 0.4 else values


@dataclasses.dataclass(frozen=True)
class ConvCase:
    batch: int
    sizes: tuple[int, ...]
    window: tuple[int, ...]
    in_channels: int
    out_channels: int
    groups: int
    stride: int | tuple[int, ...]
    dilation: int | tuple[int, ...]
    padding: object  # exactly what jcnn receives
    pairs: tuple[tuple[int, int], ...]  # the same padding, explicit, computed by the test
    padding_mode: str
    bias: bool

    @property
    def rank(self) -> int:
        return len(self.sizes)

    def shapes(self):
        """Shapes of x, w and b (None without bias)."""
        kernel = (*self.window, self.in_channels // self.groups, self.out_channels)
        bias = (self.out_channels,) if self.bias else None
        return (self.batch, *self.sizes, self.in_channels), kernel, bias

    def jcnn(self, x, w, b):
        return conv(
            x,
            w,
            b,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            padding_mode=self.padding_mode,
        )

    def torch(self, x, w, b, torch):
        """PyTorch's answer, with padding built independently of jcnn."""
        conv_nd = torch_conv_nd(torch, self.rank)
        stride = per_dim(self.stride, self.rank)
        keywords = dict(stride=stride, dilation=self.dilation, groups=self.groups)
        is_same = isinstance(self.padding, str) and self.padding.upper() == "SAME"
        if self.padding_mode == "zeros":
            if is_same and all(s == 1 for s in stride):
                return conv_nd(x, w, b, padding="same", **keywords)
            if all(lo == hi for lo, hi in self.pairs):
                return conv_nd(x, w, b, padding=tuple(lo for lo, _ in self.pairs), **keywords)
        mode = "constant" if self.padding_mode == "zeros" else self.padding_mode
        padded = torch.nn.functional.pad(x, torch_pad_widths(self.pairs), mode=mode)
        return conv_nd(padded, w, b, **keywords)


def draw_conv_case(rng) -> ConvCase:
    rank = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    in_channels, out_channels, groups = draw_channels(rng)
    window = tuple(int(k) for k in rng.integers(1, 4 if rank < 3 else 3, size=rank))
    stride = draw_int_or_per_dim(rng, rank, 1, 3)
    dilation = draw_int_or_per_dim(rng, rank, 1, 2)
    padding_mode = str(
        rng.choice(["zeros", "reflect", "replicate", "circular"], p=[0.4, 0.2, 0.2, 0.2])
    )
    form = rng.choice(["int", "per_dim", "pairs", "SAME", "VALID"], p=[0.2, 0.2, 0.3, 0.2, 0.1])
    spans = [d * (k - 1) + 1 for k, d in zip(window, per_dim(dilation, rank), strict=True)]
    if form == "int":
        p = int(rng.integers(0, 3))
        padding, pairs = p, ((p, p),) * rank
    elif form == "per_dim":
        padding = tuple(int(p) for p in rng.integers(0, 3, size=rank))
        pairs = tuple((p, p) for p in padding)
    elif form == "pairs":
        padding = pairs = tuple((int(lo), int(hi)) for lo, hi in rng.integers(0, 4, size=(rank, 2)))
    else:
        padding = str(form) if rng.random() < 0.7 else str(form).lower()
        pairs = None
    max_size = 9 if rank < 3 else 5
    sizes = []
    for dim in range(rank):
        if pairs is None:  # "SAME" pads less than the span on each side, "VALID" not at all
            smallest = spans[dim]
        else:
            lo, hi = pairs[dim]
            smallest = max(1, spans[dim] - lo - hi)
            if padding_mode == "reflect":
                smallest = max(smallest, lo + 1, hi + 1)
            elif padding_mode == "circular":
                smallest = max(smallest, lo, hi)
        sizes.append(int(rng.integers(smallest, max(smallest, max_size) + 1)))
    sizes = tuple(sizes)
    if form == "SAME":
        pairs = same_padding_reference(
            sizes, window, per_dim(stride, rank), per_dim(dilation, rank)
        )
    elif form == "VALID":
        pairs = ((0, 0),) * rank
    return ConvCase(
        batch=int(rng.integers(1, 3)),
        sizes=sizes,
        window=window,
        in_channels=in_channels,
        out_channels=out_channels,
        groups=groups,
        stride=stride,
        dilation=dilation,
        padding=padding,
        pairs=pairs,
        padding_mode=padding_mode,
        bias=bool(rng.random() < 0.6),
    )


@dataclasses.dataclass(frozen=True)
class TransposeCase:
    batch: int
    sizes: tuple[int, ...]
    window: tuple[int, ...]
    in_channels: int
    out_channels: int
    groups: int
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    output_padding: tuple[int, ...]
    padding: object
    pairs: tuple[tuple[int, int], ...]
    bias: bool

    @property
    def rank(self) -> int:
        return len(self.sizes)

    def shapes(self):
        kernel = (*self.window, self.in_channels, self.out_channels // self.groups)
        bias = (self.out_channels,) if self.bias else None
        return (self.batch, *self.sizes, self.in_channels), kernel, bias

    def jcnn(self, x, w, b):
        return conv_transpose(
            x,
            w,
            b,
            stride=self.stride,
            padding=self.padding,
            output_padding=self.output_padding,
            dilation=self.dilation,
            groups=self.groups,
        )

    def torch(self, x, w, b, torch):
        """PyTorch's answer; an asymmetric (lo, hi) crop slices its unpadded output."""
        conv_nd = torch_conv_nd(torch, self.rank, transposed=True)
        keywords = dict(
            stride=self.stride,
            output_padding=self.output_padding,
            dilation=self.dilation,
            groups=self.groups,
        )
        if all(lo == hi for lo, hi in self.pairs):
            return conv_nd(x, w, b, padding=tuple(lo for lo, _ in self.pairs), **keywords)
        full = conv_nd(x, w, b, padding=0, **keywords)
        crop = tuple(slice(lo, full.shape[2 + dim] - hi) for dim, (lo, hi) in enumerate(self.pairs))
        return full[(slice(None), slice(None), *crop)]


def draw_transpose_case(rng) -> TransposeCase:
    rank = int(rng.choice([1, 2, 3], p=[0.3, 0.45, 0.25]))
    in_channels, out_channels, groups = draw_channels(rng)
    window = tuple(int(k) for k in rng.integers(1, 5 if rank < 3 else 3, size=rank))
    stride = tuple(int(s) for s in rng.integers(1, 4, size=rank))
    dilation = tuple(int(d) for d in rng.integers(1, 3, size=rank))
    output_padding = tuple(
        int(rng.integers(0, max(s, d))) for s, d in zip(stride, dilation, strict=True)
    )
    sizes = tuple(int(n) for n in rng.integers(1, 6 if rank < 3 else 4, size=rank))
    pairs = []
    for n, k, s, d, extra in zip(sizes, window, stride, dilation, output_padding, strict=True):
        full = (n - 1) * s + d * (k - 1) + extra + 1
        lo = int(rng.integers(0, (full - 1) // 2 + 1))
        hi = int(rng.integers(0, full - lo))  # at least one output pixel survives
        pairs.append((lo, hi))
    form = rng.choice(["int", "per_dim", "pairs"], p=[0.3, 0.3, 0.4])
    if form == "int":
        p = min(min(pair) for pair in pairs)
        pairs, padding = [(p, p)] * rank, p
    elif form == "per_dim":
        pairs = [(min(pair),) * 2 for pair in pairs]
        padding = tuple(lo for lo, _ in pairs)
    else:
        padding = tuple(pairs)
    return TransposeCase(
        batch=int(rng.integers(1, 3)),
        sizes=sizes,
        window=window,
        in_channels=in_channels,
        out_channels=out_channels,
        groups=groups,
        stride=stride,
        dilation=dilation,
        output_padding=output_padding,
        padding=padding,
        pairs=tuple(pairs),
        bias=bool(rng.random() < 0.6),
    )


# ----------------------------------------------------------------------------------------------
# Parity with PyTorch


def jcnn_outputs_and_vjps(cases, inputs, cotangents):
    """Each case's output and VJP, all compiled as one XLA program (compiling dominates)."""

    def run(inputs, cotangents):
        results = []
        for case, (x, w, b), cotangent in zip(cases, inputs, cotangents, strict=True):
            y, vjp = jax.vjp(case.jcnn, x, w, b)
            results.append((y, vjp(cotangent)))
        return results

    return fast_jit(run)(inputs, cotangents)


def parity_failures(cases, rng, torch, *, transposed: bool):
    """Cases whose output or gradients differ from PyTorch's, and the largest error seen."""
    inputs, cotangents = [], []
    for case in cases:
        x_shape, w_shape, b_shape = case.shapes()
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = rng.standard_normal(w_shape).astype(np.float32)
        b = None if b_shape is None else rng.standard_normal(b_shape).astype(np.float32)
        inputs.append((x, w, b))
        y_shape = jax.eval_shape(case.jcnn, x, w, b).shape
        cotangents.append(rng.standard_normal(y_shape).astype(np.float32))
    results = jcnn_outputs_and_vjps(cases, inputs, cotangents)

    failures, worst = [], 0.0
    for case, (x, w, b), cotangent, (y, grads) in zip(
        cases, inputs, cotangents, results, strict=True
    ):
        tx = to_torch_layout(x, torch, grad=True)
        tw = kernel_to_torch(w, torch, transposed=transposed, grad=True)
        tb = None if b is None else torch_tensor(b, torch, grad=True)
        ty = case.torch(tx, tw, tb, torch)
        ty.backward(to_torch_layout(cotangent, torch))
        errors = {
            "y": relative_error(y, from_torch_layout(ty)),
            "dx": relative_error(grads[0], from_torch_layout(tx.grad)),
            "dw": relative_error(
                grads[1], kernel_from_torch(tw.grad.numpy(), transposed=transposed)
            ),
        }
        if b is not None:
            errors["db"] = relative_error(grads[2], tb.grad.numpy())
        worst = max(worst, *errors.values())
        if max(errors.values()) > RELATIVE_TOLERANCE:
            failures.append((case, errors))
    return failures, worst


def drawn_cases(draw, chunk: int):
    """The chunk's configurations, and the generator (seeded by chunk) that goes on to fill them."""
    rng = np.random.default_rng([int(draw is draw_transpose_case), chunk])
    cases_per_chunk = (
        TRANSPOSE_CASES_PER_CHUNK if draw is draw_transpose_case else (CONV_CASES_PER_CHUNK)
    )
    return [draw(rng) for _ in range(cases_per_chunk)], rng


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on its own copy
@pytest.mark.parametrize("chunk", range(CONV_CHUNKS))
def test_conv_matches_torch_on_random_configurations(chunk, torch, conv_backend):
    cases, rng = drawn_cases(draw_conv_case, chunk)
    failures, worst = parity_failures(cases, rng, torch, transposed=False)
    assert not failures, f"{len(failures)} configurations differ from torch: {failures[:3]}"
    assert worst > 0.0  # float32 against float64 rounds somewhere: the numbers were compared


@pytest.mark.parametrize("chunk", range(TRANSPOSE_CHUNKS))
def test_conv_transpose_matches_torch_on_random_configurations(chunk, torch, conv_backend):
    cases, rng = drawn_cases(draw_transpose_case, chunk)
    failures, worst = parity_failures(cases, rng, torch, transposed=True)
    assert not failures, f"{len(failures)} configurations differ from torch: {failures[:3]}"
    assert worst > 0.0


def test_random_configurations_cover_every_feature():
    """The configurations of the parity tests reach every rank, padding form and mode, groups
    kind, stride, dilation, output_padding."""
    cases = [case for chunk in range(CONV_CHUNKS) for case in drawn_cases(draw_conv_case, chunk)[0]]
    assert {case.rank for case in cases} == {1, 2, 3}
    assert {case.padding_mode for case in cases} == {"zeros", "reflect", "replicate", "circular"}
    forms = {
        type(case.padding).__name__ if not isinstance(case.padding, str) else case.padding
        for case in cases
    }
    assert {"int", "tuple", "SAME", "VALID", "same", "valid"} <= forms
    assert any(lo != hi for case in cases for lo, hi in case.pairs)
    assert any(case.padding == "SAME" and case.padding_mode != "zeros" for case in cases)
    assert any(case.groups == case.in_channels > 1 for case in cases)  # depthwise
    assert any(1 < case.groups < case.in_channels for case in cases)
    assert any(max(per_dim(case.stride, case.rank)) > 1 for case in cases)
    assert any(max(per_dim(case.dilation, case.rank)) > 1 for case in cases)
    assert any(case.bias for case in cases) and not all(case.bias for case in cases)
    transposed = [
        case
        for chunk in range(TRANSPOSE_CHUNKS)
        for case in drawn_cases(draw_transpose_case, chunk)[0]
    ]
    assert {case.rank for case in transposed} == {1, 2, 3}
    assert any(max(case.output_padding) > 0 for case in transposed)
    assert any(case.groups > 1 for case in transposed)
    assert any(lo != hi for case in transposed for lo, hi in case.pairs)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_same_padding_matches_explicit_asymmetric_padding(rng, torch):
    """ "SAME" keeps ceil(size / stride) and pads the odd pixel at the high end."""
    functional = torch.nn.functional
    configs = [  # (size, kernel, stride, dilation)
        ((7, 6), (2, 3), (1, 1), (1, 1)),
        ((7, 8), (4, 3), (2, 3), (1, 1)),
        ((5, 9), (3, 2), (1, 2), (2, 3)),
        ((6, 5), (1, 5), (3, 1), (1, 1)),
    ]
    for sizes, window, stride, dilation in configs:
        x = rng.standard_normal((2, *sizes, 3)).astype(np.float32)
        w = rng.standard_normal((*window, 3, 4)).astype(np.float32)
        y = conv(x, w, stride=stride, padding="SAME", dilation=dilation)
        assert y.shape[1:3] == tuple(-(-n // s) for n, s in zip(sizes, stride, strict=True))
        tx, tw = to_torch_layout(x, torch), kernel_to_torch(w, torch)
        if stride == (1, 1):
            expected = functional.conv2d(tx, tw, padding="same", dilation=dilation)
        else:
            pairs = same_padding_reference(sizes, window, stride, dilation)
            padded = functional.pad(tx, torch_pad_widths(pairs))
            expected = functional.conv2d(padded, tw, stride=stride, dilation=dilation)
        assert relative_error(y, from_torch_layout(expected)) < RELATIVE_TOLERANCE


# ----------------------------------------------------------------------------------------------
# NumPy loops: the definitions, independent of lax


def numpy_conv2d(x, w, b, *, stride, pairs, dilation, groups, flip=False):
    """Direct sums over output pixels and kernel taps; ``flip`` reads ``w[kh-1-a, kw-1-c]``."""
    x = np.pad(x.astype(np.float64), ((0, 0), *pairs, (0, 0)))
    n, height, width, _ = x.shape
    kh, kw, in_per_group, out_channels = w.shape
    out_per_group = out_channels // groups
    out_h = (height - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (width - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    y = np.zeros((n, out_h, out_w, out_channels))
    for i in range(out_h):
        for j in range(out_w):
            for a in range(kh):
                for c in range(kw):
                    pixel = x[:, i * stride[0] + a * dilation[0], j * stride[1] + c * dilation[1]]
                    tap = w[kh - 1 - a, kw - 1 - c] if flip else w[a, c]
                    for g in range(groups):
                        ins = slice(g * in_per_group, (g + 1) * in_per_group)
                        outs = slice(g * out_per_group, (g + 1) * out_per_group)
                        y[:, i, j, outs] += pixel[:, ins] @ tap[:, outs]
    return y if b is None else y + b


def numpy_conv_transpose2d(x, w, b, *, stride, padding, output_padding, dilation, groups):
    """Scatter every input pixel times the kernel into the output, then crop ``padding``."""
    n, height, width, in_channels = x.shape
    kh, kw, _, out_per_group = w.shape
    in_per_group = in_channels // groups
    full = np.zeros(
        (
            n,
            (height - 1) * stride[0] + dilation[0] * (kh - 1) + 1 + output_padding[0],
            (width - 1) * stride[1] + dilation[1] * (kw - 1) + 1 + output_padding[1],
            out_per_group * groups,
        )
    )
    for i in range(height):
        for j in range(width):
            for a in range(kh):
                for c in range(kw):
                    row, col = i * stride[0] + a * dilation[0], j * stride[1] + c * dilation[1]
                    for g in range(groups):
                        ins = slice(g * in_per_group, (g + 1) * in_per_group)
                        outs = slice(g * out_per_group, (g + 1) * out_per_group)
                        full[:, row, col, outs] += x[:, i, j, ins] @ w[a, c, ins]
    (top, bottom), (left, right) = padding
    y = full[:, top : full.shape[1] - bottom, left : full.shape[2] - right]
    return y if b is None else y + b


def test_conv_and_convolve_match_numpy_loops(rng):
    configs = [  # (size, window, C_in, C_out, groups, stride, pairs, dilation)
        ((5, 6), (3, 2), 2, 3, 1, (1, 1), ((0, 0), (0, 0)), (1, 1)),
        ((7, 5), (3, 3), 4, 6, 2, (2, 1), ((1, 2), (0, 1)), (1, 2)),
        ((6, 7), (2, 3), 3, 6, 3, (1, 3), ((2, 0), (1, 1)), (2, 1)),
        ((4, 5), (1, 2), 2, 2, 2, (2, 2), ((1, 1), (2, 2)), (1, 1)),
    ]
    for sizes, window, c_in, c_out, groups, stride, pairs, dilation in configs:
        x = rng.standard_normal((2, *sizes, c_in)).astype(np.float32)
        w = rng.standard_normal((*window, c_in // groups, c_out)).astype(np.float32)
        b = rng.standard_normal(c_out).astype(np.float32)
        keywords = dict(stride=stride, dilation=dilation, groups=groups)
        expected = numpy_conv2d(x, w, b, pairs=pairs, **keywords)
        assert relative_error(conv(x, w, b, padding=pairs, **keywords), expected) < 1e-6
        expected = numpy_conv2d(x, w, b, pairs=pairs, flip=True, **keywords)
        assert relative_error(convolve(x, w, b, padding=pairs, **keywords), expected) < 1e-6
        flipped = conv(x, w, b, padding=pairs, flip=True, **keywords)
        assert relative_error(flipped, expected) < 1e-6


def test_conv_transpose_matches_numpy_scatter(rng):
    configs = [  # (size, window, C_in, C_out / groups, groups, stride, pairs, out_pad, dilation)
        ((3, 4), (3, 2), 2, 3, 1, (2, 1), ((0, 0), (0, 0)), (1, 0), (1, 1)),
        ((4, 3), (2, 3), 4, 1, 2, (3, 2), ((1, 2), (0, 1)), (2, 1), (1, 2)),
        ((2, 5), (3, 3), 3, 2, 3, (1, 2), ((2, 1), (1, 1)), (1, 1), (2, 1)),
    ]
    for (
        sizes,
        window,
        c_in,
        out_per_group,
        groups,
        stride,
        pairs,
        output_padding,
        dilation,
    ) in configs:
        x = rng.standard_normal((2, *sizes, c_in)).astype(np.float32)
        w = rng.standard_normal((*window, c_in, out_per_group)).astype(np.float32)
        b = rng.standard_normal(out_per_group * groups).astype(np.float32)
        keywords = dict(
            stride=stride, output_padding=output_padding, dilation=dilation, groups=groups
        )
        expected = numpy_conv_transpose2d(x, w, b, padding=pairs, **keywords)
        assert relative_error(conv_transpose(x, w, b, padding=pairs, **keywords), expected) < 1e-6


# ----------------------------------------------------------------------------------------------
# Transformations: vmap, jit, grad, second derivatives


def test_vmap_over_a_leading_axis_equals_the_loop(rng):
    xs = rng.standard_normal((3, 2, 7, 6, 4)).astype(np.float32)
    ws = rng.standard_normal((3, 3, 2, 2, 6)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)

    def forward(x, w):
        return conv(x, w, b, stride=(2, 1), padding="SAME", groups=2, padding_mode="reflect")

    looped = np.stack([forward(x, w) for x, w in zip(xs, ws, strict=True)])
    np.testing.assert_allclose(jax.vmap(forward)(xs, ws), looped, rtol=1e-5, atol=1e-5)
    shared = np.stack([forward(x, ws[0]) for x in xs])
    np.testing.assert_allclose(
        jax.vmap(forward, (0, None))(xs, ws[0]), shared, rtol=1e-5, atol=1e-5
    )

    def backward(x, w):
        return conv_transpose(x, w, b, stride=2, padding=1, output_padding=1, groups=2)

    wt = rng.standard_normal((3, 3, 3, 4, 3)).astype(np.float32)
    looped = np.stack([backward(x, w) for x, w in zip(xs, wt, strict=True)])
    np.testing.assert_allclose(jax.vmap(backward)(xs, wt), looped, rtol=1e-5, atol=1e-5)


def test_jit_and_grad_agree_with_eager_and_torch(rng, torch):
    x = rng.standard_normal((2, 9, 3)).astype(np.float32)
    w = rng.standard_normal((3, 1, 6)).astype(np.float32)
    b = rng.standard_normal(6).astype(np.float32)

    def loss(x, w, b):
        y = conv(x, w, b, stride=2, padding=(2,), dilation=2, groups=3, padding_mode="circular")
        return jnp.sum(jnp.tanh(y))

    value = loss(x, w, b)
    eager = jax.grad(loss, argnums=(0, 1, 2))(x, w, b)
    jitted_value, jitted = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, w, b)
    np.testing.assert_allclose(jitted_value, value, rtol=1e-6)
    for a, e in zip(jitted, eager, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6)

    tx, tw, tb = (
        to_torch_layout(x, torch, grad=True),
        kernel_to_torch(w, torch, grad=True),
        (torch_tensor(b, torch, grad=True)),
    )
    padded = torch.nn.functional.pad(tx, (2, 2), mode="circular")
    torch.tanh(
        torch.nn.functional.conv1d(padded, tw, tb, stride=2, dilation=2, groups=3)
    ).sum().backward()
    assert relative_error(eager[0], from_torch_layout(tx.grad)) < RELATIVE_TOLERANCE
    assert relative_error(eager[1], kernel_from_torch(tw.grad.numpy())) < RELATIVE_TOLERANCE
    assert relative_error(eager[2], tb.grad.numpy()) < RELATIVE_TOLERANCE


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transpose"])
def test_second_derivatives_match_torch(transposed, rng, torch, conv_backend):
    """Gradient of <grad loss, v>: a Hessian-vector product through the convolution."""
    x = rng.standard_normal((2, 5, 6, 4)).astype(np.float32)
    w_shape = (3, 2, 4, 3) if transposed else (3, 2, 2, 6)
    w = rng.standard_normal(w_shape).astype(np.float32)
    vx = rng.standard_normal(x.shape).astype(np.float32)
    vw = rng.standard_normal(w.shape).astype(np.float32)
    keywords = dict(stride=(2, 1), padding=1, dilation=(1, 2), groups=2)

    def loss(x, w):
        op = conv_transpose if transposed else conv
        return jnp.sum(jnp.tanh(op(x, w, **keywords)))

    def directional(x, w):
        gx, gw = jax.grad(loss, argnums=(0, 1))(x, w)
        return jnp.vdot(gx, vx) + jnp.vdot(gw, vw)

    hx, hw = fast_jit(jax.grad(directional, argnums=(0, 1)))(x, w)

    tx = to_torch_layout(x, torch, grad=True)
    tw = kernel_to_torch(w, torch, transposed=transposed, grad=True)
    op = torch_conv_nd(torch, 2, transposed=transposed)
    total = torch.tanh(op(tx, tw, **keywords)).sum()
    gx, gw = torch.autograd.grad(total, (tx, tw), create_graph=True)
    tvx = to_torch_layout(vx, torch)
    tvw = kernel_to_torch(vw, torch, transposed=transposed)
    thx, thw = torch.autograd.grad((gx * tvx).sum() + (gw * tvw).sum(), (tx, tw))
    assert relative_error(hx, from_torch_layout(thx)) < RELATIVE_TOLERANCE
    assert relative_error(hw, kernel_from_torch(thw.numpy(), transposed=transposed)) < (
        RELATIVE_TOLERANCE
    )


FORWARD_MODE_CASES = {  # x shape, w shape, stride, padding, dilation, groups
    "plain 2-D": ((2, 7, 6, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1)), (1, 1), 1),
    "stride, dilation, groups": ((2, 9, 8, 6), (3, 2, 3, 4), (2, 1), ((0, 1), (1, 0)), (1, 2), 2),
    "depthwise x2": ((2, 6, 7, 3), (3, 3, 1, 6), (1, 1), ((1, 1), (1, 1)), (1, 1), 3),
    "one input channel": ((3, 6, 6, 1), (3, 3, 1, 2), (2, 2), ((0, 0), (0, 0)), (1, 1), 1),
    "1-D": ((2, 11, 3), (4, 3, 2), (3,), ((0, 2),), (2,), 1),
    "3-D": ((1, 4, 5, 4, 2), (2, 3, 2, 2, 3), (1, 2, 1), ((1, 1),) * 3, (1, 1, 1), 1),
}


def lax_conv(x, w, stride, padding, dilation, groups):
    """XLA's own ``lax.conv_general_dilated`` in jcnn's layout (what GPUs and TPUs run)."""
    return native_conv(x, w, _Config(stride, padding, dilation, groups, None))


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transpose"])
@pytest.mark.parametrize("case", FORWARD_MODE_CASES, ids=list(FORWARD_MODE_CASES))
def test_forward_mode_and_mixed_transformations_match_xla(case, transposed, rng, conv_backend):
    """jax.jvp, jax.linearize, Hessians (jax.hessian, forward over reverse) and their mixes with
    vmap, through jcnn's CPU products, against the same transformations of XLA's own convolution
    (``lax.conv_general_dilated``); a transposed convolution against the transpose of XLA's."""
    x_shape, w_shape, stride, padding, dilation, groups = FORWARD_MODE_CASES[case]
    options = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    if transposed:  # conv_transpose(x, w) is the input gradient of lax_conv(., swapaxes(w))
        input_shape, kernel_shape = x_shape, w_shape
        x_shape = lax_conv(jnp.zeros(x_shape), jnp.zeros(w_shape), *options.values()).shape
        w_shape = (*kernel_shape[:-2], kernel_shape[-1], kernel_shape[-2])
        plain = conv_transpose(jnp.zeros(x_shape), jnp.zeros(w_shape), **options).shape
        output_padding = tuple(a - b for a, b in zip(input_shape, plain, strict=True))[1:-1]

        def jcnn_op(x, w):
            return conv_transpose(x, w, output_padding=output_padding, **options)

        def reference_op(x, w):
            zeros = jnp.zeros(input_shape, x.dtype)
            kernel = jnp.swapaxes(w, -1, -2)
            return jax.vjp(lambda z: lax_conv(z, kernel, *options.values()), zeros)[1](x)[0]

    else:

        def jcnn_op(x, w):
            return conv(x, w, **options)

        def reference_op(x, w):
            return lax_conv(x, w, *options.values())

    x, tx = (rng.standard_normal(x_shape).astype(np.float32) for _ in range(2))
    w, tw = (rng.standard_normal(w_shape).astype(np.float32) for _ in range(2))
    xs = rng.standard_normal((3, *x_shape)).astype(np.float32)
    ws = rng.standard_normal((2, *w_shape)).astype(np.float32)

    transforms = [
        lambda f: jax.jvp(f, (x, w), (tx, tw)),
        lambda f: jax.linearize(f, x, w)[1](tx, tw),
        lambda f: jax.jvp(jax.grad(f, argnums=(0, 1)), (x, w), (tx, tw))[1],
        lambda f: jax.hessian(f, argnums=1)(x, w),
        lambda f: jax.vmap(lambda x: jax.jvp(f, (x, w), (x, tw))[1])(xs),
        lambda f: jax.jvp(lambda xs: jax.vmap(lambda x: f(x, w))(xs), (xs,), (xs,))[1],
        lambda f: jax.grad(lambda w: jnp.sum(jax.vmap(lambda x: f(x, w))(xs)))(w),
        lambda f: jax.vmap(jax.grad(f, argnums=1), in_axes=(0, None))(xs, w),
        lambda f: jax.jacfwd(lambda ws: jax.vmap(lambda w: jax.vmap(f, (0, None))(xs, w))(ws))(ws),
    ]

    def run_all(op):  # every transformation of one side in one compiled program
        def loss(x, w):
            return jnp.sum(jnp.sin(op(x, w)))

        return fast_jit(lambda: [transform(loss) for transform in transforms])()

    for index, (actual, expected) in enumerate(
        zip(run_all(jcnn_op), run_all(reference_op), strict=True)
    ):
        for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
            assert relative_error(a, e) < RELATIVE_TOLERANCE, index


def test_convolutions_run_op_by_op_under_disable_jit(rng, conv_backend):
    x = rng.standard_normal((2, 7, 6, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 2, 6)).astype(np.float32)
    options = dict(stride=(1, 1), padding=((1, 1), (0, 2)), dilation=(1, 1), groups=2)

    def loss(op, x, w):
        return jnp.sum(jnp.sin(op(x, w)))

    jcnn_op = partial(conv, **options)
    reference_op = partial(lax_conv, **options)
    with jax.disable_jit():
        actual = loss(jcnn_op, x, w), jax.grad(partial(loss, jcnn_op), argnums=(0, 1))(x, w)
        tangent = jax.jvp(partial(loss, jcnn_op), (x, w), (x, w))[1]
    expected = loss(reference_op, x, w), jax.grad(partial(loss, reference_op), argnums=(0, 1))(x, w)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert relative_error(a, e) < RELATIVE_TOLERANCE
    assert relative_error(tangent, jax.jvp(partial(loss, reference_op), (x, w), (x, w))[1]) < (
        RELATIVE_TOLERANCE
    )


def test_conv_transpose_is_the_input_gradient_of_conv(rng):
    """With the kernel's last two axes swapped, conv_transpose is the VJP of conv w.r.t. x."""
    configs = [  # (size, window, C_in, C_out, groups, stride, padding, dilation)
        ((9, 8), (3, 2), 4, 6, 2, (2, 3), ((1, 0), (2, 1)), (1, 2)),
        ((7,), (4,), 3, 3, 3, (3,), 2, (2,)),
    ]
    for sizes, window, c_in, c_out, groups, stride, padding, dilation in configs:
        x = rng.standard_normal((2, *sizes, c_in)).astype(np.float32)
        w = rng.standard_normal((*window, c_in // groups, c_out)).astype(np.float32)
        keywords = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        y, vjp = jax.vjp(lambda x, w=w, keywords=keywords: conv(x, w, **keywords), x)
        cotangent = rng.standard_normal(y.shape).astype(np.float32)
        (expected,) = vjp(cotangent)
        plain = conv_transpose(cotangent, jnp.swapaxes(w, -1, -2), **keywords)
        output_padding = tuple(a - b for a, b in zip(sizes, plain.shape[1:-1], strict=True))
        actual = conv_transpose(
            cotangent, jnp.swapaxes(w, -1, -2), output_padding=output_padding, **keywords
        )
        assert relative_error(actual, expected) < 1e-6


# Run in a child process, as compiling them once aborted the process (jaxlib 0.10.2's XLA:CPU:
# "Window dimensions do not match RHS shape"). Each convolution has a dim with 2 undilated taps
# at stride 2 whose transposed window needs no padding (_conv_cpu.transpose_aborts_xla_cpu).
_ABORTING_TRANSPOSES = """
import sys
import jax
import numpy as np
from jcnn.functional import conv, conv_transpose
jax.config.update("jax_enable_x64", True)
arrays = dict(np.load(sys.argv[1]))
results = {}
for i, (stride, padding, dilation) in enumerate(%r):
    x, w, dy = arrays[f"x{i}"], arrays[f"w{i}"], arrays[f"dy{i}"]
    options = dict(stride=stride, padding=padding, dilation=dilation)
    dx = jax.jit(jax.grad(lambda x: (conv(x, w, **options) * dy).sum()))(x)
    plain = conv_transpose(dy, w.swapaxes(-1, -2), **options).shape[1:-1]
    extra = tuple(a - b for a, b in zip(x.shape[1:-1], plain))
    transpose = jax.jit(lambda dy: conv_transpose(dy, w.swapaxes(-1, -2), output_padding=extra,
                                                  **options))
    results[f"dx{i}"], results[f"y{i}"] = dx, transpose(dy)
np.savez(sys.argv[2], **results)
"""


def test_transposes_that_abort_xla_cpu_compile_and_equal_torch(tmp_path, rng, torch):
    configs = [  # (x shape, window, stride, padding, dilation); C_out = 3
        ((2, 6, 6, 4), (3, 2), (2, 2), ((0, 0), (1, 1)), (2, 1)),
        ((1, 5, 4, 4, 2), (3, 3, 2), (2, 2, 2), ((1, 1), (0, 1), (1, 2)), (2, 1, 1)),
    ]
    arrays, expected = {}, {}
    for i, (x_shape, window, stride, padding, dilation) in enumerate(configs):
        x = rng.standard_normal(x_shape)
        w = rng.standard_normal((*window, x_shape[-1], 3))
        x_torch = to_torch_layout(x, torch, grad=True)
        padded = torch.nn.functional.pad(x_torch, torch_pad_widths(padding))
        y = torch_conv_nd(torch, len(window))(
            padded, kernel_to_torch(w, torch), stride=stride, dilation=dilation
        )
        dy = rng.standard_normal(tuple(y.shape))
        (dx,) = torch.autograd.grad(y, x_torch, torch.tensor(dy))
        arrays |= {f"x{i}": x, f"w{i}": w, f"dy{i}": np.moveaxis(dy, 1, -1)}
        expected[i] = from_torch_layout(dx)
    np.savez(tmp_path / "in.npz", **arrays)
    configs_arg = [(stride, padding, dilation) for _, _, stride, padding, dilation in configs]
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            _ABORTING_TRANSPOSES % (configs_arg,),
            tmp_path / "in.npz",
            tmp_path / "out.npz",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-2000:]
    results = np.load(tmp_path / "out.npz")
    for i in expected:
        assert relative_error(results[f"dx{i}"], expected[i]) < 1e-12
        assert relative_error(results[f"y{i}"], expected[i]) < 1e-12


def test_mixed_dtypes_promote_and_low_precision_is_kept(rng):
    x = jnp.asarray(rng.standard_normal((1, 5, 5, 2)), jnp.bfloat16)
    w = jnp.asarray(rng.standard_normal((3, 3, 2, 3)), jnp.float32)
    assert conv(x, w).dtype == jnp.float32
    assert conv(x, w.astype(jnp.bfloat16)).dtype == jnp.bfloat16
    assert conv_transpose(x, w.astype(jnp.bfloat16), stride=2).dtype == jnp.bfloat16


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_bias_gradient_accumulates_in_float32(dtype, rng):
    # b's gradient sums the cotangent over 64 x 16 x 16 pixels: accumulated in bfloat16 it came
    # out 86% short (float16: 18%); PyTorch accumulates in float32.
    x = jnp.asarray(rng.standard_normal((64, 16, 16, 2)), dtype)
    w, b = jnp.ones((1, 1, 2, 2), dtype), jnp.zeros(2, dtype)
    cotangent = jnp.asarray(rng.standard_normal((64, 16, 16, 2)) + 1.0, dtype)
    expected = np.asarray(cotangent, np.float64).sum(axis=(0, 1, 2))
    for op in (conv, conv_transpose):
        y, vjp = jax.vjp(lambda b, op=op: op(x, w, b), b)
        assert y.dtype == dtype
        (db,) = vjp(cotangent)
        assert db.dtype == dtype
        np.testing.assert_allclose(np.asarray(db, np.float64), expected, rtol=1e-2)


# ----------------------------------------------------------------------------------------------
# Input checks: one case each, at trace time, naming the argument

X2 = np.zeros((2, 5, 5, 4), np.float32)
W2 = np.zeros((3, 3, 4, 6), np.float32)
WT = np.zeros((3, 3, 4, 3), np.float32)  # conv_transpose: C_in = 4, C_out / groups = 3

BAD_INPUTS = {
    "x rank vs kernel rank": (
        lambda: conv(X2[0], W2),
        ValueError,
        r"x: expected rank 4 \(N, H, W, C\) for a 2-D kernel .* got rank 3 with shape \(5, 5, 4\)",
    ),
    "kernel rank": (lambda: conv(X2, W2[0, 0]), ValueError, r"w: expected rank 3, 4 or 5"),
    "x channels vs C_in * groups": (
        lambda: conv(X2, np.zeros((3, 3, 1, 6), np.float32), groups=2),
        ValueError,
        r"x: expected 2 channels \(w.shape\[-2\] = 1 per group x groups = 2\), got 4",
    ),
    "groups not dividing C_in": (
        lambda: conv(X2, np.zeros((3, 3, 1, 6), np.float32), groups=3),
        ValueError,
        r"groups: the input channels C_in = x.shape\[-1\] = 4 are not divisible by groups = 3",
    ),
    "groups not dividing C_out": (
        lambda: conv(X2, np.zeros((3, 3, 1, 6), np.float32), groups=4),
        ValueError,
        r"groups: the output channels C_out = w.shape\[-1\] = 6 are not divisible by groups = 4",
    ),
    "non-positive groups": (lambda: conv(X2, W2, groups=0), ValueError, r"groups: .* got 0"),
    "non-int groups": (lambda: conv(X2, W2, groups=1.0), TypeError, r"groups: expected a positive"),
    "non-positive stride": (
        lambda: conv(X2, W2, stride=(1, 0)),
        ValueError,
        r"stride: every entry must be >= 1, got \(1, 0\)",
    ),
    "stride of the wrong length": (
        lambda: conv(X2, W2, stride=(1, 1, 1)),
        ValueError,
        r"stride: expected an int or a sequence of 2 ints",
    ),
    "non-positive dilation": (
        lambda: conv(X2, W2, dilation=0),
        ValueError,
        r"dilation: every entry must be >= 1, got 0",
    ),
    "negative padding": (
        lambda: conv(X2, W2, padding=((1, -1), (0, 0))),
        ValueError,
        r"padding: padding must be non-negative",
    ),
    "unknown padding string": (
        lambda: conv(X2, W2, padding="FULL"),
        ValueError,
        r"padding: expected 'SAME', 'VALID', or ints, got 'FULL'",
    ),
    "unknown padding mode": (
        lambda: conv(X2, W2, padding=1, padding_mode="mirror"),
        ValueError,
        r"padding_mode: expected one of 'zeros', 'reflect', 'replicate', 'circular', got 'mirror'",
    ),
    "reflect padding not smaller than the size": (
        lambda: conv(X2, W2, padding=5, padding_mode="reflect"),
        ValueError,
        r"padding: 'reflect' padding must be smaller than the input size, got \(5, 5\) for size 5",
    ),
    "circular padding larger than the size": (
        lambda: conv(X2, W2, padding=((0, 0), (6, 0)), padding_mode="circular"),
        ValueError,
        r"padding: 'circular' padding must be at most the input size, got \(6, 0\) for size 5",
    ),
    "replicate padding of an empty dim": (
        lambda: conv(np.zeros((2, 0, 5, 4), np.float32), W2, padding=2, padding_mode="replicate"),
        ValueError,
        r"padding: 'replicate' padding repeats the edge pixel, so the input must not be empty "
        r"where it pads, got \(2, 2\) for size 0 along spatial dim 0",
    ),
    "dilated window larger than the padded input": (
        lambda: conv(X2, W2, dilation=3, padding=((0, 0), (1, 0))),
        ValueError,
        r"w: the dilated window 7 \(kernel 3, dilation 3\) is larger than the padded input 5 "
        r"\(size 5 \+ padding \(0, 0\)\) along spatial dim 0",
    ),
    "bias shape": (
        lambda: conv(X2, W2, np.zeros(4, np.float32)),
        ValueError,
        r"b: expected shape \(6,\), one bias per output channel, got shape \(4,\)",
    ),
    "integer x": (
        lambda: conv(X2.astype(np.int32), W2),
        TypeError,
        r"x: expected a floating-point array, got dtype int32",
    ),
    "integer w": (
        lambda: conv(X2, W2.astype(np.int8)),
        TypeError,
        r"w: expected a floating-point array, got dtype int8",
    ),
    "complex b": (
        lambda: conv(X2, W2, np.zeros(6, np.complex64)),
        TypeError,
        r"b: expected a floating-point array, got dtype complex64",
    ),
    "x not an array": (lambda: conv([[1.0]], W2), TypeError, r"x: expected an array, got list"),
    "transpose: x channels vs C_in": (
        lambda: conv_transpose(X2[..., :3], WT),
        ValueError,
        r"x: expected C_in = w.shape\[-2\] = 4 channels, got 3",
    ),
    "transpose: groups not dividing C_in": (
        lambda: conv_transpose(X2, WT, groups=3),
        ValueError,
        r"groups: the input channels C_in = w.shape\[-2\] = 4 are not divisible by groups = 3",
    ),
    "transpose: output_padding too large": (
        lambda: conv_transpose(X2, WT, stride=(2, 1), output_padding=(1, 1)),
        ValueError,
        r"output_padding: each entry must be smaller than the stride or the dilation",
    ),
    "transpose: negative output_padding": (
        lambda: conv_transpose(X2, WT, output_padding=-1),
        ValueError,
        r"output_padding: every entry must be >= 0",
    ),
    "transpose: padding leaves no output": (
        lambda: conv_transpose(X2, WT, padding=(4, 0)),
        ValueError,
        r"padding: \(4, 4\) leaves an output size of -1 along spatial dim 0",
    ),
    "transpose: SAME padding": (
        lambda: conv_transpose(X2, WT, padding="SAME"),
        ValueError,
        r"padding: conv_transpose takes an int, one int per dim, \(lo, hi\) pairs or 'VALID'",
    ),
    "transpose: bias shape": (
        lambda: conv_transpose(X2, WT, np.zeros(3, np.float32), groups=2),
        ValueError,
        r"b: expected shape \(6,\)",
    ),
    "transpose: x rank": (
        lambda: conv_transpose(X2[None], WT),
        ValueError,
        r"x: expected rank 4 \(N, H, W, C\) for a 2-D kernel \(KH, KW, C_in, C_out // groups\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input_raises_a_clear_error(case):
    call, error, message = BAD_INPUTS[case]
    with pytest.raises(error, match=message):
        call()


def test_checks_run_at_trace_time_under_jit():
    with pytest.raises(ValueError, match=r"groups: the output channels"):
        jax.jit(lambda x, w: conv(x, w, groups=4)).lower(X2, np.zeros((3, 3, 1, 6), np.float32))


def _zeros(*shape):
    return np.zeros(shape, np.float32)


# Issue 16's bad inputs, in 1-, 2- and 3-D: (call, exception, message). Each must raise the same
# exception with the same message on every convolution backend, eagerly and under jit.
BACKEND_BAD_INPUTS = {
    "groups not dividing C_in": (
        lambda: conv(_zeros(2, 5, 5, 4), _zeros(3, 3, 1, 6), groups=3),
        ValueError,
        r"groups: the input channels C_in = x.shape\[-1\] = 4 are not divisible by groups = 3",
    ),
    "groups not dividing C_out": (
        lambda: conv(_zeros(2, 5, 5, 4), _zeros(3, 3, 1, 6), groups=4),
        ValueError,
        r"groups: the output channels C_out = w.shape\[-1\] = 6 are not divisible by groups = 4",
    ),
    "1-D: groups not dividing C_in": (
        lambda: conv(_zeros(2, 7, 6), _zeros(3, 2, 4), groups=4),
        ValueError,
        r"groups: the input channels C_in = x.shape\[-1\] = 6 are not divisible by groups = 4",
    ),
    "3-D: groups not dividing C_out": (
        lambda: convolve(_zeros(1, 4, 4, 4, 3), _zeros(2, 2, 2, 1, 4), groups=3),
        ValueError,
        r"groups: the output channels C_out = w.shape\[-1\] = 4 are not divisible by groups = 3",
    ),
    "transpose: groups not dividing C_in": (
        lambda: conv_transpose(_zeros(2, 5, 5, 4), _zeros(3, 3, 4, 3), groups=3),
        ValueError,
        r"groups: the input channels C_in = w.shape\[-2\] = 4 are not divisible by groups = 3",
    ),
    "transpose: output_padding equal to the stride": (
        lambda: conv_transpose(_zeros(2, 5, 5, 4), _zeros(3, 3, 4, 3), stride=2, output_padding=2),
        ValueError,
        r"output_padding: each entry must be smaller than the stride or the dilation of its dim, "
        r"got output_padding=\(2, 2\) with stride=\(2, 2\), dilation=\(1, 1\)",
    ),
    "1-D transpose: output_padding equal to the dilation": (
        lambda: conv_transpose(_zeros(2, 5, 4), _zeros(3, 4, 3), dilation=2, output_padding=(2,)),
        ValueError,
        r"output_padding: .* got output_padding=\(2,\) with stride=\(1,\), dilation=\(2,\)",
    ),
    "3-D transpose: output_padding beyond both in one dim": (
        lambda: conv_transpose(
            _zeros(1, 3, 3, 3, 2),
            _zeros(2, 2, 2, 2, 3),
            stride=(2, 1, 2),
            dilation=(1, 3, 1),
            output_padding=(1, 4, 1),
        ),
        ValueError,
        r"output_padding: .* got output_padding=\(1, 4, 1\) with stride=\(2, 1, 2\), "
        r"dilation=\(1, 3, 1\)",
    ),
}


@pytest.mark.parametrize("backend", ["xla", "onednn"])
@pytest.mark.parametrize("case", list(BACKEND_BAD_INPUTS), ids=list(BACKEND_BAD_INPUTS))
def test_bad_input_raises_the_same_error_on_every_backend(case, backend, request):
    from jcnn import native

    if backend == "onednn":
        request.getfixturevalue("onednn")  # skips where the library is not built
    call, error, message = BACKEND_BAD_INPUTS[case]
    raised = set()
    for scope in ("xla", backend):
        for run in (call, lambda: jax.jit(call)()):
            with native.conv_backend_scope(scope), pytest.raises(error, match=message) as info:
                run()
            raised.add((type(info.value), str(info.value)))
    assert len(raised) == 1, raised


@pytest.mark.parametrize("backend", ["xla", "onednn"])
def test_conv_transpose_of_a_spatially_empty_input_is_the_bias(backend, request):
    # The adjoint of a conv whose output is empty: nothing scatters, the output (sized by the
    # docstring's formula) is the bias. oneDNN's path raised an error about a padded input
    # (2, 18) and a window the caller never passed, while XLA's computed this.
    from jcnn import native

    if backend == "onednn":
        request.getfixturevalue("onednn")
    x, w, b = _zeros(2, 0, 8, 4), np.ones((3, 3, 4, 2), np.float32), np.arange(4, dtype=np.float32)
    options = {"stride": (1, 2), "output_padding": (0, 1), "groups": 2}
    with native.conv_backend_scope(backend):
        y = conv_transpose(x, w, b, **options)
        dw, db = jax.grad(lambda w, b: conv_transpose(x, w, b, **options).sum(), (0, 1))(w, b)
    np.testing.assert_array_equal(y, np.broadcast_to(b, (2, 2, 18, 4)))
    np.testing.assert_array_equal(dw, np.zeros_like(w))
    np.testing.assert_array_equal(db, np.full(4, 2 * 2 * 18, np.float32))


@pytest.mark.parametrize("backend", ["xla", "onednn"])
def test_conv_transpose_of_a_spatially_empty_input_has_the_documented_size_at_any_stride(
    backend, request
):
    # out = (size - 1) * stride - lo - hi + dilation * (k - 1) + output_padding + 1 holds for
    # size 0 too: stride 3, kernel 3, output_padding 2 gives 2 (it gave 4, stride - 1 more).
    from jcnn import native

    if backend == "onednn":
        request.getfixturevalue("onednn")
    x, w, b = _zeros(1, 0, 3, 2), np.ones((3, 3, 2, 3), np.float32), np.arange(3, dtype=np.float32)
    with native.conv_backend_scope(backend):
        y = conv_transpose(x, w, b, stride=3, output_padding=(2, 0))
        dw = jax.grad(lambda w: conv_transpose(x, w, stride=3, output_padding=(2, 0)).sum())(w)
    np.testing.assert_array_equal(y, np.broadcast_to(b, (1, 2, 9, 3)))
    np.testing.assert_array_equal(dw, np.zeros_like(w))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", ["xla", "onednn"])
def test_conv_transpose_padding_that_crops_into_the_output_padding(backend, dtype, request):
    # The full output of 4 pixels, kernel 3, stride 3, output_padding 2 has 14 pixels, the last
    # two from output_padding; padding (13, 0) keeps only the last: the bias. XLA's path cropped
    # 11 pixels from an interleaved input of 10 and lax.pad raised a raw error.
    from jcnn import native

    if backend == "onednn":
        request.getfixturevalue("onednn")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 3, 2)).astype(dtype)
    w = rng.standard_normal((3, 2, 2, 3)).astype(dtype)
    b = np.arange(3, dtype=dtype)
    options = {"stride": (3, 1), "padding": ((13, 0), (1, 0)), "output_padding": (2, 0)}
    with jax.enable_x64(dtype == "float64"), native.conv_backend_scope(backend):
        y = conv_transpose(x, w, b, **options)
        dx, dw = jax.grad(lambda x, w: conv_transpose(x, w, **options).sum(), (0, 1))(x, w)
    assert y.dtype == dtype
    np.testing.assert_array_equal(y, np.broadcast_to(np.arange(3), (2, 1, 3, 3)))
    np.testing.assert_array_equal(dx, np.zeros_like(x))
    np.testing.assert_array_equal(dw, np.zeros_like(w))


@pytest.mark.parametrize("backend", ["xla", "onednn"])
def test_output_padding_below_the_stride_or_the_dilation_is_accepted(backend, request, torch, rng):
    # The boundary of the rule above: output_padding 1 < stride 2 in one dim, 2 < dilation 3 in
    # the other (PyTorch accepts either).
    from jcnn import native

    if backend == "onednn":
        request.getfixturevalue("onednn")
    x = rng.normal(size=(2, 4, 5, 3)).astype(np.float32)
    w = rng.normal(size=(3, 2, 3, 4)).astype(np.float32)
    options = {"stride": (2, 1), "dilation": (1, 3), "output_padding": (1, 2)}
    with native.conv_backend_scope(backend):
        y = jax.jit(lambda x, w: conv_transpose(x, w, **options))(x, w)
    expected = torch.nn.functional.conv_transpose2d(
        torch.tensor(np.moveaxis(x, -1, 1)).double(),
        torch.tensor(np.transpose(w, (2, 3, 0, 1))).double(),
        **options,
    )
    assert y.shape == (2, 10, 10, 4)
    np.testing.assert_allclose(y, np.moveaxis(expected.numpy(), 1, -1), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "op, kwargs, name",
    [
        (conv, {"padding": 10**12}, "padding"),
        (conv, {"padding": 380_000_000}, "padding"),  # elements fit int64, bytes do not
        (conv_transpose, {"stride": 10**12}, "stride"),
    ],
)
def test_a_shape_xla_cannot_count_is_a_value_error(op, kwargs, name):
    # XLA aborted the whole process ("overflow in static extent product") when compiling these;
    # traced abstractly here, so that the test cannot abort without the check
    x = jax.ShapeDtypeStruct((2, 9, 9, 4), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 4, 4), jnp.float32)
    with pytest.raises(ValueError, match=rf"^{name}: the .* would have shape .*2\*\*63 - 1 bytes"):
        jax.eval_shape(lambda x, w: op(x, w, **kwargs), x, w)


def test_the_size_check_accepts_symbolic_shapes():
    # jax.export with shape polymorphism: the symbolic sizes cannot be counted and pass
    from jax import export

    b, h, w = export.symbolic_shape("b, h, w")
    kernel = jnp.ones((3, 3, 3, 4))
    for op, channels in ((partial(conv, padding=1, stride=2), 3), (conv_transpose, 4)):
        weights = kernel if channels == 3 else kernel.transpose(0, 1, 3, 2)
        exported = export.export(jax.jit(lambda x, op=op, weights=weights: op(x, weights)))(
            jax.ShapeDtypeStruct((b, h, w, channels), jnp.float32)
        )
        assert exported.out_avals[0].shape[0] == b
