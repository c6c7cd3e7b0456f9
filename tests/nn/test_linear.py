"""jcnn.nn.Dense and Flatten against NumPy and PyTorch's flatten order."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import init, nn


def test_dense_forward_and_gradient_match_numpy(rng):
    layer = nn.Dense(5, bias_init=init.normal(1.0))
    x = jnp.asarray(rng.normal(size=(3, 2, 7)), jnp.float32)
    params = layer.init(jax.random.key(0), x)["params"]
    assert params["kernel"].shape == (7, 5) and params["bias"].shape == (5,)

    def loss(params, x):
        return jnp.sum(layer.apply({"params": params}, x) ** 2)

    y = jax.jit(layer.apply)({"params": params}, x)
    w, b, xn = (np.asarray(a, np.float64) for a in (params["kernel"], params["bias"], x))
    expected = xn @ w + b
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    upstream = 2 * expected
    np.testing.assert_allclose(
        g_params["kernel"], np.einsum("abi,abo->io", xn, upstream), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(g_params["bias"], upstream.sum((0, 1)), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(g_x, upstream @ w.T, rtol=1e-4, atol=1e-4)


def test_dense_without_bias_and_default_he_init():
    layer = nn.Dense(256, use_bias=False)
    params = layer.init(jax.random.key(3), jnp.ones((1, 512)))["params"]
    assert set(params) == {"kernel"}
    assert abs(float(params["kernel"].std()) / np.sqrt(2 / 512) - 1) < 0.03
    with pytest.raises(TypeError, match="features"):
        nn.Dense(2.5).init(jax.random.key(0), jnp.ones((1, 3)))


def test_flatten_is_channels_last_and_relates_to_torch_order(torch, rng):
    x = rng.normal(size=(2, 3, 4, 5)).astype(np.float32)  # (N, H, W, C)
    y = nn.Flatten().apply({}, jnp.asarray(x))
    np.testing.assert_array_equal(y, x.reshape(2, 60))
    assert y[0, 1] == x[0, 0, 0, 1]  # C varies fastest
    torch_flat = torch.flatten(torch.tensor(x).permute(0, 3, 1, 2), 1).numpy()  # NCHW, W fastest
    np.testing.assert_array_equal(
        torch_flat, np.asarray(y).reshape(2, 3, 4, 5).transpose(0, 3, 1, 2).reshape(2, 60)
    )


def test_flatten_of_an_empty_batch_keeps_its_feature_count():
    # reshape(0, -1) is undetermined: it raised a raw ZeroDivisionError (in every model's head)
    assert nn.Flatten().apply({}, jnp.ones((0, 3, 4, 5))).shape == (0, 60)
    from jcnn.models import FastMNISTNet

    model = FastMNISTNet(widths=(2, 4))
    variables = model.init(jax.random.key(0), jnp.ones((1, 28, 28, 1)))
    assert model.apply(variables, jnp.ones((0, 28, 28, 1))).shape == (0, 10)


def test_variables_built_for_another_input_size_are_refused_naming_x():
    layer = nn.Dense(3)
    variables = layer.init(jax.random.key(0), jnp.ones((2, 4)))
    with pytest.raises(
        ValueError, match=r"x: shape \(2, 5\) does not fit .*kernel has shape \(4, 3\).* \(5, 3\)"
    ):
        layer.apply(variables, jnp.ones((2, 5)))


def test_a_non_floating_compute_dtype_is_a_type_error():
    with pytest.raises(TypeError, match="dtype: expected None or a floating dtype"):
        nn.Dense(2, dtype=jnp.int32).init(jax.random.key(0), jnp.ones((1, 3)))
