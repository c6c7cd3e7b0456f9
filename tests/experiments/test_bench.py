"""experiments/benchmarks/bench.py: the steps-per-call row checks that ``train_steps`` and
``train_step`` train alike and reports one time per side."""

import pytest

import jcnn


def test_steps_per_call_row_times_three_sides(load_benchmark):
    bench = load_benchmark("bench")
    row = bench.steps_per_call_row(
        "LeNet-5",
        jcnn.models.LeNet5(),
        bench.TorchLeNet5(),
        (28, 28, 1),
        3,
        2,
        1,
        bench.torch.device("cpu"),
    )
    assert row["benchmark"] == "LeNet-5 train b3, 2 steps per call"
    for side in ("train_step", "train_steps", "torch"):
        assert float(row[f"{side} ms/step"]) > 0
    ratio = float(row["train_step ms/step"]) / float(row["train_steps ms/step"])
    assert float(row["train_steps/train_step"].rstrip("x")) == pytest.approx(ratio, rel=0.1)


def test_layer_rows_check_every_kind_of_layer_against_pytorch(load_benchmark):
    """The per-layer table's sides (XLA's own convolution included) compute PyTorch's three
    products on depthwise, grouped, transposed 1-D/2-D/3-D (grouped too) and 3-D layers (the
    check runs before timing), and its ratio column is the timing columns' ratio."""
    bench = load_benchmark("bench")
    Layer = bench.Layer
    layers = [
        Layer("depthwise 3x3/2", (3, 9, 7, 6), 3, 12, 2, 1, 6),
        Layer("grouped 3x3", (2, 6, 5, 8), 3, 6, 1, 1, 2),
        Layer("transposed 1-D 4/2", (2, 7, 5), 4, 3, 2, 1, transposed=True, output_padding=1),
        Layer("transposed 2-D 3x3/2, groups 2", (2, 5, 4, 4), 3, 6, 2, 1, 2, transposed=True),
        Layer("transposed 3-D 2/2", (1, 3, 4, 2, 4), 2, 3, 2, transposed=True),
        Layer("3-D 3x3x3", (2, 4, 5, 3, 3), 3, 5, padding=1),
    ]
    rows = bench.layer_rows(1, 1, layers, batch=2, min_block=0.0)
    assert [row["layer"] for row in rows] == [f"{layer.name}, batch 2" for layer in layers]
    for row in rows:
        impls = next(key for key in row if key.startswith("fwd GFLOP/s")).split()[-1].split("/")
        assert impls[0] == "xla" and impls[-1] == "torch"
        ratios = row[f"{impls[-2]} vs torch fwd/dx/dw"].split("/")
        for product, ratio in zip(("fwd", "dx", "dw"), ratios, strict=True):
            cell = row[f"{product} GFLOP/s {'/'.join(impls)}"].split("/")
            rates = dict(zip(impls, map(float, cell), strict=True))
            expected = rates[impls[-2]] / rates["torch"]
            # The ratio is printed to two decimals (a hiccup can make one as small as 0.04x).
            assert float(ratio.rstrip("x")) == pytest.approx(expected, rel=0.05, abs=0.006)


def test_conv_layer_flops_count_the_products_multiply_adds(load_benchmark):
    bench = load_benchmark("bench")
    conv = bench.Layer("c", (2, 8, 8, 6), 3, 4, 2, 1, 2)  # out 4x4, 3 input channels per group
    assert bench.conv_layer_flops(conv, (2, 4, 4, 4)) == 2 * (2 * 4 * 4 * 4) * 9 * 3
    transposed = bench.Layer("t", (2, 5, 3), 4, 6, 2, transposed=True)  # scatters 6 per tap
    assert bench.conv_layer_flops(transposed, (2, 12, 6)) == 2 * (2 * 5 * 3) * 4 * 6


@pytest.mark.parametrize("flag", ["--rounds", "--steps", "--per-call", "--scale"])
def test_counts_below_one_are_refused_before_any_work(load_benchmark, flag, capsys):
    # --rounds 0 failed in an empty median after minutes of compiling; --scale 0 timed empty batches
    bench = load_benchmark("bench")
    with pytest.raises(SystemExit) as exit_info:
        bench.main([flag, "0"])
    assert exit_info.value.code == 2
    assert f"{flag}: expected an int >= 1, got 0" in capsys.readouterr().err


def test_only_without_sections_is_refused(load_benchmark, capsys):
    # `--only` alone ran every default section (minutes) as if it were absent
    bench = load_benchmark("bench")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--only"])
    assert exit_info.value.code == 2
    assert "--only: expected at least one argument" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["bogus", "cuda:99"])
def test_unusable_torch_device_is_refused_before_any_work(load_benchmark, device, capsys):
    # a bad name gave a raw RuntimeError; cuda on a CPU-only build failed deep inside torch
    bench = load_benchmark("bench")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--torch-device", device])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "argument --torch-device: expected a device this PyTorch build can use" in err
    assert f"got {device!r}" in err
