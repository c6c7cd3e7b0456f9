"""Each optimizer against the notes' pseudo-code, written out in NumPy, for a few steps."""

import inspect
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcnn.train import optim
from jcnn.train import schedules as S

LR, RHO, BETA1, BETA2, DECAY, EPS = 0.05, 0.9, 0.9, 0.999, 0.9, 1e-7


def _gradient(x, target):
    """Gradient of a non-quadratic loss sum(cosh(x - target)) so that steps depend on x."""
    return np.sinh(x - target)


def _reference(name, x, target, steps, weight_decay=0.0, decoupled=False):
    """The notes' update loops (lecture 003), with optional coupled or decoupled weight decay."""
    x = x.astype(np.float64).copy()
    v = np.zeros_like(x)
    m = np.zeros_like(x)
    s = np.zeros_like(x)
    for t in range(1, steps + 1):
        dx = _gradient(x, target)
        if weight_decay and not decoupled:
            dx = dx + weight_decay * x
        if name == "sgd":
            step = LR * dx
        elif name == "momentum":
            v = RHO * v + dx
            step = LR * v
        elif name == "nesterov":
            old_v = v
            v = RHO * v - LR * dx
            step = -(-RHO * old_v + (1 + RHO) * v)
        elif name == "adagrad":
            s = s + dx * dx
            step = LR * dx / (np.sqrt(s) + EPS)
        elif name == "rmsprop":
            s = DECAY * s + (1 - DECAY) * dx * dx
            step = LR * dx / (np.sqrt(s) + EPS)
        elif name in ("adam", "adamw"):
            m = BETA1 * m + (1 - BETA1) * dx
            s = BETA2 * s + (1 - BETA2) * dx * dx
            m_hat, s_hat = m / (1 - BETA1**t), s / (1 - BETA2**t)
            step = LR * m_hat / (np.sqrt(s_hat) + EPS)
        if weight_decay and decoupled:
            step = step + LR * weight_decay * x
        x = x - step
    return x


def _run(tx, x, target, steps):
    params = {"w": jnp.asarray(x, jnp.float32)}
    state = tx.init(params)

    @jax.jit
    def one(params, state):
        grads = {"w": jnp.sinh(params["w"] - target)}
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for _ in range(steps):
        params, state = one(params, state)
    return np.asarray(params["w"])


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"])
def test_matches_notes_pseudocode(name, rng):
    x = rng.normal(size=(3, 4)).astype(np.float32)
    target = rng.normal(size=(3, 4)).astype(np.float32)
    # one set of settings for every method: those a method does not read are ignored, with a warning
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "(momentum|beta1|beta2|decay|eps): not used by optimizer")
        tx = optim.optimizer(name, LR, momentum=RHO, beta1=BETA1, beta2=BETA2, decay=DECAY, eps=EPS)
    got = _run(tx, x, target, steps=6)
    expected = _reference(name, x, target, steps=6)
    assert not np.allclose(expected, x, atol=1e-3)  # the steps moved
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("name, decoupled", [("momentum", False), ("adam", False), ("adamw", True)])
def test_weight_decay_coupled_and_decoupled(name, decoupled, rng):
    x = rng.normal(size=(2, 5)).astype(np.float32)
    target = rng.normal(size=(2, 5)).astype(np.float32)
    tx = optim.optimizer(name, LR, weight_decay=0.1)
    got = _run(tx, x, target, steps=5)
    expected = _reference(name, x, target, steps=5, weight_decay=0.1, decoupled=decoupled)
    np.testing.assert_allclose(got, expected, rtol=2e-5, atol=2e-6)
    without = _reference(name, x, target, steps=5)
    assert np.abs(expected - without).max() > 1e-4  # decay made a difference


def test_default_mask_spares_biases_and_bn():
    params = {"kernel": jnp.ones((3, 3)), "bias": jnp.ones(3), "scale": jnp.ones(3)}
    zero = jax.tree.map(jnp.zeros_like, params)
    tx = optim.optimizer("sgd", 1.0, weight_decay=0.5)
    updates, _ = tx.update(zero, tx.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.5 * np.ones((3, 3)))
    np.testing.assert_allclose(updates["bias"], 0.0)
    np.testing.assert_allclose(updates["scale"], 0.0)


