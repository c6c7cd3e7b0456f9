"""FastMNISTNet: a small conv-BatchNorm network that reaches 99% on MNIST in about one epoch.

Two stages ``conv 5x5 (valid, no bias) -> max pool 2 -> BatchNorm -> ReLU`` and a linear head:
28 -> 24 -> 12 -> 8 -> 4. Pooling before the normalization (airbench's order) normalizes a
quarter of the pixels, which on a CPU is most of the step's time after the convolutions. The
``mnist99`` recipe of ``jcnn.train.recipes`` trains it.

Submodules: ``conv1``, ``pool1``, ``norm1``, ``relu1``, ``conv2``, ``pool2``, ``norm2``,
``relu2``, ``flatten``, ``head``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jcnn.functional._checks import check_array, check_bool
from jcnn.models._checks import (
    check_bn_momentum,
    check_image_size,
    check_num_classes,
    check_per_stage,
)
from jcnn.nn import BatchNorm, Conv, Dense, Flatten, MaxPool, ReLU

__all__ = ["FastMNISTNet"]


class FastMNISTNet(nn.Module):
    """A small conv-BatchNorm network for ``(N, 28, 28, 1)`` digits.

    Attributes:
        num_classes: number of outputs (logits).
        widths: output channels of the two convs.
        bn_momentum: decay of the BatchNorm running averages.
        bn_unbiased_running_var: average the unbiased batch variance into the BatchNorm running
            variance, as PyTorch does (default False: the biased one).

    Example:
        >>> import jcnn
        >>> model = jcnn.models.FastMNISTNet()
        >>> x = jnp.zeros((2, 28, 28, 1))
        >>> variables = model.init(jax.random.key(0), x)
        >>> model.apply(variables, x).shape
        (2, 10)
        >>> sum(p.size for p in jax.tree.leaves(variables["params"]))
        62442
    """

    num_classes: int = 10
    widths: Sequence[int] = (32, 64)
    bn_momentum: float = 0.9
    bn_unbiased_running_var: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` for images ``x`` ``(N, 28, 28, C)``."""
        check_array(x, "x", ndim=4)
        widths = check_per_stage(self.widths, "widths")
        if len(widths) != 2:
            raise ValueError(f"widths: expected two conv widths, got {widths}")
        num_classes = check_num_classes(self.num_classes)
        check_bn_momentum(self.bn_momentum)
        check_bool(self.bn_unbiased_running_var, "bn_unbiased_running_var")
        check_image_size(x, [(5, 1, 0), (2, 2, 0)] * 2, "FastMNISTNet")
        for index, width in enumerate(widths, start=1):
            x = Conv(width, (5, 5), use_bias=False, name=f"conv{index}")(x)
            x = MaxPool(2, name=f"pool{index}")(x)
            x = BatchNorm(
                momentum=self.bn_momentum,
                unbiased_running_var=self.bn_unbiased_running_var,
                name=f"norm{index}",
            )(x, train)
            x = ReLU(name=f"relu{index}")(x)
        x = Flatten(name="flatten")(x)
        return Dense(num_classes, name="head")(x)
