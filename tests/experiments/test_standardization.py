"""experiments/standardization.py beyond its smoke test (tests/experiments/test_quick.py)."""

import pytest

pytest.importorskip("matplotlib")


def test_a_missing_dataset_stops_the_run_before_the_regressions(
    load_experiment, tmp_path, monkeypatch
):
    # CIFAR-10 was loaded after the kg-vs-mg regressions, so a folder without the dataset
    # failed only once they had all run, losing them
    script = load_experiment("standardization")

    def regression(*args, **kwargs):
        raise AssertionError("a regression ran before the dataset was found")

    monkeypatch.setattr(script, "regression", regression)
    with pytest.raises(SystemExit, match=r"cifar10 \(train\): expected"):
        script.main(["--quick", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def test_the_cnn_findings_count_the_rates_of_the_grid(load_experiment, tmp_path, monkeypatch):
    # "this grid has three" was written whatever the grid, and quick mode tried one rate,
    # so its page chose a "best rate per input" among one
    import numpy as np

    script = load_experiment("standardization")
    common = script._common
    images = np.arange(8 * 32 * 32 * 3).reshape(8, 32, 32, 3).astype(np.uint8)
    monkeypatch.setattr(common, "load", lambda *args, **kwargs: (images, np.zeros(8, np.int32)))
    monkeypatch.setattr(script, "regression", lambda x, y, lr, steps: np.full(steps, 1.0))
    rates = []

    def train_curve(model, train_xy, tx, *, epochs, batch_size, seed=0):
        rates.append(tx)
        loss = 1.0 if train_xy[0].max() > 100 else 2.0  # raw 0..255 ends lowest
        return np.full(10, loss), np.ones(10), np.ones(10)

    monkeypatch.setattr(common, "train_curve", train_curve)
    monkeypatch.setattr(common.Page, "write", lambda self: None)
    texts = []
    monkeypatch.setattr(common.Page, "text", lambda self, markdown: texts.append(markdown))
    script.main(["--quick", "--out", str(tmp_path)])
    per_input = len(rates) // 3
    assert per_input >= 2
    [finding] = [t for t in texts if "this grid has" in t]
    assert f"this grid has {per_input}," in finding
