"""Per-example gradients, their norms, clipping, and DP-SGD as an optax transformation.

A loss is written once, for a batch: ``loss_fn(params, batch) -> scalar`` where ``batch`` is a
pytree of arrays sharing a leading batch axis (e.g. ``(images, labels)``). The per-example
gradient of example ``i`` is the gradient of ``loss_fn`` on the batch made of example ``i`` alone
(``jax.vmap`` over examples, each given as a batch of one, so models that expect a batch axis
work unchanged). For a mean loss, the batch gradient is the mean of the per-example ones.

``per_example_grads`` evaluates ``vmap(grad(loss_fn))`` with one rewrite that XLA:CPU needs: a
dense layer's per-example weight gradient is an outer product (a ``dot_general`` whose contracted
dimensions all have size 1, e.g. ``(B, 1, 2450) x (B, 1, 500)``) that JAX's transpose rule
follows with a ``transpose`` to the kernel's ``(in, out)`` order. XLA:CPU computes the product in
``(B, out, in)`` order and then copies it into ``(B, in, out)``: two writes of the largest array of
the whole computation (314 MB for LeNet-5's ``fc1`` at batch 64), the second one a transposing
copy. Here such a pair is one broadcast multiply written directly in the final order. The values
are the same (a product of single terms is exact); only the evaluation order changes. Outer
products inside ``lax.scan``, ``cond`` or ``while`` bodies are left as they are.

On Linux CPUs the rest of the cost is mostly the kernel handing out fresh memory: the per-example
gradients are ``B`` times the parameters (322 MB for LeNet-5 at batch 64), a new buffer on each
call, which XLA's allocator (glibc ``malloc``) maps in 4 KiB pages, each faulted and zeroed on
first write. Starting Python with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` makes glibc ask for
transparent huge pages; measured on a 2-core machine, LeNet-5's per-example gradients went from
about 190 ms to 105 ms (the batch gradient: 50 ms).

DP-SGD (Abadi et al. 2016) clips each example's gradient to L2 norm at most ``C`` (over all
parameters together), sums, adds Gaussian noise of standard deviation ``noise_multiplier * C``
and divides by the batch size.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import math
from collections.abc import Callable, Hashable, Iterator
from typing import Any, NamedTuple

import flax.linen as linen
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.extend import core as jax_core

from jcnn.functional._checks import (
    NOISE_STREAM,
    _is_real_scalar,
    check_bool,
    check_rate,
    check_real_or_traced,
    check_seed,
    float32_or_wider,
    seed_key,
)
from jcnn.functional.norm import PER_EXAMPLE_TRACE

__all__ = [
    "per_example_trace",
    "per_example_grads",
    "per_example_grad_norms",
    "clip_per_example",
    "dp_aggregate",
    "dp_sgd",
]


def _batch_size(batch, name: str = "batch") -> int:
    leaves = jax.tree.leaves(batch)
    if not leaves:
        raise ValueError(f"{name}: expected a pytree of arrays with a leading batch axis, got none")
    sizes = set()
    for leaf in leaves:
        if not hasattr(leaf, "shape") or len(leaf.shape) == 0:
            raise ValueError(
                f"{name}: every leaf needs a leading batch axis, got {type(leaf).__name__} "
                f"with shape {getattr(leaf, 'shape', None)}"
            )
        sizes.add(leaf.shape[0])
    if len(sizes) != 1:
        shapes = [tuple(leaf.shape) for leaf in leaves]
        raise ValueError(f"{name}: leaves disagree on the batch size (leading axis): {shapes}")
    return sizes.pop()


def _check_params(params, name: str = "params", why: str = "each is differentiated") -> None:
    """Every leaf of ``params`` real floating point: each is differentiated (``jax.grad`` failed
    on an integer leaf without naming it) and its gradient's squared norm is ``g ** 2``."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            dtype = np.asarray(leaf).dtype
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"{name}: expected real floating-point leaves ({why}), got "
                f"{dtype} at {jax.tree_util.keystr(path) or 'the root'}"
            )


# the public functions that can share BatchNorm statistics across the examples (axis_name)
_TAKES_AXIS_NAME = ("per_example_grads", "per_example_grad_norms")


