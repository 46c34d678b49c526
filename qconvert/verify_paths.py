"""The kernels ``qconvert verify`` runs for each stored format, as a function of (activations, bias).

Each format class (``qconvert.formats``) names its path; :mod:`qconvert.verification` drives them and
checks every output against a reference GEMM on the dequantized operands the kernel saw (``weight_ref``)
within the rounding bound ``gamma`` each path derives here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import torch

from qconvert.formats.args import Strategy, config_group
from qconvert.quantizers import (
    FP8_E4M3_MAX,
    dequantize_tiles,
    fake_quant_static_int8,
    quantize_activation_groups,
    unpack_int32,
    unpack_zero_points,
)

if TYPE_CHECKING:
    from qconvert.formats.base import StoredLayer

_U32 = 2.0**-24  # float32 unit roundoff
# Hopper's fp8 tensor cores do not accumulate in full float32: a k32 MMA step aligns its products and
# the accumulator and keeps about 14 significant bits (DeepSeek-V3 report, section 3.3.2), so each step
# can lose a few units of 2**-13 of the magnitudes it adds. Our block GEMMs promote every 128-wide K
# group (4 steps) to float32, which keeps the error a fraction of sum |a||b| over all of K. This is an
# empirical model of the hardware, not an IEEE guarantee: on an H200, a constant of 2**-11 was exceeded
# by up to 1.6x on two shipped fp8 tiles (tests/test_kernels.py::test_every_shipped_config), so 2**-9
# leaves about 2.5x of margin while staying below what a real fault does (a dropped 128-wide K group on
# a 4096-deep dot: about 2**-8). On the CPU the float32 terms alone apply.
FP8_MMA_GAMMA = 2.0**-9


@dataclass
class KernelRun:
    """What one layer's kernel path produced for one batch of activations."""

    output: torch.Tensor  # [M, N] as the kernel returned it
    act_values: torch.Tensor | None  # quantized activations the GEMM consumed (None: unquantized)
    act_scales: torch.Tensor | None
    act_group: int  # channels per activation scale (K: per token or per tensor)
    act_exact: bool  # codes and scales equal the torch quantizer's
    weight_ref: torch.Tensor  # the dequantized weight the kernel multiplies, exactly ([N, K])
    gamma: float  # accumulated relative rounding of the kernel's dot products (see error_bound)


@dataclass
class KernelPath:
    name: str
    activation: str  # "bf16" | "int8 per token group 128" | ...
    run: Callable[[torch.Tensor, torch.Tensor | None], KernelRun]



