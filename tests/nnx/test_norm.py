"""jcnn.nnx normalization: statistics as nnx.BatchStat, train/eval by attribute or argument,
input checks (the Linen parity is in test_convert.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jcnn import nn
from jcnn import nnx as jnnx


def test_batch_norm_running_statistics_follow_the_mode(rng):
    bn = jnnx.BatchNorm(3, momentum=0.5, rngs=nnx.Rngs(0))
    assert isinstance(bn.mean, nnx.BatchStat) and isinstance(bn.var, nnx.BatchStat)
    assert isinstance(bn.scale, nnx.Param) and isinstance(bn.bias, nnx.Param)
    x = rng.normal(3.0, 2.0, size=(6, 4, 3)).astype(np.float32)
    bn(jnp.asarray(x))  # training by default
    flat = x.reshape(-1, 3)
    np.testing.assert_allclose(bn.mean[...], 0.5 * flat.mean(0), rtol=1e-5)
    np.testing.assert_allclose(bn.var[...], 0.5 + 0.5 * flat.var(0), rtol=1e-5)
    bn.eval()
    mean, var = np.asarray(bn.mean[...]), np.asarray(bn.var[...])
    y = bn(jnp.asarray(x))
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(bn.mean[...], mean)


@pytest.mark.parametrize("param_dtype", [jnp.float64, jnp.float32, jnp.bfloat16])
def test_running_statistics_are_param_dtype_at_least_float32(rng, param_dtype):
    """float64 parameters (jax_enable_x64) keep float64 statistics, as in the Linen twin."""
    x = rng.normal(size=(4, 3, 3, 2)) + 1 / 3
    expected = jnp.float64 if param_dtype == jnp.float64 else jnp.float32
    with jax.enable_x64(True):
        for layer in (
            jnnx.BatchNorm(2, param_dtype=param_dtype, rngs=nnx.Rngs(0)),
            jnnx.InstanceNorm(
                2, track_running_stats=True, param_dtype=param_dtype, rngs=nnx.Rngs(0)
            ),
        ):
            layer(jnp.asarray(x, param_dtype))
            assert layer.mean[...].dtype == layer.var[...].dtype == expected
        if param_dtype == jnp.float64:
            bn = jnnx.BatchNorm(2, momentum=0.0, param_dtype=param_dtype, rngs=nnx.Rngs(0))
            bn(jnp.asarray(x))
            np.testing.assert_allclose(bn.var[...], x.reshape(-1, 2).var(0), rtol=1e-14)


def test_instance_norm_holds_statistics_only_when_tracking(rng):
    plain = jnnx.InstanceNorm(2, rngs=nnx.Rngs(0))
    assert not hasattr(plain, "mean")
    x = jnp.asarray(rng.normal(size=(2, 5, 5, 2)), jnp.float32)
    np.testing.assert_array_equal(plain(x, train=False), plain(x, train=True))
    tracking = jnnx.InstanceNorm(2, track_running_stats=True, rngs=nnx.Rngs(0))
    tracking(x)
    assert not np.allclose(tracking.var[...], 1.0)
    # the running-statistics settings are checked even when they go unused
    with pytest.raises(ValueError, match=r"momentum: expected a number in \[0, 1\], got 1.5"):
        jnnx.InstanceNorm(2, momentum=1.5, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="unbiased_running_var: expected a Python bool"):
        jnnx.InstanceNorm(2, unbiased_running_var="yes", rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "make",
    [
        lambda r: jnnx.BatchNorm(4, rngs=r),
        lambda r: jnnx.LayerNorm(4, rngs=r),
        lambda r: jnnx.GroupNorm(4, num_groups=2, rngs=r),
        lambda r: jnnx.InstanceNorm(4, rngs=r),
    ],
)
def test_norms_check_the_channels(make):
    layer = make(nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_features=4"):
        layer(jnp.ones((2, 3, 3, 3)))


def test_norm_arguments_are_checked():
    with pytest.raises(ValueError, match="num_groups"):
        jnnx.GroupNorm(6, num_groups=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_features"):
        jnnx.LayerNorm(0, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="rngs"):
        jnnx.BatchNorm(3)
    with pytest.raises(TypeError, match="use_running_average"):
        jnnx.BatchNorm(3, use_running_average="yes", rngs=nnx.Rngs(0))
    bn = jnnx.BatchNorm(3, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
    assert bn.scale is None and bn.bias is None
    with pytest.raises(TypeError, match="train"):
        bn(jnp.ones((2, 3)), train="no")


def test_local_response_norm_gradient_matches_the_linen_twin_eagerly(rng):
    # Under jit, F.local_response_norm cannot be differentiated yet (see test_convert.py).
    x = jnp.asarray(rng.normal(size=(2, 3, 3, 6)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    twin = jnnx.LocalResponseNorm(3, alpha=0.1, beta=0.6, k=1.5)
    linen = nn.LocalResponseNorm(3, alpha=0.1, beta=0.6, k=1.5)
    got = jax.grad(lambda x: jnp.sum(twin(x) * weights))(x)
    want = jax.grad(lambda x: jnp.sum(linen.apply({}, x) * weights))(x)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    ("build", "name"),
    [
        (lambda r: jnnx.BatchNorm(3, use_scale="no", rngs=r), "use_scale"),
        (lambda r: jnnx.LayerNorm(3, use_bias=1, rngs=r), "use_bias"),
        (lambda r: jnnx.GroupNorm(3, 1, use_scale=None, rngs=r), "use_scale"),
        (lambda r: jnnx.InstanceNorm(3, track_running_stats="yes", rngs=r), "track_running_stats"),
        # was accepted until the first call
        (lambda r: jnnx.BatchNorm(3, unbiased_running_var="no", rngs=r), "unbiased_running_var"),
    ],
)
def test_flags_must_be_bools_as_in_the_linen_twin(build, name):
    with pytest.raises(TypeError, match=f"^{name}: expected a Python bool, got "):
        build(nnx.Rngs(0))


@pytest.mark.parametrize("bad", [1, "no", (True,)])
def test_batch_norm_unbiased_running_var_is_refused_with_the_linen_message(bad):
    # the Linen BatchNorm's came from F.batch_norm's own flag check, "expected a Python bool (it
    # selects the computation), got 1", where the NNX twin (and nn.InstanceNorm) said "expected
    # a Python bool, got 1"
    x = jnp.ones((2, 3))
    with pytest.raises(TypeError) as linen_error:
        nn.BatchNorm(unbiased_running_var=bad).init(jax.random.key(0), x, train=True)
    with pytest.raises(TypeError) as nnx_error:
        jnnx.BatchNorm(3, unbiased_running_var=bad, rngs=nnx.Rngs(0))
    assert str(nnx_error.value) == str(linen_error.value)
    assert str(linen_error.value).startswith("unbiased_running_var: expected a Python bool, got")


@pytest.mark.parametrize("module", [jnnx.BatchNorm, jnnx.LayerNorm, jnnx.InstanceNorm])
def test_a_non_floating_compute_dtype_is_a_type_error(module):
    # refused at construction, as every setting of an NNX module (it was at the first call)
    with pytest.raises(TypeError, match="dtype: expected None or a floating dtype"):
        module(3, dtype=jnp.int32, rngs=nnx.Rngs(0))


_AFFINE_NORMS = [
    lambda r, **kw: jnnx.BatchNorm(3, rngs=r, **kw),
    lambda r, **kw: jnnx.LayerNorm(3, rngs=r, **kw),
    lambda r, **kw: jnnx.GroupNorm(3, num_groups=1, rngs=r, **kw),
    lambda r, **kw: jnnx.InstanceNorm(3, rngs=r, **kw),
]


@pytest.mark.parametrize("bad", [5, 0, None, "ones"])
@pytest.mark.parametrize("build", _AFFINE_NORMS)
@pytest.mark.parametrize("name", ["scale_init", "bias_init"])
def test_a_non_callable_initializer_is_named_as_in_the_linen_twin(build, name, bad):
    with pytest.raises(TypeError, match=f"^{name}: expected an initializer init\\(key, shape"):
        build(nnx.Rngs(0), **{name: bad})


@pytest.mark.parametrize("size", [2.5, True, None, "3", (3,)])
def test_local_response_norm_refuses_a_non_int_size_with_the_linen_message(size):
    # was "size: expected an int or a sequence of 1 ints" at construction, where the Linen twin
    # (and F.local_response_norm) say "size: expected an int >= 1"
    x = jnp.ones((2, 5))
    with pytest.raises(TypeError) as linen_error:
        nn.LocalResponseNorm(size).apply({}, x)
    with pytest.raises(TypeError) as nnx_error:
        jnnx.LocalResponseNorm(size)
    assert (
        str(nnx_error.value)
        == str(linen_error.value)
        == f"size: expected an int >= 1, got {size!r}"
    )


@pytest.mark.parametrize("build", _AFFINE_NORMS)
@pytest.mark.parametrize("name", ["scale_init", "bias_init"])
def test_an_initializer_of_the_wrong_shape_is_named_at_construction(build, name):
    # was accepted, the (2,) parameter then refused at the first call as "scale: expected shape
    # (C,)=(3,)", where the Linen twin names the initializer at init
    def wrong(key, shape, dtype):
        return jnp.ones((2,), dtype)

    message = (
        rf"^{name}: expected init\(key, shape=\(3,\), dtype\) to return an array of that "
        r"shape, got shape \(2,\)$"
    )
    with pytest.raises(ValueError, match=message):
        build(nnx.Rngs(0), **{name: wrong})


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: jnnx.LocalContrastNorm(4), ValueError, "size: expected odd window widths"),
        (lambda: jnnx.LocalContrastNorm((3, 0)), ValueError, "size: every entry must be >= 1"),
        (lambda: jnnx.LocalContrastNorm("a"), TypeError, "size: expected an int"),
        (lambda: jnnx.BatchNorm(3, axis_name=5, rngs=nnx.Rngs(0)), TypeError, "axis_name: "),
    ],
)
def test_every_setting_is_checked_at_construction(build, error, message):
    # these were accepted until the first call
    with pytest.raises(error, match=f"^{message}"):
        build()
    assert jnnx.LocalContrastNorm((3, 5, 7))(jnp.ones((1, 2, 3, 4, 1))).shape == (1, 2, 3, 4, 1)


@pytest.mark.parametrize(
    "build",
    [
        lambda r: jnnx.BatchNorm(3, use_running_average=None, rngs=r),
        lambda r: jnnx.InstanceNorm(3, use_running_average=None, rngs=r),
        lambda r: jnnx.InstanceNorm(3, True, use_running_average=None, rngs=r),
    ],
)
def test_use_running_average_must_be_a_bool(build):
    # None was accepted and meant training, silently
    with pytest.raises(TypeError, match="^use_running_average: expected a Python bool, got None"):
        build(nnx.Rngs(0))
