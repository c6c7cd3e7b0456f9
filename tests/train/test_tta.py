"""Test-time augmentation (jcnn/train/tta.py) against NumPy."""

import jax.numpy as jnp
import numpy as np
import pytest

from jcnn.train.tta import flip_translate_views, translate_batch, tta_logits, with_tta


@pytest.mark.parametrize(
    "pad_mode, np_mode", [("reflect", "reflect"), ("edge", "edge"), ("zeros", "constant")]
)
def test_translate_batch_against_numpy(rng, pad_mode, np_mode):
    images = rng.standard_normal((2, 5, 7, 3)).astype(np.float32)
    for dy, dx in [(0, 0), (1, 0), (0, -2), (-1, 2), (4, -6)]:
        got = translate_batch(jnp.asarray(images), dy, dx, pad_mode=pad_mode)
        py, px = abs(dy), abs(dx)
        padded = np.pad(images, ((0, 0), (py, py), (px, px), (0, 0)), mode=np_mode)
        want = np.empty_like(images)
        for i in range(5):
            for j in range(7):
                # Output pixel (i, j) shows input pixel (i - dy, j - dx) of the padded image.
                want[:, i, j] = padded[:, i - dy + py, j - dx + px]
        np.testing.assert_array_equal(got, want)


def test_translate_batch_shifts_uint8_pixels_as_augment_does(rng):
    # raw uint8 images were refused ("expected a floating-point array"); augment's ops take them
    images = rng.integers(0, 256, (2, 5, 4, 3)).astype(np.uint8)
    got = translate_batch(jnp.asarray(images), 1, -2)
    assert got.dtype == jnp.uint8
    want = translate_batch(jnp.asarray(images, jnp.float32), 1, -2)
    np.testing.assert_array_equal(got, np.asarray(want).astype(np.uint8))
    for dtype in (np.int32, np.bool_):
        with pytest.raises(
            TypeError, match="images: expected a floating or uint8 array, got dtype"
        ):
            translate_batch(jnp.asarray(images).astype(dtype), 1, 0)


