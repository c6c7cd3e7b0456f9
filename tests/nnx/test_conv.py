"""jcnn.nnx.Conv, DepthwiseConv and ConvTranspose: kernel shapes and spatial rank at construction,
input checks, and the functional op they wrap (the Linen parity is in test_convert.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jcnn import functional as F
from jcnn import init, nn
from jcnn import nnx as jnnx


@pytest.mark.parametrize(
    ("kernel_size", "spatial_dims", "shape"),
    [(3, None, (3, 3)), (3, 1, (3,)), (3, 3, (3, 3, 3)), ((2, 5), None, (2, 5)), ((4,), 1, (4,))],
)
def test_conv_kernel_rank_comes_from_kernel_size_or_spatial_dims(kernel_size, spatial_dims, shape):
    layer = jnnx.Conv(6, 4, kernel_size, groups=2, spatial_dims=spatial_dims, rngs=nnx.Rngs(0))
    assert layer.kernel.shape == (*shape, 3, 4)
    transpose = jnnx.ConvTranspose(
        6, 4, kernel_size, groups=2, spatial_dims=spatial_dims, rngs=nnx.Rngs(0)
    )
    assert transpose.kernel.shape == (*shape, 6, 2)


def test_conv_computes_f_conv_with_its_parameters(rng):
    layer = jnnx.Conv(
        3,
        5,
        (3, 2),
        stride=(2, 1),
        padding=((1, 0), (2, 1)),
        dilation=(1, 2),
        bias_init=init.normal(1.0),
        rngs=nnx.Rngs(0),
    )
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 3)), jnp.float32)
    expected = F.conv(
        x,
        layer.kernel[...],
        layer.bias[...],
        stride=(2, 1),
        padding=((1, 0), (2, 1)),
        dilation=(1, 2),
    )
    np.testing.assert_array_equal(layer(x), expected)
    assert not np.allclose(layer.bias[...], 0)


def test_conv_default_initializer_is_he_normal_with_the_grouped_fan_in():
    layer = jnnx.Conv(64, 64, 3, groups=4, use_bias=False, rngs=nnx.Rngs(0))
    assert layer.bias is None
    fan_in = 3 * 3 * 64 // 4
    np.testing.assert_allclose(np.std(layer.kernel[...]), np.sqrt(2 / fan_in), rtol=0.05)


def test_conv_checks_its_arguments_and_input():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="groups: in_features"):
        jnnx.Conv(3, 4, 3, groups=2, rngs=rngs)
    with pytest.raises(ValueError, match="groups: features"):
        jnnx.ConvTranspose(4, 3, 3, groups=2, rngs=rngs)
    with pytest.raises(ValueError, match="spatial_dims"):
        jnnx.Conv(3, 4, (3, 3), spatial_dims=1, rngs=rngs)
    with pytest.raises(ValueError, match="spatial_dims"):
        jnnx.Conv(3, 4, 3, spatial_dims=4, rngs=rngs)
    # True and 1.0 both equal 1, and were taken for a 1-D window; a wrong type is a TypeError
    # (these, "2" and (1, 2) were ValueErrors, as a wrong value)
    for taken_as_one in (True, np.bool_(True), 1.0, "2", (1, 2)):
        for layer in (jnnx.Conv, jnnx.ConvTranspose):
            with pytest.raises(TypeError, match="spatial_dims: expected 1, 2 or 3"):
                layer(3, 4, 3, spatial_dims=taken_as_one, rngs=rngs)
        with pytest.raises(TypeError, match="spatial_dims: expected 1, 2 or 3"):
            jnnx.DepthwiseConv(3, 3, spatial_dims=taken_as_one, rngs=rngs)
    assert jnnx.Conv(3, 4, 3, spatial_dims=np.int64(1), rngs=rngs).kernel[...].shape == (3, 3, 4)
    with pytest.raises(ValueError, match="in_features"):
        jnnx.Conv(0, 4, 3, rngs=rngs)
    with pytest.raises(TypeError, match="rngs"):
        jnnx.Conv(3, 4, 3, rngs=0)
    layer = jnnx.Conv(3, 4, 3, rngs=rngs)
    with pytest.raises(ValueError, match=r"x: expected rank 4 \(N, H, W, C\) for a 2-D Conv"):
        layer(jnp.ones((2, 5, 3)))
    with pytest.raises(ValueError, match="built for 3 features"):
        layer(jnp.ones((2, 5, 5, 2)))


@pytest.mark.parametrize(
    ("kernel_size", "spatial_dims", "multiplier", "window"),
    [(3, None, 1, (3, 3)), (3, 1, 2, (3,)), (3, 3, 3, (3, 3, 3)), ((2, 5), None, 2, (2, 5))],
)
def test_depthwise_conv_kernel_shape(kernel_size, spatial_dims, multiplier, window):
    layer = jnnx.DepthwiseConv(
        4, kernel_size, depth_multiplier=multiplier, spatial_dims=spatial_dims, rngs=nnx.Rngs(0)
    )
    assert layer.kernel.shape == (*window, 1, 4 * multiplier)
    assert layer.bias.shape == (4 * multiplier,)
    assert layer.features == 4 * multiplier


@pytest.mark.parametrize("spatial_rank", [1, 2, 3])
def test_depthwise_conv_matches_torch_grouped_conv(torch, rng, spatial_rank):
    c_in, multiplier = 3, 2
    window = (3, 2, 3)[:spatial_rank]
    stride, dilation = (2, 1, 1)[:spatial_rank], (1, 2, 1)[:spatial_rank]
    layer = jnnx.DepthwiseConv(
        c_in,
        window,
        depth_multiplier=multiplier,
        stride=stride,
        padding=1,
        dilation=dilation,
        bias_init=init.normal(1.0),
        rngs=nnx.Rngs(0),
    )
    x = jnp.asarray(rng.normal(size=(2, *(7, 6, 5)[:spatial_rank], c_in)), jnp.float32)
    conv = getattr(torch.nn, f"Conv{spatial_rank}d")(
        c_in, c_in * multiplier, window, stride, 1, dilation, groups=c_in
    ).double()
    with torch.no_grad():
        kernel = np.asarray(layer.kernel[...])
        axes = (spatial_rank + 1, spatial_rank, *range(spatial_rank))
        conv.weight.copy_(torch.tensor(np.transpose(kernel, axes)))
        conv.bias.copy_(torch.tensor(np.asarray(layer.bias[...])))
        nchw = torch.tensor(np.moveaxis(np.asarray(x), -1, 1)).double()
        expected = np.moveaxis(conv(nchw).numpy(), 1, -1)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-4, atol=1e-4)


def test_depthwise_conv_default_initializer_is_conv_with_groups():
    layer = jnnx.DepthwiseConv(8, 3, depth_multiplier=2, rngs=nnx.Rngs(3))
    grouped = jnnx.Conv(8, 16, 3, groups=8, rngs=nnx.Rngs(3))
    np.testing.assert_array_equal(layer.kernel[...], grouped.kernel[...])
    wide = jnnx.DepthwiseConv(256, 5, depth_multiplier=2, use_bias=False, rngs=nnx.Rngs(0))
    assert wide.bias is None
    np.testing.assert_allclose(np.std(wide.kernel[...]), np.sqrt(2 / 25), rtol=0.03)


@pytest.mark.parametrize(
    ("multiplier", "error", "message"),
    [
        (0, ValueError, r"depth_multiplier: expected a positive int, got 0"),
        (-2, ValueError, r"depth_multiplier: expected a positive int, got -2"),
        (2.0, TypeError, r"depth_multiplier: expected a positive int, got 2.0"),
        (True, TypeError, r"depth_multiplier: expected a positive int, got True"),
        ("2", TypeError, r"depth_multiplier: expected a positive int, got '2'"),
    ],
)
def test_depthwise_conv_refuses_a_bad_depth_multiplier_as_the_linen_twin(
    multiplier, error, message
):
    with pytest.raises(error, match=f"^{message}$") as info:
        jnnx.DepthwiseConv(2, 3, depth_multiplier=multiplier, rngs=nnx.Rngs(0))
    linen = nn.DepthwiseConv(3, depth_multiplier=multiplier)
    with pytest.raises(error) as linen_info:
        linen.init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))
    assert str(linen_info.value).startswith(str(info.value))


def test_depthwise_conv_checks_its_arguments_and_input():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match="in_features: expected a positive int, got 0"):
        jnnx.DepthwiseConv(0, 3, rngs=rngs)
    with pytest.raises(ValueError, match="spatial_dims"):
        jnnx.DepthwiseConv(3, (3, 3), spatial_dims=3, rngs=rngs)
    with pytest.raises(TypeError, match="rngs: DepthwiseConv"):
        jnnx.DepthwiseConv(3, 3, rngs=None)
    layer = jnnx.DepthwiseConv(3, 3, depth_multiplier=2, rngs=rngs)
    with pytest.raises(ValueError, match=r"x: expected rank 4 \(N, H, W, C\) for a 2-D Depth"):
        layer(jnp.ones((2, 5, 3)))
    with pytest.raises(ValueError, match="built for 3 features"):
        layer(jnp.ones((2, 5, 5, 6)))


@pytest.mark.parametrize(
    "build",
    [
        lambda r: jnnx.Conv(3, 4, 3, use_bias="no", rngs=r),
        lambda r: jnnx.DepthwiseConv(3, 3, use_bias=1, rngs=r),
        lambda r: jnnx.ConvTranspose(3, 4, 3, use_bias=None, rngs=r),
        lambda r: jnnx.Dense(3, 4, use_bias="no", rngs=r),
        lambda r: jnnx.LocallyConnected(3, 4, 3, input_size=(5, 5), use_bias=1, rngs=r),
    ],
)
def test_use_bias_must_be_a_bool_as_in_the_linen_twin(build):
    with pytest.raises(TypeError, match="^use_bias: expected a Python bool, got "):
        build(nnx.Rngs(0))


@pytest.mark.parametrize("dtype", [jnp.int32, "foo"])
def test_a_non_floating_compute_dtype_is_a_type_error(dtype):
    # refused at construction, as every setting of an NNX module (it was at the first call)
    with pytest.raises(TypeError, match="dtype: expected None or a floating dtype"):
        jnnx.Conv(3, 2, 3, dtype=dtype, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bad", [5, 0, "he_normal", jnp.ones(3)])
@pytest.mark.parametrize(
    "build",
    [
        lambda r, **kw: jnnx.Conv(3, 4, 3, rngs=r, **kw),
        lambda r, **kw: jnnx.DepthwiseConv(3, 3, rngs=r, **kw),
        lambda r, **kw: jnnx.ConvTranspose(3, 4, 3, rngs=r, **kw),
        lambda r, **kw: jnnx.Dense(3, 4, rngs=r, **kw),
        lambda r, **kw: jnnx.LocallyConnected(3, 4, 3, input_size=(5, 5), rngs=r, **kw),
    ],
)
@pytest.mark.parametrize("name", ["kernel_init", "bias_init"])
def test_a_non_callable_initializer_is_named_as_in_the_linen_twin(build, name, bad):
    with pytest.raises(TypeError, match=f"^{name}: expected an initializer init\\(key, shape"):
        build(nnx.Rngs(0), **{name: bad})


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (init.he_normal, TypeError, r"cannot take those three arguments"),
        (jax.nn.initializers.he_normal, TypeError, r"got function .* uncalled"),
        (lambda key, shape, dtype: jnp.zeros((2,), dtype), ValueError, r"got shape \(2,\)"),
    ],
)
def test_a_factory_passed_uncalled_or_a_wrong_shape_is_named_as_in_the_linen_twin(
    bad, error, message
):
    for name in ["kernel_init", "bias_init"]:
        with pytest.raises(error, match=f"^{name}: expected .*{message}"):
            jnnx.Conv(3, 4, 3, **{name: bad}, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "layer",
    [
        lambda: jnnx.Conv(3, 4, (9, 9), rngs=nnx.Rngs(0)),
        lambda: jnnx.DepthwiseConv(3, 9, rngs=nnx.Rngs(0)),
        lambda: jnnx.Conv(3, 4, 3, dilation=4, rngs=nnx.Rngs(0)),
    ],
    ids=["Conv", "DepthwiseConv", "dilated"],
)
def test_a_window_larger_than_the_input_is_named_kernel_size(layer):
    # it was named `w`, F.conv's argument, which a module's user never typed
    with pytest.raises(ValueError, match=r"^kernel_size: the dilated window 9 \(kernel"):
        layer()(jnp.ones((1, 5, 5, 3)))


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda r: jnnx.Conv(3, 4, 3, stride=0, rngs=r), ValueError, "stride: every entry"),
        (lambda r: jnnx.Conv(3, 4, 3, dilation=0, rngs=r), ValueError, "dilation: every entry"),
        (lambda r: jnnx.Conv(3, 4, 3, padding="FULL", rngs=r), ValueError, "padding: expected"),
        (lambda r: jnnx.Conv(3, 4, 3, padding=(1, 1, 1), rngs=r), ValueError, "padding: "),
        (lambda r: jnnx.Conv(3, 4, 3, padding_mode="mirror", rngs=r), ValueError, "padding_mode"),
        (lambda r: jnnx.Conv(3, 4, 3, flip="yes", rngs=r), TypeError, "flip: expected a Python"),
        (lambda r: jnnx.DepthwiseConv(3, 3, stride=-1, rngs=r), ValueError, "stride: every"),
        (lambda r: jnnx.DepthwiseConv(3, 3, padding_mode=0, rngs=r), TypeError, "padding_mode"),
        (
            lambda r: jnnx.ConvTranspose(3, 4, 3, stride=2, output_padding=3, rngs=r),
            ValueError,
            r"output_padding: each entry must be smaller than the stride",
        ),
        (lambda r: jnnx.ConvTranspose(3, 4, 3, output_padding=-1, rngs=r), ValueError, "output_"),
        (lambda r: jnnx.ConvTranspose(3, 4, 3, padding="SAME", rngs=r), ValueError, "padding: "),
    ],
)
def test_every_setting_is_checked_at_construction(build, error, message):
    # these were accepted until the first call (an NNX module builds its parameters at once)
    with pytest.raises(error, match=f"^{message}"):
        build(nnx.Rngs(0))


@pytest.mark.parametrize(
    "build",
    [
        lambda r: jnnx.Conv(3, 4, (7, 7), stride=2, padding=3, rngs=r),
        lambda r: jnnx.Conv(3, 4, 5, padding="SAME", padding_mode="reflect", dilation=3, rngs=r),
        lambda r: jnnx.Conv(3, 4, 3, padding=((2, 0), (0, 2)), padding_mode="circular", rngs=r),
        lambda r: jnnx.Conv(3, 4, (3,), stride=5, padding=10, padding_mode="reflect", rngs=r),
        lambda r: jnnx.DepthwiseConv(3, (3, 3, 3), padding=(1, 2, 3), dtype="bfloat16", rngs=r),
        lambda r: jnnx.ConvTranspose(3, 4, 4, stride=2, padding=1, output_padding=1, rngs=r),
        lambda r: jnnx.ConvTranspose(3, 4, 3, padding=5, dilation=3, rngs=r),
    ],
)
def test_the_construction_checks_accept_any_valid_setting(build):
    build(nnx.Rngs(0))
    nnx.eval_shape(lambda: build(nnx.Rngs(0)))  # abstract construction checks them too
