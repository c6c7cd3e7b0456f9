"""ConvNeXt: published parameter counts, shapes, training step, stochastic depth, and
torchvision weights against a hand-written PyTorch twin with torchvision's module names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import analysis, models

from ._helpers import assert_refused, count_params, param_shapes
from ._zoo import check_training_step, randomize_torch, torch_forward


def _convnext_count(depths, widths, patch, in_channels, num_classes):
    """The parameter count from the architecture, layer by layer."""
    total = patch * patch * in_channels * widths[0] + widths[0] + 2 * widths[0]  # stem + LN
    for stage, (depth, c) in enumerate(zip(depths, widths, strict=True)):
        if stage:
            total += 2 * widths[stage - 1] + 4 * widths[stage - 1] * c + c  # LN + 2x2 conv
        block = 49 * c + c + 2 * c + (c * 4 * c + 4 * c) + (4 * c * c + c) + c
        total += depth * block
    return total + 2 * widths[-1] + widths[-1] * num_classes + num_classes


def test_published_parameter_counts():
    # torchvision's convnext_tiny: 28,589,128 parameters.
    assert count_params(models.convnext_tiny(), (1, 224, 224, 3)) == 28_589_128
    assert _convnext_count((3, 3, 9, 3), (96, 192, 384, 768), 4, 3, 1000) == 28_589_128
    cifar = count_params(models.convnext_cifar(), (1, 32, 32, 3))
    assert cifar == _convnext_count((3, 3, 9, 3), (48, 96, 192, 384), 2, 3, 10) == 7_055_482


def test_kernels_start_as_torchvisions_trunc_normal_std_0_02():
    # torchvision: trunc_normal_(w, std=0.02) with bounds +-2 (absolute), i.e. N(0, 0.02^2);
    # JAX's truncated_normal(0.02) cuts at +-2 standard deviations: std 0.0176
    from scipy import stats

    model = models.ConvNeXt((1, 1), (32, 64), num_classes=10, patch_size=2)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    kernels = [
        np.asarray(leaf, np.float64).ravel()
        for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
        if jax.tree_util.keystr(path).endswith("['kernel']")
    ]
    assert len(kernels) == 9  # stem, downsample, head and 3 per block
    for kernel in kernels:
        assert stats.kstest(kernel / 0.02, "norm").pvalue > 1e-6
    w = np.concatenate(kernels) / 0.02
    assert abs(w.std() - 1) < 0.02 and np.abs(w).max() > 3.5


def test_structure_and_names():
    params = param_shapes(models.convnext_tiny(), (1, 224, 224, 3))
    assert params["stem_conv"]["kernel"].shape == (4, 4, 3, 96)
    block = params["stage3_8"]
    assert block["dwconv"]["kernel"].shape == (7, 7, 1, 384)
    assert block["pwconv1"]["kernel"].shape == (384, 1536)
    assert block["layer_scale"].shape == (384,)
    assert params["downsample4_conv"]["kernel"].shape == (2, 2, 384, 768)
    assert "downsample1_conv" not in params and "stage4_3" not in params
    variables = jax.jit(models.ConvNeXt((1,), (8,), 3, patch_size=1).init)(
        jax.random.key(0), jnp.zeros((1, 4, 4, 2))
    )
    np.testing.assert_array_equal(
        variables["params"]["stage1_0"]["layer_scale"], np.full(8, 1e-6, np.float32)
    )


def test_cifar_feature_maps():
    model = models.convnext_cifar()
    (logits, state) = jax.eval_shape(
        lambda x: model.init_with_output(
            jax.random.key(0), x, capture_intermediates=lambda m, _: m.name == "stage4_2"
        ),
        jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32),
    )
    assert logits.shape == (2, 10)
    assert state["intermediates"]["stage4_2"]["__call__"][0].shape == (2, 2, 2, 384)


def test_training_step_with_stochastic_depth(rng):
    model = models.ConvNeXt((1, 1), (8, 16), num_classes=4, patch_size=4, stochastic_depth=0.3)
    x = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
    check_training_step(model, x, jnp.array([0, 3]), rngs={"dropout": jax.random.key(1)})


def test_stochastic_depth_drops_whole_examples(rng):
    block = models.ConvNeXtBlock(stochastic_depth=0.5, layer_scale_init=1.0)
    x = jnp.asarray(rng.normal(size=(16, 5, 5, 4)), jnp.float32)
    variables = jax.jit(block.init)(jax.random.key(0), x)
    kept = jax.jit(block.apply)(variables, x)  # evaluation: never dropped, never rescaled
    dropped = jax.jit(lambda k: block.apply(variables, x, train=True, rngs={"dropout": k}))(
        jax.random.key(5)
    )
    branch = np.asarray(kept - x)
    outcomes = []
    for i in range(16):
        if np.allclose(dropped[i], x[i], atol=1e-6):
            outcomes.append(0)
        else:
            np.testing.assert_allclose(dropped[i], x[i] + 2 * branch[i], rtol=1e-4, atol=1e-5)
            outcomes.append(1)
    assert 0 < sum(outcomes) < 16
    with pytest.raises(ValueError, match="stochastic_depth"):
        models.ConvNeXtBlock(stochastic_depth=1.0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="widths"):
        models.ConvNeXt((1, 1), (8,)).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"^rngs: ConvNeXtBlock with stochastic_depth=0.5"):
        block.apply(variables, x, train=True)


def _torch_twin(torch, depths, widths, patch, num_classes):
    """torchvision's ConvNeXt written out, with its module names (features.i.j.block.k...)."""
    tnn = torch.nn

    class LayerNorm2d(tnn.LayerNorm):
        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class Permute(tnn.Module):
        def __init__(self, dims):
            super().__init__()
            self.dims = dims

        def forward(self, x):
            return x.permute(*self.dims)

    class Block(tnn.Module):
        def __init__(self, c):
            super().__init__()
            self.block = tnn.Sequential(
                tnn.Conv2d(c, c, 7, padding=3, groups=c),
                Permute((0, 2, 3, 1)),
                tnn.LayerNorm(c, eps=1e-6),
                tnn.Linear(c, 4 * c),
                tnn.GELU(),
                tnn.Linear(4 * c, c),
                Permute((0, 3, 1, 2)),
            )
            self.layer_scale = tnn.Parameter(torch.ones(c, 1, 1) * 1e-6)

        def forward(self, x):
            return x + self.layer_scale * self.block(x)

    class Twin(tnn.Module):
        def __init__(self):
            super().__init__()
            layers = [
                tnn.Sequential(
                    tnn.Conv2d(3, widths[0], patch, patch), LayerNorm2d(widths[0], eps=1e-6)
                )
            ]
            for i, (depth, c) in enumerate(zip(depths, widths, strict=True)):
                if i:
                    layers.append(
                        tnn.Sequential(
                            LayerNorm2d(widths[i - 1], eps=1e-6),
                            tnn.Conv2d(widths[i - 1], c, 2, 2),
                        )
                    )
                layers.append(tnn.Sequential(*[Block(c) for _ in range(depth)]))
            self.features = tnn.Sequential(*layers)
            self.classifier = tnn.Sequential(
                LayerNorm2d(widths[-1], eps=1e-6),
                tnn.Flatten(1),
                tnn.Linear(widths[-1], num_classes),
            )

        def forward(self, x):
            x = self.features(x).mean((2, 3), keepdim=True)
            return self.classifier(x)

    return Twin()


