"""Tests of jcnn.data.Loader: coverage, determinism, exact resume, key contract, sharding."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn.data import Loader
from jcnn.data import augment as A

N, SIZE = 50, 6


@pytest.fixture
def dataset(rng):
    images = rng.integers(0, 256, (N, SIZE, SIZE, 1), dtype=np.uint8)
    return images, np.arange(N, dtype=np.int32)


AUGMENT = A.compose(functools.partial(A.random_crop, padding=2), A.random_hflip)


def _epoch(loader, epoch, **kw):
    return [(np.asarray(x), np.asarray(y)) for x, y in loader.epoch(epoch, **kw)]


def test_every_example_once_per_epoch(dataset):
    images, labels = dataset
    loader = Loader(images, labels, batch_size=8, seed=1)
    assert len(loader) == 6
    batches = _epoch(loader, 0)
    seen = np.concatenate([y for _, y in batches])
    assert len(seen) == 48 and len(set(seen)) == 48  # remainder of 2 dropped
    for x, y in batches:
        np.testing.assert_array_equal(x, images[y])  # no augment: the stored images
    full = Loader(images, labels, batch_size=8, seed=1, drop_remainder=False)
    assert len(full) == 7
    batches = _epoch(full, 0)
    assert batches[-1][1].shape == (2,)
    assert sorted(np.concatenate([y for _, y in batches])) == list(range(N))
    ordered = Loader(images, labels, batch_size=10, shuffle=False)
    np.testing.assert_array_equal(np.concatenate([y for _, y in _epoch(ordered, 3)]), labels)


def test_order_depends_on_seed_and_epoch_only(dataset):
    images, labels = dataset
    orders = {
        (seed, epoch): np.concatenate(
            [y for _, y in _epoch(Loader(images, labels, batch_size=10, seed=seed), epoch)]
        )
        for seed in (0, 1)
        for epoch in (0, 1)
    }
    again = Loader(images, labels, batch_size=10, seed=0)
    np.testing.assert_array_equal(np.concatenate([y for _, y in _epoch(again, 1)]), orders[0, 1])
    assert not np.array_equal(orders[0, 0], orders[0, 1])
    assert not np.array_equal(orders[0, 0], orders[1, 0])


def test_same_seed_identical_augmented_batches_and_exact_resume(dataset):
    images, labels = dataset
    first = Loader(images, labels, batch_size=8, seed=7, augment=AUGMENT)
    run = _epoch(first, 2)
    # a fresh loader (a restarted process) resuming at step 3 sees exactly the same batches
    resumed = Loader(images, labels, batch_size=8, seed=7, augment=AUGMENT)
    tail = _epoch(resumed, 2, start_step=3)
    assert len(tail) == len(run) - 3
    for (x, y), (x2, y2) in zip(run[3:], tail, strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    x4, y4 = resumed.batch(2, 4)
    np.testing.assert_array_equal(np.asarray(x4), run[4][0])
    # augmentations differ between epochs and steps, and are not the identity
    other_epoch = _epoch(first, 3)
    assert not np.array_equal(run[0][0], other_epoch[0][0])
    assert any(not np.array_equal(x, images[y]) for x, y in run)


def test_documented_key_derivation(dataset):
    """The batch equals the documented recipe computed by hand (the contract resume relies on)."""
    images, labels = dataset
    seed, epoch, step, batch_size = 3, 5, 2, 8
    loader = Loader(images, labels, batch_size=batch_size, seed=seed, augment=AUGMENT)
    x, y = loader.batch(epoch, step)
    root = jax.random.key(seed)
    order = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(root, 0), epoch), N)
    indices = np.asarray(order[step * batch_size : (step + 1) * batch_size])
    step_key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(root, 1), epoch), step)
    keys = jax.random.split(jax.random.fold_in(step_key, 0), batch_size)
    expected = jax.vmap(AUGMENT)(keys, jnp.asarray(images[indices]))
    np.testing.assert_array_equal(np.asarray(y), indices)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(expected))


def test_iteration_advances_epochs_and_batch_augment(dataset):
    images, labels = dataset
    loader = Loader(
        images,
        labels % 4,
        batch_size=10,
        seed=0,
        batch_augment=functools.partial(A.mixup, alpha=1.0, num_classes=4),
    )
    first = [np.asarray(y) for _, y in loader]
    second = [np.asarray(y) for _, y in loader]
    assert first[0].shape == (10, 4) and not np.array_equal(first[0], second[0])
    np.testing.assert_allclose(first[0].sum(1), 1, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(loader.batch(0, 1)[1]), first[1])
    np.testing.assert_array_equal(np.asarray(loader.batch(1, 0)[1]), second[0])


class _ListSource:
    """A random-access source like tfds.data_source: records are dicts of numpy values."""

    def __init__(self, images, labels, batched_reads):
        self.records = [
            {"image": i, "label": np.int64(l)} for i, l in zip(images, labels, strict=True)
        ]
        self.reads = 0
        if batched_reads:
            self.__getitems__ = lambda idx: [self.records[i] for i in idx]

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        self.reads += 1
        return self.records[i]


@pytest.mark.parametrize("batched_reads", [False, True])
def test_streaming_source_gives_the_same_batches(dataset, batched_reads):
    images, labels = dataset
    in_memory = Loader(images, labels, batch_size=8, seed=4, augment=AUGMENT)
    source = _ListSource(images, labels, batched_reads)
    streaming = Loader.from_source(source, batch_size=8, seed=4, augment=AUGMENT)
    assert len(streaming) == len(in_memory)
    assert streaming.streaming and not in_memory.streaming
    assert not in_memory.with_examples(images[:16], labels[:16]).streaming
    for (x, y), (x2, y2) in zip(_epoch(in_memory, 1), _epoch(streaming, 1), strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
        assert y2.dtype == np.int32
    assert (source.reads == 0) == batched_reads
    pairs = [(i, l) for i, l in zip(images, labels, strict=True)]
    tuple_loader = Loader.from_source(pairs, batch_size=8, seed=4, augment=AUGMENT)
    np.testing.assert_array_equal(
        np.asarray(tuple_loader.batch(1, 2)[0]), np.asarray(in_memory.batch(1, 2)[0])
    )


def test_sharding_places_batches(dataset):
    images, labels = dataset
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    loader = Loader(images, labels, batch_size=8, sharding=sharding)
    x, y = loader.batch(0, 0)
    assert x.sharding == sharding and y.sharding == sharding


def _passes_on_two_devices(script: str) -> None:
    """Run ``script`` in a fresh process with two CPU devices; it must print "ok"."""
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_sharding_across_two_devices():
    """In a process with 2 CPU devices, each holds half of every batch, values unchanged."""
    script = textwrap.dedent(
        """
        import functools
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        from jcnn.data import Loader, augment as A
        assert len(jax.devices()) == 2
        images = np.random.default_rng(0).integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
        labels = np.arange(40, dtype=np.int32)
        sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
        aug = functools.partial(A.random_crop, padding=1)
        plain = Loader(images, labels, batch_size=8, seed=2, augment=aug)
        sharded = Loader(images, labels, batch_size=8, seed=2, augment=aug, sharding=sharding)
        x, y = sharded.batch(1, 3)
        assert [s.data.shape for s in x.addressable_shards] == [(4, 6, 6, 3)] * 2
        assert {s.device for s in y.addressable_shards} == set(jax.devices())
        x0, y0 = plain.batch(1, 3)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(x0))
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
        print("ok")
        """
    )
    _passes_on_two_devices(script)


def test_sharded_batch_augmentations_match_within_the_documented_step():
    """The docstring's promise for mixup/cutmix under a NamedSharding: the labels and cutmix are
    identical, mixup's blended images within one float32 step (28x28x1 batches of 10 differed)."""
    script = textwrap.dedent(
        """
        import functools
        import jax, numpy as np
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        from jcnn.data import Loader, augment as A
        images = np.random.default_rng(0).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8)
        labels = np.arange(40, dtype=np.int32) % 10
        sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
        for op, maxulp in ((A.mixup, 1), (A.cutmix, 0)):
            kw = dict(batch_size=10, seed=5, batch_augment=functools.partial(op, num_classes=10))
            plain = Loader(images, labels, **kw)
            sharded = Loader(images, labels, sharding=sharding, **kw)
            for step in range(4):
                (x, y), (x0, y0) = sharded.batch(0, step), plain.batch(0, step)
                np.testing.assert_array_max_ulp(np.asarray(x), np.asarray(x0), maxulp=maxulp)
                np.testing.assert_array_equal(np.asarray(y), np.asarray(y0))
        print("ok")
        """
    )
    _passes_on_two_devices(script)


