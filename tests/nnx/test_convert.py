"""jcnn.nnx twins against jcnn.nn: for every Linen module, its NNX twin given the same variables
(moved by load_linen_variables) gives the same outputs in training and evaluation, the same
gradients for parameters and input, and the same parameters and running statistics after a few
SGD steps. A jcnn.nn module without a row here (without an NNX twin) fails
test_every_linen_module_has_a_twin."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.traverse_util import flatten_dict

import jcnn
from jcnn import functional as F
from jcnn import init, nn
from jcnn import nnx as jnnx


@dataclass(frozen=True)
class Twin:
    linen: Callable[[], linen.Module]
    nnx: Callable[[nnx.Rngs], nnx.Module]
    shape: tuple[int, ...]
    takes_train: bool = False  # the Linen __call__ takes train
    random: bool = False  # draws a "dropout" key in training


def _bn_seq():
    return (
        lambda: nn.Sequential(
            [
                nn.Conv(6, 3, padding=1),
                nn.BatchNorm(momentum=0.8),
                F.relu,
                nn.MaxPool(2),
                nn.Flatten(),
                nn.Dense(5),
            ]
        ),
        lambda r: jnnx.Sequential(
            [
                jnnx.Conv(2, 6, 3, padding=1, rngs=r),
                jnnx.BatchNorm(6, momentum=0.8, rngs=r),
                F.relu,
                jnnx.MaxPool(2),
                jnnx.Flatten(),
                jnnx.Dense(6 * 3 * 3, 5, rngs=r),
            ]
        ),
    )


TWINS: dict[str, list[Twin]] = {
    "Conv": [
        Twin(
            lambda: nn.Conv(6, (3, 2), stride=2, padding=1, groups=2),
            lambda r: jnnx.Conv(4, 6, (3, 2), stride=2, padding=1, groups=2, rngs=r),
            (2, 9, 7, 4),
        ),
        Twin(
            lambda: nn.Conv(5, 3, dilation=2, padding=2, padding_mode="circular"),
            lambda r: jnnx.Conv(
                3, 5, 3, dilation=2, padding=2, padding_mode="circular", spatial_dims=1, rngs=r
            ),
            (2, 11, 3),
        ),
        Twin(
            lambda: nn.Conv(4, (2, 3, 2), use_bias=False, flip=True, padding="SAME"),
            lambda r: jnnx.Conv(3, 4, (2, 3, 2), use_bias=False, flip=True, padding="SAME", rngs=r),
            (1, 5, 6, 4, 3),
        ),
    ],
    "ConvTranspose": [
        Twin(
            lambda: nn.ConvTranspose(6, 3, stride=2, padding=1, output_padding=1, groups=2),
            lambda r: jnnx.ConvTranspose(
                4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, rngs=r
            ),
            (2, 5, 4, 4),
        ),
        Twin(
            lambda: nn.ConvTranspose(2, (3,), use_bias=False, dilation=2),
            lambda r: jnnx.ConvTranspose(3, 2, (3,), use_bias=False, dilation=2, rngs=r),
            (2, 6, 3),
        ),
    ],
    "DepthwiseConv": [
        Twin(
            lambda: nn.DepthwiseConv((3, 2), depth_multiplier=2, stride=2, padding=1),
            lambda r: jnnx.DepthwiseConv(
                3, (3, 2), depth_multiplier=2, stride=2, padding=1, rngs=r
            ),
            (2, 7, 6, 3),
        ),
        Twin(
            lambda: nn.DepthwiseConv(
                3, dilation=2, padding=2, use_bias=False, padding_mode="reflect"
            ),
            lambda r: jnnx.DepthwiseConv(
                4,
                3,
                dilation=2,
                padding=2,
                use_bias=False,
                padding_mode="reflect",
                spatial_dims=1,
                rngs=r,
            ),
            (2, 9, 4),
        ),
        Twin(
            lambda: nn.DepthwiseConv((2, 2, 3), depth_multiplier=3, padding="SAME"),
            lambda r: jnnx.DepthwiseConv(2, (2, 2, 3), depth_multiplier=3, padding="SAME", rngs=r),
            (1, 4, 5, 4, 2),
        ),
    ],
    "Dense": [
        Twin(lambda: nn.Dense(3), lambda r: jnnx.Dense(5, 3, rngs=r), (2, 3, 5)),
        Twin(
            lambda: nn.Dense(4, use_bias=False, kernel_init=init.xavier_uniform()),
            lambda r: jnnx.Dense(7, 4, use_bias=False, kernel_init=init.xavier_uniform(), rngs=r),
            (3, 7),
        ),
    ],
    "Flatten": [Twin(nn.Flatten, lambda r: jnnx.Flatten(), (2, 3, 4, 5))],
    "BatchNorm": [
        Twin(nn.BatchNorm, lambda r: jnnx.BatchNorm(3, rngs=r), (8, 5, 5, 3), takes_train=True),
        Twin(
            lambda: nn.BatchNorm(
                momentum=0.7, unbiased_running_var=True, use_scale=False, eps=1e-3
            ),
            lambda r: jnnx.BatchNorm(
                4, momentum=0.7, unbiased_running_var=True, use_scale=False, eps=1e-3, rngs=r
            ),
            (6, 4),
            takes_train=True,
        ),
    ],
    "LayerNorm": [
        Twin(nn.LayerNorm, lambda r: jnnx.LayerNorm(3, rngs=r), (2, 4, 4, 3)),
        Twin(
            lambda: nn.LayerNorm(use_bias=False, eps=1e-2),
            lambda r: jnnx.LayerNorm(5, use_bias=False, eps=1e-2, rngs=r),
            (3, 5),
        ),
    ],
    "GroupNorm": [
        Twin(
            lambda: nn.GroupNorm(num_groups=2),
            lambda r: jnnx.GroupNorm(6, num_groups=2, rngs=r),
            (2, 3, 3, 6),
        ),
    ],
    "InstanceNorm": [
        Twin(nn.InstanceNorm, lambda r: jnnx.InstanceNorm(3, rngs=r), (2, 5, 5, 3)),
        Twin(
            lambda: nn.InstanceNorm(
                track_running_stats=True, momentum=0.8, unbiased_running_var=True
            ),
            lambda r: jnnx.InstanceNorm(
                2, track_running_stats=True, momentum=0.8, unbiased_running_var=True, rngs=r
            ),
            (3, 4, 6, 2),
            takes_train=True,
        ),
    ],
    "LocalContrastNorm": [
        Twin(
            lambda: nn.LocalContrastNorm(size=3),
            lambda r: jnnx.LocalContrastNorm(size=3),
            (2, 8, 7, 3),
        ),
    ],
    "LocalResponseNorm": [
        Twin(
            lambda: nn.LocalResponseNorm(3, alpha=1e-2),
            lambda r: jnnx.LocalResponseNorm(3, alpha=1e-2),
            (2, 4, 4, 6),
        ),
    ],
    "MaxPool": [
        Twin(
            lambda: nn.MaxPool(3, stride=2, padding=1, ceil_mode=True),
            lambda r: jnnx.MaxPool(3, stride=2, padding=1, ceil_mode=True),
            (2, 9, 8, 3),
        ),
    ],
    "AvgPool": [
        Twin(
            lambda: nn.AvgPool((2, 3), padding=1, count_include_pad=False),
            lambda r: jnnx.AvgPool((2, 3), padding=1, count_include_pad=False),
            (2, 7, 8, 3),
        ),
    ],
    "LPPool": [Twin(lambda: nn.LPPool(2.0, 2), lambda r: jnnx.LPPool(2.0, 2), (2, 6, 6, 3))],
    "GlobalAvgPool": [Twin(nn.GlobalAvgPool, lambda r: jnnx.GlobalAvgPool(), (2, 5, 4, 3))],
    "GlobalMaxPool": [Twin(nn.GlobalMaxPool, lambda r: jnnx.GlobalMaxPool(), (2, 5, 4, 3))],
    "AdaptiveAvgPool": [
        Twin(lambda: nn.AdaptiveAvgPool(3), lambda r: jnnx.AdaptiveAvgPool(3), (2, 7, 8, 2)),
    ],
    "AdaptiveMaxPool": [
        Twin(
            lambda: nn.AdaptiveMaxPool((2, 3)), lambda r: jnnx.AdaptiveMaxPool((2, 3)), (2, 7, 8, 2)
        ),
    ],
    "PReLU": [
        Twin(nn.PReLU, lambda r: jnnx.PReLU(), (3, 4)),
        Twin(
            lambda: nn.PReLU(channelwise=True, alpha_init=0.1),
            lambda r: jnnx.PReLU(channelwise=True, alpha_init=0.1, num_features=3),
            (2, 4, 4, 3),
        ),
    ],
    "Maxout": [
        Twin(lambda: nn.Maxout(3), lambda r: jnnx.Maxout(3), (2, 4, 6)),
        Twin(
            lambda: nn.Maxout(2, features=3),
            lambda r: jnnx.Maxout(2, 3, in_features=5, rngs=r),
            (4, 5),
        ),
    ],
    "ReLU": [Twin(nn.ReLU, lambda r: jnnx.ReLU(), (3, 5))],
    "LeakyReLU": [Twin(lambda: nn.LeakyReLU(0.2), lambda r: jnnx.LeakyReLU(0.2), (3, 5))],
    "ELU": [Twin(lambda: nn.ELU(0.5), lambda r: jnnx.ELU(0.5), (3, 5))],
    "GELU": [
        Twin(nn.GELU, lambda r: jnnx.GELU(), (3, 5)),
        Twin(lambda: nn.GELU(approximate=True), lambda r: jnnx.GELU(True), (3, 5)),
    ],
    "Tanh": [Twin(nn.Tanh, lambda r: jnnx.Tanh(), (3, 5))],
    "Sigmoid": [Twin(nn.Sigmoid, lambda r: jnnx.Sigmoid(), (3, 5))],
    "Rectify": [Twin(nn.Rectify, lambda r: jnnx.Rectify(), (3, 5))],
    "Swish": [Twin(nn.Swish, lambda r: jnnx.Swish(), (3, 5))],
    "Softplus": [
        Twin(nn.Softplus, lambda r: jnnx.Softplus(), (3, 5)),
        Twin(lambda: nn.Softplus(2.0, 0.5), lambda r: jnnx.Softplus(2.0, 0.5), (3, 5)),
        Twin(lambda: nn.Softplus(threshold=None), lambda r: jnnx.Softplus(threshold=None), (3, 5)),
    ],
    "SiLU": [Twin(nn.SiLU, lambda r: jnnx.SiLU(), (3, 5))],
    "Mish": [Twin(nn.Mish, lambda r: jnnx.Mish(), (3, 5))],
    "SELU": [Twin(nn.SELU, lambda r: jnnx.SELU(), (3, 5))],
    "LocallyConnected": [
        Twin(
            lambda: nn.LocallyConnected(4, (3, 2), stride=(2, 1), padding=1),
            lambda r: jnnx.LocallyConnected(
                3, 4, (3, 2), input_size=(7, 6), stride=(2, 1), padding=1, rngs=r
            ),
            (2, 7, 6, 3),
        ),
        Twin(
            lambda: nn.LocallyConnected(2, 3, dilation=2, use_bias=False),
            lambda r: jnnx.LocallyConnected(
                2, 2, 3, input_size=(9,), dilation=2, use_bias=False, rngs=r
            ),
            (3, 9, 2),
        ),
    ],
    "Dropout": [
        Twin(lambda: nn.Dropout(0.3), lambda r: jnnx.Dropout(0.3), (4, 10), True, True),
    ],
    "SpatialDropout": [
        Twin(
            lambda: nn.SpatialDropout(0.5),
            lambda r: jnnx.SpatialDropout(0.5),
            (3, 4, 4, 5),
            True,
            True,
        ),
    ],
    "Sequential": [Twin(*_bn_seq(), (4, 6, 6, 2), takes_train=True)],
    "Residual": [
        Twin(
            lambda: nn.Residual(
                nn.Sequential([nn.Conv(4, 3, stride=2, padding=1), nn.BatchNorm(), F.relu]),
                projection=nn.Conv(4, 1, stride=2),
            ),
            lambda r: jnnx.Residual(
                jnnx.Sequential(
                    [
                        jnnx.Conv(3, 4, 3, stride=2, padding=1, rngs=r),
                        jnnx.BatchNorm(4, rngs=r),
                        F.relu,
                    ]
                ),
                projection=jnnx.Conv(3, 4, 1, stride=2, rngs=r),
            ),
            (2, 7, 7, 3),
            takes_train=True,
        ),
        Twin(
            lambda: nn.Residual(nn.LayerNorm()),
            lambda r: jnnx.Residual(jnnx.LayerNorm(3, rngs=r)),
            (2, 4, 4, 3),
        ),
    ],
}

CASES = [
    pytest.param(twin, id=f"{name}-{index}")
    for name, twins in TWINS.items()
    for index, twin in enumerate(twins)
]


class _Key(linen.Module):
    """The key a root Linen module's first make_rng("dropout") returns."""

    @linen.compact
    def __call__(self):
        return self.make_rng("dropout")


