"""Each schedule against its formula from the notes, eagerly and under jit."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn.train import schedules as S


def _formulas(rng):
    a0 = float(rng.uniform(0.01, 1.0))
    k = float(rng.uniform(0.001, 0.1))
    total = int(rng.integers(20, 200))
    return (
        a0,
        k,
        total,
        [
            (S.constant(a0), lambda t: a0),
            (S.exponential(a0, k), lambda t: a0 * math.exp(-k * t)),
            (S.inverse_time(a0, k), lambda t: a0 / (1 + k * t)),
            (
                S.cosine(a0, total),
                lambda t: 0.5 * a0 * (1 + math.cos(math.pi * min(t, total) / total)),
            ),
            (S.linear(a0, total), lambda t: a0 * (1 - min(t, total) / total)),
            (S.inverse_sqrt(a0), lambda t: a0 / math.sqrt(max(t, 1))),
            (
                S.step(a0, [total // 3, 2 * total // 3], 0.1),
                lambda t: a0 * 0.1 ** ((t >= total // 3) + (t >= 2 * total // 3)),
            ),
        ],
    )


def test_schedules_match_formulas(rng):
    _, _, total, pairs = _formulas(rng)
    steps = np.concatenate(
        [np.arange(0, 5), rng.integers(0, 2 * total, size=30), [total, 2 * total]]
    )
    for schedule, formula in pairs:
        expected = np.array([formula(int(t)) for t in steps])
        eager = np.array([float(schedule(int(t))) for t in steps])
        traced = np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32)))
        np.testing.assert_allclose(eager, expected, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(traced, expected, rtol=1e-5, atol=1e-7)


def test_step_schedule_classic_resnet():
    sched = S.step(0.1, [30, 60, 90], 0.1)
    got = [float(sched(t)) for t in (0, 29, 30, 59, 60, 89, 90, 200)]
    np.testing.assert_allclose(got, [0.1, 0.1, 0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4], rtol=1e-5)


@pytest.mark.parametrize("boundaries", [[3], [3, 6], []])
def test_step_takes_an_array_of_steps_as_every_schedule_does(boundaries):
    # one boundary counted the passed boundaries over the whole array: a scalar came back
    steps = np.arange(9)
    want = [0.5 ** sum(t >= b for b in boundaries) for t in steps]
    for sched in (S.step(1.0, boundaries, 0.5), S.warmup(S.step(1.0, boundaries, 0.5), 1)):
        got = sched(jnp.asarray(steps))
        assert got.shape == (9,)
        np.testing.assert_allclose(got, [float(sched(int(t))) for t in steps])
    np.testing.assert_allclose(S.step(1.0, boundaries, 0.5)(steps.reshape(3, 3)).ravel(), want)


def test_warmup_wraps_any_schedule(rng):
    _, _, _, pairs = _formulas(rng)
    ramp = int(rng.integers(3, 15))
    for schedule, formula in pairs:
        warmed = S.warmup(schedule, ramp)
        for t in [0, 1, ramp // 2, ramp - 1]:
            assert float(warmed(t)) == pytest.approx(formula(0) * t / ramp, rel=1e-5, abs=1e-8)
        for t in [ramp, ramp + 1, ramp + 17]:
            assert float(warmed(t)) == pytest.approx(formula(t - ramp), rel=1e-5, abs=1e-8)


def test_one_cycle_shape():
    peak, total = 0.4, 100
    sched = S.one_cycle(peak, total, pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
    initial, final = peak / 10, peak / 1000
    assert float(sched(0)) == pytest.approx(initial)
    assert float(sched(12)) == pytest.approx(initial + (peak - initial) * 12 / 25, rel=1e-5)
    assert float(sched(25)) == pytest.approx(peak)
    for t in (26, 50, 99):
        falling = final + 0.5 * (peak - final) * (1 + math.cos(math.pi * (t - 25) / 75))
        assert float(sched(t)) == pytest.approx(falling, rel=1e-5)
    assert float(sched(total)) == pytest.approx(final, rel=1e-5)
    assert float(sched(10 * total)) == pytest.approx(final, rel=1e-5)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: S.cosine(0.1, 0), "total_steps"),
        (lambda: S.step(0.1, [5, 3]), "boundaries"),
        (lambda: S.exponential(-1.0, 0.1), "learning_rate"),
        (lambda: S.warmup(0.1, 5), "schedule"),
        (lambda: S.one_cycle(0.1, 10, pct_start=1.5), "pct_start"),
    ],
)
def test_bad_arguments_are_named(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: S.step(0.1, [1.5, 2.7]),
            TypeError,
            "boundaries[0]: expected an int >= 0, got 1.5",
        ),
        (lambda: S.step(0.1, [1, 2.0]), TypeError, "boundaries[1]: expected an int >= 0, got 2.0"),
        (lambda: S.step(0.1, [True]), TypeError, "boundaries[0]: expected an int >= 0, got True"),
        (lambda: S.step(0.1, [-1, 3]), ValueError, "boundaries[0]: expected an int >= 0, got -1"),
        (lambda: S.step(0.1, [3, 3]), ValueError, "boundaries: expected strictly increasing steps"),
        (
            lambda: S.step(0.1, 30),
            TypeError,
            "boundaries: expected a sequence of int steps, got 30",
        ),
        (lambda: S.step(0.1, [3], factor=float("nan")), ValueError, "factor: expected a finite"),
        (
            lambda: S.constant(float("nan")),
            ValueError,
            "learning_rate: expected a finite number >= 0, got nan",
        ),
        (
            lambda: S.cosine(float("inf"), 10),
            ValueError,
            "learning_rate: expected a finite number >= 0, got inf",
        ),
        (
            lambda: S.linear(None, 10),
            TypeError,
            "learning_rate: expected a finite number >= 0, got None",
        ),
        (lambda: S.cosine(0.1, 10.0), TypeError, "total_steps: expected a positive int, got 10.0"),
        (
            lambda: S.warmup(S.constant(0.1), 2.5),
            TypeError,
            "warmup_steps: expected a positive int",
        ),
        (
            lambda: S.one_cycle(0.1, 10, pct_start=float("nan")),
            ValueError,
            "pct_start: expected a number in (0, 1), got nan",
        ),
        (
            lambda: S.one_cycle(0.1, 10, div_factor="25"),
            TypeError,
            "div_factor: expected a finite number > 0",
        ),
    ],
)
def test_every_argument_is_checked(call, error, message):
    with pytest.raises(error, match=re.escape(message)):
        call()


def test_numpy_integers_and_floats_are_accepted():
    want = S.step(1.0, [3, 6], factor=0.5)
    got = S.step(np.float32(1.0), np.array([3, 6]), factor=np.float64(0.5))
    got_list = S.step(1.0, [np.int64(3), np.int32(6)], factor=0.5)
    for t in range(8):
        assert float(got(t)) == float(want(t)) == float(got_list(t))
    assert float(S.cosine(np.float32(0.5), np.int64(10))(5)) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "total, pct_start, message",
    [
        (1, 0.3, "total_steps: expected at least 2 for one_cycle"),
        (2, 0.95, "pct_start: expected a fraction of total_steps=2 that leaves at least one"),
        (10, 0.96, r"got 0.96 \(10 rising steps\)"),
    ],
)
def test_one_cycle_without_a_falling_step_is_refused(total, pct_start, message):
    # the fall ended after step T: the last steps ran at the peak, never at the final rate
    with pytest.raises(ValueError, match=message):
        S.one_cycle(1.0, total, pct_start=pct_start)


def test_one_cycle_ends_at_the_final_rate_with_the_shortest_fall():
    sched = S.one_cycle(1.0, 10, pct_start=0.9, div_factor=4.0, final_div_factor=2.0)
    assert float(sched(0)) == pytest.approx(0.25)
    assert float(sched(9)) == pytest.approx(1.0)
    assert float(sched(10)) == pytest.approx(0.125)


def test_step_boundaries_beyond_the_int32_step_counter_are_named():
    # was NumPy's "Python integer 2147483648 out of bounds for int32" from inside
    with pytest.raises(ValueError, match=r"boundaries\[1\]: expected a step <= 2147483647"):
        S.step(1.0, [5, 2**31])
    sched = S.step(1.0, [np.int64(2**31 - 1)], factor=0.5)
    assert float(sched(0)) == 1.0


def test_step_boundaries_as_a_0d_array_are_named():
    # NumPy's "iteration over a 0-d array", naming nothing; a 1-D array is a sequence
    for bad in (np.array(10), jnp.array(10)):
        with pytest.raises(TypeError, match="boundaries: expected a sequence of int steps"):
            S.step(1.0, bad)
    assert float(S.step(1.0, np.array([2]), factor=0.5)(2)) == 0.5


def test_cosine_and_one_cycle_keep_their_relative_accuracy_to_the_last_step():
    # the 1 + cos(π t / T) form cancelled near T: 0.25% off at T - 1 for T = 1000
    total = 1000
    t = np.arange(total + 2)
    progress = np.minimum(t, total) / total
    expected = 0.5 * 0.3 * (1 + np.cos(np.pi * progress))
    got = np.asarray(jax.vmap(S.cosine(0.3, total))(jnp.asarray(t)))
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=0)
    assert got[total] == 0.0

    rise, final = 300, 0.3 / 25 / 1e4
    one = np.asarray(jax.vmap(S.one_cycle(0.3, total))(jnp.asarray(t[rise:])))
    fall = np.minimum(t[rise:] - rise, total - rise) / (total - rise)
    expected = final + 0.5 * (0.3 - final) * (1 + np.cos(np.pi * fall))
    np.testing.assert_allclose(one, expected, rtol=2e-6, atol=0)


@pytest.mark.parametrize(
    "build, argument",
    [
        (lambda n: S.cosine(0.1, n), "total_steps"),
        (lambda n: S.linear(0.1, n), "total_steps"),
        (lambda n: S.one_cycle(0.1, n), "total_steps"),
        (lambda n: S.warmup(S.constant(0.1), n), "warmup_steps"),
    ],
)
def test_step_counts_beyond_the_int32_step_counter_are_named(build, argument):
    # they were accepted, and the first call failed with a raw OverflowError from inside jax
    with pytest.raises(
        ValueError, match=rf"{argument}: expected a step <= 2147483647 .*got 2147483648"
    ):
        build(2**31)
    assert 0 <= float(build(2**31 - 1)(5)) <= 0.1 * (1 + 1e-6)


def test_linear_keeps_its_relative_accuracy_to_the_last_step():
    # 1 - t / T cancelled near T: 1.7e-4 off at the end for T = 10000, and jit differed from eager
    total = 10000
    t = np.arange(total - 50, total + 2)
    expected = 0.3 * (total - np.minimum(t, total)) / total
    sched = S.linear(0.3, total)
    got = np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray(t)))
    np.testing.assert_allclose(got, expected, rtol=2e-7, atol=0)
    eager = np.array([float(sched(int(step))) for step in t[-5:]])
    np.testing.assert_allclose(eager, expected[-5:], rtol=2e-7, atol=0)
    assert got[-2] == 0.0 and got[-1] == 0.0


@pytest.mark.parametrize(
    "call, argument",
    [
        (lambda: S.constant(-0.1), "learning_rate"),
        (lambda: S.step(-0.1, [3]), "learning_rate"),
        (lambda: S.exponential(-0.1, 0.01), "learning_rate"),
        (lambda: S.exponential(0.1, -0.01), "decay_rate"),
        (lambda: S.inverse_time(-0.1, 0.01), "learning_rate"),
        (lambda: S.inverse_time(0.1, -0.01), "decay_rate"),
        (lambda: S.cosine(-0.1, 10), "learning_rate"),
        (lambda: S.linear(-0.1, 10), "learning_rate"),
        (lambda: S.inverse_sqrt(-0.1), "learning_rate"),
        (lambda: S.one_cycle(-0.1, 10), "max_learning_rate"),
        (lambda: S.one_cycle(0.1, 10, div_factor=-25.0), "div_factor"),
        (lambda: S.one_cycle(0.1, 10, final_div_factor=-1e4), "final_div_factor"),
    ],
)
def test_every_schedule_refuses_a_negative_rate_naming_its_argument(call, argument):
    with pytest.raises(ValueError, match=f"^{argument}: expected a finite number >"):
        call()


@pytest.mark.parametrize(
    "schedule, error, message",
    [
        (lambda t: -0.1 + 0.0 * t, ValueError, "a negative rate ascends the loss), got -0.1"),
        (lambda t: float("nan"), ValueError, "schedule: expected a finite rate >= 0 at step 0"),
        (lambda t: "0.1", TypeError, "schedule: expected a schedule returning a real scalar"),
        (lambda t: jnp.ones(2), TypeError, "schedule: expected a schedule returning a real scalar"),
    ],
)
def test_warmup_refuses_a_schedule_that_starts_negative_or_is_no_rate(schedule, error, message):
    # the warmup ramps to schedule(0): a negative peak made every warmup step ascend the loss
    with pytest.raises(error, match=re.escape(message)):
        S.warmup(schedule, 5)


def test_warmup_still_takes_traced_and_optax_schedules():
    import optax

    want = S.warmup(S.cosine(0.1, 10), 4)
    got = S.warmup(optax.cosine_decay_schedule(0.1, 10), 4)
    for t in (0, 2, 4, 9, 20):
        assert float(got(t)) == pytest.approx(float(want(t)), rel=1e-5, abs=1e-7)
    swept = jax.jit(jax.vmap(lambda lr: S.warmup(lambda t: lr * jnp.ones(()), 4)(2)))
    np.testing.assert_allclose(swept(jnp.asarray([0.1, 0.2])), [0.05, 0.1], rtol=1e-6)


def test_warmup_asks_its_schedule_as_optax_does():
    # Optax calls a schedule with an int32 count; warmup asked for the peak with a Python 0,
    # which a schedule written for Optax (count.astype...) could not take
    decay = lambda count: 0.1 / jnp.sqrt(1.0 + count.astype(jnp.float32))  # noqa: E731
    sched = S.warmup(decay, 10)
    assert [float(sched(t)) for t in (0, 5, 10)] == pytest.approx([0.0, 0.05, 0.1])
    assert float(sched(13)) == pytest.approx(0.05)


def _schedules_at_7():
    return {
        "constant": (S.constant(0.1), 0.1),
        "step": (S.step(0.1, [3, 6], factor=0.3), 0.1 * 0.3**2),
        "exponential": (S.exponential(0.1, 0.01), 0.1 * math.exp(-0.07)),
        "inverse_time": (S.inverse_time(0.1, 0.01), 0.1 / 1.07),
        "cosine": (S.cosine(0.1, 100), 0.05 * (1 + math.cos(math.pi * 7 / 100))),
        "linear": (S.linear(0.1, 100), 0.1 * 0.93),
        "inverse_sqrt": (S.inverse_sqrt(0.1), 0.1 / math.sqrt(7)),
        "warmup": (S.warmup(S.constant(0.1), 10), 0.07),
    }


def test_rates_are_float64_under_x64_and_float32_otherwise():
    """A float64 model's learning rate is not rounded to float32 under jax_enable_x64 (0.1 was
    0.10000000149, a 1.5e-8 relative change of every update); without x64 rates stay float32."""
    with jax.enable_x64(True):
        for name, (schedule, expected) in _schedules_at_7().items():
            for rate in (schedule(7), jax.jit(schedule)(jnp.int32(7))):
                assert rate.dtype == jnp.float64, name
                assert float(rate) == pytest.approx(expected, rel=1e-14, abs=0), name
    for name, (schedule, _) in _schedules_at_7().items():
        assert schedule(7).dtype == jnp.float32, name
