"""load_run: a run folder back to a model, its variables and standardization, for inference."""

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import models
from jcnn.data import Loader
from jcnn.train import CheckpointManager, RunFolderError, TrainConfig, fit, load_run
from jcnn.train.cli import MODELS
from jcnn.train.runs import _build, run_description

ROOT = Path(__file__).resolve().parents[2]


class SmallNet(nn.Module):
    features: int = 4
    widths: tuple = (3,)

    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(self.features, (3, 3), strides=2)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        return nn.Dense(3)(jnp.mean(nn.relu(x), axis=(1, 2)))


class ActivationNet(SmallNet):
    activation: object = None  # a callable field: cannot be recorded by name

    @nn.compact
    def __call__(self, x, train: bool):
        return nn.Dense(3)(self.activation(x.reshape(x.shape[0], -1)))


def _data(rng, n):
    labels = rng.integers(0, 3, size=n).astype(np.int32)
    images = rng.integers(0, 120, size=(n, 8, 8, 2)).astype(np.uint8)
    images[np.arange(n), 2 * labels + 1, 2 * labels + 1, :] += 120
    return images, labels


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rng = np.random.default_rng(0)
    images, labels = _data(rng, 80)
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        epochs=2,
        learning_rate=0.02,
        val_split=16,
        standardize="per_channel",
        out=str(out),
        progress=False,
        keep_last=1,
    )
    train = Loader(images, labels, batch_size=16, seed=0)
    result = fit(SmallNet(features=5), train, None, config, metadata={"dataset": "toy"})
    return out, result, _data(rng, 30)


