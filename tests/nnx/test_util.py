"""What jcnn/nnx/_util.py checks for every NNX module with parameters (``param_dtype``), and its
settings as plain Python values for every NNX module (``static``)."""

from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jcnn import functional as F
from jcnn import nn
from jcnn import nnx as jnnx

WITH_PARAMETERS = {
    "Conv": lambda r, **kw: jnnx.Conv(3, 2, 3, rngs=r, **kw),
    "DepthwiseConv": lambda r, **kw: jnnx.DepthwiseConv(3, 3, rngs=r, **kw),
    "ConvTranspose": lambda r, **kw: jnnx.ConvTranspose(3, 2, 3, rngs=r, **kw),
    "Dense": lambda r, **kw: jnnx.Dense(3, 2, rngs=r, **kw),
    "BatchNorm": lambda r, **kw: jnnx.BatchNorm(3, rngs=r, **kw),
    "LayerNorm": lambda r, **kw: jnnx.LayerNorm(3, rngs=r, **kw),
    "GroupNorm": lambda r, **kw: jnnx.GroupNorm(4, 2, rngs=r, **kw),
    "InstanceNorm": lambda r, **kw: jnnx.InstanceNorm(3, rngs=r, **kw),
    "LocallyConnected": lambda r, **kw: jnnx.LocallyConnected(
        3, 2, 3, input_size=(5, 5), rngs=r, **kw
    ),
    "PReLU": lambda r, **kw: jnnx.PReLU(rngs=r, **kw),
}


@pytest.mark.parametrize("make", WITH_PARAMETERS.values(), ids=WITH_PARAMETERS)
def test_param_dtype_is_checked_by_its_name(make):
    # an int dtype was blamed on "dtype" (or on "alpha" at the call), a bad name raised NumPy's
    # "data type 'floaty' not understood"
    with pytest.raises(TypeError, match="param_dtype: expected None or a floating dtype.*int32"):
        make(nnx.Rngs(0), param_dtype=jnp.int32)
    with pytest.raises(TypeError, match="param_dtype: expected None or a floating dtype.*floaty"):
        make(nnx.Rngs(0), param_dtype="floaty")
    layer = make(nnx.Rngs(0), param_dtype=jnp.bfloat16)
    assert {p.dtype for p in jax.tree.leaves(nnx.state(layer, nnx.Param))} == {
        jnp.dtype("bfloat16")
    }


@dataclass(frozen=True)
class Settings:
    """An NNX module built by ``build(rngs, **numbers)``, called on an input of ``shape``."""

    build: Callable[..., nnx.Module]
    numbers: dict[str, int | float]
    shape: tuple[int, ...]


