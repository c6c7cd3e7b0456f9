"""jcnn.nnx pooling modules: their settings are checked at construction (the ops themselves are
tested in tests/functional/test_pool.py, the Linen parity in test_convert.py)."""

import jax.numpy as jnp
import pytest

from jcnn import nnx as jnnx


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda: jnnx.MaxPool(0), ValueError, "window: every entry must be >= 1"),
        (lambda: jnnx.MaxPool(2, stride=0), ValueError, "stride: every entry must be >= 1"),
        (lambda: jnnx.MaxPool(2, padding=2), ValueError, "padding: expected at most half"),
        (lambda: jnnx.MaxPool(2, ceil_mode="x"), TypeError, "ceil_mode: expected a Python"),
        (lambda: jnnx.MaxPool(2, dilation=0), ValueError, "dilation: every entry"),
        (lambda: jnnx.MaxPool((2, 2), stride=(1, 1, 1)), ValueError, "stride: expected an int"),
        (lambda: jnnx.AvgPool("a"), TypeError, "window: expected an int"),
        (lambda: jnnx.AvgPool(2, count_include_pad=1), TypeError, "count_include_pad: "),
        (lambda: jnnx.AvgPool(3, padding="FULL"), ValueError, "padding: expected 'SAME'"),
        (lambda: jnnx.LPPool(2, 0), ValueError, "window: every entry must be >= 1"),
        (lambda: jnnx.LPPool(2, 2, stride=-1), ValueError, "stride: every entry"),
        (lambda: jnnx.AdaptiveAvgPool(0), ValueError, "output_size: expected positive ints"),
        (lambda: jnnx.AdaptiveMaxPool((2, -1)), ValueError, "output_size: expected positive"),
    ],
)
def test_every_setting_is_checked_at_construction(build, error, message):
    # these were accepted until the first call
    with pytest.raises(error, match=f"^{message}"):
        build()


@pytest.mark.parametrize(
    ("build", "shape", "out"),
    [
        (lambda: jnnx.MaxPool(3, 2, 1, ceil_mode=True), (1, 6, 6, 2), (1, 4, 4, 2)),
        (lambda: jnnx.MaxPool((3, 3, 3), dilation=2, padding=1), (1, 7, 7, 7, 1), (1, 2, 2, 2, 1)),
        (lambda: jnnx.MaxPool(2, stride=(1, 2, 1)), (1, 4, 4, 4, 1), (1, 3, 2, 3, 1)),
        (lambda: jnnx.AvgPool(2, padding="SAME"), (1, 5, 5, 1), (1, 3, 3, 1)),
        (lambda: jnnx.AvgPool(3, 1, ((1, 1), (0, 1)), ceil_mode=True), (1, 4, 4, 1), (1, 4, 3, 1)),
        (lambda: jnnx.LPPool(2.0, (2, 3), 1), (1, 4, 4, 1), (1, 3, 2, 1)),
        (lambda: jnnx.AdaptiveAvgPool((7, None)), (1, 3, 5, 1), (1, 7, 5, 1)),
        (lambda: jnnx.AdaptiveMaxPool(1), (1, 3, 5, 1), (1, 1, 1, 1)),
    ],
)
def test_the_construction_checks_accept_any_valid_setting(build, shape, out):
    assert build()(jnp.ones(shape)).shape == out
