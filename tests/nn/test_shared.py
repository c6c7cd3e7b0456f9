"""What jcnn/nn/_shared.py gives every Linen module: counts given as concrete 0-d JAX integers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import nn

# (module class, its count settings with Python values, input shape)
COUNTS = {
    "Conv": (nn.Conv, dict(features=6, kernel_size=3, groups=2), (2, 7, 6, 4)),
    "ConvTranspose": (nn.ConvTranspose, dict(features=6, kernel_size=3, groups=2), (2, 5, 4, 4)),
    "DepthwiseConv": (nn.DepthwiseConv, dict(kernel_size=3, depth_multiplier=2), (2, 7, 6, 3)),
    "Dense": (nn.Dense, dict(features=3), (2, 5)),
    "LocallyConnected": (nn.LocallyConnected, dict(features=2, kernel_size=3), (2, 6, 5, 3)),
    "GroupNorm": (nn.GroupNorm, dict(num_groups=2), (2, 3, 4)),
    "Maxout": (nn.Maxout, dict(num_pieces=2, features=3), (2, 4)),
}
CASES = [(name, setting) for name, (_, counts, _) in COUNTS.items() for setting in counts]


@pytest.mark.parametrize(("name", "setting"), CASES)
def test_a_count_given_as_a_0d_jax_integer_builds_the_same_layer(name, setting, rng):
    # a 0-d count passed the checks, then reached the parameter shape raw ("shape: expected a
    # sequence of non-negative ints") or, under jit, a traced `channels % groups`
    cls, counts, shape = COUNTS[name]
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    reference = cls(**counts)
    layer = cls(**{**counts, setting: jnp.asarray(counts[setting])})
    variables = layer.init(jax.random.key(0), x)
    want = reference.init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, want)
    np.testing.assert_array_equal(
        jax.jit(layer.apply)(variables, x), jax.jit(reference.apply)(want, x)
    )


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_check_kernel_fits_names_kernel_size_at_the_first_dim_that_does_not_fit(rank):
    from types import SimpleNamespace

    from jcnn.nn._shared import check_kernel_fits

    rng = np.random.default_rng(rank)
    for _ in range(20):
        sizes = tuple(int(v) for v in rng.integers(1, 9, rank))
        window = tuple(int(v) for v in rng.integers(1, 5, rank))
        dilation = tuple(int(v) for v in rng.integers(1, 4, rank))
        padding = tuple(int(v) for v in rng.integers(0, 3, rank))
        module = SimpleNamespace(padding=padding, stride=1, dilation=dilation)
        spans = [d * (k - 1) + 1 for k, d in zip(window, dilation, strict=True)]
        padded = [n + 2 * p for n, p in zip(sizes, padding, strict=True)]
        too_wide = [dim for dim in range(rank) if spans[dim] > padded[dim]]
        if not too_wide:
            check_kernel_fits(module, sizes, window)
            continue
        dim = too_wide[0]
        with pytest.raises(
            ValueError,
            match=rf"^kernel_size: the dilated window {spans[dim]} \(kernel {window[dim]}, "
            rf"dilation {dilation[dim]}\) is larger than the padded input {padded[dim]} .* "
            rf"spatial dim {dim}$",
        ):
            check_kernel_fits(module, sizes, window)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_transpose_default_init_is_he_over_the_inputs_of_one_group(groups):
    # an output channel of a grouped transposed conv sums C_in // groups input channels: the
    # kernel's std was sqrt(2 / (9 * C_in)) whatever the groups (4x too small a variance at 4)
    from flax import nnx

    from jcnn import nnx as jnnx

    fan_in = 9 * 64 // groups
    linen = nn.ConvTranspose(32, 3, groups=groups)
    kernels = [
        linen.init(jax.random.key(0), jnp.zeros((1, 4, 4, 64)))["params"]["kernel"],
        jnnx.ConvTranspose(64, 32, 3, groups=groups, rngs=nnx.Rngs(0)).kernel[...],
    ]
    for kernel in kernels:
        assert kernel.shape == (3, 3, 64, 32 // groups)
        assert abs(float(kernel.std()) / np.sqrt(2 / fan_in) - 1) < 0.05


def test_a_count_past_int64_is_refused_naming_it():
    # features=2**63 failed inside JAX's shape parsing ("get(): incompatible function arguments")
    from jcnn import models

    images, pictures = jnp.ones((1, 4, 4, 3)), jnp.ones((1, 32, 32, 1))
    for module, name, x in (
        (nn.Dense(2**63), "features", images),
        (nn.Conv(2**63, 3), "features", images),
        (nn.Maxout(2, features=2**63), "features", images),
        (models.LeNet5(num_classes=2**63), "num_classes", pictures),
    ):
        with pytest.raises(ValueError, match=f"^{name}: expected .*below 2\\*\\*63, got {2**63}"):
            module.init(jax.random.key(0), x)
