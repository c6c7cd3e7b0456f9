"""fit(): run folder, learning, NaN stop and exact resume from a mid-epoch checkpoint."""

import csv
import json
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn.data import Loader
from jcnn.train import CheckpointManager, NonFiniteLossError, TrainConfig, fit
from jcnn.train.loop import build_schedule


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


def test_build_schedule_converts_epochs_to_steps():
    config = TrainConfig(
        epochs=10, learning_rate=1.0, schedule="step", step_epochs=(3, 6), warmup_epochs=1
    )
    schedule = build_schedule(config, steps_per_epoch=5)
    assert float(schedule(0)) == 0.0
    assert float(schedule(5)) == 1.0
    assert float(schedule(5 + 15)) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="config.schedule"):
        build_schedule(TrainConfig(schedule="warp"), 5)


def test_bad_config_is_named(rng):
    train, val = _loaders(*_data(rng))
    with pytest.raises(TypeError, match="config"):
        fit(TinyNet(), train, val, {"epochs": 1})
    with pytest.raises(ValueError, match="config.epochs"):
        fit(TinyNet(), train, val, TrainConfig(epochs=0, progress=False))


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

    return optimizer(config.optimizer, build_schedule(config, 4), momentum=config.momentum)
