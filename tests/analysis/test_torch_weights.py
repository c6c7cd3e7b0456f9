"""Tests of jcnn.analysis.torch_weights: PyTorch twins of LeNet5, VGG and ResNet give the same
logits with converted weights, and the same running statistics after a training step with
``bn_unbiased_running_var=True``; weights files are loaded as data and checked."""

import warnings

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcnn
from jcnn.analysis import (
    from_torch_state_dict,
    from_torchvision_state_dict,
    load_torch_weights,
)
from tests.models._zoo import check_running_stats_follow_torch


def _randomize_norm_statistics(torch, net, rng):
    """Random BN affine and running statistics, as in a trained network."""
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            c = module.num_features
            with torch.no_grad():
                module.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, c).astype(np.float32)))
                module.bias.copy_(torch.from_numpy(rng.normal(0, 0.2, c).astype(np.float32)))
                module.running_mean.copy_(
                    torch.from_numpy(rng.normal(0, 0.3, c).astype(np.float32))
                )
                module.running_var.copy_(
                    torch.from_numpy(rng.uniform(0.5, 2, c).astype(np.float32))
                )
    return net.eval()


def _compare(torch, net, model, shape, rng):
    """Logits of the PyTorch twin (NCHW) and of the jcnn model (NHWC) with converted weights."""
    x = rng.normal(size=shape).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
    variables = from_torch_state_dict(model, net.state_dict(), shape)
    got = np.asarray(
        jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, jnp.asarray(x))
    )
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * scale)
    return variables


def _lenet_twin(torch):
    class LeNet5(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = torch.nn.Conv2d(1, 20, 5, padding=2)
            self.conv2 = torch.nn.Conv2d(20, 50, 5, padding=2)
            self.fc1 = torch.nn.Linear(2450, 500)
            self.fc2 = torch.nn.Linear(500, 10)

        def forward(self, x):
            f = torch.nn.functional
            x = f.max_pool2d(f.relu(self.conv1(x)), 2)
            x = f.max_pool2d(f.relu(self.conv2(x)), 2)
            return self.fc2(f.relu(self.fc1(torch.flatten(x, 1))))

    return LeNet5()


def test_lenet5_logits_match_torch(torch, rng):
    torch.manual_seed(0)
    variables = _compare(torch, _lenet_twin(torch), jcnn.models.LeNet5(), (3, 28, 28, 1), rng)
    assert variables["params"]["fc1"]["kernel"].shape == (2450, 500)
    assert "batch_stats" not in variables


def test_dense_after_flatten_then_dropout_and_activation_gets_the_flatten_order(torch, rng):
    # as AlexNet's classifier (flatten, dropout, fc6): the first dense layer's input axis is still
    # PyTorch's NCHW flatten order, whatever elementwise layers sit between
    torch.manual_seed(2)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3),
        torch.nn.Flatten(),
        torch.nn.Dropout(0.5),
        torch.nn.ReLU(),
        torch.nn.Linear(3 * 4 * 4, 5),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(5, 2),
    ).eval()
    model = jcnn.nn.Sequential(
        [
            jcnn.nn.Conv(3, 3),
            jcnn.nn.Flatten(),
            jcnn.nn.Dropout(0.5),
            jcnn.nn.ReLU(),
            jcnn.nn.Dense(5),
            jcnn.nn.ReLU(),
            jcnn.nn.Dropout(0.5),
            jcnn.nn.Dense(2),
        ]
    )
    _compare(torch, net, model, (2, 6, 6, 2), rng)


@pytest.mark.parametrize("nested", ["flatten", "activations"])
def test_dense_after_a_flatten_inside_a_nested_container_gets_the_flatten_order(torch, rng, nested):
    # the container returns its last layer's very array: that layer, not the container, made it
    torch.manual_seed(4)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.ReLU(), torch.nn.Linear(24, 2)
    ).eval()
    conv, flatten, relu = jcnn.nn.Conv(4, 3), jcnn.nn.Flatten(), jcnn.nn.ReLU()
    if nested == "flatten":
        layers = [jcnn.nn.Sequential([conv, flatten]), relu, jcnn.nn.Dense(2)]
    else:
        layers = [conv, flatten, jcnn.nn.Sequential([jcnn.nn.Dropout(0.5), relu])]
        layers.append(jcnn.nn.Dense(2))
    _compare(torch, net, jcnn.nn.Sequential(layers), (2, 4, 5, 3), rng)


