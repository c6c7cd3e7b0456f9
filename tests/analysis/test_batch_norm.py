"""BatchNorm under per-example gradients: the error, and the three ways out (frozen statistics,
shared batch statistics through ``axis_name``, GroupNorm through ``replace_batch_norm``)."""

import functools
import math

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import functional as F
from jcnn import models, nn
from jcnn.analysis import (
    fold_batch_norms,
    ghost_clipped_sum,
    ghost_norms,
    per_example_grad_norms,
    per_example_grads,
    private_grad,
    replace_batch_norm,
    summary,
)


def _net(axis_name=None):
    # A BatchNorm right after a dense layer: with per-example statistics its gradients are zero.
    return nn.Sequential(
        [
            nn.Conv(3, 3, padding=1),
            nn.BatchNorm(axis_name=axis_name),
            nn.ReLU(),
            nn.Flatten(),
            nn.Dense(4),
            nn.BatchNorm(axis_name=axis_name),
        ]
    )


@pytest.fixture
def problem(rng):
    images = jnp.asarray(rng.normal(size=(6, 5, 5, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, size=6), jnp.int32)
    variables = _net().init(jax.random.key(1), images, train=False)
    # running statistics away from (0, 1), so that frozen statistics are a real test
    stats = jax.tree.map(
        lambda s: s + jnp.asarray(rng.uniform(0.2, 0.5, s.shape)), variables["batch_stats"]
    )
    return variables["params"], stats, (images, labels)


def _loss(model, stats, train):
    def loss(params, batch):
        variables = {"params": params, "batch_stats": stats}
        logits, _ = model.apply(variables, batch[0], train=train, mutable=["batch_stats"])
        return F.cross_entropy(logits, batch[1])

    return loss


def _assert_trees_close(a, b, tol=2e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


@pytest.mark.parametrize("fn", [per_example_grads, per_example_grad_norms])
def test_train_mode_batch_norm_raises_naming_the_ways_out(problem, fn):
    params, stats, batch = problem
    with pytest.raises(ValueError, match=fn.__name__) as error:
        jax.jit(lambda p, b: fn(_loss(_net(), stats, True), p, b))(params, batch)
    for way_out in ("train=False", "axis_name", "replace_batch_norm"):
        assert way_out in str(error.value)


def test_ghost_and_dp_functions_name_the_function_that_shares_statistics(problem):
    # ghost_norms, ghost_clipped_sum and private_grad take no axis_name: their message sent the
    # user to ghost_norms(..., axis_name=NAME), a TypeError; and a BatchNorm(axis_name=NAME)
    # inside them, or inside per_example_grads without axis_name, got only "unbound axis name"
    params, stats, batch = problem
    key = jax.random.key(0)
    functions = {
        "ghost_norms": lambda loss: ghost_norms(loss, params, batch),
        "ghost_clipped_sum": lambda loss: ghost_clipped_sum(loss, params, batch, 1.0),
        "per_example_grads": lambda loss: per_example_grads(loss, params, batch),
        "private_grad": lambda loss: private_grad(
            loss, params, batch, key, l2_norm_clip=1.0, noise_multiplier=1.0
        ),
    }
    for where, call in functions.items():
        for axis_name in (None, "examples"):
            with pytest.raises(ValueError) as error:
                call(_loss(_net(axis_name), stats, True))
            message = str(error.value)
            assert "replace_batch_norm" in message and "train=False" in message, message
            if where == "per_example_grads":
                assert "per_example_grads(..., axis_name=NAME)" in message
            else:  # private_grad names itself, not the ghost_clipped_sum it calls
                assert message.startswith((f"{where}: ", "axis_name: "))
                assert f"{where}(..., axis_name" not in message
                assert f"per_example_grads(..., axis_name=NAME) ({where} takes no axis_name)" in (
                    message
                )
            if axis_name:
                assert message.startswith("axis_name: ") and "'examples'" in message


def test_flax_batch_norm_with_an_unmapped_axis_name_names_the_ways_out():
    class FlaxNet(linen.Module):
        @linen.compact
        def __call__(self, x):
            return linen.BatchNorm(use_running_average=False, axis_name="examples")(x)

    x = jnp.arange(8.0).reshape(4, 2)
    net = FlaxNet()
    variables = net.init(jax.random.key(0), x[:1].repeat(2, 0))

    def loss(params, x):
        out, _ = net.apply({**variables, "params": params}, x, mutable=["batch_stats"])
        return jnp.sum(out[:, 0] * x[:, 1])

    with pytest.raises(ValueError, match="axis_name: flax.linen.BatchNorm.*'examples'.*unbound"):
        per_example_grads(loss, variables["params"], x)
    # mapped by per_example_grads: the batch's statistics, shared
    grads = per_example_grads(loss, variables["params"], x, axis_name="examples")
    assert grads["BatchNorm_0"]["scale"].shape == (4, 2)


def test_train_mode_functional_and_flax_batch_norm_raise(problem):
    state = F.BatchNormState(jnp.zeros(3), jnp.ones(3))

    def functional_loss(w, x):
        y, _ = F.batch_norm(x @ w, None, None, state, train=True)
        return jnp.mean(y**2)

    x = jnp.ones((4, 2))
    with pytest.raises(ValueError, match="BatchNorm statistics"):
        per_example_grads(functional_loss, jnp.ones((2, 3)), x)

    class FlaxNet(linen.Module):
        @linen.compact
        def __call__(self, x, train):
            return linen.BatchNorm(use_running_average=not train)(linen.Dense(3)(x))

    net = FlaxNet()
    variables = net.init(jax.random.key(0), x, False)

    def flax_loss(train):
        def loss(params, x):
            out, _ = net.apply({**variables, "params": params}, x, train, mutable=["batch_stats"])
            return jnp.mean(out**2)

        return loss

    with pytest.raises(ValueError, match="BatchNorm statistics"):
        per_example_grads(flax_loss(True), variables["params"], x)
    frozen = per_example_grads(flax_loss(False), variables["params"], x)
    assert frozen["Dense_0"]["kernel"].shape == (4, 2, 3)
    # outside per-example functions, train-mode BatchNorm works as before
    assert jnp.isfinite(jax.grad(functional_loss)(jnp.ones((2, 3)), x)).all()


def test_a_jitted_loss_already_traced_at_one_example_still_raises():
    """JAX reuses a jitted function's cached trace; the guard must see the layers anyway."""
    layers = [nn.Conv(4, 3, padding=1), nn.BatchNorm(), nn.ReLU(), nn.Flatten(), nn.Dense(3)]
    model = nn.Sequential(layers)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 6, 6, 2)), jnp.float32)
    y = jnp.arange(5) % 3
    variables = model.init(jax.random.key(0), x, train=True)

    @jax.jit
    def loss(params, batch):
        out, _ = model.apply(
            {**variables, "params": params}, batch[0], train=True, mutable=["batch_stats"]
        )
        return F.cross_entropy(out, batch[1])

    jax.grad(loss)(variables["params"], (x[:1], y[:1]))  # traced and cached at one example
    for fn in (per_example_grads, per_example_grad_norms):
        with pytest.raises(ValueError, match="BatchNorm statistics"):
            fn(loss, variables["params"], (x, y))