@pytest.mark.parametrize(
    ("depths", "widths", "patch", "size"),
    [((1, 1, 2, 1), (8, 16, 24, 32), 4, 32), ((2, 1), (12, 20), 2, 12)],
)
def test_torchvision_weights_give_the_same_logits(torch, rng, depths, widths, patch, size):
    twin = _torch_twin(torch, depths, widths, patch, 5)
    randomize_torch(torch, twin, seed=2)
    model = models.ConvNeXt(depths, widths, num_classes=5, patch_size=patch)
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    assert count_params(model, x.shape) == sum(p.numel() for p in twin.parameters())
    variables = analysis.from_torchvision_state_dict(model, twin.state_dict(), x.shape)
    assert "batch_stats" not in variables
    expected = torch_forward(torch, twin, x)
    got = jax.jit(model.apply)(variables, jnp.asarray(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_torchvision_import_rejects_mismatches(torch):
    twin = _torch_twin(torch, (1, 1), (8, 16), 4, 5)
    state = twin.state_dict()
    with pytest.raises(ValueError, match=r"features\.3\.1\.\S+: missing"):
        analysis.from_torchvision_state_dict(models.ConvNeXt((1, 2), (8, 16), 5), state)
    with pytest.raises(ValueError, match=r"classifier\.2\.weight: shape \(5, 16\) .*head/kernel"):
        analysis.from_torchvision_state_dict(models.ConvNeXt((1,), (8,), 5), state)
    with pytest.raises(ValueError, match=r"features\.2\.1\.weight: shape \(16, 8, 2, 2\)"):
        analysis.from_torchvision_state_dict(models.ConvNeXt((1, 1), (12, 16), 5), state)


@pytest.mark.parametrize(
    "setting, error, says",
    [
        ({"num_classes": 0}, ValueError, r"num_classes: expected an int >= 1, got 0"),
        ({"depths": (1, 0), "widths": (8, 16)}, ValueError, r"depths\[1\]: expected an int >= 1"),
        ({"depths": ()}, ValueError, r"depths: expected positive ints, one per stage, got \(\)"),
        ({"widths": (8, 0)}, ValueError, r"widths\[1\]: expected an int >= 1, got 0"),
        ({"patch_size": 0}, ValueError, r"patch_size: expected an int >= 1, got 0"),
        (
            {"depths": (2, 2), "stochastic_depth": 1.5},
            ValueError,
            r"stochastic_depth: .*\[0, 1\), got 1.5",
        ),
        (
            {"layer_scale_init": float("inf")},
            ValueError,
            r"layer_scale_init: expected a finite number",
        ),
    ],
)
def test_bad_settings_are_named_as_the_model_calls_them(setting, error, says):
    # they used to surface as the inner layer's argument (features, momentum, rate) or pass
    assert_refused(
        models.ConvNeXt(depths=(1, 1), widths=(8, 16), patch_size=2).clone(**setting),
        (1, 16, 16, 3),
        error,
        says,
    )


def test_block_takes_numpy_settings_and_checks_them():
    x = (1, 8, 8, 4)
    assert param_shapes(models.ConvNeXtBlock(np.float32(0.25)), x)["layer_scale"].shape == (4,)
    assert_refused(models.ConvNeXtBlock(1.0), x, ValueError, r"stochastic_depth: .*got 1.0")
    assert_refused(
        models.ConvNeXtBlock(layer_scale_init=float("nan")), x, ValueError, "layer_scale"
    )


@pytest.mark.parametrize(
    "setting, error, says",
    [
        ({"kernel_size": 4}, ValueError, r"kernel_size: expected an odd int .*, got 4"),
        ({"kernel_size": 0}, ValueError, r"kernel_size: expected an int >= 1, got 0"),
        ({"kernel_size": 7.0}, TypeError, r"kernel_size: expected an int >= 1, got 7.0"),
        ({"expansion": 0}, ValueError, r"expansion: expected an int >= 1, got 0"),
    ],
)
def test_block_window_and_expansion_are_named(setting, error, says):
    # an even window failed on the residual sum's broadcasting, expansion 0 was blamed on the
    # Dense layer's features
    assert_refused(models.ConvNeXtBlock(**setting), (1, 8, 8, 4), error, says)
    assert param_shapes(models.ConvNeXtBlock(kernel_size=3, expansion=2), (1, 8, 8, 4))["pwconv1"][
        "kernel"
    ].shape == (4, 8)


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (models.ConvNeXt((1, 1), (8, 16), num_classes=3, patch_size=2), (1, 8, 8, 0)),
        (models.ConvNeXtBlock(), (1, 0, 8, 4)),
        (models.ConvNeXtBlock(), (1, 8, 8, 0)),
    ],
)
def test_empty_images_are_blamed_on_x(model, shape):
    # the first conv used to blame its own kernel ("w: ...") or its features
    says = rf"^x: {type(model).__name__} expects at least one pixel and one channel, got shape"
    assert_refused(model, shape, ValueError, says)


def test_layer_scale_is_float32_under_x64():
    # Every parameter is float32 as in the other layers; a float64 layer scale (the constant
    # initializer's default under x64) promoted a float32 network's logits to float64.
    model = models.ConvNeXt((1, 1), (8, 16), 3, patch_size=2)
    x = jnp.ones((2, 8, 8, 3), jnp.float32)
    with jax.enable_x64(True):
        variables = model.init(jax.random.key(0), x)
        assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
        assert model.apply(variables, x).dtype == jnp.float32
