"""Epochs of device-resident, augmented batches, reproducible from ``(seed, epoch, step)``.

Randomness (the contract exact resume relies on)::

    root        = seed_key(seed)     # jax.random.key(seed) for a seed in [0, 2**32)
    order_key   = fold_in(fold_in(root, 0), epoch)              # the epoch's permutation
    step_key    = fold_in(fold_in(fold_in(root, 1), epoch), step)
    example_keys = jax.random.split(fold_in(step_key, 0), n)    # one per example of the batch
    batch_key   = fold_in(step_key, 1)                           # for mixup / cutmix

(``n``: the batch's size, ``batch_size`` but for a last partial or a Poisson batch), so batch
``step`` of epoch ``epoch`` (its examples and every random augmentation applied to them) depends
on nothing else: not on the batches before it, not on how many epochs ran in this process.
(``seed_key`` keeps all 64 bits of a seed: ``jax.random.key`` alone keeps 32 of them unless
64-bit types are on.)

With ``sampling="poisson"`` the examples of a batch are drawn instead as::

    poisson_key = fold_in(fold_in(fold_in(root, 2), epoch), step)
    members     = bernoulli(poisson_key, batch_size / num_examples, (num_examples,))

With ``alternating_flip=True`` example ``i`` is mirrored in epoch ``epoch`` when::

    bernoulli(fold_in(fold_in(root, 3), i)) != (epoch % 2 == 1)

``fit``'s model (initialization and dropout) draws from ``fold_in(root, 4)`` and
``dp_aggregate``'s noise from ``fold_in(root, 5)``: a loader, a model and DP noise given the
same seed share no key.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jcnn.functional._checks import check_bool, check_choice, check_int, check_seed, seed_key

__all__ = ["Loader"]

ExampleAugment = Callable[[jax.Array, jax.Array], jax.Array]
BatchAugment = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


_MAX_EPOCH = 2**31 - 1  # the jitted batch takes the epoch as an int32
_SAME = object()  # with_examples: keep the loader's own augment


def _batch_pieces(sharding: jax.sharding.Sharding) -> int:
    """How many parts ``sharding`` cuts a batch into; it places the ``(N,)`` labels as well as the
    images, so it may split the batch axis alone."""
    devices = len(sharding.device_set)
    named = isinstance(sharding, jax.sharding.NamedSharding)
    try:
        if named and len(sharding.spec) > 1:
            raise ValueError
        return devices // sharding.shard_shape((devices,))[0]
    except (IndexError, ValueError):
        raise ValueError(
            f"sharding: expected a sharding of the batch axis alone (it places the labels too), "
            f"e.g. NamedSharding(mesh, PartitionSpec('data')), got {sharding}"
        ) from None


def _order_key(seed: int, epoch: int) -> jax.Array:
    return jax.random.fold_in(jax.random.fold_in(seed_key(seed), 0), epoch)


def _poisson_key(seed: int, epoch: int, step: int) -> jax.Array:
    root = jax.random.fold_in(seed_key(seed), 2)
    return jax.random.fold_in(jax.random.fold_in(root, epoch), step)


def _rows(array: np.ndarray, count: int, rows: int) -> np.ndarray:
    """The first ``count`` rows of ``array``, then zero rows up to ``rows``."""
    if rows == count:
        return array[:count]
    out = np.zeros((rows, *array.shape[1:]), array.dtype)
    out[:count] = array[:count]
    return out


def poisson_pad_multiple(batch_size: int) -> int:
    """The multiple a Poisson batch of expected size ``batch_size`` is padded to (the loader's
    augmentation, DP-SGD's step): its random sizes then compile a few programs, not one each."""
    return max(32, batch_size // 8)


def _check_call(fn, name: str, arguments: tuple[str, ...]) -> None:
    """Refuse ``fn`` when its signature cannot take ``arguments`` positionally (e.g.
    ``augment.hflip``, which takes the image alone): it would fail at the first batch."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (a builtin): left to the first batch
        return
    try:
        signature.bind(*arguments)
    except TypeError:
        label = getattr(fn, "__qualname__", type(fn).__name__)
        module = sys.modules.get(getattr(fn, "__module__", None) or "")
        random_op = getattr(module, f"random_{label}", None) if module else None
        raise TypeError(
            f"{name}: expected a function of ({', '.join(arguments)}), got {label}{signature}"
            + (f"; the random op is random_{label}" if random_op is not None else "")
        ) from None


def _step_key(seed: int, epoch, step) -> jax.Array:
    root = jax.random.fold_in(seed_key(seed), 1)
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
      batch_size: examples per batch (the global batch when sharded), from 1 to the number of
        examples: a larger one is refused, with ``drop_remainder=False`` too (an epoch of no batch,
        or of one batch smaller than asked, would hide the mistake).
      shuffle: a fresh permutation every epoch (from ``order_key``); else the stored order.
      seed: the root of every random choice (order and augmentations).
      augment: per-example op ``(key, image) -> image``, applied under ``vmap`` with one key per
        example; e.g. ``augment.compose(...)``. Labels are untouched.
      batch_augment: batch op ``(key, images, labels) -> (images, labels)`` applied after
        ``augment``, e.g. ``functools.partial(augment.mixup, alpha=0.2, num_classes=10)``.
      drop_remainder: drop the last incomplete batch (default); else yield it, smaller.
      sharding: a ``jax.sharding.Sharding`` each batch is placed with, e.g.
        ``NamedSharding(mesh, PartitionSpec("data"))`` for data-parallel training; every batch
        (the last one too, where ``drop_remainder=False``) must then divide evenly across its
        devices. With a ``NamedSharding`` the dataset is replicated on the mesh's devices and each
        device gathers and augments its own part of the batch; the order, the labels and every
        augmentation's random choices are those of the unsharded loader, and so are the values,
        except that a ``batch_augment`` blending images (``mixup``'s ``lam x + (1 - lam) x'``)
        may round differently in each device's compiled program: within one float32 step
        (``np.testing.assert_array_max_ulp(sharded, unsharded, maxulp=1)``), as XLA may fuse a
        product and a sum into one multiply-add in one program and not in the other. ``cutmix``
        (a pasted box) and the per-example ops give identical values.
      sampling: ``"shuffle"`` (default): each epoch is a permutation cut into batches (every
        example once per epoch). ``"poisson"``: each batch takes each example independently with
        probability ``batch_size / num_examples`` (a batch of random size, ``batch_size`` on
        average; ``len(loader)`` such batches make an epoch, ``num_examples // batch_size``):
        the Poisson subsampling that DP-SGD's privacy accounting assumes (``dp_epsilon`` with
        ``sampling_rate = batch_size / num_examples``); the batches are smaller or larger than
        ``batch_size``, so a jitted step compiles once per size (``jcnn.analysis.pad_batch``
        pads them to a few sizes; the loader's own ``augment`` runs on a few padded sizes,
        ``batch_augment`` once per size). ``shuffle`` and ``drop_remainder`` do not apply; not
        with ``sharding``.
      alternating_flip: mirror (left-right) a random half of the examples in even epochs and
        exactly the other half in odd epochs, before ``augment`` (Jordan 2024, airbench94: every
        pair of consecutive epochs shows each image both ways, where independent random flips
        repeat an orientation half of the time). Images must be ``(N, H, W, C)``.
    """

    def __init__(
        self,
        images: np.ndarray | jax.Array,
        labels: np.ndarray | jax.Array,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        augment: ExampleAugment | None = None,
        batch_augment: BatchAugment | None = None,
        drop_remainder: bool = True,
        sharding: jax.sharding.Sharding | None = None,
        sampling: str = "shuffle",
        alternating_flip: bool = False,
    ) -> None:
        if not hasattr(images, "shape") or not hasattr(labels, "shape"):
            raise TypeError(
                f"images, labels: expected arrays, got {type(images).__name__}, "
                f"{type(labels).__name__}"
            )
        for name, array in (("images", images), ("labels", labels)):
            if len(array.shape) == 0:
                raise ValueError(
                    f"{name}: expected an array with one row per example, got shape ()"
                )
            if 0 in array.shape[1:]:  # examples without values: nothing to learn from
                raise ValueError(
                    f"{name}: expected at least one value per example, got shape "
                    f"{tuple(array.shape)}"
                )
            dtype = getattr(array, "dtype", None)
            kinds = (jnp.integer, jnp.floating, *((jnp.bool_,) if name == "labels" else ()))
            if dtype is None or not any(jnp.issubdtype(dtype, kind) for kind in kinds):
                raise TypeError(f"{name}: expected integer or floating values, got dtype {dtype}")
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"labels: expected {images.shape[0]} labels (one per image), got shape "
                f"{tuple(labels.shape)}"
            )
        if images.shape[0] == 0:
            raise ValueError(
                f"images: expected at least one example, got shape {tuple(images.shape)}"
            )
        self._configure(
            int(images.shape[0]),
            batch_size,
            shuffle,
            seed,
            augment,
            batch_augment,
            drop_remainder,
            sharding,
            sampling,
            alternating_flip,
            tuple(images.shape),
        )
        placement, out_shardings = None, None
        if isinstance(sharding, jax.sharding.NamedSharding):
            # every device holds the dataset and builds its own slice of each batch
            placement = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
            out_shardings = sharding
        self._images = jax.device_put(jnp.asarray(images), placement)
        self._labels = jax.device_put(jnp.asarray(labels), placement)
        self._source = None
        self._make_batch = jax.jit(
            self._gather_and_transform, static_argnames="size", out_shardings=out_shardings
        )
        self._make_indexed_examples = jax.jit(self._gather_indices_and_transform_examples)

    @classmethod
    def from_source(
        cls,
        source: Any,
        *,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        augment: ExampleAugment | None = None,
        batch_augment: BatchAugment | None = None,
        drop_remainder: bool = True,
        sharding: jax.sharding.Sharding | None = None,
        image_key: str = "image",
        label_key: str = "label",
        sampling: str = "shuffle",
        alternating_flip: bool = False,
    ) -> Loader:
        """A streaming loader over a random-access source too large for memory, same interface.

        ``source`` has ``len(source)`` and ``source[i]`` (and, if available, the faster
        ``source.__getitems__(indices)``), each record a mapping with ``image_key`` and
        ``label_key`` or an ``(image, label)`` pair: e.g. ``tfds.data_source(name, split=...)`` or a
        grain data source. Each batch's records are read on the host, stacked, put on the device
        and augmented there by the same jitted function; order and augmentations are exactly those
        of an in-memory ``Loader`` over the same examples with the same seed.
        """
        if not hasattr(source, "__len__") or not hasattr(source, "__getitem__"):
            raise TypeError(
                f"source: expected a random-access source (len() and [i]), got "
                f"{type(source).__name__}"
            )
        if isinstance(source, (str, bytes)):  # a dataset's name is no source of its records
            raise TypeError(
                f"source: expected a random-access source of records (e.g. "
                f"tfds.data_source(name, split=...)), got {type(source).__name__} {source!r}"
            )
        if len(source) == 0:
            raise ValueError("source: expected at least one record, got an empty source")
        for name, key in (("image_key", image_key), ("label_key", label_key)):
            try:  # a list was refused by the first record's lookup: "unhashable type: 'list'"
                hash(key)
            except TypeError:
                raise TypeError(
                    f"{name}: expected a record key such as 'image', got {type(key).__name__} "
                    f"{key!r}"
                ) from None
        loader = cls.__new__(cls)
        loader._configure(
            len(source),
            batch_size,
            shuffle,
            seed,
            augment,
            batch_augment,
            drop_remainder,
            sharding,
            sampling,
            alternating_flip,
        )
        loader._source = source
        loader._keys = (image_key, label_key)
        loader._make_batch = jax.jit(loader._transform)
        loader._make_examples = jax.jit(loader._transform_examples)
        return loader

    def _configure(
        self,
        num_examples,
        batch_size,
        shuffle,
        seed,
        augment,
        batch_augment,
        drop_remainder,
        sharding,
        sampling="shuffle",
        alternating_flip=False,
        shape=None,
    ):
        check_choice(sampling, "sampling", ("shuffle", "poisson"))
        if sampling == "poisson" and sharding is not None:
            raise ValueError(
                "sharding: not available with sampling='poisson' (batches of random size)"
            )
        batch_size = check_int(batch_size, "batch_size")
        if not 1 <= batch_size <= num_examples:
            raise ValueError(
                f"batch_size: expected 1..{num_examples} (the number of examples), got {batch_size}"
            )
        for name, fn, arguments in (
            ("augment", augment, ("key", "image")),
            ("batch_augment", batch_augment, ("key", "images", "labels")),
        ):
            if fn is not None and not callable(fn):
                raise TypeError(f"{name}: expected a callable or None, got {type(fn).__name__}")
            if fn is not None:
                _check_call(fn, name, arguments)
        if sharding is not None and not isinstance(sharding, jax.sharding.Sharding):
            raise TypeError(
                f"sharding: expected a jax.sharding.Sharding or None, got {type(sharding).__name__}"
            )
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.shuffle = check_bool(shuffle, "shuffle")
        self.seed = check_seed(seed)
        self.drop_remainder = check_bool(drop_remainder, "drop_remainder")
        if sharding is not None:
            pieces = _batch_pieces(sharding)
            rest = num_examples % batch_size
            if batch_size % pieces:
                raise ValueError(
                    f"batch_size: expected a multiple of {pieces} (sharding splits each batch "
                    f"over {pieces} devices), got {batch_size}"
                )
            if rest % pieces and not self.drop_remainder:
                raise ValueError(
                    f"drop_remainder: the last batch of {rest} examples ({num_examples} % "
                    f"{batch_size}) does not divide over the {pieces} devices of sharding; "
                    "expected drop_remainder=True or a batch_size that leaves a multiple of "
                    f"{pieces}"
                )
        self.sharding = sharding
        self.sampling = sampling
        self.alternating_flip = check_bool(alternating_flip, "alternating_flip")
        if self.alternating_flip and shape is not None and len(shape) != 4:
            raise ValueError(f"alternating_flip: expected images (N, H, W, C), got shape {shape}")
        self.augment = augment
        self.batch_augment = batch_augment
        self._make_mixed = jax.jit(self._mix)
        self._next_epoch = 0

    @property
    def streaming(self) -> bool:
        """Whether the loader reads each batch's records from a source (``Loader.from_source``)
        rather than holding the examples (then :attr:`examples` has them)."""
        return self._source is not None

    @property
    def examples(self) -> tuple[jax.Array, jax.Array]:
        """The ``(images, labels)`` the loader batches (an in-memory loader only)."""
        if self._source is not None:
            raise TypeError(
                "examples: a streaming loader (Loader.from_source) holds no arrays; split or "
                "transform its source instead"
            )
        return self._images, self._labels

    def with_examples(
        self,
        images: np.ndarray | jax.Array,
        labels: np.ndarray | jax.Array,
        *,
        augment: ExampleAugment | None | object = _SAME,
    ) -> Loader:
        """A loader with these settings (batch size, order, seed, augmentations, sharding) over
        other examples, e.g. the training part of a split or standardized images; ``augment``,
        where given, replaces the per-example augmentation (``None``: none)."""
        return type(self)(
            images,
            labels,
            batch_size=self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            augment=self.augment if augment is _SAME else augment,
            batch_augment=self.batch_augment,
            drop_remainder=self.drop_remainder,
            sharding=self.sharding,
            sampling=self.sampling,
            alternating_flip=self.alternating_flip,
        )

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.sampling == "poisson":
            return self.num_examples // self.batch_size
        full, rest = divmod(self.num_examples, self.batch_size)
        return full if self.drop_remainder or rest == 0 else full + 1

    def order(self, epoch: int) -> jax.Array:
        """The example indices of ``epoch`` in the order they are batched."""
        epoch = check_int(epoch, "epoch", low=0, high=_MAX_EPOCH)
        if not self.shuffle:
            return jnp.arange(self.num_examples)
        return jax.random.permutation(_order_key(self.seed, epoch), self.num_examples)

    def _gather_and_transform(self, all_images, all_labels, order, epoch, step, *, size):
        indices = jax.lax.dynamic_slice_in_dim(order, step * self.batch_size, size)
        return self._transform(all_images[indices], all_labels[indices], epoch, step, indices)

    @property
    def sampling_rate(self) -> float:
        """``batch_size / num_examples``: with ``sampling="poisson"``, each example's chance to be
        in a batch (the ``sampling_rate`` of ``dp_epsilon``)."""
        return self.batch_size / self.num_examples

    def poisson_indices(self, epoch: int, step: int) -> np.ndarray:
        """The (sorted) example indices of Poisson batch ``step`` of ``epoch``."""
        epoch = check_int(epoch, "epoch", low=0, high=_MAX_EPOCH)
        step = check_int(step, "step", low=0, high=len(self) - 1)
        members = jax.random.bernoulli(
            _poisson_key(self.seed, epoch, step), self.sampling_rate, (self.num_examples,)
        )
        return np.flatnonzero(np.asarray(members))

    def _gather_indices_and_transform_examples(self, all_images, all_labels, indices, epoch, step):
        images = self._transform_examples(all_images[indices], epoch, step, indices)
        return images, all_labels[indices]

    def _poisson_size(self, count: int) -> int:
        """The size a Poisson batch of ``count`` examples is augmented at: a multiple of
        ``poisson_pad_multiple(batch_size)``. Padding keeps the documented example keys only
        where ``split`` gives the same first keys at any count (JAX's default partitionable
        Threefry); elsewhere no padding."""
        if not jax.config.jax_threefry_partitionable:
            return count
        multiple = poisson_pad_multiple(self.batch_size)
        return max(multiple, -(-count // multiple) * multiple)

    def _poisson_batch(self, indices, epoch, step):
        count = len(indices)
        padded = np.zeros(self._poisson_size(count), np.int32)  # example 0 stands in for padding
        padded[:count] = indices
        if self._source is None:
            images, labels = self._make_indexed_examples(
                self._images, self._labels, jnp.asarray(padded), epoch, step
            )
        else:
            images, labels = self._read_source(indices, size=len(padded))
            images = self._make_examples(images, epoch, step, padded)
        images, labels = images[:count], labels[:count]
        if self.batch_augment is not None:  # mixes examples: on the real ones only
            images, labels = self._make_mixed(images, labels, epoch, step)
        return images, labels

    def _read_source(self, indices, size=None):
        """The records at ``indices`` on the device; with ``size``, followed by zeros to that
        many rows."""
        indices = np.asarray(indices).tolist()
        count = len(indices)
        if not count:  # an empty Poisson batch: one record read for its shapes, none kept
            indices = [0]
        if hasattr(self._source, "__getitems__"):
            records = list(self._source.__getitems__(indices))
            if len(records) != len(indices):
                raise ValueError(
                    f"source: expected __getitems__ to return one record per index, got "
                    f"{len(records)} records for {len(indices)} indices"
                )
        else:
            records = [self._source[i] for i in indices]
        pairs = [self._image_and_label(r, i) for r, i in zip(records, indices, strict=True)]
        images = self._stack([image for image, _ in pairs], indices, "image")
        labels = self._stack([label for _, label in pairs], indices, "label")
        if labels.dtype == np.int64:
            labels = labels.astype(np.int32)
        rows = count if size is None else size
        images, labels = (_rows(array, count, rows) for array in (images, labels))
        return jax.device_put(images), jax.device_put(labels)

    @staticmethod
    def _stack(values, indices, what):
        """The records' images (or labels) as one array, or an error naming the first record that
        differs in shape from the first one or that is not numeric."""
        arrays = [np.asarray(value) for value in values]
        for array, index in zip(arrays, indices, strict=True):
            if array.shape != arrays[0].shape:
                raise ValueError(
                    f"source: expected every record's {what} to have the shape of record "
                    f"{indices[0]}'s {arrays[0].shape}, got {array.shape} for record {index}"
                )
            if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
                raise TypeError(
                    f"source: expected a numeric {what}, got dtype {array.dtype} for record {index}"
                )
        return np.stack(arrays)

    def _image_and_label(self, record, index):
        image_key, label_key = self._keys
        if isinstance(record, Mapping):
            missing = [key for key in (image_key, label_key) if key not in record]
            if missing:
                raise ValueError(
                    f"source: record {index} has no {', '.join(map(repr, missing))} (its keys: "
                    f"{', '.join(map(repr, record))}); name them with image_key= and label_key="
                )
            return record[image_key], record[label_key]
        if isinstance(record, (tuple, list)) and len(record) == 2:
            return tuple(record)
        described = f"a {len(record)}-tuple" if isinstance(record, (tuple, list)) else None
        raise TypeError(
            f"source: expected records that are mappings with {image_key!r} and {label_key!r} or "
            f"(image, label) pairs, got {described or type(record).__name__} for record {index}"
        )

    def _make(self, order, epoch, step):
        if self.sampling == "poisson":
            return self._poisson_batch(self.poisson_indices(epoch, step), epoch, step)
        start = step * self.batch_size
        size = min(self.batch_size, self.num_examples - start)
        if self._source is None:
            batch = self._make_batch(self._images, self._labels, order, epoch, step, size=size)
        else:
            indices = np.asarray(order[start : start + size])
            batch = self._make_batch(*self._read_source(indices), epoch, step, indices)
        if self.sharding is not None:
            batch = jax.device_put(batch, self.sharding)
        return batch

    def _transform(self, images, labels, epoch, step, indices):
        images = self._transform_examples(images, epoch, step, indices)
        if self.batch_augment is not None:
            images, labels = self._mix(images, labels, epoch, step)
        return images, labels

    def _transform_examples(self, images, epoch, step, indices):
        """``alternating_flip`` and ``augment``: each example on its own."""
        if self.alternating_flip:
            if images.ndim != 4:
                raise ValueError(
                    f"alternating_flip: expected images (N, H, W, C), got shape {images.shape}"
                )
            flip_root = jax.random.fold_in(seed_key(self.seed), 3)
            first = jax.vmap(lambda i: jax.random.bernoulli(jax.random.fold_in(flip_root, i)))
            flip = first(jnp.asarray(indices)) != (epoch % 2 == 1)
            images = jnp.where(flip[:, None, None, None], images[:, :, ::-1, :], images)
        if self.augment is not None:
            step_key = _step_key(self.seed, epoch, step)
            keys = jax.random.split(jax.random.fold_in(step_key, 0), images.shape[0])
            images = jax.vmap(self.augment)(keys, images)
        return images

    def _mix(self, images, labels, epoch, step):
        """``batch_augment``, which mixes the examples of the batch."""
        return self.batch_augment(
            jax.random.fold_in(_step_key(self.seed, epoch, step), 1), images, labels
        )

    def batch(self, epoch: int, step: int) -> tuple[jax.Array, jax.Array]:
        """Batch ``step`` of ``epoch``: exactly the one ``epoch(epoch)`` yields at that step."""
        epoch = check_int(epoch, "epoch", low=0, high=_MAX_EPOCH)
        step = check_int(step, "step", low=0, high=len(self) - 1)
        return self._make(self.order(epoch), epoch, step)

    def epoch(self, epoch: int, *, start_step: int = 0) -> Iterator[tuple[jax.Array, jax.Array]]:
        """The batches of ``epoch`` from ``start_step`` on (``start_step`` resumes mid-epoch)."""
        epoch = check_int(epoch, "epoch", low=0, high=_MAX_EPOCH)
        start_step = check_int(start_step, "start_step", low=0, high=len(self))
        order = self.order(epoch)
        if self._source is not None:
            order = np.asarray(order)
        return (self._make(order, epoch, step) for step in range(start_step, len(self)))

    def __iter__(self) -> Iterator[tuple[jax.Array, jax.Array]]:
        """The next epoch's batches: epoch 0 on the first iteration, then 1, 2, ..."""
        epoch = self._next_epoch
        self._next_epoch += 1
        return self.epoch(epoch)
