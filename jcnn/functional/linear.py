"""Fully-connected map of the last axis: ``linear``."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jcnn.functional._checks import add_bias, check_array, float32_or_wider

__all__ = ["linear"]


def linear(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``x @ kernel + bias`` over the last axis of ``x``, any leading axes kept.

    ``kernel`` is ``(in_features, features)``, PyTorch's ``Linear.weight`` transposed, so this is
    ``torch.nn.functional.linear(x, kernel.T, bias)``.

    Args:
        x: floating array ``(..., in_features)``, rank >= 1.
        kernel: ``(in_features, features)``.
        bias: ``None`` or ``(features,)``.

    Returns:
        An array ``(..., features)``.

    >>> linear(jnp.ones((2, 3)), jnp.ones((3, 4)), jnp.arange(4.0)).tolist()
    [[3.0, 4.0, 5.0, 6.0], [3.0, 4.0, 5.0, 6.0]]
    """
    check_array(x, "x")
    check_array(kernel, "kernel", ndim=2)
    if x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(
            f"x: expected shape (..., in_features) with in_features = {kernel.shape[0]} (kernel "
            f"has shape {tuple(kernel.shape)}), got shape {tuple(x.shape)}"
        )
    features = kernel.shape[1]
    if bias is not None:
        check_array(bias, "bias")
        if tuple(bias.shape) != (features,):
            raise ValueError(f"bias: expected shape ({features},), got {tuple(bias.shape)}")
    # One matrix product of (rows, in_features) rather than a tensordot of the N-d input: XLA's
    # CPU backend ran forward and both gradients 1.5x faster on ConvNeXt's pointwise layers
    # (experiments/benchmarks/README.md).
    # With a bias, a half-precision product stays float32 until the bias is added, so the sum is
    # rounded once (rounded before, a bfloat16 output was up to 30% off where the bias cancels it).
    rows = math.prod(x.shape[:-1])
    dtype = jnp.result_type(x, kernel) if bias is None else jnp.result_type(x, kernel, bias)
    wide = None if bias is None else float32_or_wider(dtype)
    y = jnp.matmul(x.reshape(rows, x.shape[-1]), kernel, preferred_element_type=wide)
    return add_bias(y.reshape(*x.shape[:-1], features), bias).astype(dtype)
