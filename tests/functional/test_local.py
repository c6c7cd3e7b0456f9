"""F.locally_connected against a plain NumPy loop over output positions (no PyTorch), and the
LocallyConnected module."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import functional as F
from jcnn import nn


def reference(x, w, b, stride, pads, dilation):
    """Direct definition: every output position has its own (window, C_in, C_out) filter."""
    rank = x.ndim - 2
    x = np.pad(x, [(0, 0), *pads, (0, 0)])
    out = w.shape[:rank]
    window = w.shape[rank : 2 * rank]
    y = np.zeros((x.shape[0], *out, w.shape[-1]))
    for p in itertools.product(*(range(n) for n in out)):
        for k in itertools.product(*(range(n) for n in window)):
            index = tuple(
                pi * s + ki * d for pi, ki, s, d in zip(p, k, stride, dilation, strict=True)
            )
            y[(slice(None), *p)] += x[(slice(None), *index)] @ w[(*p, *k)]
        if b is not None:
            y[(slice(None), *p)] += b[p]
    return y


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_matches_a_numpy_loop_on_random_shapes(rng, rank):
    for _ in range(4 if rank < 3 else 2):
        spatial = tuple(int(v) for v in rng.integers(4, 9 if rank < 3 else 6, rank))
        window = tuple(int(v) for v in rng.integers(1, 4, rank))
        stride = tuple(int(v) for v in rng.integers(1, 3, rank))
        dilation = tuple(int(v) for v in rng.integers(1, 3, rank))
        pads = tuple((int(lo), int(hi)) for lo, hi in rng.integers(0, 3, (rank, 2)))
        c_in, c_out = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        try:
            out = F.locally_connected_output_shape(
                spatial, window, stride=stride, padding=pads, dilation=dilation
            )
        except ValueError:
            continue
        x = rng.normal(size=(2, *spatial, c_in))
        w = rng.normal(size=(*out, *window, c_in, c_out))
        b = rng.normal(size=(*out, c_out)) if rng.random() < 0.5 else None
        y = F.locally_connected(
            jnp.asarray(x, jnp.float32),
            jnp.asarray(w, jnp.float32),
            None if b is None else jnp.asarray(b, jnp.float32),
            stride=stride,
            padding=pads,
            dilation=dilation,
        )
        expected = reference(x, w, b, stride, pads, dilation)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_gradients_match_the_loop_by_linearity(rng):
    x = rng.normal(size=(2, 6, 5, 3))
    w = rng.normal(size=(3, 3, 3, 3, 3, 4))
    grad_x, grad_w = jax.grad(
        lambda x, w: jnp.sum(F.locally_connected(x, w, stride=(2, 2), padding=1) ** 2),
        argnums=(0, 1),
    )(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
    # d/dw of sum(y^2) = 2 * sum_n y * patch; checked through a finite difference of the loop
    y = reference(x, w, None, (2, 2), ((1, 1), (1, 1)), (1, 1))
    direction = rng.normal(size=w.shape)
    eps = 1e-3
    plus = reference(x, w + eps * direction, None, (2, 2), ((1, 1), (1, 1)), (1, 1))
    minus = reference(x, w - eps * direction, None, (2, 2), ((1, 1), (1, 1)), (1, 1))
    numeric = (np.sum(plus**2) - np.sum(minus**2)) / (2 * eps)
    np.testing.assert_allclose(np.sum(np.asarray(grad_w) * direction), numeric, rtol=1e-3)
    assert grad_x.shape == x.shape and np.all(np.isfinite(grad_x))
    assert y.shape == (2, 3, 3, 4)


def test_equals_conv_when_every_position_has_the_same_filter(rng):
    x = jnp.asarray(rng.normal(size=(3, 7, 6, 2)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 2, 2, 5)), jnp.float32)
    out = F.locally_connected_output_shape((7, 6), (3, 2), stride=(2, 1), padding="SAME")
    w = jnp.broadcast_to(k, (*out, *k.shape))
    np.testing.assert_allclose(
        F.locally_connected(x, w, stride=(2, 1), padding="SAME"),
        F.conv(x, k, stride=(2, 1), padding="SAME"),
        rtol=1e-5,
        atol=1e-5,
    )


def test_bad_inputs_name_the_argument():
    x = jnp.ones((1, 5, 5, 2))
    with pytest.raises(ValueError, match="w: expected out_spatial"):
        F.locally_connected(x, jnp.ones((4, 4, 3, 3, 2, 1)))
    with pytest.raises(ValueError, match="w: expected C_in = 2"):
        F.locally_connected(x, jnp.ones((3, 3, 3, 3, 1, 1)))
    with pytest.raises(ValueError, match="b: expected shape"):
        F.locally_connected(x, jnp.ones((3, 3, 3, 3, 2, 1)), jnp.ones((1,)))
    with pytest.raises(ValueError, match="x: expected rank 4"):
        F.locally_connected(jnp.ones((5, 5, 2)), jnp.ones((3, 3, 3, 3, 2, 1)))
    with pytest.raises(
        ValueError, match=r"^window: the dilated window 5 \(kernel 3, dilation 2\) "
    ):
        F.locally_connected_output_shape((6, 2), 3, dilation=(1, 2), padding=(0, 1))
    with pytest.raises(TypeError, match="x"):
        F.locally_connected(np.ones((1, 5, 5, 2), np.int32), jnp.ones((3, 3, 3, 3, 2, 1)))


@pytest.mark.parametrize(
    ("in_spatial", "error"),
    [
        (5, TypeError),  # an int, not a sequence of sizes
        ((5.5, 5), TypeError),  # used to be truncated to 5
        ((5.0, 5), TypeError),
        ((True, 5), TypeError),
        ((), TypeError),
        ("55", TypeError),
        ((-5, 5), ValueError),  # used to be reported as a window error
    ],
)
def test_output_shape_checks_in_spatial(in_spatial, error):
    with pytest.raises(error, match="in_spatial: expected"):
        F.locally_connected_output_shape(in_spatial, 3)


def test_output_shape_refuses_more_than_three_spatial_dims():
    # it returned (5, 5, 5, 5), a kernel shape locally_connected refuses (1- to 3-D only)
    with pytest.raises(
        ValueError, match=r"^in_spatial: expected 1 to 3 spatial sizes such as \(H, W\), got "
    ):
        F.locally_connected_output_shape((5, 5, 5, 5), 1)
    assert F.locally_connected_output_shape((5, 5, 5), 1) == (5, 5, 5)


def test_output_shape_accepts_numpy_sizes():
    assert F.locally_connected_output_shape([np.int64(7), np.int32(6)], 3) == (5, 4)
    assert F.locally_connected_output_shape(np.array([7, 6]), 3) == (5, 4)


def test_module_parameters_and_output(rng):
    layer = nn.LocallyConnected(3, (3, 2), stride=2, padding=1)
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 4)), jnp.float32)
    variables = layer.init(jax.random.key(0), x)
    kernel, bias = variables["params"]["kernel"], variables["params"]["bias"]
    assert kernel.shape == (4, 4, 3, 2, 4, 3) and bias.shape == (4, 4, 3)
    # He normal per position: variance 2 / (window * C_in), positions drawn independently
    np.testing.assert_allclose(np.var(np.asarray(kernel)), 2 / (3 * 2 * 4), rtol=0.2)
    assert not np.allclose(kernel[0, 0], kernel[1, 1])
    bias = jnp.asarray(rng.normal(size=bias.shape), jnp.float32)
    y = layer.apply({"params": {"kernel": kernel, "bias": bias}}, x)
    expected = reference(
        np.asarray(x, np.float64),
        np.asarray(kernel, np.float64),
        np.asarray(bias, np.float64),
        (2, 2),
        ((1, 1), (1, 1)),
        (1, 1),
    )
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_output_with_bias_is_the_float32_result_rounded_once(dtype, rng):
    # The product was rounded to bfloat16 before the bias was added (up to 30% off where the
    # bias cancels it); it is now the float32 result rounded once.
    x = jnp.asarray(rng.standard_normal((4, 6, 6, 8)), dtype)
    w = jnp.asarray(rng.standard_normal((4, 4, 3, 3, 8, 5)), dtype)
    b = jnp.asarray(5 * rng.standard_normal((4, 4, 5)), dtype)
    y = F.locally_connected(x, w, b)
    expected = F.locally_connected(*(v.astype(jnp.float32) for v in (x, w, b))).astype(dtype)
    assert y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(expected, np.float32))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_gradients_are_the_float32_ones_rounded_once(dtype, rng):
    # Each pixel's gradient sums its cotangents from every window holding it: summed in
    # bfloat16, up to 220 ulps from the float32 gradient rounded.
    x = jnp.asarray(3 * rng.standard_normal((3, 9, 10, 6)), dtype)
    w = jnp.asarray(0.2 * rng.standard_normal((7, 8, 3, 3, 6, 4)), dtype)
    cotangent = jnp.asarray(rng.standard_normal((3, 7, 8, 4)), dtype)
    y, vjp = jax.vjp(F.locally_connected, x, w)
    y32, vjp32 = jax.vjp(F.locally_connected, x.astype(jnp.float32), w.astype(jnp.float32))
    assert y.dtype == dtype
    for got, want in zip(vjp(cotangent), vjp32(cotangent.astype(jnp.float32)), strict=True):
        assert got.dtype == dtype
        np.testing.assert_array_equal(
            np.asarray(got, np.float32), np.asarray(want.astype(dtype), np.float32)
        )
