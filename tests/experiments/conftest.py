"""Loading an experiment script (``experiments/``) or a benchmark script
(``experiments/benchmarks/``) as a module for its tests."""

import importlib
import importlib.util
import os
import sys
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
BENCHMARKS = EXPERIMENTS / "benchmarks"


@pytest.fixture(scope="module")
def load_experiment():
    """``load(name)``: ``experiments/<name>.py`` imported, with ``experiments/`` on ``sys.path``
    (the scripts import ``_common``) while the test module runs."""
    sys.path.insert(0, str(EXPERIMENTS))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(EXPERIMENTS))


@pytest.fixture(scope="module")
def load_benchmark():
    """``load(name)``: ``experiments/benchmarks/<name>.py`` as a module (registered in
    ``sys.modules`` while the test module runs: dataclasses need their module known), with
    ``experiments/benchmarks/`` on ``sys.path`` (scripts import their siblings, as run from there).
    A script that compares with PyTorch skips without it, unless ``JCNN_REQUIRE_TORCH=1``."""
    loaded = []
    sys.path.insert(0, str(BENCHMARKS))

    def load(name: str, *, needs_torch: bool = True):
        if needs_torch:
            try:
                import torch  # noqa: F401
            except ImportError:
                if os.environ.get("JCNN_REQUIRE_TORCH") == "1":
                    raise
                pytest.skip(f"{name}.py compares with PyTorch: `pip install -e .[dev]`")
        spec = importlib.util.spec_from_file_location(f"{name}_bench", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        loaded.append(spec.name)
        spec.loader.exec_module(module)
        return module

    try:
        yield load
    finally:
        sys.path.remove(str(BENCHMARKS))
        for name in loaded:
            sys.modules.pop(name, None)
