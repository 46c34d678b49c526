"""Quantization kernels: per-token-group activations and 2-D weight blocks, int8 and fp8.

Each kernel has a torch twin in :mod:`qconvert.quantizers` and matches it bit for bit (the tests check
every code and scale): divisions are correctly rounded (``div_rn``; Triton's plain ``/`` is an
approximate division on the GPU), casts round to nearest even, and rounding goes through
:mod:`qconvert.kernels.rounding`. The seed kernels' defects are gone: values are rounded, not
truncated; they are clamped; an all-zero group gets a tiny positive scale instead of 0 (and NaNs);
rows, groups and blocks at the edges are masked, so no size has to be a multiple of anything.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qconvert.kernels.rounding import cast_rne, e4m3_codes, round_half_even
from qconvert.quantizers import ACTIVATION_INT8_DIVISOR, FP8_E4M3_MAX, int_range, scale_divisor

_FP32_EPS = float(torch.finfo(torch.float32).eps)


@triton.jit
def _to_codes(q, IS_FP8: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """Clamp a float32 quotient and round it onto the stored grid: int32 values for int8 outputs, the
    e4m3fn bit patterns for fp8 outputs (which the wrappers pass as uint8 views)."""
    q = tl.minimum(tl.maximum(q, QMIN), QMAX)
    if IS_FP8:  # noqa: SIM108
        codes = e4m3_codes(q)
    else:
        codes = round_half_even(q).to(tl.int32)
    return codes


@triton.jit
def _activation_quant_kernel(
    x_ptr, y_ptr, s_ptr, static_scale_ptr, M, K, GROUP, stride_xm, stride_ym, stride_sm,
    DIVISOR: tl.constexpr, IS_FP8: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr,
    STATIC: tl.constexpr, SINGLE_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    start = group * GROUP
    end = tl.minimum(start + GROUP, K)
    row_ok = rows < M
    offs = tl.arange(0, BLOCK_G)
    if SINGLE_CHUNK:
        # The whole group fits one tile: read it once and keep it in registers.
        cols = start + offs
        mask = row_ok[:, None] & (cols[None, :] < end)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if STATIC:
            scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(static_scale_ptr).to(tl.float32)
        else:
            scale = tl.math.div_rn(tl.max(tl.abs(x), axis=1), DIVISOR)
            scale = tl.where(scale == 0.0, 1.1920928955078125e-07, scale)
            tl.store(s_ptr + rows * stride_sm + group, scale, mask=row_ok)
        q = _to_codes(tl.math.div_rn(x, scale[:, None]), IS_FP8, QMIN, QMAX)
        tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], q.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        if STATIC:
            scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(static_scale_ptr).to(tl.float32)
        else:
            amax = tl.zeros([BLOCK_M], dtype=tl.float32)
            for chunk in range(start, end, BLOCK_G):
                cols = chunk + offs
                mask = row_ok[:, None] & (cols[None, :] < end)
                x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
            scale = tl.math.div_rn(amax, DIVISOR)
            scale = tl.where(scale == 0.0, 1.1920928955078125e-07, scale)
            tl.store(s_ptr + rows * stride_sm + group, scale, mask=row_ok)
        for chunk in range(start, end, BLOCK_G):
            cols = chunk + offs
            mask = row_ok[:, None] & (cols[None, :] < end)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            q = _to_codes(tl.math.div_rn(x, scale[:, None]), IS_FP8, QMIN, QMAX)
            tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], q.to(y_ptr.dtype.element_ty), mask=mask)


def _stored_dtype(kind: str) -> torch.dtype:
    if kind not in ("int", "float"):
        raise ValueError(f"kind must be 'int' or 'float', not {kind!r}")
    return torch.float8_e4m3fn if kind == "float" else torch.int8


def _storage(values: torch.Tensor) -> torch.Tensor:
    """fp8 outputs are written as their bit patterns (see ``rounding.e4m3_codes``)."""
    return values.view(torch.uint8) if values.dtype == torch.float8_e4m3fn else values


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.is_contiguous() else x.reshape(-1, x.shape[-1]).contiguous()


def quantize_activations(x: torch.Tensor, group_size: int = 128, kind: str = "int",
                         static_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group quantization of ``x [..., K]``: ``(codes [..., K], scales float32 [..., ceil(K/g)])``.

    ``group_size >= K`` gives one scale per token. With ``static_scale`` (one value), that scale is used
    for every element (static per-tensor activations) and returned as the scales. Bit-identical to
    :func:`qconvert.quantizers.quantize_activation_groups` (and, for static scales, to quantizing
    ``x / scale`` in float32).
    """
    stored = _stored_dtype(kind)
    rows = _rows(x)
    m, k = rows.shape
    group = k if static_scale is not None else min(group_size, k)
    groups = -(-k // group)
    values = torch.empty((m, k), dtype=stored, device=x.device)
    scales = torch.empty((m, groups), dtype=torch.float32, device=x.device)
    block_g = min(triton.next_power_of_2(group), 1024)
    block_m = max(1, min(16, 4096 // block_g))
    static = scales if static_scale is None else static_scale.reshape(1).to(device=x.device, dtype=torch.float32)
    qmin, qmax = (-FP8_E4M3_MAX, FP8_E4M3_MAX) if kind == "float" else int_range(8)
    grid = (triton.cdiv(m, block_m), groups)
    if m:
        _activation_quant_kernel[grid](
            rows, _storage(values), scales, static, m, k, group, rows.stride(0), values.stride(0), scales.stride(0),
            DIVISOR=FP8_E4M3_MAX if kind == "float" else ACTIVATION_INT8_DIVISOR, IS_FP8=kind == "float",
            QMIN=float(qmin), QMAX=float(qmax), STATIC=static_scale is not None, SINGLE_CHUNK=group <= block_g,
            BLOCK_M=block_m, BLOCK_G=block_g, num_warps=4,
        )
    if static_scale is not None:
        scales = static.expand(m, 1)
    return values.reshape(x.shape), scales.reshape(*x.shape[:-1], scales.shape[-1])


@triton.jit
def _activation_dequant_kernel(q_ptr, s_ptr, y_ptr, M, K, GROUP, stride_qm, stride_sm, stride_ym,
                               BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    q = tl.load(q_ptr + rows[:, None] * stride_qm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + rows[:, None] * stride_sm + cols[None, :] // GROUP, mask=mask, other=0.0)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], cast_rne(q * s, y_ptr.dtype.element_ty), mask=mask)


def dequantize_activations(values: torch.Tensor, scales: torch.Tensor, group_size: int = 128,
                           dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``codes * scale`` per token and group, computed in float32 and stored as ``dtype``."""
    q = _rows(values)
    m, k = q.shape
    s = scales.reshape(m, -1).to(torch.float32).contiguous()
    if s.shape[1] > 1 and s.shape[1] != -(-k // group_size):
        raise ValueError(f"{s.shape[1]} scales per row do not match K={k} in groups of {group_size}")
    group = group_size if s.shape[1] > 1 else max(k, 1)
    y = torch.empty((m, k), dtype=dtype, device=values.device)
    if m and k:
        grid = (triton.cdiv(m, 16), triton.cdiv(k, 128))
        _activation_dequant_kernel[grid](q, s, y, m, k, group, q.stride(0), s.stride(0), y.stride(0),
                                         BLOCK_M=16, BLOCK_K=128)
    return y.reshape(values.shape)


@triton.jit
def _weight_block_quant_kernel(
    w_ptr, q_ptr, s_ptr, N, K, stride_w, stride_q, stride_s, eps, DIVISOR: tl.constexpr,
    IS_FP8: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    bn = tl.program_id(0)
    bk = tl.program_id(1)
    rows = bn * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = bk * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    w = tl.load(w_ptr + rows[:, None] * stride_w + cols[None, :], mask=mask, other=0.0)
    dtype = w_ptr.dtype.element_ty
    # amax is exact in any dtype; the scale is computed in float32 and stored in the weight dtype,
    # and the quotient is rounded to the weight dtype before clamping, as the torch quantizer does.
    scale = cast_rne(tl.math.div_rn(tl.max(tl.max(tl.abs(w.to(tl.float32)), axis=1), axis=0), DIVISOR), dtype)
    scale = tl.where(scale == 0.0, eps, scale.to(tl.float32)).to(dtype)
    tl.store(s_ptr + bn * stride_s + bk, scale)
    quotient = cast_rne(tl.math.div_rn(w.to(tl.float32), scale.to(tl.float32)), dtype).to(tl.float32)
    q = _to_codes(quotient, IS_FP8, QMIN, QMAX)
    tl.store(q_ptr + rows[:, None] * stride_q + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)


def _check_block(block: tuple[int, int]) -> None:
    if any(b < 16 or b & (b - 1) for b in block):
        raise ValueError(f"block {block}: the kernels need powers of two of at least 16")


def quantize_weight_blocks(weight: torch.Tensor, block: tuple[int, int] = (128, 128), kind: str = "int",
                           num_bits: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [N, K], scales [ceil(N/bh), ceil(K/bw)] in the weight dtype)``: bit-identical to
    ``qconvert.quantizers.quantize_tiled(weight, block, kind, num_bits)``, which the converter uses."""
    if weight.dim() != 2:
        raise ValueError("quantize_weight_blocks expects a 2-D weight")
    _check_block(block)
    stored = _stored_dtype(kind)
    w = weight.contiguous()
    n, k = w.shape
    rows, cols = triton.cdiv(n, block[0]), triton.cdiv(k, block[1])
    values = torch.empty((n, k), dtype=stored, device=w.device)
    scales = torch.empty((rows, cols), dtype=w.dtype, device=w.device)
    qmin, qmax = (-FP8_E4M3_MAX, FP8_E4M3_MAX) if kind == "float" else int_range(num_bits)
    if n and k:
        _weight_block_quant_kernel[(rows, cols)](
            w, _storage(values), scales, n, k, w.stride(0), values.stride(0), scales.stride(0),
            float(torch.finfo(w.dtype).eps), DIVISOR=scale_divisor(kind, num_bits), IS_FP8=kind == "float",
            QMIN=float(qmin), QMAX=float(qmax), BLOCK_N=block[0], BLOCK_K=block[1], num_warps=8,
        )
    return values, scales


@triton.jit
def _weight_block_dequant_kernel(q_ptr, s_ptr, y_ptr, N, K, stride_q, stride_s, stride_y,
                                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    bn = tl.program_id(0)
    bk = tl.program_id(1)
    rows = bn * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = bk * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    q = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(s_ptr + bn * stride_s + bk)
    # In the scale's dtype, as the compressed-tensors reader computes it, then the requested dtype.
    y = cast_rne(q * scale.to(tl.float32), s_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


def dequantize_weight_blocks(values: torch.Tensor, scales: torch.Tensor, block: tuple[int, int] = (128, 128),
                             dtype: torch.dtype | None = None) -> torch.Tensor:
    """``values * scale`` per block, in the scale dtype (then ``dtype``): bit-identical to
    ``qconvert.quantizers.dequantize_tiles``."""
    _check_block(block)
    q = values.contiguous()
    n, k = q.shape
    rows, cols = triton.cdiv(n, block[0]), triton.cdiv(k, block[1])
    if tuple(scales.shape) != (rows, cols):
        raise ValueError(f"scales {list(scales.shape)} do not cover a {n}x{k} weight in {block} blocks")
    s = scales.contiguous()
    y = torch.empty((n, k), dtype=dtype or scales.dtype, device=values.device)
    if n and k:
        _weight_block_dequant_kernel[(rows, cols)](q, s, y, n, k, q.stride(0), s.stride(0), y.stride(0),
                                                   BLOCK_N=block[0], BLOCK_K=block[1], num_warps=8)
    return y


@triton.jit
def _fake_quant_kernel(x_ptr, y_ptr, s_ptr, numel, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    dtype = x_ptr.dtype.element_ty
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    scale = cast_rne(tl.load(s_ptr), dtype)
    # In x's dtype, as the wNa8o8 scheme computes it: the quotient is rounded to that dtype first.
    q = cast_rne(tl.math.div_rn(x.to(tl.float32), scale.to(tl.float32)), dtype).to(tl.float32)
    q = tl.minimum(tl.maximum(round_half_even(tl.minimum(tl.maximum(q, -256.0), 256.0)), -128.0), 127.0)
    tl.store(y_ptr + offs, cast_rne(q * scale.to(tl.float32), dtype), mask=mask)


def fake_quant_static_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor int8 quantize-dequantize in ``x``'s dtype (wNa8o8's input and output):
    bit-identical to :func:`qconvert.quantizers.fake_quant_static_int8`."""
    flat = x.contiguous().reshape(-1)
    y = torch.empty_like(flat)
    s = scale.reshape(1).to(device=x.device, dtype=torch.float32)
    if flat.numel():
        _fake_quant_kernel[(triton.cdiv(flat.numel(), 1024),)](flat, y, s, flat.numel(), BLOCK=1024)
    return y.reshape(x.shape)


@triton.jit
def _gelu_requant_kernel(q_ptr, s_ptr, y_ptr, t_ptr, M, N, GROUP, stride_q, stride_s, stride_y, stride_t,
                         BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    group = tl.program_id(1)
    cols = group * GROUP + tl.arange(0, BLOCK_G)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols[None, :] < tl.minimum(group * GROUP + GROUP, N))
    q = tl.load(q_ptr + rows[:, None] * stride_q + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x = q * tl.load(s_ptr + rows * stride_s + group, mask=row_ok, other=0.0)[:, None]
    g = 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))
    scale = tl.math.div_rn(tl.max(tl.abs(g), axis=1), 127.0)
    scale = tl.where(scale == 0.0, 1.1920928955078125e-07, scale)
    tl.store(t_ptr + rows * stride_t + group, scale, mask=row_ok)
    codes = round_half_even(tl.minimum(tl.maximum(tl.math.div_rn(g, scale[:, None]), -128.0), 127.0))
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], codes.to(tl.int8), mask=mask)


def gelu_requant(values: torch.Tensor, scales: torch.Tensor,
                 group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 activations in, GELU (erf form) applied in float32, int8 activations out, per token per
    ``group_size`` channels on both sides: the MLP's activation without a full-precision round trip."""
    q = _rows(values)
    m, n = q.shape
    groups = triton.cdiv(n, group_size)
    s = scales.reshape(m, groups).to(torch.float32).contiguous()
    y = torch.empty_like(q)
    t = torch.empty((m, groups), dtype=torch.float32, device=q.device)
    block_g = triton.next_power_of_2(group_size)
    if m:
        _gelu_requant_kernel[(triton.cdiv(m, 16), groups)](q, s, y, t, m, n, group_size, q.stride(0), s.stride(0),
                                                          y.stride(0), t.stride(0), BLOCK_M=16, BLOCK_G=block_g)
    return y.reshape(values.shape), t.reshape(*values.shape[:-1], groups)
