"""Weights from PyTorch: a ``state_dict`` (or a weights file) as jcnn variables.

The layers of the jcnn model, in the order they run, are matched with the modules of the
``state_dict``, in the order PyTorch registered them (a module is the key up to its last dot:
``layer1.0.conv1.weight`` belongs to ``layer1.0.conv1``). This holds for networks written the
usual way (modules defined in the order ``forward`` uses them), e.g. torchvision's VGG and ResNet
and the twins in the tests. Where every layer's path, dotted (``block/conv1`` as ``block.conv1``),
names a module of the ``state_dict`` and no module is left over, layers are matched by name
instead, whatever the order. Conversions:

- ``Conv``: weight ``(C_out, C_in // groups, *window)`` (OIHW) to kernel ``(*window, C_in // groups,
  C_out)`` (HWIO); ``bias`` unchanged. ``DepthwiseConv`` is PyTorch's ``Conv`` with
  ``groups = C_in``, converted the same way.
- ``ConvTranspose``: weight ``(C_in, C_out // groups, *window)`` to kernel ``(*window, C_in,
  C_out // groups)``; ``bias`` unchanged.
- ``Dense``: weight ``(out, in)`` transposed; when the dense layer follows a ``Flatten`` of a
  feature map, its input axis is permuted from PyTorch's NCHW flatten order (W fastest) to jcnn's
  NHWC order (C fastest), unless a dense layer made that map (PyTorch's ``Linear`` keeps the
  features last, e.g. a ``(N, T, F)`` sequence). A flat input made outside the layers (``F.relu``
  after the flatten, a reshape) with as many values as an earlier feature map is refused: its
  order cannot be told.
- ``BatchNorm``: ``weight``, ``bias`` to ``scale``, ``bias``; ``running_mean``, ``running_var`` to
  ``batch_stats`` ``mean``, ``var`` (``num_batches_tracked`` is ignored). A BatchNorm without a
  ``scale`` (``use_scale=False``, e.g. ``AirbenchNet``'s) takes a PyTorch weight of ones, one
  without a ``bias`` a PyTorch bias of zeros.
- ``GroupNorm`` (and a BatchNorm that ``replace_batch_norm`` computes as one): ``weight``,
  ``bias`` to ``scale``, ``bias``.
  A ``BatchNorm1d`` of the flattened feature map is permuted to NHWC order as the dense layer is
  (and the dense layer after it still is).

Every shape is checked; a mismatch raises ``ValueError`` naming the PyTorch key and the jcnn
parameter. Files are read as data only: ``torch.load(..., weights_only=True)``.

``from_torchvision_state_dict`` matches by name instead, for the zoo's networks whose PyTorch twin
is torchvision's (``MobileNetV2``, ``ConvNeXt``): it also converts LayerNorm weights and
ConvNeXt's layer scales.
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jcnn import nn as jnn
from jcnn.analysis._trace import check_input_shape, leaf_calls, subtree, trace_layers

__all__ = ["from_torch_state_dict", "from_torchvision_state_dict", "load_torch_weights"]

_SKIPPED_KEYS = ("num_batches_tracked",)


def _as_numpy(value, key: str) -> np.ndarray:
    if hasattr(value, "detach"):
        if getattr(value, "is_complex", lambda: False)():
            raise TypeError(
                f"state_dict[{key!r}]: expected a real tensor, got dtype {value.dtype}; jcnn "
                "parameters are real and the imaginary part would be lost"
            )
        if str(getattr(value, "device", "")) == "meta":
            raise ValueError(
                f"state_dict[{key!r}]: a tensor on the meta device holds no values (a model "
                "built on device='meta' has shapes only); load or initialize its weights first"
            )
        if getattr(value, "is_quantized", False):
            raise TypeError(
                f"state_dict[{key!r}]: expected a real tensor, got the quantized dtype "
                f"{value.dtype}; a jcnn layer computes in floating point: pass "
                "tensor.dequantize() if that is the network meant"
            )
        value = value.detach().cpu()
        if str(getattr(value, "layout", "torch.strided")) != "torch.strided":
            value = value.to_dense()  # a sparse tensor: its values, exactly
        if getattr(value, "is_floating_point", lambda: False)() and str(value.dtype) not in (
            "torch.float16",
            "torch.float32",
            "torch.float64",
        ):  # NumPy has no bfloat16 or float8: widen exactly
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


def _check_state_dict(state_dict) -> None:
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            "state_dict: expected a mapping of parameter names to tensors (module.state_dict()), "
            f"got {type(state_dict).__name__}"
        )
    for key in state_dict:
        if not isinstance(key, str):
            raise TypeError(f"state_dict: expected string keys such as 'conv1.weight', got {key!r}")


def _group(state_dict: Mapping) -> list[tuple[str, dict[str, np.ndarray]]]:
    """``(module prefix, {parameter name: array})`` in the state_dict's order."""
    _check_state_dict(state_dict)
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


