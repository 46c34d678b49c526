"""How each group's scale (and zero point) is chosen: the algorithm axis, independent of the on-disk format.

``rtn`` (the default) takes the min/max (amax) scale and rounds to nearest: the reference tools' bytes. ``search``
tries a small fixed grid of candidates per group and keeps the one whose *stored* reconstruction (dequantized exactly
as the reader does it, in the weight's dtype) is closest to the weight in squared error:

* symmetric int (rtn4, rtn8): the scale of ``amax * f`` for ``f`` in :data:`SYMMETRIC_SHRINK`;
* asymmetric int (int4-asym, int8-asym): scale and integer zero point of ``(min * a, max * b)`` for every pair of
  :data:`ASYMMETRIC_SHRINK` (a joint grid over scale and zero: shrinking one end moves the zero point);
* NVFP4: "four over six": each 16-block's amax mapped to 6 (RTN) or to 4, whichever reconstructs the block better.

The RTN candidate is always the first, and a later candidate replaces the current best only when its error is
strictly smaller, so no group's objective ever exceeds RTN's (by construction, not by tuning), and a layer whose
groups all keep RTN's choice is byte-identical to ``rtn``. The output layout is RTN's: every engine that loads a
scheme's RTN output loads its search output.

Device independence: every candidate's codes come from the same element-wise arithmetic as RTN (correctly rounded
on CPU and CUDA alike), and a group's error is summed in float32 by a fixed pairwise tree (:func:`group_sse`), not
by ``sum()``, whose reduction order differs between devices. The squared differences are of values with 8- to
24-bit significands, exact or correctly rounded; so CPU and CUDA pick the same candidate for every group.

Cost: one quantize-dequantize-compare pass over the weight per candidate (5 symmetric, 9 asymmetric, 2 NVFP4),
on bands of rows so memory stays a few float32 copies of a band; cost grows linearly with the grid.
"""

from __future__ import annotations

import torch

from qconvert.errors import BadInputError
from qconvert.formats.args import Algorithm, NumberType, QuantArgs
from qconvert.quantizers import asymmetric_qparams, int_range, scale_divisor, scales_from_amax

__all__ = ["ALGORITHMS", "applies_to", "group_sse", "parse_algorithm", "search_asymmetric",
           "search_nvfp4_scales", "search_symmetric"]

ALGORITHMS = tuple(a.value for a in Algorithm)

# Fixed a priori (not tuned on any quality figure): the usual clipping range of data-free scale searches.
SYMMETRIC_SHRINK = (1.0, 0.95, 0.9, 0.85, 0.8)
ASYMMETRIC_SHRINK = (1.0, 0.9, 0.8)
NVFP4_TARGETS = (6.0, 4.0)  # what a block's amax maps to: E2M1's largest value (RTN), or 4


def parse_algorithm(name: str) -> Algorithm:
    try:
        return Algorithm(name.strip())
    except ValueError:
        raise BadInputError(f"unknown algorithm {name!r} (choose from: {', '.join(ALGORITHMS)})") from None


def applies_to(args: QuantArgs, format_name: str) -> bool:
    """Whether ``search`` has candidates for this format: pack-quantized int (symmetric or not) and NVFP4."""
    if format_name == "pack-quantized":
        return args.number is NumberType.INT
    return format_name == "nvfp4-pack-quantized"


