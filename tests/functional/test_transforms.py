"""Every public op of ``jcnn.functional`` under the transformations training and research use.

For each name in ``F.__all__`` a small random case: the values under ``jit`` and ``jit(vmap)``
equal the eager ones (vmap against a loop over examples), and the gradient (with respect to every
floating argument) under ``jit(grad)`` and ``jit(vmap(grad))`` (per-example gradients) equals the
eager one (``vjp``, the forward pass shared with the values), itself checked against a central
finite difference in float64. Values and gradient compile as one program per transformation.
A new public op without a case here fails ``test_every_public_op_has_a_case``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import functional as F

KEY = jax.random.key(0)
LABELS = np.array([0, 2, 1, 2], np.int32)

# name -> (function of the floating arrays, their shapes). Everything else is fixed in the closure.
CASES = {
    "elu": (lambda x: F.elu(x, 0.7), [(4, 3)]),
    "gelu": (F.gelu, [(4, 3)]),
    "leaky_relu": (lambda x: F.leaky_relu(x, 0.1), [(4, 3)]),
    "maxout": (lambda x: F.maxout(x, 2), [(4, 6)]),
    "mish": (F.mish, [(4, 3)]),
    "prelu": (F.prelu, [(4, 3), (3,)]),
    "rectify": (F.rectify, [(4, 3)]),
    "relu": (F.relu, [(4, 3)]),
    "selu": (F.selu, [(4, 3)]),
    "sigmoid": (F.sigmoid, [(4, 3)]),
    "silu": (F.silu, [(4, 3)]),
    "softplus": (lambda x: F.softplus(x, 2.0, 1.0), [(4, 3)]),
    "swish": (F.swish, [(4, 3)]),
    "tanh": (F.tanh, [(4, 3)]),
    "linear": (F.linear, [(4, 2, 3), (3, 5), (5,)]),
    "conv": (
        lambda x, w, b: F.conv(x, w, b, stride=2, padding=1),
        [(2, 5, 5, 2), (3, 3, 2, 3), (3,)],
    ),
    "convolve": (
        lambda x, w: F.convolve(x, w, padding=1, padding_mode="reflect"),
        [(2, 5, 5, 2), (3, 3, 2, 3)],
    ),
    "conv_transpose": (
        lambda x, w, b: F.conv_transpose(x, w, b, stride=2, padding=1),
        [(2, 3, 3, 2), (3, 3, 2, 3), (3,)],
    ),
    "dropout": (lambda x: F.dropout(KEY, x, 0.5), [(4, 3)]),
    "spatial_dropout": (lambda x: F.spatial_dropout(KEY, x, 0.5), [(2, 3, 3, 4)]),
    "cross_entropy": (
        lambda logits: F.cross_entropy(logits, LABELS, label_smoothing=0.1),
        [(4, 3)],
    ),
    "accuracy": (lambda logits: F.accuracy(logits, LABELS), [(4, 3)]),
    "batch_norm": (
        lambda x, scale, bias, mean, var: F.batch_norm(
            x, scale, bias, F.BatchNormState(mean, var), train=True, momentum=0.9
        ),
        [(4, 2, 3), (3,), (3,), (3,), (3,)],
    ),
    "layer_norm": (F.layer_norm, [(2, 3, 3), (3,), (3,)]),
    "group_norm": (lambda x: F.group_norm(x, None, None, num_groups=2), [(2, 3, 4)]),
    "instance_norm": (
        lambda x, scale, mean, var: F.instance_norm(
            x, scale, None, F.BatchNormState(mean, var), train=True
        ),
        [(2, 4, 3), (3,), (3,), (3,)],
    ),
    "local_contrast_norm": (lambda x: F.local_contrast_norm(x, size=3), [(2, 5, 5, 2)]),
    "local_response_norm": (
        lambda x: F.local_response_norm(x, 3, alpha=0.1, beta=0.75, k=2.0),
        [(2, 3, 3, 5)],
    ),
    "fold_batch_norm": (
        lambda w, b, scale, bias, mean, log_var: F.fold_batch_norm(
            w, b, scale, bias, F.BatchNormState(mean, jnp.exp(log_var))
        ),
        [(3, 3, 2, 3), (3,), (3,), (3,), (3,), (3,)],
    ),
    "max_pool": (lambda x: F.max_pool(x, 2, stride=1, padding=1), [(2, 4, 4, 2)]),
    "avg_pool": (lambda x: F.avg_pool(x, 3, 2, 1, count_include_pad=False), [(2, 5, 5, 2)]),
    "lp_pool": (lambda x: F.lp_pool(jnp.abs(x) + 0.5, 2, 2), [(2, 4, 4, 2)]),
    "global_avg_pool": (F.global_avg_pool, [(2, 3, 3, 2)]),
    "global_max_pool": (F.global_max_pool, [(2, 3, 3, 2)]),
    "adaptive_avg_pool": (lambda x: F.adaptive_avg_pool(x, (2, 3)), [(2, 5, 4, 2)]),
    "adaptive_max_pool": (lambda x: F.adaptive_max_pool(x, (2, 3)), [(2, 5, 4, 2)]),
    "subsample": (lambda x: F.subsample(x, 2), [(2, 5, 5, 2)]),
    "locally_connected": (
        lambda x, w, b: F.locally_connected(x, w, b, stride=2, padding=1),
        [(2, 5, 5, 2), (3, 3, 3, 3, 2, 3), (3, 3, 3)],
    ),
}
NOT_OPS = {
    "BatchNormState",  # a NamedTuple of arrays, exercised through batch_norm's case
    "locally_connected_output_shape",  # sizes from sizes, no arrays
}
NOT_DIFFERENTIABLE = {"accuracy"}  # piecewise constant: the gradient is 0 everywhere
BATCH = 2  # the leading axis vmap maps over


def _scalar(outputs):
    """A scalar of all the outputs whose gradient has no symmetry to hide a wrong term behind."""
    return sum(
        jnp.sum(jnp.sin(leaf * (1.0 + 0.05 * jnp.arange(leaf.size).reshape(leaf.shape))))
        for leaf in jax.tree.leaves(outputs)
    )


# The cotangent the eager pullback starts from: jitted, as it is only the seed of what is checked
# (eagerly each of its operations compiled alone for every new output shape, about a second).
_cotangent = jax.jit(jax.grad(_scalar))


def _loss(fn):
    return lambda *args: _scalar(fn(*args))


def _arrays(rng, shapes, batch=None, dtype=np.float32):
    lead = () if batch is None else (batch,)
    return [jnp.asarray(rng.normal(size=lead + shape).astype(dtype)) for shape in shapes]


def _assert_trees_close(got, want, rtol=1e-4):
    """Equal up to float32 rounding (jit and vmap reorder sums), relative to each leaf's scale."""
    got, want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        b = np.asarray(b, np.float64)
        assert np.isfinite(b).all(), "a case whose reference is not finite checks nothing"
        scale = float(np.abs(b).max()) if b.size else 0.0
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=rtol * scale)