def test_sharding_that_does_not_divide_the_batches_is_refused_up_front():
    """With 2 devices, an odd batch (or kept odd last batch), or a sharding of other axes than
    the batch's, is a clear error at construction."""
    script = textwrap.dedent(
        """
        import jax, numpy as np, pytest
        from jax.sharding import Mesh, NamedSharding, PartitionSpec
        from jcnn.data import Loader
        assert len(jax.devices()) == 2
        images = np.zeros((49, 4, 4, 1), np.uint8)
        labels = np.arange(49, dtype=np.int32)
        sharding = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec("data"))
        with pytest.raises(ValueError, match="batch_size: expected a multiple of 2 .* got 7"):
            Loader(images, labels, batch_size=7, sharding=sharding)
        with pytest.raises(ValueError, match="drop_remainder: the last batch of 1 examples"):
            Loader(images, labels, batch_size=8, sharding=sharding, drop_remainder=False)
        with pytest.raises(ValueError, match="batch_size: expected a multiple of 2"):
            Loader.from_source(list(zip(images, labels)), batch_size=7, sharding=sharding)
        # every batch divides: each epoch is complete, the last batch (of 2) included
        loader = Loader(images[:42], labels[:42], batch_size=8, sharding=sharding,
                        drop_remainder=False)
        seen = np.concatenate([np.asarray(y) for _, y in loader.epoch(0)])
        assert sorted(seen.tolist()) == list(range(42))
        assert len(Loader(images, labels, batch_size=8, sharding=sharding)) == 6
        replicated = NamedSharding(Mesh(np.array(jax.devices()), ("data",)), PartitionSpec())
        assert len(Loader(images, labels, batch_size=7, sharding=replicated)) == 7
        mesh = Mesh(np.array(jax.devices()), ("data",))
        for spec in (PartitionSpec("data", None, None, None), PartitionSpec(None, "data")):
            with pytest.raises(ValueError, match="sharding: expected a sharding of the batch axis"):
                Loader(images, labels, batch_size=8, sharding=NamedSharding(mesh, spec))
        print("ok")
        """
    )
    _passes_on_two_devices(script)


