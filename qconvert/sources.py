"""Reading checkpoints that are already quantized: what each stored layer is, and its weight rebuilt.

Which layouts are recognised, and how each is rebuilt, is the business of the format classes
(:mod:`qconvert.formats`): compressed-tensors ``pack-quantized``, ``int-quantized``, ``float-quantized``
(e4m3fn or e4m3fnuz), ``nvfp4-pack-quantized``, ``mxfp4-pack-quantized``, ``mxfp8-quantized``; DeepSeek-V3-style
FP8 and SGLang's ``blockwise_int8`` (``weight_scale_inv``). A checkpoint may mix them, layer by layer. The scale
layout (tensor, channel, group or block) comes from the config where it says so, else from the scale's shape.
"""

from __future__ import annotations

import torch

from qconvert.checkpoint import Checkpoint
from qconvert.errors import BadInputError
from qconvert.formats import ACTIVATION_LEAVES, WEIGHT_LEAVES, ReadContext, StoredLayer, config_group, recognise
from qconvert.formats.gpt_oss import RebuiltTensor, StoredExperts, check_scales, find_stored_experts, rebuilt_view
from qconvert.safetensors_io import TensorInfo, TensorReader

__all__ = ["ACTIVATION_LEAVES", "WEIGHT_LEAVES", "RebuiltTensor", "StoredExperts", "StoredLayer", "config_group",
           "logical_view", "rebuild_weight", "stored_experts", "stored_layers"]


def model_dtype(config: dict) -> torch.dtype:
    """The config's ``torch_dtype`` (bf16 where it names none, or names no floating dtype a weight can take)."""
    dtype = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), torch.bfloat16)
    if not isinstance(dtype, torch.dtype) or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return torch.bfloat16
    return dtype


def stored_experts(checkpoint: Checkpoint, reader: TensorReader) -> dict[str, StoredExperts]:
    """gpt-oss MXFP4 expert pairs (``*_blocks`` / ``*_scales``), by the name of the tensor each rebuilds; their
    scales are checked for the E8M0 NaN here, before any write."""
    experts = find_stored_experts(checkpoint.tensors, model_dtype(checkpoint.config or {}))
    check_scales(experts, reader)
    return experts


def stored_layers(checkpoint: Checkpoint, reader: TensorReader) -> dict[str, StoredLayer]:
    """Every quantized layer of ``checkpoint``, keyed by module name (empty for unquantized ones)."""
    config = checkpoint.config or {}
    qconfig = config.get("quantization_config") or {}
    block = tuple(qconfig["weight_block_size"]) if qconfig.get("weight_block_size") else None
    context = ReadContext(config, block, model_dtype(config), reader)
    by_module: dict[str, dict[str, TensorInfo]] = {}
    for info in checkpoint.tensors.values():
        module, _, leaf = info.name.rpartition(".")
        if leaf in WEIGHT_LEAVES:
            by_module.setdefault(module, {})[leaf] = info
    layers = {}
    for module, parts in by_module.items():
        layer = recognise(module, parts, context)
        if layer is not None:
            layers[module] = layer
        else:
            _refuse_unread(module, parts)
    return layers


_SCALE_LEAVES = ("weight_scale", "weight_scale_inv", "weight_scale_2", "weight_global_scale", "weight_zero_point")


def _refuse_unread(module: str, parts: dict[str, TensorInfo]) -> None:
    """A layer whose values are codes (not a float weight) beside scales, in no layout any format reads: refused,
    never copied as if it were a weight (a uint8 ``weight`` is not one)."""
    values = parts.get("weight_packed") or parts.get("weight")
    if values is None or values.dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        return  # a float weight beside a stray scale: the planner's strict checks name it
    if not any(leaf in parts for leaf in _SCALE_LEAVES) and "weight_packed" not in parts:
        return
    stored = ", ".join(f"{leaf} {str(info.dtype).removeprefix('torch.')} {list(info.shape)}"
                       for leaf, info in sorted(parts.items()))
    raise BadInputError(f"{values.file.name}: {module} ({stored}) is in no quantized layout qconvert reads")


def rebuild_weight(layer: StoredLayer, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The layer's weight, dequantized as its format's reference reader computes it, as ``layer.dtype``."""
    return layer.format.rebuild(layer, tensors)


def logical_view(checkpoint: Checkpoint, layers: dict[str, StoredLayer],
                 experts: dict[str, StoredExperts] | None = None) -> dict[str, TensorInfo]:
    """The checkpoint as a planner sees it: each quantized layer shows up as one ``.weight`` tensor of
    its logical shape and dtype (in the place of its first stored tensor), each stored expert pair as the
    3-D tensor it rebuilds (a :class:`RebuiltTensor`); everything else as stored."""
    view: dict[str, TensorInfo] = {}
    parts = {part.name: pair for pair in (experts or {}).values() for part in pair.parts}
    for info in checkpoint.tensors.values():
        pair = parts.get(info.name)
        if pair is not None:
            if pair.name not in view:
                view[pair.name] = rebuilt_view(pair)
            continue
        module, _, leaf = info.name.rpartition(".")
        layer = layers.get(module)
        if layer is None or leaf not in WEIGHT_LEAVES:
            view[info.name] = info
        elif f"{module}.weight" not in view:
            numel = layer.shape[0] * layer.shape[1]
            view[f"{module}.weight"] = TensorInfo(f"{module}.weight", layer.dtype, layer.shape, info.file, -1,
                                                  numel * layer.dtype.itemsize)
    return view
