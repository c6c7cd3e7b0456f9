"""U-Net: the paper's parameter count and output size, a PyTorch twin (transposed convs, skip
concatenations, valid and same padding, with and without BatchNorm), training step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import models

from ._helpers import assert_refused, count_params
from ._zoo import check_training_step, randomize_torch, torch_forward


def _paper_count(in_channels=1, widths=(64, 128, 256, 512, 1024), out_channels=2):
    """Ronneberger et al.'s Fig. 1 counted by hand: 3x3 convs with bias, 2x2 up-convs, 1x1 head."""

    def conv(k, cin, cout):
        return k * k * cin * cout + cout

    total, cin = 0, in_channels
    for width in widths:
        total += conv(3, cin, width) + conv(3, width, width)
        cin = width
    for deep, width in zip(widths[:0:-1], widths[-2::-1], strict=True):
        total += conv(2, deep, width) + conv(3, 2 * width, width) + conv(3, width, width)
    return total + conv(1, widths[0], out_channels)


def test_paper_network_count_and_output_size():
    assert _paper_count() == 31_030_658
    assert count_params(models.UNet(), (1, 572, 572, 1)) == 31_030_658
    out = jax.eval_shape(
        lambda x: models.UNet().init_with_output(jax.random.key(0), x)[0],
        jax.ShapeDtypeStruct((1, 572, 572, 1), jnp.float32),
    )
    assert out.shape == (1, 388, 388, 2)  # the paper's 572 -> 388 tile


def _torch_twin(torch, in_channels, widths, out_channels, padding, batch_norm):
    tnn = torch.nn

    def double(cin, cout):
        layers = []
        for c in (cin, cout):
            layers.append(tnn.Conv2d(c, cout, 3, padding=padding, bias=not batch_norm))
            if batch_norm:
                layers.append(tnn.BatchNorm2d(cout))
            layers.append(tnn.ReLU())
        return tnn.Sequential(*layers)

    class Twin(tnn.Module):
        def __init__(self):
            super().__init__()
            self.down = tnn.ModuleList()
            cin = in_channels
            for width in widths[:-1]:
                self.down.append(double(cin, width))
                cin = width
            self.bottom = double(cin, widths[-1])
            self.up = tnn.ModuleList()
            self.up_blocks = tnn.ModuleList()
            for deep, width in zip(widths[:0:-1], widths[-2::-1], strict=True):
                self.up.append(tnn.ConvTranspose2d(deep, width, 2, 2))
                self.up_blocks.append(double(2 * width, width))
            self.head = tnn.Conv2d(widths[0], out_channels, 1)

        def forward(self, x):
            skips = []
            for block in self.down:
                x = block(x)
                skips.append(x)
                x = tnn.functional.max_pool2d(x, 2)
            x = self.bottom(x)
            for up, block, skip in zip(self.up, self.up_blocks, skips[::-1], strict=True):
                x = up(x)
                top = (skip.shape[2] - x.shape[2]) // 2
                left = (skip.shape[3] - x.shape[3]) // 2
                skip = skip[:, :, top : top + x.shape[2], left : left + x.shape[3]]
                x = block(torch.cat([skip, x], 1))
            return self.head(x)

    return Twin()


def _variables_from_twin(twin, depth, batch_norm):
    """The twin's weights under jcnn's names (conv OIHW -> HWIO, transposed IOHW -> HWIO)."""
    state = {k: v.numpy() for k, v in twin.state_dict().items()}
    params, stats = {}, {}

    def double(prefix, name):
        params[name], stats[name] = {}, {}
        step = 3 if batch_norm else 2
        for i in (1, 2):
            conv = f"{prefix}.{(i - 1) * step}"
            params[name][f"conv{i}"] = {"kernel": state[f"{conv}.weight"].transpose(2, 3, 1, 0)}
            if batch_norm:
                bn = f"{prefix}.{(i - 1) * step + 1}"
                params[name][f"bn{i}"] = {
                    "scale": state[f"{bn}.weight"],
                    "bias": state[f"{bn}.bias"],
                }
                stats[name][f"bn{i}"] = {
                    "mean": state[f"{bn}.running_mean"],
                    "var": state[f"{bn}.running_var"],
                }
            else:
                params[name][f"conv{i}"]["bias"] = state[f"{conv}.bias"]

    for level in range(1, depth + 1):
        double(f"down.{level - 1}", f"down{level}")
        double(f"up_blocks.{depth - level}", f"up{level}_block")
        params[f"up{level}"] = {
            "kernel": state[f"up.{depth - level}.weight"].transpose(2, 3, 0, 1),
            "bias": state[f"up.{depth - level}.bias"],
        }
    double("bottom", "bottom")
    params["head"] = {
        "kernel": state["head.weight"].transpose(2, 3, 1, 0),
        "bias": state["head.bias"],
    }
    variables = {"params": params}
    if batch_norm:
        variables["batch_stats"] = stats
    return jax.tree.map(jnp.asarray, variables)


