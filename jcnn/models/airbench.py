"""AirbenchNet: the fast CIFAR-10 network of Keller Jordan's airbench94.

A 2x2 patch-whitening conv (``2 * 3 * 2 * 2 = 24`` channels, no padding, with bias) and GELU;
three groups ``conv -> maxpool 2 -> BN -> GELU -> conv -> BN -> GELU`` of widths 64, 256, 256
(3x3 "same" convs without bias, BatchNorm without a learned scale); a 3x3 max pool; a linear head
without bias whose output is multiplied by 1/9. On 32x32 inputs: 31 -> 15 -> 7 -> 3 -> 1.
1,971,640 parameters for 10 classes (airbench's count, 1,972,792, also includes the 1,152 BN
weights that it keeps frozen at 1).

airbench's BatchNorm uses PyTorch momentum 0.4, i.e. a decay of 0.6 here, and eps 1e-12.
``whitening_kernel`` computes airbench's data-dependent initialization of the first conv; the
training recipe (freezing that layer, label smoothing, lookahead, test-time augmentation, dirac
initialization of the convs) belongs to the training code, not to the architecture.

Submodules: ``whiten``, ``gelu0``, ``group1``..``group3`` (each with ``conv1``, ``pool``,
``norm1``, ``gelu1``, ``conv2``, ``norm2``, ``gelu2``), ``pool``, ``flatten``, ``head``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jcnn import init
from jcnn.functional._checks import (
    check_array,
    check_bool,
    check_int,
    check_real,
    check_real_or_traced,
    is_int,
)
from jcnn.models._checks import (
    check_bn_momentum,
    check_image_size,
    check_num_classes,
    check_per_stage,
)
from jcnn.nn import GELU, BatchNorm, Conv, Dense, Flatten, MaxPool

__all__ = ["AirbenchNet", "ConvGroup", "whitening_kernel"]


def _check_norm_settings(bn_momentum, bn_eps, bn_unbiased_running_var) -> None:
    check_bn_momentum(bn_momentum)
    check_real(bn_eps, "bn_eps", low=0, low_open=True)
    check_bool(bn_unbiased_running_var, "bn_unbiased_running_var")


class ConvGroup(nn.Module):
    """``conv -> maxpool 2 -> BN -> GELU -> conv -> BN -> GELU`` (airbench's block).

    Attributes:
        features: output channels of both convs.
        bn_momentum: decay of the BatchNorm running averages.
        bn_eps: BatchNorm epsilon.
        kernel_init: initializer of both conv kernels (``None``: ``Conv``'s default).
        bn_unbiased_running_var: average the unbiased batch variance into the BatchNorm running
            variance, as PyTorch does (default False: the biased one).
    """

    features: int
    bn_momentum: float = 0.6
    bn_eps: float = 1e-12
    kernel_init: Callable | None = None
    bn_unbiased_running_var: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Apply the group to ``x`` ``(N, H, W, C)``; halves H and W."""
        _check_norm_settings(self.bn_momentum, self.bn_eps, self.bn_unbiased_running_var)
        conv = functools.partial(
            Conv,
            self.features,
            (3, 3),
            padding="SAME",
            use_bias=False,
            kernel_init=self.kernel_init,
        )
        x = conv(name="conv1")(x)
        x = MaxPool(2, name="pool")(x)
        x = self._norm("norm1")(x, train)
        x = GELU(name="gelu1")(x)
        x = conv(name="conv2")(x)
        x = self._norm("norm2")(x, train)
        return GELU(name="gelu2")(x)

    def _norm(self, name: str) -> BatchNorm:
        return BatchNorm(
            momentum=self.bn_momentum,
            eps=self.bn_eps,
            unbiased_running_var=self.bn_unbiased_running_var,
            use_scale=False,
            name=name,
        )


class AirbenchNet(nn.Module):
    """airbench94's network for ``(N, 32, 32, 3)`` images.

    Attributes:
        num_classes: number of outputs (logits).
        widths: widths of the three conv groups.
        whiten_kernel_size: window of the whitening conv (its width is ``2 * C * k * k``).
        scaling_factor: multiplier of the logits.
        bn_momentum, bn_eps: BatchNorm settings of the groups.
        conv_init: initializer of the groups' conv kernels (``None``: ``Conv``'s default);
            airbench94 uses ``init.with_dirac`` over PyTorch's default.
        whiten_init: initializer of the whitening kernel, e.g.
            ``init.from_array(whitening_kernel(images))`` (``None``: ``Conv``'s default).
        bn_unbiased_running_var: average the unbiased batch variance into the BatchNorm running
            variance, as PyTorch does (default False: the biased one).

    Example:
        >>> import jcnn
        >>> model = jcnn.models.AirbenchNet()
        >>> x = jnp.zeros((2, 32, 32, 3))
        >>> variables = jax.eval_shape(model.init, jax.random.key(0), x)
        >>> sum(p.size for p in jax.tree.leaves(variables["params"]))
        1971640
    """

    num_classes: int = 10
    widths: Sequence[int] = (64, 256, 256)
    whiten_kernel_size: int = 2
    scaling_factor: float = 1 / 9
    bn_momentum: float = 0.6
    bn_eps: float = 1e-12
    conv_init: Callable | None = None
    whiten_init: Callable | None = None
    bn_unbiased_running_var: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """Logits ``(N, num_classes)`` for images ``x`` ``(N, H, W, C)``."""
        check_array(x, "x", ndim=4)
        num_classes = check_num_classes(self.num_classes)
        widths = check_per_stage(self.widths, "widths")
        k = check_int(self.whiten_kernel_size, "whiten_kernel_size", low=1)
        check_real(self.scaling_factor, "scaling_factor")
        _check_norm_settings(self.bn_momentum, self.bn_eps, self.bn_unbiased_running_var)
        pools = [(2, 2, 0)] * len(widths)
        check_image_size(x, [(k, 1, 0), *pools, (3, 3, 0)], "AirbenchNet")
        x = Conv(2 * x.shape[-1] * k * k, (k, k), kernel_init=self.whiten_init, name="whiten")(x)
        x = GELU(name="gelu0")(x)
        for index, width in enumerate(widths, start=1):
            group = ConvGroup(
                width,
                self.bn_momentum,
                self.bn_eps,
                self.conv_init,
                self.bn_unbiased_running_var,
                name=f"group{index}",
            )
            x = group(x, train)
        x = MaxPool(3, name="pool")(x)
        x = Flatten(name="flatten")(x)
        x = Dense(num_classes, use_bias=False, kernel_init=init.lecun_normal(), name="head")(x)
        return x * self.scaling_factor


def whitening_kernel(images: jax.Array, kernel_size: int = 2, eps: float = 5e-4) -> jax.Array:
    """airbench's whitening initialization of the first conv, from training images.

    Takes every ``kernel_size x kernel_size`` patch of ``images``, the eigendecomposition of their
    (uncentred) second-moment matrix ``E[p p^T]``, and returns the kernel whose filters are the
    eigenvectors divided by ``sqrt(eigenvalue + eps)`` (largest eigenvalue first) followed by their
    negatives: convolving the images with it gives decorrelated channels of unit second moment
    (up to ``eps``).

    Args:
        images: floating array ``(N, H, W, C)``, already normalized as the network will see them
            (at least one image; finite values within float32's range).
        kernel_size: the whitening window ``k``.
        eps: added to the eigenvalues, ``>= 0`` (0 is refused where some eigenvalue is zero).

    Returns:
        The kernel ``(k, k, C, 2 * k * k * C)`` for ``AirbenchNet``'s ``whiten`` conv.

    Example:
        >>> images = jax.random.normal(jax.random.key(0), (8, 6, 6, 3))
        >>> whitening_kernel(images).shape
        (2, 2, 3, 24)
    """
    check_array(images, "images", ndim=4)
    eps = check_real_or_traced(eps, "eps", low=0)
    n, height, width, channels = images.shape
    if n == 0:
        raise ValueError(f"images: expected at least one image, got shape {images.shape}")
    if channels == 0:
        raise ValueError(f"images: expected at least one channel, got shape {images.shape}")
    k = kernel_size
    if not is_int(k) or not 1 <= k <= min(height, width):
        raise ValueError(
            f"kernel_size: expected an int in [1, {min(height, width)}] (the image size), got {k!r}"
        )
    k = int(k)
    patches = jnp.stack(
        [
            images[:, i : height - k + 1 + i, j : width - k + 1 + j, :]
            for i in range(k)
            for j in range(k)
        ],
        axis=-2,
    ).reshape(-1, k * k * channels)
    patches = patches.astype(jnp.float32)
    concrete = not isinstance(patches, jax.core.Tracer)
    if concrete and not bool(jnp.isfinite(patches).all()):
        bad = int((~jnp.isfinite(images.astype(jnp.float32))).sum())
        raise ValueError(
            f"images: expected finite values within float32's range (|v| <= 3.4e38), got {bad} "
            "NaN, infinite or larger value(s)"
        )
    second_moment = patches.T @ patches / patches.shape[0]
    if concrete and not bool(jnp.isfinite(second_moment).all()):
        raise ValueError(
            "images: expected values normalized as the network sees them, got values up to "
            f"{float(jnp.abs(patches).max()):.3g}, whose squares overflow float32"
        )
    eigenvalues, eigenvectors = jnp.linalg.eigh(second_moment)
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    if concrete and not isinstance(eps, jax.core.Tracer):
        # eigh's float32 eigenvalues of a singular matrix come out near 0, of either sign
        tiny = float(eigenvalues[0]) * eigenvalues.size * float(jnp.finfo(jnp.float32).eps)
        if float(eigenvalues[-1]) + eps <= (tiny if eps == 0 else 0.0):
            raise ValueError(
                f"eps: expected a value > {max(tiny, -float(eigenvalues[-1])):.3g} for these "
                f"images: the patches' second moment has eigenvalue(s) near zero (smallest "
                f"{float(eigenvalues[-1]):.3g}), which 1 / sqrt(eigenvalue + eps) would divide "
                f"by; got eps={eps}"
            )
    filters = eigenvectors / jnp.sqrt(eigenvalues + eps)[None, :]
    kernel = filters.reshape(k, k, channels, k * k * channels)
    return jnp.concatenate([kernel, -kernel], axis=-1)
