"""Abstract run of a Flax model that records every module call (shapes only, no FLOPs spent).

``trace_layers`` runs ``model.init`` under ``jax.eval_shape`` and ``flax.linen.intercept_methods``
and returns, in call order, one ``LayerCall`` per module ``__call__``: the module (with its
attributes), its path, its input and output shapes and whether it called other modules (a leaf
calls none). Tensors are matched by identity while tracing, so a call also knows which earlier
call produced its input.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jcnn.functional._checks import check_size_sequence


@dataclasses.dataclass
class LayerCall:
    """One ``__call__`` of a module during the abstract run."""

    index: int
    path: tuple[str, ...]
    module: nn.Module
    input_shape: tuple[int, ...] | None
    output_shape: tuple[int, ...] | None = None
    parent: int | None = None
    is_leaf: bool = True
    source: int | None = None  # index of the call whose output is this call's input
    # with no source: the enclosing call that received this very input (a projection's x)
    input_of: int | None = None
    # the output is an array made before the call returned, returned as is: its very input, or
    # the output of the call ``returns`` (a layer inside, or an earlier one for an identity)
    returns_input: bool = False
    returns: int | None = None
    train: object = None  # the call's ``train`` argument, where it was given one
    # inside nn.scan or nn.vmap: traced once (or twice, to initialize), not once per step or slice
    lifted: bool = False
    consumers: list[int] = dataclasses.field(default_factory=list)


def accepts_train(model: nn.Module) -> bool:
    """Whether ``model.__call__`` takes a ``train`` argument (a wrapper that passes its arguments
    on to its ``wrapped`` module, as ``replace_batch_norm``'s does, takes one where it does)."""
    if isinstance(getattr(model, "wrapped", None), nn.Module):
        return accepts_train(model.wrapped)
    try:
        return "train" in inspect.signature(model.__call__).parameters
    except (TypeError, ValueError):
        return False


def check_input_shape(input_shape) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints (batch axis included); a 1-D integer array
    (``np.array(x.shape)``) is a shape too."""
    if hasattr(input_shape, "shape") and hasattr(input_shape, "dtype"):
        if len(input_shape.shape) != 1 or isinstance(input_shape, jax.core.Tracer):
            raise TypeError(
                "input_shape: expected a shape tuple with the batch axis, e.g. (1, 28, 28, 1), got "
                f"an array of shape {tuple(input_shape.shape)} (pass its .shape)"
            )
        if not jnp.issubdtype(input_shape.dtype, jnp.integer):
            raise TypeError(
                "input_shape: expected a shape tuple with the batch axis, e.g. (1, 28, 28, 1), got "
                f"a 1-D array of dtype {input_shape.dtype} (sizes are ints)"
            )
        input_shape = np.asarray(input_shape)
    if isinstance(input_shape, (int, str)) or not isinstance(input_shape, (Sequence, np.ndarray)):
        raise TypeError(
            "input_shape: expected a shape tuple with the batch axis, e.g. (1, 28, 28, 1), "
            f"got {input_shape!r}"
        )
    return check_size_sequence(input_shape, "input_shape", example="(1, 28, 28, 1)", minimum=1)


def check_input_dtype(dtype) -> None:
    """Refuse what is not a numeric dtype (integer dtypes pass: some models take ints)."""
    try:
        numeric = dtype is not None and (
            jnp.issubdtype(dtype, jnp.number) or jnp.issubdtype(dtype, jnp.bool_)
        )
    except TypeError:
        numeric = False
    if not numeric:
        raise TypeError(
            f"dtype: expected a numeric dtype such as jnp.float32 or jnp.int32, got {dtype!r}"
        )


def variables_path(scope) -> tuple[str, ...]:
    """Where a module's variables sit: the names up its chain of scopes. ``module.path`` can say
    otherwise under ``nn.share_scope`` (a wrapper such as ``FoldedModel`` keeps its model's
    variables in its own scope while the model's layers report paths under the model's name)."""
    names = []
    while scope.parent is not None:
        names.append(scope.name)
        scope = scope.parent
    # a lifted transform (scan, vmap) runs its body in a root scope of its own, at its path
    return tuple(scope.path) + tuple(reversed(names))


def trace_layers(model: nn.Module, input_shape, dtype=jnp.float32):
    """Run ``model.init`` abstractly on zeros of ``input_shape``; returns ``(calls, variables)``.

    ``variables`` holds ``jax.ShapeDtypeStruct`` leaves (nothing is allocated). A wrapper module
    (``FoldedModel``, ``replace_batch_norm``'s) says what the layers it runs compute with a method
    ``traced_as(path, module, x)``: the layer to record for ``module``'s call on ``x`` at ``path``
    (relative to the wrapper's variables), or ``None`` where that call runs as the identity (it
    is then no call).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a flax.linen.Module, got {type(model).__name__}")
    input_shape = check_input_shape(input_shape)
    check_input_dtype(dtype)
    calls: list[LayerCall] = []
    stack: list[LayerCall] = []
    inputs: list[tuple[int, int]] = []  # (index, id of its input) of each running call
    producer: dict[int, int] = {}
    # Keeps every traced array alive so that ``id`` stays unique during the run.
    alive: list = []
    wrappers: list[tuple[tuple[str, ...], nn.Module]] = []  # the running ones, outermost first

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not args:
            return next_fun(*args, **kwargs)
        path = variables_path(context.module.scope)
        x = args[0]
        module = context.module
        for wrapper_path, wrapper in reversed(wrappers):
            if path[: len(wrapper_path)] == wrapper_path:
                module = wrapper.traced_as(path[len(wrapper_path) :], module, x)
                if module is None:
                    return next_fun(*args, **kwargs)
        call = LayerCall(
            index=len(calls),
            path=path,
            module=module,
            input_shape=tuple(x.shape) if hasattr(x, "shape") else None,
            parent=stack[-1].index if stack else None,
            source=producer.get(id(x)),
            input_of=next((index for index, i in reversed(inputs) if i == id(x)), None),
            train=kwargs.get("train", args[1] if len(args) > 1 else None),
            lifted=any(
                str(part).startswith(("scan(", "vmap("))
                for part in getattr(context.module.scope, "debug_path", ())
            ),
        )
        if stack:
            stack[-1].is_leaf = False
        if call.source is not None:
            calls[call.source].consumers.append(call.index)
        calls.append(call)
        stack.append(call)
        inputs.append((call.index, id(x)))
        is_wrapper = callable(getattr(context.module, "traced_as", None))
        if is_wrapper:
            wrappers.append((path, context.module))
        try:
            y = next_fun(*args, **kwargs)
        finally:
            stack.pop()
            inputs.pop()
            if is_wrapper:
                wrappers.pop()
        if hasattr(y, "shape"):
            call.output_shape = tuple(y.shape)
            call.returns_input = y is x
            call.returns = producer.get(id(y))
            # an array a layer inside made (or an earlier layer, for an identity) keeps that
            # producer: a container returning its last layer's output is not where it came from
            producer.setdefault(id(y), call.index)
            alive.append(y)
        alive.append(x)
        return y

    kwargs = {"train": False} if accepts_train(model) else {}

    def init(x):
        with nn.intercept_methods(interceptor):
            return model.init(jax.random.key(0), x, **kwargs)

    variables = jax.eval_shape(init, jax.ShapeDtypeStruct(input_shape, dtype))
    alive.clear()
    return calls, variables


def subtree(variables, collection: str, path: Sequence[str]):
    """The nested dict of ``variables[collection]`` at ``path`` (``{}`` where absent)."""
    node = variables.get(collection, {})
    for name in path:
        if not hasattr(node, "get"):
            return {}
        node = node.get(name, {})
    return node


def leaf_calls(calls: list[LayerCall]) -> list[LayerCall]:
    """The calls that called no other module (the layers), in call order."""
    return [call for call in calls if call.is_leaf]
