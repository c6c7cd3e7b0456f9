"""Inference folding: every conv (or dense) layer followed by a BatchNorm becomes one layer.

``fold_batch_norms(model, variables, input_shape)`` finds each ``jcnn.nn.Conv``,
``DepthwiseConv``, ``ConvTranspose`` or ``Dense`` whose output goes only into a
``jcnn.nn.BatchNorm`` (by running the model abstractly), folds the
BatchNorm's running statistics and affine map into the layer's kernel and bias with
``F.fold_batch_norm`` (a pair inside ``nn.scan`` or ``nn.vmap``, whose variables are stacked,
is left as it is), and returns a ``FoldedModel``: the same network with those BatchNorms
skipped, and parameters at the same paths (the BatchNorms' entries removed, a ``bias`` added to
convs built with ``use_bias=False``). The folded network computes the original's eval-mode
(``train=False``) function with one layer less per pair; it is meant for inference.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jax_core

from jcnn import functional as F
from jcnn import nn as jnn
from jcnn.analysis._trace import (
    _body,
    accepts_train,
    leaf_calls,
    subtree,
    trace_layers,
    variables_path,
)

__all__ = ["FoldedModel", "fold_batch_norms"]

Path = tuple[str, ...]


class FoldedModel(nn.Module):
    """``model`` with the BatchNorms at ``skipped`` removed (they are folded into the layers).

    Built by ``fold_batch_norms``; parameters keep ``model``'s paths.

    Attributes:
      model: the original network.
      skipped: paths of the BatchNorms that act as the identity.
      added_bias: paths of the layers built without a bias that add the folded ``bias``.
    """

    model: nn.Module
    skipped: tuple[Path, ...] = ()
    added_bias: tuple[Path, ...] = ()

    def setup(self) -> None:
        nn.share_scope(self, self.model)

    def traced_as(self, path: Path, module: nn.Module, x: jax.Array) -> nn.Module | None:
        """For ``trace_layers``: a skipped BatchNorm runs as the identity."""
        return None if path in self.skipped else module

    def __call__(self, x: jax.Array, train: bool = False) -> Any:
        """The folded network's output for ``x`` (``train`` reaches layers such as Dropout)."""
        skipped, added_bias = set(self.skipped), set(self.added_bias)
        own = variables_path(self.scope)  # the model's variables live in this (shared) scope

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            path = variables_path(context.module.scope)[len(own) :]
            if path in skipped:
                return args[0]
            y = next_fun(*args, **kwargs)
            if path in added_bias:
                # The layer itself creates no bias: declared here, the folded model's init
                # (summary, eval_shape, a second folding) makes one, and apply finds the folded
                # one or names it when the variables lack it.
                bias = context.module.scope.param(
                    "bias", nn.initializers.zeros_init(), (y.shape[-1],), context.module.param_dtype
                )
                y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,)).astype(y.dtype)
            return y

        kwargs = {"train": train} if accepts_train(self.model) else {}
        with nn.intercept_methods(interceptor):
            return self.model(x, **kwargs)


_FOLDABLE = (jnn.Conv, jnn.DepthwiseConv, jnn.ConvTranspose, jnn.Dense)


def _pairs(model, input_shape) -> tuple[list[tuple[Path, Path, bool, float, int]], Any]:
    """``(layer path, BatchNorm path, layer has a bias, BatchNorm eps, transposed conv's groups
    (1 for the other layers))`` per foldable pair, and the variables' shapes on ``input_shape``."""
    calls, shapes = trace_layers(model, input_shape)
    leaves = leaf_calls(calls)
    call_counts: dict[Path, int] = {}
    for call in leaves:
        call_counts[call.path] = call_counts.get(call.path, 0) + 1
    pairs = []
    for call in leaves:
        if not isinstance(call.module, jnn.BatchNorm) or call.source is None:
            continue
        layer = calls[call.source]
        # a container fed the layer's output passes it on to its layers (the BatchNorm among
        # them); what it computes with it itself is found below, in the model's output
        layer_consumers = [index for index in layer.consumers if calls[index].is_leaf]
        if (
            layer.is_leaf
            # inside nn.scan or nn.vmap the variables are stacked, one slice per step or slice
            and not (layer.lifted or call.lifted)
            and type(layer.module) in _FOLDABLE
            and layer_consumers == [call.index]
            and call_counts[layer.path] == 1
            and call_counts[call.path] == 1
        ):
            groups = layer.module.groups if type(layer.module) is jnn.ConvTranspose else 1
            pairs.append((layer.path, call.path, layer.module.use_bias, call.module.eps, groups))
    if not pairs:
        return pairs, shapes
    shared = _used_outside_batch_norm(model, input_shape, pairs)
    return [pair for pair, used in zip(pairs, shared, strict=True) if not used], shapes


