"""Weight-only GEMM on ``pack-quantized`` weights (W4A16 / W8A16): ``C = X @ dequant(W)^T (+ bias)``.

The kernel reads the checkpoint's int32 words as they are stored (``weight_packed``: 8 int4 or 4 int8
values per word, least significant first, offset by 2**(b-1)) and its group scales, and dequantizes in
registers: each value becomes ``(code - offset) * scale`` rounded to the scale dtype, exactly the
weight compressed-tensors rebuilds, so the dot runs on the same bf16/fp16 operands a dequantized
reference would. The weight never exists in full precision in memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qconvert.kernels.configs import TileConfig, gemm_config, interpreting
from qconvert.kernels.rounding import cast_rne, swizzle_tile
from qconvert.quantizers import packed_columns


@triton.jit
def _packed_gemm_kernel(
    x_ptr, w_ptr, s_ptr, bias_ptr, c_ptr, M, N, K, GROUP,
    stride_xm, stride_wn, stride_sn, stride_cm,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    pid_m, pid_n = swizzle_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    shifts = ((offs_k % PER_WORD) * BITS)[:, None]
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + (offs_k // PER_WORD)[:, None]
    s_ptrs = s_ptr + offs_n * stride_sn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=m_ok[:, None], other=0.0)
            words = tl.load(w_ptrs, mask=n_ok[None, :], other=0)
        else:
            k_ok = offs_k < K - k0
            x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            words = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        codes = ((words >> shifts) & ((1 << BITS) - 1)) - (1 << (BITS - 1))
        scale = tl.load(s_ptrs + k0 // GROUP, mask=n_ok, other=0.0)
        w = cast_rne(codes.to(tl.float32) * scale.to(tl.float32)[None, :], s_ptr.dtype.element_ty)
        w = w.to(x_ptr.dtype.element_ty)
        if DOT_FP32:  # noqa: SIM108
            # Triton's CPU interpreter multiplies bf16 operands as their raw uint16 bits; the values
            # are exact in float32, so widening changes nothing but the interpreter's answer.
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w, acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K // PER_WORD
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], cast_rne(acc, c_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def packed_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, num_bits: int, in_features: int,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                config: TileConfig | None = None) -> torch.Tensor:
    """``x [..., K] @ dequant(packed)^T``: ``packed [N, ceil(K*b/32)]`` int32, ``scales [N, G]`` with one
    scale per ``K/G`` inputs (``G = 1``: per channel). Output in ``out_dtype`` (default: ``x``'s)."""
    if num_bits not in (4, 8):
        raise ValueError(f"packed weights of {num_bits} bits are not supported (4 or 8)")
    n = packed.shape[0]
    k = in_features
    if x.shape[-1] != k or packed.shape[1] != packed_columns(k, num_bits):
        raise ValueError(f"activations [..., {x.shape[-1]}] and packed {list(packed.shape)} ({num_bits}-bit, "
                         f"{k} inputs) do not fit")
    s = scales.reshape(n, -1).contiguous()
    groups = s.shape[1]
    group = k if groups == 1 else k // groups
    if groups > 1 and group * groups != k:
        raise ValueError(f"{groups} scale groups do not divide {k} inputs")
    rows = x.reshape(-1, k)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    m = rows.shape[0]
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    cfg = config or gemm_config(f"w{num_bits}a16", m, n, k, x.device)
    block_k = cfg.block_k if groups == 1 else min(cfg.block_k, group)
    per_word = 32 // num_bits
    if (groups > 1 and group % block_k) or block_k % per_word or block_k < 16:
        raise ValueError(f"group size {group} is not supported by the weight-only kernel (needs a multiple of 16)")
    if m and n:
        grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
        _packed_gemm_kernel[grid](
            rows, packed.contiguous(), s, bias if bias is not None else s, out, m, n, k, group,
            rows.stride(0), packed.stride(0), s.stride(0), out.stride(0),
            BITS=num_bits, HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, DOT_FP32=interpreting(),
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return out.reshape(*x.shape[:-1], n)