# Every numeric setting of every jcnn.nnx module, with values exact in float32 so that the
# module built from 0-d arrays must give the same bits as the one built from Python numbers.
SETTINGS = {
    "Conv": Settings(
        lambda r, **s: jnnx.Conv(**s, rngs=r),
        dict(
            in_features=4,
            features=6,
            kernel_size=3,
            stride=2,
            padding=1,
            dilation=2,
            groups=2,
            spatial_dims=2,
        ),
        (2, 9, 8, 4),
    ),
    "DepthwiseConv": Settings(
        lambda r, **s: jnnx.DepthwiseConv(**s, rngs=r),
        dict(in_features=3, kernel_size=3, depth_multiplier=2, stride=2, padding=1, dilation=2),
        (2, 9, 8, 3),
    ),
    "ConvTranspose": Settings(
        lambda r, **s: jnnx.ConvTranspose(**s, rngs=r),
        dict(
            in_features=4,
            features=6,
            kernel_size=3,
            stride=2,
            padding=1,
            output_padding=1,
            dilation=1,
            groups=2,
        ),
        (2, 5, 4, 4),
    ),
    "Dense": Settings(
        lambda r, **s: jnnx.Dense(**s, rngs=r), dict(in_features=5, features=3), (2, 5)
    ),
    "LocallyConnected": Settings(
        lambda r, **s: jnnx.LocallyConnected(**s, rngs=r),
        dict(
            in_features=3, features=2, kernel_size=3, input_size=7, stride=2, padding=1, dilation=1
        ),
        (2, 7, 7, 3),
    ),
    "BatchNorm": Settings(
        lambda r, **s: jnnx.BatchNorm(**s, rngs=r),
        dict(num_features=3, momentum=0.75, eps=0.125),
        (6, 3),
    ),
    "LayerNorm": Settings(
        lambda r, **s: jnnx.LayerNorm(**s, rngs=r), dict(num_features=3, eps=0.125), (2, 4, 3)
    ),
    "GroupNorm": Settings(
        lambda r, **s: jnnx.GroupNorm(**s, rngs=r),
        dict(num_features=4, num_groups=2, eps=0.125),
        (2, 3, 4),
    ),
    "InstanceNorm": Settings(
        lambda r, **s: jnnx.InstanceNorm(**s, track_running_stats=True, rngs=r),
        dict(num_features=3, momentum=0.75, eps=0.125),
        (2, 5, 5, 3),
    ),
    "LocalContrastNorm": Settings(
        lambda r, **s: jnnx.LocalContrastNorm(**s),
        dict(size=3, sigma=0.5, eps=0.125),
        (2, 6, 6, 2),
    ),
    "LocalResponseNorm": Settings(
        lambda r, **s: jnnx.LocalResponseNorm(**s),
        dict(size=3, alpha=0.25, beta=0.5, k=2.0),
        (2, 5),
    ),
    "MaxPool": Settings(
        lambda r, **s: jnnx.MaxPool(**s),
        dict(window=3, stride=2, padding=1, dilation=1),
        (2, 7, 6, 2),
    ),
    "AvgPool": Settings(
        lambda r, **s: jnnx.AvgPool(**s), dict(window=3, stride=2, padding=1), (2, 7, 6, 2)
    ),
    "LPPool": Settings(
        lambda r, **s: jnnx.LPPool(**s), dict(p=3.0, window=2, stride=1), (2, 5, 5, 2)
    ),
    "AdaptiveAvgPool": Settings(
        lambda r, **s: jnnx.AdaptiveAvgPool(**s), dict(output_size=3), (2, 7, 8, 2)
    ),
    "AdaptiveMaxPool": Settings(
        lambda r, **s: jnnx.AdaptiveMaxPool(**s), dict(output_size=3), (2, 7, 8, 2)
    ),
    "PReLU": Settings(
        lambda r, **s: jnnx.PReLU(channelwise=True, **s, rngs=r),
        dict(alpha_init=0.5, num_features=3),
        (2, 3),
    ),
    "Maxout": Settings(
        lambda r, **s: jnnx.Maxout(**s, rngs=r),
        dict(num_pieces=2, features=3, in_features=4),
        (2, 4),
    ),
    "LeakyReLU": Settings(lambda r, **s: jnnx.LeakyReLU(**s), dict(negative_slope=0.25), (2, 5)),
    "ELU": Settings(lambda r, **s: jnnx.ELU(**s), dict(alpha=0.5), (2, 5)),
    "Softplus": Settings(lambda r, **s: jnnx.Softplus(**s), dict(beta=2.0, threshold=1.5), (2, 5)),
    "Dropout": Settings(lambda r, **s: jnnx.Dropout(**s, rngs=r), dict(rate=0.5), (4, 6)),
    "SpatialDropout": Settings(
        lambda r, **s: jnnx.SpatialDropout(**s, rngs=r), dict(rate=0.5), (4, 3, 3, 6)
    ),
    "Sequential": Settings(
        lambda r, **s: jnnx.Sequential(
            [jnnx.Dense(4, 3, rngs=r), jnnx.BatchNorm(3, eps=s["eps"], rngs=r)]
        ),
        dict(eps=0.125),
        (5, 4),
    ),
    "Residual": Settings(
        lambda r, **s: jnnx.Residual(jnnx.LeakyReLU(s["negative_slope"])),
        dict(negative_slope=0.25),
        (2, 5),
    ),
}
# Modules without a numeric setting of their own.
WITHOUT_SETTINGS = {
    "ReLU",
    "GELU",
    "Tanh",
    "Sigmoid",
    "Rectify",
    "Swish",
    "SiLU",
    "Mish",
    "SELU",
    "Flatten",
    "GlobalAvgPool",
    "GlobalMaxPool",
}
SETTING_CASES = [
    pytest.param(name, setting, id=f"{name}-{setting}")
    for name, case in SETTINGS.items()
    for setting in case.numbers
]
STATE = (nnx.Param, nnx.BatchStat, nnx.RngState)
STATS = F.BatchNormState(jnp.zeros(2), jnp.ones(2))


def test_every_nnx_module_is_in_the_settings_table():
    modules = {
        name
        for name in jnnx.__all__
        if isinstance(getattr(jnnx, name), type) and issubclass(getattr(jnnx, name), nnx.Module)
    }
    assert modules == set(SETTINGS) | WITHOUT_SETTINGS


def _assert_trees_equal(actual, expected):
    def data(leaf):
        is_key = jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key)
        return jax.random.key_data(leaf) if is_key else leaf

    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(data(a), data(e))


def _call(module, x):
    return module(x)


