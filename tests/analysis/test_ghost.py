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
    ghost,
    ghost_clipped_sum,
    ghost_norms,
    ghost_plan,
    per_example_grad_norms,
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
    "depthwise_conv2d_multiplier_stride_reflect": (
        [nn.DepthwiseConv((3, 3), depth_multiplier=2, stride=2, padding=1, padding_mode="reflect")],
        (7, 6, 3),
    ),
    "depthwise_conv2d_dilation_valid": (
        [nn.DepthwiseConv((2, 3), dilation=(2, 1), padding="VALID"), nn.Tanh()],
        (6, 7, 4),
    ),
    "depthwise_conv1d_same_circular_no_bias": (
        [nn.DepthwiseConv(3, dilation=2, padding="SAME", padding_mode="circular", use_bias=False)],
        (9, 3),
    ),
    "depthwise_conv3d_multiplier_replicate": (
        [
            nn.DepthwiseConv(
                2,
                depth_multiplier=3,
                stride=(1, 2, 2),
                padding=((0, 1), (1, 0), (1, 1)),
                padding_mode="replicate",
            )
        ],
        (3, 5, 4, 2),
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


def _materialized(loss, params, batch):
    """``per_example_grads``, jitted: eagerly it dispatches (and compiles) one small program per
    operation, and the two references below share the compiled one."""
    return jax.jit(per_example_grads, static_argnums=0)(loss, params, batch)


def _reference_norms(loss, params, batch):
    grads = _materialized(loss, params, batch)
    return np.sqrt(
        sum(
            (np.asarray(g, np.float64).reshape(g.shape[0], -1) ** 2).sum(1)
            for g in jax.tree.leaves(grads)
        )
    )


def _reference_clipped_sum(loss, params, batch, weights, clip=None):
    """The materialized clipped sum, by default with a clip norm (the median norm) that clips
    some examples and not others."""
    grads = _materialized(loss, params, batch)
    norms = np.sqrt(
        sum(
            (np.asarray(g, np.float64).reshape(g.shape[0], -1) ** 2).sum(1)
            for g in jax.tree.leaves(grads)
        )
    )
    clip = float(np.median(norms)) if clip is None else clip
    clipped = clip_per_example(grads, clip)
    return clip, jax.tree.map(lambda g: jnp.tensordot(weights, g, axes=1), clipped)


def _assert_trees_close(got, expected, err_msg=""):
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    # relative to the largest entry of all: some leaves' sums are zero up to rounding (the bias
    # of a layer followed by a normalization)
    scale = max(float(np.max(np.abs(b))) for b in jax.tree.leaves(expected))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, err_msg
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5 * scale, err_msg=err_msg)


def _weights(rng, size):
    """Per-example weights with a zero (a padding example) and a fraction."""
    weights = rng.uniform(0.2, 1.0, size=size)
    weights[1] = 0.0
    return jnp.asarray(weights, jnp.float32)


