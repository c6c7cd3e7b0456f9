"""jcnn.nn.Conv / ConvTranspose against PyTorch and against F.conv / F.conv_transpose."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import functional as F
from jcnn import init, nn

# (spatial sizes, kernel, stride, padding, dilation, groups, c_in, features, use_bias, mode)
CONV_CASES = [
    ((9,), (3,), 2, 1, 1, 1, 3, 4, True, "zeros"),
    ((7, 6), (3, 2), (1, 2), (1, 0), (2, 1), 2, 4, 6, True, "reflect"),
    ((5, 6), (5, 5), 1, 2, 1, 1, 1, 3, False, "circular"),
    ((4, 5, 6), (2, 3, 3), (2, 1, 1), 1, 1, 3, 3, 3, True, "replicate"),
]


def _torch_weight(torch, kernel):
    """HWIO (*window, I, O) to PyTorch's (O, I, *window)."""
    n = kernel.ndim - 2
    return torch.tensor(np.transpose(np.asarray(kernel), (n + 1, n, *range(n))))


def _to_nchw(torch, x):
    n = x.ndim - 2
    return torch.tensor(np.transpose(np.asarray(x), (0, n + 1, *range(1, n + 1))))


def _from_nchw(t):
    a = t.detach().numpy()
    return np.transpose(a, (0, *range(2, a.ndim), 1))


@pytest.mark.parametrize("case", CONV_CASES)
def test_conv_forward_and_gradient_match_torch(torch, rng, case):
    sizes, kernel, stride, padding, dilation, groups, c_in, features, use_bias, mode = case
    n = len(sizes)
    layer = nn.Conv(
        features,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        use_bias=use_bias,
        padding_mode=mode,
        bias_init=init.normal(1.0),
    )
    x = jnp.asarray(rng.normal(size=(2, *sizes, c_in)), jnp.float32)
    variables = layer.init(jax.random.key(0), x)
    params = variables["params"]
    assert params["kernel"].shape == (*kernel, c_in // groups, features)
    assert ("bias" in params) == use_bias

    def loss(params, x):
        y = layer.apply({"params": params}, x)
        return jnp.sum(y * jnp.cos(y)), y

    (_, y), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, x
    )

    conv = getattr(torch.nn, f"Conv{n}d")(
        c_in,
        features,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=use_bias,
        padding_mode=mode,
    ).double()
    with torch.no_grad():
        conv.weight.copy_(_torch_weight(torch, params["kernel"]))
        if use_bias:
            conv.bias.copy_(torch.tensor(np.asarray(params["bias"])))
    xt = _to_nchw(torch, x).double().requires_grad_(True)
    yt = conv(xt)
    (yt * torch.cos(yt)).sum().backward()

    np.testing.assert_allclose(y, _from_nchw(yt), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_x, _from_nchw(xt.grad), rtol=1e-4, atol=1e-4)
    expected_gw = np.transpose(conv.weight.grad.numpy(), (*range(2, n + 2), 1, 0))
    np.testing.assert_allclose(g_params["kernel"], expected_gw, rtol=1e-4, atol=1e-3)
    if use_bias:
        np.testing.assert_allclose(g_params["bias"], conv.bias.grad.numpy(), rtol=1e-4, atol=1e-3)


def test_conv_equals_functional_op_and_flip(rng):
    x = jnp.asarray(rng.normal(size=(2, 6, 7, 3)), jnp.float32)
    for flip in (False, True):
        layer = nn.Conv(5, (3, 2), stride=(2, 1), padding="SAME", flip=flip)
        params = layer.init(jax.random.key(1), x)["params"]
        op = F.convolve if flip else F.conv
        expected = op(x, params["kernel"], params["bias"], stride=(2, 1), padding="SAME")
        np.testing.assert_array_equal(layer.apply({"params": params}, x), expected)


def test_conv_int_kernel_takes_rank_from_input_and_default_init_is_he(rng):
    layer = nn.Conv(128, 3)
    for shape in [(1, 8, 4), (1, 8, 8, 64), (1, 4, 4, 4, 2)]:
        params = jax.eval_shape(layer.init, jax.random.key(0), jnp.zeros(shape))["params"]
        n = len(shape) - 2
        assert params["kernel"].shape == (3,) * n + (shape[-1], 128)
    kernel = layer.init(jax.random.key(2), jnp.zeros((1, 8, 8, 64)))["params"]["kernel"]
    assert abs(float(kernel.std()) / np.sqrt(2 / (9 * 64)) - 1) < 0.03