def test_argument_checks(dataset):
    images, labels = dataset
    with pytest.raises(ValueError, match="batch_size: expected 1..50"):
        Loader(images, labels, batch_size=51)
    with pytest.raises(TypeError, match="batch_size"):
        Loader(images, labels, batch_size=2.0)
    with pytest.raises(ValueError, match="labels: expected 50 labels"):
        Loader(images, labels[:-1], batch_size=5)
    with pytest.raises(TypeError, match="augment"):
        Loader(images, labels, batch_size=5, augment="flip")
    loader = Loader(images, labels, batch_size=5)
    with pytest.raises(ValueError, match=r"step: expected an int in \[0, 9\], got 10"):
        loader.batch(0, 10)
    with pytest.raises(TypeError, match="step: expected an int in"):
        loader.batch(0, 1.0)
    with pytest.raises(ValueError, match="start_step"):
        loader.epoch(0, start_step=11)
    with pytest.raises(TypeError, match="shuffle: expected a Python bool, got 'no'"):
        Loader(images, labels, batch_size=5, shuffle="no")
    with pytest.raises(TypeError, match="seed: expected an int, got 1.5"):
        Loader(images, labels, batch_size=5, seed=1.5)
    with pytest.raises(TypeError, match="sharding: expected a jax.sharding.Sharding"):
        Loader(images, labels, batch_size=5, sharding="data")
    assert Loader(images, labels, batch_size=np.int64(5), seed=np.int32(3)).batch_size == 5
    with pytest.raises(TypeError, match="source"):
        Loader.from_source(3, batch_size=2)
    with pytest.raises(ValueError, match=r"labels: expected an array with one row per example"):
        Loader(images, np.int32(3), batch_size=5)
    with pytest.raises(ValueError, match=r"images: expected an array with one row per example"):
        Loader(np.float32(3), labels, batch_size=5)
    with pytest.raises(
        TypeError, match=r"augment: expected a function of \(key, image\), got hflip"
    ):
        Loader(images, labels, batch_size=5, augment=A.hflip)  # takes the image alone
    with pytest.raises(
        TypeError, match=r"batch_augment: expected a function of \(key, images, lab"
    ):
        Loader(images, labels, batch_size=5, batch_augment=lambda key, images: images)
    with pytest.raises(ValueError, match=r"images: expected at least one value per example, got"):
        Loader(np.zeros((len(labels), 0, 4, 1), np.float32), labels, batch_size=5)
    with pytest.raises(ValueError, match=r"labels: expected at least one value per example, got"):
        Loader(images, np.zeros((len(images), 0), np.float32), batch_size=5)
    with pytest.raises(ValueError, match=r"epoch: expected an int in \[0, 2147483647\]"):
        loader.batch(2**31, 0)
    with pytest.raises(ValueError, match=r"epoch: expected an int in \[0, 2147483647\]"):
        loader.epoch(2**31)
    assert loader.batch(2**31 - 1, 0)[0].shape == (5, SIZE, SIZE, 1)
    # strings, objects or complex values failed at the first batch inside JAX
    for bad_images, bad_labels, name, dtype in (
        (images, labels.astype(str), "labels", "<U"),
        (images.astype(object), labels, "images", "object"),
        (images.astype(np.complex64), labels, "images", "complex64"),
        (images.astype(bool), labels, "images", "bool"),
    ):
        message = f"^{name}: expected integer or floating values, got dtype {dtype}"
        with pytest.raises(TypeError, match=message):
            Loader(bad_images, bad_labels, batch_size=5)
    binary = Loader(images, labels % 2 == 0, batch_size=5)  # bool labels for a custom loss
    assert binary.batch(0, 0)[1].dtype == np.bool_


