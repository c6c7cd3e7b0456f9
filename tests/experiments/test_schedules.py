"""experiments/schedules.py: its findings, each difference against the test set's noise."""

import pytest

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def script(load_experiment):
    return load_experiment("schedules")


def test_a_difference_is_judged_by_the_noise_near_both_accuracies(script):
    # the noise was that near the lower accuracy alone: 0.02 to 0.05 on 256 images (2.5 points
    # there, 3.3 near both) read as beyond the noise, for warmup and for decay alike
    rows = [
        ["constant", "none", 1.0, 0.02],
        ["cosine", "none", 1.0, 0.05],
        ["constant", "1 epoch", 1.0, 0.05],
        ["cosine", "1 epoch", 1.0, 0.20],
    ]
    text = script.schedule_findings(rows, 0.05, 256)
    assert (
        "With no warmup, the best decaying schedule (cosine, 0.050) vs a constant rate (0.020): "
        "+3.0 points, **no decaying schedule beats a constant rate beyond the noise here**"
    ) in text
    assert "(cosine, 0.200) vs a constant rate (0.050): +15.0 points, decay helps" in text
    # warmup: constant 0.02 -> 0.05 (within the noise), cosine 0.05 -> 0.20 (beyond it)
    assert "beyond the noise for 1 of 2 schedules" in text
