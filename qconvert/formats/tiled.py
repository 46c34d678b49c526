"""The int and fp8 formats with one scale per tile (tensor, channel, group of inputs, or 2-D block).

* compressed-tensors ``pack-quantized``: int4/int8 codes offset by ``2**(b-1)`` and packed into int32 words
  (``weight_packed``), scales in the weight dtype, the logical shape in ``weight_shape``;
* compressed-tensors ``int-quantized`` (int8 ``weight``) and ``float-quantized`` (fp8 e4m3fn ``weight``, or
  e4m3fnuz after ``--fnuz``), scales in the weight dtype;
* SGLang's ``blockwise_int8``: int8 ``weight`` with float32 ``weight_scale_inv`` per 128x128 block;
* DeepSeek-V3's FP8 (read only): fp8 ``weight`` with float32 ``weight_scale_inv`` per block (despite the name,
  the value multiplies).
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from qconvert.errors import BadInputError
from qconvert.formats.args import Algorithm, NumberType, QuantArgs, ScaleDtype, Strategy
from qconvert.formats.base import ReadContext, StoredLayer, WeightFormat
from qconvert.quantizers import (
    FP8_E4M3_MAX,
    band_elements,
    dequantize_asymmetric,
    dequantize_tiles,
    packed_columns,
    quantize_and_pack_asymmetric,
    quantize_and_pack_symmetric,
    quantize_tiled,
    scale_divisor,
    scales_from_amax,
    unpack_int32,
    unpack_zero_points,
)
from qconvert.safetensors_io import TensorInfo, TensorReader, TensorSpec
from qconvert.verify_paths import KernelPath, packed_path, scaled_path

_FP8 = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def stated_or_inferred(shape: tuple[int, int], scale: TensorInfo, stated: QuantArgs | None,
                       block: tuple[int, int] | None, number: NumberType, bits: int,
                       scale_dtype: ScaleDtype = ScaleDtype.WEIGHT) -> tuple[QuantArgs, tuple[int, int]]:
    """A tiled layer's arguments and tile: the strategy the config states, else the one the scale's shape implies."""
    out_features, in_features = shape
    strategy = stated.strategy if stated is not None else None
    if strategy is Strategy.BLOCK:
        block = (stated.block if stated is not None else None) or block or (128, 128)
    elif strategy is None:
        if math.prod(scale.shape) == 1:
            strategy = Strategy.TENSOR
        elif scale.shape[0] == out_features and (len(scale.shape) == 1 or scale.shape[1] == 1):
            strategy = Strategy.CHANNEL
        elif scale.shape[0] == out_features and block is None:
            strategy = Strategy.GROUP
        else:
            strategy = Strategy.BLOCK
    if strategy is Strategy.TENSOR:
        tile = (out_features, in_features)
    elif strategy is Strategy.CHANNEL:
        tile = (1, in_features)
    elif strategy in (Strategy.GROUP, Strategy.TENSOR_GROUP):
        # The config's group size when it states one: a scale of another shape is then refused, not obeyed.
        size = stated.group_size if stated is not None and stated.group_size else \
            in_features // max(1, scale.shape[-1] if scale.shape else 0)
        tile = (1, max(1, size))
    else:
        tile = tuple(block or (128, 128))  # type: ignore[assignment]
    rows, cols = -(-out_features // tile[0]), -(-in_features // tile[1])
    if math.prod(scale.shape) != rows * cols or (len(scale.shape) == 2 and tuple(scale.shape) != (rows, cols)):
        raise BadInputError(f"{scale.file.name}: tensor {scale.name} is {list(scale.shape)}, but a {strategy.value} "
                            f"scale of a {list(shape)} weight with tiles of {tile[0]}x{tile[1]} is {[rows, cols]}")
    group = tile[1] if strategy in (Strategy.GROUP, Strategy.TENSOR_GROUP) else None
    args = QuantArgs(number, bits, strategy, group, tile if strategy is Strategy.BLOCK else None,  # type: ignore[arg-type]
                     scale_dtype=scale_dtype)
    return args, tile


def rebuild_tiled(layer: StoredLayer, values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``values * scale`` per tile in the scale's dtype, as ``layer.dtype``, over bands of tile rows."""
    th, tw = layer.tile
    rows, cols = -(-layer.shape[0] // th), -(-layer.shape[1] // tw)
    if scale.numel() != rows * cols:
        raise BadInputError(f"{layer.scale.file.name}: {layer.module} has {scale.numel()} scales; its "
                            f"{layer.strategy.value} layout needs {rows}x{cols}")
    scale = scale.reshape(rows, cols)
    weight = torch.empty(layer.shape, dtype=layer.dtype, device=values.device)
    # Bands of whole tile rows keep the (often float32) intermediates small: memory stays near the
    # size of the weight itself rather than several float32 copies of it.
    tiles_per_band = max(1, band_elements(values, 1 << 20) // (th * layer.shape[1]))
    for first in range(0, rows, tiles_per_band):
        last = min(rows, first + tiles_per_band)
        weight[first * th : last * th] = dequantize_tiles(
            values[first * th : last * th], scale[first:last], layer.tile, layer.dtype)
    return weight


def tiled_codes_and_scales(layer: StoredLayer, codes: torch.Tensor, scales: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each element's code and its tile's scale, both ``[out, in]``."""
    (n, k), (th, tw) = layer.shape, layer.tile
    rows, cols = -(-n // th), -(-k // tw)
    full = scales.reshape(rows, cols).repeat_interleave(th, 0)[:n].repeat_interleave(tw, 1)[:, :k]
    return codes, full


class PackQuantized(WeightFormat):
    """int4/int8 codes packed into int32 words, one scale per group of inputs or per channel (W4A16/W8A16), and for
    asymmetric schemes (W4A16_ASYM/W8A16_ASYM) an int zero point per group, packed along the output dimension."""

    name = "pack-quantized"
    number = NumberType.INT

    def specs(self, prefix: str, shape: tuple[int, int], dtype: torch.dtype, args: QuantArgs) -> list[TensorSpec]:
        out_features, in_features = shape
        specs = [
            TensorSpec(f"{prefix}.weight_packed", torch.int32,
                       (out_features, packed_columns(in_features, args.num_bits))),
            TensorSpec(f"{prefix}.weight_scale", dtype, args.scale_shape(shape)),
            TensorSpec(f"{prefix}.weight_shape", torch.int64, (2,)),
        ]
        if not args.symmetric:
            groups = args.scale_shape(shape)[-1]
            specs.append(TensorSpec(f"{prefix}.weight_zero_point", torch.int32,
                                    (packed_columns(out_features, args.num_bits), groups)))
        return specs

    def compress(self, prefix: str, weight: torch.Tensor, args: QuantArgs,
                 shared: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if shared is not None:
            raise ValueError("pack-quantized layers compute their own group scales")
        from qconvert.algorithms import search_asymmetric, search_symmetric

        group = -1 if args.strategy is Strategy.CHANNEL else args.group_size
        search = args.algorithm is Algorithm.SEARCH
        tensors: dict[str, torch.Tensor] = {}
        if args.symmetric:
            packed, scales = quantize_and_pack_symmetric(weight, args.num_bits, group,  # type: ignore[arg-type]
                                                         search_symmetric if search else None)
        else:
            packed, scales, zeros = quantize_and_pack_asymmetric(weight, args.num_bits, group,  # type: ignore[arg-type]
                                                                 search_asymmetric if search else None)
            tensors[f"{prefix}.weight_zero_point"] = zeros
        return {f"{prefix}.weight_packed": packed, f"{prefix}.weight_scale": scales,
                f"{prefix}.weight_shape": torch.tensor(weight.shape, dtype=torch.int64), **tensors}

    def largest_code(self, args: QuantArgs) -> float:
        # Asymmetric codes minus their zero point reach 2**b - 1 in magnitude.
        return float(1 << (args.num_bits - 1)) if args.symmetric else float((1 << args.num_bits) - 1)

    def recognise(self, module: str, parts: dict[str, TensorInfo], context: ReadContext) -> StoredLayer | None:
        values, scale = parts.get("weight_packed"), parts.get("weight_scale")
        if values is None or scale is None or values.dtype != torch.int32 or len(values.shape) != 2:
            return None
        if "weight_shape" not in parts:
            raise BadInputError(f"{values.file.name}: {module}.weight_packed has no weight_shape")
        out_features, in_features = (int(v) for v in context.reader.read(parts["weight_shape"]).tolist())
        stated = context.stated_args(module)
        bits = stated.num_bits if stated else (4 if values.shape[1] == packed_columns(in_features, 4) else 8)
        if values.shape != (out_features, packed_columns(in_features, bits)):
            raise BadInputError(f"{values.file.name}: {module}.weight_packed {list(values.shape)} does not hold "
                                f"{bits}-bit values of shape {[out_features, in_features]}")
        shape = (out_features, in_features)
        args, tile = stated_or_inferred(shape, scale, stated, context.block, NumberType.INT, bits)
        zero_point = parts.get("weight_zero_point")
        if zero_point is not None:
            groups = scale.shape[-1] if len(scale.shape) == 2 else 1
            expected = (packed_columns(out_features, bits), groups)
            if zero_point.dtype != torch.int32 or tuple(zero_point.shape) != expected:
                raise BadInputError(f"{zero_point.file.name}: {module}.weight_zero_point is {zero_point.dtype} "
                                    f"{list(zero_point.shape)}; {bits}-bit zero points of {out_features} rows and "
                                    f"{groups} groups are int32 {list(expected)}")
            args = dataclasses.replace(args, symmetric=False)
        elif stated is not None and not stated.symmetric:
            raise BadInputError(f"{values.file.name}: {module}: the config states symmetric: false but the layer "
                                "has no weight_zero_point")
        return StoredLayer(module, self, parts, shape, scale.dtype, args, tile)

    def _zero_points(self, layer: StoredLayer, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """int8 ``[out, groups]`` zero points of an asymmetric layer (None: symmetric)."""
        packed = tensors.get("weight_zero_point")
        return None if packed is None else unpack_zero_points(packed, layer.num_bits, layer.shape[0])

    def rebuild(self, layer: StoredLayer, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        values = unpack_int32(tensors["weight_packed"], layer.num_bits, layer.shape[1])
        zeros = self._zero_points(layer, tensors)
        if zeros is None:
            return rebuild_tiled(layer, values, tensors["weight_scale"])
        out_features, in_features = layer.shape
        scales = tensors["weight_scale"].reshape(out_features, -1)
        groups = values.reshape(out_features, scales.shape[1], in_features // scales.shape[1])
        return dequantize_asymmetric(groups, scales, zeros).reshape(layer.shape).to(layer.dtype)

    def codes_and_scales(self, layer: StoredLayer, tensors: dict[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        codes = unpack_int32(tensors["weight_packed"], layer.num_bits, layer.shape[1])
        zeros = self.zero_points_full(layer, tensors)
        if zeros is not None:  # the code a value is multiplied by is the stored one minus its zero point
            codes = codes.to(torch.int16) - zeros
        return tiled_codes_and_scales(layer, codes, tensors["weight_scale"])

    def zero_points_full(self, layer: StoredLayer, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        zeros = self._zero_points(layer, tensors)
        return None if zeros is None else zeros.to(torch.int16).repeat_interleave(layer.tile[1], dim=1)

    def same_codes(self, layer: StoredLayer, args: QuantArgs) -> bool:
        return layer.args.symmetric == args.symmetric and super().same_codes(layer, args)

    def kernel_path(self, layer: StoredLayer, tensors: dict[str, torch.Tensor], config: dict | None,
                    device: torch.device) -> KernelPath:
        return packed_path(layer, tensors, device)


class _Unpacked(WeightFormat):
    """8-bit codes stored as they are (``weight``), one scale per tile."""

    stored_dtype: ClassVar[torch.dtype]
    scale_leaf: ClassVar[str] = "weight_scale"

    def specs(self, prefix: str, shape: tuple[int, int], dtype: torch.dtype, args: QuantArgs) -> list[TensorSpec]:
        scale_dtype = torch.float32 if self.scale_leaf == "weight_scale_inv" else dtype
        return [TensorSpec(f"{prefix}.weight", self.stored_dtype, shape),
                TensorSpec(f"{prefix}.{self.scale_leaf}", scale_dtype, args.scale_shape(shape))]

    def compress(self, prefix: str, weight: torch.Tensor, args: QuantArgs,
                 shared: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        kind = "float" if self.number is NumberType.FP8_E4M3 else "int"
        values, scales = quantize_tiled(weight, args.tile(tuple(weight.shape)), kind, args.num_bits, shared)
        scales = scales.reshape(args.scale_shape(tuple(weight.shape)))
        if self.scale_leaf == "weight_scale_inv":
            scales = scales.to(torch.float32)
        return {f"{prefix}.weight": values, f"{prefix}.{self.scale_leaf}": scales}

    def scales_of(self, tensors: dict[str, torch.Tensor], weight_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.dtype]:
        scale = tensors[next(n for n in tensors if n.rpartition(".")[2] == self.scale_leaf)]
        return scale, scale.dtype

    def shared(self, amax: torch.Tensor, dtype: torch.dtype, args: QuantArgs) -> torch.Tensor | None:
        if args.strategy is not Strategy.TENSOR:
            return None
        kind = "float" if self.number is NumberType.FP8_E4M3 else "int"
        return scales_from_amax(amax, scale_divisor(kind, args.num_bits), dtype).reshape(1, 1)

    def stored_shared(self, layer: StoredLayer, reader: TensorReader) -> torch.Tensor | None:
        return reader.read(layer.parts[self.scale_leaf]) if layer.strategy is Strategy.TENSOR else None

    def largest_code(self, args: QuantArgs) -> float:
        return FP8_E4M3_MAX if self.number is NumberType.FP8_E4M3 else float(1 << (args.num_bits - 1))

    def _holds(self, values: TensorInfo) -> bool:
        return values.dtype == self.stored_dtype

    def recognise(self, module: str, parts: dict[str, TensorInfo], context: ReadContext) -> StoredLayer | None:
        values, scale = parts.get("weight"), parts.get(self.scale_leaf)
        if values is None or scale is None or len(values.shape) != 2 or not self._holds(values):
            return None
        if self.scale_leaf == "weight_scale" and (not scale.dtype.is_floating_point or "weight_scale_inv" in parts):
            return None  # E8M0 scales (MXFP8) are uint8; a layer with both scale spellings is not ours to guess
        shape = (values.shape[0], values.shape[1])
        dtype = context.model_dtype if self.scale_leaf == "weight_scale_inv" else scale.dtype
        args, tile = stated_or_inferred(shape, scale, context.stated_args(module), context.block, self.number, 8)
        return StoredLayer(module, self, parts, shape, dtype, args, tile)

    def rebuild(self, layer: StoredLayer, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return rebuild_tiled(layer, tensors["weight"], tensors[self.scale_leaf])

    def codes_and_scales(self, layer: StoredLayer, tensors: dict[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        codes, scales = tensors["weight"], tensors[self.scale_leaf]
        if codes.dtype == torch.float8_e4m3fnuz:  # same bits, half the value: read back as e4m3fn
            from qconvert.kernels import e4m3fnuz_to_e4m3fn

            codes, scales = e4m3fnuz_to_e4m3fn(codes, scales.to(torch.float32))
        return tiled_codes_and_scales(layer, codes, scales)

    def kernel_path(self, layer: StoredLayer, tensors: dict[str, torch.Tensor], config: dict | None,
                    device: torch.device) -> KernelPath:
        return scaled_path(layer, tensors, config, device, self.number is NumberType.FP8_E4M3)


class IntQuantized(_Unpacked):
    """int8 codes, one scale per channel or block (W8A8, int8-block)."""

    name = "int-quantized"
    number = NumberType.INT
    stored_dtype = torch.int8


class FloatQuantized(_Unpacked):
    """fp8 e4m3fn codes (e4m3fnuz after ``--fnuz``), one scale per tensor, channel or block."""

    name = "float-quantized"
    number = NumberType.FP8_E4M3
    stored_dtype = torch.float8_e4m3fn

    def _holds(self, values: TensorInfo) -> bool:
        return values.dtype in _FP8

    def same_codes(self, layer: StoredLayer, args: QuantArgs) -> bool:
        return layer.values.dtype != torch.float8_e4m3fnuz and super().same_codes(layer, args)

    def label(self, layer: StoredLayer) -> str:
        label = super().label(layer)
        return label.replace("fp8", "fp8 e4m3fnuz", 1) if layer.values.dtype == torch.float8_e4m3fnuz else label


class BlockwiseInt8(_Unpacked):
    """SGLang's ``blockwise_int8``: int8 codes, float32 ``weight_scale_inv`` per block (``--layout sglang``)."""

    name = "blockwise-int8"  # written under --layout sglang (format.written_format)
    number = NumberType.INT
    stored_dtype = torch.int8
    scale_leaf = "weight_scale_inv"

    def copies_as(self, other: WeightFormat) -> bool:
        return isinstance(other, IntQuantized)


class DeepSeekFp8(_Unpacked):
    """DeepSeek-V3's FP8 release: e4m3fn codes, float32 ``weight_scale_inv`` per 128x128 block (read only)."""

    name = "deepseek-fp8"  # read only: no scheme writes it
    number = NumberType.FP8_E4M3
    stored_dtype = torch.float8_e4m3fn
    scale_leaf = "weight_scale_inv"

    def _holds(self, values: TensorInfo) -> bool:
        return values.dtype in _FP8

    def copies_as(self, other: WeightFormat) -> bool:
        return isinstance(other, FloatQuantized)
