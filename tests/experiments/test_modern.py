"""experiments/benchmarks/modern.py: its hand-written Flax twins compute jcnn's networks (with any
parameters, once jcnn's are converted) and ``--quick`` times jcnn, the Flax twin and PyTorch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("modern")


def _random_variables(variables, rng):
    """Every parameter and running statistic drawn at random (variances positive), so that no
    layer hides behind its initial value (ConvNeXt's layer scales start at 1e-6, biases at 0).
    ``variables`` need only shapes and dtypes (``jax.eval_shape`` of the init: nothing compiled)."""

    def draw(path, leaf):
        if getattr(path[-1], "key", None) == "var":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), leaf.dtype)
        return jnp.asarray(0.3 * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree_util.tree_map_with_path(draw, variables)


@pytest.mark.parametrize("index", range(4))
def test_flax_twin_equals_jcnn_with_random_parameters(bench, index, rng):
    spec = bench.networks(quick=True)[index]
    x = jnp.asarray(rng.standard_normal((spec["batch"], *spec["shape"])), jnp.float32)
    model, twin = spec["jcnn"](), spec["flax"]()
    variables = _random_variables(jax.eval_shape(model.init, jax.random.key(0), x[:1]), rng)
    twin_variables = bench.flax_variables(variables, spec["transposed"])
    error = bench.check_twin(spec["name"], model, twin, variables, twin_variables, x)
    assert error < 1e-3


def test_transposed_kernels_need_the_flip(bench, rng):
    """Without the conversion the U-Net twin differs: the check can fail, the flip is needed."""
    spec = next(s for s in bench.networks(quick=True) if s["transposed"])
    x = jnp.asarray(rng.standard_normal((spec["batch"], *spec["shape"])), jnp.float32)
    model, twin = spec["jcnn"](), spec["flax"]()
    variables = _random_variables(jax.eval_shape(model.init, jax.random.key(0), x[:1]), rng)
    with pytest.raises(AssertionError, match="training logits"):
        bench.check_twin(spec["name"], model, twin, variables, variables, x)
    flipped = bench.flax_variables(variables, spec["transposed"])
    for name in spec["transposed"]:
        kernel = np.asarray(variables["params"][name]["kernel"])
        np.testing.assert_array_equal(flipped["params"][name]["kernel"], kernel[::-1, ::-1])


@pytest.mark.slow  # ~1.5 min on a loaded 2-core machine: four networks, three sides, 8 compiles
def test_quick_times_jcnn_flax_and_pytorch(bench, capsys):
    bench.main(["--quick"])
    out = capsys.readouterr().out
    assert "QUICK MODE (smoke run: not a measurement)" in out.splitlines()[0]
    table = out[out.rindex("| network (training step)") :].strip().splitlines()
    header = [cell.strip() for cell in table[0].strip("|").split("|")]
    for column in ("jcnn ms", "Flax ms", "PyTorch ms", "jcnn vs Flax", "jcnn vs PyTorch"):
        assert column in header, header
    assert "compile s jcnn / Flax" in header and "first call s jcnn / Flax" in header
    rows = [
        dict(zip(header, (c.strip() for c in line.strip("|").split("|")), strict=True))
        for line in table[2:]
    ]
    assert [row["network (training step)"] for row in rows] == [
        spec["name"] for spec in bench.networks(quick=True)
    ]
    for row in rows:
        jcnn_ms, flax_ms, torch_ms = (float(row[k]) for k in ("jcnn ms", "Flax ms", "PyTorch ms"))
        assert min(jcnn_ms, flax_ms, torch_ms) > 0, row
        for ratio, other_ms in (("jcnn vs Flax", flax_ms), ("jcnn vs PyTorch", torch_ms)):
            # the ratio of the unrounded times: within the milliseconds' rounding of ours
            expected = other_ms / jcnn_ms
            assert float(row[ratio].rstrip("x")) == pytest.approx(expected, rel=0.05, abs=0.01)
        compile_s, first_call_s = (
            [float(seconds) for seconds in row[column].split(" / ")]
            for column in ("compile s jcnn / Flax", "first call s jcnn / Flax")
        )
        assert min(compile_s) > 0 and min(first_call_s) >= 0 and len(first_call_s) == 2, row
    assert out.count("the Flax twin's training logits equal jcnn's") == len(rows)


@pytest.mark.parametrize(
    "name", ["GELU (erf)", "GELU (tanh)", "swish", "mish", "ELU", "SELU", "softplus", "ReLU"]
)
def test_activation_sides_compute_the_same_gradients(bench, name):
    """The activation table compares like with like: jcnn, the plain jax.nn expression and
    PyTorch give the same gradients of every input and weight."""
    assert name in bench.ACTIVATIONS
    sides = bench.activation_problem(name, scale=1 / 64, seed=3)
    jcnn_grads = [np.asarray(g) for g in sides["jcnn"]()]
    assert len(jcnn_grads) == 3 * len(bench.ACTIVATION_SHAPES)
    for other, tolerance in (("jax.nn", 1e-5), ("torch", 1e-4)):
        grads = [np.asarray(g) for g in sides[other]()]
        for got, want in zip(jcnn_grads, grads, strict=True):
            np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rounds", "0"], "--rounds: expected an int >= 1, got 0"),
        (["--steps", "-1"], "--steps: expected an int >= 1, got -1"),
        (["--scale", "0"], "--scale: expected a finite number > 0, got 0.0"),
        (["--scale", "nan"], "--scale: expected a finite number > 0, got nan"),
        # a bare --only ran no section at all, silently
        (["--only"], "--only: expected at least one argument"),
        # an unknown device failed in a raw traceback after the convolution table
        (["--torch-device", "bogus"], "expected a device this PyTorch build can use"),
    ],
)
def test_bad_counts_and_scales_are_refused_before_any_work(bench, argv, message, capsys):
    # these ran the benchmark into raw errors deep inside (an empty median, a batch of 0 or NaN)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
