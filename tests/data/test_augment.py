"""Tests of jcnn.data.augment: exact tests of deterministic ops, statistics of random ones."""

import functools
import math
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage, stats

from jcnn.data import augment as A

P_MIN = 1e-3  # smallest p-value accepted by the goodness-of-fit tests (fixed seeds: no flakiness)


def _many(op, image, n, seed=0):
    """``op(key, image)`` for ``n`` keys, one jitted vmap."""
    keys = jax.random.split(jax.random.key(seed), n)
    return np.asarray(jax.jit(jax.vmap(op, in_axes=(0, None)))(keys, image))


# ---- deterministic ops ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_rotate_multiples_of_90_equal_rot90(rng, dtype):
    image = rng.integers(0, 256, (7, 7, 3)).astype(dtype)
    rotate = jax.jit(A.rotate)
    for k in range(-1, 4):
        np.testing.assert_array_equal(rotate(jnp.asarray(image), 90.0 * k), np.rot90(image, k))


def test_rotate_any_angle_matches_scipy_bilinear(rng):
    image = rng.random((16, 16, 2)).astype(np.float32)
    rotate = jax.jit(A.rotate)
    for angle in (17.0, -33.0, 123.0):
        ours = np.asarray(rotate(jnp.asarray(image), angle))
        reference = ndimage.rotate(
            image, angle, axes=(1, 0), reshape=False, order=1, mode="grid-constant", cval=0.0
        )
        np.testing.assert_allclose(ours, reference, atol=1e-4)


def test_translate_and_flips(rng):
    image = rng.random((5, 6, 2)).astype(np.float32)
    shifted = np.asarray(jax.jit(A.translate)(jnp.asarray(image), 2, -1))
    expected = np.zeros_like(image)
    expected[2:, :-1] = image[:-2, 1:]
    np.testing.assert_array_equal(shifted, expected)
    np.testing.assert_array_equal(A.hflip(jnp.asarray(image)), image[:, ::-1])
    np.testing.assert_array_equal(A.vflip(jnp.asarray(image)), image[::-1])


def test_posterize_formula_all_values():
    values = jnp.arange(256, dtype=jnp.uint8).reshape(16, 16, 1)
    for bits in range(1, 9):
        expected = np.arange(256).reshape(16, 16, 1) & ((0xFF << (8 - bits)) & 0xFF)
        np.testing.assert_array_equal(A.posterize(values, bits), expected)
        as_float = A.posterize(values.astype(jnp.float32) / 255, bits)
        np.testing.assert_allclose(np.asarray(as_float) * 255, expected, atol=1e-4)


def test_solarize_formula_all_values():
    values = np.arange(256).reshape(16, 16, 1)
    for threshold in (0, 1, 77, 128, 255, 256):
        expected = np.where(values >= threshold, 255 - values, values)
        np.testing.assert_array_equal(
            A.solarize(jnp.asarray(values, jnp.uint8), threshold), expected
        )
    floats = values.astype(np.float32) / 255
    np.testing.assert_allclose(
        A.solarize(jnp.asarray(floats), 0.5), np.where(floats >= 0.5, 1 - floats, floats), atol=1e-7
    )
    # a threshold outside the image's values inverts all or nothing: refused, not ignored
    for image, threshold, message in [
        (floats, 128, r"\[0, 1\] for a float32 image \(its values are in \[0, 1\]\), got 128"),
        (values.astype(np.uint8), 300, r"\[0, 256\] for a uint8 image .* got 300"),
        (values.astype(np.uint8), -1, r"\[0, 256\] for a uint8 image .* got -1"),
    ]:
        with pytest.raises(ValueError, match=r"^threshold: expected a number in " + message):
            A.solarize(jnp.asarray(image), threshold)


def test_autocontrast_and_equalize(rng):
    image = rng.integers(40, 200, (6, 5, 3)).astype(np.float32)
    image[..., 2] = 90  # constant channel: unchanged
    out = np.asarray(A.autocontrast(jnp.asarray(image / 255)))
    low, high = image[..., :2].min((0, 1)), image[..., :2].max((0, 1))
    np.testing.assert_allclose(out[..., :2], (image[..., :2] - low) / (high - low), atol=1e-6)
    np.testing.assert_allclose(out[..., 2], 90 / 255, atol=1e-7)
    two_levels = np.where(np.arange(16).reshape(4, 4, 1) < 8, 50, 100).astype(np.uint8)
    np.testing.assert_array_equal(
        A.equalize(jnp.asarray(two_levels)), np.where(two_levels == 50, 0, 255)
    )


def test_equalize_rounds_a_tie_alike_eagerly_and_under_jit():
    # 30 pixels at level 0, 5 at 1, 25 at 2: level 1 maps to 255 * 5 / 30 = 42.5, a tie that
    # rounds to even (42) under jit and op by op alike; op by op, float32 gave 43
    image = np.zeros((6, 10, 1), np.uint8)
    image.reshape(-1)[30:35] = 1
    image.reshape(-1)[35:] = 2
    expected = np.where(image == 0, 0, np.where(image == 1, 42, 255))
    np.testing.assert_array_equal(A.equalize(image), expected)
    np.testing.assert_array_equal(jax.jit(A.equalize)(image), expected)


def test_colour_adjustments(rng):
    image = rng.random((4, 5, 3)).astype(np.float32)
    x = jnp.asarray(image)
    luma = image @ np.array([0.299, 0.587, 0.114], np.float32)
    np.testing.assert_allclose(A.adjust_brightness(x, 0.5), image * 0.5, atol=1e-6)
    np.testing.assert_allclose(A.adjust_brightness(x, 3.0), np.clip(image * 3, 0, 1), atol=1e-6)
    np.testing.assert_allclose(
        A.adjust_saturation(x, 0.0), np.repeat(luma[..., None], 3, -1), atol=1e-6
    )
    np.testing.assert_allclose(
        A.adjust_contrast(x, 0.0), np.full_like(image, luma.mean()), atol=1e-6
    )
    np.testing.assert_allclose(
        A.adjust_contrast(x, 0.5), 0.5 * image + 0.5 * luma.mean(), atol=1e-6
    )
    for adjust in (A.adjust_brightness, A.adjust_contrast, A.adjust_saturation, A.adjust_sharpness):
        np.testing.assert_allclose(adjust(x, 1.0), image, atol=1e-6)
    sharp = np.asarray(A.adjust_sharpness(x, 0.0))
    kernel = np.ones((3, 3)) / 13
    kernel[1, 1] = 5 / 13
    smooth = ndimage.correlate(image[..., 0], kernel, mode="constant")
    np.testing.assert_allclose(sharp[1:-1, 1:-1, 0], smooth[1:-1, 1:-1], atol=1e-6)
    np.testing.assert_allclose(sharp[0], image[0], atol=1e-7)


# ---- random per-example ops -------------------------------------------------------------------


def test_flip_rate():
    image = jnp.arange(12.0).reshape(2, 6, 1)
    n = 4000
    for p in (0.5, 0.2):
        out = _many(functools.partial(A.random_hflip, p=p), image, n)
        flipped = np.all(out == np.asarray(image)[:, ::-1], axis=(1, 2, 3))
        kept = np.all(out == np.asarray(image), axis=(1, 2, 3))
        assert np.all(flipped ^ kept)
        assert stats.binomtest(int(flipped.sum()), n, p).pvalue > P_MIN
    out = _many(A.random_vflip, image, 1000)
    assert 400 < np.all(out == np.asarray(image)[::-1], axis=(1, 2, 3)).sum() < 600


