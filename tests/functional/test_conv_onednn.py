"""The oneDNN convolution (jcnn/functional/_conv_onednn.py) against XLA's and jcnn's XLA path."""

import itertools
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import native
from jcnn.functional import _conv_cpu, _conv_onednn
from jcnn.functional.conv import _conv_general, conv_transpose


def _reference(x, w, options):
    return _conv_cpu.native_conv(x, w, _conv_onednn.config(x, w, *options))


def _onednn(x, w, options):
    return _conv_onednn.conv_general(x, w, *options)


def _xla_path(x, w, options):
    return _conv_cpu.conv_general(x, w, *options)


def _routed(x, w, options):
    """What ``F.conv`` runs: oneDNN where it implements the problem on this CPU, else XLA."""
    return _conv_general(x, w, *options)


def _random_problem(rng, spatial_rank):
    groups = int(rng.choice([1, 1, 2, 3]))
    channels = groups * int(rng.choice([1, 2, 5, 16]))
    out_channels = groups * int(rng.choice([1, 3, 8, 24]))
    window = tuple(int(k) for k in rng.integers(1, 4, spatial_rank))
    dilation = tuple(int(d) for d in rng.integers(1, 3, spatial_rank))
    stride = tuple(int(s) for s in rng.integers(1, 4, spatial_rank))
    padding = tuple((int(lo), int(hi)) for lo, hi in rng.integers(0, 3, (spatial_rank, 2)))
    span = [(k - 1) * d + 1 for k, d in zip(window, dilation, strict=True)]
    sizes = tuple(
        int(rng.integers(max(1, s - lo - hi), s + 6))
        for s, (lo, hi) in zip(span, padding, strict=True)
    )
    batch = int(rng.integers(1, 4))
    x = rng.standard_normal((batch, *sizes, channels)).astype(np.float32)
    w = rng.standard_normal((*window, channels // groups, out_channels)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w), (stride, padding, dilation, groups)


def _relative_error(got, want):
    # in NumPy (the same float32 arithmetic): in JAX each new shape compiled four small programs
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
    return float(np.max(np.abs(got - want)) / (np.max(np.abs(want)) + 1e-30))


def _check_products(x, w, options, rng, conv=_onednn, tolerance=2e-6, context=()):
    """``conv``'s value and both gradients (for a random cotangent) against the reference's.

    Both sides in one jitted program: eagerly, every operation of a new shape compiled alone."""
    y_shape = jax.eval_shape(partial(_reference, options=options), x, w).shape
    assert jax.eval_shape(partial(conv, options=options), x, w).shape == y_shape, options
    g = jnp.asarray(rng.standard_normal(y_shape).astype(np.float32))

    @jax.jit
    def products(x, w, g):
        def value_and_vjp(f):
            y, vjp = jax.vjp(partial(f, options=options), x, w)
            return (y, *vjp(g))

        return value_and_vjp(conv), value_and_vjp(_reference)

    got, want = products(x, w, g)
    for name, a, b in zip(["y", "dx", "dw"], got, want, strict=True):
        assert _relative_error(a, b) < tolerance, (name, *context, x.shape, w.shape, options)


@pytest.mark.parametrize("spatial_rank", [1, 2, 3])
def test_values_and_gradients_match_xla(onednn, rng, spatial_rank):
    for _ in range({1: 10, 2: 16, 3: 6}[spatial_rank]):
        x, w, options = _random_problem(rng, spatial_rank)
        _check_products(x, w, options, rng)


def _tanh_loss(x, w, conv):
    return jnp.sum(jnp.tanh(conv(x, w)))


def test_agrees_with_the_xla_formulations(onednn, rng):
    # Both CPU paths of F.conv, including the XLA path's own GEMM and col2im formulations.
    for _ in range(6):
        x, w, options = _random_problem(rng, 2)

        @jax.jit  # both gradients in one program: eagerly, each operation compiled on its own
        def gradients(x, w, options=options):
            return [
                jax.grad(_tanh_loss, argnums=(0, 1))(x, w, partial(conv, options=options))
                for conv in (_onednn, _xla_path)
            ]

        got, want = gradients(x, w)
        for a, b in zip(got, want, strict=True):
            assert _relative_error(a, b) < 2e-6, options


def _float32_products(options, x, w, g):
    y, vjp = jax.vjp(partial(_reference, options=options), x, w)
    return (y, *vjp(g))


def test_bfloat16_rounds_a_float32_accumulation_once(onednn, rng):
    # Every product in bfloat16 against the float32 products of the same (bfloat16-exact) values.
    # A float32 accumulation rounded once to bfloat16 is off by at most 2^-8 relative to the sum
    # of the terms' magnitudes (the same product of |operands|): the bound checked, with slack.
    # Through F.conv's routing: oneDNN on a CPU with bfloat16 support, XLA's path elsewhere (and
    # in test_native.py's run with oneDNN capped at AVX2), both held to the same bound.
    for _ in range(4):
        x, w, options = _random_problem(rng, 2)
        x, w = (a.astype(jnp.bfloat16) for a in (x, w))
        y = jax.eval_shape(partial(_reference, options=options), x, w)
        g = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32)).astype(jnp.bfloat16)

        @jax.jit  # the three sets of products in one program: eagerly, each operation compiled
        def all_products(x, w, g, options=options):
            got, got_vjp = jax.vjp(partial(_routed, options=options), x, w)
            wide = [a.astype(jnp.float32) for a in (x, w, g)]
            exact = _float32_products(options, *wide)
            magnitude = _float32_products(options, *(jnp.abs(a) for a in wide))
            return (got, *got_vjp(g)), exact, magnitude

        products, exact, magnitude = all_products(x, w, g)
        for name, a, b, m in zip(["y", "dx", "dw"], products, exact, magnitude, strict=True):
            assert a.dtype == jnp.bfloat16, name
            excess = jnp.abs(a.astype(jnp.float32) - b) - 2**-7 * m
            assert float(jnp.max(excess)) <= 1e-6, (name, options)


