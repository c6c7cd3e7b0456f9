"""split_validation / validation_size: deterministic, disjoint, covering; bad sizes named."""

import jax.numpy as jnp
import numpy as np
import pytest

from jcnn.train.splits import split_validation, validation_size


@pytest.mark.parametrize(
    "split, n, expected",
    [
        (1, 10, 1),
        (9, 10, 9),
        (0.1, 512, 51),
        (0.5, 7, 4),
        (0.001, 100, 1),
        (np.int64(3), 5, 3),
        (np.array(8), 10, 8),
        (jnp.array(3), 5, 3),
        (np.float32(0.5), 7, 4),
        (jnp.array(0.1), 512, 51),
    ],
)
def test_validation_size(split, n, expected):
    assert validation_size(split, n) == expected


@pytest.mark.parametrize(
    "split, error, pattern",
    [
        (10, ValueError, "asks for 10 validation examples, but the training set has only 10"),
        (0.9999, ValueError, "asks for 10 validation examples"),
        (0, ValueError, "expected a count >= 1"),
        (-2, ValueError, "expected a count >= 1"),
        (1.0, ValueError, r"fraction in \(0, 1\)"),
        (2.5, ValueError, r"fraction in \(0, 1\)"),
        (float("nan"), ValueError, r"fraction in \(0, 1\)"),
        (True, TypeError, "expected a count"),
        ("0.1", TypeError, "expected a count"),
        (np.array([3]), TypeError, "expected a count"),
        (jnp.array(True), TypeError, "expected a count"),
    ],
)
def test_bad_validation_sizes(split, error, pattern):
    with pytest.raises(error, match=pattern):
        validation_size(split, 10)


def test_split_is_a_seeded_partition_keeping_order(rng):
    n = int(rng.integers(20, 60))
    images = rng.normal(size=(n, 3, 3, 1))
    labels = np.arange(n)
    (train_x, train_y), (val_x, val_y) = split_validation(images, labels, 0.25, seed=3)
    assert len(val_y) == round(0.25 * n) and len(train_y) == n - len(val_y)
    assert sorted(np.concatenate([train_y, val_y]).tolist()) == list(range(n))
    assert np.all(np.diff(train_y) > 0) and np.all(np.diff(val_y) > 0)
    np.testing.assert_array_equal(train_x, images[train_y])
    np.testing.assert_array_equal(val_x, images[val_y])
    (_, again), (_, _) = split_validation(images, labels, 0.25, seed=3)
    np.testing.assert_array_equal(again, train_y)
    (_, _), (_, other) = split_validation(images, labels, 0.25, seed=4)
    assert not np.array_equal(other, val_y)
    with pytest.raises(ValueError, match="labels: expected"):
        split_validation(images, labels[:-1], 2)


@pytest.mark.parametrize(("seed", "error"), [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_a_bad_seed_names_seed(seed, error):
    # were NumPy's "expected non-negative integer" / "SeedSequence expects int" from inside
    x, y = np.arange(10).reshape(10, 1), np.arange(10)
    with pytest.raises(error, match="seed: expected an int >= 0"):
        split_validation(x, y, 3, seed=seed)


def test_a_numpy_seed_is_the_same_seed():
    x, y = np.arange(10).reshape(10, 1), np.arange(10)
    (_, a), _ = split_validation(x, y, 3, seed=np.int64(4))
    (_, b), _ = split_validation(x, y, 3, seed=4)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "images, labels, name, shown",
    [
        ([[1], [2], [3]], np.arange(3), "images", "list"),
        (np.zeros((3, 1)), [0, 1, 2], "labels", "list"),
        (np.zeros((3, 1)), np.int32(1), "labels", "1"),
        (np.float32(0), np.arange(3), "images", "0.0"),
    ],
)
def test_images_and_labels_must_be_arrays_with_an_example_axis(images, labels, name, shown):
    # were AttributeError ('list' has no attribute 'shape') or IndexError from inside
    with pytest.raises(
        TypeError,
        match=rf"{name}: expected an array with a leading example axis \(N, ...\), got .*{shown}",
    ):
        split_validation(images, labels, 1)
