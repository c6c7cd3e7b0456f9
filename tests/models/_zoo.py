"""Shared by the tests of the modern networks: a jitted training step and PyTorch helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax


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
