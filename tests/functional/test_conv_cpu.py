"""jcnn.functional._conv_cpu: every CPU formulation equals lax.conv_general_dilated and its VJP."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export, lax

from jcnn.functional._conv_cpu import (
    ConvPlan,
    conv_general,
    plan,
    transpose_aborts_xla_cpu,
    transpose_pads_negative_xla_cpu,
)

_LETTERS = {1: "W", 2: "HW", 3: "DHW"}
_PLANS = [
    ConvPlan("shift", "shift", "im2col", 2),  # scan over 2-image chunks (+ remainder if odd)
    ConvPlan("xla", "xla", "im2col", 64),  # one GEMM over the whole batch
    ConvPlan("xla", "xla", "xla", 1),
    ConvPlan("xla", "xla", "taps_first", 1),  # channels-first patch rows, one GEMM
    ConvPlan("xla", "xla", "per_tap", 1),  # one GEMM per window offset
]


def lax_conv(x, w, stride, padding, dilation, groups):
    letters = _LETTERS[w.ndim - 2]
    return lax.conv_general_dilated(
        x,
        w,
        stride,
        padding,
        rhs_dilation=dilation,
        dimension_numbers=(f"N{letters}C", f"{letters}IO", f"N{letters}C"),
        feature_group_count=groups,
        precision=lax.Precision.HIGHEST,
    )


def random_config(rng, rank):
    groups = int(rng.choice([1, 1, 2, 3]))
    window = tuple(int(k) for k in rng.integers(1, 4, rank))
    stride = tuple(int(s) for s in rng.integers(1, 3, rank))
    dilation = tuple(int(d) for d in rng.integers(1, 3, rank))
    padding = tuple((int(lo), int(hi)) for lo, hi in rng.integers(0, 3, (rank, 2)))
    sizes = tuple(
        int((k - 1) * d + rng.integers(1, 6)) for k, d in zip(window, dilation, strict=True)
    )
    batch = int(rng.integers(1, 6))
    x_shape = (batch, *sizes, groups * int(rng.integers(1, 4)))
    w_shape = (*window, x_shape[-1] // groups, groups * int(rng.integers(1, 4)))
    return x_shape, w_shape, stride, padding, dilation, groups


def all_products(x, w, g, options):
    """Forward, dx and dw of lax's convolution and of conv_general under every plan."""

    def products(conv):
        y, vjp = jax.vjp(conv, x, w)
        return (y, *vjp(g))

    results = [products(lambda x, w: lax_conv(x, w, *options))]
    for conv_plan in _PLANS:
        results.append(
            products(lambda x, w, p=conv_plan: conv_general(x, w, *options, conv_plan=p))
        )
    return results


@pytest.mark.parametrize(("rank", "count"), [(1, 4), (2, 5), (3, 3)])
def test_values_and_gradients_equal_lax_for_every_plan(rng, rank, count):
    for x_shape, w_shape, *options in (random_config(rng, rank) for _ in range(count)):
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
        y_shape = jax.eval_shape(lambda x, w: lax_conv(x, w, *options), x, w).shape  # noqa: B023
        g = jnp.asarray(rng.standard_normal(y_shape), jnp.float32)
        want, *got_by_plan = jax.jit(all_products, static_argnums=3)(x, w, g, tuple(options))
        for conv_plan, got in zip(_PLANS, got_by_plan, strict=True):
            for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
                scale = float(np.max(np.abs(b))) + 1e-6
                np.testing.assert_allclose(
                    a,
                    b,
                    atol=2e-5 * scale,
                    rtol=0,
                    err_msg=f"{name} {x_shape} {w_shape} {options} {conv_plan}",
                )


