"""Per-parameter-group optimization: labels from parameter paths for ``optax.multi_transform``.

Recipes such as airbench94 train groups of parameters differently: the BatchNorm biases at 64x the
learning rate, the whitening layer frozen, its bias trained only for the first epochs. Optax
expresses this as ``optax.multi_transform(transforms, labels)``; ``label_by_path`` builds the
``labels`` from glob patterns on the ``/``-joined parameter paths, and ``active_for`` stops a
transformation's updates after a number of steps.

>>> import jax.numpy as jnp, optax
>>> params = {"whiten": {"kernel": jnp.ones(2), "bias": jnp.ones(1)},
...           "head": {"kernel": jnp.ones(3)}}
>>> labels = label_by_path([("whiten/kernel", "frozen"), ("*/bias", "bias")], default="rest")
>>> labels(params)
{'head': {'kernel': 'rest'}, 'whiten': {'bias': 'bias', 'kernel': 'frozen'}}
>>> tx = optax.multi_transform(
...     {"frozen": optax.set_to_zero(), "bias": optax.sgd(0.5), "rest": optax.sgd(0.1)}, labels)
>>> updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
>>> [float(u[0]) for u in jax.tree.leaves(updates)]
[-0.1, -0.5, 0.0]
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jcnn.functional._checks import check_int
from jcnn.train.schedules import _MAX_STEP

__all__ = [
    "label_by_path",
    "active_for",
    "path_name",
    "split_no_grad",
    "no_grad_epochs",
    "no_grad_at",
]


def path_name(path) -> str:
    """The ``/``-joined name of a ``jax.tree_util`` key path (``"group1/conv1/kernel"``)."""
    parts = []
    for key in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
        else:
            parts.append(str(key))
    return "/".join(parts)


def label_by_path(rules: Sequence[tuple[str, Hashable]], default: Hashable) -> Callable[[Any], Any]:
    """A function ``params -> labels`` for ``optax.multi_transform``.

    Each parameter gets the label of the first rule whose glob pattern (``fnmatch``: ``*`` also
    matches ``/``) matches its path, else ``default``. A pattern that matches no parameter, or
    only parameters an earlier rule already labels (a duplicate or a shadowed rule), is an error
    when the labels are computed: a misspelled or misordered rule never passes silently.

    Args:
        rules: ``(pattern, label)`` pairs, tried in order.
        default: the label of parameters no rule matches.

    Returns:
        A function of the parameter pytree returning a pytree of labels of the same structure.
    """
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise TypeError(f"rules: expected a sequence of (pattern, label) pairs, got {rules!r}")
    for rule in rules:
        # a list pair is what a JSON or YAML config holds
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise TypeError(f"rules: expected (pattern: str, label) pairs, got {rule!r}")
    rules = [tuple(rule) for rule in rules]

    def labels(params):
        used = [False] * len(rules)

        def label(path, _):
            name = path_name(path)
            for index, (pattern, value) in enumerate(rules):
                if fnmatch.fnmatchcase(name, pattern):
                    used[index] = True
                    return value
            return default

        tree = jax.tree_util.tree_map_with_path(label, params)
        unused = [pattern for (pattern, _), hit in zip(rules, used, strict=True) if not hit]
        if unused:
            names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
            for index, (pattern, _) in enumerate(rules):
                matched = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
                if used[index] or not matched:
                    continue
                # it matches parameters, each already labelled by an earlier rule
                earlier = []
                for n in matched:
                    first = next(j for j, (p, _) in enumerate(rules) if fnmatch.fnmatchcase(n, p))
                    shown = f"{rules[first][0]!r} (rule {first})"
                    if shown not in earlier:
                        earlier.append(shown)
                raise ValueError(
                    f"rules: pattern {pattern!r} (rule {index}) is shadowed by the earlier "
                    f"rule(s) {', '.join(earlier)}: every parameter it matches ({matched}) "
                    "takes their label"
                )
            raise ValueError(
                f"rules: pattern(s) {unused} match no parameter; the parameters are {names}"
            )
        return tree

    return labels


def split_no_grad(
    params, patterns: Sequence[str], name: str = "no_grad"
) -> tuple[list, Callable, Callable]:
    """Split ``params`` into the leaves to differentiate and those named by ``patterns``.

    What the training steps use for their ``no_grad`` option: differentiating
    ``loss(merge(leaves))`` with respect to ``leaves`` never computes the gradient of the other
    parameters (nor, upstream, anything only they need), where a gradient masked afterwards would
    still be computed.

    Args:
        params: the parameter pytree.
        patterns: glob patterns on the ``/``-joined parameter paths (as in ``label_by_path``;
            each must match some parameter).
        name: what the errors call ``patterns``.

    Returns:
        ``(leaves, merge, fill)``: the leaves matching no pattern, in ``params``' leaf order;
        ``merge(leaves)`` rebuilds ``params`` with the named parameters as they are in ``params``
        (constants to differentiation); ``fill(gradients)`` rebuilds a pytree like ``params``
        from the leaves' gradients, zeros at the named parameters.

    >>> params = {"whiten": {"kernel": jnp.ones(2), "bias": jnp.ones(1)}, "head": jnp.ones(3)}
    >>> leaves, merge, fill = split_no_grad(params, ["whiten/*"])
    >>> [leaf.shape for leaf in leaves]
    [(3,)]
    >>> grads = jax.grad(lambda leaves: sum(jnp.sum(p) for p in jax.tree.leaves(merge(leaves))))
    >>> fill(grads(leaves))["whiten"]["kernel"].tolist()
    [0.0, 0.0]
    """
    expected = f"{name}: expected a sequence of glob patterns (str), got"
    if isinstance(patterns, (str, bytes)) or not isinstance(patterns, Iterable):
        raise TypeError(f"{expected} {patterns!r}")
    patterns = tuple(patterns)  # read once: a generator would be empty from the second pass on
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{expected} {patterns!r}")
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [path_name(path) for path, _ in paths]
    leaves = [leaf for _, leaf in paths]
    unused = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unused:
        shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
        raise ValueError(f"{name}: pattern(s) {unused} match no parameter; the parameters: {shown}")
    frozen = [any(fnmatch.fnmatchcase(path, p) for p in patterns) for path in names]

    def merge(trainable):
        given = iter(trainable)
        return treedef.unflatten(
            [leaf if skip else next(given) for leaf, skip in zip(leaves, frozen, strict=True)]
        )

    def fill(gradients):
        given = iter(gradients)
        return treedef.unflatten(
            [
                jnp.zeros_like(leaf) if skip else next(given)
                for leaf, skip in zip(leaves, frozen, strict=True)
            ]
        )

    return [leaf for leaf, skip in zip(leaves, frozen, strict=True) if not skip], merge, fill


def no_grad_epochs(value, name: str = "no_grad") -> dict[str, int]:
    """A ``no_grad`` setting as ``{pattern: first epoch without its gradient}``: glob patterns
    (from epoch 0) or a mapping ``pattern -> epoch``, checked."""
    if isinstance(value, Mapping):
        epochs = dict(value)
    elif isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"{name}: expected glob patterns or a mapping pattern -> epoch, got {value!r}"
        )
    else:
        epochs = dict.fromkeys(value, 0)
    for pattern, epoch in epochs.items():
        if not isinstance(pattern, str):
            raise TypeError(f"{name}: expected str patterns, got {pattern!r}")
        check_int(epoch, f"{name}[{pattern!r}]", low=0)
    return epochs


def no_grad_at(value, epoch: int) -> tuple[str, ...]:
    """The patterns of a ``no_grad`` setting (as ``no_grad_epochs`` takes it) in force at
    ``epoch``: what ``fit`` passes to the training steps then.

    >>> no_grad_at({"whiten/kernel": 0, "whiten/bias": 3}, 2)
    ('whiten/kernel',)
    """
    return tuple(pattern for pattern, first in no_grad_epochs(value).items() if epoch >= first)


def active_for(transform: optax.GradientTransformation, steps: int) -> optax.GradientTransformation:
    """``transform`` for its first ``steps`` updates, zero updates after (the parameters freeze).

    The wrapped transformation's state keeps advancing; only its output is masked (replaced by
    zeros, so that an infinite or NaN gradient after the freeze leaves the parameters as they are,
    as PyTorch's ``requires_grad=False`` does). ``steps`` is at most ``2**31 - 1``, the largest
    update count (optax counts in int32).
    """
    if not all(callable(getattr(transform, name, None)) for name in ("init", "update")):
        raise TypeError(
            f"transform: expected an optax.GradientTransformation, got {type(transform).__name__}"
        )
    try:
        steps = check_int(steps, "steps", low=0)
    except (TypeError, ValueError) as error:  # a wrong type stays a TypeError
        raise type(error)(f"steps: expected a non-negative int, got {steps!r}") from None
    if steps > _MAX_STEP:
        raise ValueError(
            f"steps: expected at most {_MAX_STEP} (the update count is int32), got {steps}"
        )

    def init(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update(updates, state, params=None):
        del params
        # where, not a product with 0: 0 * inf and 0 * nan are nan, which moved the "frozen"
        # parameters (and a momentum buffer that once held inf would keep doing so)
        active = state.count < steps
        updates = jax.tree.map(lambda u: jnp.where(active, u, jnp.zeros_like(u)), updates)
        return updates, optax.ScaleByScheduleState(count=optax.safe_int32_increment(state.count))

    # the state of the optax.scale_by_schedule this replaces: checkpoints keep their structure
    return optax.chain(transform, optax.GradientTransformation(init, update))