def test_load_run_gives_model_variables_standardization_and_config(trained):
    out, result, (images, labels) = trained
    run = load_run(out)
    assert run.model == SmallNet(features=5)
    assert run.config["val_split"] == 16 and run.metadata == {"dataset": "toy"}
    assert run.step == 8 and run.which == "latest"
    state = result["state"]
    for a, b in zip(
        jax.tree.leaves(state.variables()), jax.tree.leaves(run.variables), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    stats = result["standardize"]
    np.testing.assert_array_equal(run.standardize.mean, stats.mean)
    np.testing.assert_array_equal(run.standardize.scale, stats.scale)
    # predict standardizes raw images as training did
    expected = state.apply_fn(state.variables(), stats(images), train=False)
    np.testing.assert_allclose(run.predict(images, batch_size=7), expected, rtol=1e-6, atol=1e-6)
    # evaluate: an independent count of the confusion matrix
    report = run.evaluate(images, labels, batch_size=7)
    predicted = np.asarray(expected).argmax(-1)
    confusion = np.zeros((3, 3), int)
    for t, p in zip(labels, predicted, strict=True):
        confusion[t, p] += 1
    assert report["confusion_matrix"] == confusion.tolist()
    assert report["accuracy"] == pytest.approx(np.mean(predicted == labels))
    for c in range(3):
        mask = labels == c
        want = None if not mask.any() else np.mean(predicted[mask] == c)
        assert report["per_class_accuracy"][c] == pytest.approx(want)
    z = np.asarray(expected, np.float64)
    log_probs = z - z.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    assert report["loss"] == pytest.approx(-np.mean(log_probs[np.arange(30), labels]), rel=1e-5)

    # fit's own loss, which the run folder does not record, when passed again
    def squared(logits, labels):
        return jnp.sum((jax.nn.softmax(logits) - jax.nn.one_hot(labels, 3)) ** 2, axis=1)

    probs = np.exp(log_probs)
    want = np.mean(np.sum((probs - np.eye(3)[labels]) ** 2, axis=1))
    assert run.evaluate(images, labels, loss=squared)["loss"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match=r"expected one loss per example, shape \(30,\)"):
        run.evaluate(images, labels, loss=lambda z, y: z)


def test_load_run_best_and_steps(trained):
    out, result, _ = trained
    manager = CheckpointManager(out / "checkpoints")
    best = load_run(out, which="best")
    assert best.step == manager.best_step()
    history = result["history"]
    assert best.step == max(history, key=lambda h: (h["val_accuracy"], h["step"]))["step"]
    assert load_run(out, which=best.step).step == best.step
    with pytest.raises(RunFolderError, match="no checkpoint at step 3"):
        load_run(out, which=3)
    with pytest.raises(ValueError, match="which: expected 'latest', 'best' or a step"):
        load_run(out, which="first")


def test_a_file_given_as_the_run_folder_is_called_a_file(tmp_path):
    # it was reported as "no such folder", though the path exists
    (tmp_path / "model.ckpt").write_bytes(b"weights")
    with pytest.raises(RunFolderError, match=r"model.ckpt is not a jcnn run folder \(a file, not"):
        load_run(tmp_path / "model.ckpt")


def test_a_folder_that_is_not_a_run_is_named(tmp_path, trained):
    with pytest.raises(RunFolderError, match="is not a jcnn run folder .no such folder"):
        load_run(tmp_path / "absent")
    with pytest.raises(RunFolderError, match="missing config.json, run.json, checkpoints"):
        load_run(tmp_path)
    out, _, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "run.json").write_text("{not json")
    with pytest.raises(RunFolderError, match="unreadable config.json or run.json: run.json: JSON"):
        load_run(copy)
    shutil.copy(out / "run.json", copy / "run.json")
    (copy / "config.json").write_bytes(b"\xff\xfe")  # neither names the other file
    with pytest.raises(RunFolderError, match="run.json: config.json: UnicodeDecodeError"):
        load_run(copy)
    shutil.copy(out / "config.json", copy / "config.json")
    description = json.loads((out / "run.json").read_text())
    (copy / "run.json").write_text(
        json.dumps({k: v for k, v in description.items() if k != "input"})
    )
    with pytest.raises(RunFolderError, match="run.json: run.json has no 'input'"):
        load_run(copy)
    shutil.copy(out / "run.json", copy / "run.json")
    with pytest.raises(RunFolderError, match="does not match the model"):
        load_run(copy, model=SmallNet(features=6))
    step = CheckpointManager(copy / "checkpoints").latest_step()
    for path in (CheckpointManager(copy / "checkpoints").path(step) / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    with pytest.raises(RunFolderError, match=f"step_{step:08d} is corrupt or unreadable"):
        load_run(copy)
    empty = tmp_path / "empty_run"
    (empty / "checkpoints").mkdir(parents=True)
    (empty / "config.json").write_text((out / "config.json").read_text())
    (empty / "run.json").write_text((out / "run.json").read_text())
    with pytest.raises(RunFolderError, match="no checkpoint in checkpoints/"):
        load_run(empty)


def test_a_flipped_byte_in_any_checkpoint_file_is_never_loaded(trained, tmp_path):
    """load_run checks the manifest first: a byte changed in the array data (which orbax would
    read without complaint) or in any other file stops it, naming the checkpoint and the file."""
    out, _, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    intact = load_run(copy)
    folder = CheckpointManager(copy / "checkpoints").path(intact.step)
    files = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "manifest.json"]
    assert any("state" in p.relative_to(folder).parts for p in files)
    for path in files:
        data = bytearray(path.read_bytes())
        where = len(data) // 2
        data[where] ^= 0x01
        path.write_bytes(bytes(data))
        name = str(path.relative_to(folder))
        with pytest.raises(RunFolderError, match=f"step_{intact.step:08d} is corrupt") as error:
            load_run(copy)
        assert name in str(error.value) and "SHA-256" in str(error.value)
        data[where] ^= 0x01
        path.write_bytes(bytes(data))
    again = load_run(copy)
    for a, b in zip(
        jax.tree.leaves(intact.variables), jax.tree.leaves(again.variables), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_run_config_is_the_train_table_of_the_record(trained):
    out, _, _ = trained
    record = json.loads((out / "config.json").read_text())
    assert set(record) >= {"jcnn_version", "train", "model", "train_loader", "settings"}
    assert load_run(out).config == record["train"]


def test_a_model_that_cannot_be_recorded_is_passed_back(tmp_path, rng):
    images, labels = _data(rng, 32)
    model = ActivationNet(activation=lambda x: jnp.tanh(x))
    config = TrainConfig(epochs=1, out=str(tmp_path), progress=False)
    fit(model, Loader(images.astype(np.float32), labels, batch_size=16), None, config)
    description = json.loads((tmp_path / "run.json").read_text())["model"]
    assert description["rebuildable"] is False and "cannot be imported" in description["reason"]
    with pytest.raises(RunFolderError, match=r"cannot be rebuilt .*load_run\(folder, model=...\)"):
        load_run(tmp_path)
    run = load_run(tmp_path, model=model)
    with pytest.raises(RunFolderError, match="no best checkpoint"):  # no validation: no ranking
        load_run(tmp_path, model=model, which="best")
    assert run.standardize is None and run.predict(images.astype(np.float32)).shape == (32, 3)


@pytest.mark.parametrize(
    "metadata, error, says",
    [  # a list trained a whole run that load_run then refused; the others came back changed
        ([1], TypeError, r"metadata: expected a JSON-serializable dict, got list"),
        ({1: "x"}, TypeError, r"metadata has the key 1 \(int\), which JSON reads back as"),
        ({"shape": (8, 8)}, TypeError, r"metadata\['shape'\] is a tuple, \(8, 8\), which JSON"),
        ({"x": float("nan")}, None, None),
    ],
)
def test_metadata_that_load_run_would_not_give_back_is_refused_before_training(
    tmp_path, rng, metadata, error, says
):
    images, labels = _data(rng, 32)
    config = TrainConfig(epochs=1, out=str(tmp_path / "run"), progress=False)
    train = Loader(images.astype(np.float32), labels, batch_size=16)
    if error is None:  # JSON's NaN: read back as NaN
        fit(SmallNet(features=5), train, None, config, metadata=metadata)
        assert np.isnan(load_run(tmp_path / "run").metadata["x"])
        return
    with pytest.raises(error, match=says):
        fit(SmallNet(features=5), train, None, config, metadata=metadata)
    assert not (tmp_path / "run").exists()


def test_no_best_checkpoint_of_a_run_stopped_before_its_first_validation_says_so(tmp_path, rng):
    # a validation set, but a non-finite loss stopped the run before the end of its first epoch
    from jcnn.train import NonFiniteLossError

    images, labels = _data(rng, 64)
    config = TrainConfig(
        epochs=1,
        optimizer="sgd",
        learning_rate=1e30,
        schedule="constant",
        val_split=16,
        standardize="per_channel",
        checkpoint_every_steps=1,
        out=str(tmp_path),
        progress=False,
    )
    with pytest.raises(NonFiniteLossError):
        fit(SmallNet(), Loader(images, labels, batch_size=8, seed=0), None, config)
    with pytest.raises(RunFolderError, match="stopped before its first validation"):
        load_run(tmp_path, which="best")


def test_a_pca_run_predicts_and_evaluates_raw_images(tmp_path, rng):
    # "pca" flattens the images: the model's input (N, K) has another rank than the raw images
    # predict standardizes, which it refused before standardizing them
    images, labels = _data(rng, 32)
    model = ActivationNet(activation=jnp.tanh)
    config = TrainConfig(epochs=1, out=str(tmp_path), progress=False, standardize="pca")
    result = fit(model, Loader(images, labels, batch_size=16), None, config)
    run = load_run(tmp_path)
    assert run.input_shape == (8 * 8 * 2,)
    expected = model.apply(result["state"].variables(), result["standardize"](images), train=False)
    np.testing.assert_allclose(run.predict(images), expected, rtol=1e-5, atol=1e-5)
    assert run.evaluate(images, labels)["count"] == 32
    with pytest.raises(ValueError, match=r"images: expected shape \(\.\.\., 8, 8, 2\)"):
        run.predict(images.reshape(32, -1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_cli_model_is_recorded_and_rebuilt(name):
    attribute, kwargs = MODELS[name]
    model = getattr(models, attribute)(num_classes=7, **kwargs)
    entry = run_description(model, np.zeros((1, 32, 32, 3), np.uint8), None)["model"]
    assert entry["rebuildable"], entry
    assert _build(json.loads(json.dumps(entry))) == model


def test_initializer_closures_are_left_out_of_the_rebuilt_model(rng):
    """A data-dependent init (airbench94's whitening kernel) only shapes ``init``: the record
    lists it under ``init_only`` and the rebuilt model, which loads its parameters from a
    checkpoint, computes the same outputs."""
    from jcnn import init

    kernel = rng.standard_normal((2, 2, 3, 24)).astype(np.float32)
    model = models.AirbenchNet(
        widths=(8, 8, 8),
        conv_init=init.with_dirac(init.he_normal()),
        whiten_init=init.from_array(kernel),
    )
    entry = run_description(model, np.zeros((1, 32, 32, 3), np.uint8), None)["model"]
    assert entry["rebuildable"], entry
    assert entry["init_only"] == ["conv_init", "whiten_init"]
    rebuilt = _build(json.loads(json.dumps(entry)))
    assert rebuilt == models.AirbenchNet(widths=(8, 8, 8))
    x = jnp.asarray(rng.standard_normal((2, 32, 32, 3)).astype(np.float32))
    # jitted: eagerly every operation of the network compiled a program of its own
    variables = jax.jit(model.init)(jax.random.key(0), x)
    np.testing.assert_array_equal(variables["params"]["whiten"]["kernel"], kernel)
    outputs = jax.jit(lambda v, x: (rebuilt.apply(v, x), model.apply(v, x)))(variables, x)
    np.testing.assert_array_equal(*outputs)


def test_evaluate_and_predict_refuse_bad_labels_and_sizes(trained):
    # a label -1 used to be counted silently as the last class; 3 or a float label, and a batch
    # size of 0 or no image, escaped as NumPy's own errors
    out, _, (images, labels) = trained
    run = load_run(out)
    for bad, shown in ((-1, "from -1 to 2"), (3, "from 0 to 3")):
        wrong = labels.copy()
        wrong[4] = bad
        with pytest.raises(
            ValueError,
            match=rf"labels: expected class labels in 0..2 \(the model has 3 outputs\), got "
            rf"labels {shown}",
        ):
            run.evaluate(images, wrong)
    with pytest.raises(TypeError, match="labels: expected integer classes, got dtype float"):
        run.evaluate(images, labels.astype(np.float32))
    for size in (0, -1):
        with pytest.raises(ValueError, match="batch_size: expected a positive int"):
            run.predict(images, batch_size=size)
    with pytest.raises(ValueError, match="images: expected a batch of at least one image"):
        run.predict(images[:0])
    with pytest.raises(TypeError, match="folder: expected a run folder"):
        load_run(None)
    assert run.evaluate(images, labels.astype(np.uint8))["count"] == len(labels)


def test_a_run_json_or_config_json_of_the_wrong_structure_is_named(tmp_path, trained):
    # valid JSON of the wrong structure (a list, a 'model' or 'metadata' that is not an object, an
    # input dtype that is no dtype) or a config.json that is a folder escaped as raw TypeErrors,
    # AttributeErrors or OSErrors from inside load_run (jcnn-eval: a traceback)
    out, _, _ = trained
    good = json.loads((out / "run.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for bad in (
        [1],
        {**good, "model": [1]},
        {**good, "metadata": [1]},
        {**good, "input": {"shape": ["x"], "dtype": "uint8"}},
        {**good, "input": {"shape": [8, 8, 2], "dtype": "no_such_dtype"}},
    ):
        (copy / "run.json").write_text(json.dumps(bad))
        with pytest.raises(RunFolderError, match="unreadable config.json or run.json: run.json"):
            load_run(copy)
    (copy / "run.json").write_text(json.dumps(good))
    (copy / "config.json").write_text(json.dumps({"train": [1]}))
    with pytest.raises(RunFolderError, match="unreadable config.json or run.json"):
        load_run(copy)
    (copy / "config.json").unlink()
    (copy / "config.json").mkdir()
    with pytest.raises(RunFolderError, match="unreadable config.json or run.json"):
        load_run(copy)


def test_a_config_run_json_or_standardize_npz_that_is_damaged_is_named_never_defaulted(
    tmp_path, trained
):
    # config.json of {} (or without the entries fit writes) loaded with the default monitor_mode
    # and an empty config; a missing standardize.npz gave a Run without standardization (its
    # predictions on raw images silently wrong); statistics of the wrong shape or dtype, a
    # 'rebuildable' of "no" or an input shape [8, 8, true] were taken as they were
    out, _, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    record = json.loads((out / "config.json").read_text())
    description = json.loads((out / "run.json").read_text())
    stats = (out / "standardize.npz").read_bytes()
    unreadable = r"not a jcnn run folder \(unreadable config.json or run.json: "
    train = record["train"]
    for bad, says in (
        ({}, r"config.json has no 'epochs', 'seed', 'monitor', 'monitor_mode', 'standardize'"),
        ({**record, "train": {}}, r"config.json's 'train' has no 'epochs'"),
        ({**record, "train": {**train, "monitor_mode": None}}, r".*\['monitor_mode'\]: expected"),
        ({**record, "train": {**train, "standardize": 1}}, r".*\['standardize'\]: expected null"),
        ({**record, "train": {**train, "epochs": "2"}}, r".*\['epochs'\]: expected a positive int"),
    ):
        (copy / "config.json").write_text(json.dumps(bad))
        with pytest.raises(RunFolderError, match=unreadable + says):
            load_run(copy)
    (copy / "config.json").write_text(json.dumps(record)[:-40])  # truncated
    with pytest.raises(RunFolderError, match=unreadable + "config.json: JSONDecodeError"):
        load_run(copy)
    (copy / "config.json").write_text(json.dumps(record))
    model = description["model"]
    for bad, says in (
        ({**description, "model": {**model, "rebuildable": "no"}}, "'rebuildable': expected"),
        ({**description, "model": {"rebuildable": True}}, "'class': expected a class path"),
        ({**description, "model": {**model, "fields": [5]}}, "'fields': expected an object"),
        ({**description, "input": {"shape": [8, 8, True], "dtype": "float32"}}, "shape: expected"),
        ({**description, "input": {"shape": [8, 8, 2]}}, "dtype: expected a dtype's name"),
    ):
        (copy / "run.json").write_text(json.dumps(bad))
        with pytest.raises(RunFolderError, match=unreadable + "run.json's .*" + says):
            load_run(copy)
    (copy / "run.json").write_text(json.dumps(description))
    (copy / "standardize.npz").unlink()
    with pytest.raises(RunFolderError, match=r"standardize.npz is missing: the run standardized"):
        load_run(copy)
    (copy / "standardize.npz").write_bytes(stats[: len(stats) // 2])
    with pytest.raises(RunFolderError, match=r"standardize.npz is unreadable \(BadZipFile"):
        load_run(copy)
    data = bytearray(stats)
    data[len(data) // 2] ^= 0x01  # inside an array: each carries a CRC-32 in the zip
    (copy / "standardize.npz").write_bytes(bytes(data))
    with pytest.raises(
        RunFolderError, match=r"standardize.npz is unreadable \(BadZipFile: Bad CRC"
    ):
        load_run(copy)
    for mode, mean, scale, says in (
        ("per_channel", np.zeros(3, np.float32), np.ones(3, np.float32), r"mean \(3,\), which"),
        ("center", np.zeros(2, np.float32), np.ones(2, np.float32), "mode 'center', but config"),
        ("per_channel", np.zeros(2, np.int32), np.ones(2, np.int32), "expected floating"),
    ):
        np.savez(copy / "standardize.npz", mode=np.asarray(mode), mean=mean, scale=scale)
        with pytest.raises(RunFolderError, match="standardize.npz is .*" + says):
            load_run(copy)
    (copy / "standardize.npz").write_bytes(stats)
    assert load_run(copy).step == load_run(out).step


def test_a_model_that_can_no_longer_be_rebuilt_is_named(tmp_path, trained):
    # run.json naming a class that is gone, or fields the class no longer takes (a run of an
    # older version), escaped as a raw AttributeError/TypeError from inside load_run
    out, _, _ = trained
    good = json.loads((out / "run.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    fields = {**good["model"]["fields"], "no_such_field": 1}
    for entry in ({"class": "jcnn.models.NoSuchNet"}, {"fields": fields}):
        (copy / "run.json").write_text(json.dumps({**good, "model": {**good["model"], **entry}}))
        with pytest.raises(RunFolderError, match=r"cannot be rebuilt from run.json \(\w+Error: "):
            load_run(copy)
    assert load_run(copy, model=SmallNet(features=5)).step == load_run(out).step


def test_a_run_json_naming_something_else_than_a_module_class_is_never_called(tmp_path, trained):
    # load_run called whatever run.json named with its fields: {"class": "os.system", "fields":
    # {"command": ...}} ran the command, then failed with a raw AttributeError
    out, _, _ = trained
    good = json.loads((out / "run.json").read_text())
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    witness = tmp_path / "ran"
    nested = {"class": "os.makedirs", "fields": {"name": str(witness)}}
    for model, got in (
        (nested, "function"),
        ({"class": "pathlib.Path", "fields": {}}, "the class Path"),
        (
            {**good["model"], "fields": {**good["model"]["fields"], "sub": {"__module__": nested}}},
            "function",
        ),
    ):
        (copy / "run.json").write_text(
            json.dumps({**good, "model": {**model, "rebuildable": True}})
        )
        with pytest.raises(
            RunFolderError, match=rf"expected a Flax module class \(flax.linen.Module\), got {got}"
        ):
            load_run(copy)
        assert not witness.exists()


def test_model_must_be_a_module_instance(trained):
    # the class itself (model=SmallNet) or a string failed inside Flax's init with its own error
    out, _, _ = trained
    for bad in (SmallNet, "SmallNet"):
        with pytest.raises(TypeError, match="model: expected None or a Flax module instance"):
            load_run(out, model=bad)


def test_a_step_and_a_batch_size_may_be_0d_arrays(trained):
    # which=jnp.int32(step) was refused ("expected 'latest', 'best' or a step (int)") and
    # batch_size=jnp.int32(8) ("expected a positive int"), unlike NumPy integers
    out, _, (images, _) = trained
    step = load_run(out).step
    run = load_run(out, jnp.int32(step))
    assert run.step == run.which == step and type(run.which) is int
    logits = run.predict(images, batch_size=jnp.int32(8))
    np.testing.assert_array_equal(logits, run.predict(images, batch_size=8))
    with pytest.raises(TypeError, match="which: expected an int"):
        load_run(out, jnp.float32(step))
    for bad in (float(step), True, None, [step]):  # ValueErrors, as a wrong value, before
        with pytest.raises(TypeError, match=r"which: expected 'latest', 'best' or a step \(int\)"):
            load_run(out, bad)
    with pytest.raises(ValueError, match="batch_size: expected a positive int"):
        run.predict(images, batch_size=np.array(0))


def test_evaluate_checks_images_before_labels(trained):
    # evaluate read images.shape[0] to check the labels first: a list of images was a raw
    # AttributeError, a 0-d array an IndexError; now the errors predict gives, naming images
    out, _, (images, labels) = trained
    run = load_run(out)
    with pytest.raises(TypeError, match="images: expected an array, got list"):
        run.evaluate(list(images), labels)
    with pytest.raises(ValueError, match="images: expected a batch of at least one image"):
        run.evaluate(np.float32(1.0), labels[:1])


def test_standardized_must_be_a_bool(trained):
    # standardized="no" (any truthy non-bool) skipped the standardization silently: float images
    # went through the model unstandardized and gave wrong logits without an error
    out, _, (images, labels) = trained
    run = load_run(out)
    floats = images.astype(np.float32)
    for bad in ("no", 1, None):
        with pytest.raises(TypeError, match="standardized: expected a Python bool"):
            run.predict(floats, standardized=bad)
        with pytest.raises(TypeError, match="standardized: expected a Python bool"):
            run.evaluate(floats, labels, standardized=bad)
    np.testing.assert_array_equal(
        run.predict(floats, standardized=np.bool_(False)), run.predict(floats)
    )


@pytest.fixture(scope="module")
def best_elsewhere(tmp_path_factory):
    """A run whose BestCheckpoint keeps the *highest* val_loss in "worst/", while the run's own
    checkpoints rank by the lowest: the two "best" steps differ."""
    from jcnn.train import BestCheckpoint

    rng = np.random.default_rng(1)
    images, labels = _data(rng, 80)
    out = tmp_path_factory.mktemp("best") / "run"
    keeper = BestCheckpoint("val_loss", mode="max", directory="worst")
    config = TrainConfig(
        epochs=3,
        learning_rate=0.05,
        val_split=16,
        standardize="per_channel",
        out=str(out),
        progress=False,
        monitor="val_loss",
        monitor_mode="min",
    )
    train = Loader(images, labels, batch_size=16, seed=0)
    fit(SmallNet(), train, None, config, callbacks=[keeper])
    return out, keeper.best_step


def test_an_unknown_which_lists_each_choice_once(tmp_path, trained, best_elsewhere):
    # a BestCheckpoint in its default folder "best" made it "expected 'latest', 'best', 'best'"
    out, _, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    for directories, choices in (
        (["best"], "'latest', 'best'"),
        (["best", "b2"], "'latest', 'best', 'b2'"),
    ):
        (copy / "best.json").write_text(json.dumps({"directories": directories}))
        with pytest.raises(ValueError, match=rf"which: expected {choices} or a step \(int\)"):
            load_run(copy, which="first")
    with pytest.raises(ValueError, match=r"expected 'latest', 'best', 'worst' or a step \(int\)"):
        load_run(best_elsewhere[0], which="first")


def test_load_run_best_reads_the_best_checkpoint_where_the_callback_saved_it(best_elsewhere):
    # load_run(which="best") looked in best/ only and silently fell back to checkpoints/
    out, step = best_elsewhere
    assert json.loads((out / "best.json").read_text()) == {"directories": ["worst"]}
    assert CheckpointManager(out / "checkpoints", mode="min").best_step() != step  # else no test
    assert load_run(out, which="best").step == step
    assert load_run(out, which="worst").step == step


def test_a_missing_or_unreadable_best_checkpoint_is_named(best_elsewhere, tmp_path):
    out, step = best_elsewhere
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    shutil.rmtree(copy / "worst" / f"step_{step:08d}")
    with pytest.raises(RunFolderError, match=r"which='best': the best checkpoint's folder .*worst"):
        load_run(copy, which="best")
    (copy / "best.json").write_text('{"directories": ["../elsewhere"]}')
    with pytest.raises(RunFolderError, match=r"best.json is unreadable .*'\.\./elsewhere'"):
        load_run(copy, which="best")
    (copy / "best.json").write_text('{"directories": ["a", "b"]}')
    with pytest.raises(
        RunFolderError, match=r"several BestCheckpoint callbacks \(a, b\); name one"
    ):
        load_run(copy, which="best")


def test_load_run_best_ranks_the_checkpoints_by_the_runs_monitor_mode(best_elsewhere, tmp_path):
    # without a BestCheckpoint, which="best" took the highest val_loss though monitor_mode="min"
    out, _ = best_elsewhere
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "best.json").unlink()
    shutil.rmtree(copy / "worst")
    lowest = CheckpointManager(copy / "checkpoints", mode="min").best_step()
    assert lowest != CheckpointManager(copy / "checkpoints", mode="max").best_step()
    assert load_run(copy, which="best").step == lowest


def test_predict_refuses_images_that_are_not_numbers_and_which_may_be_a_numpy_string(trained):
    # string images failed inside jnp.asarray ("Error interpreting argument to stage as a JAX
    # value"); which=np.str_("latest") was refused as "which: expected an int"
    out, _, (images, _) = trained
    run = load_run(out)
    for bad in (np.full(images.shape, "a"), images > 100, images.astype(np.complex64)):
        with pytest.raises(TypeError, match="images: expected an integer or floating array"):
            run.predict(bad)
    assert load_run(out, np.str_("latest")).step == run.step


def test_predict_names_images_the_model_cannot_take(trained):
    # a batch of the wrong rank, or channels the weights do not fit (standardization skipped or
    # absent), came out of Flax as a raw ScopeParamShapeError, not a ValueError, and jcnn-eval
    # crashed on it with a traceback
    out, _, (images, _) = trained
    run = load_run(out)
    assert run.input_shape == (8, 8, 2)
    with pytest.raises(ValueError, match=r"images: expected a batch \(N, 8, 8, 2\).*\(8, 8, 2\)"):
        run.predict(images[0])
    with pytest.raises(ValueError, match=r"images: .*trained on \(8, 8, 2\).*\(3, 8, 8, 3\)"):
        run.predict(np.zeros((3, 8, 8, 3), np.float32), standardized=True)
    # the standardization's check names the array given, not its first batch
    with pytest.raises(ValueError, match=r"expected shape \(\.\.\., H, W, 2\).*got \(5, 8, 8, 3\)"):
        run.predict(np.zeros((5, 8, 8, 3), np.float32), batch_size=2)


def test_evaluate_checks_its_loss_first_by_name(trained):
    # a loss that is not a function was reported as "loss_fn", after the predictions were made
    out, _, (images, labels) = trained
    run = load_run(out)
    with pytest.raises(TypeError, match="^loss: expected a callable"):
        run.evaluate(images, labels, loss=3)
    with pytest.raises(TypeError, match="^loss: "):
        run.evaluate(images, labels, loss=lambda logits: logits)


class _NoTrainArgument(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(x.reshape(x.shape[0], -1))


def test_a_model_that_cannot_be_initialized_on_the_runs_input_is_named(tmp_path, trained):
    # model.init raised out of load_run as it came (a TypeError from __call__, Flax's errors
    # from a run.json whose fields no longer build the model), not naming the model or the input
    out, _, _ = trained
    with pytest.raises(TypeError, match=r"model: _NoTrainArgument cannot be initialized .*train"):
        load_run(out, model=_NoTrainArgument())
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    record = json.loads((copy / "run.json").read_text())
    record["model"]["fields"]["features"] = "five"
    (copy / "run.json").write_text(json.dumps(record))
    with pytest.raises(RunFolderError, match=r"SmallNet, rebuilt from run.json, cannot be init"):
        load_run(copy)


def test_a_data_parallel_run_loads_on_a_machine_with_fewer_devices(tmp_path):
    # orbax restores an array onto the devices it was saved from: a run trained with --devices 2
    # was "corrupt or unreadable (Topology mismatch)" for load_run and jcnn-eval on one device
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    argv = ["--model", "lenet5_1998", "--dataset", "synthetic", "--limit-train", "64"]
    argv += ["--batch-size", "64", "--epochs", "1", "--devices", "2", "--no-progress"]
    code = "import sys; from jcnn.train.cli import main; sys.exit(main())"
    trained = subprocess.run(
        [sys.executable, "-c", code, *argv, "--out", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert jax.device_count() == 1
    run = load_run(tmp_path / "run")
    images, labels = np.zeros((4, 28, 28, 1), np.uint8), np.arange(4, dtype=np.int32)
    assert run.predict(images).shape == (4, 10)
    assert 0 <= run.evaluate(images, labels)["accuracy"] <= 1


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_evaluate_reproduces_the_runs_own_test_figures_in_its_compute_dtype(
    tmp_path, compute_dtype
):
    # a bfloat16 run was evaluated in float32: its loss differed from the run's in the third digit
    rng = np.random.default_rng(3)
    (images, labels), (test_x, test_y) = _data(rng, 64), _data(rng, 40)
    config = TrainConfig(
        epochs=1,
        learning_rate=0.05,
        standardize="per_channel",
        compute_dtype=compute_dtype,
        out=str(tmp_path),
        progress=False,
    )
    result = fit(
        SmallNet(features=6),
        Loader(images, labels, batch_size=16, seed=0),
        None,
        config,
        test_loader=Loader(test_x, test_y, batch_size=40, shuffle=False),
    )
    run = load_run(tmp_path)
    assert run.config["compute_dtype"] == compute_dtype
    report = run.evaluate(test_x, test_y, batch_size=40)
    rel = 1e-6
    assert report["loss"] == pytest.approx(result["summary"]["test_loss"], rel=rel)
    assert report["accuracy"] == pytest.approx(result["summary"]["test_accuracy"], rel=1e-6)


class Float64Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(3, (3, 3), strides=2, param_dtype=jnp.float64)(x)
        x = nn.BatchNorm(use_running_average=not train, param_dtype=jnp.float64)(x)
        return nn.Dense(3, param_dtype=jnp.float64)(jnp.mean(jnp.tanh(x), axis=(1, 2)))


def test_a_float64_run_reloads_bit_exactly_and_predicts_float64_logits(tmp_path, rng):
    """Under jax_enable_x64 a float64 run's checkpoint reloads with its dtypes and bits, and
    predict returns the model's float64 logits (they were rounded to float32)."""
    with jax.enable_x64(True):
        images = rng.normal(size=(24, 8, 8, 2))
        labels = rng.integers(0, 3, size=24).astype(np.int32)
        config = TrainConfig(epochs=1, out=str(tmp_path / "run"), progress=False)
        result = fit(Float64Net(), Loader(images, labels, batch_size=8, seed=0), None, config)
        run = load_run(tmp_path / "run")
        state = result["state"].variables()
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(run.variables), strict=True):
            assert b.dtype == a.dtype
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        assert {str(leaf.dtype) for leaf in jax.tree.leaves(run.variables["params"])} == {"float64"}
        logits = run.predict(images[:5], batch_size=2)
        # jitted as predict is: flax's BatchNorm keeps float32 statistics, whose float32 rsqrt
        # may differ by an ulp between an eager and a jitted program
        apply = jax.jit(lambda variables, x: Float64Net().apply(variables, x, train=False))
        expected = apply(run.variables, jnp.asarray(images[:5]))
        assert logits.dtype == np.float64
        np.testing.assert_allclose(logits, expected, rtol=1e-14, atol=1e-15)


def test_a_float64_run_loaded_without_x64_is_refused_not_rounded_to_float32(tmp_path, rng):
    """Without jax_enable_x64, JAX holds no float64: load_run returned the float64 run's
    variables rounded to float32 (and float32 logits), with only JAX's dtype warnings."""
    with jax.enable_x64(True):
        images = rng.normal(size=(16, 8, 8, 2))
        labels = rng.integers(0, 3, size=16).astype(np.int32)
        config = TrainConfig(epochs=1, out=str(tmp_path / "run"), progress=False)
        fit(Float64Net(), Loader(images, labels, batch_size=8, seed=0), None, config)
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # JAX's, on the model's float64 init
        with pytest.raises(RunFolderError, match=r"64-bit variables.*jax_enable_x64") as caught:
            load_run(tmp_path / "run", model=Float64Net())
    assert "['params']['BatchNorm_0']['bias'] (float64)" in str(caught.value)
    with jax.enable_x64(True):
        run = load_run(tmp_path / "run", model=Float64Net())
        assert run.predict(images[:2]).dtype == np.float64
