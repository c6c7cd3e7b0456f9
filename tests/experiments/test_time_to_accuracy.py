"""experiments/time_to_accuracy.py: its arguments and the run folders it reads."""

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def script(load_experiment):
    return load_experiment("time_to_accuracy")


def _run_folder(folder: Path, recipe="mnist99", seed=3) -> Path:
    folder.mkdir(parents=True)
    history = [{"seconds": 2.0, "test_accuracy": 0.98}, {"seconds": 2.5, "test_accuracy": 0.99}]
    summary = {"test_accuracy": 0.991, "wall_seconds": 9.0, "command": "jcnn-train ..."}
    config = {"train": {"seed": seed}, "settings": {"recipe": {"name": recipe}}}
    for name, value in (("summary", summary), ("history", history), ("config", config)):
        (folder / f"{name}.json").write_text(json.dumps(value))
    return folder


def test_a_run_folder_is_read_as_a_run(script, tmp_path):
    record = script.from_run_folder(_run_folder(tmp_path / "run"))
    assert record["recipe"] == "mnist99" and record["seed"] == 3 and record["epochs"] == 2
    assert record["accuracy"] == 0.991 and record["wall"] == 9.0
    assert record["epoch_seconds"] == [2.0, 2.5] and record["curve"] == [0.98, 0.99]


def test_repeats_and_unreadable_folders_are_refused_before_any_run(script, tmp_path):
    # a seed, recipe or folder given twice was run (or read) twice and counted as two runs
    # towards the goals' run counts; a folder that is not a run stopped with a raw traceback
    run = _run_folder(tmp_path / "run")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{}")
    for argv, message in (
        (["--seeds", "1", "2", "1"], "--seeds: each at most once, got 1 twice"),
        (["--recipes", "mnist99", "mnist99"], "--recipes: each at most once, got mnist99"),
        (["--from-runs", str(run), str(tmp_path / "." / "run")], "--from-runs: each at most once"),
        (["--from-runs", str(tmp_path / "none")], "none: not a finished run folder"),
        (["--recipes", "mnist98"], "--recipes: expected names of airbench94, mnist99"),
    ):
        with pytest.raises(SystemExit, match=message):
            script.parse_args(argv)
    with pytest.raises(SystemExit, match=r"broken: unreadable run record .*history\.json"):
        script.from_run_folder(tmp_path / "broken")
    config = json.loads((run / "config.json").read_text())
    config["settings"]["recipe"]["name"] = "resnet9"
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match="a run of recipe 'resnet9', expected one of"):
        script.from_run_folder(run)


def test_negative_seeds_and_an_airbench94_with_nothing_to_show_are_refused(script, tmp_path):
    # --seeds -1 stopped with a raw ValueError from inside the first run; --recipes airbench94
    # alone trained nothing (no seed by default) and wrote a page without a run
    with pytest.raises(SystemExit, match="--seeds: expected ints >= 0, got 2 -1"):
        script.parse_args(["--seeds", "2", "-1"])
    # a seed past 64 bits stopped with a ValueError from inside the first run, after the data
    with pytest.raises(
        SystemExit, match=r"--seeds: expected ints < 2\*\*32, got 0 18446744073709551616"
    ):
        script.parse_args(["--seeds", "0", str(2**64)])
    with pytest.raises(SystemExit, match="--recipes airbench94: no run by default .* --seeds"):
        script.parse_args(["--recipes", "airbench94"])
    assert script.parse_args(["--recipes", "airbench94", "--seeds", "0"]).seeds == [0]
    assert script.parse_args(["--recipes", "airbench94", "--quick"]).recipes == ["airbench94"]
    run = _run_folder(tmp_path / "run", recipe="airbench94")
    assert script.parse_args(["--recipes", "airbench94", "--from-runs", str(run)]).from_runs