def test_clip_norm_clips_the_global_norm(rng):
    params = {"a": jnp.zeros(4), "b": jnp.zeros((2, 2))}
    grads = {
        "a": jnp.asarray(rng.normal(size=4) * 10),
        "b": jnp.asarray(rng.normal(size=(2, 2)) * 10),
    }
    tx = optim.optimizer("sgd", 1.0, clip_norm=1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    norm = np.sqrt(sum(float(jnp.sum(u**2)) for u in jax.tree.leaves(updates)))
    assert norm == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("scale", [1e19, 1e-24])
def test_clip_norm_of_huge_and_tiny_gradients(scale):
    # float32 sums of squares overflow (a huge gradient came out as zeros) or underflow (a tiny
    # one was left unclipped); the float64 reference scales the gradient to the limit
    grads = {"a": jnp.asarray([3.0, 4.0], jnp.float32) * scale, "b": jnp.float32(-12.0) * scale}
    params = jax.tree.map(jnp.zeros_like, grads)
    limit = 0.5 * scale * 1e-3
    tx = optim.optimizer("sgd", 1.0, clip_norm=limit)
    updates, _ = tx.update(grads, tx.init(params), params)
    want = -np.array([3.0, 4.0, -12.0]) / 13.0 * limit
    got = np.append(np.asarray(updates["a"]), updates["b"])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_clip_norm_has_a_derivative_at_zero_gradients():
    def clipped(g):
        tx = optim.optimizer("sgd", 1.0, clip_norm=1.0)
        params = {"w": jnp.zeros(3)}
        return jnp.sum(tx.update({"w": g}, tx.init(params), params)[0]["w"] * jnp.arange(3.0))

    np.testing.assert_allclose(jax.grad(clipped)(jnp.zeros(3)), [0.0, -1.0, -2.0])


def test_clip_value_clips_each_entry_before_the_norm():
    params = {"a": jnp.zeros(3), "b": jnp.zeros(())}
    grads = {"a": jnp.asarray([5.0, -0.25, -7.0]), "b": jnp.asarray(2.0)}
    tx = optim.optimizer("sgd", 1.0, clip_value=1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["a"], [-1.0, 0.25, 1.0])
    np.testing.assert_allclose(updates["b"], -1.0)
    # entries first ([1, -0.25, -1, 1], norm 1.7854...), then the global norm to 0.5
    tx = optim.optimizer("sgd", 1.0, clip_value=1.0, clip_norm=0.5)
    updates, _ = tx.update(grads, tx.init(params), params)
    want = -np.array([1.0, -0.25, -1.0, 1.0]) / np.sqrt(3.0625) * 0.5
    np.testing.assert_allclose(np.append(updates["a"], updates["b"]), want, rtol=1e-6)


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), ("1", TypeError)],
)
def test_clip_value_refuses_bad_values(value, error):
    with pytest.raises(error, match="clip_value: expected a finite number > 0"):
        optim.optimizer("adam", 0.1, clip_value=value)


@pytest.mark.parametrize("name", ["adagrad", "rmsprop", "adam", "adamw", "lamb"])
def test_eps_zero_leaves_entries_with_zero_gradients_finite(name):
    # eps = 0 is allowed; an entry whose gradients are all 0 had 0 / 0 = NaN (LAMB: its layer)
    tx = optim.optimizer(name, 0.1, eps=0.0)
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    for _ in range(2):
        updates, state = tx.update({"w": jnp.asarray([0.0, 1.0])}, state, params)
        assert float(updates["w"][0]) == 0.0
        assert float(updates["w"][1]) < 0


def test_schedule_as_learning_rate():
    sched = S.step(1.0, [2], 0.1)
    tx = optim.optimizer("sgd", sched)
    params = {"w": jnp.zeros(1)}
    state = tx.init(params)
    seen = []
    for _ in range(4):
        updates, state = tx.update({"w": jnp.ones(1)}, state, params)
        seen.append(-float(updates["w"][0]))
    np.testing.assert_allclose(seen, [1.0, 1.0, 0.1, 0.1], rtol=1e-6)


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_layerwise_optimizers_decrease_loss(name, rng):
    x = rng.normal(size=(4, 4)).astype(np.float32)
    target = np.zeros((4, 4), np.float32)
    got = _run(optim.optimizer(name, 0.5 if name == "lars" else 0.05), x, target, steps=20)
    assert np.cosh(got).sum() < np.cosh(x).sum()


