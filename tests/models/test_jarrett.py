"""JarrettNet: the stage pipeline conv -> tanh -> |x| -> LCN -> pool, shapes and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import functional as F
from jcnn import models

from ._helpers import assert_refused


def test_jarrett_stage_is_conv_tanh_abs_lcn_pool(rng):
    model = models.JarrettNet(widths=(4, 6), lcn_size=5)
    x = jnp.asarray(rng.normal(size=(2, 28, 28, 1)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    params = variables["params"]
    logits, state = model.apply(variables, x, capture_intermediates=True)
    stage1 = state["intermediates"]["pool1"]["__call__"][0]
    k1 = params["conv1"]
    expected = F.avg_pool(
        F.local_contrast_norm(
            jnp.abs(jnp.tanh(F.conv(x, k1["kernel"], k1["bias"], padding=2))), size=5
        ),
        2,
    )
    np.testing.assert_allclose(stage1, expected, rtol=1e-5, atol=1e-5)
    assert stage1.shape == (2, 14, 14, 4) and logits.shape == (2, 10)
    assert params["fc"]["kernel"].shape == (7 * 7 * 6, 10)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(params)
    assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
    assert float(jnp.abs(grads["conv1"]["kernel"]).sum()) > 0
    with pytest.raises(ValueError, match="pool"):
        models.JarrettNet(pool="median").init(jax.random.key(0), x)
    for kernel_size, error in ((4, ValueError), (0, ValueError), (3.0, TypeError)):
        with pytest.raises(error, match="kernel_size"):
            models.JarrettNet(kernel_size=kernel_size).init(jax.random.key(0), x)


@pytest.mark.parametrize(
    "setting, error, says",
    [
        ({"num_classes": 0}, ValueError, r"num_classes: expected an int >= 1, got 0"),
        ({"widths": ()}, ValueError, r"widths: expected positive ints, one per stage"),
        ({"pool_window": 0}, ValueError, r"pool_window: expected a positive int, got 0"),
        ({"pool_stride": 1.5}, TypeError, r"pool_stride: expected a positive int, got 1.5"),
        ({"lcn_size": 0}, ValueError, r"lcn_size: expected a positive int, got 0"),
        ({"lcn_size": 4}, ValueError, r"lcn_size: expected an odd int, got 4"),
    ],
)
def test_bad_settings_are_named_as_the_model_calls_them(setting, error, says):
    # they used to surface as the inner layer's argument (features, momentum, rate) or pass
    assert_refused(models.JarrettNet(widths=(4, 8)).clone(**setting), (1, 32, 32, 3), error, says)
