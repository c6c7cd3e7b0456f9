"""U-Net (Ronneberger et al. 2015): an encoder-decoder with skip connections for segmentation.

The encoder repeats ``two 3x3 convs with ReLU -> max pool 2x2/2``, doubling the width at each
level; the bottom level has two 3x3 convs; the decoder repeats ``2x2/2 transposed conv (halving
the width) -> concatenate the encoder's map of that level -> two 3x3 convs with ReLU``; a 1x1 conv
gives ``out_channels`` scores per pixel.

``padding="valid"`` is the paper's network (unpadded convs, the encoder's map center-cropped
before the concatenation: a 572x572 tile gives a 388x388 map); ``padding="same"`` keeps the size
(the input's height and width must then be divisible by ``2 ** (len(widths) - 1)``).
``batch_norm=True`` adds BatchNorm after every 3x3 conv (which then has no bias), as most modern
ports do. The paper's network, ``UNet()`` with 1 input channel (widths 64 ... 1024, 2 classes, no
BatchNorm), has 31,030,658 parameters: derived from its Fig. 1, checked against a PyTorch twin in
tests/models/test_unet.py.

Parameter names: ``down{i}`` (``i`` from 1) and ``bottom`` (each with ``conv1``, ``conv2`` and,
with BatchNorm, ``bn1``, ``bn2``), ``up{i}`` (the transposed conv) and ``up{i}_block`` (its two
convs), from the deepest level up, and ``head``.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcnn.functional._checks import check_array, check_bool, check_choice, check_int
from jcnn.models._checks import check_bn_momentum, check_not_empty, check_per_stage
from jcnn.nn import BatchNorm, Conv, ConvTranspose, MaxPool, ReLU

__all__ = ["DoubleConv", "UNet"]

_PADDINGS = {"same": 1, "valid": 0}


def _check_settings(padding, batch_norm, bn_momentum, bn_unbiased_running_var) -> None:
    check_choice(padding, "padding", tuple(_PADDINGS))
    check_bool(batch_norm, "batch_norm")
    check_bn_momentum(bn_momentum)
    check_bool(bn_unbiased_running_var, "bn_unbiased_running_var")


class DoubleConv(nn.Module):
    """``3x3 conv -> (BN) -> ReLU`` twice.

    Attributes:
        features: output channels of both convs.
        padding: ``"same"`` (pad 1) or ``"valid"`` (no padding: each conv removes 2 pixels).
        batch_norm: add BatchNorm after each conv (the convs then have no bias).
        bn_momentum: decay of the BatchNorm running averages.
        bn_unbiased_running_var: average the unbiased batch variance into the BatchNorm running
            variance, as PyTorch does (default False: the biased one).
    """

    features: int
    padding: str = "same"
    batch_norm: bool = False
    bn_momentum: float = 0.9
    bn_unbiased_running_var: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply both convs to ``x`` ``(N, H, W, C)``."""
        check_array(x, "x", ndim=4)
        check_not_empty(x, "DoubleConv")
        _check_settings(
            self.padding, self.batch_norm, self.bn_momentum, self.bn_unbiased_running_var
        )
        for i in (1, 2):
            x = Conv(
                self.features,
                (3, 3),
                padding=_PADDINGS[self.padding],
                use_bias=not self.batch_norm,
                name=f"conv{i}",
            )(x)
            if self.batch_norm:
                x = BatchNorm(
                    momentum=self.bn_momentum,
                    unbiased_running_var=self.bn_unbiased_running_var,
                    name=f"bn{i}",
                )(x, train)
            x = ReLU(name=f"relu{i}")(x)
        return x


def _center_crop(x, height: int, width: int):
    top = (x.shape[1] - height) // 2
    left = (x.shape[2] - width) // 2
    return x[:, top : top + height, left : left + width, :]