def test_with_examples_keeps_every_setting(dataset):
    images, labels = dataset
    loader = Loader(images, labels, batch_size=8, seed=4, augment=AUGMENT, drop_remainder=False)
    held, held_labels = loader.examples
    np.testing.assert_array_equal(np.asarray(held), images)
    np.testing.assert_array_equal(np.asarray(held_labels), labels)
    part = loader.with_examples(images[:20], labels[:20])
    fresh = Loader(
        images[:20], labels[:20], batch_size=8, seed=4, augment=AUGMENT, drop_remainder=False
    )
    assert len(part) == len(fresh) == 3
    for (x, y), (x2, y2) in zip(_epoch(part, 2), _epoch(fresh, 2), strict=True):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    with pytest.raises(ValueError, match="batch_size: expected 1..5"):
        loader.with_examples(images[:5], labels[:5])
    for augment in (None, lambda key, image: image * 2):
        other = loader.with_examples(images[:20], labels[:20], augment=augment)
        assert other.augment is augment and other.seed == 4 and len(other) == 3
    streaming = Loader.from_source(list(zip(images, labels, strict=True)), batch_size=8)
    with pytest.raises(TypeError, match="examples: a streaming loader"):
        _ = streaming.examples


def test_poisson_sampling_draws_each_example_independently(dataset):
    images, labels = dataset
    loader = Loader(images, labels, batch_size=10, sampling="poisson", seed=3, augment=AUGMENT)
    assert len(loader) == N // 10 and loader.sampling_rate == 10 / N
    counts = np.zeros(N)
    sizes = []
    for epoch in range(40):
        batches = _epoch(loader, epoch)
        assert len(batches) == len(loader)
        for step, (_, y) in enumerate(batches):
            # the documented key derivation, and the batch is exactly those examples
            key = jax.random.fold_in(
                jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 2), epoch), step
            )
            members = np.flatnonzero(np.asarray(jax.random.bernoulli(key, 0.2, (N,))))
            np.testing.assert_array_equal(y, members)
            np.testing.assert_array_equal(loader.poisson_indices(epoch, step), members)
            counts[y] += 1
            sizes.append(len(y))
    assert len(set(sizes)) > 5  # random sizes, not a fixed batch
    # 200 batches at q = 0.2: each example's count ~ Binomial(200, 0.2) (mean 40, sd 5.7)
    assert abs(np.mean(sizes) - 10) < 1.0 and counts.min() > 15 and counts.max() < 65
    # reproducible from (seed, epoch, step), augmentations included
    again = Loader(images, labels, batch_size=10, sampling="poisson", seed=3, augment=AUGMENT)
    x1, y1 = loader.batch(7, 2)
    x2, y2 = again.batch(7, 2)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("streaming", [False, True])
