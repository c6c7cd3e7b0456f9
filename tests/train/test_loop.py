"""fit(): run folder, learning, NaN stop and exact resume from a mid-epoch checkpoint."""

import csv
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcnn.data import Loader
from jcnn.train import (
    BestCheckpoint,
    Callback,
    CheckpointManager,
    EarlyStopping,
    NonFiniteLossError,
    TrainConfig,
    TrainState,
    fit,
    load_run,
    loop,
    split_validation,
)
from jcnn.train.loop import build_schedule

ROOT = Path(__file__).resolve().parents[2]


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), strides=2)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.Dropout(0.2, deterministic=not train)(jnp.mean(nn.relu(x), axis=(1, 2)))
        return nn.Dense(3)(x)


def _data(rng, n=64, poison_batch=None, batch_size=16):
    labels = rng.integers(0, 3, size=n).astype(np.int32)
    images = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
    images[np.arange(n), 2 * labels + 1, 2 * labels + 1, 0] += 4.0  # a learnable cue per class
    if poison_batch is not None:
        images[poison_batch * batch_size, 0, 0, 0] = np.nan
    return images, labels


def _loaders(images, labels, shuffle=True):
    train = Loader(images, labels, batch_size=16, shuffle=shuffle, seed=3)
    val = Loader(images, labels, batch_size=32, shuffle=False, drop_remainder=False)
    return train, val


def _config(out, **kw):
    base = dict(
        epochs=2,
        optimizer="adam",
        learning_rate=0.02,
        schedule="cosine",
        out=str(out),
        progress=False,
        keep_last=10,
    )
    return TrainConfig(**{**base, **kw})


def _metrics(history):
    return [
        {k: v for k, v in h.items() if k not in ("seconds", "images_per_second")} for h in history
    ]


