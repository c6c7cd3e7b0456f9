"""Lookahead on the parameters (jcnn/train/lookahead.py) against a NumPy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcnn.train.lookahead import lookahead


def _reference(grads, lr, momentum, period, alpha, final_step=None):
    """Lookahead around momentum SGD, written out: fast weights, slow weights, sync every k."""
    params = np.zeros_like(grads[0])
    slow = params.copy()
    velocity = np.zeros_like(params)
    history = []
    for count, g in enumerate(grads, start=1):
        velocity = momentum * velocity + g
        params = params - lr * velocity
        if count % period == 0:
            slow = slow + alpha(count) * (params - slow)
            params = slow.copy()
        elif count == final_step:  # airbench94's end: the weights become the average as it is
            params = slow.copy()
        history.append(params.copy())
    return history


@pytest.mark.parametrize("period", [1, 3, 5])
@pytest.mark.parametrize("schedule", [False, True])
@pytest.mark.parametrize("final_step", [None, 11, 10, 13])
def test_matches_the_written_out_algorithm(rng, period, schedule, final_step):
    grads = rng.standard_normal((13, 4, 3)).astype(np.float32)
    alpha = (lambda count: 1.0 - 0.5 ** (count / period)) if schedule else (lambda count: 0.4)
    tx = lookahead(
        optax.sgd(0.1, momentum=0.9), period, alpha if schedule else 0.4, final_step=final_step
    )
    params = {"w": jnp.zeros((4, 3))}
    state = tx.init(params)
    update = jax.jit(tx.update)
    want = _reference(grads, 0.1, 0.9, period, alpha, final_step)
    for g, expected in zip(grads, want, strict=True):
        updates, state = update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(params["w"], expected, rtol=2e-5, atol=2e-6)


def test_needs_params_and_checks_its_arguments():
    tx = lookahead(optax.sgd(0.1), 2, 0.5)
    with pytest.raises(ValueError, match="params: lookahead needs the current parameters"):
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
    with pytest.raises(ValueError, match="sync_period: expected a positive int, got 0"):
        lookahead(optax.sgd(0.1), 0, 0.5)
    with pytest.raises(ValueError, match=r"slow_step_size: expected a value in \[0, 1\], got 1.5"):
        lookahead(optax.sgd(0.1), 2, 1.5)
    with pytest.raises(TypeError, match="slow_step_size: expected a number or a schedule"):
        lookahead(optax.sgd(0.1), 2, "0.5")
    with pytest.raises(ValueError, match="final_step: expected a positive int or None, got 0"):
        lookahead(optax.sgd(0.1), 2, 0.5, final_step=0)


def _four_steps(tx):
    """The parameters after four fixed gradients through ``tx``, from zeros."""
    params = jnp.zeros(2)
    state = tx.init(params)
    for g in (jnp.full(2, 1.0), jnp.full(2, -2.0), jnp.full(2, 0.5), jnp.full(2, 3.0)):
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return np.asarray(params)


def test_numpy_scalars_are_taken_as_written_and_inner_is_checked():
    python = _four_steps(lookahead(optax.sgd(0.1), 2, 0.5, final_step=3))
    numpy = _four_steps(
        lookahead(optax.sgd(0.1), np.int64(2), np.float32(0.5), final_step=np.int32(3))
    )
    np.testing.assert_array_equal(numpy, python)
    with pytest.raises(TypeError, match="inner: expected an optax.GradientTransformation, got str"):
        lookahead("sgd", 2, 0.5)
    with pytest.raises(TypeError, match="slow_step_size: expected a number or a schedule"):
        lookahead(optax.sgd(0.1), 2, np.bool_(True))


def test_0d_jax_arrays_are_taken_as_numbers():
    # jnp.int32(2) / jnp.float32(0.5) were refused ("expected a positive int" / "a number or a
    # schedule"), unlike the NumPy scalars and check_int / check_real elsewhere in jcnn
    python = _four_steps(lookahead(optax.sgd(0.1), 2, 0.5, final_step=3))
    arrays = _four_steps(
        lookahead(optax.sgd(0.1), jnp.int32(2), jnp.float32(0.5), final_step=jnp.int32(3))
    )
    np.testing.assert_array_equal(arrays, python)
    # a float, even integral, is a wrong type: a TypeError (it was a ValueError)
    with pytest.raises(TypeError, match="sync_period: expected a positive int"):
        lookahead(optax.sgd(0.1), jnp.float32(2.0), 0.5)
    with pytest.raises(ValueError, match=r"slow_step_size: expected a value in \[0, 1\], got nan"):
        lookahead(optax.sgd(0.1), 2, jnp.float32(float("nan")))
    with pytest.raises(TypeError, match="slow_step_size: expected a number or a schedule"):
        lookahead(optax.sgd(0.1), 2, jnp.full(2, 0.5))


def test_a_final_step_past_the_int32_count_is_refused_up_front():
    # 2**40 was accepted and the first update failed with a raw OverflowError inside jit
    with pytest.raises(
        ValueError, match=r"^final_step: expected at most 2\*\*31 - 1 .* 1099511627776"
    ):
        lookahead(optax.sgd(0.1), 2, 0.5, final_step=2**40)
    tx = lookahead(optax.sgd(0.1), 2, 0.5, final_step=2**31 - 1)
    params = jnp.ones(2)
    updates, _ = jax.jit(tx.update)(jnp.ones(2), tx.init(params), params)
    np.testing.assert_allclose(updates, -0.1 * np.ones(2))


def test_a_sync_period_past_the_int32_count_is_refused_up_front():
    # 2**31 was accepted and the first update failed with a raw OverflowError inside jit
    with pytest.raises(
        ValueError, match=r"^sync_period: expected at most 2\*\*31 - 1 .* 2147483648"
    ):
        lookahead(optax.sgd(0.1), 2**31, 0.5)
    tx = lookahead(optax.sgd(0.1), 2**31 - 1, 0.5)
    params = jnp.ones(2)
    updates, _ = jax.jit(tx.update)(jnp.ones(2), tx.init(params), params)
    np.testing.assert_allclose(updates, -0.1)


@pytest.mark.parametrize("bad", [2.0, "2", True, None, [2]])
def test_a_sync_period_or_final_step_of_the_wrong_type_is_a_type_error(bad):
    # these were ValueErrors, as a wrong value
    with pytest.raises(TypeError, match="sync_period: expected a positive int"):
        lookahead(optax.sgd(0.1), bad, 0.5)
    if bad is not None:  # None: no final step
        with pytest.raises(TypeError, match="final_step: expected a positive int or None"):
            lookahead(optax.sgd(0.1), 2, 0.5, final_step=bad)