def test_poisson_batches_of_many_sizes_compile_few_programs_with_the_documented_keys(
    dataset, streaming
):
    # each size compiled the augmentation again (~1.5 s a size for a CIFAR-10 crop and flip,
    # about a hundred sizes in a batch-256 epoch); the example keys must stay split(key, n)
    images, labels = dataset
    traces = []

    def augment(key, image):
        traces.append(image.shape)
        return AUGMENT(key, image)

    settings = dict(batch_size=10, sampling="poisson", seed=5, augment=augment)
    if streaming:
        loader = Loader.from_source(_ListSource(images, labels, True), **settings)
    else:
        loader = Loader(images, labels, **settings)
    sizes = set()
    for epoch in range(3):
        for step, (x, y) in enumerate(_epoch(loader, epoch)):
            sizes.add(len(y))
            step_key = jax.random.fold_in(
                jax.random.fold_in(jax.random.fold_in(jax.random.key(5), 1), epoch), step
            )
            keys = jax.random.split(jax.random.fold_in(step_key, 0), len(y))
            expected = jax.vmap(AUGMENT)(keys, jnp.asarray(images[y]))
            np.testing.assert_array_equal(x, expected)
    assert len(sizes) >= 5 and len(traces) <= 2, (sorted(sizes), len(traces))


@pytest.mark.parametrize("batched_reads", [False, True])
def test_poisson_empty_batches_stream_like_in_memory(dataset, batched_reads):
    """At a low rate some Poisson batches are empty; a streaming loader yields them too."""
    # 16 of the examples: each new batch size compiles the loader's batch function again, and
    # these (seed 0, 2 epochs) draw sizes 0, 1 and 2 only (all 50 drew 0 to 4), 11 of 32 empty
    images, labels = (array[:16] for array in dataset)
    settings = dict(
        batch_size=1,
        sampling="poisson",
        seed=0,
        augment=AUGMENT,
        alternating_flip=True,
        batch_augment=functools.partial(A.mixup, alpha=1.0, num_classes=N),
    )
    in_memory = Loader(images, labels, **settings)
    streaming = Loader.from_source(_ListSource(images, labels, batched_reads), **settings)
    sizes = []
    for epoch in range(2):
        for (x, y), (x2, y2) in zip(
            _epoch(in_memory, epoch), _epoch(streaming, epoch), strict=True
        ):
            np.testing.assert_array_equal(x, x2)
            np.testing.assert_array_equal(y, y2)
            sizes.append(len(y2))
            assert x2.shape[1:] == (SIZE, SIZE, 1) and y2.shape[1:] == (N,)
    assert 0 in sizes and max(sizes) > 1


def test_poisson_sampling_argument_checks(dataset):
    images, labels = dataset
    with pytest.raises(ValueError, match="sampling"):
        Loader(images, labels, batch_size=10, sampling="uniform")
    for bad in (None, 1, True, ["poisson"]):  # a wrong type, not a wrong value (a ValueError)
        with pytest.raises(TypeError, match="sampling: expected one of 'shuffle', 'poisson'"):
            Loader(images, labels, batch_size=10, sampling=bad)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    with pytest.raises(ValueError, match="sharding"):
        Loader(images, labels, batch_size=10, sampling="poisson", sharding=sharding)


