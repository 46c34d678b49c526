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
from qconvert.early_cuda import parse_device
from qconvert.engine import cuda_device
from qconvert.errors import BadInputError
from qconvert.formats import NumberType, StoredLayer
from qconvert.quantizers import FP8_E4M3_MAX, dequantize_activation_groups, int_range
from qconvert.safetensors_io import TensorReader
from qconvert.sources import stored_layers
from qconvert.verify_paths import _U32, FP8_MMA_GAMMA, KernelPath

_UNIT_ROUNDOFF = {torch.float32: _U32, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float64: 2.0**-53}

DEFAULT_TOKENS = (1, 16, 128)
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


def kernel_path(layer: StoredLayer, tensors: dict[str, torch.Tensor], config: dict | None,
                device: torch.device) -> KernelPath:
    """The kernels a runtime runs for this layer, as its format names them."""
    return layer.format.kernel_path(layer, tensors, config, device)


def _weight_tensors(layer: StoredLayer, reader: TensorReader, device: torch.device) -> dict[str, torch.Tensor]:
    return {leaf: reader.read(info).to(device) for leaf, info in layer.parts.items() if leaf != "weight_shape"}


def weight_error_bound(original: torch.Tensor, scales_full: torch.Tensor, layer: StoredLayer,
                       zeros_full: torch.Tensor | None = None) -> torch.Tensor:
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
    if layer.args.number is NumberType.FP4_E2M1:
        # E2M1's spacing: 0.5 below 2, 1 in [2, 4), 2 from 4 to its largest value, 6.
        qmax = 6.0
        reach = v * (1 + u)
        step = torch.where(reach < 2, 0.5, torch.where(reach < 4, 1.0, 2.0)).to(torch.float64)
    elif layer.args.number is NumberType.FP8_E4M3:
        qmax = FP8_E4M3_MAX
        exponent = torch.floor(torch.log2((v * (1 + u)).clamp_min(2.0**-30))).clamp(min=-6)
        step = torch.pow(2.0, exponent - 3)
    elif zeros_full is not None:
        # Asymmetric int: the code is round(clamp(w / s + z)), the addition rounded in the weight dtype too, and
        # clipping is against [qmin - z, qmax - z].
        qmin, qmax = (float(b) for b in int_range(layer.num_bits))
        shifted = w / s + zeros_full.to(torch.float64)
        clip = torch.maximum(shifted - qmax, qmin - shifted)
        rounding = u * v + u * (shifted.abs() + u * v)
        return s * (rounding + torch.maximum(torch.full_like(v, 0.5), clip)) * (1 + 1e-9) + 1e-30
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
        if math.isnan(ratio):  # a NaN in the reference (a NaN scale read from the checkpoint) is a failure too
            ratio = math.inf
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
    codes, scales_full = layer.format.codes_and_scales(layer, tensors)
    dequantized = codes.to(torch.float64) * scales_full.to(torch.float64)
    error = (original_weight.to(torch.float64) - dequantized).abs()
    allowed = weight_error_bound(original_weight, scales_full, layer, layer.format.zero_points_full(layer, tensors))
    ratio = error / allowed
    result.weight_bound_ratio = ratio.nan_to_num(nan=math.inf).max().item()
    result.weight_violations = int((~(ratio <= 1)).sum().item())  # NaN (a NaN scale or code) counts
    result.weight_ok = result.weight_violations == 0
    _record_errors(result, original_weight, dequantized, outputs)
    if not result.weight_ok:
        result.notes.append(f"{result.weight_violations} weight elements outside the round-to-nearest bound")


def _record_errors(result: LayerResult, original_weight: torch.Tensor, dequantized: torch.Tensor,
                   outputs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    result.weight_rel_error = _rel(dequantized, original_weight)
    result.weight_snr_db = _snr_db(original_weight, original_weight.to(torch.float64) - dequantized)
    signal = torch.cat([y.flatten() for _, y in outputs])
    produced = torch.cat([out.flatten() for out, _ in outputs])
    result.output_rel_error = _rel(produced, signal)
    result.output_snr_db = _snr_db(signal, produced - signal)


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
    parsed = parse_device(name)
    if parsed is None:
        raise BadInputError(f"--device {name!r:.60}: expected cpu or cuda[:N]")
    if parsed[0] == "cuda":
        return cuda_device(name, parsed[1])
    if problem := interpreter_problem():
        raise BadInputError(problem)
    return torch.device("cpu")


MAX_TOKENS = 65536  # GEMM M: the activations are [M, in_features], made whole on the device


def parse_tokens(text: str) -> list[int]:
    parts = [t.strip() for t in text.split(",") if t.strip()]
    # ASCII digits, at most 9 (int() also takes "١٦" and "1_000" and any length)
    if not parts or not all(re.fullmatch(r"[0-9]{1,9}", t) for t in parts):
        raise BadInputError(f"--tokens {text!r:.60}: expected positive token counts, e.g. 1,16,128")
    tokens = [int(t) for t in parts]
    if any(t <= 0 or t > MAX_TOKENS for t in tokens):
        raise BadInputError(f"--tokens {text!r:.60}: each count must be from 1 to {MAX_TOKENS}")
    return tokens


def verify(path: str, original: str | None = None, device: torch.device | None = None,
           tokens: list[int] | None = None, layers: str | None = None,
           on_layer: Callable[[LayerResult], None] | None = None,
           on_start: Callable[[int], None] | None = None) -> VerifyReport:
    """Check every quantized layer of ``path`` (see the module docstring); ``on_start`` is told how many
    layers will be checked (a progress total), ``on_layer`` each result."""
    device = device or resolve_device(None)
    tokens = tokens or list(DEFAULT_TOKENS)
    checkpoint = open_checkpoint(resolve_source(path), ours_ok=True)  # its per-expert tensors: noted
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
        if on_start is not None:
            on_start(len(chosen))
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
