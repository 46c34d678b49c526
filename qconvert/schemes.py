"""The quantization schemes a user can ask for, and what each one writes.

A scheme is a row: a name, the quantization arguments (:class:`~qconvert.formats.QuantArgs`), the on-disk format
that stores them (a registered :class:`~qconvert.formats.WeightFormat`), and the activation quantization engines
run. How scales are chosen (the algorithm: ``rtn`` or ``search``, :mod:`qconvert.algorithms`) is a separate axis,
carried in the arguments (:meth:`Scheme.with_algorithm`); every scheme defaults to round-to-nearest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qconvert.errors import BadInputError
from qconvert.formats import Algorithm, NumberType, QuantArgs, ScaleDtype, Strategy, WeightFormat
from qconvert.formats.base import describe_grouping, describe_number
from qconvert.formats.microscaled import MXFP4, MXFP8, NVFP4
from qconvert.formats.tiled import FloatQuantized, IntQuantized, PackQuantized

BLOCK = (128, 128)


def _activations(number: NumberType, strategy: str, group_size: int | None = None) -> dict:
    """Dynamic (runtime-computed) symmetric 8-bit activation quantization, serialized exactly as
    compressed-tensors' ``QuantizationArgs`` dumps it (fields left at their defaults are omitted)."""
    return {"num_bits": 8, "type": number.config_type, "symmetric": True, "group_size": group_size,
            "strategy": strategy, "dynamic": True}


