"""Flax Linen modules: one thin wrapper per ``jcnn.functional`` op, plus ``Sequential`` and
``Residual``.

Modules hold parameters and call the functional op; the math lives in ``jcnn.functional``.
Stateful or random modules (``BatchNorm``, ``InstanceNorm`` with running stats, ``Dropout``,
``SpatialDropout``) take ``train: bool`` in ``__call__``; running statistics live in the
``batch_stats`` collection and dropout draws from the ``"dropout"`` rng collection.
"""

from jcnn.nn.activation import *  # noqa: F403
from jcnn.nn.activation import __all__ as _activation
from jcnn.nn.container import *  # noqa: F403
from jcnn.nn.container import __all__ as _container
from jcnn.nn.conv import *  # noqa: F403
from jcnn.nn.conv import __all__ as _conv
from jcnn.nn.dropout import *  # noqa: F403
from jcnn.nn.dropout import __all__ as _dropout
from jcnn.nn.linear import *  # noqa: F403
from jcnn.nn.linear import __all__ as _linear
from jcnn.nn.local import *  # noqa: F403
from jcnn.nn.local import __all__ as _local
from jcnn.nn.norm import *  # noqa: F403
from jcnn.nn.norm import __all__ as _norm
from jcnn.nn.pool import *  # noqa: F403
from jcnn.nn.pool import __all__ as _pool

__all__ = [*_conv, *_local, *_linear, *_norm, *_pool, *_activation, *_dropout, *_container]
