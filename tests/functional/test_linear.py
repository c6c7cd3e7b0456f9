"""jcnn.functional.linear against torch.nn.functional.linear: values and gradients for any
leading axes, with and without bias; bad shapes named."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import functional as F


@pytest.mark.parametrize("leading", [(), (1,), (5,), (3, 4), (2, 3, 5), (2, 1, 3, 2), (0, 3)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_matches_torch_in_value_and_gradients(leading, use_bias, rng):
    torch = pytest.importorskip("torch")
    in_features, features = rng.integers(1, 9, size=2)
    x = rng.standard_normal((*leading, in_features)).astype(np.float32)
    kernel = rng.standard_normal((in_features, features)).astype(np.float32)
    bias = rng.standard_normal(features).astype(np.float32) if use_bias else None
    cotangent = rng.standard_normal((*leading, features)).astype(np.float32)

    arrays = [x, kernel] + ([bias] if use_bias else [])
    y, vjp = jax.vjp(F.linear, *map(jnp.asarray, arrays))
    grads = vjp(jnp.asarray(cotangent))

    tensors = [torch.tensor(a, requires_grad=True) for a in arrays]
    expected = torch.nn.functional.linear(tensors[0], tensors[1].T, *tensors[2:])
    expected.backward(torch.tensor(cotangent))
    assert y.shape == (*leading, features)
    np.testing.assert_allclose(y, expected.detach().numpy(), rtol=1e-5, atol=1e-5)
    for got, tensor in zip(grads, tensors, strict=True):
        np.testing.assert_allclose(got, tensor.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_linear_under_jit_and_vmap_equals_a_loop(rng):
    x = jnp.asarray(rng.standard_normal((4, 3, 2, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(5), jnp.float32)
    batched = jax.jit(jax.vmap(F.linear, in_axes=(0, None, None)))(x, kernel, bias)
    looped = np.stack([np.asarray(x[i]) @ np.asarray(kernel) + np.asarray(bias) for i in range(4)])
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-5)


def test_linear_keeps_bfloat16():
    x = jnp.ones((2, 3, 4), jnp.bfloat16)
    assert F.linear(x, jnp.ones((4, 2), jnp.bfloat16), jnp.ones(2, jnp.bfloat16)).dtype == (
        jnp.bfloat16
    )


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: F.linear(jnp.ones((2, 3)), jnp.ones((4, 5))),
            ValueError,
            r"in_features = 4 .*got shape \(2, 3\)",
        ),
        (
            lambda: F.linear(jnp.ones(()), jnp.ones((1, 5))),
            ValueError,
            r"x: expected shape \(\.\.\., in_features\)",
        ),
        (lambda: F.linear(jnp.ones((2, 3)), jnp.ones(3)), ValueError, "kernel: expected rank 2"),
        (
            lambda: F.linear(jnp.ones((2, 3)), jnp.ones((3, 5)), jnp.ones(4)),
            ValueError,
            r"bias: expected shape \(5,\), got \(4,\)",
        ),
        (
            lambda: F.linear(jnp.ones((2, 3)), jnp.ones((3, 5)), jnp.ones((1, 5))),
            ValueError,
            r"bias: expected shape \(5,\), got \(1, 5\)",
        ),
        (
            lambda: F.linear(jnp.arange(3), jnp.ones((3, 5))),
            TypeError,
            "x: expected a floating-point array",
        ),
        (lambda: F.linear(jnp.ones((2, 3)), [[1.0]]), TypeError, "kernel: expected an array"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_bias_gradient_accumulates_in_float32(dtype, rng):
    # the bias's gradient sums the cotangent over 64 x 16 x 16 rows: summed in bfloat16 it came
    # out 86% short (float16: 18%); PyTorch accumulates in float32
    x = jnp.asarray(rng.standard_normal((64, 16, 16, 2)), dtype)
    kernel, bias = jnp.ones((2, 2), dtype), jnp.zeros(2, dtype)
    cotangent = jnp.asarray(rng.standard_normal((64, 16, 16, 2)) + 1.0, dtype)
    y, vjp = jax.vjp(lambda bias: F.linear(x, kernel, bias), bias)
    (grad,) = vjp(cotangent)
    assert y.dtype == grad.dtype == dtype
    expected = np.asarray(cotangent, np.float64).sum(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(grad, np.float64), expected, rtol=1e-2)
    # a wider bias promotes the result as the plain sum does
    assert F.linear(x, kernel, bias.astype(jnp.float32)).dtype == jnp.float32


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_output_with_bias_is_the_float32_result_rounded_once(dtype, rng):
    # The product was rounded to bfloat16 before the bias was added: where the bias cancels it,
    # up to 30% off, and a fifth of the outputs were not the float32 result rounded.
    x = jnp.asarray(rng.standard_normal((4, 6, 6, 8)), dtype)
    kernel = jnp.asarray(rng.standard_normal((8, 5)), dtype)
    bias = jnp.asarray(5 * rng.standard_normal(5), dtype)
    y = F.linear(x, kernel, bias)
    expected = F.linear(*(v.astype(jnp.float32) for v in (x, kernel, bias))).astype(dtype)
    assert y.dtype == dtype
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(expected, np.float32))
