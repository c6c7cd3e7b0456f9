"""A griffe extension for the API reference (``mkdocs.yml``): render docstring doctests as code.

jcnn's docstrings put their doctests under ``Example:`` or bare after the description; griffe's
Google parser only knows ``Examples:`` sections, so elsewhere ``>>>`` lines would be read as
Markdown (nested quotes, ``[...]`` outputs taken for cross-references). This renames ``Example:``
to ``Examples:``, fences every other run of doctest lines as a ``pycon`` block, and splits an
argument entry that documents several parameters at once (``stride, padding: ...``) into one
entry per parameter, as the Google style expects.
"""

from __future__ import annotations

import re

import griffe

_HEADER = re.compile(r"^(\s*)([A-Z][A-Za-z ]*):\s*$")
_GROUPED = re.compile(r"^(\s+)(\w+(?:,\s*\w+)+):\s*(.*)$")


def fence_doctests(text: str) -> str:
    """``text`` with ``Example:`` headers renamed and bare doctest runs fenced."""
    lines = text.splitlines()
    out: list[str] = []
    examples_indent = None
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        header = _HEADER.match(line)
        if examples_indent is not None and stripped and indent <= examples_indent:
            examples_indent = None
        grouped = _GROUPED.match(line)
        if grouped and examples_indent is None:
            pad, names, rest = grouped.groups()
            names = [n.strip() for n in names.split(",")]
            out.extend(f"{pad}{name}: {rest}" for name in names[:-1])
            out.append(f"{pad}{names[-1]}: {rest}")
            i += 1
            continue
        if header and header.group(2) in ("Example", "Examples"):
            out.append(f"{header.group(1)}Examples:")
            examples_indent = len(header.group(1))
            i += 1
            continue
        if stripped.startswith(">>>") and examples_indent is None:
            pad = line[:indent]
            out.append(f"{pad}```pycon")
            while i < len(lines) and lines[i].strip():
                out.append(lines[i])
                i += 1
            out.append(f"{pad}```")
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


class DoctestBlocks(griffe.Extension):
    """Applies :func:`fence_doctests` to every docstring griffe loads."""

    def on_object(self, *, obj, loader, **kwargs) -> None:  # noqa: ARG002 - griffe's hook
        if obj.docstring is not None:
            obj.docstring.value = fence_doctests(obj.docstring.value)
