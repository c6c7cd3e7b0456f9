"""Per-example gradient norms and clipped gradient sums in one pass, without writing ``B`` copies
of the parameters.

DP-SGD needs two things from each batch: the norm of each example's gradient and the sum of the
clipped gradients. Neither needs all the per-example gradients at once. A dense layer ``y = x @ W``
receives, for example ``i``, its input ``a_i`` (``T`` positions by ``d`` features: tokens, or image
patches for a convolution) and the loss's cotangent ``g_i`` on its output (``T`` by ``p``); its
weight gradient is ``a_i^T g_i``, whose squared norm is

* **ghost** (Goodfellow 2015; Li et al. 2021): ``sum((a_i a_i^T) * (g_i g_i^T))``, two ``T x T``
  Gram matrices, cost ``O(T^2 (d + p))``, memory ``O(T^2)`` per example;
* **direct**: ``||a_i^T g_i||^2``, the layer's gradient for this example alone, cost ``O(T d p)``,
  memory ``O(d p)`` per example: the vjp of the layer's own ``apply`` on the example.

Mixed ghost clipping (Bu, Mao and Xu 2022) takes, per layer, the cheaper one: ghost where
``T^2 <= d p``, per group for a grouped layer (``groups * T^2`` Gram entries against the kernel's
size). Convolutions (1/2/3-D, any stride, dilation, padding and padding mode, groups) are the
same computation on their unfolded input patches (one strided slice per window offset); a
depthwise convolution is the convolution grouped by its input channels, whose kernel
``(*window, 1, C_in * depth_multiplier)`` it already stores; transposed convolutions on the
unfolded output cotangent (a transposed convolution's weight gradient is that of the convolution
it is the adjoint of, with input and output swapped). Where the padded input has few positions
for its channels (small maps deep in a network), the patches' Gram matrix comes from the
positions' Gram matrix instead, with no patches written: two windows' product is a sum over
window offsets of entries of it.

Layers are found with Flax's method interception: every call of ``jcnn.nn.Dense``, ``jcnn.nn.Conv``,
``jcnn.nn.DepthwiseConv``, ``jcnn.nn.ConvTranspose`` or ``flax.linen.Dense`` whose parameters are
leaves of ``params`` used by no other call (a subclass with its own ``__call__`` computes another
map: materialized). One pass gives everything: the model runs on each
example (``vmap``), the inputs of those layers are recorded and their outputs get a zero "tap" whose
gradient is the output cotangent; the pass differentiates only the taps and the other leaves, so no
layer kernel gets a per-example gradient there. Every other parameter (norm scales and biases, PReLU
slopes, the parameters of any other layer, or of the layers above when shared) gets its per-example
gradient in the same backward pass, materialized: small for norms and activations; ``ghost_plan``
lists which rule each parameter gets. An NNX model's layers are not Linen modules, so none is
found and all of its parameters are materialized (right numbers, ``per_example_grads``' memory).

The clipped sum comes from the same pass (Book-Keeping, Bu et al. 2023; no second backward pass):
with ``c_i = w_i min(1, C / ||g_i||)``, a ghost layer's clipped kernel and bias gradient is its
ordinary batched weight gradient with each example's output cotangent scaled by ``c_i`` (the vjp
of the layer's own ``apply`` on the whole batch's inputs), a direct layer's and a materialized
leaf's is ``sum_i c_i grad_i`` of the per-example gradients the norms already needed.

Assumptions: ``loss_fn(params, batch)`` applies the Flax model to ``params``' leaves as they are
(no transformation of a layer's kernel before the layer uses it); a model that breaks it (weights
computed from other weights) still gets right norms when its layers are not Flax modules (their
parameters are then materialized), wrong ones otherwise. A layer's kernel or bias that the loss
also uses outside the layer (a weight penalty in the loss) is found when tracing and
materialized. The tests compare every layer type and the zoo models to the materialized
``per_example_grads`` and their clipped sum.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import tracers

from jcnn.analysis.per_example import (
    _batch_size,
    _check_chunk_size,
    _check_finite,
    _check_params,
    _clip_factors,
    _in_chunks,
    _scalar_loss,
    _sqrt_of_square,
    _widened,
    per_example_trace,
)
from jcnn.functional._checks import as_int_tuple, normalize_padding
from jcnn.functional.conv import _PAD_MODES
from jcnn.nn import Conv, ConvTranspose, Dense, DepthwiseConv

__all__ = ["ghost_norms", "ghost_clipped_sum", "ghost_plan", "LayerRule"]


class LayerRule(NamedTuple):
    """How ``ghost_norms`` treats one layer call (``ghost_plan``'s rows)."""

    path: str  # the Flax module path, e.g. "conv1" or "layer1_0/conv2"
    kind: str  # "Dense", "Conv", "DepthwiseConv", "ConvTranspose"; "parameter" for a leaf
    rule: str  # "ghost", "direct" or "per-example gradient" (materialized)
    positions: int  # T: positions (tokens, output pixels) per example; 0 for a parameter leaf
    size: int  # parameters of the layer (or of the leaf)


class _Call(NamedTuple):
    """One intercepted layer call found by the discovery trace."""

    module: Any  # the (unbound) module: its attributes give the layer's configuration
    kind: str
    path: str
    kernel: int  # index of the kernel leaf in params' leaves
    bias: int | None
    input_shape: tuple[int, ...]  # per example (a batch of one)
    output_shape: tuple[int, ...]
    output_dtype: Any


_LAYER_KINDS = (
    (Dense, "Dense"),
    (linen.Dense, "Dense"),
    (Conv, "Conv"),
    (DepthwiseConv, "DepthwiseConv"),
    (ConvTranspose, "ConvTranspose"),
)


def _layer_kind(module) -> str | None:
    """The supported layer ``module`` is, or None. A subclass that defines its own ``__call__``
    (a kernel transformed before use, another map) is not that layer: its parameters are
    materialized, as is a ``flax.linen.Dense`` with its own ``dot_general``."""
    for cls, kind in _LAYER_KINDS:
        if isinstance(module, cls) and type(module).__call__ is cls.__call__:
            if kind == "ConvTranspose" and isinstance(module.padding, str):
                return None
            if cls is linen.Dense and (
                module.dot_general not in (None, jax.lax.dot_general)
                or module.dot_general_cls is not None
            ):
                return None
            return kind
    return None


def _leaf_index(module, name: str, index_of: dict) -> int | None:
    if not module.has_variable("params", name):
        return None
    return index_of.get(id(module.get_variable("params", name)))


def _discover(loss_fn, leaves, treedef, example) -> list[_Call]:
    """The supported layer calls of ``loss_fn`` on one example, in call order (shapes only)."""
    calls: list[_Call] = []

    def trace(leaves, example):
        index_of = {id(leaf): i for i, leaf in enumerate(leaves)}
        level = tracers.current_trace()

        def intercept(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if tracers.current_trace() != level:
                # inside a transformation (flax.linen.vmap, scan, remat): the layer's input and
                # output are that transformation's values, not the example's; materialized
                return out
            module = context.module
            kind = _layer_kind(module) if context.method_name == "__call__" else None
            kernel = _leaf_index(module, "kernel", index_of) if kind else None
            if kernel is not None and len(args) == 1 and not kwargs:
                bias = _leaf_index(module, "bias", index_of)
                if bias is not None or not module.has_variable("params", "bias"):
                    calls.append(
                        _Call(
                            module.clone(parent=None),
                            kind,
                            "/".join(module.path),
                            kernel,
                            bias,
                            tuple(args[0].shape),
                            tuple(out.shape),
                            out.dtype,
                        )
                    )
            return out

        with linen.intercept_methods(intercept):
            return loss_fn(jax.tree.unflatten(treedef, leaves), example)

    jax.eval_shape(trace, leaves, example)
    # A parameter seen by two calls (a layer called twice, shared weights) is materialized.
    uses: dict[int, int] = {}
    for call in calls:
        for leaf in (call.kernel, call.bias):
            if leaf is not None:
                uses[leaf] = uses.get(leaf, 0) + 1
    calls = [call for call in calls if uses[call.kernel] == 1 and uses.get(call.bias, 1) == 1]
    # A parameter that the loss also uses outside its layer (a weight penalty in the loss) has
    # that use in its gradient too, which the layer's input and cotangent do not give.
    elsewhere = _used_outside_layers(loss_fn, leaves, treedef, example, calls)
    return [call for call in calls if not elsewhere & {call.kernel, call.bias}]


def _used_outside_layers(loss_fn, leaves, treedef, example, calls) -> set[int]:
    """Indices of the ``calls``' kernel and bias leaves on which the loss still depends when
    those layer calls are given constant stand-ins instead of them (traced, shapes only)."""
    by_kernel = {call.kernel: call for call in calls}

    def trace(leaves, example):
        index_of = {id(leaf): i for i, leaf in enumerate(leaves)}

        def intercept(next_fun, args, kwargs, context):
            module = context.module
            kind = _layer_kind(module) if context.method_name == "__call__" else None
            kernel = _leaf_index(module, "kernel", index_of) if kind else None
            if kernel in by_kernel and len(args) == 1 and not kwargs:
                call = by_kernel[kernel]
                stand_in = {
                    name: jnp.zeros(leaf.shape, leaf.dtype)
                    for name, leaf in _layer_params(call, leaves).items()
                }
                return call.module.apply({"params": stand_in}, args[0])
            return next_fun(*args, **kwargs)

        with linen.intercept_methods(intercept):
            return loss_fn(jax.tree.unflatten(treedef, leaves), example)

    if not calls:
        return set()
    jaxpr = jax.make_jaxpr(trace)(leaves, example).jaxpr
    # which inputs each value depends on: an equation's outputs on all its inputs' (conservative
    # for nested programs: a leaf wrongly counted as used is only materialized, still exact)
    depends = {id(var): {i} for i, var in enumerate(jaxpr.invars[: len(leaves)])}
    for equation in jaxpr.eqns:
        inputs = set().union(*(depends.get(id(var), set()) for var in equation.invars))
        for var in equation.outvars:
            depends[id(var)] = inputs
    return set().union(*(depends.get(id(var), set()) for var in jaxpr.outvars))


def _positions(call: _Call) -> int:
    shape = call.output_shape if call.kind != "ConvTranspose" else call.input_shape
    return math.prod(shape[1:-1])


def _groups(call: _Call) -> int:
    """The layer's groups: a ``DepthwiseConv`` is a convolution grouped by its input channels
    (its kernel ``(*window, 1, C_in * depth_multiplier)`` is that grouped ``Conv``'s)."""
    if call.kind == "Dense":
        return 1
    if call.kind == "DepthwiseConv":
        return call.input_shape[-1]
    return call.module.groups


def _ghost_is_cheaper(call: _Call, kernel_size: int) -> bool:
    # per group, T^2 against the group's d p: the ghost norm writes one T x T Gram matrix per
    # group (a depthwise layer: one per channel), the direct one the whole kernel
    positions = _positions(call)
    return _groups(call) * positions * positions <= kernel_size


def _window_slices(window, stride, dilation, out):
    """Per window offset, the ``(start, limit)`` of the slice (with step ``stride``) of a padded
    input's spatial axes that reads that offset of the window of each of the ``out`` positions."""
    for offset in itertools.product(*(range(k) for k in window)):
        start = [o * d for o, d in zip(offset, dilation, strict=True)]
        limit = [a + (n - 1) * s + 1 for a, n, s in zip(start, out, stride, strict=True)]
        yield start, limit


def _patches(x, window, stride, dilation, out):
    """``(N, *out, prod(window), C)``: each output position's window of the padded ``x``, one
    strided slice per window offset (no arithmetic)."""
    return jnp.stack(
        [
            jax.lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]), (1, *stride, 1))
            for start, limit in _window_slices(window, stride, dilation, out)
        ],
        axis=-2,
    )