@pytest.mark.parametrize("name", sorted(_LAYERS))
def test_every_layer_type_and_rule_matches_materialized_norms_and_sum(name, rng, monkeypatch):
    loss, params, batch = _problem(*_LAYERS[name], rng)
    expected = _reference_norms(loss, params, batch)
    weights = _weights(rng, 5)
    clip, expected_sum = _reference_clipped_sum(loss, params, batch, weights)
    rules = ("mixed", "ghost", "direct")
    # A convolution's window Gram matrix comes from its unfolded windows or from the Gram matrix
    # of its padded positions, whichever is smaller: both forced, on every convolution option
    # (read when traced, so each forced ghost_norms is traced under its own choice)
    forced = (False, True) if "conv" in name else ()
    chosen = []

    def choice(from_positions):
        def smaller(*args):
            chosen.append(from_positions)
            return from_positions

        return smaller

    @jax.jit  # one program for them all: one compile, not one each
    def ghosted(p, b, w):
        sums = [ghost_clipped_sum(loss, p, b, clip, weights=w, layer_rule=r) for r in rules]
        by_choice = []
        for from_positions in forced:
            with monkeypatch.context() as patch:
                patch.setattr(ghost, "_positions_gram_is_smaller", choice(from_positions))
                by_choice.append(ghost_norms(loss, p, b, layer_rule="ghost"))
        return ghost_norms(loss, p, b), sums, by_choice

    got, sums, by_choice = ghosted(params, batch, weights)
    np.testing.assert_allclose(got, expected, rtol=2e-5)
    assert sorted(set(chosen)) == list(forced)
    for from_positions, norms in zip(forced, by_choice, strict=True):
        np.testing.assert_allclose(norms, expected, rtol=2e-5, err_msg=f"{from_positions=}")
    for rule, (total, norms) in zip(rules, sums, strict=True):
        # the clipped sum's norms are ghost_norms' with rule
        np.testing.assert_allclose(norms, expected, rtol=2e-5, err_msg=rule)
        _assert_trees_close(total, expected_sum, err_msg=rule)
    plan = ghost_plan(loss, params, batch)
    layers = [row for row in plan if row.kind != "parameter"]
    # every dense/conv layer has a rule; the rest (norms, PReLU) is materialized and listed
    assert (
        len(layers)
        == sum(
            isinstance(layer, (nn.Dense, nn.Conv, nn.DepthwiseConv, nn.ConvTranspose))
            for layer in _LAYERS[name][0]
        )
        + 1
    )
    materialized = {row.path for row in plan if row.kind == "parameter"}
    assert all(not p.endswith("['kernel']") for p in materialized)


@pytest.mark.parametrize("depth_multiplier, rule", [(1, "direct"), (4, "ghost")])
def test_depthwise_conv_is_a_ghost_layer_planned_per_channel(depth_multiplier, rule, rng):
    # 3 channels, 2x2 output positions (T = 4): the ghost norm writes one T x T Gram matrix per
    # channel (3 * 16 = 48 entries), the direct one the kernel (3 * 3 * 3 * depth_multiplier);
    # the grouped Conv it equals gets the same rule
    layers = {
        "DepthwiseConv": nn.DepthwiseConv(3, depth_multiplier=depth_multiplier, stride=2),
        "Conv": nn.Conv(3 * depth_multiplier, 3, stride=2, groups=3),
    }
    for kind, layer in layers.items():
        loss, params, batch = _problem([layer], (5, 5, 3), rng, batch=3)
        plan = ghost_plan(loss, params, batch)
        assert plan[0] == ghost.LayerRule("layers_0", kind, rule, 4, 30 * depth_multiplier)
        assert [row.kind for row in plan] == [kind, "Dense"]


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
    weights = _weights(rng, 4)
    clip, expected_sum = _reference_clipped_sum(loss, params, x, weights)
    expected = _reference_norms(loss, params, x)
    rules = ("mixed", "ghost")

    @jax.jit  # one program, not four run eagerly
    def ghosted(params, x, weights):
        return [
            (
                ghost_norms(loss, params, x, layer_rule=rule),
                ghost_clipped_sum(loss, params, x, clip, weights=weights, layer_rule=rule)[0],
            )
            for rule in rules
        ]

    for rule, (norms, total) in zip(rules, ghosted(params, x, weights), strict=True):
        np.testing.assert_allclose(norms, expected, rtol=2e-5, err_msg=rule)
        _assert_trees_close(total, expected_sum, err_msg=rule)


