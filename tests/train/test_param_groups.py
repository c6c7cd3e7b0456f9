"""Parameter groups for optax.multi_transform (jcnn/train/param_groups.py)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcnn import models
from jcnn.train.param_groups import active_for, label_by_path, path_name, split_no_grad


def _airbench_params():
    model = models.AirbenchNet(widths=(8, 8, 8))
    variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), variables["params"])


def test_labels_follow_the_first_matching_rule_on_a_real_model():
    params = _airbench_params()
    rules = [("whiten/kernel", "frozen"), ("*/norm*/bias", "bn_bias"), ("*bias", "other_bias")]
    labels = label_by_path(rules, default="rest")(params)
    flat = {path_name(path): label for path, label in jax.tree_util.tree_leaves_with_path(labels)}
    for name, label in flat.items():
        if name == "whiten/kernel":
            assert label == "frozen"
        elif "/norm" in name and name.endswith("bias"):
            assert label == "bn_bias", name
        elif name.endswith("bias"):
            assert label == "other_bias", name
        else:
            assert label == "rest", name
    assert sum(label == "bn_bias" for label in flat.values()) == 6


def test_multi_transform_scales_each_group():
    params = _airbench_params()
    labels = label_by_path([("whiten/*", "frozen"), ("*/norm*/bias", "bn_bias")], default="rest")
    tx = optax.multi_transform(
        {"frozen": optax.set_to_zero(), "bn_bias": optax.sgd(0.64), "rest": optax.sgd(0.01)},
        labels,
    )
    grads = jax.tree.map(jnp.ones_like, params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for path, update in jax.tree_util.tree_leaves_with_path(updates):
        name = path_name(path)
        want = 0.0 if name.startswith("whiten/") else (-0.64 if "/norm" in name else -0.01)
        np.testing.assert_allclose(np.asarray(update), want, rtol=1e-6, err_msg=name)


def test_a_rule_matching_nothing_is_an_error():
    labels = label_by_path([("*/norm*/bias", "bn"), ("hed/kernel", "typo")], default="rest")
    with pytest.raises(
        ValueError, match=r"rules: pattern\(s\) \['hed/kernel'\] match no parameter"
    ):
        labels(_airbench_params())


def test_a_shadowed_or_duplicate_rule_names_the_earlier_rule():
    # such a rule was reported as matching no parameter, though it matches some: an earlier rule
    # takes them all; the error now says so
    params = {
        "whiten": {"kernel": jnp.ones(2), "bias": jnp.ones(1)},
        "head": {"kernel": jnp.ones(3)},
    }
    with pytest.raises(
        ValueError,
        match=r"rules: pattern '\*/bias' \(rule 1\) is shadowed by the earlier rule\(s\) "
        r"'\*/bias' \(rule 0\): every parameter it matches \(\['whiten/bias'\]\)",
    ):
        label_by_path([("*/bias", "a"), ("*/bias", "b")], default="rest")(params)
    with pytest.raises(
        ValueError,
        match=r"pattern 'head/kernel' \(rule 1\) is shadowed by the earlier rule\(s\) '\*' "
        r"\(rule 0\)",
    ):
        label_by_path([("*", "a"), ("head/kernel", "b")], default="rest")(params)


@pytest.mark.parametrize(
    "rules, error",
    [("whiten/*", TypeError), ([("whiten/*",)], TypeError), ([(1, "x")], TypeError)],
)
def test_malformed_rules(rules, error):
    with pytest.raises(error, match="rules: expected"):
        label_by_path(rules, default="rest")


def test_rules_read_from_json_as_lists_label_as_tuples():
    params = {"head": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
    rules = json.loads('[["*/bias", "no_decay"], ["head/*", "head"]]')
    assert label_by_path(rules, default="rest")(params) == {
        "head": {"kernel": "head", "bias": "no_decay"}
    }
    with pytest.raises(TypeError, match=r"rules: expected \(pattern: str, label\) pairs"):
        label_by_path([["*/bias", "a", "b"]], default="rest")


def test_active_for_freezes_after_the_given_updates():
    tx = active_for(optax.sgd(0.1, momentum=0.9), steps=3)
    params = jnp.zeros(2)
    state = tx.init(params)
    seen = []
    for _ in range(6):
        updates, state = tx.update(jnp.ones(2), state, params)
        params = optax.apply_updates(params, updates)
        seen.append(float(updates[0]))
    # Momentum SGD for three steps (0.1, 0.19, 0.271), then nothing.
    np.testing.assert_allclose(seen, [-0.1, -0.19, -0.271, 0.0, 0.0, 0.0], rtol=1e-6)
    with pytest.raises(ValueError, match="steps: expected a non-negative int, got -1"):
        active_for(optax.sgd(0.1), -1)
    # a wrong type is a TypeError (1.5, "3", True and None were ValueErrors)
    for bad in (1.5, "3", True, None):
        with pytest.raises(TypeError, match=f"steps: expected a non-negative int, got {bad!r}"):
            active_for(optax.sgd(0.1), bad)


def test_active_for_refuses_what_is_no_transformation():
    with pytest.raises(TypeError, match="transform: expected an optax.GradientTransformation"):
        active_for(5, 3)


def test_split_no_grad_reads_patterns_once_and_names_what_is_no_sequence():
    params = {"whiten": {"kernel": jnp.ones(2), "bias": jnp.ones(1)}, "head": jnp.ones(3)}
    # a generator was consumed by the type check: no parameter was frozen, silently
    leaves, _, fill = split_no_grad(params, (p for p in ["whiten/*"]))
    assert [leaf.shape for leaf in leaves] == [(3,)]
    assert fill([jnp.ones(3)])["whiten"]["kernel"].tolist() == [0.0, 0.0]
    for patterns in (5, None):  # raw "object is not iterable" before
        with pytest.raises(TypeError, match="no_grad: expected a sequence of glob patterns"):
            split_no_grad(params, patterns)


def test_active_for_takes_a_0d_jax_int():
    # jnp.int32(2) was refused as "expected a non-negative int", unlike check_int elsewhere
    params = jnp.zeros(1)
    for steps in (2, jnp.int32(2)):
        tx = active_for(optax.sgd(1.0), steps)
        state = tx.init(params)
        got = []
        for _ in range(3):
            updates, state = tx.update(jnp.ones(1), state, params)
            got.append(float(updates[0]))
        assert got == [-1.0, -1.0, 0.0]
    with pytest.raises(TypeError, match="steps: expected a non-negative int"):
        active_for(optax.sgd(1.0), jnp.float32(2.0))


def test_active_for_leaves_frozen_parameters_alone_whatever_their_gradient():
    # the freeze multiplied the updates by 0: an inf or NaN gradient (or a momentum buffer that
    # held one) made the "frozen" parameters NaN; PyTorch's requires_grad=False leaves them be
    tx = active_for(optax.sgd(0.1, momentum=0.9), steps=1)
    params = jnp.ones(3)
    state = tx.init(params)
    updates, state = tx.update(jnp.array([1.0, jnp.inf, 2.0]), state, params)
    assert updates[0] == jnp.float32(-0.1) and float(updates[1]) == -jnp.inf
    for grads in (jnp.array([jnp.inf, jnp.nan, -jnp.inf]), jnp.ones(3)):
        updates, state = tx.update(grads, state, params)
        assert updates.tolist() == [0.0, 0.0, 0.0]
    assert updates.dtype == jnp.float32
    half = active_for(optax.sgd(0.1), steps=0)
    updates, _ = half.update(jnp.full(2, jnp.inf, jnp.float16), half.init(jnp.ones(2, jnp.float16)))
    assert updates.dtype == jnp.float16 and updates.tolist() == [0.0, 0.0]


def test_active_for_refuses_a_length_past_the_int32_update_count_up_front():
    # an OverflowError from inside the jitted update at the first step before
    active_for(optax.sgd(0.1), 2**31 - 1)
    with pytest.raises(ValueError, match=r"steps: expected at most 2147483647 \(the update count"):
        active_for(optax.sgd(0.1), 2**31)