def group_sse(rebuilt: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """``[..., G]`` float32 sum of squared differences over the last dimension, by a fixed pairwise tree (halves
    added element-wise, zero-padded to a power of two), so the result is the same on every device."""
    diff = rebuilt.to(torch.float32) - original.to(torch.float32)
    squares = diff * diff
    width = squares.shape[-1]
    full = 1 << max(0, width - 1).bit_length()
    if full != width:
        squares = torch.nn.functional.pad(squares, (0, full - width))
    while squares.shape[-1] > 1:
        half = squares.shape[-1] // 2
        squares = squares[..., :half] + squares[..., half:]
    return squares[..., 0]


def _keep_better(err: torch.Tensor, best_err: torch.Tensor, *pairs: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The candidate replaces the best only where its error is strictly smaller (ties keep the earlier, RTN first)."""
    better = err < best_err
    return torch.where(better, err, best_err), [torch.where(better, cand, best) for cand, best in pairs]


def _symmetric_error(groups: torch.Tensor, scales: torch.Tensor, num_bits: int) -> torch.Tensor:
    # quantize_tiles' arithmetic (division in the weight dtype, clamp, round half to even), then the reader's
    # rebuild (code * scale in the scale dtype).
    qmin, qmax = int_range(num_bits)
    expanded = scales.unsqueeze(-1)
    codes = torch.div(groups, expanded).clamp_(qmin, qmax).round_()
    return group_sse(codes * expanded, groups)


def search_symmetric(block: torch.Tensor, tile: tuple[int, int], num_bits: int) -> torch.Tensor:
    """``[rows, groups]`` scales of a band of rows (tiles of one row: a group or a whole channel) chosen among
    ``amax * f`` for ``f`` in :data:`SYMMETRIC_SHRINK` (1.0, RTN's, first)."""
    rows, in_features = block.shape
    groups = block.reshape(rows, in_features // tile[1], tile[1])
    amax = groups.abs().amax(dim=-1)
    divisor = scale_divisor("int", num_bits)
    best = scales_from_amax(amax, divisor, block.dtype)
    best_err = _symmetric_error(groups, best, num_bits)
    wide = amax.to(torch.float32)
    for factor in SYMMETRIC_SHRINK[1:]:
        scales = scales_from_amax(wide * torch.tensor(factor, dtype=torch.float32, device=wide.device), divisor,
                                  block.dtype)
        best_err, (best,) = _keep_better(_symmetric_error(groups, scales, num_bits), best_err, (scales, best))
    return best


def _asymmetric_error(groups: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, num_bits: int
                      ) -> torch.Tensor:
    # quantize_asymmetric then dequantize_asymmetric, kept in the weight dtype (codes are integers, exact there).
    qmin, qmax = int_range(num_bits)
    expanded, shift = scales.unsqueeze(-1), zeros.unsqueeze(-1).to(groups.dtype)
    codes = torch.div(groups, expanded)
    codes += shift
    codes = codes.clamp_(qmin, qmax).round_()
    return group_sse((codes - shift) * expanded, groups)


def search_asymmetric(groups: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor, num_bits: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scales, int8 zero points)`` of groups ``[rows, G, g]`` chosen among the asymmetric min/max parameters of
    ``(min * a, max * b)`` for every pair of :data:`ASYMMETRIC_SHRINK` ((1, 1), RTN's, first)."""
    best_scales, best_zeros = asymmetric_qparams(mins, maxs, num_bits)
    best_err = _asymmetric_error(groups, best_scales, best_zeros, num_bits)
    low, high = mins.to(torch.float32), maxs.to(torch.float32)
    for a in ASYMMETRIC_SHRINK:
        for b in ASYMMETRIC_SHRINK:
            if a == b == 1.0:
                continue
            fa = torch.tensor(a, dtype=torch.float32, device=low.device)
            fb = torch.tensor(b, dtype=torch.float32, device=low.device)
            scales, zeros = asymmetric_qparams((low * fa).to(mins.dtype), (high * fb).to(maxs.dtype), num_bits)
            err = _asymmetric_error(groups, scales, zeros, num_bits)
            best_err, (best_scales, best_zeros) = _keep_better(err, best_err, (scales, best_scales),
                                                               (zeros, best_zeros))
    return best_scales, best_zeros


def search_nvfp4_scales(blocks: torch.Tensor, amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """e4m3 scales ``[rows, blocks]`` of 16-input ``blocks`` ``[rows, blocks, 16]``: each block's amax mapped to 6
    (RTN) or to 4 (:data:`NVFP4_TARGETS`), whichever rebuilds the block better (as compressed-tensors rebuilds it:
    the E2M1 value times the float32 multiplier ``scale / global``, cast to the weight dtype)."""
    from qconvert.microscaling import e2m1_codes, e2m1_values, nvfp4_block_scales

    def error(scales: torch.Tensor) -> torch.Tensor:
        multiplier = (scales.to(torch.float32) / global_scale).unsqueeze(-1)
        values = e2m1_values(e2m1_codes(blocks / multiplier))
        return group_sse((values * multiplier).to(blocks.dtype), blocks)

    best = nvfp4_block_scales(amax, global_scale)
    best_err = error(best)
    for target in NVFP4_TARGETS[1:]:
        scales = nvfp4_block_scales(amax, global_scale, target)
        best_err, (best,) = _keep_better(error(scales), best_err, (scales, best))
    return best
