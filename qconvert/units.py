"""Units of work: what the writer executes, one at a time.

A unit reads a few input tensors (a weight, perhaps its scales), turns them into output tensors
whose names, dtypes and shapes are known in advance, and is then forgotten; a unit with no function
copies its single input byte for byte (possibly under a new name). Planning a run means building
its list of units; executing it is the same for every command.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from qconvert.errors import BadInputError
from qconvert.format import compress_weight, output_specs
from qconvert.planning import Plan, module_of
from qconvert.quantizers import scale_divisor
from qconvert.safetensors_io import TensorInfo, TensorReader, TensorSpec
from qconvert.schemes import Scheme

Produce = Callable[[list[torch.Tensor]], dict[str, torch.Tensor]]

# A fused module's parts: the regex's first group names the fused module (one attention's q/k/v,
# one MLP's gate/up), which runtimes load as one matrix with one per-tensor scale.
DEFAULT_FUSED_PATTERNS = [
    r"^(.*\.self_attn)\.(?:q_proj|k_proj|v_proj)$",
    r"^(.*\.attention\.self)\.(?:query|key|value)$",
    r"^(.*\.(?:mlp|experts\.\d+))\.(?:gate_proj|up_proj)$",
    r"^(.*\.experts\.\d+)\.(?:w1|w3)$",
]


@dataclass
class Unit:
    inputs: list[TensorInfo]
    outputs: list[TensorSpec]
    produce: Produce | None = None  # None: copy inputs[0]'s bytes to outputs[0]
    layer: dict | None = None  # the per-layer line of the summary, for units that quantize a layer
    notes: list[str] = field(default_factory=list)

    @property
    def input_bytes(self) -> int:
        return sum(i.nbytes for i in self.inputs)


def copy_unit(info: TensorInfo, name: str | None = None) -> Unit:
    return Unit([info], [TensorSpec(name or info.name, info.dtype, info.shape)])


def layer_entry(module: str, scheme: Scheme, shape: tuple[int, ...], dtype: torch.dtype,
                before: int, outputs: list[TensorSpec]) -> dict:
    return {
        "module": module, "scheme": scheme.name, "label": scheme.label, "shape": list(shape),
        "dtype": str(dtype).removeprefix("torch."), "bytes_before": before,
        "bytes_after": sum(spec.nbytes for spec in outputs),
    }


def require_finite(info: TensorInfo, weight: torch.Tensor, scales: torch.Tensor) -> None:
    """A NaN or Inf anywhere makes its tile's amax, hence its scale, non-finite: the scales are the
    cheap place to look, and the weight is only scanned to write the message."""
    if torch.isfinite(scales).all():
        return
    nan, inf = int(torch.isnan(weight).sum()), int(torch.isinf(weight).sum())
    raise BadInputError(
        f"{info.file.name}: tensor {info.name} holds {nan} NaN and {inf} Inf values; refusing to "
        f"quantize it (repair the checkpoint, or skip the layer with --ignore {module_of(info.name)})"
    )


def quantize_unit(info: TensorInfo, scheme: Scheme, layout: str, scale: torch.Tensor | None = None) -> Unit:
    outputs = output_specs(info.name, info.shape, info.dtype, scheme, layout)

    def produce(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        (weight,) = tensors
        result = compress_weight(info.name, weight, scheme, layout, scale)
        require_finite(info, weight, next(t for n, t in result.items() if "scale" in n.rsplit(".", 1)[-1]))
        return result

    layer = layer_entry(module_of(info.name), scheme, info.shape, info.dtype, info.nbytes, outputs)
    return Unit([info], outputs, produce, layer)


def fused_groups(modules: list[str], patterns: list[str]) -> list[list[str]]:
    """Groups of two or more modules that a runtime fuses into one matrix (first pattern wins)."""
    compiled = [re.compile(p) for p in patterns]
    groups: dict[tuple[int, str], list[str]] = {}
    for module in modules:
        for index, pattern in enumerate(compiled):
            match = pattern.match(module)
            if match:
                groups.setdefault((index, match.group(1)), []).append(module)
                break
    return [members for members in groups.values() if len(members) > 1]


def shared_tensor_scales(plan: Plan, infos: dict[str, TensorInfo], patterns: list[str],
                         reader: TensorReader) -> dict[str, torch.Tensor]:
    """One per-tensor scale per fused group, for the layers whose scheme shares them.

    A pre-pass reads each part once for its amax (memory: one tensor at a time), so parts may sit in
    different shards. The shared scale is what per-tensor quantization of the fused matrix would
    give: ``max(amax) / 448``, as vLLM's ``requantize_with_max_scale`` would otherwise compute at load.
    """
    shared = {name: s for name, s in plan.quantize.items() if s.shared_fused_scale}
    modules = [module_of(name) for name in shared]
    scales: dict[str, torch.Tensor] = {}
    for group in fused_groups(modules, patterns):
        names = [f"{m}.weight" for m in group]
        amaxes = []
        for name in names:
            weight = reader.read(infos[name])
            amaxes.append(weight.abs().amax().to(torch.float32))
            dtype = weight.dtype
            del weight
        scheme = shared[names[0]]
        scale = (torch.stack(amaxes).max() / scale_divisor(scheme.kind, scheme.num_bits)).to(dtype).reshape(1, 1)
        scale.masked_fill_(scale == 0, torch.finfo(dtype).eps)
        scales.update(dict.fromkeys(names, scale))
    return scales


def quantize_units(checkpoint_tensors: dict[str, TensorInfo], plan: Plan, layout: str,
                   shared_scales: dict[str, torch.Tensor] | None = None) -> list[Unit]:
    shared_scales = shared_scales or {}
    units = []
    for info in checkpoint_tensors.values():
        scheme = plan.scheme_for(info)
        if scheme is None:
            units.append(copy_unit(info))
        else:
            units.append(quantize_unit(info, scheme, layout, shared_scales.get(info.name)))
    return units
