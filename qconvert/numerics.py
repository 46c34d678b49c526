"""Refusing numbers that would not survive the trip: codes whose dequantized value overflows.

A runtime rebuilds ``code * scale`` in the weight's dtype (bf16, fp16). A finite weight within a few percent of
that dtype's maximum gives a finite scale, but the format's largest code (-8 for int4, -128 for int8, 448 for
fp8, 6 for fp4) times its scale can exceed the dtype's maximum, and the runtime gets ±Inf. Choosing a different
scale would break bit-identity with compressed-tensors for every other input, so such weights are refused like
NaN and Inf are, with a line naming the tensor.
"""

from __future__ import annotations

import torch

from qconvert.errors import BadInputError
from qconvert.formats import QuantArgs, WeightFormat
from qconvert.planning import module_of
from qconvert.safetensors_io import TensorInfo


def require_representable(info: TensorInfo, scales: torch.Tensor, fmt: WeightFormat, args: QuantArgs,
                          scheme_name: str, dtype: torch.dtype) -> None:
    """Refuse when some tile's ``largest code * scale`` (``scales`` decoded to their values) is beyond the finite
    range of ``dtype``, the dtype the weight is rebuilt in."""
    if not scales.dtype.is_floating_point or scales.numel() == 0 or not dtype.is_floating_point:
        return
    limit = torch.finfo(dtype).max
    worst = float(scales.detach().abs().amax().to(torch.float64)) * fmt.largest_code(args)
    if worst > limit:
        name = str(dtype).removeprefix("torch.")
        raise BadInputError(
            f"{info.file.name}: tensor {info.name} has values so close to the {name} "
            f"maximum that {scheme_name} codes would dequantize to ±Inf (scale x code = {worst:.4g} > {limit:.4g}); "
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
