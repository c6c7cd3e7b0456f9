"""Data parallelism with ``jax.sharding``: one mesh axis ``"data"``, batch split, state replicated.

The same jit-compiled ``train_step`` runs on 1 device, on 8 devices of one host, or on many hosts:
only the placement of its inputs changes. The batch is a *global* array sharded along its first
axis; parameters, BatchNorm statistics and optimizer state are replicated. Every mean over the
batch inside the step (the loss, and BatchNorm's batch mean and variance) is a mean over the
global batch, which XLA's SPMD partitioner turns into per-device partial sums plus an all-reduce:
the result equals single-device training on the same global batch up to float32 summation order.

Multi-process (one process per host, or several on one machine for testing)::

    parallel.initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=rank)
    mesh = parallel.make_mesh()                 # every device of every process
    state = parallel.replicate(state, mesh)
    batch = parallel.shard_batch(local_batch, mesh)   # each process passes its own slice
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jcnn.functional._checks import _describe, check_choice, check_int

__all__ = [
    "DATA_AXIS",
    "make_mesh",
    "data_sharding",
    "replicated_sharding",
    "replicate",
    "shard_batch",
    "initialize_distributed",
]

DATA_AXIS = "data"
"""The name of the mesh axis ``make_mesh`` splits batches over."""


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (default: all devices of all processes).

    Args:
        devices: a sequence of ``jax.Device``, an int (the first that many devices), or ``None``.

    Returns:
        A ``jax.sharding.Mesh``.
    """
    available = jax.devices()
    expected = "devices: expected None, an int or a sequence of jax.Device"
    if devices is None:
        devices = available
    elif (
        isinstance(devices, (str, bytes))
        or not isinstance(devices, Iterable)
        or getattr(devices, "ndim", None) == 0
    ):
        try:
            count = check_int(devices, "devices")
        except TypeError:
            raise TypeError(f"{expected}, got {_describe(devices)}") from None
        if not 1 <= count <= len(available):
            raise ValueError(
                f"devices: expected 1..{len(available)} (the devices JAX sees), got {count}"
            )
        devices = available[:count]
    devices = list(np.ravel(devices)) if isinstance(devices, np.ndarray) else list(devices)
    if not devices:
        raise ValueError("devices: expected at least one device, got an empty sequence")
    if not all(isinstance(device, jax.Device) for device in devices):
        raise TypeError(f"{expected}, got {devices!r}")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices: expected distinct devices, got {devices!r}")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def _check_mesh(mesh) -> Mesh:
    if not isinstance(mesh, Mesh) or DATA_AXIS not in mesh.axis_names:
        raise TypeError(
            f"mesh: expected a jax.sharding.Mesh with a {DATA_AXIS!r} axis (from make_mesh), got "
            f"{_describe(mesh) if not isinstance(mesh, Mesh) else mesh}"
        )
    return mesh


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays split along their first (batch) axis over the ``"data"`` axis."""
    return NamedSharding(_check_mesh(mesh), PartitionSpec(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Arrays copied whole onto every device of the mesh."""
    return NamedSharding(_check_mesh(mesh), PartitionSpec())


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of ``tree`` (e.g. a ``TrainState``) replicated over the mesh.

    Each process must hold the same values (true for a state built from the same seed).
    """
    sharding = replicated_sharding(mesh)

    def place(leaf):
        if jax.dtypes.issubdtype(getattr(leaf, "dtype", None), jax.dtypes.prng_key):
            # a typed key (jax.random.key) has no NumPy form: place its data, wrap it again
            data = place(jax.random.key_data(leaf))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(leaf))
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """A batch as global arrays sharded on ``"data"``, from this process's local part.

    With one process the local part is the whole batch. With several, each passes its own
    consecutive slice (process ``p`` of ``P`` holds rows ``p * n / P`` to ``(p + 1) * n / P`` of the
    global batch of ``n``) and the result is the global batch.

    Args:
        batch: a pytree of arrays with a leading batch axis (e.g. ``(images, labels)``).
        mesh: the mesh from ``make_mesh``.

    Returns:
        The same pytree of ``jax.Array``s sharded over the mesh.
    """
    sharding = data_sharding(mesh)
    local_devices = len(mesh.local_devices)

    def place(leaf):
        if not hasattr(leaf, "shape") or len(leaf.shape) == 0:
            raise TypeError(
                f"batch: expected arrays with a leading batch axis, got {_describe(leaf)}"
            )
        if leaf.shape[0] % local_devices:
            raise ValueError(
                f"batch: the local batch of {leaf.shape[0]} must divide evenly over this "
                f"process's {local_devices} devices"
            )
        return jax.make_array_from_process_local_data(sharding, np.asarray(leaf))

    return jax.tree.map(place, batch)


def initialize_distributed(
    coordinator_address: str,
    num_processes: int,
    process_id: int,
    *,
    cpu_collectives: str | None = "gloo",
) -> None:
    """Join a multi-process JAX job (``jax.distributed.initialize``).

    Call it first, before any other JAX call. On GPU and TPU clusters the collectives are NCCL /
    ICI and ``cpu_collectives`` is irrelevant; on CPU, cross-process all-reduces need an
    implementation (``"gloo"``).

    Args:
        coordinator_address: ``host:port`` of process 0.
        num_processes: the number of processes in the job.
        process_id: this process's rank, ``0 <= process_id < num_processes``.
        cpu_collectives: ``"gloo"``, ``"mpi"`` or ``None`` to leave JAX's setting alone.
    """
    num_processes = check_int(num_processes, "num_processes", low=1)
    process_id = check_int(process_id, "process_id")
    if not 0 <= process_id < num_processes:
        raise ValueError(
            f"process_id: expected 0 <= process_id < num_processes ({num_processes}), "
            f"got {process_id}"
        )
    previous = jax.config.jax_cpu_collectives_implementation
    if cpu_collectives is not None:
        check_choice(cpu_collectives, "cpu_collectives", ("gloo", "mpi"))
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
        )
    except BaseException:
        # a failed join leaves JAX's setting as it was
        jax.config.update("jax_cpu_collectives_implementation", previous)
        raise
