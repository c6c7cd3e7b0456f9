"""AlexNet (Krizhevsky et al. 2012) in three variants.

* ``"imagenet"`` (default): the one-tower network of torchvision (conv widths 64, 192, 384, 256,
  256; no LRN) for 224x224 (or 227x227) inputs, with an adaptive average pool to 6x6 before the
  classifier; 61,100,840 parameters for 1000 classes.
* ``"original"``: the paper's widths 96, 256, 384, 384, 256 with local response normalization
  (size 5, alpha 1e-4, beta 0.75, k 2) after conv1 and conv2, for 227x227 inputs, as one tower
  (no two-GPU grouping); 62,378,344 parameters.
* ``"cifar"``: a small-input version for 32x32 images: 3x3 convs (the first with stride 2), three
  2x2 max pools (32 -> 16 -> 8 -> 4 -> 2), widths 64, 192, 384, 256, 256 and dense layers of
  1024 units.

Submodules: ``conv1``..``conv5``, ``relu1``..``relu7``, ``lrn1``/``lrn2`` (original), ``pool1``,
``pool2``, ``pool5``, ``avgpool`` (imagenet), ``flatten``, ``dropout6``, ``fc6``, ``dropout7``,
``fc7``, ``fc8``. The flatten is channels-last (NHWC).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jcnn import init
from jcnn.functional._checks import check_array
from jcnn.models._checks import check_dropout_rate, check_image_size, check_num_classes
from jcnn.nn import (
    AdaptiveAvgPool,
    Conv,
    Dense,
    Dropout,
    Flatten,
    LocalResponseNorm,
    MaxPool,
    ReLU,
)

__all__ = ["AlexNet"]

# (features, kernel, stride, padding) of conv1..conv5, pools after conv1, conv2 and conv5.
_VARIANTS = {
    "imagenet": (
        ((64, 11, 4, 2), (192, 5, 1, 2), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)),
        4096,
    ),
    "original": (
        ((96, 11, 4, 0), (256, 5, 1, 2), (384, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1)),
        4096,
    ),
    "cifar": (
        ((64, 3, 2, 1), (192, 3, 1, 1), (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1)),
        1024,
    ),
}


class AlexNet(nn.Module):
    """AlexNet; see the module docstring for the three variants.

    Attributes:
        num_classes: number of outputs (logits).
        variant: ``"imagenet"``, ``"original"`` or ``"cifar"``.
        dropout_rate: dropout before fc6 and fc7 (active only with ``train=True``, which then needs
            a ``"dropout"`` rng).
    """

    num_classes: int = 1000
    variant: str = "imagenet"
    dropout_rate: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` for images ``x`` ``(N, H, W, 3)``."""
        check_array(x, "x", ndim=4)
        if self.variant not in _VARIANTS:
            raise ValueError(f"variant: expected one of {sorted(_VARIANTS)}, got {self.variant!r}")
        num_classes = check_num_classes(self.num_classes)
        check_dropout_rate(self.dropout_rate)
        convs, hidden = _VARIANTS[self.variant]
        small = self.variant == "cifar"
        pool_window, pool_stride = (2, 2) if small else (3, 2)
        reductions = []
        for index, (_, kernel, stride, padding) in enumerate(convs, start=1):
            reductions.append((kernel, stride, padding))
            if index in (1, 2, 5):
                reductions.append((pool_window, pool_stride, 0))
        check_image_size(x, reductions, f"AlexNet (variant {self.variant!r})")
        for index, (features, kernel, stride, padding) in enumerate(convs, start=1):
            x = Conv(features, (kernel, kernel), stride, padding, name=f"conv{index}")(x)
            x = ReLU(name=f"relu{index}")(x)
            if self.variant == "original" and index <= 2:
                x = LocalResponseNorm(5, alpha=1e-4, beta=0.75, k=2.0, name=f"lrn{index}")(x)
            if index in (1, 2, 5):
                x = MaxPool(pool_window, pool_stride, name=f"pool{index}")(x)
        if self.variant == "imagenet":
            x = AdaptiveAvgPool((6, 6), name="avgpool")(x)
        x = Flatten(name="flatten")(x)
        x = Dropout(self.dropout_rate, name="dropout6")(x, train)
        x = Dense(hidden, name="fc6")(x)
        x = ReLU(name="relu6")(x)
        x = Dropout(self.dropout_rate, name="dropout7")(x, train)
        x = Dense(hidden, name="fc7")(x)
        x = ReLU(name="relu7")(x)
        return Dense(num_classes, kernel_init=init.lecun_normal(), name="fc8")(x)
