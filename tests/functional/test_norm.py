"""Tests of jcnn.functional.norm against PyTorch (float64) and NumPy loop references."""

import itertools
import math
import re
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec

from jcnn.functional.norm import (
    BatchNormState,
    batch_norm,
    fold_batch_norm,
    group_norm,
    instance_norm,
    layer_norm,
    local_contrast_norm,
    local_response_norm,
)

TOL = 1e-5


def assert_rel_close(actual, expected, tol=TOL, name="value"):
    """Max abs error, relative to the largest reference entry, at most ``tol``."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    error = np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-30)
    assert error <= tol, f"{name}: relative error {error:.2e} > {tol:.0e}"


def random_shape(rng, rank, *, max_channels=6, min_channels=1, min_batch=2):
    """(N, *spatial, C): a small batch, spatial sizes 1 to 5, C in [min_channels, max_channels]."""
    spatial = tuple(int(s) for s in rng.integers(1, 6, size=rank - 2))
    batch = int(rng.integers(min_batch, min_batch + 3))
    return (batch, *spatial, int(rng.integers(min_channels, max_channels + 1)))


def to_torch(torch, array):
    """Channels-last NumPy array as a float64 channels-first torch tensor."""
    return torch.from_numpy(np.moveaxis(np.asarray(array, np.float64), -1, 1).copy())


def from_torch(tensor):
    return np.moveaxis(tensor.detach().numpy(), 1, -1)


def random_affine(rng, channels):
    scale = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    bias = rng.normal(size=channels).astype(np.float32)
    return scale, bias


def jax_value_and_vjp(fn, args, cotangent):
    """``fn(*args)`` and the gradients of ``sum(fn(*args) * cotangent)``, in one compilation."""

    @jax.jit
    def value_and_vjp(args, cotangent):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cotangent)

    return value_and_vjp(args, jnp.asarray(cotangent, jnp.float32))


def torch_value_and_grads(torch, fn, args, cotangent):
    leaves = [torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in args]
    out = fn(*leaves)
    (out * torch.from_numpy(np.asarray(cotangent, np.float64))).sum().backward()
    return out.detach().numpy(), [leaf.grad.numpy() for leaf in leaves]


# ---------------------------------------------------------------- batch norm


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_batch_norm_train_then_eval_matches_torch(torch, rng, rank):
    shape = random_shape(rng, rank, min_batch=6)
    channels = shape[-1]
    momentum = float(rng.uniform(0.5, 0.95))
    scale, bias = random_affine(rng, channels)
    state = BatchNormState(
        jnp.asarray(rng.normal(size=channels), jnp.float32),
        jnp.asarray(rng.uniform(0.5, 2.0, channels), jnp.float32),
    )
    torch_mean = torch.tensor(np.asarray(state.mean, np.float64))
    torch_var = torch.tensor(np.asarray(state.var, np.float64))

    @jax.jit
    def train_step(x, scale, bias, state, cotangent):
        def forward(x, scale, bias):
            return batch_norm(
                x, scale, bias, state, train=True, momentum=momentum, unbiased_running_var=True
            )

        y, vjp, new_state = jax.vjp(forward, x, scale, bias, has_aux=True)
        return y, new_state, vjp(cotangent)

    for step in range(3):
        x = (rng.normal(size=shape) * rng.uniform(0.5, 3.0) + rng.normal()).astype(np.float32)
        cotangent = rng.normal(size=shape)
        y, state, (dx, dscale, dbias) = train_step(
            x, scale, bias, state, cotangent.astype(np.float32)
        )

        def torch_fn(x, scale, bias):
            y = torch.nn.functional.batch_norm(
                torch.movedim(x, -1, 1),
                torch_mean,
                torch_var,
                scale,
                bias,
                training=True,
                momentum=1 - momentum,
                eps=1e-5,
            )
            return torch.movedim(y, 1, -1)

        y_ref, (dx_ref, dscale_ref, dbias_ref) = torch_value_and_grads(
            torch, torch_fn, (x, scale, bias), cotangent
        )
        assert_rel_close(y, y_ref, name=f"step {step} y")
        assert_rel_close(state.mean, torch_mean.numpy(), name=f"step {step} running mean")
        assert_rel_close(state.var, torch_var.numpy(), name=f"step {step} running var")
        assert_rel_close(dx, dx_ref, name=f"step {step} dx")
        assert_rel_close(dscale, dscale_ref, name=f"step {step} dscale")
        assert_rel_close(dbias, dbias_ref, name=f"step {step} dbias")

    x = rng.normal(size=shape).astype(np.float32)
    y, new_state = jax.jit(partial(batch_norm, train=False))(x, scale, bias, state)
    y_ref = torch.nn.functional.batch_norm(
        to_torch(torch, x),
        torch_mean,
        torch_var,
        torch.tensor(scale, dtype=torch.float64),
        torch.tensor(bias, dtype=torch.float64),
        training=False,
        eps=1e-5,
    )
    assert_rel_close(y, from_torch(y_ref), name="eval y")
    np.testing.assert_array_equal(new_state.mean, state.mean)
    np.testing.assert_array_equal(new_state.var, state.var)


@pytest.mark.parametrize("shape", [(0, 3, 3, 4), (2, 0, 3, 4), (0, 4)], ids=["N=0", "H=0", "dense"])
def test_an_empty_batch_keeps_the_running_statistics_as_in_torch(torch, shape):
    state = BatchNormState(jnp.arange(4.0), jnp.arange(1.0, 5.0))
    x = jnp.zeros(shape)
    scale, bias = jnp.ones(4), jnp.zeros(4)
    t_mean, t_var = torch.arange(4.0), torch.arange(1.0, 5.0)
    t_y = torch.nn.functional.batch_norm(
        to_torch(torch, x).float(), t_mean, t_var, training=True, momentum=0.1
    )
    calls = {
        "instance_norm": lambda v, s: instance_norm(v, s, bias, state, momentum=0.9),
        "batch_norm": lambda v, s: batch_norm(v, s, bias, state, train=True, momentum=0.9),
    }
    for name, call in calls.items():
        if name == "instance_norm" and len(shape) < 3:
            continue
        y, new_state = call(x, scale)
        assert y.shape == from_torch(t_y).shape == shape, name
        np.testing.assert_array_equal(new_state.mean, t_mean.numpy(), err_msg=name)
        np.testing.assert_array_equal(new_state.var, t_var.numpy(), err_msg=name)
        grads = jax.grad(lambda v, s, call=call: call(v, s)[0].sum(), argnums=(0, 1))(x, scale)
        assert grads[0].shape == shape and not grads[1].any(), name
    if len(shape) > 2:
        assert instance_norm(x, scale, bias).shape == shape


def test_batch_norm_default_momentum_is_the_notes_running_average(rng):
    """001: mu_test starts at 0 and each training step does mu_test = 0.99 mu_test + 0.01 mu
    ("similar for sigma"): the default momentum, with no argument given."""
    x = rng.normal(3.0, 2.0, size=(8, 4, 4, 3)).astype(np.float32)
    _, state = batch_norm(x, None, None, BatchNormState(jnp.zeros(3), jnp.ones(3)), train=True)
    x64 = x.astype(np.float64).reshape(-1, 3)
    assert_rel_close(state.mean, 0.99 * 0.0 + 0.01 * x64.mean(0), name="mean")
    assert_rel_close(state.var, 0.99 * 1.0 + 0.01 * x64.var(0), name="var")


def test_batch_norm_default_running_var_is_biased(rng):
    x = rng.normal(size=(3, 4, 5, 2)).astype(np.float32)
    state = BatchNormState(jnp.full(2, 0.5), jnp.full(2, 2.0))
    biased_step = jax.jit(partial(batch_norm, train=True, momentum=0.75))
    unbiased_step = jax.jit(
        partial(batch_norm, train=True, momentum=0.75, unbiased_running_var=True)
    )
    _, new_state = biased_step(x, None, None, state)
    x64 = x.astype(np.float64).reshape(-1, 2)
    assert_rel_close(new_state.mean, 0.75 * 0.5 + 0.25 * x64.mean(0), name="mean")
    assert_rel_close(new_state.var, 0.75 * 2.0 + 0.25 * x64.var(0), name="var")
    # The unbiased alternative really differs (the test above can tell them apart).
    _, unbiased = unbiased_step(x, None, None, state)
    assert_rel_close(unbiased.var, 0.75 * 2.0 + 0.25 * x64.var(0, ddof=1), name="unbiased var")
    assert not np.allclose(unbiased.var, new_state.var, rtol=1e-3)


def test_batch_norm_half_precision_keeps_dtypes(rng):
    x = rng.normal(size=(4, 3, 3, 5)).astype(np.float32)
    state = BatchNormState(jnp.zeros(5), jnp.ones(5))
    step = jax.jit(partial(batch_norm, train=True))
    x16 = jnp.asarray(x, jnp.bfloat16)
    y16, state16 = step(x16, None, None, state)
    y32, state32 = step(x16.astype(jnp.float32), None, None, state)
    assert y16.dtype == jnp.bfloat16 and state16.mean.dtype == state16.var.dtype == jnp.float32
    assert_rel_close(y16, y32, tol=1e-2, name="bfloat16 y")
    assert_rel_close(state16.var, state32.var, name="bfloat16 stats are float32")


# ------------------------------------------------------ large common offset


def standardized_reference(x, axes):
    x = np.asarray(x, np.float64)
    centered = x - x.mean(axis=axes, keepdims=True)
    return centered / np.sqrt((centered**2).mean(axis=axes, keepdims=True) + 1e-5)


def test_variance_is_accurate_with_large_common_offset(rng):
    """1e4 + unit noise in float32: E[x^2] - E[x]^2 loses every digit; two passes keep ~1e-6.

    A plain two-pass variance is off by the squared rounding error of the float32 mean (~1e-5
    relative here) and every output by that error (~1e-3): the corrected mean brings both to ~1e-6.
    """
    x = (1e4 + rng.normal(size=(8, 6, 6, 4))).astype(np.float32)
    x64 = x.astype(np.float64)

    naive = jnp.mean(jnp.square(x), axis=(0, 1, 2)) - jnp.square(jnp.mean(x, axis=(0, 1, 2)))
    naive_error = np.max(np.abs(np.asarray(naive) - x64.reshape(-1, 4).var(0)))
    assert naive_error > 1e-2, "the one-pass formula should fail here, else the test is too easy"

    @jax.jit
    def normalize_all(x):
        state = BatchNormState(jnp.zeros(4), jnp.zeros(4))
        y_bn, batch_stats = batch_norm(x, None, None, state, train=True, momentum=0.0)
        outputs = {
            "batch_norm": y_bn,
            "layer_norm": layer_norm(x, None, None),
            "group_norm": group_norm(x, None, None, num_groups=2),
            "instance_norm": instance_norm(x, None, None),
        }
        return outputs, batch_stats.var

    outputs, batch_var = normalize_all(x)
    assert_rel_close(batch_var, x64.reshape(-1, 4).var(0), name="batch_norm var")
    grouped_shape = (8, 6, 6, 2, 2)
    views = {  # name: (shape to view the output in, normalized axes)
        "batch_norm": (x.shape, (0, 1, 2)),
        "layer_norm": (x.shape, (1, 2, 3)),
        "group_norm": (grouped_shape, (1, 2, 4)),
        "instance_norm": (x.shape, (1, 2)),
    }
    for name, (shape, axes) in views.items():
        y = outputs[name]
        y = np.asarray(y, np.float64).reshape(shape)
        expected = standardized_reference(x.reshape(shape), axes)
        assert_rel_close(y.std(axis=axes), expected.std(axis=axes), name=f"{name} std of y")
        assert_rel_close(y, expected, name=f"{name} y")


# ------------------------------------------------------------- cross-device


def test_batch_norm_axis_name_under_vmap_equals_full_batch(rng):
    x = rng.normal(size=(8, 3, 5, 4)).astype(np.float32) * 2 + 1
    scale, bias = random_affine(rng, 4)
    state = BatchNormState(jnp.asarray(rng.normal(size=4)), jnp.asarray(rng.uniform(1, 2, 4)))

    def full(x, scale, bias):
        return batch_norm(x, scale, bias, state, train=True, unbiased_running_var=True)

    def sharded(x, scale, bias):
        def per_shard(shard):
            return batch_norm(
                shard, scale, bias, state, train=True, axis_name="d", unbiased_running_var=True
            )

        y, new_state = jax.vmap(per_shard, axis_name="d")(x.reshape(4, 2, 3, 5, 4))
        return y.reshape(x.shape), new_state

    y_ref, state_ref = jax.jit(full)(x, scale, bias)
    y, stacked_state = jax.jit(sharded)(x, scale, bias)
    assert_rel_close(y, y_ref, name="y")
    for shard in range(4):
        assert_rel_close(stacked_state.mean[shard], state_ref.mean, name="running mean")
        assert_rel_close(stacked_state.var[shard], state_ref.var, name="running var (count 120)")

    cotangent = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    grads_ref = jax.jit(jax.grad(lambda *a: jnp.sum(full(*a)[0] * cotangent), (0, 1, 2)))(
        x, scale, bias
    )
    grads = jax.jit(jax.grad(lambda *a: jnp.sum(sharded(*a)[0] * cotangent), (0, 1, 2)))(
        x, scale, bias
    )
    for name, g, g_ref in zip(("dx", "dscale", "dbias"), grads, grads_ref, strict=True):
        assert_rel_close(g, g_ref, name=name)


def test_batch_norm_over_a_tuple_of_axis_names_equals_full_batch(rng):
    x = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
    state = BatchNormState(jnp.zeros(5), jnp.ones(5))
    y_ref, state_ref = batch_norm(x.reshape(24, 5), None, None, state, train=True)

    def per_shard(shard):
        return batch_norm(shard, None, None, state, train=True, axis_name=("a", "b"))

    y, new_state = jax.vmap(jax.vmap(per_shard, axis_name="b"), axis_name="a")(x)
    assert_rel_close(y.reshape(24, 5), y_ref, name="y")
    assert_rel_close(new_state.mean[1, 2], state_ref.mean, name="running mean")


def test_batch_norm_axis_name_under_shard_map(rng):
    x = rng.normal(size=(4, 3, 2)).astype(np.float32)
    state = BatchNormState(jnp.zeros(2), jnp.ones(2))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("d",))

    def per_shard(x):
        return batch_norm(x, None, None, state, train=True, axis_name="d")

    sharded = jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=PartitionSpec("d"),
        out_specs=(PartitionSpec("d"), PartitionSpec()),
    )
    y, new_state = jax.jit(sharded)(x)
    y_ref, state_ref = batch_norm(x, None, None, state, train=True)
    assert_rel_close(y, y_ref, name="y")
    assert_rel_close(new_state.var, state_ref.var, name="running var")


# ----------------------------------------------------------- vmap == loop


PER_EXAMPLE_OPS = {
    "batch_norm": lambda x: batch_norm(
        x, None, None, BatchNormState(jnp.zeros(4), jnp.ones(4)), train=True
    ),
    "layer_norm": lambda x: layer_norm(x, jnp.arange(1.0, 5.0), None),
    "group_norm": lambda x: group_norm(x, None, jnp.arange(4.0), num_groups=2),
    "instance_norm": lambda x: instance_norm(
        x, None, None, BatchNormState(jnp.zeros(4), jnp.ones(4)), momentum=0.5
    ),
    "local_contrast_norm": lambda x: local_contrast_norm(x, size=3),
    "local_response_norm": lambda x: local_response_norm(x, 3, alpha=0.1),
}


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE_OPS))
def test_vmap_equals_loop(rng, name):
    op = PER_EXAMPLE_OPS[name]
    xs = rng.normal(size=(3, 2, 5, 4, 4)).astype(np.float32)
    batched = jax.jit(jax.vmap(op))(xs)
    op = jax.jit(op)
    looped = [op(x) for x in xs]
    expected = jax.tree.map(lambda *leaves: np.stack(leaves), *looped)
    for leaf, leaf_ref in zip(jax.tree.leaves(batched), jax.tree.leaves(expected), strict=True):
        assert_rel_close(leaf, leaf_ref, name=name)


# ---------------------------------------------- layer, group, instance norm


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_layer_norm_matches_torch(torch, rng, rank):
    shape = random_shape(rng, rank, min_channels=4)  # >= 4 values per example: real gradients
    x = (rng.normal(size=shape) * 3 + 2).astype(np.float32)
    cotangent = rng.normal(size=shape)
    per_channel = random_affine(rng, shape[-1])
    elementwise = tuple(rng.normal(size=shape[1:]).astype(np.float32) for _ in range(2))
    for scale, bias in (per_channel, elementwise):

        def torch_fn(x, scale, bias):
            # torch.nn.LayerNorm([C, *spatial]) in channels-first layout, affine broadcast to it.
            full_scale = torch.movedim(scale.expand(x.shape[1:]), -1, 0)
            full_bias = torch.movedim(bias.expand(x.shape[1:]), -1, 0)
            x_cf = torch.movedim(x, -1, 1)
            y = torch.nn.functional.layer_norm(x_cf, x_cf.shape[1:], full_scale, full_bias, 1e-5)
            return torch.movedim(y, 1, -1)

        y, grads = jax_value_and_vjp(lambda *a: layer_norm(*a), (x, scale, bias), cotangent)
        y_ref, grads_ref = torch_value_and_grads(torch, torch_fn, (x, scale, bias), cotangent)
        assert_rel_close(y, y_ref, name=f"y, scale {scale.shape}")
        for g, g_ref, name in zip(grads, grads_ref, ("dx", "dscale", "dbias"), strict=True):
            assert_rel_close(g, g_ref, name=f"{name}, scale {scale.shape}")


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_group_norm_matches_torch(torch, rng, rank):
    shape = (*random_shape(rng, rank)[:-1], 12)
    group_sizes = [g for g in (1, 2, 3, 4, 6, 12) if np.prod(shape[1:]) // g >= 4]
    num_groups = int(rng.choice(group_sizes))  # at least 4 values per group: no degenerate grads
    x = (rng.normal(size=shape) * 2 - 1).astype(np.float32)
    cotangent = rng.normal(size=shape)
    scale, bias = random_affine(rng, 12)

    def torch_fn(x, scale, bias):
        y = torch.nn.functional.group_norm(torch.movedim(x, -1, 1), num_groups, scale, bias, 1e-5)
        return torch.movedim(y, 1, -1)

    def jcnn_fn(x, scale, bias):
        return group_norm(x, scale, bias, num_groups=num_groups)

    y, grads = jax_value_and_vjp(jcnn_fn, (x, scale, bias), cotangent)
    y_ref, grads_ref = torch_value_and_grads(torch, torch_fn, (x, scale, bias), cotangent)
    assert_rel_close(y, y_ref, name=f"y, {num_groups} groups")
    for g, g_ref, name in zip(grads, grads_ref, ("dx", "dscale", "dbias"), strict=True):
        assert_rel_close(g, g_ref, name=f"{name}, {num_groups} groups")


@pytest.mark.parametrize(
    ("shape", "num_groups"), [((1, 4), 4), ((3, 1, 1, 6), 6), ((2, 1, 1, 1, 5), 5), ((1, 1), 1)]
)
def test_group_norm_with_one_value_per_group_is_refused_as_in_torch(torch, shape, num_groups):
    # every output was the bias (the value minus itself) and the gradient for x zero; PyTorch
    # refuses it for a batch of one (it counts the batch in, so a larger batch passes there)
    x = np.ones(shape, np.float32)
    if shape[0] == 1:
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            torch.nn.functional.group_norm(torch.movedim(torch.tensor(x), -1, 1), num_groups)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"x: expected more than 1 value per group, got 1 (x has shape {shape} and "
            f"num_groups={num_groups})"
        ),
    ):
        group_norm(jnp.asarray(x), None, None, num_groups=num_groups)
    two = group_norm(jnp.array([[1.0, 3.0]]), None, None, num_groups=1)  # two values: fine
    np.testing.assert_allclose(two, [[-1.0, 1.0]], rtol=1e-5)
    assert group_norm(jnp.zeros((0, 4)), None, None, num_groups=4).shape == (0, 4)


@pytest.mark.parametrize("rank", [3, 4, 5])
def test_instance_norm_with_running_stats_matches_torch(torch, rng, rank):
    shape = random_shape(rng, rank)
    shape = (shape[0], *(max(s, 2) for s in shape[1:-1]), shape[-1])
    channels = shape[-1]
    momentum = float(rng.uniform(0.5, 0.95))
    scale, bias = random_affine(rng, channels)
    scale_t, bias_t = (torch.tensor(v, dtype=torch.float64) for v in (scale, bias))
    state = BatchNormState(jnp.zeros(channels), jnp.ones(channels))
    torch_mean = torch.zeros(channels, dtype=torch.float64)
    torch_var = torch.ones(channels, dtype=torch.float64)

    train_step = jax.jit(
        partial(instance_norm, train=True, momentum=momentum, unbiased_running_var=True)
    )
    stateless = jax.jit(instance_norm)
    for step in range(3):
        x = (rng.normal(size=shape) * rng.uniform(0.5, 3.0) + rng.normal()).astype(np.float32)
        y, state = train_step(x, scale, bias, state)
        y_ref = torch.nn.functional.instance_norm(
            to_torch(torch, x),
            torch_mean,
            torch_var,
            scale_t,
            bias_t,
            use_input_stats=True,
            momentum=1 - momentum,
            eps=1e-5,
        )
        assert_rel_close(y, from_torch(y_ref), name=f"step {step} y")
        assert_rel_close(state.mean, torch_mean.numpy(), name=f"step {step} running mean")
        assert_rel_close(state.var, torch_var.numpy(), name=f"step {step} running var")
        assert_rel_close(stateless(x, scale, bias), from_torch(y_ref), name="stateless y")

    x = rng.normal(size=shape).astype(np.float32)
    y, new_state = jax.jit(partial(instance_norm, train=False))(x, scale, bias, state)
    y_ref = torch.nn.functional.instance_norm(
        to_torch(torch, x), torch_mean, torch_var, scale_t, bias_t, use_input_stats=False, eps=1e-5
    )
    assert_rel_close(y, from_torch(y_ref), name="eval y")
    np.testing.assert_array_equal(new_state.var, state.var)


# ------------------------------------------------ local response / contrast


@pytest.mark.parametrize("rank, sizes", [(3, (1, 2, 5)), (4, (3, 4, 7))])
def test_local_response_norm_matches_torch(torch, rng, rank, sizes):
    shape = random_shape(rng, rank, min_channels=5, max_channels=9)
    x = (rng.normal(size=shape) * 4).astype(np.float32)
    for size in sizes:
        alpha, beta, k = float(rng.uniform(1e-3, 0.1)), float(rng.uniform(0.5, 1)), 1.5
        y = jax.jit(partial(local_response_norm, size=size, alpha=alpha, beta=beta, k=k))(x)
        y_ref = torch.nn.functional.local_response_norm(
            to_torch(torch, x), size, alpha=alpha * size, beta=beta, k=k
        )
        assert_rel_close(y, from_torch(y_ref), name=f"size {size}")


def test_local_response_norm_is_alexnet_formula(rng):
    """AlexNet: b_i = a_i / (k + alpha * sum_{j=i-n/2}^{i+n/2} a_j^2)^beta, alpha not over n."""
    x = rng.normal(size=(2, 8)).astype(np.float32)
    n, alpha, beta, k = 5, 0.05, 0.75, 2.0
    expected = np.empty((2, 8))
    for i in range(8):
        window = x[:, max(0, i - n // 2) : min(8, i + n // 2 + 1)].astype(np.float64)
        expected[:, i] = x[:, i] / (k + alpha * (window**2).sum(1)) ** beta
    assert_rel_close(local_response_norm(x, n, alpha=alpha, beta=beta, k=k), expected)


def test_local_response_norm_window_wider_than_the_channels(rng):
    # every size from 2C - 1 up sums all C channels; 2**62 summed 2**62 zeros per output and
    # never returned
    x = rng.normal(size=(2, 3, 5)).astype(np.float32)
    expected = local_response_norm(x, 9, alpha=0.1)
    for size in (10, 2**20, 2**62, 2**63 - 1):
        np.testing.assert_array_equal(local_response_norm(x, size, alpha=0.1), expected)
    even = local_response_norm(x, 4, alpha=0.1)  # channels c - 2 .. c + 1, as before
    assert not np.array_equal(even, expected)


def lcn_reference(x, window, sigmas, eps):
    """Jarrett et al.'s formula summed term by term, weights renormalized inside the image."""
    x = np.asarray(x, np.float64)
    spatial = x.shape[1:-1]
    channels = x.shape[-1]
    offsets = list(itertools.product(*(range(-(k // 2), k // 2 + 1) for k in window)))
    weights = {
        o: np.prod([np.exp(-(d**2) / (2 * s**2)) for d, s in zip(o, sigmas, strict=True)])
        for o in offsets
    }
    total = sum(weights.values()) * channels  # sum over i, p, q of w_pq is 1

    def local_average(z):
        out = np.zeros(z.shape[:-1])
        for pos in itertools.product(*(range(n) for n in spatial)):
            acc, mass = 0.0, 0.0
            for o in offsets:
                q = tuple(p + d for p, d in zip(pos, o, strict=True))
                if all(0 <= c < n for c, n in zip(q, spatial, strict=True)):
                    w = weights[o] / total
                    acc = acc + w * z[(slice(None), *q)].sum(-1)
                    mass += w * channels
            out[(slice(None), *pos)] = acc / mass
        return out

    v = x - local_average(x)[..., None]
    sigma = np.sqrt(local_average(v**2))
    c = sigma.mean(axis=tuple(range(1, sigma.ndim)), keepdims=True)
    divisor = np.maximum(np.maximum(c, sigma), eps)
    return v / divisor[..., None], sigma, c


@pytest.mark.parametrize(
    "shape, size, sigma",
    [((2, 6, 7, 3), 3, 1.0), ((2, 7, 5, 2), (5, 3), None), ((3, 11, 4), 5, 2.0)],
)
def test_local_contrast_norm_matches_formula(rng, shape, size, sigma):
    # A spatial ramp of contrast makes sigma_jk exceed c on one side and not on the other.
    ramp = np.linspace(0.1, 3.0, shape[1]).reshape(1, -1, *([1] * (len(shape) - 2)))
    x = (rng.normal(size=shape) * ramp + 5.0).astype(np.float32)
    window = (size,) * (len(shape) - 2) if isinstance(size, int) else size
    sigmas = tuple(k / 4 for k in window) if sigma is None else (sigma,) * len(window)
    expected, local_std, contrast = lcn_reference(x, window, sigmas, 1e-4)
    assert (local_std > contrast).any() and (local_std < contrast).any()
    y = jax.jit(partial(local_contrast_norm, size=size, sigma=sigma))(x)
    assert_rel_close(y, expected)


def test_local_contrast_norm_window_wider_than_the_image(rng):
    # the reference's window of every width (its own Gaussian): taps past the image weigh only
    # padding; 2**31 + 1 taps filled the memory building them, 2**63 - 1 failed inside XLA
    x = (rng.normal(size=(2, 5, 4, 3)) + 5.0).astype(np.float32)
    for size, sigma in ((9, 3.0), ((13, 21), None), (41, None)):
        window = (size,) * 2 if isinstance(size, int) else size
        sigmas = tuple(k / 4 for k in window) if sigma is None else (sigma,) * 2
        expected, _, _ = lcn_reference(x, window, sigmas, 1e-4)
        assert_rel_close(local_contrast_norm(x, size=size, sigma=sigma), expected)
    flat_window = lcn_reference(x, (9, 7), (1e9, 1e9), 1e-4)[0]  # the whole image, equal weights
    for size in (2**31 + 1, 2**63 - 1):
        assert_rel_close(local_contrast_norm(x, size=size), flat_window)


def test_local_contrast_norm_flat_input_gives_zero_and_finite_gradient():
    x = jnp.full((1, 6, 6, 2), 1000.0)
    y, grad = jax.jit(jax.value_and_grad(lambda x: jnp.sum(local_contrast_norm(x, size=5) ** 2)))(x)
    assert float(y) == 0.0  # exact: the subtracted means of a flat image are exact
    assert np.isfinite(np.asarray(grad)).all()


# ------------------------------------------------------------ fold batch norm


@pytest.mark.parametrize("groups, with_bias", [(1, True), (2, False), (3, True)])
def test_fold_batch_norm_equals_conv_then_batch_norm(rng, groups, with_bias):
    c_in, c_out = 3 * groups, 2 * groups
    x = rng.normal(size=(2, 7, 6, c_in)).astype(np.float32)
    w = rng.normal(size=(3, 2, c_in // groups, c_out)).astype(np.float32)
    b = rng.normal(size=c_out).astype(np.float32) if with_bias else None
    scale, bias = random_affine(rng, c_out)
    state = BatchNormState(
        jnp.asarray(rng.normal(size=c_out), jnp.float32),
        jnp.asarray(rng.uniform(0.1, 3.0, c_out), jnp.float32),
    )

    def conv(x, w, b):
        y = lax.conv_general_dilated(
            x,
            w,
            (2, 1),
            "SAME",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups,
            precision=lax.Precision.HIGHEST,
        )
        return y if b is None else y + b.reshape(1, 1, 1, -1)

    @jax.jit
    def folded_and_reference(x, w, b, scale, bias, state):
        expected, _ = batch_norm(conv(x, w, b), scale, bias, state, train=False)
        w_folded, b_folded = fold_batch_norm(w, b, scale, bias, state)
        return conv(x, w_folded, b_folded), expected, w_folded, b_folded

    y, expected, w_folded, b_folded = folded_and_reference(x, w, b, scale, bias, state)
    assert w_folded.shape == w.shape and b_folded.shape == (c_out,)
    assert_rel_close(y, expected)


def test_fold_batch_norm_dense(rng):
    x = rng.normal(size=(5, 4)).astype(np.float32)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    state = BatchNormState(jnp.asarray(rng.normal(size=3)), jnp.asarray(rng.uniform(1, 2, 3)))
    expected, _ = batch_norm(x @ w, None, None, state, train=False, eps=1e-3)
    w_folded, b_folded = fold_batch_norm(w, None, None, None, state, eps=1e-3)
    assert_rel_close(x @ w_folded + b_folded.reshape(1, 3), expected)


# ----------------------------------------------------------------- bad input


X4 = jnp.zeros((2, 3, 3, 16))
STATE16 = BatchNormState(jnp.zeros(16), jnp.ones(16))

BAD_INPUTS = [
    (
        lambda: batch_norm(X4, None, None, BatchNormState(jnp.zeros(8), jnp.ones(16)), train=True),
        ValueError,
        "state.mean: expected shape (C,)=(16,), got (8,)",
    ),
    (
        lambda: batch_norm(jnp.zeros(4), None, None, STATE16, train=True),
        ValueError,
        "x: expected rank >= 2 (N, ..., C), got rank 1 with shape (4,)",
    ),
    (
        lambda: batch_norm(X4.astype(jnp.int32), None, None, STATE16, train=True),
        TypeError,
        "x: expected a floating-point array, got dtype int32",
    ),
    (
        lambda: batch_norm(X4, jnp.ones(15), None, STATE16, train=True),
        ValueError,
        "scale: expected shape (C,)=(16,), got (15,)",
    ),
    (
        lambda: batch_norm(X4, None, None, STATE16, train=True, momentum=1.5),
        ValueError,
        "momentum: expected a number in [0, 1], got 1.5",
    ),
    (
        lambda: batch_norm(X4, None, None, STATE16, train=True, eps=0.0),
        ValueError,
        "eps: expected a finite number > 0, got 0.0",
    ),
    (
        lambda: batch_norm(X4, None, None, STATE16, train=jnp.array(True)),
        TypeError,
        "train: expected a Python bool",
    ),
    (
        lambda: batch_norm(X4, None, None, None, train=True),
        TypeError,
        "state: expected a BatchNormState(mean, var), got None",
    ),
    (
        lambda: batch_norm(
            jnp.zeros((1, 16)), None, None, STATE16, train=True, unbiased_running_var=True
        ),
        ValueError,
        "x: expected more than 1 value per channel when training (x has shape (1, 16)), got 1",
    ),
    (
        lambda: batch_norm(X4, None, None, STATE16, train=True, axis_name="batch"),
        ValueError,
        "axis_name: expected the name of an axis mapped around this call (jax.vmap, shard_map or "
        "pmap with axis_name=...), got 'batch'",
    ),
    (
        lambda: batch_norm(X4, None, None, STATE16, train=True, axis_name=5),
        TypeError,
        "axis_name: expected None, the name (a str) of an axis mapped around this call by "
        "jax.vmap, shard_map or pmap, or a non-empty tuple of such names, got 5",
    ),
    (
        lambda: batch_norm(X4, None, None, STATE16, train=False, axis_name=5),
        TypeError,
        "axis_name: expected None, the name (a str) of an axis mapped around this call by "
        "jax.vmap, shard_map or pmap, or a non-empty tuple of such names, got 5",
    ),
    (
        lambda: batch_norm(X4, None, None, STATE16, train=True, axis_name=["b"]),
        TypeError,
        "axis_name: expected None, the name (a str) of an axis mapped around this call by "
        "jax.vmap, shard_map or pmap, or a non-empty tuple of such names, got ['b']",
    ),
    (
        lambda: batch_norm(X4, None, None, STATE16, train=True, axis_name=()),
        TypeError,
        "axis_name: expected None, the name (a str) of an axis mapped around this call by "
        "jax.vmap, shard_map or pmap, or a non-empty tuple of such names, got ()",
    ),
    (
        lambda: batch_norm(X4, None, None, STATE16, train=True, axis_name=("b", 0)),
        TypeError,
        "axis_name: expected None, the name (a str) of an axis mapped around this call by "
        "jax.vmap, shard_map or pmap, or a non-empty tuple of such names, got ('b', 0)",
    ),
    (
        lambda: layer_norm(X4, jnp.ones((3, 16)), None),
        ValueError,
        "scale: expected shape (C,)=(16,) or the per-example shape (3, 3, 16), got (3, 16)",
    ),
    (
        lambda: group_norm(X4, None, None, num_groups=3),
        ValueError,
        "num_groups: must divide the number of channels C=16, got 3",
    ),
    (
        lambda: group_norm(X4, None, None, num_groups=0),
        ValueError,
        "num_groups: every entry must be >= 1",
    ),
    (
        lambda: group_norm(X4, None, None, num_groups=(4,)),
        TypeError,
        "num_groups: expected an int >= 1, got (4,)",
    ),
    (
        lambda: group_norm(X4, None, None, num_groups=4.0),
        TypeError,
        "num_groups: expected an int >= 1, got 4.0",
    ),
    (
        lambda: instance_norm(jnp.zeros((2, 16)), None, None),
        ValueError,
        "x: expected rank >= 3 (N, *spatial, C), got rank 2 with shape (2, 16)",
    ),
    (
        lambda: instance_norm(X4, None, None, BatchNormState(jnp.zeros(16), jnp.ones(4))),
        ValueError,
        "state.var: expected shape (C,)=(16,), got (4,)",
    ),
    (
        lambda: local_contrast_norm(X4, size=4),
        ValueError,
        "size: expected odd window widths, got 4",
    ),
    (
        lambda: local_contrast_norm(X4, size=3, sigma=-1.0),
        ValueError,
        "sigma: expected a finite number > 0, got -1.0",
    ),
    (
        lambda: local_contrast_norm(jnp.zeros((1, 2, 2, 2, 2, 2)), size=3),
        ValueError,
        "x: expected 1 to 3 spatial axes (rank 3 to 5), got rank 6",
    ),
    (
        lambda: local_response_norm(X4, 0),
        ValueError,
        "size: every entry must be >= 1, got 0",
    ),
    (
        lambda: local_response_norm(X4, [3]),
        TypeError,
        "size: expected an int >= 1, got [3]",
    ),
    (
        lambda: local_response_norm(X4, 3, alpha=-1e-4),
        ValueError,
        "alpha: expected a finite number >= 0, got -0.0001",
    ),
    (
        lambda: local_response_norm(X4, 3, k=0.0),
        ValueError,
        "k: expected a finite number > 0, got 0.0",
    ),
    (
        lambda: fold_batch_norm(jnp.zeros((3, 3, 2, 4)), jnp.zeros(3), None, None, STATE16),
        ValueError,
        "b: expected shape (C_out,)=(4,), got (3,)",
    ),
]


@pytest.mark.parametrize("call, error, message", BAD_INPUTS, ids=[m for *_, m in BAD_INPUTS])
def test_bad_input_is_reported(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


@pytest.mark.parametrize("axes", [(0, 1, 2), (1, 2), (1, 2, 3)], ids=["batch", "instance", "layer"])
def test_closed_form_derivative_equals_autodiff_of_the_statistics(rng, axes):
    # The closed-form derivative behind every norm against autodiff of the textbook formula, in
    # float64: reverse mode with cotangents on all three outputs (y, and the mean and variance the
    # running stats use), forward mode, and one order further (the gradient of a gradient norm).
    from jcnn.functional.norm import _normalize

    def textbook(x, scale, bias):
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
        return scale * (x - mean) / jnp.sqrt(var + 1e-3) + bias, mean, var

    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(3, 5, 4, 6)) * 2 + 1)
        # Per-channel affine where it is constant along the reduced axes, else scalars.
        affine_shape = (1, 1, 1, 6) if 3 not in axes else (1, 1, 1, 1)
        if 0 not in axes:
            affine_shape = (3, *affine_shape[1:])
        scale = jnp.asarray(rng.normal(size=affine_shape))
        bias = jnp.asarray(rng.normal(size=affine_shape))
        normalize = partial(_normalize, axes=axes, eps=1e-3)
        shapes = jax.eval_shape(normalize, x, scale, bias)
        cotangents = tuple(jnp.asarray(rng.normal(size=o.shape)) for o in shapes)
        directions = tuple(jnp.asarray(rng.normal(size=a.shape)) for a in (x, scale, bias))

        def gradient_norm(normalize, x, scale):
            loss = lambda x, scale: jnp.sum(jnp.sin(normalize(x, scale, bias)[0]))  # noqa: E731
            return sum(jnp.sum(d**2) for d in jax.grad(loss, argnums=(0, 1))(x, scale))

        # Everything of one implementation in one compiled program (eagerly, each of its many
        # small operations compiled on its own, which took most of this test's time).
        @partial(jax.jit, static_argnums=0)
        def derivatives(normalize, x, scale, bias):
            outputs, vjp = jax.vjp(normalize, x, scale, bias)
            _, tangents = jax.jvp(normalize, (x, scale, bias), directions)
            second = jax.grad(partial(gradient_norm, normalize), argnums=(0, 1))(x, scale)
            return outputs, vjp(cotangents), tangents, second

        outputs, pulled, tangents, second = derivatives(normalize, x, scale, bias)
        expected = derivatives(textbook, x, scale, bias)
        for got, want in zip(outputs, expected[0], strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
        for got, want in zip(pulled, expected[1], strict=True):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
        for a, b in zip(tangents, expected[2], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
        for a, b in zip(second, expected[3], strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_batch_norm_gradient_reduces_the_cotangent_twice(rng):
    # sum(g) and sum(x_hat * g) serve the input, scale and bias gradients alike: a third full
    # pass over g would be a pass over the largest arrays of the backward step.
    from jcnn import native

    x = jnp.asarray(rng.normal(size=(4, 5, 5, 3)), jnp.float32)
    scale, bias = jnp.ones(3), jnp.zeros(3)
    state = BatchNormState(jnp.zeros(3), jnp.ones(3))
    with native.conv_backend_scope("xla"):
        _, vjp = jax.vjp(lambda *a: batch_norm(*a, state, train=True)[0], x, scale, bias)
        eqns = jax.make_jaxpr(vjp)(jnp.ones_like(x)).jaxpr.eqns
    passes = [
        e for e in eqns if e.primitive.name == "reduce_sum" and e.invars[0].aval.shape == x.shape
    ]
    assert len(passes) == 2, [str(e) for e in passes]


def test_native_batch_norm_gradient_reduces_the_cotangent_in_one_pass(onednn, rng):
    # With the native library both sums are one call reading g and x once, in reverse mode
    # (the gradient) and forward mode alike; no full-size reduction is left to XLA.
    x = jnp.asarray(rng.normal(size=(4, 5, 5, 3)), jnp.float32)
    scale, bias = jnp.ones(3), jnp.zeros(3)
    state = BatchNormState(jnp.zeros(3), jnp.ones(3))

    def normalize(*args):
        return batch_norm(*args, state, train=True)[0]

    with onednn.conv_backend_scope("onednn"):
        _, vjp = jax.vjp(normalize, x, scale, bias)
        backward = jax.make_jaxpr(vjp)(jnp.ones_like(x)).jaxpr.eqns
        forward = jax.make_jaxpr(lambda *a: jax.jvp(normalize, a, (jnp.ones_like(x), scale, bias)))(
            x, scale, bias
        ).jaxpr.eqns
    for eqns in (backward, forward):
        names = [e.primitive.name for e in eqns]
        full_size = [
            e
            for e in eqns
            if e.primitive.name == "reduce_sum" and e.invars[0].aval.shape == x.shape
        ]
        assert names.count("jcnn_centered_sums") == 1 and not full_size, names


# ------------------------------------------------- one-pass statistics (native library)


def onednn_and_xla(fn, *args):
    """``fn(*args)`` traced and compiled once with each backend: (native, XLA)."""
    from jcnn import native

    results = []
    for backend in ("onednn", "xla"):
        with native.conv_backend_scope(backend):  # a fresh function: jit caches traces by function
            results.append(jax.jit(lambda *args: fn(*args))(*args))
    return results


@pytest.mark.parametrize("seed", range(12))
def test_one_pass_statistics_are_float64_moments_rounded_once(onednn, seed):
    # Offsets up to 1e4 times the spread and rows spanning several of the kernel's blocks: the
    # batch mean and variance (momentum 0 puts them in the state) are the float64 moments rounded
    # once to float32, where XLA's float32 passes are off by ~1e-6 relative.
    rng = np.random.default_rng(seed)
    channels = int(rng.choice([1, 3, 16, 33, 70]))
    rank = int(rng.integers(2, 6))
    rows = int(rng.choice([1, 2, 7, 1000, 40_000])) * (2 if channels == 1 else 1)
    spatial = [1] * (rank - 2)
    if spatial:
        spatial[0] = int(rng.integers(1, 4))
    batch = max(2, rows // max(1, math.prod(spatial)))
    shape = (batch, *spatial, channels)
    offset = rng.choice([0.0, 1e4, -3e3]) * rng.uniform(0.5, 1.5, channels)
    spread = rng.choice([1e-3, 1.0, 50.0])
    x = (offset + spread * rng.normal(size=shape)).astype(np.float32)
    state = BatchNormState(jnp.zeros(channels), jnp.zeros(channels))

    with onednn.conv_backend_scope("onednn"):
        _, stats = jax.jit(partial(batch_norm, train=True, momentum=0.0))(x, None, None, state)
    x64 = x.astype(np.float64).reshape(-1, channels)
    for got, want in ((stats.mean, x64.mean(0)), (stats.var, x64.var(0))):
        ulp = np.spacing(np.abs(want).astype(np.float32)).astype(np.float64)
        np.testing.assert_array_less(np.abs(np.asarray(got, np.float64) - want), ulp)


@pytest.mark.parametrize("norm", ["batch", "instance"])
@pytest.mark.parametrize("seed", range(3))
def test_one_pass_statistics_agree_with_xla_in_every_transformation(onednn, rng, norm, seed):
    # Values, reverse mode (x, scale, bias), forward mode, a second-order gradient and vmap of
    # per-batch gradients: the native statistics against XLA's, to float32 tolerance.
    rank = 2 + seed if norm == "batch" else 3 + seed
    shape = random_shape(rng, rank, max_channels=9, min_batch=3)
    x = jnp.asarray(rng.normal(size=shape) * 3 + 20, jnp.float32)
    scale, bias = (jnp.asarray(a) for a in random_affine(rng, shape[-1]))
    probe = jnp.asarray(rng.normal(size=shape), jnp.float32)

    def normalize(x, scale, bias):
        if norm == "instance":
            return instance_norm(x, scale, bias)
        state = BatchNormState(jnp.zeros(shape[-1]), jnp.ones(shape[-1]))
        return batch_norm(x, scale, bias, state, train=True)[0]

    def loss(x, scale, bias):
        return jnp.sum(jnp.sin(normalize(x, scale, bias)) * probe)

    def transformations(x, scale, bias):
        def grad_norm(x):
            return jnp.sum(jax.grad(loss)(x, scale, bias) ** 2)

        return {
            "value": normalize(x, scale, bias),
            "grad": jax.grad(loss, argnums=(0, 1, 2))(x, scale, bias),
            "jvp": jax.jvp(lambda x: normalize(x, scale, bias), (x,), (probe,))[1],
            "grad of grad norm": jax.grad(grad_norm)(x),
            "vmap grad": jax.vmap(jax.grad(loss), in_axes=(0, None, None))(
                jnp.stack([x, 2 * x - 5]), scale, bias
            ),
            "vmap over scale only": jax.vmap(
                jax.grad(loss, argnums=(0, 1)), in_axes=(None, 0, None)
            )(x, jnp.stack([scale, -2 * scale]), bias),
            "forward over reverse": jax.jvp(
                lambda x: jax.grad(loss, argnums=(0, 1))(x, scale, bias), (x,), (probe,)
            )[1],
        }

    native_results, xla_results = onednn_and_xla(transformations, x, scale, bias)
    for name in xla_results:
        for got, want in zip(
            jax.tree.leaves(native_results[name]), jax.tree.leaves(xla_results[name]), strict=True
        ):
            assert_rel_close(got, want, tol=2e-5, name=f"{norm} norm {name}")


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_one_pass_statistics_per_example_gradients_of_scale_and_bias(onednn, rng, norm):
    # Differentiated with respect to the scale and bias alone under vmap over examples, the
    # derivative's tangent is an unmapped zero beside a mapped x: the native sums broadcast it
    # (they raised "Incompatible types for broadcasting"), and equal a loop over the examples.
    x = jnp.asarray(rng.normal(size=(4, 1, 3, 2, 5)), jnp.float32)
    scale, bias = (jnp.asarray(a) for a in random_affine(rng, 5))

    def loss(scale, bias, x):
        if norm == "instance":
            return jnp.sum(2.0 * instance_norm(x, scale, bias))
        state = BatchNormState(jnp.zeros(5), jnp.ones(5))
        return jnp.sum(2.0 * batch_norm(x, scale, bias, state, train=True)[0])

    grad = jax.grad(loss, argnums=(0, 1))
    with onednn.conv_backend_scope("onednn"):
        mapped = jax.jit(jax.vmap(grad, in_axes=(None, None, 0)))(scale, bias, x)
        looped = [jax.jit(grad)(scale, bias, example) for example in x]
    for got, want in zip(mapped, zip(*looped, strict=True), strict=True):
        assert_rel_close(got, np.stack(want), tol=1e-5, name=f"{norm} norm per-example gradient")


def test_one_pass_statistics_outside_jit_equal_those_inside(onednn, rng):
    x = jnp.asarray(rng.normal(size=(5, 3, 4, 9)) + 3, jnp.float32)
    scale, bias = (jnp.asarray(a) for a in random_affine(rng, 9))
    state = BatchNormState(jnp.zeros(9), jnp.ones(9))

    def loss(x, scale):
        y, stats = batch_norm(x, scale, bias, state, train=True)
        return jnp.sum(jnp.tanh(y)) + jnp.sum(stats.var)

    with onednn.conv_backend_scope("onednn"):
        jitted = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, scale)
        with jax.disable_jit():
            eager = jax.grad(loss, argnums=(0, 1))(x, scale)
    for got, want in zip(eager, jitted, strict=True):
        assert_rel_close(got, want, tol=1e-6, name="eager gradient")


def test_native_batch_norm_lowers_to_xla_on_other_platforms(onednn, rng):
    # Traced with the native backend but lowered for a GPU: the statistics, the derivative's
    # sums and their transposes all become XLA's operations, no custom call.
    x = jnp.asarray(rng.normal(size=(4, 3, 3, 5)), jnp.float32)
    state = BatchNormState(jnp.zeros(5), jnp.ones(5))

    def derivatives(x, scale):
        def loss(x, scale):
            return jnp.sum(jnp.sin(batch_norm(x, scale, None, state, train=True)[0]))

        instance = jax.jvp(lambda x: instance_norm(x, scale, None), (x,), (x,))
        return jax.grad(loss, argnums=(0, 1))(x, scale), jax.hessian(loss)(x, scale), instance

    with onednn.conv_backend_scope("onednn"):
        exported = jax.export.export(jax.jit(derivatives), platforms=["cuda"])(x, jnp.ones(5))
        text = jax.jit(derivatives).lower(x, jnp.ones(5)).as_text()
    assert "custom_call" not in exported.mlir_module()
    assert "jcnn_centered_sums" in text and "jcnn_channel_moments" in text  # on CPU: native


def test_one_pass_statistics_of_non_finite_values_are_numpys(onednn):
    # An infinity makes the mean infinite and the variance NaN, as NumPy's float64 moments are
    # (XLA's corrected two-pass mean turns it into NaN); opposite infinities or a NaN give NaN.
    x = np.ones((6, 4, 5), np.float32) * np.arange(5, dtype=np.float32)
    for index, value in zip(
        [(2, 1, 0), (0, 0, 1), (3, 2, 2), (5, 3, 2), (1, 1, 3)],
        [np.inf, -np.inf, np.inf, -np.inf, np.nan],
        strict=True,
    ):
        x[index] = value
    state = BatchNormState(jnp.zeros(5), jnp.zeros(5))
    with onednn.conv_backend_scope("onednn"):
        _, stats = jax.jit(partial(batch_norm, train=True, momentum=0.0))(x, None, None, state)
    x64 = x.astype(np.float64).reshape(-1, 5)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(stats.mean, x64.mean(0).astype(np.float32))
        np.testing.assert_array_equal(stats.var, x64.var(0).astype(np.float32))


def test_one_pass_statistics_serve_batch_and_instance_norm_only(onednn, rng):
    # One custom call per batch or instance norm in training, none where the statistics span the
    # channels (layer and group norm), in float64, or with the XLA backend.
    x = jnp.asarray(rng.normal(size=(4, 3, 3, 6)), jnp.float32)
    state = BatchNormState(jnp.zeros(6), jnp.ones(6))
    calls = {
        "batch": lambda x: batch_norm(x, None, None, state, train=True)[0],
        "instance": lambda x: instance_norm(x, None, None),
        "layer": lambda x: layer_norm(x, None, None),
        "group": lambda x: group_norm(x, None, None, num_groups=2),
    }
    for backend in ("onednn", "xla"):
        for name, call in calls.items():
            with onednn.conv_backend_scope(backend):  # partial: a fresh function to trace
                text = jax.jit(partial(call)).lower(x).as_text()
            expected = int(backend == "onednn" and name in ("batch", "instance"))
            assert text.count("jcnn_channel_moments") == expected, (backend, name)
    with jax.enable_x64(True), onednn.conv_backend_scope("onednn"):
        text = jax.jit(calls["batch"]).lower(x.astype(jnp.float64)).as_text()
    assert "jcnn_channel_moments" not in text
