"""jcnn.__version__ (jcnn/_version.py) and what a distribution ships with it: the version is the
installed metadata's, with a PEP 440 fallback; LICENSE and py.typed are packaged."""

import re
from importlib import metadata, resources
from pathlib import Path

import pytest

import jcnn
from jcnn._version import UNKNOWN, installed_version

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_the_installed_distributions():
    Version = pytest.importorskip("packaging.version").Version
    assert jcnn.__version__ == metadata.version("jcnn")
    Version(jcnn.__version__)  # a valid PEP 440 version


def test_version_falls_back_when_not_installed():
    Version = pytest.importorskip("packaging.version").Version
    assert installed_version("jcnn-not-an-installed-distribution") == UNKNOWN
    assert Version(UNKNOWN) < Version("0.0.1")


def test_license_and_typing_marker_ship_with_the_package():
    project = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^license = "Apache-2.0"$', project, flags=re.M)
    license_text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
    package_data = project.split("[tool.setuptools.package-data]", 1)[1].split("\n[", 1)[0]
    assert re.search(r'^"jcnn" = \[.*"py\.typed".*\]$', package_data, flags=re.M)
    assert (ROOT / "jcnn" / "py.typed").is_file()
    assert resources.files("jcnn").joinpath("py.typed").is_file()


def test_build_backend_floor_reads_the_license_string():
    # `license = "Apache-2.0"` (an SPDX expression, PEP 639) is valid from setuptools 77 on;
    # setuptools 68-76, which the floor allowed, refuse the whole pyproject.toml ("`project.license`
    # must be valid exactly by one definition") where build isolation does not fetch a newer one
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)
    floors = [
        re.fullmatch(r"setuptools\s*>=\s*(\d+)(?:\.\d+)*", requirement)
        for requirement in project["build-system"]["requires"]
    ]
    assert [int(floor.group(1)) for floor in floors if floor] >= [77], floors
