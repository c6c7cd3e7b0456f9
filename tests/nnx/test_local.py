"""jcnn.nnx.LocallyConnected: its arguments' checks (the Linen parity is in test_convert.py)."""

import jax.numpy as jnp
import pytest
from flax import nnx

from jcnn import nnx as jnnx


@pytest.mark.parametrize(
    ("kernel_size", "input_size", "message"),
    [
        (3, (6, 6, 6, 6), r"input_size: expected 1, 2 or 3 spatial sizes, got \(6, 6, 6, 6\)"),
        ((3,), (6, 6), r"input_size: \(6, 6\) has 2 spatial sizes, but kernel_size \(3,\) has 1"),
        ((3, 3, 3), [6, 6], r"input_size: \[6, 6\] has 2 spatial sizes, but kernel_size"),
    ],
)
def test_an_input_size_of_the_wrong_rank_is_blamed_on_input_size(kernel_size, input_size, message):
    # these were blamed on spatial_dims, which LocallyConnected does not take
    with pytest.raises(ValueError, match=message):
        jnnx.LocallyConnected(3, 2, kernel_size, input_size=input_size, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    ("kernel_size", "input_size", "shape"),
    [(3, (6, 5), (4, 3, 3, 3, 3, 2)), ((3,), 6, (4, 3, 3, 2)), (2, (4,), (3, 2, 3, 2))],
)
def test_the_spatial_rank_comes_from_input_size_or_kernel_size(kernel_size, input_size, shape):
    layer = jnnx.LocallyConnected(3, 2, kernel_size, input_size=input_size, rngs=nnx.Rngs(0))
    assert layer.kernel.shape == shape


def test_dtype_sets_the_computation_dtype():
    """As the Linen twin: bfloat16 activations stay bfloat16 with dtype=jnp.bfloat16."""
    x = jnp.ones((2, 5, 5, 3), jnp.bfloat16)

    def make(**kw):
        return jnnx.LocallyConnected(3, 4, 3, input_size=(5, 5), rngs=nnx.Rngs(0), **kw)

    assert make()(x).dtype == jnp.float32
    assert make(dtype=jnp.bfloat16)(x).dtype == jnp.bfloat16
    with pytest.raises(TypeError, match="^dtype: expected None or a floating dtype"):
        make(dtype=jnp.int32)(x)


def test_a_window_larger_than_the_input_is_named_kernel_size():
    # it was named `window`, F.locally_connected_output_shape's argument
    with pytest.raises(ValueError, match=r"^kernel_size: the dilated window 9 \(kernel 9, dil"):
        jnnx.LocallyConnected(3, 4, 9, input_size=(5, 5), rngs=nnx.Rngs(0))


def test_a_non_floating_compute_dtype_is_refused_at_construction():
    # it was accepted until the first call
    with pytest.raises(TypeError, match="^dtype: expected None or a floating dtype"):
        jnnx.LocallyConnected(3, 4, 3, input_size=(5, 5), dtype=jnp.int32, rngs=nnx.Rngs(0))