def _linen_call(twin, module, variables, x, train, key):
    kwargs = {"train": train} if twin.takes_train else {}
    rngs = {"dropout": key} if twin.random and train else None
    if train and "batch_stats" in variables:
        return module.apply(variables, x, rngs=rngs, mutable=["batch_stats"], **kwargs)
    return module.apply(variables, x, rngs=rngs, **kwargs), {}


def _nnx_call(twin, module, x, train, key, *, by_attribute):
    """Call ``module``, choosing train/eval by its attributes (``by_attribute``: set them first,
    None: as they are) or by ``train=``."""
    kwargs = {}
    if twin.random and train:
        kwargs["rngs"] = _Key().apply({}, rngs={"dropout": key})
    if by_attribute is None:
        return module(x, **kwargs)
    if by_attribute:
        module.train() if train else module.eval()
        return module(x, **kwargs)
    module.eval()  # the argument must win over the attributes
    return module(x, train=train, **kwargs) if (twin.takes_train or twin.random) else module(x)


def _assert_trees_equal(actual, expected, what):
    actual, expected = flatten_dict(actual), flatten_dict(expected)
    assert sorted(actual) == sorted(expected), what
    for key in expected:
        np.testing.assert_array_equal(actual[key], expected[key], err_msg=f"{what} {key}")