def test_shared_layer_is_materialized_not_ghosted(rng):
    class Twice(linen.Module):
        @linen.compact
        def __call__(self, x):
            layer = nn.Conv(2, 3, padding=1, name="shared")
            x = nn.Conv(2, 2, name="before")(x)
            return nn.Dense(3, name="after")(layer(jnp.tanh(layer(x))).reshape(x.shape[0], -1))

    model = Twice()
    x = jnp.asarray(rng.normal(size=(5, 6, 2)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda p: p + 0.3 * jnp.asarray(rng.normal(size=p.shape)), params)

    def loss(params, x):
        return jnp.sum(model.apply({"params": params}, x) ** 2)

    plan = ghost_plan(loss, params, x)
    assert [row.path for row in plan if row.rule == "per-example gradient"] == [
        "['shared']['bias']",
        "['shared']['kernel']",
    ]
    assert [row.path for row in plan if row.kind != "parameter"] == ["before", "after"]
    weights = _weights(rng, 5)
    clip, expected_sum = _reference_clipped_sum(loss, params, x, weights)
    norms, (total, _) = jax.jit(  # one program, not two
        lambda p, b, w: (ghost_norms(loss, p, b), ghost_clipped_sum(loss, p, b, clip, weights=w))
    )(params, x, weights)
    np.testing.assert_allclose(norms, _reference_norms(loss, params, x), rtol=2e-5)
    _assert_trees_close(total, expected_sum)


class _SquaredKernelDense(nn.Dense):
    """A Dense subclass with its own ``__call__``: its map is not ``x @ kernel``."""

    @linen.compact
    def __call__(self, x):
        kernel = self.param("kernel", linen.initializers.normal(), (x.shape[-1], self.features))
        return x @ (kernel * kernel)


class _StandardizedConv(nn.Conv):
    """Weight standardization: the kernel is transformed before the convolution uses it."""

    @linen.compact
    def __call__(self, x):
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", linen.initializers.normal(), shape)
        kernel = (kernel - kernel.mean()) / (kernel.std() + 1e-5)
        return F.conv(x, kernel, None, padding=self.padding)


class _QuantizedFlaxDense(linen.Module):
    @linen.compact
    def __call__(self, x):
        def dot_general(a, b, *args, **kwargs):  # another map than the matrix product
            return jax.lax.dot_general(jnp.tanh(a), b, *args, **kwargs)

        return linen.Dense(3, dot_general=dot_general)(x)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (_SquaredKernelDense(3, use_bias=False), (4,)),
        (_StandardizedConv(3, (3, 3), padding=1, use_bias=False), (5, 5, 2)),
        (_QuantizedFlaxDense(), (4,)),
    ],
)
def test_a_layer_subclass_with_its_own_call_is_materialized_not_ghosted(layer, shape, rng):
    # taken for the layer it subclasses, its norm was the ghost norm of another map (silently
    # 65x off for the squared kernel)
    loss, params, batch = _problem([layer], shape, rng, batch=3)
    plan = ghost_plan(loss, params, batch)
    assert {row.rule for row in plan if "layers_0" in row.path} == {"per-example gradient"}
    norms = jax.jit(lambda p, b: ghost_norms(loss, p, b, layer_rule="ghost"))(params, batch)
    np.testing.assert_allclose(norms, _reference_norms(loss, params, batch), rtol=2e-5)


class _LiftedDense(linen.Module):
    """Layers inside Flax's lifted transformations: one Dense mapped over positions."""

    @linen.compact
    def __call__(self, x):
        mapped = linen.vmap(
            nn.Dense,
            in_axes=1,
            out_axes=1,
            variable_axes={"params": None},
            split_rngs={"params": False},
        )
        x = mapped(4, name="mapped")(x.reshape(x.shape[0], -1, 3))
        return linen.remat(nn.Dense)(2, name="head")(jnp.tanh(x).reshape(x.shape[0], -1))