def _batch_norm_message(where: str) -> str:
    """The error for train-mode BatchNorm statistics inside ``where``, naming the ways out."""
    if where in _TAKES_AXIS_NAME:
        shared = f"{where}(..., axis_name=NAME)"
    else:  # the ghost and DP functions: an example's gradient must not depend on the others
        shared = f"per_example_grads(..., axis_name=NAME) ({where} takes no axis_name)"
    return (
        f"{where}: the model computes BatchNorm statistics in training mode. Per-example "
        "gradients treat each example as a batch of one, so each would be normalized by its own "
        "statistics (wrong gradients, silently; zero after a dense layer), and in a real batch an "
        "example's gradient depends on every other example. Choose one: (1) frozen statistics: "
        "call the model with train=False (the running statistics are constants); (2) the batch's "
        f"statistics shared across examples: BatchNorm(axis_name=NAME) and {shared} (the mean of "
        "the per-example gradients is then the batch gradient, but an example's gradient depends "
        "on the others: no DP guarantee); (3) GroupNorm instead: "
        "jcnn.analysis.replace_batch_norm(model)."
    )


def _need_mapped_axis(layer: str, axis_name) -> None:
    """A Flax BatchNorm with batch statistics in a per-example trace: a ``ValueError`` unless its
    ``axis_name`` names an axis mapped around the model."""
    message = PER_EXAMPLE_TRACE.get()
    if axis_name is None:
        raise ValueError(message)
    try:
        lax.axis_size(axis_name)
    except NameError as error:  # JAX's "unbound axis name: b"
        raise ValueError(
            f"axis_name: {layer}(axis_name={axis_name!r}) names no axis mapped around the model "
            f"({error}); {message}"
        ) from None


_LINEN_BATCH_NORM_CALL = inspect.unwrap(linen.BatchNorm.__call__)


# True while a ``replace_batch_norm`` model runs: its interceptor (which runs after the guard
# below) computes every BatchNorm call as a GroupNorm, so none computes batch statistics.
BATCH_NORM_REPLACED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "BATCH_NORM_REPLACED", default=False
)


def _guard_flax_batch_norm(next_fun, args, kwargs, context):
    """Method interceptor raising on a train-mode ``flax.linen.BatchNorm`` without an axis name."""
    module = context.module
    # linen.BatchNorm's own __call__, also reached through a subclass (whose __call__ may take
    # other arguments, and calls it through super())
    if (
        getattr(context.orig_method, "func", None) is _LINEN_BATCH_NORM_CALL
        and not BATCH_NORM_REPLACED.get()
    ):
        frozen = linen.merge_param(
            "use_running_average",
            module.use_running_average,
            kwargs.get("use_running_average", args[1] if len(args) > 1 else None),
        )
        if not frozen:
            _need_mapped_axis("flax.linen.BatchNorm", module.axis_name)
    return next_fun(*args, **kwargs)


def _guard_nnx_batch_norm() -> None:
    """Make ``flax.nnx.BatchNorm`` raise like ``_guard_flax_batch_norm`` while a per-example
    function traces (NNX has no method interception). Installed once; outside those traces the
    wrapper only calls the original."""
    from flax import nnx

    original = nnx.BatchNorm.__call__
    if getattr(original, "_jcnn_per_example_guard", False):
        return

    def guarded(self, x, use_running_average=None, **kwargs):
        frozen = self.use_running_average if use_running_average is None else use_running_average
        if PER_EXAMPLE_TRACE.get() is not None and frozen is not None and not frozen:
            _need_mapped_axis("flax.nnx.BatchNorm", self.axis_name)
        return original(self, x, use_running_average, **kwargs)

    guarded._jcnn_per_example_guard = True
    functools.update_wrapper(guarded, original)
    nnx.BatchNorm.__call__ = guarded


# Part of jit's cache key: a jitted function that loss_fn calls (say a jax.jit-compiled forward
# pass) is traced again inside the per-example functions, where the guard below sees its
# BatchNorm, instead of reusing a trace made outside them (silently wrong gradients).
_PER_EXAMPLE_JIT_KEY = jax.make_user_context(None) if hasattr(jax, "make_user_context") else None


