"""jcnn.analysis: model summary (shapes, parameters, multiply-adds, receptive fields), inference
folding of BatchNorm, PyTorch weights, and per-example gradients (clipping, DP-SGD)."""

from jcnn.analysis.accounting import *  # noqa: F403
from jcnn.analysis.accounting import __all__ as _accounting
from jcnn.analysis.batch_norm import *  # noqa: F403
from jcnn.analysis.batch_norm import __all__ as _batch_norm
from jcnn.analysis.dp import *  # noqa: F403
from jcnn.analysis.dp import __all__ as _dp
from jcnn.analysis.fold import *  # noqa: F403
from jcnn.analysis.fold import __all__ as _fold
from jcnn.analysis.ghost import *  # noqa: F403
from jcnn.analysis.ghost import __all__ as _ghost
from jcnn.analysis.per_example import *  # noqa: F403
from jcnn.analysis.per_example import __all__ as _per_example
from jcnn.analysis.summary import *  # noqa: F403
from jcnn.analysis.summary import __all__ as _summary
from jcnn.analysis.torch_weights import *  # noqa: F403
from jcnn.analysis.torch_weights import __all__ as _torch_weights

__all__ = [
    *_summary,
    *_fold,
    *_torch_weights,
    *_per_example,
    *_batch_norm,
    *_accounting,
    *_ghost,
    *_dp,
]
