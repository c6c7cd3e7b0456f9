"""Tests of jcnn.analysis.fold: folded networks equal the originals in eval mode."""

import flax
import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcnn
from jcnn import nn
from jcnn.analysis import FoldedModel, fold_batch_norms, summary


def _randomize_batch_norms(variables, rng):
    """Random BN scale/bias and running statistics (a 'trained' network), other params kept."""

    def visit(params, stats):
        for name, value in params.items():
            if isinstance(value, dict):
                visit(value, stats.get(name, {}) if stats else {})
        if stats and "mean" in stats:
            channels = stats["mean"].shape
            stats["mean"] = jnp.asarray(rng.normal(0, 0.5, channels), jnp.float32)
            stats["var"] = jnp.asarray(rng.uniform(0.3, 3.0, channels), jnp.float32)
            if "scale" in params:
                params["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, channels), jnp.float32)
            if "bias" in params:
                params["bias"] = jnp.asarray(rng.normal(0, 0.2, channels), jnp.float32)

    variables = _to_dict(variables)
    visit(variables["params"], variables["batch_stats"])
    return variables


def _random_variables(model, x, rng):
    """Variables with scaled normal values, without running ``init`` (fan-in from the shape)."""
    shapes = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), x)

    def draw(leaf):
        fan_in = max(int(np.prod(leaf.shape[:-1])), 1)
        return jnp.asarray(rng.normal(0, 1 / np.sqrt(fan_in), leaf.shape), jnp.float32)

    return jax.tree.map(draw, shapes)


def _to_dict(tree):
    return {k: _to_dict(v) for k, v in tree.items()} if hasattr(tree, "items") else tree


def _relative_error(folded, original):
    folded, original = np.asarray(folded), np.asarray(original)
    return float(np.abs(folded - original).max() / np.abs(original).max())


def _check_fold(model, shape, rng, expected_pairs):
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    variables = _randomize_batch_norms(_random_variables(model, x, rng), rng)
    folded_model, folded = fold_batch_norms(model, variables, shape)
    assert isinstance(folded_model, FoldedModel)
    assert len(folded_model.skipped) == expected_pairs
    assert "batch_stats" not in folded
    original = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
    result = jax.jit(folded_model.apply)(folded, x)
    assert _relative_error(result, original) < 1e-5
    # The folded network has no BatchNorm left: 2 parameters per BN channel are gone.
    bn_params = sum(row.params for row in summary(model, shape).rows if row.layer == "BatchNorm")
    count = sum(p.size for p in jax.tree.leaves(folded["params"]))
    bias_added = sum(_node(folded["params"], path)["bias"].size for path in folded_model.added_bias)
    assert (
        count == sum(p.size for p in jax.tree.leaves(variables["params"])) - bn_params + bias_added
    )
    return folded_model, folded


