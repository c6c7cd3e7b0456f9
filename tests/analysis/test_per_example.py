"""Tests of jcnn.analysis.per_example against a Python loop over examples and torch.func."""

import math
from functools import partial

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from jcnn import functional as F
from jcnn import nn
from jcnn.analysis import (
    clip_per_example,
    dp_aggregate,
    dp_sgd,
    per_example_grad_norms,
    per_example_grads,
)
from jcnn.analysis.per_example import _add_gaussian_noise

_MODEL = nn.Sequential(
    [nn.Conv(3, 3, padding=1), nn.ReLU(), nn.MaxPool(2), nn.Flatten(), nn.Dense(4)]
)


def _loss(params, batch):
    images, labels = batch
    return F.cross_entropy(_MODEL.apply({"params": params}, images), labels)


@pytest.fixture
def problem(rng):
    images = jnp.asarray(rng.normal(size=(5, 6, 6, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, size=5), jnp.int32)
    params = _MODEL.init(jax.random.key(0), images)["params"]
    return params, (images, labels)


# One jitted gradient for the module: compiled once for all the tests (per shape and dtype).
_GRAD = jax.jit(jax.grad(_loss))


def _loop(params, batch):
    """Reference: one jax.grad per example, stacked."""
    images, labels = batch
    grads = [_GRAD(params, (images[i : i + 1], labels[i : i + 1])) for i in range(len(labels))]
    return jax.tree.map(lambda *g: np.stack(g), *grads)


def _assert_trees_close(a, b, tol=1e-5):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=tol, atol=tol), a, b)


def test_per_example_grads_match_loop_and_chunks(problem):
    params, batch = problem
    expected = _loop(params, batch)
    got = jax.jit(lambda p, b: per_example_grads(_loss, p, b))(params, batch)
    _assert_trees_close(got, expected)
    chunked = jax.jit(lambda p, b: per_example_grads(_loss, p, b, chunk_size=2))(params, batch)
    # 5 examples in chunks of 2: the last chunk is partial.
    _assert_trees_close(chunked, expected)
    # A mean loss: the batch gradient is the mean of the per-example ones.
    full = _GRAD(params, batch)
    _assert_trees_close(jax.tree.map(lambda g: g.mean(0), got), full)


def test_per_example_grad_norms_match_loop(problem):
    params, batch = problem
    grads = _loop(params, batch)
    expected = np.sqrt(
        sum((leaf.reshape(leaf.shape[0], -1) ** 2).sum(1) for leaf in jax.tree.leaves(grads))
    )
    # jitted: eagerly, one small program per operation
    norms = jax.jit(lambda p, b: per_example_grad_norms(_loss, p, b))(params, batch)
    np.testing.assert_allclose(norms, expected, rtol=1e-5)
    assert len(set(np.round(expected, 4))) == len(expected)  # distinct examples, distinct norms


def test_norms_of_an_empty_batch_and_of_parameters_without_leaves(problem):
    params, (images, labels) = problem
    empty = (images[:0], labels[:0])
    assert per_example_grad_norms(_loss, params, empty).shape == (0,)
    assert (
        jax.tree.leaves(clip_per_example(per_example_grads(_loss, params, empty), 1.0))[0].shape[0]
        == 0
    )
    with pytest.raises(ValueError, match="per_example: expected at least one example"):
        dp_aggregate(1.0, 1.0).update(per_example_grads(_loss, params, empty), None)
    # no parameter at all (an empty subtree): every example's gradient is zero, one norm each
    norms = per_example_grad_norms(lambda p, b: jnp.mean(b[0]), {"head": {}}, (images, labels))
    np.testing.assert_array_equal(norms, np.zeros(5, np.float32))


def test_dp_aggregate_clips_each_example_then_averages(problem):
    params, batch = problem
    grads = _loop(params, batch)
    norms = np.sqrt(sum((g.reshape(5, -1) ** 2).sum(1) for g in jax.tree.leaves(grads)))
    clip = float(np.median(norms))  # some examples are clipped, some are not
    factors = np.minimum(1.0, clip / norms)
    expected = jax.tree.map(lambda g: sum(g[i] * factors[i] for i in range(5)) / 5, grads)
    tx = dp_aggregate(clip, noise_multiplier=0.0)
    per_example = per_example_grads(_loss, params, batch)
    got, _ = tx.update(per_example, tx.init(params))
    _assert_trees_close(got, expected)
    clipped_norms = np.sqrt(
        sum(
            (np.asarray(g).reshape(5, -1) ** 2).sum(1)
            for g in jax.tree.leaves(clip_per_example(per_example, clip))
        )
    )
    np.testing.assert_allclose(clipped_norms, np.minimum(norms, clip), rtol=1e-5)


