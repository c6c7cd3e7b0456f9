"""experiments/augment_grid.py: its arguments are checked before any work."""

import builtins
import re
from pathlib import Path

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


def test_an_empty_data_dir_is_refused(script, tmp_path, capsys):
    # --data-dir '' passed the folder check as the current folder (Path("") is ".")
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--data-dir", "", "--out", str(tmp_path / "grid.png")])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.endswith("argument --data-dir: expected a datasets folder, got ''"), last
    assert list(tmp_path.iterdir()) == []


def test_a_figure_that_fails_to_write_leaves_the_earlier_one_whole(script, tmp_path, monkeypatch):
    # The figure was saved in place: a write that stopped half way (a full disk) left a
    # truncated PNG where the earlier figure was
    figure = tmp_path / "grid.png"
    figure.write_bytes(b"earlier figure")
    real_open = builtins.open

    def full_disk_at_the_figure(file, mode="r", *args, **kwargs):
        if Path(file) == figure and "w" in mode:
            with real_open(file, mode) as partial:
                partial.write(b"\x89PNG half")
            raise OSError(28, "No space left on device")
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk_at_the_figure)
    monkeypatch.setattr(script, "PER_EXAMPLE", {"original": lambda key, image: image})
    monkeypatch.setattr(script, "BATCH", {})
    try:
        script.main(["--images", "1", "--out", str(figure)])
    except OSError:
        pass
    written = figure.read_bytes()  # the earlier figure or a whole new one, never half of one
    assert written == b"earlier figure" or written.startswith(b"\x89PNG\r\n\x1a\n"), written[:20]
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]
