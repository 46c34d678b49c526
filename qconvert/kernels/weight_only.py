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
from qconvert.kernels.rounding import cast_rne, program_tile
from qconvert.kernels.split_k import k_ranges, reduce_partials, store_transposed_tile
from qconvert.quantizers import packed_columns


@triton.jit
def _dot(x, w, acc, DOT_FP32: tl.constexpr):
    if DOT_FP32:
        # Triton's CPU interpreter multiplies bf16 operands as their raw uint16 bits; the values are
        # exact in float32, so widening changes nothing but the interpreter's answer.
        return tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(x, w, acc)


@triton.jit
def _signed_values(shifted, BITS: tl.constexpr):
    """float32 ``code - 2**(BITS-1)`` of the low BITS bits of int32 ``shifted``.

    The unpacking is bound by integer instructions (Nsight Compute: the ALU pipe is the busiest at
    small M), so the int → float conversion is done without a conversion instruction: OR-ing the code
    into the mantissa of 2**23 gives the float 2**23 + code exactly, and one exact subtraction recentres
    it. (Measured: no change in speed on an H200, BENCHMARKS.md; kept as it is no more instructions.)
    """
    magic = (shifted & ((1 << BITS) - 1)) | 0x4B000000
    return magic.to(tl.float32, bitcast=True) - (8388608.0 + (1 << (BITS - 1)))


@triton.jit
def _packed_gemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, c_ptr, M, N, K, GROUP, K_SPLIT,
    stride_xm, stride_wn, stride_sn, stride_cm, stride_cs,
    BITS: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ZP: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr,
    SCALE_PER_WORD: tl.constexpr, UNPACK_BY_DOTS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    PER_WORD: tl.constexpr = 32 // BITS
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    _pid_n, offs_m, offs_n, m_ok, n_ok, k_start, k_end = program_tile(M, N, K, K_SPLIT, BLOCK_M, BLOCK_N, GROUP_M)
    offs_w = tl.arange(0, WORDS)
    # Words are read as they lie (a row of N is contiguous along K); value i of word j holds
    # k = j * PER_WORD + i. Two ways to unpack them:
    # - UNPACK_BY_DOTS (small M): the K step is PER_WORD dots, the i-th values of all words against
    #   the activations at k = i, i + PER_WORD, ...: a shift and a mask per dot, no shuffles;
    # - otherwise (wgmma tiles): all values are unpacked into [N, WORDS, PER_WORD], reshaped into K
    #   order and fed to one dot per K step (separate small dots would each wait on their wgmma).
    # The product is computed transposed, C^T = W X^T: the dequantized weights are the dot's first
    # operand, which the tensor cores take from registers, so Triton unpacks straight into the MMA
    # operand layout (as the second operand they would take a round trip through shared memory).
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (k_start + offs_w * PER_WORD)[:, None]
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs_k = x_ptr + offs_m[None, :] * stride_xm + (k_start + offs_k)[:, None]
    shifts = tl.arange(0, PER_WORD) * BITS
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + (k_start // PER_WORD + offs_w)[None, :]
    s_ptrs = s_ptr + offs_n * stride_sn
    z_ptrs = z_ptr + offs_n * stride_sn  # zero points (float32, laid out as the scales)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            words = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
        else:
            # Past K, activations are zero, so whatever a word holds there adds nothing.
            words = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_w * PER_WORD < k_end - k0)[None, :], other=0)
        if SCALE_PER_WORD:  # groups do not tile the K step: one scale per word (a word never straddles)
            # Masked past K as well: a scale read from beyond the row could be inf or NaN, and 0 * NaN
            # would poison the sum even though those activations are zero.
            k_word = k0 + offs_w * PER_WORD
            scale = tl.load(s_ptrs[:, None] + k_word[None, :] // GROUP, mask=n_ok[:, None] & (k_word < K)[None, :],
                            other=0.0).to(tl.float32)
            if HAS_ZP:
                zero = tl.load(z_ptrs[:, None] + k_word[None, :] // GROUP,
                               mask=n_ok[:, None] & (k_word < K)[None, :], other=0.0)
        else:
            scale = tl.load(s_ptrs + k0 // GROUP, mask=n_ok, other=0.0).to(tl.float32)[:, None] + tl.zeros(
                (1, WORDS), dtype=tl.float32)
            if HAS_ZP:
                zero = tl.load(z_ptrs + k0 // GROUP, mask=n_ok, other=0.0)[:, None] + tl.zeros((1, WORDS),
                                                                                             dtype=tl.float32)
        if UNPACK_BY_DOTS:
            for i in tl.static_range(PER_WORD):
                if EVEN_K:
                    x = tl.load(x_ptrs + i, mask=m_ok[None, :], other=0.0)
                else:
                    x = tl.load(x_ptrs + i, mask=m_ok[None, :] & (offs_w * PER_WORD + i < k_end - k0)[:, None],
                                other=0.0)
                values = _signed_values(words >> (i * BITS), BITS)
                if HAS_ZP:  # code - zero is an exact integer in float32, so the product rounds once, as the reader's
                    values = values - zero
                w = cast_rne(values * scale, s_ptr.dtype.element_ty)
                acc = _dot(w.to(x_ptr.dtype.element_ty), x, acc, DOT_FP32)
        else:
            if EVEN_K:
                x = tl.load(x_ptrs_k, mask=m_ok[None, :], other=0.0)
            else:
                x = tl.load(x_ptrs_k, mask=m_ok[None, :] & (offs_k < k_end - k0)[:, None], other=0.0)
            values = _signed_values(words[:, :, None] >> shifts[None, None, :], BITS)
            if HAS_ZP:
                values = values - zero[:, :, None]
            w = cast_rne(values * scale[:, :, None], s_ptr.dtype.element_ty)
            acc = _dot(tl.reshape(w.to(x_ptr.dtype.element_ty), (BLOCK_N, BLOCK_K)), x, acc, DOT_FP32)
            x_ptrs_k += BLOCK_K
        x_ptrs += BLOCK_K
        w_ptrs += WORDS
    store_transposed_tile(acc, c_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, stride_cm, stride_cs, HAS_BIAS, SPLIT_K)


