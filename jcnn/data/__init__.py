"""jcnn.data: datasets from their original files, standardization, JAX augmentation, loader."""

from jcnn.data import augment
from jcnn.data.datasets import (
    DATASETS,
    CorruptFileError,
    default_data_dir,
    load,
    load_tfds,
    verify,
    verify_sha256sums,
)
from jcnn.data.fetch import DownloadError, download
from jcnn.data.loader import Loader
from jcnn.data.standardize import Standardize

__all__ = [
    "DATASETS",
    "CorruptFileError",
    "DownloadError",
    "Loader",
    "Standardize",
    "augment",
    "default_data_dir",
    "download",
    "load",
    "load_tfds",
    "verify",
    "verify_sha256sums",
]
