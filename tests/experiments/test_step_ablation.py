"""experiments/benchmarks/step_ablation.py: each swap computes what jcnn's formulation computes,
and ``--quick`` prints one row per variant, the jcnn model under the Flax step and the twin."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jcnn import functional as F
from jcnn.functional import norm, pool


@pytest.fixture(scope="module")
def ablation(load_benchmark):
    return load_benchmark("step_ablation")  # it imports bench.py and modern.py


def test_one_pass_moments_equal_two_pass_far_from_zero(ablation, rng):
    """Activations with a mean 1000 times their spread: the shift keeps the variance exact."""
    x = jnp.asarray(1000 + rng.standard_normal((6, 5, 7, 3)), jnp.float32)
    axes = (0, 1, 2)
    centered, mean, var = ablation.shifted_one_pass_moments(x, axes)
    expected_centered, expected_mean, expected_var = norm._moments(x, axes)
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-7)
    np.testing.assert_allclose(var, expected_var, rtol=1e-4)  # E[x²] - E[x]² would lose it all
    ulp = np.spacing(np.float32(1000))  # x - mean rounds to the precision of x
    np.testing.assert_allclose(centered, expected_centered, rtol=0, atol=ulp)
    with pytest.raises(ValueError, match="axis_name"):
        ablation.shifted_one_pass_moments(x, axes, "batch")


def test_swaps_equal_jcnn_values_and_gradients(ablation, rng):
    x = jnp.asarray(rng.integers(-2, 3, (2, 7, 6, 3)), jnp.float32)  # ties in most windows
    window, pads, out_sizes = (2, 2), ((0, 0), (0, 0)), (3, 3)
    for ours, swapped in (
        (
            lambda x: pool._tiled_max_pool(x, window, pads, out_sizes),
            lambda x: ablation.window_scatter_pool(x, window, pads, out_sizes),
        ),
        (F.gelu, ablation.xla_gelu),
    ):
        y, pullback = jax.vjp(ours, x)
        y_swapped, pullback_swapped = jax.vjp(swapped, x)
        cotangent = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
        np.testing.assert_allclose(y_swapped, y, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(
            pullback_swapped(cotangent)[0], pullback(cotangent)[0], rtol=1e-5, atol=1e-6
        )
    tree = {"a": jnp.asarray(rng.standard_normal((3, 4))), "b": [jnp.arange(5.0)]}
    np.testing.assert_allclose(ablation.concatenated_norm(tree), optax.tree.norm(tree), rtol=1e-6)


def test_quick_run_prints_every_variant(ablation, capsys):
    # LeNet-5 (no BatchNorm) times two variants side by side, each its own executable;
    # AirbenchNet (BatchNorm, GELU) compiles once with all four swaps in place, whose loss the
    # script checks against the twin's: every swap traced into a real step, one compile each side
    ablation.main(["--quick", "--nets", "lenet", "--variants", "", "pool+norm1"])
    out = capsys.readouterr().out
    assert "QUICK MODE (smoke run: not a measurement)" in out.splitlines()[0]
    assert "## LeNet-5 training step" in out and "AirbenchNet" not in out
    for label in ("| jcnn |", "| jcnn +pool +norm1 |", "| jcnn model, flax step |", "| flax |"):
        assert out.count(label) == 1
    ablation.main(["--quick", "--nets", "airbench", "--variants", "bn1pass+pool+gelu+norm1"])
    out = capsys.readouterr().out
    assert "## AirbenchNet training step" in out and "| jcnn |" not in out
    for label in ("| jcnn +bn1pass +pool +gelu +norm1 |", "| jcnn model, flax step |", "| flax |"):
        assert out.count(label) == 1
    with pytest.raises(SystemExit):
        ablation.main(["--quick", "--variants", "bn2pass"])


@pytest.mark.parametrize("flag", ["--batch", "--rounds", "--steps"])
def test_counts_below_one_are_refused_before_any_work(ablation, flag, capsys):
    # 0 or a negative count ran the benchmark into a raw error (or an empty median) deep inside
    with pytest.raises(SystemExit) as exit_info:
        ablation.main([flag, "0"])
    assert exit_info.value.code == 2
    assert f"{flag}: expected an int >= 1, got 0" in capsys.readouterr().err
