"""Weights from PyTorch: a ``state_dict`` (or a weights file) as jcnn variables.

The layers of the jcnn model, in the order they run, are matched with the modules of the
``state_dict``, in the order PyTorch registered them (a module is the key up to its last dot:
``layer1.0.conv1.weight`` belongs to ``layer1.0.conv1``). This holds for networks written the
usual way (modules defined in the order ``forward`` uses them), e.g. torchvision's VGG and ResNet
and the twins in the tests. Conversions:

- ``Conv``: weight ``(C_out, C_in // groups, *window)`` (OIHW) to kernel ``(*window, C_in // groups,
  C_out)`` (HWIO); ``bias`` unchanged.
- ``Dense``: weight ``(out, in)`` transposed; when the dense layer follows a ``Flatten`` of a
  feature map, its input axis is permuted from PyTorch's NCHW flatten order (W fastest) to jcnn's
  NHWC order (C fastest).
- ``BatchNorm``: ``weight``, ``bias`` to ``scale``, ``bias``; ``running_mean``, ``running_var`` to
  ``batch_stats`` ``mean``, ``var`` (``num_batches_tracked`` is ignored).

Every shape is checked; a mismatch raises ``ValueError`` naming the PyTorch key and the jcnn
parameter. Files are read as data only: ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jcnn import nn as jnn
from jcnn.analysis._trace import leaf_calls, subtree, trace_layers

__all__ = ["from_torch_state_dict", "load_torch_weights"]

_SKIPPED_KEYS = ("num_batches_tracked",)


def _as_numpy(value, key: str) -> np.ndarray:
    if hasattr(value, "detach"):
        if getattr(value, "is_complex", lambda: False)():
            raise TypeError(
                f"state_dict[{key!r}]: expected a real tensor, got dtype {value.dtype}; jcnn "
                "parameters are real and the imaginary part would be lost"
            )
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # NumPy has no bfloat16: widen exactly
            value = value.float()
        value = value.numpy()
    if not hasattr(value, "shape") or not hasattr(value, "dtype"):
        raise TypeError(
            f"state_dict[{key!r}]: expected a tensor or array, got {type(value).__name__}"
        )
    array = np.asarray(value)
    if np.issubdtype(array.dtype, np.complexfloating):
        raise TypeError(
            f"state_dict[{key!r}]: expected a real tensor, got dtype {array.dtype}; jcnn "
            "parameters are real and the imaginary part would be lost"
        )
    if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        raise TypeError(
            f"state_dict[{key!r}]: expected a floating (or integer) tensor, got dtype {array.dtype}"
        )
    return array


def _group(state_dict: Mapping) -> list[tuple[str, dict[str, np.ndarray]]]:
    """``(module prefix, {parameter name: array})`` in the state_dict's order."""
    groups: dict[str, dict[str, np.ndarray]] = {}
    for key, value in state_dict.items():
        prefix, _, name = key.rpartition(".")
        if name in _SKIPPED_KEYS:
            continue
        groups.setdefault(prefix, {})[name] = _as_numpy(value, key)
    return list(groups.items())


def _check_shape(array, expected, torch_key: str, jcnn_name: str) -> None:
    """Raise unless ``array`` (the PyTorch tensor ``torch_key``) has the shape ``expected``."""
    if tuple(array.shape) != tuple(expected):
        raise ValueError(
            f"{torch_key}: shape {tuple(array.shape)} does not fit jcnn parameter {jcnn_name} "
            f"(expected a PyTorch tensor of shape {tuple(expected)})"
        )


def _take(group: dict, prefix: str, name: str, jcnn_name: str) -> np.ndarray:
    if name not in group:
        raise ValueError(
            f"{prefix}.{name}: missing from the state_dict, needed for jcnn parameter {jcnn_name}"
        )
    return group.pop(name)


def _convert_conv(group, prefix, path, params_shapes):
    name = "/".join(path)
    kernel_shape = tuple(params_shapes["kernel"].shape)
    torch_shape = (kernel_shape[-1], kernel_shape[-2], *kernel_shape[:-2])
    weight = _take(group, prefix, "weight", f"{name}/kernel")
    _check_shape(weight, torch_shape, f"{prefix}.weight", f"{name}/kernel {kernel_shape}")
    n = weight.ndim
    params = {"kernel": weight.transpose(*range(2, n), 1, 0)}
    return _bias(group, prefix, name, params_shapes, params)


def _convert_dense(group, prefix, path, params_shapes, flattened_from):
    name = "/".join(path)
    kernel_shape = tuple(params_shapes["kernel"].shape)
    torch_shape = kernel_shape[::-1]
    weight = _take(group, prefix, "weight", f"{name}/kernel")
    _check_shape(weight, torch_shape, f"{prefix}.weight", f"{name}/kernel {kernel_shape}")
    if flattened_from is not None:
        # PyTorch flattened (C, *spatial); jcnn flattens (*spatial, C).
        *spatial, channels = flattened_from
        out = weight.shape[0]
        weight = weight.reshape(out, channels, *spatial)
        weight = weight.transpose(0, *range(2, 2 + len(spatial)), 1).reshape(out, -1)
    params = {"kernel": weight.T}
    return _bias(group, prefix, name, params_shapes, params)