def _node(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def test_fold_vgg_with_batch_norm(rng):
    model = jcnn.models.VGG(depth=11, batch_norm=True, num_classes=10, small_input=True)
    folded_model, folded = _check_fold(model, (2, 32, 32, 3), rng, expected_pairs=8)
    # Convs with a bias keep their paths; the BN entries are gone.
    assert set(folded["params"]) == {
        f"conv{s}" for s in ("1_1", "2_1", "3_1", "3_2", "4_1", "4_2", "5_1", "5_2")
    } | {"fc"}
    assert folded_model.added_bias == ()


def test_fold_resnet20_with_random_statistics(rng):
    model = jcnn.models.resnet20()
    folded_model, folded = _check_fold(model, (2, 16, 16, 3), rng, expected_pairs=19)
    # The convs had no bias: each gets the folded one.
    assert len(folded_model.added_bias) == 19
    assert folded["params"]["layer2_0"]["conv1"]["bias"].shape == (32,)


def test_fold_projection_shortcuts_and_dense(rng):
    model = nn.Sequential(
        [
            nn.Conv(4, 3, padding=1),
            nn.BatchNorm(),
            jcnn.models.resnet.BasicBlock(6, stride=2),
            nn.Flatten(),
            nn.Dense(5),
            nn.BatchNorm(use_scale=False),
            nn.ReLU(),
            nn.Dense(3),
        ]
    )
    folded_model, _ = _check_fold(model, (3, 8, 8, 2), rng, expected_pairs=5)
    assert ("layers_2", "downsample_conv") in folded_model.added_bias


def test_fold_depthwise_and_transposed_convs(rng):
    # they were left unfolded, BatchNorm and statistics kept, although they are convs too; a
    # transposed conv with groups keeps features // groups outputs on its kernel's last axis
    model = nn.Sequential(
        [
            nn.DepthwiseConv(3, depth_multiplier=2, padding=1, use_bias=False),
            nn.BatchNorm(),
            nn.ConvTranspose(4, (2, 3), stride=2, groups=2, output_padding=1),
            nn.BatchNorm(use_scale=False),
            nn.ReLU(),
            nn.ConvTranspose(3, 3, padding=1, use_bias=False),
            nn.BatchNorm(),
        ]
    )
    folded_model, folded = _check_fold(model, (2, 5, 4, 3), rng, expected_pairs=3)
    assert folded_model.added_bias == (("layers_0",), ("layers_5",))
    assert folded["params"]["layers_2"]["kernel"].shape == (2, 3, 6, 2)


def test_unfoldable_batch_norm_is_kept(rng):
    """A BN after an activation (not after a conv) stays, with its statistics."""
    model = nn.Sequential([nn.Conv(3, 3), nn.ReLU(), nn.BatchNorm(), nn.Conv(2, 1), nn.BatchNorm()])
    shape = (2, 6, 6, 1)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    variables = _randomize_batch_norms(model.init(jax.random.key(0), x, train=False), rng)
    folded_model, folded = fold_batch_norms(model, variables, shape)
    assert folded_model.skipped == (("layers_4",),)
    assert list(folded["batch_stats"]) == ["layers_2"]
    original = model.apply(variables, x, train=False)
    assert _relative_error(folded_model.apply(folded, x), original) < 1e-5


def test_folded_model_initializes_the_bias_it_adds(rng):
    """A conv built without a bias gets one from the folding: the folded model's own init makes
    it (the variables' structure equals the folded ones), and apply on variables lacking it
    names it."""
    model = jcnn.models.resnet20(widths=(4, 8, 8))
    shape = (2, 16, 16, 3)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    variables = _randomize_batch_norms(_random_variables(model, x, rng), rng)
    folded_model, folded = fold_batch_norms(model, variables, shape)
    fresh = jax.eval_shape(folded_model.init, jax.random.key(0), x)
    assert jax.tree.structure(fresh) == jax.tree.structure(folded)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, folded)
    del folded["params"]["conv1"]["bias"]
    with pytest.raises(flax.errors.ScopeParamNotFoundError, match='"bias" in scope "/conv1"'):
        folded_model.apply(folded, x)


class _ConvKeptUnfolded(linen.Module):
    """A BatchNorm after an add is not folded: a second folding must leave it too."""

    @linen.compact
    def __call__(self, x, train=False):
        y = nn.BatchNorm(name="bn1")(
            nn.Conv(3, 3, padding=1, use_bias=False, name="conv1")(x), train
        )
        y = nn.BatchNorm(name="bn2")(y + nn.Conv(3, 1, name="side")(x), train)
        return nn.Dense(2, name="head")(nn.Flatten()(y))