def test_every_public_op_has_a_case():
    assert set(CASES) | NOT_OPS == set(F.__all__)


def _stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


@pytest.mark.parametrize("name", sorted(CASES))
def test_transformations_equal_eager(name, rng):
    fn, shapes = CASES[name]
    argnums = tuple(range(len(shapes)))
    grad = jax.grad(_loss(fn), argnums=argnums)

    # One jitted function returns the values and the gradient: compiling, not running, is this
    # test's time, and one program per transformation halves it.
    def value_and_grad(*args):
        return fn(*args), grad(*args)

    jit_both = jax.jit(value_and_grad)
    args = _arrays(rng, shapes)
    value, gradient = jit_both(*args)
    # Eagerly, one forward pass gives the values and, pulled back, the gradient (what grad does).
    eager_value, pullback = jax.vjp(fn, *args)
    eager = pullback(_cotangent(eager_value))
    _assert_trees_close(value, eager_value)
    _assert_trees_close(gradient, eager)

    # vmap over a leading axis equals a loop over its entries (through the jitted function just
    # checked against eager, which keeps this fast); the gradients are per-example gradients.
    stacked = _arrays(rng, shapes, batch=BATCH)
    examples = [[a[i] for a in stacked] for i in range(BATCH)]
    values, gradients = jax.jit(jax.vmap(value_and_grad))(*stacked)
    looped = [jit_both(*e) for e in examples]
    _assert_trees_close(values, _stack([v for v, _ in looped]))
    _assert_trees_close(gradients, _stack([g for _, g in looped]))

    if name in NOT_DIFFERENTIABLE:
        assert all(not np.asarray(g).any() for g in eager)
        return
    assert any(np.asarray(g).any() for g in eager), "a gradient of 0 checks nothing"
    # The gradient itself against a central difference along a random direction, in float64.
    h = 1e-6

    @jax.jit
    def difference_and_gradient(args, direction):
        loss = _loss(fn)
        plus = loss(*(a + h * d for a, d in zip(args, direction, strict=True)))
        minus = loss(*(a - h * d for a, d in zip(args, direction, strict=True)))
        return plus - minus, jax.grad(loss, argnums=argnums)(*args)

    with jax.enable_x64(True):
        args64 = [jnp.asarray(a, jnp.float64) for a in args]
        direction = [jnp.asarray(d, jnp.float64) for d in _arrays(rng, shapes)]
        difference, gradient = difference_and_gradient(args64, direction)
        numeric = float(difference) / (2 * h)
        analytic = sum(float(jnp.vdot(g, d)) for g, d in zip(gradient, direction, strict=True))
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-6)


def test_local_response_norm_jit_grad_matches_torch(torch, rng):
    # The original AlexNet trains through LRN: its gradient under jit, against PyTorch's.
    x = rng.normal(size=(2, 4, 4, 7)).astype(np.float32)
    cotangent = rng.normal(size=x.shape).astype(np.float32)
    size, alpha, beta, k = 5, 1e-2, 0.75, 2.0

    def loss(x):
        return jnp.sum(F.local_response_norm(x, size, alpha=alpha, beta=beta, k=k) * cotangent)

    got = jax.jit(jax.grad(loss))(jnp.asarray(x))
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    yt = torch.nn.functional.local_response_norm(xt, size, alpha=alpha * size, beta=beta, k=k)
    (yt * torch.tensor(cotangent.transpose(0, 3, 1, 2))).sum().backward()
    np.testing.assert_allclose(got, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)


def test_prelu_on_a_scalar_with_a_one_element_alpha():
    for x in (-2.0, 3.0):
        got = F.prelu(jnp.float32(x), jnp.asarray([0.25]))
        assert got.shape == () and float(got) == (x if x > 0 else 0.25 * x)
    grad = jax.jit(jax.grad(lambda x, a: F.prelu(x, a), argnums=(0, 1)))(
        jnp.float32(-2.0), jnp.ones(1)
    )
    assert float(grad[0]) == 1.0 and grad[1].tolist() == [-2.0]