@pytest.mark.parametrize("flax_batch_norm", [False, True])
def test_a_jitted_forward_pass_traced_before_inside_the_loss_still_raises(flax_batch_norm):
    """A jitted function that the loss calls is not the loss itself: its trace cached at one
    example outside the per-example functions must not hide its BatchNorm from the guard."""

    class Net(linen.Module):
        @linen.compact
        def __call__(self, x):
            x = nn.Conv(3, 3, padding=1)(x)
            if flax_batch_norm:
                x = linen.BatchNorm(use_running_average=False)(x)
            else:
                x = nn.BatchNorm()(x, train=True)
            return nn.Dense(3)(nn.Flatten()(x))

    model = Net()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, 5, 2)), jnp.float32)
    y = jnp.arange(4) % 3
    variables = model.init(jax.random.key(0), x)

    @jax.jit
    def forward(params, images):
        out, _ = model.apply({**variables, "params": params}, images, mutable=["batch_stats"])
        return out

    def loss(params, batch):
        return F.cross_entropy(forward(params, batch[0]), batch[1])

    forward(variables["params"], x[:1])  # traced and cached at one example
    key = jax.random.key(0)
    for fn in (
        per_example_grads,
        per_example_grad_norms,
        ghost_norms,
        functools.partial(ghost_clipped_sum, l2_norm_clip=1.0),
        functools.partial(private_grad, key=key, l2_norm_clip=1.0, noise_multiplier=1.0),
    ):
        with pytest.raises(ValueError, match="BatchNorm statistics in training mode"):
            fn(loss, variables["params"], (x, y))


