"""Tests of jcnn.data.Standardize against NumPy float64 statistics."""

import jax
import numpy as np
import pytest

from jcnn.data import Standardize


@pytest.fixture
def splits(rng):
    """Train/test uint8 images whose channels have different means and spreads."""

    def make(n):
        base = rng.normal([60, 128, 200], [10, 30, 20], (n, 5, 4, 3))
        return np.clip(base, 0, 255).astype(np.uint8)

    return make(300), make(40)


def test_per_channel_fit_on_train_applied_unchanged_to_test(splits):
    train, test = splits
    stats = Standardize.fit(train)
    mean = train.astype(np.float64).mean((0, 1, 2))
    std = train.astype(np.float64).std((0, 1, 2))
    np.testing.assert_allclose(stats.mean, mean, rtol=1e-6)
    np.testing.assert_allclose(stats.scale, std, rtol=1e-6)
    out_train = np.asarray(stats(train), np.float64)
    np.testing.assert_allclose(out_train.mean((0, 1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(out_train.std((0, 1, 2)), 1, atol=1e-5)
    out_test = np.asarray(stats(test))
    assert out_test.dtype == np.float32 and out_test.shape == test.shape
    np.testing.assert_allclose(out_test, (test - mean) / std, rtol=1e-5, atol=1e-5)
    # one image, and inside jit with the statistics as a pytree argument
    np.testing.assert_allclose(stats(test[0]), out_test[0], rtol=1e-6)
    np.testing.assert_allclose(jax.jit(lambda s, x: s(x))(stats, test), out_test, rtol=1e-6)
    # and jitted itself, as a function of the images (or as an augmentation op)
    np.testing.assert_allclose(jax.jit(stats)(test), out_test, rtol=1e-6)
    np.testing.assert_allclose(jax.jit(stats)(jax.random.key(0), test[0]), out_test[0], rtol=1e-6)


def test_centering_modes(splits):
    train, test = splits
    center = Standardize.fit(train, mode="center")
    np.testing.assert_allclose(
        center(test), test - train.astype(np.float64).mean((0, 1, 2)), atol=1e-4
    )
    mean_image = Standardize.fit(train, mode="mean_image")
    assert mean_image.mean.shape == (5, 4, 3)
    np.testing.assert_allclose(mean_image(test), test - train.astype(np.float64).mean(0), atol=1e-4)


def test_whitening(rng):
    mixing = rng.normal(size=(16, 16))
    train = (rng.normal(size=(2000, 16)) @ mixing + 5).reshape(2000, 2, 4, 2).astype(np.float32)
    zca = Standardize.fit(train, mode="zca", eps=1e-8)
    white = np.asarray(zca(train), np.float64).reshape(2000, 16)
    assert zca(train).shape == train.shape
    np.testing.assert_allclose(np.cov(white, rowvar=False, bias=True), np.eye(16), atol=1e-3)
    np.testing.assert_allclose(zca.projection, zca.projection.T, atol=1e-4)  # ZCA is symmetric
    pca = Standardize.fit(train, mode="pca", eps=1e-8)
    features = np.asarray(pca(train), np.float64)
    assert features.shape == (2000, 16)
    np.testing.assert_allclose(np.cov(features, rowvar=False, bias=True), np.eye(16), atol=1e-3)
    # ZCA is the whitening closest to the input: closer than the PCA one
    centered = train.reshape(2000, 16) - train.reshape(2000, 16).mean(0)
    assert np.linalg.norm(white - centered) < np.linalg.norm(features - centered)
    top = Standardize.fit(train, mode="pca", num_components=3)
    assert top(train[:7]).shape == (7, 3)
    flat = centered.astype(np.float64)
    top_direction = np.linalg.eigh(np.cov(flat, rowvar=False, bias=True))[1][:, -1]
    assert (
        abs(
            abs(
                np.asarray(top.projection[:, 0])
                / np.linalg.norm(top.projection[:, 0])
                @ top_direction
            )
            - 1
        )
        < 1e-3
    )


def test_cifar10_channel_statistics(loaded):
    images, _ = loaded("cifar10", "train")
    stats = Standardize.fit(images)
    # the widely quoted CIFAR-10 training statistics, in [0, 1] units
    np.testing.assert_allclose(np.asarray(stats.mean) / 255, [0.4914, 0.4822, 0.4465], atol=1e-4)
    np.testing.assert_allclose(np.asarray(stats.scale) / 255, [0.2470, 0.2435, 0.2616], atol=1e-4)


def test_argument_checks(splits):
    train, _ = splits
    with pytest.raises(ValueError, match="mode: expected one of"):
        Standardize.fit(train, mode="minmax")
    with pytest.raises(ValueError, match=r"train_images: expected rank 4 \(N, H, W, C\)"):
        Standardize.fit(train[0])
    # a list is the wrong type, as it is for stats(images): not a wrong rank
    with pytest.raises(TypeError, match=r"train_images: expected an array \(N, H, W, C\), got"):
        Standardize.fit(train.tolist())
    constant = np.zeros((4, 2, 2, 2), np.uint8)
    with pytest.raises(ValueError, match=r"channel\(s\) \[0, 1\] are constant"):
        Standardize.fit(constant)
    with pytest.raises(ValueError, match="num_components"):
        Standardize.fit(train, mode="zca", num_components=3)
    stats = Standardize.fit(train, mode="mean_image")
    with pytest.raises(ValueError, match="images: expected shape"):
        stats(np.zeros((2, 4, 5, 3), np.float32))


def test_standardize_as_the_last_op_of_an_augmentation_pipeline(rng):
    from jcnn import data
    from jcnn.data import augment as A

    images = rng.integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    stats = data.Standardize.fit(images)
    key = jax.random.key(3)
    pipeline = A.compose(lambda _, x: A.hflip(x), stats)
    expected = (np.asarray(A.hflip(images[2]), np.float64) - np.asarray(stats.mean)) / np.asarray(
        stats.scale
    )
    np.testing.assert_allclose(pipeline(key, images[2]), expected, rtol=1e-5, atol=1e-5)
    loader = data.Loader(images, np.arange(7, dtype=np.int32), batch_size=3, augment=stats)
    batch, labels = loader.batch(0, 0)
    np.testing.assert_allclose(batch, stats(images[np.asarray(labels)]), rtol=1e-6, atol=1e-6)
    with pytest.raises(TypeError, match="Standardize"):
        stats(key, images, images)


def test_two_arrays_are_not_read_as_a_key_and_an_image(rng):
    """``stats(train, test)`` used to drop ``train`` silently as an unused key."""
    from jcnn import data

    images = rng.integers(0, 256, (4, 5, 6, 3), dtype=np.uint8)
    stats = data.Standardize.fit(images)
    for first in (images, images.astype(np.float32), 3, "key"):
        with pytest.raises(TypeError, match=r"key: expected a jax.random key.*Standardize takes"):
            stats(first, images)
    # keys of both kinds, alone or batched beside a batch, are still accepted
    for key in (jax.random.key(0), jax.random.PRNGKey(0), jax.random.split(jax.random.key(0), 4)):
        np.testing.assert_array_equal(stats(key, images), stats(images))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("mode", ["per_channel", "center", "mean_image", "pca", "zca"])
def test_non_finite_training_data_is_refused(mode, bad):
    images = np.random.default_rng(0).normal(size=(6, 2, 2, 3)).astype(np.float32)
    images[4, 1, 0, 2] = bad
    with pytest.raises(
        ValueError,
        match=r"train_images: expected finite values, got 1 NaN or "
        r"infinite value\(s\) \(first in image 4\)",
    ):
        Standardize.fit(images, mode=mode)


@pytest.mark.parametrize("mode", ["per_channel", "center", "mean_image", "pca", "zca"])
def test_float64_data_beyond_float32_is_refused_naming_train_images(mode):
    # 1e300 fitted in float64 gave an infinite float32 mean, refused as "mean: expected finite
    # values" (an argument never passed), or eigh's "Eigenvalues did not converge" for zca
    images = np.random.default_rng(0).normal(size=(6, 2, 2, 3))
    images[3, 0, 1, 1] = -1e300
    with pytest.raises(ValueError, match=r"^train_images: expected values within float32's range"):
        Standardize.fit(images, mode=mode)
    images[3, 0, 1, 1] = -3e38  # the largest float32 values fit
    assert np.isfinite(np.asarray(Standardize.fit(images, mode=mode).mean)).all()


@pytest.mark.parametrize("mode", ["pca", "zca"])
def test_whitening_without_eps_of_rank_deficient_data_is_refused(rng, mode):
    few = rng.normal(size=(5, 2, 3, 2))  # 5 images: rank 4 of 12 dimensions
    with pytest.raises(ValueError, match=r"eps: expected > 0 .* 8 of the 12 whitened components"):
        Standardize.fit(few, mode=mode, eps=0)
    assert np.isfinite(np.asarray(Standardize.fit(few, mode=mode)(few))).all()  # default eps
    top = Standardize.fit(few, mode="pca", eps=0, num_components=4)  # the components with variance
    features = np.asarray(top(few), np.float64)
    np.testing.assert_allclose(np.cov(features, rowvar=False, bias=True), np.eye(4), atol=1e-4)
    many = rng.normal(size=(50, 2, 3, 2))
    assert np.isfinite(np.asarray(Standardize.fit(many, mode=mode, eps=0)(many))).all()


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"mode": None}, TypeError, "mode: expected one of"),
        ({"mode": "whiten"}, ValueError, "mode: expected one of"),
        ({"mode": "zca", "eps": float("nan")}, ValueError, "eps: expected a finite number >= 0"),
        (
            {"mode": "pca", "num_components": 1.5},
            TypeError,
            "num_components: expected a positive int",
        ),
    ],
)
def test_options_are_checked(kwargs, error, message):
    images = np.arange(4 * 2 * 2 * 3, dtype=np.uint8).reshape(4, 2, 2, 3)
    with pytest.raises(error, match=message):
        Standardize.fit(images, **kwargs)
    with pytest.raises(TypeError, match="train_images: expected an integer or floating array"):
        Standardize.fit(images.astype(bool))
    stats = Standardize.fit(images, mode="pca", num_components=np.int64(2), eps=np.float32(1e-2))
    assert stats.projection.shape == (12, 2)