@pytest.mark.parametrize("padding", [2, 3])
def test_crop_offsets_uniform_over_allowed_range(padding):
    height, width = 6, 7
    image = (jnp.arange(height * width, dtype=jnp.float32) + 1).reshape(height, width, 1)
    n = 3000
    out = _many(functools.partial(A.random_crop, padding=padding), image, n)
    flat = out.reshape(n, -1)
    position = flat.argmax(1)  # the brightest pixel is the original bottom-right (or nearest)
    value = flat.max(1).astype(int) - 1
    top = value // width + padding - position // width
    left = value % width + padding - position % width
    for offsets, span in ((top, 2 * padding + 1), (left, 2 * padding + 1)):
        counts = np.bincount(offsets, minlength=span)
        assert counts.size == span and counts.min() > 0, counts
        assert stats.chisquare(counts).pvalue > P_MIN
    # reflect padding: same offsets for the same keys, content from np.pad(mode="reflect")
    reflect = _many(
        functools.partial(A.random_crop, padding=padding, pad_mode="reflect"), image, 50
    )
    padded = np.pad(
        np.asarray(image), ((padding, padding), (padding, padding), (0, 0)), mode="reflect"
    )
    for i in range(50):
        np.testing.assert_array_equal(
            reflect[i], padded[top[i] : top[i] + height, left[i] : left[i] + width]
        )


def test_crop_smaller_size_and_translate_range():
    image = (jnp.arange(64, dtype=jnp.float32) + 1).reshape(8, 8, 1)
    out = _many(functools.partial(A.random_crop, size=(3, 5)), image, 2000)
    assert out.shape == (2000, 3, 5, 1)
    top, left = np.divmod(out[:, 0, 0, 0].astype(int) - 1, 8)
    assert set(top) == set(range(6)) and set(left) == set(range(4))
    shifted = _many(functools.partial(A.random_translate, max_shift=2), image, 500)
    assert shifted.shape == (500, 8, 8, 1)
    zero_rows = (shifted[..., 0] == 0).all(2).sum(1)
    assert set(zero_rows) == {0, 1, 2}


def test_zero_padded_crop_never_builds_the_padded_image():
    # the crop was sliced from jnp.pad(image): a padding of 10**6 asked XLA for 48 TB
    # (RESOURCE_EXHAUSTED), one of 10**12 aborted the process (static extent overflow)
    image = (jnp.arange(12, dtype=jnp.float32) + 1).reshape(3, 4, 1)
    padding = 10**6
    keys = jax.random.split(jax.random.key(0), 4000)
    crop = functools.partial(A.random_crop, size=(2, 3), padding=padding)
    out = np.asarray(jax.jit(jax.vmap(crop, in_axes=(0, None)))(keys, image))
    assert out.shape == (4000, 2, 3, 1)
    # each crop is its offsets' window of the zero-padded image: the same keys' offsets
    offsets = [jax.random.split(k) for k in keys[:200]]
    for i, (key_y, key_x) in enumerate(offsets):
        top = int(jax.random.randint(key_y, (), 0, 3 + 2 * padding - 1)) - padding
        left = int(jax.random.randint(key_x, (), 0, 4 + 2 * padding - 2)) - padding
        expected = np.zeros((2, 3, 1), np.float32)
        for r in range(2):
            for c in range(3):
                if 0 <= top + r < 3 and 0 <= left + c < 4:
                    expected[r, c] = image[top + r, left + c]
        np.testing.assert_array_equal(out[i], expected)
    shifted = A.random_translate(jax.random.key(1), image, max_shift=padding)
    assert shifted.shape == image.shape


def test_paddings_beyond_int32_offsets_are_refused_by_name():
    image = jnp.zeros((8, 8, 3))
    with pytest.raises(ValueError, match=r"^padding: expected the padded image .* got padding="):
        A.random_crop(_KEY, image, padding=10**12)
    with pytest.raises(ValueError, match=r"^max_shift: expected an int < 2\*\*30, got 10+$"):
        A.random_translate(_KEY, image, max_shift=10**12)


def test_cutout_larger_than_twice_the_image_erases_it_all():
    # size // 2 beyond int32 failed with an OverflowError from inside jit
    image = jnp.ones((5, 3, 2), jnp.uint8)
    for size in (11, 2**31, 10**12):
        out = A.cutout(_KEY, image, size=size, fill=7)
        np.testing.assert_array_equal(out, np.full((5, 3, 2), 7, np.uint8))


