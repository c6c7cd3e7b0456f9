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


def test_a_missing_data_dir_or_dataset_is_one_line(load_benchmark, tmp_path, capsys):
    # a --data-dir that is not a folder, or one without CIFAR-10, was a FileNotFoundError traceback
    pipeline = load_benchmark("data_pipeline", needs_torch=False)
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main(["--data-dir", str(tmp_path / "none")])
    assert exit_info.value.code == 2
    assert f"--data-dir {tmp_path / 'none'}: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        pipeline.main(["--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1, err
    assert "cifar10 (train): expected cifar-10-binary.tar.gz" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
