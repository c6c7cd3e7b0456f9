"""Activations against torch.nn.functional: values and gradients, incl. at 0 and at large |x|."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import print_saved_residuals

from jcnn.functional import activation as A

SPECIAL = np.array([0.0, 0.0, 1e-3, -1e-3, 1.0, -1.0, 19.9, 20.1, 30.0, -30.0, 60.0, -60.0])


def _inputs(rng, shape=(3, 5, 7)):
    """Random values in the shape, with exact zeros, tiny and large magnitudes mixed in."""
    x = (rng.standard_normal(shape) * 3).astype(np.float32)
    flat = x.reshape(-1)
    flat[rng.choice(flat.size, SPECIAL.size, replace=False)] = SPECIAL
    return x


def _torch_value_and_vjp(torch, fn, arrays, cotangent):
    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*tensors)
    out.backward(torch.tensor(cotangent))
    return out.detach().numpy(), [t.grad.numpy() for t in tensors]


def _jax_value_and_vjp(fn, arrays, cotangent):
    out, vjp = jax.vjp(fn, *[jnp.asarray(a) for a in arrays])
    return np.asarray(out), [np.asarray(g) for g in vjp(jnp.asarray(cotangent))]


def _torch_cases(torch):
    tF = torch.nn.functional
    return {
        "relu": (A.relu, tF.relu),
        "leaky_relu": (lambda x: A.leaky_relu(x, 0.2), lambda x: tF.leaky_relu(x, 0.2)),
        "leaky_relu_default": (A.leaky_relu, tF.leaky_relu),
        "elu": (lambda x: A.elu(x, 0.7), lambda x: tF.elu(x, 0.7)),
        "selu": (A.selu, tF.selu),
        "gelu": (A.gelu, tF.gelu),
        "gelu_tanh": (
            lambda x: A.gelu(x, approximate=True),
            lambda x: tF.gelu(x, approximate="tanh"),
        ),
        "swish": (A.swish, tF.silu),
        "mish": (A.mish, tF.mish),
        "rectify": (A.rectify, torch.abs),
        "sigmoid": (A.sigmoid, torch.sigmoid),
        "tanh": (A.tanh, torch.tanh),
        "softplus": (A.softplus, tF.softplus),
        "softplus_beta": (
            lambda x: A.softplus(x, beta=2.0, threshold=5.0),
            lambda x: tF.softplus(x, beta=2.0, threshold=5.0),
        ),
    }


def test_elementwise_match_torch_values_and_grads(torch, rng):
    x = _inputs(rng)
    for name, (ours, theirs) in _torch_cases(torch).items():
        cotangent = rng.standard_normal(x.shape).astype(np.float32)
        want, (want_grad,) = _torch_value_and_vjp(torch, theirs, [x], cotangent)
        got, (got_grad,) = _jax_value_and_vjp(ours, [x], cotangent)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got_grad, want_grad, rtol=2e-5, atol=5e-6, err_msg=name)


@pytest.mark.parametrize("name", ["elu", "selu"])
def test_elu_derivatives_keep_their_relative_accuracy_in_the_negative_tail(name):
    # JAX's derivative of expm1 is y + 1, which cancels: in float32 elu's and selu's gradients
    # were 0 at x = -18 and 44% off at x = -17 (PyTorch's, alpha * exp(x), are exact)
    alpha, scale = (1.7, 1.0) if name == "elu" else (1.6732632423543772, 1.0507009873554805)
    fn = (lambda v: A.elu(v, alpha)) if name == "elu" else A.selu
    x = np.linspace(-30.0, -0.5, 60)
    want = scale * alpha * np.exp(x)
    first = jax.vmap(jax.grad(fn))(jnp.asarray(x, jnp.float32))
    second = jax.vmap(jax.grad(jax.grad(fn)))(jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(first, want, rtol=1e-6)
    np.testing.assert_allclose(second, want, rtol=1e-6)
    # at 0 PyTorch's negative branch, for both orders; above 0 the identity's
    at_zero = jnp.array([0.0, 1.0])
    np.testing.assert_allclose(jax.vmap(jax.grad(fn))(at_zero), [scale * alpha, scale], rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(jax.grad(jax.grad(fn)))(at_zero), [scale * alpha, 0])
    grad_alpha = jax.grad(lambda a: A.elu(jnp.asarray(x, jnp.float32), a).sum())(jnp.float32(1.7))
    np.testing.assert_allclose(grad_alpha, np.expm1(x).sum(), rtol=1e-6)


@pytest.mark.parametrize("alpha_shape", [(), (1,), (7,)])
def test_prelu_matches_torch_on_channels_last(torch, rng, alpha_shape):
    x = _inputs(rng, (2, 3, 5, 7))
    alpha = rng.uniform(-0.5, 0.5, alpha_shape).astype(np.float32)
    cotangent = rng.standard_normal(x.shape).astype(np.float32)

    def torch_prelu(x, alpha):
        weight = alpha.reshape(-1) if alpha.ndim else alpha.reshape(1)
        return torch.nn.functional.prelu(x.permute(0, 3, 1, 2), weight).permute(0, 2, 3, 1)

    want, want_grads = _torch_value_and_vjp(torch, torch_prelu, [x, alpha], cotangent)
    got, got_grads = _jax_value_and_vjp(A.prelu, [x, alpha], cotangent)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_grads[0], want_grads[0], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got_grads[1], want_grads[1].reshape(alpha_shape), rtol=1e-5)


@pytest.mark.parametrize("num_pieces", [1, 2, 3])
def test_maxout_matches_torch_reshape_convention(torch, rng, num_pieces):
    channels = 4 * num_pieces
    x = rng.standard_normal((2, 3, 5, channels)).astype(np.float32)
    cotangent = rng.standard_normal((2, 3, 5, channels // num_pieces)).astype(np.float32)

    def torch_maxout(x):
        n, h, w, c = x.shape
        nchw = x.permute(0, 3, 1, 2).reshape(n, c // num_pieces, num_pieces, h, w)
        return nchw.amax(2).permute(0, 2, 3, 1)

    want, (want_grad,) = _torch_value_and_vjp(torch, torch_maxout, [x], cotangent)
    got, (got_grad,) = _jax_value_and_vjp(lambda v: A.maxout(v, num_pieces), [x], cotangent)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(got_grad, want_grad)


def test_prelu_accepts_a_number_and_keeps_the_input_dtype():
    x = jnp.array([[-2.0, 1.0]], jnp.bfloat16)
    y = A.prelu(x, jnp.array([0.5, 0.5]))
    assert y.dtype == jnp.bfloat16 and y.tolist() == [[-1.0, 1.0]]
    assert A.prelu(jnp.array([-2.0, 3.0]), 0.25).tolist() == [-0.5, 3.0]


def test_maxout_groups_consecutive_channels():
    x = jnp.arange(6.0)[::-1]  # channels 5, 4, 3, 2, 1, 0
    assert A.maxout(x, 3).tolist() == [5.0, 2.0]
    assert A.maxout(x, 2).tolist() == [5.0, 3.0, 1.0]


def test_vmap_equals_loop(rng):
    x = rng.standard_normal((4, 3, 6)).astype(np.float32)
    alpha = rng.uniform(0, 0.5, (6,)).astype(np.float32)

    def layer(v):
        return A.maxout(A.prelu(v, alpha), 2) + A.leaky_relu(A.softplus(v, beta=3.0), 0.1)[..., :3]

    batched = jax.vmap(layer)(x)
    looped = np.stack([np.asarray(layer(jnp.asarray(row))) for row in x])
    np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-7)


def test_jit_equals_eager(rng):
    x = jnp.asarray(_inputs(rng, (3, 8)))
    alpha = jnp.full((8,), 0.3)

    def everything(x, alpha):
        return (
            A.relu(x),
            A.leaky_relu(x),
            A.prelu(x, alpha),
            A.elu(x),
            A.selu(x),
            A.gelu(x),
            A.gelu(x, approximate=True),
            A.swish(x),
            A.mish(x),
            A.maxout(x, 4),
            A.rectify(x),
            A.sigmoid(x),
            A.tanh(x),
            A.softplus(x),
        )

    for got, want in zip(jax.jit(everything)(x, alpha), everything(x, alpha), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_traced_hyperparameters_are_accepted(rng):
    x = jnp.asarray(rng.standard_normal((5,)).astype(np.float32))
    slope_grad = jax.grad(lambda s: A.leaky_relu(x, s).sum())(jnp.float32(0.1))
    np.testing.assert_allclose(slope_grad, np.minimum(np.asarray(x), 0).sum(), rtol=1e-6)


def test_silu_is_swish():
    assert A.silu is A.swish


def test_dtype_is_preserved():
    x = jnp.linspace(-3, 3, 7, dtype=jnp.bfloat16)
    for fn in (A.relu, A.gelu, A.mish, A.softplus, A.selu, A.rectify):
        assert fn(x).dtype == jnp.bfloat16


_HALF_PRECISION_CASES = {
    "leaky_relu": lambda x: A.leaky_relu(x, 0.1),
    "prelu": lambda x: A.prelu(x, jnp.float32(0.25)),
    "elu": lambda x: A.elu(x, 1.5),
    "selu": A.selu,
    "gelu_tanh": lambda x: A.gelu(x, approximate=True),
    "swish": A.swish,
    "mish": A.mish,
    "sigmoid": A.sigmoid,
    "tanh": A.tanh,
    "softplus": lambda x: A.softplus(x, beta=2.0, threshold=5.0),
}


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("name", list(_HALF_PRECISION_CASES))
def test_half_precision_is_the_float32_result_rounded_once(dtype, name):
    # As PyTorch's CPU kernels: computed in half precision, 1 + tanh lost 40% of gelu's tanh form
    # near x = -3 and elu's gradient alpha * exp(x) was 0 at x = -8 (the derivative y + 1 of
    # expm1, with y rounded to -1).
    fn = _HALF_PRECISION_CASES[name]
    x = jnp.linspace(-12, 12, 2001).astype(dtype)
    got, vjp = jax.vjp(fn, x)
    (got_grad,) = vjp(jnp.ones_like(x))
    want, vjp32 = jax.vjp(fn, x.astype(jnp.float32))
    (want_grad,) = vjp32(jnp.ones(x.shape, jnp.float32))
    assert got.dtype == dtype and got_grad.dtype == dtype
    np.testing.assert_array_equal(got, want.astype(dtype))
    np.testing.assert_array_equal(got_grad, want_grad.astype(dtype))


def test_traced_hyperparameters_keep_the_input_dtype():
    x = jnp.linspace(-3, 3, 7, dtype=jnp.float16)
    value = jnp.float32(0.5)
    for fn in (
        A.leaky_relu,
        A.elu,
        A.prelu,
        lambda v, b: A.softplus(v, beta=b),
        lambda v, t: A.softplus(v, threshold=t),
    ):
        assert jax.jit(fn)(x, value).dtype == jnp.float16


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: A.relu(jnp.arange(3)), TypeError, "x: expected a floating-point array, got"),
        (lambda: A.relu([1.0, 2.0]), TypeError, "x: expected an array, got list"),
        (lambda: A.prelu(jnp.ones((2, 5)), jnp.ones(3)), ValueError, r"alpha: expected shape"),
        (lambda: A.prelu(jnp.ones((2, 5)), jnp.ones((5, 1))), ValueError, "alpha: expected rank"),
        (lambda: A.maxout(jnp.ones((2, 5)), 2), ValueError, "5 channels .* divide by num_pieces"),
        (lambda: A.maxout(jnp.ones((2, 4)), 0), ValueError, "num_pieces: expected a positive"),
        (lambda: A.maxout(jnp.ones((2, 4)), 2.0), TypeError, "num_pieces: expected a positive"),
        (lambda: A.maxout(jnp.ones(()), 1), ValueError, "x: expected rank >= 1"),
        (lambda: A.gelu(jnp.ones(2), approximate="tanh"), TypeError, "approximate: expected"),
        (lambda: A.softplus(jnp.ones(2), beta=0), ValueError, "beta: expected a finite number > 0"),
        (lambda: A.leaky_relu(jnp.ones(2), jnp.ones(2)), TypeError, "negative_slope: expected"),
        (lambda: A.elu(jnp.ones(2), "1"), TypeError, "alpha: expected a finite number"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_exact_gelu_stores_only_its_input_for_the_backward_pass(capsys):
    print_saved_residuals(A.gelu, jnp.ones((4, 3)))
    assert capsys.readouterr().out.splitlines() == ["f32[4,3] from the argument x"]


def _gelu_float64_references(x):
    """GELU and its first two derivatives in float64, from scipy's erfc and exp."""
    from scipy.special import erfc

    cdf, pdf = 0.5 * erfc(-x / np.sqrt(2)), np.exp(-x * x / 2) / np.sqrt(2 * np.pi)
    # Each error is measured against the size of the terms that make it up, so that a derivative
    # passing through zero (at x = -0.75 and +-sqrt 2) is held to rounding, not to 0.
    return (
        (x * cdf, np.abs(x) * cdf),
        (cdf + x * pdf, cdf + np.abs(x) * pdf),
        (
            (2 - x * x) * pdf,
            (2 + x * x) * pdf,
        ),
    )


