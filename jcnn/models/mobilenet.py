"""MobileNetV2 (Sandler et al. 2018): inverted residual blocks with linear bottlenecks.

Each block expands its input by ``t`` with a 1x1 conv, filters it with a depthwise 3x3 conv
(``groups`` equal to the channels) and projects it back with a linear 1x1 conv; every conv is
followed by BatchNorm, the first two by ReLU6; the input is added when the block keeps the shape.
The stages follow the paper's Table 2, ``(t, c, n, s)``: (1, 16, 1, 1), (6, 24, 2, 2),
(6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1), then a 1x1 conv to
1280 channels, global average pooling, dropout 0.2 and a linear classifier. Widths scale with
``width_multiplier`` and are rounded to multiples of 8 as in torchvision.

ImageNet stem (224x224): a 3x3/2 conv to 32 channels; 3,504,872 parameters for width 1.0 and 1000
classes, torchvision's published ``mobilenet_v2`` count.

CIFAR stem (32x32): the first conv has stride 1 and the second stage (24 channels) stride 1 instead
of 2, as in the common CIFAR ports (e.g. kuangliu/pytorch-cifar), so the feature maps run 32, 32,
32, 16, 8, 8, 4, 4 and the last one is 4x4. Strides add no parameters: 2,236,682 parameters for
width 1.0 and 10 classes, torchvision's count with a 10-class classifier (3,504,872 - 1281 * 990).

Parameter names: ``stem_conv``, ``stem_bn``; blocks ``block1`` ... ``block17`` holding
``expand_conv``, ``expand_bn`` (absent when ``t = 1``), ``depthwise_conv``, ``depthwise_bn``,
``project_conv``, ``project_bn``; ``head_conv``, ``head_bn``; ``classifier``. torchvision's
``features.{i}`` is ``block{i}`` (``features.0`` the stem, ``features.18`` the head);
``jcnn.analysis.from_torchvision_state_dict`` converts its weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcnn import init
from jcnn.functional._checks import check_array, check_bool, check_int, check_real
from jcnn.models._checks import (
    check_bn_momentum,
    check_dropout_rate,
    check_not_empty,
    check_num_classes,
    check_per_stage,
)
from jcnn.nn import BatchNorm, Conv, Dense, Dropout, GlobalAvgPool

__all__ = ["InvertedResidual", "MobileNetV2", "mobilenet_v2", "mobilenet_v2_cifar"]

# (expansion t, channels c, repeats n, stride s) of the paper's Table 2.
MOBILENET_V2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """``value`` rounded to the nearest multiple of ``divisor``, never below 90% of it.

    >>> make_divisible(32 * 0.35), make_divisible(16 * 0.5), make_divisible(1280 * 1.4)
    (16, 8, 1792)
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def _check_stages(stages) -> None:
    expected = "a non-empty list of (t, c, n, s) stages"
    if not isinstance(stages, Sequence) or isinstance(stages, str):
        raise TypeError(f"stages: expected {expected}, got {stages!r}")
    if not stages:
        raise ValueError(f"stages: expected {expected}, got {stages!r}")
    for index, stage in enumerate(stages):
        check_per_stage(stage, f"stages[{index}]", length=4)


def _relu6(x):
    return jnp.clip(x, 0.0, 6.0)


def _batch_norm(module, name: str) -> BatchNorm:
    return BatchNorm(
        momentum=module.bn_momentum,
        unbiased_running_var=module.bn_unbiased_running_var,
        name=name,
    )


