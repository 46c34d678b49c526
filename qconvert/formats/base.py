"""What an on-disk weight format is, and the registry of them.

One :class:`WeightFormat` subclass per format owns everything about it: the tensors a quantized layer becomes
(names, dtypes, shapes, known before any data is read), how a weight is compressed into them, how a stored
layer is recognised when reading and rebuilt, the largest code (what the ±Inf refusal multiplies scales by),
the kernels ``qconvert verify`` runs on it, and the ``format`` its config group names. Subclasses register
themselves by being defined (as gguf-py's ``quants.py`` types and compressed-tensors' compressors do), so the
rest of qconvert asks the registry instead of branching on format names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from qconvert.errors import BadInputError
from qconvert.formats.args import NumberType, QuantArgs, Strategy, config_group
from qconvert.safetensors_io import TensorInfo, TensorReader, TensorSpec

if TYPE_CHECKING:
    from qconvert.verify_paths import KernelPath

# The tensors of one quantized linear layer (a module's leaves) and its static activation scales.
WEIGHT_LEAVES = ("weight", "weight_packed", "weight_scale", "weight_scale_inv", "weight_shape", "weight_zero_point",
                 "weight_global_scale", "weight_scale_2")
ACTIVATION_LEAVES = ("input_scale", "output_scale")


@dataclass(frozen=True)
class StoredLayer:
    """One quantized linear layer as stored: its format, its tensors, and what they mean."""

    module: str
    format: WeightFormat
    parts: dict[str, TensorInfo]  # leaf name → tensor (weight values, scales, shape)
    shape: tuple[int, int]  # logical [out, in]
    dtype: torch.dtype  # dtype of the rebuilt weight
    args: QuantArgs
    tile: tuple[int, int]

    @property
    def layout(self) -> str:
        """The format's name, for messages and summaries."""
        return self.format.name

    @property
    def num_bits(self) -> int:
        return self.args.num_bits

    @property
    def strategy(self) -> Strategy:
        return self.args.strategy

    @property
    def values(self) -> TensorInfo:
        return self.parts.get("weight_packed") or self.parts["weight"]

    @property
    def scale(self) -> TensorInfo:
        return self.parts.get("weight_scale") or self.parts["weight_scale_inv"]

    @property
    def label(self) -> str:
        return self.format.label(self)

    def matches(self, format: WeightFormat, args: QuantArgs) -> bool:
        """Whether writing ``args`` in ``format`` would store exactly these values: then the layer is copied."""
        return self.format.copies_as(format) and self.format.same_codes(self, args)


@dataclass(frozen=True)
class ReadContext:
    """What recognising a stored layer may consult beyond its own tensors."""

    config: dict  # the checkpoint's config.json (may be empty)
    block: tuple[int, int] | None  # the config's weight_block_size (DeepSeek FP8, blockwise_int8)
    model_dtype: torch.dtype  # the config's torch_dtype: what a float32-scaled layer rebuilds into
    reader: TensorReader

    def stated_args(self, module: str) -> QuantArgs | None:
        group = config_group(self.config, module)
        return QuantArgs.from_config(group.get("weights") if group else None)