def test_bfloat16_3d_weight_gradient_where_depth_padding_leaves_few_outputs(onednn, rng):
    # oneDNN's bfloat16 3-D weight gradient gave wrong values (uninitialized memory among them) on
    # these problems when run by one thread, as per-example gradients are (at least twice as many
    # problems as threads); the bound of the test above, on each example's weight gradient.
    examples = 2 * (os.cpu_count() or 1)
    for sizes, window in [((2, 2, 2), (3, 3, 3)), ((2, 1, 4), (3, 2, 2)), ((3, 6, 1), (2, 3, 3))]:
        x = jnp.asarray(rng.standard_normal((examples, 1, *sizes, 16)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((*window, 16, 16)), jnp.bfloat16)
        options = ((1, 1, 1), ((1, 1),) * 3, (1, 1, 1), 1)
        y = jax.eval_shape(partial(_reference, options=options), x[0], w)
        g = jnp.asarray(rng.standard_normal((examples, *y.shape)), jnp.bfloat16)

        @jax.jit
        def weight_grads(x, w, g, options=options):
            def per_example(conv, x, w, g):
                return jax.vmap(
                    lambda x, g: jax.vjp(partial(conv, options=options), x, w)[1](g)[1]
                )(x, g)

            wide = [a.astype(jnp.float32) for a in (x, w, g)]
            magnitude = [jnp.abs(a) for a in wide]
            return (
                per_example(_routed, x, w, g),
                per_example(_reference, *wide),
                per_example(_reference, *magnitude),
            )

        got, exact, magnitude = weight_grads(x, w, g)
        excess = jnp.abs(got.astype(jnp.float32) - exact) - 2**-7 * magnitude
        assert got.dtype == jnp.bfloat16 and float(jnp.max(excess)) <= 1e-6, (sizes, window)


def test_bfloat16_weight_gradient_of_one_output_pixel_under_a_stride(onednn, rng):
    # oneDNN's 1-D and 2-D bfloat16 weight gradient gave wrong values (uninitialized memory among
    # them, inf) where the output is 1 pixel long along a strided dimension; the bound above.
    for sizes, window, stride, padding in [
        ((2,), (3,), (3,), ((1, 0),)),
        ((2,), (5,), (4,), ((3, 1),)),
        ((2, 5), (3, 3), (3, 1), ((1, 0), (1, 0))),
    ]:
        x = jnp.asarray(rng.standard_normal((1, *sizes, 16)), jnp.bfloat16)
        w = jnp.asarray(rng.standard_normal((*window, 16, 16)), jnp.bfloat16)
        options = (stride, padding, (1,) * len(sizes), 1)
        y = jax.eval_shape(partial(_reference, options=options), x, w)
        g = jnp.asarray(rng.standard_normal(y.shape), jnp.bfloat16)
        got = jax.vjp(partial(_routed, options=options), x, w)[1](g)[1]
        wide = [a.astype(jnp.float32) for a in (x, w, g)]
        exact = _float32_products(options, *wide)[2]
        magnitude = _float32_products(options, *(jnp.abs(a) for a in wide))[2]
        excess = jnp.abs(got.astype(jnp.float32) - exact) - 2**-7 * magnitude
        assert got.dtype == jnp.bfloat16 and float(jnp.max(excess)) <= 1e-6, (sizes, stride)


def test_wide_layers_use_blocked_kernels_correctly(onednn, rng):
    # 64 channels: oneDNN reorders the kernel into its blocked layout in all three products.
    x = jnp.asarray(rng.standard_normal((3, 9, 9, 64)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 64, 64)).astype(np.float32))
    options = ((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    _check_products(x, w, options, rng)  # value and both gradients, in one jitted program


def _gradient_penalty(x, w, conv):
    dx = jax.grad(lambda x: jnp.sum(jnp.sin(conv(x, w))))(x)
    dw = jax.grad(lambda w: jnp.sum(jnp.sin(conv(x, w))))(w)
    return jnp.sum(dx**2) + jnp.sum(dw**2)


def test_second_derivatives(onednn, rng):
    penalty_grad = jax.grad(_gradient_penalty, argnums=(0, 1))
    for _ in range(3):
        x, w, options = _random_problem(rng, 2)

        @jax.jit  # both sides in one program: eagerly, each operation compiled on its own
        def both(x, w, options=options):
            return [penalty_grad(x, w, partial(f, options=options)) for f in (_onednn, _reference)]

        got, want = both(x, w)
        for a, b in zip(got, want, strict=True):
            assert _relative_error(a, b) < 1e-5, options


def test_vmap_every_batching_pattern(onednn, rng):
    x, w, options = _random_problem(rng, 2)
    xs = jnp.stack([x, 2 * x + 1, -x])
    ws = jnp.stack([w, -w, 0.5 * w])
    conv = partial(_onednn, options=options)
    reference = partial(_reference, options=options)
    for axes, args in [((0, None), (xs, w)), ((None, 0), (x, ws)), ((0, 0), (xs, ws))]:
        got = jax.vmap(conv, in_axes=axes)(*args)
        want = jnp.stack(
            [
                reference(*[a[i] if ax == 0 else a for a, ax in zip(args, axes, strict=True)])
                for i in range(3)
            ]
        )
        assert _relative_error(got, want) < 2e-6, axes
    # Nested vmap: inputs batched along the outer axis, kernels along the inner one.
    nested = jax.vmap(jax.vmap(conv, in_axes=(None, 0)), in_axes=(0, None))(xs, ws)
    for i, j in itertools.product(range(3), range(3)):
        assert _relative_error(nested[i, j], reference(xs[i], ws[j])) < 2e-6


def test_per_example_gradients_match_a_loop(onednn, rng):
    x, w, options = _random_problem(rng, 2)

    def loss(w, example, conv):
        return jnp.sum(jnp.tanh(conv(example[None], w)))

    per_example = jax.jit(jax.vmap(jax.grad(loss), in_axes=(None, 0, None)), static_argnums=2)
    got = per_example(w, x, partial(_onednn, options=options))
    for i in range(x.shape[0]):
        want = jax.grad(loss)(w, x[i], partial(_reference, options=options))
        assert _relative_error(got[i], want) < 2e-6


@pytest.mark.parametrize("spatial_rank", [1, 2, 3])
def test_many_batched_problems_match_xla(onednn, rng, spatial_rank):
    # more problems than twice the threads run one per thread (also an uneven share per thread)
    count = 4 * (os.cpu_count() or 1) + 3
    for _ in range(2):
        x, w, options = _random_problem(rng, spatial_rank)
        xs = jnp.asarray(rng.standard_normal((count, *x.shape)).astype(np.float32))
        ws = jnp.asarray(rng.standard_normal((count, *w.shape)).astype(np.float32))
        conv = partial(_onednn, options=options)
        reference = partial(_reference, options=options)
        # the same problem first with oneDNN's threads (one problem), then one per thread: each
        # needs its own primitive
        one = jax.jit(partial(_products_of_ones, jax.vmap(conv)))  # eagerly: a compile an op
        jax.block_until_ready(one(xs[:1], ws[:1]))
        y_shape = jax.eval_shape(jax.vmap(conv), xs, ws).shape
        g = jnp.asarray(rng.standard_normal(y_shape).astype(np.float32))

        @jax.jit  # both sides in one program: eagerly, each operation compiled on its own
        def products(xs, ws, g, conv=conv, reference=reference):
            def value_and_vjp(f):
                y, vjp = jax.vjp(jax.vmap(f), xs, ws)
                return y, vjp(g)

            return value_and_vjp(conv), value_and_vjp(reference)

        (y, got_grads), (want, want_grads) = products(xs, ws, g)
        grads = zip(*got_grads, *want_grads, strict=True)
        for i, (got_dx, got_dw, want_dx, want_dw) in enumerate(grads):
            assert _relative_error(y[i], want[i]) < 2e-6, (i, options)
            assert _relative_error(got_dx, want_dx) < 2e-5, (i, options)
            assert _relative_error(got_dw, want_dw) < 2e-5, (i, options)


def test_empty_batch(onednn):
    x, w = jnp.ones((0, 5, 5, 2)), jnp.ones((3, 3, 2, 4))
    options = ((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    y, vjp = jax.vjp(partial(_onednn, options=options), x, w)
    dx, dw = vjp(jnp.ones(y.shape))
    assert y.shape == (0, 5, 5, 4) and dx.shape == x.shape
    np.testing.assert_array_equal(dw, np.zeros(w.shape))


def test_bad_options_are_reported_before_the_native_call(onednn):
    with pytest.raises(ValueError, match="groups: must divide input channels 3"):
        _conv_onednn.conv_general(
            jnp.ones((1, 5, 5, 3)), jnp.ones((3, 3, 1, 4)), (1, 1), ((0, 0),) * 2, (1, 1), 2
        )
    with pytest.raises(TypeError, match="w: expected the dtype of x"):
        _conv_onednn.conv_general(
            jnp.ones((1, 5, 5, 3)),
            jnp.ones((3, 3, 3, 4), jnp.bfloat16),
            (1, 1),
            ((0, 0),) * 2,
            (1, 1),
            1,
        )


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float64])
def test_other_dtypes_are_refused_at_trace_time_naming_the_dtype(onednn, dtype):
    # The native side takes float32 and bfloat16 only; it used to fail when the call ran, with
    # an XLA runtime error, though unsupported_reason had said yes.
    options = ((1, 1), ((1, 1), (1, 1)), (1, 1), 1)
    dtype_name = jnp.dtype(dtype).name
    with jax.enable_x64(True):
        x, w = jnp.ones((1, 5, 5, 3), dtype), jnp.ones((3, 3, 3, 4), dtype)
        reason = _conv_onednn.unsupported_reason(x, w, *options)
        assert reason is not None and dtype_name in reason
        with pytest.raises(ValueError, match=f"float32 or bfloat16, not {dtype_name}"):
            jax.eval_shape(partial(_onednn, options=options), x, w)
        with pytest.raises(ValueError, match=f"float32 or bfloat16, not {dtype_name}"):
            _conv_onednn.conv_transpose(x, w, *options, (5, 5))


def test_float32_problems_are_supported_in_every_product(onednn, rng):
    # oneDNN's reference implementations cover every float32 problem on any x86-64 CPU.
    for spatial_rank in (1, 2, 3):
        x, w, options = _random_problem(rng, spatial_rank)
        assert _conv_onednn.unsupported_reason(x, w, *options) is None


def test_unsupported_problems_are_refused_and_routed_to_xla(onednn, monkeypatch, rng):
    # What a CPU without bfloat16 kernels looks like to the backend: oneDNN says no.
    monkeypatch.setattr(native, "unsupported_reason", lambda *args: "no implementation")
    x, w, options = _random_problem(rng, 2)
    x, w = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    # the first product asked: the forward, or the weight gradient with one channel per group
    with pytest.raises(
        ValueError, match="oneDNN has no bfloat16 .* on this CPU .no implementation"
    ):
        _onednn(x, w, options)
    lowered = jax.jit(partial(_routed, options=options)).lower(x, w).as_text()
    assert "jcnn_conv_" not in lowered
    g = jnp.ones(_reference(x, w, options).shape, jnp.bfloat16)
    got, got_vjp = jax.vjp(partial(_routed, options=options), x, w)
    want, want_vjp = jax.vjp(partial(_xla_path, options=options), x, w)
    for a, b in zip((got, *got_vjp(g)), (want, *want_vjp(g)), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_symbolic_batch_exports_on_the_xla_path(onednn, rng):
    """jax.export with a symbolic batch: oneDNN needs concrete sizes, so F.conv and
    F.conv_transpose route to the XLA path instead of failing to read the batch as an int."""
    x = jnp.asarray(rng.standard_normal((2, 7, 6, 3)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 5)), jnp.float32)
    options = ((2, 1), ((1, 0), (1, 1)), (1, 2), 1)
    (batch,) = jax.export.symbolic_shape("b")
    symbolic_x = jax.ShapeDtypeStruct((batch, *x.shape[1:]), x.dtype)
    reason = _conv_onednn.unsupported_reason(symbolic_x, w, *options)
    assert reason is not None and "symbolic" in reason

    def loss(x, w):
        y = _routed(x, w, options)
        return jnp.sum(jnp.tanh(conv_transpose(y, jnp.swapaxes(w, -1, -2), stride=2)))

    function = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    exported = jax.export.export(function)(symbolic_x, w)
    got, want = exported.call(x, w), function(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert _relative_error(a, b) < 1e-5


def test_zero_size_kernels_are_refused_by_both_backends(onednn):
    x = jnp.ones((1, 5, 5, 2))
    for w_shape in [(0, 3, 2, 4), (3, 0, 2, 4), (3, 3, 2, 0)]:
        for path in (_onednn, _xla_path):
            with pytest.raises(ValueError, match=r"w: expected a kernel with at least one element"):
                path(x, jnp.ones(w_shape), ((1, 1), ((0, 0), (0, 0)), (1, 1), 1))


def _random_grouped_problem(rng, spatial_rank):
    """A grouped convolution that is not depthwise, with channels per group on and off oneDNN's
    channel blocks (8 on AVX2, 16 on AVX-512)."""
    x, w, (stride, padding, dilation, _) = _random_problem(rng, spatial_rank)
    groups = int(rng.choice([2, 3, 4, 8]))
    per_group_in = int(rng.choice([3, 8, 12, 16]))
    per_group_out = int(rng.choice([5, 8, 16]))
    x = rng.standard_normal((*x.shape[:-1], groups * per_group_in)).astype(np.float32)
    w = rng.standard_normal((*w.shape[:-2], per_group_in, groups * per_group_out))
    return jnp.asarray(x), jnp.asarray(w.astype(np.float32)), (stride, padding, dilation, groups)


def _implementations(x, w, options):
    dims = _conv_onednn._problem(x.shape, w.shape, _conv_onednn.config(x, w, *options))
    return [native.implementation(op, False, dims, x.ndim - 2) for op in range(3)]


def _dense_problem(rng, spatial_rank):
    x, w, options = _random_problem(rng, spatial_rank)
    w = rng.standard_normal((*w.shape[:-2], x.shape[-1], w.shape[-1])).astype(np.float32)
    return x, jnp.asarray(w), (*options[:3], 1)


def _kernel_isa(kinds):
    """The instruction set oneDNN's kernels use, read from their names: ``"avx512"`` (any AVX-512
    or AVX10 level), ``"avx2"`` (plain AVX2, where the layout rule was measured), else ``None``."""
    isas = set(re.findall(r"avx\w*", " ".join(kinds)))
    if any(isa.startswith(("avx512", "avx10")) for isa in isas):
        return "avx512"
    return "avx2" if isas == {"avx2"} else None


def _grouped_products_blocked() -> bool:
    """Whether grouped products take oneDNN's blocked layout in this process (the rule in
    ``onednn_conv.cc``): as ``JCNN_ONEDNN_GROUPED_LAYOUT`` says, else on AMD CPUs."""
    choice = os.environ.get("JCNN_ONEDNN_GROUPED_LAYOUT")
    if choice is not None:
        return choice == "blocked"
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.is_file() and "AuthenticAMD" in cpuinfo.read_text()


def _four_groups_of_16(rng, spatial_rank):
    """A grouped convolution whose forward and input gradient run in oneDNN's blocked layout on
    AVX2 CPUs, and whose weight gradient does with AVX-512, where grouped products take it.

    Maps 9 wide, 5 in 3-D: XLA's grouped 3-D weight gradient (the reference) took seconds on
    9x9x9, and oneDNN picks the same kernels and layouts on 5x5x5."""
    size = 5 if spatial_rank == 3 else 9
    return (
        jnp.asarray(rng.standard_normal((2, *(size,) * spatial_rank, 64)).astype(np.float32)),
        jnp.asarray(rng.standard_normal((*(3,) * spatial_rank, 16, 64)).astype(np.float32)),
        ((1,) * spatial_rank, ((1, 1),) * spatial_rank, (1,) * spatial_rank, 4),
    )


@pytest.mark.parametrize("spatial_rank", [1, 2, 3])
def test_products_in_onednns_own_layout_match_xla(onednn, rng, spatial_rank):
    # Grouped convolutions (on AMD CPUs, or as JCNN_ONEDNN_GROUPED_LAYOUT says: on AVX2 all three
    # products, with AVX-512 the weight gradient) and, on AVX2, 1-D weight gradients may run with
    # their activations reordered into oneDNN's blocked layout (and the results reordered back):
    # values and both gradients, alone and vmapped over more problems than threads (one primitive
    # and one set of reorder buffers per thread).
    blocked = _four_groups_of_16(rng, spatial_rank)
    problems = [blocked] + [_random_grouped_problem(rng, spatial_rank) for _ in range(4)]
    if spatial_rank == 1:
        problems += [_dense_problem(rng, 1) for _ in range(4)]
    reordered_fwd_dx, reordered_dense = [], []
    for x, w, options in problems:
        kinds = _implementations(x, w, options)
        reordered_fwd_dx += [kind for kind in kinds[:2] if "reordered" in kind]
        if options[3] == 1:
            reordered_dense += [kind for kind in kinds if "reordered" in kind]
        assert not any("reordered" in kind and "gemm" in kind for kind in kinds), kinds
        _check_products(x, w, options, rng, context=(kinds,))

    x, w, options = blocked
    count = 2 * (os.cpu_count() or 1) + 1
    xs = jnp.stack([x * (i + 1) for i in range(count)])
    y_shape = jax.eval_shape(partial(_reference, options=options), x, w).shape
    g = jnp.asarray(rng.standard_normal(y_shape).astype(np.float32))

    @jax.jit  # both sides in one program: eagerly, each operation compiled on its own
    def products(x, xs, w, g):
        ys, vjp = jax.vjp(jax.vmap(partial(_onednn, options=options), in_axes=(0, None)), xs, w)
        want, want_vjp = jax.vjp(partial(_reference, options=options), x, w)
        return ys, vjp(jnp.stack([g] * count)), want, want_vjp(g)

    ys, (dxs, dw), want, (want_dx, want_dw) = products(x, xs, w, g)
    for i in range(count):
        assert _relative_error(ys[i], want * (i + 1)) < 2e-6, i
        assert _relative_error(dxs[i], want_dx) < 2e-6, i
    assert _relative_error(dw, want_dw * count * (count + 1) / 2) < 2e-5

    kinds = _implementations(*blocked)
    isa = _kernel_isa(kinds)
    grouped_blocked = _grouped_products_blocked()
    if isa == "avx512":
        assert not reordered_fwd_dx and not reordered_dense, (reordered_fwd_dx, reordered_dense)
        assert ("activations reordered" in kinds[2]) == grouped_blocked, kinds
    elif isa == "avx2":
        reordered = ["activations reordered" in kind for kind in kinds[:2]]
        assert reordered == [grouped_blocked] * 2, kinds
    else:
        pytest.skip(f"no rule for oneDNN's kernels {kinds} on this CPU")


def test_only_grouped_products_and_1d_weight_gradients_reorder_their_activations(onednn, rng):
    # Dense 2-D and 3-D products and depthwise ones keep channels-last activations: oneDNN's
    # blocked layout cost or gained them nothing measurable, and depthwise kernels are
    # channels-last. Dense 1-D products reorder only for the weight gradient.
    for spatial_rank in (1, 2, 3):
        dense, depthwise = (
            _dense_problem(rng, spatial_rank),
            _random_depthwise_problem(rng, spatial_rank),
        )
        for problem in (dense, depthwise):
            kinds = _implementations(*problem)
            may_reorder = [False, False, spatial_rank == 1 and problem[2][3] == 1]
            for kind, allowed in zip(kinds, may_reorder, strict=True):
                assert allowed or "reordered" not in kind, (kinds, problem[2])


def _wide_layer(rng, sizes, channels, out_channels, window, stride=1, groups=1):
    """A small batch of ``sizes`` images with ``channels``, a ``window`` kernel with padding 1."""
    rank = len(sizes)
    x = rng.standard_normal((2, *sizes, channels)).astype(np.float32)
    w = rng.standard_normal((*window, channels // groups, out_channels)).astype(np.float32)
    options = ((stride,) * rank, ((1, 1),) * rank, (1,) * rank, groups)
    return jnp.asarray(x), jnp.asarray(w / np.sqrt(w[..., 0].size)), options


def test_wide_layers_on_small_images_reorder_their_activations_with_avx512(onednn, rng):
    # With AVX-512, the forward product and the input gradient of a dense layer with >= 256
    # channels in and out, a window larger than 1x1 and an output 2 to 5 pixels wide run in
    # oneDNN's blocked layout; the weight gradient and every neighbour of that region keep
    # channels-last activations (on AVX2 all of them do). Values and both gradients match XLA's
    # either way, alone and per example (a kernel per problem: one primitive per thread), to the
    # rounding of sums of up to 6,912 products.
    blocked = [
        _wide_layer(rng, (3, 3), 256, 256, (3, 3)),
        _wide_layer(rng, (5, 2), 320, 256, (3, 2)),
        _wide_layer(rng, (9, 9), 256, 272, (3, 3), stride=2),  # 5 wide after the stride
        _wide_layer(rng, (3, 4, 3), 256, 256, (3, 3, 3)),
    ]
    channels_last = [
        _wide_layer(rng, (3, 3), 255, 256, (3, 3)),  # too few input channels
        _wide_layer(rng, (3, 3), 256, 128, (3, 3)),  # too few output channels
        _wide_layer(rng, (3, 1), 256, 256, (3, 3)),  # 1 pixel wide
        _wide_layer(rng, (2, 6), 256, 256, (3, 3)),  # 6 pixels wide
        _wide_layer(rng, (3, 3), 256, 256, (1, 1)),  # 1x1 window
        _wide_layer(rng, (4,), 256, 256, (3,)),  # 1-D
        _wide_layer(rng, (3, 3), 256, 256, (3, 3), groups=2),  # grouped: its own rule
    ]
    kinds_of = {}
    for index, (x, w, options) in enumerate(blocked + channels_last):
        kinds_of[index] = kinds = _implementations(x, w, options)
        _check_products(x, w, options, rng, tolerance=1e-5, context=(kinds,))

    x, w, options = blocked[0]
    count = 2 * (os.cpu_count() or 1) + 1
    ws = jnp.stack([w * (i + 1) for i in range(count)])
    xs = jnp.stack([x * (count - i) for i in range(count)])
    conv = jax.vmap(partial(_onednn, options=options))
    ys, vjp = jax.vjp(conv, xs, ws)
    want, want_vjp = jax.vjp(partial(_reference, options=options), x, w)
    g = jnp.asarray(rng.standard_normal(want.shape).astype(np.float32))
    dxs, dws = vjp(jnp.stack([g] * count))
    want_dx, want_dw = want_vjp(g)
    for i in range(count):
        scale_x, scale_w = count - i, i + 1
        assert _relative_error(ys[i], want * scale_x * scale_w) < 1e-5, i
        assert _relative_error(dxs[i], want_dx * scale_w) < 1e-5, i
        assert _relative_error(dws[i], want_dw * scale_x) < 1e-5, i

    isa = _kernel_isa(kinds_of[0])
    if isa is None:
        pytest.skip(f"no rule for oneDNN's kernels {kinds_of[0]} on this CPU")
    one_d, grouped = len(blocked) + 5, len(blocked) + 6
    for index, kinds in kinds_of.items():
        if index == grouped:
            blocked_grouped = _grouped_products_blocked()
            expected = [isa == "avx2" and blocked_grouped] * 2 + [blocked_grouped]
        elif index == one_d:
            expected = [False, False, isa == "avx2"]  # AVX2's rule for 1-D weight gradients
        else:
            expected = [isa == "avx512" and index < len(blocked)] * 2 + [False]
        got = ["activations reordered" in kind for kind in kinds]
        assert got == expected, (index, kinds)


def _weight_grad_calls(x, w, options, per_example=False):
    """oneDNN weight gradient calls in the compiled weight gradient of a loss, per example or
    not, and that gradient."""

    def loss(x, w):
        return jnp.sum(jnp.tanh(_onednn(x, w, options)))

    grad = jax.grad(loss, argnums=1)
    if per_example:
        grad = jax.vmap(lambda x, w: jax.grad(loss, argnums=1)(x[None], w), in_axes=(0, None))
    lowered = jax.jit(grad).lower(x, w)
    return lowered.as_text().count("jcnn_conv_backward_weights"), lowered.compile()(x, w)


def test_small_outputs_of_wide_layers_take_xlas_weight_gradient(onednn, rng):
    # One dense weight gradient over outputs at most 2 pixels along every dimension, with a window
    # larger than 1x1 and >= 256 channels in and out, runs as XLA's convolution; per example, and
    # outside that region, it stays on oneDNN. Values, forward-over-reverse second derivatives and
    # per-example gradients match the reference either way.
    on_xla = [
        _wide_layer(rng, (2, 2), 256, 256, (3, 3)),
        _wide_layer(rng, (1, 2), 256, 320, (3, 3)),
        _wide_layer(rng, (3, 3), 256, 256, (3, 3), stride=2),  # 2x2 after the stride
        _wide_layer(rng, (2, 2, 1), 256, 256, (3, 3, 3)),
        _wide_layer(rng, (2,), 256, 256, (3,)),
    ]
    on_onednn = [
        _wide_layer(rng, (2, 2), 128, 256, (3, 3)),  # too few input channels
        _wide_layer(rng, (2, 2), 256, 255, (3, 3)),  # too few output channels
        _wide_layer(rng, (3, 2), 256, 256, (3, 3)),  # 3 pixels high
        _wide_layer(rng, (2, 2), 256, 256, (1, 1)),  # 1x1 window
        _wide_layer(rng, (2, 2), 256, 256, (3, 3), groups=2),  # grouped
    ]

    def reference_loss(x, w, options):
        return jnp.sum(jnp.tanh(_reference(x, w, options)))

    # jitted: eagerly, each operation of each new shape compiled alone
    reference_grad = jax.jit(jax.grad(reference_loss, argnums=1), static_argnums=2)
    for index, (x, w, options) in enumerate(on_xla + on_onednn):
        calls, got = _weight_grad_calls(x, w, options)
        assert calls == (index >= len(on_xla)), (index, x.shape, w.shape, options)
        want = reference_grad(x, w, options)
        assert _relative_error(got, want) < 1e-5, (index, x.shape, w.shape, options)

    x, w, options = on_xla[0]
    calls, got = _weight_grad_calls(x, w, options, per_example=True)
    assert calls == 1
    for i in range(x.shape[0]):
        want = reference_grad(x[i : i + 1], w, options)
        assert _relative_error(got[i], want) < 1e-5, i
    tangents = (jnp.ones_like(x), jnp.asarray(rng.standard_normal(w.shape).astype(np.float32)))

    @jax.jit  # both sides in one program
    def second_derivatives(x, w, tangents):
        got = jax.jvp(
            jax.grad(lambda x, w: jnp.sum(jnp.tanh(_onednn(x, w, options))), 1), (x, w), tangents
        )
        want = jax.jvp(jax.grad(partial(reference_loss, options=options), 1), (x, w), tangents)
        return got, want

    got, want = second_derivatives(x, w, tangents)
    for a, b in zip(got, want, strict=True):
        assert _relative_error(a, b) < 1e-5


def _random_single_channel_problem(rng, spatial_rank):
    """A random convolution of a one-channel input (groups 1), every option drawn."""
    while True:
        x, w, (stride, padding, dilation, _) = _random_problem(rng, spatial_rank)
        x = x[..., :1]
        w = w[..., :1, :]
        if np.prod(w.shape[:-2]) > 1 or rng.random() < 0.2:  # mostly windows larger than 1
            return x, w, (stride, padding, dilation, 1)


@pytest.mark.parametrize(
    "spatial_rank, kernel_name, forward_on_onednn",
    [
        (2, "jit:avx512_core", True),
        (3, "brgconv:avx2", True),
        (1, "x64:gemm:jit", True),  # oneDNN's 1-D GEMM measured faster than XLA as well
        (2, "x64:gemm:jit", False),  # its GEMM fallback for large padded windows (AVX2)
        (3, "x64:gemm:jit", False),
    ],
)
def test_single_input_channel_forward_leaves_onednn_only_for_its_gemm_on_2d_and_3d_windows(
    onednn, rng, monkeypatch, spatial_rank, kernel_name, forward_on_onednn
):
    # The kernel oneDNN picks depends on the CPU: stand in for it, so the rule is what is tested.
    # The input gradient stays on XLA and the weight gradient on oneDNN whatever the kernel; per
    # example, the forward product is oneDNN's.
    monkeypatch.setattr(native, "implementation", lambda *problem: kernel_name)
    x, w, options = _random_single_channel_problem(rng, spatial_rank)
    routed = partial(_routed, options=options)
    program = jax.jit(jax.grad(partial(_tanh_loss, conv=routed), argnums=(0, 1))).lower(x, w)
    text = program.as_text()
    assert text.count("jcnn_conv_forward") == int(forward_on_onednn), (x.shape, w.shape, options)
    assert text.count("jcnn_conv_backward_data") == 0
    assert text.count("jcnn_conv_backward_weights") == 1
    _check_products(x, w, options, rng, conv=_routed, context=(kernel_name,))

    kernels = w[None] * jnp.arange(1.0, x.shape[0] + 1).reshape(-1, *(1,) * w.ndim)
    per_example = jax.jit(jax.vmap(lambda x, w: routed(x[None], w)[0]))
    assert per_example.lower(x, kernels).as_text().count("jcnn_conv_forward") == 1
    want = jnp.stack([_reference(x[i : i + 1], kernels[i], options)[0] for i in range(len(x))])
    assert _relative_error(per_example(x, kernels), want) < 2e-6


@pytest.mark.parametrize("spatial_rank", [1, 2, 3])
def test_single_input_channel_problems_match_xla_on_this_cpus_kernels(onednn, rng, spatial_rank):
    for _ in range(3):
        x, w, options = _random_single_channel_problem(rng, spatial_rank)
        _check_products(x, w, options, rng, conv=_routed)
        half = tuple(a.astype(jnp.bfloat16) for a in (x, w))
        if _conv_onednn.unsupported_reason(*half, *options) is None:
            got, want = jax.jit(  # one program: eagerly, each operation compiled alone
                lambda x, w, options=options: (
                    _routed(x, w, options).astype(jnp.float32),
                    _reference(x.astype(jnp.float32), w.astype(jnp.float32), options),
                )
            )(*half)
            assert _relative_error(got, want) < 1e-2, (x.shape, w.shape, options)


def _random_depthwise_problem(rng, spatial_rank):
    channels = int(rng.choice([2, 3, 16, 19]))
    multiplier = int(rng.choice([1, 1, 2, 3]))
    window = tuple(int(k) for k in rng.integers(1, 8, spatial_rank))
    dilation = tuple(int(d) for d in rng.integers(1, 3, spatial_rank))
    stride = tuple(int(s) for s in rng.integers(1, 3, spatial_rank))
    padding = tuple((int(rng.integers(0, k)), int(rng.integers(0, k))) for k in window)
    span = [(k - 1) * d + 1 for k, d in zip(window, dilation, strict=True)]
    sizes = tuple(
        int(rng.integers(max(1, s - lo - hi), s + 6))
        for s, (lo, hi) in zip(span, padding, strict=True)
    )
    x = rng.standard_normal((int(rng.integers(1, 4)), *sizes, channels)).astype(np.float32)
    w = rng.standard_normal((*window, 1, channels * multiplier)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w), (stride, padding, dilation, channels)


@pytest.mark.parametrize("spatial_rank", [1, 2, 3])
def test_depthwise_runs_every_product_natively_and_matches_xla(onednn, rng, spatial_rank):
    for _ in range({1: 5, 2: 8, 3: 3}[spatial_rank]):
        x, w, options = _random_depthwise_problem(rng, spatial_rank)
        assert _conv_onednn.unsupported_reason(x, w, *options) is None
        loss = partial(_tanh_loss, conv=partial(_routed, options=options))
        lowered = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, w).as_text()
        y = jax.eval_shape(partial(_reference, options=options), x, w)
        static = _conv_onednn.config(x, w, *options)
        one_per_group = w.shape[-1] == x.shape[-1]
        on_xla = _conv_onednn._depthwise_weight_grad_on_xla(x, y, static, w.shape)
        assert lowered.count("jcnn_conv_forward") == 1, options
        assert lowered.count("jcnn_conv_backward_data") == 1, options
        assert lowered.count("jcnn_depthwise_weight_grad") == int(one_per_group), options
        assert lowered.count("jcnn_conv_backward_weights") == int(
            not one_per_group and not on_xla
        ), options
        _check_products(x, w, options, rng, conv=_routed)


def _weight_grad(x, w, dy, conv):
    return jax.vjp(lambda w: conv(x, w), w)[1](dy)[0]


def _depthwise_weight_grad_float64(x, dy, window, stride, padding, dilation):
    """sum over n and output pixels o of x[n, o * stride + k * dilation - pad_lo] * dy[n, o], per
    tap k and channel, in float64 NumPy (and the same sum of absolute values)."""
    x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
    pads = [(0, 0), *padding, (0, 0)]
    x = np.pad(x, pads)
    out_sizes = dy.shape[1:-1]
    sums = np.zeros((*window, 1, x.shape[-1]))
    magnitudes = np.zeros_like(sums)
    for tap in itertools.product(*(range(k) for k in window)):
        index = tuple(
            slice(t * d, t * d + (o - 1) * s + 1, s)
            for t, d, o, s in zip(tap, dilation, out_sizes, stride, strict=True)
        )
        taken = x[(slice(None), *index)]
        sums[(*tap, 0)] = np.sum(taken * dy, axis=tuple(range(dy.ndim - 1)))
        magnitudes[(*tap, 0)] = np.sum(np.abs(taken * dy), axis=tuple(range(dy.ndim - 1)))
    return sums, magnitudes


@pytest.mark.parametrize("spatial_rank", [1, 2, 3])
def test_depthwise_weight_gradient_kernel_matches_a_float64_sum(onednn, rng, spatial_rank):
    # jcnn/native/depthwise_weight_grad.cc: sixteen-channel blocks and single remaining channels,
    # windows up to 9 wide (7 is the widest held in registers; 3x3 has its own loop), strides,
    # dilations, uneven padding, and batches split over tasks.
    for _ in range({1: 6, 2: 10, 3: 4}[spatial_rank]):
        channels = int(rng.choice([2, 5, 16, 17, 33, 48]))
        window = tuple(int(k) for k in rng.choice([1, 2, 3, 3, 5, 7, 9], spatial_rank))
        stride = tuple(int(s) for s in rng.integers(1, 4, spatial_rank))
        dilation = tuple(int(d) for d in rng.integers(1, 3, spatial_rank))
        padding = tuple((int(rng.integers(0, k + 1)), int(rng.integers(0, k + 1))) for k in window)
        span = [(k - 1) * d + 1 for k, d in zip(window, dilation, strict=True)]
        sizes = tuple(
            int(rng.integers(max(1, s - lo - hi), s + (12 if spatial_rank < 3 else 4)))
            for s, (lo, hi) in zip(span, padding, strict=True)
        )
        batch = int(rng.integers(1, 10))
        x = jnp.asarray(rng.standard_normal((batch, *sizes, channels)).astype(np.float32))
        w = jnp.zeros((*window, 1, channels), jnp.float32)
        options = (stride, padding, dilation, channels)
        weight_grad = partial(_weight_grad, x, conv=partial(_routed, options=options))
        y = _reference(x, w, options)
        dy = jnp.asarray(rng.standard_normal(y.shape).astype(np.float32))
        lowered = jax.jit(weight_grad).lower(w, dy).as_text()
        assert lowered.count("jcnn_depthwise_weight_grad") == 1
        got = weight_grad(w, dy)
        want, magnitudes = _depthwise_weight_grad_float64(x, dy, window, stride, padding, dilation)
        error = np.abs(np.asarray(got, np.float64) - want)
        assert np.all(error <= 2e-6 * magnitudes + 1e-30), (x.shape, window, options)


def test_depthwise_weight_gradient_kernel_under_vmap_and_with_an_empty_batch(onednn, rng):
    x = jnp.asarray(rng.standard_normal((4, 3, 7, 9, 18)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 1, 18)).astype(np.float32))
    options = ((1, 2), ((1, 1), (2, 0)), (2, 1), 18)
    dy = jnp.asarray(
        rng.standard_normal((4, *_reference(x[0], w, options).shape)).astype(np.float32)
    )

    def weight_grad(x, dy, conv):
        return _weight_grad(x, w, dy, conv)

    routed, reference = partial(_routed, options=options), partial(_reference, options=options)
    # Leading axes on both operands, on one only (the other broadcast), and two of them.
    for axes, args in (
        ((0, 0), (x, dy)),
        ((None, 0), (x[0], dy)),
        ((0, None), (x, dy[0])),
    ):
        got = jax.jit(jax.vmap(partial(weight_grad, conv=routed), axes))(*args)
        want = jnp.stack(
            [
                weight_grad(
                    *(a if i is None else a[k] for a, i in zip(args, axes, strict=True)), reference
                )
                for k in range(4)
            ]
        )
        assert _relative_error(got, want) < 2e-6, axes
    nested = jax.jit(jax.vmap(jax.vmap(partial(weight_grad, conv=routed))))
    got = nested(x.reshape(2, 2, *x.shape[1:]), dy.reshape(2, 2, *dy.shape[1:]))
    want = jnp.stack([weight_grad(x[k], dy[k], reference) for k in range(4)])
    assert _relative_error(got.reshape(want.shape), want) < 2e-6
    empty = jax.jit(partial(weight_grad, conv=routed))(x[0, :0], dy[0, :0])
    assert empty.shape == w.shape and not np.any(np.asarray(empty))


@pytest.mark.parametrize(
    "sizes, window, kernel_name, on_xla",
    [
        ((2, 2), (7, 7), "jit:avx512_core", True),  # the window spans twice the map
        ((1, 3), (3, 7), "jit:avx512_core", True),
        ((4, 4), (7, 7), "jit:avx512_core", False),
        ((8, 8), (3, 3), "jit_dw:avx2", False),
        ((8, 8), (3, 3), "x64:gemm:jit", True),  # oneDNN's GEMM fallback (AVX2, small maps)
    ],
)
def test_depthwise_weight_gradient_routes_to_xla_where_it_measured_faster(
    onednn, rng, monkeypatch, sizes, window, kernel_name, on_xla
):
    # The kernel oneDNN picks depends on the CPU: stand in for it, so the rule is what is tested.
    monkeypatch.setattr(native, "implementation", lambda *problem: kernel_name)
    channels = 8
    x = jnp.asarray(rng.standard_normal((3, *sizes, channels)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((*window, 1, 2 * channels)).astype(np.float32))
    options = ((1, 1), tuple((k // 2, k // 2) for k in window), (1, 1), channels)
    loss = partial(_tanh_loss, conv=partial(_routed, options=options))
    lowered = jax.jit(jax.grad(loss, argnums=1)).lower(x, w).as_text()
    assert lowered.count("jcnn_conv_backward_weights") == (0 if on_xla else 1)
    assert lowered.count("jcnn_conv_forward") == 1
    got = jax.jit(jax.grad(loss, argnums=1))(x, w)
    want = jax.grad(partial(_tanh_loss, conv=partial(_reference, options=options)), argnums=1)(x, w)
    assert _relative_error(got, want) < 2e-6
    # bfloat16 stays on oneDNN (where this CPU has its kernels): the per-offset sums would round
    # at every term.
    half = tuple(a.astype(jnp.bfloat16) for a in (x, w))
    if _conv_onednn.unsupported_reason(*half, *options) is None:
        lowered = jax.jit(jax.grad(loss, argnums=1)).lower(*half).as_text()
        assert lowered.count("jcnn_conv_backward_weights") == 1


def _check_second_order_and_per_example(x, w, options):
    """The routed convolution's gradient-penalty derivatives and per-example weight gradients
    equal the reference's."""
    penalty_grad = jax.grad(_gradient_penalty, argnums=(0, 1))

    def loss(w, example, conv):
        return jnp.sum(jnp.tanh(conv(example[None], w)))

    per_example = jax.vmap(jax.grad(loss), in_axes=(None, 0, None))

    @jax.jit  # both sides of both checks in one program: eagerly, each operation compiled alone
    def both(x, w):
        return [
            (penalty_grad(x, w, conv), per_example(w, x, conv))
            for conv in (partial(_routed, options=options), partial(_reference, options=options))
        ]

    (got, got_per_example), (want, want_per_example) = both(x, w)
    for a, b in zip(got, want, strict=True):
        assert _relative_error(a, b) < 1e-5
    assert _relative_error(got_per_example, want_per_example) < 2e-6


def test_depthwise_second_derivatives_and_per_example_gradients(onednn, rng):
    x = jnp.asarray(rng.standard_normal((3, 11, 9, 6)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((5, 3, 1, 12)).astype(np.float32))
    options = ((2, 1), ((2, 1), (0, 2)), (1, 2), 6)
    _check_second_order_and_per_example(x, w, options)


def _pretend_3d_weight_gradients_are_gemm(monkeypatch):
    """Stand in for an AVX2 CPU, where oneDNN's 3-D weight gradient is a GEMM and the 2-D one a
    direct kernel, so the rule is what is tested on any CPU."""
    kernels = {3: "x64:gemm:jit", 2: "brgconv:avx2", 1: "brgconv:avx2"}
    monkeypatch.setattr(native, "implementation", lambda op, bf16, dims, rank: kernels[rank])


def test_3d_weight_gradient_with_a_depth_stride_runs_per_depth_tap(onednn, rng, monkeypatch):
    _pretend_3d_weight_gradients_are_gemm(monkeypatch)
    checked = 0
    while checked < 8:
        x, w, (stride, padding, dilation, groups) = _random_problem(rng, 3)
        stride = (int(rng.integers(2, 4)), *stride[1:])
        options = (stride, padding, dilation, groups)
        try:
            y_shape = jax.eval_shape(partial(_reference, options=options), x, w).shape
        except (TypeError, ValueError):
            continue  # an output size below 1
        checked += 1
        # taps that read some depth of x: the others are zeros, with no call
        (pad, _), depth, out_depth = padding[0], x.shape[1], y_shape[1]
        reading = sum(
            any(0 <= o * stride[0] + t * dilation[0] - pad < depth for o in range(out_depth))
            for t in range(w.shape[0])
        )
        loss = partial(_tanh_loss, conv=partial(_routed, options=options))
        lowered = jax.jit(jax.grad(loss, argnums=1)).lower(x, w).as_text()
        assert lowered.count("jcnn_conv_backward_weights") == reading
        reference = partial(_tanh_loss, conv=partial(_reference, options=options))
        both = jax.jit(  # one program: eagerly, each operation of the reference compiled alone
            lambda x, w, loss=loss, reference=reference: [
                jax.grad(f, argnums=(0, 1))(x, w) for f in (loss, reference)
            ]
        )
        got, want = both(x, w)
        for a, b in zip(got, want, strict=True):
            assert _relative_error(a, b) < 2e-6
    # a depth stride of 1, or a direct 3-D kernel: one 3-D weight gradient
    x = jnp.asarray(rng.standard_normal((2, 5, 4, 4, 3)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((3, 3, 3, 3, 4)).astype(np.float32))
    for stride, kernels in [((1, 2, 2), "gemm"), ((2, 1, 1), "direct")]:
        if kernels == "direct":
            monkeypatch.setattr(native, "implementation", lambda *problem: "jit:avx512_core")
        options = (stride, ((1, 1),) * 3, (1, 1, 1), 1)
        loss = partial(_tanh_loss, conv=partial(_routed, options=options))
        lowered = jax.jit(jax.grad(loss, argnums=1)).lower(x, w).as_text()
        assert lowered.count("jcnn_conv_backward_weights") == 1


def test_3d_weight_gradient_per_depth_tap_keeps_every_derivative(onednn, rng, monkeypatch):
    _pretend_3d_weight_gradients_are_gemm(monkeypatch)
    x = jnp.asarray(rng.standard_normal((3, 7, 5, 4, 4)).astype(np.float32))
    w = jnp.asarray(rng.standard_normal((3, 2, 3, 2, 6)).astype(np.float32))
    options = ((2, 1, 2), ((2, 0), (1, 1), (0, 1)), (2, 1, 1), 2)
    _check_second_order_and_per_example(x, w, options)
    # the transposed 3-D convolution's kernel gradient is such a weight gradient too
    xt = jnp.asarray(rng.standard_normal((2, 4, 3, 3, 6)).astype(np.float32))
    wt = jnp.asarray(rng.standard_normal((3, 3, 3, 6, 4)).astype(np.float32))
    transposed = partial(conv_transpose, stride=2, padding=1, output_padding=1)
    # jitted, a fresh function per backend: the scope is read when tracing
    got = jax.jit(jax.grad(lambda w: jnp.sum(jnp.tanh(transposed(xt, w)))))(wt)
    with native.conv_backend_scope("xla"):
        want = jax.jit(jax.grad(lambda w: jnp.sum(jnp.tanh(transposed(xt, w)))))(wt)
    assert _relative_error(got, want) < 2e-6


def _random_transposed_problem(rng, spatial_rank):
    groups = int(rng.choice([1, 2, 3]))
    window = tuple(int(k) for k in rng.integers(1, 5, spatial_rank))
    stride = tuple(int(s) for s in rng.integers(1, 4, spatial_rank))
    dilation = tuple(int(d) for d in rng.integers(1, 3, spatial_rank))
    padding = tuple(int(rng.integers(0, k)) for k in window)
    output_padding = tuple(int(rng.integers(0, s)) for s in stride)
    sizes = tuple(int(rng.integers(1, 6)) + 1 for _ in window)
    x = rng.standard_normal((int(rng.integers(1, 3)), *sizes, groups * int(rng.integers(1, 4))))
    w = rng.standard_normal((*window, x.shape[-1], int(rng.integers(1, 4))))
    options = dict(
        stride=stride,
        padding=padding,
        output_padding=output_padding,
        dilation=dilation,
        groups=groups,
    )
    return jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), options


@pytest.mark.parametrize("spatial_rank", [1, 2, 3])
def test_conv_transpose_is_onednns_input_gradient_and_matches_xla(onednn, rng, spatial_rank):
    # Second derivatives and both backends against PyTorch: test_conv.py's transposed cases.
    for _ in range({1: 3, 2: 4, 3: 2}[spatial_rank]):
        x, w, options = _random_transposed_problem(rng, spatial_rank)
        transpose = partial(conv_transpose, **options)
        try:
            y_shape = jax.eval_shape(transpose, x, w).shape
        except ValueError:  # the padding cropped the whole output
            continue
        g = jnp.asarray(rng.standard_normal(y_shape).astype(np.float32))
        results = {}
        for backend in ("onednn", "xla"):
            with native.conv_backend_scope(backend):
                # A fresh function per backend: the scope is read when tracing, jit's cache
                # does not know it.
                products = jax.jit(lambda x, w, g: _products(transpose, x, w, g))  # noqa: B023
                results[backend] = products(x, w, g)
                lowered = products.lower(x, w, g).as_text()
            if backend == "onednn":
                # One custom call per product (a depthwise weight gradient may run as XLA's
                # per-offset sums, see the test above), and no zero-interleaved input (a lax.pad).
                assert lowered.count("jcnn_conv_forward") == 1, options
                assert lowered.count("jcnn_conv_backward_data") == 1, options
                assert lowered.count("jcnn_conv_backward_weights") <= 1, options
                interleaved = re.search(r"stablehlo\.pad[^\n]*interior = \[[^\]]*[1-9]", lowered)
                assert interleaved is None, options
        for name, a, b in zip(["y", "dx", "dw"], *results.values(), strict=True):
            assert _relative_error(a, b) < 2e-6, (name, x.shape, w.shape, options)


def _products(conv, x, w, g):
    y, vjp = jax.vjp(conv, x, w)
    return (y, *vjp(g))


def _products_of_ones(conv, x, w):
    y, vjp = jax.vjp(conv, x, w)
    return (y, *vjp(jnp.ones(y.shape, y.dtype)))


def test_conv_transpose_output_padding_beyond_the_stride_keeps_the_interleaved_path(onednn):
    x, w = jnp.ones((1, 5, 2)), jnp.ones((3, 2, 4))
    # output_padding 1 reaches stride 1 (allowed below dilation 2): no convolution has this input
    assert _conv_onednn.transposed_problem(x, w, (1,), ((0, 0),), (2,), 1, (10,)) is None
    with pytest.raises(ValueError, match="out_sizes: .* routes such output paddings to XLA"):
        _conv_onednn.conv_transpose(x, w, (1,), ((0, 0),), (2,), 1, (10,))


_HUGE_INPUT = """
import jax, jax.numpy as jnp
from jcnn import functional as F
from jcnn.functional import _conv_onednn
x = jax.ShapeDtypeStruct((1, 2**32, 1, 1), jnp.float32)
w = jax.ShapeDtypeStruct((1, 1, 1, 4), jnp.float32)
print(_conv_onednn.unsupported_reason(x, w, (1, 1), ((0, 0), (0, 0)), (1, 1), 1))
print(jax.eval_shape(F.conv, x, w).shape)
"""


def test_tensors_of_2_31_elements_or_more_stay_off_onednn(onednn):
    """oneDNN's primitive creation divided by zero on a (1, 2**32, 1, 1) input: the process was
    killed by SIGFPE while tracing (``analysis.summary`` of a huge input shape too); such
    problems go to the XLA path (in a child process: the crash would end the test run)."""
    child = subprocess.run(
        [sys.executable, "-c", _HUGE_INPUT],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).parents[2],
    )
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    reason, shape = child.stdout.splitlines()
    assert reason == "jcnn keeps tensors of 2147483648 elements or more off oneDNN"
    assert shape == str((1, 2**32, 1, 4))
