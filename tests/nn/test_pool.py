"""jcnn.nn pooling modules against PyTorch and their functional ops."""

import jax
import jax.numpy as jnp
import numpy as np

from jcnn import functional as F
from jcnn import nn


def test_pools_forward_and_gradient_match_torch(torch, rng):
    x = jnp.asarray(rng.uniform(0.1, 2.0, size=(2, 9, 7, 3)), jnp.float32)
    xt = torch.tensor(np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))).requires_grad_(True)
    tf = torch.nn.functional
    cases = [
        (
            nn.MaxPool((3, 2), stride=(2, 1), padding=1, ceil_mode=True),
            lambda t: tf.max_pool2d(t, (3, 2), (2, 1), 1, ceil_mode=True),
            lambda x: F.max_pool(x, (3, 2), (2, 1), 1, ceil_mode=True),
        ),
        (
            nn.AvgPool(3, stride=2, padding=1, count_include_pad=False),
            lambda t: tf.avg_pool2d(t, 3, 2, 1, count_include_pad=False),
            lambda x: F.avg_pool(x, 3, 2, 1, count_include_pad=False),
        ),
        (
            nn.LPPool(2.0, 2),
            lambda t: tf.lp_pool2d(t, 2.0, 2),
            lambda x: F.lp_pool(x, 2.0, 2),
        ),
        (
            nn.AdaptiveAvgPool((4, 3)),
            lambda t: tf.adaptive_avg_pool2d(t, (4, 3)),
            lambda x: F.adaptive_avg_pool(x, (4, 3)),
        ),
        (
            nn.AdaptiveMaxPool((4, 3)),
            lambda t: tf.adaptive_max_pool2d(t, (4, 3)),
            lambda x: F.adaptive_max_pool(x, (4, 3)),
        ),
        (
            nn.GlobalMaxPool(),
            lambda t: t.amax((2, 3), keepdim=True),
            F.global_max_pool,
        ),
        (
            nn.GlobalAvgPool(),
            lambda t: t.mean((2, 3), keepdim=True),
            F.global_avg_pool,
        ),
    ]
    for layer, reference, functional in cases:
        y, vjp = jax.vjp(jax.jit(lambda x, layer=layer: layer.apply({}, x)), x)
        np.testing.assert_allclose(y, functional(x), rtol=1e-6, atol=1e-6)
        yt = reference(xt)
        expected = np.transpose(yt.detach().numpy(), (0, 2, 3, 1))
        np.testing.assert_allclose(y, expected.reshape(y.shape), rtol=1e-5, atol=1e-5)
        upstream = rng.normal(size=y.shape)
        (g_x,) = vjp(jnp.asarray(upstream, jnp.float32))
        xt.grad = None
        upstream_t = torch.tensor(np.transpose(upstream.reshape(expected.shape), (0, 3, 1, 2)))
        yt.backward(upstream_t)
        np.testing.assert_allclose(
            g_x, np.transpose(xt.grad.numpy(), (0, 2, 3, 1)), rtol=1e-4, atol=1e-5
        )


def test_pools_are_parameter_free_and_keep_channels():
    x = jnp.ones((1, 28, 28, 20))
    assert nn.MaxPool(2).init(jax.random.key(0), x) == {}
    assert nn.MaxPool(2).apply({}, x).shape == (1, 14, 14, 20)
    assert nn.AvgPool(2).apply({}, jnp.ones((1, 8, 3))).shape == (1, 4, 3)
    assert nn.GlobalAvgPool().apply({}, x).shape == (1, 20)