def test_frozen_statistics_mean_of_per_example_gradients_is_batch_gradient(problem):
    params, stats, batch = problem
    loss = _loss(_net(), stats, False)
    grads = jax.jit(lambda p, b: per_example_grads(loss, p, b))(params, batch)
    batch_grad = jax.jit(jax.grad(loss))  # compiled: eagerly, one small program per op
    _assert_trees_close(jax.tree.map(lambda g: g.mean(0), grads), batch_grad(params, batch))
    # each example's gradient is the gradient of the model on that example alone
    i = 4
    alone = batch_grad(params, jax.tree.map(lambda leaf: leaf[i : i + 1], batch))
    _assert_trees_close(jax.tree.map(lambda g: g[i], grads), alone)


def test_shared_statistics_through_axis_name(problem):
    params, stats, batch = problem
    images, labels = batch
    shared = _loss(_net("examples"), stats, True)
    grads = jax.jit(lambda p, b: per_example_grads(shared, p, b, axis_name="examples"))(
        params, batch
    )

    # Independent reference, no vmap: every example runs with its own copy of the parameters,
    # the statistics are those of the whole batch, and example i's gradient is the derivative
    # of the sum of all the losses with respect to copy i (the statistics' backward pass is
    # shared, so it is not d loss_i / d params).
    def total_loss(copies):
        def bn(h, p):
            normalized, _ = F.batch_norm(
                jnp.concatenate(h), None, None, F.BatchNormState(*stats_of(p)), train=True
            )
            expand = (1,) * (normalized.ndim - 1)
            return [
                normalized[i : i + 1] * q["scale"].reshape(*expand, -1)
                + q["bias"].reshape(*expand, -1)
                for i, q in enumerate(p)
            ]

        def stats_of(layer_params):
            channels = layer_params[0]["scale"].shape
            return jnp.zeros(channels), jnp.ones(channels)

        h = [
            F.conv(images[i : i + 1], c["layers_0"]["kernel"], c["layers_0"]["bias"], padding=1)
            for i, c in enumerate(copies)
        ]
        h = bn(h, [c["layers_1"] for c in copies])
        h = [
            jax.nn.relu(a).reshape(1, -1) @ c["layers_4"]["kernel"] + c["layers_4"]["bias"][None]
            for a, c in zip(h, copies, strict=True)
        ]
        h = bn(h, [c["layers_5"] for c in copies])
        return sum(F.cross_entropy(h[i], labels[i : i + 1]) for i in range(len(copies)))

    expected = jax.jit(jax.grad(total_loss))([params] * 6)
    _assert_trees_close(grads, jax.tree.map(lambda *g: jnp.stack(g), *expected))
    # The mean of the per-example gradients is the batch gradient (a mean loss).
    batch_gradient = jax.jit(jax.grad(_loss(_net(), stats, True)))(params, batch)
    _assert_trees_close(jax.tree.map(lambda g: g.mean(0), grads), batch_gradient)
    norms = jax.jit(lambda p, b: per_example_grad_norms(shared, p, b, axis_name="examples"))(
        params, batch
    )
    expected = np.sqrt(sum((g.reshape(6, -1) ** 2).sum(1) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(norms, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="chunk_size"):
        per_example_grads(shared, params, batch, axis_name="examples", chunk_size=2)


def test_replace_batch_norm_computes_group_norm_with_the_same_parameters(rng):
    model = nn.Sequential([nn.Dense(12), nn.BatchNorm(eps=1e-3), nn.Dense(6), nn.BatchNorm()])
    replaced = replace_batch_norm(model, num_groups=8)
    x = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
    variables = replaced.init(jax.random.key(0), x, train=True)
    assert list(variables) == ["params"]
    original = model.init(jax.random.key(0), x, train=False)["params"]
    assert jax.tree.map(jnp.shape, variables["params"]) == jax.tree.map(jnp.shape, original)
    params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), p.dtype), original)
    expected = nn.Sequential(
        [nn.Dense(12), nn.GroupNorm(num_groups=4, eps=1e-3), nn.Dense(6), nn.GroupNorm(2)]
    ).apply({"params": params}, x)
    for train in (True, False):
        _assert_trees_close(replaced.apply({"params": params}, x, train=train), expected)
    with pytest.raises(ValueError, match="num_groups"):
        replace_batch_norm(model, num_groups=0)
    with pytest.raises(TypeError, match="num_groups: expected a positive int, got 2.0"):
        replace_batch_norm(model, num_groups=2.0)
    numpy_groups = replace_batch_norm(model, num_groups=np.int64(8))  # was refused
    _assert_trees_close(numpy_groups.apply({"params": params}, x, train=False), expected)
    with pytest.raises(TypeError, match="model"):
        replace_batch_norm(lambda x: x)