def test_clipped_gradients_have_norm_at_most_the_clip_norm_in_float32_and_float64(rng):
    """Scaling by C / ||g|| rounds: the clipped norm was one unit above C for about half of the
    clipped examples (14,080 of 30,720 measured in float64, 3,986 in float32); the factor keeps
    two units of margin, and the clipped gradient still equals min(1, C / ||g||) g to 6e-7."""
    per_example = {
        "kernel": jnp.asarray(rng.normal(size=(512, 37)) * 3, jnp.float32),
        "bias": jnp.asarray(rng.normal(size=(512, 5, 3)), jnp.float32),
    }
    for clip in (0.1, 0.7, 1.0, 3.3):
        clipped = clip_per_example(per_example, clip)
        squares = [np.asarray(g, np.float64).reshape(512, -1) ** 2 for g in clipped.values()]
        assert (np.sqrt(sum(s.sum(1) for s in squares)) <= clip).all()
        norms32 = jnp.sqrt(sum(jnp.sum(g.reshape(512, -1) ** 2, 1) for g in clipped.values()))
        assert (np.asarray(norms32) <= np.float32(clip)).all()
        norms = np.sqrt(
            sum(
                (np.asarray(g, np.float64).reshape(512, -1) ** 2).sum(1)
                for g in per_example.values()
            )
        )
        factors = np.minimum(1.0, clip / norms)
        for name, g in clipped.items():
            want = np.asarray(per_example[name], np.float64) * factors.reshape(
                -1, 1, *(1,) * (g.ndim - 2)
            )
            np.testing.assert_allclose(g, want, rtol=6e-7, atol=0)


def test_float64_norms_and_clipping_keep_float64_precision(rng):
    """With float64 gradients (jax_enable_x64) the norms, the clip factors and the clipped mean
    are float64, equal to a float64 loop far below float32 rounding."""
    with jax.enable_x64(True):
        images = jnp.asarray(rng.normal(size=(3, 6, 6, 2)))
        labels = jnp.asarray(rng.integers(0, 4, size=3), jnp.int32)
        params = jax.tree.map(  # only the initializer's shapes: not run
            lambda leaf: jnp.asarray(rng.normal(size=leaf.shape)),
            jax.eval_shape(_MODEL.init, jax.random.key(0), images)["params"],
        )
        grads = _loop(params, (images, labels))
        norms = np.sqrt(sum((g.reshape(3, -1) ** 2).sum(1) for g in jax.tree.leaves(grads)))
        # jitted: eagerly every operation compiled its own float64 program
        got = jax.jit(per_example_grad_norms, static_argnums=0)(_loss, params, (images, labels))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, norms, rtol=1e-12)
        clip = float(np.median(norms))
        factors = np.minimum(1.0, clip / norms)
        expected = jax.tree.map(lambda g: np.tensordot(factors, g, axes=1) / 3, grads)
        tx = dp_aggregate(clip, noise_multiplier=0.0)
        per_example = jax.jit(per_example_grads, static_argnums=0)(_loss, params, (images, labels))
        mean, _ = tx.update(per_example, tx.init(params))
        _assert_trees_close(mean, expected, tol=1e-12)


def _zero_gradient_problem():
    """A least-squares fit whose first example is fitted exactly: its gradient is zero, its
    Hessian is not."""
    x = jnp.array([[1.0, 0.0], [1.0, 1.0], [0.5, 0.5]])
    y = jnp.array([2.0, 0.0, 0.0])

    def loss(w, batch):
        return jnp.mean((batch[0] @ w - batch[1]) ** 2)

    return loss, jnp.array([2.0, 1.0]), (x, y)