def test_conv_dtype_and_param_dtype():
    layer = nn.Conv(4, (3, 3), padding=1, dtype=jnp.bfloat16)
    x = jnp.ones((1, 5, 5, 2))
    variables = layer.init(jax.random.key(0), x)
    assert variables["params"]["kernel"].dtype == jnp.float32
    assert layer.apply(variables, x).dtype == jnp.bfloat16


def test_conv_input_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"x: expected rank 4 \(N, H, W, C\) for a 2-D kernel"):
        nn.Conv(4, (3, 3)).init(jax.random.key(0), jnp.ones((2, 5, 5)))
    with pytest.raises(ValueError, match="groups: input channels \\(3\\) must be divisible"):
        nn.Conv(4, 3, groups=2).init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    with pytest.raises(ValueError, match="features"):
        nn.Conv(0, 3).init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    with pytest.raises(TypeError, match="x: expected a floating-point array"):
        nn.Conv(4, 3).init(jax.random.key(0), jnp.ones((1, 5, 5, 3), jnp.int32))


@pytest.mark.parametrize(
    "layer",
    [nn.Conv(4, 3), nn.DepthwiseConv(3), nn.ConvTranspose(4, 3), nn.LocallyConnected(4, 3)],
    ids=lambda layer: type(layer).__name__,
)
def test_variables_built_for_other_channels_are_refused_naming_x(layer):
    variables = layer.init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    with pytest.raises(ValueError, match=r"x: shape \(1, 5, 5, 2\) does not fit .* kernel has"):
        layer.apply(variables, jnp.ones((1, 5, 5, 2)))


def test_conv_transpose_matches_torch_and_functional(torch, rng):
    c_in, features, groups = 4, 6, 2
    layer = nn.ConvTranspose(
        features,
        (3, 2),
        stride=(2, 3),
        padding=(1, 0),
        output_padding=(1, 2),
        groups=groups,
        bias_init=init.normal(1.0),
    )
    x = jnp.asarray(rng.normal(size=(2, 5, 4, c_in)), jnp.float32)
    params = layer.init(jax.random.key(0), x)["params"]
    assert params["kernel"].shape == (3, 2, c_in, features // groups)

    def loss(params, x):
        y = layer.apply({"params": params}, x)
        return jnp.sum(y**2), y

    (_, y), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, x
    )
    expected_fn = F.conv_transpose(
        x,
        params["kernel"],
        params["bias"],
        stride=(2, 3),
        padding=(1, 0),
        output_padding=(1, 2),
        groups=groups,
    )
    np.testing.assert_allclose(y, expected_fn, rtol=1e-6, atol=1e-6)

    weight = torch.tensor(np.transpose(np.asarray(params["kernel"]), (2, 3, 0, 1))).double()
    weight.requires_grad_(True)
    xt = _to_nchw(torch, x).double().requires_grad_(True)
    yt = torch.nn.functional.conv_transpose2d(
        xt,
        weight,
        torch.tensor(np.asarray(params["bias"])).double(),
        stride=(2, 3),
        padding=(1, 0),
        output_padding=(1, 2),
        groups=groups,
    )
    (yt**2).sum().backward()
    np.testing.assert_allclose(y, _from_nchw(yt), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_x, _from_nchw(xt.grad), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(
        g_params["kernel"], np.transpose(weight.grad.numpy(), (2, 3, 0, 1)), rtol=1e-4, atol=1e-3
    )


# (spatial sizes, kernel, stride, padding, dilation, c_in, depth_multiplier, use_bias, mode)
DEPTHWISE_CASES = [
    ((11,), (3,), 2, 1, 1, 5, 3, True, "zeros"),
    ((7, 9), (3, 3), 1, 1, 1, 3, 1, False, "zeros"),
    ((9, 8), (5, 3), (2, 1), (2, 1), (1, 2), 4, 2, True, "reflect"),
    ((6, 7), (2, 3), 1, "SAME", (1, 2), 2, 3, True, "zeros"),
    ((5, 6, 7), (3, 2, 3), (2, 1, 1), (1, 0, 2), (1, 2, 1), 3, 2, True, "circular"),
]


@pytest.mark.filterwarnings("ignore:Using padding='same'")  # torch's note on its own copy
@pytest.mark.parametrize("case", DEPTHWISE_CASES)
def test_depthwise_conv_matches_torch_grouped_conv(torch, rng, case):
    sizes, kernel, stride, padding, dilation, c_in, multiplier, use_bias, mode = case
    n = len(sizes)
    layer = nn.DepthwiseConv(
        kernel,
        depth_multiplier=multiplier,
        stride=stride,
        padding=padding,
        dilation=dilation,
        padding_mode=mode,
        use_bias=use_bias,
        bias_init=init.normal(1.0),
    )
    x = jnp.asarray(rng.normal(size=(2, *sizes, c_in)), jnp.float32)
    params = layer.init(jax.random.key(0), x)["params"]
    features = c_in * multiplier
    assert params["kernel"].shape == (*kernel, 1, features)
    assert sorted(params) == (["bias", "kernel"] if use_bias else ["kernel"])

    def loss(params, x):
        y = layer.apply({"params": params}, x)
        return jnp.sum(y * jnp.cos(y)), y

    (_, y), (g_params, g_x) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        params, x
    )

    # PyTorch's depthwise conv, its weight (C_in * multiplier, 1, *window) moved as Conv's.
    conv = getattr(torch.nn, f"Conv{n}d")(
        c_in,
        features,
        kernel,
        stride=stride,
        padding=padding.lower() if isinstance(padding, str) else padding,
        dilation=dilation,
        groups=c_in,
        bias=use_bias,
        padding_mode=mode,
    ).double()
    with torch.no_grad():
        conv.weight.copy_(_torch_weight(torch, params["kernel"]))
        if use_bias:
            conv.bias.copy_(torch.tensor(np.asarray(params["bias"])))
    xt = _to_nchw(torch, x).double().requires_grad_(True)
    yt = conv(xt)
    (yt * torch.cos(yt)).sum().backward()

    np.testing.assert_allclose(y, _from_nchw(yt), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_x, _from_nchw(xt.grad), rtol=1e-4, atol=1e-4)
    expected_gw = np.transpose(conv.weight.grad.numpy(), (*range(2, n + 2), 1, 0))
    np.testing.assert_allclose(g_params["kernel"], expected_gw, rtol=1e-4, atol=1e-3)
    if use_bias:
        np.testing.assert_allclose(g_params["bias"], conv.bias.grad.numpy(), rtol=1e-4, atol=1e-3)