def _window_gram_inner(x, window, stride, dilation, out, groups: int, gram_q):
    """``<P_g P_g^T, gram_q[g]>`` summed over the groups, ``P_g`` the windows ``_patches``
    unfolds, from the Gram matrix of the padded ``x``'s positions. The window at ``t`` reads
    ``t * stride + o * dilation`` at offset ``o``, so the product of two windows is the sum over
    offsets of one entry of the positions' Gram matrix; the sum is taken on ``gram_q``'s side
    instead (each offset pads it out to the positions, the adjoint of the slice that reads the
    entries), so neither the patches nor the windows' Gram matrix is written."""
    n, spatial, channels = x.shape[0], x.shape[1:-1], x.shape[-1]
    positions = x.reshape(n, -1, groups, channels // groups)
    gram = jnp.einsum("npgc,mqgc->gnpmq", positions, positions)
    gram = gram.reshape(groups, n, *spatial, n, *spatial)
    gram_q = gram_q.reshape(groups, n, *out, n, *out)
    spread = 0
    for start, limit in _window_slices(window, stride, dilation, out):
        axes = [
            (lo, size - hi, s - 1)
            for lo, hi, size, s in zip(start, limit, spatial, stride, strict=True)
        ]
        config = [(0, 0, 0), (0, 0, 0), *axes, (0, 0, 0), *axes]
        spread = spread + jax.lax.pad(gram_q, jnp.zeros((), gram_q.dtype), config)
    return jnp.sum(gram * spread)


def _unfolding(call: _Call, activation, cotangent):
    """For a convolution: ``(x, other, (window, stride, dilation, out))``: the layer's weight
    gradient pairs the windows of ``x`` (its input, a transposed convolution's output cotangent),
    padded as the layer pads it, at the ``out`` output positions along each axis with ``other``
    (its output cotangent, a transposed convolution's input) at the same positions."""
    module = call.module
    ndim = activation.ndim - 2
    window = tuple(np.broadcast_to(np.asarray(module.kernel_size), (ndim,)).tolist())
    if call.kind != "ConvTranspose":
        x, other, padding_mode = activation, cotangent, module.padding_mode
    else:
        x, other, padding_mode = cotangent, activation, "zeros"
    stride = as_int_tuple(module.stride, ndim, "stride")
    dilation = as_int_tuple(module.dilation, ndim, "dilation")
    pads = normalize_padding(module.padding, x.shape[1:-1], window, stride, dilation)
    if any(lo or hi for lo, hi in pads):
        x = jnp.pad(x, ((0, 0), *pads, (0, 0)), mode=_PAD_MODES[padding_mode])
    # `other`'s positions: a transposed convolution's output_padding >= stride adds a row of
    # output that no input position reaches
    return x, other, (window, stride, dilation, list(other.shape[1:-1]))


def _positions_gram_is_smaller(positions: int, groups: int, windows_size: int) -> bool:
    """Whether ``groups`` Gram matrices of ``positions`` rows are smaller than the windows."""
    return groups * positions * positions <= windows_size


def _grams_inner(call: _Call, activation, cotangent):
    """``<P_g P_g^T, Q_g Q_g^T>`` summed over the groups, the layer's weight gradient being
    ``P_g^T Q_g`` per group (``P`` the windows, ``Q`` the other side): ``P``'s Gram matrix from
    that of the padded positions when that is smaller than the windows, else from the windows."""

    def gram(rows):  # (T, groups, features) -> (groups, T, T)
        return jnp.einsum("tgf,sgf->gts", rows, rows)

    if call.kind == "Dense":
        p = activation.reshape(-1, 1, activation.shape[-1])
        return jnp.sum(gram(p) * gram(cotangent.reshape(-1, 1, cotangent.shape[-1])))
    groups = _groups(call)
    x, other, (window, stride, dilation, out) = _unfolding(call, activation, cotangent)
    q = other.reshape(-1, groups, other.shape[-1] // groups)
    gram_q = gram(q)
    windows_size = q.shape[0] * math.prod(window) * x.shape[-1]
    if _positions_gram_is_smaller(x.size // x.shape[-1], groups, windows_size):
        return _window_gram_inner(x, window, stride, dilation, out, groups, gram_q)
    patches = _patches(x, window, stride, dilation, out)
    patches = patches.reshape(-1, math.prod(window), groups, x.shape[-1] // groups)
    p = jnp.swapaxes(patches, 1, 2).reshape(q.shape[0], groups, -1)
    return jnp.sum(gram(p) * gram_q)


def _ghost_square_norm(call: _Call, activation, cotangent):
    """Squared norm of one example's gradient of the layer's kernel and bias (in float32, or
    wider for wider inputs), from its input and output cotangent (two Gram matrices, no
    gradient)."""
    # A loss linear in the layer's output gives a cotangent XLA sees as a broadcast; XLA:CPU's
    # YNNPACK reduce fusion (jaxlib 0.10) computes Gram matrices of broadcasts wrongly (wrong
    # numbers, NaN) under jit. The barrier makes both arrays real buffers before the products.
    activation, cotangent = jax.lax.optimization_barrier((activation, cotangent))
    activation = _widened(activation)
    cotangent = _widened(cotangent)
    square = _grams_inner(call, activation, cotangent)
    if call.bias is not None:
        square = square + jnp.sum(
            jnp.square(jnp.sum(cotangent.reshape(-1, cotangent.shape[-1]), axis=0))
        )
    return square


def _layer_params(call: _Call, leaves) -> dict:
    layer = {"kernel": leaves[call.kernel]}
    if call.bias is not None:
        layer["bias"] = leaves[call.bias]
    return layer


def _weight_gradient(call: _Call, layer: dict, inputs, cotangent, *, stacked: bool) -> dict:
    """The layer's kernel (and bias) gradient for ``inputs`` and the output ``cotangent``: the vjp
    of the module's own ``apply`` (every option of the layer is then the layer's own); with
    ``stacked``, ``inputs`` holds one layer input per example and the gradient is their sum."""
    if stacked and call.kind != "Dense":
        # a convolution maps each row of its batch axis alone: the examples' rows together
        # make one batch (a Dense layer takes any leading axes as they are)
        inputs = inputs.reshape(-1, *inputs.shape[2:])
        cotangent = cotangent.reshape(-1, *cotangent.shape[2:])
    _, vjp = jax.vjp(lambda layer: call.module.apply({"params": layer}, inputs), layer)
    return vjp(cotangent)[0]


def _norms_dtype(params):
    """The norms' dtype, as ``per_example_grad_norms`` gives it: float32, or float64 for float64
    parameters."""
    return jnp.result_type(jnp.float32, *jax.tree.leaves(params))


def _check_weights(weights, size: int) -> None:
    """``(size,)`` real weights, one per example (their values are the caller's to check)."""
    if np.shape(weights) != (size,):
        raise ValueError(
            f"weights: expected shape ({size},) (one per example), got {np.shape(weights)}"
        )
    _check_weight_dtype(weights)


def _check_weight_dtype(weights) -> None:
    dtype = weights.dtype if hasattr(weights, "dtype") else np.asarray(weights).dtype
    if not any(jnp.issubdtype(dtype, kind) for kind in (jnp.bool_, jnp.integer, jnp.floating)):
        raise TypeError(f"weights: expected real numbers, got {dtype}")


def _check_weight_values(weights) -> None:
    """Per-example real ``weights`` in ``[0, 1]``, when concrete (a traced array is its caller's
    to check)."""
    if isinstance(weights, jax.core.Tracer):
        return
    _check_weight_dtype(weights)
    values = np.asarray(weights)
    if not ((values >= 0) & (values <= 1)).all():
        raise ValueError(
            "weights: expected values in [0, 1] (1 a real example, 0 padding: a larger or "
            "negative one breaks the bound l2_norm_clip on each example's contribution, which "
            f"DP noise is calibrated for), got {values.min()} to {values.max()}"
        )


_LAYER_RULES = ("mixed", "ghost", "direct")


def _check_layer_rule(layer_rule) -> None:
    if layer_rule not in _LAYER_RULES:
        raise ValueError(f"layer_rule: expected one of {_LAYER_RULES}, got {layer_rule!r}")


def _plan(loss_fn, params, batch, layer_rule, where: str):
    leaves, treedef = jax.tree.flatten(params)
    example = jax.tree.map(lambda leaf: leaf[:1], batch)
    with per_example_trace(where):
        calls = _discover(loss_fn, leaves, treedef, example)
    ghost = [
        layer_rule == "ghost"
        or (layer_rule == "mixed" and _ghost_is_cheaper(call, leaves[call.kernel].size))
        for call in calls
    ]
    handled = {call.kernel for call in calls} | {
        call.bias for call in calls if call.bias is not None
    }
    materialized = [i for i in range(len(leaves)) if i not in handled]
    return leaves, treedef, calls, ghost, materialized


def ghost_plan(
    loss_fn: Callable, params: Any, batch: Any, *, layer_rule: str = "mixed"
) -> list[LayerRule]:
    """The rule ``ghost_norms`` uses for each layer and for each remaining parameter leaf.

    Args:
      loss_fn, params, batch, layer_rule: as in ``ghost_norms`` (only shapes are used).

    Returns:
      A list of ``LayerRule``: first the layers in call order (rule ``"ghost"`` or ``"direct"``),
      then every parameter leaf whose per-example gradient is materialized (rule
      ``"per-example gradient"``, path from ``jax.tree_util.keystr``).
    """
    _batch_size(batch)
    _check_layer_rule(layer_rule)
    _check_params(params)
    leaves, _, calls, ghost, materialized = _plan(
        _scalar_loss(loss_fn), params, batch, layer_rule, "ghost_plan"
    )
    rows = [
        LayerRule(
            call.path,
            call.kind,
            "ghost" if is_ghost else "direct",
            _positions(call),
            leaves[call.kernel].size + (0 if call.bias is None else leaves[call.bias].size),
        )
        for call, is_ghost in zip(calls, ghost, strict=True)
    ]
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(params)]
    rows += [
        LayerRule(paths[i], "parameter", "per-example gradient", 0, int(np.size(leaves[i])))
        for i in materialized
    ]
    return rows


def _tapped_pass(loss_fn, params, batch, layer_rule: str, where: str, keep: bool):
    """One vmapped forward and backward pass through layer taps. Per example: the squared
    gradient norm; with ``keep``, also what the clipped sum needs (the materialized leaves'
    gradients, each layer's input and output cotangent). Returns ``(plan, outputs)``."""
    plan = _plan(loss_fn, params, batch, layer_rule, where)
    leaves, treedef, calls, ghost, materialized = plan

    def one(free, taps, fixed, example):
        all_leaves = list(fixed)
        for index, leaf in zip(materialized, free, strict=True):
            all_leaves[index] = leaf
        inputs = []

        def intercept(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            if context.method_name == "__call__" and len(inputs) < len(calls):
                module = context.module
                call = calls[len(inputs)]
                if "/".join(module.path) == call.path and _layer_kind(module) == call.kind:
                    inputs.append(args[0])
                    return out + taps[len(inputs) - 1]
            return out

        with linen.intercept_methods(intercept):
            loss = loss_fn(jax.tree.unflatten(treedef, all_leaves), example)
        if len(inputs) != len(calls):
            raise RuntimeError(
                f"{where}: the model called {len(inputs)} of the {len(calls)} layers found when "
                "tracing it first; loss_fn must call the same layers on every example"
            )
        return loss, inputs

    # Differentiated with respect to the materialized leaves and the taps only: the kernels of
    # the intercepted layers get no gradient here, per example or otherwise.
    grad_fn = jax.grad(one, argnums=(0, 1), has_aux=True)

    def per_example(free, fixed, example):
        taps = [jnp.zeros(call.output_shape, call.output_dtype) for call in calls]
        example = jax.tree.map(lambda leaf: leaf[None], example)
        (free_grads, cotangents), inputs = grad_fn(free, taps, fixed, example)
        square = sum((jnp.sum(jnp.square(_widened(g))) for g in free_grads), jnp.float32(0))
        kept = []  # per layer: its gradient (direct) or its input and output cotangent (ghost)
        for call, is_ghost, a, g in zip(calls, ghost, inputs, cotangents, strict=True):
            if is_ghost:
                square = square + _ghost_square_norm(call, a, g)
                kept.append((a, g))
            else:
                grads = _weight_gradient(call, _layer_params(call, fixed), a, g, stacked=False)
                square = square + sum(
                    jnp.sum(jnp.square(_widened(leaf))) for leaf in grads.values()
                )
                kept.append(grads)
        return (square, free_grads, kept) if keep else square

    free = [leaves[i] for i in materialized]
    return plan, jax.vmap(per_example, in_axes=(None, None, 0))(free, leaves, batch)


def _book_kept_sum(loss_fn, params, batch, weights, l2_norm_clip, layer_rule: str, where: str):
    """``(sum_i w_i c_i g_i, norms)`` with ``c_i = min(1, C / ||g_i||)`` from the single pass of
    ``_tapped_pass`` (Book-Keeping). A ghost layer's clipped kernel and bias gradient is its
    batched weight gradient with each example's output cotangent scaled by ``w_i c_i``; a direct
    layer's and a materialized leaf's is ``sum_i w_i c_i grad_i`` of the gradients at hand."""
    plan, (square, free_grads, kept) = _tapped_pass(
        loss_fn, params, batch, layer_rule, where, keep=True
    )
    leaves, treedef, calls, ghost, materialized = plan
    norms = _sqrt_of_square(square)
    factors = _clip_factors(norms, l2_norm_clip)
    if weights is not None:
        factors = jnp.where(weights > 0, factors * jnp.asarray(weights, factors.dtype), 0)

    def only_weighted(values):
        # a weight-0 example (padding) adds nothing, even with a gradient that is not finite
        # (a zero example through x / ||x||): 0 * NaN would make the whole sum NaN
        if weights is None:
            return values
        return jnp.where((weights > 0).reshape(-1, *(1,) * (values.ndim - 1)), values, 0)

    def weighted_sum(grads):
        return jnp.tensordot(factors.astype(grads.dtype), only_weighted(grads), axes=1)

    total = list(leaves)
    for index, grads in zip(materialized, free_grads, strict=True):
        total[index] = weighted_sum(grads)
    for call, is_ghost, layer_kept in zip(calls, ghost, kept, strict=True):
        if is_ghost:
            a, g = only_weighted(layer_kept[0]), only_weighted(layer_kept[1])
            scaled = g * factors.astype(g.dtype).reshape(-1, *(1,) * (g.ndim - 1))
            grads = _weight_gradient(call, _layer_params(call, leaves), a, scaled, stacked=True)
        else:
            grads = {name: weighted_sum(leaf) for name, leaf in layer_kept.items()}
        total[call.kernel] = grads["kernel"]
        if call.bias is not None:
            total[call.bias] = grads["bias"]
    return jax.tree.unflatten(treedef, total), norms


def ghost_norms(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    chunk_size: int | None = None,
    layer_rule: str = "mixed",
) -> jax.Array:
    """L2 norm of each example's gradient (all parameters together), shape ``(B,)``, in one pass
    without ``B`` copies of the parameters: per dense or convolution layer, the ghost norm or the
    layer's own per-example gradient, whichever is cheaper.

    Equal to ``per_example_grad_norms`` (to float32 rounding); see the module docstring for the
    rules and ``ghost_plan`` for the rule of each layer. Wrap the call in ``jax.jit``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, a Flax model applied to ``params``.
      params: the parameters (any pytree).
      batch: a pytree of arrays with a common leading batch axis ``B``.
      chunk_size: ``chunk_size`` examples at a time (``lax.scan``), as in ``per_example_grads``.
      layer_rule: ``"mixed"`` (default): per layer, the ghost norm where ``T^2 <= d p``, else the
        direct one; ``"ghost"`` or ``"direct"``: that rule for every layer.

    >>> import jcnn
    >>> model = jcnn.nn.Dense(1, use_bias=False)
    >>> loss = lambda p, b: jnp.mean((model.apply({"params": p}, b[0])[:, 0] - b[1]) ** 2)
    >>> x, y = jnp.array([[3.0, 4.0], [0.0, 1.0]]), jnp.array([0.0, 0.0])
    >>> params = {"kernel": jnp.ones((2, 1))}
    >>> ghost_norms(loss, params, (x, y)).tolist()
    [70.0, 2.0]
    """
    size = _batch_size(batch)
    _check_chunk_size(chunk_size, None, size)
    _check_layer_rule(layer_rule)
    _check_params(params)
    loss_fn = _scalar_loss(loss_fn)
    if size == 0:  # as in per_example_grads: no example, no model run
        return jnp.zeros(0, _norms_dtype(params))

    def norms(params, batch):
        with per_example_trace("ghost_norms"):
            _, square = _tapped_pass(loss_fn, params, batch, layer_rule, "ghost_norms", keep=False)
            return _sqrt_of_square(square)

    if chunk_size is None or chunk_size >= size:
        return norms(params, batch)
    return _in_chunks(norms, params, batch, size, chunk_size)


def ghost_clipped_sum(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    l2_norm_clip: float,
    *,
    weights: jax.Array | None = None,
    chunk_size: int | None = None,
    layer_rule: str = "mixed",
) -> tuple[Any, jax.Array]:
    """``sum_i w_i min(1, C / ||g_i||) g_i`` and the norms ``||g_i||`` from the one pass of
    ``ghost_norms`` (Book-Keeping: no second backward pass, no ``B`` copies of the parameters).

    Args:
      loss_fn, params, batch, chunk_size, layer_rule: as in ``ghost_norms``.
      l2_norm_clip: the bound ``C`` > 0.
      weights: optional ``(B,)`` per-example weights ``w_i`` in ``[0, 1]`` (e.g. 0/1 for
        padding examples), so that each term stays within ``C``; default 1. Concrete weights
        outside ``[0, 1]`` are refused; traced ones are the caller's to check.

    Returns:
      ``(clipped_sum, norms)``: a pytree like ``params`` and the ``(B,)`` norms.

    >>> import jcnn
    >>> model = jcnn.nn.Dense(1, use_bias=False)
    >>> loss = lambda p, b: jnp.mean((model.apply({"params": p}, b[0])[:, 0] - b[1]) ** 2)
    >>> x, y = jnp.array([[3.0, 4.0], [0.0, 1.0]]), jnp.array([0.0, 0.0])
    >>> params = {"kernel": jnp.ones((2, 1))}
    >>> total, norms = ghost_clipped_sum(loss, params, (x, y), 1.0)
    >>> np.round(total["kernel"][:, 0], 3).tolist(), norms.tolist()  # two unit gradients
    ([0.6, 1.8], [70.0, 2.0])
    """
    return _ghost_clipped_sum(
        loss_fn, params, batch, l2_norm_clip, weights, chunk_size, layer_rule, "ghost_clipped_sum"
    )


def _ghost_clipped_sum(
    loss_fn, params, batch, l2_norm_clip, weights, chunk_size, layer_rule, where
):
    """``ghost_clipped_sum``, its errors naming ``where`` (the public function called)."""
    _check_finite(l2_norm_clip, "l2_norm_clip")
    size = _batch_size(batch)
    _check_chunk_size(chunk_size, None, size)
    _check_layer_rule(layer_rule)
    _check_params(params)
    if weights is not None:
        _check_weights(weights, size)
        _check_weight_values(weights)
        weights = jnp.asarray(weights)  # a list's numbers would be leaves of the chunks' pytree
    loss_fn = _scalar_loss(loss_fn)
    if size == 0:
        zeros = jax.tree.map(lambda leaf: jnp.zeros_like(leaf, jnp.result_type(leaf)), params)
        return zeros, jnp.zeros(0, _norms_dtype(params))

    def clipped_sum(params, batch, weights):
        with per_example_trace(where):
            return _book_kept_sum(loss_fn, params, batch, weights, l2_norm_clip, layer_rule, where)

    if chunk_size is None or chunk_size >= size:
        return clipped_sum(params, batch, weights)
    # each example's clip factor depends on its own norm only: the chunks' sums add up
    if weights is None:
        weights = jnp.ones(size, jnp.float32)
    num_chunks, rest = divmod(size, chunk_size)
    whole = num_chunks * chunk_size
    chunks = jax.tree.map(
        lambda leaf: leaf[:whole].reshape(num_chunks, chunk_size, *leaf.shape[1:]),
        (batch, weights),
    )

    def add_chunk(total, chunk):
        part, norms = clipped_sum(params, *chunk)
        return jax.tree.map(jnp.add, total, part), norms

    zeros = jax.tree.map(jnp.zeros_like, params)
    total, norms = jax.lax.scan(add_chunk, zeros, chunks)
    norms = norms.reshape(whole)
    if rest:
        part, tail = clipped_sum(params, *jax.tree.map(lambda leaf: leaf[whole:], (batch, weights)))
        total = jax.tree.map(jnp.add, total, part)
        norms = jnp.concatenate([norms, tail])
    return total, norms