@pytest.mark.parametrize("model", [_ConvKeptUnfolded(), jcnn.models.resnet20(widths=(4, 8, 8))])
def test_a_folded_model_is_summarized_and_folded_again(model, rng):
    # its layers report paths under "model" while their variables sit in the folded model's
    # (shared) scope: summary failed with an IndexError, and a second folding looked for the
    # folded BatchNorms' statistics
    shape = (2, 8, 8, 3)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    variables = _randomize_batch_norms(_random_variables(model, x, rng), rng)
    folded_model, folded = fold_batch_norms(model, variables, shape)
    table = summary(folded_model, shape)
    original = summary(model, shape)
    assert table.total_params == sum(p.size for p in jax.tree.leaves(folded["params"]))
    skipped = {"/".join(path) for path in folded_model.skipped}
    added_bias = {"/".join(path) for path in folded_model.added_bias}
    kept = [row for row in original.rows if row.name not in skipped]
    assert [row.name for row in table.rows] == [row.name for row in kept]
    for row, before in zip(table.rows, kept, strict=True):
        bias = before.output_shape[-1] if before.name in added_bias else 0
        assert row.params == before.params + bias, row.name
        assert row.macs == before.macs and row.output_shape == before.output_shape
    again, refolded = fold_batch_norms(folded_model, folded, shape)
    assert again.model is model  # one wrapper, not a FoldedModel of a FoldedModel
    assert again.skipped == folded_model.skipped and again.added_bias == folded_model.added_bias
    expected = model.apply(variables, x, train=False)
    assert _relative_error(again.apply(refolded, x), expected) < 1e-5


class _Wrapper(linen.Module):
    """Calls ``inner`` as a submodule (a folded backbone inside a user's model)."""

    inner: linen.Module

    @linen.compact
    def __call__(self, x, train=False):
        return self.inner(x, train=train)


def test_a_folded_model_inside_another_is_summarized_and_folded(rng):
    # the BatchNorms a FoldedModel skips showed as rows of the wrapping model's table, and
    # folding the wrapping model looked for their statistics (a ValueError on valid variables)
    model = nn.Sequential([nn.Conv(3, 3, use_bias=False), nn.BatchNorm(), nn.ReLU()])
    shape = (2, 6, 6, 2)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    variables = _randomize_batch_norms(model.init(jax.random.key(0), x, train=False), rng)
    folded_model, folded = fold_batch_norms(model, variables, shape)
    wrapped, wrapped_variables = _Wrapper(folded_model), {"params": {"inner": folded["params"]}}
    table = summary(wrapped, shape)
    assert [row.name for row in table.rows] == ["inner/layers_0", "inner/layers_2"]
    assert table.total_params == 3 * 3 * 2 * 3 + 3
    again, refolded = fold_batch_norms(wrapped, wrapped_variables, shape)
    assert again.skipped == ()
    assert jax.tree.all(jax.tree.map(np.array_equal, refolded, wrapped_variables))
    expected = model.apply(variables, x, train=False)
    assert _relative_error(again.apply(refolded, x), expected) < 1e-5


def test_a_second_folding_folds_a_batch_norm_the_first_left_behind_another(rng):
    # conv -> bn1 -> bn2: the first folding takes bn1 only; with bn1 gone, bn2 follows the conv
    model = nn.Sequential([nn.Conv(3, 3), nn.BatchNorm(), nn.BatchNorm()])
    shape = (2, 5, 5, 2)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    variables = _randomize_batch_norms(model.init(jax.random.key(0), x, train=False), rng)
    folded_model, folded = fold_batch_norms(model, variables, shape)
    assert folded_model.skipped == (("layers_1",),)
    again, refolded = fold_batch_norms(folded_model, folded, shape)
    assert again.skipped == (("layers_1",), ("layers_2",)) and "batch_stats" not in refolded
    expected = model.apply(variables, x, train=False)
    assert _relative_error(again.apply(refolded, x), expected) < 1e-5


class _ConvOutputAlsoAdded(linen.Module):
    """``bn(conv(x)) + conv(x)``: the conv's output has a use that is no module call."""

    @linen.compact
    def __call__(self, x, train=False):
        y = nn.Conv(2, 3, padding=1, name="conv")(x)
        return nn.Conv(2, 1, name="head")(nn.BatchNorm(eps=0.2, name="bn")(y, train) + y)


