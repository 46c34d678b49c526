"""``qconvert inspect``: what a safetensors checkpoint holds, per layer and in total.

Works from headers alone (plus the tiny ``weight_shape`` tensors), so inspecting a 100 GB checkpoint
reads kilobytes. The format of each layer is recognised from its tensor names and dtypes, so a
checkpoint whose config is missing or wrong is still described truthfully.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qconvert.checkpoint import Checkpoint, open_checkpoint, resolve_source
from qconvert.safetensors_io import TensorInfo, TensorReader, read_header

_QUANT_SUFFIXES = (
    "weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx",
    "weight_scale_inv", "input_scale", "output_scale", "weight_global_scale", "input_global_scale",
)
_DTYPE_NAMES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
    torch.float8_e4m3fn: "fp8_e4m3fn", torch.float8_e4m3fnuz: "fp8_e4m3fnuz", torch.int8: "int8",
    torch.int32: "int32", torch.int64: "int64", torch.uint8: "uint8",
}


def dtype_name(dtype: torch.dtype) -> str:
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


@dataclass
class LayerReport:
    module: str
    scheme: str  # e.g. "int4 g128", "bf16"
    format: str  # "pack-quantized", "unquantized", ...
    shape: list[int]  # logical [out, in]
    stored: str  # stored dtypes, e.g. "int32 + bf16 scales"
    bytes: int
    params: int
    original_itemsize: int

    @property
    def quantized(self) -> bool:
        return self.format != "unquantized"


def _split(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _describe(module: str, parts: dict[str, TensorInfo], reader: TensorReader) -> LayerReport | None:
    total = sum(t.nbytes for t in parts.values())
    packed, scale = parts.get("weight_packed"), parts.get("weight_scale")
    weight = parts.get("weight")
    if packed is not None and scale is not None and "weight_shape" in parts:
        out_features, in_features = (int(v) for v in reader.read(parts["weight_shape"]).tolist())
        bits = round(packed.shape[1] * 32 / in_features) if in_features else 0
        bits = 4 if bits <= 4 else 8
        groups = scale.shape[1] if len(scale.shape) == 2 else 1
        grouping = "per-channel" if groups == 1 else f"g{in_features // groups}"
        zp = " asym" if "weight_zero_point" in parts else ""
        return LayerReport(module, f"int{bits} {grouping}{zp}", "pack-quantized", [out_features, in_features],
                           f"int32 + {dtype_name(scale.dtype)} scales", total, out_features * in_features,
                           scale.dtype.itemsize)
    if weight is None or len(weight.shape) < 2:
        return None
    params = weight.numel
    if weight.dtype.is_floating_point and weight.dtype.itemsize >= 2:
        return LayerReport(module, dtype_name(weight.dtype), "unquantized", list(weight.shape),
                           dtype_name(weight.dtype), total, params, weight.dtype.itemsize)
    scale = scale or parts.get("weight_scale_inv")
    if scale is None:
        return LayerReport(module, dtype_name(weight.dtype), "unknown", list(weight.shape),
                           dtype_name(weight.dtype), total, params, weight.dtype.itemsize)
    strategy = _strategy(weight.shape, scale.shape)
    kind = "int8" if weight.dtype == torch.int8 else dtype_name(weight.dtype)
    fmt = "int-quantized" if weight.dtype == torch.int8 else "float-quantized"
    if "weight_scale_inv" in parts:
        fmt = "blockwise_int8" if weight.dtype == torch.int8 else "deepseek-fp8"
    # compressed-tensors stores scales in the original dtype; DeepSeek/SGLang layouts always use fp32
    # scales for bf16 models.
    original = 2 if "weight_scale_inv" in parts else scale.dtype.itemsize
    return LayerReport(module, f"{kind} {strategy}", fmt, list(weight.shape),
                       f"{dtype_name(weight.dtype)} + {dtype_name(scale.dtype)} scales", total, params, original)


def _strategy(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...]) -> str:
    out_features, in_features = weight_shape[-2], weight_shape[-1]
    if math.prod(scale_shape) == 1:
        return "per-tensor"
    rows, cols = ((*scale_shape, 1))[:2] if len(scale_shape) == 1 else scale_shape[-2:]
    if rows == out_features and cols == 1:
        return "per-channel"
    if rows == out_features:
        return f"g{in_features // cols}"
    block_rows, block_cols = -(-out_features // rows), -(-in_features // cols)
    return f"block {block_rows}x{block_cols}"


def checkpoint_format(checkpoint: Checkpoint, layers: list[LayerReport]) -> str:
    qconfig = (checkpoint.config or {}).get("quantization_config")
    if isinstance(qconfig, dict):
        method = qconfig.get("quant_method")
        if method == "compressed-tensors":
            return f"compressed-tensors {qconfig.get('format', '?')}"
        if method == "fp8":
            return "DeepSeek-style FP8 (block scales, weight_scale_inv)"
        return str(method)
    dtypes = {layer.stored for layer in layers if not layer.quantized}
    return f"{'/'.join(sorted(dtypes)) or 'no layers'} (unquantized)"


def inspect_path(path: str) -> dict:
    target = Path(path).expanduser()
    if target.is_file() and target.suffix == ".safetensors":
        header = read_header(target)
        checkpoint = Checkpoint(target.parent, [target], header.tensors, None)
    else:
        checkpoint = open_checkpoint(resolve_source(path))
    return inspect_checkpoint(checkpoint)


def inspect_checkpoint(checkpoint: Checkpoint) -> dict:
    modules: dict[str, dict[str, TensorInfo]] = {}
    for info in checkpoint.tensors.values():
        module, leaf = _split(info.name)
        if leaf in _QUANT_SUFFIXES or leaf == "weight":
            modules.setdefault(module, {})[leaf] = info
    layers: list[LayerReport] = []
    with TensorReader() as reader:
        for module, parts in modules.items():
            report = _describe(module, parts, reader)
            if report is not None:
                layers.append(report)
    stored = checkpoint.tensor_bytes
    layer_bytes = sum(layer.bytes for layer in layers)
    unquantized = stored - layer_bytes + sum(layer.params * layer.original_itemsize for layer in layers)
    quantized = [layer for layer in layers if layer.quantized]
    q_params = sum(layer.params for layer in quantized)
    params = sum(layer.params for layer in layers)
    other = [t for t in checkpoint.tensors.values() if _split(t.name)[0] not in {lay.module for lay in layers}]
    return {
        "path": str(checkpoint.root),
        "format": checkpoint_format(checkpoint, layers),
        "files": [p.name for p in checkpoint.weight_files],
        "layers": [asdict(layer) for layer in layers],
        "totals": {
            "tensors": len(checkpoint.tensors),
            "layers": len(layers),
            "quantized_layers": len(quantized),
            "layer_params": params,
            "other_tensors": len(other),
            "other_bytes": sum(t.nbytes for t in other),
            "bytes": stored,
            "unquantized_bytes": unquantized,
            "compression_ratio": round(unquantized / stored, 4) if stored else None,
            "bits_per_weight": round(8 * sum(lay.bytes for lay in quantized) / q_params, 4) if q_params else None,
        },
    }
