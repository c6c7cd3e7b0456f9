"""Shared by the tests of the modern networks: a jitted training step and PyTorch helpers."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jcnn.nn import BatchNorm


def check_training_step(model, x, labels, *, rngs=None):
    """One jitted SGD step on cross-entropy: finite loss, every parameter gets a nonzero gradient,
    every running statistic moves; returns the updated variables."""
    variables = jax.jit(model.init)(jax.random.key(0), x)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    optimizer = optax.sgd(0.01)
    opt_state = optimizer.init(params)

    def loss_fn(params, batch_stats):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            x,
            train=True,
            mutable=["batch_stats"],
            rngs=rngs,
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        ).mean()
        return loss, updates.get("batch_stats", {})

    @jax.jit
    def step(params, batch_stats, opt_state):
        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(params, updates), new_stats, opt_state, loss, grads

    new_params, new_stats, _, loss, grads = step(params, batch_stats, opt_state)
    assert np.isfinite(float(loss))
    for path, grad in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.isfinite(grad).all(), path
        assert float(jnp.abs(grad).max()) > 0, f"no gradient reaches {jax.tree_util.keystr(path)}"
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_stats, batch_stats)
    assert all(jax.tree.leaves(moved)), "a BatchNorm's running statistics did not move"
    return {"params": new_params, "batch_stats": new_stats}


def randomize_torch(torch, module, seed: int = 0):
    """Fill every parameter and buffer of ``module`` with random values (variances positive)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            values = torch.randn(tensor.shape, generator=generator) * 0.2
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            elif name.endswith("layer_scale"):
                values = values + 1.0  # large enough that the residual branches count
            tensor.copy_(values)


def torch_forward(torch, module, x):
    """``module`` on channels-last NumPy ``x``, in eval mode, as a channels-last NumPy array."""
    module.eval()
    inputs = torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())
    with torch.no_grad():
        out = module(inputs).numpy()
    return np.moveaxis(out, 1, -1) if out.ndim > 2 else out


def check_running_stats_follow_torch(torch, model, twin, x, convert, *, rngs=None):
    """One train-mode forward of ``model`` and of its PyTorch ``twin`` on channels-last ``x``,
    from the twin's weights (``convert(model, state_dict, shape)`` imports them): with
    ``bn_unbiased_running_var=True`` every BatchNorm's new running mean and variance equal the
    twin's; with the default the variance's batch term is the biased one, ``(n - 1) / n`` times
    the twin's, ``n`` the values per channel that BatchNorm normalized."""
    variables = convert(model, twin.state_dict(), x.shape)
    twin.train()
    with torch.no_grad():
        twin(torch.from_numpy(np.moveaxis(x, -1, 1).copy()))
    expected = jax.tree.leaves(convert(model, twin.state_dict(), x.shape)["batch_stats"])
    old = jax.tree_util.tree_flatten_with_path(variables["batch_stats"])[0]
    momentum = model.bn_momentum
    tolerance = {"rtol": 1e-4, "atol": 1e-5}  # float32 drift over a deep train-mode forward
    for unbiased in (True, False):
        apply = functools.partial(
            model.clone(bn_unbiased_running_var=unbiased).apply,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=lambda module, _: isinstance(module, BatchNorm),
        )
        _, state = jax.jit(apply)(variables, jnp.asarray(x), rngs=rngs)
        new = jax.tree.leaves(state["batch_stats"])
        assert len(new) == len(old) == len(expected)
        differs = False
        for (path, before), after, torch_after in zip(old, new, expected, strict=True):
            where = f"{jax.tree_util.keystr(path)} unbiased={unbiased}"
            if path[-1].key == "var" and not unbiased:
                differs |= not np.allclose(after, torch_after, **tolerance)
                n = _normalized_per_channel(state["intermediates"], path[:-1])
                torch_after = momentum * before + (torch_after - momentum * before) * (n - 1) / n
            np.testing.assert_allclose(after, torch_after, err_msg=where, **tolerance)
        if not unbiased:
            assert differs, "the default running variance should differ from PyTorch's"


def _normalized_per_channel(intermediates, path) -> int:
    for key in path:
        intermediates = intermediates[key.key]
    (output,) = intermediates["__call__"]
    return output.size // output.shape[-1]
