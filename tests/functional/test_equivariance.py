"""The invariance and equivariance properties of lectures 003-004, as tests of F.conv and the
pools (the experiment experiments/invariance.py measures the same errors as curves)."""

import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import functional as F


def shift(x, dy, dx):
    return jnp.roll(x, (dy, dx), axis=(1, 2))


@pytest.mark.parametrize("window", [(3, 3), (5, 2), (1, 4)])
def test_conv_with_circular_padding_is_exactly_translation_equivariant(rng, window):
    x = jnp.asarray(rng.normal(size=(2, 9, 11, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*window, 3, 4)), jnp.float32)
    pads = tuple(((k - 1) // 2, k - 1 - (k - 1) // 2) for k in window)
    conv = lambda v: F.conv(v, w, padding=pads, padding_mode="circular")  # noqa: E731
    for dy, dx in [(1, 0), (0, 3), (4, 7), (-2, 5)]:
        np.testing.assert_allclose(
            conv(shift(x, dy, dx)), shift(conv(x), dy, dx), rtol=1e-5, atol=1e-5
        )


def test_zero_padding_breaks_equivariance_only_near_the_border(rng):
    x = jnp.asarray(rng.normal(size=(2, 12, 12, 2)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 2, 3)), jnp.float32)
    conv = lambda v: F.conv(v, w, padding=1)  # noqa: E731
    s = 2
    shifted, expected = conv(shift(x, s, s)), shift(conv(x), s, s)
    # interior: away from the padded border and the rows/columns wrapped by the roll
    np.testing.assert_allclose(
        shifted[:, s + 1 : -1, s + 1 : -1],
        expected[:, s + 1 : -1, s + 1 : -1],
        rtol=1e-5,
        atol=1e-5,
    )
    border = np.abs(np.asarray(shifted - expected))
    assert border[:, : s + 1].max() > 1e-2 or border[:, -1].max() > 1e-2


def test_max_pool_is_invariant_to_shifts_inside_its_window_not_beyond():
    x = np.zeros((1, 8, 8, 1), np.float32)
    x[0, 2, 2, 0] = 1.0  # one feature inside the window [2, 4) x [2, 4)
    pooled = F.max_pool(jnp.asarray(x), 2)
    np.testing.assert_array_equal(F.max_pool(shift(jnp.asarray(x), 1, 1), 2), pooled)
    moved = F.max_pool(shift(jnp.asarray(x), 2, 0), 2)
    assert not np.array_equal(moved, pooled)  # a shift out of the window moves the output
    np.testing.assert_array_equal(moved, shift(pooled, 1, 0))  # by stride-scaled equivariance


def test_conv_is_not_rotation_equivariant_unless_the_kernel_is_symmetric(rng):
    x = jnp.asarray(rng.normal(size=(1, 10, 10, 2)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 2, 2)), jnp.float32)
    rot = lambda v: jnp.rot90(v, 1, axes=(1, 2))  # noqa: E731
    conv = lambda v, k: F.conv(v, k, padding=1, padding_mode="circular")  # noqa: E731
    error = np.abs(np.asarray(conv(rot(x), w) - rot(conv(x, w)))).max()
    assert error > 0.1
    symmetric = sum(jnp.rot90(w, r, axes=(0, 1)) for r in range(4)) / 4
    np.testing.assert_allclose(
        conv(rot(x), symmetric), rot(conv(x, symmetric)), rtol=1e-5, atol=1e-5
    )
