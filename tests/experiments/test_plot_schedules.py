"""experiments/plot_schedules.py: the user guide's figure of every schedule."""

import pytest

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def script(load_experiment):
    return load_experiment("plot_schedules")


def test_help_writes_nothing_and_out_chooses_the_file(script, tmp_path, monkeypatch, capsys):
    # the script read no arguments: --help (or any typo) overwrote docs/figures/schedules.png
    monkeypatch.setattr(script, "FIGURE", tmp_path / "default.png")
    with pytest.raises(SystemExit) as stopped:
        script.main(["--help"])
    assert stopped.value.code == 0 and "--out" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        script.main(["--outt", str(tmp_path / "typo.png")])
    assert list(tmp_path.iterdir()) == []
    script.main(["--out", str(tmp_path / "figure.png")])
    assert (tmp_path / "figure.png").read_bytes().startswith(b"\x89PNG")


def test_an_out_that_cannot_be_the_figure_is_refused_before_any_work(script, tmp_path, capsys):
    # --out took any path: a folder, '' (the current folder) or a path under a file failed with
    # a traceback from the final write, after the figure was drawn
    a_file = tmp_path / "file"
    a_file.write_text("kept")
    for out, got in (
        (str(tmp_path), f"'{tmp_path}'"),
        ("", "''"),
        (str(a_file / "f.png"), f"'{a_file / 'f.png'}' ({a_file} is a file)"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            script.main(["--out", out])
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.splitlines()[-1]
        assert last.endswith(f"argument --out: expected a file path for the figure, got {got}")
    assert [p.name for p in tmp_path.iterdir()] == ["file"]