def test_fit_writes_the_run_folder_and_learns(tmp_path, rng):
    train, val = _loaders(*_data(rng))
    result = fit(TinyNet(), train, val, _config(tmp_path, epochs=3))
    history = result["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert [h["step"] for h in history] == [4, 8, 12]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert history[-1]["learning_rate"] == pytest.approx(0.0, abs=1e-9)  # cosine reached T
    assert json.loads((tmp_path / "history.json").read_text()) == history
    with open(tmp_path / "history.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["val_accuracy"]) for r in rows] == [h["val_accuracy"] for h in history]
    for name in ("config.json", "curves.png", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_val_accuracy"] == max(h["val_accuracy"] for h in history)
    assert CheckpointManager(tmp_path / "checkpoints").steps() == [4, 8, 12]


def test_resume_from_mid_epoch_checkpoint_is_bitwise_exact(tmp_path, rng):
    train, val = _loaders(*_data(rng))
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full = fit(TinyNet(), train, val, _config(full_dir, checkpoint_every_steps=3))
    assert CheckpointManager(full_dir / "checkpoints").steps() == [3, 4, 6, 8]
    shutil.copytree(full_dir, resumed_dir)
    for step in (8,):  # as if killed after step 6 (epoch 2, batch 2) was saved
        shutil.rmtree(resumed_dir / "checkpoints" / f"step_{step:08d}")
    resumed = fit(
        TinyNet(), train, val, _config(resumed_dir, checkpoint_every_steps=3, resume=True)
    )
    assert _metrics(resumed["history"]) == _metrics(full["history"])
    a, b = full["state"], resumed["state"]
    for x, y in zip(jax.tree.leaves(a.arrays()), jax.tree.leaves(b.arrays()), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoints_every_n_steps_include_the_steps_that_end_an_epoch(tmp_path, rng):
    # a step save was made only mid-epoch: with epoch saves off, steps 4 and 8 (epoch ends) were
    # skipped, so a crash at step 5 resumed from step 2
    train, _ = _loaders(*_data(rng))  # 4 steps per epoch
    config = _config(tmp_path, epochs=3, checkpoint_every_epochs=0, checkpoint_every_steps=2)
    fit(TinyNet(), train, None, config)
    assert CheckpointManager(tmp_path / "checkpoints").steps() == [2, 4, 6, 8, 10, 12]


def test_label_smoothing_trains_and_evaluations_report_the_plain_cross_entropy(rng):
    images, labels = _data(rng)
    train, val = _loaders(images, labels)
    result = fit(TinyNet(), train, val, _quiet(label_smoothing=0.3, schedule="constant"))
    state = result["state"]
    logits = state.apply_fn(state.variables(), jnp.asarray(images), train=False)
    plain = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    assert result["history"][0]["val_loss"] == pytest.approx(float(plain), rel=1e-5)


def test_extending_a_run_stopped_mid_epoch_equals_the_longer_run(tmp_path, rng):
    train, val = _loaders(*_data(rng))
    full = fit(TinyNet(), train, val, _config(tmp_path / "full", schedule="constant"))
    out = tmp_path / "extended"
    short = fit(TinyNet(), train, val, _config(out, schedule="constant", max_steps=6))
    assert [(h["epoch"], h["step"]) for h in short["history"]] == [(1, 4), (2, 6)]
    extended = fit(TinyNet(), train, val, _config(out, schedule="constant", resume=True))
    assert [(h["epoch"], h["step"]) for h in extended["history"]] == [(1, 4), (2, 8)]
    assert _metrics(extended["history"]) == _metrics(full["history"])
    assert json.loads((out / "history.json").read_text()) == extended["history"]
    a, b = full["state"], extended["state"]
    for x, y in zip(jax.tree.leaves(a.arrays()), jax.tree.leaves(b.arrays()), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, rng):
    train, val = _loaders(*_data(rng, poison_batch=2), shuffle=False)
    with pytest.raises(
        NonFiniteLossError,
        match=r"non-finite loss \(nan\) at step 3 \(epoch 1, "
        r"batch 3\).*last good checkpoint: step 2",
    ):
        fit(TinyNet(), train, val, _config(tmp_path, checkpoint_every_steps=1))
    manager = CheckpointManager(tmp_path / "checkpoints")
    assert manager.latest_step() == 2


def test_a_non_finite_loss_from_non_finite_data_says_so(tmp_path, rng):
    # the message read as a diverged run ("training stopped"), with nothing to say that the batch
    # itself held a NaN; a loss gone NaN on finite data says nothing of the data
    train, val = _loaders(*_data(rng, poison_batch=2), shuffle=False)
    with pytest.raises(NonFiniteLossError, match=r"batch 3\).*holds NaN or infinite values"):
        fit(TinyNet(), train, val, _config(tmp_path / "poisoned"))
    train, val = _loaders(*_data(rng), shuffle=False)
    with pytest.raises(NonFiniteLossError) as error:
        fit(TinyNet(), train, val, _config(tmp_path / "diverged", learning_rate=1e38))
    assert "NaN or infinite values" not in str(error.value)


def test_build_schedule_converts_epochs_to_steps():
    config = TrainConfig(
        epochs=10, learning_rate=1.0, schedule="step", step_epochs=(3, 6), warmup_epochs=1
    )
    schedule = build_schedule(config, steps_per_epoch=5)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == 1.0
    # step_epochs count from the end of the warmup (as documented): epoch 3 is step 5 + 15
    assert float(schedule(5 + 15 - 1)) == 1.0
    assert float(schedule(5 + 15)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="config.schedule"):
        build_schedule(TrainConfig(schedule="warp"), 5)


def test_build_schedule_puts_fractional_step_epochs_on_their_step():
    # 0.29 * 100 is 28.999999999999996 in floats: the drop must still come at step 29
    for epoch, steps_per_epoch, boundary in ((0.29, 100, 29), (0.57, 100, 57), (1.15, 100, 115)):
        config = TrainConfig(epochs=2, learning_rate=1.0, schedule="step", step_epochs=(epoch,))
        schedule = build_schedule(config, steps_per_epoch=steps_per_epoch)
        assert float(schedule(boundary - 1)) == 1.0
        assert float(schedule(boundary)) == pytest.approx(0.1)
    # a boundary between two steps still falls on the step before it, as before
    config = TrainConfig(epochs=2, learning_rate=1.0, schedule="step", step_epochs=(1.5,))
    schedule = build_schedule(config, steps_per_epoch=3)
    assert float(schedule(3)) == 1.0 and float(schedule(4)) == pytest.approx(0.1)


def test_bad_config_is_named(rng):
    train, val = _loaders(*_data(rng))
    with pytest.raises(TypeError, match="config"):
        fit(TinyNet(), train, val, {"epochs": 1})
    with pytest.raises(ValueError, match="config.epochs"):
        fit(TinyNet(), train, val, TrainConfig(epochs=0, progress=False))


@pytest.mark.parametrize(
    "setting, value, error",
    [
        ("checkpoint_every_steps", -1, ValueError),
        ("checkpoint_every_steps", 1.5, TypeError),
        ("checkpoint_every_steps", True, TypeError),
        ("checkpoint_every_epochs", -1, ValueError),
        ("checkpoint_every_epochs", 0.5, TypeError),
        ("checkpoint_every_epochs", 1.0, TypeError),
        ("eval_every_steps", -1, ValueError),
        ("eval_every_steps", 2.0, TypeError),
        ("eval_every_steps", True, TypeError),
        ("keep_last", 0, ValueError),
        ("seed", 1.5, TypeError),
        ("val_split_seed", -1, ValueError),
        ("label_smoothing", -0.5, ValueError),
        ("resume", "no", TypeError),
        ("progress", "no", TypeError),
        ("warmup_epochs", -1.0, ValueError),
        ("warmup_epochs", float("nan"), ValueError),
        ("warmup_epochs", "1", TypeError),
        ("step_epochs", 3, TypeError),
        ("step_epochs", np.array(3), TypeError),  # failed in len() or iter(), naming nothing
        ("step_epochs", (-1,), ValueError),
        ("step_epochs", (2, 1), ValueError),
        ("step_factor", -1.0, ValueError),
        ("decay_rate", -1.0, ValueError),
        ("out", 3, TypeError),
        ("monitor", None, TypeError),
        ("monitor", 3, TypeError),
        # a wrong type was a ValueError, as a wrong value
        ("monitor_mode", None, TypeError),
        ("schedule", None, TypeError),
        ("compute_dtype", 16, TypeError),
        ("devices", 0, ValueError),
        ("devices", [], ValueError),
        ("devices", 1.5, TypeError),
        ("learning_rate", lambda t: -0.1 + 0.0 * t, ValueError),
        ("learning_rate", lambda t: "fast", TypeError),
    ],
)
def test_bad_settings_are_named_before_anything_is_written(tmp_path, rng, setting, value, error):
    train, val = _loaders(*_data(rng))
    out = tmp_path / "run"
    schedule = {"step_epochs": "step", "step_factor": "step", "decay_rate": "exponential"}
    config = _config(out, schedule=schedule.get(setting, "cosine"))
    config = dataclasses.replace(config, **{setting: value})
    with pytest.raises(error, match=rf"config\.{setting}\b.*: expected .*, got "):
        fit(TinyNet(), train, val, config)
    assert not out.exists()


def test_a_refused_overwrite_keeps_the_old_run(tmp_path, rng):
    train, val = _loaders(*_data(rng))
    fit(TinyNet(), train, val, _config(tmp_path, epochs=1))
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(ValueError, match="config.keep_last: expected a positive int, got 0"):
        fit(TinyNet(), train, val, _config(tmp_path, epochs=1, overwrite=True, keep_last=0))
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("learning_rate", [1e4, 1e15])
def test_nan_stop_names_only_a_checkpoint_whose_parameters_gave_a_finite_loss(
    tmp_path, rng, learning_rate
):
    """A huge rate: parameters blow up (to ~1e30 or to inf) before the loss turns NaN; the
    checkpoints saved after the blow-up must never be called good."""
    import re

    from jcnn.train.state import TrainState
    from jcnn.train.steps import eval_step, train_step

    images, labels = _data(rng)
    train, val = _loaders(images, labels)
    config = _config(
        tmp_path,
        optimizer="sgd",
        learning_rate=learning_rate,
        schedule="constant",
        checkpoint_every_steps=1,
        epochs=3,
    )
    with pytest.raises(NonFiniteLossError) as error:
        fit(TinyNet(), train, val, config)
    message = str(error.value)
    stop = int(re.search(r"at step (\d+)", message).group(1))
    manager = CheckpointManager(tmp_path / "checkpoints")
    named = re.search(r"last good checkpoint: step (\d+)", message)
    good = int(named.group(1)) if named else None
    if good is None:
        assert "no checkpoint is known good" in message
    after = [s for s in manager.steps() if good is None or s > good]
    assert after and all(manager.status(s) == "bad" for s in after)
    # the class of the issue: finite (huge) parameters whose loss is already NaN
    finite_but_diverged = [s for s in after if not manager.manifest(s)["non_finite"]]
    if learning_rate == 1e15:
        assert finite_but_diverged
    if good is None:
        return
    assert good < stop and manager.status(good) == "good"
    template = TrainState.create(
        TinyNet(), _optimizer_of(config), jax.random.PRNGKey(0), jnp.asarray(images[:1])
    )
    state, _ = manager.restore(template, step=good)
    for leaf in jax.tree.leaves(state.arrays()):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert bool(jnp.isfinite(leaf).all())
    batch = train.batch(good // len(train), good % len(train))  # the step after the checkpoint
    assert np.isfinite(float(eval_step(state, batch)["loss"]))
    _, metrics = train_step(state, batch)
    assert np.isfinite(float(metrics["loss"]))


def _optimizer_of(config):
    from jcnn.train.loop import build_schedule
    from jcnn.train.optim import optimizer

    return optimizer(config.optimizer, build_schedule(config, 4))


# --- an open engine: optax optimizers, schedules, losses, metrics, limits, validation split ---


def _final_params(result):
    return [np.asarray(p) for p in jax.tree.leaves(result["state"].params)]


def _quiet(**kw):
    return TrainConfig(**{"epochs": 1, "progress": False, **kw})


def test_any_optax_optimizer_and_learning_rate_forms(rng):
    # the model is no matter here: _FlatNet's step compiles in about half TinyNet's time
    train, _ = _loaders(*_data(rng, n=48))
    named = fit(
        _FlatNet(), train, None, _quiet(optimizer="sgd", learning_rate=0.1, schedule="constant")
    )
    assert named["history"][0]["learning_rate"] == pytest.approx(0.1)
    for config in (
        _quiet(optimizer=optax.sgd(0.1)),
        _quiet(optimizer="sgd", learning_rate=lambda step: 0.1),
        _quiet(optimizer="sgd", learning_rate=np.float32(0.1), schedule="constant"),
    ):
        other = fit(_FlatNet(), train, None, config)
        for a, b in zip(_final_params(named), _final_params(other), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        if isinstance(config.optimizer, optax.GradientTransformation):
            assert other["history"][0]["learning_rate"] is None  # the optimizer's own, unknown


def test_a_schedule_written_for_optax_counts_is_logged_at_each_epoch(rng):
    # Optax calls a schedule with an int32 array; the epoch's record (and the progress bar)
    # must ask it the same way, not with a Python int it has no .astype for
    train, _ = _loaders(*_data(rng, n=48))
    decay = lambda count: 0.1 / (1 + count.astype(jnp.float32))  # noqa: E731
    result = fit(_FlatNet(), train, None, _quiet(optimizer="sgd", learning_rate=decay))
    assert result["history"][0]["learning_rate"] == pytest.approx(0.1 / 4)  # after 3 steps


def test_bad_optimizer_and_learning_rate_are_named(rng):
    train, _ = _loaders(*_data(rng, n=48))
    with pytest.raises(TypeError, match=r"config.optimizer: expected a name .* or an optax"):
        fit(TinyNet(), train, None, _quiet(optimizer=3))
    with pytest.raises(ValueError, match="config.optimizer: expected one of|name"):
        fit(TinyNet(), train, None, _quiet(optimizer="adamax"))
    with pytest.raises(TypeError, match="config.learning_rate: expected a number or a schedule"):
        fit(TinyNet(), train, None, _quiet(learning_rate="fast"))
    with pytest.raises(ValueError, match="config.learning_rate: expected a finite number"):
        fit(TinyNet(), train, None, _quiet(learning_rate=float("nan")))
    for schedule in ("constant", "cosine", "one_cycle"):  # not the schedule's infinite rate
        with pytest.raises(ValueError, match=r"learning_rate: .* float32's range .*1e\+308"):
            fit(TinyNet(), train, None, _quiet(learning_rate=1e308, schedule=schedule))
    with pytest.raises(ValueError, match="weight_decay and clip_norm"):
        fit(TinyNet(), train, None, _quiet(optimizer=optax.sgd(0.1), weight_decay=1e-4))


def test_a_model_fit_cannot_train_is_named_before_the_loader():
    # an NNX model's data is often a plain list of batches: fit reported the list ("train_loader:
    # expected a loader ...") and only after a fix of it the model
    from flax import nnx

    from jcnn import nnx as jnnx

    batches = [(np.zeros((2, 4), np.float32), np.zeros(2, np.int32))]
    for model, says in (
        (jnnx.Dense(4, 2, rngs=nnx.Rngs(0)), "got the NNX module Dense"),
        (TinyNet, "got the class TinyNet"),
        (lambda x, train: x, "expected a Flax module, got function"),
    ):
        with pytest.raises(TypeError, match=f"^model: .*{says}"):
            fit(model, batches, None, _quiet())


def test_clip_value_clips_each_entry_before_clip_norm(rng):
    # TrainConfig had clip_norm only: clip_value was reachable through optimizer() alone
    train, _ = _loaders(*_data(rng, n=48))
    sgd = dict(optimizer="sgd", learning_rate=1.0, schedule="constant", max_steps=1)

    class Start(Callback):
        def on_train_begin(self, run):
            self.params = [np.asarray(p) for p in jax.tree.leaves(run.state.params)]

    start = Start()
    clipped = fit(_FlatNet(), train, None, _quiet(**sgd, clip_value=1e-4, callbacks=(start,)))
    for before, after in zip(start.params, _final_params(clipped), strict=True):
        moved = np.abs(after - before)
        assert moved.max() <= 1e-4 * (1 + 1e-3) and moved.max() > 0.5e-4
    both = _quiet(**sgd, clip_value=1e-4, clip_norm=1e-5)
    reference = optax.chain(optax.clip(1e-4), optax.clip_by_global_norm(1e-5), optax.sgd(1.0))
    theirs = _quiet(optimizer=reference, max_steps=1)
    for a, b in zip(
        _final_params(fit(_FlatNet(), train, None, both)),
        _final_params(fit(_FlatNet(), train, None, theirs)),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="named optimizers only, as does clip_value"):
        fit(_FlatNet(), train, None, _quiet(optimizer=optax.sgd(0.1), clip_value=1.0))


@pytest.mark.parametrize(
    "setting, error, says",
    [
        (dict(optimizer="adamax"), ValueError, "config.optimizer: expected one of sgd"),
        (dict(weight_decay=-1.0), ValueError, "config.weight_decay: expected a finite number >= 0"),
        (dict(optimizer="momentum", momentum=1.5), ValueError, r"config.momentum: .* \[0, 1\)"),
        (dict(clip_norm=0.0), ValueError, "config.clip_norm: expected a finite number > 0"),
        (dict(clip_value=-1.0), ValueError, "config.clip_value: expected a finite number > 0"),
        (dict(clip_value=float("inf")), ValueError, "config.clip_value: expected a finite"),
        (dict(clip_value="1"), TypeError, "config.clip_value: expected a finite number > 0"),
        (dict(standardize="z"), ValueError, "config.standardize: expected one of 'per_channel'"),
        (dict(standardize=1), TypeError, "config.standardize: expected one of 'per_channel'"),
    ],
)
def test_a_bad_optimizer_or_standardize_setting_names_the_config_field(rng, setting, error, says):
    # fit's user writes TrainConfig fields: a message naming optimizer()'s own argument ("name",
    # "weight_decay") or Standardize.fit's ("mode") did not say which field to fix
    train, _ = _loaders(*_data(rng, n=48))
    with pytest.raises(error, match=says):
        fit(TinyNet(), train, None, _quiet(**setting))


def test_custom_loss_per_example_or_mean_equals_cross_entropy(rng):
    # the model is no matter here: _FlatNet's step compiles in about half TinyNet's time
    train, val = _loaders(*_data(rng, n=48))
    base = _quiet(optimizer="sgd", learning_rate=0.1, schedule="constant")
    default = fit(_FlatNet(), train, val, base)

    def per_example(logits, labels):
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels)

    def mean(logits, labels):
        return jnp.mean(per_example(logits, labels))

    for loss in (per_example, mean):
        custom = fit(_FlatNet(), train, val, base, loss=loss)
        for a, b in zip(_final_params(default), _final_params(custom), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert custom["history"][0]["val_loss"] == pytest.approx(
            default["history"][0]["val_loss"], rel=1e-5
        )

    # a squared-error loss really is used (the history's loss is its value, not cross-entropy)
    def squared(logits, labels):
        return jnp.sum((jax.nn.softmax(logits) - jax.nn.one_hot(labels, 3)) ** 2, axis=-1)

    result = fit(_FlatNet(), train, val, _quiet(loss=squared))
    assert 0 < result["history"][0]["val_loss"] < 2  # bounded, unlike cross-entropy


def test_bad_loss_is_named(rng):
    train, _ = _loaders(*_data(rng, n=48))

    def table_loss(logits, labels):
        return jnp.square(logits)

    with pytest.raises(ValueError, match=r"loss .*table_loss.*shape \(16,\).*got shape \(16, 3\)"):
        fit(TinyNet(), train, None, _quiet(), loss=table_loss)

    def int_loss(logits, labels):
        return labels

    with pytest.raises(TypeError, match="loss .*int_loss.*floating"):
        fit(TinyNet(), train, None, _quiet(), loss=int_loss)
    with pytest.raises(TypeError, match="loss: expected a callable"):
        fit(TinyNet(), train, None, _quiet(), loss="mse")
    with pytest.raises(ValueError, match="label_smoothing"):
        fit(TinyNet(), train, None, _quiet(label_smoothing=0.1), loss=lambda z, y: z[:, 0])
    with pytest.raises(ValueError, match="loss: given both to fit and in TrainConfig"):
        fit(TinyNet(), train, None, _quiet(loss=table_loss), loss=int_loss)


def test_extra_metrics_are_recorded_and_exact(rng):
    images, labels = _data(rng, n=48)
    train = Loader(images, labels, batch_size=16, seed=3)
    val = Loader(images[:40], labels[:40], batch_size=16, shuffle=False, drop_remainder=False)

    def top2(logits, labels):
        top = jnp.argsort(logits, axis=-1)[:, -2:]
        return jnp.mean(jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32))

    result = fit(TinyNet(), train, val, _quiet(metrics={"top2": top2}))
    record = result["history"][0]
    assert {"train_top2", "val_top2"} <= record.keys()
    state = result["state"]
    logits = np.asarray(state.apply_fn(state.variables(), images[:40], train=False))
    expected = np.mean([labels[i] in np.argsort(logits[i])[-2:] for i in range(40)])
    assert record["val_top2"] == pytest.approx(expected, abs=1e-6)  # weighted over 16+16+8


def test_bad_metrics_are_named(rng):
    train, val = _loaders(*_data(rng, n=48))
    with pytest.raises(ValueError, match=r"metric 'margin'.*expected a scalar.*shape \(16,\)"):
        fit(TinyNet(), train, val, _quiet(), metrics={"margin": lambda z, y: z[:, 0]})
    with pytest.raises(ValueError, match="'loss' is computed already"):
        fit(TinyNet(), train, val, _quiet(), metrics={"loss": lambda z, y: z.sum()})
    with pytest.raises(ValueError, match="identifiers"):
        fit(TinyNet(), train, val, _quiet(), metrics={"top 2": lambda z, y: z.sum()})
    with pytest.raises(TypeError, match=r"metrics\['f1'\]: expected a callable"):
        fit(TinyNet(), train, val, _quiet(), metrics={"f1": 0.5})
    with pytest.raises(TypeError, match="metrics: expected a dict"):
        fit(TinyNet(), train, val, _quiet(), metrics=[len])
    with pytest.raises(ValueError, match="config.monitor: expected one of"):
        fit(TinyNet(), train, val, _quiet(monitor="val_f1"))


def test_max_steps_and_evaluation_every_n_steps(tmp_path, rng):
    train, val = _loaders(*_data(rng))  # 4 steps per epoch
    result = fit(
        TinyNet(), train, val, _config(tmp_path, epochs=3, max_steps=6, eval_every_steps=3)
    )
    assert [h["step"] for h in result["history"]] == [4, 6]
    assert [e["step"] for e in result["evaluations"]] == [3, 4, 6]
    assert [e["epoch"] for e in result["evaluations"]] == [1, 1, 2]
    assert result["history"][-1]["learning_rate"] == pytest.approx(0.0, abs=1e-9)  # horizon 6
    assert int(result["state"].step) == 6
    assert CheckpointManager(tmp_path / "checkpoints").latest_step() == 6
    assert json.loads((tmp_path / "evaluations.json").read_text()) == result["evaluations"]
    assert result["history"][-1]["val_loss"] == result["evaluations"][-1]["val_loss"]
    # resuming the finished run trains no further
    again = fit(
        TinyNet(),
        train,
        val,
        _config(tmp_path, epochs=3, max_steps=6, eval_every_steps=3, resume=True),
    )
    assert _metrics(again["history"]) == _metrics(result["history"])
    with pytest.raises(ValueError, match="config.max_steps"):
        fit(TinyNet(), train, val, _quiet(max_steps=0))
    with pytest.raises(ValueError, match="config.eval_every_steps"):
        fit(TinyNet(), train, val, _quiet(eval_every_steps=-1))


class _NoBatch:
    def __len__(self):
        return 1

    def epoch(self, epoch, *, start_step=0):
        return iter(())


class _NoStartStep(_NoBatch):
    def epoch(self, epoch):
        return iter(())

    def batch(self, epoch, step):
        return None


class _Minimal(_NoBatch):
    def batch(self, epoch, step):
        return None


def test_loader_protocol_is_checked_in_full(rng):
    with pytest.raises(TypeError, match=r"_NoBatch lacks batch\(epoch, step\)$"):
        fit(TinyNet(), _NoBatch(), None, _quiet())
    with pytest.raises(TypeError, match="lacks the start_step keyword"):
        fit(TinyNet(), _NoStartStep(), None, _quiet())
    with pytest.raises(
        TypeError, match=r"object lacks len\(\) .*epoch\(epoch.*batch\(epoch, step\)"
    ):
        fit(TinyNet(), object(), None, _quiet())
    train, _ = _loaders(*_data(rng, n=48))
    with pytest.raises(TypeError, match="val_loader: expected a loader with epoch"):
        fit(TinyNet(), train, 3, _quiet())
    from jcnn.train import TrainLoader

    assert isinstance(train, TrainLoader) and not isinstance(_NoBatch(), TrainLoader)


def test_an_empty_evaluation_loader_is_refused_before_training(tmp_path, rng):
    train, val = _loaders(*_data(rng))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"val_loader: expected at least one .* batch, got none"):
        fit(TinyNet(), train, [], _config(out))
    with pytest.raises(ValueError, match=r"test_loader: expected at least one .* batch"):
        fit(TinyNet(), train, val, _config(out), test_loader=())
    assert not out.exists()


def _uint8_data(rng, n):
    images, labels = _data(rng, n=n)
    return (images * 20 + 100).clip(0, 255).astype(np.uint8), labels


def test_pca_standardization_with_a_convolutional_model_is_named(tmp_path, rng):
    # "pca" feeds the model vectors: TinyNet's first convolution refused them naming x, an
    # argument the user never passed
    images, labels = _data(rng, 32)
    out = tmp_path / "run"
    with pytest.raises(
        ValueError,
        match=r"^config.standardize: 'pca' gives the model each image as a vector of its 64 "
        r"principal components, shape \(16, 64\), .*'zca' whitens them",
    ):
        fit(TinyNet(), Loader(images, labels, batch_size=16), None, _config(out, standardize="pca"))
    assert not out.exists()


def test_integer_images_the_model_refuses_point_to_standardize(tmp_path, rng):
    import jcnn

    model = jcnn.nn.Sequential([jcnn.nn.Conv(4, 3), jcnn.nn.GlobalAvgPool(), jcnn.nn.Dense(3)])
    images, labels = _uint8_data(rng, 32)
    out = tmp_path / "run"
    with pytest.raises(
        TypeError, match=r"^train_loader: its images are uint8, .*set config.standardize"
    ):
        fit(model, Loader(images, labels, batch_size=16), None, _config(out))
    assert not out.exists()


def test_validation_split_is_carved_before_standardization(tmp_path, rng):
    images, labels = _uint8_data(rng, 80)
    test_images, test_labels = _uint8_data(rng, 24)
    train = Loader(images, labels, batch_size=16, seed=3)
    test = Loader(test_images, test_labels, batch_size=24, shuffle=False)
    config = _config(tmp_path, val_split=0.2, val_split_seed=7, standardize="per_channel")
    result = fit(TinyNet(), train, None, config, test_loader=test)
    (kept, _), (held_out, held_labels) = split_validation(images, labels, 16, seed=7)
    assert len(kept) == 64 and len(held_out) == 16
    stats = result["standardize"]
    pixels = kept.astype(np.float64)  # statistics of the 64 remaining training images only
    np.testing.assert_allclose(stats.mean, [pixels.mean()], rtol=1e-6)
    np.testing.assert_allclose(stats.scale, [pixels.std()], rtol=1e-6)
    assert [h["step"] for h in result["history"]] == [4, 8]  # 64 / 16 batches per epoch
    # the validation metrics are those of the held-out images, standardized with those statistics
    state = result["state"]
    logits = state.apply_fn(state.variables(), stats(held_out), train=False)
    accuracy = float(np.mean(np.asarray(logits).argmax(-1) == held_labels))
    assert result["history"][-1]["val_accuracy"] == pytest.approx(accuracy)
    assert all(not k.startswith("test_") for k in result["history"][-1])
    summary = json.loads((tmp_path / "summary.json").read_text())
    logits = state.apply_fn(state.variables(), stats(test_images), train=False)
    assert summary["test_accuracy"] == pytest.approx(
        float(np.mean(np.asarray(logits).argmax(-1) == test_labels))
    )
    assert summary["final_val_accuracy"] == result["history"][-1]["val_accuracy"]
    # the best checkpoint is chosen on validation accuracy
    manager = CheckpointManager(tmp_path / "checkpoints")
    best = max(result["history"], key=lambda h: (h["val_accuracy"], h["step"]))
    assert manager.best_step() == best["step"]
    # the same seed carves the same split; another seed another one
    (_, _), (again, _) = split_validation(images, labels, 0.2, seed=7)
    (_, _), (other, _) = split_validation(images, labels, 0.2, seed=8)
    np.testing.assert_array_equal(again, held_out)
    assert not np.array_equal(other, held_out)


def test_test_every_epoch_is_labelled_test(rng):
    images, labels = _uint8_data(rng, 48)
    train = Loader(images, labels, batch_size=16, seed=3)
    test = Loader(images[:16], labels[:16], batch_size=16, shuffle=False)
    result = fit(
        TinyNet(),
        train,
        None,
        _quiet(standardize="center", test_every_epoch=True),
        test_loader=test,
    )
    record = result["history"][0]
    assert record["val_loss"] is None and record["test_loss"] is not None
    assert result["summary"]["test_accuracy"] == record["test_accuracy"]
    assert result["summary"]["best_val_accuracy"] is None  # the test set chose nothing


def test_bad_validation_splits_are_named_and_write_nothing(tmp_path, rng):
    images, labels = _uint8_data(rng, 48)
    train = Loader(images, labels, batch_size=16, seed=3)
    out = tmp_path / "run"
    for split, pattern in (
        (48, "asks for 48 validation examples, but the training set has only 48"),
        (100, "asks for 100 validation examples, but the training set has only 48"),
        (1.0, r"expected a fraction in \(0, 1\)"),
        (0, "expected a count >= 1"),
        (40, "leaves 8 training examples, fewer than the batch size 16"),
    ):
        with pytest.raises(ValueError, match=pattern):
            fit(TinyNet(), train, None, _config(out, val_split=split))
    with pytest.raises(TypeError, match="val_split: expected a count"):
        fit(TinyNet(), train, None, _config(out, val_split="10%"))
    with pytest.raises(ValueError, match="also given a val_loader"):
        fit(TinyNet(), train, train, _config(out, val_split=8))
    with pytest.raises(TypeError, match="needs a jcnn.data.Loader over arrays"):
        fit(TinyNet(), _Minimal(), None, _config(out, val_split=8))
    streaming = Loader.from_source(list(zip(images, labels, strict=True)), batch_size=16)
    for option in (dict(val_split=8), dict(standardize="per_channel")):
        with pytest.raises(TypeError, match="over arrays.*got a streaming Loader"):
            fit(TinyNet(), streaming, None, _config(out, **option))
    assert not out.exists()


def test_a_bad_validation_split_is_named_as_the_config_field(tmp_path, rng):
    # fit names its settings config.<field>; jcnn-train turns that into the flag (--val-split)
    images, labels = _uint8_data(rng, 48)
    train = Loader(images, labels, batch_size=16, seed=3)
    out = tmp_path / "run"
    for split, error in ((48, ValueError), (1.0, ValueError), (0, ValueError), ("10%", TypeError)):
        with pytest.raises(error, match=r"^config\.val_split: "):
            fit(TinyNet(), train, None, _config(out, val_split=split))
    assert not out.exists()


def test_resume_with_callbacks_and_validation_split_is_bitwise_exact(tmp_path, rng):
    images, labels = _uint8_data(rng, 80)
    train = Loader(images, labels, batch_size=16, seed=3)

    def callbacks():
        # min_delta 1.0: accuracy never improves after the first evaluation, so the run stops
        # at the third; only a restored counter stops the resumed run at the same step
        return [
            EarlyStopping("val_accuracy", mode="max", patience=2, min_delta=1.0),
            BestCheckpoint("val_loss", mode="min"),
        ]

    def config(out, **kw):
        return _config(
            out,
            epochs=3,
            val_split=16,
            standardize="per_channel",
            eval_every_steps=2,
            checkpoint_every_steps=3,
            **kw,
        )

    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    first = callbacks()
    full = fit(TinyNet(), train, None, config(full_dir), callbacks=first)
    assert [e["step"] for e in full["evaluations"]] == [2, 4, 6]
    assert full["summary"]["stopped"].startswith("early stopping: val_accuracy")
    assert CheckpointManager(full_dir / "checkpoints").steps() == [3, 4, 6]
    shutil.copytree(full_dir, resumed_dir)
    for step in (4, 6):  # as if killed after step 3 was saved
        shutil.rmtree(resumed_dir / "checkpoints" / f"step_{step:08d}")
    second = callbacks()
    resumed = fit(TinyNet(), train, None, config(resumed_dir, resume=True), callbacks=second)
    assert _metrics(resumed["history"]) == _metrics(full["history"])
    assert resumed["evaluations"] == full["evaluations"]
    assert resumed["summary"]["stopped"] == full["summary"]["stopped"]
    assert [c.state_dict() for c in second] == [c.state_dict() for c in first]
    a, b = full["state"], resumed["state"]
    for x, y in zip(jax.tree.leaves(a.arrays()), jax.tree.leaves(b.arrays()), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    best = min(full["evaluations"], key=lambda e: e["val_loss"])["step"]
    assert CheckpointManager(resumed_dir / "best").steps() == [best]
    # other callbacks than those saved: refused, not silently reset
    shutil.rmtree(resumed_dir / "checkpoints" / "step_00000006")
    with pytest.raises(ValueError, match=r"holds the state of \[EarlyStopping, BestCheckpoint\]"):
        fit(TinyNet(), train, None, config(resumed_dir, resume=True), callbacks=[])


class _StepLog(Callback):
    """Records each on_step's step and loss, and asks to stop after ``stop_at``."""

    def __init__(self, stop_at=None):
        self.seen, self.stop_at = [], stop_at

    def on_step(self, run, metrics):
        self.seen.append((run.step, metrics["loss"]))
        if run.step == self.stop_at:
            run.request_stop("asked")


def _count_calls(monkeypatch):
    """The number of steps of each compiled call fit makes, in order."""
    sizes = []
    one, many = loop.train_step, loop.train_steps

    def train_step(state, batch, **options):
        if not isinstance(state.step, jax.core.Tracer):  # not fit's trace before training
            sizes.append(1)
        return one(state, batch, **options)

    def train_steps(state, batches, **options):
        sizes.append(int(batches[0].shape[0]))
        return many(state, batches, **options)

    monkeypatch.setattr(loop, "train_step", train_step)
    monkeypatch.setattr(loop, "train_steps", train_steps)
    return sizes


def test_steps_per_call_groups_steps_and_trains_alike(tmp_path, rng, monkeypatch):
    train, val = _loaders(*_data(rng))  # 4 steps per epoch
    sizes = _count_calls(monkeypatch)
    runs = {}
    for per_call in (1, 3):
        log = _StepLog()
        # momentum, not adam: adam's m / sqrt(v) turns rounding-level differences of near-zero
        # gradients into differences of a whole step
        config = _config(
            tmp_path / f"k{per_call}",
            epochs=3,
            optimizer="momentum",
            learning_rate=0.05,
            eval_every_steps=5,
            steps_per_call=per_call,
        )
        runs[per_call] = fit(TinyNet(), train, val, config, callbacks=[log]), log
    # three steps per call, cut short where fit needs the state: epoch ends (4, 8, 12) and
    # evaluations (5, 10); the steps left before those run one per call
    assert sizes == [1] * 12 + [3, 1, 1, 3, 1, 1, 1, 1]
    (one, one_log), (three, three_log) = runs[1], runs[3]
    assert [s for s, _ in three_log.seen] == list(range(1, 13))
    np.testing.assert_allclose(
        [loss for _, loss in three_log.seen], [loss for _, loss in one_log.seen], rtol=1e-5
    )
    assert [e["step"] for e in three["evaluations"]] == [4, 5, 8, 10, 12]
    for a, b in zip(_metrics(one["history"]), _metrics(three["history"]), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    a, b = one["state"].arrays(), three["state"].arrays()
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)


def test_steps_per_call_runs_a_short_last_batch_alone(rng, monkeypatch):
    images, labels = _data(rng, n=70)  # batches of 16: four, then one of 6
    train = Loader(images, labels, batch_size=16, seed=3, drop_remainder=False)
    sizes = _count_calls(monkeypatch)
    log = _StepLog()
    result = fit(TinyNet(), train, None, _quiet(steps_per_call=5), callbacks=[log])
    assert sizes == [1, 1, 1, 1, 1]
    assert int(result["state"].step) == 5 and [s for s, _ in log.seen] == [1, 2, 3, 4, 5]
    sizes.clear()
    fit(TinyNet(), train, None, _quiet(steps_per_call=4))
    assert sizes == [4, 1]


def test_steps_per_call_stops_at_the_end_of_the_call(rng):
    train, val = _loaders(*_data(rng))
    for per_call, last in ((1, 2), (3, 3)):
        log = _StepLog(stop_at=2)
        config = _quiet(epochs=2, steps_per_call=per_call)
        result = fit(TinyNet(), train, val, config, callbacks=[log])
        assert int(result["state"].step) == last
        assert [s for s, _ in log.seen] == list(range(1, last + 1))
        assert result["summary"]["stopped"] == "asked"


def test_resume_with_steps_per_call_is_bitwise_exact(tmp_path, rng):
    train, val = _loaders(*_data(rng))
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"

    def config(out, **kw):
        return _config(out, epochs=3, checkpoint_every_steps=5, steps_per_call=3, **kw)

    full = fit(TinyNet(), train, val, config(full_dir))
    assert CheckpointManager(full_dir / "checkpoints").steps() == [4, 5, 8, 10, 12]
    shutil.copytree(full_dir, resumed_dir)
    for step in (8, 10, 12):  # as if killed after step 5 (epoch 2, batch 1) was saved
        shutil.rmtree(resumed_dir / "checkpoints" / f"step_{step:08d}")
    resumed = fit(TinyNet(), train, val, config(resumed_dir, resume=True))
    assert _metrics(resumed["history"]) == _metrics(full["history"])
    a, b = full["state"], resumed["state"]
    for x, y in zip(jax.tree.leaves(a.arrays()), jax.tree.leaves(b.arrays()), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_bad_steps_per_call_is_named(rng):
    train, val = _loaders(*_data(rng))
    with pytest.raises(ValueError, match="config.steps_per_call: expected a positive int, got 0"):
        fit(TinyNet(), train, val, _quiet(steps_per_call=0))
    with pytest.raises(ValueError, match="config.steps_per_call: expected 1 with DP-SGD"):
        fit(TinyNet(), train, val, _quiet(steps_per_call=2, dp_noise_multiplier=1.0))


class _ParamLog(Callback):
    """Copies the parameters at the end of each epoch."""

    def __init__(self):
        self.params = []

    def on_epoch_end(self, run, record):
        self.params.append(jax.device_get(run.state.params))


@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_no_grad_from_an_epoch_on(rng, steps_per_call):
    train, val = _loaders(*_data(rng))
    log = _ParamLog()
    config = _quiet(
        epochs=3,
        optimizer="sgd",
        learning_rate=0.1,
        schedule="constant",
        no_grad={"Conv_0/kernel": 1, "Dense_0/*": 0},
        steps_per_call=steps_per_call,
    )
    result = fit(TinyNet(), train, val, config, callbacks=[log])
    start = _initial_params()
    first, second, third = log.params
    np.testing.assert_array_equal(first["Dense_0"]["kernel"], start["Dense_0"]["kernel"])
    np.testing.assert_array_equal(third["Dense_0"]["bias"], start["Dense_0"]["bias"])
    assert not np.array_equal(first["Conv_0"]["kernel"], start["Conv_0"]["kernel"])  # epoch 0
    np.testing.assert_array_equal(second["Conv_0"]["kernel"], first["Conv_0"]["kernel"])
    np.testing.assert_array_equal(third["Conv_0"]["kernel"], first["Conv_0"]["kernel"])
    assert not np.array_equal(third["Conv_0"]["bias"], second["Conv_0"]["bias"])
    assert int(result["state"].step) == 12


def _initial_params():
    """TinyNet's initial parameters as fit creates them (seed 0: the model's stream 4)."""
    key = jax.random.key_data(jax.random.fold_in(jax.random.key(0), 4))
    state = TrainState.create(TinyNet(), optax.sgd(0.1), key, jnp.zeros((1, 8, 8, 1)))
    return jax.device_get(state.params)


@pytest.mark.parametrize(
    ("no_grad", "error", "says"),
    [
        ("Conv_0/*", TypeError, "config.no_grad: expected glob patterns or a mapping"),
        ({"Conv_0/*": -1}, ValueError, r"config.no_grad\['Conv_0/\*'\]: expected an int >= 0"),
        ([3], TypeError, "config.no_grad: expected str patterns, got 3"),
        ({"Head/*": 2}, ValueError, r"no_grad: pattern\(s\) \['Head/\*'\] match no parameter"),
    ],
)
def test_bad_no_grad_is_named_before_training(tmp_path, rng, no_grad, error, says):
    train, val = _loaders(*_data(rng))
    with pytest.raises(error, match=says):
        fit(TinyNet(), train, val, _config(tmp_path / "run", no_grad=no_grad))
    assert not (tmp_path / "run").exists()


class _LyingLoader:
    """A loader whose ``len()`` disagrees with what ``epoch`` yields."""

    def __init__(self, batches, length):
        self.batches, self.length = batches, length

    def __len__(self):
        return self.length

    def epoch(self, epoch, start_step=0):
        yield from self.batches[start_step:]

    def batch(self, epoch, step):
        return self.batches[step]


@pytest.mark.parametrize(
    "length, says",
    [
        (6, r"len\(\) says 6 batches per epoch, but epoch\(0, start_step=0\) yielded 4"),
        (3, r"len\(\) says 3 batches per epoch, but .* yields more"),
    ],
)
@pytest.mark.parametrize("steps_per_call", [1, 4])
def test_an_epoch_of_another_length_than_len_is_named(rng, length, says, steps_per_call):
    # it used to retrain epoch 1 forever (fewer batches) or never complete an epoch (more)
    images, labels = _data(rng)
    batches = [(images[i : i + 16], labels[i : i + 16]) for i in range(0, 64, 16)]
    config = TrainConfig(epochs=2, progress=False, steps_per_call=steps_per_call)
    with pytest.raises(ValueError, match=f"train_loader: {says}"):
        fit(TinyNet(), _LyingLoader(batches, length), None, config)
    # stopping before the end of the epoch never reaches the disagreement
    config = dataclasses.replace(config, max_steps=2)
    assert fit(TinyNet(), _LyingLoader(batches, 3), None, config)["summary"]["steps"] == 2


@pytest.mark.parametrize("steps_per_call", [1, 2])
def test_a_training_batch_of_other_shapes_is_named(rng, steps_per_call):
    images, labels = _data(rng)
    batches = [(images[i : i + 16], labels[i : i + 16]) for i in range(0, 64, 16)]
    batches[2] = (np.repeat(batches[2][0], 2, axis=-1), batches[2][1])  # 2 channels, not 1
    config = TrainConfig(epochs=1, progress=False, steps_per_call=steps_per_call)
    says = (  # was flax's ScopeParamShapeError from inside the step
        r"train_loader.epoch\(0\): expected batches the model trains on like its first, "
        r"images \(16, 8, 8, 1\), got images \(16, 8, 8, 2\), which its parameters cannot take"
    )
    with pytest.raises(ValueError, match=says):
        fit(TinyNet(), _LyingLoader(batches, 4), None, config)


def _no_folder(**kw):
    return dataclasses.replace(_config(None, **kw), out=None)


def test_multisteps_and_extra_args_optimizers(rng, tmp_path):
    train, val = _loaders(*_data(rng))
    accumulate = optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2)
    result = fit(TinyNet(), train, val, _config(tmp_path, epochs=1, optimizer=accumulate))
    assert result["summary"]["steps"] == 4 and result["history"][-1]["learning_rate"] is None
    resumed = _config(
        tmp_path, epochs=2, resume=True, optimizer=optax.MultiSteps(optax.adam(1e-2), 4)
    )
    with pytest.raises(ValueError, match="every_k_schedule"):  # its settings are recorded
        fit(TinyNet(), train, val, resumed)
    with pytest.raises(TypeError, match=r"config.optimizer: fit calls update\(grads"):
        fit(TinyNet(), train, val, _no_folder(optimizer=optax.lbfgs()))


def test_a_schedule_with_an_optax_optimizer_is_refused(rng):
    train, val = _loaders(*_data(rng))
    config = _no_folder(optimizer=optax.adam(1e-3), learning_rate=lambda step: 0.1)
    with pytest.raises(ValueError, match="config.learning_rate: a schedule applies to the named"):
        fit(TinyNet(), train, val, config)


def test_a_one_shot_or_array_pair_evaluation_loader_is_named(rng):
    images, labels = _data(rng)
    train, _ = _loaders(images, labels)
    batches = [(images[i : i + 32], labels[i : i + 32]) for i in (0, 32)]
    config = _no_folder(epochs=2)
    with pytest.raises(TypeError, match="val_loader: .* one-shot generator"):
        fit(TinyNet(), train, (b for b in batches), config)
    with pytest.raises(TypeError, match="test_loader: .* one-shot"):
        every_epoch = dataclasses.replace(config, test_every_epoch=True)
        fit(TinyNet(), train, None, every_epoch, test_loader=iter(batches))
    with pytest.raises(TypeError, match="val_loader: .* got a pair of arrays"):
        fit(TinyNet(), train, (images, labels), config)
    # evaluated once: a generator does
    once = fit(TinyNet(), train, (b for b in batches), dataclasses.replace(config, epochs=1))
    assert once["history"][-1]["val_accuracy"] is not None
    at_the_end = fit(TinyNet(), train, batches, config, test_loader=iter(batches))
    assert "test_accuracy" in at_the_end["summary"]


def test_evaluate_checks_its_loader_and_loss(rng):
    train, val = _loaders(*_data(rng, n=32))
    state = fit(TinyNet(), train, None, _quiet())["state"]
    with pytest.raises(TypeError, match=r"loss: expected a callable \(logits, labels\) -> loss"):
        loop.evaluate(state, val, loss=5)
    with pytest.raises(TypeError, match="loader: expected a loader with epoch"):
        loop.evaluate(state, 5)


def test_evaluate_accuracy_is_the_fraction_correct_to_the_last_digit(rng):
    # float32 batch accuracies times the batch sizes were summed: 15 of 37 came out 0.40540540822
    images, labels = _data(rng, n=37)
    state = TrainState.create(TinyNet(), optax.sgd(0.1), jax.random.key(0), images[:1])
    logits = state.apply_fn(state.variables(), images, train=False)
    correct = int(np.sum(np.asarray(logits).argmax(-1) == labels))
    soft = np.eye(3, dtype=np.float32)[labels]
    for targets in (labels, soft):
        loader = Loader(images, targets, batch_size=10, drop_remainder=False)
        assert loop.evaluate(state, loader)["accuracy"] == correct / 37


class _BatchLog(Callback):
    """Records each on_step's loss and accuracy."""

    def __init__(self):
        self.seen = []

    def on_step(self, run, metrics):
        self.seen.append((metrics["loss"], metrics["accuracy"]))


def _uneven_batches(rng):
    """40 examples in batches of 16, 16 and 8, and those sizes."""
    train = Loader(*_data(rng, n=40), batch_size=16, drop_remainder=False, seed=3)
    return train, np.array([16, 16, 8])


def test_train_means_are_over_examples_each_batch_weighted_by_its_size(rng):
    # they were means over batches, the last batch's 8 examples counting as much as 16; and the
    # float32 batch accuracies (3/10 as 0.30000001192...) gave a train_accuracy no count of 40
    train, sizes = _uneven_batches(rng)
    log = _BatchLog()
    config = _quiet(epochs=2, learning_rate=0.02, schedule="constant")
    history = fit(TinyNet(), train, None, config, callbacks=[log])["history"]
    for epoch, record in enumerate(history):
        losses, accuracies = np.array(log.seen[3 * epoch : 3 * epoch + 3]).T
        assert record["train_loss"] == pytest.approx(losses @ sizes / 40, rel=1e-12)
        correct = accuracies @ sizes
        assert correct == pytest.approx(round(correct), abs=1e-9)
        assert record["train_accuracy"] == round(correct) / 40


def test_a_checkpoint_of_batch_means_ends_its_epoch_as_batch_means(tmp_path, rng, monkeypatch):
    # a checkpoint written before the means were over examples holds sums of batch means and a
    # count of batches: its epoch ends as the uninterrupted old run's did, the next over examples
    train, _ = _uneven_batches(rng)
    config = _config(tmp_path / "new", epochs=3, optimizer="sgd", schedule="constant")

    def run(**changes):
        return fit(_FlatNet(), train, None, dataclasses.replace(config, **changes))["history"]

    new = run()
    with monkeypatch.context() as patch:
        old_running = {"loss": 0.0, "accuracy": 0.0, "batches": 0}
        patch.setattr(loop, "_new_running", lambda names=(): dict(old_running))
        old = run(out=str(tmp_path / "old"))
        run(out=str(tmp_path / "resumed"), max_steps=4)
    resumed = run(out=str(tmp_path / "resumed"), resume=True)
    train_means = [[h["train_loss"], h["train_accuracy"]] for h in (*old, *new, *resumed)]
    old, new, resumed = np.array(train_means).reshape(3, 3, 2)
    assert (old != new).any(axis=1).all()  # batch means, not example means, in every epoch
    assert resumed.tolist() == [*old[:2].tolist(), new[2].tolist()]


def test_evaluate_is_a_mean_over_every_example_and_refuses_a_loader_dropping_some(tmp_path, rng):
    images, labels = _data(rng, n=37)
    state = TrainState.create(TinyNet(), optax.sgd(0.1), jax.random.key(0), images[:1])
    logits = state.apply_fn(state.variables(), images, train=False)
    loss = -jax.nn.log_softmax(logits)[np.arange(37), labels]
    every = loop.evaluate(state, Loader(images, labels, batch_size=10, drop_remainder=False))
    assert every["count"] == 37  # batches of 10, 10, 10 and 7, weighted by their sizes
    assert every["loss"] == pytest.approx(float(jnp.mean(loss)), rel=1e-6)
    assert every["accuracy"] == pytest.approx(float(jnp.mean(logits.argmax(-1) == labels)))
    dropping = Loader(images, labels, batch_size=10, shuffle=False)  # was 30 examples, silently
    with pytest.raises(ValueError, match="loader: .* leaves out 7 of its 37 examples"):
        loop.evaluate(state, dropping)
    train, _ = _loaders(*_data(rng))
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="val_loader: .* leaves out 7 of its 37 examples"):
        fit(TinyNet(), train, dropping, _config(out))
    assert not out.exists()


def test_an_unhashable_loss_given_to_fit_is_named_loss_and_explained(rng):
    @dataclasses.dataclass
    class Loss:
        def __call__(self, logits, labels):
            return jnp.mean(logits)

    train, val = _loaders(*_data(rng, n=32))
    with pytest.raises(TypeError, match=r"loss: expected a hashable callable \(it is a static"):
        fit(TinyNet(), train, val, _quiet(), loss=Loss())


class _DictLoader:
    """A loader yielding {"image", "label"} dicts (the tf.data / Hugging Face habit)."""

    def __init__(self, images, labels, as_pairs_from=None):
        self.images, self.labels, self.as_pairs_from = images, labels, as_pairs_from

    def __len__(self):
        return 2

    def epoch(self, epoch, start_step=0):
        return (self.batch(epoch, step) for step in range(start_step, 2))

    def batch(self, epoch, step):
        part = slice(16 * step, 16 * step + 16)
        if self.as_pairs_from is not None and step < self.as_pairs_from:
            return self.images[part], self.labels[part]
        return {"image": self.images[part], "label": self.labels[part]}


_DICT_BATCH = (
    r"expected each batch to be a pair \(images, labels\) of arrays, got a dict with keys "
    r"\['image', 'label'\]"
)


def test_a_batch_given_as_a_dict_is_named(tmp_path, rng):
    images, labels = _data(rng, n=32)
    train, val = _loaders(images, labels)
    with pytest.raises(TypeError, match=r"train_loader.batch\(0, 0\): " + _DICT_BATCH):
        fit(TinyNet(), _DictLoader(images, labels), None, _config(tmp_path / "a"))
    assert not (tmp_path / "a").exists()  # refused before anything was written
    with pytest.raises(TypeError, match=r"train_loader.epoch\(0\): " + _DICT_BATCH):
        fit(TinyNet(), _DictLoader(images, labels, as_pairs_from=1), None, _quiet())
    with pytest.raises(TypeError, match="val_loader: " + _DICT_BATCH):
        fit(TinyNet(), train, [{"image": images, "label": labels}], _quiet())
    state = fit(TinyNet(), train, None, _quiet())["state"]
    with pytest.raises(TypeError, match="loader: " + _DICT_BATCH):
        loop.evaluate(state, [{"image": images, "label": labels}])


class _ArrayLoader:
    """Batches of 16 with NumPy or device labels, as a loader of one's own may yield them."""

    def __init__(self, images, labels, on_device):
        self.images, self.labels, self.on_device = images, labels, on_device

    def __len__(self):
        return len(self.labels) // 16

    def epoch(self, epoch, start_step=0):
        return (self.batch(epoch, step) for step in range(start_step, len(self)))

    def batch(self, epoch, step):
        part = slice(16 * step, 16 * step + 16)
        labels = jnp.asarray(self.labels[part]) if self.on_device else self.labels[part]
        return self.images[part], labels


def _out_of_range(name, low, high):
    return (
        rf"{re.escape(name)} labels: expected class labels in 0..2 \(the model has 3 outputs\), "
        rf"got labels from {low} to {high}"
    )


@pytest.mark.parametrize("bad", [3, -1])
def test_labels_outside_the_classes_are_named(tmp_path, rng, bad):
    # a label 3 of 3 classes gave a NaN val_loss or a NonFiniteLossError saying nothing of
    # labels; a -1 was silently trained and counted as the last class
    images, labels = _data(rng, n=32)
    wrong = labels.copy()
    wrong[20] = bad  # in the second batch of 16
    low, high = min(bad, labels.min()), max(bad, labels.max())
    train, val = _loaders(images, labels)
    wrong_train, wrong_val = _loaders(images, wrong)
    with pytest.raises(ValueError, match=_out_of_range("train_loader", low, high)):
        fit(TinyNet(), wrong_train, val, _config(tmp_path / "a"))
    assert not (tmp_path / "a").exists()
    with pytest.raises(ValueError, match=_out_of_range("val_loader", low, high)):
        fit(TinyNet(), train, wrong_val, _quiet())
    with pytest.raises(ValueError, match=_out_of_range("train_loader.epoch(0)", low, high)):
        fit(TinyNet(), _ArrayLoader(images, wrong, on_device=False), None, _quiet())
    with pytest.raises(ValueError, match=_out_of_range("val_loader", low, high)):
        fit(TinyNet(), train, [(images, wrong)], _quiet())
    state = fit(TinyNet(), train, None, _quiet())["state"]
    with pytest.raises(ValueError, match=_out_of_range("loader", low, high)):
        loop.evaluate(state, wrong_val)


class OneLogitNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dense(1)(x.reshape(x.shape[0], -1))


def _binary_cross_entropy(logits, labels):
    return optax.sigmoid_binary_cross_entropy(logits[:, 0], labels.astype(logits.dtype))


def test_streaming_loaders_train_and_evaluate_as_in_memory_ones(rng):
    # fit read every Loader's labels through .examples, which a streaming loader does not have
    images, labels = _data(rng, n=32)
    records = list(zip(images, labels, strict=True))
    streamed = fit(
        TinyNet(),
        Loader.from_source(records, batch_size=16, seed=3),
        Loader.from_source(records, batch_size=32, shuffle=False),
        _quiet(),
    )
    train, val = _loaders(images, labels)
    held = fit(TinyNet(), train, val, _quiet())
    assert streamed["history"][-1]["val_loss"] == pytest.approx(held["history"][-1]["val_loss"])
    wrong = labels.copy()
    wrong[20] = 3  # found on the device when the loss turns NaN
    with pytest.raises(ValueError, match=_out_of_range("train_loader.epoch(0)", 0, 3)):
        fit(
            TinyNet(),
            Loader.from_source(list(zip(images, wrong, strict=True)), batch_size=16),
            None,
            _quiet(),
        )


def _to_float(key, image):
    return image.astype(jnp.float32) / 255.0


class FloatInputNet(nn.Module):
    """Refuses what its layers would (jcnn's layers take floating input only)."""

    @nn.compact
    def __call__(self, x, train: bool):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"x: expected a floating-point array, got dtype {x.dtype}")
        return TinyNet()(x, train)


def test_a_loader_whose_augment_makes_the_input_is_evaluated_and_its_labels_checked(rng):
    # the held uint8 examples were given to the model to find its width: "x: expected a
    # floating-point array" from evaluate, though the loader's batches are float
    images, labels = _uint8_data(rng, 32)
    loader = Loader(images, labels, batch_size=16, shuffle=False, augment=_to_float)
    state = fit(FloatInputNet(), loader, None, _quiet())["state"]
    assert loop.evaluate(state, loader)["count"] == 32
    wrong = labels.copy()
    wrong[3] = 5
    with pytest.raises(ValueError, match=_out_of_range("loader", 0, 5)):
        loop.evaluate(state, loader.with_examples(images, wrong))
    with pytest.raises(ValueError, match=_out_of_range("val_loader", 0, 5)):
        fit(FloatInputNet(), loader, loader.with_examples(images, wrong), _quiet())


def _coarse(key, images, labels):
    return images, labels // 2


def test_labels_that_a_batch_augment_remaps_are_checked_as_the_batches_carry_them(rng):
    # six fine classes held, three coarse ones trained on: the held labels were refused
    images, labels = _data(rng, n=32)
    fine = 2 * labels + rng.integers(0, 2, size=32).astype(np.int32)
    loader = Loader(images, fine, batch_size=16, shuffle=False, batch_augment=_coarse)
    assert loader.batch_augment is _coarse
    state = fit(TinyNet(), loader, loader, _quiet())["state"]
    assert loop.evaluate(state, loader)["count"] == 32
    with pytest.raises(ValueError, match=_out_of_range("loader", 0, 5)):
        loop.evaluate(state, Loader(images, fine, batch_size=16, shuffle=False))


def test_a_custom_loss_reads_integer_labels_its_own_way(rng):
    # one logit and labels 0/1: the range check is the default cross-entropy's, not a custom loss's
    images, labels = _data(rng, n=32)
    labels = (labels > 0).astype(np.int32)
    train, val = _loaders(images, labels)
    out = fit(OneLogitNet(), train, val, _quiet(loss=_binary_cross_entropy))
    assert np.isfinite(out["history"][-1]["val_loss"])
    assert np.isfinite(loop.evaluate(out["state"], val, loss=_binary_cross_entropy)["loss"])
    with pytest.raises(ValueError, match="the model has 1 outputs"):
        fit(OneLogitNet(), train, val, _quiet())
    with pytest.raises(ValueError, match="the model has 1 outputs"):
        loop.evaluate(out["state"], val)


def test_a_label_too_large_on_the_device_is_named_when_the_loss_turns_nan(rng):
    images, labels = _data(rng, n=32)
    wrong = labels.copy()
    wrong[20] = 3
    with pytest.raises(ValueError, match=_out_of_range("train_loader.epoch(0)", 0, 3)):
        fit(TinyNet(), _ArrayLoader(images, wrong, on_device=True), None, _quiet())
    train, _ = _loaders(images, labels)
    with pytest.raises(ValueError, match=_out_of_range("val_loader", 0, 3)):
        fit(TinyNet(), train, [(images, jnp.asarray(wrong))], _quiet())


def test_one_cycle_too_short_for_a_fall_names_the_config():
    config = TrainConfig(epochs=1, learning_rate=0.1, schedule="one_cycle", max_steps=1)
    with pytest.raises(ValueError, match="config.schedule: expected at least 2 steps after"):
        build_schedule(config, steps_per_epoch=5)
    assert float(build_schedule(dataclasses.replace(config, max_steps=2), 5)(1)) == pytest.approx(
        0.1
    )


def test_a_warmup_longer_than_the_run_is_refused():
    config = TrainConfig(epochs=2, learning_rate=1.0, warmup_epochs=2.5)
    with pytest.raises(ValueError, match=r"config.warmup_epochs: expected at most config.epochs"):
        build_schedule(config, steps_per_epoch=4)
    whole_run = build_schedule(dataclasses.replace(config, warmup_epochs=2), steps_per_epoch=4)
    assert float(whole_run(4)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "changes, refused",
    [
        ({"schedule": "cosine", "step_epochs": (1,)}, "step_epochs"),
        ({"schedule": "exponential", "step_epochs": [1]}, "step_epochs"),
        ({"schedule": "constant", "step_factor": 0.5}, "step_factor"),
        ({"schedule": "step", "step_epochs": (1,), "decay_rate": 0.5}, "decay_rate"),
        ({"schedule": "cosine", "decay_rate": np.float64(0.3)}, "decay_rate"),
        ({"learning_rate": lambda step: 0.1, "warmup_epochs": 1.0}, "warmup_epochs"),
        ({"learning_rate": lambda step: 0.1, "step_epochs": (1,)}, "step_epochs"),
        # False == 0.0, the default: it passed as unset
        ({"learning_rate": lambda step: 0.1, "warmup_epochs": False}, "warmup_epochs"),
        ({"learning_rate": lambda step: 0.1, "warmup_epochs": np.False_}, "warmup_epochs"),
        ({"schedule": "cosine", "step_epochs": np.array(3)}, "step_epochs"),
        ({"optimizer": "adam", "momentum": 0.5}, "momentum"),
        ({"optimizer": optax.sgd(0.1), "momentum": 0.5}, "momentum"),
        ({"optimizer": optax.sgd(0.1), "warmup_epochs": 0.5}, "warmup_epochs"),
        ({"optimizer": optax.sgd(0.1), "schedule": "step", "step_epochs": (1,)}, "step_epochs"),
    ],
)
def test_a_setting_that_would_be_ignored_is_refused(rng, changes, refused):
    train, val = _loaders(*_data(rng))
    config = dataclasses.replace(_no_folder(), **changes)
    with pytest.raises(ValueError, match=rf"config\.{refused}: does not apply when .* got "):
        fit(TinyNet(), train, val, config)


@pytest.mark.parametrize(
    "changes, given, refused",
    [
        ({"eval_every_steps": 2}, {}, "eval_every_steps"),
        ({"monitor": "val_loss", "monitor_mode": "min"}, {}, "monitor"),
        ({"test_every_epoch": True}, {"val": True}, "test_every_epoch"),
        ({"val_split_seed": 3}, {"val": True}, "val_split_seed"),
        ({"eval_batch_size": 8}, {"val": True}, "eval_batch_size"),
    ],
)
def test_an_evaluation_setting_without_its_set_is_refused(tmp_path, rng, changes, given, refused):
    # each was silently ignored: no evaluation every N steps without a validation set, no test
    # each epoch without a test loader, a split seed or batch size with no split to carve
    train, val = _loaders(*_data(rng))
    config = _config(tmp_path / "run", **changes)
    with pytest.raises(ValueError, match=rf"config\.{refused}: does not apply when .* got "):
        fit(TinyNet(), train, val if given else None, config)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "changes",
    [
        {"schedule": "step", "step_epochs": (1,), "step_factor": 0.5},
        {"schedule": "inverse_time", "decay_rate": 0.5},
        {"optimizer": "nesterov", "momentum": 0.5},
        {"optimizer": "lars", "momentum": 0.5},
        {"optimizer": "adam", "momentum": 0.9, "step_epochs": []},
        {"optimizer": optax.sgd(0.1), "learning_rate": 0.5, "schedule": "constant"},
        {"learning_rate": lambda step: 0.1, "schedule": "step"},
    ],
)
def test_settings_that_apply_or_keep_their_defaults_are_accepted(rng, changes):
    # the model is no matter here: _FlatNet's step compiles in about half TinyNet's time
    train, val = _loaders(*_data(rng))
    config = dataclasses.replace(_no_folder(epochs=1), **changes)
    fit(_FlatNet(), train, val, config)


class _FlatNet(nn.Module):
    """No BatchNorm (DP-SGD), flattened with -1: fails on a batch of 0 examples, as many do."""

    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dense(3)(nn.relu(nn.Dense(8)(x.reshape(x.shape[0], -1))))


def test_a_checkpoint_after_an_empty_poisson_batch_is_not_called_bad(tmp_path, rng):
    # DP-SGD's Poisson sampling can draw a batch of no example; the checkpoint saved after it was
    # judged by the loss of that batch (a mean over nothing: NaN, or a crash in the model) and so
    # marked "bad", skipped by resume and load_run; and an empty next batch (DP's loss 0) called
    # the previous checkpoint "good"
    images, labels = _data(rng, n=12)
    train = Loader(images, labels, batch_size=2, seed=51, sampling="poisson")
    sizes = [int(train.batch(0, s)[0].shape[0]) for s in range(len(train))]
    empty = [s + 1 for s, size in enumerate(sizes) if size == 0]  # the steps that trained on none
    # this seed draws batches of 2, 0, 0, 6, 2, 0 (six steps, three sizes to compile): an empty
    # step before an empty one (2), before a full one (3) and at the end of the run (6)
    assert sizes == [2, 0, 0, 6, 2, 0]
    out = tmp_path / "run"
    config = _quiet(
        out=str(out),
        optimizer="sgd",
        learning_rate=0.01,
        schedule="constant",
        dp_noise_multiplier=1.0,
        checkpoint_every_steps=1,
        keep_last=len(train),
    )
    fit(_FlatNet(), train, None, config)
    manager = CheckpointManager(out / "checkpoints")
    status = {step: manager.status(step) for step in manager.steps()}
    assert "bad" not in status.values(), status
    for step in empty:  # judged by the loss of the next step if it has examples
        judged = step < len(train) and sizes[step] > 0
        assert status[step] == ("good" if judged else "unverified"), (step, status)


def test_the_epoch_means_leave_out_empty_poisson_batches(rng):
    # an empty batch's metrics (DP-SGD reports loss 0 and accuracy 0 for it) were averaged into
    # train_loss and train_accuracy as if they were a batch's means, pulling both towards 0
    images, labels = _data(rng, n=64)
    train = Loader(images, labels, batch_size=2, seed=0, sampling="poisson")
    sizes = [int(train.batch(0, s)[0].shape[0]) for s in range(len(train))]
    assert 0 in sizes
    log = _StepLog()
    config = _quiet(
        optimizer="sgd", learning_rate=0.01, schedule="constant", dp_noise_multiplier=1.0
    )
    record = fit(_FlatNet(), train, None, config, callbacks=[log])["history"][0]
    losses = np.array([loss for _, loss in log.seen])
    assert record["train_loss"] == pytest.approx(losses @ sizes / sum(sizes), rel=1e-12)


def test_an_epoch_of_only_empty_poisson_batches_has_no_training_means(tmp_path, rng):
    # such an epoch (a small sampling rate) stopped on a division by zero in the progress line,
    # and its record held train_loss 0.0: a perfect loss, the best checkpoint by train_loss
    images, labels = _data(rng, n=4)
    labels = np.array([0, 1, 2, 0], np.int32)
    train = Loader(images, labels, batch_size=1, seed=28, sampling="poisson")
    assert [int(train.batch(0, s)[0].shape[0]) for s in range(4)] == [0, 0, 0, 0]
    config = _config(
        tmp_path / "run",
        epochs=1,
        optimizer="sgd",
        schedule="constant",
        dp_noise_multiplier=1.0,
        monitor="train_loss",
        monitor_mode="min",
    )
    record = fit(_FlatNet(), train, None, config)["history"][0]
    assert record["train_loss"] is None and record["train_accuracy"] is None
    manager = CheckpointManager(tmp_path / "run" / "checkpoints", mode="min")
    assert manager.steps() == [4] and manager.metric(4) is None


def test_an_empty_out_is_refused_not_taken_as_no_run_folder(tmp_path, rng, monkeypatch):
    # out="" trained and wrote nothing (as out=None), while resume=True with it named the
    # current folder; an empty path is now a ValueError naming config.out
    monkeypatch.chdir(tmp_path)
    train, _ = _loaders(*_data(rng, n=32))
    for extra in ({}, {"resume": True}, {"overwrite": True}):
        with pytest.raises(ValueError, match=r"^config\.out: expected a folder path.*got ''$"):
            fit(TinyNet(), train, None, _quiet(out="", **extra))
    assert list(tmp_path.iterdir()) == []


def test_an_out_starting_with_a_tilde_is_in_the_home_folder(tmp_path, rng, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    train, _ = _loaders(*_data(rng, n=32))
    fit(TinyNet(), train, None, _quiet(out="~/run", max_steps=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    run = load_run("~/run")
    assert run.step == 1 and run.folder == tmp_path / "home" / "run"


def test_a_nan_validation_loss_as_monitor_does_not_stop_the_checkpoints(tmp_path, rng):
    # monitor="val_loss" with a validation loss of NaN (a validation image of NaN here; a model
    # diverging in eval mode alike) crashed the epoch's save: "metric: expected a number, got nan"
    images, labels = _data(rng, n=64)
    val_images = images[:16].copy()
    val_images[0, 0, 0, 0] = np.nan
    train, _ = _loaders(images, labels)
    val = Loader(val_images, labels[:16], batch_size=16, shuffle=False, drop_remainder=False)
    out = tmp_path / "run"
    result = fit(TinyNet(), train, val, _config(out, monitor="val_loss", monitor_mode="min"))
    assert all(np.isnan(record["val_loss"]) for record in result["history"])
    manager = CheckpointManager(out / "checkpoints", mode="min")
    assert manager.steps() == [4, 8] and manager.metric(8) is None


class _NaNFirstPass:
    """A validation loader whose first pass holds a NaN image, then clean ones."""

    def __init__(self, images, labels):
        self.images, self.labels, self.passes = images, labels, 0

    def __iter__(self):
        self.passes += 1
        images = self.images.copy()
        if self.passes == 1:
            images[0, 0, 0, 0] = np.nan
        yield images, self.labels


def test_the_summary_best_validation_loss_is_never_a_nan_beside_numbers(rng):
    # min() over [nan, 0.9] is nan in Python (nan compares false): a NaN first evaluation made
    # best_val_loss NaN although later evaluations had a loss
    images, labels = _data(rng, n=64)
    train, _ = _loaders(images, labels)
    val = _NaNFirstPass(images[:16], labels[:16])
    result = fit(TinyNet(), train, val, _quiet(epochs=3))
    losses = [e["val_loss"] for e in result["evaluations"]]
    assert np.isnan(losses[0]) and np.isfinite(losses[1:]).all()
    assert result["summary"]["best_val_loss"] == min(losses[1:])


@pytest.mark.filterwarnings("ignore:.*seed.* is deprecated:DeprecationWarning")  # optax >= 0.2.6
def test_an_optax_optimizer_holding_a_key_checkpoints_and_resumes_exactly(tmp_path, rng):
    # optax.noisy_sgd (optax.add_noise) keeps a typed PRNG key in its state: the first
    # checkpoint failed with a raw "JAX array with PRNGKey dtype cannot be converted"
    train, val = _loaders(*_data(rng))
    noisy = dict(optimizer=optax.noisy_sgd(0.02, seed=5))
    full = fit(TinyNet(), train, val, _quiet(epochs=2, out=str(tmp_path / "full"), **noisy))
    out = str(tmp_path / "resumed")
    fit(TinyNet(), train, val, _quiet(epochs=2, out=out, max_steps=6, **noisy))
    resumed = fit(TinyNet(), train, val, _quiet(epochs=2, out=out, resume=True, **noisy))
    assert int(resumed["state"].step) == 8
    a, b = full["state"].arrays(), resumed["state"].arrays()
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_an_epoch_that_returns_no_iterable_is_named(rng):
    class NotIterable(Loader):
        def epoch(self, epoch, *, start_step=0):
            return len(self)

    images, labels = _data(rng, n=32)
    with pytest.raises(
        TypeError,
        match=r"^train_loader: expected epoch\(0, start_step=0\) to return an iterable of "
        r"\(images, labels\) batches, got int$",
    ):
        fit(TinyNet(), NotIterable(images, labels, batch_size=16), None, _quiet())


class _CountSteps(Callback):
    steps = 0

    def on_step(self, run, metrics):
        self.steps += 1


def test_evaluation_batches_the_model_cannot_take_are_named_before_training(tmp_path, rng):
    # found at the first evaluation, after an epoch of training, as "batch images: ..." or as
    # Flax's ScopeParamShapeError
    images, labels = _data(rng, n=48)
    raw = np.clip(images * 20 + 128, 0, 255).astype(np.uint8)

    def to_float(key, image):
        return image.astype(jnp.float32) / 255

    counter = _CountSteps()
    train = Loader(raw, labels, batch_size=16, augment=to_float)  # val_split carves raw uint8
    with pytest.raises(
        TypeError, match=r"^val_loader images: expected a floating-point array, got dtype uint8"
    ):
        fit(TinyNet(), train, None, _quiet(val_split=16), callbacks=[counter])
    two_channels = [(np.repeat(images[:8], 2, axis=-1), labels[:8])]
    train, _ = _loaders(images, labels)
    for loaders in ({"val_loader": two_channels}, {"test_loader": two_channels}):
        name = next(iter(loaders))
        with pytest.raises(
            ValueError,
            match=rf"^{name}: expected batches the model evaluates like the training images "
            r"\(16, 8, 8, 1\), got images \(8, 8, 8, 2\) and labels \(8,\) "
            r"\(ScopeParamShapeError: ",
        ):
            fit(TinyNet(), train, config=_config(tmp_path / "run"), callbacks=[counter], **loaders)
    assert counter.steps == 0 and not (tmp_path / "run").exists()
    iterated = (batch for batch in [(raw[:8], labels[:8])])  # not looked at before: one-shot
    with pytest.raises(TypeError, match=r"^test_loader images: expected a floating-point array"):
        fit(TinyNet(), train, None, _quiet(), test_loader=iterated)


def test_an_empty_evaluation_batch_counts_for_nothing(rng):
    # its NaN means, weighted by 0, made every mean of the evaluation NaN
    images, labels = _data(rng, n=16)
    state = TrainState.create(TinyNet(), optax.sgd(0.1), jax.random.PRNGKey(0), images[:1])
    whole = loop.evaluate(state, [(images, labels)])
    parts = [(images[:6], labels[:6]), (images[:0], labels[:0]), (images[6:], labels[6:])]
    split = loop.evaluate(state, parts)
    assert split == pytest.approx(whole, rel=1e-6)
    with pytest.raises(ValueError, match="^loader: expected at least one example, the loader"):
        loop.evaluate(state, parts[1:2])


def test_a_regression_loss_trains_with_accuracy_undefined(tmp_path, rng):
    # a target per image, no classes: the step's accuracy refused the labels, so fit could not run
    images, _ = _data(rng, 48)
    targets = images.mean(axis=(1, 2, 3)).astype(np.float32)

    def squared_error(logits, labels):
        return (logits[:, 0] - labels) ** 2

    train = Loader(images, targets, batch_size=16, seed=3)
    val = Loader(images, targets, batch_size=16, shuffle=False)
    # four epochs of three steps: two left the loss where the initialization's luck put it
    config = _config(
        tmp_path, epochs=4, schedule="constant", monitor="val_loss", monitor_mode="min"
    )
    result = fit(_FlatNet(), train, val, config, loss=squared_error)
    history = result["history"]
    assert all(np.isnan(h["train_accuracy"]) and np.isnan(h["val_accuracy"]) for h in history)
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert result["summary"]["best_val_accuracy"] is None  # NaN ranks nowhere
    assert result["summary"]["best_val_loss"] == pytest.approx(min(h["val_loss"] for h in history))
    state = result["state"]
    logits = state.apply_fn(state.variables(), images, train=False)
    assert history[-1]["val_loss"] == pytest.approx(float(np.mean(squared_error(logits, targets))))


THREE_DEVICES = """
import jax, jax.numpy as jnp, numpy as np, flax.linen as nn
from jcnn.data import Loader
from jcnn.train import TrainConfig, TrainState, fit, optimizer, parallel
from jcnn.train.loop import eval_batching, evaluate

class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.BatchNorm(use_running_average=not train)(nn.Conv(4, (3, 3))(x))
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))

mesh = parallel.make_mesh(3)
sharding = parallel.data_sharding(mesh)
assert eval_batching(10, 1000, sharding) == (9, None)
assert eval_batching(12, 1000, sharding) == (12, sharding)
assert eval_batching(2, 1000, sharding) == (2, None)
assert eval_batching(1000, 8, sharding) == (6, None)
assert eval_batching(10, 1000, None) == (10, None)
rng = np.random.default_rng(0)
images = rng.normal(size=(10, 6, 6, 2)).astype(np.float32)
labels = rng.integers(0, 3, size=10).astype(np.int32)
state = TrainState.create(Net(), optimizer("sgd", 0.1), jax.random.PRNGKey(0), images[:1])
loader = Loader(images, labels, batch_size=6, shuffle=False, drop_remainder=False)
one = evaluate(state, loader)
three = evaluate(parallel.replicate(state, mesh), loader, mesh=mesh)
assert one["count"] == three["count"] == 10, (one, three)
np.testing.assert_allclose(three["loss"], one["loss"], rtol=1e-5)
assert three["accuracy"] == one["accuracy"]
images = rng.normal(size=(64, 6, 6, 2)).astype(np.float32)
labels = rng.integers(0, 3, size=64).astype(np.int32)
train = Loader(images, labels, batch_size=18, sharding=sharding)
history = fit(Net(), train, None, TrainConfig(epochs=1, devices=3, val_split=10, progress=False))
print("val_loss", history["history"][-1]["val_loss"])
"""


def test_evaluation_over_devices_that_do_not_divide_the_set_counts_every_example(tmp_path):
    # 10 examples over 3 devices: the last batch (4) was refused by shard_batch, and fit's
    # val_split loader (batch 10 with the training sharding) by the Loader, before any step
    script = tmp_path / "three.py"
    script.write_text(THREE_DEVICES)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=3"
    # this checkout's jcnn, not an installed one
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "val_loss" in run.stdout


@pytest.mark.parametrize(
    ("step_epochs", "warmup_epochs", "late"), [((5,), 0, "5"), ((1, 3), 0, "3"), ((1.5,), 1, "1.5")]
)
def test_a_step_boundary_past_the_end_of_the_run_is_refused(step_epochs, warmup_epochs, late):
    # the rate never changed there: accepted silently (--schedule step --step-epochs 5 --epochs 1)
    config = TrainConfig(
        epochs=2,
        learning_rate=1.0,
        schedule="step",
        step_epochs=step_epochs,
        warmup_epochs=warmup_epochs,
    )
    with pytest.raises(ValueError, match=rf"^config.step_epochs: {late} is past the end"):
        build_schedule(config, steps_per_epoch=4)
    last = TrainConfig(epochs=2, learning_rate=1.0, schedule="step", step_epochs=(1.75,))
    schedule = build_schedule(last, steps_per_epoch=4)  # the last step (7) takes the drop
    assert float(schedule(6)) == 1.0 and float(schedule(7)) == pytest.approx(0.1)


def _key_bits(key):
    return tuple(np.asarray(jax.random.key_data(key)).ravel().tolist())


def test_a_model_and_a_loader_given_one_seed_draw_no_key_alike(rng):
    # jcnn-train gives both the same --seed: the model's key was split(seed_key(seed))[1], which
    # is fold_in(root, 1), the loader's root of every step key (a dropout key of step t was the
    # loader's epoch-t key, DP noise its (t, 1) step key): one draw reused for two purposes
    images, labels = _data(rng)
    train = Loader(images, labels, batch_size=16, seed=7)
    result = fit(TinyNet(), train, None, _no_folder(epochs=2, seed=7))
    key = jax.random.wrap_key_data(result["state"].key)
    steps = int(result["state"].step)
    model = {_key_bits(key)}
    for t in range(steps):
        step_key = jax.random.fold_in(key, t)  # dropout, or DP-SGD's examples' and noise keys
        model |= {_key_bits(step_key)} | {
            _key_bits(jax.random.fold_in(step_key, j)) for j in (0, 1)
        }
    root = jax.random.key(7)
    loader = set()
    for tag in range(4):
        stream = jax.random.fold_in(root, tag)
        loader.add(_key_bits(stream))
        for epoch in range(2):
            epoch_key = jax.random.fold_in(stream, epoch)
            loader.add(_key_bits(epoch_key))
            loader |= {_key_bits(jax.random.fold_in(epoch_key, s)) for s in range(len(train))}
    assert steps == 2 * len(train) and not model & loader


def test_augmentation_acts_on_the_raw_images_then_standardization(rng):
    # color_jitter (like trivial_augment, rand_augment, pixmix) works in the images' own units and
    # clips to them: run on standardized images it clipped every training image to [0, 1] while
    # the validation and test images kept their standardized range
    import functools

    from jcnn.data import augment
    from jcnn.train.loop import _prepare_data

    images, labels = _uint8_data(rng, 48)
    jitter = functools.partial(augment.color_jitter, brightness=1e-6)  # a factor of ~1: identity
    config = _quiet(standardize="per_channel", val_split=16)
    plain, val, _, stats = _prepare_data(
        config, Loader(images, labels, batch_size=16, seed=3), None, None, None
    )
    jittered, _, _, _ = _prepare_data(
        config, Loader(images, labels, batch_size=16, seed=3, augment=jitter), None, None, None
    )
    for step in range(len(plain)):
        expected, got = plain.batch(0, step)[0], jittered.batch(0, step)[0]
        assert float(jnp.min(got)) < 0  # standardized, not clipped to [0, 1]
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)


def test_a_crop_pads_raw_black_before_standardization(rng):
    # as torchvision's RandomCrop(padding=4) before Normalize: the padding is a black pixel (0 in
    # the raw units, (0 - mean) / std once standardized), not the mean (0 after standardizing)
    import functools

    from jcnn.data import augment
    from jcnn.train.loop import _prepare_data

    images, labels = _uint8_data(rng, 32)  # values 20..180 or so: no pixel is black
    crop = functools.partial(augment.random_crop, padding=4)
    config = _quiet(standardize="per_channel")
    loader = Loader(images, labels, batch_size=32, seed=1, augment=crop)
    cropped, _, _, stats = _prepare_data(config, loader, None, None, None)
    black = np.asarray(stats(np.zeros((1, *images.shape[1:]), np.uint8)))[0, 0, 0]
    batch = np.asarray(cropped.batch(0, 0)[0])
    padded = np.all(np.isclose(batch, black, atol=1e-5), axis=-1)
    assert padded.any(axis=(1, 2)).sum() > 16  # most of 32 crops reach into the padding
    assert not np.isclose(batch, 0.0, atol=1e-6).all(axis=-1).any()
