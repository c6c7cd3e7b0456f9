"""Epochs of device-resident, augmented batches, reproducible from ``(seed, epoch, step)``.

Randomness (the contract exact resume relies on)::

    root        = jax.random.key(seed)
    order_key   = fold_in(fold_in(root, 0), epoch)              # the epoch's permutation
    step_key    = fold_in(fold_in(fold_in(root, 1), epoch), step)
    example_keys = jax.random.split(fold_in(step_key, 0), batch_size)   # one per example
    batch_key   = fold_in(step_key, 1)                           # for mixup / cutmix

so batch ``step`` of epoch ``epoch`` (its examples and every random augmentation applied to them)
depends on nothing else: not on the batches before it, not on how many epochs ran in this process.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Loader"]

ExampleAugment = Callable[[jax.Array, jax.Array], jax.Array]
BatchAugment = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def _order_key(seed: int, epoch: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 0), epoch)


def _step_key(seed: int, epoch, step) -> jax.Array:
    root = jax.random.fold_in(jax.random.key(seed), 1)
    return jax.random.fold_in(jax.random.fold_in(root, epoch), step)


class Loader:
    """Batches of ``(images, labels)`` for training, augmented on the device inside ``jit``.

    The whole dataset is put on the device once; each batch is gathered, augmented and (optionally)
    placed with ``sharding`` by one jitted function; on an accelerator the host does no image work.

    Interface used by training (and by exact resume)::

        loader = Loader(images, labels, batch_size=512, seed=0, augment=aug)
        len(loader)                         # batches per epoch
        for images, labels in loader.epoch(epoch, start_step=step):   # resume mid-epoch
            ...
        for images, labels in loader:       # epochs 0, 1, 2, ... on successive iterations
            ...
        loader.batch(epoch, step)           # one batch, exactly as ``epoch`` yields it

    Batch ``step`` of ``epoch`` is a pure function of ``(seed, epoch, step)`` (see the module
    docstring for the key derivation), so ``loader.epoch(e, start_step=s)`` in a fresh process
    yields exactly the batches ``s, s + 1, ...`` an uninterrupted run would have seen.

    Args:
      images: array ``(N, H, W, C)`` (typically ``uint8``), or any array-like indexable on axis 0.
      labels: array ``(N,)`` of integer labels (or ``(N, K)`` soft labels).
      batch_size: examples per batch (the global batch when sharded).
      shuffle: a fresh permutation every epoch (from ``order_key``); else the stored order.
      seed: the root of every random choice (order and augmentations).
      augment: per-example op ``(key, image) -> image``, applied under ``vmap`` with one key per
        example; e.g. ``augment.compose(...)``. Labels are untouched.
      batch_augment: batch op ``(key, images, labels) -> (images, labels)`` applied after
        ``augment``, e.g. ``functools.partial(augment.mixup, alpha=0.2, num_classes=10)``.
      drop_remainder: drop the last incomplete batch (default); else yield it, smaller.
      sharding: a ``jax.sharding.Sharding`` each batch is placed with, e.g.
        ``NamedSharding(mesh, PartitionSpec("data"))`` for data-parallel training; ``batch_size``
        must then divide evenly across its devices.
    """

    def __init__(
        self,
        images,
        labels,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        augment: ExampleAugment | None = None,
        batch_augment: BatchAugment | None = None,
        drop_remainder: bool = True,
        sharding: jax.sharding.Sharding | None = None,
    ):
        if not hasattr(images, "shape") or not hasattr(labels, "shape"):
            raise TypeError(
                f"images, labels: expected arrays, got {type(images).__name__}, "
                f"{type(labels).__name__}"
            )
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"labels: expected {images.shape[0]} labels (one per image), got shape "
                f"{tuple(labels.shape)}"
            )
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
            raise TypeError(f"batch_size: expected an int, got {batch_size!r}")
        if not 1 <= batch_size <= images.shape[0]:
            raise ValueError(
                f"batch_size: expected 1..{images.shape[0]} (the number of examples), "
                f"got {batch_size}"
            )
        for name, fn in (("augment", augment), ("batch_augment", batch_augment)):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}: expected a callable or None, got {type(fn).__name__}")
        self.num_examples = int(images.shape[0])
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_remainder = bool(drop_remainder)
        self.sharding = sharding
        self._augment = augment
        self._batch_augment = batch_augment
        self._images = self._resident(images)
        self._labels = self._resident(labels)
        self._next_epoch = 0
        self._make_batch = jax.jit(self._batch_fn)

    def _resident(self, array):
        return jax.device_put(jnp.asarray(array))

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(self.num_examples, self.batch_size)
        return full if self.drop_remainder or rest == 0 else full + 1

    def order(self, epoch: int) -> jax.Array:
        """The example indices of ``epoch`` in the order they are batched."""
        if not self.shuffle:
            return jnp.arange(self.num_examples)
        return jax.random.permutation(_order_key(self.seed, epoch), self.num_examples)

    def _gather(self, indices):
        return self._images[indices], self._labels[indices]

    def _batch_fn(self, indices, epoch, step):
        images, labels = self._gather(indices)
        return self._transform(images, labels, epoch, step)

    def _transform(self, images, labels, epoch, step):
        step_key = _step_key(self.seed, epoch, step)
        if self._augment is not None:
            keys = jax.random.split(jax.random.fold_in(step_key, 0), images.shape[0])
            images = jax.vmap(self._augment)(keys, images)
        if self._batch_augment is not None:
            images, labels = self._batch_augment(jax.random.fold_in(step_key, 1), images, labels)
        return images, labels

    def _place(self, batch):
        if self.sharding is None:
            return batch
        return jax.device_put(batch, self.sharding)

    def batch(self, epoch: int, step: int) -> tuple[jax.Array, jax.Array]:
        """Batch ``step`` of ``epoch``: exactly the one ``epoch(epoch)`` yields at that step."""
        if not 0 <= step < len(self):
            raise ValueError(f"step: expected 0..{len(self) - 1}, got {step}")
        indices = self.order(epoch)[step * self.batch_size : (step + 1) * self.batch_size]
        return self._place(self._make_batch(indices, epoch, step))

    def epoch(self, epoch: int, *, start_step: int = 0) -> Iterator[tuple[jax.Array, jax.Array]]:
        """The batches of ``epoch`` from ``start_step`` on (``start_step`` resumes mid-epoch)."""
        if not 0 <= start_step <= len(self):
            raise ValueError(f"start_step: expected 0..{len(self)}, got {start_step}")
        order = self.order(epoch)
        for step in range(start_step, len(self)):
            indices = order[step * self.batch_size : (step + 1) * self.batch_size]
            yield self._place(self._make_batch(indices, epoch, step))

    def __iter__(self) -> Iterator[tuple[jax.Array, jax.Array]]:
        """The next epoch's batches: epoch 0 on the first iteration, then 1, 2, ..."""
        epoch = self._next_epoch
        self._next_epoch += 1
        return self.epoch(epoch)
