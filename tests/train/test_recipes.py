"""Training recipes (jcnn/train/recipes.py): airbench94's optimizer against its PyTorch form,
the pieces each recipe assembles, a short run, and the argument checks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import init, models
from jcnn.train import evaluate, recipes
from jcnn.train.param_groups import path_name


def _cifar_like(rng, n):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    return images, rng.integers(0, 10, n).astype(np.int32)


def _airbench_torch_reference(torch, params, grads_per_step, steps_per_epoch, total):
    """airbench94's optimization as its PyTorch code does it, written out independently: a summed
    loss (gradients x1024), SGD groups with lr and weight_decay = wd / lr, LambdaLR, the whitening
    bias trained for 3 epochs, lookahead every 5 steps and the weights set to the average at the
    end. Returns the parameters after every step."""
    batch, momentum = 1024, 0.85
    kilostep = batch * (1 + 1 / (1 - momentum))
    lr, wd = 11.5 / kilostep, 0.0153 * batch / kilostep
    lr_biases = 64 * lr
    names = sorted(params)
    tensors = {n: torch.tensor(np.asarray(params[n]), dtype=torch.float64) for n in names}
    for t in tensors.values():
        t.requires_grad_(True)
    trained = [n for n in names if n != "whiten/kernel"]
    norm_biases = [tensors[n] for n in trained if "norm" in n]
    others = [tensors[n] for n in trained if "norm" not in n]
    optimizer = torch.optim.SGD(
        [
            dict(params=norm_biases, lr=lr_biases, weight_decay=wd / lr_biases),
            dict(params=others, lr=lr, weight_decay=wd / lr),
        ],
        momentum=momentum,
        nesterov=True,
    )
    warmup = int(total * 0.23)

    def factor(step):
        if step < warmup:
            return 0.2 + 0.8 * step / warmup
        return 1.0 - 0.93 * (step - warmup) / (total - warmup)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    ema = {n: t.detach().clone() for n, t in tensors.items()}
    history = []
    for step, grads in enumerate(grads_per_step):
        epoch = step // steps_per_epoch
        for n in trained:
            frozen = n == "whiten/bias" and epoch >= 3
            tensors[n].grad = (
                None if frozen else torch.tensor(batch * grads[n], dtype=torch.float64)
            )
        optimizer.step()
        scheduler.step()
        count = step + 1
        with torch.no_grad():
            if count % 5 == 0:
                decay = 0.95**5 * (count / total) ** 3
                for n in names:
                    ema[n].lerp_(tensors[n], 1 - decay)
                    tensors[n].copy_(ema[n])
            if count >= total:
                for n in names:
                    tensors[n].copy_(ema[n])
        history.append({n: tensors[n].detach().numpy().copy() for n in names})
    return history


def _flat(tree):
    return {path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_airbench94_optimizer_is_airbenchs_pytorch_sgd(torch, rng):
    images, labels = _cifar_like(rng, 2048)
    prepared = recipes.prepare("airbench94", images, labels, seed=0, epochs=9.9)
    steps_per_epoch = len(prepared.train_loader)
    assert steps_per_epoch == 2
    total = math.ceil(9.9 * steps_per_epoch)
    assert prepared.config.max_steps == total and prepared.config.epochs == 10
    # jitted: eagerly every operation of the forward pass compiled its own program (5 s of 6.5)
    variables = jax.jit(prepared.model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    params = variables["params"]
    names = sorted(_flat(params))
    grads_per_step = [
        {
            n: rng.standard_normal(np.shape(v)).astype(np.float32) * 1e-3
            for n, v in _flat(params).items()
        }
        for _ in range(total)
    ]
    want = _airbench_torch_reference(torch, _flat(params), grads_per_step, steps_per_epoch, total)
    tx = prepared.config.optimizer
    state = tx.init(params)
    treedef = jax.tree_util.tree_structure(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return jax.tree.map(lambda p, u: p + u, params, updates), state

    for grads, expected in zip(grads_per_step, want, strict=True):
        tree = jax.tree_util.tree_unflatten(
            treedef,
            [
                jnp.asarray(grads[n])
                for n in [path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
            ],
        )
        params, state = step(params, state, tree)
        got = _flat(params)
        for n in names:
            np.testing.assert_allclose(got[n], expected[n], rtol=2e-5, atol=2e-6, err_msg=n)


def test_airbench94_assembles_its_pieces(rng):
    images, labels = _cifar_like(rng, 5200)
    prepared = recipes.prepare("airbench94", images, labels, seed=3)
    loader = prepared.train_loader
    assert loader.batch_size == 1024 and loader.alternating_flip and loader.seed == 3
    assert prepared.config.label_smoothing == 0.2 and prepared.config.seed == 3
    # airbench's requires_grad: the whitening kernel never, its bias not after 3 epochs
    assert prepared.config.no_grad == {"whiten/kernel": 0, "whiten/bias": 3}
    standardized = prepared.standardize(images)
    np.testing.assert_allclose(np.asarray(standardized).mean(axis=(0, 1, 2)), 0, atol=1e-4)
    params = jax.jit(prepared.model.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    kernel = models.whitening_kernel(standardized[:5000])
    np.testing.assert_array_equal(params["whiten"]["kernel"], kernel)
    conv = np.asarray(params["group1"]["conv1"]["kernel"])  # (3, 3, 24, 64)
    identity = np.asarray(init.dirac()(jax.random.key(0), (3, 3, 24, 24)))
    np.testing.assert_array_equal(conv[..., :24], identity)
    assert np.abs(conv[..., 24:]).max() <= 1 / math.sqrt(9 * 24)  # PyTorch's default bound
    assert len(prepared.views) == 6 and prepared.view_weights == (2, 1, 1, 2, 1, 1)
    test_loader = prepared.test_loader(images[:10], labels[:10])
    with pytest.raises(ValueError, match="^test_labels: airbench94 is built for 10 classes"):
        prepared.test_loader(images[:10], labels[:10] + 10)
    with pytest.raises(ValueError, match="^test_images: airbench94 is built for cifar10"):
        prepared.test_loader(images[:10, :16], labels[:10])
    x, _ = next(iter(test_loader.epoch(0)))
    np.testing.assert_allclose(x, standardized[:10], rtol=1e-6)


def test_mnist99_runs_end_to_end_and_learns(rng):
    n = 1024
    labels = rng.integers(0, 10, n).astype(np.int32)
    images = rng.integers(0, 40, (n, 28, 28, 1)).astype(np.uint8)
    for i, c in enumerate(labels):  # a bright square whose place is the class
        images[i, 2 + 8 * (c // 4) : 8 + 8 * (c // 4), 2 + 8 * (c % 4) : 8 + 8 * (c % 4)] += 200
    train, test = (images[:768], labels[:768]), (images[768:], labels[768:])
    result = recipes.run_recipe("mnist99", train, test, seed=1, epochs=2)
    assert result["test_accuracy"] >= 0.95
    assert result["test_accuracy_tta"] is None  # mnist99 has no test-time views
    test_loader = result["prepared"].test_loader(*test)
    assert result["test_accuracy"] == evaluate(result["state"], test_loader)["accuracy"]
    assert len(result["history"]) == 2
    again = recipes.run_recipe("mnist99", train, test, seed=1, epochs=2)
    assert again["test_accuracy"] == result["test_accuracy"]  # a pure function of the seed


@pytest.mark.parametrize(
    "call, error, says",
    [
        (lambda x, y: recipes.prepare("airbench95", x, y), ValueError, "name: expected one of"),
        (
            lambda x, y: recipes.prepare("airbench94", x[..., :1], y),
            ValueError,
            r"images: airbench94 is built for cifar10 images \(N, 32, 32, 3\), got shape",
        ),
        (
            lambda x, y: recipes.prepare("mnist99", x, y),
            ValueError,
            r"mnist99 is built for mnist images \(N, 28, 28, 1\)",
        ),
        (lambda x, y: recipes.prepare("airbench94", x, y + 5), ValueError, "built for 10 classes"),
        (lambda x, y: recipes.prepare("airbench94", x, y + 5), ValueError, "^labels: airbench94"),
        (lambda x, y: recipes.prepare("airbench94", x, y[:3]), ValueError, "expected 16 integer"),
        (lambda x, y: recipes.prepare("airbench94", x, y[:3]), ValueError, "^labels: expected 16"),
        (
            lambda x, y: recipes.prepare("airbench94", x, y, epochs=0),
            ValueError,
            "epochs: expected",
        ),
        (lambda x, y: recipes.prepare("airbench94", x, y, seed=-1), ValueError, "seed: expected"),
        (
            lambda x, y: recipes.prepare("airbench94", x, y),
            ValueError,
            "images: airbench94 trains on batches of 1024, got 16 images",
        ),
        (
            lambda x, y: recipes.run_recipe("airbench94", (x, y), (x, y), label_smoothing=0.1),
            ValueError,
            "airbench94 sets label_smoothing itself",
        ),
    ],
)
def test_bad_arguments_are_named(rng, call, error, says):
    images, labels = _cifar_like(rng, 16)
    with pytest.raises(error, match=says):
        call(images, labels)


@pytest.mark.parametrize(
    "epochs, steps_per_epoch, total", [(1.1, 50, 55), (2.2, 25, 55), (1.2, 468, 562)]
)
def test_fractional_epochs_count_their_steps_exactly(epochs, steps_per_epoch, total):
    # 1.1 * 50 is 55.00000000000001 in floating point: ceil gave 56 steps, one too many
    fields, steps = recipes._length(epochs, steps_per_epoch)
    assert steps == total and fields == {"epochs": math.ceil(epochs), "max_steps": total}


def test_a_length_is_at_least_one_step_and_fits_the_int32_step_counter(rng):
    images, labels = rng.integers(0, 256, (256, 28, 28, 1), dtype=np.uint8), np.zeros(256, int)
    # 1e-10 epochs of 2 steps rounded to 0 steps and failed inside lookahead ("final_step");
    # 1e10 epochs were accepted and failed at the first step with a raw OverflowError (int32)
    assert recipes.prepare("mnist99", images, labels, epochs=1e-10).config.max_steps == 1
    with pytest.raises(ValueError, match=r"^epochs: expected at most 2147483647 steps .* 2 steps"):
        recipes.prepare("mnist99", images, labels, epochs=1e10)


def test_prepare_takes_numbers_as_check_real_and_check_int_do(rng):
    images, labels = rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8), np.zeros(128, int)
    # inf epochs failed with a raw OverflowError from math.ceil; NumPy float32 and 0-d JAX arrays
    # were refused as not numbers; a list name failed with "unhashable type"
    with pytest.raises(ValueError, match="epochs: expected a finite number > 0, got inf"):
        recipes.prepare("mnist99", images, labels, epochs=float("inf"))
    with pytest.raises(ValueError, match="epochs: expected a finite number > 0, got nan"):
        recipes.prepare("mnist99", images, labels, epochs=float("nan"))
    with pytest.raises(TypeError, match="seed: expected an int >= 0, got '1'"):
        recipes.prepare("mnist99", images, labels, seed="1")
    with pytest.raises(TypeError, match="name: expected one of airbench94, mnist99"):
        recipes.prepare(["mnist99"], images, labels)
    want = recipes.prepare("mnist99", images, labels, seed=2, epochs=2.0)
    for seed, epochs in ((np.int64(2), np.float32(2.0)), (jnp.int32(2), jnp.float32(2.0))):
        got = recipes.prepare("mnist99", images, labels, seed=seed, epochs=epochs)
        assert got.config.seed == 2 and got.config.max_steps == want.config.max_steps
        assert got.train_loader.seed == 2


def test_recipe_images_are_checked_under_their_own_names(rng):
    images, labels = rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8), np.zeros(128, int)
    nan = images.astype(np.float32)
    nan[3, 4, 5] = np.nan
    # NaN training images were blamed on "train_images" (Standardize.fit's argument), NaN test
    # images were scored silently, bool images were refused under the name train_images, and an
    # empty test set failed as "batch_size: expected 1..0"
    with pytest.raises(ValueError, match="^images: expected finite values .* got 1 NaN"):
        recipes.prepare("mnist99", nan, labels)
    with pytest.raises(ValueError, match="^images: expected finite values"):
        recipes.prepare("mnist99", images.astype(np.float64) * 1e300, labels)
    with pytest.raises(TypeError, match="^images: expected integer or floating images, got dtype"):
        recipes.prepare("mnist99", images > 0, labels)
    # a constant channel was named train_images, with advice (mode='center') no recipe takes
    with pytest.raises(
        ValueError, match=r"^images: channel\(s\) \[0\] are constant \(std 0\), and"
    ):
        recipes.prepare("mnist99", np.zeros_like(images), labels)
    # a list of images was a ValueError saying "got shape list"
    with pytest.raises(TypeError, match=r"^images: mnist99 expected an array of mnist images"):
        recipes.prepare("mnist99", images.tolist(), labels)
    prepared = recipes.prepare("mnist99", images, labels)
    with pytest.raises(ValueError, match="^test_images: expected finite values .* got 1 NaN"):
        prepared.test_loader(nan, labels)
    with pytest.raises(ValueError, match=r"^test_images: expected at least one image, got shape"):
        prepared.test_loader(images[:0], labels[:0])


def test_test_loader_names_a_batch_size_that_is_no_positive_int(rng):
    images, labels = rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8), np.zeros(128, int)
    prepared = recipes.prepare("mnist99", images, labels)
    # None failed with a raw "'<' not supported" from min(); 0 was reported against the test set
    with pytest.raises(TypeError, match="^batch_size: expected an int >= 1, got None"):
        prepared.test_loader(images, labels, batch_size=None)
    with pytest.raises(ValueError, match="^batch_size: expected an int >= 1, got 0"):
        prepared.test_loader(images, labels, batch_size=0)
    assert prepared.test_loader(images[:5], labels[:5], batch_size=np.int64(64)).batch_size == 5


def test_run_recipe_checks_name_and_config_changes_before_training(rng):
    images, labels = rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8), np.zeros(128, int)
    sets = ((images, labels), (images, labels))
    # the clash was reported as "nope sets optimizer itself" for a recipe that does not exist
    with pytest.raises(ValueError, match="^name: expected one of airbench94, mnist99, got 'nope'"):
        recipes.run_recipe("nope", *sets, optimizer=None)
    # an unknown field failed inside TrainConfig ("unexpected keyword argument")
    with pytest.raises(TypeError, match=r"^config_changes: expected TrainConfig fields .*'bogus'"):
        recipes.run_recipe("mnist99", *sets, bogus=1)
    # a tuple of the wrong length was printed whole, arrays and all
    with pytest.raises(
        TypeError, match=r"^test: expected a pair \(images, labels\), got tuple of length 1$"
    ):
        recipes.run_recipe("mnist99", sets[0], (images,))


@pytest.mark.parametrize(
    "change", [{"schedule": "linear"}, {"val_split": 0.5}, {"standardize": "per_channel"}]
)
def test_run_recipe_refuses_changes_to_what_its_optimizer_and_data_set(rng, change):
    # schedule="linear" was ignored silently (the recipe's optimizer brings its own); val_split
    # took batches from a run whose schedule and final lookahead step count all of them, so it
    # ended before either did; standardize failed inside fit as "given fitted statistics"
    images, labels = rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8), np.zeros(128, int)
    with pytest.raises(ValueError, match=f"^config_changes: mnist99 sets {next(iter(change))} "):
        recipes.run_recipe("mnist99", (images, labels), (images, labels), **change)


@pytest.mark.parametrize("train_or_test", ["train", "test"])
def test_run_recipe_names_a_train_or_test_that_is_no_pair(rng, train_or_test):
    # a triple or None failed with raw "prepare() takes 3 positional arguments" / "Value after *"
    images, labels = _cifar_like(rng, 16)
    for bad in (None, (images, labels, labels), images):
        sets = {"train": (images, labels), "test": (images, labels), train_or_test: bad}
        with pytest.raises(
            TypeError, match=rf"{train_or_test}: expected a pair \(images, labels\)"
        ):
            recipes.run_recipe("airbench94", sets["train"], sets["test"])


def test_seeds_apart_by_2_to_the_32_prepare_apart_runs(rng):
    # jax.random.key keeps a seed's low 32 bits: seed 2**32 + 5 trained exactly seed 5's run
    images, labels = rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8), np.zeros(128, int)
    runs = [recipes.prepare("mnist99", images, labels, seed=seed) for seed in (5, 2**32 + 5)]
    orders = [run.train_loader.order(0).tolist() for run in runs]
    assert orders[0] != orders[1] and [run.config.seed for run in runs] == [5, 2**32 + 5]


def test_images_whose_dtype_is_no_numpy_dtype_are_named(rng, torch):
    images, labels = rng.integers(0, 256, (128, 28, 28, 1), dtype=np.uint8), np.zeros(128, int)
    # a torch tensor failed with a raw "Cannot interpret 'torch.uint8' as a data type"
    with pytest.raises(TypeError, match=r"^images: mnist99 expected a NumPy or JAX array .*Tensor"):
        recipes.prepare("mnist99", torch.from_numpy(images), labels)
    prepared = recipes.prepare("mnist99", images, labels)
    with pytest.raises(TypeError, match=r"^test_images: mnist99 expected a NumPy or JAX array"):
        prepared.test_loader(torch.from_numpy(images), labels)
