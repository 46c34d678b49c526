"""FP8 linear dispatch for per-tensor and per-channel FP8 weights, as vLLM's ``Fp8LinearOp`` does it
(seed 001), on ``torch._scaled_mm``:

* per-tensor weight and per-tensor activations → one ``_scaled_mm`` with both scalar scales;
* otherwise (per-channel weight and/or per-token activations) → row-wise ``_scaled_mm`` (scales
  ``[M, 1]`` and ``[1, N]``, bf16 output) where the device supports it, else the channel-wise
  fallback: ``_scaled_mm`` with unit scales into float32, then both scales and the bias;
* shapes cuBLAS's FP8 GEMM refuses (K or N not a multiple of 16) go to qconvert's Triton kernel.

e4m3fnuz weights (ROCm) are turned back into e4m3fn exactly (:func:`e4m3fnuz_to_e4m3fn`) on GPUs
without that format.
"""

from __future__ import annotations

import functools

import torch

from qconvert.kernels.gemm import scaled_gemm

_ONE = {}


def _unit(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _ONE:
        _ONE[key] = torch.ones((), dtype=torch.float32, device=device)
    return _ONE[key]


@functools.cache
def rowwise_supported(device_type: str, index: int | None = None) -> bool:
    """Whether ``torch._scaled_mm`` takes per-row/per-column scales here (Hopper and newer, or CPU)."""
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        a = torch.zeros((16, 32), device=device).to(torch.float8_e4m3fn)
        b = torch.zeros((16, 32), device=device).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, b.t(), scale_a=torch.ones((16, 1), device=device),
                         scale_b=torch.ones((1, 16), device=device), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


def e4m3fnuz_to_e4m3fn(values: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Undo the ROCm normalization exactly: the same bits read as e4m3fn are worth twice as much, so
    the scales are halved; fnuz's NaN (0x80) becomes e4m3fn's NaN (0x7F). Every code keeps its value."""
    bits = values.view(torch.uint8)
    bits = torch.where(bits == 0x80, 0x7F, bits).to(torch.uint8)
    return bits.view(torch.float8_e4m3fn), scales / 2


def fp8_linear(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
               bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(x_q * x_scale) @ (weight * weight_scale)^T + bias``; ``x_q [M, K]`` e4m3fn with one scale or one
    per row, ``weight [N, K]`` e4m3fn with one scale or one per output channel (``[N, 1]``)."""
    m, k = x_q.shape
    n = weight.shape[0]
    sx = x_scale.to(torch.float32)
    sw = weight_scale.to(torch.float32)
    if x_q.device.type == "cuda" and (k % 16 or n % 16):
        return scaled_gemm(x_q, sx.reshape(m, 1) if sx.numel() > 1 else sx, weight,
                           sw.reshape(n, 1) if sw.numel() > 1 else sw, bias=bias, out_dtype=out_dtype)
    if sx.numel() == 1 and sw.numel() == 1:
        return torch._scaled_mm(x_q, weight.t(), scale_a=sx.reshape(()), scale_b=sw.reshape(()), bias=bias,
                                out_dtype=out_dtype)
    sx = sx.reshape(-1, 1).expand(m, 1).contiguous()
    sw = sw.reshape(1, -1).expand(1, n).contiguous()
    device = x_q.device
    if out_dtype == torch.bfloat16 and rowwise_supported(device.type, device.index):
        out = torch._scaled_mm(x_q, weight.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16)
        return out if bias is None else (out.to(torch.float32) + bias.to(torch.float32)).to(out_dtype)
    unit = _unit(device)
    out = torch._scaled_mm(x_q, weight.t(), scale_a=unit, scale_b=unit, out_dtype=torch.float32)
    out = out * sx * sw
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(out_dtype)