def test_default_plan_uses_shift_for_few_channels_and_chunks_the_weight_gradient():
    lenet = plan((128, 28, 28, 1), (5, 5, 1, 6), (1, 1), ((2, 2), (2, 2)), (1, 1), 1)
    assert (lenet.forward, lenet.input_grad, lenet.weight_grad) == ("xla", "shift", "xla")
    wide = plan((256, 15, 15, 64), (3, 3, 64, 256), (1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    assert (wide.forward, wide.input_grad, wide.weight_grad) == ("xla", "xla", "im2col")
    # 15*15*9*64 floats per image: 8 images of patches fill the 4 MiB chunk; 256 % 8 == 0.
    assert wide.chunk == 8
    assert plan((7, 4, 4, 8), (3, 3, 8, 8), (1, 1), ((1, 1),) * 2, (1, 1), 1).chunk == 7


def test_default_plan_avoids_the_input_gradients_xla_cpu_aborts_on():
    # 2 undilated taps at stride 2 with padding (1, 1) on 6 pixels: the transposed window needs
    # no padding there, and XLA:CPU aborted compiling it as a convolution (test_conv.py runs it).
    aborting = ((2, 6, 6, 4), (3, 2, 4, 3), (2, 2), ((0, 0), (1, 1)), (2, 1), 1)
    assert plan(*aborting).input_grad == "shift"
    assert transpose_aborts_xla_cpu((3, 2), (2, 2), (2, 1), ((0, 0), (1, 1)), (6, 6), (2, 4), 1)
    # Without padding the transposed window pads by 1; grouped convolutions are not swapped.
    assert plan((2, 6, 6, 4), (3, 2, 4, 3), (2, 2), ((0, 0),) * 2, (2, 1), 1).input_grad == "xla"
    assert plan((2, 6, 6, 4), (3, 2, 2, 4), *aborting[2:5], 2).input_grad == "xla"


@pytest.mark.parametrize(
    "window, padding, spatial",
    [((2,), ((3, 0),), (4,)), ((3, 2), ((3, 4), (3, 0)), (4, 3)), ((3,), ((4, 1),), (5,))],
)
def test_default_plan_avoids_the_input_gradients_xla_cpu_computes_wrongly(
    rng, window, padding, spatial
):
    # a padding beyond the window's reach below and within it above: XLA's transposed
    # convolution pads by (negative, positive) there, which XLA:CPU computed as garbage from four
    # input channels on (dx off by 0.3 to 1e31, relative)
    x = jnp.asarray(rng.normal(size=(2, *spatial, 9)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*window, 9, 11)), jnp.float32)
    ones = (1,) * len(window)
    chosen = plan(x.shape, w.shape, ones, padding, ones, 1)
    assert chosen.input_grad == "shift"
    out_sizes = [
        s + lo + hi - k + 1 for s, (lo, hi), k in zip(spatial, padding, window, strict=True)
    ]
    assert transpose_pads_negative_xla_cpu(window, ones, ones, padding, spatial, out_sizes)
    ours = jax.grad(lambda x: jnp.sum(conv_general(x, w, ones, padding, ones, 1) ** 2))(x)
    # the reference pads explicitly: its convolution's transpose pads by positive amounts only
    padded = lambda x: jnp.pad(x, ((0, 0), *padding, (0, 0)))  # noqa: E731
    valid = ((0, 0),) * len(window)
    reference = jax.grad(lambda x: jnp.sum(lax_conv(padded(x), w, ones, valid, ones, 1) ** 2))(
        x.astype(jnp.float64) if jax.config.jax_enable_x64 else x
    )
    np.testing.assert_allclose(ours, reference, rtol=2e-5, atol=2e-4)
    # within the window's reach on both sides (or beyond it on both) XLA's own is kept
    assert not transpose_pads_negative_xla_cpu((2,), (1,), (1,), ((1, 0),), (4,), (4,))


# float64 keeps the default backend on these formulations (oneDNN takes float32 and bfloat16).
_SYMBOLIC_BATCH_ABORT = """
import jax
import jax.numpy as jnp
import numpy as np
from jax import export
from jcnn.functional._conv_cpu import conv_general
jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(0)
x, w = rng.standard_normal((2, 6, 6, 4)), rng.standard_normal((3, 2, 4, 3))
loss = lambda x: jnp.sum(conv_general(x, w, (2, 2), ((0, 0), (1, 1)), (2, 1), 1) ** 2)
(batch,) = export.symbolic_shape("b")
exported = export.export(jax.jit(jax.grad(loss)))(jax.ShapeDtypeStruct((batch, 6, 6, 4), x.dtype))
print(float(np.max(np.abs(exported.call(x) - jax.grad(loss)(x)))))
"""


def test_symbolic_batch_avoids_the_input_gradient_xla_cpu_aborts_on():
    """With a symbolic batch the plan keeps XLA's products, but not the input gradient XLA:CPU
    aborted the process compiling once the exported program is called (in a child process)."""
    (batch,) = export.symbolic_shape("b")
    aborting = ((batch, 6, 6, 4), (3, 2, 4, 3), (2, 2), ((0, 0), (1, 1)), (2, 1), 1)
    assert plan(*aborting)[:3] == ("xla", "shift", "xla")
    assert plan((batch, 6, 6, 4), *aborting[1:3], ((0, 0),) * 2, *aborting[4:])[:3] == (
        "xla",
        "xla",
        "xla",
    )
    child = subprocess.run(
        [sys.executable, "-c", _SYMBOLIC_BATCH_ABORT], capture_output=True, text=True, timeout=300
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert float(child.stdout) < 1e-12


def test_single_image_weight_gradient_avoids_xla_and_the_patch_matrix():
    """N == 1 is what each example of a vmap over examples (per-example gradients) sees."""
    lenet_conv1 = plan((1, 28, 28, 1), (5, 5, 1, 20), (1, 1), ((2, 2),) * 2, (1, 1), 1)
    lenet_conv2 = plan((1, 14, 14, 20), (5, 5, 20, 50), (1, 1), ((2, 2),) * 2, (1, 1), 1)
    assert (lenet_conv1.weight_grad, lenet_conv2.weight_grad) == ("taps_first", "per_tap")
    assert plan((2, 14, 14, 20), (5, 5, 20, 50), (1, 1), ((2, 2),) * 2, (1, 1), 1).weight_grad == (
        "im2col"
    )


def test_chunked_weight_gradient_with_remainder_is_jittable_and_exact(rng):
    x = jnp.asarray(rng.standard_normal((7, 9, 9, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 5, 4)), jnp.float32)
    options = ((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    grad = jax.jit(
        jax.grad(lambda w: jnp.sum(conv_general(x, w, *options, conv_plan=_PLANS[0]) ** 2))
    )
    want = jax.grad(lambda w: jnp.sum(lax_conv(x, w, *options) ** 2))(w)
    np.testing.assert_allclose(grad(w), want, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize(
    "conv_plan",
    [_PLANS[0], _PLANS[1], _PLANS[3], _PLANS[4], None],
    ids=["shift", "xla-im2col", "taps_first", "per_tap", "default"],
)
def test_second_derivatives_and_per_example_gradients_equal_lax(rng, conv_plan):
    x = jnp.asarray(rng.standard_normal((3, 7, 6, 2)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 2, 1, 4)), jnp.float32) / 3
    options = ((2, 1), ((1, 0), (1, 1)), (1, 2), 2)

    def results(conv, w, x):
        def loss(w, x):
            return jnp.sum(jnp.tanh(conv(x, w)) ** 2)

        per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0))(w, x[:, None])
        # Hessian-vector products in w and in x: grad of a function of the gradient.
        hvp_w = jax.grad(lambda w: jnp.sum(jax.grad(loss)(w, x) ** 2))(w)
        hvp_x = jax.grad(lambda x: jnp.sum(jax.grad(loss, argnums=1)(w, x) ** 2))(x)
        return per_example, hvp_w, hvp_x

    results = jax.jit(results, static_argnums=0)
    got = results(lambda x, w: conv_general(x, w, *options, conv_plan=conv_plan), w, x)
    want = results(lambda x, w: lax_conv(x, w, *options), w, x)
    for name, a, b in zip(("per-example", "hvp_w", "hvp_x"), got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)


def test_other_platforms_keep_the_native_convolution():
    def weight_grad(x, w):
        loss = lambda w: jnp.sum(conv_general(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1), 1) ** 2)  # noqa: E731
        return jax.grad(loss)(w)

    shapes = (jax.ShapeDtypeStruct((2, 6, 6, 32), jnp.float32),) + (
        jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32),
    )
    gpu = export.export(jax.jit(weight_grad), platforms=["cuda"])(*shapes).mlir_module()
    cpu = export.export(jax.jit(weight_grad), platforms=["cpu"])(*shapes).mlir_module()
    # GPU: forward and weight gradient both XLA convolutions, no matrix product.
    assert gpu.count("stablehlo.convolution") == 2 and "dot_general" not in gpu
    # CPU: the weight gradient of this 3x3x32x32 kernel is an im2col GEMM.
    assert cpu.count("stablehlo.convolution") == 1 and "dot_general" in cpu


