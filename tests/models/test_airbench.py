"""AirbenchNet: structure, parameter count, forward pass, whitening initialization."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import functional as F
from jcnn import models

from ._helpers import assert_refused, count_params, param_shapes


def test_airbench_structure_and_count():
    params = param_shapes(models.AirbenchNet(), (1, 32, 32, 3))
    assert params["whiten"]["kernel"].shape == (2, 2, 3, 24)
    assert params["whiten"]["bias"].shape == (24,)
    assert params["group1"]["conv1"]["kernel"].shape == (3, 3, 24, 64)
    assert set(params["group2"]["norm1"]) == {"bias"}  # BatchNorm without a learned scale
    assert set(params["head"]) == {"kernel"} and params["head"]["kernel"].shape == (256, 10)
    # whiten 312 + convs 1,967,616 + BN biases 1,152 + head 2,560
    assert count_params(models.AirbenchNet(), (1, 32, 32, 3)) == 1_971_640


def test_airbench_forward_scales_the_head(rng):
    model = models.AirbenchNet()
    x = jnp.asarray(rng.normal(size=(2, 32, 32, 3)), jnp.float32)
    variables = jax.jit(model.init)(jax.random.key(0), x)
    logits, updates = jax.jit(
        lambda v, x: model.apply(
            v, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True
        )
    )(variables, x)
    features = updates["intermediates"]["flatten"]["__call__"][0]
    assert features.shape == (2, 256)
    head = variables["params"]["head"]["kernel"]
    np.testing.assert_allclose(logits, (features @ head) / 9, rtol=1e-5, atol=1e-6)
    # airbench's BN momentum 0.4 (PyTorch) is a decay of 0.6 here: the running mean after one
    # step is 0.4 times the batch mean of the norm's input (conv1 then the 2x2 max pool).
    pooled = updates["intermediates"]["group1"]["pool"]["__call__"][0]
    np.testing.assert_allclose(
        updates["batch_stats"]["group1"]["norm1"]["mean"],
        0.4 * np.asarray(pooled).mean((0, 1, 2)),
        rtol=1e-4,
        atol=1e-6,
    )


def test_whitening_kernel_whitens_patches(rng):
    mixing = rng.normal(size=(3, 3))
    images = jnp.asarray(rng.normal(size=(16, 10, 10, 3)) @ mixing, jnp.float32)
    kernel = models.whitening_kernel(images, kernel_size=2, eps=1e-6)
    assert kernel.shape == (2, 2, 3, 24)
    out = np.asarray(F.conv(images, kernel), np.float64).reshape(-1, 24)
    second_moment = out.T @ out / out.shape[0]
    np.testing.assert_allclose(second_moment[:12, :12], np.eye(12), atol=2e-3)
    np.testing.assert_allclose(kernel[..., 12:], -kernel[..., :12])
    # a NumPy int is an int (was refused); a bool is not (True was taken as 1)
    np.testing.assert_array_equal(
        models.whitening_kernel(images, kernel_size=np.int64(2), eps=1e-6), kernel
    )
    with pytest.raises(ValueError, match=r"kernel_size: expected an int in \[1, 10\].*got True"):
        models.whitening_kernel(images, kernel_size=True)


@pytest.mark.parametrize(
    "images, kwargs, error, says",
    [
        (np.zeros((2, 4, 4, 3)), {"eps": -1e-3}, ValueError, r"eps: expected a finite number >= 0"),
        (np.zeros((2, 4, 4, 3)), {"eps": "a"}, TypeError, r"eps: expected a finite number >= 0"),
        # constant images: the second moment is singular, 1 / sqrt(0 + 0) was inf
        (np.ones((2, 4, 4, 3)), {"eps": 0.0}, ValueError, r"eps: expected a value > .*near zero"),
        (np.zeros((0, 4, 4, 3)), {}, ValueError, r"images: expected at least one image, got shape"),
        # no channel: a raw ZeroDivisionError from a reshape deep inside
        (np.zeros((2, 4, 4, 0)), {}, ValueError, r"images: expected at least one channel, got sh"),
        (np.full((2, 4, 4, 3), np.nan), {}, ValueError, r"images: expected finite values"),
        (np.full((2, 4, 4, 3), 1e30), {}, ValueError, r"images: .*1e\+30, whose squares overflow"),
    ],
)
def test_whitening_kernel_refuses_what_would_make_it_nan(images, kwargs, error, says):
    # each of these returned a NaN or infinite kernel without a word (or a raw TypeError)
    with pytest.raises(error, match=says):
        models.whitening_kernel(jnp.asarray(images, jnp.float32), **kwargs)


def test_whitening_kernel_with_eps_zero_whitens_full_rank_patches_exactly(rng):
    images = jnp.asarray(rng.normal(size=(8, 6, 6, 2)), jnp.float32)
    out = np.asarray(F.conv(images, models.whitening_kernel(images, eps=0.0)), np.float64)
    out = out.reshape(-1, 16)[:, :8]
    np.testing.assert_allclose(out.T @ out / out.shape[0], np.eye(8), atol=1e-4)


@pytest.mark.parametrize(
    "setting, error, says",
    [
        ({"num_classes": 0}, ValueError, r"num_classes: expected an int >= 1, got 0"),
        ({"num_classes": 2.5}, TypeError, r"num_classes: expected an int >= 1, got 2.5"),
        ({"widths": ()}, ValueError, r"widths: expected positive ints, one per stage, got \(\)"),
        ({"widths": (8, 0)}, ValueError, r"widths\[1\]: expected an int >= 1, got 0"),
        ({"widths": 8}, TypeError, r"widths: expected a list or tuple"),
        ({"whiten_kernel_size": 0}, ValueError, r"whiten_kernel_size: expected an int >= 1"),
        ({"scaling_factor": float("nan")}, ValueError, r"scaling_factor: expected a finite number"),
        ({"bn_momentum": 1.5}, ValueError, r"bn_momentum: expected a number in \[0, 1\], got 1.5"),
        ({"bn_eps": 0.0}, ValueError, r"bn_eps: expected a finite number > 0"),
    ],
)
def test_bad_settings_are_named_as_the_model_calls_them(setting, error, says):
    # they used to surface as the inner layer's argument (features, momentum, rate) or pass
    assert_refused(models.AirbenchNet(widths=(8, 8)).clone(**setting), (1, 32, 32, 3), error, says)


def test_conv_group_checks_its_own_settings():
    assert_refused(models.ConvGroup(4, bn_eps=-1e-5), (1, 8, 8, 3), ValueError, "bn_eps: ")
    assert_refused(models.ConvGroup(4, bn_momentum=1.1), (1, 8, 8, 3), ValueError, "bn_momentum: ")
