"""BatchNorm replaced by GroupNorm throughout a model, for per-example gradients and DP-SGD.

In training mode BatchNorm normalizes each example with statistics of the whole batch, so an
example's output (and its gradient) depends on every other example: there is no per-example
gradient to clip, and DP-SGD's sensitivity bound does not hold. GroupNorm normalizes each example
with its own statistics, over groups of channels, and is the usual replacement in private training
(Opacus' ``ModuleValidator.fix`` does the same for PyTorch models).
"""

from __future__ import annotations

import math
from functools import partial

import flax.linen as linen

from jcnn import functional as F
from jcnn.analysis._trace import check_linen_model
from jcnn.analysis.per_example import BATCH_NORM_REPLACED
from jcnn.functional._checks import check_positive_int
from jcnn.nn.norm import BatchNorm, GroupNorm

__all__ = ["replace_batch_norm"]


class _GroupNormForBatchNorm(linen.Module):
    """``model`` with each BatchNorm call computed as a GroupNorm (see ``replace_batch_norm``)."""

    # not "model": FoldedModel's field, whose name a folded replaced model (or a replaced folded
    # one) would reserve twice in the scope the two wrappers share
    wrapped: linen.Module
    num_groups: int = 32

    def setup(self):
        linen.share_scope(self, self.wrapped)

    def traced_as(self, path, module: linen.Module, x) -> linen.Module:
        """For ``trace_layers``: a BatchNorm is the GroupNorm it computes."""
        if not isinstance(module, (BatchNorm, linen.BatchNorm)) or not hasattr(x, "shape"):
            return module
        return GroupNorm(
            num_groups=math.gcd(self.num_groups, x.shape[-1]),
            eps=module.epsilon if isinstance(module, linen.BatchNorm) else module.eps,
            use_scale=module.use_scale,
            use_bias=module.use_bias,
            parent=None,
        )

    def __call__(self, *args, **kwargs):
        token = BATCH_NORM_REPLACED.set(True)  # per-example functions' guard: not a BatchNorm
        try:
            with linen.intercept_methods(partial(_group_norm_instead, self.num_groups)):
                return self.wrapped(*args, **kwargs)
        finally:
            BATCH_NORM_REPLACED.reset(token)


def _group_norm_instead(num_groups, next_fun, args, kwargs, context):
    """Method interceptor: a BatchNorm call computed as ``F.group_norm`` with its parameters."""
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (BatchNorm, linen.BatchNorm)):
        return next_fun(*args, **kwargs)
    x = args[0] if args else kwargs["x"]
    if isinstance(module, linen.BatchNorm) and module.axis not in (-1, x.ndim - 1, (-1,)):
        raise ValueError(
            f"model: flax.linen.BatchNorm {'/'.join(module.path[1:])!r} has its features on axis "
            f"{module.axis!r}; replace_batch_norm computes GroupNorm over the channels of the "
            "last axis (channels-last), expected axis=-1"
        )
    channels = x.shape[-1]
    groups = math.gcd(num_groups, channels)
    if math.prod(x.shape[1:-1]) * (channels // groups) == 1 and x.size:
        raise ValueError(
            f"num_groups: {num_groups} gives BatchNorm {'/'.join(module.path[1:])!r} on x of shape "
            f"{tuple(x.shape)} {groups} groups of one value each (every output would be its "
            "bias); expected num_groups whose gcd with the channels leaves more than one value "
            "per group"
        )
    scale = bias = None
    if module.use_scale:
        scale = module.param("scale", module.scale_init, (channels,), module.param_dtype)
    if module.use_bias:
        bias = module.param("bias", module.bias_init, (channels,), module.param_dtype)
    return F.group_norm(
        x,
        scale,
        bias,
        num_groups=groups,
        eps=module.epsilon if isinstance(module, linen.BatchNorm) else module.eps,
    )


def replace_batch_norm(model: linen.Module, *, num_groups: int = 32) -> linen.Module:
    """``model`` with every BatchNorm (``jcnn.nn.BatchNorm`` or ``flax.linen.BatchNorm``) computed
    as a GroupNorm: each example normalized over groups of channels with its own statistics.

    Each BatchNorm layer keeps its name and its ``scale``/``bias`` parameters (same shapes,
    initializers and ``eps``); it has no ``batch_stats`` any more and its ``train`` argument is
    ignored. A layer with ``C`` channels gets ``gcd(num_groups, C)`` groups (as Opacus'
    ``ModuleValidator.fix``). The model is called exactly as before (same arguments), and its
    other layers are untouched, so the result works with ``per_example_grads`` and DP-SGD.

    Args:
      model: a Flax Linen module (e.g. ``jcnn.models.ResNet``); it is not modified.
      num_groups: the wanted number of groups per layer (a positive int).

    Returns:
      A Flax Linen module with the same parameter tree as ``model`` less ``batch_stats``.

    >>> import jcnn
    >>> net = replace_batch_norm(jcnn.nn.Sequential([jcnn.nn.Conv(4, 3), jcnn.nn.BatchNorm()]))
    >>> variables = net.init(jax.random.key(0), jnp.ones((2, 5, 5, 3)), train=True)
    >>> sorted(variables), sorted(variables["params"]["layers_1"])
    (['params'], ['bias', 'scale'])
    """
    check_linen_model(model)
    num_groups = check_positive_int(num_groups, "num_groups")
    from jcnn.analysis.fold import FoldedModel  # here: fold's tracer imports this module

    if isinstance(model, FoldedModel):
        # inside it: the BatchNorms it folded away must stay skipped, not become GroupNorms
        return model.clone(
            parent=None, model=replace_batch_norm(model.model, num_groups=num_groups)
        )
    return _GroupNormForBatchNorm(model.clone(parent=None), num_groups)
