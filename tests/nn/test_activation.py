"""jcnn.nn activation modules: PReLU against PyTorch, Maxout against NumPy, the parameter-free
ones against their functional ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import functional as F
from jcnn import nn


@pytest.mark.parametrize("channelwise", [False, True])
def test_prelu_forward_and_gradient_match_torch(torch, rng, channelwise):
    x = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
    layer = nn.PReLU(channelwise=channelwise)
    params = layer.init(jax.random.key(0), x)["params"]
    assert params["alpha"].shape == ((5,) if channelwise else ())
    np.testing.assert_array_equal(params["alpha"], np.full(params["alpha"].shape, 0.25))
    params = {
        "alpha": params["alpha"]
        + jnp.asarray(rng.uniform(0, 0.5, size=params["alpha"].shape), jnp.float32)
    }

    def loss(params, x):
        return jnp.sum(layer.apply({"params": params}, x) ** 2)

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
    weight = torch.tensor(np.asarray(params["alpha"], np.float64).reshape(-1)).requires_grad_(True)
    xt = torch.tensor(np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))).requires_grad_(True)
    yt = torch.nn.functional.prelu(xt, weight)
    (yt**2).sum().backward()
    y = layer.apply({"params": params}, x)
    np.testing.assert_allclose(y, np.transpose(yt.detach().numpy(), (0, 2, 3, 1)), rtol=1e-6)
    np.testing.assert_allclose(g_x, np.transpose(xt.grad.numpy(), (0, 2, 3, 1)), rtol=1e-5)
    np.testing.assert_allclose(
        g_params["alpha"], weight.grad.numpy().reshape(params["alpha"].shape), rtol=1e-5
    )


def test_maxout_learned_unit_is_max_of_affine_pieces(rng):
    x = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    layer = nn.Maxout(num_pieces=3, features=2)
    params = layer.init(jax.random.key(0), x)["params"]
    kernel, bias = (np.asarray(params["linear"][k], np.float64) for k in ("kernel", "bias"))
    assert kernel.shape == (6, 6) and bias.shape == (6,)
    pieces = (np.asarray(x, np.float64) @ kernel + bias).reshape(4, 2, 3)
    y = jax.jit(layer.apply)({"params": params}, x)
    np.testing.assert_allclose(y, pieces.max(-1), rtol=1e-5, atol=1e-5)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(layer.apply({"params": p}, x))))(params)
    # Each output's gradient reaches exactly its winning piece's column.
    assert int((np.abs(np.asarray(grads["linear"]["bias"])) > 0).sum()) <= 4 * 2
    assert np.asarray(grads["linear"]["bias"]).sum() == pytest.approx(8.0)
    plain = nn.Maxout(num_pieces=2)
    assert plain.init(jax.random.key(0), x) == {}
    np.testing.assert_array_equal(plain.apply({}, x), F.maxout(x, 2))


def test_maxout_learned_unit_takes_dtype_and_param_dtype(rng):
    """A float64 model (jax_enable_x64) can hold a learned Maxout: its Dense had float32
    parameters whatever the model's dtype; a bfloat16 compute dtype reaches the output too."""
    x = rng.normal(size=(4, 6))
    with jax.enable_x64(True):
        layer = nn.Maxout(num_pieces=3, features=2, param_dtype=jnp.float64)
        params = layer.init(jax.random.key(0), jnp.asarray(x))["params"]
        assert {v.dtype for v in jax.tree.leaves(params)} == {jnp.dtype(jnp.float64)}
        y = layer.apply({"params": params}, jnp.asarray(x))
        assert y.dtype == jnp.float64
    kernel, bias = (np.asarray(params["linear"][k]) for k in ("kernel", "bias"))
    pieces = (x @ kernel + bias).reshape(4, 2, 3)
    np.testing.assert_allclose(y, pieces.max(-1), rtol=1e-13)
    half = nn.Maxout(num_pieces=3, features=2, dtype=jnp.bfloat16)
    variables = half.init(jax.random.key(0), jnp.asarray(x, jnp.float32))
    assert half.apply(variables, jnp.asarray(x, jnp.float32)).dtype == jnp.bfloat16


