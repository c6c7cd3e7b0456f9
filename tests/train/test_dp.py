"""DP-SGD in fit: the private step against a materialized reference, epsilon per epoch, exact
resume, the run folder's record, and bad settings named."""

import json
import math
import shutil

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcnn import nn
from jcnn.analysis import dp_epsilon, replace_batch_norm
from jcnn.analysis.per_example import _add_gaussian_noise
from jcnn.data import Loader
from jcnn.train import CheckpointManager, RunFolderError, TrainConfig, TrainState, fit
from jcnn.train.dp import DPTraining, check_dp_config, dp_train_step

pytest.importorskip("dp_accounting")


def _model(dropout=0.0):
    layers = [nn.Conv(4, 3, stride=2), nn.Tanh(), nn.Flatten()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential([*layers, nn.Dense(3)])


def _data(rng, n=96):
    labels = rng.integers(0, 3, size=n).astype(np.int32)
    images = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
    images[np.arange(n), 2 * labels + 1, 2 * labels + 1, 0] += 4.0  # a learnable cue per class
    return images, labels


def _config(**kw):
    base = dict(
        epochs=2,
        optimizer="sgd",
        learning_rate=0.5,
        schedule="constant",
        progress=False,
        dp_noise_multiplier=1.0,
        dp_clip_norm=0.7,
        dp_delta=1e-3,
    )
    return TrainConfig(**{**base, **kw})


def _reference_gradient(
    model, params, images, labels, weights, key, step, clip, sigma, denom, only=None
):
    """Materialized per-example gradients (vmap of grad), clipped and summed in NumPy float64,
    plus the noise dp_train_step documents: the private gradient's noise (its own tests check
    its distribution) drawn with the key fold_in(fold_in(key, step), 1). ``only``: the gradient
    of ``params[only]`` alone, the other parameters held fixed."""

    def loss(p, x, y):
        full = p if only is None else {**params, only: p}
        logits = model.apply({"params": full}, x[None], train=True)
        return -jax.nn.log_softmax(logits[0])[y]

    differentiated = params if only is None else params[only]
    grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(differentiated, images, labels)
    leaves, treedef = jax.tree.flatten(grads)
    leaves = [np.asarray(g, np.float64) for g in leaves]
    norms = np.sqrt(sum(np.sum(g.reshape(len(images), -1) ** 2, axis=1) for g in leaves))
    factors = np.minimum(1.0, clip / norms) * weights
    noise_key = jax.random.wrap_key_data(jax.random.fold_in(jax.random.fold_in(key, step), 1))
    zeros = [jnp.zeros(g.shape[1:], jnp.float32) for g in leaves]
    pieces = [np.asarray(z, np.float64) for z in _add_gaussian_noise(noise_key, zeros, 1.0)]
    total = [
        (np.tensordot(factors, g, axes=1) + sigma * clip * z.reshape(g.shape[1:])) / denom
        for g, z in zip(leaves, pieces, strict=True)
    ]
    return jax.tree.unflatten(treedef, total), norms


@pytest.mark.parametrize("padded", [False, True])
def test_dp_step_equals_a_materialized_reference(rng, padded):
    n = 11
    images, labels = _data(rng, n)
    model = _model()
    lr, clip, sigma = 0.3, 3.0, 1.3
    state = TrainState.create(model, optax.sgd(lr), jax.random.PRNGKey(7), jnp.asarray(images[:1]))
    state = state.replace(step=jnp.asarray(5, jnp.int32))  # the noise depends on the step
    params = jax.tree.map(np.array, state.params)  # dp_train_step donates the state's buffers
    key = np.array(state.key)
    weights = np.ones(n)
    denominator = None
    if padded:  # a Poisson batch padded with examples weighted 0, divided by the expected size
        weights[[2, 7, 8]] = 0.0
        denominator = 9.5
    expected, norms = _reference_gradient(
        model, params, images, labels, weights, key, 5, clip, sigma, denominator or n
    )
    assert 0 < np.sum(norms > clip) < n  # some examples clipped, some not
    new_state, metrics, logits = dp_train_step(
        state,
        (jnp.asarray(images), jnp.asarray(labels)),
        None if not padded else jnp.asarray(weights, jnp.float32),
        None if not padded else jnp.float32(denominator),
        l2_norm_clip=clip,
        noise_multiplier=sigma,
    )
    jax.tree.map(
        lambda new, old, g: np.testing.assert_allclose(new, old - lr * g, rtol=2e-5, atol=2e-6),
        new_state.params,
        params,
        expected,
    )
    assert int(new_state.step) == 6
    real = weights > 0
    reference_logits = model.apply({"params": params}, images, train=True)
    np.testing.assert_allclose(logits, reference_logits, rtol=1e-5, atol=1e-6)
    losses = -np.take_along_axis(
        np.asarray(jax.nn.log_softmax(reference_logits)), labels[:, None], 1
    )
    np.testing.assert_allclose(metrics["loss"], losses[real].mean(), rtol=1e-5)
    hits = np.argmax(reference_logits, 1) == labels
    np.testing.assert_allclose(metrics["accuracy"], hits[real].mean(), rtol=1e-6)
    assert float(metrics["clipped_fraction"]) == pytest.approx(np.mean(norms[real] > clip))


def test_dp_step_without_the_gradient_of_some_parameters(rng):
    # The convolution's parameters are constants of the step: no per-example gradient, no noise,
    # no change; the dense layer's clipping norm counts its own gradient only.
    images, labels = _data(rng, 9)
    model = _model()
    lr, clip, sigma = 0.3, 3.5, 1.3
    state = TrainState.create(model, optax.sgd(lr), jax.random.PRNGKey(3), jnp.asarray(images[:1]))
    params = jax.tree.map(np.array, state.params)
    key = np.array(state.key)
    dense, conv = "layers_3", "layers_0"
    expected, norms = _reference_gradient(
        model, params, images, labels, np.ones(9), key, 0, clip, sigma, 9, only=dense
    )
    assert 0 < np.sum(norms > clip) < 9
    new_state, metrics, _ = dp_train_step(
        state,
        (jnp.asarray(images), jnp.asarray(labels)),
        l2_norm_clip=np.float32(clip),  # options as users write them: NumPy floats, a list
        noise_multiplier=sigma,
        no_grad=[f"{conv}/*"],
    )
    jax.tree.map(np.testing.assert_array_equal, new_state.params[conv], params[conv])
    jax.tree.map(
        lambda new, old, g: np.testing.assert_allclose(new, old - lr * g, rtol=2e-5, atol=2e-6),
        new_state.params[dense],
        params[dense],
        expected,
    )
    assert float(metrics["clipped_fraction"]) == pytest.approx(np.mean(norms > clip))


@pytest.mark.parametrize(
    "options, error, message",
    [
        (dict(l2_norm_clip=0.0), ValueError, "l2_norm_clip: expected a finite number > 0"),
        (dict(l2_norm_clip=jnp.ones(3)), TypeError, "l2_norm_clip"),
        (
            dict(noise_multiplier=-1.0),
            ValueError,
            "noise_multiplier: expected a finite number >= 0",
        ),
        (dict(no_grad="layers_0/*"), TypeError, "no_grad: expected a sequence of glob patterns"),
    ],
)
def test_bad_dp_step_options_are_named(rng, options, error, message):
    images, labels = _data(rng, 4)
    state = TrainState.create(_model(), optax.sgd(0.1), jax.random.PRNGKey(0), images[:1])
    with pytest.raises(error, match=message):
        dp_train_step(
            state, (images, labels), **{"l2_norm_clip": 1.0, "noise_multiplier": 1.0, **options}
        )


@pytest.mark.parametrize(
    "weights, denominator, message",
    [
        ([1.0, 2.0, 1.0, 0.0], 4.0, r"weights: expected values in \[0, 1\].* got 0.0 to 2.0"),
        ([1.0, -1.0, 1.0, 0.0], 4.0, r"weights: expected values in \[0, 1\]"),
        ([1.0, 1.0, 1.0, 0.0], 0.0, "denominator: expected a finite number > 0"),
        (None, -4.0, "denominator: expected a finite number > 0"),
        (None, math.inf, "denominator: expected a finite number > 0"),
        ([1.0, 1.0, 1.0, 0.0], [4.0, 4.0], r"denominator: expected a number .* shape \(2,\)"),
    ],
)
def test_bad_dp_step_weights_and_denominator_are_named(rng, weights, denominator, message):
    """Arguments of the jitted step, traced there: a weight of 2 (twice an example's influence)
    or a denominator of 0 (an infinite gradient) or -4 (a step uphill) went through silently."""
    images, labels = _data(rng, 4)
    state = TrainState.create(_model(), optax.sgd(0.1), jax.random.PRNGKey(0), images[:1])
    weights = None if weights is None else jnp.asarray(weights, jnp.float32)
    with pytest.raises(ValueError, match=message):
        dp_train_step(
            state,
            (images, labels),
            weights,
            jnp.asarray(denominator, jnp.float32),
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
        )


def test_epsilon_per_epoch_is_the_accountants_and_reaches_the_target(rng):
    images, labels = _data(rng)
    train = Loader(images, labels, batch_size=16, sampling="poisson", seed=4)

    def size(logits, labels):
        return jnp.float32(logits.shape[0])

    def loss(logits, labels):  # one loss per example, as fit accepts
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)[:, 0]

    config = _config(epochs=3, dp_noise_multiplier=None, dp_target_epsilon=20.0, max_steps=15)
    result = fit(_model(), train, None, config, loss=loss, metrics={"size": size})
    history, summary = result["history"], result["summary"]
    steps = [h["step"] for h in history]
    assert steps == [6, 12, 15]  # max_steps ends the run mid-epoch
    sigma = summary["dp_noise_multiplier"]
    eps = [h["epsilon"] for h in history]
    assert eps == [dp_epsilon(sigma, 16 / 96, s, 1e-3) for s in steps]
    assert eps[0] < eps[1] < eps[2] <= 20.0 and eps[2] > 19.0  # calibrated to the run's end
    assert summary["epsilon"] == eps[-1] and summary["dp_delta"] == 1e-3
    assert summary["dp_sampling"] == "poisson" and summary["dp_sampling_rate"] == 16 / 96
    assert all(0 <= h["train_clipped_fraction"] <= 1 for h in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    # the extra metric saw the real examples of each Poisson batch, not its padding
    sizes = [len(train.poisson_indices(0, s)) for s in range(len(train))]
    assert min(sizes) != max(sizes)
    sizes = np.array(sizes)  # a mean over examples: each batch's size weighted by that size
    assert history[0]["train_size"] == pytest.approx(sizes @ sizes / sizes.sum())


def test_resume_with_dp_is_bitwise_exact_and_other_dp_settings_are_refused(tmp_path, rng):
    images, labels = _data(rng, 64)
    train = Loader(images, labels, batch_size=16, sampling="poisson", seed=3)
    model = _model(dropout=0.3)
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    config = _config(out=str(full_dir), checkpoint_every_steps=3, keep_last=10)
    full = fit(model, train, None, config)
    assert CheckpointManager(full_dir / "checkpoints").steps() == [3, 4, 6, 8]
    recorded = json.loads((full_dir / "config.json").read_text())
    assert recorded["train"]["dp_noise_multiplier"] == 1.0
    assert recorded["train"]["dp_clip_norm"] == 0.7 and recorded["train"]["dp_delta"] == 1e-3
    assert recorded["train_loader"]["sampling"] == "poisson"
    shutil.copytree(full_dir, resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step_00000008")  # killed after step 6
    resumed_config = _config(
        out=str(resumed_dir), checkpoint_every_steps=3, keep_last=10, resume=True
    )
    resumed = fit(model, train, None, resumed_config)

    def without_time(history):
        return [
            {k: v for k, v in h.items() if k not in ("seconds", "images_per_second")}
            for h in history
        ]

    assert without_time(resumed["history"]) == without_time(full["history"])
    for x, y in zip(
        jax.tree.leaves(full["state"].arrays()),
        jax.tree.leaves(resumed["state"].arrays()),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    before = (resumed_dir / "config.json").read_text()
    for change, named in [
        (dict(dp_clip_norm=0.5), "dp_clip_norm: 0.7 in the run, 0.5 now"),
        (dict(dp_noise_multiplier=2.0), "dp_noise_multiplier"),
        (dict(dp_noise_multiplier=None, dp_target_epsilon=50.0), "dp_target_epsilon"),
        (dict(dp_delta=1e-4), "dp_delta"),
    ]:
        with pytest.raises(RunFolderError, match=named):
            fit(model, train, None, _config(out=str(resumed_dir), resume=True, **change))
    shuffled = Loader(images, labels, batch_size=16, seed=3)
    with pytest.raises(RunFolderError, match="train_loader.sampling"):
        fit(model, shuffled, None, _config(out=str(resumed_dir), resume=True))
    assert (resumed_dir / "config.json").read_text() == before
    # at a fixed noise multiplier a run may be extended: epsilon grows with the steps
    longer = fit(model, train, None, _config(out=str(resumed_dir), resume=True, epochs=3))
    assert [h["epsilon"] for h in longer["history"]] == [
        dp_epsilon(1.0, 0.25, s, 1e-3) for s in (4, 8, 12)
    ]


def test_target_epsilon_fixes_the_runs_length_on_resume(tmp_path, rng):
    images, labels = _data(rng, 32)
    train = Loader(images, labels, batch_size=16, seed=3)
    config = dict(dp_noise_multiplier=None, dp_target_epsilon=30.0, out=str(tmp_path))
    fit(_model(), train, None, _config(epochs=1, **config))
    # the constant schedule alone would allow more epochs; the noise was calibrated for one
    with pytest.raises(RunFolderError, match="epochs: 1 in the run, 2 now"):
        fit(_model(), train, None, _config(epochs=2, resume=True, **config))


@pytest.mark.parametrize(
    "settings, says",
    [
        (dict(dp_clip_norm=0.0), "config.dp_clip_norm: expected a finite number > 0, got 0.0"),
        (dict(dp_clip_norm=-1.0), "config.dp_clip_norm: expected a finite number > 0, got -1.0"),
        (dict(dp_clip_norm=float("inf")), "config.dp_clip_norm"),
        (
            dict(dp_noise_multiplier=-0.5),
            "config.dp_noise_multiplier: expected a finite number >= 0, got -0.5",
        ),
        (dict(dp_noise_multiplier="1"), "config.dp_noise_multiplier: expected a number, got '1'"),
        (dict(dp_delta=0.0), r"config.dp_delta: expected a number in \(0, 1\), got 0.0"),
        (dict(dp_delta=1.0), r"config.dp_delta: expected a number in \(0, 1\), got 1.0"),
        (dict(dp_delta=-1e-5), "config.dp_delta"),
        (
            dict(dp_noise_multiplier=None, dp_target_epsilon=0.0),
            "config.dp_target_epsilon: expected a finite number > 0, got 0.0",
        ),
        (dict(dp_target_epsilon=3.0), "give one, not both"),
        (dict(dp_accountant="moments"), "config.dp_accountant: expected one of rdp, pld"),
        (dict(devices=2), "config.devices: DP-SGD in fit runs on one device"),
        (
            dict(dp_noise_multiplier=None, dp_clip_norm=0.5, dp_delta=1e-5),
            "config.dp_clip_norm: applies to DP-SGD only",
        ),
        (
            dict(dp_noise_multiplier=None, dp_clip_norm=1.0),
            "config.dp_delta: applies to DP-SGD only",
        ),
        (  # True == 1.0, the default clip norm: it passed as unset
            dict(dp_noise_multiplier=None, dp_clip_norm=True, dp_delta=1e-5),
            "config.dp_clip_norm: applies to DP-SGD only",
        ),
    ],
)
def test_bad_dp_settings_are_named_and_write_nothing(tmp_path, rng, settings, says):
    images, labels = _data(rng, 32)
    train = Loader(images, labels, batch_size=16, seed=1)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=says):
        fit(_model(), train, None, _config(out=str(out), **settings))
    assert not out.exists() or not any(out.iterdir())


def test_a_target_epsilon_no_noise_reaches_is_named(rng):
    images, labels = _data(rng, 32)
    train = Loader(images, labels, batch_size=32, seed=1)  # every example in every step
    config = _config(dp_noise_multiplier=None, dp_target_epsilon=1e-4, epochs=4)
    with pytest.raises(ValueError, match="config.dp_target_epsilon: 0.0001 is not reached"):
        fit(_model(), train, None, config)


class _FlaxBatchNormNet(linen.Module):
    frozen: bool = False

    @linen.compact
    def __call__(self, x, train: bool):
        x = linen.Conv(4, (3, 3))(x)
        x = linen.BatchNorm(use_running_average=self.frozen or not train)(x)
        return linen.Dense(3)(jnp.mean(x, axis=(1, 2)))


def test_batch_norm_in_training_mode_is_refused_naming_the_ways_out(tmp_path, rng):
    images, labels = _data(rng, 32)
    train = Loader(images, labels, batch_size=16, seed=1)
    jcnn_bn = nn.Sequential([nn.Conv(4, 3), nn.BatchNorm(), nn.Flatten(), nn.Dense(3)])
    for model in (jcnn_bn, _FlaxBatchNormNet()):
        with pytest.raises(ValueError, match="BatchNorm") as error:
            fit(model, train, None, _config(out=str(tmp_path / "run")))
        message = str(error.value)
        assert "replace_batch_norm" in message and "train=False" in message
        assert "dp_noise_multiplier" in message and "\n" not in message
        assert not (tmp_path / "run" / "config.json").exists()
    # the ways out: GroupNorm instead (it trains), or statistics frozen by the model itself
    result = fit(replace_batch_norm(jcnn_bn), train, None, _config(epochs=1))
    assert np.isfinite(result["history"][0]["train_loss"])
    frozen = _FlaxBatchNormNet(frozen=True)
    state = TrainState.create(frozen, optax.sgd(0.1), jax.random.PRNGKey(0), images[:1])
    DPTraining.check_model(state, (images, labels))  # no error


class _TwoBatches:
    """The loader protocol over two batches of 16, without a batch size or a number of
    examples."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return 2

    def epoch(self, epoch, *, start_step=0):
        for step in range(start_step, 2):
            yield self.batch(epoch, step)

    def batch(self, epoch, step):
        return self.images[16 * step : 16 * step + 16], self.labels[16 * step : 16 * step + 16]


def test_loaders_dp_cannot_account_for_are_refused(rng):
    images, labels = _data(rng, 32)

    def mixing(key, x, y):
        return x[::-1], y

    mixed = Loader(images, labels, batch_size=16, batch_augment=mixing)
    with pytest.raises(ValueError, match="train_loader: its batch_augment mixes examples"):
        fit(_model(), mixed, None, _config())

    with pytest.raises(TypeError, match="train_loader: DP-SGD's accounting needs"):
        fit(_model(), _TwoBatches(images, labels), None, _config())


def test_a_loader_counting_in_numpy_ints_is_accounted_for(rng):
    # a custom loader whose batch_size and num_examples were NumPy ints was refused as lacking
    # them; its sampling rate is theirs
    images, labels = _data(rng, 32)

    class Counted(_TwoBatches):
        batch_size, num_examples = np.int64(16), np.int64(32)

    summary = fit(_model(), Counted(images, labels), None, _config(epochs=1))["summary"]
    assert summary["dp_sampling_rate"] == 0.5 and type(summary["dp_sampling_rate"]) is float
    Counted.batch_size = 16.0
    with pytest.raises(TypeError, match="as ints; Counted has batch_size=16.0, num_examples="):
        fit(_model(), Counted(images, labels), None, _config(epochs=1))


def test_dp_settings_take_0d_arrays_as_numbers_and_name_a_bad_devices():
    # a concrete 0-d JAX array (jnp.float32(1.1)) was refused as "expected a number", unlike
    # check_real and dp_epsilon; a str devices failed with a raw "'>' not supported"
    for settings in (
        dict(dp_noise_multiplier=jnp.float32(1.1), dp_clip_norm=jnp.float32(0.5)),
        dict(dp_noise_multiplier=None, dp_target_epsilon=jnp.asarray(3.0)),
        dict(dp_delta=jnp.float32(1e-4), devices=jnp.int32(1)),
    ):
        check_dp_config(_config(**settings))
    with pytest.raises(ValueError, match="config.dp_noise_multiplier: expected a finite number"):
        check_dp_config(_config(dp_noise_multiplier=jnp.float32(-1.0)))
    with pytest.raises(ValueError, match=r"config.dp_delta: expected a number in \(0, 1\)"):
        check_dp_config(_config(dp_delta=jnp.float32(2.0)))
    with pytest.raises(ValueError, match="config.dp_noise_multiplier: expected a number"):
        check_dp_config(_config(dp_noise_multiplier=jnp.ones(2)))
    with pytest.raises(ValueError, match="config.devices: DP-SGD in fit runs on one device"):
        check_dp_config(_config(devices=np.int64(2)))
    check_dp_config(_config(devices="2"))  # make_mesh names it


def test_a_model_that_updates_running_statistics_is_refused(tmp_path, rng):
    # InstanceNorm(track_running_stats=True) is per example (its gradients are fine), but its
    # running statistics were silently left at their initial values by the DP step, so the
    # evaluation normalized with mean 0, variance 1; updated, they would release private data
    # without noise.
    images, labels = _data(rng, 32)
    train = Loader(images, labels, batch_size=16, seed=1)
    tracked = nn.Sequential(
        [nn.Conv(4, 3), nn.InstanceNorm(track_running_stats=True), nn.Flatten(), nn.Dense(3)]
    )
    with pytest.raises(ValueError, match="model: DP-SGD .* updates running statistics") as error:
        fit(tracked, train, None, _config(out=str(tmp_path / "run")))
    assert "layers_1/mean" in str(error.value) and "track_running_stats=False" in str(error.value)
    assert not (tmp_path / "run" / "config.json").exists()
    state = TrainState.create(tracked, optax.sgd(0.1), jax.random.PRNGKey(0), images[:1])
    with pytest.raises(ValueError, match="state: dp_train_step .* updates running statistics"):
        dp_train_step(state, (images, labels), l2_norm_clip=1.0, noise_multiplier=1.0)
    untracked = nn.Sequential([nn.Conv(4, 3), nn.InstanceNorm(), nn.Flatten(), nn.Dense(3)])
    assert np.isfinite(fit(untracked, train, None, _config(epochs=1))["history"][0]["train_loss"])


def test_dp_step_names_labels_that_do_not_fit_the_logits_in_the_batchs_shapes(rng):
    # the check ran per example only, so the message named a batch of one: "(1, 3), got (1,)"
    images, labels = _data(rng, 6)
    state = TrainState.create(_model(), optax.sgd(0.1), jax.random.PRNGKey(0), images[:1])
    with pytest.raises(ValueError, match=r"labels: .*logits' shape \(6, 3\), got \(6,\)"):
        dp_train_step(
            state,
            (images, labels.astype(np.float32)),
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
        )


def test_dp_step_takes_a_typed_key_as_train_step_does(rng):
    # the noise key was wrapped with jax.random.wrap_key_data, which failed deep inside JAX
    # ("invalid PRNG key data") on a state holding a typed key
    images, labels = _data(rng, 6)
    model = _model(dropout=0.3)

    def step(key):
        state = TrainState.create(model, optax.sgd(0.1), jax.random.PRNGKey(0), images[:1])
        state = state.replace(key=key)
        new, _, _ = dp_train_step(state, (images, labels), l2_norm_clip=1.0, noise_multiplier=1.0)
        return jax.tree.leaves(new.params)

    for typed, raw in zip(step(jax.random.key(5)), step(jax.random.PRNGKey(5)), strict=True):
        np.testing.assert_array_equal(typed, raw)


def test_dp_step_takes_weights_as_a_list_and_names_weights_that_are_not_numbers(rng):
    # a list reached the jit as traced scalars (TracerArrayConversionError), and strings failed in
    # a NumPy comparison before their type was checked
    images, labels = _data(rng, 4)

    def step(weights):
        state = TrainState.create(_model(), optax.sgd(0.1), jax.random.PRNGKey(0), images[:1])
        new, _, _ = dp_train_step(
            state,
            (images, labels),
            weights=weights,
            denominator=3.0,
            l2_norm_clip=1.0,
            noise_multiplier=1.0,
        )
        return jax.tree.leaves(new.params)

    listed, array = step([1, 1, 0, 1]), step(np.array([1, 1, 0, 1], np.float32))
    for a, b in zip(listed, array, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(TypeError, match="weights: expected real numbers, got <U1"):
        step(["1", "1", "0", "1"])


def test_dp_step_on_an_empty_poisson_batch_applies_the_noise_alone(rng):
    # Poisson sampling draws empty batches; the step failed with an IndexError (its first
    # example's key)
    images, labels = _data(rng, 2)
    state = TrainState.create(_model(), optax.sgd(0.5), jax.random.PRNGKey(0), images[:1])
    params = jax.tree.map(np.array, state.params)
    empty = (images[:0], labels[:0])
    new, metrics, logits = dp_train_step(
        state, empty, np.zeros(0), 4.0, l2_norm_clip=1.0, noise_multiplier=1.0
    )
    assert logits.shape == (0, 3) and float(metrics["loss"]) == 0.0
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), new.params, params)
    assert all(
        0 < m < np.inf for m in jax.tree.leaves(moved)
    )  # noise only: sigma C / denominator per coordinate


def test_dp_step_accuracy_is_nan_for_labels_a_custom_loss_reads_its_own_way(rng):
    # labels (N, 2), the class and a weight: F.accuracy refused them inside the vmapped step
    def weighted(logits, labels):
        picked = jax.nn.log_softmax(logits)[jnp.arange(logits.shape[0]), labels[:, 0].astype(int)]
        return -labels[:, 1] * picked

    images, classes = _data(rng, 8)
    labels = np.stack([classes, rng.uniform(0.5, 2, 8)], axis=1).astype(np.float32)
    state = TrainState.create(_model(), optax.sgd(0.1), jax.random.PRNGKey(0), images[:1])
    options = dict(l2_norm_clip=1.0, noise_multiplier=0.0, loss_fn=weighted)
    _, metrics, logits = dp_train_step(state, (images, labels), **options)
    assert np.isnan(metrics["accuracy"])
    expected = np.mean(np.asarray(weighted(logits, jnp.asarray(labels))))
    assert float(metrics["loss"]) == pytest.approx(expected, rel=1e-5)
