"""``qconvert inspect``: what a safetensors checkpoint holds, per layer and in total.

Works from headers alone (plus the tiny ``weight_shape`` tensors), so inspecting a 100 GB checkpoint
reads kilobytes. The format of each layer is recognised from its tensor names and dtypes, so a
checkpoint whose config is missing or wrong is still described truthfully.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from qconvert.checkpoint import Checkpoint, open_checkpoint, resolve_source
from qconvert.quant_methods import describe
from qconvert.safetensors_io import TensorInfo, TensorReader, read_header
from qconvert.sources import ACTIVATION_LEAVES, WEIGHT_LEAVES, StoredLayer, stored_layers

# A layer's tensors: what sources.py reads, plus leaves of formats we only describe.
_LAYER_LEAVES = (*WEIGHT_LEAVES, *ACTIVATION_LEAVES, "weight_g_idx", "weight_global_scale", "input_global_scale")
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


def _describe(module: str, parts: dict[str, TensorInfo], stored: StoredLayer | None) -> LayerReport | None:
    total = sum(t.nbytes for t in parts.values())
    if stored is not None:
        scale = stored.scale
        layout = stored.layout if stored.values.dtype != torch.float8_e4m3fnuz else f"{stored.layout} (e4m3fnuz)"
        statics = [leaf for leaf in ("input_scale", "output_scale") if leaf in parts]
        extra = " + int32 zero points" if "weight_zero_point" in parts else ""
        extra += f" + static {'/'.join(statics)}" if statics else ""
        return LayerReport(module, stored.label, layout, list(stored.shape),
                           f"{dtype_name(stored.values.dtype)} + {dtype_name(scale.dtype)} scales{extra}", total,
                           stored.shape[0] * stored.shape[1], stored.dtype.itemsize)
    weight = parts.get("weight")
    if weight is None or len(weight.shape) < 2:
        return None
    fmt = "unquantized" if weight.dtype.is_floating_point and weight.dtype.itemsize >= 2 else "unknown"
    return LayerReport(module, dtype_name(weight.dtype), fmt, list(weight.shape), dtype_name(weight.dtype), total,
                       weight.numel, weight.dtype.itemsize)


def checkpoint_format(checkpoint: Checkpoint, layers: list[LayerReport]) -> str:
    if checkpoint.unreadable is not None:
        return checkpoint.unreadable
    qconfig = (checkpoint.config or {}).get("quantization_config")
    fnuz = " (e4m3fnuz)" if any("e4m3fnuz" in layer.format for layer in layers) else ""
    if isinstance(qconfig, dict):
        method = qconfig.get("quant_method")
        if method == "compressed-tensors":
            return f"compressed-tensors {qconfig.get('format', '?')}{fnuz}{_algorithm(qconfig)}"
        if method == "fp8":
            block = qconfig.get("weight_block_size")
            return f"DeepSeek-style FP8 (block {'x'.join(map(str, block)) if block else '?'}, weight_scale_inv)"
        if method == "blockwise_int8":
            return f"SGLang blockwise_int8 (block {'x'.join(map(str, qconfig.get('weight_block_size') or []))})"
        return str(method)
    quantized = {layer.format for layer in layers if layer.quantized}
    if quantized:
        return f"quantized, no quantization_config ({', '.join(sorted(quantized))})"
    dtypes = {layer.stored for layer in layers}
    return f"{'/'.join(sorted(dtypes)) or 'no layers'} (unquantized)"


def _algorithm(qconfig: dict) -> str:
    """How the scales were chosen, where qconvert recorded it (``--algorithm search``; rtn records nothing)."""
    recorded = qconfig.get("qconvert_algorithm")
    if isinstance(recorded, str):
        return f", scales by {recorded}"
    if isinstance(recorded, dict):
        return "".join(f", scales by {name} on {len(modules)} layers (rtn elsewhere)"
                       for name, modules in recorded.items() if isinstance(modules, list))
    return ""


def inspect_path(path: str) -> dict:
    target = Path(path).expanduser()
    if target.is_file() and target.suffix == ".safetensors":
        header = read_header(target)
        checkpoint = Checkpoint(target.parent, [target], header.tensors, None)
        checkpoint.unreadable = describe(None, None, list(header.tensors))
    else:
        # A checkpoint qconvert cannot read is described, not refused: saying what it is helps.
        checkpoint = open_checkpoint(resolve_source(path), describe=True, ours_ok=True)
    return inspect_checkpoint(checkpoint)


def inspect_checkpoint(checkpoint: Checkpoint) -> dict:
    modules: dict[str, dict[str, TensorInfo]] = {}
    for info in checkpoint.tensors.values():
        module, leaf = _split(info.name)
        if leaf in _LAYER_LEAVES:
            modules.setdefault(module, {})[leaf] = info
    layers: list[LayerReport] = []
    stored_by_module: dict[str, StoredLayer] = {}
    if checkpoint.unreadable is None:  # else its tensors mean something our readers would misread
        with TensorReader() as reader:
            stored_by_module = stored_layers(checkpoint, reader)
    for module, parts in modules.items():
        report = _describe(module, parts, stored_by_module.get(module))
        if report is not None:
            layers.append(report)
    stored = checkpoint.tensor_bytes
    layer_bytes = sum(layer.bytes for layer in layers)
    unquantized = stored - layer_bytes + sum(layer.params * layer.original_itemsize for layer in layers)
    quantized = [layer for layer in layers if layer.quantized]
    q_params = sum(layer.params for layer in quantized)
    params = sum(layer.params for layer in layers)
    layer_modules = {layer.module for layer in layers}
    other = [t for t in checkpoint.tensors.values() if _split(t.name)[0] not in layer_modules]
    return {
        "path": str(checkpoint.root),
        "format": checkpoint_format(checkpoint, layers),
        "readable": checkpoint.unreadable is None,  # False: quantize/convert/verify refuse it
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
