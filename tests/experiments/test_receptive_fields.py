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


def test_quick_mode_measures_deeper_stacks_and_the_geometric_growth(
    load_experiment, monkeypatch, tmp_path
):
    # --quick measured one layer only: at L = 1 the linear formula, the pooled and the strided
    # fields are all about K, so the smoke run could pass while showing neither claim
    import numpy as np

    from jcnn import analysis, nn

    script = load_experiment("receptive_fields")
    images = np.zeros((100, 32, 32, 3), np.uint8)
    monkeypatch.setattr(script._common, "load", lambda *args, **kwargs: (images, None))
    measured = []

    def measured_field(model, size, key, channels=1):
        field = analysis.receptive_field(model, (1, size, size, channels)).size[0]
        depth = sum(isinstance(layer, nn.Conv) for layer in model.layers)
        measured.append((depth, field))
        return field, field, None

    class Measured(Exception):
        pass

    def text(self, markdown):
        if "mismatch(es)" in markdown:
            raise Measured

    monkeypatch.setattr(script, "measured_field", measured_field)
    monkeypatch.setattr(script._common.Page, "text", text)
    with pytest.raises(Measured):
        script.main(["--quick", "--out", str(tmp_path)])
    assert max(depth for depth, _ in measured) >= 2
    # a field beyond the linear 1 + L(K - 1) of 3x3 kernels: pooling or stride measured at L >= 2
    assert any(depth >= 2 and field > 1 + 2 * depth for depth, field in measured)