def test_replace_batch_norm_of_flax_batch_norm_gives_per_example_gradients(rng):
    # the guard against train-mode flax.linen.BatchNorm ran before replace_batch_norm's
    # interceptor: the replaced model, the way out the error names, raised that same error
    class Mixed(linen.Module):
        @linen.compact
        def __call__(self, x, train=False):
            x = linen.BatchNorm(use_running_average=not train)(linen.Conv(4, (3, 3))(x))
            x = nn.BatchNorm()(nn.Conv(4, 3)(jnp.tanh(x)), train=train)
            return nn.Dense(3)(x.reshape(x.shape[0], -1))

    model = replace_batch_norm(Mixed(), num_groups=2)
    x = jnp.asarray(rng.normal(size=(3, 5, 5, 2)), jnp.float32)
    y = jnp.arange(3) % 3
    params = model.init(jax.random.key(0), x, train=True)["params"]

    def loss(params, batch):
        return F.cross_entropy(model.apply({"params": params}, batch[0], train=True), batch[1])

    grad = jax.jit(jax.grad(loss))
    expected = [grad(params, (x[i : i + 1], y[i : i + 1])) for i in range(3)]
    expected = jax.tree.map(lambda *g: jnp.stack(g), *expected)
    grads, norms = jax.jit(  # one program, not many small ones run eagerly
        lambda p, b: (per_example_grads(loss, p, b), ghost_norms(loss, p, b))
    )(params, (x, y))
    _assert_trees_close(grads, expected)
    expected_norms = sum(np.sum(np.square(g).reshape(3, -1), 1) for g in jax.tree.leaves(expected))
    np.testing.assert_allclose(norms, np.sqrt(expected_norms), rtol=2e-5)