def test_an_example_with_a_zero_gradient_gives_no_nan_in_derivatives_of_norms_and_clipping():
    # sqrt(0)'s derivative is inf: 0 * inf put NaN into every derivative of the clipped sum
    loss, w, batch = _zero_gradient_problem()
    assert per_example_grad_norms(loss, w, batch)[0] == 0

    def clipped_sum(w):  # no example is clipped at C = 100: the sum of the gradients
        return jnp.sum(clip_per_example(per_example_grads(loss, w, batch), 100.0), axis=0)

    def unclipped_sum(w):
        return jax.grad(
            lambda w: sum(loss(w, (x[None], y[None])) for x, y in zip(*batch, strict=True))
        )(w)

    np.testing.assert_allclose(jax.jacobian(clipped_sum)(w), jax.jacobian(unclipped_sum)(w))
    got = jax.grad(lambda w: jnp.sum(per_example_grad_norms(loss, w, batch)))(w)
    assert np.isfinite(got).all()


def test_an_example_whose_gradient_has_a_nan_has_a_nan_norm_not_zero():
    # the zero-gradient root took NaN > 0 as False and reported such an example's norm as 0
    loss, w, (x, y) = _zero_gradient_problem()
    batch = (x.at[1, 0].set(jnp.nan), y)
    norms = per_example_grad_norms(loss, w, batch)
    assert norms[0] == 0 and np.isnan(norms[1])
    grads = per_example_grads(loss, w, batch)
    assert np.isnan(clip_per_example(grads, 1.0)[1]).all()


def test_dp_noise_has_the_stated_scale_and_is_reproducible():
    clip, sigma, size = 0.5, 2.0, 8
    zeros = {"w": jnp.zeros((size, 20_000))}
    tx = dp_aggregate(clip, sigma, seed=3)
    state = tx.init(None)
    first, state = tx.update(zeros, state)
    second, _ = tx.update(zeros, state)
    expected_std = sigma * clip / size
    for noise in (first["w"], second["w"]):
        assert abs(float(noise.std()) / expected_std - 1) < 0.03
        assert abs(float(noise.mean())) < 4 * expected_std / np.sqrt(20_000)
    assert not np.allclose(first["w"], second["w"])  # fresh noise at each step
    again, _ = dp_aggregate(clip, sigma, seed=3).update(zeros, tx.init(None))
    np.testing.assert_array_equal(again["w"], first["w"])


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_dp_noise_is_independent_across_leaves_of_any_shape_and_dtype(impl):
    clip, sigma, size = 1.0, 1.0, 4
    # "g" and "h" are drawn leaf by leaf; the others share one stream of blocks of 2**16 values,
    # which "s1".."s3" (40,000 values each) span
    shapes = {"a": (50, 40), "b": (50, 40), "c": (7, 3, 5), "d": (), "e": (0, 3)}
    shapes.update({"g": (300, 500), "h": (300, 500), "s1": (200, 200), "s2": (40_000,)})
    shapes["s3"] = (100, 400)
    zeros = {name: jnp.zeros((size, *shape)) for name, shape in shapes.items()}
    zeros["f"] = jnp.zeros((size, 3000), jnp.bfloat16)
    tx = dp_aggregate(clip, sigma, seed=0)
    state = tx.init(None)._replace(key=jax.random.key(0, impl=impl))
    noise, _ = tx.update(zeros, state)
    for name, leaf in noise.items():
        assert leaf.shape == zeros[name].shape[1:] and leaf.dtype == zeros[name].dtype, name
    unit = {name: np.ravel(np.asarray(leaf, np.float64)) * size for name, leaf in noise.items()}
    for first, second in [("a", "b"), ("g", "h"), ("s1", "s2"), ("s2", "s3"), ("a", "g")]:
        n = min(unit[first].size, unit[second].size)
        assert abs(np.corrcoef(unit[first][:n], unit[second][:n])[0, 1]) < 0.08, (first, second)
    block, small = 1 << 16, ("a", "b", "c", "d", "e", "f", "s1", "s2", "s3")  # flattening order
    stream = np.concatenate([unit[name] for name in small])
    second = stream[block:]
    assert abs(np.corrcoef(stream[: second.size], second)[0, 1]) < 0.02
    for name in ("g", "s2"):
        assert scipy.stats.kstest(unit[name], "norm").pvalue > 1e-4, name
        assert abs(np.std(unit[name]) - 1) < 0.02 and abs(np.mean(unit[name])) < 0.02
    assert abs(np.std(unit["f"]) - 1) < 0.1
    assert np.all(np.isfinite(stream)) and np.abs(stream).max() < 7


