"""Input checks of every public op: bad values raise a clear error naming the argument, valid
spellings (Python and NumPy scalars, 0-d arrays) are accepted, and degenerate inputs that used to
give silently wrong results (all zeros, NaN statistics, gradients split among ties) are either
refused as PyTorch refuses them or computed as PyTorch computes them."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import functional as F
from jcnn.functional._checks import (
    check_bool,
    check_int,
    check_positive_int,
    check_real,
    check_size_sequence,
    seed_key,
    window_count,
)

X4 = jnp.ones((2, 4, 4, 4))
X2 = jnp.ones((2, 4))
XR = jnp.sin(jnp.arange(128.0)).reshape(2, 4, 4, 4)  # distinct values
C4 = jnp.ones(4)
STATE = F.BatchNormState(jnp.zeros(4), jnp.ones(4))
KEY = jax.random.key(0)
W = jnp.ones((3, 3, 4, 2))

NAN, INF = math.nan, math.inf

# (call, error, message): every numeric option of every op, with a wrong type and a wrong value.
BAD = [
    # norms: eps, momentum, flags, k, alpha, beta, sigma
    *[
        (
            lambda eps=eps, fn=fn: fn(eps),
            ValueError,
            f"eps: expected a finite number > 0, got {eps}",
        )
        for eps in (INF, NAN, 0.0, -1e-5)
        for fn in (
            lambda eps: F.batch_norm(X4, C4, C4, STATE, train=True, eps=eps),
            lambda eps: F.batch_norm(X4, C4, C4, STATE, train=False, eps=eps),
            lambda eps: F.layer_norm(X4, None, None, eps=eps),
            lambda eps: F.group_norm(X4, None, None, num_groups=2, eps=eps),
            lambda eps: F.instance_norm(X4, None, None, eps=eps),
            lambda eps: F.local_contrast_norm(X4, size=3, eps=eps),
            lambda eps: F.fold_batch_norm(
                W, None, None, None, F.BatchNormState(jnp.zeros(2), jnp.ones(2)), eps=eps
            ),
        )
    ],
    (
        lambda: F.batch_norm(X4, C4, C4, STATE, train=True, eps="1e-5"),
        TypeError,
        "eps: expected a finite number > 0, got '1e-5'",
    ),
    (
        lambda: F.layer_norm(X4, None, None, eps=None),
        TypeError,
        "eps: expected a finite number > 0, got None",
    ),
    (
        lambda: F.batch_norm(X4, C4, C4, STATE, train=True, momentum=NAN),
        ValueError,
        "momentum: expected a number in [0, 1], got nan",
    ),
    (
        lambda: F.batch_norm(X4, C4, C4, STATE, train=True, momentum="0.9"),
        TypeError,
        "momentum: expected a number in [0, 1], got '0.9'",
    ),
    (lambda: F.batch_norm(X4, C4, C4, STATE, train=1), TypeError, "train: expected a Python bool"),
    (
        lambda: F.instance_norm(X4, None, None, STATE, train=True, momentum=-0.1),
        ValueError,
        "momentum: expected a number in [0, 1], got -0.1",
    ),
    (
        lambda: F.local_response_norm(X4, 3, k=INF),
        ValueError,
        "k: expected a finite number > 0, got inf",
    ),
    (
        lambda: F.local_response_norm(X4, 3, alpha=NAN),
        ValueError,
        "alpha: expected a finite number >= 0, got nan",
    ),
    (
        lambda: F.local_response_norm(X4, 3, beta=INF),
        ValueError,
        "beta: expected a finite number, got inf",
    ),
    (
        lambda: F.local_response_norm(X4, 3, beta=None),
        TypeError,
        "beta: expected a finite number, got None",
    ),
    (lambda: F.local_response_norm(X4, 2.5), TypeError, "size: expected an int"),
    (
        lambda: F.local_contrast_norm(X4, size=3, sigma=INF),
        ValueError,
        "sigma: expected a finite number > 0, got inf",
    ),
    (
        lambda: F.group_norm(X4, None, None, num_groups="2"),
        TypeError,
        "num_groups: expected an int",
    ),
    # pools
    (
        lambda: F.max_pool(X4, "2"),
        TypeError,
        "window: expected an int or a sequence of ints, got '2'",
    ),
    (lambda: F.max_pool(X4, 2, stride=None, padding=None), TypeError, "padding: expected an int"),
    (
        lambda: F.max_pool(X4, 3, stride=1, padding=((True, 0), (0, 1))),
        ValueError,
        "padding: expected 2 (lo, hi) pairs of ints, one per spatial dim, got ((True, 0), (0, 1))",
    ),
    (
        lambda: F.adaptive_avg_pool(X4, np.array(2.0)),
        TypeError,
        "output_size: expected positive ints (or None to keep an input size), got 2.0",
    ),
    (
        lambda: F.max_pool(X4, 2, ceil_mode="yes"),
        TypeError,
        "ceil_mode: expected a Python bool, got 'yes'",
    ),
    (
        lambda: F.max_pool(X4, 2, dilation=0),
        ValueError,
        "dilation: every entry must be >= 1, got 0",
    ),
    (
        lambda: F.avg_pool(X4, 2, count_include_pad=None),
        TypeError,
        "count_include_pad: expected a Python bool, got None",
    ),
    (lambda: F.avg_pool(X4, 2, stride=0), ValueError, "stride: every entry must be >= 1, got 0"),
    (lambda: F.lp_pool(X4, NAN, 2), ValueError, "p: expected a finite number > 0, got nan"),
    (lambda: F.lp_pool(X4, None, 2), TypeError, "p: expected a finite number > 0, got None"),
    (lambda: F.adaptive_avg_pool(X4, (2, "2")), TypeError, "output_size: expected positive ints"),
    (lambda: F.adaptive_max_pool(X4, 0), ValueError, "output_size: expected positive ints"),
    (lambda: F.subsample(X4, 0), ValueError, "stride: every entry must be >= 1, got 0"),
    (
        lambda: F.global_avg_pool(jnp.ones((2, 0, 3, 2))),
        ValueError,
        "x: expected at least one pixel in every spatial dim to pool, got shape (2, 0, 3, 2)",
    ),
    (
        lambda: F.global_max_pool(jnp.ones((2, 3, 0, 2))),
        ValueError,
        "x: expected at least one pixel in every spatial dim",
    ),
    (
        lambda: F.adaptive_avg_pool(jnp.ones((2, 0, 3, 2)), 1),
        ValueError,
        "x: expected at least one pixel in every spatial dim",
    ),
    (
        lambda: F.adaptive_max_pool(jnp.ones((2, 0, 3)), 1),
        ValueError,
        "x: expected at least one pixel in every spatial dim",
    ),
    # convolutions
    (
        lambda: F.conv(X4, W, stride="1"),
        TypeError,
        "stride: expected an int or a sequence of 2 ints, got '1'",
    ),
    (lambda: F.conv(X4, W, padding=-1), ValueError, "padding: padding must be non-negative"),
    (
        lambda: F.conv(X4, W, padding=((0, False), (1, 1))),
        ValueError,
        "padding: expected 2 (lo, hi) pairs of ints",
    ),
    (lambda: F.conv(X4, W, groups=1.0), TypeError, "groups: expected a positive int, got 1.0"),
    (lambda: F.conv(X4, W, groups=True), TypeError, "groups: expected a positive int, got True"),
    (
        lambda: F.conv(X4, W, padding_mode=None),
        TypeError,
        "padding_mode: expected one of 'zeros', 'reflect', 'replicate', 'circular', got None",
    ),
    (lambda: F.conv(X4, W, padding_mode=["zeros"]), TypeError, "padding_mode: expected one of"),
    (lambda: F.conv(X4, W, flip="no"), TypeError, "flip: expected a Python bool, got 'no'"),
    (
        lambda: F.conv_transpose(X4, jnp.ones((3, 3, 4, 2)), output_padding=-1),
        ValueError,
        "output_padding: every entry must be >= 0",
    ),
    # activations
    (
        lambda: F.leaky_relu(X2, None),
        TypeError,
        "negative_slope: expected a finite number, got None",
    ),
    (
        lambda: F.leaky_relu(X2, NAN),
        ValueError,
        "negative_slope: expected a finite number, got nan",
    ),
    (lambda: F.elu(X2, INF), ValueError, "alpha: expected a finite number, got inf"),
    (lambda: F.softplus(X2, beta=-1.0), ValueError, "beta: expected a finite number > 0, got -1.0"),
    (lambda: F.softplus(X2, threshold=NAN), ValueError, "threshold: expected a number, got nan"),
    (lambda: F.softplus(X2, threshold="20"), TypeError, "threshold: expected a number, got '20'"),
    (lambda: F.prelu(X2, "0.25"), TypeError, "alpha: expected an array, got str"),
    (lambda: F.maxout(X2, None), TypeError, "num_pieces: expected a positive int, got None"),
    (lambda: F.gelu(X2, approximate=1), TypeError, "approximate: expected a Python bool, got 1"),
    # dropout and losses
    (lambda: F.dropout(KEY, X2, 2.0), ValueError, "rate: expected a number in [0, 1], got 2.0"),
    (
        lambda: F.spatial_dropout(KEY, X4, None),
        TypeError,
        "rate: expected a number in [0, 1], got None",
    ),
    (
        lambda: F.dropout(KEY, X2, 0.5, train="yes"),
        TypeError,
        "train: expected a Python bool, got 'yes'",
    ),
    (
        lambda: F.cross_entropy(X2, jnp.zeros(2, jnp.int32), label_smoothing=INF),
        ValueError,
        "label_smoothing: expected a number in [0, 1], got inf",
    ),
    (
        lambda: F.cross_entropy(X2, jnp.zeros(2, jnp.int32), reduction=None),
        TypeError,
        "reduction: expected one of 'mean', 'sum', 'none', got None",
    ),
    (
        lambda: F.cross_entropy(X2, jnp.zeros(2, jnp.int32), reduction="max"),
        ValueError,
        "reduction: expected one of 'mean', 'sum', 'none', got 'max'",
    ),
]


@pytest.mark.parametrize(
    "call, error, message", BAD, ids=[f"{i}-{m[:50]}" for i, (_, _, m) in enumerate(BAD)]
)
def test_bad_argument_is_named(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


# Valid spellings of the same values: each gives exactly the result of the plain Python one.
SPELLINGS = [
    (
        lambda v: F.batch_norm(XR, C4, C4, STATE, train=True, eps=v)[0],
        1e-3,
        [np.float32(1e-3), np.float64(1e-3), np.array(1e-3), jnp.float32(1e-3)],
    ),
    (
        lambda v: F.batch_norm(XR, C4, C4, STATE, train=True, momentum=v)[1].mean,
        0.5,
        [np.float32(0.5), np.array(0.5), 1 // 2 + 0.5],
    ),
    (
        lambda v: F.layer_norm(XR, None, None, eps=v),
        1,
        [np.int64(1), np.array(1), 1.0],
    ),
    (lambda v: F.local_response_norm(X4, v, alpha=1.0), 3, [np.int64(3), np.int32(3), np.array(3)]),
    (
        lambda v: F.max_pool(XR, v),
        2,
        [np.int64(2), (np.int32(2), 2), np.array([2, 2])],
    ),
    (lambda v: F.avg_pool(X4, 2, stride=v), 1, [np.int64(1), [1, np.int16(1)]]),
    (lambda v: F.lp_pool(X4, v, 2), 2, [np.float32(2.0), 2.0, np.int8(2), np.array(2.0)]),
    (
        lambda v: F.adaptive_avg_pool(X4, v),
        2,
        [np.int64(2), (np.int64(2), 2), np.array(2), np.array([2, 2]), jnp.asarray([2, 2])],
    ),
    (lambda v: F.adaptive_max_pool(X4, v), 2, [np.array(2), np.array([2, 2])]),
    (lambda v: F.conv(X4, W, stride=v), 2, [np.int64(2), (2, np.int64(2)), (jnp.int32(2), 2)]),
    (lambda v: F.leaky_relu(-X2, v), 0.25, [np.float32(0.25), np.array(0.25), jnp.float32(0.25)]),
    (lambda v: F.dropout(KEY, X2, v), 0.5, [np.float32(0.5), np.array(0.5), jnp.float32(0.5)]),
    (
        lambda v: F.cross_entropy(X2, jnp.zeros(2, jnp.int32), label_smoothing=v),
        0.1,
        [np.float32(0.1), np.array(0.1)],
    ),
    (lambda v: F.softplus(X2, beta=v), 2, [np.float32(2.0), np.int64(2), 2.0]),
    (lambda v: F.maxout(X2, v), 2, [np.int64(2), np.uint8(2), np.array(2), jnp.int32(2)]),
    (lambda v: F.conv(X4, W[:, :, :2], groups=v), 2, [np.array(2), jnp.asarray(2)]),
    (lambda v: F.group_norm(XR, None, None, num_groups=v), 2, [np.array(2), jnp.int8(2)]),
]


@pytest.mark.parametrize("call, plain, spellings", SPELLINGS)
def test_numpy_scalars_and_0d_arrays_are_accepted(call, plain, spellings):
    want = np.asarray(call(plain))
    for value in spellings:
        np.testing.assert_allclose(np.asarray(call(value)), want, rtol=1e-6)


def test_check_helpers():
    assert check_real(np.float16(0.5), "p", low=0, high=1) == 0.5
    assert check_int(np.uint8(7), "bits", low=1, high=8) == 7
    assert check_bool(np.bool_(True), "flag") is True
    with pytest.raises(
        TypeError, match=re.escape("x: expected a finite number, got ndarray of shape (2,)")
    ):
        check_real(np.ones(2), "x")
    with pytest.raises(TypeError, match="n: expected an int, got True"):
        check_int(True, "n")
    with pytest.raises(TypeError, match="n: expected an int, got 2.0"):
        check_int(2.0, "n")
    assert check_positive_int(jnp.asarray(3, jnp.uint8), "n") == 3
    for bad in (True, jnp.asarray(True), 2.0, np.array([2])):
        with pytest.raises(TypeError, match="n: expected a positive int, got "):
            check_positive_int(bad, "n")
    with pytest.raises(ValueError, match="^n: expected a positive int, got 0$"):
        check_positive_int(jnp.asarray(0), "n")
    with pytest.raises(TypeError, match="n: expected a positive int, got .*Tracer"):
        jax.jit(lambda v: check_positive_int(v, "n"))(1)
    with pytest.raises(ValueError, match=re.escape("p: expected a number in (0, 1), got 1.0")):
        check_real(1.0, "p", low=0, high=1, low_open=True, high_open=True)
    with pytest.raises(TypeError, match="x: expected a finite number, got DynamicJaxprTracer"):
        jax.jit(lambda v: check_real(v, "x"))(1.0)


def test_byte_swapped_arrays_are_refused_naming_the_argument():
    # JAX refuses them deep inside, printing the whole array; conv did so from lax.
    swapped = np.ones((1, 4, 4, 2), ">f4")
    with pytest.raises(
        TypeError, match=r"^x: expected an array in native byte order, got dtype >f4"
    ):
        F.conv(swapped, jnp.ones((3, 3, 2, 2)))
    with pytest.raises(TypeError, match=r"^w: expected an array in native byte order"):
        F.conv(jnp.ones((1, 4, 4, 2)), np.ones((3, 3, 2, 2), ">f4"))
    native = swapped.astype(swapped.dtype.newbyteorder("="))
    assert float(F.conv(native, jnp.ones((3, 3, 2, 2))).sum()) == 8 * 18


def test_check_real_names_an_int_beyond_floats_range():
    # float() of such an int raised a bare OverflowError from inside the check
    with pytest.raises(ValueError, match="^lr: expected a finite number >= 0, got 1000"):
        check_real(10**400, "lr", low=0)
    with pytest.raises(ValueError, match="^x: expected a number >= 0, got -1000"):
        check_real(-(10**400), "x", low=0, finite=False)
    assert check_real(10**400, "x", finite=False) == math.inf


def test_sizes_past_int64_are_refused_naming_the_argument():
    # 2**63 as a stride: OverflowError inside max_pool, "dims[10]: ..." from conv, a TypeError
    # from lax.reduce_window for local_response_norm's size
    huge = 2**63
    for call, name in (
        (lambda: F.max_pool(X4, 2, huge), "stride"),
        (lambda: F.avg_pool(X4, 2, (1, huge)), "stride"),
        (lambda: F.conv(X4, W, stride=huge), "stride"),
        (lambda: F.local_response_norm(X4, huge), "size"),
        (lambda: F.subsample(X4, (huge, 1)), "stride"),
    ):
        with pytest.raises(ValueError, match=f"^{name}: every entry must be an int64"):
            call()
    assert F.max_pool(X4, 2, huge - 1).shape == (2, 1, 1, 4)  # the largest int64 stride works


def test_check_size_sequence():
    assert check_size_sequence([np.int64(4), 5], "in_spatial") == (4, 5)
    assert check_size_sequence(np.array([6, 5, 3]), "shape", length=3) == (6, 5, 3)
    assert check_size_sequence((0, 2), "in_spatial") == (0, 2)
    for bad in (8, (8,), (8, 8, 3, 1), (8.0, 8, 3), (True, 8, 3), np.array([8.0, 8, 3]), "883"):
        with pytest.raises(TypeError, match="shape: expected a sequence of 3 ints such as"):
            check_size_sequence(bad, "shape", length=3, example="(H, W, C)")
    with pytest.raises(TypeError, match="in_spatial: expected a non-empty sequence of ints"):
        check_size_sequence((), "in_spatial")
    with pytest.raises(ValueError, match=re.escape("shape: expected sizes >= 0, got (-8, 8)")):
        check_size_sequence((-8, 8), "shape")
    with pytest.raises(ValueError, match=re.escape("size: expected sizes >= 1, got (0, 2)")):
        check_size_sequence((0, 2), "size", minimum=1)


# ---- degenerate inputs ---------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 3), (1, 1, 1, 3)])
def test_batch_norm_training_needs_two_values_per_channel(torch, shape):
    # One value per channel normalizes to exactly 0 (PyTorch refuses it). An empty batch is
    # accepted and leaves the statistics unchanged (test_norm.py), as in PyTorch.
    x = jnp.ones(shape)
    state = F.BatchNormState(jnp.zeros(3), jnp.ones(3))
    with pytest.raises(ValueError, match="x: expected more than 1 value per channel when training"):
        F.batch_norm(x, None, None, state, train=True)
    if math.prod(shape) == 3:  # PyTorch raises as well
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            torch.nn.functional.batch_norm(
                torch.ones(shape[0], 3, *shape[1:-1]), torch.zeros(3), torch.ones(3), training=True
            )
    y, new_state = F.batch_norm(x, None, None, state, train=False)  # evaluation is fine
    assert y.shape == shape and new_state.mean is state.mean and new_state.var is state.var


def test_batch_norm_two_values_are_enough_and_vmapped_shards_count_together():
    state = F.BatchNormState(jnp.zeros(2), jnp.ones(2))
    x = jnp.asarray([[1.0, 2.0], [3.0, 6.0]])
    y, new_state = F.batch_norm(x, None, None, state, train=True)
    assert np.isfinite(np.asarray(new_state.var)).all() and float(jnp.abs(y).max()) > 0.9
    # A shard of one example under vmap is fine: the statistics cover the whole mapped batch.
    sharded = jax.vmap(
        lambda xi: F.batch_norm(xi[None], None, None, state, train=True, axis_name="batch")[0],
        axis_name="batch",
    )(x)
    np.testing.assert_allclose(sharded[:, 0], y, rtol=1e-6)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        jax.vmap(
            lambda xi: F.batch_norm(xi[None], None, None, state, train=True, axis_name="b")[0],
            axis_name="b",
        )(x[:1])


def test_instance_norm_needs_two_spatial_values(torch):
    x = jnp.ones((2, 1, 1, 3))
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        F.instance_norm(x, None, None)
    with pytest.raises(ValueError, match="Expected more than 1 spatial element"):
        torch.nn.functional.instance_norm(torch.ones(2, 3, 1, 1))
    state = F.BatchNormState(jnp.zeros(3), jnp.ones(3))
    y, _ = F.instance_norm(x, None, None, state, train=False)  # running statistics: fine
    assert y.shape == x.shape


def _torch_max_pool_grad(torch, x, cotangent, pool):
    xt = torch.tensor(np.moveaxis(x, -1, 1), requires_grad=True)
    yt = pool(xt)
    (yt * torch.tensor(np.moveaxis(cotangent, -1, 1))).sum().backward()
    return np.moveaxis(xt.grad.numpy(), 1, -1)


@pytest.mark.parametrize(
    "ours, theirs, out_shape",
    [
        (
            lambda x: F.adaptive_max_pool(x, (3, 2)),
            lambda t, x: t.nn.functional.adaptive_max_pool2d(x, (3, 2)),
            (2, 3, 2, 3),
        ),
        (
            lambda x: F.adaptive_max_pool(x, (2, 3)),
            lambda t, x: t.nn.functional.adaptive_max_pool2d(x, (2, 3)),
            (2, 2, 3, 3),
        ),
        (
            lambda x: F.global_max_pool(x),
            lambda t, x: t.nn.functional.adaptive_max_pool2d(x, 1)[..., 0, 0],
            (2, 3),
        ),
        (
            lambda x: F.max_pool(x, 2, stride=1),
            lambda t, x: t.nn.functional.max_pool2d(x, 2, stride=1),
            (2, 5, 4, 3),
        ),
        (
            lambda x: F.max_pool(x, 3, stride=2, padding=1),
            lambda t, x: t.nn.functional.max_pool2d(x, 3, 2, 1),
            (2, 3, 3, 3),
        ),
        (lambda x: F.max_pool(x, 2), lambda t, x: t.nn.functional.max_pool2d(x, 2), (2, 3, 2, 3)),
        (
            lambda x: F.max_pool(x, 2, dilation=2),
            lambda t, x: t.nn.functional.max_pool2d(x, 2, 2, dilation=2),
            (2, 2, 2, 3),
        ),
        (
            lambda x: F.max_pool(x, 2, ceil_mode=True),
            lambda t, x: t.nn.functional.max_pool2d(x, 2, ceil_mode=True),
            (2, 3, 3, 3),
        ),
    ],
)
def test_max_pool_gradient_at_ties_goes_to_the_first_winner_as_in_torch(
    torch, rng, ours, theirs, out_shape
):
    # Few distinct values (ReLU zeros tie all the time): every window holds ties.
    x = rng.integers(0, 2, size=(2, 6, 5, 3)).astype(np.float32)
    x[0, :, :, 0] = 0.0  # whole planes of ties
    cotangent = rng.normal(size=out_shape).astype(np.float32)
    _, vjp = jax.vjp(ours, jnp.asarray(x))
    got = vjp(jnp.asarray(cotangent))[0]
    want = _torch_max_pool_grad(torch, x, cotangent, lambda t: theirs(torch, t))
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # The same under jit and vmap.
    jitted = jax.jit(jax.grad(lambda x: jnp.sum(ours(x) * cotangent)))(jnp.asarray(x))
    np.testing.assert_allclose(jitted, want, rtol=1e-6, atol=1e-6)


def test_adaptive_max_pool_3d_ties_row_major(torch, rng):
    x = rng.integers(0, 2, size=(1, 5, 4, 3, 2)).astype(np.float32)
    cotangent = rng.normal(size=(1, 2, 3, 2, 2)).astype(np.float32)
    _, vjp = jax.vjp(lambda x: F.adaptive_max_pool(x, (2, 3, 2)), jnp.asarray(x))
    want = _torch_max_pool_grad(
        torch, x, cotangent, lambda t: torch.nn.functional.adaptive_max_pool3d(t, (2, 3, 2))
    )
    np.testing.assert_allclose(vjp(jnp.asarray(cotangent))[0], want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [None, jnp.float32, jnp.bfloat16, "float16", np.dtype("float64")])
def test_check_dtype_accepts_floating_dtypes(dtype):
    from jcnn.functional._checks import check_dtype

    assert check_dtype(dtype, "dtype") is dtype


@pytest.mark.parametrize("dtype", [jnp.int32, "uint8", bool, "foo", 3])
def test_check_dtype_refuses_other_dtypes(dtype):
    from jcnn.functional._checks import check_dtype

    with pytest.raises(TypeError, match="dtype: expected None or a floating dtype"):
        check_dtype(dtype, "dtype")


def test_seed_key_keeps_all_64_bits_of_a_seed():
    # jax.random.key keeps a seed's low 32 bits with 64-bit types off: 2**32 + 5 ran seed 5's run
    def data(seed):
        return tuple(np.asarray(jax.random.key_data(seed_key(seed))).tolist())

    for seed in (0, 5, 2**31, 2**32 - 1):
        assert data(seed) == tuple(np.asarray(jax.random.key_data(jax.random.key(seed))).tolist())
    seeds = (0, 5, 2**32 - 1, 2**32, 2**32 + 5, 2**40, -1, -(2**32) + 5, 2**63 - 1, -(2**63))
    keys = {data(seed) for seed in seeds}
    assert len(keys) == len(seeds)
    with jax.enable_x64(True):
        assert {data(seed) for seed in seeds} == keys
    for seed, error in ((2**63, ValueError), (-(2**63) - 1, ValueError), (1.0, TypeError)):
        with pytest.raises(error, match="seed: expected an int"):
            seed_key(seed)
    assert data(np.int64(2**40)) == data(2**40)


def test_window_count_counts_the_windows_pytorch_keeps(rng):
    # windows start at multiples of the stride; floor: each that ends inside the padded input;
    # ceil_mode: each that starts inside the input or the left padding and overhangs the padded
    # input's end by less than the stride (PyTorch's padding is at most half the window)
    for _ in range(1000):
        size, span, stride = (int(v) for v in rng.integers(1, 10, 3))
        lo, hi = (int(v) for v in rng.integers(0, span // 2 + 1, 2))
        padded = size + lo + hi
        for ceil_mode in (False, True):
            kept = [
                start
                for start in range(0, padded, stride)
                if (
                    start < size + lo and start + span - stride < padded
                    if ceil_mode
                    else start + span <= padded
                )
            ]
            got = window_count(size, span, stride, lo, hi, ceil_mode)
            assert got == len(kept) if kept else got < 1, (size, span, stride, lo, hi, ceil_mode)