def test_layer_whose_output_is_also_used_elsewhere_is_not_folded(rng):
    model = nn.Sequential([_ConvOutputAlsoAdded(), nn.Conv(2, 3), nn.BatchNorm()])
    shape = (2, 6, 6, 2)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    variables = _randomize_batch_norms(model.init(jax.random.key(0), x, train=False), rng)
    folded_model, folded = fold_batch_norms(model, variables, shape)
    assert folded_model.skipped == (("layers_2",),)  # the pair after it is still folded
    assert list(folded["batch_stats"]) == ["layers_0"]
    original = model.apply(variables, x, train=False)
    assert _relative_error(folded_model.apply(folded, x), original) < 1e-5


def test_a_batch_norm_first_in_a_container_fed_the_layer_output_is_folded(rng):
    """The container fed the conv's output is no second use of it: the BatchNorm it runs first
    folds (a norm-activation block), and a residual that also adds that output does not."""
    norm_act = nn.Sequential([nn.Conv(3, 3, padding=1), nn.Sequential([nn.BatchNorm(), nn.ReLU()])])
    folded_model, _ = _check_fold(norm_act, (2, 6, 6, 2), rng, 1)
    assert folded_model.skipped == (("layers_1", "layers_0"),)
    residual = nn.Sequential([nn.Conv(2, 3, padding=1), nn.Residual(nn.BatchNorm())])
    shape = (2, 6, 6, 2)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    variables = _randomize_batch_norms(_random_variables(residual, x, rng), rng)
    folded_model, folded = fold_batch_norms(residual, variables, shape)
    assert folded_model.skipped == ()
    original = residual.apply(variables, x, train=False)
    assert _relative_error(folded_model.apply(folded, x), original) < 1e-5