def test_a_python_int_clip_bound_past_int32_is_a_number():
    # 2**63, a finite bound: "An overflow was encountered while parsing an argument to a jitted
    # computation" from inside JAX; as a float it clips nothing, as any bound above the norms
    per_example = {"a": jnp.array([[3.0, 4.0], [0.3, 0.4]])}
    for bound in (2**40, 2**63):
        clipped = clip_per_example(per_example, bound)
        np.testing.assert_array_equal(clipped["a"], per_example["a"])
    assert clip_per_example(per_example, 1)["a"][0].tolist() == pytest.approx([0.6, 0.8])
    tx = dp_aggregate(2**63, 0.0)
    mean, _ = tx.update(per_example, tx.init({"a": jnp.ones(2)}))
    np.testing.assert_allclose(mean["a"], [1.65, 2.2], rtol=1e-6)


def test_dp_sgd_checks_its_sgd_arguments():
    # Optax took these: None or NaN as a rate (NaN updates), momentum 2 (diverging), nesterov=1 or
    # "yes" read by truth, nesterov without a momentum ignored; a string failed inside its update
    with pytest.raises(TypeError, match="learning_rate: expected a finite number >= 0"):
        dp_sgd("0.1", 1.0, 1.0)
    with pytest.raises(TypeError, match="learning_rate: expected a finite number >= 0"):
        dp_sgd(None, 1.0, 1.0)
    with pytest.raises(ValueError, match="learning_rate: expected a finite number >= 0, got nan"):
        dp_sgd(math.nan, 1.0, 1.0)
    with pytest.raises(TypeError, match=r"momentum: expected a number in \[0, 1\), got '0.9'"):
        dp_sgd(0.1, 1.0, 1.0, momentum="0.9")
    with pytest.raises(ValueError, match=r"momentum: expected a number in \[0, 1\), got 2.0"):
        dp_sgd(0.1, 1.0, 1.0, momentum=2.0)
    for bad in (1, "yes"):
        with pytest.raises(TypeError, match=f"nesterov: expected a Python bool, got {bad!r}"):
            dp_sgd(0.1, 1.0, 1.0, momentum=0.9, nesterov=bad)
    with pytest.raises(ValueError, match="nesterov: Nesterov momentum needs a momentum"):
        dp_sgd(0.1, 1.0, 1.0, nesterov=True)
    assert dp_sgd(optax.constant_schedule(0.1), 1.0, 1.0, momentum=0.9, nesterov=True) is not None


def test_dp_noise_under_vmap_is_each_keys_own_noise():
    keys = jax.random.split(jax.random.key(3), 3)
    tree = {"large": jnp.zeros((300, 250)), "small": jnp.zeros((7,))}
    batched = jax.jit(jax.vmap(lambda key: _add_gaussian_noise(key, tree, 1.0)))(keys)
    for i, key in enumerate(keys):
        alone = _add_gaussian_noise(key, tree, 1.0)
        for name in tree:
            np.testing.assert_array_equal(batched[name][i], alone[name])
    assert not np.allclose(batched["large"][0], batched["large"][1])


def test_dp_sgd_step_is_sgd_on_the_private_gradient(problem):
    params, batch = problem
    per_example = per_example_grads(_loss, params, batch)
    tx = dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=1.0, seed=7)
    updates, _ = tx.update(per_example, tx.init(params), params)
    private, _ = dp_aggregate(1.0, 1.0, seed=7).update(per_example, tx.init(params)[0])
    _assert_trees_close(updates, jax.tree.map(lambda g: -0.1 * g, private))
    new_params = optax.apply_updates(params, updates)
    assert jax.tree.structure(new_params) == jax.tree.structure(params)