def _inputs(twin, rng):
    return jnp.asarray(rng.normal(size=twin.shape), jnp.float32)


def test_every_linen_module_has_a_twin():
    assert sorted(TWINS) == sorted(nn.__all__)
    for name in nn.__all__:
        assert name in jnnx.__all__
        assert issubclass(getattr(jnnx, name), nnx.Module)


@pytest.mark.parametrize("twin", CASES)
def test_twin_has_the_linen_variables_and_outputs(twin, rng):
    x = _inputs(twin, rng)
    module = twin.linen()
    init_kwargs = {"train": False} if twin.takes_train else {}
    variables = module.init(jax.random.key(0), x, **init_kwargs)
    twin_module = twin.nnx(nnx.Rngs(1))
    # Same names, shapes and dtypes before the transfer, then the same values after it.
    own = jcnn.nnx.linen_variables(twin_module)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), own) == jax.tree.map(
        lambda a: (a.shape, a.dtype), dict(variables)
    )
    jnnx.load_linen_variables(twin_module, variables)
    _assert_trees_equal(jnnx.linen_variables(twin_module), variables, "variables")
    for train in (False, True):
        key = jax.random.key(7)
        expected, _ = _linen_call(twin, module, variables, x, train, key)
        for by_attribute in (False, True):
            copy = nnx.clone(twin_module)
            actual = _nnx_call(twin, copy, x, train, key, by_attribute=by_attribute)
            np.testing.assert_array_equal(actual, expected, err_msg=f"train={train}")
    if twin.random:  # the mask really drops something
        assert bool((_nnx_call(twin, twin_module, x, True, key, by_attribute=True) == 0).any())


