"""Run folders: one owner (an OS lock), the full configuration, resume and overwrite rules, and
nothing touched by a refused start."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn.data import Loader
from jcnn.train import (
    BestCheckpoint,
    CheckpointManager,
    EarlyStopping,
    TrainConfig,
    fit,
    run_folder,
)
from jcnn.train.run_folder import RunFolderError


class Net(nn.Module):
    width: int = 3

    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dense(self.width)(jnp.mean(x, axis=(1, 2)))


def _loader(batch_size=16, seed=3, data_seed=0):
    rng = np.random.default_rng(data_seed)
    images = rng.normal(size=(32, 4, 4, 1)).astype(np.float32)
    labels = rng.integers(0, 3, size=32).astype(np.int32)
    return Loader(images, labels, batch_size=batch_size, shuffle=True, seed=seed)


def _mean_squared_logits(logits, labels):
    return jnp.mean(logits**2, axis=-1)


def _config(out, **kw):
    base = dict(epochs=1, learning_rate=0.01, out=str(out), progress=False, schedule="constant")
    return TrainConfig(**{**base, **kw})


def _resume(run):
    return fit(
        Net(),
        _loader(),
        None,
        _config(run, resume=True),
        settings={"dataset": "toy", "data_dir": "/a"},
    )


def _snapshot(folder):
    """Every file under ``folder`` with its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "run"
    fit(Net(), _loader(), None, _config(out), settings={"dataset": "toy", "data_dir": "/a"})
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    config = json.loads((copy / "config.json").read_text())
    config["train"]["out"] = str(copy)  # as if it had been trained there
    (copy / "config.json").write_text(json.dumps(config, indent=1))
    return copy


def test_config_records_the_whole_run(finished_run):
    record = json.loads((finished_run / "config.json").read_text())
    import jcnn

    assert record["jcnn_version"] == jcnn.__version__
    fields = TrainConfig.__dataclass_fields__
    assert set(record["train"]) == set(fields)  # every TrainConfig field
    assert record["model"] == {"class": f"{Net.__module__}.Net", "width": 3}
    loader = record["train_loader"]
    assert (loader["batch_size"], loader["seed"], loader["shuffle"]) == (16, 3, True)
    assert (loader["num_examples"], loader["batches_per_epoch"]) == (32, 2)
    images, labels = _loader().examples
    digest = hashlib.sha256()
    for array in (np.asarray(images), np.asarray(labels)):
        digest.update(f"{array.shape} {array.dtype};".encode() + array.tobytes())
    assert loader["examples"] == f"32 examples, sha256:{digest.hexdigest()[:16]}"
    assert record["settings"] == {"dataset": "toy", "data_dir": "/a"}
    assert not (finished_run / run_folder.LOCK_FILE).exists()  # released at the end


@pytest.mark.parametrize(
    "change, named",
    [
        (dict(config=dict(learning_rate=0.02)), "learning_rate: 0.01 in the run, 0.02 now"),
        (dict(config=dict(optimizer="sgd")), "optimizer"),
        (dict(config=dict(seed=1)), "seed"),
        (dict(config=dict(compute_dtype="bfloat16")), "compute_dtype"),
        (dict(config=dict(schedule="cosine", epochs=2)), "schedule"),
        (dict(model=Net(width=4)), "model.width: 3 in the run, 4 now"),
        (dict(loader=_loader(batch_size=8)), "train_loader.batch_size: 16 in the run, 8 now"),
        (dict(loader=_loader(seed=4)), "train_loader.seed"),
        (dict(loader=_loader(data_seed=1)), "train_loader.examples: 32 examples, sha256:"),
        (dict(settings={"dataset": "other", "data_dir": "/a"}), "settings.dataset"),
        (dict(config=dict(val_split=8)), "val_split: null in the run, 8 now"),
        (dict(config=dict(standardize="per_channel")), "standardize: null in the run"),
        (dict(config=dict(monitor="train_loss")), "monitor: val_accuracy in the run"),
        (dict(config=dict(max_steps=1, schedule="cosine")), "max_steps"),
        (dict(fit=dict(loss=_mean_squared_logits)), "loss: null in the run"),
        (dict(fit=dict(metrics={"top": _mean_squared_logits})), "metrics"),
    ],
)
def test_resume_with_other_settings_is_refused_and_touches_nothing(run, change, named):
    before = _snapshot(run)
    config = _config(run, resume=True, **change.get("config", {}))
    settings = change.get("settings", {"dataset": "toy", "data_dir": "/a"})
    with pytest.raises(RunFolderError, match="cannot resume") as error:
        fit(
            change.get("model", Net()),
            change.get("loader", _loader()),
            None,
            config,
            settings=settings,
            **change.get("fit", {}),
        )
    assert named in str(error.value)
    assert len(str(error.value)) < 1000 and "\n" not in str(error.value)
    assert error.value.differences
    assert _snapshot(run) == before


def test_a_loader_with_other_augmentation_is_refused_on_resume(run):
    # the record read data.Loader's private _augment after it became public: no augmentation was
    # recorded, and a resume that added one (or changed it) went on silently
    from jcnn.data import augment

    assert json.loads((run / "config.json").read_text())["train_loader"]["augment"] is None
    images, labels = _loader().examples
    flipped = Loader(images, labels, batch_size=16, seed=3, augment=augment.random_hflip)
    before = _snapshot(run)
    with pytest.raises(RunFolderError, match="train_loader.augment: null in the run, jcnn.data"):
        fit(
            Net(),
            flipped,
            None,
            _config(run, resume=True),
            settings={"dataset": "toy", "data_dir": "/a"},
        )
    assert _snapshot(run) == before


def test_a_folder_recorded_without_the_augmentation_resumes(run):
    record = json.loads((run / "config.json").read_text())
    del record["train_loader"]["augment"], record["train_loader"]["batch_augment"]
    (run / "config.json").write_text(json.dumps(record, indent=1))
    config = _config(run, resume=True, epochs=2)
    result = fit(Net(), _loader(), None, config, settings={"dataset": "toy", "data_dir": "/a"})
    assert [h["epoch"] for h in result["history"]] == [1, 2]


def test_a_folder_recorded_before_the_examples_were_resumes(run):
    record = json.loads((run / "config.json").read_text())
    del record["train_loader"]["examples"]
    (run / "config.json").write_text(json.dumps(record, indent=1))
    config = _config(run, resume=True, epochs=2)
    result = fit(Net(), _loader(), None, config, settings={"dataset": "toy", "data_dir": "/a"})
    assert [h["epoch"] for h in result["history"]] == [1, 2]