def test_input_checks(problem):
    params, (images, labels) = problem
    with pytest.raises(ValueError, match="batch: leaves disagree on the batch size"):
        per_example_grads(_loss, params, (images, labels[:3]))
    with pytest.raises(ValueError, match="chunk_size: expected a positive int or None, got 0"):
        per_example_grads(_loss, params, (images, labels), chunk_size=0)
    numpy_chunks, python_chunks = jax.jit(  # one program, not two run eagerly
        lambda p, b: [per_example_grads(_loss, p, b, chunk_size=c) for c in (np.int64(2), 2)]
    )(params, (images, labels))
    jax.tree.map(np.testing.assert_array_equal, numpy_chunks, python_chunks)  # an int all the same
    for clip in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(
            ValueError, match=f"l2_norm_clip: expected a finite number > 0, got {clip}"
        ):
            dp_aggregate(clip, 1.0)
    for noise in (-1.0, math.inf, math.nan):
        with pytest.raises(
            ValueError, match=f"noise_multiplier: expected a finite number >= 0, got {noise}"
        ):
            dp_sgd(0.1, 1.0, noise)
    # not real numbers, though 0-d: True would clip to norm 1, a complex bound compared by its
    # real part, a string array failed inside NumPy's comparison
    for bad in (np.bool_(True), np.array(True), np.complex64(1.0), np.array("1.0")):
        with pytest.raises(ValueError, match="l2_norm_clip: expected a finite number > 0"):
            clip_per_example(python_chunks, bad)
        with pytest.raises(ValueError, match="noise_multiplier: expected a finite number >= 0"):
            dp_aggregate(1.0, bad)
    assert dp_aggregate(np.float32(1.0), np.array(0.5)) is not None  # real 0-d values are fine
    for seed in (1.5, "0", True, None):
        with pytest.raises(TypeError, match=f"seed: expected an int, got {seed!r}"):
            dp_sgd(0.1, 1.0, 1.0, seed=seed)
    assert dp_aggregate(1.0, 1.0, seed=np.int64(3)).init(params).key.shape == ()
    # past 64 bits: OverflowError inside jax.random.key at init; 2**32 + 3 drew seed 3's noise
    with pytest.raises(ValueError, match=r"seed: expected an int in \[-2\*\*63, 2\*\*63 - 1\]"):
        dp_aggregate(1.0, 1.0, seed=2**64)
    keys = [dp_aggregate(1.0, 1.0, seed=seed).init(params).key for seed in (3, 2**32 + 3)]
    assert not np.array_equal(*(jax.random.key_data(key) for key in keys))


def test_integer_or_complex_parameter_leaves_are_named(problem):
    # jax.grad failed on an integer leaf with its own message, naming neither params nor the leaf
    params, batch = problem
    for bad, dtype in ((jnp.int32(3), "int32"), (jnp.ones(2, jnp.complex64), "complex64")):
        with_bad = {**params, "extra": bad}
        for fn in (per_example_grads, per_example_grad_norms):
            with pytest.raises(
                TypeError, match=rf"params: expected real .* got {dtype} at \['extra'\]"
            ):
                fn(_loss, with_bad, batch)


def test_integer_or_complex_per_example_gradients_are_refused_by_clipping():
    # an int32 leaf was scaled by the clip factor cast to int32: all zeros, silently
    state = dp_aggregate(1.0, 0.0).init(None)
    for bad, dtype in (
        (jnp.ones((2, 3), jnp.int32), "int32"),
        (jnp.ones((2, 3), jnp.complex64), "complex64"),
    ):
        with pytest.raises(
            TypeError, match=rf"per_example: expected real .* got {dtype} at \['k'\]"
        ):
            clip_per_example({"k": bad}, 1.0)
        with pytest.raises(TypeError, match=rf"per_example: expected real .* got {dtype}"):
            dp_aggregate(1.0, 0.0).update({"k": bad}, state)


def _random_outer_product(rng):
    """Random ``dot_general`` operands whose contracted dims have size 1, axes in random order."""
    num_batch, lhs_free, rhs_free = rng.integers(0, 3), rng.integers(0, 3), rng.integers(1, 3)
    num_contract = rng.integers(0, 3)
    batch_sizes = rng.integers(1, 5, num_batch).tolist()

    def operand(num_free):
        """An array with the batch, size-1 contracted and free axes shuffled."""
        kinds = ["b"] * num_batch + ["c"] * num_contract + ["f"] * num_free
        order = rng.permutation(len(kinds))  # order[axis]: which kind sits at `axis`
        shape, batch_dims, contract_dims = [], [None] * num_batch, [None] * num_contract
        for axis, kind_index in enumerate(order):
            kind = kinds[kind_index]
            if kind == "b":
                batch_dims[kind_index] = axis
                shape.append(batch_sizes[kind_index])
            elif kind == "c":
                contract_dims[kind_index - num_batch] = axis
                shape.append(1)
            else:
                shape.append(int(rng.integers(1, 6)))
        return rng.normal(size=shape).astype(np.float32), tuple(contract_dims), tuple(batch_dims)

    lhs, lhs_contract, lhs_batch = operand(lhs_free)
    rhs, rhs_contract, rhs_batch = operand(rhs_free)
    return lhs, rhs, ((lhs_contract, rhs_contract), (lhs_batch, rhs_batch))