def test_depthwise_conv_output_channels_are_in_pytorch_order(rng):
    # Output channel c * multiplier + j is filter j of input channel c: zeroing input channel c
    # changes exactly those outputs.
    c_in, multiplier = 3, 2
    layer = nn.DepthwiseConv(3, depth_multiplier=multiplier, padding=1, use_bias=False)
    x = jnp.asarray(rng.normal(size=(1, 5, 5, c_in)), jnp.float32)
    variables = layer.init(jax.random.key(0), x)
    y = layer.apply(variables, x)
    for c in range(c_in):
        changed = np.abs(layer.apply(variables, x.at[..., c].set(0.0)) - y).max(axis=(0, 1, 2))
        np.testing.assert_array_equal(changed > 0, np.arange(c_in * multiplier) // multiplier == c)


def test_depthwise_conv_equals_conv_with_groups_and_default_init_is_he(rng):
    x = jnp.asarray(rng.normal(size=(2, 6, 7, 4)), jnp.float32)
    layer = nn.DepthwiseConv((3, 2), depth_multiplier=3, stride=(2, 1), dilation=(1, 2))
    grouped = nn.Conv(12, (3, 2), stride=(2, 1), dilation=(1, 2), groups=4)
    params = layer.init(jax.random.key(1), x)["params"]
    # The same default initializer as Conv with groups = C_in: the same draws.
    for name, value in grouped.init(jax.random.key(1), x)["params"].items():
        np.testing.assert_array_equal(params[name], value)
    np.testing.assert_array_equal(
        layer.apply({"params": params}, x), grouped.apply({"params": params}, x)
    )
    big = nn.DepthwiseConv(5, depth_multiplier=2, use_bias=False)
    kernel = big.init(jax.random.key(2), jnp.zeros((1, 8, 8, 256)))["params"]["kernel"]
    assert kernel.shape == (5, 5, 1, 512)
    assert abs(float(kernel.std()) / np.sqrt(2 / 25) - 1) < 0.03  # fan_in = prod(window)


def test_depthwise_conv_int_kernel_takes_rank_from_input_and_keeps_dtypes():
    layer = nn.DepthwiseConv(3, depth_multiplier=2, padding=1, dtype=jnp.bfloat16)
    for shape in [(1, 8, 3), (1, 6, 6, 2), (1, 4, 4, 4, 1)]:
        x = jnp.ones(shape)
        variables = layer.init(jax.random.key(0), x)
        assert variables["params"]["kernel"].shape == (3,) * (len(shape) - 2) + (1, 2 * shape[-1])
        assert variables["params"]["kernel"].dtype == jnp.float32
        y = layer.apply(variables, x)
        assert y.shape == (*shape[:-1], 2 * shape[-1]) and y.dtype == jnp.bfloat16


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
def test_depthwise_conv_refuses_a_bad_depth_multiplier(multiplier, error, message):
    layer = nn.DepthwiseConv(3, depth_multiplier=multiplier)
    with pytest.raises(error, match=f"^{message}(?![^\\n])"):  # the value is the last word
        layer.init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))


