"""Pure quantization primitives: tensors in, tensors out, on whatever device the input lives.

The arithmetic is the one FORMAT.md fixes, which is what makes our checkpoints bit-identical to the
reference quantizers (compressed-tensors / llm-compressor):

* symmetric int, ``b`` bits: ``scale = amax / ((2**b - 1) / 2)`` in float32, cast to the weight dtype;
* ``q = round_half_even(clamp(x / scale, qmin, qmax))`` with the division done in the weight dtype,
  using the scale exactly as stored;
* a group whose amax is 0 gets the scale dtype's eps instead of 0, so it quantizes to zeros, not NaN.

Nothing here reads files or knows tensor names; ``qconvert.format`` maps these onto checkpoint names.
"""

from __future__ import annotations

import sys

import torch

from qconvert.band_threads import run_bands, thread_buffer

__all__ = [
    "ACTIVATION_INT8_DIVISOR",
    "FP8_E4M3_MAX",
    "asymmetric_qparams",
    "dequantize_activation_groups",
    "dequantize_asymmetric",
    "dequantize_tiles",
    "e4m3fn_to_e4m3fnuz",
    "fake_quant_static_int8",
    "int_range",
    "pack_int32",
    "pack_zero_points",
    "packed_columns",
    "quantize_activation_groups",
    "quantize_and_pack_asymmetric",
    "quantize_and_pack_symmetric",
    "quantize_asymmetric",
    "quantize_tiled",
    "quantize_tiles",
    "scale_divisor",
    "scales_from_amax",
    "tile_scales",
    "tile_shape",
    "unpack_int32",
    "unpack_zero_points",
]


def int_range(num_bits: int) -> tuple[int, int]:
    """``(qmin, qmax)`` of a signed ``num_bits`` integer: int4 → (-8, 7), int8 → (-128, 127)."""
    return -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1


FP8_E4M3_MAX = 448.0


def scale_divisor(kind: str, num_bits: int = 8) -> float:
    """What amax is divided by to get a scale: ``(2**b - 1) / 2`` for int, 448 for fp8 e4m3fn."""
    return FP8_E4M3_MAX if kind == "float" else (2**num_bits - 1) / 2


def scales_from_amax(amax: torch.Tensor, divisor: float, dtype: torch.dtype) -> torch.Tensor:
    """``amax / divisor`` in float32, stored in ``dtype``; a zero scale becomes ``dtype``'s eps.

    The zero check runs after the cast: a tiny float32 scale can still round to 0 in bf16. The eps of
    the stored dtype is what the reference tools store (llm-compressor: 0.0078125 for bf16).
    """
    # The divisor is a tensor on amax's device: CUDA divides by a Python scalar through its reciprocal
    # (amax * (1/7.5) can round differently from amax / 7.5); a tensor divisor is a true division on
    # every device, and on the CPU it is the same division as by the scalar.
    wide = amax.to(torch.float32)
    scales = (wide / torch.tensor(divisor, dtype=torch.float32, device=wide.device)).to(dtype)
    return scales.masked_fill_(scales == 0, torch.finfo(dtype).eps)


def band_elements(tensor: torch.Tensor, cpu_elements: int) -> int:
    """Elements per band for the banded quantizers: small on the CPU, where bands that fit in cache
    are fast, and 16M on a GPU, where each band costs kernel launches and memory is not the limit.
    Banding never changes a result (every operation is per row or per tile)."""
    return cpu_elements if tensor.device.type == "cpu" else max(cpu_elements, 1 << 24)