@contextlib.contextmanager
def per_example_trace(where: str) -> Iterator[None]:
    """While tracing a per-example function: BatchNorm with batch statistics raises ``ValueError``.

    Covers ``F.batch_norm``/``jcnn.nn.BatchNorm`` (``train=True`` without ``axis_name``) and
    ``flax.linen.BatchNorm`` (and its subclasses) and ``flax.nnx.BatchNorm``
    (``use_running_average=False`` without ``axis_name``), and each with an ``axis_name`` that no
    enclosing map binds, also inside a ``jax.jit``-compiled function traced before outside (on JAX
    versions with ``jax.make_user_context``). ``where`` names the public function in the message.
    """
    _guard_nnx_batch_norm()
    token = PER_EXAMPLE_TRACE.set(_batch_norm_message(where))
    jit_key = contextlib.nullcontext()
    if _PER_EXAMPLE_JIT_KEY is not None:
        jit_key = _PER_EXAMPLE_JIT_KEY(where)
    try:
        with jit_key, linen.intercept_methods(_guard_flax_batch_norm):
            yield
    finally:
        PER_EXAMPLE_TRACE.reset(token)


def _check_chunk_size(chunk_size, axis_name, size) -> None:
    if chunk_size is not None and (
        not isinstance(chunk_size, (int, np.integer))
        or isinstance(chunk_size, bool)
        or chunk_size < 1
    ):
        raise ValueError(f"chunk_size: expected a positive int or None, got {chunk_size!r}")
    if axis_name is not None and chunk_size is not None and chunk_size < size:
        raise ValueError(
            f"chunk_size: {chunk_size} < batch size {size} with axis_name={axis_name!r} would "
            "compute the shared statistics per chunk; use chunk_size=None"
        )


def _check_finite(value, name: str, *, allow_zero: bool = False) -> None:
    """A finite number > 0 (>= 0 with ``allow_zero``): the clip norm, noise multiplier and
    denominator of the DP functions."""
    if isinstance(value, jax.core.Tracer):
        return  # a traced value (an argument of a jitted function) is checked by its caller
    # a real scalar: not a bool, a complex number or a 0-d array of bools or strings; compared
    # as a Python float, as a concrete array closed over by a jitted function would be traced
    if not _is_real_scalar(value) or not (
        (0 <= float(value) if allow_zero else 0 < float(value)) and float(value) < math.inf
    ):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name}: expected a finite number {bound}, got {value!r}")


def per_example_grads(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    chunk_size: int | None = None,
    axis_name: Hashable | None = None,
) -> Any:
    """Gradient of ``loss_fn`` for each example of ``batch`` separately.

    Wrap the call in ``jax.jit`` (or call it inside a jitted function): unjitted, every call traces
    and dispatches each operation separately (LeNet-5: seconds, against milliseconds jitted).

    A model whose BatchNorm uses batch statistics (training mode) raises ``ValueError``: one
    example alone would be normalized by its own statistics. Use the running statistics
    (``train=False``), share the batch's statistics (``axis_name``, below) or
    ``replace_batch_norm``; see docs/privacy.md.

    A random key ``loss_fn`` closes over is the same key for every example: each draws the same
    dropout mask, where a batched forward pass draws one mask per example. Put one key per
    example in ``batch`` (``(images, labels, jax.random.split(key, B))``) to draw as the batch
    would, each example its own mask (as ``fit``'s DP-SGD steps do).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``.
      params: the parameters (any pytree).
      batch: a pytree of arrays with a common leading batch axis ``B``.
      chunk_size: compute ``chunk_size`` examples at a time (``lax.scan`` over vmapped
        chunks) to bound the memory of the intermediates; ``None`` vmaps the whole batch. On
        XLA:CPU the loop costs time: convolutions inside it miss XLA's fast library kernels and
        the stacked result is zero-filled first (LeNet-5, batch 64, chunks of 16: 2x slower).
      axis_name: name of the mapped example axis, for layers that reduce over the batch
        (``BatchNorm(axis_name=...)``): its statistics are then those of the whole batch, shared by
        the examples, in the forward and in the backward pass. The gradient of example ``i`` is
        the part of the batch gradient that flows through example ``i``'s own activations (the
        derivative of the sum of all losses with respect to a copy of the parameters used by
        example ``i`` alone): they sum to the gradient of the summed loss (their mean is the batch
        gradient of a mean loss), but each depends on the other examples, so clipping it bounds
        no one's influence (no DP guarantee). Incompatible with a ``chunk_size`` smaller than
        the batch.

    Returns:
      A pytree like ``params`` whose leaves have a leading axis ``B``.

    >>> loss = lambda w, batch: jnp.mean((batch[0] @ w - batch[1]) ** 2)
    >>> x, y = jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([1.0, 0.0])
    >>> per_example_grads(loss, jnp.zeros(2), (x, y)).tolist()
    [[-2.0, 0.0], [0.0, 0.0]]
    """
    return _per_example_grads(loss_fn, params, batch, chunk_size, axis_name, "per_example_grads")