def test_cutout_area_matches_exact_expectation():
    height, width, size = 9, 7, 4
    n = 4000
    out = _many(functools.partial(A.cutout, size=size), jnp.ones((height, width, 1)), n)
    erased = out[..., 0] == 0
    # every erased region is a rectangle of at most size x size
    rows, cols = erased.any(2), erased.any(1)
    assert np.array_equal(erased.sum((1, 2)), rows.sum(1) * cols.sum(1))
    assert rows.sum(1).max() == size and cols.sum(1).max() == size

    # mean erased area against the exact average over the uniformly drawn centres
    def span(c, limit):
        return min(c - size // 2 + size, limit) - max(c - size // 2, 0)

    expected = np.mean(
        [span(y, height) * span(x, width) for y in range(height) for x in range(width)]
    )
    areas = erased.sum((1, 2))
    assert abs(areas.mean() - expected) < 4 * areas.std() / np.sqrt(n)


@pytest.mark.parametrize("fill, expected", [(300, 255), (-1, 0), (127.6, 128), (200, 200)])
def test_cutout_fill_is_rounded_and_clipped_for_uint8(fill, expected):
    image = jnp.full((5, 7, 2), 9, jnp.uint8)
    for cut in (A.cutout, jax.jit(A.cutout, static_argnames="size")):
        out = np.asarray(cut(jax.random.key(2), image, size=3, fill=fill))
        assert out.dtype == np.uint8
        erased = out != 9
        assert erased.any() and set(np.unique(out[erased])) == {expected}
    traced = jax.jit(lambda k, f: A.cutout(k, image, size=3, fill=f))
    np.testing.assert_array_equal(traced(jax.random.key(2), jnp.float32(fill)), out)


def test_rotation_angle_uniform():
    image = jnp.zeros((9, 9, 1)).at[4, 8, 0].set(1.0).at[4, 4, 0].set(1.0)
    degrees = 40.0
    out = _many(functools.partial(A.random_rotate, degrees=degrees), image, 1500)
    # the bright pixel's centre of mass gives the angle it was rotated by
    rows, cols = np.meshgrid(np.arange(9), np.arange(9), indexing="ij")
    weight = out[..., 0] * (np.hypot(rows - 4, cols - 4) > 1)[None]
    y = 4 - (weight * rows).sum((1, 2)) / weight.sum((1, 2))
    x = (weight * cols).sum((1, 2)) / weight.sum((1, 2)) - 4
    angles = np.degrees(np.arctan2(y, x))
    assert np.abs(angles).max() < degrees + 3
    assert stats.kstest(angles, stats.uniform(-degrees, 2 * degrees).cdf).statistic < 0.06


def test_random_resized_crop_scale_and_ratio_distributions():
    size = 32
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    ramp = jnp.asarray(np.stack([rows, cols], -1), jnp.float32)
    out_size = 8

    def box_shape(samples):
        # interior output samples are linear in the input coordinates: slope = box / out_size
        box_h = (samples[:, -2, 3, 0] - samples[:, 1, 3, 0]) / (out_size - 3) * out_size
        box_w = (samples[:, 3, -2, 1] - samples[:, 3, 1, 1]) / (out_size - 3) * out_size
        return box_h, box_w

    scale = (0.1, 0.6)
    op = functools.partial(A.random_resized_crop, size=out_size, scale=scale, ratio=(1.0, 1.0))
    box_h, box_w = box_shape(_many(op, ramp, 1500))
    np.testing.assert_allclose(box_h, box_w, rtol=1e-3)
    area = box_h * box_w / size**2
    assert stats.kstest(area, stats.uniform(scale[0], scale[1] - scale[0]).cdf).pvalue > P_MIN
    ratio = (0.5, 2.0)
    op = functools.partial(A.random_resized_crop, size=out_size, scale=(0.2, 0.2), ratio=ratio)
    box_h, box_w = box_shape(_many(op, ramp, 1500, seed=1))
    log_aspect = np.log(box_w / box_h)
    uniform = stats.uniform(np.log(ratio[0]), np.log(ratio[1]) - np.log(ratio[0]))
    assert stats.kstest(log_aspect, uniform.cdf).pvalue > P_MIN
    np.testing.assert_allclose(box_h * box_w / size**2, 0.2, rtol=1e-3)
    whole = A.random_resized_crop(jax.random.key(0), ramp, size=size, scale=(1, 1), ratio=(1, 1))
    np.testing.assert_allclose(whole, ramp, atol=1e-4)


def test_color_jitter_factor_range(rng):
    image = jnp.asarray(rng.uniform(0.2, 0.5, (4, 4, 3)), jnp.float32)
    out = _many(functools.partial(A.color_jitter, brightness=0.4), image, 2000)
    factors = (out / np.asarray(image)).reshape(2000, -1)
    np.testing.assert_allclose(factors.min(1), factors.max(1), rtol=1e-4)
    assert stats.kstest(factors[:, 0], stats.uniform(0.6, 0.8).cdf).pvalue > P_MIN
    # a strength above 1: uniform on [0, 1 + s] as in torchvision, no mass of black images at 0
    image = jnp.asarray(rng.uniform(0.1, 0.35, (4, 4, 3)), jnp.float32)
    out = _many(functools.partial(A.color_jitter, brightness=1.5), image, 2000)
    factors = (out / np.asarray(image)).reshape(2000, -1)[:, 0]
    assert (factors < 1e-6).mean() < 0.01
    assert stats.kstest(factors, stats.uniform(0.0, 2.5).cdf).pvalue > P_MIN


# ---- batch mixing -----------------------------------------------------------------------------


def _mix_many(fn, images, labels, n, **kw):
    keys = jax.random.split(jax.random.key(3), n)
    run = jax.jit(jax.vmap(lambda k: fn(k, images, labels, num_classes=4, **kw)))
    mixed, soft = run(keys)
    return np.asarray(mixed), np.asarray(soft)


@pytest.mark.parametrize("alpha", [0.4, 2.0])
def test_mixup_lambda_is_beta_and_images_match_labels(alpha):
    images = jnp.arange(4, dtype=jnp.uint8).reshape(4, 1, 1, 1) * jnp.ones((4, 3, 2, 1), jnp.uint8)
    labels = jnp.arange(4)
    mixed, soft = _mix_many(A.mixup, images, labels, 3000, alpha=alpha)
    np.testing.assert_allclose(soft.sum(-1), 1, atol=1e-6)
    # image i holds the value i everywhere, so its mixed value is the label-weighted mean class
    np.testing.assert_allclose(mixed[..., 0, 0, 0], soft @ np.arange(4), atol=1e-4)
    assert mixed.dtype == np.float32
    moved = ~np.isclose(soft[:, 0, 0], 1.0)  # example 0 got a partner
    lam = soft[moved, 0, 0]
    assert stats.kstest(lam, stats.beta(alpha, alpha).cdf).pvalue > P_MIN


def test_cutmix_label_weights_equal_pasted_area():
    height, width = 10, 8
    values = jnp.arange(1, 5, dtype=jnp.uint8) * 40
    images = values.reshape(4, 1, 1, 1) * jnp.ones((4, height, width, 2), jnp.uint8)
    labels = jnp.arange(4)
    mixed, soft = _mix_many(A.cutmix, images, labels, 2000, alpha=1.0)
    assert mixed.dtype == np.uint8
    own = mixed[..., 0] == np.asarray(values).reshape(1, 4, 1, 1)
    pasted = 1 - own.mean((2, 3))
    own_weight = soft[:, np.arange(4), np.arange(4)]
    np.testing.assert_allclose(own_weight, 1 - pasted, atol=1e-6)
    np.testing.assert_allclose(soft.sum(-1), 1, atol=1e-6)
    # the pasted region is one rectangle, the same for the whole batch
    region = ~own[:, 0] | ~own[:, 1]
    rows, cols = region.any(2), region.any(1)
    assert np.array_equal(region.sum((1, 2)), rows.sum(1) * cols.sum(1))
    assert pasted.max() > 0.5 and pasted.min() == 0


@pytest.mark.parametrize("mix", [A.mixup, A.cutmix])
def test_mixing_keeps_float64_under_x64_and_float32_otherwise(mix):
    # under jax_enable_x64 mixup rounded float64 images to float32 before mixing them with a
    # float64 lambda (float64 output, float32 values), gave float32 images float64 outputs, and
    # cutmix's label weights stayed float32 for float64 images
    images = np.random.default_rng(0).uniform(0, 1, (5, 6, 4, 2))
    labels = np.arange(5)
    with jax.enable_x64(True):
        mixed, soft = mix(jax.random.key(1), jnp.asarray(images), labels, num_classes=5)
        mixed32, soft32 = mix(
            jax.random.key(1), jnp.asarray(images, jnp.float32), labels, num_classes=5
        )
    assert (mixed.dtype, soft.dtype) == (np.float64, np.float64)
    assert (mixed32.dtype, soft32.dtype) == (np.float32, np.float32)
    mixed, soft = np.asarray(mixed), np.asarray(soft)
    own = soft[labels, labels]
    partner = np.argmax(soft - np.eye(5), axis=-1)
    assert (own < 1).any()
    if mix is A.mixup:  # lam x + (1 - lam) x[perm], with lam the label weight, in float64
        expected = (
            own[:, None, None, None] * images + (1 - own[:, None, None, None]) * images[partner]
        )
        np.testing.assert_allclose(mixed, expected, rtol=0, atol=1e-15)
    else:  # the label weight is the image's own area, an exact fraction of 24 pixels
        np.testing.assert_array_equal(own, (mixed == images).all(-1).sum((1, 2)) / 24)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.uint8])
def test_pixmix_keeps_the_image_dtype_under_x64(dtype):
    # under jax_enable_x64 the mixing weights were float64 draws, so the float32 image of the
    # mixing loop became float64 and lax.fori_loop failed with a raw carry-type TypeError
    image = jnp.asarray(
        np.random.default_rng(0).uniform(0, 1, (6, 5, 3)) * (255 if dtype == jnp.uint8 else 1),
        dtype,
    )
    with jax.enable_x64(True):
        out = A.pixmix(jax.random.key(0), image, k=4)
    assert out.dtype == dtype and out.shape == image.shape


def test_mixing_ops_need_num_classes_for_integer_labels():
    images = jnp.zeros((2, 4, 4, 1))
    with pytest.raises(ValueError, match="num_classes"):
        A.mixup(jax.random.key(0), images, jnp.array([0, 1]))
    soft = jax.nn.one_hot(jnp.array([0, 1]), 3)
    assert A.cutmix(jax.random.key(0), images, soft)[1].shape == (2, 3)
    with pytest.raises(ValueError, match="labels"):
        A.mixup(jax.random.key(0), images, jnp.zeros(3, jnp.int32), num_classes=2)


def test_mixing_ops_refuse_soft_labels_that_are_not_probabilities():
    # integer labels outside num_classes were already refused; soft rows of another sum,
    # negative or NaN entries were mixed into targets silently
    images = jnp.zeros((2, 4, 4, 1))
    for soft in (
        [[0.5, 0.5, 0.5], [1.0, 0.0, 0.0]],
        [[2.0, -1.0, 0.0], [0.0, 1.0, 0.0]],
        [[jnp.nan, 0.5, 0.5], [0.0, 1.0, 0.0]],
    ):
        for op in (A.mixup, A.cutmix):
            with pytest.raises(ValueError, match=r"labels: expected soft labels .* got rows \[0\]"):
                op(jax.random.key(0), images, jnp.array(soft))
    smoothed = jnp.full((2, 3), 0.1, jnp.bfloat16).at[:, 0].set(0.8)  # sums to 1 in bfloat16
    assert A.mixup(jax.random.key(0), images, smoothed)[1].shape == (2, 3)


# ---- PixMix, policies, composition ------------------------------------------------------------