def _used_outside_batch_norm(model, input_shape, pairs) -> list[bool]:
    """Per pair, whether the layer's output reaches the model's output other than through its
    BatchNorm (e.g. a residual sum ``bn(conv(x)) + conv(x)``, which module calls do not show):
    each layer's output gets a zero tap that its BatchNorm does not see, and the tap is looked
    for among the inputs that the model's output depends on."""
    layers = {pair[0]: index for index, pair in enumerate(pairs)}
    norms = {pair[1] for pair in pairs}
    kwargs = {"train": False} if accepts_train(model) else {}

    def run(taps, x):
        untapped: dict[int, jax.Array] = {}
        alive = []  # keeps the tapped arrays alive so that their ids stay unique

        def interceptor(next_fun, args, kw, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kw)
            path = variables_path(context.module.scope)
            if path in norms and args and id(args[0]) in untapped:
                args = (untapped[id(args[0])], *args[1:])
            y = next_fun(*args, **kw)
            if path in layers and hasattr(y, "dtype"):
                tapped = y + taps[layers[path]].astype(y.dtype)
                untapped[id(tapped)] = y
                alive.append(tapped)
                return tapped
            return y

        with nn.intercept_methods(interceptor):
            variables = model.init(jax.random.key(0), x, **kwargs)
            return model.apply(variables, x, **kwargs)

    taps = [jax.ShapeDtypeStruct((), jnp.float32) for _ in pairs]
    closed = jax.make_jaxpr(run)(taps, jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32))
    jaxpr = closed.jaxpr
    return _live_inputs(jaxpr, [True] * len(jaxpr.outvars))[: len(pairs)]


def _live_inputs(jaxpr, live_outputs: Sequence[bool]) -> list[bool]:
    """Per input of ``jaxpr``, whether an output in ``live_outputs`` (or an effect) depends on
    it. A call-like equation (``nn.remat``'s checkpoint, ``nn.jit``'s pjit) is followed into its
    body: taken whole, every tap passed into a rematerialized block would look used."""
    live = {v for v, keep in zip(jaxpr.outvars, live_outputs, strict=True) if keep and _is_var(v)}
    for eqn in reversed(jaxpr.eqns):
        outputs = [_is_var(v) and v in live for v in eqn.outvars]
        if not (eqn.effects or any(outputs)):
            continue
        body = _body(eqn)
        inputs = [True] * len(eqn.invars)
        if body is not None and not eqn.effects:
            inputs = _live_inputs(body, outputs)
        live.update(v for v, keep in zip(eqn.invars, inputs, strict=True) if keep and _is_var(v))
    return [v in live for v in jaxpr.invars]


def _is_var(value) -> bool:
    return isinstance(value, jax_core.Var) and not isinstance(value, jax_core.Literal)


def _node(tree, path: Sequence[str], name: str):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            raise ValueError(
                f"variables: expected {name} at {'/'.join(path)!r}, missing in the given variables"
            )
        tree = tree[key]
    return tree


def _delete(tree: dict, path: Sequence[str]) -> None:
    parents = [tree]
    for key in path[:-1]:
        parents.append(parents[-1][key])
    parents[-1].pop(path[-1], None)
    # Drop containers left empty (a block whose only variables were the BatchNorm's).
    for depth in range(len(path) - 1, 0, -1):
        if not parents[depth]:
            parents[depth - 1].pop(path[depth - 1])


def _plain(tree):
    """A mutable deep copy of nested (possibly frozen) dicts."""
    if hasattr(tree, "items"):
        return {key: _plain(value) for key, value in tree.items()}
    return copy.copy(tree)


