"""Abstract run of a Flax model that records every module call (shapes only, no FLOPs spent).

``trace_layers`` runs ``model.init`` under ``jax.eval_shape`` and ``flax.linen.intercept_methods``
and returns, in call order, one ``LayerCall`` per module ``__call__``: the module (with its
attributes), its path, its input and output shapes and whether it called other modules (a leaf
calls none). Tensors are matched by identity while tracing, so a call also knows which earlier
call produced its input. An array made outside the layers (a residual sum, a function such as
``flax.linen.avg_pool`` between two layers) is followed in the traced program back to the layer
outputs it comes from: ``LayerCall.pointwise`` says whether only per-position operations (sums,
products, activations, channel concatenation) made it from them.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.extend import core as jax_core

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
    # inside nn.scan or nn.vmap: traced once (or twice, to initialize), not once per step or slice;
    # inside nn.cond, nn.switch or nn.while_loop: traced in every branch, run in one (or a body
    # traced once, run any number of times); inside nn.map_variables: run twice by an initializing
    # call (init=True: once to create the variables, once on the mapped ones), once by apply
    lifted: bool = False
    # False where the input (with no source and no input_of) or the output (a new array of a
    # module that calls others) was made outside the layers by an operation that mixes positions
    pointwise: bool = True
    consumers: list[int] = dataclasses.field(default_factory=list)
    # the multiply-adds of the matrix products and convolutions the call's own code computes from
    # the model's input, not counting the modules it calls (an attention's QK^T, a Gram matrix);
    # None where one runs inside a loop or branch, or convolves an input-dilated array
    products: int | None = 0
    # what they are: "matmul", "conv"
    product_kinds: set[str] = dataclasses.field(default_factory=set)


def accepts_train(model: nn.Module) -> bool:
    """Whether ``model.__call__`` takes a ``train`` argument (a wrapper that passes its arguments
    on to its ``wrapped`` module, as ``replace_batch_norm``'s does, takes one where it does)."""
    if isinstance(getattr(model, "wrapped", None), nn.Module):
        return accepts_train(model.wrapped)
    try:
        return "train" in inspect.signature(model.__call__).parameters
    except (TypeError, ValueError):
        return False


def check_linen_model(model) -> None:
    """Refuse what is not a Flax Linen module, naming an NNX module as such (its class name
    alone, ``Conv``, reads like the Linen layer that was expected)."""
    if isinstance(model, nn.Module):
        return
    kind = type(model)
    if any(base.__module__.startswith("flax.nnx") for base in kind.__mro__):
        raise TypeError(
            f"model: expected a flax.linen.Module, got the NNX module {kind.__module__}."
            f"{kind.__qualname__}; this tool traces Linen models: pass the Linen model (jcnn.nn "
            "has a twin of every jcnn.nnx module, and jcnn.nnx.linen_variables gives its "
            "variables)"
        )
    raise TypeError(f"model: expected a flax.linen.Module, got {kind.__name__}")


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
    check_linen_model(model)
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
                str(part).startswith(("scan(", "vmap(", "map_variables("))
                for part in getattr(context.module.scope, "debug_path", ())
            ),
        )
        if stack:
            stack[-1].is_leaf = False
        if call.source is not None:
            calls[call.source].consumers.append(call.index)
        calls.append(call)
        stack.append(call)
        if call.source is None and call.input_of is None and call.parent is not None:
            if hasattr(x, "shape") and hasattr(x, "dtype"):  # made outside the layers
                x = checkpoint_name(x, f"{_MARK}in-{call.index}")
                args = (x, *args[1:])
        inputs.append((call.index, id(x)))
        is_wrapper = callable(getattr(context.module, "traced_as", None))
        if is_wrapper:
            wrappers.append((path, context.module))
        try:
            with jax.named_scope(f"{_MARK}call-{call.index}"):  # its products say whose they are
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
            if not call.returns_input and call.returns is None and hasattr(y, "dtype"):
                # a new array (a layer's result, or one a container made): marked in the program
                y = checkpoint_name(y, f"{_MARK}out-{call.index}")
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

    try:
        program, variables = jax.make_jaxpr(init, return_shape=True)(
            jax.ShapeDtypeStruct(input_shape, dtype)
        )
    except (ValueError, TypeError) as error:
        # a layer refusing its input ("x: ...") refuses the shape the caller chose, often one
        # without the batch axis: name the argument they passed, not the layer's
        if type(error) not in (ValueError, TypeError) or not str(error).startswith("x:"):
            raise
        raise type(error)(
            f"input_shape: the model refused an input of shape {input_shape} (input_shape "
            f"includes the batch axis): {error}"
        ) from error
    alive.clear()
    _check_pointwise(calls, program.jaxpr)
    _mark_branches(calls, program.jaxpr)
    _count_products(calls, program.jaxpr)
    return calls, variables


