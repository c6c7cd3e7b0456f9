"""The zoo's input checks (jcnn/models/_checks.py): images too small for a model are named as
the model's ``x`` with the smallest size it takes, not as a layer's window deep inside."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import models
from jcnn.nn import BatchNorm

# (model, channels, the smallest height and width it maps to logits: found by trying sizes)
CASES = [
    (models.AlexNet(), 3, 63),
    (models.AlexNet(variant="original"), 3, 67),
    (models.AlexNet(variant="cifar"), 3, 15),
    (models.VGG(11), 3, 32),
    (models.convnext_cifar(), 3, 16),
    (models.LeNet5(), 1, 4),
    (models.LeNet5(original=True), 1, 12),
    (models.JarrettNet(), 3, 4),
    (models.FastMNISTNet(), 1, 16),
    (models.AirbenchNet(), 3, 25),
]


def _init(model, shape):
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    return jax.eval_shape(lambda: model.init(rngs, jnp.zeros(shape), train=False))


@pytest.mark.parametrize("model, channels, smallest", CASES, ids=lambda c: str(c)[:24])
def test_images_below_the_smallest_size_are_named_as_x(model, channels, smallest):
    _init(model, (1, smallest, smallest, channels))
    for shape in ((1, smallest - 1, smallest + 3, channels), (1, smallest, smallest - 1, channels)):
        message = f"^x: .*expects images of at least {smallest}x{smallest} pixels, got shape "
        with pytest.raises(ValueError, match=message + re.escape(str(shape))):
            _init(model, shape)


# (model factory taking the settings below, input shape, its integer settings by name)
SETTINGS = [
    (models.LeNet5, (1, 28, 28, 1), {"num_classes": 3}),
    (lambda **kw: models.LeNet5(original=True, **kw), (1, 28, 28, 1), {"num_classes": 3}),
    (lambda **kw: models.AlexNet(variant="cifar", **kw), (1, 32, 32, 3), {"num_classes": 3}),
    (lambda **kw: models.VGG(11, small_input=True, **kw), (1, 32, 32, 3), {"num_classes": 3}),
    (
        lambda **kw: models.ResNet(stem="cifar", **kw),
        (1, 16, 16, 3),
        {"num_classes": 3, "widths": (4, 8), "stage_sizes": (1, 1)},
    ),
    (models.AirbenchNet, (1, 32, 32, 3), {"num_classes": 3, "widths": (4, 8, 8)}),
    (models.JarrettNet, (1, 28, 28, 1), {"num_classes": 3, "widths": (4,)}),
    (models.FastMNISTNet, (1, 28, 28, 1), {"num_classes": 3, "widths": (4, 8)}),
    (
        lambda **kw: models.MobileNetV2(stem="cifar", width_multiplier=0.25, **kw),
        (1, 32, 32, 3),
        {"num_classes": 3},
    ),
    (
        lambda **kw: models.ConvNeXt(patch_size=2, **kw),
        (1, 16, 16, 3),
        {"num_classes": 3, "widths": (8, 16), "depths": (1, 1)},
    ),
    (models.SmallC3D, (1, 8, 16, 16, 3), {"num_classes": 3, "widths": (4, 4, 4, 4)}),
    (
        lambda **kw: models.UNet(padding="same", **kw),
        (1, 16, 16, 1),
        {"out_channels": 3, "widths": (4, 8)},
    ),
]


@pytest.mark.parametrize("factory, shape, settings", SETTINGS)
def test_integer_settings_given_as_numpy_or_0d_jax_integers_build_the_same_network(
    factory, shape, settings
):
    """The checks take a NumPy integer or a concrete 0-d integer array (``labels.max() + 1``) as
    an int; the model passes on that int, so its layers never see the array."""
    expected = _init(factory(**settings), shape)
    for convert in (np.int64, jnp.asarray):
        given = {
            name: tuple(convert(v) for v in value) if isinstance(value, tuple) else convert(value)
            for name, value in settings.items()
        }
        assert jax.tree.map(lambda a: a.shape, _init(factory(**given), shape)) == jax.tree.map(
            lambda a: a.shape, expected
        )


@pytest.mark.parametrize(
    "model",
    [
        models.ConvNeXt(depths=(1, 1), widths=4, patch_size=2),
        models.FastMNISTNet(widths=4),
    ],
    ids=["ConvNeXt", "FastMNISTNet"],
)
def test_widths_of_another_type_are_named(model):
    with pytest.raises(TypeError, match=r"^widths: expected a list or tuple of .*, got 4"):
        _init(model, (1, 28, 28, 3))


# Every zoo module with BatchNorms, built small (module, input shape).
WITH_BATCH_NORM = [
    (models.ResNet((1, 1), stem="cifar", widths=(4, 8)), (1, 16, 16, 3)),
    (models.ResNet((1, 1), "bottleneck", widths=(4, 8)), (1, 32, 32, 3)),
    (models.BasicBlock(8, stride=2), (1, 8, 8, 4)),
    (models.Bottleneck(2, stride=2), (1, 8, 8, 4)),
    (models.VGG(11, batch_norm=True, small_input=True), (1, 32, 32, 3)),
    (models.MobileNetV2(3, 0.25, "cifar", stages=((1, 8, 1, 1), (6, 8, 2, 2))), (1, 8, 8, 3)),
    (models.InvertedResidual(8), (1, 4, 4, 8)),
    (models.AirbenchNet(widths=(4, 8, 8)), (1, 32, 32, 3)),
    (models.ConvGroup(4), (1, 8, 8, 3)),
    (models.FastMNISTNet(widths=(4, 8)), (1, 28, 28, 1)),
    (models.SmallC3D(widths=(4, 4)), (1, 2, 4, 4, 3)),
    (models.UNet(widths=(4, 8), padding="same", batch_norm=True), (1, 8, 8, 1)),
    (models.DoubleConv(4, batch_norm=True), (1, 8, 8, 3)),
]


_NAMES = [type(module).__name__ for module, _ in WITH_BATCH_NORM]


def test_every_module_with_bn_momentum_is_listed():
    listed = {type(module) for module, _ in WITH_BATCH_NORM}
    with_field = {
        obj
        for obj in vars(models).values()
        if isinstance(obj, type) and "bn_momentum" in getattr(obj, "__dataclass_fields__", {})
    }
    assert with_field == listed


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("module, shape", WITH_BATCH_NORM, ids=_NAMES)
def test_bn_unbiased_running_var_reaches_every_batch_norm(module, shape, unbiased):
    flags = {}

    def record(layer, _):
        if isinstance(layer, BatchNorm):
            flags["/".join(layer.path)] = layer.unbiased_running_var
        return False

    model = module.clone(bn_unbiased_running_var=True) if unbiased else module
    jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros(shape), capture_intermediates=record)
    )
    assert flags
    assert flags == dict.fromkeys(flags, unbiased)


@pytest.mark.parametrize("module, shape", WITH_BATCH_NORM, ids=_NAMES)
def test_bn_unbiased_running_var_must_be_a_bool(module, shape):
    assert module.bn_unbiased_running_var is False
    with pytest.raises(TypeError, match=r"^bn_unbiased_running_var: expected a Python bool, got 1"):
        _init(module.clone(bn_unbiased_running_var=1), shape)
