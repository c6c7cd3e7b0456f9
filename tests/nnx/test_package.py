"""jcnn.nnx used as a whole (jcnn/nnx/__init__.py): a small CNN of jcnn.nnx layers trains with
nnx.Optimizer under nnx.jit in graph mode and in tree mode (the same numbers), gives per-example
gradients through jcnn.analysis, and follows model.train()/model.eval()/nnx.view."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jcnn import analysis
from jcnn import functional as F
from jcnn import nnx as jnnx


class SmallCNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = jnnx.Conv(1, 6, 3, padding=1, rngs=rngs)
        self.bn1 = jnnx.BatchNorm(6, rngs=rngs)
        self.pool = jnnx.MaxPool(2)
        self.conv2 = jnnx.Conv(6, 8, 3, padding=1, rngs=rngs)
        self.flatten = jnnx.Flatten()
        self.dropout = jnnx.Dropout(0.25, rngs=rngs)
        self.dense = jnnx.Dense(8 * 2 * 2, 5, rngs=rngs)

    def __call__(self, x):
        x = self.pool(F.relu(self.bn1(self.conv1(x))))
        x = self.pool(F.relu(self.conv2(x)))
        return self.dense(self.dropout(self.flatten(x)))


def _batch(rng, n=24):
    x = jnp.asarray(rng.normal(size=(n, 9, 10, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 5, n), jnp.int32)
    return x, y


def _graph_step(model, optimizer, x, y):
    def loss_fn(model):
        return F.cross_entropy(model(x), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def _tree_step(model, optimizer, x, y):
    # Tree mode: modules are plain pytrees; differentiate the parameters of a pure function and
    # hand back the rest of the state (running statistics, dropout rng counts) it changed.
    graphdef, params, rest = nnx.split(model, nnx.Param, ..., graph=False)

    def loss_fn(params, rest):
        model = nnx.merge(graphdef, params, rest, copy=True)
        loss = F.cross_entropy(model(x), y)
        return loss, nnx.state(model, nnx.Not(nnx.Param), graph=False)

    (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest)
    nnx.update(model, new_rest)
    optimizer.update(model, grads)
    return loss


def _train(graph: bool, x, y, steps: int):
    model = SmallCNN(rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param, graph=graph)
    step = nnx.jit(_graph_step if graph else _tree_step, graph=graph)
    losses = [float(step(model, optimizer, x, y)) for _ in range(steps)]
    return model, optimizer, losses


def test_small_cnn_trains_in_graph_and_tree_mode_alike(rng):
    x, y = _batch(rng)
    steps = 15
    graph_model, graph_optimizer, graph_losses = _train(True, x, y, steps)
    tree_model, tree_optimizer, tree_losses = _train(False, x, y, steps)

    assert graph_losses[-1] < 0.5 * graph_losses[0]
    np.testing.assert_allclose(tree_losses, graph_losses, rtol=1e-5)
    for a, b in zip(
        jax.tree.leaves(jnnx.linen_variables(tree_model)),
        jax.tree.leaves(jnnx.linen_variables(graph_model)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for model, optimizer in ((graph_model, graph_optimizer), (tree_model, tree_optimizer)):
        assert int(optimizer.step[...]) == steps
        assert int(model.dropout.rngs.count[...]) == steps  # a fresh mask at every step
        assert not np.allclose(model.bn1.mean[...], 0.0)  # running statistics were written back


def test_per_example_grads_of_an_nnx_model_through_analysis(rng):
    model = SmallCNN(rngs=nnx.Rngs(1))
    x, y = _batch(rng, n=5)
    model(x)  # one training call, so that the running statistics are not the initial ones
    model.eval()
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss_fn(params, batch):
        images, labels = batch
        return F.cross_entropy(nnx.merge(graphdef, params, rest, copy=True)(images), labels)

    # jitted: eagerly it dispatches (and compiles) one small program per operation
    per_example = jax.jit(analysis.per_example_grads, static_argnums=0)(loss_fn, params, (x, y))
    one_example_grad = nnx.jit(
        lambda model, image, label: nnx.grad(lambda m: F.cross_entropy(m(image), label))(model)
    )
    for i in range(x.shape[0]):
        expected = one_example_grad(model, x[i : i + 1], y[i : i + 1])
        for got, want in zip(jax.tree.leaves(per_example), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(got[i], want, rtol=2e-5, atol=1e-6)
    batch_grad = jax.jit(jax.grad(loss_fn))(params, (x, y))
    for got, want in zip(jax.tree.leaves(per_example), jax.tree.leaves(batch_grad), strict=True):
        np.testing.assert_allclose(got.mean(axis=0), want, rtol=2e-5, atol=1e-6)


def test_train_eval_and_view_reach_every_layer(rng):
    model = SmallCNN(rngs=nnx.Rngs(2))
    x, _ = _batch(rng, n=6)
    model.eval()
    assert model.bn1.use_running_average and model.dropout.deterministic
    before = np.asarray(model.bn1.mean[...])
    evaluated = model(x)
    np.testing.assert_array_equal(model.bn1.mean[...], before)  # evaluation changes nothing
    np.testing.assert_array_equal(model(x), evaluated)  # and is deterministic

    model.train()
    assert not model.bn1.use_running_average and not model.dropout.deterministic
    view = nnx.view(model, deterministic=True, use_running_average=True)
    np.testing.assert_array_equal(view(x), evaluated)
    assert not model.dropout.deterministic  # a view leaves the model as it was
    trained = model(x)
    assert not np.allclose(trained, evaluated)
    assert not np.allclose(model.bn1.mean[...], before)


def test_a_call_with_train_overrides_the_attributes(rng):
    model = jnnx.Sequential(
        [jnnx.BatchNorm(3, rngs=nnx.Rngs(0)), jnnx.Dropout(0.5, rngs=nnx.Rngs(dropout=1))]
    )
    x = jnp.asarray(rng.normal(2.0, 1.0, size=(8, 3)), jnp.float32)
    model.eval()
    y = model(x, train=True)
    assert not np.allclose(model.layers[0].mean[...], 0.0)
    assert bool((y == 0).any())
    model.train()
    mean = np.asarray(model.layers[0].mean[...])
    y = model(x, train=False)
    np.testing.assert_array_equal(model.layers[0].mean[...], mean)
    np.testing.assert_allclose(
        y, (np.asarray(x) - mean) / np.sqrt(np.asarray(model.layers[0].var[...]) + 1e-5), rtol=1e-5
    )
    with pytest.raises(TypeError, match="train"):
        model(x, train=1)


def test_jcnn_nnx_is_reachable_as_an_attribute_and_refuses_an_old_flax(monkeypatch):
    import importlib
    import sys

    import flax

    import jcnn

    assert jcnn.nnx is jnnx
    assert "nnx" in jcnn.__all__
    with pytest.raises(AttributeError, match="no_such_thing"):
        jcnn.no_such_thing  # noqa: B018
    monkeypatch.setattr(flax, "__version__", "0.10.2")
    monkeypatch.delitem(sys.modules, "jcnn.nnx")
    with pytest.raises(ImportError, match=r"flax>=0.12.*installed: flax 0.10.2"):
        importlib.import_module("jcnn.nnx")