def test_fold_reports_missing_variables():
    model = nn.Sequential([nn.Conv(3, 3), nn.BatchNorm()])
    x = jnp.zeros((1, 5, 5, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    with pytest.raises(ValueError, match="variables: expected the BatchNorm's batch_stats"):
        fold_batch_norms(model, {"params": variables["params"]}, x.shape)


def test_fold_names_a_missing_or_misshapen_variable_by_its_path():
    # a missing kernel or running variance was a raw KeyError; a misshapen one was named by
    # F.fold_batch_norm's argument only ("b: expected shape ..."), not by the layers
    model = nn.Sequential([nn.Conv(2, 3), nn.BatchNorm()])
    x = jnp.zeros((1, 5, 5, 1))
    variables = _to_dict(model.init(jax.random.key(0), x, train=False))
    without_kernel = _to_dict(variables)
    del without_kernel["params"]["layers_0"]["kernel"]
    with pytest.raises(ValueError, match="variables: expected the layer's kernel at 'layers_0/k"):
        fold_batch_norms(model, without_kernel, x.shape)
    without_var = _to_dict(variables)
    del without_var["batch_stats"]["layers_1"]["var"]
    with pytest.raises(ValueError, match="the BatchNorm's running variance at 'layers_1/var'"):
        fold_batch_norms(model, without_var, x.shape)
    wide = _to_dict(variables)
    wide["params"]["layers_0"]["kernel"] = jnp.ones((3, 3, 1, 3))
    with pytest.raises(
        ValueError,
        match=r"the layer at 'layers_0' and the BatchNorm at 'layers_1' do not fold: b: .*\(2,\)",
    ):
        fold_batch_norms(model, wide, x.shape)


def test_fold_names_variables_that_do_not_fit_input_shape():
    # variables of another input width were folded as given, into a folded model that only
    # refused them in apply (flax's ScopeParamShapeError)
    model = nn.Sequential([nn.Conv(2, 3), nn.BatchNorm()])
    variables = model.init(jax.random.key(0), jnp.zeros((1, 5, 5, 1)), train=False)
    with pytest.raises(
        ValueError,
        match=r"variables: the kernel at 'layers_0/kernel' has shape \(3, 3, 1, 2\), but "
        r"Sequential on input_shape \(1, 5, 5, 3\) makes one of shape \(3, 3, 3, 2\)",
    ):
        fold_batch_norms(model, variables, (1, 5, 5, 3))


def test_fold_names_variables_of_the_wrong_type():
    model = nn.Sequential([nn.Conv(3, 3), nn.BatchNorm()])
    x = jnp.zeros((1, 5, 5, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    for wrong, name in (
        ([1], "list"),
        (None, "NoneType"),
        (variables["params"]["layers_0"]["kernel"], "ArrayImpl"),
    ):
        with pytest.raises(
            TypeError, match=f"variables: expected the model's variables, .*got {name}$"
        ):
            fold_batch_norms(model, wrong, x.shape)
    # a FrozenDict is a mapping too
    folded, folded_variables = fold_batch_norms(model, flax.core.freeze(variables), x.shape)
    np.testing.assert_allclose(
        folded.apply(folded_variables, x + 1), model.apply(variables, x + 1, train=False), atol=1e-5
    )


def test_a_pair_inside_nn_vmap_is_kept_and_the_rest_folded(rng):
    """Inside nn.vmap a pair's variables are stacked (one slice per copy): it is
    kept, where it was folded as one layer and refused with a shape error about 'scale'."""

    class Block(linen.Module):
        @linen.compact
        def __call__(self, x):
            return nn.BatchNorm()(nn.Conv(3, 3, padding=1, use_bias=False)(x), False)

    class Model(linen.Module):
        @linen.compact
        def __call__(self, x, train=False):
            x = nn.BatchNorm()(nn.Conv(3, 1)(x), train)
            lifted = linen.vmap(
                Block,
                variable_axes={"params": 0, "batch_stats": 0},
                split_rngs={"params": True},
                in_axes=1,
                out_axes=1,
            )
            return lifted(name="copies")(x)

    shape = (2, 2, 5, 4, 3)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    model = Model()
    variables = _randomize_batch_norms(model.init(jax.random.key(0), x, train=False), rng)
    folded_model, folded = fold_batch_norms(model, variables, shape)
    assert folded_model.skipped == (("BatchNorm_0",),)
    assert list(folded["batch_stats"]) == ["copies"]
    original = model.apply(variables, x, train=False)
    assert _relative_error(folded_model.apply(folded, x), original) < 1e-5


class _ConvBatchNorm(linen.Module):
    also_added: bool = False

    @linen.compact
    def __call__(self, x, train):
        y = nn.Conv(3, 3, padding=1, use_bias=False)(x)
        z = nn.BatchNorm()(y, train)
        return z + y if self.also_added else z


def test_pairs_inside_nn_remat_or_nn_jit_are_folded(rng):
    # a tap passed into a rematerialized (or jitted) block looked used by the whole block's
    # output, so fold_batch_norms folded nothing in a remat network
    class Network(linen.Module):
        @linen.compact
        def __call__(self, x, train=False):
            x = linen.remat(_ConvBatchNorm, static_argnums=(2,))()(x, train)
            x = linen.jit(_ConvBatchNorm, static_argnums=(2,))()(x, train)
            return linen.remat(_ConvBatchNorm, static_argnums=(2,))(also_added=True)(x, train)

    model = Network()
    shape = (2, 7, 6, 2)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    variables = _randomize_batch_norms(_random_variables(model, x, rng), rng)
    folded_model, folded = fold_batch_norms(model, variables, shape)
    # the third block adds the conv's output to its BatchNorm's: it stays as it is
    assert sorted(path[0] for path in folded_model.skipped) == [
        "Checkpoint_ConvBatchNorm_0",
        "Jit_ConvBatchNorm_0",
    ]
    assert list(folded["batch_stats"]) == ["Checkpoint_ConvBatchNorm_1"]
    original = model.apply(variables, x, train=False)
    assert _relative_error(folded_model.apply(folded, x), original) < 1e-5
