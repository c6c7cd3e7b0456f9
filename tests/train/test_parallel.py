"""Data parallelism: 8 devices and 2 processes train exactly like 1 device on the same global batch.

Each configuration runs in its own subprocess (the device count is fixed when JAX starts). The
model has BatchNorm, so equality also shows that its statistics are taken over the global batch:
per-device statistics would give different parameters and running averages.
"""

import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

WORKER = textwrap.dedent(
    """
    import sys

    mode, out = sys.argv[1], sys.argv[2]
    if mode == "process":
        rank, nproc, port = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
        from jcnn.train import parallel

        parallel.initialize_distributed(f"localhost:{port}", nproc, rank)

    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jcnn.train import TrainState, optimizer, parallel, train_step


    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Conv(4, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = jnp.mean(nn.relu(x), axis=(1, 2))
            return nn.Dense(3)(x)


    rng = np.random.default_rng(0)
    images = (rng.normal(size=(4, 16, 6, 6, 2)) * 3 + 1).astype(np.float32)
    labels = rng.integers(0, 3, size=(4, 16)).astype(np.int32)
    state = TrainState.create(
        Net(), optimizer("momentum", 0.1), jax.random.PRNGKey(0), jnp.zeros((1, 6, 6, 2))
    )
    mesh = None if mode == "single" else parallel.make_mesh()
    if mesh is not None:
        state = parallel.replicate(state, mesh)
    losses = []
    for images_t, labels_t in zip(images, labels, strict=True):
        batch = (images_t, labels_t)
        if mode == "process":
            per = 16 // jax.process_count()
            rows = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
            batch = (images_t[rows], labels_t[rows])
        if mesh is not None:
            batch = parallel.shard_batch(batch, mesh)
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    if mesh is not None:
        assert len(batch[0].sharding.device_set) == len(jax.devices())
        assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(state))
    tree = {"params": state.params, "stats": state.batch_stats}
    leaves = {
        jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0))
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }
    if jax.process_index() == 0:
        np.savez(out, losses=np.asarray(losses), devices=len(jax.devices()), **leaves)
    """
)


def _env(devices=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = " ".join(
        flag
        for flag in env.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    )
    if devices:
        flags += f" --xla_force_host_platform_device_count={devices}"
    env["XLA_FLAGS"] = flags
    return env


def _run(tmp_path, name, *args, devices=None):
    out = tmp_path / f"{name}.npz"
    subprocess.run(
        [sys.executable, str(tmp_path / "worker.py"), args[0], str(out), *args[1:]],
        env=_env(devices),
        check=True,
        timeout=300,
        capture_output=True,
    )
    return dict(np.load(out))


@pytest.fixture
def single(tmp_path):
    (tmp_path / "worker.py").write_text(WORKER)
    return _run(tmp_path, "single", "single")


def _assert_same_training(got, expected, devices):
    assert int(got["devices"]) == devices
    assert set(got) == set(expected)
    np.testing.assert_allclose(got["losses"], expected["losses"], rtol=1e-5)
    for key in expected:
        if key not in ("losses", "devices"):
            np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-6, err_msg=key)


def test_eight_devices_equal_one(tmp_path, single):
    mesh = _run(tmp_path, "mesh", "mesh", devices=8)
    _assert_same_training(mesh, single, devices=8)


