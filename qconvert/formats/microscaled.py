"""The FP4 and microscaled formats: compressed-tensors ``nvfp4-pack-quantized``, ``mxfp4-pack-quantized`` and
``mxfp8-quantized`` (what llm-compressor's NVFP4A16, MXFP4A16 and MXFP8A16 presets write).

* NVFP4: ``weight_packed`` uint8 ``[out, in/2]`` (two E2M1 codes per byte), ``weight_scale`` e4m3 ``[out, in/16]``,
  ``weight_global_scale`` float32 ``[1]``; the weight is ``code * (scale / global_scale)``.
* MXFP4: ``weight_packed`` as NVFP4's, ``weight_scale`` uint8 E8M0 exponents ``[out, in/32]``.
* MXFP8: ``weight`` e4m3 ``[out, in]``, ``weight_scale`` uint8 E8M0 exponents ``[out, in/32]``.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from qconvert.errors import BadInputError
from qconvert.formats.args import Algorithm, NumberType, QuantArgs, ScaleDtype, Strategy
from qconvert.formats.base import ReadContext, StoredLayer, WeightFormat
from qconvert.microscaling import (
    FP4_E2M1_MAX,
    FP8_E4M3_MAX,
    e2m1_values,
    e8m0_values,
    nvfp4_global_scale,
    quantize_mx,
    quantize_nvfp4,
    unpack_nibbles,
)
from qconvert.quantizers import band_elements
from qconvert.safetensors_io import TensorInfo, TensorReader, TensorSpec
from qconvert.verify_paths import KernelPath, microscaled_path


def _banded_rebuild(layer: StoredLayer, decode: callable, dtype: torch.dtype) -> torch.Tensor:  # type: ignore[valid-type]
    """``decode(first_row, last_row)`` over bands of rows, written into one weight of ``dtype``."""
    out_features, in_features = layer.shape
    weight = torch.empty(layer.shape, dtype=dtype)
    rows = max(1, band_elements(weight, 1 << 20) // max(1, in_features))
    for first in range(0, out_features, rows):
        last = min(out_features, first + rows)
        weight[first:last] = decode(first, last)
    return weight


class _Microscaled(WeightFormat):
    """Codes grouped along the input, one scale per ``group`` inputs of a row."""

    group: ClassVar[int]
    scale_dtype: ClassVar[torch.dtype]
    kernel_format: ClassVar[str]  # the verify kernel's name for it (qconvert.kernels.microscaled)
    values_leaf: ClassVar[str] = "weight_packed"
    values_dtype: ClassVar[torch.dtype] = torch.uint8

    def _columns(self, in_features: int) -> int:
        return in_features // 2 if self.values_leaf == "weight_packed" else in_features

    def specs(self, prefix: str, shape: tuple[int, int], dtype: torch.dtype, args: QuantArgs) -> list[TensorSpec]:
        out_features, in_features = shape
        values = (out_features, self._columns(in_features))
        specs = [TensorSpec(f"{prefix}.{self.values_leaf}", self.values_dtype, values),
                 TensorSpec(f"{prefix}.weight_scale", self.scale_dtype, (out_features, in_features // self.group))]
        if args.global_scale:
            specs.append(TensorSpec(f"{prefix}.weight_global_scale", torch.float32, (1,)))
        return specs

    def recognise(self, module: str, parts: dict[str, TensorInfo], context: ReadContext) -> StoredLayer | None:
        values, scale = parts.get(self.values_leaf), parts.get("weight_scale")
        if values is None or scale is None or values.dtype != self.values_dtype or scale.dtype != self.scale_dtype:
            return None
        if ("weight_global_scale" in parts) != self.default_args().global_scale:
            return None
        if len(values.shape) != 2 or len(scale.shape) != 2:
            raise BadInputError(f"{values.file.name}: {module} ({self.name}) has {len(values.shape)}-D values and "
                                f"{len(scale.shape)}-D scales; expected 2-D")
        out_features = values.shape[0]
        in_features = values.shape[1] * (2 if self.values_leaf == "weight_packed" else 1)
        expected = (out_features, in_features // self.group)
        if scale.shape != expected or in_features % self.group:
            raise BadInputError(f"{scale.file.name}: {module}.weight_scale is {list(scale.shape)}; {self.name} "
                                f"values of shape {[out_features, in_features]} need {list(expected)}")
        global_scale = parts.get("weight_global_scale")
        if global_scale is not None and (global_scale.dtype != torch.float32 or math.prod(global_scale.shape) != 1):
            raise BadInputError(f"{global_scale.file.name}: {module}.weight_global_scale is {global_scale.dtype} "
                                f"{list(global_scale.shape)}; expected one float32")
        stated = context.stated_args(module)
        args = self.default_args()
        if stated is not None and (stated.group_size or self.group) != self.group:
            raise BadInputError(f"{values.file.name}: {module}: the config states group size {stated.group_size}, "
                                f"{self.name} stores one scale per {self.group}")
        return StoredLayer(module, self, parts, (out_features, in_features), context.model_dtype, args, (1, self.group))

    def default_args(self) -> QuantArgs:
        raise NotImplementedError

    def scales_of(self, tensors: dict[str, torch.Tensor], weight_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.dtype]:
        return self.decoded_scales(_leaves(tensors)), weight_dtype

    def decoded_scales(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """float32 multipliers per group, as compressed-tensors' decompressor computes them."""
        raise NotImplementedError

    def codes(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """float32 code values ``[out, in]``."""
        if self.values_leaf == "weight_packed":
            return e2m1_values(unpack_nibbles(tensors["weight_packed"]))
        return tensors["weight"].to(torch.float32)

    def rebuild(self, layer: StoredLayer, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        # compressed-tensors multiplies the code by its group's float32 multiplier in float32, then casts.
        def decode(first: int, last: int) -> torch.Tensor:
            band = {leaf: (t if leaf == "weight_global_scale" else t[first:last]) for leaf, t in tensors.items()}
            scales = self.decoded_scales(band).repeat_interleave(self.group, dim=1)
            return (self.codes(band) * scales).to(layer.dtype)

        return _banded_rebuild(layer, decode, layer.dtype)

    def codes_and_scales(self, layer: StoredLayer, tensors: dict[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.codes(tensors), self.decoded_scales(tensors).repeat_interleave(self.group, dim=1)

    def same_codes(self, layer: StoredLayer, args: QuantArgs) -> bool:
        return args == layer.args

    def kernel_path(self, layer: StoredLayer, tensors: dict[str, torch.Tensor], config: dict | None,
                    device: torch.device) -> KernelPath:
        return microscaled_path(layer, tensors, device, self.decoded_scales(tensors), self.codes(tensors),
                                self.kernel_format)


def _leaves(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{"model.x.weight_scale": t}`` → ``{"weight_scale": t}`` (compressed tensors are named, stored ones not)."""
    return {name.rpartition(".")[2]: tensor for name, tensor in tensors.items()}


class NVFP4(_Microscaled):
    """E2M1 codes, an e4m3 scale per 16 inputs, a float32 global scale per tensor (shared by fused layers)."""

    name = "nvfp4-pack-quantized"
    kernel_format = "nvfp4"
    number = NumberType.FP4_E2M1
    group = 16
    scale_dtype = torch.float8_e4m3fn

    def default_args(self) -> QuantArgs:
        return QuantArgs(NumberType.FP4_E2M1, 4, Strategy.TENSOR_GROUP, 16, scale_dtype=ScaleDtype.E4M3,
                         global_scale=True)

    def shared(self, amax: torch.Tensor, dtype: torch.dtype, args: QuantArgs) -> torch.Tensor | None:
        return nvfp4_global_scale(amax, dtype)

    def stored_shared(self, layer: StoredLayer, reader: TensorReader) -> torch.Tensor | None:
        return reader.read(layer.parts["weight_global_scale"])

    def compress(self, prefix: str, weight: torch.Tensor, args: QuantArgs,
                 shared: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        global_scale = shared if shared is not None else nvfp4_global_scale(weight.abs().amax(), weight.dtype)
        packed, scales = quantize_nvfp4(weight, global_scale.to(weight.device), args.algorithm is Algorithm.SEARCH)
        return {f"{prefix}.weight_packed": packed, f"{prefix}.weight_scale": scales,
                f"{prefix}.weight_global_scale": global_scale.reshape(1).to(weight.device)}

    def largest_code(self, args: QuantArgs) -> float:
        return FP4_E2M1_MAX

    def decoded_scales(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return tensors["weight_scale"].to(torch.float32) / tensors["weight_global_scale"].to(torch.float32)


class _MX(_Microscaled):
    """Codes with a power-of-two (E8M0, one uint8 exponent) scale per 32 inputs: MXFP4 and MXFP8."""

    group = 32
    scale_dtype = torch.uint8

    def default_args(self) -> QuantArgs:
        bits = 4 if self.number is NumberType.FP4_E2M1 else 8
        return QuantArgs(self.number, bits, Strategy.GROUP, 32, scale_dtype=ScaleDtype.E8M0)

    def compress(self, prefix: str, weight: torch.Tensor, args: QuantArgs,
                 shared: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        values, exponents = quantize_mx(weight, self.number)
        return {f"{prefix}.{self.values_leaf}": values, f"{prefix}.weight_scale": exponents}

    def largest_code(self, args: QuantArgs) -> float:
        return FP4_E2M1_MAX if self.number is NumberType.FP4_E2M1 else FP8_E4M3_MAX

    def decoded_scales(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return e8m0_values(tensors["weight_scale"])


class MXFP4(_MX):
    """E2M1 codes, a power-of-two (E8M0) scale per 32 inputs."""

    name = "mxfp4-pack-quantized"
    kernel_format = "mxfp4"
    number = NumberType.FP4_E2M1


class MXFP8(_MX):
    """e4m3 codes, a power-of-two (E8M0) scale per 32 inputs."""

    name = "mxfp8-quantized"
    kernel_format = "mxfp8"
    number = NumberType.FP8_E4M3
    values_leaf = "weight"
    values_dtype = torch.float8_e4m3fn