def _flipped(loader, epoch, images):
    """{label: mirrored?} over an epoch, read from the pixels (labels are the example indices)."""
    seen = {}
    for x, y in _epoch(loader, epoch):
        for image, label in zip(x, y, strict=True):
            original = images[label]
            mirrored = np.array_equal(image, original[:, ::-1])
            assert mirrored or np.array_equal(image, original)
            seen[int(label)] = mirrored
    return seen


@pytest.mark.parametrize("sampling", ["shuffle", "poisson"])
def test_alternating_flip_mirrors_each_example_in_every_other_epoch(rng, sampling):
    n = 400
    images = rng.integers(0, 256, (n, 5, 7, 2), dtype=np.uint8)  # no image is its own mirror
    labels = np.arange(n, dtype=np.int32)
    loader = Loader(
        images,
        labels,
        batch_size=32,
        seed=3,
        alternating_flip=True,
        sampling=sampling,
        drop_remainder=False,
    )
    epochs = [_flipped(loader, e, images) for e in range(4)]
    for e in range(3):
        common = set(epochs[e]) & set(epochs[e + 1])
        assert common and all(epochs[e][i] != epochs[e + 1][i] for i in common)
    for e in range(2):
        common = set(epochs[e]) & set(epochs[e + 2])
        assert all(epochs[e][i] == epochs[e + 2][i] for i in common)
    share = np.mean(list(epochs[0].values()))
    assert 0.4 < share < 0.6  # a random half, not a fixed pattern
    other = _flipped(
        Loader(
            images,
            labels,
            batch_size=32,
            seed=4,
            alternating_flip=True,
            sampling=sampling,
            drop_remainder=False,
        ),
        0,
        images,
    )
    common = set(other) & set(epochs[0])
    assert any(other[i] != epochs[0][i] for i in common)  # the half depends on the seed
    # documented derivation
    root = jax.random.fold_in(jax.random.key(3), 3)
    for i in list(epochs[1])[:20]:
        first = bool(jax.random.bernoulli(jax.random.fold_in(root, i)))
        assert epochs[1][i] == (not first)


def test_alternating_flip_comes_before_augment_and_is_exact_on_every_path(dataset):
    images, labels = dataset
    settings = dict(batch_size=8, seed=5, augment=AUGMENT, alternating_flip=True)
    loader = Loader(images, labels, **settings)
    streaming = Loader.from_source(list(zip(images, labels, strict=True)), **settings)
    for epoch in (0, 1):
        for step, (x, _) in enumerate(_epoch(loader, epoch)):
            np.testing.assert_array_equal(x, np.asarray(loader.batch(epoch, step)[0]))
            np.testing.assert_array_equal(x, np.asarray(streaming.batch(epoch, step)[0]))
    # without augment: the flip alone; with it, the augment sees the flipped image
    plain = Loader(images, labels, batch_size=8, seed=5, alternating_flip=True)
    x, y = (np.asarray(a) for a in plain.batch(1, 0))
    step_key = jax.random.fold_in(
        jax.random.fold_in(jax.random.fold_in(jax.random.key(5), 1), 1), 0
    )
    keys = jax.random.split(jax.random.fold_in(step_key, 0), 8)
    want = jax.vmap(AUGMENT)(keys, jnp.asarray(x))
    np.testing.assert_array_equal(np.asarray(loader.batch(1, 0)[0]), np.asarray(want))
    part = loader.with_examples(images[:20], labels[:20])
    assert part.alternating_flip


def test_alternating_flip_argument_checks(dataset):
    images, labels = dataset
    with pytest.raises(TypeError, match="alternating_flip"):
        Loader(images, labels, batch_size=8, alternating_flip="yes")
    with pytest.raises(ValueError, match=r"alternating_flip: expected images \(N, H, W, C\)"):
        Loader(images[..., 0], labels, batch_size=8, alternating_flip=True)


@pytest.mark.parametrize(
    ("epoch", "error"), [(-1, ValueError), (1.5, TypeError), (True, TypeError)]
)
def test_order_checks_the_epoch_like_epoch_and_batch(epoch, error):
    # order(-1) used to raise NumPy's OverflowError "out of bounds for uint32"
    loader = Loader(np.zeros((8, 2, 2, 1), np.uint8), np.arange(8), batch_size=4)
    with pytest.raises(error, match="epoch: expected an int"):
        loader.order(epoch)
    assert loader.order(np.int64(1)).tolist() == loader.order(1).tolist()


