"""Units of work: what the writer executes, one at a time.

A unit reads a few input tensors (a weight, perhaps its scales), turns them into output tensors
whose names, dtypes and shapes are known in advance, and is then forgotten; a unit with no function
copies its single input byte for byte (possibly under a new name). Planning a run means building
its list of units; executing it is the same for every command.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from qconvert.architectures import COMMON_FUSIONS
from qconvert.errors import BadInputError
from qconvert.format import base_name, output_specs, streamed_expert_name, written_format
from qconvert.formats import Layout, NumberType
from qconvert.formats.base import Cast, CastLosses
from qconvert.numerics import require_representable
from qconvert.planning import Plan, SplitExperts, module_of
from qconvert.quantizers import e4m3fn_to_e4m3fnuz
from qconvert.safetensors_io import TensorInfo, TensorReader, TensorSpec
from qconvert.schemes import Scheme
from qconvert.sources import ACTIVATION_LEAVES, RebuiltTensor, StoredLayer, rebuild_weight

Produce = Callable[[list[torch.Tensor]], dict[str, torch.Tensor]]

# A fused module's parts: the regex's first group names the fused module (one attention's q/k/v,
# one MLP's gate/up), which runtimes load as one matrix with one per-tensor scale. These are the
# fusions common to every architecture; each architecture's full map (DeepSeek MLA adds
# q_a_proj + kv_a_proj_with_mqa) is `ModelFacts.fused_patterns`.
DEFAULT_FUSED_PATTERNS = list(COMMON_FUSIONS)


@dataclass
class Unit:
    inputs: list[TensorInfo]
    outputs: list[TensorSpec]
    produce: Produce | None = None  # None: copy inputs[0]'s bytes to outputs[0]
    layer: dict | None = None  # the per-layer line of the summary, for units that quantize a layer
    more_layers: list[dict] = field(default_factory=list)  # units that write several layers (split experts)

    @property
    def input_bytes(self) -> int:
        return sum(i.nbytes for i in self.inputs)

    @property
    def layers(self) -> list[dict]:
        return ([self.layer] if self.layer else []) + self.more_layers


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


def checked_compress(source: TensorInfo, name: str, weight: torch.Tensor, scheme: Scheme, layout: Layout,
                     shared: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """:func:`compress_weight`, refusing weights with NaN/Inf (named after the ``source`` tensor)."""
    fmt = written_format(scheme, layout)
    result = fmt.compress(base_name(name), weight, scheme.args, shared)
    scales, dtype = fmt.scales_of(result, weight.dtype)
    require_finite(source, weight, scales)
    require_representable(source, scales, fmt, scheme.args, scheme.name, dtype)
    return result


def quantize_unit(info: TensorInfo, scheme: Scheme, layout: Layout, scale: torch.Tensor | None = None) -> Unit:
    outputs = output_specs(info.name, info.shape, info.dtype, scheme, layout)

    def produce(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return checked_compress(info, info.name, tensors[0], scheme, layout, scale)

    layer = layer_entry(module_of(info.name), scheme, info.shape, info.dtype, info.nbytes, outputs)
    return Unit([info], outputs, produce, layer)


def rebuilt_unit(info: RebuiltTensor) -> Unit:
    """A tensor that is stored quantized (gpt-oss MXFP4 experts) written in full precision, as the bf16 release
    holds it."""
    return Unit(info.source.parts, [TensorSpec(info.name, info.dtype, info.shape)],
                lambda tensors: {info.name: info.source.rebuild(*tensors)})


def split_experts_unit(info: TensorInfo, split: SplitExperts, layout: Layout) -> Unit:
    """A 3-D expert tensor written as one quantized layer per expert and part (``architectures.ExpertSplit``):
    the stored tensor is read once (or rebuilt from its stored parts, for a :class:`RebuiltTensor`), each
    expert's slice cut into its parts' ``[out, in]`` weights."""
    layers = split.layers
    rebuilt = info.source if isinstance(info, RebuiltTensor) else None
    # The on-disk name of each tensor compress_weight names (None: not written).
    spelled = streamed_expert_name if split.split.vllm_spelling else (lambda name: name)
    per_layer = [[TensorSpec(name, spec.dtype, spec.shape)
                  for spec in output_specs(f"{module}.weight", shape, info.dtype, split.scheme, layout)
                  if (name := spelled(spec.name)) is not None]
                 for module, _, _, shape in layers]

    # Parts cut from one stored tensor that engines fuse again (GraniteMoE's gate and up of one expert) share what
    # the scheme shares (NVFP4's global scale): computed here, since this unit holds every part.
    fused = fused_groups([module for module, _, _, _ in layers], DEFAULT_FUSED_PATTERNS) \
        if split.scheme.shared_fused_scale else []
    group_of = {module: tuple(group) for group in fused for module in group}

    def produce(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        result: dict[str, torch.Tensor] = {}
        whole = rebuilt.rebuild(*tensors) if rebuilt else tensors[0]
        cuts = {module: part.cut(whole[expert]) for module, expert, part, _ in layers}
        shared: dict[tuple[str, ...], torch.Tensor | None] = {}
        for group in set(group_of.values()):
            amax = torch.stack([cuts[m].abs().amax() for m in group]).max()
            shared[group] = split.scheme.format.shared(amax, cuts[group[0]].dtype, split.scheme.args)
        for module, _, _, _ in layers:
            weight = cuts[module].contiguous()
            written = checked_compress(info, f"{module}.weight", weight, split.scheme, layout,
                                       shared.get(group_of.get(module, ())))
            result.update({name: tensor for stored, tensor in written.items()
                           if (name := spelled(stored)) is not None})
        return result

    entries = [layer_entry(module, split.scheme, shape, info.dtype, shape[0] * shape[1] * info.dtype.itemsize, specs)
               for (module, _, _, shape), specs in zip(layers, per_layer, strict=True)]
    inputs = rebuilt.parts if rebuilt else [info]
    return Unit(inputs, [spec for specs in per_layer for spec in specs], produce, entries[0], entries[1:])


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


AmaxReader = Callable[[str], tuple[torch.Tensor, torch.dtype]]  # weight name → (float32 |x| max, its dtype)


def shared_tensor_scales(plan: Plan, amax_of: AmaxReader, patterns: list[str],
                         already_shared: Callable[[list[str]], bool] | None = None) -> dict[str, torch.Tensor]:
    """What each fused group shares (``format.shared``: fp8-tensor's scale, NVFP4's global scale), for the layers
    whose scheme shares it.

    A pre-pass reads each part once for its amax (``amax_of``, which blames a NaN or Inf on its tensor), so parts
    may sit in different shards. The shared value is what per-tensor quantization of the fused matrix would give
    (for fp8-tensor ``max(amax) / 448``, as vLLM's ``requantize_with_max_scale`` would otherwise compute at load).
    NVFP4 shares a global scale in every attention and MLP, so this pass reads most of the model: the parts are
    read on a few threads at once (reads and torch's reductions release the GIL). ``already_shared``: groups whose
    parts are quantized inputs that already share it (they are copied as they are).
    """
    shared = {name: s for name, s in plan.quantize.items() if s.shared_fused_scale}
    groups = [[f"{m}.weight" for m in group] for group in fused_groups([module_of(n) for n in shared], patterns)]
    groups = [g for g in groups if already_shared is None or not already_shared(g)]

    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        found = dict(zip((n for g in groups for n in g), pool.map(amax_of, [n for g in groups for n in g]),
                         strict=True))
    scales: dict[str, torch.Tensor] = {}
    for names in groups:
        scheme = shared[names[0]]
        amax = torch.stack([found[name][0] for name in names]).max()
        value = scheme.format.shared(amax, found[names[0]][1], scheme.args)
        if value is not None:
            scales.update(dict.fromkeys(names, value))
    return scales


@dataclass
class ExactCasts:
    """Stored layers written by their format's exact cast into their scheme (:meth:`WeightFormat.exact_cast`):
    what each fused group shares once cast, and the blocks the target cannot hold (refused without consent)."""

    shared: dict[str, torch.Tensor | None] = field(default_factory=dict)  # weight name → group value (None: own)
    losses: list[tuple[str, CastLosses]] = field(default_factory=list)  # (first module of the group, losses)

    def note(self) -> str | None:
        if not self.losses:
            return None
        blocks = sum(loss.blocks for _, loss in self.losses)
        largest = max(loss.largest_error for _, loss in self.losses)
        return (f"note: {blocks} blocks in {len(self.losses)} layers (e.g. {self.losses[0][0]}) are below the range "
                f"of their exact cast's scales and are rounded, to zero at worst (largest error {largest:.3g}); "
                "every other value is kept exactly")


class _GroupReader:
    """A reader that keeps what it read for one fused group's questions (its scales: small), then is dropped."""

    def __init__(self, reader: TensorReader) -> None:
        self._reader = reader
        self._read: dict[str, torch.Tensor] = {}

    def read(self, info: TensorInfo) -> torch.Tensor:
        if info.name not in self._read:
            self._read[info.name] = self._reader.read(info)
        return self._read[info.name]


def exact_casts(plan: Plan, stored: dict[str, StoredLayer], reader: TensorReader, patterns: list[str],
                allow_requantize: bool) -> ExactCasts:
    """Which stored layers are cast exactly (by group: a fused group casts only if all its parts can and their
    format gives them one shared value), reading their scales once, before any write."""
    casts = ExactCasts()
    candidates = {name: stored[module_of(name)] for name, scheme in plan.quantize.items()
                  if module_of(name) in stored
                  and stored[module_of(name)].format.exact_cast(stored[module_of(name)], scheme.format, scheme.args)}
    grouped = [[f"{m}.weight" for m in group] for group in fused_groups([module_of(n) for n in candidates], patterns)
               if plan.quantize[f"{group[0]}.weight"].shared_fused_scale]
    in_group = {name for group in grouped for name in group}
    for names in grouped + [[name] for name in candidates if name not in in_group]:
        layers = [candidates[name] for name in names]
        fmt = layers[0].format
        if any(layer.format is not fmt for layer in layers):
            continue
        scheme = plan.quantize[names[0]]
        group_reader = _GroupReader(reader)  # the group's scales read once for both questions below
        value = fmt.cast_shared(layers, group_reader, scheme.format) if len(names) > 1 else None
        if len(names) > 1 and value is None:
            continue  # no one value for the group: requantized (with consent), as any other input
        losses = fmt.cast_losses(layers, group_reader, scheme.format, scheme.args)
        if losses is not None:
            if not allow_requantize:
                first, target = layers[0], plan.quantize[names[0]].name
                raise BadInputError(
                    f"{first.values.file.name}: {first.module}: {losses.blocks} of {losses.total_blocks} blocks "
                    f"({first.layout}) are too far below the largest of their group for {target}'s "
                    f"scales to hold them exactly (largest error {losses.largest_error:.3g}): pass --allow-requantize "
                    "to write them rounded (to zero at worst)")
            casts.losses.append((layers[0].module, losses))
        casts.shared.update(dict.fromkeys(names, value))
    return casts


def _leaves(layer: StoredLayer) -> list[str]:
    return sorted(layer.parts)


def _stored_tensors(layer: StoredLayer, tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    return dict(zip(_leaves(layer), tensors, strict=True))


def requantize_unit(layer: StoredLayer, scheme: Scheme, layout: Layout, scale: torch.Tensor | None = None) -> Unit:
    """Rebuild a stored layer's weight and quantize it into ``scheme``."""
    name = f"{layer.module}.weight"
    outputs = output_specs(name, layer.shape, layer.dtype, scheme, layout)
    inputs = [layer.parts[leaf] for leaf in _leaves(layer)]

    def produce(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = rebuild_weight(layer, _stored_tensors(layer, tensors))
        return checked_compress(layer.values, name, weight, scheme, layout, scale)

    before = sum(i.nbytes for i in inputs)
    return Unit(inputs, outputs, produce, layer_entry(layer.module, scheme, layer.shape, layer.dtype, before, outputs))


def dequantize_unit(layer: StoredLayer, dtype: torch.dtype | None = None) -> Unit:
    """A stored layer written back as a plain ``.weight`` (in its logical dtype, or ``dtype``)."""
    dtype = dtype or layer.dtype
    inputs = [layer.parts[leaf] for leaf in _leaves(layer)]
    output = TensorSpec(f"{layer.module}.weight", dtype, layer.shape)

    def produce(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {output.name: rebuild_weight(layer, _stored_tensors(layer, tensors)).to(dtype)}

    return Unit(inputs, [output], produce)


def cast_layer_unit(layer: StoredLayer, scheme: Scheme, layout: Layout, cast: Cast,
                    shared: torch.Tensor | None = None) -> Unit:
    """A stored layer that ``scheme``'s format holds exactly under other names or encodings (a ModelOpt NVFP4
    layer as compressed-tensors NVFP4, MXFP4 as NVFP4): its codes kept, no value requantized."""
    outputs = output_specs(f"{layer.module}.weight", layer.shape, layer.dtype, scheme, layout)
    inputs = [layer.parts[leaf] for leaf in _leaves(layer)]

    def produce(tensors: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return cast(layer.module, _stored_tensors(layer, tensors), shared)

    before = sum(i.nbytes for i in inputs)
    return Unit(inputs, outputs, produce, layer_entry(layer.module, scheme, layer.shape, layer.dtype, before, outputs))


def copy_layer_units(layer: StoredLayer, scheme: Scheme) -> list[Unit]:
    """A stored layer that already is what ``scheme`` writes: its tensors copied under the
    compressed-tensors names (``weight_scale_inv`` → ``weight_scale``, keeping its dtype)."""
    # Named and shaped as the scheme writes them: a per-tensor scale stored as a scalar (ModelOpt FP8) is [1] in
    # compressed-tensors, which its loaders check (the bytes are the same).
    shapes = {spec.name: spec.shape for spec in output_specs(f"{layer.module}.weight", layer.shape, layer.dtype,
                                                              scheme, Layout.COMPRESSED_TENSORS)}
    units = []
    for leaf, info in sorted(layer.parts.items()):
        name = f"{layer.module}.{'weight_scale' if leaf == 'weight_scale_inv' else leaf}"
        shape = shapes.get(name, info.shape)
        units.append(Unit([info], [TensorSpec(name, info.dtype, shape if math.prod(shape) == info.numel
                                              else info.shape)]))
    before = sum(u.input_bytes for u in units)
    units[0].layer = layer_entry(layer.module, scheme, layer.shape, layer.dtype, before,
                                 [spec for u in units for spec in u.outputs])
    return units


def quantize_units(tensors: dict[str, TensorInfo], plan: Plan, layout: Layout,
                   stored: dict[str, StoredLayer] | None = None,
                   shared_scales: dict[str, torch.Tensor] | None = None,
                   allow_requantize: bool = False, casts: ExactCasts | None = None) -> tuple[list[Unit], list[str]]:
    """Units for ``quantize`` over the planner's view of the checkpoint, and notes for the user."""
    stored = stored or {}
    shared_scales = shared_scales or {}
    casts = casts or ExactCasts()
    units: list[Unit] = []
    dropped: list[str] = []
    for info in tensors.values():
        module, _, leaf = info.name.rpartition(".")
        scheme = plan.scheme_for(info)
        layer = stored.get(module) if leaf == "weight" else None
        if info.name in plan.splits:
            split = plan.splits[info.name]
            if isinstance(info, RebuiltTensor) and not allow_requantize:
                raise BadInputError(
                    f"{info.source.blocks.file.name}: {info.name} is already quantized (gpt-oss MXFP4 experts); "
                    f"requantizing fp4 weights into {split.scheme.name} loses quality: pass --allow-requantize")
            units.append(split_experts_unit(info, split, layout))
        elif isinstance(info, RebuiltTensor):
            units.append(rebuilt_unit(info))  # kept 3-D: written as the bf16 release holds it
        elif module in stored and leaf in ACTIVATION_LEAVES:
            dropped.append(info.name)  # the schemes we write quantize activations dynamically
        elif layer is None and scheme is None:
            units.append(copy_unit(info))
        elif layer is None:
            units.append(quantize_unit(info, scheme, layout, shared_scales.get(info.name)))
        elif scheme is None:
            units.append(dequantize_unit(layer))
        elif layout == Layout.COMPRESSED_TENSORS and layer.matches(scheme.format, scheme.args) \
                and info.name not in shared_scales:
            units.extend(copy_layer_units(layer, scheme))
        elif layout == Layout.COMPRESSED_TENSORS and info.name in casts.shared \
                and (cast := layer.format.exact_cast(layer, scheme.format, scheme.args)) is not None:
            units.append(cast_layer_unit(layer, scheme, layout, cast, casts.shared[info.name]))
        elif layer.args.number is not NumberType.FP8_E4M3 and not allow_requantize:
            raise BadInputError(
                f"{layer.values.file.name}: {module} is already quantized ({layer.label}, {layer.layout}); "
                f"requantizing {'integer' if layer.args.number is NumberType.INT else 'fp4'} weights into "
                f"{scheme.name} loses quality: pass --allow-requantize"
            )
        else:
            units.append(requantize_unit(layer, scheme, layout, shared_scales.get(info.name)))
    notes = []
    if dropped:
        notes.append(f"note: dropping {len(dropped)} static activation scales (e.g. {dropped[0]}): the output "
                     "schemes quantize activations dynamically")
    return units, notes


def apply_fnuz(units: list[Unit]) -> list[Unit]:
    """``--fnuz``: every e4m3fn weight written as e4m3fnuz, and its layer's scale doubled, so each code
    dequantizes as before. Works on each tensor alone, so copied layers stay copies in spirit."""
    # Tiled fp8 layers only (a float scale, which doubling keeps exact); an MX scale is an exponent byte.
    float_scaled = {spec.name.removesuffix(".weight_scale") for unit in units for spec in unit.outputs
                    if spec.name.endswith(".weight_scale") and spec.dtype.is_floating_point}
    fp8_modules = {spec.name.removesuffix(".weight") for unit in units for spec in unit.outputs
                   if spec.dtype == torch.float8_e4m3fn and spec.name.endswith(".weight")} & float_scaled
    if not fp8_modules:
        return units

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        module, _, leaf = name.rpartition(".")
        if module not in fp8_modules:
            return tensor
        if leaf == "weight":
            return e4m3fn_to_e4m3fnuz(tensor)
        return tensor * 2 if leaf in ("weight_scale", "weight_scale_inv") else tensor

    result = []
    for unit in units:
        touched = [s for s in unit.outputs if s.name.rpartition(".")[0] in fp8_modules]
        if not touched:
            result.append(unit)
            continue
        outputs = [TensorSpec(s.name, torch.float8_e4m3fnuz if s.dtype == torch.float8_e4m3fn else s.dtype, s.shape)
                   for s in unit.outputs]
        inner = unit.produce or (lambda tensors, name=unit.outputs[0].name: {name: tensors[0]})

        def produce(tensors: list[torch.Tensor], inner=inner) -> dict[str, torch.Tensor]:
            return {name: transform(name, tensor) for name, tensor in inner(tensors).items()}

        result.append(Unit(unit.inputs, outputs, produce, unit.layer, unit.more_layers))
    return result
