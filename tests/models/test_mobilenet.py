"""MobileNetV2: published parameter counts, shapes, training step, BatchNorm modes, and
torchvision weights against a hand-written PyTorch twin with torchvision's module names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import analysis, models
from jcnn.models.mobilenet import make_divisible

from ._helpers import assert_refused, count_params, param_shapes
from ._zoo import (
    check_running_stats_follow_torch,
    check_training_step,
    randomize_torch,
    torch_forward,
)

# The stem, both kinds of block (t = 1 and t = 6), a strided and a residual block: enough to
# exercise every layer while compiling in seconds.
SHORT_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2))


def test_published_parameter_counts():
    # torchvision's mobilenet_v2 (width 1.0, 1000 classes): 3,504,872.
    assert count_params(models.mobilenet_v2(), (1, 224, 224, 3)) == 3_504_872
    # The CIFAR stem only changes strides: the same network with a 10-class classifier.
    assert count_params(models.mobilenet_v2_cifar(), (1, 32, 32, 3)) == 3_504_872 - 1281 * 990


def test_structure_follows_the_paper():
    params = param_shapes(models.mobilenet_v2(), (1, 224, 224, 3))
    assert set(params) == {"stem_conv", "stem_bn", "head_conv", "head_bn", "classifier"} | {
        f"block{i}" for i in range(1, 18)
    }
    assert "expand_conv" not in params["block1"]  # t = 1
    assert params["block1"]["depthwise_conv"]["kernel"].shape == (3, 3, 1, 32)
    assert params["block2"]["expand_conv"]["kernel"].shape == (1, 1, 16, 96)
    assert params["block2"]["depthwise_conv"]["kernel"].shape == (3, 3, 1, 96)
    assert params["block17"]["project_conv"]["kernel"].shape == (1, 1, 960, 320)
    assert params["classifier"]["kernel"].shape == (1280, 1000)
    small = param_shapes(models.mobilenet_v2(width_multiplier=0.35), (1, 224, 224, 3))
    assert small["stem_conv"]["kernel"].shape == (3, 3, 3, 16)
    assert small["head_conv"]["kernel"].shape == (1, 1, 112, 1280)  # last width never shrinks
    wide = param_shapes(models.mobilenet_v2(width_multiplier=1.4), (1, 224, 224, 3))
    assert wide["head_conv"]["kernel"].shape == (1, 1, 448, 1792)


@pytest.mark.parametrize(
    ("factory", "size", "final"),
    [(models.mobilenet_v2, 224, 7), (models.mobilenet_v2_cifar, 32, 4)],
)
def test_feature_map_sizes(factory, size, final):
    model = factory(num_classes=7)
    x = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
    (logits, state) = jax.eval_shape(
        lambda x: model.init_with_output(
            jax.random.key(0), x, capture_intermediates=lambda m, _: m.name == "head_conv"
        ),
        x,
    )
    assert logits.shape == (2, 7)
    assert state["intermediates"]["head_conv"]["__call__"][0].shape == (2, final, final, 1280)


@pytest.mark.parametrize(
    ("factory", "size"), [(models.mobilenet_v2, 48), (models.mobilenet_v2_cifar, 16)]
)
def test_training_step(factory, size, rng):
    model = factory(num_classes=5, width_multiplier=0.25, stages=SHORT_STAGES)
    x = jnp.asarray(rng.normal(size=(2, size, size, 3)), jnp.float32)
    check_training_step(model, x, jnp.array([1, 4]), rngs={"dropout": jax.random.key(3)})


def test_train_and_eval_modes(rng):
    model = models.mobilenet_v2_cifar(
        num_classes=4, width_multiplier=0.25, dropout_rate=0.0, stages=SHORT_STAGES
    )
    x = jnp.asarray(rng.normal(size=(3, 8, 8, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    apply_eval = jax.jit(model.apply)
    apply_train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
    # Evaluation uses the running statistics: an example's logits do not depend on the batch.
    eval_all = apply_eval(variables, x)
    np.testing.assert_allclose(apply_eval(variables, x[:1]), eval_all[:1], rtol=1e-5, atol=1e-6)
    # Training normalizes with the batch's statistics: they do.
    train_all = apply_train(variables, x)
    train_two = apply_train(variables, x[:2])
    assert not np.allclose(train_all[:2], train_two, atol=1e-4)
    assert not np.allclose(train_all, eval_all, atol=1e-4)


def test_bad_arguments_are_named():
    x = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="stem"):
        models.MobileNetV2(stem="tiny").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="width_multiplier"):
        models.MobileNetV2(width_multiplier=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="expansion"):
        models.InvertedResidual(8, expansion=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="x"):
        models.mobilenet_v2().init(jax.random.key(0), jnp.zeros((8, 8, 3)))


def _torch_twin(torch, width, num_classes, cifar):
    """torchvision's MobileNetV2 written out, with its module names (features.i.conv.j...)."""
    tnn = torch.nn

    def divisible(v, d=8):
        new = max(d, int(v + d / 2) // d * d)
        return new + d if new < 0.9 * v else new

    def conv_bn_relu(cin, cout, stride=1, groups=1, k=3):
        return tnn.Sequential(
            tnn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
            tnn.BatchNorm2d(cout),
            tnn.ReLU6(),
        )

    class Inverted(tnn.Module):
        def __init__(self, cin, cout, stride, t):
            super().__init__()
            hidden = int(round(cin * t))
            layers = [conv_bn_relu(cin, hidden, k=1)] if t != 1 else []
            layers += [
                conv_bn_relu(hidden, hidden, stride, groups=hidden),
                tnn.Conv2d(hidden, cout, 1, bias=False),
                tnn.BatchNorm2d(cout),
            ]
            self.conv = tnn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            return x + self.conv(x) if self.residual else self.conv(x)

    class Twin(tnn.Module):
        def __init__(self):
            super().__init__()
            cin = divisible(32 * width)
            last = divisible(1280 * max(1.0, width))
            features = [conv_bn_relu(3, cin, 1 if cifar else 2)]
            settings = [
                [1, 16, 1, 1], [6, 24, 2, 1 if cifar else 2], [6, 32, 3, 2], [6, 64, 4, 2],
                [6, 96, 3, 1], [6, 160, 3, 2], [6, 320, 1, 1],
            ]  # fmt: skip
            for t, c, n, s in settings:
                cout = divisible(c * width)
                for i in range(n):
                    features.append(Inverted(cin, cout, s if i == 0 else 1, t))
                    cin = cout
            features.append(conv_bn_relu(cin, last, k=1))
            self.features = tnn.Sequential(*features)
            self.classifier = tnn.Sequential(tnn.Dropout(0.2), tnn.Linear(last, num_classes))

        def forward(self, x):
            x = self.features(x).mean((2, 3))
            return self.classifier(x)

    return Twin()


@pytest.mark.parametrize(("width", "cifar", "size"), [(0.35, False, 32), (0.5, True, 8)])
def test_torchvision_weights_give_the_same_logits(torch, rng, width, cifar, size):
    twin = _torch_twin(torch, width, 6, cifar)
    randomize_torch(torch, twin, seed=1)
    model = models.MobileNetV2(
        num_classes=6, width_multiplier=width, stem="cifar" if cifar else "imagenet"
    )
    x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
    assert count_params(model, x.shape) == sum(p.numel() for p in twin.parameters())
    variables = analysis.from_torchvision_state_dict(model, twin.state_dict(), x.shape)
    assert variables["batch_stats"]["block3"]["depthwise_bn"]["var"].shape == (
        make_divisible(24 * width) * 6,
    )
    expected = torch_forward(torch, twin, x)
    np.testing.assert_allclose(
        jax.jit(model.apply)(variables, jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5
    )


def test_torchvision_import_rejects_mismatches(torch):
    twin = _torch_twin(torch, 0.35, 6, False)
    state = twin.state_dict()
    model = models.mobilenet_v2(num_classes=6, width_multiplier=0.35)
    with pytest.raises(
        ValueError, match=r"classifier\.1\.bias: shape \(6,\) .* \(expected .* \(7,\)\)"
    ):
        analysis.from_torchvision_state_dict(models.mobilenet_v2(7, 0.35), state)
    with pytest.raises(
        ValueError, match=r"features\.10\.conv\.1\.1\.bias: shape \(144,\) .*block10/depthwise_bn"
    ):
        analysis.from_torchvision_state_dict(models.mobilenet_v2(6, 0.5), state)
    missing = {k: v for k, v in state.items() if k != "features.5.conv.1.1.running_var"}
    with pytest.raises(ValueError, match=r"features\.5\.conv\.1\.1\.running_var: missing"):
        analysis.from_torchvision_state_dict(model, missing)
    with pytest.raises(ValueError, match=r"extra\.weight"):
        analysis.from_torchvision_state_dict(model, {**state, "extra.weight": torch.zeros(2)})
    with pytest.raises(TypeError, match="model"):
        analysis.from_torchvision_state_dict(models.resnet20(), state)


@pytest.mark.parametrize(
    "setting, error, says",
    [
        ({"num_classes": 0}, ValueError, r"num_classes: expected an int >= 1, got 0"),
        ({"stages": ()}, ValueError, r"stages: expected a non-empty list of \(t, c, n, s\) stages"),
        (
            {"stages": ((6, 16, 0, 1),)},
            ValueError,
            r"stages\[0\]\[2\]: expected an int >= 1, got 0",
        ),
        (
            {"stages": ((6, 16, 1),)},
            ValueError,
            r"stages\[0\]: expected 4 positive ints, got \(6, 16, 1\)",
        ),
        (
            {"dropout_rate": 1.5},
            ValueError,
            r"dropout_rate: expected a number in \[0, 1\], got 1.5",
        ),
        ({"bn_momentum": 1.5}, ValueError, r"bn_momentum: expected a number in \[0, 1\], got 1.5"),
        ({"width_multiplier": "1"}, TypeError, r"width_multiplier: expected a finite number > 0"),
    ],
)
def test_bad_settings_are_named_as_the_model_calls_them(setting, error, says):
    # they used to surface as the inner layer's argument (features, momentum, rate) or pass
    assert_refused(
        models.MobileNetV2(stem="cifar", stages=((1, 16, 1, 1), (6, 24, 1, 2))).clone(**setting),
        (1, 32, 32, 3),
        error,
        says,
    )


def test_inverted_residual_checks_its_own_settings():
    assert_refused(models.InvertedResidual(8, stride=0), (1, 8, 8, 8), ValueError, "stride: ")
    assert_refused(models.InvertedResidual(8, expansion=1.5), (1, 8, 8, 8), TypeError, "expansion")
    assert_refused(
        models.InvertedResidual(8, bn_momentum=2.0), (1, 8, 8, 8), ValueError, "bn_momentum: "
    )


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (models.MobileNetV2(3, stem="cifar", stages=((1, 16, 1, 1),)), (1, 8, 0, 3)),
        (models.MobileNetV2(3, stages=((1, 16, 1, 1),)), (1, 8, 8, 0)),
        (models.InvertedResidual(8), (1, 0, 8, 8)),
        (models.InvertedResidual(8), (1, 8, 8, 0)),
    ],
)
def test_empty_images_are_blamed_on_x(model, shape):
    # the first conv used to blame its own kernel ("w: ...") or its features
    says = rf"^x: {type(model).__name__} expects at least one pixel and one channel, got shape"
    assert_refused(model, shape, ValueError, says)
    assert count_params(model, (1, 1, 1, shape[-1] or 3)) > 0  # a single pixel is enough


def test_running_statistics_follow_torchvision_in_training(torch, rng):
    twin = _torch_twin(torch, 0.35, 6, cifar=True)
    randomize_torch(torch, twin, seed=2)
    model = models.mobilenet_v2_cifar(6, 0.35)
    x = rng.normal(size=(4, 16, 16, 3)).astype(np.float32)
    rngs = {"dropout": jax.random.key(0)}
    convert = analysis.from_torchvision_state_dict
    check_running_stats_follow_torch(torch, model, twin, x, convert, rngs=rngs)