def _convert_conv(group, prefix, path, params_shapes, transposed=False):
    """A conv's weight ``(O, I, *window)`` as its kernel ``(*window, I, O)``; a transposed
    conv's ``(I, O, *window)`` as ``(*window, I, O)``."""
    name = "/".join(path)
    kernel_shape = tuple(params_shapes["kernel"].shape)
    channels = kernel_shape[-2:] if transposed else kernel_shape[:-3:-1]
    torch_shape = (*channels, *kernel_shape[:-2])
    weight = _take(group, prefix, "weight", f"{name}/kernel")
    _check_shape(weight, torch_shape, f"{prefix}.weight", f"{name}/kernel {kernel_shape}")
    n = weight.ndim
    params = {"kernel": weight.transpose(*range(2, n), *((0, 1) if transposed else (1, 0)))}
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


# The value of a BatchNorm affine parameter that leaves the normalized input unchanged.
_IDENTITY = {"weight": 1.0, "bias": 0.0}


def _drop_identity(group, prefix, torch_name, name, jcnn_name, channels) -> None:
    """Drop ``torch_name`` from ``group`` where the jcnn BatchNorm ``name`` of ``channels``
    features lacks ``jcnn_name`` (``use_scale=False`` or ``use_bias=False``) and the tensor is
    that parameter's identity (airbench keeps its BatchNorm weights frozen at ones): both layers
    then compute the same; raise otherwise."""
    value = group.pop(torch_name)
    _check_shape(value, (channels,), f"{prefix}.{torch_name}", name)
    if not np.all(value == _IDENTITY[torch_name]):
        raise ValueError(
            f"{prefix}.{torch_name}: the jcnn layer {name} has no {jcnn_name}, which only a "
            f"tensor of {_IDENTITY[torch_name]:g}s can stand for; got values from "
            f"{value.min():g} to {value.max():g}"
        )


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
                channels = stats_shapes["mean"].shape[0]
                _drop_identity(group, prefix, torch_name, name, jcnn_name, channels)
            continue
        value = _take(group, prefix, torch_name, f"{name}/{jcnn_name}")
        expected = tuple(shapes[jcnn_name].shape)
        _check_shape(value, expected, f"{prefix}.{torch_name}", f"{name}/{jcnn_name}")
        target[jcnn_name] = value
    return params, stats


def _insert(tree: dict, path: Sequence[str], values: dict, like: Mapping) -> None:
    """``values`` at ``path`` of ``tree``, each in the dtype of the model's own variable in
    ``like`` (a bfloat16 ``param_dtype`` stays bfloat16), copied: on CPU ``jnp.asarray`` may
    share the memory of the PyTorch tensor, which a later ``optimizer.step()`` or a training-mode
    forward (running statistics) would then change under the imported variables."""
    for key in path:
        tree = tree.setdefault(key, {})
    tree.update({k: jnp.array(v, like[k].dtype, copy=True) for k, v in values.items()})


def _keeps_order(call) -> bool:
    """Whether ``call`` is a Dropout, an elementwise activation or a BatchNorm of flat features
    (each feature on its own)."""
    module = call.module
    elementwise = isinstance(module, (jnn.Dropout, jnn.SpatialDropout)) or (
        type(module).__module__ == "jcnn.nn.activation" and not isinstance(module, jnn.Maxout)
    )
    flat_norm = isinstance(module, jnn.BatchNorm) and len(call.input_shape or ()) == 2
    return (elementwise or flat_norm) and call.input_shape == call.output_shape


def _flattened_from(calls, call, torch_key: str) -> tuple[int, ...] | None:
    """The ``(*spatial, C)`` feature map whose ``Flatten`` gives ``call``'s input (through
    order-keeping layers), else None; a ValueError naming ``torch_key`` where a flat input made
    outside the layers could be a flattened map."""
    source = calls[call.source] if call.source is not None else None
    while source is not None and source.source is not None and _keeps_order(source):
        source = calls[source.source]
    if source is None or (source.source is None and _keeps_order(source)):
        _refuse_unknown_flatten(calls, call, torch_key)
        return None
    if (
        isinstance(source.module, jnn.Flatten)
        and source.input_shape is not None
        and len(source.input_shape) > 2
        and not _made_by_dense(calls, source)
    ):
        return tuple(source.input_shape[1:])
    return None


