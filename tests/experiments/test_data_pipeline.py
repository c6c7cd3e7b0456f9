"""experiments/benchmarks/data_pipeline.py: bad sizes are refused before any data is read."""

import pytest


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--batch-size", "0"], "--batch-size: expected ints >= 1, got 0"),
        (["--steps", "-2"], "--steps: expected ints >= 1, got -2"),
        (["--widths", "64", "0", "256"], "--widths: expected ints >= 1, got 64 0 256"),
    ],
)
def test_sizes_below_one_are_refused_before_any_work(load_benchmark, argv, says, capsys):
    pipeline = load_benchmark("data_pipeline", needs_torch=False)
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main([*argv, "--data-dir", "/nonexistent"])
    assert exit_info.value.code == 2
    assert says in capsys.readouterr().err
