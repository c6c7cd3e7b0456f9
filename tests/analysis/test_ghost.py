"""Tests of jcnn.analysis.ghost: norms and clipped sums equal to the materialized ones."""

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import functional as F
from jcnn import models, nn
from jcnn.analysis import (
    clip_per_example,
    ghost_clipped_sum,
    ghost_norms,
    ghost_plan,
    per_example_grads,
    replace_batch_norm,
)

# (layers, input shape per example): every parameterized layer type and convolution option
_LAYERS = {
    "dense_tokens": ([nn.Dense(5), nn.GELU(), nn.Dense(3, use_bias=False)], (7, 4)),
    "conv1d_stride_dilation": (
        [nn.Conv(4, 3, stride=2, dilation=2, padding=((1, 2),)), nn.ReLU()],
        (13, 3),
    ),
    "conv2d_groups_reflect": (
        [nn.Conv(6, (3, 2), padding=1, groups=3, padding_mode="reflect"), nn.Tanh()],
        (7, 6, 3),
    ),
    "conv2d_same_flip_circular": (
        [nn.Conv(4, 3, padding="SAME", flip=True, padding_mode="circular", use_bias=False)],
        (5, 6, 2),
    ),
    "conv3d_stride": ([nn.Conv(3, 2, stride=(1, 2, 2), padding="VALID")], (4, 5, 5, 2)),
    "conv_transpose_2d": (
        [nn.ConvTranspose(4, 3, stride=2, padding=1, output_padding=1, groups=2)],
        (4, 3, 2),
    ),
    "conv_transpose_1d_dilation": (
        [nn.ConvTranspose(3, 3, stride=3, dilation=2, padding=(2,), use_bias=False)],
        (5, 2),
    ),
    "norms_and_prelu": (
        [
            nn.Conv(4, 3, padding=1),
            nn.GroupNorm(2),
            nn.PReLU(),
            nn.LayerNorm(),
            nn.InstanceNorm(),
        ],
        (5, 5, 2),
    ),
}


class _FlaxDense(linen.Module):
    @linen.compact
    def __call__(self, x):
        return linen.Dense(3)(jnp.tanh(linen.Dense(4)(x)))


def _problem(layers, shape, rng, batch=5, head=True):
    model = nn.Sequential([*layers, nn.Flatten(), nn.Dense(3)] if head else layers)
    images = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, size=batch), jnp.int32)
    params = model.init(jax.random.key(0), images)["params"]
    # non-trivial parameters everywhere (norm scales, PReLU slopes, biases)
    params = jax.tree.map(
        lambda p: p + 0.3 * jnp.asarray(rng.normal(size=p.shape), p.dtype), params
    )

    def loss(params, batch):
        return F.cross_entropy(model.apply({"params": params}, batch[0]), batch[1])

    return loss, params, (images, labels)


def _reference_norms(loss, params, batch):
    grads = per_example_grads(loss, params, batch)
    return np.sqrt(
        sum(
            (np.asarray(g, np.float64).reshape(g.shape[0], -1) ** 2).sum(1)
            for g in jax.tree.leaves(grads)
        )
    )


@pytest.mark.parametrize("name", sorted(_LAYERS))
def test_every_layer_type_and_rule_matches_materialized_norms(name, rng):
    loss, params, batch = _problem(*_LAYERS[name], rng)
    expected = _reference_norms(loss, params, batch)
    for rule in ("mixed", "ghost", "direct"):
        got = jax.jit(lambda p, b, r=rule: ghost_norms(loss, p, b, layer_rule=r))(params, batch)
        np.testing.assert_allclose(got, expected, rtol=2e-5, err_msg=rule)
    plan = ghost_plan(loss, params, batch)
    layers = [row for row in plan if row.kind != "parameter"]
    # every dense/conv layer has a rule; the rest (norms, PReLU) is materialized and listed
    assert (
        len(layers)
        == sum(
            isinstance(layer, (nn.Dense, nn.Conv, nn.ConvTranspose)) for layer in _LAYERS[name][0]
        )
        + 1
    )
    materialized = {row.path for row in plan if row.kind == "parameter"}
    assert all(not p.endswith("['kernel']") for p in materialized)


def test_flax_dense_layers(rng):
    model = _FlaxDense()
    x = jnp.asarray(rng.normal(size=(4, 6, 2)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]

    def loss(params, x):
        return jnp.mean(model.apply({"params": params}, x) ** 2)

    # 6 tokens: 36 > 2 * 4 (direct) for the first layer, 36 <= 4 * 3 false too: both direct
    assert [(row.kind, row.rule) for row in ghost_plan(loss, params, x)] == [
        ("Dense", "direct"),
        ("Dense", "direct"),
    ]
    for rule in ("mixed", "ghost"):
        np.testing.assert_allclose(
            ghost_norms(loss, params, x, layer_rule=rule),
            _reference_norms(loss, params, x),
            rtol=2e-5,
        )


def test_shared_layer_is_materialized_not_ghosted(rng):
    class Twice(linen.Module):
        @linen.compact
        def __call__(self, x):
            layer = nn.Dense(2, name="shared")
            return layer(jnp.tanh(layer(x)))

    model = Twice()
    x = jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]

    def loss(params, x):
        return jnp.sum(model.apply({"params": params}, x) ** 2)

    plan = ghost_plan(loss, params, x)
    assert {row.rule for row in plan} == {"per-example gradient"}
    np.testing.assert_allclose(
        ghost_norms(loss, params, x), _reference_norms(loss, params, x), rtol=2e-5
    )


