"""experiments/benchmarks/bench.py: the steps-per-call row checks that ``train_steps`` and
``train_step`` train alike and reports one time per side."""

import pytest

import jcnn


def test_steps_per_call_row_times_three_sides(load_benchmark):
    bench = load_benchmark("bench")
    row = bench.steps_per_call_row(
        "LeNet-5", jcnn.models.LeNet5(), bench.TorchLeNet5(), (28, 28, 1), 3, 2, 1
    )
    assert row["benchmark"] == "LeNet-5 train b3, 2 steps per call"
    for side in ("train_step", "train_steps", "torch"):
        assert float(row[f"{side} ms/step"]) > 0
    ratio = float(row["train_step ms/step"]) / float(row["train_steps ms/step"])
    assert float(row["train_steps/train_step"].rstrip("x")) == pytest.approx(ratio, rel=0.1)