@pytest.mark.parametrize("symbols, constraints", [("b", ()), ("b, h, w", ("h >= 5", "w >= 5"))])
@pytest.mark.parametrize(
    "w_shape, groups", [((3, 3, 32, 32), 1), ((5, 5, 1, 6), 1), ((3, 3, 1, 8), 4)]
)
def test_symbolic_sizes_export_and_match_concrete_calls(rng, w_shape, groups, symbols, constraints):
    """jax.export with a symbolic batch (serving any batch size): the plan cannot pick by size,
    so XLA's own products run; forward, gradient and a Hessian-vector product all export. With
    symbolic spatial sizes as well (bounded below so that the output is not empty) the forward
    pass exports; JAX itself cannot differentiate a strided convolution of symbolic size."""
    channels = w_shape[-2] * groups
    w = rng.standard_normal(w_shape).astype(np.float32)
    x = rng.standard_normal((5, 9, 8, channels)).astype(np.float32)

    def forward(x, w):
        return conv_general(x, w, (2, 1), ((1, 1), (2, 0)), (1, 1), groups)

    def loss(x, w):
        return jnp.sum(jnp.tanh(forward(x, w)))

    functions = {
        "forward": forward,
        "gradient": jax.grad(loss, argnums=(0, 1)),
        "hvp": lambda x, w: jax.jvp(jax.grad(loss, argnums=1), (x, w), (x, w))[1],
    }
    if "h" in symbols:
        functions = {"forward": forward}
    sizes = export.symbolic_shape(symbols, constraints=constraints)
    symbolic_x = jax.ShapeDtypeStruct((*sizes, *x.shape[len(sizes) :]), jnp.float32)
    assert plan(symbolic_x.shape, w_shape, (2, 1), ((1, 1), (2, 0)), (1, 1), groups)[:3] == (
        "xla",
        "xla",
        "xla",
    )
    for name, function in functions.items():
        exported = export.export(jax.jit(function))(symbolic_x, w)
        for got, want in zip(
            jax.tree.leaves(exported.call(x, w)), jax.tree.leaves(function(x, w)), strict=True
        ):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "stride", "padding", "groups", "error", "match"),
    [
        ((2, 5, 5, 4), (3, 3, 4, 6), (1, 1), ((0, 0),) * 2, 3, ValueError, "groups: must divide"),
        ((2, 5, 5, 4), (3, 3, 3, 6), (1, 1), ((0, 0),) * 2, 1, ValueError, "w: expected 4 input"),
        ((2, 5, 5), (3, 3, 5, 6), (1, 1), ((0, 0),) * 2, 1, ValueError, "x: expected rank 4"),
        ((2, 5, 5, 4), (7, 3, 4, 6), (1, 1), ((0, 0),) * 2, 1, ValueError, "larger than"),
        ((2, 5, 5, 4), (3, 3, 4, 6), (0, 1), ((0, 0),) * 2, 1, ValueError, "stride"),
        ((2, 5, 5, 4), (3, 3, 4, 6), (1, 1), ((0, 0),), 1, ValueError, "padding: expected 2"),
    ],
)
def test_invalid_arguments_raise_naming_the_argument(
    x_shape, w_shape, stride, padding, groups, error, match
):
    with pytest.raises(error, match=match):
        conv_general(jnp.zeros(x_shape), jnp.zeros(w_shape), stride, padding, (1, 1), groups)


