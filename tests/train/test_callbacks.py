"""Callbacks: the protocol, early stopping, best checkpoint, stopping, a callback that raises."""

import dataclasses
import json
import math
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn.data import Loader
from jcnn.train import (
    BestCheckpoint,
    Callback,
    CallbackError,
    CheckpointError,
    CheckpointManager,
    EarlyStopping,
    RunContext,
    RunFolderError,
    TrainConfig,
    fit,
    load_run,
)


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(4, (3, 3), strides=2)(x)
        return nn.Dense(3)(jnp.mean(nn.relu(x), axis=(1, 2)))


def _loaders(rng, n=64):
    labels = rng.integers(0, 3, size=n).astype(np.int32)
    images = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
    images[np.arange(n), 2 * labels + 1, 2 * labels + 1, 0] += 4.0
    train = Loader(images, labels, batch_size=16, seed=1)
    val = Loader(images[:32], labels[:32], batch_size=32, shuffle=False)
    return train, val


def _config(out=None, **kw):
    return TrainConfig(
        **{"epochs": 2, "learning_rate": 0.02, "progress": False, "out": out and str(out), **kw}
    )


def _context(has_validation=True):
    return RunContext(
        config=None,
        steps_per_epoch=4,
        out=None,
        has_validation=has_validation,
        validation_metrics=("val_loss", "val_accuracy"),
    )


@pytest.mark.parametrize(
    "mode, values, min_delta, stop_at",
    [
        ("min", [1.0, 0.9, 0.95, 0.91, 0.8], 0.0, 4),  # two in a row without a new minimum
        ("min", [1.0, 0.99, 0.98, 0.97], 0.05, 3),  # improvements below min_delta do not count
        ("max", [0.1, 0.2, 0.3, 0.4], 0.0, None),
        ("max", [0.5, float("nan"), 0.4], 0.0, 3),  # NaN never improves
        ("min", [float("nan"), float("nan")], 0.0, 2),  # nothing but NaN: stops, says so
    ],
)
def test_early_stopping_counts_evaluations_without_improvement(mode, values, min_delta, stop_at):
    run = _context()
    stopper = EarlyStopping("val_loss", mode=mode, patience=2, min_delta=min_delta)
    stopper.on_train_begin(run)
    stopped = None
    for i, value in enumerate(values, start=1):
        run.step = i
        stopper.on_evaluation(run, {"step": i, "val_loss": value})
        if run.stop_reason is not None and stopped is None:
            stopped = i
    assert stopped == stop_at
    if stop_at is not None:
        assert run.stop_reason.startswith("early stopping: val_loss did not improve for 2")
    restored = EarlyStopping("val_loss", mode=mode, patience=2, min_delta=min_delta)
    restored.load_state_dict(json.loads(json.dumps(stopper.state_dict())))
    assert restored.state_dict() == stopper.state_dict()


@pytest.mark.parametrize("kind", [EarlyStopping, BestCheckpoint])
def test_a_monitor_state_of_another_metric_or_direction_is_refused(kind):
    # the state of a val_loss monitor loaded into a val_accuracy one (callbacks given in another
    # order on resume) made a loss its best accuracy: early stopping and best checkpoints then
    # compared accuracies against it
    saved = kind("val_loss", mode="min")
    saved.best, saved.best_step = 0.25, 4
    state = json.loads(json.dumps(saved.state_dict()))
    for other in (kind("val_accuracy", mode="max"), kind("val_loss", mode="max")):
        says = r"holds the state of .*monitor='val_loss', mode='min'"
        with pytest.raises(ValueError, match=says):
            other.load_state_dict(state)
        assert other.best is None
    same = kind("val_loss", mode="min")
    same.load_state_dict(state)
    assert (same.best, same.best_step) == (0.25, 4)
    older = kind("val_accuracy", mode="max")  # a checkpoint saved without monitor and mode
    older.load_state_dict({k: v for k, v in state.items() if k not in ("monitor", "mode")})
    assert older.best == 0.25


def test_resuming_with_monitors_in_another_order_is_refused(tmp_path, rng):
    train, val = _loaders(rng)
    out = tmp_path / "run"
    first = [EarlyStopping("val_loss"), EarlyStopping("val_accuracy", mode="max")]
    fit(TinyNet(), train, val, _config(out, epochs=1, max_steps=2), callbacks=first)
    before = sorted(p.name for p in out.iterdir())
    swapped = [EarlyStopping("val_accuracy", mode="max"), EarlyStopping("val_loss")]
    with pytest.raises(CallbackError, match="EarlyStopping.load_state_dict raised: ValueError"):
        config = _config(out, epochs=1, max_steps=2, resume=True)
        fit(TinyNet(), train, val, config, callbacks=swapped)
    assert sorted(p.name for p in out.iterdir()) == before


