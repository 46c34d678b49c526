"""Refusing numbers that would not survive the trip: codes whose dequantized value overflows.

A scale is stored in the weight's dtype (bf16, fp16): a finite weight within a few percent of that
dtype's maximum gives a finite scale, but ``scale * code`` for the format's largest code (-8 for int4,
-128 for int8, 448 for fp8) can exceed the dtype's maximum, and a runtime that dequantizes in that dtype
gets ±Inf. Choosing a different scale would break bit-identity with compressed-tensors for every other
input, so such weights are refused like NaN and Inf are, with a line naming the tensor.
"""

from __future__ import annotations

import torch

from qconvert.errors import BadInputError
from qconvert.planning import module_of
from qconvert.quantizers import FP8_E4M3_MAX
from qconvert.safetensors_io import TensorInfo
from qconvert.schemes import Scheme


def largest_code(scheme: Scheme) -> float:
    """The largest magnitude a stored code can have: 448 (fp8 e4m3fn) or 2**(bits - 1) (int)."""
    return FP8_E4M3_MAX if scheme.kind == "float" else float(1 << (scheme.num_bits - 1))


def require_representable(info: TensorInfo, scales: torch.Tensor, scheme: Scheme) -> None:
    """Refuse when some tile's ``largest code * scale`` is beyond the scale dtype's finite range."""
    if not scales.dtype.is_floating_point or scales.numel() == 0:
        return
    limit = torch.finfo(scales.dtype).max
    worst = float(scales.detach().abs().amax().to(torch.float64)) * largest_code(scheme)
    if worst > limit:
        dtype = str(scales.dtype).removeprefix("torch.")
        raise BadInputError(
            f"{info.file.name}: tensor {info.name} has values so close to the {dtype} "
            f"maximum that {scheme.name} codes would dequantize to ±Inf (scale x code = {worst:.4g} > {limit:.4g}); "
            f"refusing to quantize it (rescale the layer, or skip it with --ignore {module_of(info.name)})"
        )


def require_finite_part(name: str, weight: torch.Tensor) -> None:
    """A fused group's shared scale reads every part's amax: name the part that holds NaN or Inf."""
    if bool(torch.isfinite(weight).all()):
        return
    nan, inf = int(torch.isnan(weight).sum()), int(torch.isinf(weight).sum())
    raise BadInputError(
        f"tensor {name} holds {nan} NaN and {inf} Inf values; refusing to quantize it "
        f"(repair the checkpoint, or skip the layer with --ignore {module_of(name)})"
    )