@pytest.mark.parametrize(
    ("conv_plan", "error", "match"),
    [
        (("xla", "xla", "xla", 1), TypeError, "conv_plan: expected a ConvPlan or None, got tuple"),
        (ConvPlan("im2col", "xla", "xla", 1), ValueError, "conv_plan.forward: expected one of"),
        (ConvPlan("xla", "col2im", "xla", 1), ValueError, "conv_plan.input_grad: .* 'col2im'"),
        (ConvPlan("xla", "xla", "gemm", 1), ValueError, "conv_plan.weight_grad: .* 'gemm'"),
        (ConvPlan("xla", "xla", "im2col", 0), ValueError, "conv_plan.chunk: .* got 0"),
        (ConvPlan("xla", "xla", "im2col", 2.0), TypeError, "conv_plan.chunk: .* got 2.0"),
        (
            ConvPlan("xla", "flipped_shift", "xla", 1),
            ValueError,
            r"conv_plan.input_grad: 'flipped_shift' needs one input channel per group .*"
            r"\(3, 3, 2, 4\)",
        ),
        (
            ConvPlan("xla", "xla", "per_tap_sum", 1),
            ValueError,
            r"conv_plan.weight_grad: 'per_tap_sum' needs one input channel per group",
        ),
    ],
)
def test_a_forced_plan_that_cannot_run_is_refused_naming_the_field(conv_plan, error, match):
    x, w = jnp.zeros((2, 5, 5, 4)), jnp.zeros((3, 3, 2, 4))
    with pytest.raises(error, match=match):
        conv_general(x, w, (1, 1), ((1, 1), (1, 1)), (1, 1), 2, conv_plan=conv_plan)