def _layerwise_reference(name, x, target, steps, weight_decay, decoupled):
    """LARS (You et al. 2017, with Optax's trust ratio eta ||x|| / ||g + lambda x||, then
    momentum) and LAMB (You et al. 2019: ratio ||x|| / ||r|| of the Adam direction r, plus
    lambda x if decoupled)."""
    x = x.astype(np.float64).copy()
    v, m, s = np.zeros_like(x), np.zeros_like(x), np.zeros_like(x)
    for t in range(1, steps + 1):
        dx = _gradient(x, target)
        if name == "lars":
            d = dx + weight_decay * x  # whatever `decoupled` says
            v = RHO * v + LR * 0.001 * np.linalg.norm(x) / np.linalg.norm(d) * d
            x = x - v
            continue
        if not decoupled:
            dx = dx + weight_decay * x
        m = BETA1 * m + (1 - BETA1) * dx
        s = BETA2 * s + (1 - BETA2) * dx * dx
        r = m / (1 - BETA1**t) / (np.sqrt(s / (1 - BETA2**t)) + EPS)
        if decoupled:
            r = r + weight_decay * x
        x = x - LR * np.linalg.norm(x) / np.linalg.norm(r) * r
    return x


@pytest.mark.parametrize("decoupled", [True, False])
@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_layerwise_optimizers_match_their_papers(name, decoupled, rng):
    x = rng.normal(size=(4, 4)).astype(np.float32)
    target = rng.normal(size=(4, 4)).astype(np.float32)
    tx = optim.optimizer(name, LR, weight_decay=0.1, decoupled=decoupled)
    want = _layerwise_reference(name, x, target, 5, 0.1, decoupled)
    np.testing.assert_allclose(_run(tx, x, target, steps=5), want, rtol=1e-5, atol=1e-6)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="name: expected one of"):
        optim.optimizer("adamax", 0.1)
    with pytest.raises(ValueError, match="momentum"):
        optim.optimizer("momentum", 0.1, momentum=1.5)
    with pytest.raises(ValueError, match="learning_rate"):
        optim.optimizer("sgd", -1.0)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (
            {"learning_rate": float("nan")},
            ValueError,
            "learning_rate: expected a finite number >= 0, got nan",
        ),
        (
            {"learning_rate": float("inf")},
            ValueError,
            "learning_rate: expected a finite number >= 0, got inf",
        ),
        (  # infinite in float32, where the update computes
            {"learning_rate": 1e308},
            ValueError,
            "learning_rate: expected a finite number >= 0 within float32's range",
        ),
        (
            {"learning_rate": "0.1"},
            TypeError,
            "learning_rate: expected a finite number >= 0 or a schedule",
        ),
        (
            {"learning_rate": None},
            TypeError,
            "learning_rate: expected a finite number >= 0 or a schedule",
        ),
        (
            {"name": "adam", "eps": -1e-8},
            ValueError,
            "eps: expected a finite number >= 0, got -1e-08",
        ),
        (
            {"name": "adam", "eps": float("nan")},
            ValueError,
            "eps: expected a finite number >= 0, got nan",
        ),
        ({"beta2": 1.0}, ValueError, "beta2: expected a number in [0, 1), got 1.0"),
        ({"beta1": None}, TypeError, "beta1: expected a number in [0, 1), got None"),
        (
            {"weight_decay": float("inf")},
            ValueError,
            "weight_decay: expected a finite number >= 0, got inf",
        ),
        ({"clip_norm": 0.0}, ValueError, "clip_norm: expected a finite number > 0, got 0.0"),
        ({"clip_norm": "1"}, TypeError, "clip_norm: expected a finite number > 0, got '1'"),
        ({"decoupled": "yes"}, TypeError, "decoupled: expected a Python bool, got 'yes'"),
        ({"name": 3}, TypeError, "name: expected one of sgd"),
    ],
)
def test_every_option_is_checked(kwargs, error, message):
    kwargs = {"name": "sgd", "learning_rate": 0.1, **kwargs}
    with pytest.raises(error, match=re.escape(message)):
        optim.optimizer(**kwargs)


