"""Residual networks (He et al. 2016): ImageNet ResNet-18/34/50 and CIFAR-10 ResNet-20/56.

ImageNet stem: conv1 7x7/2 (64, no bias), bn1, relu, maxpool 3x3/2 pad 1; four stages of basic
(18, 34) or bottleneck (50) blocks with widths 64, 128, 256, 512, the first block of stages 2-4
with stride 2 (in the 3x3 conv of a bottleneck, as torchvision's "v1.5"); global average pool; fc.
Parameter counts equal torchvision's: ResNet-18 11,689,512, ResNet-34 21,797,672,
ResNet-50 25,557,032.

CIFAR stem (Sec. 4.2 of the paper): conv1 3x3 (16), bn1, relu; three stages of n basic blocks with
widths 16, 32, 64 (6n + 2 layers); global average pool; fc. The shortcut that changes shape is the
paper's option A by default (subsample by 2, zero-pad the new channels, placed symmetrically:
``(out - in) // 2`` zero channels before the input's and the rest after): no parameters, so
ResNet-20 has 269,722 parameters and ResNet-56 853,018. ``shortcut="projection"`` uses option B.

Parameter names: ``conv1``, ``bn1``, blocks ``layer{stage}_{block}`` (stage from 1, block from 0:
torchvision's ``layer1.0``) holding ``conv1``, ``bn1``, ``conv2``, ``bn2`` (``conv3``, ``bn3`` in a
bottleneck) and, for a projection shortcut, ``downsample_conv`` and ``downsample_bn``
(torchvision's ``downsample.0`` and ``downsample.1``); ``fc``. BatchNorm running statistics have
the same paths in ``batch_stats``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcnn import functional as F
from jcnn import init
from jcnn.functional._checks import check_array, check_bool, check_choice
from jcnn.models._checks import check_bn_momentum, check_num_classes, check_per_stage
from jcnn.nn import BatchNorm, Conv, Dense, GlobalAvgPool, MaxPool, ReLU

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet20",
    "resnet56",
]

_SHORTCUTS = ("projection", "pad")


def _check_block_settings(
    shortcut, bn_momentum, zero_init_residual, bn_unbiased_running_var
) -> None:
    check_choice(shortcut, "shortcut", _SHORTCUTS)
    check_bn_momentum(bn_momentum)
    check_bool(zero_init_residual, "zero_init_residual")
    check_bool(bn_unbiased_running_var, "bn_unbiased_running_var")


def _pad_shortcut(x, features: int, stride: int):
    x = F.subsample(x, stride) if stride != 1 else x
    extra = features - x.shape[-1]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))


class _Block(nn.Module):
    """The settings every residual block takes (see ``BasicBlock``)."""

    features: int
    stride: int = 1
    shortcut: str = "projection"
    bn_momentum: float = 0.9
    zero_init_residual: bool = False
    bn_unbiased_running_var: bool = False

    expansion = 1  # output channels per unit of ``features``

    def _check_settings(self) -> None:
        _check_block_settings(
            self.shortcut, self.bn_momentum, self.zero_init_residual, self.bn_unbiased_running_var
        )


class BasicBlock(_Block):
    """Two 3x3 conv-BN layers plus the shortcut, then ReLU (ResNet-18/34 and the CIFAR nets).

    Attributes:
        features: output channels.
        stride: stride of the first conv (and of the shortcut).
        shortcut: ``"projection"`` (1x1 conv + BN when the shape changes) or ``"pad"`` (option A).
        bn_momentum: decay of the BatchNorm running averages.
        zero_init_residual: start the last BN scale at zero, so the block starts as the identity.
        bn_unbiased_running_var: average the unbiased batch variance into the BatchNorm running
            variance, as PyTorch does (default False: the biased one).
    """

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the block to ``x`` ``(N, H, W, C)``."""
        self._check_settings()
        y = Conv(self.features, (3, 3), self.stride, 1, use_bias=False, name="conv1")(x)
        y = _batch_norm(self, "bn1")(y, train)
        y = ReLU(name="relu1")(y)
        y = Conv(self.features, (3, 3), 1, 1, use_bias=False, name="conv2")(y)
        y = _last_bn(self, "bn2")(y, train)
        return ReLU(name="relu2")(y + _shortcut(self, x, self.features, train))


class Bottleneck(_Block):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with BN, plus the shortcut, then ReLU.

    Attributes:
        features: width of the 3x3 conv; the block outputs ``4 * features`` channels.
        stride, shortcut, bn_momentum, zero_init_residual, bn_unbiased_running_var: as in
            ``BasicBlock``.
    """

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the block to ``x`` ``(N, H, W, C)``."""
        self._check_settings()
        out = self.features * self.expansion
        y = Conv(self.features, (1, 1), use_bias=False, name="conv1")(x)
        y = _batch_norm(self, "bn1")(y, train)
        y = ReLU(name="relu1")(y)
        y = Conv(self.features, (3, 3), self.stride, 1, use_bias=False, name="conv2")(y)
        y = _batch_norm(self, "bn2")(y, train)
        y = ReLU(name="relu2")(y)
        y = Conv(out, (1, 1), use_bias=False, name="conv3")(y)
        y = _last_bn(self, "bn3")(y, train)
        return ReLU(name="relu3")(y + _shortcut(self, x, out, train))


def _batch_norm(module, name: str, **options: Any) -> BatchNorm:
    return BatchNorm(
        momentum=module.bn_momentum,
        unbiased_running_var=module.bn_unbiased_running_var,
        name=name,
        **options,
    )