class UNet(nn.Module):
    """U-Net; the defaults are the paper's network.

    Attributes:
        out_channels: scores per pixel (classes).
        widths: width of each level, from the top; ``len(widths) - 1`` poolings.
        padding: ``"valid"`` (the paper's, output smaller than the input) or ``"same"``.
        batch_norm: BatchNorm after every 3x3 conv.
        bn_momentum: decay of the BatchNorm running averages.
        bn_unbiased_running_var: average the unbiased batch variance into the BatchNorm running
            variance, as PyTorch does (default False: the biased one).

    Example:
        >>> import jcnn
        >>> model = jcnn.models.UNet(out_channels=3, widths=(4, 8), padding="same")
        >>> x = jnp.zeros((1, 16, 16, 1))
        >>> jax.eval_shape(model.init_with_output, jax.random.key(0), x)[0].shape
        (1, 16, 16, 3)
        >>> model = jcnn.models.UNet(widths=(4, 8, 16))  # the paper's valid convs
        >>> x = jnp.zeros((1, 92, 92, 1))
        >>> jax.eval_shape(model.init_with_output, jax.random.key(0), x)[0].shape
        (1, 52, 52, 2)
    """

    out_channels: int = 2
    widths: Sequence[int] = (64, 128, 256, 512, 1024)
    padding: str = "valid"
    batch_norm: bool = False
    bn_momentum: float = 0.9
    bn_unbiased_running_var: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Scores ``(N, H', W', out_channels)`` for images ``x`` ``(N, H, W, C)``."""
        check_array(x, "x", ndim=4)
        check_not_empty(x, "UNet")
        widths = check_per_stage(self.widths, "widths")
        out_channels = check_int(self.out_channels, "out_channels", low=1)
        _check_settings(
            self.padding, self.batch_norm, self.bn_momentum, self.bn_unbiased_running_var
        )
        self._check_sizes(x.shape)
        options = {
            "padding": self.padding,
            "batch_norm": self.batch_norm,
            "bn_momentum": self.bn_momentum,
            "bn_unbiased_running_var": self.bn_unbiased_running_var,
        }
        skips = []
        for level, width in enumerate(widths[:-1], start=1):
            x = DoubleConv(width, **options, name=f"down{level}")(x, train)
            skips.append(x)
            x = MaxPool(2, name=f"pool{level}")(x)
        x = DoubleConv(widths[-1], **options, name="bottom")(x, train)
        for level in range(len(widths) - 1, 0, -1):
            width = widths[level - 1]
            x = ConvTranspose(width, (2, 2), 2, name=f"up{level}")(x)
            skip = _center_crop(skips[level - 1], x.shape[1], x.shape[2])
            x = jnp.concatenate([skip, x], axis=-1)
            x = DoubleConv(width, **options, name=f"up{level}_block")(x, train)
        return Conv(out_channels, (1, 1), name="head")(x)

    def _check_sizes(self, shape) -> None:
        """Raise unless every pooling of the input's height and width sees an even size and no
        map, down or up, is empty."""
        shrink = 4 if self.padding == "valid" else 0
        for axis, size in (("height", shape[1]), ("width", shape[2])):
            current = size
            for level in range(len(self.widths) - 1):
                current -= shrink
                if current < 1:
                    raise ValueError(
                        f"x: {axis} {size} is too small for a U-Net of {len(self.widths)} levels "
                        f"with {self.padding!r} padding (level {level + 1}'s convolutions would "
                        "leave an empty map)"
                    )
                if current < 2 or current % 2:
                    raise ValueError(
                        f"x: {axis} {size} does not fit a U-Net of {len(self.widths)} levels with "
                        f"{self.padding!r} padding: level {level + 1} max-pools a map of "
                        f"{axis} {current} (expected an even size >= 2)"
                    )
                current //= 2
            current -= shrink
            if current < 1:
                raise ValueError(
                    f"x: {axis} {size} is too small for a U-Net of {len(self.widths)} levels "
                    f"with {self.padding!r} padding (the bottom map would be empty)"
                )
            for level in range(len(self.widths) - 1, 0, -1):
                current = 2 * current - shrink
                if current < 1:
                    raise ValueError(
                        f"x: {axis} {size} is too small for a U-Net of {len(self.widths)} levels "
                        f"with {self.padding!r} padding (the decoder's map at level {level} would "
                        "be empty)"
                    )
