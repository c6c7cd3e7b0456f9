"""jcnn-train end to end: a run killed mid-epoch and resumed equals an unbroken run, bit for bit."""

import json
import os
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest

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


def test_killed_and_resumed_run_is_bitwise_identical(tmp_path):
    full, broken = tmp_path / "full", tmp_path / "broken"
    done = _cli(full)
    assert done.returncode == 0, done.stderr[-3000:]
    killed = _cli(broken, crash_after=7)
    assert killed.returncode == 17, killed.stderr[-3000:]
    assert CheckpointManager(broken / "checkpoints").latest_step() == 6
    resumed = _cli(broken, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step_00000006" in resumed.stdout

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
    failed = _cli(full, "--resume")
    assert failed.returncode == 3
    assert "cannot resume" in failed.stderr and "step_00000008 is corrupt" in failed.stderr


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
    with pytest.raises(SystemExit, match="no op 'warp'"):
        _augmenters("warp", 10)
    with pytest.raises(SystemExit, match="cannot parse"):
        _augmenters("random_translate:max_shift=two", 10)


# --- validation split, jcnn-eval, tfds:NAME ---

SMALL = [
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
    args = [*SMALL, "--epochs", "2", "--val-split", "64", "--eval-every-steps", "2"]
    assert main([*args, "--max-steps", "5", "--early-stopping", "10", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert [h["step"] for h in history] == [3, 5]  # 192 training images: 3 steps per epoch
    assert all(h["val_accuracy"] is not None and "test_accuracy" not in h for h in history)
    assert summary["final_val_accuracy"] == history[-1]["val_accuracy"]
    assert 0 <= summary["test_accuracy"] <= 1 and "test_loss" in summary
    assert (out / "standardize.npz").exists()
    config = json.loads((out / "config.json").read_text())
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


def test_bad_val_split_is_refused_and_writes_nothing(tmp_path, capsys):
    from jcnn.train.cli import main

    out = tmp_path / "run"
    assert main([*SMALL, "--val-split", "256", "--out", str(out)]) == 2
    assert "asks for 256 validation examples, but the training set has only 256" in (
        capsys.readouterr().err
    )
    assert not out.exists()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--val-split", "ten"])
    assert build_parser().parse_args(["--val-split", "0.1"]).val_split == 0.1
    assert build_parser().parse_args(["--val-split", "500"]).val_split == 500
    with pytest.raises(SystemExit, match="--early-stopping: needs a validation set"):
        main([*SMALL, "--early-stopping", "3", "--out", str(out)])
    with pytest.raises(SystemExit, match="or tfds:NAME"):
        main([*SMALL[:2], "--dataset", "imagenet", "--out", str(out)])


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
    source = ["--data-dir", "prepared", "--manual-dir", "downloads"]
    args = [*SMALL[:2], "--dataset", "tfds:toy", *SMALL[4:], "--max-steps", "2", *source]
    assert main([*args, "--out", str(out)]) == 0
    assert calls == [
        ("toy", "train", "prepared", "downloads"),
        ("toy", "test", "prepared", "downloads"),
    ]
    assert json.loads((out / "run.json").read_text())["metadata"]["dataset"] == "tfds:toy"
    assert eval_main([str(out)]) == 0
    assert calls[-1] == ("toy", "test", "prepared", "downloads")
    assert "tfds:toy test: accuracy" in capsys.readouterr().out


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