def test_outer_product_equals_transposed_dot_general(rng):
    from jcnn.analysis.per_example import _is_outer_product, _outer_product

    for _ in range(12):
        lhs, rhs, dimension_numbers = _random_outer_product(rng)
        dot = partial(jax.lax.dot_general, dimension_numbers=dimension_numbers)
        closed = jax.make_jaxpr(dot)(lhs, rhs)
        (eqn,) = closed.jaxpr.eqns
        assert _is_outer_product(eqn)
        expected = dot(lhs, rhs)
        permutation = tuple(rng.permutation(expected.ndim).tolist())
        got = _outer_product(eqn, jnp.asarray(lhs), jnp.asarray(rhs), permutation)
        np.testing.assert_array_equal(got, jnp.transpose(expected, permutation))


def _all_eqns(jaxpr):
    """The equations of ``jaxpr`` and of the jaxprs nested in it, recursively."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple) else (value,):
                if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):
                    yield from _all_eqns(sub.jaxpr)


def _dense_loss(params, batch):
    x, labels = batch
    hidden = jax.jit(lambda x, w: jax.nn.relu(x @ w))(x, params["w1"])  # a nested jit
    logits = jnp.einsum("nh,hk->nk", hidden, params["w2"]) + params["b2"][None]
    return F.cross_entropy(logits, labels)


def test_dense_weight_gradients_are_written_once_in_final_order(rng):
    """No transpose of a per-example kernel gradient is left for XLA: each (B, in, out)
    gradient comes from one broadcast multiply, and the values equal a loop of jax.grad."""
    params = {
        "w1": jnp.asarray(rng.normal(size=(7, 9)), jnp.float32),
        "w2": jnp.asarray(rng.normal(size=(9, 5)), jnp.float32),
        "b2": jnp.asarray(rng.normal(size=5), jnp.float32),
    }
    batch = (
        jnp.asarray(rng.normal(size=(6, 7)), jnp.float32),
        jnp.asarray(rng.integers(0, 5, 6), jnp.int32),
    )
    jaxpr = jax.make_jaxpr(lambda p, b: per_example_grads(_dense_loss, p, b))(params, batch)
    made = {(eqn.primitive.name, eqn.outvars[0].aval.shape) for eqn in _all_eqns(jaxpr.jaxpr)}
    for kernel_grad in ((6, 7, 9), (6, 9, 5)):
        assert ("mul", kernel_grad) in made
        assert ("transpose", kernel_grad) not in made
    grad = jax.jit(jax.grad(_dense_loss))
    expected = [grad(params, (batch[0][i : i + 1], batch[1][i : i + 1])) for i in range(6)]
    expected = jax.tree.map(lambda *g: np.stack(g), *expected)
    chunk_sizes = (None, 4, 6)
    all_got = jax.jit(  # one program, not three run eagerly
        lambda p, b: [per_example_grads(_dense_loss, p, b, chunk_size=c) for c in chunk_sizes]
    )(params, batch)
    for got in all_got:
        _assert_trees_close(got, expected)


def test_per_example_grads_match_torch_func(torch, rng):
    """The conv + max-pool + dense network of ``_MODEL`` against ``torch.func.vmap(grad)``, on an
    odd batch with random weights (not the initializer's) so that no gradient is trivially 0."""
    images = jnp.asarray(rng.normal(size=(7, 6, 6, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, size=7), jnp.int32)
    params = jax.tree.map(  # only the initializer's shapes: not run
        lambda leaf: jnp.asarray(rng.normal(size=leaf.shape), jnp.float32),
        jax.eval_shape(_MODEL.init, jax.random.key(0), images)["params"],
    )
    got = jax.jit(lambda p, b: per_example_grads(_loss, p, b))(params, (images, labels))

    functional = torch.nn.functional

    def torch_loss(p, image, label):
        x = functional.conv2d(image[None], p["conv_w"], p["conv_b"], padding=1)
        x = functional.max_pool2d(functional.relu(x), 2)
        x = x.permute(0, 2, 3, 1).reshape(1, -1)  # channels-last flatten, as nn.Flatten
        return functional.cross_entropy(
            functional.linear(x, p["dense_w"], p["dense_b"]), label[None]
        )

    conv, dense = params["layers_0"], params["layers_4"]
    torch_params = {
        "conv_w": torch.from_numpy(np.asarray(conv["kernel"]).transpose(3, 2, 0, 1).copy()),
        "conv_b": torch.from_numpy(np.array(conv["bias"])),
        "dense_w": torch.from_numpy(np.asarray(dense["kernel"]).T.copy()),
        "dense_b": torch.from_numpy(np.array(dense["bias"])),
    }
    expected = torch.func.vmap(torch.func.grad(torch_loss), in_dims=(None, 0, 0))(
        torch_params,
        torch.from_numpy(np.asarray(images).transpose(0, 3, 1, 2).copy()),
        torch.from_numpy(np.asarray(labels, np.int64)),
    )
    expected = {
        "layers_0": {
            "kernel": expected["conv_w"].numpy().transpose(0, 3, 4, 2, 1),
            "bias": expected["conv_b"].numpy(),
        },
        "layers_4": {
            "kernel": expected["dense_w"].numpy().transpose(0, 2, 1),
            "bias": expected["dense_b"].numpy(),
        },
    }
    _assert_trees_close(got, expected, tol=1e-4)
    assert all(np.abs(leaf).min(axis=0).max() > 0 for leaf in jax.tree.leaves(expected))


def test_flax_nnx_batch_norm_in_training_mode_raises_and_its_ways_out_work(rng):
    # NNX has no method interception: an nnx.BatchNorm in training mode used to pass silently,
    # each example normalized by its own statistics (the dense layer before it got zero gradients)
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, axis_name=None):
            rngs = nnx.Rngs(0)
            self.dense = nnx.Linear(4, 5, rngs=rngs)
            self.bn = nnx.BatchNorm(5, axis_name=axis_name, rngs=rngs)
            self.out = nnx.Linear(5, 3, rngs=rngs)

        def __call__(self, x):
            return self.out(self.bn(self.dense(x)))

    x = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
    y = jnp.arange(6) % 3

    def problem(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(p, batch):
            return F.cross_entropy(nnx.merge(graphdef, p, rest, copy=True)(batch[0]), batch[1])

        return loss, params

    loss, params = problem(Net())
    for fn in (per_example_grads, per_example_grad_norms):
        with pytest.raises(ValueError, match=f"{fn.__name__}: the model computes BatchNorm"):
            fn(loss, params, (x, y))
    with pytest.raises(ValueError, match="axis_name: flax.nnx.BatchNorm.*'b'.*unbound"):
        per_example_grads(*problem(Net(axis_name="b")), (x, y))
    # shared statistics: the mean of the per-example gradients is the batch gradient
    loss, params = problem(Net(axis_name="b"))
    shared = per_example_grads(loss, params, (x, y), axis_name="b")
    batch_grad = jax.grad(problem(Net())[0])(params, (x, y))
    for got, want in zip(jax.tree.leaves(shared), jax.tree.leaves(batch_grad), strict=True):
        np.testing.assert_allclose(got.mean(axis=0), want, rtol=1e-5, atol=1e-6)
    # frozen statistics: each example's gradient is its own
    frozen = Net()
    frozen.eval()
    loss, params = problem(frozen)
    per_example = per_example_grads(loss, params, (x, y))
    expected = jax.grad(loss)(params, (x[2:3], y[2:3]))
    for got, want in zip(jax.tree.leaves(per_example), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got[2], want, rtol=1e-5, atol=1e-6)


def test_a_subclass_of_flax_batch_norm_in_training_mode_raises(rng):
    # the guard looked for type(module) is linen.BatchNorm: a subclass passed silently, each
    # example normalized by its own statistics; one whose __call__ takes `train` was misread
    class Plain(linen.BatchNorm):
        pass

    class WithTrain(linen.BatchNorm):
        def __call__(self, x, train):
            return super().__call__(x, use_running_average=not train)

    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    y = jnp.arange(4) % 2

    def problem(norm, *call):
        class Net(linen.Module):
            @linen.compact
            def __call__(self, x):
                return linen.Dense(2)(norm()(linen.Dense(3)(x), *call))

        net = Net()
        variables = net.init(jax.random.key(0), x)

        def loss(params, batch):
            logits, _ = net.apply(
                {**variables, "params": params}, batch[0], mutable=["batch_stats"]
            )
            return F.cross_entropy(logits, batch[1])

        return loss, variables["params"]

    for loss, params in (
        problem(lambda: Plain(use_running_average=False)),
        problem(WithTrain, True),
    ):
        with pytest.raises(ValueError, match="per_example_grads: the model computes BatchNorm"):
            per_example_grads(loss, params, (x, y))
    for loss, params in (
        problem(lambda: Plain(use_running_average=True)),
        problem(WithTrain, False),
    ):
        per_example = per_example_grads(loss, params, (x, y))
        expected = jax.grad(loss)(params, (x[1:2], y[1:2]))
        for got, want in zip(jax.tree.leaves(per_example), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(got[1], want, rtol=1e-5, atol=1e-6)


def test_dp_noise_and_a_loader_given_one_seed_draw_no_key_alike():
    # both default to seed 0: the first noise key was split(seed_key(0))[0], which is
    # fold_in(root, 0), the loader's root of every epoch's order
    def bits(key):
        return tuple(np.asarray(jax.random.key_data(key)).ravel().tolist())

    tx = dp_aggregate(1.0, 1.0, seed=0)
    state = tx.init(None)
    noise = set()
    for _ in range(5):
        key, next_key = jax.random.split(state.key)  # the key each update draws with
        noise |= {bits(state.key), bits(key)}
        _, state = tx.update({"w": jnp.ones((2, 3))}, state)
        assert bits(state.key) == bits(next_key)
    root = jax.random.key(0)
    loader = {bits(jax.random.fold_in(root, tag)) for tag in range(4)}
    loader |= {
        bits(jax.random.fold_in(jax.random.fold_in(root, t), e)) for t in range(4) for e in range(6)
    }
    assert not noise & loader


def test_a_closed_over_dropout_key_gives_every_example_the_same_mask_keys_in_the_batch_do_not():
    # the docstring's advice: under vmap a key the loss closes over draws one mask for all
    x = jnp.ones((6, 32))

    def loss(w, images, key):  # the images of one example: a batch of 1
        return jnp.sum(F.dropout(key, images * w[None], 0.5))

    shared = per_example_grads(lambda w, b: loss(w, b, jax.random.key(0)), jnp.ones(32), x)
    assert (shared == shared[:1]).all() and 0 < int((shared[0] == 0).sum()) < 32
    keys = jax.random.split(jax.random.key(0), 6)
    own = per_example_grads(lambda w, b: loss(w, b[0], b[1][0]), jnp.ones(32), (x, keys))
    assert len({tuple(np.asarray(g).tolist()) for g in own}) == 6


def _half_grads(dtype, rng):
    return {
        "a": jnp.asarray(3 * rng.standard_normal((512, 30)), dtype),
        "b": jnp.asarray(rng.standard_normal((512, 4, 5)), dtype),
    }


def _row_norms(tree):
    leaves = [np.asarray(leaf, np.float64).reshape(len(leaf), -1) for leaf in jax.tree.leaves(tree)]
    return np.sqrt(sum((leaf**2).sum(axis=1) for leaf in leaves))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_clip_per_example_in_half_precision_keeps_every_norm_at_most_c(dtype, rng):
    # the factor was rounded to the half type before scaling, and the scaled values rounded to
    # it: half the clipped norms came out above C, up to 0.46% (0.16% with the factor in float32)
    grads = _half_grads(dtype, rng)
    before = _row_norms(grads)
    bound = float(np.median(before))  # half the examples clipped
    clipped = clip_per_example(grads, bound)
    assert all(leaf.dtype == dtype for leaf in jax.tree.leaves(clipped))
    after = _row_norms(clipped)
    assert (after <= bound).all()
    lowered_by = float(jnp.finfo(dtype).eps) + 1e-6  # the margin: a unit of the half type
    assert (after[before > bound] >= bound * (1 - 2 * lowered_by)).all()
    kept = before < bound * (1 - lowered_by)
    assert kept.any() and np.array_equal(after[kept], before[kept])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_dp_aggregate_in_half_precision_is_the_float32_mean_rounded_once(dtype, rng):
    # the clipped gradients were summed, noised and divided by B each rounded to the half type:
    # half of the entries were up to 12 ulps from the float32 mean rounded
    grads = _half_grads(dtype, rng)
    aggregate = dp_aggregate(1.0, 0.5, seed=3)
    mean, _ = aggregate.update(grads, aggregate.init(None))
    wide = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    want, _ = aggregate.update(wide, aggregate.init(None))
    for half, wide in zip(jax.tree.leaves(mean), jax.tree.leaves(want), strict=True):
        assert half.dtype == dtype
        np.testing.assert_array_equal(
            np.asarray(half, np.float32), np.asarray(wide.astype(dtype), np.float32)
        )