@pytest.mark.parametrize("jitted", [True, False])
def test_exact_gelu_is_accurate_to_float32_rounding_down_to_the_far_tail(jitted):
    # Down to x = -13, where Phi(x) = 6e-39: XLA's erfc and PyTorch's 1 + erf are off by up to
    # 1.5e-5 and 100% there; the value and both derivatives here stay within a few ulps.
    x = np.concatenate([np.linspace(-13, 10, 200_003), [-12.999, -8.5, -0.7518, 1e-30, -1e-30]])
    x = x.astype(np.float32)
    first = jax.vmap(jax.grad(A.gelu))
    second = jax.vmap(jax.grad(jax.grad(A.gelu)))
    functions = (A.gelu, first, second)
    references = _gelu_float64_references(x.astype(np.float64))
    for order, (fn, (want, scale)) in enumerate(zip(functions, references, strict=True)):
        got = np.asarray((jax.jit(fn) if jitted else fn)(jnp.asarray(x)), np.float64)
        error = np.abs(got - want) / scale
        worst = int(np.argmax(error))
        assert error[worst] < 1e-6, (order, x[worst], got[worst], want[worst])


def test_exact_gelu_at_infinities_nan_and_huge_inputs():
    x = jnp.array([-np.inf, -3e38, -1e20, -16.0, 16.0, 1e20, 3e38, np.inf, np.nan, 0.0, -0.0])
    value = np.asarray(A.gelu(x))
    np.testing.assert_array_equal(value[:4], 0)
    np.testing.assert_array_equal(value[4:8], np.asarray(x)[4:8])  # Phi(x) = 1 in float32
    np.testing.assert_array_equal(value[8:], [np.nan, 0, 0])
    assert np.signbit(value[:4]).all() and np.signbit(value[-1]) and not np.signbit(value[-2])
    first = np.asarray(jax.vmap(jax.grad(A.gelu))(x))
    np.testing.assert_array_equal(first, [0, 0, 0, 0, 1, 1, 1, 1, np.nan, 0.5, 0.5])
    second = np.asarray(jax.vmap(jax.grad(jax.grad(A.gelu)))(x))
    np.testing.assert_allclose(second[-2:], np.sqrt(2 / np.pi), rtol=1e-6)
    np.testing.assert_array_equal(second[:8], 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_exact_gelu_of_half_precision_is_the_float32_result_rounded(dtype):
    x = jnp.linspace(-9, 9, 1001).astype(dtype)
    got = A.gelu(x)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, A.gelu(x.astype(jnp.float32)).astype(dtype))


