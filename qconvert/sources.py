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
        elif (problem := _unread_quantized(parts)) is not None:
            raise BadInputError(problem)
    return layers


_QUANTIZED_DTYPES = (torch.int8, torch.uint8, torch.int32, torch.float8_e4m3fn, torch.float8_e4m3fnuz,
                     torch.float8_e5m2, torch.float8_e5m2fnuz)


def _unread_quantized(parts: dict[str, TensorInfo]) -> str | None:
    """Why a layer that holds quantized tensors no format recognised cannot be read: it must never pass through
    as other tensors (a float32 ``weight_packed`` copied as is, and the layer missing from the coverage)."""
    packed, weight = parts.get("weight_packed"), parts.get("weight")
    scale = next((parts[leaf] for leaf in ("weight_scale", "weight_scale_inv", "weight_scale_2", "weight_global_scale")
                  if leaf in parts), None)
    if packed is not None:
        return (f"{packed.file.name}: tensor {packed.name} is {packed.dtype_code} {list(packed.shape)}, which no "
                "format qconvert reads stores (packed weights are 2-D I32, or U8 for nvfp4/mxfp4, with a "
                "weight_scale)")
    if weight is not None and scale is not None and weight.dtype in _QUANTIZED_DTYPES:
        return (f"{weight.file.name}: tensor {weight.name} is {weight.dtype_code} {list(weight.shape)} with a "
                f"{scale.dtype_code} {list(scale.shape)} {scale.name.rpartition('.')[2]}, a layout no format qconvert "
                "reads")
    return None


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
