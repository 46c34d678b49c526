"""Weight-only GEMM on microscaled weights (NVFP4, MXFP4, MXFP8): ``C = X @ dequant(W)^T (+ bias)``.

The kernel reads the checkpoint's tensors as compressed-tensors stores them (formats: see
:mod:`qconvert.kernels.microscaled_reference`) and dequantizes in registers. Hopper has no FP4 (or MX) tensor
core instructions, so, as Marlin's FP4 kernels do, every code is turned into a float with a few integer
operations (its bits moved into float32's exponent and mantissa fields), multiplied by its block scale in
float32, rounded once to the activation dtype and fed to an ordinary bf16/fp16 ``tl.dot`` with float32
accumulation. Each dequantized element is therefore bit for bit the weight compressed-tensors rebuilds, and the
output differs from ``x @ reference_weight.T`` only by the order of the float32 sums.

One K step of one program, in the style of Triton's matmul tutorial::

    bytes [BLOCK_N, BLOCK_K / per_byte]  ──unpack──►  codes [BLOCK_N, BLOCK_K / GROUP, GROUP]  ──decode──►  float32
    scale bits [BLOCK_N, BLOCK_K / GROUP]  ──decode (÷ global scale)──►  float32 [BLOCK_N, BLOCK_K / GROUP, 1]
    w = round(values * scales) → [BLOCK_N, BLOCK_K] bf16/fp16;   acc[BLOCK_N, BLOCK_M] += w @ X^T tile
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qconvert.formats.args import NumberType, ScaleDtype
from qconvert.kernels.configs import TileConfig, gemm_config, interpreting
from qconvert.kernels.microscaled_reference import (
    FORMATS,
    MXFP4,
    MXFP8,
    NVFP4,
    MicroFormat,
    as_format,
    dequantize,
    dequantize_mxfp4,
    dequantize_mxfp8,
    dequantize_nvfp4,
)
from qconvert.kernels.rounding import cast_rne, program_tile
from qconvert.kernels.split_k import k_ranges, reduce_partials, store_transposed_tile
from qconvert.kernels.weight_only import _dot  # the interpreter-safe dot, shared

__all__ = [
    "FORMATS",
    "MXFP4",
    "MXFP8",
    "NVFP4",
    "MicroFormat",
    "dequantize",
    "dequantize_mxfp4",
    "dequantize_mxfp8",
    "dequantize_nvfp4",
    "microscaled_gemm",
]


@triton.jit
def _with_sign(value, sign_bit):
    """``value`` with int32 ``sign_bit`` (0 or 1 << 31) OR-ed in: copied as a bit, not applied by negation, so
    that a negative zero code (0x8, 0x80) stays -0.0, as torch's decoding keeps it."""
    return (value.to(tl.int32, bitcast=True) | sign_bit).to(tl.float32, bitcast=True)


@triton.jit
def _e2m1_to_f32(codes):
    """float32 value of FP4 E2M1 codes (int32 0..15: sign bit 3, then 2 exponent bits of bias 1 and 1 mantissa
    bit; magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6), exactly, without a lookup table.

    The 3 magnitude bits go to the top of float32's exponent and mantissa fields and the exponent is re-biased
    from 1 to 127 (+126 << 23): right for every normal code (2..7). Codes 0 and 1 have a zero exponent field
    (zero and the subnormal 0.5) and come out as 0.5 and 0.75; ``2v - 1`` maps those to 0 and 0.5, exactly.
    """
    magnitude = codes & 0x7
    value = ((magnitude << 22) + (126 << 23)).to(tl.float32, bitcast=True)
    value = tl.where(magnitude < 2, value * 2.0 - 1.0, value)
    return _with_sign(value, (codes & 0x8) << 28)