def test_settings_that_may_change_on_resume(run):
    settings = {"dataset": "toy", "data_dir": "/moved"}
    config = _config(run, resume=True, epochs=2, keep_last=5, progress=False, steps_per_call=2)
    result = fit(Net(), _loader(), None, config, settings=settings)  # constant: epochs may grow
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    record = json.loads((run / "config.json").read_text())
    assert record["train"]["epochs"] == 2 and record["settings"]["data_dir"] == "/moved"
    assert record["train"]["steps_per_call"] == 2
    # a run recorded before steps_per_call existed resumes with any
    del record["train"]["steps_per_call"]
    assert not run_folder.differences(
        record, {**record, "train": {**record["train"], "steps_per_call": 4}}
    )


def test_a_run_recorded_before_no_grad_existed_resumes_only_without_it():
    old = {"train": {"schedule": "cosine", "epochs": 4}}
    assert not run_folder.differences(old, {"train": {**old["train"], "no_grad": []}})
    changed = run_folder.differences(old, {"train": {**old["train"], "no_grad": ["conv/*"]}})
    assert changed == [("train.no_grad", "(absent)", ["conv/*"])]
    recorded = {"train": {**old["train"], "no_grad": {"whiten/bias": 3}}}
    assert run_folder.differences(recorded, {"train": {**old["train"], "no_grad": []}})


def test_a_run_recorded_before_clip_value_existed_resumes_only_without_it():
    old = {"train": {"schedule": "cosine", "clip_norm": None}}
    assert not run_folder.differences(old, {"train": {**old["train"], "clip_value": None}})
    changed = run_folder.differences(old, {"train": {**old["train"], "clip_value": 0.5}})
    assert changed == [("train.clip_value", "(absent)", 0.5)]


def test_a_cli_run_recorded_before_no_grad_existed_resumes():
    # jcnn-train records no --no-grad as an empty mapping ({}), not []: its run folders from
    # before no_grad existed were refused on --resume ("--no-grad: (absent) in the run, {} now")
    old = {"train": {"schedule": "cosine", "epochs": 4}}
    assert not run_folder.differences(old, {"train": {**old["train"], "no_grad": {}}})
    changed = run_folder.differences(old, {"train": {**old["train"], "no_grad": {"conv/*": 0}}})
    assert changed == [("train.no_grad.conv/*", "(absent)", 0)]


@pytest.mark.parametrize(
    ("before", "after", "shown"),
    [
        ({}, {"conv1/kernel": 0}, '--no-grad: {} in the run, {"conv1/kernel": 0} now'),
        ({"fc/bias": 1}, {}, '--no-grad: {"fc/bias": 1} in the run, {} now'),
        # a value where the other side has a table (no augmentation, then one): was
        # "null in the run, (absent) now" and the table's entries apart
        (None, {"function": "f"}, '--no-grad: null in the run, {"function": "f"} now'),
        ({"function": "f"}, 3, '--no-grad: {"function": "f"} in the run, 3 now'),
    ],
)
def test_a_table_emptied_or_filled_on_resume_is_one_setting(before, after, shown):
    # an empty --no-grad against a given one was two settings, one of them false:
    # "--no-grad: {} in the run, (absent) now; no_grad.conv1/kernel: (absent) in the run, 0 now"
    train = {"schedule": "cosine", "epochs": 4}
    found = run_folder.differences(
        {"train": {**train, "no_grad": before}}, {"train": {**train, "no_grad": after}}
    )
    assert found == [("train.no_grad", before, after)]
    assert run_folder.format_differences(found, {"train.no_grad": "--no-grad"}) == shown


def test_epochs_may_not_change_when_the_schedule_depends_on_them():
    old = {"train": {"schedule": "cosine", "epochs": 4}}
    assert run_folder.differences(old, {"train": {"schedule": "cosine", "epochs": 8}})
    for name in run_folder.LENGTH_FREE_SCHEDULES:
        old = {"train": {"schedule": name, "epochs": 4}}
        assert not run_folder.differences(old, {"train": {"schedule": name, "epochs": 8}})


def test_length_and_engine_settings_on_resume():
    """max_steps follows the epochs rule; a schedule of the user's own (a callable rate or an optax
    optimizer) never depends on the run's length; the evaluation cadence and the callbacks may
    change; what defines the computation (split, standardization, loss, metrics, monitor) may
    not."""
    base = {"schedule": "cosine", "epochs": 4, "max_steps": None, "optimizer": "adam"}
    cosine = {"train": {**base, "learning_rate": 0.001}}
    longer = {"train": {**base, "learning_rate": 0.001, "max_steps": 50, "epochs": 8}}
    assert [d[0] for d in run_folder.differences(cosine, longer)] == [
        "train.epochs",
        "train.max_steps",
    ]
    constant = {"train": {**cosine["train"], "schedule": "constant"}}
    assert not run_folder.differences(
        constant, {"train": {**longer["train"], "schedule": "constant"}}
    )
    own_rate = {"train": {**base, "learning_rate": "mymodule.warmup_cosine"}}
    assert not run_folder.differences(own_rate, {"train": {**own_rate["train"], "epochs": 9}})
    optax_chain = {"train": {**base, "learning_rate": 0.001, "optimizer": ["optax.f", "optax.g"]}}
    assert not run_folder.differences(
        optax_chain, {"train": {**optax_chain["train"], "max_steps": 7}}
    )
    may = {"eval_every_steps": 5, "eval_batch_size": 10, "test_every_epoch": True}
    may["callbacks"] = [{"class": "jcnn.train.callbacks.EarlyStopping", "patience": 9}]
    assert not run_folder.differences(cosine, {"train": {**cosine["train"], **may}})
    for name, value in [
        ("val_split", 100),
        ("val_split_seed", 1),
        ("standardize", "per_channel"),
        ("loss", "mymodule.focal"),
        ("metrics", {"top5": "mymodule.top5"}),
        ("monitor", "val_loss"),
        ("monitor_mode", "min"),
    ]:
        found = run_folder.differences(cosine, {"train": {**cosine["train"], name: value}})
        assert found and found[0][0].startswith(f"train.{name}"), (name, found)


