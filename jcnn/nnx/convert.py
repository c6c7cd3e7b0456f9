"""Moving variables between a Linen model and its NNX twin.

A ``jcnn.nnx`` module keeps its variables under the names of its ``jcnn.nn`` twin: ``kernel``,
``bias``, ``scale``, ``alpha`` as ``nnx.Param`` (the Linen ``params`` collection) and ``mean``,
``var`` as ``nnx.BatchStat`` (``batch_stats``). Submodules keep their attribute names; the one
difference is a list or dict of layers, whose entries NNX addresses as ``layers/0`` or ``head/a``
and Linen names ``layers_0`` or ``head_a``. A module from :func:`jcnn.nnx.to_nnx` already uses
the Linen names.

So ``load_linen_variables(nnx_model, linen_model.init(...))`` gives the NNX twin the Linen model's
exact parameters and statistics, and ``linen_variables(nnx_model)`` gives them back for
``linen_model.apply``.

Example:
    >>> import jcnn
    >>> from flax import nnx
    >>> linen = jcnn.nn.Sequential([jcnn.nn.Conv(4, 3), jcnn.nn.BatchNorm()])
    >>> twin = jcnn.nnx.Sequential(
    ...     [jcnn.nnx.Conv(2, 4, 3, rngs=nnx.Rngs(1)), jcnn.nnx.BatchNorm(4, rngs=nnx.Rngs(1))])
    >>> x = jnp.ones((1, 6, 6, 2))
    >>> variables = linen.init(jax.random.key(0), x, train=False)
    >>> jcnn.nnx.load_linen_variables(twin, variables)
    >>> bool((twin(x, train=False) == linen.apply(variables, x, train=False)).all())
    True
    >>> sorted(jcnn.nnx.linen_variables(twin)["params"])
    ['layers_0', 'layers_1']
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
from flax import nnx
from flax.nnx import variablelib
from flax.traverse_util import flatten_dict, unflatten_dict

__all__ = ["linen_variables", "load_linen_variables"]


# Containers of submodules: Linen joins an entry's key or index onto the attribute's name.
_CONTAINERS = (nnx.List, nnx.Dict, list, tuple, dict)


def _linen_path(path, nodes: Mapping) -> tuple[str, ...]:
    """A variable's NNX state path as the Linen twin names it. On the way to the layer holding
    it, an entry of a list or dict of layers is joined onto its attribute (``("layers", 0)`` ->
    ``("layers_0",)``, ``("head", "a")`` -> ``("head_a",)``); below the layer (the nested dicts of
    a ``to_nnx`` module, already Linen's names) only a list index is. ``nodes`` maps the module's
    graph paths to their nodes."""
    layers = [
        depth
        for depth in range(len(path))
        if isinstance(nodes.get(path[:depth]), nnx.Module)
        and not isinstance(nodes.get(path[:depth]), _CONTAINERS)
    ]
    layer = max(layers, default=0)
    names: list[str] = []
    for depth, key in enumerate(path):
        parent = nodes.get(path[:depth])
        joined = isinstance(parent, _CONTAINERS) if depth < layer else isinstance(key, int)
        if names and joined:
            names[-1] = f"{names[-1]}_{key}"
        else:
            names.append(str(key))
    return tuple(names)


# Not state to move: rng streams, and values a call sowed (``nnx.Intermediate``, a tuple per
# name; Linen's ``intermediates`` collection), which are outputs of a call, not of the model.
_NOT_MOVED = (nnx.RngState, nnx.Intermediate)
_INTERMEDIATES = "intermediates"


def _variables(module: nnx.Module):
    """``((collection, *linen_path), variable)`` for every variable of ``module`` but rng state
    and sown intermediates."""
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module: expected an nnx.Module, got {type(module).__name__}")
    nodes = dict(nnx.iter_graph(module))
    for path, node in nodes.items():
        if isinstance(node, nnx.Variable) and not isinstance(node, _NOT_MOVED):
            collection = variablelib.variable_name_from_type(type(node), allow_register=True)
            yield (collection, *_linen_path(path, nodes)), node


def linen_variables(module: nnx.Module) -> dict:
    """The variables of ``module`` as the Linen twin's dict (``{"params": ..., "batch_stats":
    ...}``), for ``linen_model.apply``. The arrays are the module's (no copy)."""
    return unflatten_dict({key: variable[...] for key, variable in _variables(module)})


def load_linen_variables(module: nnx.Module, variables: Mapping) -> None:
    """Set every variable of ``module`` (in place) from the Linen twin's ``variables``.

    Every variable of ``module`` must be found with its shape and dtype, and every array of
    ``variables`` must be used: a mismatch raises and leaves ``module`` as it was. Sown values
    (Linen's ``intermediates``, NNX's ``nnx.Intermediate``) are outputs, not moved either way.
    """
    if not isinstance(variables, Mapping):
        raise TypeError(
            f"variables: expected the Linen variables dict, got {type(variables).__name__}"
        )
    # what a Linen call sowed (init returns it) is no variable of the twin
    given = flatten_dict(_plain({k: v for k, v in variables.items() if k != _INTERMEDIATES}))
    held = dict(given)  # ``given`` loses each entry as it is used
    updates = []
    for key, variable in _variables(module):
        where = "/".join(key)
        if key not in given:
            raise ValueError(
                f"variables: no {where} for {type(module).__name__}; {_near(held, key)}"
            )
        given_value = given.pop(key)
        try:
            new = jnp.asarray(given_value)
        except (TypeError, ValueError):  # ValueError: None, a ragged list
            raise TypeError(
                f"variables: {where} must be an array, got {type(given_value).__name__} "
                f"{given_value!r:.60}"
            ) from None
        old = variable[...]
        if new.shape != old.shape or new.dtype != old.dtype:
            raise ValueError(
                f"variables: {where} has shape {new.shape} dtype {new.dtype}, the module's is "
                f"{old.shape} {old.dtype}"
            )
        updates.append((variable, new))
    if given:
        raise ValueError(
            f"variables: {_names(given)} have no place in {type(module).__name__} (a different "
            "architecture?)"
        )
    for variable, new in updates:
        variable[...] = new


def _plain(tree):
    """Nested mappings (``dict``, ``FrozenDict``) as nested ``dict``."""
    if isinstance(tree, Mapping):
        return {key: _plain(value) for key, value in tree.items()}
    return tree


def _near(flat, key: tuple[str, ...]) -> str:
    """What ``flat`` holds where ``key`` was looked for: the names under its parent path, else
    the collections."""
    parent = key[:-1]
    siblings = sorted(name[-1] for name in flat if name[:-1] == parent)
    if siblings:
        return f"{'/'.join(parent)} holds {siblings}"
    return f"the variables' collections are {sorted({name[0] for name in flat})}"


def _names(flat) -> list[str]:
    return sorted("/".join(key) for key in flat)
