"""The compressed-tensors format: tensor names, shapes and the ``quantization_config`` block.

This is the only module that knows how a quantized layer is spelled on disk (FORMAT.md).
"""

from __future__ import annotations

import torch

from qconvert import __version__
from qconvert.planning import Plan
from qconvert.quantizers import packed_columns, quantize_and_pack_symmetric
from qconvert.safetensors_io import TensorInfo, TensorSpec
from qconvert.schemes import Scheme


def base_name(weight_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` → ``model.layers.0.mlp.up_proj``."""
    return weight_name.removesuffix(".weight")


def output_specs(info: TensorInfo, scheme: Scheme | None) -> list[TensorSpec]:
    """What one input tensor becomes on disk; known before any data is read."""
    if scheme is None:
        return [TensorSpec(info.name, info.dtype, info.shape)]
    out_features, in_features = info.shape
    groups = 1 if scheme.group_size == -1 else in_features // scheme.group_size
    prefix = base_name(info.name)
    words = packed_columns(in_features, scheme.num_bits)
    return [
        TensorSpec(f"{prefix}.weight_packed", torch.int32, (out_features, words)),
        TensorSpec(f"{prefix}.weight_scale", info.dtype, (out_features, groups)),
        TensorSpec(f"{prefix}.weight_shape", torch.int64, (2,)),
    ]


def compress_weight(name: str, weight: torch.Tensor, scheme: Scheme) -> dict[str, torch.Tensor]:
    """The tensors of one quantized layer, named as :func:`output_specs` announced them."""
    packed, scales = quantize_and_pack_symmetric(weight, scheme.num_bits, scheme.group_size)
    prefix = base_name(name)
    return {
        f"{prefix}.weight_packed": packed,
        f"{prefix}.weight_scale": scales,
        f"{prefix}.weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
    }


def quantization_config(plan: Plan) -> dict:
    scheme = plan.scheme
    return {
        "quant_method": "compressed-tensors",
        "format": scheme.format,
        "quantization_status": "compressed",
        "version": __version__,
        "global_compression_ratio": None,
        "kv_cache_scheme": None,
        "ignore": list(plan.ignore),
        "sparsity_config": {},
        "transform_config": {},
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "format": scheme.format,
                "weights": scheme.weights_args(),
                "input_activations": None,
                "output_activations": None,
            }
        },
    }
