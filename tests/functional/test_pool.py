"""Tests for jcnn.functional.pool.

Values and gradients against torch.nn.functional over randomized (seeded) configs, the gradient
rules of the course notes on hand-built inputs, transforms (vmap, jit) and the input checks.
The parity configs are compiled in chunks (forward and pullback of many configs in one program):
compiling each alone would take most of the run time.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jcnn.functional.pool import (
    adaptive_avg_pool,
    adaptive_max_pool,
    avg_pool,
    global_avg_pool,
    global_max_pool,
    lp_pool,
    max_pool,
    subsample,
)

RTOL, ATOL = 1e-5, 1e-6
MAX_SIZE = {1: 14, 2: 9, 3: 6}  # largest random spatial extent per rank, to keep shapes small
# XLA:CPU spends seconds optimizing the pooling gradients of a batch of configs; for these tiny
# shapes an unoptimized build is ~10x faster to compile and computes the same values.
FAST_COMPILE = (
    {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}
    if jax.default_backend() == "cpu"
    else None
)


def _channels_first(a):
    return np.ascontiguousarray(np.moveaxis(a, -1, 1))


def _channels_last(a):
    return np.moveaxis(a, 1, -1)


def _distinct_values(rng, shape):
    """Float32 values, exactly representable and all different (no ties for a max to break)."""
    size = math.prod(shape)
    return ((rng.permutation(size) - size // 2) / 8).astype(np.float32).reshape(shape)


def _torch_value_and_grad(torch, fn, x, rng):
    """PyTorch's output and the gradient for a random cotangent, all channels-last."""
    xt = torch.tensor(_channels_first(x), requires_grad=True)
    yt = fn(xt)
    cotangent = rng.standard_normal(yt.shape).astype(np.float32)
    yt.backward(torch.tensor(cotangent))
    return (
        _channels_last(yt.detach().numpy()),
        _channels_last(xt.grad.numpy()),
        _channels_last(cotangent),
    )


def _assert_parity(torch, cases, rng, *, chunk=40):
    """Every ``(ours, theirs, x, context)`` case: same output and gradient as PyTorch.

    The cases of a chunk share one ``jit`` (compiling each alone would dominate the run time).
    """
    for begin in range(0, len(cases), chunk):
        batch = cases[begin : begin + chunk]
        expected = [_torch_value_and_grad(torch, theirs, x, rng) for _, theirs, x, _ in batch]
        for (ours, _, x, context), (expected_y, _, _) in zip(batch, expected, strict=True):
            assert jax.eval_shape(ours, x).shape == expected_y.shape, context

        def values_and_grads(xs, cotangents, batch=batch):
            results = []
            for (ours, _, _, _), x, cotangent in zip(batch, xs, cotangents, strict=True):
                y, pullback = jax.vjp(ours, x)
                results.append((y, pullback(cotangent)[0]))
            return results

        args = ([case[2] for case in batch], [e[2] for e in expected])
        results = jax.jit(values_and_grads).lower(*args).compile(FAST_COMPILE)(*args)
        for (_, _, _, context), (y, grad), (expected_y, expected_grad, _) in zip(
            batch, results, expected, strict=True
        ):
            np.testing.assert_allclose(y, expected_y, rtol=RTOL, atol=ATOL, err_msg=context)
            np.testing.assert_allclose(grad, expected_grad, rtol=RTOL, atol=ATOL, err_msg=context)


def _batched_outputs(functions, xs):
    """``[f(x) for f, x in zip(functions, xs)]``, compiled as one (cheap) program."""

    def outputs(xs):
        return [f(x) for f, x in zip(functions, xs, strict=True)]

    return jax.jit(outputs).lower(xs).compile(FAST_COMPILE)(xs)