def test_dense_after_a_flatten_made_outside_the_layers_is_refused(rng):
    # F.relu or a reshape between the map and the dense layer hides the flatten: its weight was
    # imported unpermuted, the logits silently wrong
    class Reshaped(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            x = jcnn.nn.Conv(4, 3, name="conv")(x)
            return jcnn.nn.Dense(2, name="fc")(x.reshape(x.shape[0], -1))

    functional = jcnn.nn.Sequential(
        [jcnn.nn.Conv(4, 3), jcnn.nn.Flatten(), jcnn.functional.relu, jcnn.nn.Dense(2)]
    )
    weights = {"conv.weight": np.zeros((4, 3, 3, 3)), "conv.bias": np.zeros(4)}
    weights |= {"fc.weight": np.zeros((2, 24)), "fc.bias": np.zeros(2)}
    for model in (Reshaped(), functional):
        with pytest.raises(ValueError, match=r"fc\.weight: .*\(2, 24\).*\(2, 2, 3, 4\)"):
            from_torch_state_dict(model, weights, (2, 4, 5, 3))
    # a map pooled by a function holds fewer values than its map: imported, even where an
    # earlier map held as many values as the pooled vector (6 channels at 2x2, 24 pooled)
    pooled = jcnn.nn.Sequential(
        [
            jcnn.nn.Conv(6, 3, stride=2),
            jcnn.nn.Conv(24, 1),
            lambda x: jnp.mean(x, axis=(1, 2)),
            jcnn.nn.Dense(2),
        ]
    )
    head = {"0.weight": np.zeros((6, 3, 3, 3)), "0.bias": np.zeros(6)}
    head |= {"1.weight": np.zeros((24, 6, 1, 1)), "1.bias": np.zeros(24)}
    head |= {"3.weight": np.zeros((2, 24)), "3.bias": np.zeros(2)}
    converted = from_torch_state_dict(pooled, head, (2, 5, 5, 3))
    assert converted["params"]["layers_3"]["kernel"].shape == (24, 2)
    # a flat input of the model itself has one order only
    mlp = jcnn.nn.Sequential([jcnn.nn.Dense(3), jcnn.functional.relu, jcnn.nn.Dense(2)])
    flat = {"0.weight": np.zeros((3, 5)), "0.bias": np.zeros(3)}
    flat |= {"2.weight": np.zeros((2, 3)), "2.bias": np.zeros(2)}
    assert from_torch_state_dict(mlp, flat, (2, 5))["params"]["layers_2"]["kernel"].shape == (3, 2)


def test_depthwise_and_transposed_convs_match_torch(torch, rng):
    # they were refused as layers without a PyTorch conversion
    torch.manual_seed(3)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1, groups=3, bias=False),
        torch.nn.BatchNorm2d(6),
        torch.nn.ReLU(),
        torch.nn.ConvTranspose2d(6, 4, (2, 3), stride=2, groups=2, output_padding=1),
        torch.nn.ConvTranspose2d(4, 2, 3, padding=1),
    )
    net = _randomize_norm_statistics(torch, net, rng)
    model = jcnn.nn.Sequential(
        [
            jcnn.nn.DepthwiseConv(3, depth_multiplier=2, padding=1, use_bias=False),
            jcnn.nn.BatchNorm(),
            jcnn.nn.ReLU(),
            jcnn.nn.ConvTranspose(4, (2, 3), stride=2, groups=2, output_padding=1),
            jcnn.nn.ConvTranspose(2, 3, padding=1),
        ]
    )
    x = rng.normal(size=(2, 5, 4, 3)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    variables = from_torch_state_dict(model, net.state_dict(), x.shape)
    assert variables["params"]["layers_3"]["kernel"].shape == (2, 3, 6, 2)
    got = model.apply(variables, jnp.asarray(x), train=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_batch_norm_1d_after_flatten_gets_the_flatten_order(rng):
    """Flatten -> BatchNorm1d -> Linear, the PyTorch twin computed in NumPy (NCHW flatten): both
    the BatchNorm's vectors and the dense kernel after it are permuted."""
    height, width, channels, features = 2, 3, 4, 5
    n = height * width * channels
    model = jcnn.nn.Sequential(
        [jcnn.nn.Flatten(), jcnn.nn.BatchNorm(), jcnn.nn.ReLU(), jcnn.nn.Dense(features)]
    )
    state_dict = {
        "1.weight": rng.uniform(0.5, 1.5, n),
        "1.bias": rng.normal(size=n),
        "1.running_mean": rng.normal(size=n),
        "1.running_var": rng.uniform(0.5, 2.0, n),
        "1.num_batches_tracked": np.array(3),
        "3.weight": rng.normal(size=(features, n)),
        "3.bias": rng.normal(size=features),
    }
    state_dict = {k: v.astype(np.float32) for k, v in state_dict.items()}
    x = rng.normal(size=(2, height, width, channels)).astype(np.float32)
    flat = x.transpose(0, 3, 1, 2).reshape(2, -1)
    normed = (flat - state_dict["1.running_mean"]) / np.sqrt(state_dict["1.running_var"] + 1e-5)
    hidden = np.maximum(normed * state_dict["1.weight"] + state_dict["1.bias"], 0)
    expected = hidden @ state_dict["3.weight"].T + state_dict["3.bias"]
    variables = from_torch_state_dict(model, state_dict, (1, height, width, channels))
    got = model.apply(variables, jnp.asarray(x), train=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_dense_after_a_flatten_of_a_dense_layers_output_keeps_its_order(torch, rng):
    """Linear over a (N, T, F) sequence, Flatten, Linear: PyTorch's features are last as jcnn's,
    so the second weight is not permuted (it was, as if the sequence were a channels-first map,
    and the logits were wrong)."""
    torch.manual_seed(5)
    net = torch.nn.Sequential(
        torch.nn.Linear(6, 4),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(5 * 4, 3),
    ).eval()
    model = jcnn.nn.Sequential(
        [jcnn.nn.Dense(4), jcnn.nn.ReLU(), jcnn.nn.Flatten(), jcnn.nn.Dense(3)]
    )
    x = rng.normal(size=(2, 5, 6)).astype(np.float32)
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    variables = from_torch_state_dict(model, net.state_dict(), x.shape)
    got = model.apply(variables, jnp.asarray(x), train=False)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_parameters_take_the_models_param_dtype(rng):
    # every converted array was float32, whatever the model's param_dtype
    bf16 = jnp.bfloat16
    model = jcnn.nn.Sequential(
        [
            jcnn.nn.Conv(4, 3, param_dtype=bf16),
            jcnn.nn.BatchNorm(param_dtype=bf16),
            jcnn.nn.Flatten(),
            jcnn.nn.Dense(2, param_dtype=jnp.float16),
        ]
    )
    state_dict = {
        "0.weight": rng.normal(size=(4, 1, 3, 3)),
        "0.bias": rng.normal(size=4),
        "1.weight": rng.uniform(0.5, 1.5, 4),
        "1.bias": rng.normal(size=4),
        "1.running_mean": rng.normal(size=4),
        "1.running_var": rng.uniform(0.5, 2.0, 4),
        "3.weight": rng.normal(size=(2, 4 * 3 * 3)),
        "3.bias": rng.normal(size=2),
    }
    state_dict = {k: v.astype(np.float32) for k, v in state_dict.items()}
    shape = (1, 5, 5, 1)
    variables = from_torch_state_dict(model, state_dict, shape)
    initial = model.init(jax.random.key(0), jnp.zeros(shape), train=False)
    want = jax.tree.map(lambda leaf: leaf.dtype, initial)
    assert jax.tree.map(lambda leaf: leaf.dtype, variables) == want
    assert variables["params"]["layers_0"]["kernel"].dtype == bf16
    np.testing.assert_array_equal(
        variables["params"]["layers_3"]["bias"], state_dict["3.bias"].astype(np.float16)
    )


def test_state_dict_of_another_type_is_named():
    model = jcnn.nn.Dense(2)
    with pytest.raises(TypeError, match="state_dict: expected a mapping .*, got list"):
        from_torch_state_dict(model, [np.ones((2, 3))], (1, 3))
    with pytest.raises(TypeError, match="state_dict: expected string keys .*, got 0"):
        from_torch_state_dict(model, {0: np.ones((2, 3))}, (1, 3))
    with pytest.raises(TypeError, match="state_dict: expected a mapping .*, got list"):
        from_torchvision_state_dict(jcnn.models.MobileNetV2(), [], (1, 32, 32, 3))


def _vgg_twin(torch, depth_config, batch_norm, num_classes):
    layers, c_in = [], 3
    for convs, width in zip(depth_config, (64, 128, 256, 512, 512), strict=True):
        for _ in range(convs):
            layers.append(torch.nn.Conv2d(c_in, width, 3, padding=1))
            if batch_norm:
                layers.append(torch.nn.BatchNorm2d(width))
            layers.append(torch.nn.ReLU())
            c_in = width
        layers.append(torch.nn.MaxPool2d(2))
    return torch.nn.Sequential(
        torch.nn.Sequential(*layers), torch.nn.Flatten(), torch.nn.Linear(512, num_classes)
    )


@pytest.mark.parametrize("batch_norm", [False, True])
def test_vgg11_logits_match_torch(torch, rng, batch_norm):
    torch.manual_seed(1)
    net = _randomize_norm_statistics(torch, _vgg_twin(torch, (1, 1, 2, 2, 2), batch_norm, 10), rng)
    model = jcnn.models.VGG(depth=11, batch_norm=batch_norm, num_classes=10, small_input=True)
    _compare(torch, net, model, (2, 32, 32, 3), rng)


def _resnet_twin(torch, stage_sizes, widths, stem, shortcut, bottleneck, num_classes):
    nn = torch.nn

    class Block(nn.Module):
        expansion = 4 if bottleneck else 1

        def __init__(self, c_in, width, stride):
            super().__init__()
            out = width * self.expansion
            if bottleneck:
                self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(width)
                self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(width)
                self.conv3 = nn.Conv2d(width, out, 1, bias=False)
                self.bn3 = nn.BatchNorm2d(out)
            else:
                self.conv1 = nn.Conv2d(c_in, width, 3, stride, 1, bias=False)
                self.bn1 = nn.BatchNorm2d(width)
                self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
                self.bn2 = nn.BatchNorm2d(width)
            self.pad = None
            self.downsample = None
            if stride != 1 or c_in != out:
                if shortcut == "pad":
                    self.pad = (stride, (out - c_in) // 2, out - c_in - (out - c_in) // 2)
                else:
                    self.downsample = nn.Sequential(
                        nn.Conv2d(c_in, out, 1, stride, bias=False), nn.BatchNorm2d(out)
                    )

        def forward(self, x):
            f = torch.nn.functional
            y = f.relu(self.bn1(self.conv1(x)))
            if bottleneck:
                y = f.relu(self.bn2(self.conv2(y)))
                y = self.bn3(self.conv3(y))
            else:
                y = self.bn2(self.conv2(y))
            if self.downsample is not None:
                x = self.downsample(x)
            elif self.pad is not None:
                stride, before, after = self.pad
                x = f.pad(x[:, :, ::stride, ::stride], (0, 0, 0, 0, before, after))
            return f.relu(y + x)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            k, s, p = (7, 2, 3) if stem == "imagenet" else (3, 1, 1)
            self.conv1 = nn.Conv2d(3, widths[0], k, s, p, bias=False)
            self.bn1 = nn.BatchNorm2d(widths[0])
            self.maxpool = nn.MaxPool2d(3, 2, 1) if stem == "imagenet" else nn.Identity()
            blocks, c_in = [], widths[0]
            for stage, (size, width) in enumerate(zip(stage_sizes, widths, strict=True)):
                for index in range(size):
                    stride = 2 if stage > 0 and index == 0 else 1
                    blocks.append(Block(c_in, width, stride))
                    c_in = width * Block.expansion
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(c_in, num_classes)

        def forward(self, x):
            x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
            return self.fc(self.blocks(x).mean((2, 3)))

    return ResNet()


def test_resnet20_logits_match_torch(torch, rng):
    torch.manual_seed(2)
    twin = _resnet_twin(torch, (3, 3, 3), (16, 32, 64), "cifar", "pad", False, 10)
    net = _randomize_norm_statistics(torch, twin, rng)
    variables = _compare(torch, net, jcnn.models.resnet20(), (2, 32, 32, 3), rng)
    assert variables["batch_stats"]["layer3_2"]["bn2"]["var"].shape == (64,)


@pytest.mark.parametrize("bottleneck", [False, True])
def test_imagenet_resnet_logits_match_torch(torch, rng, bottleneck):
    """ImageNet stem, projection shortcuts (torchvision's downsample.0/1), basic and bottleneck."""
    torch.manual_seed(3)
    widths = (8, 16)
    twin = _resnet_twin(torch, (2, 1), widths, "imagenet", "projection", bottleneck, 5)
    net = _randomize_norm_statistics(torch, twin, rng)
    block = "bottleneck" if bottleneck else "basic"
    model = jcnn.models.ResNet((2, 1), block, num_classes=5, widths=widths)
    _compare(torch, net, model, (2, 40, 40, 3), rng)


def test_resnet_running_statistics_follow_torch_in_training(torch, rng):
    """Imported weights, one train-mode step: PyTorch's running variance (unbiased) with
    ``bn_unbiased_running_var=True``; the default's differs by the factor n / (n - 1)."""
    torch.manual_seed(6)
    twin = _resnet_twin(torch, (3, 3, 3), (16, 32, 64), "cifar", "pad", False, 10)
    twin = _randomize_norm_statistics(torch, twin, rng)
    x = rng.normal(size=(2, 32, 32, 3)).astype(np.float32)
    check_running_stats_follow_torch(
        torch, jcnn.models.resnet20(num_classes=10), twin, x, from_torch_state_dict
    )


def _airbench_twin(torch, widths):
    """airbench94's network: BatchNorm weights frozen at ones, eps 1e-12, no head bias."""
    nn = torch.nn

    def norm(channels):
        layer = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)
        layer.weight.requires_grad = False
        return layer

    class ConvGroup(nn.Module):
        def __init__(self, c_in, c_out):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, padding="same", bias=False)
            self.norm1 = norm(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, padding="same", bias=False)
            self.norm2 = norm(c_out)

        def forward(self, x):
            gelu = torch.nn.functional.gelu
            x = gelu(self.norm1(torch.nn.functional.max_pool2d(self.conv1(x), 2)))
            return gelu(self.norm2(self.conv2(x)))

    groups = [
        ConvGroup(c_in, c_out) for c_in, c_out in zip((24, *widths[:-1]), widths, strict=True)
    ]
    layers = [nn.Conv2d(3, 24, 2), nn.GELU(), *groups, nn.MaxPool2d(3), nn.Flatten()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], 10, bias=False))


