"""The quantization schemes a user can ask for, and what each one writes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qconvert.errors import BadInputError

BLOCK = (128, 128)


def _activations(kind: str, strategy: str, group_size: int | None = None) -> dict:
    """Dynamic (runtime-computed) symmetric 8-bit activation quantization, serialized exactly as
    compressed-tensors' ``QuantizationArgs`` dumps it (fields left at their defaults are omitted)."""
    return {"num_bits": 8, "type": kind, "symmetric": True, "group_size": group_size, "strategy": strategy,
            "dynamic": True}


@dataclass(frozen=True)
class Scheme:
    """Symmetric weight quantization (int or fp8), with optional dynamic activation quantization."""

    name: str
    kind: str  # "int" | "float" (fp8 e4m3fn)
    num_bits: int
    strategy: str  # "group" | "channel" | "block" | "tensor"
    format: str  # compressed-tensors format: "pack-quantized" | "int-quantized" | "float-quantized"
    summary: str
    preset: str  # the config group's name: llm-compressor's preset for the same scheme where one exists
    group_size: int | None = None
    block: tuple[int, int] | None = None
    activations: dict | None = None
    shared_fused_scale: bool = False  # q/k/v and gate/up share one per-tensor scale

    @property
    def label(self) -> str:
        weight = f"{'fp8' if self.kind == 'float' else 'int'}{'' if self.kind == 'float' else self.num_bits}"
        grouping = {
            "group": f"g{self.group_size}",
            "channel": "per-channel",
            "tensor": "per-tensor",
            "block": f"block {self.block[0]}x{self.block[1]}" if self.block else "block",
        }[self.strategy]
        return f"{weight} {grouping}"

    def with_group_size(self, group_size: int | None) -> Scheme:
        """``--group-size``: only for the weight-only group schemes; -1 means one scale per channel."""
        if group_size is None:
            return self
        if self.strategy not in ("group", "channel") or self.format != "pack-quantized":
            raise BadInputError(f"--group-size does not apply to scheme {self.name} ({self.label})")
        # Another grouping is no longer llm-compressor's preset: the config group gets the scheme's own name.
        if group_size == -1:
            return dataclasses.replace(self, strategy="channel", group_size=None, preset=self.name)
        if group_size <= 0:
            raise BadInputError(f"--group-size {group_size}: must be a positive integer or -1 (per channel)")
        if group_size == self.group_size:
            return self
        return dataclasses.replace(self, strategy="group", group_size=group_size, preset=self.name)

    def weights_args(self) -> dict:
        """The ``weights`` entry of a compressed-tensors config group, as ``QuantizationArgs.model_dump``
        writes it (and so llm-compressor): unset optional fields such as the observer are omitted."""
        args = {
            "num_bits": self.num_bits,
            "type": self.kind,
            "symmetric": True,
            "group_size": self.group_size if self.strategy == "group" else None,
            "strategy": self.strategy,
            "dynamic": False,
        }
        if self.strategy == "block" and self.block:
            args["block_structure"] = list(self.block)
        return args

    def tile(self, shape: tuple[int, ...]) -> tuple[int, int]:
        from qconvert.quantizers import tile_shape

        return tile_shape(shape, self.strategy, self.group_size, self.block)


SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme
    for scheme in (
        Scheme(
            "rtn4", "int", 4, "group", "pack-quantized",
            "int4 symmetric round-to-nearest, one scale per 128 inputs, 8 values per int32",
            "W4A16", group_size=128,
        ),
        Scheme(
            "rtn8", "int", 8, "group", "pack-quantized",
            "int8 symmetric round-to-nearest, one scale per 128 inputs, 4 values per int32",
            "W8A16", group_size=128,
        ),
        Scheme(
            "int8-block", "int", 8, "block", "int-quantized",
            "int8 weights, one scale per 128x128 block; int8 activations per token per 128 channels",
            "INT8_BLOCK",
            block=BLOCK, activations=_activations("int", "group", 128),
        ),
        Scheme(
            "w8a8-int8", "int", 8, "channel", "int-quantized",
            "int8 weights per output channel; int8 activations per token (dynamic)",
            "W8A8",
            activations=_activations("int", "token"),
        ),
        Scheme(
            "fp8", "float", 8, "channel", "float-quantized",
            "fp8 e4m3fn weights per output channel; fp8 activations per token (dynamic)",
            "FP8_DYNAMIC",
            activations=_activations("float", "token"),
        ),
        Scheme(
            "fp8-block", "float", 8, "block", "float-quantized",
            "fp8 e4m3fn weights, one scale per 128x128 block; fp8 activations per token per 128 channels",
            "FP8_BLOCK",
            block=BLOCK, activations=_activations("float", "group", 128),
        ),
        Scheme(
            "fp8-tensor", "float", 8, "tensor", "float-quantized",
            "fp8 e4m3fn weights, one scale per tensor, shared by q/k/v and by gate/up; fp8 activations per token",
            "FP8_TENSOR_WEIGHTS",
            activations=_activations("float", "token"), shared_fused_scale=True,
        ),
    )
}


def get_scheme(name: str, group_size: int | None = None) -> Scheme:
    try:
        scheme = SCHEMES[name]
    except KeyError:
        raise BadInputError(f"unknown scheme {name!r} (choose from: {', '.join(SCHEMES)})") from None
    return scheme.with_group_size(group_size)