@pytest.mark.parametrize("twin", CASES)
def test_twin_gradients_and_training_steps_match(twin, rng):
    x = _inputs(twin, rng)
    module = twin.linen()
    init_kwargs = {"train": False} if twin.takes_train else {}
    variables = module.init(jax.random.key(0), x, **init_kwargs)
    twin_module = twin.nnx(nnx.Rngs(1))
    jnnx.load_linen_variables(twin_module, variables)
    twin_module.train()
    learning_rate = 0.1

    @jax.jit
    def linen_step(variables, x, key, weights):
        def loss(params, x):
            out, updates = _linen_call(twin, module, {**variables, "params": params}, x, True, key)
            return jnp.sum(out * weights), updates

        params = variables.get("params", {})
        (grads, grad_x), updates = jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)
        new_params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
        return grads, grad_x, {**variables, **updates, "params": new_params}

    @nnx.jit
    def nnx_step(model, x, key, weights):
        def loss(model, x):
            return jnp.sum(_nnx_call(twin, model, x, True, key, by_attribute=None) * weights)

        # nnx.grad also writes the training call's running statistics into the model.
        grads, grad_x = nnx.grad(loss, argnums=(0, 1))(model, x)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, g: p - learning_rate * g, params, grads))
        return grads, grad_x

    for step in range(3):
        x = _inputs(twin, rng)
        key = jax.random.key(step)
        out, _ = jax.eval_shape(
            lambda variables, x, key: _linen_call(twin, module, variables, x, True, key),
            variables,
            x,
            key,
        )
        weights = jnp.asarray(rng.normal(size=out.shape), jnp.float32)
        linen_grad, linen_grad_x, variables = linen_step(variables, x, key, weights)

        graphdef, _, rest = nnx.split(twin_module, nnx.Param, ...)
        nnx_grad, nnx_grad_x = nnx_step(twin_module, x, key, weights)
        np.testing.assert_allclose(nnx_grad_x, linen_grad_x, rtol=1e-6, atol=1e-7)
        grad_tree = jnnx.linen_variables(nnx.merge(graphdef, nnx_grad, rest, copy=True))
        grad_tree = flatten_dict(grad_tree.get("params", {}))
        assert sorted(grad_tree) == sorted(flatten_dict(linen_grad))
        for path, g in flatten_dict(linen_grad).items():
            np.testing.assert_allclose(grad_tree[path], g, rtol=1e-6, atol=1e-7, err_msg=str(path))
        # The parameters after one SGD step and the running statistics of the training call.
        _assert_trees_equal(jnnx.linen_variables(twin_module), variables, f"after step {step}")


