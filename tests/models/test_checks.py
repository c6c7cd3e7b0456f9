"""The zoo's input checks (jcnn/models/_checks.py): images too small for a model are named as
the model's ``x`` with the smallest size it takes, not as a layer's window deep inside."""

import re

import jax
import jax.numpy as jnp
import pytest

from jcnn import models

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
