"""The plumbing shared by the experiment scripts (experiments/_common.py)."""

import re

import pytest

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def common(load_experiment):
    return load_experiment("_common")


def test_out_and_data_dir_are_checked_before_any_work(common, tmp_path, capsys):
    # --out naming a file (or a path under one) was accepted, and the page failed to be written
    # with a raw traceback after the whole experiment had run; a missing --data-dir failed at the
    # first load with a traceback. Each is now one argparse line naming the flag, status 2
    a_file = tmp_path / "page.md"
    a_file.write_text("kept")
    for argv, message in (
        (["--out", str(a_file)], f"argument --out: {a_file}: expected a folder, got a file$"),
        (["--out", str(a_file / "sub")], f"--out: {a_file / 'sub'}: .* got a file \\({a_file} is"),
        (["--data-dir", str(tmp_path / "missing")], "argument --data-dir: .*no such folder"),
        (["--data-dir", str(a_file)], "expected a datasets folder, got a file"),
        (["--out", ""], "argument --out: expected a folder, got ''$"),  # was the current folder
    ):
        with pytest.raises(SystemExit) as exit_info:
            common.parse_args("test", argv)
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.splitlines()[-1]
        assert re.search(message, last), last
    assert a_file.read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["page.md"]
    args = common.parse_args("test", ["--out", str(tmp_path / "new" / "folder")])
    assert args.out == tmp_path / "new" / "folder" and args.data_dir is None
    assert common.parse_args("test", ["--data-dir", str(tmp_path)]).data_dir == str(tmp_path)


def test_a_seed_out_of_range_is_refused_before_any_work(common, capsys):
    # --seed -1 ran until np.random.default_rng refused it (standardization) and a seed past 64
    # bits until jax.random.key overflowed, each with a traceback from inside the run
    for text in ("-1", str(2**32), str(2**64), "1.5", "x"):
        with pytest.raises(SystemExit) as exit_info:
            common.parse_args("test", ["--seed", text])
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.splitlines()[-1]
        assert last.endswith(f"argument --seed: expected an int in [0, 2**32), got '{text}'"), last
    assert common.parse_args("test", ["--seed", str(2**32 - 1)]).seed == 2**32 - 1


def test_an_out_starting_with_a_tilde_is_in_the_home_folder(common, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert common.parse_args("test", ["--out", "~/pages"]).out == tmp_path / "pages"


def test_a_page_that_fails_to_write_leaves_the_earlier_one_whole(common, tmp_path):
    # Page.write saved each figure in place and then the page: a figure that failed to render
    # left the earlier figures overwritten beside the earlier page (a mixed, half-new result)
    import argparse

    import matplotlib.pyplot as plt

    args = argparse.Namespace(out=tmp_path, quick=True)
    first = common.Page("probe", "Probe", args)
    first.text("earlier result")
    first.figure(plt.figure(), "a", "a")
    first.figure(plt.figure(), "b", "b")
    first.write()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["probe.md", "probe_a.png", "probe_b.png"]

    broken = plt.figure()
    broken.savefig = lambda *a, **k: (_ for _ in ()).throw(OSError("disk full"))
    second = common.Page("probe", "Probe", args)
    second.text("later result")
    fig = plt.figure()
    fig.add_subplot().plot([0, 1])
    second.figure(fig, "a", "a")
    second.figure(broken, "b", "b")
    with pytest.raises(OSError, match="disk full"):
        second.write()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_the_page_records_the_arguments_main_was_called_with(common, tmp_path, monkeypatch):
    # The command line was sys.argv, so `main(["--seed", "7", ...])` called from Python (a
    # notebook, the smoke test) wrote a page whose command neither named its seed nor --quick
    monkeypatch.setattr("sys.argv", ["pytest", "-q"])
    args = common.parse_args("test", ["--quick", "--seed", "7", "--out", str(tmp_path / "a b")])
    common.Page("probe", "Probe", args).write()
    page = (tmp_path / "a b" / "probe.md").read_text()
    expected = f"Command: `python experiments/probe.py --quick --seed 7 --out '{tmp_path}/a b'`"
    assert expected in page, page


def test_an_empty_data_dir_is_refused(common, capsys):
    # --data-dir '' passed the folder check as the current folder (Path("") is "."), and the
    # run then looked for the datasets wherever it was started
    with pytest.raises(SystemExit) as exit_info:
        common.parse_args("test", ["--data-dir", ""])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith("argument --data-dir: expected a datasets folder, got ''"), last


def test_figure_path_refuses_a_folder_and_a_path_under_a_file(common, tmp_path):
    import argparse

    a_file = tmp_path / "file"
    a_file.write_text("kept")
    for text in (str(tmp_path), "", str(a_file / "sub" / "f.png")):
        with pytest.raises(argparse.ArgumentTypeError, match="expected a file path for the fig"):
            common.figure_path(text)
    assert common.figure_path(str(tmp_path / "new" / "f.png")) == tmp_path / "new" / "f.png"


def test_a_missing_dataset_ends_the_run_with_loads_message(common, tmp_path):
    # load raised data.load's FileNotFoundError through the script: its message (where it
    # looked, how to download) came at the end of a traceback from inside jcnn.data
    args = common.parse_args("test", ["--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        common.load(args, "cifar10", "test", 10)
    message = exit_info.value.code
    assert isinstance(message, str), message
    assert message.startswith("cifar10 (test): expected") and str(tmp_path) in message, message
    assert "jcnn-data download cifar10" in message, message
