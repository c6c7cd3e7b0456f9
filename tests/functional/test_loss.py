"""cross_entropy against torch.nn.functional.cross_entropy (values and grads), and accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn.functional.loss import accuracy, cross_entropy


def _torch_loss_and_grad(torch, logits, labels, smoothing, reduction):
    """PyTorch's loss and d(sum of loss)/d(logits), with the class axis moved to axis 1."""
    t_logits = torch.tensor(np.moveaxis(logits, -1, 1), requires_grad=True)
    t_labels = torch.tensor(np.moveaxis(labels, -1, 1) if labels.ndim == logits.ndim else labels)
    loss = torch.nn.functional.cross_entropy(
        t_logits, t_labels, label_smoothing=smoothing, reduction=reduction
    )
    loss.sum().backward()
    return loss.detach().numpy(), np.moveaxis(t_logits.grad.numpy(), 1, -1)


def _ours_loss_and_grad(logits, labels, smoothing, reduction):
    def total(lg):
        loss = cross_entropy(lg, labels, label_smoothing=smoothing, reduction=reduction)
        return loss.sum(), loss

    labels = jnp.asarray(labels)
    (_, loss), grad = jax.value_and_grad(total, has_aux=True)(jnp.asarray(logits))
    return np.asarray(loss), np.asarray(grad)


def _random_probabilities(rng, shape):
    weights = rng.exponential(size=shape) ** 3
    return (weights / weights.sum(-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 6, 11)], ids=["dense", "segmentation"])
@pytest.mark.parametrize("probability_labels", [False, True], ids=["int", "prob"])
def test_matches_torch_with_smoothing_and_reductions(torch, rng, shape, probability_labels):
    logits = (rng.standard_normal(shape) * 4).astype(np.float32)
    if probability_labels:
        labels = _random_probabilities(rng, shape)
    else:
        labels = rng.integers(0, shape[-1], shape[:-1])
    for smoothing in (0.0, 0.1, 0.35, 1.0):
        for reduction in ("mean", "sum", "none"):
            want, want_grad = _torch_loss_and_grad(torch, logits, labels, smoothing, reduction)
            got, got_grad = _ours_loss_and_grad(logits, labels, smoothing, reduction)
            context = f"smoothing={smoothing} reduction={reduction}"
            assert got.shape == want.shape, context
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=context)
            np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7, err_msg=context)


def test_one_hot_probabilities_equal_integer_labels(rng):
    logits = jnp.asarray(rng.standard_normal((9, 6)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 6, 9))
    one_hot = jax.nn.one_hot(labels, 6)
    for smoothing in (0.0, 0.2):
        np.testing.assert_allclose(
            cross_entropy(logits, labels, label_smoothing=smoothing),
            cross_entropy(logits, one_hot, label_smoothing=smoothing),
            rtol=1e-6,
        )


def test_stable_for_huge_logits(torch, rng):
    logits = (rng.standard_normal((6, 4)) * 1e4).astype(np.float32)
    labels = rng.integers(0, 4, 6)
    want, want_grad = _torch_loss_and_grad(torch, logits, labels, 0.1, "none")
    got, got_grad = _ours_loss_and_grad(logits, labels, 0.1, "none")
    assert np.isfinite(got).all() and np.isfinite(got_grad).all()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_soft_labels_ignore_masked_classes_of_probability_zero(rng, reduction):
    # a class masked with a -inf logit and given probability 0 made the loss NaN (0 * -inf);
    # it adds nothing, as if it were not there, values and gradients
    logits = rng.normal(size=(4, 5)).astype(np.float32)
    target = rng.dirichlet(np.ones(5), size=4).astype(np.float32)
    masked = np.insert(logits, 2, -np.inf, axis=1)
    zero = np.insert(target, 2, 0.0, axis=1)
    kept = [0, 1, 3, 4, 5]

    def loss(x, t):
        return jnp.sum(cross_entropy(x, t, reduction=reduction))

    np.testing.assert_allclose(loss(masked, zero), loss(logits, target), rtol=1e-6)
    grad_logits, grad_target = jax.grad(loss, argnums=(0, 1))(masked, zero)
    expected_logits, expected_target = jax.grad(loss, argnums=(0, 1))(logits, target)
    np.testing.assert_allclose(grad_logits[:, kept], expected_logits, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(grad_logits[:, 2], 0.0)
    np.testing.assert_allclose(grad_target[:, kept], expected_target, rtol=1e-6)
    # a masked class given probability is impossible: an infinite loss, not a hidden one
    assert np.isposinf(loss(masked, np.insert(target * 0.9, 2, 0.1, axis=1)))
    # with label smoothing every class has probability: the masked one's loss is infinite
    assert np.isposinf(jnp.sum(cross_entropy(masked, zero, label_smoothing=0.1)))


def test_low_precision_logits_give_a_float32_loss(rng):
    logits = rng.standard_normal((5, 3)).astype(np.float32)
    labels = jnp.asarray(rng.integers(0, 3, 5))
    loss = cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels)
    assert loss.dtype == jnp.float32
    exact = cross_entropy(jnp.asarray(jnp.asarray(logits, jnp.bfloat16), jnp.float32), labels)
    np.testing.assert_allclose(loss, exact, rtol=1e-6)


def test_out_of_range_labels_give_nan_only_for_their_examples():
    losses = cross_entropy(jnp.zeros((4, 3)), jnp.array([0, 3, -1, 2]), reduction="none")
    assert np.isnan(losses).tolist() == [False, True, True, False]
    np.testing.assert_allclose(losses[np.array([0, 3])], np.log(3.0), rtol=1e-6)


