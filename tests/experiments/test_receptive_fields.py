"""experiments/receptive_fields.py beyond its smoke test (tests/experiments/test_quick.py)."""

import pytest

pytest.importorskip("matplotlib")


def test_a_missing_dataset_stops_the_run_before_the_measurements(
    load_experiment, tmp_path, monkeypatch
):
    # The CIFAR-10 image was loaded for the last figure only, so a folder without the dataset
    # failed after every field had been measured (11 minutes in full mode), losing them
    script = load_experiment("receptive_fields")

    def measured_field(*args, **kwargs):
        raise AssertionError("a field was measured before the dataset was found")

    monkeypatch.setattr(script, "measured_field", measured_field)
    with pytest.raises(SystemExit, match=r"cifar10 \(test\): expected"):
        script.main(["--quick", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
