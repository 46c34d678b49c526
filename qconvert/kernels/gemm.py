"""Scaled GEMMs on int8 or fp8 operands: ``C = (A * sa) @ (B * sb)^T (+ bias)``.

``A [M, K]`` are quantized activations with float32 scales per token, or per token per ``group_k``
channels; ``B [N, K]`` are quantized weights with scales per tensor, per output channel or per
``block_n x group_k`` block. One kernel serves all of them:

* when any scale changes along K (the block schemes), each K step of ``group_k`` is an exact
  int8 x int8 → int32 (or fp8 → fp32) dot, promoted to float32 and multiplied by that step's
  activation and weight scales (the DeepSeek/Jetfire recipe);
* otherwise the whole K accumulates in int32/float32 and the scales are applied once at the end.

Rows, columns and K are masked (any M, N, K), the output dtype is the caller's, a bias is fused, and
:func:`scaled_gemm_quant` quantizes the result per token per 128 channels inside the epilogue, so the
full-precision output never reaches memory. Small M may split K (``TileConfig.split_k``): float32
partials, then :mod:`qconvert.kernels.split_k` sums them (and does the bias and the output quantization).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qconvert.kernels.configs import TileConfig, gemm_config
from qconvert.kernels.rounding import cast_rne, program_tile, quantize_row_groups
from qconvert.kernels.split_k import k_ranges, reduce_partials

_TL_OUT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _step(a_ptrs, b_ptrs, m_ok, n_ok, offs_k, k_left, EVEN_K: tl.constexpr, IS_INT: tl.constexpr):
    """One K step: the masked operand tiles and their exact dot (int32 for int8, float32 for fp8)."""
    if EVEN_K:
        a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
        b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
    else:
        k_ok = offs_k < k_left
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
    if IS_INT:  # noqa: SIM108 (constexpr branches read better in a kernel)
        part = tl.dot(a, b, out_dtype=tl.int32)
    else:
        part = tl.dot(a, b, out_dtype=tl.float32)
    return part


@triton.jit
def _group_scales(as_ptrs, bs_ptrs, bs_tile_ptr, group, stride_ask, stride_bsk, m_ok, n_ok, SCALAR_B: tl.constexpr):
    """activation scale x weight scale of one K group: ``[BLOCK_M, BLOCK_N]``, or ``[BLOCK_M, 1]`` when
    the tile lies inside one weight scale block (one scalar load, one multiply per element saved)."""
    sa = tl.load(as_ptrs + group * stride_ask, mask=m_ok, other=0.0)
    if SCALAR_B:
        sb = tl.load(bs_tile_ptr + group * stride_bsk).to(tl.float32)
        return sa[:, None] * sb
    else:
        sb = tl.load(bs_ptrs + group * stride_bsk, mask=n_ok, other=0.0).to(tl.float32)
        return sa[:, None] * sb[None, :]


@triton.jit
def _as_float(part, IS_INT: tl.constexpr, BLOCK_K: tl.constexpr):
    """float32 of one K group's dot, exactly.

    int8: a sum of at most 128 products of int8 codes lies within ±2**21, so adding it to the bits of
    1.5 * 2**23 in integer arithmetic and subtracting 1.5 * 2**23 in float gives it exactly, with an
    integer add and a float add instead of an I2F conversion per element and group (the CUDA guide's
    throughput table gives conversions an eighth of the FP32 rate); this promotion is what bounds the
    block GEMM at large M (BENCHMARKS.md: block vs channel scales).
    """
    if IS_INT and BLOCK_K <= 128:
        return (part + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    else:
        return part.to(tl.float32)


@triton.jit
def _scaled_gemm_kernel(
    a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, cs_ptr,
    M, N, K, K_SPLIT,
    stride_am, stride_bn, stride_cm, stride_cs,
    stride_asm, stride_ask, stride_bsn, stride_bsk, stride_csm,
    B_SCALE_ROWS: tl.constexpr, GROUP_K: tl.constexpr, IS_INT: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    QUANT_OUT: tl.constexpr, OUT_FP8: tl.constexpr, OUT_GROUP: tl.constexpr, SPLIT_K: tl.constexpr,
    DEFER_SCALES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_n, offs_m, offs_n, m_ok, n_ok, k_start, k_end = program_tile(M, N, K, K_SPLIT, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + (k_start + offs_k)[None, :]
    b_ptrs = b_ptr + offs_n[None, :] * stride_bn + (k_start + offs_k)[:, None]
    as_ptrs = as_ptr + offs_m * stride_asm
    bs_ptrs = bs_ptr + (offs_n // B_SCALE_ROWS) * stride_bsn
    SCALAR_B: tl.constexpr = B_SCALE_ROWS % BLOCK_N == 0  # the whole tile shares one weight scale row
    bs_tile_ptr = bs_ptr + (pid_n * BLOCK_N // B_SCALE_ROWS) * stride_bsn
    if GROUP_K == 0 and IS_INT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GROUP_K != 0 and DEFER_SCALES:
        # Software-pipelined promotion: step k's MMAs are issued before step k-1's result is scaled, so
        # the tensor cores are not idle while the scale epilogue of each K group runs (a fresh
        # accumulator per group otherwise makes every step wait for its own MMAs). Same sums, same order.
        part_prev = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT else tl.float32)
        scale_prev = tl.zeros((BLOCK_M, 1 if SCALAR_B else BLOCK_N), dtype=tl.float32)
        for k0 in range(k_start, k_end, BLOCK_K):
            part = _step(a_ptrs, b_ptrs, m_ok, n_ok, offs_k, k_end - k0, EVEN_K, IS_INT)
            acc += _as_float(part_prev, IS_INT, BLOCK_K) * scale_prev
            scale_prev = _group_scales(as_ptrs, bs_ptrs, bs_tile_ptr, k0 // GROUP_K, stride_ask, stride_bsk, m_ok,
                                       n_ok, SCALAR_B)
            part_prev = part
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        acc += _as_float(part_prev, IS_INT, BLOCK_K) * scale_prev
    else:
        for k0 in range(k_start, k_end, BLOCK_K):
            part = _step(a_ptrs, b_ptrs, m_ok, n_ok, offs_k, k_end - k0, EVEN_K, IS_INT)
            if GROUP_K == 0:
                acc += part
            else:
                acc += _as_float(part, IS_INT, BLOCK_K) * _group_scales(
                    as_ptrs, bs_ptrs, bs_tile_ptr, k0 // GROUP_K, stride_ask, stride_bsk, m_ok, n_ok, SCALAR_B)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    if GROUP_K == 0:
        sa = tl.load(as_ptrs, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptrs, mask=n_ok, other=0.0).to(tl.float32)
        acc = acc.to(tl.float32) * (sa[:, None] * sb[None, :])
    if SPLIT_K > 1:  # a float32 partial; split_k.reduce_partials adds the bias and rounds
        c_ptrs = c_ptr + tl.program_id(1) * stride_cs + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc, mask=m_ok[:, None] & n_ok[None, :])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        c_mask = m_ok[:, None] & n_ok[None, :]
        if QUANT_OUT:
            # Columns past N hold exact zeros (masked operands, masked bias), so they never raise an amax.
            q, scale = quantize_row_groups(acc, BLOCK_M, BLOCK_N, OUT_GROUP, OUT_FP8)
            tl.store(c_ptrs, q.to(c_ptr.dtype.element_ty), mask=c_mask)
            offs_g = pid_n * (BLOCK_N // OUT_GROUP) + tl.arange(0, BLOCK_N // OUT_GROUP)
            tl.store(cs_ptr + offs_m[:, None] * stride_csm + offs_g[None, :], scale,
                     mask=m_ok[:, None] & (offs_g[None, :] < tl.cdiv(N, OUT_GROUP)))
        else:
            tl.store(c_ptrs, cast_rne(acc, c_ptr.dtype.element_ty), mask=c_mask)


def _scale_layout(scales: torch.Tensor, rows: int, k_groups: int, what: str,
                  block_rows: bool = True) -> tuple[torch.Tensor, int, int, int]:
    """``(scales as float-contiguous 2-D, row stride, K-group stride, rows per scale row)``.

    Accepts one scale (per tensor), one per row (``[rows, 1]``), one per row per K group
    (``[rows, k_groups]``) or, for weights, one per 128-row block (``[ceil(rows/128), k_groups or 1]``).
    """
    s = scales.reshape(1, 1) if scales.numel() == 1 else scales.reshape(scales.shape[0], -1)
    s = s.contiguous()
    r, c = s.shape
    if c not in (1, k_groups):
        raise ValueError(f"{what} scales {list(scales.shape)}: {c} columns, expected 1 or {k_groups}")
    col_stride = 0 if c == 1 else 1
    if r == 1:
        return s, 0, col_stride, 1
    if r == rows:
        return s, s.stride(0), col_stride, 1
    if block_rows and r == triton.cdiv(rows, 128):
        return s, s.stride(0), col_stride, 128
    raise ValueError(f"{what} scales {list(scales.shape)} do not fit {rows} rows")


def _launch(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
            bias: torch.Tensor | None, out: torch.Tensor, out_scales: torch.Tensor | None, out_kind: str | None,
            group_k: int, config: TileConfig | None) -> None:
    m, k = a.shape
    n = b.shape[0]
    if a.dtype != b.dtype or a.dtype not in (torch.int8, torch.float8_e4m3fn):
        raise ValueError(f"operands must both be int8 or both float8_e4m3fn, not {a.dtype} and {b.dtype}")
    if b.shape[1] != k:
        raise ValueError(f"activations [{m}, {k}] and weight {list(b.shape)} disagree on K")
    k_groups = triton.cdiv(k, group_k)
    sa, asm, ask, _ = _scale_layout(a_scales.to(torch.float32), m, k_groups, "activation", block_rows=False)
    sb, bsn, bsk, b_rows = _scale_layout(b_scales, n, k_groups, "weight")
    grouped = ask != 0 or bsk != 0
    kernel = "int8" if a.dtype == torch.int8 else "fp8"
    cfg = config or gemm_config(f"{kernel}-{'block' if grouped else 'channel'}", m, n, k, a.device)
    block_k = min(cfg.block_k, group_k) if grouped else cfg.block_k
    if grouped and group_k % block_k:
        raise ValueError(f"BLOCK_K {block_k} must divide the scale group {group_k}")
    if not (m and n):
        return
    # With split-K, the output quantization moves into the reduction of the partials; in the GEMM's own
    # epilogue it needs whole 128-column groups per tile.
    per_split, splits = k_ranges(k, block_k, cfg.split_k)
    quant_here = out_kind is not None and splits == 1
    block_n = max(128, cfg.block_n - cfg.block_n % 128) if quant_here else cfg.block_n
    target = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, block_n), splits)
    _scaled_gemm_kernel[grid](
        a, b, target.view(torch.uint8) if target.dtype == torch.float8_e4m3fn else target, sa, sb,
        bias if bias is not None else sa, out_scales if out_scales is not None else sa,
        m, n, k, per_split, a.stride(0), b.stride(0), target.stride(-2), target.stride(0) if splits > 1 else 0,
        asm, ask, bsn, bsk, out_scales.stride(0) if out_scales is not None else 0, b_rows,
        GROUP_K=group_k if grouped else 0, IS_INT=a.dtype == torch.int8, EVEN_K=k % block_k == 0,
        HAS_BIAS=bias is not None, QUANT_OUT=quant_here, OUT_FP8=out_kind == "float", OUT_GROUP=128,
        SPLIT_K=splits, DEFER_SCALES=cfg.defer_scales, BLOCK_M=cfg.block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        reduce_partials(target, bias, out, out_scales, out_kind)


def _as_rows(a: torch.Tensor) -> torch.Tensor:
    rows = a.reshape(-1, a.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def scaled_gemm(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, group_k: int = 128,
                config: TileConfig | None = None) -> torch.Tensor:
    """``(a * a_scales) @ (b * b_scales)^T + bias`` as ``out_dtype`` (bf16, fp16 or fp32).

    ``a [..., K]`` int8 or fp8 with float32 scales ``[..., ceil(K/group_k)]`` or ``[..., 1]``; ``b [N, K]``
    of the same dtype with scales ``[ceil(N/128), ceil(K/group_k)]`` (block), ``[N, 1]`` (channel) or one
    value (tensor). fp16 output saturates as fp16 does (±inf past 65504); ask for bf16 or fp32 where
    outputs can be that large.
    """
    if out_dtype not in _TL_OUT:
        raise ValueError(f"out_dtype must be bf16, fp16 or fp32, not {out_dtype}")
    rows = _as_rows(a)
    out = torch.empty((rows.shape[0], b.shape[0]), dtype=out_dtype, device=a.device)
    _launch(rows, a_scales.reshape(rows.shape[0], -1) if a_scales.numel() > 1 else a_scales, b.contiguous(),
            b_scales, bias, out, None, None, group_k, config)
    return out.reshape(*a.shape[:-1], b.shape[0])


def scaled_gemm_quant(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor,
                      bias: torch.Tensor | None = None, out_kind: str = "int", group_k: int = 128,
                      config: TileConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`scaled_gemm` whose output is quantized in the epilogue, per token per 128 channels, as
    :func:`qconvert.kernels.quantize_activations` would quantize the float32 result: ``(codes [..., N],
    float32 scales [..., ceil(N/128)])``, ready to feed the next layer's GEMM."""
    rows = _as_rows(a)
    m, n = rows.shape[0], b.shape[0]
    stored = torch.float8_e4m3fn if out_kind == "float" else torch.int8
    out = torch.empty((m, n), dtype=stored, device=a.device)
    out_scales = torch.empty((m, triton.cdiv(n, 128)), dtype=torch.float32, device=a.device)
    _launch(rows, a_scales.reshape(m, -1) if a_scales.numel() > 1 else a_scales, b.contiguous(), b_scales,
            bias, out, out_scales, out_kind, group_k, config)
    return out.reshape(*a.shape[:-1], n), out_scales.reshape(*a.shape[:-1], out_scales.shape[-1])


__all__ = ["scaled_gemm", "scaled_gemm_quant"]
