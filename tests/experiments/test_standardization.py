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