class _ScaledTwin:
    """The twin's logits times airbench's 1/9 (a module-free wrapper for ``_compare``)."""

    def __init__(self, net):
        self.net = net

    def __call__(self, x):
        return self.net(x) / 9

    def state_dict(self):
        return self.net.state_dict()


def test_airbench_logits_match_torch_with_its_frozen_unit_norm_weights(torch, rng):
    """AirbenchNet's BatchNorms have no scale; PyTorch's weights of ones stand for none."""
    torch.manual_seed(5)
    widths = (8, 16, 16)
    net = _randomize_norm_statistics(torch, _airbench_twin(torch, widths), rng)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
    model = jcnn.models.AirbenchNet(widths=widths)
    variables = _compare(torch, _ScaledTwin(net), model, (2, 33, 35, 3), rng)
    assert "scale" not in variables["params"]["group2"]["norm1"]

    state = net.state_dict()
    state["4.norm2.weight"] = state["4.norm2.weight"] * 1.5
    with pytest.raises(
        ValueError,
        match=r"^4\.norm2\.weight: the jcnn layer group3/norm2 has no scale, which only a "
        r"tensor of 1s can stand for; got values from 1\.5 to 1\.5",
    ):
        from_torch_state_dict(model, state, (1, 32, 32, 3))
    state["4.norm2.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match=r"^4\.norm2\.weight: shape \(3,\) does not fit"):
        from_torch_state_dict(model, state, (1, 32, 32, 3))


def test_weights_file_round_trip_and_checks(torch, tmp_path):
    torch.manual_seed(4)
    net = _lenet_twin(torch)
    path = tmp_path / "lenet.pt"
    torch.save(net.state_dict(), path)
    model = jcnn.models.LeNet5()
    variables = load_torch_weights(path, model, (1, 28, 28, 1))
    expected = net.conv1.weight.detach().numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(np.asarray(variables["params"]["conv1"]["kernel"]), expected)
    # A checkpoint that wraps the weights is accepted too.
    torch.save({"state_dict": net.state_dict(), "epoch": 3}, tmp_path / "checkpoint.pt")
    wrapped = load_torch_weights(tmp_path / "checkpoint.pt", model, (1, 28, 28, 1))
    assert jax.tree.all(jax.tree.map(np.array_equal, wrapped, variables))

    # Shapes that do not fit: the message names the PyTorch key and the jcnn parameter.
    state = net.state_dict()
    state["fc1.weight"] = torch.zeros(400, 2450)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(
        ValueError, match=r"fc1\.weight: shape \(400, 2450\) does not fit jcnn parameter fc1/kernel"
    ):
        load_torch_weights(tmp_path / "bad.pt", model, (1, 28, 28, 1))
    state = net.state_dict()
    del state["conv2.bias"]
    with pytest.raises(ValueError, match=r"conv2\.bias: missing from the state_dict"):
        from_torch_state_dict(model, state, (1, 28, 28, 1))
    state = net.state_dict()
    del state["fc2.weight"], state["fc2.bias"]
    with pytest.raises(ValueError, match="state_dict: expected 4 modules with parameters"):
        from_torch_state_dict(model, state, (1, 28, 28, 1))


def test_pickled_code_is_refused(torch, tmp_path):
    """weights_only=True: a file that would run code on load is rejected, the code never runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"conv1.weight": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        load_torch_weights(tmp_path / "evil.pt", jcnn.models.LeNet5(), (1, 28, 28, 1))
    assert not marker.exists()


def test_a_truncated_or_empty_weights_file_is_a_value_error_naming_it(torch, tmp_path):
    # torch's own errors (a RuntimeError from its zip reader, a bare EOFError) named no file
    model = jcnn.nn.Sequential([jcnn.nn.Conv(2, 3)])
    torch.save(torch.nn.Conv2d(1, 2, 3).state_dict(), tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    for name in ("truncated.pt", "empty.pt"):
        with pytest.raises(ValueError, match=f"path: .*{name} is not a readable PyTorch weights"):
            load_torch_weights(tmp_path / name, model, (1, 5, 5, 1))
    assert set(load_torch_weights(tmp_path / "whole.pt", model, (1, 5, 5, 1))) == {"params"}


def test_a_corrupt_or_foreign_weights_file_is_a_value_error_naming_it(torch, tmp_path):
    # torch raised a bare KeyError (text) or an UnpicklingError (random bytes, a flipped byte in
    # the pickle) whose advice was to load with weights_only=False, i.e. run the file's code
    model = jcnn.nn.Sequential([jcnn.nn.Conv(2, 3)])
    torch.save(torch.nn.Conv2d(1, 2, 3).state_dict(), tmp_path / "whole.pt")
    data = (tmp_path / "whole.pt").read_bytes()
    start = data.index(b"\x80\x02c")  # the pickle record's first byte (its protocol)
    flipped = data[:start] + bytes([data[start] ^ 0xFF]) + data[start + 1 :]
    (tmp_path / "flipped.pt").write_bytes(flipped)
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(100))
    (tmp_path / "text.pt").write_text("hello world")
    for name in ("flipped.pt", "random.pt", "text.pt"):
        with pytest.raises(ValueError, match=f"path: .*{name} is not a (readable|plain) PyTorch"):
            load_torch_weights(tmp_path / name, model, (1, 5, 5, 1))


@pytest.mark.parametrize("dtype_name", ["complex64", "complex128", "bool"])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_complex_or_boolean_tensors_are_refused(torch, dtype_name, as_numpy):
    # A complex weight would lose its imaginary part in the float32 cast, a bool one its meaning.
    state_dict = _lenet_twin(torch).state_dict()
    weight = state_dict["conv2.weight"]
    changed = weight.to(getattr(torch, dtype_name))
    state_dict["conv2.weight"] = changed.numpy() if as_numpy else changed
    with pytest.raises(TypeError, match=r"state_dict\['conv2.weight'\]: expected a"):
        from_torch_state_dict(jcnn.models.LeNet5(), state_dict, (1, 28, 28, 1))


def test_bfloat16_and_float64_tensors_are_converted_exactly(torch, rng):
    torch.manual_seed(1)
    net = _lenet_twin(torch)
    want = from_torch_state_dict(jcnn.models.LeNet5(), net.state_dict(), (1, 28, 28, 1))
    wide = {k: v.double() for k, v in net.state_dict().items()}
    got = from_torch_state_dict(jcnn.models.LeNet5(), wide, (1, 28, 28, 1))
    jax.tree.map(np.testing.assert_array_equal, got, want)
    narrow = {k: v.bfloat16() for k, v in net.state_dict().items()}
    got = from_torch_state_dict(jcnn.models.LeNet5(), narrow, (1, 28, 28, 1))
    rounded = {k: v.bfloat16().float().numpy() for k, v in net.state_dict().items()}
    np.testing.assert_array_equal(got["params"]["conv1"]["bias"], rounded["conv1.bias"])


def test_meta_quantized_sparse_and_float8_tensors(torch):
    # each raised torch's own error (NotImplementedError "Cannot copy out of meta tensor",
    # TypeError "Got unsupported ScalarType", "can't convert Sparse layout") naming no key
    model = jcnn.nn.Sequential([jcnn.nn.Dense(3)])
    torch.manual_seed(0)
    weight, bias = torch.randn(3, 4), torch.zeros(3)
    with pytest.raises(ValueError, match=r"state_dict\['0.weight'\]: a tensor on the meta device"):
        from_torch_state_dict(model, {"0.weight": weight.to("meta"), "0.bias": bias}, (1, 4))
    with warnings.catch_warnings():  # torch deprecates creating quantized tensors
        warnings.simplefilter("ignore", UserWarning)
        quantized = torch.quantize_per_tensor(weight, 0.1, 0, torch.qint8)
    with pytest.raises(TypeError, match=r"state_dict\['0.weight'\]: .*quantized dtype"):
        from_torch_state_dict(model, {"0.weight": quantized, "0.bias": bias}, (1, 4))
    # a sparse tensor holds its values exactly, a float8 one widens exactly to float32
    got = from_torch_state_dict(model, {"0.weight": weight.to_sparse(), "0.bias": bias}, (1, 4))
    np.testing.assert_array_equal(got["params"]["layers_0"]["kernel"], weight.numpy().T)
    narrow = weight.to(torch.float8_e4m3fn)
    got = from_torch_state_dict(model, {"0.weight": narrow, "0.bias": bias}, (1, 4))
    np.testing.assert_array_equal(got["params"]["layers_0"]["kernel"], narrow.float().numpy().T)


def test_torchvision_input_shape_is_checked():
    model = jcnn.models.MobileNetV2(num_classes=3)
    for shape in (32, "1,32,32,3", None):
        with pytest.raises(TypeError, match="input_shape: expected a shape tuple"):
            from_torchvision_state_dict(model, {}, shape)
    with pytest.raises(TypeError, match=r"input_shape: expected .*ints.*, got \(1, 32.0, 32, 3\)"):
        from_torchvision_state_dict(model, {}, (1, 32.0, 32, 3))
    with pytest.raises(ValueError, match=r"input_shape: expected sizes >= 1, got \(0, 32, 32, 3\)"):
        from_torchvision_state_dict(model, {}, (0, 32, 32, 3))
    # a shape as an integer array is a shape: the conversion goes on to the (empty) state_dict
    with pytest.raises(ValueError, match="missing from the state_dict"):
        from_torchvision_state_dict(model, {}, np.array([1, 32, 32, 3]))


def test_torchvision_input_shape_without_the_batch_axis_is_named():
    # (32, 32, 3) was traced as the model's input and blamed "x: expected rank 4"
    model = jcnn.models.MobileNetV2(num_classes=3)
    for shape in ((32, 32, 3), (1, 1, 32, 32, 3)):
        with pytest.raises(ValueError, match=r"input_shape: expected \(N, H, W, C\)"):
            from_torchvision_state_dict(model, {}, shape)


def test_imported_variables_do_not_share_memory_with_the_tensors(torch, rng):
    # on CPU the variables aliased the tensors: a training-mode forward of the PyTorch twin
    # (running statistics) or an optimizer step then changed the imported jcnn variables
    net = _randomize_norm_statistics(
        torch, torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)), rng
    )
    model = jcnn.nn.Sequential([jcnn.nn.Conv(4, 3), jcnn.nn.BatchNorm()])
    variables = from_torch_state_dict(model, net.state_dict(), (1, 6, 6, 3))
    before = jax.tree.map(np.array, variables)
    net.train()(torch.from_numpy(rng.normal(size=(2, 3, 6, 6)).astype(np.float32)))
    with torch.no_grad():
        net[0].bias.add_(1.0)
    jax.tree.map(np.testing.assert_array_equal, variables, before)

    state = _one_block_convnext_state(rng)
    convnext = jcnn.models.ConvNeXt((1,), (4,), num_classes=2, patch_size=2)
    variables = from_torchvision_state_dict(convnext, state, (1, 4, 4, 3))
    before = jax.tree.map(np.array, variables)
    for array in state.values():
        array += 1.0
    jax.tree.map(np.testing.assert_array_equal, variables, before)


def test_torchvision_stray_num_batches_tracked_is_named(rng):
    # a num_batches_tracked belongs to a BatchNorm; one without its BatchNorm's running
    # statistics (another network's, a ConvNeXt has none) was dropped without a word
    state = _one_block_convnext_state(rng)
    convnext = jcnn.models.ConvNeXt((1,), (4,), num_classes=2, patch_size=2)
    from_torchvision_state_dict(convnext, state, (1, 4, 4, 3))
    state["features.1.0.block.1.num_batches_tracked"] = np.array(3)
    with pytest.raises(ValueError, match=r"features\.1\.0\.block\.1\.num_batches_tracked"):
        from_torchvision_state_dict(convnext, state, (1, 4, 4, 3))


def _one_block_convnext_state(rng):
    """A one-block ConvNeXt's state dict with torchvision's names, as NumPy arrays (widths 4, 16;
    for ``ConvNeXt((1,), (4,), num_classes=2, patch_size=2)``)."""
    shapes = {
        "features.0.0.weight": (4, 3, 2, 2),
        "features.0.0.bias": (4,),
        "features.0.1.weight": (4,),
        "features.0.1.bias": (4,),
        "features.1.0.block.0.weight": (4, 1, 7, 7),
        "features.1.0.block.0.bias": (4,),
        "features.1.0.block.2.weight": (4,),
        "features.1.0.block.2.bias": (4,),
        "features.1.0.block.3.weight": (16, 4),
        "features.1.0.block.3.bias": (16,),
        "features.1.0.block.5.weight": (4, 16),
        "features.1.0.block.5.bias": (4,),
        "features.1.0.layer_scale": (4, 1, 1),
        "classifier.0.weight": (4,),
        "classifier.0.bias": (4,),
        "classifier.2.weight": (2, 4),
        "classifier.2.bias": (2,),
    }
    return {key: rng.normal(size=shape).astype(np.float32) for key, shape in shapes.items()}


def test_layers_named_as_the_twins_modules_are_matched_by_name(torch):
    # a setup (or a twin) defining its modules in another order than they run: matched by order,
    # the two same-shaped convs swapped weights silently
    class Twin(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Conv2d(3, 3, 3, padding=1)  # registered first, runs last
            self.stem = torch.nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.head(torch.relu(self.stem(x)))

    class Model(flax_nn.Module):
        def setup(self):
            self.stem = jcnn.nn.Conv(3, 3, padding=1)
            self.head = jcnn.nn.Conv(3, 3, padding=1)

        def __call__(self, x):
            return self.head(jax.nn.relu(self.stem(x)))

    torch.manual_seed(0)
    twin = Twin().eval()
    variables = from_torch_state_dict(Model(), twin.state_dict(), (1, 6, 5, 3))
    x = np.random.default_rng(0).normal(size=(1, 6, 5, 3)).astype(np.float32)
    with torch.no_grad():
        want = twin(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(Model().apply(variables, jnp.asarray(x)), want, atol=1e-5)
