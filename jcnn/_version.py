"""The installed distribution's version, read from its metadata (one source: pyproject.toml)."""

from __future__ import annotations

from importlib import metadata

UNKNOWN = "0+unknown"


def installed_version(distribution: str = "jcnn") -> str:
    """The version of ``distribution`` as installed, or ``UNKNOWN`` (``"0+unknown"``, a valid
    PEP 440 version lower than every release) when it is not installed, e.g. a source tree put on
    ``PYTHONPATH`` without ``pip install``.
    """
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return UNKNOWN