def tile_shape(shape: tuple[int, ...], strategy: str, group_size: int | None = None,
               block: tuple[int, int] | None = None) -> tuple[int, int]:
    """The ``(rows, cols)`` of weight that share one scale, for every strategy.

    tensor: the whole weight; channel: one row; group: ``group_size`` inputs of one row; block: a
    ``block`` tile. Treating them all as tiles lets one code path serve every scheme.
    """
    out_features, in_features = shape
    if strategy == "tensor":
        return out_features, in_features
    if strategy == "channel":
        return 1, in_features
    if strategy == "group":
        if not group_size or in_features % group_size:
            raise ValueError(f"input size {in_features} is not a multiple of the group size {group_size}")
        return 1, group_size
    if strategy == "block":
        if block is None:
            raise ValueError("block strategy needs a block shape")
        return block
    raise ValueError(f"unknown strategy {strategy!r}")


def _tiles(weight: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor:
    """``[R, th, C, tw]`` view of ``weight``, zero-padded to whole tiles (zeros never raise an amax)."""
    out_features, in_features = weight.shape
    th, tw = tile
    rows, cols = -(-out_features // th), -(-in_features // tw)
    pad_rows, pad_cols = rows * th - out_features, cols * tw - in_features
    if pad_rows or pad_cols:
        weight = torch.nn.functional.pad(weight, (0, pad_cols, 0, pad_rows))
    return weight.reshape(rows, th, cols, tw)


def tile_scales(weight: torch.Tensor, tile: tuple[int, int], divisor: float) -> torch.Tensor:
    """``[R, C]`` scales ``amax / divisor`` (float32 arithmetic, stored in the weight dtype)."""
    # |x| and max are exact in any float dtype, so amax is taken before widening to float32.
    return scales_from_amax(_tiles(weight, tile).abs().amax(dim=(1, 3)), divisor, weight.dtype)


SHARED_AMAX_WIDTH = 128  # inputs per row of one shared amax (the group of rtn4/rtn8; divides 128x128 blocks)
_SHARED_AMAX = "_qconvert_group_amax"  # the attribute of a weight tensor that holds its shared amaxes


def share_group_amax(weight: torch.Tensor) -> bool:
    """Compute ``|x|`` max per 128 inputs of each row of ``weight`` once and keep it on the tensor, for
    every quantizer that will read this very tensor object (``qconvert batch`` quantizing one weight
    into several schemes). Tiles that are whole groups (a group of 128, a row, a 128x128 block) then
    take their amax from it instead of a pass over the weight; max is exact, so every result is
    bit-identical. Returns whether the weight qualifies (2-D floating point, rows of whole groups)."""
    if weight.dim() != 2 or not weight.dtype.is_floating_point or weight.shape[1] % SHARED_AMAX_WIDTH:
        return False
    out_features, in_features = weight.shape
    amax = torch.empty(out_features, in_features // SHARED_AMAX_WIDTH, dtype=weight.dtype, device=weight.device)
    rows = max(1, band_elements(weight, 1 << 19) // max(1, in_features))
    for start in range(0, out_features, rows):
        amax[start : start + rows] = _tiles(weight[start : start + rows], (1, SHARED_AMAX_WIDTH)).abs().amax(dim=(1, 3))
    setattr(weight, _SHARED_AMAX, amax)
    return True


def _shared_tile_amax(weight: torch.Tensor, tile: tuple[int, int]) -> torch.Tensor | None:
    """``[R, C]`` amax per tile of ``weight`` from its shared group amaxes, or None when it has none or
    the tile is not made of whole groups."""
    groups = getattr(weight, _SHARED_AMAX, None)
    if groups is None:
        return None
    out_features, in_features = weight.shape
    th, tw = tile
    if tw % SHARED_AMAX_WIDTH or in_features % tw:
        return None
    rows = -(-out_features // th)
    if rows * th != out_features:  # zero rows pad the last tile row, as _tiles does
        groups = torch.nn.functional.pad(groups, (0, 0, 0, rows * th - out_features))
    return groups.reshape(rows, th, in_features // tw, tw // SHARED_AMAX_WIDTH).amax(dim=(1, 3))


def _new_or_reused(reuse: bool, slot: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
                   ) -> torch.Tensor:
    """A fresh tensor, or with ``reuse`` the calling thread's buffer for ``slot`` (qconvert.band_threads)."""
    return thread_buffer(slot, shape, dtype, device) if reuse else torch.empty(shape, dtype=dtype, device=device)


def quantize_tiles(weight: torch.Tensor, scales: torch.Tensor, tile: tuple[int, int], kind: str,
                   num_bits: int = 8, reuse: bool = False) -> torch.Tensor:
    """int8-stored integer codes, or float8_e4m3fn values, of ``weight`` for per-tile ``scales``.

    The division runs in the weight dtype with the scale as stored, as the reference does: in bf16,
    0.69921875 / 0.107421875 is 6.509 in float32 (→ 7) but rounds to bf16 6.5 first (→ 6, half-to-even).
    ``reuse``: int codes in the calling thread's buffers, valid until its next call (banded quantizers).
    """
    out_features, in_features = weight.shape
    tiles = _tiles(weight, tile)
    divisors = scales.reshape(tiles.shape[0], 1, tiles.shape[2], 1).to(weight.dtype)
    if kind == "float":
        q = torch.div(tiles, divisors).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    else:
        qmin, qmax = int_range(num_bits)
        q = torch.div(tiles, divisors, out=_new_or_reused(reuse, "quotient", tiles.shape, weight.dtype, weight.device))
        q = _new_or_reused(reuse, "codes", tiles.shape, torch.int8, weight.device).copy_(q.clamp_(qmin, qmax).round_())
    return q.reshape(tiles.shape[0] * tile[0], tiles.shape[2] * tile[1])[:out_features, :in_features].contiguous()


def quantize_tiled(weight: torch.Tensor, tile: tuple[int, int], kind: str, num_bits: int = 8,
                   scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, scales [R, C])``: :func:`tile_scales` then :func:`quantize_tiles`, run over bands of
    whole tile rows so that temporaries stay small; bit-identical to the unbanded pair.

    ``scale`` (one value) forces a single scale on the whole weight: a per-tensor scale shared by the
    parts of a fused module. A per-tensor tile is handled the same way, its scale found first.
    """
    out_features, in_features = weight.shape
    th, tw = tile
    per_tensor = (th, tw) == (out_features, in_features)
    stored = torch.float8_e4m3fn if kind == "float" else torch.int8
    values = torch.empty(weight.shape, dtype=stored, device=weight.device)
    band_rows = max(1, band_elements(weight, 1 << 20) // max(1, in_features))
    if per_tensor or scale is not None:
        if scale is None:
            amax = max((weight[r : r + band_rows].abs().amax().to(torch.float32)
                        for r in range(0, out_features, band_rows)), default=torch.tensor(0.0))
            scale = scales_from_amax(amax, scale_divisor(kind, num_bits), weight.dtype)
        scale = scale.to(device=weight.device, dtype=weight.dtype).reshape(1, 1)
        for r in range(0, out_features, band_rows):
            band = weight[r : r + band_rows]
            values[r : r + band_rows] = quantize_tiles(band, scale, tuple(band.shape), kind, num_bits)
        return values, scale
    rows, cols = -(-out_features // th), -(-in_features // tw)
    scales = torch.empty(rows, cols, dtype=weight.dtype, device=weight.device)
    shared = _shared_tile_amax(weight, tile)
    step = max(1, band_rows // th)
    for first in range(0, rows, step):
        last = min(rows, first + step)
        band = weight[first * th : last * th]
        if shared is None:
            band_scales = tile_scales(band, tile, scale_divisor(kind, num_bits))
        else:
            band_scales = scales_from_amax(shared[first:last], scale_divisor(kind, num_bits), weight.dtype)
        scales[first:last] = band_scales
        values[first * th : last * th] = quantize_tiles(band, band_scales, tile, kind, num_bits)
    return values, scales


def dequantize_tiles(values: torch.Tensor, scales: torch.Tensor, tile: tuple[int, int],
                     dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values * scale`` per tile, in the scale dtype (as the reference reader computes it)."""
    out_features, in_features = values.shape
    tiles = _tiles(values.to(scales.dtype), tile)
    result = tiles * scales.reshape(tiles.shape[0], 1, tiles.shape[2], 1)
    result = result.reshape(tiles.shape[0] * tile[0], tiles.shape[2] * tile[1])[:out_features, :in_features]
    result = result.contiguous()
    return result if dtype is None else result.to(dtype)


def e4m3fn_to_e4m3fnuz(values: torch.Tensor) -> torch.Tensor:
    """Same bits reinterpreted as e4m3fnuz (a new tensor; the input is never modified).

    0x80 is -0 in e4m3fn but NaN in e4m3fnuz, so it becomes 0; e4m3fn's NaNs (0x7F, 0xFF) would read
    as ±240 in e4m3fnuz, so they become its NaN, 0x80. Every other code's value halves, which the
    caller compensates by doubling the scales: then all 256 codes dequantize as before.
    """
    bits = values.view(torch.uint8)
    converted = torch.where(bits == 0x80, 0, bits)
    converted = torch.where((bits & 0x7F) == 0x7F, 0x80, converted).to(torch.uint8)
    return converted.view(torch.float8_e4m3fnuz)


def packed_columns(in_features: int, num_bits: int) -> int:
    """int32 words per row needed for ``in_features`` values of ``num_bits`` bits."""
    return -(-in_features * num_bits // 32)


def _require_little_endian() -> None:
    # Packing works through byte views of int32 words, which assumes little-endian words.
    if sys.byteorder != "little":
        raise RuntimeError("qconvert's int32 packing needs a little-endian host")


def pack_int32(codes: torch.Tensor, num_bits: int, reuse: bool = False) -> torch.Tensor:
    """Pack signed ``codes`` ``[out, in]`` (int8 storage) into int32 words along ``in``.

    Each value is offset by ``2**(b-1)`` to make it unsigned; value ``j`` of a word occupies bits
    ``[j*b, j*b + b)``, least significant first; the row is zero-padded to a whole word. Only 4 and 8
    bits are supported: both map onto whole bytes, so packing is a byte view, not bit arithmetic.
    ``reuse``: the words in the calling thread's buffers, valid until its next call (banded quantizers).
    """
    if num_bits not in (4, 8):
        raise ValueError(f"packing supports 4 or 8 bits, not {num_bits}")
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise ValueError("pack_int32 expects a 2-D int8 tensor of codes")
    _require_little_endian()
    rows, cols = codes.shape
    per_word = 32 // num_bits
    padded = packed_columns(cols, num_bits) * per_word
    if padded != cols:
        # Padding holds the stored (offset) value 0, as the reference packer pads after offsetting.
        unsigned = torch.zeros(rows, padded, dtype=torch.uint8, device=codes.device)
        unsigned[:, :cols] = _offset_codes(codes, num_bits)
    else:
        unsigned = _offset_codes(codes, num_bits, _new_or_reused(reuse, "offset", (rows, cols), torch.uint8,
                                                                 codes.device))
    if num_bits == 4:
        # Two nibbles per byte: read byte pairs as little-endian int16 `lo | hi << 8` and fold the
        # high byte down by 4 bits; the low byte of the result is `lo | hi << 4`.
        pairs = unsigned.view(torch.int16)
        folded = torch.bitwise_right_shift(
            pairs, 4, out=_new_or_reused(reuse, "folded", tuple(pairs.shape), torch.int16, codes.device))
        folded.bitwise_or_(pairs)
        unsigned = _new_or_reused(reuse, "nibbles", tuple(pairs.shape), torch.uint8, codes.device).copy_(folded)
    return unsigned.view(torch.int32)


def _offset_codes(codes: torch.Tensor, num_bits: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """Signed codes + 2**(b-1), as uint8 (a new contiguous tensor, or ``out``)."""
    if out is None:
        out = torch.empty(codes.shape, dtype=torch.uint8, device=codes.device)
    if num_bits == 8:
        # q + 128 modulo 256 flips the sign bit of a two's-complement byte.
        return torch.bitwise_xor(codes.contiguous().view(torch.uint8), 0x80, out=out)
    return torch.add(codes, 8, out=out.view(torch.int8)).view(torch.uint8)


def quantize_and_pack_symmetric(
    weight: torch.Tensor, num_bits: int, group_size: int, choose: object = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(packed int32 [out, words], scales [out, groups])`` of a symmetric int quantization with one
    scale per ``group_size`` inputs (``-1``: per output channel).

    :func:`tile_scales` → :func:`quantize_tiles` → :func:`pack_int32` over blocks of rows, so each
    block's intermediates stay in cache and no full-size temporary exists (about 8x faster on CPU
    than whole-tensor passes, bit-identical). Groups never straddle rows (seed 003's defect).
    ``choose(block, tile, num_bits)`` picks a block's scales instead of amax / ((2**b - 1) / 2) (the search).
    """
    out_features, in_features = weight.shape
    tile = tile_shape(weight.shape, "channel" if group_size == -1 else "group", group_size)
    divisor = scale_divisor("int", num_bits)
    scales = torch.empty(out_features, in_features // tile[1], dtype=weight.dtype, device=weight.device)
    packed = torch.empty(
        out_features, packed_columns(in_features, num_bits), dtype=torch.int32, device=weight.device
    )
    rows = max(1, band_elements(weight, 1 << 19) // max(1, in_features))
    shared = _shared_tile_amax(weight, tile)

    def band(start: int) -> None:
        block = weight[start : start + rows]
        if choose is not None:
            block_scales = choose(block, tile, num_bits)  # type: ignore[operator]
        elif shared is None:
            block_scales = tile_scales(block, tile, divisor)
        else:
            block_scales = scales_from_amax(shared[start : start + rows], divisor, weight.dtype)
        scales[start : start + rows] = block_scales
        codes = quantize_tiles(block, block_scales, tile, "int", num_bits, reuse=True)
        packed[start : start + rows] = pack_int32(codes, num_bits, reuse=True)

    run_bands(band, range(0, out_features, rows), weight.device, threaded=choose is not None)  # threads: search
    return packed, scales



def asymmetric_qparams(mins: torch.Tensor, maxs: torch.Tensor, num_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scales, zero points int8)`` of groups with these min and max values, as compressed-tensors computes them
    (``calculate_qparams``, asymmetric int), every step in the weight's dtype:

    * the range is widened to include 0; ``scale = (max - min) / (2**b - 1)``;
    * ``zero = clamp(qmin - min / scale, qmin, qmax)`` rounded half to even; a zero scale becomes the dtype's eps
      *after* the zero point is taken, so an all-zero group's zero point is 0/0, which the reference casts to
      int8 0 on the CPU: we write 0 on every device (any zero point rebuilds that group's zeros exactly).
    """
    dtype, device = mins.dtype, mins.device
    qmin, qmax = int_range(num_bits)
    zero = torch.zeros((), dtype=dtype, device=device)
    mins, maxs = torch.minimum(mins, zero), torch.maximum(maxs, zero)
    # 0-d tensors on the weight's device: a true division on every device (see scales_from_amax).
    span = torch.tensor(float(qmax - qmin), dtype=dtype, device=device)
    scales = (maxs - mins) / span
    low = torch.tensor(float(qmin), dtype=dtype, device=device)
    zero_points = torch.clamp(low - mins / scales, low, torch.tensor(float(qmax), dtype=dtype, device=device))
    scales = scales.masked_fill_(scales == 0, torch.finfo(dtype).eps)
    zero_points = zero_points.nan_to_num_(nan=0.0).round_().to(torch.int8)
    return scales, zero_points


def quantize_asymmetric(groups: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor,
                        num_bits: int, reuse: bool = False) -> torch.Tensor:
    """int8 codes of ``groups`` ``[..., G, g]`` for per-group ``scales`` and int8 ``zero_points`` ``[..., G]``:
    ``clamp(x / scale + zero, qmin, qmax)`` rounded half to even, the division and the addition in the
    weight's dtype (compressed-tensors' ``quantize``). ``reuse``: in the calling thread's buffers, valid until
    its next call (banded quantizers)."""
    qmin, qmax = int_range(num_bits)
    shape = tuple(groups.shape)
    q = torch.div(groups, scales.unsqueeze(-1), out=_new_or_reused(reuse, "quotient", shape, groups.dtype,
                                                                    groups.device))
    q += zero_points.unsqueeze(-1).to(groups.dtype)
    return _new_or_reused(reuse, "codes", shape, torch.int8, groups.device).copy_(q.clamp_(qmin, qmax).round_())


def dequantize_asymmetric(codes: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor) -> torch.Tensor:
    """``(code - zero) * scale`` per group ``[..., G, g]``, in the scale dtype (compressed-tensors' ``dequantize``:
    the difference is an exact integer, so only the product rounds)."""
    dtype = scales.dtype
    return (codes.to(dtype) - zero_points.unsqueeze(-1).to(dtype)) * scales.unsqueeze(-1)


def pack_zero_points(zero_points: torch.Tensor, num_bits: int) -> torch.Tensor:
    """int8 zero points ``[out, groups]`` → int32 ``[ceil(out * b / 32), groups]``: packed along the *output*
    dimension (compressed-tensors' ``pack_to_int32(zp, b, packed_dim=0)``), offset and padded as weights are."""
    return pack_int32(_transposed(zero_points), num_bits).t().contiguous()


def _transposed(matrix: torch.Tensor) -> torch.Tensor:
    """A fresh row-major copy of ``matrix.t()``: ``.t().contiguous()`` of a one-column matrix returns the same
    storage with a stride of 1 on its single row, which byte views along the row refuse."""
    return torch.empty(matrix.shape[1], matrix.shape[0], dtype=matrix.dtype, device=matrix.device).copy_(matrix.t())


def unpack_zero_points(packed: torch.Tensor, num_bits: int, out_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_zero_points`: int32 ``[words, groups]`` → int8 ``[out, groups]``."""
    return unpack_int32(_transposed(packed), num_bits, out_features).t().contiguous()


def quantize_and_pack_asymmetric(
    weight: torch.Tensor, num_bits: int, group_size: int, choose: object = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(packed int32 [out, words], scales [out, groups], packed zero points)`` of an asymmetric int
    quantization with one scale and zero point per ``group_size`` inputs (``-1``: per output channel), over
    bands of rows. ``choose(groups, mins, maxs, num_bits)`` picks each group's ``(scales, zero points)``;
    None: min/max round-to-nearest (:func:`asymmetric_qparams`), compressed-tensors' bytes.
    """
    out_features, in_features = weight.shape
    group = in_features if group_size == -1 else group_size
    if in_features % group:
        raise ValueError(f"input size {in_features} is not a multiple of the group size {group}")
    scales = torch.empty(out_features, in_features // group, dtype=weight.dtype, device=weight.device)
    zeros = torch.empty(out_features, in_features // group, dtype=torch.int8, device=weight.device)
    packed = torch.empty(
        out_features, packed_columns(in_features, num_bits), dtype=torch.int32, device=weight.device
    )
    rows = max(1, band_elements(weight, 1 << 19) // max(1, in_features))

    def one_band(start: int) -> None:
        band = weight[start : start + rows]
        groups = band.reshape(band.shape[0], in_features // group, group)
        mins, maxs = groups.amin(dim=-1), groups.amax(dim=-1)
        if choose is None:
            band_scales, band_zeros = asymmetric_qparams(mins, maxs, num_bits)
        else:
            band_scales, band_zeros = choose(groups, mins, maxs, num_bits)  # type: ignore[operator]
        scales[start : start + rows] = band_scales
        zeros[start : start + rows] = band_zeros
        codes = quantize_asymmetric(groups, band_scales, band_zeros, num_bits, reuse=True).reshape(band.shape)
        packed[start : start + rows] = pack_int32(codes, num_bits, reuse=True)

    run_bands(one_band, range(0, out_features, rows), weight.device, threaded=choose is not None)  # threads: search
    return packed, scales, pack_zero_points(zeros, num_bits)


def unpack_int32(packed: torch.Tensor, num_bits: int, in_features: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words ``[out, words]`` → signed codes ``[out, in]`` int8."""
    if num_bits not in (4, 8):
        raise ValueError(f"unpacking supports 4 or 8 bits, not {num_bits}")
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError("unpack_int32 expects a 2-D int32 tensor")
    if packed.shape[1] != packed_columns(in_features, num_bits):
        raise ValueError(
            f"{packed.shape[1]} words per row cannot hold exactly {in_features} {num_bits}-bit values"
        )
    _require_little_endian()
    raw = packed.contiguous().view(torch.uint8)
    if num_bits == 4:
        raw = torch.stack((raw & 0xF, raw >> 4), dim=-1).flatten(start_dim=1)
    values = raw[:, :in_features].to(torch.int16) - (1 << (num_bits - 1))
    return values.to(torch.int8)


# Activations are quantized at run time by the serving kernels, which map amax onto 127 (not 127.5 as
# the weight quantizers do) so that codes stay symmetric in [-127, 127], as vLLM's and SGLang's
# per-token(-group) int8 quantizers do.
ACTIVATION_INT8_DIVISOR = 127.0


def quantize_activation_groups(x: torch.Tensor, group_size: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric quantization of activations ``[..., K]``, one float32 scale per row per
    ``group_size`` channels (``group_size >= K``: one per row, i.e. per token).

    float32 throughout: ``scale = amax / 127`` (int8) or ``amax / 448`` (fp8), a zero scale replaced by
    float32's eps; ``q = round_half_even(clamp(x / scale))`` or the e4m3fn cast of the clamped
    quotient. The last group of a row may be short (K not a multiple of the group). This is the
    reference the Triton kernel in ``qconvert.kernels`` must match bit for bit.
    """
    k = x.shape[-1]
    group_size = min(group_size, k)
    rows = x.reshape(-1, k).to(torch.float32)
    groups = -(-k // group_size)
    padded = torch.nn.functional.pad(rows, (0, groups * group_size - k)).reshape(rows.shape[0], groups, group_size)
    divisor = FP8_E4M3_MAX if kind == "float" else ACTIVATION_INT8_DIVISOR
    scales = padded.abs().amax(dim=2) / divisor
    scales = scales.masked_fill_(scales == 0, torch.finfo(torch.float32).eps)
    q = padded / scales.unsqueeze(2)
    if kind == "float":
        values = q.clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    else:
        values = q.clamp_(-128, 127).round_().to(torch.int8)
    values = values.reshape(rows.shape[0], groups * group_size)[:, :k].reshape(x.shape)
    return values, scales.reshape(*x.shape[:-1], groups)


def dequantize_activation_groups(values: torch.Tensor, scales: torch.Tensor, group_size: int,
                                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``values * scale`` in float32 per row and group (see :func:`quantize_activation_groups`), as ``dtype``."""
    k = values.shape[-1]
    expanded = scales.to(torch.float32).repeat_interleave(min(group_size, k), dim=-1)[..., :k]
    return (values.to(torch.float32) * expanded).to(dtype)


def fake_quant_static_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor int8 quantize-dequantize in ``x``'s dtype (the wNa8o8 scheme's activation
    arithmetic): ``clamp(round(x / s), -128, 127) * s`` with ``s`` cast to ``x``'s dtype first."""
    scale = scale.to(x.dtype)
    return torch.clamp(torch.round(x / scale), -128, 127) * scale
