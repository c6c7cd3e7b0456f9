"""The documentation: every ``python`` code block of ``docs/`` and the README runs, and the site
builds with ``mkdocs build --strict``.

Blocks of a page run in order in one namespace (a page reads like one session), in a temporary
working directory. A block that cannot run here (it needs a file or a network the suite does not
have) is marked on the line before its fence with ``<!-- skip: reason -->``; such blocks are few
and each names its reason.
"""

import ast
import importlib
import inspect
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


# Modules and the aliases the pages import them as: a skipped block may stand for objects of the
# reader's (a loader, a PyTorch network), never for an import the page forgot
MODULE_NAMES = {"jcnn", "jax", "jnp", "np", "optax", "torch", "functools"}
MODULE_NAMES |= {"F", "A", "nn", "nnx", "init", "models", "data", "train", "analysis", "native"}


def _imported_and_used(source):
    bound, used = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            used.add(node.id)
    return bound, used


def test_skipped_blocks_import_the_modules_they_use():
    """A skipped block does not run, so nothing else notices ``jcnn.models`` used on a page that
    never imports ``jcnn``: a reader copying it gets a ``NameError``."""
    missing = []
    for page in PAGES_WITH_CODE:
        imported = set()
        for line, source, reason in code_blocks(page):
            bound, used = _imported_and_used(source)
            imported |= bound
            if reason:
                missing += [(page.name, line, n) for n in sorted(used & MODULE_NAMES - imported)]
    assert not missing, missing


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


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site built with ``mkdocs build --strict``: a warning (broken link, reference or
    docstring) fails the build."""
    if shutil.which("mkdocs") is None and not _has_module("mkdocs"):
        if os.environ.get("JCNN_REQUIRE_DOCS") == "1":
            pytest.fail("mkdocs is not installed: pip install -e '.[docs]'")
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    site_dir = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return site_dir


# The checks of the built site are one test: under pytest-xdist a module-scoped fixture is built
# once per worker that runs one of its tests, and each build of the site takes ~45 s.
def test_mkdocs_build_strict_and_the_api_reference_documents_every_public_name(site):
    assert (site / "index.html").exists()
    assert (site / "api" / "functional" / "index.html").exists()
    problems = [
        *(_missing_public_names(site, name) for name in API_PACKAGES),
        *(_missing_submodule_names(site, name) for name in API_SUBMODULE_PACKAGES),
    ]
    problems = [problem for problem in problems if problem]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "link, reported",
    [("other.md#no-such-heading", "anchor '#no-such-heading'"), ("missing.md", "missing.md")],
)
def test_strict_build_fails_on_a_broken_link_or_anchor(tmp_path, link, reported):
    """The project's ``mkdocs.yml`` (its validation settings) on a two-page site: a link to a
    heading that does not exist must fail ``--strict`` like a link to a missing page."""
    if not _has_module("mkdocs"):
        pytest.skip("mkdocs is not installed: pip install -e '.[docs]'")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "index.md").write_text(f"# Home\n\nSee [there]({link}).\n")
    (docs / "other.md").write_text("# Other\n\n## A heading\n")
    config = tmp_path / "mkdocs.yml"
    config.write_text(
        f"INHERIT: {ROOT / 'mkdocs.yml'}\ndocs_dir: {docs}\n"
        "nav: [index.md, other.md]\nplugins: [search]\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config)]
        + ["--site-dir", str(tmp_path / "site")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert reported in result.stderr


def _documented_as(package, name):
    """The anchors under which ``package.name`` may appear: its exported path, or the path of the
    module, function or class it is, or its name in the module that defines it (``silu``, an
    alias of ``swish``)."""
    obj = getattr(package, name)
    paths = {f"{package.__name__}.{name}"}
    if inspect.ismodule(obj):
        paths.add(obj.__name__)
    elif hasattr(obj, "__module__") and hasattr(obj, "__qualname__"):
        paths |= {f"{obj.__module__}.{obj.__qualname__}", f"{obj.__module__}.{name}"}
    else:
        paths |= {f"{module}.{name}" for module in _defining_modules(package, obj)}
    return paths


def _defining_modules(package, value):
    """Submodules of ``package`` that hold ``value`` as a module-level constant."""
    import pkgutil

    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        if any(v is value for v in vars(module).values()):
            yield module.__name__


API_PACKAGES = ["functional", "init", "nn", "nnx", "models", "data", "train", "analysis", "native"]
API_SUBMODULE_PACKAGES = [name for name in API_PACKAGES if name != "init"]  # init: one module


def _missing_public_names(site, package_name):
    """Each subpackage has an API page, and every name of its ``__all__`` has an entry there:
    what is not, as a message (empty if nothing)."""
    package = importlib.import_module(f"jcnn.{package_name}")
    page = site / "api" / package_name / "index.html"
    if not page.exists():
        return f"docs/api/{package_name}.md is missing (or not in mkdocs.yml's nav)"
    anchors = set(re.findall(r'id="([^"]+)"', page.read_text()))
    missing = [n for n in package.__all__ if not _documented_as(package, n) & anchors]
    return f"docs/api/{package_name}.md has no entry for {missing}" if missing else ""


def _missing_submodule_names(site, package_name):
    """A name in a public submodule's ``__all__`` (``jcnn.train.recipes.run_recipe``) and not in
    its package's has an entry on the package's API page too: what has not, as a message."""
    import pkgutil

    package = importlib.import_module(f"jcnn.{package_name}")
    page = site / "api" / package_name / "index.html"
    if not page.exists():
        return ""  # _missing_public_names names the missing page
    anchors = set(re.findall(r'id="([^"]+)"', page.read_text()))
    missing = []
    for info in pkgutil.iter_modules(package.__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        names = [n for n in getattr(module, "__all__", ()) if n not in package.__all__]
        for name in names:
            obj = getattr(module, name)
            paths = {f"{module.__name__}.{name}"}
            if hasattr(obj, "__module__") and hasattr(obj, "__qualname__"):
                paths.add(f"{obj.__module__}.{obj.__qualname__}")
            if not paths & anchors:
                missing.append(f"{module.__name__}.{name}")
    return f"docs/api/{package_name}.md has no entry for {missing}" if missing else ""


def _has_module(name):
    import importlib.util

    return importlib.util.find_spec(name) is not None


def test_readme_airbench94_figures_are_those_of_the_run_records():
    """The README's airbench94 accuracies (per seed, with and without TTA, and their mean) are
    the ``summary.json`` of the run records it cites, ``experiments/runs/airbench94-*``."""
    import json

    runs = sorted((ROOT / "experiments" / "runs").glob("airbench94-*"))
    summaries = [json.loads((run / "summary.json").read_text()) for run in runs]
    tta = [100 * s["test_accuracy_tta"] for s in summaries]
    plain = [100 * s["test_accuracy"] for s in summaries]
    row = next(
        r for r in (ROOT / "README.md").read_text().splitlines() if "--recipe airbench94`:" in r
    )
    quoted = re.search(r"over (\d+) seeds \(([\d., ]+)%; ([\d., ]+)% without\)", row)
    assert quoted, row
    assert int(quoted.group(1)) == len(runs)
    assert [float(v) for v in quoted.group(2).split(", ")] == [round(v, 2) for v in tta]
    assert [float(v) for v in quoted.group(3).split(", ")] == [round(v, 2) for v in plain]
    mean = re.search(r"\*\*mean ([\d.]+)%\*\*", row)
    assert float(mean.group(1)) == round(sum(tta) / len(tta), 2)


def test_training_page_lists_every_jcnn_train_flag():
    """The "Flags:" paragraph of ``docs/training.md`` names every flag of ``jcnn-train``
    (``--dp-*`` stands for the DP flags), and no flag that ``jcnn-train`` does not have."""
    from jcnn.train.cli import build_parser

    text = (ROOT / "docs" / "training.md").read_text()
    paragraph = text[text.index("Flags: `") : text.index("(`jcnn-train --help`")]
    listed = set(re.findall(r"--[a-z][a-z-]*[a-z]", paragraph))
    flags = {
        option
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    }
    covered = {f for f in flags if f in listed or (f.startswith("--dp-") and "--dp-*" in paragraph)}
    assert flags == covered, f"not listed: {sorted(flags - covered)}"
    assert listed <= flags, f"not flags of jcnn-train: {sorted(listed - flags)}"


def _documented_signature_problems(func, shown):
    """What differs between a signature written in the docs (``"key, image, *, p=0.5"``) and
    ``func``'s: parameter names and order, the keyword-only marker ``*``, and defaults."""
    params = [
        p for p in inspect.signature(func).parameters.values() if p.kind is not p.VAR_POSITIONAL
    ]
    parts = [a.strip() for a in re.split(r",\s*(?![^()]*\))", shown) if a.strip()]
    problems, keyword_only, i = [], False, 0
    for part in parts:
        if part == "*":
            keyword_only = True
            continue
        name, _, default = (s.strip() for s in part.partition("="))
        if i >= len(params) or params[i].name != name:
            there = params[i].name if i < len(params) else None
            problems.append(f"{name}: the parameter there is {there}")
            break
        param = params[i]
        if (param.kind is param.KEYWORD_ONLY) != keyword_only:
            problems.append(f"{name}: keyword-only is {param.kind is param.KEYWORD_ONLY}")
        if default and eval(default.split(" \\|")[0]) != param.default:
            problems.append(f"{name}: default {param.default!r}, shown {default}")
        i += 1
    return problems


def test_data_page_augmentation_table_shows_the_real_signatures():
    """Each signature in ``docs/data.md``'s table of augmentation ops is the op's own: a call
    written from the table (``A.random_translate(key, image, max_shift=2)``) runs."""
    from jcnn.data import augment as A

    text = (ROOT / "docs" / "data.md").read_text()
    table = text[text.index("| op | what it does |") :].split("\n\n")[0]
    first_cells = "\n".join(re.split(r" \| (?!\")", row)[0] for row in table.splitlines()[2:])
    shown = re.findall(r"`([a-z_]+)\(([^`]*)\)`", first_cells)
    assert len(shown) >= 15
    problems = {
        name: p
        for name, args in shown
        if name != "compose" and (p := _documented_signature_problems(getattr(A, name), args))
    }
    assert not problems, problems