@triton.jit
def _e4m3_to_f32(bits):
    """float32 value of float8 e4m3fn bit patterns (int32 0..255), exactly; 0x7F and 0xFF are NaN.

    Same construction as :func:`_e2m1_to_f32`: exponent re-biased from 7 to 127 (+120 << 23); a zero exponent
    field (subnormals, m * 2**-9) reads 2**-7 * (1 + m/8), and ``2v - 2**-6`` is the subnormal value. No
    float32 subnormal or int → float conversion is involved, so the GPU and the interpreter agree. (The e4m3
    block scales of NVFP4 are decoded the same way.)
    """
    magnitude = bits & 0x7F
    value = ((magnitude << 20) + (120 << 23)).to(tl.float32, bitcast=True)
    value = tl.where(magnitude < 8, value * 2.0 - 0.015625, value)
    value_bits = tl.where(magnitude == 0x7F, 0x7FC00000, value.to(tl.int32, bitcast=True))
    return (value_bits | ((bits & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _e8m0_to_f32(exponents):
    """float32 ``2**(s - 127)`` of E8M0 scale exponents (int32 0..255): ``s`` is float32's exponent field as
    it stands. s = 0 is the float32 subnormal 2**-127 (bit 22), s = 255 the MX specification's NaN."""
    bits = exponents << 23
    bits = tl.where(exponents == 0, 0x00400000, bits)
    bits = tl.where(exponents == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _microscaled_gemm_kernel(
    x_ptr, w_ptr, s_ptr, gs_ptr, bias_ptr, c_ptr, M, N, K, K_SPLIT,
    stride_xm, stride_wn, stride_sn, stride_cm, stride_cs,
    PER_BYTE: tl.constexpr, SCALE_E8M0: tl.constexpr, HAS_GLOBAL: tl.constexpr, GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, DOT_FP32: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    BYTES: tl.constexpr = BLOCK_K // PER_BYTE  # weight bytes per row per K step
    GROUPS: tl.constexpr = BLOCK_K // GROUP  # block scales per row per K step (BLOCK_K is a multiple of GROUP)
    _pid_n, offs_m, offs_n, m_ok, n_ok, k_start, k_end = program_tile(M, N, K, K_SPLIT, BLOCK_M, BLOCK_N, GROUP_M)
    offs_b = tl.arange(0, BYTES)
    offs_g = tl.arange(0, GROUPS)
    offs_k = tl.arange(0, BLOCK_K)
    # The product is computed transposed, C^T = W X^T, as in weight_only.py: the dequantized weights are the
    # dot's first operand, which the tensor cores take from registers, so they are unpacked straight into the
    # MMA operand layout instead of taking a round trip through shared memory.
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + (k_start // PER_BYTE + offs_b)[None, :]
    s_ptrs = s_ptr + offs_n[:, None] * stride_sn + (k_start // GROUP + offs_g)[None, :]
    x_ptrs = x_ptr + offs_m[None, :] * stride_xm + (k_start + offs_k)[:, None]
    if HAS_GLOBAL:
        global_scale = tl.load(gs_ptr)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            stored = tl.load(w_ptrs, mask=n_ok[:, None], other=0)
            scale_bits = tl.load(s_ptrs, mask=n_ok[:, None], other=0)
            x = tl.load(x_ptrs, mask=m_ok[None, :], other=0.0)
        else:
            # Past K: zero codes, zero activations, and scale bits 0 (0 or 2**-127, never NaN: 0 * NaN would
            # poison the sum even though those activations are zero).
            left = k_end - k0
            stored = tl.load(w_ptrs, mask=n_ok[:, None] & (offs_b * PER_BYTE < left)[None, :], other=0)
            scale_bits = tl.load(s_ptrs, mask=n_ok[:, None] & (offs_g * GROUP < left)[None, :], other=0)
            x = tl.load(x_ptrs, mask=m_ok[None, :] & (offs_k < left)[:, None], other=0.0)
        stored = stored.to(tl.int32)
        # Block scales, float32 [BLOCK_N, GROUPS].
        scale = _e8m0_to_f32(scale_bits.to(tl.int32)) if SCALE_E8M0 else _e4m3_to_f32(scale_bits.to(tl.int32))
        if HAS_GLOBAL:
            # IEEE division, as compressed-tensors' `scale / global_scale`: `/` on float32 compiles to an
            # approximate division on the GPU, and a reciprocal multiplication rounds differently.
            scale = tl.math.div_rn(scale, global_scale)
        # Weight values, float32 [BLOCK_N, GROUPS, GROUP] in K order.
        if PER_BYTE == 2:
            # Byte j holds element 2j in its low nibble and 2j + 1 in its high one: joining (low, high) along a
            # new last axis and flattening puts them in K order.
            codes = tl.reshape(tl.join(stored & 0xF, stored >> 4), (BLOCK_N, GROUPS, GROUP))
            values = _e2m1_to_f32(codes)
        else:
            values = _e4m3_to_f32(tl.reshape(stored, (BLOCK_N, GROUPS, GROUP)))
        # The product in float32, rounded once to the activation dtype: the reference's weight, bit for bit.
        w = cast_rne(values * scale[:, :, None], x_ptr.dtype.element_ty)
        acc = _dot(tl.reshape(w, (BLOCK_N, BLOCK_K)), x, acc, DOT_FP32)
        w_ptrs += BYTES
        s_ptrs += GROUPS
        x_ptrs += BLOCK_K
    store_transposed_tile(acc, c_ptr, bias_ptr, offs_m, offs_n, m_ok, n_ok, stride_cm, stride_cs, HAS_BIAS, SPLIT_K)


def _check_operands(fmt: MicroFormat, x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor,
                    global_scale: torch.Tensor | None) -> None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"activations must be bfloat16 or float16 (the dequantized weight's dtype), not {x.dtype}")
    k = x.shape[-1]
    if k <= 0 or k % fmt.group:
        raise ValueError(f"{fmt.name}: K = {k} inputs is not a positive multiple of the scale group ({fmt.group})")
    n = weight.shape[0] if weight.dim() == 2 else -1
    weight_dtypes = (torch.uint8,) if fmt.element is NumberType.FP4_E2M1 else (torch.float8_e4m3fn, torch.uint8)
    if weight.dim() != 2 or weight.dtype not in weight_dtypes or weight.shape[1] * fmt.per_byte != k:
        raise ValueError(f"{fmt.name}: weight {weight.dtype} {list(weight.shape)} does not fit activations "
                         f"[..., {k}] (expected {weight_dtypes[0]} [N, {k // fmt.per_byte}])")
    scale_dtype = torch.float8_e4m3fn if fmt.scale is ScaleDtype.E4M3 else torch.uint8
    if scales.dtype != scale_dtype or tuple(scales.shape) != (n, k // fmt.group):
        raise ValueError(f"{fmt.name}: scales {scales.dtype} {list(scales.shape)}, expected {scale_dtype} "
                         f"[{n}, {k // fmt.group}]")
    if fmt.global_scale and (global_scale is None or global_scale.numel() != 1):
        raise ValueError(f"{fmt.name} needs its one-element weight_global_scale")
    if not fmt.global_scale and global_scale is not None:
        raise ValueError(f"{fmt.name} has no global scale")


def microscaled_gemm(x: torch.Tensor, fmt: MicroFormat | str, weight: torch.Tensor, scales: torch.Tensor,
                     global_scale: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None, config: TileConfig | None = None) -> torch.Tensor:
    """``x [..., K] @ dequant(weight)^T (+ bias)`` for a microscaled weight, as stored by compressed-tensors.

    ``fmt``: :data:`NVFP4`, :data:`MXFP4`, :data:`MXFP8` or their names. ``weight``: ``weight_packed`` (uint8
    ``[N, K/2]``) for the FP4 formats, ``weight`` (float8_e4m3fn ``[N, K]``) for MXFP8; ``scales``:
    ``weight_scale`` (``[N, K/16]`` float8_e4m3fn for NVFP4, ``[N, K/32]`` uint8 E8M0 for MX);
    ``global_scale``: NVFP4's ``weight_global_scale``. ``x`` is bf16 or fp16, and the weight is dequantized to
    that dtype exactly as :func:`dequantize` does; the output is in ``out_dtype`` (default: ``x``'s).
    """
    fmt = as_format(fmt)
    _check_operands(fmt, x, weight, scales, global_scale)
    n, k = weight.shape[0], x.shape[-1]
    rows = x.reshape(-1, k)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    m = rows.shape[0]
    out = torch.empty((m, n), dtype=out_dtype or x.dtype, device=x.device)
    if not (m and n):
        return out.reshape(*x.shape[:-1], n)
    # Bytes, not float8, for the kernel: it decodes the bits itself (the interpreter has no float8 loads).
    w = weight.contiguous().view(torch.uint8)
    s = scales.contiguous().view(torch.uint8)
    gs = global_scale.reshape(1).to(torch.float32) if global_scale is not None else s
    cfg = config or gemm_config(fmt.name, m, n, k, x.device)
    # A K step holds whole scale groups and at least 16 inputs (the MMA's K).
    block_k = max(cfg.block_k, fmt.group, 16)
    if block_k & (block_k - 1) or block_k % fmt.group:
        raise ValueError(f"BLOCK_K {block_k} is not a power of two holding whole groups of {fmt.group}")
    per_split, splits = k_ranges(k, block_k, cfg.split_k)
    target = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), splits)
    _microscaled_gemm_kernel[grid](
        rows, w, s, gs, bias if bias is not None else s, target, m, n, k, per_split,
        rows.stride(0), w.stride(0), s.stride(0), target.stride(-2), target.stride(0) if splits > 1 else 0,
        PER_BYTE=fmt.per_byte, SCALE_E8M0=fmt.scale is ScaleDtype.E8M0, HAS_GLOBAL=fmt.global_scale, GROUP=fmt.group,
        HAS_BIAS=bias is not None, EVEN_K=k % block_k == 0, DOT_FP32=interpreting(), SPLIT_K=splits,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if splits > 1:
        reduce_partials(target, bias, out)
    return out.reshape(*x.shape[:-1], n)