def _k_groups(k: int, group: int) -> int:
    return -(-k // group)


def _exact_weight(values: torch.Tensor, scales: torch.Tensor, layer: StoredLayer, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale`` multiplied out in ``dtype`` (float64/float32: exact for 8-bit codes)."""
    th, tw = layer.tile
    rows, cols = -(-layer.shape[0] // th), -(-layer.shape[1] // tw)
    return dequantize_tiles(values.to(dtype), scales.to(dtype).reshape(rows, cols), layer.tile)


class Activations(str, Enum):
    """How a layer's activations are quantized in serving."""

    GROUP = "group"  # dynamic, per token per group of channels
    TOKEN = "token"  # dynamic, per token
    TENSOR = "tensor"  # dynamic, per tensor
    STATIC = "static"  # a calibrated per-tensor input_scale


def _activation_strategy(layer: StoredLayer, config: dict | None, has_static: bool) -> tuple[Activations, int | None]:
    """How the layer's activations are quantized in serving, and the group size where they are grouped."""
    if has_static:
        return Activations.STATIC, None
    group = config_group(config, layer.module) or {}
    args = group.get("input_activations") or {}
    strategy = args.get("strategy")
    if strategy == Activations.GROUP.value:
        return Activations.GROUP, int(args.get("group_size") or layer.tile[1])
    if strategy in (Activations.TOKEN.value, Activations.TENSOR.value):
        return Activations(strategy), None
    # No activation config (DeepSeek FP8, SGLang blockwise_int8): their runtimes quantize per token
    # per 128 channels for block weights, per token otherwise.
    return (Activations.GROUP, layer.tile[1]) if layer.strategy is Strategy.BLOCK else (Activations.TOKEN, None)


def packed_path(layer: StoredLayer, tensors: dict[str, torch.Tensor], device: torch.device) -> KernelPath:
    """``pack-quantized`` (W4A16 / W8A16, and wNa8o8's static int8 fake-quant): the packed Triton GEMM."""
    from qconvert import kernels

    k = layer.shape[1]
    scales = tensors["weight_scale"]
    input_scale, output_scale = tensors.get("input_scale"), tensors.get("output_scale")
    bits = layer.num_bits
    codes = unpack_int32(tensors["weight_packed"], bits, k)
    packed_zeros = tensors.get("weight_zero_point")
    zeros = None if packed_zeros is None else unpack_zero_points(packed_zeros, bits, layer.shape[0])
    # The kernel rounds each dequantized weight to the scale dtype before its bf16/fp16 dot, as
    # compressed-tensors does when it rebuilds the weight; the reference uses those same values.
    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    if zeros is None:
        weight_ref = _exact_weight(codes, scales, layer, layer.dtype).to(ref_dtype)
    else:  # (code - zero) * scale rounded to the scale dtype, exactly as compressed-tensors rebuilds it
        weight_ref = layer.format.rebuild(layer, tensors).to(ref_dtype)
    gamma = k * _U32  # float32 accumulation over K products of exact (bf16 x bf16) terms
    wna8o8 = input_scale is not None or output_scale is not None

    def run_packed(x: torch.Tensor, bias: torch.Tensor | None) -> KernelRun:
        x_in = kernels.fake_quant_static_int8(x, input_scale) if input_scale is not None else x
        out = kernels.packed_gemm(x_in, tensors["weight_packed"], scales, bits, k, bias=bias,
                                  out_dtype=torch.float32, zero_points=zeros)
        exact = True
        if input_scale is not None:
            exact = torch.equal(x_in.cpu(), fake_quant_static_int8(x.cpu(), input_scale.cpu()))
        if output_scale is not None:
            # The output fake-quant is checked bit for bit; the GEMM is compared before it, since
            # requantizing would turn the GEMM's last-bit differences into whole steps.
            y = out.to(x.dtype)
            exact &= torch.equal(kernels.fake_quant_static_int8(y, output_scale).cpu(),
                                 fake_quant_static_int8(y.cpu(), output_scale.cpu()))
        return KernelRun(out, x_in, None, k, exact, weight_ref, gamma)

    kind = "" if zeros is None else " asymmetric"
    name = f"W{bits}A16{kind} packed GEMM (Triton)" + (" + static int8 fake-quant (wNa8o8)" if wna8o8 else "")
    activation = "int8 static fake-quant" if input_scale is not None else str(layer.dtype).removeprefix("torch.")
    return KernelPath(name, activation, run_packed)


def scaled_path(layer: StoredLayer, tensors: dict[str, torch.Tensor], config: dict | None,
                device: torch.device, fp8: bool) -> KernelPath:
    """int8 / fp8 codes stored as they are: dynamic (or static) activation quantization, then the
    block-scaled Triton GEMM, the per-token x per-channel int8 GEMM, or the FP8 ``_scaled_mm`` dispatch."""
    from qconvert import kernels

    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    k = layer.shape[1]
    scales = tensors.get("weight_scale", tensors.get("weight_scale_inv"))
    input_scale = tensors.get("input_scale")
    values = tensors["weight"]
    note = ""
    if values.dtype == torch.float8_e4m3fnuz:
        values, scales = kernels.e4m3fnuz_to_e4m3fn(values, scales.to(torch.float32))
        if input_scale is not None:
            input_scale = input_scale.to(torch.float32) / 2
        note = " (e4m3fnuz read back as e4m3fn, scales halved: exact)"
    kind = "float" if fp8 else "int"  # the activation kernels' name for the code type
    weight_ref = _exact_weight(values, scales, layer, ref_dtype)
    strategy, group = _activation_strategy(layer, config, input_scale is not None)
    stored_name = "fp8" if fp8 else "int8"
    act_group = group if strategy is Activations.GROUP else k
    if strategy is Activations.STATIC:
        activation = f"{stored_name} static per-tensor"
    elif strategy is Activations.GROUP:
        activation = f"{stored_name} per token per {group} channels"
    else:
        activation = f"{stored_name} per {strategy.value} (dynamic)"

    def quantize_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if strategy is Activations.STATIC:
            static = input_scale.to(torch.float32).reshape(1)
            q, s = kernels.quantize_activations(x, kind=kind, static_scale=static)
            ref_q = _static_reference(x.cpu(), static.cpu(), kind)
            return q, s, torch.equal(q.view(torch.uint8).cpu(), ref_q.view(torch.uint8))
        if strategy is Activations.TENSOR:
            amax = x.abs().amax().to(torch.float32)
            static = (amax / (FP8_E4M3_MAX if fp8 else 127.0)).clamp_min(torch.finfo(torch.float32).eps)
            q, s = kernels.quantize_activations(x, kind=kind, static_scale=static.reshape(1))
            ref_q = _static_reference(x.cpu(), static.reshape(1).cpu(), kind)
            return q, s, torch.equal(q.view(torch.uint8).cpu(), ref_q.view(torch.uint8))
        q, s = kernels.quantize_activations(x, act_group, kind)
        # The torch reference runs on the CPU: on CUDA, torch divides by a Python scalar as a multiply
        # by its reciprocal, which is not the quantizer arithmetic the converter and readers use.
        ref_q, ref_s = quantize_activation_groups(x.cpu(), act_group, kind)
        return q, s, torch.equal(q.view(torch.uint8).cpu(), ref_q.view(torch.uint8)) and torch.equal(s.cpu(), ref_s)

    grouped = layer.strategy is Strategy.BLOCK or strategy is Activations.GROUP
    use_scaled_mm = fp8 and not grouped
    if use_scaled_mm:
        name = "FP8 torch._scaled_mm dispatch"
        # fp8 products are exact in float32; on the CPU they are summed in float32 over K. On a GPU the
        # tensor cores sum them (see FP8_MMA_GAMMA); cuBLAS without fast accumulation promotes to
        # float32 as our block kernels do, so one FP8_MMA_GAMMA covers all of K (on an H200 the
        # 0.97 GB checkpoint's worst fp8 layer used 0.7 of the float32 terms alone).
        gamma = (k + 4) * _U32
        if device.type == "cuda":
            gamma += FP8_MMA_GAMMA
    elif grouped:
        name = f"block-scaled {stored_name} GEMM (Triton)"
        # Per K group: an exact int32 (int8) or float32 (fp8: products of 4-bit mantissas, exact;
        # sums of at most 128 such terms carry at most 128 roundings) dot, then two multiplies and
        # one add per group in float32.
        gamma = (_k_groups(k, layer.tile[1]) * 4 + (128 if fp8 else 0)) * _U32
        if fp8 and device.type == "cuda":
            gamma += FP8_MMA_GAMMA
    else:
        name = f"{stored_name} GEMM, per-token x per-channel scales (Triton)"
        gamma = 4 * _U32  # one exact int32 dot over K, then two multiplies
    name += note

    def run_quantized(x: torch.Tensor, bias: torch.Tensor | None) -> KernelRun:
        q, s, exact = quantize_input(x)
        if use_scaled_mm:
            out = kernels.fp8_linear(q.reshape(-1, k), s.reshape(-1, 1) if s.numel() > 1 else s.reshape(1),
                                     values, scales.reshape(-1, 1) if scales.numel() > 1 else scales.reshape(1),
                                     bias=bias, out_dtype=torch.bfloat16)
        else:
            out = kernels.scaled_gemm(q, s, values, scales, bias=bias, out_dtype=torch.float32,
                                      group_k=layer.tile[1] if layer.strategy is Strategy.BLOCK else (group or 128))
        return KernelRun(out, q, s, act_group if s.shape[-1] > 1 else k, exact, weight_ref, gamma)

    return KernelPath(name, activation, run_quantized)


def _static_reference(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    q = x.to(torch.float32) / scale
    if kind == "float":
        return q.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.clamp(-128, 127).round().to(torch.int8)




def microscaled_path(layer: StoredLayer, tensors: dict[str, torch.Tensor], device: torch.device,
                     group_scales: torch.Tensor, codes: torch.Tensor, kernel_format: str) -> KernelPath:
    """NVFP4 / MXFP4 / MXFP8, weight-only: the Triton GEMM that unpacks codes and scales in registers (Hopper has
    no FP4 tensor cores: as Marlin FP4 does, each weight is rebuilt in the activation dtype before the dot)."""
    from qconvert.kernels.microscaled import microscaled_gemm

    k = layer.shape[1]
    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    group = layer.tile[1]
    # The weight the kernel multiplies: code x float32 multiplier, rounded to the activation dtype (what
    # compressed-tensors rebuilds); the reference GEMM runs on exactly these values.
    multipliers = group_scales.to(torch.float32).repeat_interleave(group, dim=1)
    rebuilt = (codes.to(torch.float32) * multipliers).to(layer.dtype)
    weight_ref = rebuilt.to(ref_dtype)
    gamma = k * _U32  # float32 accumulation over K products of exact (bf16 x bf16) terms

    values = tensors.get("weight_packed", tensors.get("weight"))

    def run(x: torch.Tensor, bias: torch.Tensor | None) -> KernelRun:
        out = microscaled_gemm(x, kernel_format, values, tensors["weight_scale"], tensors.get("weight_global_scale"),
                               bias=bias, out_dtype=torch.float32)
        return KernelRun(out, x, None, k, True, weight_ref, gamma)

    return KernelPath(f"{layer.format.name} weight-only GEMM (Triton, unpacked in registers)",
                      str(layer.dtype).removeprefix("torch."), run)