@pytest.mark.parametrize(
    "name, setting",
    [
        ("sgd", {"momentum": 0.9}),  # the default value, given explicitly: still named
        ("adam", {"momentum": 0.5}),
        ("sgd", {"beta1": 0.8}),
        ("momentum", {"beta2": 0.99}),
        ("adam", {"decay": 0.5}),
        ("sgd", {"eps": 1e-3}),
        ("lars", {"eps": 1e-3}),
        ("lamb", {"momentum": 0.9}),
        ("adamw", {"trust_coefficient": 0.01}),
    ],
)
def test_a_setting_its_method_ignores_is_named_in_a_warning(name, setting):
    ((key, value),) = setting.items()
    message = f"{key}: not used by optimizer {name!r}, ignored; it applies to "
    with pytest.warns(UserWarning, match=re.escape(message) + f".*got {key}={value!r}"):
        tx = optim.optimizer(name, 0.1, **setting)
    params = {"w": jnp.ones((2, 2))}
    grads = {"w": jnp.full((2, 2), 0.5)}
    want, _ = optim.optimizer(name, 0.1).update(grads, tx.init(params), params)
    got, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_array_equal(got["w"], want["w"])


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_each_method_takes_the_settings_it_reads_and_keeps_their_defaults(name):
    signature = inspect.signature(optim.optimizer).parameters
    used = {k: signature[k].default for k, methods in optim._USED_BY.items() if name in methods}
    params = {"w": jnp.ones((2, 2))}
    explicit, implicit = optim.optimizer(name, 0.1, **used), optim.optimizer(name, 0.1)
    grads = {"w": jnp.full((2, 2), 0.5)}
    want, _ = implicit.update(grads, implicit.init(params), params)
    got, _ = explicit.update(grads, explicit.init(params), params)
    np.testing.assert_array_equal(got["w"], want["w"])
    assert signature["momentum"].default == 0.9 and signature["beta2"].default == 0.999


def test_numpy_scalars_are_valid_rates(rng):
    x = rng.normal(size=(3,)).astype(np.float32)
    target = np.zeros(3, np.float32)
    want = _run(optim.optimizer("adam", 0.05, eps=1e-7), x, target, steps=3)
    for rate in (np.float32(0.05), np.float64(0.05), np.array(0.05, np.float32)):
        got = _run(optim.optimizer("adam", rate, eps=np.float32(1e-7)), x, target, steps=3)
        np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize(
    "mask, message",
    [
        (5, "mask: expected a pytree of bools or a function params -> pytree of bools, got 5"),
        (
            "no",
            "mask: expected a pytree of bools or a function params -> pytree of bools, got 'no'",
        ),
        (
            {"w": True, "b": 0},
            "mask: expected a pytree of bools or a function params -> pytree "
            "of bools, got dict with a leaf 0",
        ),
    ],
)
def test_a_mask_that_is_not_bools_is_refused(mask, message):
    # Optax reads any leaf by its truth: 5 or "no" would decay every parameter
    with pytest.raises(TypeError, match=re.escape(message)):
        optim.optimizer("sgd", 0.1, weight_decay=0.1, mask=mask)


def test_a_mask_function_returning_no_bools_is_refused():
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    tx = optim.optimizer("sgd", 0.1, weight_decay=0.1, mask=lambda p: 5)
    with pytest.raises(TypeError, match=re.escape("mask(params): expected a pytree of bools")):
        tx.init(params)


@pytest.mark.parametrize(
    "mask", [{"w": True, "b": False}, lambda p: {"w": np.bool_(True), "b": jnp.asarray(False)}]
)
def test_a_mask_of_bools_chooses_what_decays(mask):
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    tx = optim.optimizer("sgd", 0.1, weight_decay=0.5, mask=mask)
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["w"], -0.05)
    np.testing.assert_allclose(updates["b"], 0.0)


@pytest.mark.parametrize("name", ["adamw", "lars"])
@pytest.mark.parametrize(
    "mask, label", [({"w": True}, "mask"), (lambda p: {"w": True}, "mask(params)")]
)
def test_a_mask_of_another_structure_is_named(name, mask, label):
    # Optax's own error is a bare pytree structure error naming neither the mask nor the params
    params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    tx = optim.optimizer(name, 0.1, weight_decay=0.1, mask=mask)
    message = f"{label}: expected the structure of the parameters, PyTreeDef({{'b': *, 'w': *}})"
    with pytest.raises(ValueError, match=re.escape(message) + ".*got PyTreeDef"):
        tx.init(params)