_MEAN, _ONES = np.array([1.0, 2.0, 3.0], np.float32), np.ones(3, np.float32)
_IMAGE_MEAN = np.zeros((2, 2, 3), np.float32)


@pytest.mark.parametrize(
    "args, error, message",
    [
        ((_MEAN, _ONES, None, "minmax"), ValueError, "mode: expected one of"),
        ((_MEAN, _ONES, None, None), TypeError, "mode: expected one of"),
        (([1.0, 2.0, 3.0], _ONES, None, "center"), TypeError, "mean: expected a real"),
        ((_MEAN, _ONES > 0, None, "center"), TypeError, "scale: expected a real .* dtype bool"),
        ((_IMAGE_MEAN, _ONES, None, "per_channel"), ValueError, r"mean: expected shape \(C,\)"),
        ((_MEAN, _ONES, None, "mean_image"), ValueError, r"mean: expected shape \(H, W, C\)"),
        ((_MEAN, np.ones(4), None, "per_channel"), ValueError, r"scale: expected shape \(3,\)"),
        ((_MEAN, np.ones((1, 3)), None, "center"), ValueError, r"scale: expected shape \(3,\)"),
        ((_MEAN, _ONES, np.eye(3), "center"), ValueError, "projection: expected None"),
        ((_IMAGE_MEAN, _ONES, None, "zca"), ValueError, "projection: expected a .* got None"),
        (
            (_IMAGE_MEAN, _ONES, np.eye(12)[:, :0], "pca"),
            ValueError,
            r"projection: expected shape \(12, K\) .* got \(12, 0\)",
        ),
        (
            (_IMAGE_MEAN, _ONES, np.eye(11), "zca"),
            ValueError,
            r"projection: expected shape \(12, 12\) .* got \(11, 11\)",
        ),
        (
            (_IMAGE_MEAN, _ONES, np.eye(12)[:, :5], "zca"),
            ValueError,
            r"projection: expected shape \(12, 12\)",
        ),
        ((_IMAGE_MEAN, _ONES, np.eye(12)[:4], "pca"), ValueError, r"projection: expected shape"),
        ((_MEAN * np.nan, _ONES, None, "center"), ValueError, "mean: expected finite values"),
        (
            (_MEAN, np.array([1.0, np.inf, 1.0]), None, "per_channel"),
            ValueError,
            "scale: expected finite values",
        ),
        (
            (_IMAGE_MEAN, _ONES, np.full((12, 2), np.nan), "pca"),
            ValueError,
            "projection: expected finite values, got 24 NaN",
        ),
        (
            (_MEAN, np.array([1.0, 0.0, -1.0]), None, "per_channel"),
            ValueError,
            r"scale: expected values > 0 \(it divides\), got \[1.0, 0.0, -1.0\]",
        ),
        (
            (_MEAN, _ONES * 2, None, "center"),
            ValueError,
            "scale: expected ones for mode='center'",
        ),
        (
            (_IMAGE_MEAN, _ONES * 2, np.eye(12), "zca"),
            ValueError,
            "scale: expected ones for mode='zca'",
        ),
    ],
)
def test_the_constructor_checks_the_statistics(args, error, message):
    with pytest.raises(error, match=message):
        Standardize(*args)


