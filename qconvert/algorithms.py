"""How each group's scale (and zero point) is chosen: the algorithm axis, independent of the on-disk format.

``rtn`` (the default) takes the min/max (amax) scale and rounds to nearest: the reference tools' bytes. ``search``
tries a small fixed grid of candidates per group and keeps the one whose *stored* reconstruction (dequantized exactly
as the reader does it, in the weight's dtype) is closest to the weight in squared error:

* symmetric int (rtn4, rtn8): the scale of ``amax * f`` for ``f`` in :data:`SYMMETRIC_SHRINK`;
* asymmetric int (int4-asym, int8-asym): scale and integer zero point of ``(min * a, max * b)`` for the pairs of
  :data:`ASYMMETRIC_SHRINK` (a joint grid over scale and zero: shrinking one end more than the other moves the
  zero point);
* NVFP4: "four over six": each 16-block's amax mapped to 6 (RTN) or to 4, whichever reconstructs the block better.

The RTN candidate is always the first, and a later candidate replaces the current best only when its error is
strictly smaller, so no group's objective ever exceeds RTN's (by construction, not by tuning), and a layer whose
groups all keep RTN's choice is byte-identical to ``rtn``. The output layout is RTN's: every engine that loads a
scheme's RTN output loads its search output.

Device independence: every candidate's codes come from the same element-wise arithmetic as RTN (correctly rounded
on CPU and CUDA alike), and a group's error is summed in float32 by a fixed pairwise tree (``_Workspace.error``), not
by ``sum()``, whose reduction order differs between devices. The squared differences are of values with 8- to
24-bit significands, exact or correctly rounded; so CPU and CUDA pick the same candidate for every group.

Cost: one quantize-dequantize-compare pass (about ten element-wise operations) over the weight per candidate (5 per
group for int, RTN's included; 2 for NVFP4), on bands of rows so that memory stays a few float32 copies of a band;
cost grows linearly with the number of candidates. The grids are fixed a priori, picked on Gaussian and Student-t
weights for their share of the full 6x6 grid's gain (not on any quality figure they are reported with): int4 shrinks
by 5-20%, int8 by 0.5-3% (the same clipping measured in quantization steps).
"""

from __future__ import annotations

import torch

from qconvert.errors import BadInputError
from qconvert.formats.args import Algorithm, NumberType, QuantArgs
from qconvert.quantizers import asymmetric_qparams, int_range, scale_divisor, scales_from_amax

__all__ = ["ALGORITHMS", "applies_to", "group_sse", "parse_algorithm", "search_asymmetric",
           "search_nvfp4_scales", "search_symmetric"]

ALGORITHMS = tuple(a.value for a in Algorithm)

# Per bit width, the candidates after RTN's (amax factors; (min, max) factor pairs).
SYMMETRIC_SHRINK = {4: (0.95, 0.9, 0.85, 0.8), 8: (0.995, 0.99, 0.98, 0.97)}
ASYMMETRIC_SHRINK = {4: ((0.9, 0.9), (0.8, 0.8), (1.0, 0.85), (0.85, 1.0)),
                     8: ((0.99, 0.99), (0.98, 0.98), (1.0, 0.985), (0.985, 1.0))}
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
    """``[..., G]`` float32 sum of squared differences over the last dimension, by a fixed pairwise tree (see
    :func:`_tree_sum`), so the result is the same on every device."""
    diff = rebuilt.to(torch.float32) - original.to(torch.float32)
    return _tree_sum((diff * diff).movedim(-1, 0).contiguous())