@pytest.mark.parametrize(
    ("widths", "padding", "batch_norm", "size", "in_channels", "out_channels"),
    [
        ((4, 6, 8), "valid", False, (44, 48), 1, 2),
        ((3, 5, 7, 9), "same", True, (16, 24), 2, 3),
        ((5,), "same", False, (7, 9), 3, 1),
    ],
)
def test_matches_a_pytorch_twin(
    torch, rng, widths, padding, batch_norm, size, in_channels, out_channels
):
    twin = _torch_twin(
        torch, in_channels, widths, out_channels, {"valid": 0, "same": 1}[padding], batch_norm
    )
    randomize_torch(torch, twin, seed=3)
    model = models.UNet(out_channels, widths, padding, batch_norm)
    x = rng.normal(size=(2, *size, in_channels)).astype(np.float32)
    assert count_params(model, x.shape) == sum(p.numel() for p in twin.parameters())
    if padding == "valid" and batch_norm is False:
        assert count_params(model, x.shape) == _paper_count(in_channels, widths, out_channels)
    variables = _variables_from_twin(twin, len(widths) - 1, batch_norm)
    expected = torch_forward(torch, twin, x)
    got = jax.jit(model.apply)(variables, jnp.asarray(x))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_training_step_segmentation_loss(rng):
    model = models.UNet(out_channels=3, widths=(4, 8), padding="same", batch_norm=True)
    x = jnp.asarray(rng.normal(size=(2, 8, 6, 1)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, size=(2, 8, 6)))
    check_training_step(model, x, labels)


@pytest.mark.parametrize(
    ("shape", "padding", "message"),
    [
        ((1, 18, 16, 1), "same", "height 18 .* level 2 max-pools a map of height 9"),
        ((1, 44, 31, 1), "valid", "width 31 .* level 1 max-pools a map of width 27"),
        ((1, 20, 20, 1), "valid", "too small"),
        ((1, 32, 44, 1), "valid", "height 32 is too small .* decoder's map at level 2"),
        ((1, 44, 40, 1), "valid", "width 40 is too small .* decoder's map at level 1"),
        # the message gave the pooled map a negative size ("a map of height -1")
        ((1, 3, 40, 1), "valid", r"height 3 is too small .*level 1's convolutions would leave"),
    ],
)
def test_sizes_that_do_not_fit_are_named(shape, padding, message):
    model = models.UNet(widths=(4, 8, 16), padding=padding)
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.key(0), jnp.zeros(shape))
    with pytest.raises(ValueError, match="padding"):
        models.UNet(padding="full").init(jax.random.key(0), jnp.zeros(shape))


@pytest.mark.parametrize(
    "setting, error, says",
    [
        ({"out_channels": 0}, ValueError, r"out_channels: expected an int >= 1, got 0"),
        ({"widths": (4, 8.0)}, TypeError, r"widths\[1\]: expected an int >= 1, got 8.0"),
        ({"batch_norm": "yes"}, TypeError, r"batch_norm: expected a Python bool, got 'yes'"),
        (
            {"bn_momentum": -1.0},
            ValueError,
            r"bn_momentum: expected a number in \[0, 1\], got -1.0",
        ),
    ],
)
def test_bad_settings_are_named_as_the_model_calls_them(setting, error, says):
    # they used to surface as the inner layer's argument (features, momentum, rate) or pass
    assert_refused(
        models.UNet(widths=(4, 8), padding="same").clone(**setting),
        (1, 16, 16, 1),
        error,
        says,
    )


def test_double_conv_checks_its_own_settings():
    # an unknown padding was a KeyError from inside
    assert_refused(models.DoubleConv(4, padding="full"), (1, 8, 8, 1), ValueError, "padding: ")
    assert_refused(models.DoubleConv(4, batch_norm=1), (1, 8, 8, 1), TypeError, "batch_norm: ")


@pytest.mark.parametrize(
    ("model", "shape"),
    [
        (models.UNet(widths=(4, 8), padding="same"), (1, 8, 8, 0)),
        (models.DoubleConv(4), (1, 8, 8, 0)),
        (models.DoubleConv(4), (1, 8, 0, 2)),
    ],
)
def test_empty_images_are_blamed_on_x(model, shape):
    # the first conv's initializer used to blame its kernel shape ("shape: ... fan_in 0")
    says = rf"^x: {type(model).__name__} expects at least one pixel and one channel, got shape"
    assert_refused(model, shape, ValueError, says)
