"""check_train_loader / check_eval_loader: the loader protocol of fit, checked in full."""

import numpy as np
import pytest

from jcnn.data import Loader
from jcnn.train.protocol import check_eval_loader


def test_eval_loader_that_would_not_evaluate_again_or_is_a_pair_of_arrays():
    images, labels = np.zeros((8, 4, 4, 1), np.float32), np.zeros(8, np.int32)
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]
    with pytest.raises(TypeError, match="val_loader: .*one-shot generator"):
        check_eval_loader((b for b in batches), "val_loader", repeated=True)
    with pytest.raises(TypeError, match="val_loader: .*one-shot list_iterator"):
        check_eval_loader(iter(batches), "val_loader", repeated=True)
    with pytest.raises(TypeError, match=r"test_loader: .*a pair of arrays \(8, 4, 4, 1\), \(8,\)"):
        check_eval_loader((images, labels), "test_loader")
    # what evaluates every time, or once
    check_eval_loader(batches, "val_loader", repeated=True)
    check_eval_loader(batches[:1] * 2, "val_loader", repeated=True)  # two batches, not arrays
    check_eval_loader(
        Loader(images, labels, batch_size=4, shuffle=False), "val_loader", repeated=True
    )
    check_eval_loader((b for b in batches), "test_loader")


def test_a_batch_must_be_a_pair_of_arrays():
    from jcnn.train.protocol import check_batch

    x, y = np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int32)
    assert check_batch([x, y], "loader") == (x, y)
    with pytest.raises(
        TypeError,
        match=r"loader: expected each batch to be a pair \(images, labels\) of arrays, got a "
        r"dict with keys \['image', 'label'\]; yield tuples, e.g. "
        r"\(batch\['image'\], batch\['label'\]\)",
    ):
        check_batch({"image": x, "label": y}, "loader")
    with pytest.raises(
        TypeError, match=r"loader: .*got a tuple of 3 \(ndarray, ndarray, ndarray\)"
    ):
        check_batch((x, y, y), "loader")
    with pytest.raises(TypeError, match=r"loader: .*got a tuple of 2 \(ndarray, list\)"):
        check_batch((x, [0, 1]), "loader")
    with pytest.raises(TypeError, match=r"loader: .*of arrays, got a ndarray"):
        check_batch(x, "loader")


@pytest.mark.parametrize(
    "options, says",
    [
        ({}, r"drop_remainder=True that leaves out 2 of its 10 examples \(batch_size 4\)"),
        ({"sampling": "poisson"}, "sampling='poisson'"),
    ],
)
def test_an_eval_loader_that_leaves_out_examples_is_named(options, says):
    # evaluate() averaged over the 8 examples of the two full batches, without a word
    images, labels = np.zeros((10, 4, 4, 1), np.float32), np.zeros(10, np.int32)
    with pytest.raises(
        ValueError,
        match=rf"val_loader: expected a loader yielding each example "
        rf"once, got a Loader with {says}",
    ):
        check_eval_loader(Loader(images, labels, batch_size=4, **options), "val_loader")
    check_eval_loader(Loader(images, labels, batch_size=4, drop_remainder=False), "val_loader")
    check_eval_loader(Loader(images, labels, batch_size=5), "val_loader")  # no remainder


class _Sized:
    def __init__(self, length):
        self.length = length

    def __len__(self):
        return self.length

    def epoch(self, epoch, *, start_step=0):
        return iter(())

    def batch(self, epoch, step):
        return None


@pytest.mark.parametrize(
    "length, error, says",
    [
        (2.5, TypeError, r"an int, got 2\.5 \(float\)"),
        ("3", TypeError, r"an int, got '3' \(str\)"),
        (None, TypeError, r"an int, got None \(NoneType\)"),
        (-1, ValueError, r"an int >= 0, got -1"),
    ],
)
def test_a_length_that_is_not_a_count_of_batches_is_named(length, error, says):
    # Python's len() said only "'float' object cannot be interpreted as an integer"
    from jcnn.train.protocol import check_train_loader

    with pytest.raises(error, match=rf"^train_loader: expected len\(\) .*{says}"):
        check_train_loader(_Sized(length))
    with pytest.raises(error, match=rf"^val_loader: expected len\(\) .*{says}"):
        check_eval_loader(_Sized(length), "val_loader")
    check_train_loader(_Sized(np.int64(3)))


def test_a_batch_with_a_label_count_other_than_its_image_count_is_named():
    from jcnn.train.protocol import check_batch

    x, y = np.zeros((4, 4, 4, 1), np.float32), np.zeros(3, np.int32)
    with pytest.raises(
        ValueError,
        match=r"^val_loader: expected a batch of images \(N, \.\.\.\) with one label each, .*got "
        r"images \(4, 4, 4, 1\) and labels \(3,\)",
    ):
        check_batch((x, y), "val_loader")
    with pytest.raises(ValueError, match=r"got images \(\) and labels \(\)"):
        check_batch((np.float32(1.0), np.int32(0)), "loader")
