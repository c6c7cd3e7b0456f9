"""ConvNeXt (Liu et al. 2022): a ResNet modernized towards the vision transformer.

A patchify stem (``patch x patch`` conv with stride ``patch``, then LayerNorm); four stages of
blocks ``depthwise 7x7 conv -> LayerNorm -> Dense 4C -> GELU -> Dense C -> layer scale`` added to
the input (with optional stochastic depth), separated by downsampling layers ``LayerNorm -> 2x2/2
conv``; global average pooling, LayerNorm and a linear head. Every LayerNorm normalizes the
channels of each position (eps 1e-6), PyTorch's ``LayerNorm(C)`` on channels-last maps; layer
scales start at 1e-6.

- ``convnext_tiny``: depths (3, 3, 9, 3), widths (96, 192, 384, 768), 4x4 stem, for 224x224
  inputs: 28,589,128 parameters for 1000 classes, torchvision's published ``convnext_tiny`` count.
- ``convnext_cifar``: the same depths at half the width, (48, 96, 192, 384), with a 2x2 stem for
  32x32 inputs (maps 16, 8, 4, 2): 7,055,482 parameters for 10 classes (counted here; the formula
  is in tests/models/test_convnext.py).

Parameter names: ``stem_conv``, ``stem_norm``; blocks ``stage{s}_{b}`` (stage from 1, block from
0) holding ``dwconv``, ``norm``, ``pwconv1``, ``pwconv2`` and the ``layer_scale`` vector;
``downsample{s}_norm``, ``downsample{s}_conv`` before stages 2-4; ``head_norm``, ``head``.
``jcnn.analysis.from_torchvision_state_dict`` converts torchvision's weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcnn.functional._checks import check_array, check_int, check_real
from jcnn.models._checks import (
    check_image_size,
    check_not_empty,
    check_num_classes,
    check_per_stage,
)
from jcnn.nn import GELU, Conv, Dense, GlobalAvgPool, LayerNorm

__all__ = ["ConvNeXt", "ConvNeXtBlock", "convnext_tiny", "convnext_cifar"]

_LAYER_NORM_EPS = 1e-6
# torchvision's trunc_normal_(std=0.02): bounds +-2 absolute, +-100 standard deviations (JAX's
# default bounds, +-2 standard deviations, gave a standard deviation of 0.0176, 12% low)
_weight_init = jax.nn.initializers.truncated_normal(0.02, lower=-100.0, upper=100.0)


def _channel_norm(x, name: str):
    """LayerNorm over the channels of each position (jcnn's LayerNorm sees one row per pixel)."""
    return LayerNorm(eps=_LAYER_NORM_EPS, name=name)(x.reshape(-1, x.shape[-1])).reshape(x.shape)


def _drop_path(key, x, rate: float):
    """Zero whole examples with probability ``rate``, scaling the rest by ``1 / (1 - rate)``."""
    keep = jax.random.bernoulli(key, 1.0 - rate, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def _check_stochastic_depth(rate) -> float:
    return check_real(rate, "stochastic_depth", low=0, high=1, high_open=True)


class ConvNeXtBlock(nn.Module):
    """``dwconv 7x7 -> LayerNorm -> Dense 4C -> GELU -> Dense C``, scaled, plus the input.

    Attributes:
        stochastic_depth: probability of skipping the residual branch of an example in training
            (draws from the ``"dropout"`` rng when > 0).
        layer_scale_init: initial value of the per-channel ``layer_scale``.
        kernel_size: window of the depthwise conv.
        expansion: hidden width of the MLP as a multiple of the channels.

    Example:
        >>> import jcnn
        >>> block = jcnn.models.ConvNeXtBlock()
        >>> x = jnp.ones((1, 7, 7, 8))
        >>> y, variables = jax.eval_shape(block.init_with_output, jax.random.key(0), x)
        >>> variables["params"]["dwconv"]["kernel"].shape, y.shape
        ((7, 7, 1, 8), (1, 7, 7, 8))
    """

    stochastic_depth: float = 0.0
    layer_scale_init: float = 1e-6
    kernel_size: int = 7
    expansion: int = 4

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the block to ``x`` ``(N, H, W, C)``."""
        check_array(x, "x", ndim=4)
        check_not_empty(x, "ConvNeXtBlock")
        rate = _check_stochastic_depth(self.stochastic_depth)
        check_real(self.layer_scale_init, "layer_scale_init")
        kernel_size = check_int(self.kernel_size, "kernel_size", low=1)
        if kernel_size % 2 == 0:
            # an even window with padding kernel_size // 2 grows the map by one pixel and the
            # residual sum would fail to broadcast
            raise ValueError(
                f"kernel_size: expected an odd int (the block keeps the map's size), got "
                f"{kernel_size}"
            )
        expansion = check_int(self.expansion, "expansion", low=1)
        channels = x.shape[-1]
        y = Conv(
            channels,
            (kernel_size, kernel_size),
            padding=kernel_size // 2,
            groups=channels,
            kernel_init=_weight_init,
            name="dwconv",
        )(x)
        y = _channel_norm(y, "norm")
        y = Dense(expansion * channels, kernel_init=_weight_init, name="pwconv1")(y)
        y = GELU(name="gelu")(y)
        y = Dense(channels, kernel_init=_weight_init, name="pwconv2")(y)
        # float32 as every other parameter (the initializer's default dtype is float64 under
        # jax_enable_x64, which would promote a float32 network's output to float64)
        scale = self.param(
            "layer_scale",
            jax.nn.initializers.constant(self.layer_scale_init),
            (channels,),
            jnp.float32,
        )
        y = y * scale.reshape(1, 1, 1, channels)
        if train and rate > 0:
            if not (self.has_rng("dropout") or self.has_rng("params")):
                raise ValueError(
                    f"rngs: ConvNeXtBlock with stochastic_depth={rate} is training but has no "
                    "randomness; pass rngs={'dropout': key} to apply"
                )
            y = _drop_path(self.make_rng("dropout"), y, rate)
        return x + y


class ConvNeXt(nn.Module):
    """A ConvNeXt; ``convnext_tiny`` and ``convnext_cifar`` build the standard ones.

    Attributes:
        depths: number of blocks in each stage.
        widths: channels of each stage (one per stage).
        num_classes: number of outputs (logits).
        patch_size: window and stride of the stem conv (4 for 224x224 inputs, 2 or 1 for 32x32).
        stochastic_depth: the largest drop probability of a block; it grows linearly from 0 for
            the first block to this value for the last, as in torchvision.
        layer_scale_init: initial value of every block's layer scale.

    Example:
        >>> import jcnn
        >>> model = jcnn.models.ConvNeXt(depths=(1, 1), widths=(8, 16), num_classes=3, patch_size=2)
        >>> x = jnp.zeros((2, 16, 16, 3))
        >>> jax.eval_shape(model.init_with_output, jax.random.key(0), x)[0].shape
        (2, 3)
    """

    depths: Sequence[int] = (3, 3, 9, 3)
    widths: Sequence[int] = (96, 192, 384, 768)
    num_classes: int = 1000
    patch_size: int = 4
    stochastic_depth: float = 0.0
    layer_scale_init: float = 1e-6

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` for images ``x`` ``(N, H, W, C)``."""
        check_array(x, "x", ndim=4)
        check_not_empty(x, "ConvNeXt")
        depths = check_per_stage(self.depths, "depths")
        widths = check_per_stage(self.widths, "widths")
        stages = len(depths)
        if len(widths) != stages:
            raise ValueError(
                f"widths: expected one width per stage ({stages} stages), got {widths}"
            )
        num_classes = check_num_classes(self.num_classes)
        patch = check_int(self.patch_size, "patch_size", low=1)
        _check_stochastic_depth(self.stochastic_depth)
        check_real(self.layer_scale_init, "layer_scale_init")
        check_image_size(x, [(patch, patch, 0)] + [(2, 2, 0)] * (stages - 1), "ConvNeXt")
        x = Conv(widths[0], (patch, patch), patch, kernel_init=_weight_init, name="stem_conv")(x)
        x = _channel_norm(x, "stem_norm")
        total = sum(depths)
        index = 0
        for stage, (depth, width) in enumerate(zip(depths, widths, strict=True), start=1):
            if stage > 1:
                x = _channel_norm(x, f"downsample{stage}_norm")
                x = Conv(
                    width, (2, 2), 2, kernel_init=_weight_init, name=f"downsample{stage}_conv"
                )(x)
            for block in range(depth):
                rate = self.stochastic_depth * index / max(total - 1, 1)
                x = ConvNeXtBlock(rate, self.layer_scale_init, name=f"stage{stage}_{block}")(
                    x, train
                )
                index += 1
        x = GlobalAvgPool(name="avgpool")(x)
        x = LayerNorm(eps=_LAYER_NORM_EPS, name="head_norm")(x)
        return Dense(num_classes, kernel_init=_weight_init, name="head")(x)


def convnext_tiny(
    num_classes: int = 1000, stochastic_depth: float = 0.1, **kwargs: Any
) -> ConvNeXt:
    """ConvNeXt-T for 224x224 inputs (28,589,128 parameters for 1000 classes).

    ``stochastic_depth`` 0.1 is torchvision's setting for ConvNeXt-T.
    """
    return ConvNeXt((3, 3, 9, 3), (96, 192, 384, 768), num_classes, 4, stochastic_depth, **kwargs)


def convnext_cifar(num_classes: int = 10, stochastic_depth: float = 0.1, **kwargs: Any) -> ConvNeXt:
    """ConvNeXt-T's depths at half width with a 2x2 stem, for 32x32 inputs (7,055,482 parameters
    for 10 classes)."""
    return ConvNeXt((3, 3, 9, 3), (48, 96, 192, 384), num_classes, 2, stochastic_depth, **kwargs)