def test_depthwise_conv_input_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"x: expected rank 4 \(N, H, W, C\) for a 2-D kernel"):
        nn.DepthwiseConv((3, 3)).init(jax.random.key(0), jnp.ones((2, 5, 5)))
    with pytest.raises(TypeError, match="x: expected a floating-point array"):
        nn.DepthwiseConv(3).init(jax.random.key(0), jnp.ones((1, 5, 5, 3), jnp.int32))
    with pytest.raises(ValueError, match=r"x: expected at least one channel .* \(1, 5, 5, 0\)"):
        nn.DepthwiseConv(3).init(jax.random.key(0), jnp.ones((1, 5, 5, 0)))
    with pytest.raises(ValueError, match=r"kernel_size: .*got \(3, 0\)"):
        nn.DepthwiseConv((3, 0)).init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    with pytest.raises(
        ValueError, match=r"kernel_size: the dilated window 5 \(kernel 3, dilation 2\)"
    ):
        nn.DepthwiseConv(3, dilation=2).init(jax.random.key(0), jnp.ones((1, 4, 4, 3)))


def test_depthwise_conv_is_the_same_on_the_xla_and_onednn_backends(onednn, rng):
    from jcnn import native

    layer = nn.DepthwiseConv((3, 3), depth_multiplier=2, stride=2, padding=1)
    x = jnp.asarray(rng.normal(size=(3, 9, 8, 5)), jnp.float32)
    params = layer.init(jax.random.key(0), x)["params"]

    def loss(params, x):
        y = layer.apply({"params": params}, x)
        return jnp.sum(jnp.sin(y)), y

    results = {}
    for backend in ("xla", "onednn"):
        with native.conv_backend_scope(backend):
            # A fresh function per backend: the scope is read when tracing.
            step = jax.jit(jax.value_and_grad(lambda p, x: loss(p, x), (0, 1), has_aux=True))
            results[backend] = step(params, x)
    for got, want in zip(
        jax.tree.leaves(results["onednn"]), jax.tree.leaves(results["xla"]), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# The bad inputs through the modules: each raises the same exception, with the same
# message, on every convolution backend, eagerly and under jit.
MODULE_BAD_INPUTS = {
    "depth multiplier of 0": (
        nn.DepthwiseConv(3, depth_multiplier=0),
        (1, 5, 5, 2),
        ValueError,
        r"depth_multiplier: expected a positive int, got 0",
    ),
    "groups not dividing the input channels": (
        nn.Conv(6, 3, groups=2),
        (1, 5, 5, 3),
        ValueError,
        r"groups: input channels \(3\) must be divisible by groups \(2\)",
    ),
    "groups not dividing the features": (
        nn.ConvTranspose(5, 3, groups=2),
        (1, 5, 5, 4),
        ValueError,
        r"groups: features \(5\) must be divisible by groups \(2\)",
    ),
    "output_padding not smaller than the stride or the dilation": (
        nn.ConvTranspose(4, (3, 3), stride=2, dilation=(1, 2), output_padding=(1, 2)),
        (1, 5, 5, 2),
        ValueError,
        r"output_padding: each entry must be smaller than the stride or the dilation",
    ),
}


@pytest.mark.parametrize("backend", ["xla", "onednn"])
@pytest.mark.parametrize("case", list(MODULE_BAD_INPUTS), ids=list(MODULE_BAD_INPUTS))
def test_bad_module_input_raises_the_same_error_on_every_backend(case, backend, request):
    from jcnn import native

    if backend == "onednn":
        request.getfixturevalue("onednn")  # skips where the library is not built
    layer, shape, error, message = MODULE_BAD_INPUTS[case]
    x = jnp.ones(shape)
    raised = set()
    for scope in ("xla", backend):
        for init_fn in (layer.init, jax.jit(lambda key, x: layer.init(key, x))):
            with native.conv_backend_scope(scope), pytest.raises(error, match=message) as info:
                init_fn(jax.random.key(0), x)
            raised.add((type(info.value), str(info.value)))
    assert len(raised) == 1, raised


@pytest.mark.parametrize("dtype", [jnp.int32, "foo"])
@pytest.mark.parametrize(
    "make",
    [
        lambda dtype: nn.Conv(2, 3, dtype=dtype),
        lambda dtype: nn.ConvTranspose(2, 3, dtype=dtype),
        lambda dtype: nn.DepthwiseConv(3, dtype=dtype),
    ],
)
def test_a_non_floating_compute_dtype_is_a_type_error(make, dtype):
    # it used to surface as flax's "Dtype must be inexact" or NumPy's "data type not understood"
    with pytest.raises(TypeError, match="dtype: expected None or a floating dtype"):
        make(dtype).init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))