def test_load_linen_variables_names_a_variable_that_is_not_an_array():
    model = jnnx.Dense(2, 3, rngs=nnx.Rngs(0))
    variables = {"params": {"kernel": np.ones((2, 3), np.float32), "bias": "abc"}}
    with pytest.raises(TypeError, match="variables: params/bias must be an array, got str 'abc'"):
        jnnx.load_linen_variables(model, variables)  # was JAX's TypeError naming no variable
    np.testing.assert_array_equal(model.bias[...], np.zeros(3))


@pytest.mark.parametrize("bad", [None, [[1.0, 2.0, 3.0], [4.0]]], ids=["None", "ragged"])
def test_load_linen_variables_names_a_variable_jax_cannot_make_an_array_of(bad):
    # was JAX's ValueError "None is not a valid value for jnp.array", naming no variable
    model = jnnx.Dense(2, 3, rngs=nnx.Rngs(0))
    variables = {"params": {"kernel": np.ones((2, 3), np.float32), "bias": bad}}
    with pytest.raises(TypeError, match="^variables: params/bias must be an array, got "):
        jnnx.load_linen_variables(model, variables)
    np.testing.assert_array_equal(model.bias[...], np.zeros(3))


def test_load_linen_variables_says_what_the_variables_hold_where_one_is_missing():
    # the message listed only the entries not yet matched ("got ['params/layers_1/scale']")
    model = jnnx.Sequential(
        [jnnx.Conv(2, 3, 3, rngs=nnx.Rngs(0)), jnnx.BatchNorm(3, rngs=nnx.Rngs(0))]
    )
    params = jnnx.linen_variables(model)["params"]
    with pytest.raises(
        ValueError,
        match=r"^variables: no batch_stats/layers_1/mean for Sequential; the variables' "
        r"collections are \['params'\]$",
    ):
        jnnx.load_linen_variables(model, {"params": params})
    stats = {"layers_1": {"var": np.ones(3, np.float32), "count": np.ones(3, np.float32)}}
    with pytest.raises(
        ValueError,
        match=r"^variables: no batch_stats/layers_1/mean .*; batch_stats/layers_1 "
        r"holds \['count', 'var'\]$",
    ):
        jnnx.load_linen_variables(model, {"params": params, "batch_stats": stats})