def test_layers_inside_lifted_transformations_are_materialized(rng):
    # a layer called inside flax.linen.vmap was ghosted with its input recorded inside the lifted
    # vmap: ghost_norms crashed with an UnexpectedTracerError (so did DP-SGD in fit)
    model = _LiftedDense()
    x = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]

    def loss(params, x):
        return jnp.sum(model.apply({"params": params}, x) ** 2)

    assert {row.rule for row in ghost_plan(loss, params, x)} == {"per-example gradient"}
    weights = _weights(rng, 4)
    clip, expected_sum = _reference_clipped_sum(loss, params, x, weights)
    norms, (total, _) = jax.jit(
        lambda p, b, w: (ghost_norms(loss, p, b), ghost_clipped_sum(loss, p, b, clip, weights=w))
    )(params, x, weights)
    np.testing.assert_allclose(norms, _reference_norms(loss, params, x), rtol=2e-5)
    _assert_trees_close(total, expected_sum)


def test_a_jitted_loss_is_planned_like_its_python_function(rng):
    model = nn.Sequential([nn.Conv(3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dense(2)])
    x = jnp.asarray(rng.normal(size=(4, 5, 5, 2)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]

    def loss(params, x):
        return jnp.sum(model.apply({"params": params}, x) ** 2)

    jitted = jax.jit(loss)
    jitted(params, x[:1])  # a cached trace at one example's shapes
    assert ghost_plan(jitted, params, x) == ghost_plan(loss, params, x)
    assert {row.rule for row in ghost_plan(jitted, params, x)} != {"per-example gradient"}
    got = jax.jit(lambda p, b: ghost_norms(jitted, p, b))(params, x)  # one program, not eager
    np.testing.assert_allclose(got, _reference_norms(loss, params, x), rtol=2e-5)


def test_kernel_also_used_in_the_loss_is_materialized_not_ghosted(rng):
    # a weight penalty in the loss: the kernel's gradient has a term that its layer's input and
    # output cotangent do not give (ghosted, the norms and the clipped sum were silently wrong)
    model = nn.Sequential([nn.Conv(3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Dense(2)])
    x = jnp.asarray(rng.normal(size=(4, 5, 5, 2)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]

    def loss(params, batch):
        penalty = jnp.sum(params["layers_0"]["kernel"] ** 2) + jnp.sum(params["layers_3"]["bias"])
        return jnp.mean((model.apply({"params": params}, batch[0]) - batch[1]) ** 2) + penalty

    plan = ghost_plan(loss, params, (x, y))
    assert [row.path for row in plan if row.kind != "parameter"] == []
    weights = _weights(rng, 4)
    clip, expected_sum = _reference_clipped_sum(loss, params, (x, y), weights)
    norms, (total, _) = jax.jit(  # one program, not two run eagerly
        lambda p, b, w: (ghost_norms(loss, p, b), ghost_clipped_sum(loss, p, b, clip, weights=w))
    )(params, (x, y), weights)
    np.testing.assert_allclose(norms, _reference_norms(loss, params, (x, y)), rtol=2e-5)
    _assert_trees_close(total, expected_sum)


def _cifar_resnet():
    """resnet20's network (CIFAR stem, option-A shortcuts, three stages) with one block a stage:
    the same layers (identity and padded shortcuts, strided and unstrided blocks) as resnet20's
    two more blocks a stage, a third of the program to compile."""
    return models.ResNet(
        (1, 1, 1), num_classes=10, stem="cifar", widths=(16, 32, 64), shortcut="pad"
    )


@pytest.mark.parametrize("name", ["lenet5", "lenet5_original", "jarrett", "cifar_resnet_groupnorm"])
def test_zoo_models_without_batch_norm(name, rng):
    make = {
        "lenet5": (lambda: models.LeNet5(), (28, 28, 1)),
        "lenet5_original": (lambda: models.LeNet5(original=True), (28, 28, 1)),
        "jarrett": (lambda: models.JarrettNet(widths=(4, 6)), (16, 16, 3)),
        "cifar_resnet_groupnorm": (
            lambda: replace_batch_norm(_cifar_resnet(), num_groups=4),
            (8, 8, 3),
        ),
    }
    build, shape = make[name]
    model = build()
    images = jnp.asarray(rng.normal(size=(3, *shape)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=3), jnp.int32)
    params = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images[:1])["params"]

    def loss(params, batch):
        return F.cross_entropy(model.apply({"params": params}, batch[0], train=True), batch[1])

    expected = _reference_norms(loss, params, (images, labels))
    weights = _weights(rng, 3)
    clip, expected_sum = _reference_clipped_sum(loss, params, (images, labels), weights)
    total, norms = jax.jit(lambda p, b, w: ghost_clipped_sum(loss, p, b, clip, weights=w))(
        params, (images, labels), weights
    )
    np.testing.assert_allclose(norms, expected, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(expected_sum), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))


def test_frozen_batch_norm_zoo_model(rng):
    model = _cifar_resnet()
    images = jnp.asarray(rng.normal(size=(3, 8, 8, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=3), jnp.int32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images[:1])

    def loss(params, batch):
        logits = model.apply({**variables, "params": params}, batch[0], train=False)
        return F.cross_entropy(logits, batch[1])

    params = variables["params"]

    def train_loss(params, batch):
        logits, _ = model.apply(
            {**variables, "params": params}, batch[0], train=True, mutable=["batch_stats"]
        )
        return F.cross_entropy(logits, batch[1])

    weights = jnp.ones(3)
    clip, expected_sum = _reference_clipped_sum(loss, params, (images, labels), weights)
    got, (total, _) = jax.jit(  # one program, not two
        lambda p, b: (ghost_norms(loss, p, b), ghost_clipped_sum(loss, p, b, clip))
    )(params, (images, labels))
    np.testing.assert_allclose(got, _reference_norms(loss, params, (images, labels)), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(expected_sum), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))

    with pytest.raises(ValueError, match="ghost_norms: the model computes BatchNorm"):
        ghost_norms(train_loss, params, (images, labels))
    with pytest.raises(ValueError, match="ghost_clipped_sum: the model computes BatchNorm"):
        ghost_clipped_sum(train_loss, params, (images, labels), 1.0)


def test_frozen_batch_norm_mobilenet_v2_has_its_depthwise_layers_ghosted(rng):
    # its depthwise 3x3 convs are Conv(groups=channels): each a layer with a rule, none of their
    # kernels materialized; five blocks (one residual) on maps of 4x4 down to 1x1, so that both
    # rules are chosen
    stages = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 1, 2), (6, 64, 1, 2))
    model = models.mobilenet_v2_cifar(width_multiplier=0.25, stages=stages)
    images = jnp.asarray(rng.normal(size=(3, 4, 4, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, size=3), jnp.int32)
    variables = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False))(images[:1])

    def loss(params, batch):
        logits = model.apply({**variables, "params": params}, batch[0], train=False)
        return F.cross_entropy(logits, batch[1])

    params, batch = variables["params"], (images, labels)
    plan = ghost_plan(loss, params, batch)
    depthwise = [row for row in plan if row.path.endswith("depthwise_conv")]
    assert len(depthwise) == 5 and {row.rule for row in depthwise} == {"direct", "ghost"}
    assert all(not row.path.endswith("['kernel']") for row in plan if row.kind == "parameter")
    weights = _weights(rng, 3)
    clip, expected_sum = _reference_clipped_sum(loss, params, batch, weights)
    total, norms = jax.jit(lambda p, b, w: ghost_clipped_sum(loss, p, b, clip, weights=w))(
        params, batch, weights
    )
    np.testing.assert_allclose(norms, _reference_norms(loss, params, batch), rtol=1e-4)
    for a, b in zip(jax.tree.leaves(total), jax.tree.leaves(expected_sum), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.max(np.abs(b))))


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

    weights = _weights(rng, 7)
    clip, expected_sum = _reference_clipped_sum(loss, params, batch, weights)
    total, norms = jax.jit(  # chunks of 3 and a remainder of 1
        lambda p, b, w: ghost_clipped_sum(loss, p, b, clip, weights=w, chunk_size=3)
    )(params, batch, weights)
    np.testing.assert_allclose(norms, expected, rtol=2e-5)
    _assert_trees_close(total, expected_sum)

    def clipped_body(carry, scale):
        scaled = jax.tree.map(lambda p: p * scale, params)
        return carry, ghost_clipped_sum(loss, scaled, batch, clip, weights=weights)[0]

    _, sums = jax.jit(lambda s: jax.lax.scan(clipped_body, None, s))(jnp.array([1.0, 0.5]))
    _assert_trees_close(jax.tree.map(lambda s: s[0], sums), expected_sum)
    _, expected_half = _reference_clipped_sum(loss, half, batch, weights, clip)
    _assert_trees_close(jax.tree.map(lambda s: s[1], sums), expected_half)


