"""AlexNet: parameter counts of the variants, output shapes, a CIFAR-size forward pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import models

from ._helpers import assert_refused, count_params


@pytest.mark.parametrize(
    ("variant", "size", "expected"),
    [
        ("imagenet", 224, 61_100_840),
        ("imagenet", 227, 61_100_840),
        ("original", 227, 62_378_344),
        # conv 1,792 + 110,784 + 663,936 + 884,992 + 590,080; dense 1,049,600 * 2 + 10,250
        ("cifar", 32, 4_361_034),
    ],
)
def test_alexnet_parameter_counts(variant, size, expected):
    num_classes = 10 if variant == "cifar" else 1000
    model = models.AlexNet(num_classes=num_classes, variant=variant)
    assert count_params(model, (1, size, size, 3)) == expected


def test_original_alexnet_shapes():
    model = models.AlexNet(variant="original")
    x = jnp.zeros((1, 227, 227, 3))
    bound_shapes = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, capture_intermediates=True), x
    )
    (logits, variables) = bound_shapes
    assert logits.shape == (1, 1000)
    inter = variables["intermediates"]
    assert inter["conv1"]["__call__"][0].shape == (1, 55, 55, 96)
    assert inter["pool5"]["__call__"][0].shape == (1, 6, 6, 256)


def test_cifar_alexnet_dropout_train_vs_eval(rng):
    model = models.AlexNet(num_classes=10, variant="cifar")
    x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    assert variables["params"]["fc6"]["kernel"].shape == (2 * 2 * 256, 1024)
    apply = jax.jit(lambda v, x, key: model.apply(v, x, train=True, rngs={"dropout": key}))
    a, b = apply(variables, x, jax.random.key(1)), apply(variables, x, jax.random.key(2))
    assert a.shape == (2, 10) and not np.allclose(a, b)
    eval_logits = model.apply(variables, x)
    np.testing.assert_allclose(eval_logits, model.apply(variables, x, train=False))
    with pytest.raises(ValueError, match="variant"):
        models.AlexNet(variant="huge").init(jax.random.key(0), x)


@pytest.mark.parametrize(
    "setting, error, says",
    [
        ({"num_classes": True}, TypeError, r"num_classes: expected an int >= 1, got True"),
        (
            {"dropout_rate": -0.2},
            ValueError,
            r"dropout_rate: expected a number in \[0, 1\], got -0.2",
        ),
    ],
)
def test_bad_settings_are_named_as_the_model_calls_them(setting, error, says):
    # they used to surface as the inner layer's argument (features, momentum, rate) or pass
    assert_refused(models.AlexNet(variant="cifar").clone(**setting), (1, 32, 32, 3), error, says)