def test_pixmix_round_counts_beyond_int32_are_refused_by_name():
    # k + 1 went to an int32 randint: an OverflowError from inside jit
    with pytest.raises(ValueError, match=r"^k: expected an int < 2\*\*31 - 1, got 10+$"):
        A.pixmix(_KEY, jnp.zeros((8, 8, 3)), k=10**12)


def test_pixmix_and_patterns(rng):
    image = jnp.asarray(rng.integers(0, 256, (12, 12, 3)), jnp.uint8)
    out = _many(A.pixmix, image, 64)
    assert out.dtype == np.uint8 and out.shape == (64, 12, 12, 3)
    unchanged = np.all(out == np.asarray(image), axis=(1, 2, 3))
    assert 0 < unchanged.sum() < 32  # zero rounds with probability 1/5
    np.testing.assert_array_equal(A.pixmix(jax.random.key(1), image, k=0), image)
    patterns = _many(lambda k, _: A.pattern(k, (12, 12, 3)), image, 64)
    assert patterns.min() >= 0 and patterns.max() <= 1 and patterns.std(axis=(1, 2)).min() > 0
    with_set = A.pixmix(
        jax.random.key(2),
        image.astype(jnp.float32) / 255,
        mixing_images=jnp.zeros((3, 12, 12, 3)),
        augment=functools.partial(A.random_crop, padding=2),
    )
    assert (
        with_set.dtype == jnp.float32 and 0 <= float(with_set.min()) <= float(with_set.max()) <= 1
    )


@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_pixmix_weights_are_the_reference_independent_beta_draws(beta):
    # PixMix's get_ab: a ~ Beta(beta, 1), b ~ Beta(1, beta), or with probability 1/2
    # a = 1 + Beta(1, beta), b = -Beta(1, beta), every draw independent; jcnn's extrapolating
    # pair reused one draw (a = 1 - b, always on the line through the two images)
    keys = jax.random.split(jax.random.key(0), 4000)
    a, b = map(np.asarray, jax.jit(jax.vmap(lambda k: A._mixing_weights(k, beta)))(keys))
    extrapolate = b < 0
    assert abs(extrapolate.mean() - 0.5) < 0.03
    inter_a, inter_b = a[~extrapolate], b[~extrapolate]
    extra_a, extra_b = a[extrapolate] - 1, -b[extrapolate]
    for sample, reference in (
        (inter_a, stats.beta(beta, 1)),
        (inter_b, stats.beta(1, beta)),
        (extra_a, stats.beta(1, beta)),
        (extra_b, stats.beta(1, beta)),
    ):
        assert stats.kstest(sample, reference.cdf).pvalue > P_MIN
    for first, second in ((inter_a, inter_b), (extra_a, extra_b)):
        assert abs(stats.pearsonr(first, second).statistic) < 0.1


def test_policy_posterize_bits_are_torchvisions_bins():
    # torchvision's RandAugment / TrivialAugmentWide posterize bins: 8 - round(i / (30 / 4)) and
    # 8 - round(i / (30 / 6)) bits at magnitude i of 30; jcnn floored (8 bits at i = 4, not 7)
    ops = dict(A.POLICY_OPS)
    image = jnp.arange(256, dtype=jnp.float32).reshape(16, 16, 1)
    for wide, top in ((False, 4), (True, 6)):
        for i in range(31):
            bits = 8 - int(np.round(i / (30 / top)))
            got = ops["posterize"](image, i / 30, 1.0, 255.0, wide)
            want = A.posterize(image.astype(jnp.uint8), bits).astype(jnp.float32)
            np.testing.assert_allclose(got, want, atol=1e-4, err_msg=f"{i}/30, wide={wide}")


def test_policy_translations_truncate_the_magnitude_as_torchvision():
    # torchvision's RandAugment / TrivialAugmentWide shift by int(magnitude) pixels (toward 0),
    # magnitude i / 30 of 150/331 of the size (wide: 32 pixels); jcnn rounded (15 at i = 14 wide)
    ops = dict(A.POLICY_OPS)
    image = jnp.arange(1.0, 1.0 + 40 * 40).reshape(40, 40, 1)
    for wide in (False, True):
        for i in (0, 1, 5, 14, 22, 29, 30):
            for sign in (1.0, -1.0):
                pixels = i * 32 // 30 if wide else int(i / 30 * 150 / 331 * 40)
                got_x = ops["translate_x"](image, i / 30, sign, 255.0, wide)
                got_y = ops["translate_y"](image, i / 30, sign, 255.0, wide)
                where = f"{i}/30, sign {sign}, wide={wide}"
                np.testing.assert_array_equal(
                    got_x, A.translate(image, 0, sign * pixels), err_msg=where
                )
                np.testing.assert_array_equal(
                    got_y, A.translate(image, sign * pixels, 0), err_msg=where
                )


def test_policy_shears_turn_about_the_top_left_corner_as_the_references(rng):
    # AutoAugment's PIL shear and torchvision's (center=[0, 0]) keep the top edge in place for
    # x (the left edge for y); jcnn sheared about the centre, moving the top rows by s H / 2
    ops = dict(A.POLICY_OPS)
    image = rng.uniform(size=(9, 12, 2))
    rows, cols = np.meshgrid(np.arange(9.0), np.arange(12.0), indexing="ij")
    for wide in (False, True):
        for i, sign in ((7, 1.0), (30, -1.0), (18, 1.0)):
            s = sign * i / 30 * (0.99 if wide else 0.3)
            for name, coordinates in (
                ("shear_x", (rows, cols - s * (rows + 0.5))),
                ("shear_y", (rows - s * (cols + 0.5), cols)),
            ):
                want = np.stack(
                    [
                        ndimage.map_coordinates(
                            image[..., c], coordinates, order=1, mode="grid-constant"
                        )
                        for c in range(2)
                    ],
                    axis=-1,
                )
                got = ops[name](jnp.asarray(image, jnp.float32), i / 30, sign, 1.0, wide)
                np.testing.assert_allclose(
                    got, want, rtol=0, atol=1e-5, err_msg=f"{name} {i}/30 wide={wide}"
                )


def test_policies_cover_every_op_and_are_reproducible(rng):
    image = jnp.asarray(rng.integers(0, 256, (10, 10, 3)), jnp.uint8)
    # one RandAugment op at a fixed magnitude: 3 sign-free ops + 11 ops with 2 signs = 25 outcomes;
    # TrivialAugment also draws the magnitude, so nearly every outcome is new
    policies = (
        (functools.partial(A.rand_augment, num_ops=1, magnitude=9), 20, 25),
        (A.trivial_augment, 100, 200),
    )
    for policy, at_least, at_most in policies:
        out = _many(policy, image, 200)
        assert out.dtype == np.uint8 and out.shape == (200, 10, 10, 3)
        assert at_least <= len({o.tobytes() for o in out}) <= at_most
    chosen = [
        int(jax.random.randint(jax.random.split(k)[0], (), 0, len(A.POLICY_OPS)))
        for k in jax.random.split(jax.random.key(0), 200)
    ]
    assert set(chosen) == set(range(len(A.POLICY_OPS)))


def test_trivial_augment_draws_op_sign_and_one_of_31_strengths_uniformly(monkeypatch):
    # Mueller & Hutter 2021 (and torchvision's TrivialAugmentWide): strength m uniform on
    # {0, ..., 30}, i.e. m / 30 of the op's range; jcnn drew a continuous uniform strength.
    # Each stand-in op writes (its index, the strength, the sign) into the image.
    def recorder(i):
        def op(x, m, sign, max_value, wide):
            values = jnp.stack([jnp.float32(i) / 20, jnp.float32(m), (sign + 1) / 2])
            return jnp.broadcast_to(values, x.shape)

        return op

    monkeypatch.setattr(A, "POLICY_OPS", tuple((f"op{i}", recorder(i)) for i in range(14)))
    keys = jax.random.split(jax.random.key(3), 6200)
    out = np.asarray(jax.vmap(lambda k: A.trivial_augment(k, jnp.zeros((1, 1, 3))))(keys))[:, 0, 0]
    ops, levels = np.round(out[:, 0] * 20).astype(int), out[:, 1] * 30
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    counts = np.bincount(np.round(levels).astype(int), minlength=31)
    assert len(counts) == 31 and stats.chisquare(counts).pvalue > 1e-6
    assert stats.chisquare(np.bincount(ops, minlength=14)).pvalue > 1e-6
    assert stats.binomtest(int(out[:, 2].sum()), len(out), 0.5).pvalue > 1e-6