def test_flip_translate_views_and_their_mean(rng):
    images = jnp.asarray(rng.standard_normal((3, 6, 6, 2)).astype(np.float32))
    views = flip_translate_views()
    assert len(views) == 6
    weights = jnp.asarray(rng.standard_normal((6 * 6 * 2, 4)).astype(np.float32))

    def predict(x):
        return x.reshape(x.shape[0], -1) @ weights

    want = np.zeros((3, 4), np.float32)
    for mirror in (False, True):
        for dy, dx in [(0, 0), (-1, -1), (1, 1)]:
            shifted = translate_batch(images, dy, dx)
            want += np.asarray(predict(shifted[:, :, ::-1] if mirror else shifted)) / 6
    np.testing.assert_allclose(tta_logits(predict, images, views), want, rtol=1e-5, atol=1e-5)
    assert len(flip_translate_views(flip=False)) == 3
    # airbench94's weighting: half on the (mirrored) image, half on its two translations
    airbench = (2, 1, 1, 2, 1, 1)
    want = np.zeros((3, 4), np.float32)
    for index, view in enumerate(views):
        want += airbench[index] / 8 * np.asarray(predict(view(images)))
    got = tta_logits(predict, images, views, weights=airbench)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_airbench94_views_and_weights_are_airbenchs_infer_mirror_translate(rng):
    # airbench94's tta_level=2, written out in NumPy: the mirror of each translated batch. The
    # mirrored views were the shifted mirrors (translate(flip(x), dy, dx), i.e. the anti-diagonal
    # shifts of airbench's), which a predictor that is not mirror-symmetric tells apart.
    images = rng.standard_normal((3, 8, 8, 2)).astype(np.float32)
    weights = rng.standard_normal((8 * 8 * 2, 4)).astype(np.float32)

    def predict(x):
        return np.asarray(x).reshape(len(x), -1) @ weights

    def infer_mirror(x):
        return 0.5 * predict(x) + 0.5 * predict(x[:, :, ::-1])

    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    translated = [infer_mirror(padded[:, 0:8, 0:8]), infer_mirror(padded[:, 2:10, 2:10])]
    want = 0.5 * infer_mirror(images) + 0.5 * np.mean(translated, axis=0)
    got = tta_logits(predict, jnp.asarray(images), flip_translate_views(), (2, 1, 1, 2, 1, 1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bad_views_and_shifts():
    images = jnp.ones((1, 4, 4, 1))
    with pytest.raises(ValueError, match=r"views: each view must keep the shape \(1, 4, 4, 1\)"):
        tta_logits(lambda x: x, images, [lambda x: x[:, :2]])
    with pytest.raises(ValueError, match="views: expected at least one view"):
        tta_logits(lambda x: x, images, [])
    with pytest.raises(ValueError, match=r"weights: expected one per view \(2\), got 3"):
        tta_logits(lambda x: x, images, [lambda x: x] * 2, weights=(1, 1, 1))
    with pytest.raises(ValueError, match="weights: expected a finite number > 0, got 0"):
        tta_logits(lambda x: x, images, [lambda x: x] * 2, weights=(1, 0))
    with pytest.raises(ValueError, match=r"shift_x: expected an int with \|shift_x\| < 4, got 4"):
        translate_batch(images, 0, 4)
    with pytest.raises(ValueError, match="pad_mode: expected one of 'reflect', 'edge', 'zeros'"):
        translate_batch(images, 1, 1, pad_mode="wrap")
    with pytest.raises(ValueError, match="shifts: expected at least one"):
        flip_translate_views(shifts=())
    with pytest.raises(ValueError, match=r"shifts\[1\]: expected a pair of ints.*got \(1,\)"):
        flip_translate_views(shifts=((0, 0), (1,)))
    with pytest.raises(ValueError, match="pad_mode: expected one of 'reflect', 'edge', 'zeros'"):
        flip_translate_views(pad_mode="wrap")  # refused now, not at the first shifted view
    for bad in (None, 0, True, ["reflect"]):  # a wrong type, not a wrong value (a ValueError)
        with pytest.raises(TypeError, match="pad_mode: expected one of 'reflect', 'edge', 'zeros'"):
            flip_translate_views(pad_mode=bad)
        with pytest.raises(TypeError, match="pad_mode: expected one of 'reflect', 'edge', 'zeros'"):
            translate_batch(images, 1, 1, pad_mode=bad)
    with pytest.raises(TypeError, match="views: expected a sequence of functions"):
        with_tta(lambda *args, **kwargs: None, None)
    with pytest.raises(TypeError, match=r"views\[1\]: expected a function"):
        tta_logits(lambda x: x, images, [lambda x: x, "mirror"])
    shifted = np.asarray(translate_batch(images * jnp.arange(4.0).reshape(1, 4, 1, 1), 1, 0))
    np.testing.assert_array_equal(
        np.asarray(
            translate_batch(images * jnp.arange(4.0).reshape(1, 4, 1, 1), np.int64(1), np.int32(0))
        ),
        shifted,
    )
    views = flip_translate_views(shifts=[(np.int64(0), np.int64(0))])
    assert len(views) == 2


def test_with_tta_averages_in_evaluation_only(rng):
    import jax
    import optax

    from jcnn.models import AirbenchNet
    from jcnn.train import TrainState, evaluate
    from jcnn.train.tta import with_tta

    model = AirbenchNet(widths=(8, 8, 8))
    images = jnp.asarray(rng.standard_normal((5, 32, 32, 3)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, 10, 5).astype(np.int32))
    # one initialization (the state's) serves both checks: each compiles the model's init
    state = TrainState.create(model, optax.sgd(0.1), jax.random.key(0), images[:1])
    variables = state.variables()
    views = flip_translate_views()
    apply = with_tta(model.apply, views)
    forward = jax.jit(model.apply)
    want = np.mean([np.asarray(forward(variables, view(images))) for view in views], axis=0)
    np.testing.assert_allclose(jax.jit(apply)(variables, images), want, rtol=1e-5, atol=1e-6)
    in_training = {"train": True, "mutable": ["batch_stats"]}

    @jax.jit  # one program for both training-mode calls
    def in_training_both(v, x):
        return apply(v, x, **in_training)[0], model.apply(v, x, **in_training)[0]

    trained, direct = in_training_both(variables, images)
    np.testing.assert_array_equal(trained, direct)
    # evaluate() of a state with the TTA apply: accuracy of the averaged logits
    tta_state = state.replace(apply_fn=with_tta(state.apply_fn, views))
    result = evaluate(tta_state, [(images, labels)])
    assert result["accuracy"] == pytest.approx(np.mean(want.argmax(1) == np.asarray(labels)))
    with pytest.raises(ValueError, match="views: expected at least one view"):
        with_tta(model.apply, [])
    with pytest.raises(TypeError, match="apply_fn: expected"):
        with_tta(None, views)


def test_with_tta_takes_train_positionally_and_passes_captured_intermediates_through(rng):
    import jax

    from jcnn.models import FastMNISTNet

    model = FastMNISTNet(widths=(2, 4))
    images = jnp.asarray(rng.standard_normal((2, 28, 28, 1)).astype(np.float32))
    variables = model.init(jax.random.key(0), images)
    views = flip_translate_views(shifts=((0, 0), (1, -1)))
    apply = with_tta(model.apply, views)
    want = np.mean([np.asarray(model.apply(variables, view(images))) for view in views], 0)
    # model.apply(variables, x, False) is the models' own call: it raised "multiple values for
    # argument 'train'", and so did the positional True of a training call
    np.testing.assert_allclose(apply(variables, images, False), want, rtol=1e-5, atol=1e-6)
    trained, _ = apply(variables, images, True, mutable=["batch_stats"])
    direct, _ = model.apply(variables, images, True, mutable=["batch_stats"])
    np.testing.assert_array_equal(trained, direct)
    # capture_intermediates makes apply return (logits, state): it crashed on tuple.astype
    logits, captured = apply(variables, images, capture_intermediates=True)
    np.testing.assert_array_equal(logits, model.apply(variables, images))
    assert "intermediates" in captured
    with pytest.raises(TypeError, match="train: expected a Python bool, got 1"):
        apply(variables, images, 1)


def test_tta_logits_keeps_float64_predictions_in_float64(rng):
    import jax

    with jax.enable_x64(True):
        images = jnp.asarray(rng.standard_normal((2, 4, 4, 1)))
        views = flip_translate_views(shifts=((0, 0), (1, 1)))
        got = tta_logits(lambda x: x.reshape(2, -1) * (1 + 1e-12), images, views)
        # the mean was cast to float32 (1 + 1e-12 rounded away)
        assert got.dtype == jnp.float64
        want = np.mean([np.asarray(v(images)).reshape(2, -1) for v in views], 0) * (1 + 1e-12)
        np.testing.assert_allclose(got, want, rtol=1e-13)
        half = tta_logits(lambda x: x.reshape(2, -1), images.astype(jnp.bfloat16), views)
        assert half.dtype == jnp.float32


@pytest.mark.parametrize("flip", [1, 0, "yes", None])
def test_flip_must_be_a_bool(flip):
    # flip=0 used to be taken as False and flip="yes" as True
    with pytest.raises(TypeError, match="flip: expected a Python bool"):
        flip_translate_views(flip=flip)
    assert len(flip_translate_views(flip=np.bool_(True))) == 6


def test_tta_logits_checks_predict_and_views_up_front():
    images = jnp.ones((1, 4, 4, 1))
    with pytest.raises(TypeError, match="predict: expected a function images -> outputs, got 5"):
        tta_logits(5, images, [lambda x: x])
    with pytest.raises(TypeError, match="views: expected a sequence of functions images -> images"):
        tta_logits(lambda x: x, images, 5)
    # a generator of views is read once, not consumed by the checks (it averaged over nothing)
    views = (view for view in flip_translate_views(shifts=((0, 0),)))
    np.testing.assert_allclose(tta_logits(lambda x: x.mean(axis=(1, 2)), images, views), 1.0)


def test_tta_logits_names_a_predict_or_view_that_returns_no_array():
    images = jnp.ones((2, 4, 4, 1))
    views = flip_translate_views(shifts=((0, 0),))
    # both failed with a raw "'tuple' object has no attribute 'astype'" (or 'shape')
    with pytest.raises(TypeError, match=r"predict: expected it to return an array, got tuple"):
        tta_logits(lambda x: (x.mean(axis=(1, 2)), {}), images, views)
    with pytest.raises(ValueError, match=r"views: each view must keep the shape .*got list"):
        tta_logits(lambda x: x, images, [lambda x: [x]])


def test_0d_jax_shifts_are_ints_and_a_scalar_weights_is_named():
    images = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
    # jnp.int32(1) as a shift was refused as "expected an int"; a single number as weights
    # failed with a raw "'float' object is not iterable"
    np.testing.assert_array_equal(
        translate_batch(images, jnp.int32(1), np.int64(-1)), translate_batch(images, 1, -1)
    )
    views = flip_translate_views(shifts=((jnp.int32(1), 0),))
    np.testing.assert_array_equal(views[0](images), translate_batch(images, 1, 0))
    # a dict gave its keys as the weights, a set its hash order
    for weights in (2.0, jnp.float32(2.0), "12", {1.0: "mirror", 2.0: "plain"}, {1.0, 3.0}):
        with pytest.raises(
            TypeError, match=r"weights: expected one positive weight per view \(2\)"
        ):
            tta_logits(lambda x: x, images, views, weights)
        with pytest.raises(
            TypeError, match=r"weights: expected one positive weight per view \(2\)"
        ):
            with_tta(lambda variables, x, train=False: x, views, weights)


def test_weights_near_the_float_maximum_are_a_weighted_mean(rng):
    # their sum overflowed to inf and every normalized weight became 0: the logits were all zero
    images = jnp.asarray(rng.normal(size=(3, 5, 7, 2)), jnp.float32)
    views = flip_translate_views()

    def predict(x):
        return x.reshape(x.shape[0], -1)[:, :4]

    got = tta_logits(predict, images, views, (1e308, 1e308, 5e307, 5e307, 5e307, 5e307))
    pairs = zip((2, 2, 1, 1, 1, 1), views, strict=True)
    want = sum(w * np.asarray(predict(v(images))) for w, v in pairs) / 8
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mutable", [[], (), ["batch_stats"]])
def test_with_tta_passes_any_mutable_but_false_through_as_flax_returns_a_pair(rng, mutable):
    import jax

    from jcnn.models import FastMNISTNet

    model = FastMNISTNet(widths=(2, 4))
    images = jnp.asarray(rng.standard_normal((2, 28, 28, 1)).astype(np.float32))
    variables = model.init(jax.random.key(0), images)
    apply = with_tta(model.apply, flip_translate_views(shifts=((0, 0),)))
    # mutable=[] (or ()) makes Flax's apply return (logits, {}): with_tta averaged it
    # and raised "predict: expected it to return an array, got tuple"
    logits, collections = apply(variables, images, mutable=mutable)
    want, want_collections = model.apply(variables, images, mutable=mutable)
    np.testing.assert_array_equal(logits, want)
    assert jax.tree.structure(collections) == jax.tree.structure(want_collections)
    np.testing.assert_allclose(
        apply(variables, images, mutable=False),
        np.mean([model.apply(variables, x) for x in (images, images[:, :, ::-1])], 0),
        rtol=1e-5,
        atol=1e-6,
    )