@pytest.mark.parametrize(
    "layer, shape",
    [
        (nn.Conv(16, 3, padding=1, groups=2), (3, 3, 16)),
        (nn.Conv(16, 3, padding=1, groups=2), (4, 4, 2, 32)),
        (nn.Conv(16, 3, padding=2, dilation=2, groups=2), (5, 5, 64)),
        (nn.DepthwiseConv(3, padding=1, depth_multiplier=2), (4, 4, 16)),
    ],
)
def test_jitted_loss_linear_in_the_layer_output(layer, shape, rng):
    """The output cotangent of a loss linear in the layer's output is one number per example,
    broadcast: XLA:CPU's YNNPACK fusion gave wrong or NaN Gram products of it under jit (on the
    positions' and the patches' route alike) where ghost and direct rules must agree with the
    materialized gradients."""
    model = nn.Sequential([layer])
    images = jnp.asarray(rng.normal(size=(5, *shape)), jnp.float32)
    targets = jnp.asarray(rng.normal(size=5), jnp.float32)
    params = model.init(jax.random.key(0), images[:1])["params"]

    def loss(params, batch):
        out = model.apply({"params": params}, batch[0])
        return jnp.mean((out.reshape(out.shape[0], -1).sum(1) - batch[1]) ** 2)

    batch = (images, targets)
    expected = _reference_norms(loss, params, batch)
    clip, expected_sum = _reference_clipped_sum(loss, params, batch, jnp.ones(5))
    for rule in ("ghost", "direct"):
        norms, (total, _) = jax.jit(
            lambda p, b, rule=rule: (
                ghost_norms(loss, p, b, layer_rule=rule),
                ghost_clipped_sum(loss, p, b, clip, layer_rule=rule),
            )
        )(params, batch)
        np.testing.assert_allclose(norms, expected, rtol=2e-5, err_msg=rule)
        _assert_trees_close(total, expected_sum, err_msg=rule)