def test_resume_without_checkpoints_is_refused(run, tmp_path):
    shutil.rmtree(run / "checkpoints")
    before = _snapshot(run)
    with pytest.raises(RunFolderError, match="nothing to resume.*checkpoints are gone"):
        fit(Net(), _loader(), None, _config(run, resume=True))
    assert _snapshot(run) == before
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step_00000002").write_text("not a checkpoint")
    before = _snapshot(run)
    with pytest.raises(RunFolderError, match="nothing to resume.*checkpoints are gone"):
        fit(Net(), _loader(), None, _config(run, resume=True))
    assert _snapshot(run) == before
    for empty in (tmp_path / "never", tmp_path / "empty"):
        if empty.name == "empty":
            empty.mkdir()
        with pytest.raises(RunFolderError, match="nothing to resume"):
            fit(Net(), _loader(), None, _config(empty, resume=True))
    assert not (tmp_path / "never").exists()


def test_a_run_stopped_before_its_first_checkpoint_is_advised_what_works(tmp_path):
    # the refused resume advised "a new run without resume", which the folder refuses as well
    from jcnn.train import Callback, CallbackError

    class Boom(Callback):
        def on_step(self, run, metrics):
            raise RuntimeError("boom")

    out = tmp_path / "run"
    with pytest.raises(CallbackError, match="Boom.on_step"):
        fit(Net(), _loader(), None, _config(out), callbacks=[Boom()])
    with pytest.raises(RunFolderError, match="nothing to resume") as refused:
        fit(Net(), _loader(), None, _config(out, resume=True))
    assert "without resume" not in str(refused.value)
    assert "start over with overwrite (which deletes config.json, run.json" in str(refused.value)
    with pytest.raises(RunFolderError, match="already holds a run"):
        fit(Net(), _loader(), None, _config(out))
    assert fit(Net(), _loader(), None, _config(out, overwrite=True))["summary"]["steps"] == 2


@pytest.mark.parametrize("name", ["run.json", "standardize.npz", "history.json", "summary.json"])
def test_a_run_file_replaced_by_a_folder_stops_a_resume_before_anything_is_written(run, name):
    path = run / name
    if path.exists():
        path.unlink()
    path.mkdir()
    before = _snapshot(run)
    with pytest.raises(
        RunFolderError, match=rf"cannot resume .*: expected files, got a folder .* at {name};"
    ):
        _resume(run)
    assert _snapshot(run) == before and path.is_dir()


def test_a_new_run_into_a_used_folder_needs_overwrite(run):
    (run / "notes.txt").write_text("mine")
    before = _snapshot(run)
    with pytest.raises(RunFolderError, match="already holds a run.*overwrite"):
        fit(Net(), _loader(), None, _config(run, learning_rate=0.5))
    assert _snapshot(run) == before
    with pytest.raises(RunFolderError, match="exclude each other"):
        fit(Net(), _loader(), None, _config(run, resume=True, overwrite=True))
    fit(Net(width=5), _loader(), None, _config(run, overwrite=True))
    record = json.loads((run / "config.json").read_text())
    assert record["model"]["width"] == 5
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files were replaced


def test_overwrite_deletes_the_old_runs_jcnn_eval_results(run, tmp_path):
    # jcnn-eval writes them into the run folder: left behind, they would report the old run's
    # accuracy as the new one's
    (run / "evaluation.json").write_text('{"accuracy": 0.99}')
    (run / "confusion_matrix.png").write_bytes(b"\x89PNG")
    fit(Net(width=5), _loader(), None, _config(run, overwrite=True))
    assert not (run / "evaluation.json").exists()
    assert not (run / "confusion_matrix.png").exists()
    evaluated = tmp_path / "evaluated"
    evaluated.mkdir()
    (evaluated / "evaluation.json").write_text("{}")
    with pytest.raises(RunFolderError, match=r"already holds a run \(evaluation.json\)"):
        fit(Net(), _loader(), None, _config(evaluated))


def test_a_callback_refusing_the_configuration_leaves_the_folder_as_it_was(run, tmp_path):
    before = _snapshot(run)
    with pytest.raises(ValueError, match="EarlyStopping.on_train_begin.*no validation set"):
        fit(Net(), _loader(), None, _config(run, overwrite=True), callbacks=[EarlyStopping()])
    assert _snapshot(run) == before  # the old run is still there, untouched
    new = tmp_path / "new"
    with pytest.raises(ValueError, match="BestCheckpoint.on_train_begin.*not an evaluation"):
        fit(Net(), _loader(), _loader(), _config(new), callbacks=[BestCheckpoint("val_f1")])
    assert not new.exists()
    for _ in range(2):  # the second overwrite deletes the first one's best checkpoint
        fit(
            Net(),
            _loader(),
            _loader(),
            _config(run, overwrite=True),
            callbacks=[BestCheckpoint("val_loss", mode="min")],
        )
        assert CheckpointManager(run / "best").steps() == [2]


def test_overwrite_deletes_a_nested_best_folder_and_the_parents_it_emptied(run):
    for directory, notes in [("by/val/loss", None), ("kept/loss", "kept/notes.txt")]:
        callbacks = [BestCheckpoint("val_loss", mode="min", directory=directory)]
        fit(Net(), _loader(), _loader(), _config(run, overwrite=True), callbacks=callbacks)
        assert CheckpointManager(run / directory).steps() == [2]
        if notes:
            (run / notes).write_text("mine")
    fit(Net(), _loader(), None, _config(run, overwrite=True))
    assert not (run / "by").exists() and not (run / "kept" / "loss").exists()
    assert (run / "kept" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "mistake, message",
    [
        (dict(loss=lambda logits, labels: logits), "expected one loss per example"),
        (
            dict(metrics={"top": lambda logits, labels: logits[0]}),
            "metric 'top'.*expected a scalar",
        ),
    ],
)
def test_a_loss_or_metric_that_does_not_fit_is_refused_before_anything_is_written(
    run, tmp_path, mistake, message
):
    before = _snapshot(run)
    with pytest.raises(ValueError, match=message):
        fit(Net(), _loader(), _loader(), _config(run, overwrite=True), **mistake)
    assert _snapshot(run) == before
    new = tmp_path / "new"
    with pytest.raises(ValueError, match=message):
        fit(Net(), _loader(), _loader(), _config(new), **mistake)
    assert not new.exists()


