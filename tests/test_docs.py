"""The documentation: every ``python`` code block of ``docs/`` and the README runs, and the site
builds with ``mkdocs build --strict``.

Blocks of a page run in order in one namespace (a page reads like one session), in a temporary
working directory. A block that cannot run here (it needs a file or a network the suite does not
have) is marked on the line before its fence with ``<!-- skip: reason -->``; such blocks are few
and each names its reason.
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").rglob("*.md")) + [ROOT / "README.md"]
SKIP = re.compile(r"<!--\s*skip:\s*(\S.*?)\s*-->")
MAX_SKIPPED = 6


def code_blocks(path: Path):
    """``(line, source, skip_reason)`` for each fenced ``python`` block of a Markdown file."""
    lines = path.read_text().splitlines()
    blocks, i, previous = [], 0, ""
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped == "```python":
            indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
            start, body = i + 1, []
            i += 1
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
                i += 1
            skip = SKIP.search(previous)
            reason = skip.group(1) if skip else None
            blocks.append((start, textwrap.dedent("\n".join(body)), reason))
        if stripped:
            previous = stripped
        i += 1
    return blocks


def _data_dir():
    shared = ROOT.parent / "shared" / "data"
    directory = Path(os.environ.get("JCNN_DATA_DIR") or shared)
    return directory if directory.is_dir() else None


PAGES_WITH_CODE = [p for p in PAGES if code_blocks(p)]


def test_the_collector_sees_the_pages_and_few_skips():
    names = {p.relative_to(ROOT).as_posix() for p in PAGES_WITH_CODE}
    assert {"README.md", "docs/data.md", "docs/training.md", "docs/analysis.md"} <= names
    skipped = [
        (p.name, line, reason) for p in PAGES for line, _, reason in code_blocks(p) if reason
    ]
    assert len(skipped) <= MAX_SKIPPED, skipped


def test_code_blocks_parse_including_the_skipped_ones():
    for page in PAGES_WITH_CODE:
        for line, source, _ in code_blocks(page):
            compile(source, f"{page}:{line}", "exec")


@pytest.mark.parametrize("page", PAGES_WITH_CODE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_code_blocks_run(page, tmp_path, monkeypatch):
    blocks = code_blocks(page)
    if any("data.load" in source for _, source, reason in blocks if not reason):
        directory = _data_dir()
        if directory is None:
            if os.environ.get("JCNN_REQUIRE_DATA") == "1":
                pytest.fail("the page loads datasets: set JCNN_DATA_DIR")
            pytest.skip("the page loads datasets: set JCNN_DATA_DIR")
        monkeypatch.setenv("JCNN_DATA_DIR", str(directory))
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for line, source, reason in blocks:
        if reason:
            continue
        try:
            exec(compile(source, f"{page.name}:{line}", "exec"), namespace)
        except Exception as error:  # noqa: BLE001 - re-raised with the block's location
            raise AssertionError(
                f"{page.relative_to(ROOT)}: the code block at line {line} raised "
                f"{type(error).__name__}: {error}"
            ) from error


def test_mkdocs_build_strict(tmp_path):
    """The site builds without a warning (broken links, references or docstrings fail)."""
    if shutil.which("mkdocs") is None and not _has_module("mkdocs"):
        if os.environ.get("JCNN_REQUIRE_DOCS") == "1":
            pytest.fail("mkdocs is not installed: pip install -e '.[docs]'")
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "api" / "functional" / "index.html").exists()


def _has_module(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None
