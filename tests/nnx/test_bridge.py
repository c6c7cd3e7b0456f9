"""jcnn.nnx.to_nnx: zoo models (a CIFAR ResNet with BatchNorm, LeNet-5) as NNX modules over
flax.nnx.bridge give the Linen model's outputs and statistics given the same variables, and train
with nnx.Optimizer under nnx.jit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict

from jcnn import functional as F
from jcnn import models
from jcnn import nnx as jnnx


def _cifar_resnet(**kwargs):
    """resnet20's network (CIFAR stem, option-A shortcuts, three stages) with one block a stage:
    the same layers (identity and padded shortcuts, strided and unstrided blocks) as resnet20's
    two more blocks a stage, a third of the program to compile."""
    options = {"stem": "cifar", "widths": (16, 32, 64), "shortcut": "pad", **kwargs}
    return models.ResNet((1, 1, 1), num_classes=4, **options)


ZOO = [
    pytest.param(_cifar_resnet, (8, 12, 12, 3), id="cifar_resnet"),
    pytest.param(
        lambda: _cifar_resnet(bn_unbiased_running_var=True),
        (8, 12, 12, 3),
        id="cifar_resnet-unbiased-running-var",
    ),
    pytest.param(lambda: models.LeNet5(num_classes=4), (8, 28, 28, 1), id="lenet5"),
]


def _assert_trees_close(actual, expected, **tolerance):
    actual, expected = flatten_dict(actual), flatten_dict(expected)
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(actual[key], value, err_msg=str(key), **tolerance)


@pytest.mark.parametrize(("make", "shape"), ZOO)
def test_to_nnx_trains_and_matches_the_linen_model(make, shape, rng):
    linen_model = make()
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, shape[0]), jnp.int32)
    model = jnnx.to_nnx(linen_model, x, rngs=nnx.Rngs(0))
    variables = jnnx.linen_variables(model)
    # Initialized as linen_model.init would, with the Linen names.
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(
        jnp.shape, jax.eval_shape(linen_model.init, jax.random.key(0), x)
    )
    evaluate = nnx.jit(lambda model, x: model(x, train=False))
    linen_evaluate = jax.jit(lambda variables, x: linen_model.apply(variables, x, train=False))
    np.testing.assert_array_equal(evaluate(model, x), linen_evaluate(variables, x))

    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x, train=True, mutable=["batch_stats"])
            return F.cross_entropy(logits, y)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    @jax.jit
    def linen_loss_and_stats(variables, x, y):
        logits, updates = linen_model.apply(variables, x, train=True, mutable=["batch_stats"])
        return F.cross_entropy(logits, y), updates

    losses = []
    for _ in range(8):
        before = jnnx.linen_variables(model)
        expected_loss, expected_updates = linen_loss_and_stats(before, x, y)
        losses.append(float(step(model, optimizer, x, y)))
        np.testing.assert_allclose(losses[-1], expected_loss, rtol=1e-5)
        if "batch_stats" in before:  # the module holds the statistics of the training call
            _assert_trees_close(
                jnnx.linen_variables(model)["batch_stats"],
                expected_updates["batch_stats"],
                rtol=1e-5,
                atol=1e-6,
            )
    assert losses[-1] < 0.5 * losses[0]
    variables = jnnx.linen_variables(model)
    np.testing.assert_array_equal(evaluate(model, x), linen_evaluate(variables, x))


def test_to_nnx_checks_its_arguments():
    x = jnp.zeros((1, 28, 28, 1))
    with pytest.raises(TypeError, match="linen_model"):
        jnnx.to_nnx(jnnx.Flatten(), x, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match="rngs"):
        jnnx.to_nnx(models.LeNet5(), x, rngs=0)
    # an array that is not a key was Flax's "Invalid rng value", naming no argument
    with pytest.raises(TypeError, match=r"^rngs: expected a jax.random key .*got dtype float32"):
        jnnx.to_nnx(models.LeNet5(), x, rngs=jnp.ones(2))
    with pytest.raises(ValueError, match=r"^rngs: expected a single jax.random key, got a batch"):
        jnnx.to_nnx(models.LeNet5(), x, rngs=jax.random.split(jax.random.key(0)))
    assert jnnx.to_nnx(models.LeNet5(), x, rngs=jax.random.PRNGKey(0))(x).shape == (1, 10)


def test_load_linen_variables_refuses_a_mismatch_and_leaves_the_module_as_it_was():
    model = jnnx.Sequential(
        [jnnx.Conv(2, 3, 3, rngs=nnx.Rngs(0)), jnnx.BatchNorm(3, rngs=nnx.Rngs(0))]
    )
    before = jax.tree.map(np.asarray, jnnx.linen_variables(model))
    good = jax.tree.map(lambda a: a + 1, before)
    wrong_shape = jax.tree.map(lambda a: a, good)
    wrong_shape["params"]["layers_0"]["kernel"] = np.zeros((3, 3, 2, 4), np.float32)
    missing = {"params": good["params"]}
    extra = {**good, "params": {**good["params"], "layers_2": {"kernel": np.zeros(3)}}}
    for variables, message in (
        (wrong_shape, "layers_0/kernel has shape"),
        (missing, "no batch_stats/layers_1/mean"),
        (extra, "params/layers_2/kernel"),
    ):
        with pytest.raises(ValueError, match=message):
            jnnx.load_linen_variables(model, variables)
        _assert_trees_close(jnnx.linen_variables(model), before, rtol=0)
    with pytest.raises(TypeError, match="variables"):
        jnnx.load_linen_variables(model, [1, 2])
    with pytest.raises(TypeError, match="module"):
        jnnx.linen_variables({"params": {}})
    jnnx.load_linen_variables(model, good)
    _assert_trees_close(jnnx.linen_variables(model), good, rtol=0)


def test_to_nnx_names_a_class_and_an_nnx_module():
    # "got type" and "got Flatten" (an NNX module named like its Linen twin) said neither
    x = jnp.zeros((1, 28, 28, 1))
    with pytest.raises(TypeError, match=r"^linen_model: .* LeNet5\(\.\.\.\), got the class"):
        jnnx.to_nnx(models.LeNet5, x, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"^linen_model: .*got the NNX module Flatten"):
        jnnx.to_nnx(jnnx.Flatten(), x, rngs=nnx.Rngs(0))
