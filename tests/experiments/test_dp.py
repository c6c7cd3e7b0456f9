"""The DP-SGD studies (experiments/dp_*.py, experiments/_dp.py): quick runs end to end, their
networks fit their datasets, and the rows of separate full runs accumulate on one page."""

import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("dp_accounting")
pytest.importorskip("matplotlib")

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
SCRIPTS = [
    "dp_mnist",
    "dp_fashion_mnist",
    "dp_cifar10",
    "dp_mnist_scatternet",
    "dp_fashion_mnist_scatternet",
    "dp_cifar10_scatternet",
]


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        yield {name: __import__(name) for name in SCRIPTS}
    finally:
        sys.path.remove(str(EXPERIMENTS))


@pytest.fixture(scope="module", autouse=True)
def _calibrate_once():
    """The quick runs all calibrate the same noise (epsilon 2, 8 steps at rate 32/256): the
    accountant's search (seconds of Python per run) runs once per process, its answer reused.
    A pure function of its arguments, so every run still gets the sigma it would compute."""
    from jcnn import analysis

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            analysis, "dp_noise_multiplier", functools.cache(analysis.dp_noise_multiplier)
        )
        yield


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_network_takes_its_dataset(scripts, name):
    from jcnn import data

    study = scripts[name].STUDY
    shape = data.DATASETS[study.dataset].shape
    assert len(study.mean) == len(study.std) == shape[-1]
    model = study.make_model()
    features = study.features or (lambda x: x)
    out = jax.eval_shape(
        lambda x: model.apply(model.init(jax.random.key(0), x), x),
        features(jnp.zeros((2, *shape))),
    )
    assert out.shape == (2, 10)
    assert {p.epsilon for p in study.published} <= set(study.epsilons)


def _quick_run(scripts, name, out, *argv):
    """``name``'s quick run on synthetic data at epsilon 2 (``argv`` added), its result."""
    argv = ["--quick", "--synthetic", "--epsilons", "2.0", "--out", str(out), *argv]
    (result,) = scripts[name].main(argv)
    return result


def _check_quick_run(name, result, out):
    """The quick run's row, page and figure (written to ``out``), and no record."""
    assert 1.9 < result["epsilon"] <= 2.0  # the calibrated noise spends the budget, no more
    spent = [eps for _, eps, _ in result["history"]]
    assert spent == sorted(spent) and spent[-1] == result["epsilon"]
    assert 0 <= result["accuracy"] <= 100
    report = (out / f"{name}.md").read_text()
    assert "Quick mode" in report and "synthetic" in report
    assert "| 2 | 2.00 |" in report
    assert (out / f"{name}_accuracy.png").stat().st_size > 1000
    assert not (out / f"{name}.json").exists()  # a quick run is never a result


# dp_mnist's quick run is checked in test_the_moving_average_is_what_is_evaluated, which needs it
@pytest.mark.parametrize("name", ["dp_cifar10", "dp_mnist_scatternet", "dp_cifar10_scatternet"])
def test_quick_run_writes_table_and_figure(scripts, name, tmp_path):
    if scripts[name].STUDY.features:
        pytest.importorskip("kymatio")
    _check_quick_run(name, _quick_run(scripts, name, tmp_path), tmp_path)


def test_scattering_keeps_each_colour_in_its_own_channels(scripts):
    import _dp

    pytest.importorskip("kymatio")
    rng = np.random.default_rng(0)
    images = np.zeros((3, 32, 32, 3), np.float32)
    images[:, :, :, 1] = rng.normal(size=(3, 32, 32))
    features = np.asarray(_dp.scattering(jnp.asarray(images)))
    assert features.shape == (3, 8, 8, 243)
    assert np.all(features[..., :81] == 0) and np.all(features[..., 162:] == 0)
    assert np.all(np.abs(features[..., 81:162]).max(axis=(1, 2)) > 0)
    # the order-0 coefficient is a local average: a constant image gives its constant everywhere
    constant = np.asarray(_dp.scattering(jnp.full((1, 32, 32, 3), 2.0)))
    np.testing.assert_allclose(constant[..., ::81], 2.0, rtol=1e-4)
    np.testing.assert_allclose(constant[..., 81 * 1 + 1 : 81 * 2], 0.0, atol=1e-5)
    # each image is transformed alone, whatever the chunk it falls in (chunks of 500 and 256:
    # the quick runs' 256 images, one compile for both)
    many = np.concatenate([images] * 252)
    np.testing.assert_allclose(
        np.asarray(_dp.scattering(jnp.asarray(many)))[-3:], features, rtol=1e-5, atol=1e-6
    )