def test_the_constructor_accepts_what_fit_makes_and_pytree_transformations_still_work(splits):
    train, test = splits
    for mode in ("per_channel", "center", "mean_image", "pca", "zca"):
        stats = Standardize.fit(train[:20, :2, :2], mode=mode)
        rebuilt = Standardize(np.asarray(stats.mean), stats.scale, stats.projection, stats.mode)
        np.testing.assert_array_equal(rebuilt(test[:3, :2, :2]), stats(test[:3, :2, :2]))
    stats = Standardize.fit(train)
    # tree_map to placeholders, stacking and vmap rebuild it without the constructor's checks
    assert jax.tree.map(lambda _: object(), stats).mode == "per_channel"
    assert jax.tree.map(lambda _: None, stats).scale is None
    stacked = jax.tree.map(lambda *x: np.stack(x), stats, stats)
    assert stacked.mean.shape == (2, 3)
    out = jax.vmap(lambda s, x: s(x), in_axes=(0, None))(stacked, test[:2])
    np.testing.assert_allclose(out[1], stats(test[:2]), rtol=1e-6)
    # built inside jit from traced statistics: shapes checked, values not
    built = jax.jit(lambda m, s, x: Standardize(m, s, None, "per_channel")(x))
    np.testing.assert_allclose(built(stats.mean, stats.scale, test), stats(test), rtol=1e-6)
    with pytest.raises(ValueError, match=r"scale: expected shape \(3,\)"):
        jax.jit(lambda m: Standardize(m, m[:2], None, "center"))(stats.mean)
    leaves = jax.tree_util.tree_leaves_with_path(stats)
    assert [jax.tree_util.keystr(path) for path, _ in leaves] == [".mean", ".scale"]