def _per_example_grads(loss_fn, params, batch, chunk_size, axis_name, where):
    size = _batch_size(batch)
    _check_chunk_size(chunk_size, axis_name, size)
    _check_params(params)
    grad_fn = jax.grad(_scalar_loss(loss_fn))
    if size == 0:
        # vmap over zero examples would still run the model, and its gathers (a cross entropy's
        # label lookup) raise on an empty axis
        return jax.tree.map(
            lambda leaf: jnp.zeros((0, *jnp.shape(leaf)), jnp.result_type(leaf)), params
        )

    def one(params, example):
        return grad_fn(params, jax.tree.map(lambda leaf: leaf[None], example))

    batched = _with_outer_products_in_place(jax.vmap(one, in_axes=(None, 0), axis_name=axis_name))
    with per_example_trace(where):
        if chunk_size is None or chunk_size >= size:
            return batched(params, batch)
        return _in_chunks(batched, params, batch, size, chunk_size)


def _scalar_loss(loss_fn: Callable) -> Callable:
    """``loss_fn`` checked, when traced, to return a real scalar.

    A ``jax.jit``-compiled ``loss_fn`` is traced through its Python function: JAX would reuse
    the jitted function's cached trace, which neither the BatchNorm guard nor the ghost layer
    search (both run while tracing) would see.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn: expected a callable, got {type(loss_fn).__name__}")
    while isinstance(loss_fn, jax.stages.Wrapped) and hasattr(loss_fn, "__wrapped__"):
        loss_fn = loss_fn.__wrapped__

    def checked(params, batch):
        loss = loss_fn(params, batch)
        shape = getattr(loss, "shape", None)
        dtype = getattr(loss, "dtype", None)
        if shape != () or not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                "loss_fn: expected a real floating scalar (the loss of the batch), got "
                f"{type(loss).__name__} with shape {shape} and dtype {dtype}"
            )
        return loss

    return checked


def _in_chunks(batched, params, batch, size: int, chunk_size: int):
    """``batched`` on ``chunk_size`` examples at a time (``lax.scan``), then the remainder."""
    num_chunks, rest = divmod(size, chunk_size)
    whole = num_chunks * chunk_size
    chunks = jax.tree.map(
        lambda leaf: leaf[:whole].reshape(num_chunks, chunk_size, *leaf.shape[1:]), batch
    )
    _, grads = lax.scan(lambda carry, chunk: (carry, batched(params, chunk)), None, chunks)
    grads = jax.tree.map(lambda leaf: leaf.reshape(whole, *leaf.shape[2:]), grads)
    if rest:
        tail = batched(params, jax.tree.map(lambda leaf: leaf[whole:], batch))
        grads = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), grads, tail)
    return grads


def _is_outer_product(eqn) -> bool:
    """A real floating ``dot_general`` whose contracted dimensions all have size 1."""
    if eqn.primitive is not lax.dot_general_p or eqn.params.get("out_sharding") is not None:
        return False
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs, rhs = (var.aval for var in eqn.invars)
    return all(lhs.shape[d] == 1 for d in lhs_contract) and all(
        jnp.issubdtype(dtype, jnp.floating)
        for dtype in (lhs.dtype, rhs.dtype, eqn.outvars[0].aval.dtype)
    )


def _transposed_outer_products(jaxpr) -> dict:
    """``{id(transpose eqn): dot eqn}`` for each outer product used only by one ``transpose``."""
    users: dict[Any, list] = {}
    for eqn in jaxpr.eqns:
        for var in eqn.invars:
            if isinstance(var, jax_core.Var):
                users.setdefault(var, []).append(eqn)
    outputs = {var for var in jaxpr.outvars if isinstance(var, jax_core.Var)}
    folded = {}
    for eqn in jaxpr.eqns:
        if not _is_outer_product(eqn):
            continue
        (out,) = eqn.outvars
        consumers = users.get(out, [])
        if out not in outputs and len(consumers) == 1 and consumers[0].primitive is lax.transpose_p:
            folded[id(consumers[0])] = eqn
    return folded


def _needs_rewrite(jaxpr) -> bool:
    return bool(_transposed_outer_products(jaxpr)) or any(
        eqn.primitive is jax_core.primitives.jit_p and _needs_rewrite(eqn.params["jaxpr"].jaxpr)
        for eqn in jaxpr.eqns
    )


def _outer_product(dot_eqn, lhs, rhs, permutation):
    """``transpose(dot_general(lhs, rhs), permutation)`` as one broadcast multiply.

    ``dot_general`` orders its result (batch dims, lhs free dims, rhs free dims); each operand,
    its size-1 contracted dimensions squeezed, is broadcast straight to its place in the
    transposed result.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dot_eqn.params["dimension_numbers"]
    out = dot_eqn.outvars[0].aval
    position = {axis: i for i, axis in enumerate(permutation)}  # dot axis -> result axis
    shape = tuple(out.shape[axis] for axis in permutation)
    lhs_free = [d for d in range(lhs.ndim) if d not in lhs_contract and d not in lhs_batch]
    rhs_free = [d for d in range(rhs.ndim) if d not in rhs_contract and d not in rhs_batch]

    def place(operand, batch_dims, free_dims, first_free_axis, contract_dims):
        dot_axis = {d: i for i, d in enumerate(batch_dims)}
        dot_axis.update({d: first_free_axis + i for i, d in enumerate(free_dims)})
        kept = [d for d in range(operand.ndim) if d not in contract_dims]
        operand = lax.squeeze(operand.astype(out.dtype), tuple(contract_dims))
        return lax.broadcast_in_dim(operand, shape, [position[dot_axis[d]] for d in kept])

    num_batch = len(lhs_batch)
    return place(lhs, lhs_batch, lhs_free, num_batch, lhs_contract) * place(
        rhs, rhs_batch, rhs_free, num_batch + len(lhs_free), rhs_contract
    )


