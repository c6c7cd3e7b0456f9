"""experiments/augment_grid.py: its arguments are checked before any work."""

import re

import pytest

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def script(load_experiment):
    return load_experiment("augment_grid")


def test_bad_arguments_are_one_line_naming_the_flag(script, tmp_path, capsys):
    # --images 0 drew an empty figure grid and failed inside matplotlib; --images 1500 indexed
    # past the 10,000 test images; --out naming a folder failed at the end, after the work
    figure = str(tmp_path / "grid.png")
    for argv, message in (
        (["--images", "0"], r"argument --images: expected an int in \[1, 1429\], got 0"),
        (["--images", "1430"], r"argument --images: expected an int in \[1, 1429\], got 1430"),
        (["--out", str(tmp_path)], "argument --out: expected a file path for the figure"),
        (["--out", ""], "argument --out: expected a file path for the figure, got ''"),
        (["--data-dir", str(tmp_path / "none")], "argument --data-dir: no such folder"),
        (["--seed", "-1", "--out", figure], r"argument --seed: expected an int in \[0, 2\*\*32\)"),
        (["--seed", str(2**64), "--out", figure], r"argument --seed: expected an int in \[0, 2"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            script.main(argv)
        assert exit_info.value.code == 2
        last = capsys.readouterr().err.splitlines()[-1]
        assert re.search(message, last), last
    assert list(tmp_path.iterdir()) == []