@pytest.mark.parametrize("mode", ["per_channel", "mean_image", "zca"])
def test_bfloat16_training_images_fit_like_float32(splits, mode):
    # bfloat16 (a floating dtype outside NumPy's own hierarchy) was refused as "not an integer
    # or floating array"
    import jax.numpy as jnp

    train = splits[0][:50, :2, :2].astype(np.float32)  # integers: exact in bfloat16
    got = Standardize.fit(jnp.asarray(train, jnp.bfloat16), mode=mode)
    expected = Standardize.fit(train, mode=mode)
    for name in ("mean", "scale", "projection"):
        if getattr(expected, name) is not None:
            np.testing.assert_allclose(getattr(got, name), getattr(expected, name), rtol=1e-6)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.ones((2, 5, 4, 3), bool), "got dtype bool"),
        (np.ones((2, 5, 4, 3), np.complex64), "got dtype complex64"),
        (np.full((2, 5, 4, 3), "a"), "got dtype <U1"),
    ],
)
def test_applying_to_non_real_images_is_refused_like_fitting(splits, images, message):
    # bool images were standardized as 0/1, complex ones lost their imaginary part with a
    # warning, and strings ended in JAX's "Error interpreting argument to stage as a JAX value"
    stats = Standardize.fit(splits[0])
    with pytest.raises(
        TypeError, match=f"images: expected an integer or floating array, {message}"
    ):
        stats(images)


@pytest.mark.parametrize("shape", [(4, 0, 2, 3), (4, 2, 0, 3), (4, 2, 2, 0)])
def test_fitting_images_of_zero_size_is_refused(shape):
    # an empty H or W gave NaN statistics refused as "mean: expected finite values", an empty C
    # NumPy's "cannot reshape array of size 0"
    with pytest.raises(ValueError, match=r"train_images: expected images of non-zero H, W and C"):
        Standardize.fit(np.zeros(shape, np.uint8))