def _last_bn(block, name: str) -> BatchNorm:
    scale_init = init.zeros if block.zero_init_residual else init.ones
    return _batch_norm(block, name, scale_init=scale_init)


def _shortcut(block, x, features: int, train: bool):
    if block.stride == 1 and x.shape[-1] == features:
        return x
    if block.shortcut == "pad":
        if x.shape[-1] > features:
            raise ValueError(
                f"shortcut: 'pad' (option A) zero-pads the input's {x.shape[-1]} channels to the "
                f"block's {features} output channels and cannot drop channels; use "
                "shortcut='projection' for a block narrower than its input"
            )
        return _pad_shortcut(x, features, block.stride)
    y = Conv(features, (1, 1), block.stride, use_bias=False, name="downsample_conv")(x)
    return _batch_norm(block, "downsample_bn")(y, train)


class ResNet(nn.Module):
    """A residual network; ``resnet18`` ... ``resnet56`` build the standard ones.

    Attributes:
        stage_sizes: number of blocks in each stage.
        block: ``"basic"`` or ``"bottleneck"``.
        num_classes: number of outputs (logits).
        stem: ``"imagenet"`` (7x7/2 conv + max pool) or ``"cifar"`` (one 3x3 conv).
        widths: block width of each stage (one per stage).
        shortcut: ``"projection"`` (option B) or ``"pad"`` (option A, parameter-free).
        bn_momentum: decay of the BatchNorm running averages (0.9 is PyTorch's default 0.1).
        zero_init_residual: start each block's last BN scale at zero.
        bn_unbiased_running_var: average the unbiased batch variance into the BatchNorm running
            variance, as PyTorch does (default False: the biased one).

    Example:
        >>> import jcnn
        >>> model = jcnn.models.resnet20()
        >>> x = jnp.zeros((2, 32, 32, 3))
        >>> variables = model.init(jax.random.key(0), x)
        >>> logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        >>> logits.shape
        (2, 10)
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    num_classes: int = 1000
    stem: str = "imagenet"
    widths: Sequence[int] = (64, 128, 256, 512)
    shortcut: str = "projection"
    bn_momentum: float = 0.9
    zero_init_residual: bool = False
    bn_unbiased_running_var: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` for images ``x`` ``(N, H, W, C)``."""
        check_array(x, "x", ndim=4)
        blocks = {"basic": BasicBlock, "bottleneck": Bottleneck}
        if self.block not in blocks:
            raise ValueError(f"block: expected 'basic' or 'bottleneck', got {self.block!r}")
        if self.stem not in ("imagenet", "cifar"):
            raise ValueError(f"stem: expected 'imagenet' or 'cifar', got {self.stem!r}")
        stage_sizes = check_per_stage(self.stage_sizes, "stage_sizes")
        stages = len(stage_sizes)
        widths = check_per_stage(self.widths, "widths")
        if len(widths) != stages:
            raise ValueError(f"widths: expected one width per stage ({stages}), got {widths}")
        num_classes = check_num_classes(self.num_classes)
        _check_block_settings(
            self.shortcut, self.bn_momentum, self.zero_init_residual, self.bn_unbiased_running_var
        )
        if self.stem == "imagenet":
            x = Conv(widths[0], (7, 7), 2, 3, use_bias=False, name="conv1")(x)
        else:
            x = Conv(widths[0], (3, 3), 1, 1, use_bias=False, name="conv1")(x)
        x = _batch_norm(self, "bn1")(x, train)
        x = ReLU(name="relu")(x)
        if self.stem == "imagenet":
            x = MaxPool(3, 2, 1, name="maxpool")(x)
        block_cls = blocks[self.block]
        for stage, (size, width) in enumerate(zip(stage_sizes, widths, strict=True), start=1):
            for index in range(size):
                x = block_cls(
                    width,
                    stride=2 if stage > 1 and index == 0 else 1,
                    shortcut=self.shortcut,
                    bn_momentum=self.bn_momentum,
                    zero_init_residual=self.zero_init_residual,
                    bn_unbiased_running_var=self.bn_unbiased_running_var,
                    name=f"layer{stage}_{index}",
                )(x, train)
        x = GlobalAvgPool(name="avgpool")(x)
        return Dense(num_classes, kernel_init=init.lecun_normal(), name="fc")(x)


def resnet18(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-18 for ImageNet-size inputs (11,689,512 parameters for 1000 classes)."""
    return ResNet((2, 2, 2, 2), "basic", num_classes, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-34 for ImageNet-size inputs (21,797,672 parameters for 1000 classes)."""
    return ResNet((3, 4, 6, 3), "basic", num_classes, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-50 for ImageNet-size inputs (25,557,032 parameters for 1000 classes)."""
    return ResNet((3, 4, 6, 3), "bottleneck", num_classes, **kwargs)


def _cifar(n: int, num_classes: int, kwargs) -> ResNet:
    options = {"stem": "cifar", "widths": (16, 32, 64), "shortcut": "pad", **kwargs}
    return ResNet((n, n, n), "basic", num_classes, **options)


def resnet20(num_classes: int = 10, **kwargs: Any) -> ResNet:
    """ResNet-20 for CIFAR-10 (n = 3, 269,722 parameters with option-A shortcuts)."""
    return _cifar(3, num_classes, kwargs)


def resnet56(num_classes: int = 10, **kwargs: Any) -> ResNet:
    """ResNet-56 for CIFAR-10 (n = 9, 853,018 parameters with option-A shortcuts)."""
    return _cifar(9, num_classes, kwargs)