@pytest.mark.parametrize("name", ["lenet5", "lenet5_original", "jarrett", "resnet20_groupnorm"])
def test_zoo_models_without_batch_norm(name, rng):
    make = {
        "lenet5": (lambda: models.LeNet5(), (28, 28, 1)),
        "lenet5_original": (lambda: models.LeNet5(original=True), (28, 28, 1)),
        "jarrett": (lambda: models.JarrettNet(widths=(4, 6)), (16, 16, 3)),
        "resnet20_groupnorm": (
            lambda: replace_batch_norm(models.resnet20(), num_groups=4),
            (8, 8, 3),
        ),
    }
    build, shape = make[name]
    model = build()
    images = jnp.asarray(rng.normal(size=(3, *shape)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=3), jnp.int32)
    params = model.init(jax.random.key(0), images[:1], train=False)["params"]

    def loss(params, batch):
        return F.cross_entropy(model.apply({"params": params}, batch[0], train=True), batch[1])

    expected = _reference_norms(loss, params, (images, labels))
    got = jax.jit(lambda p, b: ghost_norms(loss, p, b))(params, (images, labels))
    np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_frozen_batch_norm_zoo_model(rng):
    model = models.resnet20()
    images = jnp.asarray(rng.normal(size=(3, 8, 8, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=3), jnp.int32)
    variables = model.init(jax.random.key(0), images[:1], train=False)

    def loss(params, batch):
        logits = model.apply({**variables, "params": params}, batch[0], train=False)
        return F.cross_entropy(logits, batch[1])

    params = variables["params"]
    got = jax.jit(lambda p, b: ghost_norms(loss, p, b))(params, (images, labels))
    np.testing.assert_allclose(got, _reference_norms(loss, params, (images, labels)), rtol=1e-4)

    def train_loss(params, batch):
        logits, _ = model.apply(
            {**variables, "params": params}, batch[0], train=True, mutable=["batch_stats"]
        )
        return F.cross_entropy(logits, batch[1])

    with pytest.raises(ValueError, match="ghost_norms: the model computes BatchNorm"):
        ghost_norms(train_loss, params, (images, labels))


def test_large_zoo_models_have_a_rule_for_every_kernel():
    model = models.VGG(depth=11, num_classes=10, small_input=True)
    images = jnp.zeros((2, 32, 32, 3))
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), images)["params"]

    def loss(params, x):
        return jnp.mean(model.apply({"params": params}, x))

    plan = ghost_plan(loss, params, images)
    assert len(plan) == 9 and all(row.rule in ("ghost", "direct") for row in plan)
    # early convs (32 * 32 positions) are cheaper direct, the classifier ghost
    assert plan[0].rule == "direct" and plan[-1].rule == "ghost"


def test_under_jit_scan_and_chunks(rng):
    loss, params, batch = _problem(*_LAYERS["conv2d_groups_reflect"], rng, batch=7)
    expected = _reference_norms(loss, params, batch)
    chunked = jax.jit(lambda p, b: ghost_norms(loss, p, b, chunk_size=3))(params, batch)
    np.testing.assert_allclose(chunked, expected, rtol=2e-5)

    def body(carry, scale):
        scaled = jax.tree.map(lambda p: p * scale, params)
        return carry, ghost_norms(loss, scaled, batch)

    _, scanned = jax.jit(lambda s: jax.lax.scan(body, None, s))(jnp.array([1.0, 0.5]))
    np.testing.assert_allclose(scanned[0], expected, rtol=2e-5)
    half = jax.tree.map(lambda p: p * 0.5, params)
    np.testing.assert_allclose(scanned[1], _reference_norms(loss, half, batch), rtol=2e-5)


def test_clipped_sum_equals_materialized_clipping(rng):
    loss, params, batch = _problem(*_LAYERS["norms_and_prelu"], rng, batch=6)
    norms = _reference_norms(loss, params, batch)
    clip = float(np.median(norms))  # some examples clipped, some not
    weights = jnp.array([1.0, 0.0, 1.0, 1.0, 0.5, 1.0])
    total, got_norms = jax.jit(lambda p, b, w: ghost_clipped_sum(loss, p, b, clip, weights=w))(
        params, batch, weights
    )
    np.testing.assert_allclose(got_norms, norms, rtol=2e-5)
    clipped = clip_per_example(per_example_grads(loss, params, batch), clip)
    expected = jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), clipped)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5), total, expected
    )


def test_bad_input(rng):
    loss, params, batch = _problem(*_LAYERS["dense_tokens"], rng)
    with pytest.raises(ValueError, match="layer_rule"):
        ghost_norms(loss, params, batch, layer_rule="fast")
    with pytest.raises(ValueError, match="l2_norm_clip"):
        ghost_clipped_sum(loss, params, batch, 0.0)
    with pytest.raises(ValueError, match="weights"):
        ghost_clipped_sum(loss, params, batch, 1.0, weights=jnp.ones(3))
    with pytest.raises(ValueError, match="leaves disagree"):
        ghost_norms(loss, params, (batch[0], batch[1][:3]))
    with pytest.raises(ValueError, match="loss_fn: expected a real floating scalar"):
        ghost_norms(lambda p, b: jnp.zeros(2) + loss(p, b), params, batch)
    with pytest.raises(ValueError, match="chunk_size"):
        ghost_norms(loss, params, batch, chunk_size=0)
