"""The training state: one pytree holding everything a step reads and writes."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jcnn.functional._checks import check_key

__all__ = ["TrainState"]

# Initialization runs once. Run eagerly, every parameter shape compiles its own random-number
# program (0.3-1 s each on a 2-core CPU, seconds for a small network) and every layer's forward
# pass runs op by op, so it is one compiled program, compiled for the least compile-plus-run
# time: unoptimized (LLVM -O0) it compiles 2-4 s faster but draws the parameters ~6x slower (about
# 90 against 15 ns each on a 2-core CPU). Unoptimized wins up to ~30M parameters (ResNet-50,
# 23.5M: 8.6 against 10.2 s) and loses above (VGG-11, 133M: 12.0 against 5.0 s).
_UNOPTIMIZED_INIT_UP_TO = 30_000_000


def _init(model, rngs, sample_input):
    return model.init(rngs, sample_input, train=False)


def _unoptimized_and_optimized(init, **jit_options):
    unoptimized = jax.jit(
        init, compiler_options={"xla_backend_optimization_level": 0}, **jit_options
    )
    return unoptimized, jax.jit(init, **jit_options)


_INIT_PROGRAMS = _unoptimized_and_optimized(_init, static_argnames="model")


def _init_variables(model, rngs, sample_input):
    """``model.init(rngs, sample_input, train=False)`` as one compiled program, reused for an
    equal model (a model with unhashable attributes, e.g. a list, compiles each time). Inside
    another trace (the caller's ``jit`` or ``eval_shape``), the caller's program holds it: a
    nested ``jit`` cannot take compiler options."""
    if isinstance(jnp.zeros(()), jax.core.Tracer):
        return _init(model, rngs, sample_input)
    try:
        hash(model)
    except TypeError:
        programs = _unoptimized_and_optimized(functools.partial(_init, model))
        args = (rngs, sample_input)
    else:
        programs = _INIT_PROGRAMS
        args = (model, rngs, sample_input)
    unoptimized, optimized = programs
    size = sum(leaf.size for leaf in jax.tree.leaves(unoptimized.eval_shape(*args)))
    return (unoptimized if size <= _UNOPTIMIZED_INIT_UP_TO else optimized)(*args)


def check_model(model) -> None:
    """Refuse what jcnn's training cannot run: a class, an NNX module, an object without Flax's
    ``init``/``apply``, a module whose ``__call__`` takes no ``train``."""
    if isinstance(model, type):
        raise TypeError(
            f"model: expected a Flax module instance such as {model.__name__}(...), got the "
            f"class {model.__name__}"
        )
    if isinstance(model, nnx.Module):  # to_nnx's has an `init` too, and failed deep in Flax
        raise TypeError(
            f"model: expected a Flax Linen module (jcnn's training runs its init and apply), "
            f"got the NNX module {type(model).__name__}; train an NNX model with "
            "nnx.Optimizer under nnx.jit (docs/nnx.md), or give fit its Linen twin"
        )
    if not hasattr(model, "init") or not hasattr(model, "apply"):
        raise TypeError(f"model: expected a Flax module, got {type(model).__name__}")
    _check_takes_train(model)


def _check_takes_train(model) -> None:
    """Raise a ``TypeError`` naming ``model`` unless its ``__call__`` takes ``train=`` (``create``
    and every step pass it; Flax's own error names neither the argument nor the rule)."""
    try:
        signature = inspect.signature(type(model).__call__)
    except (TypeError, ValueError):  # not introspectable: leave it to the call
        return
    kinds = {parameter.kind for parameter in signature.parameters.values()}
    if "train" in signature.parameters or inspect.Parameter.VAR_KEYWORD in kinds:
        return
    raise TypeError(
        f"model: expected a module whose __call__ takes (x, train: bool) (jcnn's training passes "
        f"train=True or False), got {type(model).__name__}.__call__{signature}"
    )


@flax.struct.dataclass
class TrainState:
    """Parameters, BatchNorm statistics, optimizer state, step count and a PRNG key.

    The arrays are pytree leaves (they are what ``jit`` traces, donates, shards and
    checkpoints); ``apply_fn`` (the model's ``apply``) and ``tx`` (the Optax optimizer) are static
    fields, so a ``TrainState`` can be passed straight to the jit-compiled steps.

    Attributes:
        params: the model's ``params`` collection (float32).
        batch_stats: the model's ``batch_stats`` collection (``{}`` for a model without BatchNorm).
        opt_state: the optimizer's state.
        step: number of optimizer steps taken, an int32 scalar.
        key: the PRNG key from which each step's dropout key is derived (``fold_in(key, step)``).
    """

    params: Any
    batch_stats: Any
    opt_state: Any
    step: jnp.ndarray
    key: jnp.ndarray
    apply_fn: Callable = flax.struct.field(pytree_node=False)
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    @classmethod
    def create(
        cls,
        model: nn.Module,
        tx: optax.GradientTransformation,
        key: jax.Array,
        sample_input: jax.Array,
    ) -> TrainState:
        """Initialize a model's variables and the optimizer state.

        Args:
            model: a Flax Linen module whose ``__call__`` takes ``(x, train: bool)``.
            tx: an Optax optimizer (e.g. from ``jcnn.train.optimizer``), or an
                ``optax.MultiSteps`` (gradient accumulation) of one.
            key: a ``jax.random`` key; split into the init key and the state's dropout key.
            sample_input: an array with the input's shape and dtype (a batch of one is enough).

        Returns:
            A ``TrainState`` at step 0.
        """
        check_model(model)
        if isinstance(tx, optax.MultiSteps):  # gradient accumulation, as fit takes it
            tx = tx.gradient_transformation()
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                f"tx: expected an optax.GradientTransformation or optax.MultiSteps, got "
                f"{type(tx).__name__}"
            )
        if not hasattr(sample_input, "shape"):
            raise TypeError(f"sample_input: expected an array, got {type(sample_input).__name__}")
        check_key(key)
        if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
            key = jax.random.key_data(key)
        init_key, dropout_key = jax.random.split(key)
        variables = _init_variables(model, {"params": init_key, "dropout": init_key}, sample_input)
        params = variables["params"]
        # copied: an optimizer may hand out arrays it holds (optax.add_noise its key), which the
        # train steps' buffer donation would delete under it
        opt_state = jax.tree.map(
            lambda leaf: leaf.copy() if isinstance(leaf, jax.Array) else leaf, tx.init(params)
        )
        return cls(
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=opt_state,
            step=jnp.zeros((), jnp.int32),
            key=dropout_key,
            apply_fn=model.apply,
            tx=tx,
        )

    def variables(self) -> dict:
        """The model's variables for ``apply``: params plus batch_stats where there are any."""
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}

    def arrays(self) -> dict:
        """The state's arrays as a plain dict (what a checkpoint stores)."""
        return {
            "params": self.params,
            "batch_stats": self.batch_stats,
            "opt_state": self.opt_state,
            "step": self.step,
            "key": self.key,
        }

    def with_arrays(self, arrays: dict) -> TrainState:
        """This state with its arrays replaced by ``arrays`` (same structure, e.g. restored)."""
        return self.replace(**arrays)