def test_help_lists_every_flag_and_seed_is_not_taken_for_seeds(script, capsys):
    # --recipes, --seeds and --from-runs were parsed apart and missing from --help, and --seed 3
    # (which this script does not use) was read as the abbreviation --seeds 3
    with pytest.raises(SystemExit):
        script.parse_args(["--help"])
    usage = capsys.readouterr().out
    for flag in ("--recipes", "--seeds", "--from-runs", "--quick", "--data-dir"):
        assert flag in usage
    with pytest.raises(SystemExit, match="--seed: this script runs one recipe run per seed"):
        script.parse_args(["--seed", "3", "--quick"])
    assert script.parse_args(["--seeds", "3", "--quick"]).seeds == [3]


@pytest.mark.parametrize(
    "file, key, value, says",
    [
        ("summary", "test_accuracy", None, "test_accuracy: expected a number in"),
        ("summary", "test_accuracy", 5.0, "test_accuracy: expected a number in"),
        ("summary", "wall_seconds", "12", "wall_seconds: expected seconds, got '12'"),
        ("history", "seconds", None, r"history\.json \[0\] seconds: expected seconds, got None"),
    ],
)
def test_a_run_record_with_values_the_page_cannot_use_is_refused(
    script, tmp_path, file, key, value, says
):
    # a missing accuracy was shown as "None" in the table, and a missing or text time stopped
    # the page with a raw NumPy TypeError after every other run had been read or trained
    run = _run_folder(tmp_path / "run")
    record = json.loads((run / f"{file}.json").read_text())
    for entry in record if isinstance(record, list) else [record]:
        entry[key] = value
    (run / f"{file}.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match=f"run: unreadable run record .*{says}"):
        script.from_run_folder(run)


def test_the_mean_says_how_many_of_its_runs_used_tta(script):
    # the label was taken from the first run alone: a run without TTA first called a mean over
    # TTA accuracies "no TTA"
    runs = [{"accuracy_tta": value} for value in (None, 0.94, 0.95)]
    assert script.tta_label(runs) == "with TTA in 2 of 3 runs, without in the others"
    assert script.tta_label(runs[1:]) == "with TTA"
    assert script.tta_label(runs[:1]) == "no TTA"


def test_every_dataset_is_found_before_the_first_run(script, tmp_path, monkeypatch):
    # Each run read its dataset when it started: with CIFAR-10 there and MNIST not,
    # `--recipes airbench94 mnist99` trained airbench94 (an hour a run) and then stopped with
    # a traceback from inside jcnn.data

    def train_one(*args, **kwargs):
        raise AssertionError("a recipe ran before every dataset was found")

    monkeypatch.setattr(script, "train_one", train_one)
    monkeypatch.setattr(script._common, "load", _only_cifar10(script._common.load))
    argv = ["--recipes", "airbench94", "mnist99", "--seeds", "0", "--data-dir", str(tmp_path)]
    with pytest.raises(SystemExit, match=r"mnist \(train\): expected"):
        script.main([*argv, "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


def _only_cifar10(load):
    """``_common.load`` as if the data folder held CIFAR-10 and nothing else."""

    def fake(args, name, split, limit=None):
        if name == "cifar10":
            return None
        return load(args, name, split, limit)

    return fake


def test_a_recipe_ending_mid_epoch_shows_its_epochs_and_a_whole_epoch_s_time(script, tmp_path):
    # mnist99 trains 1.2 epochs (563 steps of 469): the page said "2" epochs and took the median
    # of a whole epoch's 6 s and the last 0.2 epoch's 1.2 s as the time of an epoch (3.6 s)
    run = _run_folder(tmp_path / "run")
    history = [
        {"step": 469, "seconds": 6.0, "test_accuracy": None},
        {"step": 563, "seconds": 1.2, "test_accuracy": 0.99},
    ]
    (run / "history.json").write_text(json.dumps(history))
    config = json.loads((run / "config.json").read_text())
    config["train_loader"] = {"batches_per_epoch": 469}
    (run / "config.json").write_text(json.dumps(config))
    record = script.from_run_folder(run)
    assert record["epochs"] == 2 and record["epoch_fractions"][0] == 1.0
    assert record["epoch_fractions"][1] == pytest.approx(94 / 469)
    script.main(["--from-runs", str(run), "--out", str(tmp_path / "page")])
    page = (tmp_path / "page" / "time_to_accuracy.md").read_text()
    row = next(line for line in page.splitlines() if line.startswith("| 3 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[3] == "1.2" and float(cells[4]) == pytest.approx(6.0, rel=0.01)
    assert float(cells[5]) == pytest.approx(7.2)


@pytest.mark.parametrize(
    "changes, says",
    [
        ({"dataset": "fashion_mnist"}, "on --dataset fashion_mnist, expected one on all of mnist"),
        ({"dataset": "synthetic"}, "on --dataset synthetic, expected"),
        ({"dataset": "mnist", "limit_train": 1024}, "on --dataset mnist --limit-train 1024"),
    ],
)
def test_a_run_on_another_or_part_of_the_dataset_is_refused(script, tmp_path, changes, says):
    # jcnn-train --recipe mnist99 --dataset fashion_mnist --recipe-any-dataset (or --limit-train)
    # was counted towards mnist99's mean and goals beside the published figures
    run = _run_folder(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["settings"].update(changes)
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=says):
        script.from_run_folder(run)
    config["settings"].update(dataset="mnist", limit_train=None)
    (run / "config.json").write_text(json.dumps(config))
    assert script.from_run_folder(run)["accuracy"] == 0.991


def test_a_resumed_run_has_no_wall_time_and_the_time_goal_is_not_judged(script, tmp_path):
    # its summary's wall time is its last process's: a resumed mnist99 run met the 20 s goal
    # on the seconds after the resume alone
    folder = _run_folder(tmp_path / "run")
    summary = json.loads((folder / "summary.json").read_text())
    summary["command"] = "jcnn-train --recipe mnist99 --seed 3 --resume"
    (folder / "summary.json").write_text(json.dumps(summary))
    record = script.from_run_folder(folder)
    assert record["wall"] is None
    verdict = script.goal_verdict("mnist99", [0.991, 0.992], [9.0, None])
    assert "per run: not measured (1 of 2 run(s) without a wall time" in verdict
    assert "**met** (slowest" in script.goal_verdict("mnist99", [0.991], [9.0])


def test_two_runs_of_one_seed_are_refused_before_any_run(script, tmp_path, monkeypatch):
    # two --from-runs folders of one seed, or a folder and --seeds with its seed, were counted as
    # two runs towards "at least 3 runs with different seeds"
    def train_one(*args, **kwargs):
        raise AssertionError("a recipe ran before the seeds were checked")

    monkeypatch.setattr(script, "train_one", train_one)
    first, second = _run_folder(tmp_path / "a", seed=3), _run_folder(tmp_path / "b", seed=3)
    out = tmp_path / "out"
    for argv in (
        ["--from-runs", str(first), str(second)],
        ["--from-runs", str(first), "--recipes", "mnist99", "--seeds", "1", "3"],
    ):
        with pytest.raises(SystemExit, match=r"mnist99 seed\(s\) 3 twice or more"):
            script.main([*argv, "--out", str(out)])
    assert not out.exists()
    other = _run_folder(tmp_path / "c", recipe="airbench94", seed=3)
    script.main(["--from-runs", str(first), str(other), "--out", str(out)])
    assert (out / "time_to_accuracy.md").exists()


@pytest.mark.parametrize(
    "steps, trained, says",
    [
        (47, 47, "for 47 steps \\(--epochs\\), expected its own 1.2 epochs \\(563 steps of 469"),
        (563, 400, "stopped after 400 of its 563 steps"),
    ],
)
def test_a_run_of_another_length_or_unfinished_is_refused(script, tmp_path, steps, trained, says):
    # jcnn-train --recipe mnist99 --epochs 1 (or a run stopped early) was counted towards
    # mnist99's mean and goals beside the published figures
    run = _run_folder(tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    config["settings"]["recipe"]["steps"] = steps
    config["train_loader"] = {"batches_per_epoch": 469}
    (run / "config.json").write_text(json.dumps(config))
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "steps": trained}))
    with pytest.raises(SystemExit, match=says):
        script.from_run_folder(run)
    config["settings"]["recipe"]["steps"] = 563
    (run / "config.json").write_text(json.dumps(config))
    (run / "summary.json").write_text(json.dumps({**summary, "steps": 563}))
    assert script.from_run_folder(run)["accuracy"] == 0.991
