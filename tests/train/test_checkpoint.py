"""Checkpoints: bitwise round trip, keep-last-k plus best, crash mid-save, corrupt files."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcnn.train.checkpoint import CheckpointError, CheckpointManager


def _tree(rng):
    params = {
        "conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32)},
        "bias": jnp.asarray(rng.normal(size=4), jnp.float32),
    }
    opt_state = optax.adam(1e-3).init(params)
    return {
        "params": params,
        "batch_stats": {"mean": jnp.asarray(rng.normal(size=4), jnp.float32)},
        "opt_state": opt_state,
        "step": jnp.asarray(7, jnp.int32),
        "key": jax.random.PRNGKey(int(rng.integers(1 << 30))),
    }


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_is_bitwise_and_keeps_meta(tmp_path, rng):
    tree = _tree(rng)
    manager = CheckpointManager(tmp_path / "ckpt")
    meta = {"epoch": 2, "batch": 5, "running": {"loss": 0.1 + 0.2}, "history": [{"a": 1.5}]}
    manager.save(7, tree, meta)
    template = jax.tree.map(jnp.zeros_like, tree)
    restored, got_meta = manager.restore(template)
    _assert_bitwise_equal(restored, tree)
    assert got_meta == meta  # floats survive JSON exactly (0.1 + 0.2 != 0.3)


def test_keeps_last_k_plus_best(tmp_path, rng):
    tree = _tree(rng)
    manager = CheckpointManager(tmp_path, keep_last=2, mode="max")
    metrics = {1: 0.5, 2: 0.9, 3: 0.7, 4: None, 5: 0.6}
    for step, metric in metrics.items():
        manager.save(step, tree, metric=metric)
    assert manager.steps() == [2, 4, 5]
    assert manager.best_step() == 2
    assert manager.latest_step() == 5
    manager.save(6, tree, metric=0.95)
    assert manager.steps() == [5, 6]


CRASHING_SAVE = textwrap.dedent(
    """
    import os, sys
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import async_path
    from jcnn.train.checkpoint import CheckpointManager

    manager = CheckpointManager(sys.argv[1])
    manager.save(1, {"w": jnp.arange(6.0), "step": jnp.asarray(1)})

    async def crash(src, dst):  # dies after every file is written, before the commit rename
        os._exit(9)

    async_path.rename = crash
    manager.save(2, {"w": jnp.arange(6.0) * 2, "step": jnp.asarray(2)})
    """
)


def test_crash_during_save_leaves_previous_checkpoint(tmp_path):
    script = tmp_path / "crash.py"
    script.write_text(CRASHING_SAVE)
    ckpt = tmp_path / "ckpt"
    done = subprocess.run(
        [sys.executable, str(script), str(ckpt)], capture_output=True, timeout=120
    )
    assert done.returncode == 9, done.stderr.decode()[-2000:]
    leftovers = [p.name for p in ckpt.iterdir() if p.name.startswith("step_00000002")]
    assert leftovers and all("tmp" in name for name in leftovers)  # the partial save is there
    manager = CheckpointManager(ckpt)
    assert manager.steps() == [1]
    restored, _ = manager.restore({"w": jnp.zeros(6), "step": jnp.asarray(0)})
    np.testing.assert_array_equal(restored["w"], np.arange(6.0))
    assert int(restored["step"]) == 1


class _Killed(BaseException):
    """The process dying part-way through deleting a folder."""


@pytest.mark.parametrize("deleted", ["pruned", "replaced"])
def test_a_crash_while_a_checkpoint_is_deleted_leaves_the_others_usable(
    tmp_path, rng, monkeypatch, deleted
):
    # Killed while pruning an old checkpoint (or while replacing one saved at the same step),
    # after its manifest was deleted and before the rest: the folder must still open and
    # restore, not stop every resume on a checkpoint without its manifest.
    tree = _tree(rng)
    manager = CheckpointManager(tmp_path, keep_last=2, keep_best=False)
    manager.save(1, tree, status="good")
    manager.save(2, tree, status="good")
    real_rmtree = shutil.rmtree

    def killed_part_way(path, *args, **kwargs):
        manifest = Path(path) / "manifest.json"
        if not manifest.exists():  # a folder that was never there, or a staging one
            return real_rmtree(path, *args, **kwargs)
        manifest.unlink()
        raise _Killed

    monkeypatch.setattr(shutil, "rmtree", killed_part_way)
    with pytest.raises(_Killed):
        manager.save(3 if deleted == "pruned" else 2, tree, status="good")
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    reopened = CheckpointManager(tmp_path, keep_last=1, keep_best=False)
    restored, _ = reopened.restore(tree)
    _assert_bitwise_equal(restored, tree)
    assert reopened.steps() == ([2, 3] if deleted == "pruned" else [1])
    reopened.save(4, tree, status="good")  # the next save clears what the crash left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json", "step_00000004"]


def test_corrupt_checkpoint_is_reported(tmp_path, rng):
    tree = _tree(rng)
    manager = CheckpointManager(tmp_path)
    manager.save(1, tree)
    manager.save(2, tree)
    for path in (manager.path(2) / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match=r"step_00000002 is corrupt.*available: \[1\]"):
        manager.restore(tree)
    restored, _ = manager.restore(tree, step=1)
    _assert_bitwise_equal(restored, tree)


def test_mismatched_template_and_missing_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        manager.restore({"w": jnp.zeros(3)})
    manager.save(3, {"w": jnp.zeros(3)})
    with pytest.raises(CheckpointError, match="corrupt or incompatible"):
        manager.restore({"w": jnp.zeros(4)})
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


# ---- integrity: every byte of a checkpoint is checked ------------------------------------------


def _saved(tmp_path, rng, steps=(1, 2)):
    tree = _tree(rng)
    manager = CheckpointManager(tmp_path / "ckpt")
    for step in steps:
        manager.save(step, tree, {"epoch": step}, metric=0.5)
    return manager, tree


def _checkpoint_files(manager, step):
    return sorted(p for p in manager.path(step).rglob("*") if p.is_file())


def test_every_file_of_a_checkpoint_is_covered_by_a_checksum(tmp_path, rng):
    manager, tree = _saved(tmp_path, rng)
    files = _checkpoint_files(manager, 2)
    kinds = {p.relative_to(manager.path(2)).parts[0] for p in files}
    assert {"state", "meta", "manifest.json"} <= kinds
    assert any("/d/" in p.as_posix() for p in files)  # orbax's array data files are among them
    for path in files:
        original = path.read_bytes()
        for position in sorted({0, len(original) // 2, len(original) - 1}):
            flipped = bytearray(original)
            flipped[position] ^= 0x01  # one bit of one byte
            path.write_bytes(bytes(flipped))
            name = path.relative_to(manager.path(2)).as_posix()
            with pytest.raises(CheckpointError, match="step_00000002") as error:
                manager.restore(tree)
            assert name in str(error.value) or "manifest.json" in str(error.value), str(error.value)
            assert "available: [1]" in str(error.value)
            path.write_bytes(original)
    restored, meta = manager.restore(tree)  # intact again: restores bitwise
    _assert_bitwise_equal(restored, tree)
    assert meta == {"epoch": 2}


@pytest.mark.parametrize("cut", ["one_byte", "empty"])
def test_truncated_files_are_reported_with_their_sizes(tmp_path, rng, cut):
    manager, tree = _saved(tmp_path, rng, steps=(3,))
    for path in _checkpoint_files(manager, 3):
        if path.name == "manifest.json":
            continue
        original = path.read_bytes()
        path.write_bytes(original[:-1] if cut == "one_byte" else b"")
        size = len(original) - 1 if cut == "one_byte" else 0
        with pytest.raises(CheckpointError, match=f"has {size} bytes, expected {len(original)}"):
            manager.restore(tree)
        path.write_bytes(original)


def test_missing_extra_and_renamed_files_are_reported(tmp_path, rng):
    manager, tree = _saved(tmp_path, rng, steps=(4,))
    data_file = next(p for p in _checkpoint_files(manager, 4) if "/d/" in p.as_posix())
    data_file.rename(data_file.with_name("moved"))
    with pytest.raises(CheckpointError, match=r"is missing.*moved is not in the manifest"):
        manager.restore(tree)


def test_missing_or_garbage_manifest(tmp_path, rng):
    manager, tree = _saved(tmp_path, rng, steps=(5,))
    manifest = manager.path(5) / "manifest.json"
    text = manifest.read_text()
    manifest.unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        manager.restore(tree)
    with pytest.raises(CheckpointError, match="no manifest.json"):
        CheckpointManager(manager.directory)  # reported on opening, before any training
    for garbage in ("", "{", "[1, 2]", text.replace('"metric": 0.5', '"metric": 0.6')):
        manifest.write_text(garbage)
        with pytest.raises(CheckpointError, match="manifest.json is unreadable"):
            CheckpointManager(manager.directory)


def test_a_checkpoint_copied_to_another_step_is_named_as_such(tmp_path, rng):
    manager, _ = _saved(tmp_path, rng, steps=(4,))
    shutil.copytree(manager.path(4), manager.path(7))
    with pytest.raises(CheckpointError, match=r"records step 4, not the step 7 its folder"):
        manager.manifest(7)
    with pytest.raises(CheckpointError, match=r"records step 4, not the step 7 its folder"):
        CheckpointManager(manager.directory)


@pytest.mark.parametrize(
    "garbage",
    ["", "not json", "[]", '{"format": 1}', '{"metrics": {"1": 0.5}}', '{"format": 1, "che'],
)
def test_garbage_index_is_reported_when_the_manager_opens(tmp_path, rng, garbage):
    manager, _ = _saved(tmp_path, rng, steps=(1,))
    (manager.directory / "index.json").write_text(garbage)
    with pytest.raises(CheckpointError, match=r"index.json is unreadable"):
        CheckpointManager(manager.directory)


def test_a_flipped_byte_in_the_index_is_reported(tmp_path, rng):
    manager, _ = _saved(tmp_path, rng, steps=(1,))
    index = manager.directory / "index.json"
    text = index.read_text()
    index.write_text(text.replace("unverified", "good"))  # still valid JSON, a valid status
    with pytest.raises(CheckpointError, match="index.json is unreadable.*own checksum"):
        CheckpointManager(manager.directory)


def test_restored_arrays_are_checked_against_the_arrays_saved(tmp_path, rng):
    """Files consistent with a forged manifest still fail: the arrays' own checksums differ."""
    from jcnn.train import checkpoint as C

    manager, tree = _saved(tmp_path, rng, steps=(1,))
    other = jax.tree.map(lambda x: x + 1 if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
    manager.save(2, other)
    shutil.rmtree(manager.path(1) / "state")
    shutil.copytree(manager.path(2) / "state", manager.path(1) / "state")
    manifest = C._unseal(json.loads((manager.path(1) / "manifest.json").read_text()))
    manifest["files"] = {
        name: {"size": path.stat().st_size, "sha256": C._sha256_file(path)}
        for name, path in C._files(manager.path(1)).items()
    }
    (manager.path(1) / "manifest.json").write_text(json.dumps(C._seal(manifest)))
    with pytest.raises(CheckpointError, match=r"restored arrays fail their checksums") as error:
        manager.restore(tree, step=1)
    assert "batch_stats/mean differs from the array saved" in str(error.value)
    assert "and 2 more" in str(error.value)  # 7 float arrays changed: five named, two counted


def test_mismatched_state_is_a_short_message_naming_the_arrays(tmp_path):
    manager = CheckpointManager(tmp_path)
    layers = {f"layer{i}": {"kernel": jnp.zeros((3, 3, 4, 4))} for i in range(40)}
    manager.save(1, layers)
    changed = dict(layers, layer7={"kernel": jnp.zeros((3, 3, 4, 8))}, extra=jnp.zeros(2))
    with pytest.raises(CheckpointError) as error:
        manager.restore(changed)
    message = str(error.value)
    assert len(message) < 600, message
    assert "extra is not in the checkpoint" in message
    assert "layer7/kernel is float32(3, 3, 4, 4) in the checkpoint, float32(3, 3, 4, 8)" in message


def test_statuses_and_the_newest_good_checkpoint_survives_pruning(tmp_path, rng):
    tree = _tree(rng)
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.resume_step() is None
    manager.save(1, tree, status="good")
    manager.save(2, tree)
    bad = dict(tree, params=jax.tree.map(lambda x: x * jnp.inf, tree["params"]))
    manager.save(3, bad, status="good")  # non-finite arrays are bad whatever the caller says
    assert [manager.status(s) for s in (1, 2, 3)] == ["good", "unverified", "bad"]
    manager.mark(2, "bad")
    manager.save(4, bad)
    assert manager.steps() == [1, 3, 4]  # 1 kept: the newest good one
    assert manager.last_good_step() == 1
    assert manager.resume_step() == 1  # 3 and 4 are bad
    manager.save(5, tree)
    assert manager.resume_step() == 5  # unverified is usable
    reopened = CheckpointManager(tmp_path, keep_last=2)  # statuses persist in the index
    assert [reopened.status(s) for s in (1, 4, 5)] == ["good", "bad", "unverified"]
    assert reopened.manifest(4)["non_finite"] == ["params/bias", "params/conv/kernel"]
    with pytest.raises(ValueError, match="status"):
        manager.save(5, tree, status="fine")


def test_a_bad_mark_survives_the_loss_of_the_index(tmp_path, rng):
    # marks were recorded in index.json only: deleting it (or moving it away, as its "damaged"
    # message advises) made a checkpoint marked bad restorable again, the one a resume chose
    tree = _tree(rng)
    manager = CheckpointManager(tmp_path, keep_last=3)
    manager.save(1, tree)
    manager.save(2, tree)
    manager.save(3, tree)
    manager.mark(1, "good")
    manager.mark(3, "bad")
    (tmp_path / "index.json").unlink()
    reopened = CheckpointManager(tmp_path, keep_last=3)
    assert [reopened.status(s) for s in (1, 2, 3)] == ["good", "unverified", "bad"]
    assert reopened.resume_step() == 2 and reopened.last_good_step() == 1
    reopened.restore(tree, step=3)  # the mark is no file of the manifest: it still verifies
    reopened.save(4, tree)  # the rebuilt index holds the marks
    assert CheckpointManager(tmp_path).status(3) == "bad"
    mark = reopened.path(3) / "mark.json"
    mark.write_text(mark.read_text().replace("bad", "good"))
    with pytest.raises(CheckpointError, match=r"step_00000003: mark.json is unreadable.*checksum"):
        CheckpointManager(tmp_path)


def test_bad_save_arguments_are_named_and_write_nothing(tmp_path, rng):
    tree = _tree(rng)
    manager = CheckpointManager(tmp_path)
    manager.save(1, tree, {"epoch": 0}, metric=0.5)
    before = sorted(p.name for p in tmp_path.iterdir())
    for step, error in ((1.5, TypeError), (-1, ValueError), (10**8, ValueError), ("2", TypeError)):
        with pytest.raises(error, match="step: expected an int"):
            manager.save(step, tree)
    with pytest.raises(TypeError, match="metric: expected a number, got 'high'"):
        manager.save(2, tree, metric="high")
    with pytest.raises(TypeError, match="meta: expected a JSON-serializable dict"):
        manager.save(2, tree, {"loss": np.float32(0.5)})
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no stray partial folder
    assert manager.steps() == [1]
    with pytest.raises(TypeError, match="step: expected an int"):
        manager.restore(tree, 1.0)


@pytest.mark.parametrize(
    "meta, says",
    [
        ({1: "a"}, r"meta has the key 1 \(int\), which JSON reads back as the str \"1\""),
        ({"best": {None: 0.5}}, r"meta\['best'\] has the key None"),
        ({"shape": (2, 3)}, r"meta\['shape'\] is a tuple, \(2, 3\), which JSON reads back"),
        ({"runs": [{"lr": 0.1}, {True: 1}]}, r"meta\['runs'\]\[1\] has the key True"),
    ],
)
def test_meta_that_json_would_read_back_as_something_else_is_refused(tmp_path, rng, meta, says):
    tree = _tree(rng)
    manager = CheckpointManager(tmp_path)
    with pytest.raises(TypeError, match=says):
        manager.save(1, tree, meta)
    assert manager.steps() == [] and sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_nan_or_infinite_metric_is_saved_as_no_candidate(tmp_path, rng):
    # save() meant a non-finite metric to rank nowhere, but refused NaN ("metric: expected a
    # number, got nan"), so a diverged val_loss as fit's monitor crashed the epoch's checkpoint
    tree = _tree(rng)
    manager = CheckpointManager(tmp_path, mode="min")
    manager.save(1, tree, metric=0.5)
    for step, metric in enumerate(
        (float("nan"), np.float32("nan"), jnp.float32(jnp.nan), float("inf"), -np.inf), start=2
    ):
        manager.save(step, tree, metric=metric)
        assert manager.metric(step) is None
    assert manager.best_step() == 1 and manager.steps() == [1, 4, 5, 6]


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_typed_prng_keys_round_trip_as_keys(tmp_path, rng, impl):
    # a typed key (jax.random.key, e.g. in optax.add_noise's state) failed the save with NumPy's
    # raw "JAX array with PRNGKey dtype cannot be converted to a NumPy array"
    tree = dict(_tree(rng), noise=jax.random.split(jax.random.key(3, impl=impl), 2))
    manager = CheckpointManager(tmp_path)
    manager.save(1, tree)
    template = dict(tree, noise=jax.random.split(jax.random.key(0, impl=impl), 2))
    restored, _ = manager.restore(template)
    assert jax.random.key_impl(restored["noise"]) == jax.random.key_impl(tree["noise"])
    _assert_bitwise_equal(
        jax.random.key_data(restored["noise"]), jax.random.key_data(tree["noise"])
    )
    _assert_bitwise_equal(
        {k: v for k, v in restored.items() if k != "noise"},
        {k: v for k, v in tree.items() if k != "noise"},
    )


def test_bad_manager_arguments_are_named(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    for directory in (afile, afile / "ckpt"):
        with pytest.raises(CheckpointError, match=r"directory: expected a folder.*is a file"):
            CheckpointManager(directory)
    assert afile.read_text() == "not a folder"
    for keep_best in ("no", 0, None):
        with pytest.raises(TypeError, match="keep_best: expected a Python bool"):
            CheckpointManager(tmp_path / "ckpt", keep_best=keep_best)
    with pytest.raises(ValueError, match="mode: expected one of 'max', 'min', got 'best'"):
        CheckpointManager(tmp_path / "ckpt", mode="best")
    with pytest.raises(TypeError, match="keep_last: expected a positive int"):
        CheckpointManager(tmp_path / "ckpt", keep_last=True)
    assert not (tmp_path / "ckpt").exists()  # nothing created for a refused manager
    manager = CheckpointManager(tmp_path / "ckpt", keep_last=np.int64(2), keep_best=np.bool_(0))
    assert (manager.keep_last, manager.keep_best) == (2, False)
    assert type(manager.keep_last) is int and type(manager.keep_best) is bool


def test_a_missing_step_is_named_as_missing_not_as_damaged(tmp_path, rng):
    manager = CheckpointManager(tmp_path)
    manager.save(3, _tree(rng), metric=0.5)
    for query in (
        manager.status,
        manager.metric,
        manager.manifest,
        lambda s: manager.mark(s, "good"),
    ):
        with pytest.raises(CheckpointError, match=r"no checkpoint at step 5 in .*; have \[3\]"):
            query(5)
    with pytest.raises(TypeError, match="step: expected an int >= 0, got '3'"):
        manager.status("3")
    assert manager.status(np.int64(3)) == "unverified"
    assert manager.steps() == [3]


def test_a_directory_starting_with_a_tilde_is_in_the_home_folder(tmp_path, rng, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    tree = _tree(rng)
    CheckpointManager("~/ckpt").save(3, tree)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]
    restored, _ = CheckpointManager("~/ckpt").restore(jax.tree.map(jnp.zeros_like, tree))
    _assert_bitwise_equal(restored, tree)


def test_leaves_orbax_cannot_store_are_named_before_anything_is_written(tmp_path, rng):
    # a str leaf or an array without elements failed inside orbax ("Unsupported type", "Cannot
    # save arrays with zero size") and left a stray staging folder; a NumPy scalar saved nothing
    manager = CheckpointManager(tmp_path)
    bad = (
        ({"w": jnp.ones(2), "name": "x"}, TypeError, "state: .* got a str at name"),
        ({"w": np.array([None])}, TypeError, "state: expected arrays of numbers, got dtype object"),
        (
            {"w": jnp.ones((0, 3))},
            ValueError,
            r"state: .*without elements, got shape \(0, 3\) at w",
        ),
        ({}, ValueError, "state: expected a pytree holding at least one array"),
        (None, ValueError, "state: expected a pytree holding at least one array"),
    )
    for state, error, match in bad:
        with pytest.raises(error, match=match):
            manager.save(1, state)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="directory: expected a folder path .*, got 3"):
        CheckpointManager(3)


def test_numpy_and_python_scalars_round_trip(tmp_path):
    # a template holding a Python number failed with AttributeError: 'float' object has no
    # attribute 'dtype'; a NumPy scalar failed in orbax's save
    tree = {"f": 1.5, "i": 3, "g": np.float32(0.25), "w": jnp.arange(3.0)}
    manager = CheckpointManager(tmp_path)
    manager.save(1, tree)
    restored, _ = manager.restore(tree)
    assert restored["f"] == 1.5 and restored["i"] == 3
    assert restored["g"].dtype == np.float32 and restored["g"] == np.float32(0.25)
    np.testing.assert_array_equal(restored["w"], tree["w"])
    with pytest.raises(TypeError, match="template: .* got a str at"):
        manager.restore({**tree, "f": "1.5"})
