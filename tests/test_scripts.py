"""Every console script jcnn installs answers ``--help`` with its usage and exit status 0."""

import importlib.metadata

import pytest

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