@dataclass(frozen=True)
class Scheme:
    """Weight quantization in one on-disk format, with optional dynamic activation quantization."""

    name: str
    args: QuantArgs
    format: WeightFormat
    summary: str
    preset: str  # the config group's name: llm-compressor's preset for the same scheme where one exists
    activations: dict | None = None
    shared_fused_scale: bool = False  # the parts of a fused layer share one per-tensor value (format.shared)

    @property
    def num_bits(self) -> int:
        return self.args.num_bits

    @property
    def strategy(self) -> Strategy:
        return self.args.strategy

    @property
    def group_size(self) -> int | None:
        return self.args.group_size

    @property
    def block(self) -> tuple[int, int] | None:
        return self.args.block

    @property
    def algorithm(self) -> Algorithm:
        return self.args.algorithm

    @property
    def label(self) -> str:
        label = f"{describe_number(self.args)} {describe_grouping(self.args)}"
        return label if self.algorithm is Algorithm.RTN else f"{label}, {self.algorithm.value}"

    def with_algorithm(self, algorithm: Algorithm | str | None) -> Scheme:
        """``--algorithm``: how this scheme's scales are chosen; ``search`` only where it has candidates."""
        from qconvert.algorithms import applies_to, parse_algorithm

        if algorithm is None:
            return self
        chosen = parse_algorithm(algorithm) if isinstance(algorithm, str) else algorithm
        if chosen is self.algorithm:
            return self
        if chosen is not Algorithm.RTN and not applies_to(self.args, self.format.name):
            usable = ", ".join(s.name for s in SCHEMES.values() if applies_to(s.args, s.format.name))
            raise BadInputError(f"--algorithm {chosen.value} does not apply to scheme {self.name} ({self.label}); "
                                f"it applies to: {usable}")
        return dataclasses.replace(self, args=dataclasses.replace(self.args, algorithm=chosen))

    def with_group_size(self, group_size: int | None) -> Scheme:
        """``--group-size``: only for the weight-only int group schemes; -1 means one scale per channel."""
        if group_size is None:
            return self
        if self.strategy not in (Strategy.GROUP, Strategy.CHANNEL) or not isinstance(self.format, PackQuantized):
            raise BadInputError(f"--group-size does not apply to scheme {self.name} ({self.label})")
        # Another grouping is no longer llm-compressor's preset: the config group gets the scheme's own name.
        if group_size == -1:
            args = dataclasses.replace(self.args, strategy=Strategy.CHANNEL, group_size=None)
            return dataclasses.replace(self, args=args, preset=self.name)
        if group_size <= 0:
            raise BadInputError(f"--group-size {group_size}: must be a positive integer or -1 (per channel)")
        if group_size == self.group_size:
            return self
        args = dataclasses.replace(self.args, strategy=Strategy.GROUP, group_size=group_size)
        return dataclasses.replace(self, args=args, preset=self.name)

    def weights_args(self) -> dict:
        """The ``weights`` entry of a compressed-tensors config group (see :meth:`QuantArgs.config`)."""
        return self.args.config()

    def tile(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return self.args.tile(shape)


def _int(bits: int, strategy: Strategy, group_size: int | None = None,
         block: tuple[int, int] | None = None, symmetric: bool = True) -> QuantArgs:
    return QuantArgs(NumberType.INT, bits, strategy, group_size, block, symmetric)


def _fp8(strategy: Strategy, block: tuple[int, int] | None = None) -> QuantArgs:
    return QuantArgs(NumberType.FP8_E4M3, 8, strategy, None, block)


_INT, _FP8 = NumberType.INT, NumberType.FP8_E4M3
SCHEMES: dict[str, Scheme] = {
    scheme.name: scheme
    for scheme in (
        Scheme("rtn4", _int(4, Strategy.GROUP, 128), PackQuantized.instance(),
               "int4 symmetric round-to-nearest, one scale per 128 inputs, 8 values per int32", "W4A16"),
        Scheme("rtn8", _int(8, Strategy.GROUP, 128), PackQuantized.instance(),
               "int8 symmetric round-to-nearest, one scale per 128 inputs, 4 values per int32", "W8A16"),
        Scheme("int4-asym", _int(4, Strategy.GROUP, 128, symmetric=False), PackQuantized.instance(),
               "int4 asymmetric: a scale and an int zero point per 128 inputs, 8 values per int32", "W4A16_ASYM"),
        Scheme("int8-asym", _int(8, Strategy.GROUP, 128, symmetric=False), PackQuantized.instance(),
               "int8 asymmetric: a scale and an int zero point per 128 inputs, 4 values per int32", "W8A16_ASYM"),
        Scheme("int8-block", _int(8, Strategy.BLOCK, block=BLOCK), IntQuantized.instance(),
               "int8 weights, one scale per 128x128 block; int8 activations per token per 128 channels",
               "INT8_BLOCK", _activations(_INT, "group", 128)),
        Scheme("w8a8-int8", _int(8, Strategy.CHANNEL), IntQuantized.instance(),
               "int8 weights per output channel; int8 activations per token (dynamic)",
               "W8A8", _activations(_INT, "token")),
        Scheme("fp8", _fp8(Strategy.CHANNEL), FloatQuantized.instance(),
               "fp8 e4m3fn weights per output channel; fp8 activations per token (dynamic)",
               "FP8_DYNAMIC", _activations(_FP8, "token")),
        Scheme("fp8-block", _fp8(Strategy.BLOCK, BLOCK), FloatQuantized.instance(),
               "fp8 e4m3fn weights, one scale per 128x128 block; fp8 activations per token per 128 channels",
               "FP8_BLOCK", _activations(_FP8, "group", 128)),
        Scheme("fp8-tensor", _fp8(Strategy.TENSOR), FloatQuantized.instance(),
               "fp8 e4m3fn weights, one scale per tensor, shared by q/k/v and by gate/up; fp8 activations per token",
               "FP8_TENSOR_WEIGHTS", _activations(_FP8, "token"), shared_fused_scale=True),
        Scheme("nvfp4", QuantArgs(NumberType.FP4_E2M1, 4, Strategy.TENSOR_GROUP, 16, scale_dtype=ScaleDtype.E4M3,
                                  global_scale=True), NVFP4.instance(),
               "fp4 e2m1 weights, an e4m3 scale per 16 inputs times a global scale shared by every fused layer "
               "(NVFP4, weight-only)", "NVFP4A16", shared_fused_scale=True),
        Scheme("mxfp4", QuantArgs(NumberType.FP4_E2M1, 4, Strategy.GROUP, 32, scale_dtype=ScaleDtype.E8M0),
               MXFP4.instance(), "fp4 e2m1 weights, a power-of-two (E8M0) scale per 32 inputs (MXFP4, weight-only)",
               "MXFP4A16"),
        Scheme("mxfp8", QuantArgs(NumberType.FP8_E4M3, 8, Strategy.GROUP, 32, scale_dtype=ScaleDtype.E8M0),
               MXFP8.instance(), "fp8 e4m3 weights, a power-of-two (E8M0) scale per 32 inputs (MXFP8, weight-only)",
               "MXFP8A16"),
    )
}


def get_scheme(name: str, group_size: int | None = None, algorithm: Algorithm | str | None = None) -> Scheme:
    try:
        scheme = SCHEMES[name]
    except KeyError:
        from qconvert.serving import SERVES, variant_recipe

        if name in SERVES:  # an output variant `qconvert schemes` lists, which other flags make
            raise BadInputError(f"{name!r} is an output variant, not a scheme: make it with "
                                f"{variant_recipe(name)}") from None
        raise BadInputError(f"unknown scheme {name!r} (choose from: {', '.join(SCHEMES)})") from None
    return scheme.with_group_size(group_size).with_algorithm(algorithm)