def _made_by_dense(calls, flatten) -> bool:
    """Whether the array ``flatten`` flattens comes (through order-keeping layers) from a dense
    layer: PyTorch's ``Linear`` acts on the last axis too, so its twin's features are last as in
    jcnn (a ``(N, T, F)`` sequence) and its flatten order is jcnn's."""
    source = calls[flatten.source] if flatten.source is not None else None
    while source is not None and source.source is not None and _keeps_order(source):
        source = calls[source.source]
    return source is not None and isinstance(source.module, jnn.Dense)


def _refuse_unknown_flatten(calls, call, torch_key: str) -> None:
    """Raise where ``call``'s flat input was made outside the layers (a function such as
    ``F.relu``, a reshape) and the latest feature map before it holds as many values: that input
    is likely the map flattened, whose order (PyTorch's ``(C, *spatial)`` or jcnn's
    ``(*spatial, C)``) cannot be told, and a wrong guess gives wrong outputs without an error. A
    pooled map (``jnp.mean`` over its positions) holds fewer values and passes."""
    shape = call.input_shape
    if shape is None or len(shape) != 2:
        return
    maps = (
        earlier.output_shape
        for earlier in reversed(calls[: call.index])
        if earlier.is_leaf and earlier.output_shape is not None and len(earlier.output_shape) > 2
    )
    latest = next(maps, None)
    if latest is not None and math.prod(latest[1:-1]) > 1 and math.prod(latest[1:]) == shape[-1]:
        raise ValueError(
            f"{torch_key}: the input {shape} of jcnn layer {'/'.join(call.path)} was made "
            f"outside the layers (a function or a reshape) and may be the flattened {latest} "
            "feature map before it, whose PyTorch flatten order (C, *spatial) differs from "
            "jcnn's (*spatial, C); flatten with jcnn.nn.Flatten and put only layer modules "
            f"(jcnn.nn.ReLU, not F.relu) between it and {'/'.join(call.path)}, so that the "
            "weight can be permuted"
        )


def _to_channels_last(vector: np.ndarray, flattened_from: tuple[int, ...]) -> np.ndarray:
    """A per-feature vector of PyTorch's ``(C, *spatial)`` flatten order in jcnn's
    ``(*spatial, C)`` order."""
    *spatial, channels = flattened_from
    moved = vector.reshape(channels, *spatial).transpose(*range(1, 1 + len(spatial)), 0)
    return moved.reshape(-1)


_CONVERTED = (
    jnn.Conv,
    jnn.DepthwiseConv,
    jnn.ConvTranspose,
    jnn.Dense,
    jnn.BatchNorm,
    jnn.GroupNorm,
)


def from_torch_state_dict(
    model: nn.Module, state_dict: Mapping, input_shape: Sequence[int]
) -> dict[str, Any]:
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
        if not isinstance(call.module, _CONVERTED):
            raise ValueError(
                f"model: layer {'/'.join(call.path)} ({type(call.module).__name__}) has no "
                "PyTorch conversion (Conv, DepthwiseConv, ConvTranspose, Dense, BatchNorm and "
                "GroupNorm are supported)"
            )
        layers.append((call, params, stats))
    groups = _group(state_dict)
    names = [".".join(call.path) for call, _, _ in layers]
    if set(names) == {prefix for prefix, _ in groups} and len(names) == len(groups):
        # every layer is named as a PyTorch module: the names say which is which, whatever
        # order the twin registered its modules in (a ``setup`` may define them in another)
        by_name = dict(groups)
        groups = [(name, by_name[name]) for name in names]
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
        if isinstance(module, (jnn.Conv, jnn.DepthwiseConv, jnn.ConvTranspose)):
            transposed = isinstance(module, jnn.ConvTranspose)
            params = _convert_conv(group, prefix, call.path, params_shapes, transposed)
            stats = {}
        elif isinstance(module, jnn.Dense):
            # a Dropout, an activation or a BatchNorm1d between the Flatten and the layer keeps
            # the order
            flattened_from = _flattened_from(calls, call, f"{prefix}.weight")
            params = _convert_dense(group, prefix, call.path, params_shapes, flattened_from)
            stats = {}
        else:
            params, stats = _convert_norm(group, prefix, call.path, params_shapes, stats_shapes)
            flattened_from = _flattened_from(calls, call, prefix)
            if flattened_from is not None and len(call.input_shape) == 2:
                # a BatchNorm1d after a Flatten: its features come in PyTorch's flatten order
                params = {k: _to_channels_last(v, flattened_from) for k, v in params.items()}
                stats = {k: _to_channels_last(v, flattened_from) for k, v in stats.items()}
        if group:
            extra = ", ".join(f"{prefix}.{name}" for name in group)
            raise ValueError(f"{extra}: no jcnn parameter of layer {'/'.join(call.path)} matches")
        _insert(variables["params"], call.path, params, params_shapes)
        if stats:
            _insert(variables.setdefault("batch_stats", {}), call.path, stats, stats_shapes)
    return variables


