"""Pure functions of arrays for every CNN building block (jax.numpy and lax only, no Flax).

Arrays are channels-last (``(N, *spatial, C)``) and kernels ``(*window, C_in // groups, C_out)``.
"""

from jcnn.functional.activation import *  # noqa: F403
from jcnn.functional.conv import *  # noqa: F403
from jcnn.functional.dropout import *  # noqa: F403
from jcnn.functional.local import *  # noqa: F403
from jcnn.functional.loss import *  # noqa: F403
from jcnn.functional.norm import *  # noqa: F403
from jcnn.functional.pool import *  # noqa: F403
