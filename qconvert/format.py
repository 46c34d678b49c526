"""The on-disk formats we write: tensor names, shapes and the ``quantization_config`` block.

This is the only module that knows how a quantized layer is spelled on disk (FORMAT.md):
compressed-tensors ``pack-quantized`` / ``int-quantized`` / ``float-quantized``, and SGLang's
``blockwise_int8`` layout for the block-INT8 scheme.
"""

from __future__ import annotations

import torch

from qconvert import __version__
from qconvert.errors import BadInputError
from qconvert.quantizers import packed_columns, quantize_and_pack_symmetric, quantize_tiled
from qconvert.safetensors_io import TensorSpec
from qconvert.schemes import Scheme

LAYOUTS = ("compressed-tensors", "sglang")


def base_name(weight_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` → ``model.layers.0.mlp.up_proj``."""
    return weight_name.removesuffix(".weight")


def scale_shape(shape: tuple[int, ...], scheme: Scheme) -> tuple[int, ...]:
    if scheme.strategy == "tensor":
        return (1,)
    th, tw = scheme.tile(shape)
    return (-(-shape[0] // th), -(-shape[1] // tw))


def output_specs(name: str, shape: tuple[int, ...], dtype: torch.dtype, scheme: Scheme,
                 layout: str = "compressed-tensors") -> list[TensorSpec]:
    """What one weight becomes on disk; known before any data is read."""
    prefix = base_name(name)
    out_features, in_features = shape
    scales = scale_shape(shape, scheme)
    if scheme.format == "pack-quantized":
        return [
            TensorSpec(f"{prefix}.weight_packed", torch.int32,
                       (out_features, packed_columns(in_features, scheme.num_bits))),
            TensorSpec(f"{prefix}.weight_scale", dtype, scales),
            TensorSpec(f"{prefix}.weight_shape", torch.int64, (2,)),
        ]
    stored = torch.float8_e4m3fn if scheme.kind == "float" else torch.int8
    if layout == "sglang":
        return [TensorSpec(name, stored, shape), TensorSpec(f"{prefix}.weight_scale_inv", torch.float32, scales)]
    return [TensorSpec(name, stored, shape), TensorSpec(f"{prefix}.weight_scale", dtype, scales)]


def compress_weight(name: str, weight: torch.Tensor, scheme: Scheme, layout: str = "compressed-tensors",
                    scale: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one quantized layer, named as :func:`output_specs` announced them.

    ``scale`` forces a given scale (a per-tensor scale shared by the parts of a fused module).
    """
    prefix = base_name(name)
    if scheme.format == "pack-quantized":
        if scale is not None:
            raise ValueError(f"{scheme.name}: pack-quantized schemes compute their own group scales")
        group = -1 if scheme.strategy == "channel" else scheme.group_size
        packed, scales = quantize_and_pack_symmetric(weight, scheme.num_bits, group)
        return {
            f"{prefix}.weight_packed": packed,
            f"{prefix}.weight_scale": scales,
            f"{prefix}.weight_shape": torch.tensor(weight.shape, dtype=torch.int64),
        }
    values, scales = quantize_tiled(weight, scheme.tile(tuple(weight.shape)), scheme.kind, scheme.num_bits, scale)
    stored_scale = scales.reshape(scale_shape(tuple(weight.shape), scheme))
    if layout == "sglang":
        return {name: values, f"{prefix}.weight_scale_inv": stored_scale.to(torch.float32)}
    return {name: values, f"{prefix}.weight_scale": stored_scale}


def config_group(scheme: Scheme, targets: list[str]) -> dict:
    return {
        "targets": targets,
        "format": scheme.format,
        "weights": scheme.weights_args(),
        "input_activations": scheme.activations,
        "output_activations": None,
    }


def quantization_config(schemes_by_module: dict[str, Scheme], ignore: list[str],
                        layout: str = "compressed-tensors", extra_groups: dict | None = None) -> dict:
    """The config block for the layers as planned: one group, or one group per scheme (mixed)."""
    by_scheme: dict[str, tuple[Scheme, list[str]]] = {}
    for module, scheme in schemes_by_module.items():
        by_scheme.setdefault(scheme.name, (scheme, []))[1].append(module)
    if layout == "sglang":
        if set(by_scheme) != {"int8-block"}:
            raise BadInputError("--layout sglang writes only the int8-block scheme, with no other scheme mixed in")
        return {"quant_method": "blockwise_int8", "activation_scheme": "dynamic",
                "weight_block_size": list(by_scheme["int8-block"][0].block or (128, 128)),
                "ignored_layers": list(ignore)}
    if len(by_scheme) == 1:
        (scheme, _), = by_scheme.values()
        groups = {"group_0": config_group(scheme, ["Linear"])}
        fmt = scheme.format
    else:
        groups = {
            f"group_{i}": config_group(scheme, sorted(modules))
            for i, (scheme, modules) in enumerate(by_scheme.values())
        }
        fmt = "mixed-precision"
    if extra_groups:
        groups.update(extra_groups)
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "version": __version__,
        "global_compression_ratio": None,
        "kv_cache_scheme": None,
        "ignore": list(ignore),
        "sparsity_config": {},
        "transform_config": {},
        "config_groups": groups,
    }
