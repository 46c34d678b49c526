"""The quantization schemes a user can ask for, and what each one writes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qconvert.errors import BadInputError


@dataclass(frozen=True)
class Scheme:
    """Symmetric integer weight-only quantization, stored ``pack-quantized``."""

    name: str
    num_bits: int
    group_size: int  # -1: one scale per output channel
    summary: str
    runtime: str
    format: str = "pack-quantized"

    @property
    def strategy(self) -> str:
        return "channel" if self.group_size == -1 else "group"

    @property
    def label(self) -> str:
        grouping = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"int{self.num_bits} {grouping}"

    def with_group_size(self, group_size: int | None) -> Scheme:
        if group_size is None or group_size == self.group_size:
            return self
        if group_size != -1 and group_size <= 0:
            raise BadInputError(f"--group-size {group_size}: must be a positive integer or -1 (per channel)")
        return dataclasses.replace(self, group_size=group_size)

    def weights_args(self) -> dict:
        """The ``weights`` entry of a compressed-tensors config group."""
        return {
            "num_bits": self.num_bits,
            "type": "int",
            "symmetric": True,
            "strategy": self.strategy,
            "group_size": None if self.group_size == -1 else self.group_size,
            "block_structure": None,
            "dynamic": False,
            "actorder": None,
            "observer": "minmax",
            "observer_kwargs": {},
        }


SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme
    for scheme in (
        Scheme(
            "rtn4", 4, 128,
            "int4 symmetric round-to-nearest, one scale per 128 inputs, 8 values per int32",
            "vLLM CompressedTensorsWNA16 (Marlin W4A16); transformers via compressed-tensors",
        ),
        Scheme(
            "rtn8", 8, 128,
            "int8 symmetric round-to-nearest, one scale per 128 inputs, 4 values per int32",
            "vLLM CompressedTensorsWNA16 (Marlin W8A16); transformers via compressed-tensors",
        ),
    )
}


def get_scheme(name: str, group_size: int | None = None) -> Scheme:
    try:
        scheme = SCHEMES[name]
    except KeyError:
        raise BadInputError(f"unknown scheme {name!r} (choose from: {', '.join(SCHEMES)})") from None
    return scheme.with_group_size(group_size)
