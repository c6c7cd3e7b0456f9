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