def _fold(kernel, bias, scale, bn_bias, state, eps, transpose_groups: int):
    """``F.fold_batch_norm`` of a layer's kernel; a transposed conv with groups keeps
    ``features // groups`` outputs on its last axis (output ``g * (features // groups) + j`` is
    column ``j`` of group ``g``'s input rows), so its groups move there first and back after."""
    if transpose_groups == 1:
        return F.fold_batch_norm(kernel, bias, scale, bn_bias, state, eps=eps)
    *window, c_in, per_group = kernel.shape
    grouped = kernel.reshape(*window, transpose_groups, c_in // transpose_groups, per_group)
    columns = jnp.moveaxis(grouped, -3, -2).reshape(*window, c_in // transpose_groups, -1)
    columns, bias = F.fold_batch_norm(columns, bias, scale, bn_bias, state, eps=eps)
    grouped = columns.reshape(*window, c_in // transpose_groups, transpose_groups, per_group)
    return jnp.moveaxis(grouped, -2, -3).reshape(kernel.shape), bias


def fold_batch_norms(
    model: nn.Module, variables: Mapping[str, Any], input_shape: Sequence[int]
) -> tuple[FoldedModel, dict[str, Any]]:
    """Fold every conv/dense + BatchNorm pair of a trained ``model`` into one layer.

    Args:
      model: a Flax module built from ``jcnn.nn`` layers (e.g. ``models.VGG(batch_norm=True)``).
      variables: its variables, ``{"params": ..., "batch_stats": ...}``.
      input_shape: an input shape with the batch axis, to run the model abstractly.

    Returns:
      ``(folded_model, folded_variables)``: ``folded_model.apply(folded_variables, x)`` equals
      ``model.apply(variables, x, train=False)`` up to float rounding.

    >>> import jcnn
    >>> from jcnn import nn
    >>> model = nn.Sequential([nn.Conv(4, 3, use_bias=False), nn.BatchNorm(), nn.ReLU()])
    >>> x = jnp.ones((1, 6, 6, 2))
    >>> variables = model.init(jax.random.key(0), x, train=False)
    >>> folded, folded_variables = fold_batch_norms(model, variables, x.shape)
    >>> sorted(folded_variables), sorted(folded_variables["params"]["layers_0"])
    (['params'], ['bias', 'kernel'])
    >>> bool(jnp.allclose(folded.apply(folded_variables, x),
    ...                   model.apply(variables, x, train=False), atol=1e-5))
    True
    """
    if not isinstance(variables, Mapping):
        raise TypeError(
            "variables: expected the model's variables, a mapping such as {'params': ..., "
            "'batch_stats': ...} (model.init's result), got "
            f"{type(variables).__name__}"
        )
    pairs, shapes = _pairs(model, input_shape)
    base, skipped, added_bias = model, (), ()
    if isinstance(model, FoldedModel):  # folded again: one wrapper, and only what it left
        base, skipped, added_bias = model.model, model.skipped, model.added_bias
    folded = _plain(dict(variables))
    params = folded.setdefault("params", {})
    stats = folded.get("batch_stats", {})
    for layer_path, norm_path, _, eps, groups in pairs:
        layer_params = _node(params, layer_path, "the layer's params")
        norm_params = subtree(folded, "params", norm_path)
        _node(stats, norm_path, "the BatchNorm's batch_stats")
        kernel = _node(params, (*layer_path, "kernel"), "the layer's kernel")
        expected = tuple(subtree(shapes, "params", layer_path)["kernel"].shape)
        shape = getattr(kernel, "shape", None)  # a kernel of another type is refused below
        if shape is not None and tuple(shape)[:-1] != expected[:-1]:
            # folded as given, the kernel came back misshapen and only apply refused it (its
            # output channels against the BatchNorm's are F.fold_batch_norm's check, below)
            raise ValueError(
                f"variables: the kernel at {'/'.join((*layer_path, 'kernel'))!r} has shape "
                f"{tuple(shape)}, but {type(model).__name__} on input_shape "
                f"{tuple(input_shape)} makes one of shape {expected}: the variables and "
                "input_shape do not belong together"
            )
        mean = _node(stats, (*norm_path, "mean"), "the BatchNorm's running mean")
        var = _node(stats, (*norm_path, "var"), "the BatchNorm's running variance")
        try:
            kernel, bias = _fold(
                jnp.asarray(kernel),
                layer_params.get("bias"),
                norm_params.get("scale"),
                norm_params.get("bias"),
                F.BatchNormState(jnp.asarray(mean), jnp.asarray(var)),
                eps,
                groups,
            )
        except (TypeError, ValueError) as error:
            # F.fold_batch_norm names its own arguments (w, b, scale, state): say which layers
            raise type(error)(
                f"variables: the layer at {'/'.join(layer_path)!r} and the BatchNorm at "
                f"{'/'.join(norm_path)!r} do not fold: {error}"
            ) from error
        layer_params["kernel"], layer_params["bias"] = kernel, bias
        if norm_params:
            _delete(params, norm_path)
        _delete(stats, norm_path)
    if "batch_stats" in folded and not folded["batch_stats"]:
        del folded["batch_stats"]
    folded_model = FoldedModel(
        base,
        skipped=skipped + tuple(norm for _, norm, _, _, _ in pairs),
        added_bias=added_bias
        + tuple(
            layer for layer, _, has_bias, _, _ in pairs if not has_bias and layer not in added_bias
        ),
    )
    return folded_model, folded