def test_a_mask_prefix_of_the_params_chooses_whole_subtrees():
    params = {"conv": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}, "head": jnp.ones((2, 2))}
    tx = optim.optimizer("sgd", 0.1, weight_decay=0.5, mask={"conv": True, "head": False})
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["conv"]["bias"], -0.05)
    np.testing.assert_allclose(updates["head"], 0.0)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_hyperparameters_sweep_under_vmap(name, rng):
    # each lane of the sweep is the optimizer built with that lane's concrete numbers
    x = rng.normal(size=(3, 4)).astype(np.float32)
    target = rng.normal(size=(3, 4)).astype(np.float32)
    rates = jnp.asarray([0.01, 0.05], jnp.float32)
    decays = jnp.asarray([0.0, 0.1], jnp.float32)
    betas = jnp.asarray([0.8, 0.9], jnp.float32)

    def trained(lr, wd, beta):
        kw = {"momentum": beta, "beta1": beta, "decay": beta, "weight_decay": wd}
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "(momentum|beta1|decay): not used by optimizer")
            tx = optim.optimizer(name, lr, **kw)
        params = jnp.asarray(x)
        state = tx.init(params)
        for _ in range(3):
            updates, state = tx.update(jnp.sinh(params - target), state, params)
            params = params + updates
        return params

    swept = jax.jit(jax.vmap(trained))(rates, decays, betas)
    for i in range(2):
        lane = float(rates[i]), float(decays[i]), float(betas[i])
        want = jax.jit(lambda lane=lane: trained(*lane))()
        np.testing.assert_allclose(swept[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["momentum", "nesterov"])
def test_momentum_methods_under_a_varying_rate_take_pytorchs_form(name, rng):
    # the rate scales the step, not the velocity: v = ρ v + g; x -= α_t v (momentum) or
    # x -= α_t (g + ρ v) (Nesterov), as torch.optim.SGD; the notes' change of variables for
    # Nesterov, with α inside v, agrees only for a constant rate
    rates = np.asarray([0.1, 0.02, 0.3, 0.05, 0.2])
    x = rng.normal(size=(3, 4)).astype(np.float32)
    target = rng.normal(size=(3, 4)).astype(np.float32)
    tx = optim.optimizer(name, lambda t: jnp.asarray(rates, jnp.float32)[t], momentum=RHO)
    got = _run(tx, x, target, steps=len(rates))
    expected, v = x.astype(np.float64), np.zeros(x.shape)
    for rate in rates:
        g = _gradient(expected, target)
        v = RHO * v + g
        expected = expected - rate * (g + RHO * v if name == "nesterov" else v)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("schedule", "error", "message"),
    [
        (lambda t: jnp.full(3, 0.1), ValueError, r"scalar rate, got shape \(3,\) from <lambda>"),
        (lambda t: "0.1", TypeError, "returning a real rate, got str '0.1' from <lambda>"),
        (lambda t: None, TypeError, "returning a real rate, got NoneType None"),
        (lambda: 0.1, TypeError, r"a schedule taking the step, step -> rate, got <lambda>\(\)"),
    ],
)
def test_a_schedule_that_is_no_step_to_scalar_rate_is_named(schedule, error, message):
    # a rate vector scaled each parameter's entries by it silently (or broke inside Optax for
    # another shape); a string or None failed inside Optax's update with a bare error
    params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
    with pytest.raises(error, match=f"^learning_rate: expected .*{message}"):
        tx = optim.optimizer("sgd", schedule)
        tx.update(params, tx.init(params), params)


def test_a_checked_schedule_still_runs_traced_and_with_optax_schedules():
    params = {"w": jnp.ones((2, 3))}
    for schedule in (optax.cosine_decay_schedule(0.1, 10), lambda t: np.float32(0.1)):
        tx = optim.optimizer("sgd", schedule)
        updates, _ = jax.jit(tx.update)(params, tx.init(params), params)
        np.testing.assert_allclose(updates["w"], -0.1 * np.ones((2, 3)), rtol=1e-6)


@pytest.mark.parametrize(
    "schedule, at",
    [
        (lambda t: -0.1 + 0.0 * t, "got -0.1 at step 0"),
        (optax.linear_schedule(-0.1, 0.0, 10), "got -0.1 at step 0"),
        (lambda t: jnp.float32(np.nan), "got nan at step 0"),
    ],
)
def test_a_schedule_starting_negative_is_refused_when_built(schedule, at):
    # the rate ascended the loss from the first step, under jit as eagerly
    with pytest.raises(ValueError, match=r"^learning_rate: expected a schedule returning finite "):
        optim.optimizer("sgd", schedule)
    with pytest.raises(ValueError, match=re.escape(at)):
        optim.optimizer("adam", schedule)