def test_mismatched_dtypes_raise():
    with pytest.raises(TypeError, match="w: expected the dtype of x"):
        conv_general(
            jnp.zeros((1, 4, 4, 2)), jnp.zeros((2, 2, 2, 2), jnp.float16), 1, ((0, 0),) * 2, 1, 1
        )


def random_depthwise_config(rng, rank):
    """A depthwise problem (groups == C_in, C_out = multiplier * C_in) with odd sizes and some
    padding beyond the dilated window's reach (cropped in the input gradient)."""
    channels = int(rng.integers(2, 6))
    window = tuple(int(k) for k in rng.integers(1, 5, rank))
    stride = tuple(int(s) for s in rng.integers(1, 4, rank))
    dilation = tuple(int(d) for d in rng.integers(1, 3, rank))
    padding = tuple(
        (int(rng.integers(0, (k - 1) * d + 3)), int(rng.integers(0, (k - 1) * d + 3)))
        for k, d in zip(window, dilation, strict=True)
    )
    sizes = tuple(
        int(max(1, (k - 1) * d + 1 - lo - hi) + rng.integers(0, 6))
        for k, d, (lo, hi) in zip(window, dilation, padding, strict=True)
    )
    x_shape = (int(rng.integers(1, 4)), *sizes, channels)
    w_shape = (*window, 1, channels * int(rng.integers(1, 4)))
    return x_shape, w_shape, stride, padding, dilation, channels


# Many small programs: XLA:CPU's unoptimized emitters compile them several times faster, with the
# same operations and numerics (as in test_conv.py's parity chunks).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}


def _with_options(conv, options):
    return lambda x, w: conv(x, w, *options)


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_depthwise_shifted_sums_equal_lax(rng, rank):
    for _ in range({1: 4, 2: 5, 3: 3}[rank]):
        x_shape, w_shape, *options = random_depthwise_config(rng, rank)
        conv_plan = plan(x_shape, w_shape, *options)
        assert conv_plan[:3] == ("shift", "flipped_shift", "per_tap_sum"), conv_plan
        x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
        w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
        y_shape = jax.eval_shape(_with_options(lax_conv, options), x, w).shape
        g = jnp.asarray(rng.standard_normal(y_shape), jnp.float32)

        def products(conv, x, w, g):
            y, vjp = jax.vjp(conv, x, w)
            return (y, *vjp(g))

        both = jax.jit(
            lambda x, w, g: [  # noqa: B023
                products(_with_options(conv, options), x, w, g)  # noqa: B023
                for conv in (conv_general, lax_conv)
            ],
            compiler_options=_FAST_COMPILE,
        )
        got, want = both(x, w, g)
        for name, a, b in zip(("y", "dx", "dw"), got, want, strict=True):
            scale = float(np.max(np.abs(b))) + 1e-6
            np.testing.assert_allclose(
                a, b, atol=2e-5 * scale, rtol=0, err_msg=f"{name} {x_shape} {w_shape} {options}"
            )


