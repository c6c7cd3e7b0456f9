"""Checkpoints: bitwise round trip, keep-last-k plus best, crash mid-save, corrupt files."""

import subprocess
import sys
import textwrap

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
