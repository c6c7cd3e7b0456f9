"""VGG: published parameter counts, names, a small-input forward pass with BatchNorm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import models

from ._helpers import assert_refused, count_params, param_shapes


@pytest.mark.parametrize(
    ("depth", "batch_norm", "expected"),
    [
        (11, False, 132_863_336),
        (13, False, 133_047_848),
        (16, False, 138_357_544),
        (19, False, 143_667_240),
        (16, True, 138_365_992),
    ],
)
def test_vgg_parameter_counts(depth, batch_norm, expected):
    assert count_params(models.VGG(depth, batch_norm), (1, 224, 224, 3)) == expected


def test_vgg16_names_and_shapes():
    params = param_shapes(models.VGG(16), (1, 224, 224, 3))
    convs = [k for k in params if k.startswith("conv")]
    assert len(convs) == 13 and "conv5_3" in params and "conv5_4" not in params
    assert params["fc6"]["kernel"].shape == (7 * 7 * 512, 4096)
    assert params["fc8"]["kernel"].shape == (4096, 1000)


def test_small_input_vgg_counts():
    # The convs of VGG-11 (132,863,336 minus the 123,642,856 of the ImageNet head) + 512x10 + 10.
    assert count_params(models.VGG(11, num_classes=10, small_input=True), (1, 32, 32, 3)) == (
        9_225_610
    )
    # VGG-16-BN's 138,365,992 minus the same ImageNet head, plus the 10-class one
    vgg16_bn = models.VGG(16, batch_norm=True, num_classes=10, small_input=True)
    assert count_params(vgg16_bn, (1, 32, 32, 3)) == 138_365_992 - 123_642_856 + 512 * 10 + 10
    assert count_params(vgg16_bn, (1, 32, 32, 3)) == 14_728_266  # as docs/models.md quotes


def test_small_input_vgg_with_batchnorm_forward(rng):
    model = models.VGG(11, batch_norm=True, num_classes=10, small_input=True)
    x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    assert variables["params"]["fc"]["kernel"].shape == (512, 10)
    logits, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(
        variables, x
    )
    assert logits.shape == (2, 10) and np.isfinite(logits).all()
    assert not np.allclose(updates["batch_stats"]["bn1_1"]["mean"], 0)


@pytest.mark.parametrize(
    "setting, error, says",
    [
        ({"num_classes": 0}, ValueError, r"num_classes: expected an int >= 1, got 0"),
        ({"batch_norm": 1}, TypeError, r"batch_norm: expected a Python bool, got 1"),
        ({"small_input": "yes"}, TypeError, r"small_input: expected a Python bool"),
        (
            {"dropout_rate": 1.5},
            ValueError,
            r"dropout_rate: expected a number in \[0, 1\], got 1.5",
        ),
        (
            {"bn_momentum": 1.5, "batch_norm": True},
            ValueError,
            r"bn_momentum: expected a number in \[0, 1\]",
        ),
        ({"bn_momentum": 1.5}, ValueError, r"bn_momentum: expected a number in \[0, 1\]"),
        # 16.0 == 16: a float depth used to build VGG-16
        (
            {"depth": 16.0},
            TypeError,
            r"depth: expected an int, one of \[11, 13, 16, 19\], got 16.0",
        ),
        ({"depth": "16"}, TypeError, r"depth: expected an int, .*got '16'"),
        ({"depth": 17}, ValueError, r"depth: expected one of \[11, 13, 16, 19\], got 17"),
    ],
)
def test_bad_settings_are_named_as_the_model_calls_them(setting, error, says):
    # they used to surface as the inner layer's argument (features, momentum, rate) or pass
    assert_refused(
        models.VGG(depth=11, small_input=True).clone(**setting), (1, 32, 32, 3), error, says
    )
