"""Pure functions of arrays for every CNN building block (jax.numpy and lax only, no Flax).

Arrays are channels-last (``(N, *spatial, C)``) and kernels ``(*window, C_in // groups, C_out)``.
"""

from jcnn.functional.activation import *  # noqa: F403
from jcnn.functional.activation import __all__ as _activation
from jcnn.functional.conv import *  # noqa: F403
from jcnn.functional.conv import __all__ as _conv
from jcnn.functional.dropout import *  # noqa: F403
from jcnn.functional.dropout import __all__ as _dropout
from jcnn.functional.linear import *  # noqa: F403
from jcnn.functional.linear import __all__ as _linear
from jcnn.functional.local import *  # noqa: F403
from jcnn.functional.local import __all__ as _local
from jcnn.functional.loss import *  # noqa: F403
from jcnn.functional.loss import __all__ as _loss
from jcnn.functional.norm import *  # noqa: F403
from jcnn.functional.norm import __all__ as _norm
from jcnn.functional.pool import *  # noqa: F403
from jcnn.functional.pool import __all__ as _pool

__all__ = [*_activation, *_conv, *_dropout, *_linear, *_local, *_loss, *_norm, *_pool]
