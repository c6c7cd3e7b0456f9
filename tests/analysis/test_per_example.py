"""Tests of jcnn.analysis.per_example against a Python loop over examples."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcnn import functional as F
from jcnn import nn
from jcnn.analysis import (
    clip_per_example,
    dp_aggregate,
    dp_sgd,
    per_example_grad_norms,
    per_example_grads,
)

_MODEL = nn.Sequential(
    [nn.Conv(3, 3, padding=1), nn.ReLU(), nn.MaxPool(2), nn.Flatten(), nn.Dense(4)]
)


def _loss(params, batch):
    images, labels = batch
    return F.cross_entropy(_MODEL.apply({"params": params}, images), labels)


@pytest.fixture
def problem(rng):
    images = jnp.asarray(rng.normal(size=(5, 6, 6, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, size=5), jnp.int32)
    params = _MODEL.init(jax.random.key(0), images)["params"]
    return params, (images, labels)


def _loop(params, batch):
    """Reference: one jax.grad per example, stacked."""
    images, labels = batch
    grad = jax.jit(jax.grad(_loss))
    grads = [grad(params, (images[i : i + 1], labels[i : i + 1])) for i in range(len(labels))]
    return jax.tree.map(lambda *g: np.stack(g), *grads)


def _assert_trees_close(a, b, tol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


def test_per_example_grads_match_loop_and_chunks(problem):
    params, batch = problem
    expected = _loop(params, batch)
    got = jax.jit(lambda p, b: per_example_grads(_loss, p, b))(params, batch)
    _assert_trees_close(got, expected)
    chunked = jax.jit(lambda p, b: per_example_grads(_loss, p, b, chunk_size=2))(params, batch)
    # 5 examples in chunks of 2: the last chunk is partial.
    _assert_trees_close(chunked, expected)
    # A mean loss: the batch gradient is the mean of the per-example ones.
    full = jax.grad(_loss)(params, batch)
    _assert_trees_close(jax.tree.map(lambda g: g.mean(0), got), full)


def test_per_example_grad_norms_match_loop(problem):
    params, batch = problem
    grads = _loop(params, batch)
    expected = np.sqrt(
        sum((leaf.reshape(leaf.shape[0], -1) ** 2).sum(1) for leaf in jax.tree.leaves(grads))
    )
    np.testing.assert_allclose(per_example_grad_norms(_loss, params, batch), expected, rtol=1e-5)
    assert len(set(np.round(expected, 4))) == len(expected)  # distinct examples, distinct norms


def test_dp_aggregate_clips_each_example_then_averages(problem):
    params, batch = problem
    grads = _loop(params, batch)
    norms = np.sqrt(sum((g.reshape(5, -1) ** 2).sum(1) for g in jax.tree.leaves(grads)))
    clip = float(np.median(norms))  # some examples are clipped, some are not
    factors = np.minimum(1.0, clip / norms)
    expected = jax.tree.map(lambda g: sum(g[i] * factors[i] for i in range(5)) / 5, grads)
    tx = dp_aggregate(clip, noise_multiplier=0.0)
    per_example = per_example_grads(_loss, params, batch)
    got, _ = tx.update(per_example, tx.init(params))
    _assert_trees_close(got, expected)
    clipped_norms = np.sqrt(
        sum(
            (np.asarray(g).reshape(5, -1) ** 2).sum(1)
            for g in jax.tree.leaves(clip_per_example(per_example, clip))
        )
    )
    np.testing.assert_allclose(clipped_norms, np.minimum(norms, clip), rtol=1e-5)


def test_dp_noise_has_the_stated_scale_and_is_reproducible():
    clip, sigma, size = 0.5, 2.0, 8
    zeros = {"w": jnp.zeros((size, 20_000))}
    tx = dp_aggregate(clip, sigma, seed=3)
    state = tx.init(None)
    first, state = tx.update(zeros, state)
    second, _ = tx.update(zeros, state)
    expected_std = sigma * clip / size
    for noise in (first["w"], second["w"]):
        assert abs(float(noise.std()) / expected_std - 1) < 0.03
        assert abs(float(noise.mean())) < 4 * expected_std / np.sqrt(20_000)
    assert not np.allclose(first["w"], second["w"])  # fresh noise at each step
    again, _ = dp_aggregate(clip, sigma, seed=3).update(zeros, tx.init(None))
    np.testing.assert_array_equal(again["w"], first["w"])


def test_dp_sgd_step_is_sgd_on_the_private_gradient(problem):
    params, batch = problem
    per_example = per_example_grads(_loss, params, batch)
    tx = dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, seed=7)
    updates, _ = tx.update(per_example, tx.init(params), params)
    private, _ = dp_aggregate(1.0, 1.0, seed=7).update(per_example, tx.init(params)[0])
    _assert_trees_close(updates, jax.tree.map(lambda g: -0.1 * g, private))
    new_params = optax.apply_updates(params, updates)
    assert jax.tree.structure(new_params) == jax.tree.structure(params)


def test_input_checks(problem):
    params, (images, labels) = problem
    with pytest.raises(ValueError, match="batch: leaves disagree on the batch size"):
        per_example_grads(_loss, params, (images, labels[:3]))
    with pytest.raises(ValueError, match="chunk_size: expected a positive int or None, got 0"):
        per_example_grads(_loss, params, (images, labels), chunk_size=0)
    with pytest.raises(ValueError, match="l2_norm_clip: expected a positive number"):
        dp_aggregate(0.0, 1.0)
    with pytest.raises(ValueError, match="noise_multiplier: expected a number >= 0"):
        dp_sgd(0.1, 1.0, -1.0)