@pytest.mark.parametrize(
    ("epoch", "step", "error", "message"),
    [
        (-1, 0, ValueError, r"epoch: expected an int in \[0, 2147483647\], got -1"),
        (0.5, 0, TypeError, "epoch: expected an int"),
        (0, 5, ValueError, r"step: expected an int in \[0, 4\], got 5"),
        (0, -1, ValueError, "step: expected an int"),
        (0, 1.0, TypeError, "step: expected an int"),
    ],
)
def test_poisson_indices_checks_epoch_and_step_like_batch(dataset, epoch, step, error, message):
    # poisson_indices(-1, 0) was NumPy's OverflowError; a fractional epoch or a step past the
    # epoch's batches silently gave a batch that no epoch yields
    images, labels = dataset
    loader = Loader(images, labels, batch_size=10, sampling="poisson")
    with pytest.raises(error, match=message):
        loader.poisson_indices(epoch, step)
    assert loader.poisson_indices(np.int64(2), 4).tolist() == loader.poisson_indices(2, 4).tolist()


@pytest.mark.parametrize("seed", [2**63, -(2**63) - 1, 2**70])
def test_a_seed_past_64_bits_is_named(dataset, seed):
    # it raised jax.random.key's bare OverflowError ('Python int too large to convert to C long')
    images, labels = dataset
    with pytest.raises(ValueError, match=r"seed: expected an int in \[-2\*\*63, 2\*\*63 - 1\]"):
        Loader(images, labels, batch_size=10, seed=seed)
    with pytest.raises(ValueError, match="seed: expected an int in"):
        Loader.from_source(list(zip(images, labels, strict=True)), batch_size=10, seed=seed)


def test_the_extreme_64_bit_seeds_work(dataset):
    images, labels = dataset
    for seed in (2**63 - 1, -(2**63)):
        loader = Loader(images, labels, batch_size=10, seed=seed, augment=AUGMENT)
        assert sorted(loader.order(0).tolist()) == list(range(N))
        assert loader.batch(1, 2)[0].shape == (10, SIZE, SIZE, 1)


@pytest.mark.parametrize(
    ("records", "kw", "error", "message"),
    [
        (
            lambda x, y: [{"img": a, "label": b} for a, b in zip(x, y, strict=True)],
            {},
            ValueError,
            r"source: record \d+ has no 'image' \(its keys: 'img', 'label'\); name them with "
            "image_key=",
        ),
        (
            lambda x, y: [{"image": a, "label": b} for a, b in zip(x, y, strict=True)],
            {"label_key": "y"},
            ValueError,
            r"source: record \d+ has no 'y'",
        ),
        (
            lambda x, y: list(x),
            {},
            TypeError,
            r"source: expected records that are mappings with 'image' and 'label' or \(image, "
            r"label\) pairs, got ndarray for record \d+",
        ),
        (
            lambda x, y: [(a, b, b) for a, b in zip(x, y, strict=True)],
            {},
            TypeError,
            r"got a 3-tuple for record \d+",
        ),
    ],
)
def test_streaming_records_of_another_form_are_named(dataset, records, kw, error, message):
    # these ended in a bare KeyError 'image' or "too many values to unpack (expected 2)"
    images, labels = dataset
    loader = Loader.from_source(records(images, labels), batch_size=10, **kw)
    with pytest.raises(error, match=message):
        loader.batch(0, 0)


@pytest.mark.parametrize("name", ["image_key", "label_key"])
def test_an_unhashable_record_key_is_named(dataset, name):
    # a list failed at the first batch with a bare "unhashable type: 'list'"
    images, labels = dataset
    records = [{"image": a, "label": b} for a, b in zip(images, labels, strict=True)]
    with pytest.raises(
        TypeError, match=rf"^{name}: expected a record key such as 'image', got list"
    ):
        Loader.from_source(records, batch_size=10, **{name: ["image"]})