def test_compose_random_apply_and_batches(rng):
    image = jnp.asarray(rng.random((6, 6, 1)), jnp.float32)
    key = jax.random.key(5)
    crop = functools.partial(A.random_crop, padding=1)
    composed = A.compose(crop, A.random_hflip)
    k1, k2 = jax.random.split(key)
    np.testing.assert_array_equal(composed(key, image), A.random_hflip(k2, crop(k1, image)))
    np.testing.assert_array_equal(A.random_apply(crop, 0.0)(key, image), image)
    always = A.random_apply(crop, 1.0)(key, image)
    np.testing.assert_array_equal(always, crop(jax.random.split(key)[1], image))
    batch = jnp.stack([image] * 6)
    out = A.apply_batch(composed, key, batch)
    keys = jax.random.split(key, 6)
    for i in range(6):
        np.testing.assert_array_equal(out[i], composed(keys[i], image))
    assert len({np.asarray(o).tobytes() for o in out}) > 1


def test_argument_checks():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"image: expected rank 3 \(H, W, C\)"):
        A.random_hflip(key, jnp.zeros((2, 4, 4, 1)))
    with pytest.raises(TypeError, match="image: expected uint8 or floating"):
        A.hflip(jnp.zeros((4, 4, 1), jnp.int32))
    with pytest.raises(ValueError, match="pad_mode"):
        A.random_crop(key, jnp.zeros((4, 4, 1)), padding=1, pad_mode="wrap")
    with pytest.raises(ValueError, match="size"):
        A.random_crop(key, jnp.zeros((4, 4, 1)), size=9, padding=1)
    with pytest.raises(ValueError, match="magnitude"):
        A.rand_augment(key, jnp.zeros((4, 4, 1)), magnitude=31)
    with pytest.raises(TypeError, match=r"ops\[1\]"):
        A.compose(A.random_hflip, 3)


