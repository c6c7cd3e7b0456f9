"""JarrettNet: the "what is the best multi-stage architecture" network of Jarrett et al. (2009).

Each stage is ``conv -> tanh -> rectification |x| -> local contrast normalization -> pool``
(the notes' "these operations are inserted after the convolutions and before the pooling"); a
dense layer on the flattened (channels-last) features gives the logits. The paper's stages for
143x143 Caltech-101 images were 64 filters 9x9 then 256 filters 9x9 with 10x10/5 and 6x6/4
average pools; the defaults here suit 28x28 to 32x32 images: 5x5 "same" convs, 2x2 average
pools, widths 64 and 128. The paper's per-channel gain after tanh is left out (the following
contrast normalization divides it away except where the local deviation falls below its floor).

Submodules: ``conv{i}``, ``tanh{i}``, ``rectify{i}``, ``lcn{i}``, ``pool{i}`` for stages
``i = 1, 2, ...``, then ``flatten`` and ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jcnn import init
from jcnn.functional._checks import check_array, check_positive_int
from jcnn.models._checks import check_image_size, check_num_classes, check_per_stage
from jcnn.nn import AvgPool, Conv, Dense, Flatten, LocalContrastNorm, MaxPool, Rectify, Tanh

__all__ = ["JarrettNet"]


class JarrettNet(nn.Module):
    """Stages of conv, tanh, |x|, local contrast normalization and pooling, then a dense layer.

    Attributes:
        num_classes: number of outputs (logits).
        widths: filters of each stage.
        kernel_size: conv window (odd; the convs pad ``kernel_size // 2`` to keep the size).
        pool: ``"avg"`` (the paper's P_A) or ``"max"`` (P_M).
        pool_window, pool_stride: pooling geometry.
        lcn_size: window of the local contrast normalization (Gaussian).

    Example:
        >>> import jcnn
        >>> model = jcnn.models.JarrettNet(widths=(4, 8))
        >>> x = jnp.zeros((2, 28, 28, 1))
        >>> model.apply(model.init(jax.random.key(0), x), x).shape
        (2, 10)
    """

    num_classes: int = 10
    widths: Sequence[int] = (64, 128)
    kernel_size: int = 5
    pool: str = "avg"
    pool_window: int = 2
    pool_stride: int = 2
    lcn_size: int = 9

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` for images ``x`` ``(N, H, W, C)``; ``train`` is unused."""
        check_array(x, "x", ndim=4)
        pools = {"avg": AvgPool, "max": MaxPool}
        if self.pool not in pools:
            raise ValueError(f"pool: expected 'avg' or 'max', got {self.pool!r}")
        k = check_positive_int(self.kernel_size, "kernel_size")
        if k % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd int (to keep the size), got {k}")
        num_classes = check_num_classes(self.num_classes)
        widths = check_per_stage(self.widths, "widths")
        check_positive_int(self.pool_window, "pool_window")
        check_positive_int(self.pool_stride, "pool_stride")
        if check_positive_int(self.lcn_size, "lcn_size") % 2 == 0:
            raise ValueError(f"lcn_size: expected an odd int, got {self.lcn_size}")
        pooling = (self.pool_window, self.pool_stride, 0)
        check_image_size(x, [pooling] * len(widths), "JarrettNet")
        conv_init = init.lecun_normal()
        for index, width in enumerate(widths, start=1):
            x = Conv(width, (k, k), padding=k // 2, kernel_init=conv_init, name=f"conv{index}")(x)
            x = Tanh(name=f"tanh{index}")(x)
            x = Rectify(name=f"rectify{index}")(x)
            x = LocalContrastNorm(self.lcn_size, name=f"lcn{index}")(x)
            x = pools[self.pool](self.pool_window, self.pool_stride, name=f"pool{index}")(x)
        x = Flatten(name="flatten")(x)
        return Dense(num_classes, kernel_init=init.lecun_normal(), name="fc")(x)
