"""Flax NNX modules: the NNX twin of every ``jcnn.nn`` module, thin wrappers of the same
``jcnn.functional`` ops, with the same names, argument names and defaults.

Differences from the Linen twins, all NNX conventions:

- Modules create their parameters at construction, so those with parameters take the input size
  first (``in_features`` for ``Conv``/``ConvTranspose``/``Dense``, ``num_features`` for the
  norms, as ``flax.nnx.Conv`` and ``flax.nnx.BatchNorm``) and ``rngs=nnx.Rngs(...)``. An int
  ``kernel_size`` means 2-D unless ``spatial_dims`` says otherwise. Every setting is checked at
  construction too, a bad one refused under its name (the op's own checks run on an abstract
  input that fits the window); only what depends on the input (its shape, a window larger than
  it) waits for the call.
- Train or evaluate: ``BatchNorm`` and ``InstanceNorm`` follow their ``use_running_average``
  attribute, ``Dropout`` and ``SpatialDropout`` their ``deterministic`` one, set for a whole
  model by ``model.train()``/``model.eval()`` (or ``nnx.view``); a call may still pass
  ``train=True``/``False`` as with ``jcnn.nn``, which overrides the attribute for that call, and
  the containers forward it.
- Running statistics are ``nnx.BatchStat`` variables updated in place by a training call.

Requires Flax 0.12 or later (checked at import; the rest of jcnn works with older Flax).

Variables keep the Linen names (``kernel``, ``bias``, ``scale``, ``mean``, ``var``...):
:func:`load_linen_variables` and :func:`linen_variables` move them between twins, and
:func:`to_nnx` brings any Linen model (the zoo's) to NNX through ``flax.nnx.bridge``.
"""

import re as _re

import flax as _flax

if tuple(int(part) for part in _re.findall(r"\d+", _flax.__version__)[:2]) < (0, 12):
    raise ImportError(
        f"jcnn.nnx needs flax>=0.12 (nnx.List, nnx.view, graph and tree mode); installed: "
        f"flax {_flax.__version__}. Upgrade with: pip install -U 'flax>=0.12'"
    )

from jcnn.nnx.activation import *  # noqa: E402, F403
from jcnn.nnx.activation import __all__ as _activation  # noqa: E402
from jcnn.nnx.bridge import *  # noqa: E402, F403
from jcnn.nnx.bridge import __all__ as _bridge  # noqa: E402
from jcnn.nnx.container import *  # noqa: E402, F403
from jcnn.nnx.container import __all__ as _container  # noqa: E402
from jcnn.nnx.conv import *  # noqa: E402, F403
from jcnn.nnx.conv import __all__ as _conv  # noqa: E402
from jcnn.nnx.convert import *  # noqa: E402, F403
from jcnn.nnx.convert import __all__ as _convert  # noqa: E402
from jcnn.nnx.dropout import *  # noqa: E402, F403
from jcnn.nnx.dropout import __all__ as _dropout  # noqa: E402
from jcnn.nnx.linear import *  # noqa: E402, F403
from jcnn.nnx.linear import __all__ as _linear  # noqa: E402
from jcnn.nnx.local import *  # noqa: E402, F403
from jcnn.nnx.local import __all__ as _local  # noqa: E402
from jcnn.nnx.norm import *  # noqa: E402, F403
from jcnn.nnx.norm import __all__ as _norm  # noqa: E402
from jcnn.nnx.pool import *  # noqa: E402, F403
from jcnn.nnx.pool import __all__ as _pool  # noqa: E402

__all__ = [
    *_conv,
    *_linear,
    *_local,
    *_norm,
    *_pool,
    *_activation,
    *_dropout,
    *_container,
    *_convert,
    *_bridge,
]