def test_a_folder_that_cannot_be_created_is_refused(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    for folder in (blocker, blocker / "run"):
        with pytest.raises(
            RunFolderError,
            match=f"run folder {folder} (exists and is not a directory|cannot be created)",
        ):
            fit(Net(), _loader(), None, _config(folder))
    assert blocker.read_text() == "mine"


HOLDER = textwrap.dedent(
    """
    import sys, time
    from jcnn.train import run_folder
    lock = run_folder.claim(sys.argv[1])
    print("locked", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def held(tmp_path):
    """A run folder locked by another process (killed with SIGKILL at the end)."""
    folder = tmp_path / "held"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "locked"
    yield folder, holder
    holder.kill()
    holder.wait()


def test_a_folder_has_one_owner(held):
    folder, holder = held
    before = _snapshot(folder)
    with pytest.raises(RunFolderError, match=f"in use by another process \\(pid {holder.pid}"):
        run_folder.claim(folder)
    with pytest.raises(RunFolderError, match="in use"):
        fit(Net(), _loader(), None, _config(folder))
    assert _snapshot(folder) == before
    holder.send_signal(signal.SIGKILL)  # the OS releases the lock of a dead process
    holder.wait()
    with run_folder.claim(folder):
        with run_folder.claim(folder):  # reentrant within a process
            pass
        assert (folder / run_folder.LOCK_FILE).read_text().split()[0] == str(os.getpid())
    assert not (folder / run_folder.LOCK_FILE).exists()


def test_a_long_setting_is_shown_where_the_run_and_now_differ():
    # a described optimizer runs to thousands of characters; its first 77 were shown, the same
    # on both sides, so the message named the setting but hid what changed
    inner = [{"function": f"optax.step_{i}", "captured": [0.5]} for i in range(30)]
    before = [{"function": "lookahead", "captured": [*inner, {"steps": 15}]}]
    after = [{"function": "lookahead", "captured": [*inner, {"steps": 30}]}]
    message = run_folder.format_differences([("train.optimizer", before, after)])
    shown_before, shown_after = re.fullmatch(
        r"optimizer: \.\.\.(.{1,60}?)(?:\.\.\.)? in the run, \.\.\.(.{1,60}?)(?:\.\.\.)? now",
        message,
    ).groups()
    assert '{"steps": 15}' in shown_before and '{"steps": 30}' in shown_after
    short = run_folder.format_differences([("train.lr", 2, 3), ("model.width", "a", "b")])
    assert short == "lr: 2 in the run, 3 now; model.width: a in the run, b now"
    empty = run_folder.format_differences([("settings.augment", "", "random_hflip")])
    assert empty == 'settings.augment: "" in the run, random_hflip now'  # was blank


def test_describe_never_shows_a_memory_address():
    import functools

    from jcnn.data import augment

    op = augment.compose(functools.partial(augment.random_crop, padding=4), augment.random_hflip)
    described = json.dumps(run_folder.describe(op))
    assert "0x" not in described and "padding" in described and "random_hflip" in described
    assert run_folder.describe(jnp.float32) == "jax.numpy.float32"
    assert run_folder.describe(np.float32(0.5)) == 0.5
    assert run_folder.describe(float("nan")) == "nan"


def test_describe_records_a_typed_prng_key():
    # a setting holding a jax.random.key (optax.noisy_sgd(key=...) captures one) failed the run
    # record with NumPy's raw "JAX array with PRNGKey dtype cannot be converted"
    key = jax.random.key(3)
    assert run_folder.describe(key) == {"key": "threefry2x32", "data": [0, 3]}
    rbg = run_folder.describe(jax.random.key(3, impl="rbg"))
    assert rbg["key"] == "rbg" and rbg != run_folder.describe(key)

    def noisy(k):
        return lambda grads: grads + jax.random.key_data(k)[0]

    config = TrainConfig(progress=False)
    old = run_folder.run_record(config, settings={"noise": noisy(key)})
    new = run_folder.run_record(config, settings={"noise": noisy(jax.random.key(4))})
    assert old["settings"]["noise"]["captured"] == [{"key": "threefry2x32", "data": [0, 3]}]
    assert [d[0] for d in run_folder.differences(old, new)] == ["settings.noise.captured"]


def test_describe_lists_what_a_set_holds():
    # every set was described as "<builtins.set>", so two configurations differing only in a set
    # (here a closure's) recorded the same and a resume with the other set was accepted
    def keep(classes):
        return lambda labels: np.isin(labels, list(classes))

    config = TrainConfig(progress=False)
    old = run_folder.run_record(config, settings={"filter": keep({1, 2}), "names": {"b", "a"}})
    new = run_folder.run_record(config, settings={"filter": keep({1, 3}), "names": {"a", "b"}})
    assert old["settings"]["filter"]["captured"] == [[1, 2]]
    assert old["settings"]["names"] == ["a", "b"]  # sorted: string hashes differ per process
    assert run_folder.differences(old, new) == [("settings.filter.captured", [[1, 2]], [[1, 3]])]
    # a record from before, which could not tell sets apart, still resumes
    older = json.loads(json.dumps(old).replace("[[1, 2]]", '["<builtins.set>"]'))
    assert older["settings"]["filter"]["captured"] == ["<builtins.set>"]
    assert run_folder.differences(older, new) == []


def test_describe_tells_nested_optax_optimizers_apart():
    # describe cut at depth 8, where multi_transform's groups hold their learning rates: a
    # resume with another rate for a parameter group recorded the same and was accepted
    import optax

    from jcnn.train import label_by_path

    def grouped(rate):
        groups = {"kernels": optax.adam(rate), "rest": optax.sgd(1e-2)}
        return optax.MultiSteps(
            optax.multi_transform(groups, label_by_path([("*kernel", "kernels")], "rest")), 2
        )

    old = run_folder.run_record(TrainConfig(optimizer=grouped(1e-3), progress=False))
    new = run_folder.run_record(TrainConfig(optimizer=grouped(0.5), progress=False))
    assert "..." not in json.dumps(old)
    assert [key for key, _, _ in run_folder.differences(old, new)] == ["train.optimizer.opt"]
    # a record an older version cut short still resumes
    cut = json.loads(json.dumps(old).replace("-0.001", '"..."'))
    assert run_folder.differences(cut, new) == []


def test_describe_names_a_closure_that_captures_itself():
    def schedule(step):
        return 0.1 if step < 1 else schedule(step - 1) / 2

    assert run_folder.describe(schedule) == {
        "function": f"{__name__}.{schedule.__qualname__}",
        "captured": [f"<recursive {__name__}.{schedule.__qualname__}>"],
    }


_OWN_CODE = """
import jax.numpy as jnp
import flax.linen as nn

def scale(x, k=2.0):
    "Scales x."
    return x * k

loss = lambda logits, labels: scale(logits)[:, 0]

def in_set(name):
    return name in {"alpha", "beta", "gamma", "delta", "epsilon"}

class Model(nn.Module):
    width: int = 3

    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dense(self.width)(jnp.mean(x, axis=(1, 2)))
"""


def _own_module(monkeypatch, tmp_path, source):
    """``source`` as the researcher's module ``own_study`` (a file of theirs, not a package)."""
    path = tmp_path / "own_study.py"
    path.write_text(source)
    module = type(sys)("own_study")
    module.__file__ = str(path)
    monkeypatch.setitem(sys.modules, "own_study", module)
    exec(compile(source, str(path), "exec"), module.__dict__)
    return module


def _own_record(monkeypatch, tmp_path, source):
    module = _own_module(monkeypatch, tmp_path, source)
    config = TrainConfig(progress=False, loss=module.loss)
    model = module.Model(width=3)
    return run_folder.run_record(config, model, settings={"transform": module.scale})


def test_the_code_of_the_researchers_own_functions_and_model_is_compared(monkeypatch, tmp_path):
    # config.json named functions only: a resume with an edited lambda, an edited function of the
    # same name, another default argument or an edited model class recorded the same and resumed
    old = _own_record(monkeypatch, tmp_path, _OWN_CODE)
    # jcnn's, jax's and flax's own code is not digested
    assert set(old["code"]) == {"own_study.<lambda>", "own_study.scale", "own_study.Model"}
    unchanged = [
        _OWN_CODE,
        _OWN_CODE.replace('"Scales x."', '"Multiplies x by k."  # a comment'),
        _OWN_CODE.replace("(x, k=2.0)", "(values, k=2.0)").replace("x * k", "values * k"),
        "# moved down\n\n\n" + _OWN_CODE,
        # the __init__ dataclasses generate changes with the fields' defaults (recorded apart)
        _OWN_CODE.replace("width: int = 3", "width: int = 4"),
    ]
    for source in unchanged:
        assert run_folder.differences(old, _own_record(monkeypatch, tmp_path, source)) == []
    edits = {
        "own_study.scale": [("k=2.0", "k=3.0"), ("x * k", "x + k")],
        "own_study.<lambda>": [("[:, 0]", "[:, 1]"), ("scale(logits)", "scale(-logits)")],
        "own_study.Model": [("jnp.mean(x", "jnp.max(x"), ("axis=(1, 2)", "axis=(2, 1)")],
    }
    for owner, replacements in edits.items():
        for before, after in replacements:
            new = _own_record(monkeypatch, tmp_path, _OWN_CODE.replace(before, after))
            (found,) = run_folder.differences(old, new)
            assert found[0] == f"code of {owner}", (before, after)
            assert re.fullmatch(r"sha256:[0-9a-f]{16}", found[1]) and found[1] != found[2]
    # a record from before digests, or from another Python version, compares names only
    older = {key: value for key, value in old.items() if key != "code"}
    edited = _own_record(monkeypatch, tmp_path, _OWN_CODE.replace("x * k", "x + k"))
    assert run_folder.differences(older, edited) == []
    other_python = json.loads(json.dumps(old).replace(sys.implementation.cache_tag, "cpython-399"))
    assert run_folder.differences(other_python, edited) == []


def test_the_code_digest_is_the_same_in_every_process(monkeypatch, tmp_path):
    # a set literal compiles to a frozenset constant, whose order depends on the process's hash seed
    module = _own_module(monkeypatch, tmp_path, _OWN_CODE)
    ours = run_folder.run_record(TrainConfig(progress=False), settings={"keep": module.in_set})
    script = textwrap.dedent(
        f"""
        import json, sys
        sys.path.insert(0, {str(tmp_path)!r})
        import own_study
        from jcnn.train import TrainConfig, run_folder
        settings = {{"keep": own_study.in_set}}
        record = run_folder.run_record(TrainConfig(progress=False), settings=settings)
        print(json.dumps(record["code"]))
        """
    )
    environment = {**os.environ, "PYTHONHASHSEED": "12345"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=environment
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ours["code"] != {}


def test_a_resume_with_an_edited_loss_is_refused(run):
    def loss(logits, labels):
        return jnp.mean(logits**2, axis=-1)

    def edited(logits, labels):
        return jnp.mean(logits**4, axis=-1)

    edited.__qualname__ = loss.__qualname__
    settings = {"dataset": "toy", "data_dir": "/a"}
    shutil.rmtree(run)
    fit(Net(), _loader(), None, _config(run, loss=loss), settings=settings)
    before = _snapshot(run)
    with pytest.raises(RunFolderError, match=r"code of .*\.loss: sha256:\w+ in the run"):
        fit(Net(), _loader(), None, _config(run, resume=True, loss=edited), settings=settings)
    assert _snapshot(run) == before
    fit(Net(), _loader(), None, _config(run, resume=True, epochs=2, loss=loss), settings=settings)


def test_resume_and_overwrite_need_a_folder_and_a_resume_cannot_shrink_the_run(run):
    for flag in ("resume", "overwrite"):
        with pytest.raises(ValueError, match="config.resume, config.overwrite"):
            fit(Net(), _loader(), None, TrainConfig(progress=False, **{flag: True}))
    extended = _config(run, resume=True, epochs=3)
    fit(Net(), _loader(), None, extended, settings={"dataset": "toy", "data_dir": "/a"})
    before = _snapshot(run)
    with pytest.raises(RunFolderError, match="already trained 3 epochs, more than the 2"):
        fit(
            Net(),
            _loader(),
            None,
            _config(run, resume=True, epochs=2),
            settings={"dataset": "toy", "data_dir": "/a"},
        )
    assert _snapshot(run) == before
    with pytest.raises(RunFolderError, match="already trained 6 steps, more than max_steps=5"):
        fit(
            Net(),
            _loader(),
            None,
            _config(run, resume=True, epochs=3, max_steps=5),
            settings={"dataset": "toy", "data_dir": "/a"},
        )
    assert _snapshot(run) == before


@pytest.mark.parametrize("damage", ["flipped_byte", "garbage_index", "missing_manifest"])
def test_a_damaged_checkpoint_stops_a_resume_before_training(run, damage):
    from jcnn.train import CheckpointError

    checkpoints = run / "checkpoints"
    latest = sorted(checkpoints.glob("step_*"))[-1]
    if damage == "flipped_byte":
        data = next(p for p in latest.rglob("*") if p.is_file() and "/d/" in p.as_posix())
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x80
        data.write_bytes(bytes(raw))
        says = f"{latest.name} is corrupt.*differs from its SHA-256"
    elif damage == "garbage_index":
        (checkpoints / "index.json").write_text('{"format": 1, "checkpoints": {"2": ')
        says = "index.json is unreadable"
    else:
        (latest / "manifest.json").unlink()
        says = "has no manifest.json"
    before = _snapshot(run)
    with pytest.raises(CheckpointError, match=says):
        _resume(run)
    assert _snapshot(run) == before


@pytest.mark.parametrize("data", ["text é", b"\x00bytes"])
def test_write_atomically_replaces_whole_files_or_nothing(tmp_path, monkeypatch, data):
    path = tmp_path / "summary.json"
    run_folder.write_atomically(path, data)
    assert path.read_bytes() == (data.encode() if isinstance(data, str) else data)

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(run_folder.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        run_folder.write_atomically(path, "new")
    assert path.read_bytes() == (data.encode() if isinstance(data, str) else data)


def test_write_atomically_syncs_the_file_before_renaming_it(tmp_path, monkeypatch):
    # without the sync, a power loss after the rename could leave the name on an empty file
    events = []
    fsync, replace = run_folder.os.fsync, run_folder.os.replace
    monkeypatch.setattr(run_folder.os, "fsync", lambda fd: events.append("fsync") or fsync(fd))
    monkeypatch.setattr(
        run_folder.os, "replace", lambda *a: events.append("replace") or replace(*a)
    )
    run_folder.write_atomically(tmp_path / "history.json", "[]")
    assert events == ["fsync", "replace"]
    assert (tmp_path / "history.json").read_text() == "[]"


def test_overwrite_deletes_the_best_checkpoints_wherever_they_were_saved(run, tmp_path):
    # a BestCheckpoint(directory=...) other than best/ was left behind by overwrite
    fit(
        Net(),
        _loader(),
        _loader(),
        _config(run, overwrite=True),
        callbacks=[BestCheckpoint("val_loss", mode="min", directory="kept/by_loss")],
    )
    assert CheckpointManager(run / "kept" / "by_loss").steps() == [2]
    (run / "kept" / "notes.txt").write_text("mine")  # not the run's: stays
    fit(Net(), _loader(), None, _config(run, overwrite=True))
    assert not (run / "kept" / "by_loss").exists() and not (run / "best.json").exists()
    assert (run / "kept" / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_an_unreadable_best_json_and_deletes_nothing(run):
    (run / "best.json").write_text("{")
    before = _snapshot(run)
    with pytest.raises(RunFolderError, match="best.json is unreadable"):
        fit(Net(), _loader(), None, _config(run, overwrite=True))
    assert _snapshot(run) == before


def test_describe_records_a_path_whole(tmp_path):
    # a pathlib.Path was recorded by its .name alone: out=Path("/runs/a/run") as "run"
    config = TrainConfig(progress=False, out=tmp_path / "a" / "run")
    record = run_folder.run_record(config, settings={"folders": [tmp_path / "b"]})
    assert record["train"]["out"] == str(tmp_path / "a" / "run")
    assert record["settings"]["folders"] == [str(tmp_path / "b")]


def test_only_finished_checkpoints_count_as_something_to_resume(tmp_path):
    # a folder step_5 or step_00000002.partial.orbax-checkpoint-tmp counted as a checkpoint: the
    # resume passed check_start, then failed with "every checkpoint holds non-finite values"
    (tmp_path / "config.json").write_text('{"train": {}}')
    for name in ("step_5", "step_00000002.partial.orbax-checkpoint-tmp", "step_000000002"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
    with pytest.raises(RunFolderError, match="nothing to resume.*checkpoints are gone"):
        run_folder.check_start(tmp_path, resume=True, overwrite=False)
    (tmp_path / "checkpoints" / "step_00000002").mkdir()
    run_folder.check_start(tmp_path, resume=True, overwrite=False)


def test_a_lock_file_that_cannot_be_opened_is_named(tmp_path):
    # a directory in place of .lock escaped as a raw IsADirectoryError
    (tmp_path / run_folder.LOCK_FILE).mkdir()
    with pytest.raises(RunFolderError, match=r"cannot be locked: .*\.lock cannot be opened"):
        run_folder.claim(tmp_path)
    assert (tmp_path / run_folder.LOCK_FILE).is_dir()


@pytest.mark.parametrize("start", ["new", "resume", "overwrite"])
def test_a_busy_folder_is_named_in_use_whatever_it_holds_so_far(held, finished_run, start):
    # the checks before the lock answered first: "holds no run" to a resume while the owner had
    # written nothing yet, "already holds a run" to a new run once it had written its files
    folder, holder = held
    flags = {"resume": start == "resume", "overwrite": start == "overwrite"}
    with pytest.raises(RunFolderError, match=f"in use by another process \\(pid {holder.pid}"):
        fit(Net(), _loader(), None, _config(folder, **flags))
    shutil.copytree(finished_run, folder, dirs_exist_ok=True)  # the owner's run, written
    before = _snapshot(folder)
    with pytest.raises(RunFolderError, match=f"in use by another process \\(pid {holder.pid}"):
        fit(Net(), _loader(), None, _config(folder, **flags))
    assert _snapshot(folder) == before


def test_two_threads_of_one_process_cannot_share_a_folder(tmp_path):
    # claim was reentrant for the whole process: two fit calls in two threads wrote one folder
    import threading

    errors = []
    with run_folder.claim(tmp_path):
        other = threading.Thread(target=lambda: _claim_into(tmp_path, errors))
        other.start()
        other.join()
    assert len(errors) == 1 and "in use by another thread of this process" in str(errors[0])
    with run_folder.claim(tmp_path):  # free again once the owner released it
        pass


def _claim_into(folder, errors):
    try:
        run_folder.claim(folder).release()
    except RunFolderError as error:
        errors.append(error)


def test_a_recipe_record_of_the_flags_defaults_resumes_as_the_same_run():
    from jcnn.train.run_folder import differences

    # jcnn-train --recipe recorded the --model and --batch-size defaults (lenet5, 128), which a
    # recipe does not use; it now records None there: an old record resumes
    old = {"settings": {"recipe": {"name": "mnist99"}, "model": "lenet5", "batch_size": 128}}
    new = {"settings": {"recipe": {"name": "mnist99"}, "model": None, "batch_size": None}}
    assert differences(old, new) == []
    # any other change of those settings is still one
    other = {"settings": {"recipe": {"name": "mnist99"}, "model": "resnet20", "batch_size": 64}}
    assert differences(old, other) == [
        ("settings.batch_size", 128, 64),
        ("settings.model", "lenet5", "resnet20"),
    ]
    assert [d[0] for d in differences(new, old)] == ["settings.batch_size", "settings.model"]


def test_code_whose_default_arguments_name_it_back_is_recorded(monkeypatch, tmp_path):
    # a default argument naming its own function, a pair naming each other, or a method's default
    # naming its class: the digest recursed until RecursionError
    source = textwrap.dedent(
        """
        def own(x, again=None):
            return x

        def first(x, other=None):
            return x

        def second(x, other=first):
            return x

        class Net:
            def make(self, kind=None):
                return kind

        own.__defaults__ = (own,)
        first.__defaults__ = (second,)
        Net.make.__defaults__ = (Net,)
        """
    )
    module = _own_module(monkeypatch, tmp_path, source)
    settings = {"a": module.own, "b": module.first, "c": module.Net}
    record = run_folder.run_record(TrainConfig(progress=False), settings=settings)
    names = {"own_study.own", "own_study.first", "own_study.second", "own_study.Net"}
    assert set(record["code"]) == names
    again = run_folder.run_record(TrainConfig(progress=False), settings=settings)
    assert run_folder.differences(record, again) == []


def test_adding_or_removing_a_docstring_keeps_the_code_digest(monkeypatch, tmp_path):
    # a docstring added to a function, a nested function or a model's method refused the resume
    old = _own_record(monkeypatch, tmp_path, _OWN_CODE.replace('    "Scales x."\n', ""))
    documented = _OWN_CODE.replace(
        "def __call__(self, x, train: bool):\n",
        'def __call__(self, x, train: bool):\n        """The logits."""\n',
    )
    assert run_folder.differences(old, _own_record(monkeypatch, tmp_path, documented)) == []
    # a string the function returns is still its code
    edited = _OWN_CODE.replace('    "Scales x."\n', '    return "x"\n')
    assert [
        k for k, _, _ in run_folder.differences(old, _own_record(monkeypatch, tmp_path, edited))
    ]


def test_an_edited_property_of_the_model_is_refused(monkeypatch, tmp_path):
    # a property's getter is code of the class, like a method; it was left out of the digest
    source = _OWN_CODE.replace(
        "    @nn.compact\n",
        "    @property\n    def features(self):\n        return self.width * 1\n\n"
        "    @functools.cached_property\n    def scale(self):\n        return 1.0\n\n"
        "    @nn.compact\n",
    ).replace("nn.Dense(self.width)", "nn.Dense(self.features)")
    source = "import functools\n" + source
    old = _own_record(monkeypatch, tmp_path, source)
    assert run_folder.differences(old, _own_record(monkeypatch, tmp_path, source)) == []
    for before, after in [("self.width * 1", "self.width * 2"), ("return 1.0", "return 2.0")]:
        new = _own_record(monkeypatch, tmp_path, source.replace(before, after))
        assert [key for key, _, _ in run_folder.differences(old, new)] == [
            "code of own_study.Model"
        ]


_SUBMODULE_CODE = """
import jax.numpy as jnp
import flax.linen as nn

def helper(logits):
    return logits[:, 0]

loss = lambda logits, labels: helper(logits) ** 2

class Block(nn.Module):
    width: int = 3

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.width)(x)

class Model(nn.Module):
    def setup(self):
        self.block = Block(3)

    def __call__(self, x, train: bool):
        return self.block(jnp.mean(x, axis=(1, 2)))
"""


def test_an_edited_submodule_or_helper_of_the_researchers_code_is_refused(monkeypatch, tmp_path):
    # the model's own submodule classes and the functions a loss calls were not digested: only
    # the classes and functions named in the configuration
    def record(source):
        module = _own_module(monkeypatch, tmp_path, source)
        return run_folder.run_record(TrainConfig(progress=False, loss=module.loss), module.Model())

    old = record(_SUBMODULE_CODE)
    assert {"own_study.Block", "own_study.helper"} <= set(old["code"])
    assert run_folder.differences(old, record(_SUBMODULE_CODE)) == []
    edits = {
        "own_study.Block": ("(self.width)(x)", "(self.width)(2 * x)"),
        "own_study.helper": ("[:, 0]", "[:, 1]"),
    }
    for owner, (before, after) in edits.items():
        new = record(_SUBMODULE_CODE.replace(before, after))
        assert [key for key, _, _ in run_folder.differences(old, new)] == [f"code of {owner}"]


def test_a_model_written_in_python_c_is_digested(monkeypatch):
    # ``python -c`` and ``exec`` compile from "<string>", which was taken for the methods
    # dataclasses generate: such a model's methods were left out, and an edit of them resumed
    def record(source):
        module = type(sys)("own_string_study")
        monkeypatch.setitem(sys.modules, "own_string_study", module)
        exec(compile(source, "<string>", "exec"), module.__dict__)
        return run_folder.run_record(TrainConfig(progress=False), module.Model(width=3))

    old = record(_OWN_CODE)
    assert old["code"].keys() == {"own_string_study.Model"}
    assert run_folder.differences(old, record(_OWN_CODE)) == []
    # the methods dataclasses generate still are not (they change with a field's default)
    generated = record(_OWN_CODE.replace("width: int = 3", "width: int = 5"))
    assert run_folder.differences(old, generated) == []
    new = record(_OWN_CODE.replace("jnp.mean(x", "jnp.max(x"))
    assert [key for key, _, _ in run_folder.differences(old, new)] == [
        "code of own_string_study.Model"
    ]


def test_a_frozen_dict_setting_is_recorded_by_its_entries():
    # bridge.to_linen keeps an NNX model's keyword arguments in a FrozenDict, which was recorded
    # as "<flax.core.frozen_dict.FrozenDict>": a resume with other arguments was not refused
    from flax.core import FrozenDict

    def record(width):
        settings = {"kwargs": FrozenDict({"width": width, "rates": FrozenDict(drop=0.1)})}
        return run_folder.run_record(TrainConfig(progress=False), settings=settings)

    old, new = record(3), record(4)
    assert old["settings"]["kwargs"] == {"width": 3, "rates": {"drop": 0.1}}
    assert run_folder.differences(old, new) == [("settings.kwargs.width", 3, 4)]
    assert run_folder.differences(old, record(3)) == []
    # a record written before lists the FrozenDict by its class only, and still resumes
    older = json.loads(json.dumps(old))
    older["settings"]["kwargs"] = "<flax.core.frozen_dict.FrozenDict>"
    assert run_folder.differences(older, new) == []


def test_the_settings_held_by_the_researchers_own_loss_object_are_recorded(monkeypatch, tmp_path):
    # a loss written as a class (an instance, or a bound method of one) was recorded by its name
    # only: a resume with another smoothing was accepted
    source = textwrap.dedent(
        """
        class Smoothed:
            def __init__(self, smoothing):
                self.smoothing = smoothing

            def __call__(self, logits, labels):
                return logits[:, 0] * self.smoothing

            def loss(self, logits, labels):
                return logits[:, 0] * self.smoothing
        """
    )
    module = _own_module(monkeypatch, tmp_path, source)

    def record(loss):
        return run_folder.run_record(TrainConfig(progress=False, loss=loss))

    for method in (lambda s: module.Smoothed(s), lambda s: module.Smoothed(s).loss):
        old, new = record(method(0.1)), record(method(0.2))
        assert run_folder.differences(old, record(method(0.1))) == []
        ((key, before, after),) = run_folder.differences(old, new)
        assert key.startswith("train.loss.") and (before, after) == (0.1, 0.2)
    # a record written before names them only, and still resumes
    for older, loss in [
        ("<own_study.Smoothed>", module.Smoothed(0.1)),
        ("own_study.Smoothed.loss", module.Smoothed(0.1).loss),
    ]:
        new = record(loss)
        old = json.loads(json.dumps(new))
        old["train"]["loss"] = older
        assert run_folder.differences(old, new) == []


def test_what_a_jitted_closure_captured_is_recorded():
    # jax.jit's wrapper has no __closure__: the weight a jitted loss captured was not recorded
    def make_loss(weight):
        @jax.jit
        def loss(logits, labels):
            return jnp.mean(logits, axis=-1) * weight

        return loss

    def record(weight):
        return run_folder.run_record(TrainConfig(progress=False, loss=make_loss(weight)))

    old, new = record(1.0), record(2.0)
    assert run_folder.differences(old, record(1.0)) == []
    assert run_folder.differences(old, new) == [("train.loss.wrapped_captured", [1.0], [2.0])]
    older = json.loads(json.dumps(old))
    older["train"]["loss"] = old["train"]["loss"]["function"]  # written before: the name only
    assert run_folder.differences(older, new) == []


def test_a_function_whose_wrapped_chain_loops_is_recorded(monkeypatch, tmp_path):
    # inspect.unwrap raised "wrapper loop" out of run_record
    source = "def own(x):\n    return x\n\nown.__wrapped__ = own\n"
    module = _own_module(monkeypatch, tmp_path, source)
    record = run_folder.run_record(TrainConfig(progress=False), settings={"f": module.own})
    assert list(record["code"]) == ["own_study.own"]


def test_a_setting_that_cannot_be_described_is_named_not_raised():
    # a deleted jax array (donated to a jitted call) raised "Array has been deleted" out of
    # run_record, as did an object whose attribute raises
    class Raises:
        shape = (2,)

        @property
        def dtype(self):
            raise RuntimeError("no dtype")

    deleted = jnp.ones((5, 5))
    deleted.delete()
    settings = {"deleted": deleted, "raises": Raises()}
    record = run_folder.run_record(TrainConfig(progress=False), settings=settings)
    assert re.fullmatch(
        r"<.*ArrayImpl: not described, RuntimeError>", record["settings"]["deleted"]
    )
    assert record["settings"]["raises"].endswith("Raises: not described, RuntimeError>")
    again = run_folder.run_record(TrainConfig(progress=False), settings=settings)
    assert run_folder.differences(record, again) == []


def test_an_edited_module_constant_the_code_reads_is_refused(monkeypatch, tmp_path):
    # the code digest named the globals a function reads, not their values: a script's
    # TEMPERATURE = 2.0 edited to 3.0 between a run and its resume was accepted
    source = textwrap.dedent(
        """
        import numpy as np

        TEMPERATURE = 2.0
        CLASSES = (1, 2)
        WEIGHTS = np.arange(40.0).reshape(5, 8)
        TRACES = []

        def own(logits):
            TRACES.append(logits.shape)  # a list it fills as it runs: not a constant
            return logits / TEMPERATURE * CLASSES[0] * WEIGHTS.sum()
        """
    )

    def record(text):
        module = _own_module(monkeypatch, tmp_path, text)
        return run_folder.run_record(TrainConfig(progress=False), settings={"f": module.own})

    old = record(source)
    assert run_folder.differences(old, record(source + "\nUNUSED = 1\n")) == []
    assert run_folder.differences(old, record(source + "\nTRACES.append(1)\n")) == []
    edits = [("= 2.0", "= 3.0"), ("(1, 2)", "(1, 3)"), ("arange(40.0)", "arange(1.0, 41.0)")]
    for before, after in edits:
        found = run_folder.differences(old, record(source.replace(before, after)))
        assert [key for key, _, _ in found] == ["code of own_study.own"], before


def test_the_code_of_a_callback_may_change_on_resume(monkeypatch, tmp_path):
    # callbacks may change on resume (they do not enter the computations), but their code was
    # digested with the rest, so an edited callback refused the resume
    source = _OWN_CODE + textwrap.dedent(
        """
        from jcnn.train import Callback

        class Report(Callback):
            def on_epoch_end(self, state, record):
                print(record["train_loss"])
        """
    )

    def record(text):
        module = _own_module(monkeypatch, tmp_path, text)
        config = TrainConfig(progress=False, callbacks=(module.Report(),))
        return run_folder.run_record(config, module.Model(width=3))

    old = record(source)
    assert "own_study.Report" not in old["code"] and "own_study.Model" in old["code"]
    edited = source.replace('record["train_loss"]', 'record["train_loss"] * 2')
    assert run_folder.differences(old, record(edited)) == []


def test_an_edited_class_constant_of_the_model_is_refused(monkeypatch, tmp_path):
    # a constant in the model's class body (not a field) was left out of its code digest
    source = _OWN_CODE.replace("    width: int = 3\n", "    width: int = 3\n    SCALE = 2.0\n")
    source = source.replace("(jnp.mean(x", "(self.SCALE * jnp.mean(x")
    old = _own_record(monkeypatch, tmp_path, source)
    assert run_folder.differences(old, _own_record(monkeypatch, tmp_path, source)) == []
    # a field's default is recorded apart, and does not enter the digest
    field = source.replace("width: int = 3", "width: int = 4")
    assert run_folder.differences(old, _own_record(monkeypatch, tmp_path, field)) == []
    new = _own_record(monkeypatch, tmp_path, source.replace("SCALE = 2.0", "SCALE = 3.0"))
    assert [key for key, _, _ in run_folder.differences(old, new)] == ["code of own_study.Model"]
