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
from qconvert.formats.base import Cast, CastLosses, ReadContext, StoredLayer, WeightFormat
from qconvert.formats.tiled import FloatQuantized
from qconvert.microscaling import (
    FP4_E2M1_MAX,
    FP8_E4M3_MAX,
    e2m1_values,
    e8m0_values,
    mx_fp8_block_losses,
    mx_global_shift,
    mx_nvfp4_losses,
    mx_to_nvfp4,
    mxfp4_to_fp8_blocks,
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
    global_leaf: ClassVar[str] = "weight_global_scale"

    def _columns(self, in_features: int) -> int:
        return in_features // 2 if self.number is NumberType.FP4_E2M1 else in_features

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
        if (self.global_leaf in parts) != self.default_args().global_scale:
            return None
        if len(values.shape) != 2 or len(scale.shape) != 2:
            raise BadInputError(f"{values.file.name}: {module} ({self.name}) has {len(values.shape)}-D values and "
                                f"{len(scale.shape)}-D scales; expected 2-D")
        out_features = values.shape[0]
        in_features = values.shape[1] * (2 if self.number is NumberType.FP4_E2M1 else 1)
        expected = (out_features, in_features // self.group)
        if scale.shape != expected or in_features % self.group:
            raise BadInputError(f"{scale.file.name}: {module}.weight_scale is {list(scale.shape)}; {self.name} "
                                f"values of shape {[out_features, in_features]} need {list(expected)}")
        global_scale = parts.get(self.global_leaf)
        if global_scale is not None and (global_scale.dtype != torch.float32 or math.prod(global_scale.shape) != 1):
            raise BadInputError(f"{global_scale.file.name}: {module}.{self.global_leaf} is {global_scale.dtype} "
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
        if self.number is NumberType.FP4_E2M1:
            return e2m1_values(unpack_nibbles(tensors[self.values_leaf]))
        return tensors["weight"].to(torch.float32)

    def rebuild(self, layer: StoredLayer, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        # compressed-tensors multiplies the code by its group's float32 multiplier in float32, then casts.
        def decode(first: int, last: int) -> torch.Tensor:
            band = {leaf: (t if leaf == self.global_leaf else t[first:last]) for leaf, t in tensors.items()}
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
    """E2M1 codes, a power-of-two (E8M0) scale per 32 inputs.

    Cast exactly to NVFP4 (the ``nvfp4`` scheme): the nibbles are kept bit for bit, the global scale is a power of
    two ``2**m`` shared by the fused group (``m`` puts the group's largest exponent at e4m3's 2**8), and each
    16-block's e4m3 scale is ``2**(k + m)`` for its 32-block's exponent ``k``, so ``scale / global == 2**k``. A block
    more than 17 exponents below the group's largest has no exact e4m3 scale: counted before any write (refused
    unless the user accepts requantization, then flushed to zero). A block stored with exponent 0 (2**-127, what MX
    writers store for an all-zero block) gets scale 0 too, exact for its zero codes.

    Cast exactly to fp8 blocks (the ``fp8-block`` scheme, for Hopper): each 128x128 tile's scale is the power of two
    ``2**K`` 6 below its largest 32-block exponent, and each value ``code x 2**k`` becomes the e4m3 code
    ``code x 2**(k - K)``, exact for ``k - K`` in ``[-8, 6]`` (every E2M1 value times such a power of two is an e4m3
    value). Blocks more than 14 below their tile's largest: counted and refused (or rounded with consent) alike."""

    name = "mxfp4-pack-quantized"
    kernel_format = "mxfp4"
    number = NumberType.FP4_E2M1

    def exact_cast(self, layer: StoredLayer, target: WeightFormat, args: QuantArgs) -> Cast | None:
        if type(target) is NVFP4 and args == target.default_args():
            return self._to_nvfp4
        if isinstance(target, FloatQuantized) and args.strategy is Strategy.BLOCK and args.block is not None \
                and args.block[1] % self.group == 0:
            tile = args.block

            def to_fp8_blocks(prefix: str, tensors: dict[str, torch.Tensor], shared: torch.Tensor | None
                              ) -> dict[str, torch.Tensor]:
                codes, scales = mxfp4_to_fp8_blocks(tensors["weight_packed"], tensors["weight_scale"], tile,
                                                    layer.dtype)
                return {f"{prefix}.weight": codes, f"{prefix}.weight_scale": scales}

            return to_fp8_blocks
        return None

    @staticmethod
    def _to_nvfp4(prefix: str, tensors: dict[str, torch.Tensor], shared: torch.Tensor | None
                  ) -> dict[str, torch.Tensor]:
        exponents = tensors["weight_scale"]
        shift = None if shared is None else int(torch.log2(shared.to(torch.float32)).round().item())
        converted = mx_to_nvfp4(exponents, shift)
        return {f"{prefix}.weight_packed": tensors["weight_packed"], f"{prefix}.weight_scale": converted.scales,
                f"{prefix}.weight_global_scale": converted.global_scale.to(exponents.device)}

    def cast_shared(self, layers: list[StoredLayer], reader: TensorReader, target: WeightFormat
                    ) -> torch.Tensor | None:
        if type(target) is not NVFP4:
            return None
        shift = mx_global_shift([reader.read(layer.parts["weight_scale"]) for layer in layers])
        return torch.tensor([2.0**shift], dtype=torch.float32)

    def cast_losses(self, layers: list[StoredLayer], reader: TensorReader, target: WeightFormat, args: QuantArgs
                    ) -> CastLosses | None:
        exponents = [reader.read(layer.parts["weight_scale"]) for layer in layers]
        if type(target) is NVFP4:
            shift = mx_global_shift(exponents)
            found = [mx_nvfp4_losses(stored, shift) for stored in exponents]
        else:
            assert args.block is not None
            found = [mx_fp8_block_losses(stored, args.block, layer.dtype)
                     for stored, layer in zip(exponents, layers, strict=True)]
        if all(mask is None for mask in found):
            return None
        lossy = [torch.zeros(stored.shape, dtype=torch.bool) if mask is None else mask
                 for stored, mask in zip(exponents, found, strict=True)]
        blocks = sum(int(mask.sum()) for mask in lossy)
        if not blocks:
            return None
        largest = max(FP4_E2M1_MAX * float(e8m0_values(stored[mask]).max())
                      for stored, mask in zip(exponents, lossy, strict=True) if bool(mask.any()))
        return CastLosses(blocks, sum(e.numel() for e in exponents), largest)


class MXFP8(_MX):
    """e4m3 codes, a power-of-two (E8M0) scale per 32 inputs."""

    name = "mxfp8-quantized"
    kernel_format = "mxfp8"
    number = NumberType.FP8_E4M3
    values_leaf = "weight"
    values_dtype = torch.float8_e4m3fn


class ModelOptNVFP4(NVFP4):
    """NVIDIA ModelOpt's NVFP4 release (read only): ``weight`` uint8 ``[out, in/2]`` (E2M1 codes packed as
    compressed-tensors packs them), ``weight_scale`` e4m3 ``[out, in/16]``, ``weight_scale_2`` float32: the weight is
    ``code * (scale * scale_2)``, the product taken in float32 as vLLM's ModelOpt method computes it.

    Cast to compressed-tensors NVFP4 (the ``nvfp4`` scheme) it is a re-layout: codes and block scales are copied
    bit for bit; the global scale is stored as its inverse, ``1 / scale_2`` rounded once to float32, so a weight
    rebuilt from the output may differ from the release's in the last bit of the float32 multiplier (a relative
    2**-23 at most, before the rounding to the weight's dtype): the run counts and reports such elements."""

    name = "modelopt-nvfp4"  # read only: no scheme writes it
    values_leaf = "weight"
    global_leaf = "weight_scale_2"

    @staticmethod
    def cast_global_scale(scale_2: torch.Tensor) -> torch.Tensor:
        """compressed-tensors' ``weight_global_scale`` for a ModelOpt ``weight_scale_2``: its float32 inverse."""
        return (1.0 / scale_2.to(torch.float32)).reshape(1)

    def copies_as(self, other: WeightFormat) -> bool:
        return False  # other leaf names and an inverted global scale: written by exact_cast, never copied

    def cast_shared(self, layers: list[StoredLayer], reader: TensorReader, target: WeightFormat
                    ) -> torch.Tensor | None:
        # The codes were made under the stored scale_2: a fused group re-laid out keeps one value only if it has one.
        values = [reader.read(layer.parts["weight_scale_2"]).reshape(()) for layer in layers]
        return self.cast_global_scale(values[0]) if all(torch.equal(v, values[0]) for v in values) else None

    def exact_cast(self, layer: StoredLayer, target: WeightFormat, args: QuantArgs) -> Cast | None:
        if type(target) is not NVFP4 or args != target.default_args():
            return None

        def cast(prefix: str, tensors: dict[str, torch.Tensor], shared: torch.Tensor | None) -> dict[str, torch.Tensor]:
            return {f"{prefix}.weight_packed": tensors["weight"], f"{prefix}.weight_scale": tensors["weight_scale"],
                    f"{prefix}.weight_global_scale": self.cast_global_scale(tensors["weight_scale_2"])}

        return cast

    def decoded_scales(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return tensors["weight_scale"].to(torch.float32) * tensors["weight_scale_2"].to(torch.float32).reshape(())

    def kernel_path(self, layer: StoredLayer, tensors: dict[str, torch.Tensor], config: dict | None,
                    device: torch.device) -> KernelPath:
        raise BadInputError(f"{layer.module}: verify runs on compressed-tensors outputs; convert this ModelOpt "
                            "checkpoint first (qconvert quantize -s nvfp4)")