def test_float64_norms_and_clipped_sum_keep_float64_precision(rng):
    """float64 parameters and inputs (jax_enable_x64): float64 norms and clipped sum, for the
    ghost, direct and materialized rules alike, equal to the materialized float64 ones."""
    layers, shape = _LAYERS["conv2d_groups_reflect"]
    with jax.enable_x64(True):
        loss, params, (images, labels) = _problem(layers, shape, rng)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        batch = (images.astype(jnp.float64), labels)
        # jitted, each a single program: eagerly every operation compiled a float64 program
        grads = jax.jit(per_example_grads, static_argnums=0)(loss, params, batch)
        norms = np.sqrt(sum((g.reshape(5, -1) ** 2).sum(1) for g in jax.tree.leaves(grads)))
        clip = float(np.median(norms))
        factors = np.minimum(1.0, clip / norms)
        expected = jax.tree.map(lambda g: np.tensordot(factors, g, axes=1), grads)
        rules = ("ghost", "direct")

        @jax.jit
        def ghosted(params, batch):
            return [
                (
                    ghost_norms(loss, params, batch, layer_rule=rule),
                    ghost_clipped_sum(loss, params, batch, clip, layer_rule=rule)[0],
                )
                for rule in rules
            ]

        for layer_rule, (got, total) in zip(rules, ghosted(params, batch), strict=True):
            assert got.dtype == jnp.float64
            np.testing.assert_allclose(got, norms, rtol=1e-12, err_msg=layer_rule)
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13),
                total,
                expected,
            )