def test_monitor_callbacks_check_their_settings():
    with pytest.raises(ValueError, match="patience: expected an int >= 1"):
        EarlyStopping(patience=0)
    with pytest.raises(ValueError, match="mode: expected one of 'min', 'max'"):
        EarlyStopping(mode="up")
    with pytest.raises(ValueError, match="min_delta"):
        BestCheckpoint(min_delta=-1)
    with pytest.raises(TypeError, match="monitor: expected a metric name"):
        BestCheckpoint(monitor=3)
    # a value of the wrong type is a TypeError, as everywhere else (these were ValueErrors)
    for bad in (1.5, 2.0, True, "3", None):
        with pytest.raises(TypeError, match=r"patience: expected an int >= 1, got "):
            EarlyStopping(patience=bad)
    for bad in ("0.1", None, True, [0.1]):
        with pytest.raises(TypeError, match=r"min_delta: expected a finite number >= 0, got "):
            BestCheckpoint(min_delta=bad)
    with pytest.raises(ValueError, match="directory"):
        BestCheckpoint(directory="/abs")
    with pytest.raises(ValueError, match="EarlyStopping: monitors 'val_loss' but the run has no"):
        EarlyStopping().on_train_begin(_context(has_validation=False))
    with pytest.raises(ValueError, match="monitor 'val_f1' is not an evaluation metric"):
        EarlyStopping("val_f1").on_train_begin(_context())


def test_callbacks_are_checked_against_the_run(tmp_path, rng):
    train, val = _loaders(rng)
    with pytest.raises(ValueError, match="EarlyStopping.on_train_begin.*no validation set"):
        fit(TinyNet(), train, None, _config(), callbacks=[EarlyStopping()])
    with pytest.raises(ValueError, match="BestCheckpoint: needs a run folder"):
        fit(TinyNet(), train, val, _config(), callbacks=[BestCheckpoint()])
    with pytest.raises(TypeError, match=r"got the class EarlyStopping \(call it"):
        fit(TinyNet(), train, val, _config(), callbacks=[EarlyStopping])
    with pytest.raises(TypeError, match=r"callbacks\[0\]: expected an object with some of"):
        fit(TinyNet(), train, val, _config(), callbacks=[print])


class NotAMethod(Callback):
    on_step = 5


class StateNotAMethod(Callback):
    state_dict = {"best": 1.0}  # would be skipped: the state silently lost on resume


@pytest.mark.parametrize(
    "callback, says",
    [
        (NotAMethod(), r"callbacks\[0\].on_step: expected a method, got 5 \(NotAMethod\)"),
        (StateNotAMethod(), r"callbacks\[0\].state_dict: expected a method, got \{'best': 1.0\}"),
    ],
)
def test_a_hook_that_is_not_a_method_is_refused_up_front(rng, callback, says):
    train, val = _loaders(rng)
    with pytest.raises(TypeError, match=says):
        fit(TinyNet(), train, val, _config(), callbacks=[callback])


class Recorder:
    """A duck-typed callback (no base class) that stops after the first epoch."""

    def __init__(self):
        self.calls = []

    def on_step(self, run, metrics):
        self.calls.append(("step", run.step, run.epoch, run.batch, sorted(metrics)))

    def on_evaluation(self, run, metrics):
        self.calls.append(("evaluation", metrics["step"]))

    def on_epoch_end(self, run, record):
        self.calls.append(("epoch", record["epoch"], record["step"]))
        run.request_stop("enough")


def test_hooks_order_and_stopping_from_a_callback(tmp_path, rng):
    train, val = _loaders(rng)
    recorder = Recorder()
    result = fit(TinyNet(), train, val, _config(tmp_path, eval_every_steps=2), callbacks=[recorder])
    steps = [c for c in recorder.calls if c[0] == "step"]
    assert [c[1:4] for c in steps] == [(1, 0, 1), (2, 0, 2), (3, 0, 3), (4, 0, 4)]
    assert steps[0][4] == ["accuracy", "grad_norm", "loss"]
    assert [c for c in recorder.calls if c[0] != "step"] == [
        ("evaluation", 2),
        ("evaluation", 4),
        ("epoch", 1, 4),
    ]
    assert result["summary"]["stopped"] == "enough"
    assert CheckpointManager(tmp_path / "checkpoints").latest_step() == 4
    # a stopped run resumed does not train further
    again = fit(TinyNet(), train, val, _config(tmp_path, resume=True), callbacks=[Recorder()])
    assert len(again["history"]) == 1 and int(again["state"].step) == 4


class StopAtOnce(Callback):
    def on_train_begin(self, run):
        run.request_stop("nothing to do")


