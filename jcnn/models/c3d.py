"""A small 3-D CNN for videos and volumes, in the style of C3D (Tran et al. 2015).

Stages of ``3x3x3 conv (no bias) -> BatchNorm -> ReLU -> max pool``; the first pool is 1x2x2 (it
keeps the depth/time axis, as C3D's first pool does) and the others 2x2x2; global average pooling
and a linear classifier. Inputs are channels-last volumes ``(N, D, H, W, C)`` of any size at least
``2 ** (len(widths) - 1)`` deep and ``2 ** len(widths)`` high and wide. With the default widths
(32, 64, 128, 256), 3 input channels and 10 classes: 1,167,338 parameters (checked against a
PyTorch twin in tests/models/test_c3d.py).

Parameter names: ``conv{i}``, ``bn{i}`` (``i`` from 1), ``fc``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jcnn import init
from jcnn.functional._checks import check_array, check_bool
from jcnn.models._checks import (
    check_bn_momentum,
    check_not_empty,
    check_num_classes,
    check_per_stage,
)
from jcnn.nn import BatchNorm, Conv, Dense, GlobalAvgPool, MaxPool, ReLU

__all__ = ["SmallC3D"]


def _check_volume_size(x, stages: int) -> None:
    """Raise a ``ValueError`` naming ``x`` unless every pool sees a window's worth of the
    volume: a 1x2x2 pool and then ``stages - 1`` 2x2x2 ones (a pool deep inside would otherwise
    blame its own ``window``)."""
    depth, side = 2 ** (stages - 1), 2**stages
    if x.shape[1] < depth or min(x.shape[2:4]) < side:
        raise ValueError(
            f"x: SmallC3D with {stages} stages expects volumes at least {depth} deep and "
            f"{side}x{side} high and wide (D, H, W), got shape {tuple(x.shape)}"
        )


class SmallC3D(nn.Module):
    """A C3D-style 3-D CNN with BatchNorm.

    Attributes:
        num_classes: number of outputs (logits).
        widths: channels of each stage.
        bn_momentum: decay of the BatchNorm running averages (0.9 is PyTorch's default 0.1).
        bn_unbiased_running_var: average the unbiased batch variance into the BatchNorm running
            variance, as PyTorch does (default False: the biased one).

    Example:
        >>> import jcnn
        >>> model = jcnn.models.SmallC3D(num_classes=4, widths=(4, 8))
        >>> x = jnp.zeros((2, 4, 8, 8, 3))
        >>> jax.eval_shape(model.init_with_output, jax.random.key(0), x)[0].shape
        (2, 4)
    """

    num_classes: int = 10
    widths: Sequence[int] = (32, 64, 128, 256)
    bn_momentum: float = 0.9
    bn_unbiased_running_var: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` for volumes ``x`` ``(N, D, H, W, C)``."""
        check_array(x, "x", ndim=5)
        check_not_empty(x, "SmallC3D")
        num_classes = check_num_classes(self.num_classes)
        widths = check_per_stage(self.widths, "widths")
        check_bn_momentum(self.bn_momentum)
        check_bool(self.bn_unbiased_running_var, "bn_unbiased_running_var")
        _check_volume_size(x, len(widths))
        for stage, width in enumerate(widths, start=1):
            x = Conv(width, (3, 3, 3), padding=1, use_bias=False, name=f"conv{stage}")(x)
            x = BatchNorm(
                momentum=self.bn_momentum,
                unbiased_running_var=self.bn_unbiased_running_var,
                name=f"bn{stage}",
            )(x, train)
            x = ReLU(name=f"relu{stage}")(x)
            x = MaxPool((1, 2, 2) if stage == 1 else (2, 2, 2), name=f"pool{stage}")(x)
        x = GlobalAvgPool(name="avgpool")(x)
        return Dense(num_classes, kernel_init=init.lecun_normal(), name="fc")(x)
