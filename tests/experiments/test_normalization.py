"""experiments/normalization.py: its findings beside Wu & He, against the test set's noise."""

import pytest

pytest.importorskip("matplotlib")

BATCHES = (2, 4, 8, 16, 32, 64, 128)


@pytest.fixture(scope="module")
def script(load_experiment):
    return load_experiment("normalization")


def _errors(bn, gn):
    return {
        "BN": dict(zip(BATCHES, bn, strict=True)),
        "GN (G=8)": dict(zip(BATCHES, gn, strict=True)),
    }


def test_differences_within_the_noise_of_the_test_set_show_no_trend(script):
    # on 1,000 test images near 50% error one difference is noisy by about ±4.5 points: 2.5
    # points of BN growth against GN's, and 3 points of BN at batch 2, were called the paper's
    # trend and "more than 2 points above"
    errors = _errors(bn=[53.0, 50.5, 50, 50, 50.0, 51, 52], gn=[50.5, 50, 50, 50, 50.0, 51, 52])
    text = script.batch_size_findings(errors, BATCHES, 5000, 3, 1000)
    assert "**The paper's trend does not show here**: BN's change exceeds GN's by +2.5 " in text
    assert "the noise of ±6.3 points on 1000 test images" in text
    assert "beyond the noise of 1000 test images only at batch" not in text
    assert "GN is clearly worse" not in text and "rises" not in text


def test_differences_beyond_the_noise_are_reported(script):
    errors = _errors(bn=[59.0, 52, 52, 52, 50.5, 52, 55], gn=[59.6, 60, 60, 59, 62.4, 68, 72])
    text = script.batch_size_findings(errors, BATCHES, 5000, 3, 1000)
    assert "The direction of the paper's trend shows" in text and "±6.2 points" in text
    assert "beyond the noise of 1000 test images only at batch 2;" in text
    assert "**Unlike the paper, GN is clearly worse than BN" in text
    assert "the error of GN (G=8) rises beyond the noise" in text
    # the smaller test set of a quick run is noisier: the same table shows nothing
    quick = script.batch_size_findings(errors, BATCHES, 256, 1, 50)
    assert "does not show here" in quick and "clearly worse" not in quick


def test_the_largest_stable_rate_is_a_rate_or_says_none_was(script):
    # with no stable rate the page printed Python's None: "without BN **None**, with BN **None**"
    results = {("no BN", 0.1): (False, []), ("BN", 0.1): (False, [])}
    text = script.largest_stable_findings(results, (0.1,))
    assert text.startswith("Largest stable learning rate: without BN none of 0.1, with BN none of")
    # and it concluded "BN did not allow a larger rate" from two runs that both failed
    assert "None" not in text and "did not allow" not in text
    assert "**No rate trained stably here, with or without BN: this run cannot compare" in text
    results[("no BN", 0.1)] = (True, [])
    text = script.largest_stable_findings(results, (0.1,))
    assert "**Here BN did not allow a larger rate than the plain network**" in text
    results = {
        (label, lr): (ok, [])
        for label, lr, ok in (
            ("no BN", 0.1, True),
            ("no BN", 0.3, False),
            ("BN", 0.1, True),
            ("BN", 0.3, True),
        )
    }
    text = script.largest_stable_findings(results, (0.1, 0.3))
    assert "without BN **0.1**, with BN **0.3**." in text and "did not allow" not in text