def load_torch_weights(
    path: str | os.PathLike, model: nn.Module, input_shape: Sequence[int]
) -> dict[str, Any]:
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

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, KeyError) as error:  # a truncated zip, an empty file, text
        detail = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, KeyError):  # torch's legacy reader on bytes of no known format
            detail = f"neither a zip archive nor a pickle (KeyError {error})"
        raise ValueError(
            f"path: {path} is not a readable PyTorch weights file (truncated or corrupt?): {detail}"
        ) from error
    except pickle.UnpicklingError as error:
        # pickled code, or bytes that are no pickle at all (a corrupt file): torch's message
        # advises weights_only=False, which would run whatever the file holds
        _, _, reason = str(error).partition("WeightsUnpickler error:")
        reason = " ".join(reason.split()).split(" Please use ")[0].split(" Check the doc")[0]
        raise ValueError(
            f"path: {path} is not a plain PyTorch weights file (corrupt, or pickled objects "
            f"other than tensors): torch.load(weights_only=True) refused it (Weights only load "
            f"failed: {reason or type(error).__name__}); jcnn reads weights as data, never code"
        ) from error
    if isinstance(state_dict, Mapping) and isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"path: expected a state_dict (a mapping of names to tensors) in {path}, "
            f"got {type(state_dict).__name__}"
        )
    return from_torch_state_dict(model, state_dict, input_shape)


# torchvision's MobileNetV2 and ConvNeXt, matched by name --------------------------------------

_MOBILENET_V2_BLOCK_LAYERS = (
    "expand_conv",
    "expand_bn",
    "depthwise_conv",
    "depthwise_bn",
    "project_conv",
    "project_bn",
)
_CONVNEXT_BLOCK_LAYERS = {
    "dwconv": "block.0",
    "norm": "block.2",
    "pwconv1": "block.3",
    "pwconv2": "block.5",
}