def test_a_stop_reason_must_be_a_non_empty_string():
    run = _context()
    for reason, error in ((3, TypeError), (None, TypeError), (b"x", TypeError), ("  ", ValueError)):
        with pytest.raises(error, match="reason: expected a non-empty string"):
            run.request_stop(reason)
    assert run.stop_reason is None
    run.request_stop("first")
    run.request_stop("second")  # the first reason stands
    assert run.stop_reason == "first"


def test_a_run_stopped_before_its_first_step_still_summarizes(tmp_path, rng):
    train, val = _loaders(rng)
    result = fit(
        TinyNet(), train, val, _config(tmp_path), test_loader=val, callbacks=[StopAtOnce()]
    )
    summary = result["summary"]
    assert result["history"] == [] and int(result["state"].step) == 0
    assert summary["stopped"] == "nothing to do"
    assert (summary["epochs"], summary["steps"], summary["final_train_loss"]) == (0, 0, None)
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and summary["test_loss"] > 0  # initial weights
    assert json.loads((tmp_path / "summary.json").read_text()) == summary


class Bomb(Callback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step(self, run, metrics):
        if run.step == self.at_step:
            raise RuntimeError("boom")


def test_a_callback_that_raises_is_named_and_leaves_the_folder_resumable(tmp_path, rng):
    train, val = _loaders(rng)
    clean = fit(TinyNet(), train, val, _config(tmp_path / "clean"), callbacks=[Bomb(None)])
    broken = tmp_path / "broken"
    config = _config(broken, checkpoint_every_steps=1)
    with pytest.raises(
        CallbackError, match=r"callback Bomb.on_step raised at step 6: RuntimeError: boom"
    ):
        fit(TinyNet(), train, val, config, callbacks=[Bomb(6)])
    assert CheckpointManager(broken / "checkpoints").latest_step() == 5  # nothing of step 6
    history = json.loads((broken / "history.json").read_text())
    assert [h["step"] for h in history] == [4]
    assert not (broken / "summary.json").exists()
    assert not list(broken.rglob("*.tmp"))
    resumed = fit(
        TinyNet(),
        train,
        val,
        _config(broken, checkpoint_every_steps=1, resume=True),
        callbacks=[Bomb(None)],
    )

    def strip(hs):
        return [
            {k: v for k, v in h.items() if k not in ("seconds", "images_per_second")} for h in hs
        ]

    assert strip(resumed["history"]) == strip(clean["history"])
    for a, b in zip(
        jax.tree.leaves(clean["state"].params),
        jax.tree.leaves(resumed["state"].params),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


class Unsaveable(Callback):
    def state_dict(self):
        return {"array": np.zeros(2)}


def test_callback_state_must_be_json(tmp_path, rng):
    train, val = _loaders(rng)
    with pytest.raises(CallbackError, match="Unsaveable.state_dict: expected a JSON-serializable"):
        fit(TinyNet(), train, val, _config(tmp_path, epochs=1), callbacks=[Unsaveable()])


def test_best_checkpoint_keeps_the_best_evaluation_of_any_metric(tmp_path, rng):
    train, val = _loaders(rng)

    def error_rate(logits, labels):
        return 1.0 - jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))

    keeper = BestCheckpoint("val_loss", mode="min", directory="best")
    result = fit(
        TinyNet(),
        train,
        val,
        _config(tmp_path, epochs=3, eval_every_steps=1, learning_rate=0.05),
        metrics={"error": error_rate},
        callbacks=[keeper, BestCheckpoint("val_error", mode="min", directory="best_error")],
    )
    evaluations = result["evaluations"]
    best = min(evaluations, key=lambda e: e["val_loss"])
    assert keeper.best_step == best["step"] and math.isclose(keeper.best, best["val_loss"])
    assert CheckpointManager(tmp_path / "best").steps() == [best["step"]]
    first_lowest_error = min(evaluations, key=lambda e: (e["val_error"], e["step"]))
    assert CheckpointManager(tmp_path / "best_error").steps() == [first_lowest_error["step"]]
    # the reloaded best checkpoint reproduces the evaluation that made it best
    run = load_run(tmp_path, which="best")
    assert run.step == best["step"]
    images, labels = val.examples
    report = run.evaluate(np.asarray(images), np.asarray(labels))
    assert report["loss"] == pytest.approx(best["val_loss"], rel=1e-5)
    assert report["accuracy"] == pytest.approx(best["val_accuracy"])


def test_monitor_callbacks_take_numpy_settings_and_refuse_infinite_delta():
    stopper = EarlyStopping(patience=np.int64(2), min_delta=np.float32(0.5))
    assert stopper.patience == 2 and type(stopper.patience) is int
    assert BestCheckpoint(min_delta=np.float64(0.1)).min_delta == pytest.approx(0.1)
    with pytest.raises(ValueError, match="min_delta: expected a finite number >= 0, got inf"):
        EarlyStopping(min_delta=float("inf"))
    with pytest.raises(TypeError, match="patience"):  # a bool is no count (was a ValueError)
        EarlyStopping(patience=np.bool_(True))