_MARK = "jcnn-trace-"
# Call-like primitives: their body is followed as if inlined.
_CALL_PRIMITIVES = {
    "pjit",
    "jit",
    "closed_call",
    "core_call",
    "remat2",
    "checkpoint",
    "custom_jvp_call",
    "custom_vjp_call",
    "custom_vjp_call_jaxpr",
}
# Operations that compute each output position from the same position of their operands.
_ELEMENTWISE = {
    *"add sub mul div rem max min neg abs sign exp exp2 log log1p expm1 tanh logistic".split(),
    *"sin cos tan sqrt rsqrt cbrt pow integer_pow square erf erfc erf_inv atan2 floor".split(),
    *"ceil round clamp select_n convert_element_type reduce_precision copy copy_p".split(),
    *"stop_gradient is_finite eq ne lt le gt ge and or not xor name broadcast_in_dim".split(),
    "squeeze",
}


def _body(eqn):
    """The jaxpr of a call-like equation, None for other equations."""
    if eqn.primitive.name not in _CALL_PRIMITIVES:
        return None
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        body = eqn.params.get(key)
        if body is not None:
            body = getattr(body, "jaxpr", body)
            return body if len(body.invars) == len(eqn.invars) else None
    return None


def _keeps_positions(eqn) -> bool:
    """Whether ``eqn`` maps positions to the same positions (channels-last arrays)."""
    name = eqn.primitive.name
    if name in _ELEMENTWISE:
        return True
    shapes = [getattr(v.aval, "shape", ()) for v in eqn.invars]
    if name == "concatenate":  # along the channels only
        return eqn.params["dimension"] == len(shapes[0]) - 1
    if name == "slice":  # channels, or a subsampling from the first position (x[:, ::2, ::2])
        start, limit = eqn.params["start_indices"], eqn.params["limit_indices"]
        return all(a == 0 for a in start[:-1]) and tuple(limit[:-1]) == tuple(shapes[0][:-1])
    if name == "pad":  # channels only (a shortcut's zero channels)
        return all(tuple(c) == (0, 0, 0) for c in eqn.params["padding_config"][:-1])
    if name == "reshape":  # the channel axis split into several
        shape, out = shapes[0], eqn.outvars[0].aval.shape
        return len(out) >= len(shape) and tuple(out[: len(shape) - 1]) == tuple(shape[:-1])
    return False


def _dependent(jaxpr, dependent_inputs, found: set) -> None:
    """Add to ``found`` the variables of ``jaxpr`` computed from its dependent inputs."""
    found.update(v for v, d in zip(jaxpr.invars, dependent_inputs, strict=True) if d)
    for eqn in jaxpr.eqns:
        ins = [isinstance(v, jax_core.Var) and v in found for v in eqn.invars]
        body = _body(eqn)
        if body is not None:
            _dependent(body, ins, found)
            outs = [isinstance(v, jax_core.Var) and v in found for v in body.outvars]
        else:
            outs = [any(ins)] * len(eqn.outvars)
        found.update(v for v, d in zip(eqn.outvars, outs, strict=True) if d)


def _reached(jaxpr, var, dependent) -> set[int] | None:
    """The inputs of ``jaxpr`` that ``var`` is computed from by per-position operations, back to
    the marked outputs of layers; None where another operation (a pool, a reduction, a roll)
    sits on the way."""
    producers = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    stack, seen, reached = [var], set(), set()
    while stack:
        v = stack.pop()
        if not isinstance(v, jax_core.Var) or v in seen or v not in dependent:
            continue
        seen.add(v)
        eqn = producers.get(v)
        if eqn is None:
            if v in jaxpr.invars:
                reached.add(jaxpr.invars.index(v))
            continue
        if eqn.primitive.name == "name" and str(eqn.params["name"]).startswith(f"{_MARK}out-"):
            continue  # a layer's output
        body = _body(eqn)
        if body is not None:
            inner = _reached(body, body.outvars[eqn.outvars.index(v)], dependent)
            if inner is None:
                return None
            stack.extend(eqn.invars[i] for i in inner)
        elif _keeps_positions(eqn):
            stack.extend(eqn.invars)
        else:
            return None
    return reached