def test_jit_and_vmap(rng):
    logits = jnp.asarray(rng.standard_normal((3, 4, 5)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 5, (3, 4)))
    per_batch = jax.jit(jax.vmap(lambda lg, lb: cross_entropy(lg, lb, label_smoothing=0.1)))
    pairs = zip(logits, labels, strict=True)
    want = [float(cross_entropy(lg, lb, label_smoothing=0.1)) for lg, lb in pairs]
    np.testing.assert_allclose(per_batch(logits, labels), want, rtol=1e-6)


@pytest.mark.parametrize("soft", [False, True])
def test_label_smoothing_swept_under_vmap_matches_each_concrete_value(rng, soft):
    logits = jnp.asarray(rng.standard_normal((6, 5)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 5, 6))
    if soft:
        labels = jax.nn.one_hot(labels, 5)
    smoothings = jnp.array([0.0, 0.1, 0.5, 1.0])
    swept = jax.vmap(lambda eps: cross_entropy(logits, labels, label_smoothing=eps))(smoothings)
    want = [float(cross_entropy(logits, labels, label_smoothing=float(e))) for e in smoothings]
    np.testing.assert_allclose(swept, want, rtol=1e-6)
    with pytest.raises(TypeError, match="label_smoothing: expected a real number or a 0-d"):
        jax.jit(lambda e: cross_entropy(logits, labels, label_smoothing=e))(jnp.zeros(2))


def test_accuracy_against_numpy(rng):
    logits = rng.standard_normal((200, 7)).astype(np.float32)
    labels = rng.integers(0, 7, 200)
    expected = (logits.argmax(-1) == labels).mean()
    assert float(accuracy(jnp.asarray(logits), jnp.asarray(labels))) == pytest.approx(expected)
    probabilities = _random_probabilities(rng, (200, 7))
    expected = (logits.argmax(-1) == probabilities.argmax(-1)).mean()
    got = accuracy(jnp.asarray(logits), jnp.asarray(probabilities))
    assert got.dtype == jnp.float32 and float(got) == pytest.approx(expected)
    segmentation = rng.standard_normal((2, 3, 4, 5)).astype(np.float32)
    masks = rng.integers(0, 5, (2, 3, 4))
    expected = (segmentation.argmax(-1) == masks).mean()
    assert float(accuracy(jnp.asarray(segmentation), jnp.asarray(masks))) == pytest.approx(expected)


def test_accuracy_of_a_label_outside_the_classes_is_nan_as_the_loss():
    # it counted as a miss (0.5 here), a number where cross_entropy says NaN: a wrong label
    # range (1-based classes, an ignore index) passed unnoticed
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
    for labels in ([0, 3], [0, -1]):
        labels = jnp.array(labels)
        assert np.isnan(float(accuracy(logits, labels)))
        assert np.isnan(float(jax.jit(accuracy)(logits, labels)))
        assert np.isnan(float(cross_entropy(logits, labels)))
    assert float(accuracy(logits, jnp.array([0, 2]))) == 0.5
    assert float(jax.vmap(accuracy)(logits[:, None], jnp.array([[0], [7]]))[0]) == 1.0


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda: cross_entropy(jnp.zeros((4, 3)), jnp.zeros(5, jnp.int32)),
            ValueError,
            r"labels: integer class labels must have shape \(4,\) .* got \(5,\)",
        ),
        (
            lambda: cross_entropy(jnp.zeros((4, 3)), jnp.zeros((4, 2))),
            ValueError,
            r"labels: class probabilities must have the logits' shape \(4, 3\), got \(4, 2\)",
        ),
        (
            lambda: cross_entropy(jnp.zeros((4, 3)), jnp.zeros(4, bool)),
            TypeError,
            "labels: expected integer class labels or floating class probabilities, got dtype bool",
        ),
        (lambda: cross_entropy(jnp.zeros((4, 3)), [0, 1, 2, 0]), TypeError, "labels: expected an"),
        (
            lambda: cross_entropy(jnp.zeros((4, 3), jnp.int32), jnp.zeros(4, jnp.int32)),
            TypeError,
            "logits: expected a floating-point array",
        ),
        (lambda: cross_entropy(jnp.zeros(()), jnp.zeros(())), ValueError, r"logits: expected"),
        (
            lambda: cross_entropy(jnp.zeros((2, 3)), jnp.zeros(2, int), label_smoothing=1.5),
            ValueError,
            r"label_smoothing: expected a number in \[0, 1\], got 1.5",
        ),
        (
            lambda: cross_entropy(jnp.zeros((2, 3)), jnp.zeros(2, int), reduction="avg"),
            ValueError,
            "reduction: expected one of",
        ),
        (
            lambda: accuracy(jnp.zeros((2, 3)), jnp.zeros((3,), int)),
            ValueError,
            "labels: integer class labels must have shape",
        ),
    ],
)
def test_bad_inputs_raise_naming_the_argument(call, error, message):
    with pytest.raises(error, match=message):
        call()


def test_an_empty_batch_has_no_mean_loss_or_accuracy_but_sums_to_zero():
    logits, labels = jnp.zeros((0, 3)), jnp.zeros(0, jnp.int32)
    for call in (
        lambda: cross_entropy(logits, labels),
        lambda: cross_entropy(logits, jnp.zeros((0, 3))),
        lambda: jax.jit(cross_entropy)(logits, labels),
    ):
        with pytest.raises(ValueError, match=r"logits: expected at least one example .*\(0, 3\)"):
            call()
    with pytest.raises(ValueError, match=r"logits: expected at least one example to score"):
        accuracy(jnp.zeros((2, 0, 3)), jnp.zeros((2, 0), jnp.int32))
    assert float(cross_entropy(logits, labels, reduction="sum")) == 0.0
    assert cross_entropy(logits, labels, reduction="none").shape == (0,)
