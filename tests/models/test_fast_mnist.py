"""FastMNISTNet: structure, parameter count, and the forward pass against a PyTorch twin."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import models

from ._helpers import assert_refused, count_params, param_shapes


def test_structure_and_count():
    params = param_shapes(models.FastMNISTNet(), (1, 28, 28, 1))
    assert params["conv1"]["kernel"].shape == (5, 5, 1, 32)
    assert set(params["conv1"]) == {"kernel"}  # no bias before a BatchNorm
    assert params["conv2"]["kernel"].shape == (5, 5, 32, 64)
    assert params["head"]["kernel"].shape == (4 * 4 * 64, 10)
    # convs 800 + 51,200, BatchNorm scales and biases 192, head 10,250
    assert count_params(models.FastMNISTNet(), (1, 28, 28, 1)) == 62_442
    assert count_params(models.FastMNISTNet(widths=(8, 12), num_classes=3), (1, 28, 28, 1)) == (
        200 + 2400 + 40 + 16 * 12 * 3 + 3
    )
    with pytest.raises(ValueError, match=r"widths: expected two conv widths, got \(8,\)"):
        models.FastMNISTNet(widths=(8,)).init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))


@pytest.mark.parametrize("train", [False, True])
def test_forward_matches_torch(torch, rng, train):
    model = models.FastMNISTNet(widths=(6, 10), num_classes=7)
    x = rng.standard_normal((5, 28, 28, 1)).astype(np.float32)
    variables = model.init(jax.random.key(1), jnp.asarray(x))
    params = jax.tree.map(np.array, variables["params"])  # writable copies, as torch wants
    stats = {
        k: {n: np.asarray(v) + 0.1 for n, v in s.items()}
        for k, s in variables["batch_stats"].items()
    }
    layers = []
    for index, (cin, cout) in enumerate(((1, 6), (6, 10)), start=1):
        conv = torch.nn.Conv2d(cin, cout, 5, bias=False)
        conv.weight.data = torch.from_numpy(params[f"conv{index}"]["kernel"].transpose(3, 2, 0, 1))
        norm = torch.nn.BatchNorm2d(cout, eps=1e-5)
        norm.weight.data = torch.from_numpy(params[f"norm{index}"]["scale"] + 0.5)
        norm.bias.data = torch.from_numpy(params[f"norm{index}"]["bias"] + 0.25)
        norm.running_mean.data = torch.from_numpy(stats[f"norm{index}"]["mean"])
        norm.running_var.data = torch.from_numpy(stats[f"norm{index}"]["var"])
        layers += [conv, torch.nn.MaxPool2d(2), norm, torch.nn.ReLU()]
        params[f"norm{index}"] = {
            "scale": params[f"norm{index}"]["scale"] + 0.5,
            "bias": params[f"norm{index}"]["bias"] + 0.25,
        }
    head = torch.nn.Linear(160, 7)
    # jcnn flattens channels-last: (h, w, c) order
    kernel = params["head"]["kernel"].reshape(4, 4, 10, 7).transpose(3, 2, 0, 1).reshape(7, 160)
    head.weight.data = torch.from_numpy(np.ascontiguousarray(kernel))
    head.bias.data = torch.from_numpy(params["head"]["bias"])
    twin = torch.nn.Sequential(*layers, torch.nn.Flatten(), head).train(train)
    want = twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).detach().numpy()
    variables = {"params": params, "batch_stats": stats}
    if train:
        got, _ = model.apply(variables, x, train=True, mutable=["batch_stats"])
    else:
        got = model.apply(variables, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "setting, error, says",
    [
        ({"num_classes": 0}, ValueError, r"num_classes: expected an int >= 1, got 0"),
        ({"widths": (4, -8)}, ValueError, r"widths\[1\]: expected an int >= 1, got -8"),
        ({"bn_momentum": 2}, ValueError, r"bn_momentum: expected a number in \[0, 1\], got 2"),
    ],
)
def test_bad_settings_are_named_as_the_model_calls_them(setting, error, says):
    # they used to surface as the inner layer's argument (features, momentum, rate) or pass
    assert_refused(models.FastMNISTNet(widths=(4, 8)).clone(**setting), (1, 28, 28, 1), error, says)