def _conv_init(groups: int = 1):
    return init.he_normal(mode="fan_out", groups=groups)


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise 3x3 -> project (1x1), each with BN; ReLU6 after the first two.

    Attributes:
        features: output channels.
        stride: stride of the depthwise conv.
        expansion: hidden width as a multiple of the input channels (``t``; 1 skips the expand
            conv).
        bn_momentum: decay of the BatchNorm running averages (0.9 is PyTorch's default 0.1).
        bn_unbiased_running_var: average the unbiased batch variance into the BatchNorm running
            variance, as PyTorch does (default False: the biased one).

    Example:
        >>> import jcnn
        >>> block = jcnn.models.InvertedResidual(features=8, expansion=6)
        >>> x = jnp.ones((1, 5, 5, 8))
        >>> y, variables = jax.eval_shape(block.init_with_output, jax.random.key(0), x)
        >>> variables["params"]["depthwise_conv"]["kernel"].shape, y.shape
        ((3, 3, 1, 48), (1, 5, 5, 8))
    """

    features: int
    stride: int = 1
    expansion: int = 6
    bn_momentum: float = 0.9
    bn_unbiased_running_var: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the block to ``x`` ``(N, H, W, C)``."""
        check_array(x, "x", ndim=4)
        check_not_empty(x, "InvertedResidual")
        check_int(self.expansion, "expansion", low=1)
        check_int(self.stride, "stride", low=1)
        check_bn_momentum(self.bn_momentum)
        check_bool(self.bn_unbiased_running_var, "bn_unbiased_running_var")
        c_in = x.shape[-1]
        hidden = int(round(c_in * self.expansion))
        y = x
        if self.expansion != 1:
            y = Conv(hidden, (1, 1), use_bias=False, kernel_init=_conv_init(), name="expand_conv")(
                y
            )
            y = _relu6(_batch_norm(self, "expand_bn")(y, train))
        y = Conv(
            hidden,
            (3, 3),
            self.stride,
            1,
            groups=hidden,
            use_bias=False,
            kernel_init=_conv_init(hidden),
            name="depthwise_conv",
        )(y)
        y = _relu6(_batch_norm(self, "depthwise_bn")(y, train))
        y = Conv(
            self.features, (1, 1), use_bias=False, kernel_init=_conv_init(), name="project_conv"
        )(y)
        y = _batch_norm(self, "project_bn")(y, train)
        if self.stride == 1 and c_in == self.features:
            return x + y
        return y


class MobileNetV2(nn.Module):
    """MobileNetV2; ``mobilenet_v2`` and ``mobilenet_v2_cifar`` build the standard ones.

    Attributes:
        num_classes: number of outputs (logits).
        width_multiplier: scales every width (``alpha`` in the paper; rounded to multiples of 8).
        stem: ``"imagenet"`` (3x3/2 stem, 224x224 inputs) or ``"cifar"`` (stride 1 stem and second
            stage, 32x32 inputs).
        stages: ``(t, c, n, s)`` of each stage (the paper's Table 2 by default).
        dropout_rate: dropout before the classifier (draws from the ``"dropout"`` rng in training).
        bn_momentum: decay of the BatchNorm running averages (0.9 is PyTorch's default 0.1).
        bn_unbiased_running_var: average the unbiased batch variance into the BatchNorm running
            variance, as PyTorch does (default False: the biased one).

    Example:
        >>> import jcnn
        >>> model = jcnn.models.mobilenet_v2_cifar()
        >>> x = jnp.zeros((2, 32, 32, 3))
        >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
        >>> sum(p.size for p in jax.tree.leaves(variables["params"]))
        2236682
        >>> logits = jax.eval_shape(model.apply, variables, x)
        >>> logits.shape
        (2, 10)
    """

    num_classes: int = 1000
    width_multiplier: float = 1.0
    stem: str = "imagenet"
    stages: Sequence[tuple[int, int, int, int]] = MOBILENET_V2_STAGES
    dropout_rate: float = 0.2
    bn_momentum: float = 0.9
    bn_unbiased_running_var: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` for images ``x`` ``(N, H, W, C)``."""
        check_array(x, "x", ndim=4)
        check_not_empty(x, "MobileNetV2")
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem: expected 'imagenet' or 'cifar', got {self.stem!r}")
        check_real(self.width_multiplier, "width_multiplier", low=0, low_open=True)
        num_classes = check_num_classes(self.num_classes)
        _check_stages(self.stages)
        check_dropout_rate(self.dropout_rate)
        check_bn_momentum(self.bn_momentum)
        check_bool(self.bn_unbiased_running_var, "bn_unbiased_running_var")
        cifar = self.stem == "cifar"
        x = Conv(
            make_divisible(32 * self.width_multiplier),
            (3, 3),
            1 if cifar else 2,
            1,
            use_bias=False,
            kernel_init=_conv_init(),
            name="stem_conv",
        )(x)
        x = _relu6(_batch_norm(self, "stem_bn")(x, train))
        index = 1
        for stage, (expansion, channels, repeats, stride) in enumerate(self.stages):
            if cifar and stage == 1:
                stride = 1
            for repeat in range(repeats):
                x = InvertedResidual(
                    make_divisible(channels * self.width_multiplier),
                    stride if repeat == 0 else 1,
                    expansion,
                    self.bn_momentum,
                    self.bn_unbiased_running_var,
                    name=f"block{index}",
                )(x, train)
                index += 1
        last = make_divisible(1280 * max(1.0, self.width_multiplier))
        x = Conv(last, (1, 1), use_bias=False, kernel_init=_conv_init(), name="head_conv")(x)
        x = _relu6(_batch_norm(self, "head_bn")(x, train))
        x = GlobalAvgPool(name="avgpool")(x)
        x = Dropout(self.dropout_rate, name="dropout")(x, train)
        return Dense(num_classes, kernel_init=init.normal(0.01), name="classifier")(x)


def mobilenet_v2(
    num_classes: int = 1000, width_multiplier: float = 1.0, **kwargs: Any
) -> MobileNetV2:
    """MobileNetV2 for 224x224 inputs (3,504,872 parameters at width 1.0, 1000 classes)."""
    return MobileNetV2(num_classes, width_multiplier, "imagenet", **kwargs)


def mobilenet_v2_cifar(
    num_classes: int = 10, width_multiplier: float = 1.0, **kwargs: Any
) -> MobileNetV2:
    """MobileNetV2 for 32x32 inputs (2,236,682 parameters at width 1.0, 10 classes)."""
    return MobileNetV2(num_classes, width_multiplier, "cifar", **kwargs)
