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