def test_dicts_and_lists_of_layers_take_the_linen_names(rng):
    # a dict entry was named head/a where Linen names it head_a: loading found no params/head/a
    class LinenNet(linen.Module):
        def setup(self):
            self.stem = [nn.Dense(3)]
            self.head = {"a": nn.Dense(4), "b": [nn.Dense(2), nn.Dense(2)]}

        def __call__(self, x):
            x = self.head["a"](self.stem[0](x))
            return self.head["b"][1](self.head["b"][0](x))

    class NNXNet(nnx.Module):
        def __init__(self, rngs):
            self.stem = nnx.List([jnnx.Dense(5, 3, rngs=rngs)])
            self.head = nnx.Dict(
                a=jnnx.Dense(3, 4, rngs=rngs),
                b=nnx.List([jnnx.Dense(4, 2, rngs=rngs), jnnx.Dense(2, 2, rngs=rngs)]),
            )

        def __call__(self, x):
            x = self.head["a"](self.stem[0](x))
            return self.head["b"][1](self.head["b"][0](x))

    x = jnp.asarray(rng.normal(size=(2, 5)), jnp.float32)
    variables = LinenNet().init(jax.random.key(1), x)
    twin = NNXNet(nnx.Rngs(0))
    jnnx.load_linen_variables(twin, variables)
    np.testing.assert_array_equal(twin(x), LinenNet().apply(variables, x))
    back = jnnx.linen_variables(twin)
    assert jax.tree.structure(back) == jax.tree.structure(variables)
    assert sorted(back["params"]) == ["head_a", "head_b_0", "head_b_1", "stem_0"]


# sowing outside nnx.capture() (deprecated since Flax 0.12) keeps the value in the module: the
# case tested
@pytest.mark.filterwarnings(r"ignore:Using 'Module.sow\(\)' outside:DeprecationWarning")
def test_sown_intermediates_are_not_moved_either_way():
    # an NNX module that had sown a value (a tuple in an nnx.Intermediate) made linen_variables
    # fail with "tuple indices must be integers or slices, not ellipsis"
    class Twin(nnx.Module):
        def __init__(self, rngs):
            self.c = jnnx.Conv(3, 4, 3, rngs=rngs)

        def __call__(self, x):
            y = self.c(x)
            self.sow(nnx.Intermediate, "features", y)
            return y

    class Linen(linen.Module):
        @linen.compact
        def __call__(self, x):
            y = nn.Conv(4, 3, name="c")(x)
            self.sow("intermediates", "features", y)
            return y

    x = jnp.ones((1, 5, 5, 3))
    twin = Twin(nnx.Rngs(0))
    twin(x)
    variables = jnnx.linen_variables(twin)
    assert list(variables) == ["params"]
    np.testing.assert_array_equal(Linen().apply(variables, x), twin(x))
    params = Linen().init(jax.random.key(1), x)
    _, sown = Linen().apply(params, x, mutable=["intermediates"])
    jnnx.load_linen_variables(twin, {**params, **sown})  # what apply sowed is no variable
    np.testing.assert_array_equal(twin(x), Linen().apply(params, x))
