"""``qconvert verify``: run each quantized layer's serving kernels and check them against references.

For every quantized layer (one at a time, so memory stays near the largest layer):

1. Seeded random activations for each token count, in the layer's dtype.
2. The kernel path its scheme runs in serving (:func:`kernel_path`): activation quantization with
   qconvert's Triton kernel, then the GEMM (block-scaled int8/fp8 Triton GEMM, the packed
   W4A16/W8A16 Triton GEMM, or the FP8 ``_scaled_mm`` dispatch), with the layer's bias fused.
3. Checks. The activation codes and scales must equal the torch quantizer's bit for bit. The GEMM
   output is compared with a reference GEMM on the *dequantized operands the kernel saw* (the same
   codes and scales, multiplied out exactly), in float64 on the CPU and float32 on a GPU, so the
   comparison isolates the kernel's arithmetic. Each element must lie within a rounding-error bound
   (:func:`error_bound`) whose constants are derived per path below; the report's ``kernel ratio`` is
   the worst ``|out - ref| / bound`` (pass: ≤ 1).
4. With ``--original``: the stored weight against the unquantized one. Round-to-nearest bounds every
   element's error by half a quantization step of its own scale (fp8: half an e4m3 spacing at its
   magnitude), plus the rounding of the quotient in the weight dtype and any clamping, so
   :func:`weight_error_bound` checks that exactly; plus relative error and SNR of the weight and of
   the layer's output (kernel output vs the unquantized layer on unquantized activations).
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch

from qconvert.checkpoint import Checkpoint, open_checkpoint, resolve_source
from qconvert.errors import BadInputError
from qconvert.quantizers import (
    FP8_E4M3_MAX,
    dequantize_activation_groups,
    dequantize_tiles,
    fake_quant_static_int8,
    int_range,
    quantize_activation_groups,
    unpack_int32,
)
from qconvert.safetensors_io import TensorReader
from qconvert.sources import StoredLayer, config_group, stored_layers

DEFAULT_TOKENS = (1, 16, 128)
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
_UNIT_ROUNDOFF = {torch.float32: _U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}


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
    kind: str  # int | float
    activation: str  # "bf16" | "int8 per token group 128" | ...
    run: Callable[[torch.Tensor, torch.Tensor | None], KernelRun]


@dataclass
class LayerResult:
    module: str
    scheme: str
    path: str
    activation: str
    shape: list[int]
    tokens: list[int]
    kernel_ratio: float  # worst |out - ref| / bound over tokens and elements; ≤ 1 passes
    kernel_rel_error: float  # ||out - ref|| / ||ref||, worst over token counts
    activation_exact: bool
    kernel_ok: bool
    weight_rel_error: float | None = None
    weight_snr_db: float | None = None
    weight_bound_ratio: float | None = None  # worst |w - ŵ| / exact RTN bound; ≤ 1 passes
    weight_violations: int | None = None
    output_rel_error: float | None = None
    output_snr_db: float | None = None
    weight_ok: bool | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.kernel_ok and self.weight_ok is not False


@dataclass
class VerifyReport:
    path: str
    device: str
    original: str | None
    tokens: list[int]
    layers: list[LayerResult]
    # Quantized tensors that belong to no compressed-tensors layer qconvert reads, so were not checked:
    # per-expert tensors in vLLM's gpt-oss spelling (`experts.3.w13_weight_packed`).
    not_verified: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(layer.ok for layer in self.layers)

    def to_json(self) -> dict:
        failed = [layer.module for layer in self.layers if not layer.ok]
        return {
            "path": self.path, "device": self.device, "original": self.original, "tokens": self.tokens,
            "ok": self.ok, "layers_checked": len(self.layers), "layers_failed": failed,
            "layers": [{**asdict(layer), "ok": layer.ok} for layer in self.layers],
            "not_verified": self.not_verified,
        }


def error_bound(ref: torch.Tensor, abs_dot: torch.Tensor, gamma: float, out_dtype: torch.dtype,
                ref_gamma: float) -> torch.Tensor:
    """Elementwise bound on ``|kernel - reference|``.

    ``u_out * |ref|`` is the final rounding to the output dtype; ``(gamma + ref_gamma) * (|A| @ |B|^T)``
    is the classical bound on floating-point dot products (n roundings of relative size u each
    contribute at most ``n * u`` times the sum of the absolute products) for the kernel and for the
    reference. A tiny absolute term absorbs float32 underflow.
    """
    u_out = _UNIT_ROUNDOFF[out_dtype]
    return u_out * ref.abs() * (1 + 2 * u_out) + (gamma + ref_gamma) * abs_dot + 1e-30


def _k_groups(k: int, group: int) -> int:
    return -(-k // group)


def _weight_tensors(layer: StoredLayer, reader: TensorReader, device: torch.device) -> dict[str, torch.Tensor]:
    return {leaf: reader.read(info).to(device) for leaf, info in layer.parts.items() if leaf != "weight_shape"}


def _exact_weight(values: torch.Tensor, scales: torch.Tensor, layer: StoredLayer, dtype: torch.dtype) -> torch.Tensor:
    """``codes * scale`` multiplied out in ``dtype`` (float64/float32: exact for 8-bit codes)."""
    th, tw = layer.tile
    rows, cols = -(-layer.shape[0] // th), -(-layer.shape[1] // tw)
    return dequantize_tiles(values.to(dtype), scales.to(dtype).reshape(rows, cols), layer.tile)


def _activation_strategy(layer: StoredLayer, config: dict | None, has_static: bool) -> tuple[str, int | None]:
    """How the layer's activations are quantized in serving: ("group", g) | ("token", None) |
    ("tensor", None) | ("static", None) | ("none", None)."""
    if layer.layout == "pack-quantized":
        return "none", None
    if has_static:
        return "static", None
    group = config_group(config, layer.module) or {}
    args = group.get("input_activations") or {}
    strategy = args.get("strategy")
    if strategy == "group":
        return "group", int(args.get("group_size") or layer.tile[1])
    if strategy in ("token", "tensor"):
        return strategy, None
    # No activation config (DeepSeek FP8, SGLang blockwise_int8): their runtimes quantize per token
    # per 128 channels for block weights, per token otherwise.
    return ("group", layer.tile[1]) if layer.strategy == "block" else ("token", None)


def kernel_path(layer: StoredLayer, tensors: dict[str, torch.Tensor], config: dict | None,
                device: torch.device) -> KernelPath:
    """The kernels a runtime runs for this layer, as a function of (activations, bias)."""
    from qconvert import kernels

    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    k = layer.shape[1]
    scales = tensors.get("weight_scale", tensors.get("weight_scale_inv"))
    input_scale, output_scale = tensors.get("input_scale"), tensors.get("output_scale")

    if layer.layout == "pack-quantized":
        bits = layer.num_bits
        codes = unpack_int32(tensors["weight_packed"], bits, k)
        # The kernel rounds each dequantized weight to the scale dtype before its bf16/fp16 dot, as
        # compressed-tensors does when it rebuilds the weight; the reference uses those same values.
        weight_ref = _exact_weight(codes, scales, layer, layer.dtype).to(ref_dtype)
        gamma = k * _U32  # float32 accumulation over K products of exact (bf16 x bf16) terms
        wna8o8 = input_scale is not None or output_scale is not None

        def run_packed(x: torch.Tensor, bias: torch.Tensor | None) -> KernelRun:
            x_in = kernels.fake_quant_static_int8(x, input_scale) if input_scale is not None else x
            out = kernels.packed_gemm(x_in, tensors["weight_packed"], scales, bits, k, bias=bias,
                                      out_dtype=torch.float32)
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

        name = f"W{bits}A16 packed GEMM (Triton)" + (" + static int8 fake-quant (wNa8o8)" if wna8o8 else "")
        activation = "int8 static fake-quant" if input_scale is not None else str(layer.dtype).removeprefix("torch.")
        return KernelPath(name, "int", activation, run_packed)

    values = tensors["weight"]
    note = ""
    if values.dtype == torch.float8_e4m3fnuz:
        values, scales = kernels.e4m3fnuz_to_e4m3fn(values, scales.to(torch.float32))
        if input_scale is not None:
            input_scale = input_scale.to(torch.float32) / 2
        note = " (e4m3fnuz read back as e4m3fn, scales halved: exact)"
    kind = layer.kind
    weight_ref = _exact_weight(values, scales, layer, ref_dtype)
    strategy, group = _activation_strategy(layer, config, input_scale is not None)
    stored_name = "fp8" if kind == "float" else "int8"
    act_group = group if strategy == "group" else k
    if strategy == "static":
        activation = f"{stored_name} static per-tensor"
    elif strategy == "group":
        activation = f"{stored_name} per token per {group} channels"
    else:
        activation = f"{stored_name} per {strategy} (dynamic)"

    def quantize_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if strategy == "static":
            static = input_scale.to(torch.float32).reshape(1)
            q, s = kernels.quantize_activations(x, kind=kind, static_scale=static)
            ref_q = _static_reference(x.cpu(), static.cpu(), kind)
            return q, s, torch.equal(q.view(torch.uint8).cpu(), ref_q.view(torch.uint8))
        if strategy == "tensor":
            amax = x.abs().amax().to(torch.float32)
            static = (amax / (FP8_E4M3_MAX if kind == "float" else 127.0)).clamp_min(torch.finfo(torch.float32).eps)
            q, s = kernels.quantize_activations(x, kind=kind, static_scale=static.reshape(1))
            ref_q = _static_reference(x.cpu(), static.reshape(1).cpu(), kind)
            return q, s, torch.equal(q.view(torch.uint8).cpu(), ref_q.view(torch.uint8))
        q, s = kernels.quantize_activations(x, act_group, kind)
        # The torch reference runs on the CPU: on CUDA, torch divides by a Python scalar as a multiply
        # by its reciprocal, which is not the quantizer arithmetic the converter and readers use.
        ref_q, ref_s = quantize_activation_groups(x.cpu(), act_group, kind)
        return q, s, torch.equal(q.view(torch.uint8).cpu(), ref_q.view(torch.uint8)) and torch.equal(s.cpu(), ref_s)

    grouped = layer.strategy == "block" or strategy == "group"
    use_scaled_mm = kind == "float" and not grouped
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
        gamma = (_k_groups(k, layer.tile[1]) * 4 + (0 if kind == "int" else 128)) * _U32
        if kind == "float" and device.type == "cuda":
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
                                      group_k=layer.tile[1] if layer.strategy == "block" else (group or 128))
        return KernelRun(out, q, s, act_group if s.shape[-1] > 1 else k, exact, weight_ref, gamma)

    return KernelPath(name, kind, activation, run_quantized)


def _static_reference(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    q = x.to(torch.float32) / scale
    if kind == "float":
        return q.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.clamp(-128, 127).round().to(torch.int8)


def weight_error_bound(original: torch.Tensor, scales_full: torch.Tensor, layer: StoredLayer) -> torch.Tensor:
    """Largest error round-to-nearest may leave on each element, given the stored scale.

    The converter computes ``v' = w / s`` rounded to the weight dtype (relative error ≤ u), clamps it
    to the code range and rounds it to the grid, so ``|w - q s| ≤ s (u |v| + max(step/2, |v| - qmax))``
    where ``step`` is 1 for integers and the e4m3 spacing at ``|v|`` for fp8 (2**(e-3), 2**-9 below
    2**-6; the larger binade is taken when the quotient's rounding may cross one).
    """
    u = _UNIT_ROUNDOFF.get(original.dtype, 2.0**-8)
    w = original.to(torch.float64)
    s = scales_full.to(torch.float64)
    v = (w / s).abs()
    if layer.kind == "float":
        qmax = FP8_E4M3_MAX
        exponent = torch.floor(torch.log2((v * (1 + u)).clamp_min(2.0**-30))).clamp(min=-6)
        step = torch.pow(2.0, exponent - 3)
    else:
        qmax = float(int_range(layer.num_bits)[1])
        step = torch.ones_like(v)
    return s * (u * v + torch.maximum(step / 2, v - qmax)) * (1 + 1e-9) + 1e-30


def _activations(shape: tuple[int, int], dtype: torch.dtype, seed: int, device: torch.device) -> torch.Tensor:
    """Normal activations with a few outlier channels (every 61st channel 8x), as hidden states after
    a norm layer look; seeded per layer and token count, so runs are repeatable."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator, dtype=torch.float32)
    x[:, ::61] *= 8
    return x.to(dtype).to(device)


def _snr_db(signal: torch.Tensor, noise: torch.Tensor) -> float:
    noise_power = noise.double().pow(2).sum().item()
    signal_power = signal.double().pow(2).sum().item()
    if noise_power == 0:
        return math.inf
    return 10 * math.log10(signal_power / noise_power) if signal_power else -math.inf


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    denominator = b.double().norm().item()
    return (a.double() - b.double()).norm().item() / denominator if denominator else float((a != b).any())


def select_layers(layers: dict[str, StoredLayer], pattern: str | None) -> list[StoredLayer]:
    if pattern is None:
        return list(layers.values())
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise BadInputError(f"--layers {pattern!r}: not a regular expression ({exc})") from exc
    return [layer for name, layer in layers.items() if regex.search(name)]


def verify_layer(layer: StoredLayer, checkpoint: Checkpoint, reader: TensorReader, tokens: list[int],
                 device: torch.device, original: tuple[Checkpoint, TensorReader] | None) -> LayerResult:
    tensors = _weight_tensors(layer, reader, device)
    for leaf in ("input_scale", "output_scale"):
        info = checkpoint.tensors.get(f"{layer.module}.{leaf}")
        if info is not None:
            tensors[leaf] = reader.read(info).to(device)
    bias_info = checkpoint.tensors.get(f"{layer.module}.bias")
    bias = reader.read(bias_info).to(device) if bias_info is not None else None
    path = kernel_path(layer, tensors, checkpoint.config, device)
    ref_dtype = torch.float64 if device.type == "cpu" else torch.float32
    # The float32 reference GEMM on a GPU carries its own rounding (K roundings at most).
    ref_gamma = 0.0 if ref_dtype == torch.float64 else (layer.shape[1] + 2) * _U32
    n, k = layer.shape
    x_dtype = layer.dtype if layer.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
    result = LayerResult(layer.module, layer.label, path.name, path.activation, [n, k], list(tokens),
                         kernel_ratio=0.0, kernel_rel_error=0.0, activation_exact=True, kernel_ok=True)
    if original is not None:
        original_weight = _original_weight(layer, *original).to(device)
    outputs = []
    for m in tokens:
        x = _activations((m, k), x_dtype, zlib.crc32(f"{layer.module}:{m}".encode()), device)
        run = path.run(x, bias)
        result.activation_exact &= run.act_exact
        if run.act_scales is not None:
            a_ref = dequantize_activation_groups(run.act_values, run.act_scales.expand(*run.act_values.shape[:-1], -1)
                                                 if run.act_scales.shape[-1] == 1 else run.act_scales,
                                                 run.act_group if run.act_scales.shape[-1] > 1 else k, ref_dtype)
        else:
            a_ref = run.act_values.to(ref_dtype)
        ref = a_ref @ run.weight_ref.T
        if bias is not None:
            ref = ref + bias.to(ref_dtype)
        abs_dot = a_ref.abs() @ run.weight_ref.abs().T
        if bias is not None:
            abs_dot = abs_dot + bias.to(ref_dtype).abs()
        bound = error_bound(ref, abs_dot, run.gamma, run.output.dtype, ref_gamma)
        diff = (run.output.to(ref_dtype) - ref).abs()
        finite = bool(torch.isfinite(run.output).all())
        ratio = (diff / bound).max().item() if finite and diff.numel() else (math.inf if not finite else 0.0)
        result.kernel_ratio = max(result.kernel_ratio, ratio)
        result.kernel_rel_error = max(result.kernel_rel_error, _rel(run.output, ref))
        if original is not None:
            y_orig = x.to(ref_dtype) @ original_weight.to(ref_dtype).T
            if bias is not None:
                y_orig = y_orig + bias.to(ref_dtype)
            outputs.append((run.output.to(ref_dtype), y_orig))
        del ref, abs_dot, bound, diff
    result.kernel_ok = result.kernel_ratio <= 1.0 and result.activation_exact
    if not result.activation_exact:
        result.notes.append("activation quantization kernel differs from the torch quantizer")
    if original is not None:
        _compare_original(result, layer, tensors, original_weight, outputs, ref_dtype)
    return result


def _refuse_transposed(layer: StoredLayer, checkpoint: Checkpoint) -> None:
    """A layer quantized as ``[out, in]`` whose weight the model stores ``[in, out]`` (GPT-2's Conv1D):
    its scales run along the output axis, and no kernel computes the model's layer. Said in one line
    rather than failing on a shape deep in the reference GEMM."""
    from qconvert.architectures import facts_from_config

    bias = checkpoint.tensors.get(f"{layer.module}.bias")
    conv1d = facts_from_config(checkpoint.config).is_conv1d(layer.module)
    bias_mismatch = bias is not None and len(bias.shape) == 1 and bias.shape[0] != layer.shape[0]
    if conv1d or bias_mismatch:
        why = (f"{checkpoint.config.get('model_type')} builds it as a Conv1D" if conv1d
               else f"its bias has {bias.shape[0]} entries, not {layer.shape[0]}")
        raise BadInputError(
            f"{checkpoint.root}: {layer.module} is stored [in, out] ({why}) but was quantized as [out, in] "
            f"{list(layer.shape)}: its scales run along the wrong axis; quantize the original again (qconvert "
            "now leaves such weights unquantized)")


def _original_weight(layer: StoredLayer, checkpoint: Checkpoint, reader: TensorReader) -> torch.Tensor:
    info = checkpoint.tensors.get(f"{layer.module}.weight")
    if info is None:
        raise BadInputError(f"--original {checkpoint.root}: has no {layer.module}.weight")
    if tuple(info.shape) != layer.shape:
        raise BadInputError(f"--original {checkpoint.root}: {layer.module}.weight is {list(info.shape)}, "
                            f"the quantized layer is {list(layer.shape)}")
    if not info.dtype.is_floating_point or info.dtype.itemsize < 2:
        raise BadInputError(f"--original {checkpoint.root}: {layer.module}.weight is {info.dtype}, not an "
                            "unquantized float weight")
    return reader.read(info)


def _compare_original(result: LayerResult, layer: StoredLayer, tensors: dict[str, torch.Tensor],
                      original_weight: torch.Tensor, outputs: list[tuple[torch.Tensor, torch.Tensor]],
                      ref_dtype: torch.dtype) -> None:
    n, k = layer.shape
    th, tw = layer.tile
    scales = tensors.get("weight_scale", tensors.get("weight_scale_inv"))
    rows, cols = -(-n // th), -(-k // tw)
    scales_full = scales.reshape(rows, cols).repeat_interleave(th, 0)[:n].repeat_interleave(tw, 1)[:, :k]
    if "weight_packed" in tensors:
        codes = unpack_int32(tensors["weight_packed"], layer.num_bits, k)
    else:
        codes = tensors["weight"]
    if codes.dtype == torch.float8_e4m3fnuz:
        from qconvert.kernels import e4m3fnuz_to_e4m3fn

        codes, scales_full = e4m3fnuz_to_e4m3fn(codes, scales_full.to(torch.float32))
    dequantized = codes.to(torch.float64) * scales_full.to(torch.float64)
    error = (original_weight.to(torch.float64) - dequantized).abs()
    allowed = weight_error_bound(original_weight, scales_full, layer)
    ratio = error / allowed
    result.weight_bound_ratio = ratio.max().item()
    result.weight_violations = int((ratio > 1).sum().item())
    result.weight_ok = result.weight_violations == 0
    result.weight_rel_error = _rel(dequantized, original_weight)
    result.weight_snr_db = _snr_db(original_weight, original_weight.to(torch.float64) - dequantized)
    signal = torch.cat([y.flatten() for _, y in outputs])
    produced = torch.cat([out.flatten() for out, _ in outputs])
    result.output_rel_error = _rel(produced, signal)
    result.output_snr_db = _snr_db(signal, produced - signal)
    if not result.weight_ok:
        result.notes.append(f"{result.weight_violations} weight elements outside the round-to-nearest bound")


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run here, if it cannot: before Triton 3.7 it converts
    one-element arrays to loop bounds with ``int()``, which recent NumPy refuses."""
    import numpy
    import triton

    version = tuple(int(part) for part in triton.__version__.split(".")[:2] if part.isdigit())
    if version >= (3, 7):
        return None
    try:
        int(numpy.zeros(1))
    except TypeError:
        return (f"--device cpu: Triton {triton.__version__}'s CPU interpreter does not run with NumPy "
                f"{numpy.__version__} (Triton 3.7 fixed it); use --device cuda, Triton >= 3.7 or an older NumPy")
    return None


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise BadInputError(f"--device {name!r}: expected cpu or cuda[:N]")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BadInputError("--device cuda: no CUDA GPU is visible to torch")
    if device.type == "cpu" and (problem := interpreter_problem()):
        raise BadInputError(problem)
    return device


def parse_tokens(text: str) -> list[int]:
    try:
        tokens = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        tokens = []
    if not tokens or any(t <= 0 for t in tokens):
        raise BadInputError(f"--tokens {text!r}: expected positive token counts, e.g. 1,16,128")
    return tokens


def verify(path: str, original: str | None = None, device: torch.device | None = None,
           tokens: list[int] | None = None, layers: str | None = None,
           on_layer: Callable[[LayerResult], None] | None = None) -> VerifyReport:
    """Check every quantized layer of ``path`` (see the module docstring)."""
    device = device or resolve_device(None)
    tokens = tokens or list(DEFAULT_TOKENS)
    checkpoint = open_checkpoint(resolve_source(path))
    original_checkpoint = open_checkpoint(resolve_source(original)) if original else None
    with TensorReader() as reader, TensorReader() as original_reader:
        found = stored_layers(checkpoint, reader)
        if not found:
            raise BadInputError(f"{checkpoint.root}: no quantized layers to verify")
        chosen = select_layers(found, layers)
        if not chosen:
            raise BadInputError(f"--layers {layers!r} matches none of the {len(found)} quantized layers")
        report = VerifyReport(str(checkpoint.root), str(device), str(original_checkpoint.root) if original_checkpoint
                              else None, tokens, [])
        report.not_verified = sorted(name for name in checkpoint.tensors
                                     if name.endswith("_weight_packed") and name.rpartition(".")[0] not in found)
        pair = (original_checkpoint, original_reader) if original_checkpoint is not None else None
        for layer in chosen:
            _refuse_transposed(layer, checkpoint)
        for layer in chosen:
            result = verify_layer(layer, checkpoint, reader, tokens, device, pair)
            report.layers.append(result)
            if on_layer is not None:
                on_layer(result)
    return report


def worst_first(layers: list[LayerResult]) -> Iterator[LayerResult]:
    """Failures first, then the lowest output SNR (with an original) or the highest kernel ratio."""
    def key(layer: LayerResult) -> tuple:
        snr = layer.output_snr_db if layer.output_snr_db is not None else math.inf
        return (layer.ok, snr, -layer.kernel_ratio)
    return iter(sorted(layers, key=key))


__all__ = ["DEFAULT_TOKENS", "FP8_MMA_GAMMA", "LayerResult", "VerifyReport", "error_bound", "interpreter_problem",
           "kernel_path", "parse_tokens", "resolve_device", "verify", "weight_error_bound", "worst_first"]