def _tree_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over dimension 0 by halves added element-wise (zero-padded to a power of two): a fixed order, unlike
    ``sum()``, whose reduction order differs between devices; contiguous halves keep every add vectorised."""
    width = values.shape[0]
    full = 1 << max(0, width - 1).bit_length()
    if full != width:
        values = torch.cat([values, values.new_zeros(full - width, *values.shape[1:])])
    while values.shape[0] > 1:
        half = values.shape[0] // 2
        values = values[:half] + values[half:]
    return values[0]


class _Workspace:
    """A band's groups, group-major (``[g, R, G]``: a group's elements along the leading dimension, so per-group
    scales broadcast over it and the tree sum adds contiguous halves), its float32 copy, and the buffers every
    candidate reuses (no allocation, so no page faults, per candidate)."""

    def __init__(self, groups: torch.Tensor) -> None:
        self.major = groups.permute(2, 0, 1).contiguous()
        self.wide = self.major.to(torch.float32)
        self.codes = torch.empty_like(self.major)
        width = self.major.shape[0]
        self.width = width
        self.diff = self.wide.new_zeros(1 << max(0, width - 1).bit_length(), *self.major.shape[1:])

    def error(self, rebuilt: torch.Tensor) -> torch.Tensor:
        """Per group float32 squared error of ``rebuilt`` (group-major) against the original, summed by halves
        added element-wise (a fixed order, unlike ``sum()``, whose reduction order differs between devices)."""
        diff = self.diff
        diff[: self.width].copy_(rebuilt).sub_(self.wide).square_()
        rows = diff.shape[0]
        while rows > 1:
            rows //= 2
            diff[:rows].add_(diff[rows : 2 * rows])
        # The zero tail past the group (up to a power of two) is never written: every half written is a leading
        # one, which the tail (in the upper half) is not part of.
        return diff[0].clone()


def _keep_better(err: torch.Tensor, best_err: torch.Tensor, *pairs: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The candidate replaces the best only where its error is strictly smaller (ties keep the earlier, RTN first)."""
    better = err < best_err
    return torch.where(better, err, best_err), [_where(better, cand, best) for cand, best in pairs]


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):  # select the bytes: not every device's where
        return torch.where(mask, a.view(torch.uint8), b.view(torch.uint8)).view(a.dtype)  # takes float8
    return torch.where(mask, a, b)


def _symmetric_error(work: _Workspace, scales: torch.Tensor, num_bits: int) -> torch.Tensor:
    # quantize_tiles' arithmetic (division in the weight dtype, clamp, round half to even), then the reader's
    # rebuild (code * scale in the scale dtype).
    qmin, qmax = int_range(num_bits)
    codes = torch.div(work.major, scales, out=work.codes).clamp_(qmin, qmax).round_()
    return work.error(codes.mul_(scales))


def search_symmetric(block: torch.Tensor, tile: tuple[int, int], num_bits: int) -> torch.Tensor:
    """``[rows, groups]`` scales of a band of rows (tiles of one row: a group or a whole channel) chosen among
    ``amax * f`` for ``f`` in :data:`SYMMETRIC_SHRINK` (1.0, RTN's, first)."""
    rows, in_features = block.shape
    groups = block.reshape(rows, in_features // tile[1], tile[1])
    amax = groups.abs().amax(dim=-1)
    work = _Workspace(groups)
    divisor = scale_divisor("int", num_bits)
    best = scales_from_amax(amax, divisor, block.dtype)
    best_err = _symmetric_error(work, best, num_bits)
    wide_amax = amax.to(torch.float32)
    for factor in SYMMETRIC_SHRINK[num_bits]:
        shrunk = wide_amax * torch.tensor(factor, dtype=torch.float32, device=wide_amax.device)
        scales = scales_from_amax(shrunk, divisor, block.dtype)
        best_err, (best,) = _keep_better(_symmetric_error(work, scales, num_bits), best_err, (scales, best))
    return best


def _asymmetric_error(work: _Workspace, scales: torch.Tensor, zeros: torch.Tensor, num_bits: int) -> torch.Tensor:
    # quantize_asymmetric then dequantize_asymmetric, kept in the weight dtype (codes are integers, exact there).
    qmin, qmax = int_range(num_bits)
    shift = zeros.to(work.major.dtype)
    codes = torch.div(work.major, scales, out=work.codes).add_(shift).clamp_(qmin, qmax).round_()
    return work.error(codes.sub_(shift).mul_(scales))


def search_asymmetric(groups: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor, num_bits: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scales, int8 zero points)`` of groups ``[rows, G, g]`` chosen among the asymmetric min/max parameters of
    ``(min * a, max * b)`` for the pairs of :data:`ASYMMETRIC_SHRINK` (after (1, 1), RTN's, first)."""
    work = _Workspace(groups)
    best_scales, best_zeros = asymmetric_qparams(mins, maxs, num_bits)
    best_err = _asymmetric_error(work, best_scales, best_zeros, num_bits)
    low, high = mins.to(torch.float32), maxs.to(torch.float32)
    for a, b in ASYMMETRIC_SHRINK[num_bits]:
        fa = torch.tensor(a, dtype=torch.float32, device=low.device)
        fb = torch.tensor(b, dtype=torch.float32, device=low.device)
        scales, zeros = asymmetric_qparams((low * fa).to(mins.dtype), (high * fb).to(maxs.dtype), num_bits)
        err = _asymmetric_error(work, scales, zeros, num_bits)
        best_err, (best_scales, best_zeros) = _keep_better(err, best_err, (scales, best_scales), (zeros, best_zeros))
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