def test_an_example_with_a_zero_gradient_gives_no_nan_in_derivatives_of_norms_and_sum():
    # the first example is fitted exactly (zero gradient, nonzero Hessian): sqrt(0)'s infinite
    # derivative put NaN into the derivatives of its norm and of the clipped sum
    model = nn.Dense(1, use_bias=False)
    x, y = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.5, 0.5]]), jnp.array([2.0, 0.0, 0.0])
    params = {"kernel": jnp.array([[2.0], [1.0]])}

    def loss(params, batch):
        return jnp.mean((model.apply({"params": params}, batch[0])[:, 0] - batch[1]) ** 2)

    def clipped_sum(params):  # no example is clipped at C = 100: the sum of the gradients
        return ghost_clipped_sum(loss, params, (x, y), 100.0, layer_rule="ghost")[0]["kernel"]

    def unclipped_sum(params):
        return jax.grad(lambda p: sum(loss(p, (x[i : i + 1], y[i : i + 1])) for i in range(3)))(
            params
        )["kernel"]

    got = jax.jacobian(clipped_sum)(params)["kernel"]
    np.testing.assert_allclose(got, jax.jacobian(unclipped_sum)(params)["kernel"], rtol=1e-6)
    norms = jax.grad(lambda p: jnp.sum(ghost_norms(loss, p, (x, y), layer_rule="ghost")))(params)
    assert np.isfinite(norms["kernel"]).all()


def test_empty_batch_has_no_norm_and_a_zero_sum(rng):
    loss, params, (images, labels) = _problem(*_LAYERS["conv2d_groups_reflect"], rng)
    empty = (images[:0], labels[:0])
    assert ghost_norms(loss, params, empty).shape == (0,)
    total, norms = ghost_clipped_sum(loss, params, empty, 1.0)
    assert norms.shape == (0,)
    _assert_trees_close(total, jax.tree.map(jnp.zeros_like, params))


def test_empty_batch_norms_take_the_dtype_of_float64_parameters():
    # an empty batch's norms were float32 whatever the parameters, where every other batch's
    # (and per_example_grad_norms', empty or not) are float64 for float64 parameters
    layer = nn.Dense(3, param_dtype=jnp.float64)

    def loss(params, example):
        x, y = example
        return F.cross_entropy(layer.apply({"params": params}, x[None]), y[None])

    with jax.enable_x64(True):
        params = layer.init(jax.random.key(0), jnp.ones((1, 5)))["params"]
        for size in (2, 0):
            batch = (jnp.ones((size, 5), jnp.float64), jnp.zeros(size, jnp.int32))
            total, clipped_norms = ghost_clipped_sum(loss, params, batch, 1.0)
            dtypes = {
                ghost_norms(loss, params, batch).dtype,
                clipped_norms.dtype,
                total["kernel"].dtype,
                per_example_grad_norms(loss, params, batch).dtype,
            }
            assert dtypes == {np.dtype(np.float64)}, size