def _evaluate(jaxpr, consts, *args):
    """``jax.core.eval_jaxpr`` that writes each transposed outer product once, in final order,
    and inlines the nested ``jit`` calls that contain one."""
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))

    def read(var):
        return var.val if isinstance(var, jax_core.Literal) else env[var]

    folded = _transposed_outer_products(jaxpr)
    skipped = {id(eqn) for eqn in folded.values()}
    for eqn in jaxpr.eqns:
        if id(eqn) in skipped:
            continue
        if id(eqn) in folded:
            dot_eqn = folded[id(eqn)]
            outs = [_outer_product(dot_eqn, *map(read, dot_eqn.invars), eqn.params["permutation"])]
        elif eqn.primitive is jax_core.primitives.jit_p and _needs_rewrite(
            eqn.params["jaxpr"].jaxpr
        ):
            inner = eqn.params["jaxpr"]
            outs = _evaluate(inner.jaxpr, inner.consts, *map(read, eqn.invars))
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(
                    *map(read, eqn.invars), **eqn.primitive.get_bind_params(eqn.params)
                )
            if not eqn.primitive.multiple_results:
                outs = [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(var) for var in jaxpr.outvars]


def _with_outer_products_in_place(fn):
    """``fn`` evaluated through ``_evaluate`` when its jaxpr has a transposed outer product."""

    def rewritten(*args):
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
        if not _needs_rewrite(closed.jaxpr):
            return fn(*args)
        outs = _evaluate(closed.jaxpr, closed.consts, *jax.tree.leaves(args))
        return jax.tree.unflatten(jax.tree.structure(out_shape), outs)

    return rewritten


def _widened(leaf) -> jax.Array:
    """``leaf`` in float32, or in its own floating type if wider (float64 stays float64)."""
    return leaf.astype(float32_or_wider(leaf.dtype))


def _sqrt_of_square(square) -> jax.Array:
    """``sqrt(square)`` whose derivative at ``square == 0`` is 0, not ``inf``: an example whose
    gradient is exactly zero would otherwise put ``0 * inf = NaN`` into the derivative of its norm
    and of every clipped sum (its clip factor, 1, is locally constant there). A NaN stays NaN
    (an example whose gradient has a NaN has no norm, not norm 0)."""
    zero = square == 0
    return jnp.where(zero, 0, jnp.sqrt(jnp.where(zero, 1, square))).astype(square.dtype)


