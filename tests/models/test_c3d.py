"""SmallC3D: parameter count and outputs against a PyTorch twin, training step, BatchNorm modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import models

from ._helpers import assert_refused, count_params, param_shapes
from ._zoo import check_training_step, randomize_torch, torch_forward


def _torch_twin(torch, in_channels, widths, num_classes):
    tnn = torch.nn
    layers, cin = [], in_channels
    for stage, width in enumerate(widths):
        layers += [
            tnn.Conv3d(cin, width, 3, padding=1, bias=False),
            tnn.BatchNorm3d(width),
            tnn.ReLU(),
            tnn.MaxPool3d((1, 2, 2) if stage == 0 else 2),
        ]
        cin = width
    layers += [tnn.AdaptiveAvgPool3d(1), tnn.Flatten(1), tnn.Linear(cin, num_classes)]
    return tnn.Sequential(*layers)


def test_default_count_matches_the_twin(torch):
    twin = _torch_twin(torch, 3, (32, 64, 128, 256), 10)
    expected = sum(p.numel() for p in twin.parameters())
    assert count_params(models.SmallC3D(), (1, 8, 16, 16, 3)) == expected == 1_167_338
    params = param_shapes(models.SmallC3D(), (1, 8, 16, 16, 3))
    assert params["conv2"]["kernel"].shape == (3, 3, 3, 32, 64)
    assert set(params["bn4"]) == {"scale", "bias"} and params["fc"]["kernel"].shape == (256, 10)


@pytest.mark.parametrize(
    ("widths", "shape"), [((4, 6), (2, 3, 7, 9, 2)), ((5, 3, 4), (3, 5, 8, 12, 1))]
)
def test_matches_a_pytorch_twin(torch, rng, widths, shape):
    twin = _torch_twin(torch, shape[-1], widths, 4)
    randomize_torch(torch, twin, seed=4)
    state = {k: jnp.asarray(v.numpy()) for k, v in twin.state_dict().items()}
    params, stats = {}, {}
    for stage in range(len(widths)):
        conv, bn = f"{4 * stage}", f"{4 * stage + 1}"
        params[f"conv{stage + 1}"] = {"kernel": state[f"{conv}.weight"].transpose(2, 3, 4, 1, 0)}
        params[f"bn{stage + 1}"] = {"scale": state[f"{bn}.weight"], "bias": state[f"{bn}.bias"]}
        stats[f"bn{stage + 1}"] = {
            "mean": state[f"{bn}.running_mean"],
            "var": state[f"{bn}.running_var"],
        }
    fc = 4 * len(widths) + 2
    params["fc"] = {"kernel": state[f"{fc}.weight"].T, "bias": state[f"{fc}.bias"]}
    model = models.SmallC3D(4, widths)
    assert count_params(model, shape) == sum(p.numel() for p in twin.parameters())
    x = rng.normal(size=shape).astype(np.float32)
    got = jax.jit(model.apply)({"params": params, "batch_stats": stats}, jnp.asarray(x))
    np.testing.assert_allclose(got, torch_forward(torch, twin, x), rtol=1e-5, atol=1e-5)


def test_training_step_and_modes(rng):
    model = models.SmallC3D(3, (4, 8))
    x = jnp.asarray(rng.normal(size=(3, 2, 8, 8, 2)), jnp.float32)
    variables = check_training_step(model, x, jnp.array([0, 2, 1]))
    apply_eval = jax.jit(model.apply)
    apply_train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])[0])
    np.testing.assert_allclose(
        apply_eval(variables, x[:1]), apply_eval(variables, x)[:1], rtol=1e-5, atol=1e-6
    )
    assert not np.allclose(apply_train(variables, x)[:2], apply_train(variables, x[:2]), atol=1e-4)
    with pytest.raises(ValueError, match="x"):
        model.init(jax.random.key(0), jnp.zeros((2, 8, 8, 2)))


@pytest.mark.parametrize("shape", [(1, 1, 4, 4, 3), (1, 2, 3, 4, 3), (1, 2, 4, 3, 3)])
def test_a_volume_too_small_for_the_pools_is_blamed_on_x(shape):
    # a pool deep inside used to raise "window: the window spans 2 pixels ..." instead
    says = r"x: SmallC3D with 2 stages expects volumes at least 2 deep and 4x4 high and wide"
    assert_refused(models.SmallC3D(widths=(4, 8)), shape, ValueError, says)
    assert count_params(models.SmallC3D(widths=(4, 8)), (1, 2, 4, 4, 3)) > 0


@pytest.mark.parametrize(
    "setting, error, says",
    [
        ({"num_classes": -1}, ValueError, r"num_classes: expected an int >= 1, got -1"),
        ({"widths": (4.0, 8)}, TypeError, r"widths\[0\]: expected an int >= 1, got 4.0"),
        ({"bn_momentum": -0.1}, ValueError, r"bn_momentum: expected a number in \[0, 1\]"),
    ],
)
def test_bad_settings_are_named_as_the_model_calls_them(setting, error, says):
    # they used to surface as the inner layer's argument (features, momentum, rate) or pass
    assert_refused(models.SmallC3D(widths=(4, 8)).clone(**setting), (1, 4, 8, 8, 3), error, says)


def test_a_volume_without_channels_is_blamed_on_x():
    # the first conv's initializer used to blame its kernel shape ("shape: ... fan_in 0")
    says = r"^x: SmallC3D expects at least one pixel and one channel, got shape \(1, 2, 4, 4, 0\)"
    assert_refused(models.SmallC3D(widths=(4, 8)), (1, 2, 4, 4, 0), ValueError, says)
