"""Every zoo model takes one jitted training step (``jcnn.train.train_step``), as training runs it.

Small inputs (the ImageNet models at a small resolution, which their pooling allows) keep this
fast. The step must return the loss of the parameters it started from and move the parameters by
``-learning_rate * gradient`` (plain SGD), the gradient computed separately; every value finite.
A model in ``jcnn.models.__all__`` without a case fails ``test_every_model_has_a_case``; a
factory that only deepens or widens a case (resnet34 is resnet18's code path) is listed in
``DEPTH_VARIANTS`` instead, which ``test_depth_variants_are_a_case_at_another_depth`` checks.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import models
from jcnn.train import TrainState, optimizer, train_step
from jcnn.train.steps import loss_and_logits

LEARNING_RATE = 0.01
# name -> [(model, input shape)], one entry per code path worth a step of its own.
CASES = {
    "LeNet5": [(models.LeNet5(), (2, 28, 28, 1)), (models.LeNet5(original=True), (2, 28, 28, 1))],
    "AlexNet": [
        (models.AlexNet(num_classes=5), (2, 64, 64, 3)),
        (models.AlexNet(variant="original", num_classes=5), (2, 67, 67, 3)),  # with LRN
        (models.AlexNet(variant="cifar", num_classes=5), (2, 32, 32, 3)),
    ],
    "VGG": [
        (models.VGG(depth=11, batch_norm=True, num_classes=5, small_input=True), (2, 32, 32, 3)),
        # CIFAR head: the ImageNet one (VGG-11 at 133M parameters) took half a minute, and
        # AlexNet's step covers the same 4096-wide head with dropout
        (models.VGG(depth=11, num_classes=5, small_input=True), (2, 32, 32, 3)),
    ],
    "ResNet": [
        (models.ResNet(stage_sizes=(1, 1), widths=(4, 8), num_classes=5), (2, 16, 16, 3)),
        # the bottleneck path of resnet50: a projection in both stages, a stride in the second
        (
            models.ResNet(stage_sizes=(1, 1), block="bottleneck", widths=(4, 8), num_classes=5),
            (2, 16, 16, 3),
        ),
    ],
    "resnet20": [(models.resnet20(num_classes=5), (2, 16, 16, 3))],  # CIFAR stem, option A
    "AirbenchNet": [(models.AirbenchNet(num_classes=5), (2, 32, 32, 3))],
    "JarrettNet": [(models.JarrettNet(num_classes=5), (2, 16, 16, 3))],
    "FastMNISTNet": [(models.FastMNISTNet(num_classes=5, widths=(4, 6)), (3, 28, 28, 1))],
}
# Factories that build a case above at another depth and width: the same code path, whose step
# took 17-30 s each to compile (resnet50 alone 30 s). Name -> (factory, the case it deepens);
# test_depth_variants_are_a_case_at_another_depth checks that only depth and width differ.
DEPTH_VARIANTS = {
    "resnet18": (models.resnet18, ("ResNet", 0)),
    "resnet34": (models.resnet34, ("ResNet", 0)),
    "resnet50": (models.resnet50, ("ResNet", 1)),
    "resnet56": (models.resnet56, ("resnet20", 0)),
}
# Building blocks and helpers of the models, exercised through them; and the networks whose
# jitted training step has its own test (tests/models/test_{mobilenet,convnext,unet,c3d}.py).
NOT_MODELS = {"BasicBlock", "Bottleneck", "ConvGroup", "whitening_kernel"} | {
    "InvertedResidual",
    "ConvNeXtBlock",
    "DoubleConv",
    "MobileNetV2",
    "mobilenet_v2",
    "mobilenet_v2_cifar",
    "ConvNeXt",
    "convnext_tiny",
    "convnext_cifar",
    "UNet",
    "SmallC3D",
}


def test_every_model_has_a_case():
    assert set(CASES) | set(DEPTH_VARIANTS) | NOT_MODELS == set(models.__all__)
    assert not set(CASES) & set(DEPTH_VARIANTS)


@pytest.mark.parametrize("name", sorted(DEPTH_VARIANTS))
def test_depth_variants_are_a_case_at_another_depth(name):
    factory, (case, index) = DEPTH_VARIANTS[name]
    variant, (model, _) = factory(num_classes=5), CASES[case][index]
    assert type(variant) is type(model)
    differ = {"stage_sizes", "widths", "parent", "name"}
    fields = [f for f in dataclasses.fields(model) if f.name not in differ]
    assert fields and all(getattr(variant, f.name) == getattr(model, f.name) for f in fields)
    assert len(variant.stage_sizes) == len(variant.widths) >= len(model.stage_sizes)


@pytest.mark.parametrize(
    "model, shape",
    [case for name in sorted(CASES) for case in CASES[name]],
    ids=[f"{name}-{i}" for name in sorted(CASES) for i in range(len(CASES[name]))],
)
def test_one_jitted_training_step(model, shape, rng):
    images = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 5, size=shape[0]).astype(np.int32))
    state = TrainState.create(model, optimizer("sgd", LEARNING_RATE), jax.random.key(0), images)
    dropout_key = jax.random.fold_in(state.key, state.step)

    @jax.jit
    def reference(params):
        grad_fn = jax.value_and_grad(loss_and_logits, has_aux=True)
        (loss, _), grads = grad_fn(
            params, state, images, labels, train=True, dropout_key=dropout_key
        )
        return loss, grads

    loss, grads = reference(state.params)
    before = jax.tree.map(np.asarray, state.params)  # train_step donates the state's buffers
    new_state, metrics = train_step(state, (images, labels))

    assert np.isfinite(float(metrics["loss"]))
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    assert int(new_state.step) == 1
    moved = jax.tree.map(
        lambda new, old, g: (np.asarray(new), old, np.asarray(g)), new_state.params, before, grads
    )
    for new, old, g in jax.tree.leaves(moved, is_leaf=lambda leaf: isinstance(leaf, tuple)):
        assert np.isfinite(new).all()
        np.testing.assert_allclose(
            new - old, -LEARNING_RATE * g, rtol=1e-3, atol=1e-6 * max(1.0, float(np.abs(old).max()))
        )
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads))
