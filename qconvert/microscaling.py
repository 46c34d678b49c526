"""Pure primitives of the FP4 and microscaled formats: E2M1 codes, nibble packing, E8M0 and NVFP4 scales.

Tensors in, tensors out, on whatever device the input lives; nothing here reads files or knows tensor names
(``qconvert.formats.microscaled`` maps these onto checkpoint names). The arithmetic is compressed-tensors' (the
reference every consumer reads with), so that our checkpoints are bit-identical to llm-compressor's:

* E2M1 (FP4) codes: a sign bit over a 3-bit index into ``0, 0.5, 1, 1.5, 2, 3, 4, 6``, rounded to nearest with
  ties to the even index (0.25 → 0, 0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4); a negative value that
  rounds to zero keeps its sign (nibble 0x8, -0), as compressed-tensors writes it. Two codes per byte, the
  element with the lower index in the low nibble.
* NVFP4: per tensor a float32 *global scale* ``448 * 6 / amax`` (stored as the multiplier, not its inverse), per
  16 inputs an e4m3 scale ``global * amax_16 / 6``; a code is ``x / (scale / global)``.
* MX (MXFP4, MXFP8): per 32 inputs a power-of-two scale stored as its biased exponent (E8M0, a uint8, 127 = 2**0).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from qconvert.band_threads import run_bands

FP4_E2M1_MAX = 6.0
FP8_E4M3_MAX = 448.0
E8M0_BIAS = 127

# The magnitudes of the 8 E2M1 codes, and the boundaries between them: a magnitude m gets the index of the
# number of boundaries it passes, where equality passes the boundaries whose upper neighbour has an even index
# (ties to even): 0.75 → 1.0 (index 2), 1.25 → 1.0, 1.75 → 2.0 (index 4), 2.5 → 2.0, 3.5 → 4.0 (index 6), 5 → 4.0.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_UPPER_IS_EVEN = (False, True, False, True, False, True, False)  # the boundary below index 1, 2, ..., 7
_BOUNDARIES = tuple((a + b) / 2 for a, b in itertools.pairwise(E2M1_VALUES))


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """uint8 nibbles (sign << 3 | index) of ``x`` rounded to the nearest E2M1 value, ties to even; magnitudes
    beyond 6 saturate to 6. ``x`` is any float tensor (the quotient of a weight by its scale)."""
    magnitude = x.abs()
    index = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    for boundary, upper_even in zip(_BOUNDARIES, _UPPER_IS_EVEN, strict=False):
        passed = magnitude >= boundary if upper_even else magnitude > boundary
        index += passed.to(torch.uint8)
    # A negative quotient keeps its sign even when it rounds to zero (0x8); an exact -0.0 does not, as in
    # compressed-tensors, which takes the sign from ``x < 0``.
    sign = (x < 0).to(torch.uint8) << 3
    return index | sign


def e2m1_values(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of uint8 nibbles (the inverse of :func:`e2m1_codes` on representable values)."""
    table = torch.tensor([*E2M1_VALUES, *(-v for v in E2M1_VALUES)], dtype=dtype, device=codes.device)
    return table[codes.to(torch.int64) & 0xF]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[R, C]`` nibbles → ``[R, C/2]`` bytes, element ``2j`` in the low nibble and ``2j + 1`` in the high one."""
    if codes.shape[-1] % 2:
        raise ValueError(f"packing FP4 needs an even number of columns, not {codes.shape[-1]}")
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: ``[R, C/2]`` bytes → ``[R, C]`` nibbles."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def group_amax(weight: torch.Tensor, group: int) -> torch.Tensor:
    """``[R, C/group]`` max of ``|x|`` per group of ``group`` inputs, in the weight's dtype (max is exact)."""
    rows, cols = weight.shape
    return weight.reshape(rows, cols // group, group).abs().amax(dim=-1)


def e8m0_values(exponents: torch.Tensor) -> torch.Tensor:
    """float32 ``2**(e - 127)`` of uint8 E8M0 exponents; 255 (the format's NaN) decodes to NaN.

    Built from the bits, not by ``exp2``: a byte ``e`` of 1 to 254 is the float32 whose exponent field is ``e``, and 0
    is the subnormal ``2**-127`` (significand bit 22). CUDA's ``exp2`` returns ``2**-127 * (1 - 2**-22)`` there, so
    bits are what make every device decode alike."""
    bits = exponents.to(torch.int32) << 23
    bits = torch.where(exponents == 0, torch.full_like(bits, 1 << 22), bits)
    return bits.view(torch.float32).masked_fill_(exponents == 255, float("nan"))


def _power_of_two_at_or_below(amax: torch.Tensor) -> torch.Tensor:
    """The exponent of ``amax``'s power of two after compressed-tensors' rounding: the exponent of ``amax``, plus one
    when its significand is 1.75 or more (it adds a quarter of the leading binade to the bits and truncates the
    significand), as float32; -inf for 0. The OCP MX rule would take ``floor(log2(amax))`` alone."""
    wide = amax.to(torch.float32)
    mantissa, exponent = torch.frexp(wide)  # wide = mantissa * 2**exponent, mantissa in [0.5, 1)
    # bf16/fp16/fp32 amax values are exact in float32, so the significand test is exact too.
    exponent = exponent.to(torch.float32) - 1 + (mantissa >= 0.875).to(torch.float32)
    exponent = exponent.masked_fill_(wide == 0, float("-inf"))
    # frexp gives NaN and Inf a finite exponent: keep them NaN, so that the scale is E8M0's NaN (255) and the
    # caller's finite check refuses the tensor instead of writing its NaN as a code of 0.
    return exponent.masked_fill_(~torch.isfinite(wide), float("nan"))


def mx_exponents(amax: torch.Tensor, element_max_exponent: int) -> torch.Tensor:
    """uint8 E8M0 scales for groups of ``amax``: ``127 + e(amax) - element_max_exponent`` where ``e`` is the power of
    two of :func:`_power_of_two_at_or_below`, clamped to ``[0, 255]`` (a zero group gets 0, i.e. 2**-127).
    ``element_max_exponent``: 2 for E2M1 (max 6), 8 for e4m3 (max 448)."""
    biased = E8M0_BIAS + _power_of_two_at_or_below(amax) - element_max_exponent
    biased = biased.nan_to_num_(nan=255.0)  # a NaN group stays NaN (refused by the caller's finite check)
    return biased.clamp_(0, 255).to(torch.uint8)


def quantize_mx(weight: torch.Tensor, number: object, group: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, exponents)`` of an MX quantization of ``weight`` ``[out, in]`` with one E8M0 scale per ``group``
    inputs: packed E2M1 nibbles ``[out, in/2]`` uint8 (MXFP4) or e4m3 values ``[out, in]`` (MXFP8).

    The division by the power-of-two scale is exact, so doing it in the weight's dtype (as compressed-tensors does)
    or in float32 gives the same quotient, but for one case: in fp16 a scale below 2**-24 underflows to 0, which
    compressed-tensors replaces by 1.0 (zeroing the group's codes). We divide fp16 weights in float32, where the
    scale is exact, and store the true exponent."""
    from qconvert.formats.args import NumberType

    fp4 = number is NumberType.FP4_E2M1
    out_features, in_features = weight.shape
    if in_features % group:
        raise ValueError(f"input size {in_features} is not a multiple of the group size {group}")
    exponents = torch.empty(out_features, in_features // group, dtype=torch.uint8, device=weight.device)
    values = torch.empty(out_features, in_features // 2 if fp4 else in_features,
                         dtype=torch.uint8 if fp4 else torch.float8_e4m3fn, device=weight.device)
    rows = max(1, _band_rows(weight))
    for first in range(0, out_features, rows):
        band = weight[first : first + rows]
        amax = group_amax(band, group)
        band_exponents = mx_exponents(amax, 2 if fp4 else 8)
        exponents[first : first + rows] = band_exponents
        work = torch.float32 if weight.dtype == torch.float16 else weight.dtype
        scale = e8m0_values(band_exponents).to(work).unsqueeze(-1)  # broadcast over each group's inputs
        scaled = (band.to(work).reshape(*amax.shape, group) / scale).reshape(band.shape)
        if fp4:
            values[first : first + rows] = pack_nibbles(e2m1_codes(scaled))
        else:
            values[first : first + rows] = scaled.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return values, exponents


def _band_rows(weight: torch.Tensor) -> int:
    """Rows per band: small on the CPU, where bands that fit in cache are fast; 16M elements on a GPU."""
    elements = (1 << 18) if weight.device.type == "cpu" else (1 << 24)
    return elements // max(1, weight.shape[1])


def nvfp4_global_scale(amax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 ``[1]`` global scale ``448 * 6 / amax`` of a tensor (or of a fused group: the max of its amaxes).

    llm-compressor computes it in the weight's dtype as torch evaluates ``2688 / amax`` for a tensor: the reciprocal
    of amax, rounded, times 2688, rounded (in bf16, 2688 / 0.421875 gives 6400, not the 6368 of a true division).
    We do the same for bf16 and float32 weights, so the bytes match. For fp16 weights we divide in float32
    instead: in fp16, ``2688 / amax`` overflows for amax < 0.041 and llm-compressor silently falls back to 1.0,
    which leaves every block scale of such a layer far below e4m3's range (a 24% weight error). A zero amax takes
    the dtype's smallest normal, and a non-finite quotient falls back to 1.0, as compressed-tensors does."""
    if dtype == torch.float16:
        wide = amax.to(torch.float32).clamp(min=torch.finfo(torch.float16).tiny)
        scale = torch.tensor(FP8_E4M3_MAX * FP4_E2M1_MAX, dtype=torch.float32, device=wide.device) / wide
    else:
        work = dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32
        scale = amax.to(work).clamp(min=torch.finfo(work).tiny).reciprocal() * (FP8_E4M3_MAX * FP4_E2M1_MAX)
    return torch.nan_to_num(scale, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape(1)


def nvfp4_block_scales(amax: torch.Tensor, global_scale: torch.Tensor, target: float = FP4_E2M1_MAX) -> torch.Tensor:
    """e4m3 scales of 16-input blocks: ``global * (amax / 6)``, ``amax / 6`` in the weight's dtype and the product
    in float32, clamped to e4m3's range; a zero scale becomes e4m3's eps (0.125), as compressed-tensors stores it.
    ``target``: what amax maps to (6, round-to-nearest; the search also tries 4, see qconvert.algorithms)."""
    wide = global_scale.to(torch.float32) * (amax / torch.tensor(target, dtype=amax.dtype, device=amax.device))
    scales = wide.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    zero = scales.to(torch.float32) == 0
    return torch.where(zero, torch.tensor(0.125, dtype=torch.float8_e4m3fn, device=scales.device), scales)


def quantize_nvfp4(weight: torch.Tensor, global_scale: torch.Tensor, search: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed [out, in/2] uint8, scales [out, in/16] e4m3)`` of ``weight`` under ``global_scale``: each code is
    ``x / (scale / global)`` (float32) rounded to E2M1. ``search``: each block's scale chosen by
    :func:`qconvert.algorithms.search_nvfp4_scales` ("four over six", then a least-squares refit) instead of
    amax / 6."""
    out_features, in_features = weight.shape
    if in_features % 16:
        raise ValueError(f"input size {in_features} is not a multiple of the group size 16")
    scales = torch.empty(out_features, in_features // 16, dtype=torch.float8_e4m3fn, device=weight.device)
    packed = torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=weight.device)
    global_scale = global_scale.to(device=weight.device, dtype=torch.float32)
    rows = max(1, _band_rows(weight))

    def one_band(first: int) -> None:
        band = weight[first : first + rows]
        amax = group_amax(band, 16)
        if search:
            from qconvert.algorithms import search_nvfp4_scales

            band_scales = search_nvfp4_scales(band.reshape(*amax.shape, 16), amax, global_scale)
        else:
            band_scales = nvfp4_block_scales(amax, global_scale)
        scales[first : first + rows] = band_scales
        multiplier = (band_scales.to(torch.float32) / global_scale).unsqueeze(-1)  # broadcast over the 16 inputs
        quotient = band.reshape(*band_scales.shape, 16) / multiplier
        packed[first : first + rows] = pack_nibbles(e2m1_codes(quotient.reshape(band.shape)))

    run_bands(one_band, range(0, out_features, rows), weight.device, threaded=search)  # band threads: the search only
    return packed, scales


# The powers of two e4m3 holds exactly: 2**-9 (its smallest subnormal) to 2**8 (256; 448 is not a power of two).
E4M3_MIN_EXPONENT, E4M3_MAX_EXPONENT = -9, 8
E4M3_BIAS = 7


@dataclass(frozen=True)
class MxToNvfp4:
    """NVFP4 scales that hold an MXFP4 tensor's values exactly: one float32 global scale ``2**m`` and, per 16 inputs,
    the e4m3 ``2**(k + m)`` of the 32-block's exponent ``k``, so ``scale / global == 2**k`` and every code is kept.
    ``m`` puts the largest exponent at e4m3's largest power of two; a block ``k + m < -9`` below it has no exact
    e4m3 scale (its exponent span from the tensor's largest is over 17): :func:`mx_inexact_blocks` marks such blocks
    (counted before any write, :func:`mx_nvfp4_losses`), whose scale is then 0 (e4m3 rounds ``2**-10`` and below to
    0), so their codes dequantize to 0."""

    scales: torch.Tensor  # e4m3 [R, C/16]
    global_scale: torch.Tensor  # float32 [1]


def mx_global_shift(exponents: list[torch.Tensor]) -> int:
    """``m`` of the NVFP4 global scale ``2**m`` that holds MX ``exponents`` (one tensor's, or a fused group's) exactly:
    it puts the largest exponent at e4m3's largest power of two. The 255 NaN must have been refused before."""
    largest = max(int(e.max()) for e in exponents) - E8M0_BIAS
    shift = E4M3_MAX_EXPONENT - largest
    if shift > 126:  # 2**shift would overflow float32: every block is below 2**-118
        raise ValueError(f"the largest MX scale is 2**{largest}: no float32 NVFP4 global scale holds it")
    return shift


def _nvfp4_scale_table(shift: int, device: torch.device) -> torch.Tensor:
    """For each of the 256 E8M0 exponents under the global scale ``2**shift``: its e4m3 scale byte written twice
    (an int16, so one look-up writes the two 16-blocks of a 32-block; both bytes alike, so endianness is moot).
    The arithmetic is the one each scale was once computed with, run on the 256 possible inputs."""
    powers = torch.arange(256, dtype=torch.int32, device=device) - E8M0_BIAS
    shifted = powers + shift
    inexact = shifted < E4M3_MIN_EXPONENT
    scales = torch.exp2(shifted.clamp(min=E4M3_MIN_EXPONENT).to(torch.float32)).masked_fill_(inexact, 0.0)
    byte = scales.to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int16)
    return byte | (byte << 8)


def lookup(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a 1-D ``table`` and an integer ``index`` of any shape (uint8 included), worked in bands
    so that the 8-byte indices stay small. On the CPU through NumPy's ``take``, several times faster than torch's
    indexing there (the pass is as fast as the bytes it writes allow)."""
    out = torch.empty(index.shape, dtype=table.dtype, device=index.device)
    flat_index, flat_out = index.reshape(-1), out.view(-1)
    band = 1 << 20 if index.device.type == "cpu" else 1 << 26
    if index.device.type == "cpu":
        values, indices, written = table.numpy(), flat_index.numpy(), flat_out.numpy()
        for first in range(0, indices.size, band):
            values.take(indices[first : first + band].astype("intp"), out=written[first : first + band])
        return out
    for first in range(0, flat_index.numel(), band):
        flat_out[first : first + band] = table[flat_index[first : first + band].to(torch.int64)]
    return out


def mx_to_nvfp4(exponents: torch.Tensor, shift: int | None = None) -> MxToNvfp4:
    """:class:`MxToNvfp4` for uint8 E8M0 ``exponents`` ``[R, C/32]`` under the global scale ``2**shift`` (by default
    :func:`mx_global_shift` of these exponents alone; a fused group passes its own). Each 32-block's two e4m3 scales
    are looked up by its exponent byte (:func:`_nvfp4_scale_table`), as a copy would move them."""
    shift = mx_global_shift([exponents]) if shift is None else shift
    # Where every scale is a normal e4m3 power of two, its byte is its biased exponent << 3: computed in int16, both
    # bytes at once, three times as fast as the look-up on the CPU (real tensors span a few exponents).
    offset = shift + E4M3_BIAS - E8M0_BIAS  # stored exponent + offset: the e4m3 biased exponent
    if int(exponents.min()) + offset >= 1 and int(exponents.max()) + offset <= 15:
        doubled = exponents.to(torch.int16)
        doubled += offset
        doubled *= (1 << 3) | (1 << 11)  # the field into bits 3-6 of both bytes
    else:
        doubled = lookup(_nvfp4_scale_table(shift, exponents.device), exponents.contiguous())
    scales = doubled.view(torch.uint8).view(torch.float8_e4m3fn)
    return MxToNvfp4(scales, torch.tensor([2.0**shift], dtype=torch.float32, device=exponents.device))


def mx_inexact_blocks(exponents: torch.Tensor, shift: int) -> torch.Tensor:
    """bool ``[R, C/32]``: the blocks whose power of two has no exact e4m3 scale under the global scale
    ``2**shift`` (:class:`MxToNvfp4` gives them scale 0): exponent ``e - 127 + shift < -9``, compared on the
    stored bytes."""
    below = E8M0_BIAS + E4M3_MIN_EXPONENT - shift  # the smallest exact stored exponent
    if below <= 0:
        return torch.zeros(exponents.shape, dtype=torch.bool, device=exponents.device)
    if below > 255:
        return torch.ones(exponents.shape, dtype=torch.bool, device=exponents.device)
    return exponents < below


def nonzero_blocks(packed: torch.Tensor, group: int = 32) -> torch.Tensor:
    """bool ``[R, C/group]``: blocks of packed E2M1 ``[R, C/2]`` that hold a nonzero code (±0 are 0x0 and 0x8)."""
    magnitudes = (packed & 0x77) != 0  # both nibbles' index bits, signs dropped
    return magnitudes.reshape(packed.shape[0], -1, group // 2).any(dim=-1)


# e4m3 holds every E2M1 value times 2**d exactly for d in [-8, 6]: 6 x 2**6 = 384 <= 448, and 0.5 x 2**-8 = 2**-9
# (its smallest subnormal); 1.5 x 2**-8 = 3 x 2**-9 is still a multiple of the subnormal step.
FP4_IN_E4M3_SPAN = (-8, 6)


def _tiled_exponents(exponents: torch.Tensor, tile: tuple[int, int], group: int) -> torch.Tensor:
    """uint8 ``[tile rows, th, tile columns, tw/group]`` view of ``exponents``, padded with 0 where the weight ends
    (never above a tile's largest, which always has a stored block; copied only where padding is needed)."""
    th, tw = tile
    per_tile = tw // group
    rows, cols = -(-exponents.shape[0] // th), -(-exponents.shape[1] // per_tile)
    padded = exponents
    if (rows * th, cols * per_tile) != tuple(exponents.shape):
        padded = torch.zeros((rows * th, cols * per_tile), dtype=torch.uint8, device=exponents.device)
        padded[: exponents.shape[0], : exponents.shape[1]] = exponents
    return padded.reshape(rows, th, cols, per_tile)


def smallest_power_of_two(dtype: torch.dtype) -> int:
    """The exponent of the smallest power of two ``dtype`` holds (its smallest subnormal): -24 for float16, -133 for
    bfloat16, -149 for float32."""
    info = torch.finfo(dtype)
    return round(math.log2(info.tiny)) + round(math.log2(info.eps))


def mx_block_exponents(exponents: torch.Tensor, tile: tuple[int, int], scale_dtype: torch.dtype,
                       group: int = 32) -> torch.Tensor:
    """int32 ``[ceil(R/th), ceil(C/tw)]``: for each ``tile`` of the weight, the power of two ``K`` its fp8 scale takes
    when every MX block in it is cast exactly: 6 below the tile's largest exponent (:data:`FP4_IN_E4M3_SPAN`), and
    never below the smallest power of two ``scale_dtype`` holds (a float16 model's tile of blocks stored near
    2**-127 would otherwise get a scale of 0, and codes of NaN). ``exponents``: uint8 E8M0 ``[R, C/group]``; ``tw``
    a multiple of ``group``. The maxima are taken on the stored bytes (the order of the exponents)."""
    largest = _tiled_exponents(exponents, tile, group).amax(dim=3).amax(dim=1)
    wanted = largest.to(torch.int32) - E8M0_BIAS - FP4_IN_E4M3_SPAN[1]
    return wanted.clamp_(min=smallest_power_of_two(scale_dtype))


def mx_fp8_block_losses(exponents: torch.Tensor, tile: tuple[int, int], scale_dtype: torch.dtype,
                        group: int = 32) -> torch.Tensor | None:
    """:func:`mx_blocks_below` under the tiles' own scales (:func:`mx_block_exponents`), or None where no block is
    below (every tile's smallest nonzero exponent at most 8 below its scale's): decided on per-tile maxima and
    minima of the stored bytes, so that the common lossless case builds no full-size mask."""
    tiled = _tiled_exponents(exponents, tile, group)
    tile_exponents = mx_block_exponents(exponents, tile, scale_dtype, group)
    smallest = (tiled - 1).amin(dim=3).amin(dim=1).to(torch.int32) + 1  # 0 wraps to 255: the smallest nonzero
    if int((smallest - E8M0_BIAS - tile_exponents).min()) >= FP4_IN_E4M3_SPAN[0]:
        return None
    return mx_blocks_below(exponents, tile_exponents, tile, group)


def mx_nvfp4_losses(exponents: torch.Tensor, shift: int) -> torch.Tensor | None:
    """bool ``[R, C/32]``: the blocks stored with a nonzero exponent that e4m3 scales cannot hold under the global
    scale ``2**shift`` (:func:`mx_inexact_blocks`), or None where there is none (decided by the smallest nonzero
    exponent, without building a mask)."""
    smallest = int(exponents.min())
    if smallest == 0:
        smallest = int((exponents - 1).min()) + 1  # 0 wraps to 255: the smallest nonzero (256 if all are 0)
    if smallest >= E8M0_BIAS + E4M3_MIN_EXPONENT - shift:
        return None
    return mx_inexact_blocks(exponents, shift) & (exponents != 0)


def mx_blocks_below(exponents: torch.Tensor, tile_exponents: torch.Tensor, tile: tuple[int, int],
                    group: int = 32) -> torch.Tensor:
    """bool ``[R, C/group]``: MX blocks (stored exponent nonzero) more than 8 below their tile's fp8 scale, whose codes
    e4m3 may not hold (see :func:`mx_block_exponents`)."""
    th, tw = tile
    expanded = tile_exponents.repeat_interleave(th, dim=0).repeat_interleave(tw // group, dim=1)
    expanded = expanded[: exponents.shape[0], : exponents.shape[1]]
    powers = exponents.to(torch.int32) - E8M0_BIAS
    return (powers - expanded < FP4_IN_E4M3_SPAN[0]) & (exponents != 0)


# The exponent differences d = k - K (a 32-block's power of two less its tile's) that the fp8-block cast's table
# has rows for: never above 6 (K is 6 below the tile's largest k); at -24 and below, every E2M1 value times 2**d is
# under half e4m3's smallest subnormal (2**-10), so it rounds to a signed zero, as in the row of -24.
_FP8_CAST_DIFFERENCES = (-24, FP4_IN_E4M3_SPAN[1])


def _fp8_cast_table(device: torch.device) -> torch.Tensor:
    """int16 ``[differences x 256]``: for an exponent difference ``d`` and a packed byte, the two e4m3 bytes of its
    codes' values times ``2**d`` (low nibble first, in memory order), each rounded once from float32 (exact for
    ``d`` in :data:`FP4_IN_E4M3_SPAN`)."""
    low, high = _FP8_CAST_DIFFERENCES
    powers = torch.exp2(torch.arange(low, high + 1, dtype=torch.float32, device=device))  # exact: |d| <= 24
    nibbles = unpack_nibbles(torch.arange(256, dtype=torch.uint8, device=device).reshape(256, 1))  # [256, 2]
    values = e2m1_values(nibbles).reshape(1, 256, 2) * powers.reshape(-1, 1, 1)
    return values.to(torch.float8_e4m3fn).view(torch.uint8).reshape(-1, 256, 2).contiguous().view(torch.int16) \
        .reshape(-1)


def mxfp4_to_fp8_blocks(packed: torch.Tensor, exponents: torch.Tensor, tile: tuple[int, int],
                        scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(e4m3 values [R, C], scales [R/th, C/tw] in scale_dtype)`` of MXFP4 ``packed`` / ``exponents`` under fp8
    block scales ``2**K`` (:func:`mx_block_exponents`): each value ``code x 2**k`` becomes the e4m3 value of
    ``code x 2**(k - K)``, exact where the tile's exponent span allows (:func:`mx_blocks_below` counts the rest).

    The codes are never decoded: each packed byte and its block's difference ``k - K`` index a table of e4m3 byte
    pairs (:func:`_fp8_cast_table`), which holds what :func:`mxfp4_to_fp8_blocks_decoded` computes in float32.
    Where that float32 arithmetic is not the exact power-of-two product the table assumes (a scale that
    ``scale_dtype`` does not hold exactly, or an exponent above 2**125, whose values overflow float32), the cast
    is the float32 one itself."""
    th, tw = tile
    rows, columns = packed.shape[0], packed.shape[1] * 2
    tile_exponents = mx_block_exponents(exponents, tile, scale_dtype)
    scales = torch.exp2(tile_exponents.to(torch.float32)).to(scale_dtype)
    mantissa, power = torch.frexp(scales.to(torch.float32))
    if not (bool((mantissa == 0.5).all()) and torch.equal(power - 1, tile_exponents)
            and int(exponents.max()) <= E8M0_BIAS + 125):
        return mxfp4_to_fp8_blocks_decoded(packed, exponents, tile, scale_dtype)
    expanded = tile_exponents.repeat_interleave(th, dim=0)[:rows].repeat_interleave(tw // 32, dim=1)
    low, high = _FP8_CAST_DIFFERENCES
    differences = (exponents.to(torch.int32) - E8M0_BIAS) - expanded[:, : exponents.shape[1]]
    row_start = (differences.clamp_(low, high) - low) * 256  # [R, C/32]: where each block's table row starts
    table = _fp8_cast_table(packed.device)
    codes = torch.empty((rows, columns // 32, 16), dtype=torch.int16, device=packed.device)
    by_block = packed.reshape(rows, columns // 32, 16)
    band = max(1, (1 << 20 if packed.device.type == "cpu" else 1 << 26) // max(1, columns // 2))
    if packed.device.type == "cpu":  # NumPy: the index sums and the take, each one pass over the band
        values, starts, written = table.numpy(), row_start.numpy(), codes.numpy()
        index = np.empty((min(rows, band), columns // 32, 16), dtype=np.intp)
        stored = by_block.numpy()
        for first in range(0, rows, band):
            last = min(rows, first + band)
            np.add(stored[first:last], starts[first:last, :, None], out=index[: last - first], casting="unsafe")
            values.take(index[: last - first], out=written[first:last])
    else:
        for first in range(0, rows, band):
            last = min(rows, first + band)
            codes[first:last] = table[by_block[first:last].to(torch.int64) + row_start[first:last, :, None]]
    return codes.view(torch.uint8).reshape(rows, columns).view(torch.float8_e4m3fn), scales


def mxfp4_to_fp8_blocks_decoded(packed: torch.Tensor, exponents: torch.Tensor, tile: tuple[int, int],
                                scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`mxfp4_to_fp8_blocks` by decoding: each value divided by its tile's scale in float32 and rounded to
    e4m3. Worked in bands of whole tile rows, so the float32 temporaries stay small."""
    th, tw = tile
    rows, columns = packed.shape[0], packed.shape[1] * 2
    scales = torch.exp2(mx_block_exponents(exponents, tile, scale_dtype).to(torch.float32)).to(scale_dtype)
    codes = torch.empty((rows, columns), dtype=torch.float8_e4m3fn, device=packed.device)
    elements = (1 << 18) if packed.device.type == "cpu" else (1 << 24)
    band = max(1, elements // max(1, columns * th)) * th
    for first in range(0, rows, band):
        last = min(rows, first + band)
        values = e2m1_values(unpack_nibbles(packed[first:last]))
        values *= e8m0_values(exponents[first:last]).repeat_interleave(32, dim=1)
        multiplier = scales[first // th: -(-last // th)].to(torch.float32)
        multiplier = multiplier.repeat_interleave(th, dim=0)[: last - first].repeat_interleave(tw, dim=1)[:, :columns]
        codes[first:last] = (values / multiplier).to(torch.float8_e4m3fn)
    return codes, scales