def _check_pointwise(calls: list[LayerCall], jaxpr) -> None:
    """Set ``pointwise`` of the calls whose marked input or output was made outside the layers
    from the layers' outputs (or the model's input) by an operation that mixes positions."""
    dependent: set = set()
    _dependent(jaxpr, [True] * len(jaxpr.invars), dependent)

    def visit(program):
        for eqn in program.eqns:
            name = str(eqn.params.get("name", "")) if eqn.primitive.name == "name" else ""
            if name.startswith(_MARK):
                kind, index = name[len(_MARK) :].split("-")
                call = calls[int(index)]
                if kind == "in" or not call.is_leaf:
                    var = eqn.invars[0]
                    if _reached(program, var, dependent) is None:
                        call.pointwise = False
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)
                    if isinstance(sub, jax_core.Jaxpr):
                        visit(sub)

    visit(jaxpr)


# Control flow whose traced bodies say nothing of how often they run: a ``cond`` (nn.cond,
# nn.switch) traces every branch and runs one, a ``while`` (nn.while_loop) runs its body any
# number of times.
_BRANCHING = {"cond", "while"}


def _mark_branches(calls: list[LayerCall], jaxpr, inside: bool = False) -> None:
    """Set ``lifted`` of the calls whose marked output or input sits inside a ``cond`` branch or a
    ``while`` body: what they count would be summed over branches that never run together."""
    for eqn in jaxpr.eqns:
        name = str(eqn.params.get("name", "")) if eqn.primitive.name == "name" else ""
        if inside and name.startswith(_MARK):
            calls[int(name[len(_MARK) :].split("-")[1])].lifted = True
        branching = inside or eqn.primitive.name in _BRANCHING
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                sub = getattr(sub, "jaxpr", sub)
                if isinstance(sub, jax_core.Jaxpr):
                    _mark_branches(calls, sub, branching)


_CALL_SCOPE = re.compile(re.escape(_MARK) + r"call-(\d+)")


def _count_products(calls: list[LayerCall], jaxpr) -> None:
    """Set each call's ``products`` and ``product_kinds`` from the matrix products and
    convolutions of the traced program computed from the model's input (not the initializers'),
    given to the innermost call whose scope they ran in."""
    dependent: set = set()
    _dependent(jaxpr, [True] * len(jaxpr.invars), dependent)

    def add(index: int, kind: str, macs: int | None) -> None:
        call = calls[index]
        call.product_kinds.add(kind)
        call.products = None if call.products is None or macs is None else call.products + macs

    def visit(program, outer: str, looped: bool) -> None:
        for eqn in program.eqns:
            scope = f"{outer}/{eqn.source_info.name_stack}"
            reads_input = looped or any(
                isinstance(v, jax_core.Var) and v in dependent for v in eqn.invars
            )
            body = _body(eqn)
            if body is not None:
                visit(body, scope, looped)
                continue
            kind = _PRODUCTS.get(eqn.primitive.name)
            owners = _CALL_SCOPE.findall(scope)
            if kind is not None and reads_input and owners:
                add(int(owners[-1]), kind, None if looped else _multiply_adds(eqn))
            for value in eqn.params.values():  # a scan's, loop's or branch's body
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)
                    if isinstance(sub, jax_core.Jaxpr) and reads_input:
                        visit(sub, scope, True)

    visit(jaxpr, "", False)


_PRODUCTS = {"dot_general": "matmul", "conv_general_dilated": "conv"}


def _multiply_adds(eqn) -> int | None:
    """Multiply-adds of a ``dot_general`` or ``conv_general_dilated`` equation: each output value
    sums over the contracted axes (a conv: its window and input channels per group); None for a
    conv over an input-dilated array, whose products with the inserted zeros are not computed
    work."""
    out = math.prod(eqn.outvars[0].aval.shape)
    lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
    if eqn.primitive.name == "dot_general":
        (contracting, _), _ = eqn.params["dimension_numbers"]
        return out * math.prod(lhs[axis] for axis in contracting)
    if any(d != 1 for d in eqn.params["lhs_dilation"]):
        return None
    out_features = eqn.params["dimension_numbers"].rhs_spec[0]
    return out * math.prod(rhs) // rhs[out_features]


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