@pytest.mark.parametrize(
    "directory", ["../elsewhere", "checkpoints", "best.json", ".lock", "", "latest"]
)
def test_best_checkpoint_directory_stays_out_of_the_runs_own_files(directory):
    # "checkpoints" mixed its checkpoints with the run's; "../elsewhere" wrote outside the folder
    with pytest.raises(ValueError, match="directory: expected a folder name inside the run folder"):
        BestCheckpoint(directory=directory)


@pytest.mark.parametrize("bad", [3, None, True, ["best"], b"best"])
def test_a_mode_or_directory_of_the_wrong_type_is_a_type_error(bad):
    # mode and directory took any non-string (None, 3, a list) as a wrong value: a ValueError
    with pytest.raises(TypeError, match="mode: expected one of 'min', 'max'"):
        EarlyStopping(mode=bad)
    with pytest.raises(TypeError, match="mode: expected one of 'min', 'max'"):
        BestCheckpoint(mode=bad)
    with pytest.raises(TypeError, match=r"directory: expected a folder name \(str\)"):
        BestCheckpoint(directory=bad)


def test_best_checkpoint_directory_may_be_nested():
    assert BestCheckpoint(directory="best/by_loss").directory == "best/by_loss"


@pytest.mark.parametrize(
    ("first", "second"), [("best", "best"), ("best", "./best/"), ("best", "best/by_loss")]
)
def test_two_best_checkpoints_in_one_folder_are_refused(tmp_path, rng, first, second):
    # each keeps one checkpoint and deleted the other's; nothing is written before the refusal
    train, val = _loaders(rng)
    callbacks = [BestCheckpoint("val_loss", mode="min", directory=first)]
    callbacks.append(BestCheckpoint(directory=second))
    refused = r"callbacks\[1\]: BestCheckpoint\(directory=.* saves into"
    with pytest.raises(ValueError, match=refused):
        fit(TinyNet(), train, val, _config(tmp_path / "run"), callbacks=callbacks)
    assert not (tmp_path / "run").exists()
    fit(
        TinyNet(),
        train,
        val,
        _config(tmp_path / "apart"),
        callbacks=[callbacks[0], BestCheckpoint(directory="best_accuracy")],
    )
    assert (tmp_path / "apart" / "best_accuracy").is_dir()


def _file_bytes(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    "damaged, error", [("best.json", RunFolderError), ("best/index.json", CheckpointError)]
)
def test_a_damaged_best_checkpoint_record_stops_a_resume_before_anything_is_written(
    tmp_path, rng, damaged, error
):
    # it was found at the first improvement after the resume: config.json already rewritten and
    # training done, then a CallbackError
    train, val = _loaders(rng)
    config = _config(tmp_path, epochs=2, eval_every_steps=1, checkpoint_every_steps=2)
    fit(TinyNet(), train, val, config, callbacks=[BestCheckpoint("val_loss", mode="min")])
    shutil.rmtree(tmp_path / "checkpoints" / "step_00000008")  # as if killed after step 6
    path = tmp_path / damaged
    path.write_text(path.read_text()[:5])
    before = _file_bytes(tmp_path)
    resume = dataclasses.replace(config, resume=True)
    with pytest.raises(error, match=re.escape(str(path))):
        fit(TinyNet(), train, val, resume, callbacks=[BestCheckpoint("val_loss", mode="min")])
    assert _file_bytes(tmp_path) == before


class NotADict(Callback):
    def state_dict(self):
        return [1, 2]


class TupleState(Callback):
    def state_dict(self):
        return {"best": [{"at": (3, 0.5)}]}


class IntKeys(Callback):
    def state_dict(self):
        return {"per_step": {3: 0.5}}


@pytest.mark.parametrize(
    "callback, says",
    [
        (Unsaveable(), "TypeError: Object of type ndarray is not JSON serializable"),
        (NotADict(), r"TypeError: it returned a list, \[1, 2\]"),
        # JSON would give them back changed (a list, a str key): the resumed callback would differ
        (TupleState(), r"state\['best'\]\[0\]\['at'\] is a tuple, \(3, 0.5\), which JSON reads"),
        (
            IntKeys(),
            r"state\['per_step'\] has the key 3 \(int\), which JSON reads back as the "
            r'str "3"',
        ),
    ],
)
def test_a_callback_state_that_cannot_be_saved_is_refused_before_anything_is_written(
    tmp_path, rng, callback, says
):
    # it failed at the first checkpoint, after history.json was written (or, a list, was saved)
    train, val = _loaders(rng)
    out = tmp_path / "run"
    with pytest.raises(CallbackError, match=rf"state_dict: expected a JSON-serializable .*{says}"):
        fit(TinyNet(), train, val, _config(out, epochs=1), callbacks=[callback])
    assert not out.exists()
