"""jcnn.train.state: ``TrainState.create`` initializes like ``model.init`` on every path."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import models, nn
from jcnn.train import TrainState, optimizer
from jcnn.train import state as state_module


class _ListModel(linen.Module):
    """A model with an unhashable attribute (a list): compiled per call, not cached."""

    widths: list

    @linen.compact
    def __call__(self, x, train: bool = False):
        for width in self.widths:
            x = nn.BatchNorm()(nn.Dense(width)(x), train=train)
        return x


@pytest.mark.parametrize("optimized", [False, True], ids=["unoptimized", "optimized"])
@pytest.mark.parametrize(
    "model, shape",
    [
        (models.LeNet5(), (1, 28, 28, 1)),
        (models.resnet20(num_classes=7), (1, 8, 8, 3)),
        (_ListModel(widths=[5, 3]), (1, 4)),
    ],
    ids=["lenet5", "resnet20", "unhashable"],
)
def test_create_initializes_as_model_init(model, shape, optimized, monkeypatch, rng):
    # the size rule picks the program; either must give model.init's variables
    monkeypatch.setattr(state_module, "_UNOPTIMIZED_INIT_UP_TO", 0 if optimized else 10**12)
    sample = jnp.asarray(rng.normal(size=shape), jnp.float32)
    key = jax.random.key(3)
    state = TrainState.create(model, optimizer("sgd", 0.1), key, sample)
    init_key, dropout_key = jax.random.split(jax.random.key_data(key))
    expected = model.init({"params": init_key, "dropout": init_key}, sample, train=False)
    assert jax.tree.structure(state.params) == jax.tree.structure(expected["params"])
    for got, want in zip(
        jax.tree.leaves(state.params), jax.tree.leaves(expected["params"]), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    stats = expected.get("batch_stats", {})
    assert jax.tree.structure(state.batch_stats) == jax.tree.structure(stats)
    for got, want in zip(jax.tree.leaves(state.batch_stats), jax.tree.leaves(stats), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(state.key, dropout_key)
    assert int(state.step) == 0


def test_create_runs_inside_a_callers_jit_and_eval_shape():
    # the init program's compiler options made a nested jit fail: `compiler_options` can only be
    # passed to top-level `jax.jit`
    model, sample = models.LeNet5(), jnp.zeros((1, 28, 28, 1))
    key = jax.random.key(5)
    eager = TrainState.create(model, optimizer("sgd", 0.1), key, sample)
    jitted = jax.jit(lambda k: TrainState.create(model, optimizer("sgd", 0.1), k, sample))(key)
    for got, want in zip(jax.tree.leaves(jitted), jax.tree.leaves(eager), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    shapes = jax.eval_shape(
        lambda k: TrainState.create(model, optimizer("sgd", 0.1), k, sample), key
    )
    assert jax.tree.map(lambda a: a.shape, shapes.params) == jax.tree.map(jnp.shape, eager.params)


def test_create_names_a_bad_key():
    model, sample, tx = models.LeNet5(), jnp.zeros((1, 28, 28, 1)), optimizer("sgd", 0.1)
    for key, error, says in (
        (0, TypeError, "key: expected a jax.random key .*, got int"),
        (np.zeros(2, np.int32), TypeError, "key: expected a jax.random key .*, got dtype int32"),
        (jax.random.split(jax.random.PRNGKey(0), 3), ValueError, r"batch of keys of shape \(3,\)"),
    ):
        with pytest.raises(error, match=says):
            TrainState.create(model, tx, key, sample)


def test_the_optimizer_state_owns_its_arrays(rng):
    # optax.add_noise (noisy_sgd) returns the key it was given as its state; the train step's
    # buffer donation then deleted the caller's key ("Array has been deleted" at the next fit)
    import optax

    from jcnn.train import train_step

    held = jax.random.key(7)
    tx = optax.chain(
        optax.GradientTransformation(lambda params: held, lambda u, s, p=None: (u, s)),
        optax.sgd(0.1),
    )
    model = _ListModel(widths=[3])
    sample = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    state = TrainState.create(model, tx, jax.random.key(0), sample)
    state, _ = train_step(state, (sample, jnp.array([0, 1, 2, 0])))
    state, _ = train_step(state, (sample, jnp.array([0, 1, 2, 0])))
    assert not held.is_deleted()
    np.testing.assert_array_equal(jax.random.key_data(held), jax.random.key_data(jax.random.key(7)))


def test_create_names_a_model_class_given_for_an_instance():
    # the class itself passed the duck-type check and failed in Flax with
    # InvalidInstanceModuleError, a message that does not name the argument
    sample, tx = jnp.zeros((1, 28, 28, 1)), optimizer("sgd", 0.1)
    with pytest.raises(TypeError, match=r"model: expected a Flax module instance such as "):
        TrainState.create(models.LeNet5, tx, jax.random.PRNGKey(0), sample)


class _NoTrainModel(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(2)(x)


def test_create_names_a_model_whose_call_takes_no_train():
    # Flax failed with "NoTrainModel.__call__() got an unexpected keyword argument 'train'",
    # naming neither the argument nor what jcnn's training needs
    sample, tx = jnp.zeros((1, 3)), optimizer("sgd", 0.1)
    with pytest.raises(
        TypeError,
        match=r"model: expected a module whose __call__ takes \(x, train: bool\) .*got "
        r"_NoTrainModel.__call__\(self, x\)",
    ):
        TrainState.create(_NoTrainModel(), tx, jax.random.PRNGKey(0), sample)
    TrainState.create(_ListModel(widths=[2]), tx, jax.random.PRNGKey(0), sample)  # train=False


def test_create_takes_optax_multisteps_as_fit_does(rng):
    # fit accepts optax.MultiSteps (gradient accumulation); create refused it as "not an
    # optax.GradientTransformation", so a hand-written loop could not accumulate gradients
    import optax

    from jcnn.train import train_step

    model = _ListModel(widths=[3])
    sample = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    labels = jnp.array([0, 1, 2, 0])
    state = TrainState.create(model, optax.MultiSteps(optax.sgd(0.1), 2), jax.random.key(0), sample)
    start = jax.tree.map(np.asarray, state.params)  # the step donates the state
    state, _ = train_step(state, (sample, labels))
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(state.params), strict=True):
        np.testing.assert_array_equal(a, b)  # the first of 2 accumulated steps applies nothing
    state, _ = train_step(state, (sample, labels))
    assert any(
        not np.array_equal(a, b)
        for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(state.params), strict=True)
    )
    with pytest.raises(TypeError, match="tx: expected an optax.GradientTransformation or optax"):
        TrainState.create(model, optax.sgd, jax.random.key(0), sample)


def test_create_names_an_nnx_model():
    # a native jcnn.nnx model was "expected a Flax module, got Sequential" (it is one); a to_nnx
    # model passed the duck-type check and failed deep in Flax with a TraceContextError
    from flax import nnx

    from jcnn import nnx as jnnx

    sample, tx = jnp.zeros((1, 4, 4, 1)), optimizer("sgd", 0.1)
    native = jnnx.Sequential([jnnx.Flatten(), jnnx.Dense(16, 2, rngs=nnx.Rngs(0))])
    bridged = jnnx.to_nnx(nn.Sequential([nn.Flatten(), nn.Dense(2)]), sample, rngs=nnx.Rngs(0))
    for model in (native, bridged):
        with pytest.raises(
            TypeError,
            match=rf"model: expected a Flax Linen module .*got the NNX module "
            rf"{type(model).__name__}; train an NNX model with nnx.Optimizer",
        ):
            TrainState.create(model, tx, jax.random.key(0), sample)
