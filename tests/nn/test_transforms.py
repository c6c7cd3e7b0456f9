"""Every module of ``jcnn.nn`` under ``jit``, ``grad``, ``vmap`` and their compositions.

For each name in ``nn.__all__`` a small module and input: ``apply`` under ``jit`` and ``vmap`` (over
examples, the variables shared) equals the eager result, and the gradient with respect to the
parameters and the input under ``jit(grad)`` and ``jit(vmap(grad))`` (per-example gradients, as
in DP-SGD) equals the eager one (``vjp``, the forward pass shared with the outputs), each example
of the ``vmap`` against its own eager run; outputs and gradients, one example and the batch, compile
as one program. Modules with running statistics run in training
mode with ``mutable=["batch_stats"]`` (the updates are outputs too), dropout with a fixed key.
A new public module without a case here fails ``test_every_public_module_has_a_case``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import functional as F
from jcnn import nn

RNGS = {"dropout": jax.random.key(7)}

# name -> (module, input shape, keyword arguments of apply, mutable collections)
CASES = {
    "Conv": (nn.Conv(3, (3, 3), stride=2, padding=1), (2, 5, 5, 2), {}, False),
    "ConvTranspose": (nn.ConvTranspose(3, 2, stride=2), (2, 3, 3, 2), {}, False),
    "DepthwiseConv": (nn.DepthwiseConv(3, depth_multiplier=2, padding=1), (2, 4, 5, 3), {}, False),
    "Dense": (nn.Dense(3), (2, 4), {}, False),
    "Flatten": (nn.Flatten(), (2, 2, 2, 3), {}, False),
    "BatchNorm": (nn.BatchNorm(momentum=0.9), (4, 2, 3), {"train": True}, True),
    "LayerNorm": (nn.LayerNorm(), (2, 3, 3), {}, False),
    "GroupNorm": (nn.GroupNorm(num_groups=2), (2, 3, 4), {}, False),
    "InstanceNorm": (
        nn.InstanceNorm(track_running_stats=True),
        (2, 4, 3),
        {"train": True},
        True,
    ),
    "LocalContrastNorm": (nn.LocalContrastNorm(size=3), (2, 5, 5, 2), {}, False),
    "LocalResponseNorm": (nn.LocalResponseNorm(3, alpha=0.1, k=2.0), (2, 3, 3, 5), {}, False),
    "MaxPool": (nn.MaxPool(2, stride=1), (2, 4, 4, 2), {}, False),
    "AvgPool": (nn.AvgPool(2, padding=1), (2, 4, 4, 2), {}, False),
    "LPPool": (nn.LPPool(2, 2), (2, 4, 4, 2), {}, False),  # even p: no NaN root
    "GlobalAvgPool": (nn.GlobalAvgPool(), (2, 3, 3, 2), {}, False),
    "GlobalMaxPool": (nn.GlobalMaxPool(), (2, 3, 3, 2), {}, False),
    "AdaptiveAvgPool": (nn.AdaptiveAvgPool((2, 3)), (2, 5, 4, 2), {}, False),
    "AdaptiveMaxPool": (nn.AdaptiveMaxPool((2, 3)), (2, 5, 4, 2), {}, False),
    "PReLU": (nn.PReLU(channelwise=True), (2, 3), {}, False),
    "Maxout": (nn.Maxout(2, features=3), (2, 4), {}, False),
    "ReLU": (nn.ReLU(), (2, 3), {}, False),
    "LeakyReLU": (nn.LeakyReLU(0.2), (2, 3), {}, False),
    "ELU": (nn.ELU(0.5), (2, 3), {}, False),
    "GELU": (nn.GELU(), (2, 3), {}, False),
    "Tanh": (nn.Tanh(), (2, 3), {}, False),
    "Sigmoid": (nn.Sigmoid(), (2, 3), {}, False),
    "Rectify": (nn.Rectify(), (2, 3), {}, False),
    "Swish": (nn.Swish(), (2, 3), {}, False),
    "Softplus": (nn.Softplus(), (2, 3), {}, False),
    "SiLU": (nn.SiLU(), (2, 3), {}, False),
    "Mish": (nn.Mish(), (2, 3), {}, False),
    "SELU": (nn.SELU(), (2, 3), {}, False),
    "LocallyConnected": (nn.LocallyConnected(3, 2, stride=2, padding=1), (2, 5, 5, 2), {}, False),
    "Dropout": (nn.Dropout(0.5), (2, 3), {"train": True, "rngs": RNGS}, False),
    "SpatialDropout": (nn.SpatialDropout(0.5), (2, 3, 3, 2), {"train": True, "rngs": RNGS}, False),
    "Sequential": (
        nn.Sequential([nn.Conv(2, 3, padding=1), nn.BatchNorm(), F.relu, nn.MaxPool(2)]),
        (2, 4, 4, 1),
        {"train": True},
        True,
    ),
    "Residual": (
        nn.Residual(nn.Conv(4, 3, padding=1), projection=nn.Conv(4, 1)),
        (2, 3, 3, 2),
        {},
        False,
    ),
}
BATCH = 2  # the leading axis vmap maps over


def _assert_trees_close(got, want, rtol=1e-4):
    """Equal up to float32 rounding (jit and vmap reorder sums), relative to each leaf's scale."""
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(got_leaves, want_leaves, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        b = np.asarray(b, np.float64)
        assert np.isfinite(b).all(), "a case whose reference is not finite checks nothing"
        scale = float(np.abs(b).max()) if b.size else 0.0
        np.testing.assert_allclose(np.asarray(a, np.float64), b, rtol=rtol, atol=rtol * scale)


def _scalar(outputs):
    """A scalar of all the outputs whose gradient has no symmetry to hide a wrong term behind."""
    return sum(
        jnp.sum(jnp.sin(leaf * (1.0 + 0.05 * jnp.arange(leaf.size).reshape(leaf.shape))))
        for leaf in jax.tree.leaves(outputs)
    )


# The cotangent of the scalar is the test's own scaffolding, not under test: compiled once per
# output shape for the whole module (a fresh function per test compiled it again for each).
_cotangent = jax.jit(jax.grad(_scalar))


def test_every_public_module_has_a_case():
    assert set(CASES) == set(nn.__all__)


@pytest.mark.parametrize("name", sorted(CASES))
def test_transformations_equal_eager(name, rng):
    module, shape, kwargs, mutable = CASES[name]
    xs = jnp.asarray(rng.normal(size=(BATCH, *shape)).astype(np.float32))
    init_kwargs = {k: v for k, v in kwargs.items() if k != "rngs"}
    # jitted (the initialization is not under test): eagerly, each operation compiled alone
    variables = jax.jit(lambda key, x: module.init(key, x, **init_kwargs))(jax.random.key(0), xs[0])
    params = variables.get("params", {})
    others = {k: v for k, v in variables.items() if k != "params"}

    def forward(params, x):
        out = module.apply(
            {"params": params, **others},
            x,
            **kwargs,
            **({"mutable": ["batch_stats"]} if mutable else {}),
        )
        return out

    grad = jax.grad(lambda params, x: _scalar(forward(params, x)), argnums=(0, 1))

    def value_and_grad(params, x):
        return forward(params, x), grad(params, x)

    # One jitted program returns the outputs and the gradient for one example (jit, jit(grad))
    # and for all of them under vmap (examples mapped, variables shared; the gradients are
    # per-example gradients, as in DP-SGD): compiling, not running, is this test's time.
    def transformed(params, xs):
        return value_and_grad(params, xs[0]), jax.vmap(value_and_grad, in_axes=(None, 0))(
            params, xs
        )

    (value, gradient), (values, gradients) = jax.jit(transformed)(params, xs)
    for i in range(BATCH):
        # Eagerly, one forward pass gives the outputs and, pulled back, the gradient (what grad
        # does). The operations compiled for the first example serve the others.
        eager_value, pullback = jax.vjp(forward, params, xs[i])
        eager = pullback(_cotangent(eager_value))
        assert any(np.asarray(g).any() for g in jax.tree.leaves(eager))
        if i == 0:
            _assert_trees_close(value, eager_value)
            _assert_trees_close(gradient, eager)
        _assert_trees_close(jax.tree.map(lambda leaf, i=i: leaf[i], values), eager_value)
        _assert_trees_close(jax.tree.map(lambda leaf, i=i: leaf[i], gradients), eager)