@pytest.mark.parametrize("drop_remainder", [True, False])
def test_a_batch_larger_than_the_dataset_is_refused(dataset, drop_remainder):
    # the docstring's contract, in memory and streaming: never an epoch of no batch
    images, labels = dataset
    message = r"^batch_size: expected 1\.\.5 \(the number of examples\), got 8$"
    with pytest.raises(ValueError, match=message):
        Loader(images[:5], labels[:5], batch_size=8, drop_remainder=drop_remainder)
    records = list(zip(images[:5], labels[:5], strict=True))
    with pytest.raises(ValueError, match=message):
        Loader.from_source(records, batch_size=8, drop_remainder=drop_remainder)


def test_an_empty_dataset_is_named(dataset):
    # both said "batch_size: expected 1..0 (the number of examples)", whatever the batch size
    images, labels = dataset
    with pytest.raises(
        ValueError, match=r"^images: expected at least one example, got shape \(0, 6"
    ):
        Loader(images[:0], labels[:0], batch_size=1)
    with pytest.raises(ValueError, match="^source: expected at least one record, got an empty"):
        Loader.from_source([], batch_size=1)
    # a dataset's name has a len() and [i] too: its characters are no records
    with pytest.raises(TypeError, match=r"^source: expected a random-access source of records"):
        Loader.from_source("imagenet2012", batch_size=2)


@pytest.mark.parametrize(
    "records, error, message",
    [
        (
            [(np.zeros((3, 3, 1), np.uint8), 0), (np.zeros((4, 3, 1), np.uint8), 1)],
            ValueError,
            r"^source: expected every record's image to have the shape of record 0's \(3, 3, 1\), "
            r"got \(4, 3, 1\) for record 1",
        ),
        (
            [(np.zeros((3, 3, 1), np.uint8), 0), (np.zeros((3, 3, 1), np.uint8), [1, 2])],
            ValueError,
            r"^source: expected every record's label to have the shape of record 0's \(\), got "
            r"\(2,\) for record 1",
        ),
        (
            [(np.zeros((3, 3, 1), np.uint8), "cat"), (np.zeros((3, 3, 1), np.uint8), "dog")],
            TypeError,
            r"^source: expected a numeric label, got dtype <U3 for record 0",
        ),
    ],
)
def test_streaming_records_of_mismatched_shape_or_dtype_are_named(records, error, message):
    # these ended in numpy's "all input arrays must have the same shape" or JAX's "Dtype <U3 is
    # not a valid JAX array type", naming neither the source nor the record
    loader = Loader.from_source(records, batch_size=2, shuffle=False)
    with pytest.raises(error, match=message):
        loader.batch(0, 0)


def test_seeds_apart_by_2_to_the_32_draw_apart(dataset):
    # jax.random.key keeps a seed's low 32 bits: seed 2**32 + 5 drew seed 5's order and flips
    images, labels = dataset
    for seed, other in ((5, 2**32 + 5), (2**32 - 1, -1), (0, 2**63 - 1 - (2**32 - 1))):
        a = Loader(images, labels, batch_size=10, seed=seed, augment=AUGMENT)
        b = Loader(images, labels, batch_size=10, seed=other, augment=AUGMENT)
        assert a.order(0).tolist() != b.order(0).tolist()
        assert not np.array_equal(a.batch(0, 0)[0], b.batch(0, 0)[0])


@pytest.mark.parametrize("drop", [1, -1])
def test_a_source_whose_getitems_returns_too_few_or_many_records_is_named(dataset, drop):
    # a raw "zip() argument 2 is longer than argument 1" from inside the loader
    images, labels = dataset
    source = _ListSource(images, labels, batched_reads=True)
    records = source.__getitems__
    if drop == 1:
        source.__getitems__ = lambda idx: records(idx)[:-1]
    else:
        source.__getitems__ = lambda idx: records(idx) + records(idx[:1])
    loader = Loader.from_source(source, batch_size=8)
    with pytest.raises(
        ValueError,
        match=r"source: expected __getitems__ to return one record "
        r"per index, got (7|9) records for 8 indices",
    ):
        loader.batch(0, 0)