@pytest.mark.parametrize(("name", "setting"), SETTING_CASES)
def test_a_setting_given_as_a_0d_array_is_a_python_setting(name, setting, rng):
    # A 0-d jnp setting was an NNX state leaf: traced by nnx.jit, then refused by the op ("eps:
    # expected a finite number > 0, got DynamicJaxprTracer"), and listed by nnx.state.
    case = SETTINGS[name]
    numbers = case.numbers
    reference = case.build(nnx.Rngs(0), **numbers)
    module = case.build(nnx.Rngs(0), **{**numbers, setting: jnp.asarray(numbers[setting])})
    variables = jax.tree.leaves(
        nnx.state(module), is_leaf=lambda leaf: isinstance(leaf, nnx.Variable)
    )
    assert all(isinstance(v, STATE) for v in variables), variables
    _assert_trees_equal(nnx.state(module), nnx.state(reference))

    x = jnp.asarray(rng.normal(size=case.shape), jnp.float32)
    module = nnx.merge(*nnx.split(module))
    batch = jnp.stack([x, 2 * x])
    vmapped = nnx.vmap(_call, in_axes=(None, 0))
    # Training under jit, then evaluation under vmap, each compared with the module of Python
    # numbers taking the same way: jit and eager may differ in the last bit.
    for apply, inputs, train in [(nnx.jit(_call), x, True), (vmapped, batch, False)]:
        for m in (module, reference):
            m.train() if train else m.eval()
        np.testing.assert_array_equal(apply(module, inputs), apply(reference, inputs))
        _assert_trees_equal(nnx.state(module), nnx.state(reference))  # running stats, rng counts


def test_sequence_settings_of_arrays_and_lists_are_tuples_of_ints(rng):
    # A tuple holding a 0-d array could not even be assigned (Flax: "Found data on value of type
    # tuple assigned to static attribute"), and a list made the graph definition unhashable.
    x = jnp.asarray(rng.normal(size=(2, 7, 6, 4)), jnp.float32)
    built = [
        (
            jnnx.MaxPool([jnp.array(2), 2], np.array([2, 1]), [(np.int64(1), 0), [0, 1]]),
            jnnx.MaxPool((2, 2), (2, 1), ((1, 0), (0, 1))),
        ),
        (
            jnnx.Conv(
                4, 2, [3, jnp.array(2)], (jnp.array(2), 1), jnp.array([1, 0]), rngs=nnx.Rngs(0)
            ),
            jnnx.Conv(4, 2, (3, 2), (2, 1), (1, 0), rngs=nnx.Rngs(0)),
        ),
    ]
    for module, reference in built:
        assert (module.stride, module.padding) == (reference.stride, reference.padding)
        hash(nnx.graphdef(module))
        np.testing.assert_array_equal(
            nnx.jit(_call)(module, x), nnx.jit(_call)(reference, x), err_msg=type(module).__name__
        )


def test_what_cannot_be_a_static_setting_is_refused_at_construction():
    with pytest.raises(TypeError, match=r"^window: expected a static setting .*shape \(2, 2\)"):
        jnnx.MaxPool(jnp.ones((2, 2), jnp.int32))
    with pytest.raises(TypeError, match=r"^padding: expected a static setting .*Tracer"):
        jax.jit(lambda p: jnnx.MaxPool(2, padding=p))(1)
    with pytest.raises(TypeError, match=r"^negative_slope: expected a finite number, got .*Tracer"):
        jax.jit(lambda s: jnnx.LeakyReLU(s))(0.5)


def _message(error, build):
    with pytest.raises(error) as info:
        build()
    return str(info.value)


@pytest.mark.parametrize(
    ("error", "module", "op"),
    [
        (
            ValueError,
            lambda: jnnx.BatchNorm(2, eps=0, rngs=nnx.Rngs(0)),
            lambda x: F.batch_norm(x, None, None, STATS, train=True, eps=0),
        ),
        (
            ValueError,
            lambda: jnnx.BatchNorm(2, momentum=1.5, rngs=nnx.Rngs(0)),
            lambda x: F.batch_norm(x, None, None, STATS, train=True, momentum=1.5),
        ),
        (
            TypeError,
            lambda: jnnx.LayerNorm(2, eps="a", rngs=nnx.Rngs(0)),
            lambda x: F.layer_norm(x, None, None, eps="a"),
        ),
        (ValueError, lambda: jnnx.LPPool(0, 2), lambda x: F.lp_pool(x[:, :, None], 0, 2)),
        (
            TypeError,
            lambda: jnnx.LeakyReLU(jnp.ones(2)),
            lambda x: F.leaky_relu(x, jnp.ones(2)),
        ),
        (
            ValueError,
            lambda: jnnx.LocalResponseNorm(k=0),
            lambda x: F.local_response_norm(x, 5, k=0),
        ),
        (
            ValueError,
            lambda: jnnx.LocalResponseNorm(0),
            lambda x: F.local_response_norm(x, 0),
        ),
        (
            ValueError,
            lambda: jnnx.LocalContrastNorm(sigma=-1.0),
            lambda x: F.local_contrast_norm(x[:, :, None], size=1, sigma=-1.0),
        ),
        (
            ValueError,
            lambda: jnnx.ELU(float("nan")),
            lambda x: F.elu(x, float("nan")),
        ),
        (ValueError, lambda: jnnx.Softplus(beta=0), lambda x: F.softplus(x, beta=0)),
        (TypeError, lambda: jnnx.Softplus(threshold="a"), lambda x: F.softplus(x, threshold="a")),
        (TypeError, lambda: jnnx.GELU(approximate=1), lambda x: F.gelu(x, approximate=1)),
    ],
)
def test_a_real_setting_is_checked_at_construction_with_the_op_message(error, module, op):
    x = jnp.ones((4, 2))
    assert _message(error, module) == _message(error, lambda: op(x))