def _window_config(rng, rank, *, dilation=False, padding=True, fit=False):
    """Random window/stride/padding (within PyTorch's rule) and an input size that fits."""
    window = rng.integers(1, 5, rank)
    stride = rng.integers(1, 4, rank)
    dil = rng.integers(1, 4, rank) if dilation else np.ones(rank, int)
    pad = np.array([rng.integers(0, k // 2 + 1) if padding else 0 for k in window])
    low = np.maximum((window - 1) * dil + 1 - (0 if fit else 2 * pad), 1)
    sizes = [int(rng.integers(lo, max(lo, MAX_SIZE[rank]) + 1)) for lo in low]
    as_tuple = lambda a: tuple(int(v) for v in a)  # noqa: E731
    return sizes, as_tuple(window), as_tuple(stride), as_tuple(dil), as_tuple(pad)


def _extends_floor(ours, x, window, stride, padding, dilation):
    """Whether ``ceil_mode`` made some output dim longer than the floor formula's."""
    out_sizes = jax.eval_shape(ours, x).shape[1:-1]
    return any(
        out > (n + 2 * p - (k - 1) * d - 1) // s + 1
        for n, k, s, p, d, out in zip(
            x.shape[1:-1], window, stride, padding, dilation, out_sizes, strict=True
        )
    )


def test_max_pool_matches_torch_forward_and_gradient(torch, rng):
    counts = {"ceil_extends": 0, "dilated": 0, "padded": 0}
    cases = []
    for trial in range(96):
        rank = 1 + trial % 3
        dilated = trial % 2 == 1  # the dilated path is a different implementation
        sizes, window, stride, dilation, padding = _window_config(rng, rank, dilation=dilated)
        ceil_mode = bool(rng.integers(2))
        x = _distinct_values(rng, (2, *sizes, 3))
        options = dict(stride=stride, padding=padding, dilation=dilation, ceil_mode=ceil_mode)
        ours = functools.partial(max_pool, window=window, **options)
        torch_pool = getattr(torch.nn.functional, f"max_pool{rank}d")
        theirs = functools.partial(torch_pool, kernel_size=window, **options)
        if np.isneginf(theirs(torch.tensor(_channels_first(x))).numpy()).any():
            # PyTorch returns -inf for a window that sees only padding; jcnn refuses it.
            with pytest.raises(ValueError, match="sees only padding"):
                ours(x)
            continue
        cases.append((ours, theirs, x, f"{sizes=} {window=} {options}"))
        counts["dilated"] += max(dilation) > 1
        counts["padded"] += max(padding) > 0
        counts["ceil_extends"] += _extends_floor(ours, x, window, stride, padding, dilation)
    _assert_parity(torch, cases, rng)
    assert len(cases) >= 80 and min(counts.values()) >= 1, counts


def test_avg_pool_matches_torch_forward_and_gradient(torch, rng):
    counts = {"ceil_extends": 0, "padded_excluded": 0, "padded_included": 0}
    cases = []
    for trial in range(120):
        rank = 1 + trial % 3
        # PyTorch's avg_pool3d wants the input at least as large as the window, padding aside.
        sizes, window, stride, dilation, padding = _window_config(rng, rank, fit=rank == 3)
        ceil_mode, count_include_pad = (bool(b) for b in rng.integers(2, size=2))
        x = rng.standard_normal((2, *sizes, 3)).astype(np.float32)
        options = dict(
            stride=stride, padding=padding, ceil_mode=ceil_mode, count_include_pad=count_include_pad
        )
        ours = functools.partial(avg_pool, window=window, **options)
        torch_pool = getattr(torch.nn.functional, f"avg_pool{rank}d")
        theirs = functools.partial(torch_pool, kernel_size=window, **options)
        cases.append((ours, theirs, x, f"{sizes=} {window=} {options}"))
        counts["ceil_extends"] += _extends_floor(ours, x, window, stride, padding, dilation)
        if max(padding) > 0:
            counts["padded_included" if count_include_pad else "padded_excluded"] += 1
    _assert_parity(torch, cases, rng)
    assert min(counts.values()) >= 5, counts


def test_lp_pool_matches_torch_forward_and_gradient(torch, rng):
    cases = []
    for trial in range(45):
        rank = 1 + trial % 3
        sizes, window, stride, _, _ = _window_config(rng, rank, padding=False)
        p = [1, 2, 3, 1.5, 4.5][trial % 5]
        # Positive inputs: torch's x**p is not |x|**p, so a negative sum has no real root.
        x = rng.uniform(0.2, 2.0, (2, *sizes, 3)).astype(np.float32)
        torch_pool = getattr(torch.nn.functional, f"lp_pool{rank}d")
        torch_window = window[0] if rank == 1 else window  # lp_pool1d wants an int
        cases.append(
            (
                functools.partial(lp_pool, p=p, window=window, stride=stride),
                functools.partial(torch_pool, norm_type=p, kernel_size=torch_window, stride=stride),
                x,
                f"{sizes=} {window=} {stride=} {p=}",
            )
        )
    # Windows of zeros, as after a ReLU: output 0 and gradient 0 (not NaN), as in PyTorch.
    x = np.maximum(rng.standard_normal((2, 9, 3)), 0).astype(np.float32)
    x[:, :4] = 0
    for p in (2, 1.5):
        cases.append(
            (
                functools.partial(lp_pool, p=p, window=(2,)),
                functools.partial(torch.nn.functional.lp_pool1d, norm_type=p, kernel_size=2),
                x,
                f"zero windows, {p=}",
            )
        )
    # An even power of signed inputs is defined too.
    x = rng.standard_normal((2, 7, 6, 3)).astype(np.float32)
    cases.append(
        (
            functools.partial(lp_pool, p=2, window=(3, 2), stride=(2, 1)),
            functools.partial(
                torch.nn.functional.lp_pool2d, norm_type=2, kernel_size=(3, 2), stride=(2, 1)
            ),
            x,
            "p=2 on signed input",
        )
    )
    _assert_parity(torch, cases, rng)


@pytest.mark.parametrize("kind", ["avg", "max"])
def test_adaptive_pool_matches_torch_forward_and_gradient(torch, rng, kind):
    ours_pool = {"avg": adaptive_avg_pool, "max": adaptive_max_pool}[kind]
    cases = []
    for trial in range(45):
        rank = 1 + trial % 3
        sizes = [int(n) for n in rng.integers(1, MAX_SIZE[rank] + 1, rank)]
        # Include outputs larger than the input (overlapping bins) and divisible ones.
        output_size = tuple(int(rng.integers(1, n + 3)) for n in sizes)
        x = _distinct_values(rng, (2, *sizes, 3))
        torch_pool = getattr(torch.nn.functional, f"adaptive_{kind}_pool{rank}d")
        cases.append(
            (
                functools.partial(ours_pool, output_size=output_size),
                functools.partial(torch_pool, output_size=output_size),
                x,
                f"{sizes=} {output_size=}",
            )
        )
    uneven = sum(
        any(n % m for n, m in zip(c[2].shape[1:-1], c[0].keywords["output_size"], strict=True))
        for c in cases
    )
    assert uneven >= 20
    _assert_parity(torch, cases, rng)


def test_adaptive_pool_none_keeps_the_input_size(rng):
    x = rng.standard_normal((1, 5, 7, 2)).astype(np.float32)
    y = adaptive_avg_pool(x, (2, None))
    assert y.shape == (1, 2, 7, 2)
    np.testing.assert_allclose(y, adaptive_avg_pool(x, (2, 7)), rtol=0, atol=0)


def test_adaptive_pool_to_an_impossible_size_is_refused_naming_output_size():
    # NumPy built the bins' tables first: a bare "Maximum allowed size exceeded" at 2**62, at
    # 2**31 per dim of a 2-D input the process was killed for memory
    x = jnp.ones((1, 5, 2))
    for pool in (adaptive_avg_pool, adaptive_max_pool):
        for size in (2**62, 2**63):
            with pytest.raises(ValueError, match=r"^output_size: the output would have shape"):
                pool(x, size)
        with pytest.raises(ValueError, match=r"^output_size: the output would have shape"):
            pool(jnp.ones((1, 5, 5, 2)), 2**31)


def test_a_window_seeing_only_padding_is_an_error_where_torch_returns_minus_inf(torch):
    x = np.arange(4, dtype=np.float32).reshape(1, 2, 2, 1)
    options = dict(stride=1, padding=1, dilation=3)
    expected = torch.nn.functional.max_pool2d(torch.tensor(_channels_first(x)), 2, **options)
    assert np.isneginf(expected.numpy()).all()
    with pytest.raises(ValueError, match="output 0 of spatial dim 0 sees only padding"):
        max_pool(x, 2, **options)


def _same_padding(size, k, s, d=1):
    """TensorFlow's SAME: output ceil(size / s), the odd pixel of padding on the high side."""
    total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
    return total // 2, total - total // 2


def _torch_pads(pads):
    return [v for pair in reversed(list(pads)) for v in pair]  # F.pad lists the last dim first


def test_same_and_valid_padding_match_explicitly_padded_torch(torch, rng):
    nnf = torch.nn.functional
    checks = []  # (our pooling, input, PyTorch's output, context)
    for trial in range(12):
        sizes = [int(n) for n in rng.integers(3, 10, 2)]
        window = tuple(int(k) for k in rng.integers(1, 5, 2))
        stride = tuple(int(s) for s in rng.integers(1, 4, 2))
        dilation = (1, 1) if trial % 2 else tuple(int(d) for d in rng.integers(1, 3, 2))
        x = _distinct_values(rng, (2, *sizes, 3))
        xt = torch.tensor(_channels_first(x))
        context = f"{sizes=} {window=} {stride=} {dilation=}"
        same_shape = (2, *(-(-n // s) for n, s in zip(sizes, stride, strict=True)), 3)

        pads = map(_same_padding, sizes, window, stride, dilation)
        padded = nnf.pad(xt, _torch_pads(pads), value=-math.inf)
        expected = nnf.max_pool2d(padded, window, stride, dilation=dilation)
        ours = functools.partial(max_pool, window=window, stride=stride, dilation=dilation)
        checks.append((functools.partial(ours, padding="SAME"), x, expected, context))
        assert expected.shape == _channels_first(np.empty(same_shape)).shape, context

        pads = _torch_pads(map(_same_padding, sizes, window, stride))
        means = nnf.avg_pool2d(nnf.pad(xt, pads), window, stride)
        pixels = nnf.avg_pool2d(nnf.pad(torch.ones_like(xt), pads), window, stride)
        for count_include_pad, expected in [(True, means), (False, means / pixels)]:
            ours = functools.partial(
                avg_pool, window=window, stride=stride, count_include_pad=count_include_pad
            )
            checks.append((functools.partial(ours, padding="same"), x, expected, context))

        if all(n >= (k - 1) * d + 1 for n, k, d in zip(sizes, window, dilation, strict=True)):
            expected = nnf.max_pool2d(xt, window, stride, dilation=dilation)
            ours = functools.partial(max_pool, window=window, stride=stride, dilation=dilation)
            checks.append((functools.partial(ours, padding="VALID"), x, expected, context))

    outputs = _batched_outputs([c[0] for c in checks], [c[1] for c in checks])
    for (_, _, expected, context), y in zip(checks, outputs, strict=True):
        expected = _channels_last(expected.numpy())
        assert y.shape == expected.shape, context
        np.testing.assert_allclose(y, expected, rtol=RTOL, atol=ATOL, err_msg=context)


def test_asymmetric_padding_pairs_match_explicitly_padded_torch(torch, rng):
    x = _distinct_values(rng, (2, 8, 3))
    xt = torch.tensor(_channels_first(x))
    y = max_pool(x, (3,), 2, ((0, 1),))
    padded = torch.nn.functional.pad(xt, (0, 1), value=-math.inf)
    np.testing.assert_array_equal(
        y, _channels_last(torch.nn.functional.max_pool1d(padded, 3, 2).numpy())
    )


def _numpy_max_pool_grad(x, cotangent, window, stride, dilation, padding):
    """The notes' rule by loops: each output's gradient goes to its window's argmax pixel (the
    first pixel inside the input where the window holds only -inf, as PyTorch)."""
    grad = np.zeros_like(x)
    (kh, kw), (sh, sw), (dh, dw), (ph, pw) = window, stride, dilation, padding
    n, out_h, out_w, c = cotangent.shape
    for b, i, j, ch in np.ndindex(n, out_h, out_w, c):
        best, where = -np.inf, None
        for p, q in np.ndindex(kh, kw):
            r, s = i * sh - ph + p * dh, j * sw - pw + q * dw
            inside = 0 <= r < x.shape[1] and 0 <= s < x.shape[2]
            if inside and (where is None or x[b, r, s, ch] > best):
                best, where = x[b, r, s, ch], (b, r, s, ch)
        grad[where] += cotangent[b, i, j, ch]
    return grad


@pytest.mark.parametrize(
    "window, stride, dilation, padding",
    [((3, 3), (2, 2), (1, 1), (1, 0)), ((2, 3), (1, 2), (2, 3), (1, 1))],
    ids=["overlapping", "dilated"],
)
def test_max_pool_gradient_goes_to_the_winning_unit_only(rng, window, stride, dilation, padding):
    x = _distinct_values(rng, (2, 9, 8, 2))
    y, pullback = jax.vjp(lambda x: max_pool(x, window, stride, padding, dilation=dilation), x)
    cotangent = rng.standard_normal(y.shape).astype(np.float32)
    expected = _numpy_max_pool_grad(x, cotangent, window, stride, dilation, padding)
    np.testing.assert_allclose(pullback(cotangent)[0], expected, rtol=RTOL, atol=ATOL)
    assert np.count_nonzero(expected) <= cotangent.size


@pytest.mark.parametrize(
    "window, stride, dilation, padding",
    [
        ((2, 2), (2, 2), (1, 1), (1, 1)),
        ((3, 3), (2, 1), (1, 1), (1, 1)),
        ((2, 2), (1, 1), (2, 2), (1, 1)),
    ],
    ids=["stride == window", "overlapping", "dilated"],
)
def test_max_pool_gradient_of_an_all_minus_inf_window_reaches_its_first_pixel(
    rng, window, stride, dilation, padding
):
    """A window of -inf pixels and -inf padding: PyTorch sends its gradient to the first pixel
    inside the input; every path (tiles, reduce_window, dilated) used to send it to the padding."""
    x = np.where(rng.random((2, 6, 7, 2)) < 0.8, -np.inf, _distinct_values(rng, (2, 6, 7, 2)))
    x = x.astype(np.float32)
    y, pullback = jax.vjp(lambda x: max_pool(x, window, stride, padding, dilation=dilation), x)
    assert np.isneginf(y).any()
    cotangent = rng.standard_normal(y.shape).astype(np.float32)
    expected = _numpy_max_pool_grad(x, cotangent, window, stride, dilation, padding)
    np.testing.assert_allclose(pullback(cotangent)[0], expected, rtol=RTOL, atol=ATOL)


def test_max_pool_gradient_breaks_ties_like_torch(torch, rng):
    """On ties (ReLU zeros, repeated values) the whole gradient goes to the first maximum."""
    x = rng.integers(0, 3, (2, 8, 9, 3)).astype(np.float32)
    cases = [
        (
            functools.partial(max_pool, window=(3, 3), stride=2, padding=1, dilation=dilation),
            functools.partial(
                torch.nn.functional.max_pool2d,
                kernel_size=3,
                stride=2,
                padding=1,
                dilation=dilation,
            ),
            x,
            f"ties, {dilation=}",
        )
        for dilation in (1, 2)
    ]
    tiled = dict(kernel_size=(2, 3), padding=1, ceil_mode=True)  # the stride == window path
    cases.append(
        (
            functools.partial(max_pool, window=(2, 3), padding=1, ceil_mode=True),
            functools.partial(torch.nn.functional.max_pool2d, **tiled),
            x,
            "ties, stride == window",
        )
    )
    # A NaN wins (propagates) and takes the gradient, the last one of a window as in PyTorch;
    # reduce_window's gradient would go to the pixel after a NaN, whatever its value.
    with_nans = np.where(rng.random(x.shape) < 0.3, np.float32(np.nan), x)
    cases.append((*cases[-1][:2], with_nans, "NaN, stride == window"))
    whole = (  # 8 x 9 pixels in whole (2, 3) tiles: values from reduce_window
        functools.partial(max_pool, window=(2, 3)),
        functools.partial(torch.nn.functional.max_pool2d, kernel_size=(2, 3)),
    )
    cases += [(*whole, x, "ties, whole tiles"), (*whole, with_nans, "NaN, whole tiles")]
    _assert_parity(torch, cases, rng)


def _reference_tiled_max_pool(x, window, padding, ceil_mode):
    """``lax.reduce_window`` max (the general path) for ``stride == window``, sizes as PyTorch."""
    pads = []
    for size, k, p in zip(x.shape[1:-1], window, padding, strict=True):
        out = (-(-(size + p - k) // k) if ceil_mode else (size + 2 * p - k) // k) + 1
        pads.append((p, max(out * k - size - p, 0)))
    lowest = np.array(-np.inf, x.dtype)
    full = (1, *window, 1)
    return lax.reduce_window(x, lowest, lax.max, full, full, ((0, 0), *pads, (0, 0)))


def _primitives(fn, *shapes):
    jaxpr = jax.make_jaxpr(fn)(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes))
    return str(jaxpr)


def _lowered(fn, platform, *shapes):
    """StableHLO of ``fn`` compiled for ``platform`` (lowered here, whatever this machine has)."""
    args = (jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes)
    return jax.export.export(jax.jit(fn), platforms=[platform])(*args).mlir_module()


@pytest.mark.parametrize(
    "shape", [(128, 28, 28, 20), (128, 14, 14, 50), (256, 32, 32, 64), (256, 16, 16, 256)]
)
def test_non_overlapping_max_pool_avoids_select_and_scatter_on_cpu_only(shape):
    """LeNet-5 and AirbenchNet pools: on CPU elementwise selects over the reshaped tiles in both
    directions and no window scatter, batch or per example; on a GPU or TPU XLA's own window
    scatter, which is the faster there."""
    c_shape = (shape[0], shape[1] // 2, shape[2] // 2, shape[3])
    batch = jax.grad(lambda x, c: jnp.sum(max_pool(x, 2) * c))
    per_example = jax.vmap(jax.grad(lambda x, c: jnp.sum(max_pool(x[None], 2) * c[None])))
    for fn in (batch, per_example):
        cpu = _lowered(fn, "cpu", shape, c_shape)
        assert "stablehlo.select " in cpu
        assert "stablehlo.select_and_scatter" not in cpu
        for platform in ("cuda", "tpu"):
            assert "stablehlo.select_and_scatter" in _lowered(fn, platform, shape, c_shape)
    overlapping = _lowered(jax.grad(lambda x: jnp.sum(max_pool(x, 2, stride=1))), "cpu", shape)
    assert "stablehlo.select_and_scatter" in overlapping  # the general path, for contrast


def test_non_overlapping_max_pool_equals_reduce_window_exactly_with_ties(rng):
    """Random stride == window pools (padding, ceil_mode, ranks 1-3, float32 and bfloat16)."""
    cases = []
    for trial in range(36):
        rank = 1 + trial % 3
        window = tuple(int(k) for k in rng.integers(1, 4, rank))
        padding = tuple(int(rng.integers(0, k // 2 + 1)) for k in window)
        sizes = tuple(int(rng.integers(k, MAX_SIZE[rank] + 1)) for k in window)
        dtype = jnp.bfloat16 if trial % 4 == 3 else jnp.float32
        # Few distinct values: most windows hold tied maxima (as after a ReLU).
        x = jnp.asarray(rng.integers(-1, 3, (2, *sizes, 2)), dtype)
        cases.append((x, window, padding, bool(rng.integers(2))))

    def values_and_grads(xs, cotangents):
        results = []
        for (_, window, padding, ceil_mode), x, cotangent in zip(
            cases, xs, cotangents, strict=True
        ):
            for pool in (
                functools.partial(max_pool, window=window, padding=padding, ceil_mode=ceil_mode),
                functools.partial(
                    _reference_tiled_max_pool, window=window, padding=padding, ceil_mode=ceil_mode
                ),
            ):
                y, pullback = jax.vjp(pool, x)
                results.append((y, pullback(cotangent)[0]))
        return results

    xs = [case[0] for case in cases]
    out_shapes = [
        jax.eval_shape(
            functools.partial(_reference_tiled_max_pool, window=w, padding=p, ceil_mode=c), x
        )
        for x, w, p, c in cases
    ]
    cotangents = [
        jnp.asarray(rng.standard_normal(o.shape), x.dtype)
        for o, x in zip(out_shapes, xs, strict=True)
    ]
    results = jax.jit(values_and_grads).lower(xs, cotangents).compile(FAST_COMPILE)(xs, cotangents)
    assert (
        sum(c[3] and any(n % k for n, k in zip(c[0].shape[1:-1], c[1], strict=True)) for c in cases)
        >= 3
    )
    for case, ours, reference in zip(cases, results[::2], results[1::2], strict=True):
        context = f"shape={case[0].shape} dtype={case[0].dtype} window, padding, ceil={case[1:]}"
        for got, expected in zip(ours, reference, strict=True):
            assert got.dtype == expected.dtype == case[0].dtype, context
            np.testing.assert_array_equal(
                np.asarray(got, np.float32), np.asarray(expected, np.float32), err_msg=context
            )


@pytest.mark.parametrize(
    "shape, options",
    [
        ((128, 28, 28, 20), {}),
        ((256, 31, 31, 64), {}),
        ((2, 7, 9, 3), dict(padding=1, ceil_mode=True)),
    ],
)
def test_non_overlapping_max_pool_values_come_from_reduce_window_alone(shape, options):
    """Whole tiles, a pixel left over, padding: reduce_window (which XLA's CPU backend runs
    inside a YNNPACK graph with the convolutions and matrix products around it) and nothing
    before it, neither a pad nor a crop nor the selects."""
    text = _primitives(lambda x: max_pool(x, 2, **options), shape)
    assert "= reduce_window_max[" in text
    for primitive in ("select_n", "pad", "slice"):
        assert f"= {primitive}" not in text


@pytest.mark.parametrize("width, padding, ceil_mode", [(7, (1, 0), True), (8, 0, False)])
def test_non_overlapping_max_pool_second_derivatives_and_per_example_grads(
    rng, width, padding, ceil_mode
):
    """Forward-over-reverse, reverse-over-reverse and vmap(grad) equal the reduce_window path,
    with a pad and crop first and on whole tiles."""
    x = jnp.asarray(rng.integers(-2, 3, (3, 6, width, 2)), jnp.float32)
    pools = {
        "fast": lambda x: max_pool(x, 2, padding=padding, ceil_mode=ceil_mode),
        "reference": lambda x: _reference_tiled_max_pool(
            x, (2, 2), np.broadcast_to(padding, 2), ceil_mode
        ),
    }
    out_shape = jax.eval_shape(pools["reference"], x).shape
    weights = jnp.asarray(rng.standard_normal(out_shape), jnp.float32)
    direction = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

    def derivatives(pool):
        def loss(x, weights):
            return jnp.sum(weights * pool(x) ** 2)

        grad = jax.grad(loss)
        hvp_forward = jax.jvp(lambda x: grad(x, weights), (x,), (direction,))[1]
        hvp_reverse = jax.grad(lambda x: jnp.vdot(grad(x, weights), direction))(x)
        per_example = jax.vmap(lambda xi, wi: grad(xi[None], wi[None])[0])(x, weights)
        return hvp_forward, hvp_reverse, per_example

    fast, reference = jax.jit(
        lambda: (derivatives(pools["fast"]), derivatives(pools["reference"]))
    )()
    for got, expected in zip(fast, reference, strict=True):
        np.testing.assert_array_equal(got, expected)
    assert np.count_nonzero(fast[0]) > 0
    np.testing.assert_array_equal(fast[0], fast[1])
    whole_batch = jax.grad(lambda x: jnp.sum(weights * pools["fast"](x) ** 2))(x)
    np.testing.assert_array_equal(fast[2], whole_batch)


def test_max_pool_gradient_of_the_notes_example():
    """seeds/002: 2x2 max pool, stride 1, of [[0,1,2],[3,4,5],[6,7,8]]; 4 wins one window, 8 one."""
    x = jnp.arange(9.0).reshape(1, 3, 3, 1)
    y, pullback = jax.vjp(lambda x: max_pool(x, 2, 1), x)
    assert y[0, :, :, 0].tolist() == [[4.0, 5.0], [7.0, 8.0]]
    grad = pullback(jnp.array([1.0, 10.0, 100.0, 1000.0]).reshape(y.shape))[0]
    assert grad[0, :, :, 0].tolist() == [[0, 0, 0], [0, 1, 10], [0, 100, 1000]]


def test_avg_pool_gradient_is_the_upsampled_gradient_over_the_window_size(rng):
    x = rng.standard_normal((2, 6, 9, 3)).astype(np.float32)
    y, pullback = jax.vjp(lambda x: avg_pool(x, (2, 3)), x)
    cotangent = rng.standard_normal(y.shape).astype(np.float32)
    upsampled = np.repeat(np.repeat(cotangent, 2, axis=1), 3, axis=2)
    np.testing.assert_allclose(pullback(cotangent)[0], upsampled / 6, rtol=RTOL, atol=ATOL)


def test_subsample_keeps_every_stride_th_pixel_like_a_1x1_torch_pool(torch, rng):
    cases = []
    for rank, stride in [(1, (3,)), (2, (2, 3)), (3, 2)]:
        sizes = [int(n) for n in rng.integers(1, 8, rank)]
        x = rng.standard_normal((2, *sizes, 3)).astype(np.float32)
        torch_pool = getattr(torch.nn.functional, f"max_pool{rank}d")
        cases.append(
            (
                functools.partial(subsample, stride=stride),
                functools.partial(torch_pool, kernel_size=1, stride=stride),
                x,
                f"{sizes=} {stride=}",
            )
        )
    _assert_parity(torch, cases, rng)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_global_pools_reduce_every_spatial_dim(rng, rank):
    x = rng.standard_normal((2, *rng.integers(1, 6, rank), 4)).astype(np.float32)
    axes = tuple(range(1, rank + 1))
    np.testing.assert_allclose(global_avg_pool(x), x.mean(axis=axes), rtol=RTOL, atol=ATOL)
    np.testing.assert_array_equal(global_max_pool(x), x.max(axis=axes))
    assert global_avg_pool(x).shape == (2, 4)


@pytest.mark.parametrize(
    "pool",
    [global_max_pool, lambda x: adaptive_max_pool(x, 2)],
    ids=["global_max_pool", "adaptive_max_pool"],
)
def test_max_reductions_second_derivatives_reach_the_first_of_tied_maxima(pool):
    """The second derivative goes to the winner the gradient goes to (PyTorch's too): for
    ``sum(pool(x) ** 2)`` the Hessian-vector product is ``2 v[winner]`` at the winner, not the
    tied maxima's mean ``jnp.max``'s derivative would give."""
    x = jnp.array([1.0, 2.0, 2.0, 2.0, 0.0, 3.0, -0.0, 3.0]).reshape(1, 8, 1)
    direction = jnp.arange(1.0, 9.0).reshape(1, 8, 1)

    def grad(x):
        return jax.grad(lambda x: jnp.sum(pool(x) ** 2))(x)

    y, pullback = jax.vjp(pool, x)
    routed = pullback(2 * jax.jvp(pool, (x,), (direction,))[1])[0]
    hvp_forward = jax.jvp(grad, (x,), (direction,))[1]
    hvp_reverse = jax.grad(lambda x: jnp.vdot(grad(x), direction))(x)
    assert np.count_nonzero(routed) == y.size  # one winner per output
    np.testing.assert_array_equal(hvp_forward, routed)
    np.testing.assert_array_equal(hvp_reverse, routed)


def test_half_precision_average_accumulates_in_float32(rng):
    x32 = rng.uniform(1.0, 1.01, (1, 32, 32, 2)).astype(np.float32)
    x = jnp.asarray(x32, jnp.bfloat16)
    exact = np.asarray(x, np.float32).mean(axis=(1, 2))
    for y in [avg_pool(x, 32)[:, 0, 0], adaptive_avg_pool(x, 1)[:, 0, 0], global_avg_pool(x)]:
        assert y.dtype == jnp.bfloat16
        # One bfloat16 rounding of the exact mean; a bfloat16 running sum drifts far more.
        np.testing.assert_allclose(np.asarray(y, np.float32), exact, rtol=2**-8)


POOLS = {
    "max_pool": lambda x: max_pool(x, (3, 2), (2, 1), 1, dilation=(1, 2), ceil_mode=True),
    "non_overlapping_max_pool": lambda x: max_pool(x, (2, 3), padding=(1, 0), ceil_mode=True),
    "avg_pool": lambda x: avg_pool(x, 3, 2, (1, 0), ceil_mode=True, count_include_pad=False),
    "lp_pool": lambda x: lp_pool(x, 2, (2, 3)),
    "adaptive_avg_pool": lambda x: adaptive_avg_pool(x, (3, 4)),
    "adaptive_max_pool": lambda x: adaptive_max_pool(x, (4, 3)),
    "global_avg_pool": global_avg_pool,
    "global_max_pool": global_max_pool,
    "subsample": lambda x: subsample(x, (2, 3)),
}


@pytest.mark.parametrize("name", list(POOLS))
def test_jit_of_vmap_over_an_extra_axis_equals_the_loop(rng, name):
    pool = POOLS[name]
    xs = _distinct_values(rng, (3, 2, 7, 8, 2))
    batched = jax.jit(jax.vmap(pool))(xs)
    looped = np.stack([pool(x) for x in xs])
    np.testing.assert_allclose(batched, looped, rtol=RTOL, atol=ATOL)


X2 = np.zeros((2, 5, 5, 3), np.float32)
BAD_INPUTS = [
    (lambda: max_pool(X2.astype(np.int32), 2), TypeError, "x: expected a floating-point array"),
    (lambda: max_pool([[1.0]], 1), TypeError, "x: expected an array, got list"),
    (
        lambda: max_pool(X2[0], (2, 2)),
        ValueError,
        r"x: expected rank 4 \(N, H, W, C\) for a 2-D window, got rank 3 with shape \(5, 5, 3\)",
    ),
    (lambda: max_pool(X2[None, None], 2), ValueError, r"x: expected rank 3 \(N, L, C\), 4"),
    (lambda: max_pool(X2, (2, 2, 2, 2)), ValueError, "window: expected an int or 1 to 3"),
    (lambda: max_pool(X2, "2"), TypeError, "window: expected an int or a sequence of ints"),
    (lambda: max_pool(X2, 0), ValueError, "window: every entry must be >= 1, got 0"),
    (lambda: max_pool(X2, 2, stride=(1, 0)), ValueError, "stride: every entry must be >= 1"),
    (lambda: max_pool(X2, 2, (1, 2, 3)), ValueError, "stride: expected an int or a sequence of 2"),
    (lambda: max_pool(X2, 2, dilation=-1), ValueError, "dilation: every entry must be >= 1"),
    (
        lambda: max_pool(X2, (2, 4), padding=(1, 3)),
        ValueError,
        r"padding: expected at most half the window \(window // 2 = 2\) on each side of spatial "
        r"dim 1, got \(3, 3\)",
    ),
    (lambda: avg_pool(X2, 3, padding=((0, 2), (1, 1))), ValueError, "at most half the window"),
    (lambda: avg_pool(X2, 2, padding=-1), ValueError, "padding must be non-negative"),
    (lambda: avg_pool(X2, 2, padding="FULL"), ValueError, "padding: expected 'SAME', 'VALID'"),
    (
        lambda: max_pool(X2, (2, 7)),
        ValueError,
        r"window: the window spans 7 pixels \(window 7, dilation 1\) in spatial dim 1, larger "
        r"than the padded input 5",
    ),
    (
        lambda: max_pool(X2, 2, dilation=5),
        ValueError,
        r"window spans 6 pixels \(window 2, dilation 5",
    ),
    (
        lambda: max_pool(X2[:, :2, :2], 2, 1, padding=1, dilation=3),
        ValueError,
        "window: output 0 of spatial dim 0 sees only padding",
    ),
    (lambda: lp_pool(X2, 0, 2), ValueError, "p: expected a finite number > 0, got 0"),
    (lambda: lp_pool(X2, math.inf, 2), ValueError, "p: expected a finite number > 0, got inf"),
    (lambda: lp_pool(X2, "2", 2), TypeError, "p: expected a finite number > 0, got '2'"),
    (lambda: lp_pool(X2, 2, 6), ValueError, "window: the window spans 6 pixels"),
    (lambda: adaptive_avg_pool(X2, 0), ValueError, "output_size: expected positive ints"),
    (lambda: adaptive_max_pool(X2, (2, 1.5)), TypeError, "output_size: expected positive ints"),
    (
        lambda: adaptive_max_pool(X2, (2,)),
        ValueError,
        r"x: expected rank 3 \(N, L, C\) for a 1-D output_size, got rank 4",
    ),
    (lambda: global_avg_pool(X2[0, 0]), ValueError, "x: expected rank 3 or 4 or 5, got rank 2"),
    (lambda: global_max_pool(X2 > 0), TypeError, "x: expected a floating-point array"),
    (lambda: subsample(X2, (2, 0)), ValueError, "stride: every entry must be >= 1"),
    (lambda: subsample(X2, (2, 2, 2)), ValueError, r"x: expected rank 5 \(N, D, H, W, C\)"),
]


@pytest.mark.parametrize("call, error, message", BAD_INPUTS, ids=range(len(BAD_INPUTS)))
def test_bad_inputs_raise_a_message_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_ceil_mode_windows_wider_than_the_padded_input_overhang_as_torch(torch, rng):
    # Without ceil_mode such a window is an error (there is no output), in PyTorch too; with it
    # PyTorch gives one window per dim that overhangs the right edge, which jcnn refused.
    def wide_config(rank):
        while True:
            window = rng.integers(2, 6, rank)
            dilation = rng.integers(1, 3, rank)
            padding = np.array([rng.integers(0, k // 2 + 1) for k in window])
            fits = (window - 1) * dilation + 1 - 2 * padding  # the smallest size the window fits
            if (fits < 2).any():
                continue
            sizes = np.array([rng.integers(max(r - 2, 1), r) for r in fits])
            sees_input = all(  # the one window must see a pixel (else PyTorch gives -inf)
                any(0 <= j * d - p < n for j in range(k))
                for n, k, d, p in zip(sizes, window, dilation, padding, strict=True)
            )
            if sees_input:
                as_tuple = lambda a: tuple(int(v) for v in a)  # noqa: E731
                stride = as_tuple(fits - sizes + rng.integers(1, 3, rank))  # > the overhang
                return (
                    as_tuple(sizes),
                    as_tuple(window),
                    stride,
                    as_tuple(padding),
                    as_tuple(dilation),
                )

    cases = []
    for rank in (1, 2, 3):
        for _ in range(5):
            sizes, window, stride, pad, dilation = wide_config(rank)
            x = _distinct_values(rng, (2, *sizes, 3))
            context = f"sizes {sizes} window {window} stride {stride} padding {pad}"
            geometry = dict(window=window, stride=stride, padding=pad, ceil_mode=True)
            torch_geometry = dict(kernel_size=window, stride=stride, padding=pad, ceil_mode=True)
            options = [("max", max_pool, dict(dilation=dilation))]
            # PyTorch's avg_pool3d refuses an input smaller than the window, padded or not
            if rank < 3:
                options += [("avg", avg_pool, dict(count_include_pad=b)) for b in (True, False)]
            for kind, ours, extra in options:
                theirs = getattr(torch.nn.functional, f"{kind}_pool{rank}d")
                cases.append(
                    (
                        functools.partial(ours, **geometry, **extra),
                        functools.partial(theirs, **torch_geometry, **extra),
                        x,
                        f"{kind} {context} {extra}",
                    )
                )
    _assert_parity(torch, cases, rng)
    # Wider by the stride or more, no window starts inside the input: an error, in PyTorch too.
    with pytest.raises(ValueError, match=r"larger than the padded input 3 .* by 2, not less than "):
        max_pool(jnp.ones((1, 3, 1)), 5, 2, 0, ceil_mode=True)
    with pytest.raises(RuntimeError):
        torch.nn.functional.max_pool1d(torch.ones(1, 1, 3), 5, 2, 0, ceil_mode=True)


def test_checks_run_at_trace_time_under_jit():
    with pytest.raises(ValueError, match="larger than the padded input"):
        jax.jit(lambda x: avg_pool(x, 6))(X2)


def test_max_pool_sends_a_nan_windows_gradient_to_the_nan_as_torch(torch, rng):
    # Overlapping, dilated and padded windows (reduce_window's paths) with one NaN per image
    # channel: the output is NaN as in PyTorch, and so was it before, but reduce_window's
    # gradient went to another pixel of the window (its >= is false for a NaN), not the NaN.
    x = _distinct_values(rng, (2, 7, 8, 3))
    for n in range(2):
        for c in range(3):
            x[n, rng.integers(7), rng.integers(8), c] = np.nan
    configs = [
        dict(kernel_size=2, stride=1),
        dict(kernel_size=3, stride=2, padding=1),
        dict(kernel_size=(3, 2), stride=1, dilation=2),
        dict(kernel_size=3, stride=3, padding=1, ceil_mode=True),
    ]
    cases = [
        (
            functools.partial(
                max_pool,
                window=config["kernel_size"],
                stride=config["stride"],
                padding=config.get("padding", 0),
                dilation=config.get("dilation", 1),
                ceil_mode=config.get("ceil_mode", False),
            ),
            functools.partial(torch.nn.functional.max_pool2d, **config),
            x,
            f"NaN, {config}",
        )
        for config in configs
    ]
    _assert_parity(torch, cases, rng)
    one_d = jnp.asarray([0.0, 5.0, np.nan, 1.0, 7.0], jnp.float32).reshape(1, 5, 1)
    grad = jax.grad(lambda x: max_pool(x, 2, 1).sum())(one_d)
    assert grad.ravel().tolist() == [0.0, 1.0, 2.0, 0.0, 1.0]  # not [0, 1, 1, 1, 1]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_overlapping_max_pool_half_precision_gradient_is_the_float32_one_rounded_once(dtype, rng):
    # A pixel's gradient sums the cotangents of every window it wins: summed in half precision,
    # up to 640 ulps from the float32 gradient rounded.
    x = jnp.asarray(rng.standard_normal((2, 10, 10, 4)), dtype)
    for options in (
        {"stride": 1, "padding": 1},
        {"stride": 2, "padding": 1},
        {"stride": 1, "dilation": 2},
    ):
        y, vjp = jax.vjp(lambda x, options=options: max_pool(x, 3, **options), x)
        y32, vjp32 = jax.vjp(
            lambda x, options=options: max_pool(x, 3, **options), x.astype(jnp.float32)
        )
        cotangent = jnp.asarray(rng.standard_normal(y.shape), dtype)
        (grad,), (want,) = vjp(cotangent), vjp32(cotangent.astype(jnp.float32))
        assert y.dtype == grad.dtype == dtype
        np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y32, np.float32))
        np.testing.assert_array_equal(
            np.asarray(grad, np.float32), np.asarray(want.astype(dtype), np.float32)
        )