@pytest.mark.parametrize("mode", ["per_channel", "center"])
def test_per_channel_statistics_fit_one_image(mode):
    # one image was refused ("expected at least 2 images"), though its pixels are the sample of a
    # channel's mean and std
    image = np.random.default_rng(3).normal(5.0, 3.0, (1, 7, 5, 2))
    stats = Standardize.fit(image, mode=mode)
    np.testing.assert_allclose(stats.mean, image.mean((0, 1, 2)), rtol=1e-6)
    expected = image.std((0, 1, 2)) if mode == "per_channel" else np.ones(2)
    np.testing.assert_allclose(stats.scale, expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"train_images: expected at least 1 image to fit"):
        Standardize.fit(image[:0], mode=mode)


@pytest.mark.parametrize("mode", ["mean_image", "pca", "zca"])
def test_statistics_across_images_need_two(mode):
    image = np.random.default_rng(3).normal(5.0, 3.0, (1, 3, 3, 2))
    with pytest.raises(
        ValueError, match=f"train_images: expected at least 2 images to fit mode='{mode}'"
    ):
        Standardize.fit(image, mode=mode)


@pytest.mark.parametrize("mode", ["per_channel", "center", "mean_image", "pca", "zca"])
def test_float64_images_under_x64_are_standardized_in_float64(mode):
    # float64 statistics were rounded to float32 and float64 images standardized in float32
    # (off by ~1e-7 relative) even under jax_enable_x64
    images = np.random.default_rng(0).normal(1e3, 2.0, (40, 2, 2, 2))
    flat = images.reshape(40, -1)
    with jax.enable_x64(True):
        stats = Standardize.fit(images, mode=mode, eps=1e-3)
        out = np.asarray(stats(images))
        out32 = stats(images.astype(np.float32))
    assert stats.mean.dtype == np.float64 and out.dtype == np.float64
    assert out32.dtype == np.float32
    if mode in ("per_channel", "center"):
        scale = images.std((0, 1, 2)) if mode == "per_channel" else 1.0
        expected = (images - images.mean((0, 1, 2))) / scale
    elif mode == "mean_image":
        expected = images - images.mean(0)
    else:
        values, vectors = np.linalg.eigh(np.cov(flat.T, bias=True))
        values, vectors = values[::-1], vectors[:, ::-1]
        projection = vectors / np.sqrt(values + 1e-3)
        if mode == "zca":
            projection = projection @ vectors.T
        expected = (flat - flat.mean(0)) @ projection
        expected = expected.reshape(images.shape) if mode == "zca" else expected
        if mode == "pca":  # each component up to its sign
            expected = expected * np.sign(expected[0] * out[0])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-9)


def test_a_float64_constant_channel_is_refused_though_its_mean_misses_it_by_an_ulp(rng):
    """Float64 images whose channel holds one value (0.1) that the float64 mean misses by an ulp:
    its std came out ~3e-17, not 0, and the channel was standardized to rounding error scaled
    up to +-1 instead of being refused as constant."""
    with jax.enable_x64(True):
        images = rng.normal(size=(10, 5, 5, 2))
        images[..., 1] = 0.1
        with pytest.raises(ValueError, match=r"channel\(s\) \[1\] are constant"):
            Standardize.fit(images)
        images[0, 0, 0, 1] = 0.2  # one value apart: not constant, fit as before
        assert float(Standardize.fit(images).scale[1]) > 0


@pytest.mark.parametrize("mode", ["pca", "zca"])
def test_whitening_projection_runs_at_full_float32_precision(mode):
    # the default precision lets a GPU round the matmul's inputs to TF32; CPU computes float32
    # either way, so the jaxpr is what is checked
    images = np.random.default_rng(0).random((20, 2, 2, 3)).astype(np.float32)
    stats = Standardize.fit(images, mode=mode)
    dots = [
        e for e in jax.make_jaxpr(stats)(images).jaxpr.eqns if e.primitive.name == "dot_general"
    ]
    assert dots and all(e.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2 for e in dots), [
        e.params["precision"] for e in dots
    ]
