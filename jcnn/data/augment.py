"""Data augmentation in pure JAX: per-example ops under ``jit`` and ``vmap``, one key per example.

Conventions:

- An image is ``(H, W, C)``; ``uint8`` images take values ``0..255``, floating images ``[0, 1]``
  (the "maximum value" below). Every op returns the dtype it was given (rounding and clipping
  ``uint8`` results), except :func:`mixup`, which returns ``float32`` in the input's units
  (``float64`` for float64 images under ``jax_enable_x64``).
- A random per-example op has the signature ``op(key, image, **options) -> image``; bind its options
  with ``functools.partial`` and chain ops with :func:`compose`. A batch gets one key per example:
  :func:`apply_batch` (or :class:`jcnn.data.Loader`) splits a key and ``vmap``s the op.
- Batch ops that mix examples, :func:`mixup` and :func:`cutmix`, take
  ``(key, images, labels) -> (images, soft_labels)``; every other op leaves labels untouched.
- Deterministic ops (:func:`hflip`, :func:`rotate`, :func:`posterize`...) take the image first.

>>> import functools
>>> augment = compose(
...     functools.partial(random_crop, padding=4, pad_mode="reflect"),
...     random_hflip,
...     functools.partial(cutout, size=8),
... )
>>> images = jnp.zeros((5, 32, 32, 3), jnp.uint8)
>>> out = apply_batch(augment, jax.random.key(0), images)
>>> out.shape, str(out.dtype)
((5, 32, 32, 3), 'uint8')
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jcnn.functional._checks import (
    check_choice,
    check_extent,
    check_int,
    check_key,
    check_positive_int,
    check_real,
    check_real_or_traced,
    check_size_sequence,
    float32_or_wider,
    is_int,
)

__all__ = [
    "adjust_brightness",
    "adjust_contrast",
    "adjust_saturation",
    "adjust_sharpness",
    "affine",
    "apply_batch",
    "autocontrast",
    "color_jitter",
    "compose",
    "cutmix",
    "cutout",
    "equalize",
    "hflip",
    "mixup",
    "pattern",
    "pixmix",
    "posterize",
    "rand_augment",
    "random_apply",
    "random_crop",
    "random_hflip",
    "random_resized_crop",
    "random_rotate",
    "random_translate",
    "random_vflip",
    "rotate",
    "solarize",
    "translate",
    "trivial_augment",
    "vflip",
]

Op = Callable[[jax.Array, jax.Array], jax.Array]


# ---- helpers ----------------------------------------------------------------------------------


def _check_image(image, name: str = "image") -> None:
    if not hasattr(image, "shape") or not hasattr(image, "dtype"):
        raise TypeError(f"{name}: expected an array (H, W, C), got {type(image).__name__}")
    if image.ndim != 3:
        raise ValueError(
            f"{name}: expected rank 3 (H, W, C) for one image (vmap over a batch), got rank "
            f"{image.ndim} with shape {tuple(image.shape)}"
        )
    if not (jnp.issubdtype(image.dtype, jnp.floating) or image.dtype == jnp.uint8):
        raise TypeError(f"{name}: expected uint8 or floating dtype, got {image.dtype}")
    if 0 in image.shape[:2]:
        raise ValueError(
            f"{name}: expected an image of at least 1 x 1 pixels, got shape {tuple(image.shape)}"
        )


def _check_images(images, name: str = "images") -> None:
    if not hasattr(images, "ndim") or not hasattr(images, "dtype"):
        raise TypeError(f"{name}: expected an array (N, H, W, C), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"{name}: expected rank 4 (N, H, W, C), got {_shape_or_type(images)}")
    if not (jnp.issubdtype(images.dtype, jnp.floating) or images.dtype == jnp.uint8):
        raise TypeError(f"{name}: expected uint8 or floating dtype, got {images.dtype}")
    if 0 in images.shape[1:3]:
        raise ValueError(
            f"{name}: expected images of at least 1 x 1 pixels, got shape {tuple(images.shape)}"
        )


def _check_batch(images, labels) -> None:
    _check_images(images)
    if not hasattr(labels, "ndim") or not hasattr(labels, "dtype"):
        raise TypeError(
            f"labels: expected an array ({images.shape[0]},) or ({images.shape[0]}, K), got "
            f"{type(labels).__name__}"
        )
    if labels.ndim not in (1, 2) or labels.shape[0] != images.shape[0]:
        raise ValueError(
            f"labels: expected ({images.shape[0]},) integer labels or ({images.shape[0]}, K) soft "
            f"labels, got {_shape_or_type(labels)}"
        )


def _shape_or_type(value) -> str:
    """``shape (2, 3)`` for an array, ``list`` for anything else (never the values)."""
    if hasattr(value, "shape"):
        return f"shape {tuple(value.shape)}"
    return type(value).__name__


def _max_value(dtype) -> float:
    return 255.0 if dtype == jnp.uint8 else 1.0


def _float_dtype(image):
    """The type an op computes ``image`` in: float32, or float64 for float64 images (under
    ``jax_enable_x64``), never rounded to float32 on the way."""
    return float32_or_wider(image.dtype)


def _to_float(image) -> jax.Array:
    # a NumPy image (as data.load returns) becomes a JAX array: NumPy can neither be indexed by
    # traced positions nor updated with .at
    return jnp.asarray(image).astype(_float_dtype(image))


def _restore(x, dtype) -> jax.Array:
    """``x`` (float, in the units of ``dtype``) back to ``dtype``: uint8 is rounded and clipped."""
    if dtype == jnp.uint8:
        return jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)
    return x.astype(jax.dtypes.canonicalize_dtype(dtype))  # a NumPy float64 image without x64


def _pair(value, name: str) -> tuple[int, int]:
    """A positive int or a ``(height, width)`` pair of them (Python or NumPy ints, or 0-d
    integer arrays)."""
    if is_int(value):
        value = (value, value)
    # a 0-d array has __len__ but len() raises on it
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or _is_scalar(value):
        raise TypeError(f"{name}: expected a positive int or (height, width), got {value!r}")
    if len(value) != 2:
        raise ValueError(f"{name}: expected a positive int or (height, width), got {value!r}")
    return tuple(check_int(v, f"{name}[{i}]", low=1) for i, v in enumerate(value))


def _range(value, name: str, *, low=None, low_open=False, high=None) -> tuple[float, float]:
    """A ``(low, high)`` pair of finite numbers, ordered and within the given bounds."""
    if (
        isinstance(value, (str, bytes))
        or not hasattr(value, "__len__")
        or _is_scalar(value)
        or len(value) != 2
    ):
        raise TypeError(f"{name}: expected a (low, high) pair of numbers, got {value!r}")
    pair = tuple(
        check_real(v, f"{name}[{i}]", low=low, low_open=low_open, high=high)
        for i, v in enumerate(value)
    )
    if pair[0] > pair[1]:
        raise ValueError(f"{name}: expected low <= high, got {value!r}")
    return pair


def _is_scalar(value) -> bool:
    return getattr(value, "shape", None) == ()


def _probability(p, name: str = "p"):
    return check_real_or_traced(p, name, low=0, high=1)


def _grayscale(x) -> jax.Array:
    """Luma (ITU-R 601: 0.299 R + 0.587 G + 0.114 B) of a float image, shape (H, W, 1)."""
    if x.shape[-1] == 1:
        return x
    if x.shape[-1] != 3:
        raise ValueError(f"image: colour ops expect 1 or 3 channels, got {x.shape[-1]}")
    weights = jnp.array([0.299, 0.587, 0.114], x.dtype)
    return jnp.sum(x * weights.reshape(1, 1, 3), axis=-1, keepdims=True)


def _blend(x, other, factor, max_value):
    return jnp.clip(factor * x + (1.0 - factor) * other, 0.0, max_value)


def _bilinear(image, rows, cols, *, fill=0.0, edge=False) -> jax.Array:
    """``image`` (float) sampled at fractional ``rows``, ``cols`` (each ``(H_out, W_out)``).

    Outside the image a neighbour contributes ``fill``, or the nearest edge pixel where ``edge``.
    """
    height, width = image.shape[:2]
    r0 = jnp.floor(rows)
    c0 = jnp.floor(cols)
    dr = (rows - r0)[..., None]
    dc = (cols - c0)[..., None]
    r0 = r0.astype(jnp.int32)
    c0 = c0.astype(jnp.int32)

    def tap(r, c):
        inside = (r >= 0) & (r < height) & (c >= 0) & (c < width)
        value = image[jnp.clip(r, 0, height - 1), jnp.clip(c, 0, width - 1)]
        return value if edge else jnp.where(inside[..., None], value, fill)

    return (
        tap(r0, c0) * (1 - dr) * (1 - dc)
        + tap(r0, c0 + 1) * (1 - dr) * dc
        + tap(r0 + 1, c0) * dr * (1 - dc)
        + tap(r0 + 1, c0 + 1) * dr * dc
    )


def _snap(coordinates) -> jax.Array:
    """Coordinates within float noise of a pixel centre moved onto it, so that exact multiples of
    90 degrees and integer shifts copy pixels exactly."""
    nearest = jnp.round(coordinates)
    return jnp.where(jnp.abs(coordinates - nearest) < 1e-4, nearest, coordinates)


# ---- geometry ---------------------------------------------------------------------------------


def affine(image: jax.Array, matrix: ArrayLike, *, fill: ArrayLike = 0.0) -> jax.Array:
    """``image`` warped by an affine map about its centre, bilinear, ``fill`` outside.

    Args:
      image: ``(H, W, C)``.
      matrix: ``(2, 3)``: maps an output pixel's centred ``(x, y)`` coordinates (``x`` to the
        right, ``y`` up, origin at the image centre) plus translation to the input point it samples.
        Its entries must be finite (checked where the matrix is concrete, not traced).
      fill: value of pixels that come from outside the image (in the image's units).

    Returns:
      The warped image, same shape and dtype.
    """
    _check_image(image)
    height, width = image.shape[:2]
    dtype = _float_dtype(image)
    rows, cols = jnp.meshgrid(
        jnp.arange(height, dtype=dtype), jnp.arange(width, dtype=dtype), indexing="ij"
    )
    cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
    x_out, y_out = cols - cx, cy - rows
    if getattr(matrix, "shape", None) is None and not isinstance(matrix, (list, tuple)):
        raise TypeError(f"matrix: expected a (2, 3) array, got {type(matrix).__name__}")
    matrix = jnp.asarray(matrix, dtype)
    if matrix.shape != (2, 3):
        raise ValueError(f"matrix: expected shape (2, 3), got {tuple(matrix.shape)}")
    if not isinstance(matrix, jax.core.Tracer) and not np.isfinite(matrix).all():
        raise ValueError(f"matrix: expected finite entries, got {np.asarray(matrix).tolist()}")
    fill = check_real_or_traced(fill, "fill")
    x_in = matrix[0, 0] * x_out + matrix[0, 1] * y_out + matrix[0, 2]
    y_in = matrix[1, 0] * x_out + matrix[1, 1] * y_out + matrix[1, 2]
    out = _bilinear(_to_float(image), _snap(cy - y_in), _snap(cx + x_in), fill=fill)
    return _restore(out, image.dtype)


def rotate(image: jax.Array, angle: ArrayLike, *, fill: ArrayLike = 0.0) -> jax.Array:
    """``image`` rotated counter-clockwise by ``angle`` degrees about its centre (bilinear).

    ``rotate(image, 90)`` equals ``jnp.rot90(image)`` for a square image.

    >>> image = jnp.arange(9.0).reshape(3, 3, 1)
    >>> rotate(image, 90)[..., 0].tolist() == jnp.rot90(image)[..., 0].tolist()
    True
    """
    _check_image(image)  # before its dtype is read
    angle = check_real_or_traced(angle, "angle")
    theta = jnp.deg2rad(jnp.asarray(angle, _float_dtype(image)))
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    # the output point p samples the input point R(-angle) p
    matrix = jnp.stack([jnp.stack([cos, sin, 0.0 * cos]), jnp.stack([-sin, cos, 0.0 * cos])])
    return affine(image, matrix, fill=fill)


def translate(
    image: jax.Array, shift_y: ArrayLike, shift_x: ArrayLike, *, fill: ArrayLike = 0.0
) -> jax.Array:
    """``image`` moved down by ``shift_y``, right by ``shift_x`` pixels (bilinear if fractional)."""
    _check_image(image)  # before its dtype is read
    dtype = _float_dtype(image)
    one, zero = jnp.ones((), dtype), jnp.zeros((), dtype)
    sx = jnp.asarray(check_real_or_traced(shift_x, "shift_x"), dtype)
    sy = jnp.asarray(check_real_or_traced(shift_y, "shift_y"), dtype)
    matrix = jnp.stack([jnp.stack([one, zero, -sx]), jnp.stack([zero, one, sy])])
    return affine(image, matrix, fill=fill)


def _shear(image, shear, axis, fill=0.0):
    """``image`` sheared along ``axis`` about its top edge (x) or left edge (y), as the
    AutoAugment/RandAugment references (PIL's, torchvision's ``center=[0, 0]``) do: the rows
    move by ``shear`` times their distance from the top edge (the columns from the left edge)."""
    dtype = _float_dtype(image)
    one, zero = jnp.ones((), dtype), jnp.zeros((), dtype)
    s = jnp.asarray(shear, dtype)
    height, width = image.shape[:2]
    if axis == "x":  # centred coordinates, y up: the top edge is y = H / 2
        matrix = jnp.stack([jnp.stack([one, s, -s * height / 2]), jnp.stack([zero, one, zero])])
    else:  # the left edge is x = -W / 2
        matrix = jnp.stack([jnp.stack([one, zero, zero]), jnp.stack([s, one, s * width / 2])])
    return affine(image, matrix, fill=fill)


def hflip(image: jax.Array) -> jax.Array:
    """``image`` mirrored left-right."""
    _check_image(image)
    return image[:, ::-1]


def vflip(image: jax.Array) -> jax.Array:
    """``image`` mirrored top-bottom."""
    _check_image(image)
    return image[::-1]


def random_hflip(key: jax.Array, image: jax.Array, *, p: float = 0.5) -> jax.Array:
    """``image`` mirrored left-right with probability ``p`` (in [0, 1])."""
    check_key(key)
    _check_image(image)
    p = _probability(p)
    return jnp.where(jax.random.bernoulli(key, p), image[:, ::-1], image)


def random_vflip(key: jax.Array, image: jax.Array, *, p: float = 0.5) -> jax.Array:
    """``image`` mirrored top-bottom with probability ``p`` (in [0, 1])."""
    check_key(key)
    _check_image(image)
    p = _probability(p)
    return jnp.where(jax.random.bernoulli(key, p), image[::-1], image)


def random_crop(
    key: jax.Array,
    image: jax.Array,
    *,
    size: int | Sequence[int] | None = None,
    padding: int = 0,
    pad_mode: str = "zeros",
) -> jax.Array:
    """A ``size`` crop of ``image`` padded by ``padding``, offsets uniform over every position.

    Args:
      key: PRNG key.
      image: ``(H, W, C)``.
      size: ``(h, w)`` or an int; the image's own size where None (the usual pad-and-crop).
      padding: pixels added on every side before cropping.
      pad_mode: ``"zeros"`` or ``"reflect"`` (mirror without repeating the edge, as ``np.pad``).

    Returns:
      ``(h, w, C)``; the top-left corner in padded coordinates is uniform on
      ``{0..H + 2 padding - h} x {0..W + 2 padding - w}``.
    """
    check_key(key)
    _check_image(image)
    height, width, channels = image.shape
    size = (height, width) if size is None else _pair(size, "size")
    padding = check_int(padding, "padding", low=0)
    check_choice(pad_mode, "pad_mode", ("zeros", "reflect"))
    if pad_mode == "reflect" and padding >= min(height, width):
        raise ValueError(f"padding: reflect padding must be < {min(height, width)}, got {padding}")
    padded_h, padded_w = height + 2 * padding, width + 2 * padding
    if size[0] > padded_h or size[1] > padded_w:
        raise ValueError(f"size: crop {size} larger than the padded image {(padded_h, padded_w)}")
    if max(padded_h - size[0], padded_w - size[1]) >= 2**31 - 1:  # the offsets are int32
        raise ValueError(
            f"padding: expected the padded image {(padded_h, padded_w)} to leave fewer than "
            f"2**31 - 1 crop offsets per axis, got padding={padding}"
        )
    key_y, key_x = jax.random.split(key)
    top = jax.random.randint(key_y, (), 0, padded_h - size[0] + 1)
    left = jax.random.randint(key_x, (), 0, padded_w - size[1] + 1)
    if pad_mode == "reflect":
        pads = ((padding, padding), (padding, padding), (0, 0))
        padded = jnp.pad(image, pads, mode="reflect")
        return jax.lax.dynamic_slice(padded, (top, left, 0), (*size, channels))
    # zeros: the crop's pixels gathered from the image, 0 outside it; the padded image is never
    # built (a padding of 10**5 asked XLA for 480 GB, one of 10**12 aborted the process)
    rows = top - padding + jnp.arange(size[0])
    cols = left - padding + jnp.arange(size[1])
    inside = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None, :]
    crop = jnp.asarray(image)[jnp.clip(rows, 0, height - 1)[:, None], jnp.clip(cols, 0, width - 1)]
    return jnp.where(inside[..., None], crop, jnp.zeros((), image.dtype))


def random_translate(key: jax.Array, image: jax.Array, *, max_shift: int) -> jax.Array:
    """``image`` shifted by whole pixels, each axis uniform on ``-max_shift..max_shift``, 0 fill."""
    max_shift = check_int(max_shift, "max_shift", low=0)
    if max_shift >= 2**30:  # 2 max_shift + 1 offsets per axis, drawn as int32
        raise ValueError(f"max_shift: expected an int < 2**30, got {max_shift}")
    return random_crop(key, image, padding=max_shift)


def random_rotate(
    key: jax.Array, image: jax.Array, *, degrees: float, fill: ArrayLike = 0.0
) -> jax.Array:
    """``image`` rotated by an angle uniform on ``[-degrees, degrees]`` (bilinear)."""
    check_key(key)
    degrees = check_real(degrees, "degrees", low=0)
    angle = jax.random.uniform(key, (), minval=-degrees, maxval=degrees)
    return rotate(image, angle, fill=fill)


def random_resized_crop(
    key: jax.Array,
    image: jax.Array,
    *,
    size: int | Sequence[int],
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
) -> jax.Array:
    """A random box of ``image`` resized (bilinear) to ``size``, as in Inception training.

    The box's area is a fraction uniform on ``scale`` of the image's, its aspect ratio (width /
    height) log-uniform on ``ratio``; a box that does not fit is clipped to the image (instead of
    re-drawn, which has no fixed cost under ``jit``). Its position is uniform over where it fits.
    """
    check_key(key)
    _check_image(image)
    out_h, out_w = _pair(size, "size")
    if max(out_h, out_w) >= 2**31:  # the sampling grid's rows and columns are counted in int32
        raise ValueError(f"size: expected sides < 2**31, got {(out_h, out_w)}")
    dtype = _float_dtype(image)
    check_extent((out_h, out_w, image.shape[-1]), dtype, "size", "resized crop")
    scale = _range(scale, "scale", low=0, low_open=True, high=1)
    ratio = _range(ratio, "ratio", low=0, low_open=True)
    height, width = image.shape[:2]
    k_area, k_ratio, k_top, k_left = jax.random.split(key, 4)
    area = jax.random.uniform(k_area, (), minval=scale[0], maxval=scale[1]) * height * width
    aspect = jnp.exp(
        jax.random.uniform(k_ratio, (), minval=math.log(ratio[0]), maxval=math.log(ratio[1]))
    )
    box_w = jnp.clip(jnp.sqrt(area * aspect), 1.0, width)
    box_h = jnp.clip(jnp.sqrt(area / aspect), 1.0, height)
    top = jax.random.uniform(k_top, ()) * (height - box_h)
    left = jax.random.uniform(k_left, ()) * (width - box_w)
    rows = top + (jnp.arange(out_h, dtype=dtype) + 0.5) * box_h / out_h - 0.5
    cols = left + (jnp.arange(out_w, dtype=dtype) + 0.5) * box_w / out_w - 0.5
    grid_r, grid_c = jnp.meshgrid(rows, cols, indexing="ij")
    out = _bilinear(_to_float(image), grid_r, grid_c, edge=True)
    return _restore(out, image.dtype)


def cutout(key: jax.Array, image: jax.Array, *, size: int, fill: ArrayLike = 0) -> jax.Array:
    """``image`` with a ``size x size`` square set to ``fill`` (DeVries & Taylor 2017).

    ``fill`` is in the image's units (rounded and clipped to ``0..255`` for ``uint8``).

    The square's centre is uniform over the image's pixels; the part outside the image is dropped,
    so near the border less than ``size**2`` pixels are erased.
    """
    check_key(key)
    _check_image(image)
    size = check_positive_int(size, "size")
    fill = check_real_or_traced(fill, "fill")
    height, width = image.shape[:2]
    # a square of 2 max(H, W) + 1 covers the image from any centre: a larger one erases the same
    # pixels (and size // 2 beyond int32 failed to reach the traced centre)
    size = min(size, 2 * max(height, width) + 1)
    key_y, key_x = jax.random.split(key)
    cy = jax.random.randint(key_y, (), 0, height)
    cx = jax.random.randint(key_x, (), 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    top, left = cy - size // 2, cx - size // 2
    inside = (rows >= top) & (rows < top + size) & (cols >= left) & (cols < left + size)
    return jnp.where(
        inside[..., None], _restore(jnp.asarray(fill, _float_dtype(image)), image.dtype), image
    )


# ---- photometric ------------------------------------------------------------------------------


def autocontrast(image: jax.Array) -> jax.Array:
    """Each channel stretched linearly: its minimum maps to 0, its maximum to the maximum value.

    A constant channel is left unchanged.
    """
    _check_image(image)
    x = _to_float(image)
    low = x.min(axis=(0, 1), keepdims=True)
    high = x.max(axis=(0, 1), keepdims=True)
    spread = high - low
    scaled = (x - low) * (_max_value(image.dtype) / jnp.where(spread > 0, spread, 1.0))
    return _restore(jnp.where(spread > 0, scaled, x), image.dtype)


def posterize(image: jax.Array, bits: int | jax.Array) -> jax.Array:
    """Keep the ``bits`` most significant bits of every 8-bit value: ``v & (0xFF << (8 - bits))``.

    Floating images are quantized through ``round(255 v)``. ``bits`` is an int in 1..8 (checked
    where concrete; a traced value is clipped to that range).

    >>> posterize(jnp.array([[[255, 100, 7]]], jnp.uint8), 3).tolist()
    [[[224, 96, 0]]]
    """
    _check_image(image)
    if isinstance(bits, jax.core.Tracer):
        if bits.shape != () or not jnp.issubdtype(bits.dtype, jnp.integer):
            raise TypeError(
                f"bits: expected an int in [1, 8], got a traced {bits.dtype}{bits.shape}"
            )
        bits = jnp.clip(bits, 1, 8).astype(jnp.int32)
    else:
        bits = jnp.int32(check_int(bits, "bits", low=1, high=8))
    mask = (jnp.left_shift(jnp.int32(0xFF), 8 - bits) & 0xFF).astype(jnp.uint8)
    if image.dtype == jnp.uint8:
        return image & mask
    levels = jnp.round(jnp.clip(_to_float(image), 0, 1) * 255).astype(jnp.uint8)
    return ((levels & mask).astype(_float_dtype(image)) / 255).astype(image.dtype)


def solarize(image: jax.Array, threshold: ArrayLike) -> jax.Array:
    """Invert every value at or above ``threshold``: ``v -> max_value - v``.

    ``threshold`` is in the image's units: 0..256 for uint8 (256 inverts nothing), 0..1 for a
    float image (checked where concrete).

    >>> solarize(jnp.array([[[10, 128, 200]]], jnp.uint8), 128).tolist()
    [[[10, 127, 55]]]
    """
    _check_image(image)
    threshold = check_real_or_traced(threshold, "threshold")
    # in the image's units: 128 on a float image in [0, 1] would silently invert nothing
    high = 256 if image.dtype == jnp.uint8 else 1
    if not isinstance(threshold, jax.core.Tracer) and not 0 <= threshold <= high:
        raise ValueError(
            f"threshold: expected a number in [0, {high}] for a {image.dtype} image (its values "
            f"are in [0, {_max_value(image.dtype):g}]), got {threshold:g}"
        )
    inverted = jnp.asarray(_max_value(image.dtype), image.dtype) - image
    above = _to_float(image) >= jnp.asarray(threshold, _float_dtype(image))
    return jnp.where(above, inverted, image)


def equalize(image: jax.Array) -> jax.Array:
    """Histogram equalization of each channel over 256 levels (a constant channel is unchanged).

    The level ``v`` of a channel maps to ``round(255 (cdf(v) - cdf_min) / (n - cdf_min))``.
    """
    _check_image(image)
    max_value = _max_value(image.dtype)
    levels = jnp.round(jnp.clip(_to_float(image) / max_value, 0, 1) * 255).astype(jnp.int32)

    def channel(level):
        hist = jnp.bincount(level.reshape(-1), length=256)
        cdf = jnp.cumsum(hist)
        cdf_min = cdf[jnp.argmax(hist > 0)]
        total = level.size
        if 2 * 255 * total < 2**31:
            # in integers, exact (round half to even) whether jitted or run op by op, where float32
            # rounded 255 (cdf - cdf_min) / (n - cdf_min) differently under jit and eagerly
            denominator = jnp.maximum(total - cdf_min, 1)
            quotient, rest = jnp.divmod(255 * (cdf - cdf_min), denominator)
            up = (2 * rest > denominator) | ((2 * rest == denominator) & (quotient % 2 == 1))
            lut = (quotient + up).astype(jnp.float32)
        else:  # more than 4,210,752 pixels: 255 * n overflows int32
            lut = jnp.round(255.0 * (cdf - cdf_min) / jnp.maximum(total - cdf_min, 1))
        lut = jnp.where(total > cdf_min, lut, jnp.arange(256, dtype=jnp.float32))
        return lut[level]

    out = jax.vmap(channel, in_axes=-1, out_axes=-1)(levels)
    return _restore(out * (max_value / 255.0), image.dtype)


def adjust_brightness(image: jax.Array, factor: ArrayLike) -> jax.Array:
    """``image`` blended with black: ``clip(factor * v)``; 1 leaves it unchanged."""
    _check_image(image)
    factor = check_real_or_traced(factor, "factor", low=0)
    x = _to_float(image)
    return _restore(_blend(x, jnp.zeros_like(x), factor, _max_value(image.dtype)), image.dtype)


def adjust_contrast(image: jax.Array, factor: ArrayLike) -> jax.Array:
    """``image`` blended with its mean grey level: ``clip(f v + (1 - f) mean_luma)``."""
    _check_image(image)
    factor = check_real_or_traced(factor, "factor", low=0)
    x = _to_float(image)
    mean = jnp.mean(_grayscale(x))
    return _restore(_blend(x, mean, factor, _max_value(image.dtype)), image.dtype)


def adjust_saturation(image: jax.Array, factor: ArrayLike) -> jax.Array:
    """``image`` blended with its grey version (per-pixel luma); 0 gives grey, 1 unchanged."""
    _check_image(image)
    factor = check_real_or_traced(factor, "factor", low=0)
    x = _to_float(image)
    return _restore(_blend(x, _grayscale(x), factor, _max_value(image.dtype)), image.dtype)


def adjust_sharpness(image: jax.Array, factor: ArrayLike) -> jax.Array:
    """``image`` blended with a smoothed copy (3x3 kernel: centre 5, others 1, over 13)."""
    _check_image(image)
    factor = check_real_or_traced(factor, "factor", low=0)
    x = _to_float(image)
    height, width = x.shape[:2]
    if height < 3 or width < 3:
        return image
    window = sum(x[dy : height - 2 + dy, dx : width - 2 + dx] for dy in range(3) for dx in range(3))
    smooth_inner = (window + 4 * x[1:-1, 1:-1]) / 13.0
    smooth = x.at[1:-1, 1:-1].set(smooth_inner)
    return _restore(_blend(x, smooth, factor, _max_value(image.dtype)), image.dtype)


def color_jitter(
    key: jax.Array,
    image: jax.Array,
    *,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
) -> jax.Array:
    """Brightness, contrast, then saturation, each factor uniform on ``[max(0, 1 - s), 1 + s]``
    (the ranges of torchvision's ``ColorJitter``)."""
    check_key(key)
    _check_image(image)
    brightness, contrast, saturation = (
        check_real(value, name, low=0)
        for value, name in (
            (brightness, "brightness"),
            (contrast, "contrast"),
            (saturation, "saturation"),
        )
    )
    k_b, k_c, k_s = jax.random.split(key, 3)
    for k, strength, adjust in (
        (k_b, brightness, adjust_brightness),
        (k_c, contrast, adjust_contrast),
        (k_s, saturation, adjust_saturation),
    ):
        if strength:
            factor = jax.random.uniform(k, (), minval=max(0.0, 1 - strength), maxval=1 + strength)
            image = adjust(image, factor)
    return image


# ---- batch mixing -----------------------------------------------------------------------------


def _check_soft_labels(labels) -> None:
    """Concrete soft labels must be rows of class probabilities: finite, >= 0, summing to 1 (to
    the rounding of their dtype); mixing anything else gives targets no loss reads as meant."""
    values = np.asarray(labels, np.float64)
    sums = values.sum(axis=1)
    tolerance = 1e-3 + values.shape[1] * float(jnp.finfo(labels.dtype).eps)
    wrong = ~np.isfinite(values).all(axis=1) | (values < 0).any(axis=1)
    wrong |= ~(np.abs(sums - 1.0) <= tolerance)
    if wrong.any():
        raise ValueError(
            "labels: expected soft labels whose rows are class probabilities (finite, >= 0, "
            f"summing to 1), got rows {np.flatnonzero(wrong)[:5].tolist()} summing to "
            f"{[float(v) for v in sums[wrong][:5]]} (smallest entry {np.min(values[wrong]):g})"
        )


def _mixing_labels(images, labels, alpha, num_classes):
    """The checked batch's labels as soft labels ``(N, K)`` float32 (mixup and cutmix), and
    ``alpha`` as a float.

    Integer labels must lie in ``[0, num_classes)``: checked where the labels are concrete; where
    they are traced (inside ``jit``, as in :class:`jcnn.data.Loader`) an out-of-range label gives
    a row of NaN, so that the loss is NaN and the run stops on it, never a silent all-zero target.
    """
    _check_batch(images, labels)
    alpha = check_real(alpha, "alpha", low=0, low_open=True)
    if labels.ndim == 2:
        if not jnp.issubdtype(labels.dtype, jnp.floating):
            raise TypeError(
                f"labels: expected floating soft labels (N, K), got dtype {labels.dtype}"
            )
        if (
            num_classes is not None
            and check_positive_int(num_classes, "num_classes") != (labels.shape[1])
        ):
            raise ValueError(
                f"num_classes: {num_classes} differs from the soft labels' {labels.shape[1]} "
                f"classes (shape {tuple(labels.shape)})"
            )
        if not isinstance(labels, jax.core.Tracer):
            _check_soft_labels(labels)
        return labels.astype(jnp.float32), alpha
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise TypeError(f"labels: expected integer class labels (N,), got dtype {labels.dtype}")
    if num_classes is None:
        raise ValueError("num_classes: required when labels are integers (to build soft labels)")
    num_classes = check_positive_int(num_classes, "num_classes")
    soft = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if not isinstance(labels, jax.core.Tracer):
        values = np.asarray(labels)
        outside = (values < 0) | (values >= num_classes)
        if outside.any():
            raise ValueError(
                f"labels: expected classes in [0, {num_classes}) (num_classes={num_classes}), got "
                f"{values[outside][:5].tolist()} at positions "
                f"{np.flatnonzero(outside)[:5].tolist()}"
            )
        return soft, alpha
    inside = (labels >= 0) & (labels < num_classes)
    return jnp.where(inside[:, None], soft, jnp.nan), alpha


def mixup(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 1.0,
    num_classes: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Mixup (Zhang et al. 2018): each example mixed with a partner from the same batch.

    ``lam ~ Beta(alpha, alpha)``, one per batch; the partners are a random permutation of the
    batch; ``images = lam x + (1 - lam) x[perm]`` and the labels likewise.

    Returns:
      ``(images float32 in the input's units, soft labels (N, K) float32)``; both float64 for
      float64 images under ``jax_enable_x64``.
    """
    check_key(key)
    soft, alpha = _mixing_labels(images, labels, alpha, num_classes)
    dtype = _float_dtype(images)
    k_lam, k_perm = jax.random.split(key)
    lam = jax.random.beta(k_lam, alpha, alpha, dtype=dtype)
    perm = jax.random.permutation(k_perm, images.shape[0])
    # a NumPy batch cannot be indexed by the permutation where it is traced (jit, vmap)
    x, soft = jnp.asarray(images).astype(dtype), soft.astype(dtype)
    return lam * x + (1 - lam) * x[perm], lam * soft + (1 - lam) * soft[perm]


def cutmix(
    key: jax.Array,
    images: jax.Array,
    labels: jax.Array,
    *,
    alpha: float = 1.0,
    num_classes: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """CutMix (Yun et al. 2019): a box of each partner's image pasted in, labels by pasted area.

    ``lam ~ Beta(alpha, alpha)``; one box per batch of size ``floor(H sqrt(1 - lam)) x
    floor(W sqrt(1 - lam))`` centred uniformly and clipped to the image; partners are a random
    permutation of the batch. The label weight of the partner is exactly the pasted fraction of
    the image (after clipping), the rest stays with the example's own label.

    Returns:
      ``(images, same dtype; soft labels (N, K) float32)``, the labels float64 for float64 images
      under ``jax_enable_x64``.
    """
    check_key(key)
    soft, alpha = _mixing_labels(images, labels, alpha, num_classes)
    dtype = _float_dtype(images)
    soft = soft.astype(dtype)
    height, width = images.shape[1:3]
    k_lam, k_perm, k_y, k_x = jax.random.split(key, 4)
    lam = jax.random.beta(k_lam, alpha, alpha, dtype=dtype)
    cut = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(height * cut).astype(jnp.int32)
    cut_w = jnp.floor(width * cut).astype(jnp.int32)
    cy = jax.random.randint(k_y, (), 0, height)
    cx = jax.random.randint(k_x, (), 0, width)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h - cut_h // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w - cut_w // 2, 0, width)
    rows = jnp.arange(height)[:, None]
    cols = jnp.arange(width)[None, :]
    box = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
    perm = jax.random.permutation(k_perm, images.shape[0])
    images = jnp.asarray(images)  # a NumPy batch cannot be indexed by a traced permutation
    mixed = jnp.where(box[None, :, :, None], images[perm], images)
    pasted = ((bottom - top) * (right - left)).astype(dtype) / (height * width)
    return mixed, (1 - pasted) * soft + pasted * soft[perm]


# ---- PixMix -----------------------------------------------------------------------------------


def pattern(key: jax.Array, shape: Sequence[int]) -> jax.Array:
    """A procedurally generated picture ``shape = (H, W, C)``, float32 in ``[0, 1]``.

    One of: a sum of random sinusoidal gratings, smooth value noise (a random coarse grid upsampled
    bilinearly), a checkerboard of random cell size and colours, or concentric rings; each colour
    channel gets its own phase or colours. These stand in for the fractals of PixMix: structured,
    label-free images of high complexity.
    """
    check_key(key)
    height, width, channels = check_size_sequence(
        shape, "shape", length=3, example="(H, W, C)", minimum=1
    )
    k_kind, k1, k2, k3 = jax.random.split(key, 4)
    rows, cols = jnp.meshgrid(
        jnp.linspace(-1, 1, height), jnp.linspace(-1, 1, width), indexing="ij"
    )

    def gratings(_):
        n = 4
        freq = jax.random.uniform(k1, (n, 1, 1, 1), minval=1.0, maxval=12.0)
        angle = jax.random.uniform(k2, (n, 1, 1, 1), maxval=math.pi)
        phase = jax.random.uniform(k3, (n, 1, 1, channels), maxval=2 * math.pi)
        along = cols[None, :, :, None] * jnp.cos(angle) + rows[None, :, :, None] * jnp.sin(angle)
        return 0.5 + 0.5 * jnp.mean(jnp.sin(freq * math.pi * along + phase), axis=0)

    def value_noise(_):
        coarse = jax.random.uniform(k1, (5, 5, channels))
        grid_r = (rows + 1) / 2 * 4
        grid_c = (cols + 1) / 2 * 4
        return _bilinear(coarse, grid_r, grid_c, edge=True)

    def checkerboard(_):
        cells = jax.random.randint(k1, (), 2, 9)
        colours = jax.random.uniform(k2, (2, 1, 1, channels))
        parity = (jnp.floor((rows + 1) * cells) + jnp.floor((cols + 1) * cells)) % 2
        return jnp.where(parity[..., None] > 0, colours[0], colours[1])

    def rings(_):
        freq = jax.random.uniform(k1, (), minval=3.0, maxval=15.0)
        centre = jax.random.uniform(k2, (2,), minval=-0.5, maxval=0.5)
        phase = jax.random.uniform(k3, (1, 1, channels), maxval=2 * math.pi)
        radius = jnp.sqrt((rows - centre[0]) ** 2 + (cols - centre[1]) ** 2)
        return 0.5 + 0.5 * jnp.sin(freq * math.pi * radius[..., None] + phase)

    kind = jax.random.randint(k_kind, (), 0, 4)
    out = jax.lax.switch(kind, [gratings, value_noise, checkerboard, rings], None)
    return out.astype(jnp.float32)


def _mixing_weights(key, beta, dtype=jnp.float32):
    """Weights (a, b) of a PixMix step, as the reference ``get_ab``: interpolating,
    ``a ~ Beta(beta, 1)``, ``b ~ Beta(1, beta)``, or (prob. 1/2) extrapolating,
    ``a = 1 + Beta(1, beta)``, ``b = -Beta(1, beta)``; every draw independent, in ``dtype`` (the
    image's: a float64 draw under x64 changed the float32 image's type inside the loop)."""
    k_choice, k_a, k_b, k_extra = jax.random.split(key, 4)
    # Beta(beta, 1) and Beta(1, beta) by inverting their CDFs x^beta and 1 - (1 - x)^beta
    a_in = jax.random.uniform(k_a, (), dtype) ** (1.0 / beta)
    b_in = 1.0 - jax.random.uniform(k_b, (), dtype) ** (1.0 / beta)
    a_out = 2.0 - jax.random.uniform(k_extra, (), dtype) ** (1.0 / beta)
    extrapolate = jax.random.bernoulli(k_choice)
    return jnp.where(extrapolate, a_out, a_in), jnp.where(extrapolate, -b_in, b_in)


def pixmix(
    key: jax.Array,
    image: jax.Array,
    *,
    k: int = 4,
    beta: float = 3.0,
    mixing_images: jax.Array | None = None,
    augment: Op | None = None,
) -> jax.Array:
    """PixMix (Hendrycks et al. 2022): mix the image with structured pictures, additively or
    multiplicatively, a random number of times.

    Starting from the image (or ``augment(image)``, with probability 1/2 where ``augment`` is
    given), up to ``k`` rounds (the count uniform on ``0..k``) each mix in a partner: the image's
    mixing picture, or, with probability 1/2 where ``augment`` is given, a fresh
    ``augment(image)``. As in the paper, the mixing picture is drawn once per image and mixed in at
    every such round: a :func:`pattern`, or a random one of ``mixing_images`` (``(M, H, W, C)`` in
    the image's units). Each round is
    additive, ``a u + b v`` on values mapped to ``[-1, 1]``, or multiplicative,
    ``(2u)^a (2v)^b / 2``, with probability 1/2; ``(a, b)`` come from Beta draws with parameter
    ``beta``. The result is clipped to the value range.
    """
    check_key(key)
    _check_image(image)
    k = check_int(k, "k", low=0)
    if k >= 2**31 - 1:  # the round count, 0..k, is drawn as an int32
        raise ValueError(f"k: expected an int < 2**31 - 1, got {k}")
    beta = check_real(beta, "beta", low=0, low_open=True)
    if augment is not None and not callable(augment):
        raise TypeError(f"augment: expected a callable (key, image) -> image, got {augment!r}")
    if mixing_images is not None:
        _check_images(mixing_images, "mixing_images")
        if tuple(mixing_images.shape[1:]) != tuple(image.shape) or mixing_images.shape[0] < 1:
            raise ValueError(
                f"mixing_images: expected shape (M >= 1, {', '.join(map(str, image.shape))}) like "
                f"the image, got {tuple(mixing_images.shape)}"
            )
        if (mixing_images.dtype == jnp.uint8) != (image.dtype == jnp.uint8):
            units = "uint8, 0..255" if image.dtype == jnp.uint8 else "floating, [0, 1]"
            raise TypeError(
                f"mixing_images: expected the image's units ({units}, as its {image.dtype}), got "
                f"dtype {mixing_images.dtype}"
            )
    max_value = _max_value(image.dtype)
    x = _to_float(image) / max_value
    keys = jax.random.split(key, 5)
    if mixing_images is not None:
        index = jax.random.randint(keys[4], (), 0, mixing_images.shape[0])
        mixing_picture = _to_float(jnp.asarray(mixing_images)[index]) / max_value
    else:
        mixing_picture = pattern(keys[4], image.shape)
    if augment is not None:
        start = _to_float(augment(keys[0], image)) / max_value
        x_mixed = jnp.where(jax.random.bernoulli(keys[1]), start, x)
    else:
        x_mixed = x
    rounds = jax.random.randint(keys[2], (), 0, k + 1)

    def mix_round(i, x_mixed):
        k_pick, k_aug, k_op, k_weights = jax.random.split(jax.random.fold_in(keys[3], i), 4)
        partner = mixing_picture
        if augment is not None:
            augmented = _to_float(augment(k_aug, image)) / max_value
            partner = jnp.where(jax.random.bernoulli(k_pick), augmented, partner)
        a, b = _mixing_weights(k_weights, beta, x_mixed.dtype)
        added = ((a * (2 * x_mixed - 1) + b * (2 * partner - 1)) + 1) / 2
        # as the reference: only the partner is clipped (b may be negative), at 1e-37, so that a
        # black partner pixel darkens the image where b > 0 (a clip at 1e-6 left 1e-6^b); a black
        # pixel of the image stays 0 (0^a), with a zero derivative instead of 0 * inf = NaN
        positive = x_mixed > 0
        image_power = jnp.where(positive, jnp.power(2 * jnp.where(positive, x_mixed, 1), a), 0)
        multiplied = image_power * jnp.power(jnp.maximum(2 * partner, 1e-37), b) / 2
        step = jnp.where(jax.random.bernoulli(k_op), added, multiplied)
        return jnp.clip(jnp.where(i < rounds, step, x_mixed), 0.0, 1.0)

    x_mixed = jax.lax.fori_loop(0, k, mix_round, x_mixed)
    return _restore(x_mixed * max_value, image.dtype)


# ---- policies ---------------------------------------------------------------------------------

# Each policy op: (float image in the units of max_value, magnitude in [0, 1], sign, max_value,
# wide) -> float image. "wide" selects TrivialAugment's wider ranges.


def _op_identity(x, m, sign, max_value, wide):
    return x


def _op_shear_x(x, m, sign, max_value, wide):
    return _shear(x, sign * m * (0.99 if wide else 0.3), "x")


def _op_shear_y(x, m, sign, max_value, wide):
    return _shear(x, sign * m * (0.99 if wide else 0.3), "y")


def _op_translate_x(x, m, sign, max_value, wide):
    limit = 32.0 if wide else 150.0 / 331.0 * x.shape[1]
    return translate(x, 0.0, jnp.trunc(sign * m * limit))  # torchvision: int(magnitude)


def _op_translate_y(x, m, sign, max_value, wide):
    limit = 32.0 if wide else 150.0 / 331.0 * x.shape[0]
    return translate(x, jnp.trunc(sign * m * limit), 0.0)


def _op_rotate(x, m, sign, max_value, wide):
    return rotate(x, sign * m * (135.0 if wide else 30.0))


def _factor(m, sign, wide):
    return 1.0 + sign * m * (0.99 if wide else 0.9)


def _with_range(fn, x, max_value, *args):
    """Apply an op written for images in [0, 1] to a float image in the units of max_value."""
    return fn(x / max_value, *args) * max_value


def _op_brightness(x, m, sign, max_value, wide):
    return _with_range(adjust_brightness, x, max_value, _factor(m, sign, wide))


def _op_saturation(x, m, sign, max_value, wide):
    return _with_range(adjust_saturation, x, max_value, _factor(m, sign, wide))


def _op_contrast(x, m, sign, max_value, wide):
    return _with_range(adjust_contrast, x, max_value, _factor(m, sign, wide))


def _op_sharpness(x, m, sign, max_value, wide):
    return _with_range(adjust_sharpness, x, max_value, _factor(m, sign, wide))


def _op_posterize(x, m, sign, max_value, wide):
    bits = 8 - jnp.round(m * (6 if wide else 4)).astype(jnp.int32)  # torchvision rounds
    return _with_range(posterize, x, max_value, bits)


def _op_solarize(x, m, sign, max_value, wide):
    return _with_range(solarize, x, max_value, 1.0 - m)


def _op_autocontrast(x, m, sign, max_value, wide):
    return _with_range(autocontrast, x, max_value)


def _op_equalize(x, m, sign, max_value, wide):
    return _with_range(equalize, x, max_value)


POLICY_OPS = (
    ("identity", _op_identity),
    ("shear_x", _op_shear_x),
    ("shear_y", _op_shear_y),
    ("translate_x", _op_translate_x),
    ("translate_y", _op_translate_y),
    ("rotate", _op_rotate),
    ("brightness", _op_brightness),
    ("saturation", _op_saturation),
    ("contrast", _op_contrast),
    ("sharpness", _op_sharpness),
    ("posterize", _op_posterize),
    ("solarize", _op_solarize),
    ("autocontrast", _op_autocontrast),
    ("equalize", _op_equalize),
)
"""The ops RandAugment and TrivialAugment choose from, by name (the RandAugment paper's list)."""


def _policy_step(key, x, magnitude, max_value, wide):
    k_op, k_sign = jax.random.split(key)
    index = jax.random.randint(k_op, (), 0, len(POLICY_OPS))
    sign = jnp.where(jax.random.bernoulli(k_sign), 1.0, -1.0)
    branches = [(lambda x, m, s, fn=fn: fn(x, m, s, max_value, wide)) for _, fn in POLICY_OPS]
    return jax.lax.switch(index, branches, x, magnitude, sign)


def rand_augment(
    key: jax.Array,
    image: jax.Array,
    *,
    num_ops: int = 2,
    magnitude: float = 9,
    max_magnitude: float = 30,
) -> jax.Array:
    """RandAugment (Cubuk et al. 2020): ``num_ops`` ops drawn uniformly from :data:`POLICY_OPS`,
    each at strength ``magnitude / max_magnitude`` of its range, with a random sign.
    """
    check_key(key)
    _check_image(image)
    num_ops = check_positive_int(num_ops, "num_ops")
    max_magnitude = check_real(max_magnitude, "max_magnitude", low=0, low_open=True)
    magnitude = check_real(magnitude, "magnitude", low=0, high=max_magnitude)
    max_value = _max_value(image.dtype)
    x = _to_float(image)
    for k in jax.random.split(key, num_ops):
        x = jnp.clip(_policy_step(k, x, magnitude / max_magnitude, max_value, False), 0, max_value)
    return _restore(x, image.dtype)


def trivial_augment(key: jax.Array, image: jax.Array) -> jax.Array:
    """TrivialAugment (Müller & Hutter 2021): one op from :data:`POLICY_OPS` at a strength drawn
    uniformly from the paper's 31 levels ``m / 30``, ``m`` in ``0..30`` (torchvision's bins), over
    its wide range, with a random sign.
    """
    check_key(key)
    _check_image(image)
    max_value = _max_value(image.dtype)
    k_step, k_mag = jax.random.split(key)
    magnitude = jax.random.randint(k_mag, (), 0, 31) / 30.0
    x = _policy_step(k_step, _to_float(image), magnitude, max_value, True)
    return _restore(jnp.clip(x, 0, max_value), image.dtype)


# ---- composition ------------------------------------------------------------------------------


def compose(*ops: Op) -> Op:
    """One op applying ``ops`` in order, each with its own key split from the one given."""
    for i, op in enumerate(ops):
        if not callable(op):
            raise TypeError(f"ops[{i}]: expected a callable (key, image) -> image, got {op!r}")

    def composed(key, image):
        check_key(key)
        for k, op in zip(jax.random.split(key, max(len(ops), 1)), ops, strict=False):
            image = op(k, image)
        return image

    return composed


def random_apply(op: Op, p: float) -> Op:
    """An op applying ``op`` with probability ``p`` (else the image unchanged); ``op`` must keep
    the image's shape and dtype."""
    if not callable(op):
        raise TypeError(f"op: expected a callable (key, image) -> image, got {op!r}")
    p = check_real(p, "p", low=0, high=1)

    def maybe(key, image):
        check_key(key)
        k_apply, k_op = jax.random.split(key)
        out = op(k_op, image)
        # either image comes back: another shape was broadcast (or refused from inside jnp.where)
        # and another dtype mixed the units of the two (a standardized image or a uint8 one)
        # (a NumPy float64 image comes back float32 without x64)
        same = (image.shape, jax.dtypes.canonicalize_dtype(image.dtype))
        if not hasattr(out, "shape") or (out.shape, out.dtype) != same:
            got = (
                f"shape {tuple(out.shape)} {out.dtype}"
                if hasattr(out, "shape")
                else type(out).__name__
            )
            raise ValueError(
                f"op: expected an op keeping the image's shape and dtype (random_apply returns "
                f"either), got {got} for an image of shape {tuple(image.shape)} {image.dtype}"
            )
        return jnp.where(jax.random.bernoulli(k_apply, p), out, image)

    return maybe


def apply_batch(op: Op, key: jax.Array, images: jax.Array) -> jax.Array:
    """``op`` applied to every image of ``images`` ``(N, H, W, C)`` with keys ``split(key, N)``."""
    if not callable(op):
        raise TypeError(f"op: expected a callable (key, image) -> image, got {op!r}")
    check_key(key)
    _check_images(images)
    return jax.vmap(op)(jax.random.split(key, images.shape[0]), images)