def _norms(per_example, size: int | None = None) -> jax.Array:
    """The ``(B,)`` L2 norms of the examples' gradients; ``size`` gives ``B`` for a pytree
    without leaves (parameters without any leaf: every norm is 0)."""
    leaves = jax.tree.leaves(per_example)
    if size is None:
        size = leaves[0].shape[0]
    # the flattened size is spelled out: reshape(0, -1) cannot infer it for an empty batch
    squares = [
        jnp.sum(jnp.square(_widened(leaf)).reshape(size, math.prod(leaf.shape[1:])), axis=1)
        for leaf in leaves
    ]
    return _sqrt_of_square(sum(squares, jnp.zeros(size, jnp.float32)))


def per_example_grad_norms(
    loss_fn: Callable,
    params: Any,
    batch: Any,
    *,
    chunk_size: int | None = None,
    axis_name: Hashable | None = None,
) -> jax.Array:
    """L2 norm of each example's gradient over all parameters together, shape ``(B,)``.

    The per-example gradients are materialized; ``ghost_norms`` computes the same norms layer by
    layer without them. Wrap the call in ``jax.jit``.

    Args:
      loss_fn, params, batch, chunk_size, axis_name: as in ``per_example_grads``.

    >>> loss = lambda w, batch: jnp.mean((batch[0] @ w - batch[1]) ** 2)
    >>> x, y = jnp.array([[3.0, 4.0], [0.0, 1.0]]), jnp.array([0.0, 0.0])
    >>> per_example_grad_norms(loss, jnp.ones(2), (x, y)).tolist()
    [70.0, 2.0]
    """
    return _norms(
        _per_example_grads(loss_fn, params, batch, chunk_size, axis_name, "per_example_grad_norms"),
        _batch_size(batch),
    )


def _clip_factors(norms: jax.Array, l2_norm_clip, out_dtypes=()) -> jax.Array:
    """The ``(B,)`` factors ``min(1, C / ||g_i||)`` that clip each example's gradient to norm at
    most ``C``, the quotient lowered by two units in the last place of the norms' type: scaling
    every value of ``g_i`` by ``C / ||g_i||`` rounds, and the clipped gradient's norm came out one
    unit above ``C`` for about half of the examples clipped (a quarter measured in float32). Where
    the clipped values are then rounded to a narrower type of ``out_dtypes`` (bfloat16), lowered
    by a unit of that type too: rounding each value can raise the norm by half a unit (0.2%)."""
    margin = 1 - 2 * np.finfo(norms.dtype).eps
    narrowest = max((np.finfo(d).eps for d in out_dtypes), default=0.0)
    if narrowest > np.finfo(norms.dtype).eps:
        margin -= narrowest
    if isinstance(l2_norm_clip, int):  # a Python int past int32 overflowed as a JAX argument
        l2_norm_clip = float(l2_norm_clip)
    return jnp.minimum(1.0, l2_norm_clip / jnp.maximum(norms, 1e-12) * margin)


def clip_per_example(per_example: Any, l2_norm_clip: float) -> Any:
    """Scale each example's gradient to L2 norm at most ``l2_norm_clip`` (all leaves together).

    Args:
      per_example: a pytree whose leaves have a leading batch axis (``per_example_grads``).
      l2_norm_clip: the bound ``C`` > 0.

    Returns:
      The clipped per-example gradients (same structure and dtypes), each of norm at most ``C``
      as returned: in bfloat16 or float16 the factors are lowered by a unit of that type, so
      that rounding the clipped values cannot lift a norm above ``C``.
    """
    _check_finite(l2_norm_clip, "l2_norm_clip")
    _batch_size(per_example, "per_example")
    # an integer leaf would be scaled by a factor truncated to 0 (silently all zeros)
    _check_params(per_example, "per_example", "gradients, scaled by the clip factors")
    leaves = jax.tree.leaves(per_example)
    factor = _clip_factors(_norms(per_example), l2_norm_clip, [leaf.dtype for leaf in leaves])

    def scale(leaf):
        # in float32 or wider, rounded once: a factor rounded to bfloat16 first put half of the
        # clipped norms up to 0.46% above C
        wide = _widened(leaf)
        return (wide * factor.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(wide.dtype)).astype(
            leaf.dtype
        )

    return jax.tree.map(scale, per_example)


