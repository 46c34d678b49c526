"""Split-K for the GEMMs: when M is small, N / BLOCK_N tiles cannot occupy every SM, so K is cut into
``splits`` ranges, each program writes a float32 partial product, and this reduction sums the partials
in a fixed order (deterministic, unlike atomics), adds the bias and rounds once to the output dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qconvert.kernels.rounding import cast_rne, quantize_row_groups


def k_ranges(k: int, block_k: int, splits: int) -> tuple[int, int]:
    """``(K per split, rounded up to whole BLOCK_K steps, number of non-empty splits)``."""
    per_split = triton.cdiv(triton.cdiv(k, block_k), max(splits, 1)) * block_k
    return per_split, triton.cdiv(k, per_split)


@triton.jit
def store_transposed_tile(acc, c_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, stride_cm, stride_cs,
                          HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """The epilogue of the weight-only GEMMs, which accumulate ``C^T`` tiles ``[BLOCK_N, BLOCK_M]``: a float32
    partial per K split (:func:`reduce_partials` adds the bias and rounds), or bias and one rounding here."""
    c_mask = n_ok[:, None] & m_ok[None, :]
    c_ptrs = c_ptr + offs_m[None, :] * stride_cm + offs_n[:, None]
    if SPLIT_K > 1:
        tl.store(c_ptrs + tl.program_id(1) * stride_cs, acc, mask=c_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(c_ptrs, cast_rne(acc, c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _reduce_kernel(ws_ptr, bias_ptr, c_ptr, cs_ptr, M, N, stride_cm, stride_csm, SPLITS: tl.constexpr,
                   HAS_BIAS: tl.constexpr, QUANT_OUT: tl.constexpr, OUT_FP8: tl.constexpr, OUT_GROUP: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * N + cols[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + rows[:, None] * stride_cm + cols[None, :]
    if QUANT_OUT:  # as the GEMM's own epilogue would (masked columns are zeros and raise no amax)
        q, scale = quantize_row_groups(acc, BLOCK_M, BLOCK_N, OUT_GROUP, OUT_FP8)
        tl.store(c_ptrs, q.to(c_ptr.dtype.element_ty), mask=mask)
        offs_g = tl.program_id(1) * (BLOCK_N // OUT_GROUP) + tl.arange(0, BLOCK_N // OUT_GROUP)
        tl.store(cs_ptr + rows[:, None] * stride_csm + offs_g[None, :], scale,
                 mask=(rows[:, None] < M) & (offs_g[None, :] < tl.cdiv(N, OUT_GROUP)))
    else:
        tl.store(c_ptrs, cast_rne(acc, c_ptr.dtype.element_ty), mask=mask)


def reduce_partials(workspace: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor,
                    out_scales: torch.Tensor | None = None, out_kind: str | None = None) -> None:
    """``out = sum(workspace[s] for s in splits) + bias``: ``workspace [splits, M, N]`` float32. With
    ``out_kind``, ``out`` receives int8 or e4m3fn codes and ``out_scales`` one scale per row per 128."""
    splits, m, n = workspace.shape
    # Small tiles: at M <= 16 there are few rows, and the reduction must still spread over the SMs.
    grid = (triton.cdiv(m, 4), triton.cdiv(n, 128))
    target = out.view(torch.uint8) if out.dtype == torch.float8_e4m3fn else out
    scales = out_scales if out_scales is not None else workspace
    _reduce_kernel[grid](workspace, bias if bias is not None else workspace, target, scales, m, n, out.stride(0),
                         scales.stride(0) if out_scales is not None else 0, SPLITS=splits, HAS_BIAS=bias is not None,
                         QUANT_OUT=out_kind is not None, OUT_FP8=out_kind == "float", OUT_GROUP=128, BLOCK_M=4,
                         BLOCK_N=128, num_warps=4)