_KEY = jax.random.key(0)
_IMAGE = jnp.zeros((8, 8, 3), jnp.uint8)
_IMAGES = jnp.zeros((4, 8, 8, 3), jnp.float32)
_LABELS = jnp.array([0, 1, 2, 1], jnp.int32)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: A.random_hflip(_KEY, _IMAGE, p=2.0),
            ValueError,
            "p: expected a number in [0, 1], got 2.0",
        ),
        (
            lambda: A.random_vflip(_KEY, _IMAGE, p=-0.5),
            ValueError,
            "p: expected a number in [0, 1], got -0.5",
        ),
        (
            lambda: A.random_hflip(_KEY, _IMAGE, p="0.5"),
            TypeError,
            "p: expected a number in [0, 1], got '0.5'",
        ),
        (
            lambda: A.random_apply(A.random_hflip, 1.5),
            ValueError,
            "p: expected a number in [0, 1], got 1.5",
        ),
        (lambda: A.random_apply(None, 0.5), TypeError, "op: expected a callable"),
        (lambda: A.posterize(_IMAGE, 9), ValueError, "bits: expected an int in [1, 8], got 9"),
        (lambda: A.posterize(_IMAGE, 0), ValueError, "bits: expected an int in [1, 8], got 0"),
        (lambda: A.posterize(_IMAGE, 2.5), TypeError, "bits: expected an int in [1, 8], got 2.5"),
        (
            lambda: A.solarize(_IMAGE, None),
            TypeError,
            "threshold: expected a finite number, got None",
        ),
        (
            lambda: A.adjust_brightness(_IMAGE, -1.0),
            ValueError,
            "factor: expected a finite number >= 0, got -1.0",
        ),
        (
            lambda: A.adjust_contrast(_IMAGE, float("nan")),
            ValueError,
            "factor: expected a finite number >= 0, got nan",
        ),
        (
            lambda: A.rotate(_IMAGE, float("inf")),
            ValueError,
            "angle: expected a finite number, got inf",
        ),
        (
            lambda: A.translate(_IMAGE, "1", 0),
            TypeError,
            "shift_y: expected a finite number, got '1'",
        ),
        (
            lambda: A.affine(_IMAGE, jnp.eye(3)),
            ValueError,
            "matrix: expected shape (2, 3), got (3, 3)",
        ),
        (
            lambda: A.affine(_IMAGE, [[1.0, 0.0, float("nan")], [0.0, 1.0, 0.0]]),
            ValueError,
            "matrix: expected finite entries, got [[1.0, 0.0, nan], [0.0, 1.0, 0.0]]",
        ),
        (
            lambda: A.affine(_IMAGE, np.array([[1.0, 0.0, 0.0], [0.0, np.inf, 0.0]])),
            ValueError,
            "matrix: expected finite entries, got [[1.0, 0.0, 0.0], [0.0, inf, 0.0]]",
        ),
        (
            lambda: A.random_crop(_KEY, _IMAGE, padding=-1),
            ValueError,
            "padding: expected an int >= 0, got -1",
        ),
        (
            lambda: A.random_crop(_KEY, _IMAGE, padding=1.5),
            TypeError,
            "padding: expected an int >= 0, got 1.5",
        ),
        (
            lambda: A.random_crop(_KEY, _IMAGE, size=(4, 0)),
            ValueError,
            "size[1]: expected an int >= 1, got 0",
        ),
        (
            lambda: A.random_crop(_KEY, _IMAGE, pad_mode=None),
            TypeError,
            "pad_mode: expected one of 'zeros', 'reflect', got None",
        ),
        (
            lambda: A.random_translate(_KEY, _IMAGE, max_shift=-2),
            ValueError,
            "max_shift: expected an int >= 0, got -2",
        ),
        (
            lambda: A.random_rotate(_KEY, _IMAGE, degrees=float("nan")),
            ValueError,
            "degrees: expected a finite number >= 0, got nan",
        ),
        (
            lambda: A.random_resized_crop(_KEY, _IMAGE, size=4, scale=(0.5, 0.2)),
            ValueError,
            "scale: expected low <= high",
        ),
        (
            lambda: A.random_resized_crop(_KEY, _IMAGE, size=4, scale=(0.5, 2.0)),
            ValueError,
            "scale[1]: expected a number in (0, 1], got 2.0",
        ),
        (
            lambda: A.random_resized_crop(_KEY, _IMAGE, size=4, ratio=(0, 1)),
            ValueError,
            "ratio[0]: expected a finite number > 0, got 0",
        ),
        (
            lambda: A.random_resized_crop(_KEY, _IMAGE, size=4, ratio=1.0),
            TypeError,
            "ratio: expected a (low, high) pair",
        ),
        (
            lambda: A.cutout(_KEY, _IMAGE, size=0),
            ValueError,
            "size: expected a positive int, got 0",
        ),
        (
            lambda: A.color_jitter(_KEY, _IMAGE, brightness=-0.1),
            ValueError,
            "brightness: expected a finite number >= 0, got -0.1",
        ),
        (
            lambda: A.color_jitter(_KEY, _IMAGE, saturation=float("inf")),
            ValueError,
            "saturation: expected a finite number >= 0, got inf",
        ),
        (
            lambda: A.rand_augment(_KEY, _IMAGE, magnitude=31),
            ValueError,
            "magnitude: expected a number in [0, 30.0], got 31",
        ),
        (
            lambda: A.rand_augment(_KEY, _IMAGE, num_ops=0),
            ValueError,
            "num_ops: expected a positive int, got 0",
        ),
        (lambda: A.pixmix(_KEY, _IMAGE, k=-1), ValueError, "k: expected an int >= 0, got -1"),
        (
            lambda: A.pixmix(_KEY, _IMAGE, beta=0.0),
            ValueError,
            "beta: expected a finite number > 0, got 0.0",
        ),
        (
            lambda: A.pixmix(_KEY, _IMAGE, mixing_images=jnp.zeros((2, 4, 4, 3))),
            ValueError,
            "mixing_images: expected shape (M >= 1, 8, 8, 3)",
        ),
        (lambda: A.apply_batch(A.hflip, 0, _IMAGES), TypeError, "key: expected a jax.random key"),
        (
            lambda: A.mixup(_KEY, _IMAGES, _LABELS, alpha=0.0, num_classes=3),
            ValueError,
            "alpha: expected a finite number > 0, got 0.0",
        ),
        (
            lambda: A.cutmix(_KEY, _IMAGES, _LABELS, alpha=float("inf"), num_classes=3),
            ValueError,
            "alpha: expected a finite number > 0, got inf",
        ),
        (
            lambda: A.mixup(_KEY, _IMAGES, [0, 1, 2, 1], num_classes=3),  # the values as a shape
            TypeError,
            "labels: expected an array (4,) or (4, K), got list",
        ),
        (
            lambda: A.cutmix(_KEY, [[0.0]], _LABELS, num_classes=3),
            TypeError,
            "images: expected an array (N, H, W, C), got list",
        ),
        (
            lambda: A.apply_batch(A.hflip, _KEY, [[[[0.0]]]]),
            TypeError,
            "images: expected an array (N, H, W, C), got list",
        ),
        (
            lambda: A.pixmix(_KEY, _IMAGE, mixing_images=[[[[0.0]]]]),
            TypeError,
            "mixing_images: expected an array (N, H, W, C), got list",
        ),
        (
            lambda: A.mixup(_KEY, _IMAGES, _LABELS, num_classes=0),
            ValueError,
            "num_classes: expected a positive int, got 0",
        ),
        (
            lambda: A.mixup(_KEY, _IMAGES, _LABELS, num_classes=2),
            ValueError,
            "labels: expected classes in [0, 2) (num_classes=2), got [2] at positions [2]",
        ),
        (
            lambda: A.cutmix(_KEY, _IMAGES, _LABELS - 1, num_classes=3),
            ValueError,
            "labels: expected classes in [0, 3) (num_classes=3), got [-1] at positions [0]",
        ),
        (
            lambda: A.mixup(_KEY, _IMAGES, jnp.zeros((4, 3)), num_classes=5),
            ValueError,
            "num_classes: 5 differs from the soft labels' 3 classes",
        ),
        (
            lambda: A.mixup(_KEY, _IMAGES, _LABELS.astype(jnp.float32), num_classes=3),
            TypeError,
            "labels: expected integer class labels (N,), got dtype float32",
        ),
    ],
)
def test_every_probability_range_and_label_is_checked(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


@pytest.mark.parametrize(
    "op",
    [
        A.random_hflip,
        A.random_vflip,
        A.random_crop,
        functools.partial(A.random_translate, max_shift=1),
        functools.partial(A.random_rotate, degrees=10),
        functools.partial(A.random_resized_crop, size=4),
        functools.partial(A.cutout, size=2),
        functools.partial(A.color_jitter, brightness=0.5),
        A.pixmix,
        A.rand_augment,
        A.trivial_augment,
        A.compose(A.random_hflip),
        A.random_apply(A.random_hflip, 0.5),
        lambda key, image: A.pattern(key, image.shape),
        lambda key, image: A.mixup(key, _IMAGES, _LABELS, num_classes=3),
        lambda key, image: A.cutmix(key, _IMAGES, _LABELS, num_classes=3),
    ],
)
def test_a_seed_or_other_non_key_is_named(op):
    for key in (0, 1.5, jnp.array([1.0, 2.0])):
        with pytest.raises(TypeError, match=r"key: expected a jax.random key"):
            op(key, _IMAGE)
    raw = jax.random.PRNGKey(0)  # raw uint32 keys still work, under vmap too
    # traced and lowered, not compiled: the key is checked while tracing, and compiling the 16
    # ops (RandAugment's every op among them) was most of this test's time
    lowered = jax.jit(jax.vmap(op)).lower(jnp.stack([raw, raw]), jnp.stack([_IMAGE, _IMAGE]))
    assert lowered.out_info is not None


def test_posterize_accepts_numpy_ints_and_clips_traced_bits():
    image = jnp.array([[[255, 100, 7]]], jnp.uint8)
    want = A.posterize(image, 3).tolist()
    assert A.posterize(image, np.int64(3)).tolist() == want == [[[224, 96, 0]]]
    assert jax.jit(A.posterize)(image, 3).tolist() == want
    assert jax.jit(A.posterize)(image, 12).tolist() == A.posterize(image, 8).tolist()


@pytest.mark.parametrize("mix", [A.mixup, A.cutmix])
def test_traced_labels_outside_num_classes_give_nan_not_zero_targets(mix):
    labels = jnp.array([0, 1, 5, 1], jnp.int32)
    mixed = jax.jit(functools.partial(mix, num_classes=3))
    _, soft = mixed(_KEY, _IMAGES, labels)
    assert np.isnan(np.asarray(soft)).any()  # the loss, and the run's NaN stop, see it
    _, soft = mixed(_KEY, _IMAGES, _LABELS)  # in range: as eagerly, rows summing to 1
    np.testing.assert_allclose(soft, mix(_KEY, _IMAGES, _LABELS, num_classes=3)[1], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(soft).sum(axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize(
    ("shape", "error"),
    [
        ((8, 8), TypeError),  # was "not enough values to unpack"
        (8, TypeError),  # was "cannot unpack non-iterable int object"
        ((8.0, 8, 3), TypeError),  # was a raw error from inside jax.random
        ((True, 8, 3), TypeError),
        ((-8, 8, 3), ValueError),  # was NumPy's "Number of samples, -8, must be non-negative"
        ((0, 8, 3), ValueError),  # was an empty (0, 8, 3) picture, silently
        ((8, 8, 0), ValueError),
    ],
)
def test_pattern_checks_its_shape(shape, error):
    with pytest.raises(error, match="shape: expected"):
        A.pattern(jax.random.key(0), shape)


def test_pattern_accepts_numpy_sizes():
    key = jax.random.key(0)
    expected = A.pattern(key, (6, 5, 3))
    for shape in ([np.int64(6), 5, np.int32(3)], np.array([6, 5, 3])):
        np.testing.assert_array_equal(A.pattern(key, shape), expected)


@pytest.mark.parametrize("scalar", [np.array, jnp.int32])
def test_crop_sizes_take_0d_integer_arrays_as_padding_does(scalar):
    # a 0-d array has __len__, and len() of it was a raw "len() of unsized object"
    image = jnp.arange(8 * 8 * 3, dtype=jnp.float32).reshape(8, 8, 3)
    np.testing.assert_array_equal(
        A.random_crop(_KEY, image, size=scalar(5), padding=scalar(2)),
        A.random_crop(_KEY, image, size=5, padding=2),
    )
    np.testing.assert_array_equal(
        A.random_resized_crop(_KEY, image, size=scalar(5)),
        A.random_resized_crop(_KEY, image, size=5),
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda: A.random_crop(_KEY, _IMAGE, size=jnp.float32(5)),
            "size: expected a positive int or (height, width), got Array(5., dtype=float32)",
        ),
        (
            lambda: A.random_resized_crop(_KEY, _IMAGE, size=4, scale=np.float64(0.5)),
            "scale: expected a (low, high) pair of numbers, got np.float64(0.5)",
        ),
        (
            lambda: A.random_resized_crop(_KEY, _IMAGE, size=4, ratio=jnp.float32(1)),
            "ratio: expected a (low, high) pair of numbers, got Array(1., dtype=float32)",
        ),
    ],
)
def test_a_0d_array_where_a_pair_goes_is_named(call, message):
    with pytest.raises(TypeError, match=re.escape(message)):
        call()


def test_affine_with_a_traced_matrix_is_not_checked_for_finiteness():
    image = jnp.arange(48.0).reshape(4, 4, 3) / 48
    identity = jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    np.testing.assert_array_equal(jax.jit(A.affine)(image, identity), image)
    matrices = jnp.stack([identity, identity.at[0, 2].set(jnp.nan)])
    out = jax.vmap(A.affine, in_axes=(None, 0))(image, matrices)
    np.testing.assert_array_equal(out[0], image)
    assert out.shape == (2, 4, 4, 3)


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        (jnp.zeros((4, 4)), ValueError, r"image: expected rank 3 \(H, W, C\)"),
        (jnp.zeros((4, 4, 3), jnp.int32), TypeError, "image: expected uint8 or floating"),
        ("image", TypeError, r"image: expected an array \(H, W, C\), got str"),
    ],
)
@pytest.mark.parametrize("strengths", [{}, {"brightness": 0.4}])
def test_color_jitter_checks_the_image_whatever_its_strengths(image, error, message, strengths):
    # with every strength 0 (the defaults) any value came back unchanged and unchecked
    with pytest.raises(error, match=message):
        A.color_jitter(_KEY, image, **strengths)


