"""Quantization arguments: one frozen value shared by what we write and what we read.

compressed-tensors describes a weight quantization with ``QuantizationArgs`` (number type and bits, how scales
are grouped, the scale's own dtype, a global scale); :class:`QuantArgs` is our typed mirror of the fields our
formats use, with Enums for the closed sets of choices, and it serializes to the ``weights`` entry of a config
group exactly as ``QuantizationArgs.model_dump`` writes it (and so llm-compressor).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

import torch


class NumberType(str, Enum):
    """What one stored code is."""

    INT = "int"
    FP8_E4M3 = "fp8_e4m3"
    FP4_E2M1 = "fp4_e2m1"

    @property
    def config_type(self) -> str:
        """compressed-tensors' ``type`` field: ``int`` or ``float`` (fp8 and fp4 alike, told apart by bits)."""
        return "int" if self is NumberType.INT else "float"

    @property
    def is_float(self) -> bool:
        return self is not NumberType.INT


class Strategy(str, Enum):
    """Which weights share one scale (compressed-tensors' ``strategy``)."""

    TENSOR = "tensor"
    CHANNEL = "channel"
    GROUP = "group"
    BLOCK = "block"
    TENSOR_GROUP = "tensor_group"  # groups along the input, plus one global scale per tensor (NVFP4)


class ScaleDtype(str, Enum):
    """How a scale is stored: in the weight's own dtype, as float32, as fp8 e4m3, or as an E8M0 exponent byte."""

    WEIGHT = "weight"
    FLOAT32 = "float32"
    E4M3 = "e4m3"
    E8M0 = "e8m0"

    def torch_dtype(self, weight_dtype: torch.dtype) -> torch.dtype:
        return {ScaleDtype.WEIGHT: weight_dtype, ScaleDtype.FLOAT32: torch.float32,
                ScaleDtype.E4M3: torch.float8_e4m3fn, ScaleDtype.E8M0: torch.uint8}[self]


class Algorithm(str, Enum):
    """How each group's scale (and zero point) is chosen: an axis independent of the on-disk format."""

    RTN = "rtn"  # min/max (amax) scales, round to nearest: the reference tools' bytes
    SEARCH = "search"  # the (scale, zero) per group that reconstructs the weight best, RTN's among the candidates


class Layout(str, Enum):
    """Whose spelling a checkpoint's quantized layers use."""

    COMPRESSED_TENSORS = "compressed-tensors"
    SGLANG = "sglang"  # SGLang's blockwise_int8 (weight_scale_inv), for the int8-block scheme


@dataclass(frozen=True)
class QuantArgs:
    """One weight quantization: number type and bits, scale grouping, scale storage, global scale."""

    number: NumberType
    num_bits: int
    strategy: Strategy
    group_size: int | None = None
    block: tuple[int, int] | None = None
    symmetric: bool = True
    scale_dtype: ScaleDtype = ScaleDtype.WEIGHT
    global_scale: bool = False  # one float32 multiplier per tensor above the group scales (NVFP4)
    # Not part of what is stored: two layers that differ only in how their scales were chosen hold the same
    # format, so equality (a stored layer matching a scheme, fused parts sharing one) ignores it.
    algorithm: Algorithm = field(default=Algorithm.RTN, compare=False)

    @property
    def grouped(self) -> bool:
        """Scales per ``group_size`` inputs of a row (``group``, ``tensor_group``)."""
        return self.strategy in (Strategy.GROUP, Strategy.TENSOR_GROUP)

    def tile(self, shape: tuple[int, ...]) -> tuple[int, int]:
        """The ``(rows, cols)`` of weight that share one scale."""
        out_features, in_features = shape[-2], shape[-1]
        if self.strategy is Strategy.TENSOR:
            return out_features, in_features
        if self.strategy is Strategy.CHANNEL:
            return 1, in_features
        if self.grouped:
            if not self.group_size or in_features % self.group_size:
                raise ValueError(f"input size {in_features} is not a multiple of the group size {self.group_size}")
            return 1, self.group_size
        if self.block is None:
            raise ValueError("block strategy needs a block shape")
        return self.block

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        if self.strategy is Strategy.TENSOR:
            return (1,)
        th, tw = self.tile(shape)
        return (-(-shape[0] // th), -(-shape[1] // tw))

    def config(self) -> dict:
        """The ``weights`` entry of a compressed-tensors config group, as ``QuantizationArgs.model_dump``
        writes it (fields left at their defaults, such as the observer, are omitted)."""
        args: dict = {
            "num_bits": self.num_bits,
            "type": self.number.config_type,
            "symmetric": self.symmetric,
            "group_size": self.group_size if self.grouped else None,
            "strategy": self.strategy.value,
            "dynamic": False,
        }
        if self.strategy is Strategy.BLOCK and self.block:
            args["block_structure"] = list(self.block)
        # A scale dtype other than the weight's is stated (as compressed-tensors dumps a torch dtype).
        if self.scale_dtype is ScaleDtype.E8M0:
            args["scale_dtype"] = "torch.uint8"
        elif self.scale_dtype is ScaleDtype.E4M3:
            args["scale_dtype"] = "torch.float8_e4m3fn"
        return args

    @classmethod
    def from_config(cls, args: dict | None) -> QuantArgs | None:
        """The arguments a config group's ``weights`` entry states (None where it states none)."""
        if not args or not args.get("num_bits"):
            return None
        bits = int(args["num_bits"])
        kind = args.get("type", "int")
        number = NumberType.INT if kind == "int" else (NumberType.FP4_E2M1 if bits == 4 else NumberType.FP8_E4M3)
        try:
            strategy = Strategy(args.get("strategy") or "tensor")
        except ValueError:
            return None
        block = tuple(args["block_structure"]) if args.get("block_structure") else None
        scale_dtype = str(args.get("scale_dtype") or "")
        scale = (ScaleDtype.E8M0 if "uint8" in scale_dtype else
                 ScaleDtype.E4M3 if "float8" in scale_dtype else ScaleDtype.WEIGHT)
        return cls(number, bits, strategy, args.get("group_size"), block,  # type: ignore[arg-type]
                   bool(args.get("symmetric", True)), scale, strategy is Strategy.TENSOR_GROUP)


def config_group(config: dict | None, module: str) -> dict | None:
    """The compressed-tensors config group that targets ``module`` (by name first, then by class)."""
    qconfig = (config or {}).get("quantization_config") or {}
    groups = list((qconfig.get("config_groups") or {}).values())
    for group in groups:
        targets = group.get("targets") or []
        if any(t == module or (t.startswith("re:") and re.match(t[3:], module)) for t in targets):
            return group
    for group in groups:  # class-name targets ("Linear") cover every remaining layer
        if any(not t.startswith("re:") and "." not in t for t in group.get("targets") or []):
            return group
    return None