def _mobilenet_v2_prefix(path: tuple[str, ...], params) -> str:
    """torchvision's module name of the jcnn MobileNetV2 layer at ``path``."""
    blocks = sum(name.startswith("block") for name in params)
    top = path[0]
    fixed = {
        "stem_conv": "features.0.0",
        "stem_bn": "features.0.1",
        "head_conv": f"features.{blocks + 1}.0",
        "head_bn": f"features.{blocks + 1}.1",
        "classifier": "classifier.1",
    }
    if top in fixed:
        return fixed[top]
    layers = [name for name in _MOBILENET_V2_BLOCK_LAYERS if name in params[top]]
    index = layers.index(path[1])
    # A pair conv + BN followed by ReLU6 is one torchvision Conv2dNormActivation ("conv.0.0");
    # the projection conv and its BN are separate entries ("conv.2", "conv.3").
    if index < len(layers) - 2:
        position = f"{index // 2}.{index % 2}"
    else:
        position = str(len(layers) // 2 - 1 + index - (len(layers) - 2))
    return f"features.{top[len('block') :]}.conv.{position}"


def _convnext_prefix(path: tuple[str, ...], params) -> str:
    """torchvision's module name of the jcnn ConvNeXt layer at ``path``."""
    del params
    top = path[0]
    fixed = {
        "stem_conv": "features.0.0",
        "stem_norm": "features.0.1",
        "head_norm": "classifier.0",
        "head": "classifier.2",
    }
    if top in fixed:
        return fixed[top]
    if top.startswith("downsample"):
        stage, _, layer = top[len("downsample") :].partition("_")
        return f"features.{2 * int(stage) - 2}.{0 if layer == 'norm' else 1}"
    stage, _, block = top[len("stage") :].partition("_")
    prefix = f"features.{2 * int(stage) - 1}.{block}"
    return prefix if len(path) == 1 else f"{prefix}.{_CONVNEXT_BLOCK_LAYERS[path[1]]}"


def _torchvision_leaf(leaf_name: str, shape, collection: str) -> tuple[str, tuple]:
    """PyTorch's parameter name and shape for the jcnn leaf ``leaf_name`` of shape ``shape``."""
    if collection == "batch_stats":
        return {"mean": "running_mean", "var": "running_var"}[leaf_name], shape
    if leaf_name == "kernel":
        return "weight", (shape[-1], shape[-2], *shape[:-2]) if len(shape) > 2 else shape[::-1]
    if leaf_name == "layer_scale":
        return "layer_scale", (shape[0], 1, 1)
    return {"scale": "weight", "bias": "bias"}[leaf_name], shape


def _from_torch_layout(array: np.ndarray, leaf_name: str, shape) -> np.ndarray:
    if leaf_name == "kernel":
        n = array.ndim
        return array.transpose(*range(2, n), 1, 0) if n > 2 else array.T
    return array.reshape(shape)


def from_torchvision_state_dict(
    model: nn.Module, state_dict: Mapping, input_shape: Sequence[int] = (1, 224, 224, 3)
) -> dict[str, Any]:
    """Convert torchvision's ``mobilenet_v2`` or ``convnext_*`` weights into jcnn variables.

    Layers are matched by name (``block3/depthwise_conv`` is ``features.3.conv.1.0``,
    ``stage3_4/pwconv1`` is ``features.5.4.block.3``; see ``jcnn.models.mobilenet`` and
    ``jcnn.models.convnext``), for any width, depth or number of classes. Conv weights go from OIHW
    to HWIO, linear weights are transposed, BatchNorm and LayerNorm ``weight`` become ``scale``,
    running statistics go to ``batch_stats`` and ConvNeXt's ``(C, 1, 1)`` layer scales become
    ``(C,)`` vectors; ``num_batches_tracked`` is ignored.

    Args:
      model: a ``jcnn.models.MobileNetV2`` or ``jcnn.models.ConvNeXt``.
      state_dict: torchvision's ``model.state_dict()`` (tensors or NumPy arrays), in any order.
      input_shape: an input shape with the batch axis (channels-last), to trace ``model``.

    Returns:
      ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` for MobileNetV2 only) for
      ``model.apply(variables, x, train=False)``.

    Raises:
      TypeError: when ``model`` is neither network.
      ValueError: naming the PyTorch key and the jcnn parameter when a key is missing, left over
        or of the wrong shape.
    """
    from jcnn import models

    if isinstance(model, models.MobileNetV2):
        prefix_of = _mobilenet_v2_prefix
    elif isinstance(model, models.ConvNeXt):
        prefix_of = _convnext_prefix
    else:
        raise TypeError(
            "model: expected a jcnn.models.MobileNetV2 or jcnn.models.ConvNeXt, "
            f"got {type(model).__name__}"
        )
    import jax

    _check_state_dict(state_dict)
    input_shape = check_input_shape(input_shape)
    if len(input_shape) != 4:
        raise ValueError(
            f"input_shape: expected (N, H, W, C) with the batch axis, e.g. (1, 224, 224, 3), "
            f"got {input_shape}"
        )
    shapes = jax.eval_shape(
        model.init, jax.random.key(0), jax.ShapeDtypeStruct(input_shape, jnp.float32)
    )
    remaining = {
        key: value
        for key, value in state_dict.items()
        if key.rpartition(".")[2] not in _SKIPPED_KEYS
    }
    variables: dict = {}
    for collection in ("params", "batch_stats"):
        if collection not in shapes:
            continue
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(shapes[collection])[0]:
            path = tuple(entry.key for entry in key_path)
            module_path, leaf_name = path[:-1], path[-1]
            jcnn_name = f"{collection}/{'/'.join(path)}"
            torch_name, torch_shape = _torchvision_leaf(leaf_name, tuple(leaf.shape), collection)
            prefix = prefix_of(module_path, shapes["params"])
            torch_key = f"{prefix}.{torch_name}"
            if torch_key not in remaining:
                raise ValueError(
                    f"{torch_key}: missing from the state_dict, needed for jcnn parameter "
                    f"{jcnn_name} {tuple(leaf.shape)}"
                )
            array = _as_numpy(remaining.pop(torch_key), torch_key)
            _check_shape(array, torch_shape, torch_key, f"{jcnn_name} {tuple(leaf.shape)}")
            value = _from_torch_layout(array, leaf_name, tuple(leaf.shape))
            _insert(
                variables.setdefault(collection, {}),
                module_path,
                {leaf_name: value},
                {leaf_name: leaf},
            )
    # a num_batches_tracked is skipped only beside the running statistics of its BatchNorm
    remaining = list(remaining) + [
        key
        for key in state_dict
        if key.rpartition(".")[2] in _SKIPPED_KEYS
        and f"{key.rpartition('.')[0]}.running_mean" not in state_dict
    ]
    if remaining:
        raise ValueError(
            f"state_dict: {', '.join(remaining)}: no jcnn parameter of {type(model).__name__} "
            "matches (a different width, depth or number of classes?)"
        )
    return variables
