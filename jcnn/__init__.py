"""jcnn: convolutional networks in JAX, pure functions first."""

from jcnn import analysis, data, functional, init, models, native, nn, train

__version__ = "0.1.0"

__all__ = [
    "analysis",
    "data",
    "functional",
    "init",
    "models",
    "native",
    "nn",
    "train",
    "__version__",
]