@pytest.mark.parametrize(
    "call",
    [
        lambda images: A.mixup(_KEY, images, _LABELS, num_classes=3),
        lambda images: A.cutmix(_KEY, images, _LABELS, num_classes=3),
        lambda images: A.apply_batch(A.random_hflip, _KEY, images),
    ],
)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_])
def test_batch_ops_take_the_image_dtypes_of_the_per_example_ops(call, dtype):
    # mixup and cutmix mixed int32 or bool batches, which every per-example op refuses (an image
    # is uint8 in 0..255 or floating in [0, 1]), and apply_batch named the image, not the images
    with pytest.raises(TypeError, match="images: expected uint8 or floating dtype, got"):
        call(_IMAGES.astype(dtype))


@pytest.mark.parametrize(
    ("image", "mixing", "message"),
    [
        (_IMAGE, _IMAGES, r"\(uint8, 0..255, as its uint8\), got dtype float32"),
        (_IMAGES[0], _IMAGE[None], r"\(floating, \[0, 1\], as its float32\), got dtype uint8"),
    ],
)
def test_pixmix_mixing_images_must_be_in_the_image_units(image, mixing, message):
    # float mixing images in [0, 1] were divided by 255 for a uint8 image (near-black partners),
    # uint8 ones in 0..255 taken as floats for a float image (clipped to white), silently
    with pytest.raises(TypeError, match=f"mixing_images: expected the image's units {message}"):
        A.pixmix(_KEY, image, mixing_images=mixing)
    with pytest.raises(ValueError, match=r"mixing_images: expected rank 4 \(N, H, W, C\)"):
        A.pixmix(_KEY, image, mixing_images=mixing[0])
    assert A.pixmix(_KEY, image, mixing_images=image[None]).dtype == image.dtype


@pytest.mark.parametrize("shape", [(0, 4, 3), (4, 0, 3), (0, 0, 1)])
@pytest.mark.parametrize(
    "call",
    [
        lambda image: A.random_resized_crop(_KEY, image, size=2),
        lambda image: A.autocontrast(image),
        lambda image: A.rand_augment(_KEY, image),
        lambda image: A.random_crop(_KEY, image, padding=1, pad_mode="reflect"),
        lambda image: A.cutmix(_KEY, jnp.stack([image] * 4), _LABELS, num_classes=3),
        lambda image: A.apply_batch(A.random_hflip, _KEY, image[None]),
    ],
)
def test_an_image_without_pixels_is_named(shape, call):
    # random_resized_crop failed inside a gather, autocontrast inside a min reduction, and cutmix
    # divided by the zero area: labels of NaN
    with pytest.raises(ValueError, match=r"images?: expected .*at least 1 x 1 pixels, got shape"):
        call(jnp.zeros(shape, jnp.uint8))


