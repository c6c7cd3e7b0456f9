"""experiments/benchmarks/depthwise.py: bad counts are refused before any work."""

import pytest


@pytest.mark.parametrize("flag", ["--rounds", "--batch"])
def test_counts_below_one_are_refused_before_any_work(load_benchmark, flag, capsys):
    depthwise = load_benchmark("depthwise")
    with pytest.raises(SystemExit) as exit_info:
        depthwise.main([flag, "-1"])
    assert exit_info.value.code == 2
    assert f"{flag}: expected an int >= 1, got -1" in capsys.readouterr().err
