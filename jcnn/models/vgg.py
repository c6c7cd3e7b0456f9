"""VGG-11/13/16/19 (Simonyan and Zisserman 2015), with or without BatchNorm.

3x3 convs (padding 1, with bias) in five stages separated by 2x2 max pools. The ImageNet head is
torchvision's: adaptive average pool to 7x7, flatten (channels-last), fc6 4096, ReLU, dropout, fc7
4096, ReLU, dropout, fc8; VGG-16 has 138,357,544 parameters (138,365,992 with BatchNorm). With
``small_input=True`` (CIFAR, 32x32 input, 1x1 after the last pool) the head is one dense layer
``fc`` from the 512 channels.

Submodules: ``conv{stage}_{i}`` (and ``bn{stage}_{i}``), ``relu{stage}_{i}``, ``pool{stage}``
with stages and convs numbered from 1 as in the paper (VGG-16: conv1_1, conv1_2, conv2_1, ...,
conv5_3), then ``avgpool``, ``flatten``, ``fc6``, ``relu6``, ``dropout6``, ``fc7``, ``relu7``,
``dropout7``, ``fc8`` (or ``flatten``, ``fc``). torchvision's ``features.<k>`` convs appear in the
same order.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jcnn import init
from jcnn.functional._checks import check_array, check_bool, is_int
from jcnn.models._checks import (
    check_bn_momentum,
    check_dropout_rate,
    check_image_size,
    check_num_classes,
)
from jcnn.nn import AdaptiveAvgPool, BatchNorm, Conv, Dense, Dropout, Flatten, MaxPool, ReLU

__all__ = ["VGG"]

# Convs per stage; the widths are 64, 128, 256, 512, 512.
_STAGE_DEPTHS = {11: (1, 1, 2, 2, 2), 13: (2, 2, 2, 2, 2), 16: (2, 2, 3, 3, 3), 19: (2, 2, 4, 4, 4)}
_WIDTHS = (64, 128, 256, 512, 512)


class VGG(nn.Module):
    """VGG network.

    Attributes:
        depth: 11, 13, 16 or 19 weight layers.
        batch_norm: BatchNorm after every conv (``train=True`` then updates ``batch_stats``).
        num_classes: number of outputs (logits).
        small_input: CIFAR-size head (one dense layer) instead of the ImageNet one.
        dropout_rate: dropout of the ImageNet head (needs a ``"dropout"`` rng when training).
        bn_momentum: decay of the BatchNorm running averages (0.9 is PyTorch's default 0.1).
        bn_unbiased_running_var: average the unbiased batch variance into the BatchNorm running
            variance, as PyTorch does (default False: the biased one).
    """

    depth: int = 16
    batch_norm: bool = False
    num_classes: int = 1000
    small_input: bool = False
    dropout_rate: float = 0.5
    bn_momentum: float = 0.9
    bn_unbiased_running_var: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` for images ``x`` ``(N, H, W, 3)``."""
        check_array(x, "x", ndim=4)
        if not is_int(self.depth):  # 16.0 == 16 would pass the lookup below
            raise TypeError(
                f"depth: expected an int, one of {sorted(_STAGE_DEPTHS)}, got {self.depth!r}"
            )
        depth = int(self.depth)
        if depth not in _STAGE_DEPTHS:
            raise ValueError(f"depth: expected one of {sorted(_STAGE_DEPTHS)}, got {depth}")
        check_bool(self.batch_norm, "batch_norm")
        check_bool(self.small_input, "small_input")
        num_classes = check_num_classes(self.num_classes)
        check_dropout_rate(self.dropout_rate)
        check_bn_momentum(self.bn_momentum)
        check_bool(self.bn_unbiased_running_var, "bn_unbiased_running_var")
        check_image_size(x, [(2, 2, 0)] * len(_WIDTHS), "VGG")
        for stage, (convs, width) in enumerate(
            zip(_STAGE_DEPTHS[depth], _WIDTHS, strict=True), start=1
        ):
            for i in range(1, convs + 1):
                x = Conv(width, (3, 3), padding=1, name=f"conv{stage}_{i}")(x)
                if self.batch_norm:
                    x = BatchNorm(
                        momentum=self.bn_momentum,
                        unbiased_running_var=self.bn_unbiased_running_var,
                        name=f"bn{stage}_{i}",
                    )(x, train)
                x = ReLU(name=f"relu{stage}_{i}")(x)
            x = MaxPool(2, name=f"pool{stage}")(x)
        head_init = init.lecun_normal()
        if self.small_input:
            x = Flatten(name="flatten")(x)
            return Dense(num_classes, kernel_init=head_init, name="fc")(x)
        x = AdaptiveAvgPool((7, 7), name="avgpool")(x)
        x = Flatten(name="flatten")(x)
        for layer in (6, 7):
            x = Dense(4096, name=f"fc{layer}")(x)
            x = ReLU(name=f"relu{layer}")(x)
            x = Dropout(self.dropout_rate, name=f"dropout{layer}")(x, train)
        return Dense(num_classes, kernel_init=head_init, name="fc8")(x)
