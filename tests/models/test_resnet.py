"""ResNet: published parameter counts, parameter names, train/eval forward passes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import models

from ._helpers import assert_refused, count_params, param_shapes


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (models.resnet18, 11_689_512),
        (models.resnet34, 21_797_672),
        (models.resnet50, 25_557_032),
    ],
)
def test_imagenet_resnet_parameter_counts(factory, expected):
    assert count_params(factory(), (1, 224, 224, 3)) == expected


@pytest.mark.parametrize(
    ("factory", "expected"), [(models.resnet20, 269_722), (models.resnet56, 853_018)]
)
def test_cifar_resnet_parameter_counts(factory, expected):
    assert count_params(factory(), (1, 32, 32, 3)) == expected


def test_resnet_parameter_names_follow_torchvision():
    params = param_shapes(models.resnet50(), (1, 64, 64, 3))
    assert set(params) == {"conv1", "bn1", "fc"} | {
        f"layer{s}_{b}" for s, n in zip(range(1, 5), (3, 4, 6, 3), strict=True) for b in range(n)
    }
    first = params["layer1_0"]
    assert first["conv2"]["kernel"].shape == (3, 3, 64, 64)
    assert first["conv3"]["kernel"].shape == (1, 1, 64, 256)
    assert first["downsample_conv"]["kernel"].shape == (1, 1, 64, 256)
    assert params["layer2_0"]["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert "downsample_conv" not in params["layer2_1"]
    assert params["fc"]["kernel"].shape == (2048, 1000)
    out = jax.eval_shape(
        lambda x: models.resnet18().init_with_output(jax.random.key(0), x)[0],
        jnp.zeros((2, 224, 224, 3)),
    )
    assert out.shape == (2, 1000)


def test_resnet20_train_and_eval(rng):
    model = models.resnet20()
    x = jnp.asarray(rng.normal(size=(4, 16, 16, 3)), jnp.float32)  # any size: global pooling
    variables = model.init(jax.random.key(0), x)
    labels = jnp.array([0, 3, 5, 9])

    @jax.jit
    def train_loss(params, batch_stats):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], 1)), updates

    (loss, updates), grads = jax.value_and_grad(train_loss, has_aux=True)(
        variables["params"], variables["batch_stats"]
    )
    assert np.isfinite(float(loss))
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["conv1"]["kernel"]).sum()) > 0
    new_stats = updates["batch_stats"]
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_stats, variables["batch_stats"])
    assert all(jax.tree.leaves(moved))  # every BN's running statistics moved in training

    logits_eval = jax.jit(lambda v: model.apply(v, x, train=False))(
        {"params": variables["params"], "batch_stats": new_stats}
    )
    assert logits_eval.shape == (4, 10) and np.isfinite(logits_eval).all()


def test_option_a_shortcut_and_small_bottleneck(rng):
    x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
    block = models.BasicBlock(8, stride=2, shortcut="pad")
    variables = block.init(jax.random.key(0), x)
    assert "downsample_conv" not in variables["params"]
    y, state = block.apply(variables, x, capture_intermediates=True)
    body = state["intermediates"]["bn2"]["__call__"][0]
    shortcut = np.zeros((2, 4, 4, 8), np.float32)
    shortcut[..., 2:6] = np.asarray(x)[:, ::2, ::2]
    np.testing.assert_allclose(y, np.maximum(body + shortcut, 0), atol=1e-5)

    identity = models.BasicBlock(4, zero_init_residual=True)
    variables = identity.init(jax.random.key(2), x)
    np.testing.assert_array_equal(variables["params"]["bn2"]["scale"], np.zeros(4))
    np.testing.assert_allclose(identity.apply(variables, x), np.maximum(x, 0), atol=1e-6)

    net = models.ResNet((1, 1), "bottleneck", 5, stem="cifar", widths=(4, 8))
    variables = net.init(jax.random.key(1), x)
    assert variables["params"]["layer1_0"]["conv3"]["kernel"].shape == (1, 1, 4, 16)
    assert net.apply(variables, x).shape == (2, 5)
    with pytest.raises(ValueError, match="block"):
        models.ResNet((1,), "wide", widths=(4,)).init(jax.random.key(0), x)


@pytest.mark.parametrize(
    "setting, error, says",
    [
        ({"num_classes": 0}, ValueError, r"num_classes: expected an int >= 1, got 0"),
        (
            {"stage_sizes": ()},
            ValueError,
            r"stage_sizes: expected positive ints, one per stage, got \(\)",
        ),
        ({"stage_sizes": (1, 0)}, ValueError, r"stage_sizes\[1\]: expected an int >= 1, got 0"),
        ({"widths": (4, 0)}, ValueError, r"widths\[1\]: expected an int >= 1, got 0"),
        ({"widths": 8}, TypeError, r"widths: expected a list or tuple of positive ints, .* got 8"),
        (
            {"widths": (8, 4), "shortcut": "pad"},
            ValueError,
            r"shortcut: 'pad' \(option A\) zero-pads the input's 8 channels to the block's 4",
        ),
        ({"bn_momentum": 1.5}, ValueError, r"bn_momentum: expected a number in \[0, 1\], got 1.5"),
        ({"zero_init_residual": 1}, TypeError, r"zero_init_residual: expected a Python bool"),
        (
            {"shortcut": "Pad"},
            ValueError,
            r"shortcut: expected one of 'projection', 'pad', got 'Pad'",
        ),
    ],
)
def test_bad_settings_are_named_as_the_model_calls_them(setting, error, says):
    # they used to surface as the inner layer's argument (features, momentum, rate) or pass
    assert_refused(
        models.ResNet(stage_sizes=(1, 1), stem="cifar", widths=(4, 8)).clone(**setting),
        (1, 16, 16, 3),
        error,
        says,
    )


@pytest.mark.parametrize("block", [models.BasicBlock, models.Bottleneck])
def test_blocks_check_their_own_settings(block):
    # an unknown shortcut used to be taken as a projection
    assert_refused(block(4, shortcut="none"), (1, 8, 8, 4), ValueError, "shortcut: expected one of")
    assert_refused(block(4, bn_momentum=-0.5), (1, 8, 8, 4), ValueError, "bn_momentum: expected")
    assert_refused(block(4, zero_init_residual=0), (1, 8, 8, 4), TypeError, "zero_init_residual")
    # option A with fewer output than input channels escaped as jnp.pad's raw error
    assert_refused(block(2, shortcut="pad"), (1, 8, 8, 16), ValueError, "shortcut: 'pad'")