@pytest.mark.parametrize(
    "x_shape, w_shape, stride, padding, dilation",
    [
        ((3, 2, 2, 4), (7, 7, 1, 4), (1, 1), ((3, 3), (3, 3)), (1, 1)),  # ConvNeXt's last stage
        ((2, 1, 3, 3), (5, 7, 1, 6), (2, 3), ((4, 2), (6, 1)), (1, 1)),  # strided: gaps of taps
        ((2, 2, 1, 3), (4, 6, 1, 3), (1, 1), ((5, 4), (2, 7)), (2, 1)),  # dilated past the map
        ((1, 3, 1, 2), (3, 3, 1, 2), (1, 1), ((9, 9), (1, 1)), (1, 1)),  # offsets in padding only
    ],
)
def test_depthwise_weight_gradient_of_windows_reaching_into_padding(
    rng, x_shape, w_shape, stride, padding, dilation
):
    options = (stride, padding, dilation, x_shape[-1])
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    w = jnp.asarray(rng.standard_normal(w_shape), jnp.float32)
    y_shape = jax.eval_shape(_with_options(lax_conv, options), x, w).shape
    g = jnp.asarray(rng.standard_normal(y_shape), jnp.float32)
    got, want = (
        jax.vjp(lambda w: conv(x, w, *options), w)[1](g)[0]  # noqa: B023
        for conv in (conv_general, lax_conv)
    )
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.max(np.abs(want))))


def test_depthwise_higher_derivatives_and_vmap_equal_lax(rng):
    x = jnp.asarray(rng.standard_normal((3, 9, 8, 5)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 4, 1, 10)), jnp.float32) / 3  # multiplier 2
    options = ((2, 1), ((2, 0), (1, 3)), (1, 2), 5)

    def results(conv, w, x):
        def loss(w, x):
            return jnp.sum(jnp.tanh(conv(x, w)) ** 2)

        def x_penalty(x):
            return jnp.sum(jax.grad(loss, argnums=1)(w, x) ** 2)

        per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0))(w, x[:, None])
        over_kernels = jax.vmap(lambda w: conv(x, w))(jnp.stack([w, -2 * w]))
        hvp_w = jax.grad(lambda w: jnp.sum(jax.grad(loss)(w, x) ** 2))(w)
        third_order = jax.grad(lambda x: jnp.sum(jax.grad(x_penalty)(x) ** 2))(x)
        return per_example, over_kernels, hvp_w, third_order

    results = jax.jit(results, static_argnums=0, compiler_options=_FAST_COMPILE)
    got = results(_with_options(conv_general, options), w, x)
    want = results(_with_options(lax_conv, options), w, x)
    names = ("per-example", "vmap over kernels", "hvp_w", "third order")
    for name, a, b in zip(names, got, want, strict=True):
        scale = float(np.max(np.abs(b))) + 1e-6
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * scale, err_msg=name)


def test_depthwise_plan_only_for_depthwise_in_single_or_double_precision():
    depthwise = ((1, 1), ((1, 1),) * 2, (1, 1), 8)
    assert plan((2, 9, 9, 8), (3, 3, 1, 16), *depthwise).forward == "shift"
    assert plan((2, 9, 9, 8), (3, 3, 1, 8), *depthwise, itemsize=8).forward == "shift"
    # bfloat16 / float16 would round every partial sum: XLA's convolution there.
    assert plan((2, 9, 9, 8), (3, 3, 1, 8), *depthwise, itemsize=2).forward == "xla"
    # One input channel but a single group (LeNet's first layer) is not depthwise.
    lenet = plan((2, 28, 28, 1), (5, 5, 1, 6), (1, 1), ((2, 2),) * 2, (1, 1), 1)
    assert lenet.forward == "xla" and lenet.input_grad == "shift"
    # Two channels per group: the grouped plan.
    assert plan((2, 9, 9, 8), (3, 3, 2, 8), (1, 1), ((1, 1),) * 2, (1, 1), 4).forward == "xla"