def test_a_schedule_turning_negative_is_refused_at_a_concrete_step():
    tx = optim.optimizer("sgd", lambda t: 0.1 - 0.05 * t)
    params = {"w": jnp.ones(2)}
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(params, state, params)
    with pytest.raises(ValueError, match=re.escape("got -0.05 at step 3")):
        tx.update(params, state, params)


@pytest.mark.parametrize(
    "schedule",
    [
        lambda t: 0.1 if t < 100 else 0.01,
        lambda t: [0.1, 0.01][int(t) // 100],
        lambda t: 0.1 * 0.5 ** float(t),
    ],
    ids=["if", "int", "float"],
)
def test_a_schedule_reading_the_step_in_python_is_named_under_jit(schedule):
    # built eagerly at step 0 it ran; the jitted update then failed with JAX's bare tracer error
    params = {"w": jnp.ones(2)}
    tx = optim.optimizer("momentum", schedule)
    tx.update(params, tx.init(params), params)  # eager updates see a concrete step
    with pytest.raises(TypeError, match=r"^learning_rate: the schedule <lambda> reads the step's"):
        jax.jit(tx.update)(params, tx.init(params), params)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_derivatives_through_updates_stay_finite_where_a_gradient_is_zero(name):
    # √s of AdaGrad/RMSProp/Adam/AdamW/LAMB had an infinite slope at s = 0: the derivative of the
    # trained loss with respect to the rate was NaN once one entry's gradient was 0 (∞ · 0)
    x0 = jnp.asarray([[1.0, -2.0, 0.5]])
    live = jnp.asarray([[1.0, 1.0, 0.0]])  # the last entry never gets a gradient

    def trained_loss(lr):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tx = optim.optimizer(name, lr)
        params = {"w": x0}
        state = tx.init(params)
        for _ in range(2):
            grads = {"w": 2 * params["w"] * live}
            updates, state = tx.update(grads, state, params)
            params = optax.apply_updates(params, updates)
        return jnp.sum(params["w"] ** 2 * live) + jnp.sum(params["w"])

    first = jax.grad(trained_loss)(0.1)
    second = jax.grad(jax.grad(trained_loss))(0.1)
    h = 1e-3
    difference = (trained_loss(0.1 + h) - trained_loss(0.1 - h)) / (2 * h)
    assert np.isfinite(float(first)) and np.isfinite(float(second))
    np.testing.assert_allclose(float(first), float(difference), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("name", ["lars", "lamb"])
def test_derivatives_through_the_trust_ratio_stay_finite_where_a_leaf_gets_no_gradient(name):
    # Optax's trust ratio ||x|| / ||u|| of a leaf whose update is 0 was inf in jnp.where's unused
    # branch: every derivative through the update was NaN
    params = {"b": jnp.asarray([0.5, -0.2]), "w": jnp.asarray([[0.3, 0.4], [0.1, -0.2]])}
    live = {"b": jnp.ones(2), "w": jnp.zeros((2, 2))}  # w never gets a gradient
    mask = {"b": True, "w": True}

    def trained_loss(p):
        tx = optim.optimizer(name, 0.1, weight_decay=0.0, mask=mask)
        grads = jax.tree.map(lambda a, b: 2 * a * b, p, live)
        updates, _ = tx.update(grads, tx.init(p), p)
        return sum(jnp.sum(leaf) for leaf in jax.tree.leaves(optax.apply_updates(p, updates)))

    gradient = jax.grad(trained_loss)(params)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(gradient))
    np.testing.assert_allclose(gradient["w"], np.ones((2, 2)), rtol=1e-6)


@pytest.mark.parametrize("scale", [1e20, 1e-25])
def test_lars_trust_ratio_of_huge_and_tiny_gradients(scale):
    # ||g|| overflowed float32 at 1e20 (a step of 0) and underflowed at 1e-25 (ratio 1, a step of
    # lr * g): the trust ratio makes the step eta lr ||x|| g / ||g|| whatever the scale of g
    x = np.asarray([[0.3, 0.4], [0.1, -0.2]], np.float32)
    g = np.asarray([[1.0, 2.0], [3.0, 4.0]])
    tx = optim.optimizer("lars", 0.1)
    updates, _ = tx.update({"w": jnp.asarray(g * scale, jnp.float32)}, tx.init({"w": x}), {"w": x})
    want = -0.1 * 0.001 * np.linalg.norm(x) * g / np.linalg.norm(g)
    np.testing.assert_allclose(updates["w"], want, rtol=1e-5)