def packed_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, num_bits: int, in_features: int,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                config: TileConfig | None = None, zero_points: torch.Tensor | None = None) -> torch.Tensor:
    """``x [..., K] @ dequant(packed)^T``: ``packed [N, ceil(K*b/32)]`` int32, ``scales [N, G]`` with one
    scale per ``K/G`` inputs (``G = 1``: per channel). Output in ``out_dtype`` (default: ``x``'s).
    ``zero_points``: the unpacked int8 ``[N, G]`` zero points of an asymmetric layer (value = (code - zero) * scale)."""
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
    z = None if zero_points is None else zero_points.reshape(n, -1).to(torch.float32).contiguous()
    if z is not None and z.shape != s.shape:
        raise ValueError(f"zero points {list(z.shape)} do not match scales {list(s.shape)}")
    rows = x.reshape(-1, k)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    m = rows.shape[0]
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    cfg = config or gemm_config(f"w{num_bits}a16", m, n, k, x.device)
    per_word = 32 // num_bits
    # Each of a K step's per_word dots needs at least 16 words (the MMA's K).
    block_k = max(cfg.block_k, 16 * per_word)
    if groups > 1 and group % per_word:
        raise ValueError(f"group size {group} is not supported by the weight-only kernel (needs a multiple of "
                         f"{per_word} for {num_bits}-bit weights)")
    if not (m and n):
        return out.reshape(*x.shape[:-1], n)
    per_split, splits = k_ranges(k, block_k, cfg.split_k)
    by_dots = cfg.block_m < 64 if cfg.unpack_by_dots is None else cfg.unpack_by_dots
    target = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), splits)
    _packed_gemm_kernel[grid](
        rows, packed.contiguous(), s, z if z is not None else s, bias if bias is not None else s, target, m, n, k,
        group, per_split,
        rows.stride(0), packed.stride(0), s.stride(0), target.stride(-2), target.stride(0) if splits > 1 else 0,
        BITS=num_bits, HAS_BIAS=bias is not None, HAS_ZP=z is not None, EVEN_K=k % block_k == 0,
        DOT_FP32=interpreting(),
        SCALE_PER_WORD=groups > 1 and group % block_k != 0, UNPACK_BY_DOTS=by_dots, SPLIT_K=splits,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        reduce_partials(target, bias, out)
    return out.reshape(*x.shape[:-1], n)
