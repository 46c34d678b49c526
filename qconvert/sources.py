"""Reading checkpoints that are already quantized: what each stored layer is, and its weight rebuilt.

Recognised layouts, per layer (a checkpoint may mix them):

* compressed-tensors ``pack-quantized`` (``weight_packed`` int32 + ``weight_scale`` + ``weight_shape``),
  ``int-quantized`` (int8 ``weight`` + ``weight_scale``) and ``float-quantized`` (fp8 ``weight`` +
  ``weight_scale``, e4m3fn or e4m3fnuz);
* DeepSeek-V3-style FP8 (fp8 ``weight`` + fp32 ``weight_scale_inv`` per 128x128 block; despite the
  name, the value multiplies) and SGLang's ``blockwise_int8`` (int8 ``weight`` + ``weight_scale_inv``).

The scale layout (tensor, channel, group or block) comes from the config where it says so, else from
the scale's shape.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from qconvert.checkpoint import Checkpoint
from qconvert.errors import BadInputError
from qconvert.quantizers import band_elements, dequantize_tiles, packed_columns, unpack_int32
from qconvert.safetensors_io import TensorInfo, TensorReader
from qconvert.schemes import Scheme

WEIGHT_LEAVES = ("weight", "weight_packed", "weight_scale", "weight_scale_inv", "weight_shape", "weight_zero_point")
ACTIVATION_LEAVES = ("input_scale", "output_scale")
_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


@dataclass(frozen=True)
class StoredLayer:
    """One quantized linear layer as stored: its tensors, and what they mean."""

    module: str
    layout: str  # pack-quantized | int-quantized | float-quantized | deepseek-fp8 | blockwise-int8
    parts: dict[str, TensorInfo]  # leaf name → tensor (weight values, scales, shape)
    shape: tuple[int, int]  # logical [out, in]
    dtype: torch.dtype  # dtype of the rebuilt weight
    kind: str  # "int" | "float"
    num_bits: int
    strategy: str  # tensor | channel | group | block
    tile: tuple[int, int]

    @property
    def values(self) -> TensorInfo:
        return self.parts.get("weight_packed") or self.parts["weight"]

    @property
    def scale(self) -> TensorInfo:
        return self.parts.get("weight_scale") or self.parts["weight_scale_inv"]

    @property
    def label(self) -> str:
        stored = {torch.float8_e4m3fn: "fp8", torch.float8_e4m3fnuz: "fp8 e4m3fnuz"}.get(
            self.values.dtype, f"int{self.num_bits}")
        grouping = {"tensor": "per-tensor", "channel": "per-channel",
                    "group": f"g{self.tile[1]}", "block": f"block {self.tile[0]}x{self.tile[1]}"}[self.strategy]
        return f"{stored} {grouping}"

    def matches(self, scheme: Scheme) -> bool:
        """Whether ``scheme`` would store exactly these values: then the layer is copied, not requantized."""
        stored_format = {"deepseek-fp8": "float-quantized", "blockwise-int8": "int-quantized"}.get(
            self.layout, self.layout)
        same_tile = scheme.strategy == self.strategy and (
            self.strategy in ("tensor", "channel") or scheme.tile(self.shape) == self.tile)
        return (scheme.format == stored_format and scheme.kind == self.kind and scheme.num_bits == self.num_bits
                and same_tile and self.values.dtype != torch.float8_e4m3fnuz)


def config_group(config: dict | None, module: str) -> dict | None:
    """The compressed-tensors config group that targets ``module`` (by name first, then by class)."""
    qconfig = (config or {}).get("quantization_config") or {}
    groups = list((qconfig.get("config_groups") or {}).values())
    for group in groups:
        targets = group.get("targets") or []
        if any(t == module or (t.startswith("re:") and re.match(t[3:], module)) for t in targets):
            return group
    for group in groups:  # class-name targets ("Linear") cover every remaining layer
        if any(not t.startswith("re:") and "." not in t for t in group.get("targets") or []):
            return group
    return None


def _group_args(config: dict, module: str) -> dict | None:
    group = config_group(config, module)
    return group.get("weights") if group else None


def _strategy_and_tile(shape: tuple[int, int], scale: TensorInfo, args: dict | None,
                       block: tuple[int, int] | None) -> tuple[str, tuple[int, int]]:
    out_features, in_features = shape
    if args and args.get("strategy"):
        strategy = args["strategy"]
        if strategy == "block":
            block = tuple(args.get("block_structure") or block or (128, 128))  # type: ignore[assignment]
    elif math.prod(scale.shape) == 1:
        strategy = "tensor"
    elif scale.shape[0] == out_features and (len(scale.shape) == 1 or scale.shape[1] == 1):
        strategy = "channel"
    elif scale.shape[0] == out_features and block is None:
        strategy = "group"
    else:
        strategy = "block"
    if strategy == "tensor":
        return strategy, (out_features, in_features)
    if strategy == "channel":
        return strategy, (1, in_features)
    if strategy == "group":
        return strategy, (1, in_features // scale.shape[-1])
    return strategy, tuple(block or (128, 128))  # type: ignore[return-value]


def stored_layers(checkpoint: Checkpoint, reader: TensorReader) -> dict[str, StoredLayer]:
    """Every quantized layer of ``checkpoint``, keyed by module name (empty for unquantized ones)."""
    config = checkpoint.config or {}
    qconfig = config.get("quantization_config") or {}
    block = tuple(qconfig["weight_block_size"]) if qconfig.get("weight_block_size") else None
    model_dtype = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), torch.bfloat16)
    by_module: dict[str, dict[str, TensorInfo]] = {}
    for info in checkpoint.tensors.values():
        module, _, leaf = info.name.rpartition(".")
        if leaf in WEIGHT_LEAVES:
            by_module.setdefault(module, {})[leaf] = info
    layers = {}
    for module, parts in by_module.items():
        layer = _stored_layer(module, parts, config, block, model_dtype, reader)
        if layer is not None:
            layers[module] = layer
    return layers


def _stored_layer(module: str, parts: dict[str, TensorInfo], config: dict, block: tuple[int, int] | None,
                  model_dtype: torch.dtype, reader: TensorReader) -> StoredLayer | None:
    scale = parts.get("weight_scale") or parts.get("weight_scale_inv")
    values = parts.get("weight_packed") or parts.get("weight")
    if scale is None or values is None or len(values.shape) != 2:
        return None
    if "weight_zero_point" in parts:
        raise BadInputError(f"{values.file.name}: {module} is asymmetric (weight_zero_point); not supported")
    args = _group_args(config, module)
    if "weight_packed" in parts:
        if "weight_shape" not in parts:
            raise BadInputError(f"{values.file.name}: {module}.weight_packed has no weight_shape")
        out_features, in_features = (int(v) for v in reader.read(parts["weight_shape"]).tolist())
        bits = (args or {}).get("num_bits") or (4 if values.shape[1] == packed_columns(in_features, 4) else 8)
        if values.shape != (out_features, packed_columns(in_features, bits)):
            raise BadInputError(f"{values.file.name}: {module}.weight_packed {list(values.shape)} does not hold "
                                f"{bits}-bit values of shape {[out_features, in_features]}")
        shape = (out_features, in_features)
        strategy, tile = _strategy_and_tile(shape, scale, args, block)
        return StoredLayer(module, "pack-quantized", parts, shape, scale.dtype, "int", bits, strategy, tile)
    shape = (values.shape[0], values.shape[1])
    if values.dtype == torch.int8:
        kind, layout = "int", ("blockwise-int8" if "weight_scale_inv" in parts else "int-quantized")
    elif values.dtype in _FP8:
        kind, layout = "float", ("deepseek-fp8" if "weight_scale_inv" in parts else "float-quantized")
    else:
        return None
    dtype = model_dtype if "weight_scale_inv" in parts else scale.dtype
    strategy, tile = _strategy_and_tile(shape, scale, args, block)
    return StoredLayer(module, layout, parts, shape, dtype, kind, 8, strategy, tile)


def rebuild_weight(layer: StoredLayer, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The layer's weight, dequantized (``values * scale``, in the scale's dtype), as ``layer.dtype``."""
    scale = tensors.get("weight_scale", tensors.get("weight_scale_inv"))
    if "weight_packed" in tensors:
        values = unpack_int32(tensors["weight_packed"], layer.num_bits, layer.shape[1])
    else:
        values = tensors["weight"]
    th, tw = layer.tile
    rows, cols = -(-layer.shape[0] // th), -(-layer.shape[1] // tw)
    if scale.numel() != rows * cols:
        raise BadInputError(f"{layer.scale.file.name}: {layer.module} has {scale.numel()} scales; its "
                            f"{layer.strategy} layout needs {rows}x{cols}")
    scale = scale.reshape(rows, cols)
    weight = torch.empty(layer.shape, dtype=layer.dtype, device=values.device)
    # Bands of whole tile rows keep the (often float32) intermediates small: memory stays near the
    # size of the weight itself rather than several float32 copies of it.
    tiles_per_band = max(1, band_elements(values, 1 << 20) // (th * layer.shape[1]))
    for first in range(0, rows, tiles_per_band):
        last = min(rows, first + tiles_per_band)
        weight[first * th : last * th] = dequantize_tiles(
            values[first * th : last * th], scale[first:last], layer.tile, layer.dtype)
    return weight


def logical_view(checkpoint: Checkpoint, layers: dict[str, StoredLayer]) -> dict[str, TensorInfo]:
    """The checkpoint as a planner sees it: each quantized layer shows up as one ``.weight`` tensor of
    its logical shape and dtype (in the place of its first stored tensor); everything else as stored."""
    view: dict[str, TensorInfo] = {}
    for info in checkpoint.tensors.values():
        module, _, leaf = info.name.rpartition(".")
        layer = layers.get(module)
        if layer is None or leaf not in WEIGHT_LEAVES:
            view[info.name] = info
        elif f"{module}.weight" not in view:
            numel = layer.shape[0] * layer.shape[1]
            view[f"{module}.weight"] = TensorInfo(f"{module}.weight", layer.dtype, layer.shape, info.file, -1,
                                                  numel * layer.dtype.itemsize)
    return view
