"""Tests of jcnn.analysis.summary: output-size formulas (vs PyTorch), the course's tables, and
receptive fields (vs the gradient-based definition)."""

import dataclasses
import math

import flax.linen as flax_nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jcnn
from jcnn import functional as F
from jcnn import nn
from jcnn.analysis import (
    ReceptiveField,
    conv_output_size,
    pool_output_size,
    receptive_field,
    summary,
)
from jcnn.models.resnet import BasicBlock


def test_output_sizes_match_torch(torch, rng):
    for _ in range(300):
        kernel, stride, dilation = (int(v) for v in rng.integers(1, 5, size=3))
        padding = int(rng.integers(0, kernel // 2 + 1))
        size = int(rng.integers(dilation * (kernel - 1) + 1, 20))
        x = torch.zeros(1, 1, size)
        conv = torch.nn.functional.conv1d(
            x, torch.zeros(1, 1, kernel), stride=stride, padding=padding, dilation=dilation
        )
        assert conv_output_size(size, kernel, stride, padding, dilation) == conv.shape[-1]
        for ceil_mode in (False, True):
            pooled = torch.nn.functional.max_pool1d(
                x, kernel, stride, padding, dilation=dilation, ceil_mode=ceil_mode
            )
            expected = pooled.shape[-1]
            assert pool_output_size(size, kernel, stride, padding, dilation, ceil_mode) == expected
            assert conv_output_size(size, kernel, stride, padding, dilation, ceil_mode) == expected


def test_output_size_checks():
    with pytest.raises(ValueError, match="kernel: the dilated window 5 is larger"):
        conv_output_size(4, 3, dilation=2)
    with pytest.raises(ValueError, match="stride: expected an int >= 1, got 0"):
        conv_output_size(8, 3, stride=0)
    with pytest.raises(TypeError, match="size: expected an int, got 2.5"):
        conv_output_size(2.5, 1)
    with pytest.raises(ValueError, match="padding: expected at most half the window"):
        pool_output_size(8, 2, padding=2)


def test_output_size_checks_name_the_argument_of_any_type():
    for kwargs, name in (
        (dict(padding="1"), "padding"),
        (dict(padding=None), "padding"),
        (dict(stride=2.0), "stride"),
        (dict(dilation=True), "dilation"),
    ):
        with pytest.raises(TypeError, match=f"{name}: expected an int, got"):
            pool_output_size(8, 2, **kwargs)
    with pytest.raises(TypeError, match="window: expected an int, got None"):
        pool_output_size(8, None)
    for function in (conv_output_size, pool_output_size):
        with pytest.raises(TypeError, match="ceil_mode: expected a Python bool, got 'no'"):
            function(7, 2, 2, ceil_mode="no")  # a non-empty string would round up
        assert function(7, 2, 2, ceil_mode=np.bool_(True)) == 4


def test_ceil_mode_sizes_of_windows_wider_than_the_padded_input_match_torch(torch, rng):
    # PyTorch's ceil_mode keeps one window overhanging the right edge by less than the stride
    for _ in range(200):
        kernel, dilation = int(rng.integers(2, 6)), int(rng.integers(1, 3))
        padding = int(rng.integers(0, kernel // 2 + 1))
        fits = dilation * (kernel - 1) + 1 - 2 * padding  # the smallest input the window fits
        if fits < 2:
            continue
        size, stride = int(rng.integers(max(fits - 3, 1), fits)), int(rng.integers(1, 5))
        try:
            pooled = torch.nn.functional.max_pool1d(
                torch.zeros(1, 1, size), kernel, stride, padding, dilation=dilation, ceil_mode=True
            )
        except RuntimeError:  # no window starts inside the input
            with pytest.raises(ValueError, match=f"not less than the stride {stride}$"):
                pool_output_size(size, kernel, stride, padding, dilation, ceil_mode=True)
            continue
        want = pooled.shape[-1]
        assert pool_output_size(size, kernel, stride, padding, dilation, ceil_mode=True) == want


def test_pool_output_size_names_its_window_when_the_window_does_not_fit():
    message = r"^window: the dilated window 3 is larger than the padded input 2$"
    with pytest.raises(ValueError, match=message):
        pool_output_size(2, 3)
    with pytest.raises(ValueError, match=r"^kernel: the dilated window 5 is larger"):
        conv_output_size(4, 3, dilation=2)


def test_course_conv_example():
    """001: ten 5x5 filters, stride 1, pad 2 on 3x32x32: 760 parameters, 768,000 MACs."""
    table = summary(nn.Conv(10, (5, 5), stride=1, padding=2), (1, 32, 32, 3))
    (row,) = table.rows
    assert row.output_shape == (1, 32, 32, 10)
    assert (row.params, row.macs) == (760, 768_000)
    assert (table.total_params, table.total_macs) == (760, 768_000)


def test_course_output_sizes():
    """001 and 003: a 7x7 input and a 3x3 filter give 5x5, 3x3 with stride 2, 7x7 with a
    one-pixel pad; zero padding (F - 1) / 2 keeps 7x7 for F = 3, 5, 7."""
    assert conv_output_size(7, 3) == 5
    assert conv_output_size(7, 3, stride=2) == 3
    assert conv_output_size(7, 3, padding=1) == 7
    assert [conv_output_size(7, f, padding=(f - 1) // 2) for f in (3, 5, 7)] == [7, 7, 7]
    assert summary(nn.Conv(1, 3, stride=2), (1, 7, 7, 1)).rows[0].output_shape == (1, 3, 3, 1)


def test_course_parameter_counts_of_dense_local_and_shared_layers():
    """003: full connections from a 200x200 RGB image to 1000 units: 200*200*3*1000 = 120
    million. 004, a 200x200 image and 40K hidden units: fully connected ~2B (1.6 billion),
    locally connected with 10x10 filters 4M, 100 shared 10x10 filters 10K (weights only)."""

    def weights(model, image):
        return summary(model, (1, *image)).total_params

    dense = nn.Sequential([nn.Flatten(), nn.Dense(1000, use_bias=False)])
    assert weights(dense, (200, 200, 3)) == 120_000_000
    dense = nn.Sequential([nn.Flatten(), nn.Dense(40_000, use_bias=False)])
    assert weights(dense, (200, 200, 1)) == 1_600_000_000
    local = nn.LocallyConnected(1, 10, padding="SAME", use_bias=False)
    assert summary(local, (1, 200, 200, 1)).rows[0].output_shape == (1, 200, 200, 1)  # 40K units
    assert weights(local, (200, 200, 1)) == 4_000_000
    assert weights(nn.Conv(100, 10, padding="SAME", use_bias=False), (200, 200, 1)) == 10_000


# The course's LeNet-5 table (001): layer, output size (C x H x W), weight size (OIHW).
_LENET_COURSE = [
    ("Conv", (20, 28, 28), (20, 1, 5, 5)),
    ("ReLU", (20, 28, 28), None),
    ("MaxPool", (20, 14, 14), None),
    ("Conv", (50, 14, 14), (50, 20, 5, 5)),
    ("ReLU", (50, 14, 14), None),
    ("MaxPool", (50, 7, 7), None),
    ("Flatten", (2450,), None),
    ("Linear", (500,), (2450, 500)),
    ("ReLU", (500,), None),
    ("Linear", (10,), (500, 10)),
]


def _course_layout(row):
    """A jcnn row in the course's notation: CHW outputs, OIHW conv weights, Linear for Dense."""
    kind = row.layer.split("(")[0].replace("Dense", "Linear")
    out = row.output_shape[1:]
    out = (out[-1], *out[:-1]) if len(out) == 3 else out
    weight = row.weight_shape
    if weight is not None and len(weight) == 4:
        weight = (weight[3], weight[2], weight[0], weight[1])
    return kind, out, weight


def test_lenet5_reproduces_course_table():
    table = summary(jcnn.models.LeNet5(), (1, 28, 28, 1))
    assert [_course_layout(row) for row in table.rows] == _LENET_COURSE
    assert table.rows[0].layer == "Conv(20, k=5, s=1, p=2)"
    assert table.rows[2].layer == "MaxPool(k=2, s=2)"
    assert [row.params for row in table.rows if row.params] == [520, 25_050, 1_225_500, 5_010]
    assert table.total_params == 1_256_080
    macs = [28 * 28 * 20 * 25, 14 * 14 * 50 * 500, 2450 * 500, 500 * 10]
    assert [row.macs for row in table.rows if row.macs] == macs
    assert table.total_macs == sum(macs)
    # Receptive field: 5, then the pool (6, stride 2), then 6 + 4 * 2 = 14, pool 16 (stride 4).
    assert [row.receptive_field.size[0] for row in table.rows[:6]] == [5, 5, 6, 14, 14, 16]
    assert [row.receptive_field.stride[0] for row in table.rows[:6]] == [1, 1, 2, 2, 2, 4]
    text = str(table)
    assert "Total params: 1,256,080" in text
    assert "(1, 7, 7, 50)" in text and "(2450, 500)" in text
    assert len(text.splitlines()) == len(table.rows) + 5


def test_summary_counts_match_params_and_macs_formula(rng):
    """Grouped/strided/dilated convs: params equal the tree's, MACs the formula per output."""
    for _ in range(3):
        groups = int(rng.choice([1, 2]))
        c_in, c_out = 2 * int(rng.integers(1, 3)), 2 * int(rng.integers(1, 4))
        k, s, d = int(rng.integers(1, 4)), int(rng.integers(1, 3)), int(rng.integers(1, 3))
        conv = nn.Conv(c_out, (k, k + 1), stride=s, dilation=d, groups=groups, padding=1)
        model = nn.Sequential([conv, nn.Flatten(), nn.Dense(3)])
        shape = (2, 9, 8, c_in)
        table = summary(model, shape)
        x = jax.ShapeDtypeStruct(shape, jnp.float32)
        variables = jax.eval_shape(model.init, jax.random.key(0), x)
        assert table.total_params == sum(p.size for p in jax.tree.leaves(variables))
        out = table.rows[0].output_shape
        conv_params = {"params": variables["params"]["layers_0"]}
        assert out == jax.eval_shape(conv.apply, conv_params, x).shape
        assert out == (
            2,
            conv_output_size(9, k, s, 1, d),
            conv_output_size(8, k + 1, s, 1, d),
            c_out,
        )
        assert table.rows[0].macs == math.prod(out) * k * (k + 1) * c_in // groups
        assert table.rows[2].macs == 2 * math.prod(out[1:]) * 3


def test_stacked_convs_grow_linearly_and_pools_exponentially():
    for layers in range(1, 6):
        convs = nn.Sequential([nn.Conv(2, 3, padding=1) for _ in range(layers)])
        field = receptive_field(convs, (1, 16, 16, 1))
        assert field == ReceptiveField((1 + 2 * layers,) * 2, (1, 1), (-layers, -layers))
        blocks = []
        for _ in range(layers):
            blocks += [nn.Conv(2, 3, padding=1), nn.MaxPool(2)]
        field = receptive_field(nn.Sequential(blocks), (1, 64, 64, 1))
        assert field.size == (1 + 3 * (2**layers - 1),) * 2
        assert field.stride == (2**layers,) * 2


def test_resnet20_summary():
    table = summary(jcnn.models.resnet20(), (1, 32, 32, 3))
    assert table.total_params == 269_722
    names = [row.name for row in table.rows]
    assert names[:4] == ["conv1", "bn1", "relu", "layer1_0/conv1"]
    by_name = {row.name: row for row in table.rows}
    # 19 3x3 convs: 7 at stride 1, 6 at 2, 6 at 4: r = 1 + 2 * (7 + 12 + 24); centred windows.
    assert by_name["layer1_2/relu2"].receptive_field.size == (15, 15)
    assert by_name["layer2_2/relu2"].receptive_field.size == (37, 37)
    assert by_name["layer3_2/relu2"].receptive_field == ReceptiveField((81, 81), (4, 4), (-40, -40))


# --- receptive field against its gradient-based definition -------------------------------------


def _avg_for_max(next_fun, args, kwargs, context):
    """Max pooling routes the gradient to one pixel; its window is that of an average pool."""
    module = context.module
    if isinstance(module, nn.MaxPool) and context.method_name == "__call__":
        return F.avg_pool(args[0], module.window, module.stride, module.padding)
    return next_fun(*args, **kwargs)


def _dependency_box(model, shape, rng, unit=None):
    """Bounding box of the input pixels with non-zero gradient for output ``unit`` (default: the
    centre one), that unit and the mask of those pixels."""
    x = jnp.asarray(rng.uniform(0.5, 1.5, size=shape), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)
    # Positive weights and inputs keep every ReLU open and every product non-zero.
    variables = jax.tree.map(
        lambda v: jnp.asarray(rng.uniform(0.1, 1.1, v.shape), jnp.float32), shapes
    )
    spatial_out = jax.eval_shape(model.apply, variables, x).shape[1:-1]
    centre = tuple(n // 2 for n in spatial_out) if unit is None else unit

    def unit(x):
        with flax_nn.intercept_methods(_avg_for_max):
            y = model.apply(variables, x)
        return y[(0, *centre, 0)]

    grad = jax.jit(jax.grad(unit))(x)
    mask = np.asarray(jnp.abs(grad[0]).sum(-1) > 0)
    boxes = [(int(idx.min()), int(idx.max())) for idx in np.nonzero(mask)]
    return boxes, centre, mask


def _predicted_box(field, centre, spatial):
    return [
        (max(a + c * j, 0), min(a + c * j + r - 1, n - 1))
        for r, j, a, c, n in zip(
            field.size, field.stride, field.start, centre, spatial, strict=True
        )
    ]


def _random_layers(rng):
    layers = []
    for _ in range(int(rng.integers(2, 5))):
        k = int(rng.integers(1, 5))
        if rng.random() < 0.3:
            pool = nn.MaxPool if rng.random() < 0.5 else nn.AvgPool
            stride = int(rng.integers(1, k + 1))
            layers.append(pool(k, stride, padding=int(rng.integers(0, k // 2 + 1))))
        else:
            windowed = nn.LocallyConnected if rng.random() < 0.25 else nn.Conv
            layers.append(
                windowed(
                    2,
                    (k, int(rng.integers(1, 5))),
                    stride=int(rng.integers(1, 3)),
                    padding=int(rng.integers(0, 3)),
                    dilation=int(rng.integers(1, 3)),
                )
            )
            layers.append(nn.ReLU())
    return layers


def test_receptive_field_matches_gradient_definition(rng):
    shape = (1, 41, 37, 2)
    checked = checked_local = 0
    while checked < 8 or checked_local < 2:
        model = nn.Sequential(_random_layers(rng))
        try:
            field = receptive_field(model, shape)
        except ValueError:  # a window larger than its (shrunken) input: draw again
            continue
        # Dilations and strides leave holes in the window, so a window cut by the border can
        # have its first dependency inside: check a unit whose window fits in the image.
        unit = tuple(-(-max(-a, 0) // j) for a, j in zip(field.start, field.stride, strict=True))
        fits = all(
            a + i * j + r <= n
            for a, i, j, r, n in zip(
                field.start, unit, field.stride, field.size, shape[1:-1], strict=True
            )
        )
        if not fits:
            continue
        boxes, _, _ = _dependency_box(model, shape, rng, unit)
        assert boxes == _predicted_box(field, unit, shape[1:-1]), model
        checked += 1
        checked_local += any(isinstance(layer, nn.LocallyConnected) for layer in model.layers)


def test_receptive_field_full_box_without_dilation(rng):
    model = nn.Sequential(
        [nn.Conv(3, 5, stride=2, padding=2), nn.ReLU(), nn.MaxPool(3, 2, 1), nn.Conv(2, 3)]
    )
    shape = (1, 40, 40, 1)
    field = receptive_field(model, shape)
    assert field == ReceptiveField((17, 17), (4, 4), (-4, -4))
    boxes, centre, mask = _dependency_box(model, shape, rng)
    assert boxes == _predicted_box(field, centre, shape[1:-1])
    (r0, r1), (c0, c1) = boxes
    assert mask[r0 : r1 + 1, c0 : c1 + 1].all() and mask.sum() == (r1 - r0 + 1) * (c1 - c0 + 1)


def test_receptive_field_of_residual_blocks(rng):
    """Residual sums take the widest branch: ResNet basic blocks and nn.Residual."""
    model = nn.Sequential(
        [
            nn.Conv(4, 3, padding=1),
            BasicBlock(6, stride=2, shortcut="pad"),
            BasicBlock(6, stride=1),
            nn.Residual(
                nn.Sequential([nn.Conv(6, 3, padding=1), nn.ReLU(), nn.Conv(6, 5, padding=2)])
            ),
        ]
    )
    shape = (1, 40, 40, 3)
    field = receptive_field(model, shape)
    # 3, then 3x3/2 (+2), 3x3 (+4), two 3x3 (+8), 3x3 and 5x5 (+4 +8): 29 at stride 2.
    assert field.size == (29, 29) and field.stride == (2, 2)
    boxes, centre, _ = _dependency_box(model, shape, rng)
    assert boxes == _predicted_box(field, centre, shape[1:-1])


def test_receptive_field_of_a_projection_fed_the_model_input(rng):
    """The projection of a first residual block takes the input itself (no layer made it): its
    field is its own 5x5 window, not the body's 3x3 output grown by it."""
    model = nn.Residual(nn.Conv(2, 3, padding=1), projection=nn.Conv(2, 5, padding=2))
    shape = (1, 15, 15, 2)
    rows = {row.name: row for row in summary(model, shape).rows}
    assert rows["projection"].receptive_field == ReceptiveField((5, 5), (1, 1), (-2, -2))
    field = receptive_field(model, shape)
    assert field == ReceptiveField((5, 5), (1, 1), (-2, -2))
    boxes, centre, _ = _dependency_box(model, shape, rng)
    assert boxes == _predicted_box(field, centre, shape[1:-1])


def test_receptive_field_of_max_pools_as_of_average_pools():
    """Global and adaptive max pools have the geometry of their average twins; an adaptive
    pool's None keeps that axis."""
    shape = (1, 9, 10, 1)
    for average, maximum in [
        (nn.GlobalAvgPool(), nn.GlobalMaxPool()),
        (nn.AdaptiveAvgPool((7, 2)), nn.AdaptiveMaxPool((7, 2))),
        (nn.AdaptiveAvgPool((None, 2)), nn.AdaptiveMaxPool((None, 2))),
    ]:
        expected = receptive_field(nn.Sequential([nn.Conv(2, 3), average]), shape)
        assert receptive_field(nn.Sequential([nn.Conv(2, 3), maximum]), shape) == expected
    # 3x3 conv: 7 x 8 units of field 3; pooled to (7, 2): windows of 1 and of 4 (at stride 4)
    assert expected == ReceptiveField((3, 6), (1, 4), (0, 0))
    whole = receptive_field(nn.Sequential([nn.Conv(2, 3), nn.GlobalMaxPool()]), shape)
    assert whole.size == (9, 10)


def test_receptive_field_unknown_for_transposed_conv():
    model = nn.Sequential([nn.Conv(2, 3), nn.ConvTranspose(2, 2, stride=2)])
    assert receptive_field(model, (1, 8, 8, 1)) is None
    assert "?" in str(summary(model, (1, 8, 8, 1)))


class _ReturnsInner(flax_nn.Module):
    """Returns its inner container's output, which also feeds a wider conv it does not return."""

    @flax_nn.compact
    def __call__(self, x):
        y = nn.Sequential([nn.Conv(2, 3, padding=1), nn.Conv(2, 3, padding=1)], name="inner")(x)
        self.sow("intermediates", "wide", nn.Conv(2, 7, padding=3, name="wide")(y))
        return y


class _ReturnsInput(flax_nn.Module):
    """Returns its very input, after a conv whose output is only recorded."""

    @flax_nn.compact
    def __call__(self, x):
        self.sow("intermediates", "wide", nn.Conv(2, 9, padding=4, name="wide")(x))
        return x


class _Identity(flax_nn.Module):
    @flax_nn.compact
    def __call__(self, x):
        return x


@pytest.mark.parametrize(
    "model, expected",
    [
        (_ReturnsInner(), ReceptiveField((5, 5), (1, 1), (-2, -2))),
        (nn.Sequential([_ReturnsInput(), nn.Conv(2, 3)]), ReceptiveField((3, 3), (1, 1), (0, 0))),
        (nn.Sequential([_Identity(), nn.Conv(2, 3)]), ReceptiveField((3, 3), (1, 1), (0, 0))),
    ],
    ids=["inner-output-also-used", "container-returns-its-input", "identity-layer-first"],
)
def test_receptive_field_of_a_module_returning_an_array_made_before(model, expected, rng):
    """A module returning an array as is (its input, or a layer's output) has that array's
    field: not the widest among its layers (the unreturned 7x7 and 9x9 convs), nor unknown for
    an identity of unknown type."""
    shape = (1, 15, 15, 2)
    field = receptive_field(model, shape)
    assert field == expected
    boxes, centre, _ = _dependency_box(model, shape, rng)
    assert boxes == _predicted_box(field, centre, shape[1:-1])


def test_receptive_field_stays_unknown_where_an_earlier_map_has_the_same_shape():
    """The transposed conv's output (1, 7, 7, 2) has the shape of the first conv's: that conv's
    field (3 at stride 2) must not stand in for the network's; nor, in a U-Net, the skip's for
    the decoder's (its upsampled half comes through the transposed conv)."""
    model = nn.Sequential([nn.Conv(2, 3, 2), nn.Conv(2, 3, 2), nn.ConvTranspose(2, 3, 2)])
    assert receptive_field(model, (1, 16, 16, 2)) is None
    unet = jcnn.models.UNet(4, (4, 8), "same")
    assert receptive_field(unet, (1, 16, 16, 1)) is None
    rows = {row.name: row for row in summary(unet, (1, 16, 16, 1)).rows}
    assert rows["down1/conv2"].receptive_field.size == (5, 5)
    assert rows["up1_block/conv1"].receptive_field is None


def test_summary_input_checks():
    with pytest.raises(TypeError, match="input_shape: expected a shape tuple"):
        summary(jcnn.models.LeNet5(), 28)
    with pytest.raises(TypeError, match=r"input_shape: expected a shape tuple .*got '1,28,28,1'"):
        receptive_field(jcnn.models.LeNet5(), "1,28,28,1")  # was read as nine one-letter sizes
    # an array where its shape belongs: named by its shape, not printed whole
    with pytest.raises(
        TypeError, match=r"got an array of shape \(2, 28, 28, 1\) \(pass its .shape\)$"
    ):
        summary(jcnn.models.LeNet5(), np.zeros((2, 28, 28, 1)))
    with pytest.raises(TypeError, match=r"array of shape \(2, 28, 28, 1\)"):
        receptive_field(jcnn.models.LeNet5(), jnp.zeros((2, 28, 28, 1)))
    with pytest.raises(TypeError, match="model: expected a flax.linen.Module"):
        summary(lambda x: x, (1, 4, 4, 1))
    with pytest.raises(ValueError, match="x: expected rank 4"):
        summary(jcnn.models.LeNet5(), (28, 28, 1))
    # the layer's "x:" named an argument nobody passed: the shape is the caller's input_shape
    for tool in (summary, receptive_field):
        with pytest.raises(ValueError, match=r"^input_shape: the model refused an input of shape"):
            tool(jcnn.models.LeNet5(), (28, 28, 1))


def test_local_contrast_norm_depends_on_the_whole_image(rng):
    """Its divisor is at least the image's mean local deviation: every pixel counts."""
    model = nn.Sequential([nn.Conv(2, 3), nn.LocalContrastNorm(size=5)])
    shape = (1, 24, 24, 1)
    field = receptive_field(model, shape)
    # every unit sees the same window: no stride between neighbours
    assert field == ReceptiveField((24, 24), (0, 0), (0, 0))
    boxes, _, _ = _dependency_box(model, shape, rng, (0, 0))
    assert boxes == [(0, 23), (0, 23)]


@pytest.mark.parametrize("norm", [nn.GroupNorm(1), nn.LayerNorm(), nn.InstanceNorm()])
def test_layers_after_a_whole_map_normalization_keep_its_window(norm, rng):
    # the windows after it grew by the whole map's stride: a 3x3 conv after a GroupNorm of a
    # 10x10 map claimed a 32-pixel field on a 12-pixel image and unit 1 a window starting at 10
    model = nn.Sequential([nn.Conv(2, 3), norm, nn.Conv(2, 3), nn.AvgPool(2), nn.Conv(2, 2)])
    shape = (1, 12, 12, 1)
    field = receptive_field(model, shape)
    assert field == ReceptiveField((12, 12), (0, 0), (0, 0))
    boxes, centre, _ = _dependency_box(model, shape, rng, (1, 1))
    assert boxes == _predicted_box(field, centre, shape[1:-1]) == [(0, 11), (0, 11)]


def test_instance_norm_with_running_statistics_keeps_the_field_in_evaluation(rng):
    # summary runs the model with train=False, where such a norm uses its running statistics,
    # position by position: it was taken for a whole-map one (a 12x12 field of stride 0)
    model = nn.Sequential([nn.Conv(2, 3), nn.InstanceNorm(track_running_stats=True), nn.Conv(2, 3)])
    shape = (1, 12, 12, 1)
    field = receptive_field(model, shape)
    assert field == ReceptiveField((5, 5), (1, 1), (0, 0))
    assert summary(model, shape).rows[1].receptive_field == ReceptiveField((3, 3), (1, 1), (0, 0))
    x = jnp.asarray(rng.uniform(0.5, 1.5, size=shape), jnp.float32)
    variables = model.init(jax.random.key(0), x, train=False)
    grad = jax.grad(lambda x: model.apply(variables, x, train=False)[0, 4, 4, 0])(x)
    rows, cols = np.nonzero(np.asarray(grad[0, ..., 0]))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 8, 4, 8)


def test_depthwise_conv_rows_equal_the_grouped_conv_rows():
    # DepthwiseConv is Conv with groups = C_in: the same shapes, parameters, MACs and field.
    options = {"stride": (2, 1), "padding": 1, "dilation": (1, 2)}
    depthwise = nn.Sequential([nn.Conv(6, 3), nn.DepthwiseConv((3, 2), 3, **options)])
    grouped = nn.Sequential([nn.Conv(6, 3), nn.Conv(18, (3, 2), groups=6, **options)])
    got, want = summary(depthwise, (2, 13, 11, 3)), summary(grouped, (2, 13, 11, 3))
    for a, b in zip(got.rows, want.rows, strict=True):
        assert (a.output_shape, a.weight_shape, a.params, a.macs, a.receptive_field) == (
            b.output_shape,
            b.weight_shape,
            b.params,
            b.macs,
            b.receptive_field,
        )
    row = got.rows[-1]
    assert row.macs == math.prod(row.output_shape) * 3 * 2 > 0
    assert row.receptive_field.size == (5, 5)
    assert "DepthwiseConv(x3, k=3x2, s=2x1, p=1, d=1x2)" in str(got)


def test_locally_connected_rows_equal_the_conv_rows_but_parameters():
    # An unshared conv: the same shapes, MACs and receptive field as the conv, its own weights
    # at every output position.
    options = {"stride": (2, 1), "padding": 1, "dilation": (1, 2)}
    local = nn.Sequential([nn.Conv(4, 3), nn.LocallyConnected(5, (3, 2), **options)])
    conv = nn.Sequential([nn.Conv(4, 3), nn.Conv(5, (3, 2), **options)])
    got, want = summary(local, (2, 13, 11, 3)), summary(conv, (2, 13, 11, 3))
    for a, b in zip(got.rows, want.rows, strict=True):
        assert (a.output_shape, a.macs, a.receptive_field) == (
            b.output_shape,
            b.macs,
            b.receptive_field,
        )
    row = got.rows[-1]
    assert row.macs == math.prod(row.output_shape) * 3 * 2 * 4 > 0
    out_positions = math.prod(row.output_shape[1:-1])
    assert row.params == out_positions * (3 * 2 * 4 * 5 + 5)
    assert row.receptive_field.size == (5, 5)
    assert "LocallyConnected(5, k=3x2, s=2x1, p=1, d=1x2)" in str(got)


class _FlaxNet(flax_nn.Module):
    """Plain flax.linen layers, twin of _JCNN_TWIN."""

    @flax_nn.compact
    def __call__(self, x):
        x = flax_nn.Conv(8, (3, 3), strides=2, padding="SAME")(x)
        x = flax_nn.relu(x)
        x = flax_nn.Conv(
            8, (3, 3), feature_group_count=4, kernel_dilation=2, padding=((1, 2), (0, 1))
        )(x)
        x = flax_nn.Conv(6, (3, 2), strides=(2, 1), padding="VALID")(x)
        x = flax_nn.Conv(6, (1, 3), padding=1, use_bias=False)(x)
        x = flax_nn.Dense(5)(x)
        x = flax_nn.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID")(x)
        return flax_nn.Dense(10)(x.reshape(x.shape[0], -1))


_JCNN_TWIN = nn.Sequential(
    [
        nn.Conv(8, 3, stride=2, padding="SAME"),
        nn.ReLU(),
        nn.Conv(8, 3, groups=4, dilation=2, padding=((1, 2), (0, 1))),
        nn.Conv(6, (3, 2), stride=(2, 1)),
        nn.Conv(6, (1, 3), padding=1, use_bias=False),
        nn.Dense(5),
        nn.ConvTranspose(4, 2, stride=2),
        nn.Flatten(),
        nn.Dense(10),
    ]
)


def test_plain_flax_layers_are_counted_as_their_jcnn_twins():
    shape = (2, 17, 16, 3)
    flax_table, jcnn_table = summary(_FlaxNet(), shape), summary(_JCNN_TWIN, shape)
    flax_rows = flax_table.rows
    jcnn_rows = [row for row in jcnn_table.rows if row.params]
    assert len(flax_rows) == len(jcnn_rows) == 7
    for a, b in zip(flax_rows, jcnn_rows, strict=True):
        assert (a.output_shape, a.weight_shape, a.params, a.macs) == (
            b.output_shape,
            b.weight_shape,
            b.params,
            b.macs,
        )
        assert a.macs > 0
    # the convolutions and the dense layer on the map have the twins' receptive fields
    for a, b in zip(flax_rows[:5], jcnn_rows[:5], strict=True):
        assert a.receptive_field == b.receptive_field is not None
    assert flax_rows[5].receptive_field is None  # a transposed conv, as for jcnn's
    assert (flax_table.total_params, flax_table.total_macs) == (
        jcnn_table.total_params,
        jcnn_table.total_macs,
    )
    assert flax_table.uncounted == ()
    assert flax_rows[1].layer == "Conv(8, k=3, s=1, p=((1, 2), (0, 1)), d=2, g=4)"


def test_plain_flax_layers_match_hand_counts():
    # 3x3 stride 2 SAME on 5x5, 2 groups of 1 -> 2 channels each: 3x3 outputs x 4 x 9 taps x 1
    conv = flax_nn.Conv(4, (3, 3), strides=2, padding="SAME", feature_group_count=2)
    (row,) = summary(conv, (1, 5, 5, 2)).rows
    assert row.output_shape == (1, 3, 3, 4)
    assert (row.params, row.macs) == (3 * 3 * 1 * 4 + 4, 3 * 3 * 4 * 9 * 1)
    # SAME pads 1 on each side: the first window starts at -1
    assert row.receptive_field == ReceptiveField((3, 3), (2, 2), (-1, -1))
    # an int kernel_size is one spatial axis; CAUSAL pads d (k - 1) on the left only
    causal = flax_nn.Conv(5, 3, kernel_dilation=2, padding="CAUSAL")
    (row,) = summary(causal, (1, 10, 2)).rows
    assert row.output_shape == (1, 10, 5)
    assert row.macs == 10 * 5 * 3 * 2
    assert row.receptive_field == ReceptiveField((5,), (1,), (-4,))
    (row,) = summary(flax_nn.Dense(3), (2, 7)).rows
    assert (row.params, row.macs) == (7 * 3 + 3, 2 * 3 * 7)
    # a transposed conv multiplies each input value by the whole window of every output channel
    (row,) = summary(flax_nn.ConvTranspose(4, (2, 3), strides=(2, 2)), (1, 3, 3, 5)).rows
    assert row.macs == 3 * 3 * 5 * (2 * 3) * 4


class _Bilinear(flax_nn.Module):
    @flax_nn.compact
    def __call__(self, x):
        w = self.param("w", jax.nn.initializers.ones, (x.shape[-1], x.shape[-1], 3))
        return jnp.einsum("bi,bj,ijk->bk", x, x, w)


class _Square(flax_nn.Module):
    def __call__(self, x):
        return x * x


def test_layers_of_unknown_type_are_marked_not_counted_as_zero():
    model = nn.Sequential([nn.Dense(4), _Bilinear(), _Square(), nn.Dense(2)])
    table = summary(model, (2, 6))
    rows = {row.name: row for row in table.rows}
    assert rows["layers_1"].macs is None
    assert rows["layers_2"].macs == 0  # no parameters: nothing of its own to multiply
    assert table.uncounted == ("layers_1",)
    assert table.total_macs == 2 * 4 * 6 + 2 * 2 * 3
    text = str(table)
    bilinear_line = next(line for line in text.splitlines() if line.startswith("layers_1"))
    assert bilinear_line.split()[-3] == "?"
    assert text.endswith("Total MACs: 60 + ? (not counted: layers_1)")
    # an input-dilated flax conv computes products with inserted zeros: not guessed either
    dilated = summary(flax_nn.Conv(2, (3, 3), input_dilation=2, padding=1), (1, 5, 5, 1))
    assert dilated.rows[0].macs is None and dilated.rows[0].receptive_field is None
    assert "?" in str(dilated).splitlines()[-1]


class _Embedding(flax_nn.Module):
    @flax_nn.compact
    def __call__(self, tokens):
        return flax_nn.Embed(10, 4)(tokens)


def test_summary_dtype_is_checked_and_integer_inputs_stay_accepted():
    for dtype in ("foo", None, 3, "U5", object):
        with pytest.raises(TypeError, match=f"dtype: expected a numeric dtype .*, got {dtype!r}"):
            summary(nn.Dense(3), (1, 4), dtype=dtype)
    for dtype in ("bfloat16", float, jnp.float16):
        assert summary(nn.Dense(3), (1, 4), dtype=dtype).total_macs == 12
    for dtype in (jnp.int32, "int8", np.uint8):
        (row,) = summary(_Embedding(), (2, 5), dtype=dtype).rows
        assert (row.output_shape, row.params, row.macs) == ((2, 5, 4), 40, 0)


def test_input_shape_as_an_integer_array_and_float_or_zero_sizes():
    expected = summary(jcnn.models.LeNet5(), (2, 28, 28, 1))
    for shape in (
        np.array([2, 28, 28, 1]),
        jnp.array([2, 28, 28, 1]),
        np.array((2, 28, 28, 1), np.uint8),
    ):
        table = summary(jcnn.models.LeNet5(), shape)
        assert table.input_shape == (2, 28, 28, 1)
        assert (table.total_params, table.total_macs) == (
            expected.total_params,
            expected.total_macs,
        )
        assert receptive_field(jcnn.models.LeNet5(), shape) == expected.rows[-1].receptive_field
    with pytest.raises(TypeError, match=r"input_shape: .*got a 1-D array of dtype float64"):
        summary(jcnn.models.LeNet5(), np.array([2.0, 28, 28, 1]))
    for shape in ((2, 28.0, 28, 1), [2, 28, 28, True], (2, 28, 28, None)):
        with pytest.raises(TypeError, match=r"input_shape: expected .*ints.*, got"):
            summary(jcnn.models.LeNet5(), shape)
    with pytest.raises(TypeError, match=r"input_shape: expected .*ints.*, got \(\)"):
        summary(jcnn.models.LeNet5(), ())
    with pytest.raises(ValueError, match=r"input_shape: expected sizes >= 1, got \(2, 0, 28, 1\)"):
        summary(jcnn.models.LeNet5(), np.array([2, 0, 28, 1]))


class _FlaxNorms(flax_nn.Module):
    @flax_nn.compact
    def __call__(self, x):
        x = flax_nn.Conv(8, (3, 3))(x)
        x = flax_nn.LayerNorm()(x)  # statistics over the channels of each position
        x = flax_nn.RMSNorm()(x)
        x = flax_nn.Conv(8, (3, 3))(x)
        x = flax_nn.LayerNorm(reduction_axes=(1, 2, 3))(x)  # over the whole map
        x = flax_nn.Conv(8, (3, 3))(x)
        x = flax_nn.GroupNorm(num_groups=4)(x)
        x = flax_nn.Conv(8, (3, 3))(x)
        x = flax_nn.InstanceNorm()(x)
        x = flax_nn.DenseGeneral(6)(x)  # a dense layer on each position's channels
        x = flax_nn.DenseGeneral((2, 3))(x)
        return flax_nn.DenseGeneral(10, axis=(1, 2, 3, 4))(x)


def test_flax_normalizations_and_dense_general_have_fields_and_macs():
    table = summary(_FlaxNorms(), (1, 7, 5, 3))
    rows = {row.name: row for row in table.rows}
    field = {name: row.receptive_field for name, row in rows.items()}
    spatial = (7, 5)
    for pointwise, before in (("LayerNorm_0", "Conv_0"), ("RMSNorm_0", "LayerNorm_0")):
        assert field[pointwise] == field[before]
    for whole, before in (
        ("LayerNorm_1", "Conv_1"),
        ("GroupNorm_0", "Conv_2"),
        ("InstanceNorm_0", "Conv_3"),
    ):
        assert field[whole] == dataclasses.replace(field[before].whole(spatial), stride=(0, 0))
    assert field["LayerNorm_1"].size[0] > field["Conv_1"].size[0] + 5
    # after the first whole-map normalization every unit already sees the whole input window
    assert field["InstanceNorm_0"] == field["LayerNorm_1"]
    assert field["DenseGeneral_0"] == field["InstanceNorm_0"]
    assert field["DenseGeneral_1"] is None  # (2, 3) features: no longer a map of positions
    assert rows["DenseGeneral_0"].macs == 7 * 5 * 6 * 8
    assert rows["DenseGeneral_1"].macs == 7 * 5 * 2 * 3 * 6
    assert rows["DenseGeneral_2"].macs == 10 * 7 * 5 * 2 * 3
    assert table.uncounted == ()
    assert table.total_macs == sum(row.macs for row in table.rows)


def test_a_learned_maxout_shows_its_affine_map_and_its_maximum():
    # only the inner Dense had a row: the maxout's own output, (1, 4), was missing
    rows = summary(nn.Sequential([nn.Flatten(), nn.Maxout(2, features=4)]), (1, 3, 3, 2)).rows
    assert [(r.name, r.output_shape, r.params) for r in rows[1:]] == [
        ("layers_1/linear", (1, 8), 152),
        ("layers_1/maximum", (1, 4), 0),
    ]


def test_parameters_of_a_composite_module_have_a_row_and_the_rows_add_up():
    # ConvNeXt's blocks hold their layer_scale vector themselves: it was in no row
    model = jcnn.models.ConvNeXt(depths=(2, 1), widths=(8, 16), num_classes=3, patch_size=2)
    table = summary(model, (2, 16, 16, 3))
    assert sum(row.params for row in table.rows) == table.total_params == 5_675
    names = [row.name for row in table.rows]
    block = table.rows[names.index("stage1_0")]
    assert names[names.index("stage1_0") - 1] == "stage1_0/pwconv2"  # after the block's layers
    assert (block.layer, block.weight_shape, block.params) == (
        "ConvNeXtBlock(layer_scale)",
        (8,),
        8,
    )
    assert (block.output_shape, block.macs) == ((2, 8, 8, 8), 0)  # an elementwise scale
    assert block.receptive_field == table.rows[names.index("stage1_0/pwconv2")].receptive_field
    assert table.uncounted == ()


class _OwnMatrix(flax_nn.Module):
    @flax_nn.compact
    def __call__(self, x):
        w = self.param("w", flax_nn.initializers.ones, (3, 5))
        return nn.Conv(3, 3)(x) @ w


class _SharedConv(flax_nn.Module):
    @flax_nn.compact
    def __call__(self, x):
        conv = nn.Conv(3, 3, padding=1)
        return conv(conv(x))


def test_own_matrices_are_not_counted_and_shared_layers_count_their_parameters_once():
    table = summary(_OwnMatrix(), (1, 8, 8, 3))
    assert [(row.name, row.params, row.macs) for row in table.rows] == [
        ("Conv_0", 84, 6 * 6 * 3 * 27),
        ("", 15, None),  # a matrix used outside the layers: its products are unknown
    ]
    assert table.total_params == 99 and table.uncounted == ("_OwnMatrix(w)",)
    table = summary(_SharedConv(), (1, 8, 8, 3))
    assert [(row.params, row.macs) for row in table.rows] == [(84, 5_184), (0, 5_184)]
    assert table.total_params == 84 and table.total_macs == 2 * 5_184


class _Gram(flax_nn.Module):  # no parameters, no layers: a Gram matrix per image
    def __call__(self, x):
        features = x.reshape(x.shape[0], -1, x.shape[-1])
        return jnp.einsum("bnc,bnd->bcd", features, features)


class _NonLocal(flax_nn.Module):  # attention between positions, outside its layers
    @flax_nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        query = nn.Conv(4, 1)(x).reshape(b, h * w, 4)
        key = nn.Conv(4, 1)(x).reshape(b, h * w, 4)
        weights = jax.nn.softmax(query @ key.transpose(0, 2, 1))
        return x + (weights @ x.reshape(b, h * w, c)).reshape(b, h, w, c)


def test_products_computed_outside_the_layers_are_counted():
    # an attention's QK^T and a Gram matrix were counted as 0 (the Gram module) or not at all
    # (the attention: a module without parameters of its own had no row)
    class Net(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            x = nn.Conv(8, 3, padding=1)(x)
            x = _NonLocal()(_NonLocal()(x))
            return nn.Dense(3)(_Gram()(x).reshape(x.shape[0], -1))

    n, h, w = 2, 6, 5
    table = summary(Net(), (n, h, w, 3))
    rows = {row.name: row for row in table.rows}
    attention = n * (h * w) ** 2 * 4 + n * (h * w) ** 2 * 8  # QK^T, then the weights times x
    for name in ("_NonLocal_0", "_NonLocal_1"):
        assert (rows[name].layer, rows[name].params, rows[name].macs) == (
            "_NonLocal(matmul)",
            0,
            attention,
        )
        assert [r.name for r in table.rows].index(name) > [r.name for r in table.rows].index(
            f"{name}/Conv_1"
        )  # after its layers
    assert rows["_Gram_0"].macs == n * 8 * 8 * h * w
    layers = n * h * w * (8 * 27 + 2 * 2 * 4 * 8) + n * 3 * 64
    assert table.total_macs == layers + 2 * attention + n * 8 * 8 * h * w
    assert table.uncounted == ()
    # the initializers' products (an orthogonal kernel's QR) are not the model's
    orthogonal = nn.Dense(4, kernel_init=jax.nn.initializers.orthogonal())
    assert summary(orthogonal, (2, 6)).total_macs == 2 * 4 * 6


def test_products_outside_the_layers_inside_a_loop_are_unknown():
    class Power(flax_nn.Module):  # x (x^T x)^3: three products a loop runs
        def __call__(self, x):
            gram = x.T @ x
            return jax.lax.fori_loop(0, 3, lambda i, y: y @ gram, x)

    class Net(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            return nn.Dense(2)(Power()(nn.Dense(4)(x)))

    table = summary(Net(), (5, 3))
    power = next(row for row in table.rows if row.name == "Power_0")
    assert power.macs is None and table.uncounted == ("Power_0",)
    assert table.total_macs == 5 * 4 * 3 + 5 * 2 * 4


def test_layers_inside_scan_or_vmap_are_unknown_not_undercounted():
    # the trace runs a scanned body once: it reported a quarter of the products of a length-4
    # scan and a receptive field of one step
    class Step(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x, _):
            return flax_nn.Conv(3, (3, 3), padding=1)(x), None

    class Scanned(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            x = nn.Conv(3, 3, padding=1)(x)
            scan = flax_nn.scan(
                Step, variable_axes={"params": 0}, split_rngs={"params": True}, length=4
            )
            x, _ = scan(name="blocks")(x, None)
            return nn.Conv(3, 3, padding=1)(x)

    table = summary(Scanned(), (2, 8, 8, 3))
    by_name = {}
    for row in table.rows:
        by_name.setdefault(row.name, []).append(row)
    assert table.total_params == 84 + 4 * 84 + 84
    assert all(r.macs is None and r.receptive_field is None for r in by_name["blocks/Conv_0"])
    assert [r.macs for r in by_name["Conv_0"] + by_name["Conv_1"]] == [2 * 64 * 27 * 3] * 2
    assert by_name["Conv_0"][0].receptive_field.size == (3, 3)
    assert by_name["Conv_1"][0].receptive_field is None  # 13 in truth: after the scan, unknown
    assert table.total_macs == 2 * 2 * 64 * 27 * 3 and "blocks/Conv_0" in table.uncounted
    assert receptive_field(Scanned(), (2, 8, 8, 3)) is None

    class Mapped(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            dense = flax_nn.vmap(
                flax_nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True}
            )
            return dense(5, name="heads")(x)

    (row,) = summary(Mapped(), (2, 3)).rows
    assert row.params == 2 * (3 * 5 + 5) and row.macs is None


def test_layers_inside_cond_or_switch_are_unknown_not_summed_over_branches():
    # Flax's pattern: every branch calls the same named layer; the trace ran both branches and
    # counted the conv's products twice (2,700 for the 1,350 one call computes)
    class Branches(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            def positive(module, x):
                return nn.Conv(2, 3, padding=1, name="conv")(x)

            def negative(module, x):
                return -nn.Conv(2, 3, padding=1, name="conv")(x)

            x = nn.Conv(3, 1, name="stem")(x)
            return flax_nn.cond(x.sum() > 0, positive, negative, self, x)

    table = summary(Branches(), (1, 5, 5, 3))
    stem, *branches = table.rows
    assert stem.macs == 25 * 3 * 3 and stem.receptive_field.size == (1, 1)
    assert [row.name for row in branches] == ["conv", "conv"]
    assert all(row.macs is None and row.receptive_field is None for row in branches)
    assert table.total_params == 12 + 56 and table.total_macs == 25 * 3 * 3
    assert "conv" in table.uncounted
    assert receptive_field(Branches(), (1, 5, 5, 3)) is None

    class Switched(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            branches = [
                lambda module, x: nn.Dense(2, name="head")(x),
                lambda module, x: 2 * nn.Dense(2, name="head")(x),
            ]
            return flax_nn.switch(jnp.int32(1), branches, self, x)

    table = summary(Switched(), (4, 3))
    assert [row.macs for row in table.rows] == [None, None] and table.total_params == 8


def test_layers_inside_map_variables_are_unknown_not_counted_twice():
    # weight standardization through nn.map_variables(init=True): the initializing run calls
    # the conv twice (to create its kernel, then on the mapped one); summary counted both
    def standardized(variables):
        params = dict(variables["params"])
        kernel = params["kernel"]
        params["kernel"] = (kernel - kernel.mean()) / (kernel.std() + 1e-5)
        return {**variables, "params": params}

    class WeightStandardized(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            conv = flax_nn.map_variables(nn.Conv, "params", trans_in_fn=standardized, init=True)
            return nn.Dense(2, name="head")(conv(4, 3, padding=1, name="conv")(x))

    table = summary(WeightStandardized(), (2, 7, 9, 3))
    convs = [row for row in table.rows if row.layer.startswith("Conv")]
    assert convs and all(row.macs is None and row.receptive_field is None for row in convs)
    assert table.total_params == 112 + 10 and table.total_macs == 2 * 7 * 9 * 2 * 4


def test_a_layer_with_parameters_taking_or_returning_a_tuple_has_unknown_products():
    # its shapes are not one array's: it showed 0 multiply-adds and the total claimed them all
    class TwoHeads(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            w = self.param("w", flax_nn.initializers.normal(), (x.shape[-1], 4))
            return x @ w, x @ w[:, :3]

    class Bilinear(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, pair):
            x, y = pair
            w = self.param("w", flax_nn.initializers.normal(), (x.shape[-1], y.shape[-1]))
            return jnp.einsum("bi,ij,bj->b", x, w, y)

    class Model(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            a, _ = TwoHeads(name="heads")(x)
            pairs = flax_nn.Sequential([lambda x: (x, x)], name="pairs")(a)  # no parameters
            return Bilinear(name="bilinear")(pairs)

    table = summary(Model(), (2, 5))
    macs = {row.name: row.macs for row in table.rows}
    assert macs["heads"] is None and macs["bilinear"] is None
    assert table.total_macs == 0 and set(table.uncounted) == {"heads", "bilinear"}


def test_an_nnx_model_is_refused_as_such():
    # the message said "got Conv" for a jcnn.nnx.Conv, which reads like the expected Linen layer
    from flax import nnx as flax_nnx

    model = jcnn.nnx.Conv(3, 4, 3, rngs=flax_nnx.Rngs(0))
    for tool in (summary, receptive_field):
        with pytest.raises(TypeError, match=r"got the NNX module jcnn\.nnx\..*Conv; .*jcnn\.nn"):
            tool(model, (1, 5, 5, 3))
    with pytest.raises(TypeError, match="model: expected a flax.linen.Module, got the NNX module"):
        jcnn.analysis.replace_batch_norm(model)


def test_output_sizes_take_numpy_and_0d_integers_and_give_python_ints():
    for spell in (np.int64, jnp.asarray, np.asarray):
        for function in (conv_output_size, pool_output_size):
            out = function(spell(28), spell(2), spell(2), spell(1), spell(1))
            assert out == 15 and type(out) is int
    with pytest.raises(TypeError, match="size: expected an int, got"):
        conv_output_size(jnp.asarray(2.0), 1)
    with pytest.raises(TypeError, match="stride: expected an int, got"):
        conv_output_size(8, 3, jnp.asarray([1]))
    with pytest.raises(ValueError, match="stride: expected an int >= 1, got 0"):
        pool_output_size(8, 2, np.asarray(0))


def test_receptive_field_unknown_where_a_function_mixes_positions_between_layers():
    # nn.avg_pool keeps the map's size: the layer after it must not take the earlier field
    pooled = flax_nn.Sequential(
        [
            flax_nn.Conv(3, (3, 3)),
            lambda x: flax_nn.avg_pool(x, (3, 3), padding="SAME"),
            flax_nn.Conv(2, (3, 3)),
        ]
    )
    assert receptive_field(pooled, (1, 17, 19, 2)) is None
    assert summary(pooled, (1, 17, 19, 2)).rows[-1].receptive_field is None

    class Residual(flax_nn.Module):  # a per-position combination keeps its field
        @flax_nn.compact
        def __call__(self, x):
            return x + jax.nn.relu(nn.Conv(2, 3, padding=1)(x)) * 2.0

    assert receptive_field(nn.Sequential([Residual(), Residual()]), (1, 9, 9, 2)).size == (5, 5)


def test_receptive_field_of_branches_is_the_union_of_their_windows(rng):
    # a causal and a centred conv see [i-2, i] and [i-1, i+1]: their sum sees [i-2, i+1]
    class CausalPlusSame(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            causal = flax_nn.Conv(2, (3,), padding="CAUSAL")(x)
            return causal + flax_nn.Conv(2, (3,), padding="SAME")(x)

    assert receptive_field(CausalPlusSame(), (1, 12, 1)) == ReceptiveField((4,), (1,), (-2,))

    # windows 3x7 and 7x3 (the larger by a tuple comparison lost an axis) and shifted ones
    class Branches(flax_nn.Module):
        @flax_nn.compact
        def __call__(self, x):
            a = nn.Conv(2, (3, 7), padding=(1, 3))(x)
            b = nn.Conv(2, (7, 3), padding=(3, 1))(x)
            c = nn.Conv(2, 3, padding=((2, 0), (0, 2)))(x)
            return a + b + c

    shape = (1, 15, 15, 2)
    field = receptive_field(Branches(), shape)
    assert field == ReceptiveField((7, 7), (1, 1), (-3, -3))
    boxes, centre, _ = _dependency_box(Branches(), shape, rng)
    assert boxes == _predicted_box(field, centre, shape[1:-1])
