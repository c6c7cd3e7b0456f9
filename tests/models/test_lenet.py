"""LeNet5: the course table (shapes, 1,256,080 parameters), the 1998 variant, a PyTorch twin."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import models

from ._helpers import assert_refused, count_params, param_shapes


def test_course_lenet5_matches_the_table():
    params = param_shapes(models.LeNet5(), (1, 28, 28, 1))
    # Table 001: conv 20x1x5x5, conv 50x20x5x5, linear 2450x500, linear 500x10 (HWIO here).
    assert params["conv1"]["kernel"].shape == (5, 5, 1, 20)
    assert params["conv2"]["kernel"].shape == (5, 5, 20, 50)
    assert params["fc1"]["kernel"].shape == (2450, 500)
    assert params["fc2"]["kernel"].shape == (500, 10)
    assert count_params(models.LeNet5(), (1, 28, 28, 1)) == 1_256_080


def test_lenet5_1998_variant():
    model = models.LeNet5(original=True)
    params = param_shapes(model, (1, 28, 28, 1))
    assert params["conv2"]["kernel"].shape == (5, 5, 6, 16)
    assert params["fc1"]["kernel"].shape == (400, 120)
    assert count_params(model, (1, 28, 28, 1)) == 61_706
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 28, 28, 1)), jnp.float32)
    variables = model.init(jax.random.key(0), x)
    _, state = model.apply(variables, x, capture_intermediates=True)
    inter = state["intermediates"]
    hidden = inter["pool1"]["__call__"][0]
    assert hidden.shape == (2, 14, 14, 6)
    activated = np.asarray(inter["tanh1"]["__call__"][0])
    np.testing.assert_allclose(activated, np.tanh(inter["conv1"]["__call__"][0]), rtol=1e-5)
    expected = activated.reshape(2, 14, 2, 14, 2, 6).mean((2, 4))  # 2x2 average pooling
    np.testing.assert_allclose(hidden, expected, rtol=1e-5, atol=1e-6)


def test_lenet5_equals_its_pytorch_twin_and_trains(torch, rng):
    model = models.LeNet5()
    x = jnp.asarray(rng.normal(size=(3, 28, 28, 1)), jnp.float32)
    params = model.init(jax.random.key(1), x)["params"]

    nn_t = torch.nn
    twin = nn_t.Sequential(
        nn_t.Conv2d(1, 20, 5, padding=2),
        nn_t.ReLU(),
        nn_t.MaxPool2d(2),
        nn_t.Conv2d(20, 50, 5, padding=2),
        nn_t.ReLU(),
        nn_t.MaxPool2d(2),
        nn_t.Flatten(),
        nn_t.Linear(2450, 500),
        nn_t.ReLU(),
        nn_t.Linear(500, 10),
    ).double()
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    with torch.no_grad():
        for index, name in ((0, "conv1"), (3, "conv2")):
            twin[index].weight.copy_(torch.tensor(p[name]["kernel"].transpose(3, 2, 0, 1)))
            twin[index].bias.copy_(torch.tensor(p[name]["bias"]))
        # NHWC flatten (C fastest) -> NCHW flatten (W fastest).
        fc1 = p["fc1"]["kernel"].reshape(7, 7, 50, 500).transpose(3, 2, 0, 1).reshape(500, 2450)
        twin[7].weight.copy_(torch.tensor(fc1))
        twin[7].bias.copy_(torch.tensor(p["fc1"]["bias"]))
        twin[9].weight.copy_(torch.tensor(p["fc2"]["kernel"].T))
        twin[9].bias.copy_(torch.tensor(p["fc2"]["bias"]))
    xt = torch.tensor(np.asarray(x, np.float64).transpose(0, 3, 1, 2))
    labels = np.array([1, 2, 3])
    logits_t = twin(xt)
    torch.nn.functional.cross_entropy(logits_t, torch.tensor(labels)).backward()

    def loss(params):
        logits = model.apply({"params": params}, x)
        log_probs = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(log_probs, jnp.asarray(labels)[:, None], 1)), logits

    grads, logits = jax.jit(jax.grad(loss, has_aux=True))(params)
    np.testing.assert_allclose(logits, logits_t.detach().numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        grads["conv1"]["kernel"],
        twin[0].weight.grad.numpy().transpose(2, 3, 1, 0),
        rtol=1e-3,
        atol=1e-5,
    )
    fc1_grad = twin[7].weight.grad.numpy().reshape(500, 50, 7, 7).transpose(2, 3, 1, 0)
    np.testing.assert_allclose(
        grads["fc1"]["kernel"], fc1_grad.reshape(2450, 500), rtol=1e-3, atol=1e-5
    )


def test_models_reject_unbatched_input():
    for model in (models.LeNet5(), models.resnet20(), models.AirbenchNet()):
        with pytest.raises(
            ValueError, match=r"x: expected rank 4, got rank 3 with shape \(28, 28, 1\)"
        ):
            jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((28, 28, 1)))


def test_a_model_given_another_image_size_or_channel_count_than_at_init_says_so():
    model = models.LeNet5()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    with pytest.raises(ValueError, match=r"x: shape \(1, 3200\) does not fit fc1 \(Dense\)"):
        model.apply(variables, jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match=r"x: shape \(1, 28, 28, 3\) does not fit conv1 \(Conv\)"):
        model.apply(variables, jnp.zeros((1, 28, 28, 3)))


@pytest.mark.parametrize(
    "setting, error, says",
    [
        ({"num_classes": 0}, ValueError, r"num_classes: expected an int >= 1, got 0"),
        ({"original": 1}, TypeError, r"original: expected a Python bool, got 1"),
    ],
)
def test_bad_settings_are_named_as_the_model_calls_them(setting, error, says):
    # they used to surface as the inner layer's argument (features, momentum, rate) or pass
    assert_refused(models.LeNet5().clone(**setting), (1, 28, 28, 1), error, says)