def _bias(group, prefix, name, params_shapes, params):
    if "bias" in params_shapes:
        bias = _take(group, prefix, "bias", f"{name}/bias")
        expected = tuple(params_shapes["bias"].shape)
        _check_shape(bias, expected, f"{prefix}.bias", f"{name}/bias {expected}")
        params["bias"] = bias
    elif "bias" in group:
        raise ValueError(f"{prefix}.bias: the jcnn layer {name} has no bias (use_bias=False)")
    return params


def _convert_norm(group, prefix, path, params_shapes, stats_shapes):
    name = "/".join(path)
    params, stats = {}, {}
    for torch_name, jcnn_name, target, shapes in (
        ("weight", "scale", params, params_shapes),
        ("bias", "bias", params, params_shapes),
        ("running_mean", "mean", stats, stats_shapes),
        ("running_var", "var", stats, stats_shapes),
    ):
        if jcnn_name not in shapes:
            if torch_name in group:
                raise ValueError(f"{prefix}.{torch_name}: the jcnn layer {name} has no {jcnn_name}")
            continue
        value = _take(group, prefix, torch_name, f"{name}/{jcnn_name}")
        expected = tuple(shapes[jcnn_name].shape)
        _check_shape(value, expected, f"{prefix}.{torch_name}", f"{name}/{jcnn_name}")
        target[jcnn_name] = value
    return params, stats


def _insert(tree: dict, path: Sequence[str], values: dict) -> None:
    for key in path:
        tree = tree.setdefault(key, {})
    tree.update({k: jnp.asarray(v, jnp.float32) for k, v in values.items()})


def from_torch_state_dict(model: nn.Module, state_dict: Mapping, input_shape: Sequence[int]):
    """Convert a PyTorch ``state_dict`` into variables of the equivalent jcnn ``model``.

    Args:
      model: the jcnn network (``models.LeNet5()``, ``models.VGG(...)``, ``models.resnet20()``).
      state_dict: PyTorch's ``module.state_dict()`` (tensors or NumPy arrays), keys in
        registration order.
      input_shape: an input shape with the batch axis (channels-last), to trace ``model``.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` only when the model has some) for
      ``model.apply(variables, x, train=False)``.

    Raises:
      ValueError: naming the PyTorch key and the jcnn parameter when a shape, a parameter or a
        layer does not match.
    """
    calls, shapes = trace_layers(model, input_shape)
    layers, seen = [], set()
    for call in leaf_calls(calls):
        params = subtree(shapes, "params", call.path)
        stats = subtree(shapes, "batch_stats", call.path)
        if call.path in seen or not (params or stats):
            continue
        seen.add(call.path)
        if not isinstance(call.module, (jnn.Conv, jnn.Dense, jnn.BatchNorm)):
            raise ValueError(
                f"model: layer {'/'.join(call.path)} ({type(call.module).__name__}) has no "
                "PyTorch conversion (Conv, Dense and BatchNorm are supported)"
            )
        layers.append((call, params, stats))
    groups = _group(state_dict)
    if len(groups) != len(layers):
        raise ValueError(
            f"state_dict: expected {len(layers)} modules with parameters for "
            f"{type(model).__name__} ({', '.join('/'.join(c.path) for c, _, _ in layers)}), got "
            f"{len(groups)} ({', '.join(prefix for prefix, _ in groups)})"
        )
    variables: dict = {"params": {}}
    for (call, params_shapes, stats_shapes), (prefix, group) in zip(layers, groups, strict=True):
        group = dict(group)
        module = call.module
        if isinstance(module, jnn.Conv):
            params = _convert_conv(group, prefix, call.path, params_shapes)
            stats = {}
        elif isinstance(module, jnn.Dense):
            source = calls[call.source] if call.source is not None else None
            flattened_from = None
            if (
                source is not None
                and isinstance(source.module, jnn.Flatten)
                and len(source.input_shape) > 2
            ):
                flattened_from = source.input_shape[1:]
            params = _convert_dense(group, prefix, call.path, params_shapes, flattened_from)
            stats = {}
        else:
            params, stats = _convert_norm(group, prefix, call.path, params_shapes, stats_shapes)
        if group:
            extra = ", ".join(f"{prefix}.{name}" for name in group)
            raise ValueError(f"{extra}: no jcnn parameter of layer {'/'.join(call.path)} matches")
        _insert(variables["params"], call.path, params)
        if stats:
            _insert(variables.setdefault("batch_stats", {}), call.path, stats)
    return variables


def load_torch_weights(path, model: nn.Module, input_shape: Sequence[int]):
    """Load a PyTorch weights file as variables of ``model`` (see ``from_torch_state_dict``).

    The file is read as data, never executed: ``torch.load(path, map_location="cpu",
    weights_only=True)`` refuses pickled code. (Safetensors files store tensors sorted by name,
    losing the registration order the matching relies on; load one with
    ``safetensors.torch.load_file`` and pass it in that order to ``from_torch_state_dict``.)
    A checkpoint dict holding the weights under ``"state_dict"`` is accepted too.

    Args:
      path: the weights file.
      model: the jcnn network the weights belong to.
      input_shape: an input shape with the batch axis (channels-last).

    Returns:
      The variables, ``{"params": ..., "batch_stats": ...}``.
    """
    path = os.fspath(path)
    import torch

    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"path: expected a state_dict (a mapping of names to tensors) in {path}, "
            f"got {type(state_dict).__name__}"
        )
    return from_torch_state_dict(model, state_dict, input_shape)