@pytest.mark.parametrize("bad", [5, 0, "he_normal", jnp.ones(3)])
@pytest.mark.parametrize(
    ("make", "x_shape"),
    [
        (lambda **kw: nn.Conv(4, 3, **kw), (1, 5, 5, 3)),
        (lambda **kw: nn.DepthwiseConv(3, **kw), (1, 5, 5, 3)),
        (lambda **kw: nn.ConvTranspose(4, 3, **kw), (1, 5, 5, 3)),
        (lambda **kw: nn.Dense(4, **kw), (2, 3)),
        (lambda **kw: nn.LocallyConnected(4, 3, **kw), (1, 5, 5, 3)),
    ],
)
@pytest.mark.parametrize("name", ["kernel_init", "bias_init"])
def test_a_non_callable_initializer_is_named(make, x_shape, name, bad):
    # 5 was "'int' object is not callable" from inside Flax; 0 was silently the default
    layer = make(**{name: bad})
    with pytest.raises(TypeError, match=f"^{name}: expected an initializer init\\(key, shape"):
        layer.init(jax.random.key(0), jnp.ones(x_shape))


_WRONG_INITIALIZERS = [
    (init.he_normal, TypeError, r"cannot take those three arguments; .* jcnn.init.he_normal\(\)"),
    (jax.nn.initializers.he_normal, TypeError, r"to return an array, got function .* uncalled"),
    (lambda key, shape, dtype: jnp.zeros((2,), dtype), ValueError, r"got shape \(2,\)"),
]


@pytest.mark.parametrize(("bad", "error", "message"), _WRONG_INITIALIZERS)
def test_a_factory_passed_uncalled_or_a_wrong_shape_is_named(bad, error, message):
    # a jcnn factory gave "takes 0 positional arguments"; a jax one stored a function as the kernel
    for name in ["kernel_init", "bias_init"]:
        layer = nn.Conv(4, 3, **{name: bad})
        with pytest.raises(error, match=f"^{name}: expected .*{message}"):
            layer.init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
    layer = nn.Conv(4, 3, kernel_init=init.he_normal(), bias_init=jax.nn.initializers.normal())
    assert layer.init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))["params"]["bias"].shape == (4,)


@pytest.mark.parametrize(
    "layer",
    [
        nn.Conv(features=4, kernel_size=(9, 9)),
        nn.DepthwiseConv(kernel_size=9),
        nn.Conv(features=4, kernel_size=3, dilation=4),
    ],
    ids=["Conv", "DepthwiseConv", "dilated"],
)
def test_a_window_larger_than_the_input_is_named_kernel_size(layer):
    # it was named `w`, F.conv's argument, which a module's user never typed
    with pytest.raises(ValueError, match=r"^kernel_size: the dilated window 9 \(kernel"):
        layer.init(jax.random.key(0), jnp.ones((1, 5, 5, 3)))