def test_exact_gelu_keeps_every_derivative_of_the_plain_expression(rng):
    x = jnp.asarray(_inputs(rng, (41,)))
    tangent = jnp.asarray(rng.standard_normal(41).astype(np.float32))

    def derivatives(f):
        return (
            f(x),
            jax.grad(lambda v: jnp.sum(f(v) * tangent))(x),
            jax.jvp(f, (x,), (tangent,))[1],
            jax.vmap(jax.grad(jax.grad(lambda v: f(v[None])[0])))(x),
        )

    ours, plain = A.gelu, partial(jax.nn.gelu, approximate=False)
    # Eager against eager and jitted against jitted: XLA's fusions round differently from
    # op-by-op evaluation, by a few float32 ulps; a wrong derivative is off by far more.
    for got, want in zip(derivatives(ours), derivatives(plain), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    jitted_ours, jitted_plain = (
        jax.jit(partial(derivatives, ours))(),
        jax.jit(partial(derivatives, plain))(),
    )
    for got, want in zip(jitted_ours, jitted_plain, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gelu_tanh_keeps_its_relative_accuracy_for_negative_inputs():
    # 0.5 x (1 + tanh(u)) to 50 digits (mpmath); 1 + tanh(u) cancels in float32, which gave 0.2%
    # error at -4 and 0 from -5 (PyTorch: 30% off at -5)
    x = jnp.array([-4.0, -5.0, -6.0, -8.0])
    want = [
        -7.024594819237268e-05,
        -2.291796196629506e-07,
        -8.439646700762297e-11,
        -3.107782937501111e-21,
    ]
    np.testing.assert_allclose(A.gelu(x, approximate=True), want, rtol=1e-5)
    slopes = [
        -3.351231971226708e-04,
        -1.5463619875325946e-06,
        -7.709973930953696e-10,
        -4.714784504106841e-20,
    ]
    slope = jax.vmap(jax.grad(partial(A.gelu, approximate=True)))(x)
    np.testing.assert_allclose(slope, slopes, rtol=1e-5)


def test_sigmoid_derivatives_keep_their_relative_accuracy_in_the_tails():
    """s (1 - s) and s (1 - s) (1 - 2 s) to float64 rounding, against mpmath at 50 digits.
    JAX's derivative y (1 - y) cancels where y nears 1: 0 from x = 37 in float64 and from
    x = 17 in float32, where the slope is exp(-x)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    points = [-40.0, -17.0, -1.0, -0.3, 0.0, 1.0, 5.0, 17.0, 30.0, 37.0, 40.0]
    with jax.enable_x64(True):
        x = jnp.asarray(points, jnp.float64)
        first = np.asarray(jax.vmap(jax.grad(A.sigmoid))(x))
        second = np.asarray(jax.jit(jax.vmap(jax.grad(jax.grad(A.sigmoid))))(x))
    s = [1 / (1 + mpmath.exp(-mpmath.mpf(v))) for v in points]
    expected_first = np.array([float(v * (1 - v)) for v in s])
    expected_second = np.array([float(v * (1 - v) * (1 - 2 * v)) for v in s])
    np.testing.assert_allclose(first, expected_first, rtol=1e-14, atol=0)
    np.testing.assert_allclose(second, expected_second, rtol=1e-14, atol=0)
    slope = jax.grad(A.sigmoid)(jnp.float32(17.0))  # was 0
    assert slope.dtype == jnp.float32
    np.testing.assert_allclose(slope, expected_first[7], rtol=1e-6)


def test_tanh_derivatives_keep_their_relative_accuracy_in_the_tails():
    """sech(x)**2 and -2 tanh(x) sech(x)**2 to float64 rounding, against mpmath at 50 digits.
    JAX's derivative 1 - tanh(x)**2 cancels where tanh(x) nears +-1: 10% off at x = -17 in
    float64, and 0 from |x| = 9 in float32 (PyTorch's is exact)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    points = [-40.0, -17.0, -9.0, -1.0, -0.3, 0.0, 1e-8, 0.999, 1.0, 5.0, 17.0]
    with jax.enable_x64(True):
        x = jnp.asarray(points, jnp.float64)
        first = np.asarray(jax.vmap(jax.grad(A.tanh))(x))
        second = np.asarray(jax.jit(jax.vmap(jax.grad(jax.grad(A.tanh))))(x))
    sech2 = [mpmath.sech(mpmath.mpf(v)) ** 2 for v in points]
    expected_first = np.array([float(s) for s in sech2])
    expected_second = np.array(
        [float(-2 * mpmath.tanh(mpmath.mpf(v)) * s) for v, s in zip(points, sech2, strict=True)]
    )
    np.testing.assert_allclose(first, expected_first, rtol=1e-14, atol=0)
    np.testing.assert_allclose(second, expected_second, rtol=1e-14, atol=0)
    slope = jax.grad(A.tanh)(jnp.float32(-9.0))  # was 0
    assert slope.dtype == jnp.float32
    np.testing.assert_allclose(slope, float(sech2[2]), rtol=1e-6)
