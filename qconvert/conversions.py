"""``qconvert convert --op OP``: format conversions of quantized checkpoints, as units of work.

* ``fnuz``: e4m3fn → e4m3fnuz for ROCm MI300 (same bits reinterpreted; 0x80 → 0; NaN codes to the
  fnuz NaN); every weight scale and static input scale doubled, so every code dequantizes as before.
* ``shared-scale``: per-tensor FP8 layers of one fused module (q/k/v, gate/up) requantized with the
  largest of their scales, so a runtime that fuses them needs no requantization at load.
* ``pack``: ``int-quantized`` int8 weights (int4 held in int8 too) → ``pack-quantized`` int32 words,
  values unchanged.
* ``dequantize``: every quantized layer back to a plain full-precision weight (gpt-oss MXFP4 experts too: as
  the bf16 release stores them).

Static activation scales (``input_scale``, ``output_scale``) travel with their layer; one that is
entirely zero was never calibrated and is dropped with a notice.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum

import torch

from qconvert.errors import BadInputError
from qconvert.formats import Strategy
from qconvert.formats.gpt_oss import StoredExperts, rebuilt_view
from qconvert.formats.tiled import DeepSeekFp8, FloatQuantized, IntQuantized
from qconvert.quantizers import FP8_E4M3_MAX, e4m3fn_to_e4m3fnuz, int_range, pack_int32, packed_columns
from qconvert.safetensors_io import TensorInfo, TensorReader, TensorSpec
from qconvert.sources import ACTIVATION_LEAVES, StoredLayer, config_group
from qconvert.units import Unit, copy_unit, dequantize_unit, fused_groups, rebuilt_unit


class ConvertOp(str, Enum):
    """``convert --op``: what a conversion does."""

    FNUZ = "fnuz"
    SHARED_SCALE = "shared-scale"
    PACK = "pack"
    DEQUANTIZE = "dequantize"


OPS = tuple(op.value for op in ConvertOp)


@dataclass
class ConversionPlan:
    units: list[Unit]
    config: dict | None  # the new quantization_config (None: remove it)
    notes: list[str] = field(default_factory=list)
    converted: list[str] = field(default_factory=list)  # modules changed by the op
    unchanged: str = ""  # why the op applies to the input but would change nothing (then nothing is written)


def _zero_scales(reader: TensorReader, layers: dict[str, StoredLayer], tensors: dict[str, TensorInfo]) -> set[str]:
    """Static activation scales that are entirely zero (uncalibrated), by tensor name."""
    zero = set()
    for name, info in tensors.items():
        if name.rpartition(".")[2] in ACTIVATION_LEAVES and info.numel and not reader.read(info).any():
            zero.add(name)
    return zero


def plan_conversion(op: ConvertOp | str, tensors: dict[str, TensorInfo], layers: dict[str, StoredLayer], config: dict,
                    reader: TensorReader, fused_patterns: list[str], dtype: torch.dtype | None = None,
                    experts: dict[str, StoredExperts] | None = None) -> ConversionPlan:
    if op not in OPS:
        raise BadInputError(f"--op {op!r}: choose from {', '.join(OPS)}")
    op = ConvertOp(op)
    experts = experts or {}
    if not layers and not experts:
        raise BadInputError("the input has no quantized layers to convert")
    zero = _zero_scales(reader, layers, tensors)
    qconfig = copy.deepcopy(config.get("quantization_config")) if config.get("quantization_config") else None
    plan = ConversionPlan([], qconfig)
    if zero:
        plan.notes.append(f"note: dropping {len(zero)} static activation scales that are entirely zero "
                          f"(uncalibrated), e.g. {sorted(zero)[0]}")
    builder: Callable[..., None] = {ConvertOp.FNUZ: _fnuz, ConvertOp.SHARED_SCALE: _shared_scale,
                                    ConvertOp.PACK: _pack, ConvertOp.DEQUANTIZE: _dequantize}[op]
    handled: set[str] = set()
    builder(plan, tensors, layers, reader, handled, fused_patterns=fused_patterns, dtype=dtype, zero=zero,
            experts=experts)
    if not plan.converted and plan.unchanged:
        return plan
    if not plan.converted:
        kinds = {layer.layout + ' ' + layer.label for layer in layers.values()} | (
            {"gpt-oss MXFP4 experts"} if experts else set())
        raise BadInputError(f"--op {op.value}: no layer of this checkpoint is one it applies to "
                            f"({', '.join(sorted(kinds))})")
    for name, info in tensors.items():
        if name not in handled and name not in zero:
            plan.units.append(copy_unit(info))
    order = {name: i for i, name in enumerate(tensors)}
    plan.units.sort(key=lambda unit: order.get(unit.inputs[0].name, 0))
    return plan


def _transform_unit(inputs: list[TensorInfo], outputs: list[TensorSpec],
                    fn: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]) -> Unit:
    names = [info.name for info in inputs]
    return Unit(inputs, outputs, lambda tensors: fn(dict(zip(names, tensors, strict=True))))


def _fnuz(plan: ConversionPlan, tensors: dict[str, TensorInfo], layers: dict[str, StoredLayer],
          reader: TensorReader, handled: set[str], zero: set[str], **_: object) -> None:
    for module, layer in layers.items():
        # Tiled e4m3fn layers only: doubling a scale is exact there (an MX scale is an exponent byte).
        if layer.values.dtype != torch.float8_e4m3fn or not isinstance(layer.format, (FloatQuantized, DeepSeekFp8)):
            continue
        values, scale = layer.values, layer.scale
        inputs = [values, scale]
        outputs = [TensorSpec(values.name, torch.float8_e4m3fnuz, values.shape),
                   TensorSpec(scale.name, scale.dtype, scale.shape)]
        input_scale = tensors.get(f"{module}.input_scale")
        if input_scale is not None and input_scale.name in zero:
            input_scale = None
        if input_scale is not None:
            inputs.append(input_scale)
            outputs.append(TensorSpec(input_scale.name, input_scale.dtype, input_scale.shape))

        def convert(ts: dict[str, torch.Tensor], v=values.name, s=scale.name,
                    i=input_scale.name if input_scale else None) -> dict[str, torch.Tensor]:
            result = {v: e4m3fn_to_e4m3fnuz(ts[v]), s: ts[s] * 2}
            if i is not None:
                result[i] = ts[i] * 2
            return result

        plan.units.append(_transform_unit(inputs, outputs, convert))
        handled.update(info.name for info in inputs)
        plan.converted.append(module)
    if plan.converted and plan.config is not None:
        plan.config["qconvert_fp8_format"] = "e4m3fnuz"  # mark the output: the dtype alone is easy to miss
    if plan.converted:
        plan.notes.append("note: vLLM and SGLang load plain e4m3fn checkpoints and normalize them to fnuz on ROCm "
                          "themselves; this output is for runtimes that read fnuz weights as stored")


def _shared_scale(plan: ConversionPlan, tensors: dict[str, TensorInfo], layers: dict[str, StoredLayer],
                  reader: TensorReader, handled: set[str], fused_patterns: list[str], **_: object) -> None:
    per_tensor = {m: layer for m, layer in layers.items()
                  if layer.strategy is Strategy.TENSOR and layer.values.dtype == torch.float8_e4m3fn
                  and isinstance(layer.format, FloatQuantized)}
    already = []
    for group in fused_groups(sorted(per_tensor), fused_patterns):
        scales = {m: reader.read(per_tensor[m].scale) for m in group}  # tiny: one value each
        shared = torch.stack([s.reshape(()) for s in scales.values()]).max()
        if all(torch.equal(s.reshape(()), shared) for s in scales.values()):
            already.append(group[0])  # shares one scale already (qconvert's fp8-tensor does): copied as it is
            continue
        for module in group:
            layer = per_tensor[module]
            values, scale = layer.values, layer.scale

            def requantize(ts: dict[str, torch.Tensor], v=values.name, s=scale.name,
                           target=shared) -> dict[str, torch.Tensor]:
                # fp8 x scale is exact in float32; one rounding, by the cast, back to e4m3fn.
                exact = ts[v].to(torch.float32) * ts[s].to(torch.float32).reshape(())
                # The target moves to the values' device: CUDA would divide by a CPU scalar via its reciprocal.
                requantized = (exact / target.to(device=exact.device, dtype=torch.float32)).clamp_(
                    -FP8_E4M3_MAX, FP8_E4M3_MAX)
                return {v: requantized.to(torch.float8_e4m3fn), s: target.to(ts[s].dtype).reshape(ts[s].shape)}

            plan.units.append(_transform_unit([values, scale], [TensorSpec(values.name, values.dtype, values.shape),
                                                                TensorSpec(scale.name, scale.dtype, scale.shape)],
                                              requantize))
            handled.update((values.name, scale.name))
            plan.converted.append(module)
    if already and not plan.converted:
        plan.unchanged = (f"all {len(already)} fused groups of per-tensor fp8 layers (e.g. {already[0]}'s) already "
                          "share one scale, as qconvert's fp8-tensor writes them")


def _pack(plan: ConversionPlan, tensors: dict[str, TensorInfo], layers: dict[str, StoredLayer],
          reader: TensorReader, handled: set[str], **_: object) -> None:
    for module, layer in layers.items():
        if not isinstance(layer.format, IntQuantized):
            continue
        values = layer.values
        bits = layer.num_bits
        group = config_group({"quantization_config": plan.config}, module)
        _check_packable(module, layer, group)
        if group is not None:
            bits = int(group.get("weights", {}).get("num_bits") or bits)
        out_features, in_features = layer.shape
        words = packed_columns(in_features, bits)
        outputs = [TensorSpec(f"{module}.weight_packed", torch.int32, (out_features, words)),
                   TensorSpec(f"{module}.weight_shape", torch.int64, (2,))]
        qmin, qmax = int_range(bits)

        def pack(ts: dict[str, torch.Tensor], v=values.name, m=module, b=bits, lo=qmin,
                 hi=qmax) -> dict[str, torch.Tensor]:
            codes = ts[v]
            if codes.min() < lo or codes.max() > hi:
                raise BadInputError(f"{m}: int8 values outside the {b}-bit range [{lo}, {hi}]; "
                                    "the config's num_bits does not describe them")
            return {f"{m}.weight_packed": pack_int32(codes, b),
                    f"{m}.weight_shape": torch.tensor(codes.shape, dtype=torch.int64)}

        plan.units.append(_transform_unit([values], outputs, pack))
        handled.add(values.name)
        plan.converted.append(module)
        if group is not None:
            group["format"] = "pack-quantized"
    if plan.config is not None and plan.config.get("format") == "int-quantized":
        plan.config["format"] = "pack-quantized"


def _check_packable(module: str, layer: StoredLayer, group: dict | None) -> None:
    """``pack`` only where the engines keep the checkpoint's meaning after packing: weight-only integer
    layers, and layers with static (calibrated) activation scales, which vLLM serves packed as wNa8o8.

    Dynamic activation quantization does not survive: SGLang then picks its W8A8 method, which expects a
    plain ``weight`` and never loads ``weight_packed``; vLLM serves it weight-only, without the activation
    quantization. Block scales have no packed method in either engine.
    """
    activations = (group or {}).get("input_activations") or {}
    if activations.get("dynamic"):
        raise BadInputError(
            f"--op pack: {module} quantizes activations dynamically ({activations.get('strategy')}); packed, SGLang "
            f"would pick its W8A8 method and never load weight_packed, and vLLM would serve it weight-only, dropping "
            "the activation quantization. pack applies to weight-only and static-activation (wNa8o8) int layers")
    if layer.strategy is Strategy.BLOCK:
        raise BadInputError(f"--op pack: {module} has block scales ({layer.label}); no vLLM or SGLang packed "
                            "(pack-quantized) method accepts block scales")


def _dequantize(plan: ConversionPlan, tensors: dict[str, TensorInfo], layers: dict[str, StoredLayer],
                reader: TensorReader, handled: set[str], dtype: torch.dtype | None = None,
                experts: dict[str, StoredExperts] | None = None, **_: object) -> None:
    for name, pair in (experts or {}).items():
        unit = rebuilt_unit(rebuilt_view(pair if dtype is None else replace(pair, dtype=dtype)))
        plan.units.append(unit)
        handled.update(info.name for info in unit.inputs)
        plan.converted.append(name)
    for module, layer in layers.items():
        unit = dequantize_unit(layer, dtype)
        plan.units.append(unit)
        handled.update(info.name for info in unit.inputs)
        for leaf in ACTIVATION_LEAVES:
            if f"{module}.{leaf}" in tensors:
                handled.add(f"{module}.{leaf}")  # meaningless once the layer is plain
        plan.converted.append(module)
    plan.config = None