def test_replace_batch_norm_refuses_groups_of_one_value_naming_the_layer():
    # a BatchNorm after Dense(4) got gcd(32, 4) = 4 groups of one value: its output was the bias
    model = nn.Sequential([nn.Dense(4), nn.BatchNorm()])
    x = jnp.ones((3, 5))
    with pytest.raises(
        ValueError,
        match=r"num_groups: 32 gives BatchNorm 'layers_1' on x of shape \(3, 4\) 4 groups of "
        "one value each",
    ):
        replace_batch_norm(model).init(jax.random.key(0), x, train=True)
    variables = replace_batch_norm(model, num_groups=2).init(jax.random.key(0), x, train=True)
    assert sorted(variables["params"]["layers_1"]) == ["bias", "scale"]


def test_replace_batch_norm_refuses_flax_batch_norm_with_features_on_another_axis(rng):
    class ChannelsFirst(linen.Module):
        @linen.compact
        def __call__(self, x, train=True):
            return linen.BatchNorm(use_running_average=not train, axis=1)(x)

    x = jnp.asarray(rng.normal(size=(2, 6, 4, 4)), jnp.float32)  # (N, C, H, W)
    with pytest.raises(ValueError, match="model: flax.linen.BatchNorm .* on axis 1"):
        replace_batch_norm(ChannelsFirst()).init(jax.random.key(0), x)


# (constructor, image size, whether to compare values: the large ones are checked on shapes only)
_ZOO_WITH_BATCH_NORM = {
    # resnet20's network (CIFAR stem, option-A shortcuts, three stages) with one block a stage:
    # the same layers as resnet20's two more blocks a stage, a third of the program to compile.
    "cifar_resnet": (
        lambda: models.ResNet(
            (1, 1, 1), num_classes=10, stem="cifar", widths=(16, 32, 64), shortcut="pad"
        ),
        (8, 8),
        True,
    ),
    "airbench": (lambda: models.AirbenchNet(widths=(8, 16, 16)), (32, 32), True),
    "resnet18": (lambda: models.resnet18(num_classes=5), (32, 32), False),
    "vgg11_bn": (
        lambda: models.VGG(depth=11, batch_norm=True, num_classes=10, small_input=True),
        (32, 32),
        False,
    ),
}


