"""Microscaled weight formats (NVFP4, MXFP4, MXFP8) as compressed-tensors writes them, and their dequantization
in plain torch: the reference the Triton kernels of :mod:`qconvert.kernels.microscaled` are held to.

* NVFP4 (``nvfp4-pack-quantized``): ``weight_packed`` uint8 ``[N, K/2]``, two FP4 E2M1 codes a byte (element
  ``2j`` in the low nibble, ``2j+1`` in the high one), ``weight_scale`` float8_e4m3fn ``[N, K/16]`` and
  ``weight_global_scale`` float32 ``[1]``: ``w = code * (scale / global_scale)``;
* MXFP4 (``mxfp4-pack-quantized``): the same nibbles, ``weight_scale`` uint8 ``[N, K/32]`` of E8M0 exponents:
  ``w = code * 2**(s - 127)``;
* MXFP8 (``mxfp8-quantized``): ``weight`` float8_e4m3fn ``[N, K]``, the same E8M0 scales.

Every product is formed in float32 (exact for MXFP: a power of two times a code; one rounding for NVFP4) and then
rounded once to the model dtype, which is what compressed-tensors' ``decompress`` rebuilds. No Triton here, so
``qconvert verify`` can build its reference without a GPU toolchain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qconvert.formats.args import NumberType, ScaleDtype


@dataclass(frozen=True)
class MicroFormat:
    """One microscaled weight format: how its elements and block scales are encoded."""

    name: str
    element: NumberType  # FP4_E2M1: codes two to a uint8 byte; FP8_E4M3: float8_e4m3fn values
    scale: ScaleDtype  # E4M3: float8_e4m3fn block scales; E8M0: uint8 biased power-of-two exponents
    group: int  # inputs (along K) per block scale
    global_scale: bool  # a float32 [1] tensor divides every block scale (NVFP4)

    @property
    def per_byte(self) -> int:
        """Weight elements stored per byte of the weight tensor."""
        return 2 if self.element is NumberType.FP4_E2M1 else 1


NVFP4 = MicroFormat("nvfp4", NumberType.FP4_E2M1, ScaleDtype.E4M3, 16, True)
MXFP4 = MicroFormat("mxfp4", NumberType.FP4_E2M1, ScaleDtype.E8M0, 32, False)
MXFP8 = MicroFormat("mxfp8", NumberType.FP8_E4M3, ScaleDtype.E8M0, 32, False)
FORMATS = {f.name: f for f in (NVFP4, MXFP4, MXFP8)}

# The magnitudes of the 3-bit E2M1 index (bit 3 of a nibble is the sign): 2 exponent bits with bias 1, 1 mantissa bit.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def as_format(fmt: MicroFormat | str) -> MicroFormat:
    if isinstance(fmt, MicroFormat):
        return fmt
    try:
        return FORMATS[fmt.lower()]
    except KeyError:
        raise ValueError(f"unknown microscaled format {fmt!r} (one of {', '.join(FORMATS)})") from None


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """float32 ``[N, 2 * cols]`` values of uint8 ``packed [N, cols]``: the low nibble is the even element. A set
    sign bit gives a negative value, -0.0 for code 0x8 (as compressed-tensors' ``unpack_fp4_from_uint8``)."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed FP4 weights must be uint8, not {packed.dtype}")
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)
    magnitude = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)[(codes & 0x7).long()]
    return torch.where((codes & 0x8) != 0, -magnitude, magnitude)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`unpack_e2m1` on 4-bit codes: uint8 ``codes [N, K]`` (0..15) → ``[N, K/2]``."""
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def e8m0_to_float(exponents: torch.Tensor) -> torch.Tensor:
    """float32 ``2**(s - 127)`` of uint8 E8M0 exponents ``s`` (exact for every s; s = 0 is the subnormal 2**-127),
    NaN for s = 255 (the OCP MX specification's NaN encoding)."""
    if exponents.dtype != torch.uint8:
        raise ValueError(f"E8M0 scales must be uint8, not {exponents.dtype}")
    s = exponents.to(torch.float32)
    return torch.where(exponents == 255, torch.nan, torch.exp2(s - 127.0))


def _expand(scales: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """Block scales ``[N, K/group]`` repeated along K to ``[N, K]``."""
    if scales.shape[-1] * group != k:
        raise ValueError(f"scales {list(scales.shape)} do not give one scale per {group} of {k} inputs")
    return scales.repeat_interleave(group, dim=-1)


def dequantize_nvfp4(packed: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor,
                     dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``[N, K]`` in ``dtype``: ``code * (scale.float() / global_scale)`` in float32, rounded once.

    The effective scale is a float32 division, as compressed-tensors computes it (not a multiplication by the
    reciprocal, which rounds differently). Run this on the CPU when bits matter: torch on CUDA may turn a
    division by a one-element tensor into a reciprocal multiplication.
    """
    if scale.dtype != torch.float8_e4m3fn:
        raise ValueError(f"NVFP4 block scales must be float8_e4m3fn, not {scale.dtype}")
    values = unpack_e2m1(packed)
    effective = scale.to(torch.float32) / global_scale.to(torch.float32).reshape(1, 1)
    return (values * _expand(effective, NVFP4.group, values.shape[-1])).to(dtype)


def dequantize_mxfp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``[N, K]`` in ``dtype``: ``code * 2**(s - 127)`` (exact in float32), rounded once."""
    values = unpack_e2m1(packed)
    return (values * _expand(e8m0_to_float(scale), MXFP4.group, values.shape[-1])).to(dtype)


def dequantize_mxfp8(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``[N, K]`` in ``dtype``: ``float(weight) * 2**(s - 127)`` (exact in float32), rounded once. ``weight`` is
    float8_e4m3fn (or its uint8 bits)."""
    if weight.dtype == torch.uint8:
        weight = weight.view(torch.float8_e4m3fn)
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"MXFP8 weights must be float8_e4m3fn, not {weight.dtype}")
    values = weight.to(torch.float32)
    return (values * _expand(e8m0_to_float(scale), MXFP8.group, values.shape[-1])).to(dtype)


def dequantize(fmt: MicroFormat | str, weight: torch.Tensor, scales: torch.Tensor,
               global_scale: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The dequantized ``[N, K]`` weight of any of the three formats (``weight``: the stored ``weight_packed`` or
    ``weight``)."""
    fmt = as_format(fmt)
    if fmt.global_scale:
        if global_scale is None:
            raise ValueError(f"{fmt.name} needs its weight_global_scale")
        return dequantize_nvfp4(weight, scales, global_scale, dtype)
    if fmt == MXFP4:
        return dequantize_mxfp4(weight, scales, dtype)
    return dequantize_mxfp8(weight, scales, dtype)
