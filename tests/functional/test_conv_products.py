"""Tests of jcnn.functional._conv_products: a convolution's three products as primitives.

A toy backend whose products are XLA's own convolution and its transposes checks the machinery
(transposes, vmap's leading axes, eager calls, the folded weight gradient) apart from any fast
kernel; the oneDNN backend's folded weight gradient is checked in its lowered program.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import native
from jcnn.functional import conv
from jcnn.functional._conv_cpu import _Config, native_conv
from jcnn.functional._conv_products import conv_products

CONFIG = _Config((2, 1), ((1, 0), (0, 2)), (1, 2), 2, None)
X_SHAPE, W_SHAPE = (3, 7, 6, 4), (3, 2, 2, 6)
Y_SHAPE = jax.eval_shape(
    lambda x, w: native_conv(x, w, CONFIG),
    jax.ShapeDtypeStruct(X_SHAPE, jnp.float32),
    jax.ShapeDtypeStruct(W_SHAPE, jnp.float32),
).shape
WEIGHT_GRAD_BATCHES: list[int] = []  # the batch of every weight gradient the toy lowers


def _input_grad(dy, w, config, x_shape):
    zeros = jnp.zeros(x_shape, dy.dtype)
    return jax.vjp(lambda x: native_conv(x, w, config), zeros)[1](dy)[0]


def _weight_grad(x, dy, config, w_shape):
    WEIGHT_GRAD_BATCHES.append(x.shape[0])
    zeros = jnp.zeros(w_shape, x.dtype)
    return jax.vjp(lambda w: native_conv(x, w, config), zeros)[1](dy)[0]


TOY = conv_products(
    "jcnn_test_toy_conv",
    lambda x, w, config, y_shape: native_conv(x, w, config),
    _input_grad,
    _weight_grad,
)


def toy_conv(x, w):
    return TOY.forward(x, w, CONFIG, Y_SHAPE)


def reference(x, w):
    return native_conv(x, w, CONFIG)


def close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=2e-5, atol=2e-5)


@pytest.fixture
def operands(rng):
    return tuple(rng.standard_normal(s).astype(np.float32) for s in (X_SHAPE, W_SHAPE, Y_SHAPE))


def test_each_product_and_its_transposes_match_xla(operands):
    x, w, dy = operands
    close(toy_conv(x, w), reference(x, w))  # eager
    close(jax.jit(toy_conv)(x, w), reference(x, w))
    close(TOY.input_grad(dy, w, CONFIG, X_SHAPE), _input_grad(dy, w, CONFIG, X_SHAPE))
    close(TOY.weight_grad(x, dy, CONFIG, W_SHAPE), _weight_grad(x, dy, CONFIG, W_SHAPE))
    # The transposes of each product in each operand, as jax.linear_transpose finds them.
    products = {
        "forward": (lambda a, b: TOY.forward(a, b, CONFIG, Y_SHAPE), (x, w)),
        "input_grad": (lambda a, b: TOY.input_grad(a, b, CONFIG, X_SHAPE), (dy, w)),
        "weight_grad": (lambda a, b: TOY.weight_grad(a, b, CONFIG, W_SHAPE), (x, dy)),
    }
    references = {
        "forward": reference,
        "input_grad": lambda a, b: _input_grad(a, b, CONFIG, X_SHAPE),
        "weight_grad": lambda a, b: _weight_grad(a, b, CONFIG, W_SHAPE),
    }
    for name, (product, (a, b)) in products.items():
        out = product(a, b)
        for position in (0, 1):

            def of(v, product=product, position=position, a=a, b=b):
                return product(v, b) if position == 0 else product(a, v)

            def of_reference(v, name=name, position=position, a=a, b=b):
                return references[name](v, b) if position == 0 else references[name](a, v)

            primal = (a, b)[position]
            (actual,) = jax.linear_transpose(of, primal)(out)
            (expected,) = jax.linear_transpose(of_reference, primal)(out)
            close(actual, expected)


def test_vmap_broadcasts_unmapped_operands_at_every_level(rng):
    xs = rng.standard_normal((2, 3, *X_SHAPE)).astype(np.float32)
    ws = rng.standard_normal((3, *W_SHAPE)).astype(np.float32)
    # x mapped at both levels, w only at the inner one, in either order of axes.
    actual = jax.vmap(jax.vmap(toy_conv, in_axes=(0, 0)), in_axes=(0, None))(xs, ws)
    expected = np.stack(
        [np.stack([reference(x, w) for x, w in zip(row, ws, strict=True)]) for row in xs]
    )
    close(actual, expected)
    actual = jax.vmap(jax.vmap(toy_conv, in_axes=(0, None)), in_axes=(1, 0))(xs, ws)
    expected = np.stack([np.stack([reference(x, w) for x in xs[:, j]]) for j, w in enumerate(ws)])
    close(actual, expected)

    # Derivatives of the doubly mapped product, against the same of XLA's convolution.
    def loss(conv_fn):
        def total(xs, ws):
            mapped = jax.vmap(jax.vmap(conv_fn, in_axes=(0, None)), in_axes=(1, 0))(xs, ws)
            return jnp.sum(jnp.sin(mapped))

        return total

    for transform in (
        lambda f: jax.grad(f, argnums=(0, 1))(xs, ws),
        lambda f: jax.jvp(f, (xs, ws), (xs, ws))[1],
        lambda f: jax.grad(lambda ws: jnp.sum(jax.grad(f)(xs, ws) ** 2))(ws),
    ):
        for a, e in zip(
            jax.tree.leaves(transform(loss(toy_conv))),
            jax.tree.leaves(transform(loss(reference))),
            strict=True,
        ):
            close(a, e)


def test_gradient_of_a_shared_kernel_under_vmap_is_one_product_over_the_whole_batch(rng):
    xs = rng.standard_normal((5, *X_SHAPE)).astype(np.float32)
    w = rng.standard_normal(W_SHAPE).astype(np.float32)

    def loss(conv_fn, w):
        return jnp.sum(jnp.sin(jax.vmap(lambda x: conv_fn(x, w))(xs)))

    WEIGHT_GRAD_BATCHES.clear()
    actual = jax.grad(lambda w: loss(toy_conv, w))(w)
    assert WEIGHT_GRAD_BATCHES == [5 * X_SHAPE[0]]
    close(actual, jax.grad(lambda w: loss(reference, w))(w))
    # Mapped over kernels as well (an ensemble): one weight gradient per kernel, not folded.
    ws = np.stack([w, 2 * w])
    WEIGHT_GRAD_BATCHES.clear()
    ensemble = jax.grad(lambda ws: jnp.sum(jax.vmap(lambda w: loss(toy_conv, w))(ws)))(ws)
    assert WEIGHT_GRAD_BATCHES == [X_SHAPE[0]]  # traced once per problem, vmapped over 2 x 5
    expected = [jax.grad(lambda w: loss(reference, w))(w) for w in ws]
    close(ensemble, np.stack(expected))


def test_onednn_weight_gradient_of_a_shared_kernel_under_vmap_is_folded(onednn):
    xs = jnp.zeros((5, 2, 8, 8, 3))
    w = jnp.zeros((3, 3, 3, 4))

    def loss(w):
        return jnp.sum(jax.vmap(lambda x: conv(x, w, padding=1))(xs))

    lowered = jax.jit(jax.grad(loss)).lower(w).as_text()
    calls = [line for line in lowered.splitlines() if "jcnn_conv_backward_weights" in line]
    assert len(calls) == 1
    assert "tensor<1x10x8x8x3xf32>" in calls[0]


@pytest.mark.parametrize("backend", ["toy", "xla", "onednn"])
def test_vmap_over_no_element_gives_empty_results(backend, request):
    # A vmap over an empty axis (per-example gradients of an empty batch) has no problem to run;
    # it used to index the first element of the empty axis (IndexError).
    if backend == "onednn":
        request.getfixturevalue("onednn")
    conv_fn = toy_conv if backend == "toy" else partial(conv, stride=(2, 1), groups=2)
    xs, w = jnp.ones((0, *X_SHAPE)), jnp.ones(W_SHAPE)
    with native.conv_backend_scope(None if backend == "toy" else backend):
        out = conv_fn(jnp.ones(X_SHAPE), w).shape
        assert jax.vmap(conv_fn, in_axes=(0, None))(xs, w).shape == (0, *out)
        ensemble = jax.jit(jax.vmap(conv_fn, in_axes=(None, 0)))
        assert ensemble(jnp.ones(X_SHAPE), jnp.ones((0, *W_SHAPE))).shape == (0, *out)
        per_example = jax.vmap(jax.grad(lambda w, x: jnp.sum(conv_fn(x, w))), in_axes=(None, 0))
        assert per_example(w, xs).shape == (0, *W_SHAPE)
        shared = jax.grad(lambda w: jnp.sum(jax.vmap(conv_fn, in_axes=(0, None))(xs, w)))(w)
        np.testing.assert_array_equal(shared, np.zeros(W_SHAPE))


def test_products_evaluate_op_by_op_under_disable_jit(operands):
    x, w, _ = operands

    def loss(conv_fn, x, w):
        return jnp.sum(jnp.sin(conv_fn(x, w)))

    with jax.disable_jit():
        close(toy_conv(x, w), reference(x, w))
        for got, want in zip(
            jax.grad(partial(loss, toy_conv), argnums=(0, 1))(x, w),
            jax.grad(partial(loss, reference), argnums=(0, 1))(x, w),
            strict=True,
        ):
            close(got, want)
        close(
            jax.jvp(partial(loss, toy_conv), (x, w), (x, w))[1],
            jax.jvp(partial(loss, reference), (x, w), (x, w))[1],
        )
