"""Tests of jcnn.analysis.dp: the private gradient (clip, sum, noise, average) and pad_batch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcnn import functional as F
from jcnn import nn
from jcnn.analysis import clip_per_example, pad_batch, per_example_grads, private_grad

_MODEL = nn.Sequential(
    [nn.Conv(3, 3, padding=1), nn.GroupNorm(3), nn.ReLU(), nn.Flatten(), nn.Dense(4)]
)


def _loss(params, batch):
    images, labels = batch
    return F.cross_entropy(_MODEL.apply({"params": params}, images), labels)


@pytest.fixture
def problem(rng):
    images = jnp.asarray(rng.normal(size=(6, 5, 5, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, size=6), jnp.int32)
    params = _MODEL.init(jax.random.key(0), images)["params"]
    return params, (images, labels)


# jitted once for the module: eagerly, one small program per operation (per_example_grads runs
# unjitted in tests/analysis/test_per_example.py and test_batch_norm.py)
_PER_EXAMPLE = jax.jit(lambda params, batch: per_example_grads(_loss, params, batch))


def _clipped_sum(params, batch, clip, weights):
    clipped = clip_per_example(_PER_EXAMPLE(params, batch), clip)
    return jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), clipped)


@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_private_grad_is_clipped_sum_plus_seeded_noise_over_denominator(problem, method):
    params, batch = problem
    norms = np.sqrt(
        sum((g.reshape(6, -1) ** 2).sum(1) for g in jax.tree.leaves(_PER_EXAMPLE(params, batch)))
    )
    clip = float(np.median(norms))
    weights = jnp.array([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
    key = jax.random.key(7)

    @jax.jit
    def private(params, batch, key, sigma):
        return private_grad(
            _loss,
            params,
            batch,
            key,
            l2_norm_clip=clip,
            noise_multiplier=sigma,
            weights=weights,
            denominator=5.0,
            method=method,
        )

    expected = jax.tree.map(lambda s: s / 5.0, _clipped_sum(params, batch, clip, weights))
    clean, got_norms = private(params, batch, key, 0.0)
    np.testing.assert_allclose(got_norms, norms, rtol=2e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), clean, expected
    )
    # the noise: reproducible from the key, N(0, (sigma C / denominator)^2) per coordinate
    noisy, _ = private(params, batch, key, 2.0)
    again, _ = private(params, batch, key, 2.0)
    other, _ = private(params, batch, jax.random.key(8), 2.0)
    jax.tree.map(np.testing.assert_array_equal, noisy, again)
    noise = np.concatenate(
        [
            np.ravel(n - c)
            for n, c in zip(jax.tree.leaves(noisy), jax.tree.leaves(clean), strict=True)
        ]
    )
    assert noise.size > 100
    np.testing.assert_allclose(noise.std(), 2.0 * clip / 5.0, rtol=0.2)
    assert abs(noise.mean()) < 0.2 * noise.std()
    assert not np.allclose(jax.tree.leaves(noisy)[0], jax.tree.leaves(other)[0])


def test_private_grad_drives_any_optax_optimizer(problem):
    params, batch = problem
    tx = optax.adam(1e-2)
    state = tx.init(params)
    losses = []

    @jax.jit  # one program: eagerly each of the 30 steps dispatched every operation
    def step(params, state, key):
        grad, _ = private_grad(_loss, params, batch, key, l2_norm_clip=10.0, noise_multiplier=0.01)
        updates, state = tx.update(grad, state, params)
        params = optax.apply_updates(params, updates)
        return params, state, _loss(params, batch)

    for index in range(30):
        params, state, loss = step(params, state, jax.random.key(index))
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_concrete_array_settings_closed_over_by_jit_are_taken(problem):
    # jnp.float32(1.0) closed over by a jitted function was compared as an array, traced there:
    # TracerBoolConversionError, though the same call ran eagerly
    params, batch = problem
    key = jax.random.key(0)
    settings = dict(l2_norm_clip=jnp.float32(1.0), noise_multiplier=jnp.float32(0.5))
    eager, _ = private_grad(_loss, params, batch, key, **settings, denominator=jnp.float32(6))
    jitted, _ = jax.jit(
        lambda p, b: private_grad(_loss, p, b, key, **settings, denominator=jnp.float32(6))
    )(params, batch)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    negative = jnp.float32(-1.0)
    with pytest.raises(ValueError, match="l2_norm_clip: expected a finite number > 0"):
        jax.jit(
            lambda p, b: private_grad(_loss, p, b, key, l2_norm_clip=negative, noise_multiplier=1)
        )(params, batch)


def test_private_grad_bad_input(problem):
    params, batch = problem
    key = jax.random.key(0)
    kw = dict(l2_norm_clip=1.0, noise_multiplier=1.0)
    for clip in (0.0, math.inf, math.nan, "1.0", True):
        with pytest.raises(ValueError, match=f"l2_norm_clip: .*{clip}"):
            private_grad(_loss, params, batch, key, l2_norm_clip=clip, noise_multiplier=1.0)
    concrete = private_grad(
        _loss, params, batch, key, l2_norm_clip=jnp.float32(1.0), noise_multiplier=1.0
    )[0]
    assert jax.tree.structure(concrete) == jax.tree.structure(params)  # a jax scalar is a number
    with pytest.raises(ValueError, match="l2_norm_clip: expected a finite number > 0, got Array"):
        private_grad(_loss, params, batch, key, l2_norm_clip=jnp.ones(2), noise_multiplier=1.0)
    for noise in (-0.5, math.inf, math.nan):  # infinite noise would make every gradient inf
        with pytest.raises(ValueError, match=f"noise_multiplier: .*{noise}"):
            private_grad(_loss, params, batch, key, l2_norm_clip=1.0, noise_multiplier=noise)
    with pytest.raises(ValueError, match="leaves disagree"):
        private_grad(_loss, params, (batch[0], batch[1][:4]), key, **kw)
    with pytest.raises(ValueError, match="loss_fn: expected a real floating scalar"):
        private_grad(lambda p, b: jnp.stack([_loss(p, b)] * 2), params, batch, key, **kw)
    with pytest.raises(ValueError, match="loss_fn: expected a real floating scalar"):
        private_grad(
            lambda p, b: jnp.stack([_loss(p, b)] * 2),
            params,
            batch,
            key,
            **kw,
            method="materialize",
        )
    with pytest.raises(ValueError, match="denominator: required"):
        private_grad(_loss, params, batch, key, **kw, weights=jnp.ones(6))
    with pytest.raises(ValueError, match="weights"):
        private_grad(_loss, params, batch, key, **kw, weights=jnp.ones(4), denominator=4)
    for bad in (2.0, -1.0, np.nan):
        weights = jnp.ones(6).at[2].set(bad)
        with pytest.raises(ValueError, match=r"weights: expected values in \[0, 1\]"):
            private_grad(_loss, params, batch, key, **kw, weights=weights, denominator=6)
    # a string array failed inside NumPy's comparison; a complex one compared by its real part
    for bad in (np.array(["1"] * 6), jnp.ones(6, jnp.complex64)):
        with pytest.raises(TypeError, match=f"weights: expected real numbers, got {bad.dtype}"):
            private_grad(_loss, params, batch, key, **kw, weights=bad, denominator=6)
    for denominator in (0, math.inf, math.nan):  # an infinite one would zero the gradient
        with pytest.raises(ValueError, match=f"denominator: .*{denominator}"):
            private_grad(_loss, params, batch, key, **kw, denominator=denominator)
    with pytest.raises(ValueError, match="method"):
        private_grad(_loss, params, batch, key, **kw, method="fast")
    with pytest.raises(TypeError, match="key"):
        private_grad(_loss, params, batch, 0, **kw)
    with pytest.raises(ValueError, match="key: expected a single jax.random key"):
        private_grad(_loss, params, batch, jax.random.split(key, 2), **kw)
    # a raw uint32 key (jax.random.PRNGKey) draws the noise of the typed key with its data
    raw = private_grad(_loss, params, batch, jax.random.PRNGKey(0), **kw)
    typed = private_grad(
        _loss, params, batch, jax.random.wrap_key_data(jax.random.PRNGKey(0)), **kw
    )
    jax.tree.map(np.testing.assert_array_equal, raw, typed)


def test_a_traced_denominator_that_is_no_scalar_is_named(problem):
    """Under jit its value is unknown, but its shape is: a (2,) one failed in a broadcast."""
    params, batch = problem
    step = jax.jit(
        lambda d: private_grad(
            _loss,
            params,
            batch,
            jax.random.key(0),
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            denominator=d,
        )
    )
    with pytest.raises(ValueError, match=r"denominator: expected a number .* shape \(2,\)"):
        step(jnp.ones(2))


def test_private_grad_of_an_empty_batch(problem):
    params, (images, labels) = problem
    empty, key = (images[:0], labels[:0]), jax.random.key(0)
    with pytest.raises(ValueError, match="denominator: required for an empty batch"):
        private_grad(_loss, params, empty, key, l2_norm_clip=1.0, noise_multiplier=1.0)
    for method in ("ghost", "materialize"):
        # the noise alone over the expected batch size, as for any other Poisson batch
        grad, norms = private_grad(
            _loss,
            params,
            empty,
            key,
            l2_norm_clip=1.0,
            noise_multiplier=0.0,
            denominator=4,
            method=method,
        )
        assert norms.shape == (0,)
        jax.tree.map(np.testing.assert_array_equal, grad, jax.tree.map(jnp.zeros_like, params))
        noised, _ = private_grad(
            _loss,
            params,
            empty,
            key,
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            denominator=4,
            method=method,
        )
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(noised))


def test_pad_batch():
    batch = (jnp.arange(10.0).reshape(5, 2), jnp.arange(5))
    padded, mask = pad_batch(batch, 4)
    assert padded[0].shape == (8, 2) and padded[1].shape == (8,)
    np.testing.assert_array_equal(padded[0][:5], batch[0])
    np.testing.assert_array_equal(padded[0][5:], 0)
    np.testing.assert_array_equal(mask, [1, 1, 1, 1, 1, 0, 0, 0])
    same, mask = pad_batch(batch, 5)
    assert same[0].shape == (5, 2) and mask.sum() == 5
    assert pad_batch(batch, np.int64(4))[0][0].shape == (8, 2)
    with pytest.raises(ValueError, match="multiple"):
        pad_batch(batch, 0)
    # padded to 2**63 - 1 examples the process aborted inside XLA
    with pytest.raises(ValueError, match=r"^multiple: the mask would have shape \(9223372036854"):
        pad_batch(batch, 2**63 - 1)
    with pytest.raises(ValueError, match="^multiple: the padded batch would have shape"):
        pad_batch(batch, 2**60)  # (2**60, 2) float32: 2**63 bytes


@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_private_grad_padding_with_a_nan_gradient_adds_nothing(method):
    # a zero padding example through x / ||x|| has a NaN gradient; weighted 0 it must add
    # nothing (0 * NaN made the whole private gradient NaN)
    model = nn.Dense(2)
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]

    def loss(p, x):
        return jnp.mean(
            model.apply({"params": p}, x / jnp.linalg.norm(x, axis=-1, keepdims=True)) ** 2
        )

    x = jax.random.normal(jax.random.key(1), (3, 3))
    padded, mask = pad_batch(x, 4)
    key = jax.random.key(2)
    got, _ = private_grad(
        loss,
        params,
        padded,
        key,
        l2_norm_clip=1.0,
        noise_multiplier=0.0,
        weights=mask,
        denominator=3.0,
        method=method,
    )
    want, _ = private_grad(
        loss, params, x, key, l2_norm_clip=1.0, noise_multiplier=0.0, method=method
    )
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["ghost", "materialize"])
def test_train_mode_batch_norm_is_refused_naming_private_grad(method):
    # the refusal named the function private_grad called (ghost_clipped_sum or
    # per_example_grads), whose advice (per_example_grads' axis_name) has no DP guarantee
    model = nn.Sequential([nn.Conv(3, 3), nn.BatchNorm(), nn.Flatten(), nn.Dense(2)])
    images = jnp.ones((3, 4, 4, 1))
    variables = model.init(jax.random.key(0), images, train=False)

    def loss(params, batch):
        out, _ = model.apply(
            {**variables, "params": params}, batch, train=True, mutable=["batch_stats"]
        )
        return jnp.mean(out)

    with pytest.raises(ValueError, match=r"^private_grad: the model computes BatchNorm") as error:
        private_grad(
            loss,
            variables["params"],
            images,
            jax.random.key(1),
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
            method=method,
        )
    assert "(private_grad takes no axis_name)" in str(error.value)