def test_float64_images_under_x64_are_augmented_in_float64():
    # every op computed in float32 (its sampling grid, matrix, blend and threshold too) and cast
    # the result back: float64 output holding float32-rounded values
    rng = np.random.default_rng(0)
    image = 0.1 + 0.8 * rng.uniform(size=(5, 7, 3))
    image[0, 0] = 0.3 + np.array([0.0, 1e-12, -1e-12])  # apart only in float64
    with jax.enable_x64(True):
        x = jnp.asarray(image)
        brightened = A.adjust_brightness(x, 1.3)
        shifted = A.translate(x, 0.0, 0.25)
        solarized = A.solarize(x, 0.3 + 5e-13)
        cut = A.cutout(jax.random.key(0), x, size=3, fill=0.1)
        others = [
            A.rotate(x, 30.0),
            A.affine(x, np.array([[0.9, 0.1, 0.3], [-0.2, 1.1, 0.25]])),
            A.random_resized_crop(jax.random.key(1), x, size=4),
            A.autocontrast(x),
            A.posterize(x, 3),
            A.adjust_contrast(x, 0.7),
            A.adjust_saturation(x, 0.6),
            A.adjust_sharpness(x, 1.7),
        ]
    for out in (brightened, shifted, solarized, cut, *others):
        assert out.dtype == np.float64
    np.testing.assert_allclose(brightened, np.clip(1.3 * image, 0, 1), rtol=0, atol=1e-15)
    left = np.pad(image, ((0, 0), (1, 0), (0, 0)))[:, :-1]  # a quarter pixel right, 0 fill
    np.testing.assert_allclose(shifted, 0.75 * image + 0.25 * left, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(solarized, np.where(image >= 0.3 + 5e-13, 1 - image, image))
    assert (np.asarray(solarized[0, 0]) != image[0, 0]).tolist() == [False, True, False]
    erased = np.asarray(cut) != image
    assert erased.any() and (np.asarray(cut)[erased] == 0.1).all()


def test_numpy_images_as_data_load_returns_them_work_in_every_op(rng):
    # adjust_sharpness called .at on a NumPy image; the bilinear ops indexed it by traced
    # positions under jit/vmap (TracerArrayConversionError)
    image = rng.integers(0, 256, (9, 10, 3)).astype(np.uint8)
    as_jax = jnp.asarray(image)
    np.testing.assert_array_equal(A.adjust_sharpness(image, 1.5), A.adjust_sharpness(as_jax, 1.5))
    keys = jax.random.split(jax.random.key(0), 3)
    ops = {
        "rotate": lambda k, x: A.rotate(x, jax.random.uniform(k, (), minval=-40, maxval=40)),
        "adjust_sharpness": lambda k, x: A.adjust_sharpness(x, jax.random.uniform(k, ())),
        "random_resized_crop": functools.partial(A.random_resized_crop, size=5),
    }
    for name, op in ops.items():
        both = jax.jit(jax.vmap(lambda k, op=op: (op(k, image), op(k, as_jax))))
        ours, expected = both(keys)
        np.testing.assert_array_equal(ours, expected, err_msg=name)


@pytest.mark.parametrize(
    "op",
    [
        lambda key, x: A.autocontrast(x),
        lambda key, x: A.equalize(x),
        lambda key, x: A.rotate(x, 30.0),
        lambda key, x: A.trivial_augment(key, x),
        lambda key, x: A.rand_augment(key, x),
        lambda key, x: A.pixmix(key, x, k=1),
    ],
    ids=["autocontrast", "equalize", "rotate", "trivial_augment", "rand_augment", "pixmix"],
)
def test_a_numpy_float64_image_is_computed_in_float32_without_x64_and_no_warning(rng, op):
    # images / 255.0 in NumPy is float64: ops asked JAX for float64, which it cannot hold without
    # jax_enable_x64 ("Explicitly requested dtype float64 ... truncated" at every call)
    image = rng.random((8, 9, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = op(jax.random.key(0), image)
    assert out.dtype == jnp.float32
    np.testing.assert_array_equal(out, op(jax.random.key(0), image.astype(np.float32)))


def test_numpy_batches_and_mixing_images_under_jit_and_vmap(rng):
    # mixup, cutmix and pixmix's mixing_images indexed a NumPy array by a traced permutation or
    # index (TracerArrayConversionError) when the key was traced and the arrays were not
    images = rng.integers(0, 256, (6, 5, 4, 3)).astype(np.uint8)
    labels = np.arange(6, dtype=np.int32)  # soft label j of example i: the weight of image j
    mixup, cutmix, mixed = jax.jit(
        lambda k: (
            A.mixup(k, images, labels, num_classes=6),
            A.cutmix(k, images, labels, num_classes=6),
            A.pixmix(k, images[0], k=1, mixing_images=images),
        )
    )(jax.random.key(2))
    flat = images.reshape(6, -1).astype(np.float64)
    np.testing.assert_allclose(
        np.asarray(mixup[0]).reshape(6, -1), np.asarray(mixup[1]) @ flat, rtol=1e-5
    )
    weights = np.asarray(cutmix[1])
    for i, (image, row) in enumerate(zip(np.asarray(cutmix[0]), weights, strict=True)):
        sources = np.flatnonzero(row)
        pasted = np.isin(np.arange(6), sources) & (np.arange(6) != i)
        partner = images[np.flatnonzero(pasted)[0]] if pasted.any() else images[i]
        from_partner = (image == partner).all(-1) & (image != images[i]).any(-1)
        assert ((image == images[i]).all(-1) | (image == partner).all(-1)).all()
        assert from_partner.mean() <= 1 - row[i] + 1e-6
    assert mixed.shape == images[0].shape and mixed.dtype == np.uint8


@pytest.mark.parametrize(
    "call",
    [
        lambda image: A.rotate(image, 30.0),
        lambda image: A.translate(image, 1.0, 2.0),
        lambda image: A.random_rotate(jax.random.key(0), image, degrees=10),
    ],
)
def test_rotate_and_translate_name_an_image_that_is_not_an_array(call):
    # they read image.dtype first: AttributeError: 'list' object has no attribute 'dtype'
    with pytest.raises(TypeError, match=r"image: expected an array \(H, W, C\), got list"):
        call([[[0.0]]])


def test_pixmix_multiplies_by_a_black_partner_as_the_reference():
    # PixMix's multiply: (2u)^a (2v)^b / 2 with only the partner clipped, at 1e-37 (the reference
    # code's img2.clip(1e-37)): a black partner pixel darkens the image to about 0 where b > 0.
    # jcnn clipped both at 1e-6, so a black partner only scaled a pixel by 1e-6^b (0.5 at b = 0.05).
    # Image 0.5, partner 0, k = 1: one round with probability 1/2, multiplicative and
    # interpolating (b ~ Beta(1, 3)) each 1/2; 0.5 * 1e-37^b < 0.01 where b > log10(50) / 37.
    n = 4000
    keys = jax.random.split(jax.random.key(0), n)
    image = jnp.full((2, 2, 1), 0.5, jnp.float32)
    black = jnp.zeros((1, 2, 2, 1), jnp.float32)
    out = jax.jit(jax.vmap(lambda k: A.pixmix(k, image, k=1, beta=3.0, mixing_images=black)))(keys)
    dark = int((np.asarray(out)[:, 0, 0, 0] < 0.01).sum())
    expected = (1 - math.log10(50) / 37) ** 3 / 8
    assert stats.binomtest(dark, n, expected).pvalue > P_MIN, (dark / n, expected)


def test_pixmix_mixes_one_mixing_picture_per_image_as_the_paper():
    # PixMix (Algorithm 1 and the reference code) takes one mixing picture per image and mixes it
    # in at every round that does not mix in augment(image); jcnn drew a new one each round.
    # Image 0.5 and mixing picture m: 1.0 in channel m, 0.5 elsewhere. A round with a 0.5
    # partner leaves a 0.5 value exactly (additive: (a 0 + b 0 + 1) / 2; multiplicative:
    # 1^a 1^b / 2), so only the channel of the image's one picture may change.
    count = 6
    mixing = jnp.full((count, 2, 2, count), 0.5, jnp.float32)
    mixing = mixing.at[jnp.arange(count), :, :, jnp.arange(count)].set(1.0)
    image = jnp.full((2, 2, count), 0.5, jnp.float32)
    keys = jax.random.split(jax.random.key(0), 3000)
    out = jax.jit(jax.vmap(lambda k: A.pixmix(k, image, k=4, mixing_images=mixing)))(keys)
    changed = np.asarray(out)[:, 0, 0, :] != 0.5
    assert changed.sum(axis=1).max() == 1
    picked = changed[changed.any(axis=1)].argmax(axis=1)
    assert len(picked) > 1500  # at least one round: 4/5
    assert stats.chisquare(np.bincount(picked, minlength=count)).pvalue > P_MIN


def test_pixmix_has_finite_gradients_at_black_image_pixels():
    # the multiply's (2u)^a has an infinite derivative at u = 0 for a < 1: a black pixel of the
    # image gave NaN gradients (0 * inf), also where the round was additive (jnp.where's branch)
    rng = np.random.default_rng(0)
    image = jnp.asarray(rng.uniform(size=(4, 4, 3)), jnp.float32).at[:2].set(0.0)
    mixing = jnp.asarray(rng.uniform(size=(2, 4, 4, 3)), jnp.float32)

    def total(x, seed, given):
        return A.pixmix(jax.random.key(seed), x, k=4, mixing_images=given).sum()

    for seed in range(8):
        for given in (None, mixing):
            grad = jax.grad(total)(image, seed, given)
            assert np.isfinite(np.asarray(grad)).all(), seed


@pytest.mark.parametrize(
    "op, got",
    [
        (functools.partial(A.random_resized_crop, size=(8, 1)), "shape (8, 1, 3) uint8"),
        (functools.partial(A.random_crop, size=4), "shape (4, 4, 3) uint8"),
        (lambda key, image: image.astype(jnp.float32) / 255, "shape (8, 8, 3) float32"),
    ],
)
def test_random_apply_refuses_an_op_changing_shape_or_dtype(op, got):
    # either the image or op's result comes back: a (8, 1, 3) result was broadcast to (8, 8, 3),
    # a float one in [0, 1] mixed with the unchanged image's 0..255 values
    image = jnp.zeros((8, 8, 3), jnp.uint8)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "op: expected an op keeping the image's shape and dtype (random_apply returns "
            f"either), got {got} for an image of shape (8, 8, 3) uint8"
        ),
    ):
        A.random_apply(op, 0.5)(jax.random.key(0), image)


def test_random_apply_keeps_a_numpy_float64_image_op_computed_in_float32():
    image = np.random.default_rng(0).random((5, 5, 1))  # float64; float32 out without x64
    out = A.random_apply(A.random_hflip, 1.0)(jax.random.key(1), image)
    assert out.dtype == jax.dtypes.canonicalize_dtype(np.float64)


@pytest.mark.parametrize(
    "size, message",
    [
        (2**30, r"size: the resized crop would have shape \(1073741824, 1073741824, 3\)"),
        ((1, 2**31), r"size: expected sides < 2\*\*31, got \(1, 2147483648\)"),
        (2**63, r"size: expected sides < 2\*\*31"),
    ],
)
def test_random_resized_crop_output_too_large_is_named(size, message):
    # 2**31 failed inside JAX parsing a jitted argument, 2**63 inside MLIR's shape parsing, and
    # 2**62 aborted the process (an XLA "overflow in static extent product")
    with pytest.raises(ValueError, match=message):
        A.random_resized_crop(_KEY, jnp.zeros((8, 8, 3), jnp.uint8), size=size)
