"""The on-disk formats we write: tensor names, shapes and the ``quantization_config`` block.

This is the only module that knows how a quantized layer is spelled on disk (FORMAT.md):
compressed-tensors ``pack-quantized`` / ``int-quantized`` / ``float-quantized``, and SGLang's
``blockwise_int8`` layout for the block-INT8 scheme.
"""

from __future__ import annotations

import torch

from qconvert.errors import BadInputError
from qconvert.quantizers import packed_columns, quantize_and_pack_symmetric, quantize_tiled
from qconvert.safetensors_io import TensorSpec
from qconvert.schemes import Scheme
from qconvert.serving import fused_modules

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


def streamed_expert_name(name: str) -> str | None:
    """A per-expert tensor as vLLM's gpt-oss loader streams it into its fused-MoE parameters:
    ``experts.3.w13.weight_packed`` → ``experts.3.w13_weight_packed``; None for ``weight_shape``,
    which that loader has no place for (the fused layer's shape parameters are never read)."""
    module, _, leaf = name.rpartition(".")
    return None if leaf == "weight_shape" else f"{module}_{leaf}"


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


# compressed-tensors writes its own library version into `version`; ours is the release of the format
# we write and test against (the conformance tiers and the llm-compressor comparison use it).
COMPRESSED_TENSORS_VERSION = "0.20.0"


def config_group(scheme: Scheme, targets: list[str]) -> dict:
    return {
        "targets": targets,
        "format": scheme.format,
        "weights": scheme.weights_args(),
        "input_activations": scheme.activations,
        "output_activations": None,
    }


def _with_fused_names(schemes_by_module: dict[str, Scheme | None]) -> dict[str, Scheme | None]:
    """``schemes_by_module`` (None: left unquantized) plus the fused layers engines build from them.

    A fused layer has one scheme: parts that differ cannot be served, so they are refused here, before
    any work, with the names of the parts.
    """
    result = dict(schemes_by_module)
    for fused, parts in fused_modules(list(schemes_by_module)).items():
        schemes = {p: schemes_by_module.get(p, "missing") for p in parts}
        names = {None if s is None else getattr(s, "name", s) for s in schemes.values()}
        if len(names) > 1:
            detail = ", ".join(f"{p.rpartition('.')[2]}={'none' if s is None else getattr(s, 'name', s)}"
                               for p, s in schemes.items())
            raise BadInputError(
                f"{fused.rpartition('.')[0]}: vLLM and SGLang load {', '.join(p.rpartition('.')[2] for p in parts)} "
                f"as one fused layer ({fused.rpartition('.')[2]}) with one scheme, but they would get {detail}; "
                "give them the same scheme (or ignore all of them)")
        result[fused] = schemes[parts[0]]  # type: ignore[assignment]
    return result


def quantization_config(schemes_by_module: dict[str, Scheme], ignore: list[str],
                        layout: str = "compressed-tensors", extra_groups: dict | None = None) -> dict:
    """The config block for the layers as planned: one group, or one group per scheme (mixed).

    Field for field what compressed-tensors' ``QuantizationConfig`` dumps (as llm-compressor writes it).
    Explicit module targets and ignore entries also name the fused layers engines build (``qkv_proj``,
    ``gate_up_proj``), so that engines matching fused names find them too.
    """
    everything = _with_fused_names({**dict.fromkeys(ignore), **schemes_by_module})
    ignore = list(ignore) + sorted(m for m, s in everything.items() if s is None and m not in ignore)
    by_scheme: dict[str, tuple[Scheme, list[str]]] = {}
    for module, scheme in everything.items():
        if scheme is not None:
            by_scheme.setdefault(scheme.name, (scheme, []))[1].append(module)
    if layout == "sglang":
        if set(by_scheme) != {"int8-block"}:
            raise BadInputError("--layout sglang writes only the int8-block scheme, with no other scheme mixed in")
        return {"quant_method": "blockwise_int8", "activation_scheme": "dynamic",
                "weight_block_size": list(by_scheme["int8-block"][0].block or (128, 128)),
                "ignored_layers": ignore}
    if len(by_scheme) == 1:
        (scheme, _), = by_scheme.values()
        groups = {scheme.preset: config_group(scheme, ["Linear"])}
        fmt = scheme.format
    else:
        # The group with the most layers targets "Linear" (every linear layer not named elsewhere), the others
        # name their layers: vLLM, SGLang and compressed-tensors all try name targets before class names, and
        # SGLang reads a block scheme's block size for fused layers from the "Linear" group only. Every other
        # linear layer is in `ignore`, so the catch-all cannot reach a layer meant to stay unquantized.
        catch_all = max(by_scheme, key=lambda name: len(by_scheme[name][1]))
        groups = {}
        for key, (scheme, modules) in by_scheme.items():
            name = scheme.preset if scheme.preset not in groups else scheme.name
            groups[name] = config_group(scheme, ["Linear"] if key == catch_all else sorted(modules))
        fmt = "mixed-precision"
    if extra_groups:
        groups.update(extra_groups)
    return {
        "quant_method": "compressed-tensors",
        "format": fmt,
        "quantization_status": "compressed",
        "version": COMPRESSED_TENSORS_VERSION,
        "global_compression_ratio": None,
        "kv_cache_scheme": None,
        "moe_sparsity_config": None,
        "ignore": ignore,
        "transform_config": {},
        "config_groups": groups,
    }
