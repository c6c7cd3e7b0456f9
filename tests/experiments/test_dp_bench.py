"""experiments/benchmarks/dp_bench.py: its PyTorch twins are jcnn's networks, Opacus' DP step
computes jcnn's clipped gradient, and ``--quick`` prints the Opacus rows and the speed ratio."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jcnn import analysis
from jcnn import functional as F

# Opacus' hooks on a network whose input needs no gradient: PyTorch's notice, not a fault
pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing")


@pytest.fixture(scope="module")
def bench(load_benchmark):
    module = load_benchmark("dp_bench", needs_torch=False)
    if module.opacus is None:
        if os.environ.get("JCNN_REQUIRE_TORCH") == "1":
            raise ImportError(module.MISSING_OPACUS)
        pytest.skip(f"dp_bench.py compares with Opacus: {module.MISSING_OPACUS}")
    return module


def _setup(bench, network, batch, seed):
    make, shape = bench.NETWORKS[network]
    model = make()
    rng = np.random.default_rng(seed)
    images = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
    # jitted: eagerly the forward pass compiled one program per operation
    params = jax.jit(model.init)(jax.random.key(seed), images[:1])["params"]
    twin = bench.torch_twin(network)
    bench.load_jcnn_params(twin, params)
    return model, params, twin, images, labels


@pytest.mark.parametrize("network", ["LeNet-5", "CIFAR-10 CNN"])
def test_twin_logits_and_loss_are_jcnns(bench, network):
    model, params, twin, images, labels = _setup(bench, network, 3, seed=7)
    assert bench.check_twin(model, params, twin, images, labels) < 1e-4
    with pytest.raises(RuntimeError, match="differ from jcnn's"):  # the check can fail
        bench.check_twin(model, jax.tree.map(lambda p: 1.1 * p, params), twin, images, labels)


@pytest.mark.parametrize("network", ["LeNet-5", "CIFAR-10 CNN"])
def test_opacus_step_without_noise_is_jcnns_clipped_mean(bench, network):
    import copy

    import torch

    model, params, twin, images, labels = _setup(bench, network, 5, seed=3)

    def loss_fn(params, batch):
        return F.cross_entropy(model.apply({"params": params}, batch[0]), batch[1])

    ours, norms = jax.jit(
        lambda params, batch: analysis.private_grad(
            loss_fn, params, batch, jax.random.key(0),
            l2_norm_clip=bench.L2_NORM_CLIP, noise_multiplier=0.0,
        )
    )(params, (images, labels))  # fmt: skip
    assert np.sum(np.asarray(norms) > bench.L2_NORM_CLIP) >= 2  # clipping matters here
    labels_torch = torch.from_numpy(np.array(labels, np.int64))
    for mode in ("hooks", "ghost"):
        theirs = copy.deepcopy(twin)
        before = {name: p.detach().clone() for name, p in theirs.named_parameters()}
        bench.opacus_step(
            theirs, mode, bench.nchw(images), labels_torch, noise_multiplier=0.0, lr=1.0,
            momentum=0.0,
        )()  # fmt: skip
        after = dict(theirs.named_parameters())
        for path, value in jax.tree_util.tree_flatten_with_path(ours)[0]:
            name = ".".join(k.key for k in path).replace(".kernel", ".weight")
            value = np.asarray(value)
            value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
            step = (before[name] - after[name]).detach().numpy()
            np.testing.assert_allclose(
                step, value, rtol=2e-3, atol=1e-5 * np.abs(value).max(), err_msg=f"{mode} {name}"
            )


@pytest.mark.slow  # ~30-70 s on the shared 2-core machine: nine rows, two networks, compiles
def test_quick_mode_prints_opacus_rows_and_the_ratio(bench, capsys):
    summaries = bench.main(["--quick"])
    printed = capsys.readouterr().out
    assert "QUICK MODE (smoke run: not a measurement)" in printed.splitlines()[0]
    assert f"opacus {bench.opacus.__version__}" in printed
    for network, batch in (("LeNet-5", 16), ("CIFAR-10 CNN", 4)):
        rows = [
            line for line in printed.splitlines() if line.startswith(f"{network:<13}{batch:>5}")
        ]
        names = " ".join(rows)
        for mode in ("hooks", "ghost"):  # the default and ghost clipping run on these layers
            assert f"Opacus DP step, {mode} " in names and f"{mode} fails" not in names
        assert "torch non-private step" in names
    assert "Opacus ms x torch step   jcnn ms x jcnn step Opacus/jcnn" in printed
    assert [(s["network"], s["batch"]) for s in summaries] == [("LeNet-5", 16), ("CIFAR-10 CNN", 4)]
    for row in summaries:
        assert row["opacus_mode"] in bench.OPACUS_MODES
        assert row["opacus_ms"] > 0 and row["jcnn_ms"] > 0
        assert row["speedup"] == pytest.approx(row["opacus_ms"] / row["jcnn_ms"])
        assert f"{row['speedup']:>12.2f}" in printed


def test_without_opacus_says_so_and_prints_jcnns_rows(load_benchmark, capsys, monkeypatch):
    module = load_benchmark("dp_bench", needs_torch=False)
    monkeypatch.setattr(module, "opacus", None)
    monkeypatch.setattr(module, "MISSING_OPACUS", "No module named 'opacus': install it")
    calls = []

    def jcnn_rows_only(network, batch, rounds, calls_per_round):  # no compile: the output path
        calls.append((network, batch))
        names = ["non-private step", "norms, ghost", "DP step, ghost"]
        return [(name, 0.01 * (i + 1), 2**20) for i, name in enumerate(names)], {}

    monkeypatch.setattr(module, "bench", jcnn_rows_only)
    assert module.main(["--batches", "4", "--cifar-batches", "2"]) == []
    assert calls == [("LeNet-5", 4), ("CIFAR-10 CNN", 2)]
    printed = capsys.readouterr().out
    assert "Opacus is not installed" in printed and "No module named 'opacus'" in printed
    assert "DP step, ghost" in printed and "Opacus" not in printed.split("install it")[-1]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--rounds", "0"], "--rounds: expected an int >= 1, got 0"),
        (["--calls", "-2"], "--calls: expected an int >= 1, got -2"),
        (["--batches", "64", "0"], "--batches: expected ints >= 1, got [64, 0]"),
        (["--cifar-batches", "-4"], "--cifar-batches: expected ints >= 1, got [-4]"),
    ],
)
def test_bad_counts_are_refused_before_any_work(load_benchmark, argv, message, capsys):
    # these ran the benchmark into raw errors deep inside (an empty median, a batch of 0)
    bench = load_benchmark("dp_bench", needs_torch=False)
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
