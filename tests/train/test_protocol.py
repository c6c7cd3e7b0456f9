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