def test_parameter_free_activations_equal_functional(rng):
    x = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    cases = [
        (nn.ReLU(), F.relu),
        (nn.LeakyReLU(0.2), lambda x: F.leaky_relu(x, 0.2)),
        (nn.ELU(0.5), lambda x: F.elu(x, 0.5)),
        (nn.GELU(), F.gelu),
        (nn.Tanh(), F.tanh),
        (nn.Sigmoid(), F.sigmoid),
        (nn.Rectify(), F.rectify),
        (nn.Swish(), F.swish),
        (nn.Softplus(), F.softplus),
    ]
    for layer, op in cases:
        assert layer.init(jax.random.key(0), x) == {}
        np.testing.assert_array_equal(layer.apply({}, x), op(x))
    np.testing.assert_array_equal(nn.Rectify().apply({}, x), np.abs(np.asarray(x)))


def test_gelu_and_softplus_modules_take_the_options_of_their_op(rng):
    # the modules could not express F.gelu's approximate or F.softplus's beta and threshold
    x = jnp.asarray(rng.normal(scale=3.0, size=(3, 5)), jnp.float32)
    tanh_form = nn.GELU(approximate=True).apply({}, x)
    np.testing.assert_array_equal(tanh_form, F.gelu(x, approximate=True))
    assert not np.array_equal(tanh_form, F.gelu(x))
    for beta, threshold in [(2.0, 1.0), (0.5, None)]:
        layer = nn.Softplus(beta=beta, threshold=threshold)
        np.testing.assert_array_equal(layer.apply({}, x), F.softplus(x, beta, threshold))
    expected = np.where(2 * x > 1, x, np.log1p(np.exp(2.0 * np.asarray(x, np.float64))) / 2)
    np.testing.assert_allclose(nn.Softplus(2.0, 1.0).apply({}, x), expected, rtol=1e-6)
    with pytest.raises(ValueError, match="beta: expected a finite number > 0, got 0"):
        nn.Softplus(beta=0).apply({}, x)
    with pytest.raises(TypeError, match="approximate: expected a Python bool, got 1"):
        nn.GELU(approximate=1).apply({}, x)


@pytest.mark.parametrize("name", ["Mish", "SELU", "SiLU"])
def test_mish_selu_silu_modules_match_torch(torch, rng, name):
    x = jnp.asarray(rng.normal(scale=3.0, size=(2, 4, 3, 5)), jnp.float32)
    layer = getattr(nn, name)()
    assert layer.init(jax.random.key(0), x) == {}
    reference = {
        "Mish": torch.nn.functional.mish,
        "SELU": torch.nn.functional.selu,
        "SiLU": torch.nn.functional.silu,
    }[name]
    xt = torch.tensor(np.asarray(x, np.float64)).requires_grad_(True)
    yt = reference(xt)
    (yt**2).sum().backward()
    y, g = jax.value_and_grad(lambda v: jnp.sum(layer.apply({}, v) ** 2))(x)
    np.testing.assert_allclose(layer.apply({}, x), yt.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g, xt.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_every_functional_activation_has_a_module():
    functional_names = {
        "elu",
        "gelu",
        "leaky_relu",
        "maxout",
        "mish",
        "prelu",
        "rectify",
        "relu",
        "selu",
        "sigmoid",
        "silu",
        "softplus",
        "swish",
        "tanh",
    }
    from jcnn.functional import activation

    assert set(activation.__all__) == functional_names
    modules = {name.lower() for name in nn.__all__}
    modules = {m.replace("leakyrelu", "leaky_relu") for m in modules}
    assert functional_names <= modules, functional_names - modules


def test_prelu_variables_built_for_other_channels_are_refused_naming_x():
    layer = nn.PReLU(channelwise=True)
    variables = layer.init(jax.random.key(0), jnp.ones((2, 3)))
    with pytest.raises(
        ValueError, match=r"x: shape \(2, 4\) does not fit .*alpha has shape \(3,\)"
    ):
        layer.apply(variables, jnp.ones((2, 4)))
