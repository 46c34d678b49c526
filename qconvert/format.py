"""The compressed-tensors side of what we write: tensor names and the ``quantization_config`` block.

What each format's tensors are lives in its class (:mod:`qconvert.formats`); this module picks the format a
scheme is written in (SGLang's ``blockwise_int8`` under ``--layout sglang``) and assembles the config block that
names every group's format, field for field as compressed-tensors dumps it.
"""

from __future__ import annotations

import torch

from qconvert.errors import BadInputError
from qconvert.formats import Algorithm, Layout, WeightFormat
from qconvert.formats.tiled import BlockwiseInt8
from qconvert.safetensors_io import TensorSpec
from qconvert.schemes import Scheme
from qconvert.serving import fused_modules

LAYOUTS = tuple(layout.value for layout in Layout)


def base_name(weight_name: str) -> str:
    """``model.layers.0.mlp.up_proj.weight`` → ``model.layers.0.mlp.up_proj``."""
    return weight_name.removesuffix(".weight")


def written_format(scheme: Scheme, layout: Layout | str = Layout.COMPRESSED_TENSORS) -> WeightFormat:
    """The format ``scheme``'s layers are written in under ``layout``."""
    if Layout(layout) is Layout.SGLANG:
        return BlockwiseInt8.instance()
    return scheme.format


def output_specs(name: str, shape: tuple[int, ...], dtype: torch.dtype, scheme: Scheme,
                 layout: Layout | str = Layout.COMPRESSED_TENSORS) -> list[TensorSpec]:
    """What one weight becomes on disk; known before any data is read."""
    return written_format(scheme, layout).specs(base_name(name), (shape[0], shape[1]), dtype, scheme.args)


def streamed_expert_name(name: str) -> str | None:
    """A per-expert tensor as vLLM's gpt-oss loader streams it into its fused-MoE parameters:
    ``experts.3.w13.weight_packed`` → ``experts.3.w13_weight_packed``; None for ``weight_shape``,
    which that loader has no place for (the fused layer's shape parameters are never read)."""
    module, _, leaf = name.rpartition(".")
    return None if leaf == "weight_shape" else f"{module}_{leaf}"


def compress_weight(name: str, weight: torch.Tensor, scheme: Scheme, layout: Layout | str = Layout.COMPRESSED_TENSORS,
                    shared: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors of one quantized layer, named as :func:`output_specs` announced them.

    ``shared`` forces what the parts of a fused layer share (fp8-tensor's scale, NVFP4's global scale).
    """
    return written_format(scheme, layout).compress(base_name(name), weight, scheme.args, shared)


# compressed-tensors writes its own library version into `version`; ours is the release of the format
# we write and test against (the conformance tiers and the llm-compressor comparison use it).
COMPRESSED_TENSORS_VERSION = "0.20.0"


def config_group(scheme: Scheme, targets: list[str]) -> dict:
    return {
        "targets": targets,
        "format": scheme.format.config_format(),
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


ALGORITHM_KEY = "qconvert_algorithm"  # how scales were chosen; absent: round-to-nearest everywhere


def _algorithm_entry(schemes_by_module: dict[str, Scheme]) -> dict:
    """``{"qconvert_algorithm": "search"}`` when every quantized layer used one algorithm other than rtn;
    ``{"qconvert_algorithm": {"search": [modules]}}`` (the others rtn) when they differ; nothing when all are
    rtn, so the config stays field for field llm-compressor's. Readers ignore unknown keys (compressed-tensors'
    ``QuantizationConfig`` has ``extra="ignore"``); ``qconvert inspect`` shows it."""
    by_module = {m: s.args.algorithm for m, s in schemes_by_module.items() if s is not None}
    used = set(by_module.values())
    if used <= {Algorithm.RTN}:
        return {}
    if len(used) == 1:
        return {ALGORITHM_KEY: used.pop().value}
    return {ALGORITHM_KEY: {a.value: sorted(m for m, b in by_module.items() if b is a)
                            for a in sorted(used - {Algorithm.RTN}, key=lambda a: a.value)}}


def quantization_config(schemes_by_module: dict[str, Scheme], ignore: list[str],
                        layout: Layout | str = Layout.COMPRESSED_TENSORS, extra_groups: dict | None = None) -> dict:
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
    if Layout(layout) is Layout.SGLANG:
        if set(by_scheme) != {"int8-block"}:
            raise BadInputError("--layout sglang writes only the int8-block scheme, with no other scheme mixed in")
        return {"quant_method": "blockwise_int8", "activation_scheme": "dynamic",
                "weight_block_size": list(by_scheme["int8-block"][0].block or (128, 128)),
                "ignored_layers": ignore}
    if len(by_scheme) == 1:
        (scheme, _), = by_scheme.values()
        groups = {scheme.preset: config_group(scheme, ["Linear"])}
        fmt = scheme.format.config_format()
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
        **_algorithm_entry(schemes_by_module),
    }