Cast = Callable[[str, dict[str, torch.Tensor], "torch.Tensor | None"], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class CastLosses:
    """Blocks of a cast's input that the target cannot hold exactly (they are flushed to zero with consent)."""

    blocks: int
    total_blocks: int
    largest_error: float  # the largest absolute error a flushed element can carry


FORMATS: dict[str, WeightFormat] = {}


class WeightFormat:
    """One on-disk weight format. Subclasses set ``name`` and implement what they support."""

    name: ClassVar[str]  # the config group's ``format`` (or the reader's name for formats we only read)
    number: ClassVar[NumberType]  # what its codes are

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in FORMATS:
                raise ValueError(f"two formats named {cls.name!r}")
            FORMATS[cls.name] = cls()

    @classmethod
    def instance(cls) -> WeightFormat:
        """The registered instance of this format."""
        return FORMATS[cls.name]

    def __repr__(self) -> str:
        return f"<format {self.name}>"

    # --- writing -------------------------------------------------------------------------------------------
    def specs(self, prefix: str, shape: tuple[int, int], dtype: torch.dtype, args: QuantArgs) -> list[TensorSpec]:
        """The tensors a weight of ``shape`` and ``dtype`` becomes, named under module ``prefix``."""
        raise NotImplementedError

    def compress(self, prefix: str, weight: torch.Tensor, args: QuantArgs,
                 shared: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The tensors of :meth:`specs`, computed. ``shared``: what a fused group shares (see :meth:`shared`)."""
        raise NotImplementedError

    def shared(self, amax: torch.Tensor, dtype: torch.dtype, args: QuantArgs) -> torch.Tensor | None:
        """What the parts of a fused layer (q/k/v, gate/up) share, from their common amax, for formats whose
        engines load the fused matrix with one per-tensor value (fp8-tensor's scale, NVFP4's global scale)."""
        return None

    def stored_shared(self, layer: StoredLayer, reader: TensorReader) -> torch.Tensor | None:
        """The value a stored layer holds of what fused layers share (see :meth:`shared`), or None."""
        return None

    def scales_of(self, tensors: dict[str, torch.Tensor], weight_dtype: torch.dtype
                  ) -> tuple[torch.Tensor, torch.dtype]:
        """The compressed tensors' scales as the values a code is multiplied by, and the dtype the product is
        rebuilt in: what the NaN/Inf check and the ±Inf refusal look at. A NaN or Inf weight makes its
        group's scale non-finite, so the scales are the cheap place to look for one."""
        scale = tensors[next(n for n in tensors if n.rpartition(".")[2] == "weight_scale")]
        return scale, scale.dtype

    def largest_code(self, args: QuantArgs) -> float:
        """The largest magnitude a stored code can have."""
        raise NotImplementedError

    def config_format(self) -> str:
        return self.name

    # --- reading -------------------------------------------------------------------------------------------
    def recognise(self, module: str, parts: dict[str, TensorInfo], context: ReadContext) -> StoredLayer | None:
        """This layer as stored in this format, or None when its tensors are not this format's."""
        return None

    def rebuild(self, layer: StoredLayer, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The layer's weight, dequantized as the reference reader (compressed-tensors) computes it."""
        raise NotImplementedError

    def codes_and_scales(self, layer: StoredLayer, tensors: dict[str, torch.Tensor]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(codes, scales)``, each ``[out, in]``: every element's code and the multiplier it was divided by, as
        stored (``verify --original`` checks each element against round-to-nearest's bound with them)."""
        raise NotImplementedError

    def zero_points_full(self, layer: StoredLayer, tensors: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """Each element's zero point ``[out, in]`` for asymmetric layers (None: symmetric, the default)."""
        return None

    def copies_as(self, other: WeightFormat) -> bool:
        """Whether a layer stored in this format is, copied, a layer of ``other``."""
        return other is self

    def exact_cast(self, layer: StoredLayer, target: WeightFormat, args: QuantArgs) -> Cast | None:
        """For a stored layer that ``target`` holds exactly under other names or encodings (a re-layout, not a
        requantization): ``cast(prefix, stored tensors by leaf, shared)`` → the target's tensors, where ``shared``
        is what the layer's fused group shares (:meth:`cast_shared`; None: the layer's own). None where no cast
        exists."""
        return None

    def cast_shared(self, layers: list[StoredLayer], reader: TensorReader, target: WeightFormat
                    ) -> torch.Tensor | None:
        """What a fused group of stored layers of this format shares once cast exactly (see :meth:`shared`), read
        from their stored tensors; None where the cast cannot give them one value (they are requantized then)."""
        return None

    def cast_losses(self, layers: list[StoredLayer], reader: TensorReader, target: WeightFormat, args: QuantArgs
                    ) -> CastLosses | None:
        """For a cast that is exact but where the target's range ends (MXFP4 → NVFP4: a block exponent more than
        17 below the group's largest; → fp8 blocks: more than 14 below its tile's): the blocks it may not hold and
        the largest error they can carry, read from the scales before any write."""
        return None

    def same_codes(self, layer: StoredLayer, args: QuantArgs) -> bool:
        """Whether quantizing the rebuilt weight with ``args`` would give this layer's codes and scales again."""
        same_tile = layer.args.strategy == args.strategy and (
            args.strategy in (Strategy.TENSOR, Strategy.CHANNEL) or args.tile(layer.shape) == layer.tile)
        return (layer.args.number is args.number and layer.args.num_bits == args.num_bits and same_tile
                and layer.args.scale_dtype is args.scale_dtype)

    def label(self, layer: StoredLayer) -> str:
        return f"{describe_number(layer.args)} {describe_grouping(layer.args, layer.tile)}"

    # --- verifying -----------------------------------------------------------------------------------------
    def kernel_path(self, layer: StoredLayer, tensors: dict[str, torch.Tensor], config: dict | None,
                    device: torch.device) -> KernelPath:
        """The kernels a runtime runs for this layer (``qconvert verify``)."""
        raise NotImplementedError(f"{self.name}: no verify kernel")


def describe_number(args: QuantArgs) -> str:
    number = {NumberType.INT: f"int{args.num_bits}", NumberType.FP8_E4M3: "fp8",
              NumberType.FP4_E2M1: "fp4"}[args.number]
    return number if args.symmetric else f"{number} asymmetric"


def describe_grouping(args: QuantArgs, tile: tuple[int, int] | None = None) -> str:
    if args.strategy is Strategy.TENSOR:
        return "per-tensor"
    if args.strategy is Strategy.CHANNEL:
        return "per-channel"
    if args.grouped:
        return f"g{args.group_size or (tile[1] if tile else '?')}"
    block = args.block or tile
    return f"block {block[0]}x{block[1]}" if block else "block"


def recognise(module: str, parts: dict[str, TensorInfo], context: ReadContext) -> StoredLayer | None:
    """The first registered format that recognises this layer's tensors (None: not a quantized layer)."""
    if "weight" in parts and "weight_packed" in parts:  # two spellings of the values: which one is the layer?
        first = parts["weight_packed"]
        raise BadInputError(f"{first.file.name}: {module} holds both weight and weight_packed; a layer is stored "
                            "in one layout")
    quantized = "weight_scale" in parts and ("weight" in parts or "weight_packed" in parts)
    for fmt in FORMATS.values():
        layer = fmt.recognise(module, parts, context)
        if layer is not None:
            break
    else:
        layer = None
    # Zero points only some formats read (pack-quantized): never rebuild an asymmetric layer as symmetric.
    if quantized and "weight_zero_point" in parts and (layer is None or layer.args.symmetric):
        first = next(iter(parts.values()))
        raise BadInputError(f"{first.file.name}: {module} is asymmetric (weight_zero_point); "
                            f"{layer.format.name if layer else 'its format'} with zero points is not supported")
    return layer

