"""Smoke test of every experiment script: its ``--quick`` mode runs and writes its page.

The scripts run in this process (imported from ``experiments/``), so the datasets and jcnn are
loaded once; each writes into a temporary folder, never into ``docs/``.
"""

import importlib
import os
import re
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
NAMES = [
    "initialization",
    "receptive_fields",
    "normalization",
    "activations",
    "optimizers",
    "schedules",
    "augmentation",
    "invariance",
    "standardization",
    "jarrett",
    "time_to_accuracy",
]
NEEDS_DATA = set(NAMES) - {"initialization"}


def _data_dir():
    """``JCNN_DATA_DIR``, else ``<repo>/../shared/data`` (as the data tests look), if it has
    CIFAR-10."""
    shared = EXPERIMENTS.parents[1] / "shared" / "data"
    directory = Path(os.environ.get("JCNN_DATA_DIR") or shared)
    return directory if (directory / "cifar10").is_dir() else None


@pytest.fixture(scope="module")
def experiments_on_path():
    sys.path.insert(0, str(EXPERIMENTS))
    yield
    sys.path.remove(str(EXPERIMENTS))


def test_every_script_is_listed():
    scripts = {p.stem for p in EXPERIMENTS.glob("*.py") if not p.stem.startswith("_")}
    scripts -= {"augment_grid", "plot_schedules"}  # figure scripts of the user guide
    # tests/experiments/test_dp.py
    scripts -= {"dp_mnist", "dp_fashion_mnist", "dp_cifar10"}
    scripts -= {"dp_mnist_scatternet", "dp_fashion_mnist_scatternet", "dp_cifar10_scatternet"}
    assert scripts == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_quick_mode_writes_its_page(name, tmp_path, experiments_on_path, monkeypatch):
    if name in NEEDS_DATA and _data_dir() is None:
        if os.environ.get("JCNN_REQUIRE_DATA") == "1":
            pytest.fail("CIFAR-10 not found: set JCNN_DATA_DIR")
        pytest.skip("CIFAR-10 not found (set JCNN_DATA_DIR)")
    monkeypatch.setattr(sys, "argv", [f"experiments/{name}.py", "--quick"])
    module = importlib.import_module(name)
    data_dir = ["--data-dir", str(_data_dir())] if name in NEEDS_DATA else []
    module.main(["--quick", "--out", str(tmp_path), *data_dir])
    page = (tmp_path / f"{name}.md").read_text()
    assert page.startswith("# ")
    assert "Quick mode" in page and "NOT the experiment's results" in page
    assert re.search(r"commit `[0-9a-f]{4,}(\+dirty)?`|commit `unknown`", page)
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", page)
    assert figures, "the page shows no figure"
    for figure in figures:
        assert (tmp_path / figure).stat().st_size > 1000, figure
    assert "|" in page  # a results table
    if name == "receptive_fields":  # the measured fields agree with the formulas
        assert "**0 mismatch(es)**" in page
    if name == "time_to_accuracy":  # one batch of training left it at chance: it timed no learning
        accuracy = float(re.search(r"test accuracy (0\.\d+)", page).group(1))
        assert accuracy > 0.5, page


@pytest.mark.parametrize(
    "name, compared",
    [
        # the rate sweep of part 1 (constant rates), the batch sizes of part 2
        ("normalization", [("learning_rate", "constant"), ("batch_size", "cosine")]),
        # decay vs constant, the batch sizes of the scaling rule
        ("schedules", [("schedule", None), ("batch_size", None)]),
    ],
)
def test_quick_mode_compares_what_its_page_concludes_about(
    name, compared, experiments_on_path, monkeypatch, tmp_path
):
    """The quick page states a largest stable rate, a trend over batch sizes, the spread of the
    linear scaling rule and decay vs a constant rate: each needs two settings or more. With one
    (quick mode's single rate and batch size) the page concluded from nothing, e.g. "the rule
    did not reduce the spread" from a spread of 0 vs 0."""
    import numpy as np

    module = importlib.import_module(name)
    common = module._common
    x = np.zeros((8, 32, 32, 3), np.float32)
    y = np.zeros(8, np.int32)
    monkeypatch.setattr(common, "standardized", lambda *args, **kwargs: (x, y, x, y))
    calls = []

    def run_fit(model, train_xy, test_xy, *, epochs, batch_size, seed=0, **config):
        calls.append({"batch_size": batch_size, **config})
        record = {"train_loss": 1.0, "train_accuracy": 0.5, "val_loss": 1.0, "val_accuracy": 0.5}
        return [{"epoch": e + 1, **record} for e in range(epochs)], None

    monkeypatch.setattr(common, "run_fit", run_fit)
    monkeypatch.setattr(common.Page, "write", lambda self: None)
    module.main(["--quick", "--out", str(tmp_path)])
    for key, schedule in compared:
        values = {c[key] for c in calls if schedule in (None, c.get("schedule"))}
        assert len(values) >= 2, (key, values)
