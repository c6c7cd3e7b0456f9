"""train_step / train_steps / eval_step on a small Flax CNN with BatchNorm and dropout."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcnn.train import TrainState, eval_step, optimizer, train_step, train_steps


class SmallNet(nn.Module):
    """conv -> BN -> relu -> mean-pool -> dropout -> dense: every kind of state a step threads."""

    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = jnp.mean(nn.relu(x), axis=(1, 2))
        x = nn.Dropout(self.dropout, deterministic=not train)(x)
        return nn.Dense(3)(x)


def _batch(rng, n=8):
    images = jnp.asarray(rng.normal(size=(n, 6, 6, 2)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 3, size=n), jnp.int32)
    return images, labels


def _state(model, lr=0.1, seed=0):
    return TrainState.create(
        model, optimizer("sgd", lr), jax.random.PRNGKey(seed), jnp.zeros((1, 6, 6, 2))
    )


def _copy(state):
    return jax.tree.map(jnp.array, state)


def _reference_loss(params, batch_stats, model, images, labels):
    logits, updates = model.apply(
        {"params": params, "batch_stats": batch_stats}, images, train=True, mutable=["batch_stats"]
    )
    log_probs = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    return -jnp.mean(log_probs[jnp.arange(labels.shape[0]), labels]), updates["batch_stats"]


def test_train_step_is_an_sgd_step_with_bn_statistics(rng):
    model = SmallNet()
    state = _state(model)
    images, labels = _batch(rng)
    before = _copy(state)
    (loss, stats), grads = jax.value_and_grad(_reference_loss, has_aux=True)(
        before.params, before.batch_stats, model, images, labels
    )
    new_state, metrics = train_step(state, (images, labels))
    assert int(new_state.step) == 1
    assert float(metrics["loss"]) == pytest.approx(float(loss), rel=1e-5)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, before.params, grads)
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # BN running mean moved from 0 towards the batch mean: new = 0.9 * 0 + 0.1 * mean.
    for got, want in zip(
        jax.tree.leaves(new_state.batch_stats), jax.tree.leaves(stats), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(new_state.batch_stats["BatchNorm_0"]["mean"]).max()) > 1e-4
    grad_norm = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)))
    assert float(metrics["grad_norm"]) == pytest.approx(grad_norm, rel=1e-4)


def test_old_state_is_donated(rng):
    state = _state(SmallNet())
    leaf = jax.tree.leaves(state.params)[0]
    train_step(state, _batch(rng))
    assert leaf.is_deleted()


def test_dropout_keys_follow_key_and_step(rng):
    model = SmallNet(dropout=0.5)
    batch = _batch(rng)
    state = _state(model, seed=1)
    a, ma = train_step(_copy(state), batch)
    b, mb = train_step(_copy(state), batch)
    assert float(ma["loss"]) == float(mb["loss"])  # same key and step: same masks, bit for bit
    c, mc = train_step(_copy(state).replace(step=jnp.asarray(7, jnp.int32)), batch)
    d, md = train_step(_copy(state).replace(key=jax.random.PRNGKey(99)), batch)
    assert float(mc["loss"]) != float(ma["loss"])
    assert float(md["loss"]) != float(ma["loss"])


def test_soft_labels_equal_integer_labels_when_one_hot(rng):
    images, labels = _batch(rng)
    state = _state(SmallNet())
    a, ma = train_step(_copy(state), (images, labels))
    b, mb = train_step(_copy(state), (images, jax.nn.one_hot(labels, 3)))
    assert float(ma["loss"]) == pytest.approx(float(mb["loss"]), rel=1e-6)
    assert float(ma["accuracy"]) == float(mb["accuracy"])
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_bfloat16_compute_keeps_float32_params(rng):
    images, labels = _batch(rng)
    state = _state(SmallNet())
    f32, m32 = train_step(_copy(state), (images, labels))
    bf16, m16 = train_step(_copy(state), (images, labels), compute_dtype=jnp.bfloat16)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(bf16.params))
    assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(bf16.batch_stats))
    assert float(m16["loss"]) == pytest.approx(float(m32["loss"]), rel=3e-2)
    for x, y in zip(jax.tree.leaves(f32.params), jax.tree.leaves(bf16.params), strict=True):
        np.testing.assert_allclose(x, y, rtol=0.05, atol=0.01)


class Float64Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = jnp.tanh(nn.Conv(4, (3, 3), param_dtype=jnp.float64)(x))
        return nn.Dense(3, param_dtype=jnp.float64)(x.reshape(x.shape[0], -1)) * 30.0


def test_a_float64_model_gets_its_float64_loss_and_gradient(rng):
    """Under jax_enable_x64 a float64 model's loss and gradient are float64 to the last digit:
    its logits were rounded to float32 before the loss (relative gradient error 5e-8)."""
    with jax.enable_x64(True):
        images = jnp.asarray(rng.normal(size=(5, 6, 6, 2)), jnp.float64)
        labels = jnp.asarray(rng.integers(0, 3, size=5), jnp.int32)
        model = Float64Net()
        state = TrainState.create(model, optax.sgd(1.0), jax.random.PRNGKey(0), images)
        before = _copy(state)

        def reference(params):
            logits = model.apply({"params": params}, images, train=True)
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(5), labels])

        loss, grads = jax.value_and_grad(reference)(before.params)
        after, metrics = train_step(state, (images, labels))
        assert metrics["loss"].dtype == jnp.float64
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-14)
        for new, old, grad in zip(
            jax.tree.leaves(after.params),
            jax.tree.leaves(before.params),
            jax.tree.leaves(grads),
            strict=True,
        ):
            assert new.dtype == jnp.float64
            np.testing.assert_allclose(old - new, grad, rtol=1e-12, atol=1e-14)
        metrics = eval_step(after, (images, labels))
        assert metrics["loss"].dtype == jnp.float64


def test_bfloat16_compute_updates_batchnorm_statistics_in_float32(rng):
    # the running statistics were cast to bfloat16 for the step: 0.99 * 1.0 + 0.01 * 1.3 = 1.003
    # rounded back to 1.0 (bfloat16's spacing at 1 is 2^-7), so they stalled far from the data's
    class BNNet(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.BatchNorm(use_running_average=not train, momentum=0.99)(x)
            return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))

    images = jnp.asarray(rng.normal(size=(16, 4, 4, 2)) * np.sqrt(1.3) + 0.3, jnp.float32)
    state = TrainState.create(BNNet(), optimizer("sgd", 0.0), jax.random.PRNGKey(0), images[:1])
    new, _ = train_step(state, (images, jnp.zeros(16, jnp.int32)), compute_dtype=jnp.bfloat16)
    seen = np.asarray(images.astype(jnp.bfloat16), np.float64)  # what the model computed on
    stats = new.batch_stats["BatchNorm_0"]
    np.testing.assert_allclose(stats["mean"], 0.01 * seen.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(stats["var"], 0.99 + 0.01 * seen.var(axis=(0, 1, 2)), rtol=1e-6)


def test_eval_step_uses_running_statistics_and_training_learns(rng):
    model = SmallNet()
    images = jnp.asarray(rng.normal(size=(24, 6, 6, 2)), jnp.float32)
    labels = jnp.asarray(
        np.argmax(np.asarray(images).mean(axis=(1, 2)) @ [[1, -1, 0], [0, 1, -1]], -1)
    )
    state = TrainState.create(model, optimizer("adam", 0.05), jax.random.PRNGKey(0), images[:1])
    first = eval_step(state, (images, labels))
    for _ in range(40):
        state, _ = train_step(state, (images, labels))
    last = eval_step(state, (images, labels))
    logits = model.apply(state.variables(), images, train=False)
    expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    assert float(last["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert int(last["count"]) == 24
    assert float(last["loss"]) < 0.5 * float(first["loss"])
    assert float(last["accuracy"]) >= 0.9


def test_bad_batches_are_named(rng):
    state = _state(SmallNet())
    images, labels = _batch(rng)
    with pytest.raises(ValueError, match="batch labels"):
        eval_step(state, (images, labels[:3]))
    with pytest.raises(TypeError, match="batch images"):
        eval_step(state, (images.astype(jnp.int32), labels))
    with pytest.raises(TypeError, match="state"):
        eval_step({"params": 1}, (images, labels))


def _extra_metric(logits, labels):
    return jnp.mean(jnp.max(logits, axis=-1))


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize("soft", [False, True])
def test_train_steps_are_train_step_in_turn(rng, count, soft):
    """BatchNorm statistics, dropout keys (fold_in of the running step), optimizer state, the
    step counter and every metric of each step, against ``count`` calls of ``train_step``."""
    model = SmallNet(dropout=0.5)
    batches = [_batch(rng, n=5) for _ in range(count)]
    if soft:
        batches = [(x, jax.nn.softmax(jnp.asarray(rng.normal(size=(5, 3))))) for x, _ in batches]
    metrics = (("top", _extra_metric),)
    state = _state(model, lr=0.3, seed=4).replace(step=jnp.asarray(11, jnp.int32))
    expected, per_step = _copy(state), []
    for batch in batches:
        expected, values = train_step(expected, batch, label_smoothing=0.1, metrics=metrics)
        per_step.append(values)
    stacked = tuple(jnp.stack(parts) for parts in zip(*batches, strict=True))
    got, values = train_steps(_copy(state), stacked, label_smoothing=0.1, metrics=metrics)
    assert int(got.step) == 11 + count
    assert sorted(values) == sorted(per_step[0])
    for name, column in values.items():
        assert column.shape == (count,)
        np.testing.assert_allclose(column, [v[name] for v in per_step], rtol=1e-5, atol=1e-6)
    trees = (expected.params, expected.batch_stats, expected.opt_state)
    mine = (got.params, got.batch_stats, got.opt_state)
    for a, b in zip(jax.tree.leaves(trees), jax.tree.leaves(mine), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_train_steps_donates_and_needs_stacked_batches(rng):
    state = _state(SmallNet())
    images, labels = _batch(rng)
    with pytest.raises(ValueError, match=r"batches labels: expected \(K, N\) = \(2, 8\)"):
        train_steps(state, (jnp.stack([images, images]), labels))
    with pytest.raises(ValueError, match="leading axis of K >= 1"):
        train_steps(state, (images[:0][None][:0], labels[None][:0]))
    with pytest.raises(TypeError, match="batches: expected a pair"):
        train_steps(state, [images[None]])
    with pytest.raises(TypeError, match="batches images"):
        train_steps(state, (images[None].astype(jnp.int32), labels[None]))
    with pytest.raises(TypeError, match="state"):
        train_steps({"params": 1}, (images[None], labels[None]))
    leaf = jax.tree.leaves(state.params)[0]
    train_steps(state, (images[None], labels[None]))
    assert leaf.is_deleted()


@pytest.mark.parametrize("patterns", [("Conv_0/*",), ("Dense_0/kernel", "BatchNorm_0/scale")])
def test_no_grad_parameters_get_no_gradient_and_the_others_their_full_one(rng, patterns):
    model = SmallNet()
    state = _state(model)
    images, labels = _batch(rng)
    before = _copy(state)
    grads = jax.grad(lambda p: _reference_loss(p, before.batch_stats, model, images, labels)[0])(
        before.params
    )
    new_state, metrics = train_step(state, (images, labels), no_grad=patterns)
    kept, norm = 0, 0.0
    for path, got in jax.tree_util.tree_leaves_with_path(new_state.params):
        name = "/".join(key.key for key in path)
        old = _get(before.params, path)
        if any(name.startswith(p.removesuffix("*")) for p in patterns):
            np.testing.assert_array_equal(got, old)  # plain SGD: a zero gradient, no change
            kept += 1
        else:
            np.testing.assert_allclose(got, old - 0.1 * _get(grads, path), rtol=1e-5, atol=1e-6)
            norm += float(jnp.sum(_get(grads, path) ** 2))
    assert kept == 2
    assert float(metrics["grad_norm"]) == pytest.approx(np.sqrt(norm), rel=1e-4)
    # the BatchNorm statistics still follow the batch
    assert float(jnp.abs(new_state.batch_stats["BatchNorm_0"]["mean"]).max()) > 1e-4


def _get(tree, path):
    for key in path:
        tree = tree[key.key]
    return tree


def test_no_grad_leaves_out_the_backward_work_it_would_need():
    # The convolution is the first layer: without its parameters' gradient nothing is left to
    # differentiate there, and its weight-gradient convolution disappears from the program.
    state = _state(SmallNet())
    batch = (jnp.zeros((8, 6, 6, 2)), jnp.zeros(8, jnp.int32))

    def convolutions(**options):
        return train_step.lower(state, batch, **options).as_text().count("stablehlo.convolution")

    assert convolutions() == 2
    assert convolutions(no_grad=("Conv_0/kernel",)) == 1


def test_no_grad_in_train_steps_and_bad_patterns(rng):
    state = _state(SmallNet())
    stacked = tuple(jnp.stack(parts) for parts in zip(_batch(rng), _batch(rng), strict=True))
    kernel = jnp.array(state.params["Dense_0"]["kernel"])
    new_state, _ = train_steps(state, stacked, no_grad=("Dense_0/*",))
    np.testing.assert_array_equal(new_state.params["Dense_0"]["kernel"], kernel)
    assert not np.array_equal(
        new_state.params["Conv_0"]["kernel"], _state(SmallNet()).params["Conv_0"]["kernel"]
    )
    with pytest.raises(ValueError, match=r"no_grad: pattern\(s\) \['Head/\*'\] match no parameter"):
        train_step(_state(SmallNet()), _batch(rng), no_grad=("Dense_0/*", "Head/*"))
    with pytest.raises(TypeError, match="no_grad: expected a sequence of glob patterns"):
        train_step(_state(SmallNet()), _batch(rng), no_grad="Dense_0/*")


def test_options_as_users_write_them_compile_as_their_tuples(rng):
    """A list of patterns, a dict or list of metrics and a NumPy float give the step the tuple
    form gives (they are static arguments, which JAX alone would refuse as unhashable)."""
    batch = _batch(rng)
    tuple_form = dict(no_grad=("Dense_0/*",), metrics=(("top", _extra_metric),))
    want_state, want = train_step(_state(SmallNet()), batch, label_smoothing=0.25, **tuple_form)
    for no_grad, metrics, smoothing in [
        (["Dense_0/*"], {"top": _extra_metric}, np.float32(0.25)),
        (("Dense_0/*",), [["top", _extra_metric]], jnp.asarray(0.25)),
    ]:
        state, got = train_step(
            _state(SmallNet()), batch, label_smoothing=smoothing, no_grad=no_grad, metrics=metrics
        )
        assert sorted(got) == sorted(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(want_state), strict=True):
            np.testing.assert_array_equal(a, b)
    stacked = tuple(parts[None] for parts in batch)
    _, values = train_steps(_state(SmallNet()), stacked, metrics={"top": _extra_metric})
    np.testing.assert_allclose(values["top"][0], want["top"], rtol=1e-6)
    values = eval_step(want_state, batch, metrics=[("top", _extra_metric)])
    assert values["top"].shape == ()


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(metrics={"loss": _extra_metric}), ValueError, "'loss' is computed already"),
        (dict(metrics=[("a", _extra_metric), ("a", jnp.sum)]), ValueError, "each name must"),
        (dict(metrics=[("a", 1.0)]), TypeError, r"metrics\['a'\]: expected a callable"),
        (dict(metrics=_extra_metric), TypeError, "metrics: expected a dict"),
        (dict(no_grad={"Dense_0/*"}), TypeError, "no_grad: expected a sequence"),
        (
            dict(loss_fn="mse"),
            TypeError,
            r"loss_fn: expected a callable \(logits, labels\) -> loss",
        ),
        (dict(label_smoothing=jnp.ones(2)), TypeError, "label_smoothing"),
        (dict(label_smoothing=1.5), ValueError, r"label_smoothing: expected a number in \[0, 1\]"),
    ],
)
def test_bad_step_options_are_named(rng, options, error, message):
    with pytest.raises(error, match=message):
        train_step(_state(SmallNet()), _batch(rng), **options)


@dataclasses.dataclass
class _MeanLoss:  # eq=True without frozen=True: instances are unhashable
    scale: float = 1.0

    def __call__(self, logits, labels):
        return self.scale * jnp.mean(logits)


_UNHASHABLE = (
    r"expected a hashable callable \(it is a static argument of the jit-compiled step\), got an "
    r"unhashable _MeanLoss \(unhashable type: '_MeanLoss'\); use a plain function, a "
    r"functools.partial or a frozen dataclass"
)


def test_an_unhashable_loss_or_metric_is_named_and_explained(rng):
    with pytest.raises(TypeError, match="loss_fn: " + _UNHASHABLE):
        eval_step(_state(SmallNet()), _batch(rng), loss_fn=_MeanLoss())
    with pytest.raises(TypeError, match=r"metrics\['mean'\]: " + _UNHASHABLE):
        eval_step(_state(SmallNet()), _batch(rng), metrics={"mean": _MeanLoss()})
    assert "loss" in eval_step(_state(SmallNet()), _batch(rng), loss_fn=_FrozenMeanLoss())


@dataclasses.dataclass(frozen=True)
class _FrozenMeanLoss:
    scale: float = 1.0

    def __call__(self, logits, labels):
        return self.scale * jnp.mean(logits)


@pytest.mark.parametrize(
    "output, error, says",
    [
        (None, TypeError, "expected a scalar .*got NoneType"),
        ({"a": 1.0}, TypeError, "expected a scalar .*got dict"),
        ("high", TypeError, "expected a scalar .*got str"),
        (jnp.complex64(1 + 2j), TypeError, "expected a real number, got dtype complex64"),
    ],
)
def test_a_metric_or_loss_returning_no_number_is_named(rng, output, error, says):
    # these used to escape as JAX's own errors, or (complex) to lose their imaginary part
    state = _state(SmallNet())
    with pytest.raises(error, match=f"metric 'odd' .*{says}"):
        eval_step(state, _batch(rng), metrics={"odd": lambda logits, labels: output})
    if not isinstance(output, jax.Array):
        with pytest.raises(TypeError, match="loss .*: expected a loss, got"):
            eval_step(state, _batch(rng), loss_fn=lambda logits, labels: output)
    counts = {"hits": lambda logits, labels: jnp.sum(jnp.argmax(logits, -1) == labels)}
    assert eval_step(state, _batch(rng), metrics=counts)["hits"].dtype == jnp.float32


@pytest.mark.parametrize(
    "fn, shown",
    [
        (lambda logits: jnp.mean(logits), r"<lambda>\(logits\)"),
        (lambda logits, labels, weights: jnp.mean(logits), r"<lambda>\(logits, labels, weights\)"),
        (lambda logits, *, labels: jnp.mean(logits), r"<lambda>\(logits, \*, labels\)"),
    ],
)
def test_a_loss_or_metric_that_cannot_take_logits_and_labels_is_named(rng, fn, shown):
    # the call failed inside the traced step with Python's bare "takes 1 positional argument"
    state = _state(SmallNet())
    expected = r"expected a callable taking \(logits, labels\), got "
    with pytest.raises(TypeError, match="loss_fn: " + expected + shown):
        eval_step(state, _batch(rng), loss_fn=fn)
    with pytest.raises(TypeError, match=r"metrics\['m'\]: " + expected + shown):
        train_step(state, _batch(rng), metrics={"m": fn})
    assert "m" in eval_step(
        state,
        _batch(rng),
        loss_fn=optax.softmax_cross_entropy_with_integer_labels,  # (logits, labels, axis, where)
        metrics={"m": lambda *args: jnp.mean(args[0])},
    )


def _numpy_mean(logits, labels):
    return float(np.mean(np.asarray(logits)))


def _branches_on_a_value(logits, labels):
    return jnp.mean(logits) if jnp.max(logits) > 0 else 0.0


def _boolean_mask(logits, labels):
    return jnp.mean(logits[labels > 0])


@pytest.mark.parametrize(
    "fn, raised",
    [
        (_numpy_mean, "TracerArrayConversionError"),
        (_branches_on_a_value, "TracerBoolConversionError"),
        (_boolean_mask, "NonConcreteBooleanIndexError"),
    ],
)
def test_a_loss_or_metric_jax_cannot_trace_is_named(rng, fn, raised):
    # JAX's own error said "while tracing the function train_step" and named no metric
    state = _state(SmallNet())
    traceable = f"expected a function JAX can trace .* it raised {raised}: "
    with pytest.raises(TypeError, match=f"metric 'm' \\({fn.__name__}\\): {traceable}"):
        train_step(state, _batch(rng), metrics={"m": fn})
    with pytest.raises(TypeError, match=f"loss {fn.__name__}: {traceable}"):
        eval_step(state, _batch(rng), loss_fn=fn)


def test_batch_loss_and_batch_metrics_refuse_what_is_not_callable():
    from jcnn.train.steps import batch_loss, batch_metrics

    logits, labels = jnp.zeros((4, 3)), jnp.array([0, 1, 2, 0])
    with pytest.raises(TypeError, match=r"loss_fn: expected a callable \(logits, labels\) -> loss"):
        batch_loss(5, logits, labels)
    with pytest.raises(TypeError, match=r"metrics\['f1'\]: expected a callable, got 0.5"):
        batch_metrics((("f1", 0.5),), logits, labels)


@pytest.mark.parametrize("dtype", [jnp.int32, "int8", jnp.bool_, jnp.complex64])
def test_a_compute_dtype_that_is_not_floating_is_named(rng, dtype):
    # an integer compute dtype cast the parameters to integers: every gradient was 0 and the step
    # silently trained nothing; complex64 computed in complex numbers
    for step in (train_step, eval_step):
        with pytest.raises(TypeError, match="compute_dtype: expected None or a floating dtype"):
            step(_state(SmallNet()), _batch(rng), compute_dtype=dtype)


def test_label_smoothing_with_a_custom_loss_is_refused(rng):
    # the custom loss never sees label_smoothing: it was silently ignored (fit refuses the pair)
    def loss(logits, labels):
        return jnp.mean(logits, axis=1)

    says = "label_smoothing: applies to the default cross-entropy only, not to a custom loss_fn"
    with pytest.raises(ValueError, match=says):
        train_step(_state(SmallNet()), _batch(rng), loss_fn=loss, label_smoothing=0.3)
    stacked = tuple(parts[None] for parts in _batch(rng))
    with pytest.raises(ValueError, match=says):
        train_steps(_state(SmallNet()), stacked, loss_fn=loss, label_smoothing=0.3)
    train_step(_state(SmallNet()), _batch(rng), loss_fn=loss, label_smoothing=0.0)


def test_an_empty_batch_is_refused_before_it_writes_nan_into_the_parameters(rng):
    # the mean loss of no example is NaN: a step took it and set BatchNorm's scale to NaN
    state = _state(SmallNet())
    images, labels = _batch(rng)
    empty = (images[:0], labels[:0])
    message = (
        r"batch images: expected a batch \(N, ...\) of N >= 1 images, got shape \(0, 6, 6, 2\)"
    )
    with pytest.raises(ValueError, match=message):
        train_step(state, empty)
    with pytest.raises(ValueError, match=message):
        eval_step(state, empty)
    with pytest.raises(ValueError, match=r"batches images\[0\]: .* got shape \(0, 6, 6, 2\)"):
        train_steps(state, (empty[0][None], empty[1][None]))
    assert all(bool(jnp.isfinite(p).all()) for p in jax.tree.leaves(state.params))


def _weighted_loss(logits, labels):
    # labels (N, 2): the class in column 0, the example's weight in column 1
    log_probs = jax.nn.log_softmax(logits)
    picked = log_probs[jnp.arange(logits.shape[0]), labels[:, 0].astype(jnp.int32)]
    return -labels[:, 1] * picked


def _squared_error(logits, labels):
    return jnp.sum(logits, axis=-1) - labels  # a regression target (N,), no classes


@pytest.mark.parametrize("loss_fn", [_weighted_loss, _squared_error])
def test_accuracy_is_nan_for_labels_a_custom_loss_reads_its_own_way(rng, loss_fn):
    # F.accuracy refused them ("class probabilities must have the logits' shape"), so a custom
    # loss over labels that are not classes could not train at all
    images, classes = _batch(rng)
    weights = rng.uniform(0.5, 2.0, size=8).astype(np.float32)
    if loss_fn is _weighted_loss:
        labels = jnp.stack([classes.astype(jnp.float32), jnp.asarray(weights)], axis=1)
    else:
        labels = jnp.asarray(rng.normal(size=8), jnp.float32)
    state = _state(SmallNet())
    logits = state.apply_fn(state.variables(), images, train=False)
    expected = float(jnp.mean(loss_fn(logits, labels)))
    metrics = eval_step(state, (images, labels), loss_fn=loss_fn)
    assert np.isnan(metrics["accuracy"]) and metrics["loss"] == pytest.approx(expected, rel=1e-5)
    new_state, metrics = train_step(_copy(state), (images, labels), loss_fn=loss_fn)
    assert np.isnan(metrics["accuracy"]) and np.isfinite(metrics["loss"])
    assert int(new_state.step) == 1
    # labels accuracy can read keep it, with a custom loss as with the default
    soft = jax.nn.one_hot(classes, 3)
    for loss, batch_labels in ((None, classes), (lambda lo, la: jnp.sum(lo * la, -1), soft)):
        metrics = eval_step(state, (images, batch_labels), loss_fn=loss)
        hit = np.mean(np.asarray(logits).argmax(-1) == np.asarray(classes))
        assert float(metrics["accuracy"]) == pytest.approx(hit)
    with pytest.raises(ValueError, match="labels: class probabilities must have the logits'"):
        eval_step(state, (images, labels))  # the default loss reads classes: still refused
