"""jcnn: convolutional networks in JAX, pure functions first."""

import importlib as _importlib

from jcnn import analysis, data, functional, init, models, native, nn, train
from jcnn._version import installed_version as _installed_version

__version__ = _installed_version()
native.host_memory()  # set before JAX's first computation starts its threads (jcnn.native.memory)


def __getattr__(name: str):
    # jcnn.nnx needs Flax >= 0.12 (the rest of jcnn less): it is imported on first use.
    if name == "nnx":
        return _importlib.import_module("jcnn.nnx")
    raise AttributeError(f"module 'jcnn' has no attribute {name!r}")


__all__ = [
    "analysis",
    "data",
    "functional",
    "init",
    "models",
    "native",
    "nn",
    "nnx",
    "train",
    "__version__",
]
