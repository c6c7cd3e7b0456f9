"""jcnn-train end to end: a run killed mid-epoch and resumed equals an unbroken run, bit for bit."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jcnn import native
from jcnn.train.checkpoint import CheckpointManager
from jcnn.train.cli import build_parser
from jcnn.train.loop import CRASH_AFTER_STEP_ENV

# 256 synthetic images, batch 64: 4 steps per epoch, 2 epochs; the small 1998 LeNet keeps
# compilation short. A checkpoint every 3 steps (and at each epoch's end); the crash comes after
# step 7 (epoch 2, batch 3), so the resumed run restarts from step 6, mid-epoch.
ARGS = [
    "--model",
    "lenet5_1998",
    "--dataset",
    "synthetic",
    "--limit-train",
    "256",
    "--epochs",
    "2",
    "--batch-size",
    "64",
    "--optimizer",
    "nesterov",
    "--lr",
    "0.05",
    "--schedule",
    "cosine",
    "--warmup-epochs",
    "0.5",
    "--checkpoint-every-steps",
    "3",
    "--keep-last",
    "10",
    "--no-progress",
    "--seed",
    "5",
]

ROOT = Path(__file__).resolve().parents[2]


def _cli(out, *extra, crash_after=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop(CRASH_AFTER_STEP_ENV, None)
    if crash_after is not None:
        env[CRASH_AFTER_STEP_ENV] = str(crash_after)
    code = "import sys; from jcnn.train.cli import main; sys.exit(main())"
    return subprocess.run(
        [sys.executable, "-c", code, *ARGS, "--out", str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _final_arrays(out):
    manager = CheckpointManager(out / "checkpoints")
    path = manager.path(manager.latest_step()) / "state"
    return manager.latest_step(), ocp.StandardCheckpointer().restore(path)


def _metrics(out):
    history = json.loads((out / "history.json").read_text())
    return [
        {k: v for k, v in h.items() if k not in ("seconds", "images_per_second")} for h in history
    ]


def _run_here(out, *extra, capsys):
    """``(exit status, stdout, stderr)`` of ``jcnn-train ARGS --out out extra`` in this process:
    only the killed run needs a process of its own (the crash ends it), and starting one (imports,
    compiling) costs seconds."""
    from jcnn.train.cli import main

    try:
        code = main([*ARGS, "--out", str(out), *extra])
    except SystemExit as exit:
        code = exit.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_killed_and_resumed_run_is_bitwise_identical(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(CRASH_AFTER_STEP_ENV, raising=False)
    full, broken = tmp_path / "full", tmp_path / "broken"
    code, _, err = _run_here(full, capsys=capsys)
    assert code == 0, err[-3000:]
    killed = _cli(broken, crash_after=7)
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert CheckpointManager(broken / "checkpoints").latest_step() == 6
    code, out, err = _run_here(broken, "--resume", capsys=capsys)
    assert code == 0, err[-3000:]
    assert "resumed from" in out and "step_00000006" in out

    step_a, arrays_a = _final_arrays(full)
    step_b, arrays_b = _final_arrays(broken)
    assert step_a == step_b == 8
    flat_a = dict(ocp.tree.to_flat_dict(arrays_a))
    flat_b = dict(ocp.tree.to_flat_dict(arrays_b))
    assert flat_a.keys() == flat_b.keys()
    for key in flat_a:
        np.testing.assert_array_equal(np.asarray(flat_a[key]), np.asarray(flat_b[key]), err_msg=key)
    assert _metrics(full) == _metrics(broken)
    summary_a = json.loads((full / "summary.json").read_text())
    summary_b = json.loads((broken / "summary.json").read_text())
    assert summary_a["test_accuracy"] == summary_b["test_accuracy"] > 0.5
    for name in ("config.json", "history.csv", "curves.png"):
        assert (broken / name).exists()

    # A corrupt checkpoint stops --resume with a message naming it.
    for path in (CheckpointManager(full / "checkpoints").path(8) / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage")
    code, _, err = _run_here(full, "--resume", capsys=capsys)
    assert code == 3
    assert "cannot resume" in err and "step_00000008 is corrupt" in err


def test_parser_has_the_issue_flags():
    args = build_parser().parse_args(
        [
            "--model",
            "lenet5",
            "--dataset",
            "mnist",
            "--epochs",
            "3",
            "--batch-size",
            "32",
            "--optimizer",
            "adamw",
            "--lr",
            "0.01",
            "--schedule",
            "one_cycle",
            "--weight-decay",
            "0.05",
            "--augment",
            "random_crop",
            "--data-dir",
            "d",
            "--out",
            "o",
            "--resume",
            "--seed",
            "4",
            "--devices",
            "2",
        ]
    )
    assert (args.epochs, args.batch_size, args.optimizer, args.devices) == (3, 32, "adamw", 2)
    assert args.resume and args.weight_decay == 0.05
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--optimizer", "adamax"])


def test_augment_flag_builds_ops_with_settings():
    import jax
    import jax.numpy as jnp

    from jcnn.train.cli import _augmenters

    per_example, per_batch = _augmenters("random_translate:max_shift=2,mixup:alpha=0.2", 10)
    assert per_batch.keywords == {"num_classes": 10, "alpha": 0.2}
    image = jnp.arange(36.0).reshape(6, 6, 1)
    shifted = per_example(jax.random.PRNGKey(0), image)
    assert shifted.shape == image.shape
    assert _augmenters("", 10) == (None, None)
    crop, _ = _augmenters("random_crop:size=(4, 4):padding=1, random_hflip", 10, (6, 6, 1))
    assert crop(jax.random.PRNGKey(1), image).shape == (4, 4, 1)
    with pytest.raises(SystemExit, match="no op 'warp'"):
        _augmenters("warp", 10)
    with pytest.raises(SystemExit, match="cannot parse"):
        _augmenters("random_translate:max_shift=two", 10)
    for spec in ("random_hflip,,random_vflip", "random_hflip,", ",random_hflip", " , "):
        with pytest.raises(SystemExit, match="an empty op between commas"):
            _augmenters(spec, 10)


def test_augment_flag_takes_a_word_for_a_string_setting_without_quotes():
    import jax
    import jax.numpy as jnp

    from jcnn.train.cli import _augmenters

    image = jnp.arange(1.0, 37.0).reshape(6, 6, 1)
    bare, _ = _augmenters("random_crop:padding=2:pad_mode=reflect", 10, (6, 6, 1))
    quoted, _ = _augmenters("random_crop:padding=2:pad_mode='reflect'", 10, (6, 6, 1))
    for seed in range(8):
        key = jax.random.PRNGKey(seed)
        out = bare(key, image)
        assert jnp.array_equal(out, quoted(key, image))
        assert float(out.min()) >= 1.0  # reflected, never zero-padded
    with pytest.raises(
        SystemExit, match="pad_mode: expected one of 'zeros', 'reflect', got 'mirror'"
    ):
        _augmenters("random_crop:pad_mode=mirror", 10, (6, 6, 1))
    with pytest.raises(SystemExit, match="cannot parse"):  # a number's setting takes no word
        _augmenters("random_crop:padding=four", 10, (6, 6, 1))


# ---- user mistakes: one line in the command's terms, a non-zero exit, nothing touched ---------


def _main(argv, capsys):
    """``(exit status, stderr)`` of ``jcnn-train argv`` run in this process, as a shell sees them
    (``SystemExit("message")`` prints the message and exits with 1)."""
    from jcnn.train.cli import main

    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    err = capsys.readouterr().err.strip()
    if isinstance(code, str):
        code, err = 1, (err + "\n" + code).strip()
    return code, err


SMALL_SYNTHETIC = ["--dataset", "synthetic", "--limit-train", "64", "--epochs", "1"]


def _assert_one_line(err):
    assert err.startswith("jcnn-train: "), err
    assert "\n" not in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--limit-train", "-5"], "--limit-train: expected a positive integer, got -5"),
        (["--limit-train", "0"], "--limit-train: expected a positive integer"),
        (["--epochs", "0"], "--epochs: expected a positive integer"),
        (["--epochs", "2.5"], "--epochs: expected a positive integer, got '2.5'"),
        (["--batch-size", "-1"], "--batch-size"),
        (["--keep-last", "0"], "--keep-last"),
        (["--devices", "0"], "--devices"),
        (["--checkpoint-every-steps", "-1"], "--checkpoint-every-steps"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**32)], "--seed"),
        (["--lr", "0"], "--lr: expected a positive number"),
        (["--lr", "-0.1"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "fast"], "--lr"),
        (["--warmup-epochs", "-1"], "--warmup-epochs"),
        (["--warmup-epochs", "5", "--epochs", "4"], "--warmup-epochs 5 is longer than the run"),
        (["--weight-decay", "-1e-4"], "--weight-decay"),
        (["--optimizer", "momentum", "--momentum", "1.0"], "--momentum"),
        (["--momentum", "0.5"], "--momentum applies to --optimizer momentum"),
        (["--clip-norm", "0"], "--clip-norm"),
        (["--clip-value", "0"], "--clip-value: expected a positive number, got 0"),
        (["--clip-value", "-1"], "--clip-value"),
        (["--clip-value", "inf"], "--clip-value"),
        (["--label-smoothing", "1"], "--label-smoothing"),
        (["--schedule", "step", "--step-epochs", "1,x"], "--step-epochs: expected comma-sep"),
        (["--schedule", "step", "--step-epochs", "3,2"], "--step-epochs: expected increasing"),
        (["--schedule", "step", "--step-epochs", "0"], "--step-epochs"),
        (["--schedule", "step"], "--schedule step needs --step-epochs"),
        (["--step-epochs", "2"], "--step-epochs applies to --schedule step only"),
        (["--step-factor", "0.5"], "--step-factor applies to --schedule step only"),
        (["--schedule", "step", "--step-epochs", "1", "--step-factor", "0"], "--step-factor"),
        (["--decay-rate", "0.5"], "--decay-rate applies to --schedule exponential or"),
        (["--schedule", "exponential", "--decay-rate", "-1"], "--decay-rate"),
        (["--schedule", "inverse_time", "--decay-rate", "nan"], "--decay-rate"),
        (
            [*SMALL_SYNTHETIC, "--batch-size", "32", "--schedule", "step", "--step-epochs", "5"],
            "--step-epochs: 5 is past the end of the run (--epochs 1, counted after 0",
        ),
        (
            # fit's message named config.epochs: only "config.X:" was put in the flags' terms
            [*SMALL_SYNTHETIC, "--batch-size", "64", "--schedule", "one_cycle"],
            "got 1 (--epochs, --max-steps, --warmup-epochs)",
        ),
        (["--model", "resnet1000"], "--model: invalid choice: 'resnet1000'"),
        (["--dataset", "imagenet"], "--dataset: expected one of mnist"),
        (["--dataset", "tfds:"], "or tfds:NAME, got 'tfds:'"),
        (["--val-split", "0"], "--val-split: expected a count"),
        (["--val-split", "-3"], "--val-split: expected a count"),
        (
            ["--val-split", "1.5"],
            "--val-split: expected a count (e.g. 5000) or a fraction in (0, 1)",
        ),
        (["--val-split", "nan"], "--val-split"),
        (["--val-split", "ten"], "--val-split: expected a count"),
        (["--val-split-seed", "-1"], "--val-split-seed"),
        (["--eval-every-steps", "-1"], "--eval-every-steps: expected an integer >= 0"),
        (["--eval-every-steps", "5"], "--eval-every-steps needs a validation set"),
        (["--val-split-seed", "3"], "--val-split-seed applies to --val-split only"),
        (["--max-steps", "0"], "--max-steps: expected a positive integer"),
        (["--steps-per-call", "0"], "--steps-per-call: expected a positive integer"),
        (
            ["--steps-per-call", "2", "--dp-noise-multiplier", "1"],
            "--steps-per-call: DP-SGD and --devices run one step per call",
        ),
        (["--steps-per-call", "2", "--devices", "1"], "--steps-per-call: DP-SGD and --devices"),
        (["--max-steps", "1.5"], "--max-steps: expected a positive integer"),
        (["--early-stopping", "0"], "--early-stopping: expected a positive integer"),
        (["--early-stopping", "3"], "--early-stopping needs a validation set"),
        (["--manual-dir", "."], "--manual-dir applies to --dataset tfds:NAME only"),
        (["--dataset", "synthetic", "--data-dir", "."], "--data-dir: --dataset synthetic is"),
        (["--dataset", "tfds:toy", "--manual-dir", "/nonexistent/x"], "no such folder"),
        (["--optimizer", "adamax"], "--optimizer: invalid choice"),
        (["--compute-dtype", "float16"], "--compute-dtype"),
        (["--resume", "--overwrite"], "--overwrite: not allowed with argument --resume"),
        (["--devices", "4096"], "--devices 4096: only"),
        (["--augment", "hflip"], "--augment hflip: expected a random op taking (key, image"),
        (["--augment", "compose"], "--augment compose"),
        (["--augment", "random_apply"], "--augment random_apply"),
        (["--augment", "warp"], "--augment: jcnn.data.augment has no op 'warp'"),
        (["--augment", "_check_image"], "no op '_check_image'"),
        (["--augment", "random_translate"], "--augment random_translate: needs max_shift="),
        (["--augment", "random_hflip:q=1"], "--augment random_hflip: unknown setting q"),
        (["--augment", "random_hflip:p"], "--augment: cannot parse 'random_hflip:p'"),
        (["--augment", "random_hflip: =1"], "--augment: cannot parse 'random_hflip: =1'"),
        (["--augment", "mixup:num_classes=3"], "--augment mixup: unknown setting num_classes"),
        (["--augment", "mixup,cutmix"], "at most one of mixup and cutmix"),
        (["--augment", "random_hflip:p=0.5:p=0.2"], "--augment random_hflip: p given twice"),
        (["--augment", "random_crop:size=(28,28"], "--augment: cannot parse"),
        (["--recipe", "airbench95"], "--recipe: invalid choice: 'airbench95'"),
        (["--recipe", "mnist99", "--lr", "0.1"], "--recipe mnist99 sets --lr itself"),
        (
            ["--recipe", "airbench94", "--batch-size=512", "--augment", "random_hflip"],
            "--recipe airbench94 sets --batch-size, --augment itself; drop them",
        ),
        (
            ["--recipe", "airbench94", "--dataset", "mnist"],
            "--recipe airbench94 is built for cifar10 (32x32x3 images), not --dataset mnist "
            "(28x28x1 images)",
        ),
        (
            # ran: a recipe tuned for MNIST, on another dataset of the same shape, without a word
            ["--recipe", "mnist99", "--dataset", "fashion_mnist"],
            "--recipe mnist99 is built for mnist (its settings and published accuracy are for "
            "it), not --dataset fashion_mnist; add --recipe-any-dataset to train it there anyway",
        ),
        (["--recipe", "airbench94", "--dataset", "tfds:cifar100"], "built for cifar10 (its"),
        (["--recipe-any-dataset"], "--recipe-any-dataset: only with --recipe"),
        (["--recipe", "mnist99", "--model", "lenet5"], "--recipe mnist99 sets --model itself"),
        (["--recipe", "mnist99", "--clip-value", "1"], "--recipe mnist99 sets --clip-value"),
        (["--recipe", "airbench94", "--no-grad", "head/*"], "--recipe airbench94 sets --no-grad"),
        (["--no-grad", "conv1/*@-1"], "--no-grad: expected PATTERN or PATTERN@EPOCH with an epoch"),
        (["--no-grad", "conv1/*@x"], "got 'conv1/*@x'"),
        (["--no-grad", "conv1/*", "--no-grad", "conv1/*@2"], "--no-grad conv1/*: given twice"),
        (
            ["--dp-target-epsilon", "3", "--dp-noise-multiplier", "1"],
            "--dp-noise-multiplier and --dp-target-epsilon exclude each other",
        ),
        (["--dp-clip-norm", "0.5"], "--dp-clip-norm applies to DP-SGD only: add --dp-target-eps"),
        (["--dp-delta", "1e-6"], "--dp-delta applies to DP-SGD only"),
        (["--dp-sampling", "shuffle"], "--dp-sampling applies to DP-SGD only"),
        (["--dp-accountant", "pld"], "--dp-accountant applies to DP-SGD only"),
        (["--dp-noise-multiplier", "-1"], "--dp-noise-multiplier: expected a number >= 0"),
        (["--dp-target-epsilon", "0"], "--dp-target-epsilon: expected a positive number, got 0"),
        (["--dp-target-epsilon", "inf"], "--dp-target-epsilon: expected a positive number"),
        (["--dp-clip-norm", "0"], "--dp-clip-norm: expected a positive number, got 0"),
        (["--dp-delta", "1"], "--dp-delta: expected a number in (0, 1), got 1"),
        (["--dp-delta", "0"], "--dp-delta: expected a number in (0, 1), got 0"),
        (["--dp-sampling", "fixed"], "--dp-sampling: invalid choice: 'fixed'"),
        (
            ["--model", "resnet20", "--dp-target-epsilon", "3"],
            "--model resnet20 has BatchNorm (each example's gradient would depend on the "
            "others): add --group-norm",
        ),
        (["--model", "vgg11_bn", "--dp-noise-multiplier", "1"], "lenet5, lenet5_1998"),
        (["--dp-noise-multiplier", "1", "--devices", "1"], "--devices: DP-SGD trains on one"),
        (["--dp-noise-multiplier", "1", "--augment", "mixup:alpha=0.2"], "--augment: mixup and"),
        (["--dp-noise-multiplier", "1", "--augment", "random_hflip,cutmix"], "DP-SGD's clip"),
        (["--group-norm"], "--group-norm: --model lenet5 has no BatchNorm to replace"),
        (
            ["--recipe", "mnist99", "--dp-target-epsilon", "3"],
            "--recipe mnist99 trains without DP-SGD and keeps its BatchNorm; drop "
            "--dp-target-epsilon",
        ),
        # "--early-stopping needs a validation set (--val-split N)", which the recipe refuses
        (
            ["--recipe", "mnist99", "--early-stopping", "2", "--eval-every-steps", "5"],
            "--recipe mnist99 trains on all its training images, without a validation set "
            "(--val-split); drop --early-stopping, --eval-every-steps",
        ),
    ],
)
def test_bad_flags_are_one_line_errors(argv, says, capsys, tmp_path):
    code, err = _main([*argv, "--out", str(tmp_path / "run")], capsys)
    assert code == 2, err
    _assert_one_line(err)
    assert says in err
    assert not (tmp_path / "run").exists()


def test_recipe_on_another_dataset_when_asked_says_so(capsys, tmp_path):
    """--recipe-any-dataset lets a recipe train on another dataset of its shape, with a note."""
    from jcnn.train.cli import main

    argv = ["--recipe", "mnist99", "--dataset", "fashion_mnist", "--recipe-any-dataset"]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--limit-train", "100", "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert info.value.code == 2
    assert "mnist99 trains on batches of 128, got 100 images" in err  # past the dataset check
    assert "note: --recipe mnist99 was built for mnist; training it on fashion_mnist" in out


@pytest.mark.parametrize(
    "argv, says",
    [
        (["--augment", "random_crop:padding=-1"], "--augment random_crop:padding=-1: padding"),
        (["--limit-train", "100000"], "--limit-train 100000: the synthetic training set has only"),
        (["--batch-size", "1024"], "--batch-size 1024: larger than the 512 training images"),
        (
            ["--recipe", "airbench94"],
            "--recipe airbench94: images: airbench94 is built for cifar10 images (N, 32, 32, 3), "
            "got shape (512, 28, 28, 1)",
        ),
        (
            ["--lr", "1e308"],  # infinite in float32: named as the flag, not as the schedule
            "--lr: expected a finite number >= 0 within float32's range",
        ),
        (
            ["--recipe", "mnist99", "--limit-train", "100"],
            "--recipe mnist99: images: mnist99 trains on batches of 128, got 100 images",
        ),
        (
            ["--no-grad", "conv9/*@1"],
            "--no-grad: pattern(s) ['conv9/*'] match no parameter; the parameters: conv1/bias, "
            "conv1/kernel, conv2/bias",
        ),
        (
            ["--batch-size", "512", "--dp-target-epsilon", "0.0001"],  # every image every step
            "--dp-target-epsilon: 0.0001 is not reached by any noise multiplier up to 1000 in 4 "
            "steps at sampling_rate=1.0",
        ),
    ],
)
def test_bad_values_found_once_the_data_is_loaded(argv, says, capsys, tmp_path):
    code, err = _main(["--dataset", "synthetic", *argv, "--out", str(tmp_path / "run")], capsys)
    assert code == 2, err
    _assert_one_line(err)
    assert says in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("dataset", ["mnist", "fashion_mnist", "cifar10"])
def test_missing_dataset_names_data_dir_and_the_download_location(dataset, capsys, tmp_path):
    from jcnn.data.fetch import SOURCES

    empty = tmp_path / "data"
    empty.mkdir()
    argv = ["--dataset", dataset, "--data-dir", str(empty), "--out", str(tmp_path / "run")]
    code, err = _main(argv, capsys)  # with --data-dir nothing is downloaded
    assert code == 1
    _assert_one_line(err)
    assert f"jcnn-data download {dataset} --data-dir" in err and str(empty) in err
    assert any(mirror in err for mirror in SOURCES[dataset].mirrors)
    code, err = _main([*argv[:2], "--data-dir", str(tmp_path / "nowhere")], capsys)
    assert code == 1 and "--data-dir" in err and "no such folder" in err
    _assert_one_line(err)
    assert not (tmp_path / "run").exists() and list(empty.iterdir()) == []


@pytest.mark.parametrize("mirrors", ["ftp://mirror.lan/", "http://127.0.0.1:99999/"])
def test_a_bad_mirror_list_to_download_from_is_one_line(mirrors, capsys, tmp_path, monkeypatch):
    """With no files in the cache jcnn-train downloads; a bad $JCNN_DATA_MIRRORS was a traceback."""
    monkeypatch.setenv("JCNN_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JCNN_DATA_MIRRORS", mirrors)
    code, err = _main(["--dataset", "mnist", "--out", str(tmp_path / "run")], capsys)
    assert code == 2, err
    _assert_one_line(err)
    assert "JCNN_DATA_MIRRORS:" in err and mirrors in err
    assert not (tmp_path / "run").exists()
    assert not (tmp_path / "cache" / "mnist").exists()


SMALL = [
    "--model",
    "lenet5_1998",
    "--dataset",
    "synthetic",
    "--limit-train",
    "128",
    "--batch-size",
    "64",
    "--epochs",
    "1",
    "--optimizer",
    "momentum",
    "--schedule",
    "constant",
    "--no-progress",
]


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from jcnn.train.cli import main

    out = tmp_path_factory.mktemp("cli") / "run"
    assert main([*SMALL, "--out", str(out)]) == 0
    return out


def _copy_run(small_run, tmp_path):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(small_run, copy)
    return copy


def _snapshot(folder):
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_clip_value_is_recorded_and_another_one_does_not_resume(tmp_path, capsys):
    # jcnn-train had no flag for it (train.optimizer's clip_value); what it does to the
    # gradients is tested through fit in tests/train/test_loop.py
    out = tmp_path / "run"
    argv = [*SMALL_SYNTHETIC, "--batch-size", "32", "--out", str(out), "--clip-value", "0.5"]
    assert _main([*argv, "--no-progress"], capsys)[0] == 0
    train = json.loads((out / "config.json").read_text())["train"]
    assert train["clip_value"] == 0.5 and train["clip_norm"] is None
    argv[-1] = "0.25"
    code, err = _main([*argv, "--no-progress", "--resume"], capsys)
    assert code != 0 and "--clip-value: 0.5 in the run, 0.25 now" in err


@pytest.mark.parametrize(
    "flags, ratio",
    [
        (["--schedule", "exponential", "--decay-rate", "0.5"], np.exp(-0.5)),
        (["--schedule", "step", "--step-epochs", "1", "--step-factor", "0.25"], 0.25),
    ],
)
def test_decay_rate_and_step_factor_set_the_schedule(tmp_path, capsys, flags, ratio):
    # jcnn-train had no flag for them: --schedule exponential and inverse_time decayed at k = 0.1
    # per epoch and step at a factor of 0.1, whatever the researcher wanted
    out = tmp_path / "run"
    argv = [*SMALL_SYNTHETIC, "--epochs", "2", "--batch-size", "32", "--out", str(out), *flags]
    assert _main([*argv, "--no-progress"], capsys)[0] == 0
    rates = [entry["learning_rate"] for entry in json.loads((out / "history.json").read_text())]
    # each epoch records the rate its last step left for the next: one epoch in, --lr 0.001 times
    # e^(-k) for exponential, times the factor for a step at epoch 1
    assert rates[0] == pytest.approx(0.001 * ratio, rel=1e-5)
    train = json.loads((out / "config.json").read_text())["train"]
    assert (train["decay_rate"], train["step_factor"]) == (
        (0.5, 0.1) if "--decay-rate" in flags else (0.1, 0.25)
    )


def test_config_json_records_the_command_line_settings(small_run):
    record = json.loads((small_run / "config.json").read_text())
    settings = record["settings"]
    assert settings["model"] == "lenet5_1998" and settings["dataset"] == "synthetic"
    assert (settings["limit_train"], settings["batch_size"], settings["train_images"]) == (
        128,
        64,
        128,
    )
    assert settings["augment"] == "" and settings["num_classes"] == 10
    assert settings["train_data"]["images"].startswith("array(128, 28, 28, 1) uint8 sha256:")
    assert settings["train_data"]["labels"].startswith("array(128,) int32 sha256:")
    assert record["train"]["learning_rate"] == 0.001 and record["train"]["seed"] == 0
    assert record["train"]["standardize"] == "per_channel" and record["train"]["val_split"] is None
    assert record["model"]["original"] is True


@pytest.mark.parametrize(
    "extra, named",
    [
        (["--lr", "0.01"], "--lr: 0.001 in the run, 0.01 now"),
        (["--batch-size", "32"], "--batch-size: 64 in the run, 32 now"),
        (["--model", "lenet5"], "--model"),
        (["--limit-train", "256"], "--limit-train: 128 in the run, 256 now"),
        (["--seed", "1"], "--seed"),
        (["--augment", "random_hflip"], "--augment"),
        (["--optimizer", "nesterov"], "--optimizer"),
        (["--val-split", "32"], "--val-split: null in the run, 32 now"),
    ],
)
def test_resume_with_other_flags_is_refused_naming_them(small_run, tmp_path, capsys, extra, named):
    run = _copy_run(small_run, tmp_path)
    before = _snapshot(run)
    argv = [*SMALL, *extra, "--out", str(run), "--resume"]
    code, err = _main(argv, capsys)
    assert code == 3, err
    _assert_one_line(err)
    assert "cannot --resume" in err and named in err and len(err) < 800
    assert _snapshot(run) == before  # config.json not overwritten


def test_used_folder_needs_resume_or_overwrite(small_run, tmp_path, capsys):
    run = _copy_run(small_run, tmp_path)
    before = _snapshot(run)
    code, err = _main([*SMALL, "--out", str(run)], capsys)
    assert code == 3
    _assert_one_line(err)
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err
    assert _snapshot(run) == before
    import shutil

    shutil.rmtree(run / "checkpoints")
    before = _snapshot(run)
    code, err = _main([*SMALL, "--out", str(run), "--resume"], capsys)
    assert code == 3 and "nothing to resume" in err and "checkpoints are gone" in err
    _assert_one_line(err)
    assert _snapshot(run) == before
    code, err = _main([*SMALL, "--out", str(tmp_path / "new"), "--resume"], capsys)
    assert code == 3 and "does not exist" in err
    assert not (tmp_path / "new").exists()


def test_a_resume_that_would_shorten_the_run_names_the_flag(tmp_path, capsys):
    # with a constant rate --epochs and --max-steps may change on resume, but not below what the
    # run has trained: the refusal names the flag (it said "max_steps=1", fit's spelling)
    run = tmp_path / "run"
    flags = [*SMALL, "--schedule", "constant", "--epochs", "2"]
    assert _main([*flags, "--out", str(run)], capsys)[0] == 0
    before = _snapshot(run)
    for extra, named in (
        (["--max-steps", "1"], "--max-steps"),
        (["--epochs", "1"], "--epochs"),
    ):
        code, err = _main([*flags, *extra, "--out", str(run), "--resume"], capsys)
        assert code == 3, err
        _assert_one_line(err)
        assert "already trained" in err and named in err and "config." not in err
        assert _snapshot(run) == before


def test_second_process_on_the_same_out_fails_at_once(tmp_path, capsys):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from jcnn.train import run_folder; "
            "run_folder.claim(sys.argv[1]); print('locked', flush=True); time.sleep(600)",
            str(tmp_path / "run"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(tmp_path / "run")
        code, err = _main([*SMALL, "--out", str(tmp_path / "run")], capsys)
        assert code == 3
        _assert_one_line(err)
        assert "in use by another process" in err and f"pid {holder.pid}" in err
        assert _snapshot(tmp_path / "run") == before
    finally:
        holder.kill()
        holder.wait()


def test_out_that_is_a_file_and_a_corrupt_dataset(tmp_path, capsys):
    taken = tmp_path / "file"
    taken.write_text("x")
    code, err = _main(["--dataset", "synthetic", "--out", str(taken)], capsys)
    assert code == 3 and "is not a directory" in err and "--out" in err
    _assert_one_line(err)
    assert taken.read_text() == "x"
    data_dir = tmp_path / "data" / "mnist"
    data_dir.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        (data_dir / name).write_bytes(b"not gzip")
    argv = ["--dataset", "mnist", "--data-dir", str(tmp_path / "data")]
    code, err = _main([*argv, "--out", str(tmp_path / "run")], capsys)
    assert code == 1
    _assert_one_line(err)
    assert "train-images-idx3-ubyte.gz" in err and "gzip" in err
    assert not (tmp_path / "run").exists()


def test_ctrl_c_is_one_line_saying_how_to_go_on(tmp_path, capsys, monkeypatch):
    # Ctrl-C printed a traceback from wherever training was (XLA, orbax) and exited with -2
    from jcnn.train import loop
    from jcnn.train.checkpoint import CheckpointManager

    out = tmp_path / "run"
    argv = [*SMALL_SPLIT, "--epochs", "1", "--checkpoint-every-steps", "1", "--out", str(out)]

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(loop, "fit", interrupt)
        code, err = _main(argv, capsys)
    assert code == 130 and err == f"jcnn-train: interrupted; the run had not started (--out {out})"

    with monkeypatch.context() as patch:  # Ctrl-C before the first checkpoint
        patch.setattr(CheckpointManager, "save", interrupt)
        code, err = _main(argv, capsys)
    assert code == 130 and err == (
        "jcnn-train: interrupted; no checkpoint yet; start again with --overwrite (it deletes "
        f"the run's files) (--out {out})"
    )

    save, saves = CheckpointManager.save, []

    def save_once(self, *args, **kwargs):
        if saves:  # Ctrl-C once the first checkpoint is written
            raise KeyboardInterrupt
        saves.append(args[0])
        return save(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(CheckpointManager, "save", save_once)
        code, err = _main([*argv, "--overwrite"], capsys)
    assert code == 130, err
    _assert_one_line(err)
    assert err == (
        f"jcnn-train: interrupted; --resume (other flags the same) continues from step "
        f"{saves[0]} (--out {out})"
    )
    assert _main([*argv, "--resume"], capsys)[0] == 0
    assert (out / "summary.json").exists()

    (out / "checkpoints" / "index.json").write_text("{")
    with monkeypatch.context() as patch:
        patch.setattr(loop, "fit", interrupt)
        code, err = _main([*argv, "--resume"], capsys)
    assert code == 130, err
    _assert_one_line(err)
    assert (
        err.startswith("jcnn-train: interrupted; its checkpoints cannot be read (")
        and "index.json" in err
    )


# --- validation split, jcnn-eval, tfds:NAME ---

SMALL_SPLIT = [
    "--model",
    "lenet5_1998",
    "--dataset",
    "synthetic",
    "--limit-train",
    "256",
    "--batch-size",
    "64",
    "--no-progress",
]


def test_val_split_run_then_jcnn_eval(tmp_path, capsys):
    from jcnn.train.cli import main
    from jcnn.train.eval_cli import main as eval_main

    out = tmp_path / "run"
    args = [*SMALL_SPLIT, "--epochs", "2", "--val-split", "64", "--eval-every-steps", "2"]
    assert main([*args, "--max-steps", "5", "--early-stopping", "10", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [3, 5]  # 192 training images: 3 steps per epoch
    assert all(h["val_accuracy"] is not None and "test_accuracy" not in h for h in history)
    assert summary["final_val_accuracy"] == history[-1]["val_accuracy"]
    assert 0 <= summary["test_accuracy"] <= 1 and "test_loss" in summary
    assert summary["host_memory"] == native.host_memory()
    assert (out / "standardize.npz").exists()
    config = json.loads((out / "config.json").read_text())["train"]
    assert config["val_split"] == 64 and config["callbacks"] == [
        "<jcnn.train.callbacks.EarlyStopping>"
    ]
    capsys.readouterr()

    assert eval_main([str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"synthetic test: accuracy {summary['test_accuracy']:.4f}" in printed
    assert printed.count("  class ") == 10
    report = json.loads((out / "evaluation.json").read_text())
    assert report["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert report["step"] == 5 and np.sum(report["confusion_matrix"]) == 256
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    png = tmp_path / "best.png"
    assert eval_main([str(out), "--which", "best", "--confusion", str(png)]) == 0
    assert png.exists()


def test_jcnn_eval_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    from jcnn.train.eval_cli import main as eval_main

    assert eval_main([str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "jcnn-eval:" in error and "is not a jcnn run folder" in error
    assert list(tmp_path.iterdir()) == []


def test_jcnn_eval_mistakes_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch):
    from jcnn.train import cli
    from jcnn.train.eval_cli import main as eval_main

    out = tmp_path / "run"
    assert cli.main([*SMALL_SPLIT, "--epochs", "1", "--max-steps", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in out.iterdir())

    def check(args, code, says):
        assert eval_main([str(out), *args]) == code
        err = capsys.readouterr().err.strip()
        assert err.startswith("jcnn-eval: ") and "\n" not in err and "Traceback" not in err, err
        assert re.search(says, err), err
        assert sorted(p.name for p in out.iterdir()) == before

    check(["--split", "validation"], 2, "split: expected 'train' or 'test' for synthetic")
    check(["--dataset", "mnist", "--data-dir", str(tmp_path / "none")], 1, "t10k-images")
    check(["--json", str(tmp_path / "none" / "e.json")], 2, "--json .*its folder does not exist")
    check(["--confusion", str(tmp_path)], 2, "--confusion .*is a folder")
    check(["--which", "\u00b2"], 2, "which")  # a digit that is not a decimal step
    # load_run's and data.load's refusals in the command's terms, not their arguments'
    check(["--which", "99"], 2, r"^jcnn-eval: --which: no checkpoint at step 99; have \[1\]$")
    check(["--which", "first"], 2, r"^jcnn-eval: --which: expected 'latest', 'best' or a step")
    check(
        ["--which", "best"],
        2,
        r"^jcnn-eval: --which best: .* has no best checkpoint .*; use --which latest$",
    )
    check(["--split", "validation"], 2, r"^jcnn-eval: --split: expected 'train' or 'test'")
    # flags that would be ignored: the run's dataset is synthetic
    check(["--manual-dir", str(tmp_path)], 2, "^jcnn-eval: --manual-dir applies to --dataset tfds")
    check(["--data-dir", str(tmp_path)], 2, "^jcnn-eval: --data-dir: --dataset synthetic is gene")
    colour = (np.zeros((8, 32, 32, 3), np.uint8), np.zeros(8, np.int32))
    monkeypatch.setattr(cli, "load_dataset", lambda *args, **kwargs: colour)
    check([], 2, r"synthetic test: images: expected .*\(8, 32, 32, 3\)")
    for size in ("0", "-5"):
        with pytest.raises(SystemExit) as exit:
            eval_main([str(out), "--batch-size", size])
        assert exit.value.code == 2
        assert f"--batch-size: expected a positive integer, got {size}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, says",
    [
        ([], "the following arguments are required: folder"),
        (["run", "--batch-size", "0"], "argument --batch-size: expected a positive integer, got 0"),
        (["run", "--dataset", "imagenet"], "argument --dataset: expected one of mnist"),
        (["run", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_jcnn_eval_usage_errors_are_one_line(argv, says, capsys):
    # argparse printed its usage block before the error, unlike jcnn-train
    from jcnn.train.eval_cli import main as eval_main

    with pytest.raises(SystemExit) as exit:
        eval_main(argv)
    err = capsys.readouterr().err.strip()
    assert exit.value.code == 2 and err.startswith("jcnn-eval: error: ") and "\n" not in err, err
    assert says in err


def test_jcnn_eval_ctrl_c_is_one_line(tmp_path, capsys, monkeypatch):
    from jcnn.train import runs
    from jcnn.train.eval_cli import main as eval_main

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "load_run", interrupt)
    assert eval_main([str(tmp_path)]) == 130
    assert capsys.readouterr().err == "jcnn-eval: interrupted\n"
    assert list(tmp_path.iterdir()) == []


def test_paths_starting_with_a_tilde_are_in_the_home_folder(tmp_path, capsys, monkeypatch):
    # --out=~/run (which the shell leaves alone) wrote a folder named "~" in the current one, and
    # --out "" trained into the default folder
    from jcnn.train.cli import main
    from jcnn.train.eval_cli import main as eval_main

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, err = _main([*SMALL_SPLIT, "--epochs", "1", "--out", ""], capsys)
    assert code == 2 and err.strip() == "jcnn-train: error: --out: expected a run folder, got ''"
    assert list(tmp_path.iterdir()) == []
    assert main([*SMALL_SPLIT, "--epochs", "1", "--max-steps", "1", "--out=~/run"]) == 0
    assert (tmp_path / "home" / "run" / "summary.json").exists()
    assert eval_main(["~/run", "--json", "~/evaluation.json", "--confusion", "~/c.png"]) == 0
    assert (tmp_path / "home" / "evaluation.json").exists()
    assert (tmp_path / "home" / "c.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["home"]


def test_jcnn_eval_refuses_a_dataset_it_cannot_load(tmp_path, capsys):
    # --dataset foo (or a dataset name a run trained through fit recorded, e.g. 'toy') exited
    # with status 1, meant for a missing dataset, and a message without 'jcnn-eval:'
    from jcnn.train import cli
    from jcnn.train.eval_cli import main as eval_main

    out = tmp_path / "run"
    assert cli.main([*SMALL_SPLIT, "--epochs", "1", "--max-steps", "1", "--out", str(out)]) == 0
    capsys.readouterr()
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(SystemExit) as exit:
        eval_main([str(out), "--dataset", "foo"])
    assert exit.value.code == 2
    assert "--dataset: expected one of mnist" in capsys.readouterr().err
    description = json.loads((out / "run.json").read_text())
    description["metadata"]["dataset"] = "toy"
    (out / "run.json").write_text(json.dumps(description))
    assert eval_main([str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jcnn-eval: ") and "\n" not in err, err
    assert "records the dataset 'toy', which jcnn-eval cannot load; name one with --dataset" in err
    assert sorted(p.name for p in out.iterdir()) == before


def test_bad_val_split_is_refused_and_writes_nothing(tmp_path, capsys):

    out = tmp_path / "run"
    code, err = _main([*SMALL_SPLIT, "--val-split", "256", "--out", str(out)], capsys)
    assert code == 2
    _assert_one_line(err)
    assert "asks for 256 validation examples, but the training set has only 256" in err
    assert err.startswith("jcnn-train: error: --val-split: 256 asks"), err  # not val_split
    assert not out.exists()
    code, err = _main([*SMALL_SPLIT, "--val-split", "0.9", "--out", str(out)], capsys)
    assert code == 2 and not out.exists()
    assert "--val-split: 0.9 leaves 26 training examples, fewer than the batch size 64" in err
    # a split taking every image is named before the batch size (it was "--batch-size 128:
    # larger than the 10 training images")
    small = [*SMALL_SPLIT, "--limit-train", "10", "--batch-size", "128", "--val-split", "10"]
    code, err = _main([*small, "--out", str(out)], capsys)
    assert code == 2 and not out.exists()
    assert err.startswith("jcnn-train: error: --val-split: 10 asks for 10 validation"), err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--val-split", "ten"])
    assert build_parser().parse_args(["--val-split", "0.1"]).val_split == 0.1
    assert build_parser().parse_args(["--val-split", "500"]).val_split == 500


def test_tfds_dataset_names_reach_tensorflow_datasets(tmp_path, monkeypatch, capsys):
    from jcnn import data
    from jcnn.train.cli import _synthetic, main
    from jcnn.train.eval_cli import main as eval_main

    calls = []

    def fake_load_tfds(name, split, *, data_dir=None, manual_dir=None):
        calls.append((name, split, data_dir, manual_dir))
        return _synthetic(split, 0)

    monkeypatch.setattr(data, "load_tfds", fake_load_tfds)
    out = tmp_path / "run"
    (tmp_path / "downloads").mkdir()
    monkeypatch.chdir(tmp_path)
    source = ["--data-dir", "prepared", "--manual-dir", "downloads"]
    args = [
        *SMALL_SPLIT[:2],
        "--dataset",
        "tfds:toy",
        *SMALL_SPLIT[4:],
        "--max-steps",
        "2",
        *source,
    ]
    assert main([*args, "--out", str(out)]) == 0
    assert calls == [
        ("toy", "train", "prepared", "downloads"),
        ("toy", "test", "prepared", "downloads"),
    ]
    assert json.loads((out / "run.json").read_text())["metadata"]["dataset"] == "tfds:toy"
    assert eval_main([str(out)]) == 0
    assert calls[-1] == ("toy", "test", "prepared", "downloads")
    assert "tfds:toy test: accuracy" in capsys.readouterr().out


def test_an_unknown_tfds_name_is_a_one_line_error_in_both_commands(tmp_path, monkeypatch, capsys):
    # tensorflow-datasets' DatasetNotFoundError (a ValueError) escaped jcnn-train as a traceback
    # listing every dataset tfds knows
    from jcnn import data
    from jcnn.train.eval_cli import main as eval_main

    def unknown(name, split, *, data_dir=None, manual_dir=None):
        raise ValueError(f"name: expected a tensorflow-datasets dataset name, got {name!r}")

    monkeypatch.setattr(data, "load_tfds", unknown)
    args = [*SMALL_SPLIT[:2], "--dataset", "tfds:nope", *SMALL_SPLIT[4:]]
    code, err = _main([*args, "--out", str(tmp_path / "run")], capsys)
    assert code == 1, err
    _assert_one_line(err)
    assert "--dataset tfds:nope: expected a tensorflow-datasets dataset name, got 'nope'" in err
    assert not (tmp_path / "run").exists()

    run = tmp_path / "trained"
    assert _main([*SMALL_SPLIT, "--max-steps", "1", "--out", str(run)], capsys)[0] == 0
    assert eval_main([str(run), "--dataset", "tfds:nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "jcnn-eval: --dataset: expected a tensorflow-datasets dataset name, got 'nope'"
    ), err


@pytest.mark.slow
def test_tfds_fashion_mnist_prepared_offline_trains(tmp_path):
    """Fashion-MNIST prepared by tensorflow-datasets from the local files (no network)."""
    pytest.importorskip("tensorflow", reason="the tfds route needs the extra: pip install .[tfds]")
    pytest.importorskip("tensorflow_datasets", reason="the tfds route needs: pip install .[tfds]")
    from jcnn import data
    from jcnn.train.cli import main

    manual = data.default_data_dir() / "fashion_mnist"
    prepared = tmp_path / "tfds"
    data.load_tfds(
        "fashion_mnist",
        "test",
        data_dir=prepared,
        manual_dir=manual,
        download_options={"max_examples_per_split": 2000},
    )
    out = tmp_path / "run"
    args = ["--model", "lenet5_1998", "--dataset", "tfds:fashion_mnist", "--data-dir"]
    rest = ["--limit-train", "512", "--max-steps", "4", "--batch-size", "64", "--no-progress"]
    assert main([*args, str(prepared), *rest, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["test_accuracy"] <= 1


def test_recipe_runs_into_a_run_folder_and_reports_it(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--recipe", "mnist99", "--dataset", "synthetic", "--no-progress", "--out", str(out)]
    code, _ = _main([*argv, "--epochs", "1"], capsys)
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 1 and summary["steps"] == 4  # 512 synthetic images, batches of 128
    assert f"test accuracy {summary['test_accuracy']:.4f}" in printed or summary["test_accuracy"]
    record = json.loads((out / "config.json").read_text())
    assert record["settings"]["recipe"] == {"name": "mnist99", "steps": 4}
    assert record["model"]["class"] == "jcnn.models.fast_mnist.FastMNISTNet"
    # the run's metadata named the --model default (lenet5) beside the recipe's network
    metadata = json.loads((out / "run.json").read_text())["metadata"]
    assert metadata["recipe"] == "mnist99" and metadata["model"] is None
    assert record["train"]["label_smoothing"] == 0.1
    assert (out / "standardize.npz").exists()  # the recipe's statistics, for load_run
    # the recipe's length is a setting of the run: a resume with another one is refused
    code, err = _main([*argv, "--epochs", "2", "--resume"], capsys)
    assert code == 3, err
    assert (
        "--epochs (the steps of the recipe, whose schedules depend on them): 4 in the run, 8 now"
        in err
    )
    # the recipe's optimizer, built for those steps, differs with them: not a second difference
    assert "--optimizer" not in err and len(err) < 300, err


def test_batch_norm_models_are_the_ones_listed():
    import jax
    import jax.numpy as jnp

    from jcnn import models
    from jcnn.train.cli import BATCH_NORM_MODELS, MODELS

    for name, (attribute, kwargs) in MODELS.items():
        model = getattr(models, attribute)(num_classes=10, **kwargs)
        shape = (1, 28, 28, 1) if name.startswith("lenet") else (1, 32, 32, 3)
        variables = jax.eval_shape(
            lambda m=model, s=shape: m.init(jax.random.key(0), jnp.zeros(s), train=False)
        )
        assert ("batch_stats" in variables) == (name in BATCH_NORM_MODELS), name


def test_dp_run_reports_epsilon_and_refuses_a_resume_with_other_dp_flags(tmp_path, capsys):
    from jcnn.analysis import dp_epsilon
    from jcnn.train.cli import main

    out = tmp_path / "run"
    dp = ["--dp-noise-multiplier", "1.1", "--dp-clip-norm", "0.5", "--dp-sampling", "shuffle"]
    assert main([*SMALL, *dp, "--dp-delta", "1e-4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "history.json").read_text())
    expected = dp_epsilon(1.1, 64 / 128, 2, 1e-4)
    assert history[-1]["epsilon"] == summary["epsilon"] == expected
    assert f"epsilon {expected:.3f} (delta 0.0001)" in printed.splitlines()[-1]
    assert "epsilon" in printed.splitlines()[0]  # the epoch's line
    record = json.loads((out / "config.json").read_text())
    assert record["train"]["dp_noise_multiplier"] == 1.1
    assert record["train"]["dp_clip_norm"] == 0.5 and record["train"]["dp_delta"] == 1e-4
    assert record["train_loader"]["sampling"] == "shuffle"
    assert record["settings"]["group_norm"] is False
    before = _snapshot(out)
    for extra, named in [
        (["--dp-clip-norm", "0.7"], "--dp-clip-norm: 0.5 in the run, 0.7 now"),
        (["--dp-sampling", "poisson"], "--dp-sampling: shuffle in the run, poisson now"),
        (["--dp-delta", "1e-5"], "--dp-delta: 0.0001 in the run, 1e-05 now"),
    ]:
        argv = [*SMALL, *dp, "--dp-delta", "1e-4", *extra, "--out", str(out), "--resume"]
        code, err = _main(argv, capsys)
        assert code == 3, err
        _assert_one_line(err)
        assert named in err
    code, err = _main([*SMALL, "--out", str(out), "--resume"], capsys)  # without DP
    assert code == 3 and "--dp-noise-multiplier: 1.1 in the run, null now" in err
    assert _snapshot(out) == before


def test_recipe_names_of_the_parser_are_the_recipes():
    from jcnn.train import recipes
    from jcnn.train.cli import RECIPE_NAMES

    assert RECIPE_NAMES == {recipe.name: recipe.summary for recipe in recipes.RECIPES}


def test_no_grad_flags_reach_fit_and_the_record(tmp_path, capsys):
    import jax
    import jax.numpy as jnp
    import optax

    from jcnn.train import TrainState, load_run

    out = tmp_path / "run"
    argv = [*SMALL, "--epochs", "2", "--no-grad", "conv1/*", "--no-grad", "fc*/bias@1"]
    code, err = _main([*argv, "--optimizer", "sgd", "--out", str(out)], capsys)
    assert code == 0, err
    record = json.loads((out / "config.json").read_text())
    assert record["train"]["no_grad"] == {"conv1/*": 0, "fc*/bias": 1}
    run = load_run(out)
    key = jax.random.key_data(jax.random.fold_in(jax.random.key(0), 4))  # fit's model stream
    start = TrainState.create(run.model, optax.sgd(0.1), key, jnp.zeros((1, 28, 28, 1)))
    params = run.variables["params"]
    # plain SGD from the run's seed: the parameters without a gradient never moved
    for name in ("kernel", "bias"):
        np.testing.assert_array_equal(params["conv1"][name], start.params["conv1"][name])
    assert not np.array_equal(params["conv2"]["kernel"], start.params["conv2"]["kernel"])


def test_a_batch_size_the_devices_do_not_divide_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    import jax

    monkeypatch.setattr(jax, "device_count", lambda: 3)
    out = tmp_path / "run"
    code, err = _main(["--devices", "3", "--batch-size", "64", "--out", str(out)], capsys)
    assert code == 2, err
    _assert_one_line(err)
    assert "--batch-size 64: expected a multiple of --devices 3 (each batch is split evenly" in err
    assert not out.exists()


def test_devices_that_do_not_divide_the_test_set_still_evaluate_all_of_it(tmp_path):
    # 256 synthetic test images over 3 devices: the test loader was built with the training
    # sharding and a batch of 256, which the Loader refused with a traceback before any step
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=3"
    env.pop(CRASH_AFTER_STEP_ENV, None)
    # this checkout's jcnn, not an installed one
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    argv = [*ARGS[:4], "--limit-train", "96", "--epochs", "1", "--batch-size", "96"]
    code = "import sys; from jcnn.train.cli import main; sys.exit(main())"
    run = subprocess.run(
        [sys.executable, "-c", code, *argv, "--devices", "3", "--no-progress"]
        + ["--out", str(tmp_path / "run")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 <= summary["test_accuracy"] <= 1


def test_a_relative_data_dir_is_recorded_so_jcnn_eval_finds_it_from_another_folder(
    tmp_path, monkeypatch, capsys
):
    # run.json kept --data-dir as typed ("mydata"): jcnn-eval run from any other folder looked
    # for the dataset in its own ./mydata and failed (or downloaded it again)
    from jcnn import data
    from jcnn.train.cli import _synthetic, main
    from jcnn.train.eval_cli import main as eval_main

    calls = []

    def fake_load(name, split, *, data_dir=None, download=False):
        calls.append((name, split, data_dir))
        return _synthetic(split, 0)

    monkeypatch.setattr(data, "load", fake_load)
    (tmp_path / "train_here" / "mydata").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "train_here")
    out = tmp_path / "run"
    args = [*SMALL_SPLIT[:2], "--dataset", "mnist", *SMALL_SPLIT[4:], "--max-steps", "1"]
    assert main([*args, "--data-dir", "mydata", "--out", str(out)]) == 0
    assert calls[-1] == ("mnist", "test", "mydata")
    recorded = json.loads((out / "run.json").read_text())["metadata"]["data_dir"]
    assert recorded == str(tmp_path / "train_here" / "mydata")
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert eval_main([str(out)]) == 0
    assert calls[-1] == ("mnist", "test", str(tmp_path / "train_here" / "mydata"))
    assert "mnist test: accuracy" in capsys.readouterr().out


def test_an_augment_that_changes_the_image_size_is_refused_in_flag_terms(tmp_path, capsys):
    # random_resized_crop:size=(32,32) on 28x28 images trained on 32x32 inputs, then failed at
    # the test set with "test_loader: expected batches ... fc1 (Dense)"; an op chain that comes
    # back to the images' size is fine
    from jcnn.train.cli import main

    out = tmp_path / "run"
    for spec in ("random_resized_crop:size=(32,32)", "random_crop:size=24,random_hflip"):
        with pytest.raises(SystemExit) as raised:
            main([*SMALL_SPLIT, "--max-steps", "1", "--augment", spec, "--out", str(out)])
        assert raised.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"jcnn-train: error: --augment {spec}: turns the 28x28x1 training")
        assert "test images stay 28x28x1" in err and "\n" not in err
        assert not out.exists()
    back = "random_resized_crop:size=(32,32),random_crop:size=(28,28)"
    assert main([*SMALL_SPLIT, "--max-steps", "1", "--augment", back, "--out", str(out)]) == 0


def test_recipe_run_records_no_model_or_batch_size_of_the_flags_and_resumes_old_records(
    tmp_path, capsys
):
    # config.json's settings of an airbench94 or mnist99 run said model "lenet5" and batch_size
    # 128: the defaults of --model and --batch-size, which a recipe refuses and does not use
    out = tmp_path / "run"
    argv = ["--recipe", "mnist99", "--dataset", "synthetic", "--no-progress", "--out", str(out)]
    code, err = _main([*argv, "--epochs", "1"], capsys)
    assert code == 0, err
    record = json.loads((out / "config.json").read_text())
    assert record["settings"]["model"] is None and record["settings"]["batch_size"] is None
    assert record["train_loader"]["batch_size"] == 128  # the recipe's, recorded where it applies
    # a folder recorded before (the flags' defaults there) resumes as the same run
    record["settings"].update(model="lenet5", batch_size=128)
    (out / "config.json").write_text(json.dumps(record))
    code, err = _main([*argv, "--epochs", "1", "--resume"], capsys)
    assert code == 0, err