# A leaf of at least this many values gets its own noise draw, fused into its addition (no noise
# array is written); the smaller leaves share one stream drawn in blocks of this many values (a
# draw per bias or norm scale would compile a generator each).
_NOISE_BLOCK = 1 << 16


def _standard_normal(key, shape: tuple[int, ...]) -> jax.Array:
    """Float32 ``N(0, 1)`` draws of ``shape`` from XLA's threefry bit generator keyed by four words
    of ``key`` (``lax.rng_bit_generator``: on CPU about 3x faster than ``jax.random.normal``'s
    threefry), mapped to the normal by the inverse error function as ``jax.random.normal`` does."""

    @jax.custom_batching.custom_vmap
    def threefry_bits(words):
        return lax.rng_bit_generator(
            words, shape, dtype=jnp.uint32, algorithm=lax.RandomAlgorithm.RNG_THREE_FRY
        )[1]

    # rng_bit_generator's own batching rule draws every batch element from the first key: under
    # vmap each key gets the bits it gets alone, as with jax.random
    @threefry_bits.def_vmap
    def _(axis_size, in_batched, words):
        return lax.map(threefry_bits, words), True

    bits = threefry_bits(jax.random.bits(key, (4,), jnp.uint32))
    # the 23 high bits as the mantissa of a float in [1, 2): uniform on [0, 1) in steps of 2^-23
    unit = lax.bitcast_convert_type((bits >> 9) | np.uint32(0x3F800000), jnp.float32) - 1.0
    above_minus_one = np.nextafter(np.float32(-1), np.float32(0))  # erf_inv(-1) is -inf
    return np.float32(math.sqrt(2)) * lax.erf_inv(jnp.maximum(2.0 * unit - 1.0, above_minus_one))


