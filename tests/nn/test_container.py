"""jcnn.nn.Sequential and Residual: composition, `train` forwarding, use inside user models."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import functional as F
from jcnn import nn


def test_sequential_forwards_train_to_batchnorm_and_dropout(rng):
    net = nn.Sequential(
        [nn.Dense(6), nn.BatchNorm(momentum=0.5), F.relu, nn.Dropout(0.5), nn.Dense(2)]
    )
    x = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
    variables = net.init(jax.random.key(0), x, train=False)
    assert set(variables["params"]) == {"layers_0", "layers_1", "layers_4"}

    y_eval, same = net.apply(variables, x, train=False, mutable=["batch_stats"])
    np.testing.assert_array_equal(same["batch_stats"]["layers_1"]["mean"], np.zeros(6))
    p = variables["params"]
    h = F.relu(
        F.batch_norm(
            x @ p["layers_0"]["kernel"] + p["layers_0"]["bias"][None],
            p["layers_1"]["scale"],
            p["layers_1"]["bias"],
            F.BatchNormState(jnp.zeros(6), jnp.ones(6)),
            train=False,
        )[0]
    )
    np.testing.assert_allclose(
        y_eval, h @ p["layers_4"]["kernel"] + p["layers_4"]["bias"][None], rtol=1e-5, atol=1e-6
    )

    y_train, updates = jax.jit(
        lambda v, x: net.apply(
            v, x, train=True, mutable=["batch_stats"], rngs={"dropout": jax.random.key(1)}
        )
    )(variables, x)
    hidden = np.asarray(x @ p["layers_0"]["kernel"] + p["layers_0"]["bias"][None])
    np.testing.assert_allclose(
        updates["batch_stats"]["layers_1"]["mean"], 0.5 * hidden.mean(0), rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(y_train, y_eval)
    with pytest.raises(ValueError, match="train: layer 1 \\(BatchNorm\\)"):
        net.apply(variables, x)


def test_residual_identity_and_projection(rng):
    x = jnp.asarray(rng.normal(size=(2, 5, 5, 3)), jnp.float32)
    same = nn.Residual(nn.Conv(3, 3, padding=1))
    params = same.init(jax.random.key(0), x)["params"]
    expected = F.conv(x, params["body"]["kernel"], params["body"]["bias"], padding=1) + x
    np.testing.assert_allclose(
        jax.jit(same.apply)({"params": params}, x), expected, rtol=1e-5, atol=1e-5
    )

    projected = nn.Residual(
        nn.Sequential([nn.Conv(4, 3, stride=2, padding=1), nn.BatchNorm()]),
        projection=nn.Conv(4, 1, stride=2),
    )
    variables = projected.init(jax.random.key(1), x, train=False)
    y, updates = projected.apply(variables, x, train=True, mutable=["batch_stats"])
    assert y.shape == (2, 3, 3, 4)
    assert not np.allclose(updates["batch_stats"]["body"]["layers_1"]["mean"], 0)
    with pytest.raises(ValueError, match="body: output shape"):
        nn.Residual(nn.Conv(4, 3, padding=1)).init(jax.random.key(0), x)


class _UserModel(linen.Module):
    """A user's own Flax model mixing jcnn modules and plain Flax."""

    @linen.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), padding="SAME")(x)
        x = nn.BatchNorm()(x, train)
        x = linen.relu(x)
        x = nn.Dropout(0.1)(x, train)
        x = nn.GlobalAvgPool()(x)
        return linen.Dense(2)(x)


def test_modules_inside_a_user_flax_model_train_under_jit(rng):
    model = _UserModel()
    x = jnp.asarray(rng.normal(size=(4, 6, 6, 1)), jnp.float32)
    labels = jnp.array([0, 1, 1, 0])
    variables = model.init(jax.random.key(0), x, train=False)

    @jax.jit
    def step(params, batch_stats, key):
        def loss(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                x,
                train=True,
                mutable=["batch_stats"],
                rngs={"dropout": key},
            )
            return F.cross_entropy(logits, labels), updates["batch_stats"]

        (value, stats), grads = jax.value_and_grad(loss, has_aux=True)(params)
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return params, stats, value

    params, stats = variables["params"], variables["batch_stats"]
    losses = []
    for _ in range(5):
        params, stats, value = step(params, stats, jax.random.key(0))
        losses.append(float(value))
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (
            nn.Sequential(nn.Dense(3)),
            "layers: expected a sequence of modules or functions, got Dense",
        ),
        (nn.Sequential([F.relu, 3]), "layers: entry 1 is not callable: 3"),
        (nn.Residual(None), "body: expected a module or function, got None"),
        (nn.Residual(F.relu, projection=2), "projection: expected a module, function or None"),
    ],
)
def test_container_arguments_are_checked_as_in_the_nnx_twin(module, message):
    with pytest.raises(TypeError, match=message):
        module.init(jax.random.key(0), jnp.ones((2, 3)))
