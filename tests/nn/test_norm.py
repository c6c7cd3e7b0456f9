"""jcnn.nn normalization modules: BatchNorm train/eval and running statistics, the others against
PyTorch and their functional ops."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import functional as F
from jcnn import init, nn


def _nchw(torch, x):
    return torch.tensor(np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2)))


def _nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


def test_batch_norm_train_eval_and_running_stats_match_torch(torch, rng):
    channels = 3
    bn = nn.BatchNorm(
        momentum=0.9,
        unbiased_running_var=True,
        scale_init=init.normal(1.0),
        bias_init=init.normal(1.0),
    )
    xs = [
        jnp.asarray(rng.normal(2.0, 3.0, size=(4, 5, 3, channels)), jnp.float32) for _ in range(2)
    ]
    variables = bn.init(jax.random.key(0), xs[0], train=True)
    # init never moves the statistics, even with train=True.
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(channels))
    np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(channels))
    params = variables["params"]

    @jax.jit
    def train_step(params, stats, x):
        def loss(params, x):
            y, updates = bn.apply(
                {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.sum(y * jnp.sin(y)), (y, updates["batch_stats"])

        (_, (y, new_stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, x
        )
        return y, new_stats, grads

    eval_apply = jax.jit(lambda variables, x: bn.apply(variables, x, train=False))

    ref = torch.nn.BatchNorm2d(channels, momentum=0.1, eps=1e-5).double()
    with torch.no_grad():
        ref.weight.copy_(torch.tensor(np.asarray(params["scale"])))
        ref.bias.copy_(torch.tensor(np.asarray(params["bias"])))
    stats = variables["batch_stats"]
    for x in xs:
        y, stats, (g_params, g_x) = train_step(params, stats, x)
        ref.train()
        xt = _nchw(torch, x).requires_grad_(True)
        ref.zero_grad()
        yt = ref(xt)
        (yt * torch.sin(yt)).sum().backward()
        np.testing.assert_allclose(y, _nhwc(yt), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(g_x, _nhwc(xt.grad), rtol=1e-3, atol=1e-4)
        np.testing.assert_allclose(g_params["scale"], ref.weight.grad.numpy(), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(g_params["bias"], ref.bias.grad.numpy(), rtol=1e-4, atol=1e-3)
        np.testing.assert_allclose(stats["mean"], ref.running_mean.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats["var"], ref.running_var.numpy(), rtol=1e-5, atol=1e-5)

    # Evaluation uses the running statistics and leaves them alone.
    ref.eval()
    x = xs[0]
    y_eval, updates = bn.apply(
        {"params": params, "batch_stats": stats}, x, train=False, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y_eval, _nhwc(ref(_nchw(torch, x))), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(updates["batch_stats"]["mean"], stats["mean"])
    np.testing.assert_array_equal(updates["batch_stats"]["var"], stats["var"])
    np.testing.assert_allclose(
        eval_apply({"params": params, "batch_stats": stats}, x), y_eval, rtol=1e-6, atol=1e-6
    )


def test_batch_norm_equals_functional_and_options(rng):
    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    bn = nn.BatchNorm(use_scale=False, eps=1e-3)
    variables = bn.init(jax.random.key(0), x, train=False)
    assert set(variables["params"]) == {"bias"}
    y, updates = bn.apply(variables, x, train=True, mutable=["batch_stats"])
    state = F.BatchNormState(jnp.zeros(4), jnp.ones(4))
    expected, new_state = F.batch_norm(
        x, None, variables["params"]["bias"], state, train=True, eps=1e-3
    )
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_allclose(updates["batch_stats"]["mean"], new_state.mean, rtol=1e-6)
    np.testing.assert_allclose(
        updates["batch_stats"]["mean"], 0.01 * np.asarray(x).mean(0), rtol=1e-5
    )
    with pytest.raises(TypeError, match="train"):
        bn.apply(variables, x)


@pytest.mark.parametrize(
    "module", [nn.BatchNorm(momentum=0.5), nn.InstanceNorm(momentum=0.5, track_running_stats=True)]
)
def test_float64_parameters_keep_float64_running_statistics(rng, module):
    """A float64 model (jax_enable_x64) evaluates with float64 running statistics: float32 ones
    rounded the evaluation-mode output to float32 precision; half-precision and float32
    parameters keep float32 statistics, as in Flax."""
    x = rng.normal(size=(4, 3, 3, 2)) + 1 / 3
    with jax.enable_x64(True):
        module = module.clone(param_dtype=jnp.float64)
        variables = module.init(jax.random.key(0), jnp.asarray(x), train=False)
        _, updates = module.apply(variables, jnp.asarray(x), train=True, mutable=["batch_stats"])
        stats = updates["batch_stats"]
        assert stats["mean"].dtype == stats["var"].dtype == jnp.float64
        y = module.apply({**variables, **updates}, jnp.asarray(x), train=False)
    axes = (0, 1, 2) if isinstance(module, nn.BatchNorm) else (1, 2)
    mean = 0.5 * x.mean(axes).reshape(-1, 2).mean(0)
    var = 0.5 + 0.5 * x.var(axes).reshape(-1, 2).mean(0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-13, atol=1e-13)
    for param_dtype in (jnp.float32, jnp.bfloat16):
        half = module.clone(param_dtype=param_dtype)
        stats = half.init(jax.random.key(0), jnp.asarray(x, jnp.float32), train=False)
        assert stats["batch_stats"]["var"].dtype == jnp.float32


def test_batch_norm_axis_name_gives_whole_batch_statistics(rng):
    x = jnp.asarray(rng.normal(size=(2, 3, 5, 4)), jnp.float32)  # 2 "devices" x 3 examples
    bn = nn.BatchNorm(axis_name="devices")
    variables = bn.init(jax.random.key(0), x[0], train=False)

    def shard(x):
        return bn.apply(variables, x, train=True, mutable=["batch_stats"])

    y, updates = jax.vmap(shard, axis_name="devices")(x)
    y_full, updates_full = nn.BatchNorm().apply(
        variables, x.reshape(6, 5, 4), train=True, mutable=["batch_stats"]
    )
    np.testing.assert_allclose(y.reshape(6, 5, 4), y_full, rtol=1e-5, atol=1e-5)
    for name in ("mean", "var"):
        np.testing.assert_allclose(
            updates["batch_stats"][name][0], updates_full["batch_stats"][name], rtol=1e-5
        )


def test_layer_group_instance_norm_match_torch(torch, rng):
    x = jnp.asarray(rng.normal(1.0, 2.0, size=(2, 4, 5, 6)), jnp.float32)
    xt = _nchw(torch, x)
    tf = torch.nn.functional
    cases = [
        (nn.LayerNorm(), lambda s, b: tf.group_norm(xt, 1, s, b, eps=1e-5)),
        (nn.GroupNorm(num_groups=3), lambda s, b: tf.group_norm(xt, 3, s, b, eps=1e-5)),
        (nn.InstanceNorm(), lambda s, b: tf.instance_norm(xt, weight=s, bias=b, eps=1e-5)),
    ]
    for layer, reference in cases:
        layer = layer.clone(scale_init=init.normal(1.0), bias_init=init.normal(1.0))
        params = layer.init(jax.random.key(0), x)["params"]
        assert params["scale"].shape == params["bias"].shape == (6,)
        y = jax.jit(layer.apply)({"params": params}, x)
        scale, bias = (torch.tensor(np.asarray(params[k], np.float64)) for k in ("scale", "bias"))
        np.testing.assert_allclose(y, _nhwc(reference(scale, bias)), rtol=1e-4, atol=1e-4)
        grads = jax.jit(jax.grad(lambda p, m=layer: jnp.sum(m.apply({"params": p}, x) ** 3)))(
            params
        )
        assert all(np.isfinite(g).all() and np.abs(g).sum() > 0 for g in jax.tree.leaves(grads))
    with pytest.raises(ValueError, match="num_groups"):
        nn.GroupNorm(num_groups=4).init(jax.random.key(0), x)


def test_instance_norm_running_stats_only_in_training(torch, rng):
    x = jnp.asarray(rng.normal(size=(3, 4, 4, 2)), jnp.float32)
    layer = nn.InstanceNorm(
        track_running_stats=True,
        momentum=0.9,
        unbiased_running_var=True,  # PyTorch's choice
        use_scale=False,
        use_bias=False,
    )
    variables = layer.init(jax.random.key(0), x, train=True)
    y, updates = layer.apply(variables, x, train=True, mutable=["batch_stats"])
    ref = torch.nn.InstanceNorm2d(2, momentum=0.1, track_running_stats=True).double()
    yt = ref(_nchw(torch, x))
    np.testing.assert_allclose(y, _nhwc(yt), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(
        updates["batch_stats"]["mean"], ref.running_mean.numpy(), rtol=1e-5, atol=1e-6
    )
    y_eval, same = layer.apply(
        {"batch_stats": updates["batch_stats"]}, x, train=False, mutable=["batch_stats"]
    )
    ref.eval()
    np.testing.assert_allclose(y_eval, _nhwc(ref(_nchw(torch, x))), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(same["batch_stats"]["var"], updates["batch_stats"]["var"])
    with pytest.raises(ValueError, match="train"):
        layer.apply(variables, x)


@pytest.mark.parametrize(
    "setting, error, says",
    [
        ({"momentum": -0.5}, ValueError, r"momentum: expected a number in \[0, 1\], got -0.5"),
        ({"momentum": "0.9"}, TypeError, "momentum: expected a number"),
        ({"unbiased_running_var": 1}, TypeError, "unbiased_running_var: expected a Python bool"),
    ],
)
def test_instance_norm_checks_running_settings_even_without_tracking(rng, setting, error, says):
    x = jnp.asarray(rng.normal(size=(2, 4, 4, 3)), jnp.float32)
    for track in (False, True):
        with pytest.raises(error, match=says):
            nn.InstanceNorm(track_running_stats=track, **setting).init(jax.random.key(0), x, True)


def test_local_norms_equal_functional_and_lrn_matches_torch(torch, rng):
    x = jnp.asarray(rng.normal(size=(2, 9, 8, 6)), jnp.float32)
    lcn = nn.LocalContrastNorm(size=5, sigma=1.5)
    np.testing.assert_allclose(
        jax.jit(lcn.apply)({}, x), F.local_contrast_norm(x, size=5, sigma=1.5), rtol=1e-6, atol=1e-6
    )
    lrn = nn.LocalResponseNorm(size=3, alpha=1e-2, beta=0.75, k=2.0)
    y = jax.jit(lrn.apply)({}, x)
    np.testing.assert_allclose(
        y, F.local_response_norm(x, 3, alpha=1e-2, beta=0.75, k=2.0), rtol=1e-6, atol=1e-6
    )
    # jcnn's alpha multiplies the sum; PyTorch's is divided by size first.
    expected = torch.nn.functional.local_response_norm(
        _nchw(torch, x), 3, alpha=3e-2, beta=0.75, k=2.0
    )
    np.testing.assert_allclose(y, _nhwc(expected), rtol=1e-5, atol=1e-5)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(lcn.apply({}, x) * x)))(x)
    assert np.isfinite(grad).all()


@pytest.mark.parametrize(
    "module", [nn.BatchNorm(), nn.LayerNorm(), nn.GroupNorm(1), nn.InstanceNorm()]
)
def test_variables_built_for_other_channels_are_refused_naming_x(module):
    kwargs = {"train": False} if isinstance(module, nn.BatchNorm) else {}
    variables = module.init(jax.random.key(0), jnp.ones((2, 4, 4, 3)), **kwargs)
    with pytest.raises(ValueError, match=r"x: shape \(2, 4, 4, 5\) does not fit .*\(3,\)"):
        module.apply(variables, jnp.ones((2, 4, 4, 5)), **kwargs)


@pytest.mark.parametrize(
    ("layer", "kwargs"),
    [
        (nn.BatchNorm(dtype=jnp.int32), {"train": True}),
        (nn.LayerNorm(dtype=jnp.int32), {}),
        (nn.GroupNorm(3, dtype=jnp.int32), {}),
        (nn.InstanceNorm(dtype=jnp.int32), {}),
    ],
)
def test_a_non_floating_compute_dtype_is_a_type_error(layer, kwargs):
    with pytest.raises(TypeError, match="dtype: expected None or a floating dtype"):
        layer.init(jax.random.key(0), jnp.ones((2, 4, 4, 3)), **kwargs)


@pytest.mark.parametrize("bad", [5, 0, None, "ones"])
@pytest.mark.parametrize(
    ("make", "args"),
    [
        (nn.BatchNorm, (True,)),
        (nn.LayerNorm, ()),
        (lambda **kw: nn.GroupNorm(num_groups=1, **kw), ()),
        (nn.InstanceNorm, ()),
    ],
)
@pytest.mark.parametrize("name", ["scale_init", "bias_init"])
def test_a_non_callable_initializer_is_named(make, args, name, bad):
    layer = make(**{name: bad})
    with pytest.raises(TypeError, match=f"^{name}: expected an initializer init\\(key, shape"):
        layer.init(jax.random.key(0), jnp.ones((2, 4, 4, 3)), *args)


@pytest.mark.parametrize(
    ("bad", "error", "message"),
    [
        (init.normal, TypeError, "cannot take those three arguments"),
        (lambda key, shape, dtype: jnp.ones((1, *shape), dtype), ValueError, r"got shape \(1, 3\)"),
    ],
)
@pytest.mark.parametrize("name", ["scale_init", "bias_init"])
def test_an_initializer_that_cannot_make_the_parameter_is_named(name, bad, error, message):
    with pytest.raises(error, match=f"^{name}: expected .*{message}"):
        nn.LayerNorm(**{name: bad}).init(jax.random.key(0), jnp.ones((2, 4, 4, 3)))
