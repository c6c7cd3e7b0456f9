"""Any Linen model, the zoo's included, as an NNX module: ``to_nnx`` over ``flax.nnx.bridge``.

The result is a ``flax.nnx.bridge.ToNNX`` whose variables are the Linen model's, under the Linen
names (``nnx.Param`` for ``params``, ``nnx.BatchStat`` for ``batch_stats``), so it works with
``nnx.Optimizer``, ``nnx.jit``, ``nnx.grad`` and ``nnx.split`` like a native module. It is called
as the Linen model is applied: ``model(x, train=True, mutable=["batch_stats"])`` trains (and
writes the new running statistics into the module), ``model(x, train=False)`` evaluates.
``model.train()``/``model.eval()`` do not reach inside a bridged Linen model: pass ``train``.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
from flax import linen, nnx
from flax.nnx import bridge
from jax.typing import ArrayLike

from jcnn.functional._checks import check_key

__all__ = ["to_nnx"]


def to_nnx(
    linen_model: linen.Module,
    sample_input: ArrayLike,
    *,
    rngs: nnx.Rngs | jax.Array,
    **init_kwargs: Any,
) -> bridge.ToNNX:
    """``linen_model`` as an NNX module, its variables initialized on ``sample_input``.

    Args:
        linen_model: a Flax Linen module (e.g. ``jcnn.models.ResNet``).
        sample_input: an input of the shape the model will see (its values do not matter).
        rngs: ``nnx.Rngs`` (its ``params`` or default stream initializes; a ``dropout`` stream
            feeds dropout in training calls, else Flax's bridge draws the masks from the params
            stream) or a key, the one stream for both.
        **init_kwargs: more arguments of the initializing call; ``train=False`` is added when
            the model's ``__call__`` takes ``train`` and none is given.

    Returns:
        The ``flax.nnx.bridge.ToNNX`` module, initialized.

    Example:
        >>> import jcnn
        >>> from flax import nnx
        >>> x = jnp.zeros((2, 28, 28, 1))
        >>> model = jcnn.nnx.to_nnx(jcnn.models.LeNet5(), x, rngs=nnx.Rngs(0))
        >>> model(x).shape
        (2, 10)
    """
    if isinstance(linen_model, type):
        raise TypeError(
            f"linen_model: expected a Flax Linen module instance such as "
            f"{linen_model.__name__}(...), got the class {linen_model.__name__}"
        )
    if isinstance(linen_model, nnx.Module):  # its class name alone reads like the Linen twin's
        raise TypeError(
            f"linen_model: expected a flax.linen.Module, got the NNX module "
            f"{type(linen_model).__name__}; it is NNX already: use it as it is"
        )
    if not isinstance(linen_model, linen.Module):
        raise TypeError(
            f"linen_model: expected a flax.linen.Module, got {type(linen_model).__name__}"
        )
    if not isinstance(rngs, (nnx.Rngs, jax.Array)):
        raise TypeError(f"rngs: expected nnx.Rngs or a jax key, got {type(rngs).__name__}")
    if isinstance(rngs, jax.Array):
        check_key(rngs, "rngs")
    try:
        takes_train = "train" in inspect.signature(linen_model.__call__).parameters
    except (TypeError, ValueError):
        takes_train = False
    if takes_train:
        init_kwargs.setdefault("train", False)
    return bridge.ToNNX(linen_model, rngs=rngs).lazy_init(sample_input, **init_kwargs)
