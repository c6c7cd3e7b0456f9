"""The DP MNIST experiment's --quick mode runs end to end and writes its report and figure."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("dp_accounting")
pytest.importorskip("matplotlib")

_SCRIPT = Path(__file__).resolve().parents[2] / "experiments" / "dp_mnist.py"


def test_quick_run_writes_table_and_figure(tmp_path):
    spec = importlib.util.spec_from_file_location("dp_mnist", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--quick", "--synthetic", "--epsilons", "2.0", "--out", str(tmp_path)])
    (result,) = results
    assert 1.9 < result["epsilon"] <= 2.0  # the calibrated noise spends the budget, no more
    assert 0 <= result["accuracy"] <= 100
    report = (tmp_path / "dp_mnist.md").read_text()
    assert "| 2 | 2.00 |" in report and "synthetic" in report
    assert (tmp_path / "dp_mnist.png").stat().st_size > 1000