@pytest.mark.parametrize("name", sorted(_ZOO_WITH_BATCH_NORM))
def test_replace_batch_norm_on_zoo_models(name, rng):
    make, size, compare_values = _ZOO_WITH_BATCH_NORM[name]
    model = make()
    images = jnp.asarray(rng.normal(size=(3, *size, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, size=3), jnp.int32)

    def initialize(module, train):
        # Jitted: eager Flax init compiles one small program per op, minutes on these models;
        # only shapes where values are not compared.
        init = functools.partial(module.init, train=train)
        if compare_values:
            return jax.jit(init)(jax.random.key(0), images[:1])
        return jax.eval_shape(init, jax.random.key(0), images[:1])

    # Only its shapes are used (the error and the replaced model's shapes): not compiled.
    original = jax.eval_shape(
        functools.partial(model.init, train=False), jax.random.key(0), images[:1]
    )
    assert "batch_stats" in original

    def loss(model, stats):
        def fn(params, batch):
            variables = {"params": params, **stats}
            logits = model.apply(variables, batch[0], train=True, mutable=list(stats) or False)
            logits = logits[0] if stats else logits
            return F.cross_entropy(logits, batch[1])

        return fn

    with pytest.raises(ValueError, match="BatchNorm statistics"):
        jax.eval_shape(
            lambda p, b: per_example_grads(
                loss(model, {"batch_stats": original["batch_stats"]}), p, b
            ),
            original["params"],
            (images, labels),
        )
    replaced = replace_batch_norm(model, num_groups=4)
    params = initialize(replaced, train=True)
    assert list(params) == ["params"]
    shapes = jax.tree.map(lambda leaf: leaf.shape, (params["params"], original["params"]))
    assert shapes[0] == shapes[1]
    params = params["params"]
    private_loss = loss(replaced, {})
    if not compare_values:
        shapes = jax.eval_shape(
            lambda p, b: per_example_grads(private_loss, p, b), params, (images, labels)
        )
        assert jax.tree.map(lambda s: s.shape[0], shapes) == jax.tree.map(lambda _: 3, params)
        return
    grads = jax.jit(lambda p, b: per_example_grads(private_loss, p, b))(params, (images, labels))
    # Examples are independent now: the per-example gradients average to the batch gradient
    # and each is the gradient on the example alone.
    batch_grad = jax.jit(jax.grad(private_loss))
    _assert_trees_close(
        jax.tree.map(lambda g: g.mean(0), grads), batch_grad(params, (images, labels)), tol=1e-4
    )
    # the batch of three copies of example 2 has its gradient, and the compiled program of 3
    alone = batch_grad(params, (jnp.stack([images[2]] * 3), jnp.stack([labels[2]] * 3)))
    _assert_trees_close(jax.tree.map(lambda g: g[2], grads), alone, tol=1e-4)
    assert math.isfinite(float(sum(jnp.sum(g) for g in jax.tree.leaves(grads))))


def test_a_replaced_model_is_summarized_folded_and_imported_as_group_norms(rng):
    # the analysis tracer took the replaced layers for BatchNorms: summary, receptive_field and
    # fold_batch_norms did not pass train to a model whose layers need it (the wrapper's
    # __call__ takes **kwargs), the receptive field stopped at the conv's 3x3 (a GroupNorm
    # output sees the whole map), and folding asked for BatchNorm statistics it has no more
    torch = pytest.importorskip("torch")
    from jcnn.analysis import fold_batch_norms, from_torch_state_dict, receptive_field, summary

    model = replace_batch_norm(
        nn.Sequential([nn.Conv(4, 3, use_bias=False), nn.BatchNorm(), nn.ReLU()]), num_groups=2
    )
    shape = (2, 9, 9, 1)
    table = summary(model, shape)
    assert [row.layer for row in table.rows][1] == "GroupNorm"
    assert receptive_field(model, shape).size == (9, 9)
    twin = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, bias=False), torch.nn.GroupNorm(2, 4), torch.nn.ReLU()
    )
    with torch.no_grad():
        twin[1].weight.uniform_(0.5, 1.5)
        twin[1].bias.uniform_(-0.5, 0.5)
    variables = from_torch_state_dict(model, twin.state_dict(), shape)
    folded, folded_variables = fold_batch_norms(model, variables, shape)
    assert folded.skipped == ()
    x = rng.normal(size=shape).astype(np.float32)
    with torch.no_grad():
        expected = twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    got = folded.apply(folded_variables, jnp.asarray(x), train=False)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5)


def test_a_folded_model_keeps_its_folded_batch_norms_skipped_when_replaced(rng):
    # the replacement ran before the folded model's skip: the BatchNorm folded into the conv
    # became a GroupNorm whose parameters the folded variables no longer have
    model = nn.Sequential(
        [nn.Conv(6, 3, use_bias=False), nn.BatchNorm(), nn.ReLU(), nn.Flatten(), nn.BatchNorm()]
    )
    x = jnp.asarray(rng.normal(size=(2, 6, 6, 3)), jnp.float32)
    folded, variables = fold_batch_norms(
        model, model.init(jax.random.key(0), x, train=False), x.shape
    )
    assert folded.skipped == (("layers_1",),)  # the last BatchNorm follows a flatten: kept
    replaced = replace_batch_norm(folded, num_groups=4)
    ours = replaced.apply(variables, x, train=True)
    params = variables["params"]
    conv = F.conv(x, params["layers_0"]["kernel"], params["layers_0"]["bias"])
    flat = jax.nn.relu(conv).reshape(2, -1)
    expected = F.group_norm(
        flat, params["layers_4"]["scale"], params["layers_4"]["bias"], num_groups=4, eps=1e-5
    )
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    assert [row.layer for row in summary(replaced, x.shape).rows][-1] == "GroupNorm"
