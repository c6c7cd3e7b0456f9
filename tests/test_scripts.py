"""Every console script jcnn installs answers ``--help`` with its usage and exit status 0."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPTS = {
    entry.name: entry
    for entry in importlib.metadata.distribution("jcnn").entry_points
    if entry.group == "console_scripts"
}


def test_the_scripts_are_installed():
    assert {"jcnn-train", "jcnn-eval", "jcnn-data", "jcnn-build-native"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_prints_usage_and_exits_zero(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        SCRIPTS[name].load()(["--help"])
    assert exit_info.value.code == 0
    assert f"usage: {name}" in capsys.readouterr().out


def test_a_reader_that_leaves_early_ends_the_command_quietly(tmp_path):
    # `jcnn-data list | head -1` ended with Python's BrokenPipeError traceback
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    try:
        done = subprocess.run(
            [sys.executable, "-m", "jcnn.data.fetch", "list"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            cwd=tmp_path,
            env={**os.environ, "JCNN_DATA_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)},
        )
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr, done.stderr