DRAWING = {name: make for name, make in WITH_PARAMETERS.items() if name != "PReLU"}  # constant


@pytest.mark.parametrize("make", DRAWING.values(), ids=DRAWING)
def test_rngs_without_a_params_stream_is_a_value_error_naming_rngs(make):
    # was Flax's AttributeError "No RngStream named 'params' found in Rngs."
    with pytest.raises(ValueError, match=r"^rngs: the nnx.Rngs has no 'params' stream \(nor a"):
        make(nnx.Rngs(dropout=0))
    layer = make(nnx.Rngs(params=3, dropout=0))
    assert jax.tree.leaves(nnx.state(layer, nnx.Param))  # the params stream serves


CHECKED_AT_CONSTRUCTION = {
    "Conv": (jnnx.Conv, (3, 2, 3), {"padding": 1, "rngs": nnx.Rngs(0)}),
    "DepthwiseConv": (jnnx.DepthwiseConv, (3, 3), {"padding": 1, "rngs": nnx.Rngs(0)}),
    "ConvTranspose": (jnnx.ConvTranspose, (3, 2, 3), {"rngs": nnx.Rngs(0)}),
    "MaxPool": (jnnx.MaxPool, (2,), {}),
    "AvgPool": (jnnx.AvgPool, (2,), {}),
    "LPPool": (jnnx.LPPool, (2, 2), {}),
    "AdaptiveAvgPool": (jnnx.AdaptiveAvgPool, (2,), {}),
    "AdaptiveMaxPool": (jnnx.AdaptiveMaxPool, (2,), {}),
    "LocalContrastNorm": (jnnx.LocalContrastNorm, (3,), {}),
}


@pytest.mark.parametrize(
    ("base", "args", "kwargs"), CHECKED_AT_CONSTRUCTION.values(), ids=CHECKED_AT_CONSTRUCTION
)
def test_a_subclass_with_its_own_call_can_be_constructed(base, args, kwargs, rng):
    # The settings check at construction runs the jcnn class's own __call__: a subclass's may
    # take more arguments and read attributes set after super().__init__() (construction
    # crashed with a TypeError or an AttributeError)
    class Shifted(base):
        def __init__(self):
            super().__init__(*args, **kwargs)
            self.shift = 1.0

        def __call__(self, x, extra):
            return super().__call__(x) + self.shift + extra

    x = jnp.asarray(rng.standard_normal((2, 6, 6, 3)), jnp.float32)
    module = Shifted()
    np.testing.assert_allclose(module(x, 2.0), base.__call__(module, x) + 3.0, rtol=1e-6)


@pytest.mark.parametrize(
    ("linen", "twin", "shape"),
    [
        (
            lambda: nn.Conv(4, 3, stride=np.float32(2)),
            lambda: jnnx.Conv(3, 4, 3, stride=np.float32(2), rngs=nnx.Rngs(0)),
            (1, 6, 6, 3),
        ),
        (
            lambda: nn.MaxPool(np.float64(2.0)),
            lambda: jnnx.MaxPool(np.float64(2.0)),
            (1, 6, 6, 3),
        ),
        (
            lambda: nn.AdaptiveAvgPool(np.float32(0.5)),
            lambda: jnnx.AdaptiveAvgPool(np.float32(0.5)),
            (1, 6, 6, 3),
        ),
    ],
)
def test_a_numpy_float_setting_is_refused_with_the_linen_message(linen, twin, shape):
    # static() made it a Python float first, so the NNX message read "stride: ... got 2.0" where
    # the Linen twin's read "got np.float32(2.0)"
    x = jnp.ones(shape)
    with pytest.raises(TypeError) as linen_error:
        linen().init(jax.random.key(0), x)
    with pytest.raises(TypeError) as nnx_error:
        twin()
    assert str(nnx_error.value) == str(linen_error.value)