@pytest.mark.parametrize(
    "weights, says",
    [
        ([1.0, 2.0, 1.0, 0.0, 1.0], "got 0.0 to 2.0"),
        ([1.0, -1.0, 1.0, 0.0, 1.0], "got -1.0 to 1.0"),
    ],
)
def test_weights_outside_zero_one_are_refused_when_concrete(rng, weights, says):
    # w_i > 1 or < 0 broke the bound C on each example's term of the "clipped" sum, which DP
    # noise is calibrated for; a traced weight stays unchecked (it is its caller's to check)
    loss, params, batch = _problem(*_LAYERS["dense_tokens"], rng)
    with pytest.raises(ValueError, match=r"weights: expected values in \[0, 1\].* " + says):
        ghost_clipped_sum(loss, params, batch, 1.0, weights=jnp.asarray(weights))
    traced = jax.jit(lambda w: ghost_clipped_sum(loss, params, batch, 1.0, weights=w)[1])
    assert traced(jnp.asarray(weights)).shape == (5,)


def test_weights_as_a_list_with_chunks(rng):
    # a list's numbers became leaves of the chunks' pytree: "'int' object is not subscriptable"
    loss, params, batch = _problem(*_LAYERS["dense_tokens"], rng)
    weights = [1, 0, 1, 1, 0]
    # jitted (the list closed over, as a Python list at trace time): one compile each, not one
    # per operation
    total, norms = jax.jit(
        lambda p, b: ghost_clipped_sum(loss, p, b, 0.5, weights=weights, chunk_size=2)
    )(params, batch)
    expected, expected_norms = jax.jit(
        lambda p, b: ghost_clipped_sum(loss, p, b, 0.5, weights=np.array(weights))
    )(params, batch)
    _assert_trees_close(total, expected)
    np.testing.assert_allclose(norms, expected_norms, rtol=1e-6)


def test_bad_input(rng):
    loss, params, batch = _problem(*_LAYERS["dense_tokens"], rng)
    with pytest.raises(ValueError, match="layer_rule"):
        ghost_norms(loss, params, batch, layer_rule="fast")
    with pytest.raises(ValueError, match="l2_norm_clip"):
        ghost_clipped_sum(loss, params, batch, 0.0)
    with pytest.raises(ValueError, match="weights"):
        ghost_clipped_sum(loss, params, batch, 1.0, weights=jnp.ones(3))
    with pytest.raises(TypeError, match="weights: expected real numbers, got <U1"):
        ghost_clipped_sum(loss, params, batch, 1.0, weights=np.array(["1"] * 5))
    with pytest.raises(ValueError, match="leaves disagree"):
        ghost_norms(loss, params, (batch[0], batch[1][:3]))
    with pytest.raises(ValueError, match="loss_fn: expected a real floating scalar"):
        ghost_norms(lambda p, b: jnp.zeros(2) + loss(p, b), params, batch)
    with pytest.raises(ValueError, match="chunk_size"):
        ghost_norms(loss, params, batch, chunk_size=0)
    with_int = {**params, "count": jnp.int32(3)}  # jax.grad failed on it, naming nothing
    for fn in (ghost_norms, ghost_plan, lambda *a: ghost_clipped_sum(*a, 1.0)):
        with pytest.raises(TypeError, match=r"params: .* got int32 at \['count'\]"):
            fn(loss, with_int, batch)


@pytest.mark.parametrize("layer_rule", ["ghost", "direct"])
def test_clipped_sum_weight_zero_example_with_nan_gradient_adds_nothing(layer_rule):
    # a weight-0 (padding) example whose gradient is NaN must not make the sum NaN
    model = nn.Dense(2)
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]

    def loss(p, x):
        return jnp.mean(
            model.apply({"params": p}, x / jnp.linalg.norm(x, axis=-1, keepdims=True)) ** 2
        )

    x = jax.random.normal(jax.random.key(1), (3, 3))
    padded = jnp.concatenate([x, jnp.zeros((1, 3))])
    weights = jnp.array([1.0, 1.0, 1.0, 0.0])
    for chunk_size in (None, 2):
        got, _ = ghost_clipped_sum(
            loss, params, padded, 1.0, weights=weights, chunk_size=chunk_size, layer_rule=layer_rule
        )
        want, _ = ghost_clipped_sum(loss, params, x, 1.0, layer_rule=layer_rule)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
