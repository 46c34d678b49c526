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

Device independence: every candidate's codes come from the same element-wise arithmetic as RTN (correctly rounded on
CPU and CUDA alike; for bf16 and float16 weights done as float32 operations, each result rounded to the weight's
dtype by a conversion, which gives the same values, see ``_round_to``); a group's error, and each sum a refit needs,
is summed in float32 by a fixed pairwise tree (``_Workspace``, :func:`_tree_sum`), not by ``sum()``, whose reduction
order differs between devices; the refit's closed forms are element-wise float32 operations on those sums (true
divisions by tensors, no fused operations). So CPU and CUDA pick the same candidate for every group.

How the settings were chosen (``python benchmarks/search_design.py``; synthetic Gaussian and Student-t weights, bf16
and float32, never a quality figure they are reported with): the grids for their share of a full 6x6 grid's gain
(int4 shrinks by 5-20%, int8 by 0.5-3%: the same clipping measured in quantization steps). The refits: one refit
gets 70-74% (mean over those weights) of what six get, two get 85-92% (int4 objective as a share of RTN's, Gaussian
bf16: grid 0.838, + 2 refits 0.831; int4-asym 0.906 -> 0.895; float32 int8 0.965 -> 0.948), so two is the default;
NVFP4's coarse e4m3 scales settle after one (four over six 0.838 -> 0.806, Gaussian; a second refit changes nothing
measurable). A dense grid (32 factors; 11 x 11 pairs) gets somewhat further for int4 (int4-asym, Gaussian bf16:
0.888 against 0.895) at 2.5-8 times the cost of grid + 2 refits. For bf16 int8 the refits gain little (a bf16 scale
moves in steps as large as int8's grid), where a dense grid of zero points still gains (int8-asym 0.979 -> 0.949):
left for later; its second refit changes nothing measurable (Student-t, 3 degrees of freedom: rtn8 grid 0.9716, one
refit 0.9694, two 0.9694; int8-asym 0.9844, 0.9830, 0.9830; Gaussian: 0.9434, 0.9433, 0.9433), so bf16 int8 takes
one (:data:`BF16_INT8_REFITS`).

Cost: one quantize-dequantize-compare pass (ten to fifteen element-wise operations) over the weight per candidate
(5 per group for int, RTN's included; 2 for NVFP4), and per refit about two more (the codes, two or three tree
sums, the re-quantization), on bands of rows so that memory stays a few float32 copies of a band; cost grows
linearly with the number of candidates and refits. A band also costs some three hundred (symmetric) to four hundred
and fifty (asymmetric) operator calls, which on two threads take about as long as its passes, so the grid's
parameters are computed at once and the tree's halves sliced once per band; on the CPU the bands run on threads of
their own (qconvert.band_threads). BENCHMARKS.md has the measurements.
"""

from __future__ import annotations

import torch

from qconvert.band_threads import thread_buffer
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
BF16_INT8_REFITS = 1  # but bf16 int8, where the second refit changes nothing measurable (module docstring)
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
    parameters broadcast over it and the tree sum adds contiguous halves) in float32 (float64 weights: float64),
    and the buffers every candidate reuses (no allocation, so no page faults, per candidate; on the CPU none per band
    either). Weights of a narrower dtype also get a buffer in that dtype, for the stored arithmetic's roundings."""

    def __init__(self, groups: torch.Tensor) -> None:
        width, *rest = groups.permute(2, 0, 1).shape
        shape, device = (width, *rest), groups.device
        self.dtype = groups.dtype
        # The arithmetic's dtype: float32, or float64 for float64 weights; for those two it is the stored arithmetic.
        self.compute = torch.float64 if groups.dtype == torch.float64 else torch.float32
        self.exact = groups.dtype == self.compute
        # Copied as the transpose of a [groups, width] matrix, which torch copies in tiles (a same-dtype 2-D
        # transpose): 1.1 ns per element on one CPU thread, against 1.9 for the same copy as a permuted 3-D view.
        rows_of_groups = groups.reshape(-1, width).t()
        self.wide = thread_buffer("wide", shape, self.compute, device)
        self.work = thread_buffer("work", shape, self.compute, device)
        if self.exact:
            self.wide.view(width, -1).copy_(rows_of_groups)
        else:
            self.narrow = thread_buffer("narrow", shape, groups.dtype, device)
            self.narrow.view(width, -1).copy_(rows_of_groups)  # transposed in the narrower dtype: fewer bytes
            self.wide.copy_(self.narrow)
        self.width = width
        full = 1 << max(0, width - 1).bit_length()
        diff = thread_buffer("diff", (full, *rest), self.compute, device)
        diff[width:].zero_()  # the tree sum's zero padding (up to a power of two)
        self.head = diff[:width]
        # The tree's halves, sliced once: a band sums some twenty trees, and each slice is an operator call.
        levels = (full >> k for k in range(1, full.bit_length()))
        self.halves = [(diff[:rows], diff[rows : 2 * rows]) for rows in levels]
        self.total = diff[0]

    def error(self, rebuilt: torch.Tensor) -> torch.Tensor:
        """Per group float32 squared error of ``rebuilt`` (group-major float32: a subtraction of mixed dtypes takes
        three times as long) against the original."""
        torch.sub(rebuilt, self.wide, out=self.head).square_()
        return self._reduce()

    def dot(self, values: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:
        """Per group float32 sum of ``values * other`` (group-major float32; ``other`` None: of ``values``); each
        product is one correctly rounded float32 multiplication."""
        if other is None:
            self.head.copy_(values)
        else:
            torch.mul(values, other, out=self.head)
        return self._reduce()

    def _reduce(self) -> torch.Tensor:
        """The leading ``width`` rows summed by halves added element-wise (a fixed order, unlike ``sum()``, whose
        reduction order differs between devices)."""
        for low, high in self.halves:
            low.add_(high)
        # The zero tail past the group (up to a power of two) is never written: every half written is a leading
        # one, which the tail (in the upper half) is not part of.
        return self.total.clone()


def _keep_better(err: torch.Tensor, best_err: torch.Tensor, *pairs: tuple[torch.Tensor, torch.Tensor]
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The candidate replaces the best only where its error is strictly smaller (ties keep the earlier, RTN first)."""
    better = err < best_err
    return torch.where(better, err, best_err), [_where(better, cand, best) for cand, best in pairs]


def _where(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):  # select the bytes: not every device's where
        return torch.where(mask, a.view(torch.uint8), b.view(torch.uint8)).view(a.dtype)  # takes float8
    return torch.where(mask, a, b)


_F32 = torch.float32

# The stored arithmetic (quantize_tiles / quantize_asymmetric, then the reader's rebuild) in float32 operations:
# for float32 weights operation for operation; for a narrower dtype (bf16, float16), where the stored arithmetic
# runs in that dtype, with each result rounded to it by a conversion, which the CPU runs at about twice the speed
# of the same operations in that dtype, with the same results: a float32 quotient or sum of two values of the
# dtype, rounded to it, is the correctly rounded one (float32 carries more than twice their precision plus two
# bits, so rounding twice is rounding once), and an integer code times a scale is exact in float32 (at most
# 8 + 11 significant bits), so rounding the float32 product is the dtype's product.


def _round_to(work: _Workspace, values: torch.Tensor) -> torch.Tensor:
    """``values`` (in ``work.work``, of ``work.compute``) rounded to the weight's dtype, back in ``work.work``."""
    return values if work.exact else values.copy_(work.narrow.copy_(values))


def _symmetric_codes(work: _Workspace, scales: torch.Tensor, num_bits: int) -> torch.Tensor:
    """float32 codes ``round(clamp(w / scale))``, the division in the weight's dtype (group-major, in
    ``work.work``), for ``scales`` of ``work.compute``."""
    qmin, qmax = int_range(num_bits)
    return _round_to(work, torch.div(work.wide, scales, out=work.work)).clamp_(qmin, qmax).round_()


def _symmetric_error(work: _Workspace, scales: torch.Tensor, num_bits: int) -> torch.Tensor:
    # The codes, then the rebuild code * scale in the weight's dtype.
    return work.error(_round_to(work, _symmetric_codes(work, scales, num_bits).mul_(scales)))


def _refit_symmetric(work: _Workspace, scales: torch.Tensor, num_bits: int) -> torch.Tensor:
    """The scale that minimises each group's squared error with the codes of ``scales`` held fixed,
    ``sum(w q) / sum(q q)``, in the stored dtype (``scales`` kept where that is not a positive number)."""
    codes = _symmetric_codes(work, scales.to(work.compute), num_bits)
    fitted = (work.dot(codes, work.wide) / work.dot(codes, codes)).to(scales.dtype)
    return torch.where(fitted.isfinite() & (fitted > 0), fitted, scales)


def _refits(dtype: torch.dtype, num_bits: int) -> int:
    """:data:`REFITS`, or :data:`BF16_INT8_REFITS` for bf16 int8."""
    return BF16_INT8_REFITS if dtype == torch.bfloat16 and num_bits == 8 else REFITS


def _factors(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``[1.0, *values]`` as float32 ``[n, 1, 1]``: one factor per grid candidate, RTN's (1.0: exact) first."""
    return torch.tensor((1.0, *values), dtype=_F32, device=device).view(-1, 1, 1)


def search_symmetric(block: torch.Tensor, tile: tuple[int, int], num_bits: int, refits: int | None = None,
                     shrink: tuple[float, ...] | None = None) -> torch.Tensor:
    """``[rows, groups]`` scales of a band of rows (tiles of one row: a group or a whole channel) chosen among
    ``amax * f`` for ``f`` in :data:`SYMMETRIC_SHRINK` (1.0, RTN's, first), then :data:`REFITS` (bf16 int8:
    :data:`BF16_INT8_REFITS`) least-squares refits of the best (``refits``, ``shrink``: other settings, for
    benchmarks/search_design.py)."""
    rows, in_features = block.shape
    groups = block.reshape(rows, in_features // tile[1], tile[1])
    amax = torch.maximum(groups.amax(dim=-1), groups.amin(dim=-1).neg_())  # |x| max, without a copy of |x|
    work = _Workspace(groups)
    # Every grid candidate's scales at once ([candidates, rows, groups]): a band's time goes as much to operator
    # calls on small tensors as to passes over the weights.
    factors = _factors(SYMMETRIC_SHRINK[num_bits] if shrink is None else shrink, block.device)
    grid = scales_from_amax(amax.to(_F32) * factors, scale_divisor("int", num_bits), block.dtype)
    wide_grid = grid.to(work.compute)
    best, best_err = grid[0], _symmetric_error(work, wide_grid[0], num_bits)
    for index in range(1, grid.shape[0]):
        err = _symmetric_error(work, wide_grid[index], num_bits)
        best_err, (best,) = _keep_better(err, best_err, (grid[index], best))
    for _ in range(_refits(block.dtype, num_bits) if refits is None else refits):
        scales = _refit_symmetric(work, best, num_bits)
        err = _symmetric_error(work, scales.to(work.compute), num_bits)
        best_err, (best,) = _keep_better(err, best_err, (scales, best))
    return best


def _asymmetric_codes(work: _Workspace, scales: torch.Tensor, zeros: torch.Tensor, num_bits: int) -> torch.Tensor:
    """float32 codes ``round(clamp(w / scale + zero))``, the division and the addition in the weight's dtype
    (group-major, in ``work.work``), for parameters of ``work.compute``."""
    qmin, qmax = int_range(num_bits)
    quotient = torch.div(work.wide, scales, out=work.work)
    if work.exact:
        total = quotient.add_(zeros)
    else:  # the quotient rounded, then added in the weight's dtype (one operation less than in float32)
        total = work.work.copy_(work.narrow.copy_(quotient).add_(zeros.to(work.dtype)))
    return total.clamp_(qmin, qmax).round_()


def _asymmetric_error(work: _Workspace, scales: torch.Tensor, zeros: torch.Tensor, num_bits: int) -> torch.Tensor:
    # The codes, then the rebuild (code - zero) * scale in the weight's dtype (code - zero is an exact integer).
    return work.error(_round_to(work, _asymmetric_codes(work, scales, zeros, num_bits).sub_(zeros).mul_(scales)))


def _refit_asymmetric(work: _Workspace, scales: torch.Tensor, zeros: torch.Tensor, num_bits: int,
                      total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """With the codes ``q`` of ``(scales, zeros)`` held fixed: the least-squares line ``w ~ slope * q + offset``
    of each group, its zero point ``-offset / slope`` rounded to an integer in range, then the scale that is
    optimal for that integer zero, ``sum(w (q - z)) / sum((q - z)^2)``, in the stored dtype; ``(scales, zeros)``
    kept where the fit is degenerate (all codes equal) or not a positive scale. ``total``: each group's sum of w."""
    qmin, qmax = int_range(num_bits)
    codes = _asymmetric_codes(work, scales.to(work.compute), zeros.to(work.compute), num_bits)
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
    :data:`REFITS` (bf16 int8: :data:`BF16_INT8_REFITS`) least-squares refits of the best (``refits``,
    ``shrink``: other settings, for benchmarks/search_design.py)."""
    work = _Workspace(groups)
    # Every grid candidate at once ([candidates, rows, groups]), as in search_symmetric.
    pairs = ASYMMETRIC_SHRINK[num_bits] if shrink is None else shrink
    low = (mins.to(_F32) * _factors(tuple(a for a, _ in pairs), mins.device)).to(mins.dtype)
    high = (maxs.to(_F32) * _factors(tuple(b for _, b in pairs), maxs.device)).to(maxs.dtype)
    grid_scales, grid_zeros = asymmetric_qparams(low, high, num_bits)
    wide_scales, wide_zeros = grid_scales.to(work.compute), grid_zeros.to(work.compute)
    best_scales, best_zeros = grid_scales[0], grid_zeros[0]
    best_err = _asymmetric_error(work, wide_scales[0], wide_zeros[0], num_bits)
    for index in range(1, grid_scales.shape[0]):
        scales, zeros = grid_scales[index], grid_zeros[index]
        err = _asymmetric_error(work, wide_scales[index], wide_zeros[index], num_bits)
        best_err, (best_scales, best_zeros) = _keep_better(err, best_err, (scales, best_scales), (zeros, best_zeros))
    refits = _refits(groups.dtype, num_bits) if refits is None else refits
    total = work.dot(work.wide) if refits else None
    for _ in range(refits):
        scales, zeros = _refit_asymmetric(work, best_scales, best_zeros, num_bits, total)
        err = _asymmetric_error(work, scales.to(work.compute), zeros.to(work.compute), num_bits)
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