def _add_gaussian_noise(key, tree: Any, std) -> Any:
    """``tree`` plus independent ``N(0, std^2)`` noise on every element (drawn in float32, added
    in float32 or in the tree's widest floating type if wider).

    With ``own, shared = jax.random.split(key)``: leaf ``j`` (flattening order) of at least
    ``_NOISE_BLOCK`` values gets ``_standard_normal(fold_in(own, j), leaf.shape)``; the smaller
    leaves, flattened and concatenated in order, get one stream whose block ``i`` is
    ``_standard_normal(fold_in(shared, i), (_NOISE_BLOCK,))``, added in place block by block
    inside a loop. Either way the noise is drawn where it is added, after the tree is computed,
    and never held whole.
    """
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return tree
    dtype = jnp.result_type(jnp.float32, *leaves)
    own, shared = jax.random.split(key)

    def noised(leaf, noise):
        return (leaf.astype(dtype) + std * noise).astype(leaf.dtype)

    out = list(leaves)
    for j, leaf in enumerate(leaves):
        if leaf.size >= _NOISE_BLOCK:
            out[j] = noised(leaf, _standard_normal(jax.random.fold_in(own, j), leaf.shape))
    small = [j for j, leaf in enumerate(leaves) if leaf.size < _NOISE_BLOCK]
    sizes = [leaves[j].size for j in small]
    blocks = -(-sum(sizes) // _NOISE_BLOCK)
    if blocks:
        flat = jnp.concatenate([leaves[j].reshape(-1).astype(dtype) for j in small])
        flat = jnp.pad(flat, (0, blocks * _NOISE_BLOCK - flat.size))

        def add_block(i, flat):
            noise = _standard_normal(jax.random.fold_in(shared, i), (_NOISE_BLOCK,))
            start = i * _NOISE_BLOCK
            block = lax.dynamic_slice(flat, (start,), (_NOISE_BLOCK,))
            return lax.dynamic_update_slice(flat, noised(block, noise), (start,))

        flat = lax.fori_loop(0, blocks, add_block, flat)
        offsets = np.cumsum([0, *sizes])
        for j, begin, stop in zip(small, offsets[:-1], offsets[1:], strict=True):
            out[j] = flat[begin:stop].reshape(leaves[j].shape).astype(leaves[j].dtype)
    return jax.tree.unflatten(treedef, out)


class DPAggregateState(NamedTuple):
    """State of ``dp_aggregate``: the random key of the next noise draw."""

    key: Any


def dp_aggregate(
    l2_norm_clip: float, noise_multiplier: float, seed: int = 0
) -> optax.GradientTransformation:
    """Optax transformation: per-example gradients in, clipped noised mean gradient out.

    ``update(per_example, state)`` takes per-example gradients (leaves with a leading batch axis
    ``B``, from ``per_example_grads``) and returns ``(sum_i clip(g_i) + N(0, (sigma C)^2)) / B``
    with the structure of ``params``.

    Args:
      l2_norm_clip: the per-example bound ``C`` > 0.
      noise_multiplier: ``sigma`` >= 0 (0 gives clipping alone).
      seed: seed of the noise (its key ``fold_in(seed_key(seed), 5)``, a stream no loader or
        model of the same seed draws from); each update draws with a fresh key.

    Returns:
      An ``optax.GradientTransformation``.
    """
    _check_finite(noise_multiplier, "noise_multiplier", allow_zero=True)
    _check_finite(l2_norm_clip, "l2_norm_clip")
    # checked here, not in init (where a float or a string failed inside jax.random.key)
    seed = check_seed(seed)

    def init(params):
        del params
        return DPAggregateState(jax.random.fold_in(seed_key(seed), NOISE_STREAM))

    def update(per_example, state, params=None):
        del params
        size = _batch_size(per_example, "per_example")
        if size == 0:
            raise ValueError(
                "per_example: expected at least one example, got an empty batch (its mean is "
                "0 / 0); for Poisson-sampled batches use private_grad with a denominator"
            )
        # clipped, summed, noised and averaged in float32 or wider, rounded once: in bfloat16
        # each step rounded, the mean came out up to 12 ulps from the float32 one rounded
        _check_params(per_example, "per_example", "gradients, scaled by the clip factors")
        clipped = clip_per_example(jax.tree.map(_widened, per_example), l2_norm_clip)
        key, next_key = jax.random.split(state.key)
        summed = jax.tree.map(lambda leaf: jnp.sum(leaf, axis=0), clipped)
        noised = _add_gaussian_noise(key, summed, noise_multiplier * l2_norm_clip)
        mean = jax.tree.map(
            lambda leaf, like: (leaf / size).astype(like.dtype), noised, per_example
        )
        return mean, DPAggregateState(next_key)

    return optax.GradientTransformation(init, update)


def dp_sgd(
    learning_rate: float | optax.Schedule,
    l2_norm_clip: float,
    noise_multiplier: float,
    *,
    seed: int = 0,
    momentum: float | None = None,
    nesterov: bool = False,
) -> optax.GradientTransformation:
    """DP-SGD: ``dp_aggregate`` followed by ``optax.sgd``; feed it per-example gradients.

    Args:
      learning_rate: a finite number >= 0 or an optax schedule.
      l2_norm_clip, noise_multiplier, seed: as in ``dp_aggregate``.
      momentum, nesterov: as in ``optax.sgd``: ``momentum`` None (none) or in [0, 1), ``nesterov``
        a bool, True only with a momentum.

    Returns:
      An ``optax.GradientTransformation``: ``updates, state = tx.update(per_example_grads(...),
      state)`` then ``optax.apply_updates(params, updates)``.

    >>> loss = lambda w, batch: jnp.mean((batch[0] @ w - batch[1]) ** 2)
    >>> x, y = jnp.array([[3.0, 4.0], [0.0, 1.0]]), jnp.array([0.0, 0.0])
    >>> w = jnp.ones(2)
    >>> tx = dp_sgd(0.1, l2_norm_clip=1.0, noise_multiplier=0.0)
    >>> updates, _ = tx.update(per_example_grads(loss, w, (x, y)), tx.init(w))
    >>> [round(u, 3) for u in updates.tolist()]  # -0.1 * mean of the unit-norm clipped gradients
    [-0.03, -0.09]
    """
    aggregate = dp_aggregate(l2_norm_clip, noise_multiplier, seed)
    # checked as jcnn.train.optimizer checks them: Optax took None or NaN as a rate, momentum 2
    # (diverging), nesterov=1 or "yes", and failed inside its update on a string
    learning_rate = check_rate(learning_rate, "learning_rate")
    if momentum is not None:
        momentum = check_real_or_traced(momentum, "momentum", low=0, high=1, high_open=True)
    if check_bool(nesterov, "nesterov") and momentum is None:
        raise ValueError("nesterov: Nesterov momentum needs a momentum, got momentum=None")
    return optax.chain(
        aggregate,
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )
