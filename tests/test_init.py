"""Initializers: empirical moments and limits against the formulas, fans, orthogonality, dirac."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jcnn import init

KEY = jax.random.key(0)
CONV = (3, 3, 96, 160)  # 138,240 weights; fan_in 864, fan_out 1440
DENSE = (500, 300)


def _normal_checks(w, std):
    """Zero mean, the standard deviation within 2%, and untruncated Gaussian tails."""
    w = np.asarray(w, np.float64).ravel()
    assert abs(w.mean()) < 5 * std / math.sqrt(w.size)
    assert w.std() == pytest.approx(std, rel=0.02)
    beyond_two_sigma = (np.abs(w) > 2 * std).mean()  # 4.55% for a normal, 0 if truncated at 2
    assert beyond_two_sigma == pytest.approx(0.0455, abs=0.004)


def _uniform_checks(w, limit):
    w = np.asarray(w, np.float64).ravel()
    assert np.abs(w).max() <= limit
    assert np.abs(w).max() > 0.99 * limit
    assert abs(w.mean()) < 5 * limit / math.sqrt(3 * w.size)
    assert w.std() == pytest.approx(limit / math.sqrt(3), rel=0.02)
    assert np.histogram(w, bins=4, range=(-limit, limit))[0].min() > 0.23 * w.size


@pytest.mark.parametrize("shape", [CONV, DENSE], ids=["conv", "dense"])
def test_normal_families_match_their_formulas(shape):
    fan_in, fan_out = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
    cases = {
        "normal": (init.normal(0.05), 0.05),
        "xavier (notes)": (init.xavier_normal(), math.sqrt(1 / fan_in)),
        "xavier fan_avg": (init.xavier_normal(mode="fan_avg"), math.sqrt(2 / (fan_in + fan_out))),
        "xavier gain": (init.xavier_normal(gain=1.5, mode="fan_out"), 1.5 / math.sqrt(fan_out)),
        "he": (init.he_normal(), math.sqrt(2 / fan_in)),
        "he fan_out": (init.he_normal(mode="fan_out"), math.sqrt(2 / fan_out)),
        "lecun": (init.lecun_normal(), math.sqrt(1 / fan_in)),
    }
    for index, (name, (initializer, std)) in enumerate(cases.items()):
        w = initializer(jax.random.fold_in(KEY, index), shape, jnp.float32)
        assert w.shape == shape and w.dtype == jnp.float32, name
        _normal_checks(w, std)


@pytest.mark.parametrize("shape", [CONV, DENSE], ids=["conv", "dense"])
def test_uniform_families_match_their_limits(shape):
    fan_in, fan_out = math.prod(shape[:-1]), math.prod(shape[:-2]) * shape[-1]
    cases = {
        "xavier (notes)": (init.xavier_uniform(), math.sqrt(3 / fan_in)),
        "xavier fan_avg": (init.xavier_uniform(mode="fan_avg"), math.sqrt(6 / (fan_in + fan_out))),
        "he": (init.he_uniform(), math.sqrt(6 / fan_in)),
        "he fan_out": (init.he_uniform(mode="fan_out"), math.sqrt(6 / fan_out)),
    }
    for index, (name, (initializer, limit)) in enumerate(cases.items()):
        w = initializer(jax.random.fold_in(KEY, index), shape, jnp.float32)
        assert w.shape == shape, name
        _uniform_checks(w, limit)


def test_formulas_agree_with_torch(torch):
    """Same limits and standard deviations as torch.nn.init on the same (transposed) kernel."""
    ours = (5, 3, 7, 11)
    theirs = torch.empty(11, 7, 5, 3)
    fan_in, fan_out = init.compute_fans(ours)
    assert (fan_in, fan_out) == torch.nn.init._calculate_fan_in_and_fan_out(theirs)
    torch.manual_seed(0)
    bound = torch.nn.init.xavier_uniform_(theirs, gain=2.0).abs().max().item()
    w = init.xavier_uniform(gain=2.0, mode="fan_avg")(KEY, ours)
    assert float(jnp.abs(w).max()) == pytest.approx(bound, rel=0.03)
    bound = torch.nn.init.kaiming_uniform_(theirs, nonlinearity="relu").abs().max().item()
    assert float(jnp.abs(init.he_uniform()(KEY, ours)).max()) == pytest.approx(bound, rel=0.03)


@pytest.mark.parametrize(
    "shape, groups, fans",
    [
        ((10, 20), 1, (10, 20)),
        ((7, 16, 32), 1, (112, 224)),
        ((3, 3, 8, 32), 4, (72, 72)),  # grouped: each input channel feeds 32 / 4 outputs
        ((3, 3, 1, 64), 64, (9, 9)),  # depthwise
        ((2, 3, 5, 4, 6), 2, (120, 90)),
    ],
)
def test_compute_fans_for_dense_and_conv_kernels(shape, groups, fans):
    assert init.compute_fans(shape, groups) == fans
    numpy_shape = init.compute_fans(tuple(np.int64(d) for d in shape), np.int64(groups))
    assert numpy_shape == fans and all(type(fan) is int for fan in numpy_shape)


def test_groups_set_fan_out_of_grouped_convs():
    shape = (3, 3, 16, 256)  # groups=16: fan_out = 9 * 256 / 16 = 144
    w = init.he_normal(mode="fan_out", groups=16)(KEY, shape)
    assert float(jnp.std(w)) == pytest.approx(math.sqrt(2 / 144), rel=0.02)


@pytest.mark.parametrize("shape", [(3, 3, 16, 32), (64, 10), (10, 64), (5, 4, 20)])
def test_orthogonal_is_orthonormal_over_the_flattened_kernel(shape):
    gain = 1.7
    w = init.orthogonal(gain)(KEY, shape, jnp.float32)
    assert w.shape == shape
    matrix = np.asarray(w, np.float64).reshape(-1, shape[-1])
    gram = matrix.T @ matrix if matrix.shape[0] >= matrix.shape[1] else matrix @ matrix.T
    np.testing.assert_allclose(gram, gain**2 * np.eye(len(gram)), atol=2e-5)


def test_orthogonal_is_random_and_reproducible():
    a = init.orthogonal()(jax.random.key(1), (8, 8))
    np.testing.assert_array_equal(a, init.orthogonal()(jax.random.key(1), (8, 8)))
    b = init.orthogonal()(jax.random.key(2), (8, 8))
    assert not np.allclose(a, b)
    # Haar-distributed: the entries of many draws average to 0 with variance 1/8.
    draws = jax.vmap(lambda k: init.orthogonal()(k, (8, 8)))(jax.random.split(KEY, 500))
    assert abs(float(draws.mean())) < 5 / math.sqrt(8 * draws.size)
    assert float(draws.var()) == pytest.approx(1 / 8, rel=0.03)


def _conv(x, w, groups):
    spatial = x.ndim - 2
    letters = "DHW"[-spatial:]
    numbers = lax.conv_dimension_numbers(
        x.shape, w.shape, ("N" + letters + "C", letters + "IO", "N" + letters + "C")
    )
    padding = [((k - 1) // 2, (k - 1) // 2) for k in w.shape[:spatial]]
    return lax.conv_general_dilated(
        x,
        w,
        (1,) * spatial,
        padding,
        dimension_numbers=numbers,
        feature_group_count=groups,
        precision=lax.Precision.HIGHEST,
    )


@pytest.mark.parametrize(
    "x_shape, window, groups",
    [
        ((2, 9, 4), (3,), 1),
        ((2, 7, 6, 6), (3, 5), 1),
        ((2, 6, 5, 6), (3, 3), 3),
        ((1, 4, 5, 4, 4), (3, 3, 1), 2),
    ],
)
def test_dirac_convolution_is_identity(rng, x_shape, window, groups):
    channels = x_shape[-1]
    x = jnp.asarray(rng.standard_normal(x_shape).astype(np.float32))
    w = init.dirac(groups)(KEY, (*window, channels // groups, channels), jnp.float32)
    np.testing.assert_array_equal(_conv(x, w, groups), x)


@pytest.mark.parametrize("shape, groups", [((3, 3, 4, 6), 1), ((3, 5, 2, 6), 3), ((3, 6, 4), 1)])
def test_dirac_matches_torch_layout(torch, shape, groups):
    theirs = torch.empty(shape[-1], shape[-2], *shape[:-2])
    torch.nn.init.dirac_(theirs, groups)
    want = np.moveaxis(np.moveaxis(theirs.numpy(), 0, -1), 0, -2)
    np.testing.assert_array_equal(init.dirac(groups)(KEY, shape), want)


@pytest.mark.parametrize(
    "shape, groups", [((3, 3, 4, 7), 1), ((3, 3, 6, 4), 1), ((3, 5, 2, 6), 3), ((2, 3, 4), 1)]
)
def test_with_dirac_matches_airbench_torch_init(torch, shape, groups):
    base = init.he_normal()
    ours = init.with_dirac(base, groups)(KEY, shape)
    drawn = np.asarray(base(KEY, shape))
    # airbench94: the default draw, then dirac_ on the first C_in output channels of each group
    theirs = torch.from_numpy(np.ascontiguousarray(np.moveaxis(np.moveaxis(drawn, -1, 0), -1, 1)))
    in_per_group, out_per_group = shape[-2], shape[-1] // groups
    copied = min(in_per_group, out_per_group)
    for g in range(groups):
        block = theirs[g * out_per_group : g * out_per_group + copied]
        torch.nn.init.dirac_(block)
    want = np.moveaxis(np.moveaxis(theirs.numpy(), 0, -1), 0, -2)
    np.testing.assert_array_equal(ours, want)


def test_from_array_returns_the_array_and_checks_the_shape():
    value = np.random.default_rng(0).standard_normal((2, 2, 3, 24)).astype(np.float32)
    np.testing.assert_array_equal(init.from_array(value)(KEY, (2, 2, 3, 24)), value)
    assert init.from_array(value)(KEY, (2, 2, 3, 24), jnp.bfloat16).dtype == jnp.bfloat16
    with pytest.raises(ValueError, match=r"shape: the parameter has shape \(2, 2, 3, 12\)"):
        init.from_array(value)(KEY, (2, 2, 3, 12))
    with pytest.raises(TypeError, match="array: expected an array"):
        init.from_array([1.0, 2.0])
    for bad in (np.nan, np.inf):
        poisoned = value.copy()
        poisoned[1, 0, 2, 5] = bad
        with pytest.raises(ValueError, match=r"array: expected finite values, got 1 NaN or inf"):
            init.from_array(poisoned)  # a NaN initial weight gave a NaN loss at step 1


def test_dtypes_and_constant_initializers():
    for initializer in (init.he_normal(), init.xavier_uniform(), init.orthogonal(), init.dirac()):
        assert initializer(KEY, (3, 3, 4, 4), jnp.bfloat16).dtype == jnp.bfloat16
    assert init.zeros(KEY, (2, 3)).tolist() == [[0.0] * 3] * 2
    assert init.ones(KEY, (3,), jnp.float16).dtype == jnp.float16
    assert init.he_normal()(KEY, (4, 4), None).dtype == jnp.float32
    a = init.he_normal()(jax.random.key(3), (4, 5))
    np.testing.assert_array_equal(a, init.he_normal()(jax.random.key(3), (4, 5)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_draws_are_float32_draws_rounded(dtype):
    # JAX's own bfloat16 normal has 128 values, none beyond 2.9 standard deviations (float16:
    # 1024 values, none beyond 3.5): the tails of N(0, 2 / fan_in) were cut off
    from scipy import stats

    shape = (4, 4, 64, 64)
    for initializer in (init.he_normal(), init.he_uniform(), init.normal(0.5)):
        wide = initializer(KEY, shape, jnp.float32)
        half = np.asarray(initializer(KEY, shape, dtype), np.float32)
        np.testing.assert_allclose(half, wide, rtol=float(jnp.finfo(dtype).eps), atol=1e-6)
    w = np.asarray(init.he_normal()(KEY, shape, dtype), np.float64) / math.sqrt(2 / (16 * 64))
    beyond = int((np.abs(w) > 3).sum())  # expected 2 * Phi(-3) = 0.27% of them
    assert stats.binomtest(beyond, w.size, 2 * stats.norm.sf(3)).pvalue > 1e-6, beyond
    assert len(np.unique(w)) > 2000


def test_initializers_plug_into_flax():
    import flax.linen as fnn

    layer = fnn.Conv(8, (3, 3), kernel_init=init.dirac(), bias_init=init.zeros)
    x = jnp.arange(2 * 5 * 5 * 8, dtype=jnp.float32).reshape(2, 5, 5, 8)
    params = layer.init(KEY, x)
    assert params["params"]["kernel"].shape == (3, 3, 8, 8)
    np.testing.assert_array_equal(layer.apply(params, x), x)


def test_initializers_work_under_jit():
    w = jax.jit(init.he_uniform(), static_argnums=(1, 2))(KEY, (3, 3, 2, 4), jnp.float32)
    assert w.shape == (3, 3, 2, 4)


def test_gain_and_stddev_are_finite_and_may_be_0d_arrays():
    # gain=inf gave a kernel of infinities and NaNs without a word; a 0-d array was refused.
    for bad in (np.inf, -np.inf, np.nan, jnp.float32(np.inf)):
        for make in (init.normal, init.xavier_normal, init.xavier_uniform, init.orthogonal):
            with pytest.raises(ValueError, match=r"(stddev|gain): expected a positive number"):
                make(bad)
    for gain in (jnp.asarray(1.5), np.array(1.5)):
        np.testing.assert_array_equal(
            init.xavier_normal(gain)(KEY, (3, 4)), init.xavier_normal(1.5)(KEY, (3, 4))
        )
        np.testing.assert_array_equal(init.normal(gain)(KEY, (3,)), init.normal(1.5)(KEY, (3,)))
    with pytest.raises(TypeError, match=r"gain: expected a positive number, got ndarray of shape"):
        init.orthogonal(np.ones(2))


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda: init.he_normal()(KEY, (10,)), ValueError, r"shape: expected rank >= 2"),
        (lambda: init.orthogonal()(KEY, (10,)), ValueError, r"shape: expected rank >= 2"),
        (lambda: init.dirac()(KEY, (3, 3)), ValueError, r"shape: expected a conv kernel"),
        (lambda: init.dirac(4)(KEY, (3, 3, 2, 6)), ValueError, "6 output channels .* groups"),
        (lambda: init.he_normal(mode="fan_out", groups=3)(KEY, (3, 4)), ValueError, "groups"),
        (lambda: init.he_normal(mode="fan_sum"), ValueError, "mode: expected one of"),
        (lambda: init.xavier_normal(gain=0), ValueError, "gain: expected a positive number"),
        (lambda: init.normal(-1.0), ValueError, "stddev: expected a positive number"),
        (lambda: init.normal("0.1"), TypeError, "stddev: expected a positive number"),
        (lambda: init.dirac(0), ValueError, "groups: expected a positive int"),
        (lambda: init.with_dirac(0.1), TypeError, "base: expected an initializer"),
        (lambda: init.with_dirac(init.zeros)(KEY, (3, 4)), ValueError, "expected a conv kernel"),
        (lambda: init.he_normal()(KEY, (3, 4), jnp.int32), TypeError, "dtype: expected a float"),
        (lambda: init.zeros(KEY, (3, -1)), TypeError, "shape: expected a sequence of non-neg"),
        (lambda: init.zeros(KEY, 3), TypeError, "shape: expected a sequence"),
        (lambda: init.he_normal()(3, (3, 4)), TypeError, "key: expected a jax.random key"),
        (lambda: init.he_normal()(KEY, (0, 4)), ValueError, "fan_in 0"),
        (lambda: init.compute_fans((4,)), ValueError, "shape: expected a dense"),
        (lambda: init.compute_fans((3.0, 3, 4, 8)), TypeError, "shape: expected a sequence of"),
        (lambda: init.compute_fans((3, 3, -4, 8)), TypeError, "shape: expected a sequence of"),
        (lambda: init.compute_fans((3, True, 4, 8)), TypeError, "shape: expected a sequence of"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()
