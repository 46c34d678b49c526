"""Rounding helpers shared by the kernels, written so that the GPU and Triton's CPU interpreter agree
with torch bit for bit.

Two hardware/interpreter shortcuts are avoided on purpose:

* ``libdevice.rint`` does not exist under ``TRITON_INTERPRET=1``; adding and subtracting 1.5 * 2**23
  rounds a float32 half-to-even in any IEEE implementation (exact for |x| < 2**22, and every caller
  has clamped first);
* the interpreter's float32 → bfloat16 cast truncates (the GPU's rounds to nearest even), so
  :func:`cast_rne` rounds to bfloat16 in integer arithmetic first;
* the interpreter's float32 → float8 cast mis-rounds when the mantissa carries into the exponent
  (1.94 → 1.0), so there values are rounded on the e4m3 grid in float32 arithmetic and written as bit
  patterns; the GPU's own conversion is correctly rounded and is used as it is.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl

# Read once, like Triton itself: the interpreter is chosen before the kernels are first imported.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
_ROUNDING_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23


@triton.jit
def round_half_even(x):
    """Round float32 ``x`` (|x| < 2**22) to the nearest integer, ties to even, as torch.round does."""
    return (x + _ROUNDING_MAGIC) - _ROUNDING_MAGIC


@triton.jit
def cast_rne(x, DTYPE: tl.constexpr):
    """float32 ``x`` cast to ``DTYPE`` rounding to nearest even on every backend (torch's rounding).

    The GPU's own conversion already rounds to nearest even; the integer rounding is only compiled
    in under the interpreter, so the weight-only GEMM's dequantization costs no extra instructions.
    """
    if tl.bfloat16 == DTYPE and _INTERPRETED:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & -65536
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DTYPE)


@triton.jit
def round_to_e4m3(x):
    """Round float32 ``x`` (already clamped to ±448) to the nearest float8 e4m3fn value, ties to even.

    The spacing of e4m3 values is 2**(e - 3) for a number of binary exponent e >= -6 and 2**-9 below
    (subnormals); dividing by a power of two is exact, so the magic-number rounding applies.
    """
    bits = x.to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    step_biased = tl.maximum(biased, 127 - 6) - 3
    step = (step_biased << 23).to(tl.float32, bitcast=True)
    inverse_step = ((254 - step_biased) << 23).to(tl.float32, bitcast=True)
    magnitude = round_half_even(tl.abs(x) * inverse_step) * step
    # The sign bit is copied, not applied by negation: a small negative that rounds to zero must stay
    # -0 (0x80), as torch's cast keeps it, and Triton on the GPU negates +0 into +0 (0 - x).
    sign = (bits >> 31) << 31
    return (magnitude.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def e4m3_bits(v):
    """The float8 e4m3fn bit pattern (int32, 0..255) of float32 ``v`` that is exactly an e4m3 value
    (the interpreter's path of :func:`e4m3_codes`: its own float8 cast cannot be trusted)."""
    bits = v.to(tl.int32, bitcast=True)
    sign = (bits >> 31) & 1
    exponent = ((bits >> 23) & 0xFF) - 127
    normal = ((exponent + 7) << 3) | ((bits >> 20) & 0x7)
    subnormal = (tl.abs(v) * 512.0).to(tl.int32)  # 0..7 steps of 2**-9, exact
    return (sign << 7) | tl.where(exponent >= -6, normal, subnormal)


@triton.jit
def e4m3_codes(q):
    """The e4m3fn bit patterns (int32) of float32 ``q`` already clamped to ±448, rounded to nearest even.

    On the GPU that is the hardware conversion (``cvt.rn.satfinite.e4m3x2.f32``: correctly rounded, sign
    kept); the interpreter's cast mis-rounds, so there the value is rounded on the e4m3 grid first.
    """
    if _INTERPRETED:
        return e4m3_bits(round_to_e4m3(q))
    else:
        return q.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)


@triton.jit
def swizzle_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a 1-D program id onto (tile row, tile column), walking GROUP_M tile rows down a column band
    before moving right, so that consecutive programs share operand tiles in L2."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    group = pid // per_group
    first_m = group * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    return pid_m, pid_n


@triton.jit
def quantize_row_groups(acc, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
                        IS_FP8: tl.constexpr):
    """Per row per GROUP columns of a float32 tile: ``(codes [BLOCK_M, BLOCK_N] int32 — e4m3fn bit
    patterns for fp8 — , scales [BLOCK_M, BLOCK_N // GROUP])``, the arithmetic of
    ``qconvert.quantizers.quantize_activation_groups`` (amax / 127 or / 448, eps for zero groups)."""
    groups: tl.constexpr = BLOCK_N // GROUP
    tiles = tl.reshape(acc, (BLOCK_M, groups, GROUP))
    if IS_FP8:
        scale = tl.math.div_rn(tl.max(tl.abs(tiles), axis=2), 448.0)
    else:
        scale = tl.math.div_rn(tl.max(tl.abs(tiles), axis=2), 127.0)
    scale = tl.where(scale == 0.0, 1.1920928955078125e-07, scale)
    q = tl.math.div_rn(tiles, tl.reshape(scale, (BLOCK_M, groups, 1)))
    if IS_FP8:
        q = e4m3_codes(tl.minimum(tl.maximum(q, -448.0), 448.0))
    else:
        q = round_half_even(tl.minimum(tl.maximum(q, -128.0), 127.0)).to(tl.int32)
    return tl.reshape(q, (BLOCK_M, BLOCK_N)), scale


@triton.jit
def program_tile(M, N, K, K_SPLIT, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile and K range in a split-K GEMM grid ``(tiles, splits)``:
    ``(pid_n, offs_m, offs_n, m_ok, n_ok, k_start, k_end)``."""
    pid_m, pid_n = swizzle_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_start = tl.program_id(1) * K_SPLIT
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_n, offs_m, offs_n, offs_m < M, offs_n < N, k_start, tl.minimum(k_start + K_SPLIT, K)