def test_full_runs_accumulate_rows_with_the_same_settings(scripts, tmp_path, monkeypatch):
    import _dp

    def fake_train(study, train_set, test_set, *, target_epsilon, args):
        accuracy = 90.0 + target_epsilon + args.clip
        history = [(1, target_epsilon / 2, accuracy - 1), (2, target_epsilon, accuracy)]
        return {
            "target_epsilon": target_epsilon,
            "epsilon": target_epsilon,
            "accuracy": accuracy,
            "sigma": 1.0,
            "epochs": 2,
            "seconds": 1.0,
            "history": history,
        }

    monkeypatch.setattr(_dp, "train_private", fake_train)
    main = scripts["dp_mnist"].main
    common = ["--synthetic", "--epochs", "2", "--out", str(tmp_path)]
    main([*common, "--epsilons", "3.0", "1.2"])
    runs = main([*common, "--epsilons", "7.1", "3.0"])
    assert sorted(r["target_epsilon"] for r in runs) == [1.2, 3.0, 7.1]
    record = json.loads((tmp_path / "dp_mnist.json").read_text())
    assert len(record["runs"]) == 3 and record["settings"]["epochs"] == 2
    page = (tmp_path / "dp_mnist.md").read_text()
    for row in ("| 1.2 | 1.20 |", "| 3 | 3.00 |", "| 7.1 | 7.10 |"):
        assert row in page
    assert "94.63% (Opacus MNIST example)" in page and "not run" not in page

    runs = main([*common, "--epsilons", "1.2", "--clip", "0.5"])  # other settings: a new page
    assert [r["target_epsilon"] for r in runs] == [1.2]
    assert "| 3 | 3.00 |" not in (tmp_path / "dp_mnist.md").read_text()
    assert "moving average" not in (tmp_path / "dp_mnist.md").read_text()

    main([*common, "--epsilons", "1.2", "--clip", "0.5", "--ema", "0.9"])  # a new page again
    record = json.loads((tmp_path / "dp_mnist.json").read_text())
    assert record["settings"]["ema"] == 0.9 and len(record["runs"]) == 1
    assert "moving average of the iterates (decay 0.9)" in (tmp_path / "dp_mnist.md").read_text()


def test_the_moving_average_is_what_is_evaluated(scripts, tmp_path):
    # An average that barely moves stays at the initial weights: it scores as a run that does not
    # train (learning rate 0), not as the trained iterates.
    trained = _quick_run(scripts, "dp_mnist", tmp_path)
    _check_quick_run("dp_mnist", trained, tmp_path)  # dp_mnist's quick run, as the others'
    trained = trained["history"]
    frozen = _quick_run(scripts, "dp_mnist", tmp_path, "--ema", "0.999999")["history"]
    untrained = _quick_run(scripts, "dp_mnist", tmp_path, "--lr", "0")["history"]
    assert [a for *_, a in frozen] == [a for *_, a in untrained]
    assert [a for *_, a in trained] != [a for *_, a in untrained]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--epsilons", "0"], "--epsilons"),
        (["--delta", "1"], "--delta"),
        (["--epochs", "0"], "--epochs"),
        (["--batch-size", "-4"], "--batch-size"),
        (["--ema", "1"], "--ema"),
        (["--ema", "-0.1"], "--ema"),
        # each ran until the privacy accounting or the optimizer refused it with a traceback
        # (--epsilons inf, --clip -1), or trained on silently (--lr nan, --momentum 5)
        (["--epsilons", "3", "inf"], "--epsilons: expected finite positive numbers"),
        (["--clip", "-1"], "--clip: expected a finite number > 0, got -1.0"),
        (["--clip", "nan"], "--clip: expected a finite number > 0, got nan"),
        (["--lr", "nan"], "--lr: expected a finite number >= 0, got nan"),
        (["--lr", "-0.1"], "--lr: expected a finite number >= 0, got -0.1"),
        (["--momentum", "5"], "--momentum: expected a number in [0, 1), got 5.0"),
        # trained twice for one budget and printed two rows of it
        (["--epsilons", "3", "1", "3.0"], "--epsilons: expected distinct budgets, got 3.0 twice"),
    ],
)
def test_bad_arguments_are_refused_before_any_work(scripts, argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit):
        scripts["dp_mnist"].main(["--synthetic", "--out", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_a_damaged_record_is_refused_and_left_as_it_was(scripts, tmp_path):
    record = tmp_path / "dp_mnist.json"
    record.write_text('{"settings": {"seed": 0}, "ru')
    with pytest.raises(SystemExit, match="dp_mnist.json: not a record of this study"):
        scripts["dp_mnist"].main(["--synthetic", "--out", str(tmp_path)])
    assert record.read_text() == '{"settings": {"seed": 0}, "ru'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dp_mnist.json"]


def test_a_record_that_fails_to_write_is_left_as_it_was(scripts, tmp_path, monkeypatch):
    # The record was rewritten in place: a write that stopped half way (a full disk) left a
    # truncated record, which every later run then refused as "not a record of this study"
    import _dp

    def fake_train(study, train_set, test_set, *, target_epsilon, args):
        history = [(1, target_epsilon, 50.0)]
        return {
            "target_epsilon": target_epsilon,
            "epsilon": target_epsilon,
            "accuracy": 50.0,
            "sigma": 1.0,
            "epochs": 1,
            "seconds": 1.0,
            "history": history,
        }

    monkeypatch.setattr(_dp, "train_private", fake_train)
    argv = ["--synthetic", "--epochs", "1", "--out", str(tmp_path), "--epsilons"]
    scripts["dp_mnist"].main([*argv, "3.0"])
    record = tmp_path / "dp_mnist.json"
    before = record.read_text()

    def half_then_full_disk(path, content, *args, **kwargs):
        with open(path, "wb") as file:
            file.write((content.encode() if isinstance(content, str) else content)[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    monkeypatch.setattr(Path, "write_bytes", half_then_full_disk)
    with pytest.raises(OSError, match="No space left"):
        scripts["dp_mnist"].main([*argv, "1.2"])
    assert record.read_text() == before
