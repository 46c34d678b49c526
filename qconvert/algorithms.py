"""How each group's scale (and zero point) is chosen: the algorithm axis, independent of the on-disk format.

``rtn`` (the default) takes the min/max (amax) scale and rounds to nearest: the reference tools' bytes. ``search``
minimises, per group, the squared error of the *stored* reconstruction (dequantized exactly as the reader does it,
in the weight's dtype) against the weight, in two stages. First a small fixed grid of candidates:

* symmetric int (rtn4, rtn8): the scale of ``amax * f`` for ``f`` in :data:`SYMMETRIC_SHRINK`;
* asymmetric int (int4-asym, int8-asym): scale and integer zero point of ``(min * a, max * b)`` for the pairs of
  :data:`ASYMMETRIC_SHRINK` (a joint grid over scale and zero: shrinking one end more than the other moves the
  zero point);
* NVFP4: "four over six": each 16-block's amax mapped to 6 (RTN) or to 4, whichever reconstructs the block better.

Then a few least-squares refits of the best candidate (:data:`REFITS` for int, :data:`NVFP4_REFITS` for NVFP4),
alternating minimisation as in HQQ but with the zero point an integer, as the format stores it: with the group's
codes held fixed, the reconstruction is linear in the parameters, so the best ones have a closed form: the scale
``sum(w q) / sum(q q)`` (symmetric; NVFP4: its multiplier, from the E2M1 values); asymmetric: the least-squares line
of ``w`` on ``q``, whose zero crossing rounded to an integer in range is the zero point, then the scale optimal for
that integer zero, ``sum(w (q - z)) / sum((q - z)^2)``. The refit is rounded to what is stored (the scale in its
dtype, e4m3 for NVFP4), the group re-quantized with it (round to nearest: the best codes for those parameters), and
kept only where that is strictly better; the next refit starts from the best so far.

The RTN candidate is always the first, and a later candidate (grid or refit) replaces the current best only when its
error is strictly smaller, so no group's objective ever exceeds RTN's (by construction, not by tuning), and a layer
whose groups all keep RTN's choice is byte-identical to ``rtn``. The output layout is RTN's: every engine that loads
a scheme's RTN output loads its search output.

Device independence: every candidate's codes come from the same element-wise arithmetic as RTN (correctly rounded
on CPU and CUDA alike); a group's error, and each sum a refit needs, is summed in float32 by a fixed pairwise tree
(``_Workspace``, :func:`_tree_sum`), not by ``sum()``, whose reduction order differs between devices; the refit's
closed forms are element-wise float32 operations on those sums (true divisions by tensors, no fused operations). So
CPU and CUDA pick the same candidate for every group.

How the settings were chosen (``python benchmarks/search_design.py``; synthetic Gaussian and Student-t weights, bf16
and float32, never a quality figure they are reported with): the grids for their share of a full 6x6 grid's gain
(int4 shrinks by 5-20%, int8 by 0.5-3%: the same clipping measured in quantization steps). The refits: one refit
gets 70-74% (mean over those weights) of what six get, two get 85-92% (int4 objective as a share of RTN's, Gaussian
bf16: grid 0.838, + 2 refits 0.831; int4-asym 0.906 -> 0.895; float32 int8 0.965 -> 0.948), so two is the default;
NVFP4's coarse e4m3 scales settle after one (four over six 0.838 -> 0.806, Gaussian; a second refit changes nothing
measurable). A dense grid (32 factors; 11 x 11 pairs) gets somewhat further for int4 (int4-asym, Gaussian bf16:
0.888 against 0.895) at 2.5-8 times the cost of grid + 2 refits. For bf16 int8 the refits gain little (a bf16 scale
moves in steps as large as int8's grid), where a dense grid of zero points still gains (int8-asym 0.979 -> 0.949):
left for later.

Cost: one quantize-dequantize-compare pass (about ten element-wise operations) over the weight per candidate (5 per
group for int, RTN's included; 2 for NVFP4), and per refit about two more (the codes, two or three tree sums, the
re-quantization), on bands of rows so that memory stays a few float32 copies of a band; cost grows linearly with
the number of candidates and refits. Measured on one CPU thread (a bf16 2048 x 5632 matrix, quantization alone):
rtn4 3 ns per parameter, its search 17 (grid) -> 24-28 (grid + 2 refits); int4-asym 4, search 23.5 -> 37-40.
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
REFITS = 2  # least-squares refits after the grid, int schemes (module docstring: why 2)
NVFP4_REFITS = 1  # and NVFP4 (e4m3 scales: a second refit changes nothing measurable)
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
        """Per group float32 squared error of ``rebuilt`` (group-major) against the original."""
        self.diff[: self.width].copy_(rebuilt).sub_(self.wide).square_()
        return self._reduce()

    def dot(self, values: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        """Per group float32 sum of ``values * other`` (group-major; ``other`` None: of ``values``); each product
        is one correctly rounded float32 multiplication."""
        head = self.diff[: self.width].copy_(values)
        if other is not None:
            head.mul_(other)
        return self._reduce()

    def _reduce(self) -> torch.Tensor:
        """The leading ``width`` rows summed by halves added element-wise (a fixed order, unlike ``sum()``, whose
        reduction order differs between devices)."""
        diff = self.diff
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


def _symmetric_codes(work: _Workspace, scales: torch.Tensor, num_bits: int) -> torch.Tensor:
    # quantize_tiles' arithmetic: division in the weight dtype, clamp, round half to even.
    qmin, qmax = int_range(num_bits)
    return torch.div(work.major, scales, out=work.codes).clamp_(qmin, qmax).round_()


def _symmetric_error(work: _Workspace, scales: torch.Tensor, num_bits: int) -> torch.Tensor:
    # The codes, then the reader's rebuild (code * scale in the scale dtype).
    return work.error(_symmetric_codes(work, scales, num_bits).mul_(scales))


def _refit_symmetric(work: _Workspace, scales: torch.Tensor, num_bits: int) -> torch.Tensor:
    """The scale that minimises each group's squared error with the codes of ``scales`` held fixed,
    ``sum(w q) / sum(q q)``, in the stored dtype (``scales`` kept where that is not a positive number)."""
    codes = _symmetric_codes(work, scales, num_bits)
    fitted = (work.dot(codes, work.wide) / work.dot(codes, codes)).to(scales.dtype)
    return torch.where(fitted.isfinite() & (fitted > 0), fitted, scales)


def search_symmetric(block: torch.Tensor, tile: tuple[int, int], num_bits: int, refits: int | None = None,
                     shrink: tuple[float, ...] | None = None) -> torch.Tensor:
    """``[rows, groups]`` scales of a band of rows (tiles of one row: a group or a whole channel) chosen among
    ``amax * f`` for ``f`` in :data:`SYMMETRIC_SHRINK` (1.0, RTN's, first), then :data:`REFITS` least-squares
    refits of the best (``refits``, ``shrink``: other settings, for benchmarks/search_design.py)."""
    rows, in_features = block.shape
    groups = block.reshape(rows, in_features // tile[1], tile[1])
    amax = groups.abs().amax(dim=-1)
    work = _Workspace(groups)
    divisor = scale_divisor("int", num_bits)
    best = scales_from_amax(amax, divisor, block.dtype)
    best_err = _symmetric_error(work, best, num_bits)
    wide_amax = amax.to(torch.float32)
    for factor in SYMMETRIC_SHRINK[num_bits] if shrink is None else shrink:
        shrunk = wide_amax * torch.tensor(factor, dtype=torch.float32, device=wide_amax.device)
        scales = scales_from_amax(shrunk, divisor, block.dtype)
        best_err, (best,) = _keep_better(_symmetric_error(work, scales, num_bits), best_err, (scales, best))
    for _ in range(REFITS if refits is None else refits):
        scales = _refit_symmetric(work, best, num_bits)
        best_err, (best,) = _keep_better(_symmetric_error(work, scales, num_bits), best_err, (scales, best))
    return best


def _asymmetric_codes(work: _Workspace, scales: torch.Tensor, shift: torch.Tensor, num_bits: int) -> torch.Tensor:
    # quantize_asymmetric's arithmetic in the weight dtype (``shift``: the zero points in that dtype).
    qmin, qmax = int_range(num_bits)
    return torch.div(work.major, scales, out=work.codes).add_(shift).clamp_(qmin, qmax).round_()


def _asymmetric_error(work: _Workspace, scales: torch.Tensor, zeros: torch.Tensor, num_bits: int) -> torch.Tensor:
    # quantize_asymmetric then dequantize_asymmetric, kept in the weight dtype (codes are integers, exact there).
    shift = zeros.to(work.major.dtype)
    return work.error(_asymmetric_codes(work, scales, shift, num_bits).sub_(shift).mul_(scales))


def _refit_asymmetric(work: _Workspace, scales: torch.Tensor, zeros: torch.Tensor, num_bits: int,
                      total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """With the codes ``q`` of ``(scales, zeros)`` held fixed: the least-squares line ``w ~ slope * q + offset``
    of each group, its zero point ``-offset / slope`` rounded to an integer in range, then the scale that is
    optimal for that integer zero, ``sum(w (q - z)) / sum((q - z)^2)``, in the stored dtype; ``(scales, zeros)``
    kept where the fit is degenerate (all codes equal) or not a positive scale. ``total``: each group's sum of w."""
    qmin, qmax = int_range(num_bits)
    codes = _asymmetric_codes(work, scales, zeros.to(work.major.dtype), num_bits)
    count = float(work.width)
    ones, squares, along = work.dot(codes), work.dot(codes, codes), work.dot(codes, work.wide)
    slope = (along * count - ones * total) / (squares * count - ones * ones)
    zero = ((slope * ones - total) / (slope * count)).round_().clamp_(qmin, qmax)
    fitted = ((along - zero * total) / (squares - zero * ones * 2 + zero * zero * count)).to(scales.dtype)
    valid = slope.isfinite() & (slope > 0) & zero.isfinite() & fitted.isfinite() & (fitted > 0)
    return torch.where(valid, fitted, scales), torch.where(valid, zero.nan_to_num(0.0).to(torch.int8), zeros)


def search_asymmetric(groups: torch.Tensor, mins: torch.Tensor, maxs: torch.Tensor, num_bits: int,
                      refits: int | None = None, shrink: tuple[tuple[float, float], ...] | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scales, int8 zero points)`` of groups ``[rows, G, g]`` chosen among the asymmetric min/max parameters of
    ``(min * a, max * b)`` for the pairs of :data:`ASYMMETRIC_SHRINK` (after (1, 1), RTN's, first), then
    :data:`REFITS` least-squares refits of the best (``refits``, ``shrink``: other settings, for
    benchmarks/search_design.py)."""
    work = _Workspace(groups)
    best_scales, best_zeros = asymmetric_qparams(mins, maxs, num_bits)
    best_err = _asymmetric_error(work, best_scales, best_zeros, num_bits)
    low, high = mins.to(torch.float32), maxs.to(torch.float32)
    for a, b in ASYMMETRIC_SHRINK[num_bits] if shrink is None else shrink:
        fa = torch.tensor(a, dtype=torch.float32, device=low.device)
        fb = torch.tensor(b, dtype=torch.float32, device=low.device)
        scales, zeros = asymmetric_qparams((low * fa).to(mins.dtype), (high * fb).to(maxs.dtype), num_bits)
        err = _asymmetric_error(work, scales, zeros, num_bits)
        best_err, (best_scales, best_zeros) = _keep_better(err, best_err, (scales, best_scales), (zeros, best_zeros))
    refits = REFITS if refits is None else refits
    total = work.dot(work.wide) if refits else None
    for _ in range(refits):
        scales, zeros = _refit_asymmetric(work, best_scales, best_zeros, num_bits, total)
        err = _asymmetric_error(work, scales, zeros, num_bits)
        best_err, (best_scales, best_zeros) = _keep_better(err, best_err, (scales, best_scales), (zeros, best_zeros))
    return best_scales, best_zeros


def search_nvfp4_scales(blocks: torch.Tensor, amax: torch.Tensor, global_scale: torch.Tensor,
                        refits: int | None = None) -> torch.Tensor:
    """e4m3 scales ``[rows, blocks]`` of 16-input ``blocks`` ``[rows, blocks, 16]``: each block's amax mapped to 6
    (RTN) or to 4 (:data:`NVFP4_TARGETS`), whichever rebuilds the block better (as compressed-tensors rebuilds it:
    the E2M1 value times the float32 multiplier ``scale / global``, cast to the weight dtype), then
    :data:`NVFP4_REFITS` least-squares refits of the best (``refits``: another count, for
    benchmarks/search_design.py)."""
    from qconvert.microscaling import FP8_E4M3_MAX, e2m1_codes, e2m1_values, nvfp4_block_scales

    def multiplier(scales: torch.Tensor) -> torch.Tensor:
        return (scales.to(torch.float32) / global_scale).unsqueeze(-1)

    def values(scales: torch.Tensor) -> torch.Tensor:
        return e2m1_values(e2m1_codes(blocks / multiplier(scales)))

    def error(scales: torch.Tensor) -> torch.Tensor:
        return group_sse((values(scales) * multiplier(scales)).to(blocks.dtype), blocks)

    best = nvfp4_block_scales(amax, global_scale)
    best_err = error(best)
    for target in NVFP4_TARGETS[1:]:
        scales = nvfp4_block_scales(amax, global_scale, target)
        best_err, (best,) = _keep_better(error(scales), best_err, (scales, best))
    wide = blocks.to(torch.float32)
    for _ in range(NVFP4_REFITS if refits is None else refits):
        # The multiplier that minimises the block's squared error with its E2M1 values v held fixed,
        # sum(w v) / sum(v v), times the global scale: the e4m3 scale it stands for, rounded as RTN's is.
        fixed = values(best)
        fitted = _tree_sum((fixed * wide).movedim(-1, 0).contiguous()) / _tree_sum(
            (fixed * fixed).movedim(-1, 0).contiguous())
        wanted = (fitted * global_scale).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
        usable = wanted.to(torch.float32) > 0  # also false for NaN (a block of zeros)
        scales = _where(usable, wanted, best)
        best_err, (best,) = _keep_better(error(scales), best_err, (scales, best))
    return best
