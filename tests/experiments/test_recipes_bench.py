"""experiments/benchmarks/recipes_bench.py: its PyTorch pieces match jcnn's, and ``--quick`` runs
both recipes on both sides and prints both columns."""

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import models


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("recipes_bench")


def _data_dir():
    """``JCNN_DATA_DIR``, else ``<repo>/../shared/data``, if it has MNIST and CIFAR-10."""
    shared = Path(__file__).resolve().parents[3] / "shared" / "data"
    directory = Path(os.environ.get("JCNN_DATA_DIR") or shared)
    if (directory / "cifar10").is_dir() and (directory / "mnist").is_dir():
        return directory
    if os.environ.get("JCNN_REQUIRE_DATA") == "1":
        pytest.fail(f"MNIST and CIFAR-10 not found in {directory}: set JCNN_DATA_DIR")
    pytest.skip("MNIST and CIFAR-10 not found (set JCNN_DATA_DIR)")


def test_torch_whitening_kernel_is_jcnns_up_to_eigenvector_signs(bench, rng):
    import torch

    images = rng.normal(size=(7, 9, 11, 3)).astype(np.float32) * [1.0, 2.0, 0.5]
    ours = np.asarray(models.whitening_kernel(jnp.asarray(images)))  # (2, 2, 3, 24)
    theirs = bench.torch_whitening_kernel(torch.from_numpy(images).permute(0, 3, 1, 2))
    theirs = theirs.numpy().transpose(2, 3, 1, 0)
    assert theirs.shape == ours.shape
    for index in range(ours.shape[-1]):
        a, b = ours[..., index], theirs[..., index]
        scale = np.abs(a).max()
        assert min(np.abs(a - b).max(), np.abs(a + b).max()) < 1e-3 * scale, index


def test_translate_takes_one_reflect_padded_window_per_image(bench, rng):
    import torch

    images = torch.from_numpy(rng.normal(size=(40, 3, 6, 5)).astype(np.float32))
    out = bench.translate(images, 2, torch.Generator().manual_seed(1)).numpy()
    padded = np.pad(images.numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    seen = set()
    for image, source in zip(out, padded, strict=True):
        windows = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if np.array_equal(image, source[:, dy : dy + 6, dx : dx + 5])
        ]
        assert windows, "an output is no window of the padded image"
        seen.add(windows[0])
    assert len(seen) > 5  # the offsets vary per image


@pytest.mark.slow  # ~60 s on a quiet 2-core machine: two recipes, two sides, six compiles
def test_quick_mode_prints_both_columns(bench, capsys):
    results = bench.main(["--quick", "--data-dir", str(_data_dir())])
    printed = capsys.readouterr().out
    assert "QUICK MODE" in printed
    assert "| airbench94, one process | jcnn | torch | torch/jcnn |" in printed
    assert "| airbench94, own processes | jcnn | torch | torch/jcnn |" in printed
    assert "| seed | jcnn test acc | jcnn s | torch test acc | torch s |" in printed
    for setting in ("airbench94", "airbench94_processes"):
        airbench = results[setting]
        for side in ("jcnn", "torch"):
            assert len(airbench["times"][side]) == 1 and airbench["times"][side][0] > 0
            assert 2.0 < airbench["first_loss"][side] < 2.6  # ~ln(10) at the start, smoothing
    # PyTorch alone runs on glibc's malloc settings, as it does without jcnn
    assert results["airbench94_processes"]["host_memory"]["torch"] == "release"
    (run,) = results["mnist99"]["runs"]
    for side in ("jcnn", "torch"):
        assert 0.0 <= run[side]["accuracy"] <= 1.0 and run[side]["seconds"] > 0