def test_two_processes_equal_one(tmp_path, single):
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = str(sock.getsockname()[1])
    worker = str(tmp_path / "worker.py")
    out = tmp_path / "processes.npz"
    procs = [
        subprocess.Popen(
            [sys.executable, worker, "process", str(out), str(rank), "2", port],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    try:
        logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), "\n".join(log[-3000:] for log in logs)
    _assert_same_training(dict(np.load(out)), single, devices=2)


def test_make_mesh_names_a_bad_devices():
    import jax
    import jax.numpy as jnp

    from jcnn.train import parallel

    available = jax.devices()
    # an int given as NumPy or 0-d JAX (config.devices as users write it) failed with
    # "'numpy.int64' object is not iterable", and so did True or 1.0
    for count in (np.int64(1), jnp.int32(1), np.array(1)):
        assert parallel.make_mesh(count).devices.tolist() == available[:1]
    expected = "devices: expected None, an int or a sequence of jax.Device"
    for bad in (True, 1.0, "1", [0]):
        with pytest.raises(TypeError, match=expected):
            parallel.make_mesh(bad)
    # the same device twice made a mesh that failed in shard_batch with a raw safe_zip error
    with pytest.raises(ValueError, match="devices: expected distinct devices"):
        parallel.make_mesh([available[0], available[0]])
    with pytest.raises(ValueError, match=r"devices: expected 1\.\.\d+ \(the devices JAX sees\)"):
        parallel.make_mesh(np.int64(0))


def test_shard_batch_names_leaves_without_a_batch_axis():
    import jax.numpy as jnp

    from jcnn.train import parallel

    mesh = parallel.make_mesh(1)
    # a nested list or a 0-d array failed with a raw AttributeError / IndexError
    for batch in ([[1, 2], [3, 4]], (jnp.ones(()), jnp.ones(2))):
        with pytest.raises(TypeError, match="batch: expected arrays with a leading batch axis"):
            parallel.shard_batch(batch, mesh)
    images, labels = parallel.shard_batch((np.ones((4, 2)), np.arange(4)), mesh)
    np.testing.assert_array_equal(labels, np.arange(4))


def test_replicate_takes_typed_keys():
    import jax

    from jcnn.train import parallel

    mesh = parallel.make_mesh(1)
    # a typed key failed with a raw "JAX array with PRNGKey dtype cannot be converted to a NumPy
    # array"; it is now replicated as a key of the same implementation and values
    keys = jax.random.split(jax.random.key(1, impl="rbg"), 3)
    tree = {"key": jax.random.key(0), "keys": keys, "raw": jax.random.PRNGKey(2)}
    placed = parallel.replicate(tree, mesh)
    assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(placed))
    assert jax.random.key_impl(placed["keys"]) == jax.random.key_impl(keys)
    np.testing.assert_array_equal(
        jax.random.key_data(placed["key"]), jax.random.key_data(jax.random.key(0))
    )
    np.testing.assert_array_equal(jax.random.key_data(placed["keys"]), jax.random.key_data(keys))
    np.testing.assert_array_equal(placed["raw"], jax.random.PRNGKey(2))


def test_initialize_distributed_checks_its_arguments_and_restores_the_setting():
    import jax
    import jax.numpy as jnp

    from jcnn.train import parallel

    # True, 2.0 or "0" reached jax.distributed.initialize (or failed with a raw "'<=' not
    # supported"); now a TypeError naming the argument, with the setting untouched
    before = jax.config.jax_cpu_collectives_implementation
    for num_processes, process_id, name in (
        (True, 0, "num_processes"),
        (2.0, 0, "num_processes"),
        (2, "0", "process_id"),
        (2, None, "process_id"),
    ):
        with pytest.raises(TypeError, match=f"{name}: expected an int"):
            parallel.initialize_distributed("localhost:1", num_processes, process_id)
    with pytest.raises(ValueError, match="num_processes: expected an int >= 1, got 0"):
        parallel.initialize_distributed("localhost:1", 0, 0)
    with pytest.raises(ValueError, match="cpu_collectives: expected one of 'gloo', 'mpi'"):
        parallel.initialize_distributed("localhost:1", 2, 0, cpu_collectives="nccl")
    assert jax.config.jax_cpu_collectives_implementation == before
    # JAX is already running here, so jax.distributed.initialize refuses: the collectives
    # implementation set for it stayed changed; it is now restored
    jnp.ones(1).block_until_ready()
    other = "mpi" if before != "mpi" else "gloo"
    with pytest.raises(RuntimeError, match="must be called before"):
        parallel.initialize_distributed("localhost:1", np.int64(2), 0, cpu_collectives=other)
    assert jax.config.jax_cpu_collectives_implementation == before


def test_a_mesh_that_is_not_one_is_named():
    import jax
    from jax.sharding import Mesh

    from jcnn.train import parallel

    other_axis = Mesh(np.asarray(jax.devices()[:1]), ("model",))
    calls = (
        lambda mesh: parallel.shard_batch((np.ones((2, 3)),), mesh),
        lambda mesh: parallel.replicate({"w": np.ones(3)}, mesh),
        parallel.data_sharding,
        parallel.replicated_sharding,
    )
    for mesh in (None, "data", 1, jax.devices()[0], other_axis):
        for call in calls:
            with pytest.raises(
                TypeError, match=r"mesh: expected a jax.sharding.Mesh with a 'data'"
            ):
                call(mesh)
    placed = parallel.replicate({"w": np.ones(3)}, parallel.make_mesh(1))
    np.testing.assert_array_equal(placed["w"], np.ones(3))
