"""Input standardization fit on the training set and applied unchanged to every other split.

The course notes (lectures 000 and 003) prescribe zero-mean, unit-variance inputs with statistics
computed on the training set only and reused for validation and test, and list the usual image
variants: subtract the mean image (AlexNet), subtract the per-channel mean (VGG), subtract the
per-channel mean and divide by the per-channel std (ResNet); PCA and whitening are "not common"
for images but available here as options.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jcnn.functional._checks import check_choice, check_key, check_positive_int, check_real

__all__ = ["Standardize", "MODES"]

MODES = ("per_channel", "center", "mean_image", "pca", "zca")
"""``Standardize.fit`` modes: see its docstring."""

_CHUNK = 4096  # examples per chunk when accumulating statistics in float64


def _statistics_dtype(dtype) -> np.dtype:
    """float64 for float64 images under ``jax_enable_x64`` (their statistics and standardized
    values are not rounded to float32), else float32: integer, half-precision and float32 images,
    and float64 images without x64, where JAX holds no float64."""
    if np.dtype(dtype) == np.float64:
        return np.dtype(jax.dtypes.canonicalize_dtype(jnp.float64))
    return np.dtype(np.float32)


def _float64_chunks(images):
    """``images`` in consecutive chunks of ``_CHUNK`` examples, each as a float64 NumPy array."""
    for start in range(0, images.shape[0], _CHUNK):
        yield np.asarray(images[start : start + _CHUNK], np.float64)


@dataclasses.dataclass(frozen=True, eq=False)  # hashable (by identity), so jax.jit(stats) works
class Standardize:
    """Fitted standardization statistics; call the object on images to standardize them.

    Build it with :meth:`Standardize.fit` on the training images, then apply the same object to
    training, validation and test images (any leading batch dimensions, or a single image). It is
    a pytree, so it can be closed over or passed into ``jit``.

    Attributes:
      mean: subtracted first: ``(C,)`` for the per-channel modes, ``(H, W, C)`` otherwise.
      scale: divided by after centering (``(C,)``; ones where only centering applies).
      projection: ``(D, K)`` whitening matrix for ``"pca"``/``"zca"`` (``D = H W C``), else None.
      mode: the mode it was fit with.
    """

    mean: jax.Array
    scale: jax.Array
    projection: jax.Array | None
    mode: str

    def __post_init__(self):
        """Check that the statistics fit together as :meth:`fit` makes them (their values only
        where they are concrete, not traced)."""
        mode = check_choice(self.mode, "mode", MODES)
        mean, scale, projection = self.mean, self.scale, self.projection
        _check_statistic(mean, "mean")
        _check_statistic(scale, "scale")
        if mode in ("per_channel", "center"):
            if mean.ndim != 1:
                raise ValueError(
                    f"mean: expected shape (C,) for mode={mode!r}, got {tuple(mean.shape)}"
                )
        elif mean.ndim != 3:
            raise ValueError(
                f"mean: expected shape (H, W, C) for mode={mode!r}, got {tuple(mean.shape)}"
            )
        channels = mean.shape[-1]
        if tuple(scale.shape) != (channels,):
            raise ValueError(
                f"scale: expected shape ({channels},), one per channel of mean "
                f"{tuple(mean.shape)}, got {tuple(scale.shape)}"
            )
        if mode in ("pca", "zca"):
            if projection is None:
                raise ValueError(
                    f"projection: expected a (D, K) matrix for mode={mode!r}, got None"
                )
            _check_statistic(projection, "projection")
            dim = math.prod(mean.shape)
            components = dim if mode == "zca" else projection.shape[-1]
            if projection.shape != (dim, components) or components == 0:
                raise ValueError(
                    f"projection: expected shape ({dim}, {dim if mode == 'zca' else 'K'}) for "
                    f"mode={mode!r} (D = H * W * C of mean {tuple(mean.shape)}), got "
                    f"{tuple(projection.shape)}"
                )
        elif projection is not None:
            raise ValueError(
                f"projection: expected None for mode={mode!r} (only 'pca' and 'zca' project), "
                f"got {type(projection).__name__}"
            )
        for name in _LEAVES:
            value = getattr(self, name)
            if value is not None and not isinstance(value, jax.core.Tracer):
                finite = np.isfinite(np.asarray(value))
                if not finite.all():
                    raise ValueError(
                        f"{name}: expected finite values, got {int((~finite).sum())} NaN or "
                        "infinite value(s)"
                    )
        if isinstance(scale, jax.core.Tracer):
            return
        scale = np.asarray(scale)
        if mode == "per_channel" and (scale <= 0).any():
            raise ValueError(f"scale: expected values > 0 (it divides), got {scale.tolist()}")
        if mode != "per_channel" and (scale != 1).any():
            raise ValueError(
                f"scale: expected ones for mode={mode!r} (only 'per_channel' divides by a "
                f"scale), got {scale.tolist()}"
            )

    @classmethod
    def fit(
        cls,
        train_images: np.ndarray | jax.Array,
        *,
        mode: str = "per_channel",
        eps: float = 1e-2,
        num_components: int | None = None,
    ) -> Standardize:
        """Statistics of ``train_images`` (``(N, H, W, C)``, any numeric dtype).

        Args:
          train_images: the training images only (never validation or test).
          mode: ``"per_channel"``: subtract the per-channel mean, divide by the per-channel std
            (population std, over N, H and W); ``"center"``: subtract the per-channel mean only;
            ``"mean_image"``: subtract the mean image ``(H, W, C)``; ``"pca"``: center on the mean
            image and project on the principal components scaled to unit variance, giving
            ``(..., K)`` features; ``"zca"``: PCA whitening rotated back to pixel space, giving
            images ``(..., H, W, C)`` with (near) identity covariance that stay close to the input.
          eps: added to the covariance eigenvalues before whitening (``"pca"``/``"zca"``), in the
            squared units of the input; it keeps near-zero-variance directions from being
            amplified into noise (0 is refused where the covariance is singular).
          num_components: ``"pca"`` only: keep the top ``K`` components (all where None).

        Returns:
          The fitted :class:`Standardize`: float32 statistics, float64 for float64 images under
          ``jax_enable_x64``.

        >>> images = np.arange(2 * 2 * 2 * 3, dtype=np.uint8).reshape(2, 2, 2, 3)
        >>> stats = Standardize.fit(images)
        >>> [round(float(v), 3) for v in stats.mean]
        [10.5, 11.5, 12.5]
        >>> out = stats(images)
        >>> out.shape, str(out.dtype), round(float(out[..., 0].std()), 3)
        ((2, 2, 2, 3), 'float32', 1.0)
        """
        check_choice(mode, "mode", MODES)
        eps = check_real(eps, "eps", low=0)
        if num_components is not None:
            num_components = check_positive_int(num_components, "num_components")
        if not hasattr(train_images, "shape"):
            raise TypeError(
                f"train_images: expected an array (N, H, W, C), got {type(train_images).__name__}"
            )
        if len(train_images.shape) != 4:
            shape = train_images.shape
            raise ValueError(f"train_images: expected rank 4 (N, H, W, C), got {shape}")
        if 0 in train_images.shape[1:]:
            raise ValueError(
                f"train_images: expected images of non-zero H, W and C, got shape "
                f"{tuple(train_images.shape)}"
            )
        # per channel, the pixels of one image are a sample; the other modes' statistics are
        # across images
        fewest = 1 if mode in ("per_channel", "center") else 2
        if train_images.shape[0] < fewest:
            raise ValueError(
                f"train_images: expected at least {fewest} image{'s' * (fewest > 1)} to fit "
                f"mode={mode!r} statistics, got {train_images.shape[0]}"
            )
        if mode != "pca" and num_components is not None:
            raise ValueError(f"num_components: only meaningful for mode='pca', got mode={mode!r}")
        _check_real_images(train_images, "train_images")
        dtype = _statistics_dtype(train_images.dtype)
        n = train_images.shape[0]
        total = np.zeros(train_images.shape[1:], np.float64)
        for start, chunk in zip(range(0, n, _CHUNK), _float64_chunks(train_images), strict=True):
            finite = np.isfinite(chunk)
            if not finite.all():
                index = start + int(np.argwhere(~finite)[0][0])
                raise ValueError(
                    f"train_images: expected finite values, got {int((~finite).sum())} NaN or "
                    f"infinite value(s) (first in image {index}); statistics of them would be NaN"
                )
            too_large = np.abs(chunk) > np.finfo(dtype).max
            if too_large.any():
                index = start + int(np.argwhere(too_large)[0][0])
                raise ValueError(
                    f"train_images: expected values within float32's range (|v| <= 3.4e38, the "
                    f"statistics' and the standardized images' dtype), got "
                    f"{np.abs(chunk).max():.3g} (first in image {index})"
                )
            total += chunk.sum(0)
        mean_image = total / n
        channels = train_images.shape[-1]
        if mode in ("per_channel", "center"):
            channel_mean = mean_image.reshape(-1, channels).mean(0)
            scale = np.ones(channels)
            if mode == "per_channel":
                sq = np.zeros(channels)
                # constant: every value equal to the first; a float64 mean of them can miss the
                # value by an ulp, and its std of ~1e-17 would scale rounding error up to +-1
                first = np.asarray(train_images[:1], np.float64).reshape(-1, channels)[0]
                constant = np.ones(channels, bool)
                for chunk in _float64_chunks(train_images):
                    values = chunk.reshape(-1, channels)
                    sq += ((values - channel_mean) ** 2).sum(0)
                    constant &= (values == first).all(0)
                scale = np.sqrt(sq / (n * np.prod(train_images.shape[1:-1])))
                constant |= scale == 0
                if np.any(constant):
                    raise ValueError(
                        f"train_images: channel(s) {np.flatnonzero(constant).tolist()} are "
                        "constant (std 0); use mode='center'"
                    )
            return cls(jnp.asarray(channel_mean, dtype), jnp.asarray(scale, dtype), None, mode)
        ones = jnp.ones((channels,), dtype)
        if mode == "mean_image":
            return cls(jnp.asarray(mean_image, dtype), ones, None, mode)
        dim = mean_image.size
        flat_mean = mean_image.reshape(-1)
        covariance = np.zeros((dim, dim))
        for chunk in _float64_chunks(train_images):
            centered = chunk.reshape(-1, dim) - flat_mean
            covariance += centered.T @ centered
        covariance /= n
        eigenvalues, eigenvectors = np.linalg.eigh(covariance)
        order = np.argsort(eigenvalues)[::-1]
        eigenvalues, eigenvectors = np.clip(eigenvalues[order], 0, None), eigenvectors[:, order]
        if num_components is not None:
            if not 1 <= num_components <= dim:
                raise ValueError(f"num_components: expected 1..{dim}, got {num_components}")
            eigenvalues = eigenvalues[:num_components]
            eigenvectors = eigenvectors[:, :num_components]
        # numerically zero (numpy.linalg.matrix_rank's tolerance): 1 / sqrt(0 + eps) needs eps > 0
        tiny = eigenvalues <= eigenvalues.max(initial=0.0) * dim * np.finfo(np.float64).eps
        if eps == 0 and tiny.any():
            raise ValueError(
                f"eps: expected > 0 for these train_images: {int(tiny.sum())} of the "
                f"{eigenvalues.size} whitened components have zero variance (fewer images than "
                f"H * W * C = {dim}, or constant pixels), which eps=0 divides by"
            )
        projection = eigenvectors / np.sqrt(eigenvalues + eps)
        if mode == "zca":
            projection = projection @ eigenvectors.T
        return cls(jnp.asarray(mean_image, dtype), ones, jnp.asarray(projection, dtype), mode)

    def __call__(self, *args: np.ndarray | jax.Array) -> jax.Array:
        """``images`` standardized, as ``float32``, or ``float64`` for float64 images under
        ``jax_enable_x64`` (works under ``jit`` and ``vmap``).

        Called as ``stats(images)``, or with the signature of an augmentation op,
        ``stats(key, image)`` (the key is not used), so that it can end an
        ``augment.compose(...)`` pipeline or be a ``Loader``'s ``augment``.

        Args:
          *args: ``images`` or ``(key, images)``; ``images`` is ``(..., H, W, C)`` with the
            training images' ``H, W, C`` (``C`` only for the per-channel modes).

        Returns:
          ``(..., H, W, C)`` float32 (float64 for float64 images under x64); ``(..., K)`` for
          ``"pca"``.

        Example:
          >>> from jcnn import data
          >>> from jcnn.data import augment as A
          >>> train = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.uint8).reshape(2, 4, 4, 3)
          >>> stats = data.Standardize.fit(train)
          >>> pipeline = A.compose(A.random_hflip, stats)
          >>> pipeline(jax.random.key(0), train[0]).dtype
          dtype('float32')
        """
        if len(args) == 1:
            (images,) = args
        elif len(args) == 2:
            key, images = args
            try:
                check_key(key)
            except ValueError:
                pass  # a batch of keys beside a batch of images: the key is not used anyway
            except TypeError as error:
                raise TypeError(
                    f"{error} (Standardize takes (images), or (key, image) as an augmentation op; "
                    "stats(a, b) does not standardize two arrays)"
                ) from None
        else:
            raise TypeError(
                f"Standardize: expected (images) or (key, image) as an augmentation op, got "
                f"{len(args)} arguments"
            )
        _check_real_images(images, "images")
        trailing = self.mean.shape
        if tuple(images.shape[images.ndim - len(trailing) :]) != tuple(trailing) or (
            images.ndim < 3
        ):
            raise ValueError(
                f"images: expected shape (..., {', '.join(map(str, self._image_shape()))}) as in "
                f"the training images, got {tuple(images.shape)}"
            )
        dtype = _statistics_dtype(images.dtype)
        x = jnp.asarray(images).astype(dtype)
        lead = (1,) * (x.ndim - self.mean.ndim)
        mean = self.mean.astype(dtype).reshape(lead + self.mean.shape)
        if self.projection is None:
            scale = self.scale.astype(dtype).reshape((1,) * (x.ndim - 1) + self.scale.shape)
            return (x - mean) / scale
        batch_shape = x.shape[: x.ndim - 3]
        flat = (x - mean).reshape(*batch_shape, -1)
        # HIGHEST: on a GPU the default float32 matmul may round its inputs to TF32 (a 10-bit
        # mantissa); preprocessing is no place to trade accuracy for speed
        out = jnp.matmul(flat, self.projection.astype(dtype), precision=jax.lax.Precision.HIGHEST)
        if self.mode == "zca":
            return out.reshape(x.shape)
        return out

    def _image_shape(self):
        return ("H", "W", self.mean.shape[0]) if self.mean.ndim == 1 else self.mean.shape


def _check_real_images(images, name: str) -> None:
    """Raise unless ``images`` is an array of integers or floats (bfloat16 included; not bool)."""
    if not hasattr(images, "shape"):
        raise TypeError(f"{name}: expected an array, got {type(images).__name__}")
    dtype = getattr(images, "dtype", None)
    if dtype is None or not (
        jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)
    ):
        raise TypeError(f"{name}: expected an integer or floating array, got dtype {dtype}")


def _check_statistic(value, name: str) -> None:
    dtype = getattr(value, "dtype", None)
    if (
        not hasattr(value, "shape")
        or dtype is None
        or not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating))
    ):
        described = f"dtype {dtype}" if dtype is not None else type(value).__name__
        raise TypeError(f"{name}: expected a real (integer or floating) array, got {described}")


_LEAVES = ("mean", "scale", "projection")


def _flatten_with_keys(stats):
    leaves = tuple((jax.tree_util.GetAttrKey(name), getattr(stats, name)) for name in _LEAVES)
    return leaves, stats.mode


def _unflatten(mode, leaves):
    # Not through __init__: transformations rebuild the statistics from tracers, placeholders
    # (tree_map to None or object()) or stacked arrays, which its checks would refuse.
    stats = object.__new__(Standardize)
    for name, value in zip(_LEAVES, leaves, strict=True):
        object.__setattr__(stats, name, value)
    object.__setattr__(stats, "mode", mode)
    return stats


jax.tree_util.register_pytree_with_keys(Standardize, _flatten_with_keys, _unflatten)
