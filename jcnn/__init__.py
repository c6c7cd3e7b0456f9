"""jcnn: convolutional networks in JAX, pure functions first."""

from jcnn import analysis, data, functional, init, models, native, nn, nnx, train
from jcnn._version import installed_version as _installed_version

__version__ = _installed_version()

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
